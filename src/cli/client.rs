//! Client subcommands: `vault …`, `subnet …`, `key …`, `policy …`, `role …`, `identity …`,
//! `user …`, `token …`, `clock …`, `faults …`, `throttling …`, `stats`, `server …` and `db …` call a
//! running broker over gRPC as the bootstrap admin (token from `<data-dir>/admin.token`) or
//! whoever `--token` names. Output is aligned text for people, or one JSON document per command
//! (`--output json`) for scripts; `db watch` prints one line (one JSON object) per event as it
//! arrives.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use super::Command;
use crate::broker::throttle::AZURE_CREATE_PER_10S;
use crate::config::{DEFAULT_DATA_DIR, DEFAULT_LISTEN};
use crate::grpc::proto;
use crate::grpc::proto::emulation_client::EmulationClient;
use crate::grpc::proto::identities_client::IdentitiesClient;
use crate::grpc::proto::key_vault_client::KeyVaultClient;
use crate::grpc::proto::servers_client::ServersClient;
use crate::grpc::proto::vaults_client::VaultsClient;
use crate::server::{ADMIN_TOKEN_FILE, MAX_MESSAGE_BYTES};

/// How long to wait for the TCP connection before telling the user the broker is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// Where the broker is, who we are, and how to print. Flattened into the top-level command with
/// every argument global, so `tde-broker key list v --output json` works.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Broker gRPC address: `http://host:port`, `https://host:port` (TLS) or `host:port`.
    #[arg(long, global = true, help_heading = "Client options", env = "TDE_BROKER_SERVER", value_name = "URL", default_value_t = format!("http://{DEFAULT_LISTEN}"))]
    pub server: String,
    /// Data directory of the broker; the admin token is read from `<data-dir>/admin.token`
    /// [default: ./tde-broker-data].
    // No clap default on purpose: `serve --data-dir` shares this id, and a global default would
    // be copied into `serve` and beat its TOML file.
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "TDE_BROKER_DATA_DIR",
        value_name = "DIR"
    )]
    pub data_dir: Option<PathBuf>,
    /// Bearer token to send instead of the admin token file.
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "TDE_BROKER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// CA certificate (PEM) that signs the broker's TLS certificate, for an https:// --server
    /// [default: <data-dir>/tls/ca.pem, the dev CA of `serve --tls auto`, when it exists].
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "TDE_BROKER_CA_CERT",
        value_name = "PATH"
    )]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS (see `cert issue`); without --token it alone says who
    /// you are.
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "TDE_BROKER_CLIENT_CERT",
        value_name = "PATH",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(
        long,
        global = true,
        help_heading = "Client options",
        env = "TDE_BROKER_CLIENT_KEY",
        value_name = "PATH",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
    /// Output format of client subcommands.
    #[arg(long, global = true, help_heading = "Client options", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned `field  value` lines, or a header row plus rows for lists.
    Table,
    /// One JSON document; bytes as standard base64, times as Unix seconds.
    Json,
}

/// `tde-broker vault …`
#[derive(Debug, clap::Subcommand)]
pub enum VaultCmd {
    /// Create a vault; unless --rbac or --no-default-policy, grant yourself every key permission.
    Create {
        /// Vault name (3-24 letters, digits and hyphens).
        name: String,
        /// Soft-delete retention, 7..90 days [default: 90].
        #[arg(long, value_name = "N")]
        retention_days: Option<i32>,
        /// Turn purge protection on (irreversible).
        #[arg(long)]
        purge_protection: bool,
        /// Authorize the data plane with RBAC instead of access policies.
        #[arg(long)]
        rbac: bool,
        /// Do not grant the caller an access policy.
        #[arg(long)]
        no_default_policy: bool,
    },
    /// Show one vault.
    Show {
        /// Vault name.
        name: String,
    },
    /// List vaults.
    List,
    /// Change a vault's settings; what is not given stays as it is.
    Update {
        /// Vault name.
        name: String,
        /// Turn purge protection on (it cannot be turned off).
        #[arg(long)]
        purge_protection: bool,
        /// Use RBAC (true) or access policies (false) for the data plane.
        #[arg(long, value_name = "true|false")]
        rbac: Option<bool>,
        /// Public network access.
        #[arg(long, value_name = "Enabled|Disabled")]
        public_network_access: Option<String>,
    },
    /// Delete a vault.
    Delete {
        /// Vault name.
        name: String,
    },
    /// Network rules of a vault: public network access, firewall, private endpoints.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Private endpoints of a vault.
    #[command(subcommand)]
    PrivateEndpoint(PrivateEndpointCmd),
}

/// `tde-broker vault network …`
#[derive(Debug, clap::Subcommand)]
pub enum NetworkCmd {
    /// Show public network access, the firewall (default action, bypass, IP and VNet rules) and
    /// the private endpoint subnets of a vault.
    Show {
        /// Vault name.
        vault: String,
    },
    /// Change the network rules of a vault; what is not given stays as it is, and --ip-rule and
    /// --vnet-rule add to the existing rules unless --clear-ip-rules/--clear-vnet-rules.
    Set(NetworkSetArgs),
}

/// `vault network set`
#[derive(Debug, clap::Args)]
pub struct NetworkSetArgs {
    /// Vault name.
    pub vault: String,
    /// What the firewall does with addresses no rule names.
    #[arg(long, value_enum, ignore_case = true, value_name = "Allow|Deny")]
    pub default_action: Option<DefaultActionArg>,
    /// Whether trusted Microsoft services (e.g. SQL logical servers) get past the firewall.
    #[arg(long, value_enum, ignore_case = true, value_name = "AzureServices|None")]
    pub bypass: Option<BypassArg>,
    /// An address or CIDR range to let in; repeat for more.
    #[arg(long = "ip-rule", value_name = "CIDR")]
    pub ip_rules: Vec<String>,
    /// A subnet resource id to let in (see `subnet put`); repeat for more.
    #[arg(long = "vnet-rule", value_name = "SUBNET_ID")]
    pub vnet_rules: Vec<String>,
    /// Drop the existing IP rules first.
    #[arg(long)]
    pub clear_ip_rules: bool,
    /// Drop the existing VNet rules first.
    #[arg(long)]
    pub clear_vnet_rules: bool,
    /// Public network access (Disabled: only private endpoints and the bypass get in).
    #[arg(long, value_enum, ignore_case = true, value_name = "Enabled|Disabled")]
    pub public_network_access: Option<PublicAccessArg>,
}

/// `--default-action` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DefaultActionArg {
    /// Every address gets in.
    #[value(name = "Allow")]
    Allow,
    /// Only the IP rules, VNet rules and the bypass get in.
    #[value(name = "Deny")]
    Deny,
}

/// `--bypass` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BypassArg {
    /// Trusted Microsoft services get past the firewall.
    #[value(name = "AzureServices")]
    AzureServices,
    /// No bypass.
    #[value(name = "None")]
    None,
}

/// `--public-network-access` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PublicAccessArg {
    /// Public access, subject to the firewall.
    #[value(name = "Enabled")]
    Enabled,
    /// No public access.
    #[value(name = "Disabled")]
    Disabled,
}

/// `tde-broker vault private-endpoint …`
#[derive(Debug, clap::Subcommand)]
pub enum PrivateEndpointCmd {
    /// Connect a subnet to the vault over a private endpoint (approved at once): its addresses
    /// reach the vault whatever the firewall and public network access say.
    Create {
        /// Vault name.
        vault: String,
        /// Subnet resource id, declared first with `subnet put`.
        #[arg(long, value_name = "SUBNET_ID")]
        subnet: String,
    },
}

/// `tde-broker subnet …`
#[derive(Debug, clap::Subcommand)]
pub enum SubnetCmd {
    /// Create or replace a subnet's address ranges, so VNet rules and private endpoints apply to
    /// real client addresses.
    Put {
        /// Subnet resource id:
        /// /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/virtualNetworks/{vnet}/subnets/{name}.
        subnet_id: String,
        /// An address range (CIDR; a single address is /32 or /128); repeat for more.
        #[arg(long = "prefix", value_name = "CIDR", required = true)]
        prefixes: Vec<String>,
    },
    /// List subnets.
    List,
}

/// `tde-broker faults …`
#[derive(Debug, clap::Subcommand)]
pub enum FaultsCmd {
    /// Inject faults into one vault (or every vault), replacing the ones set there before.
    #[command(group(clap::ArgGroup::new("fault").required(true).multiple(true).args([
        "outage", "latency_ms", "latency_p50_ms", "error_rate", "fail_next",
    ])))]
    Set {
        /// Vault name [default: every vault].
        #[arg(long, value_name = "NAME")]
        vault: Option<String>,
        /// The vault answers every data-plane call with UNAVAILABLE (ServiceUnavailable).
        #[arg(long)]
        outage: bool,
        /// Fixed delay added to every data-plane call.
        #[arg(long, value_name = "MS")]
        latency_ms: Option<u32>,
        /// Median of a random (log-normal) delay added on top.
        #[arg(long, value_name = "MS")]
        latency_p50_ms: Option<u32>,
        /// 99th percentile of that delay [default: the median, a fixed delay].
        #[arg(long, value_name = "MS", requires = "latency_p50_ms")]
        latency_p99_ms: Option<u32>,
        /// Probability (0..1) that a data-plane call fails with --error-code.
        #[arg(long, value_name = "P")]
        error_rate: Option<f64>,
        /// UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL or PERMISSION_DENIED [default: UNAVAILABLE].
        #[arg(long, value_name = "CODE", requires = "error_rate")]
        error_code: Option<String>,
        /// The next N data-plane calls fail with UNAVAILABLE.
        #[arg(long, value_name = "N")]
        fail_next: Option<u32>,
    },
    /// Remove the faults set on one vault, or (without --vault) every fault.
    Clear {
        /// Vault name [default: every fault, per vault and for every vault].
        #[arg(long, value_name = "NAME")]
        vault: Option<String>,
    },
}

/// `tde-broker throttling …`
#[derive(Debug, clap::Subcommand)]
pub enum ThrottlingCmd {
    /// Show the profile and budgets per 10 s of every vault (`*`) and of the vaults with their own.
    Show,
    /// Throttle one vault (or every vault): --profile azure (the cloud's limits) or off, or own
    /// limits (--all-other); its 10-second windows start afresh.
    #[command(group(clap::ArgGroup::new("throttle").required(true).args(["profile", "all_other"])))]
    Set {
        /// Vault name [default: every vault; vaults with their own profile keep it].
        #[arg(long, value_name = "NAME")]
        vault: Option<String>,
        /// off, azure, or (with --vault) inherit: the vault follows the profile of every vault again.
        #[arg(long, value_name = "PROFILE")]
        profile: Option<String>,
        /// Own limits: "all other" requests per vault and 10 s, in RSA-2048 software key operations
        /// (bigger and HSM keys weigh more, as in the cloud).
        #[arg(long, value_name = "N")]
        all_other: Option<u32>,
        /// Own limits: CREATE requests (create, import, rotate, restore) per vault and 10 s
        /// [default: 20, the cloud's].
        #[arg(long, value_name = "N", requires = "all_other", conflicts_with = "profile")]
        create: Option<u32>,
    },
}

/// `tde-broker policy …`
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCmd {
    /// Replace the key permissions of one object id (an empty list removes its policy).
    Set {
        /// Vault name.
        vault: String,
        /// Object id (GUID) of the user, application or managed identity.
        #[arg(long, value_name = "GUID")]
        object_id: String,
        /// Comma-separated key permissions (get, list, wrapKey, unwrapKey, …, or all); "" removes.
        #[arg(long, value_name = "PERMS")]
        permissions: String,
    },
    /// List the access policies of a vault.
    List {
        /// Vault name.
        vault: String,
    },
    /// Remove the access policy of one object id.
    Delete {
        /// Vault name.
        vault: String,
        /// Object id (GUID) whose policy goes.
        #[arg(long, value_name = "GUID")]
        object_id: String,
    },
}

