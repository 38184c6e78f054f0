//! Several `reflex serve` replicas on one real Redis (standalone, and a Cluster): the same users served consistently
//! by any replica, duplicates recognised across replicas, catalog changes seen by all,
//! and a Redis outage answered with UNAVAILABLE, then recovered from without loss.

use std::time::{Duration, Instant};

use reflex_server::proto;
use reflex_server::proto::EventKind::{Purchase, View};
use reflex_server::proto::event_service_client::EventServiceClient;
use reflex_server::proto::recommend_service_client::RecommendServiceClient;
use reflex_storage::testing::{RedisCluster, RedisServer};
use tonic::transport::Channel;

use crate::recommend::{CATEGORIES, PER_CATEGORY, category_share, train};
use crate::support::*;

fn redis_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("REFLEX_STORE__BACKEND", "redis".to_string()),
        ("REFLEX_STORE__REDIS__URL", url.to_string()),
        ("REFLEX_STORE__REDIS__COMMAND_TIMEOUT_MS", "500".to_string()),
    ]
}

fn start_replica(redis: &RedisServer, extra: &[(&str, &str)]) -> (tempfile::TempDir, Reflex) {
    start_replica_at(&redis.url(), extra)
}

/// A replica on the Redis (standalone or Cluster) at `url`.
fn start_replica_at(url: &str, extra: &[(&str, &str)]) -> (tempfile::TempDir, Reflex) {
    let dir = tempfile::tempdir().unwrap();
    let env = redis_env(url);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    let server = Reflex::start_with(dir.path(), &all);
    (dir, server)
}

