//! Azure Key Vault's keys REST API: its paths, verbs, JSON bodies and status codes, each route
//! calling the same broker operation as its gRPC twin in `grpc::keyvault`.
//!
//! The vault is the Host's first label (`<vault>.vault.localhost[:port]`, or
//! `<vault>.<vault-dns-suffix>`). Paths match case-insensitively, a trailing slash is tolerated,
//! and the version segment may be left out where Key Vault allows it (the newest version). Every
//! key id in a response uses the scheme, host and port the client called.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{RestError, to_rest};
use crate::broker::Broker;
use crate::broker::keys::{
    CryptoRequest, DeletedKeyView, KeyItemView, KeyUpdate, KeyView, LOCAL_VAULT_DOMAIN, NewAttributes,
    NewKey, NewMaterial, RotationPolicyView, SignRequest,
};
use crate::model::rotation::LifetimeActionSpec;
use crate::model::{BrokerError, Caller, CryptoOp, Curve, KeyAttributes, KeyType, KeyVersion, SignOp};

/// The `api-version`s served: Key Vault's 7.0 to 7.6 (and their previews) and 2025-07-01.
pub const API_VERSIONS: [&str; 8] = ["7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01"];
/// The newest `api-version`, named in the refusal of an unknown one.
pub const LATEST_API_VERSION: &str = "2025-07-01";

/// One Key Vault operation: its name in metrics and audit records is `KeyVault/<name>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `POST /keys/{name}/create`.
    CreateKey,
    /// `PUT /keys/{name}`.
    ImportKey,
    /// `GET /keys/{name}[/{version}]`.
    GetKey,
    /// `GET /keys`.
    ListKeys,
    /// `GET /keys/{name}/versions`.
    ListKeyVersions,
    /// `PATCH /keys/{name}[/{version}]`.
    UpdateKey,
    /// `DELETE /keys/{name}`.
    DeleteKey,
    /// `GET /deletedkeys/{name}`.
    GetDeletedKey,
    /// `GET /deletedkeys`.
    ListDeletedKeys,
    /// `POST /deletedkeys/{name}/recover`.
    RecoverDeletedKey,
    /// `DELETE /deletedkeys/{name}`.
    PurgeDeletedKey,
    /// `POST /keys/{name}/backup`.
    BackupKey,
    /// `POST /keys/restore`.
    RestoreKey,
    /// `POST /keys/{name}/rotate`.
    RotateKey,
    /// `GET /keys/{name}/rotationpolicy`.
    GetKeyRotationPolicy,
    /// `PUT /keys/{name}/rotationpolicy`.
    UpdateKeyRotationPolicy,
    /// `POST /keys/{name}[/{version}]/wrapkey`.
    WrapKey,
    /// `POST /keys/{name}[/{version}]/unwrapkey`.
    UnwrapKey,
    /// `POST /keys/{name}[/{version}]/encrypt`.
    Encrypt,
    /// `POST /keys/{name}[/{version}]/decrypt`.
    Decrypt,
    /// `POST /keys/{name}[/{version}]/sign`.
    Sign,
    /// `POST /keys/{name}[/{version}]/verify`.
    Verify,
    /// `POST /rng`.
    GetRandomBytes,
}

impl Op {
    /// `KeyVault/<operation>`, as metrics and audit records name it.
    pub fn operation(self) -> &'static str {
        use Op::*;
        match self {
            CreateKey => "KeyVault/CreateKey",
            ImportKey => "KeyVault/ImportKey",
            GetKey => "KeyVault/GetKey",
            ListKeys => "KeyVault/ListKeys",
            ListKeyVersions => "KeyVault/ListKeyVersions",
            UpdateKey => "KeyVault/UpdateKey",
            DeleteKey => "KeyVault/DeleteKey",
            GetDeletedKey => "KeyVault/GetDeletedKey",
            ListDeletedKeys => "KeyVault/ListDeletedKeys",
            RecoverDeletedKey => "KeyVault/RecoverDeletedKey",
            PurgeDeletedKey => "KeyVault/PurgeDeletedKey",
            BackupKey => "KeyVault/BackupKey",
            RestoreKey => "KeyVault/RestoreKey",
            RotateKey => "KeyVault/RotateKey",
            GetKeyRotationPolicy => "KeyVault/GetKeyRotationPolicy",
            UpdateKeyRotationPolicy => "KeyVault/UpdateKeyRotationPolicy",
            WrapKey => "KeyVault/WrapKey",
            UnwrapKey => "KeyVault/UnwrapKey",
            Encrypt => "KeyVault/Encrypt",
            Decrypt => "KeyVault/Decrypt",
            Sign => "KeyVault/Sign",
            Verify => "KeyVault/Verify",
            GetRandomBytes => "KeyVault/GetRandomBytes",
        }
    }
}

