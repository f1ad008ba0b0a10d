//! Soft delete as Key Vault does it: a deleted key keeps every version for the vault's retention
//! days, can only be read, recovered or purged meanwhile, and is purged by itself when its
//! scheduled purge date has passed.

use super::{DeletedKeyView, KeyView, paginate};
use crate::broker::Broker;
use crate::broker::state::{KeyEntry, State, VaultEntry};
use crate::model::ids::{key_name, vault_name};
use crate::model::{BrokerError, Caller, Change, Deletion, KeyPermission};

const SECONDS_PER_DAY: i64 = 86_400;

impl Broker {
    /// DeleteKey: soft-deletes every version; purged by itself after the vault's retention.
    pub async fn delete_key(&self, caller: &Caller, key_id: &str) -> Result<DeletedKeyView, BrokerError> {
        let id = self.parse_key_id(key_id)?;
        if id.version.is_some() {
            return Err(BrokerError::bad_parameter(
                "DeleteKey removes every version of a key: give the key identifier without a version.",
            ));
        }
        self.fault_delay(&id.vault).await;
        let txn = self.begin().await;
        let (name, view) = {
            let st = self.read();
            let ve = st.vault(&id.vault)?;
            self.gate(&st, ve, caller, KeyPermission::Delete, Some(id.name))?;
            let (k, v) = Self::active_version(ve, &id)?;
            let now = self.clock.now();
            let deletion = Deletion {
                deleted_date: now,
                scheduled_purge_date: now + i64::from(ve.vault.retention_days) * SECONDS_PER_DAY,
            };
            let view = DeletedKeyView {
                key: self.view(ve, &k.key.name, v),
                recovery_id: crate::model::ids::recovery_id(
                    &id.vault,
                    &self.settings.vault_dns_suffix,
                    &k.key.name,
                ),
                deletion,
            };
            (k.key.name.clone(), view)
        };
        self.commit(
            txn,
            vec![Change::SetKeyDeletion {
                vault: id.vault.into_owned(),
                name,
                deleted: Some(view.deletion.clone()),
            }],
        )
        .await?;
        Ok(view)
    }

    fn deleted_view(&self, ve: &VaultEntry, k: &KeyEntry) -> Option<DeletedKeyView> {
        let deletion = k.key.deleted.clone()?;
        let latest = k.key.latest()?;
        Some(DeletedKeyView {
            key: self.view(ve, &k.key.name, latest),
            recovery_id: crate::model::ids::recovery_id(
                &ve.vault.name,
                &self.settings.vault_dns_suffix,
                &k.key.name,
            ),
            deletion,
        })
    }

    fn deleted_key<'a>(
        st: &'a State,
        vault: &str,
        name: &str,
    ) -> Result<(&'a VaultEntry, &'a KeyEntry), BrokerError> {
        let ve = st.vault(vault)?;
        match ve.key(name) {
            Some(k) if k.key.deleted.is_some() => Ok((ve, k)),
            _ => Err(BrokerError::DeletedKeyNotFound { name: name.to_string() }),
        }
    }

    /// GetDeletedKey.
    pub fn get_deleted_key(
        &self,
        caller: &Caller,
        vault: &str,
        name: &str,
    ) -> Result<DeletedKeyView, BrokerError> {
        let vault = vault_name(vault)?;
        let name = key_name(name)?;
        let st = self.read();
        self.gate(&st, st.vault(&vault)?, caller, KeyPermission::Get, Some(name))?;
        let (ve, k) = Self::deleted_key(&st, &vault, name)?;
        self.deleted_view(ve, k).ok_or(BrokerError::Internal)
    }

    /// ListDeletedKeys.
    pub fn list_deleted_keys(
        &self,
        caller: &Caller,
        vault: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<DeletedKeyView>, String), BrokerError> {
        let vault = vault_name(vault)?;
        let st = self.read();
        let ve = st.vault(&vault)?;
        self.gate(&st, ve, caller, KeyPermission::List, None)?;
        let items = ve.keys.iter().filter_map(|(idx, k)| self.deleted_view(ve, k).map(|v| (idx.clone(), v)));
        paginate(items, page_size, page_token)
    }

    /// RecoverDeletedKey: back to active with every version.
    pub async fn recover_deleted_key(
        &self,
        caller: &Caller,
        vault: &str,
        name: &str,
    ) -> Result<KeyView, BrokerError> {
        let vault = vault_name(vault)?;
        let name = key_name(name)?;
        self.fault_delay(&vault).await;
        let txn = self.begin().await;
        let (stored, view) = {
            let st = self.read();
            self.gate(&st, st.vault(&vault)?, caller, KeyPermission::Recover, Some(name))?;
            let (ve, k) = Self::deleted_key(&st, &vault, name)?;
            let latest = k.key.latest().ok_or(BrokerError::Internal)?;
            (k.key.name.clone(), self.view(ve, &k.key.name, latest))
        };
        self.commit(txn, vec![Change::SetKeyDeletion { vault, name: stored, deleted: None }]).await?;
        Ok(view)
    }

    /// PurgeDeletedKey: refused while the vault has purge protection.
    pub async fn purge_deleted_key(
        &self,
        caller: &Caller,
        vault: &str,
        name: &str,
    ) -> Result<(), BrokerError> {
        let vault = vault_name(vault)?;
        let name = key_name(name)?;
        self.fault_delay(&vault).await;
        let txn = self.begin().await;
        let stored = {
            let st = self.read();
            self.gate(&st, st.vault(&vault)?, caller, KeyPermission::Purge, Some(name))?;
            let (ve, k) = Self::deleted_key(&st, &vault, name)?;
            if ve.vault.purge_protection {
                return Err(BrokerError::PurgeProtected);
            }
            k.key.name.clone()
        };
        self.commit(txn, vec![Change::PurgeKey { vault, name: stored }]).await
    }

    /// Purges every soft-deleted key, and every soft-deleted vault (with its keys), whose
    /// scheduled purge date has passed (the cloud does this by itself, purge protection or not).
    /// The keys of a soft-deleted vault wait with their vault. Returns how many keys and vaults
    /// were purged.
    pub async fn purge_expired(&self) -> Result<usize, BrokerError> {
        let now = self.clock.now();
        let due = |st: &State| -> (usize, Vec<Change>) {
            let vaults: Vec<&String> = st
                .deleted_vaults
                .iter()
                .filter(|(_, d)| d.deletion.scheduled_purge_date <= now)
                .map(|(name, _)| name)
                .collect();
            let mut changes: Vec<Change> = st
                .vaults
                .values()
                .flat_map(|ve| {
                    ve.keys
                        .values()
                        .filter(move |k| {
                            k.key.deleted.as_ref().is_some_and(|d| d.scheduled_purge_date <= now)
                        })
                        .map(move |k| Change::PurgeKey {
                            vault: ve.vault.name.clone(),
                            name: k.key.name.clone(),
                        })
                })
                .collect();
            let n = changes.len() + vaults.len();
            for name in vaults {
                changes.extend(self.vault_purge_changes(st, name));
            }
            (n, changes)
        };
        if due(&self.read()).0 == 0 {
            return Ok(0);
        }
        let txn = self.begin().await;
        let (n, changes) = due(&self.read());
        if n > 0 {
            self.commit(txn, changes).await?;
            tracing::info!(purged = n, "purged soft-deleted keys and vaults past their retention");
        }
        Ok(n)
    }
}
