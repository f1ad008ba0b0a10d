//! The HTTPS listener of the REST surfaces (`--rest-listen`): TLS with the dev CA's certificate,
//! HTTP/1.1 and h2 on one port, the router, and the observation every request gets (metrics,
//! audit record, span, request context).
//!
//! Routing: a request whose Host names a vault (`<vault>.vault.localhost[:port]`, or
//! `<vault>.<vault-dns-suffix>`) is Key Vault's; it is authenticated from its head alone, before
//! any of its body is read (the SDKs' first request is an unauthenticated probe). Any other
//! request is read whole and offered to the registered [`Surface`]s in turn (token endpoints,
//! Vault KV); none taking it is a 404.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;

use super::error::{RestError, grpc_code_of};
use super::keyvault::{self, Call, KeyVaultApi};
use super::{Handled, Reply, RestRequest, Surface};
use crate::audit::{AuditLog, AuditRecord};
use crate::auth::{AuthInterceptor, Authenticator, Plane};
use crate::broker::{Broker, new_guid};
use crate::listener::ListenerSettings;
use crate::model::BrokerError;
use crate::telemetry::{Otel, RequestContext, metrics};

/// Largest request body read (a JWK import of an RSA-4096 key is about 4 KiB; a crypto value is
/// at most 64 KiB, about 88 KiB in base64url).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// HTTP/1.1 read buffer, which bounds a request head.
const MAX_HTTP1_BUF: usize = 64 * 1024;
/// Idle HTTP/2 connections are pinged this often (and closed when a ping goes unanswered for
/// as long).
const H2_KEEPALIVE: Duration = Duration::from_secs(60);
/// How long an HTTP/1.1 connection may wait for its next request head (never less than the
/// handshake timeout). Longer than any `Retry-After` the broker sends (throttling windows are
/// 10 s), so an SDK that waits one out and then reuses its pooled keep-alive connection does not
/// find it closed under its request — which Python's SDK reports as a failed call. hyper times the
/// whole wait for a head with one timer, so a head that trickles in gets as long; open
/// connections stay bounded by `max_connections`.
const HTTP1_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 bounds per connection, the gRPC listener's (see `server::MAX_CONCURRENT_STREAMS` and
/// its neighbours for why each is needed): concurrent streams, resets the server is made to
/// send, resets pending accept.
const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// The `x-ms-keyvault-service-version` every Key Vault answer carries.
pub const SERVICE_VERSION: &str = "1.9.2612.1";
/// The message of a 401 without a bearer token (Key Vault's own).
pub const MISSING_TOKEN_MESSAGE: &str = "Request is missing a Bearer or PoP token.";

/// What the listener needs to answer requests.
pub struct RestService {
    broker: Arc<Broker>,
    auth: AuthInterceptor,
    keyvault: KeyVaultApi,
    surfaces: Vec<Arc<dyn Surface>>,
    audit: Arc<AuditLog>,
    otel: Option<Arc<Otel>>,
}

impl RestService {
    /// The REST surfaces over `broker`: Key Vault's API, then `surfaces` (offered every request
    /// that does not name a vault).
    pub fn new(
        broker: Arc<Broker>,
        auth: Arc<Authenticator>,
        surfaces: Vec<Arc<dyn Surface>>,
        audit: Arc<AuditLog>,
        otel: Option<Arc<Otel>>,
    ) -> Self {
        RestService {
            keyvault: KeyVaultApi::new(broker.clone()),
            auth: AuthInterceptor::new(auth, Plane::Data),
            broker,
            surfaces,
            audit,
            otel,
        }
    }