async fn ingest(
    channel: &Channel,
    events: Vec<proto::Event>,
) -> Result<proto::IngestResponse, tonic::Status> {
    EventServiceClient::new(channel.clone())
        .ingest(proto::IngestRequest {
            sequence: 1,
            events,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn two_replicas_serve_the_same_users_from_one_redis() {
    let Some(redis) = RedisServer::start() else {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return;
    };
    two_replicas_serve_the_same_users(&redis.url()).await;
}

#[tokio::test]
async fn two_replicas_serve_the_same_users_from_a_redis_cluster() {
    let Some(cluster) = RedisCluster::start() else {
        eprintln!("SKIPPED: redis-server and redis-cli are needed for a Redis Cluster");
        return;
    };
    two_replicas_serve_the_same_users(&cluster.url()).await;
}

/// Two replicas on the Redis at `url`: history and catalog through A reach B, an event
/// acked by A is in B's very next answer, a duplicate sent to B is recognised, and a
/// catalog change through B reaches A's filters.
async fn two_replicas_serve_the_same_users(url: &str) {
    let (_a_dir, a) = start_replica_at(url, &[]);
    let (_b_dir, b) = start_replica_at(url, &[]);
    let (a, b) = (a.channel().await, b.channel().await);

    // Catalog and history go in through A only; B learns them from the shared store.
    upsert_catalog(&a, &CATEGORIES, PER_CATEGORY).await;
    train(&a).await;
    eventually(Duration::from_secs(10), || async {
        let r = recommend(&b, "fan-1", 8).await;
        // Learnt from the shared log (the model or the signals), not the popular fallback.
        let learnt = r
            .items
            .iter()
            .all(|i| i.source != proto::Source::Popular as i32);
        match learnt && !r.items.is_empty() {
            true => Ok(()),
            false => Err(format!("B has not learnt fan-1's history yet: {r:?}")),
        }
    })
    .await;

    let ack = ingest(
        &a,
        vec![
            event("r-x1", "buyer", "books-1", View),
            event("r-x2", "buyer", "books-2", View),
        ],
    )
    .await
    .unwrap();
    assert_eq!(ack.accepted, 2);
    let before = recommend(&b, "buyer", 8).await;
    assert_eq!(before.profile_version, 2, "B reads the profile A wrote");
    let shoes_before = category_share(&before, "shoes");

    // Acked by A, reflected by B on the very next call.
    let ack = ingest(
        &a,
        vec![
            event("r-x3", "buyer", "shoes-1", Purchase),
            event("r-x4", "buyer", "shoes-2", Purchase),
            event("r-x5", "buyer", "shoes-5", Purchase),
        ],
    )
    .await
    .unwrap();
    assert_eq!(ack.accepted, 3);
    let after = recommend(&b, "buyer", 8).await;
    assert_eq!(after.profile_version, 5);
    let shoes_after = category_share(&after, "shoes");
    assert!(
        shoes_after > shoes_before && shoes_after >= 3,
        "shoes in the buyer's top 8 on B: {shoes_before} before, {shoes_after} after: {:?}",
        ids(&after)
    );
    for bought in ["shoes-1", "shoes-2", "shoes-5"] {
        assert!(
            !ids(&after).contains(&bought.to_string()),
            "{bought} was bought"
        );
    }

    // A duplicate sent to B after A accepted it.
    let dup = ingest(&b, vec![event("r-x3", "buyer", "shoes-1", Purchase)])
        .await
        .unwrap();
    assert_eq!(statuses(&dup), [proto::EventStatus::Duplicate]);
    assert_eq!(applied_events(&a, "buyer").await, 5);
    assert_eq!(applied_events(&b, "buyer").await, 5);

    // A catalog change through B reaches A's filters.
    let top = recommend(&a, "buyer", 1).await;
    let withdrawn = top.items[0].item_id.clone();
    reflex_server::proto::catalog_service_client::CatalogServiceClient::new(b.clone())
        .upsert_items(proto::UpsertItemsRequest {
            items: vec![proto::Item {
                item_id: withdrawn.clone(),
                title: "withdrawn".into(),
                categories: vec![withdrawn.split('-').next().unwrap().to_string()],
                available: Some(false),
                embedding: vec![],
            }],
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(5), || async {
        let r = recommend(&a, "buyer", 8).await;
        match ids(&r).contains(&withdrawn) {
            false => Ok(()),
            true => Err(format!("A still recommends unavailable {withdrawn}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_redis_outage_is_unavailable_and_recovers_without_loss() {
    let Some(mut redis) = RedisServer::start_persistent() else {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return;
    };
    let (_dir, server) = start_replica(&redis, &[("REFLEX_MAINTENANCE_INTERVAL_MS", "200")]);
    let channel = server.channel().await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    let ack = ingest(&channel, vec![event("o-1", "outage-u", "toys-1", View)])
        .await
        .unwrap();
    assert_eq!(ack.accepted, 1);

    redis.stop();
    let err = ingest(&channel, vec![event("o-2", "outage-u", "toys-2", View)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    // Recommend degrades instead of failing.
    let degraded = recommend(&channel, "outage-u", 4).await;
    assert!(degraded.degraded, "{degraded:?}");

    redis.restart();
    // The retry is accepted, or a duplicate when the failed attempt did reach Redis
    // after all (the client replays commands across reconnects): either way it is
    // stored, and its profile update, if the first attempt could not confirm it, is
    // applied by maintenance after a grace period.
    eventually(Duration::from_secs(10), || async {
        match ingest(&channel, vec![event("o-2", "outage-u", "toys-2", View)]).await {
            Ok(ack) if ack.accepted + ack.duplicate == 1 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually(Duration::from_secs(15), || async {
        match applied_events(&channel, "outage-u").await {
            2 => Ok(()),
            n => Err(format!("{n} events applied, 2 expected")),
        }
    })
    .await;
    let again = ingest(&channel, vec![event("o-1", "outage-u", "toys-1", View)])
        .await
        .unwrap();
    assert_eq!(statuses(&again), [proto::EventStatus::Duplicate]);
    // A read that was slow while Redis reloaded may have marked it down again for a
    // moment (loaded CI machines): the answers come from the profile once the probe sees
    // it answer.
    eventually(Duration::from_secs(10), || async {
        let r = recommend(&channel, "outage-u", 4).await;
        match (r.degraded, r.profile_version) {
            (false, 2) => Ok(()),
            other => Err(format!("degraded, profile version: {other:?}")),
        }
    })
    .await;
}

/// Redis stalls (SIGSTOP, longer than the command timeout): `Recommend` with a 1 s
/// deadline gets its degraded answer every time, never DEADLINE_EXCEEDED, and once Redis
/// runs again answers from the profile by itself (a background probe notices).
#[tokio::test]
async fn recommend_answers_degraded_within_its_deadline_while_redis_stalls() {
    let Some(redis) = RedisServer::start() else {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return;
    };
    // The default command timeout, longer than the caller's deadline.
    let (_dir, server) = start_replica(
        &redis,
        &[("REFLEX_STORE__REDIS__COMMAND_TIMEOUT_MS", "2000")],
    );
    let channel = server.channel().await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    let ack = ingest(&channel, vec![event("s-1", "stall-u", "toys-1", View)])
        .await
        .unwrap();
    assert_eq!(ack.accepted, 1);
    let within_a_second = || async {
        let mut request = tonic::Request::new(proto::RecommendRequest {
            user_id: "stall-u".into(),
            count: 4,
            filter: None,
        });
        request.set_timeout(Duration::from_secs(1));
        RecommendServiceClient::new(channel.clone())
            .recommend(request)
            .await
            .map(|r| r.into_inner())
    };
    let answer = within_a_second().await.unwrap();
    assert!(!answer.degraded);
    assert_eq!(answer.profile_version, 1);

    redis.pause();
    let mut answers = Vec::new();
    let mut took = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        answers.push(within_a_second().await);
        took.push(started.elapsed());
    }
    redis.resume();
    eprintln!("degraded answers while redis stalls took {took:?}");
    for answer in answers {
        match answer {
            Ok(r) => assert!(r.degraded, "{r:?}"),
            Err(status) => panic!("while redis stalls: {status}"),
        }
    }
    eventually(Duration::from_secs(10), || async {
        match within_a_second().await {
            Ok(r) if !r.degraded && r.profile_version == 1 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

fn learner_flag(metrics: &str) -> Option<i64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("reflex_learner "))
        .and_then(|v| v.trim().parse().ok())
}

/// How long the hand-over test waits for what should happen within a second or two: the
/// CI machine runs the whole black-box suite on two cores at once, and a wait only costs
/// time when the test fails.
const PATIENCE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn the_learner_hands_over_when_it_dies_and_rollbacks_reach_every_replica() {
    let Some(mut redis) = RedisServer::start_persistent() else {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return;
    };
    let versions = [
        ("REFLEX_VERSIONS__LEASE_TTL_MS", "600"),
        ("REFLEX_VERSIONS__SNAPSHOT_INTERVAL_MS", "300"),
    ];
    let (_a_dir, mut a) = start_replica(
        &redis,
        &[
            versions[0],
            versions[1],
            ("REFLEX_VERSIONS__REPLICA_NAME", "replica-a"),
        ],
    );
    eventually(PATIENCE, || async {
        match learner_flag(&scrape(&a).await) {
            Some(1) => Ok(()),
            other => Err(format!("A is not the learner: {other:?}")),
        }
    })
    .await;
    let (_b_dir, b) = start_replica(
        &redis,
        &[
            versions[0],
            versions[1],
            ("REFLEX_VERSIONS__REPLICA_NAME", "replica-b"),
            ("REFLEX_MAINTENANCE_INTERVAL_MS", "200"),
        ],
    );
    let (a_channel, b_channel) = (a.channel().await, b.channel().await);
    assert_eq!(
        learner_flag(&scrape(&b).await),
        Some(0),
        "one learner at a time"
    );

    upsert_catalog(&a_channel, &CATEGORIES, PER_CATEGORY).await;
    train(&a_channel).await; // 80 users × 16 events = 1280 records
    let mut appended = 80 * 16;

    // A snapshot taken on B, a change through A, a rollback through A: B follows.
    // (Replicas learn the same events in the same order, but their item numbering, and so
    // their random starts and negatives, differ: their vectors agree only after both load
    // the same version.)
    eventually(PATIENCE, || async {
        let r = recommend(&b_channel, "fan-1", 8).await;
        // Learnt from the shared log (the model or the signals), not the popular fallback.
        let learnt = r
            .items
            .iter()
            .all(|i| i.source != proto::Source::Popular as i32);
        match learnt && !r.items.is_empty() {
            true => Ok(()),
            false => Err(format!("B has not learnt fan-1's history yet: {r:?}")),
        }
    })
    .await;
    // B follows the log on its own clock: MF serving can start before B has learnt the
    // last training records. The known-good version must hold all of them, or B keeps
    // learning after it and `good` (read off B's live model) no longer stands for it.
    let deadline = Instant::now() + PATIENCE;
    let v1 = loop {
        let v = snapshot(&b_channel, "known good").await;
        if v.log_seq == appended || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v1.log_seq, appended, "B's snapshot misses training records");
    assert_eq!(v1.taken_by, "replica-b");
    let good = similar(&b_channel, "books-1", 6).await;
    let mut stream = EventStream::open(a_channel.clone()).await;
    let mut campaign = Vec::new();
    for u in 0..100 {
        campaign.push(event(
            &format!("c-{u}"),
            &format!("mixer-{u}"),
            &format!("books-{}", u % 8),
            View,
        ));
        campaign.push(event(
            &format!("d-{u}"),
            &format!("mixer-{u}"),
            &format!("toys-{}", u % 8),
            Purchase,
        ));
    }
    assert_eq!(stream.round_trip(campaign).await.accepted, 200);
    appended += 200;
    retrying_unavailable(|| {
        let mut client =
            reflex_server::proto::model_service_client::ModelServiceClient::new(a_channel.clone());
        let request = proto::RollbackRequest { version: v1.id };
        async move { client.rollback(request).await }
    })
    .await
    .expect("rollback");
    assert_eq!(similar(&a_channel, "books-1", 6).await, good);
    eventually(PATIENCE, || async {
        match similar(&b_channel, "books-1", 6).await {
            on_b if on_b == good => Ok(()),
            on_b => Err(format!("B has not applied the rollback: {on_b:?}")),
        }
    })
    .await;

    // The learner dies mid-stream; B takes the lease within its TTL and learns every
    // event, including A's last ones.
    let last = (0..50)
        .map(|i| {
            event(
                &format!("last-{i}"),
                "late-user",
                &format!("garden-{}", i % 8),
                View,
            )
        })
        .collect();
    assert_eq!(stream.round_trip(last).await.accepted, 50);
    appended += 50;
    drop(stream);
    a.kill9();
    eventually(PATIENCE, || async {
        match learner_flag(&scrape(&b).await) {
            Some(1) => Ok(()),
            other => Err(format!("B has not taken over: {other:?}")),
        }
    })
    .await;
    let more: Vec<_> = (0..30)
        .map(|i| event(&format!("more-{i}"), "late-user", "garden-1", View))
        .collect();
    let ack = retrying_unavailable(|| {
        let mut client = EventServiceClient::new(b_channel.clone());
        let request = proto::IngestRequest {
            sequence: 1,
            events: more.clone(),
        };
        async move { client.ingest(request).await }
    })
    .await
    .expect("ingest");
    // A retried batch that reached Redis the first time comes back duplicate.
    assert_eq!(ack.accepted + ack.duplicate, 30, "{ack:?}");
    appended += 30;
    eventually(PATIENCE, || async {
        let versions = model_versions(&b_channel).await.versions;
        match versions.last() {
            Some(v)
                if v.taken_by == "replica-b"
                    && v.reason == "scheduled"
                    && v.log_seq == appended =>
            {
                Ok(())
            }
            other => Err(format!(
                "no scheduled snapshot by B covering {appended} records: {other:?}"
            )),
        }
    })
    .await;

    // Redis goes away and comes back: B recovers by itself, nothing acked is lost.
    redis.stop();
    let err = ingest(
        &b_channel,
        vec![event("gone-1", "late-user", "garden-2", View)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    redis.restart();
    eventually(PATIENCE, || async {
        match ingest(
            &b_channel,
            vec![event("gone-1", "late-user", "garden-2", View)],
        )
        .await
        {
            // Duplicate when the failed attempt reached Redis after all (see the outage test).
            Ok(ack) if ack.accepted + ack.duplicate == 1 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually(PATIENCE, || async {
        match applied_events(&b_channel, "late-user").await {
            81 => Ok(()),
            n => Err(format!("{n} of late-user's events applied, 81 expected")),
        }
    })
    .await;
    eventually(PATIENCE, || async {
        match learner_flag(&scrape(&b).await) {
            Some(1) => Ok(()),
            other => Err(format!("B lost the lease after the outage: {other:?}")),
        }
    })
    .await;
}

/// The Redis settings of a replica pointed at `url`, retrying a failed start quickly.
fn starting_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("REFLEX_STORE__BACKEND", "redis".to_string()),
        ("REFLEX_STORE__REDIS__URL", url.to_string()),
        ("REFLEX_STORE__REDIS__CONNECT_TIMEOUT_MS", "500".to_string()),
        ("REFLEX_STORE__REDIS__COMMAND_TIMEOUT_MS", "500".to_string()),
        ("REFLEX_STORE__CONNECT_RETRY_MAX_MS", "400".to_string()),
    ]
}

fn as_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn starts_before_redis_is_up_and_serves_once_it_is() {
    let Some(mut redis) = RedisServer::start() else {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return;
    };
    // Its port is known; nothing listens there until it is started again.
    redis.stop();
    let dir = tempfile::tempdir().unwrap();
    let env = starting_env(&redis.url());
    let server = Reflex::start_listening_with(dir.path(), &as_refs(&env));
    let channel = server.channel().await;
    assert_eq!(
        health(&channel).await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    let refused = RecommendServiceClient::new(channel.clone())
        .recommend(proto::RecommendRequest {
            user_id: "early".into(),
            count: 3,
            filter: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert!(refused.message().contains("starting"), "{refused}");
    assert!(
        refused.metadata().get("grpc-retry-pushback-ms").is_some(),
        "{refused:?}"
    );
    let refused = ingest(&channel, vec![event("early-1", "early", "toys-1", View)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    let stream = EventStream::try_open(channel.clone()).await;
    let status = match stream {
        Err(status) => status,
        Ok(mut stream) => stream.next_ack().await.expect("an answer").unwrap_err(),
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    // Each failed attempt is counted.
    eventually(Duration::from_secs(5), || async {
        let text = scrape(&server).await;
        let failures = text
            .lines()
            .find_map(|l| l.strip_prefix("reflex_backend_errors_total{op=\"startup\"} "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match failures >= 2 {
            true => Ok(()),
            false => Err(format!("{failures} start-up failures counted")),
        }
    })
    .await;

    redis.restart();
    eventually(Duration::from_secs(10), || async {
        match health(&channel).await {
            tonic_health::pb::health_check_response::ServingStatus::Serving => Ok(()),
            other => Err(format!("health {other:?}")),
        }
    })
    .await;
    upsert_catalog(&channel, &CATEGORIES, PER_CATEGORY).await;
    let ack = ingest(
        &channel,
        vec![
            event("late-1", "late", "toys-1", View),
            event("late-2", "late", "toys-2", Purchase),
        ],
    )
    .await
    .unwrap();
    assert_eq!(ack.accepted, 2);
    // Redis just came back: a read slower than the read timeout on a loaded machine
    // answers degraded once, until the probe sees Redis answer.
    eventually(Duration::from_secs(10), || async {
        let r = recommend(&channel, "late", 4).await;
        match (r.degraded, r.profile_version) {
            (false, 2) => Ok(()),
            other => Err(format!("degraded, profile version: {other:?}")),
        }
    })
    .await;
    let r = recommend(&channel, "late", 4).await;
    assert!(!ids(&r).contains(&"toys-2".to_string()), "purchased: {r:?}");
}

/// A port on this host where nothing listens.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

#[tokio::test]
async fn sigterm_while_waiting_for_the_store_exits_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let env = starting_env(&format!("redis://127.0.0.1:{}", dead_port()));
    let mut server = Reflex::start_listening_with(dir.path(), &as_refs(&env));
    let channel = server.channel().await;
    assert_eq!(
        health(&channel).await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), server.terminate())
        .await
        .expect("exits within 5 s of SIGTERM");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Runs `reflex serve` on the Redis backend with `env`; its exit status and stderr once it
/// exits, which it must do within 10 s.
fn serve_until_exit(env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_reflex"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("REFLEX_METRICS__LISTEN", "127.0.0.1:0")
        .env("REFLEX_STORE__BACKEND", "redis")
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .env_remove("REFLEX_CONFIG")
        .env_remove("RUST_BACKTRACE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("a misconfiguration must end the start, not be retried: {env:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

#[test]
fn a_store_misconfiguration_fails_at_start() {
    let (status, stderr) = serve_until_exit(&[("REFLEX_STORE__REDIS__URL", "redis://127.0.0.1:x")]);
    assert!(!status.success());
    assert!(stderr.contains("store.redis.url"), "{stderr}");
    let (status, stderr) = serve_until_exit(&[(
        "REFLEX_STORE__REDIS__PASSWORD_ENV",
        "REFLEX_TEST_UNSET_PASSWORD_VARIABLE",
    )]);
    assert!(!status.success());
    assert!(stderr.contains("store.redis.password_env"), "{stderr}");
}

/// `redis-cli -p PORT ARGS…` against the test's Redis: its answer, trimmed.
fn redis_cli(redis: &RedisServer, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running redis-cli {args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One fault of the campaign below.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Redis frozen (`SIGSTOP`) for three times the command timeout, then resumed.
    RedisStall,
    /// Redis killed (`SIGKILL`) and started again on its append-only file.
    RedisRestart,
    /// Replica 0 or 1 killed with `kill -9`, then a new replica started in its place.
    ReplicaKill(usize),
}

/// Issue 14's proof: writers stream to two replicas on one Redis through ten faults:
/// Redis stalls longer than the command timeout, Redis killed and restarted with its
/// append-only file, and each replica killed with `kill -9` and replaced. Every batch is
/// retried with the same event ids until it is acked, alternating replicas. Afterwards,
/// once nothing is pending, every user's profile holds exactly the events acked for them
/// (none lost, none doubled) and the log holds each acked event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_ten_faults_every_acked_event_is_applied_exactly_once() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, RwLock};

    use Fault::*;

    let Some(mut redis) = RedisServer::start_persistent() else {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return;
    };
    let settings = [
        ("REFLEX_MAINTENANCE_INTERVAL_MS", "200"),
        // Every event must be applied: no rate limit.
        (
            "REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC",
            "0",
        ),
    ];
    let mut replicas = [
        start_replica(&redis, &settings),
        start_replica(&redis, &settings),
    ];
    let channels = Arc::new(RwLock::new(vec![
        replicas[0].1.channel().await,
        replicas[1].1.channel().await,
    ]));
    let current = |channels: &Arc<RwLock<Vec<Channel>>>, i: usize| {
        let channels = channels.read().unwrap_or_else(|p| p.into_inner());
        channels[i % channels.len()].clone()
    };
    let stop = Arc::new(AtomicBool::new(false));

    const WRITERS: usize = 4;
    const USERS_PER_WRITER: usize = 5;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let channels = channels.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut acked: HashMap<String, u64> = HashMap::new();
                let mut batch_no = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let events: Vec<proto::Event> = (0..10)
                        .map(|i| {
                            event(
                                &format!("f-{w}-{batch_no}-{i}"),
                                &format!("fault-{w}-{}", i % USERS_PER_WRITER),
                                &format!("toys-{}", i % 4),
                                View,
                            )
                        })
                        .collect();
                    // The same ids until acked, alternating replicas.
                    let mut attempt = batch_no;
                    let ack = loop {
                        let channel = current(&channels, attempt);
                        let call = ingest(&channel, events.clone());
                        match tokio::time::timeout(Duration::from_secs(5), call).await {
                            Ok(Ok(ack)) => break ack,
                            _ => {
                                attempt += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    };
                    for (e, status) in events.iter().zip(statuses(&ack)) {
                        match status {
                            proto::EventStatus::Accepted | proto::EventStatus::Duplicate => {
                                *acked.entry(e.user_id.clone()).or_default() += 1;
                            }
                            other => panic!("{} answered {other:?}", e.event_id),
                        }
                    }
                    batch_no += 1;
                }
                acked
            })
        })
        .collect();

    let faults = [
        RedisStall,
        ReplicaKill(1),
        RedisRestart,
        RedisStall,
        ReplicaKill(0),
        RedisStall,
        RedisRestart,
        ReplicaKill(1),
        RedisStall,
        ReplicaKill(0),
    ];
    let mut took = Vec::new();
    for fault in faults {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let started = Instant::now();
        match fault {
            RedisStall => {
                redis.pause();
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                redis.resume();
            }
            RedisRestart => tokio::task::block_in_place(|| redis.restart()),
            ReplicaKill(i) => {
                replicas[i].1.kill9();
                // The writers retry on the other replica while this one starts again.
                let replaced = tokio::task::block_in_place(|| start_replica(&redis, &settings));
                let channel = replaced.1.channel().await;
                replicas[i] = replaced;
                channels.write().unwrap_or_else(|p| p.into_inner())[i] = channel;
            }
        }
        took.push(format!("{fault:?} {} ms", started.elapsed().as_millis()));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked: HashMap<String, u64> = HashMap::new();
    for writer in writers {
        for (user, n) in writer.await.unwrap() {
            *acked.entry(user).or_default() += n;
        }
    }
    let total: u64 = acked.values().sum();
    assert!(total > 0, "nothing was acked");

    // Repair applies what the faults left pending (after its 5 s grace).
    let pending_key = "{reflex}:pending";
    eventually(Duration::from_secs(30), || async {
        match redis_cli(&redis, &["ZCARD", pending_key]).as_str() {
            "0" => Ok(()),
            n => Err(format!("{n} positions still pending")),
        }
    })
    .await;
    let reader = current(&channels, 0);
    let (mut lost, mut doubled, mut wrong) = (0, 0, Vec::new());
    for (user, n) in &acked {
        let applied = applied_events(&reader, user).await;
        if applied != *n {
            lost += n.saturating_sub(applied);
            doubled += applied.saturating_sub(*n);
            wrong.push(format!("{user}: {applied} applied, {n} acked"));
        }
    }
    assert!(
        wrong.is_empty(),
        "of {total} acked events {lost} lost, {doubled} doubled: {wrong:?}"
    );
    assert_eq!(
        redis_cli(&redis, &["XLEN", "{reflex}:log"]),
        total.to_string(),
        "the log holds each acked event once"
    );
    eprintln!(
        "fault campaign: {total} events acked, each applied once, 0 lost, 0 doubled; faults: {}",
        took.join(", ")
    );
}
