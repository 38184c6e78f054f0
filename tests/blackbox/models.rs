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
