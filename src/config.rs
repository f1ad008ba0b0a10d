//! Configuration: flags > environment (`TDE_BROKER_*`, read by clap) > TOML file > embedded
//! defaults. Raw values are resolved into a validated [`Config`] in one step, reporting every
//! problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where audit records go (`--audit-log`); the audit log owns the type.
pub use crate::audit::Destination as AuditLog;
/// A PostgreSQL store's URL (`--store postgres://…`); the store owns the type.
pub use crate::store::postgres::PostgresUrl;
/// The store's integrity check at start (`--store-check`); the store owns the type.
pub use crate::store::sqlite::StoreCheck;
/// OpenTelemetry export; the telemetry module owns the type.
pub use crate::telemetry::OtlpExport;

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

/// `--tls`: whether the broker makes its own certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsSetting {
    /// Create a dev CA and server certificate in `<data-dir>/tls` (reused afterwards).
    Auto,
    /// No TLS (unless --tls-cert/--tls-key are given).
    Off,
}

/// How the broker serves TLS, once resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Plaintext gRPC.
    #[default]
    Off,
    /// The dev CA and server certificate of the data directory (`--tls auto`).
    Auto,
    /// A certificate chain and key from files (`--tls-cert`, `--tls-key`).
    Files {
        /// PEM certificate chain.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
}

/// Where the broker's state lives (`--store`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreSetting {
    /// The SQLite file in the data directory (one broker per data directory).
    #[default]
    Sqlite,
    /// A PostgreSQL database that several brokers may share. Its URL's password is never shown
    /// ([`PostgresUrl`]'s `Display` and `Debug` leave it out).
    Postgres(Box<PostgresUrl>),
}

/// The `--store` value as given, until [`Config::resolve`] checks it. Its `Debug` shows no URL:
/// a PostgreSQL URL may carry a password.
#[derive(Clone, Default)]
pub struct StoreArg(pub String);

impl std::str::FromStr for StoreArg {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(StoreArg(s.to_string()))
    }
}

impl std::fmt::Debug for StoreArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreArg(..)")
    }
}

impl<'de> Deserialize<'de> for StoreArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(StoreArg)
    }
}

