//! Test harness: a real broker serving gRPC on an ephemeral loopback port, and authenticated
//! clients for it; `observed`: a broker with its admin listener and a strict `/metrics` parser;
//! `python`: the virtualenvs of the checks against Python tools; `pg`: a throwaway PostgreSQL.
#![allow(dead_code)]

pub mod observed;
#[path = "../support/pg.rs"]
pub mod pg;
pub mod python;
pub mod rawh2;

use std::path::PathBuf;
use std::sync::Arc;

use tde_broker::auth::Authenticator;
use tde_broker::config::{ClockKind, Config};
use tde_broker::grpc::proto::emulation_client::EmulationClient;
use tde_broker::grpc::proto::key_vault_client::KeyVaultClient;
use tde_broker::grpc::proto::vaults_client::VaultsClient;
use tde_broker::grpc::proto::{self};
use tde_broker::model::Principal;
use tde_broker::server::App;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Adds `authorization: Bearer …` to every request (or nothing, for `None`).
#[derive(Clone)]
pub struct Bearer(pub Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

pub type Kv = KeyVaultClient<InterceptedService<Channel, Bearer>>;
pub type Vaults = VaultsClient<InterceptedService<Channel, Bearer>>;
pub type Emu = EmulationClient<InterceptedService<Channel, Bearer>>;

/// A broker running in this process.
pub struct TestBroker {
    pub addr: std::net::SocketAddr,
    pub token: String,
    pub auth: Arc<Authenticator>,
    pub admin: Principal,
    pub channel: Channel,
    pub data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
}

/// A broker on a manual clock in a fresh data directory.
pub async fn start() -> TestBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let mut b = start_in(&path, ClockKind::Manual).await;
    b._dir = Some(dir);
    b
}

/// A broker on `data_dir` (kept by the caller).
pub async fn start_in(data_dir: &std::path::Path, clock: ClockKind) -> TestBroker {
    let mut cfg = Config::for_data_dir(data_dir);
    cfg.clock = clock;
    cfg.clock_start = Some(1_800_000_000);
    start_cfg(cfg).await
}

/// A broker with this configuration (its data directory is kept by the caller).
pub async fn start_cfg(cfg: Config) -> TestBroker {
    serve_app(cfg, None, None).await
}

/// Opens and serves a broker on an ephemeral loopback port; connects over TLS trusting
/// `trusted_ca` when given, else in plaintext. `dir` (the data directory) lives as long as it.
async fn serve_app(cfg: Config, trusted_ca: Option<PathBuf>, dir: Option<tempfile::TempDir>) -> TestBroker {
    let data_dir = cfg.data_dir.clone();
    let app = App::open(cfg).await.expect("broker starts");
    let token = app.admin_token().expect("admin token");
    let auth = app.auth.clone();
    let admin = app.admin.clone();
    let (addr, tx, served) = spawn_serving(app).await;
    let channel = match trusted_ca {
        Some(ca) => {
            let ca = std::fs::read(&ca).expect("CA to trust");
            tls_channel(addr, &ca, None).await.expect("connect over TLS")
        }
        None => {
            Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect")
        }
    };
    TestBroker {
        addr,
        token,
        auth,
        admin,
        channel,
        data_dir,
        _dir: dir,
        shutdown: Some(tx),
        served: Some(served),
    }
}

