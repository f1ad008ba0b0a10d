//! `key …` and `random`: the KeyVault service of the broker (key lifecycle, backup and restore,
//! wrap, unwrap, encrypt and decrypt, sign and verify, random bytes), from the command line.

use std::collections::HashMap;
use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};

use super::error::{ArgError, CliError};
use super::render::{
    Out, clean_list, fields, json_fields, list_or_dash, list_out, rfc3339, rfc3339_opt, when, when_opt,
};
use super::session::Session;
use super::when::{When, parse_when, resolve_opt};
use crate::grpc::proto;

/// `tde-broker key …`
#[derive(Debug, clap::Subcommand)]
pub enum KeyCmd {
    /// Create a key, or a new version of an existing key.
    Create(CreateKeyArgs),
    /// Import private key material as a key or a new version.
    Import(ImportKeyArgs),
    /// Show a key (the newest version unless KEY_ID names one).
    Show {
        /// Key URI: https://{vault}.{suffix}/keys/{name}[/{version}].
        key_id: String,
    },
    /// List the keys of a vault.
    List {
        /// Vault name.
        vault: String,
    },
    /// List every version of a key.
    Versions {
        /// Key URI (unversioned).
        key_id: String,
    },
    /// Change attributes, operations or tags of a key version; never its material.
    Update(UpdateKeyArgs),
    /// Create a new version with the same type and size.
    Rotate {
        /// Key URI.
        key_id: String,
    },
    /// Show or set a key's rotation policy.
    #[command(subcommand)]
    RotationPolicy(RotationPolicyCmd),
    /// Soft-delete every version of a key.
    Delete {
        /// Key URI.
        key_id: String,
    },
    /// List the soft-deleted keys of a vault.
    Deleted {
        /// Vault name.
        vault: String,
    },
    /// Recover a soft-deleted key.
    Recover {
        /// Vault name.
        vault: String,
        /// Key name.
        name: String,
    },
    /// Purge a soft-deleted key for good.
    Purge {
        /// Vault name.
        vault: String,
        /// Key name.
        name: String,
    },
    /// Write an encrypted backup blob of every version of a key to a file.
    Backup {
        /// Key URI.
        key_id: String,
        /// Where to write the blob (raw bytes).
        #[arg(long = "out", alias = "file", value_name = "PATH")]
        out: PathBuf,
    },
    /// Restore a key from a backup blob.
    Restore {
        /// Vault name.
        vault: String,
        /// The blob written by `key backup`.
        #[arg(long = "in", alias = "file", value_name = "PATH")]
        input: PathBuf,
    },
    /// Wrap a key (e.g. a DEK) with this key.
    Wrap(CryptoArgs),
    /// Unwrap a wrapped key.
    Unwrap(CryptoArgs),
    /// Encrypt a value.
    Encrypt(CryptoArgs),
    /// Decrypt a value.
    Decrypt(CryptoArgs),
    /// Sign a digest (or a file, hashed here with the algorithm's hash).
    Sign(SignArgs),
    /// Verify a signature of a digest (or of a file); exits 1 when it does not verify.
    Verify(VerifyArgs),
}

/// The digest to sign or verify: given, or the hash of a file.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("digest_source").required(true).args(["digest_hex", "digest_b64", "input"])))]
pub struct DigestArgs {
    /// The digest, hex (32 bytes for *256, 48 for *384, 64 for *512).
    #[arg(long, value_name = "HEX")]
    pub digest_hex: Option<String>,
    /// The digest, base64.
    #[arg(long, value_name = "B64")]
    pub digest_b64: Option<String>,
    /// A file whose hash (SHA-256, -384 or -512, after the algorithm) is the digest.
    #[arg(long = "in", value_name = "PATH")]
    pub input: Option<PathBuf>,
}

/// `key sign`
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// Key URI (unversioned = the newest version).
    pub key_id: String,
    /// Algorithm: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES256K, ES384, ES512.
    #[arg(long, value_name = "ALG")]
    pub alg: String,
    /// The digest.
    #[command(flatten)]
    pub digest: DigestArgs,
    /// Print the signature in hex instead of base64.
    #[arg(long)]
    pub hex: bool,
    /// Write the signature (raw bytes; R||S for EC keys) to this file instead of printing it.
    #[arg(long = "out", value_name = "PATH")]
    pub out: Option<PathBuf>,
}

