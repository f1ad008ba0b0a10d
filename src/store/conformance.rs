//! The conformance suite of [`Store`]: what the broker relies on from a storage backend, written
//! once against `&dyn Store` and run for every backend.
//!
//! # Running it for a backend
//! 1. In the backend's `#[cfg(test)] mod tests`, implement [`Backend`] for a type that owns the
//!    storage of one test: [`Backend::create`] makes new, empty storage (a temporary directory, a
//!    database or schema of its own, …) and [`Backend::open`] opens a store over it.
//! 2. Invoke the macro there: `store_conformance_tests!(MyBackend, durable);` for a backend that
//!    keeps what it stores (stores opened again over the same storage see it: the suite then also
//!    runs the tests that reopen), or `store_conformance_tests!(MyBackend);` for one that does
//!    not, like [`MemoryStore`](super::memory::MemoryStore).
//!
//! Every suite test then runs under `cargo test` as a `#[test]` of that module with the suite
//! function's name, for example `store::sqlite::tests::purge_removes_the_key_and_its_material`.
//! See `sqlite.rs` and `memory.rs` for the two invocations.
//!
//! # Adding a test
//! Write a `pub(crate) fn` named after the behaviour it proves, taking `&dyn Store` (or
//! `&impl Backend` when it reopens) and returning `Result<(), StoreError>`, and add its name to
//! the matching list in [`store_conformance_tests!`]. A function left out of both lists is never
//! called, which `cargo clippy --all-targets` reports as dead code.
//!
//! Records are compared whole (`assert_eq!` on the model types compares every field), with
//! fixtures whose fields all differ from their defaults and from one fixture number to the next.

use std::collections::{BTreeMap, BTreeSet};

use super::{Rejection, Snapshot, Store, StoreError, StoredKey};
use crate::model::server::{Database, DbState, Protector, Reason, Server, ServerIdentity, ServerKind};
use crate::model::vault::Subnet;
use crate::model::{
    Change, Deletion, KeyAttributes, KeyOp, KeyPermission, KeyType, KeyVersion, NetworkAcls, Principal,
    PrincipalKind, Role, RoleAssignment, Vault,
};

/// What the suite needs of a backend: storage for one test, and stores over it.
pub(crate) trait Backend: Sized {
    /// New, empty storage for one test; dropping the value may remove it.
    fn create() -> Result<Self, StoreError>;
    /// A store over this storage. For a durable backend, a store opened again sees everything
    /// that stores opened before it committed or wrote with `put_meta`.
    fn open(&self) -> Result<Box<dyn Store>, StoreError>;
}

/// Generates one `#[test]` per suite test for the [`Backend`] type given: all the tests that need
/// one store, and with `durable` also the ones that reopen the storage.
macro_rules! store_conformance_tests {
    (@with_store $backend:ty: $($test:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() -> Result<(), $crate::store::StoreError> {
                let backend = <$backend as $crate::store::conformance::Backend>::create()?;
                let store = $crate::store::conformance::Backend::open(&backend)?;
                $crate::store::conformance::$test(store.as_ref())
            }
        )+
    };
    (@with_backend $backend:ty: $($test:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() -> Result<(), $crate::store::StoreError> {
                let backend = <$backend as $crate::store::conformance::Backend>::create()?;
                $crate::store::conformance::$test(&backend)
            }
        )+
    };
    ($backend:ty) => {
        $crate::store::conformance::store_conformance_tests!(@with_store $backend:
            an_empty_store_loads_an_empty_snapshot,
            an_empty_commit_changes_nothing,
            loading_changes_nothing,
            put_vault_round_trips_every_field,
            put_vault_replaces_the_whole_vault_and_keeps_its_keys,
            vaults_load_in_name_order,
            delete_vault_removes_the_vault_its_keys_and_their_material,
            put_key_version_round_trips_every_field_and_the_material,
            key_versions_load_oldest_first,
            a_key_keeps_the_name_it_was_first_created_with,
            keys_load_in_vault_then_lower_cased_name_order,
            a_metadata_update_replaces_the_version_and_keeps_its_material_and_place,
            updating_a_version_that_is_not_stored_is_refused_and_changes_nothing,
            creating_a_version_id_the_key_has_is_refused_and_changes_nothing,
            a_version_id_may_recur_under_another_key_or_vault,
            set_key_deletion_records_and_clears_the_deletion,
            purge_removes_the_key_and_its_material,
            a_purged_key_created_again_has_only_its_new_versions,
            removing_or_marking_what_is_not_stored_changes_nothing,
            put_principal_round_trips_and_replaces_by_object_id,
            delete_principal_removes_only_that_principal,
            put_role_assignment_round_trips_and_replaces_by_id,
            delete_role_assignment_removes_only_that_assignment,
            put_subnet_round_trips_and_replaces_by_case_insensitive_id,
            put_server_round_trips_and_replaces_by_case_insensitive_id,
            delete_server_removes_its_databases_and_nothing_else,
            put_database_round_trips_and_replaces_by_case_insensitive_server_and_name,
            delete_database_removes_only_that_database,
            a_failing_change_rolls_back_the_whole_commit,
            a_refused_commit_undoes_every_kind_of_change_before_the_refusal,
            the_store_stays_usable_after_a_refused_commit,
            changes_of_one_commit_apply_in_order,
            meta_of_an_unknown_name_is_none,
            put_meta_then_get_meta_returns_the_same_bytes,
            put_meta_replaces_the_previous_value,
            meta_stays_apart_from_commits_and_the_snapshot,
            concurrent_commits_from_several_threads_all_land,
        );
    };
    ($backend:ty, durable) => {
        $crate::store::conformance::store_conformance_tests!($backend);
        $crate::store::conformance::store_conformance_tests!(@with_backend $backend:
            committed_changes_survive_reopening,
            every_kind_of_record_survives_reopening,
            removals_survive_reopening,
            meta_survives_reopening,
            a_refused_commit_leaves_nothing_after_reopening,
        );
    };
}
pub(crate) use store_conformance_tests;

