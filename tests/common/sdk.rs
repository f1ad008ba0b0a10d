//! The Azure SDKs against the broker: a broker serving gRPC and its HTTPS listener (Key Vault's
//! REST API and the token endpoints), the SDKs installed once under `target/` at pinned versions,
//! and the scripts of `tests/sdk` run with nothing but documented environment variables: the
//! vault URL, the broker's dev CA (`REQUESTS_CA_BUNDLE`, `NODE_EXTRA_CA_CERTS`) and the
//! credential's environment.
//!
//! A script gets a list of steps (JSON) and prints, per step, `{"ok": …}` or `{"error": {"type",
//! "status", "code", "inner", "message"}}` with the HTTP responses the SDK received for it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::common::{TestBroker, claims, node, python, serve_opened};
use serde_json::Value;
use tde_broker::config::{ClockKind, Config};
use tde_broker::grpc::proto;
use tde_broker::server::App;

/// The Python packages, pinned with their dependencies (`pip freeze` of the virtualenv).
pub const PYTHON_PACKAGES: &[&str] = &[
    "azure-keyvault-keys==4.11.0",
    "azure-identity==1.27.0",
    "msal==1.39.0",
    "msal-extensions==1.3.1",
    "azure-core==1.41.0",
    "cryptography==50.0.2",
    "cffi==2.1.1",
    "pycparser==3.12",
    "isodate==0.7.2",
    "PyJWT==2.15.1",
    "requests==2.34.2",
    "urllib3==2.8.0",
    "idna==3.21",
    "charset-normalizer==3.5.3",
    "certifi==2026.10.19.post1",
    "typing_extensions==4.16.0",
];

pub const INSTALL_RESOLVER: &str = "names under .localhost must resolve to the loopback address: install libnss-myhostname \
     (apt-get install libnss-myhostname; it adds `myhostname` to the hosts line of /etc/nsswitch.conf)";

/// A broker with its HTTPS listener.
pub struct Rest {
    pub broker: TestBroker,
    /// The HTTPS listener's address.
    pub rest: SocketAddr,
    /// The dev CA the HTTPS certificate is issued by.
    pub ca: PathBuf,
    /// The broker's tenant.
    pub tenant: String,
}

/// A service principal: its object id and its client credentials.
pub struct ServicePrincipal {
    pub object_id: String,
    pub client_id: String,
    pub client_secret: String,
}

/// A broker on a manual clock in a fresh data directory, serving gRPC in plaintext and its HTTPS
/// listener on an ephemeral loopback port; `modify` changes the configuration first.
pub async fn start(modify: impl FnOnce(&mut Config)) -> Rest {
    check_localhost_resolves();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::for_data_dir(dir.path());
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(1_800_000_000);
    cfg.rest_listen = Some("127.0.0.1:0".parse().expect("address"));
    modify(&mut cfg);
    let data_dir = cfg.data_dir.clone();
    let app = App::open(cfg).await.expect("broker starts");
    let rest = app.rest_addr().expect("the HTTPS listener runs");
    let broker = serve_opened(app, data_dir.clone(), None, Some(dir)).await;
    let tenant = claims(&broker.token)["tid"].as_str().expect("tid").to_string();
    let ca = tde_broker::tls::DevPki::in_data_dir(&data_dir).ca_cert;
    assert!(ca.exists(), "the dev CA {} was written at start", ca.display());
    Rest { broker, rest, ca, tenant }
}

/// The SDKs reach the broker at `<vault>.vault.localhost`: that name must resolve to 127.0.0.1
/// without any change to the SDKs (glibc resolves it with the `myhostname` NSS module).
fn check_localhost_resolves() {
    use std::net::ToSocketAddrs;
    let resolved: Vec<SocketAddr> = ("resolver-check.vault.localhost", 443)
        .to_socket_addrs()
        .unwrap_or_else(|e| {
            panic!("resolver-check.vault.localhost does not resolve ({e}): {INSTALL_RESOLVER}")
        })
        .collect();
    assert!(
        resolved.iter().any(|a| a.ip() == std::net::IpAddr::from([127, 0, 0, 1])),
        "resolver-check.vault.localhost resolves to {resolved:?}, not 127.0.0.1: {INSTALL_RESOLVER}"
    );
}

impl Rest {
    /// `https://<vault>.vault.localhost:<port>`, the vault URL an application configures.
    pub fn vault_url(&self, vault: &str) -> String {
        format!("https://{vault}.vault.localhost:{}", self.rest.port())
    }