/// `key verify`
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("signature_source").required(true).args(["signature_b64", "signature_hex", "signature_in"])))]
pub struct VerifyArgs {
    /// Key URI (unversioned = the newest version).
    pub key_id: String,
    /// Algorithm, as for `key sign`.
    #[arg(long, value_name = "ALG")]
    pub alg: String,
    /// The digest.
    #[command(flatten)]
    pub digest: DigestArgs,
    /// The signature, base64.
    #[arg(long, value_name = "B64")]
    pub signature_b64: Option<String>,
    /// The signature, hex.
    #[arg(long, value_name = "HEX")]
    pub signature_hex: Option<String>,
    /// Read the signature (raw bytes, as `key sign --out` writes it) from a file.
    #[arg(long, value_name = "PATH")]
    pub signature_in: Option<PathBuf>,
}

/// `random`
#[derive(Debug, clap::Args)]
pub struct RandomArgs {
    /// Vault name.
    pub vault: String,
    /// How many bytes: 1 to 128.
    #[arg(long, value_name = "N")]
    pub count: i32,
    /// Print them in hex instead of base64.
    #[arg(long)]
    pub hex: bool,
}

/// `tde-broker key rotation-policy …`
#[derive(Debug, clap::Subcommand)]
pub enum RotationPolicyCmd {
    /// Show the key's rotation policy (Key Vault's default when none was set).
    Show {
        /// Key URI (unversioned).
        key_id: String,
    },
    /// Set (replace) the key's rotation policy. Durations are ISO 8601: P90D, P3M, P1Y, PT12H.
    Set(SetRotationPolicyArgs),
}

/// `key rotation-policy set`
#[derive(Debug, clap::Args)]
pub struct SetRotationPolicyArgs {
    /// Key URI (unversioned).
    pub key_id: String,
    /// A version the policy rotates in expires this long after its creation (at least P28D).
    #[arg(long, value_name = "DURATION")]
    pub expiry_time: Option<String>,
    /// Rotate this long after the newest version was created (at least P7D).
    #[arg(long, value_name = "DURATION", conflicts_with = "rotate_before_expiry")]
    pub rotate_after_create: Option<String>,
    /// Rotate this long before the newest version expires (at least P7D).
    #[arg(long, value_name = "DURATION")]
    pub rotate_before_expiry: Option<String>,
    /// Notify this long before the newest version expires (at least P7D).
    #[arg(long, value_name = "DURATION")]
    pub notify_before_expiry: Option<String>,
}

/// Attributes, operations and tags given when a key is created or imported.
#[derive(Debug, clap::Args)]
pub struct KeyProps {
    /// Permitted operations, comma-separated (encrypt, decrypt, wrapKey, unwrapKey, …)
    /// [default: every one the key type supports].
    #[arg(long, value_delimiter = ',', value_name = "OPS")]
    pub ops: Vec<String>,
    /// Not valid before this time: Unix seconds, RFC 3339 (2027-01-15T08:00:00Z, 2027-01-15), or
    /// a move from the broker's now (+1h, -30m, +90d, now).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, value_parser = parse_when)]
    pub nbf: Option<When>,
    /// Expires at this time (same forms as --nbf).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, value_parser = parse_when)]
    pub exp: Option<When>,
    /// Create the key disabled.
    #[arg(long)]
    pub disabled: bool,
    /// A tag; repeat for more.
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
}

/// `key create`
#[derive(Debug, clap::Args)]
pub struct CreateKeyArgs {
    /// Vault name.
    pub vault: String,
    /// Key name.
    pub name: String,
    /// Key type: RSA, RSA-HSM, EC, EC-HSM or oct-HSM.
    #[arg(long, default_value = "RSA")]
    pub kty: String,
    /// RSA: 2048 (default), 3072, 4096; oct-HSM: 128, 192, 256 (default).
    #[arg(long, value_name = "N")]
    pub size: Option<i32>,
    /// EC and EC-HSM: the curve, P-256 (default), P-256K, P-384 or P-521.
    #[arg(long, value_name = "CRV")]
    pub crv: Option<String>,
    /// Attributes, operations and tags.
    #[command(flatten)]
    pub props: KeyProps,
}

