//! Following the change feed of a store that several brokers share (PostgreSQL).
//!
//! Every broker keeps the whole state in memory and answers from it. When the store has a
//! [`ChangeFeed`], each commit of any broker gets the next sequence number, and each broker:
//!
//! - commits with [`ChangeFeed::commit_after`] at the position its memory holds, so a change
//!   validated against stale state is refused ([`BrokerError::ConcurrentChange`], retriable)
//!   instead of overwriting another broker's write, and applies its own batch at once
//!   (read-your-writes);
//! - follows the feed: a task wakes on the store's notifications and at least every
//!   [`FeedSettings::poll_interval`], reads the batches after its position and applies the other
//!   brokers' ones through the same [`State::apply`](super::state::State::apply) as its own,
//!   moving the epoch (so cached decisions die), the manual clock (`SetManualClock`) and the
//!   watchers of database states (a `PutDatabase` that changes a database's state is published
//!   as that transition);
//! - fails closed: [`Freshness`] records when the broker last knew it had every committed batch;
//!   once that is older than [`FeedSettings::staleness_bound`] the data plane refuses calls
//!   ([`BrokerError::BrokerStale`]) until a read succeeds again. A revocation committed anywhere
//!   is therefore either applied or refused everywhere within the bound (plus one apply).
//!
//! Once-only work (the sweeper: purges, rotation policies, the TDE prober) runs under the store's
//! lease [`SWEEPER_LEASE`] ([`Broker::hold_lease`]); start-up's one-time writes (master-key check,
//! signing key, bootstrap admin, seed) under [`BOOTSTRAP_LEASE`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::tde::DbEventRecord;
use super::{Broker, Core};
use crate::model::server::{DbEvent, DbState};
use crate::model::{BrokerError, Change};
use crate::store::{ChangeFeed, FeedEntry, StoreError};

/// The lease of the sweeper's once-only work.
pub const SWEEPER_LEASE: &str = "sweeper";
/// The lease of start-up's one-time writes.
pub const BOOTSTRAP_LEASE: &str = "bootstrap";
/// Batches read from the feed at once.
const READ_BATCH: usize = 256;

/// How a broker follows a shared store (config `feed_staleness_bound_ms`, `feed_poll_ms`,
/// `lease_ttl_ms`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedSettings {
    /// How long the broker may go without knowing it has every committed change before its data
    /// plane fails closed. 750 ms by default: the promise is that a change acknowledged by one
    /// broker is enforced by every other within 1 s; a broker whose last complete read began
    /// at most 750 ms ago, plus the time to apply a batch, is inside it, and a healthy broker
    /// reads at least every `poll_interval` (200 ms), so three missed reads in a row are
    /// tolerated before it refuses calls.
    pub staleness_bound: Duration,
    /// The safety net: the follower reads the feed at least this often, notification or not.
    pub poll_interval: Duration,
    /// How long a lease (the sweeper's) lasts without renewal: the longest a dead broker's
    /// once-only work waits for a survivor (the sweeper renews every second).
    pub lease_ttl: Duration,
}

impl Default for FeedSettings {
    fn default() -> Self {
        FeedSettings {
            staleness_bound: Duration::from_millis(750),
            poll_interval: Duration::from_millis(200),
            lease_ttl: Duration::from_secs(5),
        }
    }
}

/// When the broker last knew it held every committed batch: one atomic read decides, on the
/// hot path, whether it may answer.
#[derive(Debug)]
pub struct Freshness {
    base: Instant,
    /// Milliseconds after `base` at which the last complete read of the feed began.
    synced_at: AtomicU64,
    bound_ms: u64,
    /// Whether the broker said (in its log) that it is stale; reset when it catches up.
    stale_reported: AtomicBool,
}

impl Freshness {
    /// Fresh as of now.
    pub fn new(bound: Duration) -> Self {
        Freshness {
            base: Instant::now(),
            synced_at: AtomicU64::new(0),
            bound_ms: u64::try_from(bound.as_millis()).unwrap_or(u64::MAX),
            stale_reported: AtomicBool::new(false),
        }
    }

