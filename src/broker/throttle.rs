//! Key Vault throttling (Emulation.SetThrottling, config `throttling`): the cloud's per-vault
//! limits (docs/RULES.md, Cloud behaviour, Throttling), counted in 10-second windows of the
//! broker's clock. Off by default; in memory only, like the injected faults.
//!
//! The cloud's limits per vault and 10 s:
//!
//! | key           | software CREATE | software other | HSM CREATE | HSM other |
//! |---------------|-----------------|----------------|------------|-----------|
//! | RSA 2048      | 20              | 4,000          | 10         | 2,000     |
//! | RSA 3072      | 20              | 1,000          | 10         | 500       |
//! | RSA 4096      | 20              | 500            | 10         | 250       |
//! | EC (any curve)| 20              | 4,000          | 10         | 2,000     |
//!
//! "Thresholds are weighted and summed": every request weighs its share of the vault's RSA-2048
//! software budget (4,000 other / 20 create), and the weights of one window add up per vault and
//! class. So a 3072 software op weighs 4 (4,000 / 1,000), a 4096 software op 8, an RSA-2048-HSM
//! op 2, a 3072-HSM op 8, a 4096-HSM op 16; an HSM create weighs 2 (20 / 10), a software create 1.
//! EC keys, whatever their curve, weigh as RSA-2048 keys: 1 (EC), 2 (EC-HSM).
//! The 4,001st RSA-2048 op of a window is refused, and 3,996 RSA-2048 ops leave room for exactly
//! one 3072 op. A request that is refused (429) does not count.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, RwLock};

use crate::model::{BrokerError, KeyPermission, KeyType};

/// Length of a throttling window, seconds of the broker's clock.
pub const WINDOW_SECONDS: i64 = 10;
/// The cloud's "all other" transactions per vault and window for RSA-2048 software keys.
pub const AZURE_ALL_OTHER_PER_10S: u32 = 4_000;
/// The cloud's CREATE transactions per vault and window for software keys.
pub const AZURE_CREATE_PER_10S: u32 = 20;

/// How a vault is throttled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThrottleProfile {
    /// No throttling (the default).
    #[default]
    Off,
    /// The cloud's limits (docs/RULES.md, Cloud behaviour, Throttling).
    Azure,
    /// Own limits for the RSA-2048 software baseline; other keys weigh as in the cloud.
    #[serde(skip)]
    Custom {
        /// "All other" weight units per window.
        all_other_per_10s: u32,
        /// CREATE weight units per window.
        create_per_10s: u32,
    },
}

impl ThrottleProfile {
    /// `(all other, create)` budgets per window in RSA-2048-software units, `None` when off.
    pub fn limits(self) -> Option<(u32, u32)> {
        match self {
            ThrottleProfile::Off => None,
            ThrottleProfile::Azure => Some((AZURE_ALL_OTHER_PER_10S, AZURE_CREATE_PER_10S)),
            ThrottleProfile::Custom { all_other_per_10s, create_per_10s } => {
                Some((all_other_per_10s, create_per_10s))
            }
        }
    }

    /// The wire name: `off`, `azure` or `custom`.
    pub fn name(self) -> &'static str {
        match self {
            ThrottleProfile::Off => "off",
            ThrottleProfile::Azure => "azure",
            ThrottleProfile::Custom { .. } => "custom",
        }
    }
}

/// The cloud's two throttling classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpClass {
    /// CREATE (and, here, IMPORT, ROTATE and RESTORE: each makes new key material).
    Create,
    /// Everything else: get, list, update, delete, crypto, backup, recover, purge.
    Other,
}

impl OpClass {
    /// The class of the operation a data-plane permission stands for.
    pub fn of(permission: KeyPermission) -> Self {
        match permission {
            KeyPermission::Create
            | KeyPermission::Import
            | KeyPermission::Rotate
            | KeyPermission::Restore => OpClass::Create,
            _ => OpClass::Other,
        }
    }
}

