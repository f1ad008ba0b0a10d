//! The token endpoints the Azure SDKs' credentials call (`rest::identity`): the App Service and
//! IMDS managed-identity protocols and the OpenID authority with client credentials, driven with
//! requests built here against a broker opened in this process; the tokens they answer are then
//! used over the broker's gRPC KeyVault service.

mod common;

use std::sync::Arc;

use http::StatusCode;
use serde_json::Value;
use tde_broker::auth::{Authenticator, Plane};
use tde_broker::broker::Broker;
use tde_broker::config::{ClockKind, Config};
use tde_broker::grpc::proto;
use tde_broker::rest::identity::{IdentityEndpoints, ensure_identity_header};
use tde_broker::rest::{Reply, RestRequest, Surface};
use tde_broker::server::App;
use tonic::Code;
use tonic::transport::Channel;

use common::{Ids, Kv, Vaults, bearer, claims};

const START: i64 = 1_800_000_000;
const LIFETIME: i64 = 3600;
const VAULT_AUD: &str = "https://vault.azure.net";

/// A broker serving gRPC on loopback, and its token endpoints (not listening: called directly).
struct Env {
    broker: Arc<Broker>,
    auth: Arc<Authenticator>,
    endpoints: IdentityEndpoints,
    header_secret: String,
    token: String,
    admin_oid: String,
    channel: Channel,
    tenant: String,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::for_data_dir(dir.path());
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(START);
    let app = App::open(cfg).await.expect("broker starts");
    let token = app.admin_token().expect("admin token");
    let admin_oid = app.admin.object_id.clone();
    let broker = app.broker.clone();
    let auth = app.auth.clone();
    let secret = ensure_identity_header(dir.path()).expect("identity header");
    let header_secret = secret.to_string();
    let endpoints = IdentityEndpoints::new(auth.clone(), broker.clone(), secret, LIFETIME);
    let (addr, stop, _served) = common::spawn_serving(app).await;
    let channel =
        Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect");
    let tenant = broker.settings.tenant_id.clone();
    Env {
        broker,
        auth,
        endpoints,
        header_secret,
        token,
        admin_oid,
        channel,
        tenant,
        addr,
        _dir: dir,
        _stop: stop,
    }
}

/// What an endpoint answered.
struct Answer {
    status: StatusCode,
    body: Value,
    outcome: String,
}

