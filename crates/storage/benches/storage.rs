//! Micro-benchmarks of the stores: one profile update (`ProfileStore::apply` with one
//! event) in the embedded store among 100k users held in memory, and in Redis (a real
//! `redis-server` on a free port, skipped with a message when none is installed) alone
//! and in a batch of 500; ingest's one-call path on Redis (`EventSink::append_applying`:
//! append and apply in one script) for a batch of 500 events from 500 different users, the
//! shape of a busy shop's batches; one append of 500 events to the embedded event log
//! (`EventSink::append`), fsynced (`sync`, the default) and not (`buffered`).
//!
//! Run with `cargo bench -p reflex-storage`; figures and method are in BENCHMARKS.md.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use reflex_core::types::now_ms;
use reflex_core::{
    Event, EventId, EventKind, EventSink, ItemId, LogRecord, ProfilePolicy, ProfileStore,
    ProfileUpdate, UserId,
};
use reflex_storage::testing::RedisServer;
use reflex_storage::{Durability, EmbeddedConfig, EmbeddedStore, RedisConfig, RedisStore};

const USERS: u64 = 100_000;
const ITEMS: u64 = 10_000;
const BATCH: u64 = 500;

/// Setup failures abort the benchmark with what failed.
fn fail<T>(what: &str) -> impl FnOnce(reflex_core::Error) -> T + '_ {
    move |e| panic!("{what}: {e}")
}

fn event(n: u64, tag: &str, now: i64) -> Event {
    let mut context = BTreeMap::new();
    context.insert("device".to_string(), "mobile".to_string());
    context.insert("channel".to_string(), "web".to_string());
    Event {
        event_id: EventId::parse(&format!("{tag}-{n}"), "event_id")
            .unwrap_or_else(fail("event id")),
        user_id: UserId::parse(&format!("user-{:07}", (n * 7919) % USERS), "user_id")
            .unwrap_or_else(fail("user id")),
        item_id: ItemId::parse(&format!("item-{:07}", (n * 104_729) % ITEMS), "item_id")
            .unwrap_or_else(fail("item id")),
        kind: EventKind::View,
        weight: None,
        timestamp_ms: now,
        session_id: None,
        value: None,
        context,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("building a runtime: {e}"))
}

fn open(dir: &std::path::Path, durability: Durability) -> Arc<EmbeddedStore> {
    let config = EmbeddedConfig {
        durability,
        ..EmbeddedConfig::in_dir(dir)
    };
    EmbeddedStore::open(config, ProfilePolicy::default()).unwrap_or_else(fail("opening the store"))
}

fn profile_apply(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let store = open(dir.path(), Durability::Buffered);
    let now = now_ms();
    // 100k users, each with a few events, so the map is at a realistic size.
    let events: Vec<Event> = (0..USERS * 3).map(|n| event(n, "load", now)).collect();
    let updates: Vec<ProfileUpdate<'_>> = events
        .iter()
        .enumerate()
        .map(|(i, event)| ProfileUpdate {
            seq: i as u64 + 1,
            event,
            weight: 1.0,
            now_ms: now,
        })
        .collect();
    rt.block_on(store.apply(&updates))
        .unwrap_or_else(fail("loading profiles"));
    let mut n = 0usize;
    c.bench_function("profile_store_apply_1_event_100k_users", |b| {
        b.iter(|| {
            n = (n + 1) % updates.len();
            rt.block_on(store.apply(black_box(&updates[n..n + 1])))
        })
    });
}

/// Events (one per user) loaded into Redis before timing, fewer than the embedded
/// store's 300k: each costs a share of a script call while loading.
const REDIS_EVENTS: u64 = 30_000;

/// A `redis-server` of the benchmark's own, a runtime and a store connected to it; `None`
/// (with a message naming `bench`) when no `redis-server` is installed.
fn redis_store(bench: &str) -> Option<(RedisServer, tokio::runtime::Runtime, Arc<RedisStore>)> {
    let Some(server) = RedisServer::start() else {
        eprintln!("SKIPPED {bench}: redis-server is not installed");
        return None;
    };
    let rt = runtime();
    let store = rt
        .block_on(RedisStore::connect(
            RedisConfig::new(server.url(), "bench"),
            ProfilePolicy::default(),
        ))
        .unwrap_or_else(fail("connecting to redis"));
    Some((server, rt, store))
}