/// `key import`
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["input", "pem_file", "der_file", "jwk_file"])))]
pub struct ImportKeyArgs {
    /// Vault name.
    pub vault: String,
    /// Key name.
    pub name: String,
    /// The private key: PEM ("PRIVATE KEY", "RSA PRIVATE KEY" or "EC PRIVATE KEY"), a private
    /// JSON Web Key (RSA, EC or oct), or PKCS#8 DER; told apart by their content.
    #[arg(long = "in", value_name = "PATH")]
    pub input: Option<PathBuf>,
    /// The private key as PEM (what --in reads when the file is PEM).
    #[arg(long, value_name = "PATH", hide = true)]
    pub pem_file: Option<PathBuf>,
    /// The private key as PKCS#8 DER.
    #[arg(long, value_name = "PATH", hide = true)]
    pub der_file: Option<PathBuf>,
    /// The private key as a JSON Web Key.
    #[arg(long, value_name = "PATH", hide = true)]
    pub jwk_file: Option<PathBuf>,
    /// Mark the key RSA-HSM (EC-HSM) instead of RSA (EC).
    #[arg(long)]
    pub hsm: bool,
    /// Attributes, operations and tags.
    #[command(flatten)]
    pub props: KeyProps,
}

/// `key update`
#[derive(Debug, clap::Args)]
pub struct UpdateKeyArgs {
    /// Key URI (unversioned = the newest version).
    pub key_id: String,
    /// Enable the key version.
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,
    /// Disable the key version.
    #[arg(long)]
    pub disable: bool,
    /// Not valid before this time: Unix seconds, RFC 3339 (2027-01-15T08:00:00Z, 2027-01-15), or
    /// a move from the broker's now (+1h, -30m, +90d, now).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, value_parser = parse_when, conflicts_with = "clear_nbf")]
    pub nbf: Option<When>,
    /// Expires at this time (same forms as --nbf).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, value_parser = parse_when, conflicts_with = "clear_exp")]
    pub exp: Option<When>,
    /// Remove the activation time.
    #[arg(long)]
    pub clear_nbf: bool,
    /// Remove the expiry time.
    #[arg(long)]
    pub clear_exp: bool,
    /// Replace the permitted operations (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "OPS")]
    pub ops: Vec<String>,
    /// Replace the tags; repeat for more.
    #[arg(long = "tag", value_name = "K=V", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
}

/// `key wrap|unwrap|encrypt|decrypt`
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("value_source").required(true).args(["value_b64", "value_hex", "input"])))]
pub struct CryptoArgs {
    /// Key URI (unversioned = the newest version).
    pub key_id: String,
    /// Algorithm: RSA-OAEP, RSA-OAEP-256, RSA1_5, A256KW, A256GCM, A256CBCPAD, …
    #[arg(long, value_name = "ALG")]
    pub alg: String,
    /// The input value, base64.
    #[arg(long, value_name = "B64")]
    pub value_b64: Option<String>,
    /// The input value, hex.
    #[arg(long, value_name = "HEX")]
    pub value_hex: Option<String>,
    /// Read the input value (raw bytes) from a file.
    #[arg(long = "in", value_name = "PATH")]
    pub input: Option<PathBuf>,
    /// Print the result's value (and iv, tag) in hex instead of base64.
    #[arg(long)]
    pub hex: bool,
    /// Write the result's value (raw bytes) to this file, readable by its owner only, instead of
    /// printing it; iv and tag are still printed.
    #[arg(long = "out", value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Initialization vector, base64 (AES).
    #[arg(long, value_name = "B64")]
    pub iv_b64: Option<String>,
    /// Additional authenticated data, base64 (AES-GCM).
    #[arg(long, value_name = "B64")]
    pub aad_b64: Option<String>,
    /// Authentication tag, base64 (AES-GCM decrypt).
    #[arg(long, value_name = "B64")]
    pub tag_b64: Option<String>,
}

/// Builds the request of a crypto operation (`proto::$request`) from its arguments.
macro_rules! crypto_request {
    ($request:ident, $args:expr) => {{
        let a: CryptoArgs = $args;
        let i = CryptoInput::read(&a)?;
        proto::$request {
            key_id: a.key_id,
            algorithm: a.alg,
            value: i.value,
            iv: i.iv,
            aad: i.aad,
            tag: i.tag,
        }
    }};
}

/// Every key of a paged listing: `s.keys().$method` with `$request`, then again with each next
/// page token.
macro_rules! every_page {
    ($s:expr, $method:ident, $request:expr) => {{
        let mut request = $request;
        let mut items = Vec::new();
        loop {
            let page = $s.call($s.keys().$method(request.clone())).await?;
            items.extend(page.keys);
            if !next_page(&mut request.page_token, page.next_page_token) {
                break items;
            }
        }
    }};
}