impl Answer {
    fn str(&self, field: &str) -> &str {
        self.body[field].as_str().unwrap_or_else(|| panic!("no string '{field}' in {}", self.body))
    }
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)], body: &str, peer: &str) -> RestRequest {
    let mut builder = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let (parts, ()) = builder.body(()).expect("request").into_parts();
    RestRequest { parts, body: bytes::Bytes::from(body.to_string()), peer: peer.parse().expect("peer") }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

impl Env {
    async fn call(&self, req: RestRequest) -> Answer {
        let handled = self.endpoints.handle(&req).await.expect("the token endpoints recognise the path");
        let Reply::Http(response) = handled.reply else { panic!("the token endpoints always answer") };
        assert_eq!(
            response.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json; charset=utf-8")
        );
        let body = serde_json::from_slice(response.body()).expect("a JSON body");
        Answer { status: response.status(), body, outcome: handled.outcome }
    }

    /// App Service protocol with the right header secret.
    async fn app_service(&self, query: &str) -> Answer {
        let uri = format!("/msi/token?api-version=2019-08-01&{query}");
        self.call(request("GET", &uri, &[("x-identity-header", &self.header_secret)], "", "127.0.0.1:40000"))
            .await
    }

    /// IMDS protocol with the metadata header, from loopback.
    async fn imds(&self, query: &str) -> Answer {
        let uri = format!("/metadata/identity/oauth2/token?api-version=2018-02-01&{query}");
        self.call(request("GET", &uri, &[("metadata", "true")], "", "127.0.0.1:40000")).await
    }

    async fn client_credentials(&self, pairs: &[(&str, &str)]) -> Answer {
        let uri = format!("/{}/oauth2/v2.0/token", self.tenant);
        let headers = [("content-type", "application/x-www-form-urlencoded"), ("host", "localhost:8443")];
        self.call(request("POST", &uri, &headers, &form(pairs), "127.0.0.1:40000")).await
    }

    fn ids(&self) -> Ids {
        proto::identities_client::IdentitiesClient::with_interceptor(
            self.channel.clone(),
            bearer(&self.token),
        )
    }

    fn vaults(&self) -> Vaults {
        proto::vaults_client::VaultsClient::with_interceptor(self.channel.clone(), bearer(&self.token))
    }

    fn kv(&self, token: &str) -> Kv {
        proto::key_vault_client::KeyVaultClient::with_interceptor(self.channel.clone(), bearer(token))
    }

    async fn identity(&self, name: &str) -> proto::Identity {
        self.ids()
            .create_user_assigned_identity(proto::CreateUserAssignedIdentityRequest {
                resource_group: "apps".into(),
                name: name.into(),
                ..Default::default()
            })
            .await
            .expect("identity")
            .into_inner()
    }

    async fn service_principal(&self, name: &str) -> proto::CreateUserResponse {
        self.ids()
            .create_user(proto::CreateUserRequest { name: name.into() })
            .await
            .expect("service principal")
            .into_inner()
    }

    async fn policy(&self, vault: &str, object_id: &str, perms: &[&str]) {
        self.vaults()
            .set_access_policy(proto::SetAccessPolicyRequest {
                vault_name: vault.into(),
                object_id: object_id.into(),
                key_permissions: perms.iter().map(|p| p.to_string()).collect(),
            })
            .await
            .expect("access policy");
    }
}

fn assert_identity_token(answer: &Answer, identity: &proto::Identity) {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let c = claims(answer.str("access_token"));
    assert_eq!(c["oid"], identity.principal_id.as_str());
    assert_eq!(c["appid"], identity.client_id.as_str());
    assert_eq!(c["aud"], VAULT_AUD);
    assert_eq!(c["xms_mirid"], identity.resource_id.as_str());
    assert_eq!(c["exp"], START + LIFETIME, "issued on the broker's clock for the token lifetime");
}

#[tokio::test]
async fn app_service_answers_the_identity_each_selector_names() {
    let e = env().await;
    let id = e.identity("app-one").await;
    let _other = e.identity("app-two").await;
    for query in [
        format!("resource={}&client_id={}", enc(VAULT_AUD), id.client_id),
        format!("resource={}&object_id={}", enc(VAULT_AUD), id.principal_id),
        format!("resource={}&principal_id={}", enc(VAULT_AUD), id.principal_id),
        format!("resource={}&mi_res_id={}", enc(VAULT_AUD), enc(&id.resource_id)),
    ] {
        let a = e.app_service(&query).await;
        assert_identity_token(&a, &id);
        assert_eq!(a.str("token_type"), "Bearer");
        assert_eq!(a.str("resource"), VAULT_AUD);
        assert_eq!(a.str("client_id"), id.client_id);
        assert_eq!(a.str("expires_on"), (START + LIFETIME).to_string(), "Unix seconds as a string");
        assert_eq!(a.outcome, "OK");
    }
}

#[tokio::test]
async fn app_service_refuses_a_missing_or_wrong_identity_header() {
    let e = env().await;
    let id = e.identity("app-one").await;
    let uri =
        format!("/msi/token?api-version=2019-08-01&resource={}&client_id={}", enc(VAULT_AUD), id.client_id);
    let missing = e.call(request("GET", &uri, &[], "", "127.0.0.1:40000")).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.body["statusCode"], 401);
    assert!(missing.str("message").contains("X-IDENTITY-HEADER header is missing"), "{}", missing.body);
    let wrong_secret = format!("{}0", e.header_secret);
    for wrong in [wrong_secret.as_str(), "", &e.header_secret[1..]] {
        let a = e.call(request("GET", &uri, &[("x-identity-header", wrong)], "", "127.0.0.1:40000")).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{wrong:?}");
        assert!(a.body.get("access_token").is_none());
    }
}

