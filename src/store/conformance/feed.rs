//! The change feed of a store that several brokers share ([`ChangeFeed`]): what a follower
//! relies on. Each test opens two stores over the same storage, as two brokers would.

use crate::model::Change;
use crate::store::memory::MemoryStore;
use crate::store::{ChangeFeed, Rejection, Store, StoreError};

use super::Backend;
use super::fixtures::*;

fn feed_of(store: &dyn Store) -> &dyn ChangeFeed {
    store.feed().expect("a shared backend has a change feed") // ok: test-only suite
}

/// Replays every batch of the feed, in order, into an empty memory store and returns what it
/// then holds: what a follower that started from nothing would hold.
fn replayed(feed: &dyn ChangeFeed) -> Result<crate::store::Snapshot, StoreError> {
    let replica = MemoryStore::new();
    let mut at = 0;
    loop {
        let batch = feed.read_after(at, 7)?;
        let Some(last) = batch.last() else { break };
        at = last.seq;
        for entry in batch {
            replica.commit(&entry.changes)?;
        }
    }
    load(&replica)
}

/// Commits from several threads on two stores at once get the sequence numbers 1, 2, 3, … with
/// no gap and no repeat, each batch carries its committer's origin and changes, and replaying
/// the feed in its order gives exactly what the store holds (the order of the feed is the order
/// in which the commits applied: every thread rewrites the same vault and adds versions to the
/// same key, so another order would end elsewhere).
pub(crate) fn concurrent_commits_from_two_stores_form_one_gapless_ordered_feed(
    backend: &impl Backend,
) -> Result<(), StoreError> {
    const THREADS: usize = 3;
    const COMMITS: usize = 15;
    let stores = [backend.open()?, backend.open()?];
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS * 2)
            .map(|t| {
                let feed = feed_of(stores[t % 2].as_ref());
                s.spawn(move || -> Result<Vec<u64>, StoreError> {
                    let mut seqs = Vec::new();
                    for i in 0..COMMITS {
                        let n = (t * COMMITS + i) as i64;
                        let changes = [
                            Change::PutVault(vault("shared", n)),
                            create("shared", "key", version(&format!("t{t}-{i}"), n), material(n as u8)),
                        ];
                        // Commit on the head as it is now; another thread may move it first.
                        loop {
                            let head = feed.head()?;
                            match feed.commit_after(head, &format!("origin-{t}"), &changes) {
                                Ok(seq) => break seqs.push(seq),
                                Err(StoreError::Conflict { .. }) => continue,
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    Ok(seqs)
                })
            })
            .collect();
        let mut all = Vec::new();
        for (t, w) in workers.into_iter().enumerate() {
            let seqs = w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            all.extend(seqs.iter().map(|&seq| (seq, t)));
        }
        all.sort();
        let expected: Vec<u64> = (1..=(THREADS * 2 * COMMITS) as u64).collect();
        assert_eq!(all.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), expected, "gaps or repeats");
        let feed = feed_of(stores[1].as_ref());
        let entries = feed.read_after(0, usize::MAX)?;
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), expected);
        for ((seq, t), entry) in all.iter().zip(&entries) {
            assert_eq!((entry.seq, entry.origin.as_str()), (*seq, format!("origin-{t}").as_str()));
            assert_eq!(entry.changes.len(), 2);
        }
        assert_eq!(feed.head()?, expected.len() as u64);
        let stored = load(stores[0].as_ref())?;
        assert_eq!(stored.keys[0].versions.len(), THREADS * 2 * COMMITS);
        assert_eq!(replayed(feed)?, stored, "the feed's order is not the order the commits applied in");
        Ok(())
    })
}

/// `Store::commit` on either store is in the feed too, and a refused commit is not: it takes no
/// sequence number and leaves no gap.
pub(crate) fn plain_commits_are_in_the_feed_and_refused_ones_are_not(
    backend: &impl Backend,
) -> Result<(), StoreError> {
    let (a, b) = (backend.open()?, backend.open()?);
    a.commit(&[Change::PutVault(vault("v1", 1)), create("v1", "k", version("x", 1), material(1))])?;
    assert_refused(
        b.as_ref(),
        &[Change::PutPrincipal(principal("p1", 1)), create("v1", "K", version("x", 2), material(2))],
        Rejection::DuplicateKeyVersion { vault: "v1".into(), name: "K".into(), version: "x".into() },
    )?;
    let feed = feed_of(b.as_ref());
    assert_eq!(feed.head()?, 1, "the refused commit moved the head");
    b.commit(&[Change::PutPrincipal(principal("p2", 2))])?;
    let entries = feed.read_after(0, 10)?;
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    assert!(
        matches!(entries[1].changes.as_slice(), [Change::PutPrincipal(p)] if p.object_id == "p2"),
        "{:?}",
        entries[1].changes
    );
    assert_eq!(replayed(feed)?, load(a.as_ref())?);
    Ok(())
}

