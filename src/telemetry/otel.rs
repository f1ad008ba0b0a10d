//! OpenTelemetry export: traces and metrics over OTLP/gRPC (tonic, the broker's own) when
//! configured ([`OtlpExport`]). The SDK honours the standard `OTEL_*` variables
//! (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`,
//! `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_EXPORTER_OTLP_{HEADERS,TIMEOUT,COMPRESSION}`, ...).
//! What it exports about the broker's state comes through a callback, not a reference to it.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    Counter, Histogram as OtelHistogram, MeterProvider as _, ObservableCounter, ObservableGauge,
};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status as SpanStatus, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

use super::context::ContextData;
use super::metrics::{DURATION_BUCKETS, metrics};

/// Why the OpenTelemetry pipeline could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OtelError {
    /// The OTLP span exporter could not be built (endpoint, headers, TLS settings).
    #[error("OTLP span exporter: {0}")]
    Spans(#[source] opentelemetry_otlp::ExporterBuildError),
    /// The OTLP metric exporter could not be built.
    #[error("OTLP metric exporter: {0}")]
    Metrics(#[source] opentelemetry_otlp::ExporterBuildError),
}

/// OpenTelemetry export (traces and metrics over OTLP/gRPC).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum OtlpExport {
    /// No export.
    #[default]
    Off,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (or a signal's own `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT`)
    /// is set: the exporter reads it and the other standard `OTEL_*` variables itself.
    FromEnv,
    /// This endpoint (e.g. `http://127.0.0.1:4317`), over the environment.
    Endpoint(String),
}

impl OtlpExport {
    /// On when an OTLP endpoint variable is set and `OTEL_SDK_DISABLED` is not `true`.
    pub fn from_env() -> Self {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        let disabled =
            std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let endpoint = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        ]
        .into_iter()
        .any(set);
        if endpoint && !disabled { OtlpExport::FromEnv } else { OtlpExport::Off }
    }
}

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
    /// there). `None` when export is off. `databases` is called at each export for the
    /// `tdebroker.databases` gauge: `(state, count)` pairs.
    pub fn start(
        export: &OtlpExport,
        databases: impl Fn() -> Vec<(&'static str, u64)> + Send + Sync + 'static,
    ) -> Result<Option<Arc<Otel>>, OtelError> {
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
        let spans = spans.build().map_err(OtelError::Spans)?;
        let metrics_exp = metrics_exp.build().map_err(OtelError::Metrics)?;
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
                for (op, v) in metrics().rsa_snapshot() {
                    o.observe(v, &[KeyValue::new("op", op)]);
                }
            })
            .build();
        let databases = meter
            .u64_observable_gauge("tdebroker.databases")
            .with_description("Databases by TDE state.")
            .with_callback(move |o| {
                for (state, v) in databases() {
                    o.observe(v, &[KeyValue::new("state", state)]);
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
    pub fn start_span(
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

    /// Counts and times one finished RPC in the exported metrics.
    pub fn record_request(&self, service: &str, method: &str, outcome: &str, elapsed: Duration) {
        let attrs = [
            KeyValue::new("rpc.service", service.to_string()),
            KeyValue::new("rpc.method", method.to_string()),
        ];
        self.duration.record(elapsed.as_secs_f64(), &attrs);
        let mut with_outcome = attrs.to_vec();
        with_outcome.push(KeyValue::new("outcome", outcome.to_string()));
        self.requests.add(1, &with_outcome);
    }

    /// Ends an RPC's span with what the request noted and how it ended (`grpc_status` 0: OK).
    pub fn end_span(
        mut span: opentelemetry_sdk::trace::Span,
        notes: ContextData,
        grpc_status: i32,
        outcome: &str,
    ) {
        if let Some(p) = notes.principal {
            span.set_attribute(KeyValue::new("enduser.id", p));
        }
        if let Some(r) = notes.resource {
            span.set_attribute(KeyValue::new("tdebroker.key", r));
        }
        if let Some(h) = notes.cache_hit {
            span.set_attribute(KeyValue::new("tdebroker.cache_hit", h));
        }
        if let Some(a) = notes.caller_address {
            span.set_attribute(KeyValue::new("client.address", a.ip().to_string()));
        }
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(grpc_status)));
        span.set_attribute(KeyValue::new("tdebroker.outcome", outcome.to_string()));
        if grpc_status != 0 {
            span.set_status(SpanStatus::error(outcome.to_string()));
        }
        span.end();
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
