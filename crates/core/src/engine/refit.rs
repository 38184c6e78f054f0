//! Refits: a batch model fitted to the log off the request path (the server's scheduled
//! ALS refit), judged against the running model on the holdout users, and installed with
//! the log after it replayed into it, so online learning continues from it.
//!
//! The judgement uses the users of the quality holdout ([`crate::QualityConfig`]): the
//! running model never learns from them, and the refit leaves them out of its fit too,
//! so neither model has seen their events. Each holdout user's last event is the target;
//! both models fold the user in from the events before it and rank every item by score
//! (the user's earlier items left out), exactly; a hit is the target in the top `k`.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use tracing::info;

use super::Engine;
use crate::catalog::ItemIdx;
use crate::error::Result;
use crate::model_store::{ItemState, ModelState, ModelVersion, StoredModel};
use crate::traits::{
    EventSink, HistoryEntry, ImportUsers, ItemItemWeights, LogRecord, Observation, OnlineModel,
};
use crate::types::{Event, ItemId, Seq, TimestampMs, UserId};

/// One holdout user's case: the events before their last one, and that last item.
#[derive(Clone, Debug)]
pub struct HoldoutCase {
    /// Earlier events: item, learning weight, event time.
    pub history: Vec<(ItemId, f32, TimestampMs)>,
    /// The item of the user's last event.
    pub target: ItemId,
}

/// How one model ranked the holdout users' last items.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct HoldoutFigures {
    /// Cases ranked (users the model could fold in).
    pub cases: usize,
    /// Cases whose target ranked in the top `k`.
    pub hits: usize,
}

impl HoldoutFigures {
    /// Share of ranked cases that hit (0 without cases).
    pub fn hit_rate(&self) -> f64 {
        if self.cases == 0 {
            0.0
        } else {
            self.hits as f64 / self.cases as f64
        }
    }
}

impl Engine {
    /// Whether `user` is in the quality holdout (the model never learns from them).
    pub fn is_holdout(&self, user: &UserId) -> bool {
        self.sampler.holdout(user.as_str())
    }

    /// The event log (for readers off the request path, such as refits).
    pub fn sink(&self) -> &dyn EventSink {
        self.backends.sink.as_ref()
    }

    /// The running model.
    pub fn model(&self) -> &dyn OnlineModel {
        self.backends.model.as_ref()
    }

    /// `stored` as a model state over this engine's item index (ids interned here), for
    /// [`OnlineModel::import`] into this engine's model or a candidate of the same kind.
    pub fn model_state(&self, stored: &StoredModel) -> ModelState {
        let items = &self.backends.items;
        ModelState {
            factors: stored.factors as usize,
            items: stored
                .items
                .iter()
                .map(|(id, vector, popularity)| ItemState {
                    item: items.intern(id),
                    vector: vector.clone(),
                    popularity: *popularity,
                })
                .collect(),
            users: stored.users.clone(),
            events: stored.events,
            latest_ms: stored.latest_ms,
            batch_origin: stored.origin(&self.backends.model.version()),
        }
    }

    /// Ranks every case's target against every item `model` scores (exact, CPU-bound:
    /// run it off the async workers), leaving out the user's earlier items and items the
    /// catalog marks unavailable (deleted ones included).
    pub fn holdout_figures(
        &self,
        model: &dyn OnlineModel,
        cases: &[HoldoutCase],
        k: usize,
    ) -> HoldoutFigures {
        let items = &self.backends.items;
        let mut figures = HoldoutFigures::default();
        let mut seen: HashSet<ItemIdx> = HashSet::new();
        for case in cases {
            let history: Vec<HistoryEntry> = case
                .history
                .iter()
                .filter_map(|(id, weight, ts)| {
                    Some(HistoryEntry {
                        item: items.get(id.as_str())?,
                        weight: *weight,
                        timestamp_ms: *ts,
                    })
                })
                .collect();
            let Some(user) = model.user_vector(&history) else {
                continue;
            };
            figures.cases += 1;
            let Some(target) = items.get(case.target.as_str()) else {
                continue;
            };
            let Some(target_score) = model.score(target, &user) else {
                continue;
            };
            seen.clear();
            seen.extend(history.iter().map(|h| h.item));
            let mut above = 0usize;
            for idx in 0..items.len() as ItemIdx {
                if idx == target || seen.contains(&idx) {
                    continue;
                }
                let available = items.meta(idx).is_some_and(|m| m.available);
                if available && model.score(idx, &user).is_some_and(|s| s > target_score) {
                    above += 1;
                    if above >= k {
                        break;
                    }
                }
            }
            if above < k {
                figures.hits += 1;
            }
        }
        figures
    }

