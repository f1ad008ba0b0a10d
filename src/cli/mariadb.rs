//! `mariadb …`: sets a server up for MariaDB's `hashicorp_key_management` plugin, which reads its
//! data-at-rest keys from the broker's Vault-KV surface (docs/MARIADB.md): the mount and its key
//! ids, the token file, and the `my.cnf` lines.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::error::CliError;
use super::render::Out;
use super::session::{Connection, Session};
use crate::config::DEFAULT_DATA_DIR;
use crate::grpc::proto;

/// `tde-broker mariadb …`
#[derive(Debug, clap::Subcommand)]
pub enum MariadbCmd {
    /// Create (or extend) a Vault-KV mount of a server for MariaDB: its database (created when
    /// missing), the key ids that do not exist yet (a DEK each, wrapped under the server's TDE
    /// protector), a new token written to --token-file (0600; the previous token stops
    /// working), and print the my.cnf lines.
    Setup(SetupArgs),
    /// A new version of a key id (MariaDB's key rotation): new pages use it once MariaDB has
    /// re-checked the latest version (cache-version-timeout); older versions stay readable.
    Rotate {
        /// ARM resource id of the server.
        server_id: String,
        /// The mount path.
        #[arg(long, value_name = "PATH", default_value = "mariadb")]
        mount: String,
        /// The key id.
        #[arg(long, value_name = "ID")]
        key: u32,
    },
}

/// `mariadb setup`
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// ARM resource id of the server (it needs a customer-managed protector).
    pub server_id: String,
    /// The mount path (the vault URL's path after /v1/).
    #[arg(long, value_name = "PATH", default_value = "mariadb")]
    pub mount: String,
    /// The server's database whose TDE state gates the keys (created when missing).
    #[arg(long, value_name = "NAME", default_value = "mariadb")]
    pub database: String,
    /// Key ids to create when missing, comma-separated (1 is InnoDB's default key and the redo
    /// log's; 2 is used for temporary files when it exists).
    #[arg(long, value_name = "IDS", value_delimiter = ',', default_value = "1,2")]
    pub keys: Vec<u32>,
    /// Where to write the mount's token (mode 0600).
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// The broker's HTTPS listener as MariaDB reaches it (`--rest-listen`; the host must be a
    /// name or address its certificate carries).
    #[arg(long, value_name = "URL", default_value = "https://localhost:8443")]
    pub rest_url: String,
    /// The CA file MariaDB verifies the listener's certificate with [default:
    /// <data-dir>/tls/ca.pem, the dev CA].
    #[arg(long, value_name = "PATH")]
    pub vault_ca: Option<PathBuf>,
    /// How often MariaDB re-checks a key's latest version, milliseconds (the plugin's
    /// cache-version-timeout): a new version (`mariadb rotate`) is used that much later.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    pub cache_version_timeout: u64,
}

/// Runs a `mariadb` subcommand.
pub(super) async fn mariadb(s: &Session, conn: &Connection, cmd: MariadbCmd) -> Result<Out, CliError> {
    match cmd {
        MariadbCmd::Setup(a) => setup(s, conn, a).await,
        MariadbCmd::Rotate { server_id, mount, key } => {
            let request = proto::RotateVaultKvKeyRequest { server_id, mount, key_id: key };
            let r = s.call(s.servers().rotate_vault_kv_key(request)).await?;
            Ok(Out {
                json: json!({ "key_id": key, "version": r.version }),
                table: format!("key {key}: version {} is the latest\n", r.version),
            })
        }
    }
}

async fn setup(s: &Session, conn: &Connection, a: SetupArgs) -> Result<Out, CliError> {
    let request = proto::SetupVaultKvMountRequest {
        server_id: a.server_id,
        mount: a.mount,
        database: a.database,
        key_ids: a.keys,
    };
    let r = s.call(s.servers().setup_vault_kv_mount(request)).await?;
    let token = zeroize::Zeroizing::new(r.token);
    write_token(&a.token_file, &token)?;
    let ca = a.vault_ca.unwrap_or_else(|| {
        conn.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)).join("tls").join("ca.pem")
    });
    let ca = std::path::absolute(&ca).unwrap_or(ca);
    let token_file = std::path::absolute(&a.token_file).unwrap_or(a.token_file.clone());
    let url = format!("{}/v1/{}", a.rest_url.trim_end_matches('/'), r.mount);
    let cnf = my_cnf(&url, &token_file, &ca, a.cache_version_timeout);
    let table = format!(
        "# mount {} of {} (database {}), key ids {}{}\n# token written to {}\n{cnf}",
        r.mount,
        r.server_id,
        r.database,
        join(&r.key_ids),
        if r.created_key_ids.is_empty() {
            String::new()
        } else {
            format!(" (created: {})", join(&r.created_key_ids))
        },
        token_file.display(),
    );
    Ok(Out {
        json: json!({
            "server_id": r.server_id,
            "mount": r.mount,
            "database": r.database,
            "key_ids": r.key_ids,
            "created_key_ids": r.created_key_ids,
            "token_file": token_file.display().to_string(),
            "vault_url": url,
            "vault_ca": ca.display().to_string(),
            "my_cnf": cnf,
        }),
        table,
    })
}

fn join(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn write_token(path: &Path, token: &str) -> Result<(), CliError> {
    let mut contents = zeroize::Zeroizing::new(token.as_bytes().to_vec());
    contents.push(b'\n');
    crate::tls::write_file(path, &contents, 0o600).map_err(CliError::Pki)
}

/// The `[mariadbd]` section: the plugin, where the keys are, and encryption of tables, redo log
/// and temporary files. The token is read from the token file when MariaDB starts: the plugin has
/// no token-file option, so it is given in the environment (`VAULT_TOKEN`) or pasted here.
pub fn my_cnf(url: &str, token_file: &Path, ca: &Path, cache_version_timeout: u64) -> String {
    format!(
        "[mariadbd]\n\
         plugin_load_add = hashicorp_key_management\n\
         hashicorp-key-management-vault-url = {url}\n\
         # hashicorp-key-management-token = <the contents of {token}>, or start mariadbd with\n\
         # VAULT_TOKEN=\"$(cat {token})\" in its environment\n\
         hashicorp-key-management-vault-ca = {ca}\n\
         hashicorp-key-management-caching-enabled = ON\n\
         hashicorp-key-management-cache-version-timeout = {cache_version_timeout}\n\
         hashicorp-key-management-use-cache-on-timeout = ON\n\
         innodb_encrypt_tables = ON\n\
         innodb_encrypt_log = ON\n\
         innodb_encrypt_temporary_tables = ON\n\
         encrypt_tmp_files = ON\n\
         encrypt_binlog = ON\n",
        token = token_file.display(),
        ca = ca.display(),
    )
}
