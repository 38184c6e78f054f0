//! Recommendations reflect events: the user who buys moves, others do not.

use prost_types::Timestamp;
use reflex_server::proto;
use reflex_server::proto::EventKind::{Click, Purchase, View};
use reflex_server::proto::catalog_service_client::CatalogServiceClient;
use reflex_server::proto::recommend_service_client::RecommendServiceClient;
use tonic::transport::Channel;

use crate::support::*;

pub(crate) const CATEGORIES: [&str; 4] = ["shoes", "books", "garden", "toys"];
pub(crate) const PER_CATEGORY: usize = 8;

pub(crate) fn category_share(resp: &proto::RecommendResponse, category: &str) -> usize {
    resp.items
        .iter()
        .filter(|i| i.item_id.starts_with(&format!("{category}-")))
        .count()
}

/// Shoppers loyal to one category each, so the model learns the categories.
pub(crate) async fn train(channel: &Channel) {
    let mut stream = EventStream::open(channel.clone()).await;
    let base = now().seconds - 7200;
    let mut batch = Vec::new();
    for u in 0..80 {
        let category = CATEGORIES[u % CATEGORIES.len()];
        for e in 0..16 {
            let n = (u * 7 + e * 3) % PER_CATEGORY;
            let kind = if e % 5 == 4 { Click } else { View };
            let ts = Timestamp {
                seconds: base + (e as i64) * 60,
                nanos: 0,
            };
            batch.push(event_at(
                &format!("t-{u}-{e}"),
                &format!("fan-{u}"),
                &format!("{category}-{n}"),
                kind,
                ts,
            ));
        }
    }
    for chunk in batch.chunks(500) {
        let ack = stream.round_trip(chunk.to_vec()).await;
        assert_eq!(ack.accepted as usize, chunk.len());
    }
}

#[tokio::test]
async fn purchases_move_that_users_recommendations_only() {
    purchases_move_recommendations(&[]).await;
}

#[tokio::test]
async fn purchases_move_recommendations_through_the_ann_index_too() {
    // Threshold 0: the usearch HNSW index serves every search.
    purchases_move_recommendations(&[("REFLEX_RETRIEVAL__THRESHOLD_ITEMS", "0")]).await;
}

async fn purchases_move_recommendations(env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start_with(dir.path(), env);
    let channel = server.channel().await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    train(&channel).await;

    let mut stream = EventStream::open(channel.clone()).await;
    // The buyer has shown a little interest in books; the bystander likes garden things.
    let ack = stream
        .round_trip(vec![
            event("x1", "buyer", "books-1", View),
            event("x2", "buyer", "books-2", View),
            event("y1", "bystander", "garden-1", View),
            event("y2", "bystander", "garden-3", Click),
            event("y3", "bystander", "garden-4", View),
        ])
        .await;
    assert_eq!(ack.accepted, 5);

    let buyer_before = recommend(&channel, "buyer", 8).await;
    let bystander_before = recommend(&channel, "bystander", 8).await;
    // What follows the books they viewed (the signals), then the model's picks.
    assert!(
        buyer_before.items.iter().all(|i| [
            proto::Source::Sequence as i32,
            proto::Source::Mf as i32
        ]
        .contains(&i.source)),
        "{:?}",
        buyer_before.items
    );
    let shoes_before = category_share(&buyer_before, "shoes");

    let ack = stream
        .round_trip(vec![
            event("x3", "buyer", "shoes-1", Purchase),
            event("x4", "buyer", "shoes-2", Purchase),
            event("x5", "buyer", "shoes-5", Purchase),
        ])
        .await;
    assert_eq!(ack.accepted, 3);

    // Read-your-writes: the very next call reflects the ack.
    let buyer_after = recommend(&channel, "buyer", 8).await;
    let shoes_after = category_share(&buyer_after, "shoes");
    assert!(
        shoes_after > shoes_before && shoes_after >= 3,
        "shoes in the buyer's top 8: {shoes_before} before, {shoes_after} after: {:?}",
        ids(&buyer_after)
    );
    assert!(buyer_after.profile_version > buyer_before.profile_version);
    for bought in ["shoes-1", "shoes-2", "shoes-5"] {
        assert!(
            !ids(&buyer_after).contains(&bought.to_string()),
            "purchased items are excluded"
        );
    }

    let bystander_after = recommend(&channel, "bystander", 8).await;
    assert_eq!(
        bystander_after.profile_version,
        bystander_before.profile_version
    );
    assert_eq!(
        category_share(&bystander_after, "shoes"),
        category_share(&bystander_before, "shoes"),
        "the bystander did not move toward shoes: {:?} -> {:?}",
        ids(&bystander_before),
        ids(&bystander_after)
    );
    assert_eq!(
        category_share(&bystander_after, "garden"),
        category_share(&bystander_before, "garden")
    );
}