/// `key …`.
pub(super) async fn key(s: &Session, cmd: KeyCmd) -> Result<Out, CliError> {
    match cmd {
        KeyCmd::Create(a) => {
            let attributes = Some(new_attributes(s, &a.props).await?);
            let request = proto::CreateKeyRequest {
                vault_name: a.vault,
                name: a.name,
                kty: a.kty,
                key_size: a.size.unwrap_or(0),
                key_ops: clean_list(a.props.ops),
                attributes,
                tags: a.props.tags.into_iter().collect(),
                crv: a.crv.unwrap_or_default(),
            };
            Ok(bundle_out(&s.call(s.keys().create_key(request)).await?))
        }
        KeyCmd::Import(a) => {
            let attributes = Some(new_attributes(s, &a.props).await?);
            let mut request = proto::ImportKeyRequest {
                vault_name: a.vault,
                name: a.name,
                hsm: a.hsm,
                key_ops: clean_list(a.props.ops),
                attributes,
                tags: a.props.tags.into_iter().collect(),
                ..Default::default()
            };
            if let Some(path) = &a.input {
                let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(CliError::io(path))?);
                let text = || String::from_utf8_lossy(&bytes).into_owned();
                match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
                    Some(b'-') => request.pem = text(),
                    Some(b'{') => request.jwk_json = text(),
                    _ => request.pkcs8_der = bytes.to_vec(),
                }
            } else if let Some(path) = &a.pem_file {
                request.pem = std::fs::read_to_string(path).map_err(CliError::io(path))?;
            } else if let Some(path) = &a.der_file {
                request.pkcs8_der = std::fs::read(path).map_err(CliError::io(path))?;
            } else if let Some(path) = &a.jwk_file {
                request.jwk_json = std::fs::read_to_string(path).map_err(CliError::io(path))?;
            }
            Ok(bundle_out(&s.call(s.keys().import_key(request)).await?))
        }
        KeyCmd::Show { key_id } => {
            Ok(bundle_out(&s.call(s.keys().get_key(proto::GetKeyRequest { key_id })).await?))
        }
        KeyCmd::List { vault } => {
            let request = proto::ListKeysRequest { vault_name: vault, ..Default::default() };
            let items = every_page!(s, list_keys, request);
            Ok(items_out(&items, "NAME", |kid| kid_parts(kid).0))
        }
        KeyCmd::Versions { key_id } => {
            let request = proto::ListKeyVersionsRequest { key_id, ..Default::default() };
            let items = every_page!(s, list_key_versions, request);
            Ok(items_out(&items, "VERSION", |kid| kid_parts(kid).1))
        }
        KeyCmd::Update(a) => {
            let enabled = if a.enable {
                Some(true)
            } else if a.disable {
                Some(false)
            } else {
                None
            };
            let request = proto::UpdateKeyRequest {
                key_id: a.key_id,
                enabled,
                not_before: resolve_opt(a.nbf, s).await?,
                expires: resolve_opt(a.exp, s).await?,
                key_ops: clean_list(a.ops),
                tags: a.tags.into_iter().collect(),
                clear_not_before: a.clear_nbf,
                clear_expires: a.clear_exp,
            };
            Ok(bundle_out(&s.call(s.keys().update_key(request)).await?))
        }
        KeyCmd::Rotate { key_id } => {
            Ok(bundle_out(&s.call(s.keys().rotate_key(proto::RotateKeyRequest { key_id })).await?))
        }
        KeyCmd::RotationPolicy(RotationPolicyCmd::Show { key_id }) => {
            let request = proto::GetKeyRotationPolicyRequest { key_id };
            Ok(rotation_policy_out(&s.call(s.keys().get_key_rotation_policy(request)).await?))
        }
        KeyCmd::RotationPolicy(RotationPolicyCmd::Set(a)) => {
            let action =
                |action: &str, after: Option<String>, before: Option<String>| proto::LifetimeAction {
                    action: action.to_string(),
                    time_after_create: after.unwrap_or_default(),
                    time_before_expiry: before.unwrap_or_default(),
                };
            let mut lifetime_actions = Vec::new();
            if a.rotate_after_create.is_some() || a.rotate_before_expiry.is_some() {
                lifetime_actions.push(action("Rotate", a.rotate_after_create, a.rotate_before_expiry));
            }
            if a.notify_before_expiry.is_some() {
                lifetime_actions.push(action("Notify", None, a.notify_before_expiry));
            }
            let request = proto::UpdateKeyRotationPolicyRequest {
                key_id: a.key_id,
                policy: Some(proto::KeyRotationPolicy {
                    expiry_time: a.expiry_time.unwrap_or_default(),
                    lifetime_actions,
                    ..Default::default()
                }),
            };
            Ok(rotation_policy_out(&s.call(s.keys().update_key_rotation_policy(request)).await?))
        }
        KeyCmd::Delete { key_id } => {
            Ok(deleted_out(&s.call(s.keys().delete_key(proto::DeleteKeyRequest { key_id })).await?))
        }
        KeyCmd::Deleted { vault } => {
            let request = proto::ListDeletedKeysRequest { vault_name: vault, ..Default::default() };
            let items = every_page!(s, list_deleted_keys, request);
            Ok(deleted_items_out(&items))
        }
        KeyCmd::Recover { vault, name } => {
            let request = proto::RecoverDeletedKeyRequest { vault_name: vault, name };
            Ok(bundle_out(&s.call(s.keys().recover_deleted_key(request)).await?))
        }
        KeyCmd::Purge { vault, name } => {
            let request = proto::PurgeDeletedKeyRequest { vault_name: vault.clone(), name: name.clone() };
            s.call(s.keys().purge_deleted_key(request)).await?;
            Ok(Out {
                json: json!({ "vault": vault, "purged": name }),
                table: format!("purged key {name} from {vault}\n"),
            })
        }
        KeyCmd::Backup { key_id, out } => {
            let backup = s.call(s.keys().backup_key(proto::BackupKeyRequest { key_id })).await?;
            std::fs::write(&out, &backup.blob).map_err(CliError::io(&out))?;
            let path = out.display().to_string();
            Ok(Out {
                json: json!({ "file": path, "bytes": backup.blob.len() }),
                table: format!("wrote {} bytes to {path}\n", backup.blob.len()),
            })
        }
        KeyCmd::Restore { vault, input } => {
            let blob = std::fs::read(&input).map_err(CliError::io(&input))?;
            let request = proto::RestoreKeyRequest { vault_name: vault, blob };
            Ok(bundle_out(&s.call(s.keys().restore_key(request)).await?))
        }
        KeyCmd::Wrap(a) => {
            let shown = Shown::of(&a);
            result_out(&s.call(s.keys().wrap_key(crypto_request!(WrapKeyRequest, a))).await?, shown)
        }
        KeyCmd::Unwrap(a) => {
            let shown = Shown::of(&a);
            result_out(&s.call(s.keys().unwrap_key(crypto_request!(UnwrapKeyRequest, a))).await?, shown)
        }
        KeyCmd::Encrypt(a) => {
            let shown = Shown::of(&a);
            result_out(&s.call(s.keys().encrypt(crypto_request!(EncryptRequest, a))).await?, shown)
        }
        KeyCmd::Decrypt(a) => {
            let shown = Shown::of(&a);
            result_out(&s.call(s.keys().decrypt(crypto_request!(DecryptRequest, a))).await?, shown)
        }
        KeyCmd::Sign(a) => {
            let digest = a.digest.read(&a.alg)?;
            let shown = Shown { hex: a.hex, out: a.out };
            let request = proto::SignRequest { key_id: a.key_id, algorithm: a.alg, digest };
            result_out(&s.call(s.keys().sign(request)).await?, shown)
        }
        KeyCmd::Verify(a) => Ok(verify(s, a).await?.0),
    }
}

