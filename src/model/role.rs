//! Built-in roles and role assignments (docs/RULES.md R2.3, R2.4). A role is defined the way ARM
//! defines it: `actions`/`not_actions` for the control plane and `data_actions` for Key Vault's
//! data plane, with `*` wildcards, matched case-insensitively.

use serde::{Deserialize, Serialize};

use super::error::BrokerError;
use super::ids::printable;

/// The built-in roles the broker knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Every action, including role assignments.
    Owner,
    /// Every action except managing access (role assignments).
    Contributor,
    /// Every read action.
    Reader,
    /// Manage vaults (not their data).
    KeyVaultContributor,
    /// Create, read, update, delete user-assigned identities.
    ManagedIdentityContributor,
    /// Read and assign user-assigned identities.
    ManagedIdentityOperator,
    /// Manage SQL logical servers.
    SqlServerContributor,
    /// Manage SQL managed instances.
    SqlManagedInstanceContributor,
    /// Every data action on a vault.
    KeyVaultAdministrator,
    /// Every action on keys.
    KeyVaultCryptoOfficer,
    /// Use keys: read, update, backup, crypto.
    KeyVaultCryptoUser,
    /// get, wrapKey, unwrapKey: what a TDE server identity needs.
    KeyVaultCryptoServiceEncryptionUser,
    /// Read metadata.
    KeyVaultReader,
}

/// A role's permissions.
#[derive(Debug)]
pub struct RoleDefinition {
    /// Control-plane actions granted.
    pub actions: &'static [&'static str],
    /// Control-plane actions carved out of `actions`.
    pub not_actions: &'static [&'static str],
    /// Data-plane actions granted.
    pub data_actions: &'static [&'static str],
}

const KEY_VAULT_READS: &[&str] = &["Microsoft.Authorization/*/read", "Microsoft.KeyVault/*/read"];

impl Role {
    /// Every built-in role.
    pub const ALL: [Role; 13] = [
        Role::Owner,
        Role::Contributor,
        Role::Reader,
        Role::KeyVaultContributor,
        Role::ManagedIdentityContributor,
        Role::ManagedIdentityOperator,
        Role::SqlServerContributor,
        Role::SqlManagedInstanceContributor,
        Role::KeyVaultAdministrator,
        Role::KeyVaultCryptoOfficer,
        Role::KeyVaultCryptoUser,
        Role::KeyVaultCryptoServiceEncryptionUser,
        Role::KeyVaultReader,
    ];

    /// The cloud's role name.
    pub fn name(self) -> &'static str {
        use Role::*;
        match self {
            Owner => "Owner",
            Contributor => "Contributor",
            Reader => "Reader",
            KeyVaultContributor => "Key Vault Contributor",
            ManagedIdentityContributor => "Managed Identity Contributor",
            ManagedIdentityOperator => "Managed Identity Operator",
            SqlServerContributor => "SQL Server Contributor",
            SqlManagedInstanceContributor => "SQL Managed Instance Contributor",
            KeyVaultAdministrator => "Key Vault Administrator",
            KeyVaultCryptoOfficer => "Key Vault Crypto Officer",
            KeyVaultCryptoUser => "Key Vault Crypto User",
            KeyVaultCryptoServiceEncryptionUser => "Key Vault Crypto Service Encryption User",
            KeyVaultReader => "Key Vault Reader",
        }
    }

    /// Parses a role name (case-insensitive).
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        Self::ALL.into_iter().find(|r| r.name().eq_ignore_ascii_case(s.trim())).ok_or_else(|| {
            BrokerError::bad_parameter(format!(
                "The role definition '{}' does not exist. Known roles: {}.",
                printable(s),
                Self::ALL.map(Role::name).join(", ")
            ))
        })
    }

    /// The role's definition (facts from Azure's built-in role definitions, trimmed to what the
    /// broker models).
    pub fn definition(self) -> RoleDefinition {
        use Role::*;
        let (actions, not_actions, data_actions): (
            &'static [&'static str],
            &'static [&'static str],
            &'static [&'static str],
        ) = match self {
            Owner => (&["*"], &[], &[]),
            Contributor => (
                &["*"],
                &[
                    "Microsoft.Authorization/*/Delete",
                    "Microsoft.Authorization/*/Write",
                    "Microsoft.Authorization/elevateAccess/Action",
                    "Microsoft.Directory/*",
                ],
                &[],
            ),
            Reader => (&["*/read"], &[], &[]),
            KeyVaultContributor => (&["Microsoft.Authorization/*/read", "Microsoft.KeyVault/*"], &[], &[]),
            ManagedIdentityContributor => (
                &[
                    "Microsoft.ManagedIdentity/userAssignedIdentities/read",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/write",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/delete",
                    "Microsoft.Authorization/*/read",
                ],
                &[],
                &[],
            ),
            ManagedIdentityOperator => (
                &[
                    "Microsoft.ManagedIdentity/userAssignedIdentities/*/read",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/*/assign/action",
                    "Microsoft.Authorization/*/read",
                ],
                &[],
                &[],
            ),
            SqlServerContributor => {
                (&["Microsoft.Sql/servers/*", "Microsoft.Authorization/*/read"], &[], &[])
            }
            SqlManagedInstanceContributor => {
                (&["Microsoft.Sql/managedInstances/*", "Microsoft.Authorization/*/read"], &[], &[])
            }
            KeyVaultAdministrator => (KEY_VAULT_READS, &[], &["Microsoft.KeyVault/vaults/*"]),
            KeyVaultCryptoOfficer => (
                KEY_VAULT_READS,
                &[],
                &["Microsoft.KeyVault/vaults/keys/*", "Microsoft.KeyVault/vaults/deletedKeys/*"],
            ),
            KeyVaultCryptoUser => (
                &[],
                &[],
                &[
                    "Microsoft.KeyVault/vaults/keys/read",
                    "Microsoft.KeyVault/vaults/keys/update/action",
                    "Microsoft.KeyVault/vaults/keys/backup/action",
                    "Microsoft.KeyVault/vaults/keys/encrypt/action",
                    "Microsoft.KeyVault/vaults/keys/decrypt/action",
                    "Microsoft.KeyVault/vaults/keys/wrap/action",
                    "Microsoft.KeyVault/vaults/keys/unwrap/action",
                    "Microsoft.KeyVault/vaults/keys/sign/action",
                    "Microsoft.KeyVault/vaults/keys/verify/action",
                ],
            ),
            KeyVaultCryptoServiceEncryptionUser => (
                &[],
                &[],
                &[
                    "Microsoft.KeyVault/vaults/keys/read",
                    "Microsoft.KeyVault/vaults/keys/wrap/action",
                    "Microsoft.KeyVault/vaults/keys/unwrap/action",
                ],
            ),
            KeyVaultReader => (KEY_VAULT_READS, &[], &["Microsoft.KeyVault/vaults/*/read"]),
        };
        RoleDefinition { actions, not_actions, data_actions }
    }

    /// Whether the role grants a control-plane action.
    pub fn allows_action(self, action: &str) -> bool {
        let d = self.definition();
        d.actions.iter().any(|p| wildcard_match(p, action))
            && !d.not_actions.iter().any(|p| wildcard_match(p, action))
    }

    /// Whether the role grants a data-plane action.
    pub fn allows_data_action(self, action: &str) -> bool {
        self.definition().data_actions.iter().any(|p| wildcard_match(p, action))
    }
}