/// Checks a `--store` value: `sqlite`, or a `postgres://` URL. Messages never quote the value
/// (it may hold a password).
fn resolve_store(given: Option<StoreArg>, errors: &mut Vec<String>) -> StoreSetting {
    let Some(StoreArg(text)) = given else { return StoreSetting::Sqlite };
    let text = text.trim();
    if text.eq_ignore_ascii_case("sqlite") {
        return StoreSetting::Sqlite;
    }
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return match text.parse::<PostgresUrl>() {
            Ok(url) => StoreSetting::Postgres(Box::new(url)),
            Err(e) => {
                errors.push(format!("store: {e}"));
                StoreSetting::Sqlite
            }
        };
    }
    errors
        .push("store must be `sqlite` or a postgres://user[:password]@host[:port]/database URL".to_string());
    StoreSetting::Sqlite
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
    /// Start time of a manual clock in a fresh data directory (Unix seconds; default: the system
    /// time at start). A store with a saved manual time resumes it instead.
    pub clock_start: Option<i64>,
    /// Seed file.
    pub seed: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address.
    pub insecure: Option<bool>,
    /// `auto` or `off`.
    pub tls: Option<TlsSetting>,
    /// PEM server certificate chain.
    pub tls_cert: Option<PathBuf>,
    /// PEM server private key.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that sign accepted client certificates.
    pub client_ca: Option<PathBuf>,
    /// Extra DNS names / IP addresses of the `--tls auto` server certificate.
    pub tls_names: Option<Vec<String>>,
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
    /// `AzureCloud` (default), `AzureChinaCloud` or `AzureUSGovernment`.
    pub cloud: Option<crate::model::server::Cloud>,
    /// `off` (default), `audit` or `deny`.
    pub enforce_cmk: Option<crate::broker::EnforceCmk>,
    /// Seconds between TDE probes (default 600, as the cloud's ten minutes).
    pub probe_interval: Option<i64>,
    /// Seconds after a lost access within which databases heal by themselves (default 1800).
    pub heal_window: Option<i64>,
    /// Seconds transient faults are tolerated (default 86400).
    pub transient_grace: Option<i64>,
    /// Lifetime of engine host credentials, seconds (default 86400).
    pub host_token_lifetime: Option<i64>,
    /// Whether trusted services may bypass vault firewalls (default: true in AzureCloud only).
    pub trusted_service_bypass: Option<bool>,
    /// CIDRs of reverse proxies whose `x-forwarded-for` header names the real client.
    pub trusted_proxies: Option<Vec<String>>,
    /// Admin HTTP listener (`/metrics`, `/healthz`, `/readyz`): `IP:PORT` or `off`.
    pub http_listen: Option<String>,
    /// HTTPS listener of Key Vault's REST API and the token endpoints: `IP:PORT` or `off`.
    pub rest_listen: Option<String>,
    /// Audit log: a file path, `stdout` or `off`.
    pub audit_log: Option<String>,
    /// Refuse requests that cannot be audited (default false).
    pub audit_required: Option<bool>,
    /// Hot-path caches on/off (default on).
    pub cache_enabled: Option<bool>,
    /// Most cached authorization decisions (default 100000; 0 caches none).
    pub decision_cache_entries: Option<u64>,
    /// Seconds a cached decision lives at most (default 300).
    pub decision_cache_ttl: Option<u64>,
    /// Most cached unwrap results (default 100000; 0 keeps no plaintext DEK in memory, while
    /// authorization decisions are still cached).
    pub unwrap_cache_entries: Option<u64>,
    /// Seconds a cached unwrap result lives at most (default 300).
    pub unwrap_cache_ttl: Option<u64>,
    /// Most decoded private keys kept in memory (default 1000; always on).
    pub decoded_key_entries: Option<u64>,
    /// Key Vault throttling of every vault: `off` (default) or `azure` (the cloud's limits).
    pub throttling: Option<crate::broker::throttle::ThrottleProfile>,
    /// The store's integrity check at start: `quick` (default) or `full`.
    pub store_check: Option<StoreCheck>,
    /// Where state lives: `sqlite` (default) or `postgres://user[:password]@host[:port]/db`.
    pub store: Option<StoreArg>,
    /// Open gRPC connections at most (default 10000, or the open-file limit less 64 when lower);
    /// one more is closed at once.
    pub max_connections: Option<usize>,
    /// Seconds a new gRPC connection has to send the HTTP/2 preface or finish the TLS handshake
    /// (default 10).
    pub handshake_timeout: Option<u64>,
    /// Largest request header list served, bytes as HTTP/2 counts them (default 16384).
    pub max_header_list_size: Option<u32>,
    /// On a store shared by several brokers: milliseconds without a complete read of the change
    /// feed after which the data plane fails closed (default 750).
    pub feed_staleness_bound_ms: Option<u64>,
    /// On a shared store: milliseconds between reads of the change feed when no notification
    /// arrives (default 200; below the staleness bound).
    pub feed_poll_ms: Option<u64>,
    /// On a shared store: milliseconds a lease of once-only work (the sweeper) lasts without
    /// renewal, the longest a survivor waits to take over from a dead broker (default 5000).
    pub lease_ttl_ms: Option<u64>,
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
    /// Start time of a manual clock in a fresh data directory, Unix seconds [default: now]; a
    /// data directory whose manual clock has moved resumes its saved time.
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
    /// TLS: `auto` creates a dev CA and server certificate in `<data-dir>/tls`; `off` serves
    /// plaintext [default: off, or on with --tls-cert/--tls-key].
    #[arg(long, env = "TDE_BROKER_TLS", value_enum, value_name = "auto|off")]
    pub tls: Option<TlsSetting>,
    /// Server certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "TDE_BROKER_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM); needs --tls-cert.
    #[arg(long, env = "TDE_BROKER_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) of client certificates (mTLS) [default with --tls auto: the dev CA].
    #[arg(long, env = "TDE_BROKER_CLIENT_CA", value_name = "PATH")]
    pub client_ca: Option<PathBuf>,
    /// Another DNS name or IP address for the --tls auto server certificate; repeat for more.
    #[arg(long = "tls-name", env = "TDE_BROKER_TLS_NAMES", value_delimiter = ',', value_name = "NAME")]
    pub tls_names: Vec<String>,
    /// Admin HTTP listener for /metrics, /healthz and /readyz, or `off` [default: 127.0.0.1:9090].
    #[arg(long, env = "TDE_BROKER_HTTP_LISTEN", value_name = "ADDR|off")]
    pub http_listen: Option<String>,
    /// HTTPS listener of Azure Key Vault's REST API (for the Azure SDKs) and the token
    /// endpoints, always TLS with the dev CA of the data directory, or `off`
    /// [default: 127.0.0.1:8443].
    #[arg(long, env = "TDE_BROKER_REST_LISTEN", value_name = "ADDR|off")]
    pub rest_listen: Option<String>,
    /// Audit log, one JSON line per operation: a file path, `stdout`, or `off` [default: off].
    #[arg(long, env = "TDE_BROKER_AUDIT_LOG", value_name = "PATH|stdout|off")]
    pub audit_log: Option<String>,
    /// Refuse requests (UNAVAILABLE, `AuditUnavailable`) that cannot be written to the audit log.
    #[arg(long, env = "TDE_BROKER_AUDIT_REQUIRED")]
    pub audit_required: bool,
    /// The store's integrity check at start: `quick` (SQLite's quick_check) or `full` (its
    /// integrity_check: also matches every index to its table; slower) [default: quick].
    #[arg(long, env = "TDE_BROKER_STORE_CHECK", value_enum, value_name = "quick|full")]
    pub store_check: Option<StoreCheck>,
    /// Where state lives: `sqlite` (the data directory's file) or a PostgreSQL database that
    /// several brokers share, `postgres://user[:password]@host[:port]/database` (prefer the
    /// environment variable or the TOML file to a flag for a URL with a password) [default: sqlite].
    #[arg(long, env = "TDE_BROKER_STORE", value_name = "sqlite|postgres://…", hide_env_values = true)]
    pub store: Option<StoreArg>,
    /// Start afresh when the data directory's store is missing, empty, damaged or another
    /// directory's, instead of refusing to start: the files found are renamed aside (never
    /// deleted), a new store, admin and admin token are made, and the log says each step. For one
    /// start only: it is a flag and an environment variable, not a setting of the TOML file.
    #[arg(long, env = "TDE_BROKER_REINITIALIZE")]
    pub reinitialize: bool,
    /// Open gRPC connections at most; one more is closed as soon as it is accepted [default: 10000,
    /// or the open-file limit less 64 when that is lower].
    #[arg(long, env = "TDE_BROKER_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Seconds a new gRPC connection has to send the HTTP/2 preface (plaintext) or finish the
    /// TLS handshake before it is closed [default: 10].
    #[arg(long, env = "TDE_BROKER_HANDSHAKE_TIMEOUT", value_name = "SECONDS")]
    pub handshake_timeout: Option<u64>,
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
    /// How TLS is served.
    pub tls: TlsMode,
    /// CA of accepted client certificates (overrides the dev CA under `--tls auto`).
    pub client_ca: Option<PathBuf>,
    /// Extra names of the `--tls auto` server certificate.
    pub tls_names: Vec<String>,
    /// User and managed identity token lifetime, seconds (the cloud's: one hour).
    pub token_lifetime: i64,
    /// TDE settings.
    pub tde: crate::broker::TdeSettings,
    /// Trusted-service firewall bypass available.
    pub trusted_service_bypass: bool,
    /// Trusted reverse proxies (normalised CIDRs).
    pub trusted_proxies: Vec<String>,
    /// Admin HTTP listener (`None`: off).
    pub http_listen: Option<SocketAddr>,
    /// Whether `http_listen` was configured rather than defaulted: only the default address,
    /// when taken (a second broker on the machine), turns the listener off with a warning.
    pub http_listen_explicit: bool,
    /// HTTPS listener of the REST surfaces (`None`: off).
    pub rest_listen: Option<SocketAddr>,
    /// Whether `rest_listen` was configured rather than defaulted (only the default address,
    /// when taken, turns the listener off with a warning).
    pub rest_listen_explicit: bool,
    /// Where audit records go.
    pub audit_log: AuditLog,
    /// Refuse requests that cannot be audited.
    pub audit_required: bool,
    /// OpenTelemetry export over OTLP/gRPC.
    pub otlp: OtlpExport,
    /// Hot-path caches.
    pub caches: crate::broker::cache::CacheSettings,
    /// Key Vault throttling at start (Emulation.SetThrottling changes it at run time).
    pub throttling: crate::broker::throttle::ThrottleProfile,
    /// The store's integrity check at start (SQLite).
    pub store_check: StoreCheck,
    /// Where state lives.
    pub store: StoreSetting,
    /// Start afresh when the store is missing, empty, damaged or another directory's.
    pub reinitialize: bool,
    /// Limits of the gRPC listener and its connections.
    pub listener: crate::listener::ListenerSettings,
    /// Following a store shared with other brokers.
    pub feed: crate::broker::feed::FeedSettings,
}

