//! docs/RULES.md R1.10: vault soft delete as Key Vault does it, over real gRPC. DeleteVault keeps
//! the vault and all its keys for its retention days; meanwhile the vault is gone from every
//! other view, its name cannot be reused, and it can be read, listed, recovered (with everything
//! it held) or purged (not under purge protection); the broker purges it by itself on its clock.

mod common;

use common::*;
use tde_broker::grpc::proto;
use tonic::Code;

const DAY: i64 = 86_400;
const DEK: [u8; 32] = [7u8; 32];
const SUB: &str = "00000000-0000-0000-0000-000000000000";

fn not_found_text(vault: &str) -> String {
    format!("The Resource 'Microsoft.KeyVault/vaults/{vault}' was not found.")
}

fn deleted_not_found_text(vault: &str) -> String {
    format!("The Resource 'Microsoft.KeyVault/locations/deletedVaults/{vault}' was not found.")
}

const NAME_IN_DELETED_STATE: &str = "A vault with the same name already exists in deleted state. You need to either recover or purge existing key vault. Follow this link https://go.microsoft.com/fwlink/?linkid=2149745 for more information on soft delete.";

async fn create_vault(b: &TestBroker, name: &str, retention_days: i32, purge_protection: bool) {
    b.vaults()
        .create_vault(proto::CreateVaultRequest {
            name: name.into(),
            soft_delete_retention_days: retention_days,
            enable_purge_protection: purge_protection,
            ..Default::default()
        })
        .await
        .expect("create vault");
    b.policy(name, &b.admin.object_id, &["all"]).await;
}

async fn delete_vault(b: &TestBroker, name: &str) {
    b.vaults().delete_vault(proto::DeleteVaultRequest { name: name.into() }).await.expect("delete vault");
}

async fn get_vault(b: &TestBroker, name: &str) -> Result<proto::Vault, tonic::Status> {
    b.vaults().get_vault(proto::GetVaultRequest { name: name.into() }).await.map(|r| r.into_inner())
}

