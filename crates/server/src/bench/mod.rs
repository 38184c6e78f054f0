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
//! Layout: `workload` (catalog, Zipf popularity, session funnels), `drivers` (ingest
//! streams, RPC workers, the probe), `stats` (histograms and summaries), `sys` (`/proc`).

mod drivers;
mod stats;
mod sys;
mod workload;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::task::JoinHandle;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use self::drivers::{BenchKey, Conn, IngestDriver, Probe, RpcWorker, Target, send_all};
use self::stats::{Phase, PhaseSummary, Recorder};
use self::workload::{SessionGen, Workload, now};
use crate::config::{Config, FlagOverrides};
use crate::proto;
use crate::proto::catalog_service_client::CatalogServiceClient;
use crate::proto::profile_service_client::ProfileServiceClient;

/// Items per `UpsertItems` call while loading the catalog.
const CATALOG_CHUNK: usize = 5_000;
/// Items each seeding user touches (under the default bot burst of 200, so seeding a
/// server with the filter on is not filtered).
const ITEMS_PER_SEED_USER: usize = 100;
/// Pause before reading a server's memory, so allocator and store settle.
const SETTLE: Duration = Duration::from_millis(1500);

/// Flags of `reflex bench`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct BenchArgs {
    /// Server to drive, as HOST:PORT (or `http://HOST:PORT`); without it a server is started in this process on a
    /// scratch embedded store (with the per-user bot rate limit off).
    #[arg(long)]
    pub addr: Option<String>,
    /// API key sent as `x-api-key` on every call, for a server with `auth.enabled`; it
    /// needs the `ingest`, `recommend` and `admin` scopes (the run loads the catalog and
    /// erases its seeding users). Never printed.
    #[arg(long, env = "REFLEX_BENCH_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub api_key: Option<BenchKey>,
    /// Items in the catalog.
    #[arg(long, default_value_t = 10_000)]
    pub items: usize,
    /// Returning users.
    #[arg(long, default_value_t = 100_000)]
    pub users: usize,
    /// Exponent of the Zipf item popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Share of sessions and recommend calls from users never seen before.
    #[arg(long, default_value_t = 0.05)]
    pub new_users: f64,
    /// Share of events on items outside the initial catalog.
    #[arg(long, default_value_t = 0.0001)]
    pub new_items: f64,
    /// Events per returning user sent while seeding (0 skips user seeding).
    #[arg(long, default_value_t = 5)]
    pub seed_events: usize,
    /// Skip seeding one event per catalog item.
    #[arg(long)]
    pub no_seed_items: bool,
    /// Bidirectional ingest streams, each on its own connection (0: no ingest).
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Events per batch.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Batches in flight per stream.
    #[arg(long, default_value_t = 4)]
    pub depth: usize,
    /// Open shopping sessions interleaved across all streams.
    #[arg(long, default_value_t = 20_000)]
    pub sessions: usize,
    /// Total events per second to offer; flat out when absent.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Concurrent `Recommend` workers, one call in flight each, each on its own connection
    /// (the no-op phase uses the same workers).
    #[arg(long, default_value_t = 4)]
    pub recommenders: usize,
    /// Total `Recommend` calls per second to offer; flat out when absent.
    #[arg(long)]
    pub recommend_rate: Option<f64>,
    /// Items asked per `Recommend`.
    #[arg(long, default_value_t = 10)]
    pub count: u32,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Seconds of the main phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of the no-op phase; defaults to `--duration`, 0 skips it.
    #[arg(long)]
    pub noop_duration: Option<f64>,
    /// Milliseconds between freshness probes (0: no probe). Keep it above 20 against a
    /// server with the default bot rate limit (50 events/s per user).
    #[arg(long, default_value_t = 25)]
    pub probe_ms: u64,
    /// Process id of the server, to report its memory (VmRSS) at each stage and its CPU
    /// use; a server in this process is measured by itself (load generator included).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The server's metrics endpoint (HOST:PORT), to report the recall of its
    /// approximate retrieval over the main phase (its own sampled check against the exact
    /// scan); a server in this process is read without it.
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Seed of the workload.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The gRPC endpoint for `--addr`: `HOST:PORT`, or the same with an `http://` prefix.
fn endpoint_of(addr: &str) -> anyhow::Result<String> {
    if addr.starts_with("https://") {
        anyhow::bail!("--addr {addr}: reflex bench speaks plaintext gRPC only (no TLS)");
    }
    let bare = addr
        .strip_prefix("http://")
        .unwrap_or(addr)
        .trim_end_matches('/');
    anyhow::ensure!(
        !bare.is_empty() && !bare.contains("://") && !bare.contains('/'),
        "--addr {addr}: expected HOST:PORT, e.g. 127.0.0.1:50051"
    );
    Ok(format!("http://{bare}"))
}

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
            drive(&args, &endpoint, format!("server at {addr}"), pid, metrics).await?
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
            let server = crate::app::InProcess::start(config).await?;
            let metrics = server.metrics_addr.map(|a| a.to_string());
            let report = drive(&args, &server.endpoint, target, pid, metrics).await;
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