/// Configuration problems, all reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    /// Embedded defaults with a data directory: what tests start from.
    pub fn for_data_dir(data_dir: &Path) -> Self {
        let mut cfg =
            Config::resolve(ServeArgs { data_dir: Some(data_dir.to_path_buf()), ..Default::default() })
                .unwrap_or_else(|_| unreachable!("the embedded defaults are valid"));
        // Tests run many brokers at once: the admin HTTP listener is theirs to turn on.
        cfg.http_listen = None;
        // And the HTTPS listener (tests that use it turn it on, on port 0).
        cfg.rest_listen = None;
        cfg
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
        let listener = resolve_listener(&args, &file, &mut errors);
        let feed = resolve_feed(&file, &mut errors);
        let listen_text = args.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|_| {
            errors.push(format!("listen address '{listen_text}' is not IP:PORT"));
            SocketAddr::from(([127, 0, 0, 1], 50051))
        });
        let insecure = args.insecure || file.insecure.unwrap_or(false);
        let args_tls = TlsSources {
            tls: args.tls,
            cert: args.tls_cert,
            key: args.tls_key,
            client_ca: args.client_ca,
            names: (!args.tls_names.is_empty()).then_some(args.tls_names),
        };
        let file_tls = TlsSources {
            tls: file.tls,
            cert: file.tls_cert,
            key: file.tls_key,
            client_ca: file.client_ca,
            names: file.tls_names,
        };
        let (tls, client_ca, tls_names) = resolve_tls(args_tls, file_tls, &mut errors);
        if !listen.ip().is_loopback() && !insecure && tls == TlsMode::Off {
            errors.push(format!(
                "refusing to serve plaintext gRPC on non-loopback address {listen}: bind to 127.0.0.1, turn TLS on (--tls auto or --tls-cert/--tls-key) or pass --insecure"
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
        let defaults = crate::broker::TdeSettings::default();
        let mut positive = |name: &str, v: Option<i64>, default: i64| match v {
            Some(x) if x <= 0 => {
                errors.push(format!("{name} must be positive"));
                default
            }
            Some(x) => x,
            None => default,
        };
        let tde = crate::broker::TdeSettings {
            timing: crate::model::server::TdeTiming {
                heal_window: positive("heal_window", file.heal_window, defaults.timing.heal_window),
                transient_grace: positive(
                    "transient_grace",
                    file.transient_grace,
                    defaults.timing.transient_grace,
                ),
            },
            probe_interval: positive("probe_interval", file.probe_interval, defaults.probe_interval),
            cloud: file.cloud.unwrap_or_default(),
            enforce_cmk: file.enforce_cmk.unwrap_or_default(),
            host_token_lifetime: positive(
                "host_token_lifetime",
                file.host_token_lifetime,
                defaults.host_token_lifetime,
            ),
        };
        let trusted_service_bypass =
            file.trusted_service_bypass.unwrap_or(tde.cloud == crate::model::server::Cloud::AzureCloud);
        let mut trusted_proxies = Vec::new();
        for p in file.trusted_proxies.unwrap_or_default() {
            match crate::model::vault::normalise_cidr(&p) {
                Ok(c) => trusted_proxies.push(c),
                Err(_) => errors.push(format!("trusted_proxies: '{p}' is not an address or CIDR")),
            }
        }
        let cache_defaults = crate::broker::cache::CacheSettings::default();
        let caches = crate::broker::cache::CacheSettings {
            enabled: file.cache_enabled.unwrap_or(cache_defaults.enabled),
            decision_entries: file.decision_cache_entries.unwrap_or(cache_defaults.decision_entries),
            decision_ttl: file
                .decision_cache_ttl
                .map_or(cache_defaults.decision_ttl, std::time::Duration::from_secs),
            unwrap_entries: file.unwrap_cache_entries.unwrap_or(cache_defaults.unwrap_entries),
            unwrap_ttl: file
                .unwrap_cache_ttl
                .map_or(cache_defaults.unwrap_ttl, std::time::Duration::from_secs),
            decoded_key_entries: file.decoded_key_entries.unwrap_or(cache_defaults.decoded_key_entries),
        };
        let (http_listen, http_listen_explicit) = resolve_http_listen(
            args.http_listen.or(file.http_listen),
            insecure || tls != TlsMode::Off,
            &mut errors,
        );
        let rest_given = args.rest_listen.or(file.rest_listen);
        let rest_listen_explicit = rest_given.is_some();
        let rest_listen = resolve_rest_listen(rest_given, &mut errors);
        let audit_log = match args.audit_log.or(file.audit_log).as_deref().map(str::trim) {
            None | Some("off") => AuditLog::Off,
            Some("stdout") => AuditLog::Stdout,
            Some("") => {
                errors.push("audit_log is empty: give a file path, `stdout` or `off`".to_string());
                AuditLog::Off
            }
            Some(path) => AuditLog::File(PathBuf::from(path)),
        };
        let audit_required = args.audit_required || file.audit_required.unwrap_or(false);
        if audit_required && audit_log == AuditLog::Off {
            errors.push("audit_required needs an audit log: set --audit-log / audit_log".to_string());
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
            tls,
            client_ca,
            tls_names,
            token_lifetime,
            tde,
            trusted_service_bypass,
            trusted_proxies,
            http_listen,
            http_listen_explicit,
            rest_listen,
            rest_listen_explicit,
            audit_log,
            audit_required,
            otlp: OtlpExport::from_env(),
            caches,
            throttling: file.throttling.unwrap_or_default(),
            store_check: args.store_check.or(file.store_check).unwrap_or_default(),
            store: resolve_store(args.store.or(file.store), &mut errors),
            reinitialize: args.reinitialize,
            listener,
            feed,
        };
        if errors.is_empty() { Ok(cfg) } else { Err(ConfigError(errors)) }
    }
}

/// The change-feed settings of the TOML file over the defaults: each positive, the poll
/// interval below the staleness bound (or a healthy broker would fail closed between reads), and
/// the lease TTL above the sweeper's one-second renewal.
fn resolve_feed(file: &FileConfig, errors: &mut Vec<String>) -> crate::broker::feed::FeedSettings {
    use std::time::Duration;
    let defaults = crate::broker::feed::FeedSettings::default();
    let mut ms = |name: &str, v: Option<u64>, default: Duration| match v {
        Some(0) => {
            errors.push(format!("{name} must be positive"));
            default
        }
        Some(x) => Duration::from_millis(x),
        None => default,
    };
    let staleness_bound =
        ms("feed_staleness_bound_ms", file.feed_staleness_bound_ms, defaults.staleness_bound);
    let poll_interval = ms("feed_poll_ms", file.feed_poll_ms, defaults.poll_interval);
    let lease_ttl = ms("lease_ttl_ms", file.lease_ttl_ms, defaults.lease_ttl);
    if poll_interval >= staleness_bound {
        errors.push(format!(
            "feed_poll_ms ({}) must be below feed_staleness_bound_ms ({}): a broker that reads the feed less often than the bound fails closed while healthy",
            poll_interval.as_millis(),
            staleness_bound.as_millis()
        ));
    }
    if lease_ttl <= Duration::from_secs(1) {
        errors.push("lease_ttl_ms must be above 1000: the sweeper renews its lease every second".to_string());
    }
    crate::broker::feed::FeedSettings { staleness_bound, poll_interval, lease_ttl }
}

/// Largest `max_header_list_size` accepted (HTTP/2 is given four times as much).
const MAX_HEADER_LIST_CEILING: u32 = 1024 * 1024;

/// The gRPC listener's limits (flags over file over defaults), each checked.
fn resolve_listener(
    args: &ServeArgs,
    file: &FileConfig,
    errors: &mut Vec<String>,
) -> crate::listener::ListenerSettings {
    let defaults = crate::listener::ListenerSettings::default();
    let max_connections = match args.max_connections.or(file.max_connections) {
        Some(0) => {
            errors.push("max_connections must be at least 1".to_string());
            defaults.max_connections
        }
        Some(n) => n,
        None => defaults.max_connections,
    };
    let handshake_timeout = match args.handshake_timeout.or(file.handshake_timeout) {
        Some(0) => {
            errors.push("handshake_timeout must be at least 1 second".to_string());
            defaults.handshake_timeout
        }
        Some(s) => std::time::Duration::from_secs(s),
        None => defaults.handshake_timeout,
    };
    let max_header_list_size = match file.max_header_list_size {
        Some(n) if !(1024..=MAX_HEADER_LIST_CEILING).contains(&n) => {
            errors.push(format!(
                "max_header_list_size must be between 1024 and {MAX_HEADER_LIST_CEILING} bytes"
            ));
            defaults.max_header_list_size
        }
        Some(n) => n,
        None => defaults.max_header_list_size,
    };
    crate::listener::ListenerSettings { max_connections, handshake_timeout, max_header_list_size }
}

/// Default admin HTTP listener (`/metrics`, `/healthz`, `/readyz`).
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9090";

/// The admin listener: `off`, or an address (the default when unset). Its endpoints are
/// plaintext and unauthenticated (they expose no key material, only counts), so a non-loopback
/// address needs `--insecure` or a TLS deployment, as plaintext gRPC does.
fn resolve_http_listen(
    given: Option<String>,
    allow_public: bool,
    errors: &mut Vec<String>,
) -> (Option<SocketAddr>, bool) {
    let explicit = given.is_some();
    let text = given.unwrap_or_else(|| DEFAULT_HTTP_LISTEN.to_string());
    if text.trim().eq_ignore_ascii_case("off") {
        return (None, explicit);
    }
    match text.trim().parse::<SocketAddr>() {
        Ok(addr) if !addr.ip().is_loopback() && !allow_public => {
            errors.push(format!(
                "refusing to serve the admin HTTP listener on non-loopback address {addr}: bind to 127.0.0.1, pass --insecure, or --http-listen off"
            ));
            (None, explicit)
        }
        Ok(addr) => (Some(addr), explicit),
        Err(_) => {
            errors.push(format!("http_listen '{text}' is not IP:PORT or `off`"));
            (None, explicit)
        }
    }
}

/// Default HTTPS listener of the REST surfaces.
pub const DEFAULT_REST_LISTEN: &str = "127.0.0.1:8443";

/// The REST listener: `off`, or an address (the default when unset). It is always HTTPS and
/// authenticates every Key Vault request, so, like gRPC under TLS, any address may be given.
fn resolve_rest_listen(given: Option<String>, errors: &mut Vec<String>) -> Option<SocketAddr> {
    let text = given.unwrap_or_else(|| DEFAULT_REST_LISTEN.to_string());
    if text.trim().eq_ignore_ascii_case("off") {
        return None;
    }
    match text.trim().parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            errors.push(format!("rest_listen '{text}' is not IP:PORT or `off`"));
            None
        }
    }
}

