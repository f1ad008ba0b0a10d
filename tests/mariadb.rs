//! MariaDB's data-at-rest encryption through the broker's Vault-KV surface (docs/MARIADB.md):
//! the surface as MariaDB's `hashicorp_key_management` plugin calls it, and a real `mariadbd`.

mod common;

use common::mariadb::*;
use common::*;
use tde_broker::grpc::proto;
use tde_broker::model::server::{DbState, Reason};
use tde_broker::rest::Reply;
use tde_broker::rest::vault_kv::VaultKv;

const ONLINE: i32 = proto::DatabaseState::Online as i32;
const INACCESSIBLE: i32 = proto::DatabaseState::Inaccessible as i32;

#[tokio::test]
async fn a_set_up_mount_answers_tune_and_serves_each_key_id_as_the_same_256_bit_key() {
    let (b, broker) = start_holding(|_| {}).await;
    let s = cmk_server(&b, "kv-basic", "maria-basic").await;
    let m = setup_mount(&b, &s.server.id, "kv/mariadb", &[1, 2]).await;
    assert_eq!((m.mount.as_str(), m.database.as_str()), ("kv/mariadb", "mariadb"));
    assert_eq!(m.created_key_ids, vec![1, 2]);
    assert_eq!(b.database(&s.server.id, "mariadb").await.state, ONLINE);
    let kv = VaultKv::new(broker.clone());

    let tune = get(&kv, "/v1/sys/mounts/kv/mariadb/tune", Some(&m.token)).await;
    let (status, body) = answered(&tune);
    assert_eq!((status, body["options"]["version"].as_str()), (200, Some("2")), "{body}");

    let (k1, v1) = key_of(&get(&kv, "/v1/kv/mariadb/data/1", Some(&m.token)).await);
    let (k2, _) = key_of(&get(&kv, "/v1/kv/mariadb/data/2", Some(&m.token)).await);
    assert_eq!((k1.len(), v1), (64, 1));
    assert!(k1.bytes().all(|c| c.is_ascii_hexdigit()), "{k1}");
    assert_ne!(k1, k2, "each key id is its own DEK");
    let (again, _) = key_of(&get(&kv, "/v1/kv/mariadb/data/1?version=1", Some(&m.token)).await);
    assert_eq!(again, k1);
    // The stored form is wrapped under the protector, never the key itself.
    let stored = serde_json::to_string(&broker.read().servers.values().next().unwrap().kv_mounts).unwrap();
    assert!(!stored.contains(&k1) && stored.contains(&s.key), "{stored}");

    // Setting up again issues a new token and keeps the keys.
    let m2 = setup_mount(&b, &s.server.id, "kv/mariadb", &[1, 3]).await;
    assert_eq!((m2.created_key_ids.clone(), m2.key_ids.clone()), (vec![3], vec![1, 2, 3]));
    let old = get(&kv, "/v1/kv/mariadb/data/1", Some(&m.token)).await;
    assert_eq!(answered(&old).0, 403);
    assert_eq!(key_of(&get(&kv, "/v1/kv/mariadb/data/1", Some(&m2.token)).await).0, k1);
}

#[tokio::test]
async fn a_wrong_or_missing_token_and_an_unknown_mount_get_vaults_permission_denied() {
    let (b, broker) = start_holding(|_| {}).await;
    let s = cmk_server(&b, "kv-token", "maria-token").await;
    let m = setup_mount(&b, &s.server.id, "mariadb", &[1]).await;
    let kv = VaultKv::new(broker);
    for (path, token) in [
        ("/v1/mariadb/data/1", None),
        ("/v1/mariadb/data/1", Some("tdekv.wrong")),
        ("/v1/other/data/1", Some(m.token.as_str())),
        ("/v1/sys/mounts/mariadb/tune", Some("tdekv.wrong")),
    ] {
        let h = get(&kv, path, token).await;
        let (status, body) = answered(&h);
        assert_eq!((status, body), (403, serde_json::json!({"errors": ["permission denied"]})), "{path}");
        assert_ne!(h.outcome, "OK");
    }
    // A key id the mount does not have is Vault's "not found".
    let h = get(&kv, "/v1/mariadb/data/9", Some(&m.token)).await;
    assert_eq!(answered(&h), (404, serde_json::json!({"errors": []})));
    // Paths that are not Vault's are left to the other surfaces.
    let (parts, ()) = http::Request::builder().uri("/keys/k").body(()).unwrap().into_parts();
    let req = tde_broker::rest::RestRequest {
        parts,
        body: bytes::Bytes::new(),
        peer: "127.0.0.1:1".parse().unwrap(),
    };
    assert!(tde_broker::rest::Surface::handle(&kv, &req).await.is_none());
}

