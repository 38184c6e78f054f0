//! The ingest contract: statuses, limits, and disconnects.

use reflex_server::proto;
use reflex_server::proto::EventKind::{Purchase, View};
use reflex_server::proto::EventStatus::{Accepted, Duplicate, Filtered, Rejected};
use reflex_server::proto::event_service_client::EventServiceClient;

use crate::support::*;

#[tokio::test]
async fn every_status_kind_over_one_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start(dir.path());
    let channel = server.channel().await;
    let mut stream = EventStream::open(channel.clone()).await;

    let mut bot = event("e3", "crawler", "i1", View);
    bot.context.insert("bot".into(), "true".into());
    let mut no_time = event("e6", "u1", "i1", View);
    no_time.timestamp = None;
    let mut future = event("e7", "u1", "i1", View);
    future.timestamp.as_mut().unwrap().seconds += 24 * 3600;
    let batch = vec![
        event("e1", "u1", "i1", View),
        event("e2", "", "i1", View),
        bot,
        event("e1", "u1", "i1", View),
        event("e4", "u1", "i2", Purchase),
        event("e5", "u1", "i2", proto::EventKind::Unspecified),
        no_time,
        future,
    ];
    let ack = stream.round_trip(batch).await;
    assert_eq!(
        statuses(&ack),
        vec![
            Accepted, Rejected, Filtered, Duplicate, Accepted, Rejected, Rejected, Rejected
        ]
    );
    let reasons: Vec<&str> = ack.results.iter().map(|r| r.reason.as_str()).collect();
    assert!(reasons[1].contains("user_id"), "{reasons:?}");
    assert!(reasons[2].contains("bot"), "{reasons:?}");
    assert!(reasons[5].contains("kind"), "{reasons:?}");
    assert!(reasons[6].contains("timestamp"), "{reasons:?}");
    assert!(reasons[7].contains("future"), "{reasons:?}");
    assert_eq!(
        (ack.accepted, ack.duplicate, ack.rejected, ack.filtered),
        (2, 1, 4, 1)
    );
    assert_eq!(ack.results[4].event_id, "e4");

    // The same id in a later batch is a duplicate too; new ids still go through.
    let ack = stream
        .round_trip(vec![
            event("e1", "u1", "i1", View),
            event("e8", "u1", "i3", View),
        ])
        .await;
    assert_eq!(statuses(&ack), vec![Duplicate, Accepted]);

    assert_eq!(
        applied_events(&channel, "u1").await,
        3,
        "e1, e4, e8 applied once each"
    );
    assert_eq!(
        applied_events(&channel, "crawler").await,
        0,
        "filtered events change no profile"
    );

    // The unary path follows the same contract.
    let ack = EventServiceClient::new(channel.clone())
        .ingest(proto::IngestRequest {
            sequence: 9,
            events: vec![event("e8", "u1", "i3", View), event("e9", "u2", "i3", View)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.sequence, 9);
    assert_eq!(statuses(&ack), vec![Duplicate, Accepted]);

    // Timestamps whose nanos are out of range are rejected, naming the field; the rest
    // of the batch goes through.
    let mut batch = Vec::new();
    for (n, nanos) in [-1, 1_000_000_000, i32::MAX].into_iter().enumerate() {
        let mut e = event(&format!("n{n}"), "u3", "i1", View);
        e.timestamp.as_mut().unwrap().nanos = nanos;
        batch.push(e);
    }
    batch.push(event("n9", "u3", "i1", View));
    let ack = stream.round_trip(batch).await;
    assert_eq!(statuses(&ack), vec![Rejected, Rejected, Rejected, Accepted]);
    assert!(
        ack.results[..3]
            .iter()
            .all(|r| r.reason.contains("timestamp.nanos")),
        "{:?}",
        ack.results
    );
}

#[tokio::test]
async fn oversize_batches_and_messages_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start_with(
        dir.path(),
        &[
            ("REFLEX_ENGINE__MAX_BATCH", "10"),
            ("REFLEX_MAX_MESSAGE_BYTES", "16384"),
        ],
    );
    let channel = server.channel().await;

    let eleven: Vec<_> = (0..11)
        .map(|i| event(&format!("b{i}"), "u1", "i1", View))
        .collect();
    let mut stream = EventStream::open(channel.clone()).await;
    stream.send(eleven).await;
    let status = stream.next_ack().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("11"), "{status}");
    assert_eq!(
        applied_events(&channel, "u1").await,
        0,
        "nothing of it applied"
    );

    let mut big = event("big", "u1", "i1", View);
    for k in 0..16 {
        big.context.insert(format!("k{k}"), "x".repeat(250));
    }
    let mut stream = EventStream::open(channel.clone()).await;
    stream
        .send(vec![big.clone(), big.clone(), big.clone(), big])
        .await;
    let status = stream.next_ack().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert_eq!(applied_events(&channel, "u1").await, 0);

    // The server keeps serving afterwards.
    let mut stream = EventStream::open(channel.clone()).await;
    let ack = stream.round_trip(vec![event("ok", "u1", "i1", View)]).await;
    assert_eq!(statuses(&ack), vec![Accepted]);
}

#[tokio::test]
async fn a_client_vanishing_mid_stream_loses_nothing_acked() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start(dir.path());
    let channel = server.channel().await;

    {
        let own_channel = server.channel().await;
        let mut stream = EventStream::open(own_channel).await;
        let ack = stream
            .round_trip(vec![
                event("a1", "gone", "i1", View),
                event("a2", "gone", "i2", View),
            ])
            .await;
        assert_eq!(ack.accepted, 2);
        // Another batch in flight when the client disappears.
        stream.send(vec![event("a3", "gone", "i3", View)]).await;
    }

    let mut other = EventStream::open(channel.clone()).await;
    let ack = other
        .round_trip(vec![event("b1", "stays", "i1", View)])
        .await;
    assert_eq!(ack.accepted, 1, "others keep being served");
    let applied = applied_events(&channel, "gone").await;
    assert!(
        (2..=3).contains(&applied),
        "both acked events kept, got {applied}"
    );
}
