//! Token endpoints: the App Service and IMDS managed-identity protocols and an OpenID authority
//! with client credentials for service principals — what the Azure SDKs' credentials
//! (`ManagedIdentityCredential`, `DefaultAzureCredential`, `ClientSecretCredential`) call, so they
//! work against the broker with environment variables alone.
//!
//! | path | protocol | authenticates the caller by |
//! |---|---|---|
//! | `GET /msi/token` | App Service (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`), api-version 2019-08-01 | `X-IDENTITY-HEADER` equal to `<data-dir>/identity.header` |
//! | `GET /metadata/identity/oauth2/token` | IMDS (`AZURE_POD_IDENTITY_AUTHORITY_HOST`) | `Metadata: true`, from a loopback address only |
//! | `GET /<tenant>/v2.0/.well-known/openid-configuration` | OpenID discovery | — (public) |
//! | `GET /<tenant>/discovery/v2.0/keys` | the signing key's JWKS | — (public) |
//! | `POST /<tenant>/oauth2/v2.0/token` | client credentials (`ClientSecretCredential`) | the service principal's client secret |
//!
//! Managed identities are named by client id, principal (object) id or ARM resource id; a
//! server's system-assigned identity by its principal id, client id or the server's id. With no
//! selector the endpoints answer for the only managed identity there is, and refuse (400, saying
//! how to name one) when there are none or several. Unknown identities are 400, never 404: the
//! SDKs retry a 404.
//!
//! Registering the surface (the listener's `App`): create the header secret once at start with
//! [`ensure_identity_header`] (`<data-dir>/identity.header`, 0600, kept across restarts) and add
//! `IdentityEndpoints::new(app.auth.clone(), app.broker.clone(), secret, config.token_lifetime)`
//! to the surfaces the HTTPS listener offers each request to. It answers only its own paths
//! (`None` otherwise), so its place in the list does not matter.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, header};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::{BoxFuture, Handled, Reply, RestRequest, Surface};
use crate::auth::secret::{client_secret_matches, secrets_equal};
use crate::auth::{Authenticator, canonical_audience};
use crate::broker::Broker;
use crate::model::ids::printable;
use crate::model::{Principal, PrincipalKind};

/// The header secret's file in the data directory.
pub const IDENTITY_HEADER_FILE: &str = "identity.header";

/// Random bytes in a new header secret (hex in the file).
const IDENTITY_HEADER_BYTES: usize = 32;

