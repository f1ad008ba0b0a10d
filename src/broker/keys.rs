//! Key operations of the data plane (DESIGN §1.1): lifecycle, backup/restore and the crypto hot
//! path. Every operation authorizes first (permission before existence, as the cloud does), then
//! looks the key up, then applies the key rules.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::Broker;
use super::cache::{DecisionContext, DecisionKey, UnwrapKey};
use super::state::{KeyEntry, Loaded, Material, State, VaultEntry, material_aad};
use crate::crypto::{self, CryptoError, ImportedKey, Zbytes};
use crate::model::ids::{KeyIdRef, key_index_of, key_name, key_uri, vault_name};
use crate::model::key::{validate_tags, validate_window};
use crate::model::{
    Algorithm, BrokerError, Caller, Change, CryptoOp, Deletion, KeyAttributes, KeyOp, KeyPermission, KeyType,
    KeyVersion,
};
use crate::policy::data::{self, DataRequest};

/// Largest `value` a crypto request may carry.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// The cloud's default and largest list page.
pub const MAX_PAGE: usize = 25;
const SECONDS_PER_DAY: i64 = 86_400;
const BACKUP_MAGIC: &[u8] = b"TDEBKP1";
const BACKUP_AAD: &[u8] = b"tde-broker/backup/v1";

/// Attributes a caller may set on a new version.
#[derive(Clone, Debug, Default)]
pub struct NewAttributes {
    /// `None` = true.
    pub enabled: Option<bool>,
    /// Activation time.
    pub not_before: Option<i64>,
    /// Expiry time.
    pub expires: Option<i64>,
}

/// Where a new version's material comes from.
pub enum NewMaterial {
    /// Generate a key of this type and size (0 = default size).
    Generate {
        /// Key type.
        kty: KeyType,
        /// Size in bits.
        size: i32,
    },
    /// Imported material.
    Import {
        /// The key.
        key: ImportedKey,
        /// RSA-HSM rather than RSA.
        hsm: bool,
    },
}

/// CreateKey / ImportKey.
pub struct NewKey {
    /// Vault name.
    pub vault: String,
    /// Key name.
    pub name: String,
    /// Material.
    pub material: NewMaterial,
    /// `key_ops` (empty = the type's defaults).
    pub key_ops: Vec<String>,
    /// Attributes.
    pub attributes: NewAttributes,
    /// Tags.
    pub tags: BTreeMap<String, String>,
}

/// UpdateKey (`None`/empty = unchanged).
#[derive(Clone, Debug, Default)]
pub struct KeyUpdate {
    /// Enable or disable.
    pub enabled: Option<bool>,
    /// New activation time.
    pub not_before: Option<i64>,
    /// New expiry time.
    pub expires: Option<i64>,
    /// Remove the activation time.
    pub clear_not_before: bool,
    /// Remove the expiry time.
    pub clear_expires: bool,
    /// Replacement key_ops.
    pub key_ops: Vec<String>,
    /// Replacement tags.
    pub tags: Option<BTreeMap<String, String>>,
}

/// One key version as returned to callers (public parts only).
#[derive(Clone, Debug)]
pub struct KeyView {
    /// Versioned key URI.
    pub kid: String,
    /// Metadata.
    pub version: KeyVersion,
    /// The vault's retention.
    pub recoverable_days: i32,
    /// The vault's recovery level.
    pub recovery_level: &'static str,
}

/// A soft-deleted key as returned to callers.
#[derive(Clone, Debug)]
pub struct DeletedKeyView {
    /// Its newest version.
    pub key: KeyView,
    /// `https://{vault}.{suffix}/deletedkeys/{name}`.
    pub recovery_id: String,
    /// Deletion record.
    pub deletion: Deletion,
}

/// A list entry.
#[derive(Clone, Debug)]
pub struct KeyItemView {
    /// Unversioned (ListKeys) or versioned (ListKeyVersions) key URI.
    pub kid: String,
    /// Attributes and tags of the (newest) version.
    pub version: KeyVersion,
    /// Retention.
    pub recoverable_days: i32,
    /// Recovery level.
    pub recovery_level: &'static str,
}

