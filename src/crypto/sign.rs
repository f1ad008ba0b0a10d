//! Signatures over digests the caller computed (Key Vault's sign and verify): RSASSA-PKCS1-v1_5
//! and RSASSA-PSS (salt as long as the hash) with RSA keys, ECDSA with EC keys on P-256,
//! secp256k1, P-384 and P-521 in Key Vault's fixed-size R||S form; EC key generation, decoding
//! and import; and the conversion between R||S and the DER form other tools use.

use aws_lc_rs::digest::{self, Digest};
use aws_lc_rs::signature::{
    self as sig, EcdsaKeyPair, EcdsaSigningAlgorithm, EcdsaVerificationAlgorithm, KeyPair as _,
    UnparsedPublicKey,
};
use zeroize::Zeroizing;

use super::{CryptoError, InputError, KeyMaterialError, Zbytes, caused_by};
use crate::model::{Curve, SignatureAlgorithm};

/// The hash an algorithm signs with.
fn digest_algorithm(alg: SignatureAlgorithm) -> &'static digest::Algorithm {
    match alg.digest_len() {
        32 => &digest::SHA256,
        48 => &digest::SHA384,
        _ => &digest::SHA512,
    }
}

/// `digest` as the library's digest of `alg`'s hash, or `InvalidInput` for a wrong length.
fn import_digest(alg: SignatureAlgorithm, digest: &[u8]) -> Result<Digest, CryptoError> {
    Digest::import_less_safe(digest, digest_algorithm(alg)).map_err(|_| {
        InputError::DigestLength { alg: alg.name(), len: digest.len(), expected: alg.digest_len() }.into()
    })
}

/// Hashes `data` with the hash of `alg` (the CLI's `--in`, tests).
pub fn hash_for(alg: SignatureAlgorithm, data: &[u8]) -> Vec<u8> {
    digest::digest(digest_algorithm(alg), data).as_ref().to_vec()
}

fn signing_algorithm(curve: Curve) -> &'static EcdsaSigningAlgorithm {
    match curve {
        Curve::P256 => &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
        Curve::P256K => &sig::ECDSA_P256K1_SHA256_FIXED_SIGNING,
        Curve::P384 => &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
        Curve::P521 => &sig::ECDSA_P521_SHA512_FIXED_SIGNING,
    }
}

fn verification_algorithm(curve: Curve) -> &'static EcdsaVerificationAlgorithm {
    match curve {
        Curve::P256 => &sig::ECDSA_P256_SHA256_FIXED,
        Curve::P256K => &sig::ECDSA_P256K1_SHA256_FIXED,
        Curve::P384 => &sig::ECDSA_P384_SHA384_FIXED,
        Curve::P521 => &sig::ECDSA_P521_SHA512_FIXED,
    }
}

fn rsa_signing_encoding(alg: SignatureAlgorithm) -> Option<&'static sig::RsaSignatureEncoding> {
    use SignatureAlgorithm::*;
    Some(match alg {
        Rs256 => &sig::RSA_PKCS1_SHA256,
        Rs384 => &sig::RSA_PKCS1_SHA384,
        Rs512 => &sig::RSA_PKCS1_SHA512,
        Ps256 => &sig::RSA_PSS_SHA256,
        Ps384 => &sig::RSA_PSS_SHA384,
        Ps512 => &sig::RSA_PSS_SHA512,
        _ => return None,
    })
}

