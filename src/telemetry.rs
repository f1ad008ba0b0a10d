//! Observability: logging, metrics, per-RPC observation (metrics, audit, spans), OpenTelemetry.
//!
//! - Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`).
//! - Metrics: a small in-process registry ([`metrics()`]: atomics and fixed-bucket histograms),
//!   rendered as Prometheus text by the admin listener's `/metrics` ([`crate::http`]). Process-wide:
//!   every broker of a process counts into it.
//! - [`ObserveLayer`] wraps the tonic server: for every `tdebroker.*` RPC it counts the request by
//!   service, method and outcome (the `ErrorInfo` reason, or `OK`), times it, writes the audit
//!   record ([`crate::audit`]) and, with OpenTelemetry on, a server span whose parent comes from
//!   the W3C `traceparent` metadata. The auth interceptor and the services fill the request's
//!   [`RequestContext`] (principal, caller address, resource); cache lookups mark it through
//!   [`Metrics::cache_hit`]/[`Metrics::cache_miss`].
//! - [`Otel`]: traces and metrics over OTLP/gRPC (tonic, the broker's own) when configured
//!   ([`crate::config::OtlpExport`]); the SDK honours the standard `OTEL_*` variables
//!   (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`,
//!   `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_EXPORTER_OTLP_{HEADERS,TIMEOUT,COMPRESSION}`, ...).
//!
//! Nothing here ever sees request or response messages: no key material, values or tokens reach
//! a metric, a span or an audit record (ARCHITECTURE.md invariant 6).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter, Histogram as OtelHistogram, MeterProvider as _, ObservableCounter, ObservableGauge,
};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status as SpanStatus, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::body::Body;
use tracing_subscriber::EnvFilter;

use crate::audit::{AuditLog, AuditRecord};
use crate::broker::Broker;
use crate::config::OtlpExport;
use crate::model::server::DbState;

/// Installs the global subscriber once; later calls are no-ops.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

// ---------------------------------------------------------------------------------------------
// Metrics registry
// ---------------------------------------------------------------------------------------------

/// Separates label values inside a series key (never part of a label value we record).
const SEP: char = '\u{1f}';

