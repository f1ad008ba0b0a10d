//! docs/RULES.md R1.12 over real gRPC: key rotation policies — the default policy, validation
//! with Key Vault's limits, permissions on both permission models, rotation on the broker's
//! clock, the TDE protector following under auto-rotation, durability, purge and backup.

mod common;

use common::*;
use tde_broker::config::ClockKind;
use tde_broker::grpc::proto;
use tonic::Code;

const DAY: i64 = 86_400;

fn action(action: &str, after: &str, before: &str) -> proto::LifetimeAction {
    proto::LifetimeAction {
        action: action.into(),
        time_after_create: after.into(),
        time_before_expiry: before.into(),
    }
}

fn policy(expiry: &str, actions: Vec<proto::LifetimeAction>) -> proto::KeyRotationPolicy {
    proto::KeyRotationPolicy { expiry_time: expiry.into(), lifetime_actions: actions, ..Default::default() }
}

async fn set_policy(
    kv: &mut Kv,
    key_id: &str,
    p: proto::KeyRotationPolicy,
) -> Result<proto::KeyRotationPolicy, tonic::Status> {
    kv.update_key_rotation_policy(proto::UpdateKeyRotationPolicyRequest {
        key_id: key_id.into(),
        policy: Some(p),
    })
    .await
    .map(|r| r.into_inner())
}

async fn get_policy(kv: &mut Kv, key_id: &str) -> Result<proto::KeyRotationPolicy, tonic::Status> {
    kv.get_key_rotation_policy(proto::GetKeyRotationPolicyRequest { key_id: key_id.into() })
        .await
        .map(|r| r.into_inner())
}

async fn versions(b: &TestBroker, key_id: &str) -> Vec<proto::KeyItem> {
    b.kv()
        .list_key_versions(proto::ListKeyVersionsRequest { key_id: key_id.into(), ..Default::default() })
        .await
        .expect("versions")
        .into_inner()
        .keys
}

async fn newest(b: &TestBroker, key_id: &str) -> proto::KeyBundle {
    b.kv().get_key(proto::GetKeyRequest { key_id: key_id.into() }).await.expect("get key").into_inner()
}

/// A vault `vault` holding key `k` (RSA 2048); returns the unversioned key URI.
async fn vault_with_key(b: &TestBroker, vault: &str, purge_protection: bool) -> String {
    b.vault(vault, purge_protection).await;
    b.key(vault, "k", "RSA", 2048).await;
    b.key_uri(vault, "k")
}

#[tokio::test]
async fn a_key_without_a_policy_answers_key_vaults_default_notify_30_days_before_expiry() {
    let b = start().await;
    let key = vault_with_key(&b, "rp-default", false).await;
    let p = get_policy(&mut b.kv(), &key).await.expect("default policy");
    assert_eq!(p.id, format!("{key}/rotationpolicy"));
    assert_eq!(p.expiry_time, "");
    assert_eq!(p.lifetime_actions, vec![action("Notify", "", "P30D")]);
    assert_eq!((p.created, p.updated), (0, 0));
    b.stop().await;
}

#[tokio::test]
async fn a_set_policy_is_answered_as_set_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = start_in(dir.path(), ClockKind::Manual).await;
    let key = vault_with_key(&b, "rp-durable", false).await;
    let now = b.now().await;
    let want = vec![action("Rotate", "P30D", ""), action("Notify", "", "P10D")];
    let set = set_policy(&mut b.kv(), &key, policy("P90D", want.clone())).await.expect("set");
    assert_eq!((set.expiry_time.as_str(), &set.lifetime_actions), ("P90D", &want));
    assert_eq!((set.created, set.updated), (now, now));
    b.advance(60).await;
    // A second update replaces the policy whole and keeps its creation time.
    let again = set_policy(&mut b.kv(), &key, policy("P60D", vec![action("Rotate", "", "P14D")]))
        .await
        .expect("replace");
    assert_eq!((again.created, again.updated), (now, now + 60));
    b.stop().await;

    let b = start_in(dir.path(), ClockKind::Manual).await;
    let p = get_policy(&mut b.kv(), &key).await.expect("after restart");
    assert_eq!(p.expiry_time, "P60D");
    assert_eq!(p.lifetime_actions, vec![action("Rotate", "", "P14D")]);
    assert_eq!((p.created, p.updated), (now, now + 60));
    b.stop().await;
}