/// `commit_after` commits only on the head it names: a store whose view is behind gets
/// `Conflict` with the head and writes nothing; on the new head it commits.
pub(crate) fn commit_after_refuses_a_stale_head_and_writes_nothing(
    backend: &impl Backend,
) -> Result<(), StoreError> {
    let (a, b) = (backend.open()?, backend.open()?);
    let (fa, fb) = (feed_of(a.as_ref()), feed_of(b.as_ref()));
    assert_eq!(fa.commit_after(0, "a", &[Change::PutPrincipal(principal("p1", 1))])?, 1);
    match fb.commit_after(0, "b", &[Change::PutPrincipal(principal("p2", 2))]) {
        Err(StoreError::Conflict { head: 1, expected: 0 }) => {}
        other => panic!("expected a conflict at head 1, got {other:?}"),
    }
    let ids: Vec<String> = load(b.as_ref())?.principals.into_iter().map(|p| p.object_id).collect();
    assert_eq!(ids, ["p1"], "the refused commit wrote something");
    assert_eq!(fb.head()?, 1);
    assert_eq!(fb.commit_after(1, "b", &[Change::PutPrincipal(principal("p2", 2))])?, 2);
    Ok(())
}

/// Reading the feed pages through it in order: `limit` caps a read, and reading after the head
/// returns nothing.
pub(crate) fn read_after_pages_through_the_feed_in_order(backend: &impl Backend) -> Result<(), StoreError> {
    let store = backend.open()?;
    let feed = feed_of(store.as_ref());
    assert!(feed.read_after(0, 10)?.is_empty());
    assert_eq!(feed.head()?, 0);
    for i in 0..5 {
        store.commit(&[Change::PutPrincipal(principal(&format!("p{i}"), i))])?;
    }
    let page = |after, limit| -> Result<Vec<u64>, StoreError> {
        Ok(feed.read_after(after, limit)?.into_iter().map(|e| e.seq).collect())
    };
    assert_eq!(page(0, 2)?, [1, 2]);
    assert_eq!(page(2, 2)?, [3, 4]);
    assert_eq!(page(4, 2)?, [5]);
    assert!(page(5, 2)?.is_empty());
    Ok(())
}

/// The snapshot of `load_at_head` holds exactly the batches up to the head it returns: a
/// follower that starts there and reads after that head ends where the store is.
pub(crate) fn load_at_head_matches_the_snapshot_with_its_head(
    backend: &impl Backend,
) -> Result<(), StoreError> {
    let (a, b) = (backend.open()?, backend.open()?);
    a.commit(&one_of_everything())?;
    let (snapshot, head) = feed_of(b.as_ref()).load_at_head()?;
    assert_eq!(head, 1);
    assert_eq!(sorted(snapshot), load(a.as_ref())?);
    a.commit(&[Change::DeletePrincipal { object_id: "p1".into() }])?;
    let (snapshot, head) = feed_of(b.as_ref()).load_at_head()?;
    assert_eq!(head, 2);
    assert!(snapshot.principals.iter().all(|p| p.object_id != "p1"));
    Ok(())
}

/// A commit on one store wakes a follower waiting on another; with nothing committed, a wait
/// ends at its timeout and says so.
pub(crate) fn a_commit_wakes_a_follower_waiting_on_another_store(
    backend: &impl Backend,
) -> Result<(), StoreError> {
    let (a, b) = (backend.open()?, backend.open()?);
    let follower = feed_of(b.as_ref());
    // The first wait starts listening (and may report a wake-up: batches may have been
    // committed before); after it, nothing is pending.
    follower.wait(std::time::Duration::ZERO)?;
    assert!(!follower.wait(std::time::Duration::ZERO)?, "woken with nothing committed");
    std::thread::scope(|s| {
        // Bounded so a lost notification fails the test instead of hanging it.
        let waiter = s.spawn(|| follower.wait(std::time::Duration::from_secs(60)));
        a.commit(&[Change::PutPrincipal(principal("p1", 1))])?;
        let woken = waiter.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        assert!(woken, "the commit did not wake the follower");
        Ok::<(), StoreError>(())
    })?;
    assert_eq!(follower.read_after(0, 10)?.len(), 1);
    Ok(())
}

/// A lease is held by one holder at a time: the holder renews it, others are refused while it
/// runs, anyone takes it once it lapsed or was released; leases of other names are apart.
pub(crate) fn a_lease_has_one_holder_until_it_lapses_or_is_released(
    backend: &impl Backend,
) -> Result<(), StoreError> {
    use std::time::Duration;
    let (a, b) = (backend.open()?, backend.open()?);
    let (fa, fb) = (feed_of(a.as_ref()), feed_of(b.as_ref()));
    let long = Duration::from_secs(600);
    assert!(fa.lease("prober", "broker-a", long)?);
    assert!(!fb.lease("prober", "broker-b", long)?, "two holders at once");
    assert!(fa.lease("prober", "broker-a", long)?, "the holder could not renew");
    assert!(fb.lease("sweeper", "broker-b", long)?, "a lease of another name was taken");
    // Released: free for the next.
    fa.release("prober", "broker-a")?;
    assert!(fb.lease("prober", "broker-b", long)?);
    // Releasing a lease one does not hold changes nothing.
    fa.release("prober", "broker-a")?;
    assert!(!fa.lease("prober", "broker-a", long)?);
    // Lapsed (a holder that renewed with no time left, as one that stopped renewing ends up):
    // taken over.
    assert!(fb.lease("rotation", "broker-b", Duration::ZERO)?);
    assert!(fa.lease("rotation", "broker-a", long)?, "a lapsed lease was not taken over");
    assert!(!fb.lease("rotation", "broker-b", long)?);
    Ok(())
}
