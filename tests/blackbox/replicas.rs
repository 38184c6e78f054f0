//! Several `reflex serve` replicas on one real Redis: the same users served consistently
//! by any replica, duplicates recognised across replicas, catalog changes seen by all,
//! and a Redis outage answered with UNAVAILABLE, then recovered from without loss.

use std::time::{Duration, Instant};

use reflex_server::proto;
use reflex_server::proto::EventKind::{Purchase, View};
use reflex_server::proto::event_service_client::EventServiceClient;
use reflex_storage::testing::RedisServer;
use tonic::transport::Channel;

use crate::recommend::{CATEGORIES, PER_CATEGORY, category_share, train};
use crate::support::*;

fn redis_env(redis: &RedisServer) -> Vec<(&'static str, String)> {
    vec![
        ("REFLEX_STORE__BACKEND", "redis".to_string()),
        ("REFLEX_STORE__REDIS__URL", redis.url()),
        ("REFLEX_STORE__REDIS__COMMAND_TIMEOUT_MS", "500".to_string()),
    ]
}

fn start_replica(redis: &RedisServer, extra: &[(&str, &str)]) -> (tempfile::TempDir, Reflex) {
    let dir = tempfile::tempdir().unwrap();
    let env = redis_env(redis);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    let server = Reflex::start_with(dir.path(), &all);
    (dir, server)
}

/// Polls `check` until it holds or `within` passes; the last failure message otherwise.
async fn eventually<F, Fut>(within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) if start.elapsed() > within => panic!("not within {within:?}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn ingest(
    channel: &Channel,
    events: Vec<proto::Event>,
) -> Result<proto::IngestResponse, tonic::Status> {
    EventServiceClient::new(channel.clone())
        .ingest(proto::IngestRequest {
            sequence: 1,
            events,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn two_replicas_serve_the_same_users_from_one_redis() {
    let Some(redis) = RedisServer::start() else {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return;
    };
    let (_a_dir, a) = start_replica(&redis, &[]);
    let (_b_dir, b) = start_replica(&redis, &[]);
    let (a, b) = (a.channel().await, b.channel().await);

    // Catalog and history go in through A only; B learns them from the shared store.
    upsert_catalog(&a, &CATEGORIES, PER_CATEGORY).await;
    train(&a).await;
    eventually(Duration::from_secs(10), || async {
        let r = recommend(&b, "fan-1", 8).await;
        match r.items.iter().all(|i| i.source == proto::Source::Mf as i32) && !r.items.is_empty() {
            true => Ok(()),
            false => Err(format!("B does not serve fan-1 from MF yet: {r:?}")),
        }
    })
    .await;

    let ack = ingest(
        &a,
        vec![
            event("r-x1", "buyer", "books-1", View),
            event("r-x2", "buyer", "books-2", View),
        ],
    )
    .await
    .unwrap();
    assert_eq!(ack.accepted, 2);
    let before = recommend(&b, "buyer", 8).await;
    assert_eq!(before.profile_version, 2, "B reads the profile A wrote");
    let shoes_before = category_share(&before, "shoes");

    // Acked by A, reflected by B on the very next call.
    let ack = ingest(
        &a,
        vec![
            event("r-x3", "buyer", "shoes-1", Purchase),
            event("r-x4", "buyer", "shoes-2", Purchase),
            event("r-x5", "buyer", "shoes-5", Purchase),
        ],
    )
    .await
    .unwrap();
    assert_eq!(ack.accepted, 3);
    let after = recommend(&b, "buyer", 8).await;
    assert_eq!(after.profile_version, 5);
    let shoes_after = category_share(&after, "shoes");
    assert!(
        shoes_after > shoes_before && shoes_after >= 3,
        "shoes in the buyer's top 8 on B: {shoes_before} before, {shoes_after} after: {:?}",
        ids(&after)
    );
    for bought in ["shoes-1", "shoes-2", "shoes-5"] {
        assert!(
            !ids(&after).contains(&bought.to_string()),
            "{bought} was bought"
        );
    }

    // A duplicate sent to B after A accepted it.
    let dup = ingest(&b, vec![event("r-x3", "buyer", "shoes-1", Purchase)])
        .await
        .unwrap();
    assert_eq!(statuses(&dup), [proto::EventStatus::Duplicate]);
    assert_eq!(applied_events(&a, "buyer").await, 5);
    assert_eq!(applied_events(&b, "buyer").await, 5);

    // A catalog change through B reaches A's filters.
    let top = recommend(&a, "buyer", 1).await;
    let withdrawn = top.items[0].item_id.clone();
    reflex_server::proto::catalog_service_client::CatalogServiceClient::new(b.clone())
        .upsert_items(proto::UpsertItemsRequest {
            items: vec![proto::Item {
                item_id: withdrawn.clone(),
                title: "withdrawn".into(),
                categories: vec![withdrawn.split('-').next().unwrap().to_string()],
                available: Some(false),
                embedding: vec![],
            }],
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(5), || async {
        let r = recommend(&a, "buyer", 8).await;
        match ids(&r).contains(&withdrawn) {
            false => Ok(()),
            true => Err(format!("A still recommends unavailable {withdrawn}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_redis_outage_is_unavailable_and_recovers_without_loss() {
    let Some(mut redis) = RedisServer::start_persistent() else {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return;
    };
    let (_dir, server) = start_replica(&redis, &[]);
    let channel = server.channel().await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    let ack = ingest(&channel, vec![event("o-1", "outage-u", "toys-1", View)])
        .await
        .unwrap();
    assert_eq!(ack.accepted, 1);

    redis.stop();
    let err = ingest(&channel, vec![event("o-2", "outage-u", "toys-2", View)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    // Recommend degrades instead of failing.
    let degraded = recommend(&channel, "outage-u", 4).await;
    assert!(degraded.degraded, "{degraded:?}");

    redis.restart();
    eventually(Duration::from_secs(10), || async {
        match ingest(&channel, vec![event("o-2", "outage-u", "toys-2", View)]).await {
            Ok(ack) if ack.accepted == 1 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // The event acked before the outage is still there, the retried one once.
    assert_eq!(applied_events(&channel, "outage-u").await, 2);
    let again = ingest(&channel, vec![event("o-1", "outage-u", "toys-1", View)])
        .await
        .unwrap();
    assert_eq!(statuses(&again), [proto::EventStatus::Duplicate]);
    let r = recommend(&channel, "outage-u", 4).await;
    assert!(!r.degraded);
    assert_eq!(r.profile_version, 2);
}