/// `tde-broker role …`
#[derive(Debug, clap::Subcommand)]
pub enum RoleCmd {
    /// Assign a role to a principal at a scope.
    Assign {
        /// ARM id (`/`, `/subscriptions/{sub}`, …), vault URI, or key URI without version.
        #[arg(long, value_name = "SCOPE")]
        scope: String,
        /// Object id (GUID) of the user or managed identity.
        #[arg(long, value_name = "GUID")]
        principal_id: String,
        /// The cloud's role name, e.g. "Key Vault Crypto Service Encryption User", "Owner".
        #[arg(long, value_name = "ROLE")]
        role: String,
    },
    /// List role assignments.
    List {
        /// Only the assignments at this scope [default: every one].
        #[arg(long, value_name = "SCOPE")]
        scope: Option<String>,
    },
    /// Delete a role assignment.
    Delete {
        /// Role assignment id, as `role list` shows it.
        id: String,
    },
}

/// `tde-broker identity …`
#[derive(Debug, clap::Subcommand)]
pub enum IdentityCmd {
    /// Create a user-assigned managed identity.
    Create {
        /// Identity name.
        name: String,
        /// Resource group.
        #[arg(long, value_name = "RG")]
        resource_group: String,
        /// Subscription id [default: the broker's default subscription].
        #[arg(long, value_name = "SUB")]
        subscription: Option<String>,
    },
    /// Show one identity, named by exactly one of its ids.
    Show(IdentitySelector),
    /// List identities.
    List,
    /// Delete a user-assigned identity; its tokens stop working at once.
    Delete {
        /// ARM resource id of the identity.
        resource_id: String,
        /// Delete even when a server uses it (its databases become inaccessible).
        #[arg(long)]
        force: bool,
    },
}

/// `tde-broker user …`
#[derive(Debug, clap::Subcommand)]
pub enum UserCmd {
    /// Create a user principal and print a token for it (both planes).
    Create {
        /// Display name.
        name: String,
    },
}

/// `tde-broker token …`
#[derive(Debug, clap::Subcommand)]
pub enum TokenCmd {
    /// Get an access token for a managed identity (table output: the token alone).
    Get {
        #[command(flatten)]
        identity: IdentitySelector,
        /// Audience [default: https://vault.azure.net].
        #[arg(long, value_name = "AUD")]
        audience: Option<String>,
    },
}

/// Exactly one of an identity's ids.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which_identity").required(true).args(["resource_id", "principal_id", "client_id"])))]
pub struct IdentitySelector {
    /// ARM resource id.
    #[arg(long, value_name = "ID")]
    pub resource_id: Option<String>,
    /// Principal (object) id.
    #[arg(long, value_name = "GUID")]
    pub principal_id: Option<String>,
    /// Client (application) id.
    #[arg(long, value_name = "GUID")]
    pub client_id: Option<String>,
}

/// `tde-broker key …`
#[derive(Debug, clap::Subcommand)]
pub enum KeyCmd {
    /// Create a key, or a new version of an existing key.
    Create(CreateKeyArgs),
    /// Import private key material as a key or a new version.
    Import(ImportKeyArgs),
    /// Show a key (the newest version unless KEY_ID names one).
    Show {
        /// Key URI: https://{vault}.{suffix}/keys/{name}[/{version}].
        key_id: String,
    },
    /// List the keys of a vault.
    List {
        /// Vault name.
        vault: String,
    },
    /// List every version of a key.
    Versions {
        /// Key URI (unversioned).
        key_id: String,
    },
    /// Change attributes, operations or tags of a key version; never its material.
    Update(UpdateKeyArgs),
    /// Create a new version with the same type and size.
    Rotate {
        /// Key URI.
        key_id: String,
    },
    /// Soft-delete every version of a key.
    Delete {
        /// Key URI.
        key_id: String,
    },
    /// List the soft-deleted keys of a vault.
    Deleted {
        /// Vault name.
        vault: String,
    },
    /// Recover a soft-deleted key.
    Recover {
        /// Vault name.
        vault: String,
        /// Key name.
        name: String,
    },
    /// Purge a soft-deleted key for good.
    Purge {
        /// Vault name.
        vault: String,
        /// Key name.
        name: String,
    },
    /// Write an encrypted backup blob of every version of a key to a file.
    Backup {
        /// Key URI.
        key_id: String,
        /// Where to write the blob (raw bytes).
        #[arg(long, value_name = "PATH")]
        file: PathBuf,
    },
    /// Restore a key from a backup blob.
    Restore {
        /// Vault name.
        vault: String,
        /// The blob written by `key backup`.
        #[arg(long, value_name = "PATH")]
        file: PathBuf,
    },
    /// Wrap a key (e.g. a DEK) with this key.
    Wrap(CryptoArgs),
    /// Unwrap a wrapped key.
    Unwrap(CryptoArgs),
    /// Encrypt a value.
    Encrypt(CryptoArgs),
    /// Decrypt a value.
    Decrypt(CryptoArgs),
}

/// `tde-broker clock …`
#[derive(Debug, clap::Subcommand)]
pub enum ClockCmd {
    /// Show the broker's time.
    Show,
    /// Move a manual clock: seconds, or a number with s, m, h, d or w (90d, 25h, -30m).
    Advance {
        /// How far, e.g. 3600, 2h, 90d; negative moves back.
        #[arg(value_name = "SECONDS", allow_hyphen_values = true, value_parser = parse_duration)]
        seconds: i64,
    },
    /// Set a manual clock to a Unix time.
    Set {
        /// Unix seconds.
        #[arg(value_name = "UNIX", allow_negative_numbers = true)]
        now: i64,
    },
}

/// `tde-broker server …`
#[derive(Debug, clap::Subcommand)]
pub enum ServerCmd {
    /// Create a SQL server or managed instance; with --key-id, TDE with a customer-managed key
    /// from the start (needs a user-assigned identity that holds get, wrapKey and unwrapKey).
    Create(CreateServerArgs),
    /// Show one server.
    Show {
        /// ARM resource id of the server.
        server_id: String,
    },
    /// List servers.
    List,
    /// Delete a server and its databases.
    Delete {
        /// ARM resource id of the server.
        server_id: String,
    },
    /// Replace the identity block of a server; refused when the new effective identity could
    /// not reach the current protector.
    Identity {
        /// ARM resource id of the server.
        server_id: String,
        #[command(flatten)]
        identity: ServerIdentityArgs,
    },
    /// Set the TDE protector: service-managed, or a vault key (customer-managed).
    Protector(ProtectorArgs),
    /// Show the TDE protector of a server.
    ProtectorShow {
        /// ARM resource id of the server.
        server_id: String,
    },
    /// Re-check access to the protector and bring databases that need it back online.
    Revalidate {
        /// ARM resource id of the server.
        server_id: String,
    },
    /// Issue the credential of the server's database engine host (table output: the token
    /// alone); with TLS, also write its client certificate as <GUID>.pem and <GUID>.key (0600).
    HostCredential {
        /// ARM resource id of the server.
        server_id: String,
        /// Where to write the client certificate and key [default: the current directory].
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// `server create`
#[derive(Debug, clap::Args)]
pub struct CreateServerArgs {
    /// Server name.
    pub name: String,
    /// Resource group.
    #[arg(long, value_name = "RG")]
    pub resource_group: String,
    /// Subscription id [default: the broker's default subscription].
    #[arg(long, value_name = "SUB")]
    pub subscription: Option<String>,
    /// A SQL logical server or a managed instance.
    #[arg(long, value_enum, default_value_t = ServerKindArg::Sql)]
    pub kind: ServerKindArg,
    #[command(flatten)]
    pub identity: ServerIdentityArgs,
    /// Vault key URI of the TDE protector, with or without version [default: service-managed].
    #[arg(long, value_name = "KEY_URI")]
    pub key_id: Option<String>,
    /// Follow the key's newest version (a --key-id without version).
    #[arg(long, requires = "key_id")]
    pub auto_rotation: bool,
    /// Subnet resource id (managed instances).
    #[arg(long, value_name = "SUBNET_ID")]
    pub subnet: Option<String>,
}

/// Server kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerKindArg {
    /// A SQL logical server.
    Sql,
    /// A managed instance.
    Mi,
}

/// The identity block of a server.
#[derive(Debug, clap::Args)]
pub struct ServerIdentityArgs {
    /// Give the server a system-assigned identity.
    #[arg(long)]
    pub system_assigned: bool,
    /// ARM resource id of a user-assigned identity; repeat for more.
    #[arg(long = "umi", value_name = "RESOURCE_ID")]
    pub umis: Vec<String>,
    /// The primary user-assigned identity [default: the only --umi; required with several].
    #[arg(long, value_name = "RESOURCE_ID")]
    pub primary: Option<String>,
}

/// `server protector`
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("protector_type").required(true).args(["service_managed", "key_id"])))]
pub struct ProtectorArgs {
    /// ARM resource id of the server.
    pub server_id: String,
    /// Service-managed TDE.
    #[arg(long)]
    pub service_managed: bool,
    /// Vault key URI (customer-managed TDE), with or without version.
    #[arg(long, value_name = "KEY_URI")]
    pub key_id: Option<String>,
    /// Follow the key's newest version (a --key-id without version).
    #[arg(long, requires = "key_id")]
    pub auto_rotation: bool,
}

/// `tde-broker db …`
#[derive(Debug, clap::Subcommand)]
pub enum DbCmd {
    /// Create a database on a server.
    Create {
        /// ARM resource id of the server.
        server_id: String,
        /// Database name.
        name: String,
    },
    /// Show one database and its state.
    Show {
        /// ARM resource id of the server.
        server_id: String,
        /// Database name.
        name: String,
    },
    /// List the databases of a server.
    List {
        /// ARM resource id of the server.
        server_id: String,
    },
    /// Delete a database.
    Delete {
        /// ARM resource id of the server.
        server_id: String,
        /// Database name.
        name: String,
    },
    /// Print every state transition of the server's databases as it happens (json: one object
    /// per line), until Ctrl-C or --count events.
    Watch {
        /// ARM resource id of the server.
        server_id: String,
        /// Stop after this many events.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
}

/// Attributes, operations and tags given when a key is created or imported.
#[derive(Debug, clap::Args)]
pub struct KeyProps {
    /// Permitted operations, comma-separated (encrypt, decrypt, wrapKey, unwrapKey, …)
    /// [default: every one the key type supports].
    #[arg(long, value_delimiter = ',', value_name = "OPS")]
    pub ops: Vec<String>,
    /// Not valid before this Unix time.
    #[arg(long, value_name = "UNIX", allow_negative_numbers = true)]
    pub nbf: Option<i64>,
    /// Expires at this Unix time.
    #[arg(long, value_name = "UNIX", allow_negative_numbers = true)]
    pub exp: Option<i64>,
    /// Create the key disabled.
    #[arg(long)]
    pub disabled: bool,
    /// A tag; repeat for more.
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
}

/// `key create`
#[derive(Debug, clap::Args)]
pub struct CreateKeyArgs {
    /// Vault name.
    pub vault: String,
    /// Key name.
    pub name: String,
    /// Key type: RSA, RSA-HSM or oct-HSM.
    #[arg(long, default_value = "RSA")]
    pub kty: String,
    /// RSA: 2048 (default), 3072, 4096; oct-HSM: 128, 192, 256 (default).
    #[arg(long, value_name = "N")]
    pub size: Option<i32>,
    #[command(flatten)]
    pub props: KeyProps,
}

/// `key import`
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["pem_file", "der_file", "jwk_file"])))]
pub struct ImportKeyArgs {
    /// Vault name.
    pub vault: String,
    /// Key name.
    pub name: String,
    /// PEM private key ("PRIVATE KEY" or "RSA PRIVATE KEY").
    #[arg(long, value_name = "PATH")]
    pub pem_file: Option<PathBuf>,
    /// PKCS#8 DER private key.
    #[arg(long, value_name = "PATH")]
    pub der_file: Option<PathBuf>,
    /// Private JSON Web Key (RSA or oct).
    #[arg(long, value_name = "PATH")]
    pub jwk_file: Option<PathBuf>,
    /// Mark the key RSA-HSM instead of RSA.
    #[arg(long)]
    pub hsm: bool,
    #[command(flatten)]
    pub props: KeyProps,
}

