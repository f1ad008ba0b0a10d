//! The `tde-broker` command line: `serve` runs the broker; the other subcommands are gRPC
//! clients of a running broker.

pub mod client;
pub mod loadtest;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ServeArgs};
use crate::server::App;

/// tde-broker: a local Azure Key Vault + SQL TDE (customer-managed keys) over gRPC.
#[derive(Debug, Parser)]
#[command(name = "tde-broker", version, about, long_about = None)]
pub struct Cli {
    /// Where and how client subcommands reach the broker.
    #[command(flatten)]
    pub connection: client::Connection,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the broker with embedded defaults (gRPC on 127.0.0.1:50051, data in ./tde-broker-data).
    Serve(ServeArgs),
    /// Vaults: create, show, list, update, delete, network rules and private endpoints.
    #[command(subcommand)]
    Vault(client::VaultCmd),
    /// Subnets: the address ranges that VNet rules and private endpoints stand for.
    #[command(subcommand)]
    Subnet(client::SubnetCmd),
    /// Keys: lifecycle, backup/restore and crypto.
    #[command(subcommand)]
    Key(client::KeyCmd),
    /// Access policies of a vault: who may do which key operations.
    #[command(subcommand)]
    Policy(client::PolicyCmd),
    /// Role assignments (RBAC) for the control plane and RBAC vaults.
    #[command(subcommand)]
    Role(client::RoleCmd),
    /// User-assigned managed identities.
    #[command(subcommand)]
    Identity(client::IdentityCmd),
    /// User principals.
    #[command(subcommand)]
    User(client::UserCmd),
    /// Access tokens of managed identities.
    #[command(subcommand)]
    Token(client::TokenCmd),
    /// The broker's clock (manual clock only for changes).
    #[command(subcommand)]
    Clock(client::ClockCmd),
    /// Injected faults: vault outages, latency, error rates, failing the next N calls; in memory
    /// only, a restart clears them.
    #[command(subcommand)]
    Faults(client::FaultsCmd),
    /// Key Vault throttling: the cloud's per-vault limits, own limits, or none; in memory only, a
    /// restart returns to the configured profile.
    #[command(subcommand)]
    Throttling(client::ThrottlingCmd),
    /// Counters and cache figures: objects, requests and latency by method, caches, RSA
    /// operations, throttled and injected failures (request counters are the process's).
    Stats,
    /// SQL servers and managed instances: identities, TDE protectors, host credentials.
    #[command(subcommand)]
    Server(client::ServerCmd),
    /// Databases of a server: create, show, list, delete, and watch their states.
    #[command(subcommand)]
    Db(client::DbCmd),
    /// mTLS client certificates, signed by the dev CA of `serve --tls auto` (local, no broker call).
    #[command(subcommand)]
    Cert(CertCmd),
    /// Drive a broker (or, with --baseline, a bare tonic service) with key operations; report
    /// throughput, errors by gRPC code and latency percentiles.
    Loadtest(loadtest::LoadtestArgs),
}

/// `tde-broker cert …`
#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Issue a client certificate that authenticates as a principal (SAN URI
    /// spiffe://tdebroker/principal/<GUID>), signed by the dev CA in <data-dir>/tls; writes
    /// <GUID>.pem and <GUID>.key (0600).
    Issue {
        /// Object id (GUID) of the principal the certificate authenticates as.
        #[arg(long, value_name = "GUID")]
        principal: String,
        /// Where to write the certificate and key [default: the current directory].
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
}

/// Parses the command line and runs it; the process exit code says how it went.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The blocking pool runs RSA private-key operations and store commits. More threads than
    // a few per core only queue RSA work in the kernel instead of in tokio, and each thread
    // that ever ran keeps its stack and allocator caches resident: bound it.
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads((4 * cores).max(8))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Cert(cmd) => cert(cli.connection.data_dir.as_deref(), cmd),
            Command::Loadtest(args) => loadtest::run(cli.connection, args).await,
            other => client::run(cli.connection, other).await.map_err(|e| e.to_string()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let config = Config::resolve(args).map_err(|e| e.to_string())?;
    let listen = config.listen;
    let app = App::open(config).await.map_err(|e| e.to_string())?;
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    app.serve(listener, shutdown_signal()).await.map_err(|e| e.to_string())
}

/// `cert …`: runs beside the broker on its data directory (it reads the dev CA's files).
fn cert(data_dir: Option<&std::path::Path>, cmd: CertCmd) -> Result<(), String> {
    match cmd {
        CertCmd::Issue { principal, out_dir } => {
            let data_dir = data_dir.unwrap_or(std::path::Path::new(crate::config::DEFAULT_DATA_DIR));
            let (cert, key) =
                crate::tls::issue_client_cert(data_dir, &principal).map_err(|e| e.to_string())?;
            let out_dir = out_dir.unwrap_or_else(|| std::path::PathBuf::from("."));
            // The file names carry the id as the certificate does (lowercase, hyphenated).
            let oid = uuid::Uuid::parse_str(principal.trim()).map_err(|e| e.to_string())?.to_string();
            let cert_path = out_dir.join(format!("{oid}.pem"));
            let key_path = out_dir.join(format!("{oid}.key"));
            crate::tls::write_file(&key_path, key.as_bytes(), 0o600).map_err(|e| e.to_string())?;
            crate::tls::write_file(&cert_path, cert.as_bytes(), 0o644).map_err(|e| e.to_string())?;
            println!("certificate  {}", cert_path.display());
            println!("key          {}", key_path.display());
            Ok(())
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the broker");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}
