//! Durability: duplicates across restarts, and `kill -9` during a stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reflex_server::proto;
use reflex_server::proto::EventKind::{Click, View};
use reflex_server::proto::EventStatus::{Accepted, Duplicate};
use tokio::sync::Mutex;

use crate::support::*;

#[tokio::test]
async fn duplicates_are_recognised_after_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Reflex::start(dir.path());
    let channel = server.channel().await;
    let mut stream = EventStream::open(channel).await;
    let ack = stream.round_trip(vec![event("d1", "u", "i1", View)]).await;
    assert_eq!(statuses(&ack), vec![Accepted]);
    drop(stream);
    server.terminate().await;

    let mut server = Reflex::start(dir.path());
    let channel = server.channel().await;
    let mut stream = EventStream::open(channel.clone()).await;
    let ack = stream
        .round_trip(vec![
            event("d1", "u", "i1", View),
            event("d2", "u", "i2", View),
        ])
        .await;
    assert_eq!(statuses(&ack), vec![Duplicate, Accepted]);
    assert_eq!(applied_events(&channel, "u").await, 2);
    drop(stream);
    server.kill9();

    let server = Reflex::start(dir.path());
    let channel = server.channel().await;
    let mut stream = EventStream::open(channel.clone()).await;
    let ack = stream
        .round_trip(vec![
            event("d1", "u", "i1", View),
            event("d2", "u", "i2", View),
        ])
        .await;
    assert_eq!(statuses(&ack), vec![Duplicate, Duplicate]);
    assert_eq!(
        applied_events(&channel, "u").await,
        2,
        "nothing counted twice"
    );
}

const USERS: usize = 20;
const PER_BATCH: usize = 50;

fn batch(b: usize) -> Vec<proto::Event> {
    (0..PER_BATCH)
        .map(|i| {
            let n = b * PER_BATCH + i;
            let kind = if n.is_multiple_of(3) { Click } else { View };
            event(
                &format!("k-{n}"),
                &format!("user-{}", n % USERS),
                &format!("item-{}", n % 37),
                kind,
            )
        })
        .collect()
}

#[tokio::test]
async fn kill_9_mid_stream_keeps_every_acked_event_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // Frequent checkpoints (every tick, however little the log grew) so the kill lands
    // between and during them.
    let mut server = Reflex::start_with(
        dir.path(),
        &[
            ("REFLEX_MAINTENANCE_INTERVAL_MS", "20"),
            ("REFLEX_STORE__EMBEDDED__CHECKPOINT_EVENTS_PER_PROFILE", "0"),
            (
                "REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC",
                "0",
            ),
        ],
    );
    let channel = server.channel().await;

    let acked: Arc<Mutex<Vec<proto::Event>>> = Arc::default();
    let sent_batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let acked = acked.clone();
        let sent_batches = sent_batches.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut stream = EventStream::open(channel).await;
            let mut in_flight = std::collections::VecDeque::new();
            for b in 0.. {
                let events = batch(b);
                if stream.send_checked(events.clone()).await.is_err() {
                    return;
                }
                sent_batches.store(b + 1, std::sync::atomic::Ordering::SeqCst);
                in_flight.push_back(events);
                // Keep a few batches in flight, like a real producer.
                if in_flight.len() >= 4 {
                    match stream.next_ack().await {
                        Some(Ok(ack)) => {
                            let events = in_flight.pop_front().unwrap();
                            assert_eq!(ack.accepted as usize, events.len());
                            acked.lock().await.extend(events);
                        }
                        _ => return,
                    }
                }
            }
        })
    };
    while acked.lock().await.len() < 40 * PER_BATCH {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    let acked = acked.lock().await.clone();
    let sent = sent_batches.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        sent * PER_BATCH > acked.len(),
        "some batches were in flight at the kill"
    );

    let server = Reflex::start_with(
        dir.path(),
        &[(
            "REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC",
            "0",
        )],
    );
    let channel = server.channel().await;
    let mut expected: HashMap<String, u64> = HashMap::new();
    for e in &acked {
        *expected.entry(e.user_id.clone()).or_default() += 1;
    }
    for u in 0..USERS {
        let user = format!("user-{u}");
        let applied = applied_events(&channel, &user).await;
        let want = expected.get(&user).copied().unwrap_or(0);
        assert!(
            applied >= want,
            "{user}: {applied} applied but {want} were acked"
        );
    }

    // Resend everything that was sent: acked events are duplicates, the rest count once.
    let mut stream = EventStream::open(channel.clone()).await;
    let acked_ids: std::collections::HashSet<String> =
        acked.iter().map(|e| e.event_id.clone()).collect();
    let mut total: HashMap<String, u64> = HashMap::new();
    for b in 0..sent {
        let events = batch(b);
        for e in &events {
            *total.entry(e.user_id.clone()).or_default() += 1;
        }
        let ack = stream.round_trip(events.clone()).await;
        for (e, r) in events.iter().zip(&ack.results) {
            if acked_ids.contains(&e.event_id) {
                assert_eq!(
                    r.status, Duplicate as i32,
                    "{} was acked before the kill",
                    e.event_id
                );
            }
        }
    }
    for u in 0..USERS {
        let user = format!("user-{u}");
        assert_eq!(
            applied_events(&channel, &user).await,
            total[&user],
            "{user}: every event applied exactly once"
        );
    }
}
