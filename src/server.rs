//! Start-up and serving: opens the data directory (master key, store, signing key), bootstraps
//! the admin principal and its token, applies the seed file, and serves gRPC until shutdown.
//! Tests call [`App::open`] and [`App::serve`] on an ephemeral loopback listener.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use zeroize::Zeroizing;

use crate::auth::{AuthInterceptor, Authenticator, MANAGEMENT_AUDIENCE, Plane, VAULT_AUDIENCE};
use crate::broker::{Broker, Clock, Settings, new_guid};
use crate::config::{ClockKind, Config};
use crate::crypto::{Sealer, TokenSigningKey};
use crate::grpc::emulation::EmulationService;
use crate::grpc::engine::EngineService;
use crate::grpc::identities::IdentitiesService;
use crate::grpc::keyvault::KeyVaultService;
use crate::grpc::proto::emulation_server::EmulationServer;
use crate::grpc::proto::identities_server::IdentitiesServer;
use crate::grpc::proto::key_vault_server::KeyVaultServer;
use crate::grpc::proto::servers_server::ServersServer;
use crate::grpc::proto::tde_engine_server::TdeEngineServer;
use crate::grpc::proto::vaults_server::VaultsServer;
use crate::grpc::servers::ServersService;
use crate::grpc::vaults::VaultsService;
use crate::model::{BrokerError, Caller, Change, Principal, PrincipalKind, Role, RoleAssignment};
use crate::seed;

/// Environment variable that supplies the master key (base64 of 32 bytes) instead of the file.
pub const MASTER_KEY_ENV: &str = "TDE_BROKER_MASTER_KEY";
/// File names inside the data directory.
pub const MASTER_KEY_FILE: &str = "master.key";
/// The admin token file.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The SQLite database file.
pub const DB_FILE: &str = "broker.sqlite";
/// Largest gRPC message accepted (the crypto value limit is far below).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Streams one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS). tonic's
/// builder gives hyper no limit unless told one, and then every stream a client opens runs a
/// handler and holds its state: 50,000 streams left waiting for their bodies grew the broker by
/// about 350 MiB (`tests/http2_abuse.rs`, docs/reliability/http2.md). A stream costs a few KiB, so
/// 256 bound a connection to about 2 MiB; clients queue calls past it (tonic's and grpc's do), and
/// the broker's own load tests keep 16 to 32 in flight per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams the server may reset itself on one connection (a stream over the limit refused, a
/// stream's flow-control or protocol error) before it ends the connection with GOAWAY
/// ENHANCE_YOUR_CALM. h2's default, which tonic's builder turns off by handing hyper `None`:
/// without it a client can make the server start and abandon streams without end
/// ("MadeYouReset", CVE-2025-8671), and streams refused over `MAX_CONCURRENT_STREAMS` are never
/// counted against the connection.
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// Streams the client may reset before the server accepted them (rapid reset, CVE-2023-44487)
/// before the connection ends with GOAWAY ENHANCE_YOUR_CALM: h2's default, set here so that it
/// stays in force whatever the builder's default becomes.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

const META_MASTER_CHECK: &str = "master_key_check";
const META_SIGNING_KEY: &str = "token_signing_key";
const META_SIGNING_KID: &str = "token_signing_kid";
const META_ADMIN: &str = "admin_object_id";
const MASTER_CHECK_PLAINTEXT: &[u8] = b"tde-broker master key check v1";

