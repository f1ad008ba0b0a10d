//! Durable storage behind the [`Store`] trait. Only this module knows SQL. A change is
//! acknowledged to a caller only after [`Store::commit`] returned, so everything in it survives a
//! crash (WAL, full sync). Key material arrives already sealed: the store never sees plaintext.
//!
//! Backends: [`sqlite::SqliteStore`] (the broker's default), [`postgres::PostgresStore`] (a
//! database several brokers share, with a [`ChangeFeed`]) and [`memory::MemoryStore`] (nothing
//! durable; for tests). Every backend runs the conformance suite of `conformance/`, which spells out
//! what the broker relies on; its module documentation says how a new backend runs it.

#[cfg(test)]
pub(crate) mod conformance;
pub mod datadir;
pub mod memory;
pub mod postgres;
pub mod sqlite;

use crate::model::{Change, Deletion, KeyVersion, Principal, RoleAssignment, Vault};

/// A failure of the storage backend. Reported to callers as "store unavailable", as a damaged
/// store when [`StoreError::is_damage`] says so, or as "out of disk space" when
/// [`StoreError::is_full`] does; the detail is logged, never returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database refused or failed an operation (SQLite's corruption errors become
    /// [`StoreError::Damaged`] instead, and its disk-full error [`StoreError::Full`]).
    #[error("database error: {0}")]
    Database(#[source] rusqlite::Error),
    /// The file system that holds the store is out of space (`SQLITE_FULL`: a write to the
    /// database, its write-ahead log or a journal failed with `ENOSPC` or `EDQUOT`). Nothing of
    /// the operation was written: the transaction was rolled back. Neither damage nor the
    /// caller's fault: the same write succeeds once space is freed.
    #[error("out of disk space: {0}")]
    Full(#[source] rusqlite::Error),
    /// The database file is damaged: SQLite reported corruption (`SQLITE_CORRUPT`), found that the
    /// file is not a database (`SQLITE_NOTADB`), or its integrity check at open listed faults.
    /// Retrying cannot help: the store has to be restored from a backup.
    #[error("the database is damaged: {detail}")]
    Damaged {
        /// SQLite's own words: its error message, or the integrity check's report.
        detail: String,
        /// SQLite's error, when the damage surfaced as one.
        #[source]
        source: Option<rusqlite::Error>,
    },
    /// A stored document did not decode: the file was changed outside the broker, or by a newer one.
    #[error("corrupt stored document in {table}: {source}")]
    Corrupt {
        /// Where.
        table: &'static str,
        /// Why.
        source: serde_json::Error,
    },
    /// Opening the data directory failed.
    #[error("cannot open store at {}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database was written by an incompatible version of the broker.
    #[error("unsupported schema version {0}")]
    Schema(i64),
    /// Another broker committed first ([`ChangeFeed::commit_after`]): the caller's memory is
    /// behind the feed's head, so its changes might rest on stale state. Nothing was written; the
    /// caller catches up and may retry.
    #[error("another broker committed first (feed head {head}, expected {expected})")]
    Conflict {
        /// The feed's head when the commit was refused.
        head: u64,
        /// The head the caller expected.
        expected: u64,
    },
    /// The database server cannot be reached or stopped answering (connection refused, reset or
    /// closed, no connection within the pool's timeout, the server shutting down): nothing of the
    /// operation is known to have been written unless it reported success. Neither damage nor
    /// the caller's fault: the same operation can succeed once the server is back.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// PostgreSQL refused or failed an operation it received (the whole transaction was rolled
    /// back). Its SQLSTATE is in the source.
    #[error("database error: {0}")]
    Postgres(#[source] tokio_postgres::Error),
    /// The change feed no longer holds the batch after `after` (old batches are pruned): a
    /// follower at `after` cannot catch up batch by batch and must reload the whole store
    /// ([`ChangeFeed::load_at_head`]).
    #[error(
        "the change feed no longer holds the batches after {after} (oldest kept: {oldest:?}); reload the store"
    )]
    FeedPruned {
        /// The position asked for.
        after: u64,
        /// The oldest batch the feed still holds, if any.
        oldest: Option<u64>,
    },
    /// A change contradicts what is stored; the whole commit was refused. Every backend reports
    /// these the same way.
    #[error("change refused: {0}")]
    Rejected(#[from] Rejection),
}

impl StoreError {
    /// Whether the stored data is damaged, so that retrying cannot help (the store has to be
    /// restored from a backup): [`StoreError::Damaged`], or a stored document that does not decode.
    pub fn is_damage(&self) -> bool {
        matches!(self, StoreError::Damaged { .. } | StoreError::Corrupt { .. })
    }

    /// Whether the file system that holds the store is out of space, so that the operation can
    /// succeed once space is freed: [`StoreError::Full`], or a file of the store that could not
    /// be written for want of space ([`is_out_of_space`]).
    pub fn is_full(&self) -> bool {
        match self {
            StoreError::Full(_) => true,
            StoreError::Io { source, .. } => is_out_of_space(source),
            StoreError::Postgres(e) => e.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL),
            _ => false,
        }
    }
}

