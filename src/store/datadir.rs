//! The data directory around the SQLite store: one broker at a time (an exclusive lock on
//! `lock`), the store's identity (a random id kept both in the store and in `store.id` beside
//! it), and files private to the broker (0600).
//!
//! A data directory that has held a store never starts silently with an empty one: when its
//! store is missing, empty, damaged or another directory's, [`open_store`] refuses it and says
//! how to restore it, unless the operator asked to start afresh ([`OpenStore::reinitialize`]).
//! Starting afresh deletes nothing: the files found are renamed aside, and the log says so.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::postgres::{PostgresStore, PostgresUrl};
use super::sqlite::{BackgroundCheck, SqliteStore, StoreCheck};
use super::{ChangeFeed, Snapshot, Store, StoreError, is_out_of_space};
use crate::model::Change;

/// The lock file inside the data directory; it holds the PID of the broker that has it.
pub const LOCK_FILE: &str = "lock";
/// The file inside the data directory that records the id of the directory's store.
pub const STORE_ID_FILE: &str = "store.id";
/// The store's meta value that holds its id.
pub const META_STORE_ID: &str = "store_id";

/// What to do about a store found missing, empty or damaged, in the operator's words.
const RESTORE_ADVICE: &str = "restore it from a backup (with the broker stopped: copy the backup \
    over it and delete the -wal and -shm files beside it, if any), or start afresh with a new, \
    empty store by passing --reinitialize (TDE_BROKER_REINITIALIZE=true): what is found is renamed \
    aside, and none of the old store's vaults, keys and principals is served";

/// Why the data directory or its store cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// Another process holds the data directory's lock.
    #[error(
        "data directory {} in use by {}: only one tde-broker may serve a data directory; stop that one first, or give this one another --data-dir",
        dir.display(),
        holder(*pid)
    )]
    InUse {
        /// The data directory.
        dir: PathBuf,
        /// The holder's PID as its lock file says, when it could be read.
        pid: Option<u32>,
    },
    /// A file of the data directory could not be written for want of space (`ENOSPC`, `EDQUOT`).
    #[error(
        "{}: out of disk space ({source}): free space on the file system that holds the data directory, then start again",
        path.display()
    )]
    Full {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file of the data directory could not be read, written, renamed or locked.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store is missing, or is an empty file, in a directory that has held one.
    #[error("the store {} {state}, but this data directory has held a store ({held}): {RESTORE_ADVICE}", path.display())]
    StoreLost {
        /// The store's file.
        path: PathBuf,
        /// What was found.
        state: Lost,
        /// How the directory is known to have held a store.
        held: Held,
    },
    /// The store is another store than the one `store.id` records.
    #[error(
        "the store {} is store {found}, but {} records store {expected}: it is another data directory's store. Put this directory's own store back from a backup; if you moved that store here on purpose, copy its directory's {STORE_ID_FILE} along with it; or start afresh with --reinitialize (TDE_BROKER_REINITIALIZE=true), which renames the store found aside",
        path.display(),
        id_file.display()
    )]
    StoreMismatch {
        /// The store's file.
        path: PathBuf,
        /// The id the store holds.
        found: String,
        /// The store id file.
        id_file: PathBuf,
        /// The id the directory records.
        expected: String,
    },
    /// SQLite found the store damaged.
    #[error("the store {}: {source}; {RESTORE_ADVICE}", path.display())]
    Damaged {
        /// The store's file.
        path: PathBuf,
        /// SQLite's report.
        source: StoreError,
    },
    /// A shared (PostgreSQL) store is not this directory's, or failed.
    #[error(transparent)]
    Shared(#[from] SharedStoreError),
    /// The store failed otherwise.
    #[error("the store {}: {source}", path.display())]
    Store {
        /// The store's file.
        path: PathBuf,
        /// Why.
        source: StoreError,
    },
}

/// Why a shared (PostgreSQL) store cannot be used with a data directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SharedStoreError {
    /// The database is another deployment's than the one the data directory served before.
    #[error(
        "the database {url} is store {found}, but {} records store {expected}: this data directory served another database before. Point --store at that one; or, to move this broker to this database on purpose, delete {} (or start once with --reinitialize, which records the database's id)",
        id_file.display(),
        id_file.display()
    )]
    Mismatch {
        /// The database, without its password.
        url: String,
        /// The id the database holds.
        found: String,
        /// The store id file.
        id_file: PathBuf,
        /// The id the directory records.
        expected: String,
    },
    /// The database holds nothing, but the data directory served a store before: pointed at a
    /// new or emptied database.
    #[error(
        "the database {url} holds no data, but {} records store {expected}: restore the database from a backup, point --store at the right database, or start afresh on this empty one with --reinitialize",
        id_file.display()
    )]
    Blank {
        /// The database, without its password.
        url: String,
        /// The store id file.
        id_file: PathBuf,
        /// The id the directory records.
        expected: String,
    },
    /// The database failed.
    #[error("the database {url}: {source}")]
    Store {
        /// The database, without its password.
        url: String,
        /// Why.
        source: StoreError,
    },
}

