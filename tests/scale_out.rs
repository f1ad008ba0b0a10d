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
    // Each broker with its admin listener (/readyz) on a port of its own.
    let admin_addrs = std::sync::Mutex::new(Vec::new());
    let (b, _dirs) = brokers_with(&db, 2, |cfg| {
        let addr = free_port();
        cfg.http_listen = Some(addr);
        cfg.http_listen_explicit = true;
        admin_addrs.lock().expect("lock").push(addr);
    })
    .await;
    let b_admin = admin_addrs.lock().expect("lock")[1];
    let (a, b) = (&b[0], &b[1]);
    // Ready once serving (the listener answers "starting" until then), with its feed position.
    eventually("B is ready", || async move { common::observed::get(b_admin, "/readyz").0 == 200 }).await;
    let (_, _, body) = common::observed::get(b_admin, "/readyz");
    assert!(body.starts_with("ready\nfeed: position "), "{body}");
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
    // /readyz takes the stale broker out of rotation, and says why.
    let (status, _, body) = common::observed::get(b_admin, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("stale: no complete read of the shared store's change feed"), "{body}");

    server.restart();
    eventually("B serves again once PostgreSQL is back", || {
        let mut kv = on_b.clone();
        let (kid, w) = (kid.clone(), wrapped.clone());
        async move { kv.unwrap_key(unwrap_req(&kid, "RSA-OAEP-256", &w)).await.is_ok() }
    })
    .await;
    eventually("B is ready again once caught up", || async move {
        common::observed::get(b_admin, "/readyz").0 == 200
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

/// A vault `hot` with an RSA key on `app`'s broker, the admin allowed everything in it.
async fn hot_key(app: &tde_broker::server::App) -> (tde_broker::model::Caller, String) {
    let broker = &app.broker;
    let admin =
        tde_broker::model::Caller::new(&app.admin.object_id, &app.admin.app_id, &broker.settings.issuer());
    let spec = tde_broker::broker::vaults::VaultSpec {
        name: "hot".into(),
        retention_days: 7,
        purge_protection: false,
        rbac: false,
        network_acls: None,
        public_network_access: true,
    };
    broker.create_vault(&admin, spec).await.expect("vault");
    broker.set_access_policy(&admin, "hot", &admin.object_id, &["all".to_string()]).await.expect("policy");
    let material = tde_broker::broker::keys::NewMaterial::Generate {
        kty: tde_broker::model::KeyType::Rsa,
        size: 2048,
        curve: None,
    };
    let new = tde_broker::broker::keys::NewKey {
        vault: "hot".into(),
        name: "k".into(),
        material,
        key_ops: vec![],
        attributes: Default::default(),
        tags: Default::default(),
    };
    let key = broker.add_key_version(&admin, new).await.expect("key");
    (admin, key.kid)
}

fn crypto(
    op: tde_broker::model::CryptoOp,
    kid: &str,
    value: &[u8],
) -> tde_broker::broker::keys::CryptoRequest {
    tde_broker::broker::keys::CryptoRequest {
        op,
        key_id: kid.to_string(),
        algorithm: "RSA-OAEP-256".into(),
        value: value.to_vec(),
        iv: vec![],
        aad: vec![],
        tag: vec![],
    }
}

/// Wraps `n` DEKs, then unwraps each twice (uncached, then from the unwrap cache); returns the
/// mean time of an uncached and of a cached unwrap.
async fn unwrap_burst(
    app: &tde_broker::server::App,
    admin: &tde_broker::model::Caller,
    kid: &str,
    n: u8,
) -> (Duration, Duration) {
    use tde_broker::model::CryptoOp;
    let broker = &app.broker;
    let mut wrapped = Vec::new();
    for i in 0..n {
        wrapped
            .push(broker.crypto(admin, crypto(CryptoOp::WrapKey, kid, &[i; 32])).await.expect("wrap").value);
    }
    let mut times = [Duration::ZERO; 2];
    for time in &mut times {
        for (i, w) in wrapped.iter().enumerate() {
            let started = Instant::now();
            let plain =
                broker.crypto(admin, crypto(CryptoOp::UnwrapKey, kid, w)).await.expect("unwrap").value;
            *time += started.elapsed();
            assert_eq!(&plain[..], &[i as u8; 32]);
        }
    }
    (times[0] / u32::from(n), times[1] / u32::from(n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_and_uncached_unwraps_do_not_touch_postgres() {
    let server = PgServer::shared();
    let db = server.create_database();
    // No sweeper (the broker is opened, not served: no lease renewals) and a follower that
    // only reads on a notification: what remains is the hot path.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), &db);
    cfg.feed = FeedSettings {
        staleness_bound: Duration::from_secs(3600),
        poll_interval: Duration::from_secs(1800),
        lease_ttl: Duration::from_secs(5),
    };
    let app = tde_broker::server::App::open(cfg).await.expect("broker starts");
    let (admin, kid) = hot_key(&app).await;
    // Let every backend of the broker go idle and publish its counts.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let before = db_counters(&server, &db);
    let (pg_uncached, pg_cached) = unwrap_burst(&app, &admin, &kid, 50).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = db_counters(&server, &db);
    println!("pg_stat_database (transactions, rows returned, rows fetched) before {before}, after {after}");
    assert_eq!(after, before, "the hot path ran statements on PostgreSQL");
    // The counters do see the broker's statements: a write moves them.
    app.broker
        .set_access_policy(&admin, "hot", &admin.object_id, &["get".to_string()])
        .await
        .expect("policy");
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_ne!(db_counters(&server, &db), after, "the counters did not see a write");
    drop(app);

    // The same burst on a SQLite-backed broker, for comparison.
    let dir = tempfile::tempdir().expect("tempdir");
    let app = tde_broker::server::App::open(Config::for_data_dir(dir.path())).await.expect("broker starts");
    let (admin, kid) = hot_key(&app).await;
    let (sqlite_uncached, sqlite_cached) = unwrap_burst(&app, &admin, &kid, 50).await;
    println!(
        "mean unwrap (RSA-2048, OAEP-256, this build): PostgreSQL-backed uncached {pg_uncached:?}, cache hit {pg_cached:?}; SQLite-backed uncached {sqlite_uncached:?}, cache hit {sqlite_cached:?}"
    );
}

/// A broker process (the real binary) on the shared store; SIGKILLed when dropped.
struct Process {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
    log: std::path::PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Starts the binary on `db` with `master_key`, a system clock, a probe every second and a
/// two-second lease, and waits until it serves.
async fn spawn_broker(db: &PgDatabase, master_key: &str, logs: &std::path::Path, name: &str) -> Process {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "probe_interval = 1\nlease_ttl_ms = 2000\n").expect("config");
    let addr = free_port();
    let log = logs.join(format!("{name}.log"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tde-broker"))
        .env("TDE_BROKER_MASTER_KEY", master_key)
        .env("RUST_LOG", "info")
        .env_remove("TDE_BROKER_STORE")
        .args(["serve", "--listen", &addr.to_string(), "--http-listen", "off", "--store", &db.url()])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start tde-broker");
    let p = Process { child, addr, dir, log };
    eventually(&format!("{name} serves"), || {
        let token = p.dir.path().join("data").join("admin.token");
        let addr = p.addr;
        async move { token.exists() && tokio::net::TcpStream::connect(addr).await.is_ok() }
    })
    .await;
    p
}

impl Process {
    async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data").join("admin.token")).expect("admin token")
    }

    fn holds_sweeper_lease(&self) -> bool {
        // The log says each change of hands; the last one counts.
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .rfind(|l| l.contains("holds the lease") && l.contains("sweeper"))
            .is_some_and(|l| l.contains("now holds the lease"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_killed_under_load_leaves_the_others_serving_and_the_prober_moves_to_a_survivor() {
    use tde_broker::grpc::proto::key_vault_client::KeyVaultClient;
    use tde_broker::grpc::proto::servers_client::ServersClient;
    use tde_broker::grpc::proto::vaults_client::VaultsClient;

    let server = PgServer::shared();
    let db = server.create_database();
    let logs = tempfile::tempdir().expect("tempdir");
    let master = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([42u8; 32])
    };
    let mut procs = Vec::new();
    for i in 0..3 {
        procs.push(spawn_broker(&db, &master, logs.path(), &format!("broker{i}")).await);
    }
    let token = procs[0].token();
    let admin_oid = common::claims(&token)["oid"].as_str().expect("oid").to_string();
    for p in &procs[1..] {
        assert_eq!(
            common::claims(&p.token())["oid"].as_str(),
            Some(admin_oid.as_str()),
            "one bootstrap admin"
        );
    }
    let ch0 = procs[0].channel().await;
    let vaults = VaultsClient::with_interceptor(ch0.clone(), bearer(&token));
    let kv0 = KeyVaultClient::with_interceptor(ch0.clone(), bearer(&token));
    let ids = tde_broker::grpc::proto::identities_client::IdentitiesClient::with_interceptor(
        ch0.clone(),
        bearer(&token),
    );
    vaults
        .clone()
        .create_vault(proto::CreateVaultRequest {
            name: "killkv".into(),
            enable_purge_protection: true,
            ..Default::default()
        })
        .await
        .expect("vault");
    let set_policy = |oid: String, perms: &[&str]| {
        let mut v = vaults.clone();
        let req = proto::SetAccessPolicyRequest {
            vault_name: "killkv".into(),
            object_id: oid,
            key_permissions: perms.iter().map(|p| p.to_string()).collect(),
        };
        async move { v.set_access_policy(req).await.expect("policy") }
    };
    set_policy(admin_oid, &["all"]).await;
    let key = kv0
        .clone()
        .create_key(proto::CreateKeyRequest {
            vault_name: "killkv".into(),
            name: "tde".into(),
            kty: "RSA".into(),
            key_size: 2048,
            ..Default::default()
        })
        .await
        .expect("key")
        .into_inner();
    let kid = kid(&key);
    let unversioned = kid.rsplit_once('/').map(|(k, _)| k.to_string()).expect("versioned kid");
    let umi = ids
        .clone()
        .create_user_assigned_identity(proto::CreateUserAssignedIdentityRequest {
            resource_group: "id-rg".into(),
            name: "kill-umi".into(),
            ..Default::default()
        })
        .await
        .expect("identity")
        .into_inner();
    set_policy(umi.principal_id.clone(), &["get", "wrapKey", "unwrapKey"]).await;
    let mut servers = ServersClient::with_interceptor(ch0.clone(), bearer(&token));
    let sql = servers
        .create_server(proto::CreateServerRequest {
            resource_group: "sql-rg".into(),
            name: "kill-sql".into(),
            kind: proto::ServerKind::SqlServer as i32,
            identity: Some(proto::ServerIdentity {
                user_assigned_identity_ids: vec![umi.resource_id.clone()],
                ..Default::default()
            }),
            key_id: unversioned,
            ..Default::default()
        })
        .await
        .expect("CMK server")
        .into_inner();
    servers
        .create_database(proto::CreateDatabaseRequest { server_id: sql.id.clone(), name: "db1".into() })
        .await
        .expect("database");

    // The broker that runs the prober now.
    let mut holder = None;
    eventually("one broker holds the sweeper's lease", || {
        let found = procs.iter().position(Process::holds_sweeper_lease);
        holder = found;
        async move { found.is_some() }
    })
    .await;
    let victim = holder.expect("holder");
    println!("broker{victim} holds the sweeper's lease; killing it under load");

    // Load on every broker: wraps and unwraps with the admin's token.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        let kv = KeyVaultClient::with_interceptor(p.channel().await, bearer(&token));
        let (stop, kid) = (stop.clone(), kid.clone());
        load.push((
            i,
            tokio::spawn(async move {
                let (mut ok, mut errors) = (0u64, Vec::new());
                let mut failed = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let mut kv = kv.clone();
                    let r = async {
                        let w =
                            kv.wrap_key(crypto_req(&kid, "RSA-OAEP-256", &[1; 32])).await?.into_inner().value;
                        kv.unwrap_key(unwrap_req(&kid, "RSA-OAEP-256", &w)).await
                    }
                    .await;
                    match r {
                        Ok(_) => ok += 1,
                        Err(s) => {
                            failed += 1;
                            if errors.len() < 5 {
                                errors.push(s.code());
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (ok, failed, errors)
            }),
        ));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let p = &mut procs[victim];
        p.child.kill().expect("SIGKILL");
        let _ = p.child.wait();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Revoking the identity's access on a survivor: only a prober makes the database
    // inaccessible, and the only probers left are the survivors'.
    // Every survivor's watchers see the transition, whichever of them probes.
    let mut watchers = Vec::new();
    for i in (0..3).filter(|i| *i != victim) {
        let mut s = ServersClient::with_interceptor(procs[i].channel().await, bearer(&token));
        let stream = s
            .watch_database_states(proto::WatchDatabaseStatesRequest { server_id: sql.id.clone() })
            .await
            .expect("watch")
            .into_inner();
        watchers.push((i, stream));
    }
    let survivor = (0..3).find(|i| *i != victim).expect("a survivor");
    let ch = procs[survivor].channel().await;
    let mut v = VaultsClient::with_interceptor(ch.clone(), bearer(&token));
    retried(Duration::from_secs(60), || {
        let mut v = v.clone();
        let req = proto::SetAccessPolicyRequest {
            vault_name: "killkv".into(),
            object_id: umi.principal_id.clone(),
            key_permissions: vec![],
        };
        async move { v.set_access_policy(req).await }
    })
    .await
    .expect("revoke on a survivor");
    let servers = ServersClient::with_interceptor(ch, bearer(&token));
    eventually("the database becomes inaccessible through a survivor's prober", || {
        let mut s = servers.clone();
        let id = sql.id.clone();
        async move {
            s.get_database(proto::GetDatabaseRequest { server_id: id, name: "db1".into() })
                .await
                .is_ok_and(|d| d.into_inner().state == proto::DatabaseState::Inaccessible as i32)
        }
    })
    .await;
    for (i, mut stream) in watchers {
        let event = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .unwrap_or_else(|_| panic!("broker{i}'s watcher saw nothing"))
            .expect("stream")
            .expect("an event");
        assert_eq!(event.event, "MakeDatabaseInaccessible", "broker{i}");
    }
    let new_holder = (0..3).find(|i| *i != victim && procs[*i].holds_sweeper_lease());
    println!("the sweeper's lease moved to broker{new_holder:?}");
    assert!(new_holder.is_some(), "the lease did not move to a survivor");

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for (i, task) in load {
        let (ok, failed, errors) = task.await.expect("load task");
        println!("broker{i}: {ok} wrap+unwrap pairs, {failed} failed");
        if i != victim {
            assert!(ok > 0, "broker{i} served nothing");
            assert!(errors.is_empty(), "survivor broker{i} failed calls: {errors:?}");
        }
    }
    let _ = &mut v;
}

/// `kubectl kustomize deploy/k8s-postgres`, as JSON documents (parsed by PyYAML).
fn rendered_overlay() -> (tempfile::TempDir, std::path::PathBuf, Vec<serde_json::Value>) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = common::run_tool(
        "kubectl",
        &["kustomize", &root.join("deploy/k8s-postgres").display().to_string()],
        "install kubectl (it renders the kustomize overlay): https://kubernetes.io/docs/tasks/tools/",
    );
    assert!(out.status.success(), "kubectl kustomize failed: {}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().expect("tempdir");
    let rendered = dir.path().join("k8s-postgres.yaml");
    std::fs::write(&rendered, &out.stdout).expect("write the rendered overlay");
    let python = common::python::python_venv(
        "pyenv-deploy",
        &["kubernetes-validate==1.37.0", "PyYAML>=6,<7"],
        "yaml, kubernetes_validate",
    );
    let script =
        "import json, sys, yaml\nprint(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))";
    let parsed =
        common::python::python_command(&python).args(["-c", script]).arg(&rendered).output().expect("python");
    assert!(parsed.status.success(), "{}", String::from_utf8_lossy(&parsed.stderr));
    (dir, rendered, serde_json::from_slice(&parsed.stdout).expect("json"))
}

#[test]
fn the_kubernetes_overlay_runs_three_replicas_on_postgres_ready_only_while_caught_up() {
    let (_dir, rendered, docs) = rendered_overlay();
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap_or_else(|| panic!("no {k}"));
    assert!(docs.iter().all(|d| d["kind"] != "PersistentVolumeClaim"), "a shared volume is left");
    let deployment = kind("Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(kind("PodDisruptionBudget")["spec"]["minAvailable"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let store = container["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "TDE_BROKER_STORE"))
        .expect("TDE_BROKER_STORE");
    assert_eq!(store["valueFrom"]["secretKeyRef"]["name"], "tde-broker-store");
    let data = pod["volumes"].as_array().and_then(|v| v.iter().find(|v| v["name"] == "data")).expect("data");
    assert!(data.get("emptyDir").is_some() && data.get("persistentVolumeClaim").is_none(), "{data}");
    let egress = &kind("NetworkPolicy")["spec"]["egress"];
    assert!(egress.to_string().contains("5432"), "no egress to PostgreSQL: {egress}");
    // The broker's own command line accepts the container's arguments.
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string").to_string())
        .collect();
    use clap::Parser as _;
    let cli = tde_broker::cli::Cli::try_parse_from(std::iter::once("tde-broker".to_string()).chain(args));
    assert!(cli.is_ok(), "{:?}", cli.err());
    // And the API schemas accept every resource.
    let python = common::python::python_venv(
        "pyenv-deploy",
        &["kubernetes-validate==1.37.0", "PyYAML>=6,<7"],
        "yaml, kubernetes_validate",
    );
    let out = common::python::python_command(python.with_file_name("kubernetes-validate"))
        .args(["--strict", "-k", "1.30.0", "-k", "1.37.0"])
        .arg(&rendered)
        .output()
        .expect("kubernetes-validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubernetes-validate failed:\n{stdout}");
    assert!(stdout.lines().all(|l| l.starts_with("INFO ")), "kubernetes-validate complained:\n{stdout}");
    let passed = stdout.lines().filter(|l| l.contains(" passed for resource ")).count();
    assert_eq!(passed, docs.len() * 2, "not every resource was validated:\n{stdout}");
}

/// One step of the two-broker model run: a policy change or an unwrap, on broker 0 or 1.
#[derive(Clone, Debug)]
enum Step {
    /// Principal `who` gets `unwrap` (and always wrapKey) or loses every permission.
    SetPolicy { on: usize, who: usize, unwrap: bool },
    /// Principal `who` unwraps the DEK.
    Unwrap { on: usize, who: usize },
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        (0..2usize, 0..3usize, any::<bool>()).prop_map(|(on, who, unwrap)| Step::SetPolicy {
            on,
            who,
            unwrap
        }),
        (0..2usize, 0..3usize).prop_map(|(on, who)| Step::Unwrap { on, who }),
    ]
}

/// Runs `steps` against two brokers on one PostgreSQL with operations spread across them and
/// a model of the access policies: every answer equals the model's once the broker caught up,
/// and the time until it did is returned (the divergence the staleness bound allows).
async fn two_broker_run(db: &PgDatabase, steps: &[Step]) -> Vec<Duration> {
    let (b, _dirs) = brokers(db, 2).await;
    b[0].vault("modelkv", false).await;
    let key = kid(&b[0].key("modelkv", "k", "RSA", 2048).await);
    let wrapped = b[0]
        .kv()
        .wrap_key(crypto_req(&key, "RSA-OAEP-256", &[8; 32]))
        .await
        .expect("wrap")
        .into_inner()
        .value;
    let mut users = Vec::new();
    for i in 0..3 {
        users.push(b[0].user(&format!("model-{i}")).await);
    }
    let mut allowed = [false; 3];
    let mut divergences = Vec::new();
    for s in steps {
        match *s {
            Step::SetPolicy { on, who, unwrap } => {
                let perms: &[&str] = if unwrap { &["wrapKey", "unwrapKey"] } else { &[] };
                retried(Duration::from_secs(60), || {
                    let mut v = b[on].vaults();
                    let req = proto::SetAccessPolicyRequest {
                        vault_name: "modelkv".into(),
                        object_id: users[who].object_id.clone(),
                        key_permissions: perms.iter().map(|p| p.to_string()).collect(),
                    };
                    async move { v.set_access_policy(req).await }
                })
                .await
                .expect("policy");
                allowed[who] = unwrap;
            }
            Step::Unwrap { on, who } => {
                let started = Instant::now();
                loop {
                    let r = b[on]
                        .kv_with(bearer(&users[who].token))
                        .unwrap_key(unwrap_req(&key, "RSA-OAEP-256", &wrapped))
                        .await;
                    let agrees = match &r {
                        Ok(v) => allowed[who] && v.get_ref().value == [8; 32],
                        Err(s) => !allowed[who] && s.code() == Code::PermissionDenied,
                    };
                    if agrees {
                        break;
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "broker {on} never agreed with the model for user {who}: {r:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                divergences.push(started.elapsed());
            }
        }
    }
    for broker in b {
        broker.stop().await;
    }
    divergences
}

#[test]
fn two_brokers_agree_with_the_model_of_access_policies_once_caught_up() {
    use proptest::prelude::*;
    let server = PgServer::shared();
    let all = std::sync::Mutex::new(Vec::new());
    let config = ProptestConfig {
        cases: 4,
        max_shrink_iters: 8,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest::test_runner::TestRunner::new(config)
        .run(&proptest::collection::vec(step(), 1..30), |steps| {
            let db = server.create_database();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let d = rt.block_on(two_broker_run(&db, &steps));
            all.lock().expect("lock").extend(d);
            Ok(())
        })
        .expect("the brokers agree with the model");
    let mut d = all.into_inner().expect("lock");
    d.sort();
    if let Some(max) = d.last() {
        println!(
            "{} reads: time until the answer equals the model's: p50 {:?}, p99 {:?}, max {max:?}",
            d.len(),
            percentile(&d, 0.5),
            percentile(&d, 0.99)
        );
    }
}
