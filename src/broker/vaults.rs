//! Vault operations of the control plane: create, read, update, soft delete (with the deleted
//! vaults' get, list, recover and purge), access policies.

use std::collections::{BTreeMap, BTreeSet};

use super::Broker;
use super::state::State;
use crate::model::ids::vault_name;
use crate::model::vault::{Subnet, normalise_cidr, subnet_id};
use crate::model::{BrokerError, Caller, Change, Deletion, KeyPermission, NetworkAcls, Vault};

const VAULT_READ: &str = "Microsoft.KeyVault/vaults/read";
const VAULT_WRITE: &str = "Microsoft.KeyVault/vaults/write";
const VAULT_DELETE: &str = "Microsoft.KeyVault/vaults/delete";
const DELETED_VAULT_READ: &str = "Microsoft.KeyVault/locations/deletedVaults/read";
const DELETED_VAULT_PURGE: &str = "Microsoft.KeyVault/locations/deletedVaults/purge/action";
const SECONDS_PER_DAY: i64 = 86_400;
const POLICY_WRITE: &str = "Microsoft.KeyVault/vaults/accessPolicies/write";
const SUBNET_WRITE: &str = "Microsoft.Network/virtualNetworks/subnets/write";
const SUBNET_READ: &str = "Microsoft.Network/virtualNetworks/subnets/read";

/// What CreateVault asks for.
#[derive(Clone, Debug, Default)]
pub struct VaultSpec {
    /// Vault name.
    pub name: String,
    /// 7..90, 0 = 90.
    pub retention_days: i32,
    /// Purge protection.
    pub purge_protection: bool,
    /// RBAC permission model.
    pub rbac: bool,
    /// Network ACLs (`None` = defaults).
    pub network_acls: Option<NetworkAcls>,
    /// `false` = publicNetworkAccess Disabled.
    pub public_network_access: bool,
}

/// What UpdateVault changes (`None` = unchanged).
#[derive(Clone, Debug, Default)]
pub struct VaultUpdate {
    /// Can only be turned on.
    pub purge_protection: Option<bool>,
    /// Permission model.
    pub rbac: Option<bool>,
    /// Network ACLs.
    pub network_acls: Option<NetworkAcls>,
    /// Public network access.
    pub public_network_access: Option<bool>,
}

/// A soft-deleted vault as GetDeletedVault and ListDeletedVaults show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeletedVault {
    /// The vault's settings and policies as they were when it was deleted.
    pub vault: Vault,
    /// When it was deleted and when it is purged by itself.
    pub deletion: Deletion,
}

impl Broker {
    fn vault_scope(&self, name: &str) -> String {
        self.settings.vault_resource_id(name)
    }

    /// ARM's scope of a deleted vault: `/subscriptions/{sub}/providers/Microsoft.KeyVault/
    /// locations/{location}/deletedVaults/{name}` (outside any resource group, as in the cloud).
    fn deleted_vault_scope(&self, name: &str) -> String {
        format!(
            "/subscriptions/{}/providers/Microsoft.KeyVault/locations/{}/deletedVaults/{name}",
            self.settings.subscription_id, self.settings.location
        )
    }

    /// What purging the vault `name` commits: the vault with its keys and deletion record, and
    /// the role assignments at its scope or beneath it (extension resources go with their
    /// resource), so that a vault created again under the name starts with none.
    pub(crate) fn vault_purge_changes(&self, st: &State, name: &str) -> Vec<Change> {
        let scope = self.vault_scope(name).to_ascii_lowercase();
        let beneath = format!("{scope}/");
        let mut changes = vec![Change::DeleteVault { vault: name.to_string() }];
        changes.extend(
            st.role_assignments
                .iter()
                .filter(|a| {
                    let s = a.scope.to_ascii_lowercase();
                    s == scope || s.starts_with(&beneath)
                })
                .map(|a| Change::DeleteRoleAssignment { id: a.id.clone() }),
        );
        changes
    }

    /// CreateVault.
    pub async fn create_vault(&self, caller: &Caller, spec: VaultSpec) -> Result<Vault, BrokerError> {
        let name = vault_name(&spec.name)?;
        self.authorize_control(&caller.object_id, VAULT_WRITE, &self.vault_scope(&name))?;
        let vault = Vault {
            name: name.clone(),
            retention_days: Vault::retention(spec.retention_days)?,
            purge_protection: spec.purge_protection,
            rbac: spec.rbac,
            network_acls: spec.network_acls.unwrap_or_default(),
            public_network_access: spec.public_network_access,
            access_policies: BTreeMap::new(),
            private_endpoints: vec![],
            created: self.clock.now(),
        };
        let txn = self.begin().await;
        {
            let st = self.read();
            if st.deleted_vaults.contains_key(&name) {
                return Err(BrokerError::VaultDeletedButRecoverable { name });
            }
            if st.vaults.contains_key(&name) {
                return Err(BrokerError::VaultAlreadyExists { name });
            }
        }
        self.commit(txn, vec![Change::PutVault(vault.clone())]).await?;
        Ok(vault)
    }

