//! The hot path's caches (DESIGN §4): authorization decisions keyed with the state epoch, so any
//! change voids every cached decision at once, and unwrap results keyed by (key version,
//! algorithm, SHA-256 of the ciphertext), consulted only after authorization and the key rules
//! passed. Both are bounded by entries and TTL and can be switched off.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::broker::state::Loaded;
use crate::crypto::Zbytes;
use crate::model::{Algorithm, BrokerError, KeyPermission};

/// Cache settings (config `cache_*`).
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// Master switch.
    pub enabled: bool,
    /// Most cached authorization decisions.
    pub decision_entries: u64,
    /// Longest life of a cached decision.
    pub decision_ttl: Duration,
    /// Most cached unwrap results.
    pub unwrap_entries: u64,
    /// Longest life of a cached unwrap result.
    pub unwrap_ttl: Duration,
    /// Most decoded private keys kept (always on, whatever `enabled` says: without it every
    /// RSA operation would unseal and parse its key first).
    pub decoded_key_entries: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            enabled: true,
            decision_entries: 100_000,
            decision_ttl: Duration::from_secs(300),
            unwrap_entries: 100_000,
            unwrap_ttl: Duration::from_secs(300),
            decoded_key_entries: 1_000,
        }
    }
}

/// What an authorization decision depends on, besides the state (the epoch stands for it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DecisionKey {
    /// The state epoch the decision was made at.
    pub epoch: u64,
    /// Caller object id.
    pub principal: String,
    /// Vault name.
    pub vault: String,
    /// Key index (lower-cased name), or empty for vault-level permissions.
    pub key: String,
    /// The permission.
    pub permission: KeyPermission,
    /// Network context: the client address, trusted service, source subnet.
    pub addr: Option<IpAddr>,
    /// Trusted service call.
    pub trusted_service: bool,
    /// Source subnet.
    pub subnet: Option<String>,
}

/// What identifies an unwrap result: SHA-256 over the versioned key id, the algorithm and the
/// ciphertext (each length-prefixed). 32 bytes inline, so a cached DEK costs no key string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnwrapKey([u8; 32]);

impl UnwrapKey {
    /// The key of unwrapping `ciphertext` with `alg` under key version `kid`.
    pub fn new(kid: &str, alg: Algorithm, ciphertext: &[u8]) -> Self {
        UnwrapKey(crate::crypto::sha256_framed(&[kid.as_bytes(), alg.name().as_bytes(), ciphertext]))
    }
}

/// Name of the authorization-decision cache (metrics, stats).
pub const DECISION: &str = "decision";
/// Name of the unwrap-result cache (metrics, stats).
pub const UNWRAP: &str = "unwrap";

/// One cache's figures at a moment ([`Caches::figures`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheFigures {
    /// [`DECISION`] or [`UNWRAP`].
    pub name: &'static str,
    /// False when the caches are switched off.
    pub enabled: bool,
    /// Entries held.
    pub entries: u64,
    /// Most entries (0 when off).
    pub capacity: u64,
    /// Longest life of an entry (zero when off).
    pub ttl: Duration,
}

/// The two switchable caches, and the decoded private keys.
pub struct Caches {
    decisions: Option<Cache<DecisionKey, Result<(), BrokerError>>>,
    unwraps: Option<Cache<UnwrapKey, Arc<Zbytes>>>,
    /// Decoded keys by their sealing AAD (which names vault, key and version).
    decoded: Cache<String, Arc<Loaded>>,
}

impl Caches {
    /// Builds the caches (or none, when switched off).
    pub fn new(s: &CacheSettings) -> Self {
        let decoded = Cache::builder().max_capacity(s.decoded_key_entries).build();
        if !s.enabled {
            return Caches { decisions: None, unwraps: None, decoded };
        }
        Caches {
            decoded,
            decisions: Some(
                Cache::builder().max_capacity(s.decision_entries).time_to_live(s.decision_ttl).build(),
            ),
            unwraps: Some(Cache::builder().max_capacity(s.unwrap_entries).time_to_live(s.unwrap_ttl).build()),
        }
    }

    /// A cached decision for exactly this epoch and context, or the result of `decide`.
    pub fn decision(
        &self,
        key: DecisionKey,
        decide: impl FnOnce() -> Result<(), BrokerError>,
    ) -> Result<(), BrokerError> {
        let Some(cache) = &self.decisions else { return decide() };
        if let Some(hit) = cache.get(&key) {
            crate::telemetry::cache_event(DECISION, true);
            return hit;
        }
        crate::telemetry::cache_event(DECISION, false);
        let result = decide();
        cache.insert(key, result.clone());
        result
    }

    /// A cached unwrap result.
    pub fn unwrapped(&self, key: &UnwrapKey) -> Option<Arc<Zbytes>> {
        let hit = self.unwraps.as_ref()?.get(key);
        crate::telemetry::cache_event(UNWRAP, hit.is_some());
        hit
    }

    /// Remembers an unwrap result.
    pub fn remember_unwrap(&self, key: UnwrapKey, plaintext: Arc<Zbytes>) {
        if let Some(c) = &self.unwraps {
            c.insert(key, plaintext);
        }
    }

    /// The state moved to a new epoch: every cached decision is keyed with an older one and can
    /// never hit again, so they are dropped now (by the next maintenance) instead of holding
    /// memory until their TTL.
    pub fn epoch_moved(&self) {
        if let Some(c) = &self.decisions {
            c.invalidate_all();
        }
    }

