//! Several brokers on one PostgreSQL (docs/SCALING.md), on a throwaway PostgreSQL the tests start
//! themselves (`tests/support/pg.rs`: Debian's `postgresql` package; `.ci/run` installs it).
//!
//! Each broker has a data directory of its own and the deployment's master key (the first
//! broker's `master.key`, copied), and serves gRPC in this process.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::{PgDatabase, PgServer};
use common::{TestBroker, bearer, crypto_req, kid, unwrap_req};
use tde_broker::broker::feed::FeedSettings;
use tde_broker::config::{ClockKind, Config, StoreSetting};
use tde_broker::grpc::proto;
use tonic::Code;

/// A broker's configuration on `db`, in `dir`.
fn config(dir: &std::path::Path, db: &PgDatabase) -> Config {
    let mut cfg = Config::for_data_dir(dir);
    cfg.clock = ClockKind::Manual;
    cfg.clock_start = Some(1_800_000_000);
    cfg.store = StoreSetting::Postgres(Box::new(db.url().parse().expect("the harness's URL is valid")));
    cfg
}

/// `n` brokers on `db`: the first makes the master key, the others get a copy of it.
async fn brokers(db: &PgDatabase, n: usize) -> (Vec<TestBroker>, Vec<tempfile::TempDir>) {
    brokers_with(db, n, |_| {}).await
}

async fn brokers_with(
    db: &PgDatabase,
    n: usize,
    modify: impl Fn(&mut Config),
) -> (Vec<TestBroker>, Vec<tempfile::TempDir>) {
    let mut dirs: Vec<tempfile::TempDir> = Vec::new();
    let mut out = Vec::new();
    for i in 0..n {
        let dir = tempfile::tempdir().expect("tempdir");
        if i > 0 {
            std::fs::copy(dirs[0].path().join("master.key"), dir.path().join("master.key"))
                .expect("share the master key");
        }
        let mut cfg = config(dir.path(), db);
        modify(&mut cfg);
        out.push(common::start_cfg(cfg).await);
        dirs.push(dir);
    }
    (out, dirs)
}

