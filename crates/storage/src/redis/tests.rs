//! The conformance suite against a real `redis-server` (started per test on a free port),
//! and what only a networked store must show: key layout, TTL on every key, recovery
//! after Redis restarts, `UNAVAILABLE` while it is down.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{ClientLike, KeysInterface};
use reflex_core::{
    Appended, ErrorCode, EventKind, EventSink, LogRecord, ProfilePolicy, ProfileStore, Seq,
};

use super::*;
use crate::conformance::{self, Setup, event, update, user, view};
use crate::testing::RedisServer;
use crate::{Backend, StoreConfig, Stores};

/// A fresh `redis-server`, or `None` (after saying so) when it is not installed.
fn server() -> Option<RedisServer> {
    let server = RedisServer::start();
    if server.is_none() {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
    }
    server
}

/// A fresh server and a store on it, or `None` (after saying so) without `redis-server`.
async fn fresh_with(
    config: impl FnOnce(&mut RedisConfig),
) -> Option<(RedisServer, Arc<RedisStore>)> {
    let server = server()?;
    let mut c = RedisConfig::new(server.url(), "test");
    config(&mut c);
    let store = RedisStore::connect(c, ProfilePolicy::default())
        .await
        .unwrap();
    Some((server, store))
}

async fn fresh() -> Option<(RedisServer, Arc<RedisStore>)> {
    fresh_with(|_| {}).await
}

/// A fresh server and the stores opened on it as the server opens them, for a
/// conformance case as `setup` asks.
async fn for_case(setup: Setup) -> Option<(RedisServer, Stores)> {
    let server = server()?;
    let mut config = StoreConfig {
        backend: Backend::Redis,
        redis: RedisConfig::new(server.url(), "test"),
        ..StoreConfig::default()
    };
    if let Some(window) = setup.dedupe_window_ms {
        config.redis.dedupe_window_ms = window;
    }
    let stores = config.open(&setup.policy).await.unwrap();
    assert!(
        stores.connections.is_some(),
        "redis has connections to close"
    );
    Some((server, stores))
}

crate::conformance_suite! {
    backend: for_case,
    // Redis is shared by replicas and re-applies unconfirmed updates: it runs every case.
    skip: {},
}

/// The same suite against a real three-node Redis Cluster: keys spread over the nodes by
/// hash slot, scripts called per slot, the log and dedupe keys on their own slots.
mod cluster {
    use super::*;
    use crate::testing::RedisCluster;

    /// A fresh cluster and the stores opened on it as the server opens them, or `None`
    /// (after saying so) without `redis-server` and `redis-cli`.
    async fn for_case(setup: Setup) -> Option<(RedisCluster, Stores)> {
        let Some(cluster) = RedisCluster::start() else {
            eprintln!("SKIPPED: redis-server and redis-cli are needed for a Redis Cluster");
            return None;
        };
        let mut config = StoreConfig {
            backend: Backend::Redis,
            redis: RedisConfig::new(cluster.url(), "test"),
            ..StoreConfig::default()
        };
        if let Some(window) = setup.dedupe_window_ms {
            config.redis.dedupe_window_ms = window;
        }
        let stores = config.open(&setup.policy).await.unwrap();
        Some((cluster, stores))
    }

    crate::conformance_suite! {
        backend: for_case,
        skip: {},
    }

    #[tokio::test]
    async fn a_cluster_url_makes_a_clustered_store_whose_users_spread_over_the_nodes() {
        let Some(cluster) = RedisCluster::start() else {
            eprintln!("SKIPPED: redis-server and redis-cli are needed for a Redis Cluster");
            return;
        };
        let store = RedisStore::connect(
            RedisConfig::new(cluster.url(), "test"),
            ProfilePolicy::default(),
        )
        .await
        .unwrap();
        assert!(
            store.clustered,
            "a redis-cluster:// URL makes a clustered client"
        );
        let now = reflex_core::types::now_ms();
        let events: Vec<_> = (0..60)
            .map(|i| {
                event(
                    &format!("e{i}"),
                    &format!("u{i}"),
                    "shoe",
                    EventKind::View,
                    1_000,
                )
            })
            .collect();
        let updates: Vec<_> = events
            .iter()
            .enumerate()
            .map(|(i, e)| update(i as u64 + 1, e, now))
            .collect();
        store.apply(&updates).await.unwrap();
        for i in 0..60 {
            let profile = ProfileStore::get(&*store, &user(&format!("u{i}")))
                .await
                .unwrap();
            assert_eq!(profile.map(|p| p.version), Some(1), "user u{i}");
        }
        // Each node holds some of the users' keys.
        for node in 0..cluster.node_count() {
            let keys: u64 = cluster.cli(node, &["dbsize"]).parse().unwrap();
            assert!(keys > 0, "node {node} holds no key");
        }
    }
}

