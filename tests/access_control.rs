//! docs/RULES.md R2 over real gRPC: access policies, RBAC at vault and key scope, control-plane
//! roles, revocation that takes effect on the very next call, and token validation.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tde_broker::config::ClockKind;
use tde_broker::grpc::proto;
use tonic::Code;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const DEK: [u8; 32] = [3u8; 32];

fn denial(who: &Who, permission: &str, vault: &str) -> String {
    format!(
        "The user, group or application 'appid={};oid={};iss=https://sts.windows.net/{TENANT}/' does not have keys {permission} permission on key vault '{vault};location=westus'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287",
        who.app_id, who.object_id
    )
}

/// Fixed targets the matrix operations act on, prepared by the admin.
struct Targets {
    key: String,
    rotate: String,
    wrapped: Vec<u8>,
    encrypted: Vec<u8>,
    backup: Vec<u8>,
}

/// One operation per key permission (and the extra list/get shapes), run with `kv`.
async fn run_op(kv: &mut Kv, op: &str, perm: &str, t: &Targets) -> Result<(), tonic::Status> {
    let v = "matrix-kv".to_string();
    let name = |p: &str| format!("{p}-by-{perm}");
    match op {
        "GetKey" => kv.get_key(proto::GetKeyRequest { key_id: t.key.clone() }).await.map(drop),
        "GetDeletedKey" => kv
            .get_deleted_key(proto::GetDeletedKeyRequest { vault_name: v, name: "deleted-g".into() })
            .await
            .map(drop),
        "ListKeys" => {
            kv.list_keys(proto::ListKeysRequest { vault_name: v, ..Default::default() }).await.map(drop)
        }
        "ListKeyVersions" => kv
            .list_key_versions(proto::ListKeyVersionsRequest { key_id: t.key.clone(), ..Default::default() })
            .await
            .map(drop),
        "ListDeletedKeys" => kv
            .list_deleted_keys(proto::ListDeletedKeysRequest { vault_name: v, ..Default::default() })
            .await
            .map(drop),
        "UpdateKey" => kv
            .update_key(proto::UpdateKeyRequest {
                key_id: t.key.clone(),
                tags: [("touched".to_string(), perm.to_string())].into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "CreateKey" => kv
            .create_key(proto::CreateKeyRequest {
                vault_name: v,
                name: name("new"),
                kty: "oct-HSM".into(),
                key_size: 128,
                ..Default::default()
            })
            .await
            .map(drop),
        "ImportKey" => kv
            .import_key(proto::ImportKeyRequest {
                vault_name: v,
                name: name("imported"),
                jwk_json: r#"{"kty":"oct-HSM","k":"AAECAwQFBgcICQoLDA0ODw"}"#.into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "DeleteKey" => {
            kv.delete_key(proto::DeleteKeyRequest { key_id: format!("{}-victim", t.key) }).await.map(drop)
        }
        "RecoverDeletedKey" => kv
            .recover_deleted_key(proto::RecoverDeletedKeyRequest { vault_name: v, name: "deleted-r".into() })
            .await
            .map(drop),
        "BackupKey" => kv.backup_key(proto::BackupKeyRequest { key_id: t.key.clone() }).await.map(drop),
        "RestoreKey" => {
            kv.restore_key(proto::RestoreKeyRequest { vault_name: v, blob: t.backup.clone() }).await.map(drop)
        }
        "Decrypt" => kv
            .decrypt(proto::DecryptRequest {
                key_id: t.key.clone(),
                algorithm: "RSA-OAEP".into(),
                value: t.encrypted.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        "Encrypt" => kv
            .encrypt(proto::EncryptRequest {
                key_id: t.key.clone(),
                algorithm: "RSA-OAEP".into(),
                value: b"x".to_vec(),
                ..Default::default()
            })
            .await
            .map(drop),
        "UnwrapKey" => kv.unwrap_key(unwrap_req(&t.key, "RSA-OAEP-256", &t.wrapped)).await.map(drop),
        "WrapKey" => kv.wrap_key(crypto_req(&t.key, "RSA-OAEP-256", &DEK)).await.map(drop),
        "PurgeDeletedKey" => kv
            .purge_deleted_key(proto::PurgeDeletedKeyRequest { vault_name: v, name: "deleted-p".into() })
            .await
            .map(drop),
        "RotateKey" => kv.rotate_key(proto::RotateKeyRequest { key_id: t.rotate.clone() }).await.map(drop),
        other => panic!("unknown op {other}"),
    }
}

/// Every data-plane operation and the key permission it needs.
const OPS: [(&str, &str); 18] = [
    ("GetKey", "get"),
    ("GetDeletedKey", "get"),
    ("ListKeys", "list"),
    ("ListKeyVersions", "list"),
    ("ListDeletedKeys", "list"),
    ("UpdateKey", "update"),
    ("CreateKey", "create"),
    ("ImportKey", "import"),
    ("DeleteKey", "delete"),
    ("RecoverDeletedKey", "recover"),
    ("BackupKey", "backup"),
    ("RestoreKey", "restore"),
    ("Decrypt", "decrypt"),
    ("Encrypt", "encrypt"),
    ("UnwrapKey", "unwrapKey"),
    ("WrapKey", "wrapKey"),
    ("PurgeDeletedKey", "purge"),
    ("RotateKey", "rotate"),
];

#[tokio::test]
async fn access_policy_permission_matrix_each_permission_allows_exactly_its_operations() {
    let b = start().await;
    b.vault("matrix-kv", false).await;
    let key = kid(&b.key("matrix-kv", "k", "RSA", 2048).await);
    let base = b.key_uri("matrix-kv", "k");
    b.key("matrix-kv", "k-victim", "oct-HSM", 128).await;
    let rotate = b.key_uri("matrix-kv", "rot");
    b.key("matrix-kv", "rot", "oct-HSM", 128).await;
    for deleted in ["deleted-g", "deleted-r", "deleted-p"] {
        b.key("matrix-kv", deleted, "oct-HSM", 128).await;
        b.kv().delete_key(proto::DeleteKeyRequest { key_id: b.key_uri("matrix-kv", deleted) }).await.unwrap();
    }
    // A blob whose name is free by the time `restore` runs.
    b.key("matrix-kv", "bk", "oct-HSM", 128).await;
    let backup = b
        .kv()
        .backup_key(proto::BackupKeyRequest { key_id: b.key_uri("matrix-kv", "bk") })
        .await
        .unwrap()
        .into_inner()
        .blob;
    b.kv().delete_key(proto::DeleteKeyRequest { key_id: b.key_uri("matrix-kv", "bk") }).await.unwrap();
    b.kv()
        .purge_deleted_key(proto::PurgeDeletedKeyRequest {
            vault_name: "matrix-kv".into(),
            name: "bk".into(),
        })
        .await
        .unwrap();
    let wrapped = b.kv().wrap_key(crypto_req(&key, "RSA-OAEP-256", &DEK)).await.unwrap().into_inner().value;
    let encrypted = b
        .kv()
        .encrypt(proto::EncryptRequest {
            key_id: key.clone(),
            algorithm: "RSA-OAEP".into(),
            value: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    let t = Targets { key: key.clone(), rotate, wrapped, encrypted, backup };
    // Unversioned id so DeleteKey's target is `k-victim`.
    let t = Targets { key: base, ..t };

    let permissions = [
        "get",
        "list",
        "update",
        "create",
        "import",
        "delete",
        "recover",
        "backup",
        "restore",
        "decrypt",
        "encrypt",
        "unwrapKey",
        "wrapKey",
        "purge",
        "rotate",
    ];
    for perm in permissions {
        let who = b.user(&format!("holder-of-{perm}")).await;
        b.policy("matrix-kv", &who.object_id, &[perm]).await;
        let mut kv = b.kv_with(bearer(&who.token));
        for (op, needed) in OPS {
            let r = run_op(&mut kv, op, perm, &t).await;
            if needed == perm {
                assert!(r.is_ok(), "holder of {perm} must be able to {op}: {:?}", r.err());
            } else {
                let msg = assert_status(r, Code::PermissionDenied, "AccessDenied");
                assert_eq!(msg, denial(&who, needed, "matrix-kv"), "holder of {perm} doing {op}");
            }
        }
    }
    b.stop().await;
}

#[tokio::test]
async fn crypto_service_encryption_user_at_key_scope_grants_get_wrap_unwrap_on_that_key_only() {
    let b = start().await;
    b.vaults()
        .create_vault(proto::CreateVaultRequest {
            name: "rbac-kv".into(),
            enable_rbac_authorization: true,
            ..Default::default()
        })
        .await
        .unwrap();
    b.assign("https://rbac-kv.vault.azure.net", &b.admin.object_id, "Key Vault Administrator").await;
    let k1 = kid(&b.key("rbac-kv", "k1", "RSA", 2048).await);
    let k2 = kid(&b.key("rbac-kv", "k2", "RSA", 2048).await);
    let (_, umi) = b.identity("tde-rg", "sql-umi").await;
    let a = b
        .assign(&b.key_uri("rbac-kv", "k1"), &umi.object_id, "Key Vault Crypto Service Encryption User")
        .await;
    assert!(
        a.normalized_scope.ends_with("/providers/Microsoft.KeyVault/vaults/rbac-kv/keys/k1"),
        "{}",
        a.normalized_scope
    );
    let mut kv = b.kv_with(bearer(&umi.token));
    assert!(kv.get_key(proto::GetKeyRequest { key_id: k1.clone() }).await.is_ok());
    let w = kv.wrap_key(crypto_req(&k1, "RSA-OAEP-256", &DEK)).await.expect("wrap on k1").into_inner().value;
    assert_eq!(kv.unwrap_key(unwrap_req(&k1, "RSA-OAEP-256", &w)).await.unwrap().into_inner().value, DEK);
    let msg = assert_status(
        kv.decrypt(proto::DecryptRequest {
            key_id: k1.clone(),
            algorithm: "RSA-OAEP-256".into(),
            value: w,
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "ForbiddenByRbac",
    );
    assert!(msg.contains("Action: 'Microsoft.KeyVault/vaults/keys/decrypt/action'"), "{msg}");
    assert!(
        msg.contains(&format!(
            "Caller: appid={};oid={};iss=https://sts.windows.net/{TENANT}/",
            umi.app_id, umi.object_id
        )),
        "{msg}"
    );
    assert_status(
        kv.get_key(proto::GetKeyRequest { key_id: k2.clone() }).await,
        Code::PermissionDenied,
        "ForbiddenByRbac",
    );
    assert_status(
        kv.wrap_key(crypto_req(&k2, "RSA-OAEP-256", &DEK)).await,
        Code::PermissionDenied,
        "ForbiddenByRbac",
    );
    assert_status(
        kv.list_keys(proto::ListKeysRequest { vault_name: "rbac-kv".into(), ..Default::default() }).await,
        Code::PermissionDenied,
        "ForbiddenByRbac",
    );
    // Access policies do not count on an RBAC vault.
    b.policy("rbac-kv", &umi.object_id, &["all"]).await;
    assert_status(
        kv.get_key(proto::GetKeyRequest { key_id: k2 }).await,
        Code::PermissionDenied,
        "ForbiddenByRbac",
    );
    b.stop().await;
}

/// Hammers UnwrapKey from several clients; `revoke` runs in the middle. Every call that started
/// after `revoke` returned must be refused, and calls before it succeeded.
async fn hammer_and_revoke<F, Fut>(
    b: &TestBroker,
    token: &str,
    key: &str,
    wrapped: Vec<u8>,
    revoke: F,
) -> (usize, usize)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut kv = b.kv_with(bearer(token));
        let (stop, key, wrapped) = (stop.clone(), key.to_string(), wrapped.clone());
        tasks.push(tokio::spawn(async move {
            let mut log = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let r = kv.unwrap_key(unwrap_req(&key, "RSA-OAEP-256", &wrapped)).await;
                log.push((started, r.map(|r| r.into_inner().value).map_err(|s| s.code())));
            }
            log
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    revoke().await;
    let revoked_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut before_ok, mut after) = (0, 0);
    for t in tasks {
        for (started, r) in t.await.unwrap() {
            if started >= revoked_at {
                after += 1;
                assert!(r.is_err(), "a call that started after the revoke returned was allowed");
            } else if let Ok(v) = r {
                assert_eq!(v, DEK);
                before_ok += 1;
            }
        }
    }
    assert!(
        before_ok > 0 && after > 0,
        "the load did not straddle the revoke: {before_ok} before, {after} after"
    );
    (before_ok, after)
}

#[tokio::test]
async fn revoking_an_access_policy_takes_effect_on_the_very_next_call_under_load() {
    let b = start().await;
    b.vault("rev-kv", false).await;
    let key = kid(&b.key("rev-kv", "k", "RSA", 2048).await);
    let wrapped = b.kv().wrap_key(crypto_req(&key, "RSA-OAEP-256", &DEK)).await.unwrap().into_inner().value;
    let who = b.user("engine").await;
    b.policy("rev-kv", &who.object_id, &["unwrapKey"]).await;
    hammer_and_revoke(&b, &who.token, &key, wrapped, || b.policy("rev-kv", &who.object_id, &[])).await;
    b.stop().await;
}

#[tokio::test]
async fn deleting_a_role_assignment_takes_effect_on_the_very_next_call_under_load() {
    let b = start().await;
    b.vaults()
        .create_vault(proto::CreateVaultRequest {
            name: "rev-rbac".into(),
            enable_rbac_authorization: true,
            ..Default::default()
        })
        .await
        .unwrap();
    b.assign("https://rev-rbac.vault.azure.net", &b.admin.object_id, "Key Vault Crypto Officer").await;
    let key = kid(&b.key("rev-rbac", "k", "RSA", 2048).await);
    let wrapped = b.kv().wrap_key(crypto_req(&key, "RSA-OAEP-256", &DEK)).await.unwrap().into_inner().value;
    let (_, umi) = b.identity("rg", "rev-umi").await;
    let a = b
        .assign(&b.key_uri("rev-rbac", "k"), &umi.object_id, "Key Vault Crypto Service Encryption User")
        .await;
    hammer_and_revoke(&b, &umi.token, &key, wrapped, || async {
        b.vaults()
            .delete_role_assignment(proto::DeleteRoleAssignmentRequest { id: a.id.clone() })
            .await
            .unwrap();
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn deleting_an_identity_takes_effect_on_the_very_next_call_under_load() {
    let b = start().await;
    b.vault("rev-id", false).await;
    let key = kid(&b.key("rev-id", "k", "RSA", 2048).await);
    let wrapped = b.kv().wrap_key(crypto_req(&key, "RSA-OAEP-256", &DEK)).await.unwrap().into_inner().value;
    let (id, umi) = b.identity("rg", "doomed").await;
    b.policy("rev-id", &umi.object_id, &["unwrapKey"]).await;
    hammer_and_revoke(&b, &umi.token, &key, wrapped, || async {
        b.ids()
            .delete_user_assigned_identity(proto::DeleteUserAssignedIdentityRequest {
                resource_id: id.resource_id.clone(),
                force: false,
            })
            .await
            .unwrap();
    })
    .await;
    let msg = assert_status(
        b.kv_with(bearer(&umi.token)).get_key(proto::GetKeyRequest { key_id: key }).await,
        Code::Unauthenticated,
        "Unauthorized",
    );
    assert_eq!(msg, format!("Error validating token: the principal '{}' no longer exists.", umi.object_id));
    b.stop().await;
}

#[tokio::test]
async fn identity_tokens_carry_the_clouds_claims_and_expire_after_an_hour() {
    let b = start().await;
    let (id, umi) = b.identity("tde-rg", "claims-umi").await;
    assert!(id.resource_id.ends_with(
        "/resourceGroups/tde-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/claims-umi"
    ));
    assert_eq!(id.kind, "UserAssigned");
    let c = claims(&umi.token);
    assert_eq!(c["iss"], format!("https://sts.windows.net/{TENANT}/"));
    assert_eq!(c["aud"], "https://vault.azure.net");
    assert_eq!(c["oid"], id.principal_id.as_str());
    assert_eq!(c["appid"], id.client_id.as_str());
    assert_eq!(c["tid"], TENANT);
    assert_eq!(c["idtyp"], "app");
    assert_eq!(c["xms_mirid"], id.resource_id.as_str());
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 3600);
    // By any of its three ids.
    for sel in [
        proto::GetIdentityRequest { resource_id: id.resource_id.clone(), ..Default::default() },
        proto::GetIdentityRequest { principal_id: id.principal_id.clone(), ..Default::default() },
        proto::GetIdentityRequest { client_id: id.client_id.clone(), ..Default::default() },
    ] {
        assert_eq!(b.ids().get_identity(sel).await.unwrap().into_inner(), id);
    }
    b.vault("claims-kv", false).await;
    b.policy("claims-kv", &umi.object_id, &["get"]).await;
    b.key("claims-kv", "k", "oct-HSM", 128).await;
    let get = proto::GetKeyRequest { key_id: b.key_uri("claims-kv", "k") };
    assert!(b.kv_with(bearer(&umi.token)).get_key(get.clone()).await.is_ok());
    // A Key Vault token does not open the control plane.
    assert_status(
        b.ids_with(bearer(&umi.token)).list_identities(proto::ListIdentitiesRequest {}).await,
        Code::Unauthenticated,
        "AKV10022",
    );
    b.advance(3600 + 301).await;
    let msg = assert_status(
        b.kv_with(bearer(&umi.token)).get_key(get).await,
        Code::Unauthenticated,
        "Unauthorized",
    );
    assert!(msg.contains("IDX10223"), "{msg}");
    b.stop().await;
}

#[tokio::test]
async fn forged_signatures_are_refused() {
    let b = start().await;
    let who = b.user("victim").await;
    let mut parts: Vec<String> = who.token.split('.').map(String::from).collect();
    // Flip one character of the signature.
    let sig = parts[2].clone();
    let flipped = match sig.strip_prefix('A') {
        Some(rest) => format!("B{rest}"),
        None => format!("A{}", &sig[1..]),
    };
    parts[2] = flipped;
    let msg = assert_status(
        b.vaults_with(bearer(&parts.join("."))).list_vaults(proto::ListVaultsRequest {}).await,
        Code::Unauthenticated,
        "Unauthorized",
    );
    assert!(msg.starts_with("Error validating token: IDX10511"), "{msg}");
    b.stop().await;
}

#[tokio::test]
async fn tokens_from_another_tenant_are_refused_with_akv10032() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_in(dir.path(), ClockKind::Manual).await;
    let old = b.token.clone();
    b.stop().await;
    std::fs::write(dir.path().join("tenant.toml"), "tenant_id = \"11111111-2222-3333-4444-555555555555\"\n")
        .unwrap();
    let mut cfg = tde_broker::config::Config::resolve(tde_broker::config::ServeArgs {
        config: Some(dir.path().join("tenant.toml")),
        data_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(1_800_000_000);
    let b = start_cfg(cfg).await;
    let msg = assert_status(
        b.vaults_with(bearer(&old)).list_vaults(proto::ListVaultsRequest {}).await,
        Code::Unauthenticated,
        "AKV10032",
    );
    assert_eq!(
        msg,
        format!(
            "AKV10032: Invalid issuer. Expected one of https://sts.windows.net/11111111-2222-3333-4444-555555555555/, found https://sts.windows.net/{TENANT}/."
        )
    );
    b.stop().await;
}

#[tokio::test]
async fn control_plane_roles_decide_who_creates_identities_and_vaults() {
    let b = start().await;
    let reader = b.user("reader").await;
    let mic = b.user("identity-admin").await;
    b.assign("/", &reader.object_id, "Reader").await;
    b.assign(
        "/subscriptions/00000000-0000-0000-0000-000000000000",
        &mic.object_id,
        "Managed Identity Contributor",
    )
    .await;
    let umi = |name: &str| proto::CreateUserAssignedIdentityRequest {
        resource_group: "rg".into(),
        name: name.into(),
        ..Default::default()
    };
    let vault = |name: &str| proto::CreateVaultRequest { name: name.into(), ..Default::default() };

    let msg = assert_status(
        b.ids_with(bearer(&reader.token)).create_user_assigned_identity(umi("by-reader")).await,
        Code::PermissionDenied,
        "AuthorizationFailed",
    );
    assert_eq!(
        msg,
        format!(
            "The client '{0}' with object id '{0}' does not have authorization to perform action 'Microsoft.ManagedIdentity/userAssignedIdentities/write' over scope '/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/by-reader' or the scope is invalid. If access was recently granted, please refresh your credentials.",
            reader.object_id
        )
    );
    assert_status(
        b.vaults_with(bearer(&reader.token)).create_vault(vault("reader-kv")).await,
        Code::PermissionDenied,
        "AuthorizationFailed",
    );
    // A Reader can read.
    assert!(b.vaults_with(bearer(&reader.token)).list_vaults(proto::ListVaultsRequest {}).await.is_ok());

    assert!(b.ids_with(bearer(&mic.token)).create_user_assigned_identity(umi("by-mic")).await.is_ok());
    assert_status(
        b.vaults_with(bearer(&mic.token)).create_vault(vault("mic-kv")).await,
        Code::PermissionDenied,
        "AuthorizationFailed",
    );

    assert!(b.ids().create_user_assigned_identity(umi("by-owner")).await.is_ok());
    assert!(b.vaults().create_vault(vault("owner-kv")).await.is_ok());

    // Only an Owner (not a Contributor) may hand out roles.
    let contributor = b.user("contributor").await;
    b.assign("/", &contributor.object_id, "Contributor").await;
    let r = b
        .vaults_with(bearer(&contributor.token))
        .create_role_assignment(proto::CreateRoleAssignmentRequest {
            scope: "/".into(),
            principal_id: contributor.object_id.clone(),
            role_name: "Owner".into(),
        })
        .await;
    assert_status(r, Code::PermissionDenied, "AuthorizationFailed");
    assert!(b.vaults_with(bearer(&contributor.token)).create_vault(vault("contrib-kv")).await.is_ok());
    b.stop().await;
}

#[tokio::test]
async fn role_assignments_validate_scope_role_and_principal() {
    let b = start().await;
    b.vault("ra-kv", false).await;
    let who = b.user("someone").await;
    let create = |scope: &str, principal: &str, role: &str| proto::CreateRoleAssignmentRequest {
        scope: scope.into(),
        principal_id: principal.into(),
        role_name: role.into(),
    };
    assert_status(
        b.vaults().create_role_assignment(create("/", &who.object_id, "Janitor")).await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert_status(
        b.vaults()
            .create_role_assignment(create(
                &format!("{}/{}", b.key_uri("ra-kv", "k"), "0".repeat(32)),
                &who.object_id,
                "Key Vault Reader",
            ))
            .await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert_status(
        b.vaults()
            .create_role_assignment(create("/", "00000000-1111-2222-3333-444444444444", "Reader"))
            .await,
        Code::InvalidArgument,
        "PrincipalNotFound",
    );
    let a = b.assign("https://ra-kv.vault.azure.net/", &who.object_id, "Key Vault Reader").await;
    assert_eq!(
        a.normalized_scope,
        "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/tde-broker/providers/Microsoft.KeyVault/vaults/ra-kv"
    );
    assert_status(
        b.vaults()
            .create_role_assignment(create(
                "https://ra-kv.vault.azure.net",
                &who.object_id,
                "key vault reader",
            ))
            .await,
        Code::AlreadyExists,
        "RoleAssignmentExists",
    );
    let listed = b
        .vaults()
        .list_role_assignments(proto::ListRoleAssignmentsRequest { scope: b.key_uri("ra-kv", "k") })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.assignments.iter().any(|x| x.id == a.id),
        "an assignment on the vault applies to its keys"
    );
    b.vaults().delete_role_assignment(proto::DeleteRoleAssignmentRequest { id: a.id.clone() }).await.unwrap();
    assert_status(
        b.vaults().delete_role_assignment(proto::DeleteRoleAssignmentRequest { id: a.id }).await,
        Code::NotFound,
        "RoleAssignmentNotFound",
    );
    b.stop().await;
}

/// docs/RULES.md R2.5. Managed Identity Operator lists
/// `Microsoft.ManagedIdentity/userAssignedIdentities/*/assign/action`, and ARM checks
/// `.../userAssignedIdentities/assign/action` at the identity: the role's `*/` must stand for no
/// segment at all, or an operator holding exactly the two documented roles is refused.
#[tokio::test]
async fn sql_server_contributor_with_managed_identity_operator_on_each_umi_may_assign_them() {
    let b = start().await;
    let server = b
        .servers()
        .create_server(proto::CreateServerRequest {
            resource_group: "sql-rg".into(),
            name: "ops-sql".into(),
            kind: proto::ServerKind::SqlServer as i32,
            identity: Some(proto::ServerIdentity { system_assigned: true, ..Default::default() }),
            ..Default::default()
        })
        .await
        .expect("server")
        .into_inner();
    let (umi1, _) = b.identity("id-rg", "ops-umi-1").await;
    let (umi2, _) = b.identity("id-rg", "ops-umi-2").await;
    let (umi3, _) = b.identity("id-rg", "ops-umi-3").await;
    let op = b.user("operator").await;
    b.assign(&server.id, &op.object_id, "SQL Server Contributor").await;
    b.assign(&umi1.resource_id, &op.object_id, "Managed Identity Operator").await;
    b.assign(&umi2.resource_id, &op.object_id, "Managed Identity Operator").await;
    let mut srv = tde_broker::grpc::proto::servers_client::ServersClient::with_interceptor(
        b.channel.clone(),
        bearer(&op.token),
    );
    let block = |umis: &[&str]| proto::ServerIdentity {
        system_assigned: true,
        user_assigned_identity_ids: umis.iter().map(|s| s.to_string()).collect(),
        primary_user_assigned_identity_id: umis[0].to_string(),
        ..Default::default()
    };

    let updated = srv
        .update_server_identity(proto::UpdateServerIdentityRequest {
            server_id: server.id.clone(),
            identity: Some(block(&[&umi1.resource_id, &umi2.resource_id])),
        })
        .await
        .expect("SQL Server Contributor + Managed Identity Operator on each UMI assigns them")
        .into_inner();
    let ident = updated.identity.expect("identity block");
    assert_eq!(ident.primary_user_assigned_identity_id, umi1.resource_id);
    assert_eq!(ident.user_assigned_identity_ids.len(), 2);

    // An identity the operator holds no role on is still refused, naming the action and scope.
    let msg = assert_status(
        srv.update_server_identity(proto::UpdateServerIdentityRequest {
            server_id: server.id.clone(),
            identity: Some(block(&[&umi1.resource_id, &umi2.resource_id, &umi3.resource_id])),
        })
        .await,
        Code::PermissionDenied,
        "AuthorizationFailed",
    );
    assert!(
        msg.contains(&format!(
            "'Microsoft.ManagedIdentity/userAssignedIdentities/assign/action' over scope '{}'",
            umi3.resource_id
        )),
        "{msg}"
    );
    b.stop().await;
}