/// Whether an I/O error says the file system (or the user's quota on it) has no room left:
/// `ENOSPC` or `EDQUOT`.
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

impl From<rusqlite::Error> for StoreError {
    /// SQLite's `SQLITE_CORRUPT` and `SQLITE_NOTADB` (with their extended codes) are damage,
    /// `SQLITE_FULL` is a full disk; every other SQLite error is a failed operation.
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::{DatabaseCorrupt, DiskFull, NotADatabase};
        match e.sqlite_error_code() {
            Some(DatabaseCorrupt | NotADatabase) => {
                StoreError::Damaged { detail: e.to_string(), source: Some(e) }
            }
            Some(DiskFull) => StoreError::Full(e),
            _ => StoreError::Database(e),
        }
    }
}

/// Why a store refused a change of a commit (nothing of the commit was applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// A metadata update (`PutKeyVersion` without material) names a version that is not stored.
    #[error("key {vault}/{name} has no version {version} to update")]
    MissingKeyVersion {
        /// Vault name.
        vault: String,
        /// Key name as the change gave it.
        name: String,
        /// The version id.
        version: String,
    },
    /// A new version (`PutKeyVersion` with material) reuses the id of a stored version of the key.
    #[error("key {vault}/{name} already has a version {version}")]
    DuplicateKeyVersion {
        /// Vault name.
        vault: String,
        /// Key name as the change gave it.
        name: String,
        /// The version id.
        version: String,
    },
}

impl Rejection {
    /// The refusal of `PutKeyVersion { vault, name, version, sealed }`: a duplicate when it
    /// carries material (`creating`), a missing version when it is an update.
    pub fn key_version(vault: &str, name: &str, version: &KeyVersion, creating: bool) -> Self {
        let (vault, name, version) = (vault.to_string(), name.to_string(), version.version.clone());
        if creating {
            Rejection::DuplicateKeyVersion { vault, name, version }
        } else {
            Rejection::MissingKeyVersion { vault, name, version }
        }
    }
}

/// The meta value that holds the manual clock's time (Unix seconds, decimal ASCII), written by
/// `Change::SetManualClock` commits.
pub const META_MANUAL_CLOCK: &str = "manual_clock";

/// The tables that hold records, the same in every SQL backend: a store with none of their rows
/// (and no value a broker put in its meta) is blank.
const RECORD_TABLES: [&str; 10] = [
    "vaults",
    "vault_deletions",
    "keys",
    "key_versions",
    "principals",
    "role_assignments",
    "servers",
    "subnets",
    "databases",
    "key_rotation_policies",
];

/// A key as stored: its versions (oldest first) with their sealed material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// Vault name.
    pub vault: String,
    /// Key name as first created.
    pub name: String,
    /// Soft-deletion record.
    pub deleted: Option<Deletion>,
    /// Versions with sealed material, oldest first.
    pub versions: Vec<(KeyVersion, Vec<u8>)>,
}

/// Everything the broker loads at start. Vaults and vault deletions come in name order, keys in
/// (vault, lower-cased name) order, subnets and servers in lower-cased id order, databases in (lower-cased server id,
/// lower-cased name) order; principals and role assignments in no particular order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Vaults, soft-deleted ones included.
    pub vaults: Vec<Vault>,
    /// The soft-deletion records of the vaults that are soft-deleted: (vault name, record).
    pub vault_deletions: Vec<(String, Deletion)>,
    /// Keys of all vaults.
    pub keys: Vec<StoredKey>,
    /// Principals.
    pub principals: Vec<Principal>,
    /// Role assignments (both planes).
    pub role_assignments: Vec<RoleAssignment>,
    /// Subnets.
    pub subnets: Vec<crate::model::vault::Subnet>,
    /// Servers.
    pub servers: Vec<crate::model::server::Server>,
    /// Databases.
    pub databases: Vec<crate::model::server::Database>,
    /// Key rotation policies, in (vault, lower-cased key name) order.
    pub rotation_policies: Vec<StoredRotationPolicy>,
}

/// A key's rotation policy as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRotationPolicy {
    /// Vault name.
    pub vault: String,
    /// Key name as the change gave it.
    pub name: String,
    /// The policy.
    pub policy: crate::model::KeyRotationPolicy,
}

