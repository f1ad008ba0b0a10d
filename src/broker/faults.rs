//! Injected faults (Emulation.SetFaults): rehearse a vault outage, a slow vault, a flaky vault.
//! Faults live in memory only; they are emulation controls, not state to recover after a restart.
//!
//! What a vault's faults do to its data-plane calls (KeyVault and the engine path):
//! - `outage`: every call fails with UNAVAILABLE (`ServiceUnavailable`); TDE treats it as
//!   transient (databases stay ONLINE through `transient_grace`).
//! - `fail_next`: the next N calls fail with UNAVAILABLE, then the vault answers again.
//! - `error_rate` / `error_code`: each call fails with that probability and that code.
//! - latency: each call first waits `latency_ms` plus a random delay drawn from a log-normal
//!   distribution fitted to `latency_p50_ms` / `latency_p99_ms` (see [`FaultSpec::delay`]),
//!   with `tokio::time::sleep` at the start of the async operations, holding no lock: the key
//!   lifecycle, backup/restore and the crypto operations (the engine path included). GetKey and
//!   the List calls are answered synchronously, without it.
//!
//! Errors are decided once per request in the data-plane gate (`super::gate`): the outage
//! first, then `fail_next` and `error_rate` (create-class operations, which pass the gate twice,
//! in `Broker::admit_create`), then throttling. A request failed by a fault is not counted by
//! throttling. TDE's prober looks at outages only: injected
//! errors reach the engine host's calls but never move databases.
//!
//! A vault's own faults take precedence over the faults set for every vault (`""`); an outage of
//! either applies.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Duration;

use crate::model::BrokerError;

/// Largest injected delay (fixed part, p99, and any sample), milliseconds.
pub const MAX_LATENCY_MS: u32 = 60_000;
/// The standard normal quantile of 0.99.
const Z_99: f64 = 2.326_347_874_040_841;

/// The status an injected error answers with (`error_code`, gRPC code names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultCode {
    /// `ServiceUnavailable`, as an outage (transient for TDE).
    #[default]
    Unavailable,
    /// `Throttled`, as the vault's own 429 (with `retry-after`).
    ResourceExhausted,
    /// `InternalError`.
    Internal,
    /// `Forbidden`.
    PermissionDenied,
}

impl FaultCode {
    /// Every accepted name, for messages.
    pub const NAMES: &'static str = "UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL, PERMISSION_DENIED";

    /// Parses a gRPC code name (empty = UNAVAILABLE).
    pub fn parse(s: &str) -> Result<Self, BrokerError> {
        match s.trim().to_ascii_uppercase().as_str() {
            "" | "UNAVAILABLE" => Ok(FaultCode::Unavailable),
            "RESOURCE_EXHAUSTED" => Ok(FaultCode::ResourceExhausted),
            "INTERNAL" => Ok(FaultCode::Internal),
            "PERMISSION_DENIED" => Ok(FaultCode::PermissionDenied),
            _ => Err(BrokerError::bad_parameter(format!(
                "The error_code '{}' is not supported. Supported codes are {}.",
                crate::model::ids::printable(s),
                Self::NAMES
            ))),
        }
    }

    /// The gRPC code name.
    pub fn name(self) -> &'static str {
        match self {
            FaultCode::Unavailable => "UNAVAILABLE",
            FaultCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            FaultCode::Internal => "INTERNAL",
            FaultCode::PermissionDenied => "PERMISSION_DENIED",
        }
    }

    /// The error a call on `vault` fails with at `now`.
    fn error(self, vault: &str, now: i64) -> BrokerError {
        match self {
            FaultCode::Unavailable => BrokerError::VaultUnavailable { vault: vault.to_string() },
            FaultCode::ResourceExhausted => {
                BrokerError::Throttled { retry_after: super::throttle::retry_after(now) }
            }
            FaultCode::Internal => {
                tracing::debug!(vault, "injected internal error");
                BrokerError::Internal
            }
            FaultCode::PermissionDenied => BrokerError::InjectedForbidden { vault: vault.to_string() },
        }
    }
}

/// The faults that apply to one vault, or to all.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FaultSpec {
    /// Every data-plane call fails with UNAVAILABLE.
    pub outage: bool,
    /// Fixed delay added to every data-plane call, milliseconds.
    pub latency_ms: u32,
    /// Median of the random delay added on top (0 = none).
    pub latency_p50_ms: u32,
    /// 99th percentile of the random delay (0 = the median: a fixed `latency_p50_ms`).
    pub latency_p99_ms: u32,
    /// Probability (0..=1) that a call fails with `error_code`.
    pub error_rate: f64,
    /// The code of those failures.
    pub error_code: FaultCode,
    /// How many of the next calls fail with UNAVAILABLE (counts down).
    pub fail_next: u32,
}

impl FaultSpec {
    /// Whether this spec does nothing (it is then removed rather than stored).
    pub fn is_empty(&self) -> bool {
        !self.outage
            && self.latency_ms == 0
            && self.latency_p50_ms == 0
            && self.error_rate == 0.0
            && self.fail_next == 0
    }

