//! The observability tests' harness: a broker serving gRPC and its admin listener (`/metrics`,
//! `/healthz`, `/readyz`) on ephemeral ports, on a manual clock, and a strict parser of the
//! Prometheus text exposition (every line checked, every family typed).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;

use tde_broker::config::{ClockKind, Config};
use tde_broker::grpc::proto::{self, key_vault_client::KeyVaultClient, vaults_client::VaultsClient};
use tde_broker::server::App;
use tonic::transport::Channel;

/// Metrics are process-wide: tests that count take turns.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A serving broker of this file.
pub struct Running {
    /// The gRPC address.
    pub addr: SocketAddr,
    pub http: Option<SocketAddr>,
    pub token: String,
    pub admin: String,
    pub channel: Channel,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub served: Option<tokio::task::JoinHandle<()>>,
    pub _dir: tempfile::TempDir,
}

/// A config on a manual clock in `dir` with the admin listener on an ephemeral port.
pub fn config(dir: &tempfile::TempDir) -> Config {
    let mut cfg = Config::for_data_dir(dir.path());
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(1_800_000_000);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.http_listen_explicit = true;
    cfg
}

pub async fn serve(app: App, dir: tempfile::TempDir) -> Running {
    let token = app.admin_token().expect("admin token");
    let admin = app.admin.object_id.clone();
    let http = app.http_addr();
    let (addr, tx, served) = super::spawn_serving(app).await;
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    Running { addr, http, token, admin, channel, stop: Some(tx), served: Some(served), _dir: dir }
}

pub async fn start(modify: impl FnOnce(&mut Config, &std::path::Path)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    modify(&mut cfg, dir.path());
    let app = App::open(cfg).await.expect("broker starts");
    serve(app, dir).await
}

impl Running {
    pub fn kv(&self) -> super::Kv {
        KeyVaultClient::with_interceptor(self.channel.clone(), super::bearer(&self.token))
    }
    /// Wraps `dek` under `key` `wraps` times (each an RSA operation), then unwraps the last
    /// ciphertext `unwraps` times, checking the plaintext each time.
    pub async fn wrap_then_unwrap(&self, key: &str, dek: &[u8], wraps: usize, unwraps: usize) {
        let mut wrapped = Vec::new();
        for _ in 0..wraps {
            let r = self.kv().wrap_key(super::crypto_req(key, "RSA-OAEP-256", dek)).await.expect("wrap");
            wrapped = r.into_inner().value;
        }
        for _ in 0..unwraps {
            let r =
                self.kv().unwrap_key(super::unwrap_req(key, "RSA-OAEP-256", &wrapped)).await.expect("unwrap");
            assert_eq!(r.into_inner().value, dek);
        }
    }
    pub fn vaults(&self) -> super::Vaults {
        VaultsClient::with_interceptor(self.channel.clone(), super::bearer(&self.token))
    }
    pub fn http(&self) -> SocketAddr {
        self.http.expect("the admin listener runs")
    }

    /// A vault where the admin holds every key permission, and an RSA key in it: its id.
    pub async fn vault_and_key(&self, vault: &str) -> String {
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
        super::kid(&bundle)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.served.take() {
            h.await.expect("serve ends");
        }
    }
}

/// A plain HTTP/1.1 GET: status, content type, body.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
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
pub type Labels = Vec<(String, String)>;
pub type Series = BTreeMap<(String, Labels), f64>;

pub fn metric_name_ok(n: &str) -> bool {
    let mut c = n.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

pub fn label_name_ok(n: &str) -> bool {
    let mut c = n.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

pub fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse::<f64>().map_err(|_| format!("bad value '{v}'")),
    }
}

/// `name{a="x",...} value`: the name, labels (sorted) and value.
pub fn parse_sample(line: &str) -> Result<(String, Labels, f64), String> {
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
pub fn parse_exposition(text: &str) -> Result<Series, String> {
    parse_families(text).map(|(series, _)| series)
}

/// [`parse_exposition`], also returning every family with its type: those with a TYPE line
/// (with or without samples), and `untyped` for samples without one.
pub fn parse_families(text: &str) -> Result<(Series, BTreeMap<String, String>), String> {
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
pub fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|k| k == "histogram" || k == "summary")
        {
            return base;
        }
    }
    name
}

pub fn value(series: &Series, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    l.sort();
    series.get(&(name.to_string(), l)).copied().unwrap_or(0.0)
}

pub fn scrape(addr: SocketAddr) -> Series {
    let (status, content_type, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    parse_exposition(&body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}"))
}
