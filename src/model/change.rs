//! Changes: the only way state moves. Each is committed to the store, then applied to the
//! in-memory state, then the epoch is bumped (ARCHITECTURE.md, invariant 5).

use super::key::{Deletion, KeyVersion};
use super::principal::Principal;
use super::role::RoleAssignment;
use super::vault::Vault;

/// One durable state change. Serializable, so a store shared by several brokers (PostgreSQL) can
/// carry committed changes to the others in its change feed.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// Create or replace a vault's settings and policies.
    PutVault(Vault),
    /// Remove a vault for good (purge): its keys, their versions and material, and its
    /// soft-deletion record go with it.
    DeleteVault {
        /// Vault name.
        vault: String,
    },
    /// Soft-delete (`Some`) or recover (`None`) a vault: the vault keeps its settings, access
    /// policies and keys meanwhile, hidden from every view but the deleted-vault ones.
    SetVaultDeletion {
        /// Vault name.
        vault: String,
        /// Deletion record (same shape as a key's).
        deleted: Option<Deletion>,
    },
    /// Create a key version, or replace its metadata.
    PutKeyVersion {
        /// Vault name.
        vault: String,
        /// Key name as first created.
        name: String,
        /// The version's metadata.
        version: KeyVersion,
        /// Sealed private material: `Some` when the version is created, `None` on updates.
        sealed: Option<Vec<u8>>,
    },
    /// Soft-delete (`Some`) or recover (`None`) a key with all its versions.
    SetKeyDeletion {
        /// Vault name.
        vault: String,
        /// Key name.
        name: String,
        /// Deletion record.
        deleted: Option<Deletion>,
    },
    /// Remove a key, its versions and material for good.
    PurgeKey {
        /// Vault name.
        vault: String,
        /// Key name.
        name: String,
    },
    /// Create or replace a principal.
    PutPrincipal(Principal),
    /// Create or replace a server.
    PutServer(super::server::Server),
    /// Remove a server with its databases, system-assigned identity and host principal.
    DeleteServer {
        /// Server ARM id.
        id: String,
    },
    /// Create or replace a database (its TDE state included).
    PutDatabase(super::server::Database),
    /// Remove a database.
    DeleteDatabase {
        /// Server ARM id.
        server_id: String,
        /// Database name.
        name: String,
    },
    /// Create or replace a subnet's address ranges.
    PutSubnet(super::vault::Subnet),
    /// Remove a principal (its tokens stop working at once).
    DeletePrincipal {
        /// Object id.
        object_id: String,
    },
    /// Create a role assignment.
    PutRoleAssignment(RoleAssignment),
    /// Remove a role assignment.
    DeleteRoleAssignment {
        /// Assignment id.
        id: String,
    },
    /// Set (create or replace) a key's rotation policy. Removed with the key's purge or its
    /// vault's deletion.
    PutKeyRotationPolicy {
        /// Vault name.
        vault: String,
        /// Key name (any case; the key is found by its index).
        name: String,
        /// The policy.
        policy: super::rotation::KeyRotationPolicy,
    },
    /// The manual clock moved to `now` (Unix seconds). Stores keep it as the meta value
    /// `manual_clock`, in the same transaction as the rest of the commit; it leaves the snapshot
    /// alone. Brokers that share a store move their manual clocks when it reaches them.
    SetManualClock {
        /// The clock's new time, Unix seconds.
        now: i64,
    },
}
