//! SQL logical servers and managed instances, their identity blocks, TDE protectors and
//! databases, with the rules of docs/RULES.md R4 that need no state beyond their arguments.

use serde::{Deserialize, Serialize};

use super::error::BrokerError;
use super::ids::printable;

/// SQL logical server or managed instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerKind {
    /// `Microsoft.Sql/servers`: a trusted service for the vault firewall.
    SqlServer,
    /// `Microsoft.Sql/managedInstances`: reaches the vault from its own subnet.
    ManagedInstance,
}

impl ServerKind {
    /// The ARM resource type segment.
    pub fn resource_type(self) -> &'static str {
        match self {
            ServerKind::SqlServer => "servers",
            ServerKind::ManagedInstance => "managedInstances",
        }
    }
}

/// The identity block of a server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerIdentity {
    /// The system-assigned identity's principal id, when it is on.
    pub system_principal_id: Option<String>,
    /// Resource ids of assigned user-assigned identities (kept even if an identity is deleted,
    /// as the cloud keeps the dangling reference).
    pub user_assigned: Vec<String>,
    /// The primary user-assigned identity (one of `user_assigned`).
    pub primary: Option<String>,
}

/// Which identity TDE uses (docs/RULES.md R4.1): the primary UMI; without UMIs, the SMI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EffectiveIdentity {
    /// A user-assigned identity, by resource id.
    UserAssigned(String),
    /// The system-assigned identity, by principal id.
    SystemAssigned(String),
    /// Neither: TDE with CMK cannot be used.
    None,
}

impl ServerIdentity {
    /// The effective identity.
    pub fn effective(&self) -> EffectiveIdentity {
        if let Some(p) = &self.primary {
            return EffectiveIdentity::UserAssigned(p.clone());
        }
        if self.user_assigned.is_empty()
            && let Some(s) = &self.system_principal_id
        {
            return EffectiveIdentity::SystemAssigned(s.clone());
        }
        EffectiveIdentity::None
    }

    /// Validates a requested block: the primary must be one of the assigned identities; with
    /// exactly one UMI and no primary, that one is primary; with several, one must be named.
    pub fn normalise(
        user_assigned: &[String],
        primary: &str,
        system_principal_id: Option<String>,
    ) -> Result<ServerIdentity, BrokerError> {
        let mut umis: Vec<String> = Vec::new();
        for u in user_assigned.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            if !umis.iter().any(|x| x.eq_ignore_ascii_case(u)) {
                umis.push(u.to_string());
            }
        }
        let primary = match (primary.trim(), umis.len()) {
            ("", 0) => None,
            ("", 1) => Some(umis[0].clone()),
            ("", _) => {
                return Err(BrokerError::bad_parameter(
                    "Several user-assigned identities are assigned: name the primary one (primary_user_assigned_identity_id).",
                ));
            }
            (p, _) => match umis.iter().find(|u| u.eq_ignore_ascii_case(p)) {
                Some(u) => Some(u.clone()),
                None => {
                    return Err(BrokerError::bad_parameter(format!(
                        "The primary user-assigned identity '{}' is not among the server's user-assigned identities.",
                        printable(p)
                    )));
                }
            },
        };
        Ok(ServerIdentity { system_principal_id, user_assigned: umis, primary })
    }
}

/// The TDE protector of a server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protector {
    /// Service-managed TDE: no vault involved.
    ServiceManaged,
    /// A customer-managed key in a vault.
    AzureKeyVault {
        /// The key URI as set (with or without version).
        key_id: String,
        /// The versioned key URI in use.
        kid: String,
        /// Follow the key's newest version (only when `key_id` has no version).
        auto_rotation: bool,
    },
}

/// Database states (API `DatabaseState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DbState {
    /// Serving.
    Online,
    /// Refusing all connections: the server lost access to its protector.
    Inaccessible,
}

/// Why a database is inaccessible (API `Database.reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Reason {
    IdentityMissingPermissions,
    IdentityDeleted,
    NoIdentity,
    KeyDisabled,
    KeyExpired,
    KeyNotYetValid,
    KeyDeleted,
    Firewall,
    RevalidationRequired,
    /// Not in the cloud's list: transient faults outlasted `transient_grace`.
    VaultUnreachable,
}

