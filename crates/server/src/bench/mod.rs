//! `reflex bench`: a load generator that drives a Reflex server over real gRPC with
//! synthetic shop traffic and reports what it measured.
//!
//! Without `--addr` it starts its own server in this process, on a free port over a
//! scratch embedded store, with the per-user bot rate limit off (synthetic users are far
//! busier than real ones would be, and the limit would filter them). With `--addr` it
//! drives that server as it is configured, and says loudly when events were filtered.
//!
//! A run: upsert the catalog; seed it (one event per item, so every item has learnt
//! factors and exact retrieval scans them all; and a short session per returning user, so
//! `Recommend` has profiles to fold in); then warm up, then the main phase (ingest streams,
//! `Recommend` workers and the freshness probe at once), then the no-op phase (the same
//! ingest, the same workers calling the gRPC health check instead: the transport's bound).
//!
//! Layout: `args` (the flags and their validation), `seed` (loading the catalog and
//! seeding items and users), `report` (what a run reports, as JSON or text), `workload`
//! (catalog, Zipf popularity, session funnels), `drivers` (ingest streams, RPC workers,
//! the probe), `stats` (histograms and summaries), `sys` (`/proc`); this file runs the
//! stages in order.

mod args;
mod drivers;
mod report;
mod seed;
mod stats;
mod sys;
mod timeline;
mod workload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub use self::args::BenchArgs;
use self::args::{endpoint_of, validate};
use self::drivers::{Conn, IngestDriver, Probe, RpcWorker, Target};
use self::report::live_line;
pub use self::report::{Cpu, Memory, Ratios, Recall, Report, Setup};
use self::stats::{Phase, Recorder};
use self::workload::{SessionGen, Workload};
use crate::config::{Config, FlagOverrides};

/// Pause before reading a server's memory, so allocator and store settle.
const SETTLE: Duration = Duration::from_millis(1500);