/// The App Service protocol's header secret: `<data-dir>/identity.header`, created (0600, random,
/// hex) when missing or empty, kept across restarts. Give its contents to clients as
/// `IDENTITY_HEADER`.
pub fn ensure_identity_header(data_dir: &Path) -> std::io::Result<Zeroizing<String>> {
    let path = data_dir.join(IDENTITY_HEADER_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let text = Zeroizing::new(text);
            let secret = text.trim();
            if !secret.is_empty() && secret.bytes().all(|b| b.is_ascii_graphic()) {
                crate::store::datadir::make_private(&path)?;
                return Ok(Zeroizing::new(secret.to_string()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let secret =
        Zeroizing::new(hex::encode(Zeroizing::new(crate::crypto::random_bytes(IDENTITY_HEADER_BYTES))));
    crate::store::datadir::write_private(&path, secret.as_bytes()).map_err(std::io::Error::other)?;
    Ok(secret)
}

/// The token endpoints (see the module's documentation).
pub struct IdentityEndpoints {
    auth: Arc<Authenticator>,
    broker: Arc<Broker>,
    /// The broker's one tenant: the authority's first path segment.
    tenant: String,
    /// What `X-IDENTITY-HEADER` must equal.
    header_secret: Zeroizing<String>,
    /// Lifetime of the tokens issued, seconds (the configured token lifetime).
    token_lifetime: i64,
}

impl IdentityEndpoints {
    /// Endpoints issuing tokens with `auth` for the principals of `broker`'s tenant, the App
    /// Service protocol checked against `header_secret` (see [`ensure_identity_header`]).
    pub fn new(
        auth: Arc<Authenticator>,
        broker: Arc<Broker>,
        header_secret: Zeroizing<String>,
        token_lifetime: i64,
    ) -> Self {
        let tenant = broker.settings.tenant_id.clone();
        IdentityEndpoints { auth, broker, tenant, header_secret, token_lifetime }
    }

    /// Answers the request when its path is one of the token endpoints'.
    pub fn route(&self, request: &RestRequest) -> Option<Handled> {
        let path = request.parts.uri.path();
        let trimmed = path.trim_end_matches('/');
        let lower = trimmed.to_ascii_lowercase();
        match lower.as_str() {
            "/msi/token" => Some(self.app_service(request)),
            "/metadata/identity/oauth2/token" => Some(self.imds(request)),
            _ => self.authority(request, &lower),
        }
    }
}

impl Surface for IdentityEndpoints {
    fn handle<'a>(&'a self, request: &'a RestRequest) -> BoxFuture<'a, Option<Handled>> {
        Box::pin(async move { self.route(request) })
    }
}

// ---------------------------------------------------------------------------------------------
// Managed identities

/// Which managed identity a token request names.
#[derive(Debug, Default)]
struct Selector {
    client_id: Option<String>,
    object_id: Option<String>,
    resource_id: Option<String>,
}

/// Why a managed identity was not found.
enum Selection {
    Found(Box<Principal>),
    /// The request named several selectors.
    Ambiguous,
    /// No selector, and not exactly one managed identity.
    NoDefault(usize),
    /// Nothing matches the selector.
    Unknown(String),
}

impl IdentityEndpoints {
    /// The managed identity `sel` names, or the only one there is.
    fn select(&self, sel: &Selector) -> Selection {
        let given = [&sel.client_id, &sel.object_id, &sel.resource_id].iter().filter(|s| s.is_some()).count();
        if given > 1 {
            return Selection::Ambiguous;
        }
        let st = self.broker.read();
        let mut managed = st.principals.values().filter(|p| {
            matches!(p.kind, PrincipalKind::UserAssignedIdentity | PrincipalKind::SystemAssignedIdentity)
        });
        let found = if let Some(client_id) = &sel.client_id {
            managed.find(|p| p.app_id.eq_ignore_ascii_case(client_id))
        } else if let Some(object_id) = &sel.object_id {
            managed.find(|p| p.object_id.eq_ignore_ascii_case(object_id))
        } else if let Some(resource_id) = &sel.resource_id {
            managed.find(|p| p.resource_id.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(resource_id)))
        } else {
            let all: Vec<&Principal> = managed.collect();
            return match all.as_slice() {
                [only] => Selection::Found(Box::new((*only).clone())),
                _ => Selection::NoDefault(all.len()),
            };
        };
        match found {
            Some(p) => Selection::Found(Box::new(p.clone())),
            None => Selection::Unknown(
                sel.client_id
                    .clone()
                    .or(sel.object_id.clone())
                    .or(sel.resource_id.clone())
                    .unwrap_or_default(),
            ),
        }
    }

    /// The text of a failed selection (`names`: the protocol's selector parameters).
    fn selection_error(selection: &Selection, names: &str) -> (String, &'static str) {
        match selection {
            Selection::Found(_) => (String::new(), "OK"),
            Selection::Ambiguous => (
                format!("Name the identity by at most one of {names}: they are mutually exclusive."),
                "AmbiguousIdentity",
            ),
            Selection::NoDefault(0) => (
                format!(
                    "No managed identity exists, so there is no default identity: create one \
                     (`tde-broker identity create`) or a server with a system-assigned identity, \
                     and name it by {names}."
                ),
                "NoDefaultIdentity",
            ),
            Selection::NoDefault(n) => (
                format!(
                    "No identity was named and {n} managed identities exist, so there is no default \
                     identity: name one by {names}."
                ),
                "NoDefaultIdentity",
            ),
            Selection::Unknown(id) => (
                format!(
                    "No managed identity is named '{}' (user-assigned identities by client id, \
                     principal id or resource id; system-assigned identities by client id, \
                     principal id or their server's id).",
                    printable(id)
                ),
                "IdentityNotFound",
            ),
        }
    }

    /// A managed identity's token for `resource`: the token, its expiry and the audience.
    fn identity_token(&self, identity: &Principal, resource: &str) -> Result<(String, i64), String> {
        let audience = canonical_audience(resource).map_err(|e| e.to_string())?;
        self.auth.issue_identity_token(identity, audience, self.token_lifetime).map_err(|e| e.to_string())
    }

    /// `GET /msi/token` (App Service, 2019-08-01).
    fn app_service(&self, request: &RestRequest) -> Handled {
        const OP: &str = "Identity/AppServiceToken";
        let fail = |status: StatusCode, reason: &str, message: String| {
            let body = json!({ "statusCode": status.as_u16(), "message": message });
            handled(OP, json_reply(status, &body), reason, None, None)
        };
        if request.parts.method != Method::GET {
            return fail(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "Use GET.".to_string());
        }
        match header_text(&request.parts.headers, "x-identity-header") {
            None => {
                return fail(
                    StatusCode::UNAUTHORIZED,
                    "MissingIdentityHeader",
                    "The X-IDENTITY-HEADER header is missing: send the contents of the broker's \
                     <data-dir>/identity.header (the IDENTITY_HEADER environment variable)."
                        .to_string(),
                );
            }
            Some(given) if !secrets_equal(given.trim().as_bytes(), self.header_secret.as_bytes()) => {
                return fail(
                    StatusCode::UNAUTHORIZED,
                    "InvalidIdentityHeader",
                    "The X-IDENTITY-HEADER header does not match the broker's \
                     <data-dir>/identity.header."
                        .to_string(),
                );
            }
            Some(_) => {}
        }
        let query = form_pairs(request.parts.uri.query().unwrap_or(""));
        let Some(resource) = param(&query, &["resource"]) else {
            return fail(
                StatusCode::BAD_REQUEST,
                "MissingResource",
                "The query parameter 'resource' is required (e.g. https://vault.azure.net).".to_string(),
            );
        };
        let sel = Selector {
            client_id: param(&query, &["client_id"]),
            object_id: param(&query, &["object_id", "principal_id"]),
            resource_id: param(&query, &["mi_res_id"]),
        };
        let identity = match self.select(&sel) {
            Selection::Found(p) => p,
            other => {
                let (message, reason) =
                    Self::selection_error(&other, "client_id, object_id (principal_id) or mi_res_id");
                return fail(StatusCode::BAD_REQUEST, reason, message);
            }
        };
        let principal = Some(identity.object_id.clone());
        let resource_name = identity.resource_id.clone();
        match self.identity_token(&identity, &resource) {
            Ok((token, expires_on)) => {
                let body = json!({
                    "access_token": token,
                    "expires_on": expires_on.to_string(),
                    "resource": resource,
                    "token_type": "Bearer",
                    "client_id": identity.app_id,
                });
                handled(OP, json_reply(StatusCode::OK, &body), "OK", principal, resource_name)
            }
            Err(message) => {
                let body = json!({ "statusCode": 400, "message": message });
                handled(
                    OP,
                    json_reply(StatusCode::BAD_REQUEST, &body),
                    "BadParameter",
                    principal,
                    resource_name,
                )
            }
        }
    }

    /// `GET /metadata/identity/oauth2/token` (IMDS).
    fn imds(&self, request: &RestRequest) -> Handled {
        const OP: &str = "Identity/ImdsToken";
        let fail = |status: StatusCode, error: &str, description: String| {
            let body = json!({ "error": error, "error_description": description });
            handled(OP, json_reply(status, &body), error, None, None)
        };
        if request.parts.method != Method::GET {
            return fail(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "Use GET.".to_string());
        }
        // The cloud's IMDS answers only its own VM (a link-local address); the broker's answers
        // only callers on its own host.
        if !request.peer.ip().is_loopback() {
            return fail(
                StatusCode::FORBIDDEN,
                "forbidden",
                "The IMDS token endpoint answers only callers on the broker's host (a loopback \
                 address). From elsewhere, use the App Service protocol (IDENTITY_ENDPOINT with \
                 IDENTITY_HEADER)."
                    .to_string(),
            );
        }
        let metadata = header_text(&request.parts.headers, "metadata");
        if !metadata.is_some_and(|m| m.trim().eq_ignore_ascii_case("true")) {
            return fail(
                StatusCode::BAD_REQUEST,
                "bad_request_102",
                "Required metadata header not specified".to_string(),
            );
        }
        let query = form_pairs(request.parts.uri.query().unwrap_or(""));
        let Some(resource) = param(&query, &["resource"]) else {
            return fail(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required query variable 'resource' is missing".to_string(),
            );
        };
        let sel = Selector {
            client_id: param(&query, &["client_id"]),
            object_id: param(&query, &["object_id", "principal_id"]),
            resource_id: param(&query, &["msi_res_id", "mi_res_id"]),
        };
        let identity = match self.select(&sel) {
            Selection::Found(p) => p,
            other => {
                let (message, _) = Self::selection_error(&other, "client_id, object_id or msi_res_id");
                return fail(StatusCode::BAD_REQUEST, "invalid_request", message);
            }
        };
        let principal = Some(identity.object_id.clone());
        let resource_name = identity.resource_id.clone();
        match self.identity_token(&identity, &resource) {
            Ok((token, expires_on)) => {
                let now = self.broker.clock.now();
                let body = json!({
                    "access_token": token,
                    "refresh_token": "",
                    "expires_in": expires_on.saturating_sub(now).to_string(),
                    "expires_on": expires_on.to_string(),
                    "ext_expires_in": expires_on.saturating_sub(now).to_string(),
                    "not_before": now.to_string(),
                    "resource": resource,
                    "token_type": "Bearer",
                    "client_id": identity.app_id,
                });
                handled(OP, json_reply(StatusCode::OK, &body), "OK", principal, resource_name)
            }
            Err(message) => {
                let body = json!({ "error": "invalid_resource", "error_description": message });
                handled(
                    OP,
                    json_reply(StatusCode::BAD_REQUEST, &body),
                    "invalid_resource",
                    principal,
                    resource_name,
                )
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The OpenID authority

/// An Entra ID style error: `{error, error_description, error_codes, timestamp, trace_id,
/// correlation_id}`; the description starts with the AADSTS code, as the cloud's do.
struct AadError {
    status: StatusCode,
    error: &'static str,
    code: u32,
    message: String,
}

impl AadError {
    fn new(status: StatusCode, error: &'static str, code: u32, message: impl Into<String>) -> Self {
        AadError { status, error, code, message: message.into() }
    }

    fn missing(parameter: &str) -> Self {
        AadError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            format!("The request body must contain the following parameter: '{parameter}'."),
        )
    }

    fn reply(&self, now: i64) -> Reply {
        let trace_id = crate::broker::new_guid();
        let correlation_id = crate::broker::new_guid();
        let timestamp = crate::model::time::rfc3339(now);
        let body = json!({
            "error": self.error,
            "error_description": format!(
                "AADSTS{}: {} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}",
                self.code, self.message
            ),
            "error_codes": [self.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
        });
        json_reply(self.status, &body)
    }

    fn reason(&self) -> String {
        format!("AADSTS{}", self.code)
    }
}

/// Scopes a client may add that name no resource.
const OIDC_SCOPES: [&str; 3] = ["openid", "profile", "offline_access"];

impl IdentityEndpoints {
    /// Paths under `/<tenant>` (and answers for other tenants), `lower` being the lower-cased
    /// path without trailing slashes.
    fn authority(&self, request: &RestRequest, lower: &str) -> Option<Handled> {
        let mut segments = lower.trim_start_matches('/').splitn(2, '/');
        let first = segments.next().unwrap_or("");
        let rest = segments.next().unwrap_or("");
        let now = self.broker.clock.now();
        if !first.eq_ignore_ascii_case(&self.tenant) {
            // Another tenant, or a multi-tenant alias: the broker has one tenant.
            let other_tenant = uuid::Uuid::parse_str(first).is_ok();
            let alias = matches!(first, "common" | "organizations" | "consumers");
            if !other_tenant && !alias {
                return None;
            }
            let e = AadError::new(
                StatusCode::BAD_REQUEST,
                "invalid_tenant",
                90002,
                format!(
                    "Tenant '{}' not found. This broker serves one tenant, {}: use it as the tenant \
                     id (the authority is https://<host>/{}).",
                    printable(first),
                    self.tenant,
                    self.tenant
                ),
            );
            return Some(handled("Identity/Authority", e.reply(now), &e.reason(), None, None));
        }
        let method = &request.parts.method;
        Some(match rest {
            "v2.0/.well-known/openid-configuration" if method == Method::GET => {
                self.openid_configuration(request)
            }
            "discovery/v2.0/keys" if method == Method::GET => match self.auth.jwks() {
                Ok(jwks) => handled("Identity/Jwks", json_reply(StatusCode::OK, &jwks), "OK", None, None),
                Err(_) => {
                    let body = json!({ "error": "server_error", "error_description": "The signing key cannot be published." });
                    handled(
                        "Identity/Jwks",
                        json_reply(StatusCode::INTERNAL_SERVER_ERROR, &body),
                        "Internal",
                        None,
                        None,
                    )
                }
            },
            "oauth2/v2.0/token" if method == Method::POST => self.client_credentials(request, now),
            "oauth2/v2.0/token" => {
                let e = AadError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    900561,
                    format!("The endpoint only accepts POST requests. Received a {method} request."),
                );
                handled("Identity/ClientCredentials", e.reply(now), &e.reason(), None, None)
            }
            _ => {
                let body = json!({
                    "error": "not_found",
                    "error_description": format!(
                        "The broker's authority serves only /{t}/v2.0/.well-known/openid-configuration (GET), \
                         /{t}/discovery/v2.0/keys (GET) and /{t}/oauth2/v2.0/token (POST, grant_type \
                         client_credentials). Instance discovery is not served: set \
                         disable_instance_discovery=True (Python) or disableInstanceDiscovery: true \
                         (JavaScript).",
                        t = self.tenant
                    ),
                });
                handled(
                    "Identity/Authority",
                    json_reply(StatusCode::NOT_FOUND, &body),
                    "NotFound",
                    None,
                    None,
                )
            }
        })
    }

    /// `GET /<tenant>/v2.0/.well-known/openid-configuration`: the URLs are built from the
    /// request's host, so they name the address the client used.
    fn openid_configuration(&self, request: &RestRequest) -> Handled {
        const OP: &str = "Identity/OpenIdConfiguration";
        let Some(host) = request_host(request) else {
            let body = json!({ "error": "invalid_request", "error_description": "The request names no valid Host." });
            return handled(OP, json_reply(StatusCode::BAD_REQUEST, &body), "invalid_request", None, None);
        };
        let base = format!("https://{host}/{}", self.tenant);
        let body = json!({
            "issuer": format!("{base}/v2.0"),
            "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
            "token_endpoint": format!("{base}/oauth2/v2.0/token"),
            "end_session_endpoint": format!("{base}/oauth2/v2.0/logout"),
            "jwks_uri": format!("{base}/discovery/v2.0/keys"),
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "grant_types_supported": ["client_credentials"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid"],
            "tenant_region_scope": null,
            "cloud_instance_name": host,
        });
        handled(OP, json_reply(StatusCode::OK, &body), "OK", None, None)
    }

    /// `POST /<tenant>/oauth2/v2.0/token` with `grant_type=client_credentials`.
    fn client_credentials(&self, request: &RestRequest, now: i64) -> Handled {
        const OP: &str = "Identity/ClientCredentials";
        match self.client_credentials_token(request) {
            Ok((principal, access_token, expires_on)) => {
                let expires_in = expires_on.saturating_sub(now);
                let body = json!({
                    "token_type": "Bearer",
                    "expires_in": expires_in,
                    "ext_expires_in": expires_in,
                    "access_token": access_token,
                });
                handled(
                    OP,
                    json_reply(StatusCode::OK, &body),
                    "OK",
                    Some(principal.object_id),
                    Some(principal.app_id),
                )
            }
            Err((e, principal)) => {
                let (oid, app) = principal.map(|p| (p.object_id, p.app_id)).unzip();
                handled(OP, e.reply(now), &e.reason(), oid, app)
            }
        }
    }

    /// The checks of the client-credentials grant, in Entra ID's order: the grant, the client,
    /// its secret, the scope.
    #[allow(clippy::result_large_err)]
    fn client_credentials_token(
        &self,
        request: &RestRequest,
    ) -> Result<(Principal, String, i64), (AadError, Option<Principal>)> {
        let body = String::from_utf8_lossy(&request.body);
        let form = form_pairs(&body);
        let grant = param(&form, &["grant_type"]).ok_or_else(|| (AadError::missing("grant_type"), None))?;
        if grant != "client_credentials" {
            return Err((
                AadError::new(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    70003,
                    format!(
                        "The app requested an unsupported grant type '{}'. The broker's authority \
                         serves client_credentials only.",
                        printable(&grant)
                    ),
                ),
                None,
            ));
        }
        let basic = basic_credentials(&request.parts.headers);
        let client_id = param(&form, &["client_id"])
            .or_else(|| basic.as_ref().map(|(id, _)| id.clone()))
            .ok_or_else(|| (AadError::missing("client_id"), None))?;
        let principal = {
            let st = self.broker.read();
            st.principals
                .values()
                .find(|p| p.kind == PrincipalKind::User && p.app_id.eq_ignore_ascii_case(&client_id))
                .cloned()
        };
        let Some(principal) = principal else {
            return Err((
                AadError::new(
                    StatusCode::BAD_REQUEST,
                    "unauthorized_client",
                    700016,
                    format!(
                        "Application with identifier '{}' was not found in the directory '{}'. This can \
                         happen if the application has not been installed by the administrator of the \
                         tenant or consented to by any user in the tenant. You may have sent your \
                         authentication request to the wrong tenant.",
                        printable(&client_id),
                        self.tenant
                    ),
                ),
                None,
            ));
        };
        let secret = Zeroizing::new(
            param(&form, &["client_secret"]).or_else(|| basic.map(|(_, secret)| secret.to_string())),
        );
        let Some(secret) = secret.as_deref() else {
            return Err((
                AadError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                ),
                Some(principal),
            ));
        };
        let matches = principal
            .client_secret_hash
            .as_deref()
            .is_some_and(|stored| client_secret_matches(secret, stored));
        if !matches {
            return Err((
                AadError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000215,
                    format!(
                        "Invalid client secret provided. Ensure the secret being sent in the request is \
                         the client secret value, not the client secret ID, for a secret added to app \
                         '{}'.",
                        principal.app_id
                    ),
                ),
                Some(principal),
            ));
        }
        let scope =
            param(&form, &["scope"]).ok_or_else(|| (AadError::missing("scope"), Some(principal.clone())))?;
        let resources: Vec<&str> = scope
            .split_whitespace()
            .filter(|s| !OIDC_SCOPES.iter().any(|o| s.eq_ignore_ascii_case(o)))
            .collect();
        let [resource] = resources.as_slice() else {
            return Err((
                AadError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    70011,
                    format!(
                        "The provided value for the input parameter 'scope' is not valid: name one \
                         resource (e.g. https://vault.azure.net/.default), got '{}'.",
                        printable(&scope)
                    ),
                ),
                Some(principal),
            ));
        };
        if !resource.to_ascii_lowercase().ends_with("/.default") {
            return Err((
                AadError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    1002012,
                    format!(
                        "The provided value for scope {} is not valid. Client credential flows must have \
                         a scope value with /.default suffixed to the resource identifier (application ID URI).",
                        printable(resource)
                    ),
                ),
                Some(principal),
            ));
        }
        let Ok(audience) = canonical_audience(resource) else {
            return Err((
                AadError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_resource",
                    500011,
                    format!(
                        "The resource principal named {} was not found in the tenant named {}. The broker \
                         issues tokens for https://vault.azure.net, https://vault.localhost[:port] and \
                         https://management.azure.com.",
                        printable(resource.trim_end_matches("/.default")),
                        self.tenant
                    ),
                ),
                Some(principal),
            ));
        };
        match self.auth.issue_identity_token(&principal, audience, self.token_lifetime) {
            Ok((token, expires_on)) => Ok((principal, token, expires_on)),
            Err(_) => Err((
                AadError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    90000,
                    "The token could not be issued.",
                ),
                Some(principal),
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn handled(
    operation: &'static str,
    reply: Reply,
    outcome: &str,
    principal: Option<String>,
    resource: Option<String>,
) -> Handled {
    Handled { reply, operation, outcome: outcome.to_string(), principal, resource }
}

/// A JSON response that no cache keeps (tokens).
fn json_reply(status: StatusCode, body: &Value) -> Reply {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    let mut response = http::Response::new(bytes);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    Reply::Http(response)
}

/// A header's value as text, when present and visible ASCII.
fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The first non-empty value of any of `names` (case-sensitive, as the protocols' are).
fn param(pairs: &[(String, String)], names: &[&str]) -> Option<String> {
    pairs
        .iter()
        .find(|(k, v)| names.contains(&k.as_str()) && !v.trim().is_empty())
        .map(|(_, v)| v.trim().to_string())
}

/// `application/x-www-form-urlencoded` pairs (a query string or a form body): `+` is a space,
/// `%XX` a byte; a malformed escape stays as it is.
fn form_pairs(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `Authorization: Basic base64(client_id:client_secret)` (client_secret_basic), each part
/// form-decoded as RFC 6749 2.3.1 asks.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, Zeroizing<String>)> {
    use base64::Engine as _;
    let value = header_text(headers, "authorization")?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?);
    let text = std::str::from_utf8(&decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((percent_decode(id), Zeroizing::new(percent_decode(secret))))
}

/// The host (and port) the client addressed: the URI's authority (HTTP/2) or the `Host`
/// header, when it is a plausible host name or address.
fn request_host(request: &RestRequest) -> Option<String> {
    let host = match request.parts.uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => header_text(&request.parts.headers, "host")?.trim().to_string(),
    };
    let plausible = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    plausible.then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_pairs_decode_escapes_and_plus_and_keep_malformed_escapes() {
        let pairs =
            form_pairs("a=b%2Fc&scope=https%3A%2F%2Fvault.azure.net%2F.default+openid&bad=%zz%4&e=&flag");
        assert_eq!(
            pairs,
            vec![
                ("a".into(), "b/c".into()),
                ("scope".into(), "https://vault.azure.net/.default openid".into()),
                ("bad".into(), "%zz%4".into()),
                ("e".into(), "".into()),
                ("flag".into(), "".into()),
            ]
        );
        assert_eq!(param(&pairs, &["e", "a"]), Some("b/c".into()), "empty values do not count");
        assert_eq!(param(&pairs, &["missing"]), None);
    }

    #[test]
    fn basic_credentials_are_read_and_form_decoded() {
        use base64::Engine as _;
        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode("my-id:se%2Bcret");
        headers.insert("authorization", format!("Basic {encoded}").parse().unwrap());
        let (id, secret) = basic_credentials(&headers).unwrap();
        assert_eq!(id, "my-id");
        assert_eq!(secret.as_str(), "se+cret");
        headers.insert("authorization", "Bearer abc".parse().unwrap());
        assert!(basic_credentials(&headers).is_none());
    }
}
