//! The emulation controls (Emulation.AdvanceClock, SetClock, SetFaults, ClearFaults,
//! SetThrottling, GetThrottling): admin operations on the broker's manual clock, injected faults
//! and throttling profiles. The manual clock's time is state, saved in the store at every move,
//! so a restart resumes it; faults and throttling live in memory only (a restart clears the
//! faults and returns to the configured profile).

use super::Broker;
use super::clock::ClockMove;
use super::faults::FaultSpec;
use super::throttle::ThrottleProfile;
use crate::model::ids::vault_name;
use crate::model::{BrokerError, Caller};

/// ARM action that reads the emulation controls.
const EMULATION_READ: &str = "Microsoft.TdeBroker/emulation/read";
/// ARM action that changes them.
const EMULATION_WRITE: &str = "Microsoft.TdeBroker/emulation/write";

/// Store metadata holding the manual clock's time (Unix seconds, decimal ASCII).
pub const META_MANUAL_CLOCK: &str = crate::store::META_MANUAL_CLOCK;

impl Broker {
    /// AdvanceClock / SetClock (admin): moves the manual clock, saving the new time first so a
    /// restart resumes it. What came due in the jump happens at once: soft-deleted keys past
    /// their retention are purged and the TDE probes that came due run. Returns the new time.
    pub async fn move_clock(&self, caller: &Caller, movement: ClockMove) -> Result<i64, BrokerError> {
        self.authorize_control(&caller.object_id, EMULATION_WRITE, "/")?;
        let now = {
            // The writer lock orders clock moves with each other and with commits, so the saved
            // time is the one the clock shows. The move is a committed change: applying it moves
            // this broker's clock, and every broker that shares the store moves its own when the
            // change reaches it.
            let txn = self.begin().await;
            let now = self.clock.target(movement)?;
            self.commit(txn, vec![crate::model::Change::SetManualClock { now }]).await?;
            now
        };
        tracing::info!(now, "the manual clock moved");
        // What came due is decided again on fresh state when another broker sharing the store
        // (its sweeper) committed meanwhile.
        use super::feed::retrying_conflicts;
        retrying_conflicts(|| self.purge_expired()).await?;
        // Rotations first, so a protector that follows its key moves in the probe just after.
        retrying_conflicts(|| self.run_rotation_policies()).await?;
        // The probe, when one came due (as `probe_if_due`, retried as a whole on a conflict).
        let last = self.last_probe.load(std::sync::atomic::Ordering::SeqCst);
        if now.saturating_sub(last) >= self.settings.tde.probe_interval {
            self.last_probe.store(now, std::sync::atomic::Ordering::SeqCst);
            retrying_conflicts(|| self.probe(None)).await?;
        }
        Ok(now)
    }

    /// The manual clock's saved time in `store`, when it has one.
    pub fn saved_clock(store: &dyn crate::store::Store) -> Result<Option<i64>, crate::store::StoreError> {
        Ok(store
            .get_meta(META_MANUAL_CLOCK)?
            .and_then(|raw| std::str::from_utf8(&raw).ok().and_then(|s| s.trim().parse::<i64>().ok())))
    }

    /// SetFaults (admin): replaces the faults of one vault or of all.
    pub async fn set_faults(
        &self,
        caller: &Caller,
        vault: &str,
        spec: FaultSpec,
    ) -> Result<Vec<(String, FaultSpec)>, BrokerError> {
        self.authorize_control(&caller.object_id, EMULATION_WRITE, "/")?;
        let key = Self::fault_key(vault)?;
        spec.validate()?;
        // Faults for a vault that does not exist would never fire: a misspelt name is an error,
        // not a rehearsal that silently tests nothing. (Clearing is allowed for any name.)
        if !key.is_empty() && !spec.is_empty() {
            self.read().vault(&key)?;
        }
        self.faults.edit(|map| {
            if spec.is_empty() {
                map.remove(&key);
            } else {
                map.insert(key.clone(), spec);
            }
        });
        tracing::warn!(
            vault = if key.is_empty() { "*" } else { key.as_str() },
            ?spec,
            "injected faults changed"
        );
        self.probe(None).await?;
        Ok(self.faults.list())
    }

    /// ClearFaults (admin): one vault's, or every fault.
    pub async fn clear_faults(
        &self,
        caller: &Caller,
        vault: &str,
    ) -> Result<Vec<(String, FaultSpec)>, BrokerError> {
        self.authorize_control(&caller.object_id, EMULATION_WRITE, "/")?;
        let key = Self::fault_key(vault)?;
        self.faults.edit(|map| {
            if key.is_empty() {
                map.clear();
            } else {
                map.remove(&key);
            }
        });
        self.probe(None).await?;
        Ok(self.faults.list())
    }

    fn fault_key(vault: &str) -> Result<String, BrokerError> {
        if vault.trim().is_empty() { Ok(String::new()) } else { vault_name(vault.trim()) }
    }

    /// SetThrottling (admin): `profile` for one vault, or (`vault` empty) for every vault.
    /// `None` makes a vault follow every vault's profile again.
    pub fn set_throttling(
        &self,
        caller: &Caller,
        vault: &str,
        profile: Option<ThrottleProfile>,
    ) -> Result<Vec<(String, ThrottleProfile)>, BrokerError> {
        self.authorize_control(&caller.object_id, EMULATION_WRITE, "/")?;
        let key = if vault.trim().is_empty() { String::new() } else { vault_name(vault.trim())? };
        if key.is_empty() && profile.is_none() {
            return Err(BrokerError::bad_parameter(
                "The profile 'inherit' needs a vault name: it makes that vault follow the profile of every vault.",
            ));
        }
        if let Some(ThrottleProfile::Custom { all_other_per_10s, create_per_10s }) = profile
            && (all_other_per_10s == 0 || create_per_10s == 0)
        {
            return Err(BrokerError::bad_parameter(
                "The custom throttling profile needs all_other_per_10s and create_per_10s greater than 0.",
            ));
        }
        self.throttle.set(&key, profile);
        tracing::warn!(
            vault = if key.is_empty() { "*" } else { key.as_str() },
            profile = profile.map_or("inherit", |p| p.name()),
            limits = ?profile.and_then(|p| p.limits()),
            "throttling changed"
        );
        Ok(self.throttle.list())
    }

    /// GetThrottling (admin).
    pub fn get_throttling(&self, caller: &Caller) -> Result<Vec<(String, ThrottleProfile)>, BrokerError> {
        self.authorize_control(&caller.object_id, EMULATION_READ, "/")?;
        Ok(self.throttle.list())
    }
}
