//! Errors of the crypto layer: [`CryptoError`] and the typed detail of its refusals, with the
//! library error that caused one kept as its source. No text here carries key material or
//! plaintext: a variant holds sizes, member names and positions only, and the library errors kept
//! hold none either (base64 and JSON errors, which can quote their input, are never kept).

use super::Algorithm;
use super::aes_ops::GCM_IV_LEN;

/// Errors of the crypto layer. Messages never contain key material or plaintext.
///
/// A refusal's message includes its detail ([`KeyMaterialError`], [`InputError`]), and its
/// [`source`](std::error::Error::source) is the library error behind the detail, if any: walking
/// the chain shows each text once.
#[derive(Debug)]
#[non_exhaustive]
pub enum CryptoError {
    /// Any failure to decrypt/unwrap an RSA or AES ciphertext. One variant, no detail,
    /// so callers cannot build a padding oracle out of it.
    DecryptionFailed,
    /// Key material that cannot be used (wrong type, size, encoding or inconsistent).
    InvalidKeyMaterial(KeyMaterialError),
    /// A caller-supplied parameter is unacceptable (lengths, algorithm, ...).
    InvalidInput(InputError),
    /// A sealed blob could not be opened (wrong master key, wrong AAD, tampering, bad format).
    UnsealFailed,
    /// The underlying library failed to generate a key or random bytes.
    KeyGeneration,
    /// A signature did not verify (or could not be produced).
    BadSignature,
}

impl std::fmt::Display for CryptoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CryptoError::DecryptionFailed => f.write_str("decryption failed"),
            CryptoError::InvalidKeyMaterial(detail) => write!(f, "invalid key material: {detail}"),
            CryptoError::InvalidInput(detail) => write!(f, "invalid input: {detail}"),
            CryptoError::UnsealFailed => f.write_str("unsealing failed"),
            CryptoError::KeyGeneration => f.write_str("key generation failed"),
            CryptoError::BadSignature => f.write_str("signature invalid"),
        }
    }
}

impl std::error::Error for CryptoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CryptoError::InvalidKeyMaterial(detail) => detail.source(),
            CryptoError::InvalidInput(detail) => detail.source(),
            _ => None,
        }
    }
}

impl From<aes_kw::Error> for LibraryError {
    fn from(e: aes_kw::Error) -> Self {
        LibraryError::AesKw(e)
    }
}

/// Maps a library error to the refusal `detail` it causes, as in
/// `.map_err(caused_by(KeyMaterialError::NotPkcs8Rsa))`.
pub(crate) fn caused_by<E, D>(detail: fn(LibraryError) -> D) -> impl Fn(E) -> CryptoError
where
    E: Into<LibraryError>,
    D: Into<CryptoError>,
{
    move |e| detail(e.into()).into()
}

impl From<KeyMaterialError> for CryptoError {
    fn from(e: KeyMaterialError) -> Self {
        CryptoError::InvalidKeyMaterial(e)
    }
}

impl From<InputError> for CryptoError {
    fn from(e: InputError) -> Self {
        CryptoError::InvalidInput(e)
    }
}

