//! The tasks that drive load: pipelined ingest streams, `Recommend`/no-op workers and the
//! freshness probe. Each books what it measures into the [`Recorder`] phase it is in and
//! stops when the phase becomes [`Phase::Done`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, timeout};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::stats::{Phase, Recorder};
use super::workload::{SessionGen, Workload, now};
use crate::proto;
use crate::proto::event_service_client::EventServiceClient;
use crate::proto::recommend_service_client::RecommendServiceClient;

/// How long a driver waits for one answer before it counts the call as lost.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// One acknowledged batch.
pub struct Acked {
    /// From sending the batch to reading its ack.
    pub latency: Duration,
    /// The ack.
    pub ack: proto::IngestResponse,
}

impl Acked {
    /// Accepted, duplicate, rejected, filtered.
    pub fn counts(&self) -> [u32; 4] {
        let a = &self.ack;
        [a.accepted, a.duplicate, a.rejected, a.filtered]
    }
}

/// A bidirectional event stream with up to `depth` batches in flight: the client side of
/// `EventService.Stream` as a high-throughput producer uses it.
pub struct Pipe {
    tx: mpsc::Sender<proto::IngestRequest>,
    acks: tonic::Streaming<proto::IngestResponse>,
    in_flight: VecDeque<(u64, Instant)>,
    next_sequence: u64,
    depth: usize,
}

impl Pipe {
    /// Opens a stream on `channel`.
    pub async fn open(channel: Conn, depth: usize) -> Result<Self, tonic::Status> {
        let depth = depth.max(1);
        let (tx, rx) = mpsc::channel(depth + 1);
        let acks = EventServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            tx,
            acks,
            in_flight: VecDeque::with_capacity(depth),
            next_sequence: 1,
            depth,
        })
    }

    /// Whether another batch may be sent without exceeding the depth.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.depth
    }

    /// Batches sent and not yet acked.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends a batch without waiting for its ack.
    pub async fn send(&mut self, events: Vec<proto::Event>) -> Result<(), tonic::Status> {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.in_flight.push_back((sequence, Instant::now()));
        self.tx
            .send(proto::IngestRequest { sequence, events })
            .await
            .map_err(|_| tonic::Status::unavailable("the event stream is closed"))
    }

    /// The next ack. Cancel safe: nothing is consumed until the ack is there.
    pub async fn next_ack(&mut self) -> Result<Acked, tonic::Status> {
        let ack = match self.acks.next().await {
            Some(Ok(ack)) => ack,
            Some(Err(status)) => return Err(status),
            None => return Err(tonic::Status::unavailable("the event stream ended")),
        };
        let Some((sequence, sent)) = self.in_flight.pop_front() else {
            return Err(tonic::Status::internal(format!(
                "ack for batch {} with none in flight",
                ack.sequence
            )));
        };
        if ack.sequence != sequence {
            return Err(tonic::Status::internal(format!(
                "ack for batch {} while batch {sequence} was next",
                ack.sequence
            )));
        }
        Ok(Acked {
            latency: sent.elapsed(),
            ack,
        })
    }

    /// Sends `events` as soon as there is room, reading acks meanwhile; returns the acks
    /// read.
    pub async fn push(&mut self, events: Vec<proto::Event>) -> Result<Vec<Acked>, tonic::Status> {
        let mut acked = Vec::new();
        while !self.has_room() {
            acked.push(self.next_ack().await?);
        }
        self.send(events).await?;
        Ok(acked)
    }

    /// Reads the acks of every batch in flight.
    pub async fn drain(&mut self) -> Result<Vec<Acked>, tonic::Status> {
        let mut acked = Vec::with_capacity(self.in_flight.len());
        while !self.in_flight.is_empty() {
            acked.push(self.next_ack().await?);
        }
        Ok(acked)
    }
}

/// Settings of one ingest stream.
pub struct IngestDriver {
    /// Its own connection.
    pub channel: Conn,
    /// Where the events come from.
    pub generator: SessionGen,
    /// Events a batch.
    pub batch: usize,
    /// Batches in flight.
    pub depth: usize,
    /// Events a second for this stream; `None` is flat out.
    pub rate: Option<f64>,
    /// Where to book.
    pub recorder: Arc<Recorder>,
}

