//! Sealing key material at rest under the broker's master key.

use super::{CryptoError, InputError, KeyMaterialError, Zbytes, caused_by, fill_random};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

/// Format version byte at the start of every sealed blob.
const VERSION: u8 = 0x01;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + NONCE_LEN;

/// AES-256-GCM under a 32-byte master key; output = version byte 0x01 || 12-byte random
/// nonce || ciphertext || 16-byte tag. `aad` binds the blob to its owner (e.g. the key
/// version URI) so blobs cannot be swapped between rows.
///
/// The master key lives only inside aws-lc's AEAD context (freed with cleansing); `Debug`
/// prints nothing secret. With random 96-bit nonces, keep seals per master key well below 2^32.
pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer {
    /// Creates a sealer from a master key, which must be exactly 32 bytes.
    pub fn new(master_key: &[u8]) -> Result<Self, CryptoError> {
        if master_key.len() != 32 {
            return Err(KeyMaterialError::MasterKeyLength { len: master_key.len() }.into());
        }
        let key = UnboundKey::new(&AES_256_GCM, master_key)
            .map_err(caused_by(KeyMaterialError::UnusableMasterKey))?;
        Ok(Self { key: LessSafeKey::new(key) })
    }

    /// 32 fresh random bytes, suitable for [`Sealer::new`].
    pub fn generate_master_key() -> Zbytes {
        Zeroizing::new(super::random_bytes(32))
    }

    /// Seals `plaintext`, binding it to `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let mut out = Zeroizing::new(Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN));
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[HEADER_LEN..],
            )
            .map_err(caused_by(InputError::SealFailed))?;
        out.extend_from_slice(tag.as_ref());
        Ok(std::mem::take(&mut *out))
    }

    /// Opens a blob made by [`Sealer::seal`] with the same `aad`. Any failure (format,
    /// version, wrong key, wrong aad, tampering) gives [`CryptoError::UnsealFailed`].
    pub fn unseal(&self, aad: &[u8], sealed: &[u8]) -> Result<Zbytes, CryptoError> {
        if sealed.len() < HEADER_LEN + TAG_LEN || sealed[0] != VERSION {
            return Err(CryptoError::UnsealFailed);
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed[1..HEADER_LEN])
            .map_err(|_| CryptoError::UnsealFailed)?;
        let mut buf = Zeroizing::new(sealed[HEADER_LEN..].to_vec());
        let len = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| CryptoError::UnsealFailed)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(&Sealer::generate_master_key()).unwrap()
    }

    #[test]
    fn seal_then_unseal_round_trips_including_empty_plaintext() {
        let s = sealer();
        for pt in [&b""[..], b"pkcs8 der bytes", &[0xAB; 1000]] {
            let blob = s.seal(b"https://vault/keys/k/v1", pt).unwrap();
            assert_eq!(blob.len(), 1 + 12 + pt.len() + 16);
            assert_eq!(blob[0], 0x01);
            assert_eq!(&s.unseal(b"https://vault/keys/k/v1", &blob).unwrap()[..], pt);
        }
    }

    #[test]
    fn sealing_twice_uses_fresh_nonces() {
        let s = sealer();
        assert_ne!(s.seal(b"a", b"same").unwrap(), s.seal(b"a", b"same").unwrap());
    }

    #[test]
    fn wrong_aad_flipped_bytes_wrong_key_and_bad_format_fail_with_unseal_failed() {
        let s = sealer();
        let blob = s.seal(b"row-1", b"secret").unwrap();
        let mut bad = vec![blob[..blob.len() - 1].to_vec(), blob[..12].to_vec(), Vec::new()];
        for i in 0..blob.len() {
            let mut flipped = blob.clone();
            flipped[i] ^= 0x01;
            bad.push(flipped);
        }
        for b in &bad {
            assert!(matches!(s.unseal(b"row-1", b), Err(CryptoError::UnsealFailed)));
        }
        assert!(matches!(s.unseal(b"row-2", &blob), Err(CryptoError::UnsealFailed)));
        assert!(matches!(sealer().unseal(b"row-1", &blob), Err(CryptoError::UnsealFailed)));
    }

    #[test]
    fn master_key_must_be_32_bytes() {
        assert_eq!(Sealer::generate_master_key().len(), 32);
        for len in [0, 16, 31, 33] {
            assert!(matches!(Sealer::new(&vec![0u8; len]), Err(CryptoError::InvalidKeyMaterial(_))));
        }
        assert_eq!(format!("{:?}", sealer()), "Sealer { .. }");
    }
}
