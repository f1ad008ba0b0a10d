//! `identity …`, `user …` and `token …`: the Identities service of the broker (managed
//! identities, user principals, access tokens), from the command line.

use serde_json::Value;

use super::error::CliError;
use super::render::{Out, fields, json_fields, leaf, list_out, when};
use super::session::Session;
use crate::grpc::proto;

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
        /// The identity.
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

/// `identity …`.
pub(super) async fn identity(s: &Session, cmd: IdentityCmd) -> Result<Out, CliError> {
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
            let header = ["NAME", "KIND", "PRINCIPAL-ID", "CLIENT-ID", "RESOURCE-ID"];
            Ok(list_out(&list.identities, identity_json, &header, |i| {
                vec![
                    leaf(&i.resource_id),
                    i.kind.clone(),
                    i.principal_id.clone(),
                    i.client_id.clone(),
                    i.resource_id.clone(),
                ]
            }))
        }
        IdentityCmd::Delete { resource_id, force } => {
            let request =
                proto::DeleteUserAssignedIdentityRequest { resource_id: resource_id.clone(), force };
            s.call(s.identities().delete_user_assigned_identity(request)).await?;
            Ok(Out::deleted("identity", resource_id))
        }
    }
}

/// `user …`.
pub(super) async fn user(s: &Session, cmd: UserCmd) -> Result<Out, CliError> {
    match cmd {
        UserCmd::Create { name } => {
            let u = s.call(s.identities().create_user(proto::CreateUserRequest { name })).await?;
            Ok(Out {
                json: json_fields!(u; principal_id, name, token, expires_on, client_id, client_secret),
                table: fields(&[
                    ("principal id", u.principal_id.clone()),
                    ("name", u.name.clone()),
                    ("token", u.token.clone()),
                    ("expires on", when(u.expires_on)),
                    ("client id", u.client_id.clone()),
                    // Shown once: the broker keeps only its hash.
                    ("client secret", u.client_secret.clone()),
                ]),
            })
        }
    }
}

/// `token …`.
pub(super) async fn token(s: &Session, cmd: TokenCmd) -> Result<Out, CliError> {
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
            Ok(Out { json: json_fields!(t; access_token, expires_on), table })
        }
    }
}

/// `identity create|show`: the identity's fields.
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

/// An identity under its wire field names.
fn identity_json(i: &proto::Identity) -> Value {
    json_fields!(i; resource_id, principal_id, client_id, tenant_id, kind)
}
