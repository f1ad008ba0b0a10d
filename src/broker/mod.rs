//! The broker: in-memory state, the single apply path for changes, and the operations the gRPC
//! services call. Reads (and the crypto hot path) take a short read lock and never touch the
//! store; writes are serialised, committed durably, then applied (ARCHITECTURE.md invariant 5).

pub mod cache;
pub mod clock;
pub mod emulation;
pub mod faults;
pub mod feed;
pub mod gate;
pub mod identities;
pub mod keys;
pub mod roles;
pub mod servers;
pub mod state;
pub mod tde;
pub mod throttle;
pub mod vault_kv;
pub mod vaults;

use std::sync::{Arc, RwLock, RwLockReadGuard};

use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::crypto::Sealer;
use crate::model::{BrokerError, Change, Principal};
use crate::policy::control;
use crate::store::Store;
pub use clock::Clock;
use state::State;

/// Settings that shape identifiers and texts (from the configuration).
#[derive(Clone, Debug)]
pub struct Settings {
    /// DNS suffix of vault URIs, e.g. `vault.azure.net`.
    pub vault_dns_suffix: String,
    /// Location shown in denial texts, e.g. `westus`.
    pub location: String,
    /// Tenant GUID.
    pub tenant_id: String,
    /// Subscription that vaults live in.
    pub subscription_id: String,
    /// Resource group that vaults live in.
    pub resource_group: String,
    /// TDE behaviour.
    pub tde: TdeSettings,
    /// Whether "Allow trusted Microsoft services to bypass this firewall" exists in this cloud
    /// (the English seed: not in national clouds).
    pub trusted_service_bypass: bool,
    /// Peers whose `x-forwarded-for` header is believed (CIDRs); empty = no proxy is trusted.
    pub trusted_proxies: Vec<String>,
    /// Hot-path caches.
    pub caches: cache::CacheSettings,
    /// Key Vault throttling of every vault at start (config `throttling`; off by default).
    pub throttling: throttle::ThrottleProfile,
    /// Following a store shared with other brokers: staleness bound, poll interval, lease TTL.
    pub feed: feed::FeedSettings,
}

/// `enforce_cmk`: the built-in policy "SQL server should use customer-managed keys".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnforceCmk {
    /// No policy.
    #[default]
    Off,
    /// Allow, and log the non-compliant resource.
    Audit,
    /// Refuse servers without a customer-managed key.
    Deny,
}

/// TDE settings (docs/RULES.md R4).
#[derive(Clone, Debug)]
pub struct TdeSettings {
    /// Heal window and transient grace.
    pub timing: crate::model::server::TdeTiming,
    /// How often the prober evaluates every server, seconds of the broker's clock.
    pub probe_interval: i64,
    /// Which cloud's documentation links the texts carry.
    pub cloud: crate::model::server::Cloud,
    /// The CMK policy.
    pub enforce_cmk: EnforceCmk,
    /// Lifetime of engine host credentials, seconds.
    pub host_token_lifetime: i64,
}

impl Default for TdeSettings {
    fn default() -> Self {
        TdeSettings {
            timing: crate::model::server::TdeTiming::default(),
            probe_interval: 600,
            cloud: crate::model::server::Cloud::AzureCloud,
            enforce_cmk: EnforceCmk::Off,
            host_token_lifetime: 24 * 3600,
        }
    }
}

impl Settings {
    /// The token issuer for this tenant.
    pub fn issuer(&self) -> String {
        format!("https://sts.windows.net/{}/", self.tenant_id)
    }

    /// ARM id of a vault.
    pub fn vault_resource_id(&self, vault: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.KeyVault/vaults/{vault}",
            self.subscription_id, self.resource_group
        )
    }
}

/// Logs a store failure and says what the caller is told: a damaged store is
/// [`BrokerError::StoreCorrupt`] (retrying cannot help), a full disk [`BrokerError::StoreFull`]
/// (retrying helps once space is freed), anything else [`BrokerError::StoreUnavailable`].
fn store_failed(e: &crate::store::StoreError, what: &str) -> BrokerError {
    if e.is_damage() {
        tracing::error!(error = %e, "{what}: the store is damaged; stop the broker and restore the store from a backup");
        BrokerError::StoreCorrupt
    } else if e.is_full() {
        tracing::error!(error = %e, "{what}: out of disk space; free space on the file system that holds the data directory");
        BrokerError::StoreFull
    } else {
        tracing::error!(error = %e, "{what}");
        BrokerError::StoreUnavailable
    }
}