#[tokio::test]
async fn invalid_policies_are_refused_with_the_rule_they_break_and_change_nothing() {
    let b = start().await;
    let key = vault_with_key(&b, "rp-invalid", false).await;
    let cases: Vec<(proto::KeyRotationPolicy, &str)> = vec![
        (
            policy("", vec![action("Rotate", "P30D", "P7D")]),
            "Invalid lifetime action trigger: set only one of the two times, timeAfterCreate or timeBeforeExpiry.",
        ),
        (
            policy("", vec![action("Rotate", "", "")]),
            "Invalid lifetime action trigger: set only one of the two times, timeAfterCreate or timeBeforeExpiry.",
        ),
        (
            policy("", vec![action("Rotate", "P6D", "")]),
            "The rotation interval 'P6D' is too short: the minimum is 7 days from creation.",
        ),
        (
            policy("", vec![action("Rotate", "", "PT144H")]),
            "The time before expiry 'PT144H' is too short: the minimum is 7 days from expiration.",
        ),
        (
            policy("P27D", vec![]),
            "The expiry time 'P27D' is too short: the expiry time must be at least 28 days.",
        ),
        (
            policy("", vec![action("Rotate", "P30D", ""), action("Rotate", "", "P7D")]),
            "A rotation policy can have only one Rotate lifetime action.",
        ),
        (
            policy("", vec![action("Notify", "P30D", "")]),
            "A Notify lifetime action is triggered by timeBeforeExpiry only.",
        ),
        (
            policy("", vec![action("Delete", "P30D", "")]),
            "The lifetime action type 'Delete' is invalid. Valid types are Rotate and Notify.",
        ),
        (
            policy("P90D", vec![action("Rotate", "P85D", "")]),
            "The trigger 'P85D' does not fit the expiry time 'P90D': it must fire at least 7 days after creation and at least 7 days before expiration.",
        ),
        (
            policy("90 days", vec![]),
            "The duration '90 days' is not a valid ISO 8601 duration: use P<n>Y, P<n>M, P<n>W, P<n>D and T<n>H, T<n>M, T<n>S parts in that order, e.g. P90D, P1Y6M, PT12H.",
        ),
    ];
    for (p, text) in cases {
        let msg =
            assert_status(set_policy(&mut b.kv(), &key, p).await, Code::InvalidArgument, "BadParameter");
        assert_eq!(msg, text);
    }
    let p = get_policy(&mut b.kv(), &key).await.expect("still the default");
    assert_eq!(p.created, 0);
    // A versioned key id is not a policy's address.
    let versioned = kid(&newest(&b, &key).await);
    assert_status(get_policy(&mut b.kv(), &versioned).await, Code::InvalidArgument, "BadParameter");
    b.stop().await;
}

#[tokio::test]
async fn access_policies_need_getrotationpolicy_and_setrotationpolicy() {
    let b = start().await;
    let key = vault_with_key(&b, "rp-ap", false).await;
    let reader = b.user("policy-reader").await;
    b.policy("rp-ap", &reader.object_id, &["get", "getrotationpolicy"]).await;
    let mut kv = b.kv_with(bearer(&reader.token));
    assert!(get_policy(&mut kv, &key).await.is_ok());
    let msg = assert_status(
        set_policy(&mut kv, &key, policy("P90D", vec![])).await,
        Code::PermissionDenied,
        "AccessDenied",
    );
    assert!(msg.contains("does not have keys setrotationpolicy permission on key vault 'rp-ap;"), "{msg}");

    let none = b.user("no-rotation").await;
    b.policy("rp-ap", &none.object_id, &["get", "rotate"]).await;
    let msg = assert_status(
        get_policy(&mut b.kv_with(bearer(&none.token)), &key).await,
        Code::PermissionDenied,
        "AccessDenied",
    );
    assert!(msg.contains("does not have keys getrotationpolicy permission"), "{msg}");
    b.stop().await;
}

#[tokio::test]
async fn rbac_vaults_need_the_keyrotationpolicies_data_actions_crypto_officer_has_them() {
    let b = start().await;
    b.vaults()
        .create_vault(proto::CreateVaultRequest {
            name: "rp-rbac".into(),
            enable_rbac_authorization: true,
            ..Default::default()
        })
        .await
        .expect("rbac vault");
    let vault_scope = "https://rp-rbac.vault.azure.net";
    b.assign(vault_scope, &b.admin.object_id, "Key Vault Crypto Officer").await;
    b.key("rp-rbac", "k", "RSA", 2048).await;
    let key = b.key_uri("rp-rbac", "k");
    assert!(set_policy(&mut b.kv(), &key, policy("P90D", vec![action("Rotate", "P30D", "")])).await.is_ok());

    let user = b.user("crypto-user").await;
    b.assign(vault_scope, &user.object_id, "Key Vault Crypto User").await;
    let mut kv = b.kv_with(bearer(&user.token));
    let msg = assert_status(get_policy(&mut kv, &key).await, Code::PermissionDenied, "ForbiddenByRbac");
    assert!(msg.contains("Action: 'Microsoft.KeyVault/vaults/keyrotationpolicies/read'"), "{msg}");
    let msg = assert_status(
        set_policy(&mut kv, &key, policy("P90D", vec![])).await,
        Code::PermissionDenied,
        "ForbiddenByRbac",
    );
    assert!(msg.contains("Action: 'Microsoft.KeyVault/vaults/keyrotationpolicies/write'"), "{msg}");

    let reader = b.user("kv-reader").await;
    b.assign(vault_scope, &reader.object_id, "Key Vault Reader").await;
    let mut kv = b.kv_with(bearer(&reader.token));
    assert_eq!(get_policy(&mut kv, &key).await.expect("reader reads").expiry_time, "P90D");
    assert_status(
        set_policy(&mut kv, &key, policy("P90D", vec![])).await,
        Code::PermissionDenied,
        "ForbiddenByRbac",
    );
    b.stop().await;
}

