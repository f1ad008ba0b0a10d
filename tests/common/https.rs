//! A broker with its REST (HTTPS) listener on an ephemeral loopback port, and a Rust HTTPS client
//! for it: hyper over tokio-rustls, trusting only `<data-dir>/tls/ca.pem`, speaking HTTP/1.1 or
//! h2 (chosen by ALPN), optionally from a chosen loopback source address.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tde_broker::config::{ClockKind, Config};
use tde_broker::server::App;
use tokio_rustls::rustls;

use super::TestBroker;

/// The api-version the current SDKs send.
pub const API: &str = "7.6";

/// A broker serving gRPC (plaintext) and REST (HTTPS) in this process.
pub struct RestBroker {
    pub b: TestBroker,
    /// The REST listener's address.
    pub rest: SocketAddr,
    /// The dev CA (PEM) that signs the REST certificate.
    pub ca: Vec<u8>,
}

impl std::ops::Deref for RestBroker {
    type Target = TestBroker;
    fn deref(&self) -> &TestBroker {
        &self.b
    }
}

/// A broker on a manual clock with REST on `127.0.0.1:0`, its configuration changed by `modify`.
pub async fn start_rest(modify: impl FnOnce(&mut Config)) -> RestBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::for_data_dir(dir.path());
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(1_800_000_000);
    cfg.rest_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.rest_listen_explicit = true;
    modify(&mut cfg);
    let data_dir = cfg.data_dir.clone();
    let app = App::open(cfg).await.expect("broker starts");
    let rest = app.rest_addr().expect("the REST listener runs");
    let ca = std::fs::read(app.ca_path()).expect("the dev CA exists once the broker is open");
    let b = super::serve_opened(app, data_dir, None, Some(dir)).await;
    RestBroker { b, rest, ca }
}

/// Which HTTP version to offer in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    H2,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One HTTPS connection to the REST listener, for one Host (`<vault>.vault.localhost:<port>`).
pub struct Client {
    sender: Sender,
    /// The Host (and TLS server name, with the port) requests carry.
    pub host: String,
    /// The bearer token sent, if any.
    pub token: Option<String>,
}

/// What came back.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`null` when empty).
    pub fn json(&self) -> serde_json::Value {
        if self.body.is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("JSON body ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The error envelope's code and inner code.
    pub fn error_codes(&self) -> (String, Option<String>) {
        let j = self.json();
        let code = j["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {j}")).to_string();
        (code, j["error"]["innererror"]["code"].as_str().map(str::to_string))
    }

    pub fn error_message(&self) -> String {
        self.json()["error"]["message"].as_str().unwrap_or_default().to_string()
    }
}

impl RestBroker {
    /// A client for `vault` (Host `<vault>.vault.localhost:<port>`) with `token`.
    pub async fn client(&self, vault: &str, token: Option<&str>, proto: Proto) -> Client {
        let host = format!("{vault}.vault.localhost:{}", self.rest.port());
        connect(self.rest, &self.ca, &host, token, proto, None).await
    }

    /// The admin's client for `vault` over HTTP/1.1.
    pub async fn admin_client(&self, vault: &str) -> Client {
        self.client(vault, Some(&self.b.token.clone()), Proto::Http1).await
    }

    /// The vault's base URL as the SDKs use it.
    pub fn vault_url(&self, vault: &str) -> String {
        format!("https://{vault}.vault.localhost:{}", self.rest.port())
    }
}

/// The TLS config of the test clients: trusts `ca_pem` only, offers `alpn`.
fn client_tls(ca_pem: &[u8], alpn: &[u8]) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls
}

/// Sends a raw HTTP/1.1 request head (nothing after it) over TLS and returns the response's head,
/// read within ten seconds: shows what the listener answers before a body arrives.
pub async fn raw_head(addr: SocketAddr, ca_pem: &[u8], host: &str, head: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h).to_string();
    let server_name = rustls::pki_types::ServerName::try_from(name).expect("server name");
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(client_tls(ca_pem, b"http/1.1")))
        .connect(server_name, tcp)
        .await
        .expect("TLS handshake");
    stream.write_all(head.as_bytes()).await.expect("write head");
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read).await.expect("an answer without the body");
    String::from_utf8_lossy(&got).into_owned()
}

/// Connects to `addr` over TLS trusting `ca_pem` only, for the server name `host` (its port is
/// dropped for TLS), from `source` when given.
pub async fn connect(
    addr: SocketAddr,
    ca_pem: &[u8],
    host: &str,
    token: Option<&str>,
    proto: Proto,
    source: Option<&str>,
) -> Client {
    let alpn: &[u8] = match proto {
        Proto::Http1 => b"http/1.1",
        Proto::H2 => b"h2",
    };
    let tls = client_tls(ca_pem, alpn);
    let tcp = match source {
        None => tokio::net::TcpStream::connect(addr).await.expect("connect to the REST listener"),
        Some(src) => {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind(SocketAddr::new(src.parse().expect("source address"), 0)).expect("bind source");
            socket.connect(addr).await.expect("connect from the source address")
        }
    };
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h).to_string();
    let server_name = rustls::pki_types::ServerName::try_from(name).expect("server name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .expect("TLS handshake with the REST listener (certificate trusted through the dev CA)");
    let negotiated = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let io = TokioIo::new(stream);
    let sender = match proto {
        Proto::Http1 => {
            assert_eq!(negotiated.as_deref(), Some(&b"http/1.1"[..]), "ALPN http/1.1");
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await.expect("HTTP/1.1 handshake");
            tokio::spawn(conn);
            Sender::H1(sender)
        }
        Proto::H2 => {
            assert_eq!(negotiated.as_deref(), Some(&b"h2"[..]), "ALPN h2");
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2 handshake");
            tokio::spawn(conn);
            Sender::H2(sender)
        }
    };
    Client { sender, host: host.to_string(), token: token.map(str::to_string) }
}

impl Client {
    /// Sends `method path_and_query` with an optional JSON body.
    pub async fn send(
        &mut self,
        method: &str,
        path_and_query: &str,
        body: Option<serde_json::Value>,
    ) -> Answer {
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let mut req = http::Request::builder().method(method);
        req = match &self.sender {
            Sender::H1(_) => req.uri(path_and_query).header(http::header::HOST, &self.host),
            Sender::H2(_) => req.uri(format!("https://{}{path_and_query}", self.host)),
        };
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if !bytes.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(bytes)).expect("request");
        let response = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await.expect("connection ready");
                s.send_request(req).await.expect("response")
            }
            Sender::H2(s) => {
                s.ready().await.expect("connection ready");
                s.send_request(req).await.expect("response")
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Answer { status: parts.status.as_u16(), headers: parts.headers, body }
    }

    /// A bodiless request whose failure (no response: the connection closed) is returned.
    pub async fn try_send(&mut self, method: &str, path: &str) -> Result<u16, String> {
        let mut req = http::Request::builder().method(method);
        req = match &self.sender {
            Sender::H1(_) => req.uri(path).header(http::header::HOST, &self.host),
            Sender::H2(_) => req.uri(format!("https://{}{path}", self.host)),
        };
        let req = req.body(Full::new(Bytes::new())).expect("request");
        let response = match &mut self.sender {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        };
        response.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
    }

    /// `send` with `api-version` appended.
    pub async fn call(&mut self, method: &str, path: &str, body: Option<serde_json::Value>) -> Answer {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.send(method, &format!("{path}{sep}api-version={API}"), body).await
    }
}
