//! The server keeps its own batch baseline fresh: on a schedule (`refit.interval_ms`, on
//! the learner replica) and on demand (`ModelService.Refit`), it fits implicit ALS to the
//! event log off the request path, judges the fit against the running model on the
//! quality holdout ([`reflex_core::Engine::holdout_figures`]), and installs it only when
//! it ranks the holdout users' last items better; online learning then continues from it
//! ([`reflex_core::Engine::install_refit`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use reflex_core::{
    Engine, HoldoutCase, HoldoutFigures, ItemId, KindWeights, LogRecord, ModelVersion, Seq, UserId,
};
use reflex_models::{AlsConfig, EaseConfig, MfConfig, OnlineMf, TrainingSet};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::info;

/// Cut-off of the holdout figure: the target must rank in the top `K`.
const K: usize = 10;
/// Most earlier events of one holdout user kept as the history the models fold in.
const MAX_HISTORY: usize = 200;

/// Settings of the refits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RefitConfig {
    /// The learner refits this often, in ms; 0 never (on demand only).
    pub interval_ms: u64,
    /// A scheduled refit is skipped until the log has grown by this many records since
    /// the last one (or since start-up).
    pub min_new_events: u64,
    /// Holdout users (with at least two events) needed to judge a refit; with fewer it
    /// is not installed.
    pub min_holdout_users: usize,
    /// Most holdout users ranked per judgement, which bounds its CPU.
    pub max_holdout_users: usize,
    /// The fit must beat the running model's holdout hit rate by this fraction of it
    /// (and be strictly better).
    pub min_gain: f64,
    /// ALS iterations.
    pub iterations: usize,
    /// ALS worker threads; keep it below the cores so serving keeps some.
    pub threads: usize,
    /// The item-to-item weights (EASE over the most popular items) fitted with every
    /// refit and given to the behaviour signals.
    pub item_item: EaseConfig,
}

impl Default for RefitConfig {
    fn default() -> Self {
        Self {
            interval_ms: 6 * 60 * 60 * 1000,
            min_new_events: 10_000,
            min_holdout_users: 50,
            max_holdout_users: 2_000,
            min_gain: 0.02,
            iterations: AlsConfig::default().iterations,
            threads: 1,
            item_item: EaseConfig::default(),
        }
    }
}

impl RefitConfig {
    /// Checks every field's range, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_holdout_users == 0 {
            return Err("min_holdout_users must be at least 1".into());
        }
        if self.max_holdout_users < self.min_holdout_users {
            return Err("max_holdout_users must be at least min_holdout_users".into());
        }
        if !self.min_gain.is_finite() || self.min_gain < 0.0 {
            return Err("min_gain must be a number of at least 0".into());
        }
        if self.iterations == 0 {
            return Err("iterations must be at least 1".into());
        }
        self.item_item
            .validate()
            .map_err(|e| format!("item_item.{e}"))
    }
}

/// What a refit did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The fit ranked the holdout better and is now the model.
    Installed,
    /// The running model ranked the holdout as well or better; it stays.
    Kept,
    /// Too few holdout users to judge; the running model stays.
    TooFewHoldoutUsers,
    /// The log has not grown enough since the last refit.
    Skipped,
}

impl Outcome {
    /// The label of the outcome in metrics and answers.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Installed => "installed",
            Self::Kept => "kept",
            Self::TooFewHoldoutUsers => "too_few_holdout_users",
            Self::Skipped => "skipped",
        }
    }
}

/// The report of one refit.
#[derive(Clone, Debug, Serialize)]
pub struct RefitReport {
    /// What happened.
    pub outcome: Outcome,
    /// Log position the fit covers.
    pub log_seq: Seq,
    /// Events fitted (holdout users' left out).
    pub events: u64,
    /// Holdout users' last events ranked by both models.
    pub holdout_cases: usize,
    /// The fit's holdout figures.
    pub candidate: HoldoutFigures,
    /// The running model's holdout figures.
    pub running: HoldoutFigures,
    /// Seconds reading the log and fitting.
    pub fit_secs: f64,
    /// The installed version.
    pub version: Option<ModelVersion>,
    /// Source items given item-to-item weights (0 when not fitted).
    pub item_item_sources: usize,
    /// Seconds fitting the item-to-item weights.
    pub item_item_secs: f64,
}

