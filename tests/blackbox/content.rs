//! The content model: catalog embeddings serve items nobody has touched yet, blend with
//! MF, answer `SimilarItems` in their own space, and survive a restart.

use reflex_server::proto;
use reflex_server::proto::EventKind::View;
use reflex_server::proto::catalog_service_client::CatalogServiceClient;
use reflex_server::proto::recommend_service_client::RecommendServiceClient;
use tonic::transport::Channel;

use crate::recommend::{CATEGORIES, PER_CATEGORY, category_share, train};
use crate::support::*;

const DIM: usize = 8;

/// An embedding near its category's axis, with a little per-item variation.
fn embedding(category: usize, n: usize) -> Vec<f32> {
    let mut e = vec![0.0; DIM];
    e[category] = 1.0;
    e[4 + n % 4] = 0.05 * (n as f32 + 1.0);
    e
}

fn item(category: usize, id: String, n: usize) -> proto::Item {
    proto::Item {
        item_id: id,
        title: String::new(),
        categories: vec![CATEGORIES[category].to_string()],
        available: Some(true),
        embedding: embedding(category, n),
    }
}

async fn upsert(channel: &Channel, items: Vec<proto::Item>) -> Result<(), tonic::Status> {
    CatalogServiceClient::new(channel.clone())
        .upsert_items(proto::UpsertItemsRequest { items })
        .await
        .map(|_| ())
}

async fn similar_in(
    channel: &Channel,
    item: &str,
    space: proto::SimilarSpace,
) -> Result<proto::SimilarItemsResponse, tonic::Status> {
    RecommendServiceClient::new(channel.clone())
        .similar_items(proto::SimilarItemsRequest {
            item_id: item.into(),
            count: 5,
            filter: None,
            space: space.into(),
        })
        .await
        .map(|r| r.into_inner())
}

fn source_of(resp: &proto::RecommendResponse, item: &str) -> Option<proto::Source> {
    resp.items
        .iter()
        .find(|i| i.item_id == item)
        .and_then(|i| proto::Source::try_from(i.source).ok())
}

#[tokio::test]
async fn new_items_are_served_by_content_before_anyone_touches_them() {
    let dir = tempfile::tempdir().unwrap();
    let dim = DIM.to_string();
    let env = [("REFLEX_CONTENT__DIM", dim.as_str())];
    let mut server = Reflex::start_with(dir.path(), &env);
    let channel = server.channel().await;
    let catalog: Vec<proto::Item> = (0..CATEGORIES.len())
        .flat_map(|c| (0..PER_CATEGORY).map(move |n| item(c, format!("{}-{n}", CATEGORIES[c]), n)))
        .collect();
    upsert(&channel, catalog).await.unwrap();
    train(&channel).await;

    // Embeddings of the wrong length are refused whole, naming the field, storing nothing.
    let mut wrong = item(0, "shoes-wrong".into(), 0);
    wrong.embedding.truncate(3);
    let err = upsert(&channel, vec![item(0, "shoes-ok".into(), 1), wrong])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("items[1].embedding"), "{err:?}");
    let missing = CatalogServiceClient::new(channel.clone())
        .get_item(proto::GetItemRequest {
            item_id: "shoes-ok".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // A new shoe arrives; nobody has interacted with it.
    upsert(&channel, vec![item(0, "shoes-new".into(), 0)])
        .await
        .unwrap();
    let mut stream = EventStream::open(channel.clone()).await;
    let ack = stream
        .round_trip(vec![
            event("c-1", "carol", "shoes-1", View),
            event("c-2", "carol", "shoes-2", View),
        ])
        .await;
    assert_eq!(ack.accepted, 2);
    // Twelve asked: the eight shoes MF knows come first (their MF scores are high), and
    // the new shoe, ranked as an average item by MF and by its content, beats every item
    // of the other categories.
    let rec = recommend(&channel, "carol", 12).await;
    assert!(
        category_share(&rec, "shoes") == 9,
        "carol looked at shoes: {:?}",
        ids(&rec)
    );
    assert_eq!(
        source_of(&rec, "shoes-new"),
        Some(proto::Source::Content),
        "the untouched shoe is recommended by content: {:?}",
        rec.items
    );
    assert!(
        rec.items
            .iter()
            .any(|i| i.source == i32::from(proto::Source::Mf)),
        "MF still contributes: {:?}",
        rec.items
    );

    // SimilarItems: the new item has no MF vector, so the default space is content.
    let similar = similar_in(&channel, "shoes-new", proto::SimilarSpace::Unspecified)
        .await
        .unwrap();
    assert_eq!(similar.items.len(), 5);
    assert!(similar.items.iter().all(|i| i.item_id.starts_with("shoes-")
        && i.item_id != "shoes-new"
        && i.source == i32::from(proto::Source::Content)));
    let err = similar_in(&channel, "shoes-new", proto::SimilarSpace::Mf)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // A touched item answers in either space.
    let mf = similar_in(&channel, "books-2", proto::SimilarSpace::Mf)
        .await
        .unwrap();
    assert!(
        mf.items
            .iter()
            .all(|i| i.source == i32::from(proto::Source::Similar))
    );
    let content = similar_in(&channel, "books-2", proto::SimilarSpace::Content)
        .await
        .unwrap();
    assert!(
        content
            .items
            .iter()
            .all(|i| i.item_id.starts_with("books-"))
    );

    // Embeddings come back from the catalog after a restart.
    drop(stream);
    server.terminate().await;
    let server = Reflex::start_with(dir.path(), &env);
    let channel = server.channel().await;
    let rec = recommend(&channel, "carol", 12).await;
    assert_eq!(source_of(&rec, "shoes-new"), Some(proto::Source::Content));
}

#[tokio::test]
async fn the_content_space_is_refused_when_the_content_model_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start(dir.path());
    let channel = server.channel().await;
    // Without the content model embeddings of any length are stored, and unused.
    upsert(
        &channel,
        vec![item(1, "books-0".into(), 0), {
            let mut short = item(1, "books-1".into(), 1);
            short.embedding.truncate(2);
            short
        }],
    )
    .await
    .unwrap();
    let err = similar_in(&channel, "books-0", proto::SimilarSpace::Content)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("content"), "{err:?}");
}
