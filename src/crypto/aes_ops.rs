//! AES for oct-HSM keys: RFC 3394 key wrap (A128KW/A192KW/A256KW) and AES-GCM.
//!
//! aws-lc-rs provides AES-128/256 key wrap and AES-128/192/256-GCM; AES-192 key wrap comes
//! from the `aes-kw` crate because aws-lc-rs has no 192-bit key-wrap cipher.

use super::{CryptoError, InputError, KeyMaterialError, LibraryError, Zbytes, caused_by, fill_random};
use aws_lc_rs::aead::{AES_128_GCM, AES_192_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::key_wrap::{AES_128, AES_256, AesKek, KeyWrap};
use zeroize::Zeroizing;

/// AES-GCM IV length in bytes.
pub const GCM_IV_LEN: usize = 12;
/// AES-GCM tag length in bytes.
pub const GCM_TAG_LEN: usize = 16;
/// RFC 3394 integrity-check block length in bytes.
const KW_OVERHEAD: usize = 8;

/// A key of `len` bytes that is not an AES key; `source`: the library's refusal of it.
fn bad_aes_key(len: usize, source: Option<LibraryError>) -> CryptoError {
    KeyMaterialError::AesKeyLength { len, source }.into()
}

/// A library's refusal of `key` as an AES key.
fn aes_key_refused<E: Into<LibraryError>>(key: &[u8]) -> impl FnOnce(E) -> CryptoError + use<E> {
    let len = key.len();
    move |e| bad_aes_key(len, Some(e.into()))
}

/// Generates a random AES key of 128, 192 or 256 bits.
pub fn generate_oct(bits: usize) -> Result<Zbytes, CryptoError> {
    if !matches!(bits, 128 | 192 | 256) {
        return Err(InputError::AesKeySize { bits }.into());
    }
    let mut key = Zeroizing::new(vec![0u8; bits / 8]);
    fill_random(&mut key)?;
    Ok(key)
}

/// RFC 3394 AES key wrap; the key length (16/24/32) selects AES-128/192/256.
/// The input must be at least 16 bytes and a multiple of 8, else `InvalidInput`.
pub fn aes_kw_wrap(key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if plaintext.len() < 16 || !plaintext.len().is_multiple_of(8) {
        return Err(InputError::KeyWrapInputLength { len: plaintext.len() }.into());
    }
    let mut out = vec![0u8; plaintext.len() + KW_OVERHEAD];
    match key.len() {
        16 | 32 => {
            let cipher = if key.len() == 16 { &AES_128 } else { &AES_256 };
            let kek = AesKek::new(cipher, key).map_err(aes_key_refused(key))?;
            kek.wrap(plaintext, &mut out).map_err(caused_by(InputError::KeyWrapFailed))?;
        }
        24 => {
            let kek = aes_kw::KekAes192::try_from(key).map_err(aes_key_refused(key))?;
            kek.wrap(plaintext, &mut out).map_err(caused_by(InputError::KeyWrapFailed))?;
        }
        _ => return Err(bad_aes_key(key.len(), None)),
    }
    Ok(out)
}

/// RFC 3394 AES key unwrap. A bad key length gives `InvalidKeyMaterial`; every other
/// failure (length, integrity check) gives `DecryptionFailed`.
pub fn aes_kw_unwrap(key: &[u8], wrapped: &[u8]) -> Result<Zbytes, CryptoError> {
    if !matches!(key.len(), 16 | 24 | 32) {
        return Err(bad_aes_key(key.len(), None));
    }
    if wrapped.len() < 16 + KW_OVERHEAD || !wrapped.len().is_multiple_of(8) {
        return Err(CryptoError::DecryptionFailed);
    }
    let mut out = Zeroizing::new(vec![0u8; wrapped.len() - KW_OVERHEAD]);
    if key.len() == 24 {
        let kek = aes_kw::KekAes192::try_from(key).map_err(aes_key_refused(key))?;
        kek.unwrap(wrapped, &mut out).map_err(|_| CryptoError::DecryptionFailed)?; // ok: RFC 3394 key unwrap, not Option::unwrap; its error is mapped
    } else {
        let cipher = if key.len() == 16 { &AES_128 } else { &AES_256 };
        let kek = AesKek::new(cipher, key).map_err(aes_key_refused(key))?;
        kek.unwrap(wrapped, &mut out).map_err(|_| CryptoError::DecryptionFailed)?; // ok: RFC 3394 key unwrap, not Option::unwrap; its error is mapped
    }
    Ok(out)
}

/// Result of AES-GCM encryption; the tag is kept separate from the ciphertext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcmOutput {
    /// The 12-byte IV used.
    pub iv: Vec<u8>,
    /// Ciphertext, same length as the plaintext.
    pub ciphertext: Vec<u8>,
    /// The 16-byte authentication tag.
    pub tag: Vec<u8>,
}