/// `key verify`: the output, and whether the signature verified.
pub(super) async fn verify(s: &Session, a: VerifyArgs) -> Result<(Out, bool), CliError> {
    let digest = a.digest.read(&a.alg)?;
    let signature = if let Some(b64) = &a.signature_b64 {
        decode_b64("--signature-b64", b64)?
    } else if let Some(text) = &a.signature_hex {
        decode_hex(text)?
    } else if let Some(path) = &a.signature_in {
        std::fs::read(path).map_err(CliError::io(path))?
    } else {
        return Err(CliError::NoValue);
    };
    let request =
        proto::VerifyRequest { key_id: a.key_id.clone(), algorithm: a.alg.clone(), digest, signature };
    let valid = s.call(s.keys().verify(request)).await?.valid;
    let out = Out {
        json: json!({ "key_id": a.key_id, "algorithm": a.alg, "valid": valid }),
        table: fields(&[("key", a.key_id), ("algorithm", a.alg), ("valid", valid.to_string())]),
    };
    Ok((out, valid))
}

/// `random VAULT --count N`.
pub(super) async fn random(s: &Session, a: RandomArgs) -> Result<Out, CliError> {
    let request = proto::GetRandomBytesRequest { vault_name: a.vault, count: a.count };
    let value = s.call(s.keys().get_random_bytes(request)).await?.value;
    let text = if a.hex { hex::encode(&value) } else { B64.encode(&value) };
    Ok(Out { json: json!({ "value": text, "bytes": value.len() }), table: format!("{text}\n") })
}