#[tokio::test]
async fn a_rotate_action_after_creation_rotates_when_the_clock_reaches_it_with_the_policys_expiry() {
    let b = start().await;
    let key = vault_with_key(&b, "rp-after", false).await;
    // The caller may not even rotate: the service rotates on its own authority.
    set_policy(&mut b.kv(), &key, policy("P90D", vec![action("Rotate", "P30D", "")])).await.unwrap();
    let first = kid(&newest(&b, &key).await);
    b.advance(30 * DAY - 1).await;
    assert_eq!(versions(&b, &key).await.len(), 1, "not yet due");
    let now = b.advance(1).await;
    assert_eq!(versions(&b, &key).await.len(), 2, "due: rotated at once");
    let v2 = newest(&b, &key).await;
    assert_ne!(kid(&v2), first);
    let a = v2.attributes.expect("attributes");
    assert_eq!((a.created, a.expires), (now, Some(now + 90 * DAY)));
    assert_eq!(v2.key.expect("jwk").kty, "RSA");
    // A move of 90 days rotates once (from the newest version), not once per missed period.
    b.advance(90 * DAY).await;
    assert_eq!(versions(&b, &key).await.len(), 3);
    b.stop().await;
}

#[tokio::test]
async fn a_rotate_action_before_expiry_rotates_that_long_before_the_newest_version_expires() {
    let b = start().await;
    b.vault("rp-before", false).await;
    let now = b.now().await;
    b.create_key(proto::CreateKeyRequest {
        vault_name: "rp-before".into(),
        name: "k".into(),
        kty: "RSA".into(),
        key_size: 2048,
        attributes: Some(proto::KeyAttributes { expires: Some(now + 40 * DAY), ..Default::default() }),
        ..Default::default()
    })
    .await
    .unwrap();
    let key = b.key_uri("rp-before", "k");
    set_policy(&mut b.kv(), &key, policy("", vec![action("Rotate", "", "P10D")])).await.unwrap();
    b.advance(30 * DAY - 1).await;
    assert_eq!(versions(&b, &key).await.len(), 1);
    b.advance(1).await;
    assert_eq!(versions(&b, &key).await.len(), 2);
    // Without an expiry time the new version has no exp, so nothing is due any more.
    assert_eq!(newest(&b, &key).await.attributes.unwrap().expires, None);
    b.advance(365 * DAY).await;
    assert_eq!(versions(&b, &key).await.len(), 2);
    b.stop().await;
}

#[tokio::test]
async fn rotate_key_gives_the_new_version_the_policys_expiry_time() {
    let b = start().await;
    let key = vault_with_key(&b, "rp-manual", false).await;
    set_policy(&mut b.kv(), &key, policy("P60D", vec![])).await.unwrap();
    let now = b.now().await;
    let v = b.kv().rotate_key(proto::RotateKeyRequest { key_id: key.clone() }).await.unwrap().into_inner();
    assert_eq!(v.attributes.unwrap().expires, Some(now + 60 * DAY));
    b.stop().await;
}

#[tokio::test]
async fn a_notify_action_rotates_nothing() {
    let b = start().await;
    b.vault("rp-notify", false).await;
    let now = b.now().await;
    b.create_key(proto::CreateKeyRequest {
        vault_name: "rp-notify".into(),
        name: "k".into(),
        kty: "RSA".into(),
        attributes: Some(proto::KeyAttributes { expires: Some(now + 40 * DAY), ..Default::default() }),
        ..Default::default()
    })
    .await
    .unwrap();
    let key = b.key_uri("rp-notify", "k");
    set_policy(&mut b.kv(), &key, policy("", vec![action("Notify", "", "P30D")])).await.unwrap();
    b.advance(35 * DAY).await;
    assert_eq!(versions(&b, &key).await.len(), 1);
    b.stop().await;
}

