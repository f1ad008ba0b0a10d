//! What a load test runs against: the vault, keys (and for engine-unwrap the identity, CMK
//! servers, databases and host credentials) it creates, the DEKs it wraps locally, and the
//! clean-up afterwards; or the baseline's stand-in of the same shapes.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::Request;

use super::{
    BASELINE_DEK, BASELINE_KID, DEK_BYTES, LoadtestArgs, LoadtestError, Op, WRAPPED_BYTES, setup_failed,
};
use crate::cli::session::{Bearer, Session};
use crate::crypto::{Algorithm, random_bytes, rsa_encrypt_with_public};
use crate::grpc::proto;

/// Size of the keys the tool creates.
const KEY_BITS: i32 = 2048;
/// DEKs wrapped per blocking task while pre-wrapping.
const WRAP_CHUNK: usize = 4096;
/// Keys created at once during set-up.
const SETUP_PARALLELISM: usize = 4;
/// Resource group of the identity and servers of an engine-unwrap run.
const RESOURCE_GROUP: &str = "loadtest-rg";

/// One key version (and, for engine-unwrap, its server) with its pre-wrapped DEKs.
pub(super) struct Target {
    /// Versioned kid the requests name and the answers must name.
    pub(super) kid: String,
    /// Engine: the database (`db1`); empty otherwise.
    pub(super) database: String,
    /// `authorization` of its requests (the host credential for engine-unwrap).
    pub(super) bearer: Bearer,
    /// `distinct` ciphertexts of `WRAPPED_BYTES` each, back to back.
    pub(super) wrapped: Vec<u8>,
    /// `distinct` DEKs of `DEK_BYTES` each, back to back.
    pub(super) deks: Vec<u8>,
}

impl Target {
    /// Ciphertext `i`.
    pub(super) fn wrapped(&self, i: usize) -> &[u8] {
        &self.wrapped[i * WRAPPED_BYTES..(i + 1) * WRAPPED_BYTES]
    }

    /// DEK `i`, the plaintext of ciphertext `i`.
    pub(super) fn dek(&self, i: usize) -> &[u8] {
        &self.deks[i * DEK_BYTES..(i + 1) * DEK_BYTES]
    }

    /// `message` as a request with this target's `authorization`.
    pub(super) fn request<T>(&self, message: T) -> Request<T> {
        self.bearer.request(message)
    }
}

/// What the requests cycle over.
pub(super) struct Workload {
    /// One per key.
    pub(super) targets: Vec<Target>,
    /// Ciphertexts per key.
    pub(super) distinct: usize,
}

impl Workload {
    /// Request `seq` uses key `seq % keys` and ciphertext `(seq / keys) % distinct`.
    pub(super) fn pick(&self, seq: u64) -> (&Target, usize) {
        let (k, i) = self.pick_index(seq);
        (&self.targets[k], i)
    }

    /// The indexes of the key and ciphertext of request `seq` (see [`Workload::pick`]).
    pub(super) fn pick_index(&self, seq: u64) -> (usize, usize) {
        let keys = self.targets.len() as u64;
        ((seq % keys) as usize, ((seq / keys) % self.distinct as u64) as usize)
    }

    /// Requests before this sequence number are the first use of their ciphertext.
    pub(super) fn cycle(&self) -> u64 {
        self.targets.len() as u64 * self.distinct as u64
    }
}

/// What a run created, so it can be removed afterwards (best effort).
#[derive(Default)]
pub(super) struct Created {
    /// The vault's name.
    vault: Option<String>,
    /// `https://{vault}.{suffix}` as CreateVault answered it.
    vault_uri: String,
    /// Whether the vault is purge-protected (engine-unwrap): it and its keys stay.
    purge_protected: bool,
    /// Names of the keys.
    keys: Vec<String>,
    /// Resource ids of the servers.
    servers: Vec<String>,
    /// Resource id of the identity.
    identity: Option<String>,
}

