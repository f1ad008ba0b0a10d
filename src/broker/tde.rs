//! TDE on the broker's clock (docs/RULES.md R4.7–R4.10): evaluating a server's access to its
//! protector with its effective identity, moving databases through the state machine, emitting the
//! events, and the engine host's wrap/unwrap path.

use zeroize::Zeroizing;

use super::Broker;
use super::keys::CryptoRequest;
use super::state::{State, db_key};
use crate::crypto::{self, Zbytes};
use crate::model::ids::KeyId;
use crate::model::server::{
    Access, Database, DbEvent, EffectiveIdentity, Protector, Reason, Server, ServerKind,
};
use crate::model::{BrokerError, Caller, Change, CryptoOp, KeyPermission, Principal, PrincipalKind};

/// The algorithm the engine path wraps DEKs with.
pub const ENGINE_ALGORITHM: &str = "RSA-OAEP-256";
/// Size of a generated DEK.
pub const DEK_BYTES: usize = 32;

/// One state transition, as published on the watch stream and in the log.
#[derive(Clone, Debug)]
pub struct DbEventRecord {
    /// The database after the transition.
    pub database: Database,
    /// MakeDatabaseInaccessible or MakeDatabaseAccessible.
    pub event: DbEvent,
    /// When (broker clock).
    pub time: i64,
}

/// The principal that stands for an effective identity, if it still exists.
pub fn identity_principal<'a>(st: &'a State, id: &EffectiveIdentity) -> Option<&'a Principal> {
    match id {
        EffectiveIdentity::UserAssigned(rid) => st.principals.values().find(|p| {
            p.kind == PrincipalKind::UserAssignedIdentity
                && p.resource_id.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(rid))
        }),
        EffectiveIdentity::SystemAssigned(pid) => st.principals.get(pid),
        EffectiveIdentity::None => None,
    }
}

/// How an identity is named in the seed's texts: a UMI by resource id, an SMI by principal id.
pub fn identity_label(id: &EffectiveIdentity) -> String {
    match id {
        EffectiveIdentity::UserAssigned(r) => r.clone(),
        EffectiveIdentity::SystemAssigned(p) => p.clone(),
        EffectiveIdentity::None => "(none)".to_string(),
    }
}

/// The servers whose protector `changes` move (auto-rotation): their Vault-KV DEKs follow.
fn protector_moves(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .filter_map(|c| if let Change::PutServer(s) = c { Some(s.id.clone()) } else { None })
        .collect()
}

impl Broker {
    /// The caller the broker acts as when `principal` is `server`'s effective identity: a SQL
    /// logical server as a trusted service, a managed instance from its subnet.
    fn acting_as(&self, server: &Server, principal: &Principal) -> Caller {
        Caller {
            trusted_service: server.kind == ServerKind::SqlServer,
            source_subnet: match server.kind {
                ServerKind::ManagedInstance => server.subnet_id.clone(),
                ServerKind::SqlServer => None,
            },
            ..Caller::new(&principal.object_id, &principal.app_id, &self.settings.issuer())
        }
    }

    /// Whether `principal`, acting for `server`, gets through the data-plane gate's decisions on
    /// the key `id`: the vault's network rules (else [`Reason::Firewall`]), then get, wrapKey and
    /// unwrapKey (else [`Reason::IdentityMissingPermissions`]). The vault must exist (else
    /// [`Reason::KeyDeleted`]). Uncached: the prober and protector validation ask it.
    pub(crate) fn identity_access(
        &self,
        st: &State,
        server: &Server,
        principal: &Principal,
        id: &KeyId,
    ) -> Result<(), Reason> {
        let ve = st.vault(&id.vault).map_err(|_| Reason::KeyDeleted)?;
        let caller = self.acting_as(server, principal);
        let desc = caller.description();
        self.network_decision(st, ve, &caller, &desc).map_err(|_| Reason::Firewall)?;
        let holds = [KeyPermission::Get, KeyPermission::WrapKey, KeyPermission::UnwrapKey]
            .into_iter()
            .all(|p| self.policy_decision(st, ve, &desc, p, Some(&id.name)).is_ok());
        if holds { Ok(()) } else { Err(Reason::IdentityMissingPermissions) }
    }