/// `key update`
#[derive(Debug, clap::Args)]
pub struct UpdateKeyArgs {
    /// Key URI (unversioned = the newest version).
    pub key_id: String,
    /// Enable the key version.
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,
    /// Disable the key version.
    #[arg(long)]
    pub disable: bool,
    /// Not valid before this Unix time.
    #[arg(long, value_name = "UNIX", allow_negative_numbers = true, conflicts_with = "clear_nbf")]
    pub nbf: Option<i64>,
    /// Expires at this Unix time.
    #[arg(long, value_name = "UNIX", allow_negative_numbers = true, conflicts_with = "clear_exp")]
    pub exp: Option<i64>,
    /// Remove the activation time.
    #[arg(long)]
    pub clear_nbf: bool,
    /// Remove the expiry time.
    #[arg(long)]
    pub clear_exp: bool,
    /// Replace the permitted operations (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "OPS")]
    pub ops: Vec<String>,
    /// Replace the tags; repeat for more.
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
}

/// `key wrap|unwrap|encrypt|decrypt`
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("value_source").required(true).args(["value_b64", "value_hex", "input"])))]
pub struct CryptoArgs {
    /// Key URI (unversioned = the newest version).
    pub key_id: String,
    /// Algorithm: RSA-OAEP, RSA-OAEP-256, RSA1_5, A256KW, A256GCM, A256CBCPAD, …
    #[arg(long, value_name = "ALG")]
    pub alg: String,
    /// The input value, base64.
    #[arg(long, value_name = "B64")]
    pub value_b64: Option<String>,
    /// The input value, hex.
    #[arg(long, value_name = "HEX")]
    pub value_hex: Option<String>,
    /// Read the input value (raw bytes) from a file.
    #[arg(long = "in", value_name = "PATH")]
    pub input: Option<PathBuf>,
    /// Initialization vector, base64 (AES).
    #[arg(long, value_name = "B64")]
    pub iv_b64: Option<String>,
    /// Additional authenticated data, base64 (AES-GCM).
    #[arg(long, value_name = "B64")]
    pub aad_b64: Option<String>,
    /// Authentication tag, base64 (AES-GCM decrypt).
    #[arg(long, value_name = "B64")]
    pub tag_b64: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a client subcommand failed; `Display` is what the user reads after "error: ".
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No `--token` and no admin token file: the broker never ran on that data directory.
    #[error(
        "no token: {} does not exist; start the broker (tde-broker serve) or pass --token/--data-dir",
        .0.display()
    )]
    NoToken(PathBuf),
    /// A local file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Nothing answered at the broker's address.
    #[error(
        "cannot reach the broker at {addr}: {detail}; start it with `tde-broker serve` or point --server at it"
    )]
    Connect {
        /// The address tried.
        addr: String,
        /// What the transport said.
        detail: String,
    },
    /// The broker refused the request.
    #[error("{}", rpc_text(*.code, .reason.as_deref(), .message))]
    Rpc {
        /// The gRPC status code.
        code: Code,
        /// `ErrorInfo.reason`: the cloud's error code, e.g. `KeyDisabled`.
        reason: Option<String>,
        /// The cloud's error text.
        message: String,
    },
    /// An argument is malformed in a way clap cannot check.
    #[error("{0}")]
    Invalid(String),
}

fn rpc_text(code: Code, reason: Option<&str>, message: &str) -> String {
    match reason {
        Some(r) => format!("{} ({r}): {message}", code_name(code)),
        None => format!("{}: {message}", code_name(code)),
    }
}

/// The gRPC code as the spec spells it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its causes on one line (tonic's transport errors hide the useful part).
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io { path: path.to_path_buf(), source }
}

// ---------------------------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------------------------

