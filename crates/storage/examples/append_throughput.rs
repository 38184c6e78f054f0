//! Rough ingest throughput of the embedded store: batches of 500 events appended (and
//! applied to profiles, as the engine does), one writer and several, per durability.
//!
//! Run with `cargo run --release -p reflex-storage --example append_throughput`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reflex_core::types::now_ms;
use reflex_core::{
    Appended, Error, Event, EventId, EventKind, EventSink, ItemId, LogRecord, ProfilePolicy,
    ProfileStore, ProfileUpdate, Result, UserId,
};
use reflex_storage::{Durability, EmbeddedConfig, EmbeddedStore};

const BATCHES: usize = 200;
const BATCH: usize = 500;
const USERS: usize = 100_000;

fn batch(writer: usize, b: usize) -> Result<Vec<LogRecord>> {
    let now = now_ms();
    (0..BATCH)
        .map(|i| {
            let n = (writer * BATCHES + b) * BATCH + i;
            let mut context = BTreeMap::new();
            context.insert("device".to_string(), "mobile".to_string());
            context.insert("channel".to_string(), "web".to_string());
            Ok(LogRecord::Event {
                event: Event {
                    event_id: EventId::parse(&format!("evt-{writer}-{n:012}"), "event_id")?,
                    user_id: UserId::parse(&format!("user-{}", (n * 7919) % USERS), "user_id")?,
                    item_id: ItemId::parse(&format!("item-{}", (n * 104_729) % 50_000), "item_id")?,
                    kind: EventKind::View,
                    weight: None,
                    timestamp_ms: now,
                    session_id: None,
                    value: Some(19.99),
                    context,
                },
                filtered: false,
                ingested_ms: now,
            })
        })
        .collect()
}

/// Time spent per phase: cloning records (as the engine does), appending, applying.
type Phases = [Duration; 3];

async fn writer(
    store: Arc<EmbeddedStore>,
    batches: Vec<Vec<LogRecord>>,
    profiles: bool,
) -> Result<Phases> {
    let mut phases = Phases::default();
    for records in batches {
        if !profiles {
            let t = Instant::now();
            store.append(&records).await?;
            phases[1] += t.elapsed();
            continue;
        }
        let t = Instant::now();
        let copy = records.clone();
        phases[0] += t.elapsed();
        let t = Instant::now();
        let appended = store.append(&copy).await?;
        phases[1] += t.elapsed();
        let t = Instant::now();
        let updates: Vec<ProfileUpdate<'_>> = records
            .iter()
            .zip(&appended)
            .filter_map(|(record, outcome)| match (record, outcome) {
                (
                    LogRecord::Event {
                        event, ingested_ms, ..
                    },
                    Appended::At(seq),
                ) => Some(ProfileUpdate {
                    seq: *seq,
                    event,
                    weight: 1.0,
                    now_ms: *ingested_ms,
                }),
                _ => None,
            })
            .collect();
        store.apply(&updates).await?;
        phases[2] += t.elapsed();
    }
    Ok(phases)
}

async fn run(durability: Durability, writers: usize, profiles: bool) -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| Error::storage("creating a temp dir", e))?;
    let config = EmbeddedConfig {
        durability,
        ..EmbeddedConfig::in_dir(dir.path())
    };
    let store = EmbeddedStore::open(config, ProfilePolicy::default())?;
    let per_writer = BATCHES / writers;
    // Built up front so the figure measures the store, not the event generator.
    let work: Vec<Vec<Vec<LogRecord>>> = (0..writers)
        .map(|w| (0..per_writer).map(|b| batch(w, b)).collect())
        .collect::<Result<_>>()?;

    let start = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|batches| tokio::spawn(writer(Arc::clone(&store), batches, profiles)))
        .collect();
    let mut phases = Phases::default();
    for task in tasks {
        let done = task.await.map_err(|e| Error::Internal(e.to_string()))??;
        for (total, phase) in phases.iter_mut().zip(done) {
            *total += phase;
        }
    }
    let elapsed = start.elapsed();

    let checkpoint = Instant::now();
    if let Some(write) = store.capture_checkpoint(store.last_seq().await?) {
        write.await?;
    }
    let checkpoint = checkpoint.elapsed();

    let batches = (per_writer * writers) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 / batches;
    println!(
        "{durability:?}, {writers} writer(s), profiles {profiles}: {:.0} events/s; per batch \
         clone {:.2} ms, append {:.2} ms, apply {:.2} ms; checkpoint of {} profiles {:.0} ms",
        batches * BATCH as f64 / elapsed.as_secs_f64(),
        ms(phases[0]),
        ms(phases[1]),
        ms(phases[2]),
        store.count().await?,
        checkpoint.as_secs_f64() * 1000.0,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    for durability in [Durability::Sync, Durability::Buffered] {
        for (writers, profiles) in [(1, false), (1, true), (4, true)] {
            run(durability, writers, profiles).await?;
        }
    }
    Ok(())
}
