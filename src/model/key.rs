//! Keys, key versions, their attributes and the rules of docs/RULES.md R1 that decide whether a
//! crypto operation may run on a version. Pure: `now` is always an argument.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::BrokerError;
use super::ids::printable;

/// Key types a vault holds (docs/RULES.md, Domain: RSA, RSA-HSM, EC, EC-HSM, oct-HSM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyType {
    /// Software-protected RSA.
    #[serde(rename = "RSA")]
    Rsa,
    /// HSM-protected RSA (same arithmetic here; halves the throttling budget later).
    #[serde(rename = "RSA-HSM")]
    RsaHsm,
    /// HSM-protected AES key.
    #[serde(rename = "oct-HSM")]
    OctHsm,
    /// Software-protected elliptic-curve key (sign and verify only).
    #[serde(rename = "EC")]
    Ec,
    /// HSM-protected elliptic-curve key (same arithmetic here; HSM throttling budget).
    #[serde(rename = "EC-HSM")]
    EcHsm,
}

impl KeyType {
    /// Parses the cloud's `kty` names.
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        match s {
            "RSA" => Ok(KeyType::Rsa),
            "RSA-HSM" => Ok(KeyType::RsaHsm),
            "oct-HSM" => Ok(KeyType::OctHsm),
            "EC" => Ok(KeyType::Ec),
            "EC-HSM" => Ok(KeyType::EcHsm),
            other => Err(BrokerError::bad_parameter(format!(
                "The key type '{}' is not supported. Supported key types are RSA, RSA-HSM, EC, EC-HSM and oct-HSM.",
                printable(other)
            ))),
        }
    }

    /// The cloud's `kty` name.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Rsa => "RSA",
            KeyType::RsaHsm => "RSA-HSM",
            KeyType::OctHsm => "oct-HSM",
            KeyType::Ec => "EC",
            KeyType::EcHsm => "EC-HSM",
        }
    }

    /// RSA or RSA-HSM.
    pub fn is_rsa(self) -> bool {
        matches!(self, KeyType::Rsa | KeyType::RsaHsm)
    }

    /// EC or EC-HSM.
    pub fn is_ec(self) -> bool {
        matches!(self, KeyType::Ec | KeyType::EcHsm)
    }

    /// Whether the key is HSM-protected (RSA-HSM, EC-HSM, oct-HSM).
    pub fn is_hsm(self) -> bool {
        matches!(self, KeyType::RsaHsm | KeyType::EcHsm | KeyType::OctHsm)
    }

    /// Validates a size in bits (0 = the default: RSA 2048, oct-HSM 256). EC keys take their
    /// size from the curve ([`Curve::bits`]), not from here.
    pub fn size(self, bits: i32) -> Result<u32, BrokerError> {
        let (allowed, default): (&[i32], u32) =
            if self.is_rsa() { (&[2048, 3072, 4096], 2048) } else { (&[128, 192, 256], 256) };
        match bits {
            0 => Ok(default),
            b if allowed.contains(&b) => Ok(b as u32),
            b => Err(BrokerError::bad_parameter(format!(
                "The key size {b} is not supported for key type {}. Supported sizes are {:?}.",
                self.name(),
                allowed
            ))),
        }
    }

    /// The operations a new key of this type allows when the caller names none.
    pub fn default_ops(self) -> Vec<KeyOp> {
        use KeyOp::*;
        if self.is_rsa() {
            vec![Encrypt, Decrypt, Sign, Verify, WrapKey, UnwrapKey]
        } else if self.is_ec() {
            vec![Sign, Verify]
        } else {
            vec![Encrypt, Decrypt, WrapKey, UnwrapKey]
        }
    }
}

/// `key_ops` values (SPEC75 JsonWebKeyOperation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum KeyOp {
    /// encrypt.
    Encrypt,
    /// decrypt.
    Decrypt,
    /// sign.
    Sign,
    /// verify.
    Verify,
    /// wrapKey.
    WrapKey,
    /// unwrapKey.
    UnwrapKey,
    /// import.
    Import,
    /// export.
    Export,
}