#[tokio::test]
async fn every_profile_key_carries_the_ttl_and_keys_share_the_users_slot() {
    let Some((server, store)) = fresh().await else {
        return;
    };
    let e = event("ttl-1", "ttl-user", "shoe", EventKind::Purchase, 1_000);
    let now = reflex_core::types::now_ms();
    store.apply(&[update(1, &e, now)]).await.unwrap();
    let client = fred::prelude::Builder::from_config(
        fred::prelude::Config::from_url(&server.url()).unwrap(),
    )
    .build()
    .unwrap();
    client.init().await.unwrap();
    let ttl = ProfilePolicy::default().ttl_ms;
    for key in store.user_keys(&user("ttl-user")) {
        assert!(key.ends_with("{ttl-user}"), "{key} is hash-tagged by user");
        let left: i64 = client.pttl(&key).await.unwrap();
        assert!(
            left > ttl - 60_000 && left <= ttl,
            "{key} expires in {left} ms"
        );
    }
    // A later view renews every key's TTL, the purchase list's too (the script expires
    // that list only when the purchase count says it exists).
    let later = event("ttl-2", "ttl-user", "hat", EventKind::View, 2_000);
    store
        .apply(&[update(2, &later, now + 600_000)])
        .await
        .unwrap();
    for key in store.user_keys(&user("ttl-user")) {
        let left: i64 = client.pttl(&key).await.unwrap();
        assert!(
            left > ttl + 540_000 && left <= ttl + 600_000,
            "{key} expires in {left} ms after the later event"
        );
    }
}

