//! Importing customer key material: PKCS#8 DER, PEM (PKCS#8 / PKCS#1 / SEC1) and private JWKs.

use super::rsa_ops::RsaPrivateKey;
use super::sign::EcPrivateKey;
use super::{CryptoError, KeyMaterialError as Invalid, Zbytes, caused_by};
use crate::model::Curve;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::PrivateDecryptingKey;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rsa::BoxedUint;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::EncodePrivateKey;
use rsa::traits::PrivateKeyParts;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// What an import yields: PKCS#8 DER of an RSA or EC key, or raw AES key bytes.
pub enum ImportedKey {
    /// Normalized PKCS#8 (v1) DER of a validated RSA private key of a supported size.
    Rsa(Zbytes),
    /// Normalized PKCS#8 (v1) DER of a validated EC private key, and its curve.
    Ec(Curve, Zbytes),
    /// Raw AES key bytes (16, 24 or 32).
    Oct(Zbytes),
}

impl std::fmt::Debug for ImportedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rsa(_) => f.write_str("ImportedKey::Rsa(..)"),
            Self::Ec(curve, _) => write!(f, "ImportedKey::Ec({curve}, ..)"),
            Self::Oct(k) => write!(f, "ImportedKey::Oct({} bytes)", k.len()),
        }
    }
}

/// Validates a PKCS#8 DER RSA private key (2048/3072/4096 bits) or EC private key (P-256,
/// P-256K, P-384, P-521) and returns it re-encoded as canonical PKCS#8 v1 DER. Input that is
/// neither gets the RSA refusal.
pub fn import_pkcs8_der(der: &[u8]) -> Result<ImportedKey, CryptoError> {
    let key = match PrivateDecryptingKey::from_pkcs8(der) {
        Ok(key) => key,
        Err(rsa_refusal) => {
            return match EcPrivateKey::from_pkcs8(der) {
                Ok(ec) => ec_imported(&ec),
                Err(_) => Err(Invalid::NotPkcs8Rsa(rsa_refusal.into()).into()),
            };
        }
    };
    RsaPrivateKey::from_key(key.clone())?; // size and usability checks
    let canonical = key.as_der().map_err(caused_by(Invalid::Reencode))?;
    Ok(ImportedKey::Rsa(Zeroizing::new(canonical.as_ref().to_vec())))
}

fn ec_imported(key: &EcPrivateKey) -> Result<ImportedKey, CryptoError> {
    Ok(ImportedKey::Ec(key.curve(), key.to_pkcs8()?))
}

/// PEM: `-----BEGIN PRIVATE KEY-----` (PKCS#8), `-----BEGIN RSA PRIVATE KEY-----` (PKCS#1,
/// converted to PKCS#8) or `-----BEGIN EC PRIVATE KEY-----` (SEC1, converted to PKCS#8). Text around the first PEM block and `\r\n`/whitespace inside it are
/// tolerated; encrypted PEM is rejected with a clear message.
pub fn import_pem(pem: &str) -> Result<ImportedKey, CryptoError> {
    const BEGIN: &str = "-----BEGIN ";
    const DASHES: &str = "-----";
    let start = pem.find(BEGIN).ok_or(Invalid::NoPemBlock)?;
    let rest = &pem[start + BEGIN.len()..];
    let label_end = rest.find(DASHES).ok_or(Invalid::MalformedPemHeader)?;
    let label = &rest[..label_end];
    let body_and_tail = &rest[label_end + DASHES.len()..];
    let end_marker = format!("-----END {label}-----");
    let body_end = body_and_tail.find(&end_marker).ok_or(Invalid::PemEndMismatch)?;
    let body = &body_and_tail[..body_end];

    match label {
        "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY" => {}
        "ENCRYPTED PRIVATE KEY" => return Err(Invalid::EncryptedPem.into()),
        _ => return Err(Invalid::UnsupportedPemType.into()),
    }
    if body.contains("Proc-Type:") || body.contains("DEK-Info:") {
        return Err(Invalid::EncryptedPem.into());
    }
    let b64: Zeroizing<String> = Zeroizing::new(body.chars().filter(|c| !c.is_ascii_whitespace()).collect());
    // The decoder's error quotes a symbol of the body: it is dropped, not kept as a cause.
    let der = Zeroizing::new(STANDARD.decode(b64.as_bytes()).map_err(|_| Invalid::PemBase64)?);
    if label == "PRIVATE KEY" {
        return import_pkcs8_der(&der);
    }
    if label == "EC PRIVATE KEY" {
        return ec_imported(&EcPrivateKey::from_sec1_der(&der)?);
    }
    let key = rsa::PrivateKey::from_pkcs1_der(&der).map_err(caused_by(Invalid::NotPkcs1Rsa))?;
    let pkcs8 = key.to_pkcs8_der().map_err(caused_by(Invalid::Pkcs1ToPkcs8))?;
    import_pkcs8_der(pkcs8.as_bytes())
}

