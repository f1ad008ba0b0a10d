//! Control-plane authorization: ARM role assignments at `/`, subscription, resource group or
//! resource scope (DESIGN §1.2).

use crate::model::{ArmAssignment, ArmRole, BrokerError};

/// A control-plane action, e.g. `Microsoft.KeyVault/vaults/write`.
#[derive(Clone, Copy, Debug)]
pub struct Action {
    /// The ARM action name, as it appears in `AuthorizationFailed`.
    pub name: &'static str,
    /// Read actions are open to Reader; others need Contributor or Owner.
    pub read_only: bool,
}

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

fn role_allows(role: ArmRole, action: Action) -> bool {
    match role {
        ArmRole::Owner | ArmRole::Contributor => true,
        ArmRole::Reader => action.read_only,
    }
}

/// Allows the action when some assignment of the caller at or above `scope` holds a role that
/// includes it; otherwise `AuthorizationFailed` naming the action and scope.
pub fn authorize(
    assignments: &[ArmAssignment],
    object_id: &str,
    action: Action,
    scope: &str,
) -> Result<(), BrokerError> {
    let allowed = assignments.iter().any(|a| {
        a.principal_id == object_id && scope_contains(&a.scope, scope) && role_allows(a.role, action)
    });
    if allowed {
        Ok(())
    } else {
        Err(BrokerError::AuthorizationFailed {
            object_id: object_id.to_string(),
            action: action.name.to_string(),
            scope: scope.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRITE: Action = Action { name: "Microsoft.KeyVault/vaults/write", read_only: false };
    const READ: Action = Action { name: "Microsoft.KeyVault/vaults/read", read_only: true };

    fn assignment(scope: &str, role: ArmRole) -> ArmAssignment {
        ArmAssignment { id: "a".into(), scope: scope.into(), principal_id: "p".into(), role }
    }

    #[test]
    fn owner_at_root_may_do_everything_everywhere() {
        let a = [assignment("/", ArmRole::Owner)];
        assert!(authorize(&a, "p", WRITE, "/subscriptions/s/resourceGroups/rg").is_ok());
    }

    #[test]
    fn reader_may_read_but_not_write() {
        let a = [assignment("/subscriptions/s", ArmRole::Reader)];
        assert!(authorize(&a, "p", READ, "/subscriptions/s/x").is_ok());
        let e = authorize(&a, "p", WRITE, "/subscriptions/s/x").unwrap_err();
        assert_eq!(e.code(), "AuthorizationFailed");
        assert!(e.to_string().contains("'Microsoft.KeyVault/vaults/write' over scope '/subscriptions/s/x'"));
    }

    #[test]
    fn scopes_match_by_whole_segments() {
        assert!(scope_contains("/subscriptions/s", "/subscriptions/S/rg"));
        assert!(!scope_contains("/subscriptions/s", "/subscriptions/s2"));
        assert!(scope_contains("/", "/anything"));
    }

    #[test]
    fn no_assignment_means_no_access() {
        assert!(authorize(&[], "p", READ, "/").is_err());
    }
}