    /// What SQL checks on every probe and engine call: identity exists, permissions, key not
    /// deleted, enabled, inside nbf/exp (SQL checks expiry itself).
    pub fn evaluate_access(&self, st: &State, server: &Server, now: i64) -> Access {
        let Protector::AzureKeyVault { kid, .. } = &server.protector else { return Access::Ok };
        let effective = server.identity.effective();
        if effective == EffectiveIdentity::None {
            return Access::Lost(Reason::NoIdentity);
        }
        let Some(principal) = identity_principal(st, &effective) else {
            return Access::Lost(Reason::IdentityDeleted);
        };
        let Ok(id) = KeyId::parse(kid, &self.settings.vault_dns_suffix) else {
            return Access::Lost(Reason::KeyDeleted);
        };
        if st.vault(&id.vault).is_err() {
            return Access::Lost(Reason::KeyDeleted);
        }
        if self.faults.outage(&id.vault) {
            return Access::Transient;
        }
        if let Err(reason) = self.identity_access(st, server, principal, &id) {
            return Access::Lost(reason);
        }
        let version = st.vault(&id.vault).ok().and_then(|ve| {
            ve.key(&id.name)
                .filter(|k| k.key.deleted.is_none())
                .and_then(|k| k.key.version(id.version.as_deref()).cloned())
        });
        let Some(v) = version else { return Access::Lost(Reason::KeyDeleted) };
        if !v.attributes.enabled {
            return Access::Lost(Reason::KeyDisabled);
        }
        if v.attributes.not_before.is_some_and(|nbf| now < nbf) {
            return Access::Lost(Reason::KeyNotYetValid);
        }
        if v.attributes.expires.is_some_and(|exp| now >= exp) {
            return Access::Lost(Reason::KeyExpired);
        }
        Access::Ok
    }

    /// Evaluates every server (or one) and commits the transitions of their databases, plus
    /// auto-rotation of protectors that follow their key's newest version. Returns the events.
    pub async fn probe(&self, only_server: Option<&str>) -> Result<Vec<DbEventRecord>, BrokerError> {
        let now = self.clock.now();
        let plan = |st: &State| -> (Vec<Change>, Vec<DbEventRecord>) {
            let mut changes = Vec::new();
            let mut events = Vec::new();
            for server in st.servers.values() {
                if only_server.is_some_and(|s| !s.eq_ignore_ascii_case(&server.id)) {
                    continue;
                }
                if let Some(rotated) = self.auto_rotated(st, server) {
                    changes.push(Change::PutServer(rotated));
                }
                let access = self.evaluate_access(st, server, now);
                let prefix = server.id.to_ascii_lowercase();
                let transient_since = {
                    let mut map = self.transient_since.lock().unwrap_or_else(|p| p.into_inner());
                    if access == Access::Transient {
                        Some(*map.entry(prefix.clone()).or_insert(now))
                    } else {
                        map.remove(&prefix);
                        None
                    }
                };
                for ((sid, _), db) in st.databases.range((prefix.clone(), String::new())..) {
                    if *sid != prefix {
                        break;
                    }
                    let (next, event) = db.next(access, transient_since, now, self.settings.tde.timing);
                    if next != *db {
                        if let Some(event) = event {
                            events.push(DbEventRecord { database: next.clone(), event, time: now });
                        }
                        changes.push(Change::PutDatabase(next));
                    }
                }
            }
            (changes, events)
        };
        if plan(&self.read()).0.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.begin().await;
        let (changes, events) = plan(&self.read());
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let moved = protector_moves(&changes);
        self.commit(txn, changes).await?;
        self.publish(&events);
        for id in moved {
            self.kv_follow_protector(&id).await;
        }
        Ok(events)
    }

    /// Runs a full probe when `probe_interval` of the broker's clock has passed since the last.
    pub async fn probe_if_due(&self) -> Result<(), BrokerError> {
        use std::sync::atomic::Ordering;
        let now = self.clock.now();
        let last = self.last_probe.load(Ordering::SeqCst);
        if now.saturating_sub(last) < self.settings.tde.probe_interval {
            return Ok(());
        }
        self.last_probe.store(now, Ordering::SeqCst);
        self.probe(None).await.map(drop)
    }

    /// Moves every auto-rotating protector to its key's newest version now (as a probe would),
    /// without evaluating access: run after the broker itself rotated keys by their policies.
    pub(crate) async fn follow_newest_versions(&self) -> Result<(), BrokerError> {
        let plan = |st: &State| -> Vec<Change> {
            st.servers.values().filter_map(|s| self.auto_rotated(st, s)).map(Change::PutServer).collect()
        };
        if plan(&self.read()).is_empty() {
            return Ok(());
        }
        let txn = self.begin().await;
        let changes = plan(&self.read());
        if changes.is_empty() {
            return Ok(());
        }
        let moved = protector_moves(&changes);
        self.commit(txn, changes).await?;
        for id in moved {
            self.kv_follow_protector(&id).await;
        }
        Ok(())
    }

