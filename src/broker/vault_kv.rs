//! The broker side of the Vault-KV surface (docs/MARIADB.md): a server's mounts, their key ids
//! (DEKs kept wrapped under the server's TDE protector) and the key reads MariaDB's
//! `hashicorp_key_management` plugin makes.
//!
//! A read is an `UnwrapDatabaseKey` of the mount's database made as the server's engine host: the
//! same gate (the database's TDE state after a probe, then the vault's network rules, the
//! identity's permissions and the key's state, with the caches) decides it. A protector rotation
//! re-wraps the stored DEKs (their bytes never change): [`Broker::kv_follow_protector`] is called
//! wherever a server's protector moves.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use zeroize::Zeroizing;

use super::Broker;
use super::tde::DEK_BYTES;
use crate::crypto;
use crate::model::ids::printable;
use crate::model::server::{KvKey, KvKeyVersion, KvMount, Protector, Server};
use crate::model::{BrokerError, Caller, Change};

/// The prefix of the tokens the broker issues for mounts.
pub const TOKEN_PREFIX: &str = "tdekv.";
/// Default database name a mount is gated by.
pub const DEFAULT_DATABASE: &str = "mariadb";

/// What [`Broker::kv_setup`] did.
#[derive(Debug)]
pub struct KvSetup {
    /// The server's ARM id.
    pub server_id: String,
    /// The normalised mount path.
    pub mount: String,
    /// The database whose TDE state gates the keys.
    pub database: String,
    /// The mount's new token (shown once; only its hash is kept).
    pub token: Zeroizing<String>,
    /// Key ids created by this call.
    pub created: Vec<u32>,
    /// Every key id of the mount.
    pub keys: Vec<u32>,
}

/// A key read: the DEK in hex digits (what the plugin parses), and its version.
#[derive(Debug)]
pub struct KvRead {
    /// 64 hex digits (AES-256).
    pub hex: Zeroizing<String>,
    /// The version number.
    pub version: u32,
    /// When the version was created (broker clock).
    pub created: i64,
}

/// Who a request authenticated as: the mount's server and its engine host.
#[derive(Clone, Debug)]
pub struct KvAccess {
    /// The server's ARM id.
    pub server_id: String,
    /// The engine host's object id.
    pub host_object_id: String,
    /// The mount's database.
    pub database: String,
}

fn token_hash(token: &str) -> [u8; 32] {
    crypto::sha256(token.as_bytes())
}

fn hash_matches(stored_hex: &str, token: &str) -> bool {
    let Ok(stored) = hex::decode(stored_hex) else { return false };
    aws_lc_rs::constant_time::verify_slices_are_equal(&stored, &token_hash(token)).is_ok()
}

fn refused() -> BrokerError {
    BrokerError::InvalidToken { reason: "the token is not valid for this mount".to_string() }
}

fn key_not_found(mount: &str, id: u32, version: Option<u32>) -> BrokerError {
    let name_or_id = match version {
        Some(v) => format!("{mount}/data/{id}?version={v}"),
        None => format!("{mount}/data/{id}"),
    };
    BrokerError::KeyNotFound { name_or_id: printable(&name_or_id) }
}

impl Broker {
    /// The caller the broker acts as for `server`'s engine host.
    fn host_caller(&self, server: &Server) -> Result<Caller, BrokerError> {
        let st = self.read();
        let host = st.principals.get(&server.host_principal_id).ok_or(BrokerError::Internal)?;
        Ok(Caller::new(&host.object_id, &host.app_id, &self.settings.issuer()))
    }

    /// The server holding `mount` and the mount, once `token` is the mount's: constant-time
    /// comparison of hashes; an unknown mount and a wrong token are refused alike.
    pub fn kv_authenticate(&self, mount: &str, token: &str) -> Result<(Server, KvMount), BrokerError> {
        let st = self.read();
        let found = st
            .servers
            .values()
            .find_map(|s| s.kv_mounts.iter().find(|m| m.path == mount).map(|m| (s.clone(), m.clone())));
        match found {
            Some((s, m)) if hash_matches(&m.token_sha256, token) => Ok((s, m)),
            Some(_) => Err(refused()),
            None => {
                // Same work as a wrong token, so the answer's timing does not tell mounts apart.
                let _ = hash_matches(&"00".repeat(32), token);
                Err(refused())
            }
        }
    }

