//! Control-plane authorization: ARM role assignments at `/`, subscription, resource group or
//! resource scope (docs/RULES.md R2.4). An assignment applies to its scope and everything beneath
//! it.

use crate::model::{BrokerError, RoleAssignment};

/// Whether `scope` is `assignment_scope` or lies beneath it (segment-wise, case-insensitive).
pub fn scope_contains(assignment_scope: &str, scope: &str) -> bool {
    let outer = assignment_scope.trim_end_matches('/');
    if outer.is_empty() {
        return true;
    }
    let inner = scope.trim_end_matches('/');
    inner.len() >= outer.len()
        && inner.is_char_boundary(outer.len())
        && inner[..outer.len()].eq_ignore_ascii_case(outer)
        && (inner.len() == outer.len() || inner[outer.len()..].starts_with('/'))
}

/// Whether some assignment of `object_id` at or above `scope` grants the control-plane `action`.
pub fn allows(assignments: &[RoleAssignment], object_id: &str, action: &str, scope: &str) -> bool {
    assignments.iter().any(|a| {
        a.principal_id == object_id && scope_contains(&a.scope, scope) && a.role.allows_action(action)
    })
}

/// Allows the action, or refuses with `AuthorizationFailed` naming the action and scope.
pub fn authorize(
    assignments: &[RoleAssignment],
    object_id: &str,
    action: &str,
    scope: &str,
) -> Result<(), BrokerError> {
    if allows(assignments, object_id, action, scope) {
        Ok(())
    } else {
        Err(BrokerError::AuthorizationFailed {
            object_id: object_id.to_string(),
            action: action.to_string(),
            scope: scope.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    const WRITE: &str = "Microsoft.KeyVault/vaults/write";
    const READ: &str = "Microsoft.KeyVault/vaults/read";

    fn assignment(scope: &str, role: Role) -> RoleAssignment {
        RoleAssignment {
            id: "a".into(),
            scope: scope.into(),
            display_scope: scope.into(),
            principal_id: "p".into(),
            role,
        }
    }

    #[test]
    fn owner_at_root_may_do_everything_everywhere() {
        let a = [assignment("/", Role::Owner)];
        assert!(authorize(&a, "p", WRITE, "/subscriptions/s/resourceGroups/rg").is_ok());
        assert!(authorize(&a, "someone-else", WRITE, "/").is_err());
    }

    #[test]
    fn reader_may_read_but_not_write() {
        let a = [assignment("/subscriptions/s", Role::Reader)];
        assert!(authorize(&a, "p", READ, "/subscriptions/s/x").is_ok());
        let e = authorize(&a, "p", WRITE, "/subscriptions/s/x").unwrap_err();
        assert_eq!(e.code(), "AuthorizationFailed");
        assert!(e.to_string().contains("'Microsoft.KeyVault/vaults/write' over scope '/subscriptions/s/x'"));
    }

    #[test]
    fn assignments_apply_beneath_their_scope_only() {
        let a = [assignment("/subscriptions/s/resourceGroups/rg", Role::Contributor)];
        assert!(authorize(&a, "p", WRITE, "/subscriptions/S/resourcegroups/RG/providers/x").is_ok());
        assert!(authorize(&a, "p", WRITE, "/subscriptions/s/resourceGroups/rg2").is_err());
        assert!(authorize(&a, "p", WRITE, "/subscriptions/s").is_err());
    }

    #[test]
    fn scopes_match_by_whole_segments() {
        assert!(scope_contains("/subscriptions/s", "/subscriptions/S/rg"));
        assert!(!scope_contains("/subscriptions/s", "/subscriptions/s2"));
        assert!(scope_contains("/", "/anything"));
    }

    const RG: &str = "/subscriptions/s/resourceGroups/rg";
    const VAULT: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv";
    const UMI: &str =
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u";
    const SQL: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Sql/servers/sql";
    const MI: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Sql/managedInstances/mi";

    /// Where a built-in role is assigned in practice, the control-plane actions its definition
    /// documents (as the broker checks them) and the ones it must not grant: its `notActions`
    /// where it has any, else neighbouring actions of another resource type.
    fn documented(role: Role) -> (&'static str, &'static [&'static str], &'static [&'static str]) {
        use Role::*;
        match role {
            Owner => (
                RG,
                &[
                    "Microsoft.Authorization/roleAssignments/write",
                    "Microsoft.Authorization/roleAssignments/delete",
                    "Microsoft.KeyVault/vaults/write",
                    "Microsoft.Sql/servers/write",
                ],
                &[],
            ),
            Contributor => (
                RG,
                &[
                    "Microsoft.KeyVault/vaults/write",
                    "Microsoft.KeyVault/vaults/delete",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/write",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action",
                    "Microsoft.Sql/servers/write",
                    "Microsoft.Authorization/roleAssignments/read",
                ],
                // notActions: Microsoft.Authorization/*/Delete, */Write, elevateAccess/Action,
                // Microsoft.Directory/*.
                &[
                    "Microsoft.Authorization/roleAssignments/delete",
                    "Microsoft.Authorization/roleAssignments/write",
                    "Microsoft.Authorization/elevateAccess/Action",
                    "Microsoft.Directory/users/create",
                ],
            ),
            Reader => (
                RG,
                &[
                    "Microsoft.KeyVault/vaults/read",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/read",
                    "Microsoft.Sql/servers/read",
                    "Microsoft.Authorization/roleAssignments/read",
                    "Microsoft.TdeBroker/emulation/read",
                ],
                &["Microsoft.KeyVault/vaults/write", "Microsoft.Sql/servers/write"],
            ),
            KeyVaultContributor => (
                VAULT,
                &[
                    "Microsoft.KeyVault/vaults/read",
                    "Microsoft.KeyVault/vaults/write",
                    "Microsoft.KeyVault/vaults/delete",
                    "Microsoft.KeyVault/vaults/accessPolicies/write",
                    "Microsoft.Authorization/roleAssignments/read",
                ],
                // notActions, then actions it never had.
                &[
                    "Microsoft.KeyVault/locations/deletedVaults/purge/action",
                    "Microsoft.KeyVault/managedHsms/write",
                    "Microsoft.KeyVault/hsmPools/write",
                    "Microsoft.Authorization/roleAssignments/write",
                    "Microsoft.Sql/servers/write",
                ],
            ),
            ManagedIdentityContributor => (
                UMI,
                &[
                    "Microsoft.ManagedIdentity/userAssignedIdentities/read",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/write",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/delete",
                    "Microsoft.Authorization/roleAssignments/read",
                ],
                &[
                    "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action",
                    "Microsoft.KeyVault/vaults/write",
                ],
            ),
            ManagedIdentityOperator => (
                UMI,
                &[
                    "Microsoft.ManagedIdentity/userAssignedIdentities/read",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action",
                    "Microsoft.Authorization/roleAssignments/read",
                ],
                &[
                    "Microsoft.ManagedIdentity/userAssignedIdentities/write",
                    "Microsoft.ManagedIdentity/userAssignedIdentities/delete",
                ],
            ),
            SqlServerContributor => (
                SQL,
                &[
                    "Microsoft.Sql/servers/read",
                    "Microsoft.Sql/servers/write",
                    "Microsoft.Sql/servers/delete",
                    "Microsoft.Sql/servers/databases/write",
                    "Microsoft.Authorization/roleAssignments/read",
                ],
                &[
                    "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action",
                    "Microsoft.Sql/managedInstances/write",
                    "Microsoft.KeyVault/vaults/write",
                ],
            ),
            SqlManagedInstanceContributor => (
                MI,
                &[
                    "Microsoft.Sql/managedInstances/read",
                    "Microsoft.Sql/managedInstances/write",
                    "Microsoft.Sql/managedInstances/delete",
                    "Microsoft.Authorization/roleAssignments/read",
                ],
                &["Microsoft.Sql/servers/write", "Microsoft.KeyVault/vaults/write"],
            ),
            KeyVaultAdministrator | KeyVaultCryptoOfficer | KeyVaultReader => (
                VAULT,
                &["Microsoft.KeyVault/vaults/read", "Microsoft.Authorization/roleAssignments/read"],
                &["Microsoft.KeyVault/vaults/write", "Microsoft.KeyVault/vaults/accessPolicies/write"],
            ),
            // Data-plane roles without control-plane actions.
            KeyVaultCryptoUser | KeyVaultCryptoServiceEncryptionUser => {
                (VAULT, &[], &["Microsoft.KeyVault/vaults/read", "Microsoft.KeyVault/vaults/write"])
            }
        }
    }

    #[test]
    fn every_built_in_role_grants_its_documented_actions_where_it_is_assigned_and_nowhere_else() {
        for role in Role::ALL {
            let (scope, granted, refused) = documented(role);
            let a = [assignment(scope, role)];
            let beneath = format!("{scope}/child/c");
            let sibling = format!("{scope}-other");
            for action in granted {
                assert!(allows(&a, "p", action, scope), "{} at its scope: {action}", role.name());
                assert!(allows(&a, "p", action, &beneath), "{} beneath its scope: {action}", role.name());
                assert!(!allows(&a, "p", action, &sibling), "{} at a sibling: {action}", role.name());
                assert!(!allows(&a, "p", action, "/subscriptions/s"), "{} above: {action}", role.name());
                assert!(!allows(&a, "someone-else", action, scope), "{}: another principal", role.name());
            }
            for action in refused {
                let e = authorize(&a, "p", action, scope).unwrap_err();
                assert_eq!(e.code(), "AuthorizationFailed", "{}: {action}", role.name());
            }
        }
    }
}