fn holder(pid: Option<u32>) -> String {
    pid.map_or_else(|| "another process".to_string(), |pid| format!("PID {pid}"))
}

/// How a store of a directory that has held one was found lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// The file does not exist.
    Missing,
    /// The file is empty (0 bytes: truncated).
    Empty,
    /// The file is a database that holds no broker data (not even an id).
    Blank,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lost::Missing => "is missing",
            Lost::Empty => "is empty (0 bytes)",
            Lost::Blank => "holds no data",
        })
    }
}

/// How a data directory is known to have held a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// `store.id` records the store's id.
    StoreId {
        /// The store id file.
        file: PathBuf,
        /// The id it records.
        id: String,
    },
    /// The files a broker writes at its first start are there (a directory from before
    /// `store.id` existed).
    FirstStartFiles(Vec<PathBuf>),
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Held::StoreId { file, id } => write!(f, "{} records store {id}", file.display()),
            Held::FirstStartFiles(files) => {
                let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
                write!(f, "{} exist", names.join(" and "))
            }
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| file_err(path.to_path_buf(), source)
}

/// A failure of a file of the data directory: [`DataDirError::Full`] when the file system is out
/// of space, [`DataDirError::Io`] otherwise.
fn file_err(path: PathBuf, source: std::io::Error) -> DataDirError {
    if is_out_of_space(&source) {
        DataDirError::Full { path, source }
    } else {
        DataDirError::Io { path, source }
    }
}

impl DataDirError {
    /// Whether the file system that holds the data directory is out of space, so that starting
    /// again can succeed once space is freed.
    pub fn is_full(&self) -> bool {
        match self {
            DataDirError::Full { .. } => true,
            DataDirError::Store { source, .. } => source.is_full(),
            _ => false,
        }
    }
}

/// The data directory's exclusive lock (an `flock` on `<data-dir>/lock`, which holds the PID of
/// its holder), held for as long as this value lives. The kernel lets go of it when the process
/// ends, however it ends: a lock file left behind by a killed broker locks nothing.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock of `dir`, or says which process has it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, DataDirError> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
                return Err(DataDirError::InUse { dir: dir.to_path_buf(), pid });
            }
            Err(TryLockError::Error(source)) => return Err(DataDirError::Io { path, source }),
        }
        make_private(&path).map_err(io_err(&path))?;
        file.set_len(0).map_err(io_err(&path))?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(io_err(&path))?;
        Ok(DataDirLock { _file: file })
    }
}

/// Narrows the mode of an existing file to 0600 when it allows more (group or others). A file
/// that does not exist is left alone.
pub fn make_private(path: &Path) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes a file private to the broker (0600) durably ([`write_durably`]).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), DataDirError> {
    write_durably(path, contents, 0o600).map_err(|(path, source)| file_err(path, source))
}

/// Writes `path` with `mode` durably: a temporary file beside it (`<name>.tmp`) is written and
/// synced, renamed over `path`, and the directory is synced so the rename survives a crash. The
/// mode is set explicitly (the umask does not narrow or widen it). An error names the file.
pub fn write_durably(path: &Path, contents: &[u8], mode: u32) -> Result<(), (PathBuf, std::io::Error)> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    let mut f =
        OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(at(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(at(&tmp))?;
    f.write_all(contents).map_err(at(&tmp))?;
    f.sync_all().map_err(at(&tmp))?;
    std::fs::rename(&tmp, path).map_err(at(path))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))?;
    }
    Ok(())
}

/// How [`open_store`] opens the store of a data directory.
#[derive(Debug, Clone)]
pub struct OpenStore<'a> {
    /// The data directory (holds `store.id`).
    pub dir: &'a Path,
    /// The store's database file.
    pub db: &'a Path,
    /// How thoroughly the store is checked.
    pub check: StoreCheck,
    /// Start afresh when the store is missing, empty, damaged or another directory's: what is
    /// found is renamed aside, a new store is made, and the log says each step.
    pub reinitialize: bool,
    /// Files a broker writes at its first start: when all of them exist, the directory has held
    /// a store even without `store.id` (it was made before `store.id` existed).
    pub first_start_files: &'a [PathBuf],
}

