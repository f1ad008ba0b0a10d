//! WrapKey, UnwrapKey, Encrypt, Decrypt: the hot path. The gate and the key rules run under a
//! short read lock; an unwrap result is looked up only after both passed; the RSA or AES work
//! runs on the blocking pool after the lock is released, on a decoded key from the cache.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::{CryptoRequest, CryptoResult, MAX_VALUE_BYTES, blocking, crypto_error, decoded_or_decode};
use crate::broker::Broker;
use crate::broker::cache::UnwrapKey;
use crate::broker::state::{Loaded, Material, material_aad};
use crate::crypto::{self, Zbytes};
use crate::model::ids::key_uri;
use crate::model::{Algorithm, BrokerError, Caller, CryptoOp, KeyPermission};

fn permission_for(op: CryptoOp) -> KeyPermission {
    match op {
        CryptoOp::Encrypt => KeyPermission::Encrypt,
        CryptoOp::Decrypt => KeyPermission::Decrypt,
        CryptoOp::WrapKey => KeyPermission::WrapKey,
        CryptoOp::UnwrapKey => KeyPermission::UnwrapKey,
    }
}

impl Broker {
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
            self.gate(&st, ve, caller, permission_for(req.op), Some(id.name))?;
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
            let (loaded, fresh) = decoded_or_decode(decoded, &material, &sealer, aad, kty)?;
            let (value, iv, tag) = run_crypto(&loaded, req.op, alg, &req.value, &req.iv, &req.aad, &req.tag)?;
            Ok((CryptoResult { kid, value, iv, tag }, fresh))
        })
        .await?;
        self.remember_decoded(fresh);
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
        // The key rules refused every encryption algorithm on EC keys already.
        (Loaded::Ec(_), _) => Err(BrokerError::Internal),
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
