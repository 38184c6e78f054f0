//! Engine-level checks of the continuous evaluation: the holdout never trains the model
//! but is served and scored like everyone else.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use reflex_core::quality::Sampler;
use reflex_core::types::{RawKind, now_ms};
use reflex_core::{Engine, ItemId, RawEvent, RequestFilter, SimilarSpace, UserId};
use reflex_server::app::build_engine;
use reflex_server::config::Config;
use reflex_server::metrics::Metrics;

fn view(id: String, user: &str, item: String, ts: i64) -> RawEvent {
    RawEvent {
        event_id: id,
        user_id: user.to_owned(),
        item_id: item,
        kind: Some(RawKind::View),
        timestamp_ms: Some(ts),
        ..RawEvent::default()
    }
}

async fn engine(
    dir: &std::path::Path,
    holdout: f64,
    sample: f64,
) -> (Config, std::sync::Arc<Engine>) {
    let mut config = Config::default();
    config.store.embedded.data_dir = dir.to_owned();
    config.quality.holdout_ratio = holdout;
    config.quality.sample_ratio = sample;
    config.quality.max_scored_per_sec = 100_000;
    let metrics = Metrics::new().unwrap();
    let engine = build_engine(&config, &metrics).await.unwrap();
    (config, engine)
}

/// Users `prefix-N` in (or out of) the holdout.
fn users(sampler: &Sampler, prefix: &str, held: bool, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|u| sampler.holdout(u) == held)
        .take(n)
        .collect()
}

#[tokio::test]
async fn holdout_users_events_do_not_train_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let (config, engine) = engine(dir.path(), 0.5, 0.0).await;
    let sampler = Sampler::new(&config.quality);
    let held = users(&sampler, "u", true, 4);
    let trained = users(&sampler, "u", false, 4);
    let base = now_ms() - 600_000;
    let mut batch = Vec::new();
    for (group, who) in [("held", &held), ("trained", &trained)] {
        for (u, user) in who.iter().enumerate() {
            for e in 0..10 {
                batch.push(view(
                    format!("{group}-{u}-{e}"),
                    user,
                    format!("{group}-item-{}", (u + e) % 5),
                    base + e as i64 * 1000,
                ));
            }
        }
    }
    let outcomes = engine.ingest(batch).await.unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| *o == reflex_core::EventOutcome::Accepted)
    );

    let none = RequestFilter::default();
    let item = |s: &str| ItemId::parse(s, "item").unwrap();
    // Items only held-out users touched were never learnt: the model has no vector.
    for i in 0..5 {
        let err = engine
            .similar_items(
                &item(&format!("held-item-{i}")),
                3,
                &none,
                SimilarSpace::Auto,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), reflex_core::ErrorCode::NotFound, "{err}");
    }
    let learnt = engine
        .similar_items(&item("trained-item-0"), 3, &none, SimilarSpace::Auto)
        .await
        .unwrap();
    assert!(!learnt.items.is_empty());

    // Their profiles still update, and they are served normally.
    let user = UserId::parse(&held[0], "user").unwrap();
    let profile = engine.profile(&user).await.unwrap().unwrap();
    assert_eq!(profile.counts[0], 10, "{profile:?}");
    let rec = engine.recommend(&user, 3, &none).await.unwrap();
    assert_eq!(rec.items.len(), 3);
}

#[tokio::test]
async fn sampled_events_are_scored_for_all_users_and_the_holdout() {
    let dir = tempfile::tempdir().unwrap();
    let (config, engine) = engine(dir.path(), 0.5, 1.0).await;
    let sampler = Sampler::new(&config.quality);
    let mut who = users(&sampler, "s", true, 3);
    who.extend(users(&sampler, "s", false, 3));
    let base = now_ms() - 600_000;
    for round in 0..8 {
        // Held-out user u and trained user u + 3 view the same item in each round, so every
        // item in a held-out user's history was learnt by the time the scorer reads it,
        // however soon that is (with items of their own, a scorer that kept up with the
        // rounds found two histories without a learnt item and counted them cold).
        let batch = who
            .iter()
            .enumerate()
            .map(|(u, user)| {
                view(
                    format!("s-{u}-{round}"),
                    user,
                    format!("item-{}", (u % 3 + round) % 6),
                    base + round as i64 * 1000,
                )
            })
            .collect();
        engine.ingest(batch).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let q = engine.quality();
        // Each user's first event has no earlier history: 6 cold, 42 scored.
        if q.all.scored + q.cold + q.dropped == 48 {
            assert_eq!(q.cold, 6, "{q:?}");
            assert!(
                q.holdout.scored > 0 && q.holdout.scored < q.all.scored,
                "{q:?}"
            );
            assert!((0.0..=1.0).contains(&q.all.cumulative.hit_rate_at_10));
            assert!(q.all.cumulative.recall_at_20 >= q.all.cumulative.hit_rate_at_10);
            assert!(q.baseline.is_none(), "no version recorded quality yet");
            break;
        }
        assert!(Instant::now() < deadline, "not all samples scored: {q:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = engine.snapshot("test", "me").await.unwrap();
    let q = v.quality.expect("the snapshot records quality");
    assert!(!q.degraded);
    assert_eq!(engine.quality().baseline.map(|b| b.version), Some(v.id));
}
