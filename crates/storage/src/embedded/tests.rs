//! The conformance suite against the embedded store, and what only a local, durable store
//! promises: positions and dedupe across reopen, checkpoints, crash recovery, the lock.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fjall::AbstractTree;
use reflex_core::engine::{Backends, Engine, EngineConfig, EventOutcome};
use reflex_core::types::now_ms;
use reflex_core::{
    Appended, CatalogStore, EventKind, EventSink, HistoryEntry, ItemIdx, ItemIndex, LogRecord,
    Observation, OnlineModel, ProfilePolicy, ProfileStore, ProfileUpdate, RawEvent, RawKind,
    Retriever, Scored, UserId,
};
use tempfile::TempDir;

use super::*;
use crate::Stores;
use crate::conformance::{self, Setup, event, user, view};

fn config(dir: &Path) -> EmbeddedConfig {
    EmbeddedConfig::in_dir(dir)
}

fn open(dir: &Path) -> Arc<EmbeddedStore> {
    EmbeddedStore::open(config(dir), ProfilePolicy::default()).unwrap()
}

fn fresh() -> (TempDir, Arc<EmbeddedStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    (dir, store)
}

/// A fresh store in a temporary directory for a conformance case, as `setup` asks.
async fn for_case(setup: Setup) -> Option<(TempDir, Stores)> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    if let Some(window) = setup.dedupe_window_ms {
        config.dedupe_window_ms = window;
    }
    let store = EmbeddedStore::open(config, setup.policy).unwrap();
    Some((dir, Stores::all_in(store)))
}

crate::conformance_suite! {
    backend: for_case,
    skip: {
        // One process is the only learner: every lease is granted (the trait allows it).
        lease_is_exclusive: "a store one process uses grants every lease",
        // Start-up replays the log after the last checkpoint, so nothing is re-applied
        // and applies need not be idempotent per position.
        profiles_apply_each_position_once: "never re-applies: replay starts after its checkpoint",
        // No other replica watches the catalog: the version stays 0.
        catalog_version_tracks_changes: "one process: no replica watches the catalog version",
    },
}

#[tokio::test]
async fn positions_and_dedupe_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.last_seq().await.unwrap(), 0);
    let appended = store
        .append(&[view("r-1", "u"), view("r-2", "u"), view("r-1", "u")])
        .await
        .unwrap();
    assert_eq!(
        appended,
        [Appended::At(1), Appended::At(2), Appended::Duplicate]
    );
    drop(store);

    let store = open(dir.path());
    assert_eq!(store.last_seq().await.unwrap(), 2);
    let appended = store
        .append(&[view("r-2", "u"), view("r-3", "u")])
        .await
        .unwrap();
    assert_eq!(appended, [Appended::Duplicate, Appended::At(3)]);
    let read = store.read(0, 10).await.unwrap();
    assert_eq!(read.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3]);
}

#[tokio::test]
async fn ids_handed_over_and_ids_in_memory_both_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .append(&[view("a-1", "u"), view("a-2", "u")])
        .await
        .unwrap();
    assert_eq!(store.hand_over_ids().await.unwrap(), 2);
    store
        .append(&[view("b-1", "u"), view("b-2", "u")])
        .await
        .unwrap();
    drop(store);

    // The position the keyspace reaches was recorded: only b-1 and b-2 are read back.
    let store = open(dir.path());
    assert_eq!(store.shared.log.writer.lock().recent_len(), 2);
    let again = [view("a-2", "u"), view("b-1", "u"), view("c-1", "u")];
    assert_eq!(
        store.append(&again).await.unwrap(),
        [Appended::Duplicate, Appended::Duplicate, Appended::At(5)]
    );
    // Handing over twice what was handed over writes only what is new.
    assert_eq!(store.hand_over_ids().await.unwrap(), 3);
    assert_eq!(store.hand_over_ids().await.unwrap(), 0);
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.shared.log.writer.lock().recent_len(), 0);
    for id in ["a-1", "b-2", "c-1"] {
        assert_eq!(
            store.append(&[view(id, "u")]).await.unwrap(),
            [Appended::Duplicate],
            "{id}"
        );
    }
}

/// Appends several MiB of log records (and their dedupe keys), 20,000 in batches of 500.
async fn append_several_mib(store: &EmbeddedStore) {
    let padding = "x".repeat(100);
    for batch in 0..40 {
        let records: Vec<LogRecord> = (0..500)
            .map(|i| view(&format!("{padding}-{batch}-{i}"), "u"))
            .collect();
        store.append(&records).await.unwrap();
    }
}

