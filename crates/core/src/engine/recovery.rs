//! Recovery and log following: replaying the log at start-up, installing a stored model,
//! following the shared log, profile checkpoints and the repair of unconfirmed applies.

use std::sync::atomic::Ordering;

use tracing::{debug, info, warn};

use super::{Engine, Followed};
use crate::catalog::ItemIdx;
use crate::error::{Error, Result};
use crate::model_store::StoredModel;
use crate::traits::{ImportUsers, LogRecord, ProfileUpdate};
use crate::types::Seq;

impl Engine {
    /// Loads the catalog and the newest model version, then replays the event log into
    /// the model after that version, and into profiles after their durable checkpoint.
    /// Returns the number of records replayed.
    pub async fn recover(&self) -> Result<u64> {
        let _gate = self.apply_gate.write().await;
        let catalog_version = self.backends.catalog.version().await?;
        for item in self.backends.catalog.load_all().await? {
            self.index_item(&item);
        }
        let rollbacks = self.backends.models.rollbacks().await?;
        self.rollback_generation
            .store(rollbacks.generation, Ordering::Relaxed);
        let model_seq = match self.backends.models.list().await?.pop() {
            Some(version) => {
                let Some(bytes) = self.backends.models.load(version.id).await? else {
                    return Err(Error::Internal(format!(
                        "model version {} is listed but has no snapshot",
                        version.id
                    )));
                };
                self.install(&StoredModel::decode(&bytes)?, ImportUsers::Restore)?;
                self.base_version.store(version.id, Ordering::Relaxed);
                info!(
                    version = version.id,
                    log_seq = version.log_seq,
                    "model version loaded"
                );
                version.log_seq
            }
            None => 0,
        };
        let profile_seq = self.backends.profiles.durable_seq().await?;
        let mut after = profile_seq.map_or(model_seq, |p| p.min(model_seq));
        let mut replayed = 0u64;
        let mut first = true;
        loop {
            let mut page = self.backends.sink.read(after, 4096).await?;
            let Some((last, _)) = page.last() else { break };
            if first && page[0].0 > after + 1 {
                warn!(
                    missing = page[0].0 - after - 1,
                    after,
                    "the event log was trimmed past the newest model version: those events are not learnt"
                );
            }
            first = false;
            after = *last;
            replayed += page.len() as u64;
            let mut items = Vec::with_capacity(page.len());
            for (_, record) in &mut page {
                items.push(match record {
                    LogRecord::Event {
                        event,
                        filtered: false,
                        ..
                    } => self.backends.items.canonicalize(&mut event.item_id),
                    _ => ItemIdx::MAX,
                });
            }
            let mut updates = Vec::with_capacity(page.len());
            for ((seq, record), item) in page.iter().zip(&items) {
                let profile_due = profile_seq.is_some_and(|d| *seq > d);
                let model_due = *seq > model_seq;
                match record {
                    LogRecord::Event {
                        event,
                        filtered: false,
                        ingested_ms,
                    } => {
                        let weight = self.weight(event);
                        if model_due {
                            // Replayed events were scored when they first came.
                            self.learn(event, *item, weight, false);
                        }
                        if profile_due {
                            updates.push(ProfileUpdate {
                                seq: *seq,
                                event,
                                weight,
                                now_ms: *ingested_ms,
                            });
                        }
                    }
                    LogRecord::Event { filtered: true, .. } => {}
                    LogRecord::Erase { user_id, .. } => {
                        if !updates.is_empty() {
                            self.backends.profiles.apply(&updates).await?;
                            updates.clear();
                        }
                        if model_due {
                            self.forget_user(user_id);
                        }
                        if profile_due {
                            self.backends.profiles.erase(user_id).await?;
                        }
                    }
                }
            }
            if !updates.is_empty() {
                self.backends.profiles.apply(&updates).await?;
            }
        }
        let end = self.backends.sink.last_seq().await?.max(after);
        *self.followed.lock().await = Followed {
            seq: end,
            catalog_version,
        };
        self.reset_learnt_ahead(end);
        info!(replayed, model_seq, ?profile_seq, "event log replayed");
        self.refresh_baseline().await?;
        Ok(replayed)
    }

