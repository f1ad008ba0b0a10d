//! Authentication and default deny over real gRPC (docs/RULES.md R2.1 and R5, ARCHITECTURE
//! invariant 3).

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use tde_broker::auth::{MANAGEMENT_AUDIENCE, VAULT_AUDIENCE};
use tde_broker::config::ClockKind;
use tde_broker::grpc::proto;
use tonic::Code;

#[tokio::test]
async fn requests_without_a_token_are_unauthenticated() {
    let b = start().await;
    let msg = assert_status(
        b.vaults_with(Bearer(None)).list_vaults(proto::ListVaultsRequest {}).await,
        Code::Unauthenticated,
        "Unauthorized",
    );
    assert_eq!(msg, "Request is missing a Bearer or PoP token.");
    assert_status(
        b.kv_with(Bearer(None)).get_key(proto::GetKeyRequest { key_id: b.key_uri("v1x", "k") }).await,
        Code::Unauthenticated,
        "Unauthorized",
    );
    for junk in ["Bearer", "Basic abc", "Bearer not.a.jwt", "Bearer a.b.c"] {
        let header = Bearer(Some(junk.parse().unwrap()));
        let s = b.vaults_with(header).list_vaults(proto::ListVaultsRequest {}).await.expect_err(junk);
        assert_eq!(s.code(), Code::Unauthenticated, "{junk}");
    }
    b.stop().await;
}

#[tokio::test]
async fn tokens_of_another_broker_are_refused() {
    let a = start().await;
    let b = start().await;
    let foreign = bearer(&a.token);
    let s = b.vaults_with(foreign).list_vaults(proto::ListVaultsRequest {}).await.expect_err("foreign token");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().starts_with("Error validating token:"), "{}", s.message());
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn each_plane_requires_its_audience() {
    let b = start().await;
    b.vault("aud-vault", false).await;
    let (mgmt_only, _) = b.auth.issue_user_token(&b.admin, &[MANAGEMENT_AUDIENCE], 3600).unwrap();
    let (vault_only, _) = b.auth.issue_user_token(&b.admin, &[VAULT_AUDIENCE], 3600).unwrap();
    let msg = assert_status(
        b.kv_with(bearer(&mgmt_only))
            .get_key(proto::GetKeyRequest { key_id: b.key_uri("aud-vault", "k") })
            .await,
        Code::Unauthenticated,
        "AKV10022",
    );
    assert!(msg.starts_with("AKV10022: Invalid audience. Expected https://vault.azure.net"), "{msg}");
    assert_status(
        b.vaults_with(bearer(&vault_only)).list_vaults(proto::ListVaultsRequest {}).await,
        Code::Unauthenticated,
        "AKV10022",
    );
    // The right audience passes on each plane.
    assert!(b.vaults_with(bearer(&mgmt_only)).list_vaults(proto::ListVaultsRequest {}).await.is_ok());
    assert_status(
        b.kv_with(bearer(&vault_only))
            .get_key(proto::GetKeyRequest { key_id: b.key_uri("aud-vault", "k") })
            .await,
        Code::NotFound,
        "KeyNotFound",
    );
    b.stop().await;
}

#[tokio::test]
async fn tokens_expire_on_the_brokers_clock() {
    let b = start().await;
    let (short, exp) = b.auth.issue_user_token(&b.admin, &[MANAGEMENT_AUDIENCE], 3600).unwrap();
    assert!(b.vaults_with(bearer(&short)).list_vaults(proto::ListVaultsRequest {}).await.is_ok());
    let now = b.advance(3600 + 301).await;
    assert!(now > exp);
    let msg = assert_status(
        b.vaults_with(bearer(&short)).list_vaults(proto::ListVaultsRequest {}).await,
        Code::Unauthenticated,
        "Unauthorized",
    );
    assert!(msg.contains("IDX10223") && msg.contains("expired"), "{msg}");
    // The long-lived admin token still works.
    assert!(b.vaults().list_vaults(proto::ListVaultsRequest {}).await.is_ok());
    b.stop().await;
}

