//! Role assignments for both planes: ARM roles at ARM scopes, Key Vault data roles at vault or
//! single-key scope (given as ARM ids, vault URIs, or key URIs without version).

use super::{Broker, new_guid};
use crate::model::ids::{KeyId, printable, vault_name};
use crate::model::{BrokerError, Caller, Change, Role, RoleAssignment};
use crate::policy::control::{allows, scope_contains};

const ASSIGN_WRITE: &str = "Microsoft.Authorization/roleAssignments/write";
const ASSIGN_DELETE: &str = "Microsoft.Authorization/roleAssignments/delete";
const ASSIGN_READ: &str = "Microsoft.Authorization/roleAssignments/read";

impl Broker {
    /// The ARM form of a scope: `/` and ARM ids as given (without a trailing slash); a vault URI
    /// becomes the vault's ARM id; a key URI without version becomes `{vault id}/keys/{name}`.
    pub fn normalize_scope(&self, scope: &str) -> Result<String, BrokerError> {
        let bad = |why: &str| {
            BrokerError::bad_parameter(format!("The scope '{}' is invalid: {why}", printable(scope)))
        };
        let scope = scope.trim();
        if scope == "/" {
            return Ok("/".to_string());
        }
        if scope.starts_with('/') {
            let trimmed = scope.trim_end_matches('/');
            if trimmed.split('/').skip(1).any(str::is_empty) || scope.contains(char::is_whitespace) {
                return Err(bad("an ARM scope is /, or /-separated non-empty segments."));
            }
            return Ok(trimmed.to_string());
        }
        let lower = scope.to_ascii_lowercase();
        if !lower.starts_with("https://") {
            return Err(bad("use an ARM id (/subscriptions/...), a vault URI or a key URI."));
        }
        if lower.contains("/keys/") {
            let id = KeyId::parse(scope, &self.settings.vault_dns_suffix)?;
            if id.version.is_some() {
                return Err(bad("role assignments at key scope take the key URI without a version."));
            }
            return Ok(format!("{}/keys/{}", self.settings.vault_resource_id(&id.vault), id.name));
        }
        let host = scope["https://".len()..].trim_end_matches('/');
        let host = host.split_once(':').map_or(host, |(h, _port)| h);
        let suffix = format!(".{}", self.settings.vault_dns_suffix);
        match host.len().checked_sub(suffix.len()).filter(|&cut| host.is_char_boundary(cut)) {
            Some(cut) if host[cut..].eq_ignore_ascii_case(&suffix) && !host.contains('/') => {
                Ok(self.settings.vault_resource_id(&vault_name(&host[..cut])?))
            }
            _ => Err(bad("expected https://{vault}.{suffix} or a key URI.")),
        }
    }

    /// CreateRoleAssignment: needs `roleAssignments/write` at the scope (Owner; not Contributor).
    pub async fn create_role_assignment(
        &self,
        caller: &Caller,
        scope: &str,
        principal_id: &str,
        role_name: &str,
    ) -> Result<RoleAssignment, BrokerError> {
        let normalized = self.normalize_scope(scope)?;
        let role = Role::parse(role_name)?;
        self.authorize_control(&caller.object_id, ASSIGN_WRITE, &normalized)?;
        let principal_id = principal_id.trim().to_ascii_lowercase();
        let txn = self.begin().await;
        let assignment = {
            let st = self.read();
            if !st.principals.contains_key(&principal_id) {
                return Err(BrokerError::PrincipalNotFound {
                    principal_id: printable(&principal_id),
                    tenant_id: self.settings.tenant_id.clone(),
                });
            }
            if st.role_assignments.iter().any(|a| {
                a.principal_id == principal_id && a.role == role && a.scope.eq_ignore_ascii_case(&normalized)
            }) {
                return Err(BrokerError::RoleAssignmentExists);
            }
            RoleAssignment {
                id: new_guid(),
                scope: normalized,
                display_scope: scope.trim().to_string(),
                principal_id,
                role,
            }
        };
        self.commit(txn, vec![Change::PutRoleAssignment(assignment.clone())]).await?;
        Ok(assignment)
    }

    /// DeleteRoleAssignment: needs `roleAssignments/delete` at the assignment's scope.
    pub async fn delete_role_assignment(&self, caller: &Caller, id: &str) -> Result<(), BrokerError> {
        let txn = self.begin().await;
        let scope = self
            .read()
            .role_assignments
            .iter()
            .find(|a| a.id.eq_ignore_ascii_case(id.trim()))
            .map(|a| (a.id.clone(), a.scope.clone()));
        let Some((id, scope)) = scope else {
            return Err(BrokerError::RoleAssignmentNotFound { id: printable(id) });
        };
        self.authorize_control(&caller.object_id, ASSIGN_DELETE, &scope)?;
        self.commit(txn, vec![Change::DeleteRoleAssignment { id }]).await
    }

    /// ListRoleAssignments: assignments the caller may read, at, above or beneath `scope`
    /// (every one for an empty scope).
    pub fn list_role_assignments(
        &self,
        caller: &Caller,
        scope: &str,
    ) -> Result<Vec<RoleAssignment>, BrokerError> {
        let filter = if scope.trim().is_empty() { None } else { Some(self.normalize_scope(scope)?) };
        let st = self.read();
        Ok(st
            .role_assignments
            .iter()
            .filter(|a| {
                filter.as_ref().is_none_or(|f| scope_contains(&a.scope, f) || scope_contains(f, &a.scope))
            })
            .filter(|a| allows(&st.role_assignments, &caller.object_id, ASSIGN_READ, &a.scope))
            .cloned()
            .collect())
    }
}