/// Adds `authorization: Bearer <token>` to every request (nothing when a client certificate
/// alone authenticates).
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.0 {
            request.metadata_mut().insert("authorization", header.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// A connected, authenticated channel to the broker.
struct Session {
    /// Shared by every client; cloning is cheap.
    channel: Channel,
    /// Sent with every request.
    bearer: Bearer,
    /// The raw token, for the caller's object id; `None` when the client certificate alone
    /// authenticates.
    token: Option<String>,
    /// The principal the client certificate names, if one was given.
    cert_principal: Option<String>,
    /// The URL dialled, for error messages.
    addr: String,
}

impl Session {
    async fn open(conn: &Connection) -> Result<Self, CliError> {
        let identity = load_client_identity(conn)?;
        // A client certificate without --token authenticates by itself: the admin token file
        // is not sent (it would take precedence at the broker).
        let token = match (&identity, &conn.token) {
            (Some(_), None) => None,
            _ => Some(load_token(conn)?),
        };
        let header = match &token {
            Some(token) => Some(format!("Bearer {token}").parse::<MetadataValue<Ascii>>().map_err(|_| {
                CliError::Invalid("the token holds characters that cannot go into a header".to_string())
            })?),
            None => None,
        };
        let addr = server_url(&conn.server);
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|e| {
                CliError::Invalid(format!("--server '{}' is not a valid address: {e}", conn.server))
            })?
            .connect_timeout(CONNECT_TIMEOUT);
        let cert_principal = identity.as_ref().and_then(|(_, principal)| principal.clone());
        if addr.starts_with("https://") {
            endpoint = endpoint
                .tls_config(client_tls(conn, identity.map(|(id, _)| id))?)
                .map_err(|e| CliError::Invalid(format!("TLS: {}", error_chain(&e))))?;
        } else if identity.is_some() {
            return Err(CliError::Invalid(
                "--client-cert needs TLS: point --server at https://host:port".to_string(),
            ));
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| CliError::Connect { addr: addr.clone(), detail: error_chain(&e) })?;
        Ok(Session { channel, bearer: Bearer(header), token, cert_principal, addr })
    }

    /// The caller's object id: the token's `oid`, or the principal the client certificate names.
    fn caller_object_id(&self) -> Result<String, CliError> {
        match (&self.token, &self.cert_principal) {
            (Some(token), _) => token_object_id(token),
            (None, Some(principal)) => Ok(principal.clone()),
            (None, None) => Err(CliError::Invalid(
                "the client certificate names no principal; pass --no-default-policy and grant access with `policy set`"
                    .to_string(),
            )),
        }
    }

    fn keys(&self) -> KeyVaultClient<Authed> {
        KeyVaultClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn vaults(&self) -> VaultsClient<Authed> {
        VaultsClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn emulation(&self) -> EmulationClient<Authed> {
        EmulationClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn identities(&self) -> IdentitiesClient<Authed> {
        IdentitiesClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn servers(&self) -> ServersClient<Authed> {
        ServersClient::with_interceptor(self.channel.clone(), self.bearer.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Awaits a call and turns its status into a [`CliError`].
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, CliError> {
        match call.await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.status_error(&status)),
        }
    }

    fn status_error(&self, status: &Status) -> CliError {
        let reason = crate::grpc::status::reason(status);
        // The broker's own Unavailable carries a reason; a bare one is the transport failing.
        if status.code() == Code::Unavailable && reason.is_none() {
            return CliError::Connect { addr: self.addr.clone(), detail: status.message().to_string() };
        }
        CliError::Rpc { code: status.code(), reason, message: status.message().to_string() }
    }
}

/// `--client-cert`/`--client-key` as a tonic identity, with the principal the certificate names.
pub(super) fn load_client_identity(
    conn: &Connection,
) -> Result<Option<(tonic::transport::Identity, Option<String>)>, CliError> {
    let (Some(cert_path), Some(key_path)) = (&conn.client_cert, &conn.client_key) else {
        return Ok(None);
    };
    let cert = std::fs::read(cert_path).map_err(io_err(cert_path))?;
    let key = std::fs::read(key_path).map_err(io_err(key_path))?;
    let leaf = crate::tls::certs_from_pem(cert_path, &cert)
        .map_err(|e| CliError::Invalid(e.to_string()))?
        .swap_remove(0);
    let principal = crate::tls::principal_from_cert(&leaf);
    Ok(Some((tonic::transport::Identity::from_pem(cert, key), principal)))
}

/// TLS for an https:// server: trust --ca-cert, or the dev CA of the data directory.
pub(super) fn client_tls(
    conn: &Connection,
    identity: Option<tonic::transport::Identity>,
) -> Result<tonic::transport::ClientTlsConfig, CliError> {
    crate::tls::install_crypto_provider();
    let ca_path = match &conn.ca_cert {
        Some(path) => path.clone(),
        None => {
            let dir = conn.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
            let dev_ca = crate::tls::DevPki::in_data_dir(&dir).ca_cert;
            if !dev_ca.is_file() {
                return Err(CliError::Invalid(format!(
                    "an https:// server needs the CA that signs its certificate: pass --ca-cert (no dev CA at {})",
                    dev_ca.display()
                )));
            }
            dev_ca
        }
    };
    let ca = std::fs::read(&ca_path).map_err(io_err(&ca_path))?;
    crate::tls::certs_from_pem(&ca_path, &ca).map_err(|e| CliError::Invalid(e.to_string()))?;
    let mut tls =
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Ok(tls)
}

/// `host:port` becomes `http://host:port`; a URL stays as it is.
pub(super) fn server_url(server: &str) -> String {
    let server = server.trim();
    if server.contains("://") { server.to_string() } else { format!("http://{server}") }
}

pub(super) fn load_token(conn: &Connection) -> Result<String, CliError> {
    let (text, origin) = match &conn.token {
        Some(t) => (t.clone(), "--token".to_string()),
        None => {
            let dir = conn.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
            let path = dir.join(ADMIN_TOKEN_FILE);
            match std::fs::read_to_string(&path) {
                Ok(text) => (text, path.display().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(CliError::NoToken(path)),
                Err(e) => return Err(CliError::Io { path, source: e }),
            }
        }
    };
    let text = text.trim();
    let token = text.strip_prefix("Bearer ").unwrap_or(text).trim();
    if token.is_empty() {
        return Err(CliError::Invalid(format!("no token: {origin} is empty")));
    }
    Ok(token.to_string())
}

/// The `oid` claim of a JWT: the caller's object id. The broker checks the signature; the
/// client only reads who it is.
pub(super) fn token_object_id(token: &str) -> Result<String, CliError> {
    let bad = || {
        CliError::Invalid(
            "cannot read the caller's object id (oid claim) from the token; pass --no-default-policy and grant access with `policy set`"
                .to_string(),
        )
    };
    let payload = token.split('.').nth(1).ok_or_else(bad)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).map_err(|_| bad())?;
    let claims: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    claims
        .get("oid")
        .and_then(Value::as_str)
        .filter(|oid| !oid.is_empty())
        .map(str::to_string)
        .ok_or_else(bad)
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/// What a command prints: both renderings, the caller picks one.
struct Out {
    /// The `--output json` document.
    json: Value,
    /// The `--output table` text, newline-terminated.
    table: String,
}

/// Runs one client subcommand against the broker.
pub async fn run(conn: Connection, command: Command) -> Result<(), CliError> {
    let not_a_client =
        || CliError::Invalid("`serve` and `cert` run locally; they are not client subcommands".to_string());
    if matches!(command, Command::Serve(_) | Command::Cert(_) | Command::Loadtest(_)) {
        return Err(not_a_client());
    }
    let session = Session::open(&conn).await?;
    let out = match command {
        Command::Serve(_) | Command::Cert(_) | Command::Loadtest(_) => return Err(not_a_client()),
        Command::Vault(cmd) => vault(&session, cmd).await?,
        Command::Subnet(cmd) => subnet(&session, cmd).await?,
        Command::Key(cmd) => key(&session, cmd).await?,
        Command::Policy(cmd) => policy(&session, cmd).await?,
        Command::Role(cmd) => role(&session, cmd).await?,
        Command::Identity(cmd) => identity(&session, cmd).await?,
        Command::User(cmd) => user(&session, cmd).await?,
        Command::Token(cmd) => token(&session, cmd).await?,
        Command::Clock(cmd) => clock(&session, cmd).await?,
        Command::Faults(cmd) => faults(&session, cmd).await?,
        Command::Throttling(cmd) => throttling(&session, cmd).await?,
        Command::Stats => stats(&session).await?,
        Command::Server(cmd) => server(&session, cmd).await?,
        Command::Db(DbCmd::Watch { server_id, count }) => {
            return watch(&session, server_id, count, conn.output).await;
        }
        Command::Db(cmd) => db(&session, cmd).await?,
    };
    let text = match conn.output {
        Output::Json => format!("{:#}\n", out.json),
        Output::Table => out.table,
    };
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(io_err(Path::new("stdout"))(e)),
        _ => Ok(()),
    }
}

async fn vault(s: &Session, cmd: VaultCmd) -> Result<Out, CliError> {
    match cmd {
        VaultCmd::Create { name, retention_days, purge_protection, rbac, no_default_policy } => {
            let grant = !(no_default_policy || rbac);
            let object_id = if grant { Some(s.caller_object_id()?) } else { None };
            let request = proto::CreateVaultRequest {
                name: name.clone(),
                soft_delete_retention_days: retention_days.unwrap_or(0),
                enable_purge_protection: purge_protection,
                enable_rbac_authorization: rbac,
                network_acls: None,
                public_network_access: String::new(),
            };
            let v = s.call(s.vaults().create_vault(request)).await?;
            let mut json = vault_json(&v);
            let mut rows = vault_rows(&v);
            if let Some(object_id) = object_id {
                let request = proto::SetAccessPolicyRequest {
                    vault_name: name,
                    object_id: object_id.clone(),
                    key_permissions: vec!["all".to_string()],
                };
                s.call(s.vaults().set_access_policy(request)).await?;
                json["access_policy"] = json!({ "object_id": object_id, "key_permissions": ["all"] });
                rows.push(("access policy", format!("{object_id}: all key permissions")));
            }
            Ok(Out { json, table: fields(&rows) })
        }
        VaultCmd::Show { name } => {
            let v = s.call(s.vaults().get_vault(proto::GetVaultRequest { name })).await?;
            Ok(vault_out(&v))
        }
        VaultCmd::List => {
            let list = s.call(s.vaults().list_vaults(proto::ListVaultsRequest {})).await?;
            let rows = list
                .vaults
                .iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        v.soft_delete_retention_days.to_string(),
                        v.enable_purge_protection.to_string(),
                        v.enable_rbac_authorization.to_string(),
                        v.public_network_access.clone(),
                        v.uri.clone(),
                    ]
                })
                .collect();
            Ok(Out {
                json: Value::Array(list.vaults.iter().map(vault_json).collect()),
                table: table(
                    &["NAME", "RETENTION", "PURGE-PROTECTION", "RBAC", "PUBLIC-ACCESS", "URI"],
                    rows,
                ),
            })
        }
        VaultCmd::Update { name, purge_protection, rbac, public_network_access } => {
            let request = proto::UpdateVaultRequest {
                name,
                enable_purge_protection: purge_protection.then_some(true),
                enable_rbac_authorization: rbac,
                network_acls: None,
                public_network_access,
            };
            let v = s.call(s.vaults().update_vault(request)).await?;
            Ok(vault_out(&v))
        }
        VaultCmd::Delete { name } => {
            s.call(s.vaults().delete_vault(proto::DeleteVaultRequest { name: name.clone() })).await?;
            Ok(Out { json: json!({ "deleted": name }), table: format!("deleted vault {name}\n") })
        }
        VaultCmd::Network(cmd) => network(s, cmd).await,
        VaultCmd::PrivateEndpoint(PrivateEndpointCmd::Create { vault, subnet }) => {
            let request =
                proto::CreatePrivateEndpointRequest { vault_name: vault.clone(), subnet_id: subnet };
            s.call(s.vaults().create_private_endpoint(request)).await?;
            let v = s.call(s.vaults().get_vault(proto::GetVaultRequest { name: vault })).await?;
            Ok(network_out(&v))
        }
    }
}

async fn network(s: &Session, cmd: NetworkCmd) -> Result<Out, CliError> {
    match cmd {
        NetworkCmd::Show { vault } => {
            Ok(network_out(&s.call(s.vaults().get_vault(proto::GetVaultRequest { name: vault })).await?))
        }
        NetworkCmd::Set(a) => {
            let unchanged = a.default_action.is_none()
                && a.bypass.is_none()
                && a.ip_rules.is_empty()
                && a.vnet_rules.is_empty()
                && !a.clear_ip_rules
                && !a.clear_vnet_rules
                && a.public_network_access.is_none();
            if unchanged {
                return Err(CliError::Invalid(
                    "nothing to change: give --default-action, --bypass, --ip-rule, --vnet-rule, --clear-ip-rules, --clear-vnet-rules or --public-network-access"
                        .to_string(),
                ));
            }
            // Read, change, write back the whole ACL block: UpdateVault replaces it. Not atomic;
            // a concurrent change between the two calls is overwritten.
            let current =
                s.call(s.vaults().get_vault(proto::GetVaultRequest { name: a.vault.clone() })).await?;
            let mut acls = current.network_acls.unwrap_or_default();
            if let Some(action) = a.default_action {
                acls.default_action = match action {
                    DefaultActionArg::Allow => "Allow",
                    DefaultActionArg::Deny => "Deny",
                }
                .to_string();
            }
            if let Some(bypass) = a.bypass {
                acls.bypass = match bypass {
                    BypassArg::AzureServices => "AzureServices",
                    BypassArg::None => "None",
                }
                .to_string();
            }
            if a.clear_ip_rules {
                acls.ip_rules.clear();
            }
            add_rules(&mut acls.ip_rules, clean_list(a.ip_rules));
            if a.clear_vnet_rules {
                acls.virtual_network_rules.clear();
            }
            add_rules(&mut acls.virtual_network_rules, clean_list(a.vnet_rules));
            let public_network_access = a.public_network_access.map(|p| {
                match p {
                    PublicAccessArg::Enabled => "Enabled",
                    PublicAccessArg::Disabled => "Disabled",
                }
                .to_string()
            });
            let request = proto::UpdateVaultRequest {
                name: a.vault,
                enable_purge_protection: None,
                enable_rbac_authorization: None,
                network_acls: Some(acls),
                public_network_access,
            };
            Ok(network_out(&s.call(s.vaults().update_vault(request)).await?))
        }
    }
}

/// Appends the rules not already there (ids compare case-insensitively; the broker normalises
/// and de-duplicates CIDRs).
fn add_rules(rules: &mut Vec<String>, new: Vec<String>) {
    for rule in new {
        if !rules.iter().any(|r| r.eq_ignore_ascii_case(&rule)) {
            rules.push(rule);
        }
    }
}

async fn subnet(s: &Session, cmd: SubnetCmd) -> Result<Out, CliError> {
    match cmd {
        SubnetCmd::Put { subnet_id, prefixes } => {
            let request = proto::PutSubnetRequest { subnet_id, address_prefixes: clean_list(prefixes) };
            let n = s.call(s.vaults().put_subnet(request)).await?;
            Ok(Out {
                json: subnet_json(&n),
                table: fields(&[
                    ("subnet id", n.subnet_id.clone()),
                    ("address prefixes", list_or_dash(&n.address_prefixes)),
                ]),
            })
        }
        SubnetCmd::List => {
            let list = s.call(s.vaults().list_subnets(proto::ListSubnetsRequest {})).await?;
            let rows = list
                .subnets
                .iter()
                .map(|n| {
                    let name = n.subnet_id.rsplit('/').next().unwrap_or_default().to_string();
                    vec![name, n.address_prefixes.join(","), n.subnet_id.clone()]
                })
                .collect();
            Ok(Out {
                json: Value::Array(list.subnets.iter().map(subnet_json).collect()),
                table: table(&["NAME", "PREFIXES", "ID"], rows),
            })
        }
    }
}

async fn policy(s: &Session, cmd: PolicyCmd) -> Result<Out, CliError> {
    match cmd {
        PolicyCmd::Set { vault, object_id, permissions } => {
            set_policy(s, vault, object_id, comma_list(&permissions)).await
        }
        PolicyCmd::Delete { vault, object_id } => set_policy(s, vault, object_id, Vec::new()).await,
        PolicyCmd::List { vault } => {
            let list = s
                .call(s.vaults().list_access_policies(proto::ListAccessPoliciesRequest { vault_name: vault }))
                .await?;
            let json = list
                .policies
                .iter()
                .map(|p| json!({ "object_id": p.object_id, "key_permissions": p.key_permissions }))
                .collect();
            let rows = list
                .policies
                .iter()
                .map(|p| vec![p.object_id.clone(), p.key_permissions.join(",")])
                .collect();
            Ok(Out { json: Value::Array(json), table: table(&["OBJECT-ID", "PERMISSIONS"], rows) })
        }
    }
}

/// Replaces the key permissions of `object_id` on `vault`; an empty list removes its policy.
async fn set_policy(
    s: &Session,
    vault: String,
    object_id: String,
    key_permissions: Vec<String>,
) -> Result<Out, CliError> {
    let request = proto::SetAccessPolicyRequest {
        vault_name: vault.clone(),
        object_id: object_id.clone(),
        key_permissions: key_permissions.clone(),
    };
    s.call(s.vaults().set_access_policy(request)).await?;
    let table = if key_permissions.is_empty() {
        format!("removed the access policy of {object_id} on {vault}\n")
    } else {
        fields(&[
            ("vault", vault.clone()),
            ("object id", object_id.clone()),
            ("permissions", key_permissions.join(", ")),
        ])
    };
    Ok(Out {
        json: json!({ "vault": vault, "object_id": object_id, "key_permissions": key_permissions }),
        table,
    })
}

async fn role(s: &Session, cmd: RoleCmd) -> Result<Out, CliError> {
    match cmd {
        RoleCmd::Assign { scope, principal_id, role } => {
            let request = proto::CreateRoleAssignmentRequest { scope, principal_id, role_name: role };
            let a = s.call(s.vaults().create_role_assignment(request)).await?;
            Ok(Out {
                json: role_json(&a),
                table: fields(&[
                    ("id", a.id.clone()),
                    ("role", a.role_name.clone()),
                    ("principal id", a.principal_id.clone()),
                    ("scope", a.scope.clone()),
                    ("normalized scope", a.normalized_scope.clone()),
                ]),
            })
        }
        RoleCmd::List { scope } => {
            let request = proto::ListRoleAssignmentsRequest { scope: scope.unwrap_or_default() };
            let list = s.call(s.vaults().list_role_assignments(request)).await?;
            let rows = list
                .assignments
                .iter()
                .map(|a| vec![a.id.clone(), a.role_name.clone(), a.principal_id.clone(), a.scope.clone()])
                .collect();
            Ok(Out {
                json: Value::Array(list.assignments.iter().map(role_json).collect()),
                table: table(&["ID", "ROLE", "PRINCIPAL-ID", "SCOPE"], rows),
            })
        }
        RoleCmd::Delete { id } => {
            s.call(s.vaults().delete_role_assignment(proto::DeleteRoleAssignmentRequest { id: id.clone() }))
                .await?;
            Ok(Out { json: json!({ "deleted": id }), table: format!("deleted role assignment {id}\n") })
        }
    }
}

async fn identity(s: &Session, cmd: IdentityCmd) -> Result<Out, CliError> {
    match cmd {
        IdentityCmd::Create { name, resource_group, subscription } => {
            let request = proto::CreateUserAssignedIdentityRequest {
                subscription_id: subscription.unwrap_or_default(),
                resource_group,
                name,
            };
            Ok(identity_out(&s.call(s.identities().create_user_assigned_identity(request)).await?))
        }
        IdentityCmd::Show(which) => {
            let request = proto::GetIdentityRequest {
                resource_id: which.resource_id.unwrap_or_default(),
                principal_id: which.principal_id.unwrap_or_default(),
                client_id: which.client_id.unwrap_or_default(),
            };
            Ok(identity_out(&s.call(s.identities().get_identity(request)).await?))
        }
        IdentityCmd::List => {
            let list = s.call(s.identities().list_identities(proto::ListIdentitiesRequest {})).await?;
            let rows = list
                .identities
                .iter()
                .map(|i| {
                    let name = i.resource_id.rsplit('/').next().unwrap_or_default().to_string();
                    vec![
                        name,
                        i.kind.clone(),
                        i.principal_id.clone(),
                        i.client_id.clone(),
                        i.resource_id.clone(),
                    ]
                })
                .collect();
            Ok(Out {
                json: Value::Array(list.identities.iter().map(identity_json).collect()),
                table: table(&["NAME", "KIND", "PRINCIPAL-ID", "CLIENT-ID", "RESOURCE-ID"], rows),
            })
        }
        IdentityCmd::Delete { resource_id, force } => {
            let request =
                proto::DeleteUserAssignedIdentityRequest { resource_id: resource_id.clone(), force };
            s.call(s.identities().delete_user_assigned_identity(request)).await?;
            Ok(Out {
                json: json!({ "deleted": resource_id }),
                table: format!("deleted identity {resource_id}\n"),
            })
        }
    }
}

async fn user(s: &Session, cmd: UserCmd) -> Result<Out, CliError> {
    match cmd {
        UserCmd::Create { name } => {
            let u = s.call(s.identities().create_user(proto::CreateUserRequest { name })).await?;
            Ok(Out {
                json: json!({
                    "principal_id": u.principal_id,
                    "name": u.name,
                    "token": u.token,
                    "expires_on": u.expires_on,
                }),
                table: fields(&[
                    ("principal id", u.principal_id.clone()),
                    ("name", u.name.clone()),
                    ("token", u.token.clone()),
                    ("expires on", when(u.expires_on)),
                ]),
            })
        }
    }
}

async fn token(s: &Session, cmd: TokenCmd) -> Result<Out, CliError> {
    match cmd {
        TokenCmd::Get { identity, audience } => {
            let request = proto::GetTokenRequest {
                client_id: identity.client_id.unwrap_or_default(),
                principal_id: identity.principal_id.unwrap_or_default(),
                resource_id: identity.resource_id.unwrap_or_default(),
                audience: audience.unwrap_or_default(),
            };
            let t = s.call(s.identities().get_token(request)).await?;
            // The token alone, so `--token "$(tde-broker token get …)"` works.
            let table = format!("{}\n", t.access_token);
            Ok(Out { json: json!({ "access_token": t.access_token, "expires_on": t.expires_on }), table })
        }
    }
}

async fn key(s: &Session, cmd: KeyCmd) -> Result<Out, CliError> {
    match cmd {
        KeyCmd::Create(a) => {
            let request = proto::CreateKeyRequest {
                vault_name: a.vault,
                name: a.name,
                kty: a.kty,
                key_size: a.size.unwrap_or(0),
                key_ops: clean_list(a.props.ops),
                attributes: Some(new_attributes(a.props.disabled, a.props.nbf, a.props.exp)),
                tags: a.props.tags.into_iter().collect(),
            };
            Ok(bundle_out(&s.call(s.keys().create_key(request)).await?))
        }
        KeyCmd::Import(a) => {
            let mut request = proto::ImportKeyRequest {
                vault_name: a.vault,
                name: a.name,
                hsm: a.hsm,
                key_ops: clean_list(a.props.ops),
                attributes: Some(new_attributes(a.props.disabled, a.props.nbf, a.props.exp)),
                tags: a.props.tags.into_iter().collect(),
                ..Default::default()
            };
            if let Some(path) = &a.pem_file {
                request.pem = std::fs::read_to_string(path).map_err(io_err(path))?;
            } else if let Some(path) = &a.der_file {
                request.pkcs8_der = std::fs::read(path).map_err(io_err(path))?;
            } else if let Some(path) = &a.jwk_file {
                request.jwk_json = std::fs::read_to_string(path).map_err(io_err(path))?;
            }
            Ok(bundle_out(&s.call(s.keys().import_key(request)).await?))
        }
        KeyCmd::Show { key_id } => {
            Ok(bundle_out(&s.call(s.keys().get_key(proto::GetKeyRequest { key_id })).await?))
        }
        KeyCmd::List { vault } => {
            let mut items = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = proto::ListKeysRequest {
                    vault_name: vault.clone(),
                    page_size: 0,
                    page_token: page_token.clone(),
                };
                let page = s.call(s.keys().list_keys(request)).await?;
                items.extend(page.keys);
                if !next_page(&mut page_token, page.next_page_token) {
                    break;
                }
            }
            Ok(items_out(&items, "NAME", |kid| kid_parts(kid).0))
        }
        KeyCmd::Versions { key_id } => {
            let mut items = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = proto::ListKeyVersionsRequest {
                    key_id: key_id.clone(),
                    page_size: 0,
                    page_token: page_token.clone(),
                };
                let page = s.call(s.keys().list_key_versions(request)).await?;
                items.extend(page.keys);
                if !next_page(&mut page_token, page.next_page_token) {
                    break;
                }
            }
            Ok(items_out(&items, "VERSION", |kid| kid_parts(kid).1))
        }
        KeyCmd::Update(a) => {
            let enabled = if a.enable {
                Some(true)
            } else if a.disable {
                Some(false)
            } else {
                None
            };
            let request = proto::UpdateKeyRequest {
                key_id: a.key_id,
                enabled,
                not_before: a.nbf,
                expires: a.exp,
                key_ops: clean_list(a.ops),
                tags: a.tags.into_iter().collect(),
                clear_not_before: a.clear_nbf,
                clear_expires: a.clear_exp,
            };
            Ok(bundle_out(&s.call(s.keys().update_key(request)).await?))
        }
        KeyCmd::Rotate { key_id } => {
            Ok(bundle_out(&s.call(s.keys().rotate_key(proto::RotateKeyRequest { key_id })).await?))
        }
        KeyCmd::Delete { key_id } => {
            Ok(deleted_out(&s.call(s.keys().delete_key(proto::DeleteKeyRequest { key_id })).await?))
        }
        KeyCmd::Deleted { vault } => {
            let mut items = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = proto::ListDeletedKeysRequest {
                    vault_name: vault.clone(),
                    page_size: 0,
                    page_token: page_token.clone(),
                };
                let page = s.call(s.keys().list_deleted_keys(request)).await?;
                items.extend(page.keys);
                if !next_page(&mut page_token, page.next_page_token) {
                    break;
                }
            }
            let rows = items
                .iter()
                .map(|d| {
                    let kid =
                        d.key.as_ref().and_then(|b| b.key.as_ref()).map(|k| k.kid.as_str()).unwrap_or("");
                    vec![
                        kid_parts(kid).0,
                        rfc3339(d.deleted_date),
                        rfc3339(d.scheduled_purge_date),
                        d.recovery_id.clone(),
                    ]
                })
                .collect();
            Ok(Out {
                json: Value::Array(items.iter().map(deleted_json).collect()),
                table: table(&["NAME", "DELETED", "PURGE-AFTER", "RECOVERY-ID"], rows),
            })
        }
        KeyCmd::Recover { vault, name } => {
            let request = proto::RecoverDeletedKeyRequest { vault_name: vault, name };
            Ok(bundle_out(&s.call(s.keys().recover_deleted_key(request)).await?))
        }
        KeyCmd::Purge { vault, name } => {
            let request = proto::PurgeDeletedKeyRequest { vault_name: vault.clone(), name: name.clone() };
            s.call(s.keys().purge_deleted_key(request)).await?;
            Ok(Out {
                json: json!({ "vault": vault, "purged": name }),
                table: format!("purged key {name} from {vault}\n"),
            })
        }
        KeyCmd::Backup { key_id, file } => {
            let backup = s.call(s.keys().backup_key(proto::BackupKeyRequest { key_id })).await?;
            std::fs::write(&file, &backup.blob).map_err(io_err(&file))?;
            let path = file.display().to_string();
            Ok(Out {
                json: json!({ "file": path, "bytes": backup.blob.len() }),
                table: format!("wrote {} bytes to {path}\n", backup.blob.len()),
            })
        }
        KeyCmd::Restore { vault, file } => {
            let blob = std::fs::read(&file).map_err(io_err(&file))?;
            let request = proto::RestoreKeyRequest { vault_name: vault, blob };
            Ok(bundle_out(&s.call(s.keys().restore_key(request)).await?))
        }
        KeyCmd::Wrap(a) => {
            let i = CryptoInput::read(&a)?;
            let request = proto::WrapKeyRequest {
                key_id: a.key_id,
                algorithm: a.alg,
                value: i.value,
                iv: i.iv,
                aad: i.aad,
                tag: i.tag,
            };
            Ok(result_out(&s.call(s.keys().wrap_key(request)).await?))
        }
        KeyCmd::Unwrap(a) => {
            let i = CryptoInput::read(&a)?;
            let request = proto::UnwrapKeyRequest {
                key_id: a.key_id,
                algorithm: a.alg,
                value: i.value,
                iv: i.iv,
                aad: i.aad,
                tag: i.tag,
            };
            Ok(result_out(&s.call(s.keys().unwrap_key(request)).await?))
        }
        KeyCmd::Encrypt(a) => {
            let i = CryptoInput::read(&a)?;
            let request = proto::EncryptRequest {
                key_id: a.key_id,
                algorithm: a.alg,
                value: i.value,
                iv: i.iv,
                aad: i.aad,
                tag: i.tag,
            };
            Ok(result_out(&s.call(s.keys().encrypt(request)).await?))
        }
        KeyCmd::Decrypt(a) => {
            let i = CryptoInput::read(&a)?;
            let request = proto::DecryptRequest {
                key_id: a.key_id,
                algorithm: a.alg,
                value: i.value,
                iv: i.iv,
                aad: i.aad,
                tag: i.tag,
            };
            Ok(result_out(&s.call(s.keys().decrypt(request)).await?))
        }
    }
}