// ---------------------------------------------------------------------------------------------
// Fixtures: records whose every field differs from its default and between two values of `n`
// ---------------------------------------------------------------------------------------------

fn subnet_id(name: &str) -> String {
    format!(
        "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/{name}"
    )
}

fn server_id(name: &str) -> String {
    format!(
        "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Sql/servers/{name}"
    )
}

fn odd(n: i64) -> bool {
    n % 2 == 1
}

fn vault(name: &str, n: i64) -> Vault {
    let permissions = if odd(n) {
        BTreeSet::from([KeyPermission::Get, KeyPermission::WrapKey, KeyPermission::UnwrapKey])
    } else {
        BTreeSet::from(KeyPermission::ALL)
    };
    Vault {
        name: name.into(),
        retention_days: 7 + n as i32,
        purge_protection: odd(n),
        rbac: !odd(n),
        network_acls: NetworkAcls {
            default_allow: !odd(n),
            bypass_azure_services: odd(n),
            ip_rules: vec![format!("10.{n}.0.0/16"), format!("192.0.2.{n}/32")],
            virtual_network_rules: vec![subnet_id(&format!("rule{n}"))],
        },
        public_network_access: !odd(n),
        access_policies: BTreeMap::from([(format!("00000000-0000-0000-0000-00000000000{n}"), permissions)]),
        private_endpoints: vec![subnet_id(&format!("pe{n}"))],
        created: 1_700_000_000 + n,
    }
}

fn version(id: &str, n: i64) -> KeyVersion {
    let kty = if odd(n) { KeyType::RsaHsm } else { KeyType::Rsa };
    let byte = n as u8;
    KeyVersion {
        version: id.into(),
        kty,
        bits: if odd(n) { 3072 } else { 4096 },
        key_ops: if odd(n) { vec![KeyOp::WrapKey, KeyOp::UnwrapKey] } else { kty.default_ops() },
        attributes: KeyAttributes {
            enabled: odd(n),
            not_before: Some(100 + n),
            expires: Some(10_000 + n),
            created: 10 + n,
            updated: 20 + n,
        },
        tags: BTreeMap::from([(format!("tag{n}"), format!("value {n}")), ("env".into(), format!("e{n}"))]),
        n: vec![0xC0 | byte, 1, 2, byte],
        e: vec![1, 0, byte],
    }
}

/// An oct-HSM version: no public parts, no optional attributes.
fn oct_version(id: &str) -> KeyVersion {
    KeyVersion {
        version: id.into(),
        kty: KeyType::OctHsm,
        bits: 256,
        key_ops: KeyType::OctHsm.default_ops(),
        attributes: KeyAttributes { enabled: true, not_before: None, expires: None, created: 3, updated: 4 },
        tags: BTreeMap::new(),
        n: vec![],
        e: vec![],
    }
}

/// Sealed material that tells versions apart and holds every byte value.
fn material(seed: u8) -> Vec<u8> {
    (0..=255u8).chain([seed, seed]).map(|b| b ^ seed).collect()
}

fn create(vault: &str, name: &str, version: KeyVersion, sealed: Vec<u8>) -> Change {
    Change::PutKeyVersion { vault: vault.into(), name: name.into(), version, sealed: Some(sealed) }
}

fn update(vault: &str, name: &str, version: KeyVersion) -> Change {
    Change::PutKeyVersion { vault: vault.into(), name: name.into(), version, sealed: None }
}

fn set_deleted(vault: &str, name: &str, deleted: Option<Deletion>) -> Change {
    Change::SetKeyDeletion { vault: vault.into(), name: name.into(), deleted }
}

fn purge(vault: &str, name: &str) -> Change {
    Change::PurgeKey { vault: vault.into(), name: name.into() }
}

fn deletion(n: i64) -> Deletion {
    Deletion { deleted_date: 1_000 + n, scheduled_purge_date: 2_000 + n }
}

fn principal(object_id: &str, n: i64) -> Principal {
    Principal {
        object_id: object_id.into(),
        app_id: format!("app-{n}"),
        name: format!("principal {n}"),
        kind: if odd(n) { PrincipalKind::UserAssignedIdentity } else { PrincipalKind::ServerHost },
        resource_id: odd(n).then(|| format!("/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id{n}")),
        created: 50 + n,
    }
}

fn role_assignment(id: &str, n: i64) -> RoleAssignment {
    RoleAssignment {
        id: id.into(),
        scope: format!("/subscriptions/s{n}"),
        display_scope: format!("https://v{n}.vault.azure.net/keys/k"),
        principal_id: format!("principal-{n}"),
        role: if odd(n) { Role::KeyVaultCryptoServiceEncryptionUser } else { Role::Owner },
    }
}

fn subnet(id: &str, n: i64) -> Subnet {
    Subnet { id: id.into(), prefixes: vec![format!("10.{n}.1.0/24"), format!("10.{n}.2.0/24")] }
}

fn server(id: &str, n: i64) -> Server {
    let umi = format!(
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u{n}"
    );
    Server {
        id: id.into(),
        name: format!("server{n}"),
        kind: if odd(n) { ServerKind::ManagedInstance } else { ServerKind::SqlServer },
        identity: ServerIdentity {
            system_principal_id: Some(format!("smi-{n}")),
            user_assigned: vec![umi.clone()],
            primary: Some(umi),
        },
        protector: if odd(n) {
            Protector::AzureKeyVault {
                key_id: format!("https://v{n}.vault.azure.net/keys/k"),
                kid: format!("https://v{n}.vault.azure.net/keys/k/{}", "0".repeat(32)),
                auto_rotation: true,
            }
        } else {
            Protector::ServiceManaged
        },
        subnet_id: Some(subnet_id(&format!("mi{n}"))),
        host_principal_id: format!("host-{n}"),
        created: 70 + n,
    }
}

