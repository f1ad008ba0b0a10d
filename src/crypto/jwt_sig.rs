//! RS256 (RSASSA-PKCS1-v1_5 with SHA-256) signatures for the broker's JWTs.

use super::{CryptoError, KeyMaterialError, Zbytes, caused_by};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    KeyPair as _, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, RsaKeyPair,
};
use zeroize::Zeroizing;

/// The broker's token-signing key (RSA-2048 when generated; 2048–4096 accepted on load),
/// RS256 = RSASSA-PKCS1-v1_5 with SHA-256. `Debug` shows no key material.
pub struct TokenSigningKey {
    key_pair: RsaKeyPair,
    public: ParsedPublicKey,
    public_der: Vec<u8>,
}

impl std::fmt::Debug for TokenSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigningKey")
            .field("bits", &(self.key_pair.public_modulus_len() * 8))
            .finish_non_exhaustive()
    }
}

impl TokenSigningKey {
    /// Generates a fresh RSA-2048 signing key; also returns its PKCS#8 DER for persisting.
    pub fn generate() -> Result<(Self, Zbytes), CryptoError> {
        let key_pair = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| CryptoError::KeyGeneration)?;
        let der = key_pair.as_der().map_err(|_| CryptoError::KeyGeneration)?;
        let der = Zeroizing::new(der.as_ref().to_vec());
        Ok((Self::from_key_pair(key_pair)?, der))
    }

    /// Loads a signing key from PKCS#8 DER (RSA, 2048 to 4096 bits).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, CryptoError> {
        let key_pair = RsaKeyPair::from_pkcs8(der).map_err(caused_by(KeyMaterialError::NotPkcs8Rsa))?;
        Self::from_key_pair(key_pair)
    }

    fn from_key_pair(key_pair: RsaKeyPair) -> Result<Self, CryptoError> {
        let bits = key_pair.public_modulus_len() * 8;
        if !(2048..=4096).contains(&bits) {
            return Err(KeyMaterialError::SigningKeySize { bits }.into());
        }
        let public_der = key_pair.public_key().as_ref().to_vec();
        let public = ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public_der)
            .map_err(caused_by(KeyMaterialError::UnusableRsaPublicKey))?;
        Ok(Self { key_pair, public, public_der })
    }

    /// The public key as PKCS#1 `RSAPublicKey` DER (for publishing / JWKS).
    pub fn public_key_der(&self) -> &[u8] {
        &self.public_der
    }

    /// RS256 signature over `message` (the JWS signing input).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut sig = vec![0u8; self.key_pair.public_modulus_len()];
        self.key_pair
            .sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), message, &mut sig)
            .map_err(|_| CryptoError::BadSignature)?;
        Ok(sig)
    }

    /// Verifies an RS256 signature with the public half (aws-lc; no secret-dependent
    /// branches, since verification touches only public data). Failure gives `BadSignature`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        self.public.verify_sig(message, signature).map_err(|_| CryptoError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::super::rsa_ops::tests::{other_pkcs8, shared_pkcs8};
    use super::*;

    #[test]
    fn signature_verifies_and_any_flipped_bit_fails() {
        let key = TokenSigningKey::from_pkcs8(shared_pkcs8()).unwrap();
        let msg = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0";
        let sig = key.sign(msg).unwrap();
        assert_eq!(sig.len(), 256);
        key.verify(msg, &sig).unwrap();
        for i in [0, 100, 255] {
            let mut bad = sig.clone();
            bad[i] ^= 0x01;
            assert!(matches!(key.verify(msg, &bad), Err(CryptoError::BadSignature)));
        }
        assert!(matches!(key.verify(b"other", &sig), Err(CryptoError::BadSignature)));
        assert!(matches!(key.verify(msg, &sig[..255]), Err(CryptoError::BadSignature)));
    }

    #[test]
    fn signature_from_another_key_fails() {
        let key = TokenSigningKey::from_pkcs8(shared_pkcs8()).unwrap();
        let other = TokenSigningKey::from_pkcs8(other_pkcs8()).unwrap();
        let sig = other.sign(b"m").unwrap();
        assert!(matches!(key.verify(b"m", &sig), Err(CryptoError::BadSignature)));
    }

    #[test]
    fn generated_key_reloads_from_its_pkcs8_and_verifies_its_signatures() {
        let (key, der) = TokenSigningKey::generate().unwrap();
        let reloaded = TokenSigningKey::from_pkcs8(&der).unwrap();
        assert_eq!(key.public_key_der(), reloaded.public_key_der());
        reloaded.verify(b"m", &key.sign(b"m").unwrap()).unwrap();
        // RSASSA-PKCS1-v1_5 is deterministic.
        assert_eq!(key.sign(b"m").unwrap(), reloaded.sign(b"m").unwrap());
        assert!(format!("{key:?}").contains("2048"));
    }

    #[test]
    fn from_pkcs8_rejects_garbage() {
        assert!(matches!(TokenSigningKey::from_pkcs8(b"junk"), Err(CryptoError::InvalidKeyMaterial(_))));
    }
}
