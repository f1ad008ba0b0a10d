//! RSA key generation, encryption and decryption (RSA-OAEP, RSA-OAEP-256, RSA1_5) on aws-lc-rs.

use super::{Algorithm, CryptoError, InputError, KeyMaterialError, Zbytes, caused_by};
use crate::model::SignatureAlgorithm;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, OaepPublicEncryptingKey,
    Pkcs1PrivateDecryptingKey, Pkcs1PublicEncryptingKey, PrivateDecryptingKey, PublicEncryptingKey,
    PublicKeyComponents,
};
use aws_lc_rs::signature::{RsaKeyPair, RsaSubjectPublicKey};
use zeroize::Zeroizing;

/// RSA modulus sizes (bits) the broker accepts.
pub const SUPPORTED_RSA_BITS: [usize; 3] = [2048, 3072, 4096];

/// OAEP / PKCS#1 v1.5 overheads in bytes (RFC 8017: 2*hLen+2, and 11).
const OAEP_SHA1_OVERHEAD: usize = 2 * 20 + 2;
const OAEP_SHA256_OVERHEAD: usize = 2 * 32 + 2;
const PKCS1_OVERHEAD: usize = 11;

fn key_size(bits: usize) -> Result<KeySize, CryptoError> {
    match bits {
        2048 => Ok(KeySize::Rsa2048),
        3072 => Ok(KeySize::Rsa3072),
        4096 => Ok(KeySize::Rsa4096),
        _ => Err(InputError::RsaKeySize { bits }.into()),
    }
}

fn non_rsa(alg: Algorithm) -> CryptoError {
    InputError::NotRsa(alg).into()
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

/// Generates an RSA key of 2048, 3072 or 4096 bits (e = 65537) and returns it as PKCS#8 DER.
pub fn generate_rsa_pkcs8(bits: usize) -> Result<Zbytes, CryptoError> {
    let key = PrivateDecryptingKey::generate(key_size(bits)?).map_err(|_| CryptoError::KeyGeneration)?;
    let der = key.as_der().map_err(|_| CryptoError::KeyGeneration)?;
    Ok(Zeroizing::new(der.as_ref().to_vec()))
}

/// The public half of an RSA key, ready for OAEP and PKCS#1 v1.5 encryption.
struct RsaPublic {
    oaep: OaepPublicEncryptingKey,
    pkcs1: Pkcs1PublicEncryptingKey,
    n: Vec<u8>,
    e: Vec<u8>,
    bits: usize,
}

impl RsaPublic {
    fn new(key: PublicEncryptingKey) -> Result<Self, CryptoError> {
        let bits = key.key_size_bits();
        if !SUPPORTED_RSA_BITS.contains(&bits) {
            return Err(KeyMaterialError::RsaKeySize { bits }.into());
        }
        let bad = caused_by(KeyMaterialError::UnusableRsaPublicKey);
        let spki = key.as_der().map_err(&bad)?;
        let parsed = RsaSubjectPublicKey::from_der(spki.as_ref())
            .map_err(caused_by(KeyMaterialError::UnusableRsaPublicKey))?;
        let n = parsed.modulus().big_endian_without_leading_zero().to_vec();
        let e = parsed.exponent().big_endian_without_leading_zero().to_vec();
        Ok(Self {
            oaep: OaepPublicEncryptingKey::new(key.clone()).map_err(&bad)?,
            pkcs1: Pkcs1PublicEncryptingKey::new(key).map_err(&bad)?,
            n,
            e,
            bits,
        })
    }

    fn max_plaintext_len(&self, alg: Algorithm) -> Result<usize, CryptoError> {
        let overhead = match alg {
            Algorithm::RsaOaep => OAEP_SHA1_OVERHEAD,
            Algorithm::RsaOaep256 => OAEP_SHA256_OVERHEAD,
            Algorithm::Rsa1_5 => PKCS1_OVERHEAD,
            other => return Err(non_rsa(other)),
        };
        Ok(self.oaep.ciphertext_size().saturating_sub(overhead))
    }

    fn encrypt(&self, alg: Algorithm, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let max = self.max_plaintext_len(alg)?;
        if plaintext.len() > max {
            return Err(
                InputError::PlaintextTooLong { len: plaintext.len(), alg, bits: self.bits, max }.into()
            );
        }
        let mut out = vec![0u8; self.oaep.ciphertext_size()];
        let written = match alg {
            Algorithm::RsaOaep => self.oaep.encrypt(&OAEP_SHA1_MGF1SHA1, plaintext, &mut out, None),
            Algorithm::RsaOaep256 => self.oaep.encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None),
            _ => self.pkcs1.encrypt(plaintext, &mut out),
        }
        .map_err(|e| InputError::RsaEncryptFailed { alg, source: e.into() })?
        .len();
        out.truncate(written);
        Ok(out)
    }
}

