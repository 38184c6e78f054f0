//! Continuous evaluation: sampling on the learn path, the task that scores samples, and
//! the automatic rollback they may call for.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{Engine, RequestFilter};
use crate::catalog::ItemIdx;
use crate::error::Result;
use crate::model_store::ModelVersion;
use crate::quality::{QualityConfig, QualityReport, QualityTracker, RollbackDecision, Sampler};
use crate::traits::HistoryEntry;
use crate::types::{TimestampMs, UserId};

/// Samples waiting for the evaluation task; more are dropped (and counted).
const SAMPLE_QUEUE: usize = 1024;

/// One sampled event, taken on the learn path just before the model learns it.
pub(super) struct Sample {
    pub(super) user: UserId,
    pub(super) item: ItemIdx,
    pub(super) timestamp_ms: TimestampMs,
    /// The item's vector before the model learnt the event, so the score is prequential
    /// even though the ranking runs a moment later.
    pub(super) target: Option<Vec<f32>>,
    pub(super) holdout: bool,
}

impl Engine {
    /// Sets the continuous evaluation: which events are scored, the holdout, and the
    /// automatic rollback (off by default: no scoring, no holdout). Scoring starts with
    /// [`Engine::start_quality`].
    pub fn with_quality(mut self, config: QualityConfig) -> Self {
        self.sampler = Sampler::new(&config);
        self.quality = QualityTracker::new(config);
        self
    }

    /// Starts the task that scores sampled events (needs a Tokio runtime). The learn path
    /// only copies the event's item vector into a bounded queue; the task folds the user
    /// in from the profile's history before the event and ranks the item against the top
    /// 20, at most [`QualityConfig::max_scored_per_sec`] a second. Idempotent.
    pub fn start_quality(self: &Arc<Self>) {
        if self.quality.config().sample_ratio <= 0.0 || self.samples.get().is_some() {
            return;
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Sample>(SAMPLE_QUEUE);
        if self.samples.set(tx).is_err() {
            return;
        }
        let engine: Weak<Self> = Arc::downgrade(self);
        let per_sec = self.quality.config().max_scored_per_sec.max(1);
        let spacing = Duration::from_secs_f64(1.0 / f64::from(per_sec));
        tokio::spawn(async move {
            while let Some(sample) = rx.recv().await {
                let started = Instant::now();
                let Some(engine) = engine.upgrade() else {
                    break;
                };
                engine.score(sample).await;
                drop(engine);
                // Over the rate, wait: the queue fills and the learn path drops samples.
                if let Some(rest) = spacing.checked_sub(started.elapsed()) {
                    tokio::time::sleep(rest).await;
                }
            }
        });
    }

    /// Scores one sample: rank of its item among the user's recommendations, with the
    /// user folded in from the history before the event.
    async fn score(&self, sample: Sample) {
        let profile = match self.backends.profiles.get(&sample.user).await {
            Ok(p) => p,
            Err(err) => {
                debug!(error = %err, "profile unavailable, sample not scored");
                self.quality.record_dropped();
                return;
            }
        };
        let items = &self.backends.items;
        let history: Vec<HistoryEntry> = profile
            .iter()
            .flat_map(|p| p.recent.iter())
            .filter(|i| i.timestamp_ms < sample.timestamp_ms)
            .filter_map(|i| {
                Some(HistoryEntry {
                    item: items.get(i.item_id.as_str())?,
                    weight: i.weight,
                    timestamp_ms: i.timestamp_ms,
                })
            })
            .collect();
        let Some(user) = (!history.is_empty())
            .then(|| self.backends.model.user_vector(&history))
            .flatten()
        else {
            self.quality.record_cold();
            return;
        };
        let (hit10, hit20) = match &sample.target {
            Some(target) if target.len() == user.len() => {
                let score: f32 = user.iter().zip(target).map(|(a, b)| a * b).sum();
                let none = HashSet::new();
                let unfiltered = RequestFilter::default();
                let above = self
                    .backends
                    .retriever
                    .search(&user, 20, &|idx| {
                        idx != sample.item && self.passes(idx, &none, &unfiltered)
                    })
                    .iter()
                    .filter(|s| s.score > score)
                    .count();
                (above < 10, above < 20)
            }
            // An item the model never learnt cannot be recommended.
            _ => (false, false),
        };
        if let Some(decision) = self.quality.record(sample.holdout, hit10, hit20) {
            warn!(reason = %decision.reason(), "model quality dropped, rollback due");
        }
    }

    /// The prequential figures now, with the baseline the automatic rollback compares with.
    pub fn quality(&self) -> QualityReport {
        self.quality.report()
    }

    /// Acts on a rollback the figures called for, when `learner` (only the lease holder
    /// acts; other replicas drop the decision and apply the rollback the learner records).
    /// Returns the decision and the version the rollback recorded.
    pub async fn check_quality(
        &self,
        taken_by: &str,
        learner: bool,
    ) -> Result<Option<(RollbackDecision, ModelVersion)>> {
        let Some(decision) = self.quality.take_pending() else {
            return Ok(None);
        };
        if !learner {
            return Ok(None);
        }
        let reason = decision.reason();
        warn!(%reason, "automatic rollback");
        match self.rollback_as(decision.to, &reason, taken_by, true).await {
            Ok(saved) => Ok(Some((decision, saved))),
            Err(err) => {
                // The store failed, not the decision: try again on the next check.
                self.quality.retry_later(decision);
                Err(err)
            }
        }
    }

    /// Makes the newest stored version that recorded good quality the baseline.
    pub(super) async fn refresh_baseline(&self) -> Result<()> {
        let versions = self.backends.models.list().await?;
        if let Some((id, q)) = versions
            .iter()
            .rev()
            .find_map(|v| Some((v.id, v.quality?)).filter(|(_, q)| !q.degraded))
        {
            self.quality.set_baseline(id, &q, true);
        }
        Ok(())
    }
}
