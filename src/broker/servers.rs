//! Servers, their identities, TDE protectors and databases (docs/RULES.md R4). Every validation
//! runs before anything is committed: a refused request changes nothing.

use super::state::{State, db_key};
use super::tde::{DbEventRecord, identity_label, identity_principal};
use super::{Broker, EnforceCmk, new_guid};
use crate::model::ids::{KeyId, key_uri, printable};
use crate::model::server::{
    Access, Database, EffectiveIdentity, Protector, Reason, Server, ServerIdentity, ServerKind, tde_docs_link,
};
use crate::model::{BrokerError, Caller, Change, KeyType, Principal, PrincipalKind};

const ASSIGN_IDENTITY: &str = "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action";

/// What CreateServer asks for.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// Subscription (empty = default).
    pub subscription: String,
    /// Resource group.
    pub resource_group: String,
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: ServerKind,
    /// System-assigned identity on.
    pub system_assigned: bool,
    /// User-assigned identity resource ids.
    pub user_assigned: Vec<String>,
    /// Primary user-assigned identity.
    pub primary: String,
    /// CMK at creation (empty = service-managed).
    pub key_id: String,
    /// Follow the key's newest version.
    pub auto_rotation: bool,
    /// Subnet of a managed instance.
    pub subnet_id: String,
}

fn server_action(kind: ServerKind, verb: &str) -> String {
    format!("Microsoft.Sql/{}/{verb}", kind.resource_type())
}

fn check_server_name(name: &str) -> Result<(), BrokerError> {
    let ok = (1..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::bad_parameter(format!(
            "The server name '{}' is invalid: 1-63 lowercase letters, digits and hyphens, not starting or ending with a hyphen.",
            printable(name)
        )))
    }
}

fn check_database_name(name: &str) -> Result<(), BrokerError> {
    let ok = (1..=128).contains(&name.chars().count())
        && !name.chars().any(|c| c.is_control() || "<>*%&:\\/?".contains(c))
        && !name.ends_with('.')
        && !name.ends_with(' ');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::bad_parameter(format!(
            "The database name '{}' is invalid: 1-128 characters, none of <>*%&:\\/? and not ending with '.' or a space.",
            printable(name)
        )))
    }
}