impl KeyOp {
    /// Parses a `key_ops` entry (case-insensitive, as the cloud accepts them).
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        use KeyOp::*;
        Ok(match s.to_ascii_lowercase().as_str() {
            "encrypt" => Encrypt,
            "decrypt" => Decrypt,
            "sign" => Sign,
            "verify" => Verify,
            "wrapkey" => WrapKey,
            "unwrapkey" => UnwrapKey,
            "import" => Import,
            "export" => Export,
            _ => {
                return Err(BrokerError::bad_parameter(format!(
                    "The key operation '{}' is invalid. Valid operations are encrypt, decrypt, sign, verify, wrapKey, unwrapKey, import, export.",
                    printable(s)
                )));
            }
        })
    }

    /// The cloud's spelling.
    pub fn name(self) -> &'static str {
        use KeyOp::*;
        match self {
            Encrypt => "encrypt",
            Decrypt => "decrypt",
            Sign => "sign",
            Verify => "verify",
            WrapKey => "wrapKey",
            UnwrapKey => "unwrapKey",
            Import => "import",
            Export => "export",
        }
    }

    /// Parses a list; an empty list means `kty`'s defaults. Duplicates collapse.
    pub fn parse_list(ops: &[String], kty: KeyType) -> Result<Vec<KeyOp>, BrokerError> {
        if ops.is_empty() {
            return Ok(kty.default_ops());
        }
        let mut out = ops.iter().map(|s| KeyOp::parse(s)).collect::<Result<Vec<_>, _>>()?;
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The four crypto operations of the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CryptoOp {
    /// Encrypt (public-key or AES-GCM).
    Encrypt,
    /// Decrypt.
    Decrypt,
    /// wrapKey.
    WrapKey,
    /// unwrapKey.
    UnwrapKey,
}

impl CryptoOp {
    /// The `key_ops` entry that allows this operation.
    pub fn key_op(self) -> KeyOp {
        match self {
            CryptoOp::Encrypt => KeyOp::Encrypt,
            CryptoOp::Decrypt => KeyOp::Decrypt,
            CryptoOp::WrapKey => KeyOp::WrapKey,
            CryptoOp::UnwrapKey => KeyOp::UnwrapKey,
        }
    }

    /// The cloud's spelling in error texts.
    pub fn name(self) -> &'static str {
        self.key_op().name()
    }

    /// Decrypt and unwrapKey keep working outside nbf/exp (docs/RULES.md R1.5); encrypt and wrapKey
    /// do not.
    pub fn works_outside_validity(self) -> bool {
        matches!(self, CryptoOp::Decrypt | CryptoOp::UnwrapKey)
    }
}

/// Encryption algorithms, by the cloud's names (SPEC75 JsonWebKeyEncryptionAlgorithm subset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    /// RSAES-OAEP with SHA-1 and MGF1-SHA1.
    RsaOaep,
    /// RSAES-OAEP with SHA-256 and MGF1-SHA256.
    RsaOaep256,
    /// RSAES-PKCS1-v1_5.
    Rsa1_5,
    /// AES key wrap (RFC 3394), 128-bit key.
    A128Kw,
    /// AES key wrap, 192-bit key.
    A192Kw,
    /// AES key wrap, 256-bit key.
    A256Kw,
    /// AES-GCM, 128-bit key.
    A128Gcm,
    /// AES-GCM, 192-bit key.
    A192Gcm,
    /// AES-GCM, 256-bit key.
    A256Gcm,
}

impl Algorithm {
    /// Every algorithm.
    pub const ALL: [Algorithm; 9] = [
        Algorithm::RsaOaep,
        Algorithm::RsaOaep256,
        Algorithm::Rsa1_5,
        Algorithm::A128Kw,
        Algorithm::A192Kw,
        Algorithm::A256Kw,
        Algorithm::A128Gcm,
        Algorithm::A192Gcm,
        Algorithm::A256Gcm,
    ];

