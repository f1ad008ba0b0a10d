//! The fuzz targets' assertions, shared by `tests/fuzz.rs` (proptest, on stable, in `cargo test`)
//! and the cargo-fuzz targets under `fuzz/` (libFuzzer, coverage-guided, on nightly).
//!
//! Each `check_*` takes one input, runs the parser under the counting allocator and panics when
//! the parser panics, answers with an error of the wrong class, accepts what it must refuse (or
//! refuses what it must accept), or makes one allocation larger than [`alloc_bound`].
#![allow(dead_code)] // each cargo-fuzz target uses a few of these

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use tde_broker::auth::jwt::{self, Claims};
use tde_broker::crypto::{self, Algorithm, CryptoError, ImportedKey, RsaPrivateKey, Sealer, TokenSigningKey};
use tde_broker::model::BrokerError;
use tde_broker::model::ids::{self, KeyId, KeyIdRef};

use crate::alloc;

/// The vault DNS suffix the key-identifier targets parse against.
pub const SUFFIX: &str = "vault.azure.net";
/// The `kid` of the tokens the JWT target signs.
pub const KID: &str = "fuzz-kid";

/// The largest single allocation a parser may make for an input of `input_len` bytes:
/// 1 MiB plus 8 bytes per input byte. A length field believed before the bytes it announces
/// arrive (a DER or gRPC length of 2 GiB in a 20-byte input) breaks it.
pub fn alloc_bound(input_len: usize) -> usize {
    (1 << 20) + 8 * input_len
}

/// Runs `f` and asserts the allocation bound for an input of `input_len` bytes.
pub fn bounded<T>(what: &str, input_len: usize, f: impl FnOnce() -> T) -> T {
    let (out, largest) = alloc::measure(f);
    assert!(
        largest <= alloc_bound(input_len),
        "{what}: one allocation of {largest} bytes for an input of {input_len} bytes (bound {})",
        alloc_bound(input_len)
    );
    out
}

/// The longest text an error about a caller's identifier may have: `ids::printable` keeps 200
/// characters, each escaped to at most 10 bytes (`\u{10ffff}`), plus the fixed wording.
const MAX_ID_ERROR_BYTES: usize = 200 * 10 + 512;

fn assert_bad_parameter(what: &str, e: &BrokerError) {
    assert!(matches!(e, BrokerError::BadParameter { .. }), "{what}: expected BadParameter, got {e:?}");
    assert_eq!(e.code(), "BadParameter");
    let text = e.to_string();
    assert!(text.len() <= MAX_ID_ERROR_BYTES, "{what}: an error text of {} bytes", text.len());
    assert!(!text.contains('\n') && !text.contains('\u{0}'), "{what}: control characters echoed: {text:?}");
}

// ---- Identifiers --------------------------------------------------------------------------