impl Created {
    /// Says on stderr what `--keep` left.
    pub(super) fn describe_kept(&self) {
        if let Some(vault) = &self.vault {
            eprintln!(
                "loadtest: kept vault {vault} ({} keys), {} servers{}",
                self.keys.len(),
                self.servers.len(),
                self.identity.as_ref().map(|i| format!(", identity {i}")).unwrap_or_default()
            );
        }
    }

    /// Deletes what the run created, saying on stderr what could not be deleted.
    pub(super) async fn remove(&self, s: &Session) {
        let warn = |call: &'static str, e| eprintln!("loadtest: cleanup: {}", setup_failed(call)(e));
        for id in &self.servers {
            let request = proto::DeleteServerRequest { server_id: id.clone() };
            if let Err(e) = s.servers().delete_server(request).await {
                warn("DeleteServer", e);
            }
        }
        if let Some(resource_id) = &self.identity {
            let request =
                proto::DeleteUserAssignedIdentityRequest { resource_id: resource_id.clone(), force: true };
            if let Err(e) = s.identities().delete_user_assigned_identity(request).await {
                warn("DeleteUserAssignedIdentity", e);
            }
        }
        let Some(vault) = &self.vault else { return };
        if self.purge_protected {
            eprintln!(
                "loadtest: vault {vault} stays: it is purge-protected (CMK needs that), so its keys cannot be purged"
            );
            return;
        }
        for name in &self.keys {
            let key_id = format!("{}/keys/{name}", self.vault_uri.trim_end_matches('/'));
            if let Err(e) = s.keys().delete_key(proto::DeleteKeyRequest { key_id }).await {
                warn("DeleteKey", e);
                continue;
            }
            let request = proto::PurgeDeletedKeyRequest { vault_name: vault.clone(), name: name.clone() };
            if let Err(e) = s.keys().purge_deleted_key(request).await {
                warn("PurgeDeletedKey", e);
            }
        }
        let request = proto::DeleteVaultRequest { name: vault.clone() };
        if let Err(e) = s.vaults().delete_vault(request).await {
            warn("DeleteVault", e);
            return;
        }
        // DeleteVault soft-deletes: purge, so the name is free for the next run.
        let request = proto::PurgeDeletedVaultRequest { name: vault.clone() };
        if let Err(e) = s.vaults().purge_deleted_vault(request).await {
            warn("PurgeDeletedVault", e);
        }
    }
}

/// Creates the vault, keys (and for engine-unwrap the identity, servers, databases and host
/// credentials) and pre-wraps the DEKs. Whatever it created is in `created`, also on failure.
pub(super) async fn setup(
    s: &Session,
    args: &LoadtestArgs,
    created: &mut Created,
) -> Result<Workload, LoadtestError> {
    let caller = s.caller_object_id().map_err(LoadtestError::NoCallerId)?;
    let engine = args.op == Op::EngineUnwrap;
    let vault = format!("loadtest-{}", hex::encode(random_bytes(4)));
    let keys = args.keys as usize;
    let distinct = args.distinct_ciphertexts as usize;
    eprintln!("loadtest: creating vault {vault} with {keys} RSA-{KEY_BITS} keys");
    let request = proto::CreateVaultRequest {
        name: vault.clone(),
        enable_purge_protection: engine,
        ..Default::default()
    };
    let v = s.vaults().create_vault(request).await.map_err(setup_failed("CreateVault"))?.into_inner();
    created.vault = Some(vault.clone());
    created.vault_uri = v.uri;
    created.purge_protected = engine;
    grant(s, &vault, caller, vec!["all".to_string()]).await?;
    let public = create_keys(s, &vault, keys, created).await?;
    let engine_targets = if engine { engine_servers(s, &vault, &public, created).await? } else { Vec::new() };

    // DEKs, wrapped locally with each key's public key, in chunks on the blocking pool.
    eprintln!("loadtest: wrapping {} DEKs ({distinct} per key) with RSA-OAEP-256", keys * distinct);
    let mut targets: Vec<Target> = public
        .iter()
        .map(|key| Target {
            kid: key.kid.clone(),
            database: String::new(),
            bearer: s.dial().bearer.clone(),
            wrapped: Vec::with_capacity(distinct * WRAPPED_BYTES),
            deks: Vec::with_capacity(distinct * DEK_BYTES),
        })
        .collect();
    for ((k, _), (deks, wrapped)) in wrap_deks(&public, distinct).await? {
        targets[k].deks.extend_from_slice(&deks);
        targets[k].wrapped.extend_from_slice(&wrapped);
    }
    for (target, (kid, bearer)) in targets.iter_mut().zip(engine_targets) {
        target.kid = kid;
        target.database = "db1".to_string();
        target.bearer = bearer;
    }
    Ok(Workload { targets, distinct })
}

