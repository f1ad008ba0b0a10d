//! The hot path's caches (docs/PERFORMANCE.md): authorization decisions keyed with the state epoch,
//! so any change voids every cached decision at once, and unwrap results keyed by (key version,
//! algorithm, SHA-256 of the ciphertext), consulted only after authorization and the key rules
//! passed. Both are bounded by entries and TTL and can be switched off.

use crate::telemetry::{CacheCounter, metrics};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::broker::state::Loaded;
use zeroize::{Zeroize, Zeroizing};

#[cfg(test)]
use crate::crypto::Zbytes;
use crate::model::{Algorithm, BrokerError, KeyPermission};

/// Cache settings (config `cache_*`).
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// Master switch.
    pub enabled: bool,
    /// Most cached authorization decisions (0, or a zero TTL: decisions are not cached).
    pub decision_entries: u64,
    /// Longest life of a cached decision.
    pub decision_ttl: Duration,
    /// Most cached unwrap results (0, or a zero TTL: no plaintext DEK is kept in memory,
    /// while decisions may still be cached).
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
#[derive(Clone, Copy, Debug)]
pub struct DecisionContext<'a> {
    /// The state epoch the decision is made at.
    pub epoch: u64,
    /// Caller object id.
    pub principal: &'a str,
    /// Vault name.
    pub vault: &'a str,
    /// Key index (lower-cased name), or empty for vault-level permissions.
    pub key: &'a str,
    /// The permission.
    pub permission: KeyPermission,
    /// The client address.
    pub addr: Option<IpAddr>,
    /// Trusted service call.
    pub trusted_service: bool,
    /// Source subnet.
    pub subnet: Option<&'a str>,
}

/// A cached decision's key: SHA-256 over its whole [`DecisionContext`], each part framed with
/// its length. 32 bytes inline: an entry holds no strings, and hashing the context copies none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecisionKey([u8; 32]);

impl DecisionKey {
    /// The key of a decision in context `c`.
    pub fn new(c: &DecisionContext<'_>) -> Self {
        // Absent and present-but-empty values frame differently: a presence byte precedes each.
        let mut addr = [0u8; 17];
        let addr_len = match c.addr {
            None => 0,
            Some(IpAddr::V4(a)) => {
                addr[0] = 4;
                addr[1..5].copy_from_slice(&a.octets());
                5
            }
            Some(IpAddr::V6(a)) => {
                addr[0] = 6;
                addr[1..].copy_from_slice(&a.octets());
                17
            }
        };
        let (has_subnet, subnet) = match c.subnet {
            Some(s) => (&[1u8], s.as_bytes()),
            None => (&[0u8], &[][..]),
        };
        DecisionKey(crate::crypto::sha256_framed(&[
            b"tde-broker/decision/v1",
            &c.epoch.to_be_bytes(),
            c.principal.as_bytes(),
            c.vault.as_bytes(),
            c.key.as_bytes(),
            c.permission.name().as_bytes(),
            &addr[..addr_len],
            &[u8::from(c.trusted_service)],
            has_subnet,
            subnet,
        ]))
    }
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

/// Bytes of an unwrap result held inline (an AES-256 DEK).
const INLINE_SECRET: usize = 32;

/// An unwrap result as the cache holds it: a DEK of up to 32 bytes shares one allocation with
/// its `Arc` (64 bytes with the counts, where a `Vec` would add a second allocation of 48), longer
/// ones are on the heap. Wiped when dropped.
pub enum CachedSecret {
    /// Up to [`INLINE_SECRET`] bytes.
    Inline {
        /// Bytes used.
        len: u8,
        /// The bytes, zero past `len`.
        bytes: [u8; INLINE_SECRET],
    },
    /// Longer results.
    Heap(Vec<u8>),
}

impl CachedSecret {
    /// Copies `plain`.
    pub fn new(plain: &[u8]) -> Zeroizing<Self> {
        Zeroizing::new(match u8::try_from(plain.len()) {
            Ok(len) if plain.len() <= INLINE_SECRET => {
                let mut bytes = [0u8; INLINE_SECRET];
                bytes[..plain.len()].copy_from_slice(plain);
                CachedSecret::Inline { len, bytes }
            }
            _ => CachedSecret::Heap(plain.to_vec()),
        })
    }

    /// The secret's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CachedSecret::Inline { len, bytes } => &bytes[..usize::from(*len)],
            CachedSecret::Heap(v) => v,
        }
    }
}

impl Zeroize for CachedSecret {
    fn zeroize(&mut self) {
        match self {
            CachedSecret::Inline { len, bytes } => {
                bytes.zeroize();
                *len = 0;
            }
            CachedSecret::Heap(v) => v.zeroize(),
        }
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
    unwraps: Option<Cache<UnwrapKey, Arc<Zeroizing<CachedSecret>>>>,
    /// Decoded keys by their sealing AAD (which names vault, key and version).
    decoded: Cache<String, Arc<Loaded>>,
    /// Hits and misses of the decision cache, counted without a lock or a key.
    decision_counter: CacheCounter,
    /// Hits and misses of the unwrap cache.
    unwrap_counter: CacheCounter,
}

impl Caches {
    /// Builds the caches: none when switched off, and each one only when it may hold an entry
    /// for some time.
    pub fn new(s: &CacheSettings) -> Self {
        fn bounded<K, V>(on: bool, entries: u64, ttl: Duration) -> Option<Cache<K, V>>
        where
            K: std::hash::Hash + Eq + Send + Sync + 'static,
            V: Clone + Send + Sync + 'static,
        {
            (on && entries > 0 && !ttl.is_zero())
                .then(|| Cache::builder().max_capacity(entries).time_to_live(ttl).build())
        }
        Caches {
            decoded: Cache::builder().max_capacity(s.decoded_key_entries).build(),
            decisions: bounded(s.enabled, s.decision_entries, s.decision_ttl),
            unwraps: bounded(s.enabled, s.unwrap_entries, s.unwrap_ttl),
            decision_counter: metrics().cache_counter(DECISION),
            unwrap_counter: metrics().cache_counter(UNWRAP),
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
            self.decision_counter.record(true);
            return hit;
        }
        self.decision_counter.record(false);
        let result = decide();
        cache.insert(key, result.clone());
        result
    }