    /// The decoded private key of the version sealed under `aad`, if it is held.
    pub fn decoded_key(&self, aad: &str) -> Option<Arc<Loaded>> {
        self.decoded.get(aad)
    }

    /// Keeps a freshly decoded key (the least used one goes when the cache is full).
    pub fn remember_decoded_key(&self, aad: String, key: Arc<Loaded>) {
        self.decoded.insert(aad, key);
    }

    /// Runs the caches' pending maintenance (expiry, eviction); call on a timer.
    pub fn run_pending_tasks(&self) {
        self.decoded.run_pending_tasks();
        if let Some(c) = &self.decisions {
            c.run_pending_tasks();
        }
        if let Some(c) = &self.unwraps {
            c.run_pending_tasks();
        }
    }

    /// Entries currently held: (decisions, unwraps).
    pub fn sizes(&self) -> (u64, u64) {
        (
            self.decisions.as_ref().map_or(0, |c| c.entry_count()),
            self.unwraps.as_ref().map_or(0, |c| c.entry_count()),
        )
    }

    /// Both caches' figures, decisions first. Runs the pending maintenance first, so the entry
    /// counts include recent inserts and exclude expired entries (moka counts lazily).
    pub fn figures(&self) -> [CacheFigures; 2] {
        self.run_pending_tasks();
        fn of<K, V>(name: &'static str, cache: Option<&Cache<K, V>>) -> CacheFigures
        where
            K: std::hash::Hash + Eq + Send + Sync + 'static,
            V: Clone + Send + Sync + 'static,
        {
            match cache {
                None => CacheFigures { name, enabled: false, entries: 0, capacity: 0, ttl: Duration::ZERO },
                Some(c) => {
                    let policy = c.policy();
                    CacheFigures {
                        name,
                        enabled: true,
                        entries: c.entry_count(),
                        capacity: policy.max_capacity().unwrap_or(0),
                        ttl: policy.time_to_live().unwrap_or(Duration::ZERO),
                    }
                }
            }
        }
        [of(DECISION, self.decisions.as_ref()), of(UNWRAP, self.unwraps.as_ref())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_keys_are_bounded_and_kept_with_the_caches_off() {
        let caches =
            Caches::new(&CacheSettings { enabled: false, decoded_key_entries: 2, ..Default::default() });
        for n in 0..10u8 {
            caches.remember_decoded_key(format!("aad-{n}"), Arc::new(Loaded::Oct(Zbytes::new(vec![n; 32]))));
        }
        caches.run_pending_tasks();
        assert!(caches.decoded.entry_count() <= 2, "{} decoded keys held", caches.decoded.entry_count());
        caches.remember_decoded_key("aad-x".into(), Arc::new(Loaded::Oct(Zbytes::new(vec![7; 32]))));
        assert!(matches!(caches.decoded_key("aad-x").as_deref(), Some(Loaded::Oct(k)) if k[0] == 7));
    }

    #[test]
    fn a_new_epoch_drops_every_cached_decision() {
        let caches = Caches::new(&CacheSettings::default());
        let key = |epoch| DecisionKey {
            epoch,
            principal: "p".into(),
            vault: "v".into(),
            key: "k".into(),
            permission: KeyPermission::UnwrapKey,
            addr: None,
            trusted_service: false,
            subnet: None,
        };
        assert!(caches.decision(key(1), || Ok(())).is_ok());
        let [d, _] = caches.figures();
        assert_eq!(d.entries, 1);
        caches.epoch_moved();
        let [d, _] = caches.figures();
        assert_eq!(d.entries, 0);
        // Decided again, not served from the old entry.
        let mut decided = false;
        let _ = caches.decision(key(1), || {
            decided = true;
            Ok(())
        });
        assert!(decided);
    }

    #[test]
    fn figures_count_entries_at_once_and_report_settings() {
        let settings = CacheSettings {
            decision_entries: 10,
            decision_ttl: Duration::from_secs(60),
            unwrap_entries: 20,
            unwrap_ttl: Duration::from_secs(30),
            ..CacheSettings::default()
        };
        let caches = Caches::new(&settings);
        let key = |n: u8| UnwrapKey::new("v/k/1", Algorithm::RsaOaep256, &[n; 32]);
        caches.remember_unwrap(key(1), Arc::new(Zbytes::new(vec![1])));
        caches.remember_unwrap(key(2), Arc::new(Zbytes::new(vec![2])));
        let [d, u] = caches.figures();
        assert_eq!(
            d,
            CacheFigures {
                name: DECISION,
                enabled: true,
                entries: 0,
                capacity: 10,
                ttl: Duration::from_secs(60)
            }
        );
        assert_eq!(
            u,
            CacheFigures {
                name: UNWRAP,
                enabled: true,
                entries: 2,
                capacity: 20,
                ttl: Duration::from_secs(30)
            }
        );

        let off = Caches::new(&CacheSettings { enabled: false, ..settings });
        off.remember_unwrap(key(1), Arc::new(Zbytes::new(vec![1])));
        for f in off.figures() {
            assert_eq!((f.enabled, f.entries, f.capacity, f.ttl), (false, 0, 0, Duration::ZERO));
        }
    }
}