impl IngestDriver {
    /// Streams batches until the run is done, reopening the stream after an error.
    pub async fn run(mut self) {
        let interval = self
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(self.batch as f64 / r));
        let mut next_send = tokio::time::Instant::now();
        while self.recorder.phase() != Phase::Done {
            let mut pipe = match Pipe::open(self.channel.clone(), self.depth).await {
                Ok(pipe) => pipe,
                Err(status) => {
                    self.book_error(&status);
                    sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if let Err(status) = self.stream(&mut pipe, interval, &mut next_send).await {
                self.book_error(&status);
                sleep(Duration::from_millis(200)).await;
            }
        }
    }

    fn book_error(&self, status: &tonic::Status) {
        if let Some(stats) = self.recorder.current() {
            stats.error("ingest", status.code());
        }
        tracing::debug!(%status, "ingest stream failed");
    }

    async fn stream(
        &mut self,
        pipe: &mut Pipe,
        interval: Option<Duration>,
        next_send: &mut tokio::time::Instant,
    ) -> Result<(), tonic::Status> {
        // Wakes the loop now and then so it notices the end of the run while it waits.
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut sent_in: VecDeque<Phase> = VecDeque::new();
        let mut drain_deadline = None;
        loop {
            let phase = self.recorder.phase();
            if phase == Phase::Done {
                if pipe.in_flight() == 0 {
                    return Ok(());
                }
                let deadline =
                    *drain_deadline.get_or_insert_with(|| Instant::now() + ANSWER_TIMEOUT);
                if Instant::now() > deadline {
                    return Err(tonic::Status::deadline_exceeded("acks never came"));
                }
            }
            let may_send = phase != Phase::Done && pipe.has_room();
            tokio::select! {
                acked = pipe.next_ack(), if pipe.in_flight() > 0 => {
                    let acked = acked?;
                    let booked_to = sent_in.pop_front().unwrap_or(Phase::Done);
                    if let Some(stats) = self.recorder.get(booked_to) {
                        stats.ack(acked.latency, acked.counts());
                    }
                }
                () = sleep_until(*next_send), if may_send => {
                    let events = self.generator.batch(self.batch, now());
                    pipe.send(events).await?;
                    sent_in.push_back(phase);
                    if let Some(interval) = interval {
                        *next_send += interval;
                        // After a stall, carry on at the rate rather than bursting to
                        // catch up more than a second's worth.
                        let floor = tokio::time::Instant::now() - Duration::from_secs(1);
                        if *next_send < floor {
                            *next_send = floor;
                        }
                    }
                }
                _ = tick.tick() => {}
            }
        }
    }
}

/// A worker calling `Recommend` in the warm-up and main phases and the no-op health check
/// in the no-op phase, one call at a time (so workers = concurrency).
pub struct RpcWorker {
    /// Its own connection.
    pub channel: Conn,
    /// Who to ask for.
    pub workload: Arc<Workload>,
    /// Items per answer.
    pub count: u32,
    /// Calls a second for this worker; `None` is flat out.
    pub rate: Option<f64>,
    /// Seed of its user choice.
    pub seed: u64,
    /// Where to book.
    pub recorder: Arc<Recorder>,
}

impl RpcWorker {
    /// Calls until the run is done.
    pub async fn run(self) {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut recommend = RecommendServiceClient::new(self.channel.clone());
        let mut health = HealthClient::new(self.channel.clone());
        let interval = self
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(1.0 / r));
        let mut next = tokio::time::Instant::now();
        loop {
            let phase = self.recorder.phase();
            let Some(stats) = self.recorder.get(phase) else {
                return;
            };
            if let Some(interval) = interval {
                sleep_until(next).await;
                next = (next + interval).max(tokio::time::Instant::now() - Duration::from_secs(1));
            }
            let started = Instant::now();
            if phase == Phase::Noop {
                let call = health.check(HealthCheckRequest {
                    service: String::new(),
                });
                match timeout(ANSWER_TIMEOUT, call).await {
                    Ok(Ok(_)) => stats.noop(started.elapsed()),
                    Ok(Err(status)) => stats.error("noop", status.code()),
                    Err(_) => stats.error("noop", tonic::Code::DeadlineExceeded),
                }
            } else {
                let call = recommend.recommend(proto::RecommendRequest {
                    user_id: self.workload.recommend_user(&mut rng),
                    count: self.count,
                    filter: None,
                });
                match timeout(ANSWER_TIMEOUT, call).await {
                    Ok(Ok(answer)) => {
                        let answer = answer.get_ref();
                        let personalised = answer
                            .items
                            .first()
                            .is_some_and(|i| i.source() != proto::Source::Popular);
                        stats.recommend(started.elapsed(), answer.degraded, personalised)
                    }
                    Ok(Err(status)) => stats.error("recommend", status.code()),
                    Err(_) => stats.error("recommend", tonic::Code::DeadlineExceeded),
                }
            }
        }
    }
}