#[tokio::test]
async fn revoked_access_is_permission_denied_with_the_tde_reason_and_the_database_inaccessible() {
    let (b, broker) = start_holding(|_| {}).await;
    let s = cmk_server(&b, "kv-revoke", "maria-revoke").await;
    let m = setup_mount(&b, &s.server.id, "mariadb", &[1]).await;
    let kv = VaultKv::new(broker);
    let (k1, _) = key_of(&get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await);

    b.policy(&s.vault, &s.umi.principal_id, &[]).await;
    let h = get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await;
    assert_eq!(answered(&h), (403, serde_json::json!({"errors": ["permission denied"]})));
    assert_eq!(h.outcome, "IDENTITY_MISSING_PERMISSIONS");
    assert!(h.principal.is_some(), "the refusal names the engine host");
    let db = b.database(&s.server.id, "mariadb").await;
    assert_eq!((db.state, db.reason.as_str()), (INACCESSIBLE, "IDENTITY_MISSING_PERMISSIONS"));

    // Access back within the heal window: the database heals and the same key is served.
    b.policy(&s.vault, &s.umi.principal_id, &TDE_PERMS).await;
    assert_eq!(key_of(&get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await).0, k1);
    assert_eq!(b.database(&s.server.id, "mariadb").await.state, ONLINE);
}

