//! The default store: one SQLite file in WAL mode with `synchronous = FULL`, documents as JSON,
//! sealed key material as BLOBs.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Rejection, Snapshot, Store, StoreError, StoredKey, StoredRotationPolicy};
use crate::model::ids::key_index;
use crate::model::{Change, KeyVersion};

/// 2 added `vault_deletions` (vault soft delete); a version-1 store is migrated at open.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS vaults (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vault_deletions (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    vault TEXT NOT NULL, idx TEXT NOT NULL, name TEXT NOT NULL, deleted TEXT,
    PRIMARY KEY (vault, idx));
CREATE TABLE IF NOT EXISTS key_versions (
    vault TEXT NOT NULL, idx TEXT NOT NULL, version TEXT NOT NULL, seq INTEGER NOT NULL,
    doc TEXT NOT NULL, sealed BLOB NOT NULL,
    PRIMARY KEY (vault, idx, version));
CREATE TABLE IF NOT EXISTS principals (object_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS role_assignments (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS servers (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subnets (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS databases (
    server_id TEXT NOT NULL, name TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (server_id, name));
CREATE TABLE IF NOT EXISTS key_rotation_policies (
    vault TEXT NOT NULL, idx TEXT NOT NULL, name TEXT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (vault, idx));
";

/// How thoroughly the database is checked when it is opened (`--store-check`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreCheck {
    /// `PRAGMA quick_check`: every page and b-tree is well formed (reads the whole file once).
    #[default]
    Quick,
    /// `PRAGMA integrity_check`: the quick check, and every index matches its table and every
    /// UNIQUE constraint holds (slower on a large store).
    Full,
}

impl StoreCheck {
    fn pragma(self) -> &'static str {
        match self {
            StoreCheck::Quick => "quick_check",
            StoreCheck::Full => "integrity_check",
        }
    }
}

/// Most faults an integrity check lists before it stops.
const MAX_FAULTS: u32 = 20;

/// SQLite-backed [`Store`]. One connection, serialised by a mutex: writes are few and small, and
/// the hot path never reads the store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, after SQLite's quick check.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_checked(path, StoreCheck::Quick)
    }

    /// Opens (creating if needed) the database file at `path`, checked as `check` says first: a
    /// damaged file is refused with [`StoreError::Damaged`] and SQLite's report. The file and
    /// SQLite's companions beside it are private to the broker (0600).
    pub fn open_checked(path: &Path, check: StoreCheck) -> Result<Self, StoreError> {
        let conn = connect(path)?;
        verify(&conn, check)?;
        Ok(SqliteStore { conn: Mutex::new(with_schema(conn)?) })
    }

    /// Opens the database file at `path` as [`SqliteStore::open_checked`] does, but runs the
    /// check on a thread of its own, over a second, read-only connection: the caller reads the
    /// store (the snapshot load) while SQLite reads the file for the check, and must
    /// [`wait`](BackgroundCheck::wait) for the check before it writes to the store or serves.
    /// Damage found while opening (a file that is not a database) is reported here, as by
    /// [`SqliteStore::open_checked`].
    pub fn open_checking_in_background(
        path: &Path,
        check: StoreCheck,
    ) -> Result<(Self, BackgroundCheck), StoreError> {
        let store = SqliteStore { conn: Mutex::new(with_schema(connect(path)?)?) };
        let db = path.to_path_buf();
        let path = db.clone();
        let handle = std::thread::Builder::new()
            .name("store-check".into())
            .spawn(move || {
                let flags =
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let conn = Connection::open_with_flags(&path, flags)?;
                conn.pragma_update(None, "cache_size", -512)?;
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
                verify(&conn, check)
            })
            .map_err(|source| StoreError::Io { path: db.clone(), source })?;
        Ok((store, BackgroundCheck { handle: Some(handle), db }))
    }

    /// The files SQLite keeps for the database at `path`: the file itself, its write-ahead log
    /// and its shared-memory index.
    pub fn files(path: &Path) -> [PathBuf; 3] {
        let beside = |suffix: &str| {
            let mut name = path.as_os_str().to_os_string();
            name.push(suffix);
            PathBuf::from(name)
        };
        [path.to_path_buf(), beside("-wal"), beside("-shm")]
    }

    /// Whether the store holds nothing but its own bookkeeping (schema version, store id): no
    /// record and no value a broker put.
    pub fn is_blank(&self) -> Result<bool, StoreError> {
        let conn = self.conn();
        let mut sql =
            String::from("SELECT NOT EXISTS (SELECT 1 FROM meta WHERE k NOT IN ('schema_version', ?1))");
        for table in super::RECORD_TABLES {
            sql.push_str(&format!(" AND NOT EXISTS (SELECT 1 FROM {table})"));
        }
        Ok(conn.query_row(&sql, params![super::datadir::META_STORE_ID], |r| r.get(0))?)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no half-done transaction (SQLite rolls back an
        // unfinished one), so the poisoned connection is still sound to use.
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An integrity check running on a thread of its own ([`SqliteStore::open_checking_in_background`]).
#[derive(Debug)]
pub struct BackgroundCheck {
    handle: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
    db: PathBuf,
}

impl BackgroundCheck {
    /// Waits for the check: `Ok` when SQLite found the file sound, [`StoreError::Damaged`] with
    /// its report when not. The first call waits and reports; later calls return `Ok` at once
    /// (a caller stops at the first error).
    pub fn wait(&mut self) -> Result<(), StoreError> {
        match self.handle.take() {
            None => Ok(()),
            // A panic is a bug, not damage: reported as a failure to open the file.
            Some(handle) => handle.join().unwrap_or_else(|_| {
                let source = std::io::Error::other("the integrity check's thread panicked");
                Err(StoreError::Io { path: self.db.clone(), source })
            }),
        }
    }
}

/// Ends a transaction a failed write left open (a rollback SQLite did not do, or one that
/// failed): afterwards the connection is in autocommit mode, so the next write starts a fresh
/// transaction instead of failing with "cannot start a transaction within a transaction".
fn settle(conn: &Connection) -> Result<(), StoreError> {
    if !conn.is_autocommit() {
        conn.execute_batch("ROLLBACK")?;
    }
    Ok(())
}

/// Opens a connection in WAL mode with full sync. The database file is created 0600 before
/// SQLite opens it (SQLite gives the `-wal` and `-shm` files the database file's mode), and a
/// wider mode left on any of the three by an earlier version is narrowed.
fn connect(path: &Path) -> Result<Connection, StoreError> {
    let io = |file: &Path| {
        let path = file.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    for file in SqliteStore::files(path) {
        super::datadir::make_private(&file).map_err(io(&file))?;
    }
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The store is read whole once at start and then only written: a 512 KiB page cache
    // (SQLite's default is 2 MiB) is plenty for commits, and the rest stays free.
    conn.pragma_update(None, "cache_size", -512)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Runs SQLite's integrity check: anything but "ok" is damage, reported in SQLite's words.
fn verify(conn: &Connection, check: StoreCheck) -> Result<(), StoreError> {
    let pragma = check.pragma();
    let mut stmt = conn.prepare(&format!("PRAGMA {pragma}({MAX_FAULTS})"))?;
    let report = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    if report.iter().map(String::as_str).eq(["ok"]) {
        return Ok(());
    }
    let faults = report.join("; ").replace('\n', " ");
    Err(StoreError::Damaged { detail: format!("PRAGMA {pragma} found: {faults}"), source: None })
}

/// Creates the tables a new database lacks and checks the schema version of an existing one. A
/// version-1 store (before vault soft delete) only lacks the `vault_deletions` table, which
/// `SCHEMA` creates: it is migrated by recording the new version, in the same transaction.
fn with_schema(mut conn: Connection) -> Result<Connection, StoreError> {
    let tx = conn.transaction()?;
    tx.execute_batch(SCHEMA)?;
    match schema_version(&tx)? {
        None => {
            tx.execute(
                "INSERT INTO meta (k, v) VALUES ('schema_version', ?1)",
                params![SCHEMA_VERSION.to_string().into_bytes()],
            )?;
        }
        Some(1) => {
            tx.execute(
                "UPDATE meta SET v = ?1 WHERE k = 'schema_version'",
                params![SCHEMA_VERSION.to_string().into_bytes()],
            )?;
            tracing::info!(from = 1, to = SCHEMA_VERSION, "store schema migrated");
        }
        Some(SCHEMA_VERSION) => {}
        Some(other) => return Err(StoreError::Schema(other)),
    }
    tx.commit()?;
    Ok(conn)
}

/// The schema version recorded in `meta`, if any (-1 when it is not a number).
fn schema_version(conn: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .query_row("SELECT v FROM meta WHERE k = 'schema_version'", [], |r| {
            let blob: Vec<u8> = r.get(0)?;
            Ok(String::from_utf8_lossy(&blob).parse::<i64>().unwrap_or(-1))
        })
        .optional()?)
}

fn to_doc<T: Serialize>(value: &T, table: &'static str) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|source| StoreError::Corrupt { table, source })
}

fn from_doc<T: DeserializeOwned>(doc: &str, table: &'static str) -> Result<T, StoreError> {
    serde_json::from_str(doc).map_err(|source| StoreError::Corrupt { table, source })
}

fn all_docs<T: DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    table: &'static str,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let docs = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    docs.iter().map(|d| from_doc(d, table)).collect()
}

/// Writes `changes` in one transaction and commits it. On an error the transaction is dropped,
/// which rolls it back.
fn write_changes(conn: &mut Connection, changes: &[Change]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    for change in changes {
        match change {
            Change::PutVault(v) => {
                tx.execute(
                    "INSERT INTO vaults (name, doc) VALUES (?1, ?2)
                     ON CONFLICT(name) DO UPDATE SET doc = excluded.doc",
                    params![v.name, to_doc(v, "vaults")?],
                )?;
            }
            Change::DeleteVault { vault } => {
                tx.execute("DELETE FROM key_versions WHERE vault = ?1", params![vault])?;
                tx.execute("DELETE FROM keys WHERE vault = ?1", params![vault])?;
                tx.execute("DELETE FROM vault_deletions WHERE name = ?1", params![vault])?;
                tx.execute("DELETE FROM key_rotation_policies WHERE vault = ?1", params![vault])?;
                tx.execute("DELETE FROM vaults WHERE name = ?1", params![vault])?;
            }
            Change::SetVaultDeletion { vault, deleted } => match deleted {
                Some(d) => {
                    tx.execute(
                        "INSERT INTO vault_deletions (name, doc)
                         SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM vaults WHERE name = ?1)
                         ON CONFLICT(name) DO UPDATE SET doc = excluded.doc",
                        params![vault, to_doc(d, "vault_deletions")?],
                    )?;
                }
                None => {
                    tx.execute("DELETE FROM vault_deletions WHERE name = ?1", params![vault])?;
                }
            },
            Change::PutKeyVersion { vault, name, version, sealed } => {
                let idx = key_index(name);
                let doc = to_doc(version, "key_versions")?;
                match sealed {
                    Some(sealed) => {
                        tx.execute(
                            "INSERT OR IGNORE INTO keys (vault, idx, name, deleted) VALUES (?1, ?2, ?3, NULL)",
                            params![vault, idx, name],
                        )?;
                        let n = tx.execute(
                            "INSERT INTO key_versions (vault, idx, version, seq, doc, sealed)
                             VALUES (?1, ?2, ?3, (SELECT IFNULL(MAX(seq), 0) + 1 FROM key_versions), ?4, ?5)
                             ON CONFLICT(vault, idx, version) DO NOTHING",
                            params![vault, idx, version.version, doc, sealed],
                        )?;
                        if n != 1 {
                            return Err(Rejection::key_version(vault, name, version, true).into());
                        }
                    }
                    None => {
                        let n = tx.execute(
                            "UPDATE key_versions SET doc = ?4 WHERE vault = ?1 AND idx = ?2 AND version = ?3",
                            params![vault, idx, version.version, doc],
                        )?;
                        if n != 1 {
                            return Err(Rejection::key_version(vault, name, version, false).into());
                        }
                    }
                }
            }
            Change::SetKeyDeletion { vault, name, deleted } => {
                let doc = deleted.as_ref().map(|d| to_doc(d, "keys")).transpose()?;
                tx.execute(
                    "UPDATE keys SET deleted = ?3 WHERE vault = ?1 AND idx = ?2",
                    params![vault, key_index(name), doc],
                )?;
            }
            Change::PurgeKey { vault, name } => {
                let idx = key_index(name);
                tx.execute("DELETE FROM key_versions WHERE vault = ?1 AND idx = ?2", params![vault, idx])?;
                tx.execute("DELETE FROM keys WHERE vault = ?1 AND idx = ?2", params![vault, idx])?;
                tx.execute(
                    "DELETE FROM key_rotation_policies WHERE vault = ?1 AND idx = ?2",
                    params![vault, idx],
                )?;
            }
            Change::PutPrincipal(p) => {
                tx.execute(
                    "INSERT INTO principals (object_id, doc) VALUES (?1, ?2)
                     ON CONFLICT(object_id) DO UPDATE SET doc = excluded.doc",
                    params![p.object_id, to_doc(p, "principals")?],
                )?;
            }
            Change::PutSubnet(sn) => {
                tx.execute(
                    "INSERT INTO subnets (id, doc) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                    params![sn.id.to_ascii_lowercase(), to_doc(sn, "subnets")?],
                )?;
            }
            Change::PutServer(srv) => {
                tx.execute(
                    "INSERT INTO servers (id, doc) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                    params![srv.id.to_ascii_lowercase(), to_doc(srv, "servers")?],
                )?;
            }
            Change::DeleteServer { id } => {
                let id = id.to_ascii_lowercase();
                tx.execute("DELETE FROM databases WHERE server_id = ?1", params![id])?;
                tx.execute("DELETE FROM servers WHERE id = ?1", params![id])?;
            }
            Change::PutDatabase(db) => {
                tx.execute(
                    "INSERT INTO databases (server_id, name, doc) VALUES (?1, ?2, ?3)
                     ON CONFLICT(server_id, name) DO UPDATE SET doc = excluded.doc",
                    params![
                        db.server_id.to_ascii_lowercase(),
                        db.name.to_ascii_lowercase(),
                        to_doc(db, "databases")?
                    ],
                )?;
            }
            Change::DeleteDatabase { server_id, name } => {
                tx.execute(
                    "DELETE FROM databases WHERE server_id = ?1 AND name = ?2",
                    params![server_id.to_ascii_lowercase(), name.to_ascii_lowercase()],
                )?;
            }
            Change::DeletePrincipal { object_id } => {
                tx.execute("DELETE FROM principals WHERE object_id = ?1", params![object_id])?;
            }
            Change::PutRoleAssignment(a) => {
                tx.execute(
                    "INSERT INTO role_assignments (id, doc) VALUES (?1, ?2)
                     ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                    params![a.id, to_doc(a, "role_assignments")?],
                )?;
            }
            Change::DeleteRoleAssignment { id } => {
                tx.execute("DELETE FROM role_assignments WHERE id = ?1", params![id])?;
            }
            Change::PutKeyRotationPolicy { vault, name, policy } => {
                tx.execute(
                    "INSERT INTO key_rotation_policies (vault, idx, name, doc) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(vault, idx) DO UPDATE SET name = excluded.name, doc = excluded.doc",
                    params![vault, key_index(name), name, to_doc(policy, "key_rotation_policies")?],
                )?;
            }
            Change::SetManualClock { now } => {
                tx.execute(
                    "INSERT INTO meta (k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                    params![crate::store::META_MANUAL_CLOCK, now.to_string().into_bytes()],
                )?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

impl Store for SqliteStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let conn = self.conn();
        let vaults = all_docs(&conn, "SELECT doc FROM vaults ORDER BY name", "vaults")?;
        let vault_deletions = {
            let mut stmt = conn.prepare("SELECT name, doc FROM vault_deletions ORDER BY name")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(name, doc)| Ok((name, from_doc(&doc, "vault_deletions")?)))
                .collect::<Result<Vec<_>, StoreError>>()?
        };
        let principals = all_docs(&conn, "SELECT doc FROM principals", "principals")?;
        let role_assignments = all_docs(&conn, "SELECT doc FROM role_assignments", "role_assignments")?;
        let servers = all_docs(&conn, "SELECT doc FROM servers ORDER BY id", "servers")?;
        let subnets = all_docs(&conn, "SELECT doc FROM subnets ORDER BY id", "subnets")?;
        let databases = all_docs(&conn, "SELECT doc FROM databases ORDER BY server_id, name", "databases")?;

        let mut keys = Vec::new();
        let mut stmt = conn.prepare("SELECT vault, idx, name, deleted FROM keys ORDER BY vault, idx")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut vstmt =
            conn.prepare("SELECT doc, sealed FROM key_versions WHERE vault = ?1 AND idx = ?2 ORDER BY seq")?;
        for (vault, idx, name, deleted) in rows {
            let deleted = deleted.map(|d| from_doc(&d, "keys")).transpose()?;
            let versions = vstmt
                .query_map(params![vault, idx], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .map(|(doc, sealed)| Ok((from_doc::<KeyVersion>(&doc, "key_versions")?, sealed)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            keys.push(StoredKey { vault, name, deleted, versions });
        }
        let mut pstmt =
            conn.prepare("SELECT vault, name, doc FROM key_rotation_policies ORDER BY vault, idx")?;
        let rotation_policies = pstmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(|(vault, name, doc)| {
                Ok(StoredRotationPolicy { vault, name, policy: from_doc(&doc, "key_rotation_policies")? })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Snapshot {
            vaults,
            vault_deletions,
            keys,
            principals,
            role_assignments,
            subnets,
            servers,
            databases,
            rotation_policies,
        })
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        settle(&conn)?;
        let result = write_changes(&mut conn, changes);
        if result.is_err() {
            // Dropping the transaction rolled it back (or SQLite did, on SQLITE_FULL or an I/O
            // error); a rollback that failed is retried here, so the next commit starts clean.
            if let Err(e) = settle(&conn) {
                tracing::error!(error = %e, "rolling back a failed commit failed; the next write retries it");
            }
        }
        result
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let conn = self.conn();
        Ok(conn.query_row("SELECT v FROM meta WHERE k = ?1", params![key], |r| r.get(0)).optional()?)
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let conn = self.conn();
        settle(&conn)?;
        conn.execute(
            "INSERT INTO meta (k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            params![key, value],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::conformance::{Backend, store_conformance_tests};
    use super::*;

    /// A database file in a temporary directory of its own, removed with it.
    struct SqliteFile {
        dir: tempfile::TempDir,
    }

    impl SqliteFile {
        fn path(&self) -> PathBuf {
            self.dir.path().join("db.sqlite")
        }
    }

    impl Backend for SqliteFile {
        fn create() -> Result<Self, StoreError> {
            let dir = tempfile::tempdir()
                .map_err(|source| StoreError::Io { path: std::env::temp_dir(), source })?;
            Ok(SqliteFile { dir })
        }

        fn open(&self) -> Result<Box<dyn Store>, StoreError> {
            Ok(Box::new(SqliteStore::open(&self.path())?))
        }
    }

    store_conformance_tests!(SqliteFile, durable);

    /// Overwrites the root page of the principals' unique index with garbage, in a file whose
    /// write-ahead log was checkpointed when its last connection closed.
    fn wreck_principals_index(path: &Path) -> Result<(), StoreError> {
        let conn = Connection::open(path)?;
        let page_size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let root: u64 = conn.query_row(
            "SELECT rootpage FROM sqlite_master WHERE type = 'index' AND tbl_name = 'principals'",
            [],
            |r| r.get(0),
        )?;
        drop(conn);
        let io = |source| StoreError::Io { path: path.to_path_buf(), source };
        let file = std::fs::OpenOptions::new().write(true).open(path).map_err(io)?;
        std::os::unix::fs::FileExt::write_all_at(
            &file,
            &vec![0xA5; page_size as usize],
            (root - 1) * page_size,
        )
        .map_err(io)
    }

    #[test]
    fn a_commit_that_meets_a_damaged_page_fails_as_damage() -> Result<(), StoreError> {
        let file = SqliteFile::create()?;
        drop(SqliteStore::open(&file.path())?);
        wreck_principals_index(&file.path())?;
        // As a store damaged after it was opened: no check at open.
        let store = SqliteStore { conn: Mutex::new(with_schema(connect(&file.path())?)?) };
        let err = store
            .commit(&[Change::DeletePrincipal { object_id: "p1".into() }])
            .expect_err("the commit reads the damaged index");
        assert!(matches!(err, StoreError::Damaged { source: Some(_), .. }), "{err:?}");
        assert!(err.is_damage());
        // The check at open finds the same damage before anything is committed.
        let refused = SqliteStore::open(&file.path()).err();
        assert!(
            matches!(&refused, Some(StoreError::Damaged { detail, source: None }) if detail.starts_with("PRAGMA quick_check found: ")),
            "{refused:?}"
        );
        Ok(())
    }

    fn principal(object_id: &str, name: String) -> crate::model::Principal {
        crate::model::Principal {
            object_id: object_id.into(),
            app_id: "app".into(),
            name,
            kind: crate::model::PrincipalKind::User,
            resource_id: None,
            created: 0,
            client_secret_hash: None,
        }
    }

    #[test]
    fn a_commit_that_runs_out_of_space_is_full_leaves_nothing_and_succeeds_once_space_returns()
    -> Result<(), StoreError> {
        let file = SqliteFile::create()?;
        let store = SqliteStore::open(&file.path())?;
        store.commit(&[Change::PutPrincipal(principal("p1", "small".into()))])?;
        // SQLite answers SQLITE_FULL when a write needs more pages than it may have, as when
        // the file system refuses to grow the file (ENOSPC): the database may not grow now.
        let pages: i64 = store.conn().query_row("PRAGMA page_count", [], |r| r.get(0))?;
        store.conn().pragma_update(None, "max_page_count", pages)?;
        let big = [
            Change::PutPrincipal(principal("p2", "x".repeat(64 * 1024))),
            Change::DeletePrincipal { object_id: "p1".into() },
        ];
        let err = store.commit(&big).expect_err("no room for 64 KiB");
        assert!(matches!(err, StoreError::Full(_)) && err.is_full() && !err.is_damage(), "{err:?}");
        assert!(err.to_string().starts_with("out of disk space"), "{err}");
        assert!(store.conn().is_autocommit(), "the failed commit left a transaction open");
        let ids: Vec<String> = store.load()?.principals.into_iter().map(|p| p.object_id).collect();
        assert_eq!(ids, ["p1"], "a part of the refused commit is visible");
        // Space returns: the same commit succeeds on the same connection.
        store.conn().pragma_update(None, "max_page_count", 1_073_741_823)?;
        store.commit(&big)?;
        let ids: Vec<String> = store.load()?.principals.into_iter().map(|p| p.object_id).collect();
        assert_eq!(ids, ["p2"]);
        Ok(())
    }

    #[test]
    fn a_transaction_left_open_does_not_block_the_next_commit() -> Result<(), StoreError> {
        let file = SqliteFile::create()?;
        let store = SqliteStore::open(&file.path())?;
        // As after a rollback that failed: the connection is still inside a transaction.
        store.conn().execute_batch("BEGIN; DELETE FROM meta WHERE k = 'nothing';")?;
        store.commit(&[Change::PutPrincipal(principal("p1", "a".into()))])?;
        store.conn().execute_batch("BEGIN;")?;
        store.put_meta("m", b"v")?;
        drop(store);
        let store = SqliteStore::open(&file.path())?;
        assert_eq!(store.load()?.principals.len(), 1, "the commit did not survive reopening");
        assert_eq!(store.get_meta("m")?.as_deref(), Some(&b"v"[..]));
        Ok(())
    }

    #[test]
    fn the_background_check_finds_the_damage_the_check_at_open_finds() -> Result<(), StoreError> {
        let file = SqliteFile::create()?;
        let (store, mut check) = SqliteStore::open_checking_in_background(&file.path(), StoreCheck::Quick)?;
        check.wait()?;
        store.commit(&[Change::PutPrincipal(principal("p1", "a".into()))])?;
        drop(store);
        wreck_principals_index(&file.path())?;
        let (_store, mut check) = SqliteStore::open_checking_in_background(&file.path(), StoreCheck::Quick)?;
        let err = check.wait().expect_err("the index is wrecked");
        assert!(
            matches!(&err, StoreError::Damaged { detail, source: None } if detail.starts_with("PRAGMA quick_check found: ")),
            "{err:?}"
        );
        assert!(check.wait().is_ok(), "a second wait reports nothing new");
        Ok(())
    }

    #[test]
    fn a_file_that_is_not_a_database_is_damage() -> Result<(), StoreError> {
        let file = SqliteFile::create()?;
        std::fs::write(file.path(), [0x42; 8192])
            .map_err(|source| StoreError::Io { path: file.path(), source })?;
        let err = SqliteStore::open(&file.path()).err().expect("not a database");
        assert!(err.is_damage() && err.to_string().contains("file is not a database"), "{err:?}");
        Ok(())
    }

    #[test]
    fn a_database_of_another_schema_version_is_refused() -> Result<(), StoreError> {
        let file = SqliteFile::create()?;
        file.open()?.put_meta("schema_version", b"3")?;
        assert!(matches!(SqliteStore::open(&file.path()), Err(StoreError::Schema(3))));
        Ok(())
    }

    #[test]
    fn a_version_1_store_is_migrated_and_keeps_its_records() -> Result<(), StoreError> {
        use crate::model::{Deletion, NetworkAcls, Vault};
        let file = SqliteFile::create()?;
        let v = Vault {
            name: "v1".into(),
            retention_days: 30,
            purge_protection: true,
            rbac: false,
            network_acls: NetworkAcls::default(),
            public_network_access: true,
            access_policies: Default::default(),
            private_endpoints: vec![],
            created: 5,
        };
        file.open()?.commit(&[Change::PutVault(v.clone())])?;
        // What a version-1 broker left: no vault_deletions table, version 1.
        {
            let conn = Connection::open(file.path())?;
            conn.execute_batch("DROP TABLE vault_deletions")?;
            conn.execute("UPDATE meta SET v = ?1 WHERE k = 'schema_version'", params![b"1".to_vec()])?;
        }
        let store = file.open()?;
        assert_eq!(store.get_meta("schema_version")?, Some(b"2".to_vec()));
        assert_eq!(store.load()?.vaults, vec![v]);
        let d = Deletion { deleted_date: 7, scheduled_purge_date: 8 };
        store.commit(&[Change::SetVaultDeletion { vault: "v1".into(), deleted: Some(d.clone()) }])?;
        drop(store);
        assert_eq!(file.open()?.load()?.vault_deletions, vec![("v1".to_string(), d)]);
        Ok(())
    }
}