/// A request matched to an operation: the key name and version its path gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The operation.
    pub op: Op,
    /// The key's name, as written.
    pub name: Option<String>,
    /// The version, when the path names one.
    pub version: Option<String>,
}

/// The operation name of a request that matched no route (metrics and audit records).
pub const UNKNOWN_OPERATION: &str = "KeyVault/Unknown";

/// The vault a Host header names: `<vault>.vault.localhost[:port]` or `<vault>.<suffix>[:port]`.
pub fn vault_of_host(host: &str, suffix: &str) -> Option<String> {
    let name = host_without_port(host);
    [LOCAL_VAULT_DOMAIN, suffix.trim_matches('.')].iter().find_map(|domain| {
        let cut = name.len().checked_sub(domain.len() + 1)?;
        let (vault, rest) = (name.get(..cut)?, name.get(cut..)?);
        (rest.starts_with('.')
            && rest[1..].eq_ignore_ascii_case(domain)
            && !vault.is_empty()
            && !vault.contains('.'))
        .then(|| vault.to_ascii_lowercase())
    })
}

/// The host of a `host[:port]` (IPv6 literals in brackets kept whole).
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| h).trim_start_matches('[');
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// The port of a `host[:port]`, when it has one.
pub fn port_of_host(host: &str) -> Option<&str> {
    let after = if host.starts_with('[') { host.split_once(']')?.1 } else { host };
    after.rsplit_once(':').map(|(_, p)| p).filter(|p| !p.is_empty())
}

fn is_version(segment: &str) -> bool {
    segment.len() == 32 && segment.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Matches a method and path to a Key Vault operation (case-insensitive, trailing slash
/// tolerated, version segment optional or empty where Key Vault allows it). `None`: not a route.
pub fn route(method: &Method, path: &str) -> Option<Route> {
    // Empty segments are dropped: a trailing slash, and the empty version the SDKs put in
    // `/keys/{name}//wrapkey` when a key id has none, both mean "the newest version".
    // Percent-encoded segments are decoded (`%2D` is a hyphen in a key name).
    let decoded: Vec<std::borrow::Cow<'_, str>> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| if s.contains('%') { percent_decode(s, false).into() } else { s.into() })
        .collect();
    let segments: Vec<&str> = decoded.iter().map(|s| s.as_ref()).collect();
    let lower: Vec<String> = segments.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    let named = |op: Op, name: &str, version: Option<&str>| {
        Some(Route { op, name: Some(name.to_string()), version: version.map(str::to_ascii_lowercase) })
    };
    let bare = |op: Op| Some(Route { op, name: None, version: None });
    let crypto = |segment: &str| match segment {
        "wrapkey" => Some(Op::WrapKey),
        "unwrapkey" => Some(Op::UnwrapKey),
        "encrypt" => Some(Op::Encrypt),
        "decrypt" => Some(Op::Decrypt),
        "sign" => Some(Op::Sign),
        "verify" => Some(Op::Verify),
        _ => None,
    };
    let m = method;
    match (l.as_slice(), segments.as_slice()) {
        (["keys"], _) if m == Method::GET => bare(Op::ListKeys),
        (["keys", "restore"], _) if m == Method::POST => bare(Op::RestoreKey),
        (["keys", _], [_, name]) => match *m {
            Method::GET => named(Op::GetKey, name, None),
            Method::PUT => named(Op::ImportKey, name, None),
            Method::PATCH => named(Op::UpdateKey, name, None),
            Method::DELETE => named(Op::DeleteKey, name, None),
            _ => None,
        },
        (["keys", _, "create"], [_, name, _]) if m == Method::POST => named(Op::CreateKey, name, None),
        (["keys", _, "versions"], [_, name, _]) if m == Method::GET => named(Op::ListKeyVersions, name, None),
        (["keys", _, "backup"], [_, name, _]) if m == Method::POST => named(Op::BackupKey, name, None),
        (["keys", _, "rotate"], [_, name, _]) if m == Method::POST => named(Op::RotateKey, name, None),
        (["keys", _, "rotationpolicy"], [_, name, _]) if m == Method::GET => {
            named(Op::GetKeyRotationPolicy, name, None)
        }
        (["keys", _, "rotationpolicy"], [_, name, _]) if m == Method::PUT => {
            named(Op::UpdateKeyRotationPolicy, name, None)
        }
        (["keys", _, op], [_, name, _]) if m == Method::POST && crypto(op).is_some() => {
            named(crypto(op)?, name, None)
        }
        (["keys", _, v], [_, name, _]) if is_version(v) => match *m {
            Method::GET => named(Op::GetKey, name, Some(v)),
            Method::PATCH => named(Op::UpdateKey, name, Some(v)),
            _ => None,
        },
        (["keys", _, v, op], [_, name, _, _]) if m == Method::POST && is_version(v) => {
            named(crypto(op)?, name, Some(v))
        }
        (["deletedkeys"], _) if m == Method::GET => bare(Op::ListDeletedKeys),
        (["deletedkeys", _], [_, name]) => match *m {
            Method::GET => named(Op::GetDeletedKey, name, None),
            Method::DELETE => named(Op::PurgeDeletedKey, name, None),
            _ => None,
        },
        (["deletedkeys", _, "recover"], [_, name, _]) if m == Method::POST => {
            named(Op::RecoverDeletedKey, name, None)
        }
        (["rng"], _) if m == Method::POST => bare(Op::GetRandomBytes),
        _ => None,
    }
}

/// The query's value of `name` (first occurrence, percent-decoded), names compared
/// case-insensitively.
pub fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        // Names are percent-decoded too: the JavaScript SDK sends `api%2Dversion`.
        let matches = if k.contains('%') {
            percent_decode(k, true).eq_ignore_ascii_case(name)
        } else {
            k.eq_ignore_ascii_case(name)
        };
        matches.then(|| percent_decode(v, true))
    })
}