async fn clock(s: &Session, cmd: ClockCmd) -> Result<Out, CliError> {
    let c = match cmd {
        ClockCmd::Show => s.call(s.emulation().get_clock(proto::GetClockRequest {})).await?,
        ClockCmd::Advance { seconds } => {
            s.call(s.emulation().advance_clock(proto::AdvanceClockRequest { seconds })).await?
        }
        ClockCmd::Set { now } => s.call(s.emulation().set_clock(proto::SetClockRequest { now })).await?,
    };
    Ok(Out {
        json: json!({ "now": c.now, "manual": c.manual }),
        table: fields(&[("now", when(c.now)), ("manual", c.manual.to_string())]),
    })
}

async fn faults(s: &Session, cmd: FaultsCmd) -> Result<Out, CliError> {
    let list = match cmd {
        FaultsCmd::Set {
            vault,
            outage,
            latency_ms,
            latency_p50_ms,
            latency_p99_ms,
            error_rate,
            error_code,
            fail_next,
        } => {
            let request = proto::SetFaultsRequest {
                vault_name: vault.unwrap_or_default(),
                outage,
                latency_ms: latency_ms.unwrap_or_default(),
                latency_p50_ms: latency_p50_ms.unwrap_or_default(),
                latency_p99_ms: latency_p99_ms.unwrap_or_default(),
                error_rate: error_rate.unwrap_or_default(),
                error_code: error_code.unwrap_or_default(),
                fail_next: fail_next.unwrap_or_default(),
            };
            s.call(s.emulation().set_faults(request)).await?
        }
        FaultsCmd::Clear { vault } => {
            let request = proto::ClearFaultsRequest { vault_name: vault.unwrap_or_default() };
            s.call(s.emulation().clear_faults(request)).await?
        }
    };
    // An empty vault name stands for every vault: `*` in the table, "" in JSON (as on the wire).
    // Faults other than an outage are shown only where set (JSON fields, a table column).
    let others = |f: &proto::VaultFaults| {
        let mut o = serde_json::Map::new();
        let mut put = |k: &str, v: Value, set: bool| {
            if set {
                o.insert(k.to_string(), v);
            }
        };
        put("latency_ms", json!(f.latency_ms), f.latency_ms > 0);
        put("latency_p50_ms", json!(f.latency_p50_ms), f.latency_p50_ms > 0);
        put("latency_p99_ms", json!(f.latency_p99_ms), f.latency_p99_ms > 0);
        put("error_rate", json!(f.error_rate), f.error_rate > 0.0);
        put("error_code", json!(f.error_code), f.error_rate > 0.0);
        put("fail_next", json!(f.fail_next), f.fail_next > 0);
        o
    };
    let any_others = list.faults.iter().any(|f| !others(f).is_empty());
    let rows = list
        .faults
        .iter()
        .map(|f| {
            let vault = if f.vault_name.is_empty() { "*".to_string() } else { f.vault_name.clone() };
            let mut row = vec![vault, f.outage.to_string()];
            if any_others {
                let o = others(f);
                let text = o.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
                row.push(if text.is_empty() { "-".to_string() } else { text.replace('"', "") });
            }
            row
        })
        .collect();
    let headers: &[&str] = if any_others { &["VAULT", "OUTAGE", "OTHER"] } else { &["VAULT", "OUTAGE"] };
    Ok(Out {
        json: Value::Array(
            list.faults
                .iter()
                .map(|f| {
                    let mut o = others(f);
                    o.insert("vault_name".into(), json!(f.vault_name));
                    o.insert("outage".into(), json!(f.outage));
                    Value::Object(o)
                })
                .collect(),
        ),
        table: table(headers, rows),
    })
}