impl DigestArgs {
    /// The digest: decoded, or the hash of the file with `alg`'s hash.
    fn read(&self, alg: &str) -> Result<Vec<u8>, CliError> {
        if let Some(text) = &self.digest_hex {
            decode_hex(text)
        } else if let Some(b64) = &self.digest_b64 {
            decode_b64("--digest-b64", b64)
        } else if let Some(path) = &self.input {
            let alg = crate::model::SignatureAlgorithm::parse(alg)
                .map_err(|e| CliError::UnknownAlgorithm(e.to_string()))?;
            let data = std::fs::read(path).map_err(CliError::io(path))?;
            Ok(crate::crypto::hash_for(alg, &data))
        } else {
            Err(CliError::NoValue)
        }
    }
}

/// Hex, forgiving about whitespace, colons and a `0x` prefix.
fn decode_hex(text: &str) -> Result<Vec<u8>, CliError> {
    let text: String = text.chars().filter(|c| !c.is_whitespace() && *c != ':').collect();
    let text = text.strip_prefix("0x").unwrap_or(&text);
    hex::decode(text).map_err(CliError::NotHex)
}

/// Advances a page token; false when the listing is complete (or the broker repeats itself).
fn next_page(current: &mut String, next: String) -> bool {
    if next.is_empty() || next == *current {
        return false;
    }
    *current = next;
    true
}

/// The decoded inputs of a crypto operation.
struct CryptoInput {
    /// The value to wrap, unwrap, encrypt or decrypt.
    value: Vec<u8>,
    /// AES initialization vector (empty: none).
    iv: Vec<u8>,
    /// AES-GCM additional authenticated data (empty: none).
    aad: Vec<u8>,
    /// AES-GCM authentication tag (empty: none).
    tag: Vec<u8>,
}

impl CryptoInput {
    /// Decodes the value (base64, hex or a file) and the optional AES inputs.
    fn read(a: &CryptoArgs) -> Result<Self, CliError> {
        let value = if let Some(b64) = &a.value_b64 {
            decode_b64("--value-b64", b64)?
        } else if let Some(text) = &a.value_hex {
            decode_hex(text)?
        } else if let Some(path) = &a.input {
            std::fs::read(path).map_err(CliError::io(path))?
        } else {
            return Err(CliError::NoValue);
        };
        let optional = |flag: &'static str, v: &Option<String>| {
            v.as_deref().map_or(Ok(Vec::new()), |t| decode_b64(flag, t))
        };
        Ok(CryptoInput {
            value,
            iv: optional("--iv-b64", &a.iv_b64)?,
            aad: optional("--aad-b64", &a.aad_b64)?,
            tag: optional("--tag-b64", &a.tag_b64)?,
        })
    }
}

/// Standard base64, forgiving about padding and the URL-safe alphabet.
fn decode_b64(flag: &'static str, text: &str) -> Result<Vec<u8>, CliError> {
    let text = text.trim();
    B64.decode(text).or_else(|source| {
        [&STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(text).ok())
            .ok_or(CliError::NotBase64 { flag, source })
    })
}

/// The attributes a new key starts with.
/// The attributes of a new key or version; relative times count from the broker's clock.
async fn new_attributes(s: &Session, props: &KeyProps) -> Result<proto::KeyAttributes, CliError> {
    Ok(proto::KeyAttributes {
        enabled: props.disabled.then_some(false),
        not_before: resolve_opt(props.nbf, s).await?,
        expires: resolve_opt(props.exp, s).await?,
        ..Default::default()
    })
}