#[tokio::test]
async fn unknown_users_get_popular_items_and_filters_apply() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start(dir.path());
    let channel = server.channel().await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    train(&channel).await;

    let resp = recommend(&channel, "never-seen", 5).await;
    assert_eq!(resp.items.len(), 5);
    assert_eq!(resp.profile_version, 0);
    assert!(
        resp.items
            .iter()
            .all(|i| i.source == proto::Source::Popular as i32)
    );

    // An unavailable item is never recommended.
    let top = resp.items[0].item_id.clone();
    CatalogServiceClient::new(channel.clone())
        .upsert_items(proto::UpsertItemsRequest {
            items: vec![proto::Item {
                item_id: top.clone(),
                available: Some(false),
                categories: vec![top.split('-').next().unwrap().to_string()],
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    let resp = recommend(&channel, "never-seen", 5).await;
    assert!(
        !ids(&resp).contains(&top),
        "{top} is unavailable: {:?}",
        ids(&resp)
    );

    // Category filters.
    let mut client = RecommendServiceClient::new(channel.clone());
    let resp = client
        .recommend(proto::RecommendRequest {
            user_id: "fan-0".into(),
            count: 6,
            filter: Some(proto::Filter {
                include_categories: vec!["toys".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.items.len(), 6);
    assert!(
        resp.items.iter().all(|i| i.item_id.starts_with("toys-")),
        "{:?}",
        ids(&resp)
    );

    // Similar items: unknown is NOT_FOUND, known returns neighbours without itself.
    let err = client
        .similar_items(proto::SimilarItemsRequest {
            item_id: "no-such-item".into(),
            count: 5,
            filter: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let similar = client
        .similar_items(proto::SimilarItemsRequest {
            item_id: "books-3".into(),
            count: 5,
            filter: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(similar.items.len(), 5);
    assert!(similar.items.iter().all(|i| i.item_id != "books-3"));
    let books = similar
        .items
        .iter()
        .filter(|i| i.item_id.starts_with("books-"))
        .count();
    assert!(
        books >= 3,
        "neighbours of a book are mostly books: {:?}",
        similar.items
    );

    let err = client
        .recommend(proto::RecommendRequest {
            user_id: String::new(),
            count: 5,
            filter: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("user_id"));
}

/// The value of one sample of `/metrics`, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn the_recommend_cache_serves_repeats_but_never_across_an_event_or_catalog_change() {
    let dir = tempfile::tempdir().unwrap();
    // A long TTL, so only the key can make an answer fresh.
    let server = Reflex::start_with(dir.path(), &[("REFLEX_ENGINE__CACHE_TTL_MS", "600000")]);
    let channel = server.channel().await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    train(&channel).await;
    let mut stream = EventStream::open(channel.clone()).await;
    stream
        .round_trip(vec![event("r1", "reader", "books-1", View)])
        .await;

    let hits = r#"reflex_recommend_cache_requests_total{result="hit"}"#;
    let misses = r#"reflex_recommend_cache_requests_total{result="miss"}"#;
    let first = recommend(&channel, "reader", 6).await;
    let again = recommend(&channel, "reader", 6).await;
    assert_eq!(ids(&first), ids(&again));
    let text = scrape(&server).await;
    assert_eq!((sample(&text, hits), sample(&text, misses)), (1.0, 1.0));

    // The user's own event changes the profile version: computed afresh at once.
    stream
        .round_trip(vec![event("r2", "reader", "books-2", Purchase)])
        .await;
    let after_event = recommend(&channel, "reader", 6).await;
    assert!(after_event.profile_version > first.profile_version);
    assert!(
        !ids(&after_event).contains(&"books-2".to_string()),
        "purchased"
    );
    let text = scrape(&server).await;
    assert_eq!((sample(&text, hits), sample(&text, misses)), (1.0, 2.0));

    // A catalog change is never hidden by the cache: the top item turned unavailable
    // disappears from the very next answer.
    let top = ids(&after_event)[0].clone();
    let category = top.split('-').next().unwrap().to_string();
    CatalogServiceClient::new(channel.clone())
        .upsert_items(proto::UpsertItemsRequest {
            items: vec![proto::Item {
                item_id: top.clone(),
                title: String::new(),
                categories: vec![category],
                available: Some(false),
                embedding: vec![],
            }],
        })
        .await
        .unwrap();
    let after_catalog = recommend(&channel, "reader", 6).await;
    assert!(!ids(&after_catalog).contains(&top), "{top} is unavailable");
    let text = scrape(&server).await;
    assert_eq!(sample(&text, misses), 3.0);
}