#[tokio::test]
async fn a_disabled_protector_key_is_permission_denied_with_key_disabled() {
    let (b, broker) = start_holding(|_| {}).await;
    let s = cmk_server(&b, "kv-disable", "maria-disable").await;
    let m = setup_mount(&b, &s.server.id, "mariadb", &[1]).await;
    let kv = VaultKv::new(broker.clone());
    b.kv()
        .update_key(proto::UpdateKeyRequest {
            key_id: s.key.clone(),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .expect("disable the key");
    let h = get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await;
    assert_eq!(answered(&h).0, 403);
    assert_eq!(h.outcome, "KEY_DISABLED");
    let st = broker.read();
    let db = st.databases.values().next().unwrap();
    assert_eq!((db.state, db.reason), (DbState::Inaccessible, Some(Reason::KeyDisabled)));
}

#[tokio::test]
async fn an_injected_outage_drops_the_connection_and_leaves_the_database_online() {
    let (b, broker) = start_holding(|_| {}).await;
    let s = cmk_server(&b, "kv-outage", "maria-outage").await;
    let m = setup_mount(&b, &s.server.id, "mariadb", &[1]).await;
    let kv = VaultKv::new(broker);
    b.emu()
        .set_faults(proto::SetFaultsRequest {
            vault_name: s.vault.clone(),
            outage: true,
            ..Default::default()
        })
        .await
        .expect("outage");
    let h = get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await;
    assert!(
        matches!(h.reply, Reply::Drop),
        "an outage must look like an unreachable Vault, not an HTTP error"
    );
    assert_eq!(h.outcome, "ServiceUnavailable");
    assert_eq!(b.database(&s.server.id, "mariadb").await.state, ONLINE);
    // Throttling too.
    b.emu()
        .set_faults(proto::SetFaultsRequest {
            vault_name: s.vault.clone(),
            error_rate: 1.0,
            error_code: "RESOURCE_EXHAUSTED".into(),
            ..Default::default()
        })
        .await
        .expect("throttled");
    let h = get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await;
    assert!(matches!(h.reply, Reply::Drop), "{}", h.outcome);
    b.emu().clear_faults(proto::ClearFaultsRequest::default()).await.expect("clear");
    key_of(&get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await);
}

#[tokio::test]
async fn rotating_a_key_id_makes_a_new_latest_version_and_keeps_the_old_one_readable() {
    let (b, broker) = start_holding(|_| {}).await;
    let s = cmk_server(&b, "kv-rot", "maria-rot").await;
    let m = setup_mount(&b, &s.server.id, "mariadb", &[1]).await;
    let kv = VaultKv::new(broker);
    let (v1, _) = key_of(&get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await);
    let r = b
        .servers()
        .rotate_vault_kv_key(proto::RotateVaultKvKeyRequest {
            server_id: s.server.id.clone(),
            mount: "mariadb".into(),
            key_id: 1,
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(r.version, 2);
    let (latest, n) = key_of(&get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await);
    assert_eq!(n, 2);
    assert_ne!(latest, v1);
    assert_eq!(key_of(&get(&kv, "/v1/mariadb/data/1?version=1", Some(&m.token)).await), (v1, 1));
    let h = get(&kv, "/v1/mariadb/data/1?version=3", Some(&m.token)).await;
    assert_eq!(answered(&h).0, 404);
}

#[tokio::test]
async fn a_protector_rotation_rewraps_the_stored_keys_without_changing_them() {
    let (b, broker) = start_holding(|_| {}).await;
    let s = cmk_server(&b, "kv-prot", "maria-prot").await;
    let m = setup_mount(&b, &s.server.id, "mariadb", &[1, 2]).await;
    let kv = VaultKv::new(broker.clone());
    let (k1, _) = key_of(&get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await);
    let (k2, _) = key_of(&get(&kv, "/v1/mariadb/data/2", Some(&m.token)).await);
    let new = b.key(&s.vault, "tde", "RSA", 2048).await;
    let new_kid = kid(&new);
    b.servers()
        .set_encryption_protector(proto::SetEncryptionProtectorRequest {
            server_id: s.server.id.clone(),
            server_key_type: "AzureKeyVault".into(),
            key_id: new_kid.clone(),
            auto_rotation_enabled: false,
        })
        .await
        .expect("new protector version");
    let kids: Vec<String> = broker.read().servers.values().next().unwrap().kv_mounts[0]
        .keys
        .iter()
        .flat_map(|k| k.versions.iter().map(|v| v.kid.clone()))
        .collect();
    assert_eq!(kids, vec![new_kid.clone(), new_kid.clone()], "every DEK is re-wrapped under the new version");
    // The old version can be disabled: the keys no longer need it.
    let old_kid = s.server.protector.as_ref().expect("protector").kid.clone();
    assert_ne!(old_kid, new_kid);
    b.kv()
        .update_key(proto::UpdateKeyRequest { key_id: old_kid, enabled: Some(false), ..Default::default() })
        .await
        .expect("disable the old version");
    assert_eq!(key_of(&get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await).0, k1);
    assert_eq!(key_of(&get(&kv, "/v1/mariadb/data/2", Some(&m.token)).await).0, k2);
}

#[tokio::test]
async fn a_protector_that_follows_its_keys_newest_version_takes_the_stored_keys_along() {
    let (b, broker) = start_holding(|_| {}).await;
    let s = cmk_server(&b, "kv-auto", "maria-auto").await;
    b.servers()
        .set_encryption_protector(proto::SetEncryptionProtectorRequest {
            server_id: s.server.id.clone(),
            server_key_type: "AzureKeyVault".into(),
            key_id: s.key.clone(),
            auto_rotation_enabled: true,
        })
        .await
        .expect("auto-rotating protector");
    let m = setup_mount(&b, &s.server.id, "mariadb", &[1]).await;
    let kv = VaultKv::new(broker.clone());
    let (k1, _) = key_of(&get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await);
    let newest = kid(&b.key(&s.vault, "tde", "RSA", 2048).await);
    // The prober moves the protector to the newest version, and the DEK with it.
    b.advance(600).await;
    let stored = |broker: &tde_broker::broker::Broker| {
        broker.read().servers.values().next().unwrap().kv_mounts[0].keys[0].versions[0].kid.clone()
    };
    assert_eq!(stored(&broker), newest);
    assert_eq!(key_of(&get(&kv, "/v1/mariadb/data/1", Some(&m.token)).await).0, k1);
}

/// Runs blocking work (the `mariadb` client, `mariadbd`'s start) off the broker's workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// The plugin and encryption options: keys from the broker's Vault-KV surface at `rest`, the
/// latest version re-checked every `version_check_ms`; with `encrypt`, tables, redo log and
/// temporary files encrypted.
fn plugin_options(
    rest: std::net::SocketAddr,
    ca: &std::path::Path,
    version_check_ms: u32,
    encrypt: bool,
) -> Vec<String> {
    let mut o = vec![
        "--plugin-load-add=hashicorp_key_management".to_string(),
        format!("--hashicorp-key-management-vault-url=https://127.0.0.1:{}/v1/mariadb", rest.port()),
        format!("--hashicorp-key-management-vault-ca={}", ca.display()),
        "--hashicorp-key-management-caching-enabled=ON".to_string(),
        "--hashicorp-key-management-use-cache-on-timeout=ON".to_string(),
        format!("--hashicorp-key-management-cache-version-timeout={version_check_ms}"),
        "--hashicorp-key-management-timeout=5".to_string(),
        "--hashicorp-key-management-max-retries=0".to_string(),
    ];
    if encrypt {
        o.extend(
            [
                "--innodb-encrypt-tables=ON",
                "--innodb-encrypt-log=ON",
                "--encrypt-tmp-files=ON",
                "--innodb-encrypt-temporary-tables=ON",
            ]
            .map(String::from),
        );
    }
    o
}

const MARKER: &str = "plaintext-row-of-the-mariadb-test";
const CONTROL: &str = "unencrypted-control-row-of-the-mariadb-test";

fn count(db: &Mariadb, table: &str) -> Result<u64, String> {
    db.sql(&format!("SELECT COUNT(*) FROM d.{table}")).map(|o| o.trim().parse().unwrap_or(u64::MAX))
}

fn file_contains(path: &std::path::Path, needle: &str) -> bool {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_encrypts_through_the_broker_goes_dark_when_access_is_revoked_and_rides_out_an_outage() {
    let audit_dir = tempfile::tempdir().expect("tempdir");
    let audit = audit_dir.path().join("audit.jsonl");
    let (b, _broker, rest) = start_holding_rest(|c| {
        c.rest_listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.rest_listen_explicit = true;
        c.audit_log = tde_broker::config::AuditLog::File(audit.clone());
    })
    .await;
    let audited = |outcome: &str| {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("VaultKv/ReadKey") && l.contains(&format!("\"{outcome}\"")))
            .count()
    };
    let (rest, ca) = rest.expect("the REST listener runs");
    let s = cmk_server(&b, "maria-e2e-kv", "maria-e2e").await;
    let m = setup_mount(&b, &s.server.id, "mariadb", &[1, 2]).await;
    let mut db = blocking(Mariadb::install);
    let encrypted = plugin_options(rest, &ca, 1000, true);
    let plain_start = plugin_options(rest, &ca, 60_000, false);

    // Encrypted tables (key 1 and key 2), redo log and temporary files; rows in.
    blocking(|| db.start(&encrypted, &m.token)).unwrap_or_else(|e| panic!("{e}"));
    let mut rows = String::new();
    for i in 0..200 {
        rows.push_str(&format!("{}({i}, '{MARKER}-{i:04}')", if i == 0 { "" } else { "," }));
    }
    blocking(|| {
        db.sql(&format!(
            "CREATE DATABASE d;
             CREATE TABLE d.t (id INT PRIMARY KEY, v VARCHAR(100)) ENGINE=InnoDB ENCRYPTED=YES ENCRYPTION_KEY_ID=1;
             CREATE TABLE d.u (id INT PRIMARY KEY, v VARCHAR(100)) ENGINE=InnoDB ENCRYPTED=YES ENCRYPTION_KEY_ID=2;
             CREATE TABLE d.plain (id INT PRIMARY KEY, v VARCHAR(100)) ENGINE=InnoDB ENCRYPTED=NO;
             INSERT INTO d.t VALUES {rows}; INSERT INTO d.u VALUES {rows};
             INSERT INTO d.plain VALUES (1, '{CONTROL}');"
        ))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", db.log_tail()));
    assert_eq!(blocking(|| count(&db, "t")), Ok(200));

    // MariaDB's key rotation: a new version of key 1, which MariaDB takes for new pages at its
    // next version check; the pages under version 1 stay readable.
    let rotated = b
        .servers()
        .rotate_vault_kv_key(proto::RotateVaultKvKeyRequest {
            server_id: s.server.id.clone(),
            mount: "mariadb".into(),
            key_id: 1,
        })
        .await
        .expect("rotate key 1")
        .into_inner();
    assert_eq!(rotated.version, 2);
    blocking(|| std::thread::sleep(std::time::Duration::from_millis(1200)));
    blocking(|| {
        db.sql(&format!(
            "INSERT INTO d.t VALUES (500, '{MARKER}-500'); FLUSH TABLES d.t FOR EXPORT; UNLOCK TABLES;"
        ))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", db.log_tail()));
    let current = blocking(|| {
        db.sql("SELECT CURRENT_KEY_VERSION FROM information_schema.INNODB_TABLESPACES_ENCRYPTION WHERE NAME = 'd/t'")
    });
    assert_eq!(current.map(|v| v.trim().to_string()), Ok("2".to_string()));

    // An injected outage, shorter than the transient grace, under the running MariaDB: with a
    // 1 s version check, writes and flushes ask the broker during the outage, get the connection
    // dropped, and go on from the plugin's cache; mariadbd neither aborts nor stops serving.
    b.emu()
        .set_faults(proto::SetFaultsRequest {
            vault_name: s.vault.clone(),
            outage: true,
            ..Default::default()
        })
        .await
        .expect("outage");
    for round in 0..4 {
        blocking(|| std::thread::sleep(std::time::Duration::from_millis(1200)));
        let n = 1000 + round;
        blocking(|| {
            db.sql(&format!(
                "INSERT INTO d.t VALUES ({n}, '{MARKER}-{n}'); FLUSH TABLES d.t FOR EXPORT; UNLOCK TABLES;"
            ))
        })
        .unwrap_or_else(|e| panic!("MariaDB stopped serving during the outage: {e}\n{}", db.log_tail()));
    }
    assert!(blocking(|| db.running()), "mariadbd aborted during the outage:\n{}", db.log_tail());
    assert_eq!(blocking(|| count(&db, "t")), Ok(205));
    assert_eq!(
        b.database(&s.server.id, "mariadb").await.state,
        ONLINE,
        "an outage within the grace keeps the database ONLINE"
    );
    b.emu().clear_faults(proto::ClearFaultsRequest::default()).await.expect("clear");
    assert!(audited("ServiceUnavailable") > 0, "MariaDB asked for a key during the outage");
    let log = db.log();
    assert!(
        !log.contains("Hashicorp server error"),
        "the plugin met dropped connections, never HTTP errors:\n{log}"
    );

    // Clean shutdown: the tablespaces and the redo log do not hold the rows in plaintext (the
    // unencrypted control table does).
    blocking(|| db.stop());
    let data = db.data();
    assert!(
        file_contains(&data.join("d/plain.ibd"), CONTROL),
        "the control table holds its row in plaintext"
    );
    for f in ["d/t.ibd", "d/u.ibd", "ib_logfile0", "ibdata1"] {
        assert!(!file_contains(&data.join(f), MARKER), "{f} holds plaintext rows");
    }

    // Protector rotation: a new version of the vault key becomes the protector; the stored DEKs
    // are re-wrapped (unchanged), and MariaDB opens its tables after a restart.
    let new = b.key(&s.vault, "tde", "RSA", 2048).await;
    b.servers()
        .set_encryption_protector(proto::SetEncryptionProtectorRequest {
            server_id: s.server.id.clone(),
            server_key_type: "AzureKeyVault".into(),
            key_id: kid(&new),
            auto_rotation_enabled: false,
        })
        .await
        .expect("rotate the protector");
    blocking(|| db.start(&encrypted, &m.token)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(blocking(|| count(&db, "t")), Ok(205), "{}", db.log_tail());
    assert_eq!(blocking(|| count(&db, "u")), Ok(200));
    // Restarted without the encryption options (the redo log is rebuilt unencrypted; the tables
    // stay encrypted): InnoDB itself then needs no key to start.
    blocking(|| db.stop());
    blocking(|| db.start(&plain_start, &m.token)).unwrap_or_else(|e| panic!("{e}"));
    blocking(|| db.stop());

    // Revoke the identity's access; the prober (manual clock) finds it: INACCESSIBLE.
    b.policy(&s.vault, &s.umi.principal_id, &[]).await;
    b.advance(600).await;
    let state = b.database(&s.server.id, "mariadb").await;
    assert_eq!((state.state, state.reason.as_str()), (INACCESSIBLE, "IDENTITY_MISSING_PERMISSIONS"));
    // A restart now cannot read the encrypted tables (the data is intact), and says why.
    let log_before = db.log().len();
    blocking(|| db.start(&plain_start, &m.token)).unwrap_or_else(|e| panic!("{e}"));
    // The first statement on each table fails on the key fetch itself, the next ones with 1877.
    let first = blocking(|| count(&db, "t")).expect_err("the encrypted table must not open");
    assert!(first.contains("1105") && first.contains("hashicorp: Unable to get key data"), "{first}");
    let refused = blocking(|| count(&db, "t")).expect_err("the encrypted table must not open");
    assert!(refused.contains("ERROR 1877") && refused.contains("is corrupted"), "{refused}");
    let _ = blocking(|| count(&db, "u"));
    assert!(blocking(|| count(&db, "u")).is_err_and(|e| e.contains("1877")));
    assert_eq!(blocking(|| count(&db, "plain")), Ok(1));
    let log = db.log()[log_before..].to_string();
    assert!(
        log.contains("hashicorp: Hashicorp server error: 403"),
        "the error log names the key fetch:\n{log}"
    );
    assert!(audited("IDENTITY_MISSING_PERMISSIONS") > 0, "the refusals are audited with the TDE reason");
    blocking(|| db.stop());

    // Access restored within the heal window: ONLINE again, and after a restart every row reads.
    b.policy(&s.vault, &s.umi.principal_id, &TDE_PERMS).await;
    b.advance(600).await;
    assert_eq!(b.database(&s.server.id, "mariadb").await.state, ONLINE);
    blocking(|| db.start(&encrypted, &m.token)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(blocking(|| count(&db, "t")), Ok(205), "{}", db.log_tail());
    assert_eq!(blocking(|| count(&db, "u")), Ok(200));
    blocking(|| db.stop());

    // Every key fetch is counted by outcome and timed in the broker's metrics.
    let metrics = tde_broker::telemetry::metrics().render(&[], None);
    for outcome in ["OK", "ServiceUnavailable", "IDENTITY_MISSING_PERMISSIONS"] {
        let series = metrics.lines().find(|l| {
            l.starts_with("tdebroker_requests_total")
                && l.contains("\"VaultKv\"")
                && l.contains("\"ReadKey\"")
                && l.contains(&format!("\"{outcome}\""))
        });
        assert!(series.is_some_and(|l| !l.ends_with(" 0")), "no ReadKey {outcome} count:\n{metrics}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("_bucket") && l.contains("\"VaultKv\"") && l.contains("\"ReadKey\"")),
        "no ReadKey latency histogram:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_setup_writes_a_private_token_file_and_prints_a_usable_my_cnf() {
    use std::os::unix::fs::PermissionsExt as _;
    let (b, broker) = start_holding(|_| {}).await;
    let s = cmk_server(&b, "kv-cli", "maria-cli").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("maria.token");
    let out = blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"))
            .args(["--server", &format!("http://{}", b.addr), "--token", &b.token])
            .args(["mariadb", "setup", &s.server.id, "--mount", "kv/maria", "--keys", "1,2,5"])
            .arg("--token-file")
            .arg(&token_file)
            .args(["--rest-url", "https://127.0.0.1:8443", "--vault-ca", "/etc/ca.pem"])
            .output()
            .expect("tde-broker runs")
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "[mariadbd]",
        "plugin_load_add = hashicorp_key_management",
        "hashicorp-key-management-vault-url = https://127.0.0.1:8443/v1/kv/maria",
        "hashicorp-key-management-vault-ca = /etc/ca.pem",
        "hashicorp-key-management-use-cache-on-timeout = ON",
        "innodb_encrypt_log = ON",
        "encrypt_tmp_files = ON",
    ] {
        assert!(stdout.lines().any(|l| l == line), "missing {line:?} in\n{stdout}");
    }
    // Every other line is a comment: the output is a my.cnf as it stands.
    assert!(
        stdout.lines().all(|l| l.is_empty() || l.starts_with('#') || l.starts_with('[') || l.contains(" = "))
    );
    let mode = std::fs::metadata(&token_file).expect("token file").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_file).expect("token").trim().to_string();
    assert!(!stdout.contains(&token), "the token is not printed");
    let kv = VaultKv::new(broker);
    let (k5, _) = key_of(&get(&kv, "/v1/kv/maria/data/5", Some(&token)).await);
    assert_eq!(k5.len(), 64);
}
