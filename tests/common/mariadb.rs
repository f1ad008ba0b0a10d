//! MariaDB through the Vault-KV surface: a broker whose `Broker` the test also holds (to call the
//! surface's handler directly), a SQL server with a customer-managed protector, and a throwaway
//! `mariadbd` (its own data directory, port and socket) driven by the `mariadb` client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use tde_broker::broker::Broker;
use tde_broker::config::{ClockKind, Config};
use tde_broker::grpc::proto;
use tde_broker::rest::{Handled, Reply, RestRequest, Surface};
use tde_broker::server::App;

use super::TestBroker;

pub const INSTALL: &str = "install mariadb-server mariadb-plugin-hashicorp-key-management";
pub const TDE_PERMS: [&str; 3] = ["get", "wrapKey", "unwrapKey"];

/// A broker on a manual clock (fresh data directory, `modify` applied to its configuration) and
/// its `Broker`.
pub async fn start_holding(modify: impl FnOnce(&mut Config)) -> (TestBroker, Arc<Broker>) {
    let (b, broker, _) = start_holding_rest(modify).await;
    (b, broker)
}

/// As [`start_holding`], with the REST listener's address and CA file when `modify` turned it on.
pub async fn start_holding_rest(
    modify: impl FnOnce(&mut Config),
) -> (TestBroker, Arc<Broker>, Option<(std::net::SocketAddr, PathBuf)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::for_data_dir(dir.path());
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(1_800_000_000);
    modify(&mut cfg);
    let data_dir = cfg.data_dir.clone();
    let app = App::open(cfg).await.expect("broker starts");
    let broker = app.broker.clone();
    let rest = app.rest_addr().map(|a| (a, app.ca_path()));
    let b = super::serve_opened(app, data_dir, None, Some(dir)).await;
    (b, broker, rest)
}

/// A SQL server `name` whose primary UMI holds get/wrapKey/unwrapKey on an RSA-2048 protector in
/// the purge-protected vault `vault`.
pub struct CmkServer {
    pub server: proto::Server,
    pub umi: proto::Identity,
    pub vault: String,
    pub key: String,
}

pub async fn cmk_server(b: &TestBroker, vault: &str, name: &str) -> CmkServer {
    b.vault(vault, true).await;
    b.key(vault, "tde", "RSA", 2048).await;
    let key = b.key_uri(vault, "tde");
    let (umi, who) = b.identity("id-rg", &format!("{name}-umi")).await;
    b.policy(vault, &who.object_id, &TDE_PERMS).await;
    let server = b
        .servers()
        .create_server(proto::CreateServerRequest {
            resource_group: "sql-rg".into(),
            name: name.into(),
            kind: proto::ServerKind::SqlServer as i32,
            identity: Some(proto::ServerIdentity {
                user_assigned_identity_ids: vec![umi.resource_id.clone()],
                ..Default::default()
            }),
            key_id: key.clone(),
            ..Default::default()
        })
        .await
        .expect("CMK server")
        .into_inner();
    CmkServer { server, umi, vault: vault.into(), key }
}

/// `SetupVaultKvMount` as the admin.
pub async fn setup_mount(
    b: &TestBroker,
    server_id: &str,
    mount: &str,
    keys: &[u32],
) -> proto::SetupVaultKvMountResponse {
    b.servers()
        .setup_vault_kv_mount(proto::SetupVaultKvMountRequest {
            server_id: server_id.into(),
            mount: mount.into(),
            database: String::new(),
            key_ids: keys.to_vec(),
        })
        .await
        .expect("setup mount")
        .into_inner()
}

/// A GET as the plugin makes it, handled by the surface.
pub async fn get(surface: &dyn Surface, path: &str, token: Option<&str>) -> Handled {
    let mut req = http::Request::builder().method("GET").uri(path);
    if let Some(t) = token {
        req = req.header("X-Vault-Token", t);
    }
    let (parts, ()) = req.body(()).expect("request").into_parts();
    let request =
        RestRequest { parts, body: bytes::Bytes::new(), peer: "127.0.0.1:40000".parse().expect("addr") };
    surface.handle(&request).await.expect("the surface answers the plugin's paths")
}