    /// GetVault.
    pub fn get_vault(&self, caller: &Caller, name: &str) -> Result<Vault, BrokerError> {
        let name = vault_name(name)?;
        self.authorize_control(&caller.object_id, VAULT_READ, &self.vault_scope(&name))?;
        Ok(self.read().vault(&name)?.vault.clone())
    }

    /// ListVaults: the vaults the caller may read.
    pub fn list_vaults(&self, caller: &Caller) -> Vec<Vault> {
        let st = self.read();
        st.vaults
            .values()
            .filter(|ve| {
                crate::policy::control::allows(
                    &st.role_assignments,
                    &caller.object_id,
                    VAULT_READ,
                    &self.vault_scope(&ve.vault.name),
                )
            })
            .map(|ve| ve.vault.clone())
            .collect()
    }

    /// UpdateVault: purge protection only turns on; absent fields stay.
    pub async fn update_vault(
        &self,
        caller: &Caller,
        name: &str,
        update: VaultUpdate,
    ) -> Result<Vault, BrokerError> {
        let name = vault_name(name)?;
        self.authorize_control(&caller.object_id, VAULT_WRITE, &self.vault_scope(&name))?;
        let txn = self.begin().await;
        let mut vault = self.read().vault(&name)?.vault.clone();
        if let Some(pp) = update.purge_protection {
            vault.set_purge_protection(pp)?;
        }
        if let Some(rbac) = update.rbac {
            vault.rbac = rbac;
        }
        if let Some(acls) = update.network_acls {
            vault.network_acls = acls;
        }
        if let Some(public) = update.public_network_access {
            vault.public_network_access = public;
        }
        self.commit(txn, vec![Change::PutVault(vault.clone())]).await?;
        Ok(vault)
    }

    /// DeleteVault: soft delete. The vault keeps its keys (active and soft-deleted), access
    /// policies, network rules and the role assignments at its scope for its retention days,
    /// hidden from every other view; its name cannot be reused until it is purged.
    pub async fn delete_vault(&self, caller: &Caller, name: &str) -> Result<(), BrokerError> {
        let name = vault_name(name)?;
        self.authorize_control(&caller.object_id, VAULT_DELETE, &self.vault_scope(&name))?;
        let txn = self.begin().await;
        let retention_days = self.read().vault(&name)?.vault.retention_days;
        let now = self.clock.now();
        let deletion = Deletion {
            deleted_date: now,
            scheduled_purge_date: now + i64::from(retention_days) * SECONDS_PER_DAY,
        };
        self.commit(txn, vec![Change::SetVaultDeletion { vault: name, deleted: Some(deletion) }]).await
    }

    fn deleted_vault_view(st: &State, name: &str) -> Result<DeletedVault, BrokerError> {
        st.deleted_vaults
            .get(name)
            .map(|d| DeletedVault { vault: d.entry.vault.clone(), deletion: d.deletion.clone() })
            .ok_or_else(|| BrokerError::DeletedVaultNotFound { name: name.to_string() })
    }

    /// GetDeletedVault.
    pub fn get_deleted_vault(&self, caller: &Caller, name: &str) -> Result<DeletedVault, BrokerError> {
        let name = vault_name(name)?;
        self.authorize_control(&caller.object_id, DELETED_VAULT_READ, &self.deleted_vault_scope(&name))?;
        Self::deleted_vault_view(&self.read(), &name)
    }

    /// ListDeletedVaults: the soft-deleted vaults the caller may read, in name order.
    pub fn list_deleted_vaults(&self, caller: &Caller) -> Vec<DeletedVault> {
        let st = self.read();
        st.deleted_vaults
            .iter()
            .filter(|(name, _)| {
                crate::policy::control::allows(
                    &st.role_assignments,
                    &caller.object_id,
                    DELETED_VAULT_READ,
                    &self.deleted_vault_scope(name),
                )
            })
            .map(|(_, d)| DeletedVault { vault: d.entry.vault.clone(), deletion: d.deletion.clone() })
            .collect()
    }

    /// RecoverDeletedVault: the vault comes back as it was, with its keys (their own soft-deleted
    /// state included), access policies, network rules and role assignments. ARM recovers a vault
    /// by writing it (`createMode: recover`), so this needs `vaults/write` on the vault.
    pub async fn recover_deleted_vault(&self, caller: &Caller, name: &str) -> Result<Vault, BrokerError> {
        let name = vault_name(name)?;
        self.authorize_control(&caller.object_id, VAULT_WRITE, &self.vault_scope(&name))?;
        let txn = self.begin().await;
        let vault = {
            let st = self.read();
            let deleted = Self::deleted_vault_view(&st, &name)?;
            if st.vaults.contains_key(&name) {
                return Err(BrokerError::VaultAlreadyExists { name });
            }
            deleted.vault
        };
        self.commit(txn, vec![Change::SetVaultDeletion { vault: name, deleted: None }]).await?;
        Ok(vault)
    }

