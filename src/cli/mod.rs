//! The `tde-broker` command line: `serve` runs the broker; `cert` issues client certificates
//! locally; `loadtest` drives a broker; the other subcommands are gRPC clients of a running
//! broker, one file per service as in `src/grpc` (`keyvault`, `vaults`, `identities`,
//! `servers`, `emulation`), sharing `session` (reaching the broker), `render` (what they print)
//! and `error` (how they fail).
//!
//! Client subcommands call the broker as the bootstrap admin (token from
//! `<data-dir>/admin.token`) or whoever `--token` names. Output is aligned text for people, or
//! one JSON document per command (`--output json`) for scripts; `db watch` prints one line (one
//! JSON object) per event as it arrives.

#![warn(missing_docs)]

pub mod cert;
pub mod emulation;
pub mod error;
pub mod identities;
pub mod keyvault;
pub mod loadtest;
pub mod mariadb;
pub mod render;
pub mod servers;
pub mod session;
pub mod vaults;
pub mod when;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ServeArgs};
use crate::server::App;
pub use cert::CertCmd;
use emulation::{ClockCmd, FaultsCmd, ThrottlingCmd};
use error::CliError;
use identities::{IdentityCmd, TokenCmd, UserCmd};
use keyvault::KeyCmd;
use servers::{DbCmd, ServerCmd};
use session::{Connection, Session};
use vaults::{PolicyCmd, RoleCmd, SubnetCmd, VaultCmd};

/// tde-broker: a local Azure Key Vault + SQL TDE (customer-managed keys) over gRPC.
#[derive(Debug, Parser)]
#[command(name = "tde-broker", version, about, long_about = None)]
pub struct Cli {
    /// Where and how client subcommands reach the broker.
    #[command(flatten)]
    pub connection: Connection,
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
    Vault(VaultCmd),
    /// Subnets: the address ranges that VNet rules and private endpoints stand for.
    #[command(subcommand)]
    Subnet(SubnetCmd),
    /// Keys: lifecycle, backup/restore, crypto, sign and verify.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Random bytes from the broker (Key Vault's GetRandomBytes).
    Random(keyvault::RandomArgs),
    /// Access policies of a vault: who may do which key operations.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Role assignments (RBAC) for the control plane and RBAC vaults.
    #[command(subcommand)]
    Role(RoleCmd),
    /// User-assigned managed identities.
    #[command(subcommand)]
    Identity(IdentityCmd),
    /// User principals.
    #[command(subcommand)]
    User(UserCmd),
    /// Access tokens of managed identities.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The broker's clock (manual clock only for changes).
    #[command(subcommand)]
    Clock(ClockCmd),
    /// Injected faults: vault outages, latency, error rates, failing the next N calls; in memory
    /// only, a restart clears them.
    #[command(subcommand)]
    Faults(FaultsCmd),
    /// Key Vault throttling: the cloud's per-vault limits, own limits, or none; in memory only, a
    /// restart returns to the configured profile.
    #[command(subcommand)]
    Throttling(ThrottlingCmd),
    /// Counters and cache figures: objects, requests and latency by method, caches, RSA
    /// operations, throttled and injected failures (request counters are the process's).
    Stats,
    /// SQL servers and managed instances: identities, TDE protectors, host credentials.
    #[command(subcommand)]
    Server(ServerCmd),
    /// Databases of a server: create, show, list, delete, and watch their states.
    #[command(subcommand)]
    Db(DbCmd),
    /// MariaDB data-at-rest encryption through the broker's Vault-KV endpoint: set a server
    /// up (mount, key ids, token file, my.cnf lines), rotate a key id.
    #[command(subcommand)]
    Mariadb(mariadb::MariadbCmd),
    /// mTLS client certificates, signed by the dev CA of `serve --tls auto` (local, no broker call).
    #[command(subcommand)]
    Cert(CertCmd),
    /// Drive a broker (or, with --baseline, a bare tonic service) with key operations; report
    /// throughput, errors by gRPC code and latency percentiles.
    Loadtest(loadtest::LoadtestArgs),
}

/// Client options (ids of [`Connection`]'s arguments) that a subcommand does not use, by
/// subcommand. The client options are global so they may follow any subcommand
/// (`tde-broker key list v --output json`); these are hidden from that subcommand's help and
/// refused when given to it on the command line (a value from the environment is ignored).
const NOT_FOR: &[(&str, &[(&str, &str)])] = &[
    // `serve` has its own --data-dir.
    ("serve", CALLS_NO_BROKER),
    // `cert` works on the dev CA's files in the data directory; it calls no broker.
    ("cert", CALLS_NO_BROKER),
];

/// The client options (id, flag) of a subcommand that calls no broker and prints no result.
const CALLS_NO_BROKER: &[(&str, &str)] = &[
    ("server", "server"),
    ("token", "token"),
    ("ca_cert", "ca-cert"),
    ("client_cert", "client-cert"),
    ("client_key", "client-key"),
    ("output", "output"),
];

/// The command line: [`Cli`]'s definition, with each subcommand's help listing only the options
/// that apply to it.
pub fn command() -> clap::Command {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    for (sub, ids) in NOT_FOR {
        cmd = cmd.mut_subcommand(*sub, |s| shadow(s, ids));
    }
    cmd
}

