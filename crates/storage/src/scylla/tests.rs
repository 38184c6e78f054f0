//! The conformance suite against a live Scylla (or Cassandra) cluster, each test in a
//! keyspace of its own, and what only the Scylla store must show. Set
//! `REFLEX_TEST_SCYLLA=host:port` to run them; without it every test says it was skipped
//! and passes. `connecting_to_nothing_is_unavailable_not_a_hang` needs no server.

use std::sync::Arc;

use reflex_core::types::now_ms;
use reflex_core::{Appended, EventKind, EventSink, LogRecord, ProfilePolicy, ProfileStore};

use super::cql::LOG_BUCKET;
use super::store::fresh_stamp;
use super::*;
use crate::conformance::{self, Setup, event, update, user, view};
use crate::{Backend, StoreConfig, Stores};

const SKIPPED: &str =
    "SKIPPED: set REFLEX_TEST_SCYLLA=host:port to run the Scylla conformance suite";

/// Settings for a fresh keyspace of the cluster `REFLEX_TEST_SCYLLA` names, or `None`
/// (after saying so) without it.
fn fresh_config() -> Option<ScyllaConfig> {
    let Some(contact) = std::env::var("REFLEX_TEST_SCYLLA")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        eprintln!("{SKIPPED}");
        return None;
    };
    let keyspace = format!("reflex_test_{:016x}", fresh_stamp() as u64);
    Some(ScyllaConfig {
        request_timeout_ms: 10_000,
        connect_timeout_ms: 10_000,
        ..ScyllaConfig::new(contact, keyspace)
    })
}

/// A store in a fresh keyspace, or `None` (after saying so) without a cluster.
async fn fresh() -> Option<Arc<ScyllaStore>> {
    let config = fresh_config()?;
    Some(
        ScyllaStore::connect(config, ProfilePolicy::default())
            .await
            .unwrap(),
    )
}

/// The stores opened in a fresh keyspace as the server opens them, for a conformance
/// case as `setup` asks.
async fn for_case(setup: Setup) -> Option<((), Stores)> {
    let mut config = StoreConfig {
        backend: Backend::Scylla,
        scylla: fresh_config()?,
        ..StoreConfig::default()
    };
    if let Some(window) = setup.dedupe_window_ms {
        config.scylla.dedupe_window_ms = window;
    }
    Some(((), config.open(&setup.policy).await.unwrap()))
}

crate::conformance_suite! {
    backend: for_case,
    skip: {
        // Applies are not idempotent per log position: the store keeps no unconfirmed
        // updates (`unapplied`), so nothing ever applies a position twice.
        profiles_apply_each_position_once: "never re-applies: it keeps no unconfirmed updates",
    },
}

#[tokio::test]
async fn profile_rows_carry_the_ttl_left_until_touched_plus_ttl() {
    let Some(store) = fresh().await else {
        return;
    };
    let e = event("ttl-1", "ttl-user", "shoe", EventKind::Purchase, 1_000);
    let now = now_ms();
    store.apply(&[update(1, &e, now)]).await.unwrap();
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
async fn erased_profiles_start_again_at_version_one() {
    let Some(store) = fresh().await else {
        return;
    };
    let apply = |id: &'static str| {
        let store = Arc::clone(&store);
        async move {
            let e = event(id, "again-u", "x", EventKind::View, 1);
            store.apply(&[update(1, &e, now_ms())]).await.unwrap();
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
    let config = StoreConfig {
        backend: Backend::Scylla,
        scylla: ScyllaConfig {
            connect_timeout_ms: 300,
            ..ScyllaConfig::new("127.0.0.1:1", "nothing")
        },
        ..StoreConfig::default()
    };
    let err = conformance::opening_nothing_is_unavailable(config).await;
    assert!(err.to_string().contains("connecting to scylla"), "{err}");
}