/// What a library of the crypto layer reported: the cause of a refusal. None of these errors
/// carries key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LibraryError {
    /// aws-lc-rs refused, without saying why.
    #[error(transparent)]
    AwsLc(#[from] aws_lc_rs::error::Unspecified),
    /// aws-lc-rs refused a key, saying why.
    #[error(transparent)]
    KeyRejected(#[from] aws_lc_rs::error::KeyRejected),
    /// The `aes-kw` crate (AES-192 key wrap). Without its `std` feature its error is no
    /// `std::error::Error`, so this is where the chain ends.
    #[error("{0}")]
    AesKw(aes_kw::Error),
    /// The `rsa` crate (JWK components, big integers).
    #[error(transparent)]
    Rsa(#[from] rsa::Error),
    /// PKCS#1 decoding.
    #[error(transparent)]
    Pkcs1(#[from] rsa::pkcs1::Error),
    /// PKCS#8 encoding.
    #[error(transparent)]
    Pkcs8(#[from] rsa::pkcs8::Error),
}

/// Why key material was refused. The broker shows the text as "The key material is invalid:
/// {text}"; it names sizes and JWK members, never their values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyMaterialError {
    /// An AES key that is not 16, 24 or 32 bytes (or that the library refused).
    #[error("AES key must be 16, 24 or 32 bytes")]
    AesKeyLength {
        /// The key's length in bytes.
        len: usize,
        /// The library's refusal, when the length itself was accepted.
        #[source]
        source: Option<LibraryError>,
    },
    /// Not an unencrypted PKCS#8 RSA private key.
    #[error("not a valid PKCS#8 RSA private key")]
    NotPkcs8Rsa(#[source] LibraryError),
    /// A validated RSA key could not be encoded again as PKCS#8.
    #[error("cannot re-encode RSA key")]
    Reencode(#[source] LibraryError),
    /// PEM text without a `-----BEGIN ` line.
    #[error("no PEM block found")]
    NoPemBlock,
    /// A PEM `BEGIN` line that does not end with `-----`.
    #[error("malformed PEM header")]
    MalformedPemHeader,
    /// No `END` line matching the `BEGIN` line.
    #[error("PEM END line missing or does not match BEGIN")]
    PemEndMismatch,
    /// An encrypted PEM key (PKCS#8 `ENCRYPTED PRIVATE KEY` or legacy `Proc-Type`/`DEK-Info`).
    #[error("encrypted PEM is not supported; decrypt the key before importing")]
    EncryptedPem,
    /// A PEM block of another type.
    #[error("unsupported PEM type; expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY")]
    UnsupportedPemType,
    /// A PEM body that is not base64 (the decoder's error quotes the body, so it is not kept).
    #[error("PEM body is not valid base64")]
    PemBase64,
    /// Not a PKCS#1 RSA private key.
    #[error("not a valid PKCS#1 RSA private key")]
    NotPkcs1Rsa(#[source] LibraryError),
    /// A PKCS#1 key that could not be converted to PKCS#8.
    #[error("cannot convert PKCS#1 key to PKCS#8")]
    Pkcs1ToPkcs8(#[source] LibraryError),
    /// A JWK without a member it needs.
    #[error("JWK member \"{member}\" is missing")]
    JwkMemberMissing {
        /// The member's name.
        member: &'static str,
    },
    /// A JWK member that is not base64url (the decoder's error quotes the value, so it is not
    /// kept).
    #[error("JWK member \"{member}\" is not valid base64url")]
    JwkMemberNotBase64url {
        /// The member's name.
        member: &'static str,
    },
    /// A JWK member too large for the key's size.
    #[error("JWK member \"{member}\" is too large")]
    JwkMemberTooLarge {
        /// The member's name.
        member: &'static str,
        /// The big-integer decoder's refusal.
        #[source]
        source: LibraryError,
    },
    /// The CRT parameters of a key could not be derived to check the JWK's against.
    #[error("cannot derive CRT parameters")]
    CrtUnavailable,
    /// A JWK CRT member (dp, dq, qi) that does not match the key.
    #[error("JWK member \"{member}\" is inconsistent with the key")]
    JwkMemberInconsistent {
        /// The member's name.
        member: &'static str,
    },
    /// A JWK modulus of an unsupported size.
    #[error("RSA modulus must be 2048, 3072 or 4096 bits")]
    JwkModulusSize,
    /// A JWK public exponent that is empty or longer than 8 bytes.
    #[error("RSA public exponent is out of range")]
    JwkExponentRange,
    /// JWK components that do not make an RSA key.
    #[error("RSA JWK components are inconsistent")]
    JwkInconsistent(#[source] LibraryError),
    /// A key from a JWK that could not be encoded as PKCS#8.
    #[error("cannot encode RSA key as PKCS#8")]
    Pkcs8Encode(#[source] LibraryError),
    /// A JWK that is not a JSON object of string members. The JSON error, which can quote a
    /// value, is not kept: only where it stopped.
    #[error("JWK is not a valid JSON object (line {line}, column {column})")]
    JwkJson {
        /// Line of the error, from 1.
        line: usize,
        /// Column of the error, from 1.
        column: usize,
    },
    /// An oct JWK whose key is not 16, 24 or 32 bytes.
    #[error("oct key must be 16, 24 or 32 bytes")]
    OctKeyLength {
        /// The key's length in bytes.
        len: usize,
    },
    /// Not an EC private key on P-256, P-256K (secp256k1), P-384 or P-521 (the refusal for
    /// P-256 is kept, when the library gave one).
    #[error("not a valid EC private key on P-256, P-256K, P-384 or P-521")]
    NotEcKey(#[source] Option<LibraryError>),
    /// An EC JWK whose `crv` is missing or unknown.
    #[error("unsupported EC curve; expected P-256, P-256K, P-384 or P-521")]
    EcCurve,
    /// An EC JWK member longer than the curve's coordinate length.
    #[error("JWK member \"{member}\" is too long for curve {curve}")]
    EcMemberLength {
        /// The member's name.
        member: &'static str,
        /// The curve's name.
        curve: &'static str,
    },
    /// EC JWK members (d, x, y) that do not make a key: the point is not d's.
    #[error("EC JWK components are inconsistent")]
    EcInconsistent(#[source] LibraryError),
    /// An EC key that could not be encoded as PKCS#8.
    #[error("cannot encode EC key as PKCS#8")]
    EcEncode(#[source] LibraryError),
    /// A JWK `kty` other than RSA, RSA-HSM, EC, EC-HSM, oct or oct-HSM.
    #[error("unsupported JWK kty; expected RSA, RSA-HSM, EC, EC-HSM, oct or oct-HSM")]
    UnsupportedKty,
    /// An RSA public key the library cannot use.
    #[error("unusable RSA public key")]
    UnusableRsaPublicKey(#[source] LibraryError),
    /// An RSA key of a size Key Vault does not offer.
    #[error("unsupported RSA key size {bits}; supported sizes are 2048, 3072 and 4096")]
    RsaKeySize {
        /// The modulus size in bits.
        bits: usize,
    },
    /// An RSA private key the library cannot use.
    #[error("unusable RSA private key")]
    UnusableRsaPrivateKey(#[source] LibraryError),
    /// RSA public components (n, e) that do not make a key.
    #[error("invalid RSA public key (n, e)")]
    RsaPublicComponents(#[source] LibraryError),
    /// A token-signing key outside 2048 to 4096 bits.
    #[error("token signing key must be 2048 to 4096 bits (got {bits})")]
    SigningKeySize {
        /// The modulus size in bits.
        bits: usize,
    },
    /// A master key that is not 32 bytes.
    #[error("master key must be 32 bytes (got {len})")]
    MasterKeyLength {
        /// The key's length in bytes.
        len: usize,
    },
    /// A 32-byte master key the library refused.
    #[error("unusable master key")]
    UnusableMasterKey(#[source] LibraryError),
}

/// Why a caller-supplied parameter was refused. The broker sends the text as is, as a bad
/// parameter; it names lengths, sizes and algorithms, never the data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// An AES key size other than 128, 192 or 256 bits.
    #[error("unsupported AES key size {bits}; supported sizes are 128, 192 and 256")]
    AesKeySize {
        /// The size asked for, in bits.
        bits: usize,
    },
    /// AES key-wrap input shorter than 16 bytes or not a multiple of 8.
    #[error("AES key wrap input must be at least 16 bytes and a multiple of 8 (got {len} bytes)")]
    KeyWrapInputLength {
        /// The input's length in bytes.
        len: usize,
    },
    /// The library could not wrap the input.
    #[error("AES key wrap failed")]
    KeyWrapFailed(#[source] LibraryError),
    /// An AES-GCM IV that is not 12 bytes.
    #[error("AES-GCM IV must be {GCM_IV_LEN} bytes (got {len})")]
    GcmIvLength {
        /// The IV's length in bytes.
        len: usize,
    },
    /// The library could not encrypt with AES-GCM.
    #[error("AES-GCM encryption failed")]
    GcmEncryptFailed(#[source] LibraryError),
    /// An RSA key size other than 2048, 3072 or 4096 bits.
    #[error("unsupported RSA key size {bits}; supported sizes are 2048, 3072 and 4096")]
    RsaKeySize {
        /// The size asked for, in bits.
        bits: usize,
    },
    /// A non-RSA algorithm given to an RSA operation.
    #[error("{0} is not an RSA encryption algorithm")]
    NotRsa(Algorithm),
    /// A plaintext longer than the algorithm and key size allow.
    #[error("plaintext is {len} bytes; {alg} with a {bits}-bit key accepts at most {max} bytes")]
    PlaintextTooLong {
        /// The plaintext's length in bytes.
        len: usize,
        /// The algorithm.
        alg: Algorithm,
        /// The key's modulus size in bits.
        bits: usize,
        /// The longest plaintext accepted, in bytes.
        max: usize,
    },
    /// The library could not encrypt with RSA.
    #[error("{alg} encryption failed")]
    RsaEncryptFailed {
        /// The algorithm.
        alg: Algorithm,
        /// The library's refusal.
        #[source]
        source: LibraryError,
    },
    /// The library could not seal with the master key.
    #[error("sealing failed")]
    SealFailed(#[source] LibraryError),
    /// A digest whose length is not the signature algorithm's hash length.
    #[error("the digest is {len} bytes long; {alg} needs {expected} bytes")]
    DigestLength {
        /// The algorithm's name.
        alg: &'static str,
        /// The digest's length in bytes.
        len: usize,
        /// The hash length of the algorithm.
        expected: usize,
    },
    /// A signature algorithm the key cannot use (an ES algorithm of another curve, RS/PS on an
    /// EC key, ES on an RSA key).
    #[error("{alg} does not fit this key")]
    NotSignatureAlgorithmOfKey {
        /// The algorithm's name.
        alg: &'static str,
    },
    /// An ECDSA signature that is not well-formed R||S or DER.
    #[error("malformed ECDSA signature")]
    SignatureEncoding,
}

/// The text of a refused parameter, as the broker sends it in a bad-parameter reply.
#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    fn unspecified() -> LibraryError {
        aws_lc_rs::error::Unspecified.into()
    }

    /// The texts callers show (the broker's "The key material is invalid: …" and bad-parameter
    /// replies) are exactly those of the string variants these types replaced.
    #[test]
    fn key_material_texts_are_unchanged() {
        let member = "qi";
        let cases: Vec<(KeyMaterialError, &str)> = vec![
            (KeyMaterialError::AesKeyLength { len: 20, source: None }, "AES key must be 16, 24 or 32 bytes"),
            (KeyMaterialError::NotPkcs8Rsa(unspecified()), "not a valid PKCS#8 RSA private key"),
            (KeyMaterialError::Reencode(unspecified()), "cannot re-encode RSA key"),
            (KeyMaterialError::NoPemBlock, "no PEM block found"),
            (KeyMaterialError::MalformedPemHeader, "malformed PEM header"),
            (KeyMaterialError::PemEndMismatch, "PEM END line missing or does not match BEGIN"),
            (
                KeyMaterialError::EncryptedPem,
                "encrypted PEM is not supported; decrypt the key before importing",
            ),
            (
                KeyMaterialError::UnsupportedPemType,
                "unsupported PEM type; expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY",
            ),
            (KeyMaterialError::PemBase64, "PEM body is not valid base64"),
            (KeyMaterialError::NotPkcs1Rsa(unspecified()), "not a valid PKCS#1 RSA private key"),
            (KeyMaterialError::Pkcs1ToPkcs8(unspecified()), "cannot convert PKCS#1 key to PKCS#8"),
            (KeyMaterialError::JwkMemberMissing { member }, "JWK member \"qi\" is missing"),
            (KeyMaterialError::JwkMemberNotBase64url { member }, "JWK member \"qi\" is not valid base64url"),
            (
                KeyMaterialError::JwkMemberTooLarge { member, source: unspecified() },
                "JWK member \"qi\" is too large",
            ),
            (KeyMaterialError::CrtUnavailable, "cannot derive CRT parameters"),
            (
                KeyMaterialError::JwkMemberInconsistent { member },
                "JWK member \"qi\" is inconsistent with the key",
            ),
            (KeyMaterialError::JwkModulusSize, "RSA modulus must be 2048, 3072 or 4096 bits"),
            (KeyMaterialError::JwkExponentRange, "RSA public exponent is out of range"),
            (KeyMaterialError::JwkInconsistent(unspecified()), "RSA JWK components are inconsistent"),
            (KeyMaterialError::Pkcs8Encode(unspecified()), "cannot encode RSA key as PKCS#8"),
            (
                KeyMaterialError::JwkJson { line: 3, column: 14 },
                "JWK is not a valid JSON object (line 3, column 14)",
            ),
            (KeyMaterialError::OctKeyLength { len: 20 }, "oct key must be 16, 24 or 32 bytes"),
            (KeyMaterialError::NotEcKey(None), "not a valid EC private key on P-256, P-256K, P-384 or P-521"),
            (KeyMaterialError::EcCurve, "unsupported EC curve; expected P-256, P-256K, P-384 or P-521"),
            (
                KeyMaterialError::EcMemberLength { member: "x", curve: "P-256" },
                "JWK member \"x\" is too long for curve P-256",
            ),
            (KeyMaterialError::EcInconsistent(unspecified()), "EC JWK components are inconsistent"),
            (KeyMaterialError::EcEncode(unspecified()), "cannot encode EC key as PKCS#8"),
            (
                KeyMaterialError::UnsupportedKty,
                "unsupported JWK kty; expected RSA, RSA-HSM, EC, EC-HSM, oct or oct-HSM",
            ),
            (KeyMaterialError::UnusableRsaPublicKey(unspecified()), "unusable RSA public key"),
            (
                KeyMaterialError::RsaKeySize { bits: 2304 },
                "unsupported RSA key size 2304; supported sizes are 2048, 3072 and 4096",
            ),
            (KeyMaterialError::UnusableRsaPrivateKey(unspecified()), "unusable RSA private key"),
            (KeyMaterialError::RsaPublicComponents(unspecified()), "invalid RSA public key (n, e)"),
            (
                KeyMaterialError::SigningKeySize { bits: 1024 },
                "token signing key must be 2048 to 4096 bits (got 1024)",
            ),
            (KeyMaterialError::MasterKeyLength { len: 31 }, "master key must be 32 bytes (got 31)"),
            (KeyMaterialError::UnusableMasterKey(unspecified()), "unusable master key"),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
            assert_eq!(CryptoError::from(e).to_string(), format!("invalid key material: {text}"));
        }
    }

    #[test]
    fn input_texts_are_unchanged() {
        let cases: Vec<(InputError, &str)> = vec![
            (
                InputError::AesKeySize { bits: 64 },
                "unsupported AES key size 64; supported sizes are 128, 192 and 256",
            ),
            (
                InputError::KeyWrapInputLength { len: 15 },
                "AES key wrap input must be at least 16 bytes and a multiple of 8 (got 15 bytes)",
            ),
            (InputError::KeyWrapFailed(unspecified()), "AES key wrap failed"),
            (InputError::GcmIvLength { len: 16 }, "AES-GCM IV must be 12 bytes (got 16)"),
            (InputError::GcmEncryptFailed(unspecified()), "AES-GCM encryption failed"),
            (
                InputError::RsaKeySize { bits: 1024 },
                "unsupported RSA key size 1024; supported sizes are 2048, 3072 and 4096",
            ),
            (InputError::NotRsa(Algorithm::A256Kw), "A256KW is not an RSA encryption algorithm"),
            (
                InputError::PlaintextTooLong { len: 215, alg: Algorithm::RsaOaep, bits: 2048, max: 214 },
                "plaintext is 215 bytes; RSA-OAEP with a 2048-bit key accepts at most 214 bytes",
            ),
            (
                InputError::RsaEncryptFailed { alg: Algorithm::Rsa1_5, source: unspecified() },
                "RSA1_5 encryption failed",
            ),
            (InputError::SealFailed(unspecified()), "sealing failed"),
            (
                InputError::DigestLength { alg: "PS384", len: 32, expected: 48 },
                "the digest is 32 bytes long; PS384 needs 48 bytes",
            ),
            (InputError::NotSignatureAlgorithmOfKey { alg: "ES256K" }, "ES256K does not fit this key"),
            (InputError::SignatureEncoding, "malformed ECDSA signature"),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
            assert_eq!(CryptoError::from(e).to_string(), format!("invalid input: {text}"));
        }
    }

    #[test]
    fn library_errors_are_kept_as_the_source_and_shown_once() {
        let rejected = || match aws_lc_rs::rsa::PrivateDecryptingKey::from_pkcs8(b"junk") {
            Err(e) => LibraryError::from(e),
            Ok(_) => panic!("junk decoded as a key"),
        };
        let cause = rejected().to_string();
        let e = KeyMaterialError::NotPkcs8Rsa(rejected());
        assert_eq!(e.source().map(ToString::to_string), Some(cause.clone()));
        // The crypto error's message has the detail; its source is the library's error.
        let e = CryptoError::from(KeyMaterialError::NotPkcs8Rsa(rejected()));
        assert_eq!(e.to_string(), "invalid key material: not a valid PKCS#8 RSA private key");
        assert_eq!(e.source().map(ToString::to_string), Some(cause));
        assert!(KeyMaterialError::AesKeyLength { len: 3, source: None }.source().is_none());
        assert!(KeyMaterialError::AesKeyLength { len: 16, source: Some(unspecified()) }.source().is_some());
        assert!(CryptoError::from(InputError::SealFailed(unspecified())).source().is_some());
        assert!(CryptoError::from(InputError::GcmIvLength { len: 1 }).source().is_none());
        assert!(CryptoError::DecryptionFailed.source().is_none());
    }
}
