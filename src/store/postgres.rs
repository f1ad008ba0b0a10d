//! The shared store: PostgreSQL, for several brokers that serve the same state. Documents are
//! JSON in `text` columns, sealed key material `bytea`, in tables that mirror the SQLite store's;
//! beside them the change feed (`feed_head`, `change_log`), the leases (`leases`) and the applied
//! migrations (`schema_migrations`).
//!
//! # Commits and the change feed
//! Every commit ([`Store::commit`], [`ChangeFeed::commit_after`]) is one transaction that locks
//! the single row of `feed_head`, writes the tables, appends the batch to `change_log` under the
//! next sequence number, moves `feed_head` to it and `NOTIFY`s [`FEED_CHANNEL`] with the number.
//! The row lock serialises commits, so sequence numbers are gap-free and in commit order, and a
//! rolled-back commit leaves neither a row nor a gap. Old batches are pruned
//! ([`PostgresStore::prune_feed`]); a follower whose position was pruned gets
//! [`StoreError::FeedPruned`] and must reload the whole store.
//!
//! # Blocking
//! [`Store`] and [`ChangeFeed`] are blocking. The store owns a small tokio runtime of its own (one
//! worker thread) that drives the driver's connections; every method runs its work there and
//! waits for the answer, so it may be called from any thread: tokio's blocking pool, a plain
//! thread, or (as the SQLite store is) briefly from an async task at start-up.

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, IsolationLevel, NoTls};

use super::{ChangeFeed, FeedEntry, Rejection, Snapshot, Store, StoreError, StoredKey, StoredRotationPolicy};
use crate::model::ids::key_index;
use crate::model::{Change, KeyVersion};

/// The channel every commit `NOTIFY`s with its sequence number.
pub const FEED_CHANNEL: &str = "tde_broker_feed";

/// Connections in the pool of one store (besides the change feed's listening connection).
pub const POOL_SIZE: usize = 8;

/// How long an operation waits for a connection (from the pool, or a new one) before the store
/// reports [`StoreError::Unavailable`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a commit waits for another broker's commit to finish (the feed's row lock).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the server lets a session sit idle inside a transaction before it ends it.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Batches of the change feed kept at least: the newest this many, and every batch younger than
/// [`FEED_KEEP_FOR`].
pub const FEED_KEEP_ROWS: u64 = 10_000;
/// See [`FEED_KEEP_ROWS`].
pub const FEED_KEEP_FOR: Duration = Duration::from_secs(24 * 60 * 60);
/// A commit whose sequence number is a multiple of this prunes the feed.
const PRUNE_EVERY: i64 = 500;

/// The advisory lock key under which one broker at a time migrates the schema.
const MIGRATION_LOCK: i64 = 0x7464_655f_6272_6b01;

/// The advisory lock key under which one broker at a time starts up
/// ([`PostgresStore::start_up_lock`]).
const START_UP_LOCK: i64 = 0x7464_655f_6272_6b02;

/// Held while a broker starts up on a shared database ([`PostgresStore::start_up_lock`]).
pub struct StartUpLock {
    _client: tokio_postgres::Client,
}

/// The newest schema this broker knows; a database migrated further is refused
/// ([`StoreError::Schema`]).
pub const SCHEMA_VERSION: i64 = 1;

/// The migrations, in order: version and SQL. Each runs once, in the transaction that records it
/// in `schema_migrations`, under the advisory lock.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "
CREATE TABLE meta (k text PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE vaults (name text PRIMARY KEY, doc text NOT NULL);
CREATE TABLE vault_deletions (name text PRIMARY KEY, doc text NOT NULL);
CREATE TABLE keys (
    vault text NOT NULL, idx text NOT NULL, name text NOT NULL, deleted text,
    PRIMARY KEY (vault, idx));
CREATE TABLE key_versions (
    vault text NOT NULL, idx text NOT NULL, version text NOT NULL, seq bigserial NOT NULL,
    doc text NOT NULL, sealed bytea NOT NULL,
    PRIMARY KEY (vault, idx, version));
CREATE TABLE principals (object_id text PRIMARY KEY, doc text NOT NULL);
CREATE TABLE role_assignments (id text PRIMARY KEY, doc text NOT NULL);
CREATE TABLE servers (id text PRIMARY KEY, doc text NOT NULL);
CREATE TABLE subnets (id text PRIMARY KEY, doc text NOT NULL);
CREATE TABLE databases (
    server_id text NOT NULL, name text NOT NULL, doc text NOT NULL, PRIMARY KEY (server_id, name));
CREATE TABLE key_rotation_policies (
    vault text NOT NULL, idx text NOT NULL, name text NOT NULL, doc text NOT NULL,
    PRIMARY KEY (vault, idx));
CREATE TABLE feed_head (id int PRIMARY KEY CHECK (id = 1), seq bigint NOT NULL);
INSERT INTO feed_head (id, seq) VALUES (1, 0);
CREATE TABLE change_log (
    seq bigint PRIMARY KEY, origin text NOT NULL, changes text NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE leases (name text PRIMARY KEY, holder text NOT NULL, expires_at timestamptz NOT NULL);
",
)];

/// A `postgres://` (or `postgresql://`) URL checked and parsed; its [`Display`](std::fmt::Display)
/// never shows the password.
#[derive(Clone)]
pub struct PostgresUrl {
    url: String,
    config: tokio_postgres::Config,
}

