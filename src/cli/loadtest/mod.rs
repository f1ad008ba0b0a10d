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
//! `--protocol rest` drives the same operations over Key Vault's own REST API (HTTPS to
//! `--rest-server`, HTTP/1.1 or h2, see [`rest`]) after the same set-up over gRPC; its baseline
//! is a bare hyper+rustls server answering the same JSON ([`rest_baseline`]), and `--with-grpc`
//! adds a gRPC run of the same load against the same broker for the REST ÷ gRPC ratio.
//!
//! Every response is checked: an unwrapped DEK must equal the one that was wrapped and a kid
//! must name the key version asked for; a mismatch is an error (`MISMATCH`). Afterwards the
//! tool deletes what it created (keys purged, vault deleted) unless `--keep`; a purge-protected
//! vault (engine-unwrap) stays, as its keys cannot be purged.

mod baseline;
mod drive;
mod report;
mod rest;
mod rest_baseline;
mod workload;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::error::{ArgError, CliError, status_text};
use super::render::Out;
use super::session::{Bearer, Connection, Dial, Session};
pub use baseline::BaselineError;
use baseline::BaselineProcess;
use drive::{Caller, grpc_lanes};
use report::{Ratios, Report};
pub use rest::{HttpVersion, RestError};
use workload::{Created, Workload};

/// The wrap algorithm of every request (the TDE engine's, too).
const ALGORITHM: &str = "RSA-OAEP-256";
/// A DEK: AES-256.
const DEK_BYTES: usize = 32;
/// The ciphertext of an RSA-2048 wrap, and the modulus length.
const WRAPPED_BYTES: usize = 256;
/// Keys × distinct ciphertexts held in memory (about 290 bytes each).
const MAX_PREWRAPPED: u64 = 2_000_000;
/// The kid every baseline answer names (as long as a broker's).
const BASELINE_KID: &str =
    "https://loadtest-baseline.vault.azure.net/keys/k0/0123456789abcdef0123456789abcdef";
/// The DEK every baseline UnwrapKey answers.
const BASELINE_DEK: [u8; DEK_BYTES] = [0x5a; DEK_BYTES];
/// Where `serve --rest-listen` listens unless told otherwise.
const DEFAULT_REST_SERVER: &str = "https://127.0.0.1:8443";

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
    /// The protocol of the measured requests: gRPC, or Key Vault's REST API over HTTPS (the
    /// set-up goes over gRPC either way). The CA trusted for REST is --ca-cert, by default the
    /// data directory's dev CA.
    #[arg(long, value_enum, default_value_t = Protocol::Grpc)]
    pub protocol: Protocol,
    /// REST: the broker's HTTPS listener (`serve --rest-listen`); a key of vault V is called at
    /// `https://V.vault.localhost:PORT/…` on this address.
    #[arg(long, value_name = "URL", default_value = DEFAULT_REST_SERVER)]
    pub rest_server: String,
    /// REST: HTTP/1.1 (one keep-alive connection per request in flight, as the Azure SDKs'
    /// pools do; --connections is not used) or HTTP/2 (--connections connections, multiplexed).
    #[arg(long, value_enum, default_value_t = HttpVersion::H1)]
    pub http: HttpVersion,
    /// REST: also run the same load over gRPC against the same broker, and print REST ÷ gRPC.
    #[arg(long)]
    pub with_grpc: bool,
    /// Internal: serve the REST baseline (a bare hyper+rustls server) on 127.0.0.1, print
    /// `listening ADDR CA`, stop when stdin ends.
    #[arg(long, hide = true, conflicts_with_all = ["baseline", "compare_baseline", "serve_baseline"])]
    pub serve_rest_baseline: bool,
    /// Also print, every TIME of the measurement, a line on stderr with the requests that
    /// completed in that interval: counts (errors by code) and latency percentiles.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub report_every: Option<Duration>,
}

/// The protocol of the measured requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// The broker's gRPC services.
    Grpc,
    /// Key Vault's REST API over HTTPS.
    Rest,
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
    /// The `--op` value.
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
fn parse_time(text: &str) -> Result<Duration, ArgError> {
    let bad = || ArgError::Time(text.to_string());
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

/// A positive rate of requests per second, at most ten million.
fn parse_rate(text: &str) -> Result<f64, ArgError> {
    match text.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 10_000_000.0 => Ok(r),
        _ => Err(ArgError::Rate(text.to_string())),
    }
}

