//! `tde-broker loadtest`: drives the key-operation hot path of a running broker — or, with
//! `--baseline`, a bare tonic `KeyVault` service with the same message shapes that answers fixed
//! results — and reports throughput, errors by gRPC code and latency percentiles (HdrHistogram,
//! microsecond resolution). `--compare-baseline` runs both with the same load and prints the
//! ratios.
//!
//! Load: closed loop by default (`--concurrency` workers, one request in flight each). With
//! `--rate R`, open loop: a pacer thread releases one send slot every 1/R s, at most
//! `--concurrency` requests are in flight, and each latency is measured from the request's
//! *intended* send time, so time spent waiting for a free slot counts (coordinated omission is
//! accounted for); slots released but never used are reported as the backlog. Requests whose
//! (intended) send time falls in the warm-up are not recorded.
//!
//! Workload: a fresh vault `loadtest-…` with `--keys` RSA-2048 keys, the caller holding every
//! key permission; `--distinct-ciphertexts` DEKs per key are wrapped locally with each key's
//! public key (RSA-OAEP-256, as a client of the cloud does) and the requests cycle over them:
//! request `s` uses key `s % keys` and DEK `(s / keys) % distinct`, so the first
//! `keys × distinct` requests are the first use of their ciphertext (the cache-miss share
//! reported). For `engine-unwrap`, a user-assigned identity holding get/wrapKey/unwrapKey, one
//! CMK SQL server per key with a database `db1`, and each server's host credential.
//!
//! Every response is checked: an unwrapped DEK must equal the one that was wrapped and a kid
//! must name the key version asked for; a mismatch is an error (`MISMATCH`). Afterwards the
//! tool deletes what it created (keys purged, vault deleted) unless `--keep`; a purge-protected
//! vault (engine-unwrap) stays, as its keys cannot be purged.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use super::client::{Connection, Output};
use super::client::{error_chain, load_client_identity, server_url};
use crate::crypto::{Algorithm, random_bytes, rsa_encrypt_with_public};
use crate::grpc::proto;
use crate::grpc::proto::identities_client::IdentitiesClient;
use crate::grpc::proto::key_vault_client::KeyVaultClient;
use crate::grpc::proto::key_vault_server::{KeyVault, KeyVaultServer};
use crate::grpc::proto::servers_client::ServersClient;
use crate::grpc::proto::tde_engine_client::TdeEngineClient;
use crate::grpc::proto::vaults_client::VaultsClient;
use crate::server::MAX_MESSAGE_BYTES;

/// The wrap algorithm of every request (the TDE engine's, too).
const ALGORITHM: &str = "RSA-OAEP-256";
/// A DEK: AES-256.
const DEK_BYTES: usize = 32;
/// Size of the keys the tool creates.
const KEY_BITS: i32 = 2048;
/// The ciphertext of an RSA-2048 wrap, and the modulus length.
const WRAPPED_BYTES: usize = 256;
/// How long to wait for the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A request without an answer by then counts as DEADLINE_EXCEEDED (the run cannot hang).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys × distinct ciphertexts held in memory (about 290 bytes each).
const MAX_PREWRAPPED: u64 = 2_000_000;
/// DEKs wrapped per blocking task while pre-wrapping.
const WRAP_CHUNK: usize = 4096;
/// Keys created at once during set-up.
const SETUP_PARALLELISM: usize = 4;
/// Highest latency the histogram holds, µs (larger values are clamped to it).
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Resource group of the identity and servers of an engine-unwrap run.
const RESOURCE_GROUP: &str = "loadtest-rg";
/// The kid every baseline answer names (as long as a broker's).
const BASELINE_KID: &str =
    "https://loadtest-baseline.vault.azure.net/keys/k0/0123456789abcdef0123456789abcdef";
/// The DEK every baseline UnwrapKey answers.
const BASELINE_DEK: [u8; DEK_BYTES] = [0x5a; DEK_BYTES];

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// `tde-broker loadtest`
#[derive(Debug, Clone, clap::Args)]
pub struct LoadtestArgs {
    /// The operation to drive: KeyVault UnwrapKey, WrapKey or GetKey, or TdeEngine
    /// UnwrapDatabaseKey (the baseline answers engine-unwrap with its UnwrapKey).
    #[arg(long, value_enum, default_value_t = Op::Unwrap)]
    pub op: Op,
    /// Requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// Separate HTTP/2 connections; requests are spread over them round-robin.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub connections: u32,
    /// How long to measure, after the warm-up: 10s, 500ms, 2m, or seconds.
    #[arg(long, value_name = "TIME", default_value = "10s", value_parser = parse_time)]
    pub duration: Duration,
    /// How long to run before measuring.
    #[arg(long, value_name = "TIME", default_value = "1s", value_parser = parse_time)]
    pub warmup: Duration,
    /// RSA-2048 keys to create in a fresh `loadtest-…` vault; requests cycle over them.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub keys: u32,
    /// DEKs wrapped per key before the run; requests cycle over them, so the first use of each
    /// ciphertext misses an unwrap cache (the share is reported).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2_000_000))]
    pub distinct_ciphertexts: u32,
    /// Open loop at this total rate (requests/s); latency counts from each intended send time.
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Drive a bare tonic KeyVault service (fixed answers, no auth, no logic) that the tool
    /// starts in a process of its own, as the broker has, instead of the broker.
    #[arg(long, conflicts_with = "compare_baseline")]
    pub baseline: bool,
    /// Internal: serve the baseline on 127.0.0.1, print `listening ADDR`, stop when stdin ends
    /// (what `--baseline` starts in a child process).
    #[arg(long, hide = true, conflicts_with_all = ["baseline", "compare_baseline"])]
    pub serve_baseline: bool,
    /// Run against the broker, then the baseline with the same load; print both and the ratios.
    #[arg(long)]
    pub compare_baseline: bool,
    /// Leave the vault, keys, servers and identity the run created.
    #[arg(long)]
    pub keep: bool,
}

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    /// KeyVault.UnwrapKey of a pre-wrapped DEK.
    Unwrap,
    /// KeyVault.WrapKey of a DEK.
    Wrap,
    /// TdeEngine.UnwrapDatabaseKey of a pre-wrapped DEK, as an engine host.
    EngineUnwrap,
    /// KeyVault.GetKey of the key version.
    Get,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Unwrap => "unwrap",
            Op::Wrap => "wrap",
            Op::EngineUnwrap => "engine-unwrap",
            Op::Get => "get",
        }
    }

    /// Whether the op unwraps a pre-wrapped ciphertext (so an unwrap cache matters).
    fn unwraps(self) -> bool {
        matches!(self, Op::Unwrap | Op::EngineUnwrap)
    }
}

/// `10s`, `500ms`, `2m`, `1h`, `250us`, or a number of seconds.
fn parse_time(text: &str) -> Result<Duration, String> {
    let bad = || format!("'{text}' is not a duration: use e.g. 10s, 500ms, 2m or a number of seconds");
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.trim().parse().map_err(|_| bad())?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" => 60.0,
        "h" => 3_600.0,
        _ => return Err(bad()),
    };
    let secs = n * scale;
    if !secs.is_finite() || !(0.0..=31_536_000.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 10_000_000.0 => Ok(r),
        _ => Err(format!("'{text}' is not a rate: use requests per second, e.g. 5000")),
    }
}

