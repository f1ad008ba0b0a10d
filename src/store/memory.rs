//! An in-memory [`Store`] with the SQLite store's semantics (atomic commits, the same refusals,
//! the same load order) and nothing durable: for tests of the broker and of tools around it.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{Rejection, Snapshot, Store, StoreError, StoredKey, StoredRotationPolicy};
use crate::model::ids::key_index;
use crate::model::server::{Database, Server};
use crate::model::vault::Subnet;
use crate::model::{Change, Deletion, KeyVersion, Principal, RoleAssignment, Vault};

/// A [`Store`] held in memory: what it holds is gone when it is dropped. Each commit works on a
/// copy of the records and swaps it in only once every change applied, so a refused commit
/// leaves nothing; the copy makes it a store for tests and small data sets.
#[derive(Default)]
pub struct MemoryStore {
    records: Mutex<Records>,
    meta: Mutex<BTreeMap<String, Vec<u8>>>,
}

/// The records, keyed the way the SQLite store's tables are (see [`Store`]).
#[derive(Clone, Default)]
struct Records {
    vaults: BTreeMap<String, Vault>,
    /// Deletion records of soft-deleted vaults, by vault name.
    vault_deletions: BTreeMap<String, Deletion>,
    /// By (vault, [`key_index`] of the name).
    keys: BTreeMap<(String, String), StoredKey>,
    principals: BTreeMap<String, Principal>,
    role_assignments: BTreeMap<String, RoleAssignment>,
    /// By lower-cased id.
    subnets: BTreeMap<String, Subnet>,
    /// By lower-cased id.
    servers: BTreeMap<String, Server>,
    /// By (lower-cased server id, lower-cased name).
    databases: BTreeMap<(String, String), Database>,
    rotation_policies: BTreeMap<(String, String), StoredRotationPolicy>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Locks `m`. Nothing panics while changing what a lock guards here (commits change a copy), so
/// a poisoned lock still guards consistent data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Records {
    fn apply(&mut self, change: &Change) -> Result<(), Rejection> {
        match change {
            Change::PutVault(v) => {
                self.vaults.insert(v.name.clone(), v.clone());
            }
            Change::DeleteVault { vault } => {
                self.keys.retain(|(v, _), _| v != vault);
                self.vault_deletions.remove(vault);
                self.rotation_policies.retain(|(v, _), _| v != vault);
                self.vaults.remove(vault);
            }
            Change::SetVaultDeletion { vault, deleted } => match deleted {
                Some(d) if self.vaults.contains_key(vault) => {
                    self.vault_deletions.insert(vault.clone(), d.clone());
                }
                Some(_) => {}
                None => {
                    self.vault_deletions.remove(vault);
                }
            },
            Change::PutKeyVersion { vault, name, version, sealed } => {
                let id = (vault.clone(), key_index(name));
                let same_id = |v: &KeyVersion| v.version == version.version;
                match sealed {
                    Some(sealed) => {
                        let key = self.keys.entry(id).or_insert_with(|| StoredKey {
                            vault: vault.clone(),
                            name: name.clone(),
                            deleted: None,
                            versions: Vec::new(),
                        });
                        if key.versions.iter().any(|(v, _)| same_id(v)) {
                            return Err(Rejection::key_version(vault, name, version, true));
                        }
                        key.versions.push((version.clone(), sealed.clone()));
                    }
                    None => match self
                        .keys
                        .get_mut(&id)
                        .and_then(|k| k.versions.iter_mut().find(|(v, _)| same_id(v)))
                    {
                        Some((stored, _)) => *stored = version.clone(),
                        None => return Err(Rejection::key_version(vault, name, version, false)),
                    },
                }
            }
            Change::SetKeyDeletion { vault, name, deleted } => {
                if let Some(key) = self.keys.get_mut(&(vault.clone(), key_index(name))) {
                    key.deleted = deleted.clone();
                }
            }
            Change::PurgeKey { vault, name } => {
                self.keys.remove(&(vault.clone(), key_index(name)));
                self.rotation_policies.remove(&(vault.clone(), key_index(name)));
            }
            Change::PutPrincipal(p) => {
                self.principals.insert(p.object_id.clone(), p.clone());
            }
            Change::DeletePrincipal { object_id } => {
                self.principals.remove(object_id);
            }
            Change::PutRoleAssignment(a) => {
                self.role_assignments.insert(a.id.clone(), a.clone());
            }
            Change::DeleteRoleAssignment { id } => {
                self.role_assignments.remove(id);
            }
            Change::PutKeyRotationPolicy { vault, name, policy } => {
                self.rotation_policies.insert(
                    (vault.clone(), key_index(name)),
                    StoredRotationPolicy { vault: vault.clone(), name: name.clone(), policy: policy.clone() },
                );
            }
            Change::PutSubnet(sn) => {
                self.subnets.insert(sn.id.to_ascii_lowercase(), sn.clone());
            }
            Change::PutServer(srv) => {
                self.servers.insert(srv.id.to_ascii_lowercase(), srv.clone());
            }
            Change::DeleteServer { id } => {
                let id = id.to_ascii_lowercase();
                self.databases.retain(|(server_id, _), _| *server_id != id);
                self.servers.remove(&id);
            }
            Change::PutDatabase(db) => {
                let id = (db.server_id.to_ascii_lowercase(), db.name.to_ascii_lowercase());
                self.databases.insert(id, db.clone());
            }
            Change::DeleteDatabase { server_id, name } => {
                self.databases.remove(&(server_id.to_ascii_lowercase(), name.to_ascii_lowercase()));
            }
            // A meta value: `MemoryStore::commit` writes it once the whole commit succeeded.
            Change::SetManualClock { .. } => {}
        }
        Ok(())
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let r = lock(&self.records);
        Ok(Snapshot {
            vaults: r.vaults.values().cloned().collect(),
            vault_deletions: r.vault_deletions.iter().map(|(n, d)| (n.clone(), d.clone())).collect(),
            keys: r.keys.values().cloned().collect(),
            principals: r.principals.values().cloned().collect(),
            role_assignments: r.role_assignments.values().cloned().collect(),
            subnets: r.subnets.values().cloned().collect(),
            servers: r.servers.values().cloned().collect(),
            databases: r.databases.values().cloned().collect(),
            rotation_policies: r.rotation_policies.values().cloned().collect(),
        })
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut records = lock(&self.records);
        let mut next = records.clone();
        for change in changes {
            next.apply(change)?;
        }
        *records = next;
        let mut meta = lock(&self.meta);
        for change in changes {
            if let Change::SetManualClock { now } = change {
                meta.insert(super::META_MANUAL_CLOCK.to_string(), now.to_string().into_bytes());
            }
        }
        Ok(())
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(lock(&self.meta).get(key).cloned())
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        lock(&self.meta).insert(key.to_string(), value.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance::{Backend, store_conformance_tests};
    use super::*;

    /// A fresh memory store per test; opening it again would give another, empty one, so it
    /// runs the suite without the reopening tests.
    struct Memory;

    impl Backend for Memory {
        fn create() -> Result<Self, StoreError> {
            Ok(Memory)
        }

        fn open(&self) -> Result<Box<dyn Store>, StoreError> {
            Ok(Box::new(MemoryStore::new()))
        }
    }

    store_conformance_tests!(Memory);
}