fn rsa_verification_parameters(alg: SignatureAlgorithm) -> Option<&'static sig::RsaParameters> {
    use SignatureAlgorithm::*;
    Some(match alg {
        Rs256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Rs384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Rs512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Ps256 => &sig::RSA_PSS_2048_8192_SHA256,
        Ps384 => &sig::RSA_PSS_2048_8192_SHA384,
        Ps512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

/// RSA signature of `digest` with `key_pair` (RS* or PS*; PSS with a salt as long as the hash).
pub(crate) fn rsa_sign_digest(
    key_pair: &sig::RsaKeyPair,
    alg: SignatureAlgorithm,
    digest: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let encoding =
        rsa_signing_encoding(alg).ok_or(InputError::NotSignatureAlgorithmOfKey { alg: alg.name() })?;
    let digest = import_digest(alg, digest)?;
    let mut out = vec![0u8; key_pair.public_modulus_len()];
    key_pair.sign_digest(encoding, &digest, &mut out).map_err(|_| CryptoError::BadSignature)?;
    Ok(out)
}

/// Whether `signature` is `alg`'s RSA signature of `digest` under the public key of `key_pair`.
pub(crate) fn rsa_verify_digest(
    key_pair: &sig::RsaKeyPair,
    alg: SignatureAlgorithm,
    digest: &[u8],
    signature: &[u8],
) -> Result<bool, CryptoError> {
    let params =
        rsa_verification_parameters(alg).ok_or(InputError::NotSignatureAlgorithmOfKey { alg: alg.name() })?;
    let digest = import_digest(alg, digest)?;
    Ok(UnparsedPublicKey::new(params, key_pair.public_key().as_ref())
        .verify_digest(&digest, signature)
        .is_ok())
}

/// Generates an EC key on `curve` and returns it as PKCS#8 DER.
pub fn generate_ec_pkcs8(curve: Curve) -> Result<Zbytes, CryptoError> {
    let pair = EcdsaKeyPair::generate(signing_algorithm(curve)).map_err(|_| CryptoError::KeyGeneration)?;
    let der = pair.to_pkcs8v1().map_err(|_| CryptoError::KeyGeneration)?;
    Ok(Zeroizing::new(der.as_ref().to_vec()))
}

/// A decoded EC private key, decoded once and reused. `Send + Sync`; `Debug` shows the curve only.
pub struct EcPrivateKey {
    pair: EcdsaKeyPair,
    curve: Curve,
}

impl std::fmt::Debug for EcPrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcPrivateKey").field("curve", &self.curve).finish_non_exhaustive()
    }
}