    /// Parses the cloud's name exactly (`RSA-OAEP-256`, `A256KW`, …).
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        parse_algorithm(&Self::ALL, Self::name, s)
    }

    /// The cloud's name.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RsaOaep => "RSA-OAEP",
            Algorithm::RsaOaep256 => "RSA-OAEP-256",
            Algorithm::Rsa1_5 => "RSA1_5",
            Algorithm::A128Kw => "A128KW",
            Algorithm::A192Kw => "A192KW",
            Algorithm::A256Kw => "A256KW",
            Algorithm::A128Gcm => "A128GCM",
            Algorithm::A192Gcm => "A192GCM",
            Algorithm::A256Gcm => "A256GCM",
        }
    }

    /// An RSA algorithm.
    pub fn is_rsa(self) -> bool {
        matches!(self, Algorithm::RsaOaep | Algorithm::RsaOaep256 | Algorithm::Rsa1_5)
    }

    /// An AES key-wrap algorithm.
    pub fn is_key_wrap(self) -> bool {
        matches!(self, Algorithm::A128Kw | Algorithm::A192Kw | Algorithm::A256Kw)
    }

    /// An AES-GCM algorithm.
    pub fn is_gcm(self) -> bool {
        matches!(self, Algorithm::A128Gcm | Algorithm::A192Gcm | Algorithm::A256Gcm)
    }

    /// The AES key size the algorithm needs.
    pub fn aes_bits(self) -> Option<u32> {
        match self {
            Algorithm::A128Kw | Algorithm::A128Gcm => Some(128),
            Algorithm::A192Kw | Algorithm::A192Gcm => Some(192),
            Algorithm::A256Kw | Algorithm::A256Gcm => Some(256),
            _ => None,
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Elliptic curves of EC keys (the cloud's `crv` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Curve {
    /// NIST P-256 (secp256r1).
    #[serde(rename = "P-256")]
    P256,
    /// secp256k1.
    #[serde(rename = "P-256K")]
    P256K,
    /// NIST P-384.
    #[serde(rename = "P-384")]
    P384,
    /// NIST P-521.
    #[serde(rename = "P-521")]
    P521,
}

impl Curve {
    /// Every curve.
    pub const ALL: [Curve; 4] = [Curve::P256, Curve::P256K, Curve::P384, Curve::P521];

    /// Parses the cloud's `crv` name exactly; empty means P-256 (the default for EC keys).
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        if s.is_empty() {
            return Ok(Curve::P256);
        }
        Self::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            BrokerError::bad_parameter(format!(
                "The curve '{}' is not supported. Supported curves are P-256, P-256K, P-384, P-521.",
                printable(s)
            ))
        })
    }

    /// The cloud's name.
    pub fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P256K => "P-256K",
            Curve::P384 => "P-384",
            Curve::P521 => "P-521",
        }
    }

    /// The size of the curve's field, in bits (the key's size).
    pub fn bits(self) -> u32 {
        match self {
            Curve::P256 | Curve::P256K => 256,
            Curve::P384 => 384,
            Curve::P521 => 521,
        }
    }

    /// The length of one coordinate (x, y) and of one half (R, S) of a signature, in bytes.
    pub fn coordinate_len(self) -> usize {
        (self.bits() as usize).div_ceil(8)
    }

    /// The one signature algorithm of the curve.
    pub fn signature_algorithm(self) -> SignatureAlgorithm {
        match self {
            Curve::P256 => SignatureAlgorithm::Es256,
            Curve::P256K => SignatureAlgorithm::Es256K,
            Curve::P384 => SignatureAlgorithm::Es384,
            Curve::P521 => SignatureAlgorithm::Es512,
        }
    }
}

impl std::fmt::Display for Curve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Signature algorithms, by the cloud's names (JsonWebKeySignatureAlgorithm, without HMAC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignatureAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256, salt of 32 bytes.
    Ps256,
    /// RSASSA-PSS with SHA-384, MGF1-SHA-384, salt of 48 bytes.
    Ps384,
    /// RSASSA-PSS with SHA-512, MGF1-SHA-512, salt of 64 bytes.
    Ps512,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// ECDSA on secp256k1 with SHA-256.
    Es256K,
    /// ECDSA on P-384 with SHA-384.
    Es384,
    /// ECDSA on P-521 with SHA-512.
    Es512,
}