/// Runs `reflex bench`: against `args.addr`, or against a server started here with the
/// configuration from `config_file` and `flags` (scratch data directory and a free port
/// unless the flags say otherwise).
pub async fn run(
    args: BenchArgs,
    config_file: Option<&Path>,
    mut flags: FlagOverrides,
) -> anyhow::Result<()> {
    init_logging();
    validate(&args)?;
    let report = match args.addr.clone() {
        Some(addr) => {
            let endpoint = endpoint_of(&addr)?;
            let pid = args.server_pid.map(|pid| (pid, false));
            let metrics = args.metrics_addr.clone();
            let data_dir = args.server_data_dir.clone();
            drive(
                &args,
                &endpoint,
                format!("server at {addr}"),
                pid,
                metrics,
                data_dir,
            )
            .await?
        }
        None => {
            let scratch = tempfile::tempdir().context("creating a scratch data directory")?;
            if flags.data_dir.is_none() {
                flags.data_dir = Some(scratch.path().to_owned());
            }
            if flags.listen.is_none() {
                flags.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
            }
            let mut config = Config::load(config_file, &flags)?;
            config.engine.bot_filter.max_events_per_user_per_sec = 0;
            // A scrape endpoint on a free port (so it never collides with a real
            // server's), read for the retrieval recall.
            config.metrics.enabled = true;
            config.metrics.listen = SocketAddr::from(([127, 0, 0, 1], 0));
            let target = format!(
                "in-process server, embedded store in {} (durability {:?}), bot rate limit off",
                config.store.embedded.data_dir.display(),
                config.store.embedded.durability
            );
            let pid = Some((args.server_pid.unwrap_or_else(std::process::id), true));
            let data_dir = Some(config.store.embedded.data_dir.clone());
            let server = crate::app::InProcess::start(config).await?;
            let metrics = server.metrics_addr.map(|a| a.to_string());
            let report = drive(&args, &server.endpoint, target, pid, metrics, data_dir).await;
            server.stop().await?;
            report?
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        );
    } else {
        print!("{}", report.text());
    }
    for warning in &report.warnings {
        eprintln!("WARNING: {warning}");
    }
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second subscriber (tests calling `run` twice) is not an error worth failing on.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Waits until the server's health check says SERVING.
async fn wait_healthy(target: &Target) -> anyhow::Result<Conn> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let attempt = async {
            let channel = target.connect().await?;
            let status = HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .context("health check")?
                .into_inner()
                .status;
            // A server still recovering (or waiting for its store) says NOT_SERVING.
            if status != ServingStatus::Serving as i32 {
                bail!("health check: not serving yet (status {status})");
            }
            anyhow::Ok(channel)
        };
        match attempt.await {
            Ok(channel) => return Ok(channel),
            Err(err) if Instant::now() > deadline => {
                return Err(err.context(format!("{} is not serving", target.endpoint)));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn progress(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Tag of this run in ids: distinct across runs against one server.
fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}", (nanos as u64) ^ u64::from(std::process::id()) << 40)
}

async fn drive(
    args: &BenchArgs,
    endpoint: &str,
    target: String,
    pid: Option<(u32, bool)>,
    metrics_addr: Option<String>,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<Report> {
    let server = Target {
        endpoint: endpoint.to_string(),
        key: args.api_key.clone(),
    };
    let control = wait_healthy(&server).await?;
    let workload = Arc::new(
        Workload::new(
            args.items,
            args.users,
            args.zipf,
            args.new_users,
            args.new_items,
            run_tag(),
        )
        .with_random_event_ids(args.random_event_ids),
    );
    let rss = || pid.and_then(|(pid, _)| sys::rss_bytes(pid)).unwrap_or(0);
    let settle = || async {
        if pid.is_some() {
            tokio::time::sleep(SETTLE).await;
        }
    };
    let mut memory = pid.map(|(pid, includes)| Memory {
        pid,
        includes_load_generator: includes,
        rss_start: rss(),
        ..Memory::default()
    });
    let mut warnings = Vec::new();

    // The catalog.
    let mut setup = Setup::default();
    let started = Instant::now();
    seed::catalog(args, &control, &workload).await?;
    setup.catalog_items = args.items;
    setup.catalog_seconds = started.elapsed().as_secs_f64();
    settle().await;
    if let Some(m) = memory.as_mut() {
        m.rss_after_catalog = rss();
    }

    // Seeding.
    let started = Instant::now();
    let mut accepted = 0;
    if !args.no_seed_items {
        let totals = seed::seed_items(args, &server, &workload).await?;
        setup.seed_item_events = totals.iter().sum();
        setup.seed_filtered += totals[3];
        accepted += totals[0];
    }
    settle().await;
    if let Some(m) = memory.as_mut() {
        m.rss_after_items = rss();
    }
    if args.seed_events > 0 && args.users > 0 {
        let totals = seed::seed_users(args, &server, &workload).await?;
        setup.seed_user_events = totals.iter().sum();
        setup.seed_filtered += totals[3];
        accepted += totals[0];
    }
    setup.seed_seconds = started.elapsed().as_secs_f64();
    setup.seed_events_per_sec = accepted as f64 / setup.seed_seconds.max(1e-9);
    settle().await;
    if let Some(m) = memory.as_mut() {
        m.rss_after_users = rss();
    }
    if setup.seed_filtered > 0 {
        warnings.push(format!(
            "{} seed events were FILTERED by the server's bot filter: profiles and the model \
             did not learn them",
            setup.seed_filtered
        ));
    }

    // The index catches up with the seeded items before the load, so the main phase
    // measures the steady state rather than that catch-up.
    if let Some(addr) = metrics_addr.as_deref()
        && args.index_wait > 0.0
    {
        let started = Instant::now();
        let limit = Duration::from_secs_f64(args.index_wait);
        loop {
            match sys::scrape_backlog(addr).await {
                // A server that does not export the backlog: nothing to wait for.
                None => break,
                Some(backlog) if backlog.new == 0 => break,
                Some(backlog) if started.elapsed() >= limit => {
                    warnings.push(format!(
                        "the server's index still lacked {} seeded items after --index-wait \
                         {} s: the load measures it catching up",
                        backlog.new, args.index_wait
                    ));
                    break;
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        setup.index_wait_seconds = started.elapsed().as_secs_f64();
    }

    // The load.
    let recorder = Arc::new(Recorder::new().context("creating histograms")?);
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let per_stream_rate = args.rate.map(|r| r / args.streams.max(1) as f64);
    for s in 0..args.streams {
        let driver = IngestDriver {
            channel: server.connect().await?,
            generator: SessionGen::new(
                workload.clone(),
                args.sessions / args.streams.max(1),
                args.seed.wrapping_add(s as u64),
                format!("s{s}"),
            ),
            batch: args.batch,
            depth: args.depth,
            rate: per_stream_rate,
            recorder: recorder.clone(),
        };
        tasks.push(tokio::spawn(driver.run()));
    }
    let per_worker_rate = args
        .recommend_rate
        .map(|r| r / args.recommenders.max(1) as f64);
    for w in 0..args.recommenders {
        let worker = RpcWorker {
            channel: server.connect().await?,
            workload: workload.clone(),
            count: args.count,
            rate: per_worker_rate,
            seed: args.seed.wrapping_mul(31).wrapping_add(w as u64),
            recorder: recorder.clone(),
        };
        tasks.push(tokio::spawn(worker.run()));
    }
    if args.probe_ms > 0 {
        let probe = Probe {
            channel: server.connect().await?,
            workload: workload.clone(),
            every: Duration::from_millis(args.probe_ms),
            recorder: recorder.clone(),
        };
        tasks.push(tokio::spawn(probe.run()));
    }

    let noop_secs = if args.recommenders > 0 {
        args.noop_duration.unwrap_or(args.duration)
    } else {
        0.0
    };
    let total = args.warmup + args.duration + noop_secs;
    let bar = progress(
        (total * 1000.0) as u64,
        "{spinner} {elapsed_precise} [{bar:30}] {msg}",
    );
    let ticker = {
        let (recorder, bar) = (recorder.clone(), bar.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                bar.set_position(started.elapsed().as_millis() as u64);
                let phase = recorder.phase();
                let Some(stats) = recorder.get(phase) else {
                    break;
                };
                bar.set_message(live_line(phase, stats));
            }
        })
    };

    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    recorder.enter(Phase::Main);
    let cpu_start = (
        pid.and_then(|(p, _)| sys::cpu_seconds(p)),
        sys::cpu_seconds(std::process::id()),
    );
    let recall_start = match &metrics_addr {
        Some(addr) => sys::scrape_recall(addr).await,
        None => None,
    };
    let main_started = Instant::now();
    let timeline = (args.timeline_secs > 0.0).then(|| {
        tokio::spawn(
            timeline::Sampler {
                every: Duration::from_secs_f64(args.timeline_secs),
                recorder: recorder.clone(),
                pid: pid.map(|(pid, _)| pid),
                data_dir,
            }
            .run(),
        )
    });
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let recall = match (&metrics_addr, recall_start) {
        (Some(addr), Some(start)) => sys::scrape_recall(addr)
            .await
            .map(|end| Recall::between(start, end)),
        _ => None,
    };
    let cpu_end = (
        pid.and_then(|(p, _)| sys::cpu_seconds(p)),
        sys::cpu_seconds(std::process::id()),
    );
    let main_secs = main_started.elapsed().as_secs_f64();
    if noop_secs > 0.0 {
        recorder.enter(Phase::Noop);
        tokio::time::sleep(Duration::from_secs_f64(noop_secs)).await;
    }
    recorder.enter(Phase::Done);
    let timeline = match timeline {
        Some(task) => task.await.unwrap_or_default(),
        None => Vec::new(),
    };
    for task in tasks {
        if tokio::time::timeout(Duration::from_secs(40), task)
            .await
            .is_err()
        {
            warnings.push("a load task did not stop within 40 s".into());
        }
    }
    ticker.abort();
    bar.finish_and_clear();

    let cores = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some((b - a) / main_secs),
        _ => None,
    };
    let in_process = pid.is_some_and(|(_, includes)| includes);
    let cpu = Cpu {
        server_cores: cores(cpu_start.0, cpu_end.0),
        load_generator_cores: if in_process {
            None
        } else {
            cores(cpu_start.1, cpu_end.1)
        },
    };
    if let Some(m) = memory.as_mut() {
        m.rss_end = rss();
        m.bytes_per_item = m.rss_after_items.saturating_sub(m.rss_start) as f64 / args.items as f64;
        m.bytes_per_user = if args.seed_events > 0 && args.users > 0 {
            m.rss_after_users.saturating_sub(m.rss_after_items) as f64 / args.users as f64
        } else {
            0.0
        };
    }

    let main = recorder
        .get(Phase::Main)
        .map(|s| s.summary())
        .unwrap_or_default();
    let noop = (noop_secs > 0.0)
        .then(|| recorder.get(Phase::Noop).map(|s| s.summary()))
        .flatten();
    let ratios = noop.as_ref().and_then(|n| {
        (n.noop_qps > 0.0 && n.noop_ms.p99 > 0.0).then(|| Ratios {
            qps: main.recommend_qps / n.noop_qps,
            p99: main.recommend_ms.p99 / n.noop_ms.p99,
        })
    });
    let filtered = main.ingest.filtered + noop.as_ref().map_or(0, |n| n.ingest.filtered);
    if filtered > 0 {
        let sent = main.ingest.accepted + main.ingest.filtered;
        warnings.push(format!(
            "{filtered} events were FILTERED by the server's bot filter ({:.1}% of the main \
             phase): they changed no profile and no model, so the accepted rate understates \
             the offered load. Start the server with \
             REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC=0 to measure ingest",
            100.0 * main.ingest.filtered as f64 / sent.max(1) as f64
        ));
    }
    if main.stale_reads > 0 {
        warnings.push(format!(
            "{} probe Recommend calls after an ack did not reflect the acked event \
             (read-your-writes violated)",
            main.stale_reads
        ));
    }
    if main.probe_filtered > 0 {
        warnings.push(format!(
            "{} probe events were filtered; raise --probe-ms",
            main.probe_filtered
        ));
    }
    if metrics_addr.is_some() && recall.is_none() {
        warnings.push("could not read the retrieval recall from the metrics endpoint".into());
    }
    Ok(Report {
        target,
        args: args.clone(),
        setup,
        main,
        noop,
        ratios,
        recall,
        memory,
        cpu,
        timeline,
        warnings,
    })
}