    /// `https://localhost:<port>`: the authority host and the token endpoints' host.
    pub fn authority_host(&self) -> String {
        format!("https://localhost:{}", self.rest.port())
    }

    /// A credential environment: App Service managed identity for `client_id`.
    pub fn app_service(&self, client_id: &str) -> Vec<(String, String)> {
        let header = std::fs::read_to_string(self.broker.data_dir.join("identity.header"))
            .expect("<data-dir>/identity.header");
        vars(&[
            ("SDK_CREDENTIAL", "appservice"),
            ("MI_CLIENT_ID", client_id),
            ("IDENTITY_ENDPOINT", &format!("{}/msi/token", self.authority_host())),
            ("IDENTITY_HEADER", header.trim()),
        ])
    }

    /// A credential environment: IMDS managed identity for `client_id`.
    pub fn imds(&self, client_id: &str) -> Vec<(String, String)> {
        vars(&[
            ("SDK_CREDENTIAL", "imds"),
            ("MI_CLIENT_ID", client_id),
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", &self.authority_host()),
        ])
    }

    /// A credential environment: client secret of a service principal.
    pub fn secret(&self, sp: &ServicePrincipal) -> Vec<(String, String)> {
        vars(&[
            ("SDK_CREDENTIAL", "secret"),
            ("AZURE_AUTHORITY_HOST", &self.authority_host()),
            ("AZURE_TENANT_ID", &self.tenant),
            ("AZURE_CLIENT_ID", &sp.client_id),
            ("AZURE_CLIENT_SECRET", &sp.client_secret),
        ])
    }

    /// A service principal made through `CreateUser`, holding `perms` on `vault`.
    pub async fn service_principal(&self, name: &str, vault: &str, perms: &[&str]) -> ServicePrincipal {
        let r = self
            .broker
            .ids()
            .create_user(proto::CreateUserRequest { name: name.into() })
            .await
            .expect("user")
            .into_inner();
        assert!(
            !r.client_id.is_empty() && !r.client_secret.is_empty(),
            "CreateUser returns client credentials"
        );
        self.broker.policy(vault, &r.principal_id, perms).await;
        ServicePrincipal { object_id: r.principal_id, client_id: r.client_id, client_secret: r.client_secret }
    }

    /// A vault the admin holds every key permission in, and a service principal holding every key
    /// permission too (the operator of the SDK scenarios).
    pub async fn vault_with_operator(&self, vault: &str) -> Vec<(String, String)> {
        self.broker.vault(vault, false).await;
        let sp = self.service_principal(&format!("{vault}-operator"), vault, &["all"]).await;
        self.secret(&sp)
    }

    /// Runs `tests/sdk/keyvault.py` with the Azure SDK for Python against `vault`.
    pub async fn python(&self, vault: &str, credential: &[(String, String)], steps: Value) -> Vec<Value> {
        let interpreter =
            python::python_venv("pyenv-sdk", PYTHON_PACKAGES, "azure.keyvault.keys, azure.identity");
        let script = node::sdk_dir().join("keyvault.py");
        let mut command = tokio::process::Command::new(interpreter);
        command.arg(script).arg(steps.to_string());
        command.env("PYTHONDONTWRITEBYTECODE", "1").env_remove("PYTHONPATH").env_remove("PYTHONHOME");
        self.run(command, vault, credential, "python keyvault.py").await
    }

    /// Runs `tests/sdk/<script>` with the Azure SDK for JavaScript against `vault`.
    pub async fn node(
        &self,
        script: &str,
        vault: &str,
        credential: &[(String, String)],
        steps: Value,
    ) -> Vec<Value> {
        let modules = node::node_modules();
        let mut command = tokio::process::Command::new("node");
        command.arg(node::sdk_dir().join(script)).arg(steps.to_string()).env("NODE_PATH", modules);
        self.run(command, vault, credential, &format!("node {script}")).await
    }