/// The freshness probe: sends one event for its own user on its own stream, and after the
/// ack calls `Recommend` for that user until the answer's profile version shows the
/// event; the time from ack to that answer is one freshness sample.
pub struct Probe {
    /// Its own connection.
    pub channel: Conn,
    /// Items drawn by popularity.
    pub workload: Arc<Workload>,
    /// Time between probes.
    pub every: Duration,
    /// Where to book.
    pub recorder: Arc<Recorder>,
}

impl Probe {
    /// Probes until the run is done.
    pub async fn run(self) {
        let user = format!("probe-{}", self.workload.run);
        let mut rng = StdRng::seed_from_u64(0x9e0b);
        let mut applied = 0u64;
        let mut sent = 0u64;
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while self.recorder.phase() != Phase::Done {
            let mut pipe = match Pipe::open(self.channel.clone(), 1).await {
                Ok(pipe) => pipe,
                Err(status) => {
                    self.book("probe", status.code());
                    sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut recommend = RecommendServiceClient::new(self.channel.clone());
            loop {
                tick.tick().await;
                let phase = self.recorder.phase();
                let Some(stats) = self.recorder.get(phase) else {
                    return;
                };
                sent += 1;
                let kind = if sent.is_multiple_of(4) {
                    proto::EventKind::Purchase
                } else {
                    proto::EventKind::View
                };
                let item = Workload::item_id(self.workload.popular_item(&mut rng));
                let event = proto::Event {
                    event_id: format!("{user}-{sent}"),
                    user_id: user.clone(),
                    item_id: item,
                    kind: kind as i32,
                    timestamp: Some(now()),
                    ..Default::default()
                };
                let acked = match pipe.push(vec![event]).await {
                    Ok(_) => timeout(ANSWER_TIMEOUT, pipe.next_ack()).await,
                    Err(status) => Ok(Err(status)),
                };
                let acked = match acked {
                    Ok(Ok(acked)) => acked,
                    Ok(Err(status)) => {
                        stats.error("probe", status.code());
                        break;
                    }
                    Err(_) => {
                        stats.error("probe", tonic::Code::DeadlineExceeded);
                        break;
                    }
                };
                let ack_at = Instant::now();
                if acked.ack.filtered > 0 {
                    stats
                        .probe_filtered
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                if acked.ack.accepted == 0 {
                    stats.error("probe", tonic::Code::Aborted);
                    continue;
                }
                applied += 1;
                match self
                    .until_visible(&mut recommend, &user, applied, stats)
                    .await
                {
                    Ok(()) => stats.freshness(ack_at.elapsed(), acked.latency),
                    Err(code) => stats.error("probe", code),
                }
            }
        }
    }

    fn book(&self, source: &str, code: tonic::Code) {
        if let Some(stats) = self.recorder.current() {
            stats.error(source, code);
        }
    }

    async fn until_visible(
        &self,
        recommend: &mut RecommendServiceClient<Conn>,
        user: &str,
        version: u64,
        stats: &super::stats::PhaseStats,
    ) -> Result<(), tonic::Code> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = recommend
                .recommend(proto::RecommendRequest {
                    user_id: user.to_string(),
                    count: 10,
                    filter: None,
                })
                .await
                .map_err(|s| s.code())?;
            if answer.get_ref().profile_version >= version {
                return Ok(());
            }
            stats
                .stale_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if Instant::now() > deadline {
                stats
                    .probe_timeouts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(tonic::Code::DeadlineExceeded);
            }
        }
    }
}

/// Sends every batch of `batches` over one pipelined stream and returns the summed counts
/// (accepted, duplicate, rejected, filtered); `on_ack` sees each ack's event count.
pub async fn send_all(
    channel: Conn,
    depth: usize,
    batches: impl Iterator<Item = Vec<proto::Event>>,
    on_ack: impl Fn(u64),
) -> anyhow::Result<[u64; 4]> {
    let mut pipe = Pipe::open(channel, depth)
        .await
        .context("opening an event stream")?;
    let mut totals = [0u64; 4];
    let mut book = |acked: Vec<Acked>| {
        for a in acked {
            let counts = a.counts();
            for (t, c) in totals.iter_mut().zip(counts) {
                *t += u64::from(c);
            }
            on_ack(counts.iter().map(|c| u64::from(*c)).sum());
        }
    };
    for batch in batches {
        let acked = pipe.push(batch).await.context("sending a batch")?;
        book(acked);
    }
    let acked = timeout(ANSWER_TIMEOUT, pipe.drain())
        .await
        .map_err(|_| anyhow::anyhow!("acks did not come within {ANSWER_TIMEOUT:?}"))?
        .context("reading acks")?;
    book(acked);
    if totals[2] > 0 {
        bail!("the server rejected {} seed events", totals[2]);
    }
    Ok(totals)
}

/// An API key for `reflex bench` to send as `x-api-key` on every call; its `Debug` never
/// shows it, so it stays out of logs and reports.
#[derive(Clone)]
pub struct BenchKey(MetadataValue<Ascii>);

impl std::str::FromStr for BenchKey {
    type Err = anyhow::Error;

