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
//! A backend that several brokers share ([`Store::feed`] returns its [`ChangeFeed`]) also runs
//! the feed's suite (`feed.rs`): `change_feed_conformance_tests!(MyBackend);`, where every
//! [`Backend::open`] opens another store over the same storage, as another broker would. See
//! `postgres.rs`.
//!
//! [`ChangeFeed`]: super::ChangeFeed
//!
//! # Adding a test
//! Fixtures are in `fixtures.rs`; tests of what one kind of record does in `records.rs`, tests of
//! commits as a whole (atomicity, order, metadata, threads, reopening) in `commits.rs`.
//! Write a `pub(crate) fn` named after the behaviour it proves, taking `&dyn Store` (or
//! `&impl Backend` when it reopens) and returning `Result<(), StoreError>`, and add its name to
//! the matching list in [`store_conformance_tests!`]. A function left out of both lists is never
//! called, which `cargo clippy --all-targets` reports as dead code.
//!
//! Records are compared whole (`assert_eq!` on the model types compares every field), with
//! fixtures whose fields all differ from their defaults and from one fixture number to the next.

mod commits;
mod feed;
mod fixtures;
mod records;
mod rotation;

pub(crate) use commits::*;
pub(crate) use feed::*;
pub(crate) use records::*;
pub(crate) use rotation::*;

use super::{Store, StoreError};

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
            set_vault_deletion_records_and_clears_the_deletion_and_keeps_the_keys,
            delete_vault_removes_its_deletion_record,
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
            a_manual_clock_change_saves_the_time_with_its_commit,
            concurrent_commits_from_several_threads_all_land,
        );
        $crate::store::conformance::store_conformance_tests!(@with_store $backend:
            put_key_rotation_policy_round_trips_and_replaces_by_key,
            purge_and_vault_deletion_remove_rotation_policies,
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
        $crate::store::conformance::store_conformance_tests!(@with_backend $backend:
            rotation_policies_survive_reopening,
        );
    };
}
pub(crate) use store_conformance_tests;

/// Generates one `#[test]` per test of the change feed's suite for the [`Backend`] type given,
/// whose stores share their storage and have a feed.
macro_rules! change_feed_conformance_tests {
    ($backend:ty) => {
        $crate::store::conformance::store_conformance_tests!(@with_backend $backend:
            concurrent_commits_from_two_stores_form_one_gapless_ordered_feed,
            plain_commits_are_in_the_feed_and_refused_ones_are_not,
            commit_after_refuses_a_stale_head_and_writes_nothing,
            read_after_pages_through_the_feed_in_order,
            load_at_head_matches_the_snapshot_with_its_head,
            a_commit_wakes_a_follower_waiting_on_another_store,
            a_lease_has_one_holder_until_it_lapses_or_is_released,
        );
    };
}
pub(crate) use change_feed_conformance_tests;