/// Runs refits one at a time for one engine.
pub struct Refitter {
    engine: Arc<Engine>,
    config: RefitConfig,
    model: MfConfig,
    weights: KindWeights,
    /// The log position the last refit covered; held for the whole refit.
    last: Mutex<Seq>,
}

impl Refitter {
    /// A refitter for `engine`, whose model is built from `model` and whose events are
    /// weighted by `weights`.
    pub fn new(
        engine: Arc<Engine>,
        config: RefitConfig,
        model: MfConfig,
        weights: KindWeights,
    ) -> Self {
        Self {
            engine,
            config,
            model,
            weights,
            last: Mutex::new(0),
        }
    }

    /// The settings.
    pub fn config(&self) -> &RefitConfig {
        &self.config
    }

    /// Refits now. Unless `forced`, it is skipped while the log grew by fewer than
    /// `refit.min_new_events` records since the last refit. With `install_anyway` the fit
    /// is installed whatever the holdout says (still judged and reported). `taken_by`
    /// names the replica.
    pub async fn run(
        &self,
        forced: bool,
        install_anyway: bool,
        taken_by: &str,
    ) -> anyhow::Result<RefitReport> {
        let mut last = self.last.lock().await;
        let engine = &self.engine;
        let log_seq = engine
            .sink()
            .last_seq()
            .await
            .context("reading the log position")?;
        let skipped = |outcome| RefitReport {
            outcome,
            log_seq,
            events: 0,
            holdout_cases: 0,
            candidate: HoldoutFigures::default(),
            running: HoldoutFigures::default(),
            fit_secs: 0.0,
            version: None,
            item_item_sources: 0,
            item_item_secs: 0.0,
        };
        if !forced && log_seq.saturating_sub(*last) < self.config.min_new_events {
            return Ok(skipped(Outcome::Skipped));
        }
        let started = Instant::now();
        let (set, cases) = self.read(log_seq).await?;
        let (set, item_item_sources, item_item_secs) = self.fit_item_item(set).await?;
        if set.events() == 0 || (cases.len() < self.config.min_holdout_users && !install_anyway) {
            *last = log_seq;
            let mut report = skipped(Outcome::TooFewHoldoutUsers);
            report.holdout_cases = cases.len();
            report.events = set.events();
            report.item_item_sources = item_item_sources;
            report.item_item_secs = item_item_secs;
            info!(
                cases = cases.len(),
                needed = self.config.min_holdout_users,
                "refit not judged: too few holdout users"
            );
            return Ok(report);
        }
        let als = AlsConfig {
            factors: self.model.factors,
            iterations: self.config.iterations,
            threads: self.config.threads,
            ..AlsConfig::default()
        };
        als.validate()
            .map_err(|e| anyhow::anyhow!("invalid refit ALS settings: {e}"))?;
        let judged = tokio::task::spawn_blocking({
            let engine = engine.clone();
            let model = self.model.clone();
            move || -> anyhow::Result<_> {
                let matrix = set.matrix();
                let fitted = reflex_models::als::fit(&matrix, &als).context("fitting ALS")?;
                let stored = set.to_stored(&fitted, "als");
                let fit_secs = started.elapsed().as_secs_f64();
                let candidate = OnlineMf::new(model).context("building the candidate model")?;
                reflex_core::OnlineModel::import(
                    candidate.as_ref(),
                    &engine.model_state(&stored),
                    reflex_core::ImportUsers::Restore,
                )
                .context("loading the fit into the candidate model")?;
                let candidate_figures = engine.holdout_figures(candidate.as_ref(), &cases, K);
                let running_figures = engine.holdout_figures(engine.model(), &cases, K);
                Ok((
                    stored,
                    set.events(),
                    cases.len(),
                    fit_secs,
                    candidate_figures,
                    running_figures,
                    als,
                ))
            }
        })
        .await
        .context("the refit task failed")??;
        let (stored, events, holdout_cases, fit_secs, candidate, running, als) = judged;
        *last = log_seq;
        let better = candidate.hit_rate() > running.hit_rate() * (1.0 + self.config.min_gain)
            && candidate.hit_rate() > running.hit_rate();
        let install = better || install_anyway;
        let mut report = RefitReport {
            outcome: Outcome::Kept,
            log_seq,
            events,
            holdout_cases,
            candidate,
            running,
            fit_secs,
            version: None,
            item_item_sources,
            item_item_secs,
        };
        let figures = format!(
            "holdout hr@{K} {:.4} against {:.4} over {holdout_cases} users",
            candidate.hit_rate(),
            running.hit_rate()
        );
        if install {
            let reason = format!(
                "refit: als k={} it={}; {figures}",
                als.factors, als.iterations
            );
            let (version, replayed) = engine
                .install_refit(&stored, log_seq, &reason, taken_by)
                .await
                .context("installing the refit")?;
            info!(version = version.id, replayed, %figures, "refit installed");
            report.outcome = Outcome::Installed;
            report.version = Some(version);
        } else {
            info!(%figures, "refit not installed: the running model ranks the holdout as well");
        }
        Ok(report)
    }