    /// Loads `stored` into the model (items by id, interned here), its users' state as
    /// `users` says, and tells the retriever about every item.
    pub(super) fn install(&self, stored: &StoredModel, users: ImportUsers) -> Result<()> {
        let items = &self.backends.items;
        let state = self.model_state(stored);
        self.backends.model.import(&state, users)?;
        // A snapshot without signals (taken before they existed, or a batch fit) leaves
        // the current ones as they are.
        if let (Some(signals), Some(bytes)) = (&self.signals, &stored.signals) {
            signals.import(bytes, &|id| items.intern(id), users)?;
        }
        for item in &state.items {
            self.backends.retriever.upsert(item.item, &[]);
        }
        self.reindex_in_background();
        Ok(())
    }

    /// Makes the model learn by following the event log ([`Engine::follow`]) instead of
    /// from this engine's own ingest: for stores shared by several replicas, so every
    /// replica's model learns every replica's events, in log order. Profiles are still
    /// updated by ingest, so the next recommendation on any replica reflects an event
    /// at once (fold-in reads the shared profile); item factors follow within one
    /// follow interval.
    pub fn following_the_log(mut self) -> Self {
        self.follows_log = true;
        self
    }

    /// Teaches the model every log record appended since the last call (or since
    /// [`Engine::recover`]), by any replica. Returns the number of records read.
    pub async fn follow(&self) -> Result<u64> {
        let mut followed = self.followed.lock().await;
        let catalog_version = self.backends.catalog.version().await?;
        if catalog_version != followed.catalog_version {
            self.reload_catalog().await?;
            followed.catalog_version = catalog_version;
        }
        let mut read = 0u64;
        loop {
            let page = self.backends.sink.read(followed.seq, 4096).await?;
            let Some((last, _)) = page.last() else { break };
            followed.seq = *last;
            read += page.len() as u64;
            for (seq, record) in &page {
                // Under the lock, so that ingest, once it finds a position followed, can
                // count on the model having it.
                let mut ahead = self
                    .learnt_ahead
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                ahead.followed = ahead.followed.max(*seq);
                if ahead.claimed.remove(seq) {
                    continue; // this replica's ingest taught it before acking it
                }
                match record {
                    LogRecord::Event {
                        event,
                        filtered: false,
                        ..
                    } => {
                        let item = self.backends.items.intern(&event.item_id);
                        self.learn(event, item, self.weight(event), true);
                    }
                    LogRecord::Event { filtered: true, .. } => {}
                    LogRecord::Erase { user_id, .. } => self.forget_user(user_id),
                }
            }
            // Claims of positions the log no longer holds (trimmed) are never read.
            let mut ahead = self
                .learnt_ahead
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let rest = ahead.claimed.split_off(&(*last + 1));
            ahead.claimed = rest;
        }
        Ok(read)
    }

    /// Starts the claims of [`LearntAhead`](super::LearntAhead) afresh at `followed`: after
    /// recovery, and when a model state is installed (what ingest taught the replaced
    /// model is then learnt again by following).
    pub(super) fn reset_learnt_ahead(&self, followed: Seq) {
        let mut ahead = self
            .learnt_ahead
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ahead.followed = followed;
        ahead.claimed.clear();
    }

    /// The scheduled checkpoint: [`checkpoint`](Self::checkpoint) when the profile store
    /// says one is due ([`ProfileStore::checkpoint_due`](crate::ProfileStore::checkpoint_due)).
    pub async fn checkpoint_if_due(&self) -> Result<Option<Seq>> {
        let seq = self.backends.sink.last_seq().await?;
        if !self.backends.profiles.checkpoint_due(seq) {
            return Ok(None);
        }
        self.checkpoint().await
    }

    /// Writes a profile checkpoint at a consistent cut of the log, if the profile store
    /// keeps one. Ingest pauses only while the store captures what to write.
    pub async fn checkpoint(&self) -> Result<Option<Seq>> {
        let _one_at_a_time = self.checkpoint_lock.lock().await;
        let (seq, write) = {
            let _gate = self.apply_gate.write().await;
            let seq = self.backends.sink.last_seq().await?;
            (seq, self.backends.profiles.capture_checkpoint(seq))
        };
        match write {
            Some(write) => {
                write.await?;
                debug!(seq, "profiles checkpointed");
                Ok(Some(seq))
            }
            None => Ok(None),
        }
    }