    fn from_str(key: &str) -> anyhow::Result<Self> {
        if key.is_empty() {
            bail!("the API key is empty");
        }
        // The error would quote the key, so it is replaced.
        let value = key
            .parse()
            .map_err(|_| anyhow::anyhow!("the API key must be printable ASCII"))?;
        Ok(Self(value))
    }
}

impl std::fmt::Debug for BenchKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BenchKey(***)")
    }
}

/// Adds the API key, when there is one, to every call.
#[derive(Clone, Debug)]
pub struct WithKey(Option<BenchKey>);

impl Interceptor for WithKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(BenchKey(key)) = &self.0 {
            request.metadata_mut().insert("x-api-key", key.clone());
        }
        Ok(request)
    }
}

/// A connection to the server under test, authenticated when a key was given.
pub type Conn = InterceptedService<Channel, WithKey>;

/// The server under test: where it is and the key to call it with.
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://HOST:PORT`.
    pub endpoint: String,
    /// Sent as `x-api-key` on every call.
    pub key: Option<BenchKey>,
}

impl Target {
    /// A new connection to the server.
    pub async fn connect(&self) -> anyhow::Result<Conn> {
        let channel = Channel::from_shared(self.endpoint.clone())
            .with_context(|| format!("bad address {}", self.endpoint))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.endpoint))?;
        Ok(InterceptedService::new(channel, WithKey(self.key.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_sent_and_never_shown() {
        let key: BenchKey = "bench-key-0123456789".parse().unwrap();
        assert!(!format!("{key:?}").contains("0123456789"));
        let mut with = WithKey(Some(key));
        let request = with.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("x-api-key").unwrap(),
            "bench-key-0123456789"
        );
        let request = WithKey(None).call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("x-api-key").is_none());
        let err = "bad\nkey".parse::<BenchKey>().unwrap_err();
        assert!(!err.to_string().contains("bad"), "{err}");
        assert!("".parse::<BenchKey>().is_err());
    }
}
