//! HTTP/2 abuse against the real `tde-broker serve` binary, with a hand-written client
//! (`common::rawh2`): rapid reset, CONTINUATION floods, SETTINGS and PING floods, flow-control
//! abuse (overflowing and zero WINDOW_UPDATEs, a zero window that is never opened), streams
//! beyond the concurrency limit, and resets the server is made to send.
//!
//! For each: a normal client on its own connection keeps being served (an authenticated
//! GetKey, probed all along the abuse and once after it, each probe given a 20 s deadline — a
//! hang detector, not a performance threshold), the broker's peak resident memory (VmHWM after
//! the abuse) stays within [`RSS_GROWTH_BOUND`] of its resident memory before it (VmRSS), and the
//! abusive connection gets what HTTP/2 (RFC 9113) and the server's limits say it gets. The
//! figures (memory before and after, the broker's CPU time during the abuse) are printed;
//! `cargo test --test http2_abuse -- --nocapture` shows them (docs/reliability/http2.md).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::rawh2::{self, code, kind, setting};
use common::*;
use prost::Message as _;
use tde_broker::grpc::proto;
use tde_broker::grpc::proto::key_vault_client::KeyVaultClient;
use tde_broker::grpc::proto::vaults_client::VaultsClient;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tonic::transport::Channel;

/// How much the broker's peak resident memory may exceed its resident memory before an abuse.
/// What a connection may legitimately make the broker hold is far below it: the receive windows
/// the broker grants (1 MiB for the connection, 1 MiB per stream, only for bodies it reads), up
/// to 400 KiB of send buffer per stream, the streams the concurrency limit admits
/// (`server::MAX_CONCURRENT_STREAMS`, each a few KiB of state and a handler task), a header list of
/// at most 4 × 16 KiB. An abuse whose cost grows with the frames sent — and every test sends
/// from tens of MiB to hundreds of MiB — would pass it.
const RSS_GROWTH_BOUND: u64 = 64 * 1024 * 1024;
/// Deadline of one liveness probe (connect and GetKey): detects a hang, not slowness.
const PROBE_DEADLINE: Duration = Duration::from_secs(20);
/// Pause between liveness probes during an abuse.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Longest time any abuse is given to end on its own (the server's answer, or the frames to send
/// running out) before the test calls it a hang.
const ABUSE_DEADLINE: Duration = Duration::from_secs(120);

const VAULT: &str = "abuse-vault";
const KEY_ID: &str = "https://abuse-vault.vault.azure.net/keys/k";
const GET_KEY: &str = "/tdebroker.v1.KeyVault/GetKey";