    /// Installs `stored` (a batch fit covering the log through `log_seq`), replays the
    /// log after `log_seq` into the model only (the behaviour signals and profiles have
    /// learnt those events already), and saves the result as a new version with
    /// `reason`, which replicas load too. Ingest pauses while the log tail is replayed.
    /// Returns the version and the records replayed.
    pub async fn install_refit(
        &self,
        stored: &StoredModel,
        log_seq: Seq,
        reason: &str,
        taken_by: &str,
    ) -> Result<(ModelVersion, u64)> {
        let replayed = {
            let mut followed = self.followed.lock().await;
            let _gate = self.apply_gate.write().await;
            self.install(stored, ImportUsers::Restore)?;
            let mut after = log_seq;
            let mut replayed = 0u64;
            loop {
                let page = self.backends.sink.read(after, 4096).await?;
                let Some((last, _)) = page.last() else { break };
                after = *last;
                replayed += page.len() as u64;
                for (_, record) in &page {
                    match record {
                        LogRecord::Event {
                            event,
                            filtered: false,
                            ..
                        } => self.observe_model(event),
                        LogRecord::Event { filtered: true, .. } => {}
                        LogRecord::Erase { user_id, .. } => {
                            self.backends.model.forget_user(user_id);
                        }
                    }
                }
            }
            if self.follows_log {
                // Everything through `after` is in the model now, this replica's own
                // events included: following resumes after it, with no claims pending.
                followed.seq = followed.seq.max(after);
                self.reset_learnt_ahead(followed.seq);
            }
            replayed
        };
        // The decayed figures restart on the new model; the baseline stays the last good
        // version's, so the automatic rollback undoes a refit that serves worse.
        self.quality.reset_window();
        let saved = self.save_snapshot(reason, taken_by, None).await?;
        let rollbacks = self.backends.models.record_rollback(saved.id).await?;
        self.rollback_generation
            .store(rollbacks.generation, Ordering::Relaxed);
        self.base_version.store(saved.id, Ordering::Relaxed);
        info!(
            version = saved.id,
            log_seq, replayed, reason, "refitted model installed"
        );
        Ok((saved, replayed))
    }

    /// Gives the behaviour signals new item-to-item weights fitted in batch (items by
    /// id, interned here): they take effect on the next request and are saved with the
    /// next model version. Returns the source items installed (0 without signals).
    pub fn install_item_item(&self, rows: ItemItemWeights<ItemId>) -> usize {
        let Some(signals) = &self.signals else {
            return 0;
        };
        let items = &self.backends.items;
        let rows: ItemItemWeights = rows
            .into_iter()
            .map(|(source, targets)| {
                let targets = targets
                    .into_iter()
                    .map(|(j, w)| (items.intern(&j), w))
                    .collect();
                (items.intern(&source), targets)
            })
            .collect();
        let installed = rows.len();
        signals.install_item_item(rows);
        installed
    }

    /// Teaches the model alone one logged event (unless its user is held out).
    fn observe_model(&self, event: &Event) {
        if self.sampler.holdout(event.user_id.as_str()) {
            return;
        }
        let item = self.backends.items.intern(&event.item_id);
        self.backends.model.observe(&Observation {
            user: &event.user_id,
            item,
            weight: self.weight(event),
            timestamp_ms: event.timestamp_ms,
        });
        self.backends.retriever.upsert(item, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{Harness, item_id, views};
    use super::*;
    use crate::types::EventKind;

    #[tokio::test]
    async fn a_refit_is_installed_with_the_log_after_it_replayed_and_survives_a_restart() {
        let h = Harness::new().await;
        let view = h.weight(&EventKind::View);
        h.accept(views("a", "alice", "shoe", 2)).await;
        let fitted_through = crate::traits::EventSink::last_seq(h.store.as_ref())
            .await
            .unwrap();
        h.accept(views("b", "bob", "shoe", 3)).await;
        // A batch fit through position 2 that learnt 10 on the shoe (and knows a hat).
        let stored = StoredModel {
            kind: "als".to_owned(),
            factors: 1,
            items: vec![
                (item_id("shoe"), vec![10.0], 10.0),
                (item_id("hat"), vec![1.0], 1.0),
            ],
            users: Vec::new(),
            events: 2,
            latest_ms: 0,
            batch_origin: None,
            signals: None,
        };
        let (version, replayed) = h
            .engine
            .install_refit(&stored, fitted_through, "refit: test", "t")
            .await
            .unwrap();
        assert_eq!(replayed, 3, "bob's three views came after the fit");
        assert_eq!(h.learnt("shoe"), 10.0 + 3.0 * view);
        assert_eq!(h.learnt("hat"), 1.0);
        assert_eq!(version.reason, "refit: test");
        assert_eq!(version.log_seq, 5);
        assert_eq!(
            h.engine.model_version(),
            format!("counting/v{}", version.id)
        );

        h.accept(views("c", "carol", "hat", 1)).await;
        assert_eq!(
            h.learnt("hat"),
            1.0 + view,
            "online learning goes on from it"
        );
        let (restarted, _) = h.after_crash().recover().await;
        assert_eq!(restarted.learnt("shoe"), 10.0 + 3.0 * view);
        assert_eq!(restarted.learnt("hat"), 1.0 + view);
    }

    #[tokio::test]
    async fn holdout_figures_rank_the_last_item_against_every_other_unseen_item() {
        let h = Harness::new().await;
        // The counting model ranks items by what it learnt: hat 3, shoe 2, sock 1.
        h.accept(views("h", "x", "hat", 3)).await;
        h.accept(views("s", "y", "shoe", 2)).await;
        h.accept(views("k", "z", "sock", 1)).await;
        let case = |history: &[&str], target: &str| HoldoutCase {
            history: history.iter().map(|i| (item_id(i), 1.0, 0)).collect(),
            target: item_id(target),
        };
        let cases = [
            // shoe ranks second among hat and shoe: a hit at k = 2, not at k = 1.
            case(&["sock"], "shoe"),
            // with the hat seen, the shoe ranks first.
            case(&["hat"], "shoe"),
            // a history of unknown items folds in to nothing: not counted.
            case(&["boat"], "hat"),
        ];
        let model = h.model.clone();
        assert_eq!(
            h.engine.holdout_figures(model.as_ref(), &cases, 1),
            HoldoutFigures { cases: 2, hits: 1 }
        );
        assert_eq!(
            h.engine.holdout_figures(model.as_ref(), &cases, 2),
            HoldoutFigures { cases: 2, hits: 2 }
        );
    }
}
