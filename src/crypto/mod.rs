//! All cryptography of the broker, behind one small API: RSA and AES encryption and key wrap
//! (`rsa_ops`, `aes_ops`), signatures over digests and EC keys (`sign`), key import (`import`),
//! sealing under the master key (`seal`) and the broker's token signatures (`jwt_sig`).
//!
//! This module is the only place that touches `aws-lc-rs`, `rsa`, `aes-kw` and `aes`.
//! Secret material travels as [`Zbytes`] (zeroized on drop); errors never carry secret
//! bytes, and every decryption failure collapses into [`CryptoError::DecryptionFailed`].
//! Other refusals carry typed detail ([`KeyMaterialError`], [`InputError`]) with the library's
//! error, when there is one, as their source.

pub mod aes_ops;
mod error;
pub mod import;
pub mod jwt_sig;
pub mod rsa_ops;
pub mod seal;
pub mod sign;

pub use aes_ops::{GcmOutput, aes_gcm_decrypt, aes_gcm_encrypt, aes_kw_unwrap, aes_kw_wrap, generate_oct};
use error::caused_by;
pub use error::{CryptoError, InputError, KeyMaterialError, LibraryError};
pub use import::{ImportedKey, import_jwk, import_pem, import_pkcs8_der};
pub use jwt_sig::TokenSigningKey;
pub use rsa_ops::{RsaPrivateKey, generate_rsa_pkcs8, rsa_encrypt_with_public};
pub use seal::Sealer;
pub use sign::{EcPrivateKey, ecdsa_der_to_raw, ecdsa_raw_to_der, generate_ec_pkcs8, hash_for};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// Owned secret bytes, zeroized when dropped.
pub type Zbytes = zeroize::Zeroizing<Vec<u8>>;

/// The algorithms are a domain concept; crypto implements them.
pub use crate::model::Algorithm;

/// Fills a buffer with random bytes, mapping failure to [`CryptoError::KeyGeneration`].
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    SystemRandom::new().fill(buf).map_err(|_| CryptoError::KeyGeneration)
}

/// `n` bytes from the system CSPRNG (aws-lc-rs `SystemRandom`).
///
/// # Panics
/// Only if the operating system's random source fails, which aws-lc itself treats as fatal.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    fill_random(&mut out).expect("system random number generator failed"); // ok: only a broken OS CSPRNG fails here; no input reaches it
    out
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    to_array(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

/// SHA-256 over `parts`, each preceded by its length (8 bytes, big-endian), so that no two
/// different part lists hash the same input. Streams the parts: no joined copy.
pub fn sha256_framed(parts: &[&[u8]]) -> [u8; 32] {
    // Small inputs (the hot path's cache keys) are framed in a stack buffer and hashed in one
    // call: setting up a streaming context costs as much as hashing a few hundred bytes.
    const SMALL: usize = 512;
    let framed_len: usize = parts.iter().map(|p| 8 + p.len()).sum();
    if framed_len <= SMALL {
        let mut buf = [0u8; SMALL];
        let mut at = 0;
        for part in parts {
            buf[at..at + 8].copy_from_slice(&(part.len() as u64).to_be_bytes());
            buf[at + 8..at + 8 + part.len()].copy_from_slice(part);
            at += 8 + part.len();
        }
        return sha256(&buf[..at]);
    }
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in parts {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    to_array(ctx.finish())
}

fn to_array(digest: aws_lc_rs::digest::Digest) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref()); // SHA-256 output is always 32 bytes
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framed_hashes_are_the_hash_of_length_prefixed_parts_whatever_their_size() {
        let framed = |parts: &[&[u8]]| {
            let mut joined = Vec::new();
            for p in parts {
                joined.extend_from_slice(&(p.len() as u64).to_be_bytes());
                joined.extend_from_slice(p);
            }
            sha256(&joined)
        };
        let big = vec![7u8; 600];
        let edge = vec![9u8; 512 - 16];
        for parts in [
            vec![&b"kid"[..], &b"RSA-OAEP-256"[..], &[1u8; 256][..]],
            vec![&edge[..], &b""[..]],  // exactly the stack buffer
            vec![&edge[..], &b"x"[..]], // one byte over
            vec![&big[..]],
            vec![],
        ] {
            assert_eq!(sha256_framed(&parts), framed(&parts), "{} parts", parts.len());
        }
        assert_ne!(sha256_framed(&[b"ab", b"c"]), sha256_framed(&[b"a", b"bc"]));
    }

    #[test]
    fn algorithm_classification_is_consistent() {
        for alg in Algorithm::ALL {
            let kinds = [alg.is_rsa(), alg.is_key_wrap(), alg.is_gcm()];
            assert_eq!(kinds.iter().filter(|k| **k).count(), 1, "{alg}");
            assert_eq!(alg.aes_bits().is_none(), alg.is_rsa(), "{alg}");
        }
        assert_eq!(Algorithm::A192Kw.aes_bits(), Some(192));
        assert_eq!(Algorithm::A256Gcm.aes_bits(), Some(256));
        assert_eq!(Algorithm::A128Kw.aes_bits(), Some(128));
    }

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn random_bytes_has_requested_length_and_varies() {
        assert_eq!(random_bytes(0).len(), 0);
        let a = random_bytes(32);
        let b = random_bytes(32);
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
