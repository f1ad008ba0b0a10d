//! The in-memory state the broker answers from. Built from the store at start, then moved only by
//! [`State::apply`] with changes that are already committed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::crypto::{EcPrivateKey, RsaPrivateKey, Sealer, Zbytes};
use crate::model::ids::key_index;
use crate::model::server::{Database, Server};
use crate::model::{BrokerError, Change, Deletion, Key, KeyType, Principal, RoleAssignment, Vault};
use crate::store::Snapshot;

/// Decoded private material of one key version, ready for crypto.
pub enum Loaded {
    /// An RSA key, decoded once.
    Rsa(RsaPrivateKey),
    /// An AES key.
    Oct(Zbytes),
    /// An EC key, decoded once.
    Ec(EcPrivateKey),
}

/// Sealed private material of one key version. Decoded keys live in the broker's bounded
/// decoded-key cache (`Caches::decoded_key`), not here: 10,000 stored keys cost their sealed
/// blobs, and only the keys in use cost a decoded private key.
pub struct Material {
    /// AES-256-GCM blob under the master key, bound to the version's identity.
    pub sealed: Vec<u8>,
}

/// What binds a sealed blob to its key version: the blob cannot be moved to another row.
pub fn material_aad(vault: &str, name: &str, version: &str) -> String {
    format!("tde-broker/key-material/v1/{vault}/{}/{version}", key_index(name))
}

impl Material {
    /// Wraps a sealed blob.
    pub fn new(sealed: Vec<u8>) -> Self {
        Material { sealed }
    }

    /// Unseals and decodes the key. Runs RSA (EC) decoding: call off the async executor.
    pub fn decode(&self, sealer: &Sealer, aad: &str, kty: KeyType) -> Result<Loaded, BrokerError> {
        let plain = sealer.unseal(aad.as_bytes(), &self.sealed).map_err(|e| {
            tracing::error!(error = %e, aad, "key material does not unseal under the master key");
            BrokerError::Internal
        })?;
        if kty.is_rsa() {
            Ok(Loaded::Rsa(RsaPrivateKey::from_pkcs8(&plain).map_err(|e| {
                tracing::error!(error = %e, aad, "stored RSA material does not decode");
                BrokerError::Internal
            })?))
        } else if kty.is_ec() {
            Ok(Loaded::Ec(EcPrivateKey::from_pkcs8(&plain).map_err(|e| {
                tracing::error!(error = %e, aad, "stored EC material does not decode");
                BrokerError::Internal
            })?))
        } else {
            Ok(Loaded::Oct(plain))
        }
    }
}

/// A key with the sealed material of each of its versions.
pub struct KeyEntry {
    /// Metadata and versions.
    pub key: Key,
    /// Material of each version, in the order of `key.versions` (versions are only ever added,
    /// and a key leaves with all of them): no per-key map or copied version ids.
    material: Vec<Arc<Material>>,
    /// The key's rotation policy, once set (`None`: Key Vault's default applies).
    pub rotation_policy: Option<crate::model::KeyRotationPolicy>,
}

impl KeyEntry {
    /// A key without versions yet.
    fn new(key: Key) -> Self {
        let material = Vec::with_capacity(key.versions.capacity());
        KeyEntry { key, material, rotation_policy: None }
    }

    /// Adds a version with its sealed material (exact capacities: 10,000 keys of one version each
    /// would otherwise carry room for three more versions apiece).
    fn push_version(&mut self, version: crate::model::KeyVersion, sealed: Vec<u8>) {
        self.key.versions.reserve_exact(1);
        self.material.reserve_exact(1);
        self.key.versions.push(version);
        self.material.push(Arc::new(Material::new(sealed)));
    }

    /// The sealed material of version `version`.
    pub fn material(&self, version: &str) -> Option<&Arc<Material>> {
        self.key.versions.iter().position(|v| v.version == version).and_then(|i| self.material.get(i))
    }
}

/// A vault with its keys, indexed by lower-cased key name.
pub struct VaultEntry {
    /// Settings and access policies.
    pub vault: Vault,
    /// Keys by [`key_index`].
    pub keys: BTreeMap<String, KeyEntry>,
}