/// What a crypto request carries.
pub struct CryptoRequest {
    /// Which operation.
    pub op: CryptoOp,
    /// Key URI.
    pub key_id: String,
    /// Algorithm name.
    pub algorithm: String,
    /// Plaintext or ciphertext.
    pub value: Vec<u8>,
    /// AES-GCM IV (encrypt: optional; decrypt: required).
    pub iv: Vec<u8>,
    /// AES-GCM additional data.
    pub aad: Vec<u8>,
    /// AES-GCM tag (decrypt).
    pub tag: Vec<u8>,
}

/// A crypto result.
pub struct CryptoResult {
    /// Versioned key URI that did the work.
    pub kid: String,
    /// Output bytes (plaintext for decrypt/unwrap, zeroized when dropped).
    pub value: Zbytes,
    /// AES-GCM IV (encrypt).
    pub iv: Vec<u8>,
    /// AES-GCM tag (encrypt).
    pub tag: Vec<u8>,
}

/// The plaintext content of a backup blob (sealed as a whole under the master key).
#[derive(Serialize, Deserialize)]
struct BackupPayload {
    name: String,
    versions: Vec<BackupVersion>,
}

#[derive(Serialize, Deserialize)]
struct BackupVersion {
    meta: KeyVersion,
    /// Base64 of the private material (PKCS#8 or raw AES).
    material: String,
}

impl Drop for BackupVersion {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.material);
    }
}

fn crypto_error(e: CryptoError) -> BrokerError {
    match e {
        CryptoError::DecryptionFailed => BrokerError::DecryptionFailed,
        CryptoError::InvalidInput(m) => BrokerError::bad_parameter(m),
        CryptoError::InvalidKeyMaterial(m) => {
            BrokerError::bad_parameter(format!("The key material is invalid: {m}"))
        }
        other => {
            tracing::error!(error = %other, "crypto failure");
            BrokerError::Internal
        }
    }
}

fn new_version_id() -> String {
    hex::encode(crypto::random_bytes(16))
}

fn permission_for(op: CryptoOp) -> KeyPermission {
    match op {
        CryptoOp::Encrypt => KeyPermission::Encrypt,
        CryptoOp::Decrypt => KeyPermission::Decrypt,
        CryptoOp::WrapKey => KeyPermission::WrapKey,
        CryptoOp::UnwrapKey => KeyPermission::UnwrapKey,
    }
}

/// Runs blocking crypto on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| BrokerError::Internal)?
}

impl Broker {
    fn key_resource(&self, vault: &str, name: Option<&str>) -> String {
        let base = self.settings.vault_resource_id(vault);
        match name {
            Some(n) => format!("{base}/keys/{n}"),
            None => base,
        }
    }

    /// Authorizes a data-plane permission on a vault (or one of its keys).
    fn authorize_data(
        &self,
        st: &State,
        ve: &VaultEntry,
        caller: &Caller,
        permission: KeyPermission,
        key: Option<&str>,
    ) -> Result<(), BrokerError> {
        self.check_faults(&ve.vault.name)?;
        self.admit_data(ve, permission, key)?;
        // Network and permission decisions depend only on the state (its epoch) and on who
        // calls from where: cached under exactly that, so any change voids them at once.
        let addr = caller.peer.map(|p| p.ip());
        let index = key.map(key_index_of).unwrap_or_default();
        let cache_key = DecisionKey::new(&DecisionContext {
            epoch: st.epoch,
            principal: &caller.object_id,
            vault: &ve.vault.name,
            key: &index,
            permission,
            addr,
            trusted_service: caller.trusted_service,
            subnet: caller.source_subnet.as_deref(),
        });
        self.caches.decision(cache_key, || {
            let origin = crate::policy::network::Origin {
                addr,
                trusted_service: caller.trusted_service,
                subnet: caller.source_subnet.clone(),
            };
            let desc = caller.description();
            crate::policy::network::check(
                &ve.vault,
                &st.subnets,
                &origin,
                self.settings.trusted_service_bypass,
                &desc,
                &self.settings.location,
            )?;
            let resource = self.key_resource(&ve.vault.name, key);
            data::authorize(
                &ve.vault,
                &st.role_assignments,
                &DataRequest {
                    caller: &desc,
                    permission,
                    resource: &resource,
                    location: &self.settings.location,
                },
            )
        })
    }

