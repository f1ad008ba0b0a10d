//! Memory and start-up of a real `tde-broker serve` process (the targets of docs/PERFORMANCE.md): a
//! data directory with `FOOTPRINT_KEYS` RSA-2048 keys (default 10,000), `FOOTPRINT_DEKS` distinct
//! DEKs (default 100,000) wrapped under them and each unwrapped once so the unwrap cache holds them
//! all; then the process's resident set (`VmRSS`, and its peak `VmHWM`) from `/proc`, and how long
//! a restarted broker takes until it answers a key read, and until it answers an unwrap.
//!
//! `cargo bench --bench footprint` (release build). No thresholds: it prints figures.
//! `FOOTPRINT_TOOL="heaptrack -o /tmp/broker"` runs the first broker under a profiler.
//!
//! The keys are one generated RSA-2048 private key imported under `FOOTPRINT_KEYS` names
//! (`FOOTPRINT_CREATE=1` generates each instead, which takes minutes): every key version is
//! sealed, stored and later unsealed on its own either way, so the broker's costs are the same.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tde_broker::grpc::proto::key_vault_client::KeyVaultClient;
use tde_broker::grpc::proto::vaults_client::VaultsClient;
use tde_broker::grpc::proto::{self};
use tokio::sync::Semaphore;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

const VAULT: &str = "footprint";
const ALG: &str = "RSA-OAEP-256";
const IN_FLIGHT: usize = 32;

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port()
}

struct Broker {
    child: Child,
    addr: String,
}

impl Broker {
    fn spawn(data: &Path, port: u16) -> Broker {
        Broker::spawn_under(&[], data, port)
    }

    /// Starts the broker under `tool` (a command prefix, e.g. `heaptrack -o /tmp/broker`), or
    /// directly when it is empty.
    fn spawn_under(tool: &[String], data: &Path, port: u16) -> Broker {
        let bin = env!("CARGO_BIN_EXE_tde-broker");
        let mut command = match tool.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--http-listen", "off", "--data-dir"])
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start tde-broker serve");
        Broker { child, addr: format!("http://127.0.0.1:{port}") }
    }

    /// `VmRSS` and `VmHWM` of the process, in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status (Linux only)");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/PID/status"))
        };
        if std::env::var("FOOTPRINT_VERBOSE").is_ok() {
            eprintln!(
                "  RssAnon {} kB, RssFile {} kB, RssShmem {} kB, threads {}",
                field("RssAnon:"),
                field("RssFile:"),
                field("RssShmem:"),
                field("Threads:")
            );
        }
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// SIGTERM, then wait: the broker shuts down gracefully.
    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone)]
struct Auth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

type Kv = KeyVaultClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

/// The admin token once the broker wrote it, and its object id.
fn admin(data: &Path) -> (Auth, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let token = loop {
        if let Ok(t) = std::fs::read_to_string(data.join("admin.token"))
            && !t.trim().is_empty()
        {
            break t.trim().to_string();
        }
        assert!(Instant::now() < deadline, "the broker wrote no admin.token");
        std::thread::sleep(Duration::from_millis(5));
    };
    let payload = token.split('.').nth(1).expect("a JWT");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url claims"),
    )
    .expect("JSON claims");
    let oid = claims["oid"].as_str().expect("an oid claim").to_string();
    (Auth(format!("Bearer {token}").parse().expect("ascii token")), oid)
}

/// Connects as soon as the port accepts; `None` while it does not.
async fn connect(addr: &str) -> Option<Channel> {
    Endpoint::from_shared(addr.to_string()).ok()?.tcp_nodelay(true).connect().await.ok()
}