// ---------------------------------------------------------------------------------------------
// Entry
// ---------------------------------------------------------------------------------------------

/// Runs `loadtest`; prints the report on stdout (progress on stderr). Fails when the set-up
/// fails or when any measured request failed (after printing the report).
pub async fn run(conn: Connection, args: LoadtestArgs) -> Result<(), String> {
    if args.serve_baseline {
        return serve_baseline_until_stdin_ends().await;
    }
    if args.duration.is_zero() {
        return Err("--duration must be longer than 0".to_string());
    }
    let cycle = u64::from(args.keys) * u64::from(args.distinct_ciphertexts);
    if cycle > MAX_PREWRAPPED {
        return Err(format!(
            "--keys × --distinct-ciphertexts is {cycle}; at most {MAX_PREWRAPPED} ciphertexts are held in memory"
        ));
    }
    if args.baseline {
        // Alone, the baseline's requests carry the caller's token when there is one (the same
        // bytes on the wire as against the broker), else a stand-in of a broker token's length.
        let bearer = Dial::new(&conn).ok().and_then(|d| d.bearer).or_else(stand_in_bearer);
        let report = run_baseline(&args, bearer).await?;
        emit(conn.output, report.json(), report.table())?;
        return report.verdict();
    }
    let (broker, bearer) = run_broker(&conn, &args).await?;
    if !args.compare_baseline {
        emit(conn.output, broker.json(), broker.table())?;
        return broker.verdict();
    }
    let baseline = run_baseline(&args, bearer).await?;
    let ratios = Ratios::of(&broker, &baseline);
    let json = json!({ "broker": broker.json(), "baseline": baseline.json(), "ratio": ratios.json() });
    let table = format!("{}\n{}\n{}", broker.table(), baseline.table(), ratios.table());
    emit(conn.output, json, table)?;
    broker.verdict().and(baseline.verdict())
}

fn emit(output: Output, json: Value, table: String) -> Result<(), String> {
    let text = match output {
        Output::Json => format!("{json:#}\n"),
        Output::Table => table,
    };
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("stdout: {e}")),
        _ => Ok(()),
    }
}

/// The load every run of one invocation gets.
#[derive(Clone, Debug)]
struct Plan {
    op: Op,
    concurrency: usize,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    rate: Option<f64>,
}

impl Plan {
    fn new(args: &LoadtestArgs, op: Op) -> Self {
        Plan {
            op,
            concurrency: args.concurrency as usize,
            connections: args.connections as usize,
            duration: args.duration,
            warmup: args.warmup,
            rate: args.rate,
        }
    }
}

/// The report, and the `authorization` metadata the requests carried (for the baseline).
async fn run_broker(
    conn: &Connection,
    args: &LoadtestArgs,
) -> Result<(Report, Option<MetadataValue<Ascii>>), String> {
    let dial = Dial::new(conn)?;
    let channels = dial.connect(args.connections as usize).await?;
    let mut created = Created::default();
    let workload = setup(&dial, &channels[0], args, &mut created).await;
    let result = match workload {
        Ok(workload) => {
            let bearer = workload.targets.first().and_then(|t| t.bearer.clone());
            let report =
                drive("broker", &dial.url, channels.clone(), workload, Plan::new(args, args.op)).await;
            Ok((report, bearer))
        }
        Err(e) => Err(e),
    };
    if args.keep {
        created.describe_kept();
    } else {
        created.remove(&dial, &channels[0]).await;
    }
    result
}

/// A stand-in `authorization` value as long as a broker-issued bearer token (948 bytes).
fn stand_in_bearer() -> Option<MetadataValue<Ascii>> {
    format!("Bearer {}", "x".repeat(941)).parse().ok()
}

/// Runs the bare service. Its requests carry `bearer` as the broker's did: the service ignores
/// it, but sending (HPACK never indexes `authorization`, so every request carries it in full)
/// and receiving it is the transport's cost, which the baseline must include to be the same
/// load on the wire.
async fn run_baseline(args: &LoadtestArgs, bearer: Option<MetadataValue<Ascii>>) -> Result<Report, String> {
    let server = BaselineProcess::start().await?;
    let url = format!("http://{}", server.addr);
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| format!("baseline address: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT);
    let channels = connect(&endpoint, &url, args.connections as usize).await?;
    let mut workload = baseline_workload(args);
    for t in &mut workload.targets {
        t.bearer = bearer.clone();
    }
    // The baseline has no engine service; UnwrapKey has the engine call's shape.
    let op = if args.op == Op::EngineUnwrap { Op::Unwrap } else { args.op };
    let report = drive("baseline", &url, channels, workload, Plan::new(args, op)).await;
    server.stop().await;
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// Connection (the client commands' rules; their `Session` is private to `client`, and a load
// test needs several channels)
// ---------------------------------------------------------------------------------------------

/// How to reach the broker and who we are.
struct Dial {
    endpoint: Endpoint,
    /// The URL dialled, for messages.
    url: String,
    /// `authorization` for set-up and key operations (`None`: the client certificate alone).
    bearer: Option<MetadataValue<Ascii>>,
    /// The caller's object id, for its access policy.
    object_id: Option<String>,
}

impl Dial {
    fn new(conn: &Connection) -> Result<Self, String> {
        let identity = client_identity(conn)?;
        // A client certificate without --token authenticates by itself.
        let token = match (&identity, &conn.token) {
            (Some(_), None) => None,
            _ => Some(load_token(conn)?),
        };
        let bearer = match &token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| "the token holds characters that cannot go into a header".to_string())?,
            ),
            None => None,
        };
        let object_id = match (&token, &identity) {
            (Some(t), _) => token_object_id(t),
            (None, Some((_, principal))) => principal.clone(),
            (None, None) => None,
        };
        let url = server_url(&conn.server);
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| format!("--server '{}' is not a valid address: {e}", conn.server))?
            .connect_timeout(CONNECT_TIMEOUT);
        if url.starts_with("https://") {
            endpoint = endpoint
                .tls_config(client_tls(conn, identity.map(|(id, _)| id))?)
                .map_err(|e| format!("TLS: {}", error_chain(&e)))?;
        } else if identity.is_some() {
            return Err("--client-cert needs TLS: point --server at https://host:port".to_string());
        }
        Ok(Dial { endpoint, url, bearer, object_id })
    }

    async fn connect(&self, n: usize) -> Result<Vec<Channel>, String> {
        connect(&self.endpoint, &self.url, n).await
    }

    fn request<T>(&self, message: T) -> Request<T> {
        with_bearer(message, self.bearer.as_ref())
    }
}

/// `n` channels, each its own HTTP/2 connection.
async fn connect(endpoint: &Endpoint, url: &str, n: usize) -> Result<Vec<Channel>, String> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = endpoint.connect().await.map_err(|e| {
            format!(
                "cannot reach the broker at {url}: {}; start it with `tde-broker serve` or point --server at it",
                error_chain(&e)
            )
        })?;
        channels.push(channel);
    }
    Ok(channels)
}

