//! The audit log (one JSON line per RPC, no key material, `audit_required`) and OpenTelemetry
//! export to an in-process OTLP receiver.

mod common;

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::observed::*;
use tde_broker::config::{AuditLog, Config, OtlpExport, ServeArgs};
use tde_broker::grpc::proto::{self, key_vault_client::KeyVaultClient};
use tonic::{Code, Request};

const KV: &str = "tdebroker.v1.KeyVault";

#[test]
fn admin_and_audit_settings_resolve_from_flags_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let resolve = |args: ServeArgs| Config::resolve(args);
    let cfg = resolve(ServeArgs::default()).unwrap();
    assert_eq!(cfg.http_listen, Some("127.0.0.1:9090".parse().unwrap()));
    assert!(!cfg.http_listen_explicit);
    assert_eq!(cfg.audit_log, AuditLog::Off);
    let cfg = resolve(ServeArgs {
        http_listen: Some("off".into()),
        audit_log: Some("stdout".into()),
        audit_required: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!((cfg.http_listen, cfg.audit_log, cfg.audit_required), (None, AuditLog::Stdout, true));
    let toml = dir.path().join("c.toml");
    std::fs::write(
        &toml,
        "http_listen = \"127.0.0.1:9191\"\naudit_log = \"/var/log/a.jsonl\"\naudit_required = true\n",
    )
    .unwrap();
    let cfg = resolve(ServeArgs { config: Some(toml), ..Default::default() }).unwrap();
    assert_eq!(cfg.http_listen, Some("127.0.0.1:9191".parse().unwrap()));
    assert!(cfg.http_listen_explicit);
    assert_eq!(cfg.audit_log, AuditLog::File("/var/log/a.jsonl".into()));
    assert!(cfg.audit_required);
    // Problems: not an address; public without --insecure; required without a log.
    let err = resolve(ServeArgs { http_listen: Some("nine".into()), ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("http_listen 'nine'"), "{err}");
    let err =
        resolve(ServeArgs { http_listen: Some("0.0.0.0:9090".into()), ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("admin HTTP listener on non-loopback"), "{err}");
    assert!(
        resolve(ServeArgs { http_listen: Some("0.0.0.0:9090".into()), insecure: true, ..Default::default() })
            .is_ok()
    );
    let err = resolve(ServeArgs { audit_required: true, ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("audit_required needs an audit log"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Audit log
// ---------------------------------------------------------------------------------------------

fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).expect("audit log");
    assert!(text.ends_with('\n'), "whole lines only");
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_has_one_line_per_operation_and_no_key_material() {
    let _serial = SERIAL.lock().await;
    let log = tempfile::tempdir().unwrap();
    let path = log.path().join("audit.jsonl");
    let p = path.clone();
    let b = start(move |cfg, _| cfg.audit_log = AuditLog::File(p)).await;
    let key = b.vault_and_key("obsaudit").await; // 3 RPCs

    let dek = tde_broker::crypto::random_bytes(32);
    let mut wrap = Request::new(common::crypto_req(&key, "RSA-OAEP-256", &dek));
    wrap.metadata_mut().insert("x-request-id", "obs-wrap-1".parse().unwrap());
    let r = b.kv().wrap_key(wrap).await.expect("wrap");
    assert_eq!(r.metadata().get("x-request-id").unwrap(), "obs-wrap-1");
    let wrapped = r.into_inner().value;
    let r = b.kv().unwrap_key(common::unwrap_req(&key, "RSA-OAEP-256", &wrapped)).await.expect("unwrap");
    let generated = r
        .metadata()
        .get("x-request-id")
        .expect("a request id for every response")
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(r.into_inner().value, dek);
    b.kv().unwrap_key(common::unwrap_req(&key, "RSA-OAEP-256", &wrapped)).await.expect("cached unwrap");
    let anonymous = KeyVaultClient::with_interceptor(b.channel.clone(), common::Bearer(None));
    common::assert_status(
        anonymous.clone().wrap_key(common::crypto_req(&key, "RSA-OAEP-256", &dek)).await,
        Code::Unauthenticated,
        "Unauthorized",
    );
    common::assert_status(
        b.kv()
            .get_key(proto::GetKeyRequest { key_id: format!("{}x", &key[..key.rfind('/').unwrap()]) })
            .await,
        Code::NotFound,
        "KeyNotFound",
    );
    let admin_token = b.token.clone();
    let admin = b.admin.clone();
    b.stop().await;

    let recs = records(&path);
    assert_eq!(recs.len(), 3 + 5, "one line per RPC: {recs:#?}");
    let ops: Vec<&str> = recs.iter().map(|r| r["operation"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        [
            "tdebroker.v1.Vaults/CreateVault",
            "tdebroker.v1.Vaults/SetAccessPolicy",
            "tdebroker.v1.KeyVault/CreateKey",
            "tdebroker.v1.KeyVault/WrapKey",
            "tdebroker.v1.KeyVault/UnwrapKey",
            "tdebroker.v1.KeyVault/UnwrapKey",
            "tdebroker.v1.KeyVault/WrapKey",
            "tdebroker.v1.KeyVault/GetKey",
        ]
    );
    let fields = [
        "time",
        "unix",
        "request_id",
        "principal",
        "caller_address",
        "operation",
        "resource",
        "outcome",
        "grpc_status",
        "cache_hit",
        "latency_ms",
    ];
    for r in &recs {
        let obj = r.as_object().unwrap();
        for f in fields {
            assert!(obj.contains_key(f), "{f} missing: {r}");
        }
        assert_eq!(obj.len(), fields.len(), "no other fields: {r}");
        assert_eq!(r["time"], "2027-01-15T08:00:00Z", "the broker's (manual) clock");
        assert_eq!(r["unix"], 1_800_000_000);
        assert!(r["latency_ms"].as_f64().unwrap() >= 0.0);
        assert!(r["caller_address"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(!r["request_id"].as_str().unwrap().is_empty());
    }
    assert_eq!(recs[0]["resource"], "obsaudit");
    assert_eq!(recs[2]["resource"], "obsaudit/keys/tde");
    let w = &recs[3];
    assert_eq!(w["request_id"], "obs-wrap-1");
    assert_eq!(w["principal"], admin.as_str());
    assert_eq!(w["resource"], key.as_str());
    assert_eq!((w["outcome"].as_str(), w["grpc_status"].as_i64()), (Some("OK"), Some(0)));
    assert_eq!(recs[4]["request_id"], generated.as_str());
    assert_eq!(recs[4]["cache_hit"], false, "first unwrap: the caches missed");
    assert_eq!(recs[5]["cache_hit"], true, "second unwrap: answered from the caches");
    let denied = &recs[6];
    assert_eq!(denied["principal"], serde_json::Value::Null);
    assert_eq!(
        (denied["outcome"].as_str(), denied["grpc_status"].as_i64()),
        (Some("Unauthorized"), Some(16))
    );
    assert_eq!(recs[7]["outcome"], "KeyNotFound");

    // No key material, value or token, in any encoding.
    let text = std::fs::read_to_string(&path).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    for (what, bytes) in [("DEK", &dek), ("wrapped DEK", &wrapped)] {
        for needle in [
            hex::encode(bytes),
            hex::encode_upper(bytes),
            b64.encode(bytes),
            b64url.encode(bytes),
            b64.encode(&bytes[..24]), // a prefix still gives a value away
        ] {
            assert!(!text.contains(&needle), "the {what} is in the audit log ({needle})");
        }
    }
    assert!(!text.contains(&admin_token), "the token is in the audit log");
    let signature = admin_token.rsplit('.').next().unwrap();
    assert!(!text.contains(signature), "the token's signature is in the audit log");
    assert!(!text.to_ascii_lowercase().contains("bearer"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_cannot_be_audited_are_refused_when_audit_is_required() {
    let _serial = SERIAL.lock().await;
    // The log cannot be opened (a directory): refused before anything runs.
    let b = start(|cfg, dir| {
        cfg.audit_log = AuditLog::File(dir.to_path_buf());
        cfg.audit_required = true;
    })
    .await;
    let before = scrape(b.http());
    common::assert_status(
        b.vaults()
            .create_vault(proto::CreateVaultRequest { name: "obsrefused".into(), ..Default::default() })
            .await,
        Code::Unavailable,
        "AuditUnavailable",
    );
    common::assert_status(
        b.kv()
            .get_key(proto::GetKeyRequest { key_id: "https://obsrefused.vault.azure.net/keys/k".into() })
            .await,
        Code::Unavailable,
        "AuditUnavailable",
    );
    let after = scrape(b.http());
    let labels =
        [("service", "tdebroker.v1.Vaults"), ("method", "CreateVault"), ("outcome", "AuditUnavailable")];
    assert_eq!(
        value(&after, "tdebroker_requests_total", &labels)
            - value(&before, "tdebroker_requests_total", &labels),
        1.0
    );
    // Health is not refused.
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let health =
        HealthClient::new(b.channel.clone()).check(HealthCheckRequest { service: String::new() }).await;
    assert_eq!(health.unwrap().into_inner().status, 1);
    // Nothing ran: the vault does not exist for a broker that is not required to audit.
    b.stop().await;

    // Writes fail (/dev/full): the operation ran but its result is withheld.
    if std::path::Path::new("/dev/full").exists() {
        let b = start(|cfg, _| {
            cfg.audit_log = AuditLog::File("/dev/full".into());
            cfg.audit_required = true;
        })
        .await;
        common::assert_status(
            b.vaults()
                .create_vault(proto::CreateVaultRequest { name: "obsfull".into(), ..Default::default() })
                .await,
            Code::Unavailable,
            "AuditUnavailable",
        );
        let failures = value(&scrape(b.http()), "tdebroker_audit_write_failures_total", &[]);
        assert!(failures >= 1.0);
        b.stop().await;
    }

    // Not required: the same broken log does not stop the broker.
    let b = start(|cfg, dir| cfg.audit_log = AuditLog::File(dir.to_path_buf())).await;
    b.vaults()
        .create_vault(proto::CreateVaultRequest { name: "obsoptional".into(), ..Default::default() })
        .await
        .expect("served without an audit log");
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// OpenTelemetry
// ---------------------------------------------------------------------------------------------

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// An OTLP receiver keeping what it is sent.
#[derive(Clone, Default)]
struct Receiver {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn attr_str<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_reach_an_otlp_receiver() {
    let _serial = SERIAL.lock().await;
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let (otlp_stop, otlp_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .add_service(MetricsServiceServer::new(receiver.clone()))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
            let _ = otlp_stopped.await;
        });
    let otlp_server = tokio::spawn(server);

    let b = start(move |cfg, _| cfg.otlp = OtlpExport::Endpoint(format!("http://{otlp}"))).await;
    let key = b.vault_and_key("obsotel").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let dek = tde_broker::crypto::random_bytes(32);
    let mut wrap = Request::new(common::crypto_req(&key, "RSA-OAEP-256", &dek));
    wrap.metadata_mut().insert("traceparent", format!("00-{trace_id}-{parent_id}-01").parse().unwrap());
    b.kv().wrap_key(wrap).await.expect("wrap");
    let admin = b.admin.clone();
    // Stopping flushes both pipelines.
    b.stop().await;

    let traces = receiver.traces.lock().unwrap().clone();
    let spans: Vec<_> = traces
        .iter()
        .flat_map(|t| &t.resource_spans)
        .flat_map(|rs| rs.scope_spans.iter().map(move |ss| (rs, ss)))
        .flat_map(|(rs, ss)| ss.spans.iter().map(move |s| (rs, s)))
        .collect();
    let (resource, span) =
        spans.iter().find(|(_, s)| s.name == "tdebroker.v1.KeyVault/WrapKey").unwrap_or_else(|| {
            panic!("no WrapKey span among {:?}", spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>())
        });
    assert_eq!(hex::encode(&span.trace_id), trace_id, "the caller's trace continues");
    assert_eq!(hex::encode(&span.parent_span_id), parent_id);
    assert_eq!(span.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attr_str(&span.attributes, "rpc.system"), Some("grpc"));
    assert_eq!(attr_str(&span.attributes, "rpc.service"), Some(KV));
    assert_eq!(attr_str(&span.attributes, "rpc.method"), Some("WrapKey"));
    assert_eq!(attr_str(&span.attributes, "enduser.id"), Some(admin.as_str()));
    assert_eq!(attr_str(&span.attributes, "tdebroker.key"), Some(key.as_str()));
    assert_eq!(attr_str(&span.attributes, "tdebroker.outcome"), Some("OK"));
    assert!(matches!(attr(&span.attributes, "tdebroker.cache_hit"), Some(any_value::Value::BoolValue(_))));
    if std::env::var("OTEL_SERVICE_NAME").is_err() && std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_err() {
        let attrs = &resource.resource.as_ref().unwrap().attributes;
        assert_eq!(attr_str(attrs, "service.name"), Some("tde-broker"));
    }
    // Nothing of the values travels with the span.
    let dump = format!("{traces:?}");
    assert!(!dump.contains(&hex::encode(&dek)) && !dump.contains(&format!("{:?}", &dek[..8])));

    let metrics = receiver.metrics.lock().unwrap().clone();
    let all: Vec<_> = metrics
        .iter()
        .flat_map(|m| &m.resource_metrics)
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .collect();
    let names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
    for expected in ["tdebroker.requests", "tdebroker.request.duration", "tdebroker.databases"] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let wraps: i64 = all
        .iter()
        .filter(|m| m.name == "tdebroker.requests")
        .filter_map(|m| match &m.data {
            Some(Data::Sum(s)) => Some(s),
            _ => None,
        })
        .flat_map(|s| &s.data_points)
        .filter(|p| {
            attr_str(&p.attributes, "rpc.method") == Some("WrapKey")
                && attr_str(&p.attributes, "outcome") == Some("OK")
        })
        .map(|p| match p.value {
            Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(v)) => v,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    assert_eq!(wraps, 1, "one WrapKey, cumulative");

    let _ = otlp_stop.send(());
    otlp_server.await.unwrap().unwrap();
}