    /// Fits the item-to-item weights to `set` off the runtime and gives them to the
    /// behaviour signals (when enabled and there are events); hands `set` back with the
    /// source items installed and the seconds the fit took.
    async fn fit_item_item(&self, set: TrainingSet) -> anyhow::Result<(TrainingSet, usize, f64)> {
        let config = self.config.item_item.clone();
        if !config.enabled || set.events() == 0 {
            return Ok((set, 0, 0.0));
        }
        let started = Instant::now();
        let (set, fitted) = tokio::task::spawn_blocking(move || {
            let fitted = set.fit_item_item(&config);
            (set, fitted)
        })
        .await
        .context("the item-to-item fit task failed")?;
        let rows = fitted.context("fitting the item-to-item weights")?;
        let secs = started.elapsed().as_secs_f64();
        let installed = self.engine.install_item_item(rows);
        info!(sources = installed, secs, "item-to-item weights installed");
        Ok((set, installed, secs))
    }

    /// Reads the log through `through`: every event outside the holdout into a training
    /// set, and each holdout user's events into their case (last item the target).
    async fn read(&self, through: Seq) -> anyhow::Result<(TrainingSet, Vec<HoldoutCase>)> {
        let engine = &self.engine;
        let mut set = TrainingSet::new(self.model.popularity_half_life_ms);
        let mut held: HashMap<UserId, VecDeque<(ItemId, f32, i64)>> = HashMap::new();
        let mut after = 0;
        while after < through {
            let page = engine
                .sink()
                .read(after, 4096)
                .await
                .with_context(|| format!("reading the event log after position {after}"))?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (seq, record) in &page {
                if *seq > through {
                    break;
                }
                match record {
                    LogRecord::Event {
                        event,
                        filtered: false,
                        ..
                    } => {
                        let weight = self.weights.weight(&event.kind, event.weight);
                        if engine.is_holdout(&event.user_id) {
                            let events = held.entry(event.user_id.clone()).or_default();
                            if events.len() > MAX_HISTORY {
                                events.pop_front();
                            }
                            events.push_back((event.item_id.clone(), weight, event.timestamp_ms));
                        } else {
                            set.add(&event.user_id, &event.item_id, weight, event.timestamp_ms);
                        }
                    }
                    LogRecord::Event { filtered: true, .. } => {}
                    LogRecord::Erase { user_id, .. } => {
                        set.erase(user_id);
                        held.remove(user_id);
                    }
                }
            }
        }
        let mut users: Vec<_> = held.into_iter().filter(|(_, e)| e.len() >= 2).collect();
        users.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        users.truncate(self.config.max_holdout_users);
        let cases = users
            .into_iter()
            .filter_map(|(_, mut history)| {
                let (target, _, _) = history.pop_back()?;
                Some(HoldoutCase {
                    history: history.into(),
                    target,
                })
            })
            .collect();
        Ok((set, cases))
    }
}