fn validate(args: &BenchArgs) -> anyhow::Result<()> {
    if args.items == 0 {
        bail!("--items must be at least 1");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    for (name, share) in [
        ("--new-users", args.new_users),
        ("--new-items", args.new_items),
    ] {
        if !(0.0..=1.0).contains(&share) {
            bail!("{name} must be a share between 0 and 1, got {share}");
        }
    }
    for (name, secs) in [
        ("--warmup", args.warmup),
        ("--duration", args.duration),
        ("--noop-duration", args.noop_duration.unwrap_or(0.0)),
    ] {
        if !(secs.is_finite() && secs >= 0.0) {
            bail!("{name} must be a number of seconds, got {secs}");
        }
    }
    if args.duration <= 0.0 {
        bail!("--duration must be positive");
    }
    if !(args.zipf.is_finite() && args.zipf >= 0.0) {
        bail!("--zipf must be finite and >= 0");
    }
    Ok(())
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

/// What to do about a refusal by the server's API key check, the first call that needs a
/// key being the catalog upsert.
fn auth_hint(status: &tonic::Status, has_key: bool) -> &'static str {
    match status.code() {
        tonic::Code::Unauthenticated if has_key => " (the server does not know this API key)",
        tonic::Code::Unauthenticated => {
            " (the server requires an API key: pass --api-key or set REFLEX_BENCH_API_KEY)"
        }
        tonic::Code::PermissionDenied => {
            " (the API key needs the admin scope: the run loads the catalog and erases users)"
        }
        _ => "",
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

/// Server memory at each stage of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Memory {
    /// Whose.
    pub pid: u32,
    /// The load generator shares the process (in-process server).
    pub includes_load_generator: bool,
    /// Before the catalog.
    pub rss_start: u64,
    /// After the catalog upsert.
    pub rss_after_catalog: u64,
    /// After one event per item (every item has factors; seeding profiles erased).
    pub rss_after_items: u64,
    /// After seeding every returning user.
    pub rss_after_users: u64,
    /// At the end of the run.
    pub rss_end: u64,
    /// `(rss_after_items - rss_start) / items`.
    pub bytes_per_item: f64,
    /// `(rss_after_users - rss_after_items) / users`, at `seed_events` events each.
    pub bytes_per_user: f64,
}

/// The server's own recall checks (one approximate search in `recall_check_every`
/// answered again by the exact scan) that fell in the main phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Recall {
    /// Searches checked.
    pub checks: u64,
    /// Items of the exact answers.
    pub wanted: u64,
    /// Of those, items the approximate answers held.
    pub found: u64,
    /// `found / wanted`; `None` without a check (the exact scan answered every search).
    pub recall: Option<f64>,
}

impl Recall {
    fn between(start: reflex_core::RecallChecks, end: reflex_core::RecallChecks) -> Self {
        let wanted = end.wanted.saturating_sub(start.wanted);
        let found = end.found.saturating_sub(start.found);
        Self {
            checks: end.checks.saturating_sub(start.checks),
            wanted,
            found,
            recall: (wanted > 0).then(|| found as f64 / wanted as f64),
        }
    }
}

/// CPU used during the main phase, in cores (CPU seconds per second).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cpu {
    /// The server process (which includes the load generator when in-process).
    pub server_cores: Option<f64>,
    /// This process, when the server is elsewhere.
    pub load_generator_cores: Option<f64>,
}

/// Loading and seeding.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Setup {
    /// Catalog items upserted.
    pub catalog_items: usize,
    /// Seconds the upsert took.
    pub catalog_seconds: f64,
    /// Events sent to seed items.
    pub seed_item_events: u64,
    /// Events sent to seed users.
    pub seed_user_events: u64,
    /// Seconds seeding took (items, erasing seed users, users).
    pub seed_seconds: f64,
    /// Seed events accepted per second.
    pub seed_events_per_sec: f64,
    /// Seed events the server filtered.
    pub seed_filtered: u64,
}

