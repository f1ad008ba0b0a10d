//! The per-RPC observation layer around the tonic server: for every `tdebroker.*` RPC it counts
//! the request by service, method and outcome (the `ErrorInfo` reason, or `OK`), times it,
//! writes the audit record ([`crate::audit`]) and, with OpenTelemetry on, a server span whose
//! parent comes from the W3C `traceparent` metadata. It sits with the adapters because it reads
//! and builds gRPC statuses; it learns the time from a clock it is given, not from the broker.

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use opentelemetry::trace::Span as _;
use tonic::body::Body;

use crate::audit::{AuditLog, AuditRecord};
use crate::broker::new_guid;
use crate::telemetry::{Otel, RequestContext, metrics};

/// `ErrorInfo.reason` of a request refused because it cannot be audited.
pub const AUDIT_UNAVAILABLE: &str = "AuditUnavailable";

/// The response header (and request metadata) carrying the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// The broker's clock, read for each audit record's time.
pub type Now = Arc<dyn Fn() -> i64 + Send + Sync>;

/// What every observed RPC shares.
pub struct Observer {
    /// The audit record's time comes from the broker's clock (manual in rehearsals), not the
    /// system's.
    now: Now,
    audit: Arc<AuditLog>,
    otel: Option<Arc<Otel>>,
    /// Largest request header list served (bytes as HTTP/2 counts them).
    max_header_list_size: usize,
}

/// The tower layer around the tonic server (`Server::builder().layer(...)`).
#[derive(Clone)]
pub struct ObserveLayer(Arc<Observer>);

impl ObserveLayer {
    /// Observes RPCs, auditing into `audit` with times from `now`, exporting to `otel` when on;
    /// requests whose header list is over `max_header_list_size` bytes are answered
    /// RESOURCE_EXHAUSTED on their own stream.
    pub fn new(now: Now, audit: Arc<AuditLog>, otel: Option<Arc<Otel>>, max_header_list_size: u32) -> Self {
        let max_header_list_size = usize::try_from(max_header_list_size).unwrap_or(usize::MAX);
        ObserveLayer(Arc::new(Observer { now, audit, otel, max_header_list_size }))
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Observed { inner, observer: self.0.clone() }
    }
}

/// The service [`ObserveLayer`] makes.
#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    observer: Arc<Observer>,
}

/// The service and method of a `tdebroker.*` RPC path (`/tdebroker.v1.KeyVault/WrapKey`).
fn rpc_of(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (service.starts_with("tdebroker.") && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// Service and method of an RPC path [`rpc_of`] accepted, its service ending at `service_end`.
fn split_rpc(path: &str, service_end: usize) -> (&str, &str) {
    (path.get(1..service_end).unwrap_or_default(), path.get(service_end + 1..).unwrap_or_default())
}

/// A caller-supplied request id when it is sane (1..=128 of `[A-Za-z0-9._:-]`), else a new GUID.
fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=128).contains(&v.len())
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        })
        .map_or_else(new_guid, str::to_string)
}

/// The gRPC status code and outcome label of a response: `OK`, the `ErrorInfo` reason, or the
/// code's name when the status carries no reason (e.g. `Unimplemented`). A refusal of tonic's
/// codec (a request it could not decode) is first rewritten as the broker answers it
/// ([`super::status::codec_refusal`]). An answer that is not trailers-only (every success)
/// carries no `grpc-status` header: one lookup, as before.
fn settle(response: &mut http::Response<Body>) -> (tonic::Code, Cow<'static, str>) {
    const GRPC_STATUS_DETAILS: &str = "grpc-status-details-bin";
    let Some(mut status) = tonic::Status::from_header_map(response.headers()) else {
        return (tonic::Code::Ok, Cow::Borrowed("OK"));
    };
    if status.code() == tonic::Code::Ok {
        return (tonic::Code::Ok, Cow::Borrowed("OK"));
    }
    // The broker's statuses all carry an ErrorInfo; tonic's codec attaches none.
    if !response.headers().contains_key(GRPC_STATUS_DETAILS)
        && let Some((code, reason)) = super::status::codec_refusal(status.code(), status.message())
    {
        let edge = super::status::edge_status(code, reason, status.message());
        if edge.add_header(response.headers_mut()).is_ok() {
            response.extensions_mut().insert(edge.clone());
            status = edge;
        }
    }
    let reason = super::status::reason(&status).unwrap_or_else(|| format!("{:?}", status.code()));
    (status.code(), Cow::Owned(reason))
}