/// `vault_name`, `key_name`, `key_version` on one string: an accepted name follows the cloud's
/// rule (and a vault name comes back lower-cased and stays accepted); a refused one is
/// `BadParameter` with a bounded, escaped text.
pub fn check_names(s: &str) {
    bounded("names", s.len(), || {
        match ids::vault_name(s) {
            Ok(v) => {
                assert!((3..=24).contains(&v.len()), "{s:?} → {v:?}");
                assert_eq!(v, s.to_ascii_lowercase());
                assert!(v.starts_with(|c: char| c.is_ascii_lowercase()), "{v:?}");
                assert!(!v.contains("--") && !v.ends_with('-'), "{v:?}");
                assert_eq!(ids::vault_name(&v).as_deref(), Ok(v.as_str()), "lower-cased name accepted");
            }
            Err(e) => assert_bad_parameter("vault_name", &e),
        }
        match ids::key_name(s) {
            Ok(n) => {
                assert_eq!(n, s);
                assert!(
                    (1..=127).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                );
            }
            Err(e) => assert_bad_parameter("key_name", &e),
        }
        match ids::key_version(s) {
            Ok(v) => {
                assert!(v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
            }
            Err(e) => assert_bad_parameter("key_version", &e),
        }
    });
}

/// `KeyId::parse` and `KeyIdRef::parse` agree; an accepted URI's parts pass their own
/// validators and rebuild (with `ids::key_uri`) into a URI that parses to the same id; a
/// refused one is `BadParameter`.
pub fn check_key_id(uri: &str) {
    bounded("key id", uri.len(), || {
        let owned = KeyId::parse(uri, SUFFIX);
        let borrowed = KeyIdRef::parse(uri, SUFFIX);
        match (owned, borrowed) {
            (Ok(id), Ok(r)) => {
                assert_eq!(
                    (id.vault.as_str(), id.name.as_str(), id.version.as_deref()),
                    (&*r.vault, r.name, r.version)
                );
                assert_eq!(ids::vault_name(&id.vault).as_deref(), Ok(id.vault.as_str()));
                assert!(ids::key_name(&id.name).is_ok());
                if let Some(v) = &id.version {
                    assert!(ids::key_version(v).is_ok());
                }
                let rebuilt = ids::key_uri(&id.vault, SUFFIX, &id.name, id.version.as_deref());
                assert_eq!(
                    KeyId::parse(&rebuilt, SUFFIX).as_ref(),
                    Ok(&id),
                    "{uri:?} rebuilt as {rebuilt:?}"
                );
            }
            (Err(a), Err(b)) => {
                assert_bad_parameter("KeyId::parse", &a);
                assert_eq!(a.to_string(), b.to_string());
            }
            (a, b) => panic!("KeyId and KeyIdRef disagree on {uri:?}: {a:?} / {b:?}"),
        }
    });
}

// ---- Tokens -------------------------------------------------------------------------------

/// A signing key and a valid token signed with it.
pub struct JwtFixture {
    /// The key.
    pub key: TokenSigningKey,
    /// A token `jwt::encode` made with `key` and [`KID`].
    pub token: String,
}

impl JwtFixture {
    /// A fresh key and token.
    pub fn new() -> Self {
        let (key, _) = TokenSigningKey::generate().expect("a signing key");
        let claims = Claims {
            iss: "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/".into(),
            aud: jwt::Audience::from_list(&["https://vault.azure.net"]),
            sub: "oid".into(),
            oid: "oid".into(),
            tid: "tid".into(),
            appid: "app".into(),
            idtyp: "user".into(),
            name: Some("fuzz".into()),
            xms_mirid: None,
            wall_clock: false,
            iat: 1,
            nbf: 1,
            exp: 2,
        };
        let token = jwt::encode(&claims, KID, &key).expect("a token");
        JwtFixture { key, token }
    }

    /// A token with this header and these claims (any JSON text), correctly signed: what a
    /// holder of the key could send.
    pub fn sign(&self, header: &[u8], claims: &[u8]) -> String {
        let input = format!("{}.{}", B64URL.encode(header), B64URL.encode(claims));
        let sig = self.key.sign(input.as_bytes()).expect("a signature");
        format!("{input}.{}", B64URL.encode(sig))
    }
}

impl Default for JwtFixture {
    fn default() -> Self {
        Self::new()
    }
}

fn assert_invalid_token(e: &BrokerError) {
    match e {
        BrokerError::InvalidToken { reason } => assert!(reason.starts_with("IDX"), "{reason}"),
        other => panic!("expected InvalidToken, got {other:?}"),
    }
    assert_eq!(e.code(), "Unauthorized");
}

/// `jwt::decode` of any text: only a token this key signed is accepted (so a changed token is
/// refused), and a refusal is `InvalidToken` with an IDX reason.
pub fn check_jwt(fx: &JwtFixture, token: &str) {
    bounded("jwt", token.len(), || match jwt::decode(token, KID, &fx.key) {
        Ok(claims) => {
            assert_eq!(token, fx.token, "a token the key did not sign was accepted");
            assert_eq!(claims.oid, "oid");
        }
        Err(e) => {
            assert_ne!(token, fx.token, "the valid token was refused: {e:?}");
            assert_invalid_token(&e);
        }
    });
}

/// The header `jwt::encode` writes.
pub fn good_header() -> Vec<u8> {
    format!(r#"{{"alg":"RS256","typ":"JWT","kid":"{KID}"}}"#).into_bytes()
}

/// `jwt::decode` of a correctly signed token whose header and claims are any bytes: accepted
/// only when the header names RS256 and [`KID`] and the claims are `Claims`; with the
/// canonical header and `Claims`, accepted.
pub fn check_signed_jwt(fx: &JwtFixture, header: &[u8], claims: &[u8]) {
    let token = fx.sign(header, claims);
    bounded("signed jwt", token.len(), || {
        let header_ok = serde_json::from_slice::<serde_json::Value>(header)
            .is_ok_and(|h| h["alg"] == "RS256" && h["kid"] == KID && h["typ"].is_string());
        let claims_ok = serde_json::from_slice::<Claims>(claims).is_ok();
        let surely_good = header == good_header().as_slice() && claims_ok && token.len() <= 16 * 1024;
        match jwt::decode(&token, KID, &fx.key) {
            Ok(_) => assert!(
                header_ok && claims_ok,
                "accepted: {:?} / {:?}",
                String::from_utf8_lossy(header),
                String::from_utf8_lossy(claims)
            ),
            Err(e) => {
                assert_invalid_token(&e);
                assert!(!surely_good, "refused a well-formed signed token: {e:?}");
            }
        }
    });
}

// ---- Key import ---------------------------------------------------------------------------

fn assert_invalid_key_material(what: &str, e: &CryptoError) {
    assert!(
        matches!(e, CryptoError::InvalidKeyMaterial(_)),
        "{what}: expected InvalidKeyMaterial, got {e:?}"
    );
    assert!(e.to_string().starts_with("invalid key material: "), "{e}");
}

/// An accepted RSA or EC import is canonical PKCS#8 (of a supported size, or on its curve) that
/// imports again to the same bytes; an accepted oct key is 16, 24 or 32 bytes.
fn assert_imported(what: &str, key: &ImportedKey) {
    match key {
        ImportedKey::Rsa(der) => {
            let rsa = RsaPrivateKey::from_pkcs8(der)
                .unwrap_or_else(|e| panic!("{what}: accepted DER does not decode: {e}"));
            assert!(matches!(rsa.bits(), 2048 | 3072 | 4096), "{what}: {} bits", rsa.bits());
            match crypto::import_pkcs8_der(der) {
                Ok(ImportedKey::Rsa(again)) => assert_eq!(&again[..], &der[..], "{what}: not canonical"),
                other => panic!("{what}: the canonical DER does not import again: {other:?}"),
            }
        }
        ImportedKey::Ec(curve, der) => {
            let ec = crypto::EcPrivateKey::from_pkcs8(der)
                .unwrap_or_else(|e| panic!("{what}: accepted EC DER does not decode: {e}"));
            assert_eq!(ec.curve(), *curve, "{what}: curve");
            match crypto::import_pkcs8_der(der) {
                Ok(ImportedKey::Ec(_, again)) => assert_eq!(&again[..], &der[..], "{what}: not canonical"),
                other => panic!("{what}: the canonical EC DER does not import again: {other:?}"),
            }
        }
        ImportedKey::Oct(k) => {
            assert!(matches!(k.len(), 16 | 24 | 32), "{what}: oct key of {} bytes", k.len())
        }
    }
}

/// `import_pkcs8_der` of any bytes: canonical key or `InvalidKeyMaterial`.
pub fn check_pkcs8(der: &[u8]) {
    match bounded("pkcs8", der.len(), || crypto::import_pkcs8_der(der)) {
        Ok(key) => assert_imported("pkcs8", &key),
        Err(e) => assert_invalid_key_material("pkcs8", &e),
    }
}

/// `import_pem` of any text: canonical key or `InvalidKeyMaterial`.
pub fn check_pem(pem: &str) {
    match bounded("pem", pem.len(), || crypto::import_pem(pem)) {
        Ok(key) => assert_imported("pem", &key),
        Err(e) => assert_invalid_key_material("pem", &e),
    }
}

/// `import_jwk` of any text: a key, or `InvalidKeyMaterial` whose text (with its causes) quotes
/// none of the secret members it was given.
pub fn check_jwk(json: &str) {
    match bounded("jwk", json.len(), || crypto::import_jwk(json)) {
        Ok(key) => assert_imported("jwk", &key),
        Err(e) => {
            assert_invalid_key_material("jwk", &e);
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(&c.to_string());
                cause = c.source();
            }
            if let Ok(serde_json::Value::Object(members)) = serde_json::from_str::<serde_json::Value>(json) {
                for name in ["d", "p", "q", "dp", "dq", "qi", "k"] {
                    if let Some(serde_json::Value::String(v)) = members.get(name)
                        && v.len() >= 8
                    {
                        assert!(!text.contains(v.as_str()), "the error quotes member {name}: {text}");
                    }
                }
            }
        }
    }
}

// ---- Ciphertext framing -------------------------------------------------------------------

/// `RsaPrivateKey::decrypt` of any bytes under any algorithm. `expected`: the plaintext when
/// `ct` is a genuine encryption under `alg`. OAEP refuses everything else with
/// `DecryptionFailed`; PKCS#1 v1.5 may find valid padding in a changed ciphertext (about one in
/// 2^16 random blocks), so it is allowed any plaintext there; a non-RSA algorithm is
/// `InvalidInput`.
pub fn check_rsa_decrypt(key: &RsaPrivateKey, alg: Algorithm, ct: &[u8], expected: Option<&[u8]>) {
    let out = bounded("rsa decrypt", ct.len(), || key.decrypt(alg, ct));
    match (alg, expected, out) {
        (Algorithm::RsaOaep | Algorithm::RsaOaep256 | Algorithm::Rsa1_5, Some(pt), Ok(got)) => {
            assert_eq!(&got[..], pt)
        }
        (Algorithm::RsaOaep | Algorithm::RsaOaep256, None, Ok(_)) => {
            panic!("OAEP accepted a forged ciphertext")
        }
        (Algorithm::Rsa1_5, None, Ok(got)) => assert!(got.len() <= key.bits() / 8 - 11),
        (Algorithm::RsaOaep | Algorithm::RsaOaep256 | Algorithm::Rsa1_5, Some(_), Err(e)) => {
            panic!("a genuine {alg:?} ciphertext was refused: {e:?}")
        }
        (Algorithm::RsaOaep | Algorithm::RsaOaep256 | Algorithm::Rsa1_5, None, Err(e)) => {
            assert!(matches!(e, CryptoError::DecryptionFailed), "{e:?}")
        }
        (_, _, Err(e)) => assert!(matches!(e, CryptoError::InvalidInput(_)), "{alg:?}: {e:?}"),
        (_, _, Ok(_)) => panic!("{alg:?} decrypted with an RSA key"),
    }
}

/// `aes_kw_unwrap` of any key and bytes: a key that is not 16/24/32 bytes is
/// `InvalidKeyMaterial`, anything but `expected`'s genuine wrap `DecryptionFailed`.
pub fn check_aes_kw(key: &[u8], wrapped: &[u8], expected: Option<&[u8]>) {
    let out = bounded("aes-kw", wrapped.len() + key.len(), || crypto::aes_kw_unwrap(key, wrapped));
    match (out, expected) {
        (Err(e), _) if !matches!(key.len(), 16 | 24 | 32) => assert_invalid_key_material("aes-kw key", &e),
        (Ok(got), Some(pt)) => assert_eq!(&got[..], pt),
        (Ok(_), None) => panic!("AES-KW accepted a forged wrap"),
        (Err(e), Some(_)) => panic!("a genuine wrap was refused: {e:?}"),
        (Err(e), None) => assert!(matches!(e, CryptoError::DecryptionFailed), "{e:?}"),
    }
}

/// `aes_gcm_decrypt` of any key, IV, AAD, ciphertext and tag: a bad key length is
/// `InvalidKeyMaterial`, an IV that is not 12 bytes `InvalidInput`, anything but `expected`'s
/// genuine encryption `DecryptionFailed`.
pub fn check_aes_gcm(key: &[u8], iv: &[u8], aad: &[u8], ct: &[u8], tag: &[u8], expected: Option<&[u8]>) {
    let len = key.len() + iv.len() + aad.len() + ct.len() + tag.len();
    let out = bounded("aes-gcm", len, || crypto::aes_gcm_decrypt(key, iv, aad, ct, tag));
    match (out, expected) {
        (Err(e), _) if !matches!(key.len(), 16 | 24 | 32) => assert_invalid_key_material("gcm key", &e),
        (Err(e), _) if iv.len() != 12 => assert!(matches!(e, CryptoError::InvalidInput(_)), "{e:?}"),
        (Ok(got), Some(pt)) => assert_eq!(&got[..], pt),
        (Ok(_), None) => panic!("AES-GCM accepted a forged ciphertext"),
        (Err(e), Some(_)) => panic!("a genuine GCM ciphertext was refused: {e:?}"),
        (Err(e), None) => assert!(matches!(e, CryptoError::DecryptionFailed), "{e:?}"),
    }
}

/// `Sealer::unseal` of any blob: only `expected`'s genuine seal under this `aad` opens; anything
/// else is `UnsealFailed`.
pub fn check_unseal(sealer: &Sealer, aad: &[u8], blob: &[u8], expected: Option<&[u8]>) {
    let out = bounded("unseal", blob.len() + aad.len(), || sealer.unseal(aad, blob));
    match (out, expected) {
        (Ok(got), Some(pt)) => assert_eq!(&got[..], pt),
        (Ok(_), None) => panic!("a forged sealed blob opened"),
        (Err(e), Some(_)) => panic!("a genuine sealed blob was refused: {e:?}"),
        (Err(e), None) => assert!(matches!(e, CryptoError::UnsealFailed), "{e:?}"),
    }
}

// ---- Configuration ------------------------------------------------------------------------

/// `Config::resolve` of a TOML file holding `text` (written to `path`): a configuration, or a
/// `ConfigError` listing at least one problem, each a non-empty line; a file TOML or the
/// file's shape refuses is named in the first problem.
pub fn check_config(
    path: &std::path::Path,
    data_dir: &std::path::Path,
    text: &str,
) -> Result<tde_broker::config::Config, Vec<String>> {
    std::fs::write(path, text).expect("write the configuration");
    let args = tde_broker::config::ServeArgs {
        config: Some(path.to_path_buf()),
        data_dir: Some(data_dir.to_path_buf()),
        ..Default::default()
    };
    let out = bounded("config", text.len(), || tde_broker::config::Config::resolve(args));
    match out {
        Ok(cfg) => {
            assert!(toml::from_str::<toml::Table>(text).is_ok(), "accepted a file TOML refuses: {text:?}");
            Ok(cfg)
        }
        Err(tde_broker::config::ConfigError(problems)) => {
            assert!(!problems.is_empty(), "a ConfigError without a problem");
            assert!(problems.iter().all(|p| !p.trim().is_empty()), "{problems:?}");
            if toml::from_str::<toml::Table>(text).is_err() {
                assert!(problems[0].starts_with(&path.display().to_string()), "{problems:?}");
            }
            Err(problems)
        }
    }
}
