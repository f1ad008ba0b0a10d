//! The subset of HashiCorp Vault's HTTP API (KV version 2) that MariaDB's
//! `hashicorp_key_management` plugin uses, backed by the TDE model (docs/MARIADB.md):
//!
//! - `GET /v1/sys/mounts/<mount>/tune` → `{"options":{"version":"2"}, …}`;
//! - `GET /v1/<mount>/data/<id>[?version=<n>]` → `{"data":{"data":{"data":"<64 hex digits>"},
//!   "metadata":{"version":<n>, …}}, …}`;
//!
//! both with the mount's token in `X-Vault-Token`. A key read is the broker's
//! `UnwrapDatabaseKey` as the mount's server's engine host ([`Broker::kv_read`]).
//!
//! How the broker's answers map onto what the plugin does (deliberately):
//! - a real loss of access (the database is INACCESSIBLE: revoked identity, disabled, expired or
//!   deleted key, firewall, …), a wrong token or an unknown mount → 403
//!   `{"errors":["permission denied"]}`, Vault's own answer; a running MariaDB aborts on it at
//!   its next version check, a starting one cannot open its encrypted tables;
//! - a key id or version the mount does not have → 404 `{"errors":[]}` (the plugin's "not
//!   found");
//! - the broker's own transient faults (an injected vault outage, throttling, store trouble, an
//!   internal error) → [`Reply::Drop`]: the connection is closed without an answer, which the
//!   plugin treats as an unreachable Vault and answers from its cache — never an HTTP error,
//!   which would abort a running MariaDB. The TDE model tolerates such faults for its transient
//!   grace, and so does MariaDB.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode, header};
use serde_json::json;

use super::{BoxFuture, Handled, Reply, RestRequest, Surface};
use crate::broker::Broker;
use crate::broker::vault_kv::KvAccess;
use crate::model::time::rfc3339;
use crate::model::{BrokerError, ErrorClass};

/// The header the plugin sends its token in.
pub const TOKEN_HEADER: &str = "x-vault-token";

const TUNE: &str = "VaultKv/Tune";
const READ_KEY: &str = "VaultKv/ReadKey";

/// The Vault-KV surface.
pub struct VaultKv {
    broker: Arc<Broker>,
}

impl VaultKv {
    /// Serves `broker`'s mounts.
    pub fn new(broker: Arc<Broker>) -> Self {
        VaultKv { broker }
    }
}

/// What a request path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Tune { mount: &'a str },
    Read { mount: &'a str, id: Option<u32> },
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/v1/")?;
    if let Some(mount) = rest.strip_prefix("sys/mounts/").and_then(|m| m.strip_suffix("/tune")) {
        return Some(Route::Tune { mount: mount.trim_matches('/') });
    }
    let (mount, id) = rest.rsplit_once("/data/")?;
    if mount.is_empty() || mount.starts_with("sys/") {
        return None;
    }
    // A plain decimal uint32 from 1 (what the plugin sends); anything else names no key.
    let id = (!id.is_empty() && id.len() <= 10 && id.bytes().all(|b| b.is_ascii_digit()))
        .then(|| id.parse::<u32>().ok())
        .flatten()
        .filter(|&n| n >= 1);
    Some(Route::Read { mount, id })
}

/// `?version=<n>`: `Ok(None)` without one (or `version=0`, Vault's "latest").
fn version_of(query: Option<&str>) -> Result<Option<u32>, ()> {
    let Some(q) = query else { return Ok(None) };
    let mut version = None;
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "version" {
            let n: u32 = v.parse().map_err(|_| ())?;
            version = (n != 0).then_some(n);
        }
    }
    Ok(version)
}

fn json_reply(status: StatusCode, body: serde_json::Value) -> Reply {
    let mut response = http::Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    Reply::Http(response)
}

fn permission_denied() -> Reply {
    json_reply(StatusCode::FORBIDDEN, json!({ "errors": ["permission denied"] }))
}

fn not_found() -> Reply {
    json_reply(StatusCode::NOT_FOUND, json!({ "errors": [] }))
}

/// The one mapping of broker errors onto what the plugin sees, and the outcome recorded for the
/// request (the TDE reason of an inaccessible database, else the error's code).
pub fn reply_for(e: &BrokerError) -> (Reply, String) {
    let outcome = match e {
        BrokerError::DatabaseInaccessible { reason, .. } => (*reason).to_string(),
        other => other.code().to_string(),
    };
    let reply = match e {
        BrokerError::KeyNotFound { .. } => not_found(),
        other => match other.class() {
            // The broker's own transient trouble: look like an unreachable Vault.
            ErrorClass::Unavailable | ErrorClass::ResourceExhausted | ErrorClass::Internal => Reply::Drop,
            // Everything else is a refusal: access is lost, or was never there (a server moved to
            // service-managed TDE included: its DEKs have no protector to be unwrapped under).
            _ => permission_denied(),
        },
    };
    (reply, outcome)
}

fn handled(
    reply: Reply,
    operation: &'static str,
    outcome: impl Into<String>,
    access: Option<&KvAccess>,
    resource: String,
) -> Handled {
    Handled {
        reply,
        operation,
        outcome: outcome.into(),
        principal: access.map(|a| a.host_object_id.clone()),
        resource: Some(resource),
    }
}