    /// Serves HTTPS on `listener` until `shutdown` completes, then lets open connections finish
    /// their requests (HTTP/2 GOAWAY, HTTP/1.1 close after the response) and returns.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
        limits: ListenerSettings,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let mut incoming = crate::listener::Incoming::new(listener, limits, false);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                next = incoming.next() => match next {
                    Some(Ok(connection)) => {
                        let peer = tonic::transport::server::Connected::connect_info(&connection).remote_addr();
                        let Some(peer) = peer else { continue };
                        let (service, acceptor, stop) = (self.clone(), acceptor.clone(), stop_rx.clone());
                        connections.spawn(service.connection(connection, peer, acceptor, limits, stop));
                    }
                    Some(Err(error)) => tracing::debug!(%error, "REST accept failed"),
                    None => break,
                },
            }
        }
        drop(incoming);
        let _ = stop_tx.send(true);
        while connections.join_next().await.is_some() {}
    }

    /// One connection: the TLS handshake (within the handshake timeout), then HTTP/1.1 or h2.
    async fn connection<IO>(
        self: Arc<Self>,
        io: IO,
        peer: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
        limits: ListenerSettings,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(io)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::debug!(%error, %peer, "REST TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "closing a REST connection that did not finish its TLS handshake in time");
                return;
            }
        };
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let this = self.clone();
            async move { this.handle(req, peer).await.ok_or(Dropped) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.handshake_timeout.max(HTTP1_IDLE_TIMEOUT))
            .max_buf_size(MAX_HTTP1_BUF)
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.h2_max_header_list_size())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .keep_alive_interval(H2_KEEPALIVE)
            .keep_alive_timeout(H2_KEEPALIVE);
        let connection = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, %peer, "REST connection ended with an error");
                }
            }
            () = async { let _ = stop.wait_for(|stopping| *stopping).await; } => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    }

    /// Answers one request, observed; `None` drops the connection without an answer.
    async fn handle(
        &self,
        req: Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> Option<Response<Full<Bytes>>> {
        let started = Instant::now();
        let request_id = new_guid();
        let (parts, body) = req.into_parts();
        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
            .unwrap_or_default();
        // The real client: the TCP peer, or the address a configured trusted proxy forwards.
        let forwarded = parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        let client =
            crate::policy::network::client_address(Some(peer), forwarded, self.auth.trusted_proxies())
                .unwrap_or(peer);
        let ctx = RequestContext::new(self.audit.enabled() || self.otel.is_some());
        ctx.note_caller(Some(client), None);

        let mut response = if self.audit.required() && !self.audit.available() {
            let e = audit_unavailable(false);
            self.finish(UNKNOWN_SURFACE_OPERATION, &ctx, started, e.status, e.outcome(), None, &request_id);
            error_response(&e)
        } else if let Some(vault) = keyvault::vault_of_host(&host, &self.broker.settings.vault_dns_suffix) {
            let route = keyvault::route(&parts.method, parts.uri.path());
            let operation = route.as_ref().map_or(keyvault::UNKNOWN_OPERATION, |r| r.op.operation());
            let span = self.start_span(&parts.headers, operation);
            let request =
                KvRequest { parts: &parts, client, host: &host, vault: &vault, route: route.as_ref() };
            let answer = ctx.clone().scope(self.keyvault_request(request, body, &ctx)).await;
            let (status, outcome, mut response) = match answer {
                Ok((status, body)) => (status, "OK", body_response(status, body)),
                Err(e) => {
                    let mut r = error_response(&e);
                    if e.status == StatusCode::UNAUTHORIZED {
                        add_challenge(&mut r, &host, &self.broker.settings.tenant_id);
                    }
                    (e.status, e.outcome(), r)
                }
            };
            if !self.finish(operation, &ctx, started, status, outcome, span, &request_id)
                && self.audit.required()
            {
                // The caller does not get a result that left no audit trail.
                response = error_response(&audit_unavailable(true));
            }
            keyvault_headers(&mut response, client, &self.broker.settings.location);
            response
        } else {
            match self.surface_request(parts, body, peer, &ctx).await {
                Some(handled) => {
                    if let Some(p) = &handled.principal {
                        ctx.note_caller(Some(client), Some(p));
                    }
                    if let Some(r) = &handled.resource {
                        ctx.note_resource(r);
                    }
                    let status = match &handled.reply {
                        Reply::Http(r) => r.status(),
                        Reply::Drop => StatusCode::SERVICE_UNAVAILABLE,
                    };
                    let span = self.start_span(&http::HeaderMap::new(), handled.operation);
                    let audited = self.finish(
                        handled.operation,
                        &ctx,
                        started,
                        status,
                        &handled.outcome,
                        span,
                        &request_id,
                    );
                    if !audited && self.audit.required() {
                        return Some(error_response(&audit_unavailable(true)));
                    }
                    match handled.reply {
                        Reply::Http(r) => r.map(Full::new),
                        Reply::Drop => return None,
                    }
                }
                None => {
                    let e = RestError::edge(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        "The requested resource was not found.",
                    );
                    self.finish(
                        UNKNOWN_SURFACE_OPERATION,
                        &ctx,
                        started,
                        e.status,
                        e.outcome(),
                        None,
                        &request_id,
                    );
                    error_response(&e)
                }
            }
        };
        if !response.headers().contains_key(REQUEST_ID)
            && let Ok(v) = HeaderValue::try_from(request_id)
        {
            response.headers_mut().insert(REQUEST_ID, v);
        }
        Some(response)
    }

    /// A Key Vault request: authenticate from the head, then the route, the api-version, the
    /// body, and the broker operation.
    async fn keyvault_request(
        &self,
        request: KvRequest<'_>,
        body: hyper::body::Incoming,
        ctx: &RequestContext,
    ) -> Result<keyvault::Answer, RestError> {
        let KvRequest { parts, client, host, vault, route } = request;
        let authorization = parts.headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
        let caller = self.auth.authenticate(authorization, Some(client), None).map_err(|e| match e {
            BrokerError::MissingToken => {
                RestError::edge(StatusCode::UNAUTHORIZED, "Unauthorized", MISSING_TOKEN_MESSAGE)
            }
            e => super::error::to_rest(e),
        })?;
        ctx.note_caller(Some(client), Some(&caller.object_id));
        let Some(route) = route else {
            return Err(RestError::edge(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!(
                    "The operation {} {} is not a Key Vault keys operation served here.",
                    parts.method,
                    crate::model::ids::printable(parts.uri.path())
                ),
            ));
        };
        if ctx.recording() {
            ctx.note_resource(&self.keyvault.resource(vault, route));
        }
        let api_version = keyvault::check_api_version(parts.uri.query())?;
        let body = read_body(body).await?;
        let base = format!("https://{host}");
        let call =
            Call { vault, base: &base, query: parts.uri.query(), body: &body, api_version: &api_version };
        self.keyvault.run(&caller, route, &call).await
    }

    /// Reads a request whole and offers it to the surfaces in turn.
    async fn surface_request(
        &self,
        parts: http::request::Parts,
        body: hyper::body::Incoming,
        peer: SocketAddr,
        ctx: &RequestContext,
    ) -> Option<Handled> {
        if self.surfaces.is_empty() {
            return None;
        }
        let body = match read_body(body).await {
            Ok(body) => body,
            Err(e) => {
                return Some(Handled {
                    reply: Reply::Http(error_response(&e).map(|_| Bytes::from(e.body().to_string()))),
                    operation: UNKNOWN_SURFACE_OPERATION,
                    outcome: e.outcome().to_string(),
                    principal: None,
                    resource: None,
                });
            }
        };
        let request = RestRequest { parts, body, peer };
        for surface in &self.surfaces {
            if let Some(handled) = ctx.clone().scope(surface.handle(&request)).await {
                return Some(handled);
            }
        }
        None
    }

    fn start_span(
        &self,
        headers: &http::HeaderMap,
        operation: &str,
    ) -> Option<opentelemetry_sdk::trace::Span> {
        let (service, method) = operation.split_once('/').unwrap_or((operation, ""));
        self.otel.as_ref().map(|o| o.start_span(headers, service, method))
    }

    /// Counts, audits and ends the span of a finished request.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        operation: &str,
        ctx: &RequestContext,
        started: Instant,
        status: StatusCode,
        outcome: &str,
        span: Option<opentelemetry_sdk::trace::Span>,
        request_id: &str,
    ) -> bool {
        let mut audited = true;
        let elapsed = started.elapsed();
        let (service, method) = operation.split_once('/').unwrap_or((operation, ""));
        metrics().record_request(service, method, outcome, elapsed);
        let code = grpc_code_of(status);
        if self.audit.enabled() {
            let data = ctx.snapshot();
            let unix = self.broker.clock.now();
            let record = AuditRecord {
                time: crate::model::time::rfc3339(unix),
                unix,
                request_id,
                principal: data.principal.as_deref(),
                caller_address: data.caller_address.map(|a| a.to_string()),
                operation: operation.to_string(),
                resource: data.resource.as_deref(),
                outcome,
                grpc_status: code,
                cache_hit: data.cache_hit,
                latency_ms: elapsed.as_secs_f64() * 1000.0,
                trace_id: None,
            };
            if let Err(error) = self.audit.write(&record) {
                tracing::warn!(%error, "could not write the audit record of a REST request");
                audited = false;
            }
        }
        if let Some(otel) = &self.otel {
            otel.record_request(service, method, outcome, elapsed);
            if let Some(span) = span {
                Otel::end_span(span, ctx.snapshot(), code, outcome);
            }
        }
        audited
    }
}