#[tokio::test]
async fn the_log_is_bounded_by_length_and_by_age() {
    let Some((_server, store)) = fresh_with(|c| {
        c.log_max_len = 100;
        c.log_max_age_ms = 60_000;
    })
    .await
    else {
        return;
    };
    // 300 records: length trimming keeps about the last 100 (approximate trimming keeps
    // whole internal nodes, so possibly a few more).
    for chunk in 0..3 {
        let records: Vec<_> = (0..100)
            .map(|i| view(&format!("len-{chunk}-{i}"), "len-u"))
            .collect();
        store.append(&records).await.unwrap();
    }
    let kept = store.read(0, 1000).await.unwrap();
    assert!(kept.len() < 300 && kept.len() >= 100, "{} kept", kept.len());
    assert_eq!(kept.last().map(|(s, _)| *s), Some(300));

    // Old records (by ingest time) go at maintenance; young ones stay.
    let old_time = reflex_core::types::now_ms() - 120_000;
    let old: Vec<_> = (0..10)
        .map(|i| LogRecord::Event {
            event: event(&format!("age-old-{i}"), "age-u", "x", EventKind::View, 1),
            filtered: false,
            ingested_ms: old_time,
        })
        .collect();
    let store2 = RedisStore::connect(
        RedisConfig {
            prefix: "age".into(),
            log_max_age_ms: 60_000,
            ..store.config().clone()
        },
        ProfilePolicy::default(),
    )
    .await
    .unwrap();
    store2.append(&old).await.unwrap();
    store2
        .append(
            &(0..5)
                .map(|i| view(&format!("age-new-{i}"), "age-u"))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    store2.maintain().await.unwrap();
    let left = store2.read(0, 100).await.unwrap();
    assert_eq!(
        left.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [11, 12, 13, 14, 15]
    );
}

#[tokio::test]
async fn unavailable_while_redis_is_down_and_fine_when_it_returns() {
    let Some((mut server, store)) = fresh_with(|c| c.command_timeout_ms = 500).await else {
        return;
    };
    store.append(&[view("down-1", "down-u")]).await.unwrap();
    server.stop();
    let err = store.append(&[view("down-2", "down-u")]).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    let err = ProfileStore::get(&*store, &user("down-u"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");

    server.restart();
    // The client reconnects by itself (and reloads its scripts into the new server).
    let mut appended = None;
    for _ in 0..50 {
        match store.append(&[view("down-2", "down-u")]).await {
            Ok(a) => {
                appended = Some(a);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(
        matches!(appended.as_deref(), Some([Appended::At(_)])),
        "{appended:?}"
    );
}

#[tokio::test]
async fn connecting_to_nothing_is_unavailable_not_a_hang() {
    let config = StoreConfig {
        backend: Backend::Redis,
        redis: RedisConfig {
            connect_timeout_ms: 300,
            ..RedisConfig::new("redis://127.0.0.1:1", "nothing")
        },
        ..StoreConfig::default()
    };
    conformance::opening_nothing_is_unavailable(config).await;
}

#[tokio::test]
async fn an_unconfirmed_profile_update_stays_pending_until_applied() {
    let Some((_server, store)) = fresh().await else {
        return;
    };
    let records = vec![view("pend-1", "pend-u"), view("pend-2", "pend-u")];
    let appended = store.append(&records).await.unwrap();
    let seqs: Vec<Seq> = appended
        .iter()
        .filter_map(|a| match a {
            Appended::At(s) => Some(*s),
            Appended::Duplicate => None,
        })
        .collect();
    // As if the writer died before applying: both are pending (grace 0).
    assert_eq!(store.unapplied(-1_000, 10).await.unwrap(), seqs);
    assert!(
        store.unapplied(60_000, 10).await.unwrap().is_empty(),
        "not yet old enough"
    );
    let LogRecord::Event { event: e1, .. } = &records[0] else {
        unreachable!()
    };
    store
        .apply(&[update(seqs[0], e1, reflex_core::types::now_ms())])
        .await
        .unwrap();
    assert_eq!(store.unapplied(-1_000, 10).await.unwrap(), [seqs[1]]);
}

/// Appends `n` views of `item` by `user` and applies them as ingest does; returns the
/// records with their positions.
async fn ingest_views(
    store: &RedisStore,
    user: &str,
    from: usize,
    n: usize,
) -> Vec<(Seq, LogRecord)> {
    let records: Vec<LogRecord> = (from..from + n)
        .map(|i| {
            conformance::record(event(
                &format!("{user}-{i}"),
                user,
                &format!("item-{i}"),
                EventKind::View,
                1_000 + i as i64,
            ))
        })
        .collect();
    let appended = store.append(&records).await.unwrap();
    let seqs: Vec<Seq> = appended
        .iter()
        .map(|a| match a {
            Appended::At(s) => *s,
            Appended::Duplicate => panic!("fresh ids are not duplicates"),
        })
        .collect();
    let logged: Vec<(Seq, LogRecord)> = seqs.into_iter().zip(records).collect();
    let now = reflex_core::types::now_ms();
    let updates: Vec<_> = logged
        .iter()
        .map(|(seq, r)| match r {
            LogRecord::Event { event, .. } => update(*seq, event, now),
            LogRecord::Erase { .. } => unreachable!("only events here"),
        })
        .collect();
    store.apply(&updates).await.unwrap();
    logged
}

/// The user's views and recent entries as a profile counts them.
async fn views_of(store: &RedisStore, name: &str) -> (u64, usize, u64) {
    let p = ProfileStore::get(store, &user(name))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{name} has a profile"));
    let distinct: std::collections::HashSet<_> = p
        .recent
        .iter()
        .map(|i| (i.item_id.clone(), i.timestamp_ms))
        .collect();
    assert_eq!(
        distinct.len(),
        p.recent.len(),
        "recent holds an event twice: {:?}",
        p.recent
    );
    (p.count(&EventKind::View), p.recent.len(), p.version)
}

/// Issue 14's case: one event for U, then 20 more; the first applied again (as repair
/// did after reading it pending) changes nothing, though it is long out of the last 16.
#[tokio::test]
async fn a_position_is_applied_exactly_once_however_late_it_comes_again() {
    let Some((_server, store)) = fresh().await else {
        return;
    };
    let first = ingest_views(&store, "once-u", 0, 1).await;
    ingest_views(&store, "once-u", 1, 20).await;
    let before = views_of(&store, "once-u").await;
    assert_eq!(before.0, 21);
    assert_eq!(before.2, 21);
    let (seq, LogRecord::Event { event, .. }) = &first[0] else {
        unreachable!("an event")
    };
    store
        .apply(&[update(*seq, event, reflex_core::types::now_ms())])
        .await
        .unwrap();
    assert_eq!(views_of(&store, "once-u").await, before);
    assert!(store.unapplied(-1_000, 10).await.unwrap().is_empty());
}

/// A Redis stall longer than the command timeout: the apply times out at the client,
/// Redis runs the queued script when it resumes; repair afterwards applies nothing twice.
#[tokio::test]
async fn an_apply_that_timed_out_in_a_stall_is_not_applied_again_by_repair() {
    let Some((server, store)) = fresh_with(|c| c.command_timeout_ms = 300).await else {
        return;
    };
    let records = vec![conformance::record(event(
        "stall-0",
        "stall-u",
        "item-0",
        EventKind::View,
        1_000,
    ))];
    let [Appended::At(seq)] = store.append(&records).await.unwrap()[..] else {
        panic!("a fresh id is appended")
    };
    let LogRecord::Event { event: e0, .. } = &records[0] else {
        unreachable!("an event")
    };
    server.pause();
    let stalled = store
        .apply(&[update(seq, e0, reflex_core::types::now_ms())])
        .await;
    server.resume();
    let err = match stalled {
        Ok(()) => panic!("an apply during a stall longer than the timeout fails"),
        Err(err) => err,
    };
    assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
    // More events for the user, enough to push the first out of any recent-positions guard.
    let mut more = None;
    for _ in 0..50 {
        // The client may still be reconnecting just after the stall.
        match ProfileStore::get(&*store, &user("stall-u")).await {
            Ok(_) => {
                more = Some(ingest_views(&store, "stall-u", 1, 20).await);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(more.is_some(), "redis answers again after the stall");
    // Repair as the engine does: whatever is still pending, applied from the log.
    let pending = store.unapplied(-1_000, 100).await.unwrap();
    for p in &pending {
        let found = store.read(p - 1, 1).await.unwrap();
        let Some((
            s,
            LogRecord::Event {
                event, ingested_ms, ..
            },
        )) = found.first()
        else {
            panic!("pending position {p} is in the log")
        };
        store
            .apply(&[update(*s, event, *ingested_ms)])
            .await
            .unwrap();
    }
    assert_eq!(views_of(&store, "stall-u").await.0, 21);
    assert!(store.unapplied(-1_000, 10).await.unwrap().is_empty());
}

/// Filtered events are logged and deduped but never applied, so they are not pending:
/// otherwise repair would read them again on every tick, before real ones.
#[tokio::test]
async fn filtered_events_are_not_pending() {
    let Some((_server, store)) = fresh().await else {
        return;
    };
    let filtered = LogRecord::Event {
        event: event("filt-1", "filt-u", "x", EventKind::View, 1_000),
        filtered: true,
        ingested_ms: reflex_core::types::now_ms(),
    };
    let appended = store.append(std::slice::from_ref(&filtered)).await.unwrap();
    assert!(matches!(appended[..], [Appended::At(_)]));
    assert_eq!(
        store.append(&[filtered]).await.unwrap(),
        [Appended::Duplicate]
    );
    assert!(store.unapplied(-1_000, 10).await.unwrap().is_empty());
}

/// One script call covers every user of a batch: users interleaved in one batch (views,
/// purchases, late events, explicit sessions) end up as the reference `Profile::apply`
/// makes them, every position is confirmed, and the same batch again, or part of it in
/// another batch with new events, changes nothing twice.
#[tokio::test]
async fn a_batch_of_many_users_is_applied_per_user_as_the_reference_and_once() {
    let Some((_server, store)) = fresh().await else {
        return;
    };
    let policy = ProfilePolicy::default();
    let kinds = [EventKind::View, EventKind::Purchase, EventKind::Click];
    let base = 1_700_000_000_000i64;
    let events: Vec<reflex_core::Event> = (0..120i64)
        .map(|i| {
            let mut e = event(
                &format!("many-{i}"),
                &format!("many-u{}", i % 7),
                &format!("item-{}", i % 5),
                kinds[(i % 3) as usize].clone(),
                base + i * 1_000 + if i % 11 == 3 { -50_000 } else { 0 },
            );
            if i % 17 == 0 {
                e.session_id = Some(format!("s-{}", i / 34).into());
            }
            e
        })
        .collect();
    let records: Vec<LogRecord> = events.iter().cloned().map(conformance::record).collect();
    let seqs: Vec<Seq> = store
        .append(&records)
        .await
        .unwrap()
        .into_iter()
        .map(|a| match a {
            Appended::At(s) => s,
            Appended::Duplicate => panic!("fresh ids are not duplicates"),
        })
        .collect();
    let now = reflex_core::types::now_ms();
    let updates: Vec<_> = seqs
        .iter()
        .zip(&events)
        .enumerate()
        .map(|(i, (seq, e))| reflex_core::ProfileUpdate {
            seq: *seq,
            event: e,
            weight: 0.5 + i as f32 / 4.0,
            now_ms: now + i as i64,
        })
        .collect();
    store.apply(&updates).await.unwrap();
    assert!(store.unapplied(-1_000, 1_000).await.unwrap().is_empty());

    let profiles = |store: Arc<RedisStore>| async move {
        let mut got = Vec::new();
        for u in 0..7 {
            let name = format!("many-u{u}");
            let p = ProfileStore::get(&*store, &user(&name)).await.unwrap();
            got.push(p.unwrap_or_else(|| panic!("{name} has a profile")));
        }
        got
    };
    let first = profiles(store.clone()).await;
    for (u, got) in first.iter().enumerate() {
        let name = user(&format!("many-u{u}"));
        let mut expected = reflex_core::Profile::new(name.clone());
        for update in updates.iter().filter(|x| x.event.user_id == name) {
            expected.apply(update.event, update.weight, &policy, update.now_ms);
        }
        assert_eq!(got, &expected, "user many-u{u}");
    }

    // The whole batch again, then its second half with a new event of a new user.
    store.apply(&updates).await.unwrap();
    let extra = event("many-new", "many-new-u", "item-1", EventKind::View, base);
    let [Appended::At(extra_seq)] = store
        .append(&[conformance::record(extra.clone())])
        .await
        .unwrap()[..]
    else {
        panic!("a fresh id is appended")
    };
    let mut again: Vec<_> = updates[60..].to_vec();
    again.push(update(extra_seq, &extra, now));
    store.apply(&again).await.unwrap();
    assert_eq!(profiles(store.clone()).await, first);
    assert_eq!(views_of(&store, "many-new-u").await, (1, 1, 1));
    assert!(store.unapplied(-1_000, 1_000).await.unwrap().is_empty());
}

/// Ingest's one-call path on a standalone Redis: a batch with several users, a filtered
/// event and an id twice is appended (positions and duplicates as `append` answers) and
/// its new events applied as the reference `Profile::apply` does, with nothing left
/// pending; the same batch again is all duplicates and changes no profile.
#[tokio::test]
async fn append_applying_appends_and_applies_in_one_step_once() {
    let Some((_server, store)) = fresh().await else {
        return;
    };
    let policy = ProfilePolicy::default();
    let base = 1_700_000_000_000i64;
    let kinds = [EventKind::View, EventKind::Purchase, EventKind::AddToCart];
    let now = reflex_core::types::now_ms();
    let mut records: Vec<LogRecord> = (0..40i64)
        .map(|i| LogRecord::Event {
            event: event(
                &format!("one-{i}"),
                &format!("one-u{}", i % 4),
                &format!("item-{}", i % 6),
                kinds[(i % 3) as usize].clone(),
                base + i * 500 - if i % 7 == 2 { 9_000 } else { 0 },
            ),
            filtered: i == 5,
            ingested_ms: now,
        })
        .collect();
    records.push(records[3].clone()); // the same id again in the batch
    let weights: Vec<f32> = (0..records.len()).map(|i| 0.5 + i as f32).collect();
    let appended = store
        .append_applying(&records, &weights)
        .await
        .expect("a standalone redis appends and applies in one call")
        .unwrap();
    assert_eq!(appended.len(), records.len());
    assert_eq!(appended[40], Appended::Duplicate);
    let seqs: Vec<Seq> = appended[..40]
        .iter()
        .map(|a| match a {
            Appended::At(s) => *s,
            Appended::Duplicate => panic!("fresh ids are not duplicates"),
        })
        .collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<Seq>>());
    assert_eq!(store.last_seq().await.unwrap(), 40);
    assert_eq!(store.read(0, 100).await.unwrap().len(), 40);
    assert!(store.unapplied(-1_000, 100).await.unwrap().is_empty());

    let mut first = Vec::new();
    for u in 0..4 {
        let name = user(&format!("one-u{u}"));
        let mut expected = reflex_core::Profile::new(name.clone());
        for (i, record) in records[..40].iter().enumerate() {
            if let LogRecord::Event {
                event,
                filtered: false,
                ..
            } = record
                && event.user_id == name
            {
                expected.apply(event, weights[i], &policy, now);
            }
        }
        let got = ProfileStore::get(&*store, &name).await.unwrap();
        assert_eq!(got.as_ref(), Some(&expected), "user one-u{u}");
        first.push(got);
    }

    let again = store
        .append_applying(&records, &weights)
        .await
        .expect("still one call")
        .unwrap();
    assert!(again.iter().all(|a| *a == Appended::Duplicate), "{again:?}");
    for (u, before) in first.iter().enumerate() {
        let got = ProfileStore::get(&*store, &user(&format!("one-u{u}")))
            .await
            .unwrap();
        assert_eq!(&got, before, "user one-u{u}");
    }
    assert_eq!(store.last_seq().await.unwrap(), 40);
}
