//! `reflex train`: fits the batch baseline (implicit ALS, `reflex_models::als`) to the
//! store's event log — or to a file — and publishes it as a model version that the
//! online model starts from.
//!
//! From the log: every record is read in pages (`EventSink::read`); an event's matrix
//! value is its learning weight from `engine.weights` (so a purchase counts more than a
//! view; summed per user and item), events the bot filter marked are skipped, and an
//! erase record drops the user's earlier events. The version is saved with `log_seq` =
//! the last position read, so a server started afterwards loads it and replays only the
//! log after it: online learning continues from the baseline. Items carry the ALS item
//! factors and the online model's time-decayed popularity of the events, users their ALS
//! vectors (the online learner's user vectors).
//!
//! From a file (`--data`): the rows (see `reflex import` for the formats) are weighted
//! the same way, and the version counts as covering the whole current log (its `log_seq`
//! is the log's last position), so use it for a file that is already imported or on a
//! store whose log holds nothing else.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use reflex_core::{EventKind, EventSink, ItemId, KindWeights, LogRecord, ModelVersion, UserId};
use reflex_models::{AlsConfig, TrainingSet};
use serde::Serialize;

use crate::als_args::AlsArgs;
use crate::config::{Config, FlagOverrides};
use crate::import_cmd::{self, Format};

/// Flags of `reflex train`.
#[derive(Clone, Debug, clap::Args)]
#[command(
    after_help = "The new version is loaded by servers started afterwards (the \
    newest version wins; the log after it is replayed). A server already running on a \
    shared store (Redis, ScyllaDB) keeps its model until told: call \
    `grpcurl -d '{\"version\": N}' ADDR reflex.v1.ModelService/Rollback` with the version \
    printed here. Online learning continues from it at model.warm_start_learning_rate \
    (0.02), a smaller step than from scratch (see `reflex eval`)."
)]
pub struct TrainArgs {
    /// Train from this file (formats of `reflex import`) instead of the store's event log.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Format of `--data` (detected from its header when not given).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Event kind of each rating of an `inter` or `tsv` `--data` file.
    #[arg(long, default_value = "view")]
    pub kind: String,
    /// The ALS settings.
    #[command(flatten)]
    pub als: AlsArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `reflex train` did.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    /// Where the events came from: `event log` or the file.
    pub source: String,
    /// Events read (including erased and zero-weight ones).
    pub events: u64,
    /// Log records skipped: bot or noise events.
    pub filtered: u64,
    /// File rows that did not parse (with `--data`).
    pub bad_rows: u64,
    /// Distinct users and items.
    pub users: usize,
    /// Distinct items.
    pub items: usize,
    /// Non-zero user–item pairs fitted.
    pub interactions: usize,
    /// The ALS settings.
    pub als: AlsConfig,
    /// Seconds reading the events.
    pub read_secs: f64,
    /// Seconds fitting.
    pub fit_secs: f64,
    /// The saved version.
    pub version: ModelVersion,
}

/// Reads the whole log into `set`; returns the last position read and the filtered
/// events skipped.
async fn read_log(
    sink: &dyn EventSink,
    weights: &KindWeights,
    set: &mut TrainingSet,
) -> anyhow::Result<(u64, u64)> {
    let mut after = 0u64;
    let mut filtered = 0u64;
    loop {
        let page = sink
            .read(after, 4096)
            .await
            .with_context(|| format!("reading the event log after position {after}"))?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        for (_, record) in &page {
            match record {
                LogRecord::Event {
                    event,
                    filtered: false,
                    ..
                } => set.add(
                    &event.user_id,
                    &event.item_id,
                    weights.weight(&event.kind, event.weight),
                    event.timestamp_ms,
                ),
                LogRecord::Event { filtered: true, .. } => filtered += 1,
                LogRecord::Erase { user_id, .. } => set.erase(user_id),
            }
        }
    }
    Ok((after, filtered))
}

/// Reads `path` into `set`, weighting rows as the engine would; returns the rows that
/// did not parse or whose ids are invalid.
fn read_file(
    path: &Path,
    format: Option<Format>,
    kind: &str,
    weights: &KindWeights,
    set: &mut TrainingSet,
) -> anyhow::Result<u64> {
    let mut reader = reflex_models::batch::open_lines(path)
        .context("opening the data file")?
        .reader;
    let mut header = String::new();
    reader
        .read_line(&mut header)
        .with_context(|| format!("reading {}", path.display()))?;
    let parser = import_cmd::RowParser::new(&header, format, kind)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut bad = 0u64;
    let mut line = String::new();
    let mut n = 1u64;
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .with_context(|| format!("reading {} line {}", path.display(), n + 1))?
            == 0
        {
            break;
        }
        n += 1;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(raw) = parser.parse(&line) else {
            bad += 1;
            continue;
        };
        let (Ok(user), Ok(item), Some(ts)) = (
            UserId::parse(&raw.user_id, "user_id"),
            ItemId::parse(&raw.item_id, "item_id"),
            raw.timestamp_ms,
        ) else {
            bad += 1;
            continue;
        };
        let kind = match raw.kind {
            Some(reflex_core::RawKind::View) => EventKind::View,
            Some(reflex_core::RawKind::Click) => EventKind::Click,
            Some(reflex_core::RawKind::AddToCart) => EventKind::AddToCart,
            Some(reflex_core::RawKind::RemoveFromCart) => EventKind::RemoveFromCart,
            Some(reflex_core::RawKind::Purchase) => EventKind::Purchase,
            Some(reflex_core::RawKind::Custom) => EventKind::Custom(raw.custom_kind.into()),
            None => {
                bad += 1;
                continue;
            }
        };
        set.add(&user, &item, weights.weight(&kind, raw.weight), ts);
    }
    Ok(bad)
}