/// One abuse at a time: each runs its own broker, but the figures (CPU especially) are cleaner
/// and the machine less loaded when they do not overlap.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `tde-broker serve` child process with a vault and an RSA key, killed when dropped.
struct Broker {
    child: Child,
    addr: std::net::SocketAddr,
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Fields of `/proc/<pid>/status` in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in status"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

impl Broker {
    async fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let port = free_port();
        let child = spawn(&data, port);
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (channel, token) = connect(addr, &data).await;
        let auth = bearer(&token);
        let oid = claims(&token)["oid"].as_str().unwrap().to_string();
        let mut vaults = VaultsClient::with_interceptor(channel.clone(), auth.clone());
        vaults
            .create_vault(proto::CreateVaultRequest { name: VAULT.into(), ..Default::default() })
            .await
            .unwrap();
        vaults
            .set_access_policy(proto::SetAccessPolicyRequest {
                vault_name: VAULT.into(),
                object_id: oid,
                key_permissions: vec!["all".into()],
            })
            .await
            .unwrap();
        KeyVaultClient::with_interceptor(channel, auth)
            .create_key(proto::CreateKeyRequest {
                vault_name: VAULT.into(),
                name: "k".into(),
                kty: "RSA".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let broker = Broker { child, addr, token, _dir: dir };
        broker.probe().await.expect("GetKey before any abuse");
        broker
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A normal client on a fresh connection: GetKey must succeed within [`PROBE_DEADLINE`].
    async fn probe(&self) -> Result<(), String> {
        Prober { addr: self.addr, token: self.token.clone() }.probe().await
    }

    /// The request body of GetKey for the test key, framed as gRPC.
    fn get_key_body() -> Vec<u8> {
        rawh2::grpc_message(&proto::GetKeyRequest { key_id: KEY_ID.into() }.encode_to_vec())
    }

    fn get_key_block(&self) -> Vec<u8> {
        rawh2::grpc_request_block(GET_KEY, Some(&self.token))
    }

    /// Runs `abuse` while probing from a normal client, then probes once more; asserts every
    /// probe succeeded and the memory bound held, and prints the figures.
    async fn under<T>(&self, name: &str, abuse: impl std::future::Future<Output = T>) -> T {
        let pid = self.pid();
        let rss_before = status_kib(pid, "VmRSS:");
        let cpu_before = cpu_seconds(pid);
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(AtomicU64::new(0));
        let prober = {
            let stop = stop.clone();
            let probes = probes.clone();
            let addr = self.addr;
            let token = self.token.clone();
            tokio::spawn(async move {
                let me = Prober { addr, token };
                while !stop.load(Ordering::Acquire) {
                    me.probe().await?;
                    probes.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(PROBE_EVERY).await;
                }
                Ok::<(), String>(())
            })
        };
        let out = tokio::time::timeout(ABUSE_DEADLINE, abuse)
            .await
            .unwrap_or_else(|_| panic!("{name}: the abuse did not end within {ABUSE_DEADLINE:?}"));
        let abuse_time = started.elapsed();
        let cpu = cpu_seconds(pid) - cpu_before;
        stop.store(true, Ordering::Release);
        prober
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: a normal client was not served during the abuse: {e}"));
        self.probe()
            .await
            .unwrap_or_else(|e| panic!("{name}: a normal client was not served after the abuse: {e}"));
        let rss_after = status_kib(pid, "VmRSS:");
        let hwm_after = status_kib(pid, "VmHWM:");
        let growth = hwm_after.saturating_sub(rss_before) * 1024;
        println!(
            "FIGURES {name}: VmRSS before {:.1} MiB, VmHWM after {:.1} MiB (growth {:.1} MiB), VmRSS after {:.1} MiB; broker CPU {cpu:.2} s over {:.2} s of abuse ({:.0}% of one core); {} normal calls served during it",
            rss_before as f64 / 1024.0,
            hwm_after as f64 / 1024.0,
            growth as f64 / (1024.0 * 1024.0),
            rss_after as f64 / 1024.0,
            abuse_time.as_secs_f64(),
            100.0 * cpu / abuse_time.as_secs_f64().max(0.001),
            probes.load(Ordering::Relaxed),
        );
        assert!(
            growth < RSS_GROWTH_BOUND,
            "{name}: the broker's peak RSS grew by {growth} bytes (bound {RSS_GROWTH_BOUND})"
        );
        out
    }
}

/// A normal client of the broker (the probe, also run from the prober task).
struct Prober {
    addr: std::net::SocketAddr,
    token: String,
}

impl Prober {
    async fn probe(&self) -> Result<(), String> {
        let call = async {
            let channel = Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            KeyVaultClient::with_interceptor(channel, bearer(&self.token))
                .get_key(proto::GetKeyRequest { key_id: KEY_ID.into() })
                .await
                .map_err(|s| format!("GetKey: {s:?}"))?;
            Ok(())
        };
        tokio::time::timeout(PROBE_DEADLINE, call)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {PROBE_DEADLINE:?}")))
    }
}

fn spawn(data_dir: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tde-broker"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--http-listen", "off"])
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn tde-broker serve")
}

async fn connect(addr: std::net::SocketAddr, data_dir: &Path) -> (Channel, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await
            && let Ok(token) = std::fs::read_to_string(data_dir.join("admin.token"))
        {
            return (ch, token.trim().to_string());
        }
        assert!(Instant::now() < deadline, "the broker did not come up on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `frames()` batches on `write` until the batches run out, the socket fails, or `stop`
/// is set (the reader saw the server give up on the connection). Returns (batches, bytes) sent.
async fn send_until_stopped(
    write: &mut OwnedWriteHalf,
    stop: &AtomicBool,
    batches: usize,
    mut batch: impl FnMut(usize) -> Vec<u8>,
) -> (usize, u64) {
    let mut bytes = 0u64;
    for i in 0..batches {
        if stop.load(Ordering::Acquire) {
            return (i, bytes);
        }
        let buf = batch(i);
        if write.write_all(&buf).await.is_err() {
            return (i, bytes);
        }
        bytes += buf.len() as u64;
    }
    (batches, bytes)
}

/// A connection after the handshake whose reader drains it on its own task (setting `stop` once
/// the server sent GOAWAY or closed), and its write half.
async fn abusive_connection(
    addr: std::net::SocketAddr,
    params: &[(u16, u32)],
) -> (OwnedWriteHalf, Arc<AtomicBool>, tokio::task::JoinHandle<rawh2::Drained>) {
    let (mut reader, write, _) = rawh2::handshake(addr, params).await.expect("HTTP/2 handshake");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let drain = tokio::spawn(async move {
        let mut drained = rawh2::Drained::default();
        loop {
            match reader.next().await {
                Ok(Some(frame)) => {
                    drained.count(&frame);
                    if frame.kind == kind::GOAWAY {
                        flag.store(true, Ordering::Release);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    drained.error = Some(e);
                    break;
                }
            }
        }
        flag.store(true, Ordering::Release);
        drained
    });
    (write, stop, drain)
}

/// Client stream ids: 1, 3, 5, ...
/// Streams a flood opens, and how many go in one write.
const FLOOD_STREAMS: usize = 20_000;
const FLOOD_BATCH: usize = 50;

/// Opens up to [`FLOOD_STREAMS`] GetKey streams on one abusive connection, each HEADERS followed
/// at once by the frames `then` makes for its id, until the server stops reading; returns how
/// many were sent and what the connection received.
async fn stream_flood(broker: &Broker, name: &str, then: fn(u32) -> Vec<u8>) -> (usize, rawh2::Drained) {
    broker
        .under(name, async {
            let (mut write, stop, drain) = abusive_connection(broker.addr, &[]).await;
            let block = broker.get_key_block();
            let (batches, _) = send_until_stopped(&mut write, &stop, FLOOD_STREAMS / FLOOD_BATCH, |b| {
                let mut buf = Vec::new();
                for i in b * FLOOD_BATCH..(b + 1) * FLOOD_BATCH {
                    let id = stream_id(i);
                    buf.extend(rawh2::headers(id, &block, false, true));
                    buf.extend(then(id));
                }
                buf
            })
            .await;
            drop(write);
            (batches * FLOOD_BATCH, drain.await.unwrap())
        })
        .await
}

fn stream_id(i: usize) -> u32 {
    u32::try_from(2 * i + 1).expect("stream id")
}

// ---------------------------------------------------------------------------------------------
// Rapid reset (CVE-2023-44487): HEADERS then RST_STREAM at once, thousands of times.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rapid_reset_ends_the_connection_with_enhance_your_calm() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start().await;
    let (sent, drained) =
        stream_flood(&broker, "rapid reset", |id| rawh2::rst_stream(id, code::CANCEL)).await;
    println!("rapid reset: {sent} of {FLOOD_STREAMS} HEADERS+RST_STREAM pairs sent; {}", drained.summary());
    // h2 allows few streams reset by the client before the server accepted them
    // (`max_pending_accept_reset_streams`); past that it sends GOAWAY ENHANCE_YOUR_CALM.
    assert_eq!(drained.goaway_code(), Some(code::ENHANCE_YOUR_CALM), "{}", drained.summary());
    assert!(sent < FLOOD_STREAMS, "the server ended the connection before the flood ended");
}

// ---------------------------------------------------------------------------------------------
// CONTINUATION floods: a header block that never ends.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_endless_run_of_empty_continuation_frames_ends_the_connection_with_enhance_your_calm() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start().await;
    const FRAMES: usize = 1_000_000;
    const PER_BATCH: usize = 1_000;
    let drained = broker
        .under("CONTINUATION flood (empty frames)", async {
            let (mut write, stop, drain) = abusive_connection(broker.addr, &[]).await;
            let block = broker.get_key_block();
            write.write_all(&rawh2::headers(1, &block, false, false)).await.unwrap();
            let empty = rawh2::continuation(1, &[], false);
            let (batches, bytes) =
                send_until_stopped(&mut write, &stop, FRAMES / PER_BATCH, |_| empty.repeat(PER_BATCH)).await;
            drop(write);
            let drained = drain.await.unwrap();
            println!("empty CONTINUATION: {} frames ({bytes} bytes) sent", batches * PER_BATCH);
            drained
        })
        .await;
    println!("empty CONTINUATION: {}", drained.summary());
    // h2 counts CONTINUATION frames of one header block (at most max(5, 1.25 × list limit /
    // frame size)) whatever their size.
    assert_eq!(drained.goaway_code(), Some(code::ENHANCE_YOUR_CALM), "{}", drained.summary());
    assert_eq!(drained.goaway.as_ref().map(|g| g.2.as_str()), Some("too_many_continuations"));
}

#[tokio::test]
async fn a_header_block_growing_past_the_limit_in_continuation_frames_ends_the_connection() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start().await;
    // One header whose value says it is 16 MiB long, sent 16 KiB per frame: 1 Ki frames if the
    // server took them all (and 64 Ki frames are offered).
    const FRAMES: usize = 65_536;
    let drained = broker
        .under("CONTINUATION flood (growing header block)", async {
            let (mut write, stop, drain) = abusive_connection(broker.addr, &[]).await;
            let mut first = broker.get_key_block();
            first.push(0x00);
            rawh2::hpack_string(&mut first, b"x-pad");
            rawh2::hpack_int(&mut first, 1 << 24, 7, 0x00);
            first.resize(rawh2::MAX_FRAME, b'a');
            write.write_all(&rawh2::headers(1, &first, false, false)).await.unwrap();
            let chunk = rawh2::continuation(1, &[b'a'; rawh2::MAX_FRAME], false);
            let (frames, bytes) = send_until_stopped(&mut write, &stop, FRAMES, |_| chunk.clone()).await;
            drop(write);
            let drained = drain.await.unwrap();
            println!("growing CONTINUATION: {frames} frames ({bytes} bytes) sent");
            drained
        })
        .await;
    println!("growing CONTINUATION: {}", drained.summary());
    // Past h2's guards (frame count, bytes buffered while over the limit): GOAWAY.
    assert!(
        matches!(drained.goaway_code(), Some(code::ENHANCE_YOUR_CALM | code::COMPRESSION_ERROR)),
        "{}",
        drained.summary()
    );
}

// ---------------------------------------------------------------------------------------------
// SETTINGS and PING floods from a client that never reads.
// ---------------------------------------------------------------------------------------------

/// Floods a connection whose client never reads with `frame` for up to `window` (or `max_bytes`),
/// then reads everything the server sent. Returns (bytes sent, what was read).
async fn flood_without_reading(
    broker: &Broker,
    frame: Vec<u8>,
    window: Duration,
    max_bytes: u64,
) -> (u64, rawh2::Drained) {
    let (mut reader, mut write) = rawh2::connect(broker.addr, &[]).await.expect("connect");
    let batch = frame.repeat(4096 / frame.len());
    let mut sent = 0u64;
    let until = Instant::now() + window;
    // The client stops when the window ends; a write the server does not read blocks once the
    // socket buffers are full (the server read what it could answer).
    while sent < max_bytes {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, write.write_all(&batch)).await {
            Ok(Ok(())) => sent += batch.len() as u64,
            Ok(Err(_)) | Err(_) => break,
        }
    }
    // Now read what the server wrote, then close our side; the server should see EOF.
    drop(write);
    let drained = tokio::time::timeout(ABUSE_DEADLINE, reader.drain()).await.expect("the server closed");
    (sent, drained)
}

