//! What each kind of record does in a store: loading, vaults, keys and their versions, soft
//! deletion and purge, principals, role assignments, subnets, servers and databases.

use crate::model::Change;
use crate::store::{Rejection, Snapshot, Store, StoreError};

use super::fixtures::*;

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

/// `SetVaultDeletion` records every field of the deletion record (replacing an earlier one) and
/// clears it, leaving the vault and its keys (their own deletion records included) alone.
pub(crate) fn set_vault_deletion_records_and_clears_the_deletion_and_keeps_the_keys(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&in_v1([("k", version("a", 1), 1), ("gone", version("b", 1), 2)]))?;
    store.commit(&[set_deleted("v1", "gone", Some(deletion(1))), Change::PutVault(vault("v3", 3))])?;
    let before = store.load()?;
    assert!(before.vault_deletions.is_empty());
    store
        .commit(&[set_vault_deleted("v1", Some(deletion(4))), set_vault_deleted("v3", Some(deletion(5)))])?;
    store.commit(&[set_vault_deleted("v3", Some(deletion(6)))])?;
    let after = store.load()?;
    assert_eq!(after.vault_deletions, vec![("v1".to_string(), deletion(4)), ("v3".to_string(), deletion(6))]);
    assert_eq!(Snapshot { vault_deletions: vec![], ..after }, before);
    store.commit(&[set_vault_deleted("v1", None), set_vault_deleted("v3", None)])?;
    assert_eq!(store.load()?, before);
    Ok(())
}

/// `DeleteVault` of a soft-deleted vault (its purge) removes its deletion record with it: a
/// vault created again under the name is not deleted and holds no keys.
pub(crate) fn delete_vault_removes_its_deletion_record(store: &dyn Store) -> Result<(), StoreError> {
    let before = seed(store)?;
    store.commit(&[Change::DeleteVault { vault: "v2".into() }])?;
    let after = load(store)?;
    assert!(after.vault_deletions.is_empty());
    assert_eq!(after.vaults, vec![vault("v1", 1)]);
    assert!(after.keys.iter().all(|k| k.vault == "v1"));
    assert_eq!(
        Snapshot { vaults: vec![], keys: vec![], vault_deletions: vec![], ..after },
        Snapshot { vaults: vec![], keys: vec![], vault_deletions: vec![], ..before }
    );
    store.commit(&[Change::PutVault(vault("v2", 2))])?;
    let again = store.load()?;
    assert!(again.vault_deletions.is_empty());
    assert!(again.keys.iter().all(|k| k.vault != "v2"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Keys and key versions
// ---------------------------------------------------------------------------------------------

/// `PutKeyVersion` with material stores every field of the version and the material byte for
/// byte, for RSA, EC and oct-HSM versions.
pub(crate) fn put_key_version_round_trips_every_field_and_the_material(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&in_v1([
        ("rsa", version("a", 1), 1),
        ("rsa", version("b", 2), 2),
        ("oct", oct_version("c"), 3),
        ("ec", ec_version("d"), 4),
    ]))?;
    let expected = vec![
        v1_key("ec", [(ec_version("d"), 4)]),
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
        set_vault_deleted("nowhere", Some(deletion(9))),
        set_vault_deleted("v1", None),
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