#[tokio::test]
async fn a_tde_protector_with_auto_rotation_follows_the_version_the_policy_rotates_in() {
    let b = start().await;
    b.vault("rp-tde", true).await;
    b.key("rp-tde", "tde", "RSA", 2048).await;
    let key = b.key_uri("rp-tde", "tde");
    let (umi, who) = b.identity("id-rg", "rp-umi").await;
    b.policy("rp-tde", &who.object_id, &["get", "wrapKey", "unwrapKey"]).await;
    let mut servers = Vec::new();
    for (name, auto) in [("rp-follow", true), ("rp-pinned", false)] {
        let s = b
            .servers()
            .create_server(proto::CreateServerRequest {
                resource_group: "sql-rg".into(),
                name: name.into(),
                kind: proto::ServerKind::SqlServer as i32,
                identity: Some(proto::ServerIdentity {
                    user_assigned_identity_ids: vec![umi.resource_id.clone()],
                    ..Default::default()
                }),
                key_id: key.clone(),
                auto_rotation_enabled: auto,
                ..Default::default()
            })
            .await
            .expect("CMK server")
            .into_inner();
        b.servers()
            .create_database(proto::CreateDatabaseRequest { server_id: s.id.clone(), name: "db1".into() })
            .await
            .unwrap();
        servers.push(s);
    }
    let v1 = kid(&newest(&b, &key).await);
    set_policy(&mut b.kv(), &key, policy("P90D", vec![action("Rotate", "P30D", "")])).await.unwrap();
    b.advance(30 * DAY).await;
    let v2 = kid(&newest(&b, &key).await);
    assert_ne!(v1, v2);
    let protector = |id: String| {
        let mut srv = b.servers();
        async move {
            srv.get_encryption_protector(proto::GetEncryptionProtectorRequest { server_id: id })
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert_eq!(protector(servers[0].id.clone()).await.kid, v2, "auto-rotation follows at once");
    assert_eq!(protector(servers[1].id.clone()).await.kid, v1, "without auto-rotation it stays");
    for s in &servers {
        assert_eq!(b.database(&s.id, "db1").await.state, proto::DatabaseState::Online as i32);
    }
    b.stop().await;
}

#[tokio::test]
async fn a_purge_removes_the_policy_and_a_soft_deleted_key_is_not_rotated() {
    let b = start().await;
    let key = vault_with_key(&b, "rp-purge", false).await;
    set_policy(&mut b.kv(), &key, policy("P90D", vec![action("Rotate", "P30D", "")])).await.unwrap();
    let v1 = kid(&newest(&b, &key).await);
    b.kv().delete_key(proto::DeleteKeyRequest { key_id: key.clone() }).await.unwrap();
    assert_status(get_policy(&mut b.kv(), &key).await, Code::NotFound, "KeyNotFound");
    b.advance(31 * DAY).await;
    let deleted = b
        .kv()
        .get_deleted_key(proto::GetDeletedKeyRequest { vault_name: "rp-purge".into(), name: "k".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.key.and_then(|k| k.key).map(|j| j.kid), Some(v1), "not rotated while deleted");
    // Recovered, the key has its policy back; it is due, so the next clock move rotates it.
    b.kv()
        .recover_deleted_key(proto::RecoverDeletedKeyRequest {
            vault_name: "rp-purge".into(),
            name: "k".into(),
        })
        .await
        .unwrap();
    assert_eq!(get_policy(&mut b.kv(), &key).await.unwrap().expiry_time, "P90D");
    b.advance(1).await;
    assert_eq!(versions(&b, &key).await.len(), 2);

    b.kv().delete_key(proto::DeleteKeyRequest { key_id: key.clone() }).await.unwrap();
    b.kv()
        .purge_deleted_key(proto::PurgeDeletedKeyRequest { vault_name: "rp-purge".into(), name: "k".into() })
        .await
        .unwrap();
    b.key("rp-purge", "k", "RSA", 2048).await;
    assert_eq!(get_policy(&mut b.kv(), &key).await.unwrap().created, 0, "the new key has the default");
    b.stop().await;
}

#[tokio::test]
async fn a_backup_does_not_carry_the_rotation_policy() {
    let b = start().await;
    let key = vault_with_key(&b, "rp-backup", false).await;
    set_policy(&mut b.kv(), &key, policy("P90D", vec![action("Rotate", "P30D", "")])).await.unwrap();
    let blob =
        b.kv().backup_key(proto::BackupKeyRequest { key_id: key.clone() }).await.unwrap().into_inner().blob;
    b.kv().delete_key(proto::DeleteKeyRequest { key_id: key.clone() }).await.unwrap();
    b.kv()
        .purge_deleted_key(proto::PurgeDeletedKeyRequest { vault_name: "rp-backup".into(), name: "k".into() })
        .await
        .unwrap();
    b.kv().restore_key(proto::RestoreKeyRequest { vault_name: "rp-backup".into(), blob }).await.unwrap();
    let p = get_policy(&mut b.kv(), &key).await.unwrap();
    assert_eq!((p.created, p.lifetime_actions), (0, vec![action("Notify", "", "P30D")]));
    b.stop().await;
}