fn database(server_id: &str, name: &str, n: i64) -> Database {
    Database {
        server_id: server_id.into(),
        name: name.into(),
        state: if odd(n) { DbState::Inaccessible } else { DbState::Online },
        reason: odd(n).then_some(Reason::KeyDisabled),
        state_since: 90 + n,
        lost_at: odd(n).then_some(80 + n),
    }
}

/// One record of every kind, keys with several versions, one key soft-deleted.
fn one_of_everything() -> Vec<Change> {
    vec![
        Change::PutVault(vault("v1", 1)),
        Change::PutVault(vault("v2", 2)),
        create("v1", "Key1", version("b1", 1), material(1)),
        create("v1", "Key1", version("a1", 2), material(2)),
        create("v1", "key2", oct_version("c1"), material(3)),
        set_deleted("v1", "KEY2", Some(deletion(1))),
        create("v2", "key1", version("d1", 3), material(4)),
        Change::PutPrincipal(principal("p1", 1)),
        Change::PutPrincipal(principal("p2", 2)),
        Change::PutRoleAssignment(role_assignment("r1", 1)),
        Change::PutRoleAssignment(role_assignment("r2", 2)),
        Change::PutSubnet(subnet(&subnet_id("s1"), 1)),
        Change::PutServer(server(&server_id("srv1"), 1)),
        Change::PutServer(server(&server_id("srv2"), 2)),
        Change::PutDatabase(database(&server_id("srv1"), "db1", 1)),
        Change::PutDatabase(database(&server_id("srv2"), "db1", 2)),
    ]
}

/// A snapshot with the lists whose order the contract leaves open sorted.
fn sorted(mut snap: Snapshot) -> Snapshot {
    snap.principals.sort_by(|a, b| a.object_id.cmp(&b.object_id));
    snap.role_assignments.sort_by(|a, b| a.id.cmp(&b.id));
    snap
}

fn load(store: &dyn Store) -> Result<Snapshot, StoreError> {
    store.load().map(sorted)
}

/// Commits [`one_of_everything`] and returns what the store then holds.
fn seed(store: &dyn Store) -> Result<Snapshot, StoreError> {
    store.commit(&one_of_everything())?;
    load(store)
}

/// A stored key as the suite expects it back.
fn stored(
    vault: &str,
    name: &str,
    deleted: Option<Deletion>,
    versions: Vec<(KeyVersion, Vec<u8>)>,
) -> StoredKey {
    StoredKey { vault: vault.into(), name: name.into(), deleted, versions }
}

/// Vault `v1` and, in order, the versions `(key name, version, material seed)` created in it.
fn in_v1<const N: usize>(versions: [(&str, KeyVersion, u8); N]) -> Vec<Change> {
    let mut changes = vec![Change::PutVault(vault("v1", 1))];
    changes.extend(versions.into_iter().map(|(name, v, seed)| create("v1", name, v, material(seed))));
    changes
}

/// A key of vault `v1`, not deleted, as the suite expects it back: `(version, material seed)`.
fn v1_key<const N: usize>(name: &str, versions: [(KeyVersion, u8); N]) -> StoredKey {
    stored("v1", name, None, versions.into_iter().map(|(v, seed)| (v, material(seed))).collect())
}

fn version_ids(key: &StoredKey) -> Vec<&str> {
    key.versions.iter().map(|(v, _)| v.version.as_str()).collect()
}

/// Commits `changes`, expects the refusal `expected`, and checks that nothing changed.
fn assert_refused(store: &dyn Store, changes: &[Change], expected: Rejection) -> Result<(), StoreError> {
    let before = load(store)?;
    match store.commit(changes) {
        Err(StoreError::Rejected(r)) => assert_eq!(r, expected),
        other => panic!("expected the refusal {expected:?}, got {other:?}"),
    }
    assert_eq!(load(store)?, before, "a refused commit changed the store");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// A new store holds nothing.
pub(crate) fn an_empty_store_loads_an_empty_snapshot(store: &dyn Store) -> Result<(), StoreError> {
    assert_eq!(store.load()?, Snapshot::default());
    Ok(())
}

/// Committing no changes succeeds and leaves the store as it was.
pub(crate) fn an_empty_commit_changes_nothing(store: &dyn Store) -> Result<(), StoreError> {
    let before = seed(store)?;
    store.commit(&[])?;
    assert_eq!(load(store)?, before);
    Ok(())
}

/// Loading can be repeated: it reads and consumes nothing.
pub(crate) fn loading_changes_nothing(store: &dyn Store) -> Result<(), StoreError> {
    let first = seed(store)?;
    assert_eq!(load(store)?, first);
    assert_eq!(first.keys.len(), 3);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Vaults
// ---------------------------------------------------------------------------------------------

/// `PutVault` stores every field of the vault.
pub(crate) fn put_vault_round_trips_every_field(store: &dyn Store) -> Result<(), StoreError> {
    store.commit(&[Change::PutVault(vault("v1", 1)), Change::PutVault(vault("v2", 2))])?;
    assert_eq!(store.load()?.vaults, vec![vault("v1", 1), vault("v2", 2)]);
    Ok(())
}

/// `PutVault` of a stored name replaces every field and leaves the vault's keys alone (access
/// policy and firewall changes are `PutVault`s).
pub(crate) fn put_vault_replaces_the_whole_vault_and_keeps_its_keys(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&in_v1([("k", version("a", 1), 1)]))?;
    store.commit(&[Change::PutVault(vault("v1", 2))])?;
    let snap = store.load()?;
    assert_eq!(snap.vaults, vec![vault("v1", 2)]);
    assert_eq!(snap.keys, vec![v1_key("k", [(version("a", 1), 1)])]);
    Ok(())
}

/// Vaults load in name order, whatever the order they were created in.
pub(crate) fn vaults_load_in_name_order(store: &dyn Store) -> Result<(), StoreError> {
    for name in ["vc", "va", "vb"] {
        store.commit(&[Change::PutVault(vault(name, 1))])?;
    }
    let names: Vec<String> = store.load()?.vaults.into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["va", "vb", "vc"]);
    Ok(())
}