/// Status and JSON body of an answered request (panics on a dropped connection).
pub fn answered(h: &Handled) -> (u16, serde_json::Value) {
    match &h.reply {
        Reply::Http(r) => (r.status().as_u16(), serde_json::from_slice(r.body()).expect("a JSON body")),
        Reply::Drop => panic!("{}: the connection was dropped ({})", h.operation, h.outcome),
    }
}

/// The key bytes (hex) and version of a successful read.
pub fn key_of(h: &Handled) -> (String, u64) {
    let (status, body) = answered(h);
    assert_eq!(status, 200, "{body}");
    let hex = body["data"]["data"]["data"].as_str().expect("key data").to_string();
    let version = body["data"]["metadata"]["version"].as_u64().expect("version number");
    (hex, version)
}

/// A program on PATH or in the usual sbin directories.
pub fn program(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} was not found: {INSTALL}");
}

/// A throwaway MariaDB server.
pub struct Mariadb {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Mariadb {
    /// `mariadb-install-db` into a fresh directory.
    pub fn install() -> Mariadb {
        let plugin = Path::new("/usr/lib/mysql/plugin/hashicorp_key_management.so");
        assert!(
            plugin.exists() || std::fs::read_dir("/usr/lib").is_ok_and(|_| glob_plugin()),
            "the hashicorp_key_management plugin is missing: {INSTALL}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let out = Command::new(program("mariadb-install-db"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .args(as_root())
            .output()
            .unwrap_or_else(|e| panic!("mariadb-install-db: {e}: {INSTALL}"));
        assert!(out.status.success(), "mariadb-install-db failed: {}", String::from_utf8_lossy(&out.stderr));
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        Mariadb { dir, port, child: None }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    pub fn error_log(&self) -> PathBuf {
        self.dir.path().join("error.log")
    }

    /// Starts `mariadbd` with `options` (and `VAULT_TOKEN` in its environment) and waits until
    /// it answers, or until it exits (then `Err` with the error log's tail).
    pub fn start(&mut self, options: &[String], vault_token: &str) -> Result<(), String> {
        let child = Command::new(program("mariadbd"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.data().display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--pid-file={}", self.dir.path().join("mysqld.pid").display()))
            .arg(format!("--log-error={}", self.error_log().display()))
            .arg(format!("--tmpdir={}", self.dir.path().display()))
            .arg("--skip-log-bin")
            .arg("--innodb-buffer-pool-size=32M")
            .arg("--innodb-log-file-size=16M")
            .args(as_root())
            .args(options)
            .env("VAULT_TOKEN", vault_token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("mariadbd: {e}: {INSTALL}"));
        self.child = Some(child);
        for _ in 0..600 {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("mariadbd exited ({status}):\n{}", self.log_tail()));
            }
            if self.sql("SELECT 1").is_ok() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err(format!("mariadbd did not answer within a minute:\n{}", self.log_tail()))
    }

    /// Whether mariadbd is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A clean shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = self.sql("SHUTDOWN");
            let _ = child.wait();
        }
    }

    /// Runs `statement` with the `mariadb` client as root over the socket: stdout, or stderr.
    pub fn sql(&self, statement: &str) -> Result<String, String> {
        let out = Command::new(program("mariadb"))
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-uroot", "--batch", "--skip-column-names", "-e", statement])
            .output()
            .unwrap_or_else(|e| panic!("mariadb client: {e}: {INSTALL}"));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.error_log()).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn glob_plugin() -> bool {
    Command::new("sh")
        .args(["-c", "ls /usr/lib/*/mariadb*/plugin/hashicorp_key_management.so /usr/lib/mysql/plugin/hashicorp_key_management.so 2>/dev/null | grep -q ."])
        .status()
        .is_ok_and(|s| s.success())
}

/// `--user=root` when the test runs as root (mariadbd refuses root otherwise).
fn as_root() -> Vec<String> {
    let uid =
        Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.is_ok_and(|u| u == "0") { vec!["--user=root".to_string()] } else { Vec::new() }
}