#[tokio::test]
async fn control_plane_admin_has_no_data_plane_rights_without_an_access_policy() {
    let b = start().await;
    b.vaults()
        .create_vault(proto::CreateVaultRequest { name: "ap-vault".into(), ..Default::default() })
        .await
        .unwrap();
    let r = b
        .create_key(proto::CreateKeyRequest {
            vault_name: "ap-vault".into(),
            name: "k".into(),
            kty: "RSA".into(),
            ..Default::default()
        })
        .await;
    let msg = assert_status(r, Code::PermissionDenied, "AccessDenied");
    assert_eq!(
        msg,
        format!(
            "The user, group or application 'appid={};oid={};iss=https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/' does not have keys create permission on key vault 'ap-vault;location=westus'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287",
            b.admin.app_id, b.admin.object_id
        )
    );
    // A policy with exactly `create` and `get` allows those and nothing else.
    b.vaults()
        .set_access_policy(proto::SetAccessPolicyRequest {
            vault_name: "ap-vault".into(),
            object_id: b.admin.object_id.clone(),
            key_permissions: vec!["Create".into(), "get".into()],
        })
        .await
        .unwrap();
    let id = kid(&b
        .create_key(proto::CreateKeyRequest {
            vault_name: "ap-vault".into(),
            name: "k".into(),
            kty: "RSA".into(),
            ..Default::default()
        })
        .await
        .unwrap());
    assert!(b.kv().get_key(proto::GetKeyRequest { key_id: id.clone() }).await.is_ok());
    let msg = assert_status(
        b.kv().wrap_key(crypto_req(&id, "RSA-OAEP", b"0123456789abcdef")).await,
        Code::PermissionDenied,
        "AccessDenied",
    );
    assert!(msg.contains("does not have keys wrapKey permission"), "{msg}");
    // Revoking takes effect on the very next call.
    b.vaults()
        .set_access_policy(proto::SetAccessPolicyRequest {
            vault_name: "ap-vault".into(),
            object_id: b.admin.object_id.clone(),
            key_permissions: vec![],
        })
        .await
        .unwrap();
    assert_status(
        b.kv().get_key(proto::GetKeyRequest { key_id: id }).await,
        Code::PermissionDenied,
        "AccessDenied",
    );
    b.stop().await;
}

#[tokio::test]
async fn rbac_vault_without_role_assignments_denies_with_forbidden_by_rbac() {
    let b = start().await;
    b.vaults()
        .create_vault(proto::CreateVaultRequest {
            name: "rbac-vault".into(),
            enable_rbac_authorization: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let r = b
        .create_key(proto::CreateKeyRequest {
            vault_name: "rbac-vault".into(),
            name: "k".into(),
            kty: "RSA".into(),
            ..Default::default()
        })
        .await;
    let msg = assert_status(r, Code::PermissionDenied, "ForbiddenByRbac");
    assert!(msg.contains("Action: 'Microsoft.KeyVault/vaults/keys/create/action'"), "{msg}");
    assert!(msg.contains("/providers/microsoft.keyvault/vaults/rbac-vault/keys/k'"), "{msg}");
    b.stop().await;
}

#[tokio::test]
async fn health_and_reflection_need_no_token() {
    let b = start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(b.channel.clone());
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest { service: "tdebroker.v1.KeyVault".into() })
        .await
        .expect("health without token")
        .into_inner();
    assert_eq!(resp.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(b.channel.clone());
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream =
        refl.server_reflection_info(tokio_stream::iter(vec![req])).await.expect("reflection").into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("unexpected reflection answer")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for svc in
        ["tdebroker.v1.KeyVault", "tdebroker.v1.Vaults", "tdebroker.v1.Emulation", "grpc.health.v1.Health"]
    {
        assert!(names.iter().any(|n| n == svc), "{svc} missing from {names:?}");
    }
    b.stop().await;
}

#[tokio::test]
async fn system_clock_cannot_be_moved_and_secrets_are_private_files() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_in(dir.path(), ClockKind::System).await;
    let msg = assert_status(
        b.emu().advance_clock(proto::AdvanceClockRequest { seconds: 60 }).await,
        Code::FailedPrecondition,
        "ClockNotManual",
    );
    assert!(msg.contains("--clock manual"), "{msg}");
    let clock = b.emu().get_clock(proto::GetClockRequest {}).await.unwrap().into_inner();
    assert!(!clock.manual);
    for f in ["admin.token", "master.key"] {
        let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    // The token in the file is what the CLI uses: it authenticates.
    let file_token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    assert!(b.vaults_with(bearer(file_token.trim())).list_vaults(proto::ListVaultsRequest {}).await.is_ok());
    b.stop().await;
}