/// Why a store URL is refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid PostgreSQL URL ({0}): expected postgres://user[:password]@host[:port]/database")]
pub struct InvalidUrl(String);

impl FromStr for PostgresUrl {
    type Err = InvalidUrl;

    fn from_str(url: &str) -> Result<Self, InvalidUrl> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(InvalidUrl("it does not start with postgres://".into()));
        }
        // The driver's own message may quote the URL, password included: not repeated.
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|_| InvalidUrl("the driver cannot parse it".into()))?;
        if config.get_hosts().is_empty() {
            return Err(InvalidUrl("it names no host".into()));
        }
        if config.get_user().is_none_or(str::is_empty) {
            return Err(InvalidUrl("it names no user".into()));
        }
        if config.get_dbname().is_none_or(str::is_empty) {
            return Err(InvalidUrl("it names no database".into()));
        }
        Ok(PostgresUrl { url: url.to_string(), config })
    }
}

impl PostgresUrl {
    /// The URL as given (password included: for connecting, never for logs).
    pub fn expose(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Display for PostgresUrl {
    /// `postgres://user@host:port/database`, without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        write!(f, "postgres://{}@", c.get_user().unwrap_or_default())?;
        let ports = c.get_ports();
        for (i, host) in c.get_hosts().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match host {
                tokio_postgres::config::Host::Tcp(h) => f.write_str(h)?,
                tokio_postgres::config::Host::Unix(p) => write!(f, "[{}]", p.display())?,
            }
            if let Some(port) = ports.get(i).or(ports.first()) {
                write!(f, ":{port}")?;
            }
        }
        write!(f, "/{}", c.get_dbname().unwrap_or_default())
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresUrl({self})")
    }
}

impl PartialEq for PostgresUrl {
    fn eq(&self, other: &Self) -> bool {
        self.url == other.url
    }
}

impl Eq for PostgresUrl {}

/// PostgreSQL-backed [`Store`] with a [`ChangeFeed`]. Several stores (brokers) may share one
/// database.
pub struct PostgresStore {
    /// The runtime that drives the connections; `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    pg: tokio_postgres::Config,
    /// The origin of the batches [`Store::commit`] writes.
    origin: String,
    listener: Arc<Listener>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Without waiting: a store may be dropped on an async task, where a runtime must not
        // block. The connections close as their tasks are dropped.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The change feed's listening connection and what it heard.
#[derive(Default)]
struct Listener {
    state: Mutex<ListenState>,
    heard: Condvar,
}

#[derive(Default)]
struct ListenState {
    /// The generation of the live connection, if one is live.
    live: Option<u64>,
    /// The last generation made.
    generation: u64,
    /// A notification (or a reconnection) not yet reported by a wait.
    pending: bool,
    /// Why the last live connection was lost, not yet reported by a wait.
    lost: Option<String>,
    /// The live connection's client (dropping it closes the connection).
    client: Option<tokio_postgres::Client>,
}

impl Listener {
    fn lock(&self) -> MutexGuard<'_, ListenState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notified(&self, generation: u64) {
        let mut st = self.lock();
        if st.live == Some(generation) {
            st.pending = true;
            self.heard.notify_all();
        }
    }

    fn lose(&self, generation: u64, why: String) {
        let mut st = self.lock();
        if st.live == Some(generation) {
            tracing::warn!(reason = %why, "the change feed's listening connection was lost");
            st.live = None;
            st.client = None;
            st.lost = Some(why);
            self.heard.notify_all();
        }
    }
}

/// Maps a driver error: no answer from the server (refused, reset, closed, timed out, shutting
/// down, too many connections) and a lock not granted within [`LOCK_TIMEOUT`] are
/// [`StoreError::Unavailable`]; anything else the server answered is [`StoreError::Postgres`]
/// (with its SQLSTATE). Commits neither deadlock nor fail to serialise (the feed's row lock
/// orders them) and meet no unique violation (a duplicate is found with `ON CONFLICT` and
/// refused as [`StoreError::Rejected`]): such an error is a bug, reported as `Postgres`.
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let unavailable = match e.code() {
        None => e.as_db_error().is_none(),
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::LOCK_NOT_AVAILABLE
        }
    };
    if unavailable { StoreError::Unavailable(e.to_string()) } else { StoreError::Postgres(e) }
}

fn pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_err(e),
        PoolError::Timeout(_) => StoreError::Unavailable(format!(
            "no connection to PostgreSQL within {} s",
            CONNECT_TIMEOUT.as_secs()
        )),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn to_doc<T: Serialize>(value: &T, table: &'static str) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|source| StoreError::Corrupt { table, source })
}

fn from_doc<T: DeserializeOwned>(doc: &str, table: &'static str) -> Result<T, StoreError> {
    serde_json::from_str(doc).map_err(|source| StoreError::Corrupt { table, source })
}

