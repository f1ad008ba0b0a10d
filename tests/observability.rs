//! Operations: the admin HTTP listener (`/metrics` parsed strictly and by the official Python
//! client, `/healthz`, `/readyz`), gRPC health on shutdown, and where the admin listener binds.
//! The audit log and OpenTelemetry export are in `audit_and_tracing.rs`.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;

use common::observed::*;
use tde_broker::grpc::proto::{self, key_vault_client::KeyVaultClient};
use tde_broker::server::App;
use tonic::Code;

#[test]
fn the_parser_is_strict() {
    assert!(parse_exposition("# TYPE a counter\na 1\n").is_ok());
    assert!(parse_exposition("a{b=\"x\\\"y\"} 1\n").is_ok());
    assert!(parse_exposition("a{b=\"x\"} 1").is_err(), "no final newline");
    assert!(parse_exposition("a{b=x} 1\n").is_err(), "unquoted label");
    assert!(parse_exposition("a{b=\"\\q\"} 1\n").is_err(), "bad escape");
    assert!(parse_exposition("a 1\na 2\n").is_err(), "duplicate");
    assert!(parse_exposition("a 1\nb 1\na{x=\"1\"} 1\n").is_err(), "not contiguous");
    assert!(parse_exposition("# TYPE a counter\na -1\n").is_err(), "negative counter");
    assert!(
        parse_exposition(
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n"
        )
        .is_err()
    );
    assert!(
        parse_exposition(
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n"
        )
        .is_ok()
    );
    assert!(
        parse_exposition("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n").is_err(),
        "no +Inf"
    );
    assert!(parse_exposition("1a 1\n").is_err());
}

// ---------------------------------------------------------------------------------------------
// /metrics, /healthz, /readyz, gRPC health
// ---------------------------------------------------------------------------------------------