#[tokio::test]
async fn a_settings_flood_from_a_client_that_never_reads_stays_bounded() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start().await;
    let frame = rawh2::settings(&[(setting::HEADER_TABLE_SIZE, 4096), (setting::ENABLE_PUSH, 0)]);
    let frame_len = frame.len() as u64;
    let (sent, drained) = broker
        .under("SETTINGS flood", flood_without_reading(&broker, frame, Duration::from_secs(5), 1 << 30))
        .await;
    // A batch cut short by the end of the window may have been written in part.
    let frames = sent / frame_len + 4096 / frame_len;
    println!("SETTINGS flood: {frames} SETTINGS frames ({sent} bytes) written; {}", drained.summary());
    // Each SETTINGS the server read is acknowledged, one ACK each, and nothing else goes wrong;
    // the ACKs it owes are bounded by what it read, and it stops reading while it cannot write
    // them (the memory bound above).
    assert!(drained.settings_acks >= 1 && drained.settings_acks <= frames + 1, "{}", drained.summary());
    assert!(
        drained.goaway.is_none() || drained.goaway_code() == Some(code::NO_ERROR),
        "{}",
        drained.summary()
    );
}

#[tokio::test]
async fn a_ping_flood_from_a_client_that_never_reads_stays_bounded() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start().await;
    let frame = rawh2::ping(*b"abusive!");
    let frame_len = frame.len() as u64;
    let (sent, drained) = broker
        .under("PING flood", flood_without_reading(&broker, frame, Duration::from_secs(5), 1 << 30))
        .await;
    // A batch cut short by the end of the window may have been written in part.
    let frames = sent / frame_len + 4096 / frame_len;
    println!("PING flood: {frames} PING frames ({sent} bytes) written; {}", drained.summary());
    assert!(drained.ping_acks >= 1 && drained.ping_acks <= frames, "{}", drained.summary());
    assert!(
        drained.goaway.is_none() || drained.goaway_code() == Some(code::NO_ERROR),
        "{}",
        drained.summary()
    );
}

