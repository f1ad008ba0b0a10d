//! The data-plane gate: every Key Vault operation, and every key operation the broker makes for
//! a TDE server's identity, passes the same checks in the same order, here:
//!
//! 0. on a store shared with other brokers, the broker's freshness: past the staleness bound
//!    without a complete read of the change feed it may not know of a revocation, so it fails
//!    closed ([`Broker::check_fresh`]: one atomic read);
//! 1. the vault's injected outage ([`Faults::outage`](super::faults::Faults::outage));
//! 2. the injected errors (`fail_next`, then `error_rate`);
//! 3. Key Vault throttling, weighed by the key the request names;
//! 4. the decision cache, keyed by the state's epoch and the whole context of the request;
//! 5. on a miss, the vault's network rules, then
//! 6. its access policies or RBAC role assignments.
//!
//! Steps 2 and 3 run once per request. Create-class requests (create, import, rotate, restore)
//! authorize twice — at their start and again under the writer lock — so they skip 2 and 3 in the
//! gate and are admitted once, by [`Broker::admit_create`], against the CREATE budget.
//! Injected latency is waited for before the gate, holding no lock ([`Broker::fault_delay`]).

use super::Broker;
use super::cache::{DecisionContext, DecisionKey};
use super::state::{State, VaultEntry};
use super::throttle::{OpClass, weight};
use crate::model::ids::key_index_of;
use crate::model::{BrokerError, Caller, CallerDescription, KeyPermission, KeyType};
use crate::policy::data::{self, DataRequest};
use crate::policy::network::{self, Origin};

impl Broker {
    /// Waits the injected latency of `vault` (if any). Called at the start of the async
    /// data-plane operations, before the gate, holding no lock.
    pub async fn fault_delay(&self, vault: &str) {
        let delay = self.faults.delay(vault);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// The gate of one data-plane request of `caller` for `permission` on vault `ve` (and key
    /// `key`), under the state's read lock `st`. See the module's documentation for the order.
    pub(crate) fn gate(
        &self,
        st: &State,
        ve: &VaultEntry,
        caller: &Caller,
        permission: KeyPermission,
        key: Option<&str>,
    ) -> Result<(), BrokerError> {
        let vault = &ve.vault.name;
        self.admit_request(ve, OpClass::of(permission), key)?;
        // Network and permission decisions depend only on the state (its epoch) and on who
        // calls from where: cached under exactly that, so any change voids them at once.
        let addr = caller.peer.map(|p| p.ip());
        let index = key.map(key_index_of).unwrap_or_default();
        let cache_key = DecisionKey::new(&DecisionContext {
            epoch: st.epoch,
            principal: &caller.object_id,
            vault,
            key: &index,
            permission,
            addr,
            trusted_service: caller.trusted_service,
            subnet: caller.source_subnet.as_deref(),
        });
        self.caches.decision(cache_key, || {
            let desc = caller.description();
            self.network_decision(st, ve, caller, &desc)?;
            self.policy_decision(st, ve, &desc, permission, key)
        })
    }

    /// Steps 0 to 3: the broker's freshness, the vault's injected outage, then (not for create-class requests, which
    /// [`Broker::admit_create`] admits once) the injected errors and the throttling budget.
    fn admit_request(&self, ve: &VaultEntry, class: OpClass, key: Option<&str>) -> Result<(), BrokerError> {
        self.check_fresh()?;
        let vault = &ve.vault.name;
        self.faults.check_outage(vault)?;
        if class != OpClass::Create {
            self.faults.inject_error(vault, || self.clock.now())?;
            if self.throttle.limited() {
                // Weighed by the newest version of the key the request names.
                let kind =
                    key.and_then(|name| ve.key(name)).and_then(|k| k.key.latest()).map(|v| (v.kty, v.bits));
                self.throttle.admit(vault, class, weight(class, kind), self.clock.now())?;
            }
        }
        Ok(())
    }

    /// The gate of a vault-level request that needs no key permission (GetRandomBytes): steps 0
    /// to 3, then the vault's network rules (step 5, uncached). No access policy or role decides
    /// it: there is no key permission for random bytes.
    pub(crate) fn gate_vault(&self, st: &State, ve: &VaultEntry, caller: &Caller) -> Result<(), BrokerError> {
        self.admit_request(ve, OpClass::Other, None)?;
        self.network_decision(st, ve, caller, &caller.description())
    }

    /// Admits a create-class request (create, import, rotate, restore) of a `kty` key on `vault`
    /// once, after its first pass through the gate: the injected errors, then the CREATE budget.
    pub fn admit_create(&self, vault: &str, kty: KeyType) -> Result<(), BrokerError> {
        self.faults.inject_error(vault, || self.clock.now())?;
        self.throttle.admit(vault, OpClass::Create, weight(OpClass::Create, Some((kty, 0))), self.clock.now())
    }

    /// Step 5, uncached: whether the vault's network rules let `caller` in from where it is (its
    /// address, or as a trusted service, or from a subnet).
    pub(crate) fn network_decision(
        &self,
        st: &State,
        ve: &VaultEntry,
        caller: &Caller,
        desc: &CallerDescription,
    ) -> Result<(), BrokerError> {
        let origin = Origin {
            addr: caller.peer.map(|p| p.ip()),
            trusted_service: caller.trusted_service,
            subnet: caller.source_subnet.clone(),
        };
        network::check(
            &ve.vault,
            &st.subnets,
            &origin,
            self.settings.trusted_service_bypass,
            desc,
            &self.settings.location,
        )
    }

    /// Step 6, uncached: whether the vault's access policies (or, on an RBAC vault, the role
    /// assignments at vault or key scope) grant `permission` to the caller described by `desc`.
    pub(crate) fn policy_decision(
        &self,
        st: &State,
        ve: &VaultEntry,
        desc: &CallerDescription,
        permission: KeyPermission,
        key: Option<&str>,
    ) -> Result<(), BrokerError> {
        let resource = self.key_resource(&ve.vault.name, key);
        data::authorize(
            &ve.vault,
            &st.role_assignments,
            &DataRequest { caller: desc, permission, resource: &resource, location: &self.settings.location },
        )
    }

    /// The ARM id of a vault, or of one of its keys: the scope of RBAC data-plane decisions.
    fn key_resource(&self, vault: &str, name: Option<&str>) -> String {
        let base = self.settings.vault_resource_id(vault);
        match name {
            Some(n) => format!("{base}/keys/{n}"),
            None => base,
        }
    }
}