/// Waits up to 20 s for `done`: flushes run in fjall's background workers.
async fn flushed(done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A store opened with `config` after [`append_several_mib`], once its log (whose
/// memtable `config` makes small) has been written out to a table.
async fn with_log_written_out(config: EmbeddedConfig) -> (Arc<EmbeddedStore>, Arc<Handles>) {
    let store = EmbeddedStore::open(config, ProfilePolicy::default()).unwrap();
    append_several_mib(&store).await;
    let handles = store.shared.handles().unwrap();
    // Flushes run in fjall's background workers: wait for them (a 64 MiB memtable, the
    // default, would still hold everything).
    flushed(|| handles.events.table_count() > 0).await;
    assert!(
        handles.events.table_count() > 0,
        "the log was never written out"
    );
    (store, handles)
}

#[tokio::test]
async fn the_log_leaves_memory_once_its_memtable_is_full_and_ids_once_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        memtable_bytes: 1024 * 1024,
        log_memtable_bytes: 1024 * 1024,
        ..config(dir.path())
    };
    let (store, handles) = with_log_written_out(config).await;
    // The ids never enter the memtable: with a 1 MiB budget, appends hand them over to
    // the keyspace's tables in the background every 10,240 ids, without maintenance.
    let held = || store.shared.log.writer.lock().recent_len();
    flushed(|| handles.event_ids.table_count() > 0 && held() < 20_000).await;
    assert!(held() < 20_000, "no id was handed over");
    assert!(
        handles.event_ids.table_count() > 0,
        "dedupe keys never written out"
    );
    assert!(handles.event_ids.tree.active_memtable().is_empty());
    store.hand_over_ids().await.unwrap();
    assert_eq!(handles.event_ids.len().unwrap(), 20_000);
    assert_eq!(held(), 0);
    assert_eq!(store.last_seq().await.unwrap(), 20_000);
    // Dedupe lookups are by key and need the bloom filters; the log is only read in
    // ranges, so its tables are written without any.
    assert!(handles.event_ids.tree.filter_size() > 0);
    assert_eq!(handles.events.tree.filter_size(), 0);
}

#[tokio::test]
async fn the_log_has_a_memtable_size_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        log_memtable_bytes: 1024 * 1024,
        ..config(dir.path())
    };
    let (_store, handles) = with_log_written_out(config).await;
    // The dedupe keys of the same events (about 2 MiB) fit the default 64 MiB memtable.
    assert_eq!(handles.event_ids.table_count(), 0);
}

#[tokio::test]
async fn compaction_drops_only_expired_dedupe_keys() {
    let dir = tempfile::tempdir().unwrap();
    // The window is long enough for the compaction below to run inside it on a busy
    // machine (60 ms was not: "new" itself expired before the check).
    let config = EmbeddedConfig {
        dedupe_window_ms: 2_000,
        ..config(dir.path())
    };
    let store = EmbeddedStore::open(config, ProfilePolicy::default()).unwrap();
    let old: Vec<LogRecord> = (0..10).map(|i| view(&format!("old-{i}"), "u")).collect();
    store.append(&old).await.unwrap();
    assert_eq!(store.hand_over_ids().await.unwrap(), 10);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    store.append(&[view("new", "u")]).await.unwrap();
    assert_eq!(store.hand_over_ids().await.unwrap(), 1);
    let handles = store.shared.handles().unwrap();
    let dedupe = &handles.event_ids;
    assert_eq!(dedupe.len().unwrap(), 11);
    // Maintenance no longer scans the dedupe keys; compaction expires them.
    store.maintain().await.unwrap();
    assert_eq!(dedupe.len().unwrap(), 11);
    dedupe.rotate_memtable_and_wait().unwrap();
    dedupe.major_compact().unwrap();
    assert_eq!(dedupe.len().unwrap(), 1);
    assert_eq!(
        store.append(&[view("new", "u")]).await.unwrap(),
        [Appended::Duplicate]
    );
    // An expired id is accepted again; the log itself keeps every record.
    assert_eq!(
        store.append(&[view("old-3", "u")]).await.unwrap(),
        [Appended::At(12)]
    );
    assert_eq!(store.last_seq().await.unwrap(), 12);
}

#[tokio::test]
async fn ids_an_earlier_build_kept_by_name_are_duplicates_until_they_leave_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        dedupe_window_ms: 1_500,
        ..config(dir.path())
    };
    {
        // What a build before the hashed ids left: ids by name in `dedupe`.
        let store = EmbeddedStore::open(config.clone(), ProfilePolicy::default()).unwrap();
        let h = store.shared.handles().unwrap();
        let legacy =
            h.db.keyspace(
                LEGACY_DEDUPE_KEYSPACE,
                fjall::KeyspaceCreateOptions::default,
            )
            .unwrap();
        legacy.insert("old-1", now_ms().to_be_bytes()).unwrap();
        h.db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let store = EmbeddedStore::open(config.clone(), ProfilePolicy::default()).unwrap();
    assert!(store.shared.handles().unwrap().legacy_dedupe.is_some());
    assert_eq!(
        store
            .append(&[view("old-1", "u"), view("new-1", "u")])
            .await
            .unwrap(),
        [Appended::Duplicate, Appended::At(1)]
    );
    drop(store);
    // Once every id it holds has left the window, the next open drops the keyspace.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let store = EmbeddedStore::open(config, ProfilePolicy::default()).unwrap();
    let h = store.shared.handles().unwrap();
    assert!(h.legacy_dedupe.is_none());
    assert!(!h.db.keyspace_exists(LEGACY_DEDUPE_KEYSPACE));
    assert_eq!(
        store.append(&[view("old-1", "u")]).await.unwrap(),
        [Appended::At(2)]
    );
}