const KV: &str = "tdebroker.v1.KeyVault";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_readiness_follows_the_lifecycle() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let app = App::open(config(&dir)).await.expect("broker opens");
    let http = app.http_addr().expect("admin listener");
    // Opened but not serving: alive, not ready.
    assert_eq!(get(http, "/healthz").0, 200);
    let (status, _, body) = get(http, "/readyz");
    assert_eq!((status, body.as_str()), (503, "starting\n"));
    assert_eq!(get(http, "/nope").0, 404);

    let b = serve(app, dir).await;
    // Ready once serving has begun (the gRPC listener was bound before: poll, as a probe does).
    let mut ready = get(http, "/readyz");
    for _ in 0..100 {
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        ready = get(http, "/readyz");
    }
    assert_eq!((ready.0, ready.2.as_str()), (200, "ready\n"));
    let key = b.vault_and_key("obsmetrics").await;

    let before = scrape(http);
    let dek = tde_broker::crypto::random_bytes(32);
    b.wrap_then_unwrap(&key, &dek, 3, 2).await;
    let garbage = vec![7u8; 256];
    common::assert_status(
        b.kv().unwrap_key(common::unwrap_req(&key, "RSA-OAEP-256", &garbage)).await,
        Code::InvalidArgument,
        "BadParameter",
    );
    let anonymous = KeyVaultClient::with_interceptor(b.channel.clone(), common::Bearer(None));
    common::assert_status(
        anonymous.clone().get_key(proto::GetKeyRequest { key_id: key.clone() }).await,
        Code::Unauthenticated,
        "Unauthorized",
    );
    let after = scrape(http);

    let delta =
        |name: &str, labels: &[(&str, &str)]| value(&after, name, labels) - value(&before, name, labels);
    let req = "tdebroker_requests_total";
    assert_eq!(delta(req, &[("service", KV), ("method", "WrapKey"), ("outcome", "OK")]), 3.0);
    assert_eq!(delta(req, &[("service", KV), ("method", "UnwrapKey"), ("outcome", "OK")]), 2.0);
    assert_eq!(delta(req, &[("service", KV), ("method", "UnwrapKey"), ("outcome", "BadParameter")]), 1.0);
    assert_eq!(delta(req, &[("service", KV), ("method", "GetKey"), ("outcome", "Unauthorized")]), 1.0);
    let dur = "tdebroker_request_duration_seconds_count";
    assert_eq!(delta(dur, &[("service", KV), ("method", "WrapKey")]), 3.0);
    assert_eq!(delta(dur, &[("service", KV), ("method", "UnwrapKey")]), 3.0);
    assert!(
        value(&after, "tdebroker_request_duration_seconds_sum", &[("service", KV), ("method", "WrapKey")])
            > 0.0
    );
    // The second unwrap of the same ciphertext is answered by the unwrap cache.
    assert!(delta("tdebroker_cache_hits_total", &[("cache", "unwrap")]) >= 1.0);
    assert!(delta("tdebroker_cache_misses_total", &[("cache", "unwrap")]) >= 1.0);
    // The database gauge is computed at scrape time: this broker has none.
    assert_eq!(value(&after, "tdebroker_databases", &[("state", "ONLINE")]), 0.0);
    assert!(
        after.contains_key(&(
            "tdebroker_databases".to_string(),
            vec![("state".into(), "INACCESSIBLE".into())]
        ))
    );
    // Health checks are not counted as broker RPCs.
    assert!(!after.keys().any(|(_, l)| l.iter().any(|(_, v)| v.contains("grpc.health"))));

    // Shutdown: gRPC health turns NOT_SERVING and /readyz 503 while calls drain. A health watch
    // is such a call: it holds the drain open until the client lets go.
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut watch = HealthClient::new(b.channel.clone())
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, 1, "SERVING");
    let mut kv_watch = HealthClient::new(b.channel.clone())
        .watch(HealthCheckRequest { service: KV.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kv_watch.message().await.unwrap().unwrap().status, 1, "SERVING");
    let Running { stop, served, channel, _dir, .. } = b;
    let _ = stop.unwrap().send(());
    assert_eq!(watch.message().await.unwrap().unwrap().status, 2, "NOT_SERVING");
    assert_eq!(kv_watch.message().await.unwrap().unwrap().status, 2, "NOT_SERVING");
    let (status, _, body) = get(http, "/readyz");
    assert_eq!((status, body.as_str()), (503, "shutting down\n"));
    assert_eq!(get(http, "/healthz").0, 200);
    drop((watch, kv_watch, channel, anonymous));
    served.unwrap().await.unwrap();
    // Once stopped, the admin listener is gone with the app (its task ends asynchronously).
    let mut closed = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(http).is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(closed, "the admin listener outlives the app");
}

// ---------------------------------------------------------------------------------------------
// /metrics read by the official Prometheus Python client
// ---------------------------------------------------------------------------------------------

/// Reads an exposition from stdin with `prometheus_client.parser.text_string_to_metric_families`
/// and prints its families as JSON: name, type, samples as [name, labels, value] (a value that is
/// not finite as a string: JSON has no infinities).
const PROMETHEUS_CLIENT_SCRIPT: &str = "\
import json, math, sys
from prometheus_client.parser import text_string_to_metric_families
families = [
    {'name': f.name, 'type': f.type,
     'samples': [[s.name, s.labels, s.value if math.isfinite(s.value) else repr(s.value)]
                 for s in f.samples]}
    for f in text_string_to_metric_families(sys.stdin.read())
]
json.dump(families, sys.stdout)
";

#[derive(serde::Deserialize)]
struct PyFamily {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    samples: Vec<(String, BTreeMap<String, String>, serde_json::Value)>,
}

/// The families of `body` as the Prometheus Python client reads them.
fn prometheus_client_families(python: &std::path::Path, body: &str) -> Vec<PyFamily> {
    use std::process::Stdio;
    let mut child = common::python::python_command(python)
        .args(["-c", PROMETHEUS_CLIENT_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} ({e})", python.display()));
    // The body fits in the pipe; a script that dies first is reported by its stderr, below.
    let written = child.stdin.take().expect("piped stdin").write_all(body.as_bytes());
    let out = child.wait_with_output().expect("python ends");
    let stdout = common::python::text(&out.stdout);
    assert!(
        out.status.success(),
        "prometheus_client cannot parse the exposition: {}\n{body}",
        common::python::text(&out.stderr)
    );
    written.expect("the exposition written to python");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("no JSON from the script ({e}): {stdout}"))
}