impl Broker {
    fn find_server<'a>(&self, st: &'a State, id: &str) -> Result<&'a Server, BrokerError> {
        st.servers
            .get(&id.trim().to_ascii_lowercase())
            .ok_or_else(|| BrokerError::ServerNotFound { name: printable(id) })
    }

    /// A server by id, once the caller is allowed `Microsoft.Sql/{servers|managedInstances}/{verb}` on it.
    fn authorized_server<'a>(
        &self,
        st: &'a State,
        caller: &Caller,
        id: &str,
        verb: &str,
    ) -> Result<&'a Server, BrokerError> {
        let s = self.find_server(st, id)?;
        crate::policy::control::authorize(
            &st.role_assignments,
            &caller.object_id,
            &server_action(s.kind, verb),
            &s.id,
        )?;
        Ok(s)
    }

    /// A server by id, for a caller who may read it.
    pub fn get_server(&self, caller: &Caller, id: &str) -> Result<Server, BrokerError> {
        let st = self.read();
        let s = self.authorized_server(&st, caller, id, "read")?;
        Ok(s.clone())
    }

    /// Whether `caller` may go on watching the server `id`: its principal still exists (the check
    /// the token of every call gets) and it may still read the server (GetServer's check).
    /// Returns the epoch of the state it decided on: the answer holds until the epoch moves.
    pub fn watch_access(&self, caller: &Caller, id: &str) -> Result<u64, BrokerError> {
        let st = self.read();
        if !st.principals.contains_key(&*caller.object_id) {
            return Err(BrokerError::PrincipalDeleted { object_id: caller.object_id.to_string() });
        }
        self.authorized_server(&st, caller, id, "read")?;
        Ok(st.epoch)
    }

    /// The servers the caller may read.
    pub fn list_servers(&self, caller: &Caller) -> Vec<Server> {
        let st = self.read();
        st.servers
            .values()
            .filter(|s| {
                crate::policy::control::allows(
                    &st.role_assignments,
                    &caller.object_id,
                    &server_action(s.kind, "read"),
                    &s.id,
                )
            })
            .cloned()
            .collect()
    }

    /// Checks that each newly assigned UMI exists and that the caller may assign it.
    fn check_assignable(
        &self,
        st: &State,
        caller: &Caller,
        umis: &[String],
        already: &[String],
    ) -> Result<(), BrokerError> {
        for u in umis.iter().filter(|u| !already.iter().any(|a| a.eq_ignore_ascii_case(u))) {
            let exists = identity_principal(st, &EffectiveIdentity::UserAssigned(u.clone())).is_some();
            if !exists {
                return Err(BrokerError::IdentityNotFound { name: printable(u) });
            }
            crate::policy::control::authorize(&st.role_assignments, &caller.object_id, ASSIGN_IDENTITY, u)?;
        }
        Ok(())
    }

    /// The versioned kid a protector given as `key_id` starts with, after the protector
    /// validations of docs/RULES.md R4.2 in their order (the identity check is done by the caller).
    fn validate_protector_key(
        &self,
        st: &State,
        server: &Server,
        key_id: &str,
        now: i64,
    ) -> Result<(KeyId, String), BrokerError> {
        let id = KeyId::parse(key_id, &self.settings.vault_dns_suffix)?;
        let display = key_uri(&id.vault, &self.settings.vault_dns_suffix, &id.name, None);
        let not_found = || BrokerError::TdeKeyNotFound { key: display.clone() };
        let ve = st.vault(&id.vault).map_err(|_| not_found())?;
        if !ve.vault.purge_protection {
            return Err(BrokerError::TdeVaultRecoveryLevel);
        }
        let key = ve.key(&id.name).filter(|k| k.key.deleted.is_none()).ok_or_else(not_found)?;
        let v = key.key.version(id.version.as_deref()).ok_or_else(not_found)?;
        if !matches!(v.kty, KeyType::Rsa | KeyType::RsaHsm) || !matches!(v.bits, 2048 | 3072) {
            return Err(BrokerError::TdeKeyNotSupported);
        }
        if !v.attributes.enabled {
            return Err(BrokerError::TdeKeyDisabled { key: display });
        }
        let dates_ok = v.attributes.not_before.is_none_or(|nbf| nbf <= now)
            && v.attributes.expires.is_none_or(|exp| exp > now);
        if !dates_ok {
            return Err(BrokerError::TdeKeyInvalidDates { key: display });
        }
        if server.kind == ServerKind::ManagedInstance
            && matches!(server.identity.effective(), EffectiveIdentity::UserAssigned(_))
        {
            let acl = &ve.vault.network_acls;
            if !ve.vault.public_network_access || !acl.default_allow {
                return Err(BrokerError::TdeManagedInstanceUmiNeedsOpenVault {
                    vault: ve.vault.name.clone(),
                });
            }
        }
        let kid = key_uri(&ve.vault.name, &self.settings.vault_dns_suffix, &key.key.name, Some(&v.version));
        Ok((id, kid))
    }

    /// Whether `identity` (an effective identity) exists and holds get/wrapKey/unwrapKey on the key.
    /// ... and reaches the vault through its network rules.
    fn identity_can_use(
        &self,
        st: &State,
        server: &Server,
        identity: &EffectiveIdentity,
        id: &KeyId,
    ) -> bool {
        identity_principal(st, identity).is_some_and(|p| self.identity_access(st, server, p, id).is_ok())
    }

    /// The full protector validation for `server` (as it would be) and `key_id`.
    fn validate_protector(
        &self,
        st: &State,
        server: &Server,
        key_id: &str,
        now: i64,
    ) -> Result<String, BrokerError> {
        let effective = server.identity.effective();
        if effective == EffectiveIdentity::None {
            return Err(BrokerError::TdeNoServerIdentity { server: server.name.clone() });
        }
        let (id, kid) = self.validate_protector_key(st, server, key_id, now)?;
        if !self.identity_can_use(st, server, &effective, &id) {
            return Err(BrokerError::TdeIdentityMissingPermissions {
                server: server.name.clone(),
                identity: identity_label(&effective),
                key: key_uri(&id.vault, &self.settings.vault_dns_suffix, &id.name, None),
                link: tde_docs_link(self.settings.tde.cloud),
            });
        }
        Ok(kid)
    }

    fn host_principal(server_id: &str, name: &str, now: i64) -> Principal {
        Principal {
            object_id: new_guid(),
            app_id: new_guid(),
            name: format!("{name} (engine host)"),
            kind: PrincipalKind::ServerHost,
            resource_id: Some(server_id.to_string()),
            created: now,
            client_secret_hash: None,
        }
    }

    fn system_identity(server_id: &str, name: &str, now: i64) -> Principal {
        Principal {
            object_id: new_guid(),
            app_id: new_guid(),
            name: name.to_string(),
            kind: PrincipalKind::SystemAssignedIdentity,
            resource_id: Some(server_id.to_string()),
            created: now,
            client_secret_hash: None,
        }
    }

    /// CreateServer.
    pub async fn create_server(&self, caller: &Caller, spec: ServerSpec) -> Result<Server, BrokerError> {
        check_server_name(&spec.name)?;
        let subscription = if spec.subscription.trim().is_empty() {
            self.settings.subscription_id.clone()
        } else {
            uuid::Uuid::parse_str(spec.subscription.trim())
                .map_err(|_| BrokerError::bad_parameter("The subscription id must be a GUID."))?
                .to_string()
        };
        if spec.resource_group.trim().is_empty() {
            return Err(BrokerError::bad_parameter("A server needs a resource group."));
        }
        let id = format!(
            "/subscriptions/{subscription}/resourceGroups/{}/providers/Microsoft.Sql/{}/{}",
            spec.resource_group.trim(),
            spec.kind.resource_type(),
            spec.name
        );
        self.authorize_control(&caller.object_id, &server_action(spec.kind, "write"), &id)?;
        if spec.key_id.trim().is_empty() {
            self.cmk_policy(&spec.name)?;
        }
        let now = self.clock.now();
        let identity = ServerIdentity::normalise(&spec.user_assigned, &spec.primary, None)?;
        let txn = self.begin().await;
        let (server, changes) = {
            let st = self.read();
            if st.servers.values().any(|s| s.kind == spec.kind && s.name == spec.name) {
                return Err(BrokerError::ServerAlreadyExists { name: spec.name.clone() });
            }
            self.check_assignable(&st, caller, &identity.user_assigned, &[])?;
            let host = Self::host_principal(&id, &spec.name, now);
            let mut server = Server {
                id: id.clone(),
                name: spec.name.clone(),
                kind: spec.kind,
                identity,
                protector: Protector::ServiceManaged,
                subnet_id: (!spec.subnet_id.trim().is_empty()).then(|| spec.subnet_id.trim().to_string()),
                host_principal_id: host.object_id.clone(),
                created: now,
                kv_mounts: Vec::new(),
            };
            if !spec.key_id.trim().is_empty() {
                // The system-assigned identity does not exist before its server: CMK at
                // creation needs a user-assigned identity.
                if server.identity.primary.is_none() {
                    return Err(BrokerError::TdeNoServerIdentity { server: spec.name.clone() });
                }
                let kid = self.validate_protector(&st, &server, spec.key_id.trim(), now)?;
                server.protector = self.protector_for(spec.key_id.trim(), kid, spec.auto_rotation)?;
            }
            let mut changes = vec![Change::PutPrincipal(host)];
            if spec.system_assigned {
                let smi = Self::system_identity(&id, &spec.name, now);
                server.identity.system_principal_id = Some(smi.object_id.clone());
                changes.push(Change::PutPrincipal(smi));
            }
            changes.push(Change::PutServer(server.clone()));
            (server, changes)
        };
        self.commit(txn, changes).await?;
        Ok(server)
    }

    fn protector_for(
        &self,
        key_id: &str,
        kid: String,
        auto_rotation: bool,
    ) -> Result<Protector, BrokerError> {
        let id = KeyId::parse(key_id, &self.settings.vault_dns_suffix)?;
        if auto_rotation && id.version.is_some() {
            return Err(BrokerError::bad_parameter(
                "Auto-rotation follows the key's newest version: give the key identifier without a version.",
            ));
        }
        Ok(Protector::AzureKeyVault {
            key_id: key_uri(&id.vault, &self.settings.vault_dns_suffix, &id.name, id.version.as_deref()),
            kid,
            auto_rotation,
        })
    }

    fn cmk_policy(&self, server: &str) -> Result<(), BrokerError> {
        match self.settings.tde.enforce_cmk {
            EnforceCmk::Off => Ok(()),
            EnforceCmk::Audit => {
                tracing::warn!(
                    server,
                    policy = "SQL server should use customer-managed keys to encrypt data at rest",
                    "policy audit: non-compliant server"
                );
                Ok(())
            }
            EnforceCmk::Deny => Err(BrokerError::DisallowedByPolicy { server: server.to_string() }),
        }
    }

    /// DeleteServer: with its databases, system-assigned identity and host principal.
    pub async fn delete_server(&self, caller: &Caller, id: &str) -> Result<(), BrokerError> {
        let txn = self.begin().await;
        let changes = {
            let st = self.read();
            let s = self.authorized_server(&st, caller, id, "delete")?;
            let mut changes = vec![
                Change::DeleteServer { id: s.id.clone() },
                Change::DeletePrincipal { object_id: s.host_principal_id.clone() },
            ];
            if let Some(smi) = &s.identity.system_principal_id {
                changes.push(Change::DeletePrincipal { object_id: smi.clone() });
            }
            changes
        };
        self.commit(txn, changes).await
    }

    /// UpdateServerIdentity: replaces the block. With a customer-managed protector, the new
    /// effective identity must already hold the permissions, else nothing changes.
    pub async fn update_server_identity(
        &self,
        caller: &Caller,
        id: &str,
        system_assigned: bool,
        user_assigned: &[String],
        primary: &str,
    ) -> Result<Server, BrokerError> {
        let txn = self.begin().await;
        let (server, changes) = {
            let st = self.read();
            let current = self.authorized_server(&st, caller, id, "write")?.clone();
            let now = self.clock.now();
            let mut changes = Vec::new();
            let smi = match (&current.identity.system_principal_id, system_assigned) {
                (Some(p), true) => Some(p.clone()),
                (None, true) => {
                    let p = Self::system_identity(&current.id, &current.name, now);
                    let pid = p.object_id.clone();
                    changes.push(Change::PutPrincipal(p));
                    Some(pid)
                }
                (Some(p), false) => {
                    changes.push(Change::DeletePrincipal { object_id: p.clone() });
                    None
                }
                (None, false) => None,
            };
            let identity = ServerIdentity::normalise(user_assigned, primary, smi)?;
            self.check_assignable(&st, caller, &identity.user_assigned, &current.identity.user_assigned)?;
            let mut server = current.clone();
            server.identity = identity;
            if let Protector::AzureKeyVault { kid, .. } = &current.protector {
                let key = KeyId::parse(kid, &self.settings.vault_dns_suffix)?;
                let key_display = key_uri(&key.vault, &self.settings.vault_dns_suffix, &key.name, None);
                let before = current.identity.effective();
                let after = server.identity.effective();
                if after != before {
                    // A new SMI principal is not in the state yet: it holds nothing.
                    let can = !matches!(&after, EffectiveIdentity::SystemAssigned(p) if !st.principals.contains_key(p))
                        && self.identity_can_use(&st, &server, &after, &key);
                    if !can {
                        return Err(match after {
                            EffectiveIdentity::None => {
                                BrokerError::TdeNoServerIdentity { server: current.name.clone() }
                            }
                            EffectiveIdentity::SystemAssigned(p) => {
                                BrokerError::TdeFallbackIdentityMissingPermissions {
                                    server: current.name.clone(),
                                    fallback: format!("its system-assigned identity '{p}'"),
                                    key: key_display,
                                }
                            }
                            EffectiveIdentity::UserAssigned(u) => {
                                BrokerError::TdeUmiMissingPermissions { identity: u, key: key_display }
                            }
                        });
                    }
                }
            }
            changes.push(Change::PutServer(server.clone()));
            (server, changes)
        };
        self.commit(txn, changes).await?;
        self.probe(Some(&server.id)).await?;
        Ok(server)
    }

    /// SetEncryptionProtector.
    pub async fn set_encryption_protector(
        &self,
        caller: &Caller,
        id: &str,
        server_key_type: &str,
        key_id: &str,
        auto_rotation: bool,
    ) -> Result<Server, BrokerError> {
        let txn = self.begin().await;
        let server = {
            let st = self.read();
            let current = self.authorized_server(&st, caller, id, "write")?.clone();
            let mut server = current.clone();
            match server_key_type {
                "ServiceManaged" => {
                    self.cmk_policy(&current.name)?;
                    let prefix = current.id.to_ascii_lowercase();
                    if st.databases.iter().any(|((sid, _), d)| *sid == prefix && d.reason.is_some()) {
                        return Err(BrokerError::InaccessibleDatabaseBlocksChange {
                            server: current.name.clone(),
                        });
                    }
                    server.protector = Protector::ServiceManaged;
                }
                "AzureKeyVault" => {
                    let kid = self.validate_protector(&st, &current, key_id.trim(), self.clock.now())?;
                    server.protector = self.protector_for(key_id.trim(), kid, auto_rotation)?;
                }
                other => {
                    return Err(BrokerError::bad_parameter(format!(
                        "The server key type '{}' is invalid. Use ServiceManaged or AzureKeyVault.",
                        printable(other)
                    )));
                }
            }
            server
        };
        self.commit(txn, vec![Change::PutServer(server.clone())]).await?;
        self.kv_follow_protector(&server.id).await;
        self.probe(Some(&server.id)).await?;
        Ok(server)
    }

    /// RevalidateEncryptionProtector: with access restored, every inaccessible database of the
    /// server comes back ONLINE; otherwise the refusal names what is still wrong.
    pub async fn revalidate(&self, caller: &Caller, id: &str) -> Result<Server, BrokerError> {
        let txn = self.begin().await;
        let (server, changes, events) = {
            let st = self.read();
            let server = self.authorized_server(&st, caller, id, "write")?.clone();
            let now = self.clock.now();
            match self.evaluate_access(&st, &server, now) {
                Access::Ok => {}
                Access::Lost(reason) => return Err(self.revalidation_error(&server, reason)),
                Access::Transient => {
                    let vault = match &server.protector {
                        Protector::AzureKeyVault { kid, .. } => {
                            KeyId::parse(kid, &self.settings.vault_dns_suffix)
                                .map(|k| k.vault)
                                .unwrap_or_default()
                        }
                        Protector::ServiceManaged => String::new(),
                    };
                    return Err(BrokerError::VaultUnavailable { vault });
                }
            }
            let prefix = server.id.to_ascii_lowercase();
            let mut changes = Vec::new();
            let mut events = Vec::new();
            for ((sid, _), db) in st.databases.range((prefix.clone(), String::new())..) {
                if *sid != prefix {
                    break;
                }
                let (next, event) = db.revalidated(now);
                if let Some(event) = event {
                    events.push(DbEventRecord { database: next.clone(), event, time: now });
                    changes.push(Change::PutDatabase(next));
                }
            }
            (server, changes, events)
        };
        if !changes.is_empty() {
            self.commit(txn, changes).await?;
            self.publish(&events);
        }
        Ok(server)
    }

    fn revalidation_error(&self, server: &Server, reason: Reason) -> BrokerError {
        let Protector::AzureKeyVault { kid, .. } = &server.protector else { return BrokerError::Internal };
        let effective = server.identity.effective();
        let key = KeyId::parse(kid, &self.settings.vault_dns_suffix)
            .map(|k| key_uri(&k.vault, &self.settings.vault_dns_suffix, &k.name, None))
            .unwrap_or_else(|_| kid.clone());
        match reason {
            Reason::NoIdentity => BrokerError::TdeNoServerIdentity { server: server.name.clone() },
            Reason::KeyDisabled => BrokerError::TdeKeyDisabled { key },
            Reason::KeyExpired | Reason::KeyNotYetValid => BrokerError::TdeKeyInvalidDates { key },
            Reason::KeyDeleted => BrokerError::TdeKeyNotFound { key },
            _ => BrokerError::TdeIdentityMissingPermissions {
                server: server.name.clone(),
                identity: identity_label(&effective),
                key,
                link: tde_docs_link(self.settings.tde.cloud),
            },
        }
    }

    /// CreateDatabase: ONLINE, then evaluated at once (a server without access makes it
    /// INACCESSIBLE immediately).
    pub async fn create_database(
        &self,
        caller: &Caller,
        server_id: &str,
        name: &str,
    ) -> Result<Database, BrokerError> {
        check_database_name(name)?;
        let txn = self.begin().await;
        let (server, db) = {
            let st = self.read();
            let server = self.authorized_server(&st, caller, server_id, "databases/write")?.clone();
            if st.databases.contains_key(&db_key(&server.id, name)) {
                return Err(BrokerError::DatabaseAlreadyExists { name: name.to_string() });
            }
            (server.clone(), Database::new(&server.id, name, self.clock.now()))
        };
        self.commit(txn, vec![Change::PutDatabase(db)]).await?;
        self.probe(Some(&server.id)).await?;
        self.read().databases.get(&db_key(&server.id, name)).cloned().ok_or(BrokerError::Internal)
    }

    /// GetDatabase.
    pub fn get_database(
        &self,
        caller: &Caller,
        server_id: &str,
        name: &str,
    ) -> Result<Database, BrokerError> {
        let st = self.read();
        let server = self.authorized_server(&st, caller, server_id, "databases/read")?;
        st.databases
            .get(&db_key(&server.id, name))
            .cloned()
            .ok_or_else(|| BrokerError::DatabaseNotFound { name: printable(name) })
    }

    /// ListDatabases.
    pub fn list_databases(&self, caller: &Caller, server_id: &str) -> Result<Vec<Database>, BrokerError> {
        let st = self.read();
        let server = self.authorized_server(&st, caller, server_id, "databases/read")?;
        let prefix = server.id.to_ascii_lowercase();
        Ok(st.databases.iter().filter(|((sid, _), _)| *sid == prefix).map(|(_, d)| d.clone()).collect())
    }

    /// DeleteDatabase (the only action the cloud allows on an inaccessible database).
    pub async fn delete_database(
        &self,
        caller: &Caller,
        server_id: &str,
        name: &str,
    ) -> Result<(), BrokerError> {
        let txn = self.begin().await;
        let server = {
            let st = self.read();
            let server = self.authorized_server(&st, caller, server_id, "databases/delete")?.clone();
            if !st.databases.contains_key(&db_key(&server.id, name)) {
                return Err(BrokerError::DatabaseNotFound { name: printable(name) });
            }
            server
        };
        self.commit(txn, vec![Change::DeleteDatabase { server_id: server.id, name: name.to_string() }]).await
    }

    /// The host principal of a server, for issuing its credential (needs write on the server).
    pub fn server_host(&self, caller: &Caller, server_id: &str) -> Result<Principal, BrokerError> {
        let st = self.read();
        let server = self.authorized_server(&st, caller, server_id, "hostCredential/action")?;
        st.principals.get(&server.host_principal_id).cloned().ok_or(BrokerError::Internal)
    }

    /// Servers whose effective identity is the user-assigned identity `resource_id`.
    pub fn identity_dependants(&self, st: &State, resource_id: &str) -> Vec<String> {
        st.servers
            .values()
            .filter(|s| matches!(s.identity.effective(), EffectiveIdentity::UserAssigned(u) if u.eq_ignore_ascii_case(resource_id)))
            .filter(|s| matches!(s.protector, Protector::AzureKeyVault { .. }))
            .map(|s| s.id.clone())
            .collect()
    }
}
