//! The Kafka source (`source.kafka`): a consumer group reading the configured topics in
//! batches, each batch through the engine's ingest (validate, dedupe, bot filter,
//! profile, model: the gRPC stream's path), rejected and unparseable records to the
//! dead-letter topic, accepted ones to the sink, and only then the offsets committed.
//!
//! A crash or rebalance before the commit redelivers the batch; its events carry the
//! same ids (a record without one gets an id from topic, partition and offset), so ingest
//! answers `DUPLICATE` and no profile counts an event twice. While the engine refuses a
//! batch (store unavailable, overloaded) the partitions are paused and the batch retried
//! with backoff; polling goes on, so the consumer keeps its place in the group.
//!
//! Commits run on a thread of their own ([`Committer`]): a broker that goes away can
//! hold a synchronous commit indefinitely, and the worker must go on polling meanwhile,
//! as that polling also serves the statistics and errors that say whether a broker is
//! reachable.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use reflex_core::{Engine, ErrorCode, EventOutcome, RawEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::KafkaError;
use super::client::{ProducerLog, SourceContext, client_config, set_default, with_statistics};
use super::payload::{Origin, TopicKind, parse};
use crate::config::{KafkaSourceConfig, PayloadFormat, StartPosition};
use crate::metrics::Metrics;
use crate::services::{EventMirror, record_outcomes};

/// The gRPC health service name that reports whether the Kafka source reaches a broker
/// (SERVING) or none (NOT_SERVING). Readiness (`""`) does not follow it: the gRPC API
/// works without Kafka.
pub const SOURCE_HEALTH_SERVICE: &str = "reflex.source.kafka";

/// The header of a dead-letter record that says why it was refused.
pub const REASON_HEADER: &str = "reflex-reason";

/// The longest wait between retries of a refused batch.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long a dead-letter record may wait for its broker's confirmation.
const DEAD_LETTER_TIMEOUT_MS: u64 = 10_000;

/// How long a stopping source waits for its last offsets to be committed.
const LAST_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The offset to commit next (the one after the highest settled) per topic and partition.
type Offsets = BTreeMap<(String, i32), i64>;

/// One consumed record, copied out of librdkafka's buffer.
struct Record {
    topic: String,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

impl Record {
    fn of(message: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
        }
    }

    fn origin(&self) -> Origin<'_> {
        Origin {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
        }
    }
}

/// The running source: a task consuming until the server stops.
pub struct Source {
    task: JoinHandle<()>,
    reachable: Arc<AtomicBool>,
}