impl EcPrivateKey {
    /// Decodes an unencrypted PKCS#8 DER EC private key on one of the four curves.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, CryptoError> {
        Self::decode_any(|alg| EcdsaKeyPair::from_pkcs8(alg, der))
    }

    /// Decodes an RFC 5915 `ECPrivateKey` (a PEM `EC PRIVATE KEY` body) on one of the four curves.
    pub fn from_sec1_der(der: &[u8]) -> Result<Self, CryptoError> {
        Self::decode_any(|alg| EcdsaKeyPair::from_private_key_der(alg, der))
    }

    /// The key `decode` accepts with the first curve's algorithm that fits, or the refusal of the
    /// first curve (P-256).
    fn decode_any(
        decode: impl Fn(&'static EcdsaSigningAlgorithm) -> Result<EcdsaKeyPair, aws_lc_rs::error::KeyRejected>,
    ) -> Result<Self, CryptoError> {
        let mut first = None;
        for curve in Curve::ALL {
            match decode(signing_algorithm(curve)) {
                Ok(pair) => return Ok(Self { pair, curve }),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(KeyMaterialError::NotEcKey(first.map(Into::into)).into())
    }

    /// A key from its JWK components: the private scalar `d` and the public point (x, y), each
    /// big-endian and at most the curve's coordinate length (shorter values are left-padded). The
    /// point must be the one `d` gives.
    pub fn from_components(curve: Curve, d: &[u8], x: &[u8], y: &[u8]) -> Result<Self, CryptoError> {
        let len = curve.coordinate_len();
        let padded = |member: &'static str, v: &[u8]| -> Result<Zbytes, CryptoError> {
            if v.len() > len {
                return Err(KeyMaterialError::EcMemberLength { member, curve: curve.name() }.into());
            }
            let mut out = Zeroizing::new(vec![0u8; len]);
            out[len - v.len()..].copy_from_slice(v);
            Ok(out)
        };
        let d = padded("d", d)?;
        let mut point = vec![4u8];
        point.extend_from_slice(&padded("x", x)?);
        point.extend_from_slice(&padded("y", y)?);
        let pair = EcdsaKeyPair::from_private_key_and_public_key(signing_algorithm(curve), &d, &point)
            .map_err(caused_by(KeyMaterialError::EcInconsistent))?;
        Ok(Self { pair, curve })
    }

    /// The key as canonical PKCS#8 (v1) DER, for sealing.
    pub fn to_pkcs8(&self) -> Result<Zbytes, CryptoError> {
        let der = self.pair.to_pkcs8v1().map_err(caused_by(KeyMaterialError::EcEncode))?;
        Ok(Zeroizing::new(der.as_ref().to_vec()))
    }

    /// The private scalar, big-endian (tests build private JWKs with it).
    #[cfg(test)]
    pub(crate) fn private_scalar(&self) -> Zbytes {
        use aws_lc_rs::encoding::{AsBigEndian, EcPrivateKeyBin};
        let bin: EcPrivateKeyBin<'_> = self.pair.private_key().as_be_bytes().expect("private scalar"); // ok: #[cfg(test)] only
        Zeroizing::new(bin.as_ref().to_vec())
    }

    /// The curve.
    pub fn curve(&self) -> Curve {
        self.curve
    }

    /// The public point's coordinates (x, y), each the curve's coordinate length.
    pub fn public_xy(&self) -> (Vec<u8>, Vec<u8>) {
        // The public key is the uncompressed point 0x04 || x || y.
        let point = self.pair.public_key().as_ref();
        let len = self.curve.coordinate_len();
        let body = point.get(1..).unwrap_or_default();
        let (x, y) = body.split_at(len.min(body.len()));
        (x.to_vec(), y.to_vec())
    }

    fn check_alg(&self, alg: SignatureAlgorithm) -> Result<(), CryptoError> {
        if alg.curve() == Some(self.curve) {
            Ok(())
        } else {
            Err(InputError::NotSignatureAlgorithmOfKey { alg: alg.name() }.into())
        }
    }

    /// ECDSA signature of `digest` in the fixed-size R||S form (each half the coordinate length).
    pub fn sign_digest(&self, alg: SignatureAlgorithm, digest: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.check_alg(alg)?;
        let digest = import_digest(alg, digest)?;
        let signature = self.pair.sign_digest(&digest).map_err(|_| CryptoError::BadSignature)?;
        Ok(signature.as_ref().to_vec())
    }

    /// Whether `signature` (R||S) is `alg`'s signature of `digest` under this key's public point.
    pub fn verify_digest(
        &self,
        alg: SignatureAlgorithm,
        digest: &[u8],
        signature: &[u8],
    ) -> Result<bool, CryptoError> {
        self.check_alg(alg)?;
        let digest = import_digest(alg, digest)?;
        let public =
            UnparsedPublicKey::new(verification_algorithm(self.curve), self.pair.public_key().as_ref());
        Ok(public.verify_digest(&digest, signature).is_ok())
    }
}

/// Converts an ECDSA signature from Key Vault's R||S form (two halves of equal length) to the
/// DER `SEQUENCE { INTEGER r, INTEGER s }` that OpenSSL and X.509 use.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) || raw.len() > 2 * 66 {
        return Err(InputError::SignatureEncoding.into());
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let mut body = der_integer(r);
    body.extend(der_integer(s));
    let mut out = vec![0x30];
    push_der_len(&mut out, body.len());
    out.extend(body);
    Ok(out)
}