    fn view(&self, ve: &VaultEntry, name: &str, version: &KeyVersion) -> KeyView {
        KeyView {
            kid: key_uri(&ve.vault.name, &self.settings.vault_dns_suffix, name, Some(&version.version)),
            version: version.clone(),
            recoverable_days: ve.vault.retention_days,
            recovery_level: ve.vault.recovery_level(),
        }
    }

    /// An active (not deleted) key, or `KeyNotFound`.
    fn active_key<'a>(ve: &'a VaultEntry, name: &str) -> Result<&'a KeyEntry, BrokerError> {
        match ve.key(name) {
            Some(k) if k.key.deleted.is_none() => Ok(k),
            _ => Err(BrokerError::KeyNotFound { name_or_id: name.to_string() }),
        }
    }

    /// A version of an active key, or `KeyNotFound` naming `name/version`.
    fn active_version<'a>(
        ve: &'a VaultEntry,
        id: &KeyIdRef<'_>,
    ) -> Result<(&'a KeyEntry, &'a KeyVersion), BrokerError> {
        let not_found = || BrokerError::KeyNotFound {
            name_or_id: match &id.version {
                Some(v) => format!("{}/{v}", id.name),
                None => id.name.to_string(),
            },
        };
        let k = Self::active_key(ve, id.name).map_err(|_| not_found())?;
        let v = k.key.version(id.version).ok_or_else(not_found)?;
        Ok((k, v))
    }

    fn parse_key_id<'a>(&self, key_id: &'a str) -> Result<KeyIdRef<'a>, BrokerError> {
        KeyIdRef::parse(key_id, &self.settings.vault_dns_suffix)
    }

    /// CreateKey and ImportKey: a new key, or a new version of an existing one.
    pub async fn add_key_version(&self, caller: &Caller, req: NewKey) -> Result<KeyView, BrokerError> {
        let vault = vault_name(&req.vault)?;
        self.fault_delay(&vault).await;
        let name = key_name(&req.name)?.to_string();
        let permission = match req.material {
            NewMaterial::Generate { .. } => KeyPermission::Create,
            NewMaterial::Import { .. } => KeyPermission::Import,
        };
        {
            let st = self.read();
            let ve = st.vault(&vault)?;
            self.authorize_data(&st, ve, caller, permission, Some(&name))?;
            self.admit_create(&vault, req.material.key_type())?;
            if let Some(k) = ve.key(&name)
                && k.key.deleted.is_some()
            {
                return Err(BrokerError::KeyDeletedButRecoverable { name: k.key.name.clone() });
            }
        }
        validate_tags(&req.tags)?;
        validate_window(req.attributes.not_before, req.attributes.expires)?;
        // Material first (RSA generation takes up to seconds), outside every lock.
        let (kty, bits, plain, n, e) = match req.material {
            NewMaterial::Generate { kty, size } => {
                let bits = kty.size(size)?;
                blocking(move || {
                    if kty.is_rsa() {
                        let der = crypto::generate_rsa_pkcs8(bits as usize).map_err(crypto_error)?;
                        let k = crypto::RsaPrivateKey::from_pkcs8(&der).map_err(crypto_error)?;
                        Ok((kty, bits, der, k.n().to_vec(), k.e().to_vec()))
                    } else {
                        Ok((
                            kty,
                            bits,
                            crypto::generate_oct(bits as usize).map_err(crypto_error)?,
                            vec![],
                            vec![],
                        ))
                    }
                })
                .await?
            }
            NewMaterial::Import { key: ImportedKey::Rsa(der), hsm } => {
                blocking(move || {
                    let k = crypto::RsaPrivateKey::from_pkcs8(&der).map_err(crypto_error)?;
                    let kty = if hsm { KeyType::RsaHsm } else { KeyType::Rsa };
                    let (bits, n, e) = (k.bits() as u32, k.n().to_vec(), k.e().to_vec());
                    Ok((kty, bits, der, n, e))
                })
                .await?
            }
            NewMaterial::Import { key: ImportedKey::Oct(raw), .. } => {
                let bits = (raw.len() * 8) as u32;
                (KeyType::OctHsm, bits, raw, vec![], vec![])
            }
        };
        let key_ops = KeyOp::parse_list(&req.key_ops, kty)?;
        let now = self.clock.now();
        let meta = KeyVersion {
            version: new_version_id(),
            kty,
            bits,
            key_ops,
            attributes: KeyAttributes {
                enabled: req.attributes.enabled.unwrap_or(true),
                not_before: req.attributes.not_before,
                expires: req.attributes.expires,
                created: now,
                updated: now,
            },
            tags: req.tags,
            n,
            e,
        };
        self.commit_new_version(caller, &vault, &name, meta, plain, permission).await
    }

    /// Seals and commits a new version, re-checking under the writer lock what may have changed
    /// while the material was being made.
    async fn commit_new_version(
        &self,
        caller: &Caller,
        vault: &str,
        name: &str,
        meta: KeyVersion,
        plain: Zbytes,
        permission: KeyPermission,
    ) -> Result<KeyView, BrokerError> {
        let txn = self.begin().await;
        let (stored_name, view) = {
            let st = self.read();
            let ve = st.vault(vault)?;
            self.authorize_data(&st, ve, caller, permission, Some(name))?;
            let stored_name = match ve.key(name) {
                Some(k) if k.key.deleted.is_some() => {
                    return Err(BrokerError::KeyDeletedButRecoverable { name: k.key.name.clone() });
                }
                Some(k) => k.key.name.clone(),
                None => name.to_string(),
            };
            let view = self.view(ve, &stored_name, &meta);
            (stored_name, view)
        };
        let sealed = self
            .sealer()
            .seal(material_aad(vault, &stored_name, &meta.version).as_bytes(), &plain)
            .map_err(crypto_error)?;
        self.commit(
            txn,
            vec![Change::PutKeyVersion {
                vault: vault.to_string(),
                name: stored_name,
                version: meta,
                sealed: Some(sealed),
            }],
        )
        .await?;
        Ok(view)
    }

    /// GetKey.
    pub fn get_key(&self, caller: &Caller, key_id: &str) -> Result<KeyView, BrokerError> {
        let id = self.parse_key_id(key_id)?;
        let st = self.read();
        let ve = st.vault(&id.vault)?;
        self.authorize_data(&st, ve, caller, KeyPermission::Get, Some(id.name))?;
        let (k, v) = Self::active_version(ve, &id)?;
        Ok(self.view(ve, &k.key.name, v))
    }

    /// ListKeys: active keys, newest version's attributes, unversioned kids, paged by name.
    pub fn list_keys(
        &self,
        caller: &Caller,
        vault: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<KeyItemView>, String), BrokerError> {
        let vault = vault_name(vault)?;
        let st = self.read();
        let ve = st.vault(&vault)?;
        self.authorize_data(&st, ve, caller, KeyPermission::List, None)?;
        let items = ve.keys.iter().filter(|(_, k)| k.key.deleted.is_none()).filter_map(|(idx, k)| {
            k.key.latest().map(|v| {
                (
                    idx.clone(),
                    KeyItemView {
                        kid: key_uri(&vault, &self.settings.vault_dns_suffix, &k.key.name, None),
                        version: v.clone(),
                        recoverable_days: ve.vault.retention_days,
                        recovery_level: ve.vault.recovery_level(),
                    },
                )
            })
        });
        paginate(items, page_size, page_token)
    }

    /// ListKeyVersions: every version of an active key, versioned kids, oldest first.
    pub fn list_key_versions(
        &self,
        caller: &Caller,
        key_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<KeyItemView>, String), BrokerError> {
        let id = self.parse_key_id(key_id)?;
        let st = self.read();
        let ve = st.vault(&id.vault)?;
        self.authorize_data(&st, ve, caller, KeyPermission::List, Some(id.name))?;
        let k = Self::active_key(ve, id.name)?;
        let items = k.key.versions.iter().enumerate().map(|(i, v)| {
            (
                format!("{i:08}"),
                KeyItemView {
                    kid: key_uri(&id.vault, &self.settings.vault_dns_suffix, &k.key.name, Some(&v.version)),
                    version: v.clone(),
                    recoverable_days: ve.vault.retention_days,
                    recovery_level: ve.vault.recovery_level(),
                },
            )
        });
        paginate(items, page_size, page_token)
    }

    /// UpdateKey: attributes, key_ops and tags of one version; never the material.
    pub async fn update_key(
        &self,
        caller: &Caller,
        key_id: &str,
        update: KeyUpdate,
    ) -> Result<KeyView, BrokerError> {
        let id = self.parse_key_id(key_id)?;
        self.fault_delay(&id.vault).await;
        let txn = self.begin().await;
        let (name, view) = {
            let st = self.read();
            let ve = st.vault(&id.vault)?;
            self.authorize_data(&st, ve, caller, KeyPermission::Update, Some(id.name))?;
            let (k, v) = Self::active_version(ve, &id)?;
            let mut v = v.clone();
            if let Some(en) = update.enabled {
                v.attributes.enabled = en;
            }
            if update.clear_not_before {
                v.attributes.not_before = None;
            }
            if let Some(nbf) = update.not_before {
                v.attributes.not_before = Some(nbf);
            }
            if update.clear_expires {
                v.attributes.expires = None;
            }
            if let Some(exp) = update.expires {
                v.attributes.expires = Some(exp);
            }
            validate_window(v.attributes.not_before, v.attributes.expires)?;
            if !update.key_ops.is_empty() {
                v.key_ops = KeyOp::parse_list(&update.key_ops, v.kty)?;
            }
            if let Some(tags) = update.tags {
                validate_tags(&tags)?;
                v.tags = tags;
            }
            v.attributes.updated = self.clock.now();
            (k.key.name.clone(), self.view(ve, &k.key.name, &v))
        };
        self.commit(
            txn,
            vec![Change::PutKeyVersion {
                vault: id.vault.into_owned(),
                name,
                version: view.version.clone(),
                sealed: None,
            }],
        )
        .await?;
        Ok(view)
    }

    /// RotateKey: a new version of the same type and size, with the newest version's key_ops
    /// and tags, enabled, without nbf/exp.
    pub async fn rotate_key(&self, caller: &Caller, key_id: &str) -> Result<KeyView, BrokerError> {
        let id = self.parse_key_id(key_id)?;
        if id.version.is_some() {
            return Err(BrokerError::bad_parameter("RotateKey takes a key identifier without a version."));
        }
        self.fault_delay(&id.vault).await;
        let latest = {
            let st = self.read();
            let ve = st.vault(&id.vault)?;
            self.authorize_data(&st, ve, caller, KeyPermission::Rotate, Some(id.name))?;
            let (_, v) = Self::active_version(ve, &id)?;
            self.admit_create(&id.vault, v.kty)?;
            v.clone()
        };
        let kty = latest.kty;
        let bits = latest.bits;
        let (plain, n, e) = blocking(move || {
            if kty.is_rsa() {
                let der = crypto::generate_rsa_pkcs8(bits as usize).map_err(crypto_error)?;
                let k = crypto::RsaPrivateKey::from_pkcs8(&der).map_err(crypto_error)?;
                Ok((der, k.n().to_vec(), k.e().to_vec()))
            } else {
                Ok((crypto::generate_oct(bits as usize).map_err(crypto_error)?, vec![], vec![]))
            }
        })
        .await?;
        let now = self.clock.now();
        let meta = KeyVersion {
            version: new_version_id(),
            kty,
            bits,
            key_ops: latest.key_ops,
            attributes: KeyAttributes {
                enabled: true,
                not_before: None,
                expires: None,
                created: now,
                updated: now,
            },
            tags: latest.tags,
            n,
            e,
        };
        self.commit_new_version(caller, &id.vault, id.name, meta, plain, KeyPermission::Rotate).await
    }

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
            self.authorize_data(&st, ve, caller, KeyPermission::Delete, Some(id.name))?;
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
        self.authorize_data(&st, st.vault(&vault)?, caller, KeyPermission::Get, Some(name))?;
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
        self.authorize_data(&st, ve, caller, KeyPermission::List, None)?;
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
            self.authorize_data(&st, st.vault(&vault)?, caller, KeyPermission::Recover, Some(name))?;
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
            self.authorize_data(&st, st.vault(&vault)?, caller, KeyPermission::Purge, Some(name))?;
            let (ve, k) = Self::deleted_key(&st, &vault, name)?;
            if ve.vault.purge_protection {
                return Err(BrokerError::PurgeProtected);
            }
            k.key.name.clone()
        };
        self.commit(txn, vec![Change::PurgeKey { vault, name: stored }]).await
    }

    /// Purges every soft-deleted key whose scheduled purge date has passed (the cloud does this
    /// by itself, purge protection or not). Returns how many were purged.
    pub async fn purge_expired(&self) -> Result<usize, BrokerError> {
        let now = self.clock.now();
        let due = |st: &State| -> Vec<Change> {
            st.vaults
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
                .collect()
        };
        if due(&self.read()).is_empty() {
            return Ok(0);
        }
        let txn = self.begin().await;
        let changes = due(&self.read());
        let n = changes.len();
        if n > 0 {
            self.commit(txn, changes).await?;
            tracing::info!(purged = n, "purged soft-deleted keys past their retention");
        }
        Ok(n)
    }

    /// BackupKey: every version with its material, sealed as one blob under the master key.
    pub async fn backup_key(&self, caller: &Caller, key_id: &str) -> Result<Vec<u8>, BrokerError> {
        let id = self.parse_key_id(key_id)?;
        if id.version.is_some() {
            return Err(BrokerError::bad_parameter("BackupKey takes a key identifier without a version."));
        }
        self.fault_delay(&id.vault).await;
        let (name, versions) = {
            let st = self.read();
            let ve = st.vault(&id.vault)?;
            self.authorize_data(&st, ve, caller, KeyPermission::Backup, Some(id.name))?;
            let k = Self::active_key(ve, id.name)?;
            let versions = k
                .key
                .versions
                .iter()
                .map(|v| (v.clone(), k.material(&v.version).cloned()))
                .collect::<Vec<_>>();
            (k.key.name.clone(), versions)
        };
        let sealer = self.sealer().clone();
        let vault = id.vault.into_owned();
        blocking(move || {
            let mut payload = BackupPayload { name: name.clone(), versions: Vec::new() };
            for (meta, material) in versions {
                let material = material.ok_or(BrokerError::Internal)?;
                let plain = sealer
                    .unseal(material_aad(&vault, &name, &meta.version).as_bytes(), &material.sealed)
                    .map_err(|_| BrokerError::Internal)?;
                payload.versions.push(BackupVersion { meta, material: B64.encode(&plain) });
            }
            let json = Zeroizing::new(serde_json::to_vec(&payload).map_err(|_| BrokerError::Internal)?);
            let mut blob = BACKUP_MAGIC.to_vec();
            blob.extend(sealer.seal(BACKUP_AAD, &json).map_err(crypto_error)?);
            Ok(blob)
        })
        .await
    }

    /// RestoreKey: recreates a backed-up key with all its versions in `vault`. The name must be
    /// free (neither active nor soft-deleted).
    pub async fn restore_key(
        &self,
        caller: &Caller,
        vault: &str,
        blob: &[u8],
    ) -> Result<KeyView, BrokerError> {
        let vault = vault_name(vault)?;
        self.fault_delay(&vault).await;
        {
            let st = self.read();
            self.authorize_data(&st, st.vault(&vault)?, caller, KeyPermission::Restore, None)?;
        }
        let bad_blob = || {
            BrokerError::bad_parameter(
                "The backup blob is invalid, corrupted, or was made by a broker with a different master key.",
            )
        };
        let body = blob.strip_prefix(BACKUP_MAGIC).ok_or_else(bad_blob)?;
        let json = self.sealer().unseal(BACKUP_AAD, body).map_err(|_| bad_blob())?;
        let payload: BackupPayload = serde_json::from_slice(&json).map_err(|_| bad_blob())?;
        key_name(&payload.name)?;
        if payload.versions.is_empty() {
            return Err(bad_blob());
        }
        self.admit_create(&vault, payload.versions[0].meta.kty)?;
        let txn = self.begin().await;
        let (changes, last) = {
            let st = self.read();
            let ve = st.vault(&vault)?;
            self.authorize_data(&st, ve, caller, KeyPermission::Restore, Some(&payload.name))?;
            match ve.key(&payload.name) {
                Some(k) if k.key.deleted.is_some() => {
                    return Err(BrokerError::KeyDeletedButRecoverable { name: k.key.name.clone() });
                }
                Some(k) => return Err(BrokerError::KeyAlreadyExists { name: k.key.name.clone() }),
                None => {}
            }
            let mut changes = Vec::new();
            let mut last = None;
            for v in &payload.versions {
                let plain = Zeroizing::new(B64.decode(&v.material).map_err(|_| bad_blob())?);
                let sealed = self
                    .sealer()
                    .seal(material_aad(&vault, &payload.name, &v.meta.version).as_bytes(), &plain)
                    .map_err(crypto_error)?;
                last = Some(self.view(ve, &payload.name, &v.meta));
                changes.push(Change::PutKeyVersion {
                    vault: vault.clone(),
                    name: payload.name.clone(),
                    version: v.meta.clone(),
                    sealed: Some(sealed),
                });
            }
            (changes, last)
        };
        self.commit(txn, changes).await?;
        last.ok_or_else(bad_blob)
    }

    /// WrapKey, UnwrapKey, Encrypt, Decrypt: the hot path. Authorization and key rules under a
    /// short read lock; the crypto itself after the lock is released.
    pub async fn crypto(&self, caller: &Caller, req: CryptoRequest) -> Result<CryptoResult, BrokerError> {
        let id = self.parse_key_id(&req.key_id)?;
        self.fault_delay(&id.vault).await;
        let alg = Algorithm::parse(&req.algorithm)?;
        if req.value.is_empty() {
            return Err(BrokerError::bad_parameter("The value to process is empty."));
        }
        if req.value.len() > MAX_VALUE_BYTES {
            return Err(BrokerError::bad_parameter(format!(
                "The value to process is {} bytes; at most {MAX_VALUE_BYTES} bytes are accepted.",
                req.value.len()
            )));
        }
        let now = self.clock.now();
        let (kid, kty, material, aad, cache_key) = {
            let st = self.read();
            let ve = st.vault(&id.vault)?;
            self.authorize_data(&st, ve, caller, permission_for(req.op), Some(id.name))?;
            let (k, v) = Self::active_version(ve, &id)?;
            v.check_crypto(req.op, alg, now)?;
            let kid = key_uri(&ve.vault.name, &self.settings.vault_dns_suffix, &k.key.name, Some(&v.version));
            // Unwrap results are consulted only now: after authorization and the key rules
            // passed (a cache lookup, no store access and no crypto, under the read lock).
            let cache_key = (req.op == CryptoOp::UnwrapKey).then(|| UnwrapKey::new(&kid, alg, &req.value));
            if let Some(hit) = cache_key.as_ref().and_then(|k| self.caches.unwrapped(k)) {
                return Ok(CryptoResult {
                    kid,
                    value: Zeroizing::new(hit.as_bytes().to_vec()),
                    iv: Vec::new(),
                    tag: Vec::new(),
                });
            }
            let material: Arc<Material> = k.material(&v.version).cloned().ok_or(BrokerError::Internal)?;
            (kid, v.kty, material, material_aad(&ve.vault.name, &k.key.name, &v.version), cache_key)
        };
        let sealer = self.sealer().clone();
        let decoded = self.caches.decoded_key(&aad);
        let (result, fresh) = blocking(move || {
            let (loaded, fresh) = match decoded {
                Some(loaded) => (loaded, None),
                None => {
                    let loaded = Arc::new(material.decode(&sealer, &aad, kty)?);
                    (loaded.clone(), Some((aad, loaded)))
                }
            };
            let (value, iv, tag) = run_crypto(&loaded, req.op, alg, &req.value, &req.iv, &req.aad, &req.tag)?;
            Ok((CryptoResult { kid, value, iv, tag }, fresh))
        })
        .await?;
        if let Some((aad, loaded)) = fresh {
            self.caches.remember_decoded_key(aad, loaded);
        }
        if let Some(k) = cache_key {
            self.caches.remember_unwrap(k, &result.value);
        }
        Ok(result)
    }
}