/// Gives `object_id` an access policy with `permissions` on `vault`.
async fn grant(
    s: &Session,
    vault: &str,
    object_id: String,
    permissions: Vec<String>,
) -> Result<(), LoadtestError> {
    let request = proto::SetAccessPolicyRequest {
        vault_name: vault.to_string(),
        object_id,
        key_permissions: permissions,
    };
    s.vaults().set_access_policy(request).await.map_err(setup_failed("SetAccessPolicy"))?;
    Ok(())
}

/// Creates keys `k0` … in `vault`, a few at a time (generation is the slow part, in the
/// broker); their public halves, in order.
async fn create_keys(
    s: &Session,
    vault: &str,
    keys: usize,
    created: &mut Created,
) -> Result<Vec<proto::JsonWebKey>, LoadtestError> {
    let limit = Arc::new(Semaphore::new(SETUP_PARALLELISM));
    let mut tasks = JoinSet::new();
    for i in 0..keys {
        let kv = s.keys();
        let request = proto::CreateKeyRequest {
            vault_name: vault.to_string(),
            name: format!("k{i}"),
            kty: "RSA".to_string(),
            key_size: KEY_BITS,
            ..Default::default()
        };
        let limit = limit.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            (i, kv.clone().create_key(request).await)
        });
    }
    let mut bundles: Vec<Option<proto::KeyBundle>> = vec![None; keys];
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.map_err(|source| LoadtestError::Task { task: "key creation", source })?;
        match result {
            Ok(b) => {
                created.keys.push(format!("k{i}"));
                bundles[i] = Some(b.into_inner());
            }
            Err(e) => failure = Some(setup_failed("CreateKey")(e)),
        }
    }
    if let Some(f) = failure {
        return Err(f);
    }
    bundles.into_iter().map(|b| b.and_then(|b| b.key).ok_or(LoadtestError::NoKeyInAnswer)).collect()
}

/// Engine: an identity with an access policy, then per key a CMK server, its database `db1`
/// and its host credential; per key the kid the protector names and the credential.
async fn engine_servers(
    s: &Session,
    vault: &str,
    public: &[proto::JsonWebKey],
    created: &mut Created,
) -> Result<Vec<(String, Bearer)>, LoadtestError> {
    eprintln!("loadtest: creating an identity and {} CMK servers", public.len());
    let request = proto::CreateUserAssignedIdentityRequest {
        resource_group: RESOURCE_GROUP.to_string(),
        name: format!("{vault}-umi"),
        ..Default::default()
    };
    let identity = s
        .identities()
        .create_user_assigned_identity(request)
        .await
        .map_err(setup_failed("CreateUserAssignedIdentity"))?
        .into_inner();
    created.identity = Some(identity.resource_id.clone());
    let permissions = ["get", "wrapKey", "unwrapKey"].map(String::from).to_vec();
    grant(s, vault, identity.principal_id.clone(), permissions).await?;
    let mut targets = Vec::with_capacity(public.len());
    for (i, key) in public.iter().enumerate() {
        let unversioned = key.kid.rsplit_once('/').map(|(k, _)| k.to_string()).unwrap_or_default();
        let request = proto::CreateServerRequest {
            resource_group: RESOURCE_GROUP.to_string(),
            name: format!("{vault}-sql{i}"),
            kind: proto::ServerKind::SqlServer as i32,
            identity: Some(proto::ServerIdentity {
                user_assigned_identity_ids: vec![identity.resource_id.clone()],
                ..Default::default()
            }),
            key_id: unversioned,
            ..Default::default()
        };
        let server =
            s.servers().create_server(request).await.map_err(setup_failed("CreateServer"))?.into_inner();
        created.servers.push(server.id.clone());
        let request = proto::CreateDatabaseRequest { server_id: server.id.clone(), name: "db1".to_string() };
        s.servers().create_database(request).await.map_err(setup_failed("CreateDatabase"))?;
        let request = proto::IssueHostCredentialRequest { server_id: server.id.clone() };
        let credential =
            s.servers().issue_host_credential(request).await.map_err(setup_failed("IssueHostCredential"))?;
        let bearer =
            Bearer::of_token(&credential.into_inner().token).map_err(LoadtestError::CredentialNotAHeader)?;
        let kid = server.protector.map(|p| p.kid).filter(|k| !k.is_empty()).unwrap_or(key.kid.clone());
        targets.push((kid, bearer));
    }
    Ok(targets)
}