fn with_bearer<T>(message: T, bearer: Option<&MetadataValue<Ascii>>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(b) = bearer {
        request.metadata_mut().insert("authorization", b.clone());
    }
    request
}

// The client commands' own rules for reaching the broker, with their errors as text.
fn client_identity(
    conn: &Connection,
) -> Result<Option<(tonic::transport::Identity, Option<String>)>, String> {
    load_client_identity(conn).map_err(|e| e.to_string())
}

fn client_tls(
    conn: &Connection,
    identity: Option<tonic::transport::Identity>,
) -> Result<tonic::transport::ClientTlsConfig, String> {
    super::client::client_tls(conn, identity).map_err(|e| e.to_string())
}

fn load_token(conn: &Connection) -> Result<String, String> {
    super::client::load_token(conn).map_err(|e| e.to_string())
}

/// The `oid` claim (unverified: the broker checks the signature).
fn token_object_id(token: &str) -> Option<String> {
    super::client::token_object_id(token).ok()
}

/// A failed set-up call as text: `CreateKey: PERMISSION_DENIED (ForbiddenByPolicy): …`.
fn rpc(what: &'static str) -> impl FnOnce(Status) -> String {
    move |s| match crate::grpc::status::reason(&s) {
        Some(r) => format!("{what}: {} ({r}): {}", code_name(s.code()), s.message()),
        None => format!("{what}: {}: {}", code_name(s.code()), s.message()),
    }
}