/// Decodes `%XX` escapes (and, in a query, `+` as a space); a malformed escape stays as it is.
fn percent_decode(s: &str, query: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if query => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks `api-version`: present and one Key Vault serves (its previews too).
pub fn check_api_version(query: Option<&str>) -> Result<String, RestError> {
    let given = query_value(query, "api-version").unwrap_or_default();
    let base = given.split_once("-preview").map_or(given.as_str(), |(b, _)| b);
    if API_VERSIONS.contains(&base) {
        Ok(given)
    } else {
        Err(RestError::bad_parameter(format!(
            "The specified version ({}) is not recognized. Consider using the latest supported version ({LATEST_API_VERSION}).",
            crate::model::ids::printable(&given)
        )))
    }
}

/// Decodes base64url, padded or not (the standard alphabet is accepted too).
pub fn b64url_decode(field: &str, text: &str) -> Result<Vec<u8>, RestError> {
    let unpadded = text.trim_end_matches('=').as_bytes();
    // The SDKs send base64url: decoded where it lies. Only the standard alphabet is copied, to
    // map `+/` to `-_`.
    let decoded = if unpadded.iter().any(|b| matches!(b, b'+' | b'/')) {
        let mapped: Vec<u8> = unpadded
            .iter()
            .map(|b| match b {
                b'+' => b'-',
                b'/' => b'_',
                b => *b,
            })
            .collect();
        B64URL.decode(mapped)
    } else {
        B64URL.decode(unpadded)
    };
    decoded.map_err(|_| {
        RestError::bad_parameter(format!("Property {field} has invalid value: it is not base64url.\r\n"))
    })
}

/// Encodes base64url without padding, as Key Vault does.
pub fn b64url(bytes: &[u8]) -> String {
    B64URL.encode(bytes)
}

/// What a Key Vault request needs besides its route: the vault, the base URL the client called
/// (`https://<host>`), the query and the body.
pub struct Call<'a> {
    /// The vault, lower-cased.
    pub vault: &'a str,
    /// `https://<host as the client sent it>`.
    pub base: &'a str,
    /// The request's query string.
    pub query: Option<&'a str>,
    /// The request body.
    pub body: &'a [u8],
    /// The `api-version` the client sent (echoed in nextLinks).
    pub api_version: &'a str,
}

