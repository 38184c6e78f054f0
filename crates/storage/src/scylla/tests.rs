//! The conformance suite against a live Scylla (or Cassandra) cluster, each test in a
//! keyspace of its own, and what only the Scylla store must show. Set
//! `REFLEX_TEST_SCYLLA=host:port` to run them; without it every test says it was skipped
//! and passes. `connecting_to_nothing_is_unavailable_not_a_hang` needs no server.

use std::sync::Arc;
use std::time::Duration;

use reflex_core::{ErrorCode, EventKind, EventSink, ProfilePolicy, ProfileStore, ProfileUpdate};

use super::*;
use crate::conformance::{self, event, user, view};

const SKIPPED: &str =
    "SKIPPED: set REFLEX_TEST_SCYLLA=host:port to run the Scylla conformance suite";

/// A store in a fresh keyspace of the cluster `REFLEX_TEST_SCYLLA` names, or `None`
/// (after saying so) without it.
async fn fresh_with(config: impl FnOnce(&mut ScyllaConfig)) -> Option<Arc<ScyllaStore>> {
    let Some(contact) = std::env::var("REFLEX_TEST_SCYLLA")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        eprintln!("{SKIPPED}");
        return None;
    };
    let keyspace = format!("reflex_test_{:016x}", fresh_stamp() as u64);
    let mut c = ScyllaConfig {
        request_timeout_ms: 10_000,
        connect_timeout_ms: 10_000,
        ..ScyllaConfig::new(contact, keyspace)
    };
    config(&mut c);
    Some(
        ScyllaStore::connect(c, ProfilePolicy::default())
            .await
            .unwrap(),
    )
}

async fn fresh() -> Option<Arc<ScyllaStore>> {
    fresh_with(|_| {}).await
}

mod conformance_suite {
    use super::*;

