//! Data-plane authorization: which key permission an operation needs, and whether the vault's
//! permission model grants it to the caller (docs/RULES.md R2.2, R2.3).

use super::control::scope_contains;
use crate::model::{BrokerError, CallerDescription, KeyPermission, RoleAssignment, Vault};

/// The RBAC data action that corresponds to a key permission (Key Vault's built-in actions).
pub fn data_action(permission: KeyPermission) -> &'static str {
    use KeyPermission::*;
    match permission {
        Get | List => "Microsoft.KeyVault/vaults/keys/read",
        Update => "Microsoft.KeyVault/vaults/keys/update/action",
        Create => "Microsoft.KeyVault/vaults/keys/create/action",
        Import => "Microsoft.KeyVault/vaults/keys/import/action",
        Delete => "Microsoft.KeyVault/vaults/keys/delete",
        Recover => "Microsoft.KeyVault/vaults/deletedKeys/recover/action",
        Backup => "Microsoft.KeyVault/vaults/keys/backup/action",
        Restore => "Microsoft.KeyVault/vaults/keys/restore/action",
        Decrypt => "Microsoft.KeyVault/vaults/keys/decrypt/action",
        Encrypt => "Microsoft.KeyVault/vaults/keys/encrypt/action",
        UnwrapKey => "Microsoft.KeyVault/vaults/keys/unwrap/action",
        WrapKey => "Microsoft.KeyVault/vaults/keys/wrap/action",
        Sign => "Microsoft.KeyVault/vaults/keys/sign/action",
        Verify => "Microsoft.KeyVault/vaults/keys/verify/action",
        Purge => "Microsoft.KeyVault/vaults/deletedKeys/delete",
        Rotate => "Microsoft.KeyVault/vaults/keys/rotate/action",
        GetRotationPolicy => "Microsoft.KeyVault/vaults/keyrotationpolicies/read",
        SetRotationPolicy => "Microsoft.KeyVault/vaults/keyrotationpolicies/write",
    }
}

/// Where a data-plane decision is made: the caller, the vault's location and the ARM path of
/// the resource, as they appear in denial texts.
#[derive(Clone, Debug)]
pub struct DataRequest<'a> {
    /// Who calls.
    pub caller: &'a CallerDescription,
    /// The permission the operation needs.
    pub permission: KeyPermission,
    /// ARM resource path of the key (or vault), used in RBAC denials.
    pub resource: &'a str,
    /// The broker's location, e.g. `westus`.
    pub location: &'a str,
}