#[tokio::test]
async fn a_second_open_of_the_directory_fails_clearly() {
    let (dir, _store) = fresh();
    let err = match EmbeddedStore::open(config(dir.path()), ProfilePolicy::default()) {
        Ok(_) => panic!("a second open must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("in use by another process"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
}

#[test]
fn open_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        dedupe_window_ms: -5,
        ..config(dir.path())
    };
    assert!(EmbeddedStore::open(config, ProfilePolicy::default()).is_err());
}

fn updates<'a>(
    events: &'a [reflex_core::Event],
    first_seq: u64,
    now: i64,
) -> Vec<ProfileUpdate<'a>> {
    events
        .iter()
        .enumerate()
        .map(|(i, event)| ProfileUpdate {
            seq: first_seq + i as u64,
            event,
            weight: 1.0,
            now_ms: now,
        })
        .collect()
}

fn views(prefix: &str, user: &str, n: usize) -> Vec<reflex_core::Event> {
    (0..n)
        .map(|i| {
            event(
                &format!("{prefix}-{i}"),
                user,
                "item",
                EventKind::View,
                1_000 + i as i64,
            )
        })
        .collect()
}

async fn profile(store: &EmbeddedStore, name: &str) -> Option<reflex_core::Profile> {
    ProfileStore::get(store, &user(name)).await.unwrap()
}

async fn checkpoint(store: &EmbeddedStore, seq: u64) {
    store
        .capture_checkpoint(seq)
        .expect("something to checkpoint")
        .await
        .unwrap();
}

#[tokio::test]
async fn checkpoints_restore_profiles_and_their_position_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.durable_seq().await.unwrap(), Some(0));
    let now = now_ms();
    let (alice, bob) = (views("a", "alice", 3), views("b", "bob", 2));
    store.apply(&updates(&alice, 1, now)).await.unwrap();
    store.apply(&updates(&bob, 4, now)).await.unwrap();
    checkpoint(&store, 5).await;
    assert_eq!(store.durable_seq().await.unwrap(), Some(5));
    assert!(store.capture_checkpoint(5).is_none(), "nothing changed");

    // Second checkpoint: bob erased, carol new.
    assert!(store.erase(&user("bob")).await.unwrap());
    let carol = views("c", "carol", 1);
    store.apply(&updates(&carol, 7, now)).await.unwrap();
    checkpoint(&store, 7).await;
    // Only the position moved: still worth recording, so replay starts later.
    checkpoint(&store, 8).await;

    // Not checkpointed: dave, and alice's fourth event.
    let dave = views("d", "dave", 2);
    store.apply(&updates(&dave, 9, now)).await.unwrap();
    let alice_more = views("a2", "alice", 1);
    store.apply(&updates(&alice_more, 11, now)).await.unwrap();
    let alice_checkpointed_version = 3;
    drop(store);

    let store = open(dir.path());
    assert_eq!(store.durable_seq().await.unwrap(), Some(8));
    assert_eq!(store.count().await.unwrap(), 2);
    let a = profile(&store, "alice").await.unwrap();
    assert_eq!(
        a.version, alice_checkpointed_version,
        "replay must add the rest"
    );
    assert_eq!(profile(&store, "carol").await.unwrap().version, 1);
    assert_eq!(profile(&store, "bob").await, None);
    assert_eq!(profile(&store, "dave").await, None, "needs replay");
}

#[tokio::test]
async fn full_profiles_are_kept_apart_from_their_keys_and_survive_compaction_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = now_ms();
    let users: Vec<String> = (0..20).map(|u| format!("user-{u}")).collect();
    let mut seq = 1;
    // Two checkpoints of the same users: the second supersedes every profile of the first.
    for round in 0..2 {
        for name in &users {
            let events = views(&format!("{name}-{round}"), name, 60);
            store.apply(&updates(&events, seq, now)).await.unwrap();
            seq += events.len() as u64;
        }
        checkpoint(&store, seq - 1).await;
    }
    let expected = profile(&store, "user-7").await.unwrap();
    assert_eq!(expected.version, 120);
    let h = store.shared.handles().unwrap();
    h.profiles.rotate_memtable_and_wait().unwrap();
    h.profiles.major_compact().unwrap();
    // A profile of 50 recent entries is far over the separation threshold.
    assert!(h.profiles.blob_file_count() > 0, "profiles kept inline");
    drop(h);
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.count().await.unwrap(), 20);
    assert_eq!(profile(&store, "user-7").await.unwrap(), expected);
}