/// A store opened by [`open_store`], and its integrity check, which may still be running.
pub struct OpenedStore {
    /// The store. Until [`PendingCheck::wait`] has returned `Ok`, only read it.
    pub store: SqliteStore,
    /// The integrity check of the store.
    pub check: PendingCheck,
}

/// The integrity check of a store [`open_store`] opened: on a thread of its own when the store
/// was the directory's own and nothing had to be written to it, done already otherwise.
#[derive(Debug)]
pub struct PendingCheck {
    running: Option<BackgroundCheck>,
    db: PathBuf,
}

impl PendingCheck {
    fn done(db: &Path) -> PendingCheck {
        PendingCheck { running: None, db: db.to_path_buf() }
    }

    /// No check to wait for (a store whose server checks itself: PostgreSQL).
    pub fn none() -> PendingCheck {
        PendingCheck { running: None, db: PathBuf::new() }
    }

    /// Waits for the check. A damaged store is refused as it is at open
    /// ([`DataDirError::Damaged`], which says how to restore it). Later calls return `Ok` at once.
    pub fn wait(&mut self) -> Result<(), DataDirError> {
        let Some(mut running) = self.running.take() else { return Ok(()) };
        match running.wait() {
            Ok(()) => Ok(()),
            Err(source) if source.is_damage() => Err(DataDirError::Damaged { path: self.db.clone(), source }),
            Err(source) => Err(DataDirError::Store { path: self.db.clone(), source }),
        }
    }

    /// `refusal`, unless the check finds the store damaged: then that, as at open (damage is
    /// what the operator has to act on first, and the earlier refusal may be its symptom).
    pub fn or_damage(&mut self, refusal: DataDirError) -> DataDirError {
        self.wait().err().unwrap_or(refusal)
    }
}

/// Opens the data directory's store if it is the one the directory held (or the directory never
/// held one), records its identity, and returns it. See the module documentation.
///
/// When the store found is the directory's own, its integrity check still runs when this
/// returns ([`OpenedStore::check`]), so that the caller loads the store meanwhile; every other
/// case (a new store, an id to record, `--reinitialize`) waits for the check before it writes.
pub fn open_store(o: &OpenStore<'_>) -> Result<OpenedStore, DataDirError> {
    let id_file = o.dir.join(STORE_ID_FILE);
    let recorded = read_store_id(&id_file)?;
    let held = match &recorded {
        Some(id) => Some(Held::StoreId { file: id_file.clone(), id: id.clone() }),
        None if !o.first_start_files.is_empty() && o.first_start_files.iter().all(|f| f.exists()) => {
            Some(Held::FirstStartFiles(o.first_start_files.to_vec()))
        }
        None => None,
    };
    let lost = match std::fs::metadata(o.db) {
        Ok(meta) if meta.len() == 0 => Some(Lost::Empty),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Lost::Missing),
        Err(e) => return Err(io_err(o.db)(e)),
    };
    // Whether the store found was renamed aside: the store opened next is a new, blank one.
    let mut afresh = false;
    if let (Some(state), Some(held)) = (lost, held.clone()) {
        allow_afresh(o, DataDirError::StoreLost { path: o.db.to_path_buf(), state, held })?;
        set_aside(o.db)?;
        afresh = true;
    }
    // With --reinitialize a damaged store is set aside before anything else, so the check runs
    // first; otherwise it runs beside the caller's work.
    let opened = if o.reinitialize {
        SqliteStore::open_checked(o.db, o.check).map(|store| (store, PendingCheck::done(o.db)))
    } else {
        SqliteStore::open_checking_in_background(o.db, o.check)
            .map(|(store, check)| (store, PendingCheck { running: Some(check), db: o.db.to_path_buf() }))
    };
    let (store, mut check) = match opened {
        Ok(opened) => opened,
        Err(source) if source.is_damage() => {
            allow_afresh(o, DataDirError::Damaged { path: o.db.to_path_buf(), source })?;
            set_aside(o.db)?;
            afresh = true;
            (open(o)?, PendingCheck::done(o.db))
        }
        Err(source) => return Err(store_err(o, source)),
    };
    let found = match store.get_meta(META_STORE_ID) {
        Ok(found) => found,
        Err(e) => return Err(check.or_damage(store_err(o, e))),
    };
    match (found.map(|id| String::from_utf8_lossy(&id).into_owned()), recorded) {
        (Some(found), Some(expected)) if found == expected => Ok(OpenedStore { store, check }),
        (Some(found), Some(expected)) => {
            drop(store);
            let path = o.db.to_path_buf();
            let refusal = DataDirError::StoreMismatch { path, found, id_file, expected };
            if !o.reinitialize {
                return Err(check.or_damage(refusal));
            }
            allow_afresh(o, refusal)?;
            set_aside(o.db)?;
            let store = open(o)?;
            claim(o, &store, None)?;
            Ok(OpenedStore { store, check: PendingCheck::done(o.db) })
        }
        (Some(found), None) => {
            check.wait()?;
            write_private(&id_file, found.as_bytes())?;
            tracing::info!(file = %id_file.display(), store_id = %found, "recorded the store's id");
            Ok(OpenedStore { store, check })
        }
        (None, recorded) => {
            check.wait()?;
            if !store.is_blank().map_err(|e| store_err(o, e))? {
                // Data from a broker that predates store ids: the directory's own store.
                tracing::warn!(path = %o.db.display(), "the store holds data but no id (it predates store ids); recording one");
                claim(o, &store, recorded)?;
                return Ok(OpenedStore { store, check });
            }
            if let (Some(held), false) = (held, afresh) {
                let path = o.db.to_path_buf();
                allow_afresh(o, DataDirError::StoreLost { path, state: Lost::Blank, held })?;
            }
            claim(o, &store, None)?;
            Ok(OpenedStore { store, check })
        }
    }
}

