//! Model versions through the API: snapshots, rollback while recommendations keep being
//! served, and restarts that start from the newest version instead of the whole log.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use reflex_server::proto;
use reflex_server::proto::EventKind::{Purchase, View};
use reflex_server::proto::model_service_client::ModelServiceClient;
use tonic::transport::Channel;

use crate::recommend::{CATEGORIES, PER_CATEGORY, train};
use crate::support::*;

/// Many shoppers who view books and then buy toys: moves the books' and toys' vectors.
async fn poison(channel: &Channel) {
    let mut stream = EventStream::open(channel.clone()).await;
    let mut batch = Vec::new();
    for u in 0..150 {
        for e in 0..6 {
            let (item, kind) = if e % 2 == 0 {
                (format!("books-{}", (u + e) % PER_CATEGORY), View)
            } else {
                (format!("toys-{}", (u * 3 + e) % PER_CATEGORY), Purchase)
            };
            batch.push(event(
                &format!("p-{u}-{e}"),
                &format!("mixer-{u}"),
                &item,
                kind,
            ));
        }
    }
    for chunk in batch.chunks(300) {
        let ack = stream.round_trip(chunk.to_vec()).await;
        assert_eq!(ack.accepted as usize, chunk.len());
    }
}

#[tokio::test]
async fn rollback_restores_the_model_while_recommendations_keep_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start(dir.path());
    let channel = server.channel().await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    train(&channel).await;

    let v1 = snapshot(&channel, "before the campaign").await;
    assert_eq!(v1.reason, "before the campaign");
    assert!(v1.items as usize >= CATEGORIES.len() * PER_CATEGORY);
    assert!(v1.log_seq > 0 && v1.bytes > 0);
    let neighbours_v1 = similar(&channel, "books-1", 6).await;

    poison(&channel).await;
    let poisoned = similar(&channel, "books-1", 6).await;
    assert_ne!(
        poisoned, neighbours_v1,
        "the campaign moved the book vectors"
    );

    // Recommendations are served throughout the rollback.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let background = {
        let (channel, stop, served) = (channel.clone(), stop.clone(), served.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = recommend(&channel, "fan-2", 8).await;
                assert_eq!(r.items.len(), 8);
                served.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let rolled = ModelServiceClient::new(channel.clone())
        .rollback(proto::RollbackRequest { version: v1.id })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    background.await.unwrap();
    assert!(served.load(Ordering::Relaxed) > 2);

    assert_eq!(rolled.reason, format!("rollback to {}", v1.id));
    assert!(rolled.id > v1.id);
    assert_eq!(similar(&channel, "books-1", 6).await, neighbours_v1);
    let listed = model_versions(&channel).await;
    assert_eq!(
        listed.versions.iter().map(|v| v.id).collect::<Vec<_>>(),
        [v1.id, rolled.id]
    );
    assert_eq!(listed.serving, format!("online-mf/v{}", rolled.id));
    assert_eq!(
        recommend(&channel, "fan-2", 3).await.model_version,
        listed.serving
    );

    let missing = ModelServiceClient::new(channel.clone())
        .rollback(proto::RollbackRequest { version: 999 })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");
}

#[tokio::test]
async fn a_restart_starts_from_the_shutdown_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Reflex::start(dir.path());
    let channel = server.channel().await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    train(&channel).await;
    let before = similar(&channel, "garden-2", 6).await;
    drop(channel);
    server.terminate().await;

    let server = Reflex::start(dir.path());
    let channel = server.channel().await;
    let listed = model_versions(&channel).await;
    let last = listed.versions.last().expect("a shutdown snapshot");
    assert_eq!(last.reason, "shutdown");
    assert_eq!(listed.serving, format!("online-mf/v{}", last.id));
    // Nothing came after the snapshot, so the model is exactly what it was.
    assert_eq!(similar(&channel, "garden-2", 6).await, before);

    // And it keeps learning on top of it.
    let ack = EventStream::open(channel.clone())
        .await
        .round_trip(vec![event("after-1", "late", "garden-2", View)])
        .await;
    assert_eq!(ack.accepted, 1);
    assert_ne!(similar(&channel, "garden-2", 6).await, before);
}

async fn quality(channel: &Channel) -> proto::GetQualityResponse {
    ModelServiceClient::new(channel.clone())
        .get_quality(proto::GetQualityRequest {})
        .await
        .expect("get quality")
        .into_inner()
}