    #[tokio::test]
    async fn sink_assigns_increasing_positions() {
        let Some(store) = fresh().await else {
            return;
        };
        conformance::sink_assigns_increasing_positions(&*store)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn sink_dedupes_within_and_across_calls() {
        let Some(store) = fresh().await else {
            return;
        };
        conformance::sink_dedupes_within_and_across_calls(&*store)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn sink_reads_in_pages() {
        let Some(store) = fresh().await else {
            return;
        };
        conformance::sink_reads_in_pages(&*store).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sink_records_each_id_once_under_concurrency() {
        let Some(store) = fresh().await else {
            return;
        };
        conformance::sink_records_each_id_once_under_concurrency(store)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn sink_forgets_ids_after_the_window() {
        let Some(store) = fresh_with(|c| c.dedupe_window_ms = 50).await else {
            return;
        };
        conformance::sink_forgets_ids_after_the_window(&*store, Duration::from_millis(50))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn profiles_apply_get_erase() {
        let Some(store) = fresh().await else {
            return;
        };
        conformance::profiles_apply_get_erase(&*store)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn profiles_expire_after_ttl() {
        let Some(store) = fresh().await else {
            return;
        };
        conformance::profiles_expire_after_ttl(&*store, &ProfilePolicy::default())
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn profiles_are_atomic_per_user() {
        let Some(store) = fresh().await else {
            return;
        };
        conformance::profiles_are_atomic_per_user(store)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn profiles_match_the_reference() {
        let Some(store) = fresh().await else {
            return;
        };
        conformance::profiles_match_the_reference(&*store, &ProfilePolicy::default())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn models_round_trip() {
        let Some(store) = fresh().await else {
            return;
        };
        conformance::models_round_trip(&*store).await.unwrap();
    }

    #[tokio::test]
    async fn lease_is_exclusive() {
        let Some(store) = fresh().await else {
            return;
        };
        conformance::lease_is_exclusive(&*store).await.unwrap();
    }

    #[tokio::test]
    async fn catalog_round_trips() {
        let Some(store) = fresh().await else {
            return;
        };
        conformance::catalog_round_trips(&*store).await.unwrap();
    }
}

#[tokio::test]
async fn profile_rows_carry_the_ttl_left_until_touched_plus_ttl() {
    let Some(store) = fresh().await else {
        return;
    };
    let e = event("ttl-1", "ttl-user", "shoe", EventKind::Purchase, 1_000);
    let now = now_ms();
    store
        .apply(&[ProfileUpdate {
            seq: 1,
            event: &e,
            weight: 1.0,
            now_ms: now,
        }])
        .await
        .unwrap();
    let result = store
        .session
        .query_unpaged(
            format!(
                "SELECT TTL(version), TTL(recent) FROM {}.profiles WHERE user_id = ?",
                store.config().keyspace
            ),
            ("ttl-user",),
        )
        .await
        .unwrap();
    let (a, b): (Option<i32>, Option<i32>) =
        result.into_rows_result().unwrap().first_row().unwrap();
    let ttl_s = (ProfilePolicy::default().ttl_ms / 1000) as i32;
    for left in [a, b] {
        let left = left.unwrap();
        assert!(
            left > ttl_s - 60 && left <= ttl_s + 1,
            "expires in {left} s"
        );
    }
}

#[tokio::test]
async fn the_log_spans_buckets_and_the_schema_survives_a_reconnect() {
    let Some(store) = fresh().await else {
        return;
    };
    // Move the counter close to a bucket boundary so one append spans two partitions.
    store
        .session
        .query_unpaged(
            format!(
                "INSERT INTO {}.sequences (name, value, owner) VALUES ('log', ?, 0) IF NOT EXISTS",
                store.config().keyspace
            ),
            ((LOG_BUCKET - 3) as i64,),
        )
        .await
        .unwrap();
    let records: Vec<LogRecord> = (0..7)
        .map(|i| view(&format!("span-{i}"), "span-u"))
        .collect();
    let appended = store.append(&records).await.unwrap();
    assert_eq!(appended[0], Appended::At(LOG_BUCKET - 2));
    let read = store.read(LOG_BUCKET - 3, 100).await.unwrap();
    assert_eq!(read.len(), 7);
    assert_eq!(
        read.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
        records
    );

    // Connecting again finds the schema in place and the same data.
    let again = ScyllaStore::connect(store.config().clone(), ProfilePolicy::default())
        .await
        .unwrap();
    assert_eq!(again.last_seq().await.unwrap(), LOG_BUCKET + 4);
}

#[tokio::test]
async fn catalog_changes_bump_the_version_replicas_watch() {
    let Some(store) = fresh().await else {
        return;
    };
    conformance::catalog_version_tracks_changes(&*store)
        .await
        .unwrap();
}

#[tokio::test]
async fn erased_profiles_start_again_at_version_one() {
    let Some(store) = fresh().await else {
        return;
    };
    let apply = |id: &'static str| {
        let store = Arc::clone(&store);
        async move {
            let e = event(id, "again-u", "x", EventKind::View, 1);
            store
                .apply(&[ProfileUpdate {
                    seq: 1,
                    event: &e,
                    weight: 1.0,
                    now_ms: now_ms(),
                }])
                .await
                .unwrap();
        }
    };
    apply("again-1").await;
    apply("again-2").await;
    assert!(store.erase(&user("again-u")).await.unwrap());
    apply("again-3").await;
    let p = ProfileStore::get(&*store, &user("again-u"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.version, 1);
}

#[tokio::test]
async fn connecting_to_nothing_is_unavailable_not_a_hang() {
    let config = ScyllaConfig {
        connect_timeout_ms: 300,
        ..ScyllaConfig::new("127.0.0.1:1", "nothing")
    };
    let started = std::time::Instant::now();
    let err = ScyllaStore::connect(config, ProfilePolicy::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    assert!(err.to_string().contains("connecting to scylla"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
