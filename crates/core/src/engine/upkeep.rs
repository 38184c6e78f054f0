//! Upkeep: periodic maintenance, index rebuilds, and counters.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::{info, warn};

use super::Engine;
use crate::error::Result;

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
        self.backends.sink.maintain().await?;
        self.repair_profiles().await?;
        self.checkpoint().await?;
        Ok(())
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
}