impl Reason {
    /// The API's spelling.
    pub fn name(self) -> &'static str {
        use Reason::*;
        match self {
            IdentityMissingPermissions => "IDENTITY_MISSING_PERMISSIONS",
            IdentityDeleted => "IDENTITY_DELETED",
            NoIdentity => "NO_IDENTITY",
            KeyDisabled => "KEY_DISABLED",
            KeyExpired => "KEY_EXPIRED",
            KeyNotYetValid => "KEY_NOT_YET_VALID",
            KeyDeleted => "KEY_DELETED",
            Firewall => "FIREWALL",
            RevalidationRequired => "REVALIDATION_REQUIRED",
            VaultUnreachable => "VAULT_UNREACHABLE",
        }
    }
}

/// A server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    /// ARM id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: ServerKind,
    /// Identity block.
    pub identity: ServerIdentity,
    /// TDE protector.
    pub protector: Protector,
    /// Subnet of a managed instance.
    pub subnet_id: Option<String>,
    /// Object id of the principal that stands for the server's engine host.
    pub host_principal_id: String,
    /// Creation time.
    pub created: i64,
    /// The Vault-KV mounts a MariaDB server reads its keys from (docs/MARIADB.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kv_mounts: Vec<KvMount>,
}

/// A Vault-KV (version 2) mount through which one MariaDB server reads its data-at-rest keys:
/// each key id is a DEK kept wrapped under the server's TDE protector, unwrapped for a read as
/// the server's engine host of `database`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvMount {
    /// The mount path: the vault URL's path after `/v1/`, without slashes at either end.
    pub path: String,
    /// The database of the server whose TDE state gates the keys.
    pub database: String,
    /// SHA-256 (hex) of the mount's token; the token itself is never stored.
    pub token_sha256: String,
    /// The key ids, ascending.
    pub keys: Vec<KvKey>,
}

/// One key id of a mount (MariaDB's `ENCRYPTION_KEY_ID`) and its versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvKey {
    /// The key id, 1..=4294967295.
    pub id: u32,
    /// Versions, ascending from 1; the last is the latest.
    pub versions: Vec<KvKeyVersion>,
}

/// One version of a key id: a 256-bit DEK wrapped under a protector version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvKeyVersion {
    /// The version number, from 1.
    pub version: u32,
    /// The wrapped DEK (base64).
    pub wrapped: String,
    /// The versioned key URI that wrapped it.
    pub kid: String,
    /// When the version was created (broker clock).
    pub created: i64,
}

impl KvMount {
    /// Normalises a mount path: no slashes at either end, non-empty segments of letters, digits,
    /// `-`, `_` and `.`, not starting with `sys` (Vault's own).
    pub fn normalise_path(path: &str) -> Result<String, BrokerError> {
        let p = path.trim().trim_matches('/');
        let ok = !p.is_empty()
            && p.len() <= 200
            && p.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            })
            && p.split('/').next() != Some("sys")
            && !p.split('/').any(|seg| seg == "data");
        if ok {
            Ok(p.to_string())
        } else {
            Err(BrokerError::bad_parameter(format!(
                "The mount path '{}' is invalid: segments of letters, digits, '-', '_' and '.', separated by '/', not starting with 'sys' and without a 'data' segment.",
                printable(path)
            )))
        }
    }

    /// The key id `id`.
    pub fn key(&self, id: u32) -> Option<&KvKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

impl KvKey {
    /// Version `version`, or the latest.
    pub fn version(&self, version: Option<u32>) -> Option<&KvKeyVersion> {
        match version {
            Some(v) => self.versions.iter().find(|x| x.version == v),
            None => self.versions.last(),
        }
    }
}

/// A database and its TDE state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Database {
    /// Server ARM id.
    pub server_id: String,
    /// Name.
    pub name: String,
    /// State.
    pub state: DbState,
    /// Why it is inaccessible.
    pub reason: Option<Reason>,
    /// When the state last changed.
    pub state_since: i64,
    /// When access was lost (start of the heal window), while inaccessible.
    pub lost_at: Option<i64>,
}

/// What an evaluation of the server's access to its protector found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Everything SQL checks holds.
    Ok,
    /// A "4xx" cause: access is lost.
    Lost(Reason),
    /// A transient ("5xx") fault: the vault could not be asked.
    Transient,
}

