//! Heap bytes per item, by component: a development probe, not part of the binary.
//!
//! Builds the server's engine in process (embedded store in a temporary directory,
//! 4 MiB memtables so their fixed budget stays small), upserts 100k catalog items (as
//! `reflex bench` makes them: an id, a title, one category), gives each its first event,
//! and prints the heap allocated per item after each step; then the online model and the
//! signals alone over the same items. Run it with
//! `cargo run --release -p reflex-server --example heap_per_item`.
//! The approximate index allocates in C++ (usearch), outside the counting allocator: its
//! share is not in these figures (`ann_recall` prints the index's own memory).

// The counting allocator (in `common/`) implements `GlobalAlloc`.
#![allow(unsafe_code)]
#[path = "common/counting.rs"]
mod counting;

use std::collections::BTreeMap;

use counting::live;
use reflex_core::{EventKind, Item, ItemId, Observation, RawEvent, RawKind, SignalEvent, UserId};

const ITEMS: usize = 100_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = reflex_server::config::Config::default();
    config.store.embedded = reflex_storage::EmbeddedConfig::in_dir(dir.path());
    config.store.embedded.memtable_bytes = 4 << 20;
    config.store.embedded.log_memtable_bytes = 4 << 20;
    config.engine.bot_filter.max_events_per_user_per_sec = 0;
    let metrics = reflex_server::metrics::Metrics::new()?;
    let engine = reflex_server::app::build_engine(&config, &metrics).await?;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let b0 = live();
    for c in 0..(ITEMS / 5000) {
        let items = (c * 5000..(c + 1) * 5000)
            .map(|i| {
                Ok(Item {
                    item_id: ItemId::parse(&format!("item-{i:07}"), "item_id")?,
                    title: format!("Item {i}"),
                    categories: vec![format!("cat-{:02}", i % 50)],
                    available: true,
                    embedding: Vec::new(),
                })
            })
            .collect::<reflex_core::Result<Vec<Item>>>()?;
        engine.upsert_items(items).await?;
    }
    let b1 = live();
    report("catalog upsert", b0, b1);
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    for b in 0..(ITEMS / 500) {
        let batch: Vec<RawEvent> = (0..500)
            .map(|n| {
                let i = b * 500 + n;
                RawEvent {
                    event_id: format!("seed-{i}"),
                    user_id: format!("u-{}", i / 100),
                    item_id: format!("item-{i:07}"),
                    kind: Some(RawKind::View),
                    custom_kind: String::new(),
                    weight: None,
                    timestamp_ms: Some(ts),
                    timestamp_nanos: None,
                    session_id: String::new(),
                    value: None,
                    context: BTreeMap::new(),
                }
            })
            .collect();
        engine.ingest(batch).await?;
    }
    let b2 = live();
    report("first event of each item", b1, b2);
    // Components alone.
    let mf = reflex_models::OnlineMf::new(config.model.clone())?;
    let user = UserId::parse("u", "user_id")?;
    let m0 = live();
    for i in 0..ITEMS as u32 {
        use reflex_core::OnlineModel;
        mf.observe(&Observation {
            user: &user,
            item: i,
            weight: 1.0,
            timestamp_ms: ts,
        });
    }
    report("OnlineMf alone", m0, live());
    drop(mf);
    let sig = reflex_models::Signals::new(config.signals.clone())?;
    let s0 = live();
    for i in 0..ITEMS as u32 {
        use reflex_core::SignalModel;
        let u = UserId::parse(&format!("u-{}", i / 100), "user_id")?;
        sig.observe(&SignalEvent {
            user: &u,
            item: i,
            kind: &EventKind::View,
            timestamp_ms: ts,
            learn: true,
        });
    }
    report("Signals alone (incl. 1000 users)", s0, live());
    drop(sig);
    drop(engine);
    Ok(())
}

fn report(what: &str, before: (isize, isize), after: (isize, isize)) {
    println!(
        "{what:40} {:8.1} B/item  {:5.2} allocs/item",
        (after.0 - before.0) as f64 / ITEMS as f64,
        (after.1 - before.1) as f64 / ITEMS as f64
    );
}
