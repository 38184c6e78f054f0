//! Micro-benchmarks of the model and retrieval: one online update (`OnlineMf::observe`),
//! fold-in of a user vector from 10 and 50 history entries (`OnlineModel::user_vector`),
//! and top-10 retrieval, exact (`ExactRetriever::search`, plain and through the 8-bit scan
//! copy) and approximate (`AnnRetriever::search`: the usearch graph, the head and
//! rescoring, at the default settings), over 10k and 100k items, and 1M when
//! `REFLEX_BENCH_1M` is set (its setup trains a million items and takes a while); and
//! the behaviour signals' candidates for a user with 50 recent items, without and with
//! the refit's item-to-item weights (`SignalModel::candidates`).
//!
//! All at the default configuration (64 factors, 16 sampled negatives). Run with
//! `cargo bench -p reflex-models`; figures and method are in BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use reflex_core::{
    EventKind, HistoryEntry, ItemIdx, Observation, OnlineModel, Retriever, SignalEvent,
    SignalModel, UserId,
};
use reflex_models::{
    AnnConfig, AnnRetriever, ExactRetriever, MfConfig, NegativeSampling, OnlineMf, Signals,
    SignalsConfig,
};

fn user(n: usize) -> UserId {
    UserId::parse(&format!("user-{n:07}"), "user_id")
        .unwrap_or_else(|e| panic!("benchmark user id: {e}"))
}

/// A model that has seen every one of `items` items, through 1000 users.
fn trained(items: usize) -> Arc<OnlineMf> {
    trained_with(items, MfConfig::default())
}

/// [`trained`] with `config`.
fn trained_with(items: usize, config: MfConfig) -> Arc<OnlineMf> {
    let model = OnlineMf::new(config).unwrap_or_else(|e| panic!("benchmark model config: {e}"));
    let users: Vec<UserId> = (0..1000).map(user).collect();
    for i in 0..items {
        model.observe(&Observation {
            user: &users[i % users.len()],
            item: i as ItemIdx,
            weight: 1.0,
            timestamp_ms: i as i64,
        });
    }
    model.refresh();
    model
}

/// A history of `len` entries over popular-ish items, most recent first.
fn history(len: usize, items: usize) -> Vec<HistoryEntry> {
    (0..len)
        .map(|i| HistoryEntry {
            item: ((i * 7919) % items) as ItemIdx,
            weight: if i % 5 == 0 { 4.0 } else { 1.0 },
            timestamp_ms: 1_000_000 - (i as i64) * 30_000,
        })
        .collect()
}

/// One event learnt, with the default Gram negatives and with 16 uniform samples.
fn observe(c: &mut Criterion) {
    let items = 10_000;
    let users: Vec<UserId> = (0..10_000).map(user).collect();
    let uniform = MfConfig {
        negative_sampling: NegativeSampling::Uniform,
        ..MfConfig::default()
    };
    for (name, config) in [
        ("mf_observe_10k_items", MfConfig::default()),
        ("mf_observe_10k_items_uniform16", uniform),
    ] {
        let model = trained_with(items, config);
        let mut n = 0usize;
        c.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                model.observe(black_box(&Observation {
                    user: &users[n % users.len()],
                    item: ((n * 104_729) % items) as ItemIdx,
                    weight: 2.0,
                    timestamp_ms: n as i64,
                }))
            })
        });
    }
}

fn fold_in(c: &mut Criterion) {
    let items = 10_000;
    let model = trained(items);
    let mut group = c.benchmark_group("fold_in_user_vector");
    for len in [10, 50] {
        let h = history(len, items);
        group.bench_function(format!("{len}_entries"), |b| {
            b.iter(|| model.user_vector(black_box(&h)))
        });
    }
    group.finish();
}

fn search(c: &mut Criterion) {
    let mut sizes = vec![10_000, 100_000];
    if std::env::var_os("REFLEX_BENCH_1M").is_some() {
        sizes.push(1_000_000);
    }
    let mut group = c.benchmark_group("exact_search_k10");
    for items in sizes {
        let model = trained(items);
        let retriever = ExactRetriever::for_model(&model);
        let query = model
            .user_vector(&history(20, items))
            .unwrap_or_else(|| panic!("fold-in of a known history gave no vector"));
        group.sample_size(if items >= 1_000_000 { 10 } else { 20 });
        group.bench_function(format!("{items}_items"), |b| {
            b.iter(|| retriever.search(black_box(&query), 10, &|_| true))
        });
        // The same scan through the 8-bit copy (what the server uses below the ANN
        // threshold); the copy is built once up front, as the refresh thread would.
        let copied =
            ExactRetriever::with_scan_copy(model.item_factors().clone(), Duration::from_secs(3600));
        copied.refresh_copy();
        group.bench_function(format!("{items}_items_scan_copy"), |b| {
            b.iter(|| copied.search(black_box(&query), 10, &|_| true))
        });
        // The graph, built from the same vectors before timing.
        let ann = AnnRetriever::for_model(&model, AnnConfig::default())
            .unwrap_or_else(|e| panic!("building the ANN retriever: {e}"));
        ann.flush()
            .unwrap_or_else(|e| panic!("indexing {items} items: {e}"));
        ann.refresh_head();
        group.bench_function(format!("{items}_items_ann"), |b| {
            b.iter(|| ann.search(black_box(&query), 10, &|_| true))
        });
    }
    group.finish();
}

/// The signals' candidates for one user with 50 recent items, over 10k and then 100k
/// items that 20k users viewed 20 at a time, without and then with item-to-item weights
/// for the 2,000 most viewed items (100 targets each among them, as a refit fits them).
fn signal_candidates(c: &mut Criterion) {
    let mut group = c.benchmark_group("signal_candidates");
    for items in [10_000usize, 100_000] {
        let signals = Signals::new(SignalsConfig::default())
            .unwrap_or_else(|e| panic!("benchmark signals config: {e}"));
        // Popular items are the low numbers: item = (u · 7919 + k · k · 31) mod (a skewed
        // range).
        for u in 0..20_000usize {
            let who = user(u);
            for k in 0..20usize {
                let range = if k % 2 == 0 { 2_000 } else { items };
                signals.observe(&SignalEvent {
                    user: &who,
                    item: ((u * 7919 + k * k * 31) % range) as ItemIdx,
                    kind: &EventKind::View,
                    timestamp_ms: (u * 100 + k) as i64,
                    learn: true,
                });
            }
        }
        let recent: Vec<ItemIdx> = history(50, 2_000).iter().map(|h| h.item).collect();
        let me = user(20_000);
        let size = format!("{}k", items / 1000);
        group.bench_function(format!("counts_only/{size}"), |b| {
            b.iter(|| signals.candidates(&me, black_box(&recent), 10, &|_| true))
        });
        let rows = (0..2_000u32)
            .map(|s| {
                let targets = (0..100u32)
                    .map(|t| ((s * 31 + t * 17) % 2_000, 1.0 / (t + 1) as f32))
                    .collect();
                (s, targets)
            })
            .collect();
        signals.install_item_item(rows);
        group.bench_function(format!("with_item_item/{size}"), |b| {
            b.iter(|| signals.candidates(&me, black_box(&recent), 10, &|_| true))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = observe, fold_in, search, signal_candidates
}
criterion_main!(benches);