    /// Applies again the events whose profile update was never confirmed (see
    /// [`ProfileStore::unapplied`](crate::ProfileStore::unapplied)); stores make that idempotent. Returns how many.
    pub async fn repair_profiles(&self) -> Result<usize> {
        const GRACE_MS: i64 = 5_000;
        let seqs = self.backends.profiles.unapplied(GRACE_MS, 1000).await?;
        let mut records = Vec::with_capacity(seqs.len());
        for seq in &seqs {
            // Positions are sparse here, so one read each.
            if let Some(found) = self
                .backends
                .sink
                .read(seq - 1, 1)
                .await?
                .into_iter()
                .find(|(s, _)| s == seq)
            {
                records.push(found);
            }
        }
        let updates: Vec<ProfileUpdate<'_>> = records
            .iter()
            .filter_map(|(seq, record)| match record {
                LogRecord::Event {
                    event,
                    filtered: false,
                    ingested_ms,
                } => Some(ProfileUpdate {
                    seq: *seq,
                    event,
                    weight: self.weight(event),
                    now_ms: *ingested_ms,
                }),
                _ => None,
            })
            .collect();
        if !updates.is_empty() {
            warn!(
                events = updates.len(),
                "applying events to profiles whose first apply was not confirmed"
            );
            self.backends.profiles.apply(&updates).await?;
        }
        Ok(updates.len())
    }
}

#[cfg(test)]
mod tests {
    use super::super::EventOutcome;
    use super::super::fixtures::{Harness, user, views};
    use crate::traits::EventSink;
    use crate::types::EventKind;

    #[tokio::test]
    async fn an_erased_profile_stays_erased_through_recovery() {
        let h = Harness::new().await;
        h.accept(views("a", "alice", "shoe", 2)).await;
        h.accept(views("b", "bob", "hat", 1)).await;
        // The checkpoint holds alice's profile; only the log knows she was erased.
        assert_eq!(h.engine.checkpoint().await.unwrap(), Some(3));
        assert!(h.engine.erase_profile(&user("alice")).await.unwrap());
        assert_eq!(h.model.user_weight(&user("alice")), None);
        h.accept(views("c", "bob", "hat", 1)).await;

        let (r, replayed) = h.after_crash().recover().await;
        assert_eq!(replayed, 5, "3 events, the erase and 1 event");
        assert_eq!(r.engine.profile(&user("alice")).await.unwrap(), None);
        assert_eq!(r.model.user_weight(&user("alice")), None);
        assert_eq!(r.profile_version("bob").await, 2);
        // What she did still counts for the items, as it did before the crash.
        assert_eq!(r.learnt("shoe"), 2.0 * r.weight(&EventKind::View));
    }

    #[tokio::test]
    async fn recovery_replays_only_what_the_checkpoint_and_the_model_version_miss() {
        let h = Harness::new().await;
        h.accept(views("a", "alice", "shoe", 3)).await;
        assert_eq!(h.engine.checkpoint().await.unwrap(), Some(3));
        h.accept(views("b", "alice", "shoe", 2)).await;

        // No model version: the model relearns the whole log, profiles only the tail.
        let (h, replayed) = h.after_crash().recover().await;
        assert_eq!(replayed, 5);
        assert_eq!(h.profile_version("alice").await, 5);
        assert_eq!(h.model.events(), 5);
        assert_eq!(h.learnt("shoe"), 5.0 * h.weight(&EventKind::View));

        // A model version at 5 and a checkpoint at 6: replay starts after 5, and each
        // side takes only what it misses.
        let version = h.engine.snapshot("test", "t").await.unwrap();
        assert_eq!(version.log_seq, 5);
        h.accept(views("c", "alice", "shoe", 1)).await;
        assert_eq!(h.engine.checkpoint().await.unwrap(), Some(6));
        h.accept(views("d", "alice", "shoe", 1)).await;

        let (h, replayed) = h.after_crash().recover().await;
        assert_eq!(replayed, 2);
        assert_eq!(h.profile_version("alice").await, 7);
        assert_eq!(h.model.events(), 7);
        assert_eq!(h.learnt("shoe"), 7.0 * h.weight(&EventKind::View));
        assert_eq!(h.engine.model_version(), "counting/v1");

        // The acked events are still duplicates to a retrying client.
        let again = h
            .engine
            .ingest(views("d", "alice", "shoe", 1))
            .await
            .unwrap();
        assert_eq!(again, [EventOutcome::Duplicate]);
        assert_eq!(h.store.last_seq().await.unwrap(), 7);
    }
}