/// Parts of the broker shared with blocking tasks (commits run to completion even when the
/// request that started them is cancelled).
struct Core {
    state: RwLock<State>,
    store: Arc<dyn Store>,
    /// The broker's clock (a `SetManualClock` batch moves it as it is applied).
    clock: Arc<Clock>,
    /// With a change feed: the sequence number of the last batch applied to `state` (moved only
    /// under the state's write lock, by a holder of the writer lock).
    applied: std::sync::atomic::AtomicU64,
    /// With a change feed: when the broker last knew it had every committed batch.
    freshness: Option<feed::Freshness>,
}

/// A write in progress: holds the writer lock from validation to apply, so no other change can
/// slip in between what was validated and what is committed.
pub struct WriteTxn {
    _guard: OwnedMutexGuard<()>,
}

/// The broker.
pub struct Broker {
    core: Arc<Core>,
    writer: Arc<Mutex<()>>,
    /// Seals and unseals key material under the master key.
    sealer: Arc<Sealer>,
    /// The broker's clock.
    pub clock: Arc<Clock>,
    /// This broker's id on a shared store: the origin of its commits, the holder of its leases.
    instance_id: String,
    /// The leases this broker holds (for logging their changes of hands).
    leases: std::sync::Mutex<std::collections::HashSet<&'static str>>,
    /// Identifier and text settings.
    pub settings: Settings,
    /// Database state transitions, for watchers.
    events: tokio::sync::broadcast::Sender<tde::DbEventRecord>,
    /// Injected faults.
    pub faults: faults::Faults,
    /// Key Vault throttling (Emulation.SetThrottling).
    pub throttle: throttle::Throttle,
    /// Authorization-decision and unwrap-result caches.
    pub caches: cache::Caches,
    /// Per server (lower-cased id): when the current run of transient faults began.
    transient_since: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// Broker-clock time of the last full TDE probe.
    last_probe: std::sync::atomic::AtomicI64,
    /// Key versions whose rotation policy's Notify action was given (`vault/key/version`).
    notified: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Flips to true when the server starts shutting down: long-lived streams end then, so a
    /// graceful shutdown does not wait for watchers forever.
    shutting_down: tokio::sync::watch::Sender<bool>,
}

impl Broker {
    /// Builds a broker over an opened store, loading its state.
    pub async fn open(
        store: Arc<dyn Store>,
        sealer: Arc<Sealer>,
        clock: Clock,
        settings: Settings,
    ) -> Result<Arc<Self>, BrokerError> {
        let s = store.clone();
        // On a shared store the snapshot comes with the feed position it holds.
        let (snap, applied) = tokio::task::spawn_blocking(move || match s.feed() {
            Some(feed) => feed::consistent_snapshot(s.as_ref(), feed),
            None => s.load().map(|snap| (snap, 0)),
        })
        .await
        .map_err(|_| BrokerError::Internal)?
        .map_err(|e| store_failed(&e, "loading the store failed"))?;
        let started = clock.now();
        let caches = cache::Caches::new(&settings.caches);
        let throttle = throttle::Throttle::new(settings.throttling);
        let clock = Arc::new(clock);
        let freshness = store.feed().map(|_| feed::Freshness::new(settings.feed.staleness_bound));
        let broker = Arc::new(Broker {
            core: Arc::new(Core {
                state: RwLock::new(State::from_snapshot(snap)),
                store,
                clock: clock.clone(),
                applied: std::sync::atomic::AtomicU64::new(applied),
                freshness,
            }),
            writer: Arc::new(Mutex::new(())),
            sealer,
            clock,
            instance_id: new_guid(),
            leases: std::sync::Mutex::new(std::collections::HashSet::new()),
            settings,
            events: tokio::sync::broadcast::channel(1024).0,
            last_probe: std::sync::atomic::AtomicI64::new(started),
            shutting_down: tokio::sync::watch::channel(false).0,
            faults: faults::Faults::default(),
            throttle,
            caches,
            transient_since: std::sync::Mutex::new(std::collections::HashMap::new()),
            notified: std::sync::Mutex::new(std::collections::HashSet::new()),
        });
        broker.start_follower();
        Ok(broker)
    }