    /// A protector set without version and with auto-rotation moves to the key's newest version.
    fn auto_rotated(&self, st: &State, server: &Server) -> Option<Server> {
        let Protector::AzureKeyVault { key_id, kid, auto_rotation: true } = &server.protector else {
            return None;
        };
        let id = KeyId::parse(key_id, &self.settings.vault_dns_suffix).ok()?;
        let ve = st.vault(&id.vault).ok()?;
        let key = ve.key(&id.name).filter(|k| k.key.deleted.is_none())?;
        let latest = key.key.latest()?;
        let latest_kid = crate::model::ids::key_uri(
            &ve.vault.name,
            &self.settings.vault_dns_suffix,
            &key.key.name,
            Some(&latest.version),
        );
        if latest_kid == *kid {
            return None;
        }
        tracing::info!(server = %server.id, from = %kid, to = %latest_kid, "auto-rotation: protector follows the newest key version");
        let mut s = server.clone();
        s.protector =
            Protector::AzureKeyVault { key_id: key_id.clone(), kid: latest_kid, auto_rotation: true };
        Some(s)
    }

    /// Sends events to watchers and writes them to the log.
    pub(crate) fn publish(&self, events: &[DbEventRecord]) {
        for e in events {
            tracing::info!(
                event = e.event.name(),
                server = %e.database.server_id,
                database = %e.database.name,
                reason = e.database.reason.map(|r| r.name()).unwrap_or(""),
                "database state transition"
            );
            // No watcher is fine.
            let _ = self.events.send(e.clone());
        }
    }

    /// Subscribes to database state transitions.
    pub fn watch(&self) -> tokio::sync::broadcast::Receiver<DbEventRecord> {
        self.events.subscribe()
    }

    /// The server whose engine host `caller` is.
    pub fn host_server(&self, caller: &Caller) -> Result<Server, BrokerError> {
        let st = self.read();
        let host = st.principals.get(&*caller.object_id).filter(|p| p.kind == PrincipalKind::ServerHost);
        host.and_then(|h| h.resource_id.as_deref())
            .and_then(|sid| st.servers.get(&sid.to_ascii_lowercase()))
            .cloned()
            .ok_or_else(|| BrokerError::NotAServerHost { object_id: caller.object_id.to_string() })
    }

    /// Evaluates the host's server, applies transitions, and returns the server if `database`
    /// is ONLINE (else the cloud's "not currently available" refusal).
    async fn engine_gate(&self, caller: &Caller, database: &str) -> Result<Server, BrokerError> {
        let server = self.host_server(caller)?;
        if !self.read().databases.contains_key(&db_key(&server.id, database)) {
            return Err(BrokerError::DatabaseNotFound { name: crate::model::ids::printable(database) });
        }
        self.probe(Some(&server.id)).await?;
        let st = self.read();
        let server = st.servers.get(&server.id.to_ascii_lowercase()).cloned().ok_or(BrokerError::Internal)?;
        let db = st.databases.get(&db_key(&server.id, database)).ok_or(BrokerError::Internal)?;
        if let Some(reason) = db.reason {
            return Err(BrokerError::DatabaseInaccessible {
                database: db.name.clone(),
                server: server.name.clone(),
                reason: reason.name(),
            });
        }
        if !matches!(server.protector, Protector::AzureKeyVault { .. }) {
            return Err(BrokerError::bad_parameter(format!(
                "Server '{}' uses service-managed TDE: there is no customer-managed protector to wrap with.",
                server.name
            )));
        }
        Ok(server)
    }

    /// The caller the broker acts as for `server`: its effective identity.
    fn acting_identity(&self, server: &Server) -> Result<Caller, BrokerError> {
        let st = self.read();
        let p = identity_principal(&st, &server.identity.effective()).ok_or(BrokerError::Internal)?;
        Ok(self.acting_as(server, p))
    }

    fn current_kid(server: &Server) -> Result<String, BrokerError> {
        match &server.protector {
            Protector::AzureKeyVault { kid, .. } => Ok(kid.clone()),
            Protector::ServiceManaged => Err(BrokerError::Internal),
        }
    }