impl SignatureAlgorithm {
    /// Every algorithm.
    pub const ALL: [SignatureAlgorithm; 10] = [
        SignatureAlgorithm::Rs256,
        SignatureAlgorithm::Rs384,
        SignatureAlgorithm::Rs512,
        SignatureAlgorithm::Ps256,
        SignatureAlgorithm::Ps384,
        SignatureAlgorithm::Ps512,
        SignatureAlgorithm::Es256,
        SignatureAlgorithm::Es256K,
        SignatureAlgorithm::Es384,
        SignatureAlgorithm::Es512,
    ];

    /// Parses the cloud's name exactly (`RS256`, `ES256K`, …).
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        parse_algorithm(&Self::ALL, Self::name, s)
    }

    /// The cloud's name.
    pub fn name(self) -> &'static str {
        use SignatureAlgorithm::*;
        match self {
            Rs256 => "RS256",
            Rs384 => "RS384",
            Rs512 => "RS512",
            Ps256 => "PS256",
            Ps384 => "PS384",
            Ps512 => "PS512",
            Es256 => "ES256",
            Es256K => "ES256K",
            Es384 => "ES384",
            Es512 => "ES512",
        }
    }

    /// The length of the digest the algorithm signs: its hash's output, in bytes.
    pub fn digest_len(self) -> usize {
        use SignatureAlgorithm::*;
        match self {
            Rs256 | Ps256 | Es256 | Es256K => 32,
            Rs384 | Ps384 | Es384 => 48,
            Rs512 | Ps512 | Es512 => 64,
        }
    }

    /// An RSA algorithm (RS*, PS*).
    pub fn is_rsa(self) -> bool {
        !self.is_ec()
    }

    /// An ECDSA algorithm (ES*).
    pub fn is_ec(self) -> bool {
        self.curve().is_some()
    }

    /// The curve an ECDSA algorithm signs with.
    pub fn curve(self) -> Option<Curve> {
        use SignatureAlgorithm::*;
        match self {
            Es256 => Some(Curve::P256),
            Es256K => Some(Curve::P256K),
            Es384 => Some(Curve::P384),
            Es512 => Some(Curve::P521),
            _ => None,
        }
    }

    /// Refuses a digest whose length is not the algorithm's hash length.
    pub fn check_digest(self, digest: &[u8]) -> Result<(), BrokerError> {
        if digest.len() == self.digest_len() {
            Ok(())
        } else {
            Err(BrokerError::bad_parameter(format!(
                "The digest is {} bytes long; algorithm {} needs a digest of {} bytes.",
                digest.len(),
                self.name(),
                self.digest_len()
            )))
        }
    }
}

impl std::fmt::Display for SignatureAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The two signature operations of the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignOp {
    /// sign.
    Sign,
    /// verify.
    Verify,
}

impl SignOp {
    /// The `key_ops` entry that allows this operation.
    pub fn key_op(self) -> KeyOp {
        match self {
            SignOp::Sign => KeyOp::Sign,
            SignOp::Verify => KeyOp::Verify,
        }
    }

    /// The cloud's spelling in error texts.
    pub fn name(self) -> &'static str {
        self.key_op().name()
    }
}

/// Mutable attributes of one key version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAttributes {
    /// `false` refuses every crypto operation.
    pub enabled: bool,
    /// Activation time (Unix seconds).
    pub not_before: Option<i64>,
    /// Expiry time (Unix seconds).
    pub expires: Option<i64>,
    /// Creation time of this version.
    pub created: i64,
    /// Last change of this version.
    pub updated: i64,
}