/// `KEY=VALUE` (the key trimmed and not empty; the value as given).
fn parse_tag(text: &str) -> Result<(String, String), ArgError> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(ArgError::Tag(text.to_string())),
    }
}

/// A key version's fields.
/// A rotation policy: its id, times and lifetime actions.
fn rotation_policy_out(p: &proto::KeyRotationPolicy) -> Out {
    let actions: Vec<Value> = p
        .lifetime_actions
        .iter()
        .map(|a| {
            json!({
                "action": a.action,
                "time_after_create": a.time_after_create,
                "time_before_expiry": a.time_before_expiry,
            })
        })
        .collect();
    let json = json!({
        "id": p.id,
        "expiry_time": p.expiry_time,
        "lifetime_actions": actions,
        "created": p.created,
        "updated": p.updated,
    });
    let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    let mut rows = vec![
        ("id", p.id.clone()),
        ("expiry time", dash(&p.expiry_time)),
        ("created", if p.created == 0 { "- (default policy)".to_string() } else { when(p.created) }),
        ("updated", if p.updated == 0 { "-".to_string() } else { when(p.updated) }),
    ];
    for a in &p.lifetime_actions {
        let trigger = if a.time_after_create.is_empty() {
            format!("{} before expiry", a.time_before_expiry)
        } else {
            format!("{} after creation", a.time_after_create)
        };
        rows.push(("lifetime action", format!("{} {trigger}", a.action)));
    }
    Out { json, table: fields(&rows) }
}

fn bundle_out(b: &proto::KeyBundle) -> Out {
    Out { json: bundle_json(b), table: fields(&bundle_rows(b)) }
}

/// A key version under its wire field names; bytes as standard base64.
fn bundle_json(b: &proto::KeyBundle) -> Value {
    let key = b.key.clone().unwrap_or_default();
    json!({
        "kid": key.kid,
        "kty": key.kty,
        "key_ops": key.key_ops,
        "n": B64.encode(&key.n),
        "e": B64.encode(&key.e),
        "crv": key.crv,
        "x": B64.encode(&key.x),
        "y": B64.encode(&key.y),
        "attributes": attributes_json(b.attributes.as_ref()),
        "tags": tags_json(&b.tags),
    })
}

/// The `field  value` rows of a key version.
fn bundle_rows(b: &proto::KeyBundle) -> Vec<(&'static str, String)> {
    let key = b.key.clone().unwrap_or_default();
    let a = b.attributes.clone().unwrap_or_default();
    let mut rows = vec![
        ("kid", key.kid),
        ("kty", key.kty),
        ("key ops", list_or_dash(&key.key_ops)),
        ("enabled", a.enabled.unwrap_or(true).to_string()),
        ("not before", when_opt(a.not_before)),
        ("expires", when_opt(a.expires)),
        ("created", when(a.created)),
        ("updated", when(a.updated)),
        ("recoverable days", a.recoverable_days.to_string()),
        ("recovery level", a.recovery_level),
        ("tags", tags_text(&b.tags)),
    ];
    if !key.n.is_empty() {
        let leading_zeros = key.n.iter().take_while(|b| **b == 0).count();
        rows.push(("modulus", format!("{} bits", (key.n.len() - leading_zeros) * 8)));
        rows.push(("exponent", B64.encode(&key.e)));
    }
    if !key.crv.is_empty() {
        rows.push(("curve", key.crv.clone()));
        rows.push(("x", B64.encode(&key.x)));
        rows.push(("y", B64.encode(&key.y)));
    }
    rows
}

/// `key delete`: the deleted key and when it goes for good.
fn deleted_out(d: &proto::DeletedKeyBundle) -> Out {
    let mut rows = d.key.as_ref().map(bundle_rows).unwrap_or_default();
    rows.push(("recovery id", d.recovery_id.clone()));
    rows.push(("deleted", when(d.deleted_date)));
    rows.push(("scheduled purge", when(d.scheduled_purge_date)));
    Out { json: deleted_json(d), table: fields(&rows) }
}

/// A deleted key under its wire field names.
fn deleted_json(d: &proto::DeletedKeyBundle) -> Value {
    let mut json = d.key.as_ref().map(bundle_json).unwrap_or_else(|| Value::Object(Map::new()));
    json["recovery_id"] = json!(d.recovery_id);
    json["deleted_date"] = json!(d.deleted_date);
    json["scheduled_purge_date"] = json!(d.scheduled_purge_date);
    json
}

