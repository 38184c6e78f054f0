//! Starting and stopping the real binary, and small client helpers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;
use reflex_server::proto;
use reflex_server::proto::catalog_service_client::CatalogServiceClient;
use reflex_server::proto::event_service_client::EventServiceClient;
use reflex_server::proto::model_service_client::ModelServiceClient;
use reflex_server::proto::profile_service_client::ProfileServiceClient;
use reflex_server::proto::recommend_service_client::RecommendServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A running `reflex serve`, killed when dropped.
pub struct Reflex {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The `/metrics` endpoint, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
}

impl Reflex {
    /// Starts the binary on a free port over `data_dir` with extra `REFLEX_…` variables,
    /// and waits until it serves.
    pub fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> Reflex {
        Self::launch(data_dir, env, &["reflex listening on "])
    }

    /// Like [`start_with`](Self::start_with), but returns as soon as the server listens,
    /// also while it is still waiting for its store (health NOT_SERVING).
    pub fn start_listening_with(data_dir: &Path, env: &[(&str, &str)]) -> Reflex {
        Self::launch(
            data_dir,
            env,
            &["reflex listening on ", "reflex starting on "],
        )
    }

    /// Starts the binary and waits for a line that starts with one of `announcements`
    /// followed by the gRPC address.
    fn launch(data_dir: &Path, env: &[(&str, &str)], announcements: &[&str]) -> Reflex {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_reflex"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .env("REFLEX_METRICS__LISTEN", "127.0.0.1:0")
            .env_remove("REFLEX_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning reflex");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut metrics_addr = None;
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    let announced = announcements
                        .iter()
                        .find_map(|a| line.strip_prefix(a)?.split_whitespace().next());
                    if let Some(addr) = announced {
                        let addr: SocketAddr = addr.parse().expect("address in the ready line");
                        // The metrics line, when there is one, follows at once.
                        let metrics_on = env
                            .iter()
                            .all(|(k, v)| !(*k == "REFLEX_METRICS__ENABLED" && *v == "false"));
                        if metrics_on && let Some(Ok(line)) = lines.next() {
                            metrics_addr = line
                                .strip_prefix("reflex metrics on http://")
                                .and_then(|a| a.trim_end_matches("/metrics").parse().ok());
                        }
                        break addr;
                    }
                }
                other => {
                    let status = child.wait();
                    panic!("reflex exited before it was ready: {other:?}, {status:?}");
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Reflex {
            child: Some(child),
            addr,
            metrics_addr,
            data_dir: data_dir.to_owned(),
        }
    }

    /// Starts the binary with default settings.
    pub fn start(data_dir: &Path) -> Reflex {
        Self::start_with(data_dir, &[])
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connecting to reflex")
    }

    /// `kill -9`: no chance to flush or checkpoint.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaping");
        }
    }

    /// SIGTERM, then wait for a clean exit. Async so the test's own connections keep
    /// being driven (and can close) while the server drains.
    pub async fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("running kill");
            assert!(status.success());
            let exit = tokio::task::spawn_blocking(move || child.wait())
                .await
                .unwrap()
                .expect("reaping");
            assert!(exit.success(), "reflex exited with {exit}");
        }
    }
}

impl Drop for Reflex {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Now as a protobuf timestamp.
pub fn now() -> Timestamp {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// An event at `ts`.
pub fn event_at(
    id: &str,
    user: &str,
    item: &str,
    kind: proto::EventKind,
    ts: Timestamp,
) -> proto::Event {
    proto::Event {
        event_id: id.into(),
        user_id: user.into(),
        item_id: item.into(),
        kind: kind as i32,
        timestamp: Some(ts),
        ..Default::default()
    }
}

/// An event now.
pub fn event(id: &str, user: &str, item: &str, kind: proto::EventKind) -> proto::Event {
    event_at(id, user, item, kind, now())
}

/// A bidirectional event stream held open across batches.
pub struct EventStream {
    tx: mpsc::Sender<proto::IngestRequest>,
    acks: tonic::Streaming<proto::IngestResponse>,
    next_sequence: u64,
}

impl EventStream {
    pub async fn open(channel: Channel) -> EventStream {
        Self::try_open(channel).await.expect("opening the stream")
    }

    /// Opens a stream; the server's refusal when it does not admit it.
    pub async fn try_open(channel: Channel) -> Result<EventStream, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let acks = EventServiceClient::new(channel)
            .stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(EventStream {
            tx,
            acks,
            next_sequence: 1,
        })
    }

    /// Sends a batch without waiting; returns its sequence number.
    pub async fn send(&mut self, events: Vec<proto::Event>) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.tx
            .send(proto::IngestRequest { sequence, events })
            .await
            .expect("stream open");
        sequence
    }

    /// The next ack or error.
    pub async fn next_ack(&mut self) -> Option<Result<proto::IngestResponse, tonic::Status>> {
        tokio::time::timeout(Duration::from_secs(30), self.acks.next())
            .await
            .expect("ack within 30 s")
    }

    /// Closes the sending side and reads what is left until the server ends the stream.
    pub async fn finish(self) {
        let EventStream { tx, mut acks, .. } = self;
        drop(tx);
        while let Some(next) = tokio::time::timeout(Duration::from_secs(30), acks.next())
            .await
            .expect("the stream ends within 30 s")
        {
            next.expect("the stream ends cleanly");
        }
    }