/// A decoded RSA private key, decoded once and reused (callers cache it in an `Arc`).
/// `Send + Sync`; its `Debug` output shows only the key size.
pub struct RsaPrivateKey {
    oaep: OaepPrivateDecryptingKey,
    pkcs1: Pkcs1PrivateDecryptingKey,
    /// The same key for signatures (RS*, PS*).
    signing: RsaKeyPair,
    public: RsaPublic,
}

impl std::fmt::Debug for RsaPrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RsaPrivateKey").field("bits", &self.public.bits).finish_non_exhaustive()
    }
}

impl RsaPrivateKey {
    /// Decodes an unencrypted PKCS#8 DER RSA private key. Non-RSA keys, malformed or
    /// inconsistent keys and sizes other than 2048/3072/4096 give `InvalidKeyMaterial`.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, CryptoError> {
        let key = PrivateDecryptingKey::from_pkcs8(der).map_err(caused_by(KeyMaterialError::NotPkcs8Rsa))?;
        Self::from_key(key)
    }

    /// Wraps an already-parsed aws-lc key, enforcing the supported sizes.
    pub(crate) fn from_key(key: PrivateDecryptingKey) -> Result<Self, CryptoError> {
        let public = RsaPublic::new(key.public_key())?;
        let bad = caused_by(KeyMaterialError::UnusableRsaPrivateKey);
        let der = Zeroizing::new(key.as_der().map_err(&bad)?.as_ref().to_vec());
        let signing =
            RsaKeyPair::from_pkcs8(&der).map_err(caused_by(KeyMaterialError::UnusableRsaPrivateKey))?;
        Ok(Self {
            oaep: OaepPrivateDecryptingKey::new(key.clone()).map_err(&bad)?,
            pkcs1: Pkcs1PrivateDecryptingKey::new(key).map_err(&bad)?,
            signing,
            public,
        })
    }

    /// Modulus size in bits (2048, 3072 or 4096).
    pub fn bits(&self) -> usize {
        self.public.bits
    }

    /// Modulus, big-endian unsigned, no leading zero.
    pub fn n(&self) -> &[u8] {
        &self.public.n
    }

    /// Public exponent, big-endian unsigned, no leading zero.
    pub fn e(&self) -> &[u8] {
        &self.public.e
    }

    /// Largest plaintext `encrypt` accepts for `alg` with this key (`InvalidInput` for non-RSA).
    pub fn max_plaintext_len(&self, alg: Algorithm) -> Result<usize, CryptoError> {
        self.public.max_plaintext_len(alg)
    }

    /// Decrypt with RSA-OAEP (SHA-1/MGF1-SHA1), RSA-OAEP-256 (SHA-256/MGF1-SHA256) or RSA1_5
    /// (PKCS#1 v1.5). Every failure, of any kind (wrong length, bad padding, wrong key),
    /// returns [`CryptoError::DecryptionFailed`]. A non-RSA `alg` gives `InvalidInput`.
    pub fn decrypt(&self, alg: Algorithm, ciphertext: &[u8]) -> Result<Zbytes, CryptoError> {
        let mut out = Zeroizing::new(vec![0u8; self.oaep.min_output_size()]);
        let written = match alg {
            Algorithm::RsaOaep => self.oaep.decrypt(&OAEP_SHA1_MGF1SHA1, ciphertext, &mut out, None),
            Algorithm::RsaOaep256 => self.oaep.decrypt(&OAEP_SHA256_MGF1SHA256, ciphertext, &mut out, None),
            Algorithm::Rsa1_5 => self.pkcs1.decrypt(ciphertext, &mut out),
            other => return Err(non_rsa(other)),
        }
        .map_err(|_| CryptoError::DecryptionFailed)?
        .len();
        out.truncate(written);
        Ok(out)
    }

    /// Encrypt with the public key (same algorithms as [`Self::decrypt`]). A plaintext longer
    /// than [`Self::max_plaintext_len`] gives `InvalidInput` naming the limit.
    pub fn encrypt(&self, alg: Algorithm, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.public.encrypt(alg, plaintext)
    }

    /// Signs a digest with RS256/384/512 (PKCS#1 v1.5) or PS256/384/512 (PSS, MGF1 with the same
    /// hash, salt as long as the hash). A digest of the wrong length, or an ES algorithm, gives
    /// `InvalidInput`.
    pub fn sign_digest(&self, alg: SignatureAlgorithm, digest: &[u8]) -> Result<Vec<u8>, CryptoError> {
        super::sign::rsa_sign_digest(&self.signing, alg, digest)
    }

    /// Whether `signature` is `alg`'s signature of `digest` under this key's public key.
    pub fn verify_digest(
        &self,
        alg: SignatureAlgorithm,
        digest: &[u8],
        signature: &[u8],
    ) -> Result<bool, CryptoError> {
        super::sign::rsa_verify_digest(&self.signing, alg, digest, signature)
    }
}

