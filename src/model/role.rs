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
            KeyVaultContributor => (
                &["Microsoft.Authorization/*/read", "Microsoft.KeyVault/*"],
                &[
                    "Microsoft.KeyVault/locations/deletedVaults/purge/action",
                    "Microsoft.KeyVault/hsmPools/*",
                    "Microsoft.KeyVault/managedHsms/*",
                ],
                &[],
            ),
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
                &[
                    "Microsoft.KeyVault/vaults/keys/*",
                    "Microsoft.KeyVault/vaults/deletedKeys/*",
                    "Microsoft.KeyVault/vaults/keyrotationpolicies/*",
                ],
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

/// ARM-style wildcard match, the one evaluator for `actions`, `notActions` and `dataActions`;
/// case-insensitive.
///
/// `*` stands for any run of characters, `/` included (`*/read` grants every provider's reads).
/// A `*` that fills a whole segment (`a/*/b`) may also stand for no segment at all, so the
/// pattern matches `a/b` too. That is how ARM reads the built-in roles: Managed Identity
/// Operator lists `Microsoft.ManagedIdentity/userAssignedIdentities/*/assign/action` and
/// `.../userAssignedIdentities/*/read`, is documented to read and assign user-assigned
/// identities, and ARM checks exactly `Microsoft.ManagedIdentity/userAssignedIdentities/assign/action`
/// (and `.../userAssignedIdentities/read`) at the identity's scope. Reading `*` as "one or more
/// characters between the two slashes" would make the role grant nothing it is meant for.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    glob(pattern.as_bytes(), text.as_bytes())
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some((c, rest)) => {
            // `/*/` standing for an empty segment: skip the `*` and its trailing `/`.
            if *c == b'/' && rest.starts_with(b"*/") && glob(&rest[1..], text) {
                return true;
            }
            text.first().is_some_and(|t| t.eq_ignore_ascii_case(c)) && glob(rest, &text[1..])
        }
    }
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
    fn a_wildcard_segment_also_stands_for_no_segment() {
        let assign = "Microsoft.ManagedIdentity/userAssignedIdentities/*/assign/action";
        assert!(wildcard_match(assign, "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action"));
        assert!(wildcard_match(assign, "microsoft.managedidentity/userassignedidentities/x/y/assign/action"));
        assert!(!wildcard_match(assign, "Microsoft.ManagedIdentity/userAssignedIdentitiesassign/action"));
        assert!(!wildcard_match(assign, "Microsoft.ManagedIdentity/userAssignedIdentities/assign/actions"));
        assert!(!wildcard_match(assign, "Microsoft.ManagedIdentity/assign/action"));
        assert!(wildcard_match("Microsoft.KeyVault/*/read", "Microsoft.KeyVault/read"));
        assert!(!wildcard_match("Microsoft.KeyVault/*", "Microsoft.KeyVaultX/vaults/read"));
    }

    #[test]
    fn managed_identity_operator_grants_the_assign_action_arm_checks_on_an_identity() {
        let r = Role::ManagedIdentityOperator;
        assert!(r.allows_action("Microsoft.ManagedIdentity/userAssignedIdentities/assign/action"));
        assert!(r.allows_action("Microsoft.ManagedIdentity/userAssignedIdentities/read"));
        assert!(!r.allows_action("Microsoft.ManagedIdentity/userAssignedIdentities/write"));
        assert!(!r.allows_action("Microsoft.ManagedIdentity/userAssignedIdentities/delete"));
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