fn decayed_hr10(q: &proto::GetQualityResponse) -> f64 {
    q.all
        .and_then(|p| p.decayed)
        .map_or(0.0, |f| f.hit_rate_at_10)
}

#[tokio::test]
async fn the_automatic_rollback_fires_on_a_deliberately_poisoned_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start_with(
        dir.path(),
        &[
            ("REFLEX_QUALITY__SAMPLE_RATIO", "1"),
            ("REFLEX_QUALITY__HOLDOUT_RATIO", "0.1"),
            ("REFLEX_QUALITY__HALF_LIFE_EVENTS", "40"),
            ("REFLEX_QUALITY__MIN_EVENTS", "120"),
            ("REFLEX_QUALITY__MAX_SCORED_PER_SEC", "1000000"),
            // The learner acts every 100 ms.
            ("REFLEX_VERSIONS__LEASE_TTL_MS", "300"),
            (
                "REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC",
                "100000",
            ),
        ],
    );
    let channel = server.channel().await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    train(&channel).await;

    // Every training event is scored (sample ratio 1) a moment after its ack.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let q = quality(&channel).await;
        if q.events_scored + q.samples_cold + q.samples_dropped >= 80 * 16 {
            assert!(q.holdout.unwrap().events_scored > 0, "{q:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "scoring stalled: {q:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let good = snapshot(&channel, "trained").await;
    let q = quality(&channel).await;
    let baseline = q.baseline.expect("the snapshot recorded quality: {q:?}");
    assert_eq!(baseline.version, good.id);
    assert!(
        baseline.hit_rate_at_10 > 0.5,
        "the category structure is learnt: {q:?}"
    );
    assert!(q.auto_rollback_armed);
    let recorded = good.quality.expect("the version carries its quality");
    assert!((recorded.all_users.unwrap().hit_rate_at_10 - baseline.hit_rate_at_10).abs() < 1e-9);
    assert!(!recorded.degraded);

    // Recommendations are served throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let background = {
        let (channel, stop, served) = (channel.clone(), stop.clone(), served.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = recommend(&channel, "fan-2", 8).await;
                assert_eq!(r.items.len(), 8);
                served.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };

    // The loyal fans suddenly wander over every category at random: history no longer
    // predicts the next item, and the model learns noise.
    let mut stream = EventStream::open(channel.clone()).await;
    let mut lowest_seen = f64::MAX;
    let mut below_seen = 0;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(8);
    let mut round = 0usize;
    let rolled = loop {
        let batch: Vec<_> = (0..100)
            .map(|i| {
                let n = round * 100 + i;
                let u = (n * 31) % 80;
                let mix = n.wrapping_mul(2_654_435_761) >> 7;
                let item = format!(
                    "{}-{}",
                    CATEGORIES[mix % CATEGORIES.len()],
                    (mix / 4) % PER_CATEGORY
                );
                event(&format!("noise-{n}"), &format!("fan-{u}"), &item, View)
            })
            .collect();
        let ack = stream.round_trip(batch).await;
        assert_eq!(ack.accepted, 100);
        round += 1;
        let q = quality(&channel).await;
        lowest_seen = lowest_seen.min(decayed_hr10(&q));
        below_seen = below_seen.max(q.events_below);
        if let Some(v) = model_versions(&channel)
            .await
            .versions
            .into_iter()
            .find(|v| v.reason.starts_with("auto-rollback to "))
        {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no automatic rollback after {round} batches: {q:?}"
        );
    };
    // The stream stays bad: no second rollback (once per good version).
    for n in 0..300 {
        let ack = stream
            .round_trip(vec![event(
                &format!("more-noise-{n}"),
                &format!("fan-{}", n % 80),
                &format!("{}-{}", CATEGORIES[n % 3], (n * 5) % PER_CATEGORY),
                View,
            )])
            .await;
        assert_eq!(ack.accepted, 1);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    background.await.unwrap();
    assert!(served.load(Ordering::Relaxed) > 2);
    let autos = model_versions(&channel)
        .await
        .versions
        .iter()
        .filter(|v| v.reason.starts_with("auto-rollback"))
        .count();
    assert_eq!(autos, 1);

    // "auto-rollback to N: hr@10 X < 0.8 × Y over M events"
    let prefix = format!("auto-rollback to {}: hr@10 ", good.id);
    assert!(rolled.reason.starts_with(&prefix), "{}", rolled.reason);
    let figures: Vec<f64> = rolled.reason[prefix.len()..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|s| s.parse().ok())
        .collect();
    let [current, factor, base, span] = figures[..] else {
        panic!("figures in {:?}", rolled.reason)
    };
    assert_eq!(factor, 0.8);
    assert!(current < factor * base, "{}", rolled.reason);
    assert!(
        (base - baseline.hit_rate_at_10).abs() < 0.001,
        "{}",
        rolled.reason
    );
    assert!(span >= 120.0, "{}", rolled.reason);

    // GetQuality reported the drop on the way, and now compares with the rolled-back
    // version (which carries the good version's figure).
    assert!(lowest_seen < 0.8 * baseline.hit_rate_at_10, "{lowest_seen}");
    assert!(below_seen > 0);
    let after = quality(&channel).await;
    let now_baseline = after.baseline.expect("a baseline");
    assert_eq!(now_baseline.version, rolled.id);
    assert!((now_baseline.hit_rate_at_10 - baseline.hit_rate_at_10).abs() < 1e-9);
    assert!(!after.auto_rollback_armed, "fires once per good version");
    let listed = model_versions(&channel).await;
    assert_eq!(listed.serving, format!("online-mf/v{}", rolled.id));
    assert_eq!(recommend(&channel, "fan-2", 8).await.items.len(), 8);
    let metrics = scrape(&server).await;
    assert!(
        metrics.contains("reflex_model_rollbacks_total{trigger=\"auto\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "reflex_model_quality{metric=\"hr@10\",population=\"all\",window=\"cumulative\"}"
    ));
}

async fn refit(channel: &Channel, install_anyway: bool) -> proto::RefitResponse {
    ModelServiceClient::new(channel.clone())
        .refit(proto::RefitRequest { install_anyway })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_refit_is_judged_on_the_holdout_and_installed_only_when_it_ranks_better() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        // Half the shoppers are held out, so the judgement has users to rank.
        ("REFLEX_QUALITY__HOLDOUT_RATIO", "0.5"),
        ("REFLEX_REFIT__MIN_HOLDOUT_USERS", "10"),
        // No scheduled refit: only the ones this test asks for.
        ("REFLEX_REFIT__INTERVAL_MS", "0"),
        // A gain no fit reaches unless the running model ranks nothing.
        ("REFLEX_REFIT__MIN_GAIN", "1000"),
    ];
    let server = Reflex::start_with(dir.path(), &env);
    let channel = server.channel().await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    train(&channel).await;

    let judged = refit(&channel, false).await;
    assert!(
        judged.holdout_users >= 10,
        "about half of the 80 shoppers are held out: {judged:?}"
    );
    assert!(judged.events > 0 && judged.events < 80 * 16, "{judged:?}");
    assert!(
        judged.item_item_sources >= CATEGORIES.len() as u64,
        "every refit fits the item-to-item weights: {judged:?}"
    );
    assert!(
        judged.candidate_hit_rate_at_10 > 0.0,
        "ALS learns the loyal categories: {judged:?}"
    );
    let better = judged.candidate_hit_rate_at_10 > judged.running_hit_rate_at_10 * 1001.0;
    assert_eq!(
        judged.outcome,
        if better { "installed" } else { "kept" },
        "{judged:?}"
    );
    let before = ModelServiceClient::new(channel.clone())
        .list_versions(proto::ListVersionsRequest {})
        .await
        .unwrap()
        .into_inner();
    if !better {
        assert!(judged.version.is_none());
        assert!(
            before
                .versions
                .iter()
                .all(|v| !v.reason.starts_with("refit")),
            "nothing installed: {before:?}"
        );
    }

    let installed = refit(&channel, true).await;
    assert_eq!(installed.outcome, "installed", "{installed:?}");
    let version = installed.version.expect("an installed refit has a version");
    assert!(version.reason.starts_with("refit: als"), "{version:?}");
    let listed = ModelServiceClient::new(channel.clone())
        .list_versions(proto::ListVersionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.serving, format!("online-mf/v{}", version.id));
    // Online learning goes on from the fit: recommendations still follow a shopper.
    let r = recommend(&channel, "fan-2", 8).await;
    assert_eq!(r.items.len(), 8);

    // A restart loads it (it is the newest version).
    drop(channel);
    drop(server);
    let server = Reflex::start_with(dir.path(), &env);
    let channel = server.channel().await;
    let listed = ModelServiceClient::new(channel.clone())
        .list_versions(proto::ListVersionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let newest = listed.versions.last().expect("versions are kept");
    assert!(newest.id >= version.id, "{listed:?}");
    assert!(listed.serving.starts_with("online-mf/v"), "{listed:?}");
}