    /// The `tune` request: the token must be the mount's.
    pub fn kv_tune(&self, mount: &str, token: &str) -> Result<KvAccess, BrokerError> {
        let (server, m) = self.kv_authenticate(mount, token)?;
        Ok(KvAccess { server_id: server.id, host_object_id: server.host_principal_id, database: m.database })
    }

    /// Reads key `id` (`version`, or the latest) of `mount`: an `UnwrapDatabaseKey` of the
    /// mount's database as the server's engine host. Returns who the request authenticated as
    /// (once the token matched) beside the result.
    pub async fn kv_read(
        &self,
        mount: &str,
        token: &str,
        id: u32,
        version: Option<u32>,
    ) -> (Option<KvAccess>, Result<KvRead, BrokerError>) {
        let (server, m) = match self.kv_authenticate(mount, token) {
            Ok(x) => x,
            Err(e) => return (None, Err(e)),
        };
        let access = KvAccess {
            server_id: server.id.clone(),
            host_object_id: server.host_principal_id.clone(),
            database: m.database.clone(),
        };
        let Some(v) = m.key(id).and_then(|k| k.version(version)).cloned() else {
            return (Some(access), Err(key_not_found(mount, id, version)));
        };
        let result = async {
            let wrapped = B64.decode(&v.wrapped).map_err(|_| BrokerError::Internal)?;
            let host = self.host_caller(&server)?;
            let dek = self.unwrap_database_key(&host, &m.database, &v.kid, wrapped).await?;
            Ok(KvRead { hex: Zeroizing::new(hex::encode(&*dek)), version: v.version, created: v.created })
        }
        .await;
        (Some(access), result)
    }

    /// Sets a server up for MariaDB: the mount (created, or found), its database (created when
    /// missing), the key ids that do not exist yet (a fresh DEK each, wrapped as the engine host),
    /// and a new token for the mount (the previous one stops working).
    pub async fn kv_setup(
        &self,
        caller: &Caller,
        server_id: &str,
        mount: &str,
        database: &str,
        key_ids: &[u32],
    ) -> Result<KvSetup, BrokerError> {
        let mount = KvMount::normalise_path(mount)?;
        let database = if database.trim().is_empty() { DEFAULT_DATABASE } else { database.trim() };
        if key_ids.contains(&0) {
            return Err(BrokerError::bad_parameter("Key ids run from 1 to 4294967295; 0 is not one."));
        }
        let server = self.kv_writable_server(caller, server_id)?;
        if let Some(other) = self
            .read()
            .servers
            .values()
            .find(|s| s.id != server.id && s.kv_mounts.iter().any(|m| m.path == mount))
        {
            return Err(BrokerError::bad_parameter(format!(
                "The mount '{mount}' belongs to the server '{}'.",
                other.name
            )));
        }
        if let Some(m) = server.kv_mounts.iter().find(|m| m.path == mount)
            && m.database != database
        {
            return Err(BrokerError::bad_parameter(format!(
                "The mount '{mount}' is gated by the database '{}', not '{}'.",
                m.database,
                printable(database)
            )));
        }
        let exists = self.read().databases.contains_key(&super::state::db_key(&server.id, database));
        if !exists {
            self.create_database(caller, &server.id, database).await?;
        }
        let host = self.host_caller(&server)?;
        let existing: Vec<u32> = server
            .kv_mounts
            .iter()
            .find(|m| m.path == mount)
            .map(|m| m.keys.iter().map(|k| k.id).collect())
            .unwrap_or_default();
        let mut fresh = Vec::new();
        let mut wanted: Vec<u32> = key_ids.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        for id in wanted.into_iter().filter(|id| !existing.contains(id)) {
            let version = self.kv_new_version(&host, database, 1).await?;
            fresh.push(KvKey { id, versions: vec![version] });
        }
        let token = Zeroizing::new(format!("{TOKEN_PREFIX}{}", B64URL.encode(crypto::random_bytes(32))));
        let token_sha256 = hex::encode(token_hash(&token));
        let created: Vec<u32> = fresh.iter().map(|k| k.id).collect();
        let txn = self.begin().await;
        let updated = {
            let st = self.read();
            let mut s = st
                .servers
                .get(&server.id.to_ascii_lowercase())
                .cloned()
                .ok_or_else(|| BrokerError::ServerNotFound { name: printable(server_id) })?;
            let idx = match s.kv_mounts.iter().position(|m| m.path == mount) {
                Some(i) => i,
                None => {
                    s.kv_mounts.push(KvMount {
                        path: mount.clone(),
                        database: database.to_string(),
                        token_sha256: String::new(),
                        keys: Vec::new(),
                    });
                    s.kv_mounts.len() - 1
                }
            };
            let m = &mut s.kv_mounts[idx];
            m.token_sha256 = token_sha256;
            for k in fresh {
                if m.key(k.id).is_none() {
                    m.keys.push(k);
                }
            }
            m.keys.sort_by_key(|k| k.id);
            s
        };
        let keys =
            updated.kv_mounts.iter().find(|m| m.path == mount).map(|m| m.keys.iter().map(|k| k.id).collect());
        self.commit(txn, vec![Change::PutServer(updated)]).await?;
        tracing::info!(server = %server.id, mount = %mount, created = ?created, "vault-kv mount set up; a new token was issued");
        Ok(KvSetup {
            server_id: server.id,
            mount,
            database: database.to_string(),
            token,
            created,
            keys: keys.unwrap_or_default(),
        })
    }