fn to_seq(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_seq(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl PostgresStore {
    /// Connects to the database `url` names, applies the migrations it lacks (one broker at a
    /// time, under an advisory lock) and returns the store. A database migrated by a newer broker
    /// is refused with [`StoreError::Schema`]; an unreachable server is
    /// [`StoreError::Unavailable`].
    pub fn open(url: &PostgresUrl) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tde-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot start the PostgreSQL runtime: {e}")))?;
        let mut pg = url.config.clone();
        pg.connect_timeout(CONNECT_TIMEOUT);
        pg.application_name("tde-broker");
        // A server (or a network) that vanished without closing the connection is noticed
        // within about half a minute, by the listening connection too.
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(15));
        pg.keepalives_interval(Duration::from_secs(5));
        pg.keepalives_retries(3);
        // A commit waits for the feed's row lock at most LOCK_TIMEOUT (then it is unavailable,
        // not hung), and a session that stalls inside a transaction (a broker cut off mid-write)
        // is ended by the server, which lets go of that lock.
        if url.config.get_options().is_none() {
            pg.options(format!(
                "-c lock_timeout={} -c idle_in_transaction_session_timeout={}",
                LOCK_TIMEOUT.as_millis(),
                IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
            ));
        }
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot make the connection pool: {e}")))?;
        let store = PostgresStore {
            rt: Some(rt),
            pool,
            pg,
            origin: uuid::Uuid::new_v4().to_string(),
            listener: Arc::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// The origin the batches of [`Store::commit`] carry in the feed: an id of this store
    /// instance, new at each open.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Runs `work` on the store's runtime and waits for its result.
    fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let Some(rt) = &self.rt else {
            return Err(StoreError::Unavailable("the store is closing".into()));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(work.await);
        });
        rx.recv().map_err(|_| StoreError::Unavailable("the store's runtime stopped".into()))?
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let pool = self.pool.clone();
        self.run(async move {
            let mut client = pool.get().await.map_err(pool_err)?;
            let tx = client.transaction().await.map_err(pg_err)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg_err)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version bigint PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(pg_err)?;
            let current: i64 = tx
                .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
                .await
                .map_err(pg_err)?
                .get(0);
            if current > SCHEMA_VERSION {
                return Err(StoreError::Schema(current));
            }
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
                tx.batch_execute(sql).await.map_err(pg_err)?;
                tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[version])
                    .await
                    .map_err(pg_err)?;
                tracing::info!(to = version, "PostgreSQL store schema migrated");
            }
            tx.commit().await.map_err(pg_err)
        })
    }

    /// Whether the database holds nothing but the store's own bookkeeping: no record, no meta
    /// value but the store id, nothing in the feed.
    pub fn is_blank(&self) -> Result<bool, StoreError> {
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await.map_err(pool_err)?;
            let mut sql = String::from(
                "SELECT NOT EXISTS (SELECT 1 FROM meta WHERE k <> $1) AND (SELECT seq FROM feed_head) = 0",
            );
            for table in super::RECORD_TABLES {
                sql.push_str(&format!(" AND NOT EXISTS (SELECT 1 FROM {table})"));
            }
            let row = client.query_one(&sql, &[&super::datadir::META_STORE_ID]).await.map_err(pg_err)?;
            Ok(row.get(0))
        })
    }

    /// Records `value` under `key` unless a value is there already, and returns the value stored
    /// (atomic: of several brokers doing this at once, one value wins and all see it).
    pub fn put_meta_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let (pool, key, value) = (self.pool.clone(), key.to_string(), value.to_vec());
        self.run(async move {
            let client = pool.get().await.map_err(pool_err)?;
            client
                .execute(
                    "INSERT INTO meta (k, v) VALUES ($1, $2) ON CONFLICT (k) DO NOTHING",
                    &[&key, &value],
                )
                .await
                .map_err(pg_err)?;
            let row = client.query_one("SELECT v FROM meta WHERE k = $1", &[&key]).await.map_err(pg_err)?;
            Ok(row.get(0))
        })
    }

    /// Removes the feed's batches that are neither among the newest `keep_rows` nor younger than
    /// `keep_for`; returns how many. Commits do this now and then with [`FEED_KEEP_ROWS`] and
    /// [`FEED_KEEP_FOR`].
    pub fn prune_feed(&self, keep_rows: u64, keep_for: Duration) -> Result<u64, StoreError> {
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await.map_err(pool_err)?;
            prune(&**client, keep_rows, keep_for).await
        })
    }

    /// Commits `changes` as one batch of the feed; with `expected`, only if the head is still it.
    fn write(&self, expected: Option<u64>, origin: &str, changes: &[Change]) -> Result<u64, StoreError> {
        let json = serde_json::to_string(changes)
            .map_err(|source| StoreError::Corrupt { table: "change_log", source })?;
        let (pool, origin, changes) = (self.pool.clone(), origin.to_string(), changes.to_vec());
        self.run(async move {
            let mut client = pool.get().await.map_err(pool_err)?;
            let tx = client.transaction().await.map_err(pg_err)?;
            // The row lock serialises commits: it is held until this transaction ends.
            let lock_head = tx
                .prepare_cached("SELECT seq FROM feed_head WHERE id = 1 FOR UPDATE")
                .await
                .map_err(pg_err)?;
            let head: i64 = tx.query_one(&lock_head, &[]).await.map_err(pg_err)?.get(0);
            if let Some(expected) = expected
                && from_seq(head) != expected
            {
                // Dropping the transaction rolls it back.
                return Err(StoreError::Conflict { head: from_seq(head), expected });
            }
            for change in &changes {
                apply(&tx, change).await?;
            }
            let seq = head + 1;
            // The batch, the new head and the notification (sent at commit), in one round trip.
            exec(
                &tx,
                "WITH logged AS (INSERT INTO change_log (seq, origin, changes) VALUES ($1, $2, $3)),
                      moved AS (UPDATE feed_head SET seq = $1 WHERE id = 1)
                 SELECT pg_notify($4, $5)",
                &[&seq, &origin, &json, &FEED_CHANNEL, &seq.to_string()],
            )
            .await?;
            if seq % PRUNE_EVERY == 0 {
                prune(&*tx, FEED_KEEP_ROWS, FEED_KEEP_FOR).await?;
            }
            tx.commit().await.map_err(pg_err)?;
            Ok(from_seq(seq))
        })
    }

    /// Waits until no other broker starts up on this database and holds that until the returned
    /// lock is dropped: brokers that start at once on a new database make its bootstrap values
    /// (master-key check, token signing key, bootstrap admin) once, and every later one reads
    /// them. A session advisory lock on a connection of its own, which closes when the lock is
    /// dropped (so a broker that dies lets go of it too).
    pub fn start_up_lock(&self) -> Result<StartUpLock, StoreError> {
        let pg = self.pg.clone();
        let client = self.run(async move {
            let (client, conn) = pg.connect(NoTls).await.map_err(pg_err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            // However long the broker before this one takes to start up.
            client.batch_execute("SET lock_timeout = 0").await.map_err(pg_err)?;
            client.execute("SELECT pg_advisory_lock($1)", &[&START_UP_LOCK]).await.map_err(pg_err)?;
            Ok(client)
        })?;
        Ok(StartUpLock { _client: client })
    }

    /// Opens the listening connection (a new generation) and `LISTEN`s on [`FEED_CHANNEL`].
    fn listen(&self) -> Result<(), StoreError> {
        let generation = {
            let mut st = self.listener.lock();
            st.generation += 1;
            st.generation
        };
        let (pg, listener) = (self.pg.clone(), self.listener.clone());
        let client = self.run(async move {
            let (client, mut conn) = pg.connect(NoTls).await.map_err(pg_err)?;
            {
                let mut st = listener.lock();
                st.live = Some(generation);
                st.lost = None;
                // Batches may have been committed while nobody listened: report a wake-up.
                st.pending = true;
            }
            let driver = listener.clone();
            tokio::spawn(async move {
                loop {
                    match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(_))) => driver.notified(generation),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break driver.lose(generation, e.to_string()),
                        None => break driver.lose(generation, "the server closed the connection".into()),
                    }
                }
            });
            if let Err(e) = client.batch_execute(&format!("LISTEN {FEED_CHANNEL}")).await {
                listener.lose(generation, e.to_string());
                return Err(pg_err(e));
            }
            Ok(client)
        })?;
        let mut st = self.listener.lock();
        if st.live == Some(generation) {
            st.client = Some(client);
        }
        Ok(())
    }
}