/// The head of a Key Vault request, as the router matched it.
struct KvRequest<'a> {
    parts: &'a http::request::Parts,
    client: SocketAddr,
    host: &'a str,
    vault: &'a str,
    route: Option<&'a keyvault::Route>,
}

/// The answer to a request a surface asked to drop: hyper closes an HTTP/1.1 connection, and
/// resets an h2 stream, when its service fails, without a response.
#[derive(Debug, thiserror::Error)]
#[error("the surface dropped the request without an answer")]
pub struct Dropped;

/// The response header carrying the request id.
pub const REQUEST_ID: &str = "x-ms-request-id";
/// The operation of a request no surface recognised (and of one refused before routing).
pub const UNKNOWN_SURFACE_OPERATION: &str = "Rest/Unknown";

/// A request refused because its audit record cannot be written: before it ran (`ran` false),
/// or after it ran, its result withheld (the gRPC surface's texts).
fn audit_unavailable(ran: bool) -> RestError {
    RestError::edge(
        StatusCode::SERVICE_UNAVAILABLE,
        "AuditUnavailable",
        if ran {
            "The broker could not write the audit record of this request, so it returns no result. Retry later."
        } else {
            "The broker cannot write its audit log; the request was not carried out. Retry later."
        },
    )
}

/// Reads a body up to [`MAX_BODY_BYTES`]; a larger one is `413`.
async fn read_body(body: hyper::body::Incoming) -> Result<Bytes, RestError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(RestError::edge(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLarge",
            format!("The request body is larger than {MAX_BODY_BYTES} bytes."),
        )),
        Err(_) => Err(RestError::bad_parameter("The request body could not be read.")),
    }
}