#[tokio::test]
async fn profiles_loaded_from_a_checkpoint_share_one_string_per_item() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = now_ms();
    let (alice, bob) = (views("a", "alice", 3), views("b", "bob", 2));
    store.apply(&updates(&alice, 1, now)).await.unwrap();
    store.apply(&updates(&bob, 4, now)).await.unwrap();
    checkpoint(&store, 5).await;
    drop(store);

    let store = open(dir.path());
    let (a, b) = (
        profile(&store, "alice").await.unwrap(),
        profile(&store, "bob").await.unwrap(),
    );
    let shared = a.recent[0].item_id.as_arc();
    let entries = a.recent.iter().chain(&b.recent);
    assert_eq!(entries.clone().count(), 5);
    for entry in entries {
        assert_eq!(entry.item_id.as_str(), "item");
        assert!(
            Arc::ptr_eq(entry.item_id.as_arc(), shared),
            "every loaded entry of the item holds the same string"
        );
    }
}

#[tokio::test]
async fn expired_profiles_are_evicted_and_deleted_by_the_next_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let policy = ProfilePolicy::default();
    let store = EmbeddedStore::open(config(dir.path()), policy.clone()).unwrap();
    let long_ago = now_ms() - policy.ttl_ms - 1_000;
    let (old, young) = (views("o", "old", 1), views("y", "young", 1));
    store.apply(&updates(&old, 1, long_ago)).await.unwrap();
    store.apply(&updates(&young, 2, now_ms())).await.unwrap();
    checkpoint(&store, 2).await;
    // The checkpoint deleted the expired profile instead of writing it.
    assert_eq!(store.shared.handles().unwrap().profiles.len().unwrap(), 1);
    assert_eq!(store.count().await.unwrap(), 1);

    // An expired profile loaded from disk is evicted by maintenance.
    store.apply(&updates(&old, 3, now_ms())).await.unwrap();
    checkpoint(&store, 3).await;
    drop(store);
    let short = ProfilePolicy {
        ttl_ms: 0,
        ..policy
    };
    let store = EmbeddedStore::open(config(dir.path()), short).unwrap();
    assert_eq!(store.count().await.unwrap(), 2, "loaded as stored");
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.maintain().await.unwrap();
    assert_eq!(store.count().await.unwrap(), 0);
    checkpoint(&store, 3).await;
    assert_eq!(store.shared.handles().unwrap().profiles.len().unwrap(), 0);
}

#[tokio::test]
async fn a_checkpoint_writes_profiles_as_captured_while_events_keep_changing_them() {
    let (dir, store) = fresh();
    let now = now_ms();
    let first = views("a", "alice", 2);
    store.apply(&updates(&first, 1, now)).await.unwrap();
    let write = store.capture_checkpoint(2).unwrap();
    assert_eq!(store.shared.profile_state.pending(), 0);
    // An event after the capture changes the live profile, not the captured one.
    let second = views("b", "alice", 1);
    store.apply(&updates(&second, 3, now)).await.unwrap();
    write.await.unwrap();
    assert_eq!(profile(&store, "alice").await.unwrap().version, 3);
    assert_eq!(store.shared.profile_state.pending(), 1);
    drop(store);

    let store = open(dir.path());
    assert_eq!(profile(&store, "alice").await.unwrap().version, 2);
    assert_eq!(store.durable_seq().await.unwrap(), Some(2));
}

#[tokio::test]
async fn a_checkpoint_that_fails_or_is_dropped_leaves_its_profiles_dirty() {
    let (_dir, store) = fresh();
    let now = now_ms();
    let alice = views("a", "alice", 1);
    store.apply(&updates(&alice, 1, now)).await.unwrap();
    let older = store.capture_checkpoint(1).unwrap();
    let bob = views("b", "bob", 1);
    store.apply(&updates(&bob, 2, now)).await.unwrap();
    checkpoint(&store, 2).await;
    // Landing after a newer checkpoint would undo it: refused, alice stays dirty.
    assert!(older.await.is_err());
    assert_eq!(store.shared.handles().unwrap().profiles.len().unwrap(), 1);
    assert_eq!(store.shared.profile_state.pending(), 1);

    let dropped = store.capture_checkpoint(2).unwrap();
    assert_eq!(store.shared.profile_state.pending(), 0);
    drop(dropped);
    assert_eq!(store.shared.profile_state.pending(), 1);
    checkpoint(&store, 2).await;
    assert_eq!(store.shared.handles().unwrap().profiles.len().unwrap(), 2);
    assert_eq!(store.shared.profile_state.pending(), 0);
}