#[tokio::test]
async fn unknown_identities_are_400_never_404_on_both_protocols() {
    let e = env().await;
    let _id = e.identity("app-one").await;
    let unknown = "00000000-0000-0000-0000-000000000001";
    let a = e.app_service(&format!("resource={}&client_id={unknown}", enc(VAULT_AUD))).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["statusCode"], 400);
    assert!(a.str("message").contains(&format!("No managed identity is named '{unknown}'")), "{}", a.body);
    assert_eq!(a.outcome, "IdentityNotFound");
    let a = e.imds(&format!("resource={}&object_id={unknown}", enc(VAULT_AUD))).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.str("error"), "invalid_request");
    assert!(a.str("error_description").contains(unknown), "{}", a.body);
    // A user (not a managed identity) is not served by the managed-identity endpoints.
    let user = e.service_principal("svc").await;
    let a = e.app_service(&format!("resource={}&client_id={}", enc(VAULT_AUD), user.client_id)).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn without_a_selector_the_only_managed_identity_is_the_default_and_several_are_refused() {
    let e = env().await;
    let none = e.app_service(&format!("resource={}", enc(VAULT_AUD))).await;
    assert_eq!(none.status, StatusCode::BAD_REQUEST);
    assert!(none.str("message").contains("No managed identity exists"), "{}", none.body);
    let id = e.identity("the-only-one").await;
    assert_identity_token(&e.app_service(&format!("resource={}", enc(VAULT_AUD))).await, &id);
    assert_identity_token(&e.imds(&format!("resource={}", enc(VAULT_AUD))).await, &id);
    let _second = e.identity("a-second-one").await;
    let two = e.app_service(&format!("resource={}", enc(VAULT_AUD))).await;
    assert_eq!(two.status, StatusCode::BAD_REQUEST);
    assert!(two.str("message").contains("2 managed identities exist"), "{}", two.body);
    let two = e.imds(&format!("resource={}", enc(VAULT_AUD))).await;
    assert_eq!(two.status, StatusCode::BAD_REQUEST);
    // Two selectors at once are refused, even when they name the same identity.
    let both = e
        .app_service(&format!(
            "resource={}&client_id={}&object_id={}",
            enc(VAULT_AUD),
            id.client_id,
            id.principal_id
        ))
        .await;
    assert_eq!(both.status, StatusCode::BAD_REQUEST);
    assert!(both.str("message").contains("mutually exclusive"), "{}", both.body);
}

#[tokio::test]
async fn imds_requires_the_metadata_header_and_answers_each_selector() {
    let e = env().await;
    let id = e.identity("vm-identity").await;
    let _other = e.identity("other-identity").await;
    let uri = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource={}&client_id={}",
        enc(VAULT_AUD),
        id.client_id
    );
    for headers in [vec![], vec![("metadata", "false")]] {
        let a = e.call(request("GET", &uri, &headers, "", "127.0.0.1:40000")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        assert_eq!(a.str("error"), "bad_request_102");
        assert_eq!(a.str("error_description"), "Required metadata header not specified");
    }
    for query in [
        format!("resource={}&client_id={}", enc(VAULT_AUD), id.client_id),
        format!("resource={}&object_id={}", enc(VAULT_AUD), id.principal_id),
        format!("resource={}&msi_res_id={}", enc(VAULT_AUD), enc(&id.resource_id)),
    ] {
        let a = e.imds(&query).await;
        assert_identity_token(&a, &id);
        assert_eq!(a.str("token_type"), "Bearer");
        assert_eq!(a.str("resource"), VAULT_AUD);
        assert_eq!(a.str("expires_in"), LIFETIME.to_string());
        assert_eq!(a.str("expires_on"), (START + LIFETIME).to_string());
    }
    // MSAL for Node adds a trailing slash to the path.
    let slash = format!(
        "/metadata/identity/oauth2/token/?api-version=2018-02-01&resource={}&client_id={}",
        enc(VAULT_AUD),
        id.client_id
    );
    assert_identity_token(
        &e.call(request("GET", &slash, &[("metadata", "true")], "", "127.0.0.1:40000")).await,
        &id,
    );
}

#[tokio::test]
async fn imds_answers_only_callers_on_the_brokers_host() {
    let e = env().await;
    let id = e.identity("vm-identity").await;
    let uri =
        format!("/metadata/identity/oauth2/token?resource={}&client_id={}", enc(VAULT_AUD), id.client_id);
    let a = e.call(request("GET", &uri, &[("metadata", "true")], "", "192.0.2.7:40000")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.get("access_token").is_none());
    assert!(a.str("error_description").contains("App Service protocol"), "{}", a.body);
}