/// The crypto of one request on decoded material.
fn run_crypto(
    key: &Loaded,
    op: CryptoOp,
    alg: Algorithm,
    value: &[u8],
    iv: &[u8],
    aad: &[u8],
    tag: &[u8],
) -> Result<(Zbytes, Vec<u8>, Vec<u8>), BrokerError> {
    let plain = |v: Vec<u8>| (Zeroizing::new(v), Vec::new(), Vec::new());
    match (key, op) {
        (Loaded::Rsa(k), CryptoOp::Encrypt | CryptoOp::WrapKey) => {
            crate::telemetry::metrics().rsa_operation("encrypt");
            Ok(plain(k.encrypt(alg, value).map_err(crypto_error)?))
        }
        (Loaded::Rsa(k), CryptoOp::Decrypt | CryptoOp::UnwrapKey) => {
            crate::telemetry::metrics().rsa_operation("decrypt");
            Ok((k.decrypt(alg, value).map_err(crypto_error)?, Vec::new(), Vec::new()))
        }
        (Loaded::Oct(k), CryptoOp::WrapKey) => {
            Ok(plain(crypto::aes_kw_wrap(k, value).map_err(crypto_error)?))
        }
        (Loaded::Oct(k), CryptoOp::UnwrapKey) => {
            Ok((crypto::aes_kw_unwrap(k, value).map_err(crypto_error)?, Vec::new(), Vec::new()))
        }
        (Loaded::Oct(k), CryptoOp::Encrypt) => {
            let iv = if iv.is_empty() { None } else { Some(iv) };
            let out = crypto::aes_gcm_encrypt(k, iv, aad, value).map_err(crypto_error)?;
            Ok((Zeroizing::new(out.ciphertext), out.iv, out.tag))
        }
        (Loaded::Oct(k), CryptoOp::Decrypt) => {
            if iv.is_empty() || tag.is_empty() {
                return Err(BrokerError::bad_parameter(
                    "AES-GCM decryption needs the iv and tag returned by encrypt.",
                ));
            }
            Ok((
                crypto::aes_gcm_decrypt(k, iv, aad, value, tag).map_err(crypto_error)?,
                Vec::new(),
                Vec::new(),
            ))
        }
    }
}

