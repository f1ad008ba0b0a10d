//! Key operations of the data plane: the Key Vault key rules (lifecycle, soft delete and
//! recovery, backup/restore, the crypto hot path), one file per concern. Every operation passes
//! the data-plane gate first (permission before existence, as the cloud does: `super::gate`),
//! then looks the key up, then applies the key rules.
//!
//! - [`lifecycle`]: create, import, get, list, list versions, update, rotate;
//! - [`deleted`]: delete, get/list deleted, recover, purge, and the purge sweeper;
//! - [`backup`]: backup and restore blobs sealed under the master key;
//! - [`crypto`]: wrap, unwrap, encrypt, decrypt (the hot path);
//! - [`sign`]: sign and verify digests, random bytes;
//! - [`rotation`]: rotation policies and the rotations and notifications they make due.

mod backup;
mod crypto;
mod deleted;
mod lifecycle;
mod rotation;
mod sign;

pub use rotation::RotationPolicyView;
pub use sign::{MAX_RANDOM_BYTES, SignRequest, SignResult};

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Broker;
use super::state::{KeyEntry, Loaded, Material, VaultEntry};
use crate::crypto::{CryptoError, ImportedKey, Zbytes};
use crate::model::ids::{KeyIdRef, key_uri};
use crate::model::{BrokerError, CryptoOp, Curve, Deletion, KeyAttributes, KeyType, KeyVersion};

/// Largest `value` a crypto request may carry.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// The vault domain of the REST listener's hosts (`<vault>.vault.localhost`): key ids under it
/// address the same keys as under the configured suffix.
pub const LOCAL_VAULT_DOMAIN: &str = "vault.localhost";
/// The cloud's default and largest list page.
pub const MAX_PAGE: usize = 25;

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
    /// Generate a key of this type and size (0 = default size), or of this curve (EC).
    Generate {
        /// Key type.
        kty: KeyType,
        /// Size in bits.
        size: i32,
        /// EC and EC-HSM: the curve (`None` = P-256); refused for other types.
        curve: Option<Curve>,
    },
    /// Imported material.
    Import {
        /// The key.
        key: ImportedKey,
        /// RSA-HSM (EC-HSM) rather than RSA (EC).
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

impl NewMaterial {
    /// The type of the key this material makes.
    pub fn key_type(&self) -> KeyType {
        match self {
            NewMaterial::Generate { kty, .. } => *kty,
            NewMaterial::Import { key: ImportedKey::Rsa(_), hsm: true } => KeyType::RsaHsm,
            NewMaterial::Import { key: ImportedKey::Rsa(_), hsm: false } => KeyType::Rsa,
            NewMaterial::Import { key: ImportedKey::Ec(..), hsm: true } => KeyType::EcHsm,
            NewMaterial::Import { key: ImportedKey::Ec(..), hsm: false } => KeyType::Ec,
            NewMaterial::Import { key: ImportedKey::Oct(_), .. } => KeyType::OctHsm,
        }
    }
}

/// New private material and the public parts a version's metadata carries.
struct Made {
    kty: KeyType,
    bits: u32,
    plain: Zbytes,
    n: Vec<u8>,
    e: Vec<u8>,
    crv: Option<Curve>,
    x: Vec<u8>,
    y: Vec<u8>,
}

impl Made {
    fn rsa(kty: KeyType, der: Zbytes) -> Result<Self, BrokerError> {
        let k = crate::crypto::RsaPrivateKey::from_pkcs8(&der).map_err(crypto_error)?;
        let (bits, n, e) = (k.bits() as u32, k.n().to_vec(), k.e().to_vec());
        Ok(Made { kty, bits, plain: der, n, e, crv: None, x: vec![], y: vec![] })
    }

    fn ec(kty: KeyType, der: Zbytes) -> Result<Self, BrokerError> {
        let k = crate::crypto::EcPrivateKey::from_pkcs8(&der).map_err(crypto_error)?;
        let (x, y) = k.public_xy();
        let curve = k.curve();
        Ok(Made { kty, bits: curve.bits(), plain: der, n: vec![], e: vec![], crv: Some(curve), x, y })
    }

    /// Generates a key of `kty` with `bits` (RSA, oct-HSM) or on `curve` (EC). Blocking.
    fn generate(kty: KeyType, bits: u32, curve: Curve) -> Result<Self, BrokerError> {
        if kty.is_rsa() {
            Made::rsa(kty, crate::crypto::generate_rsa_pkcs8(bits as usize).map_err(crypto_error)?)
        } else if kty.is_ec() {
            Made::ec(kty, crate::crypto::generate_ec_pkcs8(curve).map_err(crypto_error)?)
        } else {
            let plain = crate::crypto::generate_oct(bits as usize).map_err(crypto_error)?;
            Ok(Made { kty, bits, plain, n: vec![], e: vec![], crv: None, x: vec![], y: vec![] })
        }
    }

    /// The metadata of a new version of this material.
    fn version(
        self,
        key_ops: Vec<crate::model::KeyOp>,
        attributes: KeyAttributes,
        tags: BTreeMap<String, String>,
    ) -> (KeyVersion, Zbytes) {
        let meta = KeyVersion {
            version: new_version_id(),
            kty: self.kty,
            bits: self.bits,
            key_ops,
            attributes,
            tags,
            n: self.n,
            e: self.e,
            crv: self.crv,
            x: self.x,
            y: self.y,
        };
        (meta, self.plain)
    }
}

fn crypto_error(e: CryptoError) -> BrokerError {
    match e {
        CryptoError::DecryptionFailed => BrokerError::DecryptionFailed,
        CryptoError::InvalidInput(m) => BrokerError::bad_parameter(m.to_string()),
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
    hex::encode(crate::crypto::random_bytes(16))
}

/// Runs blocking crypto on the blocking pool.
/// A key decoded on the blocking pool, to remember in the decoded-key cache: its material AAD
/// and the decoded key.
type DecodedNow = Option<(String, Arc<Loaded>)>;

/// The decoded key of a crypto or signature operation (run on the blocking pool): the
/// decoded-key cache's entry when there was one, else `material` unsealed and decoded now, which
/// is also returned to be remembered ([`Broker::remember_decoded`]).
fn decoded_or_decode(
    cached: Option<Arc<Loaded>>,
    material: &Material,
    sealer: &crate::crypto::Sealer,
    aad: String,
    kty: KeyType,
) -> Result<(Arc<Loaded>, DecodedNow), BrokerError> {
    match cached {
        Some(loaded) => Ok((loaded, None)),
        None => {
            let loaded = Arc::new(material.decode(sealer, &aad, kty)?);
            Ok((loaded.clone(), Some((aad, loaded))))
        }
    }
}

impl Broker {
    /// Remembers a key [`decoded_or_decode`] decoded.
    fn remember_decoded(&self, fresh: DecodedNow) {
        if let Some((aad, loaded)) = fresh {
            self.caches.remember_decoded_key(aad, loaded);
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| BrokerError::Internal)?
}

impl Broker {
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
        // A key id the REST surface handed out (`https://<vault>.vault.localhost:<port>/keys/...`)
        // names the same key: tried only when the configured suffix does not fit.
        KeyIdRef::parse(key_id, &self.settings.vault_dns_suffix)
            .or_else(|e| KeyIdRef::parse(key_id, LOCAL_VAULT_DOMAIN).map_err(|_| e))
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