/// The gRPC code as the spec spells it (`PERMISSION_DENIED`).
fn code_name(code: Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Workload
// ---------------------------------------------------------------------------------------------

/// One key version (and, for engine-unwrap, its server) with its pre-wrapped DEKs.
struct Target {
    /// Versioned kid the requests name and the answers must name.
    kid: String,
    /// Engine: the database (`db1`); empty otherwise.
    database: String,
    /// `authorization` of its requests (the host credential for engine-unwrap).
    bearer: Option<MetadataValue<Ascii>>,
    /// `distinct` ciphertexts of `WRAPPED_BYTES` each, back to back.
    wrapped: Vec<u8>,
    /// `distinct` DEKs of `DEK_BYTES` each, back to back.
    deks: Vec<u8>,
}

impl Target {
    fn wrapped(&self, i: usize) -> &[u8] {
        &self.wrapped[i * WRAPPED_BYTES..(i + 1) * WRAPPED_BYTES]
    }

    fn dek(&self, i: usize) -> &[u8] {
        &self.deks[i * DEK_BYTES..(i + 1) * DEK_BYTES]
    }

    fn request<T>(&self, message: T) -> Request<T> {
        with_bearer(message, self.bearer.as_ref())
    }
}

/// What the requests cycle over.
struct Workload {
    targets: Vec<Target>,
    distinct: usize,
}

impl Workload {
    /// Request `seq` uses key `seq % keys` and ciphertext `(seq / keys) % distinct`.
    fn pick(&self, seq: u64) -> (&Target, usize) {
        let keys = self.targets.len() as u64;
        let target = &self.targets[(seq % keys) as usize];
        (target, ((seq / keys) % self.distinct as u64) as usize)
    }

    /// Requests before this sequence number are the first use of their ciphertext.
    fn cycle(&self) -> u64 {
        self.targets.len() as u64 * self.distinct as u64
    }
}

/// What a run created, so it can be removed afterwards (best effort).
#[derive(Default)]
struct Created {
    vault: Option<String>,
    /// `https://{vault}.{suffix}` as CreateVault answered it.
    vault_uri: String,
    purge_protected: bool,
    keys: Vec<String>,
    servers: Vec<String>,
    identity: Option<String>,
}

impl Created {
    fn describe_kept(&self) {
        if let Some(vault) = &self.vault {
            eprintln!(
                "loadtest: kept vault {vault} ({} keys), {} servers{}",
                self.keys.len(),
                self.servers.len(),
                self.identity.as_ref().map(|i| format!(", identity {i}")).unwrap_or_default()
            );
        }
    }

    async fn remove(&self, dial: &Dial, channel: &Channel) {
        let warn = |what: &'static str, e: Status| eprintln!("loadtest: cleanup: {}", rpc_text(what, &e));
        let servers = ServersClient::new(channel.clone());
        for id in &self.servers {
            let request = dial.request(proto::DeleteServerRequest { server_id: id.clone() });
            if let Err(e) = servers.clone().delete_server(request).await {
                warn("DeleteServer", e);
            }
        }
        if let Some(resource_id) = &self.identity {
            let request =
                proto::DeleteUserAssignedIdentityRequest { resource_id: resource_id.clone(), force: true };
            if let Err(e) = IdentitiesClient::new(channel.clone())
                .delete_user_assigned_identity(dial.request(request))
                .await
            {
                warn("DeleteUserAssignedIdentity", e);
            }
        }
        let Some(vault) = &self.vault else { return };
        if self.purge_protected {
            eprintln!(
                "loadtest: vault {vault} stays: it is purge-protected (CMK needs that), so its keys cannot be purged"
            );
            return;
        }
        let kv = KeyVaultClient::new(channel.clone());
        for name in &self.keys {
            let key_id = format!("{}/keys/{name}", self.vault_uri.trim_end_matches('/'));
            if let Err(e) = kv.clone().delete_key(dial.request(proto::DeleteKeyRequest { key_id })).await {
                warn("DeleteKey", e);
                continue;
            }
            let request = proto::PurgeDeletedKeyRequest { vault_name: vault.clone(), name: name.clone() };
            if let Err(e) = kv.clone().purge_deleted_key(dial.request(request)).await {
                warn("PurgeDeletedKey", e);
            }
        }
        let request = proto::DeleteVaultRequest { name: vault.clone() };
        if let Err(e) = VaultsClient::new(channel.clone()).delete_vault(dial.request(request)).await {
            warn("DeleteVault", e);
        }
    }
}

fn rpc_text(what: &'static str, e: &Status) -> String {
    rpc(what)(e.clone())
}

/// Creates the vault, keys (and for engine-unwrap the identity, servers, databases and host
/// credentials) and pre-wraps the DEKs. Whatever it created is in `created`, also on failure.
async fn setup(
    dial: &Dial,
    channel: &Channel,
    args: &LoadtestArgs,
    created: &mut Created,
) -> Result<Workload, String> {
    let caller = dial.object_id.clone().ok_or_else(|| {
        "cannot tell the caller's object id (no oid in the token, no principal in the client certificate)"
            .to_string()
    })?;
    let engine = args.op == Op::EngineUnwrap;
    let vault = format!("loadtest-{}", hex::encode(random_bytes(4)));
    let keys = args.keys as usize;
    let distinct = args.distinct_ciphertexts as usize;
    eprintln!("loadtest: creating vault {vault} with {keys} RSA-{KEY_BITS} keys");
    let vaults = VaultsClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let v = vaults
        .clone()
        .create_vault(dial.request(proto::CreateVaultRequest {
            name: vault.clone(),
            enable_purge_protection: engine,
            ..Default::default()
        }))
        .await
        .map_err(rpc("CreateVault"))?
        .into_inner();
    created.vault = Some(vault.clone());
    created.vault_uri = v.uri;
    created.purge_protected = engine;
    vaults
        .clone()
        .set_access_policy(dial.request(proto::SetAccessPolicyRequest {
            vault_name: vault.clone(),
            object_id: caller,
            key_permissions: vec!["all".to_string()],
        }))
        .await
        .map_err(rpc("SetAccessPolicy"))?;

    // Keys, a few at a time (generation is the slow part, in the broker).
    let limit = Arc::new(Semaphore::new(SETUP_PARALLELISM));
    let mut tasks = JoinSet::new();
    for i in 0..keys {
        let kv = KeyVaultClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let request = dial.request(proto::CreateKeyRequest {
            vault_name: vault.clone(),
            name: format!("k{i}"),
            kty: "RSA".to_string(),
            key_size: KEY_BITS,
            ..Default::default()
        });
        let limit = limit.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            (i, kv.clone().create_key(request).await)
        });
    }
    let mut bundles: Vec<Option<proto::KeyBundle>> = vec![None; keys];
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.map_err(|e| format!("key creation task: {e}"))?;
        match result {
            Ok(b) => {
                created.keys.push(format!("k{i}"));
                bundles[i] = Some(b.into_inner());
            }
            Err(e) => failure = Some(rpc("CreateKey")(e)),
        }
    }
    if let Some(f) = failure {
        return Err(f);
    }
    let mut public = Vec::with_capacity(keys);
    for b in bundles {
        let key = b.and_then(|b| b.key).ok_or("CreateKey answered no key")?;
        public.push(key);
    }

    // Engine: identity, access policy, one CMK server per key, a database and a credential.
    let mut engine_targets: Vec<(String, String, MetadataValue<Ascii>)> = Vec::new();
    if engine {
        eprintln!("loadtest: creating an identity and {keys} CMK servers");
        let identity = IdentitiesClient::new(channel.clone())
            .create_user_assigned_identity(dial.request(proto::CreateUserAssignedIdentityRequest {
                resource_group: RESOURCE_GROUP.to_string(),
                name: format!("{vault}-umi"),
                ..Default::default()
            }))
            .await
            .map_err(rpc("CreateUserAssignedIdentity"))?
            .into_inner();
        created.identity = Some(identity.resource_id.clone());
        vaults
            .clone()
            .set_access_policy(dial.request(proto::SetAccessPolicyRequest {
                vault_name: vault.clone(),
                object_id: identity.principal_id.clone(),
                key_permissions: ["get", "wrapKey", "unwrapKey"].map(String::from).to_vec(),
            }))
            .await
            .map_err(rpc("SetAccessPolicy"))?;
        let servers = ServersClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        for (i, key) in public.iter().enumerate() {
            let unversioned = key.kid.rsplit_once('/').map(|(k, _)| k.to_string()).unwrap_or_default();
            let server = servers
                .clone()
                .create_server(dial.request(proto::CreateServerRequest {
                    resource_group: RESOURCE_GROUP.to_string(),
                    name: format!("{vault}-sql{i}"),
                    kind: proto::ServerKind::SqlServer as i32,
                    identity: Some(proto::ServerIdentity {
                        user_assigned_identity_ids: vec![identity.resource_id.clone()],
                        ..Default::default()
                    }),
                    key_id: unversioned,
                    ..Default::default()
                }))
                .await
                .map_err(rpc("CreateServer"))?
                .into_inner();
            created.servers.push(server.id.clone());
            servers
                .clone()
                .create_database(dial.request(proto::CreateDatabaseRequest {
                    server_id: server.id.clone(),
                    name: "db1".to_string(),
                }))
                .await
                .map_err(rpc("CreateDatabase"))?;
            let credential = servers
                .clone()
                .issue_host_credential(
                    dial.request(proto::IssueHostCredentialRequest { server_id: server.id.clone() }),
                )
                .await
                .map_err(rpc("IssueHostCredential"))?
                .into_inner();
            let bearer = format!("Bearer {}", credential.token)
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| "the host credential cannot go into a header".to_string())?;
            let kid = server.protector.map(|p| p.kid).filter(|k| !k.is_empty()).unwrap_or(key.kid.clone());
            engine_targets.push((kid, "db1".to_string(), bearer));
        }
    }

    // DEKs, wrapped locally with each key's public key, in chunks on the blocking pool.
    eprintln!("loadtest: wrapping {} DEKs ({distinct} per key) with RSA-OAEP-256", keys * distinct);
    let mut chunks = JoinSet::new();
    for (k, key) in public.iter().enumerate() {
        for (c, start) in (0..distinct).step_by(WRAP_CHUNK).enumerate() {
            let count = WRAP_CHUNK.min(distinct - start);
            let (n, e) = (key.n.clone(), key.e.clone());
            chunks.spawn_blocking(move || {
                let deks = random_bytes(count * DEK_BYTES);
                let mut wrapped = Vec::with_capacity(count * WRAPPED_BYTES);
                for dek in deks.chunks(DEK_BYTES) {
                    let ct = rsa_encrypt_with_public(&n, &e, Algorithm::RsaOaep256, dek)
                        .map_err(|e| format!("wrapping a DEK locally: {e}"))?;
                    if ct.len() != WRAPPED_BYTES {
                        return Err(format!("a wrapped DEK is {} bytes, not {WRAPPED_BYTES}", ct.len()));
                    }
                    wrapped.extend_from_slice(&ct);
                }
                Ok::<_, String>((k, c, deks, wrapped))
            });
        }
    }
    let mut pieces: BTreeMap<(usize, usize), (Vec<u8>, Vec<u8>)> = BTreeMap::new();
    while let Some(joined) = chunks.join_next().await {
        let (k, c, deks, wrapped) = joined.map_err(|e| format!("wrapping task: {e}"))??;
        pieces.insert((k, c), (deks, wrapped));
    }
    let mut targets: Vec<Target> = public
        .iter()
        .map(|key| Target {
            kid: key.kid.clone(),
            database: String::new(),
            bearer: dial.bearer.clone(),
            wrapped: Vec::with_capacity(distinct * WRAPPED_BYTES),
            deks: Vec::with_capacity(distinct * DEK_BYTES),
        })
        .collect();
    for ((k, _), (deks, wrapped)) in pieces {
        targets[k].deks.extend_from_slice(&deks);
        targets[k].wrapped.extend_from_slice(&wrapped);
    }
    for (target, (kid, database, bearer)) in targets.iter_mut().zip(engine_targets) {
        target.kid = kid;
        target.database = database;
        target.bearer = Some(bearer);
    }
    Ok(Workload { targets, distinct })
}

/// Same shapes as the broker's workload: `keys × distinct` ciphertexts of 256 bytes (random:
/// the baseline does not decrypt), every answer naming [`BASELINE_KID`] and [`BASELINE_DEK`].
fn baseline_workload(args: &LoadtestArgs) -> Workload {
    let distinct = args.distinct_ciphertexts as usize;
    let targets = (0..args.keys)
        .map(|_| Target {
            kid: BASELINE_KID.to_string(),
            database: "db1".to_string(),
            bearer: None,
            wrapped: random_bytes(distinct * WRAPPED_BYTES),
            deks: BASELINE_DEK.repeat(distinct),
        })
        .collect();
    Workload { targets, distinct }
}

