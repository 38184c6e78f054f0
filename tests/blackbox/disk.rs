//! A full disk under the embedded store: ingest refused with `UNAVAILABLE` and retry
//! advice below the free-space floor, a write that fails on the full disk itself (which
//! stops fjall), readiness NOT_SERVING and liveness SERVING, recovery without a restart
//! once space returns, and no acked event lost across a `kill -9`.
//!
//! The data directory is a small tmpfs, so the test needs root (CI runs as root); it says
//! that it skipped otherwise.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use reflex_server::proto;
use reflex_server::proto::EventKind::View;
use reflex_server::proto::catalog_service_client::CatalogServiceClient;
use reflex_server::proto::event_service_client::EventServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_mib: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Writes a file at `path` that takes every free byte left.
fn fill_up(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => return,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
}

/// Upserts `count` catalog items with 1,000-byte titles: a write the free-space floor
/// does not hold back, large enough to need room on the disk.
async fn upsert(channel: &Channel, count: usize) -> Result<(), tonic::Status> {
    let items = (0..count)
        .map(|n| proto::Item {
            item_id: format!("big-{n}"),
            title: "t".repeat(1_000),
            categories: vec!["big".into()],
            available: Some(true),
            embedding: vec![],
        })
        .collect();
    CatalogServiceClient::new(channel.clone())
        .upsert_items(proto::UpsertItemsRequest { items })
        .await
        .map(|_| ())
}

/// Bytes available on the filesystem of `path`, as `df` reports them.
fn available(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("running df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df's available bytes")
}

async fn check(channel: &Channel, service: &str) -> ServingStatus {
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

async fn ingest(
    channel: &Channel,
    sequence: u64,
    events: Vec<proto::Event>,
) -> Result<proto::IngestResponse, tonic::Status> {
    EventServiceClient::new(channel.clone())
        .ingest(proto::IngestRequest { sequence, events })
        .await
        .map(|r| r.into_inner())
}

fn batch(round: u64, users: usize) -> Vec<proto::Event> {
    (0..users)
        .map(|u| {
            event(
                &format!("r{round}-u{u}"),
                &format!("user-{u}"),
                &format!("item-{}", round % 7),
                View,
            )
        })
        .collect()
}

#[tokio::test]
async fn a_full_disk_refuses_ingest_until_space_returns_and_loses_nothing() {
    if !is_root() {
        eprintln!("SKIPPED: the full-disk test mounts a tmpfs and needs root");
        return;
    }
    let Some(tmpfs) = Tmpfs::mount(48) else {
        eprintln!("SKIPPED: mounting a tmpfs failed");
        return;
    };
    let data_dir = tmpfs.path().join("data");
    let floor = 12 * 1024 * 1024;
    let env = [(
        "REFLEX_STORE__EMBEDDED__MIN_FREE_BYTES",
        &*floor.to_string(),
    )];
    let mut server = Reflex::start_with(&data_dir, &env);
    let channel = server.channel().await;
    let users = 20;
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let record = |acked: &mut BTreeMap<String, u64>,
                  ack: &proto::IngestResponse,
                  events: &[proto::Event]| {
        for (result, event) in ack.results.iter().zip(events) {
            if result.status == proto::EventStatus::Accepted as i32 {
                *acked.entry(event.user_id.clone()).or_default() += 1;
            }
        }
    };
    for round in 0..5 {
        let events = batch(round, users);
        let ack = ingest(&channel, round, events.clone()).await.unwrap();
        record(&mut acked, &ack, &events);
    }

    // Leave less than the floor free: ingest stops before the disk is full.
    let filler = tmpfs.path().join("filler");
    let fill = available(tmpfs.path()).saturating_sub(floor / 2);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let refused = ingest(&channel, 100, batch(100, users)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("disk") && refused.message().contains("min_free_bytes"),
        "the message says what is wrong and which setting: {refused:?}"
    );
    assert!(
        refused.metadata().get("grpc-retry-pushback-ms").is_some(),
        "retry advice: {refused:?}"
    );
    wait_for_readiness(&channel, ServingStatus::NotServing).await;
    assert_eq!(
        check(&channel, "reflex.v1.EventService").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        check(&channel, "liveness").await,
        ServingStatus::Serving,
        "a full disk is no reason to restart the process"
    );
    // Reads still work while writes are refused.
    assert_eq!(applied_events(&channel, "user-0").await, acked["user-0"]);

    // The disk fills up entirely (another process takes the rest): a write the floor
    // lets through fails on the disk itself, and fjall then refuses every write.
    let rest = tmpfs.path().join("rest");
    fill_up(&rest);
    let failed = upsert(&channel, 500).await.unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    let stopped = upsert(&channel, 1).await.unwrap_err();
    assert_eq!(stopped.code(), Code::Unavailable, "{stopped:?}");
    assert!(
        stopped.message().contains("earlier write failed"),
        "fjall refuses writes after the failed one: {stopped:?}"
    );
    let refused = ingest(&channel, 150, batch(150, users)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(check(&channel, "").await, ServingStatus::NotServing);
    assert_eq!(check(&channel, "liveness").await, ServingStatus::Serving);

    // Space returns: the store reopens its database, and ingest and readiness come back
    // by themselves, without a restart.
    std::fs::remove_file(&rest).unwrap();
    std::fs::remove_file(&filler).unwrap();
    let resumed = std::time::Instant::now();
    for sequence in 200.. {
        let events = batch(sequence, users);
        match ingest(&channel, sequence, events.clone()).await {
            Ok(ack) => {
                record(&mut acked, &ack, &events);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    resumed.elapsed() < Duration::from_secs(10),
                    "ingest still refused 10 s after space returned: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    wait_for_readiness(&channel, ServingStatus::Serving).await;
    for round in 300..303 {
        let events = batch(round, users);
        let ack = ingest(&channel, round, events.clone()).await.unwrap();
        record(&mut acked, &ack, &events);
    }
    // Writes other than ingest are taken again too, and nothing was applied twice.
    upsert(&channel, 500).await.unwrap();
    for (user, count) in &acked {
        assert_eq!(applied_events(&channel, user).await, *count, "{user}");
    }

    // Every acked event survives a kill -9, applied once.
    server.kill9();
    let server = Reflex::start_with(&data_dir, &env);
    let channel = server.channel().await;
    for (user, count) in &acked {
        assert_eq!(applied_events(&channel, user).await, *count, "{user}");
    }
}

async fn wait_for_readiness(channel: &Channel, want: ServingStatus) {
    eventually(Duration::from_secs(10), || async {
        match check(channel, "").await {
            now if now == want => Ok(()),
            now => Err(format!("readiness {now:?}, want {want:?}")),
        }
    })
    .await;
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