/// The Key Vault API over one broker.
pub struct KeyVaultApi {
    broker: Arc<Broker>,
}

/// A successful answer: a status and a serialized JSON body (none for 204).
pub type Answer = (StatusCode, Option<bytes::Bytes>);

/// A crypto operation's result, serialized straight from the broker's buffers (no JSON tree:
/// this is the hot path, and the plaintext of an unwrap is copied once, into the body).
#[derive(serde::Serialize)]
struct CryptoOut<'a> {
    kid: &'a str,
    value: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    iv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

impl KeyVaultApi {
    /// Serves `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        KeyVaultApi { broker }
    }

    /// The resource a route names, for the audit record: the key id in the broker's form, or
    /// the vault.
    pub fn resource(&self, vault: &str, route: &Route) -> String {
        match &route.name {
            Some(name) => self.key_id(vault, name, route.version.as_deref()),
            None => vault.to_string(),
        }
    }

    fn key_id(&self, vault: &str, name: &str, version: Option<&str>) -> String {
        crate::model::ids::key_uri(vault, &self.broker.settings.vault_dns_suffix, name, version)
    }

    /// Runs a matched route as `caller`.
    pub async fn run(&self, caller: &Caller, route: &Route, call: &Call<'_>) -> Result<Answer, RestError> {
        let b = &self.broker;
        let ids =
            Ids { canonical: crate::model::ids::vault_uri(call.vault, &b.settings.vault_dns_suffix), call };
        let name = route.name.as_deref().unwrap_or_default();
        let key_id = || self.key_id(call.vault, name, route.version.as_deref());
        let ok = |v: Value| Ok((StatusCode::OK, Some(bytes::Bytes::from(v.to_string()))));
        match route.op {
            Op::CreateKey => {
                let r: CreateBody = parse_body(call.body)?;
                if r.public_exponent.is_some_and(|e| e != 65537) {
                    return Err(RestError::bad_parameter(
                        "Property public_exponent has invalid value: only 65537 is supported.\r\n",
                    ));
                }
                let kty = KeyType::parse(&r.kty).map_err(to_rest)?;
                let curve = match r.crv.as_deref() {
                    None | Some("") => None,
                    Some(c) => Some(Curve::parse(c).map_err(to_rest)?),
                };
                let key = NewKey {
                    vault: call.vault.to_string(),
                    name: name.to_string(),
                    material: NewMaterial::Generate { kty, size: r.key_size.unwrap_or(0), curve },
                    key_ops: r.key_ops.unwrap_or_default(),
                    attributes: r.attributes.map(AttributesBody::new_attributes).unwrap_or_default(),
                    tags: r.tags.unwrap_or_default(),
                };
                let v = b.add_key_version(caller, key).await.map_err(to_rest)?;
                ok(ids.bundle(v))
            }
            Op::ImportKey => {
                let r: ImportBody = parse_body(call.body)?;
                // The JWK's own key_ops, when it has them, are the new version's.
                let key_ops: Vec<String> = r.key["key_ops"]
                    .as_array()
                    .map(|ops| ops.iter().filter_map(|o| o.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                let jwk = zeroize::Zeroizing::new(
                    serde_json::to_string(&r.key)
                        .map_err(|_| RestError::bad_parameter("Property key has invalid value\r\n"))?,
                );
                let key = crate::crypto::import_jwk(&jwk).map_err(|e| {
                    to_rest(BrokerError::bad_parameter(format!("The key to import is invalid: {e}.")))
                })?;
                let new = NewKey {
                    vault: call.vault.to_string(),
                    name: name.to_string(),
                    material: NewMaterial::Import { key, hsm: r.hsm.unwrap_or(false) },
                    key_ops,
                    attributes: r.attributes.map(AttributesBody::new_attributes).unwrap_or_default(),
                    tags: r.tags.unwrap_or_default(),
                };
                let v = b.add_key_version(caller, new).await.map_err(to_rest)?;
                ok(ids.bundle(v))
            }
            Op::GetKey => ok(ids.bundle(b.get_key(caller, &key_id()).map_err(to_rest)?)),
            Op::ListKeys | Op::ListKeyVersions | Op::ListDeletedKeys => {
                let page_size = match query_value(call.query, "maxresults") {
                    None => 0,
                    Some(text) => match text.trim().parse::<i32>() {
                        Ok(n) if (1..=25).contains(&n) => n,
                        _ => {
                            return Err(RestError::bad_parameter(format!(
                                "The value of maxresults ({}) is invalid. It must be between 1 and 25.",
                                crate::model::ids::printable(&text)
                            )));
                        }
                    },
                };
                let token = query_value(call.query, "$skiptoken").unwrap_or_default();
                let (items, next) = match route.op {
                    Op::ListKeys => {
                        let (items, next) =
                            b.list_keys(caller, call.vault, page_size, &token).map_err(to_rest)?;
                        (items.into_iter().map(|i| ids.item(i)).collect::<Vec<_>>(), next)
                    }
                    Op::ListKeyVersions => {
                        let (items, next) =
                            b.list_key_versions(caller, &key_id(), page_size, &token).map_err(to_rest)?;
                        (items.into_iter().map(|i| ids.item(i)).collect(), next)
                    }
                    _ => {
                        let (items, next) =
                            b.list_deleted_keys(caller, call.vault, page_size, &token).map_err(to_rest)?;
                        (items.into_iter().map(|i| ids.deleted_item(i)).collect(), next)
                    }
                };
                let path = match route.op {
                    Op::ListKeys => "/keys".to_string(),
                    Op::ListKeyVersions => format!("/keys/{name}/versions"),
                    _ => "/deletedkeys".to_string(),
                };
                let next_link = (!next.is_empty()).then(|| {
                    let mut link = format!("{}{path}?api-version={}", call.base, call.api_version);
                    if page_size > 0 {
                        link.push_str(&format!("&maxresults={page_size}"));
                    }
                    link.push_str(&format!("&$skiptoken={next}"));
                    link
                });
                ok(json!({ "value": items, "nextLink": next_link }))
            }
            Op::UpdateKey => {
                let r: UpdateBody = parse_body(call.body)?;
                let a = r.attributes.unwrap_or_default();
                let update = KeyUpdate {
                    enabled: a.enabled,
                    not_before: a.nbf,
                    expires: a.exp,
                    clear_not_before: false,
                    clear_expires: false,
                    key_ops: r.key_ops.unwrap_or_default(),
                    tags: r.tags,
                };
                ok(ids.bundle(b.update_key(caller, &key_id(), update).await.map_err(to_rest)?))
            }
            Op::DeleteKey => ok(ids.deleted_bundle(b.delete_key(caller, &key_id()).await.map_err(to_rest)?)),
            Op::GetDeletedKey => {
                ok(ids.deleted_bundle(b.get_deleted_key(caller, call.vault, name).map_err(to_rest)?))
            }
            Op::RecoverDeletedKey => {
                ok(ids.bundle(b.recover_deleted_key(caller, call.vault, name).await.map_err(to_rest)?))
            }
            Op::PurgeDeletedKey => {
                b.purge_deleted_key(caller, call.vault, name).await.map_err(to_rest)?;
                Ok((StatusCode::NO_CONTENT, None))
            }
            Op::BackupKey => {
                let blob = b.backup_key(caller, &key_id()).await.map_err(to_rest)?;
                ok(json!({ "value": b64url(&blob) }))
            }
            Op::RestoreKey => {
                let r: ValueBody = parse_body(call.body)?;
                let blob = b64url_decode("value", &r.value)?;
                ok(ids.bundle(b.restore_key(caller, call.vault, &blob).await.map_err(to_rest)?))
            }
            Op::RotateKey => ok(ids.bundle(b.rotate_key(caller, &key_id()).await.map_err(to_rest)?)),
            Op::GetKeyRotationPolicy => {
                ok(ids.rotation_policy(b.get_key_rotation_policy(caller, &key_id()).map_err(to_rest)?))
            }
            Op::UpdateKeyRotationPolicy => {
                let r: PolicyBody = parse_body(call.body)?;
                let actions: Vec<LifetimeActionSpec> = r
                    .lifetime_actions
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| LifetimeActionSpec {
                        action: a.action.map(|x| x.kind).unwrap_or_default(),
                        time_after_create: a
                            .trigger
                            .as_ref()
                            .and_then(|t| t.time_after_create.clone())
                            .unwrap_or_default(),
                        time_before_expiry: a.trigger.and_then(|t| t.time_before_expiry).unwrap_or_default(),
                    })
                    .collect();
                let expiry = r.attributes.and_then(|a| a.expiry_time).unwrap_or_default();
                let v = b
                    .update_key_rotation_policy(caller, &key_id(), &expiry, &actions)
                    .await
                    .map_err(to_rest)?;
                ok(ids.rotation_policy(v))
            }
            Op::WrapKey | Op::UnwrapKey | Op::Encrypt | Op::Decrypt => {
                let r: CryptoBody = parse_body(call.body)?;
                let op = match route.op {
                    Op::WrapKey => CryptoOp::WrapKey,
                    Op::UnwrapKey => CryptoOp::UnwrapKey,
                    Op::Encrypt => CryptoOp::Encrypt,
                    _ => CryptoOp::Decrypt,
                };
                let opt = |field: &str, v: &Option<String>| match v {
                    Some(t) => b64url_decode(field, t),
                    None => Ok(Vec::new()),
                };
                let req = CryptoRequest {
                    op,
                    key_id: key_id(),
                    algorithm: r.alg.unwrap_or_default(),
                    value: b64url_decode("value", r.value.as_deref().unwrap_or_default())?,
                    iv: opt("iv", &r.iv)?,
                    aad: opt("aad", &r.aad)?,
                    tag: opt("tag", &r.tag)?,
                };
                let result = b.crypto(caller, req).await.map_err(to_rest)?;
                let kid = ids.rebase(&result.kid);
                let value = zeroize::Zeroizing::new(b64url(&result.value));
                let out = CryptoOut {
                    kid: &kid,
                    value: &value,
                    iv: (!result.iv.is_empty()).then(|| b64url(&result.iv)),
                    tag: (!result.tag.is_empty()).then(|| b64url(&result.tag)),
                };
                let body = serde_json::to_vec(&out).map_err(|_| to_rest(BrokerError::Internal))?;
                Ok((StatusCode::OK, Some(bytes::Bytes::from(body))))
            }
            Op::Sign | Op::Verify => {
                let r: SignBody = parse_body(call.body)?;
                let (op, digest, signature) = if route.op == Op::Sign {
                    (
                        SignOp::Sign,
                        b64url_decode("value", r.value.as_deref().unwrap_or_default())?,
                        Vec::new(),
                    )
                } else {
                    (
                        SignOp::Verify,
                        b64url_decode("digest", r.digest.as_deref().unwrap_or_default())?,
                        b64url_decode("value", r.value.as_deref().unwrap_or_default())?,
                    )
                };
                let req = SignRequest {
                    op,
                    key_id: key_id(),
                    algorithm: r.alg.unwrap_or_default(),
                    digest,
                    signature,
                };
                let result = b.sign_or_verify(caller, req).await.map_err(to_rest)?;
                if op == SignOp::Sign {
                    ok(json!({ "kid": ids.rebase(&result.kid), "value": b64url(&result.signature) }))
                } else {
                    ok(json!({ "value": result.valid }))
                }
            }
            Op::GetRandomBytes => {
                let r: CountBody = parse_body(call.body)?;
                let bytes =
                    b.random_bytes(caller, call.vault, r.count.unwrap_or(0)).await.map_err(to_rest)?;
                ok(json!({ "value": b64url(&bytes) }))
            }
        }
    }
}