// ---------------------------------------------------------------------------------------------
// Flow-control abuse.
// ---------------------------------------------------------------------------------------------

/// Sends `frames` on a fresh connection (after the handshake) and reads until the server closes.
async fn send_and_drain(broker: &Broker, frames: Vec<u8>) -> rawh2::Drained {
    let (mut write, _stop, drain) = abusive_connection(broker.addr, &[]).await;
    write.write_all(&frames).await.unwrap();
    // Keep our side open: the server must be the one that ends the connection.
    let drained = tokio::time::timeout(ABUSE_DEADLINE, drain).await.expect("the server closed").unwrap();
    drop(write);
    drained
}

#[tokio::test]
async fn a_connection_window_update_past_2_31_minus_1_is_a_flow_control_error() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start().await;
    let drained = broker
        .under("connection WINDOW_UPDATE overflow", async {
            // The connection window starts at 65,535: adding 2^31-1 overflows it.
            send_and_drain(&broker, rawh2::window_update(0, rawh2::MAX_WINDOW)).await
        })
        .await;
    println!("connection window overflow: {}", drained.summary());
    assert_eq!(drained.goaway_code(), Some(code::FLOW_CONTROL_ERROR), "{}", drained.summary());
}

#[tokio::test]
async fn zero_increment_window_updates_are_protocol_errors() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start().await;
    for (what, stream) in [("connection", 0u32), ("stream", 1)] {
        let drained = broker
            .under(&format!("zero WINDOW_UPDATE on the {what}"), async {
                let mut frames = Vec::new();
                if stream != 0 {
                    frames.extend(rawh2::headers(stream, &broker.get_key_block(), false, true));
                }
                frames.extend(rawh2::window_update(stream, 0));
                send_and_drain(&broker, frames).await
            })
            .await;
        println!("zero WINDOW_UPDATE on the {what}: {}", drained.summary());
        // RFC 9113 §6.9: a connection error on the connection; on a stream a stream error, which
        // h2 (as any endpoint may) treats as a connection error.
        assert_eq!(drained.goaway_code(), Some(code::PROTOCOL_ERROR), "{what}: {}", drained.summary());
    }
}