    /// Rotates key `id` of `mount`: a new version with a fresh DEK becomes the latest; the older
    /// versions stay readable (MariaDB reads pages written under them with `?version=`).
    /// Returns the new version number.
    pub async fn kv_rotate_key(
        &self,
        caller: &Caller,
        server_id: &str,
        mount: &str,
        id: u32,
    ) -> Result<u32, BrokerError> {
        let mount = KvMount::normalise_path(mount)?;
        let server = self.kv_writable_server(caller, server_id)?;
        let m = server
            .kv_mounts
            .iter()
            .find(|m| m.path == mount)
            .ok_or_else(|| BrokerError::bad_parameter(format!("The server has no mount '{mount}'.")))?;
        let latest = m
            .key(id)
            .and_then(|k| k.versions.last())
            .map(|v| v.version)
            .ok_or_else(|| key_not_found(&mount, id, None))?;
        let host = self.host_caller(&server)?;
        let next = latest
            .checked_add(1)
            .ok_or_else(|| BrokerError::bad_parameter("The key has no version number left."))?;
        let version = self.kv_new_version(&host, &m.database, next).await?;
        let txn = self.begin().await;
        let updated = {
            let st = self.read();
            let mut s =
                st.servers.get(&server.id.to_ascii_lowercase()).cloned().ok_or(BrokerError::Internal)?;
            let key = s
                .kv_mounts
                .iter_mut()
                .find(|m| m.path == mount)
                .and_then(|m| m.keys.iter_mut().find(|k| k.id == id))
                .ok_or_else(|| key_not_found(&mount, id, None))?;
            if key.versions.last().map(|v| v.version) != Some(latest) {
                return Err(BrokerError::bad_parameter("The key was rotated at the same time; retry."));
            }
            key.versions.push(version);
            s
        };
        self.commit(txn, vec![Change::PutServer(updated)]).await?;
        tracing::info!(server = %server.id, mount = %mount, key = id, version = next, "vault-kv key rotated");
        Ok(next)
    }

    /// A fresh DEK wrapped as the engine host of `database`.
    async fn kv_new_version(
        &self,
        host: &Caller,
        database: &str,
        version: u32,
    ) -> Result<KvKeyVersion, BrokerError> {
        let dek = Zeroizing::new(crypto::random_bytes(DEK_BYTES));
        let (wrapped, kid) = self.wrap_database_key(host, database, dek.to_vec()).await?;
        Ok(KvKeyVersion { version, wrapped: B64.encode(wrapped), kid, created: self.clock.now() })
    }

