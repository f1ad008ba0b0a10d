//! Vault operations of the control plane: create, read, update, delete, access policies.

use std::collections::{BTreeMap, BTreeSet};

use super::Broker;
use crate::model::ids::vault_name;
use crate::model::vault::{Subnet, normalise_cidr, subnet_id};
use crate::model::{BrokerError, Caller, Change, KeyPermission, NetworkAcls, Vault};

const VAULT_READ: &str = "Microsoft.KeyVault/vaults/read";
const VAULT_WRITE: &str = "Microsoft.KeyVault/vaults/write";
const VAULT_DELETE: &str = "Microsoft.KeyVault/vaults/delete";
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

impl Broker {
    fn vault_scope(&self, name: &str) -> String {
        self.settings.vault_resource_id(name)
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
        if self.read().vaults.contains_key(&name) {
            return Err(BrokerError::VaultAlreadyExists { name });
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

    /// DeleteVault: refused while the vault holds keys (active or soft-deleted), so deleting a
    /// vault never destroys key material as a side effect.
    pub async fn delete_vault(&self, caller: &Caller, name: &str) -> Result<(), BrokerError> {
        let name = vault_name(name)?;
        self.authorize_control(&caller.object_id, VAULT_DELETE, &self.vault_scope(&name))?;
        let txn = self.begin().await;
        let keys = self.read().vault(&name)?.keys.len();
        if keys > 0 {
            return Err(BrokerError::VaultNotEmpty { name, keys });
        }
        self.commit(txn, vec![Change::DeleteVault { vault: name }]).await
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
