//! Heap bytes per user, by component: a development probe, not part of the binary.
//!
//! Builds the server's engine in process (embedded store in a temporary directory,
//! 4 MiB memtables so their fixed budget stays small), gives 100k users 5 events each,
//! and prints the heap allocated per user: by the whole engine, then by the online
//! model and the signals alone. Run it with
//! `cargo run --release -p reflex-server --example heap_per_user [nosignals]`.
//! Heap figures are exact and need no quiet machine, unlike the RSS that `reflex bench`
//! reports; allocator overhead and fragmentation come on top of them.

// The counting allocator (in `common/`) implements `GlobalAlloc`.
#![allow(unsafe_code)]
#[path = "common/counting.rs"]
mod counting;

use std::collections::BTreeMap;

use counting::live;
use reflex_core::{EventKind, Item, ItemId, Observation, RawEvent, RawKind, SignalEvent, UserId};

const USERS: usize = 100_000;
const EVENTS: usize = 5;
const ITEMS: usize = 10_000;

fn kind(n: usize) -> RawKind {
    [
        RawKind::View,
        RawKind::View,
        RawKind::Click,
        RawKind::AddToCart,
        RawKind::Purchase,
    ][n % 5]
}

fn events(user: usize, ts: i64) -> Vec<RawEvent> {
    (0..EVENTS)
        .map(|n| {
            let mut context = BTreeMap::new();
            context.insert("device".to_string(), "mobile".to_string());
            context.insert("channel".to_string(), "web".to_string());
            RawEvent {
                event_id: format!("ev-{user}-{n}"),
                user_id: format!("user-{user}"),
                item_id: format!("item-{}", (user * 7919 + n * 104729) % ITEMS),
                kind: Some(kind(n)),
                custom_kind: String::new(),
                weight: None,
                timestamp_ms: Some(ts + n as i64),
                timestamp_nanos: None,
                session_id: String::new(),
                value: None,
                context,
            }
        })
        .collect()
}

fn report(what: &str, before: (isize, isize), after: (isize, isize)) {
    println!(
        "{what:40} {:8.1} B/user  {:5.2} allocs/user",
        (after.0 - before.0) as f64 / USERS as f64,
        (after.1 - before.1) as f64 / USERS as f64
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let signals_on = std::env::args().nth(1).as_deref() != Some("nosignals");
    let dir = tempfile::tempdir()?;
    let mut config = reflex_server::config::Config::default();
    config.store.embedded = reflex_storage::EmbeddedConfig::in_dir(dir.path());
    config.store.embedded.memtable_bytes = 4 << 20;
    config.store.embedded.log_memtable_bytes = 4 << 20;
    config.engine.bot_filter.max_events_per_user_per_sec = 0;
    config.signals.enabled = signals_on;
    let metrics = reflex_server::metrics::Metrics::new()?;
    let engine = reflex_server::app::build_engine(&config, &metrics).await?;
    let items = (0..ITEMS)
        .map(|i| {
            Ok(Item {
                item_id: ItemId::parse(&format!("item-{i}"), "item_id")?,
                title: String::new(),
                categories: vec![format!("cat-{}", i % 50)],
                available: true,
                embedding: Vec::new(),
            })
        })
        .collect::<reflex_core::Result<Vec<Item>>>()?;
    engine.upsert_items(items).await?;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    // warm: every item seen once by throwaway users
    for b in 0..(ITEMS / 500) {
        let batch: Vec<RawEvent> = (0..500)
            .map(|n| {
                let i = b * 500 + n;
                let mut e = events(1_000_000 + i / 100, ts).swap_remove(0);
                e.event_id = format!("seed-{i}");
                e.item_id = format!("item-{i}");
                e
            })
            .collect();
        engine.ingest(batch).await?;
    }
    engine.checkpoint().await?;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let b0 = live();
    for chunk in (0..USERS).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<RawEvent> = chunk.iter().flat_map(|&u| events(u, ts)).collect();
        engine.ingest(batch).await?;
    }
    let b1 = live();
    let engine_label = if signals_on {
        "engine (signals on)"
    } else {
        "engine (signals off)"
    };
    report(engine_label, b0, b1);
    engine.checkpoint().await?;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    report("engine after a checkpoint and 3 s", b0, live());
    // More events (30k, the first 6,000 users again), enough for the log's memtable to
    // be flushed: fjall drops a flushed memtable's old version only after a later flush.
    for chunk in (0..6_000).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<RawEvent> = chunk
            .iter()
            .flat_map(|&u| {
                let mut again = events(u, ts + 1_000);
                for e in &mut again {
                    e.event_id.push_str("-again");
                }
                again
            })
            .collect();
        engine.ingest(batch).await?;
    }
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    report("engine after 30k more events and 3 s", b0, live());

    // Components alone.
    let mf = reflex_models::OnlineMf::new(config.model.clone())?;
    let users: Vec<UserId> = (0..USERS)
        .map(|u| UserId::parse(&format!("user-{u}"), "user_id"))
        .collect::<reflex_core::Result<_>>()?;
    for i in 0..ITEMS as u32 {
        use reflex_core::OnlineModel;
        mf.observe(&Observation {
            user: &users[0],
            item: i,
            weight: 1.0,
            timestamp_ms: ts,
        });
    }
    let m0 = live();
    for (u, user) in users.iter().enumerate() {
        use reflex_core::OnlineModel;
        for n in 0..EVENTS {
            mf.observe(&Observation {
                user,
                item: ((u * 7919 + n * 104729) % ITEMS) as u32,
                weight: 1.0,
                timestamp_ms: ts + n as i64,
            });
        }
    }
    report("OnlineMf alone", m0, live());
    drop(mf);
    let sig = reflex_models::Signals::new(config.signals.clone())?;
    let s0 = live();
    for (u, user) in users.iter().enumerate() {
        use reflex_core::SignalModel;
        for n in 0..EVENTS {
            let k = match kind(n) {
                RawKind::Purchase => EventKind::Purchase,
                RawKind::Click => EventKind::Click,
                RawKind::AddToCart => EventKind::AddToCart,
                _ => EventKind::View,
            };
            sig.observe(&SignalEvent {
                user,
                item: ((u * 7919 + n * 104729) % ITEMS) as u32,
                kind: &k,
                timestamp_ms: ts + n as i64,
                learn: true,
            });
        }
    }
    report("Signals alone", s0, live());
    drop(sig);
    println!(
        "sizes: Profile {} Interaction {} UserId {} EventKind {}",
        std::mem::size_of::<reflex_core::Profile>(),
        std::mem::size_of::<reflex_core::profile::Interaction>(),
        std::mem::size_of::<UserId>(),
        std::mem::size_of::<EventKind>()
    );
    drop(engine);
    Ok(())
}
