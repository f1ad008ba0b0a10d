//! `vault …` (with `vault network …` and `vault private-endpoint …`), `subnet …`, `policy …`
//! and `role …`: the Vaults service of the broker, from the command line.

use serde_json::{Value, json};

use super::error::CliError;
use super::render::{
    Out, clean_list, comma_list, dash, fields, json_fields, leaf, list_or_dash, list_out, rfc3339, when,
};
use super::session::Session;
use crate::grpc::proto;

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
    /// Soft-delete a vault: it and all its keys are kept for its retention days (see `vault
    /// deleted`), then purged; until then the name cannot be reused.
    Delete {
        /// Vault name.
        name: String,
    },
    /// Soft-deleted vaults: list, show, recover or purge them.
    #[command(subcommand)]
    Deleted(DeletedCmd),
    /// Network rules of a vault: public network access, firewall, private endpoints.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Private endpoints of a vault.
    #[command(subcommand)]
    PrivateEndpoint(PrivateEndpointCmd),
}

/// `tde-broker vault deleted …`
#[derive(Debug, clap::Subcommand)]
pub enum DeletedCmd {
    /// List the soft-deleted vaults, with when each was deleted and when it is purged.
    List,
    /// Show one soft-deleted vault.
    Show {
        /// Vault name.
        name: String,
    },
    /// Bring a soft-deleted vault back with its keys, access policies, network rules and role
    /// assignments.
    Recover {
        /// Vault name.
        name: String,
    },
    /// Purge a soft-deleted vault and its keys for good (refused under purge protection).
    Purge {
        /// Vault name.
        name: String,
    },
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

/// `vault …`.
pub(super) async fn vault(s: &Session, cmd: VaultCmd) -> Result<Out, CliError> {
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
            let header = ["NAME", "RETENTION", "PURGE-PROTECTION", "RBAC", "PUBLIC-ACCESS", "URI"];
            Ok(list_out(&list.vaults, vault_json, &header, |v| {
                vec![
                    v.name.clone(),
                    v.soft_delete_retention_days.to_string(),
                    v.enable_purge_protection.to_string(),
                    v.enable_rbac_authorization.to_string(),
                    v.public_network_access.clone(),
                    v.uri.clone(),
                ]
            }))
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
            Ok(Out::deleted("vault", name))
        }
        VaultCmd::Deleted(cmd) => deleted(s, cmd).await,
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

/// `vault deleted …`.
async fn deleted(s: &Session, cmd: DeletedCmd) -> Result<Out, CliError> {
    match cmd {
        DeletedCmd::List => {
            let list = s.call(s.vaults().list_deleted_vaults(proto::ListDeletedVaultsRequest {})).await?;
            let header = ["NAME", "DELETED", "PURGE-AFTER", "PURGE-PROTECTION"];
            Ok(list_out(&list.vaults, deleted_json, &header, |d| {
                let v = d.vault.clone().unwrap_or_default();
                vec![
                    v.name,
                    rfc3339(d.deleted_date),
                    rfc3339(d.scheduled_purge_date),
                    v.enable_purge_protection.to_string(),
                ]
            }))
        }
        DeletedCmd::Show { name } => {
            let d = s.call(s.vaults().get_deleted_vault(proto::GetDeletedVaultRequest { name })).await?;
            let mut rows = d.vault.as_ref().map(vault_rows).unwrap_or_default();
            rows.push(("deleted", when(d.deleted_date)));
            rows.push(("scheduled purge", when(d.scheduled_purge_date)));
            Ok(Out { json: deleted_json(&d), table: fields(&rows) })
        }
        DeletedCmd::Recover { name } => {
            let v =
                s.call(s.vaults().recover_deleted_vault(proto::RecoverDeletedVaultRequest { name })).await?;
            Ok(vault_out(&v))
        }
        DeletedCmd::Purge { name } => {
            s.call(s.vaults().purge_deleted_vault(proto::PurgeDeletedVaultRequest { name: name.clone() }))
                .await?;
            Ok(Out { json: json!({ "purged": name }), table: format!("purged vault {name}\n") })
        }
    }
}

/// A soft-deleted vault under its wire field names.
fn deleted_json(d: &proto::DeletedVault) -> Value {
    json!({
        "vault": d.vault.as_ref().map(vault_json),
        "deleted_date": d.deleted_date,
        "scheduled_purge_date": d.scheduled_purge_date,
    })
}

/// `vault network …`.
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
                return Err(CliError::NothingToChange);
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

/// `subnet …`.
pub(super) async fn subnet(s: &Session, cmd: SubnetCmd) -> Result<Out, CliError> {
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
            Ok(list_out(&list.subnets, subnet_json, &["NAME", "PREFIXES", "ID"], |n| {
                vec![leaf(&n.subnet_id), n.address_prefixes.join(","), n.subnet_id.clone()]
            }))
        }
    }
}

/// `policy …`.
pub(super) async fn policy(s: &Session, cmd: PolicyCmd) -> Result<Out, CliError> {
    match cmd {
        PolicyCmd::Set { vault, object_id, permissions } => {
            set_policy(s, vault, object_id, comma_list(&permissions)).await
        }
        PolicyCmd::Delete { vault, object_id } => set_policy(s, vault, object_id, Vec::new()).await,
        PolicyCmd::List { vault } => {
            let list = s
                .call(s.vaults().list_access_policies(proto::ListAccessPoliciesRequest { vault_name: vault }))
                .await?;
            let json = |p: &proto::AccessPolicy| json_fields!(p; object_id, key_permissions);
            Ok(list_out(&list.policies, json, &["OBJECT-ID", "PERMISSIONS"], |p| {
                vec![p.object_id.clone(), p.key_permissions.join(",")]
            }))
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

/// `role …`.
pub(super) async fn role(s: &Session, cmd: RoleCmd) -> Result<Out, CliError> {
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
            Ok(list_out(&list.assignments, role_json, &["ID", "ROLE", "PRINCIPAL-ID", "SCOPE"], |a| {
                vec![a.id.clone(), a.role_name.clone(), a.principal_id.clone(), a.scope.clone()]
            }))
        }
        RoleCmd::Delete { id } => {
            s.call(s.vaults().delete_role_assignment(proto::DeleteRoleAssignmentRequest { id: id.clone() }))
                .await?;
            Ok(Out::deleted("role assignment", id))
        }
    }
}

/// A role assignment under its wire field names.
fn role_json(a: &proto::RoleAssignment) -> Value {
    json_fields!(a; id, scope, principal_id, role_name, normalized_scope)
}

/// `vault show|update`: the vault's fields.
fn vault_out(v: &proto::Vault) -> Out {
    Out { json: vault_json(v), table: fields(&vault_rows(v)) }
}

/// A vault under its wire field names.
fn vault_json(v: &proto::Vault) -> Value {
    let mut json = json_fields!(v; name, uri, soft_delete_retention_days, enable_purge_protection,
        enable_rbac_authorization, public_network_access);
    json["network_acls"] = json!(
        v.network_acls
            .as_ref()
            .map(|a| json_fields!(a; default_action, bypass, ip_rules, virtual_network_rules))
    );
    json
}

/// The `field  value` rows of a vault.
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

/// A subnet under its wire field names.
fn subnet_json(n: &proto::Subnet) -> Value {
    json_fields!(n; subnet_id, address_prefixes)
}