async fn throttling(s: &Session, cmd: ThrottlingCmd) -> Result<Out, CliError> {
    let list = match cmd {
        ThrottlingCmd::Show => s.call(s.emulation().get_throttling(proto::GetThrottlingRequest {})).await?,
        ThrottlingCmd::Set { vault, profile, all_other, create } => {
            // As the broker reads the request: limits make the custom profile; a named profile
            // goes as given (the broker checks it and the limits).
            let request = match all_other {
                Some(all_other) => proto::SetThrottlingRequest {
                    profile: "custom".to_string(),
                    all_other_per_10s: all_other,
                    create_per_10s: create.unwrap_or(AZURE_CREATE_PER_10S),
                    vault_name: vault.unwrap_or_default(),
                },
                None => proto::SetThrottlingRequest {
                    profile: profile.unwrap_or_default(),
                    all_other_per_10s: 0,
                    create_per_10s: 0,
                    vault_name: vault.unwrap_or_default(),
                },
            };
            s.call(s.emulation().set_throttling(request)).await?
        }
    };
    // An empty vault name stands for every vault: `*` in the table, "" in JSON (as on the wire).
    let limit = |t: &proto::VaultThrottling, n: u32| {
        if t.profile == "off" { "-".to_string() } else { n.to_string() }
    };
    let rows = list
        .throttling
        .iter()
        .map(|t| {
            vec![
                if t.vault_name.is_empty() { "*".to_string() } else { t.vault_name.clone() },
                t.profile.clone(),
                limit(t, t.all_other_per_10s),
                limit(t, t.create_per_10s),
            ]
        })
        .collect();
    Ok(Out {
        json: Value::Array(
            list.throttling
                .iter()
                .map(|t| {
                    json!({
                        "vault_name": t.vault_name,
                        "profile": t.profile,
                        "all_other_per_10s": t.all_other_per_10s,
                        "create_per_10s": t.create_per_10s,
                    })
                })
                .collect(),
        ),
        table: table(&["VAULT", "PROFILE", "ALL-OTHER/10S", "CREATE/10S"], rows),
    })
}

async fn stats(s: &Session) -> Result<Out, CliError> {
    let r = s.call(s.emulation().get_stats(proto::GetStatsRequest {})).await?;
    Ok(Out { json: stats_json(&r), table: stats_table(&r) })
}

/// The `stats` document: the response's fields under their wire names.
fn stats_json(r: &proto::StatsResponse) -> Value {
    let o = r.objects.unwrap_or_default();
    let d = r.databases.clone().unwrap_or_default();
    json!({
        "version": r.version,
        "uptime_seconds": r.uptime_seconds,
        "now": r.now,
        "epoch": r.epoch,
        "objects": {
            "vaults": o.vaults,
            "keys": o.keys,
            "key_versions": o.key_versions,
            "deleted_keys": o.deleted_keys,
            "user_assigned_identities": o.user_assigned_identities,
            "system_assigned_identities": o.system_assigned_identities,
            "users": o.users,
            "engine_hosts": o.engine_hosts,
            "servers": o.servers,
            "databases": o.databases,
            "role_assignments": o.role_assignments,
            "subnets": o.subnets,
        },
        "databases": {
            "online": d.online,
            "inaccessible": d.inaccessible,
            "inaccessible_by_reason": d.inaccessible_by_reason.iter()
                .map(|c| json!({ "reason": c.reason, "count": c.count }))
                .collect::<Vec<_>>(),
        },
        "requests": r.requests.iter()
            .map(|c| json!({ "service": c.service, "method": c.method, "outcome": c.outcome, "count": c.count }))
            .collect::<Vec<_>>(),
        "latencies": r.latencies.iter()
            .map(|l| json!({
                "service": l.service,
                "method": l.method,
                "count": l.count,
                "total_seconds": l.total_seconds,
                "mean_ms": l.mean_ms,
            }))
            .collect::<Vec<_>>(),
        "caches": r.caches.iter()
            .map(|c| json!({
                "name": c.name,
                "enabled": c.enabled,
                "hits": c.hits,
                "misses": c.misses,
                "entries": c.entries,
                "capacity": c.capacity,
                "ttl_seconds": c.ttl_seconds,
            }))
            .collect::<Vec<_>>(),
        "rsa_operations": r.rsa_operations.iter()
            .map(|c| json!({ "op": c.op, "count": c.count }))
            .collect::<Vec<_>>(),
        "throttled_requests": r.throttled_requests,
        "injected_errors": r.injected_errors,
        "audit_write_failures": r.audit_write_failures,
    })
}

/// The `stats` text: summary fields, then tables of caches, requests by method (outcomes
/// folded into one column) and RSA operations.
fn stats_table(r: &proto::StatsResponse) -> String {
    let o = r.objects.unwrap_or_default();
    let d = r.databases.clone().unwrap_or_default();
    let mut databases = format!("{} ({} online, {} inaccessible", o.databases, d.online, d.inaccessible);
    if !d.inaccessible_by_reason.is_empty() {
        let reasons: Vec<String> = d
            .inaccessible_by_reason
            .iter()
            .map(|c| format!("{} {}", if c.reason.is_empty() { "-" } else { &c.reason }, c.count))
            .collect();
        databases.push_str(&format!(": {}", reasons.join(", ")));
    }
    databases.push(')');
    let mut out = fields(&[
        ("version", r.version.clone()),
        ("uptime", uptime_text(r.uptime_seconds)),
        ("now", when(r.now)),
        ("epoch", r.epoch.to_string()),
        ("vaults", o.vaults.to_string()),
        ("keys", format!("{} ({} versions, {} deleted)", o.keys, o.key_versions, o.deleted_keys)),
        (
            "identities",
            format!(
                "{} user-assigned, {} system-assigned",
                o.user_assigned_identities, o.system_assigned_identities
            ),
        ),
        ("users", o.users.to_string()),
        ("engine hosts", o.engine_hosts.to_string()),
        ("servers", o.servers.to_string()),
        ("databases", databases),
        ("role assignments", o.role_assignments.to_string()),
        ("subnets", o.subnets.to_string()),
        ("throttled requests", r.throttled_requests.to_string()),
        ("injected errors", r.injected_errors.to_string()),
        ("audit write failures", r.audit_write_failures.to_string()),
    ]);

    let caches = r
        .caches
        .iter()
        .map(|c| {
            let lookups = c.hits + c.misses;
            let rate = if lookups == 0 {
                "-".to_string()
            } else {
                format!("{:.1}%", c.hits as f64 * 100.0 / lookups as f64)
            };
            let (capacity, ttl) = if c.enabled {
                (c.capacity.to_string(), format!("{}s", c.ttl_seconds))
            } else {
                ("-".to_string(), "-".to_string())
            };
            vec![
                c.name.clone(),
                if c.enabled { "on" } else { "off" }.to_string(),
                c.entries.to_string(),
                capacity,
                ttl,
                c.hits.to_string(),
                c.misses.to_string(),
                rate,
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["CACHE", "STATE", "ENTRIES", "CAPACITY", "TTL", "HITS", "MISSES", "HIT RATE"],
        caches,
    ));

    // One row per method: calls, mean latency, and the outcomes with their counts.
    let mut outcomes: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
    for c in &r.requests {
        outcomes.entry((&c.service, &c.method)).or_default().push(format!("{}={}", c.outcome, c.count));
    }
    let short = |service: &str| service.strip_prefix("tdebroker.v1.").unwrap_or(service).to_string();
    let rows: Vec<Vec<String>> = r
        .latencies
        .iter()
        .map(|l| {
            let o = outcomes
                .get(&(l.service.as_str(), l.method.as_str()))
                .map_or("-".to_string(), |v| v.join(","));
            vec![short(&l.service), l.method.clone(), l.count.to_string(), format!("{:.3}", l.mean_ms), o]
        })
        .collect();
    out.push('\n');
    if rows.is_empty() {
        out.push_str("no requests yet\n");
    } else {
        out.push_str(&table(&["SERVICE", "METHOD", "CALLS", "MEAN MS", "OUTCOMES"], rows));
    }

    if !r.rsa_operations.is_empty() {
        let rows = r.rsa_operations.iter().map(|c| vec![c.op.clone(), c.count.to_string()]).collect();
        out.push('\n');
        out.push_str(&table(&["RSA OP", "COUNT"], rows));
    }
    out
}

/// `1d 2h 3m 4s`, leading zero units left out.
fn uptime_text(seconds: i64) -> String {
    let s = seconds.max(0);
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m {s}s"),
    }
}