#[tokio::test]
async fn a_stream_window_update_past_2_31_minus_1_resets_that_stream_alone() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start().await;
    let drained = broker
        .under("stream WINDOW_UPDATE overflow", async {
            let (mut write, _stop, drain) = abusive_connection(broker.addr, &[]).await;
            let mut frames = rawh2::headers(1, &broker.get_key_block(), false, true);
            frames.extend(rawh2::window_update(1, rawh2::MAX_WINDOW));
            // A complete GetKey on stream 3 after it: served, the connection lives on.
            frames.extend(rawh2::headers(3, &broker.get_key_block(), false, true));
            frames.extend(rawh2::data(3, true, &Broker::get_key_body()));
            frames.extend(rawh2::ping(*b"still-up"));
            write.write_all(&frames).await.unwrap();
            // Give the server the time to answer everything, then close our side.
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(write);
            tokio::time::timeout(ABUSE_DEADLINE, drain).await.expect("the server closed").unwrap()
        })
        .await;
    println!("stream window overflow: {}", drained.summary());
    assert_eq!(drained.resets_with(code::FLOW_CONTROL_ERROR), 1, "{}", drained.summary());
    assert_eq!(drained.ping_acks, 1, "the connection is still served: {}", drained.summary());
    assert!(drained.by_kind[usize::from(kind::DATA)] >= 1, "stream 3 was answered: {}", drained.summary());
    assert!(
        drained.goaway_code().is_none_or(|c| c == code::NO_ERROR),
        "no connection error: {}",
        drained.summary()
    );
}