/// Recommend against the no-op RPC at the same concurrency.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Ratios {
    /// Recommend QPS / no-op QPS.
    pub qps: f64,
    /// Recommend p99 / no-op p99.
    pub p99: f64,
}

/// Everything `reflex bench` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// What was driven.
    pub target: String,
    /// The flags.
    pub args: BenchArgs,
    /// Catalog and seeding.
    pub setup: Setup,
    /// Ingest + Recommend + probe.
    pub main: PhaseSummary,
    /// Ingest + no-op health checks.
    pub noop: Option<PhaseSummary>,
    /// Recommend relative to the no-op RPC.
    pub ratios: Option<Ratios>,
    /// The server's retrieval recall over the main phase, when its metrics were read.
    pub recall: Option<Recall>,
    /// Server memory.
    pub memory: Option<Memory>,
    /// CPU in the main phase.
    pub cpu: Cpu,
    /// Things that make the figures suspect.
    pub warnings: Vec<String>,
}

async fn drive(
    args: &BenchArgs,
    endpoint: &str,
    target: String,
    pid: Option<(u32, bool)>,
    metrics_addr: Option<String>,
) -> anyhow::Result<Report> {
    let server = Target {
        endpoint: endpoint.to_string(),
        key: args.api_key.clone(),
    };
    let control = wait_healthy(&server).await?;
    let workload = Arc::new(Workload::new(
        args.items,
        args.users,
        args.zipf,
        args.new_users,
        args.new_items,
        run_tag(),
    ));
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
    let bar = progress(
        args.items as u64,
        "catalog {bar:40} {pos}/{len} items {per_sec}",
    );
    let mut catalog = CatalogServiceClient::new(control.clone()).max_decoding_message_size(1 << 26);
    for start in (0..args.items).step_by(CATALOG_CHUNK) {
        let end = (start + CATALOG_CHUNK).min(args.items);
        catalog
            .upsert_items(proto::UpsertItemsRequest {
                items: workload.catalog(start..end),
            })
            .await
            .map_err(|status| {
                let hint = auth_hint(&status, args.api_key.is_some());
                anyhow::Error::new(status)
                    .context(format!("upserting catalog items {start}..{end}{hint}"))
            })?;
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();
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
        let totals = seed_items(args, &server, &workload).await?;
        setup.seed_item_events = totals.iter().sum();
        setup.seed_filtered += totals[3];
        accepted += totals[0];
    }
    settle().await;
    if let Some(m) = memory.as_mut() {
        m.rss_after_items = rss();
    }
    if args.seed_events > 0 && args.users > 0 {
        let totals = seed_users(args, &server, &workload).await?;
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
        warnings,
    })
}

/// One line of live figures for the progress bar.
fn live_line(phase: Phase, stats: &stats::PhaseStats) -> String {
    let secs = stats.seconds().max(1e-3);
    let accepted = stats.ingest.accepted.load(Ordering::Relaxed);
    let filtered = stats.ingest.filtered.load(Ordering::Relaxed);
    let mut line = format!(
        "{:<6} ingest {:>8.0} ev/s",
        format!("{phase:?}").to_lowercase(),
        accepted as f64 / secs
    );
    if phase == Phase::Noop {
        let _ = write!(line, "  noop {:>7.0}/s", stats.noop_count() as f64 / secs);
    } else {
        let _ = write!(
            line,
            "  recommend {:>6.0}/s",
            stats.recommend_count() as f64 / secs
        );
    }
    if filtered > 0 {
        let _ = write!(line, "  FILTERED {filtered}");
    }
    let errors = stats.error_count();
    if errors > 0 {
        let _ = write!(line, "  errors {errors}");
    }
    line
}