/// The size of a request's header list as HTTP/2 counts it (RFC 9113 §6.5.2: each field's name
/// and value plus 32 bytes), pseudo-header fields included. No allocation: a sum over the fields.
fn header_list_size(req: &http::Request<Body>) -> usize {
    const FIELD_OVERHEAD: usize = 32;
    let uri = req.uri();
    let pseudo = ":method".len()
        + req.method().as_str().len()
        + ":path".len()
        + uri.path_and_query().map_or(0, |p| p.as_str().len())
        + ":scheme".len()
        + uri.scheme_str().map_or(0, str::len)
        + ":authority".len()
        + uri.authority().map_or(0, |a| a.as_str().len())
        + 4 * FIELD_OVERHEAD;
    req.headers()
        .iter()
        .fold(pseudo, |sum, (name, value)| sum + name.as_str().len() + value.len() + FIELD_OVERHEAD)
}

/// The status of a request whose header list is over the broker's limit.
fn header_list_too_large(size: usize, limit: usize) -> tonic::Status {
    super::status::edge_status(
        tonic::Code::ResourceExhausted,
        super::status::HEADER_LIST_TOO_LARGE,
        format!("The request's header list takes {size} bytes; the broker serves at most {limit} bytes."),
    )
}

/// The status of a request refused because its audit record cannot be written: before it ran
/// (`ran` false), or after it ran, its result withheld.
pub fn audit_unavailable(ran: bool) -> tonic::Status {
    super::status::edge_status(
        tonic::Code::Unavailable,
        AUDIT_UNAVAILABLE,
        if ran {
            "The broker could not write the audit record of this request, so it returns no result. Retry later."
        } else {
            "The broker cannot write its audit log; the request was not carried out. Retry later."
        },
    )
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, E> tower::Service<http::Request<Body>> for Observed<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = E>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    E: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = E;
    type Future = BoxFuture<Result<http::Response<Body>, E>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The service that was polled ready serves this call; its clone stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // HTTP/2 lets header lists up to four times the limit through (see
        // `listener::ListenerSettings::h2_max_header_list_size`): a larger one than the broker
        // serves is answered here, on its own stream.
        let limit = self.observer.max_header_list_size;
        let size = header_list_size(&req);
        let oversized = (size > limit).then(|| header_list_too_large(size, limit));
        let Some((service, _)) = rpc_of(req.uri().path()) else {
            // Health and reflection: not counted or audited, but answered as the broker answers.
            return Box::pin(async move {
                let mut response = match oversized {
                    Some(status) => status.into_http::<Body>(),
                    None => inner.call(req).await?,
                };
                settle(&mut response);
                Ok::<_, E>(response)
            });
        };
        // The path's bytes are shared, not copied: service and method are sliced from it later,
        // where the service ends (the path was checked once, here).
        let service_end = 1 + service.len();
        let uri = req.uri().clone();

        let observer = self.observer.clone();
        let started = Instant::now();
        let request_id = request_id(req.headers());
        let ctx = RequestContext::new(observer.audit.enabled() || observer.otel.is_some());
        if let Some(peer) = connection_peer(req.extensions()) {
            ctx.note_caller(Some(peer), None);
        }
        req.extensions_mut().insert(ctx.clone());
        let span = observer.otel.as_ref().map(|o| {
            let (service, method) = split_rpc(uri.path(), service_end);
            o.start_span(req.headers(), service, method)
        });
        let refuse = observer.audit.required() && !observer.audit.available();
        Box::pin(async move {
            let (service, method) = split_rpc(uri.path(), service_end);
            let mut response = if refuse {
                audit_unavailable(false).into_http::<Body>()
            } else if let Some(status) = oversized {
                status.into_http::<Body>()
            } else {
                match ctx.clone().scope(inner.call(req)).await {
                    Ok(r) => r,
                    Err(e) => {
                        let rpc = Finished { service, method };
                        observer.finish(rpc, &ctx, started, tonic::Code::Internal, "Internal".into(), span);
                        return Err(e);
                    }
                }
            };
            let (mut code, mut outcome) = settle(&mut response);
            if !refuse && observer.audit.enabled() {
                let data = ctx.snapshot();
                let unix = (observer.now)();
                let trace_id = span.as_ref().map(|s| s.span_context().trace_id().to_string());
                let record = AuditRecord {
                    time: crate::model::time::rfc3339(unix),
                    unix,
                    request_id: &request_id,
                    principal: data.principal.as_deref(),
                    caller_address: data.caller_address.map(|a| a.to_string()),
                    operation: format!("{service}/{method}").chars().take(256).collect(),
                    resource: data.resource.as_deref(),
                    outcome: outcome.as_ref(),
                    grpc_status: code as i32,
                    cache_hit: data.cache_hit,
                    latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                    trace_id,
                };
                if observer.audit.write(&record).is_err() && observer.audit.required() {
                    // The caller does not get a result that left no audit trail.
                    response = audit_unavailable(true).into_http::<Body>();
                    (code, outcome) = (tonic::Code::Unavailable, Cow::Borrowed(AUDIT_UNAVAILABLE));
                }
            }
            // The id's bytes move into the header value (no copy). Every id is new, so HPACK is
            // told never to index it: in both ends' dynamic tables it would only push out the
            // entries that do repeat (content type, status) and cost an insertion per response.
            if let Ok(mut v) = http::HeaderValue::try_from(request_id) {
                v.set_sensitive(true);
                response.headers_mut().insert(REQUEST_ID, v);
            }
            let rpc = Finished { service, method };
            observer.finish(rpc, &ctx, started, code, outcome, span);
            Ok(response)
        })
    }
}

