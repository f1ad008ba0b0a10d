//! Observability that knows nothing of the broker or the wire: logging, the process's metrics
//! registry, the request context that audit records and spans read, and OpenTelemetry export.
//!
//! - Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`).
//! - [`metrics`]: a small in-process registry ([`metrics()`]: atomics and fixed-bucket
//!   histograms), rendered as Prometheus text by the admin listener's `/metrics`. Process-wide:
//!   every broker of a process counts into it.
//! - [`context`]: a request's [`RequestContext`] (principal, caller address, resource, cache
//!   outcome), filled by the auth interceptor, the services and the caches.
//! - [`otel`]: traces and metrics over OTLP/gRPC when configured ([`OtlpExport`]).
//!
//! The per-RPC layer that ties these together (counting, timing, the audit record, the span)
//! sits with the gRPC adapter, where statuses are built. Nothing here ever sees request or
//! response messages: no key material, values or tokens reach a metric, a span or an audit
//! record (ARCHITECTURE.md invariant 6).

pub mod context;
pub mod metrics;
pub mod otel;

use tracing_subscriber::EnvFilter;

pub use context::{ContextData, RequestContext};
pub use metrics::{
    CacheCounter, ConnectionFigures, DURATION_BUCKETS, LatencyTotal, Metrics, MetricsSnapshot, RequestTotal,
    metrics,
};
pub use otel::{Otel, OtelError, OtlpExport};

/// Installs the global subscriber once; later calls are no-ops.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
