//! Key rotation policies: GetKeyRotationPolicy, UpdateKeyRotationPolicy, and the service's own
//! rotations and notifications when a policy's time comes on the broker's clock (run by the
//! sweeper each second and by every move of the manual clock).

use super::lifecycle::Authority;
use crate::broker::Broker;
use crate::model::ids::key_uri;
use crate::model::rotation::{KeyRotationPolicy, LifetimeActionSpec};
use crate::model::{BrokerError, Caller, Change, KeyPermission};

/// A key's rotation policy as returned to callers.
#[derive(Clone, Debug)]
pub struct RotationPolicyView {
    /// `https://{vault}.{suffix}/keys/{name}/rotationpolicy`.
    pub id: String,
    /// The policy (Key Vault's default when none was set).
    pub policy: KeyRotationPolicy,
}

/// One key a policy made due.
struct DueKey {
    vault: String,
    name: String,
    version: String,
    rotate: bool,
    notify: bool,
}

impl Broker {
    fn policy_view(&self, vault: &str, name: &str, policy: Option<&KeyRotationPolicy>) -> RotationPolicyView {
        let kid = key_uri(vault, &self.settings.vault_dns_suffix, name, None);
        RotationPolicyView {
            id: format!("{kid}/rotationpolicy"),
            policy: policy.cloned().unwrap_or_else(KeyRotationPolicy::default_policy),
        }
    }

    /// GetKeyRotationPolicy: the key's policy, or Key Vault's default (Notify 30 days before
    /// expiry) when none was set.
    pub fn get_key_rotation_policy(
        &self,
        caller: &Caller,
        key_id: &str,
    ) -> Result<RotationPolicyView, BrokerError> {
        let id = self.parse_key_id(key_id)?;
        if id.version.is_some() {
            return Err(BrokerError::bad_parameter(
                "GetKeyRotationPolicy takes a key identifier without a version.",
            ));
        }
        let st = self.read();
        let ve = st.vault(&id.vault)?;
        self.gate(&st, ve, caller, KeyPermission::GetRotationPolicy, Some(id.name))?;
        let (k, _) = Self::active_version(ve, &id)?;
        Ok(self.policy_view(&ve.vault.name, &k.key.name, k.rotation_policy.as_ref()))
    }

    /// UpdateKeyRotationPolicy: validates and sets the key's policy (it replaces the previous
    /// one whole; `created` is kept, `updated` is now).
    pub async fn update_key_rotation_policy(
        &self,
        caller: &Caller,
        key_id: &str,
        expiry_time: &str,
        actions: &[LifetimeActionSpec],
    ) -> Result<RotationPolicyView, BrokerError> {
        let id = self.parse_key_id(key_id)?;
        if id.version.is_some() {
            return Err(BrokerError::bad_parameter(
                "UpdateKeyRotationPolicy takes a key identifier without a version.",
            ));
        }
        self.fault_delay(&id.vault).await;
        let txn = self.begin().await;
        let (change, view) = {
            let st = self.read();
            let ve = st.vault(&id.vault)?;
            self.gate(&st, ve, caller, KeyPermission::SetRotationPolicy, Some(id.name))?;
            let (k, _) = Self::active_version(ve, &id)?;
            let mut policy = KeyRotationPolicy::from_spec(expiry_time, actions)
                .map_err(BrokerError::InvalidRotationPolicy)?;
            let now = self.clock.now();
            policy.created = k.rotation_policy.as_ref().map_or(now, |p| p.created);
            policy.updated = now;
            let view = self.policy_view(&ve.vault.name, &k.key.name, Some(&policy));
            let change = Change::PutKeyRotationPolicy {
                vault: ve.vault.name.clone(),
                name: k.key.name.clone(),
                policy,
            };
            (change, view)
        };
        self.commit(txn, vec![change]).await?;
        Ok(view)
    }

    /// Carries out what rotation policies make due now: a Rotate action creates a new version
    /// (through the same apply path as RotateKey, on the service's own authority: no caller is
    /// checked), a Notify action is logged and counted once per key version. Returns how many
    /// keys were rotated. TDE protectors with auto-rotation move to the new versions at once.
    pub async fn run_rotation_policies(&self) -> Result<usize, BrokerError> {
        let now = self.clock.now();
        let due: Vec<DueKey> = {
            let st = self.read();
            st.vaults
                .values()
                .flat_map(|ve| {
                    ve.keys.values().filter_map(move |k| {
                        let policy = k.rotation_policy.as_ref()?;
                        if k.key.deleted.is_some() {
                            return None;
                        }
                        let v = k.key.latest()?;
                        let d = policy.due(v.attributes.created, v.attributes.expires, now);
                        (d.rotate || d.notify).then(|| DueKey {
                            vault: ve.vault.name.clone(),
                            name: k.key.name.clone(),
                            version: v.version.clone(),
                            rotate: d.rotate,
                            notify: d.notify,
                        })
                    })
                })
                .collect()
        };
        let mut rotated = 0;
        for d in due {
            if d.notify {
                self.notify_once(&d);
            }
            if !d.rotate {
                continue;
            }
            let (latest, policy) = {
                let st = self.read();
                let Some(k) = st.vaults.get(&d.vault).and_then(|ve| ve.key(&d.name)) else { continue };
                let Some(v) = k.key.latest().filter(|v| v.version == d.version) else { continue };
                (v.clone(), k.rotation_policy.clone())
            };
            let (meta, plain) = self.rotated_version(latest, policy.as_ref()).await?;
            match self
                .commit_new_version(Authority::Policy { after: &d.version }, &d.vault, &d.name, meta, plain)
                .await
            {
                Ok(view) => {
                    rotated += 1;
                    crate::telemetry::metrics().rotation_policy_action("Rotate");
                    tracing::info!(vault = %d.vault, key = %d.name, from = %d.version, to = %view.kid, "key rotation policy: rotated the key");
                }
                // The key changed meanwhile (rotated, deleted, purged): nothing is due any more.
                Err(BrokerError::KeyNotFound { .. } | BrokerError::VaultNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if rotated > 0 {
            self.follow_newest_versions().await?;
        }
        Ok(rotated)
    }

    /// Logs and counts a Notify action, once per key version (remembered in memory: after a
    /// restart a due notification is given again).
    fn notify_once(&self, d: &DueKey) {
        let first = {
            let mut seen = self.notified.lock().unwrap_or_else(|p| p.into_inner());
            seen.insert(format!("{}/{}/{}", d.vault, d.name.to_ascii_lowercase(), d.version))
        };
        if first {
            crate::telemetry::metrics().rotation_policy_action("Notify");
            tracing::warn!(vault = %d.vault, key = %d.name, version = %d.version, "key rotation policy: Notify — the key's newest version nears its expiry");
        }
    }
}
