//! Issue 17, defects 2–5: the edge between the network and the services.
//! - The accept loop: a bound on open connections, the HTTP/2 preface and TLS handshake
//!   deadlines, and (with the real binary under a lowered RLIMIT_NOFILE) no spinning when file
//!   descriptors run out.
//! - `--insecure` plaintext on a non-loopback address is warned about at start.
//! - Requests tonic's codec cannot take are answered as gRPC's guide says, with an `ErrorInfo`.
//! - An oversized header list is answered on its own stream; the connection and its other
//!   streams live on (raw HTTP/2 with the `h2` crate).

mod common;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tde_broker::grpc::proto;
use tde_broker::grpc::status::reason;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::codegen::Bytes;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const MAGIC: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The server's health status (1: SERVING), or the code of the failed call.
async fn health_check(channel: Channel) -> Result<i32, Code> {
    HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
}

/// A new connection (its own channel) and one health check on it.
async fn fresh_client_served(addr: SocketAddr) -> bool {
    let Ok(endpoint) = Channel::from_shared(format!("http://{addr}")) else { return false };
    let endpoint = endpoint.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(2));
    match endpoint.connect().await {
        Ok(channel) => health_check(channel).await == Ok(1),
        Err(_) => false,
    }
}

/// Reads until the peer closes; returns the bytes it sent and when it closed (`None`: not within
/// `limit`). A reset counts as closed.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (usize, Option<Instant>) {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (total, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (total, Some(Instant::now())),
            Ok(Ok(n)) => total += n,
        }
    }
}

// ---- Defect 2: the accept loop -----------------------------------------------------------

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_and_a_normal_client_is_still_served() {
    const TIMEOUT: Duration = Duration::from_millis(1500);
    let b = start_with(|c| {
        c.listener.max_connections = 4;
        c.listener.handshake_timeout = TIMEOUT;
    })
    .await;
    // The harness's channel holds one connection; three idle ones fill the bound.
    assert_eq!(health_check(b.channel.clone()).await, Ok(1));
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(b.addr).await.unwrap());
    }
    let filled = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Over the bound: closed as soon as accepted, before HTTP/2 sends a byte.
    for i in 0..5 {
        let mut over = TcpStream::connect(b.addr).await.unwrap();
        let (sent, closed) = read_until_closed(&mut over, Duration::from_millis(500)).await;
        assert!(closed.is_some(), "connection {i} over the bound is closed at once");
        assert_eq!(sent, 0, "connection {i} over the bound got no HTTP/2 settings");
    }
    // The connection that holds a slot is served throughout; a new client is not, yet.
    assert_eq!(health_check(b.channel.clone()).await, Ok(1));
    assert!(!fresh_client_served(b.addr).await, "no room for a fifth connection");
    // The idle ones never send a preface: closed after the handshake timeout, and then a
    // normal client is served.
    for conn in &mut idle {
        let (_, closed) = read_until_closed(conn, Duration::from_secs(5)).await;
        let closed = closed.expect("the idle connection is closed");
        assert!(
            closed - filled >= TIMEOUT - Duration::from_millis(100),
            "closed too early: {:?}",
            closed - filled
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fresh_client_served(b.addr).await {
        assert!(Instant::now() < deadline, "a normal client is served once the idle connections are gone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.stop().await;
}

#[tokio::test]
async fn an_idle_connection_that_sends_no_preface_is_closed_after_the_handshake_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(700);
    let b = start_with(|c| c.listener.handshake_timeout = TIMEOUT).await;
    let opened = Instant::now();
    let mut silent = TcpStream::connect(b.addr).await.unwrap();
    // Half a preface: the magic, but no SETTINGS frame.
    let mut half = TcpStream::connect(b.addr).await.unwrap();
    half.write_all(MAGIC).await.unwrap();
    for (what, conn) in [("silent", &mut silent), ("magic only", &mut half)] {
        let (sent, closed) = read_until_closed(conn, Duration::from_secs(5)).await;
        let after = closed.unwrap_or_else(|| panic!("the {what} connection is closed")) - opened;
        assert!(after >= TIMEOUT - Duration::from_millis(50), "{what}: closed after {after:?}");
        assert!(after < Duration::from_secs(3), "{what}: closed after {after:?}");
        assert!(sent > 0, "{what}: HTTP/2 sent its settings first");
    }
    // A client that completed the preface may idle as long as it likes.
    tokio::time::sleep(TIMEOUT * 2).await;
    assert_eq!(health_check(b.channel.clone()).await, Ok(1), "the harness's idle channel still works");
    b.stop().await;
}

#[tokio::test]
async fn an_idle_connection_that_never_starts_tls_is_closed_after_the_handshake_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let b = start_with(|c| {
        c.tls = tde_broker::config::TlsMode::Auto;
        c.listener.handshake_timeout = TIMEOUT;
    })
    .await;
    let opened = Instant::now();
    let mut silent = TcpStream::connect(b.addr).await.unwrap();
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(8)).await;
    let after = closed.expect("closed well before tonic's fixed 10 s") - opened;
    assert!(after >= TIMEOUT - Duration::from_millis(50) && after < Duration::from_secs(4), "{after:?}");
    // TLS clients are served as before.
    assert_eq!(health_check(b.channel.clone()).await, Ok(1));
    b.stop().await;
}

