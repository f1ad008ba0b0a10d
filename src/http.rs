//! The admin HTTP listener (`--http-listen`, default `127.0.0.1:9090`): plaintext HTTP/1.1 on
//! tonic's own hyper, GET (or HEAD) only.
//!
//! - `/metrics`: the Prometheus text exposition of [`crate::telemetry::metrics`], with the
//!   `tdebroker_databases` gauge computed from the broker's state at scrape time.
//! - `/healthz`: 200 while the process answers.
//! - `/readyz`: 200 once the store is open, the state loaded and gRPC serving; 503 before that
//!   and from the start of shutdown (the gRPC health service turns NOT_SERVING at the same time).
//!   On a store shared by several brokers also 503 while the broker is stale (it has not caught
//!   up with the change feed within its staleness bound, so its data plane fails closed); the
//!   body then says so, with the lag and the bound.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::broker::Broker;

/// Where the broker is in its life, as `/readyz` reports it.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

impl Readiness {
    /// Serving: the store is open and the state loaded.
    pub fn set_ready(&self) {
        // Once draining, the broker never becomes ready again.
        let _ = self.0.compare_exchange(STARTING, READY, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Shutting down: in-flight calls drain, new ones should go elsewhere.
    pub fn set_draining(&self) {
        self.0.store(DRAINING, Ordering::SeqCst);
    }

    /// Whether the broker takes requests.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst) == READY
    }

    fn label(&self) -> &'static str {
        match self.0.load(Ordering::SeqCst) {
            STARTING => "starting",
            READY => "ready",
            _ => "shutting down",
        }
    }
}

/// What the admin endpoints read.
#[derive(Default)]
pub struct AdminState {
    /// Readiness of the broker.
    pub readiness: Readiness,
    /// The broker, once opened (for the database gauge).
    pub broker: OnceLock<Arc<Broker>>,
    /// The gRPC listener's counters, once it serves (for the connection series).
    pub listener: OnceLock<Arc<crate::listener::ListenerStats>>,
}

/// The running admin listener; dropping it stops it (and its open connections).
pub struct AdminServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves the admin endpoints on the current Tokio runtime. When `explicit` is
/// false (the default address) and the address is taken, the listener stays off with a warning,
/// so a second broker on the same machine still starts.
pub fn start(
    addr: SocketAddr,
    explicit: bool,
    state: Arc<AdminState>,
) -> std::io::Result<Option<AdminServer>> {
    let std_listener = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(%addr, "the default admin HTTP address is taken: /metrics, /healthz and /readyz are off (set --http-listen)");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(accept_loop(listener, state));
    tracing::info!(%addr, "admin HTTP listener: /metrics /healthz /readyz");
    Ok(Some(AdminServer { addr, task }))
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<AdminState>) {
    // Connections end with the listener (aborting this task drops the set).
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let state = state.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &state)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<String> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";
/// The Prometheus text exposition format's content type.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn respond(req: &Request<Incoming>, state: &AdminState) -> Response<String> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "method not allowed\n".into());
        r.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    // hyper leaves the body out of a HEAD response itself.
    match req.uri().path() {
        "/metrics" => {
            let databases = state.broker.get().map(|b| b.database_counts());
            let connections = state.listener.get().map(|l| crate::telemetry::ConnectionFigures {
                open: l.open() as u64,
                accepted: l.accepted(),
                over_limit: l.over_limit(),
                handshake_timeouts: l.handshake_timeouts(),
                accept_errors: l.accept_errors(),
            });
            let databases = databases.as_ref().map_or(&[][..], |d| &d[..]);
            let body = crate::telemetry::metrics().render(databases, connections.as_ref());
            text(StatusCode::OK, METRICS_CONTENT_TYPE, body)
        }
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => {
            let feed = state.broker.get().and_then(|b| b.feed_status());
            match feed {
                Some(f) if state.readiness.is_ready() && f.stale() => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    format!(
                        "stale: no complete read of the shared store's change feed for {} ms (bound {} ms); data-plane requests are refused until the broker catches up\n",
                        f.lag_ms, f.bound_ms
                    ),
                ),
                _ => {
                    let status = if state.readiness.is_ready() {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    let mut body = format!("{}\n", state.readiness.label());
                    if let Some(f) = feed {
                        body.push_str(&format!(
                            "feed: position {}, last complete read {} ms ago (bound {} ms)\n",
                            f.applied, f.lag_ms, f.bound_ms
                        ));
                    }
                    text(status, PLAIN, body)
                }
            }
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found: try /metrics, /healthz or /readyz\n".into()),
    }
}

/// The admin side of a broker: the listener (when on) and the readiness it reports.
pub struct Admin {
    /// Readiness and the broker the endpoints read.
    pub state: Arc<AdminState>,
    server: Option<AdminServer>,
}

impl Admin {
    /// Starts the listener `config` asks for (`http_listen`), on the current Tokio runtime.
    pub fn start(config: &crate::config::Config) -> std::io::Result<Admin> {
        let state = Arc::new(AdminState::default());
        let server = match config.http_listen {
            Some(addr) => start(addr, config.http_listen_explicit, state.clone())?,
            None => None,
        };
        Ok(Admin { state, server })
    }

    /// The bound address of the listener, when it runs.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(AdminServer::local_addr)
    }
}