/// Public-key-only encryption from (n, e) big-endian bytes (leading zeros tolerated) —
/// used by tests and the CLI. Key sizes other than 2048/3072/4096 give `InvalidKeyMaterial`.
pub fn rsa_encrypt_with_public(
    n: &[u8],
    e: &[u8],
    alg: Algorithm,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if !alg.is_rsa() {
        return Err(non_rsa(alg));
    }
    let components = PublicKeyComponents { n: strip_leading_zeros(n), e: strip_leading_zeros(e) };
    let key: PublicEncryptingKey =
        components.try_into().map_err(caused_by(KeyMaterialError::RsaPublicComponents))?;
    RsaPublic::new(key)?.encrypt(alg, plaintext)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rsa::pkcs8::DecodePrivateKey;
    use std::sync::OnceLock;

    /// One RSA-2048 PKCS#8 key shared by every test in the crypto module (generation is slow).
    pub(crate) fn shared_pkcs8() -> &'static [u8] {
        static KEY: OnceLock<Zbytes> = OnceLock::new();
        KEY.get_or_init(|| generate_rsa_pkcs8(2048).expect("generate test key"))
    }

    /// A second, unrelated RSA-2048 key.
    pub(crate) fn other_pkcs8() -> &'static [u8] {
        static KEY: OnceLock<Zbytes> = OnceLock::new();
        KEY.get_or_init(|| generate_rsa_pkcs8(2048).expect("generate test key"))
    }

    fn shared_key() -> RsaPrivateKey {
        RsaPrivateKey::from_pkcs8(shared_pkcs8()).expect("decode test key")
    }

    /// aws-lc's CSPRNG as a `rand_core` RNG, for the `rsa` crate in tests.
    struct AwsLcRng;

    impl rsa::rand_core::TryRng for AwsLcRng {
        type Error = std::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            let mut b = [0u8; 4];
            self.try_fill_bytes(&mut b)?;
            Ok(u32::from_le_bytes(b))
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            let mut b = [0u8; 8];
            self.try_fill_bytes(&mut b)?;
            Ok(u64::from_le_bytes(b))
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            super::super::fill_random(dst).expect("system RNG");
            Ok(())
        }
    }

    impl rsa::rand_core::TryCryptoRng for AwsLcRng {}

    const RSA_ALGS: [Algorithm; 3] = [Algorithm::RsaOaep, Algorithm::RsaOaep256, Algorithm::Rsa1_5];

    #[test]
    fn rsa_private_key_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RsaPrivateKey>();
    }

    #[test]
    fn generate_rejects_unsupported_sizes() {
        for bits in [0, 1024, 2047, 2049, 8192] {
            assert!(matches!(generate_rsa_pkcs8(bits), Err(CryptoError::InvalidInput(_))), "{bits}");
        }
    }

    #[test]
    fn generated_3072_key_decodes_with_3072_bits() {
        let key = RsaPrivateKey::from_pkcs8(&generate_rsa_pkcs8(3072).unwrap()).unwrap();
        assert_eq!(key.bits(), 3072);
        assert_eq!(key.n().len(), 384);
    }

    #[test]
    fn decoded_key_exposes_size_modulus_and_exponent() {
        let key = shared_key();
        assert_eq!(key.bits(), 2048);
        assert_eq!(key.n().len(), 256);
        assert_ne!(key.n()[0], 0);
        assert_eq!(key.e(), &[1, 0, 1]);
        let debug = format!("{key:?}");
        assert!(debug.contains("2048") && !debug.contains(&hex::encode(&key.n()[..8])));
    }

    #[test]
    fn every_rsa_algorithm_round_trips_at_2048() {
        let key = shared_key();
        for alg in RSA_ALGS {
            let ct = key.encrypt(alg, b"a 32-byte data encryption key!!!").unwrap();
            assert_eq!(ct.len(), 256, "{alg}");
            assert_eq!(&key.decrypt(alg, &ct).unwrap()[..], b"a 32-byte data encryption key!!!");
        }
    }

    #[test]
    fn decrypt_with_the_wrong_padding_fails() {
        let key = shared_key();
        let ct = key.encrypt(Algorithm::RsaOaep256, b"secret").unwrap();
        for alg in [Algorithm::RsaOaep, Algorithm::Rsa1_5] {
            assert!(matches!(key.decrypt(alg, &ct), Err(CryptoError::DecryptionFailed)));
        }
    }

    #[test]
    fn tampered_and_wrong_key_ciphertexts_fail_indistinguishably() {
        let key = shared_key();
        let other = RsaPrivateKey::from_pkcs8(other_pkcs8()).unwrap();
        for alg in RSA_ALGS {
            let mut tampered = key.encrypt(alg, b"secret").unwrap();
            tampered[100] ^= 0x01;
            let foreign = other.encrypt(alg, b"secret").unwrap();
            let e1 = key.decrypt(alg, &tampered).unwrap_err();
            let e2 = key.decrypt(alg, &foreign).unwrap_err();
            let e3 = key.decrypt(alg, &foreign[..255]).unwrap_err();
            let e4 = key.decrypt(alg, &[]).unwrap_err();
            assert!(matches!(e1, CryptoError::DecryptionFailed), "{alg}");
            for e in [&e2, &e3, &e4] {
                assert!(matches!(e, CryptoError::DecryptionFailed), "{alg}");
                assert_eq!(e1.to_string(), e.to_string());
            }
        }
    }

    #[test]
    fn too_long_plaintext_is_invalid_input_naming_the_limit() {
        let key = shared_key();
        for (alg, max) in [(Algorithm::RsaOaep, 214), (Algorithm::RsaOaep256, 190), (Algorithm::Rsa1_5, 245)]
        {
            assert_eq!(key.max_plaintext_len(alg).unwrap(), max);
            let ct = key.encrypt(alg, &vec![7u8; max]).unwrap();
            assert_eq!(key.decrypt(alg, &ct).unwrap().len(), max);
            match key.encrypt(alg, &vec![7u8; max + 1]) {
                Err(CryptoError::InvalidInput(e @ InputError::PlaintextTooLong { max: limit, .. })) => {
                    assert_eq!(limit, max);
                    assert!(e.to_string().contains(&max.to_string()));
                }
                other => panic!("{alg}: expected InvalidInput, got {other:?}"),
            }
        }
    }

    #[test]
    fn non_rsa_algorithms_are_invalid_input() {
        let key = shared_key();
        let e = key.decrypt(Algorithm::A256Kw, &[0; 256]).unwrap_err();
        assert!(matches!(e, CryptoError::InvalidInput(_)));
        let e = key.encrypt(Algorithm::A128Gcm, b"x").unwrap_err();
        assert!(matches!(e, CryptoError::InvalidInput(_)));
        let e = rsa_encrypt_with_public(key.n(), key.e(), Algorithm::A192Kw, b"x").unwrap_err();
        assert!(matches!(e, CryptoError::InvalidInput(_)));
    }

    #[test]
    fn from_pkcs8_rejects_garbage_and_non_rsa_keys() {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
        let ec = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let ec_der = ec.to_pkcs8v1().unwrap();
        for der in [&b""[..], b"\x30\x03\x02\x01\x00", ec_der.as_ref()] {
            assert!(matches!(RsaPrivateKey::from_pkcs8(der), Err(CryptoError::InvalidKeyMaterial(_))));
        }
        let mut truncated = shared_pkcs8().to_vec();
        truncated.pop();
        assert!(RsaPrivateKey::from_pkcs8(&truncated).is_err());
    }

    #[test]
    fn from_pkcs8_rejects_rsa_sizes_outside_the_supported_set() {
        // 2304 bits: accepted by aws-lc, but not a Key Vault size.
        let odd = rsa::PrivateKey::new(&mut AwsLcRng, 2304).unwrap();
        let der = rsa::pkcs8::EncodePrivateKey::to_pkcs8_der(&odd).unwrap();
        match RsaPrivateKey::from_pkcs8(der.as_bytes()) {
            Err(CryptoError::InvalidKeyMaterial(e @ KeyMaterialError::RsaKeySize { bits: 2304 })) => {
                assert!(e.to_string().contains("2304"))
            }
            other => panic!("expected InvalidKeyMaterial, got {other:?}"),
        }
    }

    #[test]
    fn public_only_encryption_decrypts_with_the_private_key() {
        let key = shared_key();
        let mut padded_n = vec![0u8];
        padded_n.extend_from_slice(key.n());
        for alg in RSA_ALGS {
            let ct = rsa_encrypt_with_public(&padded_n, key.e(), alg, b"dek").unwrap();
            assert_eq!(&key.decrypt(alg, &ct).unwrap()[..], b"dek");
        }
        let e = rsa_encrypt_with_public(&key.n()[..128], key.e(), Algorithm::RsaOaep, b"x");
        assert!(matches!(e, Err(CryptoError::InvalidKeyMaterial(_))));
    }

    #[test]
    fn oaep_interoperates_with_the_rsa_crate_both_ways() {
        let ours = shared_key();
        let theirs = rsa::PrivateKey::from_pkcs8_der(shared_pkcs8()).unwrap();
        let theirs_pub = theirs.to_public_key();
        let msg = b"differential test plaintext";

        let ct = theirs_pub.oaep_encrypt::<sha1::Sha1>(msg).unwrap();
        assert_eq!(&ours.decrypt(Algorithm::RsaOaep, &ct).unwrap()[..], msg);
        let ct = theirs_pub.oaep_encrypt::<sha2::Sha256>(msg).unwrap();
        assert_eq!(&ours.decrypt(Algorithm::RsaOaep256, &ct).unwrap()[..], msg);
        // A SHA-256 ciphertext must not open as SHA-1 OAEP.
        assert!(ours.decrypt(Algorithm::RsaOaep, &ct).is_err());

        let ct = ours.encrypt(Algorithm::RsaOaep, msg).unwrap();
        assert_eq!(theirs.oaep_decrypt::<sha1::Sha1>(&ct).unwrap(), msg);
        let ct = ours.encrypt(Algorithm::RsaOaep256, msg).unwrap();
        assert_eq!(theirs.oaep_decrypt::<sha2::Sha256>(&ct).unwrap(), msg);
    }
}