impl VaultEntry {
    /// The key named `name` in any case, active or soft-deleted.
    pub fn key(&self, name: &str) -> Option<&KeyEntry> {
        self.keys.get(crate::model::ids::key_index_of(name).as_ref())
    }
}

/// A soft-deleted vault: everything it held, kept as it was, and its deletion record. Nothing
/// reaches it but the deleted-vault operations (get, list, recover, purge) and the sweeper.
pub struct DeletedVaultEntry {
    /// The vault with its keys, as they were when it was deleted.
    pub entry: VaultEntry,
    /// When it was deleted and when it is purged by itself.
    pub deletion: Deletion,
}

/// Everything the broker knows, plus the epoch that versions it.
#[derive(Default)]
pub struct State {
    /// Bumped by every applied batch of changes; cached decisions carry the epoch they were
    /// made at and are void once it moves.
    pub epoch: u64,
    /// Vaults by name (live ones only: a soft-deleted vault is in `deleted_vaults`).
    pub vaults: BTreeMap<String, VaultEntry>,
    /// Soft-deleted vaults by name.
    pub deleted_vaults: BTreeMap<String, DeletedVaultEntry>,
    /// Principals by object id.
    pub principals: HashMap<String, Principal>,
    /// Role assignments of both planes.
    pub role_assignments: Vec<RoleAssignment>,
    /// Subnets by lower-cased id.
    pub subnets: BTreeMap<String, crate::model::vault::Subnet>,
    /// Servers by lower-cased ARM id.
    pub servers: BTreeMap<String, Server>,
    /// Databases by (lower-cased server id, lower-cased name).
    pub databases: BTreeMap<(String, String), Database>,
}

/// The key of a database in [`State::databases`].
pub fn db_key(server_id: &str, name: &str) -> (String, String) {
    (server_id.to_ascii_lowercase(), name.to_ascii_lowercase())
}

impl State {
    /// Builds the state from a store snapshot.
    pub fn from_snapshot(snap: Snapshot) -> Self {
        let mut st = State::default();
        for v in snap.vaults {
            st.vaults.insert(v.name.clone(), VaultEntry { vault: v, keys: BTreeMap::new() });
        }
        for k in snap.keys {
            let Some(ve) = st.vaults.get_mut(&k.vault) else {
                tracing::warn!(vault = %k.vault, key = %k.name, "stored key belongs to no vault; ignored");
                continue;
            };
            let mut entry = KeyEntry::new(Key {
                name: k.name.clone(),
                versions: Vec::with_capacity(k.versions.len()),
                deleted: k.deleted,
            });
            for (meta, sealed) in k.versions {
                entry.push_version(meta, sealed);
            }
            ve.keys.insert(key_index(&k.name), entry);
        }
        for p in snap.rotation_policies {
            match st.vaults.get_mut(&p.vault).and_then(|ve| ve.keys.get_mut(&key_index(&p.name))) {
                Some(k) => k.rotation_policy = Some(p.policy),
                None => {
                    tracing::warn!(vault = %p.vault, key = %p.name, "stored rotation policy belongs to no key; ignored")
                }
            }
        }
        for (name, deletion) in snap.vault_deletions {
            if let Some(entry) = st.vaults.remove(&name) {
                st.deleted_vaults.insert(name, DeletedVaultEntry { entry, deletion });
            }
        }
        for p in snap.principals {
            st.principals.insert(p.object_id.clone(), p);
        }
        st.role_assignments = snap.role_assignments;
        for sn in snap.subnets {
            st.subnets.insert(sn.id.to_ascii_lowercase(), sn);
        }
        for s in snap.servers {
            st.servers.insert(s.id.to_ascii_lowercase(), s);
        }
        for d in snap.databases {
            st.databases.insert(db_key(&d.server_id, &d.name), d);
        }
        st
    }

    /// The vault, or `VaultNotFound`.
    pub fn vault(&self, name: &str) -> Result<&VaultEntry, BrokerError> {
        self.vaults.get(name).ok_or_else(|| BrokerError::VaultNotFound { name: name.to_string() })
    }