// ---------------------------------------------------------------------------------------------
// Driving
// ---------------------------------------------------------------------------------------------

/// The clients of one connection.
#[derive(Clone)]
struct Clients {
    kv: KeyVaultClient<Channel>,
    engine: TdeEngineClient<Channel>,
}

/// Why a request failed.
enum Failure {
    /// A gRPC status other than OK (or the client-side timeout).
    Status(Code, String),
    /// OK, but the answer is not what was asked for.
    Mismatch(String),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Status(s.code(), s.message().to_string())
    }
}

fn expect(ok: bool, what: impl FnOnce() -> String) -> Result<(), Failure> {
    if ok { Ok(()) } else { Err(Failure::Mismatch(what())) }
}

/// Sends request `seq` and checks its answer.
async fn call(c: &mut Clients, w: &Workload, op: Op, seq: u64) -> Result<(), Failure> {
    let (t, i) = w.pick(seq);
    match op {
        Op::Unwrap => {
            let request = proto::UnwrapKeyRequest {
                key_id: t.kid.clone(),
                algorithm: ALGORITHM.to_string(),
                value: t.wrapped(i).to_vec(),
                ..Default::default()
            };
            let r = c.kv.unwrap_key(t.request(request)).await?.into_inner();
            expect(r.value == t.dek(i), || format!("UnwrapKey with {} returned another plaintext", t.kid))?;
            expect(r.kid == t.kid, || format!("UnwrapKey with {} answered kid {}", t.kid, r.kid))
        }
        Op::Wrap => {
            let request = proto::WrapKeyRequest {
                key_id: t.kid.clone(),
                algorithm: ALGORITHM.to_string(),
                value: t.dek(i).to_vec(),
                ..Default::default()
            };
            let r = c.kv.wrap_key(t.request(request)).await?.into_inner();
            expect(r.value.len() == WRAPPED_BYTES, || {
                format!("WrapKey with {} returned {} bytes, not {WRAPPED_BYTES}", t.kid, r.value.len())
            })?;
            expect(r.kid == t.kid, || format!("WrapKey with {} answered kid {}", t.kid, r.kid))
        }
        Op::Get => {
            let r =
                c.kv.get_key(t.request(proto::GetKeyRequest { key_id: t.kid.clone() })).await?.into_inner();
            let key = r.key.unwrap_or_default();
            expect(key.kid == t.kid, || format!("GetKey of {} answered kid {}", t.kid, key.kid))?;
            expect(!key.n.is_empty(), || format!("GetKey of {} answered no modulus", t.kid))
        }
        Op::EngineUnwrap => {
            let request = proto::UnwrapDatabaseKeyRequest {
                database: t.database.clone(),
                kid: t.kid.clone(),
                wrapped_dek: t.wrapped(i).to_vec(),
            };
            let r = c.engine.unwrap_database_key(t.request(request)).await?.into_inner();
            expect(r.dek == t.dek(i), || format!("UnwrapDatabaseKey with {} returned another DEK", t.kid))
        }
    }
}

/// State the workers, the pacer and the progress line share.
struct Shared {
    workload: Workload,
    op: Op,
    start: Instant,
    /// Requests whose (intended) send time is earlier are warm-up.
    measure_from: Instant,
    rate: Option<f64>,
    /// Open loop: send slots the pacer released (closed when the run ends).
    slots: Semaphore,
    /// Slots released so far.
    released: AtomicU64,
    /// Next request's sequence number.
    seq: AtomicU64,
    /// Closed loop: stop sending.
    stop: AtomicBool,
    /// Completed requests, warm-up included, for the progress line.
    ok: AtomicU64,
    failed: AtomicU64,
}

/// What one worker measured.
struct Tally {
    /// Latency of OK requests, µs.
    hist: Histogram<u64>,
    /// Open loop: how late each measured request left after its intended send time, µs (the
    /// generator's own delay, included in `hist`; large values mean the generator, not the
    /// server, is behind).
    lag: Histogram<u64>,
    ok: u64,
    /// Failed requests by gRPC code name (or MISMATCH).
    errors: BTreeMap<String, u64>,
    /// The first message seen for each code.
    first_message: BTreeMap<String, String>,
    /// Requests that were the first use of their ciphertext.
    first_use: u64,
    last_done: Option<Instant>,
}

