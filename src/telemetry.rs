//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`). OpenTelemetry export
//! arrives with the operations issue.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls are no-ops.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Records a cache hit or miss of the hot path's caches (`decision`, `unwrap`). Called by
/// `broker::cache`; the metrics registry counts it (tdebroker_cache_hits_total /
/// tdebroker_cache_misses_total).
pub fn cache_event(cache: &'static str, hit: bool) {
    tracing::trace!(cache, hit, "cache lookup");
}