/// Durable state. Methods block: async callers run them on the blocking pool; one store is shared
/// by several threads.
///
/// What every backend keeps to (the conformance suite checks each point):
/// - [`Store::commit`] applies its changes in order, each seeing the ones before it, and all or
///   none: after an error nothing of the commit is visible, and the store stays usable.
/// - Records are identified as follows: vaults by name, exactly as given (the broker lower-cases
///   it); keys by vault and [`key_index`](crate::model::ids::key_index) of the name; key versions
///   by key and version id; principals by object id; role assignments by id; subnets and servers
///   by lower-cased id; databases by lower-cased server id and name. A `Put*` change creates the
///   record or replaces all of it, and the stored document keeps the spelling it was given.
/// - `PutKeyVersion` with material adds a version after the key's others (creating the key,
///   which keeps the name of its first version, and leaving its deletion record alone) and
///   refuses an id the key already has; without material it replaces a stored version's
///   metadata, keeping its material and place, and refuses a version that is not stored. Both
///   refusals are [`StoreError::Rejected`].
/// - `SetVaultDeletion` records (`Some`, replacing an earlier record) or clears (`None`) a
///   vault's deletion record and leaves the vault and its keys alone.
/// - `DeleteVault` removes the vault's keys, their rotation policies and its deletion record too,
///   `DeleteServer` the server's databases, and `PurgeKey` every version, its material and the
///   key's rotation policy. `PutKeyRotationPolicy` sets the policy of a key (by vault and key
///   index), replacing it. Deleting, purging or setting the deletion record of something that is
///   not stored changes nothing.
/// - Meta values live apart from the [`Snapshot`]: commits do not touch them, except
///   `SetManualClock { now }`, which sets the meta value [`META_MANUAL_CLOCK`] to `now` in decimal
///   ASCII within the commit (all or none with the rest of it) and leaves the snapshot alone.
pub trait Store: Send + Sync + 'static {
    /// Reads everything.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Commits the changes atomically and durably: all or none.
    fn commit(&self, changes: &[Change]) -> Result<(), StoreError>;
    /// Reads a broker-internal value (sealed signing key, master-key check, …).
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes a broker-internal value durably.
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// The change feed, for a store that several brokers share (PostgreSQL). `None` for a store
    /// that one broker owns (SQLite, memory): that broker's memory is the only copy to keep fresh.
    fn feed(&self) -> Option<&dyn ChangeFeed> {
        None
    }
}

/// One committed batch as the change feed delivers it: what one [`Store::commit`] (or
/// [`ChangeFeed::commit_after`]) wrote, with its place in the order of all commits.
#[derive(Debug, Clone)]
pub struct FeedEntry {
    /// Its sequence number: 1, 2, 3, … in commit order, with no gaps.
    pub seq: u64,
    /// The broker instance that committed it ([`ChangeFeed::commit_after`]'s `origin`).
    pub origin: String,
    /// The changes, in order.
    pub changes: Vec<Change>,
}

/// The change feed of a store shared by several brokers. Every commit gets the next sequence
/// number in the same transaction, so the feed holds every committed batch, in commit order, and
/// nothing that was rolled back. Methods block, like [`Store`]'s.
pub trait ChangeFeed: Send + Sync {
    /// The sequence number of the last committed batch (0 when nothing was committed).
    fn head(&self) -> Result<u64, StoreError>;
    /// The batches after `after`, in order, at most `limit` of them.
    fn read_after(&self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, StoreError>;
    /// Waits until another commit may have happened (a notification) or `timeout` passed; `true`
    /// when notified. Spurious wake-ups are allowed: callers read from their last sequence number.
    fn wait(&self, timeout: std::time::Duration) -> Result<bool, StoreError>;
    /// Commits `changes` as [`Store::commit`] does, but only if the feed's head is still `after`
    /// (the caller's memory holds every batch up to it): [`StoreError::Conflict`] otherwise, with
    /// nothing written. Returns the batch's sequence number.
    fn commit_after(&self, after: u64, origin: &str, changes: &[Change]) -> Result<u64, StoreError>;
    /// Takes or renews the lease `name` for `holder` for `ttl`; `true` when `holder` holds it
    /// now. A lease another holder let lapse can be taken.
    fn lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool, StoreError>;
    /// Gives up the lease `name` if `holder` holds it.
    fn release(&self, name: &str, holder: &str) -> Result<(), StoreError>;
    /// Reads everything, as [`Store::load`] does, together with the sequence number of the last
    /// batch the snapshot holds (both from one consistent view): a follower that starts from the
    /// snapshot reads the feed after that number, missing nothing and applying nothing twice.
    fn load_at_head(&self) -> Result<(Snapshot, u64), StoreError>;
}