/// Upper bounds (seconds) of the request duration histogram's buckets; `+Inf` follows.
pub const DURATION_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Counters keyed by their label values (joined with [`SEP`]). Keys named when the registry is
/// built are plain atomics (the hot path counts those on every call without taking the lock);
/// others are added to a map on first use.
#[derive(Default)]
struct Counters {
    fixed: Box<[(&'static str, AtomicU64)]>,
    dynamic: RwLock<HashMap<String, Arc<AtomicU64>>>,
}

impl Counters {
    /// Counters whose `keys` need no lock.
    fn with_fixed(keys: &[&'static str]) -> Self {
        Counters { fixed: keys.iter().map(|k| (*k, AtomicU64::new(0))).collect(), dynamic: RwLock::default() }
    }

    fn add(&self, key: &str, n: u64) {
        if let Some((_, c)) = self.fixed.iter().find(|(k, _)| *k == key) {
            c.fetch_add(n, Ordering::Relaxed);
            return;
        }
        self.series(key).fetch_add(n, Ordering::Relaxed);
    }

    /// The counter of `key` (an added one: fixed keys are not request series).
    fn series(&self, key: &str) -> Arc<AtomicU64> {
        series_in(&self.dynamic, key)
    }

    /// `(key, value)` of every key counted at least once, sorted by key.
    fn snapshot(&self) -> Vec<(String, u64)> {
        let map = self.dynamic.read().unwrap_or_else(|p| p.into_inner());
        let fixed = self
            .fixed
            .iter()
            .map(|(k, c)| (k.to_string(), c.load(Ordering::Relaxed)))
            .filter(|(_, v)| *v > 0);
        let mut v: Vec<_> =
            map.iter().map(|(k, c)| (k.clone(), c.load(Ordering::Relaxed))).chain(fixed).collect();
        v.sort();
        v
    }
}

/// The series `key` of `map`, added on first use (only a series' first use takes the write lock).
fn series_in<T: Default>(map: &RwLock<HashMap<String, Arc<T>>>, key: &str) -> Arc<T> {
    if let Some(v) = map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
        return v.clone();
    }
    map.write().unwrap_or_else(|p| p.into_inner()).entry(key.to_string()).or_default().clone()
}

/// One histogram series: per-bucket counts (not cumulative; the last is `+Inf`), sum, count.
#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Histograms(RwLock<HashMap<String, Arc<Histogram>>>);

impl Histograms {
    /// The histogram of `key`, added on first use.
    fn series(&self, key: &str) -> Arc<Histogram> {
        series_in(&self.0, key)
    }

    fn snapshot(&self) -> Vec<(String, Arc<Histogram>)> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.iter().map(|(k, h)| (k.clone(), h.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// The process's metrics. Get it with [`metrics()`].
pub struct Metrics {
    /// Tells registries apart (a thread's remembered series belongs to one).
    id: u64,
    requests: Counters,
    durations: Histograms,
    cache_hits: Counters,
    cache_misses: Counters,
    rsa_operations: Counters,
    audit_failures: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        // The hot path's two caches are counted on every call.
        let caches = [crate::broker::cache::DECISION, crate::broker::cache::UNWRAP];
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Metrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            requests: Counters::default(),
            durations: Histograms::default(),
            cache_hits: Counters::with_fixed(&caches),
            cache_misses: Counters::with_fixed(&caches),
            rsa_operations: Counters::default(),
            audit_failures: AtomicU64::new(0),
        }
    }
}

/// The request series a thread counted last ([`Metrics::record_request`]).
struct SeriesMemo {
    /// [`Metrics::id`] of the registry the series belong to.
    registry: u64,
    /// Service, method and outcome, joined with [`SEP`].
    key: String,
    duration: Arc<Histogram>,
    count: Arc<AtomicU64>,
}

impl SeriesMemo {
    /// Whether this is the series of exactly these label values (which never contain [`SEP`]).
    fn names(&self, [service, method, outcome]: [&str; 3]) -> bool {
        let mut parts = self.key.split(SEP);
        parts.next() == Some(service)
            && parts.next() == Some(method)
            && parts.next() == Some(outcome)
            && parts.next().is_none()
    }
}

/// Requests of one service, method and outcome, in a [`MetricsSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestTotal {
    /// Full service name (`tdebroker.v1.KeyVault`), or `unknown`.
    pub service: String,
    /// Method name, or `unknown`.
    pub method: String,
    /// `OK`, the `ErrorInfo` reason, or the code's name.
    pub outcome: String,
    /// Requests so far.
    pub count: u64,
}

/// Timed requests of one service and method (every outcome), in a [`MetricsSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyTotal {
    /// Full service name.
    pub service: String,
    /// Method name.
    pub method: String,
    /// Requests timed.
    pub count: u64,
    /// Their latencies added up.
    pub sum: Duration,
}

/// A copy of the registry's counters ([`Metrics::snapshot`]); lists sorted by their labels.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// Requests by service, method and outcome.
    pub requests: Vec<RequestTotal>,
    /// Latency totals by service and method.
    pub latencies: Vec<LatencyTotal>,
    /// Cache hits by cache name.
    pub cache_hits: Vec<(String, u64)>,
    /// Cache misses by cache name.
    pub cache_misses: Vec<(String, u64)>,
    /// RSA operations by kind.
    pub rsa_operations: Vec<(String, u64)>,
    /// Audit records that could not be written.
    pub audit_failures: u64,
}

impl MetricsSnapshot {
    /// Hits and misses of cache `name` (0 for a cache never looked up).
    pub fn cache(&self, name: &str) -> (u64, u64) {
        let find = |list: &[(String, u64)]| list.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v);
        (find(&self.cache_hits), find(&self.cache_misses))
    }
}

/// The process-wide metrics registry.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

/// Records a cache hit or miss of the hot path's caches (`decision`, `unwrap`): counted in
/// `tdebroker_cache_hits_total` / `tdebroker_cache_misses_total`, and noted in the current
/// request's audit record and span.
pub fn cache_event(cache: &'static str, hit: bool) {
    if hit { metrics().cache_hit(cache) } else { metrics().cache_miss(cache) }
}

impl Metrics {
    /// A lookup in cache `cache` (e.g. `decision`, `unwrap`) found its entry. Also marks the
    /// current request's audit record (`cache_hit`) when called inside an RPC.
    pub fn cache_hit(&self, cache: &str) {
        self.cache_hits.add(cache, 1);
        RequestContext::mark_current_cache(true);
    }

    /// A lookup in cache `cache` missed. Also marks the current request's audit record.
    pub fn cache_miss(&self, cache: &str) {
        self.cache_misses.add(cache, 1);
        RequestContext::mark_current_cache(false);
    }

