//! docs/RULES.md R4 and the seeds (docs/TDE-SCENARIOS.md): one scenario per statement, over real
//! gRPC.

mod common;

use common::*;
use tde_broker::grpc::proto;
use tonic::Code;

const SUB: &str = "00000000-0000-0000-0000-000000000000";
const TDE_PERMS: [&str; 3] = ["get", "wrapKey", "unwrapKey"];
const PROBE: i64 = 600;

/// A purge-protected vault with an RSA-2048 protector key; returns the unversioned key URI.
async fn protector_vault(b: &TestBroker, vault: &str) -> String {
    b.vault(vault, true).await;
    b.key(vault, "tde", "RSA", 2048).await;
    b.key_uri(vault, "tde")
}

fn identity_block(umis: &[&str], primary: &str, smi: bool) -> proto::ServerIdentity {
    proto::ServerIdentity {
        system_assigned: smi,
        user_assigned_identity_ids: umis.iter().map(|s| s.to_string()).collect(),
        primary_user_assigned_identity_id: primary.into(),
        ..Default::default()
    }
}

async fn create_server(
    b: &TestBroker,
    name: &str,
    kind: proto::ServerKind,
    identity: proto::ServerIdentity,
    key_id: &str,
) -> Result<proto::Server, tonic::Status> {
    b.servers()
        .create_server(proto::CreateServerRequest {
            resource_group: "sql-rg".into(),
            name: name.into(),
            kind: kind as i32,
            identity: Some(identity),
            key_id: key_id.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn set_protector(
    b: &TestBroker,
    server_id: &str,
    key_id: &str,
) -> Result<proto::EncryptionProtector, tonic::Status> {
    b.servers()
        .set_encryption_protector(proto::SetEncryptionProtectorRequest {
            server_id: server_id.into(),
            server_key_type: "AzureKeyVault".into(),
            key_id: key_id.into(),
            auto_rotation_enabled: false,
        })
        .await
        .map(|r| r.into_inner())
}

async fn update_identity(
    b: &TestBroker,
    server_id: &str,
    identity: proto::ServerIdentity,
) -> Result<proto::Server, tonic::Status> {
    b.servers()
        .update_server_identity(proto::UpdateServerIdentityRequest {
            server_id: server_id.into(),
            identity: Some(identity),
        })
        .await
        .map(|r| r.into_inner())
}

/// A SQL server whose primary UMI holds get/wrapKey/unwrapKey, with CMK from creation and one
/// database `db1`.
struct Setup {
    server: proto::Server,
    umi: proto::Identity,
    key: String,
}

async fn cmk_server(b: &TestBroker, vault: &str, name: &str) -> Setup {
    let key = protector_vault(b, vault).await;
    let (umi, who) = b.identity("id-rg", &format!("{name}-umi")).await;
    b.policy(vault, &who.object_id, &TDE_PERMS).await;
    let server = create_server(
        b,
        name,
        proto::ServerKind::SqlServer,
        identity_block(&[&umi.resource_id], "", false),
        &key,
    )
    .await
    .expect("CMK at creation");
    b.servers()
        .create_database(proto::CreateDatabaseRequest { server_id: server.id.clone(), name: "db1".into() })
        .await
        .unwrap();
    Setup { server, umi, key }
}

fn state(db: &proto::Database) -> (i32, &str) {
    (db.state, db.reason.as_str())
}

const ONLINE: i32 = proto::DatabaseState::Online as i32;
const INACCESSIBLE: i32 = proto::DatabaseState::Inaccessible as i32;

#[tokio::test]
async fn pre_authorized_umi_enables_cmk_at_server_creation() {
    let b = start().await;
    let s = cmk_server(&b, "pre-kv", "pre-sql").await;
    assert_eq!(
        s.server.id,
        format!("/subscriptions/{SUB}/resourceGroups/sql-rg/providers/Microsoft.Sql/servers/pre-sql")
    );
    let p = s.server.protector.unwrap();
    assert_eq!(p.server_key_type, "AzureKeyVault");
    assert_eq!(p.key_id, s.key);
    assert!(p.kid.starts_with(&format!("{}/", s.key)), "{}", p.kid);
    let ident = s.server.identity.unwrap();
    assert_eq!(ident.primary_user_assigned_identity_id, s.umi.resource_id);
    // The engine wraps and unwraps a DEK with the protector.
    let mut e = b.engine(&s.server.id).await;
    let g = e
        .generate_database_key(proto::GenerateDatabaseKeyRequest { database: "db1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.dek.len(), 32);
    assert_eq!(g.kid, p.kid);
    let u = e
        .unwrap_database_key(proto::UnwrapDatabaseKeyRequest {
            database: "db1".into(),
            kid: g.kid,
            wrapped_dek: g.wrapped_dek,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.dek, g.dek);
    b.stop().await;
}

#[tokio::test]
async fn cmk_at_creation_needs_a_user_assigned_identity() {
    let b = start().await;
    let key = protector_vault(&b, "smi-create-kv").await;
    let r = create_server(&b, "smi-only", proto::ServerKind::SqlServer, identity_block(&[], "", true), &key)
        .await;
    let msg = assert_status(r, Code::FailedPrecondition, "AzureKeyVaultNoServerIdentity");
    assert!(msg.contains("needs a user-assigned identity"), "{msg}");
    assert_status(
        b.servers()
            .get_server(proto::GetServerRequest {
                server_id: format!(
                    "/subscriptions/{SUB}/resourceGroups/sql-rg/providers/Microsoft.Sql/servers/smi-only"
                ),
            })
            .await,
        Code::NotFound,
        "ResourceNotFound",
    );
    b.stop().await;
}

#[tokio::test]
async fn one_umi_can_be_shared_by_several_servers() {
    let b = start().await;
    let key = protector_vault(&b, "shared-kv").await;
    let (umi, who) = b.identity("id-rg", "shared-umi").await;
    b.policy("shared-kv", &who.object_id, &TDE_PERMS).await;
    for name in ["sql-a", "sql-b", "sql-c"] {
        let s = create_server(
            &b,
            name,
            proto::ServerKind::SqlServer,
            identity_block(&[&umi.resource_id], "", false),
            &key,
        )
        .await
        .unwrap();
        assert_eq!(s.protector.unwrap().server_key_type, "AzureKeyVault");
    }
    b.stop().await;
}

#[tokio::test]
async fn primary_umi_is_used_over_the_smi_and_the_smi_when_no_umi_is_assigned() {
    let b = start().await;
    let key = protector_vault(&b, "prim-kv").await;
    let (umi, who) = b.identity("id-rg", "prim-umi").await;
    b.policy("prim-kv", &who.object_id, &TDE_PERMS).await;
    let s = create_server(
        &b,
        "prim-sql",
        proto::ServerKind::SqlServer,
        identity_block(&[&umi.resource_id], "", true),
        &key,
    )
    .await
    .unwrap();
    b.servers()
        .create_database(proto::CreateDatabaseRequest { server_id: s.id.clone(), name: "db1".into() })
        .await
        .unwrap();
    let mut e = b.engine(&s.id).await;
    let st = e
        .get_protector_status(proto::GetProtectorStatusRequest { database: "db1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.effective_identity_id, umi.resource_id, "the primary UMI, although the SMI is on");

    // A server with only its SMI uses the SMI once it is granted access.
    let smi_server =
        create_server(&b, "smi-sql", proto::ServerKind::SqlServer, identity_block(&[], "", true), "")
            .await
            .unwrap();
    let smi = smi_server.identity.unwrap().system_principal_id;
    assert!(!smi.is_empty());
    let r = set_protector(&b, &smi_server.id, &key).await;
    assert_status(r, Code::FailedPrecondition, "AzureKeyVaultMissingPermissions");
    b.policy("prim-kv", &smi, &TDE_PERMS).await;
    set_protector(&b, &smi_server.id, &key).await.expect("SMI with access");
    b.servers()
        .create_database(proto::CreateDatabaseRequest {
            server_id: smi_server.id.clone(),
            name: "db1".into(),
        })
        .await
        .unwrap();
    let st = b
        .engine(&smi_server.id)
        .await
        .get_protector_status(proto::GetProtectorStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.effective_identity_id, smi);
    b.stop().await;
}

#[tokio::test]
async fn revoking_the_primary_identitys_access_makes_the_databases_inaccessible() {
    let b = start().await;
    let s = cmk_server(&b, "rev-kv", "rev-sql").await;
    b.servers()
        .create_database(proto::CreateDatabaseRequest { server_id: s.server.id.clone(), name: "db2".into() })
        .await
        .unwrap();
    let mut watch = b
        .servers()
        .watch_database_states(proto::WatchDatabaseStatesRequest { server_id: s.server.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut e = b.engine(&s.server.id).await;
    let g = e
        .generate_database_key(proto::GenerateDatabaseKeyRequest { database: "db1".into() })
        .await
        .unwrap()
        .into_inner();
    b.policy("rev-kv", &s.umi.principal_id, &[]).await;
    // The next evaluation (here an engine call) finds the loss: every CMK database goes at once.
    let r = e
        .unwrap_database_key(proto::UnwrapDatabaseKeyRequest {
            database: "db1".into(),
            kid: g.kid,
            wrapped_dek: g.wrapped_dek,
        })
        .await;
    let msg = assert_status(r, Code::FailedPrecondition, "DatabaseInaccessible");
    assert!(msg.starts_with("Database 'db1' on server 'rev-sql' is not currently available. Please retry the connection later."), "{msg}");
    for db in ["db1", "db2"] {
        assert_eq!(
            state(&b.database(&s.server.id, db).await),
            (INACCESSIBLE, "IDENTITY_MISSING_PERMISSIONS")
        );
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(ev.event, "MakeDatabaseInaccessible");
        seen.push(ev.database.unwrap().name);
    }
    seen.sort();
    assert_eq!(seen, ["db1", "db2"]);
    // Restored inside the heal window: ONLINE again at the next probe.
    b.policy("rev-kv", &s.umi.principal_id, &TDE_PERMS).await;
    b.advance(PROBE).await;
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (ONLINE, ""));
    let ev = tokio::time::timeout(std::time::Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.event, "MakeDatabaseAccessible");
    b.stop().await;
}

#[tokio::test]
async fn a_new_primary_must_hold_the_permissions_first() {
    let b = start().await;
    let s = cmk_server(&b, "np-kv", "np-sql").await;
    let (umi2, who2) = b.identity("id-rg", "np-umi2").await;
    let both = identity_block(&[&s.umi.resource_id, &umi2.resource_id], &umi2.resource_id, false);
    let msg = assert_status(
        update_identity(&b, &s.server.id, both.clone()).await,
        Code::FailedPrecondition,
        "UmiMissingAkvPermissions",
    );
    assert!(
        msg.starts_with(
            "PrimaryUserAssignedIdentityId provided by user does not have access to KeyId provided"
        ),
        "{msg}"
    );
    let unchanged = b
        .servers()
        .get_server(proto::GetServerRequest { server_id: s.server.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        unchanged.identity.unwrap().user_assigned_identity_ids,
        vec![s.umi.resource_id.clone()],
        "nothing changed"
    );
    b.policy("np-kv", &who2.object_id, &TDE_PERMS).await;
    let updated = update_identity(&b, &s.server.id, both).await.expect("new primary with access");
    assert_eq!(updated.identity.unwrap().primary_user_assigned_identity_id, umi2.resource_id);
    b.stop().await;
}

#[tokio::test]
async fn switching_to_the_smi_works_after_granting_it_and_removing_all_umis() {
    let b = start().await;
    let key = protector_vault(&b, "sw-kv").await;
    let (umi, who) = b.identity("id-rg", "sw-umi").await;
    b.policy("sw-kv", &who.object_id, &TDE_PERMS).await;
    let s = create_server(
        &b,
        "sw-sql",
        proto::ServerKind::SqlServer,
        identity_block(&[&umi.resource_id], "", true),
        &key,
    )
    .await
    .unwrap();
    let smi = s.identity.clone().unwrap().system_principal_id;
    b.policy("sw-kv", &smi, &TDE_PERMS).await;
    let after = update_identity(&b, &s.id, identity_block(&[], "", true)).await.expect("switch to SMI");
    let ident = after.identity.unwrap();
    assert!(ident.user_assigned_identity_ids.is_empty());
    assert_eq!(ident.system_principal_id, smi);
    b.stop().await;
}

#[tokio::test]
async fn removing_all_umis_without_smi_access_is_refused_with_a_clear_message() {
    let b = start().await;
    let key = protector_vault(&b, "rm-kv").await;
    let (umi, who) = b.identity("id-rg", "rm-umi").await;
    b.policy("rm-kv", &who.object_id, &TDE_PERMS).await;
    let s = create_server(
        &b,
        "rm-sql",
        proto::ServerKind::SqlServer,
        identity_block(&[&umi.resource_id], "", true),
        &key,
    )
    .await
    .unwrap();
    let msg = assert_status(
        update_identity(&b, &s.id, identity_block(&[], "", true)).await,
        Code::FailedPrecondition,
        "AzureKeyVaultMissingPermissions",
    );
    assert!(msg.contains("Removing all user-assigned identities from server 'rm-sql' would make TDE use its system-assigned identity"), "{msg}");
    assert!(!msg.contains("Unexpected error occurred"));
    // No SMI at all: refused as having no identity.
    let msg = assert_status(
        update_identity(&b, &s.id, identity_block(&[], "", false)).await,
        Code::FailedPrecondition,
        "AzureKeyVaultNoServerIdentity",
    );
    assert!(msg.contains("rm-sql"), "{msg}");
    let unchanged = b
        .servers()
        .get_server(proto::GetServerRequest { server_id: s.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.identity.unwrap().user_assigned_identity_ids, vec![umi.resource_id]);
    b.stop().await;
}

#[tokio::test]
async fn removing_one_umi_of_several_really_removes_it() {
    let b = start().await;
    let s = cmk_server(&b, "one-kv", "one-sql").await;
    let (umi2, _) = b.identity("id-rg", "one-umi2").await;
    update_identity(
        &b,
        &s.server.id,
        identity_block(&[&s.umi.resource_id, &umi2.resource_id], &s.umi.resource_id, false),
    )
    .await
    .unwrap();
    let after =
        update_identity(&b, &s.server.id, identity_block(&[&s.umi.resource_id], &s.umi.resource_id, false))
            .await
            .unwrap();
    assert_eq!(after.identity.unwrap().user_assigned_identity_ids, vec![s.umi.resource_id.clone()]);
    let again = b
        .servers()
        .get_server(proto::GetServerRequest { server_id: s.server.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.identity.unwrap().user_assigned_identity_ids, vec![s.umi.resource_id]);
    b.stop().await;
}

#[tokio::test]
async fn deleting_the_primary_identity_needs_force_and_then_makes_the_databases_inaccessible() {
    let b = start().await;
    let s = cmk_server(&b, "del-kv", "del-sql").await;
    let del =
        |force| proto::DeleteUserAssignedIdentityRequest { resource_id: s.umi.resource_id.clone(), force };
    let msg = assert_status(
        b.ids().delete_user_assigned_identity(del(false)).await,
        Code::FailedPrecondition,
        "IdentityInUse",
    );
    assert!(msg.contains(&s.server.id), "the refusal lists the dependants: {msg}");
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (ONLINE, ""));
    b.ids().delete_user_assigned_identity(del(true)).await.expect("forced delete");
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (INACCESSIBLE, "IDENTITY_DELETED"));
    b.stop().await;
}

#[tokio::test]
async fn managed_instance_with_a_umi_needs_a_vault_open_to_all_networks() {
    let b = start().await;
    let key = protector_vault(&b, "mi-kv").await;
    let (umi, who) = b.identity("id-rg", "mi-umi").await;
    b.policy("mi-kv", &who.object_id, &TDE_PERMS).await;
    b.vaults()
        .update_vault(proto::UpdateVaultRequest {
            name: "mi-kv".into(),
            network_acls: Some(proto::NetworkAcls {
                default_action: "Deny".into(),
                bypass: "AzureServices".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = create_server(
        &b,
        "mi-1",
        proto::ServerKind::ManagedInstance,
        identity_block(&[&umi.resource_id], "", false),
        &key,
    )
    .await;
    let msg = assert_status(r, Code::FailedPrecondition, "AzureKeyVaultUmiNotSupportedWithFirewall");
    assert!(msg.starts_with("User Assigned Managed Identity for SQL Managed Instance is currently only supported on key vaults that have public access from all networks enabled."), "{msg}");
    b.vaults()
        .update_vault(proto::UpdateVaultRequest {
            name: "mi-kv".into(),
            network_acls: Some(proto::NetworkAcls { default_action: "Allow".into(), ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mi = create_server(
        &b,
        "mi-1",
        proto::ServerKind::ManagedInstance,
        identity_block(&[&umi.resource_id], "", false),
        &key,
    )
    .await
    .unwrap();
    assert!(mi.id.contains("/providers/Microsoft.Sql/managedInstances/mi-1"));
    b.stop().await;
}

const SEED_TEXT: &str = "Failed to save Transparent Data Encryption settings for SQL resource: {server}. Error message: The managed identity with ID '{id}' requires the following Azure Key Vault permissions: 'Get, WrapKey, UnwrapKey' to the key '{key}'. Please grant the missing permissions to the identity. Additionally ensure the key is not expired and is not disabled. For expired key, please extend the key expiry time so that SQL can use it to perform wrap and unwrap operations. If your key vault is behind a virtual network or firewall, ensure you select the 'Allow trusted Microsoft services to bypass this firewall' option. ({link}).";

async fn seed_message(b: &TestBroker) -> (String, String, String) {
    let key = protector_vault(b, "seed-kv").await;
    let (umi, _) = b.identity("id-rg", "seed-umi").await;
    let r = create_server(
        b,
        "seed-sql",
        proto::ServerKind::SqlServer,
        identity_block(&[&umi.resource_id], "", false),
        &key,
    )
    .await;
    let msg = assert_status(r, Code::FailedPrecondition, "AzureKeyVaultMissingPermissions");
    (msg, umi.resource_id, key)
}

#[tokio::test]
async fn identity_without_permissions_gets_the_seeds_message_word_for_word() {
    let b = start().await;
    let (msg, id, key) = seed_message(&b).await;
    let expected = SEED_TEXT
        .replace("{server}", "seed-sql")
        .replace("{id}", &id)
        .replace("{key}", &key)
        .replace("{link}", "https://aka.ms/sqltdebyokcreateserver");
    assert_eq!(msg, expected);
    b.stop().await;
}

#[tokio::test]
async fn azure_china_cloud_uses_the_chinese_seeds_documentation_link() {
    let (cfg, _dir) = config_from_toml("cloud = \"AzureChinaCloud\"\n");
    let b = start_cfg(cfg).await;
    let (msg, id, key) = seed_message(&b).await;
    let expected =
        SEED_TEXT.replace("{server}", "seed-sql").replace("{id}", &id).replace("{key}", &key).replace(
            "{link}",
            "https://docs.azure.cn/azure-sql/database/transparent-data-encryption-byok-create-server",
        );
    assert_eq!(msg, expected);
    b.stop().await;
}

#[tokio::test]
async fn protector_validations_refuse_with_the_sql_code_and_change_nothing() {
    let b = start().await;
    b.vault("val-nopp", false).await;
    b.key("val-nopp", "k", "RSA", 2048).await;
    b.vault("val-kv", true).await;
    b.key("val-kv", "rsa4096", "RSA", 4096).await;
    b.key("val-kv", "oct", "oct-HSM", 256).await;
    b.key("val-kv", "good", "RSA-HSM", 3072).await;
    let disabled = b.key("val-kv", "disabled", "RSA", 2048).await;
    b.kv()
        .update_key(proto::UpdateKeyRequest {
            key_id: kid(&disabled),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
    let now = b.now().await;
    let expired = b.key("val-kv", "expired", "RSA", 2048).await;
    b.kv()
        .update_key(proto::UpdateKeyRequest {
            key_id: kid(&expired),
            expires: Some(now + 10),
            ..Default::default()
        })
        .await
        .unwrap();
    let future = b.key("val-kv", "future", "RSA", 2048).await;
    b.kv()
        .update_key(proto::UpdateKeyRequest {
            key_id: kid(&future),
            not_before: Some(now + 3600),
            ..Default::default()
        })
        .await
        .unwrap();
    b.advance(20).await;
    let (umi, who) = b.identity("id-rg", "val-umi").await;
    for v in ["val-nopp", "val-kv"] {
        b.policy(v, &who.object_id, &TDE_PERMS).await;
    }
    let s = create_server(
        &b,
        "val-sql",
        proto::ServerKind::SqlServer,
        identity_block(&[&umi.resource_id], "", false),
        "",
    )
    .await
    .unwrap();
    for (key, code) in [
        (b.key_uri("val-nopp", "k"), "SecurityInvalidAzureKeyVaultRecoveryLevel"),
        (b.key_uri("val-kv", "rsa4096"), "AzureKeyVaultRsaKeyNotSupported"),
        (b.key_uri("val-kv", "oct"), "AzureKeyVaultRsaKeyNotSupported"),
        (b.key_uri("val-kv", "disabled"), "AzureKeyVaultKeyDisabled"),
        (b.key_uri("val-kv", "expired"), "AzureKeyVaultInvalidExpirationDate"),
        (b.key_uri("val-kv", "future"), "AzureKeyVaultInvalidExpirationDate"),
        (b.key_uri("val-kv", "missing"), "AzureKeyVaultKeyNameNotFound"),
    ] {
        assert_status(set_protector(&b, &s.id, &key).await, Code::FailedPrecondition, code);
        let p = b
            .servers()
            .get_encryption_protector(proto::GetEncryptionProtectorRequest { server_id: s.id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.server_key_type, "ServiceManaged", "{code}: nothing changed");
    }
    let msg = assert_status(
        set_protector(&b, &s.id, &b.key_uri("val-nopp", "k")).await,
        Code::FailedPrecondition,
        "SecurityInvalidAzureKeyVaultRecoveryLevel",
    );
    assert_eq!(msg, "The provided Key Vault uri is not valid.");
    let msg = assert_status(
        set_protector(&b, &s.id, &b.key_uri("val-kv", "rsa4096")).await,
        Code::FailedPrecondition,
        "AzureKeyVaultRsaKeyNotSupported",
    );
    assert_eq!(
        msg,
        "The provided key vault uses unsupported RSA Key Size or Key Type. The supported RSA key size is 2048 or 3072 and Key Type is RSA or RSA-HSM."
    );
    let p = set_protector(&b, &s.id, &b.key_uri("val-kv", "good")).await.expect("RSA-HSM 3072 is fine");
    assert_eq!(p.server_key_type, "AzureKeyVault");
    b.stop().await;
}

/// Applies `break_it` to the protector key, moves past a probe, and checks the reason.
async fn key_state_scenario(
    vault: &str,
    reason: &str,
    break_it: proto::UpdateKeyRequest,
    fix: proto::UpdateKeyRequest,
) {
    let b = start().await;
    let s = cmk_server(&b, vault, &format!("{vault}-sql")).await;
    let mut req = break_it;
    req.key_id = s.key.clone();
    if req.expires.is_some() {
        req.expires = Some(b.now().await + 60);
    }
    if req.not_before.is_some() {
        req.not_before = Some(b.now().await + 3 * 3600);
    }
    b.kv().update_key(req).await.unwrap();
    b.advance(PROBE).await;
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (INACCESSIBLE, reason));
    let mut fix = fix;
    fix.key_id = s.key.clone();
    b.kv().update_key(fix).await.unwrap();
    b.advance(PROBE).await;
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (ONLINE, ""), "healed within the window");
    b.stop().await;
}

#[tokio::test]
async fn disabled_protector_makes_databases_inaccessible_and_re_enabling_heals_them() {
    key_state_scenario(
        "st-dis",
        "KEY_DISABLED",
        proto::UpdateKeyRequest { enabled: Some(false), ..Default::default() },
        proto::UpdateKeyRequest { enabled: Some(true), ..Default::default() },
    )
    .await;
}

#[tokio::test]
async fn expired_protector_makes_databases_inaccessible_although_the_vault_still_unwraps() {
    key_state_scenario(
        "st-exp",
        "KEY_EXPIRED",
        proto::UpdateKeyRequest { expires: Some(0), ..Default::default() },
        proto::UpdateKeyRequest { clear_expires: true, ..Default::default() },
    )
    .await;
}

#[tokio::test]
async fn not_yet_valid_protector_makes_databases_inaccessible() {
    key_state_scenario(
        "st-nbf",
        "KEY_NOT_YET_VALID",
        proto::UpdateKeyRequest { not_before: Some(0), ..Default::default() },
        proto::UpdateKeyRequest { clear_not_before: true, ..Default::default() },
    )
    .await;
}

#[tokio::test]
async fn deleting_the_protectors_vault_makes_databases_inaccessible_and_recovering_it_heals_them() {
    let b = start().await;
    let s = cmk_server(&b, "vdel-kv", "vdel-sql").await;
    let mut e = b.engine(&s.server.id).await;
    let (wrapped, kid) = {
        let r = e
            .generate_database_key(proto::GenerateDatabaseKeyRequest { database: "db1".into() })
            .await
            .expect("online")
            .into_inner();
        (r.wrapped_dek, r.kid)
    };
    b.vaults().delete_vault(proto::DeleteVaultRequest { name: "vdel-kv".into() }).await.expect("soft delete");
    b.advance(PROBE).await;
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (INACCESSIBLE, "KEY_DELETED"));
    let r = e
        .unwrap_database_key(proto::UnwrapDatabaseKeyRequest {
            database: "db1".into(),
            kid: kid.clone(),
            wrapped_dek: wrapped.clone(),
        })
        .await;
    assert_status(r, Code::FailedPrecondition, "DatabaseInaccessible");
    b.vaults()
        .recover_deleted_vault(proto::RecoverDeletedVaultRequest { name: "vdel-kv".into() })
        .await
        .expect("recover");
    b.advance(PROBE).await;
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (ONLINE, ""), "healed within the window");
    e.unwrap_database_key(proto::UnwrapDatabaseKeyRequest {
        database: "db1".into(),
        kid,
        wrapped_dek: wrapped,
    })
    .await
    .expect("the recovered key unwraps the DEK again");
    b.stop().await;
}

#[tokio::test]
async fn access_restored_after_the_heal_window_needs_revalidation() {
    let b = start().await;
    let s = cmk_server(&b, "heal-kv", "heal-sql").await;
    b.kv()
        .update_key(proto::UpdateKeyRequest {
            key_id: s.key.clone(),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
    b.advance(PROBE).await;
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (INACCESSIBLE, "KEY_DISABLED"));
    // Revalidation while access is still lost names the cause.
    let r = b
        .servers()
        .revalidate_encryption_protector(proto::RevalidateEncryptionProtectorRequest {
            server_id: s.server.id.clone(),
        })
        .await;
    assert_status(r, Code::FailedPrecondition, "AzureKeyVaultKeyDisabled");
    b.advance(3600).await;
    b.kv()
        .update_key(proto::UpdateKeyRequest {
            key_id: s.key.clone(),
            enabled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    b.advance(PROBE).await;
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (INACCESSIBLE, "REVALIDATION_REQUIRED"));
    b.advance(PROBE).await;
    assert_eq!(
        state(&b.database(&s.server.id, "db1").await),
        (INACCESSIBLE, "REVALIDATION_REQUIRED"),
        "no auto-heal after the window"
    );
    b.servers()
        .revalidate_encryption_protector(proto::RevalidateEncryptionProtectorRequest {
            server_id: s.server.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (ONLINE, ""));
    b.stop().await;
}

#[tokio::test]
async fn auto_rotation_follows_the_newest_version_and_old_versions_keep_unwrapping() {
    let b = start().await;
    let s = cmk_server(&b, "auto-kv", "auto-sql").await;
    b.servers()
        .set_encryption_protector(proto::SetEncryptionProtectorRequest {
            server_id: s.server.id.clone(),
            server_key_type: "AzureKeyVault".into(),
            key_id: s.key.clone(),
            auto_rotation_enabled: true,
        })
        .await
        .unwrap();
    let mut e = b.engine(&s.server.id).await;
    let g = e
        .generate_database_key(proto::GenerateDatabaseKeyRequest { database: "db1".into() })
        .await
        .unwrap()
        .into_inner();
    let v2 = kid(&b
        .kv()
        .rotate_key(proto::RotateKeyRequest { key_id: s.key.clone() })
        .await
        .unwrap()
        .into_inner());
    b.advance(PROBE).await;
    let p = b
        .servers()
        .get_encryption_protector(proto::GetEncryptionProtectorRequest { server_id: s.server.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.kid, v2);
    let rw = e
        .rewrap_database_key(proto::RewrapDatabaseKeyRequest {
            database: "db1".into(),
            kid: g.kid.clone(),
            wrapped_dek: g.wrapped_dek.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rw.kid, v2);
    let old = e
        .unwrap_database_key(proto::UnwrapDatabaseKeyRequest {
            database: "db1".into(),
            kid: g.kid,
            wrapped_dek: g.wrapped_dek,
        })
        .await
        .unwrap()
        .into_inner();
    let new = e
        .unwrap_database_key(proto::UnwrapDatabaseKeyRequest {
            database: "db1".into(),
            kid: rw.kid,
            wrapped_dek: rw.wrapped_dek,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.dek, g.dek);
    assert_eq!(new.dek, g.dek);
    b.stop().await;
}

#[tokio::test]
async fn engine_calls_need_a_host_credential_and_host_tokens_reach_only_their_servers_identities() {
    let b = start().await;
    let s = cmk_server(&b, "host-kv", "host-sql").await;
    let (other, _) = b.identity("id-rg", "not-mine").await;
    let r = b.kv_with(bearer(&b.token)); // the admin is no engine host
    drop(r);
    let mut admin_engine = tde_broker::grpc::proto::tde_engine_client::TdeEngineClient::with_interceptor(
        b.channel.clone(),
        bearer(&b.token),
    );
    let res = admin_engine
        .generate_database_key(proto::GenerateDatabaseKeyRequest { database: "db1".into() })
        .await;
    assert_status(res, Code::PermissionDenied, "NotAServerHost");
    let cred = b
        .servers()
        .issue_host_credential(proto::IssueHostCredentialRequest { server_id: s.server.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut host_ids = b.ids_with(bearer(&cred.token));
    assert!(
        host_ids
            .get_token(proto::GetTokenRequest {
                resource_id: s.umi.resource_id.clone(),
                ..Default::default()
            })
            .await
            .is_ok()
    );
    let r = host_ids
        .get_token(proto::GetTokenRequest { resource_id: other.resource_id.clone(), ..Default::default() })
        .await;
    assert_status(r, Code::PermissionDenied, "AuthorizationFailed");
    b.stop().await;
}

#[tokio::test]
async fn enforce_cmk_deny_refuses_servers_without_a_customer_managed_key() {
    let (cfg, _dir) = config_from_toml("enforce_cmk = \"deny\"\n");
    let b = start_cfg(cfg).await;
    let r = create_server(&b, "plain", proto::ServerKind::SqlServer, identity_block(&[], "", true), "").await;
    let msg = assert_status(r, Code::PermissionDenied, "RequestDisallowedByPolicy");
    assert!(msg.contains("SQL server should use customer-managed keys"), "{msg}");
    let key = protector_vault(&b, "pol-kv").await;
    let (umi, who) = b.identity("id-rg", "pol-umi").await;
    b.policy("pol-kv", &who.object_id, &TDE_PERMS).await;
    assert!(
        create_server(
            &b,
            "cmk",
            proto::ServerKind::SqlServer,
            identity_block(&[&umi.resource_id], "", false),
            &key
        )
        .await
        .is_ok()
    );
    b.stop().await;
}

#[tokio::test]
async fn transient_faults_keep_the_database_online_through_the_grace_period() {
    let b = start().await;
    let s = cmk_server(&b, "flaky-kv", "flaky-sql").await;
    let outage =
        |on| proto::SetFaultsRequest { vault_name: "flaky-kv".into(), outage: on, ..Default::default() };
    b.emu().set_faults(outage(true)).await.unwrap();
    // The vault answers "5xx" to everyone, the engine included ...
    let r = b.kv().get_key(proto::GetKeyRequest { key_id: s.key.clone() }).await;
    assert_status(r, Code::Unavailable, "ServiceUnavailable");
    let mut e = b.engine(&s.server.id).await;
    let r = e.generate_database_key(proto::GenerateDatabaseKeyRequest { database: "db1".into() }).await;
    assert_status(r, Code::Unavailable, "ServiceUnavailable");
    // ... but the database stays ONLINE: the engine serves from its cache.
    b.advance(23 * 3600).await;
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (ONLINE, ""));
    b.emu().clear_faults(proto::ClearFaultsRequest { vault_name: "flaky-kv".into() }).await.unwrap();
    assert!(
        e.generate_database_key(proto::GenerateDatabaseKeyRequest { database: "db1".into() }).await.is_ok()
    );
    // An outage that outlasts the grace period costs the database.
    b.emu().set_faults(outage(true)).await.unwrap();
    b.advance(24 * 3600).await;
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (INACCESSIBLE, "VAULT_UNREACHABLE"));
    b.emu().clear_faults(proto::ClearFaultsRequest::default()).await.unwrap();
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (INACCESSIBLE, "REVALIDATION_REQUIRED"));
    b.servers()
        .revalidate_encryption_protector(proto::RevalidateEncryptionProtectorRequest {
            server_id: s.server.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(state(&b.database(&s.server.id, "db1").await), (ONLINE, ""));
    b.stop().await;
}

// ---- Issue 17, defect 1: a watch stream lives only as long as its watcher's access ----------

/// Far above the broker's re-check interval (0.5 s), far below a hang.
const WATCH_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

type Events = tonic::Streaming<proto::DatabaseStateEvent>;

fn servers_as(b: &TestBroker, token: &str) -> Srv {
    proto::servers_client::ServersClient::with_interceptor(b.channel.clone(), bearer(token))
}

async fn watch_as(b: &TestBroker, token: &str, server_id: &str) -> Events {
    servers_as(b, token)
        .watch_database_states(proto::WatchDatabaseStatesRequest { server_id: server_id.into() })
        .await
        .expect("the watcher may watch")
        .into_inner()
}

/// What GetServer answers `token` for `server_id` now: the status a watch must end with.
async fn get_server_refusal(b: &TestBroker, token: &str, server_id: &str) -> tonic::Status {
    servers_as(b, token)
        .get_server(proto::GetServerRequest { server_id: server_id.into() })
        .await
        .expect_err("GetServer is refused")
}

async fn next_event(events: &mut Events) -> Result<Option<proto::DatabaseStateEvent>, tonic::Status> {
    tokio::time::timeout(WATCH_WITHIN, events.message()).await.expect("the stream answered within 5 s")
}

/// The stream ended with `expected`: the same code, `ErrorInfo` reason and text.
fn assert_ended_with(
    got: Result<Option<proto::DatabaseStateEvent>, tonic::Status>,
    expected: &tonic::Status,
) {
    let got = got.expect_err("the stream ends with an error status");
    assert_eq!(got.code(), expected.code(), "{}", got.message());
    let reason = tde_broker::grpc::status::reason;
    assert_eq!(reason(&got), reason(expected), "{}", got.message());
    assert_eq!(got.message(), expected.message());
}

/// Takes `db1` inaccessible: the UMI loses its key permissions and an engine call finds it.
async fn lose_protector_access(b: &TestBroker, vault: &str, s: &Setup) {
    b.policy(vault, &s.umi.principal_id, &[]).await;
    let r = b
        .engine(&s.server.id)
        .await
        .generate_database_key(proto::GenerateDatabaseKeyRequest { database: "db1".into() })
        .await;
    assert_eq!(r.expect_err("db1 became inaccessible").code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn watch_stream_ends_when_the_watchers_role_assignment_is_removed() {
    let b = start().await;
    let s = cmk_server(&b, "wr-kv", "wr-sql").await;
    let watcher = b.user("watcher").await;
    let grant = b.assign(&s.server.id, &watcher.object_id, "Reader").await;
    let mut events = watch_as(&b, &watcher.token, &s.server.id).await;

    // While the role holds, changes (unrelated ones too) keep the stream open and events flow.
    b.vault("unrelated-kv", false).await;
    lose_protector_access(&b, "wr-kv", &s).await;
    let event = next_event(&mut events).await.expect("an event, not an error").expect("the stream is open");
    assert_eq!(event.event, "MakeDatabaseInaccessible");

    b.vaults()
        .delete_role_assignment(proto::DeleteRoleAssignmentRequest { id: grant.id })
        .await
        .expect("role assignment deleted");
    let refused = get_server_refusal(&b, &watcher.token, &s.server.id).await;
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(tde_broker::grpc::status::reason(&refused).as_deref(), Some("AuthorizationFailed"));
    // No further event is needed: the epoch moved, and the stream ends on its own.
    assert_ended_with(next_event(&mut events).await, &refused);
    assert!(matches!(next_event(&mut events).await, Ok(None)), "nothing follows the refusal");
    b.stop().await;
}

#[tokio::test]
async fn watch_stream_ends_when_the_watchers_token_expires() {
    let b = start().await;
    let s = cmk_server(&b, "wt-kv", "wt-sql").await;
    let watcher = b.user("watcher").await;
    b.assign(&s.server.id, &watcher.object_id, "Reader").await;
    let mut events = watch_as(&b, &watcher.token, &s.server.id).await;
    // Past the token's exp and the tolerated skew, on the broker's clock; no change is needed.
    let exp = claims(&watcher.token)["exp"].as_i64().expect("exp");
    b.advance(exp + 301 - b.now().await).await;
    let refused = get_server_refusal(&b, &watcher.token, &s.server.id).await;
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("IDX10223"), "{}", refused.message());
    assert_ended_with(next_event(&mut events).await, &refused);
    b.stop().await;
}

#[tokio::test]
async fn a_watcher_that_lost_its_access_gets_no_later_event() {
    let b = start().await;
    let s = cmk_server(&b, "we-kv", "we-sql").await;
    let watcher = b.user("watcher").await;
    let grant = b.assign(&s.server.id, &watcher.object_id, "Reader").await;
    let mut events = watch_as(&b, &watcher.token, &s.server.id).await;
    // The role goes, and at once a transition is published: it is not delivered.
    b.vaults()
        .delete_role_assignment(proto::DeleteRoleAssignmentRequest { id: grant.id })
        .await
        .expect("role assignment deleted");
    lose_protector_access(&b, "we-kv", &s).await;
    let refused = get_server_refusal(&b, &watcher.token, &s.server.id).await;
    assert_ended_with(next_event(&mut events).await, &refused);
    b.stop().await;
}

#[tokio::test]
async fn watch_stream_ends_when_the_watchers_principal_is_deleted() {
    let b = start().await;
    let s = cmk_server(&b, "wp-kv", "wp-sql").await;
    // A managed identity watches with a control-plane token; then the identity is deleted.
    let (doomed, _) = b.identity("id-rg", "watching-umi").await;
    b.assign(&s.server.id, &doomed.principal_id, "Reader").await;
    let token = b
        .ids()
        .get_token(proto::GetTokenRequest {
            client_id: doomed.client_id.clone(),
            audience: "https://management.azure.com/".into(),
            ..Default::default()
        })
        .await
        .expect("management token")
        .into_inner()
        .access_token;
    let mut events = watch_as(&b, &token, &s.server.id).await;
    b.ids()
        .delete_user_assigned_identity(proto::DeleteUserAssignedIdentityRequest {
            resource_id: doomed.resource_id.clone(),
            force: false,
        })
        .await
        .expect("identity deleted");
    let refused = get_server_refusal(&b, &token, &s.server.id).await;
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(tde_broker::grpc::status::reason(&refused).as_deref(), Some("Unauthorized"));
    assert_ended_with(next_event(&mut events).await, &refused);
    b.stop().await;
}
