//! Principals: user-assigned managed identities (standalone ARM resources with a principal id
//! and a client id) and users. Deleting one takes effect on its very next call: token
//! validation checks that the principal still exists.

use super::{Broker, new_guid};
use crate::model::ids::printable;
use crate::model::{BrokerError, Caller, Change, Principal, PrincipalKind};

const IDENTITY_READ: &str = "Microsoft.ManagedIdentity/userAssignedIdentities/read";
const IDENTITY_WRITE: &str = "Microsoft.ManagedIdentity/userAssignedIdentities/write";
const IDENTITY_DELETE: &str = "Microsoft.ManagedIdentity/userAssignedIdentities/delete";
/// Obtaining an identity's token (what a VM's metadata endpoint does for its own identities).
const IDENTITY_TOKEN: &str = "Microsoft.ManagedIdentity/userAssignedIdentities/getToken/action";
const USER_CREATE: &str = "Microsoft.Directory/users/create";

/// Names an identity by exactly one of its ids.
#[derive(Clone, Debug, Default)]
pub struct IdentitySelector {
    /// ARM resource id.
    pub resource_id: String,
    /// Principal (object) id.
    pub principal_id: String,
    /// Client (application) id.
    pub client_id: String,
}

fn check_name(what: &str, value: &str, max: usize, extra: &[char]) -> Result<(), BrokerError> {
    let ok = (1..=max).contains(&value.len())
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(&c));
    if ok {
        Ok(())
    } else {
        Err(BrokerError::bad_parameter(format!(
            "The {what} '{}' is invalid: 1-{max} characters, starting with a letter or digit, of letters, digits and {}.",
            printable(value),
            extra.iter().map(|c| format!("'{c}'")).collect::<Vec<_>>().join(" ")
        )))
    }
}

impl Broker {
    /// ARM id of a user-assigned identity.
    pub fn identity_resource_id(&self, subscription: &str, resource_group: &str, name: &str) -> String {
        format!(
            "/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
    }

    /// CreateUserAssignedIdentity: idempotent like an ARM PUT (an existing identity is returned).
    pub async fn create_user_assigned_identity(
        &self,
        caller: &Caller,
        subscription: &str,
        resource_group: &str,
        name: &str,
    ) -> Result<Principal, BrokerError> {
        let subscription = if subscription.trim().is_empty() {
            self.settings.subscription_id.clone()
        } else {
            uuid::Uuid::parse_str(subscription.trim())
                .map_err(|_| BrokerError::bad_parameter("The subscription id must be a GUID."))?
                .to_string()
        };
        check_name("resource group name", resource_group, 90, &['-', '_', '.', '(', ')'])?;
        check_name("identity name", name, 128, &['-', '_'])?;
        if name.len() < 3 {
            return Err(BrokerError::bad_parameter("An identity name has at least 3 characters."));
        }
        let resource_id = self.identity_resource_id(&subscription, resource_group, name);
        self.authorize_control(&caller.object_id, IDENTITY_WRITE, &resource_id)?;
        let txn = self.begin().await;
        if let Some(existing) = self.find_identity_by_resource_id(&resource_id) {
            return Ok(existing);
        }
        let identity = Principal {
            object_id: new_guid(),
            app_id: new_guid(),
            name: name.to_string(),
            kind: PrincipalKind::UserAssignedIdentity,
            resource_id: Some(resource_id),
            created: self.clock.now(),
            client_secret_hash: None,
        };
        self.commit(txn, vec![Change::PutPrincipal(identity.clone())]).await?;
        Ok(identity)
    }

    fn find_identity_by_resource_id(&self, resource_id: &str) -> Option<Principal> {
        self.read()
            .principals
            .values()
            .find(|p| p.resource_id.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(resource_id)))
            .cloned()
    }