/// The JWK members we read. Unknown members (kid, key_ops, ...) are ignored.
#[derive(serde::Deserialize, Zeroize, ZeroizeOnDrop)]
struct Jwk {
    kty: Option<String>,
    n: Option<String>,
    e: Option<String>,
    d: Option<String>,
    p: Option<String>,
    q: Option<String>,
    dp: Option<String>,
    dq: Option<String>,
    qi: Option<String>,
    k: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Decodes a base64url JWK member (padding tolerated). Never echoes the value: the decoder's
/// error, which quotes a symbol of it, is dropped.
fn b64url(member: &'static str, value: Option<&String>) -> Result<Zbytes, CryptoError> {
    let value = value.ok_or(Invalid::JwkMemberMissing { member })?;
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map(Zeroizing::new)
        .map_err(|_| Invalid::JwkMemberNotBase64url { member }.into())
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

/// Big integer of at most `bits` precision from big-endian bytes.
fn uint(member: &'static str, bytes: &[u8], bits: u32) -> Result<BoxedUint, CryptoError> {
    BoxedUint::from_be_slice(strip_zeros(bytes), bits)
        .map_err(|e| Invalid::JwkMemberTooLarge { member, source: rsa::Error::from(e).into() }.into())
}

/// Checks an optional CRT member (dp, dq, qi) against the value derived from the key.
fn check_crt(
    member: &'static str,
    given: Option<&String>,
    derived: Option<&BoxedUint>,
) -> Result<(), CryptoError> {
    if given.is_none() {
        return Ok(());
    }
    let given = b64url(member, given)?;
    let derived = derived.ok_or(Invalid::CrtUnavailable)?;
    let derived = Zeroizing::new(derived.to_be_bytes());
    if strip_zeros(&given) != strip_zeros(&derived) {
        return Err(Invalid::JwkMemberInconsistent { member }.into());
    }
    Ok(())
}

fn import_rsa_jwk(jwk: &Jwk) -> Result<ImportedKey, CryptoError> {
    let n = b64url("n", jwk.n.as_ref())?;
    let e = b64url("e", jwk.e.as_ref())?;
    let d = b64url("d", jwk.d.as_ref())?;
    let p = b64url("p", jwk.p.as_ref())?;
    let q = b64url("q", jwk.q.as_ref())?;
    let (n, e) = (strip_zeros(&n), strip_zeros(&e));
    // Bound sizes before any big-number work; the exact size is checked on the PKCS#8 below.
    if !(256..=512).contains(&n.len()) {
        return Err(Invalid::JwkModulusSize.into());
    }
    if !(1..=8).contains(&e.len()) {
        return Err(Invalid::JwkExponentRange.into());
    }
    let bits = (n.len() * 8) as u32; // ok: n.len() <= 512 was checked above
    let e_bits = (e.len() * 8) as u32; // ok: e.len() <= 8 was checked above
    // from_components runs validate() (d*e = 1 mod lambda(n), p*q = n) and precompute().
    let key = rsa::PrivateKey::from_components(
        uint("n", n, bits)?,
        uint("e", e, e_bits)?,
        uint("d", &d, bits)?,
        vec![uint("p", &p, bits)?, uint("q", &q, bits)?],
    )
    .map_err(caused_by(Invalid::JwkInconsistent))?;
    check_crt("dp", jwk.dp.as_ref(), key.dp())?;
    check_crt("dq", jwk.dq.as_ref(), key.dq())?;
    let qi = key.crt_coefficient().map(Zeroizing::new);
    check_crt("qi", jwk.qi.as_ref(), qi.as_deref())?;
    let der = key.to_pkcs8_der().map_err(caused_by(Invalid::Pkcs8Encode))?;
    import_pkcs8_der(der.as_bytes())
}

fn import_ec_jwk(jwk: &Jwk) -> Result<ImportedKey, CryptoError> {
    let curve = jwk
        .crv
        .as_deref()
        .and_then(|c| Curve::ALL.into_iter().find(|k| k.name() == c))
        .ok_or(Invalid::EcCurve)?;
    let d = b64url("d", jwk.d.as_ref())?;
    let x = b64url("x", jwk.x.as_ref())?;
    let y = b64url("y", jwk.y.as_ref())?;
    ec_imported(&EcPrivateKey::from_components(curve, &d, &x, &y)?)
}

/// A private JWK as JSON text. `{"kty":"RSA"|"RSA-HSM","n","e","d","p","q",(dp,dq,qi)}`
/// (base64url, padding tolerated) is checked for consistency and returned as PKCS#8 DER;
/// `{"kty":"EC"|"EC-HSM","crv","x","y","d"}` likewise (the point must be d's);
/// `{"kty":"oct"|"oct-HSM","k"}` gives the raw 16/24/32-byte key. Anything else is
/// `InvalidKeyMaterial`; messages never echo member values.
pub fn import_jwk(json: &str) -> Result<ImportedKey, CryptoError> {
    // The JSON error can quote a member's value: only where it stopped is kept.
    let jwk: Jwk =
        serde_json::from_str(json).map_err(|e| Invalid::JwkJson { line: e.line(), column: e.column() })?;
    match jwk.kty.as_deref() {
        Some("RSA" | "RSA-HSM") => import_rsa_jwk(&jwk),
        Some("oct" | "oct-HSM") => {
            let k = b64url("k", jwk.k.as_ref())?;
            if !matches!(k.len(), 16 | 24 | 32) {
                return Err(Invalid::OctKeyLength { len: k.len() }.into());
            }
            Ok(ImportedKey::Oct(k))
        }
        Some("EC" | "EC-HSM") => import_ec_jwk(&jwk),
        Some(_) => Err(Invalid::UnsupportedKty.into()),
        None => Err(Invalid::JwkMemberMissing { member: "kty" }.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::rsa_ops::tests::shared_pkcs8;
    use super::super::{Algorithm, LibraryError, rsa_encrypt_with_public};
    use super::*;
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::PublicKeyParts;

    fn pem(label: &str, der: &[u8], line_end: &str) -> String {
        let b64 = STANDARD.encode(der);
        let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        format!(
            "-----BEGIN {label}-----{line_end}{}{line_end}-----END {label}-----{line_end}",
            lines.join(line_end)
        )
    }

    fn rsa_der(imported: ImportedKey) -> Zbytes {
        match imported {
            ImportedKey::Rsa(der) => der,
            other => panic!("expected RSA, got {other:?}"),
        }
    }

    fn n_of(imported: ImportedKey) -> Vec<u8> {
        RsaPrivateKey::from_pkcs8(&rsa_der(imported)).unwrap().n().to_vec()
    }

    fn b64u(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The shared key as a private JWK, with or without CRT members.
    fn rsa_jwk(kty: &str, with_crt: bool) -> String {
        let key = rsa::PrivateKey::from_pkcs8_der(shared_pkcs8()).unwrap();
        let p = key.primes()[0].to_be_bytes();
        let q = key.primes()[1].to_be_bytes();
        let mut jwk = serde_json::json!({
            "kty": kty, "kid": "ignored", "key_ops": ["unwrapKey"],
            "n": b64u(&key.n_bytes()), "e": b64u(&key.e_bytes()),
            "d": b64u(&key.d().to_be_bytes()), "p": b64u(&p), "q": b64u(&q),
        });
        if with_crt {
            jwk["dp"] = b64u(&key.dp().unwrap().to_be_bytes()).into();
            jwk["dq"] = b64u(&key.dq().unwrap().to_be_bytes()).into();
            jwk["qi"] = b64u(&key.crt_coefficient().unwrap().to_be_bytes()).into();
        }
        jwk.to_string()
    }

    #[test]
    fn pkcs8_der_import_validates_and_keeps_the_key() {
        let n = n_of(import_pkcs8_der(shared_pkcs8()).unwrap());
        assert_eq!(n, RsaPrivateKey::from_pkcs8(shared_pkcs8()).unwrap().n());
        assert!(matches!(import_pkcs8_der(b"not der"), Err(CryptoError::InvalidKeyMaterial(_))));
    }

    /// The message of `e` and of every error behind it, as a log line walking the chain shows.
    fn chain_text(e: &CryptoError) -> String {
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            text = format!("{text}: {c}");
            cause = c.source();
        }
        text
    }

    #[test]
    fn refusals_keep_the_library_error_as_their_cause() {
        let e = import_pkcs8_der(b"not der").unwrap_err();
        assert!(matches!(
            e,
            CryptoError::InvalidKeyMaterial(Invalid::NotPkcs8Rsa(LibraryError::KeyRejected(_)))
        ));
        assert!(std::error::Error::source(&e).is_some(), "{e:?}");
        let pem = pem("RSA PRIVATE KEY", b"not a key", "\n");
        let e = import_pem(&pem).unwrap_err();
        assert!(matches!(e, CryptoError::InvalidKeyMaterial(Invalid::NotPkcs1Rsa(LibraryError::Pkcs1(_)))));
        assert!(chain_text(&e).starts_with("invalid key material: not a valid PKCS#1 RSA private key: "));
    }

    #[test]
    fn pem_pkcs1_and_pkcs8_import_produce_the_same_key() {
        let pkcs1 = rsa::PrivateKey::from_pkcs8_der(shared_pkcs8()).unwrap().to_pkcs1_der().unwrap();
        let from_pkcs8 = n_of(import_pem(&pem("PRIVATE KEY", shared_pkcs8(), "\n")).unwrap());
        let from_pkcs1 = n_of(import_pem(&pem("RSA PRIVATE KEY", pkcs1.as_bytes(), "\r\n")).unwrap());
        assert_eq!(from_pkcs8, from_pkcs1);
        assert_eq!(from_pkcs8.len(), 256);
    }

    #[test]
    fn pem_import_tolerates_surrounding_text_and_odd_whitespace() {
        let text = pem("PRIVATE KEY", shared_pkcs8(), "\r\n").replace("\r\n", " \r\n\t");
        let text = format!("Bag Attributes\n  friendlyName: x\n{text}\ntrailing");
        assert!(import_pem(&text).is_ok());
    }

    #[test]
    fn pem_import_rejects_encrypted_unsupported_and_malformed_input() {
        let encrypted = pem("ENCRYPTED PRIVATE KEY", b"whatever", "\n");
        let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
                      DEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        for input in [&encrypted[..], legacy] {
            match import_pem(input) {
                Err(CryptoError::InvalidKeyMaterial(m)) => {
                    assert!(matches!(m, Invalid::EncryptedPem));
                    assert!(m.to_string().contains("encrypted"));
                }
                other => panic!("expected rejection, got {other:?}"),
            }
        }
        let mismatched = pem("PRIVATE KEY", shared_pkcs8(), "\n").replace("END PRIVATE", "END RSA");
        for input in [
            "",
            "no pem here",
            &pem("PUBLIC KEY", b"abc", "\n"),
            &pem("PRIVATE KEY", b"not a key", "\n"),
            "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----",
            &mismatched,
        ] {
            assert!(matches!(import_pem(input), Err(CryptoError::InvalidKeyMaterial(_))), "{input:?}");
        }
    }

    #[test]
    fn rsa_jwk_import_round_trips_with_public_encryption() {
        let ours = RsaPrivateKey::from_pkcs8(shared_pkcs8()).unwrap();
        for (kty, crt) in [("RSA", true), ("RSA-HSM", false)] {
            let imported =
                RsaPrivateKey::from_pkcs8(&rsa_der(import_jwk(&rsa_jwk(kty, crt)).unwrap())).unwrap();
            assert_eq!(imported.n(), ours.n());
            let ct = rsa_encrypt_with_public(ours.n(), ours.e(), Algorithm::RsaOaep256, b"dek").unwrap();
            assert_eq!(&imported.decrypt(Algorithm::RsaOaep256, &ct).unwrap()[..], b"dek");
        }
    }

    #[test]
    fn rsa_jwk_with_padded_base64url_is_accepted() {
        let mut jwk: serde_json::Value = serde_json::from_str(&rsa_jwk("RSA", false)).unwrap();
        let e = jwk["e"].as_str().unwrap().to_string();
        jwk["e"] = format!("{e}=").into(); // "AQAB" + "=" is over-padded but tolerated
        assert!(import_jwk(&jwk.to_string()).is_ok());
    }

    #[test]
    fn inconsistent_or_incomplete_rsa_jwk_is_rejected_without_echoing_secrets() {
        let good: serde_json::Value = serde_json::from_str(&rsa_jwk("RSA", true)).unwrap();
        let d_value = good["d"].as_str().unwrap().to_string();
        let mut cases = Vec::new();
        for (field, value) in [
            ("d", b64u(&[0x55; 256])),
            ("dp", b64u(&[0x55; 128])),
            ("qi", b64u(&[1])),
            ("p", "***".to_string()),
            ("n", b64u(&[0xFF; 128])),
        ] {
            let mut j = good.clone();
            j[field] = value.into();
            cases.push(j);
        }
        let mut missing_q = good.clone();
        missing_q.as_object_mut().unwrap().remove("q");
        cases.push(missing_q);
        for case in cases {
            match import_jwk(&case.to_string()) {
                Err(e @ CryptoError::InvalidKeyMaterial(_)) => {
                    assert!(!chain_text(&e).contains(&d_value[..16]))
                }
                other => panic!("expected InvalidKeyMaterial, got {other:?}"),
            }
        }
    }

    #[test]
    fn oct_jwk_import_accepts_aes_sizes_only() {
        for len in [16, 24, 32] {
            for kty in ["oct", "oct-HSM"] {
                let json = format!(r#"{{"kty":"{kty}","k":"{}"}}"#, b64u(&vec![7u8; len]));
                match import_jwk(&json).unwrap() {
                    ImportedKey::Oct(k) => assert_eq!(&k[..], &vec![7u8; len][..]),
                    other => panic!("expected oct, got {other:?}"),
                }
            }
        }
        let json = format!(r#"{{"kty":"oct","k":"{}"}}"#, b64u(&[7u8; 20]));
        assert!(matches!(import_jwk(&json), Err(CryptoError::InvalidKeyMaterial(_))));
    }

    #[test]
    fn unsupported_or_malformed_jwk_is_invalid_key_material() {
        for json in [
            "",
            "[]",
            "{",
            r#"{"k":"AAAA"}"#,
            r#"{"kty":"EC","crv":"P-256"}"#,
            r#"{"kty":"EC","crv":"P-257","d":"AA","x":"AA","y":"AA"}"#,
            r#"{"kty":"rsa"}"#,
            r#"{"kty":"oct"}"#,
            r#"{"kty":"oct","k":12345678901234567890}"#,
        ] {
            match import_jwk(json) {
                Err(e @ CryptoError::InvalidKeyMaterial(_)) => {
                    let text = chain_text(&e);
                    assert!(!text.contains("12345678901234567890"), "{text}")
                }
                other => panic!("{json}: expected InvalidKeyMaterial, got {other:?}"),
            }
        }
    }

    #[test]
    fn ec_keys_import_from_pkcs8_sec1_pem_and_jwk_alike() {
        use super::super::sign::generate_ec_pkcs8;
        for curve in Curve::ALL {
            let der = generate_ec_pkcs8(curve).unwrap();
            let key = EcPrivateKey::from_pkcs8(&der).unwrap();
            let (x, y) = key.public_xy();
            let ec = |imported: ImportedKey| match imported {
                ImportedKey::Ec(c, der) => (c, EcPrivateKey::from_pkcs8(&der).unwrap().public_xy()),
                other => panic!("expected EC, got {other:?}"),
            };
            assert_eq!(ec(import_pkcs8_der(&der).unwrap()), (curve, (x.clone(), y.clone())));
            assert_eq!(ec(import_pem(&pem("PRIVATE KEY", &der, "\n")).unwrap()).1, (x.clone(), y.clone()));
            // A private JWK with the key's own scalar imports; another scalar with the same point does not.
            let jwk_of = |d: &[u8]| {
                serde_json::json!({"kty": "EC", "crv": curve.name(), "x": b64u(&x), "y": b64u(&y), "d": b64u(d)})
                    .to_string()
            };
            assert_eq!(
                ec(import_jwk(&jwk_of(&key.private_scalar())).unwrap()),
                (curve, (x.clone(), y.clone()))
            );
            assert!(matches!(import_jwk(&jwk_of(&[1u8])), Err(CryptoError::InvalidKeyMaterial(_))));
        }
    }
}