/// `DeleteVault` removes the vault with its keys and their material, and nothing of other
/// vaults: a vault created again under the name starts empty.
pub(crate) fn delete_vault_removes_the_vault_its_keys_and_their_material(
    store: &dyn Store,
) -> Result<(), StoreError> {
    let before = seed(store)?;
    store.commit(&[Change::DeleteVault { vault: "v1".into() }])?;
    let after = load(store)?;
    assert_eq!(after.vaults, vec![vault("v2", 2)]);
    assert_eq!(after.keys, before.keys.iter().filter(|k| k.vault == "v2").cloned().collect::<Vec<_>>());
    assert_eq!(
        Snapshot { vaults: vec![], keys: vec![], ..after },
        Snapshot { vaults: vec![], keys: vec![], ..before }
    );
    store.commit(&[Change::PutVault(vault("v1", 1))])?;
    assert!(store.load()?.keys.iter().all(|k| k.vault != "v1"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Keys and key versions
// ---------------------------------------------------------------------------------------------

/// `PutKeyVersion` with material stores every field of the version and the material byte for
/// byte, for RSA and oct-HSM versions.
pub(crate) fn put_key_version_round_trips_every_field_and_the_material(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&in_v1([
        ("rsa", version("a", 1), 1),
        ("rsa", version("b", 2), 2),
        ("oct", oct_version("c"), 3),
    ]))?;
    let expected = vec![
        v1_key("oct", [(oct_version("c"), 3)]),
        v1_key("rsa", [(version("a", 1), 1), (version("b", 2), 2)]),
    ];
    assert_eq!(store.load()?.keys, expected);
    Ok(())
}

/// A key's versions load oldest first, in creation order across commits and interleaved with
/// other keys' versions, not in the order of their ids: the newest version is the last.
pub(crate) fn key_versions_load_oldest_first(store: &dyn Store) -> Result<(), StoreError> {
    store.commit(&in_v1([
        ("k1", version("b", 1), 1),
        ("k2", version("x", 1), 2),
        ("k1", version("a", 1), 3),
    ]))?;
    store.commit(&[create("v1", "k2", version("m", 1), material(4))])?;
    store.commit(&[create("v1", "k1", version("0", 1), material(5))])?;
    let snap = store.load()?;
    assert_eq!(snap.keys.iter().map(version_ids).collect::<Vec<_>>(), [vec!["b", "a", "0"], vec!["x", "m"]]);
    let materials: Vec<&[u8]> = snap.keys[0].versions.iter().map(|(_, m)| m.as_slice()).collect();
    assert_eq!(materials, [&material(1)[..], &material(3)[..], &material(5)[..]]);
    Ok(())
}

/// Key names are case-insensitive: versions created under other spellings join the key, which
/// keeps the spelling of its first version.
pub(crate) fn a_key_keeps_the_name_it_was_first_created_with(store: &dyn Store) -> Result<(), StoreError> {
    store.commit(&in_v1([("MyKey", version("a", 1), 1)]))?;
    store.commit(&[create("v1", "MYKEY", version("b", 1), material(2))])?;
    store.commit(&[create("v1", "mykey", version("c", 1), material(3))])?;
    let snap = store.load()?;
    assert_eq!(snap.keys.len(), 1);
    assert_eq!(snap.keys[0].name, "MyKey");
    assert_eq!(version_ids(&snap.keys[0]), ["a", "b", "c"]);
    Ok(())
}

/// Keys load by vault, then by lower-cased name.
pub(crate) fn keys_load_in_vault_then_lower_cased_name_order(store: &dyn Store) -> Result<(), StoreError> {
    let mut changes = vec![Change::PutVault(vault("vb", 1)), Change::PutVault(vault("va", 2))];
    for (v, k) in [("vb", "Zeta"), ("vb", "alpha"), ("va", "beta"), ("va", "Alpha2")] {
        changes.push(create(v, k, version("a", 1), material(1)));
    }
    store.commit(&changes)?;
    let order: Vec<(String, String)> = store.load()?.keys.into_iter().map(|k| (k.vault, k.name)).collect();
    let expected = [("va", "Alpha2"), ("va", "beta"), ("vb", "alpha"), ("vb", "Zeta")];
    assert_eq!(order, expected.map(|(v, k)| (v.to_string(), k.to_string())));
    Ok(())
}

/// `PutKeyVersion` without material (a metadata update, under any spelling of the key's name)
/// replaces every field of the version and keeps its material and its place among the versions.
pub(crate) fn a_metadata_update_replaces_the_version_and_keeps_its_material_and_place(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&in_v1([("Key", version("b", 1), 1), ("Key", version("a", 1), 2)]))?;
    store.commit(&[update("v1", "KEY", version("b", 2))])?;
    assert_eq!(store.load()?.keys, vec![v1_key("Key", [(version("b", 2), 1), (version("a", 1), 2)])]);
    Ok(())
}

/// A metadata update of a version that is not stored (unknown version, key or vault) is refused
/// with [`Rejection::MissingKeyVersion`], and the commit leaves nothing.
pub(crate) fn updating_a_version_that_is_not_stored_is_refused_and_changes_nothing(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&in_v1([("k", version("a", 1), 1)]))?;
    for (v, k, id) in [("v1", "K", "zz"), ("v1", "other", "a"), ("nowhere", "k", "a")] {
        let missing = Rejection::MissingKeyVersion { vault: v.into(), name: k.into(), version: id.into() };
        assert_refused(store, &[Change::PutVault(vault("v2", 2)), update(v, k, version(id, 2))], missing)?;
    }
    Ok(())
}

