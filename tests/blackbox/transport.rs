//! The transport under the API: how answers leave the socket and how a broken stream ends.

use std::time::{Duration, Instant};

use prost::Message;
use prost::bytes::{Buf, BufMut};
use reflex_server::proto;
use reflex_server::proto::EventKind::View;
use reflex_server::proto::profile_service_client::ProfileServiceClient;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

use crate::support::*;

/// A stall of this length is the signature of a response held back by Nagle's algorithm
/// until the client's delayed ACK (40 ms on Linux), not of a slow server.
const STALL: Duration = Duration::from_millis(35);

/// Answers over a kilobyte leave at once: with Nagle's algorithm on the accepted socket,
/// the trailers of such an answer wait for the client's delayed ACK, and every call took
/// 44 ms instead of a fraction of one.
#[tokio::test]
async fn answers_over_a_kilobyte_do_not_wait_for_the_clients_ack() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start(dir.path());
    let channel = server.channel().await;
    let mut stream = EventStream::open(channel.clone()).await;
    let events = (0..50)
        .map(|i| {
            event(
                &format!("e{i}"),
                "big-profile-user",
                &format!("item-{i}"),
                View,
            )
        })
        .collect();
    stream.round_trip(events).await;

    let mut profiles = ProfileServiceClient::new(channel);
    let request = || proto::GetProfileRequest {
        user_id: "big-profile-user".into(),
    };
    let size = profiles.get_profile(request()).await.unwrap().into_inner();
    assert!(
        size.encoded_len() > 1_024,
        "the profile must be over a kilobyte to show the stall: {} bytes",
        size.encoded_len()
    );
    // The first calls of a connection are ACKed at once (TCP quick-ACK); the stall shows
    // once the connection has turned interactive.
    let mut stalled = 0;
    let calls = 40;
    for _ in 0..calls {
        let started = Instant::now();
        profiles.get_profile(request()).await.unwrap();
        if started.elapsed() >= STALL {
            stalled += 1;
        }
    }
    assert!(
        stalled < calls / 4,
        "{stalled} of {calls} GetProfile calls took {STALL:?} or more"
    );
}

/// Sends raw bytes as messages, so a test can put an undecodable frame on the stream.
#[derive(Default)]
struct RawRequests;

impl Codec for RawRequests {
    type Encode = Vec<u8>;
    type Decode = proto::IngestResponse;
    type Encoder = RawEncoder;
    type Decoder = AckDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        AckDecoder
    }
}

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

struct AckDecoder;

impl Decoder for AckDecoder {
    type Item = proto::IngestResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let ack = proto::IngestResponse::decode(src.copy_to_bytes(src.remaining()))
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Some(ack))
    }
}

/// A valid batch, an undecodable frame, another valid batch: the first is acked, and
/// the stream then ends with an error naming the problem, never with OK (which would
/// tell the client that everything it sent was handled).
#[tokio::test]
async fn an_undecodable_message_ends_the_stream_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start(dir.path());
    let channel = server.channel().await;

    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/reflex.v1.EventService/Stream");
    let response = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            path,
            RawRequests,
        )
        .await
        .unwrap();
    let mut acks = response.into_inner();

    let batch = |sequence: u64, id: &str| {
        proto::IngestRequest {
            sequence,
            events: vec![event(id, "u-raw", "i1", View)],
        }
        .encode_to_vec()
    };
    tx.send(batch(1, "good-1")).await.unwrap();
    let first = acks
        .next()
        .await
        .expect("an ack")
        .expect("batch 1 accepted");
    assert_eq!((first.sequence, first.accepted), (1, 1));

    // Field 1 declared as a length-delimited string of 100 bytes, with 2 bytes present.
    tx.send(vec![0x0a, 100, b'x', b'y']).await.unwrap();
    let _ = tx.send(batch(3, "good-3")).await;
    let end = tokio::time::timeout(Duration::from_secs(10), acks.next())
        .await
        .expect("the stream ends within 10 s");
    let status = match end {
        Some(Err(status)) => status,
        other => panic!("expected an error status, got {other:?}"),
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("after batch 1"),
        "the message names the last batch read: {status:?}"
    );
    assert_eq!(
        applied_events(&channel, "u-raw").await,
        1,
        "the batch after the bad frame is not applied"
    );
}