impl Source {
    /// Subscribes to `config.topics` and starts consuming into `engine` (and `mirror`,
    /// when a sink is configured) until `stop` turns true. Fails at once on settings
    /// librdkafka refuses; brokers that cannot be reached are retried by librdkafka and
    /// reported by [`reachable`](Self::reachable).
    pub fn start(
        config: &KafkaSourceConfig,
        max_batch: usize,
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        mirror: Option<Arc<dyn EventMirror>>,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, KafkaError> {
        let mut kinds = HashMap::new();
        for (topic, label) in &config.topics {
            let kind = TopicKind::parse(label)
                .map_err(|e| KafkaError::Setting(format!("source.kafka.topics.{topic}: {e}")))?;
            kinds.insert(topic.clone(), kind);
        }
        let mut client = client_config(
            &config.brokers,
            &config.properties,
            &config.secret_properties,
            "source.kafka",
        )?;
        let dead_letters = if config.dead_letter_topic.is_empty() {
            None
        } else {
            // The source's settings (security) apply to it too; its consumer-only ones
            // would each log a warning, so it logs errors only (failed sends are logged
            // by the source).
            let mut producer = client.clone();
            producer.set_log_level(rdkafka::config::RDKafkaLogLevel::Error);
            Some(super::sink::producer(
                producer,
                DEAD_LETTER_TIMEOUT_MS,
                "dead-letter",
            )?)
        };
        client
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match config.start {
                    StartPosition::Earliest => "earliest",
                    StartPosition::Latest => "latest",
                },
            );
        with_statistics(&mut client);
        set_default(&mut client, "enable.partition.eof", "false");
        let reachable = Arc::new(AtomicBool::new(false));
        let context = SourceContext {
            metrics: metrics.clone(),
            reachable: reachable.clone(),
        };
        let consumer: StreamConsumer<SourceContext> =
            client
                .create_with_context(context)
                .map_err(|source| KafkaError::Client {
                    what: "creating the source consumer".into(),
                    source,
                })?;
        let topics: Vec<&str> = config.topics.keys().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|source| KafkaError::Client {
                what: format!("subscribing to {}", topics.join(", ")),
                source,
            })?;
        info!(
            brokers = %config.brokers,
            group = %config.group_id,
            topics = %topics.join(","),
            "kafka source subscribed"
        );
        let consumer = Arc::new(consumer);
        let committer = Committer::start(consumer.clone(), metrics.clone())?;
        let worker = Worker {
            consumer,
            committer,
            kinds,
            format: config.format,
            max_batch: config.max_batch.min(max_batch).max(1),
            linger: Duration::from_millis(config.batch_linger_ms),
            first_backoff: Duration::from_millis(config.retry_backoff_ms),
            dead_letter_topic: config.dead_letter_topic.clone(),
            dead_letters,
            engine,
            metrics,
            mirror,
            held: Vec::new(),
            paused: false,
        };
        let task = tokio::spawn(worker.run(stop));
        Ok(Self { task, reachable })
    }

    /// True while the consumer reaches a broker.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// The flag [`reachable`](Self::reachable) reads, for a task that reports it.
    pub fn reachability(&self) -> Arc<AtomicBool> {
        self.reachable.clone()
    }

    /// Waits for the consumer to finish its batch in hand (after `stop` turned true)
    /// and leave the group.
    pub async fn stopped(self) {
        if let Err(err) = self.task.await {
            warn!(error = %err, "the kafka source task failed");
        }
    }
}

/// A record for the dead-letter topic and why.
struct DeadLetter {
    index: usize,
    reason: String,
}

/// What a batch came to.
enum Settled {
    /// Ingested, dead letters sent, mirrored: the offsets may be committed.
    Done,
    /// The server stops before the batch could be ingested: commit nothing.
    Stopped,
}

struct Worker {
    consumer: Arc<StreamConsumer<SourceContext>>,
    committer: Committer,
    kinds: HashMap<String, TopicKind>,
    format: PayloadFormat,
    max_batch: usize,
    linger: Duration,
    first_backoff: Duration,
    dead_letter_topic: String,
    dead_letters: Option<FutureProducer<ProducerLog>>,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    mirror: Option<Arc<dyn EventMirror>>,
    /// Records received while a batch was being retried, for the next batch.
    held: Vec<Record>,
    paused: bool,
}