/// A new version whose id the key already has (under any spelling of its name) is refused with
/// [`Rejection::DuplicateKeyVersion`]; the stored version and its material stay.
pub(crate) fn creating_a_version_id_the_key_has_is_refused_and_changes_nothing(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&in_v1([("k", version("a", 1), 1)]))?;
    let duplicate =
        Rejection::DuplicateKeyVersion { vault: "v1".into(), name: "K".into(), version: "a".into() };
    let changes =
        [create("v1", "k", version("b", 1), material(2)), create("v1", "K", version("a", 2), material(3))];
    assert_refused(store, &changes, duplicate)
}

/// Version ids are unique per key only: a backup restored into another vault, or under another
/// name, keeps its version ids.
pub(crate) fn a_version_id_may_recur_under_another_key_or_vault(store: &dyn Store) -> Result<(), StoreError> {
    store.commit(&[
        Change::PutVault(vault("v1", 1)),
        Change::PutVault(vault("v2", 2)),
        create("v1", "k1", version("a", 1), material(1)),
        create("v1", "k2", version("a", 2), material(2)),
        create("v2", "k1", version("a", 3), material(3)),
    ])?;
    assert_eq!(
        store.load()?.keys,
        vec![
            stored("v1", "k1", None, vec![(version("a", 1), material(1))]),
            stored("v1", "k2", None, vec![(version("a", 2), material(2))]),
            stored("v2", "k1", None, vec![(version("a", 3), material(3))]),
        ]
    );
    Ok(())
}

/// `SetKeyDeletion` records a soft deletion (both dates) and clears it on recovery, under any
/// spelling of the key's name, and touches neither the versions nor other keys.
pub(crate) fn set_key_deletion_records_and_clears_the_deletion(store: &dyn Store) -> Result<(), StoreError> {
    store.commit(&in_v1([("Key", version("a", 1), 1), ("other", version("b", 1), 2)]))?;
    let before = store.load()?;
    store.commit(&[set_deleted("v1", "KEY", Some(deletion(5)))])?;
    let mut expected = before.clone();
    expected.keys[0].deleted = Some(deletion(5));
    assert_eq!(store.load()?, expected);
    store.commit(&[set_deleted("v1", "key", None)])?;
    assert_eq!(store.load()?, before);
    Ok(())
}

/// `PurgeKey` (under any spelling) removes the key with every version and its material, and
/// no other key.
pub(crate) fn purge_removes_the_key_and_its_material(store: &dyn Store) -> Result<(), StoreError> {
    store.commit(&in_v1([("k", version("a", 1), 1)]))?;
    store.commit(&[purge("v1", "K")])?;
    assert!(store.load()?.keys.is_empty());

    let before = seed(store)?;
    store.commit(&[set_deleted("v1", "key1", Some(deletion(2))), purge("v1", "KEY1")])?;
    let mut expected = before;
    expected.keys.retain(|k| !(k.vault == "v1" && k.name == "Key1"));
    assert_eq!(load(store)?, expected);
    Ok(())
}

/// A key created again after a purge has only its new versions, and the name it is created
/// with now; the old material does not come back.
pub(crate) fn a_purged_key_created_again_has_only_its_new_versions(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&in_v1([("key", version("a", 1), 1), ("key", version("b", 1), 2)]))?;
    store.commit(&[set_deleted("v1", "key", Some(deletion(1)))])?;
    store.commit(&[purge("v1", "key")])?;
    store.commit(&[create("v1", "KEY", version("a", 2), material(3))])?;
    assert_eq!(store.load()?.keys, vec![v1_key("KEY", [(version("a", 2), 3)])]);
    Ok(())
}

/// Removing, purging or marking deleted something that is not stored succeeds and changes
/// nothing.
pub(crate) fn removing_or_marking_what_is_not_stored_changes_nothing(
    store: &dyn Store,
) -> Result<(), StoreError> {
    let before = seed(store)?;
    store.commit(&[
        set_deleted("v1", "missing", Some(deletion(9))),
        set_deleted("nowhere", "key1", Some(deletion(9))),
        purge("v1", "missing"),
        purge("nowhere", "key1"),
        Change::DeleteVault { vault: "nowhere".into() },
        Change::DeletePrincipal { object_id: "missing".into() },
        Change::DeleteRoleAssignment { id: "missing".into() },
        Change::DeleteServer { id: server_id("missing") },
        Change::DeleteDatabase { server_id: server_id("srv1"), name: "missing".into() },
        Change::DeleteDatabase { server_id: server_id("missing"), name: "db1".into() },
    ])?;
    assert_eq!(load(store)?, before);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Principals and role assignments
// ---------------------------------------------------------------------------------------------

/// `PutPrincipal` stores every field (with and without a resource id) and replaces the
/// principal of the same object id.
pub(crate) fn put_principal_round_trips_and_replaces_by_object_id(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&[Change::PutPrincipal(principal("p1", 1)), Change::PutPrincipal(principal("p2", 2))])?;
    assert_eq!(load(store)?.principals, vec![principal("p1", 1), principal("p2", 2)]);
    store.commit(&[Change::PutPrincipal(principal("p1", 4))])?;
    assert_eq!(load(store)?.principals, vec![principal("p1", 4), principal("p2", 2)]);
    Ok(())
}

/// `DeletePrincipal` removes that principal only.
pub(crate) fn delete_principal_removes_only_that_principal(store: &dyn Store) -> Result<(), StoreError> {
    let mut expected = seed(store)?;
    store.commit(&[Change::DeletePrincipal { object_id: "p1".into() }])?;
    expected.principals.retain(|p| p.object_id != "p1");
    assert_eq!(load(store)?, expected);
    Ok(())
}

