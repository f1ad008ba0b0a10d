//! docs/RULES.md R1 over real gRPC: every key rule as a test named after it.

mod common;

use common::*;
use tde_broker::grpc::proto;
use tonic::Code;

const DEK: [u8; 32] = [7u8; 32];

async fn wrap(
    b: &TestBroker,
    key_id: &str,
    alg: &str,
    value: &[u8],
) -> Result<proto::KeyOperationResult, tonic::Status> {
    b.kv().wrap_key(crypto_req(key_id, alg, value)).await.map(|r| r.into_inner())
}

async fn unwrap(
    b: &TestBroker,
    key_id: &str,
    alg: &str,
    value: &[u8],
) -> Result<proto::KeyOperationResult, tonic::Status> {
    b.kv().unwrap_key(unwrap_req(key_id, alg, value)).await.map(|r| r.into_inner())
}

async fn encrypt(
    b: &TestBroker,
    key_id: &str,
    alg: &str,
    value: &[u8],
) -> Result<proto::KeyOperationResult, tonic::Status> {
    b.kv()
        .encrypt(proto::EncryptRequest {
            key_id: key_id.into(),
            algorithm: alg.into(),
            value: value.to_vec(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn decrypt(
    b: &TestBroker,
    key_id: &str,
    alg: &str,
    r: &proto::KeyOperationResult,
) -> Result<proto::KeyOperationResult, tonic::Status> {
    b.kv()
        .decrypt(proto::DecryptRequest {
            key_id: key_id.into(),
            algorithm: alg.into(),
            value: r.value.clone(),
            iv: r.iv.clone(),
            tag: r.tag.clone(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn update(b: &TestBroker, req: proto::UpdateKeyRequest) -> proto::KeyBundle {
    b.kv().update_key(req).await.expect("update").into_inner()
}

#[tokio::test]
async fn every_algorithm_and_key_type_round_trips() {
    let b = start().await;
    b.vault("rt-vault", false).await;
    let cases: [(&str, i32, &[&str], &[&str]); 6] = [
        ("RSA", 2048, &["RSA-OAEP", "RSA-OAEP-256", "RSA1_5"], &["RSA-OAEP", "RSA-OAEP-256", "RSA1_5"]),
        ("RSA-HSM", 3072, &["RSA-OAEP-256"], &["RSA-OAEP"]),
        ("RSA", 4096, &["RSA-OAEP-256", "RSA1_5"], &["RSA-OAEP-256"]),
        ("oct-HSM", 128, &["A128KW"], &["A128GCM"]),
        ("oct-HSM", 192, &["A192KW"], &["A192GCM"]),
        ("oct-HSM", 256, &["A256KW"], &["A256GCM"]),
    ];
    for (i, (kty, size, wrap_algs, enc_algs)) in cases.iter().enumerate() {
        let bundle = b.key("rt-vault", &format!("k{i}"), kty, *size).await;
        let key = bundle.key.as_ref().unwrap();
        assert_eq!(key.kty, *kty);
        let id = kid(&bundle);
        if kty.starts_with("RSA") {
            assert_eq!(key.n.len() * 8, *size as usize, "{kty} {size}: modulus size");
            assert_eq!(key.e, vec![1, 0, 1]);
        } else {
            assert!(key.n.is_empty(), "symmetric keys expose no material");
        }
        for alg in *wrap_algs {
            let w = wrap(&b, &id, alg, &DEK).await.unwrap_or_else(|e| panic!("{kty} {size} {alg}: {e:?}"));
            assert_eq!(w.kid, id);
            assert_ne!(w.value, DEK);
            let u = unwrap(&b, &id, alg, &w.value).await.expect("unwrap");
            assert_eq!(u.value, DEK, "{kty} {size} {alg}");
        }
        for alg in *enc_algs {
            let e = encrypt(&b, &id, alg, b"page of a database").await.expect("encrypt");
            let d = decrypt(&b, &id, alg, &e).await.expect("decrypt");
            assert_eq!(d.value, b"page of a database", "{kty} {size} {alg}");
        }
    }
    b.stop().await;
}

#[tokio::test]
async fn disabled_key_refuses_wrap_unwrap_encrypt_and_decrypt() {
    let b = start().await;
    b.vault("dis-vault", false).await;
    let id = kid(&b.key("dis-vault", "k", "RSA", 2048).await);
    let w = wrap(&b, &id, "RSA-OAEP-256", &DEK).await.unwrap();
    let e = encrypt(&b, &id, "RSA-OAEP", b"x").await.unwrap();
    update(&b, proto::UpdateKeyRequest { key_id: id.clone(), enabled: Some(false), ..Default::default() })
        .await;
    let msg =
        assert_status(unwrap(&b, &id, "RSA-OAEP-256", &w.value).await, Code::PermissionDenied, "KeyDisabled");
    assert_eq!(msg, "Operation unwrapKey is not allowed on a disabled key.");
    let msg = assert_status(wrap(&b, &id, "RSA-OAEP-256", &DEK).await, Code::PermissionDenied, "KeyDisabled");
    assert_eq!(msg, "Operation wrapKey is not allowed on a disabled key.");
    assert_status(encrypt(&b, &id, "RSA-OAEP", b"x").await, Code::PermissionDenied, "KeyDisabled");
    assert_status(decrypt(&b, &id, "RSA-OAEP", &e).await, Code::PermissionDenied, "KeyDisabled");
    // GetKey still answers, showing the key disabled.
    let got = b.kv().get_key(proto::GetKeyRequest { key_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.attributes.unwrap().enabled, Some(false));
    update(&b, proto::UpdateKeyRequest { key_id: id.clone(), enabled: Some(true), ..Default::default() })
        .await;
    assert_eq!(unwrap(&b, &id, "RSA-OAEP-256", &w.value).await.unwrap().value, DEK);
    b.stop().await;
}

#[tokio::test]
async fn expired_key_allows_unwrap_and_decrypt_and_refuses_wrap_and_encrypt() {
    let b = start().await;
    b.vault("exp-vault", false).await;
    let now = b.now().await;
    let bundle = b
        .create_key(proto::CreateKeyRequest {
            vault_name: "exp-vault".into(),
            name: "k".into(),
            kty: "RSA".into(),
            attributes: Some(proto::KeyAttributes { expires: Some(now + 3600), ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap();
    let id = kid(&bundle);
    let w = wrap(&b, &id, "RSA-OAEP-256", &DEK).await.unwrap();
    let e = encrypt(&b, &id, "RSA-OAEP-256", b"x").await.unwrap();
    b.advance(2 * 3600).await;
    assert_eq!(unwrap(&b, &id, "RSA-OAEP-256", &w.value).await.expect("unwrap after exp").value, DEK);
    assert_eq!(decrypt(&b, &id, "RSA-OAEP-256", &e).await.expect("decrypt after exp").value, b"x");
    let msg = assert_status(wrap(&b, &id, "RSA-OAEP-256", &DEK).await, Code::PermissionDenied, "KeyExpired");
    assert!(msg.contains("wrapKey"), "{msg}");
    assert_status(encrypt(&b, &id, "RSA-OAEP-256", b"x").await, Code::PermissionDenied, "KeyExpired");
    b.stop().await;
}

#[tokio::test]
async fn not_yet_valid_key_allows_unwrap_and_refuses_wrap_until_nbf() {
    let b = start().await;
    b.vault("nbf-vault", false).await;
    let id = kid(&b.key("nbf-vault", "k", "oct-HSM", 256).await);
    let w = wrap(&b, &id, "A256KW", &DEK).await.unwrap();
    let now = b.now().await;
    update(
        &b,
        proto::UpdateKeyRequest { key_id: id.clone(), not_before: Some(now + 600), ..Default::default() },
    )
    .await;
    assert_eq!(unwrap(&b, &id, "A256KW", &w.value).await.unwrap().value, DEK);
    assert_status(wrap(&b, &id, "A256KW", &DEK).await, Code::PermissionDenied, "KeyNotYetValid");
    assert_status(encrypt(&b, &id, "A256GCM", b"x").await, Code::PermissionDenied, "KeyNotYetValid");
    b.advance(600).await;
    assert!(wrap(&b, &id, "A256KW", &DEK).await.is_ok());
    b.stop().await;
}

#[tokio::test]
async fn operation_missing_from_key_ops_is_forbidden() {
    let b = start().await;
    b.vault("ops-vault", false).await;
    let bundle = b
        .create_key(proto::CreateKeyRequest {
            vault_name: "ops-vault".into(),
            name: "k".into(),
            kty: "RSA".into(),
            key_ops: vec!["wrapKey".into(), "unwrapKey".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(bundle.key.as_ref().unwrap().key_ops, vec!["wrapKey", "unwrapKey"]);
    let id = kid(&bundle);
    assert!(wrap(&b, &id, "RSA-OAEP", &DEK).await.is_ok());
    let msg = assert_status(
        encrypt(&b, &id, "RSA-OAEP", b"x").await,
        Code::PermissionDenied,
        "KeyOperationForbidden",
    );
    assert_eq!(msg, "Operation encrypt is not permitted on this key.");
    let e = proto::KeyOperationResult { value: vec![1; 256], ..Default::default() };
    let msg = assert_status(
        decrypt(&b, &id, "RSA-OAEP", &e).await,
        Code::PermissionDenied,
        "KeyOperationForbidden",
    );
    assert_eq!(msg, "Operation decrypt is not permitted on this key.");
    b.stop().await;
}

#[tokio::test]
async fn missing_key_gives_the_clouds_key_not_found_text() {
    let b = start().await;
    b.vault("nf-vault", false).await;
    let msg = assert_status(
        b.kv().get_key(proto::GetKeyRequest { key_id: b.key_uri("nf-vault", "nope") }).await,
        Code::NotFound,
        "KeyNotFound",
    );
    assert_eq!(
        msg,
        "A key with (name/id) nope was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
    );
    let id = kid(&b.key("nf-vault", "k", "oct-HSM", 128).await);
    let other = format!("{}/{}", b.key_uri("nf-vault", "k"), "0".repeat(32));
    let msg = assert_status(wrap(&b, &other, "A128KW", &DEK).await, Code::NotFound, "KeyNotFound");
    assert!(msg.starts_with(&format!("A key with (name/id) k/{} was not found", "0".repeat(32))), "{msg}");
    assert!(wrap(&b, &id, "A128KW", &DEK).await.is_ok());
    b.stop().await;
}

#[tokio::test]
async fn soft_deleted_key_can_only_be_recovered_or_purged() {
    let b = start().await;
    b.vault("sd-vault", false).await;
    let id = kid(&b.key("sd-vault", "k", "RSA", 2048).await);
    let w = wrap(&b, &id, "RSA-OAEP-256", &DEK).await.unwrap();
    let base = b.key_uri("sd-vault", "k");
    let deleted =
        b.kv().delete_key(proto::DeleteKeyRequest { key_id: base.clone() }).await.unwrap().into_inner();
    assert_eq!(deleted.recovery_id, "https://sd-vault.vault.azure.net/deletedkeys/k");
    assert_eq!(deleted.scheduled_purge_date - deleted.deleted_date, 90 * 86_400);
    // Every other operation fails as if the key did not exist.
    assert_status(unwrap(&b, &id, "RSA-OAEP-256", &w.value).await, Code::NotFound, "KeyNotFound");
    assert_status(
        b.kv().get_key(proto::GetKeyRequest { key_id: base.clone() }).await,
        Code::NotFound,
        "KeyNotFound",
    );
    let listed = b
        .kv()
        .list_keys(proto::ListKeysRequest { vault_name: "sd-vault".into(), ..Default::default() })
        .await
        .unwrap();
    assert!(listed.into_inner().keys.is_empty());
    let dl = b
        .kv()
        .list_deleted_keys(proto::ListDeletedKeysRequest {
            vault_name: "sd-vault".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dl.into_inner().keys.len(), 1);
    // Recover brings back every version, and old ciphertexts unwrap again.
    let rec = b
        .kv()
        .recover_deleted_key(proto::RecoverDeletedKeyRequest {
            vault_name: "sd-vault".into(),
            name: "k".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kid(&rec), id);
    assert_eq!(unwrap(&b, &id, "RSA-OAEP-256", &w.value).await.unwrap().value, DEK);
    // Recovering a key that is not deleted is refused.
    assert_status(
        b.kv()
            .recover_deleted_key(proto::RecoverDeletedKeyRequest {
                vault_name: "sd-vault".into(),
                name: "k".into(),
            })
            .await,
        Code::NotFound,
        "KeyNotFound",
    );
    // Purge removes it for good.
    b.kv().delete_key(proto::DeleteKeyRequest { key_id: base.clone() }).await.unwrap();
    b.kv()
        .purge_deleted_key(proto::PurgeDeletedKeyRequest { vault_name: "sd-vault".into(), name: "k".into() })
        .await
        .unwrap();
    assert_status(
        b.kv()
            .get_deleted_key(proto::GetDeletedKeyRequest { vault_name: "sd-vault".into(), name: "k".into() })
            .await,
        Code::NotFound,
        "KeyNotFound",
    );
    b.stop().await;
}

#[tokio::test]
async fn deleted_key_name_cannot_be_reused_until_recovered_or_purged() {
    let b = start().await;
    b.vault("reuse-vault", false).await;
    b.key("reuse-vault", "k", "RSA", 2048).await;
    b.kv().delete_key(proto::DeleteKeyRequest { key_id: b.key_uri("reuse-vault", "k") }).await.unwrap();
    let req = proto::CreateKeyRequest {
        vault_name: "reuse-vault".into(),
        name: "K".into(),
        kty: "RSA".into(),
        ..Default::default()
    };
    let msg = assert_status(
        b.create_key(req.clone()).await,
        Code::FailedPrecondition,
        "ObjectIsDeletedButRecoverable",
    );
    assert_eq!(
        msg,
        "Key k is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the key can only be recovered or purged."
    );
    b.kv()
        .purge_deleted_key(proto::PurgeDeletedKeyRequest {
            vault_name: "reuse-vault".into(),
            name: "k".into(),
        })
        .await
        .unwrap();
    assert!(b.create_key(req).await.is_ok());
    b.stop().await;
}

#[tokio::test]
async fn purge_protection_refuses_purge_until_retention_ends() {
    let b = start().await;
    b.vault("pp-vault", true).await;
    b.key("pp-vault", "k", "RSA", 2048).await;
    b.kv().delete_key(proto::DeleteKeyRequest { key_id: b.key_uri("pp-vault", "k") }).await.unwrap();
    let purge = proto::PurgeDeletedKeyRequest { vault_name: "pp-vault".into(), name: "k".into() };
    let msg =
        assert_status(b.kv().purge_deleted_key(purge.clone()).await, Code::PermissionDenied, "Forbidden");
    assert!(
        msg.starts_with(
            "Operation \"purge\" is not allowed because purge protection is enabled for this vault."
        ),
        "{msg}"
    );
    // Purge protection cannot be turned off.
    let off = proto::UpdateVaultRequest {
        name: "pp-vault".into(),
        enable_purge_protection: Some(false),
        ..Default::default()
    };
    assert_status(b.vaults().update_vault(off).await, Code::InvalidArgument, "BadRequest");
    // After the retention the broker purges it by itself, and the name is free again.
    b.advance(89 * 86_400).await;
    assert!(
        b.kv()
            .get_deleted_key(proto::GetDeletedKeyRequest { vault_name: "pp-vault".into(), name: "k".into() })
            .await
            .is_ok()
    );
    b.advance(86_400).await;
    assert_status(
        b.kv()
            .get_deleted_key(proto::GetDeletedKeyRequest { vault_name: "pp-vault".into(), name: "k".into() })
            .await,
        Code::NotFound,
        "KeyNotFound",
    );
    assert!(
        b.create_key(proto::CreateKeyRequest {
            vault_name: "pp-vault".into(),
            name: "k".into(),
            kty: "RSA".into(),
            ..Default::default()
        })
        .await
        .is_ok()
    );
    b.stop().await;
}

#[tokio::test]
async fn rotation_adds_a_version_and_old_versions_keep_unwrapping() {
    let b = start().await;
    b.vault("rot-vault", false).await;
    let v1 = kid(&b.key("rot-vault", "k", "RSA", 2048).await);
    let base = b.key_uri("rot-vault", "k");
    let w1 = wrap(&b, &base, "RSA-OAEP-256", &DEK).await.unwrap();
    assert_eq!(w1.kid, v1, "an unversioned id means the newest version");
    let v2 =
        kid(&b.kv().rotate_key(proto::RotateKeyRequest { key_id: base.clone() }).await.unwrap().into_inner());
    assert_ne!(v1, v2);
    let w2 = wrap(&b, &base, "RSA-OAEP-256", &DEK).await.unwrap();
    assert_eq!(w2.kid, v2);
    assert_eq!(unwrap(&b, &v1, "RSA-OAEP-256", &w1.value).await.unwrap().value, DEK);
    assert_eq!(unwrap(&b, &v2, "RSA-OAEP-256", &w2.value).await.unwrap().value, DEK);
    let versions = b
        .kv()
        .list_key_versions(proto::ListKeyVersionsRequest {
            key_id: base.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(versions.keys.len(), 1);
    assert_eq!(versions.keys[0].kid, v1);
    let rest = b
        .kv()
        .list_key_versions(proto::ListKeyVersionsRequest {
            key_id: base,
            page_size: 1,
            page_token: versions.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.keys[0].kid, v2);
    assert!(rest.next_page_token.is_empty());
    b.stop().await;
}

#[tokio::test]
async fn backup_restores_every_version_into_an_empty_name() {
    let b = start().await;
    b.vault("bk-vault", false).await;
    let v1 = kid(&b.key("bk-vault", "k", "RSA", 2048).await);
    let base = b.key_uri("bk-vault", "k");
    let w1 = wrap(&b, &v1, "RSA-OAEP", &DEK).await.unwrap();
    b.kv().rotate_key(proto::RotateKeyRequest { key_id: base.clone() }).await.unwrap();
    let blob =
        b.kv().backup_key(proto::BackupKeyRequest { key_id: base.clone() }).await.unwrap().into_inner().blob;
    // The blob is sealed: the public modulus is visible in GetKey but nothing readable in it.
    assert!(!blob.windows(16).any(|w| w == &DEK[..16]));
    // Restoring over an existing key is refused.
    let restore = proto::RestoreKeyRequest { vault_name: "bk-vault".into(), blob: blob.clone() };
    assert_status(b.kv().restore_key(restore.clone()).await, Code::AlreadyExists, "Conflict");
    b.kv().delete_key(proto::DeleteKeyRequest { key_id: base.clone() }).await.unwrap();
    b.kv()
        .purge_deleted_key(proto::PurgeDeletedKeyRequest { vault_name: "bk-vault".into(), name: "k".into() })
        .await
        .unwrap();
    b.kv().restore_key(restore).await.unwrap();
    assert_eq!(unwrap(&b, &v1, "RSA-OAEP", &w1.value).await.unwrap().value, DEK);
    // A tampered blob is refused.
    let mut bad = blob.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    b.vault("bk-other", false).await;
    assert_status(
        b.kv().restore_key(proto::RestoreKeyRequest { vault_name: "bk-other".into(), blob: bad }).await,
        Code::InvalidArgument,
        "BadParameter",
    );
    b.stop().await;
}

#[tokio::test]
async fn tampered_and_wrong_key_ciphertexts_all_yield_one_identical_error() {
    let b = start().await;
    b.vault("po-vault", false).await;
    let k1 = kid(&b.key("po-vault", "k1", "RSA", 2048).await);
    let k2 = kid(&b.key("po-vault", "k2", "RSA", 2048).await);
    let mut seen = std::collections::BTreeSet::new();
    for alg in ["RSA-OAEP", "RSA-OAEP-256", "RSA1_5"] {
        let w = wrap(&b, &k1, alg, &DEK).await.unwrap();
        let mut flipped = w.value.clone();
        flipped[10] ^= 0x40;
        let wrong_key = wrap(&b, &k2, alg, &DEK).await.unwrap().value;
        let short = w.value[..255].to_vec();
        let zeros = vec![0u8; 256];
        let ones = vec![0xffu8; 256];
        for bad in [flipped, wrong_key, short, zeros, ones] {
            let s = unwrap(&b, &k1, alg, &bad).await.expect_err("must fail");
            seen.insert((s.code() as i32, s.message().to_string(), tde_broker::grpc::status::reason(&s)));
        }
    }
    assert_eq!(seen.len(), 1, "distinct errors leak a padding oracle: {seen:?}");
    let (code, _, reason) = seen.into_iter().next().unwrap();
    assert_eq!((code, reason.as_deref()), (Code::InvalidArgument as i32, Some("BadParameter")));
    b.stop().await;
}

#[tokio::test]
async fn bad_input_is_invalid_argument_with_a_clear_message() {
    let b = start().await;
    b.vault("bad-vault", false).await;
    let rsa = kid(&b.key("bad-vault", "rsa", "RSA", 2048).await);
    let oct = kid(&b.key("bad-vault", "oct", "oct-HSM", 256).await);
    for key_id in [
        "",
        "not a uri",
        "https://bad-vault.vault.azure.net/keys/",
        "https://bad-vault.vault.azure.net/keys/rsa/xyz",
        "https://bad-vault.example.org/keys/rsa",
        "https://bad-vault.vault.azure.net/secrets/rsa",
        "https://bad-vault.vault.azure.net/keys/has space",
    ] {
        let msg =
            assert_status(wrap(&b, key_id, "RSA-OAEP", &DEK).await, Code::InvalidArgument, "BadParameter");
        assert!(msg.contains("invalid"), "{key_id:?}: {msg}");
    }
    let msg =
        assert_status(wrap(&b, &rsa, "RSA-OAEP-384", &DEK).await, Code::InvalidArgument, "BadParameter");
    assert!(msg.contains("RSA-OAEP-384") && msg.contains("not supported"), "{msg}");
    assert_status(wrap(&b, &rsa, "A256KW", &DEK).await, Code::InvalidArgument, "BadParameter");
    assert_status(wrap(&b, &oct, "A128KW", &DEK).await, Code::InvalidArgument, "BadParameter");
    assert_status(wrap(&b, &oct, "A256KW", &[1u8; 15]).await, Code::InvalidArgument, "BadParameter");
    let msg = assert_status(wrap(&b, &rsa, "RSA-OAEP", &[]).await, Code::InvalidArgument, "BadParameter");
    assert!(msg.contains("empty"), "{msg}");
    let msg = assert_status(
        wrap(&b, &rsa, "RSA-OAEP", &vec![1u8; 300]).await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert!(msg.contains("long") || msg.contains("at most"), "{msg}");
    let msg = assert_status(
        wrap(&b, &oct, "A256KW", &vec![1u8; 70_000]).await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert!(msg.contains("at most 65536 bytes"), "{msg}");
    for (kty, size) in [("RSA", 1024), ("oct-HSM", 512), ("EC", 256), ("rsa", 2048)] {
        let r = b
            .create_key(proto::CreateKeyRequest {
                vault_name: "bad-vault".into(),
                name: "x".into(),
                kty: kty.into(),
                key_size: size,
                ..Default::default()
            })
            .await;
        assert_status(r, Code::InvalidArgument, "BadParameter");
    }
    let r = b
        .create_key(proto::CreateKeyRequest {
            vault_name: "bad-vault".into(),
            name: "bad_name".into(),
            kty: "RSA".into(),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, "BadParameter");
    let r = b
        .create_key(proto::CreateKeyRequest {
            vault_name: "bad-vault".into(),
            name: "x".into(),
            kty: "RSA".into(),
            key_ops: vec!["fly".into()],
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, "BadParameter");
    // A 5 MiB message is refused by the transport, and the server keeps serving.
    let huge = wrap(&b, &oct, "A256KW", &vec![0u8; 5 * 1024 * 1024]).await.expect_err("too large");
    assert!(
        matches!(huge.code(), Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument),
        "{huge:?}"
    );
    assert_eq!(
        unwrap(&b, &oct, "A256KW", &wrap(&b, &oct, "A256KW", &DEK).await.unwrap().value).await.unwrap().value,
        DEK
    );
    b.stop().await;
}

#[tokio::test]
async fn list_keys_pages_through_active_keys_only() {
    let b = start().await;
    b.vault("list-vault", false).await;
    for i in 0..5 {
        b.key("list-vault", &format!("k{i}"), "oct-HSM", 128).await;
    }
    b.kv().delete_key(proto::DeleteKeyRequest { key_id: b.key_uri("list-vault", "k2") }).await.unwrap();
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = b
            .kv()
            .list_keys(proto::ListKeysRequest {
                vault_name: "list-vault".into(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.keys.len() <= 2);
        names.extend(page.keys.into_iter().map(|k| k.kid));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<String> = ["k0", "k1", "k3", "k4"].iter().map(|n| b.key_uri("list-vault", n)).collect();
    assert_eq!(names, expected);
    b.stop().await;
}

#[tokio::test]
async fn cached_unwrap_results_are_never_served_once_the_key_or_the_access_changed() {
    let b = start().await;
    b.vault("cache-kv", false).await;
    let id = kid(&b.key("cache-kv", "k", "RSA", 2048).await);
    let user = {
        let r = b
            .ids()
            .create_user(proto::CreateUserRequest { name: "engine".into() })
            .await
            .unwrap()
            .into_inner();
        (r.principal_id, r.token)
    };
    b.policy("cache-kv", &user.0, &["unwrapKey"]).await;
    let w = wrap(&b, &id, "RSA-OAEP-256", &DEK).await.unwrap();
    let mut kv = b.kv_with(bearer(&user.1));
    for _ in 0..3 {
        // The first call fills the caches, the next ones hit them.
        assert_eq!(
            kv.unwrap_key(unwrap_req(&id, "RSA-OAEP-256", &w.value)).await.unwrap().into_inner().value,
            DEK
        );
    }
    update(&b, proto::UpdateKeyRequest { key_id: id.clone(), enabled: Some(false), ..Default::default() })
        .await;
    assert_status(
        kv.unwrap_key(unwrap_req(&id, "RSA-OAEP-256", &w.value)).await,
        Code::PermissionDenied,
        "KeyDisabled",
    );
    update(&b, proto::UpdateKeyRequest { key_id: id.clone(), enabled: Some(true), ..Default::default() })
        .await;
    assert_eq!(
        kv.unwrap_key(unwrap_req(&id, "RSA-OAEP-256", &w.value)).await.unwrap().into_inner().value,
        DEK
    );
    b.policy("cache-kv", &user.0, &[]).await;
    assert_status(
        kv.unwrap_key(unwrap_req(&id, "RSA-OAEP-256", &w.value)).await,
        Code::PermissionDenied,
        "AccessDenied",
    );
    b.policy("cache-kv", &user.0, &["unwrapKey"]).await;
    b.kv().delete_key(proto::DeleteKeyRequest { key_id: b.key_uri("cache-kv", "k") }).await.unwrap();
    assert_status(
        kv.unwrap_key(unwrap_req(&id, "RSA-OAEP-256", &w.value)).await,
        Code::NotFound,
        "KeyNotFound",
    );
    b.stop().await;
}

#[tokio::test]
async fn the_caches_can_be_switched_off() {
    let (cfg, _dir) = config_from_toml("cache_enabled = false\n");
    assert!(!cfg.caches.enabled);
    let b = start_cfg(cfg).await;
    b.vault("nocache-kv", false).await;
    let id = kid(&b.key("nocache-kv", "k", "oct-HSM", 256).await);
    let w = wrap(&b, &id, "A256KW", &DEK).await.unwrap();
    for _ in 0..2 {
        assert_eq!(unwrap(&b, &id, "A256KW", &w.value).await.unwrap().value, DEK);
    }
    b.stop().await;
}

/// Key names are case-insensitive, as in the cloud: a key is found, wrapped with and unwrapped
/// with under any case of its name, and answers with the name as it was created.
#[tokio::test]
async fn key_names_are_case_insensitive() {
    let b = start().await;
    b.vault("casevault", false).await;
    let created = b.key("casevault", "MixedCase", "RSA", 2048).await;
    let stored = kid(&created);
    assert!(stored.contains("/keys/MixedCase/"), "{stored}");
    for spelling in ["MixedCase", "mixedcase", "MIXEDCASE"] {
        let got = b
            .kv()
            .get_key(proto::GetKeyRequest { key_id: b.key_uri("casevault", spelling) })
            .await
            .expect("get key")
            .into_inner();
        assert_eq!(kid(&got), stored, "GetKey by {spelling}");
        let wrapped = wrap(&b, &b.key_uri("casevault", spelling), "RSA-OAEP-256", &DEK).await.expect("wrap");
        assert_eq!(wrapped.kid, stored, "WrapKey by {spelling}");
        // Twice: the first unwrap decrypts, the second is answered by the unwrap cache.
        for _ in 0..2 {
            let plain =
                unwrap(&b, &b.key_uri("casevault", &spelling.to_lowercase()), "RSA-OAEP-256", &wrapped.value)
                    .await
                    .expect("unwrap");
            assert_eq!((plain.value.as_slice(), plain.kid.as_str()), (&DEK[..], stored.as_str()));
        }
    }
    // A name that differs in more than case is another key.
    assert_status(
        b.kv().get_key(proto::GetKeyRequest { key_id: b.key_uri("casevault", "MixedCases") }).await,
        Code::NotFound,
        "KeyNotFound",
    );
    b.stop().await;
}