/// A request's weight in units of the vault's RSA-2048 software budget of its class.
///
/// `key` is the type and size of the key the request works on, `None` for vault-level requests
/// (list) and for keys that do not exist (the request still reaches the vault): those weigh as
/// an RSA-2048 software key.
pub fn weight(class: OpClass, key: Option<(KeyType, u32)>) -> u32 {
    let (kty, bits) = key.unwrap_or((KeyType::Rsa, 2048));
    match class {
        // CREATE does not depend on the size: 20 software, 10 HSM.
        OpClass::Create => match kty {
            KeyType::Rsa | KeyType::Ec => 1,
            KeyType::RsaHsm | KeyType::EcHsm | KeyType::OctHsm => 2,
        },
        OpClass::Other => {
            // 4,000 / 1,000 / 500 software per 10 s for 2048 / 3072 / 4096 bits.
            let software = match bits {
                0..=2048 => 1,
                2049..=3072 => 4,
                _ => 8,
            };
            match kty {
                KeyType::Rsa => software,
                // HSM keys get half the software budget.
                KeyType::RsaHsm => 2 * software,
                // The A6 table has no row for AES keys (Managed HSM has its own limits): oct-HSM
                // ops count like RSA-2048-HSM ops, the cheapest HSM row (2,000 per 10 s).
                KeyType::OctHsm => 2,
                // Every curve has the RSA-2048 row's budgets: 4,000 software, 2,000 HSM.
                KeyType::Ec => 1,
                KeyType::EcHsm => 2,
            }
        }
    }
}

/// What the vault's current window has used.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    /// `now / WINDOW_SECONDS` of the window.
    index: i64,
    /// Weight units used by "all other" requests.
    other: u64,
    /// Weight units used by create-class requests.
    create: u64,
}

/// Throttling profiles (every vault's, and per vault) and each vault's current window.
#[derive(Debug, Default)]
pub struct Throttle {
    /// `""` = every vault; a vault name = that vault's own profile.
    profiles: RwLock<BTreeMap<String, ThrottleProfile>>,
    /// Whether any profile sets limits: with throttling off (the default) a request need not
    /// take the profiles' lock.
    limited: std::sync::atomic::AtomicBool,
    /// Per vault name.
    windows: Mutex<HashMap<String, Window>>,
    /// Requests refused so far (Emulation.GetStats).
    refused: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// Throttling with `profile` for every vault.
    pub fn new(profile: ThrottleProfile) -> Self {
        let t = Throttle::default();
        t.edit_profiles(|map| map.insert(String::new(), profile));
        t
    }

    /// Changes the profiles (the only writer).
    fn edit_profiles<R>(&self, change: impl FnOnce(&mut BTreeMap<String, ThrottleProfile>) -> R) -> R {
        let mut map = self.profiles.write().unwrap_or_else(|p| p.into_inner());
        let out = change(&mut map);
        let limited = map.values().any(|p| p.limits().is_some());
        self.limited.store(limited, std::sync::atomic::Ordering::Release);
        out
    }