fn parse_body<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, RestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        RestError::bad_parameter(format!("The request body is not valid JSON for this operation: {e}.\r\n"))
    })
}

/// Renders broker views as Key Vault's JSON, with ids rebased on the URL the client called.
struct Ids<'a> {
    /// `https://<vault>.<suffix>`: how the broker writes ids.
    canonical: String,
    call: &'a Call<'a>,
}

impl Ids<'_> {
    fn rebase(&self, id: &str) -> String {
        match id.get(..self.canonical.len()) {
            Some(head) if head.eq_ignore_ascii_case(&self.canonical) => {
                format!("{}{}", self.call.base, &id[self.canonical.len()..])
            }
            _ => id.to_string(),
        }
    }

    fn bundle(&self, v: KeyView) -> Value {
        let mut out = json!({
            "key": jwk(self.rebase(&v.kid), &v.version),
            "attributes": attributes(&v.version.attributes, v.recoverable_days, v.recovery_level),
        });
        if !v.version.tags.is_empty() {
            out["tags"] = json!(v.version.tags);
        }
        out
    }

    fn deleted_bundle(&self, v: DeletedKeyView) -> Value {
        let mut out = self.bundle(v.key);
        out["recoveryId"] = json!(self.rebase(&v.recovery_id));
        out["deletedDate"] = json!(v.deletion.deleted_date);
        out["scheduledPurgeDate"] = json!(v.deletion.scheduled_purge_date);
        out
    }

    fn item(&self, v: KeyItemView) -> Value {
        let mut out = json!({
            "kid": self.rebase(&v.kid),
            "attributes": attributes(&v.version.attributes, v.recoverable_days, v.recovery_level),
        });
        if !v.version.tags.is_empty() {
            out["tags"] = json!(v.version.tags);
        }
        out
    }

    fn deleted_item(&self, v: DeletedKeyView) -> Value {
        let unversioned = v.key.kid.rsplit_once('/').map_or(v.key.kid.as_str(), |(head, _)| head).to_string();
        let mut out = json!({
            "kid": self.rebase(&unversioned),
            "attributes": attributes(&v.key.version.attributes, v.key.recoverable_days, v.key.recovery_level),
            "recoveryId": self.rebase(&v.recovery_id),
            "deletedDate": v.deletion.deleted_date,
            "scheduledPurgeDate": v.deletion.scheduled_purge_date,
        });
        if !v.key.version.tags.is_empty() {
            out["tags"] = json!(v.key.version.tags);
        }
        out
    }

    fn rotation_policy(&self, v: RotationPolicyView) -> Value {
        use crate::model::rotation::Trigger;
        let actions: Vec<Value> = v
            .policy
            .lifetime_actions
            .iter()
            .map(|a| {
                let trigger = match &a.trigger {
                    Trigger::AfterCreate(d) => json!({ "timeAfterCreate": d.as_str() }),
                    Trigger::BeforeExpiry(d) => json!({ "timeBeforeExpiry": d.as_str() }),
                };
                json!({ "trigger": trigger, "action": { "type": a.action.name() } })
            })
            .collect();
        let mut attrs = json!({ "created": v.policy.created, "updated": v.policy.updated });
        if let Some(d) = &v.policy.expiry_time {
            attrs["expiryTime"] = json!(d.as_str());
        }
        json!({ "id": self.rebase(&v.id), "lifetimeActions": actions, "attributes": attrs })
    }
}

