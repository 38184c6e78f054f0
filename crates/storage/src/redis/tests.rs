//! The conformance suite against a real `redis-server` (started per test on a free port),
//! and what only a networked store must show: key layout, TTL on every key, recovery
//! after Redis restarts, `UNAVAILABLE` while it is down.

use std::sync::Arc;
use std::time::Duration;

use reflex_core::{ErrorCode, EventKind, EventSink, ProfilePolicy, ProfileStore, ProfileUpdate};

use super::*;
use crate::conformance::{self, event, user, view};
use crate::testing::RedisServer;

/// A fresh server and a store on it, or `None` (after saying so) without `redis-server`.
async fn fresh_with(
    config: impl FnOnce(&mut RedisConfig),
) -> Option<(RedisServer, Arc<RedisStore>)> {
    let Some(server) = RedisServer::start() else {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return None;
    };
    let mut c = RedisConfig::new(server.url(), "test");
    config(&mut c);
    let store = RedisStore::connect(c, ProfilePolicy::default())
        .await
        .unwrap();
    Some((server, store))
}

async fn fresh() -> Option<(RedisServer, Arc<RedisStore>)> {
    fresh_with(|_| {}).await
}

mod conformance_suite {
    use super::*;

    #[tokio::test]
    async fn sink_assigns_increasing_positions() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::sink_assigns_increasing_positions(&*store)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn sink_dedupes_within_and_across_calls() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::sink_dedupes_within_and_across_calls(&*store)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn sink_reads_in_pages() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::sink_reads_in_pages(&*store).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sink_records_each_id_once_under_concurrency() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::sink_records_each_id_once_under_concurrency(store)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn sink_forgets_ids_after_the_window() {
        let Some((_server, store)) = fresh_with(|c| c.dedupe_window_ms = 50).await else {
            return;
        };
        conformance::sink_forgets_ids_after_the_window(&*store, Duration::from_millis(50))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn profiles_apply_get_erase() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::profiles_apply_get_erase(&*store)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn profiles_expire_after_ttl() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::profiles_expire_after_ttl(&*store, &ProfilePolicy::default())
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn profiles_are_atomic_per_user() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::profiles_are_atomic_per_user(store)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn profiles_apply_each_position_once() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::profiles_apply_each_position_once(&*store)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn profiles_match_the_reference() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::profiles_match_the_reference(&*store, &ProfilePolicy::default())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn models_round_trip() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::models_round_trip(&*store).await.unwrap();
    }

    #[tokio::test]
    async fn lease_is_exclusive() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::lease_is_exclusive(&*store).await.unwrap();
    }

    #[tokio::test]
    async fn catalog_round_trips() {
        let Some((_server, store)) = fresh().await else {
            return;
        };
        conformance::catalog_round_trips(&*store).await.unwrap();
    }
}

#[tokio::test]
async fn every_profile_key_carries_the_ttl_and_keys_share_the_users_slot() {
    let Some((server, store)) = fresh().await else {
        return;
    };
    let e = event("ttl-1", "ttl-user", "shoe", EventKind::Purchase, 1_000);
    let now = reflex_core::types::now_ms();
    store
        .apply(&[ProfileUpdate {
            seq: 1,
            event: &e,
            weight: 1.0,
            now_ms: now,
        }])
        .await
        .unwrap();
    let client = fred::prelude::Builder::from_config(
        fred::prelude::Config::from_url(&server.url()).unwrap(),
    )
    .build()
    .unwrap();
    client.init().await.unwrap();
    let ttl = ProfilePolicy::default().ttl_ms;
    for key in store.user_keys(&user("ttl-user")) {
        assert!(key.ends_with("{ttl-user}"), "{key} is hash-tagged by user");
        let left: i64 = client.pttl(&key).await.unwrap();
        assert!(
            left > ttl - 60_000 && left <= ttl,
            "{key} expires in {left} ms"
        );
    }
}