#[tokio::test]
async fn a_tls_connection_that_sends_no_preface_after_its_handshake_is_closed_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt as _;
    const TIMEOUT: Duration = Duration::from_secs(1);
    let b = start_with(|c| {
        c.tls = tde_broker::config::TlsMode::Auto;
        c.listener.handshake_timeout = TIMEOUT;
    })
    .await;
    tde_broker::tls::install_crypto_provider();
    let ca = std::fs::read(b.data_dir.join("tls/ca.pem")).unwrap();
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in tde_broker::tls::certs_from_pem(std::path::Path::new("ca.pem"), &ca).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut client =
        tokio_rustls::rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = TcpStream::connect(b.addr).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // The handshake completes (twice the timeout would be past it), then the client says nothing.
    let mut tls = tokio::time::timeout(TIMEOUT * 2, connector.connect(name, tcp))
        .await
        .expect("the handshake completes within the timeout")
        .expect("TLS handshake");
    let handshaken = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(8), tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Instant::now(),
            Ok(Ok(_)) => continue, // the server's SETTINGS (and session tickets)
            Err(_) => panic!("a TLS connection that sends no HTTP/2 preface stays open"),
        }
    };
    let after = closed - handshaken;
    assert!(after >= TIMEOUT - Duration::from_millis(50) && after < Duration::from_secs(4), "{after:?}");
    // TLS clients that speak HTTP/2 are served as before.
    assert_eq!(health_check(b.channel.clone()).await, Ok(1));
    b.stop().await;
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `tde-broker serve` with the open-file limit lowered to `nofile` (`ulimit -n` in `sh`, then
/// `exec`: the broker keeps the shell's pid).
fn spawn_limited_broker(data_dir: &Path, port: u16, nofile: u32, extra: &[&str]) -> Killed {
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_tde-broker"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--http-listen", "off"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn tde-broker serve");
    Killed(child)
}

#[tokio::test]
async fn the_accept_loop_backs_off_instead_of_spinning_when_file_descriptors_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let broker = spawn_limited_broker(dir.path(), port, 256, &["--handshake-timeout", "3"]);
    let pid = broker.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fresh_client_served(addr).await {
        assert!(Instant::now() < deadline, "the broker did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 320 idle connections against 256 file descriptors: accepting fails with EMFILE.
    let mut idle = Vec::new();
    for _ in 0..320 {
        idle.push(TcpStream::connect(addr).await.expect("the kernel completes the TCP handshake"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let busy = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    assert!(busy < 0.25, "the idle broker used {:.0}% of a core while out of file descriptors", busy * 100.0);
    // Once the idle connections time out (3 s), descriptors come back and a client is served.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fresh_client_served(addr).await {
        assert!(Instant::now() < deadline, "a normal client is served once descriptors are free again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(idle);
    drop(broker);
}

// ---- Defect 3: the --insecure warning ----------------------------------------------------

#[test]
fn insecure_plaintext_on_a_non_loopback_address_warns_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tde-broker"))
        .args(["serve", "--listen", "0.0.0.0:0", "--insecure", "--http-listen", "off"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tde-broker serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let child = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let warning = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("WARN") && line.contains("PLAINTEXT") => break line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no plaintext warning within 60 s; the broker logged:\n{}", seen.join("\n")),
        }
    };
    assert!(warning.contains("0.0.0.0"), "{warning}");
    assert!(warning.contains("--tls auto"), "the warning says what to do: {warning}");
    assert!(seen.iter().any(|l| l.contains("serving gRPC")), "warned at start: {seen:?}");
    drop(child);
}

// ---- Raw HTTP/2 -------------------------------------------------------------------------

type H2 = h2::client::SendRequest<Bytes>;

/// An HTTP/2 connection to `addr` (prior knowledge); the connection task's handle tells how it
/// ended.
async fn h2_connect(addr: SocketAddr) -> (H2, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    (send, tokio::spawn(conn))
}

fn grpc_request(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    extra: &[(String, String)],
) -> http::Request<()> {
    let mut r = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        r = r.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in extra {
        r = r.header(name.as_str(), value.as_str());
    }
    r.body(()).unwrap()
}

/// A gRPC message frame: uncompressed, length-prefixed.
fn framed(message: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    v.extend_from_slice(message);
    v
}

/// What an answered stream said: the HTTP status and the gRPC status (headers or trailers).
struct Answer {
    http: http::StatusCode,
    grpc: Option<Status>,
    messages: Vec<u8>,
}

/// Sends one request (headers, then `body` when given) and reads the whole answer.
async fn call(h2: &mut H2, req: http::Request<()>, body: Option<Vec<u8>>) -> Result<Answer, h2::Error> {
    let mut ready = h2.clone().ready().await?;
    let (response, mut send) = ready.send_request(req, body.is_none())?;
    if let Some(body) = body {
        send.send_data(Bytes::from(body), true)?;
    }
    let response = response.await?;
    let http = response.status();
    let headers_status = Status::from_header_map(response.headers());
    let mut recv = response.into_body();
    let mut messages = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        messages.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await?;
    let grpc = headers_status.or_else(|| trailers.as_ref().and_then(Status::from_header_map));
    Ok(Answer { http, grpc, messages })
}

// ---- Defect 4: the codec's statuses ------------------------------------------------------

#[tokio::test]
async fn an_oversized_message_answers_resource_exhausted_message_too_large() {
    let b = start().await;
    let big = vec![7u8; tde_broker::server::MAX_MESSAGE_BYTES + 1024];
    let r = b.kv().wrap_key(crypto_req("https://any.vault.azure.net/keys/k", "RSA-OAEP-256", &big)).await;
    let msg = assert_status(r, Code::ResourceExhausted, "MessageTooLarge");
    assert!(msg.contains("too large"), "{msg}");
    // The broker is fine afterwards, on the same channel.
    assert_eq!(health_check(b.channel.clone()).await, Ok(1));
    b.stop().await;
}

#[tokio::test]
async fn an_undecodable_body_answers_invalid_argument_malformed_request() {
    let b = start().await;
    let (mut h2, _conn) = h2_connect(b.addr).await;
    let get_key = "/tdebroker.v1.KeyVault/GetKey";
    // A gRPC frame whose content is not protobuf; a body that is not gRPC-framed at all; a
    // frame cut short.
    let bodies: [(&str, Vec<u8>); 3] = [
        ("not protobuf", framed(&[0xff, 0xff, 0xff, 0xff])),
        ("not a gRPC frame", b"hello, broker".to_vec()),
        ("cut short", framed(&[0x0a, 0x10, b'h'])[..7].to_vec()),
    ];
    for (what, body) in bodies {
        let answer = call(&mut h2, grpc_request(b.addr, get_key, Some(b.token.as_str()), &[]), Some(body))
            .await
            .unwrap();
        let status = answer.grpc.unwrap_or_else(|| panic!("{what}: a gRPC status"));
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {}", status.message());
        assert_eq!(reason(&status).as_deref(), Some("MalformedRequest"), "{what}");
    }
    // The same for a service outside tdebroker.* (gRPC health).
    let answer = call(
        &mut h2,
        grpc_request(b.addr, "/grpc.health.v1.Health/Check", None, &[]),
        Some(framed(&[0xff, 0xff])),
    )
    .await
    .unwrap();
    let status = answer.grpc.expect("a gRPC status");
    assert_eq!(
        (status.code(), reason(&status).as_deref()),
        (Code::InvalidArgument, Some("MalformedRequest"))
    );
    // A well-formed request on the same connection is answered as usual.
    let ok = call(&mut h2, grpc_request(b.addr, get_key, Some(b.token.as_str()), &[]), Some(framed(&[])))
        .await
        .unwrap();
    let status = ok.grpc.expect("a gRPC status");
    assert_ne!(
        reason(&status).as_deref(),
        Some("MalformedRequest"),
        "an empty GetKeyRequest decodes: {}",
        status.message()
    );
    b.stop().await;
}

// ---- Defect 5: oversized header lists ----------------------------------------------------

/// `count` header fields of 1,000 bytes each ('X' encodes to 8 bits in HPACK's Huffman code,
/// so each takes about as many bytes on the wire as decoded). `tag` keeps the names distinct
/// from other requests' (no HPACK table hits).
fn padding(tag: &str, count: usize) -> Vec<(String, String)> {
    (0..count).map(|i| (format!("x-pad-{tag}-{i:03}"), "X".repeat(1000))).collect()
}

/// A health Watch stream: its first message (SERVING) read, the stream left open.
async fn open_watch(h2: &mut H2, addr: SocketAddr) -> h2::RecvStream {
    let mut ready = h2.clone().ready().await.unwrap();
    let (response, mut send) =
        ready.send_request(grpc_request(addr, "/grpc.health.v1.Health/Watch", None, &[]), false).unwrap();
    send.send_data(Bytes::from(framed(&[])), true).unwrap();
    let response = response.await.expect("watch answered");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.data().await.expect("a first message").expect("no error");
    let _ = body.flow_control().release_capacity(first.len());
    assert_eq!(&first[..], &framed(&[0x08, 0x01])[..], "SERVING");
    body
}

#[tokio::test]
async fn an_oversized_header_list_is_answered_on_its_stream_alone() {
    let b = start().await;
    let (mut h2, conn) = h2_connect(b.addr).await;
    let mut watch = open_watch(&mut h2, b.addr).await;
    let check = "/grpc.health.v1.Health/Check";

    // ~50 KB (about three full 16 KiB frames): over the broker's 16 KiB, so refused — by the
    // broker, with a gRPC status, on this stream only.
    let answer = call(&mut h2, grpc_request(b.addr, check, None, &padding("a", 48)), Some(framed(&[])))
        .await
        .expect("the stream is answered, not reset with the connection");
    let status = answer.grpc.expect("a gRPC status");
    assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
    assert_eq!(reason(&status).as_deref(), Some("HeaderListTooLarge"));
    assert!(status.message().contains("16384"), "{}", status.message());
    // The same on a tdebroker RPC (the one counted and audited).
    let answer = call(
        &mut h2,
        grpc_request(b.addr, "/tdebroker.v1.KeyVault/GetKey", Some(b.token.as_str()), &padding("b", 30)),
        Some(framed(&[])),
    )
    .await
    .expect("answered");
    let status = answer.grpc.expect("a gRPC status");
    assert_eq!(
        (status.code(), reason(&status).as_deref()),
        (Code::ResourceExhausted, Some("HeaderListTooLarge"))
    );

    // ~83 KB: over what HTTP/2 itself takes (4 × 16 KiB) but inside its guards: h2 answers
    // HTTP 431 on the stream (and resets it), not GOAWAY.
    match call(&mut h2, grpc_request(b.addr, check, None, &padding("c", 80)), None).await {
        Ok(answer) => assert_eq!(answer.http, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => assert!(e.is_reset() && !e.is_go_away(), "a stream reset, not the connection: {e:?}"),
    }

    // The in-flight stream and the connection live on.
    let quiet = tokio::time::timeout(Duration::from_millis(300), watch.data()).await;
    assert!(quiet.is_err(), "the watch stream is still open and quiet: {quiet:?}");
    let answer =
        call(&mut h2, grpc_request(b.addr, check, None, &[]), Some(framed(&[]))).await.expect("served");
    assert_eq!(answer.grpc.map(|s| s.code()), Some(Code::Ok));
    assert_eq!(answer.messages, framed(&[0x08, 0x01]));
    assert!(!conn.is_finished(), "the connection is open");
    // A graceful stop waits for open streams: the watch goes first.
    drop((watch, h2));
    conn.abort();
    b.stop().await;
}

/// What the protocol library does past its flood guards (many CONTINUATION frames, or a list
/// far over the limit): it sends GOAWAY and closes the connection, ending its other streams.
/// h2 decides this; the broker can only keep its own limit well below (see
/// `ListenerSettings::h2_max_header_list_size`).
#[tokio::test]
async fn a_header_block_past_h2s_flood_guards_ends_the_connection_with_goaway() {
    let b = start().await;
    let (mut h2, conn) = h2_connect(b.addr).await;
    let mut watch = open_watch(&mut h2, b.addr).await;
    // ~300 KB in ~19 frames: more CONTINUATION frames than h2 accepts for a 64 KiB limit.
    let err =
        call(&mut h2, grpc_request(b.addr, "/grpc.health.v1.Health/Check", None, &padding("d", 300)), None)
            .await
            .err()
            .expect("the request fails with the connection");
    assert!(err.is_go_away() || err.is_io(), "{err:?}");
    if err.is_go_away() {
        assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{err:?}");
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.data()).await.expect("the watch ends too");
    assert!(!matches!(ended, Some(Ok(_))), "no more messages: {ended:?}");
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await.expect("the connection ends");
    // Other connections are unaffected.
    assert_eq!(health_check(b.channel.clone()).await, Ok(1));
    b.stop().await;
}

/// An unknown method's path through the edge still reads `Unimplemented` (nothing rewritten).
#[tokio::test]
async fn statuses_the_codec_did_not_make_are_left_alone() {
    let b = start().await;
    let (mut h2, _conn) = h2_connect(b.addr).await;
    let answer = call(
        &mut h2,
        grpc_request(b.addr, "/tdebroker.v1.KeyVault/NoSuchMethod", Some(b.token.as_str()), &[]),
        Some(framed(&[])),
    )
    .await
    .unwrap();
    assert_eq!(answer.grpc.map(|s| s.code()), Some(Code::Unimplemented));
    // A broker refusal keeps its code and reason.
    let r =
        b.kv().get_key(proto::GetKeyRequest { key_id: "https://nope.vault.azure.net/keys/k".into() }).await;
    let s = r.expect_err("no such vault");
    let why = reason(&s).expect("the broker's refusal carries its reason");
    assert!(!["MalformedRequest", "MessageTooLarge"].contains(&why.as_str()), "{why}: {}", s.message());
    b.stop().await;
}