    /// Whether any vault's profile sets limits (a flag: no lock).
    pub fn limited(&self) -> bool {
        self.limited.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The profile that applies to `vault`: its own, else every vault's.
    pub fn profile(&self, vault: &str) -> ThrottleProfile {
        if !self.limited() {
            return ThrottleProfile::default();
        }
        let map = self.profiles.read().unwrap_or_else(|p| p.into_inner());
        map.get(vault).or_else(|| map.get("")).copied().unwrap_or_default()
    }

    /// Counts a request of `weight` in `vault`'s window at `now`, or refuses it (uncounted) when
    /// it does not fit.
    pub fn admit(&self, vault: &str, class: OpClass, weight: u32, now: i64) -> Result<(), BrokerError> {
        let Some((all_other, create)) = self.profile(vault).limits() else { return Ok(()) };
        let index = now.div_euclid(WINDOW_SECONDS);
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = match windows.get_mut(vault) {
            Some(w) => w,
            None => windows.entry(vault.to_string()).or_default(),
        };
        if w.index != index {
            *w = Window { index, ..Window::default() };
        }
        let (used, limit) = match class {
            OpClass::Other => (&mut w.other, all_other),
            OpClass::Create => (&mut w.create, create),
        };
        if *used + u64::from(weight) > u64::from(limit) {
            self.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(BrokerError::Throttled { retry_after: retry_after(now) });
        }
        *used += u64::from(weight);
        Ok(())
    }

    /// Sets `vault`'s profile (`""` = every vault's; `None` = `vault` follows every vault's
    /// again) and starts its counting afresh.
    pub(super) fn set(&self, vault: &str, profile: Option<ThrottleProfile>) {
        self.edit_profiles(|map| match profile {
            Some(p) => {
                map.insert(vault.to_string(), p);
            }
            None => {
                map.remove(vault);
            }
        });
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if vault.is_empty() {
            windows.clear();
        } else {
            windows.remove(vault);
        }
    }

    /// Requests refused by throttling since the broker started.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every vault's profile (`""`, always first) and the vaults with their own.
    pub fn list(&self) -> Vec<(String, ThrottleProfile)> {
        let map = self.profiles.read().unwrap_or_else(|p| p.into_inner());
        let mut out = vec![(String::new(), map.get("").copied().unwrap_or_default())];
        out.extend(map.iter().filter(|(k, _)| !k.is_empty()).map(|(k, v)| (k.clone(), *v)));
        out
    }
}

/// Whole seconds until the window containing `now` ends (1..=10): the `retry-after` of a 429.
pub fn retry_after(now: i64) -> u32 {
    (WINDOW_SECONDS - now.rem_euclid(WINDOW_SECONDS)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_the_clouds_table() {
        let w = |kty, bits| weight(OpClass::Other, Some((kty, bits)));
        assert_eq!(AZURE_ALL_OTHER_PER_10S / w(KeyType::Rsa, 2048), 4_000);
        assert_eq!(AZURE_ALL_OTHER_PER_10S / w(KeyType::Rsa, 3072), 1_000);
        assert_eq!(AZURE_ALL_OTHER_PER_10S / w(KeyType::Rsa, 4096), 500);
        assert_eq!(AZURE_ALL_OTHER_PER_10S / w(KeyType::RsaHsm, 2048), 2_000);
        assert_eq!(AZURE_ALL_OTHER_PER_10S / w(KeyType::RsaHsm, 3072), 500);
        assert_eq!(AZURE_ALL_OTHER_PER_10S / w(KeyType::RsaHsm, 4096), 250);
        assert_eq!(w(KeyType::OctHsm, 256), w(KeyType::RsaHsm, 2048));
        for bits in [256, 384, 521] {
            assert_eq!(w(KeyType::Ec, bits), w(KeyType::Rsa, 2048));
            assert_eq!(w(KeyType::EcHsm, bits), w(KeyType::RsaHsm, 2048));
        }
        assert_eq!(weight(OpClass::Other, None), 1);
        let c = |kty| AZURE_CREATE_PER_10S / weight(OpClass::Create, Some((kty, 4096)));
        assert_eq!((c(KeyType::Rsa), c(KeyType::RsaHsm), c(KeyType::OctHsm)), (20, 10, 10));
        assert_eq!((c(KeyType::Ec), c(KeyType::EcHsm)), (20, 10));
    }

    #[test]
    fn windows_are_ten_seconds_and_refusals_do_not_count() {
        let t = Throttle::new(ThrottleProfile::Custom { all_other_per_10s: 10, create_per_10s: 2 });
        let now = 1_800_000_003;
        for _ in 0..2 {
            t.admit("v", OpClass::Other, 4, now).unwrap();
        }
        // 8 used: a weight of 4 no longer fits (and is not counted), 2 still does.
        assert_eq!(t.admit("v", OpClass::Other, 4, now), Err(BrokerError::Throttled { retry_after: 7 }));
        t.admit("v", OpClass::Other, 2, now + 6).unwrap();
        assert!(t.admit("v", OpClass::Other, 1, now + 6).is_err());
        // Other vaults and the create class count apart.
        t.admit("w", OpClass::Other, 10, now).unwrap();
        t.admit("v", OpClass::Create, 2, now).unwrap();
        assert!(t.admit("v", OpClass::Create, 1, now).is_err());
        // The next window starts empty.
        t.admit("v", OpClass::Other, 10, now + 7).unwrap();
        assert_eq!(retry_after(1_800_000_000), 10);
        assert_eq!(retry_after(1_800_000_009), 1);
    }

    #[test]
    fn a_vaults_own_profile_wins_and_inherit_removes_it() {
        let t = Throttle::new(ThrottleProfile::Off);
        t.set("v", Some(ThrottleProfile::Custom { all_other_per_10s: 1, create_per_10s: 1 }));
        assert!(t.admit("w", OpClass::Other, 100, 0).is_ok());
        assert!(t.admit("v", OpClass::Other, 2, 0).is_err());
        t.set("v", None);
        assert!(t.admit("v", OpClass::Other, 100, 0).is_ok());
        assert_eq!(t.list(), vec![(String::new(), ThrottleProfile::Off)]);
        // Every vault's profile, switched on and off again.
        t.set("", Some(ThrottleProfile::Custom { all_other_per_10s: 1, create_per_10s: 1 }));
        assert!(t.admit("w", OpClass::Other, 2, 10).is_err());
        t.set("", Some(ThrottleProfile::Off));
        assert!(t.admit("w", OpClass::Other, 100, 10).is_ok());
    }
}