/// Timing of the TDE state machine, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdeTiming {
    /// Access restored within this long after it was lost: back ONLINE by itself.
    pub heal_window: i64,
    /// How long transient faults are tolerated before the database goes INACCESSIBLE.
    pub transient_grace: i64,
}

impl Default for TdeTiming {
    fn default() -> Self {
        TdeTiming { heal_window: 30 * 60, transient_grace: 24 * 3600 }
    }
}

/// The two activity-log events of a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbEvent {
    /// ONLINE → INACCESSIBLE.
    MakeDatabaseInaccessible,
    /// INACCESSIBLE → ONLINE.
    MakeDatabaseAccessible,
}

impl DbEvent {
    /// The cloud's event name.
    pub fn name(self) -> &'static str {
        match self {
            DbEvent::MakeDatabaseInaccessible => "MakeDatabaseInaccessible",
            DbEvent::MakeDatabaseAccessible => "MakeDatabaseAccessible",
        }
    }
}

impl Database {
    /// A new database: ONLINE.
    pub fn new(server_id: &str, name: &str, now: i64) -> Self {
        Database {
            server_id: server_id.to_string(),
            name: name.to_string(),
            state: DbState::Online,
            reason: None,
            state_since: now,
            lost_at: None,
        }
    }

    /// The state machine of docs/RULES.md R4.7–R4.9: the database after an evaluation at `now`, and
    /// the event if its state changed. `transient_since` is when the current run of transient
    /// faults began.
    pub fn next(
        &self,
        access: Access,
        transient_since: Option<i64>,
        now: i64,
        timing: TdeTiming,
    ) -> (Database, Option<DbEvent>) {
        let mut db = self.clone();
        match (self.state, access) {
            (DbState::Online, Access::Ok) => (db, None),
            (DbState::Online, Access::Lost(reason)) => {
                db.go_inaccessible(reason, now);
                (db, Some(DbEvent::MakeDatabaseInaccessible))
            }
            (DbState::Online, Access::Transient) => {
                // The engine serves from its own cache; only a fault outlasting the grace
                // period costs the database (as a lost access that must heal).
                match transient_since {
                    Some(since) if now - since >= timing.transient_grace => {
                        db.go_inaccessible(Reason::VaultUnreachable, now);
                        db.lost_at = Some(since);
                        (db, Some(DbEvent::MakeDatabaseInaccessible))
                    }
                    _ => (db, None),
                }
            }
            (DbState::Inaccessible, _) if self.reason == Some(Reason::RevalidationRequired) => (db, None),
            (DbState::Inaccessible, Access::Ok) => {
                let lost_at = self.lost_at.unwrap_or(self.state_since);
                if now - lost_at <= timing.heal_window {
                    db.go_online(now);
                    (db, Some(DbEvent::MakeDatabaseAccessible))
                } else {
                    db.reason = Some(Reason::RevalidationRequired);
                    (db, None)
                }
            }
            (DbState::Inaccessible, Access::Lost(reason)) => {
                // Still lost: keep the first loss time, report the current cause.
                db.reason = Some(reason);
                (db, None)
            }
            (DbState::Inaccessible, Access::Transient) => (db, None),
        }
    }

    /// After an explicit revalidation found access: ONLINE again.
    pub fn revalidated(&self, now: i64) -> (Database, Option<DbEvent>) {
        let mut db = self.clone();
        if self.state == DbState::Online {
            return (db, None);
        }
        db.go_online(now);
        (db, Some(DbEvent::MakeDatabaseAccessible))
    }

    fn go_inaccessible(&mut self, reason: Reason, now: i64) {
        self.state = DbState::Inaccessible;
        self.reason = Some(reason);
        self.state_since = now;
        self.lost_at = Some(now);
    }

    fn go_online(&mut self, now: i64) {
        self.state = DbState::Online;
        self.reason = None;
        self.state_since = now;
        self.lost_at = None;
    }
}

/// The documentation link of the TDE error texts, by cloud.
pub fn tde_docs_link(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::AzureChinaCloud => {
            "https://docs.azure.cn/azure-sql/database/transparent-data-encryption-byok-create-server"
        }
        Cloud::AzureCloud | Cloud::AzureUsGovernment => "https://aka.ms/sqltdebyokcreateserver",
    }
}