/// The connection's peer from tonic's connect info (plaintext or TLS).
fn connection_peer(ext: &http::Extensions) -> Option<SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.get_ref().remote_addr()))
}

/// Names of a finished RPC.
struct Finished<'a> {
    service: &'a str,
    method: &'a str,
}

impl Observer {
    fn finish(
        &self,
        rpc: Finished<'_>,
        ctx: &RequestContext,
        started: Instant,
        code: tonic::Code,
        outcome: Cow<'static, str>,
        span: Option<opentelemetry_sdk::trace::Span>,
    ) {
        let elapsed = started.elapsed();
        // Unknown methods (and services) are one series, whatever path a client sends.
        let (service, method) = if code == tonic::Code::Unimplemented && outcome == "Unimplemented" {
            ("unknown", "unknown")
        } else {
            (rpc.service, rpc.method)
        };
        metrics().record_request(service, method, &outcome, elapsed);
        if let Some(otel) = &self.otel {
            otel.record_request(service, method, &outcome, elapsed);
            if let Some(span) = span {
                Otel::end_span(span, ctx.snapshot(), code as i32, &outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_paths() {
        assert_eq!(rpc_of("/tdebroker.v1.KeyVault/WrapKey"), Some(("tdebroker.v1.KeyVault", "WrapKey")));
        assert_eq!(rpc_of("/grpc.health.v1.Health/Check"), None);
        assert_eq!(rpc_of("/tdebroker.v1.KeyVault/"), None);
        assert_eq!(rpc_of("/tdebroker.v1.KeyVault/a/b"), None);
        let path = "/tdebroker.v1.TdeEngine/UnwrapDatabaseKey";
        let (service, _) = rpc_of(path).unwrap();
        assert_eq!(split_rpc(path, 1 + service.len()), ("tdebroker.v1.TdeEngine", "UnwrapDatabaseKey"));
    }

    #[test]
    fn header_lists_are_sized_as_http2_counts_them() {
        let mut req = http::Request::builder()
            .method("POST")
            .uri("http://127.0.0.1:50051/tdebroker.v1.KeyVault/WrapKey")
            .header("content-type", "application/grpc")
            .body(Body::empty())
            .unwrap();
        let pseudo = (7 + 4) + (5 + 30) + (7 + 4) + (10 + 15) + 4 * 32;
        assert_eq!(header_list_size(&req), pseudo + (12 + 16 + 32));
        req.headers_mut().insert("x-big", http::HeaderValue::from_static("0123456789"));
        assert_eq!(header_list_size(&req), pseudo + (12 + 16 + 32) + (5 + 10 + 32));
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let mut h = http::HeaderMap::new();
        h.insert(REQUEST_ID, "abc-123".parse().unwrap());
        assert_eq!(request_id(&h), "abc-123");
        h.insert(REQUEST_ID, "a b\"c".parse().unwrap());
        assert_ne!(request_id(&h), "a b\"c");
    }
}
