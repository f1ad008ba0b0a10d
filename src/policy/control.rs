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
}