#[tokio::test]
async fn the_catalog_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    conformance::catalog_round_trips(&Stores::all_in(store.clone()), &Setup::default())
        .await
        .unwrap();
    let before = store.load_all().await.unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.load_all().await.unwrap(), before);
    assert_eq!(before.len(), 1);
}

/// Environment variable that tells [`crash_child`] where to write before it aborts.
const CRASH_DIR_ENV: &str = "REFLEX_STORAGE_CRASH_DIR";

/// Half of [`acked_events_survive_a_crash`]: run in a child process, it writes, takes a
/// checkpoint, writes more and aborts without any shutdown.
#[tokio::test]
#[ignore = "run by acked_events_survive_a_crash in a child process"]
async fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let store = open(Path::new(&dir));
    let now = now_ms();
    let mut first = views("u1", "u1", 3);
    first.extend(views("u2", "u2", 2));
    let records: Vec<_> = first.iter().cloned().map(conformance::record).collect();
    assert_eq!(store.append(&records).await.unwrap().len(), 5);
    store.apply(&updates(&first, 1, now)).await.unwrap();
    checkpoint(&store, 5).await;

    let mut second = views("u1-late", "u1", 1);
    second.extend(views("u3", "u3", 2));
    let records: Vec<_> = second.iter().cloned().map(conformance::record).collect();
    let appended = store.append(&records).await.unwrap();
    assert_eq!(appended.last(), Some(&Appended::At(8)));
    store.apply(&updates(&second, 6, now)).await.unwrap();
    std::process::abort();
}

#[tokio::test]
async fn acked_events_survive_a_crash_and_replay_applies_them_once() {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "embedded::tests::crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .status()
        .unwrap();
    assert!(!status.success(), "the child aborts");

    let store = open(dir.path());
    assert_eq!(store.last_seq().await.unwrap(), 8);
    let checkpointed = store.durable_seq().await.unwrap().unwrap();
    assert_eq!(checkpointed, 5);
    assert_eq!(profile(&store, "u1").await.unwrap().version, 3);
    assert_eq!(profile(&store, "u3").await, None);

    // The engine's recovery: replay what the checkpoint does not cover.
    let tail = store.read(checkpointed, 100).await.unwrap();
    let events: Vec<_> = tail
        .iter()
        .filter_map(|(_, r)| match r {
            LogRecord::Event { event, .. } => Some(event.clone()),
            LogRecord::Erase { .. } => None,
        })
        .collect();
    store.apply(&updates(&events, 6, now_ms())).await.unwrap();
    assert_eq!(profile(&store, "u1").await.unwrap().version, 4);
    assert_eq!(profile(&store, "u2").await.unwrap().version, 2);
    assert_eq!(profile(&store, "u3").await.unwrap().version, 2);
    let again = store.append(&[view("u3-1", "u3")]).await.unwrap();
    assert_eq!(again, [Appended::Duplicate]);
}

/// A model that learns nothing, so the engine can run over the store alone.
struct NoModel;