/// Metadata of one key version; the private material is kept apart, sealed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersion {
    /// 32 lowercase hex characters.
    pub version: String,
    /// Key type.
    pub kty: KeyType,
    /// Size in bits.
    pub bits: u32,
    /// Operations this version allows.
    pub key_ops: Vec<KeyOp>,
    /// Attributes.
    pub attributes: KeyAttributes,
    /// Tags (at most 15, names and values up to 256 characters).
    pub tags: BTreeMap<String, String>,
    /// RSA modulus, big-endian; empty for oct-HSM.
    pub n: Vec<u8>,
    /// RSA public exponent, big-endian; empty for oct-HSM.
    pub e: Vec<u8>,
    /// EC keys: the curve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<Curve>,
    /// EC keys: the public point's x coordinate, big-endian, the curve's coordinate length.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub x: Vec<u8>,
    /// EC keys: the public point's y coordinate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub y: Vec<u8>,
}

impl KeyVersion {
    /// docs/RULES.md R1.2 and R1.4–R1.6: decides whether `op` with `alg` may run on this version at
    /// `now`. Order: enabled, key_ops, algorithm fits the key, nbf/exp window (decrypt and
    /// unwrapKey still work outside it).
    ///
    /// An EC key does no encryption at all: any algorithm is refused (bad parameter) before its
    /// key_ops are looked at.
    pub fn check_crypto(&self, op: CryptoOp, alg: Algorithm, now: i64) -> Result<(), BrokerError> {
        if !self.attributes.enabled {
            return Err(BrokerError::KeyDisabled { operation: op.name() });
        }
        if self.kty.is_ec() {
            return Err(self.unfit_algorithm(op.name(), alg.name()));
        }
        if !self.key_ops.contains(&op.key_op()) {
            return Err(BrokerError::KeyOperationForbidden { operation: op.name() });
        }
        self.check_algorithm(op, alg)?;
        if !op.works_outside_validity() {
            if let Some(nbf) = self.attributes.not_before
                && now < nbf
            {
                return Err(BrokerError::KeyNotYetValid { operation: op.name() });
            }
            if let Some(exp) = self.attributes.expires
                && now >= exp
            {
                return Err(BrokerError::KeyExpired { operation: op.name() });
            }
        }
        Ok(())
    }

    /// RSA algorithms on RSA keys; AES-KW for wrap/unwrap and AES-GCM for encrypt/decrypt on
    /// oct-HSM keys, with the algorithm's size equal to the key's.
    fn check_algorithm(&self, op: CryptoOp, alg: Algorithm) -> Result<(), BrokerError> {
        let fits = if self.kty.is_rsa() {
            alg.is_rsa()
        } else {
            let family = match op {
                CryptoOp::WrapKey | CryptoOp::UnwrapKey => alg.is_key_wrap(),
                CryptoOp::Encrypt | CryptoOp::Decrypt => alg.is_gcm(),
            };
            family && alg.aes_bits() == Some(self.bits)
        };
        if fits { Ok(()) } else { Err(self.unfit_algorithm(op.name(), alg.name())) }
    }

    /// The refusal of an algorithm that does not fit this key's type, size or curve.
    fn unfit_algorithm(&self, operation: &str, alg: &str) -> BrokerError {
        match self.crv {
            Some(crv) => BrokerError::bad_parameter(format!(
                "Algorithm {alg} is not supported for operation {operation} on a key of type {} and curve {crv}.",
                self.kty.name(),
            )),
            None => BrokerError::bad_parameter(format!(
                "Algorithm {alg} is not supported for operation {operation} on a key of type {} and size {}.",
                self.kty.name(),
                self.bits
            )),
        }
    }