/// Why a load test failed; `Display` is what the user reads after "error: ".
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    /// Reaching the broker, or printing the report, failed as it fails for the client commands.
    #[error(transparent)]
    Cli(#[from] CliError),
    /// `--duration 0`.
    #[error("--duration must be longer than 0")]
    ZeroDuration,
    /// `--keys × --distinct-ciphertexts` is more than the tool holds in memory.
    #[error(
        "--keys × --distinct-ciphertexts is {0}; at most {MAX_PREWRAPPED} ciphertexts are held in memory"
    )]
    TooManyCiphertexts(u64),
    /// Neither the token nor the client certificate names the caller.
    #[error(
        "cannot tell the caller's object id (no oid in the token, no principal in the client certificate)"
    )]
    NoCallerId(#[source] CliError),
    /// A set-up call failed: `CreateKey: PERMISSION_DENIED (ForbiddenByPolicy): …`.
    #[error("{call}: {}", status_text(.status))]
    Setup {
        /// The RPC, e.g. `CreateKey`.
        call: &'static str,
        /// What the broker answered.
        #[source]
        status: Box<tonic::Status>,
    },
    /// CreateKey answered without the key.
    #[error("CreateKey answered no key")]
    NoKeyInAnswer,
    /// The engine host's credential cannot be sent as an HTTP header value.
    #[error("the host credential cannot go into a header")]
    CredentialNotAHeader(#[source] tonic::metadata::errors::InvalidMetadataValue),
    /// Encrypting a DEK with a key's public half failed.
    #[error("wrapping a DEK locally: {0}")]
    Wrap(#[source] crate::crypto::CryptoError),
    /// A key's public half wrapped a DEK to an unexpected length.
    #[error("a wrapped DEK is {0} bytes, not {WRAPPED_BYTES}")]
    WrappedSize(usize),
    /// A set-up task panicked or was cancelled.
    #[error("{task} task: {source}")]
    Task {
        /// `key creation` or `wrapping`.
        task: &'static str,
        /// What tokio said.
        source: tokio::task::JoinError,
    },
    /// The baseline's address is not a URL tonic can dial.
    #[error("baseline address: {0}")]
    BaselineAddress(#[source] tonic::transport::Error),
    /// The baseline service could not be started.
    #[error("baseline: {0}")]
    Baseline(#[from] BaselineError),
    /// The REST run could not be set up.
    #[error("REST: {0}")]
    Rest(#[from] RestError),
    /// The REST baseline's first line carries no CA certificate.
    #[error("baseline: the REST baseline named no CA certificate")]
    BaselineCa,
    /// Measured requests failed (the report was printed).
    #[error("{label}: {failed} of {requests} measured requests failed")]
    Failed {
        /// `broker` or `baseline`.
        label: &'static str,
        /// Failed requests.
        failed: u64,
        /// Measured requests.
        requests: u64,
    },
}

/// A closure for `map_err` that names the set-up call a status answered.
fn setup_failed(call: &'static str) -> impl FnOnce(tonic::Status) -> LoadtestError {
    move |status| LoadtestError::Setup { call, status: Box::new(status) }
}

/// Runs `loadtest`; prints the report on stdout (progress on stderr). Fails when the set-up
/// fails or when any measured request failed (after printing the report).
pub async fn run(conn: Connection, args: LoadtestArgs) -> Result<(), LoadtestError> {
    if args.serve_baseline {
        return baseline::serve_until_stdin_ends().await;
    }
    if args.serve_rest_baseline {
        return rest_baseline::serve_until_stdin_ends().await;
    }
    if args.protocol == Protocol::Rest && args.op == Op::EngineUnwrap {
        return Err(RestError::EngineOverRest.into());
    }
    if args.duration.is_zero() {
        return Err(LoadtestError::ZeroDuration);
    }
    let cycle = u64::from(args.keys) * u64::from(args.distinct_ciphertexts);
    if cycle > MAX_PREWRAPPED {
        return Err(LoadtestError::TooManyCiphertexts(cycle));
    }
    if args.baseline {
        // Alone, the baseline's requests carry the caller's token when there is one (the same
        // bytes on the wire as against the broker), else a stand-in of a broker token's length.
        let bearer =
            Dial::new(&conn).ok().map(|d| d.bearer).filter(Bearer::is_some).unwrap_or_else(stand_in_bearer);
        let report = run_baseline(&args, bearer).await?;
        Out { json: report.json(), table: report.table() }.print(conn.output)?;
        return report.verdict();
    }
    let (broker, grpc, bearer) = run_broker(&conn, &args).await?;
    if !args.compare_baseline && grpc.is_none() {
        Out { json: broker.json(), table: broker.table() }.print(conn.output)?;
        return broker.verdict();
    }
    let mut json = json!({ "broker": broker.json() });
    let mut table = vec![broker.table()];
    let mut verdict = broker.verdict();
    if args.compare_baseline {
        let baseline = run_baseline(&args, bearer).await?;
        let ratios = Ratios::of("broker/baseline", &broker, &baseline);
        json["baseline"] = baseline.json();
        json["ratio"] = ratios.json();
        table.extend([baseline.table(), ratios.table()]);
        verdict = verdict.and(baseline.verdict());
    }
    if let Some(grpc) = grpc {
        let ratios = Ratios::of("rest/grpc", &broker, &grpc);
        json["grpc"] = grpc.json();
        json["rest_vs_grpc"] = ratios.json();
        table.extend([grpc.table(), ratios.table()]);
        verdict = verdict.and(grpc.verdict());
    }
    Out { json, table: table.join("\n") }.print(conn.output)?;
    verdict
}

/// The load every run of one invocation gets.
#[derive(Clone, Debug)]
struct Plan {
    /// `grpc`, `rest-h1` or `rest-h2`.
    protocol: &'static str,
    /// What each request does.
    op: Op,
    /// Requests in flight at most.
    concurrency: usize,
    /// Connections (HTTP/2, or HTTP/1.1 keep-alive).
    connections: usize,
    /// How long to measure.
    duration: Duration,
    /// How long to run before measuring.
    warmup: Duration,
    /// Open loop: requests per second.
    rate: Option<f64>,
    /// Per-interval report lines (`--report-every`).
    report_every: Option<Duration>,
}

impl Plan {
    /// The gRPC load `args` asks for, of `op`.
    fn new(args: &LoadtestArgs, op: Op) -> Self {
        Plan {
            protocol: "grpc",
            op,
            concurrency: args.concurrency as usize,
            connections: args.connections as usize,
            duration: args.duration,
            warmup: args.warmup,
            rate: args.rate,
            report_every: args.report_every.filter(|every| !every.is_zero()),
        }
    }

    /// The REST load `args` asks for, of `op`.
    fn rest(args: &LoadtestArgs, op: Op) -> Self {
        let concurrency = args.concurrency as usize;
        Plan {
            protocol: args.http.protocol(),
            connections: rest::connection_count(args.http, concurrency, args.connections as usize),
            ..Plan::new(args, op)
        }
    }
}

/// The `Authorization` header value `bearer` puts on a gRPC request, for REST requests.
fn rest_bearer(bearer: &Bearer) -> Option<http::HeaderValue> {
    bearer.request(()).metadata().clone().into_headers().remove(http::header::AUTHORIZATION)
}

/// The CA a REST run against the broker trusts: --ca-cert, else the data directory's dev CA.
fn rest_roots(conn: &Connection) -> Result<rustls::RootCertStore, RestError> {
    let path = match &conn.ca_cert {
        Some(path) => path.clone(),
        None => {
            let data_dir = conn
                .data_dir
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from(crate::config::DEFAULT_DATA_DIR));
            crate::tls::DevPki::in_data_dir(&data_dir).ca_cert
        }
    };
    rest::roots_from_file(path)
}

/// Drives `workload` over REST at `server` (trusting `roots`), as `label`.
async fn drive_rest(
    label: &'static str,
    server: &str,
    roots: rustls::RootCertStore,
    args: &LoadtestArgs,
    workload: Arc<Workload>,
    bearer: &Bearer,
) -> Result<Report, LoadtestError> {
    let connector = rest::Connector::new(server, roots, args.http, &workload, rest_bearer(bearer)).await?;
    let url = connector.url.clone();
    let lanes = rest::connect_lanes(connector, args.concurrency as usize, args.connections as usize).await?;
    let lanes: Vec<Vec<Caller>> =
        lanes.into_iter().map(|lane| lane.into_iter().map(Caller::Rest).collect()).collect();
    Ok(drive::drive(label, &url, lanes, workload, Plan::rest(args, args.op)).await)
}

/// The report (REST or gRPC as `--protocol` says), the gRPC report of the same load with
/// `--with-grpc`, and the `authorization` the requests carried (for the baseline).
async fn run_broker(
    conn: &Connection,
    args: &LoadtestArgs,
) -> Result<(Report, Option<Report>, Bearer), LoadtestError> {
    let dial = Dial::new(conn)?;
    let channels = dial.connect_many(args.connections as usize).await?;
    let url = dial.url.clone();
    // Set-up and clean-up go over the first connection (clap keeps --connections ≥ 1).
    let session = Session::over(dial, channels[0].clone());
    let mut created = Created::default();
    let workload = workload::setup(&session, args, &mut created).await;
    let result = match workload {
        Ok(workload) => {
            let bearer = workload.targets.first().map(|t| t.bearer.clone()).unwrap_or_default();
            let workload = Arc::new(workload);
            let grpc = |label| {
                let (lanes, workload) = (grpc_lanes(&channels, args.concurrency as usize), workload.clone());
                drive::drive(label, &url, lanes, workload, Plan::new(args, args.op))
            };
            match args.protocol {
                Protocol::Grpc => Ok((grpc("broker").await, None, bearer)),
                Protocol::Rest => match rest_roots(conn) {
                    Ok(roots) => {
                        let rest =
                            drive_rest("broker", &args.rest_server, roots, args, workload.clone(), &bearer);
                        match rest.await {
                            Ok(report) => {
                                let grpc =
                                    if args.with_grpc { Some(grpc("broker-grpc").await) } else { None };
                                Ok((report, grpc, bearer))
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e.into()),
                },
            }
        }
        Err(e) => Err(e),
    };
    if args.keep {
        created.describe_kept();
    } else {
        created.remove(&session).await;
    }
    result
}

/// A stand-in `authorization` value as long as a broker-issued bearer token (948 bytes).
fn stand_in_bearer() -> Bearer {
    Bearer::of_token(&"x".repeat(941)).unwrap_or_default()
}

/// Runs the bare service. Its requests carry `bearer` as the broker's did: the service ignores
/// it, but sending (HPACK never indexes `authorization`, so every request carries it in full)
/// and receiving it is the transport's cost, which the baseline must include to be the same
/// load on the wire.
async fn run_baseline(args: &LoadtestArgs, bearer: Bearer) -> Result<Report, LoadtestError> {
    if args.protocol == Protocol::Rest {
        return run_rest_baseline(args, bearer).await;
    }
    let server = BaselineProcess::start("--serve-baseline").await?;
    let dial = Dial::anonymous(format!("http://{}", server.addr)).map_err(LoadtestError::BaselineAddress)?;
    let channels = dial.connect_many(args.connections as usize).await?;
    let mut workload = workload::baseline(args);
    for t in &mut workload.targets {
        t.bearer = bearer.clone();
    }
    // The baseline has no engine service; UnwrapKey has the engine call's shape.
    let op = if args.op == Op::EngineUnwrap { Op::Unwrap } else { args.op };
    let lanes = grpc_lanes(&channels, args.concurrency as usize);
    drop(channels);
    let report = drive::drive("baseline", &dial.url, lanes, Arc::new(workload), Plan::new(args, op)).await;
    server.stop().await;
    Ok(report)
}

/// Runs the bare hyper+rustls server with the same REST load, `bearer` on every request.
async fn run_rest_baseline(args: &LoadtestArgs, bearer: Bearer) -> Result<Report, LoadtestError> {
    use base64::Engine as _;
    let server = BaselineProcess::start("--serve-rest-baseline").await?;
    let ca = base64::engine::general_purpose::STANDARD
        .decode(server.extra.trim())
        .map_err(|_| LoadtestError::BaselineCa)?;
    let roots = rest::roots_from_pem(std::path::PathBuf::from("the REST baseline's CA"), &ca)?;
    let workload = Arc::new(workload::baseline(args));
    let server_url = format!("https://{}", server.addr);
    let report = drive_rest("baseline", &server_url, roots, args, workload, &bearer).await;
    server.stop().await;
    report
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
    fn errors_read_as_the_user_knows_them() {
        assert_eq!(LoadtestError::ZeroDuration.to_string(), "--duration must be longer than 0");
        let status = tonic::Status::permission_denied("no");
        assert_eq!(setup_failed("CreateKey")(status).to_string(), "CreateKey: PERMISSION_DENIED: no");
        let failed = LoadtestError::Failed { label: "broker", failed: 2, requests: 9 };
        assert_eq!(failed.to_string(), "broker: 2 of 9 measured requests failed");
        assert_eq!(LoadtestError::from(BaselineError::NoStdout).to_string(), "baseline: no stdout");
    }
}