/// `PutRoleAssignment` stores every field and replaces the assignment of the same id.
pub(crate) fn put_role_assignment_round_trips_and_replaces_by_id(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&[
        Change::PutRoleAssignment(role_assignment("r1", 1)),
        Change::PutRoleAssignment(role_assignment("r2", 2)),
    ])?;
    assert_eq!(load(store)?.role_assignments, vec![role_assignment("r1", 1), role_assignment("r2", 2)]);
    store.commit(&[Change::PutRoleAssignment(role_assignment("r2", 3))])?;
    assert_eq!(load(store)?.role_assignments, vec![role_assignment("r1", 1), role_assignment("r2", 3)]);
    Ok(())
}

/// `DeleteRoleAssignment` removes that assignment only.
pub(crate) fn delete_role_assignment_removes_only_that_assignment(
    store: &dyn Store,
) -> Result<(), StoreError> {
    let mut expected = seed(store)?;
    store.commit(&[Change::DeleteRoleAssignment { id: "r2".into() }])?;
    expected.role_assignments.retain(|a| a.id != "r2");
    assert_eq!(load(store)?, expected);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Subnets, servers and databases
// ---------------------------------------------------------------------------------------------

/// Puts records of the ids `…/B` and `…/a`, then the one of `…/a` again with its id in upper
/// case and other fields: records load in lower-cased id order, and the second put replaced the
/// first whole, the id's spelling included.
fn check_case_insensitive_ids<T: PartialEq + std::fmt::Debug>(
    store: &dyn Store,
    id: fn(&str) -> String,
    record: fn(&str, i64) -> T,
    put: fn(T) -> Change,
    loaded: fn(Snapshot) -> Vec<T>,
) -> Result<(), StoreError> {
    let (b, a) = (id("B"), id("a"));
    store.commit(&[put(record(&b, 1)), put(record(&a, 2))])?;
    assert_eq!(loaded(store.load()?), vec![record(&a, 2), record(&b, 1)]);
    let a_again = a.to_ascii_uppercase();
    store.commit(&[put(record(&a_again, 3))])?;
    assert_eq!(loaded(store.load()?), vec![record(&a_again, 3), record(&b, 1)]);
    Ok(())
}

/// `PutSubnet` stores every field; ids are case-insensitive (the stored document keeps the
/// latest spelling) and subnets load in lower-cased id order.
pub(crate) fn put_subnet_round_trips_and_replaces_by_case_insensitive_id(
    store: &dyn Store,
) -> Result<(), StoreError> {
    check_case_insensitive_ids(store, subnet_id, subnet, Change::PutSubnet, |s| s.subnets)
}

/// `PutServer` stores every field (either protector); ids are case-insensitive (the stored
/// document keeps the latest spelling) and servers load in lower-cased id order.
pub(crate) fn put_server_round_trips_and_replaces_by_case_insensitive_id(
    store: &dyn Store,
) -> Result<(), StoreError> {
    check_case_insensitive_ids(store, server_id, server, Change::PutServer, |s| s.servers)
}

/// `DeleteServer` (under any spelling of the id) removes the server and its databases; other
/// servers' databases and the principals stay (the broker removes those with their own changes).
pub(crate) fn delete_server_removes_its_databases_and_nothing_else(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&one_of_everything())?;
    store.commit(&[Change::PutDatabase(database(&server_id("SRV1"), "db2", 3))])?;
    let mut expected = load(store)?;
    store.commit(&[Change::DeleteServer { id: server_id("Srv1") }])?;
    expected.servers.retain(|s| s.id != server_id("srv1"));
    expected.databases.retain(|d| !d.server_id.eq_ignore_ascii_case(&server_id("srv1")));
    assert_eq!(expected.databases.len(), 1);
    assert_eq!(load(store)?, expected);
    Ok(())
}

/// `PutDatabase` stores every field; a database is identified by its server id and name, both
/// case-insensitive (the document keeps the latest spelling); databases load in (server id,
/// name) order, lower-cased.
pub(crate) fn put_database_round_trips_and_replaces_by_case_insensitive_server_and_name(
    store: &dyn Store,
) -> Result<(), StoreError> {
    let (s1, s2) = (server_id("s1"), server_id("S2"));
    store.commit(&[
        Change::PutDatabase(database(&s2, "a", 1)),
        Change::PutDatabase(database(&s1, "B", 2)),
        Change::PutDatabase(database(&s1, "a", 3)),
    ])?;
    let loaded = store.load()?.databases;
    assert_eq!(loaded, vec![database(&s1, "a", 3), database(&s1, "B", 2), database(&s2, "a", 1)]);
    let s1_again = s1.to_ascii_uppercase();
    store.commit(&[Change::PutDatabase(database(&s1_again, "b", 4))])?;
    let loaded = store.load()?.databases;
    assert_eq!(loaded, vec![database(&s1, "a", 3), database(&s1_again, "b", 4), database(&s2, "a", 1)]);
    Ok(())
}