    async fn run(
        &self,
        command: tokio::process::Command,
        vault: &str,
        credential: &[(String, String)],
        what: &str,
    ) -> Vec<Value> {
        let stdout = self.output(command, vault, credential, what).await;
        let results: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}):\n{stdout}"));
        results.as_array().expect("a list of step results").clone()
    }

    /// Runs a program with the SDK environment for `vault` and `credential` (the dev CA trusted,
    /// nothing of the caller's Azure, CA or proxy settings); its standard output. Panics with
    /// both outputs when it fails.
    pub async fn output(
        &self,
        mut command: tokio::process::Command,
        vault: &str,
        credential: &[(String, String)],
        what: &str,
    ) -> String {
        // Only what this test sets reaches the SDKs: no credential, CA or proxy of the caller's.
        for (name, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
            let upper = name.to_ascii_uppercase();
            if upper.starts_with("AZURE_")
                || upper.starts_with("IDENTITY_")
                || upper.starts_with("MSI_")
                || upper.starts_with("IMDS_")
                || upper.ends_with("_PROXY")
                || matches!(upper.as_str(), "REQUESTS_CA_BUNDLE" | "CURL_CA_BUNDLE" | "NODE_EXTRA_CA_CERTS")
            {
                command.env_remove(name);
            }
        }
        command
            .env("VAULT_URL", self.vault_url(vault))
            .env("REQUESTS_CA_BUNDLE", &self.ca)
            .env("NODE_EXTRA_CA_CERTS", &self.ca)
            .envs(credential.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true);
        let out = command.output().await.unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what} failed ({}):\n{stdout}\n{stderr}", out.status);
        stdout.into_owned()
    }

    /// Runs the README's example program in `language` (`python`, `js`) as written, with the
    /// environment the README's shell block exports, for a user-assigned identity allowed to
    /// create and use keys in `vault`; what it prints.
    pub async fn readme_example(&self, language: &str, vault: &str) -> String {
        let section = readme_section();
        let exports = readme_block(section, "sh");
        let program = readme_block(section, language);
        self.broker.vault(vault, false).await;
        let (identity, _) = self.broker.identity("rg", "app-umi").await;
        self.broker.policy(vault, &identity.principal_id, &["get", "create", "wrapKey", "unwrapKey"]).await;
        let mut env = self.app_service(&identity.client_id);
        env.retain(|(k, _)| k.starts_with("IDENTITY_"));
        env.push(("AZURE_CLIENT_ID".into(), identity.client_id.clone()));
        // What the test sets is what the README tells the reader to export.
        for name in [
            "VAULT_URL",
            "IDENTITY_ENDPOINT",
            "IDENTITY_HEADER",
            "AZURE_CLIENT_ID",
            "REQUESTS_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
        ] {
            assert!(exports.contains(&format!(" {name}=")), "the README's shell block exports {name}");
        }
        assert!(exports.contains(&format!("tb vault create {vault}")), "the README's vault is {vault}");
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, mut command) = match language {
            "python" => {
                let interpreter =
                    python::python_venv("pyenv-sdk", PYTHON_PACKAGES, "azure.keyvault.keys, azure.identity");
                (dir.path().join("wrap.py"), tokio::process::Command::new(interpreter))
            }
            _ => {
                let mut node = tokio::process::Command::new("node");
                node.env("NODE_PATH", node::node_modules());
                (dir.path().join("wrap.js"), node)
            }
        };
        std::fs::write(&file, program).expect("write the example");
        command.arg(&file).current_dir(dir.path());
        self.output(command, vault, &env, &format!("the README's {language} example")).await
    }
}

/// The README's section on the Azure SDKs.
fn readme_section() -> &'static str {
    const README: &str = include_str!("../../README.md");
    let heading = "\n## The Azure SDKs against the broker\n";
    let start = README.find(heading).expect("README has a section on the Azure SDKs") + heading.len();
    let body = &README[start..];
    &body[..body.find("\n## ").unwrap_or(body.len())]
}

/// The one fenced block of `language` in `text`.
fn readme_block<'a>(text: &'a str, language: &str) -> &'a str {
    let open = format!("```{language}\n");
    let start = text.find(&open).unwrap_or_else(|| panic!("a ```{language} block")) + open.len();
    assert!(text[start..].find(&open).is_none(), "one ```{language} block");
    let body = &text[start..];
    &body[..body.find("\n```").expect("a closed block")]
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The result of a step that must have succeeded.
pub fn ok(step: &Value) -> &Value {
    match step.get("ok") {
        Some(v) => v,
        None => panic!("the step failed: {}", step["error"]),
    }
}

/// The error of a step that must have failed.
pub fn err(step: &Value) -> &Value {
    match step.get("error") {
        Some(e) => e,
        None => panic!("the step succeeded, an error was expected: {}", step["ok"]),
    }
}

/// Standard base64, as the scripts exchange bytes.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(v: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(v.as_str().expect("base64 text")).expect("base64")
}