    /// Applies committed changes and bumps the epoch once.
    pub fn apply(&mut self, changes: Vec<Change>) {
        for change in changes {
            self.apply_one(change);
        }
        self.epoch += 1;
    }

    fn apply_one(&mut self, change: Change) {
        match change {
            Change::PutVault(v) => {
                if let Some(d) = self.deleted_vaults.get_mut(&v.name) {
                    d.entry.vault = v;
                } else if let Some(entry) = self.vaults.get_mut(&v.name) {
                    entry.vault = v;
                } else {
                    self.vaults.insert(v.name.clone(), VaultEntry { vault: v, keys: BTreeMap::new() });
                }
            }
            Change::DeleteVault { vault } => {
                self.vaults.remove(&vault);
                self.deleted_vaults.remove(&vault);
            }
            Change::SetVaultDeletion { vault, deleted: Some(deletion) } => {
                if let Some(d) = self.deleted_vaults.get_mut(&vault) {
                    d.deletion = deletion;
                } else if let Some(entry) = self.vaults.remove(&vault) {
                    self.deleted_vaults.insert(vault, DeletedVaultEntry { entry, deletion });
                }
            }
            Change::SetVaultDeletion { vault, deleted: None } => {
                if let Some(d) = self.deleted_vaults.remove(&vault) {
                    self.vaults.insert(vault, d.entry);
                }
            }
            Change::PutKeyVersion { vault, name, version, sealed } => {
                let Some(ve) = self.vaults.get_mut(&vault) else { return };
                let entry = ve.keys.entry(key_index(&name)).or_insert_with(|| {
                    KeyEntry::new(Key { name: name.clone(), versions: Vec::new(), deleted: None })
                });
                match sealed {
                    Some(sealed) => entry.push_version(version, sealed),
                    None => {
                        if let Some(v) = entry.key.versions.iter_mut().find(|v| v.version == version.version)
                        {
                            *v = version;
                        }
                    }
                }
            }
            Change::SetKeyDeletion { vault, name, deleted } => {
                if let Some(k) = self.vaults.get_mut(&vault).and_then(|ve| ve.keys.get_mut(&key_index(&name)))
                {
                    k.key.deleted = deleted;
                }
            }
            Change::PurgeKey { vault, name } => {
                if let Some(ve) = self.vaults.get_mut(&vault) {
                    ve.keys.remove(&key_index(&name));
                }
            }
            Change::PutPrincipal(p) => {
                self.principals.insert(p.object_id.clone(), p);
            }
            Change::PutSubnet(sn) => {
                self.subnets.insert(sn.id.to_ascii_lowercase(), sn);
            }
            Change::PutServer(s) => {
                self.servers.insert(s.id.to_ascii_lowercase(), s);
            }
            Change::DeleteServer { id } => {
                let id = id.to_ascii_lowercase();
                self.servers.remove(&id);
                self.databases.retain(|(sid, _), _| *sid != id);
            }
            Change::PutDatabase(d) => {
                self.databases.insert(db_key(&d.server_id, &d.name), d);
            }
            Change::DeleteDatabase { server_id, name } => {
                self.databases.remove(&db_key(&server_id, &name));
            }
            Change::DeletePrincipal { object_id } => {
                self.principals.remove(&object_id);
            }
            Change::PutRoleAssignment(a) => {
                self.role_assignments.retain(|x| x.id != a.id);
                self.role_assignments.push(a);
            }
            Change::DeleteRoleAssignment { id } => {
                self.role_assignments.retain(|x| x.id != id);
            }
            Change::PutKeyRotationPolicy { vault, name, policy } => {
                if let Some(k) = self.vaults.get_mut(&vault).and_then(|ve| ve.keys.get_mut(&key_index(&name)))
                {
                    k.rotation_policy = Some(policy);
                }
            }
            // The clock is not state: the broker moves it when it applies the batch.
            Change::SetManualClock { .. } => {}
        }
    }
}