impl OnlineModel for NoModel {
    fn version(&self) -> String {
        "none".into()
    }
    fn observe(&self, _obs: &Observation<'_>) {}
    fn forget_user(&self, _user: &UserId) {}
    fn user_vector(&self, _history: &[HistoryEntry]) -> Option<Vec<f32>> {
        None
    }
    fn item_vector(&self, _item: ItemIdx) -> Option<Vec<f32>> {
        None
    }
    fn popular(&self, _k: usize, _filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        Vec::new()
    }
}

impl Retriever for NoModel {
    fn search(&self, _query: &[f32], _k: usize, _filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        Vec::new()
    }
    fn len(&self) -> usize {
        0
    }
}

fn engine_over(store: &Arc<EmbeddedStore>) -> Engine {
    let backends = Backends {
        sink: store.clone(),
        profiles: store.clone(),
        catalog: store.clone(),
        model: Arc::new(NoModel),
        retriever: Arc::new(NoModel),
        items: Arc::new(ItemIndex::new()),
        models: store.clone(),
    };
    Engine::new(backends, EngineConfig::default())
}

fn raw(event_id: &str, user: &str, item: &str) -> RawEvent {
    RawEvent {
        event_id: event_id.into(),
        user_id: user.into(),
        item_id: item.into(),
        kind: Some(RawKind::Click),
        timestamp_ms: Some(now_ms()),
        ..RawEvent::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_recovers_the_same_profiles_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let engine = engine_over(&store);
    assert_eq!(engine.recover().await.unwrap(), 0);
    let batch = |prefix: &str| -> Vec<RawEvent> {
        (0..4)
            .map(|i| raw(&format!("{prefix}-{i}"), &format!("user-{}", i % 2), "shoe"))
            .collect()
    };
    assert!(
        engine
            .ingest(batch("one"))
            .await
            .unwrap()
            .iter()
            .all(|o| *o == EventOutcome::Accepted)
    );
    assert_eq!(engine.checkpoint().await.unwrap(), Some(4));
    engine.ingest(batch("two")).await.unwrap();
    assert!(engine.erase_profile(&user("user-1")).await.unwrap());
    engine
        .ingest(vec![raw("three", "user-1", "hat")])
        .await
        .unwrap();
    let before: Vec<_> = [user("user-0"), user("user-1")]
        .iter()
        .map(|u| store.shared.profile_state.current(u))
        .collect();
    drop(engine);
    drop(store);

    let store = open(dir.path());
    let engine = engine_over(&store);
    assert_eq!(engine.recover().await.unwrap(), 10);
    for (u, expected) in [user("user-0"), user("user-1")].iter().zip(&before) {
        let got = engine.profile(u).await.unwrap();
        assert_eq!(
            got.as_ref().map(|p| p.version),
            expected.as_ref().map(|p| p.version)
        );
        assert_eq!(
            got.as_ref().map(|p| &p.counts),
            expected.as_ref().map(|p| &p.counts)
        );
    }
    assert_eq!(
        engine
            .profile(&user("user-1"))
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );
    let again = engine.ingest(batch("two")).await.unwrap();
    assert!(
        again.iter().all(|o| *o == EventOutcome::Duplicate),
        "{again:?}"
    );
}

#[tokio::test]
async fn trim_drops_covered_records_past_the_retention_but_never_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        log_retention_ms: 50,
        ..config(dir.path())
    };
    let store = EmbeddedStore::open(config.clone(), ProfilePolicy::default()).unwrap();
    let first: Vec<LogRecord> = (0..10).map(|i| view(&format!("t-{i}"), "u")).collect();
    store.append(&first).await.unwrap();
    // The first trim only notes where the log ends: nothing is older than the retention.
    assert_eq!(store.trim(10).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(80)).await;
    store.append(&[view("t-10", "u")]).await.unwrap();
    // Records whose ids are only in memory stay whatever covers them: start-up reads the
    // ids back from them.
    assert_eq!(store.trim(5).await.unwrap(), 0);
    store.hand_over_ids().await.unwrap();
    // Covered through 5: records 1 to 5 go, whatever the retention would allow.
    assert_eq!(store.trim(5).await.unwrap(), 5);
    let seqs = |read: Vec<(u64, LogRecord)>| read.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
    assert_eq!(
        seqs(store.read(0, 100).await.unwrap()),
        [6, 7, 8, 9, 10, 11]
    );
    // Covered through everything: only what is older than the retention goes (1 to 10).
    assert_eq!(store.trim(11).await.unwrap(), 5);
    assert_eq!(seqs(store.read(0, 100).await.unwrap()), [11]);
    tokio::time::sleep(Duration::from_millis(80)).await;
    store.trim(11).await.unwrap();
    // The last record stays, so a reopened log goes on numbering after it.
    assert_eq!(seqs(store.read(0, 100).await.unwrap()), [11]);
    // A trimmed id is still a duplicate: trimming leaves the dedupe window alone.
    assert_eq!(
        store.append(&[view("t-3", "u")]).await.unwrap(),
        [Appended::Duplicate]
    );
    drop(store);
    let store = EmbeddedStore::open(config, ProfilePolicy::default()).unwrap();
    assert_eq!(store.last_seq().await.unwrap(), 11);
    assert_eq!(
        store.append(&[view("t-11", "u")]).await.unwrap(),
        [Appended::At(12)]
    );
}

/// The ids of the events among `records`, in order.
fn ids_of<'a>(records: impl IntoIterator<Item = &'a LogRecord>) -> Vec<String> {
    records
        .into_iter()
        .filter_map(|record| match record {
            LogRecord::Event { event, .. } => Some(event.event_id.as_str().to_owned()),
            LogRecord::Erase { .. } => None,
        })
        .collect()
}

/// The ids of every event in the log, in log order, after checking that the positions
/// run 1, 2, 3… without a gap.
async fn logged_ids(store: &EmbeddedStore) -> Vec<String> {
    let read = store.read(0, 1_000_000).await.unwrap();
    let seqs: Vec<u64> = read.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=read.len() as u64).collect::<Vec<_>>());
    ids_of(read.iter().map(|(_, record)| record))
}