/// Serves `app` on an ephemeral loopback port until the returned sender fires (or is dropped).
pub async fn spawn_serving(
    app: App,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        app.serve(listener, async {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    (addr, tx, served)
}

pub fn bearer(token: &str) -> Bearer {
    Bearer(Some(format!("Bearer {token}").parse().expect("ascii token")))
}

impl TestBroker {
    pub fn kv(&self) -> Kv {
        KeyVaultClient::with_interceptor(self.channel.clone(), bearer(&self.token))
    }
    pub fn kv_with(&self, b: Bearer) -> Kv {
        KeyVaultClient::with_interceptor(self.channel.clone(), b)
    }
    pub fn vaults(&self) -> Vaults {
        VaultsClient::with_interceptor(self.channel.clone(), bearer(&self.token))
    }
    pub fn vaults_with(&self, b: Bearer) -> Vaults {
        VaultsClient::with_interceptor(self.channel.clone(), b)
    }
    pub fn emu(&self) -> Emu {
        EmulationClient::with_interceptor(self.channel.clone(), bearer(&self.token))
    }

    pub fn key_uri(&self, vault: &str, name: &str) -> String {
        format!("https://{vault}.vault.azure.net/keys/{name}")
    }

    /// A vault in which the admin holds every key permission.
    pub async fn vault(&self, name: &str, purge_protection: bool) {
        self.vaults()
            .create_vault(proto::CreateVaultRequest {
                name: name.into(),
                enable_purge_protection: purge_protection,
                ..Default::default()
            })
            .await
            .expect("create vault");
        self.vaults()
            .set_access_policy(proto::SetAccessPolicyRequest {
                vault_name: name.into(),
                object_id: self.admin.object_id.clone(),
                key_permissions: vec!["all".into()],
            })
            .await
            .expect("policy");
    }

    pub async fn key(&self, vault: &str, name: &str, kty: &str, size: i32) -> proto::KeyBundle {
        self.create_key(proto::CreateKeyRequest {
            vault_name: vault.into(),
            name: name.into(),
            kty: kty.into(),
            key_size: size,
            ..Default::default()
        })
        .await
        .expect("create key")
    }

    pub async fn create_key(&self, req: proto::CreateKeyRequest) -> Result<proto::KeyBundle, Status> {
        self.kv().create_key(req).await.map(|r| r.into_inner())
    }

    pub async fn advance(&self, seconds: i64) -> i64 {
        self.emu()
            .advance_clock(proto::AdvanceClockRequest { seconds })
            .await
            .expect("advance")
            .into_inner()
            .now
    }

    pub async fn now(&self) -> i64 {
        self.emu().get_clock(proto::GetClockRequest {}).await.expect("clock").into_inner().now
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.served.take() {
            let _ = h.await;
        }
    }
}

pub fn kid(b: &proto::KeyBundle) -> String {
    b.key.as_ref().expect("key").kid.clone()
}

pub fn crypto_req(key_id: &str, alg: &str, value: &[u8]) -> proto::WrapKeyRequest {
    proto::WrapKeyRequest {
        key_id: key_id.into(),
        algorithm: alg.into(),
        value: value.to_vec(),
        ..Default::default()
    }
}

pub fn unwrap_req(key_id: &str, alg: &str, value: &[u8]) -> proto::UnwrapKeyRequest {
    proto::UnwrapKeyRequest {
        key_id: key_id.into(),
        algorithm: alg.into(),
        value: value.to_vec(),
        ..Default::default()
    }
}

/// Asserts a status code and `ErrorInfo.reason`, returning the message.
pub fn assert_status(r: Result<impl std::fmt::Debug, Status>, code: Code, reason: &str) -> String {
    let s = r.expect_err("expected an error");
    assert_eq!(s.code(), code, "message: {}", s.message());
    assert_eq!(tde_broker::grpc::status::reason(&s).as_deref(), Some(reason), "message: {}", s.message());
    s.message().to_string()
}

/// The broker's CSPRNG as a `rand_core` RNG, for the independent `rsa` crate.
pub struct TestRng;

impl rsa::rand_core::TryRng for TestRng {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        dst.copy_from_slice(&tde_broker::crypto::random_bytes(dst.len()));
        Ok(())
    }
}

impl rsa::rand_core::TryCryptoRng for TestRng {}

/// Runs a tool the test needs, failing with what to install when it is missing.
pub fn run_tool(program: &str, args: &[&str], install_hint: &str) -> std::process::Output {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): install it ({install_hint})"));
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

pub type Ids =
    tde_broker::grpc::proto::identities_client::IdentitiesClient<InterceptedService<Channel, Bearer>>;

/// A principal created through the API, with a token for it.
pub struct Who {
    pub object_id: String,
    pub app_id: String,
    pub token: String,
}

/// The claims of a token (no verification: tests read what the broker issued).
pub fn claims(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("jwt payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url");
    serde_json::from_slice(&bytes).expect("json claims")
}

impl TestBroker {
    pub fn ids(&self) -> Ids {
        tde_broker::grpc::proto::identities_client::IdentitiesClient::with_interceptor(
            self.channel.clone(),
            bearer(&self.token),
        )
    }

    pub fn ids_with(&self, b: Bearer) -> Ids {
        tde_broker::grpc::proto::identities_client::IdentitiesClient::with_interceptor(
            self.channel.clone(),
            b,
        )
    }

    /// A user principal and its token.
    pub async fn user(&self, name: &str) -> Who {
        let r = self
            .ids()
            .create_user(proto::CreateUserRequest { name: name.into() })
            .await
            .expect("user")
            .into_inner();
        let app_id = claims(&r.token)["appid"].as_str().expect("appid").to_string();
        Who { object_id: r.principal_id, app_id, token: r.token }
    }

    /// A user-assigned identity in resource group `rg` and a Key Vault token for it.
    pub async fn identity(&self, rg: &str, name: &str) -> (proto::Identity, Who) {
        let id = self
            .ids()
            .create_user_assigned_identity(proto::CreateUserAssignedIdentityRequest {
                resource_group: rg.into(),
                name: name.into(),
                ..Default::default()
            })
            .await
            .expect("identity")
            .into_inner();
        let token = self
            .ids()
            .get_token(proto::GetTokenRequest { client_id: id.client_id.clone(), ..Default::default() })
            .await
            .expect("identity token")
            .into_inner()
            .access_token;
        let who = Who { object_id: id.principal_id.clone(), app_id: id.client_id.clone(), token };
        (id, who)
    }

    pub async fn policy(&self, vault: &str, object_id: &str, perms: &[&str]) {
        self.vaults()
            .set_access_policy(proto::SetAccessPolicyRequest {
                vault_name: vault.into(),
                object_id: object_id.into(),
                key_permissions: perms.iter().map(|p| p.to_string()).collect(),
            })
            .await
            .expect("set policy");
    }

    pub async fn assign(&self, scope: &str, principal_id: &str, role: &str) -> proto::RoleAssignment {
        self.vaults()
            .create_role_assignment(proto::CreateRoleAssignmentRequest {
                scope: scope.into(),
                principal_id: principal_id.into(),
                role_name: role.into(),
            })
            .await
            .expect("role assignment")
            .into_inner()
    }
}

/// A broker on a manual clock in a fresh data directory whose configuration `modify` changes
/// first (e.g. TLS on). With TLS on, `channel` speaks https to 127.0.0.1 without a client
/// certificate, trusting the dev CA of the data directory — or, with certificate files, the
/// configured client CA (tests sign both with one CA).
pub async fn start_with(modify: impl FnOnce(&mut Config)) -> TestBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::for_data_dir(dir.path());
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(1_800_000_000);
    modify(&mut cfg);
    let tls = cfg.tls != tde_broker::config::TlsMode::Off;
    let trusted = match &cfg.tls {
        tde_broker::config::TlsMode::Files { .. } => cfg.client_ca.clone().expect("client CA to trust"),
        _ => tde_broker::tls::DevPki::in_data_dir(dir.path()).ca_cert,
    };
    serve_app(cfg, tls.then_some(trusted), Some(dir)).await
}