/// An empty histogram of 1 µs .. `MAX_LATENCY_US`, 3 significant digits.
fn microseconds() -> Histogram<u64> {
    // ok: constant bounds that hdrhistogram accepts (1 ≤ low, 2·low ≤ high, 3 digits).
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

impl Tally {
    fn new() -> Self {
        Tally {
            hist: microseconds(),
            lag: microseconds(),
            ok: 0,
            errors: BTreeMap::new(),
            first_message: BTreeMap::new(),
            first_use: 0,
            last_done: None,
        }
    }

    fn record(&mut self, outcome: Result<(), Failure>, latency: Duration, first_use: bool, done: Instant) {
        match outcome {
            Ok(()) => {
                self.ok += 1;
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                self.hist.saturating_record(us.clamp(1, MAX_LATENCY_US));
            }
            Err(f) => {
                let (code, message) = match f {
                    Failure::Status(code, message) => (code_name(code), message),
                    Failure::Mismatch(message) => ("MISMATCH".to_string(), message),
                };
                *self.errors.entry(code.clone()).or_default() += 1;
                self.first_message.entry(code).or_insert(message);
            }
        }
        self.first_use += u64::from(first_use);
        self.last_done = Some(self.last_done.map_or(done, |d| d.max(done)));
    }

    fn merge(&mut self, other: Tally) {
        // ok: both histograms have the same bounds.
        let _ = self.hist.add(&other.hist);
        let _ = self.lag.add(&other.lag);
        self.ok += other.ok;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        for (code, message) in other.first_message {
            self.first_message.entry(code).or_insert(message);
        }
        self.first_use += other.first_use;
        self.last_done = match (self.last_done, other.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// One worker: one request in flight at a time.
async fn worker(shared: Arc<Shared>, mut clients: Vec<Clients>) -> Tally {
    let cycle = shared.workload.cycle();
    let connections = clients.len() as u64;
    let mut tally = Tally::new();
    loop {
        let (seq, intended) = match shared.rate {
            Some(rate) => {
                match shared.slots.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => break, // closed: the run is over
                }
                // Slot `seq` was due at start + seq/rate, whenever a worker got free for it.
                let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
                (seq, shared.start + Duration::from_secs_f64(seq as f64 / rate))
            }
            None => {
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                (shared.seq.fetch_add(1, Ordering::Relaxed), Instant::now())
            }
        };
        let sent = Instant::now();
        let c = &mut clients[(seq % connections) as usize];
        let outcome =
            match tokio::time::timeout(REQUEST_TIMEOUT, call(c, &shared.workload, shared.op, seq)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Failure::Status(
                    Code::DeadlineExceeded,
                    format!("no answer within {} s (client-side timeout)", REQUEST_TIMEOUT.as_secs()),
                )),
            };
        let done = Instant::now();
        let counter = if outcome.is_ok() { &shared.ok } else { &shared.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        if intended >= shared.measure_from {
            if shared.rate.is_some() {
                let lag =
                    u64::try_from(sent.saturating_duration_since(intended).as_micros()).unwrap_or(u64::MAX);
                tally.lag.saturating_record(lag.clamp(1, MAX_LATENCY_US));
            }
            tally.record(outcome, done.saturating_duration_since(intended), seq < cycle, done);
        }
    }
    tally
}

/// Open loop: releases slot `i` at `start + i/rate` until `end` (a thread, for sub-millisecond
/// pacing; tokio's timer ticks in milliseconds).
fn pace(shared: Arc<Shared>, rate: f64, end: Instant) {
    let mut released: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= end || shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let due = (now.saturating_duration_since(shared.start).as_secs_f64() * rate).floor() as u64 + 1;
        if due > released {
            shared.slots.add_permits(usize::try_from(due - released).unwrap_or(usize::MAX >> 4));
            released = due;
            shared.released.store(released, Ordering::Relaxed);
        }
        let next = shared.start + Duration::from_secs_f64(released as f64 / rate);
        let wait = next
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_micros(20), Duration::from_millis(1));
        std::thread::sleep(wait);
    }
}

/// Runs one measurement: warm-up, then `duration`, with a progress line each second.
async fn drive(
    label: &'static str,
    url: &str,
    channels: Vec<Channel>,
    workload: Workload,
    plan: Plan,
) -> Report {
    let clients: Vec<Clients> = channels
        .iter()
        .map(|ch| Clients {
            kv: KeyVaultClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
            engine: TdeEngineClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
        .collect();
    drop(channels);
    let (keys, distinct) = (workload.targets.len(), workload.distinct);
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let shared = Arc::new(Shared {
        workload,
        op: plan.op,
        start,
        measure_from,
        rate: plan.rate,
        slots: Semaphore::new(0),
        released: AtomicU64::new(0),
        seq: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let pacer = plan.rate.map(|rate| {
        let shared = shared.clone();
        std::thread::spawn(move || pace(shared, rate, end))
    });
    let mut workers = JoinSet::new();
    for _ in 0..plan.concurrency {
        workers.spawn(worker(shared.clone(), clients.clone()));
    }
    drop(clients);
    let interrupted = progress(label, &plan, &shared, end).await;
    let stopped = Instant::now();
    shared.stop.store(true, Ordering::Relaxed);
    shared.slots.close();
    if let Some(pacer) = pacer {
        let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    }
    let mut tally = Tally::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(t) => tally.merge(t),
            Err(e) => eprintln!("loadtest: a worker failed: {e}"),
        }
    }
    let backlog = plan
        .rate
        .map(|_| shared.released.load(Ordering::Relaxed).saturating_sub(shared.seq.load(Ordering::Relaxed)));
    let measured_until = tally.last_done.map_or(stopped, |d| d.max(stopped));
    Report {
        label,
        server: url.to_string(),
        measured: measured_until.saturating_duration_since(measure_from),
        plan,
        keys,
        distinct,
        tally,
        backlog,
        interrupted,
    }
}

/// Prints a progress line each second until `end` (false) or Ctrl-C (true).
async fn progress(label: &str, plan: &Plan, shared: &Shared, end: Instant) -> bool {
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at((shared.start + second).into(), second);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let finished = tokio::time::sleep_until(end.into());
    tokio::pin!(finished);
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(interrupt);
    let (mut last_ok, mut last_at) = (0u64, shared.start);
    loop {
        tokio::select! {
            _ = &mut finished => return false,
            _ = &mut interrupt => {
                eprintln!("loadtest: interrupted; reporting what was measured");
                return true;
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let ok = shared.ok.load(Ordering::Relaxed);
                let per_second = (ok - last_ok) as f64 / now.saturating_duration_since(last_at).as_secs_f64();
                let phase = if last_at < shared.measure_from { "warm-up" } else { "measuring" };
                let backlog = match plan.rate {
                    Some(_) => format!(
                        "  backlog {}",
                        shared.released.load(Ordering::Relaxed).saturating_sub(shared.seq.load(Ordering::Relaxed))
                    ),
                    None => String::new(),
                };
                eprintln!(
                    "loadtest {label} {} {:>4.0}s {phase:<9} {per_second:>9.0} ok/s  errors {}{backlog}",
                    plan.op.name(),
                    now.saturating_duration_since(shared.start).as_secs_f64(),
                    shared.failed.load(Ordering::Relaxed),
                );
                (last_ok, last_at) = (ok, now);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------------

/// The result of one run.
struct Report {
    label: &'static str,
    server: String,
    plan: Plan,
    keys: usize,
    distinct: usize,
    /// From the end of the warm-up to the last recorded answer (or the stop).
    measured: Duration,
    tally: Tally,
    /// Open loop: slots released but never sent (every in-flight slot was busy).
    backlog: Option<u64>,
    interrupted: bool,
}

impl Report {
    fn errors(&self) -> u64 {
        self.tally.errors.values().sum()
    }

    fn requests(&self) -> u64 {
        self.tally.ok + self.errors()
    }

    fn throughput(&self) -> f64 {
        let secs = self.measured.as_secs_f64();
        if secs > 0.0 { self.tally.ok as f64 / secs } else { 0.0 }
    }

    /// The share of measured requests that were the first use of their ciphertext: what an
    /// unbounded unwrap cache misses (a bounded one, or a TTL, may miss more). The baseline
    /// unwraps nothing, so it has none.
    fn cache_miss_share(&self) -> Option<f64> {
        (self.label != "baseline" && self.plan.op.unwraps() && self.requests() > 0)
            .then(|| self.tally.first_use as f64 / self.requests() as f64)
    }

    /// Latency percentile in µs (0 when nothing succeeded).
    fn p(&self, quantile: f64) -> u64 {
        if self.tally.ok == 0 { 0 } else { self.tally.hist.value_at_quantile(quantile) }
    }

    fn max(&self) -> u64 {
        if self.tally.ok == 0 { 0 } else { self.tally.hist.max() }
    }

    fn json(&self) -> Value {
        let h = &self.tally.hist;
        let has = self.tally.ok > 0;
        json!({
            "target": self.label,
            "server": self.server,
            "op": self.plan.op.name(),
            "algorithm": ALGORITHM,
            "load": {
                "mode": if self.plan.rate.is_some() { "open" } else { "closed" },
                "rate": self.plan.rate,
                "concurrency": self.plan.concurrency,
                "connections": self.plan.connections,
                "duration_s": self.plan.duration.as_secs_f64(),
                "warmup_s": self.plan.warmup.as_secs_f64(),
            },
            "keys": self.keys,
            "distinct_ciphertexts": self.distinct,
            "cache_miss_share": self.cache_miss_share(),
            "measured_s": self.measured.as_secs_f64(),
            "requests": self.requests(),
            "ok": self.tally.ok,
            "throughput_ok_per_s": self.throughput(),
            "errors": {
                "total": self.errors(),
                "by_code": self.tally.errors,
                "first_message": self.tally.first_message,
            },
            "latency_us": {
                "min": if has { h.min() } else { 0 },
                "mean": if has { h.mean() } else { 0.0 },
                "p50": self.p(0.5),
                "p90": self.p(0.9),
                "p99": self.p(0.99),
                "p99_9": self.p(0.999),
                "max": self.max(),
            },
            "send_lag_us": self.plan.rate.map(|_| {
                let lag = &self.tally.lag;
                let at = |q| if lag.is_empty() { 0 } else { lag.value_at_quantile(q) };
                json!({ "p50": at(0.5), "p99": at(0.99), "max": if lag.is_empty() { 0 } else { lag.max() } })
            }),
            "backlog": self.backlog,
            "interrupted": self.interrupted,
        })
    }

    fn table(&self) -> String {
        let plan = &self.plan;
        let mut workload = format!("{} ({ALGORITHM}), {} keys", plan.op.name(), self.keys);
        if plan.op != Op::Get {
            workload.push_str(&format!(" × {} DEKs", self.distinct));
        }
        let load = match plan.rate {
            Some(rate) => format!("open loop at {rate}/s, at most {} in flight", plan.concurrency),
            None => format!("closed loop, {} in flight", plan.concurrency),
        };
        let mut rows = vec![
            (self.label.to_string(), self.server.clone()),
            ("op".to_string(), workload),
            (
                "load".to_string(),
                format!(
                    "{load} over {} connections; {:.2} s measured after {:.2} s warm-up{}",
                    plan.connections,
                    self.measured.as_secs_f64(),
                    plan.warmup.as_secs_f64(),
                    if self.interrupted { " (interrupted)" } else { "" }
                ),
            ),
            ("ok".to_string(), format!("{} ({:.0}/s)", self.tally.ok, self.throughput())),
        ];
        let errors = if self.tally.errors.is_empty() {
            "0".to_string()
        } else {
            let by_code: Vec<String> = self.tally.errors.iter().map(|(c, n)| format!("{c} {n}")).collect();
            let first: Vec<String> =
                self.tally.first_message.iter().map(|(c, m)| format!("{c}: {m}")).collect();
            format!("{} ({}); first: {}", self.errors(), by_code.join(", "), first.join("; "))
        };
        rows.push(("errors".to_string(), errors));
        rows.push((
            "latency µs".to_string(),
            format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                self.p(0.5),
                self.p(0.9),
                self.p(0.99),
                self.p(0.999),
                self.max()
            ),
        ));
        if let Some(share) = self.cache_miss_share() {
            rows.push((
                "cache-miss share".to_string(),
                format!("{:.2}% (first use of a ciphertext)", share * 100.0),
            ));
        }
        if let Some(backlog) = self.backlog {
            rows.push(("backlog".to_string(), format!("{backlog} slots never sent (all in flight)")));
        }
        if self.plan.rate.is_some() && !self.tally.lag.is_empty() {
            let lag = &self.tally.lag;
            rows.push((
                "send lag µs".to_string(),
                format!(
                    "p50 {}  p99 {}  max {} (intended send time → sent; part of the latency)",
                    lag.value_at_quantile(0.5),
                    lag.value_at_quantile(0.99),
                    lag.max()
                ),
            ));
        }
        fields(&rows)
    }

    fn verdict(&self) -> Result<(), String> {
        match self.errors() {
            0 => Ok(()),
            n => Err(format!("{}: {n} of {} measured requests failed", self.label, self.requests())),
        }
    }
}

/// Broker ÷ baseline.
struct Ratios {
    throughput: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
}

impl Ratios {
    fn of(broker: &Report, baseline: &Report) -> Self {
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        Ratios {
            throughput: ratio(broker.throughput(), baseline.throughput()),
            p50: ratio(broker.p(0.5) as f64, baseline.p(0.5) as f64),
            p99: ratio(broker.p(0.99) as f64, baseline.p(0.99) as f64),
        }
    }

    fn json(&self) -> Value {
        json!({ "throughput": self.throughput, "p50": self.p50, "p99": self.p99 })
    }

    fn table(&self) -> String {
        let f = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.3}"));
        fields(&[(
            "broker/baseline".to_string(),
            format!("throughput {}  p50 {}  p99 {}", f(self.throughput), f(self.p50), f(self.p99)),
        )])
    }
}

/// `field  value` lines with the values aligned.
fn fields(rows: &[(String, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}

// ---------------------------------------------------------------------------------------------
// Baseline
// ---------------------------------------------------------------------------------------------

/// The bare service: the broker's message shapes, fixed answers, no auth and no logic.
struct Baseline {
    unwrapped: proto::KeyOperationResult,
    wrapped: proto::KeyOperationResult,
    bundle: proto::KeyBundle,
}

impl Baseline {
    fn new() -> Self {
        let ops = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"];
        Baseline {
            unwrapped: proto::KeyOperationResult {
                kid: BASELINE_KID.to_string(),
                value: BASELINE_DEK.to_vec(),
                ..Default::default()
            },
            wrapped: proto::KeyOperationResult {
                kid: BASELINE_KID.to_string(),
                value: vec![0xa5; WRAPPED_BYTES],
                ..Default::default()
            },
            bundle: proto::KeyBundle {
                key: Some(proto::JsonWebKey {
                    kid: BASELINE_KID.to_string(),
                    kty: "RSA".to_string(),
                    key_ops: ops.map(String::from).to_vec(),
                    n: vec![0xc3; WRAPPED_BYTES],
                    e: vec![1, 0, 1],
                }),
                attributes: Some(proto::KeyAttributes {
                    enabled: Some(true),
                    created: 1_800_000_000,
                    updated: 1_800_000_000,
                    recoverable_days: 90,
                    recovery_level: "Recoverable+Purgeable".to_string(),
                    ..Default::default()
                }),
                tags: Default::default(),
            },
        }
    }
}

fn not_in_baseline<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("the load-test baseline answers UnwrapKey, WrapKey and GetKey only"))
}

#[tonic::async_trait]
impl KeyVault for Baseline {
    async fn unwrap_key(
        &self,
        _: Request<proto::UnwrapKeyRequest>,
    ) -> Result<Response<proto::KeyOperationResult>, Status> {
        Ok(Response::new(self.unwrapped.clone()))
    }

    async fn wrap_key(
        &self,
        _: Request<proto::WrapKeyRequest>,
    ) -> Result<Response<proto::KeyOperationResult>, Status> {
        Ok(Response::new(self.wrapped.clone()))
    }

    async fn get_key(&self, _: Request<proto::GetKeyRequest>) -> Result<Response<proto::KeyBundle>, Status> {
        Ok(Response::new(self.bundle.clone()))
    }

    async fn create_key(
        &self,
        _: Request<proto::CreateKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        not_in_baseline()
    }

    async fn import_key(
        &self,
        _: Request<proto::ImportKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        not_in_baseline()
    }

    async fn list_keys(
        &self,
        _: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        not_in_baseline()
    }

    async fn list_key_versions(
        &self,
        _: Request<proto::ListKeyVersionsRequest>,
    ) -> Result<Response<proto::ListKeyVersionsResponse>, Status> {
        not_in_baseline()
    }

    async fn update_key(
        &self,
        _: Request<proto::UpdateKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        not_in_baseline()
    }

    async fn rotate_key(
        &self,
        _: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        not_in_baseline()
    }

    async fn delete_key(
        &self,
        _: Request<proto::DeleteKeyRequest>,
    ) -> Result<Response<proto::DeletedKeyBundle>, Status> {
        not_in_baseline()
    }

    async fn get_deleted_key(
        &self,
        _: Request<proto::GetDeletedKeyRequest>,
    ) -> Result<Response<proto::DeletedKeyBundle>, Status> {
        not_in_baseline()
    }

    async fn list_deleted_keys(
        &self,
        _: Request<proto::ListDeletedKeysRequest>,
    ) -> Result<Response<proto::ListDeletedKeysResponse>, Status> {
        not_in_baseline()
    }

    async fn recover_deleted_key(
        &self,
        _: Request<proto::RecoverDeletedKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        not_in_baseline()
    }

    async fn purge_deleted_key(
        &self,
        _: Request<proto::PurgeDeletedKeyRequest>,
    ) -> Result<Response<proto::PurgeDeletedKeyResponse>, Status> {
        not_in_baseline()
    }

    async fn backup_key(
        &self,
        _: Request<proto::BackupKeyRequest>,
    ) -> Result<Response<proto::BackupKeyResponse>, Status> {
        not_in_baseline()
    }

    async fn restore_key(
        &self,
        _: Request<proto::RestoreKeyRequest>,
    ) -> Result<Response<proto::KeyBundle>, Status> {
        not_in_baseline()
    }

    async fn encrypt(
        &self,
        _: Request<proto::EncryptRequest>,
    ) -> Result<Response<proto::KeyOperationResult>, Status> {
        not_in_baseline()
    }

    async fn decrypt(
        &self,
        _: Request<proto::DecryptRequest>,
    ) -> Result<Response<proto::KeyOperationResult>, Status> {
        not_in_baseline()
    }
}

/// The baseline in a child process (this executable with `loadtest --serve-baseline`): a
/// process of its own, as the broker is, so both comparisons pay the same cross-process
/// wake-ups and neither shares an allocator or a scheduler with the load generator.
struct BaselineProcess {
    addr: SocketAddr,
    child: tokio::process::Child,
}

impl BaselineProcess {
    async fn start() -> Result<Self, String> {
        use tokio::io::AsyncBufReadExt as _;
        let exe = std::env::current_exe().map_err(|e| format!("baseline: this executable: {e}"))?;
        let mut child = tokio::process::Command::new(&exe)
            .args(["loadtest", "--serve-baseline"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!("baseline: cannot start {} loadtest --serve-baseline: {e}", exe.display())
            })?;
        let stdout = child.stdout.take().ok_or("baseline: no stdout")?;
        let mut line = String::new();
        let read =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::io::BufReader::new(stdout).read_line(&mut line))
                .await
                .map_err(|_| "baseline: the server process did not say where it listens".to_string())?;
        read.map_err(|e| format!("baseline: reading the server process: {e}"))?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("baseline: the server process said {line:?}"))?;
        Ok(BaselineProcess { addr, child })
    }

    /// Closes the child's stdin (it stops serving) and waits for it.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// `loadtest --serve-baseline`: the child side of [`BaselineProcess`].
async fn serve_baseline_until_stdin_ends() -> Result<(), String> {
    use tokio::io::AsyncReadExt as _;
    let server = BaselineServer::start()?;
    println!("listening {}", server.addr);
    std::io::stdout().flush().map_err(|e| format!("stdout: {e}"))?;
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
    server.stop();
    Ok(())
}

/// The baseline serving on 127.0.0.1 on a runtime of its own.
struct BaselineServer {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl BaselineServer {
    fn start() -> Result<Self, String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("baseline: cannot listen on 127.0.0.1: {e}"))?;
        let addr = listener.local_addr().map_err(|e| format!("baseline: {e}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("loadtest-baseline")
            .enable_all()
            .build()
            .map_err(|e| format!("baseline: cannot start a runtime: {e}"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("loadtest-baseline".to_string())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return eprintln!("loadtest: baseline: {e}"),
                    };
                    // A bare tonic server as `Server::serve` sets one up: TCP_NODELAY on every
                    // accepted connection (without it, answers that h2 writes in two pieces wait
                    // for the client's delayed ACK, ~40 ms).
                    let served = tonic::transport::Server::builder()
                        .add_service(
                            KeyVaultServer::new(Baseline::new()).max_decoding_message_size(MAX_MESSAGE_BYTES),
                        )
                        .serve_with_incoming_shutdown(
                            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                            async {
                                let _ = stopped.await;
                            },
                        )
                        .await;
                    if let Err(e) = served {
                        eprintln!("loadtest: baseline server: {}", error_chain(&e));
                    }
                });
            })
            .map_err(|e| format!("baseline: cannot start a thread: {e}"))?;
        Ok(BaselineServer { addr, stop })
    }

    /// Asks the server to stop; its thread ends once the connections are gone.
    fn stop(self) {
        let _ = self.stop.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_take_units_and_plain_seconds() {
        assert_eq!(parse_time("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_time("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_time("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_time("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_time("0s"), Ok(Duration::ZERO));
        for bad in ["", "-1s", "10x", "s", "1e400"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert!(parse_rate("0").is_err() && parse_rate("-5").is_err() && parse_rate("NaN").is_err());
        assert_eq!(parse_rate("2500"), Ok(2500.0));
    }

    #[test]
    fn code_names_are_the_specs() {
        assert_eq!(code_name(Code::PermissionDenied), "PERMISSION_DENIED");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }

    #[test]
    fn requests_cycle_over_keys_then_ciphertexts() {
        let target = |kid: &str| Target {
            kid: kid.to_string(),
            database: String::new(),
            bearer: None,
            wrapped: vec![0; 3 * WRAPPED_BYTES],
            deks: vec![0; 3 * DEK_BYTES],
        };
        let w = Workload { targets: vec![target("a"), target("b")], distinct: 3 };
        let picks: Vec<(String, usize)> =
            (0..8).map(|s| w.pick(s)).map(|(t, i)| (t.kid.clone(), i)).collect();
        let expected = [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 0), ("b", 0)];
        assert_eq!(picks, expected.map(|(k, i)| (k.to_string(), i)));
        // Every (key, ciphertext) pair is used once in the first `cycle` requests.
        assert_eq!(w.cycle(), 6);
    }

    #[test]
    fn tallies_merge_counts_and_latencies() {
        let mut a = Tally::new();
        let now = Instant::now();
        a.record(Ok(()), Duration::from_micros(100), true, now);
        a.record(Err(Failure::Mismatch("x".into())), Duration::from_micros(5), false, now);
        let mut b = Tally::new();
        b.record(Ok(()), Duration::from_micros(300), false, now);
        b.record(Err(Failure::Status(Code::Unavailable, "down".into())), Duration::ZERO, false, now);
        b.record(Err(Failure::Mismatch("y".into())), Duration::ZERO, false, now);
        a.merge(b);
        assert_eq!(a.ok, 2);
        assert_eq!(a.first_use, 1);
        assert_eq!(a.errors, BTreeMap::from([("MISMATCH".into(), 2), ("UNAVAILABLE".into(), 1)]));
        assert_eq!(a.first_message["MISMATCH"], "x");
        assert_eq!(a.hist.len(), 2);
        assert!(a.hist.max() >= 300 && a.hist.min() <= 100);
    }
}