#[tokio::test]
async fn a_servers_system_assigned_identity_is_served_by_its_ids() {
    let e = env().await;
    let server = proto::servers_client::ServersClient::with_interceptor(e.channel.clone(), bearer(&e.token))
        .create_server(proto::CreateServerRequest {
            resource_group: "sql-rg".into(),
            name: "sql-one".into(),
            kind: proto::ServerKind::SqlServer as i32,
            identity: Some(proto::ServerIdentity { system_assigned: true, ..Default::default() }),
            ..Default::default()
        })
        .await
        .expect("server")
        .into_inner();
    let smi = server.identity.expect("identity").system_principal_id;
    assert!(!smi.is_empty());
    for query in [
        format!("resource={}&object_id={smi}", enc(VAULT_AUD)),
        format!("resource={}&mi_res_id={}", enc(VAULT_AUD), enc(&server.id)),
        format!("resource={}", enc(VAULT_AUD)),
    ] {
        let a = e.app_service(&query).await;
        assert_eq!(a.status, StatusCode::OK, "{query}: {}", a.body);
        assert_eq!(claims(a.str("access_token"))["oid"], smi.as_str(), "{query}");
    }
}

async fn assert_wrap_unwrap_only(e: &Env, token: &str, kid: &str, who: &str, appid: &str) {
    let kv = e.kv(token);
    let dek = [7u8; 32];
    let wrapped = kv
        .clone()
        .wrap_key(common::crypto_req(kid, "RSA-OAEP-256", &dek))
        .await
        .unwrap_or_else(|s| panic!("{who}: wrap refused: {s:?}"))
        .into_inner()
        .value;
    let unwrapped = kv
        .clone()
        .unwrap_key(common::unwrap_req(kid, "RSA-OAEP-256", &wrapped))
        .await
        .unwrap_or_else(|s| panic!("{who}: unwrap refused: {s:?}"))
        .into_inner()
        .value;
    assert_eq!(unwrapped, dek, "{who}");
    let denied = kv.clone().get_key(proto::GetKeyRequest { key_id: kid.into() }).await;
    let message = common::assert_status(denied, Code::PermissionDenied, "AccessDenied");
    let tenant = &e.tenant;
    assert_eq!(
        message,
        format!(
            "The user, group or application 'appid={appid};oid={who};iss=https://sts.windows.net/{tenant}/' does not have keys get permission on key vault 'apps-vault;location=westus'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287"
        )
    );
}