    /// Milliseconds since `base`, monotonic.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A read that began at `started` (a [`Freshness::now_ms`]) saw everything committed.
    pub fn synced(&self, started: u64) {
        self.synced_at.fetch_max(started, Ordering::SeqCst);
        if self.stale_reported.swap(false, Ordering::SeqCst) {
            tracing::warn!("caught up with the shared store: the data plane serves again");
        }
    }

    /// Milliseconds since the broker last knew it had every committed change.
    pub fn lag_ms(&self) -> u64 {
        self.now_ms().saturating_sub(self.synced_at.load(Ordering::SeqCst))
    }

    /// The staleness bound, milliseconds.
    pub fn bound_ms(&self) -> u64 {
        self.bound_ms
    }

    /// Whether the lag is past the bound.
    pub fn is_stale(&self) -> bool {
        self.lag_ms() > self.bound_ms
    }

    /// `Err(BrokerStale)` past the bound (logged once per stale spell).
    pub fn check(&self) -> Result<(), BrokerError> {
        let lag = self.lag_ms();
        if lag <= self.bound_ms {
            return Ok(());
        }
        if !self.stale_reported.swap(true, Ordering::SeqCst) {
            tracing::error!(
                lag_ms = lag,
                bound_ms = self.bound_ms,
                "lost contact with the shared store for longer than the staleness bound: data-plane requests are refused (fail closed) until the broker catches up"
            );
        }
        Err(BrokerError::BrokerStale { bound_ms: self.bound_ms })
    }
}

/// What `/readyz` reports of a broker on a shared store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedStatus {
    /// Milliseconds since the broker last knew it had every committed change.
    pub lag_ms: u64,
    /// The staleness bound.
    pub bound_ms: u64,
    /// The sequence number of the last batch applied.
    pub applied: u64,
}

impl FeedStatus {
    /// Whether the data plane fails closed.
    pub fn stale(&self) -> bool {
        self.lag_ms > self.bound_ms
    }
}

/// The transition a `PutDatabase` makes, compared with the database as it was.
fn transition(before: Option<&crate::model::server::Database>, after: &Change) -> Option<DbEvent> {
    let Change::PutDatabase(next) = after else { return None };
    let before = before?;
    if before.state == next.state {
        return None;
    }
    Some(match next.state {
        DbState::Inaccessible => DbEvent::MakeDatabaseInaccessible,
        DbState::Online => DbEvent::MakeDatabaseAccessible,
    })
}

impl Core {
    /// Applies a committed batch (the broker's own or another's) and moves the feed position to
    /// `seq` (with a feed). Moves the manual clock for `SetManualClock`. Returns the database
    /// state transitions it made (computed only when `events` is asked for).
    pub(super) fn apply_batch(
        &self,
        seq: Option<u64>,
        changes: Vec<Change>,
        events: bool,
    ) -> Vec<DbEventRecord> {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for c in &changes {
            match c {
                Change::SetManualClock { now } => self.clock.jump_to(*now),
                Change::PutDatabase(d) if events => {
                    let key = super::state::db_key(&d.server_id, &d.name);
                    if let Some(event) = transition(st.databases.get(&key), c) {
                        out.push(DbEventRecord { database: d.clone(), event, time: self.clock.now() });
                    }
                }
                _ => {}
            }
        }
        st.apply(changes);
        if let Some(seq) = seq {
            self.applied.store(seq, Ordering::SeqCst);
        }
        out
    }

    /// Loads the whole state again (a position the feed no longer holds), keeping the epoch
    /// moving forward. Blocking.
    fn reload(&self, feed: &dyn ChangeFeed) -> Result<(), StoreError> {
        let (snap, head) = consistent_snapshot(self.store.as_ref(), feed)?;
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        let epoch = st.epoch + 1;
        *st = super::state::State::from_snapshot(snap);
        st.epoch = epoch;
        self.applied.store(head, Ordering::SeqCst);
        tracing::warn!(
            head,
            "the change feed no longer holds this broker's position: reloaded the whole state"
        );
        Ok(())
    }
}

