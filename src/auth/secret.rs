//! Shared secrets: service principals' client secrets (shown once, stored only as a hash) and the
//! comparison of presented secrets in constant time.
//!
//! A client secret is 32 bytes of the OS CSPRNG, base64url: far too much entropy to guess, so one
//! SHA-256 (domain-separated) is enough to store it — no slow password hash is needed, and
//! checking a secret costs one hash.

use zeroize::Zeroizing;

use crate::crypto::{random_bytes, sha256_framed};

/// Domain separation of the stored hash (a hash of a client secret is useless as anything else).
const CLIENT_SECRET_DOMAIN: &[u8] = b"tde-broker client secret v1";
/// Random bytes in a new client secret.
const CLIENT_SECRET_BYTES: usize = 32;

/// A new client secret: the secret (shown once) and the hash to store.
pub fn new_client_secret() -> (Zeroizing<String>, String) {
    use base64::Engine as _;
    let raw = Zeroizing::new(random_bytes(CLIENT_SECRET_BYTES));
    let secret = Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.as_slice()));
    let hash = hash_client_secret(&secret);
    (secret, hash)
}

/// The stored form of a client secret: hex of a domain-separated SHA-256.
pub fn hash_client_secret(secret: &str) -> String {
    hex::encode(sha256_framed(&[CLIENT_SECRET_DOMAIN, secret.as_bytes()]))
}

/// Whether `presented` is the secret whose stored hash is `stored_hash`, in time that depends on
/// neither (an undecodable stored hash matches nothing).
pub fn client_secret_matches(presented: &str, stored_hash: &str) -> bool {
    let presented = sha256_framed(&[CLIENT_SECRET_DOMAIN, presented.as_bytes()]);
    let mut stored = [0u8; 32];
    if hex::decode_to_slice(stored_hash, &mut stored).is_err() {
        return false;
    }
    constant_time_eq(&presented, &stored)
}

/// Whether two secrets are equal, in time that depends only on their lengths' hashes, not on
/// where they differ: both are hashed first, so neither a prefix nor the length leaks.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    const DOMAIN: &[u8] = b"tde-broker secret comparison";
    constant_time_eq(&sha256_framed(&[DOMAIN, a]), &sha256_framed(&[DOMAIN, b]))
}

/// Equality of two 32-byte values without an early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_client_secret_matches_its_stored_hash_and_nothing_else() {
        let (secret, hash) = new_client_secret();
        assert_eq!(secret.len(), 43, "32 bytes of base64url without padding");
        assert!(client_secret_matches(&secret, &hash));
        assert!(!client_secret_matches(&format!("{}x", secret.as_str()), &hash));
        assert!(!client_secret_matches("", &hash));
        let (other, other_hash) = new_client_secret();
        assert_ne!(secret.as_str(), other.as_str(), "secrets are random");
        assert!(!client_secret_matches(&secret, &other_hash));
    }

    #[test]
    fn the_stored_hash_does_not_contain_the_secret() {
        let (secret, hash) = new_client_secret();
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains(secret.as_str()));
        assert_eq!(hash, hash_client_secret(&secret), "the hash is deterministic");
    }

    #[test]
    fn a_damaged_stored_hash_matches_nothing() {
        for stored in ["", "zz", &"0".repeat(63), &"g".repeat(64)] {
            assert!(!client_secret_matches("", stored));
            assert!(!client_secret_matches("secret", stored));
        }
    }

    #[test]
    fn secrets_compare_equal_only_when_identical() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"abcd"));
        assert!(!secrets_equal(b"", b"a"));
        assert!(secrets_equal(b"", b""));
    }
}