/// Deletes the batches of the feed that are neither among the newest `keep_rows` nor younger
/// than `keep_for`.
async fn prune<C: tokio_postgres::GenericClient>(
    client: &C,
    keep_rows: u64,
    keep_for: Duration,
) -> Result<u64, StoreError> {
    let (keep_rows, secs) = (to_seq(keep_rows), keep_for.as_secs_f64());
    client
        .execute(
            "DELETE FROM change_log
             WHERE seq <= (SELECT seq FROM feed_head WHERE id = 1) - $1
               AND committed_at < now() - make_interval(secs => $2)",
            &[&keep_rows, &secs],
        )
        .await
        .map_err(pg_err)
}

/// Runs one statement of a commit; returns the rows it touched.
async fn exec(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, StoreError> {
    // Prepared once per connection (the pool keeps each connection's statements).
    let statement = tx.prepare_cached(sql).await.map_err(pg_err)?;
    tx.execute(&statement, params).await.map_err(pg_err)
}

/// Writes one change inside the commit's transaction.
async fn apply(tx: &deadpool_postgres::Transaction<'_>, change: &Change) -> Result<(), StoreError> {
    match change {
        Change::PutVault(v) => {
            exec(
                tx,
                "INSERT INTO vaults (name, doc) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET doc = excluded.doc",
                &[&v.name, &to_doc(v, "vaults")?],
            )
            .await?;
        }
        Change::DeleteVault { vault } => {
            for sql in [
                "DELETE FROM key_versions WHERE vault = $1",
                "DELETE FROM keys WHERE vault = $1",
                "DELETE FROM vault_deletions WHERE name = $1",
                "DELETE FROM key_rotation_policies WHERE vault = $1",
                "DELETE FROM vaults WHERE name = $1",
            ] {
                exec(tx, sql, &[vault]).await?;
            }
        }
        Change::SetVaultDeletion { vault, deleted } => match deleted {
            Some(d) => {
                exec(
                    tx,
                    "INSERT INTO vault_deletions (name, doc)
                     SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM vaults WHERE name = $1)
                     ON CONFLICT (name) DO UPDATE SET doc = excluded.doc",
                    &[vault, &to_doc(d, "vault_deletions")?],
                )
                .await?;
            }
            None => {
                exec(tx, "DELETE FROM vault_deletions WHERE name = $1", &[vault]).await?;
            }
        },
        Change::PutKeyVersion { vault, name, version, sealed } => {
            let idx = key_index(name);
            let doc = to_doc(version, "key_versions")?;
            match sealed {
                Some(sealed) => {
                    exec(
                        tx,
                        "INSERT INTO keys (vault, idx, name, deleted) VALUES ($1, $2, $3, NULL)
                         ON CONFLICT (vault, idx) DO NOTHING",
                        &[vault, &idx, name],
                    )
                    .await?;
                    let n = exec(
                        tx,
                        "INSERT INTO key_versions (vault, idx, version, doc, sealed) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (vault, idx, version) DO NOTHING",
                        &[vault, &idx, &version.version, &doc, sealed],
                    )
                    .await?;
                    if n != 1 {
                        return Err(Rejection::key_version(vault, name, version, true).into());
                    }
                }
                None => {
                    let n = exec(
                        tx,
                        "UPDATE key_versions SET doc = $4 WHERE vault = $1 AND idx = $2 AND version = $3",
                        &[vault, &idx, &version.version, &doc],
                    )
                    .await?;
                    if n != 1 {
                        return Err(Rejection::key_version(vault, name, version, false).into());
                    }
                }
            }
        }
        Change::SetKeyDeletion { vault, name, deleted } => {
            let doc = deleted.as_ref().map(|d| to_doc(d, "keys")).transpose()?;
            exec(
                tx,
                "UPDATE keys SET deleted = $3 WHERE vault = $1 AND idx = $2",
                &[vault, &key_index(name), &doc],
            )
            .await?;
        }
        Change::PurgeKey { vault, name } => {
            let idx = key_index(name);
            for sql in [
                "DELETE FROM key_versions WHERE vault = $1 AND idx = $2",
                "DELETE FROM keys WHERE vault = $1 AND idx = $2",
                "DELETE FROM key_rotation_policies WHERE vault = $1 AND idx = $2",
            ] {
                exec(tx, sql, &[vault, &idx]).await?;
            }
        }
        Change::PutPrincipal(p) => {
            exec(
                tx,
                "INSERT INTO principals (object_id, doc) VALUES ($1, $2)
                 ON CONFLICT (object_id) DO UPDATE SET doc = excluded.doc",
                &[&p.object_id, &to_doc(p, "principals")?],
            )
            .await?;
        }
        Change::PutSubnet(sn) => {
            exec(
                tx,
                "INSERT INTO subnets (id, doc) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
                &[&sn.id.to_ascii_lowercase(), &to_doc(sn, "subnets")?],
            )
            .await?;
        }
        Change::PutServer(srv) => {
            exec(
                tx,
                "INSERT INTO servers (id, doc) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
                &[&srv.id.to_ascii_lowercase(), &to_doc(srv, "servers")?],
            )
            .await?;
        }
        Change::DeleteServer { id } => {
            let id = id.to_ascii_lowercase();
            exec(tx, "DELETE FROM databases WHERE server_id = $1", &[&id]).await?;
            exec(tx, "DELETE FROM servers WHERE id = $1", &[&id]).await?;
        }
        Change::PutDatabase(db) => {
            exec(
                tx,
                "INSERT INTO databases (server_id, name, doc) VALUES ($1, $2, $3)
                 ON CONFLICT (server_id, name) DO UPDATE SET doc = excluded.doc",
                &[
                    &db.server_id.to_ascii_lowercase(),
                    &db.name.to_ascii_lowercase(),
                    &to_doc(db, "databases")?,
                ],
            )
            .await?;
        }
        Change::DeleteDatabase { server_id, name } => {
            exec(
                tx,
                "DELETE FROM databases WHERE server_id = $1 AND name = $2",
                &[&server_id.to_ascii_lowercase(), &name.to_ascii_lowercase()],
            )
            .await?;
        }
        Change::DeletePrincipal { object_id } => {
            exec(tx, "DELETE FROM principals WHERE object_id = $1", &[object_id]).await?;
        }
        Change::PutRoleAssignment(a) => {
            exec(
                tx,
                "INSERT INTO role_assignments (id, doc) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
                &[&a.id, &to_doc(a, "role_assignments")?],
            )
            .await?;
        }
        Change::DeleteRoleAssignment { id } => {
            exec(tx, "DELETE FROM role_assignments WHERE id = $1", &[id]).await?;
        }
        Change::PutKeyRotationPolicy { vault, name, policy } => {
            exec(
                tx,
                "INSERT INTO key_rotation_policies (vault, idx, name, doc) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (vault, idx) DO UPDATE SET name = excluded.name, doc = excluded.doc",
                &[vault, &key_index(name), name, &to_doc(policy, "key_rotation_policies")?],
            )
            .await?;
        }
        Change::SetManualClock { now } => {
            exec(
                tx,
                "INSERT INTO meta (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                &[&super::META_MANUAL_CLOCK, &now.to_string().into_bytes()],
            )
            .await?;
        }
    }
    Ok(())
}