fn gcm_key(key: &[u8]) -> Result<LessSafeKey, CryptoError> {
    let alg = match key.len() {
        16 => &AES_128_GCM,
        24 => &AES_192_GCM,
        32 => &AES_256_GCM,
        _ => return Err(bad_aes_key(key.len(), None)),
    };
    let key = UnboundKey::new(alg, key).map_err(aes_key_refused(key))?;
    Ok(LessSafeKey::new(key))
}

fn gcm_nonce(iv: &[u8]) -> Result<Nonce, CryptoError> {
    Nonce::try_assume_unique_for_key(iv).map_err(|_| InputError::GcmIvLength { len: iv.len() }.into())
}

/// AES-GCM encryption (key of 16/24/32 bytes). `iv: None` draws a random 12-byte IV; a
/// given IV must be 12 bytes (`InvalidInput` otherwise) and must never repeat under a key.
pub fn aes_gcm_encrypt(
    key: &[u8],
    iv: Option<&[u8]>,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<GcmOutput, CryptoError> {
    let key = gcm_key(key)?;
    let iv = match iv {
        Some(iv) => iv.to_vec(),
        None => {
            let mut iv = vec![0u8; GCM_IV_LEN];
            fill_random(&mut iv)?;
            iv
        }
    };
    let nonce = gcm_nonce(&iv)?;
    let mut buf = Zeroizing::new(plaintext.to_vec());
    let tag = key
        .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut buf)
        .map_err(caused_by(InputError::GcmEncryptFailed))?;
    Ok(GcmOutput { iv, ciphertext: std::mem::take(&mut *buf), tag: tag.as_ref().to_vec() })
}

