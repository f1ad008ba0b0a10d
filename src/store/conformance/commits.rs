//! Commits as a whole: atomicity, the order of changes, metadata, concurrent writers and, for
//! durable backends, what survives reopening.

use crate::model::{Change, Deletion};
use crate::store::{META_MANUAL_CLOCK, Rejection, Snapshot, Store, StoreError};

use super::Backend;
use super::fixtures::*;

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

/// `SetManualClock` round-trips through the meta value `manual_clock` (decimal ASCII, the last
/// one of a commit winning), within the commit's transaction: a refused commit leaves the saved
/// time alone, and the snapshot never shows it.
pub(crate) fn a_manual_clock_change_saves_the_time_with_its_commit(
    store: &dyn Store,
) -> Result<(), StoreError> {
    store.commit(&[Change::SetManualClock { now: 1_700_000_000 }])?;
    assert_eq!(store.get_meta(META_MANUAL_CLOCK)?.as_deref(), Some(&b"1700000000"[..]));
    assert_eq!(store.load()?, Snapshot::default());
    store.commit(&[Change::SetManualClock { now: 5 }, Change::SetManualClock { now: 1_800_000_000 }])?;
    assert_eq!(store.get_meta(META_MANUAL_CLOCK)?.as_deref(), Some(&b"1800000000"[..]));
    let refused = store.commit(&[
        Change::SetManualClock { now: 42 },
        Change::PutVault(vault("v1", 1)),
        update("v1", "k", version("missing", 1)),
    ]);
    assert!(refused.is_err());
    assert_eq!(store.get_meta(META_MANUAL_CLOCK)?.as_deref(), Some(&b"1800000000"[..]));
    assert!(store.load()?.vaults.is_empty());
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
        vault_deletions: vec![],
        rotation_policies: vec![],
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