/// The cloud the broker imitates (docs/RULES.md R3.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Cloud {
    /// Azure public cloud.
    #[default]
    AzureCloud,
    /// Azure operated by 21Vianet.
    AzureChinaCloud,
    /// Azure Government.
    #[serde(rename = "AzureUSGovernment")]
    AzureUsGovernment,
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: TdeTiming = TdeTiming { heal_window: 1800, transient_grace: 86_400 };

    #[test]
    fn lost_access_makes_an_online_database_inaccessible_with_the_reason() {
        let db = Database::new("s", "db", 0);
        let (db, ev) = db.next(Access::Lost(Reason::KeyDisabled), None, 100, T);
        assert_eq!(
            (db.state, db.reason, ev),
            (DbState::Inaccessible, Some(Reason::KeyDisabled), Some(DbEvent::MakeDatabaseInaccessible))
        );
        assert_eq!(db.lost_at, Some(100));
    }

    #[test]
    fn access_restored_within_the_heal_window_brings_the_database_back_online() {
        let (db, _) = Database::new("s", "db", 0).next(Access::Lost(Reason::KeyDisabled), None, 100, T);
        let (db, ev) = db.next(Access::Ok, None, 100 + 1800, T);
        assert_eq!((db.state, ev), (DbState::Online, Some(DbEvent::MakeDatabaseAccessible)));
    }

    #[test]
    fn access_restored_after_the_heal_window_requires_revalidation() {
        let (db, _) = Database::new("s", "db", 0).next(Access::Lost(Reason::IdentityDeleted), None, 100, T);
        let (db, ev) = db.next(Access::Ok, None, 100 + 1801, T);
        assert_eq!(
            (db.state, db.reason, ev),
            (DbState::Inaccessible, Some(Reason::RevalidationRequired), None)
        );
        // It stays so, whatever happens, until revalidated.
        let (db2, ev) = db.next(Access::Ok, None, 10_000, T);
        assert_eq!((db2.reason, ev), (Some(Reason::RevalidationRequired), None));
        let (db3, ev) = db2.revalidated(10_001);
        assert_eq!((db3.state, ev), (DbState::Online, Some(DbEvent::MakeDatabaseAccessible)));
    }

    #[test]
    fn transient_faults_keep_the_database_online_through_the_grace_period() {
        let db = Database::new("s", "db", 0);
        let (db, ev) = db.next(Access::Transient, Some(0), 86_399, T);
        assert_eq!((db.state, ev), (DbState::Online, None));
        let (db, ev) = db.next(Access::Transient, Some(0), 86_400, T);
        assert_eq!((db.state, ev), (DbState::Inaccessible, Some(DbEvent::MakeDatabaseInaccessible)));
    }

    #[test]
    fn primary_user_assigned_identity_is_preferred_over_the_system_assigned_one() {
        let id = ServerIdentity::normalise(&["/u1".into(), "/u2".into()], "/u2", Some("smi".into())).unwrap();
        assert_eq!(id.effective(), EffectiveIdentity::UserAssigned("/u2".into()));
        let only_smi = ServerIdentity::normalise(&[], "", Some("smi".into())).unwrap();
        assert_eq!(only_smi.effective(), EffectiveIdentity::SystemAssigned("smi".into()));
        assert_eq!(ServerIdentity::normalise(&[], "", None).unwrap().effective(), EffectiveIdentity::None);
    }

    #[test]
    fn a_mount_path_is_trimmed_of_slashes_and_keeps_clear_of_vaults_own_paths() {
        assert_eq!(KvMount::normalise_path("/kv/mariadb/").unwrap(), "kv/mariadb");
        assert_eq!(KvMount::normalise_path("mariadb").unwrap(), "mariadb");
        for bad in ["", "/", "sys/x", "kv//m", "kv/../m", "kv/data/m", "kv m", "kv/m?x"] {
            assert!(KvMount::normalise_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn several_user_assigned_identities_need_a_named_primary_from_the_list() {
        assert!(ServerIdentity::normalise(&["/u1".into(), "/u2".into()], "", None).is_err());
        assert!(ServerIdentity::normalise(&["/u1".into()], "/u3", None).is_err());
        assert_eq!(
            ServerIdentity::normalise(&["/u1".into()], "", None).unwrap().primary.as_deref(),
            Some("/u1")
        );
    }
}
