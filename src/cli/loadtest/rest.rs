//! `loadtest --protocol rest`: the same requests over Key Vault's own REST API — HTTPS with a
//! hyper client on tokio-rustls (aws-lc-rs), HTTP/1.1 keep-alive connections (one per request
//! in flight, as the Azure SDKs' pools hold them) or HTTP/2 (`--connections` multiplexed
//! connections), the bearer token in `Authorization`, every answer's JSON checked.
//!
//! A key `https://<vault>.<suffix>/keys/<name>/<version>` is called at
//! `https://<vault>.vault.localhost:<port>/keys/<name>/<version>/unwrapkey?api-version=…`: the
//! TCP connection goes to the address of `--rest-server`, the Host header and the TLS server
//! name say the vault.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;

use super::workload::Workload;
use super::{ALGORITHM, Op, WRAPPED_BYTES};
use crate::cli::session::CONNECT_TIMEOUT;

/// The Key Vault API version the requests name (the newest the Azure SDKs of 2026 send).
pub(super) const API_VERSION: &str = "7.6";

/// The HTTP version of the REST connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HttpVersion {
    /// HTTP/1.1, one keep-alive connection per request in flight (what the Azure SDKs use).
    #[value(name = "1")]
    H1,
    /// HTTP/2, `--connections` connections with the requests multiplexed over them.
    #[value(name = "2")]
    H2,
}

impl HttpVersion {
    /// `rest-h1` or `rest-h2`, the protocol the report names.
    pub(super) fn protocol(self) -> &'static str {
        match self {
            HttpVersion::H1 => "rest-h1",
            HttpVersion::H2 => "rest-h2",
        }
    }
}