fn store_err(o: &OpenStore<'_>, source: StoreError) -> DataDirError {
    DataDirError::Store { path: o.db.to_path_buf(), source }
}

fn open(o: &OpenStore<'_>) -> Result<SqliteStore, DataDirError> {
    SqliteStore::open_checked(o.db, o.check).map_err(|e| store_err(o, e))
}

/// Gives `store` an id (`id`, or a new one), in the store first and then in `store.id`: after a
/// crash between the two, the next start finds the store's id and records it.
fn claim(o: &OpenStore<'_>, store: &SqliteStore, id: Option<String>) -> Result<(), DataDirError> {
    let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    store.put_meta(META_STORE_ID, id.as_bytes()).map_err(|e| store_err(o, e))?;
    let id_file = o.dir.join(STORE_ID_FILE);
    write_private(&id_file, id.as_bytes())?;
    tracing::info!(file = %id_file.display(), store_id = %id, "recorded the store's id");
    Ok(())
}

/// Refuses with `refusal`, unless the operator asked to start afresh: then the log says why.
fn allow_afresh(o: &OpenStore<'_>, refusal: DataDirError) -> Result<(), DataDirError> {
    if !o.reinitialize {
        return Err(refusal);
    }
    tracing::warn!(reason = %refusal, "--reinitialize: starting afresh with a new, empty store");
    Ok(())
}

/// Renames the store's files (the database, its `-wal` and `-shm`) aside, to
/// `<file>.set-aside-<unix seconds>`, logging each rename. Nothing is deleted.
fn set_aside(db: &Path) -> Result<(), DataDirError> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    for file in SqliteStore::files(db) {
        if std::fs::symlink_metadata(&file).is_err() {
            continue;
        }
        let mut n = 0u32;
        let aside = loop {
            let mut name = file.as_os_str().to_os_string();
            name.push(format!(".set-aside-{stamp}"));
            if n > 0 {
                name.push(format!("-{n}"));
            }
            let candidate = PathBuf::from(name);
            if std::fs::symlink_metadata(&candidate).is_err() {
                break candidate;
            }
            n += 1;
        };
        std::fs::rename(&file, &aside).map_err(io_err(&file))?;
        tracing::warn!(from = %file.display(), to = %aside.display(), "--reinitialize: renamed a file of the old store aside");
    }
    Ok(())
}

/// The store a broker serves from: the data directory's SQLite file, or a PostgreSQL database
/// that several brokers share. The start-up code chooses it (`--store`); everything after sees a
/// [`Store`].
pub enum DataStore {
    /// The data directory's own SQLite file.
    Sqlite(SqliteStore),
    /// A shared PostgreSQL database (with a change feed).
    Postgres(Box<PostgresStore>),
}

impl DataStore {
    /// Whether the store holds nothing but its own bookkeeping.
    pub fn is_blank(&self) -> Result<bool, StoreError> {
        match self {
            DataStore::Sqlite(s) => s.is_blank(),
            DataStore::Postgres(s) => s.is_blank(),
        }
    }
}