    /// One RSA private- or public-key operation (`op`: `encrypt`, `decrypt`, `sign`, `verify`,
    /// `generate`, ...).
    pub fn rsa_operation(&self, op: &str) {
        self.rsa_operations.add(op, 1);
    }

    /// One RPC: counted by service, method and outcome, timed by service and method.
    pub fn record_request(&self, service: &str, method: &str, outcome: &str, elapsed: Duration) {
        // Each thread remembers the series it counted last: a run of the same RPC and outcome
        // (the hot path's usual case) takes neither map's lock and builds no key.
        thread_local! {
            static LAST: RefCell<Option<SeriesMemo>> = const { RefCell::new(None) };
        }
        LAST.with_borrow_mut(|last| {
            let memo = match last {
                Some(m) if m.registry == self.id && m.names([service, method, outcome]) => m,
                _ => {
                    let mut key = String::with_capacity(service.len() + method.len() + outcome.len() + 2);
                    key.push_str(service);
                    key.push(SEP);
                    key.push_str(method);
                    let duration = self.durations.series(&key);
                    key.push(SEP);
                    key.push_str(outcome);
                    let count = self.requests.series(&key);
                    last.insert(SeriesMemo { registry: self.id, key, duration, count })
                }
            };
            memo.duration.observe(elapsed);
            memo.count.fetch_add(1, Ordering::Relaxed);
        });
    }