/// Converts a DER ECDSA signature to Key Vault's R||S form for `curve` (each half left-padded to
/// the curve's coordinate length). Anything but exactly one well-formed sequence of two
/// non-negative integers that fit the curve is refused.
pub fn ecdsa_der_to_raw(der: &[u8], curve: Curve) -> Result<Vec<u8>, CryptoError> {
    let bad = || CryptoError::from(InputError::SignatureEncoding);
    let (tag, body, rest) = der_element(der).ok_or_else(bad)?;
    if tag != 0x30 || !rest.is_empty() {
        return Err(bad());
    }
    let len = curve.coordinate_len();
    let mut out = Vec::with_capacity(2 * len);
    let mut body = body;
    for _ in 0..2 {
        let (tag, int, rest) = der_element(body).ok_or_else(bad)?;
        body = rest;
        // A DER INTEGER: non-empty, non-negative here, minimal (a leading zero only before a
        // byte with its top bit set).
        let negative = int.first().is_some_and(|b| b & 0x80 != 0);
        let not_minimal = int.len() > 1 && int[0] == 0 && int[1] & 0x80 == 0;
        if tag != 0x02 || int.is_empty() || negative || not_minimal {
            return Err(bad());
        }
        let first = int.iter().position(|b| *b != 0).unwrap_or(int.len());
        let value = &int[first..];
        if value.len() > len {
            return Err(bad());
        }
        out.extend(std::iter::repeat_n(0u8, len - value.len()));
        out.extend_from_slice(value);
    }
    if !body.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// A DER INTEGER of an unsigned big-endian value.
fn der_integer(value: &[u8]) -> Vec<u8> {
    let first = value.iter().position(|b| *b != 0).unwrap_or(value.len());
    let mut content = value[first..].to_vec();
    if content.first().is_none_or(|b| b & 0x80 != 0) {
        content.insert(0, 0);
    }
    let mut out = vec![0x02];
    push_der_len(&mut out, content.len());
    out.extend(content);
    out
}

fn push_der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8); // ok: below 0x80
    } else {
        // ECDSA signatures stay far below 65,536 bytes: one or two length bytes.
        let bytes = (len as u16).to_be_bytes(); // ok: len <= 2 * 69 + 6 here
        let bytes = if bytes[0] == 0 { &bytes[1..] } else { &bytes[..] };
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
}