#[tokio::test]
async fn the_log_is_bounded_by_length_and_by_age() {
    let Some((_server, store)) = fresh_with(|c| {
        c.log_max_len = 100;
        c.log_max_age_ms = 60_000;
    })
    .await
    else {
        return;
    };
    // 300 records: length trimming keeps about the last 100 (approximate trimming keeps
    // whole internal nodes, so possibly a few more).
    for chunk in 0..3 {
        let records: Vec<_> = (0..100)
            .map(|i| view(&format!("len-{chunk}-{i}"), "len-u"))
            .collect();
        store.append(&records).await.unwrap();
    }
    let kept = store.read(0, 1000).await.unwrap();
    assert!(kept.len() < 300 && kept.len() >= 100, "{} kept", kept.len());
    assert_eq!(kept.last().map(|(s, _)| *s), Some(300));

    // Old records (by ingest time) go at maintenance; young ones stay.
    let old_time = reflex_core::types::now_ms() - 120_000;
    let old: Vec<_> = (0..10)
        .map(|i| LogRecord::Event {
            event: event(&format!("age-old-{i}"), "age-u", "x", EventKind::View, 1),
            filtered: false,
            ingested_ms: old_time,
        })
        .collect();
    let store2 = RedisStore::connect(
        RedisConfig {
            prefix: "age".into(),
            log_max_age_ms: 60_000,
            ..store.config().clone()
        },
        ProfilePolicy::default(),
    )
    .await
    .unwrap();
    store2.append(&old).await.unwrap();
    store2
        .append(
            &(0..5)
                .map(|i| view(&format!("age-new-{i}"), "age-u"))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    store2.maintain().await.unwrap();
    let left = store2.read(0, 100).await.unwrap();
    assert_eq!(
        left.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [11, 12, 13, 14, 15]
    );
}

#[tokio::test]
async fn unavailable_while_redis_is_down_and_fine_when_it_returns() {
    let Some((mut server, store)) = fresh_with(|c| c.command_timeout_ms = 500).await else {
        return;
    };
    store.append(&[view("down-1", "down-u")]).await.unwrap();
    server.stop();
    let err = store.append(&[view("down-2", "down-u")]).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    let err = ProfileStore::get(&*store, &user("down-u"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");

    server.restart();
    // The client reconnects by itself (and reloads its scripts into the new server).
    let mut appended = None;
    for _ in 0..50 {
        match store.append(&[view("down-2", "down-u")]).await {
            Ok(a) => {
                appended = Some(a);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(
        matches!(appended.as_deref(), Some([Appended::At(_)])),
        "{appended:?}"
    );
}

#[tokio::test]
async fn connecting_to_nothing_is_unavailable_not_a_hang() {
    let config = RedisConfig {
        connect_timeout_ms: 300,
        ..RedisConfig::new("redis://127.0.0.1:1", "nothing")
    };
    let started = std::time::Instant::now();
    let err = RedisStore::connect(config, ProfilePolicy::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn catalog_changes_bump_the_version_replicas_watch() {
    let Some((_server, store)) = fresh().await else {
        return;
    };
    conformance::catalog_version_tracks_changes(&*store)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unconfirmed_profile_update_stays_pending_until_applied() {
    let Some((_server, store)) = fresh().await else {
        return;
    };
    let records = vec![view("pend-1", "pend-u"), view("pend-2", "pend-u")];
    let appended = store.append(&records).await.unwrap();
    let seqs: Vec<Seq> = appended
        .iter()
        .filter_map(|a| match a {
            Appended::At(s) => Some(*s),
            Appended::Duplicate => None,
        })
        .collect();
    // As if the writer died before applying: both are pending (grace 0).
    assert_eq!(store.unapplied(-1_000, 10).await.unwrap(), seqs);
    assert!(
        store.unapplied(60_000, 10).await.unwrap().is_empty(),
        "not yet old enough"
    );
    let LogRecord::Event { event: e1, .. } = &records[0] else {
        unreachable!()
    };
    store
        .apply(&[ProfileUpdate {
            seq: seqs[0],
            event: e1,
            weight: 1.0,
            now_ms: reflex_core::types::now_ms(),
        }])
        .await
        .unwrap();
    assert_eq!(store.unapplied(-1_000, 10).await.unwrap(), [seqs[1]]);
}