fn views_named(prefix: &str, n: usize) -> Vec<LogRecord> {
    (0..n)
        .map(|i| view(&format!("{prefix}-{i}"), "u"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_removes_the_records_of_a_failed_append_and_keeps_the_acked_ones() {
    let (dir, store) = fresh();
    let acked = views_named("acked", 3);
    store.append(&acked).await.unwrap();
    // What a commit that failed after reaching the journal leaves behind once fjall
    // recovers it: a record past the acked end, and a checkpoint position newer than the
    // one the store knows.
    let lost = view("lost", "u");
    {
        let h = store.shared.handles().unwrap();
        let mut batch = h.db.batch();
        let record = encode(&lost, "log record").unwrap();
        batch.insert(&h.events, &4u64.to_be_bytes()[..], record);
        batch.insert(&h.meta, PROFILES_SEQ_KEY, &3u64.to_be_bytes()[..]);
        batch.commit().unwrap();
    }
    store.shared.disk.note_failed_commit();
    assert!(store.shared.disk.unwritable().is_some());

    // The next call reopens the database: the client's retry is accepted, once, right
    // after the acked records.
    let retry = [lost, view("after", "u")];
    assert_eq!(
        store.append(&retry).await.unwrap(),
        [Appended::At(4), Appended::At(5)]
    );
    assert!(!store.shared.disk.stopped());
    assert_eq!(store.health().await.unwritable, None);
    assert_eq!(store.durable_seq().await.unwrap(), Some(3));
    let expected = ids_of(acked.iter().chain(&retry));
    assert_eq!(logged_ids(&store).await, expected);

    // A restart finds the same log and dedupe window.
    restart_finds(dir.path(), store, 5, &expected, &[view("lost", "u")]).await;
}

/// Drops `store`, opens the directory again and checks that the log ends at `last`,
/// holds exactly the ids `expected`, and answers `Duplicate` to each of `again`.
async fn restart_finds(
    dir: &Path,
    store: Arc<EmbeddedStore>,
    last: u64,
    expected: &[String],
    again: &[LogRecord],
) {
    drop(store);
    let store = open(dir);
    assert_eq!(store.last_seq().await.unwrap(), last);
    assert_eq!(logged_ids(&store).await, expected);
    assert_eq!(
        store.append(again).await.unwrap(),
        vec![Appended::Duplicate; again.len()]
    );
}

/// Checks that the log holds `n` records with `n` distinct ids: each once.
async fn each_logged_once(store: &EmbeddedStore, n: usize) {
    let ids = logged_ids(store).await;
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((ids.len(), unique.len()), (n, n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_fsync_failed_is_removed_by_the_reopen_and_its_retry_accepted() {
    let (dir, store) = fresh();
    let acked = views_named("acked", 3);
    store.append(&acked).await.unwrap();
    // Committed under the writer lock, then the fsync that would make it durable fails:
    // the client hears an error, and a checkpoint must not cover the records.
    let unsynced = views_named("unsynced", 2);
    store
        .shared
        .log
        .fail_next_sync
        .store(true, std::sync::atomic::Ordering::Release);
    let err = store.append(&unsynced).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert_eq!(store.last_seq().await.unwrap(), 3);

    // The retry reopens the database and is accepted, not answered `Duplicate`, right
    // after the acked records.
    assert_eq!(
        store.append(&unsynced).await.unwrap(),
        [Appended::At(4), Appended::At(5)]
    );
    let expected = ids_of(acked.iter().chain(&unsynced));
    assert_eq!(logged_ids(&store).await, expected);

    restart_finds(dir.path(), store, 5, &expected, &unsynced).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_each_return_durable_and_store_every_id_once() {
    let (dir, store) = fresh();
    // 16 writers, each appending its own ids and then every other writer's first id.
    let mut tasks = Vec::new();
    for w in 0..16 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0;
            for n in 0..50 {
                let records = [
                    view(&format!("w{w}-{n}"), "u"),
                    view(&format!("w{}-0", (w + 1) % 16), "u"),
                ];
                for outcome in store.append(&records).await.unwrap() {
                    if matches!(outcome, Appended::At(_)) {
                        accepted += 1;
                    }
                }
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.unwrap();
    }
    assert_eq!(accepted, 16 * 50);
    assert_eq!(store.last_seq().await.unwrap(), 16 * 50);
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.last_seq().await.unwrap(), 16 * 50);
    each_logged_once(&store, 16 * 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_go_away_strand_no_append_queued_after_theirs() {
    let (_dir, store) = fresh();
    let mut tasks = Vec::new();
    for n in 0..64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store.append(&[view(&format!("e{n}"), "u")]).await
        }));
    }
    // Every other caller goes away (a deadline, a client that hung up) while the appends
    // are queued or on the blocking pool: what it queued may still land, as after a
    // timeout, and every other caller is answered.
    for task in tasks.iter().step_by(2) {
        task.abort();
    }
    for task in tasks {
        match task.await {
            Ok(result) => assert!(matches!(result.unwrap()[..], [Appended::At(_)])),
            Err(err) => assert!(err.is_cancelled(), "{err}"),
        }
    }
    // The retry of all 64 stores those that did not land, and each id is in the log once.
    let all: Vec<_> = (0..64).map(|n| view(&format!("e{n}"), "u")).collect();
    store.append(&all).await.unwrap();
    each_logged_once(&store, 64).await;
    assert_eq!(store.last_seq().await.unwrap(), 64);
}

/// A tmpfs mounted for a test (which needs root), unmounted when dropped.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(size_mib: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file that takes every free byte; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_stopped_by_a_full_disk_is_reopened_once_space_returns() {
    let Some(tmpfs) = Tmpfs::mount(16) else {
        eprintln!("SKIPPED: this test mounts a tmpfs, which needs root");
        return;
    };
    // No floor, so that fjall's own write fails (the floor would refuse the append first)
    // and the store is left to reopen a database fjall has stopped.
    let config = EmbeddedConfig {
        min_free_bytes: 0,
        ..config(&tmpfs.path().join("data"))
    };
    let store = EmbeddedStore::open(config.clone(), ProfilePolicy::default()).unwrap();
    let mut acked = views_named("before", 10);
    store.append(&acked).await.unwrap();

    let filler = tmpfs.fill();
    // Small appends, until one needs a page the disk no longer has.
    let mut failed = None;
    for round in 0..10_000 {
        let records = views_named(&format!("full-{round}"), 5);
        match store.append(&records).await {
            Ok(outcomes) => {
                assert!(outcomes.iter().all(|o| matches!(o, Appended::At(_))));
                acked.extend(records);
            }
            Err(err) => {
                failed = Some((records, err));
                break;
            }
        }
    }
    let (records, err) = failed.expect("an append fails on a full disk");
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(
        store.shared.disk.stopped(),
        "fjall stops after a failed write"
    );

    // Space returns: the retry reopens the database, without a restart, and is accepted
    // right after the acked records (whatever of it reached the journal was removed).
    std::fs::remove_file(&filler).unwrap();
    let last_acked = acked.len() as u64;
    let started = std::time::Instant::now();
    let outcomes = loop {
        match store.append(&records).await {
            Ok(outcomes) => break outcomes,
            Err(err) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "still refused 10 s after space returned: {err}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let expected_at: Vec<_> = (1..=records.len() as u64)
        .map(|i| Appended::At(last_acked + i))
        .collect();
    assert_eq!(outcomes, expected_at);
    acked.extend(records);
    assert_eq!(store.health().await.unwritable, None);
    assert_eq!(logged_ids(&store).await, ids_of(&acked));

    // A restart finds exactly the acked records, each once.
    drop(store);
    let store = EmbeddedStore::open(config, ProfilePolicy::default()).unwrap();
    assert_eq!(store.last_seq().await.unwrap(), acked.len() as u64);
    assert_eq!(logged_ids(&store).await, ids_of(&acked));
    assert_eq!(
        store.append(&acked[..1]).await.unwrap(),
        [Appended::Duplicate]
    );
}

#[tokio::test]
async fn a_scheduled_checkpoint_waits_for_enough_log_per_changed_profile() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(
        EmbeddedConfig {
            checkpoint_events_per_profile: 4,
            ..config(dir.path())
        },
        ProfilePolicy::default(),
    )
    .unwrap();
    assert!(!store.checkpoint_due(0), "nothing happened");
    let now = now_ms();
    // Two users changed by 6 events: 3 per profile, under 4.
    store
        .apply(&updates(&views("a", "alice", 3), 1, now))
        .await
        .unwrap();
    store
        .apply(&updates(&views("b", "bob", 3), 4, now))
        .await
        .unwrap();
    assert!(!store.checkpoint_due(6));
    // Alice's two more events: 8 events for two profiles.
    store
        .apply(&updates(&views("a2", "alice", 2), 7, now))
        .await
        .unwrap();
    assert!(store.checkpoint_due(8));
    checkpoint(&store, 8).await;
    assert!(!store.checkpoint_due(8), "written");
    // Events that changed no profile (filtered ones) only move the position: due.
    assert!(store.checkpoint_due(9));
}

#[tokio::test]
async fn a_changed_profile_waits_no_longer_than_the_max_interval() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(
        EmbeddedConfig {
            checkpoint_events_per_profile: 1_000,
            checkpoint_max_interval_ms: 0,
            ..config(dir.path())
        },
        ProfilePolicy::default(),
    )
    .unwrap();
    store
        .apply(&updates(&views("a", "alice", 1), 1, now_ms()))
        .await
        .unwrap();
    assert!(store.checkpoint_due(1), "the interval has passed");
}
