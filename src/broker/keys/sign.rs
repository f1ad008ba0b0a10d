//! Sign and Verify (digests the caller computed, RSA and EC keys) and GetRandomBytes. Sign and
//! verify take the same path as the crypto hot path: the gate and the key rules under a short
//! read lock, the signature work on the blocking pool on a decoded key from the cache.

use std::sync::Arc;

use super::{blocking, crypto_error, decoded_or_decode};
use crate::broker::Broker;
use crate::broker::state::{Loaded, Material, material_aad};
use crate::model::ids::{key_uri, vault_name};
use crate::model::{BrokerError, Caller, KeyPermission, SignOp, SignatureAlgorithm};

/// The most random bytes one GetRandomBytes returns (and the cloud's limit).
pub const MAX_RANDOM_BYTES: i32 = 128;

/// What a Sign or Verify request carries.
pub struct SignRequest {
    /// Which operation.
    pub op: SignOp,
    /// Key URI.
    pub key_id: String,
    /// Algorithm name (`RS256`, `ES256K`, ...).
    pub algorithm: String,
    /// The digest the caller computed.
    pub digest: Vec<u8>,
    /// Verify: the signature to check.
    pub signature: Vec<u8>,
}

/// What Sign or Verify answers.
pub struct SignResult {
    /// Versioned key URI that did the work.
    pub kid: String,
    /// Sign: the signature (R||S for EC keys).
    pub signature: Vec<u8>,
    /// Verify: whether the signature is valid.
    pub valid: bool,
}

/// The longest signature Verify looks at: an RSA-4096 signature.
const MAX_SIGNATURE_BYTES: usize = 512;

impl Broker {
    /// Sign or Verify: docs/RULES.md R1.11. A signature that does not verify is `valid = false`,
    /// not an error.
    pub async fn sign_or_verify(&self, caller: &Caller, req: SignRequest) -> Result<SignResult, BrokerError> {
        let id = self.parse_key_id(&req.key_id)?;
        self.fault_delay(&id.vault).await;
        let alg = SignatureAlgorithm::parse(&req.algorithm)?;
        alg.check_digest(&req.digest)?;
        if req.op == SignOp::Verify && (req.signature.is_empty() || req.signature.len() > MAX_SIGNATURE_BYTES)
        {
            return Err(BrokerError::bad_parameter(format!(
                "The signature is {} bytes long; a signature is 1 to {MAX_SIGNATURE_BYTES} bytes.",
                req.signature.len()
            )));
        }
        let permission = match req.op {
            SignOp::Sign => KeyPermission::Sign,
            SignOp::Verify => KeyPermission::Verify,
        };
        let now = self.clock.now();
        let (kid, kty, material, aad) = {
            let st = self.read();
            let ve = st.vault(&id.vault)?;
            self.gate(&st, ve, caller, permission, Some(id.name))?;
            let (k, v) = Self::active_version(ve, &id)?;
            v.check_sign(req.op, alg, now)?;
            let kid = key_uri(&ve.vault.name, &self.settings.vault_dns_suffix, &k.key.name, Some(&v.version));
            let material: Arc<Material> = k.material(&v.version).cloned().ok_or(BrokerError::Internal)?;
            (kid, v.kty, material, material_aad(&ve.vault.name, &k.key.name, &v.version))
        };
        let sealer = self.sealer().clone();
        let decoded = self.caches.decoded_key(&aad);
        let (result, fresh) = blocking(move || {
            let (loaded, fresh) = decoded_or_decode(decoded, &material, &sealer, aad, kty)?;
            let result = match (&*loaded, req.op) {
                (Loaded::Rsa(k), SignOp::Sign) => {
                    crate::telemetry::metrics().rsa_operation("sign");
                    let signature = k.sign_digest(alg, &req.digest).map_err(crypto_error)?;
                    SignResult { kid, signature, valid: true }
                }
                (Loaded::Rsa(k), SignOp::Verify) => {
                    crate::telemetry::metrics().rsa_operation("verify");
                    let valid = k.verify_digest(alg, &req.digest, &req.signature).map_err(crypto_error)?;
                    SignResult { kid, signature: Vec::new(), valid }
                }
                (Loaded::Ec(k), SignOp::Sign) => {
                    let signature = k.sign_digest(alg, &req.digest).map_err(crypto_error)?;
                    SignResult { kid, signature, valid: true }
                }
                (Loaded::Ec(k), SignOp::Verify) => {
                    let valid = k.verify_digest(alg, &req.digest, &req.signature).map_err(crypto_error)?;
                    SignResult { kid, signature: Vec::new(), valid }
                }
                // The key rules refused oct keys already.
                (Loaded::Oct(_), _) => return Err(BrokerError::Internal),
            };
            Ok((result, fresh))
        })
        .await?;
        self.remember_decoded(fresh);
        Ok(result)
    }

    /// GetRandomBytes: `count` (1 to 128) bytes from the system's CSPRNG, after the vault's gate
    /// without a key permission ([`Broker::gate_vault`]).
    pub async fn random_bytes(
        &self,
        caller: &Caller,
        vault: &str,
        count: i32,
    ) -> Result<Vec<u8>, BrokerError> {
        let vault = vault_name(vault)?;
        self.fault_delay(&vault).await;
        if !(1..=MAX_RANDOM_BYTES).contains(&count) {
            return Err(BrokerError::bad_parameter(format!(
                "The count {count} is invalid. It must be between 1 and {MAX_RANDOM_BYTES}."
            )));
        }
        {
            let st = self.read();
            let ve = st.vault(&vault)?;
            self.gate_vault(&st, ve, caller)?;
        }
        // ok: 1..=128 was checked above.
        Ok(crate::crypto::random_bytes(count as usize))
    }
}
