//! Configuration: flags > environment (`TDE_BROKER_*`, read by clap) > TOML file > embedded
//! defaults. Raw values are resolved into a validated [`Config`] in one step, reporting every
//! problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default gRPC address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./tde-broker-data";
/// The dev tenant used when none is configured.
pub const DEFAULT_TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The dev subscription used when none is configured.
pub const DEFAULT_SUBSCRIPTION: &str = "00000000-0000-0000-0000-000000000000";

/// Which clock the broker runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClockKind {
    /// Wall-clock time.
    System,
    /// Moves only through the Emulation service.
    Manual,
}

/// The TOML file's shape; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// gRPC listen address.
    pub listen: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Clock kind.
    pub clock: Option<ClockKind>,
    /// Start time of a manual clock (Unix seconds; default: the system time at start).
    pub clock_start: Option<i64>,
    /// Seed file.
    pub seed: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address.
    pub insecure: Option<bool>,
    /// Vault URI suffix.
    pub vault_dns_suffix: Option<String>,
    /// Location in texts.
    pub location: Option<String>,
    /// Tenant GUID.
    pub tenant_id: Option<String>,
    /// Subscription GUID of vaults.
    pub subscription_id: Option<String>,
    /// Resource group of vaults.
    pub resource_group: Option<String>,
    /// Lifetime of the bootstrap admin token, seconds.
    pub admin_token_lifetime: Option<i64>,
    /// Lifetime of user and managed identity tokens, seconds.
    pub token_lifetime: Option<i64>,
}

/// What the command line (and its environment variables) gave.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "TDE_BROKER_LISTEN")]
    pub listen: Option<String>,
    /// Data directory: SQLite store, master key, admin token [default: ./tde-broker-data].
    #[arg(long, env = "TDE_BROKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Clock: `system`, or `manual` to move time with the Emulation service [default: system].
    #[arg(long, env = "TDE_BROKER_CLOCK", value_enum)]
    pub clock: Option<ClockKind>,
    /// Start time of a manual clock, Unix seconds [default: now].
    #[arg(long, env = "TDE_BROKER_CLOCK_START")]
    pub clock_start: Option<i64>,
    /// TOML configuration file.
    #[arg(long, env = "TDE_BROKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Seed file declaring vaults and keys to create at start (idempotent).
    #[arg(long, env = "TDE_BROKER_SEED")]
    pub seed: Option<PathBuf>,
    /// Allow plaintext gRPC on a non-loopback address.
    #[arg(long, env = "TDE_BROKER_INSECURE")]
    pub insecure: bool,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Clock kind.
    pub clock: ClockKind,
    /// Start of a manual clock.
    pub clock_start: Option<i64>,
    /// Seed file.
    pub seed: Option<PathBuf>,
    /// Vault URI suffix.
    pub vault_dns_suffix: String,
    /// Location in texts.
    pub location: String,
    /// Tenant.
    pub tenant_id: String,
    /// Subscription of vaults.
    pub subscription_id: String,
    /// Resource group of vaults.
    pub resource_group: String,
    /// Admin token lifetime, seconds.
    pub admin_token_lifetime: i64,
    /// User and managed identity token lifetime, seconds (the cloud's: one hour).
    pub token_lifetime: i64,
}

/// Configuration problems, all reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    /// Embedded defaults with a data directory: what tests start from.
    pub fn for_data_dir(data_dir: &Path) -> Self {
        Config::resolve(ServeArgs { data_dir: Some(data_dir.to_path_buf()), ..Default::default() })
            .unwrap_or_else(|_| unreachable!("the embedded defaults are valid"))
    }

    /// Merges flags/env over the TOML file over the defaults, and validates.
    pub fn resolve(args: ServeArgs) -> Result<Self, ConfigError> {
        let mut errors = Vec::new();
        let file = match &args.config {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => toml::from_str::<FileConfig>(&text).unwrap_or_else(|e| {
                    errors.push(format!("{}: {e}", path.display()));
                    FileConfig::default()
                }),
                Err(e) => {
                    errors.push(format!("cannot read {}: {e}", path.display()));
                    FileConfig::default()
                }
            },
            None => FileConfig::default(),
        };
        let listen_text = args.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|_| {
            errors.push(format!("listen address '{listen_text}' is not IP:PORT"));
            SocketAddr::from(([127, 0, 0, 1], 50051))
        });
        let insecure = args.insecure || file.insecure.unwrap_or(false);
        if !listen.ip().is_loopback() && !insecure {
            errors.push(format!(
                "refusing to serve plaintext gRPC on non-loopback address {listen}: bind to 127.0.0.1 or pass --insecure"
            ));
        }
        let tenant_id = file.tenant_id.unwrap_or_else(|| DEFAULT_TENANT.to_string());
        if uuid::Uuid::parse_str(&tenant_id).is_err() {
            errors.push(format!("tenant_id '{tenant_id}' is not a GUID"));
        }
        let admin_token_lifetime = file.admin_token_lifetime.unwrap_or(365 * 86_400);
        if admin_token_lifetime <= 0 {
            errors.push("admin_token_lifetime must be positive".to_string());
        }
        let token_lifetime = file.token_lifetime.unwrap_or(3600);
        if token_lifetime <= 0 {
            errors.push("token_lifetime must be positive".to_string());
        }
        let cfg = Config {
            listen,
            data_dir: args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            clock: args.clock.or(file.clock).unwrap_or(ClockKind::System),
            clock_start: args.clock_start.or(file.clock_start),
            seed: args.seed.or(file.seed),
            vault_dns_suffix: file.vault_dns_suffix.unwrap_or_else(|| "vault.azure.net".to_string()),
            location: file.location.unwrap_or_else(|| "westus".to_string()),
            tenant_id,
            subscription_id: file.subscription_id.unwrap_or_else(|| DEFAULT_SUBSCRIPTION.to_string()),
            resource_group: file.resource_group.unwrap_or_else(|| "tde-broker".to_string()),
            admin_token_lifetime,
            token_lifetime,
        };
        if errors.is_empty() { Ok(cfg) } else { Err(ConfigError(errors)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:6000\"\nclock = \"manual\"\nlocation = \"eastus\"\n")
            .unwrap();
        let cfg = Config::resolve(ServeArgs {
            listen: Some("127.0.0.1:7000".into()),
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.listen.port(), 7000);
        assert_eq!(cfg.clock, ClockKind::Manual);
        assert_eq!(cfg.location, "eastus");
        assert_eq!(cfg.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn plaintext_on_a_public_address_needs_insecure() {
        let args = ServeArgs { listen: Some("0.0.0.0:50051".into()), ..Default::default() };
        let err = Config::resolve(args.clone()).unwrap_err();
        assert!(err.to_string().contains("--insecure"));
        assert!(Config::resolve(ServeArgs { insecure: true, ..args }).is_ok());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "tenant_id = \"nope\"\nadmin_token_lifetime = 0\n").unwrap();
        let err =
            Config::resolve(ServeArgs { listen: Some("x".into()), config: Some(path), ..Default::default() })
                .unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
    }
}