async fn server(s: &Session, cmd: ServerCmd) -> Result<Out, CliError> {
    match cmd {
        ServerCmd::Create(a) => {
            let kind = match a.kind {
                ServerKindArg::Sql => proto::ServerKind::SqlServer,
                ServerKindArg::Mi => proto::ServerKind::ManagedInstance,
            };
            let request = proto::CreateServerRequest {
                subscription_id: a.subscription.unwrap_or_default(),
                resource_group: a.resource_group,
                name: a.name,
                kind: kind as i32,
                identity: Some(identity_block(a.identity)),
                key_id: a.key_id.unwrap_or_default(),
                subnet_id: a.subnet.unwrap_or_default(),
                auto_rotation_enabled: a.auto_rotation,
            };
            Ok(server_out(&s.call(s.servers().create_server(request)).await?))
        }
        ServerCmd::Show { server_id } => {
            Ok(server_out(&s.call(s.servers().get_server(proto::GetServerRequest { server_id })).await?))
        }
        ServerCmd::List => {
            let list = s.call(s.servers().list_servers(proto::ListServersRequest {})).await?;
            let rows = list
                .servers
                .iter()
                .map(|v| {
                    let p = v.protector.clone().unwrap_or_default();
                    vec![v.name.clone(), kind_name(v.kind), p.server_key_type, v.id.clone()]
                })
                .collect();
            Ok(Out {
                json: Value::Array(list.servers.iter().map(server_json).collect()),
                table: table(&["NAME", "KIND", "PROTECTOR", "ID"], rows),
            })
        }
        ServerCmd::Delete { server_id } => {
            let request = proto::DeleteServerRequest { server_id: server_id.clone() };
            s.call(s.servers().delete_server(request)).await?;
            Ok(Out { json: json!({ "deleted": server_id }), table: format!("deleted server {server_id}\n") })
        }
        ServerCmd::Identity { server_id, identity } => {
            let request =
                proto::UpdateServerIdentityRequest { server_id, identity: Some(identity_block(identity)) };
            Ok(server_out(&s.call(s.servers().update_server_identity(request)).await?))
        }
        ServerCmd::Protector(a) => {
            let server_key_type = if a.service_managed { "ServiceManaged" } else { "AzureKeyVault" };
            let request = proto::SetEncryptionProtectorRequest {
                server_id: a.server_id,
                server_key_type: server_key_type.to_string(),
                key_id: a.key_id.unwrap_or_default(),
                auto_rotation_enabled: a.auto_rotation,
            };
            Ok(protector_out(&s.call(s.servers().set_encryption_protector(request)).await?))
        }
        ServerCmd::ProtectorShow { server_id } => {
            let request = proto::GetEncryptionProtectorRequest { server_id };
            Ok(protector_out(&s.call(s.servers().get_encryption_protector(request)).await?))
        }
        ServerCmd::Revalidate { server_id } => {
            let request = proto::RevalidateEncryptionProtectorRequest { server_id };
            Ok(protector_out(&s.call(s.servers().revalidate_encryption_protector(request)).await?))
        }
        ServerCmd::HostCredential { server_id, out_dir } => {
            let request = proto::IssueHostCredentialRequest { server_id };
            let c = s.call(s.servers().issue_host_credential(request)).await?;
            let mut json = json!({ "token": c.token, "expires_on": c.expires_on });
            // Under TLS the broker also signs a client certificate naming the host principal.
            if !c.cert_pem.is_empty() && !c.key_pem.is_empty() {
                let oid = token_object_id(&c.token)?;
                let out_dir = out_dir.unwrap_or_else(|| PathBuf::from("."));
                let cert_path = out_dir.join(format!("{oid}.pem"));
                let key_path = out_dir.join(format!("{oid}.key"));
                let write = |path: &Path, bytes: &[u8], mode| {
                    crate::tls::write_file(path, bytes, mode).map_err(|e| CliError::Invalid(e.to_string()))
                };
                write(&key_path, c.key_pem.as_bytes(), 0o600)?;
                write(&cert_path, c.cert_pem.as_bytes(), 0o644)?;
                // stdout stays the token alone; the files are noted on stderr.
                eprintln!("certificate  {}", cert_path.display());
                eprintln!("key          {}", key_path.display());
                json["cert_file"] = json!(cert_path.display().to_string());
                json["key_file"] = json!(key_path.display().to_string());
            }
            // The token alone, so `--token "$(tde-broker server host-credential …)"` works.
            Ok(Out { json, table: format!("{}\n", c.token) })
        }
    }
}

/// The identity block the flags describe (the broker fills in the output-only fields).
fn identity_block(a: ServerIdentityArgs) -> proto::ServerIdentity {
    proto::ServerIdentity {
        system_assigned: a.system_assigned,
        system_principal_id: String::new(),
        user_assigned_identity_ids: clean_list(a.umis),
        primary_user_assigned_identity_id: a.primary.unwrap_or_default(),
    }
}

async fn db(s: &Session, cmd: DbCmd) -> Result<Out, CliError> {
    match cmd {
        DbCmd::Create { server_id, name } => {
            let request = proto::CreateDatabaseRequest { server_id, name };
            Ok(database_out(&s.call(s.servers().create_database(request)).await?))
        }
        DbCmd::Show { server_id, name } => {
            let request = proto::GetDatabaseRequest { server_id, name };
            Ok(database_out(&s.call(s.servers().get_database(request)).await?))
        }
        DbCmd::List { server_id } => {
            let list = s.call(s.servers().list_databases(proto::ListDatabasesRequest { server_id })).await?;
            let rows = list
                .databases
                .iter()
                .map(|d| vec![d.name.clone(), state_name(d.state), dash(&d.reason), rfc3339(d.state_since)])
                .collect();
            Ok(Out {
                json: Value::Array(list.databases.iter().map(database_json).collect()),
                table: table(&["NAME", "STATE", "REASON", "SINCE"], rows),
            })
        }
        DbCmd::Delete { server_id, name } => {
            let request = proto::DeleteDatabaseRequest { server_id: server_id.clone(), name: name.clone() };
            s.call(s.servers().delete_database(request)).await?;
            Ok(Out {
                json: json!({ "server_id": server_id, "deleted": name }),
                table: format!("deleted database {name} from {server_id}\n"),
            })
        }
        DbCmd::Watch { .. } => {
            Err(CliError::Invalid("`db watch` streams; it has no single result".to_string()))
        }
    }
}

/// `db watch`: one line per state transition as it arrives (a JSON object per line with
/// `--output json`), until `count` events or Ctrl-C.
async fn watch(s: &Session, server_id: String, count: Option<u64>, output: Output) -> Result<(), CliError> {
    let request = proto::WatchDatabaseStatesRequest { server_id };
    let mut events = s.call(s.servers().watch_database_states(request)).await?;
    // Fixed widths: rows are printed before the next one is known.
    let row = |cells: [&str; 5]| {
        let [time, event, database, state, reason] = cells;
        format!("{time:<20}  {event:<24}  {database:<16}  {state:<12}  {reason}").trim_end().to_string()
            + "\n"
    };
    // false once stdout is gone (a closed pipe ends the watch quietly).
    let print = |text: &str| {
        let mut stdout = std::io::stdout().lock();
        match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(io_err(Path::new("stdout"))(e)),
        }
    };
    if output == Output::Table && !print(&row(["TIME", "EVENT", "DATABASE", "STATE", "REASON"]))? {
        return Ok(());
    }
    let interrupted = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No SIGINT handler: the default action ends the process instead.
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(interrupted);
    let mut seen = 0u64;
    while count.is_none_or(|n| seen < n) {
        let next = tokio::select! {
            () = &mut interrupted => return Ok(()),
            next = events.message() => next,
        };
        let e = match next {
            Ok(Some(e)) => e,
            Ok(None) => {
                return Err(CliError::Connect {
                    addr: s.addr.clone(),
                    detail: "the broker ended the watch".to_string(),
                });
            }
            Err(status) => return Err(s.status_error(&status)),
        };
        let d = e.database.clone().unwrap_or_default();
        let text = match output {
            Output::Json => {
                format!("{}\n", json!({ "time": e.time, "event": e.event, "database": database_json(&d) }))
            }
            Output::Table => {
                row([&rfc3339(e.time), &e.event, &d.name, &state_name(d.state), &dash(&d.reason)])
            }
        };
        if !print(&text)? {
            return Ok(());
        }
        seen += 1;
    }
    Ok(())
}

/// Advances a page token; false when the listing is complete (or the broker repeats itself).
fn next_page(current: &mut String, next: String) -> bool {
    if next.is_empty() || next == *current {
        return false;
    }
    *current = next;
    true
}

/// The decoded inputs of a crypto operation.
struct CryptoInput {
    value: Vec<u8>,
    iv: Vec<u8>,
    aad: Vec<u8>,
    tag: Vec<u8>,
}

impl CryptoInput {
    fn read(a: &CryptoArgs) -> Result<Self, CliError> {
        let value = if let Some(b64) = &a.value_b64 {
            decode_b64("--value-b64", b64)?
        } else if let Some(text) = &a.value_hex {
            let text: String = text.chars().filter(|c| !c.is_whitespace() && *c != ':').collect();
            let text = text.strip_prefix("0x").unwrap_or(&text);
            hex::decode(text).map_err(|e| CliError::Invalid(format!("--value-hex is not hex: {e}")))?
        } else if let Some(path) = &a.input {
            std::fs::read(path).map_err(io_err(path))?
        } else {
            return Err(CliError::Invalid("give the value: --value-b64, --value-hex or --in".to_string()));
        };
        let optional =
            |flag: &str, v: &Option<String>| v.as_deref().map_or(Ok(Vec::new()), |t| decode_b64(flag, t));
        Ok(CryptoInput {
            value,
            iv: optional("--iv-b64", &a.iv_b64)?,
            aad: optional("--aad-b64", &a.aad_b64)?,
            tag: optional("--tag-b64", &a.tag_b64)?,
        })
    }
}

/// Standard base64, forgiving about padding and the URL-safe alphabet.
fn decode_b64(flag: &str, text: &str) -> Result<Vec<u8>, CliError> {
    let text = text.trim();
    [&B64, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .ok_or_else(|| CliError::Invalid(format!("{flag} is not base64")))
}

fn new_attributes(disabled: bool, nbf: Option<i64>, exp: Option<i64>) -> proto::KeyAttributes {
    proto::KeyAttributes {
        enabled: disabled.then_some(false),
        not_before: nbf,
        expires: exp,
        ..Default::default()
    }
}

/// Splits a comma list, dropping blanks: "" is the empty list.
fn comma_list(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Trims the items of a clap-split list and drops blanks.
fn clean_list(items: Vec<String>) -> Vec<String> {
    items.iter().flat_map(|s| comma_list(s)).collect()
}

fn parse_tag(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("'{text}' is not a tag: use KEY=VALUE")),
    }
}

/// Seconds, or a number with a unit: s, m, h, d, w (`90d`, `25h`, `-30m`).
fn parse_duration(text: &str) -> Result<i64, String> {
    let bad = || {
        format!("'{text}' is not a duration: use seconds or a number with s, m, h, d or w (90d, 25h, 30m)")
    };
    let t = text.trim();
    let (number, unit) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => (&t[..t.len() - 1], c.to_ascii_lowercase()),
        _ => (t, 's'),
    };
    let scale: i64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        'w' => 604_800,
        _ => return Err(bad()),
    };
    let n: i64 = number.trim().parse().map_err(|_| bad())?;
    n.checked_mul(scale).ok_or_else(|| format!("'{text}' is too large"))
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// `field  value` lines with the values aligned.
fn fields(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}

/// A header row and rows, columns aligned; the last column is not padded.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        text.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn server_out(v: &proto::Server) -> Out {
    let i = v.identity.clone().unwrap_or_default();
    let mut rows = vec![
        ("id", v.id.clone()),
        ("name", v.name.clone()),
        ("kind", kind_name(v.kind)),
        ("subnet", dash(&v.subnet_id)),
        ("system assigned", i.system_assigned.to_string()),
        ("system principal id", dash(&i.system_principal_id)),
        ("user assigned", list_or_dash(&i.user_assigned_identity_ids)),
        ("primary identity", dash(&i.primary_user_assigned_identity_id)),
    ];
    rows.extend(protector_rows(&v.protector.clone().unwrap_or_default()));
    Out { json: server_json(v), table: fields(&rows) }
}