/// A snapshot and the feed position it holds ([`ChangeFeed::load_at_head`]: one consistent
/// view). Blocking.
pub(super) fn consistent_snapshot(
    _store: &dyn crate::store::Store,
    feed: &dyn ChangeFeed,
) -> Result<(crate::store::Snapshot, u64), StoreError> {
    feed.load_at_head()
}

/// What one read of the feed found.
enum Read {
    /// These batches follow the broker's position directly.
    Batches(Vec<FeedEntry>),
    /// Nothing after the position: the broker is caught up.
    Nothing,
    /// The feed lost the batches right after the position (pruned): reload.
    Gap,
}

fn read_feed(core: &Core, after: u64) -> Result<Read, StoreError> {
    let Some(feed) = core.store.feed() else { return Ok(Read::Nothing) };
    let entries = match feed.read_after(after, READ_BATCH) {
        Err(StoreError::FeedPruned { .. }) => return Ok(Read::Gap),
        read => read?,
    };
    match entries.first() {
        Some(first) if first.seq != after + 1 => Ok(Read::Gap),
        Some(_) => Ok(Read::Batches(entries)),
        None if feed.head()? > after => Ok(Read::Gap),
        None => Ok(Read::Nothing),
    }
}

impl Broker {
    /// The broker's instance id: the origin of its commits and the holder of its leases.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The data plane's fail-closed check: `Err(BrokerStale)` when the broker follows a shared
    /// store and has not caught up with it within the staleness bound. One atomic read.
    pub fn check_fresh(&self) -> Result<(), BrokerError> {
        match &self.core.freshness {
            Some(f) => f.check(),
            None => Ok(()),
        }
    }

    /// Where the broker stands on the feed (`None` for a store it owns alone).
    pub fn feed_status(&self) -> Option<FeedStatus> {
        self.core.freshness.as_ref().map(|f| FeedStatus {
            lag_ms: f.lag_ms(),
            bound_ms: f.bound_ms(),
            applied: self.core.applied.load(Ordering::SeqCst),
        })
    }

    /// Applies every batch the feed holds after this broker's position (waiting for the writer
    /// lock). A no-op without a feed.
    pub async fn catch_up(&self) -> Result<(), BrokerError> {
        if self.core.store.feed().is_none() {
            return Ok(());
        }
        let _guard = self.writer.clone().lock_owned().await;
        self.catch_up_locked().await
    }

