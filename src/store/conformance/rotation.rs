//! Key rotation policies in a store: set, replaced, removed with their key or vault, durable.

use crate::model::Change;
use crate::model::rotation::{KeyRotationPolicy, LifetimeActionSpec};
use crate::store::{Store, StoreError, StoredRotationPolicy};

use super::Backend;
use super::fixtures::*;

/// A policy with every field set (`n` tells policies apart).
fn policy(n: i64) -> KeyRotationPolicy {
    let mut p = KeyRotationPolicy::from_spec(
        "P90D",
        &[
            LifetimeActionSpec {
                action: "Rotate".into(),
                time_after_create: format!("P{}D", 30 + n),
                ..Default::default()
            },
            LifetimeActionSpec {
                action: "Notify".into(),
                time_before_expiry: "P30D".into(),
                ..Default::default()
            },
        ],
    )
    .expect("a valid policy"); // ok: the conformance suite is #[cfg(test)]; a fixed, valid policy
    p.created = n;
    p.updated = n + 1;
    p
}

fn put(vault: &str, name: &str, n: i64) -> Change {
    Change::PutKeyRotationPolicy { vault: vault.into(), name: name.into(), policy: policy(n) }
}

fn stored_policy(vault: &str, name: &str, n: i64) -> StoredRotationPolicy {
    StoredRotationPolicy { vault: vault.into(), name: name.into(), policy: policy(n) }
}

/// `PutKeyRotationPolicy` stores every field; another put for the same key in any case replaces
/// it; policies load in (vault, lower-cased name) order.
pub(crate) fn put_key_rotation_policy_round_trips_and_replaces_by_key(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&one_of_everything())?;
    store.commit(&[put("v2", "key1", 1), put("v1", "Key1", 2), put("v1", "key2", 3)])?;
    store.commit(&[put("v1", "KEY1", 4)])?;
    assert_eq!(
        store.load()?.rotation_policies,
        vec![stored_policy("v1", "KEY1", 4), stored_policy("v1", "key2", 3), stored_policy("v2", "key1", 1)]
    );
    Ok(())
}

/// A purge removes the key's policy (a soft delete keeps it); deleting a vault removes its keys'
/// policies.
pub(crate) fn purge_and_vault_deletion_remove_rotation_policies(store: &dyn Store) -> Result<(), StoreError> {
    store.commit(&one_of_everything())?;
    store.commit(&[put("v1", "key1", 1), put("v1", "key2", 2), put("v2", "key1", 3)])?;
    store.commit(&[set_deleted("v1", "key1", Some(deletion(2)))])?;
    assert_eq!(store.load()?.rotation_policies.len(), 3);
    store.commit(&[purge("v1", "KEY2"), Change::DeleteVault { vault: "v2".into() }])?;
    assert_eq!(store.load()?.rotation_policies, vec![stored_policy("v1", "key1", 1)]);
    Ok(())
}

/// Policies, and their removal, survive reopening.
pub(crate) fn rotation_policies_survive_reopening(backend: &impl Backend) -> Result<(), StoreError> {
    {
        let s = backend.open()?;
        s.commit(&one_of_everything())?;
        s.commit(&[put("v1", "key1", 1), put("v1", "key2", 2)])?;
        s.commit(&[purge("v1", "key2")])?;
    }
    assert_eq!(backend.open()?.load()?.rotation_policies, vec![stored_policy("v1", "key1", 1)]);
    Ok(())
}
