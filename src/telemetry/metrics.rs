//! The process's metrics registry: request counts and latency histograms by RPC, cache hits and
//! misses, RSA operations, audit write failures — atomics and fixed-bucket histograms, rendered
//! as Prometheus text. It imports nothing else of the crate: the broker, the audit log and the
//! adapters call into it, never the other way round.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use super::context::RequestContext;

/// Separates label values inside a series key (never part of a label value we record).
const SEP: char = '\u{1f}';

/// Upper bounds (seconds) of the request duration histogram's buckets; `+Inf` follows.
pub const DURATION_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Counters keyed by their label values (joined with [`SEP`]), each added on first use. The hot
/// path counts through a handle it took once ([`Metrics::cache_counter`]), without the lock.
#[derive(Default)]
struct Counters(RwLock<HashMap<String, Arc<AtomicU64>>>);

impl Counters {
    fn add(&self, key: &str, n: u64) {
        self.series(key).fetch_add(n, Ordering::Relaxed);
    }

    /// The counter of `key`, added on first use.
    fn series(&self, key: &str) -> Arc<AtomicU64> {
        series_in(&self.0, key)
    }

    /// `(key, value)` of every key counted at least once, sorted by key.
    fn snapshot(&self) -> Vec<(String, u64)> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> =
            map.iter().map(|(k, c)| (k.clone(), c.load(Ordering::Relaxed))).filter(|(_, v)| *v > 0).collect();
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
    rotation_policy_actions: Counters,
    audit_failures: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Metrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            requests: Counters::default(),
            durations: Histograms::default(),
            cache_hits: Counters::default(),
            cache_misses: Counters::default(),
            rsa_operations: Counters::default(),
            rotation_policy_actions: Counters::default(),
            audit_failures: AtomicU64::new(0),
        }
    }
}

/// The hit and miss counters of one cache, taken once by the cache that counts into them: a
/// lookup costs one atomic add, no lock and no key.
#[derive(Clone, Debug)]
pub struct CacheCounter {
    hits: Arc<AtomicU64>,
    misses: Arc<AtomicU64>,
}

impl CacheCounter {
    /// A lookup of this cache: counted in `tdebroker_cache_hits_total` /
    /// `tdebroker_cache_misses_total`, and noted in the current request's audit record and span.
    pub fn record(&self, hit: bool) {
        let counter = if hit { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        RequestContext::mark_current_cache(hit);
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

/// The gRPC listener's connection figures at scrape time (the listener counts them; the admin
/// listener hands them over), rendered with the registry's series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionFigures {
    /// Connections open now.
    pub open: u64,
    /// Connections accepted and kept, in all.
    pub accepted: u64,
    /// Connections closed at once because `max_connections` were open.
    pub over_limit: u64,
    /// Connections closed for not finishing the TLS handshake or the HTTP/2 preface in time.
    pub handshake_timeouts: u64,
    /// Accepts that failed and made the listener pause (out of file descriptors, ...).
    pub accept_errors: u64,
}

impl ConnectionFigures {
    fn render(&self, out: &mut String) {
        for (name, kind, help, value) in [
            ("tdebroker_grpc_connections_open", "gauge", "gRPC connections open now.", self.open),
            (
                "tdebroker_grpc_connections_accepted_total",
                "counter",
                "gRPC connections accepted and kept.",
                self.accepted,
            ),
            (
                "tdebroker_grpc_connections_over_limit_total",
                "counter",
                "gRPC connections closed at once because max_connections were open.",
                self.over_limit,
            ),
            (
                "tdebroker_grpc_handshake_timeouts_total",
                "counter",
                "gRPC connections closed for not finishing the TLS handshake or the HTTP/2 preface in time.",
                self.handshake_timeouts,
            ),
            (
                "tdebroker_grpc_accept_errors_total",
                "counter",
                "Failed accepts of the gRPC listener (each makes it pause before the next).",
                self.accept_errors,
            ),
        ] {
            header(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
    }
}

/// The process-wide metrics registry.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    /// The counters of cache `name` (e.g. `decision`, `unwrap`), for a cache to keep.
    pub fn cache_counter(&self, name: &str) -> CacheCounter {
        CacheCounter { hits: self.cache_hits.series(name), misses: self.cache_misses.series(name) }
    }

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

    /// One lifetime action of a key rotation policy carried out (`action`: `Rotate`, `Notify`).
    pub fn rotation_policy_action(&self, action: &str) {
        self.rotation_policy_actions.add(action, 1);
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
    pub fn render(&self, databases: &[(&str, u64)], connections: Option<&ConnectionFigures>) -> String {
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
        header(
            &mut out,
            "tdebroker_key_rotation_policy_actions_total",
            "counter",
            "Lifetime actions of key rotation policies carried out, by action.",
        );
        for (action, v) in self.rotation_policy_actions.snapshot() {
            series(&mut out, "tdebroker_key_rotation_policy_actions_total", &[("action", &action)], v);
        }
        header(&mut out, "tdebroker_databases", "gauge", "Databases by TDE state, at scrape time.");
        for (state, v) in databases {
            series(&mut out, "tdebroker_databases", &[("state", state)], *v);
        }
        if let Some(c) = connections {
            c.render(&mut out);
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

    /// Hits (`hits`) or misses of every cache looked up so far, for the OpenTelemetry export.
    pub(super) fn cache_snapshot(&self, hits: bool) -> Vec<(String, u64)> {
        if hits { self.cache_hits.snapshot() } else { self.cache_misses.snapshot() }
    }

    /// RSA operations by kind so far, for the OpenTelemetry export.
    pub(super) fn rsa_snapshot(&self) -> Vec<(String, u64)> {
        self.rsa_operations.snapshot()
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let text = m.render(&[], None);
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

    #[test]
    fn a_cache_counter_counts_into_its_cache_series() {
        let m = Metrics::default();
        let unwrap = m.cache_counter("unwrap");
        let _never_used = m.cache_counter("decision");
        unwrap.record(true);
        unwrap.record(true);
        unwrap.record(false);
        m.cache_hit("unwrap");
        let snap = m.snapshot();
        assert_eq!(snap.cache("unwrap"), (3, 1));
        // A cache whose counters were taken but never counted is not listed.
        assert_eq!(snap.cache_hits, vec![("unwrap".to_string(), 3)]);
    }
}