/// An https channel to `addr` trusting `ca_pem`, presenting `identity` (cert PEM, key PEM).
pub async fn tls_channel(
    addr: std::net::SocketAddr,
    ca_pem: &[u8],
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}")).expect("uri").tls_config(tls)?.connect().await
}

pub type Srv = tde_broker::grpc::proto::servers_client::ServersClient<InterceptedService<Channel, Bearer>>;
pub type Engine =
    tde_broker::grpc::proto::tde_engine_client::TdeEngineClient<InterceptedService<Channel, Bearer>>;

impl TestBroker {
    pub fn servers(&self) -> Srv {
        tde_broker::grpc::proto::servers_client::ServersClient::with_interceptor(
            self.channel.clone(),
            bearer(&self.token),
        )
    }

    /// The engine client of a server, with a fresh host credential.
    pub async fn engine(&self, server_id: &str) -> Engine {
        let cred = self
            .servers()
            .issue_host_credential(proto::IssueHostCredentialRequest { server_id: server_id.into() })
            .await
            .expect("host credential")
            .into_inner();
        tde_broker::grpc::proto::tde_engine_client::TdeEngineClient::with_interceptor(
            self.channel.clone(),
            bearer(&cred.token),
        )
    }

    pub async fn database(&self, server_id: &str, name: &str) -> proto::Database {
        self.servers()
            .get_database(proto::GetDatabaseRequest { server_id: server_id.into(), name: name.into() })
            .await
            .expect("get database")
            .into_inner()
    }
}

/// A channel to the broker whose TCP connection comes from `source` (a loopback address such as
/// 127.0.0.2): the broker sees that address as the peer.
pub async fn channel_from(addr: std::net::SocketAddr, source: &str) -> Channel {
    let src: std::net::IpAddr = source.parse().expect("source address");
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_with_connector(tower::service_fn(move |_uri: tonic::transport::Uri| async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(std::net::SocketAddr::new(src, 0))?;
            let stream = socket.connect(addr).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }))
        .await
        .expect("connect from a loopback source address")
}

impl TestBroker {
    /// A KeyVault client for `token` whose connection comes from `source`.
    pub async fn kv_from(&self, source: &str, token: &str) -> Kv {
        KeyVaultClient::with_interceptor(channel_from(self.addr, source).await, bearer(token))
    }

    pub async fn firewall(&self, vault: &str, acls: proto::NetworkAcls, public: Option<&str>) {
        self.vaults()
            .update_vault(proto::UpdateVaultRequest {
                name: vault.into(),
                network_acls: Some(acls),
                public_network_access: public.map(String::from),
                ..Default::default()
            })
            .await
            .expect("update vault network");
    }
}

/// A manual-clock configuration read from `toml` (through `Config::resolve`, as `--config`
/// would), with a fresh data directory kept alive by the returned guard.
pub fn config_from_toml(toml: &str) -> (Config, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("config.toml"), toml).expect("write config");
    let mut cfg = Config::resolve(tde_broker::config::ServeArgs {
        config: Some(dir.path().join("config.toml")),
        data_dir: Some(dir.path().join("data")),
        ..Default::default()
    })
    .expect("valid configuration");
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(1_800_000_000);
    (cfg, dir)
}

/// CPU seconds (user + system) process `pid` has used, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    let after_name = stat.rsplit_once(')').expect("stat format").1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name, field 3 of stat(5) (state) comes first; utime and stime are 14 and 15.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    ticks as f64 / per_second
}
