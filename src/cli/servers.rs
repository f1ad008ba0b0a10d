//! `server …`, `db …` and `db watch`: the Servers service of the broker (SQL servers and
//! managed instances, their identities and TDE protectors, databases and their states), from the
//! command line.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::error::{CliError, ConnectCause};
use super::render::{
    Out, Output, clean_list, dash, fields, json_fields, list_or_dash, list_out, rfc3339, when, write_stdout,
};
use super::session::{Session, token_object_id};
use crate::grpc::proto;

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
        /// The new identity block.
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
    /// The server's identities.
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

/// `server …`.
pub(super) async fn server(s: &Session, cmd: ServerCmd) -> Result<Out, CliError> {
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
            Ok(list_out(&list.servers, server_json, &["NAME", "KIND", "PROTECTOR", "ID"], |v| {
                let p = v.protector.clone().unwrap_or_default();
                vec![v.name.clone(), kind_name(v.kind), p.server_key_type, v.id.clone()]
            }))
        }
        ServerCmd::Delete { server_id } => {
            let request = proto::DeleteServerRequest { server_id: server_id.clone() };
            s.call(s.servers().delete_server(request)).await?;
            Ok(Out::deleted("server", server_id))
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
                let files = super::cert::write_pair(out_dir, &oid, &c.cert_pem, &c.key_pem)?;
                // stdout stays the token alone; the files are noted on stderr.
                eprint!("{files}");
                json["cert_file"] = json!(files.cert.display().to_string());
                json["key_file"] = json!(files.key.display().to_string());
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

/// `db …` but `db watch`.
pub(super) async fn db(s: &Session, cmd: DbCmd) -> Result<Out, CliError> {
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
            Ok(list_out(&list.databases, database_json, &["NAME", "STATE", "REASON", "SINCE"], |d| {
                vec![d.name.clone(), state_name(d.state), dash(&d.reason), rfc3339(d.state_since)]
            }))
        }
        DbCmd::Delete { server_id, name } => {
            let request = proto::DeleteDatabaseRequest { server_id: server_id.clone(), name: name.clone() };
            s.call(s.servers().delete_database(request)).await?;
            Ok(Out {
                json: json!({ "server_id": server_id, "deleted": name }),
                table: format!("deleted database {name} from {server_id}\n"),
            })
        }
        DbCmd::Watch { .. } => Err(CliError::Streams),
    }
}

/// `db watch`: one line per state transition as it arrives (a JSON object per line with
/// `--output json`), until `count` events or Ctrl-C.
pub(super) async fn watch(
    s: &Session,
    server_id: String,
    count: Option<u64>,
    output: Output,
) -> Result<(), CliError> {
    let request_server = crate::model::ids::printable(&server_id);
    let request = proto::WatchDatabaseStatesRequest { server_id };
    let mut events = s.call(s.servers().watch_database_states(request)).await?;
    // Fixed widths: rows are printed before the next one is known.
    let row = |cells: [&str; 5]| {
        let [time, event, database, state, reason] = cells;
        format!("{time:<20}  {event:<24}  {database:<16}  {state:<12}  {reason}").trim_end().to_string()
            + "\n"
    };
    // write_stdout is false once stdout is gone (a closed pipe ends the watch quietly).
    if output == Output::Table && !write_stdout(&row(["TIME", "EVENT", "DATABASE", "STATE", "REASON"]))? {
        return Ok(());
    }
    // Said once, where a person reads it: how this ends.
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("watching {} (Ctrl-C stops it; in the background, `kill %1` or `kill $!`)", request_server);
    }
    let interrupted = super::interrupted();
    tokio::pin!(interrupted);
    let mut seen = 0u64;
    while count.is_none_or(|n| seen < n) {
        let next = tokio::select! {
            () = &mut interrupted => return Ok(()),
            next = events.message() => next,
        };
        let e = match next {
            Ok(Some(e)) => e,
            Ok(None) => return Err(s.disconnected(ConnectCause::WatchEnded)),
            Err(status) => return Err(s.status_error(status)),
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
        if !write_stdout(&text)? {
            return Ok(());
        }
        seen += 1;
    }
    Ok(())
}

/// `server create|show|identity`: the server's fields and its protector.
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

/// A server under its wire field names.
fn server_json(v: &proto::Server) -> Value {
    let i = v.identity.clone().unwrap_or_default();
    let mut json = json_fields!(v; id, name, subnet_id);
    json["kind"] = json!(kind_name(v.kind));
    json["identity"] = json_fields!(i; system_assigned, system_principal_id, user_assigned_identity_ids,
        primary_user_assigned_identity_id);
    json["protector"] = protector_json(&v.protector.clone().unwrap_or_default());
    json
}

/// `server protector|protector-show|revalidate`: the protector's fields.
fn protector_out(p: &proto::EncryptionProtector) -> Out {
    Out { json: protector_json(p), table: fields(&protector_rows(p)) }
}

/// A protector under its wire field names.
fn protector_json(p: &proto::EncryptionProtector) -> Value {
    json_fields!(p; server_key_type, key_id, kid, auto_rotation_enabled)
}

/// The `field  value` rows of a protector.
fn protector_rows(p: &proto::EncryptionProtector) -> Vec<(&'static str, String)> {
    vec![
        ("protector", p.server_key_type.clone()),
        ("key id", dash(&p.key_id)),
        ("kid", dash(&p.kid)),
        ("auto rotation", p.auto_rotation_enabled.to_string()),
    ]
}

/// `db create|show`: the database's fields.
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

/// A database under its wire field names, its state by name.
fn database_json(d: &proto::Database) -> Value {
    let mut json = json_fields!(d; server_id, name, reason, state_since);
    json["state"] = json!(state_name(d.state));
    json
}

/// `SQL_SERVER`, `MANAGED_INSTANCE`, or the number when the broker is newer than this client.
fn kind_name(kind: i32) -> String {
    proto::ServerKind::try_from(kind).map_or_else(|_| kind.to_string(), |k| k.as_str_name().to_string())
}

/// `ONLINE`, `INACCESSIBLE`, or the number when the broker is newer than this client.
fn state_name(state: i32) -> String {
    proto::DatabaseState::try_from(state).map_or_else(|_| state.to_string(), |s| s.as_str_name().to_string())
}