/// One DER element: (tag, contents, what follows), or `None` when malformed.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => {
            let (&b, rest) = rest.split_first()?;
            if b < 0x80 {
                return None; // not minimal
            }
            (usize::from(b), rest)
        }
        _ => return None, // longer than any ECDSA signature
    };
    if rest.len() < len {
        return None;
    }
    let (body, after) = rest.split_at(len);
    Some((tag, body, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(curve: Curve) -> EcPrivateKey {
        EcPrivateKey::from_pkcs8(&generate_ec_pkcs8(curve).unwrap()).unwrap()
    }

    #[test]
    fn ec_keys_of_every_curve_sign_digests_in_fixed_size_r_s_form_and_verify() {
        for curve in Curve::ALL {
            let k = key(curve);
            assert_eq!(k.curve(), curve);
            let alg = curve.signature_algorithm();
            let digest = hash_for(alg, b"message");
            let s = k.sign_digest(alg, &digest).unwrap();
            assert_eq!(s.len(), 2 * curve.coordinate_len(), "{curve}");
            assert!(k.verify_digest(alg, &digest, &s).unwrap());
            let mut other = digest.clone();
            other[0] ^= 1;
            assert!(!k.verify_digest(alg, &other, &s).unwrap());
            let (x, y) = k.public_xy();
            assert_eq!((x.len(), y.len()), (curve.coordinate_len(), curve.coordinate_len()));
        }
    }

    #[test]
    fn a_digest_of_the_wrong_length_is_refused_naming_both_lengths() {
        let k = key(Curve::P384);
        let e = k.sign_digest(SignatureAlgorithm::Es384, &[0u8; 32]).unwrap_err();
        assert_eq!(e.to_string(), "invalid input: the digest is 32 bytes long; ES384 needs 48 bytes");
        assert!(k.verify_digest(SignatureAlgorithm::Es384, &[0u8; 64], &[0u8; 96]).is_err());
    }

    #[test]
    fn an_algorithm_of_another_curve_is_refused() {
        let k = key(Curve::P256);
        let digest = [1u8; 32];
        assert!(k.sign_digest(SignatureAlgorithm::Es256K, &digest).is_err());
        assert!(k.sign_digest(SignatureAlgorithm::Rs256, &digest).is_err());
    }

    #[test]
    fn ec_keys_round_trip_through_components_and_sec1() {
        let k = key(Curve::P521);
        let der = k.to_pkcs8().unwrap();
        let again = EcPrivateKey::from_pkcs8(&der).unwrap();
        assert_eq!(again.public_xy(), k.public_xy());
        assert!(EcPrivateKey::from_pkcs8(b"junk").is_err());
        assert!(EcPrivateKey::from_sec1_der(b"junk").is_err());
        let (x, mut y) = k.public_xy();
        y[0] ^= 1;
        assert!(EcPrivateKey::from_components(Curve::P521, &[1u8; 66], &x, &y).is_err());
        assert!(EcPrivateKey::from_components(Curve::P256, &[1u8; 33], &x, &y).is_err());
    }

    #[test]
    fn raw_and_der_signatures_convert_both_ways_for_every_curve() {
        for curve in Curve::ALL {
            let k = key(curve);
            let alg = curve.signature_algorithm();
            let digest = hash_for(alg, b"abc");
            for _ in 0..8 {
                let raw = k.sign_digest(alg, &digest).unwrap();
                let der = ecdsa_raw_to_der(&raw).unwrap();
                assert_eq!(der[0], 0x30);
                assert_eq!(ecdsa_der_to_raw(&der, curve).unwrap(), raw, "{curve}");
            }
        }
    }

    #[test]
    fn der_integers_are_minimal_and_positive() {
        // r = 0x80 needs a leading zero; s = 0x01 with leading zeros in the raw form drops them.
        let mut raw = vec![0u8; 64];
        raw[31] = 0x80;
        raw[63] = 0x01;
        let der = ecdsa_raw_to_der(&raw).unwrap();
        assert_eq!(der, vec![0x30, 0x07, 0x02, 0x02, 0x00, 0x80, 0x02, 0x01, 0x01]);
        assert_eq!(ecdsa_der_to_raw(&der, Curve::P256).unwrap(), raw);
        // P-521 signatures need the long length form.
        let raw = vec![0xffu8; 132];
        let der = ecdsa_raw_to_der(&raw).unwrap();
        assert_eq!(&der[..3], &[0x30, 0x81, 0x8a]);
        assert_eq!(ecdsa_der_to_raw(&der, Curve::P521).unwrap(), raw);
    }

    #[test]
    fn malformed_der_signatures_are_refused() {
        let good = ecdsa_raw_to_der(&[0x11u8; 64]).unwrap();
        let mut trailing = good.clone();
        trailing.push(0);
        let mut negative = good.clone();
        negative[4] = 0x91; // r's first content byte with the top bit set, no leading zero
        for bad in [
            &b""[..],
            &[0x30, 0x00][..],
            &good[..good.len() - 1],
            &trailing[..],
            &[0x31, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01][..],
            &[0x30, 0x07, 0x02, 0x02, 0x00, 0x01, 0x02, 0x01, 0x01][..], // not minimal
            &negative[..],
        ] {
            assert!(ecdsa_der_to_raw(bad, Curve::P256).is_err(), "{bad:02x?}");
        }
        // Too long for the curve.
        assert!(ecdsa_der_to_raw(&ecdsa_raw_to_der(&[0x11u8; 96]).unwrap(), Curve::P256).is_err());
        for bad_raw in [&[][..], &[1u8; 63][..], &[1u8; 134][..]] {
            assert!(ecdsa_raw_to_der(bad_raw).is_err());
        }
    }

    #[test]
    fn digest_lengths_follow_the_algorithms_hash() {
        for alg in SignatureAlgorithm::ALL {
            assert_eq!(hash_for(alg, b"x").len(), alg.digest_len(), "{alg}");
            assert!(alg.check_digest(&vec![0u8; alg.digest_len()]).is_ok());
            assert_eq!(alg.check_digest(&[0u8; 20]).unwrap_err().code(), "BadParameter");
        }
    }
}