    /// The server, once the caller may change it (`Microsoft.Sql/.../write`) and it has a
    /// customer-managed protector.
    fn kv_writable_server(&self, caller: &Caller, server_id: &str) -> Result<Server, BrokerError> {
        let server = self.get_server(caller, server_id)?;
        self.authorize_control(
            &caller.object_id,
            &format!("Microsoft.Sql/{}/write", server.kind.resource_type()),
            &server.id,
        )?;
        if !matches!(server.protector, Protector::AzureKeyVault { .. }) {
            return Err(BrokerError::bad_parameter(format!(
                "Server '{}' uses service-managed TDE: set a customer-managed protector first (server protector).",
                server.name
            )));
        }
        Ok(server)
    }

    /// After a server's protector moved: re-wraps every stored DEK of its mounts that another
    /// protector version wrapped, under the current one (the DEK bytes do not change; the
    /// plaintext never leaves the broker). A DEK that cannot be re-wrapped now (the old version is
    /// out of reach) keeps its wrapping and is tried again at the next protector change; it stays
    /// readable as long as that version is. Failures are logged, never returned.
    pub async fn kv_follow_protector(&self, server_id: &str) {
        let Some(server) = self.read().servers.get(&server_id.to_ascii_lowercase()).cloned() else { return };
        let Protector::AzureKeyVault { kid: current, .. } = &server.protector else { return };
        let stale: Vec<(String, u32, u32, KvKeyVersion)> = server
            .kv_mounts
            .iter()
            .flat_map(|m| {
                m.keys.iter().flat_map(move |k| {
                    k.versions
                        .iter()
                        .filter(|v| v.kid != *current)
                        .map(move |v| (m.path.clone(), k.id, v.version, v.clone()))
                })
            })
            .collect();
        if stale.is_empty() {
            return;
        }
        let mut rewrapped = Vec::new();
        for (mount, id, version, v) in stale {
            let Ok(wrapped) = B64.decode(&v.wrapped) else { continue };
            let result = async {
                let dek = self.engine_unwrap(&server, &v.kid, wrapped).await?;
                self.engine_wrap(&server, dek.to_vec()).await
            }
            .await;
            match result {
                Ok((w, kid)) => rewrapped.push((mount, id, version, v, B64.encode(w), kid)),
                Err(e) => {
                    tracing::warn!(server = %server.id, mount = %mount, key = id, version, from = %v.kid, error = %e, "vault-kv: a DEK could not be re-wrapped under the new protector; it keeps its wrapping");
                }
            }
        }
        if rewrapped.is_empty() {
            return;
        }
        let txn = self.begin().await;
        let updated = {
            let st = self.read();
            let Some(mut s) = st.servers.get(&server.id.to_ascii_lowercase()).cloned() else { return };
            let mut n = 0usize;
            for (mount, id, version, old, wrapped, kid) in rewrapped {
                let slot = s
                    .kv_mounts
                    .iter_mut()
                    .find(|m| m.path == mount)
                    .and_then(|m| m.keys.iter_mut().find(|k| k.id == id))
                    .and_then(|k| k.versions.iter_mut().find(|x| x.version == version));
                // Only if nobody changed it meanwhile.
                if let Some(slot) = slot.filter(|x| **x == old) {
                    slot.wrapped = wrapped;
                    slot.kid = kid;
                    n += 1;
                }
            }
            if n == 0 {
                return;
            }
            tracing::info!(server = %s.id, rewrapped = n, "vault-kv: DEKs re-wrapped under the new protector");
            s
        };
        if let Err(e) = self.commit(txn, vec![Change::PutServer(updated)]).await {
            tracing::warn!(server = %server.id, error = %e, "vault-kv: committing the re-wrapped DEKs failed; they keep their wrapping");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_only_its_own_hash() {
        let stored = hex::encode(token_hash("tdekv.abc"));
        assert!(hash_matches(&stored, "tdekv.abc"));
        assert!(!hash_matches(&stored, "tdekv.abd"));
        assert!(!hash_matches(&stored, ""));
        assert!(!hash_matches("not hex", "tdekv.abc"));
    }
}