fn server_json(v: &proto::Server) -> Value {
    let i = v.identity.clone().unwrap_or_default();
    json!({
        "id": v.id,
        "name": v.name,
        "kind": kind_name(v.kind),
        "subnet_id": v.subnet_id,
        "identity": {
            "system_assigned": i.system_assigned,
            "system_principal_id": i.system_principal_id,
            "user_assigned_identity_ids": i.user_assigned_identity_ids,
            "primary_user_assigned_identity_id": i.primary_user_assigned_identity_id,
        },
        "protector": protector_json(&v.protector.clone().unwrap_or_default()),
    })
}

fn protector_out(p: &proto::EncryptionProtector) -> Out {
    Out { json: protector_json(p), table: fields(&protector_rows(p)) }
}

fn protector_json(p: &proto::EncryptionProtector) -> Value {
    json!({
        "server_key_type": p.server_key_type,
        "key_id": p.key_id,
        "kid": p.kid,
        "auto_rotation_enabled": p.auto_rotation_enabled,
    })
}

fn protector_rows(p: &proto::EncryptionProtector) -> Vec<(&'static str, String)> {
    vec![
        ("protector", p.server_key_type.clone()),
        ("key id", dash(&p.key_id)),
        ("kid", dash(&p.kid)),
        ("auto rotation", p.auto_rotation_enabled.to_string()),
    ]
}

fn database_out(d: &proto::Database) -> Out {
    Out {
        json: database_json(d),
        table: fields(&[
            ("server id", d.server_id.clone()),
            ("name", d.name.clone()),
            ("state", state_name(d.state)),
            ("reason", dash(&d.reason)),
            ("state since", when(d.state_since)),
        ]),
    }
}

fn database_json(d: &proto::Database) -> Value {
    json!({
        "server_id": d.server_id,
        "name": d.name,
        "state": state_name(d.state),
        "reason": d.reason,
        "state_since": d.state_since,
    })
}

/// `SQL_SERVER`, `MANAGED_INSTANCE`, or the number when the broker is newer than this client.
fn kind_name(kind: i32) -> String {
    proto::ServerKind::try_from(kind).map_or_else(|_| kind.to_string(), |k| k.as_str_name().to_string())
}

/// `ONLINE`, `INACCESSIBLE`, or the number when the broker is newer than this client.
fn state_name(state: i32) -> String {
    proto::DatabaseState::try_from(state).map_or_else(|_| state.to_string(), |s| s.as_str_name().to_string())
}

fn dash(text: &str) -> String {
    if text.is_empty() { "-".to_string() } else { text.to_string() }
}

fn identity_out(i: &proto::Identity) -> Out {
    Out {
        json: identity_json(i),
        table: fields(&[
            ("resource id", i.resource_id.clone()),
            ("principal id", i.principal_id.clone()),
            ("client id", i.client_id.clone()),
            ("tenant id", i.tenant_id.clone()),
            ("kind", i.kind.clone()),
        ]),
    }
}

fn identity_json(i: &proto::Identity) -> Value {
    json!({
        "resource_id": i.resource_id,
        "principal_id": i.principal_id,
        "client_id": i.client_id,
        "tenant_id": i.tenant_id,
        "kind": i.kind,
    })
}

fn role_json(a: &proto::RoleAssignment) -> Value {
    json!({
        "id": a.id,
        "scope": a.scope,
        "principal_id": a.principal_id,
        "role_name": a.role_name,
        "normalized_scope": a.normalized_scope,
    })
}

fn vault_out(v: &proto::Vault) -> Out {
    Out { json: vault_json(v), table: fields(&vault_rows(v)) }
}

fn vault_json(v: &proto::Vault) -> Value {
    json!({
        "name": v.name,
        "uri": v.uri,
        "soft_delete_retention_days": v.soft_delete_retention_days,
        "enable_purge_protection": v.enable_purge_protection,
        "enable_rbac_authorization": v.enable_rbac_authorization,
        "public_network_access": v.public_network_access,
        "network_acls": v.network_acls.as_ref().map(|a| json!({
            "default_action": a.default_action,
            "bypass": a.bypass,
            "ip_rules": a.ip_rules,
            "virtual_network_rules": a.virtual_network_rules,
        })),
    })
}

fn vault_rows(v: &proto::Vault) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        ("name", v.name.clone()),
        ("uri", v.uri.clone()),
        ("soft delete retention", format!("{} days", v.soft_delete_retention_days)),
        ("purge protection", v.enable_purge_protection.to_string()),
        ("rbac authorization", v.enable_rbac_authorization.to_string()),
        ("public network access", v.public_network_access.clone()),
    ];
    if let Some(a) = &v.network_acls {
        rows.push(("network default action", a.default_action.clone()));
        rows.push(("network bypass", a.bypass.clone()));
        rows.push(("ip rules", list_or_dash(&a.ip_rules)));
        rows.push(("vnet rules", list_or_dash(&a.virtual_network_rules)));
    }
    rows
}

/// `vault network show`: the network side of a vault.
fn network_out(v: &proto::Vault) -> Out {
    let a = v.network_acls.clone().unwrap_or_default();
    Out {
        json: json!({
            "vault": v.name,
            "public_network_access": v.public_network_access,
            "default_action": a.default_action,
            "bypass": a.bypass,
            "ip_rules": a.ip_rules,
            "virtual_network_rules": a.virtual_network_rules,
            "private_endpoint_subnet_ids": v.private_endpoint_subnet_ids,
        }),
        table: fields(&[
            ("vault", v.name.clone()),
            ("public network access", dash(&v.public_network_access)),
            ("default action", dash(&a.default_action)),
            ("bypass", dash(&a.bypass)),
            ("ip rules", list_or_dash(&a.ip_rules)),
            ("vnet rules", list_or_dash(&a.virtual_network_rules)),
            ("private endpoint subnets", list_or_dash(&v.private_endpoint_subnet_ids)),
        ]),
    }
}

fn subnet_json(n: &proto::Subnet) -> Value {
    json!({ "subnet_id": n.subnet_id, "address_prefixes": n.address_prefixes })
}

fn bundle_out(b: &proto::KeyBundle) -> Out {
    Out { json: bundle_json(b), table: fields(&bundle_rows(b)) }
}

fn bundle_json(b: &proto::KeyBundle) -> Value {
    let key = b.key.clone().unwrap_or_default();
    json!({
        "kid": key.kid,
        "kty": key.kty,
        "key_ops": key.key_ops,
        "n": B64.encode(&key.n),
        "e": B64.encode(&key.e),
        "attributes": attributes_json(b.attributes.as_ref()),
        "tags": tags_json(&b.tags),
    })
}

fn bundle_rows(b: &proto::KeyBundle) -> Vec<(&'static str, String)> {
    let key = b.key.clone().unwrap_or_default();
    let a = b.attributes.clone().unwrap_or_default();
    let mut rows = vec![
        ("kid", key.kid),
        ("kty", key.kty),
        ("key ops", list_or_dash(&key.key_ops)),
        ("enabled", a.enabled.unwrap_or(true).to_string()),
        ("not before", when_opt(a.not_before)),
        ("expires", when_opt(a.expires)),
        ("created", when(a.created)),
        ("updated", when(a.updated)),
        ("recoverable days", a.recoverable_days.to_string()),
        ("recovery level", a.recovery_level),
        ("tags", tags_text(&b.tags)),
    ];
    if !key.n.is_empty() {
        let leading_zeros = key.n.iter().take_while(|b| **b == 0).count();
        rows.push(("modulus", format!("{} bits", (key.n.len() - leading_zeros) * 8)));
        rows.push(("exponent", B64.encode(&key.e)));
    }
    rows
}

fn deleted_out(d: &proto::DeletedKeyBundle) -> Out {
    let mut rows = d.key.as_ref().map(bundle_rows).unwrap_or_default();
    rows.push(("recovery id", d.recovery_id.clone()));
    rows.push(("deleted", when(d.deleted_date)));
    rows.push(("scheduled purge", when(d.scheduled_purge_date)));
    Out { json: deleted_json(d), table: fields(&rows) }
}

fn deleted_json(d: &proto::DeletedKeyBundle) -> Value {
    let mut json = d.key.as_ref().map(bundle_json).unwrap_or_else(|| Value::Object(Map::new()));
    json["recovery_id"] = json!(d.recovery_id);
    json["deleted_date"] = json!(d.deleted_date);
    json["scheduled_purge_date"] = json!(d.scheduled_purge_date);
    json
}

/// Key listings: the first column comes from the kid (name or version), the full kid last.
fn items_out(items: &[proto::KeyItem], first: &str, column: impl Fn(&str) -> String) -> Out {
    let rows = items
        .iter()
        .map(|item| {
            let a = item.attributes.clone().unwrap_or_default();
            vec![
                column(&item.kid),
                a.enabled.unwrap_or(true).to_string(),
                a.not_before.map_or_else(|| "-".to_string(), rfc3339),
                a.expires.map_or_else(|| "-".to_string(), rfc3339),
                rfc3339(a.updated),
                item.kid.clone(),
            ]
        })
        .collect();
    let json = items
        .iter()
        .map(|item| {
            json!({
                "kid": item.kid,
                "attributes": attributes_json(item.attributes.as_ref()),
                "tags": tags_json(&item.tags),
            })
        })
        .collect();
    Out { json: Value::Array(json), table: table(&[first, "ENABLED", "NBF", "EXP", "UPDATED", "KID"], rows) }
}

fn result_out(r: &proto::KeyOperationResult) -> Out {
    let mut rows = vec![("kid", r.kid.clone()), ("value", B64.encode(&r.value))];
    if !r.iv.is_empty() {
        rows.push(("iv", B64.encode(&r.iv)));
    }
    if !r.tag.is_empty() {
        rows.push(("tag", B64.encode(&r.tag)));
    }
    Out {
        json: json!({
            "kid": r.kid,
            "value": B64.encode(&r.value),
            "iv": B64.encode(&r.iv),
            "tag": B64.encode(&r.tag),
        }),
        table: fields(&rows),
    }
}

fn attributes_json(a: Option<&proto::KeyAttributes>) -> Value {
    let a = a.cloned().unwrap_or_default();
    json!({
        "enabled": a.enabled.unwrap_or(true),
        "not_before": a.not_before,
        "expires": a.expires,
        "created": a.created,
        "updated": a.updated,
        "recoverable_days": a.recoverable_days,
        "recovery_level": a.recovery_level,
    })
}

fn tags_json(tags: &HashMap<String, String>) -> Value {
    Value::Object(tags.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
}

fn tags_text(tags: &HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    list_or_dash(&pairs)
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() { "-".to_string() } else { items.join(", ") }
}

/// `(name, version)` of a key URI `https://{vault}.{suffix}/keys/{name}[/{version}]`; the whole
/// text as the name when it is not one.
fn kid_parts(kid: &str) -> (String, String) {
    let rest = kid.find("/keys/").map(|i| &kid[i + "/keys/".len()..]).unwrap_or(kid);
    let mut parts = rest.splitn(2, '/');
    let name = parts.next().unwrap_or_default().to_string();
    let version = parts.next().unwrap_or_default().trim_end_matches('/').to_string();
    (name, version)
}

/// Unix seconds with their UTC rendering: `1800000000 (2027-01-15T08:00:00Z)`.
fn when(t: i64) -> String {
    format!("{t} ({})", rfc3339(t))
}

fn when_opt(t: Option<i64>) -> String {
    t.map_or_else(|| "-".to_string(), when)
}

/// RFC 3339 UTC rendering of Unix seconds.
fn rfc3339(t: i64) -> String {
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(t.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3_600, secs % 3_600 / 60, secs % 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) — H. Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}
