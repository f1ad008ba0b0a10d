//! The broker on a PostgreSQL store (`--store postgres://…`), on a throwaway PostgreSQL started by
//! the tests (`tests/support/pg.rs`).

mod common;

use std::sync::Arc;

use common::pg::{PgDatabase, PgServer};
use tde_broker::config::{ClockKind, Config, StoreSetting};
use tde_broker::grpc::proto;
use tonic::Code;

fn config(data_dir: &std::path::Path, db: &PgDatabase) -> Config {
    let mut cfg = Config::for_data_dir(data_dir);
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(1_800_000_000);
    cfg.store = StoreSetting::Postgres(Box::new(db.url().parse().expect("the harness's URL is valid")));
    cfg
}

async fn get_key(b: &common::TestBroker, vault: &str, name: &str) -> Result<proto::KeyBundle, tonic::Status> {
    b.kv().get_key(proto::GetKeyRequest { key_id: b.key_uri(vault, name) }).await.map(|r| r.into_inner())
}

#[test]
fn the_test_postgres_serves_a_database_of_its_own_and_is_removed_when_dropped() {
    let server = Arc::new(PgServer::start());
    let db = server.create_database();
    server.psql(db.name(), "CREATE TABLE t (x int); INSERT INTO t VALUES (41), (1)");
    assert_eq!(server.psql(db.name(), "SELECT sum(x) FROM t"), "42");
    let other = server.create_database();
    assert_eq!(server.psql(other.name(), "SELECT count(*) FROM pg_tables WHERE tablename = 't'"), "0");
    let dir = server.socket_directory();
    assert!(dir.exists());
    drop((db, other, server));
    assert!(!dir.exists(), "the cluster's directory outlived the last user of the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_on_postgres_keeps_its_keys_across_a_restart_and_a_second_broker_serves_them() {
    let server = PgServer::shared();
    let db = server.create_database();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = common::start_cfg(config(dir.path(), &db)).await;
    b.vault("pgv", false).await;
    let created = b.key("pgv", "k1", "RSA", 2048).await;
    let wrapped = b
        .kv()
        .wrap_key(common::crypto_req(&common::kid(&created), "RSA-OAEP-256", &[7; 32]))
        .await
        .expect("wrap")
        .into_inner()
        .value;
    assert_eq!(
        server.psql(db.name(), "SELECT count(*) FROM key_versions"),
        "1",
        "the key is not in PostgreSQL"
    );
    assert!(
        !dir.path().join(tde_broker::server::DB_FILE).exists(),
        "a SQLite file was made beside a PostgreSQL store"
    );
    b.stop().await;

    // The same broker again: the key, its material and the admin are the database's.
    let b = common::start_cfg(config(dir.path(), &db)).await;
    assert_eq!(
        common::kid(&get_key(&b, "pgv", "k1").await.expect("the key survived the restart")),
        common::kid(&created)
    );
    let unwrapped = b
        .kv()
        .unwrap_key(common::unwrap_req(&common::kid(&created), "RSA-OAEP-256", &wrapped))
        .await
        .expect("unwrap after the restart")
        .into_inner()
        .value;
    assert_eq!(unwrapped, [7; 32]);

    // A second broker with a data directory of its own and the deployment's master key serves
    // the same key, and the admin token of its directory is the same admin's.
    let dir2 = tempfile::tempdir().expect("tempdir");
    std::fs::copy(dir.path().join("master.key"), dir2.path().join("master.key"))
        .expect("share the master key");
    let b2 = common::start_cfg(config(dir2.path(), &db)).await;
    assert_eq!(b2.admin.object_id, b.admin.object_id, "two bootstrap admins");
    let unwrapped = b2
        .kv()
        .unwrap_key(common::unwrap_req(&common::kid(&created), "RSA-OAEP-256", &wrapped))
        .await
        .expect("unwrap on the second broker")
        .into_inner()
        .value;
    assert_eq!(unwrapped, [7; 32]);
    assert_eq!(
        std::fs::read(dir.path().join("store.id")).expect("store.id"),
        std::fs::read(dir2.path().join("store.id")).expect("store.id"),
        "the two directories record different stores"
    );
    b2.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_that_served_one_database_refuses_another() {
    let server = PgServer::shared();
    let (db, other) = (server.create_database(), server.create_database());
    let dir = tempfile::tempdir().expect("tempdir");
    common::start_cfg(config(dir.path(), &db)).await.stop().await;
    let err =
        tde_broker::server::App::open(config(dir.path(), &other)).await.err().expect("refused").to_string();
    assert!(err.contains("holds no data") && err.contains("store.id"), "{err}");
    assert!(err.contains(&other.url()), "the refusal does not name the database: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_stopped_a_write_fails_as_unavailable_and_succeeds_once_it_is_back() {
    let server = Arc::new(PgServer::start());
    let db = server.create_database();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = common::start_cfg(config(dir.path(), &db)).await;
    b.vault("pgv", false).await;
    server.stop();
    let refused = b
        .create_key(proto::CreateKeyRequest {
            vault_name: "pgv".into(),
            name: "k1".into(),
            kty: "RSA".into(),
            key_size: 2048,
            ..Default::default()
        })
        .await;
    common::assert_status(refused, Code::Unavailable, "ServiceUnavailable");
    server.restart();
    b.key("pgv", "k1", "RSA", 2048).await;
    assert_eq!(server.psql(db.name(), "SELECT count(*) FROM key_versions"), "1");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn brokers_starting_at_once_on_a_new_database_bootstrap_one_admin_and_one_signing_key() {
    use base64::Engine as _;
    let server = PgServer::shared();
    let db = server.create_database();
    let key = base64::engine::general_purpose::STANDARD.encode(tde_broker::crypto::random_bytes(32));
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let starts: Vec<_> = dirs
        .iter()
        .map(|dir| {
            std::fs::write(dir.path().join(tde_broker::server::MASTER_KEY_FILE), &key).expect("master key");
            tokio::spawn(common::start_cfg(config(dir.path(), &db)))
        })
        .collect();
    let mut brokers = Vec::new();
    for start in starts {
        brokers.push(start.await.expect("the broker started"));
    }
    for b in &brokers[1..] {
        assert_eq!(b.admin.object_id, brokers[0].admin.object_id, "two bootstrap admins");
    }
    assert_eq!(server.psql(db.name(), "SELECT count(*) FROM principals"), "1");
    // One signing key: a token issued by one broker is accepted by the others.
    for b in &brokers[1..] {
        b.vaults_with(common::bearer(&brokers[0].token))
            .list_vaults(proto::ListVaultsRequest {})
            .await
            .expect("another broker's token is accepted");
    }
    for b in brokers {
        b.stop().await;
    }
}