    /// An audit record could not be written.
    pub fn audit_failure(&self) {
        self.audit_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric; `databases` are the
    /// `(state, count)` pairs of the `tdebroker_databases` gauge, computed by the caller.
    pub fn render(&self, databases: &[(&str, u64)]) -> String {
        let mut out = String::with_capacity(4096);
        header(
            &mut out,
            "tdebroker_requests_total",
            "counter",
            "gRPC requests by service, method and outcome (the ErrorInfo reason, or OK).",
        );
        for (key, v) in self.requests.snapshot() {
            let mut it = key.split(SEP);
            let (s, m, o) = (it.next().unwrap_or(""), it.next().unwrap_or(""), it.next().unwrap_or(""));
            series(&mut out, "tdebroker_requests_total", &[("service", s), ("method", m), ("outcome", o)], v);
        }
        header(
            &mut out,
            "tdebroker_request_duration_seconds",
            "histogram",
            "gRPC request latency until the response headers, by service and method.",
        );
        for (key, h) in self.durations.snapshot() {
            let mut it = key.split(SEP);
            let (s, m) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            let mut cumulative = 0;
            for (i, b) in h.buckets.iter().enumerate() {
                cumulative += b.load(Ordering::Relaxed);
                let le = DURATION_BUCKETS.get(i).map_or_else(|| "+Inf".to_string(), |b| b.to_string());
                series(
                    &mut out,
                    "tdebroker_request_duration_seconds_bucket",
                    &[("service", s), ("method", m), ("le", &le)],
                    cumulative,
                );
            }
            let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let labels = format_labels(&[("service", s), ("method", m)]);
            let _ = writeln!(out, "tdebroker_request_duration_seconds_sum{labels} {sum}");
            let _ = writeln!(
                out,
                "tdebroker_request_duration_seconds_count{labels} {}",
                h.count.load(Ordering::Relaxed)
            );
        }
        for (name, help, counters) in [
            (
                "tdebroker_cache_hits_total",
                "Cache lookups that found their entry, by cache.",
                &self.cache_hits,
            ),
            ("tdebroker_cache_misses_total", "Cache lookups that missed, by cache.", &self.cache_misses),
        ] {
            header(&mut out, name, "counter", help);
            for (cache, v) in counters.snapshot() {
                series(&mut out, name, &[("cache", &cache)], v);
            }
        }
        header(&mut out, "tdebroker_rsa_operations_total", "counter", "RSA operations by kind.");
        for (op, v) in self.rsa_operations.snapshot() {
            series(&mut out, "tdebroker_rsa_operations_total", &[("op", &op)], v);
        }
        header(&mut out, "tdebroker_databases", "gauge", "Databases by TDE state, at scrape time.");
        for (state, v) in databases {
            series(&mut out, "tdebroker_databases", &[("state", state)], *v);
        }
        header(
            &mut out,
            "tdebroker_audit_write_failures_total",
            "counter",
            "Audit records that could not be written.",
        );
        let _ = writeln!(
            out,
            "tdebroker_audit_write_failures_total {}",
            self.audit_failures.load(Ordering::Relaxed)
        );
        out
    }

    /// A copy of every counter now (for `Emulation.GetStats`). Each counter is read atomically,
    /// not all of them at one instant: under load, figures of one snapshot may be a few
    /// requests apart.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let split = |key: &str| {
            let mut it = key.split(SEP);
            let mut next = || it.next().unwrap_or("").to_string();
            (next(), next(), next())
        };
        let requests = self
            .requests
            .snapshot()
            .into_iter()
            .map(|(key, count)| {
                let (service, method, outcome) = split(&key);
                RequestTotal { service, method, outcome, count }
            })
            .collect();
        let latencies = self
            .durations
            .snapshot()
            .into_iter()
            .map(|(key, h)| {
                let (service, method, _) = split(&key);
                LatencyTotal {
                    service,
                    method,
                    count: h.count.load(Ordering::Relaxed),
                    sum: Duration::from_nanos(h.sum_nanos.load(Ordering::Relaxed)),
                }
            })
            .collect();
        MetricsSnapshot {
            requests,
            latencies,
            cache_hits: self.cache_hits.snapshot(),
            cache_misses: self.cache_misses.snapshot(),
            rsa_operations: self.rsa_operations.snapshot(),
            audit_failures: self.audit_failures.load(Ordering::Relaxed),
        }
    }

    fn cache_snapshot(&self, hits: bool) -> Vec<(String, u64)> {
        if hits { self.cache_hits.snapshot() } else { self.cache_misses.snapshot() }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn series(out: &mut String, name: &str, labels: &[(&str, &str)], v: u64) {
    let _ = writeln!(out, "{name}{} {v}", format_labels(labels));
}

/// `{a="x",b="y"}` with the exposition format's escapes (`\\`, `\"`, `\n`).
fn format_labels(labels: &[(&str, &str)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s.push('}');
    s
}

/// The `tdebroker_databases` gauge's values: databases of `broker` by state.
pub fn database_counts(broker: &Broker) -> [(&'static str, u64); 2] {
    let st = broker.read();
    let online = st.databases.values().filter(|d| d.state == DbState::Online).count() as u64;
    let total = st.databases.len() as u64;
    [("ONLINE", online), ("INACCESSIBLE", total - online)]
}

// ---------------------------------------------------------------------------------------------
// Request context
// ---------------------------------------------------------------------------------------------

/// Longest resource name kept in an audit record or span (request fields are caller-chosen).
const MAX_RESOURCE: usize = 512;

/// What a request's audit record and span learn on the way in: the layer puts one in the request
/// extensions (and in a task-local for the request's future); the auth interceptor notes the
/// caller, the service the resource, the caches whether they hit.
#[derive(Clone, Default, Debug)]
pub struct RequestContext {
    /// Whether an audit record or a span will read the notes (else only `cache_hit` is kept:
    /// the caller and resource strings are not copied for nobody). Fixed when the request
    /// starts, so it is read without the lock.
    recording: bool,
    data: Arc<ContextCell>,
}

/// A request's notes: the cache outcome in an atomic (every hot-path lookup sets it), the rest
/// under a lock (written at most once or twice per request, and only when recording).
#[derive(Default, Debug)]
struct ContextCell {
    /// [`CACHE_UNKNOWN`], [`CACHE_ALL_HIT`] or [`CACHE_MISSED`].
    cache: AtomicU8,
    notes: Mutex<ContextData>,
}

/// No cache lookup yet.
const CACHE_UNKNOWN: u8 = 0;
/// Every lookup so far hit.
const CACHE_ALL_HIT: u8 = 1;
/// At least one lookup missed.
const CACHE_MISSED: u8 = 2;

#[derive(Clone, Default, Debug)]
struct ContextData {
    principal: Option<String>,
    caller_address: Option<SocketAddr>,
    resource: Option<String>,
    cache_hit: Option<bool>,
}

tokio::task_local! {
    static CURRENT: RequestContext;
}

impl RequestContext {
    /// A context whose caller and resource notes are kept only when `recording`.
    fn new(recording: bool) -> Self {
        RequestContext { recording, data: Arc::default() }
    }

    /// Whether the caller and resource notes are kept (an audit record or a span reads them).
    pub fn recording(&self) -> bool {
        self.recording
    }

    fn with<R>(&self, f: impl FnOnce(&mut ContextData) -> R) -> R {
        f(&mut self.data.notes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The caller's address (after trusted proxies) and, once authenticated, its object id.
    pub fn note_caller(&self, address: Option<SocketAddr>, principal: Option<&str>) {
        if !self.recording {
            return;
        }
        self.with(|d| {
            d.caller_address = address.or(d.caller_address);
            if let Some(p) = principal {
                d.principal = Some(p.to_string());
            }
        });
    }

    /// The resource the request names (a key id, a vault, a server); never a value or a secret.
    pub fn note_resource(&self, resource: &str) {
        if resource.is_empty() || !self.recording {
            return;
        }
        let mut end = resource.len().min(MAX_RESOURCE);
        while !resource.is_char_boundary(end) {
            end -= 1;
        }
        let r = resource[..end].to_string();
        self.with(|d| d.resource = Some(r));
    }

    /// A cache lookup of this request: `cache_hit` is true when every lookup hit.
    pub fn note_cache(&self, hit: bool) {
        if hit {
            // A miss is never overwritten by a later hit.
            let _ = self.data.cache.compare_exchange(
                CACHE_UNKNOWN,
                CACHE_ALL_HIT,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            self.data.cache.store(CACHE_MISSED, Ordering::Relaxed);
        }
    }

    /// The context of the RPC running on this task, if any.
    pub fn current() -> Option<RequestContext> {
        CURRENT.try_with(Clone::clone).ok()
    }

    fn mark_current_cache(hit: bool) {
        let _ = CURRENT.try_with(|c| c.note_cache(hit));
    }

    fn snapshot(&self) -> ContextData {
        let mut data = self.with(|d| d.clone());
        data.cache_hit = match self.data.cache.load(Ordering::Relaxed) {
            CACHE_UNKNOWN => None,
            c => Some(c == CACHE_ALL_HIT),
        };
        data
    }
}

// ---------------------------------------------------------------------------------------------
// The per-RPC layer
// ---------------------------------------------------------------------------------------------

/// `ErrorInfo.reason` of a request refused because it cannot be audited.
pub const AUDIT_UNAVAILABLE: &str = "AuditUnavailable";

/// The response header (and request metadata) carrying the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// What every observed RPC shares.
pub struct Observer {
    broker: Arc<Broker>,
    audit: Arc<AuditLog>,
    otel: Option<Arc<Otel>>,
}

/// The tower layer around the tonic server (`Server::builder().layer(...)`).
#[derive(Clone)]
pub struct ObserveLayer(Arc<Observer>);

impl ObserveLayer {
    /// Observes RPCs of `broker`, auditing into `audit`, exporting to `otel` when on.
    pub fn new(broker: Arc<Broker>, audit: Arc<AuditLog>, otel: Option<Arc<Otel>>) -> Self {
        ObserveLayer(Arc::new(Observer { broker, audit, otel }))
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
        .map_or_else(crate::broker::new_guid, str::to_string)
}

/// The gRPC status code and outcome label of a response: `OK`, the `ErrorInfo` reason, or the
/// code's name when the status carries no reason (e.g. `Unimplemented`).
fn outcome_of(headers: &http::HeaderMap) -> (tonic::Code, Cow<'static, str>) {
    match tonic::Status::from_header_map(headers) {
        None => (tonic::Code::Ok, Cow::Borrowed("OK")),
        Some(s) if s.code() == tonic::Code::Ok => (tonic::Code::Ok, Cow::Borrowed("OK")),
        Some(s) => {
            let reason = crate::grpc::status::reason(&s).unwrap_or_else(|| format!("{:?}", s.code()));
            (s.code(), Cow::Owned(reason))
        }
    }
}

/// The status of a request refused because its audit record cannot be written: before it ran
/// (`ran` false), or after it ran, its result withheld.
pub fn audit_unavailable(ran: bool) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let details = ErrorDetails::with_error_info(
        AUDIT_UNAVAILABLE,
        crate::grpc::status::ERROR_DOMAIN,
        HashMap::<String, String>::new(),
    );
    tonic::Status::with_error_details(
        tonic::Code::Unavailable,
        if ran {
            "The broker could not write the audit record of this request, so it returns no result. Retry later."
        } else {
            "The broker cannot write its audit log; the request was not carried out. Retry later."
        },
        details,
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
        let Some((service, _)) = rpc_of(req.uri().path()) else {
            return Box::pin(inner.call(req));
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
            } else {
                match CURRENT.scope(ctx.clone(), inner.call(req)).await {
                    Ok(r) => r,
                    Err(e) => {
                        let rpc = Finished { service, method };
                        observer.finish(rpc, &ctx, started, tonic::Code::Internal, "Internal".into(), span);
                        return Err(e);
                    }
                }
            };
            let (mut code, mut outcome) = outcome_of(response.headers());
            if !refuse && observer.audit.enabled() {
                let data = ctx.snapshot();
                let unix = observer.broker.clock.now();
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
            let attrs = [
                KeyValue::new("rpc.service", service.to_string()),
                KeyValue::new("rpc.method", method.to_string()),
            ];
            otel.duration.record(elapsed.as_secs_f64(), &attrs);
            let mut with_outcome = attrs.to_vec();
            with_outcome.push(KeyValue::new("outcome", outcome.to_string()));
            otel.requests.add(1, &with_outcome);
        }
        if let Some(mut span) = span {
            let data = ctx.snapshot();
            if let Some(p) = data.principal {
                span.set_attribute(KeyValue::new("enduser.id", p));
            }
            if let Some(r) = data.resource {
                span.set_attribute(KeyValue::new("tdebroker.key", r));
            }
            if let Some(h) = data.cache_hit {
                span.set_attribute(KeyValue::new("tdebroker.cache_hit", h));
            }
            if let Some(a) = data.caller_address {
                span.set_attribute(KeyValue::new("client.address", a.ip().to_string()));
            }
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
            span.set_attribute(KeyValue::new("tdebroker.outcome", outcome.to_string()));
            if code != tonic::Code::Ok {
                span.set_status(SpanStatus::error(outcome.into_owned()));
            }
            span.end();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// OpenTelemetry
// ---------------------------------------------------------------------------------------------

/// The OpenTelemetry pipeline of a serving broker: a tracer and meter exporting over OTLP/gRPC.
pub struct Otel {
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    tracer: opentelemetry_sdk::trace::SdkTracer,
    propagator: TraceContextPropagator,
    requests: Counter<u64>,
    duration: OtelHistogram<f64>,
    _cache_hits: ObservableCounter<u64>,
    _cache_misses: ObservableCounter<u64>,
    _rsa_operations: ObservableCounter<u64>,
    _databases: ObservableGauge<u64>,
}

/// Reads W3C trace context from request headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The service name, unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` name one.
const SERVICE_NAME: &str = "tde-broker";

impl Otel {
    /// Starts the exporters (inside the Tokio runtime: the tonic client's connection lives
    /// there). `None` when export is off.
    pub fn start(export: &OtlpExport, broker: Weak<Broker>) -> Result<Option<Arc<Otel>>, String> {
        use opentelemetry_otlp::WithExportConfig as _;
        let endpoint = match export {
            OtlpExport::Off => return Ok(None),
            OtlpExport::FromEnv => None,
            OtlpExport::Endpoint(e) => Some(e.clone()),
        };
        let mut spans = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        let mut metrics_exp = opentelemetry_otlp::MetricExporter::builder().with_tonic();
        if let Some(e) = &endpoint {
            spans = spans.with_endpoint(e.clone());
            metrics_exp = metrics_exp.with_endpoint(e.clone());
        }
        let spans = spans.build().map_err(|e| format!("OTLP span exporter: {e}"))?;
        let metrics_exp = metrics_exp.build().map_err(|e| format!("OTLP metric exporter: {e}"))?;
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
        let mut resource = opentelemetry_sdk::Resource::builder();
        if !named {
            resource = resource.with_service_name(SERVICE_NAME);
        }
        let resource =
            resource.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build();
        let tracer_provider =
            SdkTracerProvider::builder().with_batch_exporter(spans).with_resource(resource.clone()).build();
        let tracer = tracer_provider.tracer("tde-broker");
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(metrics_exp).build())
            .with_resource(resource)
            .build();
        let meter = meter_provider.meter("tde-broker");
        let requests = meter
            .u64_counter("tdebroker.requests")
            .with_description("gRPC requests by service, method and outcome (the ErrorInfo reason, or OK).")
            .build();
        let duration = meter
            .f64_histogram("tdebroker.request.duration")
            .with_unit("s")
            .with_description("gRPC request latency until the response headers.")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        let cache = |hits: bool, name: &'static str, description: &'static str| {
            meter
                .u64_observable_counter(name)
                .with_description(description)
                .with_callback(move |o| {
                    for (cache, v) in metrics().cache_snapshot(hits) {
                        o.observe(v, &[KeyValue::new("cache", cache)]);
                    }
                })
                .build()
        };
        let cache_hits = cache(true, "tdebroker.cache.hits", "Cache lookups that found their entry.");
        let cache_misses = cache(false, "tdebroker.cache.misses", "Cache lookups that missed.");
        let rsa_operations = meter
            .u64_observable_counter("tdebroker.rsa.operations")
            .with_description("RSA operations by kind.")
            .with_callback(|o| {
                for (op, v) in metrics().rsa_operations.snapshot() {
                    o.observe(v, &[KeyValue::new("op", op)]);
                }
            })
            .build();
        let databases = meter
            .u64_observable_gauge("tdebroker.databases")
            .with_description("Databases by TDE state.")
            .with_callback(move |o| {
                if let Some(b) = broker.upgrade() {
                    for (state, v) in database_counts(&b) {
                        o.observe(v, &[KeyValue::new("state", state)]);
                    }
                }
            })
            .build();
        Ok(Some(Arc::new(Otel {
            tracer_provider,
            meter_provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            requests,
            duration,
            _cache_hits: cache_hits,
            _cache_misses: cache_misses,
            _rsa_operations: rsa_operations,
            _databases: databases,
        })))
    }

    /// A server span for one RPC, child of the caller's `traceparent` when it sends one.
    fn start_span(
        &self,
        headers: &http::HeaderMap,
        service: &str,
        method: &str,
    ) -> opentelemetry_sdk::trace::Span {
        let parent = self.propagator.extract(&HeaderExtractor(headers));
        self.tracer
            .span_builder(format!("{service}/{method}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service.to_string()),
                KeyValue::new("rpc.method", method.to_string()),
            ])
            .start_with_context(&self.tracer, &parent)
    }

    /// Flushes and stops both pipelines (on the blocking pool: the exporters block until the
    /// runtime's tonic client has sent the last batch).
    pub async fn shutdown(&self) {
        let (t, m) = (self.tracer_provider.clone(), self.meter_provider.clone());
        let done = tokio::task::spawn_blocking(move || {
            if let Err(e) = t.shutdown() {
                tracing::warn!(error = %e, "flushing OpenTelemetry spans failed");
            }
            if let Err(e) = m.shutdown() {
                tracing::warn!(error = %e, "flushing OpenTelemetry metrics failed");
            }
        });
        let _ = done.await;
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
    fn request_context_keeps_caller_and_resource_only_when_something_records_them() {
        let addr: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        let quiet = RequestContext::new(false);
        quiet.note_caller(Some(addr), Some("oid-1"));
        quiet.note_resource("https://v.vault.azure.net/keys/k");
        quiet.note_cache(true);
        let d = quiet.snapshot();
        assert_eq!((d.principal, d.caller_address, d.resource), (None, None, None));
        assert_eq!(d.cache_hit, Some(true));

        let recorded = RequestContext::new(true);
        recorded.note_caller(Some(addr), Some("oid-1"));
        recorded.note_resource("https://v.vault.azure.net/keys/k");
        recorded.note_cache(true);
        recorded.note_cache(false);
        let d = recorded.snapshot();
        assert_eq!(d.principal.as_deref(), Some("oid-1"));
        assert_eq!(d.caller_address, Some(addr));
        assert_eq!(d.resource.as_deref(), Some("https://v.vault.azure.net/keys/k"));
        assert_eq!(d.cache_hit, Some(false));
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let mut h = http::HeaderMap::new();
        h.insert(REQUEST_ID, "abc-123".parse().unwrap());
        assert_eq!(request_id(&h), "abc-123");
        h.insert(REQUEST_ID, "a b\"c".parse().unwrap());
        assert_ne!(request_id(&h), "a b\"c");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(format_labels(&[("a", "x\"y\\z\nw")]), "{a=\"x\\\"y\\\\z\\nw\"}");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.record_request("s", "m", "OK", Duration::from_micros(100));
        m.record_request("s", "m", "OK", Duration::from_millis(30));
        m.record_request("s", "m", "OK", Duration::from_secs(60));
        let text = m.render(&[]);
        assert!(text.contains(
            "tdebroker_request_duration_seconds_bucket{service=\"s\",method=\"m\",le=\"0.0005\"} 1"
        ));
        assert!(
            text.contains(
                "tdebroker_request_duration_seconds_bucket{service=\"s\",method=\"m\",le=\"0.05\"} 2"
            )
        );
        assert!(
            text.contains(
                "tdebroker_request_duration_seconds_bucket{service=\"s\",method=\"m\",le=\"10\"} 2"
            )
        );
        assert!(
            text.contains(
                "tdebroker_request_duration_seconds_bucket{service=\"s\",method=\"m\",le=\"+Inf\"} 3"
            )
        );
        assert!(text.contains("tdebroker_request_duration_seconds_count{service=\"s\",method=\"m\"} 3"));
        assert!(text.contains("tdebroker_requests_total{service=\"s\",method=\"m\",outcome=\"OK\"} 3"));
    }

    #[test]
    fn snapshots_split_labels_and_add_up_latencies() {
        let m = Metrics::default();
        m.record_request("s", "m", "OK", Duration::from_millis(10));
        m.record_request("s", "m", "Throttled", Duration::from_millis(30));
        m.record_request("s", "a", "OK", Duration::from_millis(1));
        m.cache_hit("unwrap");
        m.cache_hit("unwrap");
        m.cache_miss("unwrap");
        m.cache_hit("another");
        m.rsa_operation("decrypt");
        m.audit_failure();
        let snap = m.snapshot();
        // Fixed and added counters in one sorted list; a cache never looked up is not listed.
        assert_eq!(snap.cache_hits, vec![("another".to_string(), 1), ("unwrap".to_string(), 2)]);
        let req = |method: &str, outcome: &str, count| RequestTotal {
            service: "s".into(),
            method: method.into(),
            outcome: outcome.into(),
            count,
        };
        assert_eq!(snap.requests, vec![req("a", "OK", 1), req("m", "OK", 1), req("m", "Throttled", 1)]);
        assert_eq!(
            snap.latencies,
            vec![
                LatencyTotal {
                    service: "s".into(),
                    method: "a".into(),
                    count: 1,
                    sum: Duration::from_millis(1)
                },
                LatencyTotal {
                    service: "s".into(),
                    method: "m".into(),
                    count: 2,
                    sum: Duration::from_millis(40)
                },
            ]
        );
        assert_eq!(snap.cache("unwrap"), (2, 1));
        assert_eq!(snap.cache("decision"), (0, 0));
        assert_eq!(snap.rsa_operations, vec![("decrypt".to_string(), 1)]);
        assert_eq!(snap.audit_failures, 1);
    }

    #[test]
    fn repeated_requests_count_into_their_own_series_and_registry() {
        let (a, b) = (Metrics::default(), Metrics::default());
        let ms = Duration::from_millis(1);
        a.record_request("s", "m", "OK", ms);
        a.record_request("s", "m", "OK", ms);
        b.record_request("s", "m", "OK", ms);
        a.record_request("s", "m", "OK", ms);
        a.record_request("s", "m", "OKAY", ms);
        a.record_request("s", "mm", "OK", ms);
        a.record_request("s", "m", "OK", ms);
        let count = |m: &Metrics, method: &str, outcome: &str| {
            m.snapshot()
                .requests
                .iter()
                .find(|r| r.method == method && r.outcome == outcome)
                .map_or(0, |r| r.count)
        };
        assert_eq!(count(&a, "m", "OK"), 4);
        assert_eq!(count(&a, "m", "OKAY"), 1);
        assert_eq!(count(&a, "mm", "OK"), 1);
        assert_eq!(count(&b, "m", "OK"), 1);
        let timed = a.snapshot().latencies.into_iter().find(|l| l.method == "m").map(|l| l.count);
        assert_eq!(timed, Some(5));
    }

    #[tokio::test]
    async fn cache_lookups_mark_the_current_request() {
        let ctx = RequestContext::default();
        CURRENT
            .scope(ctx.clone(), async {
                metrics().cache_hit("test");
                metrics().cache_miss("test");
            })
            .await;
        assert_eq!(ctx.snapshot().cache_hit, Some(false));
        let ctx = RequestContext::default();
        CURRENT.scope(ctx.clone(), async { metrics().cache_hit("test") }).await;
        assert_eq!(ctx.snapshot().cache_hit, Some(true));
    }
}