    /// Looks an identity up by exactly one id, without authorization.
    fn find_identity(&self, sel: &IdentitySelector) -> Result<Principal, BrokerError> {
        let given = [&sel.resource_id, &sel.principal_id, &sel.client_id];
        if given.iter().filter(|s| !s.trim().is_empty()).count() != 1 {
            return Err(BrokerError::bad_parameter(
                "Name the identity by exactly one of resource_id, principal_id or client_id.",
            ));
        }
        let st = self.read();
        let found = st.principals.values().find(|p| {
            matches!(p.kind, PrincipalKind::UserAssignedIdentity | PrincipalKind::SystemAssignedIdentity)
                && if !sel.resource_id.trim().is_empty() {
                    p.resource_id.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(sel.resource_id.trim()))
                } else if !sel.principal_id.trim().is_empty() {
                    p.object_id.eq_ignore_ascii_case(sel.principal_id.trim())
                } else {
                    p.app_id.eq_ignore_ascii_case(sel.client_id.trim())
                }
        });
        found.cloned().ok_or_else(|| BrokerError::IdentityNotFound {
            name: printable(given.iter().find(|s| !s.trim().is_empty()).map_or("", |s| s.trim())),
        })
    }

    /// GetIdentity.
    pub fn get_identity(&self, caller: &Caller, sel: &IdentitySelector) -> Result<Principal, BrokerError> {
        let p = self.find_identity(sel)?;
        self.authorize_control(&caller.object_id, IDENTITY_READ, p.resource_id.as_deref().unwrap_or("/"))?;
        Ok(p)
    }

    /// ListIdentities: the identities the caller may read.
    pub fn list_identities(&self, caller: &Caller) -> Vec<Principal> {
        let st = self.read();
        let mut out: Vec<Principal> = st
            .principals
            .values()
            .filter(|p| p.kind == PrincipalKind::UserAssignedIdentity)
            .filter(|p| {
                crate::policy::control::allows(
                    &st.role_assignments,
                    &caller.object_id,
                    IDENTITY_READ,
                    p.resource_id.as_deref().unwrap_or("/"),
                )
            })
            .cloned()
            .collect();
        out.sort_by(|a, b| a.resource_id.cmp(&b.resource_id));
        out
    }

    /// DeleteUserAssignedIdentity: refused while it is some server's effective identity for a
    /// customer-managed protector, unless `force` (then those databases become inaccessible, as
    /// in the cloud).
    pub async fn delete_user_assigned_identity(
        &self,
        caller: &Caller,
        resource_id: &str,
        force: bool,
    ) -> Result<(), BrokerError> {
        let sel = IdentitySelector { resource_id: resource_id.to_string(), ..Default::default() };
        let txn = self.begin().await;
        let p = self.find_identity(&sel)?;
        let rid = p.resource_id.clone().unwrap_or_default();
        self.authorize_control(&caller.object_id, IDENTITY_DELETE, &rid)?;
        let dependants = self.identity_dependants(&self.read(), &rid);
        if !dependants.is_empty() && !force {
            return Err(BrokerError::IdentityInUse { identity: rid, dependants: dependants.join(", ") });
        }
        self.commit(txn, vec![Change::DeletePrincipal { object_id: p.object_id }]).await?;
        if !dependants.is_empty() {
            self.probe(None).await?;
        }
        Ok(())
    }

    /// CreateUser: a new user principal (directory write, an Owner's or Contributor's right),
    /// a service principal when `client_secret_hash` is given (its secret's stored form).
    pub async fn create_user(
        &self,
        caller: &Caller,
        name: &str,
        client_secret_hash: Option<String>,
    ) -> Result<Principal, BrokerError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(BrokerError::bad_parameter("A user name is 1-64 printable characters."));
        }
        self.authorize_control(&caller.object_id, USER_CREATE, "/")?;
        let user = Principal {
            object_id: new_guid(),
            app_id: new_guid(),
            name: name.to_string(),
            kind: PrincipalKind::User,
            resource_id: None,
            created: self.clock.now(),
            client_secret_hash,
        };
        let txn = self.begin().await;
        self.commit(txn, vec![Change::PutPrincipal(user.clone())]).await?;
        Ok(user)
    }

    /// The identity whose token the caller asks for, if the caller may have it: an engine host
    /// only gets the identities assigned to its own server (as a VM's metadata endpoint does).
    pub fn identity_for_token(
        &self,
        caller: &Caller,
        sel: &IdentitySelector,
    ) -> Result<Principal, BrokerError> {
        let p = self.find_identity(sel)?;
        if let Ok(server) = self.host_server(caller) {
            let own = server.identity.system_principal_id.as_deref() == Some(p.object_id.as_str())
                || p.resource_id
                    .as_deref()
                    .is_some_and(|r| server.identity.user_assigned.iter().any(|u| u.eq_ignore_ascii_case(r)));
            return if own {
                Ok(p)
            } else {
                Err(BrokerError::AuthorizationFailed {
                    object_id: caller.object_id.to_string(),
                    action: IDENTITY_TOKEN.to_string(),
                    scope: p.resource_id.unwrap_or_default(),
                })
            };
        }
        self.authorize_control(&caller.object_id, IDENTITY_TOKEN, p.resource_id.as_deref().unwrap_or("/"))?;
        Ok(p)
    }
}