/// Why the REST load could not be set up; `Display` follows "REST: ".
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// `--rest-server` is not `https://host:port`.
    #[error("--rest-server {0:?} is not https://HOST:PORT")]
    BadServer(String),
    /// The REST server's host name does not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// `host:port`.
        host: String,
        /// Why.
        source: std::io::Error,
    },
    /// Reading the CA certificate failed.
    #[error("{}: {source}", .path.display())]
    Ca {
        /// The CA file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA file holds no certificate rustls accepts as a trust anchor.
    #[error("{}: no CA certificate in it ({reason})", .path.display())]
    BadCa {
        /// The CA file (or `the baseline's CA`).
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    /// A vault's host name is not a TLS server name.
    #[error("{0:?} is not a TLS server name")]
    ServerName(String),
    /// A key id does not have the shape `https://<vault>.<suffix>/keys/<name>/<version>`.
    #[error("key id {0:?} does not name a vault, key and version")]
    Kid(String),
    /// TCP to the REST server failed or took longer than the connect timeout.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The TLS or HTTP handshake failed.
    #[error("handshake with {addr}: {reason}")]
    Handshake {
        /// Where.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// `--op engine-unwrap` has no REST twin (the engine's service is gRPC only).
    #[error("--op engine-unwrap is a gRPC-only operation; over REST use unwrap, wrap or get")]
    EngineOverRest,
}

/// How one request of a key is addressed over REST.
struct Route {
    /// `<vault>.vault.localhost:<port>`: the Host header (and h2 `:authority`).
    host: HeaderValue,
    /// `https://<host>/keys/<name>/<version>` (h2 wants the absolute form).
    absolute: String,
    /// `/keys/<name>/<version>`: the kid of an answer must end with it.
    key_path: String,
}

/// Where and how the REST connections go, shared by every connection.
pub(super) struct Connector {
    /// The REST server's socket address.
    addr: SocketAddr,
    /// TLS with the trusted CA and the ALPN of `version`.
    tls: tokio_rustls::TlsConnector,
    /// HTTP/1.1 or h2.
    version: HttpVersion,
    /// The server name of the handshake: the first target's vault host.
    server_name: ServerName<'static>,
    /// Per target (key), in the workload's order.
    routes: Vec<Route>,
    /// `Bearer …` of every request, if any.
    bearer: Option<HeaderValue>,
    /// What the report names as the server: `https://<host>:<port>`.
    pub(super) url: String,
}

/// One connection's request sender.
enum Sender {
    /// HTTP/1.1: one request at a time on this connection.
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    /// h2: multiplexed; clones share the connection.
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// A REST connection the load drives, re-opened when the server closed it.
pub(super) struct Conn {
    /// The shared set-up.
    connector: Arc<Connector>,
    /// The open connection.
    sender: Sender,
}

/// Why a REST request failed: a code for the report (`HTTP_403`, `TRANSPORT`, `MISMATCH`) and a
/// message.
pub(super) struct RestFailure {
    /// `HTTP_<status>`, `TRANSPORT` or `MISMATCH`.
    pub(super) code: String,
    /// The error envelope's message, the transport error, or what did not match.
    pub(super) message: String,
}

impl RestFailure {
    fn transport(e: impl std::fmt::Display) -> Self {
        RestFailure { code: "TRANSPORT".to_string(), message: e.to_string() }
    }

    fn mismatch(message: String) -> Self {
        RestFailure { code: "MISMATCH".to_string(), message }
    }
}

/// The trust anchors of a PEM file.
pub(super) fn roots_from_pem(path: PathBuf, pem: &[u8]) -> Result<rustls::RootCertStore, RestError> {
    use rustls::pki_types::pem::PemObject as _;
    let bad = |reason: String| RestError::BadCa { path: path.clone(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate".to_string()));
    }
    Ok(roots)
}

/// The CA a REST run trusts: `--ca-cert`, else the data directory's dev CA.
pub(super) fn roots_from_file(path: PathBuf) -> Result<rustls::RootCertStore, RestError> {
    let pem = std::fs::read(&path).map_err(|source| RestError::Ca { path: path.clone(), source })?;
    roots_from_pem(path, &pem)
}

/// `vault`, `name`, `version` of `https://<vault>.<suffix>/keys/<name>/<version>`.
fn kid_parts(kid: &str) -> Option<(&str, &str, &str)> {
    let rest = kid.strip_prefix("https://")?;
    let (host, path) = rest.split_once('/')?;
    let vault = host.split('.').next().filter(|v| !v.is_empty())?;
    let mut segments = path.split('/');
    match (segments.next(), segments.next(), segments.next(), segments.next()) {
        (Some("keys"), Some(name), Some(version), None) if !name.is_empty() && !version.is_empty() => {
            Some((vault, name, version))
        }
        _ => None,
    }
}

impl Connector {
    /// Resolves `server` (`https://host:port`) and prepares TLS trusting `roots` and a route per
    /// target of `workload`.
    pub(super) async fn new(
        server: &str,
        roots: rustls::RootCertStore,
        version: HttpVersion,
        workload: &Workload,
        bearer: Option<HeaderValue>,
    ) -> Result<Self, RestError> {
        let authority = server
            .trim()
            .strip_prefix("https://")
            .map(|a| a.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| RestError::BadServer(server.to_string()))?;
        let port = authority
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .ok_or_else(|| RestError::BadServer(server.to_string()))?;
        let addr = tokio::net::lookup_host(authority)
            .await
            .map_err(|source| RestError::Resolve { host: authority.to_string(), source })?
            .next()
            .ok_or_else(|| RestError::BadServer(server.to_string()))?;
        crate::tls::install_crypto_provider();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(RestError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = match version {
            HttpVersion::H1 => vec![b"http/1.1".to_vec()],
            HttpVersion::H2 => vec![b"h2".to_vec()],
        };
        let mut routes = Vec::with_capacity(workload.targets.len());
        for t in &workload.targets {
            let (vault, name, key_version) =
                kid_parts(&t.kid).ok_or_else(|| RestError::Kid(t.kid.clone()))?;
            let host = format!("{vault}.vault.localhost:{port}");
            let key_path = format!("/keys/{name}/{key_version}");
            routes.push(Route {
                host: HeaderValue::from_str(&host).map_err(|_| RestError::ServerName(host.clone()))?,
                absolute: format!("https://{host}{key_path}"),
                key_path,
            });
        }
        let first = routes.first().and_then(|r| r.host.to_str().ok()).unwrap_or("localhost");
        let sni = first.rsplit_once(':').map_or(first, |(h, _)| h).to_string();
        let server_name = ServerName::try_from(sni.clone()).map_err(|_| RestError::ServerName(sni))?;
        Ok(Connector {
            addr,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            version,
            server_name,
            routes,
            bearer,
            url: format!("https://{authority}"),
        })
    }

    /// A new connection: TCP (no Nagle), TLS, the HTTP handshake; its driver runs on a task.
    async fn open(&self) -> Result<Sender, RestError> {
        let addr = self.addr;
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| RestError::Connect { addr, reason: e.to_string() })?;
            tcp.set_nodelay(true).map_err(|e| RestError::Connect { addr, reason: e.to_string() })?;
            let handshake = |e: &dyn std::fmt::Display| RestError::Handshake { addr, reason: e.to_string() };
            let tls = self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| handshake(&e))?;
            let io = TokioIo::new(tls);
            Ok(match self.version {
                HttpVersion::H1 => {
                    let (sender, conn) =
                        hyper::client::conn::http1::handshake(io).await.map_err(|e| handshake(&e))?;
                    tokio::spawn(conn);
                    Sender::H1(sender)
                }
                HttpVersion::H2 => {
                    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| handshake(&e))?;
                    tokio::spawn(conn);
                    Sender::H2(sender)
                }
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| RestError::Connect { addr, reason: "timed out".to_string() })?
    }
}

/// The connections each of `concurrency` workers sends on: HTTP/1.1, one of its own each (a
/// keep-alive pool of `concurrency`); h2, all of the `connections` shared.
pub(super) async fn connect_lanes(
    connector: Connector,
    concurrency: usize,
    connections: usize,
) -> Result<Vec<Vec<Conn>>, RestError> {
    let connector = Arc::new(connector);
    let open = |n: usize| {
        let connector = connector.clone();
        async move {
            let mut conns = Vec::with_capacity(n);
            for _ in 0..n {
                conns.push(Conn { connector: connector.clone(), sender: connector.open().await? });
            }
            Ok::<_, RestError>(conns)
        }
    };
    Ok(match connector.version {
        HttpVersion::H1 => open(concurrency).await?.into_iter().map(|c| vec![c]).collect(),
        HttpVersion::H2 => {
            let shared = open(connections).await?;
            (0..concurrency).map(|_| shared.iter().filter_map(Conn::share).collect()).collect()
        }
    })
}

/// The connections a REST run holds: HTTP/1.1 one per request in flight, h2 `connections`.
pub(super) fn connection_count(version: HttpVersion, concurrency: usize, connections: usize) -> usize {
    match version {
        HttpVersion::H1 => concurrency,
        HttpVersion::H2 => connections,
    }
}

/// `{"alg","value"}`: the body of wrapkey and unwrapkey.
#[derive(serde::Serialize)]
struct KeyOperationParameters<'a> {
    alg: &'a str,
    value: String,
}

/// `{"kid","value"}`: the answer of wrapkey and unwrapkey.
#[derive(Deserialize)]
struct KeyOperationResult {
    #[serde(default)]
    kid: String,
    #[serde(default)]
    value: String,
}

/// `{"key":{"kid","n",…}}`: the answer of a key get.
#[derive(Deserialize)]
struct KeyBundle {
    #[serde(default)]
    key: JsonWebKey,
}

/// The part of a JSON web key the check reads.
#[derive(Deserialize, Default)]
struct JsonWebKey {
    #[serde(default)]
    kid: String,
    #[serde(default)]
    n: String,
}

/// `{"error":{"code","message"}}`: Key Vault's error envelope.
#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

/// The inside of [`ErrorEnvelope`].
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// `kid` names the key at `route` (the REST surface answers with the URL that was called).
fn names_key(kid: &str, route: &Route) -> bool {
    let (kid, path) = (kid.as_bytes(), route.key_path.as_bytes());
    kid.len() >= path.len() && kid[kid.len() - path.len()..].eq_ignore_ascii_case(path)
}

impl Conn {
    /// Another handle on the same h2 connection (`None` for HTTP/1.1: one request at a time).
    fn share(&self) -> Option<Conn> {
        match &self.sender {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Conn { connector: self.connector.clone(), sender: Sender::H2(s.clone()) }),
        }
    }

    /// Sends `request`, re-opening an HTTP/1.1 connection the server closed; the status and body.
    async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), RestFailure> {
        if let Sender::H1(s) = &self.sender
            && s.is_closed()
        {
            self.sender = self.connector.open().await.map_err(RestFailure::transport)?;
        }
        let response = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await.map_err(RestFailure::transport)?;
                s.send_request(request).await
            }
            Sender::H2(s) => {
                s.ready().await.map_err(RestFailure::transport)?;
                s.send_request(request).await
            }
        }
        .map_err(RestFailure::transport)?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(RestFailure::transport)?.to_bytes();
        Ok((status, body))
    }

    /// A request of `route` to `suffix` (`/unwrapkey`, or nothing for a get), with `body`.
    fn request(
        &self,
        route: &Route,
        method: Method,
        suffix: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Request<Full<Bytes>>, RestFailure> {
        let path_and_query = format!("{suffix}?api-version={API_VERSION}");
        let h2 = matches!(self.sender, Sender::H2(_));
        let uri = if h2 {
            format!("{}{path_and_query}", route.absolute)
        } else {
            format!("{}{path_and_query}", route.key_path)
        };
        let mut builder = Request::builder().method(method).uri(uri);
        if !h2 {
            builder = builder.header(HOST, route.host.clone());
        }
        if let Some(bearer) = &self.connector.bearer {
            builder = builder.header(AUTHORIZATION, bearer.clone());
        }
        let body = match body {
            Some(b) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        builder.body(body).map_err(|e| RestFailure {
            code: "REQUEST".to_string(),
            message: format!("building the request: {e}"),
        })
    }

    /// Sends request `seq` of `op` and checks its answer.
    pub(super) async fn call(&mut self, w: &Workload, op: Op, seq: u64) -> Result<(), RestFailure> {
        let (k, i) = w.pick_index(seq);
        let t = &w.targets[k];
        let connector = self.connector.clone();
        let route = &connector.routes[k];
        let operation = |value: &[u8]| {
            serde_json::to_vec(&KeyOperationParameters {
                alg: ALGORITHM,
                value: URL_SAFE_NO_PAD.encode(value),
            })
            .map_err(|e| RestFailure::mismatch(format!("encoding the request: {e}")))
        };
        let (request, name) = match op {
            Op::Unwrap | Op::EngineUnwrap => (
                self.request(route, Method::POST, "/unwrapkey", Some(operation(t.wrapped(i))?))?,
                "unwrapkey",
            ),
            Op::Wrap => {
                (self.request(route, Method::POST, "/wrapkey", Some(operation(t.dek(i))?))?, "wrapkey")
            }
            Op::Get => (self.request(route, Method::GET, "", None)?, "get"),
        };
        let (status, body) = self.send(request).await?;
        if !status.is_success() {
            let message = match serde_json::from_slice::<ErrorEnvelope>(&body) {
                Ok(e) => format!("{}: {}", e.error.code, e.error.message),
                Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            };
            return Err(RestFailure { code: format!("HTTP_{}", status.as_u16()), message });
        }
        let bad_json = |e: serde_json::Error| RestFailure::mismatch(format!("{name} of {}: {e}", t.kid));
        let check = |ok: bool, what: &dyn Fn() -> String| {
            if ok { Ok(()) } else { Err(RestFailure::mismatch(what())) }
        };
        match op {
            Op::Get => {
                let b: KeyBundle = serde_json::from_slice(&body).map_err(bad_json)?;
                check(names_key(&b.key.kid, route), &|| {
                    format!("get of {} answered kid {}", t.kid, b.key.kid)
                })?;
                check(!b.key.n.is_empty(), &|| format!("get of {} answered no modulus", t.kid))
            }
            Op::Unwrap | Op::EngineUnwrap | Op::Wrap => {
                let r: KeyOperationResult = serde_json::from_slice(&body).map_err(bad_json)?;
                check(names_key(&r.kid, route), &|| format!("{name} with {} answered kid {}", t.kid, r.kid))?;
                let value = URL_SAFE_NO_PAD
                    .decode(r.value.trim_end_matches('='))
                    .map_err(|e| RestFailure::mismatch(format!("{name} with {}: value: {e}", t.kid)))?;
                if op == Op::Wrap {
                    check(value.len() == WRAPPED_BYTES, &|| {
                        format!("wrapkey with {} returned {} bytes, not {WRAPPED_BYTES}", t.kid, value.len())
                    })
                } else {
                    check(value == t.dek(i), &|| {
                        format!("unwrapkey with {} returned another plaintext", t.kid)
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kid_splits_into_vault_key_and_version() {
        assert_eq!(
            kid_parts("https://lt-1.vault.azure.net/keys/k0/0123abcd"),
            Some(("lt-1", "k0", "0123abcd"))
        );
        assert_eq!(kid_parts("https://lt.vault.localhost:8443/keys/k/v"), Some(("lt", "k", "v")));
        for bad in
            ["http://v.x/keys/k/v", "https://v.x/keys/k", "https://v.x/secrets/k/v", "https://v.x/keys/k/v/w"]
        {
            assert_eq!(kid_parts(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_answer_names_the_key_when_its_kid_ends_with_the_called_path() {
        let route = Route {
            host: HeaderValue::from_static("v.vault.localhost:8443"),
            absolute: "https://v.vault.localhost:8443/keys/k0/abc".to_string(),
            key_path: "/keys/k0/abc".to_string(),
        };
        assert!(names_key("https://v.vault.localhost:8443/keys/k0/abc", &route));
        assert!(names_key("https://V.vault.localhost/KEYS/k0/ABC", &route));
        assert!(!names_key("https://v.vault.localhost:8443/keys/k0/abd", &route));
        assert!(!names_key("", &route));
    }
}