    /// PurgeDeletedVault: the vault, its keys and their material, and the role assignments at its
    /// scope go for good. Refused while the vault has purge protection (the sweeper still purges
    /// it once its scheduled purge date has passed).
    pub async fn purge_deleted_vault(&self, caller: &Caller, name: &str) -> Result<(), BrokerError> {
        let name = vault_name(name)?;
        self.authorize_control(&caller.object_id, DELETED_VAULT_PURGE, &self.deleted_vault_scope(&name))?;
        let txn = self.begin().await;
        let changes = {
            let st = self.read();
            let deleted = Self::deleted_vault_view(&st, &name)?;
            if deleted.vault.purge_protection {
                return Err(BrokerError::PurgeProtected);
            }
            self.vault_purge_changes(&st, &name)
        };
        self.commit(txn, changes).await
    }

    /// SetAccessPolicy: replaces the object's key permissions; an empty list removes the policy.
    pub async fn set_access_policy(
        &self,
        caller: &Caller,
        vault: &str,
        object_id: &str,
        permissions: &[String],
    ) -> Result<(), BrokerError> {
        let name = vault_name(vault)?;
        self.authorize_control(&caller.object_id, POLICY_WRITE, &self.vault_scope(&name))?;
        let object_id = uuid::Uuid::parse_str(object_id)
            .map_err(|_| BrokerError::bad_parameter("The object id of an access policy must be a GUID."))?
            .to_string();
        let perms = permissions
            .iter()
            .flat_map(|p| {
                // "all" is ARM's shorthand for every key permission.
                if p.eq_ignore_ascii_case("all") {
                    KeyPermission::ALL.iter().map(|p| Ok(*p)).collect::<Vec<_>>()
                } else {
                    vec![KeyPermission::parse(p)]
                }
            })
            .collect::<Result<BTreeSet<_>, _>>()?;
        let txn = self.begin().await;
        let mut v = self.read().vault(&name)?.vault.clone();
        if perms.is_empty() {
            v.access_policies.remove(&object_id);
        } else {
            v.access_policies.insert(object_id, perms);
        }
        self.commit(txn, vec![Change::PutVault(v)]).await
    }

    /// ListAccessPolicies.
    pub fn list_access_policies(
        &self,
        caller: &Caller,
        vault: &str,
    ) -> Result<BTreeMap<String, BTreeSet<KeyPermission>>, BrokerError> {
        let name = vault_name(vault)?;
        self.authorize_control(&caller.object_id, VAULT_READ, &self.vault_scope(&name))?;
        Ok(self.read().vault(&name)?.vault.access_policies.clone())
    }

    /// PutSubnet: creates or replaces a subnet's address ranges.
    pub async fn put_subnet(
        &self,
        caller: &Caller,
        id: &str,
        prefixes: &[String],
    ) -> Result<Subnet, BrokerError> {
        let id = subnet_id(id)?;
        self.authorize_control(&caller.object_id, SUBNET_WRITE, &id)?;
        if prefixes.is_empty() {
            return Err(BrokerError::bad_parameter("A subnet needs at least one address prefix."));
        }
        let mut cidrs = prefixes.iter().map(|p| normalise_cidr(p)).collect::<Result<Vec<_>, _>>()?;
        cidrs.sort();
        cidrs.dedup();
        let subnet = Subnet { id, prefixes: cidrs };
        let txn = self.begin().await;
        self.commit(txn, vec![Change::PutSubnet(subnet.clone())]).await?;
        Ok(subnet)
    }

    /// ListSubnets: those the caller may read.
    pub fn list_subnets(&self, caller: &Caller) -> Vec<Subnet> {
        let st = self.read();
        st.subnets
            .values()
            .filter(|s| {
                crate::policy::control::allows(&st.role_assignments, &caller.object_id, SUBNET_READ, &s.id)
            })
            .cloned()
            .collect()
    }

    /// CreatePrivateEndpoint: the subnet reaches the vault privately (approved at once).
    pub async fn create_private_endpoint(
        &self,
        caller: &Caller,
        vault: &str,
        subnet: &str,
    ) -> Result<(), BrokerError> {
        let name = vault_name(vault)?;
        let subnet = subnet_id(subnet)?;
        self.authorize_control(&caller.object_id, VAULT_WRITE, &self.vault_scope(&name))?;
        let txn = self.begin().await;
        let mut v = {
            let st = self.read();
            if !st.subnets.contains_key(&subnet.to_ascii_lowercase()) {
                return Err(BrokerError::bad_parameter(format!(
                    "The subnet '{subnet}' is unknown: declare its address ranges with PutSubnet first."
                )));
            }
            st.vault(&name)?.vault.clone()
        };
        if !v.private_endpoints.iter().any(|p| p.eq_ignore_ascii_case(&subnet)) {
            v.private_endpoints.push(subnet);
        }
        self.commit(txn, vec![Change::PutVault(v)]).await
    }
}