/// `key deleted`: the soft-deleted keys of a vault.
fn deleted_items_out(items: &[proto::DeletedKeyBundle]) -> Out {
    list_out(items, deleted_json, &["NAME", "DELETED", "PURGE-AFTER", "RECOVERY-ID"], |d| {
        let kid = d.key.as_ref().and_then(|b| b.key.as_ref()).map(|k| k.kid.as_str()).unwrap_or("");
        vec![
            kid_parts(kid).0,
            rfc3339(d.deleted_date),
            rfc3339(d.scheduled_purge_date),
            d.recovery_id.clone(),
        ]
    })
}

/// Key listings: the first column comes from the kid (name or version), the full kid last.
fn items_out(items: &[proto::KeyItem], first: &str, column: impl Fn(&str) -> String) -> Out {
    let json = |item: &proto::KeyItem| {
        let (attributes, tags) = (attributes_json(item.attributes.as_ref()), tags_json(&item.tags));
        json!({ "kid": item.kid, "attributes": attributes, "tags": tags })
    };
    list_out(items, json, &[first, "ENABLED", "NBF", "EXP", "UPDATED", "KID"], |item| {
        let a = item.attributes.clone().unwrap_or_default();
        vec![
            column(&item.kid),
            a.enabled.unwrap_or(true).to_string(),
            rfc3339_opt(a.not_before),
            rfc3339_opt(a.expires),
            rfc3339(a.updated),
            item.kid.clone(),
        ]
    })
}

/// The result of a crypto operation.
/// How a crypto result's bytes are shown: `--hex` or base64, and `--out` for the value.
struct Shown {
    hex: bool,
    out: Option<PathBuf>,
}

impl Shown {
    fn of(a: &CryptoArgs) -> Self {
        Shown { hex: a.hex, out: a.out.clone() }
    }

    fn text(&self, bytes: &[u8]) -> String {
        if self.hex { hex::encode(bytes) } else { B64.encode(bytes) }
    }
}

fn result_out(r: &proto::KeyOperationResult, shown: Shown) -> Result<Out, CliError> {
    let mut json = json!({ "kid": r.kid, "iv": shown.text(&r.iv), "tag": shown.text(&r.tag) });
    let mut rows = vec![("kid", r.kid.clone())];
    match &shown.out {
        // An unwrapped DEK is a secret: the file is private from its creation.
        Some(path) => {
            crate::store::datadir::write_durably(path, &r.value, 0o600)
                .map_err(|(path, source)| CliError::Io { path, source })?;
            json["out"] = json!(path.display().to_string());
            json["bytes"] = json!(r.value.len());
            rows.push(("out", format!("wrote {} bytes to {}", r.value.len(), path.display())));
        }
        None => {
            json["value"] = json!(shown.text(&r.value));
            rows.push(("value", shown.text(&r.value)));
        }
    }
    if !r.iv.is_empty() {
        rows.push(("iv", shown.text(&r.iv)));
    }
    if !r.tag.is_empty() {
        rows.push(("tag", shown.text(&r.tag)));
    }
    Ok(Out { json, table: fields(&rows) })
}

/// Key attributes under their wire field names (enabled unless said otherwise).
fn attributes_json(a: Option<&proto::KeyAttributes>) -> Value {
    let a = a.cloned().unwrap_or_default();
    let mut json = json_fields!(a; not_before, expires, created, updated, recoverable_days, recovery_level);
    json["enabled"] = json!(a.enabled.unwrap_or(true));
    json
}

/// Tags as a JSON object.
fn tags_json(tags: &HashMap<String, String>) -> Value {
    Value::Object(tags.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
}

/// Tags as sorted `k=v` pairs, or `-`.
fn tags_text(tags: &HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    list_or_dash(&pairs)
}

/// `(name, version)` of a key URI `https://{vault}.{suffix}/keys/{name}[/{version}]`; the whole
/// text as the name when it is not one.
fn kid_parts(kid: &str) -> (String, String) {
    let rest = kid.find("/keys/").map(|i| &kid[i + "/keys/".len()..]).unwrap_or(kid);
    let mut parts = rest.splitn(2, '/');
    let name = parts.next().unwrap_or_default().to_string();
    let version = parts.next().unwrap_or_default().trim_end_matches('/').to_string();
    (name, version)
}