    /// docs/RULES.md R1.11: decides whether `op` with `alg` may run on this version at `now`.
    /// Order: enabled, the key type signs at all (oct-HSM keys do not: bad parameter), key_ops,
    /// algorithm fits the key (RS/PS on RSA keys, the curve's own ES algorithm on EC keys), then
    /// the nbf/exp window for sign only (verify works outside it, like unwrapKey).
    pub fn check_sign(&self, op: SignOp, alg: SignatureAlgorithm, now: i64) -> Result<(), BrokerError> {
        if !self.attributes.enabled {
            return Err(BrokerError::KeyDisabled { operation: op.name() });
        }
        if !self.kty.is_rsa() && !self.kty.is_ec() {
            return Err(self.unfit_algorithm(op.name(), alg.name()));
        }
        if !self.key_ops.contains(&op.key_op()) {
            return Err(BrokerError::KeyOperationForbidden { operation: op.name() });
        }
        let fits =
            if self.kty.is_rsa() { alg.is_rsa() } else { alg.curve().is_some() && alg.curve() == self.crv };
        if !fits {
            return Err(self.unfit_algorithm(op.name(), alg.name()));
        }
        if op == SignOp::Sign {
            if let Some(nbf) = self.attributes.not_before
                && now < nbf
            {
                return Err(BrokerError::KeyNotYetValid { operation: op.name() });
            }
            if let Some(exp) = self.attributes.expires
                && now >= exp
            {
                return Err(BrokerError::KeyExpired { operation: op.name() });
            }
        }
        Ok(())
    }
}

/// Validates tags: at most 15, names and values of at most 256 characters.
pub fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), BrokerError> {
    if tags.len() > 15 {
        return Err(BrokerError::bad_parameter("A key can hold at most 15 tags."));
    }
    if tags.iter().any(|(k, v)| k.is_empty() || k.chars().count() > 256 || v.chars().count() > 256) {
        return Err(BrokerError::bad_parameter(
            "Tag names must be 1-256 characters and tag values at most 256 characters.",
        ));
    }
    Ok(())
}

/// Validates that `not_before` precedes `expires` when both are set.
pub fn validate_window(not_before: Option<i64>, expires: Option<i64>) -> Result<(), BrokerError> {
    match (not_before, expires) {
        (Some(nbf), Some(exp)) if nbf >= exp => Err(BrokerError::bad_parameter(
            "The key's activation time (nbf) must be before its expiry time (exp).",
        )),
        _ => Ok(()),
    }
}

/// Soft-deletion record of a key: every version is deleted together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletion {
    /// When it was deleted.
    pub deleted_date: i64,
    /// When the broker purges it by itself (deleted_date + retention).
    pub scheduled_purge_date: i64,
}

/// A key: its versions in creation order (newest last) and its deletion state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    /// Name as first created (lookups are case-insensitive).
    pub name: String,
    /// Versions, oldest first.
    pub versions: Vec<KeyVersion>,
    /// `Some` while soft-deleted.
    pub deleted: Option<Deletion>,
}

impl Key {
    /// The newest version.
    pub fn latest(&self) -> Option<&KeyVersion> {
        self.versions.last()
    }

    /// A version by id, or the newest for `None`.
    pub fn version(&self, version: Option<&str>) -> Option<&KeyVersion> {
        match version {
            None => self.latest(),
            Some(v) => self.versions.iter().find(|kv| kv.version == v),
        }
    }
}