/// Runs `reflex train`.
pub async fn run(
    args: TrainArgs,
    config: Option<&Path>,
    flags: FlagOverrides,
) -> anyhow::Result<()> {
    let config = Config::load(config, &flags)?;
    let report = train(&args, &config).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("printing the report")?
        );
    } else {
        println!(
            "read {} events from {} in {:.2} s ({} filtered skipped{})",
            report.events,
            report.source,
            report.read_secs,
            report.filtered,
            if report.bad_rows > 0 {
                format!(", {} bad rows skipped", report.bad_rows)
            } else {
                String::new()
            }
        );
        println!(
            "fitted ALS ({} factors, {} iterations) to {} users x {} items ({} interactions) \
             in {:.2} s",
            report.als.factors,
            report.als.iterations,
            report.users,
            report.items,
            report.interactions,
            report.fit_secs
        );
        println!(
            "saved model version {} ({} items, {} bytes, log position {}): {}",
            report.version.id,
            report.version.items,
            report.version.bytes,
            report.version.log_seq,
            report.version.reason
        );
        println!(
            "servers started from now on load it; a running server on a shared store takes \
             it with ModelService.Rollback {{\"version\": {}}}",
            report.version.id
        );
    }
    Ok(())
}

/// Fits and saves; the engine-free core of `reflex train`.
pub async fn train(args: &TrainArgs, config: &Config) -> anyhow::Result<TrainReport> {
    let server_factors = config.model.factors;
    let factors = args.als.factors.unwrap_or(server_factors);
    anyhow::ensure!(
        factors == server_factors,
        "--factors {factors} does not match the server's model.factors = {server_factors}: \
         the server could not load the version. Train with --factors {server_factors}, or set \
         model.factors = {factors} (REFLEX_MODEL__FACTORS={factors}) for the servers too \
         (which also needs a fresh model: older versions have {server_factors} factors)"
    );
    let als = args.als.to_config(server_factors)?;

    let reflex_storage::Stores { sink, models, .. } = crate::app::open_stores(config).await?;
    let weights = &config.engine.weights;
    let mut set = TrainingSet::new(config.model.popularity_half_life_ms);
    let started = Instant::now();
    let (source, log_seq, filtered, bad_rows) = match &args.data {
        None => {
            let (seq, filtered) = read_log(sink.as_ref(), weights, &mut set).await?;
            ("event log".to_owned(), seq, filtered, 0)
        }
        Some(path) => {
            let seq = sink.last_seq().await.context("reading the log position")?;
            let (path_c, format, kind, weights_c) = (
                path.clone(),
                args.format,
                args.kind.clone(),
                weights.clone(),
            );
            let (bad, filled) = tokio::task::spawn_blocking(move || {
                let mut set = set;
                let bad = read_file(&path_c, format, &kind, &weights_c, &mut set);
                bad.map(|b| (b, set))
            })
            .await
            .context("the reading task failed")??;
            set = filled;
            (path.display().to_string(), seq, 0, bad)
        }
    };
    let read_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        set.events() > 0,
        "no events to train on in {source}: import some first (reflex import --data FILE)"
    );

    let fit_started = Instant::now();
    let (model, matrix_nnz, set) = tokio::task::spawn_blocking({
        let als = als.clone();
        move || {
            let matrix = set.matrix();
            let model = reflex_models::als::fit(&matrix, &als)?;
            anyhow::Ok((model, matrix.nnz(), set))
        }
    })
    .await
    .context("the fitting task failed")??;
    let fit_secs = fit_started.elapsed().as_secs_f64();

    let stored = set.to_stored(&model, "als");
    let reason = format!(
        "train: als k={} it={} reg={} alpha={}{}",
        als.factors,
        als.iterations,
        als.regularization,
        als.alpha,
        match &args.data {
            Some(p) => format!(" data={}", p.display()),
            None => String::new(),
        }
    );
    // Built through serde so that fields added to the metadata later, which carry
    // defaults, need no change here.
    let version: ModelVersion = serde_json::from_value(serde_json::json!({
        "id": 0,
        "created_ms": reflex_core::types::now_ms(),
        "log_seq": log_seq,
        "events": stored.events,
        "items": stored.items.len() as u64,
        "bytes": 0,
        "reason": reason,
        "taken_by": format!("reflex train ({})", config.versions.replica()),
    }))
    .context("building the version metadata")?;
    let bytes = stored.encode().context("encoding the model")?;
    let saved = models
        .save(version, bytes)
        .await
        .context("saving the model version")?;
    Ok(TrainReport {
        source,
        events: set.events(),
        filtered,
        bad_rows,
        users: set.users(),
        items: set.items(),
        interactions: matrix_nnz,
        als,
        read_secs,
        fit_secs,
        version: saved,
    })
}
