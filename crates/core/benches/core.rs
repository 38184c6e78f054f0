//! Micro-benchmarks of the core's per-event work: validating a raw event at the edge and
//! applying an accepted event to an in-memory profile.
//!
//! Run with `cargo bench -p reflex-core`; figures and method are in BENCHMARKS.md.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use reflex_core::types::{EventLimits, RawKind, now_ms};
use reflex_core::{Profile, ProfilePolicy, RawEvent, UserId};

/// An event as the gRPC layer hands it over: ids, kind, time, a price and two context
/// entries, the shape the load generator sends.
fn raw(n: u64, now: i64) -> RawEvent {
    let mut context = BTreeMap::new();
    context.insert("device".to_string(), "mobile".to_string());
    context.insert("channel".to_string(), "web".to_string());
    RawEvent {
        event_id: format!("run-s0-{n}"),
        user_id: format!("user-{:07}", n % 100_000),
        item_id: format!("item-{:07}", n % 10_000),
        kind: Some(RawKind::Purchase),
        timestamp_ms: Some(now),
        value: Some(19.99),
        context,
        ..RawEvent::default()
    }
}

fn validation(c: &mut Criterion) {
    let limits = EventLimits::default();
    let now = now_ms();
    let event = raw(42, now);
    // Validation consumes the raw event, so each iteration gets a fresh clone (not timed).
    c.bench_function("validate_event", |b| {
        b.iter_batched(
            || event.clone(),
            |raw| black_box(raw.validate(&limits, now)),
            BatchSize::SmallInput,
        )
    });
}

fn profile_apply(c: &mut Criterion) {
    let policy = ProfilePolicy::default();
    let now = now_ms();
    let limits = EventLimits::default();
    let event = raw(7, now)
        .validate(&limits, now)
        .unwrap_or_else(|e| panic!("the benchmark event is invalid: {e}"));
    let user = UserId::parse("user-0000007", "user_id")
        .unwrap_or_else(|e| panic!("the benchmark user id is invalid: {e}"));
    // A profile at its steady state: the recent list full.
    let mut profile = Profile::new(user);
    for _ in 0..policy.max_recent {
        profile.apply(&event, 8.0, &policy, now);
    }
    c.bench_function("profile_apply_full_recent_list", |b| {
        b.iter(|| profile.apply(black_box(&event), 8.0, &policy, now))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = validation, profile_apply
}
criterion_main!(benches);