    /// [`Broker::catch_up`] for a caller that holds the writer lock.
    pub(super) async fn catch_up_locked(&self) -> Result<(), BrokerError> {
        let Some(freshness) = &self.core.freshness else { return Ok(()) };
        loop {
            let started = freshness.now_ms();
            let after = self.core.applied.load(Ordering::SeqCst);
            let core = self.core.clone();
            let read = tokio::task::spawn_blocking(move || read_feed(&core, after))
                .await
                .map_err(|_| BrokerError::Internal)?
                .map_err(|e| feed_failed(&e))?;
            match read {
                Read::Nothing => {
                    freshness.synced(started);
                    return Ok(());
                }
                Read::Gap => {
                    let core = self.core.clone();
                    tokio::task::spawn_blocking(move || match core.store.feed() {
                        Some(feed) => core.reload(feed),
                        None => Ok(()),
                    })
                    .await
                    .map_err(|_| BrokerError::Internal)?
                    .map_err(|e| feed_failed(&e))?;
                    self.caches.epoch_moved();
                    freshness.synced(started);
                    return Ok(());
                }
                Read::Batches(entries) => {
                    let full = entries.len() >= READ_BATCH;
                    let mut events = Vec::new();
                    for entry in entries {
                        let mine = entry.origin == self.instance_id;
                        if mine {
                            // Only a commit this broker could not confirm (its connection failed
                            // after the commit) comes back: it was never applied here.
                            tracing::info!(
                                seq = entry.seq,
                                "applying a commit of this broker found in the feed"
                            );
                        }
                        events.extend(self.core.apply_batch(Some(entry.seq), entry.changes, true));
                    }
                    self.caches.epoch_moved();
                    self.publish(&events);
                    if !full {
                        freshness.synced(started);
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Takes or renews the lease `name` for this broker. Always `true` without a feed (the
    /// broker is alone); `false` when the store cannot be reached.
    pub async fn hold_lease(&self, name: &'static str) -> bool {
        let Some(ttl) = self.core.freshness.as_ref().map(|_| self.settings.feed.lease_ttl) else {
            return true;
        };
        let core = self.core.clone();
        let holder = self.instance_id.clone();
        let held = tokio::task::spawn_blocking(move || match core.store.feed() {
            Some(feed) => feed.lease(name, &holder, ttl),
            None => Ok(true),
        })
        .await;
        let held = match held {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, lease = name, "renewing a lease failed; the work it guards waits");
                false
            }
            Err(_) => false,
        };
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let had = leases.contains(name);
        if held && !had {
            leases.insert(name);
            tracing::info!(lease = name, instance = %self.instance_id, "this broker now holds the lease");
        } else if !held && had {
            leases.remove(name);
            tracing::warn!(lease = name, instance = %self.instance_id, "this broker no longer holds the lease");
        }
        held
    }

    /// Waits (up to `patience`) until this broker holds the lease `name`. Without a feed at once.
    pub async fn acquire_lease(&self, name: &'static str, patience: Duration) -> Result<(), BrokerError> {
        let deadline = Instant::now() + patience;
        loop {
            if self.hold_lease(name).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::error!(lease = name, "could not take the lease in time");
                return Err(BrokerError::StoreUnavailable);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Gives up the lease `name` (shutdown, or the end of start-up's one-time writes).
    pub async fn release_lease(&self, name: &'static str) {
        if self.core.freshness.is_none() {
            return;
        }
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        let core = self.core.clone();
        let holder = self.instance_id.clone();
        let released = tokio::task::spawn_blocking(move || match core.store.feed() {
            Some(feed) => feed.release(name, &holder),
            None => Ok(()),
        })
        .await;
        if let Ok(Err(e)) = released {
            tracing::warn!(error = %e, lease = name, "giving up a lease failed; it lapses by itself");
        }
    }

    /// Starts the follower task of a broker on a shared store (a no-op otherwise). It ends when
    /// the broker is dropped.
    pub(super) fn start_follower(self: &Arc<Self>) {
        if self.core.freshness.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        let core = self.core.clone();
        let poll = self.settings.feed.poll_interval;
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                {
                    let Some(broker) = weak.upgrade() else { return };
                    match broker.catch_up().await {
                        Ok(()) if failing => {
                            failing = false;
                            tracing::info!("the change feed answers again");
                        }
                        Ok(()) => {}
                        Err(_) if !failing => {
                            failing = true;
                            tracing::warn!("reading the change feed failed; retrying");
                        }
                        Err(_) => {}
                    }
                }
                // Wait for a notification, or the poll interval (the safety net).
                let core = core.clone();
                let waited = tokio::task::spawn_blocking(move || match core.store.feed() {
                    Some(feed) => feed.wait(poll).map(drop),
                    None => Ok(()),
                })
                .await;
                if !matches!(waited, Ok(Ok(()))) {
                    tokio::time::sleep(poll).await;
                }
            }
        });
    }
}

/// Runs `op` again (up to 10 times in all) while it fails with
/// [`BrokerError::ConcurrentChange`]: for work the broker does by itself, which decides again on
/// the fresh state each time (a client's request gets the error and retries itself).
pub(crate) async fn retrying_conflicts<T, F, Fut>(mut op: F) -> Result<T, BrokerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BrokerError>>,
{
    let mut attempts = 1;
    loop {
        match op().await {
            Err(BrokerError::ConcurrentChange) if attempts < 10 => attempts += 1,
            other => return other,
        }
    }
}

/// A feed failure: logged at debug level (the follower logs the spell), reported as the store
/// being unavailable.
fn feed_failed(e: &StoreError) -> BrokerError {
    tracing::debug!(error = %e, "reading the change feed failed");
    if e.is_damage() { BrokerError::StoreCorrupt } else { BrokerError::StoreUnavailable }
}

/// A shared store in memory, for tests: a [`MemoryStore`](crate::store::memory::MemoryStore)
/// with a change feed, leases, and a switch that makes it unreachable.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    use crate::model::Change;
    use crate::store::memory::MemoryStore;
    use crate::store::{ChangeFeed, FeedEntry, Snapshot, Store, StoreError};

    /// One store that several brokers share.
    #[derive(Default)]
    pub(crate) struct SharedStore {
        inner: MemoryStore,
        log: Mutex<Vec<FeedEntry>>,
        notify: Condvar,
        leases: Mutex<HashMap<String, (String, Instant)>>,
        down: AtomicBool,
        /// While set, `wait` does not return: followers stop reading the feed.
        followers_paused: AtomicBool,
        /// Every store operation made (the hot path must not add to it).
        pub(crate) queries: AtomicU64,
    }

    fn unreachable_store() -> StoreError {
        StoreError::Io {
            path: "shared-store".into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "the shared store is down"),
        }
    }

    impl SharedStore {
        /// Holds every follower in its wait (or lets them go again).
        pub(crate) fn pause_followers(&self, paused: bool) {
            self.followers_paused.store(paused, Ordering::SeqCst);
        }

        /// Makes every operation fail (or work again).
        pub(crate) fn set_down(&self, down: bool) {
            self.down.store(down, Ordering::SeqCst);
        }

        fn up(&self) -> Result<(), StoreError> {
            self.queries.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) { Err(unreachable_store()) } else { Ok(()) }
        }

        fn append(&self, after: Option<u64>, origin: &str, changes: &[Change]) -> Result<u64, StoreError> {
            self.up()?;
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            let head = log.len() as u64;
            if let Some(after) = after
                && after != head
            {
                return Err(StoreError::Conflict { head, expected: after });
            }
            self.inner.commit(changes)?;
            log.push(FeedEntry { seq: head + 1, origin: origin.to_string(), changes: changes.to_vec() });
            self.notify.notify_all();
            Ok(head + 1)
        }
    }

    impl Store for SharedStore {
        fn load(&self) -> Result<Snapshot, StoreError> {
            self.up()?;
            self.inner.load()
        }
        fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
            self.append(None, "", changes).map(drop)
        }
        fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.up()?;
            self.inner.get_meta(key)
        }
        fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.up()?;
            self.inner.put_meta(key, value)
        }
        fn feed(&self) -> Option<&dyn ChangeFeed> {
            Some(self)
        }
    }

    impl ChangeFeed for SharedStore {
        fn head(&self) -> Result<u64, StoreError> {
            self.up()?;
            Ok(self.log.lock().unwrap_or_else(|p| p.into_inner()).len() as u64)
        }
        fn read_after(&self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, StoreError> {
            self.up()?;
            let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            Ok(log.iter().skip(usize::try_from(after).unwrap_or(usize::MAX)).take(limit).cloned().collect())
        }
        fn wait(&self, timeout: Duration) -> Result<bool, StoreError> {
            while self.followers_paused.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            let (_log, t) = self.notify.wait_timeout(log, timeout).unwrap_or_else(|p| p.into_inner());
            Ok(!t.timed_out())
        }
        fn commit_after(&self, after: u64, origin: &str, changes: &[Change]) -> Result<u64, StoreError> {
            self.append(Some(after), origin, changes)
        }
        fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
            self.up()?;
            let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match leases.get(name) {
                Some((h, until)) if h != holder && *until > now => Ok(false),
                _ => {
                    leases.insert(name.to_string(), (holder.to_string(), now + ttl));
                    Ok(true)
                }
            }
        }
        fn load_at_head(&self) -> Result<(Snapshot, u64), StoreError> {
            self.up()?;
            // The log's lock keeps commits out while the snapshot is read.
            let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            Ok((self.inner.load()?, log.len() as u64))
        }
        fn release(&self, name: &str, holder: &str) -> Result<(), StoreError> {
            self.up()?;
            let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            if leases.get(name).is_some_and(|(h, _)| h == holder) {
                leases.remove(name);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::testing::SharedStore;
    use super::*;
    use crate::broker::keys::{CryptoRequest, NewAttributes, NewKey, NewMaterial};
    use crate::broker::vaults::VaultSpec;
    use crate::broker::{Clock, Settings, TdeSettings, new_guid};
    use crate::crypto::Sealer;
    use crate::model::{Caller, CryptoOp, KeyType, Principal, PrincipalKind, Role, RoleAssignment};

    const ISSUER: &str = "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/";

    fn settings(feed: FeedSettings) -> Settings {
        Settings {
            vault_dns_suffix: "vault.azure.net".into(),
            location: "westus".into(),
            tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
            subscription_id: "00000000-0000-0000-0000-000000000000".into(),
            resource_group: "tde-broker".into(),
            tde: TdeSettings::default(),
            trusted_service_bypass: true,
            trusted_proxies: vec![],
            caches: crate::broker::cache::CacheSettings::default(),
            throttling: Default::default(),
            feed,
        }
    }

    /// Two brokers on one shared store with one master key, an admin (Owner at /) and a user.
    struct Pair {
        store: Arc<SharedStore>,
        a: Arc<Broker>,
        b: Arc<Broker>,
        admin: Caller,
        user: Caller,
    }

    fn principal(name: &str, kind: PrincipalKind) -> Principal {
        Principal {
            object_id: new_guid(),
            app_id: new_guid(),
            name: name.into(),
            kind,
            resource_id: None,
            created: 0,
            client_secret_hash: None,
        }
    }

    async fn pair(feed: FeedSettings) -> Pair {
        let store = Arc::new(SharedStore::default());
        let sealer = Arc::new(Sealer::new(&Sealer::generate_master_key()).unwrap());
        let open = |clock| Broker::open(store.clone(), sealer.clone(), clock, settings(feed.clone()));
        let a = open(Clock::manual(1_700_000_000)).await.unwrap();
        let b = open(Clock::manual(1_700_000_000)).await.unwrap();
        let admin = principal("admin", PrincipalKind::User);
        let user = principal("user", PrincipalKind::User);
        let owner = RoleAssignment {
            id: new_guid(),
            scope: "/".into(),
            display_scope: "/".into(),
            principal_id: admin.object_id.clone(),
            role: Role::Owner,
        };
        let txn = a.begin().await;
        a.commit(
            txn,
            vec![
                Change::PutPrincipal(admin.clone()),
                Change::PutPrincipal(user.clone()),
                Change::PutRoleAssignment(owner),
            ],
        )
        .await
        .unwrap();
        b.catch_up().await.unwrap();
        let caller = |p: &Principal| Caller::new(&p.object_id, &p.app_id, ISSUER);
        Pair { admin: caller(&admin), user: caller(&user), store, a, b }
    }

    async fn vault_and_key(on: &Broker, admin: &Caller, user: &Caller) -> String {
        let spec = VaultSpec {
            name: "shared".into(),
            retention_days: 7,
            purge_protection: false,
            rbac: false,
            network_acls: None,
            public_network_access: true,
        };
        on.create_vault(admin, spec).await.unwrap();
        on.set_access_policy(admin, "shared", &admin.object_id, &["all".to_string()]).await.unwrap();
        on.set_access_policy(admin, "shared", &user.object_id, &["wrapKey".into(), "unwrapKey".into()])
            .await
            .unwrap();
        let key = on
            .add_key_version(
                admin,
                NewKey {
                    vault: "shared".into(),
                    name: "k".into(),
                    material: NewMaterial::Generate { kty: KeyType::Rsa, size: 2048, curve: None },
                    key_ops: vec![],
                    attributes: NewAttributes::default(),
                    tags: BTreeMap::new(),
                },
            )
            .await
            .unwrap();
        key.kid
    }

    fn request(op: CryptoOp, kid: &str, value: &[u8]) -> CryptoRequest {
        CryptoRequest {
            op,
            key_id: kid.into(),
            algorithm: "RSA-OAEP-256".into(),
            value: value.to_vec(),
            iv: vec![],
            aad: vec![],
            tag: vec![],
        }
    }

    /// Settings that never fail closed: the tests call `catch_up` where they need to know the
    /// broker is caught up (its follower runs too, every 50 ms: a test's runtime waits for the
    /// follower's blocking wait when it shuts down).
    fn quiet() -> FeedSettings {
        FeedSettings {
            staleness_bound: Duration::from_secs(3600),
            poll_interval: Duration::from_millis(50),
            lease_ttl: Duration::from_secs(5),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_created_on_one_broker_wraps_and_unwraps_on_another() {
        let p = pair(quiet()).await;
        let kid = vault_and_key(&p.a, &p.admin, &p.user).await;
        p.b.catch_up().await.unwrap();
        let wrapped = p.b.crypto(&p.user, request(CryptoOp::WrapKey, &kid, &[7; 32])).await.unwrap();
        let unwrapped =
            p.a.crypto(&p.user, request(CryptoOp::UnwrapKey, &kid, &wrapped.value)).await.unwrap();
        assert_eq!(&unwrapped.value[..], &[7; 32]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_on_one_broker_is_enforced_on_the_other_cached_unwraps_included() {
        let p = pair(quiet()).await;
        let kid = vault_and_key(&p.a, &p.admin, &p.user).await;
        p.b.catch_up().await.unwrap();
        let wrapped = p.b.crypto(&p.user, request(CryptoOp::WrapKey, &kid, &[9; 32])).await.unwrap();
        // Twice: the second is served from B's caches.
        for _ in 0..2 {
            p.b.crypto(&p.user, request(CryptoOp::UnwrapKey, &kid, &wrapped.value)).await.unwrap();
        }
        p.a.set_access_policy(&p.admin, "shared", &p.user.object_id, &[]).await.unwrap();
        p.b.catch_up().await.unwrap();
        let refused = p.b.crypto(&p.user, request(CryptoOp::UnwrapKey, &kid, &wrapped.value)).await;
        let refused = refused.err();
        assert!(
            refused.as_ref().is_some_and(|e| e.class() == crate::model::ErrorClass::Forbidden),
            "{refused:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_prepared_on_stale_state_is_refused_and_loses_no_other_write() {
        let p = pair(quiet()).await;
        vault_and_key(&p.a, &p.admin, &p.user).await;
        p.b.catch_up().await.unwrap();
        // B prepares a policy change on what it knows; A commits another one meanwhile.
        let txn = p.b.begin().await;
        let mut stale = p.b.read().vault("shared").unwrap().vault.clone();
        let other = new_guid();
        stale.access_policies.insert(other.clone(), [crate::model::KeyPermission::Get].into());
        let a_writes = {
            let (a, admin, user) = (p.a.clone(), p.admin.clone(), p.user.object_id.clone());
            tokio::spawn(async move { a.set_access_policy(&admin, "shared", &user, &["get".into()]).await })
        };
        a_writes.await.unwrap().unwrap();
        let refused = p.b.commit(txn, vec![Change::PutVault(stale)]).await;
        assert_eq!(refused, Err(BrokerError::ConcurrentChange));
        // B caught up on the refusal: retrying through the API keeps both writes.
        p.b.set_access_policy(&p.admin, "shared", &other, &["get".into()]).await.unwrap();
        p.a.catch_up().await.unwrap();
        for broker in [&p.a, &p.b] {
            let policies = broker.read().vault("shared").unwrap().vault.access_policies.clone();
            assert!(policies.contains_key(&other), "B's write is kept");
            assert_eq!(policies.get(&*p.user.object_id).map(|s| s.len()), Some(1), "A's write is kept");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_that_loses_its_store_fails_closed_and_serves_again_once_caught_up() {
        let feed = FeedSettings {
            staleness_bound: Duration::from_millis(100),
            poll_interval: Duration::from_millis(20),
            lease_ttl: Duration::from_secs(5),
        };
        let p = pair(feed).await;
        let kid = vault_and_key(&p.a, &p.admin, &p.user).await;
        p.b.catch_up().await.unwrap();
        p.b.crypto(&p.user, request(CryptoOp::WrapKey, &kid, &[1; 32])).await.unwrap();
        p.store.set_down(true);
        // Past the bound without a complete read of the feed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let refused = p.b.crypto(&p.user, request(CryptoOp::WrapKey, &kid, &[1; 32])).await;
        assert_eq!(refused.err(), Some(BrokerError::BrokerStale { bound_ms: 100 }));
        assert!(p.b.feed_status().is_some_and(|s| s.stale()));
        let write = p.a.set_access_policy(&p.admin, "shared", &p.user.object_id, &[]).await;
        assert_eq!(write, Err(BrokerError::StoreUnavailable), "writes fail closed too");
        p.store.set_down(false);
        p.b.catch_up().await.unwrap();
        p.b.crypto(&p.user, request(CryptoOp::WrapKey, &kid, &[1; 32])).await.unwrap();
        assert!(p.b.feed_status().is_some_and(|s| !s.stale()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_follower_applies_other_brokers_changes_by_itself() {
        let feed = FeedSettings {
            staleness_bound: Duration::from_millis(750),
            poll_interval: Duration::from_millis(50),
            lease_ttl: Duration::from_secs(5),
        };
        let p = pair(feed).await;
        vault_and_key(&p.a, &p.admin, &p.user).await;
        let head = p.store.head().unwrap();
        for _ in 0..200 {
            if p.b.feed_status().map(|s| s.applied) == Some(head) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(p.b.feed_status().map(|s| s.applied), Some(head));
        assert!(p.b.read().vault("shared").unwrap().key("k").is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_manual_clock_moved_on_one_broker_moves_on_the_other() {
        let p = pair(quiet()).await;
        let now = p.a.move_clock(&p.admin, crate::broker::clock::ClockMove::By(3600)).await.unwrap();
        assert_eq!(p.a.clock.now(), now);
        p.b.catch_up().await.unwrap();
        assert_eq!(p.b.clock.now(), now);
        assert_eq!(Broker::saved_clock(p.store.as_ref()).unwrap(), Some(now));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_broker_at_a_time_holds_the_sweeper_lease_and_a_survivor_takes_it_over() {
        let feed = FeedSettings { lease_ttl: Duration::from_millis(200), ..quiet() };
        let p = pair(feed).await;
        assert!(p.a.hold_lease(SWEEPER_LEASE).await);
        assert!(!p.b.hold_lease(SWEEPER_LEASE).await);
        assert!(p.a.hold_lease(SWEEPER_LEASE).await, "renewed by its holder");
        p.a.release_lease(SWEEPER_LEASE).await;
        assert!(p.b.hold_lease(SWEEPER_LEASE).await, "released: taken at once");
        // B stops renewing (killed): the lease lapses and A takes it.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(p.a.hold_lease(SWEEPER_LEASE).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_and_uncached_unwraps_make_no_store_call() {
        let p = pair(quiet()).await;
        let kid = vault_and_key(&p.a, &p.admin, &p.user).await;
        p.b.catch_up().await.unwrap();
        let wrapped: Vec<_> = {
            let mut v = Vec::new();
            for i in 0..5u8 {
                v.push(p.b.crypto(&p.user, request(CryptoOp::WrapKey, &kid, &[i; 32])).await.unwrap().value);
            }
            v
        };
        // The followers stop at their next wait; once the count stands still, no one else
        // calls the store.
        p.store.pause_followers(true);
        let mut before = p.store.queries.load(Ordering::SeqCst);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = p.store.queries.load(Ordering::SeqCst);
            if now == before {
                break;
            }
            before = now;
        }
        for w in wrapped.iter().chain(wrapped.iter()) {
            p.b.crypto(&p.user, request(CryptoOp::UnwrapKey, &kid, w)).await.unwrap();
        }
        let after = p.store.queries.load(Ordering::SeqCst);
        p.store.pause_followers(false);
        assert_eq!(after, before);
    }
}