/// A JSON Web Key as Key Vault returns it: public parts only, base64url without padding.
fn jwk(kid: String, v: &KeyVersion) -> Value {
    let mut out = json!({
        "kid": kid,
        "kty": v.kty.name(),
        "key_ops": v.key_ops.iter().map(|o| o.name()).collect::<Vec<_>>(),
    });
    if !v.n.is_empty() {
        out["n"] = json!(b64url(&v.n));
        out["e"] = json!(b64url(&v.e));
    }
    if let Some(crv) = v.crv {
        out["crv"] = json!(crv.name());
        out["x"] = json!(b64url(&v.x));
        out["y"] = json!(b64url(&v.y));
    }
    out
}

/// Key Vault's key attributes.
fn attributes(a: &KeyAttributes, recoverable_days: i32, recovery_level: &str) -> Value {
    let mut out = json!({
        "enabled": a.enabled,
        "created": a.created,
        "updated": a.updated,
        "recoveryLevel": recovery_level,
        "recoverableDays": recoverable_days,
    });
    if let Some(nbf) = a.not_before {
        out["nbf"] = json!(nbf);
    }
    if let Some(exp) = a.expires {
        out["exp"] = json!(exp);
    }
    out
}

#[derive(Debug, Default, Deserialize)]
struct AttributesBody {
    enabled: Option<bool>,
    nbf: Option<i64>,
    exp: Option<i64>,
}