    /// Sends a batch and waits for its ack.
    pub async fn round_trip(&mut self, events: Vec<proto::Event>) -> proto::IngestResponse {
        let seq = self.send(events).await;
        let ack = self
            .next_ack()
            .await
            .expect("an ack")
            .expect("batch accepted");
        assert_eq!(ack.sequence, seq);
        ack
    }
}

/// Status names of an ack's results, in order.
pub fn statuses(ack: &proto::IngestResponse) -> Vec<proto::EventStatus> {
    ack.results
        .iter()
        .map(|r| proto::EventStatus::try_from(r.status).unwrap())
        .collect()
}

/// Top `count` item ids for `user`.
pub async fn recommend(channel: &Channel, user: &str, count: u32) -> proto::RecommendResponse {
    RecommendServiceClient::new(channel.clone())
        .recommend(proto::RecommendRequest {
            user_id: user.into(),
            count,
            filter: None,
        })
        .await
        .expect("recommend")
        .into_inner()
}

pub fn ids(resp: &proto::RecommendResponse) -> Vec<String> {
    resp.items.iter().map(|i| i.item_id.clone()).collect()
}

/// Calls `call` again while it answers `UNAVAILABLE`, for up to ten seconds, as a careful
/// client would: on a loaded machine a shared store's read or write may pass its timeout
/// (`store.redis.read_timeout_ms`, `command_timeout_ms`), and the server answers
/// `UNAVAILABLE` until the store answers again. Any other answer is returned.
pub async fn retrying_unavailable<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let start = Instant::now();
    loop {
        match call().await {
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && start.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other.map(tonic::Response::into_inner),
        }
    }
}

/// Total applied events of `user` according to their profile (0 when none), retrying
/// `UNAVAILABLE` (see [`retrying_unavailable`]).
pub async fn applied_events(channel: &Channel, user: &str) -> u64 {
    let answer = retrying_unavailable(|| {
        let mut client = ProfileServiceClient::new(channel.clone());
        let request = proto::GetProfileRequest {
            user_id: user.into(),
        };
        async move { client.get_profile(request).await }
    })
    .await;
    match answer {
        Ok(p) => p.kind_counts.values().sum(),
        Err(s) if s.code() == tonic::Code::NotFound => 0,
        Err(s) => panic!("get_profile: {s}"),
    }
}

/// Upserts a catalog of `per_category` items in each category: ids `<category>-<n>`.
pub async fn upsert_catalog(channel: &Channel, categories: &[&str], per_category: usize) {
    let items = categories
        .iter()
        .flat_map(|c| {
            (0..per_category).map(move |n| proto::Item {
                item_id: format!("{c}-{n}"),
                title: format!("{c} {n}"),
                categories: vec![c.to_string()],
                available: Some(true),
                embedding: vec![],
            })
        })
        .collect();
    CatalogServiceClient::new(channel.clone())
        .upsert_items(proto::UpsertItemsRequest { items })
        .await
        .expect("upsert catalog");
}

impl EventStream {
    /// Sends a batch; `Err` when the stream is gone (the server died).
    pub async fn send_checked(&mut self, events: Vec<proto::Event>) -> Result<u64, ()> {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.tx
            .send(proto::IngestRequest { sequence, events })
            .await
            .map_err(|_| ())?;
        Ok(sequence)
    }
}

/// The `/metrics` text of `server`.
pub async fn scrape(server: &Reflex) -> String {
    let addr = server.metrics_addr.expect("metrics endpoint announced");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    text
}

/// Stored model versions and the label answers carry now (retrying `UNAVAILABLE`).
pub async fn model_versions(channel: &Channel) -> proto::ListVersionsResponse {
    retrying_unavailable(|| {
        let mut client = ModelServiceClient::new(channel.clone());
        let request = proto::ListVersionsRequest {};
        async move { client.list_versions(request).await }
    })
    .await
    .expect("list versions")
}

/// Takes a snapshot now (retrying `UNAVAILABLE`).
pub async fn snapshot(channel: &Channel, reason: &str) -> proto::ModelVersion {
    retrying_unavailable(|| {
        let mut client = ModelServiceClient::new(channel.clone());
        let request = proto::SnapshotRequest {
            reason: reason.into(),
        };
        async move { client.snapshot(request).await }
    })
    .await
    .expect("snapshot")
}

/// Neighbours of `item` with their scores, which depend on item vectors only.
pub async fn similar(channel: &Channel, item: &str, count: u32) -> Vec<(String, f32)> {
    RecommendServiceClient::new(channel.clone())
        .similar_items(proto::SimilarItemsRequest {
            item_id: item.into(),
            count,
            filter: None,
            ..Default::default()
        })
        .await
        .expect("similar items")
        .into_inner()
        .items
        .into_iter()
        .map(|i| (i.item_id, i.score))
        .collect()
}

/// Polls `check` until it holds or `within` passes; the last failure message otherwise.
pub async fn eventually<F, Fut>(within: Duration, mut check: F)
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

/// What the server's health service says about the whole server.
pub async fn health(channel: &Channel) -> ServingStatus {
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}
