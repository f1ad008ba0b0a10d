//! The emulation controls of the data plane (Emulation.SetFaults, ClearFaults, SetThrottling,
//! GetThrottling): admin operations on the broker's injected faults and throttling profiles.
//! Both live in memory only; a restart clears the faults and returns to the configured profile.

use super::Broker;
use super::faults::FaultSpec;
use super::throttle::ThrottleProfile;
use crate::model::ids::vault_name;
use crate::model::{BrokerError, Caller};

/// ARM action that reads the emulation controls.
const EMULATION_READ: &str = "Microsoft.TdeBroker/emulation/read";
/// ARM action that changes them.
const EMULATION_WRITE: &str = "Microsoft.TdeBroker/emulation/write";

impl Broker {
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