    /// Wraps a DEK under the current protector version as the server's identity.
    pub(crate) async fn engine_wrap(
        &self,
        server: &Server,
        dek: Vec<u8>,
    ) -> Result<(Vec<u8>, String), BrokerError> {
        let identity = self.acting_identity(server)?;
        let kid = Self::current_kid(server)?;
        let r = self
            .crypto(
                &identity,
                CryptoRequest {
                    op: CryptoOp::WrapKey,
                    key_id: kid,
                    algorithm: ENGINE_ALGORITHM.to_string(),
                    value: dek,
                    iv: vec![],
                    aad: vec![],
                    tag: vec![],
                },
            )
            .await?;
        Ok((r.value.to_vec(), r.kid))
    }

    /// Unwraps a DEK wrapped under any version the server's identity can use.
    pub(crate) async fn engine_unwrap(
        &self,
        server: &Server,
        kid: &str,
        wrapped: Vec<u8>,
    ) -> Result<Zbytes, BrokerError> {
        let id = KeyId::parse(kid, &self.settings.vault_dns_suffix)?;
        if id.version.is_none() {
            return Err(BrokerError::bad_parameter(
                "UnwrapDatabaseKey needs the versioned kid returned when the DEK was wrapped.",
            ));
        }
        let identity = self.acting_identity(server)?;
        let r = self
            .crypto(
                &identity,
                CryptoRequest {
                    op: CryptoOp::UnwrapKey,
                    key_id: kid.to_string(),
                    algorithm: ENGINE_ALGORITHM.to_string(),
                    value: wrapped,
                    iv: vec![],
                    aad: vec![],
                    tag: vec![],
                },
            )
            .await?;
        Ok(r.value)
    }

    /// GenerateDatabaseKey: a fresh 256-bit DEK, plain and wrapped.
    pub async fn generate_database_key(
        &self,
        caller: &Caller,
        database: &str,
    ) -> Result<(Zbytes, Vec<u8>, String), BrokerError> {
        let server = self.engine_gate(caller, database).await?;
        let dek = Zeroizing::new(crypto::random_bytes(DEK_BYTES));
        let (wrapped, kid) = self.engine_wrap(&server, dek.to_vec()).await?;
        Ok((dek, wrapped, kid))
    }

    /// WrapDatabaseKey.
    pub async fn wrap_database_key(
        &self,
        caller: &Caller,
        database: &str,
        dek: Vec<u8>,
    ) -> Result<(Vec<u8>, String), BrokerError> {
        let server = self.engine_gate(caller, database).await?;
        self.engine_wrap(&server, dek).await
    }

    /// UnwrapDatabaseKey.
    pub async fn unwrap_database_key(
        &self,
        caller: &Caller,
        database: &str,
        kid: &str,
        wrapped: Vec<u8>,
    ) -> Result<Zbytes, BrokerError> {
        let server = self.engine_gate(caller, database).await?;
        self.engine_unwrap(&server, kid, wrapped).await
    }

    /// RewrapDatabaseKey: to the current protector version, plaintext never leaves the broker.
    pub async fn rewrap_database_key(
        &self,
        caller: &Caller,
        database: &str,
        kid: &str,
        wrapped: Vec<u8>,
    ) -> Result<(Vec<u8>, String), BrokerError> {
        let server = self.engine_gate(caller, database).await?;
        let dek = self.engine_unwrap(&server, kid, wrapped).await?;
        self.engine_wrap(&server, dek.to_vec()).await
    }

    /// GetProtectorStatus for the host's server (a database's state, or the server's worst).
    pub async fn protector_status(
        &self,
        caller: &Caller,
        database: &str,
    ) -> Result<(Option<Reason>, String, String), BrokerError> {
        let server = self.host_server(caller)?;
        self.probe(Some(&server.id)).await?;
        let st = self.read();
        let server = st.servers.get(&server.id.to_ascii_lowercase()).cloned().ok_or(BrokerError::Internal)?;
        let reason = if database.is_empty() {
            match self.evaluate_access(&st, &server, self.clock.now()) {
                Access::Lost(r) => Some(r),
                _ => st
                    .databases
                    .iter()
                    .filter(|((sid, _), _)| *sid == server.id.to_ascii_lowercase())
                    .find_map(|(_, d)| d.reason),
            }
        } else {
            st.databases
                .get(&db_key(&server.id, database))
                .ok_or_else(|| BrokerError::DatabaseNotFound {
                    name: crate::model::ids::printable(database),
                })?
                .reason
        };
        let kid = match &server.protector {
            Protector::AzureKeyVault { kid, .. } => kid.clone(),
            Protector::ServiceManaged => String::new(),
        };
        let effective = server.identity.effective();
        let identity = match effective {
            EffectiveIdentity::None => String::new(),
            other => identity_label(&other),
        };
        Ok((reason, identity, kid))
    }
}