/// "MadeYouReset" (CVE-2025-8671): the client makes the *server* reset stream after stream (here
/// with a stream WINDOW_UPDATE that overflows), so every stream's work is started and abandoned
/// without the client ever sending RST_STREAM. h2 bounds the resets it sends itself
/// (`max_local_error_reset_streams`) — but tonic's builder hands hyper `None` for it, which turns
/// the bound off, unless the broker sets it (`server::MAX_LOCAL_ERROR_RESET_STREAMS`).
#[tokio::test]
async fn made_you_reset_streams_reset_by_the_server_are_bounded_per_connection() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start().await;
    let (sent, drained) = stream_flood(&broker, "MadeYouReset (stream WINDOW_UPDATE overflow)", |id| {
        rawh2::window_update(id, rawh2::MAX_WINDOW)
    })
    .await;
    println!("MadeYouReset: {sent} of {FLOOD_STREAMS} streams opened; {}", drained.summary());
    assert_eq!(drained.goaway_code(), Some(code::ENHANCE_YOUR_CALM), "{}", drained.summary());
    assert!(sent < FLOOD_STREAMS, "the server ended the connection before the flood ended");
}

/// A client that advertises a zero stream window and never reads: every answer must wait in the
/// server. The streams it may open are bounded (`server::MAX_CONCURRENT_STREAMS`), so what waits is
/// bounded.
#[tokio::test]
async fn a_zero_window_client_that_never_reads_gets_bounded_buffering() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start().await;
    const STREAMS: usize = 20_000;
    const PER_BATCH: usize = 50;
    let (sent, limit, drained) = broker
        .under("zero window, never read", async {
            let (mut reader, mut write, seen) =
                rawh2::handshake(broker.addr, &[(setting::INITIAL_WINDOW_SIZE, 0)]).await.expect("handshake");
            let limit = seen.iter().find_map(|f| rawh2::setting_value(f, setting::MAX_CONCURRENT_STREAMS));
            println!("zero window: the server's SETTINGS_MAX_CONCURRENT_STREAMS is {limit:?}");
            let block = broker.get_key_block();
            let body = Broker::get_key_body();
            let stop = AtomicBool::new(false);
            // Writes block once the server stops reading; the deadline ends the flood then.
            let flood = send_until_stopped(&mut write, &stop, STREAMS / PER_BATCH, |b| {
                let mut buf = Vec::new();
                for i in b * PER_BATCH..(b + 1) * PER_BATCH {
                    let id = stream_id(i);
                    buf.extend(rawh2::headers(id, &block, false, true));
                    buf.extend(rawh2::data(id, true, &body));
                }
                buf
            });
            let sent = match tokio::time::timeout(Duration::from_secs(10), flood).await {
                Ok((batches, _)) => batches * PER_BATCH,
                Err(_) => 0,
            };
            // Let the handlers run and their answers queue, still reading nothing.
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(write);
            let drained =
                tokio::time::timeout(ABUSE_DEADLINE, reader.drain()).await.expect("the server closed");
            (sent, limit, drained)
        })
        .await;
    println!(
        "zero window: server limit {limit:?}; {sent} of {STREAMS} requests written before the server stopped reading; {}",
        drained.summary()
    );
    // A zero window is respected (no DATA), answers wait for it in the server, and at most the
    // concurrency limit's worth of streams get that far (their response HEADERS); the streams
    // over it are refused.
    let limit = limit.expect("the server advertises SETTINGS_MAX_CONCURRENT_STREAMS");
    assert_eq!(drained.by_kind[usize::from(kind::DATA)], 0, "{}", drained.summary());
    assert!(drained.by_kind[usize::from(kind::HEADERS)] <= u64::from(limit), "{}", drained.summary());
    assert!(drained.resets_with(code::REFUSED_STREAM) >= 1, "{}", drained.summary());
}

