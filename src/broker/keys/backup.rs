//! BackupKey and RestoreKey: a key with all its versions and their material, sealed as one blob
//! under the master key, so only a broker holding the same master key can restore it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{KeyView, blocking, crypto_error};
use crate::broker::Broker;
use crate::broker::state::material_aad;
use crate::crypto::{EcPrivateKey, RsaPrivateKey};
use crate::model::ids::{key_name, key_version, vault_name};
use crate::model::{BrokerError, Caller, Change, KeyPermission, KeyType, KeyVersion};

const BACKUP_MAGIC: &[u8] = b"TDEBKP1";
const BACKUP_AAD: &[u8] = b"tde-broker/backup/v1";

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

impl Broker {
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
            self.gate(&st, ve, caller, KeyPermission::Backup, Some(id.name))?;
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
            self.gate(&st, st.vault(&vault)?, caller, KeyPermission::Restore, None)?;
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
        // Each version must be one the broker could have made, once: an id that is not a key
        // version could never be addressed, and a repeated one reached the store as a
        // constraint violation (reported as UNAVAILABLE).
        // Its material must be the key its metadata describes, or the restored key would fail
        // every later operation as if the caller's request were at fault.
        let mut seen = std::collections::HashSet::new();
        let mut materials = Vec::with_capacity(payload.versions.len());
        for v in &payload.versions {
            key_version(&v.meta.version).map_err(|_| bad_blob())?;
            if !seen.insert(v.meta.version.as_str()) {
                return Err(bad_blob());
            }
            let plain = Zeroizing::new(B64.decode(&v.material).map_err(|_| bad_blob())?);
            if !material_matches(&v.meta, &plain) {
                return Err(bad_blob());
            }
            materials.push(plain);
        }
        self.admit_create(&vault, payload.versions[0].meta.kty)?;
        let txn = self.begin().await;
        let (changes, last) = {
            let st = self.read();
            let ve = st.vault(&vault)?;
            self.gate(&st, ve, caller, KeyPermission::Restore, Some(&payload.name))?;
            match ve.key(&payload.name) {
                Some(k) if k.key.deleted.is_some() => {
                    return Err(BrokerError::KeyDeletedButRecoverable { name: k.key.name.clone() });
                }
                Some(k) => return Err(BrokerError::KeyAlreadyExists { name: k.key.name.clone() }),
                None => {}
            }
            let mut changes = Vec::new();
            let mut last = None;
            for (v, plain) in payload.versions.iter().zip(&materials) {
                let sealed = self
                    .sealer()
                    .seal(material_aad(&vault, &payload.name, &v.meta.version).as_bytes(), plain)
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
}

/// Whether `plain` is the key `meta` describes: an RSA private key with its size, modulus and
/// exponent, an EC private key with its curve and public point, or an AES key of its size.
fn material_matches(meta: &KeyVersion, plain: &[u8]) -> bool {
    fn trimmed(b: &[u8]) -> &[u8] {
        let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
        &b[first..]
    }
    let bits = usize::try_from(meta.bits).unwrap_or(usize::MAX);
    match meta.kty {
        KeyType::OctHsm => matches!(plain.len(), 16 | 24 | 32) && plain.len() * 8 == bits,
        KeyType::Rsa | KeyType::RsaHsm => RsaPrivateKey::from_pkcs8(plain).is_ok_and(|k| {
            k.bits() == bits && trimmed(k.n()) == trimmed(&meta.n) && trimmed(k.e()) == trimmed(&meta.e)
        }),
        KeyType::Ec | KeyType::EcHsm => EcPrivateKey::from_pkcs8(plain).is_ok_and(|k| {
            Some(k.curve()) == meta.crv
                && k.curve().bits() == meta.bits
                && k.public_xy() == (meta.x.clone(), meta.y.clone())
        }),
    }
}