async fn get_deleted(b: &TestBroker, name: &str) -> Result<proto::DeletedVault, tonic::Status> {
    b.vaults()
        .get_deleted_vault(proto::GetDeletedVaultRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

async fn recover(b: &TestBroker, name: &str) -> Result<proto::Vault, tonic::Status> {
    b.vaults()
        .recover_deleted_vault(proto::RecoverDeletedVaultRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

async fn purge(b: &TestBroker, name: &str) -> Result<(), tonic::Status> {
    b.vaults().purge_deleted_vault(proto::PurgeDeletedVaultRequest { name: name.into() }).await.map(drop)
}

async fn deleted_names(b: &TestBroker) -> Vec<String> {
    b.vaults()
        .list_deleted_vaults(proto::ListDeletedVaultsRequest {})
        .await
        .expect("list deleted vaults")
        .into_inner()
        .vaults
        .into_iter()
        .map(|d| d.vault.expect("vault").name)
        .collect()
}

async fn vault_names(b: &TestBroker) -> Vec<String> {
    b.vaults()
        .list_vaults(proto::ListVaultsRequest {})
        .await
        .expect("list vaults")
        .into_inner()
        .vaults
        .into_iter()
        .map(|v| v.name)
        .collect()
}

async fn role_scopes(b: &TestBroker) -> Vec<String> {
    b.vaults()
        .list_role_assignments(proto::ListRoleAssignmentsRequest::default())
        .await
        .expect("list role assignments")
        .into_inner()
        .assignments
        .into_iter()
        .map(|a| a.normalized_scope)
        .collect()
}

fn vault_id(name: &str) -> String {
    format!("/subscriptions/{SUB}/resourceGroups/tde-broker/providers/Microsoft.KeyVault/vaults/{name}")
}

#[tokio::test]
async fn deleting_a_vault_keeps_its_keys_and_recovering_brings_everything_back() {
    let b = start().await;
    create_vault(&b, "sd-keep", 0, false).await;
    let key = kid(&b.key("sd-keep", "k", "RSA", 2048).await);
    b.key("sd-keep", "gone", "RSA", 2048).await;
    b.kv()
        .delete_key(proto::DeleteKeyRequest { key_id: b.key_uri("sd-keep", "gone") })
        .await
        .expect("soft-delete one key");
    let wrapped =
        b.kv().wrap_key(crypto_req(&key, "RSA-OAEP-256", &DEK)).await.expect("wrap").into_inner().value;
    let user = b.user("sd-user").await;
    b.policy("sd-keep", &user.object_id, &["get", "unwrapKey"]).await;
    b.firewall(
        "sd-keep",
        proto::NetworkAcls {
            default_action: "Deny".into(),
            bypass: "None".into(),
            ip_rules: vec!["127.0.0.1".into()],
            virtual_network_rules: vec![],
        },
        None,
    )
    .await;
    b.assign("https://sd-keep.vault.azure.net", &user.object_id, "Key Vault Reader").await;
    let before = get_vault(&b, "sd-keep").await.expect("vault");
    let roles_before = role_scopes(&b).await;

    delete_vault(&b, "sd-keep").await;
    let text = assert_status(get_vault(&b, "sd-keep").await, Code::NotFound, "ResourceNotFound");
    assert_eq!(text, not_found_text("sd-keep"));
    assert_eq!(role_scopes(&b).await, roles_before, "role assignments at its scope are kept meanwhile");

    let recovered = recover(&b, "sd-keep").await.expect("recover");
    assert_eq!(recovered, before, "settings, access policies and network rules as they were");
    assert_eq!(get_vault(&b, "sd-keep").await.expect("vault is back"), before);
    assert_eq!(role_scopes(&b).await, roles_before);
    assert!(deleted_names(&b).await.is_empty());
    let user_kv = b.kv_with(bearer(&user.token));
    let dek = user_kv
        .clone()
        .unwrap_key(unwrap_req(&key, "RSA-OAEP-256", &wrapped))
        .await
        .expect("the user's access policy is back and the key unwraps")
        .into_inner()
        .value;
    assert_eq!(dek, DEK);
    let deleted_keys = b
        .kv()
        .list_deleted_keys(proto::ListDeletedKeysRequest {
            vault_name: "sd-keep".into(),
            ..Default::default()
        })
        .await
        .expect("list deleted keys")
        .into_inner()
        .keys;
    assert_eq!(deleted_keys.len(), 1, "a key soft-deleted before stays soft-deleted");
    b.stop().await;
}

#[tokio::test]
async fn keys_of_a_deleted_vault_are_not_found_and_the_vault_is_in_no_view() {
    let b = start().await;
    create_vault(&b, "sd-gone", 0, false).await;
    let key = kid(&b.key("sd-gone", "k", "RSA", 2048).await);
    let wrapped =
        b.kv().wrap_key(crypto_req(&key, "RSA-OAEP-256", &DEK)).await.expect("wrap").into_inner().value;
    // Warm the decision and unwrap caches: nothing cached may answer for a deleted vault.
    b.kv().unwrap_key(unwrap_req(&key, "RSA-OAEP-256", &wrapped)).await.expect("unwrap");
    b.kv().get_key(proto::GetKeyRequest { key_id: key.clone() }).await.expect("get");
    delete_vault(&b, "sd-gone").await;

    let expected = not_found_text("sd-gone");
    let mut kv = b.kv();
    let checks = [
        kv.get_key(proto::GetKeyRequest { key_id: key.clone() }).await.map(drop),
        kv.wrap_key(crypto_req(&key, "RSA-OAEP-256", &DEK)).await.map(drop),
        kv.unwrap_key(unwrap_req(&key, "RSA-OAEP-256", &wrapped)).await.map(drop),
        kv.list_keys(proto::ListKeysRequest { vault_name: "sd-gone".into(), ..Default::default() })
            .await
            .map(drop),
        kv.list_deleted_keys(proto::ListDeletedKeysRequest {
            vault_name: "sd-gone".into(),
            ..Default::default()
        })
        .await
        .map(drop),
        kv.create_key(proto::CreateKeyRequest {
            vault_name: "sd-gone".into(),
            name: "new".into(),
            kty: "RSA".into(),
            ..Default::default()
        })
        .await
        .map(drop),
        b.vaults()
            .list_access_policies(proto::ListAccessPoliciesRequest { vault_name: "sd-gone".into() })
            .await
            .map(drop),
        b.vaults()
            .update_vault(proto::UpdateVaultRequest {
                name: "sd-gone".into(),
                enable_purge_protection: Some(true),
                ..Default::default()
            })
            .await
            .map(drop),
        b.vaults().delete_vault(proto::DeleteVaultRequest { name: "sd-gone".into() }).await.map(drop),
    ];
    for (i, r) in checks.into_iter().enumerate() {
        assert_eq!(assert_status(r, Code::NotFound, "ResourceNotFound"), expected, "check {i}");
    }
    assert!(!vault_names(&b).await.contains(&"sd-gone".to_string()));
    assert_eq!(deleted_names(&b).await, ["sd-gone"]);
    b.stop().await;
}

#[tokio::test]
async fn a_deleted_vaults_name_cannot_be_reused_until_it_is_purged() {
    let b = start().await;
    create_vault(&b, "sd-name", 0, false).await;
    b.key("sd-name", "k", "RSA", 2048).await;
    b.assign("https://sd-name.vault.azure.net", &b.admin.object_id, "Key Vault Crypto User").await;
    assert!(role_scopes(&b).await.iter().any(|s| s.eq_ignore_ascii_case(&vault_id("sd-name"))));
    delete_vault(&b, "sd-name").await;

    let refused = b
        .vaults()
        .create_vault(proto::CreateVaultRequest { name: "SD-Name".into(), ..Default::default() })
        .await;
    assert_eq!(assert_status(refused, Code::FailedPrecondition, "ConflictError"), NAME_IN_DELETED_STATE);

    purge(&b, "sd-name").await.expect("purge");
    assert!(deleted_names(&b).await.is_empty());
    let text = assert_status(get_deleted(&b, "sd-name").await, Code::NotFound, "ResourceNotFound");
    assert_eq!(text, deleted_not_found_text("sd-name"));
    assert!(
        !role_scopes(&b).await.iter().any(|s| s.eq_ignore_ascii_case(&vault_id("sd-name"))),
        "the role assignments at its scope went with it"
    );

    create_vault(&b, "sd-name", 0, false).await;
    let keys = b
        .kv()
        .list_keys(proto::ListKeysRequest { vault_name: "sd-name".into(), ..Default::default() })
        .await
        .expect("list keys")
        .into_inner()
        .keys;
    assert!(keys.is_empty(), "a vault created again under the name starts empty");
    b.stop().await;
}

#[tokio::test]
async fn purging_a_deleted_vault_is_refused_under_purge_protection() {
    let b = start().await;
    create_vault(&b, "sd-pp", 0, true).await;
    delete_vault(&b, "sd-pp").await;
    let text = assert_status(purge(&b, "sd-pp").await, Code::PermissionDenied, "Forbidden");
    assert_eq!(
        text,
        "Operation \"purge\" is not allowed because purge protection is enabled for this vault. Key Vault service will automatically purge it after the retention period has passed."
    );
    assert_eq!(deleted_names(&b).await, ["sd-pp"], "still there, still recoverable");
    recover(&b, "sd-pp").await.expect("recoverable under purge protection");
    b.stop().await;
}

#[tokio::test]
async fn the_sweeper_purges_a_deleted_vault_with_its_keys_when_its_purge_date_passes() {
    let b = start().await;
    // Purge protection does not stop the broker's own purge once retention has passed.
    create_vault(&b, "sd-sweep", 7, true).await;
    b.key("sd-sweep", "k", "RSA", 2048).await;
    delete_vault(&b, "sd-sweep").await;
    let scheduled = get_deleted(&b, "sd-sweep").await.expect("deleted vault").scheduled_purge_date;

    let now = b.now().await;
    b.advance(scheduled - now - 1).await;
    assert_eq!(deleted_names(&b).await, ["sd-sweep"], "kept until the scheduled purge date");
    b.advance(1).await;
    assert!(deleted_names(&b).await.is_empty(), "purged on the broker's clock");
    assert_status(get_deleted(&b, "sd-sweep").await, Code::NotFound, "ResourceNotFound");

    create_vault(&b, "sd-sweep", 7, false).await;
    let keys = b
        .kv()
        .list_deleted_keys(proto::ListDeletedKeysRequest {
            vault_name: "sd-sweep".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .keys;
    let active = b
        .kv()
        .list_keys(proto::ListKeysRequest { vault_name: "sd-sweep".into(), ..Default::default() })
        .await
        .expect("list")
        .into_inner()
        .keys;
    assert!(keys.is_empty() && active.is_empty(), "its keys were purged with it");
    b.stop().await;
}

#[tokio::test]
async fn deleted_vaults_show_their_settings_deletion_date_and_purge_date_after_retention() {
    let b = start().await;
    create_vault(&b, "sd-dates", 30, true).await;
    create_vault(&b, "sd-dates2", 0, false).await;
    let before = get_vault(&b, "sd-dates").await.expect("vault");
    let deleted_at = b.now().await;
    delete_vault(&b, "sd-dates").await;
    b.advance(3600).await;
    delete_vault(&b, "sd-dates2").await;

    let d = get_deleted(&b, "sd-dates").await.expect("deleted vault");
    assert_eq!(d.vault.as_ref(), Some(&before));
    assert_eq!(d.deleted_date, deleted_at);
    assert_eq!(d.scheduled_purge_date, deleted_at + 30 * DAY);

    let list = b
        .vaults()
        .list_deleted_vaults(proto::ListDeletedVaultsRequest {})
        .await
        .expect("list")
        .into_inner()
        .vaults;
    assert_eq!(list.len(), 2);
    assert_eq!(list[0], d);
    let d2 = &list[1];
    assert_eq!(d2.vault.as_ref().map(|v| v.name.as_str()), Some("sd-dates2"));
    assert_eq!(d2.deleted_date, deleted_at + 3600);
    assert_eq!(d2.scheduled_purge_date, deleted_at + 3600 + 90 * DAY, "the default retention is 90 days");
    b.stop().await;
}

#[tokio::test]
async fn deleted_vault_operations_on_a_name_that_is_not_deleted_are_not_found() {
    let b = start().await;
    create_vault(&b, "sd-live", 0, false).await;
    for name in ["sd-live", "sd-never"] {
        let expected = deleted_not_found_text(name);
        assert_eq!(assert_status(get_deleted(&b, name).await, Code::NotFound, "ResourceNotFound"), expected);
        assert_eq!(assert_status(recover(&b, name).await, Code::NotFound, "ResourceNotFound"), expected);
        assert_eq!(assert_status(purge(&b, name).await, Code::NotFound, "ResourceNotFound"), expected);
    }
    assert!(get_vault(&b, "sd-live").await.is_ok(), "a live vault is untouched");
    b.stop().await;
}

#[tokio::test]
async fn purging_a_deleted_vault_needs_the_purge_action_and_listing_shows_only_what_the_caller_may_read() {
    let b = start().await;
    create_vault(&b, "sd-rights", 0, false).await;
    delete_vault(&b, "sd-rights").await;
    let user = b.user("sd-nobody").await;
    let mut vaults = b.vaults_with(bearer(&user.token));
    let refused =
        vaults.purge_deleted_vault(proto::PurgeDeletedVaultRequest { name: "sd-rights".into() }).await;
    let text = assert_status(refused, Code::PermissionDenied, "AuthorizationFailed");
    assert!(
        text.contains("'Microsoft.KeyVault/locations/deletedVaults/purge/action'")
            && text.contains("/providers/Microsoft.KeyVault/locations/"),
        "{text}"
    );
    let listed =
        vaults.list_deleted_vaults(proto::ListDeletedVaultsRequest {}).await.expect("list").into_inner();
    assert!(listed.vaults.is_empty(), "a caller without read access sees no deleted vault");
    assert_eq!(deleted_names(&b).await, ["sd-rights"]);
    b.stop().await;
}

#[tokio::test]
async fn a_deleted_vault_stays_deleted_across_a_restart_and_recovers_with_its_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = {
        let b = start_in(dir.path(), tde_broker::config::ClockKind::Manual).await;
        create_vault(&b, "sd-durable", 0, false).await;
        let key = kid(&b.key("sd-durable", "k", "RSA", 2048).await);
        delete_vault(&b, "sd-durable").await;
        b.stop().await;
        key
    };
    let b = start_in(dir.path(), tde_broker::config::ClockKind::Manual).await;
    assert_eq!(deleted_names(&b).await, ["sd-durable"]);
    assert_status(get_vault(&b, "sd-durable").await, Code::NotFound, "ResourceNotFound");
    recover(&b, "sd-durable").await.expect("recover");
    b.kv().get_key(proto::GetKeyRequest { key_id: key }).await.expect("the key is back");
    b.stop().await;
}