    /// Refuses values outside their ranges.
    pub fn validate(&self) -> Result<(), BrokerError> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(BrokerError::bad_parameter(format!(
                "The error_rate {} is invalid: it is a probability between 0 and 1.",
                self.error_rate
            )));
        }
        for (name, v) in [
            ("latency_ms", self.latency_ms),
            ("latency_p50_ms", self.latency_p50_ms),
            ("latency_p99_ms", self.latency_p99_ms),
        ] {
            if v > MAX_LATENCY_MS {
                return Err(BrokerError::bad_parameter(format!(
                    "The {name} {v} is invalid: at most {MAX_LATENCY_MS} milliseconds are accepted."
                )));
            }
        }
        if self.latency_p99_ms > 0 && (self.latency_p50_ms == 0 || self.latency_p99_ms < self.latency_p50_ms)
        {
            return Err(BrokerError::bad_parameter(format!(
                "The latency_p99_ms {} is invalid: it needs latency_p50_ms > 0 and at least latency_p50_ms ({}).",
                self.latency_p99_ms, self.latency_p50_ms
            )));
        }
        Ok(())
    }

    /// The delay before a call: `latency_ms` plus a draw from the log-normal distribution whose
    /// median is `latency_p50_ms` and whose 99th percentile is `latency_p99_ms`:
    /// `exp(μ + σ·Z)` with `μ = ln p50`, `σ = ln(p99 / p50) / z₀.₉₉` (`z₀.₉₉ ≈ 2.326`), Z standard
    /// normal (Box–Muller). A log-normal is the usual shape of service latency: positive, with
    /// a long right tail. `p99 = 0` (or `= p50`) gives a fixed `p50`. The sum is capped at
    /// [`MAX_LATENCY_MS`].
    pub fn delay(&self) -> Duration {
        let mut ms = f64::from(self.latency_ms);
        if self.latency_p50_ms > 0 {
            let p50 = f64::from(self.latency_p50_ms);
            let p99 = f64::from(self.latency_p99_ms.max(self.latency_p50_ms));
            let sigma = (p99 / p50).ln() / Z_99;
            ms += if sigma > 0.0 { (p50.ln() + sigma * standard_normal()).exp() } else { p50 };
        }
        Duration::from_secs_f64(ms.min(f64::from(MAX_LATENCY_MS)) / 1000.0)
    }
}