const JSON: &str = "application/json; charset=utf-8";

fn json_response(status: StatusCode, body: Option<&serde_json::Value>) -> Response<Full<Bytes>> {
    body_response(status, body.map(|b| Bytes::from(b.to_string())))
}

/// A response with a serialized JSON body, or none.
fn body_response(status: StatusCode, body: Option<Bytes>) -> Response<Full<Bytes>> {
    let has_body = body.is_some();
    let mut r = Response::new(Full::new(body.unwrap_or_default()));
    *r.status_mut() = status;
    if has_body {
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    }
    r
}

fn error_response(e: &RestError) -> Response<Full<Bytes>> {
    let mut r = json_response(e.status, Some(&e.body()));
    if let Some(seconds) = e.retry_after {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    r
}

/// Key Vault's bearer challenge: the local authority and the resource of the vault domain the
/// Host names, with the Host's port (none when the Host has none: Python compares host and port).
pub fn challenge(host: &str, tenant: &str) -> String {
    let port = keyvault::port_of_host(host).map(|p| format!(":{p}")).unwrap_or_default();
    let name = keyvault::host_without_port(host);
    let domain = name.split_once('.').map_or(name, |(_, d)| d).to_ascii_lowercase();
    format!("Bearer authorization=\"https://localhost{port}/{tenant}\", resource=\"https://{domain}{port}\"")
}

fn add_challenge(r: &mut Response<Full<Bytes>>, host: &str, tenant: &str) {
    if let Ok(v) = HeaderValue::try_from(challenge(host, tenant)) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
}

/// The headers Key Vault sends with every answer.
fn keyvault_headers(r: &mut Response<Full<Bytes>>, client: SocketAddr, location: &str) {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-ms-keyvault-service-version", HeaderValue::from_static(SERVICE_VERSION));
    if let Ok(v) = HeaderValue::try_from(location) {
        h.insert("x-ms-keyvault-region", v);
    }
    let family = if client.is_ipv4() { ("Ipv4", "InterNetwork") } else { ("Ipv6", "InterNetworkV6") };
    let info = format!("conn_type={};addr={};act_addr_fam={};", family.0, client.ip(), family.1);
    if let Ok(v) = HeaderValue::try_from(info) {
        h.insert("x-ms-keyvault-network-info", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_challenge_names_the_local_authority_and_the_vault_domain_with_the_hosts_port() {
        assert_eq!(
            challenge("kv.vault.localhost:8443", "t1"),
            "Bearer authorization=\"https://localhost:8443/t1\", resource=\"https://vault.localhost:8443\""
        );
        assert_eq!(
            challenge("kv.vault.localhost", "t1"),
            "Bearer authorization=\"https://localhost/t1\", resource=\"https://vault.localhost\""
        );
    }
}