/// DEKs and their ciphertexts under each key, `distinct` per key, by (key, chunk): wrapped in
/// chunks on the blocking pool.
async fn wrap_deks(
    public: &[proto::JsonWebKey],
    distinct: usize,
) -> Result<BTreeMap<(usize, usize), (Vec<u8>, Vec<u8>)>, LoadtestError> {
    let mut chunks = JoinSet::new();
    for (k, key) in public.iter().enumerate() {
        for (c, start) in (0..distinct).step_by(WRAP_CHUNK).enumerate() {
            let count = WRAP_CHUNK.min(distinct - start);
            let (n, e) = (key.n.clone(), key.e.clone());
            chunks.spawn_blocking(move || {
                let deks = random_bytes(count * DEK_BYTES);
                let mut wrapped = Vec::with_capacity(count * WRAPPED_BYTES);
                for dek in deks.chunks(DEK_BYTES) {
                    let ct = rsa_encrypt_with_public(&n, &e, Algorithm::RsaOaep256, dek)
                        .map_err(LoadtestError::Wrap)?;
                    if ct.len() != WRAPPED_BYTES {
                        return Err(LoadtestError::WrappedSize(ct.len()));
                    }
                    wrapped.extend_from_slice(&ct);
                }
                Ok((k, c, deks, wrapped))
            });
        }
    }
    let mut pieces = BTreeMap::new();
    while let Some(joined) = chunks.join_next().await {
        let (k, c, deks, wrapped) =
            joined.map_err(|source| LoadtestError::Task { task: "wrapping", source })??;
        pieces.insert((k, c), (deks, wrapped));
    }
    Ok(pieces)
}

/// Same shapes as the broker's workload: `keys × distinct` ciphertexts of 256 bytes (random:
/// the baseline does not decrypt), every answer naming [`BASELINE_KID`] and [`BASELINE_DEK`].
pub(super) fn baseline(args: &LoadtestArgs) -> Workload {
    let distinct = args.distinct_ciphertexts as usize;
    let targets = (0..args.keys)
        .map(|_| Target {
            kid: BASELINE_KID.to_string(),
            database: "db1".to_string(),
            bearer: Bearer::default(),
            wrapped: random_bytes(distinct * WRAPPED_BYTES),
            deks: BASELINE_DEK.repeat(distinct),
        })
        .collect();
    Workload { targets, distinct }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_cycle_over_keys_then_ciphertexts() {
        let target = |kid: &str| Target {
            kid: kid.to_string(),
            database: String::new(),
            bearer: Bearer::default(),
            wrapped: vec![0; 3 * WRAPPED_BYTES],
            deks: vec![0; 3 * DEK_BYTES],
        };
        let w = Workload { targets: vec![target("a"), target("b")], distinct: 3 };
        let picks: Vec<(String, usize)> =
            (0..8).map(|s| w.pick(s)).map(|(t, i)| (t.kid.clone(), i)).collect();
        let expected = [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 0), ("b", 0)];
        assert_eq!(picks, expected.map(|(k, i)| (k.to_string(), i)));
        // Every (key, ciphertext) pair is used once in the first `cycle` requests.
        assert_eq!(w.cycle(), 6);
    }
}
