//! Upkeep: periodic maintenance, index rebuilds, and counters.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::{debug, info, warn};

use super::Engine;
use crate::error::Result;
use crate::traits::SinkHealth;

/// Counters since start-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Events applied to profiles and the model (including replay).
    pub events_applied: u64,
}

impl Engine {
    /// Periodic housekeeping: checkpoint, dedupe expiry, rate-limiter pruning.
    pub async fn maintain(&self) -> Result<()> {
        self.bots.maintain();
        if let Some(signals) = &self.signals {
            signals.maintain();
        }
        self.backends.sink.maintain().await?;
        self.repair_profiles().await?;
        self.checkpoint_if_due().await?;
        self.trim_log().await?;
        Ok(())
    }

    /// Log retention: hands the sink the last position no recovery needs any more, the
    /// older of the durable profile checkpoint and the newest model version (recovery
    /// replays the log after both). Nothing is trimmed before the first model version, nor
    /// when other replicas follow the log. Returns what the sink dropped.
    pub async fn trim_log(&self) -> Result<u64> {
        if self.follows_log {
            return Ok(0);
        }
        let Some(model_seq) = self.backends.models.list().await?.last().map(|v| v.log_seq) else {
            return Ok(0);
        };
        let covered = match self.backends.profiles.durable_seq().await? {
            Some(profiles_seq) => profiles_seq.min(model_seq),
            None => model_seq,
        };
        if covered == 0 {
            return Ok(0);
        }
        let dropped = self.backends.sink.trim(covered).await?;
        if dropped > 0 {
            debug!(dropped, through = covered, "event log trimmed");
        }
        Ok(dropped)
    }

    /// Whether the event sink can record events now (readiness), and its disk.
    pub async fn sink_health(&self) -> SinkHealth {
        self.backends.sink.health().await
    }

    /// Rebuilds the retriever's index from the current vectors on a blocking thread,
    /// off to the side (searches go on against the old index): after a model version is
    /// installed, and on the server's schedule. Does nothing outside a tokio runtime.
    pub fn reindex_in_background(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let retriever = self.backends.retriever.clone();
        runtime.spawn_blocking(move || {
            let started = Instant::now();
            match retriever.rebuild() {
                Ok(()) => info!(
                    items = retriever.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "item index rebuilt"
                ),
                Err(err) => {
                    warn!(error = %err, "rebuilding the item index failed; the old one serves")
                }
            }
        });
    }

    /// Counters since start-up.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            events_applied: self.events_applied.load(Ordering::Relaxed),
        }
    }

    /// Number of profiles held.
    pub async fn profile_count(&self) -> Result<usize> {
        self.backends.profiles.count().await
    }

    /// The retriever's recall checks against the exact scan, when it makes them (see
    /// [`crate::RecallChecks`]).
    pub fn recall_checks(&self) -> Option<crate::RecallChecks> {
        self.backends.retriever.recall_checks()
    }

    /// What the retriever's index has not caught up with, when it keeps one (see
    /// [`crate::IndexBacklog`]).
    pub fn retrieval_backlog(&self) -> Option<crate::IndexBacklog> {
        self.backends.retriever.backlog()
    }
}