impl AttributesBody {
    fn new_attributes(self) -> NewAttributes {
        NewAttributes { enabled: self.enabled, not_before: self.nbf, expires: self.exp }
    }
}

#[derive(Debug, Default, Deserialize)]
struct CreateBody {
    #[serde(default)]
    kty: String,
    key_size: Option<i32>,
    public_exponent: Option<i64>,
    key_ops: Option<Vec<String>>,
    attributes: Option<AttributesBody>,
    tags: Option<BTreeMap<String, String>>,
    crv: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ImportBody {
    #[serde(default)]
    key: Value,
    #[serde(rename = "Hsm", alias = "hsm")]
    hsm: Option<bool>,
    attributes: Option<AttributesBody>,
    tags: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
struct UpdateBody {
    key_ops: Option<Vec<String>>,
    attributes: Option<AttributesBody>,
    tags: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
struct CryptoBody {
    alg: Option<String>,
    value: Option<String>,
    iv: Option<String>,
    aad: Option<String>,
    tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct SignBody {
    alg: Option<String>,
    value: Option<String>,
    digest: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ValueBody {
    #[serde(default)]
    value: String,
}

#[derive(Debug, Default, Deserialize)]
struct CountBody {
    count: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyBody {
    lifetime_actions: Option<Vec<ActionBody>>,
    attributes: Option<PolicyAttributesBody>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyAttributesBody {
    expiry_time: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ActionBody {
    trigger: Option<TriggerBody>,
    action: Option<ActionKind>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TriggerBody {
    time_after_create: Option<String>,
    time_before_expiry: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ActionKind {
    #[serde(rename = "type", default)]
    kind: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_hosts_name_their_vault_with_or_without_a_port() {
        assert_eq!(
            vault_of_host("MyVault.vault.localhost:8443", "vault.azure.net").as_deref(),
            Some("myvault")
        );
        assert_eq!(vault_of_host("kv1.vault.azure.net", "vault.azure.net").as_deref(), Some("kv1"));
        assert_eq!(vault_of_host("localhost:8443", "vault.azure.net"), None);
        assert_eq!(vault_of_host("a.b.vault.localhost", "vault.azure.net"), None);
        assert_eq!(port_of_host("x.vault.localhost:8443"), Some("8443"));
        assert_eq!(port_of_host("x.vault.localhost"), None);
        assert_eq!(port_of_host("[::1]:9"), Some("9"));
    }

    #[test]
    fn paths_match_case_insensitively_with_an_optional_version_and_trailing_slash() {
        let v = "0123456789abcdef0123456789abcdef";
        let r = route(&Method::POST, "/keys/My-Key/wrapKey").unwrap();
        assert_eq!((r.op, r.name.as_deref(), r.version), (Op::WrapKey, Some("My-Key"), None));
        let r = route(&Method::POST, &format!("/KEYS/k/{v}/UnwrapKey/")).unwrap();
        assert_eq!((r.op, r.version.as_deref()), (Op::UnwrapKey, Some(v)));
        assert_eq!(route(&Method::GET, "/keys/k/").unwrap().op, Op::GetKey);
        let r = route(&Method::POST, "/keys/k//encrypt").unwrap();
        assert_eq!((r.op, r.version), (Op::Encrypt, None));
        assert_eq!(route(&Method::GET, "/keys/").unwrap().op, Op::ListKeys);
        assert_eq!(route(&Method::DELETE, "/deletedkeys/k").unwrap().op, Op::PurgeDeletedKey);
        assert_eq!(route(&Method::POST, "/keys/k/create").unwrap().op, Op::CreateKey);
        assert_eq!(route(&Method::GET, "/keys/k/create"), None);
        assert_eq!(route(&Method::GET, "/secrets/s"), None);
        assert_eq!(route(&Method::GET, "/keys/my%2Dkey").unwrap().name.as_deref(), Some("my-key"));
    }

    #[test]
    fn api_versions_are_checked_with_key_vaults_text() {
        assert!(check_api_version(Some("api-version=7.6")).is_ok());
        assert!(check_api_version(Some("x=1&api-version=2025-07-01")).is_ok());
        assert!(check_api_version(Some("api-version=7.6-preview.2")).is_ok());
        let e = check_api_version(Some("api-version=9.9")).unwrap_err();
        assert_eq!(
            e.message,
            "The specified version (9.9) is not recognized. Consider using the latest supported version (2025-07-01)."
        );
        assert!(check_api_version(None).is_err());
        // As the JavaScript SDK sends it.
        assert!(check_api_version(Some("api%2Dversion=7.6")).is_ok());
    }

    #[test]
    fn base64url_is_read_padded_or_not_and_written_without_padding() {
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(b64url_decode("value", "-_8").unwrap(), vec![0xfb, 0xff]);
        assert_eq!(b64url_decode("value", "+/8=").unwrap(), vec![0xfb, 0xff]);
        assert!(b64url_decode("value", "!!").is_err());
    }
}