    /// A read view of the state. Hold it briefly: never across I/O or an RSA operation.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        // `apply` does not panic half-way; a poisoned lock still holds consistent state.
        self.core.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The current epoch: it moves with every applied change.
    pub fn epoch(&self) -> u64 {
        self.read().epoch
    }

    /// The sealer (master key).
    pub fn sealer(&self) -> &Arc<Sealer> {
        &self.sealer
    }

    /// Starts a write: waits for the writer lock. On a shared store it first catches up with
    /// the feed, so the write is validated against every batch committed so far (when that
    /// fails, the commit is refused by the store instead: it checks the position).
    pub async fn begin(&self) -> WriteTxn {
        let txn = WriteTxn { _guard: self.writer.clone().lock_owned().await };
        if let Err(e) = self.catch_up_locked().await {
            tracing::debug!(error = %e, "catching up before a write failed; the commit checks the feed position");
        }
        txn
    }

    /// Commits `changes` durably, applies them and bumps the epoch, then releases the writer
    /// lock. Runs to completion even if the caller's future is dropped.
    ///
    /// On a shared store the commit is made at this broker's feed position: when another broker
    /// committed since, nothing is written, the broker catches up and the caller gets
    /// [`BrokerError::ConcurrentChange`] (retrying decides again on the fresh state).
    pub async fn commit(&self, txn: WriteTxn, changes: Vec<Change>) -> Result<(), BrokerError> {
        let core = self.core.clone();
        let origin = self.instance_id.clone();
        let committed = tokio::task::spawn_blocking(move || {
            let _txn = txn;
            match (core.store.feed(), &core.freshness) {
                (Some(feed), Some(freshness)) => {
                    let started = freshness.now_ms();
                    let after = core.applied.load(std::sync::atomic::Ordering::SeqCst);
                    match feed.commit_after(after, &origin, &changes) {
                        Ok(seq) => {
                            core.apply_batch(Some(seq), changes, false);
                            freshness.synced(started);
                            Ok(true)
                        }
                        Err(crate::store::StoreError::Conflict { head, expected }) => {
                            tracing::info!(
                                head,
                                expected,
                                "another broker committed first; nothing was written"
                            );
                            Ok(false)
                        }
                        Err(e) => Err(store_failed(&e, "store commit failed; nothing was changed")),
                    }
                }
                _ => {
                    core.store
                        .commit(&changes)
                        .map_err(|e| store_failed(&e, "store commit failed; nothing was changed"))?;
                    core.apply_batch(None, changes, false);
                    Ok(true)
                }
            }
        })
        .await
        .map_err(|_| BrokerError::Internal)??;
        if !committed {
            self.catch_up().await?;
            return Err(BrokerError::ConcurrentChange);
        }
        self.caches.epoch_moved();
        Ok(())
    }

    /// Marks the start of shutdown: watch streams end.
    pub fn begin_shutdown(&self) {
        self.shutting_down.send_replace(true);
    }

    /// Completes once shutdown has begun.
    pub fn shutdown_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutting_down.subscribe();
        async move {
            let _ = rx.wait_for(|down| *down).await;
        }
    }

    /// The principal with this object id, if it still exists.
    pub fn principal(&self, object_id: &str) -> Option<Principal> {
        self.read().principals.get(object_id).cloned()
    }

    /// Whether the principal exists (the token check of every call: no copy).
    pub fn principal_exists(&self, object_id: &str) -> bool {
        self.read().principals.contains_key(object_id)
    }

    /// Control-plane check against the ARM role assignments.
    pub fn authorize_control(&self, object_id: &str, action: &str, scope: &str) -> Result<(), BrokerError> {
        control::authorize(&self.read().role_assignments, object_id, action, scope)
    }

    /// Databases by TDE state now: the `tdebroker_databases` gauge's `(state, count)` pairs.
    pub fn database_counts(&self) -> [(&'static str, u64); 2] {
        let st = self.read();
        let online =
            st.databases.values().filter(|d| d.state == crate::model::server::DbState::Online).count() as u64;
        let total = st.databases.len() as u64;
        [("ONLINE", online), ("INACCESSIBLE", total - online)]
    }

    /// The store (for bootstrap metadata).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.core.store
    }
}

/// A new GUID, lower-case, as the cloud prints object ids.
pub fn new_guid() -> String {
    uuid::Uuid::new_v4().to_string()
}