impl Store for DataStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        match self {
            DataStore::Sqlite(s) => s.load(),
            DataStore::Postgres(s) => s.load(),
        }
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        match self {
            DataStore::Sqlite(s) => s.commit(changes),
            DataStore::Postgres(s) => s.commit(changes),
        }
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            DataStore::Sqlite(s) => s.get_meta(key),
            DataStore::Postgres(s) => s.get_meta(key),
        }
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        match self {
            DataStore::Sqlite(s) => s.put_meta(key, value),
            DataStore::Postgres(s) => s.put_meta(key, value),
        }
    }

    fn feed(&self) -> Option<&dyn ChangeFeed> {
        match self {
            DataStore::Sqlite(s) => s.feed(),
            DataStore::Postgres(s) => s.feed(),
        }
    }
}

/// Opens the shared PostgreSQL store at `url` for the data directory `dir` (which still holds
/// the lock, the admin token and TLS files, and `store.id`). The database's id is made by the
/// first broker that opens it and recorded in every data directory that serves it; a directory
/// that served another database, or a database that is empty while the directory served one, is
/// refused unless `reinitialize` (then the database's id is recorded; nothing in the database is
/// changed or removed).
pub fn open_shared_store(
    dir: &Path,
    url: &PostgresUrl,
    reinitialize: bool,
) -> Result<PostgresStore, DataDirError> {
    let shown = url.to_string();
    let failed = |source| SharedStoreError::Store { url: shown.clone(), source };
    let store = PostgresStore::open(url).map_err(failed)?;
    let id_file = dir.join(STORE_ID_FILE);
    let recorded = read_store_id(&id_file)?;
    let found = store.get_meta(META_STORE_ID).map_err(failed)?;
    if let (None, Some(expected)) = (&found, &recorded)
        && store.is_blank().map_err(failed)?
    {
        let refusal = SharedStoreError::Blank {
            url: shown.clone(),
            id_file: id_file.clone(),
            expected: expected.clone(),
        };
        if !reinitialize {
            return Err(refusal.into());
        }
        tracing::warn!(reason = %refusal, "--reinitialize: serving the empty database");
    }
    // Of several brokers that open a new database at once, one id wins and all record it.
    let id = match found {
        Some(id) => String::from_utf8_lossy(&id).into_owned(),
        None => {
            let new = uuid::Uuid::new_v4().to_string();
            String::from_utf8_lossy(&store.put_meta_if_absent(META_STORE_ID, new.as_bytes()).map_err(failed)?)
                .into_owned()
        }
    };
    match recorded {
        Some(expected) if expected == id => return Ok(store),
        Some(expected) => {
            let refusal = SharedStoreError::Mismatch {
                url: shown,
                found: id.clone(),
                id_file: id_file.clone(),
                expected,
            };
            if !reinitialize {
                return Err(refusal.into());
            }
            tracing::warn!(reason = %refusal, "--reinitialize: recording the database's id");
        }
        None => {}
    }
    write_private(&id_file, id.as_bytes())?;
    tracing::info!(file = %id_file.display(), store_id = %id, "recorded the store's id");
    Ok(store)
}

/// The id `store.id` records, if the file exists.
fn read_store_id(path: &Path) -> Result<Option<String>, DataDirError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_that_finds_no_room_is_out_of_disk_space_and_other_failures_are_not() {
        const ENOSPC: i32 = 28;
        const EDQUOT: i32 = 122;
        const EACCES: i32 = 13;
        let path = PathBuf::from("/data/admin.token");
        for errno in [ENOSPC, EDQUOT] {
            let e = file_err(path.clone(), std::io::Error::from_raw_os_error(errno));
            assert!(matches!(e, DataDirError::Full { .. }) && e.is_full(), "{e:?}");
            let text = e.to_string();
            assert!(
                text.starts_with("/data/admin.token: out of disk space (") && text.contains("free space"),
                "{text}"
            );
        }
        let denied = file_err(path.clone(), std::io::Error::from_raw_os_error(EACCES));
        assert!(matches!(denied, DataDirError::Io { .. }) && !denied.is_full(), "{denied:?}");
        // The store's own file errors say the same.
        let store = StoreError::Io { path: path.clone(), source: std::io::Error::from_raw_os_error(ENOSPC) };
        assert!(store.is_full() && !store.is_damage());
        assert!(DataDirError::Store { path, source: store }.is_full());
    }
}