/// Decides a data-plane request against the vault's permission model. Default deny: a caller
/// with no access policy (or, on an RBAC vault, no role assignment at the vault, the key, or a
/// scope above them that grants the data action) is refused.
pub fn authorize(
    vault: &Vault,
    assignments: &[RoleAssignment],
    req: &DataRequest<'_>,
) -> Result<(), BrokerError> {
    if vault.rbac {
        let action = data_action(req.permission);
        let granted = assignments.iter().any(|a| {
            a.principal_id == req.caller.object_id
                && scope_contains(&a.scope, req.resource)
                && a.role.allows_data_action(action)
        });
        return if granted {
            Ok(())
        } else {
            Err(BrokerError::ForbiddenByRbac {
                caller: Box::new(req.caller.clone()),
                action,
                resource: req.resource.to_ascii_lowercase(),
                vault: vault.name.clone(),
                location: req.location.to_string(),
            })
        };
    }
    let granted =
        vault.access_policies.get(&req.caller.object_id).is_some_and(|perms| perms.contains(&req.permission));
    if granted {
        Ok(())
    } else {
        Err(BrokerError::AccessDenied {
            caller: Box::new(req.caller.clone()),
            permission: req.permission.name(),
            vault: vault.name.clone(),
            location: req.location.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::model::NetworkAcls;

    fn caller() -> CallerDescription {
        CallerDescription {
            app_id: "app".into(),
            object_id: "oid-1".into(),
            issuer: "https://sts.windows.net/t/".into(),
        }
    }

    fn vault(perms: &[KeyPermission]) -> Vault {
        let mut policies = BTreeMap::new();
        policies.insert("oid-1".to_string(), perms.iter().copied().collect::<BTreeSet<_>>());
        Vault {
            name: "v1".into(),
            retention_days: 90,
            purge_protection: false,
            rbac: false,
            network_acls: NetworkAcls::default(),
            public_network_access: true,
            access_policies: policies,
            private_endpoints: vec![],
            created: 0,
        }
    }

    fn req(c: &CallerDescription, p: KeyPermission) -> DataRequest<'_> {
        DataRequest { caller: c, permission: p, resource: "/x/Keys/K", location: "westus" }
    }

    #[test]
    fn access_policy_grants_exactly_its_permissions() {
        let c = caller();
        let v = vault(&[KeyPermission::Get, KeyPermission::UnwrapKey]);
        for p in KeyPermission::ALL {
            let allowed = matches!(p, KeyPermission::Get | KeyPermission::UnwrapKey);
            assert_eq!(authorize(&v, &[], &req(&c, p)).is_ok(), allowed, "{p:?}");
        }
    }

    #[test]
    fn caller_without_policy_is_denied_with_access_denied() {
        let mut c = caller();
        c.object_id = "someone-else".into();
        let e = authorize(&vault(&KeyPermission::ALL), &[], &req(&c, KeyPermission::WrapKey)).unwrap_err();
        assert_eq!(e.code(), "AccessDenied");
        assert!(
            e.to_string().contains("does not have keys wrapKey permission on key vault 'v1;location=westus'")
        );
    }

    #[test]
    fn rbac_vault_without_assignments_denies_with_forbidden_by_rbac() {
        let c = caller();
        let mut v = vault(&KeyPermission::ALL);
        v.rbac = true;
        let e = authorize(&v, &[], &req(&c, KeyPermission::UnwrapKey)).unwrap_err();
        assert_eq!(e.code(), "ForbiddenByRbac");
        let text = e.to_string();
        assert!(text.contains("Action: 'Microsoft.KeyVault/vaults/keys/unwrap/action'"));
        assert!(text.contains("Resource: '/x/keys/k'"));
    }

    #[test]
    fn key_scoped_role_grants_that_key_and_not_its_neighbour_or_the_vault() {
        let c = caller();
        let mut v = vault(&[]);
        v.rbac = true;
        let a = [RoleAssignment {
            id: "1".into(),
            scope: "/x/keys/k".into(),
            display_scope: String::new(),
            principal_id: "oid-1".into(),
            role: crate::model::Role::KeyVaultCryptoServiceEncryptionUser,
        }];
        let on =
            |resource: &'static str, p| DataRequest { caller: &c, permission: p, resource, location: "l" };
        for p in [KeyPermission::Get, KeyPermission::WrapKey, KeyPermission::UnwrapKey] {
            assert!(authorize(&v, &a, &on("/x/keys/K", p)).is_ok(), "{p:?}");
            assert!(authorize(&v, &a, &on("/x/keys/k2", p)).is_err(), "{p:?}");
        }
        assert!(authorize(&v, &a, &on("/x/keys/k", KeyPermission::Decrypt)).is_err());
        assert!(authorize(&v, &a, &on("/x", KeyPermission::List)).is_err());
    }

    /// The key permissions each built-in role's `dataActions` grant on an RBAC vault (none of
    /// them has `notDataActions`). Control-plane-only roles grant none: Owner is no data-plane
    /// reader.
    fn documented_data(role: crate::model::Role) -> Vec<KeyPermission> {
        use crate::model::Role::*;
        use KeyPermission::*;
        match role {
            KeyVaultAdministrator | KeyVaultCryptoOfficer => KeyPermission::ALL.to_vec(),
            KeyVaultCryptoUser => {
                vec![Get, List, Update, Backup, Encrypt, Decrypt, WrapKey, UnwrapKey, Sign, Verify]
            }
            KeyVaultCryptoServiceEncryptionUser => vec![Get, List, WrapKey, UnwrapKey],
            KeyVaultReader => vec![Get, List, GetRotationPolicy],
            Owner
            | Contributor
            | Reader
            | KeyVaultContributor
            | ManagedIdentityContributor
            | ManagedIdentityOperator
            | SqlServerContributor
            | SqlManagedInstanceContributor => vec![],
        }
    }

    #[test]
    fn every_built_in_role_grants_its_documented_data_actions_at_the_vault_and_its_keys_only() {
        let c = caller();
        let mut v = vault(&[]);
        v.rbac = true;
        let on =
            |resource: &'static str, p| DataRequest { caller: &c, permission: p, resource, location: "l" };
        for role in crate::model::Role::ALL {
            let a = [RoleAssignment {
                id: "1".into(),
                scope: "/x/vaults/v1".into(),
                display_scope: String::new(),
                principal_id: "oid-1".into(),
                role,
            }];
            let granted = documented_data(role);
            for p in KeyPermission::ALL {
                let want = granted.contains(&p);
                assert_eq!(
                    authorize(&v, &a, &on("/x/vaults/v1/keys/k", p)).is_ok(),
                    want,
                    "{} {p:?}",
                    role.name()
                );
                assert_eq!(authorize(&v, &a, &on("/x/vaults/v1", p)).is_ok(), want, "{} {p:?}", role.name());
                assert!(authorize(&v, &a, &on("/x/vaults/v2/keys/k", p)).is_err(), "{} {p:?}", role.name());
                if !want {
                    let e = authorize(&v, &a, &on("/x/vaults/v1/keys/k", p)).unwrap_err();
                    assert_eq!(e.code(), "ForbiddenByRbac");
                }
            }
        }
    }
}