/// How prometheus_client names what this file's parser calls (`family`, `sample`) of type
/// `kind`: it takes `_total` off a counter family's name, and puts it on the samples of a counter
/// whose name lacks it. A family without a TYPE line is `unknown` to it.
fn prometheus_client_names(family: &str, kind: &str, sample: &str) -> (String, String, String) {
    match kind {
        "counter" => match family.strip_suffix("_total") {
            Some(base) => (base.into(), kind.into(), sample.into()),
            None => (family.into(), kind.into(), format!("{sample}_total")),
        },
        "untyped" => (family.into(), "unknown".into(), sample.into()),
        _ => (family.into(), kind.into(), sample.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_listeners_connections_are_on_metrics() {
    use tokio::io::AsyncReadExt as _;
    let _serial = SERIAL.lock().await;
    let b = start(|c, _| {
        c.listener.handshake_timeout = std::time::Duration::from_millis(300);
        c.listener.max_connections = 2;
    })
    .await;
    let http = b.http();
    // The harness's channel holds one connection; a silent one is closed at the deadline.
    let mut silent = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut sink = Vec::new();
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(10), silent.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the silent connection is closed");
    // Two open: a third is over the limit and closed at once.
    let _first = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let over = tokio::time::timeout(std::time::Duration::from_secs(10), third.read_to_end(&mut sink)).await;
    assert!(over.is_ok(), "the connection over the limit is closed");
    let m = scrape(http);
    assert_eq!(value(&m, "tdebroker_grpc_handshake_timeouts_total", &[]), 1.0);
    assert_eq!(value(&m, "tdebroker_grpc_connections_over_limit_total", &[]), 1.0);
    assert_eq!(value(&m, "tdebroker_grpc_connections_accepted_total", &[]), 3.0);
    assert_eq!(value(&m, "tdebroker_grpc_connections_open", &[]), 2.0);
    assert_eq!(value(&m, "tdebroker_grpc_accept_errors_total", &[]), 0.0);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_python_client_reads_the_same_metrics() {
    // Made (or found) before taking the metrics lock: the first run installs from PyPI.
    let python = tokio::task::spawn_blocking(|| {
        common::python::python_venv("pyenv-observability", &["prometheus-client"], "prometheus_client.parser")
    })
    .await
    .expect("join");
    let _serial = SERIAL.lock().await;
    let b = start(|_, _| {}).await;
    let key = b.vault_and_key("obspyclient").await;
    let dek = tde_broker::crypto::random_bytes(32);
    // The second unwrap is answered by the unwrap cache: both cache counters have a series.
    b.wrap_then_unwrap(&key, &dek, 1, 2).await;
    let (status, _, body) = get(b.http(), "/metrics");
    assert_eq!(status, 200);
    b.stop().await;
    let (ours, our_families) =
        parse_families(&body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}"));
    let theirs =
        tokio::task::spawn_blocking(move || prometheus_client_families(&python, &body)).await.expect("join");

    // The same families, of the same types.
    let expected: BTreeMap<String, String> = our_families
        .iter()
        .map(|(family, kind)| {
            let (name, kind, _) = prometheus_client_names(family, kind, family);
            (name, kind)
        })
        .collect();
    let got: BTreeMap<String, String> = theirs.iter().map(|f| (f.name.clone(), f.kind.clone())).collect();
    assert_eq!(got.len(), theirs.len(), "a family twice: {got:?}");
    assert_eq!(got, expected, "families: prometheus_client (left) and this file's parser (right)");

    // The same samples, with the same values.
    let types: BTreeMap<String, String> =
        our_families.iter().filter(|(_, k)| *k != "untyped").map(|(f, k)| (f.clone(), k.clone())).collect();
    let expected: BTreeMap<(String, Labels), f64> = ours
        .iter()
        .map(|((name, labels), v)| {
            let family = family_of(name, &types);
            let kind = our_families.get(family).map_or("untyped", String::as_str);
            let (_, _, sample) = prometheus_client_names(family, kind, name);
            ((sample, labels.clone()), *v)
        })
        .collect();
    let mut got: BTreeMap<(String, Labels), f64> = BTreeMap::new();
    for f in &theirs {
        for (name, labels, v) in &f.samples {
            let v = match v {
                serde_json::Value::Number(n) => n.as_f64().expect("a number"),
                serde_json::Value::String(s) => match s.as_str() {
                    "inf" => f64::INFINITY,
                    "-inf" => f64::NEG_INFINITY,
                    "nan" => f64::NAN,
                    other => panic!("value {other} of {name}"),
                },
                other => panic!("value {other} of {name}"),
            };
            let labels: Labels = labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            assert!(got.insert((name.clone(), labels), v).is_none(), "{name} twice");
        }
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "series: prometheus_client (left) and this file's parser (right)"
    );
    for (series, v) in &got {
        let e = expected[series];
        assert!(*v == e || (v.is_nan() && e.is_nan()), "{series:?}: prometheus_client {v}, ours {e}");
    }

    // A few samples by name, as prometheus_client reports them.
    let family = |name: &str| {
        theirs.iter().find(|f| f.name == name).unwrap_or_else(|| {
            panic!("no family {name} among {:?}", theirs.iter().map(|f| &f.name).collect::<Vec<_>>())
        })
    };
    let sample = |family: &PyFamily, name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        family
            .samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels.iter().all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| v.as_f64().expect("a finite value"))
    };
    let requests = family("tdebroker_requests");
    assert_eq!(requests.kind, "counter");
    let wraps = sample(
        requests,
        "tdebroker_requests_total",
        &[("service", KV), ("method", "WrapKey"), ("outcome", "OK")],
    );
    assert!(wraps.is_some_and(|n| n >= 1.0), "WrapKey OK: {wraps:?}");
    let durations = family("tdebroker_request_duration_seconds");
    assert_eq!(durations.kind, "histogram");
    for method in ["WrapKey", "UnwrapKey"] {
        // Every request of the method, whatever its outcome, is one observation of the histogram.
        let requested: f64 = requests
            .samples
            .iter()
            .filter(|(_, l, _)| {
                l.get("service").is_some_and(|s| s == KV) && l.get("method").is_some_and(|m| m == method)
            })
            .map(|(_, _, v)| v.as_f64().expect("a count"))
            .sum();
        let count = sample(
            durations,
            "tdebroker_request_duration_seconds_count",
            &[("service", KV), ("method", method)],
        );
        assert!(requested >= 1.0, "{method}: {requested}");
        assert_eq!(count, Some(requested), "{method}: the histogram's _count and the requests");
        let inf = sample(
            durations,
            "tdebroker_request_duration_seconds_bucket",
            &[("service", KV), ("method", method), ("le", "+Inf")],
        );
        assert_eq!(inf, count, "{method}: the +Inf bucket and _count");
    }
    for (name, total) in [
        ("tdebroker_cache_hits", "tdebroker_cache_hits_total"),
        ("tdebroker_cache_misses", "tdebroker_cache_misses_total"),
    ] {
        let f = family(name);
        assert_eq!(f.kind, "counter", "{name}");
        let unwraps = sample(f, total, &[("cache", "unwrap")]);
        assert!(unwraps.is_some_and(|n| n >= 1.0), "{total}{{cache=\"unwrap\"}}: {unwraps:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_admin_address_steps_aside_but_an_explicit_one_does_not() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.http_listen = Some(addr);
    cfg.http_listen_explicit = false;
    let app = App::open(cfg.clone()).await.expect("a taken default address does not stop the broker");
    assert_eq!(app.http_addr(), None);
    drop(app);
    cfg.http_listen_explicit = true;
    let err = App::open(cfg).await.err().expect("a taken configured address fails the start");
    assert!(err.to_string().contains("admin HTTP listener"), "{err}");
}
