//! Injected faults (Emulation.SetFaults): rehearse a vault outage. Faults live in memory only;
//! they are emulation controls, not state to recover after a restart.

use std::collections::BTreeMap;
use std::sync::RwLock;

use super::Broker;
use crate::model::ids::vault_name;
use crate::model::{BrokerError, Caller};

const FAULTS_WRITE: &str = "Microsoft.TdeBroker/emulation/write";

/// The faults that apply to one vault, or to all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultSpec {
    /// Every data-plane call fails with UNAVAILABLE.
    pub outage: bool,
}

/// Faults for every vault (`""`) and per vault name.
#[derive(Debug, Default)]
pub struct Faults {
    by_vault: RwLock<BTreeMap<String, FaultSpec>>,
}

impl Faults {
    /// Whether `vault` is in an outage (its own, or every vault's).
    pub fn outage(&self, vault: &str) -> bool {
        let map = self.by_vault.read().unwrap_or_else(|p| p.into_inner());
        map.get("").is_some_and(|f| f.outage) || map.get(vault).is_some_and(|f| f.outage)
    }

    /// Every configured fault, `""` meaning all vaults.
    pub fn list(&self) -> Vec<(String, FaultSpec)> {
        let map = self.by_vault.read().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

impl Broker {
    /// Refuses a data-plane call on a vault in an injected outage.
    pub fn check_faults(&self, vault: &str) -> Result<(), BrokerError> {
        if self.faults.outage(vault) {
            return Err(BrokerError::VaultUnavailable { vault: vault.to_string() });
        }
        Ok(())
    }

    fn fault_key(vault: &str) -> Result<String, BrokerError> {
        if vault.trim().is_empty() { Ok(String::new()) } else { vault_name(vault.trim()) }
    }

    /// SetFaults (admin): replaces the faults of one vault or of all.
    pub async fn set_faults(
        &self,
        caller: &Caller,
        vault: &str,
        spec: FaultSpec,
    ) -> Result<Vec<(String, FaultSpec)>, BrokerError> {
        self.authorize_control(&caller.object_id, FAULTS_WRITE, "/")?;
        let key = Self::fault_key(vault)?;
        {
            let mut map = self.faults.by_vault.write().unwrap_or_else(|p| p.into_inner());
            if spec == FaultSpec::default() {
                map.remove(&key);
            } else {
                map.insert(key.clone(), spec);
            }
        }
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
        self.authorize_control(&caller.object_id, FAULTS_WRITE, "/")?;
        let key = Self::fault_key(vault)?;
        {
            let mut map = self.faults.by_vault.write().unwrap_or_else(|p| p.into_inner());
            if key.is_empty() {
                map.clear();
            } else {
                map.remove(&key);
            }
        }
        self.probe(None).await?;
        Ok(self.faults.list())
    }
}