/// How long a starting broker waits for another broker's start-up writes (the bootstrap lease)
/// on a shared store.
const BOOTSTRAP_PATIENCE: Duration = Duration::from_secs(60);

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file of the data directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The master key is missing, malformed, or does not open this data directory.
    #[error("master key: {0}")]
    MasterKey(#[from] MasterKeyError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A broker operation failed during bootstrap or seeding.
    #[error("{0}")]
    Broker(#[from] BrokerError),
    /// The seed file could not be read or applied.
    #[error("seed: {0}")]
    Seed(#[from] crate::seed::SeedError),
    /// The store names a bootstrap admin that it does not hold (the store was altered).
    #[error("the bootstrap admin {object_id} is missing from the store")]
    AdminMissing {
        /// The admin's object id, as recorded in the store.
        object_id: String,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS configuration (certificates, keys, the dev CA) is unusable.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The admin HTTP listener could not be bound.
    #[error("admin HTTP listener: {0}")]
    Http(std::io::Error),
    /// The REST (HTTPS) listener could not be bound.
    #[error(
        "REST listener {addr}: {source} (choose another address with --rest-listen, or --rest-listen off)"
    )]
    RestListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// OpenTelemetry export could not be set up.
    #[error("OpenTelemetry: {0}")]
    Telemetry(#[from] crate::telemetry::OtelError),
    /// The data directory is in use by another broker, or its store is missing, empty, damaged
    /// or another directory's (the message says what to do).
    #[error("{0}")]
    DataDir(#[from] crate::store::datadir::DataDirError),
}

/// Why the master key cannot be used. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MasterKeyError {
    /// The environment variable or file does not hold base64 text.
    #[error("{origin} is not base64")]
    NotBase64 {
        /// Where the key came from: the variable's name or the file's path.
        origin: String,
        /// The decoder's complaint.
        #[source]
        source: base64::DecodeError,
    },
    /// The key decodes to the wrong number of bytes.
    #[error("{origin} must hold 32 bytes, found {found}")]
    WrongLength {
        /// Where the key came from.
        origin: String,
        /// How many bytes it held.
        found: usize,
    },
    /// The key cannot open what the data directory sealed under its own key.
    #[error("this master key does not open this data directory")]
    DoesNotOpen(#[source] crate::crypto::CryptoError),
    /// The check value opened but is not what the broker sealed.
    #[error("the master key check value is wrong")]
    WrongCheckValue,
    /// Sealing under the key failed (the crypto library refused it).
    #[error("{0}")]
    Unusable(#[source] crate::crypto::CryptoError),
    /// The token signing key sealed in the store cannot be opened, decoded or made.
    #[error("token signing key: {0}")]
    SigningKey(#[source] crate::crypto::CryptoError),
    /// Neither the file nor the environment variable holds the key, and the store holds data
    /// sealed under one: a new key could not open it, so none is made.
    #[error(
        "{} is missing and {MASTER_KEY_ENV} is not set, but the store of this data directory holds data sealed under a master key, which a new key cannot open. Put the key back in {} from your backup (base64 of 32 bytes, mode 0600), or set {MASTER_KEY_ENV} to it",
        path.display(),
        path.display()
    )]
    Missing {
        /// The master key file that was looked for.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::Io { path: path.to_path_buf(), source }
}

/// Writes a secret file with mode 0600, durably.
fn write_secret(path: &Path, contents: &[u8]) -> Result<(), StartError> {
    Ok(crate::store::datadir::write_private(path, contents)?)
}

/// The REST listener bound at open, and its TLS configuration (the dev CA's certificate).
struct RestListener {
    listener: TcpListener,
    addr: std::net::SocketAddr,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    /// The App Service protocol's header secret (`<data-dir>/identity.header`).
    identity_header: zeroize::Zeroizing<String>,
}

/// Binds the REST listener `config` asks for. The dev CA and certificate are made first, so
/// `<data-dir>/tls/ca.pem` exists once `open` returns. The default address, when taken (another
/// broker on the machine), turns the listener off with a warning; an address given is an error.
async fn bind_rest(config: &Config) -> Result<Option<RestListener>, StartError> {
    let Some(addr) = config.rest_listen else { return Ok(None) };
    let tls = crate::tls::rest_server_tls(config)?;
    match TcpListener::bind(addr).await {
        Ok(listener) => {
            let addr = listener.local_addr().map_err(|source| StartError::RestListen { addr, source })?;
            // Made here, so `<data-dir>/identity.header` exists once `open` returns.
            let header_path = config.data_dir.join(crate::rest::identity::IDENTITY_HEADER_FILE);
            let identity_header = crate::rest::identity::ensure_identity_header(&config.data_dir)
                .map_err(io_err(&header_path))?;
            Ok(Some(RestListener { listener, addr, tls, identity_header }))
        }
        Err(source) if source.kind() == std::io::ErrorKind::AddrInUse && !config.rest_listen_explicit => {
            tracing::warn!(%addr, "the default REST address is taken: Key Vault's REST API and the token endpoints are off (set --rest-listen)");
            Ok(None)
        }
        Err(source) => Err(StartError::RestListen { addr, source }),
    }
}

/// The running application: broker, authenticator and the admin's identity.
pub struct App {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Token issuer/validator.
    pub auth: Arc<Authenticator>,
    /// The bootstrap admin.
    pub admin: Principal,
    /// Where the admin token was written.
    pub admin_token_path: PathBuf,
    config: Config,
    /// The admin HTTP listener and readiness (stops with the app).
    admin_http: crate::http::Admin,
    /// The audit log.
    audit: Arc<crate::audit::AuditLog>,
    /// The server's TLS configuration, built (and checked) once at open; `None` for plaintext.
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// The REST listener, bound at open (`--rest-listen`); `None` when off.
    rest: Option<RestListener>,
    /// The data directory's lock: no other broker opens the directory while the app lives.
    /// Last, so it is let go after everything else of the app.
    _lock: crate::store::datadir::DataDirLock,
}

impl App {
    /// Opens the data directory and brings the broker up (without serving).
    pub async fn open(config: Config) -> Result<App, StartError> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        // One broker per data directory: taken before anything in it is read or written.
        let lock = crate::store::datadir::DataDirLock::acquire(dir)?;
        // TLS is checked (and `--tls auto`'s dev CA created) before anything else, so a bad
        // certificate fails the start and the CA exists once `open` returns.
        crate::tls::install_crypto_provider();
        let tls = crate::tls::server_tls(&config)?;
        // The admin listener answers /healthz from here on; /readyz once serving.
        let admin_http = crate::http::Admin::start(&config).map_err(StartError::Http)?;

        let (store, mut check, start_up_lock) = open_store(&config)?;
        let store = Arc::new(store);

        let clock = match config.clock {
            ClockKind::System => Clock::System,
            // The manual clock's time is state: a store that has one resumes it, whatever
            // `--clock-start` says (that sets the start of a fresh store's clock).
            ClockKind::Manual => match Broker::saved_clock(store.as_ref())? {
                Some(saved) => {
                    if config.clock_start.is_some_and(|start| start != saved) {
                        tracing::info!(
                            saved,
                            "the manual clock resumes at its saved time; --clock-start applies to a fresh data directory only"
                        );
                    }
                    Clock::manual(saved)
                }
                None => Clock::manual(config.clock_start.unwrap_or_else(crate::broker::clock::system_now)),
            },
        };
        let settings = Settings {
            vault_dns_suffix: config.vault_dns_suffix.clone(),
            location: config.location.clone(),
            tenant_id: config.tenant_id.clone(),
            subscription_id: config.subscription_id.clone(),
            resource_group: config.resource_group.clone(),
            tde: config.tde.clone(),
            trusted_service_bypass: config.trusted_service_bypass,
            trusted_proxies: config.trusted_proxies.clone(),
            caches: config.caches.clone(),
            throttling: config.throttling,
            feed: config.feed.clone(),
        };
        // The store's integrity check reads the file on a thread of its own while the store is
        // loaded here; until it has passed, the store is only read. Any failure meanwhile is
        // reported as damage when the check finds damage, as it is when the check runs first.
        let loaded = async {
            let holds_data = !store.is_blank()?;
            if !holds_data {
                // A new master key may be written: not beside a store that is damaged. (A store
                // without data is a few pages: its check is over at once.)
                check.wait()?;
            }
            let master = load_master_key(dir, holds_data)?;
            let sealer = Arc::new(Sealer::new(&master).map_err(MasterKeyError::Unusable)?);
            let broker = Broker::open(store.clone(), sealer.clone(), clock, settings).await?;
            Ok::<_, StartError>((broker, sealer))
        }
        .await;
        // Joining the check's thread blocks: on the blocking pool.
        tokio::task::spawn_blocking(move || check.wait()).await.map_err(|_| BrokerError::Internal)??;
        let (broker, sealer) = loaded?;
        // On a store shared by several brokers, start-up's one-time writes (the master-key
        // check, the signing key, the bootstrap admin, the seed) are made by one broker at a
        // time, each seeing what the ones before it wrote: two brokers starting together make
        // one signing key and one admin. (Alone on its store, a broker holds the lease at once.)
        broker.acquire_lease(crate::broker::feed::BOOTSTRAP_LEASE, BOOTSTRAP_PATIENCE).await?;
        let bootstrapped = async {
            broker.catch_up().await?;
            check_master_key(store.as_ref(), &sealer)?;
            let (signing_key, kid) = load_signing_key(store.as_ref(), &sealer)?;
            let auth = Arc::new(Authenticator::new(signing_key, kid, broker.clone()));
            let admin = bootstrap_admin(&broker).await?;
            if let Some(seed_path) = &config.seed {
                let caller = Caller::new(&admin.object_id, &admin.app_id, &broker.settings.issuer());
                seed::apply(&broker, &caller, seed_path).await?;
            }
            Ok::<_, StartError>((auth, admin))
        }
        .await;
        broker.release_lease(crate::broker::feed::BOOTSTRAP_LEASE).await;
        let (auth, admin) = bootstrapped?;
        let _ = admin_http.state.broker.set(broker.clone());
        let admin_token_path = dir.join(ADMIN_TOKEN_FILE);
        ensure_admin_token(&auth, &admin, &admin_token_path, config.admin_token_lifetime)?;
        // Keys whose retention ran out while the broker was down are purged now (on a shared
        // store, by the broker that holds the sweeper's lease).
        if broker.feed_status().is_none() {
            broker.purge_expired().await?;
        }
        if let crate::config::AuditLog::File(path) = &config.audit_log {
            crate::store::datadir::make_private(path).map_err(io_err(path))?;
        }
        let audit = Arc::new(crate::audit::AuditLog::open(&config.audit_log, config.audit_required));
        let rest = bind_rest(&config).await?;
        // Bootstrapped: the next broker on the same database may start.
        drop(start_up_lock);
        Ok(App { broker, auth, admin, admin_token_path, config, tls, rest, admin_http, audit, _lock: lock })
    }

    /// The admin HTTP listener's bound address, when it runs.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin_http.local_addr()
    }

    /// The REST (HTTPS) listener's bound address, when it runs.
    pub fn rest_addr(&self) -> Option<std::net::SocketAddr> {
        self.rest.as_ref().map(|r| r.addr)
    }

    /// The dev CA file clients trust for the REST listener (`<data-dir>/tls/ca.pem`).
    pub fn ca_path(&self) -> PathBuf {
        crate::tls::DevPki::in_data_dir(&self.config.data_dir).ca_cert
    }

    /// What a user needs to reach the broker, one line each: the gRPC address, the REST base, the
    /// vault URL pattern, the CA file and the token endpoints.
    pub fn endpoints(&self, grpc: std::net::SocketAddr) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut lines = vec![format!("gRPC:            {scheme}://{grpc}")];
        if let Some(rest) = self.rest_addr() {
            let port = rest.port();
            let tenant = &self.broker.settings.tenant_id;
            lines.extend([
                format!("REST base:       https://localhost:{port}/"),
                format!("vault URLs:      https://<vault>.{}:{port}/", crate::tls::REST_VAULT_DOMAIN),
                format!("CA certificate:  {}", self.ca_path().display()),
                format!("App Service MSI: https://localhost:{port}/msi/token"),
                format!("IMDS:            https://localhost:{port}/metadata/identity/oauth2/token"),
                format!("OpenID authority: https://localhost:{port}/{tenant}/"),
            ]);
        }
        lines
    }

    /// Issues a fresh admin token (both planes) valid for the configured lifetime of wall-clock
    /// time (see [`Authenticator::issue_operator_token`]).
    pub fn admin_token(&self) -> Result<String, BrokerError> {
        Ok(self
            .auth
            .issue_operator_token(
                &self.admin,
                &[MANAGEMENT_AUDIENCE, VAULT_AUDIENCE],
                self.config.admin_token_lifetime,
            )?
            .0)
    }

    /// Serves gRPC on `listener` until `shutdown` completes, then drains in-flight calls.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let limits = self.config.listener;
        // HTTP/2 is given more header list than the broker serves, so a list over the broker's
        // limit is answered on its own stream, not with a GOAWAY that ends the connection
        // (`ListenerSettings::h2_max_header_list_size` says why).
        // HTTP/2 abuse (tests/http2_abuse.rs, docs/reliability/http2.md): the streams a connection
        // may open and the resets it may cause are bounded (the constants say why).
        let builder = tonic::transport::Server::builder()
            .http2_max_header_list_size(limits.h2_max_header_list_size())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS));
        // TLS is the listener's (`listener::with_tls`), so the HTTP/2 preface is timed after the
        // handshake as well.
        let tls = self.tls.clone();
        let tls_on = tls.is_some();
        // Per-RPC metrics, audit records and spans (OTLP export when configured).
        let weak = Arc::downgrade(&self.broker);
        let databases = move || weak.upgrade().map(|b| b.database_counts().to_vec()).unwrap_or_default();
        let otel = crate::telemetry::Otel::start(&self.config.otlp, databases)?;
        let clock_of = self.broker.clone();
        let now: crate::grpc::observe::Now = Arc::new(move || clock_of.clock.now());
        let observe = crate::grpc::observe::ObserveLayer::new(
            now,
            self.audit.clone(),
            otel.clone(),
            limits.max_header_list_size,
        );
        let data = AuthInterceptor::new(self.auth.clone(), Plane::Data);
        let control = AuthInterceptor::new(self.auth.clone(), Plane::Control);

        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<KeyVaultServer<KeyVaultService>>().await;
        health_reporter.set_serving::<VaultsServer<VaultsService>>().await;
        health_reporter.set_serving::<EmulationServer<EmulationService>>().await;
        health_reporter.set_serving::<IdentitiesServer<IdentitiesService>>().await;
        health_reporter.set_serving::<ServersServer<ServersService>>().await;
        health_reporter.set_serving::<TdeEngineServer<EngineService>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::grpc::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;

        let keyvault = InterceptedService::new(
            KeyVaultServer::new(KeyVaultService::new(self.broker.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            data.clone(),
        );
        let vaults = InterceptedService::new(
            VaultsServer::new(VaultsService::new(self.broker.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            control.clone(),
        );
        let servers = InterceptedService::new(
            ServersServer::new(ServersService::new(
                self.broker.clone(),
                self.auth.clone(),
                (self.config.tls == crate::config::TlsMode::Auto).then(|| self.config.data_dir.clone()),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
            control.clone(),
        );
        let engine = InterceptedService::new(
            TdeEngineServer::new(EngineService::new(self.broker.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            data.clone(),
        );
        let identities = InterceptedService::new(
            IdentitiesServer::new(IdentitiesService::new(
                self.broker.clone(),
                self.auth.clone(),
                self.config.token_lifetime,
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
            control.clone(),
        );
        let emulation = InterceptedService::new(
            EmulationServer::new(EmulationService::new(self.broker.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            control,
        );

        // Soft-deleted keys are purged when their retention ends, and rotation policies carried
        // out when their time comes, also while nobody calls.
        let sweeper_broker = self.broker.clone();
        // The TDE prober evaluates every server each `probe_interval` of the broker's clock.
        // On a store shared by several brokers only the holder of the sweeper's lease purges,
        // rotates and probes; the lease is renewed every tick, and lapses `lease_ttl` after its
        // holder stops, when a survivor takes it over.
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                // Cache housekeeping (expiry, eviction, dropped decisions) can walk 100,000
                // entries: on the blocking pool, not on an executor thread that answers calls.
                let housekeeping = sweeper_broker.clone();
                if let Err(e) =
                    tokio::task::spawn_blocking(move || housekeeping.caches.run_pending_tasks()).await
                {
                    tracing::warn!(error = %e, "cache housekeeping failed; will retry");
                }
                if !sweeper_broker.hold_lease(crate::broker::feed::SWEEPER_LEASE).await {
                    continue;
                }
                if let Err(e) = sweeper_broker.purge_expired().await {
                    tracing::warn!(error = %e, "purging expired soft-deleted keys failed; will retry");
                }
                if let Err(e) = sweeper_broker.run_rotation_policies().await {
                    tracing::warn!(error = %e, "running key rotation policies failed; will retry");
                }
                if let Err(e) = sweeper_broker.probe_if_due().await {
                    tracing::warn!(error = %e, "TDE probe failed; will retry");
                }
            }
        });

        let addr = listener.local_addr().map_err(io_err(Path::new("listener")))?;
        tracing::info!(%addr, data_dir = %self.config.data_dir.display(), admin_token = %self.admin_token_path.display(), tls = ?self.config.tls, "tde-broker serving gRPC");
        if let Some(warning) = crate::listener::plaintext_warning(addr, tls_on) {
            tracing::warn!("{warning}");
        }
        if let Some(files) = crate::listener::open_file_limit()
            && u64::try_from(limits.max_connections).unwrap_or(u64::MAX) >= files
        {
            tracing::warn!(
                max_connections = limits.max_connections,
                open_file_limit = files,
                "max_connections is not below the open-file limit: file descriptors can run out before the bound is reached (accepts then back off); raise the limit (ulimit -n) or lower --max-connections"
            );
        }
        // Accept errors back off, connections are bounded, and a connection that sends no HTTP/2
        // preface in time is closed; under TLS the handshake is timed first, then the preface.
        let incoming = crate::listener::Incoming::new(listener, limits, !tls_on);
        let _ = self.admin_http.state.listener.set(incoming.stats());
        tracing::info!(endpoints = %self.endpoints(addr).join("; "), "how to reach the broker");
        // The REST listener serves beside gRPC and stops with it: the same shutdown starts its
        // drain, and `serve` returns once its connections have finished.
        let (rest_stop, mut rest_stopping) = tokio::sync::watch::channel(false);
        let rest_stop = Arc::new(rest_stop);
        let rest_stop_on_signal = rest_stop.clone();
        let rest_task = self.rest.take().map(|rest| {
            // The surfaces beside Key Vault's API, offered every request that names no vault: the
            // token endpoints and the Vault KV endpoint MariaDB reads its keys from.
            let surfaces: Vec<Arc<dyn crate::rest::Surface>> = vec![
                Arc::new(crate::rest::identity::IdentityEndpoints::new(
                    self.auth.clone(),
                    self.broker.clone(),
                    rest.identity_header,
                    self.config.token_lifetime,
                )),
                Arc::new(crate::rest::vault_kv::VaultKv::new(self.broker.clone())),
            ];
            let service = Arc::new(crate::rest::serve::RestService::new(
                self.broker.clone(),
                self.auth.clone(),
                surfaces,
                self.audit.clone(),
                otel.clone(),
            ));
            let stop = async move {
                let _ = rest_stopping.wait_for(|s| *s).await;
            };
            tokio::spawn(service.serve(rest.listener, rest.tls, limits, stop))
        });
        let stopping = self.broker.clone();
        let admin_state = self.admin_http.state.clone();
        let reporter = health_reporter.clone();
        let shutdown = async move {
            shutdown.await;
            let _ = rest_stop_on_signal.send(true);
            // /readyz and gRPC health say NOT_SERVING while in-flight calls drain.
            admin_state.readiness.set_draining();
            set_not_serving(&reporter).await;
            stopping.begin_shutdown();
        };
        self.admin_http.state.readiness.set_ready();
        let router = builder
            .layer(observe)
            .add_service(health)
            .add_service(reflection)
            .add_service(keyvault)
            .add_service(vaults)
            .add_service(emulation)
            .add_service(identities)
            .add_service(servers)
            .add_service(engine);
        let result = match tls {
            Some(tls) => {
                router.serve_with_incoming_shutdown(crate::listener::with_tls(incoming, tls), shutdown).await
            }
            None => router.serve_with_incoming_shutdown(incoming, shutdown).await,
        };
        // Also when gRPC ended without the signal (a transport error): REST stops with it.
        let _ = rest_stop.send(true);
        if let Some(task) = rest_task {
            let _ = task.await;
        }
        sweeper.abort();
        // A survivor takes the once-only work over at once rather than after the lease's TTL.
        self.broker.release_lease(crate::broker::feed::SWEEPER_LEASE).await;
        if let Some(otel) = &otel {
            otel.shutdown().await;
        }
        tracing::info!("tde-broker stopped");
        Ok(result?)
    }
}

/// Every service (and the server as a whole, `""`) NOT_SERVING in gRPC health.
async fn set_not_serving(reporter: &tonic_health::server::HealthReporter) {
    reporter.set_not_serving::<KeyVaultServer<KeyVaultService>>().await;
    reporter.set_not_serving::<VaultsServer<VaultsService>>().await;
    reporter.set_not_serving::<EmulationServer<EmulationService>>().await;
    reporter.set_not_serving::<IdentitiesServer<IdentitiesService>>().await;
    reporter.set_not_serving::<ServersServer<ServersService>>().await;
    reporter.set_not_serving::<TdeEngineServer<EngineService>>().await;
    reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
}

/// Opens the store `--store` names: the only place a backend is chosen. The SQLite store of the
/// data directory is refused when it is missing, empty, damaged or another directory's, unless
/// `--reinitialize` asks to start afresh; a shared PostgreSQL store when it is not the database
/// this directory served (`store::datadir`). With PostgreSQL the returned lock keeps other
/// brokers from starting up on the database until this one has bootstrapped.
fn open_store(
    config: &Config,
) -> Result<
    (
        crate::store::datadir::DataStore,
        crate::store::datadir::PendingCheck,
        Option<crate::store::postgres::StartUpLock>,
    ),
    StartError,
> {
    use crate::store::datadir::{DataStore, PendingCheck};
    let dir = &config.data_dir;
    if let crate::config::StoreSetting::Postgres(url) = &config.store {
        tracing::info!(store = %url, "opening the shared PostgreSQL store");
        let store = crate::store::datadir::open_shared_store(dir, url, config.reinitialize)?;
        let lock = store.start_up_lock()?;
        return Ok((DataStore::Postgres(Box::new(store)), PendingCheck::none(), Some(lock)));
    }
    let first_start_files = [dir.join(MASTER_KEY_FILE), dir.join(ADMIN_TOKEN_FILE)];
    if config.reinitialize {
        tracing::warn!(data_dir = %dir.display(), "--reinitialize: a store that is missing, empty, damaged or another directory's is renamed aside and a new, empty one made in its place");
    }
    let opened = crate::store::datadir::open_store(&crate::store::datadir::OpenStore {
        dir,
        db: &dir.join(DB_FILE),
        check: config.store_check,
        reinitialize: config.reinitialize,
        first_start_files: &first_start_files,
    })?;
    Ok((DataStore::Sqlite(opened.store), opened.check, None))
}

/// The master key from the environment or the data directory's file. A new key is made (and
/// written to the file) only while the store holds no data: never for a store sealed under a
/// key that is missing.
fn load_master_key(dir: &Path, store_holds_data: bool) -> Result<Zeroizing<Vec<u8>>, StartError> {
    let decode = |text: &str, origin: &str| -> Result<Zeroizing<Vec<u8>>, StartError> {
        let key = Zeroizing::new(
            B64.decode(text.trim())
                .map_err(|source| MasterKeyError::NotBase64 { origin: origin.to_string(), source })?,
        );
        if key.len() != 32 {
            Err(MasterKeyError::WrongLength { origin: origin.to_string(), found: key.len() })?;
        }
        Ok(key)
    };
    if let Ok(text) = std::env::var(MASTER_KEY_ENV) {
        return decode(&Zeroizing::new(text), MASTER_KEY_ENV);
    }
    let path = dir.join(MASTER_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => decode(&Zeroizing::new(text), &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && store_holds_data => {
            Err(MasterKeyError::Missing { path }.into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Sealer::generate_master_key();
            write_secret(&path, Zeroizing::new(B64.encode(&key)).as_bytes())?;
            tracing::info!(path = %path.display(), "generated a new master key; back it up: without it the data directory cannot be opened");
            Ok(key)
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// A data directory opened with the wrong master key must fail loudly at start, not later.
fn check_master_key(store: &crate::store::datadir::DataStore, sealer: &Sealer) -> Result<(), StartError> {
    use crate::store::Store;
    match store.get_meta(META_MASTER_CHECK)? {
        Some(sealed) => {
            let plain =
                sealer.unseal(META_MASTER_CHECK.as_bytes(), &sealed).map_err(MasterKeyError::DoesNotOpen)?;
            if plain.as_slice() != MASTER_CHECK_PLAINTEXT {
                Err(MasterKeyError::WrongCheckValue)?;
            }
        }
        None => {
            let sealed = sealer
                .seal(META_MASTER_CHECK.as_bytes(), MASTER_CHECK_PLAINTEXT)
                .map_err(MasterKeyError::Unusable)?;
            store.put_meta(META_MASTER_CHECK, &sealed)?;
        }
    }
    Ok(())
}

fn load_signing_key(
    store: &crate::store::datadir::DataStore,
    sealer: &Sealer,
) -> Result<(TokenSigningKey, String), StartError> {
    use crate::store::Store;
    let master_err = MasterKeyError::SigningKey;
    if let (Some(sealed), Some(kid)) = (store.get_meta(META_SIGNING_KEY)?, store.get_meta(META_SIGNING_KID)?)
    {
        let der = sealer.unseal(META_SIGNING_KEY.as_bytes(), &sealed).map_err(master_err)?;
        let key = TokenSigningKey::from_pkcs8(&der).map_err(master_err)?;
        return Ok((key, String::from_utf8_lossy(&kid).into_owned()));
    }
    let (key, der) = TokenSigningKey::generate().map_err(master_err)?;
    let sealed = sealer.seal(META_SIGNING_KEY.as_bytes(), &der).map_err(master_err)?;
    let kid = hex::encode(crate::crypto::random_bytes(8));
    store.put_meta(META_SIGNING_KEY, &sealed)?;
    store.put_meta(META_SIGNING_KID, kid.as_bytes())?;
    Ok((key, kid))
}

async fn bootstrap_admin(broker: &Arc<Broker>) -> Result<Principal, StartError> {
    let store = broker.store().clone();
    if let Some(oid) = store.get_meta(META_ADMIN)? {
        let oid = String::from_utf8_lossy(&oid).into_owned();
        return broker.principal(&oid).ok_or(StartError::AdminMissing { object_id: oid });
    }
    let admin = Principal {
        object_id: new_guid(),
        app_id: new_guid(),
        name: "admin".to_string(),
        kind: PrincipalKind::User,
        resource_id: None,
        created: broker.clock.now(),
        client_secret_hash: None,
    };
    let owner = RoleAssignment {
        id: new_guid(),
        scope: "/".to_string(),
        display_scope: "/".to_string(),
        principal_id: admin.object_id.clone(),
        role: Role::Owner,
    };
    let txn = broker.begin().await;
    broker.commit(txn, vec![Change::PutPrincipal(admin.clone()), Change::PutRoleAssignment(owner)]).await?;
    store.put_meta(META_ADMIN, admin.object_id.as_bytes())?;
    tracing::info!(object_id = %admin.object_id, "bootstrapped the admin principal (Owner at /)");
    Ok(admin)
}

/// Writes the admin token at first start, and again whenever the file is missing or its token
/// no longer validates (expired, or signed by a previous key). It is an operator's token: its
/// lifetime runs on wall-clock time, so no move of the manual clock locks the admin out.
fn ensure_admin_token(
    auth: &Authenticator,
    admin: &Principal,
    path: &Path,
    lifetime: i64,
) -> Result<(), StartError> {
    if let Ok(existing) = std::fs::read_to_string(path)
        && auth.validate(existing.trim(), Plane::Control).is_ok()
    {
        return Ok(());
    }
    let (token, _) = auth.issue_operator_token(admin, &[MANAGEMENT_AUDIENCE, VAULT_AUDIENCE], lifetime)?;
    write_secret(path, token.as_bytes())?;
    tracing::info!(path = %path.display(), "wrote the admin token");
    Ok(())
}