/// AES-GCM decryption. A bad key length gives `InvalidKeyMaterial`, a bad IV length
/// `InvalidInput`; every other failure (tag length, authentication) `DecryptionFailed`.
pub fn aes_gcm_decrypt(
    key: &[u8],
    iv: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
) -> Result<Zbytes, CryptoError> {
    let key = gcm_key(key)?;
    let nonce = gcm_nonce(iv)?;
    if tag.len() != GCM_TAG_LEN {
        return Err(CryptoError::DecryptionFailed);
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(ciphertext.len() + GCM_TAG_LEN));
    buf.extend_from_slice(ciphertext);
    buf.extend_from_slice(tag);
    let len =
        key.open_in_place(nonce, Aad::from(aad), &mut buf).map_err(|_| CryptoError::DecryptionFailed)?.len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    const KEK256: &str = "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F";

    #[test]
    fn aes_kw_matches_rfc3394_test_vectors() {
        let data128 = "00112233445566778899AABBCCDDEEFF";
        let data192 = "00112233445566778899AABBCCDDEEFF0001020304050607";
        let data256 = "00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F";
        let vectors = [
            // 4.1: 128-bit KEK, 128-bit data
            (&KEK256[..32], data128, "1FA68B0A8112B447 AEF34BD8FB5A7B82 9D3E862371D2CFE5"),
            // 4.2: 192-bit KEK, 128-bit data
            (&KEK256[..48], data128, "96778B25AE6CA435 F92B5B97C050AED2 468AB8A17AD84E5D"),
            // 4.3: 256-bit KEK, 128-bit data
            (KEK256, data128, "64E8C3F9CE0F5BA2 63E9777905818A2A 93C8191E7D6E8AE7"),
            // 4.4: 192-bit KEK, 192-bit data
            (&KEK256[..48], data192, "031D33264E15D332 68F24EC260743EDC E1C6C7DDEE725A93 6BA814915C6762D2"),
            // 4.6: 256-bit KEK, 256-bit data
            (
                KEK256,
                data256,
                "28C9F404C4B810F4 CBCCB35CFB87F826 3F5786E2D80ED326 \
                 CBC7F0E71A99F43B FB988B9B7A02DD21",
            ),
        ];
        for (kek, data, expected) in vectors {
            let wrapped = aes_kw_wrap(&h(kek), &h(data)).unwrap();
            assert_eq!(wrapped, h(expected), "wrap with {}-bit KEK", kek.len() * 4);
            let unwrapped = aes_kw_unwrap(&h(kek), &wrapped).unwrap();
            assert_eq!(&unwrapped[..], &h(data)[..]);
        }
    }

    #[test]
    fn aes_kw_round_trips_at_every_key_size() {
        for bits in [128, 192, 256] {
            let kek = generate_oct(bits).unwrap();
            let dek = generate_oct(256).unwrap();
            let wrapped = aes_kw_wrap(&kek, &dek).unwrap();
            assert_eq!(wrapped.len(), 40);
            assert_eq!(aes_kw_unwrap(&kek, &wrapped).unwrap(), dek);
        }
    }

    #[test]
    fn aes_kw_unwrap_integrity_failures_are_decryption_failed() {
        for bits in [128, 192, 256] {
            let kek = generate_oct(bits).unwrap();
            let other = generate_oct(bits).unwrap();
            let mut wrapped = aes_kw_wrap(&kek, &[9u8; 24]).unwrap();
            let e = aes_kw_unwrap(&other, &wrapped).unwrap_err();
            assert!(matches!(e, CryptoError::DecryptionFailed), "{bits}");
            wrapped[5] ^= 0x80;
            let e = aes_kw_unwrap(&kek, &wrapped).unwrap_err();
            assert!(matches!(e, CryptoError::DecryptionFailed), "{bits}");
            for len in [0, 16, 31] {
                let e = aes_kw_unwrap(&kek, &wrapped[..len]).unwrap_err();
                assert!(matches!(e, CryptoError::DecryptionFailed), "{bits}/{len}");
            }
        }
    }

    #[test]
    fn aes_kw_rejects_bad_lengths() {
        let kek = [1u8; 16];
        for len in [0, 8, 15, 17, 23] {
            let e = aes_kw_wrap(&kek, &vec![0u8; len]).unwrap_err();
            assert!(matches!(e, CryptoError::InvalidInput(_)), "{len}");
        }
        for klen in [0, 15, 20, 33] {
            let key = vec![1u8; klen];
            assert!(matches!(aes_kw_wrap(&key, &[0u8; 16]), Err(CryptoError::InvalidKeyMaterial(_))));
            assert!(matches!(aes_kw_unwrap(&key, &[0u8; 24]), Err(CryptoError::InvalidKeyMaterial(_))));
        }
    }

    #[test]
    fn generate_oct_gives_requested_sizes_and_rejects_others() {
        for bits in [128, 192, 256] {
            assert_eq!(generate_oct(bits).unwrap().len(), bits / 8);
        }
        assert_ne!(generate_oct(256).unwrap(), generate_oct(256).unwrap());
        for bits in [0, 64, 512] {
            assert!(matches!(generate_oct(bits), Err(CryptoError::InvalidInput(_))));
        }
    }

    #[test]
    fn aes_gcm_matches_nist_test_case_2() {
        let out = aes_gcm_encrypt(&[0u8; 16], Some(&[0u8; 12]), b"", &[0u8; 16]).unwrap();
        assert_eq!(hex::encode(&out.ciphertext), "0388dace60b6a392f328c2b971b2fe78");
        assert_eq!(hex::encode(&out.tag), "ab6e47d42cec13bdf53a67b21257bddf");
        assert_eq!(out.iv, vec![0u8; 12]);
    }

    #[test]
    fn aes_gcm_round_trips_at_every_key_size() {
        for bits in [128, 192, 256] {
            let key = generate_oct(bits).unwrap();
            let out = aes_gcm_encrypt(&key, None, b"aad", b"hello gcm").unwrap();
            assert_eq!((out.iv.len(), out.tag.len()), (GCM_IV_LEN, GCM_TAG_LEN));
            assert_eq!(out.ciphertext.len(), 9);
            let pt = aes_gcm_decrypt(&key, &out.iv, b"aad", &out.ciphertext, &out.tag).unwrap();
            assert_eq!(&pt[..], b"hello gcm");
        }
    }

    #[test]
    fn aes_gcm_tampering_fails_with_decryption_failed() {
        let key = generate_oct(256).unwrap();
        let out = aes_gcm_encrypt(&key, None, b"aad", b"hello gcm").unwrap();
        let mut tag = out.tag.clone();
        tag[0] ^= 1;
        let mut ct = out.ciphertext.clone();
        ct[0] ^= 1;
        let other = generate_oct(256).unwrap();
        let attempts = [
            aes_gcm_decrypt(&key, &out.iv, b"aad", &out.ciphertext, &tag),
            aes_gcm_decrypt(&key, &out.iv, b"aad", &ct, &out.tag),
            aes_gcm_decrypt(&key, &out.iv, b"AAD", &out.ciphertext, &out.tag),
            aes_gcm_decrypt(&other, &out.iv, b"aad", &out.ciphertext, &out.tag),
            aes_gcm_decrypt(&key, &out.iv, b"aad", &out.ciphertext, &out.tag[..12]),
        ];
        for r in attempts {
            assert!(matches!(r, Err(CryptoError::DecryptionFailed)));
        }
    }

    #[test]
    fn aes_gcm_rejects_bad_iv_and_key_lengths() {
        let key = [0u8; 32];
        assert!(matches!(
            aes_gcm_encrypt(&key, Some(&[0u8; 16]), b"", b"x"),
            Err(CryptoError::InvalidInput(_))
        ));
        assert!(matches!(
            aes_gcm_decrypt(&key, &[0u8; 8], b"", b"x", &[0u8; 16]),
            Err(CryptoError::InvalidInput(_))
        ));
        assert!(matches!(
            aes_gcm_encrypt(&[0u8; 20], None, b"", b"x"),
            Err(CryptoError::InvalidKeyMaterial(_))
        ));
    }
}