/// Retries `op` while it fails with a status a client retries (UNAVAILABLE: another broker
/// committed first, or the broker is catching up); gives up after `patience`.
async fn retried<T, F, Fut>(patience: Duration, mut op: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + patience;
    loop {
        match op().await {
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Waits (up to a minute) until `check` holds; panics with `what` otherwise.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A refusal of a broker that has not yet applied what another committed (the principal, the
/// key) as UNAVAILABLE, so that [`retried`] tries again.
fn not_yet_known(s: tonic::Status) -> tonic::Status {
    match s.code() {
        Code::NotFound | Code::Unauthenticated | Code::PermissionDenied => {
            tonic::Status::unavailable("not yet")
        }
        _ => s,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_created_on_one_broker_is_used_on_another_and_a_revocation_on_one_is_enforced_on_the_other() {
    let server = PgServer::shared();
    let db = server.create_database();
    let (b, _dirs) = brokers(&db, 2).await;
    let (a, b) = (&b[0], &b[1]);
    assert_eq!(a.admin.object_id, b.admin.object_id, "one bootstrap admin for the deployment");

    a.vault("shared", false).await;
    let user = a.user("app").await;
    a.policy("shared", &user.object_id, &["wrapKey", "unwrapKey"]).await;
    let key = a.key("shared", "k", "RSA", 2048).await;
    let kid = kid(&key);

    // The user's token was issued by A; B accepts it (one signing key) once it knows the user.
    let on_b = b.kv_with(bearer(&user.token));
    let wrapped = retried(Duration::from_secs(60), || {
        let (mut kv, kid) = (on_b.clone(), kid.clone());
        async move { kv.wrap_key(crypto_req(&kid, "RSA-OAEP-256", &[5; 32])).await.map_err(not_yet_known) }
    })
    .await
    .expect("B wraps with the key A created")
    .into_inner()
    .value;
    let unwrapped = a
        .kv_with(bearer(&user.token))
        .unwrap_key(unwrap_req(&kid, "RSA-OAEP-256", &wrapped))
        .await
        .expect("A unwraps what B wrapped")
        .into_inner()
        .value;
    assert_eq!(unwrapped, [5; 32]);

    // Revocations on A, each measured until B refuses the (cached) unwrap.
    let mut delays = Vec::new();
    for round in 0..20 {
        a.policy("shared", &user.object_id, &["wrapKey", "unwrapKey"]).await;
        eventually("B grants again", || {
            let (mut kv, kid, w) = (on_b.clone(), kid.clone(), wrapped.clone());
            async move { kv.unwrap_key(unwrap_req(&kid, "RSA-OAEP-256", &w)).await.is_ok() }
        })
        .await;
        // Served from B's caches from here on.
        on_b.clone().unwrap_key(unwrap_req(&kid, "RSA-OAEP-256", &wrapped)).await.expect("cached unwrap");
        a.policy("shared", &user.object_id, &[]).await;
        let acknowledged = Instant::now();
        loop {
            match on_b.clone().unwrap_key(unwrap_req(&kid, "RSA-OAEP-256", &wrapped)).await {
                Ok(_) => {}
                Err(s) if s.code() == Code::PermissionDenied => break,
                Err(s) => panic!("round {round}: B answered {s:?} instead of refusing"),
            }
            assert!(acknowledged.elapsed() < Duration::from_secs(60), "B never enforced the revocation");
        }
        delays.push(acknowledged.elapsed());
    }
    delays.sort();
    println!(
        "revocation on A until refused on B, {} rounds: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        delays.len(),
        percentile(&delays, 0.5),
        percentile(&delays, 0.9),
        percentile(&delays, 0.99),
        delays[delays.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_brokers_writing_the_same_vaults_policies_concurrently_lose_no_write() {
    let server = PgServer::shared();
    let db = server.create_database();
    let (b, _dirs) = brokers(&db, 2).await;
    b[0].vault("busy", false).await;
    let mut tasks = Vec::new();
    let mut expected = vec![b[0].admin.object_id.clone()];
    for (i, broker) in b.iter().enumerate() {
        for j in 0..8 {
            let object_id = uuid::Uuid::new_v4().to_string();
            expected.push(object_id.clone());
            let vaults = broker.vaults();
            let perms =
                if (i + j) % 2 == 0 { vec!["get".to_string()] } else { vec!["unwrapKey".to_string()] };
            tasks.push(tokio::spawn(async move {
                retried(Duration::from_secs(60), || {
                    let mut v = vaults.clone();
                    let req = proto::SetAccessPolicyRequest {
                        vault_name: "busy".into(),
                        object_id: object_id.clone(),
                        key_permissions: perms.clone(),
                    };
                    async move { v.set_access_policy(req).await }
                })
                .await
            }));
        }
    }
    for t in tasks {
        t.await.expect("task").expect("every write lands, retried on a conflict");
    }
    expected.sort();
    for broker in &b {
        eventually("each broker holds every policy", || {
            let mut v = broker.vaults();
            let expected = expected.clone();
            async move {
                let got = v
                    .list_access_policies(proto::ListAccessPoliciesRequest { vault_name: "busy".into() })
                    .await
                    .expect("list")
                    .into_inner();
                let mut ids: Vec<String> = got.policies.into_iter().map(|p| p.object_id).collect();
                ids.sort();
                ids == expected
            }
        })
        .await;
    }
    let stored = server.psql(db.name(), "SELECT doc FROM vaults WHERE name = 'busy'");
    for id in &expected {
        assert!(stored.contains(id.as_str()), "the stored vault lost the policy of {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_postgres_stopped_brokers_fail_closed_and_recover_with_nothing_lost() {
    let server = Arc::new(PgServer::start());
    let db = server.create_database();
    let (b, _dirs) = brokers(&db, 2).await;
    let (a, b) = (&b[0], &b[1]);
    a.vault("drvault", false).await;
    let key = a.key("drvault", "k", "RSA", 2048).await;
    let kid = kid(&key);
    let on_b = b.kv();
    let wrapped = retried(Duration::from_secs(60), || {
        let mut kv = on_b.clone();
        let kid = kid.clone();
        async move { kv.wrap_key(crypto_req(&kid, "RSA-OAEP-256", &[3; 32])).await.map_err(not_yet_known) }
    })
    .await
    .expect("B wraps")
    .into_inner()
    .value;

    server.stop();
    // Writes fail at once, with a clear error.
    let refused = a
        .create_key(proto::CreateKeyRequest {
            vault_name: "drvault".into(),
            name: "k2".into(),
            kty: "RSA".into(),
            key_size: 2048,
            ..Default::default()
        })
        .await;
    common::assert_status(refused, Code::Unavailable, "ServiceUnavailable");
    // Reads are served only within the staleness bound: then B fails closed, with a reason.
    let deadline = Instant::now() + Duration::from_secs(60);
    let refusal = loop {
        match on_b.clone().unwrap_key(unwrap_req(&kid, "RSA-OAEP-256", &wrapped)).await {
            Ok(_) => assert!(Instant::now() < deadline, "B never failed closed"),
            Err(s) => break s,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let msg = common::assert_status(Err::<(), _>(refusal), Code::Unavailable, "BrokerStale");
    assert!(msg.contains("refuses data-plane requests until it has caught up"), "{msg}");

    server.restart();
    eventually("B serves again once PostgreSQL is back", || {
        let mut kv = on_b.clone();
        let (kid, w) = (kid.clone(), wrapped.clone());
        async move { kv.unwrap_key(unwrap_req(&kid, "RSA-OAEP-256", &w)).await.is_ok() }
    })
    .await;
    // Nothing acknowledged was lost, and writes work again (retried while the pool reconnects).
    let k2 = retried(Duration::from_secs(60), || {
        let mut kv = a.kv();
        async move {
            kv.create_key(proto::CreateKeyRequest {
                vault_name: "drvault".into(),
                name: "k2".into(),
                kty: "RSA".into(),
                key_size: 2048,
                ..Default::default()
            })
            .await
        }
    })
    .await
    .expect("a write after recovery");
    assert!(common::kid(&k2.into_inner()).contains("/keys/k2/"));
    assert_eq!(server.psql(db.name(), "SELECT count(*) FROM key_versions"), "2");
}

/// The database's own counters of transactions and rows returned (read from another database,
/// so the reading adds nothing to them). PostgreSQL publishes a backend's counts when it goes
/// idle, within about 10 s.
fn db_counters(server: &PgServer, db: &PgDatabase) -> String {
    server.psql(
        "postgres",
        &format!(
            "SELECT xact_commit + xact_rollback, tup_returned, tup_fetched FROM pg_stat_database WHERE datname = '{}'",
            db.name()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_and_uncached_unwraps_do_not_touch_postgres() {
    let server = PgServer::shared();
    let db = server.create_database();
    // No sweeper (the brokers are opened, not served: no lease renewals) and followers that
    // only read on a notification: what remains is the hot path.
    let quiet = |cfg: &mut Config| {
        cfg.feed = FeedSettings {
            staleness_bound: Duration::from_secs(3600),
            poll_interval: Duration::from_secs(1800),
            lease_ttl: Duration::from_secs(5),
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), &db);
    quiet(&mut cfg);
    let app = tde_broker::server::App::open(cfg).await.expect("broker starts");
    let broker = app.broker.clone();
    let admin =
        tde_broker::model::Caller::new(&app.admin.object_id, &app.admin.app_id, &broker.settings.issuer());
    broker
        .create_vault(
            &admin,
            tde_broker::broker::vaults::VaultSpec {
                name: "hot".into(),
                retention_days: 7,
                purge_protection: false,
                rbac: false,
                network_acls: None,
                public_network_access: true,
            },
        )
        .await
        .expect("vault");
    broker.set_access_policy(&admin, "hot", &admin.object_id, &["all".to_string()]).await.expect("policy");
    let key = broker
        .add_key_version(
            &admin,
            tde_broker::broker::keys::NewKey {
                vault: "hot".into(),
                name: "k".into(),
                material: tde_broker::broker::keys::NewMaterial::Generate {
                    kty: tde_broker::model::KeyType::Rsa,
                    size: 2048,
                    curve: None,
                },
                key_ops: vec![],
                attributes: Default::default(),
                tags: Default::default(),
            },
        )
        .await
        .expect("key");
    let request = |op, value: &[u8]| tde_broker::broker::keys::CryptoRequest {
        op,
        key_id: key.kid.clone(),
        algorithm: "RSA-OAEP-256".into(),
        value: value.to_vec(),
        iv: vec![],
        aad: vec![],
        tag: vec![],
    };
    use tde_broker::model::CryptoOp;
    // Let every backend of the broker go idle and publish its counts.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let before = db_counters(&server, &db);
    let mut wrapped = Vec::new();
    for i in 0..50u8 {
        wrapped.push(broker.crypto(&admin, request(CryptoOp::WrapKey, &[i; 32])).await.expect("wrap").value);
    }
    // Each ciphertext twice: uncached, then from the unwrap cache.
    for w in wrapped.iter().chain(wrapped.iter()) {
        broker.crypto(&admin, request(CryptoOp::UnwrapKey, w)).await.expect("unwrap");
    }
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = db_counters(&server, &db);
    println!("pg_stat_database (transactions, rows returned, rows fetched) before {before}, after {after}");
    assert_eq!(after, before, "the hot path ran statements on PostgreSQL");
    // The counters do see the broker's statements: a write moves them.
    broker.set_access_policy(&admin, "hot", &admin.object_id, &["get".to_string()]).await.expect("policy");
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_ne!(db_counters(&server, &db), after, "the counters did not see a write");
    drop(app);
}