/// The TLS settings of one source (flags or file).
struct TlsSources {
    tls: Option<TlsSetting>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    names: Option<Vec<String>>,
}

/// Merges the TLS settings (flags over file) and checks that they fit together.
fn resolve_tls(
    args: TlsSources,
    file: TlsSources,
    errors: &mut Vec<String>,
) -> (TlsMode, Option<PathBuf>, Vec<String>) {
    let setting = args.tls.or(file.tls);
    let cert = args.cert.or(file.cert);
    let key = args.key.or(file.key);
    let client_ca = args.client_ca.or(file.client_ca);
    let names = args.names.or(file.names).unwrap_or_default();
    for (path, what) in [(&cert, "--tls-cert"), (&key, "--tls-key"), (&client_ca, "--client-ca")] {
        if let Some(path) = path
            && !path.is_file()
        {
            errors.push(format!("{what} {}: no such file", path.display()));
        }
    }
    let mode = match (setting, cert, key) {
        (Some(TlsSetting::Auto), None, None) => TlsMode::Auto,
        (Some(TlsSetting::Auto), _, _) => {
            errors.push(
                "--tls auto makes its own server certificate: drop --tls-cert/--tls-key, or drop --tls auto"
                    .to_string(),
            );
            TlsMode::Auto
        }
        (Some(TlsSetting::Off), None, None) | (None, None, None) => TlsMode::Off,
        (Some(TlsSetting::Off), _, _) => {
            errors.push("--tls off contradicts --tls-cert/--tls-key".to_string());
            TlsMode::Off
        }
        (None, Some(cert), Some(key)) => TlsMode::Files { cert, key },
        (None, Some(_), None) => {
            errors.push("--tls-cert needs --tls-key".to_string());
            TlsMode::Off
        }
        (None, None, Some(_)) => {
            errors.push("--tls-key needs --tls-cert".to_string());
            TlsMode::Off
        }
    };
    if mode == TlsMode::Off && client_ca.is_some() {
        errors.push("--client-ca needs TLS: add --tls auto or --tls-cert/--tls-key".to_string());
    }
    if !names.is_empty() && mode != TlsMode::Auto {
        errors
            .push("--tls-name / tls_names apply only to --tls auto (the dev server certificate)".to_string());
    }
    for name in &names {
        if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
            errors.push(format!("TLS name '{name}' is not a DNS name or IP address"));
        }
    }
    (mode, client_ca, names)
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
    fn the_store_is_sqlite_by_default_or_a_checked_postgres_url_from_the_flag_or_the_file() {
        assert_eq!(Config::resolve(ServeArgs::default()).unwrap().store, StoreSetting::Sqlite);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "store = \"postgres://broker:s3cret@db.internal:5433/tde\"\n").unwrap();
        let cfg = Config::resolve(ServeArgs { config: Some(path.clone()), ..Default::default() }).unwrap();
        let StoreSetting::Postgres(url) = &cfg.store else { panic!("{:?}", cfg.store) };
        assert_eq!(url.to_string(), "postgres://broker@db.internal:5433/tde");
        assert!(!format!("{cfg:?}").contains("s3cret"), "the configuration shows the password");
        // The flag (or TDE_BROKER_STORE) wins over the file.
        let args =
            ServeArgs { config: Some(path), store: Some(StoreArg("SQLite".into())), ..Default::default() };
        assert!(!format!("{args:?}").contains("s3cret"));
        assert_eq!(Config::resolve(args).unwrap().store, StoreSetting::Sqlite);
        for bad in ["mysql://u:s3cret@h/db", "postgres://u:s3cret@h", "postgres://u:s3cret@h:port/db", ""] {
            let err = Config::resolve(ServeArgs { store: Some(StoreArg(bad.into())), ..Default::default() })
                .expect_err(bad)
                .to_string();
            assert!(err.contains("postgres://user[:password]@host[:port]/database"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn the_feed_settings_come_from_the_file_and_a_poll_slower_than_the_staleness_bound_is_refused() {
        use std::time::Duration;
        let defaults = Config::resolve(ServeArgs::default()).unwrap().feed;
        assert_eq!(defaults, crate::broker::feed::FeedSettings::default());
        assert_eq!(defaults.staleness_bound, Duration::from_millis(750));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "feed_staleness_bound_ms = 2000
feed_poll_ms = 100
lease_ttl_ms = 3000
",
        )
        .unwrap();
        let cfg = Config::resolve(ServeArgs { config: Some(path.clone()), ..Default::default() }).unwrap();
        assert_eq!(
            cfg.feed,
            crate::broker::feed::FeedSettings {
                staleness_bound: Duration::from_millis(2000),
                poll_interval: Duration::from_millis(100),
                lease_ttl: Duration::from_millis(3000),
            }
        );
        for (text, complaint) in [
            ("feed_staleness_bound_ms = 300\nfeed_poll_ms = 300\n", "must be below feed_staleness_bound_ms"),
            ("feed_staleness_bound_ms = 0\n", "feed_staleness_bound_ms must be positive"),
            ("lease_ttl_ms = 1000\n", "lease_ttl_ms must be above 1000"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Config::resolve(ServeArgs { config: Some(path.clone()), ..Default::default() })
                .expect_err(text)
                .to_string();
            assert!(err.contains(complaint), "{err}");
        }
    }

    #[test]
    fn plaintext_on_a_public_address_needs_insecure() {
        let args = ServeArgs { listen: Some("0.0.0.0:50051".into()), ..Default::default() };
        let err = Config::resolve(args.clone()).unwrap_err();
        assert!(err.to_string().contains("--insecure"));
        assert!(Config::resolve(ServeArgs { insecure: true, ..args }).is_ok());
    }

    #[test]
    fn listener_limits_come_from_flags_over_the_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "max_connections = 50\nhandshake_timeout = 3\nmax_header_list_size = 8192\n")
            .unwrap();
        let cfg = Config::resolve(ServeArgs { config: Some(path.clone()), ..Default::default() }).unwrap();
        assert_eq!(cfg.listener.max_connections, 50);
        assert_eq!(cfg.listener.handshake_timeout, std::time::Duration::from_secs(3));
        assert_eq!(cfg.listener.max_header_list_size, 8192);
        let cfg = Config::resolve(ServeArgs {
            config: Some(path),
            max_connections: Some(7),
            handshake_timeout: Some(1),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((cfg.listener.max_connections, cfg.listener.handshake_timeout.as_secs()), (7, 1));
        assert_eq!(Config::for_data_dir(dir.path()).listener, crate::listener::ListenerSettings::default());
        std::fs::write(dir.path().join("bad.toml"), "max_header_list_size = 10\n").unwrap();
        let err = Config::resolve(ServeArgs {
            config: Some(dir.path().join("bad.toml")),
            max_connections: Some(0),
            handshake_timeout: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
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