/// Runs `f(i)` for `i in 0..n` with `IN_FLIGHT` calls at a time; panics on the first error.
async fn for_each<F, Fut>(n: usize, what: &str, f: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.expect("semaphore");
        let call = f(i);
        tasks.spawn(async move {
            let r = call.await;
            drop(permit);
            r
        });
        while let Some(done) = tasks.try_join_next() {
            done.expect("task").unwrap_or_else(|e| panic!("{what} #{i}: {e}"));
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task").unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    eprintln!("  {what}: {n} in {:.1} s", started.elapsed().as_secs_f64());
}

fn key_id(i: usize) -> String {
    format!("https://{VAULT}.vault.azure.net/keys/k{i}")
}

fn dek(i: usize) -> Vec<u8> {
    let mut d = [0u8; 32];
    d[..8].copy_from_slice(&(i as u64).to_le_bytes());
    d[8..16].copy_from_slice(b"footprnt");
    d.to_vec()
}

/// Fills a fresh broker: vault, keys, wrapped and unwrapped DEKs. Returns one wrapped DEK per key
/// for the restart probes.
async fn populate(
    kv: Kv,
    mut vaults: VaultsClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>,
    oid: &str,
    keys: usize,
    deks: usize,
) -> Vec<Vec<u8>> {
    vaults
        .create_vault(proto::CreateVaultRequest { name: VAULT.into(), ..Default::default() })
        .await
        .expect("create vault");
    vaults
        .set_access_policy(proto::SetAccessPolicyRequest {
            vault_name: VAULT.into(),
            object_id: oid.to_string(),
            key_permissions: vec!["all".into()],
        })
        .await
        .expect("access policy");

    let create = std::env::var("FOOTPRINT_CREATE").is_ok_and(|v| v == "1");
    let pkcs8 = tde_broker::crypto::generate_rsa_pkcs8(2048).expect("an RSA-2048 key");
    let pkcs8 = Arc::new(pkcs8.to_vec());
    for_each(keys, if create { "CreateKey RSA-2048" } else { "ImportKey RSA-2048" }, |i| {
        let mut kv = kv.clone();
        let pkcs8 = pkcs8.clone();
        async move {
            if create {
                kv.create_key(proto::CreateKeyRequest {
                    vault_name: VAULT.into(),
                    name: format!("k{i}"),
                    kty: "RSA".into(),
                    key_size: 2048,
                    ..Default::default()
                })
                .await?;
            } else {
                kv.import_key(proto::ImportKeyRequest {
                    vault_name: VAULT.into(),
                    name: format!("k{i}"),
                    pkcs8_der: pkcs8.to_vec(),
                    ..Default::default()
                })
                .await?;
            }
            Ok(())
        }
    })
    .await;

    let wrapped: Arc<std::sync::Mutex<Vec<Vec<u8>>>> =
        Arc::new(std::sync::Mutex::new(vec![Vec::new(); deks]));
    let out = wrapped.clone();
    for_each(deks, "WrapKey", move |i| {
        let mut kv = kv.clone();
        let out = out.clone();
        async move {
            let r = kv
                .wrap_key(proto::WrapKeyRequest {
                    key_id: key_id(i % keys),
                    algorithm: ALG.into(),
                    value: dek(i),
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.lock().expect("lock")[i] = r.value;
            Ok(())
        }
    })
    .await;
    let wrapped = Arc::new(std::mem::take(&mut *wrapped.lock().expect("lock")));
    wrapped.to_vec()
}

async fn unwrap_all(kv: &Kv, keys: usize, wrapped: &Arc<Vec<Vec<u8>>>, what: &str) {
    for_each(wrapped.len(), what, |i| {
        let mut kv = kv.clone();
        let wrapped = wrapped.clone();
        async move {
            let r = kv
                .unwrap_key(proto::UnwrapKeyRequest {
                    key_id: key_id(i % keys),
                    algorithm: ALG.into(),
                    value: wrapped[i].clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            if r.value != dek(i) {
                return Err(tonic::Status::data_loss(format!("DEK {i} came back different")));
            }
            Ok(())
        }
    })
    .await;
}

/// Starts the broker on `data` and times (key read answered, unwrap answered) from the spawn.
async fn timed_start(data: &Path, sample: &[u8]) -> (Broker, Duration, Duration) {
    let port = free_port();
    let t0 = Instant::now();
    let broker = Broker::spawn(data, port);
    let (auth, _) = admin(data);
    let channel = loop {
        if let Some(c) = connect(&broker.addr).await {
            break c;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the broker did not listen");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let mut kv = KeyVaultClient::with_interceptor(channel, auth);
    loop {
        match kv.get_key(proto::GetKeyRequest { key_id: key_id(0) }).await {
            Ok(_) => break,
            Err(e) if t0.elapsed() < Duration::from_secs(60) && e.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(1)).await
            }
            Err(e) => panic!("GetKey after restart: {e}"),
        }
    }
    let read = t0.elapsed();
    let r = kv
        .unwrap_key(proto::UnwrapKeyRequest {
            key_id: key_id(0),
            algorithm: ALG.into(),
            value: sample.to_vec(),
            ..Default::default()
        })
        .await
        .expect("unwrap after restart")
        .into_inner();
    assert_eq!(r.value, dek(0), "the DEK after restart");
    (broker, read, t0.elapsed())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter this bench has no use for.
    let keys = env_usize("FOOTPRINT_KEYS", 10_000).max(1);
    let deks = env_usize("FOOTPRINT_DEKS", 100_000).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("a temp dir");
        let data = dir.path().join("data");
        eprintln!("footprint: {keys} keys, {deks} DEKs, data in {}", data.display());

        // FOOTPRINT_TOOL: run the first broker under a profiler; its RSS figures are then the
        // profiler's, not the broker's.
        let tool: Vec<String> = std::env::var("FOOTPRINT_TOOL")
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect();
        let broker = Broker::spawn_under(&tool, &data, free_port());
        let (auth, oid) = admin(&data);
        let (base_rss, _) = {
            let t0 = Instant::now();
            let channel = loop {
                if let Some(c) = connect(&broker.addr).await {
                    break c;
                }
                assert!(t0.elapsed() < Duration::from_secs(60), "the broker did not listen");
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            drop(channel);
            broker.memory_kib()
        };
        let channel = connect(&broker.addr).await.expect("connect");
        let kv = KeyVaultClient::with_interceptor(channel.clone(), auth.clone());
        let vaults = VaultsClient::with_interceptor(channel, auth.clone());
        let wrapped = Arc::new(populate(kv.clone(), vaults, &oid, keys, deks).await);
        let (after_keys, _) = broker.memory_kib();
        unwrap_all(&kv, keys, &wrapped, "UnwrapKey, each DEK once (fills the unwrap cache)").await;
        let t = Instant::now();
        unwrap_all(&kv, keys, &wrapped, "UnwrapKey again (cache hits)").await;
        let hits = t.elapsed();
        let (rss, hwm) = broker.memory_kib();
        broker.stop();

        let mut reads = Vec::new();
        let mut unwraps = Vec::new();
        let mut restarted_rss = 0;
        for _ in 0..5 {
            let (b, read, unwrap) = timed_start(&data, &wrapped[0]).await;
            reads.push(read);
            unwraps.push(unwrap);
            restarted_rss = b.memory_kib().0;
            b.stop();
        }
        reads.sort();
        unwraps.sort();
        let db = std::fs::metadata(data.join("broker.sqlite")).map(|m| m.len()).unwrap_or(0);

        println!();
        println!("| figure | value |");
        println!("|---|---|");
        println!("| keys / DEKs | {keys} / {deks} |");
        println!("| store file | {:.1} MiB |", db as f64 / (1024.0 * 1024.0));
        println!("| RSS, empty broker | {} |", mib(base_rss));
        println!("| RSS, keys stored, none unsealed | {} |", mib(after_keys));
        println!("| RSS, every key unsealed, {deks} DEKs cached | {} |", mib(rss));
        println!("| peak RSS (VmHWM) | {} |", mib(hwm));
        println!("| RSS after a restart and one unwrap (one key unsealed) | {} |", mib(restarted_rss));
        println!(
            "| cache-hit unwrap of all {deks} DEKs ({IN_FLIGHT} in flight) | {:.0} /s |",
            deks as f64 / hits.as_secs_f64()
        );
        println!(
            "| restart → first key read (median of 5, min–max) | {:.0} ms ({:.0}–{:.0}) |",
            reads[2].as_secs_f64() * 1e3,
            reads[0].as_secs_f64() * 1e3,
            reads[4].as_secs_f64() * 1e3
        );
        println!(
            "| restart → first unwrap (median of 5, min–max) | {:.0} ms ({:.0}–{:.0}) |",
            unwraps[2].as_secs_f64() * 1e3,
            unwraps[0].as_secs_f64() * 1e3,
            unwraps[4].as_secs_f64() * 1e3
        );
    });
}