    /// A cached unwrap result.
    pub fn unwrapped(&self, key: &UnwrapKey) -> Option<Arc<Zeroizing<CachedSecret>>> {
        let hit = self.unwraps.as_ref()?.get(key);
        self.unwrap_counter.record(hit.is_some());
        hit
    }

    /// Remembers an unwrap result (a copy of `plaintext`).
    pub fn remember_unwrap(&self, key: UnwrapKey, plaintext: &[u8]) {
        if let Some(c) = &self.unwraps {
            c.insert(key, Arc::new(CachedSecret::new(plaintext)));
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

    fn context(epoch: u64) -> DecisionContext<'static> {
        DecisionContext {
            epoch,
            principal: "p",
            vault: "v",
            key: "k",
            permission: KeyPermission::UnwrapKey,
            addr: None,
            trusted_service: false,
            subnet: None,
        }
    }

    #[test]
    fn cached_secrets_give_back_exactly_what_was_stored() {
        for len in [0usize, 1, 31, 32, 33, 64, 470] {
            let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            let mut s = CachedSecret::new(&plain);
            assert_eq!(s.as_bytes(), &plain[..], "length {len}");
            assert_eq!(matches!(*s, CachedSecret::Inline { .. }), len <= INLINE_SECRET, "length {len}");
            s.zeroize();
            match &*s {
                CachedSecret::Inline { len, bytes } => assert!(*len == 0 && bytes.iter().all(|b| *b == 0)),
                CachedSecret::Heap(v) => assert!(v.is_empty()),
            }
        }
    }

    #[test]
    fn every_part_of_the_context_changes_the_decision_key() {
        let base = context(1);
        let v4: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([0u8; 4]));
        let variants = [
            DecisionContext { epoch: 2, ..base },
            DecisionContext { principal: "q", ..base },
            DecisionContext { vault: "w", ..base },
            DecisionContext { key: "", ..base },
            DecisionContext { permission: KeyPermission::WrapKey, ..base },
            DecisionContext { addr: Some(v4), ..base },
            // The same four octets as IPv6 (mapped) are another address.
            DecisionContext {
                addr: Some(IpAddr::V6(std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped())),
                ..base
            },
            DecisionContext { trusted_service: true, ..base },
            DecisionContext { subnet: Some(""), ..base },
            DecisionContext { subnet: Some("s"), ..base },
            // Moving bytes from one part to the next is another context (length framing).
            DecisionContext { principal: "pv", vault: "", ..base },
        ];
        let mut keys: Vec<DecisionKey> = variants.iter().map(DecisionKey::new).collect();
        keys.push(DecisionKey::new(&base));
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "two contexts share a decision key");
        assert_eq!(DecisionKey::new(&base), DecisionKey::new(&context(1)), "the key is deterministic");
    }

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
        let key = |epoch| DecisionKey::new(&context(epoch));
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
        caches.remember_unwrap(key(1), &[1]);
        caches.remember_unwrap(key(2), &[2]);
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
        off.remember_unwrap(key(1), &[1]);
        for f in off.figures() {
            assert_eq!((f.enabled, f.entries, f.capacity, f.ttl), (false, 0, 0, Duration::ZERO));
        }
    }

    #[test]
    fn a_cache_with_no_room_or_no_lifetime_is_off_and_the_other_stays_on() {
        let key = UnwrapKey::new("v/k/1", Algorithm::RsaOaep256, &[1; 32]);
        for settings in [
            CacheSettings { unwrap_entries: 0, ..CacheSettings::default() },
            CacheSettings { unwrap_ttl: Duration::ZERO, ..CacheSettings::default() },
        ] {
            let caches = Caches::new(&settings);
            caches.remember_unwrap(key, &[9; 32]);
            assert!(caches.unwrapped(&key).is_none(), "no plaintext is kept");
            let [d, u] = caches.figures();
            assert!(d.enabled && !u.enabled);
            assert!(caches.decision(DecisionKey::new(&context(1)), || Ok(())).is_ok());
            assert_eq!(caches.figures()[0].entries, 1, "decisions are still cached");
        }
        let caches = Caches::new(&CacheSettings { decision_entries: 0, ..CacheSettings::default() });
        let [d, u] = caches.figures();
        assert!(!d.enabled && u.enabled);
        let mut decided = 0;
        for _ in 0..2 {
            let _ = caches.decision(DecisionKey::new(&context(1)), || {
                decided += 1;
                Ok(())
            });
        }
        assert_eq!(decided, 2, "every call decides");
    }
}