/// Gives `cmd` and every subcommand under it a hidden argument of its own for each of `ids`: a
/// subcommand that has an argument by a global's id does not receive the global, so these
/// options leave its help; given anyway, [`check_applicable`] refuses them.
fn shadow(cmd: clap::Command, ids: &[(&'static str, &'static str)]) -> clap::Command {
    let cmd = ids
        .iter()
        .fold(cmd, |c, (id, flag)| c.arg(clap::Arg::new(*id).long(*flag).hide(true).num_args(0..=1)));
    let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
    names.iter().fold(cmd, |c, name| c.mut_subcommand(name, |s| shadow(s, ids)))
}

/// Refuses a client option given on the command line to a subcommand that does not use it.
fn check_applicable(matches: &clap::ArgMatches) -> Result<(), clap::Error> {
    let Some((sub, sub_matches)) = matches.subcommand() else { return Ok(()) };
    let Some((_, ids)) = NOT_FOR.iter().find(|(name, _)| *name == sub) else { return Ok(()) };
    // A global given before the subcommand lands in the top-level matches, after it in the
    // subcommand's (or a nested one's).
    let mut levels = vec![matches, sub_matches];
    let mut cur = sub_matches;
    while let Some((_, m)) = cur.subcommand() {
        levels.push(m);
        cur = m;
    }
    for (id, flag) in *ids {
        // `serve --data-dir` is serve's own; `data_dir` is never in these lists.
        let given = levels.iter().any(|m| {
            matches!(m.try_contains_id(id), Ok(true))
                && m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
        });
        if given {
            return Err(clap::Error::raw(
                clap::error::ErrorKind::ArgumentConflict,
                format!("--{flag} is an option of the client subcommands; `{sub}` does not use it\n"),
            )
            .with_cmd(&command()));
        }
    }
    Ok(())
}

/// Parses a command line (the program name first), refusing client options given to a
/// subcommand that does not use them.
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    check_applicable(&matches)?;
    <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
}

/// Parses the command line and runs it; the process exit code says how it went.
pub fn main() -> ExitCode {
    let cli = parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
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
    let result: Result<(), Box<dyn std::error::Error>> = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => Ok(serve(args).await?),
            Command::Cert(cmd) => Ok(cert::run(cli.connection.data_dir.as_deref(), cmd)?),
            Command::Loadtest(args) => Ok(loadtest::run(cli.connection, args).await?),
            other => Ok(run_client(&cli.connection, other).await?),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(hint) = e.downcast_ref::<CliError>().and_then(CliError::hint) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `serve`: runs the broker until SIGINT or SIGTERM.
async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let config = Config::resolve(args)?;
    let addr = config.listen;
    let app = App::open(config).await?;
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| CliError::Listen { addr, source })?;
    // The URLs a user needs (gRPC, REST, vault URLs, CA file, token endpoints), on stderr.
    for line in app.endpoints(listener.local_addr().unwrap_or(addr)) {
        eprintln!("{line}");
    }
    Ok(app.serve(listener, shutdown_signal()).await?)
}

/// Runs one client subcommand against the broker and prints its result.
async fn run_client(conn: &Connection, command: Command) -> Result<(), CliError> {
    if matches!(command, Command::Serve(_) | Command::Cert(_) | Command::Loadtest(_)) {
        return Err(CliError::NotAClient);
    }
    let s = &Session::open(conn).await?;
    let out = match command {
        Command::Serve(_) | Command::Cert(_) | Command::Loadtest(_) => return Err(CliError::NotAClient),
        Command::Vault(cmd) => vaults::vault(s, cmd).await?,
        Command::Subnet(cmd) => vaults::subnet(s, cmd).await?,
        Command::Key(KeyCmd::Verify(a)) => {
            let (key_id, alg) = (a.key_id.clone(), a.alg.clone());
            let (out, valid) = keyvault::verify(s, a).await?;
            out.print(conn.output)?;
            return if valid { Ok(()) } else { Err(CliError::SignatureInvalid { key_id, alg }) };
        }
        Command::Key(cmd) => keyvault::key(s, cmd).await?,
        Command::Random(a) => keyvault::random(s, a).await?,
        Command::Policy(cmd) => vaults::policy(s, cmd).await?,
        Command::Role(cmd) => vaults::role(s, cmd).await?,
        Command::Identity(cmd) => identities::identity(s, cmd).await?,
        Command::User(cmd) => identities::user(s, cmd).await?,
        Command::Token(cmd) => identities::token(s, cmd).await?,
        Command::Clock(cmd) => emulation::clock(s, cmd).await?,
        Command::Faults(cmd) => emulation::faults(s, cmd).await?,
        Command::Throttling(cmd) => emulation::throttling(s, cmd).await?,
        Command::Stats => emulation::stats(s).await?,
        Command::Server(cmd) => servers::server(s, cmd).await?,
        Command::Db(DbCmd::Watch { server_id, count }) => {
            return servers::watch(s, server_id, count, conn.output).await;
        }
        Command::Db(cmd) => servers::db(s, cmd).await?,
        Command::Mariadb(cmd) => mariadb::mariadb(s, conn, cmd).await?,
    };
    out.print(conn.output)
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM (`kill`, `kill %1` of a background job); never when
/// neither can be watched (their default action then ends the process instead).
pub(crate) async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let int = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = term => {}
        () = int => {}
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