/// A uniform draw from `[0, 1)`.
fn uniform() -> f64 {
    let b = crate::crypto::random_bytes(8);
    let x = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    // The top 53 bits: every value a multiple of 2^-53.
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A standard normal draw (Box–Muller).
fn standard_normal() -> f64 {
    let u1 = 1.0 - uniform(); // (0, 1]: ln is finite
    let u2 = uniform();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Faults for every vault (`""`) and per vault name.
#[derive(Debug, Default)]
pub struct Faults {
    by_vault: RwLock<BTreeMap<String, FaultSpec>>,
    /// Whether `by_vault` holds anything: every data-plane request asks the faults three
    /// times, and without any configured (the usual case) it need not take the lock.
    any: std::sync::atomic::AtomicBool,
    /// Requests failed by `fail_next` or `error_rate` so far (Emulation.GetStats).
    injected: std::sync::atomic::AtomicU64,
}

impl Faults {
    /// The configured faults, or `None` when there are none (no lock taken).
    fn configured(&self) -> Option<std::sync::RwLockReadGuard<'_, BTreeMap<String, FaultSpec>>> {
        if !self.active() {
            return None;
        }
        Some(self.by_vault.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether any fault is configured (a flag: no lock).
    pub fn active(&self) -> bool {
        self.any.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Changes the configured faults (the only writer).
    pub(super) fn edit<R>(&self, change: impl FnOnce(&mut BTreeMap<String, FaultSpec>) -> R) -> R {
        let mut map = self.by_vault.write().unwrap_or_else(|p| p.into_inner());
        let out = change(&mut map);
        self.any.store(!map.is_empty(), std::sync::atomic::Ordering::Release);
        out
    }

    /// Whether `vault` is in an outage (its own, or every vault's).
    pub fn outage(&self, vault: &str) -> bool {
        self.configured().is_some_and(|map| {
            map.get("").is_some_and(|f| f.outage) || map.get(vault).is_some_and(|f| f.outage)
        })
    }

    /// The entry that applies to `vault` (its own, else every vault's) and its spec.
    fn effective(map: &BTreeMap<String, FaultSpec>, vault: &str) -> Option<(String, FaultSpec)> {
        map.get_key_value(vault).or_else(|| map.get_key_value("")).map(|(k, v)| (k.clone(), *v))
    }

    /// The delay to inject before a call on `vault`.
    pub fn delay(&self, vault: &str) -> Duration {
        let Some(map) = self.configured() else { return Duration::ZERO };
        Self::effective(&map, vault).map_or(Duration::ZERO, |(_, f)| f.delay())
    }

    /// The injected error of one call on `vault`, if any (counted): `fail_next` (counted
    /// down), then `error_rate`.
    fn error(&self, vault: &str, now: i64) -> Option<BrokerError> {
        let e = self.decide_error(vault, now);
        if e.is_some() {
            self.injected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        e
    }

    /// Requests failed by `fail_next` or `error_rate` since the broker started (outage
    /// refusals are not counted here).
    pub fn injected(&self) -> u64 {
        self.injected.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn decide_error(&self, vault: &str, now: i64) -> Option<BrokerError> {
        let (key, spec) = Self::effective(&*self.configured()?, vault)?;
        if spec.fail_next > 0 {
            // Another call may have taken the last one meanwhile.
            let took = self.edit(|map| match map.get_mut(&key).filter(|f| f.fail_next > 0) {
                Some(f) => {
                    f.fail_next -= 1;
                    if f.is_empty() {
                        map.remove(&key);
                    }
                    true
                }
                None => false,
            });
            if took {
                return Some(FaultCode::Unavailable.error(vault, now));
            }
        }
        (spec.error_rate > 0.0 && uniform() < spec.error_rate).then(|| spec.error_code.error(vault, now))
    }

    /// Refuses a data-plane call on a vault in an injected outage (the gate's first step).
    pub fn check_outage(&self, vault: &str) -> Result<(), BrokerError> {
        if self.outage(vault) {
            return Err(BrokerError::VaultUnavailable { vault: vault.to_string() });
        }
        Ok(())
    }

    /// The injected errors (`fail_next`, `error_rate`) of one data-plane request on `vault`
    /// (the gate's second step, once per request); `now` is read only when a fault is set.
    pub fn inject_error(&self, vault: &str, now: impl FnOnce() -> i64) -> Result<(), BrokerError> {
        if !self.active() {
            return Ok(()); // no clock read either
        }
        match self.error(vault, now()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every configured fault, `""` meaning all vaults.
    pub fn list(&self) -> Vec<(String, FaultSpec)> {
        let map = self.by_vault.read().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_follows_the_fitted_log_normal() {
        let spec = FaultSpec { latency_ms: 5, latency_p50_ms: 20, latency_p99_ms: 200, ..Default::default() };
        let mut ms: Vec<f64> = (0..20_000).map(|_| spec.delay().as_secs_f64() * 1000.0 - 5.0).collect();
        ms.sort_by(f64::total_cmp);
        let (p50, p99) = (ms[10_000], ms[19_800]);
        assert!((17.0..23.0).contains(&p50), "p50 {p50}");
        assert!((160.0..250.0).contains(&p99), "p99 {p99}");
        assert!(ms[0] > 0.0);
        let fixed = FaultSpec { latency_ms: 7, latency_p50_ms: 10, ..Default::default() };
        assert_eq!(fixed.delay(), Duration::from_millis(17));
    }

    #[test]
    fn faults_apply_from_the_moment_they_are_set_until_the_last_is_removed() {
        let f = Faults::default();
        assert!(!f.outage("v") && f.delay("v").is_zero() && f.error("v", 0).is_none());
        f.edit(|m| m.insert("v".into(), FaultSpec { outage: true, latency_ms: 3, ..Default::default() }));
        f.edit(|m| m.insert(String::new(), FaultSpec { latency_ms: 9, ..Default::default() }));
        assert!(f.outage("v") && !f.outage("w"));
        assert_eq!((f.delay("v"), f.delay("w")), (Duration::from_millis(3), Duration::from_millis(9)));
        f.edit(|m| m.remove("v"));
        assert!(!f.outage("v"));
        assert_eq!(f.delay("v"), Duration::from_millis(9), "every vault's entry still applies");
        f.edit(|m| m.clear());
        assert!(f.delay("v").is_zero() && f.list().is_empty());
    }

    #[test]
    fn fail_next_counts_down_and_then_the_entry_is_gone() {
        let f = Faults::default();
        f.edit(|m| m.insert("v".into(), FaultSpec { fail_next: 2, ..Default::default() }));
        assert!(matches!(f.error("v", 0), Some(BrokerError::VaultUnavailable { .. })));
        assert!(f.error("w", 0).is_none());
        assert!(f.error("v", 0).is_some());
        assert!(f.error("v", 0).is_none());
        assert!(f.list().is_empty());
        assert_eq!(f.injected(), 2);
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let bad = |s: FaultSpec| s.validate().is_err();
        assert!(bad(FaultSpec { error_rate: 1.5, ..Default::default() }));
        assert!(bad(FaultSpec { error_rate: f64::NAN, ..Default::default() }));
        assert!(bad(FaultSpec { latency_p50_ms: 50, latency_p99_ms: 10, ..Default::default() }));
        assert!(bad(FaultSpec { latency_p99_ms: 10, ..Default::default() }));
        assert!(bad(FaultSpec { latency_ms: MAX_LATENCY_MS + 1, ..Default::default() }));
        assert!(FaultSpec { error_rate: 1.0, latency_p50_ms: 5, ..Default::default() }.validate().is_ok());
        assert_eq!(FaultCode::parse("resource_exhausted").unwrap(), FaultCode::ResourceExhausted);
        assert!(FaultCode::parse("DEADLINE_EXCEEDED").is_err());
    }
}