impl VaultKv {
    async fn answer(&self, request: &RestRequest, route: Route<'_>) -> Handled {
        let (operation, resource) = match &route {
            Route::Tune { mount } => (TUNE, format!("sys/mounts/{}", crate::model::ids::printable(mount))),
            Route::Read { mount, id } => (
                READ_KEY,
                format!(
                    "{}/data/{}",
                    crate::model::ids::printable(mount),
                    id.map(|n| n.to_string()).unwrap_or_default()
                ),
            ),
        };
        if request.parts.method != Method::GET {
            let reply = json_reply(StatusCode::METHOD_NOT_ALLOWED, json!({ "errors": [] }));
            return handled(reply, operation, "MethodNotAllowed", None, resource);
        }
        let token = request.parts.headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).map(str::trim);
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return handled(permission_denied(), operation, "MissingToken", None, resource);
        };
        match route {
            Route::Tune { mount } => match self.broker.kv_tune(mount, token) {
                Ok(access) => {
                    let body = json!({
                        "request_id": crate::broker::new_guid(),
                        "lease_id": "",
                        "renewable": false,
                        "lease_duration": 0,
                        "description": "tde-broker: keys wrapped under the TDE protector of a server",
                        "default_lease_ttl": 0,
                        "max_lease_ttl": 0,
                        "force_no_cache": false,
                        "options": { "version": "2" },
                        "data": {
                            "description": "tde-broker: keys wrapped under the TDE protector of a server",
                            "default_lease_ttl": 0,
                            "max_lease_ttl": 0,
                            "force_no_cache": false,
                            "options": { "version": "2" },
                        },
                        "wrap_info": null,
                        "warnings": null,
                        "auth": null,
                    });
                    handled(json_reply(StatusCode::OK, body), operation, "OK", Some(&access), resource)
                }
                Err(e) => {
                    let (reply, outcome) = reply_for(&e);
                    handled(reply, operation, outcome, None, resource)
                }
            },
            Route::Read { mount, id } => {
                let Ok(version) = version_of(request.parts.uri.query()) else {
                    let reply = json_reply(StatusCode::BAD_REQUEST, json!({ "errors": ["invalid version"] }));
                    return handled(reply, operation, "BadParameter", None, resource);
                };
                let Some(id) = id else {
                    // Authenticate first: without the token nobody learns what exists.
                    return match self.broker.kv_tune(mount, token) {
                        Ok(access) => handled(not_found(), operation, "KeyNotFound", Some(&access), resource),
                        Err(e) => {
                            let (reply, outcome) = reply_for(&e);
                            handled(reply, operation, outcome, None, resource)
                        }
                    };
                };
                let (access, result) = self.broker.kv_read(mount, token, id, version).await;
                match result {
                    Ok(key) => {
                        let body = json!({
                            "request_id": crate::broker::new_guid(),
                            "lease_id": "",
                            "renewable": false,
                            "lease_duration": 0,
                            "data": {
                                "data": { "data": key.hex.as_str() },
                                "metadata": {
                                    "created_time": rfc3339(key.created),
                                    "custom_metadata": null,
                                    "deletion_time": "",
                                    "destroyed": false,
                                    "version": key.version,
                                },
                            },
                            "wrap_info": null,
                            "warnings": null,
                            "auth": null,
                        });
                        handled(json_reply(StatusCode::OK, body), operation, "OK", access.as_ref(), resource)
                    }
                    Err(e) => {
                        let (reply, outcome) = reply_for(&e);
                        handled(reply, operation, outcome, access.as_ref(), resource)
                    }
                }
            }
        }
    }
}

impl Surface for VaultKv {
    fn handle<'a>(&'a self, request: &'a RestRequest) -> BoxFuture<'a, Option<Handled>> {
        Box::pin(async move {
            let route = route(request.parts.uri.path())?;
            Some(self.answer(request, route).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugins_paths_are_routed_and_others_are_left_to_other_surfaces() {
        assert_eq!(route("/v1/sys/mounts/kv/mariadb/tune"), Some(Route::Tune { mount: "kv/mariadb" }));
        assert_eq!(route("/v1/kv/mariadb/data/7"), Some(Route::Read { mount: "kv/mariadb", id: Some(7) }));
        assert_eq!(route("/v1/m/data/0"), Some(Route::Read { mount: "m", id: None }));
        assert_eq!(route("/v1/m/data/4294967296"), Some(Route::Read { mount: "m", id: None }));
        assert_eq!(route("/v1/m/data/+1"), Some(Route::Read { mount: "m", id: None }));
        assert_eq!(route("/keys/k/wrapkey"), None);
        assert_eq!(route("/v1/m/metadata/1"), None);
        assert_eq!(route("/metadata/identity/oauth2/token"), None);
    }

    #[test]
    fn a_version_query_names_a_version_and_zero_means_the_latest() {
        assert_eq!(version_of(None), Ok(None));
        assert_eq!(version_of(Some("version=3")), Ok(Some(3)));
        assert_eq!(version_of(Some("version=0")), Ok(None));
        assert_eq!(version_of(Some("version=x")), Err(()));
    }

    #[test]
    fn transient_faults_drop_the_connection_and_lost_access_is_permission_denied() {
        let (r, outcome) = reply_for(&BrokerError::VaultUnavailable { vault: "v".into() });
        assert!(matches!(r, Reply::Drop));
        assert_eq!(outcome, "ServiceUnavailable");
        assert!(matches!(reply_for(&BrokerError::Throttled { retry_after: 1 }).0, Reply::Drop));
        assert!(matches!(reply_for(&BrokerError::StoreUnavailable).0, Reply::Drop));
        let (r, outcome) = reply_for(&BrokerError::DatabaseInaccessible {
            database: "d".into(),
            server: "s".into(),
            reason: "KEY_DISABLED",
        });
        let Reply::Http(resp) = r else { panic!("lost access must be answered") };
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(&resp.body()[..], br#"{"errors":["permission denied"]}"#);
        assert_eq!(outcome, "KEY_DISABLED");
    }
}