fn redis_profile_apply(c: &mut Criterion) {
    let Some((server, rt, store)) = redis_store("redis_profile_apply") else {
        return;
    };
    let now = now_ms();
    let events: Vec<Event> = (0..REDIS_EVENTS).map(|n| event(n, "redis", now)).collect();
    // Every timed update has a new log position: Redis skips one it has applied already.
    let next_seq = AtomicU64::new(1);
    let updates = |from: usize, len: usize| -> Vec<ProfileUpdate<'_>> {
        (from..from + len)
            .map(|i| ProfileUpdate {
                seq: next_seq.fetch_add(1, Ordering::Relaxed),
                event: &events[i % events.len()],
                weight: 1.0,
                now_ms: now,
            })
            .collect()
    };
    for from in (0..events.len()).step_by(BATCH as usize) {
        rt.block_on(store.apply(&updates(from, BATCH as usize)))
            .unwrap_or_else(fail("loading profiles into redis"));
    }
    let mut group = c.benchmark_group("redis_profile_store_apply");
    let mut n = 0usize;
    group.bench_function("1_event", |b| {
        b.iter_batched(
            || {
                n += 1;
                updates(n, 1)
            },
            |batch| rt.block_on(store.apply(black_box(&batch))),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("500_events", |b| {
        b.iter_batched(
            || {
                n += BATCH as usize;
                updates(n, BATCH as usize)
            },
            |batch| rt.block_on(store.apply(black_box(&batch))),
            BatchSize::SmallInput,
        )
    });
    group.finish();
    drop(server);
}

/// `EventSink::append_applying` on a standalone Redis: a batch of 500 new events, each
/// from a different user among 30k who already have a profile of a few events (the
/// steady state of a shop whose batches mix many users). With one batch in flight at a
/// time and Redis on the same machine, the time per batch is mostly Redis's own CPU for
/// the script.
fn redis_append_applying(c: &mut Criterion) {
    let Some((server, rt, store)) = redis_store("redis_append_applying") else {
        return;
    };
    let now = now_ms();
    let next = AtomicU64::new(0);
    // Event n comes from user n mod 30k: 500 consecutive events are 500 users.
    let batch = || -> Vec<LogRecord> {
        let start = next.fetch_add(BATCH, Ordering::Relaxed);
        (start..start + BATCH)
            .map(|n| {
                let mut event = event(n, "one-call", now);
                event.user_id = UserId::parse(&format!("user-{:07}", n % REDIS_EVENTS), "user_id")
                    .unwrap_or_else(fail("user id"));
                LogRecord::Event {
                    event,
                    filtered: false,
                    ingested_ms: now,
                }
            })
            .collect()
    };
    let weights = vec![1.0f32; BATCH as usize];
    let run = |records: Vec<LogRecord>| {
        rt.block_on(store.append_applying(&records, &weights))
            .unwrap_or_else(|| panic!("a standalone Redis appends and applies in one call"))
            .unwrap_or_else(fail("appending and applying"))
    };
    // Three events for every user before timing.
    for _ in 0..3 * REDIS_EVENTS / BATCH {
        run(batch());
    }
    let mut group = c.benchmark_group("redis_append_applying_500");
    group.throughput(criterion::Throughput::Elements(BATCH));
    group.bench_function("500_users", |b| {
        b.iter_batched(
            batch,
            |records| black_box(run(records)),
            BatchSize::PerIteration,
        )
    });
    group.finish();
    drop(server);
}

/// A batch of events whose ids no earlier batch used, or the dedupe check would answer
/// duplicate and nothing would be written.
fn fresh_batch(next: &AtomicU64, now: i64) -> Vec<LogRecord> {
    let start = next.fetch_add(BATCH, Ordering::Relaxed);
    (start..start + BATCH)
        .map(|n| LogRecord::Event {
            event: event(n, "append", now),
            filtered: false,
            ingested_ms: now,
        })
        .collect()
}

fn append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("event_sink_append_500");
    group.sample_size(20);
    group.throughput(criterion::Throughput::Elements(BATCH));
    for durability in [Durability::Sync, Durability::Buffered] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let store = open(dir.path(), durability);
        let next = AtomicU64::new(0);
        let now = now_ms();
        group.bench_function(format!("{durability:?}").to_lowercase(), |b| {
            b.iter_batched(
                || fresh_batch(&next, now),
                |records| rt.block_on(store.append(&records)),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();

    // Four appends in flight at once, as from four ingest streams: they queue on the log's
    // writer lock, each holding it through its fsync with `sync` (what a group commit
    // would share; see BENCHMARKS).
    let mut group = c.benchmark_group("event_sink_append_4x500");
    group.sample_size(20);
    group.throughput(criterion::Throughput::Elements(4 * BATCH));
    for durability in [Durability::Sync, Durability::Buffered] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let store = open(dir.path(), durability);
        let next = AtomicU64::new(0);
        let now = now_ms();
        let batch = || fresh_batch(&next, now);
        group.bench_function(format!("{durability:?}").to_lowercase(), |b| {
            b.iter_batched(
                || [batch(), batch(), batch(), batch()],
                |[a, b, c, d]| {
                    rt.block_on(async {
                        tokio::join!(
                            store.append(&a),
                            store.append(&b),
                            store.append(&c),
                            store.append(&d)
                        )
                    })
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = profile_apply, redis_profile_apply, redis_append_applying, append
}
criterion_main!(benches);