/// `DeleteDatabase` (under any spelling of server id and name) removes that database only.
pub(crate) fn delete_database_removes_only_that_database(store: &dyn Store) -> Result<(), StoreError> {
    let mut expected = seed(store)?;
    store.commit(&[Change::DeleteDatabase { server_id: server_id("SRV2"), name: "DB1".into() }])?;
    expected.databases.retain(|d| d.server_id != server_id("srv2"));
    assert_eq!(expected.databases.len(), 1);
    assert_eq!(load(store)?, expected);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Atomicity and order
// ---------------------------------------------------------------------------------------------

/// A commit whose last change fails leaves nothing of its earlier changes.
pub(crate) fn a_failing_change_rolls_back_the_whole_commit(store: &dyn Store) -> Result<(), StoreError> {
    let r = store.commit(&[Change::PutVault(vault("v1", 1)), update("v1", "k", version("missing", 1))]);
    assert!(r.is_err());
    assert!(store.load()?.vaults.is_empty());
    Ok(())
}

/// A refused commit undoes every kind of change that came before the refusal in it, removals
/// included, and leaves the meta values alone.
pub(crate) fn a_refused_commit_undoes_every_kind_of_change_before_the_refusal(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&one_of_everything())?;
    store.put_meta("m", b"kept")?;
    let changes = [
        Change::PutVault(vault("v1", 3)),
        Change::PutVault(vault("v3", 3)),
        create("v1", "key1", version("new", 3), material(9)),
        update("v1", "key1", version("a1", 3)),
        set_deleted("v1", "key1", Some(deletion(3))),
        set_deleted("v1", "key2", None),
        purge("v2", "key1"),
        Change::DeleteVault { vault: "v1".into() },
        Change::PutPrincipal(principal("p1", 3)),
        Change::DeletePrincipal { object_id: "p2".into() },
        Change::PutRoleAssignment(role_assignment("r3", 3)),
        Change::DeleteRoleAssignment { id: "r1".into() },
        Change::PutSubnet(subnet(&subnet_id("s1"), 3)),
        Change::PutServer(server(&server_id("srv2"), 3)),
        Change::PutDatabase(database(&server_id("srv2"), "db1", 3)),
        Change::DeleteDatabase { server_id: server_id("srv1"), name: "db1".into() },
        Change::DeleteServer { id: server_id("srv1") },
        update("v2", "key1", version("missing", 3)),
    ];
    let missing =
        Rejection::MissingKeyVersion { vault: "v2".into(), name: "key1".into(), version: "missing".into() };
    assert_refused(store, &changes, missing)?;
    assert_eq!(store.get_meta("m")?.as_deref(), Some(&b"kept"[..]));
    Ok(())
}

/// After a refused commit the store takes the next commit as usual.
pub(crate) fn the_store_stays_usable_after_a_refused_commit(store: &dyn Store) -> Result<(), StoreError> {
    store.commit(&in_v1([("k", version("a", 1), 1)]))?;
    assert!(store.commit(&[create("v1", "k", version("a", 2), material(2))]).is_err());
    store.commit(&[create("v1", "k", version("b", 2), material(2))])?;
    assert_eq!(store.load()?.keys, vec![v1_key("k", [(version("a", 1), 1), (version("b", 2), 2)])]);
    Ok(())
}

