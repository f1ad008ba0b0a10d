//! The `tde-broker` command line: `serve` runs the broker; the other subcommands are gRPC
//! clients of a running broker.

pub mod client;

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
    /// Vaults: create, show, list, update, delete, access policies.
    #[command(subcommand)]
    Vault(client::VaultCmd),
    /// Keys: lifecycle, backup/restore and crypto.
    #[command(subcommand)]
    Key(client::KeyCmd),
    /// The broker's clock (manual clock only for changes).
    #[command(subcommand)]
    Clock(client::ClockCmd),
}

/// Parses the command line and runs it; the process exit code says how it went.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
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