impl Worker {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let batch = tokio::select! {
                batch = self.next_batch() => batch,
                _ = stop.wait_for(|stop| *stop) => break,
            };
            if batch.is_empty() {
                continue;
            }
            match self.settle(&batch, &mut stop).await {
                Settled::Done => self.committer.commit(&batch),
                Settled::Stopped => break,
            }
        }
        self.committer.finish().await;
        info!("kafka source stopping, leaving the group");
        self.consumer.unsubscribe();
    }

    /// Waits for a record, then takes what else comes within the linger, up to the batch
    /// size; records held during a retry come first.
    async fn next_batch(&mut self) -> Vec<Record> {
        let mut batch = std::mem::take(&mut self.held);
        // Whether a broker sent a record in this call (held records prove nothing, and
        // an error may be the broker going away).
        let mut received = false;
        if batch.is_empty() {
            match self.consumer.recv().await {
                Ok(message) => {
                    batch.push(Record::of(&message));
                    received = true;
                }
                Err(err) => {
                    warn!(error = %err, "kafka receive failed");
                    tokio::time::sleep(self.first_backoff).await;
                    return batch;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.linger;
        let mut failed = false;
        while batch.len() < self.max_batch {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(message)) => {
                    batch.push(Record::of(&message));
                    received = true;
                }
                Ok(Err(err)) => {
                    warn!(error = %err, "kafka receive failed");
                    failed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if received && !failed {
            self.consumer.context().set_reachable(true);
        }
        batch
    }

    /// Parses, ingests (retrying while the engine refuses), dead-letters and mirrors
    /// one batch.
    async fn settle(&mut self, batch: &[Record], stop: &mut watch::Receiver<bool>) -> Settled {
        let mut dead = Vec::new();
        let mut events = Vec::with_capacity(batch.len());
        // For each event, the index of its record.
        let mut of_record = Vec::with_capacity(batch.len());
        for (index, record) in batch.iter().enumerate() {
            let kind = self
                .kinds
                .get(&record.topic)
                .unwrap_or(&TopicKind::FromPayload);
            match parse(
                self.format,
                kind,
                record.payload.as_deref(),
                &record.origin(),
            ) {
                Ok(raw) => {
                    events.push(raw);
                    of_record.push(index);
                }
                Err(reason) => {
                    self.count(&record.topic, "unparseable");
                    dead.push(DeadLetter {
                        index,
                        reason: format!("unparseable: {reason}"),
                    });
                }
            }
        }
        let mut backoff = self.first_backoff;
        loop {
            let outcomes = if events.is_empty() {
                Vec::new()
            } else {
                match self.ingest(&events).await {
                    Ok(outcomes) => outcomes,
                    Err(err) => {
                        warn!(
                            error = %err,
                            retry_in_ms = backoff.as_millis() as u64,
                            "the engine refused a kafka batch; partitions paused"
                        );
                        if !self.wait(backoff, stop).await {
                            return Settled::Stopped;
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            };
            self.resume();
            let mut dead_now = Vec::new();
            for ((outcome, &index), raw) in outcomes.iter().zip(&of_record).zip(&events) {
                let topic = &batch[index].topic;
                match outcome {
                    EventOutcome::Accepted => self.count(topic, "accepted"),
                    EventOutcome::Duplicate => self.count(topic, "duplicate"),
                    EventOutcome::Filtered(_) => self.count(topic, "filtered"),
                    EventOutcome::Rejected(reason) => {
                        self.count(topic, "rejected");
                        debug!(event_id = %raw.event_id, reason, "kafka record rejected");
                        dead_now.push(DeadLetter {
                            index,
                            reason: format!("rejected: {reason}"),
                        });
                    }
                }
            }
            dead_now.append(&mut dead);
            // In the order the records came, as their partitions had them.
            dead_now.sort_by_key(|letter| letter.index);
            self.send_dead_letters(batch, &dead_now).await;
            let Some(mirror) = &self.mirror else {
                return Settled::Done;
            };
            match mirror.mirror(&events, &outcomes).await {
                Ok(()) => return Settled::Done,
                Err(err) => {
                    // Not committed: the retry's ingest answers DUPLICATE, mirrored then.
                    warn!(error = %err, "mirroring a kafka batch failed, retrying it");
                    if !self.wait(backoff, stop).await {
                        return Settled::Stopped;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One ingest through the engine, counted as the gRPC path counts it.
    async fn ingest(&self, events: &[RawEvent]) -> Result<Vec<EventOutcome>, reflex_core::Error> {
        let started = Instant::now();
        let times: Vec<Option<i64>> = events.iter().map(|e| e.timestamp_ms).collect();
        let outcomes = self.engine.ingest(events.to_vec()).await;
        let outcomes = match outcomes {
            // Refused whole for what it holds (retrying cannot help): each event is refused.
            Err(err) if err.code() == ErrorCode::InvalidArgument => {
                vec![EventOutcome::Rejected(err.to_string()); events.len()]
            }
            other => other?,
        };
        record_outcomes(&self.metrics, &outcomes, &times);
        self.metrics
            .ingest_batch_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(outcomes)
    }

    /// Waits `backoff` while polling (records that come are held for the next batch,
    /// and the consumer keeps its place in the group); false when the server stops.
    async fn wait(&mut self, backoff: Duration, stop: &mut watch::Receiver<bool>) -> bool {
        self.pause_if_not();
        let until = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                _ = stop.wait_for(|stop| *stop) => return false,
                received = self.consumer.recv() => match received {
                    Ok(message) => self.held.push(Record::of(&message)),
                    Err(err) => debug!(error = %err, "kafka receive failed while paused"),
                },
            }
        }
    }

    fn pause_if_not(&mut self) {
        if !self.paused {
            self.pause();
            self.paused = true;
        }
    }

    /// Pauses fetching from every assigned partition.
    fn pause(&self) {
        match self.consumer.assignment() {
            Ok(assigned) => {
                if let Err(err) = self.consumer.pause(&assigned) {
                    warn!(error = %err, "pausing the kafka partitions failed");
                }
            }
            Err(err) => warn!(error = %err, "reading the kafka assignment failed"),
        }
        self.metrics.kafka_paused.set(1);
    }

    /// Resumes fetching after a pause.
    fn resume(&mut self) {
        if !self.paused {
            return;
        }
        self.paused = false;
        if let Ok(assigned) = self.consumer.assignment()
            && let Err(err) = self.consumer.resume(&assigned)
        {
            warn!(error = %err, "resuming the kafka partitions failed");
        }
        self.metrics.kafka_paused.set(0);
        info!("the engine takes batches again; kafka partitions resumed");
    }

    fn count(&self, topic: &str, outcome: &str) {
        self.metrics
            .kafka_records
            .with_label_values(&[topic, outcome])
            .inc();
    }

    /// Sends `dead` records, as they came (key, value), to the dead-letter topic with the
    /// reason and their origin in headers, waiting for the broker's confirmation. A
    /// record the broker does not take is logged and counted, never retried: the
    /// partition must go on.
    async fn send_dead_letters(&self, batch: &[Record], dead: &[DeadLetter]) {
        if dead.is_empty() {
            return;
        }
        let Some(producer) = &self.dead_letters else {
            for letter in dead {
                let record = &batch[letter.index];
                warn!(
                    topic = %record.topic,
                    partition = record.partition,
                    offset = record.offset,
                    reason = %letter.reason,
                    "refused kafka record dropped (no source.kafka.dead_letter_topic)"
                );
            }
            self.metrics
                .kafka_dead_letters
                .with_label_values(&["dropped"])
                .inc_by(dead.len() as u64);
            return;
        };
        let headers: Vec<OwnedHeaders> = dead
            .iter()
            .map(|letter| {
                let record = &batch[letter.index];
                OwnedHeaders::new()
                    .insert(Header {
                        key: REASON_HEADER,
                        value: Some(letter.reason.as_str()),
                    })
                    .insert(Header {
                        key: "reflex-topic",
                        value: Some(record.topic.as_str()),
                    })
                    .insert(Header {
                        key: "reflex-partition",
                        value: Some(&record.partition.to_string()),
                    })
                    .insert(Header {
                        key: "reflex-offset",
                        value: Some(&record.offset.to_string()),
                    })
            })
            .collect();
        let sends = dead.iter().zip(headers).map(|(letter, headers)| {
            let record = &batch[letter.index];
            let mut out = FutureRecord::to(&self.dead_letter_topic).headers(headers);
            if let Some(key) = &record.key {
                out = out.key(key.as_slice());
            }
            if let Some(payload) = &record.payload {
                out = out.payload(payload.as_slice());
            }
            producer.send(out, Duration::from_millis(DEAD_LETTER_TIMEOUT_MS))
        });
        for (result, letter) in futures_util::future::join_all(sends).await.iter().zip(dead) {
            let outcome = match result {
                Ok(_) => "delivered",
                Err((err, _)) => {
                    let record = &batch[letter.index];
                    warn!(
                        error = %err,
                        topic = %record.topic,
                        offset = record.offset,
                        reason = %letter.reason,
                        "sending a record to the dead-letter topic failed; it is skipped"
                    );
                    "failed"
                }
            };
            self.metrics
                .kafka_dead_letters
                .with_label_values(&[outcome])
                .inc();
        }
    }
}

/// Commits settled offsets on a thread of its own, synchronously, one commit at a time:
/// offsets settled while a commit is in flight are merged into the next one.
struct Committer {
    /// Offsets for the thread; dropped by [`finish`](Self::finish).
    sender: Option<std::sync::mpsc::Sender<Offsets>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    fn start(
        consumer: Arc<StreamConsumer<SourceContext>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KafkaError> {
        let (sender, receiver) = std::sync::mpsc::channel::<Offsets>();
        let thread = std::thread::Builder::new()
            .name("reflex-kafka-commit".into())
            .spawn(move || {
                while let Ok(mut offsets) = receiver.recv() {
                    // Whatever else was settled meanwhile goes in the same commit.
                    while let Ok(more) = receiver.try_recv() {
                        merge(&mut offsets, more);
                    }
                    commit(&consumer, &offsets, &metrics);
                }
            })
            .map_err(KafkaError::Thread)?;
        Ok(Self {
            sender: Some(sender),
            thread: Some(thread),
        })
    }

    /// Hands the offsets after `batch` (the highest of each partition, plus one) to the
    /// thread; returns at once.
    fn commit(&self, batch: &[Record]) {
        let mut next = Offsets::new();
        for record in batch {
            let entry = next
                .entry((record.topic.clone(), record.partition))
                .or_insert(0);
            *entry = (*entry).max(record.offset + 1);
        }
        if let Some(sender) = &self.sender
            && sender.send(next).is_err()
        {
            // Only if the thread died; the records come again after a restart or a
            // rebalance and are answered DUPLICATE.
            warn!("the kafka offset commit thread is gone; these offsets stay uncommitted");
        }
    }

    /// Lets the thread commit what it was handed, waiting at most
    /// [`LAST_COMMIT_TIMEOUT`] (a broker that is gone would hold it indefinitely).
    async fn finish(&mut self) {
        self.sender = None;
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + LAST_COMMIT_TIMEOUT;
        while !thread.is_finished() {
            if tokio::time::Instant::now() >= deadline {
                warn!("the last kafka offset commit did not finish; its records come again");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if thread.join().is_err() {
            warn!("the kafka offset commit thread panicked");
        }
    }
}

/// Adds `more` to `offsets`, keeping the higher offset of each partition.
fn merge(offsets: &mut Offsets, more: Offsets) {
    for (partition, offset) in more {
        let entry = offsets.entry(partition).or_insert(offset);
        *entry = (*entry).max(offset);
    }
}

/// Commits `offsets` synchronously, timing the commit and counting a failure.
fn commit(consumer: &StreamConsumer<SourceContext>, offsets: &Offsets, metrics: &Metrics) {
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        if let Err(err) = list.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            warn!(error = %err, topic, partition, "bad offset to commit");
        }
    }
    let started = Instant::now();
    let committed = consumer.commit(&list, CommitMode::Sync);
    metrics
        .kafka_commit_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Err(err) = committed {
        // The records come again (to this consumer or, after a rebalance, another) and
        // are answered DUPLICATE.
        metrics.kafka_commit_failures.inc();
        warn!(error = %err, "committing kafka offsets failed; the batch will be redelivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_offsets_keep_the_highest_of_each_partition() {
        let mut offsets = Offsets::from([(("a".to_owned(), 0), 5), (("a".to_owned(), 1), 9)]);
        merge(
            &mut offsets,
            Offsets::from([
                (("a".to_owned(), 0), 7),
                (("a".to_owned(), 1), 3),
                (("b".to_owned(), 0), 1),
            ]),
        );
        assert_eq!(
            offsets,
            Offsets::from([
                (("a".to_owned(), 0), 7),
                (("a".to_owned(), 1), 9),
                (("b".to_owned(), 0), 1)
            ])
        );
    }
}
