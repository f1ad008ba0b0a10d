//! Operations: the admin HTTP listener (`/metrics` parsed strictly, `/healthz`, `/readyz`), gRPC
//! health on shutdown, the audit log (one JSON line per RPC, no key material, `audit_required`),
//! and OpenTelemetry export to an in-process OTLP receiver.

mod common;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use tde_broker::config::{AuditLog, ClockKind, Config, OtlpExport, ServeArgs};
use tde_broker::grpc::proto::{self, key_vault_client::KeyVaultClient, vaults_client::VaultsClient};
use tde_broker::server::App;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Metrics are process-wide: tests that count take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A serving broker of this file.
struct Running {
    http: Option<SocketAddr>,
    token: String,
    admin: String,
    channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// A config on a manual clock in `dir` with the admin listener on an ephemeral port.
fn config(dir: &tempfile::TempDir) -> Config {
    let mut cfg = Config::for_data_dir(dir.path());
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(1_800_000_000);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.http_listen_explicit = true;
    cfg
}

async fn serve(app: App, dir: tempfile::TempDir) -> Running {
    let token = app.admin_token().expect("admin token");
    let admin = app.admin.object_id.clone();
    let http = app.http_addr();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        app.serve(listener, async {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    Running { http, token, admin, channel, stop: Some(tx), served: Some(served), _dir: dir }
}

async fn start(modify: impl FnOnce(&mut Config, &std::path::Path)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    modify(&mut cfg, dir.path());
    let app = App::open(cfg).await.expect("broker starts");
    serve(app, dir).await
}

impl Running {
    fn kv(&self) -> common::Kv {
        KeyVaultClient::with_interceptor(self.channel.clone(), common::bearer(&self.token))
    }
    /// Wraps `dek` under `key` `wraps` times (each an RSA operation), then unwraps the last
    /// ciphertext `unwraps` times, checking the plaintext each time.
    async fn wrap_then_unwrap(&self, key: &str, dek: &[u8], wraps: usize, unwraps: usize) {
        let mut wrapped = Vec::new();
        for _ in 0..wraps {
            let r = self.kv().wrap_key(common::crypto_req(key, "RSA-OAEP-256", dek)).await.expect("wrap");
            wrapped = r.into_inner().value;
        }
        for _ in 0..unwraps {
            let r = self
                .kv()
                .unwrap_key(common::unwrap_req(key, "RSA-OAEP-256", &wrapped))
                .await
                .expect("unwrap");
            assert_eq!(r.into_inner().value, dek);
        }
    }
    fn vaults(&self) -> common::Vaults {
        VaultsClient::with_interceptor(self.channel.clone(), common::bearer(&self.token))
    }
    fn http(&self) -> SocketAddr {
        self.http.expect("the admin listener runs")
    }

    /// A vault where the admin holds every key permission, and an RSA key in it: its id.
    async fn vault_and_key(&self, vault: &str) -> String {
        self.vaults()
            .create_vault(proto::CreateVaultRequest { name: vault.into(), ..Default::default() })
            .await
            .expect("vault");
        self.vaults()
            .set_access_policy(proto::SetAccessPolicyRequest {
                vault_name: vault.into(),
                object_id: self.admin.clone(),
                key_permissions: vec!["all".into()],
            })
            .await
            .expect("policy");
        let bundle = self
            .kv()
            .create_key(proto::CreateKeyRequest {
                vault_name: vault.into(),
                name: "tde".into(),
                kty: "RSA".into(),
                key_size: 2048,
                ..Default::default()
            })
            .await
            .expect("key")
            .into_inner();
        common::kid(&bundle)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.served.take() {
            h.await.expect("serve ends");
        }
    }
}

/// A plain HTTP/1.1 GET: status, content type, body.
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the admin listener");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

// ---------------------------------------------------------------------------------------------
// A strict parser of the Prometheus text exposition format (0.0.4)
// ---------------------------------------------------------------------------------------------

/// Label pairs, sorted.
type Labels = Vec<(String, String)>;
type Series = BTreeMap<(String, Labels), f64>;

fn metric_name_ok(n: &str) -> bool {
    let mut c = n.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn label_name_ok(n: &str) -> bool {
    let mut c = n.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse::<f64>().map_err(|_| format!("bad value '{v}'")),
    }
}

/// `name{a="x",...} value`: the name, labels (sorted) and value.
fn parse_sample(line: &str) -> Result<(String, Labels, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or_else(|| format!("no value: {line}"))?;
    let name = &line[..name_end];
    if !metric_name_ok(name) {
        return Err(format!("bad metric name '{name}'"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        loop {
            // label name
            let start = chars.peek().map(|(i, _)| *i).ok_or("unterminated labels")?;
            if r[start..].starts_with('}') {
                chars.next();
                break;
            }
            let eq = r[start..].find('=').ok_or("label without '='")? + start;
            let lname = &r[start..eq];
            if !label_name_ok(lname) {
                return Err(format!("bad label name '{lname}'"));
            }
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")?.1 {
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    '"' => break,
                    '\n' => return Err("newline in label value".into()),
                    c => value.push(c),
                }
            }
            labels.push((lname.to_string(), value));
            match chars.next().ok_or("unterminated labels")?.1 {
                ',' => continue,
                '}' => break,
                c => return Err(format!("unexpected '{c}' after a label")),
            }
        }
        let consumed = chars.peek().map_or(r.len(), |(i, _)| *i);
        rest = &r[consumed..];
    }
    let rest = rest.strip_prefix(' ').ok_or_else(|| format!("no space before the value: {line}"))?;
    let mut parts = rest.split(' ');
    let value = parse_value(parts.next().ok_or("no value")?)?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>().map_err(|_| format!("bad timestamp '{ts}'"))?;
    }
    if parts.next().is_some() {
        return Err(format!("trailing text: {line}"));
    }
    let mut sorted = labels.clone();
    sorted.sort();
    if sorted.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(format!("duplicate label: {line}"));
    }
    Ok((name.to_string(), sorted, value))
}

/// Parses a whole exposition, checking families (one TYPE each, before their samples, samples
/// contiguous), histogram shape (cumulative buckets ending at `+Inf` equal to `_count`), counters
/// non-negative and no duplicate series.
fn parse_exposition(text: &str) -> Result<Series, String> {
    parse_families(text).map(|(series, _)| series)
}

/// [`parse_exposition`], also returning every family with its type: those with a TYPE line
/// (with or without samples), and `untyped` for samples without one.
fn parse_families(text: &str) -> Result<(Series, BTreeMap<String, String>), String> {
    if !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: BTreeMap<String, ()> = BTreeMap::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut series = Series::new();
    for line in text.lines() {
        if line.is_empty() {
            return Err("empty line".into());
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut p = c.trim_start().splitn(3, ' ');
            match (p.next(), p.next(), p.next()) {
                (Some("HELP"), Some(name), Some(_)) if helps.insert(name.to_string(), ()).is_some() => {
                    return Err(format!("second HELP for {name}"));
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(format!("bad type {kind}"));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(format!("second TYPE for {name}"));
                    }
                    if series.keys().any(|(n, _)| family_of(n, &types) == name) {
                        return Err(format!("TYPE of {name} after its samples"));
                    }
                }
                _ => {} // a comment
            }
            continue;
        }
        let (name, labels, value) = parse_sample(line)?;
        let family = family_of(&name, &types).to_string();
        let kind = types.get(&family).map(String::as_str).unwrap_or("untyped");
        if current.as_deref() != Some(&family) {
            if finished.contains(&family) {
                return Err(format!("samples of {family} are not contiguous"));
            }
            if let Some(c) = current.take() {
                finished.push(c);
            }
            current = Some(family.clone());
        }
        match kind {
            "counter" if value < 0.0 || value.is_nan() => return Err(format!("negative counter {line}")),
            "histogram" => {
                let suffix = &name[family.len()..];
                if !["_bucket", "_sum", "_count"].contains(&suffix) {
                    return Err(format!("histogram sample {name}"));
                }
                if suffix == "_bucket" && !labels.iter().any(|(k, _)| k == "le") {
                    return Err(format!("bucket without le: {line}"));
                }
            }
            _ => {}
        }
        if series.insert((name, labels), value).is_some() {
            return Err(format!("duplicate series {line}"));
        }
    }
    // Histograms: per series, buckets cumulative and +Inf == _count.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut groups: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for ((name, labels), v) in &series {
            if *name == format!("{family}_bucket") {
                let le = labels.iter().find(|(k, _)| k == "le").map(|(_, v)| parse_value(v)).unwrap()?;
                let rest: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
                groups.entry(rest).or_default().push((le, *v));
            }
        }
        for (labels, mut buckets) in groups {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!("{family}{labels:?}: buckets are not cumulative"));
            }
            let last = buckets.last().unwrap();
            if last.0 != f64::INFINITY {
                return Err(format!("{family}{labels:?}: no +Inf bucket"));
            }
            let count = series.get(&(format!("{family}_count"), labels.clone())).copied();
            if count != Some(last.1) {
                return Err(format!("{family}{labels:?}: +Inf bucket {} != count {count:?}", last.1));
            }
            if !series.contains_key(&(format!("{family}_sum"), labels.clone())) {
                return Err(format!("{family}{labels:?}: no _sum"));
            }
        }
    }
    let mut families = types.clone();
    for (name, _) in series.keys() {
        families.entry(family_of(name, &types).to_string()).or_insert_with(|| "untyped".into());
    }
    Ok((series, families))
}

/// The family a sample name belongs to (histogram suffixes stripped when the base is typed).
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|k| k == "histogram" || k == "summary")
        {
            return base;
        }
    }
    name
}

fn value(series: &Series, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    l.sort();
    series.get(&(name.to_string(), l)).copied().unwrap_or(0.0)
}

fn scrape(addr: SocketAddr) -> Series {
    let (status, content_type, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    parse_exposition(&body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}"))
}

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