#[tokio::test]
async fn a_token_from_each_endpoint_wraps_and_unwraps_and_get_is_refused_with_the_access_policy_text() {
    let e = env().await;
    e.vaults()
        .create_vault(proto::CreateVaultRequest { name: "apps-vault".into(), ..Default::default() })
        .await
        .expect("vault");
    e.policy("apps-vault", &e.admin_oid, &["all"]).await;
    let key = e
        .kv(&e.token)
        .create_key(proto::CreateKeyRequest {
            vault_name: "apps-vault".into(),
            name: "dek-protector".into(),
            kty: "RSA".into(),
            key_size: 2048,
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner();
    let kid = common::kid(&key);
    let umi = e.identity("app-identity").await;
    let sp = e.service_principal("app-principal").await;
    for oid in [&umi.principal_id, &sp.principal_id] {
        e.policy("apps-vault", oid, &["wrapKey", "unwrapKey"]).await;
    }
    // The App Service protocol with the cloud's resource, IMDS with the local vault resource the
    // bearer challenge names, client credentials with the local resource's scope.
    let app = e.app_service(&format!("resource={}&client_id={}", enc(VAULT_AUD), umi.client_id)).await;
    assert_eq!(app.status, StatusCode::OK, "{}", app.body);
    assert_wrap_unwrap_only(&e, app.str("access_token"), &kid, &umi.principal_id, &umi.client_id).await;
    let imds = e
        .imds(&format!("resource={}&client_id={}", enc("https://vault.localhost:8443"), umi.client_id))
        .await;
    assert_eq!(imds.status, StatusCode::OK, "{}", imds.body);
    assert_eq!(imds.str("resource"), "https://vault.localhost:8443", "the resource as requested");
    assert_wrap_unwrap_only(&e, imds.str("access_token"), &kid, &umi.principal_id, &umi.client_id).await;
    let cc = e
        .client_credentials(&[
            ("grant_type", "client_credentials"),
            ("client_id", &sp.client_id),
            ("client_secret", &sp.client_secret),
            ("scope", "https://vault.localhost:8443/.default"),
        ])
        .await;
    assert_eq!(cc.status, StatusCode::OK, "{}", cc.body);
    assert_wrap_unwrap_only(&e, cc.str("access_token"), &kid, &sp.principal_id, &sp.client_id).await;
}

#[tokio::test]
async fn tokens_for_the_management_audience_are_control_plane_tokens() {
    let e = env().await;
    let id = e.identity("ops-identity").await;
    let a = e
        .app_service(&format!("resource={}&client_id={}", enc("https://management.azure.com/"), id.client_id))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let token = a.str("access_token");
    assert!(e.auth.validate(token, Plane::Control).is_ok());
    let refused = e.auth.validate(token, Plane::Data).expect_err("not a data-plane token");
    assert!(refused.to_string().starts_with("AKV10022: Invalid audience."), "{refused}");
    let data = e
        .app_service(&format!("resource={}&client_id={}", enc("https://vault.localhost"), id.client_id))
        .await;
    assert!(e.auth.validate(data.str("access_token"), Plane::Data).is_ok());
    assert!(e.auth.validate(data.str("access_token"), Plane::Control).is_err());
    let foreign = e
        .app_service(&format!("resource={}&client_id={}", enc("https://storage.azure.com"), id.client_id))
        .await;
    assert_eq!(foreign.status, StatusCode::BAD_REQUEST);
    assert!(foreign.str("message").contains("is not served here"), "{}", foreign.body);
}

#[tokio::test]
async fn create_user_answers_a_client_secret_that_is_stored_only_as_a_hash() {
    let e = env().await;
    let sp = e.service_principal("stored-hash").await;
    assert_eq!(
        claims(&sp.token)["appid"],
        sp.client_id.as_str(),
        "the client id is the user's application id"
    );
    assert!(sp.client_secret.len() >= 40, "a long random secret");
    let stored = e.broker.principal(&sp.principal_id).expect("principal");
    let hash = stored.client_secret_hash.clone().expect("a stored hash");
    assert_ne!(hash, sp.client_secret);
    let doc = serde_json::to_string(&stored).expect("principal document");
    assert!(!doc.contains(&sp.client_secret), "the secret itself is never stored");
    let again = e.service_principal("stored-hash-2").await;
    assert_ne!(again.client_secret, sp.client_secret);
}

#[tokio::test]
async fn client_credentials_with_the_right_secret_issue_a_token_and_a_wrong_secret_is_invalid_client() {
    let e = env().await;
    let sp = e.service_principal("ci-pipeline").await;
    let scope = "https://vault.azure.net/.default";
    // MSAL's extra fields (claims, client_info, telemetry) are ignored.
    let ok = e
        .client_credentials(&[
            ("client_id", &sp.client_id),
            ("grant_type", "client_credentials"),
            ("client_info", "1"),
            ("claims", r#"{"access_token":{"xms_cc":{"values":["CP1"]}}}"#),
            ("x-client-sku", "MSAL.Python"),
            ("client_secret", &sp.client_secret),
            ("scope", scope),
        ])
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.str("token_type"), "Bearer");
    assert_eq!(ok.body["expires_in"], LIFETIME);
    assert_eq!(ok.body["ext_expires_in"], LIFETIME);
    let c = claims(ok.str("access_token"));
    assert_eq!(c["oid"], sp.principal_id.as_str());
    assert_eq!(c["aud"], VAULT_AUD);
    assert!(e.auth.validate(ok.str("access_token"), Plane::Data).is_ok());

    let wrong = format!("{}x", sp.client_secret);
    let bad = e
        .client_credentials(&[
            ("grant_type", "client_credentials"),
            ("client_id", &sp.client_id),
            ("client_secret", &wrong),
            ("scope", scope),
        ])
        .await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert_eq!(bad.str("error"), "invalid_client");
    assert!(
        bad.str("error_description").starts_with("AADSTS7000215: Invalid client secret provided."),
        "{}",
        bad.body
    );
    assert_eq!(bad.body["error_codes"][0], 7000215);
    assert!(bad.body.get("access_token").is_none());

    let unknown = "11111111-2222-3333-4444-555555555555";
    let a = e
        .client_credentials(&[
            ("grant_type", "client_credentials"),
            ("client_id", unknown),
            ("client_secret", &sp.client_secret),
            ("scope", scope),
        ])
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.str("error"), "unauthorized_client");
    assert!(
        a.str("error_description").starts_with(&format!(
            "AADSTS700016: Application with identifier '{unknown}' was not found in the directory '{}'.",
            e.tenant
        )),
        "{}",
        a.body
    );

    let no_secret = e
        .client_credentials(&[
            ("grant_type", "client_credentials"),
            ("client_id", &sp.client_id),
            ("scope", scope),
        ])
        .await;
    assert_eq!(no_secret.status, StatusCode::UNAUTHORIZED);
    assert!(no_secret.str("error_description").starts_with("AADSTS7000218:"), "{}", no_secret.body);

    let grant = e
        .client_credentials(&[
            ("grant_type", "password"),
            ("client_id", &sp.client_id),
            ("client_secret", &sp.client_secret),
            ("scope", scope),
        ])
        .await;
    assert_eq!(grant.status, StatusCode::BAD_REQUEST);
    assert_eq!(grant.str("error"), "unsupported_grant_type");

    let no_default = e
        .client_credentials(&[
            ("grant_type", "client_credentials"),
            ("client_id", &sp.client_id),
            ("client_secret", &sp.client_secret),
            ("scope", "https://vault.azure.net"),
        ])
        .await;
    assert_eq!(no_default.status, StatusCode::BAD_REQUEST);
    assert_eq!(no_default.str("error"), "invalid_scope");

    // A managed identity has no client secret: its client id is not a confidential client.
    let umi = e.identity("not-a-client").await;
    let a = e
        .client_credentials(&[
            ("grant_type", "client_credentials"),
            ("client_id", &umi.client_id),
            ("client_secret", "x"),
            ("scope", scope),
        ])
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.str("error"), "unauthorized_client");

    // client_secret_basic works as well as client_secret_post.
    use base64::Engine as _;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", sp.client_id, sp.client_secret));
    let uri = format!("/{}/oauth2/v2.0/token", e.tenant);
    let body = form(&[("grant_type", "client_credentials"), ("scope", scope)]);
    let a = e
        .call(request(
            "POST",
            &uri,
            &[("authorization", &format!("Basic {basic}"))],
            &body,
            "127.0.0.1:40000",
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}

#[tokio::test]
async fn the_openid_configuration_is_built_from_the_requests_host_and_its_jwks_verifies_issued_tokens() {
    use rsa::pkcs1v15::{Signature, VerifyingKey};
    use rsa::signature::Verifier as _;
    let e = env().await;
    let t = e.tenant.clone();
    let uri = format!("/{t}/v2.0/.well-known/openid-configuration");
    let a = e.call(request("GET", &uri, &[("host", "localhost:9443")], "", "127.0.0.1:40000")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.str("issuer"), format!("https://localhost:9443/{t}/v2.0"));
    assert_eq!(a.str("authorization_endpoint"), format!("https://localhost:9443/{t}/oauth2/v2.0/authorize"));
    assert_eq!(a.str("token_endpoint"), format!("https://localhost:9443/{t}/oauth2/v2.0/token"));
    assert_eq!(a.str("jwks_uri"), format!("https://localhost:9443/{t}/discovery/v2.0/keys"));
    // HTTP/2 carries the host in the URI's authority.
    let h2 =
        e.call(request("GET", &format!("https://127.0.0.1:8443{uri}"), &[], "", "127.0.0.1:40000")).await;
    assert_eq!(h2.str("token_endpoint"), format!("https://127.0.0.1:8443/{t}/oauth2/v2.0/token"));
    let bad_host = e.call(request("GET", &uri, &[("host", "evil\"host")], "", "127.0.0.1:40000")).await;
    assert_eq!(bad_host.status, StatusCode::BAD_REQUEST);

    let jwks = e.call(request("GET", &format!("/{t}/discovery/v2.0/keys"), &[], "", "127.0.0.1:40000")).await;
    assert_eq!(jwks.status, StatusCode::OK);
    let key = &jwks.body["keys"][0];
    assert_eq!(key["kty"], "RSA");
    assert_eq!(key["use"], "sig");
    assert_eq!(key["kid"], e.auth.kid());
    use base64::Engine as _;
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(v.as_str().expect("text")).expect("base64url")
    };
    let public = rsa::PublicKey::new(
        rsa::BoxedUint::from_be_slice_vartime(&b64(&key["n"])),
        rsa::BoxedUint::from_be_slice_vartime(&b64(&key["e"])),
    )
    .expect("an RSA public key");
    let sp = e.service_principal("jwks-check").await;
    let verifier = VerifyingKey::<sha2::Sha256>::new(public);
    let (signed, signature) = sp.token.rsplit_once('.').expect("a JWS");
    let signature = Signature::try_from(b64(&Value::from(signature)).as_slice()).expect("signature");
    verifier.verify(signed.as_bytes(), &signature).expect("the JWKS key verifies the broker's tokens");
}

#[tokio::test]
async fn unknown_paths_under_the_tenant_are_a_clear_404_and_other_tenants_are_refused() {
    let e = env().await;
    let t = e.tenant.clone();
    for path in [format!("/{t}"), format!("/{t}/oauth2/v2.0/authorize"), format!("/{t}/discovery/instance")] {
        let a = e.call(request("GET", &path, &[], "", "127.0.0.1:40000")).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
        assert!(a.str("error_description").contains("disable_instance_discovery"), "{}", a.body);
    }
    let get_token =
        e.call(request("GET", &format!("/{t}/oauth2/v2.0/token"), &[], "", "127.0.0.1:40000")).await;
    assert_eq!(get_token.status, StatusCode::BAD_REQUEST);
    assert!(get_token.str("error_description").starts_with("AADSTS900561:"), "{}", get_token.body);
    for other in ["/common/discovery/instance", "/00000000-1111-2222-3333-444444444444/oauth2/v2.0/token"] {
        let a = e.call(request("GET", other, &[], "", "127.0.0.1:40000")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{other}");
        assert!(a.str("error_description").contains(&t), "names the broker's tenant: {}", a.body);
    }
    // Paths that are not the token endpoints' are left to the other surfaces.
    for path in ["/keys/k1", "/v1/secret/data/x", "/msi", "/metadata/instance", "/"] {
        assert!(
            e.endpoints.handle(&request("GET", path, &[], "", "127.0.0.1:40000")).await.is_none(),
            "{path}"
        );
    }
}

#[test]
fn the_identity_header_file_is_private_random_and_kept_across_restarts() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let first = ensure_identity_header(dir.path()).expect("created");
    assert_eq!(first.len(), 64);
    assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
    let path = dir.path().join("identity.header");
    assert_eq!(std::fs::metadata(&path).expect("file").permissions().mode() & 0o777, 0o600);
    assert_eq!(ensure_identity_header(dir.path()).expect("kept").as_str(), first.as_str());
    let other = tempfile::tempdir().expect("tempdir");
    assert_ne!(ensure_identity_header(other.path()).expect("created").as_str(), first.as_str());
    // A file widened by hand is made private again.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert_eq!(ensure_identity_header(dir.path()).expect("kept").as_str(), first.as_str());
    assert_eq!(std::fs::metadata(&path).expect("file").permissions().mode() & 0o777, 0o600);
}

/// Runs the `tde-broker` binary against the test's broker (as its admin, from the data directory).
async fn cli(e: &Env, args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"));
    command
        .env_remove("TDE_BROKER_TOKEN")
        .env_remove("TDE_BROKER_SERVER")
        .env_remove("TDE_BROKER_DATA_DIR")
        .env("RUST_LOG", "off")
        .arg("--server")
        .arg(format!("http://{}", e.addr))
        .arg("--data-dir")
        .arg(e._dir.path())
        .args(args);
    let out =
        tokio::task::spawn_blocking(move || command.output().expect("run tde-broker")).await.expect("join");
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_secret_the_cli_prints_once_works_at_the_token_endpoint() {
    let e = env().await;
    let out = cli(&e, &["user", "create", "ci-from-cli", "--output", "json"]).await;
    let user: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let (client_id, secret) = (
        user["client_id"].as_str().expect("client_id"),
        user["client_secret"].as_str().expect("client_secret"),
    );
    let a = e
        .client_credentials(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
            ("scope", "https://vault.azure.net/.default"),
        ])
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(claims(a.str("access_token"))["oid"], user["principal_id"]);
    let table = cli(&e, &["user", "create", "ci-table"]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("client id") && table.contains("client secret"), "{table}");
}