/// One view of every catalog item, by users that touch [`ITEMS_PER_SEED_USER`] items
/// each; those users are erased afterwards so they do not count as users.
async fn seed_items(
    args: &BenchArgs,
    target: &Target,
    workload: &Arc<Workload>,
) -> anyhow::Result<[u64; 4]> {
    let bar = progress(
        args.items as u64,
        "items  {bar:40} {pos}/{len} events {per_sec}",
    );
    let streams = args.streams.max(1);
    let per_stream = args.items.div_ceil(streams);
    let mut tasks = Vec::new();
    for s in 0..streams {
        let (start, end) = (s * per_stream, ((s + 1) * per_stream).min(args.items));
        let (workload, bar, batch) = (workload.clone(), bar.clone(), args.batch);
        let channel = target.connect().await?;
        let depth = args.depth;
        tasks.push(tokio::spawn(async move {
            let ts = now();
            let batches = (start..end).step_by(batch).map(move |b| {
                (b..(b + batch).min(end))
                    .map(|n| proto::Event {
                        event_id: format!("seed-{}-{n}", workload.run),
                        user_id: format!("seed-{}-{}", workload.run, n / ITEMS_PER_SEED_USER),
                        item_id: Workload::item_id(n),
                        kind: proto::EventKind::View as i32,
                        timestamp: Some(ts),
                        ..Default::default()
                    })
                    .collect()
            });
            send_all(channel, depth, batches, |n| bar.inc(n)).await
        }));
    }
    let totals = join_totals(tasks).await?;
    bar.finish_and_clear();
    let seed_users = args.items.div_ceil(ITEMS_PER_SEED_USER);
    let profiles = ProfileServiceClient::new(target.connect().await?);
    let run = workload.run.clone();
    let erased: Vec<anyhow::Result<()>> = futures_util::stream::iter(0..seed_users)
        .map(|u| {
            let mut client = profiles.clone();
            let user_id = format!("seed-{run}-{u}");
            async move {
                client
                    .erase_profile(proto::EraseProfileRequest { user_id })
                    .await
                    .context("erasing a seeding user")?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    erased.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(totals)
}

/// `seed_events` events for every returning user.
async fn seed_users(
    args: &BenchArgs,
    target: &Target,
    workload: &Arc<Workload>,
) -> anyhow::Result<[u64; 4]> {
    let total = (args.users * args.seed_events) as u64;
    let bar = progress(total, "users  {bar:40} {pos}/{len} events {per_sec}");
    let streams = args.streams.max(1);
    let per_stream = args.users.div_ceil(streams);
    let users_per_batch = (args.batch / args.seed_events).max(1);
    let mut tasks = Vec::new();
    for s in 0..streams {
        let (start, end) = (s * per_stream, ((s + 1) * per_stream).min(args.users));
        let mut generator = SessionGen::new(
            workload.clone(),
            1,
            args.seed.wrapping_add(1000 + s as u64),
            format!("seed{s}"),
        );
        let (bar, n) = (bar.clone(), args.seed_events);
        let channel = target.connect().await?;
        let depth = args.depth;
        tasks.push(tokio::spawn(async move {
            let batches = (start..end).step_by(users_per_batch).map(move |b| {
                let ts = now();
                (b..(b + users_per_batch).min(end))
                    .flat_map(|u| generator.seed_user(u, n, ts))
                    .collect::<Vec<_>>()
            });
            send_all(channel, depth, batches, |n| bar.inc(n)).await
        }));
    }
    let totals = join_totals(tasks).await?;
    bar.finish_and_clear();
    Ok(totals)
}

async fn join_totals(tasks: Vec<JoinHandle<anyhow::Result<[u64; 4]>>>) -> anyhow::Result<[u64; 4]> {
    let mut totals = [0u64; 4];
    for task in tasks {
        let part = task.await.context("joining a seeding task")??;
        for (t, p) in totals.iter_mut().zip(part) {
            *t += p;
        }
    }
    Ok(totals)
}

impl Report {
    /// The report as text.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let a = &self.args;
        let _ = writeln!(out, "reflex bench: {}", self.target);
        let _ = writeln!(
            out,
            "workload: {} items (Zipf s={}), {} returning users, new users {:.1}%, new items {:.2}%; \
             {} stream(s) x batch {} (depth {}), {}; {} recommend worker(s) (k={}), {}",
            a.items,
            a.zipf,
            a.users,
            a.new_users * 100.0,
            a.new_items * 100.0,
            a.streams,
            a.batch,
            a.depth,
            a.rate.map_or("flat out".to_string(), |r| format!(
                "{r:.0} events/s offered"
            )),
            a.recommenders,
            a.count,
            a.recommend_rate.map_or("flat out".to_string(), |r| format!(
                "{r:.0} calls/s offered"
            )),
        );
        let s = &self.setup;
        let _ = writeln!(
            out,
            "setup: catalog of {} items in {:.2} s; seeded {} item + {} user events in {:.2} s \
             ({:.0} accepted/s)",
            s.catalog_items,
            s.catalog_seconds,
            s.seed_item_events,
            s.seed_user_events,
            s.seed_seconds,
            s.seed_events_per_sec
        );
        let lat = |l: &stats::LatencySummary| {
            format!(
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  (n={})",
                l.p50, l.p90, l.p99, l.p999, l.max, l.count
            )
        };
        let recall = self.recall.as_ref();
        let phase = |out: &mut String, name: &str, p: &PhaseSummary| {
            let i = &p.ingest;
            let _ = writeln!(out, "\n{name} ({:.1} s)", p.seconds);
            if i.batches > 0 {
                let _ = writeln!(
                    out,
                    "  ingest     {:>10.0} events/s accepted  ({:.0} batches/s; accepted {}, \
                     duplicate {}, rejected {}, filtered {})",
                    i.events_accepted_per_sec,
                    i.batches_per_sec,
                    i.accepted,
                    i.duplicate,
                    i.rejected,
                    i.filtered
                );
                let _ = writeln!(out, "  batch ack  {}", lat(&i.ack_latency_ms));
            }
            if p.recommend_ms.count > 0 {
                let _ = writeln!(
                    out,
                    "  recommend  {:>10.0} QPS  {}",
                    p.recommend_qps,
                    lat(&p.recommend_ms)
                );
                let _ = writeln!(
                    out,
                    "             personalised (first item from a model): {:.1}%",
                    100.0 * p.recommend_personalised as f64 / p.recommend_ms.count as f64
                );
            }
            if let Some(r) = recall.filter(|_| p.recommend_ms.count > 0) {
                let _ = match r.recall {
                    Some(recall) => writeln!(
                        out,
                        "             recall@k of the index (server's check): {:.3} over {} checks",
                        recall, r.checks
                    ),
                    None => writeln!(
                        out,
                        "             recall@k of the index: no check (the exact scan answered)"
                    ),
                };
            }
            if p.noop_ms.count > 0 {
                let _ = writeln!(
                    out,
                    "  noop RPC   {:>10.0} QPS  {}",
                    p.noop_qps,
                    lat(&p.noop_ms)
                );
            }
            if p.freshness_ms.count > 0 {
                let _ = writeln!(out, "  freshness  ack -> visible: {}", lat(&p.freshness_ms));
                let _ = writeln!(
                    out,
                    "             probe batch ack: p50 {:.3}  p99 {:.3} ms; stale reads {}, \
                     timeouts {}",
                    p.probe_ack_ms.p50, p.probe_ack_ms.p99, p.stale_reads, p.probe_timeouts
                );
            }
            if p.errors.is_empty() {
                let _ = writeln!(out, "  errors     none");
            } else {
                for e in &p.errors {
                    let _ = writeln!(out, "  errors     {} {}: {}", e.source, e.code, e.count);
                }
            }
        };
        phase(
            &mut out,
            "main phase: ingest + recommend + probe",
            &self.main,
        );
        if let Some(noop) = &self.noop {
            phase(
                &mut out,
                "no-op phase: ingest + health check at the same concurrency",
                noop,
            );
        }
        if let Some(r) = &self.ratios {
            let _ = writeln!(
                out,
                "\nrecommend vs no-op RPC: QPS {:.1}% of the no-op's, p99 {:.2}x the no-op's",
                r.qps * 100.0,
                r.p99
            );
        }
        if let Some(m) = &self.memory {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            let _ = writeln!(
                out,
                "\nmemory (VmRSS of pid {}{}): start {:.1} MiB, catalog {:.1}, items seeded {:.1}, \
                 users seeded {:.1}, end {:.1}",
                m.pid,
                if m.includes_load_generator {
                    ", load generator included"
                } else {
                    ""
                },
                mib(m.rss_start),
                mib(m.rss_after_catalog),
                mib(m.rss_after_items),
                mib(m.rss_after_users),
                mib(m.rss_end)
            );
            let _ = writeln!(
                out,
                "  per item {:.0} B, per user {:.0} B (at {} events each)",
                m.bytes_per_item, m.bytes_per_user, a.seed_events
            );
        }
        if let Some(c) = self.cpu.server_cores {
            let _ = write!(out, "\ncpu in the main phase: server {c:.2} cores");
            if let Some(l) = self.cpu.load_generator_cores {
                let _ = write!(out, ", load generator {l:.2} cores");
            }
            let _ = writeln!(out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::endpoint_of;

    #[test]
    fn addr_takes_host_port_or_an_http_url() {
        for addr in [
            "127.0.0.1:50051",
            "http://127.0.0.1:50051",
            "http://127.0.0.1:50051/",
        ] {
            assert_eq!(endpoint_of(addr).unwrap(), "http://127.0.0.1:50051");
        }
        assert!(
            endpoint_of("https://x:1")
                .unwrap_err()
                .to_string()
                .contains("TLS")
        );
        assert!(endpoint_of("grpc://x:1").is_err());
        assert!(endpoint_of("").is_err());
    }
}
