//! Start-up and data-directory behaviour: the seed file, the master key, restarts, and backups
//! moved between brokers.

mod common;

use common::*;
use tde_broker::config::{ClockKind, Config};
use tde_broker::grpc::proto;
use tde_broker::server::App;
use tonic::Code;

const SEED: &str = r#"
[[vault]]
name = "seed-kv"
enable_purge_protection = true

[[vault.key]]
name = "tde-protector"
kty = "RSA"
size = 3072
tags = { purpose = "tde" }

[[vault.key]]
name = "aes"
kty = "oct-HSM"
size = 192
key_ops = ["wrapKey", "unwrapKey"]
"#;

async fn start_seeded(dir: &std::path::Path, seed: &std::path::Path) -> TestBroker {
    let mut cfg = Config::for_data_dir(dir);
    cfg.clock = ClockKind::Manual;
    cfg.seed = Some(seed.to_path_buf());
    let app = App::open(cfg).await.expect("seeded start");
    drop(app);
    start_in(dir, ClockKind::Manual).await
}

#[tokio::test]
async fn seed_file_creates_vaults_and_keys_once() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.toml");
    std::fs::write(&seed, SEED).unwrap();
    let data = dir.path().join("data");
    let b = start_seeded(&data, &seed).await;
    let v =
        b.vaults().get_vault(proto::GetVaultRequest { name: "seed-kv".into() }).await.unwrap().into_inner();
    assert!(v.enable_purge_protection);
    assert_eq!(v.uri, "https://seed-kv.vault.azure.net");
    let k = b
        .kv()
        .get_key(proto::GetKeyRequest { key_id: b.key_uri("seed-kv", "tde-protector") })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(k.key.as_ref().unwrap().n.len(), 384);
    assert_eq!(k.tags.get("purpose").map(String::as_str), Some("tde"));
    let first = kid(&k);
    b.stop().await;
    // Applying the same seed again changes nothing: same key version, no new versions.
    let b = start_seeded(&data, &seed).await;
    let versions = b
        .kv()
        .list_key_versions(proto::ListKeyVersionsRequest {
            key_id: b.key_uri("seed-kv", "tde-protector"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(versions.keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>(), vec![first]);
    let aes = b
        .kv()
        .get_key(proto::GetKeyRequest { key_id: b.key_uri("seed-kv", "aes") })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(aes.key.unwrap().key_ops, vec!["wrapKey", "unwrapKey"]);
    b.stop().await;
}

#[tokio::test]
async fn a_seeded_vault_that_was_soft_deleted_is_skipped_and_the_broker_still_starts() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.toml");
    std::fs::write(&seed, SEED).unwrap();
    let data = dir.path().join("data");
    let b = start_seeded(&data, &seed).await;
    b.vaults().delete_vault(proto::DeleteVaultRequest { name: "seed-kv".into() }).await.unwrap();
    b.stop().await;
    let b = start_seeded(&data, &seed).await;
    let r = b.vaults().get_vault(proto::GetVaultRequest { name: "seed-kv".into() }).await;
    assert_status(r, Code::NotFound, "ResourceNotFound");
    let recovered = b
        .vaults()
        .recover_deleted_vault(proto::RecoverDeletedVaultRequest { name: "seed-kv".into() })
        .await
        .expect("the deleted vault waits, untouched by the seed")
        .into_inner();
    assert!(recovered.enable_purge_protection);
    b.kv()
        .get_key(proto::GetKeyRequest { key_id: b.key_uri("seed-kv", "tde-protector") })
        .await
        .expect("with its keys");
    b.stop().await;
}

#[tokio::test]
async fn invalid_seed_file_stops_the_start_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("bad.toml");
    std::fs::write(&seed, "[[vault]]\nname = \"ok-name\"\ncolour = \"blue\"\n").unwrap();
    let mut cfg = Config::for_data_dir(&dir.path().join("data"));
    cfg.seed = Some(seed);
    let err = App::open(cfg).await.err().expect("bad seed refused");
    assert!(err.to_string().contains("bad.toml") && err.to_string().contains("colour"), "{err}");
}

#[tokio::test]
async fn a_data_directory_does_not_open_with_another_master_key() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_in(dir.path(), ClockKind::Manual).await;
    b.stop().await;
    let other = tempfile::tempdir().unwrap();
    start_in(other.path(), ClockKind::Manual).await.stop().await;
    std::fs::copy(other.path().join("master.key"), dir.path().join("master.key")).unwrap();
    let err = App::open(Config::for_data_dir(dir.path())).await.err().expect("wrong master key refused");
    assert!(err.to_string().contains("does not open this data directory"), "{err}");
}

#[tokio::test]
async fn state_survives_a_graceful_restart_and_the_admin_keeps_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_in(dir.path(), ClockKind::Manual).await;
    b.vault("keep-kv", false).await;
    let id = kid(&b.key("keep-kv", "k", "oct-HSM", 256).await);
    let wrapped = b.kv().wrap_key(crypto_req(&id, "A256KW", &[9u8; 32])).await.unwrap().into_inner().value;
    let admin = b.admin.object_id.clone();
    b.stop().await;
    let b = start_in(dir.path(), ClockKind::Manual).await;
    assert_eq!(b.admin.object_id, admin);
    let out = b.kv().unwrap_key(unwrap_req(&id, "A256KW", &wrapped)).await.unwrap().into_inner();
    assert_eq!(out.value, vec![9u8; 32]);
    b.stop().await;
}

#[tokio::test]
async fn backups_restore_into_a_broker_with_the_same_master_key_only() {
    let a_dir = tempfile::tempdir().unwrap();
    let a = start_in(a_dir.path(), ClockKind::Manual).await;
    a.vault("src-kv", false).await;
    let id = kid(&a.key("src-kv", "moving", "RSA", 2048).await);
    let wrapped =
        a.kv().wrap_key(crypto_req(&id, "RSA-OAEP-256", &[5u8; 32])).await.unwrap().into_inner().value;
    let blob = a
        .kv()
        .backup_key(proto::BackupKeyRequest { key_id: a.key_uri("src-kv", "moving") })
        .await
        .unwrap()
        .into_inner()
        .blob;

    // Same master key, fresh data directory: the key restores and unwraps.
    let b_dir = tempfile::tempdir().unwrap();
    std::fs::copy(a_dir.path().join("master.key"), b_dir.path().join("master.key")).unwrap();
    let b = start_in(b_dir.path(), ClockKind::Manual).await;
    b.vault("dst-kv", false).await;
    let restored = b
        .kv()
        .restore_key(proto::RestoreKeyRequest { vault_name: "dst-kv".into(), blob: blob.clone() })
        .await
        .unwrap()
        .into_inner();
    let new_id = kid(&restored);
    assert_eq!(new_id, id.replace("src-kv", "dst-kv"), "the version id travels with the key");
    let out = b.kv().unwrap_key(unwrap_req(&new_id, "RSA-OAEP-256", &wrapped)).await.unwrap().into_inner();
    assert_eq!(out.value, vec![5u8; 32]);

    // Another master key: refused.
    let c = start().await;
    c.vault("dst-kv", false).await;
    let msg = assert_status(
        c.kv().restore_key(proto::RestoreKeyRequest { vault_name: "dst-kv".into(), blob }).await,
        Code::InvalidArgument,
        "BadParameter",
    );
    assert!(msg.contains("different master key"), "{msg}");
    a.stop().await;
    b.stop().await;
    c.stop().await;
}