/// The algorithm of `all` whose cloud name is exactly `s`, or BadParameter listing them all:
/// "The algorithm 'X' is not supported. Supported algorithms are A, B, …".
fn parse_algorithm<A: Copy>(all: &[A], name: fn(A) -> &'static str, s: &str) -> Result<A, BrokerError> {
    all.iter().copied().find(|a| name(*a) == s).ok_or_else(|| {
        let supported: Vec<&str> = all.iter().map(|a| name(*a)).collect();
        BrokerError::bad_parameter(format!(
            "The algorithm '{}' is not supported. Supported algorithms are {}.",
            printable(s),
            supported.join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(kty: KeyType, bits: u32) -> KeyVersion {
        KeyVersion {
            version: "0".repeat(32),
            kty,
            bits,
            key_ops: kty.default_ops(),
            attributes: KeyAttributes {
                enabled: true,
                not_before: None,
                expires: None,
                created: 0,
                updated: 0,
            },
            tags: BTreeMap::new(),
            n: vec![],
            e: vec![],
            crv: kty.is_ec().then_some(Curve::P256),
            x: vec![],
            y: vec![],
        }
    }

    const ALL_OPS: [CryptoOp; 4] =
        [CryptoOp::Encrypt, CryptoOp::Decrypt, CryptoOp::WrapKey, CryptoOp::UnwrapKey];

    #[test]
    fn disabled_key_refuses_every_crypto_operation() {
        let mut v = version(KeyType::Rsa, 2048);
        v.attributes.enabled = false;
        for op in ALL_OPS {
            let e = v.check_crypto(op, Algorithm::RsaOaep256, 0).unwrap_err();
            assert_eq!(e, BrokerError::KeyDisabled { operation: op.name() });
        }
    }

    #[test]
    fn expired_key_allows_unwrap_and_decrypt_and_refuses_wrap_and_encrypt() {
        let mut v = version(KeyType::Rsa, 2048);
        v.attributes.expires = Some(100);
        for (op, ok) in [
            (CryptoOp::UnwrapKey, true),
            (CryptoOp::Decrypt, true),
            (CryptoOp::WrapKey, false),
            (CryptoOp::Encrypt, false),
        ] {
            let r = v.check_crypto(op, Algorithm::RsaOaep256, 100);
            assert_eq!(r.is_ok(), ok, "{op:?}");
            if !ok {
                assert_eq!(r.unwrap_err().code(), "KeyExpired");
            }
        }
        assert!(v.check_crypto(CryptoOp::WrapKey, Algorithm::RsaOaep256, 99).is_ok());
    }

    #[test]
    fn not_yet_valid_key_allows_unwrap_and_decrypt_and_refuses_wrap_and_encrypt() {
        let mut v = version(KeyType::OctHsm, 256);
        v.attributes.not_before = Some(100);
        assert!(v.check_crypto(CryptoOp::UnwrapKey, Algorithm::A256Kw, 99).is_ok());
        assert!(v.check_crypto(CryptoOp::Decrypt, Algorithm::A256Gcm, 99).is_ok());
        let e = v.check_crypto(CryptoOp::WrapKey, Algorithm::A256Kw, 99).unwrap_err();
        assert_eq!(e.code(), "KeyNotYetValid");
        assert!(v.check_crypto(CryptoOp::WrapKey, Algorithm::A256Kw, 100).is_ok());
    }

    #[test]
    fn operation_missing_from_key_ops_is_forbidden() {
        let mut v = version(KeyType::Rsa, 2048);
        v.key_ops = vec![KeyOp::WrapKey, KeyOp::UnwrapKey];
        let e = v.check_crypto(CryptoOp::Decrypt, Algorithm::RsaOaep, 0).unwrap_err();
        assert_eq!(e.to_string(), "Operation decrypt is not permitted on this key.");
        assert_eq!(e.code(), "KeyOperationForbidden");
    }

    #[test]
    fn aes_algorithm_size_must_match_the_key() {
        let v = version(KeyType::OctHsm, 192);
        assert!(v.check_crypto(CryptoOp::WrapKey, Algorithm::A192Kw, 0).is_ok());
        assert!(v.check_crypto(CryptoOp::WrapKey, Algorithm::A256Kw, 0).is_err());
        assert!(v.check_crypto(CryptoOp::WrapKey, Algorithm::A192Gcm, 0).is_err());
        assert!(v.check_crypto(CryptoOp::Encrypt, Algorithm::A192Gcm, 0).is_ok());
        assert!(v.check_crypto(CryptoOp::Encrypt, Algorithm::RsaOaep, 0).is_err());
        let rsa = version(KeyType::RsaHsm, 3072);
        assert!(rsa.check_crypto(CryptoOp::WrapKey, Algorithm::A256Kw, 0).is_err());
    }

    #[test]
    fn algorithm_names_round_trip_and_unknown_ones_are_refused() {
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::parse(a.name()).unwrap(), a);
        }
        assert_eq!(Algorithm::parse("rsa-oaep").unwrap_err().code(), "BadParameter");
    }

    #[test]
    fn key_sizes_are_checked_per_type() {
        assert_eq!(KeyType::Rsa.size(0).unwrap(), 2048);
        assert_eq!(KeyType::OctHsm.size(0).unwrap(), 256);
        assert!(KeyType::Rsa.size(1024).is_err());
        assert!(KeyType::OctHsm.size(2048).is_err());
        assert_eq!(KeyType::RsaHsm.size(4096).unwrap(), 4096);
    }

    #[test]
    fn sign_follows_enabled_key_ops_algorithm_and_the_window_and_verify_ignores_the_window() {
        let mut ec = version(KeyType::Ec, 256);
        assert!(ec.check_sign(SignOp::Sign, SignatureAlgorithm::Es256, 0).is_ok());
        for alg in [SignatureAlgorithm::Es256K, SignatureAlgorithm::Es384, SignatureAlgorithm::Rs256] {
            assert_eq!(ec.check_sign(SignOp::Verify, alg, 0).unwrap_err().code(), "BadParameter", "{alg}");
        }
        ec.attributes.expires = Some(100);
        assert_eq!(
            ec.check_sign(SignOp::Sign, SignatureAlgorithm::Es256, 100).unwrap_err().code(),
            "KeyExpired"
        );
        assert!(ec.check_sign(SignOp::Verify, SignatureAlgorithm::Es256, 100).is_ok());
        ec.attributes.not_before = Some(50);
        let e = ec.check_sign(SignOp::Sign, SignatureAlgorithm::Es256, 49).unwrap_err();
        assert_eq!(e.code(), "KeyNotYetValid");
        ec.key_ops = vec![KeyOp::Verify];
        let e = ec.check_sign(SignOp::Sign, SignatureAlgorithm::Es256, 60).unwrap_err();
        assert_eq!(e.to_string(), "Operation sign is not permitted on this key.");
        ec.attributes.enabled = false;
        let e = ec.check_sign(SignOp::Verify, SignatureAlgorithm::Es256, 60).unwrap_err();
        assert_eq!(e, BrokerError::KeyDisabled { operation: "verify" });

        let rsa = version(KeyType::RsaHsm, 3072);
        for alg in SignatureAlgorithm::ALL {
            assert_eq!(rsa.check_sign(SignOp::Sign, alg, 0).is_ok(), alg.is_rsa(), "{alg}");
        }
        let oct = version(KeyType::OctHsm, 256);
        let e = oct.check_sign(SignOp::Sign, SignatureAlgorithm::Ps256, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Algorithm PS256 is not supported for operation sign on a key of type oct-HSM and size 256."
        );
    }

    #[test]
    fn an_ec_key_refuses_every_encryption_algorithm_as_a_bad_parameter() {
        let ec = version(KeyType::EcHsm, 256);
        for op in ALL_OPS {
            for alg in Algorithm::ALL {
                let e = ec.check_crypto(op, alg, 0).unwrap_err();
                assert_eq!(
                    e.to_string(),
                    format!(
                        "Algorithm {alg} is not supported for operation {} on a key of type EC-HSM and curve P-256.",
                        op.name()
                    )
                );
            }
        }
    }

    #[test]
    fn curves_and_signature_algorithms_parse_by_their_cloud_names() {
        assert_eq!(Curve::parse("").unwrap(), Curve::P256);
        for c in Curve::ALL {
            assert_eq!(Curve::parse(c.name()).unwrap(), c);
            assert_eq!(c.signature_algorithm().curve(), Some(c));
        }
        assert_eq!(Curve::parse("p-256").unwrap_err().code(), "BadParameter");
        for a in SignatureAlgorithm::ALL {
            assert_eq!(SignatureAlgorithm::parse(a.name()).unwrap(), a);
        }
        assert_eq!(KeyType::parse("EC-HSM").unwrap(), KeyType::EcHsm);
        assert_eq!(KeyType::Ec.default_ops(), vec![KeyOp::Sign, KeyOp::Verify]);
    }
}