/// The changes of one commit apply in order, each seeing the ones before it (a restore creates
/// several versions in one commit; a server goes with its principals).
pub(crate) fn changes_of_one_commit_apply_in_order(store: &dyn Store) -> Result<(), StoreError> {
    store.commit(&[
        Change::PutVault(vault("v1", 1)),
        create("v1", "k", version("b", 1), material(1)),
        create("v1", "k", version("a", 1), material(2)),
        update("v1", "k", version("b", 2)),
        set_deleted("v1", "k", Some(deletion(1))),
        Change::PutVault(vault("v1", 2)),
        Change::PutVault(vault("v2", 1)),
        create("v2", "gone", version("c", 1), material(3)),
        Change::DeleteVault { vault: "v2".into() },
        Change::PutVault(vault("v2", 3)),
        Change::PutPrincipal(principal("p", 1)),
        Change::DeletePrincipal { object_id: "p".into() },
        Change::PutPrincipal(principal("p", 2)),
        Change::PutServer(server(&server_id("srv"), 1)),
        Change::PutDatabase(database(&server_id("srv"), "db", 1)),
        Change::DeleteServer { id: server_id("srv") },
    ])?;
    let expected = Snapshot {
        vaults: vec![vault("v1", 2), vault("v2", 3)],
        keys: vec![stored(
            "v1",
            "k",
            Some(deletion(1)),
            vec![(version("b", 2), material(1)), (version("a", 1), material(2))],
        )],
        principals: vec![principal("p", 2)],
        ..Snapshot::default()
    };
    assert_eq!(load(store)?, expected);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Meta values
// ---------------------------------------------------------------------------------------------

/// A meta value never written reads as `None`.
pub(crate) fn meta_of_an_unknown_name_is_none(store: &dyn Store) -> Result<(), StoreError> {
    assert_eq!(store.get_meta("signing_key")?, None);
    store.put_meta("signing_kid", b"kid")?;
    assert_eq!(store.get_meta("signing_key")?, None);
    Ok(())
}

/// `get_meta` returns the bytes `put_meta` wrote, binary and empty values included.
pub(crate) fn put_meta_then_get_meta_returns_the_same_bytes(store: &dyn Store) -> Result<(), StoreError> {
    let values = [("binary", material(7)), ("empty", vec![]), ("text", b"master-check".to_vec())];
    for (name, value) in &values {
        store.put_meta(name, value)?;
    }
    for (name, value) in &values {
        assert_eq!(store.get_meta(name)?.as_ref(), Some(value), "{name}");
    }
    Ok(())
}

/// `put_meta` of a name already written replaces the whole value (a shorter one included).
pub(crate) fn put_meta_replaces_the_previous_value(store: &dyn Store) -> Result<(), StoreError> {
    store.put_meta("admin", &material(1))?;
    store.put_meta("admin", b"short")?;
    assert_eq!(store.get_meta("admin")?.as_deref(), Some(&b"short"[..]));
    store.put_meta("admin", &material(2))?;
    assert_eq!(store.get_meta("admin")?, Some(material(2)));
    Ok(())
}

/// Meta values do not appear in the snapshot, and commits do not change them.
pub(crate) fn meta_stays_apart_from_commits_and_the_snapshot(store: &dyn Store) -> Result<(), StoreError> {
    store.put_meta("vaults", b"not a vault")?;
    assert_eq!(store.load()?, Snapshot::default());
    store.commit(&one_of_everything())?;
    store.commit(&[Change::DeleteVault { vault: "v1".into() }])?;
    assert_eq!(store.get_meta("vaults")?.as_deref(), Some(&b"not a vault"[..]));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sharing between threads
// ---------------------------------------------------------------------------------------------

/// A store shared by several threads takes their commits and meta writes side by side, and
/// keeps all of them.
pub(crate) fn concurrent_commits_from_several_threads_all_land(store: &dyn Store) -> Result<(), StoreError> {
    const THREADS: i64 = 4;
    const COMMITS: i64 = 20;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || -> Result<(), StoreError> {
                    for i in 0..COMMITS {
                        store.commit(&[Change::PutPrincipal(principal(&format!("p{t}-{i}"), i))])?;
                        store.put_meta(&format!("m{t}"), &i.to_be_bytes())?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    })?;
    assert_eq!(store.load()?.principals.len(), (THREADS * COMMITS) as usize);
    for t in 0..THREADS {
        assert_eq!(store.get_meta(&format!("m{t}"))?, Some((COMMITS - 1).to_be_bytes().to_vec()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Durability: for backends whose stores, opened again, see what earlier ones stored
// ---------------------------------------------------------------------------------------------

/// Creations, metadata updates and deletion records committed before a store is closed are all
/// there, with the versions' order and material, when it is opened again.
pub(crate) fn committed_changes_survive_reopening(backend: &impl Backend) -> Result<(), StoreError> {
    {
        let s = backend.open()?;
        s.commit(&[
            Change::PutVault(vault("v1", 1)),
            create("v1", "Key", version("b", 1), vec![9]),
            create("v1", "Key", version("a", 1), vec![8]),
        ])?;
        let mut updated = version("b", 1);
        updated.attributes.enabled = false;
        s.commit(&[
            update("v1", "key", updated),
            set_deleted("v1", "KEY", Some(Deletion { deleted_date: 5, scheduled_purge_date: 6 })),
        ])?;
    }
    let snap = backend.open()?.load()?;
    assert_eq!(snap.vaults, vec![vault("v1", 1)]);
    let k = &snap.keys[0];
    assert_eq!(k.name, "Key");
    assert_eq!(k.deleted.as_ref().map(|d| d.deleted_date), Some(5));
    // Creation order is kept, updates keep the material.
    assert_eq!(
        k.versions.iter().map(|(v, s)| (v.version.as_str(), s[0])).collect::<Vec<_>>(),
        vec![("b", 9), ("a", 8)]
    );
    assert!(!k.versions[0].0.attributes.enabled);
    Ok(())
}

/// Every kind of record, field by field, and the meta values are the same after reopening.
pub(crate) fn every_kind_of_record_survives_reopening(backend: &impl Backend) -> Result<(), StoreError> {
    let before = {
        let s = backend.open()?;
        s.commit(&one_of_everything())?;
        s.commit(&[update("v1", "key1", version("a1", 5))])?;
        s.put_meta("master_check", &material(5))?;
        load(s.as_ref())?
    };
    let s = backend.open()?;
    assert_eq!(load(s.as_ref())?, before);
    assert_eq!(s.get_meta("master_check")?, Some(material(5)));
    Ok(())
}

/// Removals (vault, purge, recovery, principal, assignment, server, database) are durable too.
pub(crate) fn removals_survive_reopening(backend: &impl Backend) -> Result<(), StoreError> {
    let before = {
        let s = backend.open()?;
        s.commit(&one_of_everything())?;
        s.commit(&[
            purge("v1", "key1"),
            set_deleted("v1", "key2", None),
            Change::DeleteVault { vault: "v2".into() },
            Change::DeletePrincipal { object_id: "p1".into() },
            Change::DeleteRoleAssignment { id: "r1".into() },
            Change::DeleteDatabase { server_id: server_id("srv2"), name: "db1".into() },
            Change::DeleteServer { id: server_id("srv1") },
        ])?;
        load(s.as_ref())?
    };
    let expected = Snapshot {
        vaults: vec![vault("v1", 1)],
        keys: vec![stored("v1", "key2", None, vec![(oct_version("c1"), material(3))])],
        principals: vec![principal("p2", 2)],
        role_assignments: vec![role_assignment("r2", 2)],
        subnets: vec![subnet(&subnet_id("s1"), 1)],
        servers: vec![server(&server_id("srv2"), 2)],
        databases: vec![],
    };
    assert_eq!(before, expected);
    assert_eq!(load(backend.open()?.as_ref())?, expected);
    Ok(())
}

/// Meta values, replaced ones included, are there after reopening.
pub(crate) fn meta_survives_reopening(backend: &impl Backend) -> Result<(), StoreError> {
    {
        let s = backend.open()?;
        s.put_meta("signing_key", &material(1))?;
        s.put_meta("signing_kid", b"old")?;
        s.put_meta("signing_kid", b"new")?;
    }
    let s = backend.open()?;
    assert_eq!(s.get_meta("signing_key")?, Some(material(1)));
    assert_eq!(s.get_meta("signing_kid")?.as_deref(), Some(&b"new"[..]));
    assert_eq!(s.get_meta("admin")?, None);
    Ok(())
}

/// A refused commit has left nothing behind when the store is opened again.
pub(crate) fn a_refused_commit_leaves_nothing_after_reopening(
    backend: &impl Backend,
) -> Result<(), StoreError> {
    let before = {
        let s = backend.open()?;
        let before = seed(s.as_ref())?;
        let changes = [
            Change::PutVault(vault("v3", 3)),
            purge("v1", "key1"),
            create("v2", "KEY1", version("d1", 3), material(9)),
        ];
        assert!(s.commit(&changes).is_err());
        before
    };
    assert_eq!(load(backend.open()?.as_ref())?, before);
    Ok(())
}