/// Pages `(sort key, item)` pairs already in order: items after the token, at most `page_size`;
/// the next token is the last returned sort key, hex-encoded.
fn paginate<T>(
    items: impl Iterator<Item = (String, T)>,
    page_size: i32,
    page_token: &str,
) -> Result<(Vec<T>, String), BrokerError> {
    let size = match page_size {
        0 => MAX_PAGE,
        n if (1..=MAX_PAGE as i32).contains(&n) => n as usize,
        n => {
            return Err(BrokerError::bad_parameter(format!(
                "The page size {n} is invalid. It must be between 1 and {MAX_PAGE}."
            )));
        }
    };
    let after = if page_token.is_empty() {
        None
    } else {
        Some(
            hex::decode(page_token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| BrokerError::bad_parameter("The page token is invalid."))?,
        )
    };
    let mut page = Vec::new();
    let mut last = String::new();
    let mut more = false;
    for (k, item) in items.filter(|(k, _)| after.as_ref().is_none_or(|a| k > a)) {
        if page.len() == size {
            more = true;
            break;
        }
        last = k;
        page.push(item);
    }
    Ok((page, if more { hex::encode(last) } else { String::new() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_every_item_once() {
        let items: Vec<(String, u32)> = (0..7).map(|i| (format!("k{i}"), i)).collect();
        let (p1, t1) = paginate(items.clone().into_iter(), 3, "").unwrap();
        let (p2, t2) = paginate(items.clone().into_iter(), 3, &t1).unwrap();
        let (p3, t3) = paginate(items.clone().into_iter(), 3, &t2).unwrap();
        assert_eq!((p1, p2, p3), (vec![0, 1, 2], vec![3, 4, 5], vec![6]));
        assert!(t3.is_empty());
    }

    #[test]
    fn page_sizes_outside_1_to_25_are_refused() {
        assert!(paginate(std::iter::empty::<(String, u8)>(), 26, "").is_err());
        assert!(paginate(std::iter::empty::<(String, u8)>(), -1, "").is_err());
        assert!(paginate(std::iter::empty::<(String, u8)>(), 1, "zz").is_err());
    }
}