/// ARM-style wildcard match: `*` stands for any run of characters; case-insensitive.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p = pattern.to_ascii_lowercase();
    let t = text.to_ascii_lowercase();
    let parts: Vec<&str> = p.split('*').collect();
    if parts.len() == 1 {
        return p == t;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !t.starts_with(first) || t.len() < first.len() + last.len() || !t.ends_with(last) {
        return false;
    }
    let mut rest = &t[first.len()..t.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// A role assignment: a principal holds a role at a scope and everything beneath it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleAssignment {
    /// Assignment id (GUID).
    pub id: String,
    /// ARM scope the broker evaluates (`/`, a subscription, …, a vault, a key).
    pub scope: String,
    /// The scope as the caller wrote it (vault or key URIs are kept for display).
    pub display_scope: String,
    /// Object id of the assignee.
    pub principal_id: String,
    /// The role.
    pub role: Role,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_arm() {
        assert!(wildcard_match("*", "Microsoft.KeyVault/vaults/write"));
        assert!(wildcard_match("*/read", "Microsoft.KeyVault/vaults/read"));
        assert!(!wildcard_match("*/read", "Microsoft.KeyVault/vaults/write"));
        assert!(wildcard_match(
            "Microsoft.Authorization/*/Write",
            "microsoft.authorization/roleAssignments/write"
        ));
        assert!(wildcard_match("Microsoft.KeyVault/vaults/*/read", "Microsoft.KeyVault/vaults/keys/read"));
        assert!(!wildcard_match(
            "Microsoft.KeyVault/vaults/keys/read",
            "Microsoft.KeyVault/vaults/keys/readx"
        ));
    }

    #[test]
    fn contributor_cannot_manage_access() {
        assert!(Role::Contributor.allows_action("Microsoft.KeyVault/vaults/write"));
        assert!(!Role::Contributor.allows_action("Microsoft.Authorization/roleAssignments/write"));
        assert!(Role::Owner.allows_action("Microsoft.Authorization/roleAssignments/write"));
    }

    #[test]
    fn crypto_service_encryption_user_grants_get_wrap_unwrap_only() {
        let r = Role::KeyVaultCryptoServiceEncryptionUser;
        assert!(r.allows_data_action("Microsoft.KeyVault/vaults/keys/read"));
        assert!(r.allows_data_action("Microsoft.KeyVault/vaults/keys/wrap/action"));
        assert!(r.allows_data_action("Microsoft.KeyVault/vaults/keys/unwrap/action"));
        assert!(!r.allows_data_action("Microsoft.KeyVault/vaults/keys/decrypt/action"));
        assert!(!r.allows_action("Microsoft.KeyVault/vaults/read"));
    }

    #[test]
    fn managed_identity_contributor_manages_identities_but_not_vaults() {
        let r = Role::ManagedIdentityContributor;
        assert!(r.allows_action("Microsoft.ManagedIdentity/userAssignedIdentities/write"));
        assert!(!r.allows_action("Microsoft.KeyVault/vaults/write"));
        assert!(
            Role::ManagedIdentityOperator
                .allows_action("Microsoft.ManagedIdentity/userAssignedIdentities/x/assign/action")
        );
    }

    #[test]
    fn role_names_parse_case_insensitively() {
        assert_eq!(
            Role::parse("key vault crypto service encryption user").unwrap(),
            Role::KeyVaultCryptoServiceEncryptionUser
        );
        assert!(Role::parse("Janitor").is_err());
    }
}
