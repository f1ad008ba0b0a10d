//! Durable storage behind the [`Store`] trait. Only this module knows SQL. A change is
//! acknowledged to a caller only after [`Store::commit`] returned, so everything in it survives a
//! crash (WAL, full sync). Key material arrives already sealed: the store never sees plaintext.

pub mod sqlite;

use crate::model::{Change, Deletion, KeyVersion, Principal, RoleAssignment, Vault};

/// A failure of the storage backend. Reported to callers as "store unavailable"; the detail is
/// logged, never returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database refused or failed an operation.
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// A stored document did not decode: the file was changed outside the broker, or by a newer one.
    #[error("corrupt stored document in {table}: {source}")]
    Corrupt {
        /// Where.
        table: &'static str,
        /// Why.
        source: serde_json::Error,
    },
    /// Opening the data directory failed.
    #[error("cannot open store at {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database was written by an incompatible version of the broker.
    #[error("unsupported schema version {0}")]
    Schema(i64),
}

/// A key as stored: its versions (oldest first) with their sealed material.
#[derive(Debug, Clone)]
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

/// Everything the broker loads at start.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Vaults.
    pub vaults: Vec<Vault>,
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
}

/// Durable state. Methods block: async callers run them on the blocking pool.
pub trait Store: Send + Sync + 'static {
    /// Reads everything.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Commits the changes atomically and durably: all or none.
    fn commit(&self, changes: &[Change]) -> Result<(), StoreError>;
    /// Reads a broker-internal value (sealed signing key, master-key check, …).
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes a broker-internal value durably.
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
}