/// Streams opened beyond SETTINGS_MAX_CONCURRENT_STREAMS, each left waiting for its body: the
/// server refuses the excess (RST_STREAM REFUSED_STREAM) and, past its bound on resets it sends,
/// ends the connection with GOAWAY ENHANCE_YOUR_CALM.
#[tokio::test]
async fn streams_beyond_max_concurrent_streams_are_refused() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start().await;
    const STREAMS: usize = 50_000;
    const PER_BATCH: usize = 50;
    let (sent, limit, drained) = broker
        .under("stream flood beyond max_concurrent_streams", async {
            let (mut reader, mut write, seen) = rawh2::handshake(broker.addr, &[]).await.expect("handshake");
            let limit = seen.iter().find_map(|f| rawh2::setting_value(f, setting::MAX_CONCURRENT_STREAMS));
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let drain = tokio::spawn(async move {
                let mut drained = rawh2::Drained::default();
                while let Ok(Some(frame)) = reader.next().await {
                    drained.count(&frame);
                    if frame.kind == kind::GOAWAY {
                        flag.store(true, Ordering::Release);
                    }
                }
                flag.store(true, Ordering::Release);
                drained
            });
            let block = broker.get_key_block();
            let (batches, _) = send_until_stopped(&mut write, &stop, STREAMS / PER_BATCH, |b| {
                let mut buf = Vec::new();
                for i in b * PER_BATCH..(b + 1) * PER_BATCH {
                    buf.extend(rawh2::headers(stream_id(i), &block, false, true));
                }
                buf
            })
            .await;
            // Leave the admitted streams open a moment (their handlers wait for bodies), then go.
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(write);
            (batches * PER_BATCH, limit, drain.await.unwrap())
        })
        .await;
    println!(
        "stream flood: server limit {limit:?}; {sent} of {STREAMS} streams opened; {}",
        drained.summary()
    );
    assert!(limit.is_some(), "the server advertises SETTINGS_MAX_CONCURRENT_STREAMS");
    assert!(drained.resets_with(code::REFUSED_STREAM) >= 1, "{}", drained.summary());
    assert_eq!(drained.goaway_code(), Some(code::ENHANCE_YOUR_CALM), "{}", drained.summary());
}