/// Reads every document of one query (its first column).
async fn docs<T: DeserializeOwned>(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    table: &'static str,
) -> Result<Vec<T>, StoreError> {
    let rows = tx.query(sql, &[]).await.map_err(pg_err)?;
    rows.iter().map(|r| from_doc(r.get::<_, &str>(0), table)).collect()
}

/// A key's versions with their sealed material, oldest first.
type Versions = Vec<(KeyVersion, Vec<u8>)>;

/// Reads the whole store, and the feed's head it is consistent with, in one snapshot.
async fn load_at_head(pool: Pool) -> Result<(Snapshot, u64), StoreError> {
    let mut client = pool.get().await.map_err(pool_err)?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_err)?;
    let head: i64 = tx.query_one("SELECT seq FROM feed_head WHERE id = 1", &[]).await.map_err(pg_err)?.get(0);
    // Text sorts by its bytes (COLLATE "C"), as SQLite's does, whatever the database's locale.
    let vaults = docs(&tx, r#"SELECT doc FROM vaults ORDER BY name COLLATE "C""#, "vaults").await?;
    let vault_deletions = tx
        .query(r#"SELECT name, doc FROM vault_deletions ORDER BY name COLLATE "C""#, &[])
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| Ok((r.get::<_, String>(0), from_doc(r.get::<_, &str>(1), "vault_deletions")?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let principals = docs(&tx, "SELECT doc FROM principals", "principals").await?;
    let role_assignments = docs(&tx, "SELECT doc FROM role_assignments", "role_assignments").await?;
    let servers = docs(&tx, r#"SELECT doc FROM servers ORDER BY id COLLATE "C""#, "servers").await?;
    let subnets = docs(&tx, r#"SELECT doc FROM subnets ORDER BY id COLLATE "C""#, "subnets").await?;
    let databases = docs(
        &tx,
        r#"SELECT doc FROM databases ORDER BY server_id COLLATE "C", name COLLATE "C""#,
        "databases",
    )
    .await?;
    let mut versions: HashMap<(String, String), Versions> = HashMap::new();
    for r in tx
        .query("SELECT vault, idx, doc, sealed FROM key_versions ORDER BY seq", &[])
        .await
        .map_err(pg_err)?
    {
        let version = from_doc::<KeyVersion>(r.get::<_, &str>(2), "key_versions")?;
        versions.entry((r.get(0), r.get(1))).or_default().push((version, r.get(3)));
    }
    let mut keys = Vec::new();
    for r in tx
        .query(
            r#"SELECT vault, idx, name, deleted FROM keys ORDER BY vault COLLATE "C", idx COLLATE "C""#,
            &[],
        )
        .await
        .map_err(pg_err)?
    {
        let (vault, idx): (String, String) = (r.get(0), r.get(1));
        let deleted = r.get::<_, Option<&str>>(3).map(|d| from_doc(d, "keys")).transpose()?;
        let versions = versions.remove(&(vault.clone(), idx)).unwrap_or_default();
        keys.push(StoredKey { vault, name: r.get(2), deleted, versions });
    }
    let rotation_policies = tx
        .query(
            r#"SELECT vault, name, doc FROM key_rotation_policies ORDER BY vault COLLATE "C", idx COLLATE "C""#,
            &[],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| {
            Ok(StoredRotationPolicy {
                vault: r.get(0),
                name: r.get(1),
                policy: from_doc(r.get::<_, &str>(2), "key_rotation_policies")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    tx.commit().await.map_err(pg_err)?;
    let snapshot = Snapshot {
        vaults,
        vault_deletions,
        keys,
        principals,
        role_assignments,
        subnets,
        servers,
        databases,
        rotation_policies,
    };
    Ok((snapshot, from_seq(head)))
}

impl Store for PostgresStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.load_at_head().map(|(snapshot, _)| snapshot)
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        self.write(None, &self.origin, changes).map(|_| ())
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (pool, key) = (self.pool.clone(), key.to_string());
        self.run(async move {
            let client = pool.get().await.map_err(pool_err)?;
            let row = client.query_opt("SELECT v FROM meta WHERE k = $1", &[&key]).await.map_err(pg_err)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (pool, key, value) = (self.pool.clone(), key.to_string(), value.to_vec());
        self.run(async move {
            let client = pool.get().await.map_err(pool_err)?;
            client
                .execute(
                    "INSERT INTO meta (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                    &[&key, &value],
                )
                .await
                .map_err(pg_err)?;
            Ok(())
        })
    }

    fn feed(&self) -> Option<&dyn ChangeFeed> {
        Some(self)
    }
}

impl ChangeFeed for PostgresStore {
    fn head(&self) -> Result<u64, StoreError> {
        let pool = self.pool.clone();
        self.run(async move {
            let client = pool.get().await.map_err(pool_err)?;
            let row =
                client.query_one("SELECT seq FROM feed_head WHERE id = 1", &[]).await.map_err(pg_err)?;
            Ok(from_seq(row.get(0)))
        })
    }

    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, StoreError> {
        let pool = self.pool.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(async move {
            let mut client = pool.get().await.map_err(pool_err)?;
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg_err)?;
            let rows = tx
                .query(
                    "SELECT seq, origin, changes FROM change_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&to_seq(after), &limit],
                )
                .await
                .map_err(pg_err)?;
            let first = rows.first().map(|r| from_seq(r.get(0)));
            let missing = match first {
                Some(first) => first != after + 1,
                None => {
                    let head: i64 = tx
                        .query_one("SELECT seq FROM feed_head WHERE id = 1", &[])
                        .await
                        .map_err(pg_err)?
                        .get(0);
                    from_seq(head) > after && limit > 0
                }
            };
            if missing {
                let oldest: Option<i64> =
                    tx.query_one("SELECT MIN(seq) FROM change_log", &[]).await.map_err(pg_err)?.get(0);
                return Err(StoreError::FeedPruned { after, oldest: oldest.map(from_seq) });
            }
            tx.commit().await.map_err(pg_err)?;
            rows.iter()
                .map(|r| {
                    Ok(FeedEntry {
                        seq: from_seq(r.get(0)),
                        origin: r.get(1),
                        changes: from_doc(r.get::<_, &str>(2), "change_log")?,
                    })
                })
                .collect()
        })
    }

    fn wait(&self, timeout: Duration) -> Result<bool, StoreError> {
        let deadline = Instant::now() + timeout;
        {
            let mut st = self.listener.lock();
            if st.live.is_none() {
                if let Some(lost) = st.lost.take() {
                    return Err(StoreError::Unavailable(format!(
                        "the change feed's connection was lost: {lost}"
                    )));
                }
                drop(st);
                self.listen()?;
            }
        }
        let mut st = self.listener.lock();
        loop {
            if st.pending {
                st.pending = false;
                return Ok(true);
            }
            if st.live.is_none() {
                let lost = st.lost.take().unwrap_or_else(|| "closed".into());
                return Err(StoreError::Unavailable(format!(
                    "the change feed's connection was lost: {lost}"
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            st = self.listener.heard.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn commit_after(&self, after: u64, origin: &str, changes: &[Change]) -> Result<u64, StoreError> {
        self.write(Some(after), origin, changes)
    }

    fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let (pool, name, holder, secs) =
            (self.pool.clone(), name.to_string(), holder.to_string(), ttl.as_secs_f64());
        self.run(async move {
            let client = pool.get().await.map_err(pool_err)?;
            // One statement: taken when free, lapsed or already ours; by the database's clock.
            let row = client
                .query_opt(
                    "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, now() + make_interval(secs => $3))
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                     WHERE leases.holder = excluded.holder OR leases.expires_at <= now()
                     RETURNING holder",
                    &[&name, &holder, &secs],
                )
                .await
                .map_err(pg_err)?;
            Ok(row.is_some())
        })
    }

    fn release(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let (pool, name, holder) = (self.pool.clone(), name.to_string(), holder.to_string());
        self.run(async move {
            let client = pool.get().await.map_err(pool_err)?;
            client
                .execute("DELETE FROM leases WHERE name = $1 AND holder = $2", &[&name, &holder])
                .await
                .map_err(pg_err)?;
            Ok(())
        })
    }

    fn load_at_head(&self) -> Result<(Snapshot, u64), StoreError> {
        self.run(load_at_head(self.pool.clone()))
    }
}

#[cfg(test)]
#[path = "../../tests/support/pg.rs"]
mod pg;

#[cfg(test)]
mod tests {
    use super::super::conformance::{Backend, change_feed_conformance_tests, store_conformance_tests};
    use super::*;

    /// A database of its own on the test process's throwaway PostgreSQL.
    struct PgBackend {
        db: super::pg::PgDatabase,
    }

    impl PgBackend {
        fn url(&self) -> PostgresUrl {
            self.db.url().parse().expect("the harness's URL is valid")
        }
        fn store(&self) -> Result<PostgresStore, StoreError> {
            PostgresStore::open(&self.url())
        }
    }

    impl Backend for PgBackend {
        fn create() -> Result<Self, StoreError> {
            Ok(PgBackend { db: super::pg::PgServer::shared().create_database() })
        }

        fn open(&self) -> Result<Box<dyn Store>, StoreError> {
            Ok(Box::new(self.store()?))
        }
    }

    store_conformance_tests!(PgBackend, durable);
    change_feed_conformance_tests!(PgBackend);
}

#[cfg(test)]
mod postgres_only {
    use std::sync::Arc;

    use super::pg::{PgDatabase, PgServer};
    use super::*;
    use crate::model::{Principal, PrincipalKind};

    fn url(db: &PgDatabase) -> PostgresUrl {
        db.url().parse().expect("the harness's URL is valid")
    }

    fn principal(object_id: &str) -> Change {
        Change::PutPrincipal(Principal {
            object_id: object_id.into(),
            app_id: "app".into(),
            name: object_id.into(),
            kind: PrincipalKind::User,
            resource_id: None,
            created: 1,
            client_secret_hash: None,
        })
    }

    #[test]
    fn several_brokers_opening_a_new_database_at_once_migrate_it_once() -> Result<(), StoreError> {
        let db = PgServer::shared().create_database();
        let url = url(&db);
        let stores = std::thread::scope(|s| {
            let openers: Vec<_> = (0..4).map(|_| s.spawn(|| PostgresStore::open(&url))).collect();
            openers
                .into_iter()
                .map(|o| o.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let applied =
            db.server().psql(db.name(), "SELECT string_agg(version::text, ',') FROM schema_migrations");
        assert_eq!(applied, SCHEMA_VERSION.to_string());
        // All of them work on the one schema.
        for (i, store) in stores.iter().enumerate() {
            store.commit(&[principal(&format!("p{i}"))])?;
        }
        assert_eq!(stores[0].load()?.principals.len(), 4);
        assert_eq!(stores[3].head()?, 4);
        Ok(())
    }

    #[test]
    fn a_database_migrated_by_a_newer_broker_is_refused() -> Result<(), StoreError> {
        let db = PgServer::shared().create_database();
        drop(PostgresStore::open(&url(&db))?);
        db.server().psql(db.name(), "INSERT INTO schema_migrations (version) VALUES (99)");
        match PostgresStore::open(&url(&db)) {
            Err(StoreError::Schema(99)) => Ok(()),
            Err(e) => panic!("expected the schema to be refused, got {e:?}"),
            Ok(_) => panic!("a database of a newer schema was opened"),
        }
    }

    #[test]
    fn a_lost_listening_connection_is_an_error_and_the_next_wait_listens_again() -> Result<(), StoreError> {
        let db = PgServer::shared().create_database();
        let (a, b) = (PostgresStore::open(&url(&db))?, PostgresStore::open(&url(&db))?);
        b.wait(Duration::ZERO)?;
        let killed = db.server().psql(
            db.name(),
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND query = 'LISTEN {FEED_CHANNEL}'"
            ),
        );
        assert_eq!(killed, "1");
        // Bounded so a loss that is never noticed fails the test instead of hanging it.
        match b.wait(Duration::from_secs(60)) {
            Err(StoreError::Unavailable(why)) => assert!(why.contains("change feed"), "{why}"),
            other => panic!("the lost connection was not reported: {other:?}"),
        }
        // Listening again, it reports a wake-up (batches may have been missed meanwhile)...
        assert!(b.wait(Duration::from_secs(60))?);
        // ...and hears the next commit.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.wait(Duration::from_secs(60)));
            a.commit(&[principal("p1")])?;
            assert!(waiter.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?);
            Ok(())
        })
    }

    #[test]
    fn a_follower_whose_position_was_pruned_is_told_to_reload() -> Result<(), StoreError> {
        let db = PgServer::shared().create_database();
        let store = PostgresStore::open(&url(&db))?;
        for i in 0..5 {
            store.commit(&[principal(&format!("p{i}"))])?;
        }
        // Nothing is younger than zero seconds: only the newest two are kept.
        assert_eq!(store.prune_feed(2, Duration::ZERO)?, 3);
        match store.read_after(1, 10) {
            Err(StoreError::FeedPruned { after: 1, oldest: Some(4) }) => {}
            other => panic!("expected the position to be pruned, got {other:?}"),
        }
        let kept: Vec<u64> = store.read_after(3, 10)?.into_iter().map(|e| e.seq).collect();
        assert_eq!(kept, [4, 5]);
        // The young batches are kept whatever their number.
        assert_eq!(store.prune_feed(0, Duration::from_secs(3600))?, 0);
        // Reloading gives the whole state and the head to follow from.
        let (snapshot, head) = store.load_at_head()?;
        assert_eq!((snapshot.principals.len(), head), (5, 5));
        Ok(())
    }

    #[test]
    fn a_stopped_server_makes_the_store_unavailable_and_it_recovers_when_the_server_returns()
    -> Result<(), StoreError> {
        let server = Arc::new(PgServer::start());
        let db = server.create_database();
        let store = PostgresStore::open(&url(&db))?;
        store.commit(&[principal("before")])?;
        store.wait(Duration::ZERO)?;
        server.stop();
        let err = store.commit(&[principal("during")]).expect_err("the server is stopped");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(!err.is_damage() && !err.is_full());
        assert!(matches!(store.get_meta("m"), Err(StoreError::Unavailable(_))));
        assert!(matches!(store.wait(Duration::from_secs(60)), Err(StoreError::Unavailable(_))));
        match PostgresStore::open(&url(&db)) {
            Err(StoreError::Unavailable(_)) => {}
            Err(e) => panic!("expected the server to be unavailable, got {e:?}"),
            Ok(_) => panic!("opened a store on a stopped server"),
        }
        server.restart();
        store.commit(&[principal("after")])?;
        let ids: Vec<String> = store.load()?.principals.into_iter().map(|p| p.object_id).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&"before".to_string()) && ids.contains(&"after".to_string()), "{ids:?}");
        assert_eq!(store.head()?, 2, "the refused commit took a sequence number");
        assert!(store.wait(Duration::from_secs(60))?, "the feed did not listen again");
        Ok(())
    }

    #[test]
    fn a_commit_held_up_by_a_stalled_writer_fails_as_unavailable_instead_of_hanging() -> Result<(), StoreError>
    {
        let db = PgServer::shared().create_database();
        // The URL's own options replace the broker's: a short lock timeout for the test.
        let short: PostgresUrl =
            format!("{}?options=-c%20lock_timeout%3D200", db.url()).parse().expect("valid URL");
        let store = PostgresStore::open(&short)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        // Another writer stalls inside its commit, holding the feed's row lock.
        let stalled = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&db.url(), NoTls).await.map_err(pg_err)?;
            tokio::spawn(conn);
            client
                .batch_execute("BEGIN; SELECT seq FROM feed_head WHERE id = 1 FOR UPDATE")
                .await
                .map_err(pg_err)?;
            Ok::<_, StoreError>(client)
        })?;
        let err = store.commit(&[principal("p1")]).expect_err("the feed's lock is held");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        rt.block_on(stalled.batch_execute("ROLLBACK")).map_err(pg_err)?;
        store.commit(&[principal("p1")])?;
        assert_eq!(store.head()?, 1, "the refused commit took a sequence number");
        Ok(())
    }

    #[test]
    fn a_store_url_never_shows_its_password_and_must_name_host_user_and_database() {
        let url: PostgresUrl = "postgres://broker:s3cret@db.example:6543/tde".parse().expect("valid");
        assert_eq!(url.to_string(), "postgres://broker@db.example:6543/tde");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert_eq!(url.expose(), "postgres://broker:s3cret@db.example:6543/tde");
        for bad in [
            "mysql://u@h/db",
            "postgres://u@h",
            "postgres://h/db",
            "postgres://u:s3cret@h:notaport/db",
            "sqlite",
        ] {
            let err = bad.parse::<PostgresUrl>().expect_err(bad).to_string();
            assert!(!err.contains("s3cret"), "{err}");
            assert!(err.contains("postgres://user"), "{err}");
        }
    }
}
