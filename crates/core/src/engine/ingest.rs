//! Ingest: events through validation, the bot filter and the log into profiles and the
//! model; and erasing a profile, which goes through the log the same way.

use std::sync::atomic::Ordering;

use tracing::debug;

use super::evaluation::Sample;
use super::{Engine, EventOutcome};
use crate::catalog::ItemIdx;
use crate::error::{Error, Result};
use crate::profile::Profile;
use crate::traits::{Appended, LogRecord, Observation, ProfileUpdate, SignalEvent};
use crate::types::{Event, RawEvent, Seq, UserId, now_ms};

/// Events learnt between two yields of the worker thread in [`Engine::ingest`]: a few
/// hundred microseconds of CPU.
const LEARN_SLICE: usize = 64;

impl Engine {
    /// Ingests one batch. Invalid events are rejected with their reason while the rest
    /// proceed; an oversize batch is refused whole.
    pub async fn ingest(&self, batch: Vec<RawEvent>) -> Result<Vec<EventOutcome>> {
        if batch.len() > self.config.max_batch {
            return Err(Error::ResourceExhausted(format!(
                "batch of {} events exceeds the limit of {}",
                batch.len(),
                self.config.max_batch
            )));
        }
        let now = now_ms();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        // Position in `outcomes` of each record, to put the sink's answers back in place.
        let mut slots = Vec::with_capacity(batch.len());
        for raw in batch {
            match raw.validate(&self.limits, now) {
                Err(err) => outcomes.push(EventOutcome::Rejected(err.to_string())),
                Ok(event) => {
                    let filtered = self.bots.check(&event);
                    slots.push(outcomes.len());
                    outcomes.push(match &filtered {
                        Some(reason) => EventOutcome::Filtered(reason.clone()),
                        None => EventOutcome::Accepted,
                    });
                    records.push(LogRecord::Event {
                        event,
                        filtered: filtered.is_some(),
                        ingested_ms: now,
                    });
                }
            }
        }
        if records.is_empty() {
            return Ok(outcomes);
        }

        let weights: Vec<f32> = records
            .iter()
            .map(|record| match record {
                LogRecord::Event { event, .. } => self.weight(event),
                LogRecord::Erase { .. } => 0.0,
            })
            .collect();
        let _gate = self.apply_gate.read().await;
        // A sink that also holds the profiles may append and apply in one step (one
        // round trip to a shared store); otherwise append, then apply what is new.
        let (appended, applied) = match self.backends.sink.append_applying(&records, &weights).await
        {
            Some(appended) => (appended?, true),
            None => (self.backends.sink.append(&records).await?, false),
        };
        if appended.len() != records.len() {
            return Err(Error::Internal(format!(
                "sink answered {} outcomes for {} records",
                appended.len(),
                records.len()
            )));
        }
        // What profiles keep shares the item index's strings (one per item, not one per
        // event held in a profile). The index found here is the one the model learns:
        // `items` holds one per update below, in the same order.
        let mut items = Vec::with_capacity(records.len());
        for (record, outcome) in records.iter_mut().zip(&appended) {
            if let (
                LogRecord::Event {
                    event,
                    filtered: false,
                    ..
                },
                Appended::At(_),
            ) = (record, outcome)
            {
                items.push(self.backends.items.canonicalize(&mut event.item_id));
            }
        }
        let mut updates = Vec::with_capacity(items.len());
        for (((record, outcome), slot), weight) in
            records.iter().zip(&appended).zip(&slots).zip(&weights)
        {
            let LogRecord::Event {
                event, filtered, ..
            } = record
            else {
                continue;
            };
            match outcome {
                Appended::Duplicate => outcomes[*slot] = EventOutcome::Duplicate,
                Appended::At(_) if *filtered => {}
                Appended::At(seq) => updates.push(ProfileUpdate {
                    seq: *seq,
                    event,
                    weight: *weight,
                    now_ms: now,
                }),
            }
        }
        if !updates.is_empty() {
            if !applied {
                self.backends.profiles.apply(&updates).await?;
            }
            // An accepted event is in the model before its ack, also when the model
            // follows the shared log: then whichever comes first, this or following,
            // teaches it (once). Learning a whole batch takes milliseconds of CPU, so it
            // yields the worker thread between slices: a `Recommend` queued behind it on
            // the same worker waits for one slice, not for the batch.
            for (i, (u, item)) in updates.iter().zip(&items).enumerate() {
                if i > 0 && i % LEARN_SLICE == 0 {
                    tokio::task::yield_now().await;
                }
                if !self.follows_log || self.claim_for_ingest(u.seq) {
                    self.learn(u.event, *item, u.weight, true);
                }
            }
        }
        debug!(
            events = outcomes.len(),
            applied = updates.len(),
            "batch ingested"
        );
        Ok(outcomes)
    }

    /// Whether ingest teaches the model the event at `seq` (true) or following the log
    /// already did (false); see [`LearntAhead`](super::LearntAhead).
    fn claim_for_ingest(&self, seq: Seq) -> bool {
        let mut ahead = self
            .learnt_ahead
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        seq > ahead.followed && ahead.claimed.insert(seq)
    }

    pub(super) fn weight(&self, event: &Event) -> f32 {
        self.config.weights.weight(&event.kind, event.weight)
    }

    /// Teaches the model one event (`item` is its item's index), unless its user is held
    /// out; with `evaluate`, a sampled event is first handed to the evaluation with the
    /// item's vector as it is before learning (prequential).
    pub(super) fn learn(&self, event: &Event, item: ItemIdx, weight: f32, evaluate: bool) {
        let holdout = self.sampler.holdout(event.user_id.as_str());
        if let Some(signals) = &self.signals {
            signals.observe(&SignalEvent {
                user: &event.user_id,
                item,
                kind: &event.kind,
                timestamp_ms: event.timestamp_ms,
                learn: !holdout,
            });
        }
        if evaluate
            && let Some(samples) = self.samples.get()
            && self.sampler.sampled(event.event_id.as_str())
        {
            let sample = Sample {
                user: event.user_id.clone(),
                item,
                timestamp_ms: event.timestamp_ms,
                target: self.backends.model.item_vector(item),
                holdout,
            };
            if samples.try_send(sample).is_err() {
                self.quality.record_dropped();
            }
        }
        if holdout {
            self.events_applied.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.backends.model.observe(&Observation {
            user: &event.user_id,
            item,
            weight,
            timestamp_ms: event.timestamp_ms,
        });
        // An index retriever re-reads the item's vector off the request path; the
        // exact scan reads the model's vectors directly and ignores this.
        self.backends.retriever.upsert(item, &[]);
        self.events_applied.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops what the models keep about `user`.
    pub(super) fn forget_user(&self, user: &UserId) {
        self.backends.model.forget_user(user);
        if let Some(signals) = &self.signals {
            signals.forget_user(user);
        }
    }

    /// The user's profile.
    pub async fn profile(&self, user: &UserId) -> Result<Option<Profile>> {
        self.backends.profiles.get(user).await
    }

    /// Erases the user's profile and what the model keeps about them, durably: the erase
    /// is recorded in the log so replay after a restart does not bring the profile back.
    pub async fn erase_profile(&self, user: &UserId) -> Result<bool> {
        let _gate = self.apply_gate.read().await;
        self.backends
            .sink
            .append(&[LogRecord::Erase {
                user_id: user.clone(),
                erased_ms: now_ms(),
            }])
            .await?;
        self.forget_user(user);
        self.backends.profiles.erase(user).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::EngineConfig;
    use super::super::fixtures::{Harness, item_id, raw, user, views};
    use super::EventOutcome;
    use crate::error::Error;
    use crate::traits::EventSink;
    use crate::types::{EventKind, RawKind};

    #[tokio::test]
    async fn an_accepted_event_is_in_the_log_the_profile_and_the_model_when_ingest_returns() {
        let h = Harness::new().await;
        h.accept(vec![raw("e1", "alice", "shoe", RawKind::Purchase)])
            .await;
        assert_eq!(h.store.last_seq().await.unwrap(), 1);
        let profile = h.engine.profile(&user("alice")).await.unwrap().unwrap();
        assert_eq!(profile.version, 1);
        assert!(profile.has_purchased(&item_id("shoe")));
        assert_eq!(h.learnt("shoe"), h.weight(&EventKind::Purchase));
        assert_eq!(h.model.events(), 1);
        assert_eq!(h.engine.stats().events_applied, 1);
    }

    /// A large batch does not hold the thread it runs on for all of its learning: a task
    /// waiting on the same (single) thread, as a `Recommend` on the same tokio worker
    /// would, runs before the batch is done.
    #[tokio::test(flavor = "current_thread")]
    async fn a_large_batch_lets_other_tasks_on_its_thread_run_before_it_is_done() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let h = Harness::new().await;
        let done = Arc::new(AtomicBool::new(false));
        let waiting = tokio::spawn({
            let done = Arc::clone(&done);
            async move { done.load(Ordering::SeqCst) }
        });
        let batch = (0..500)
            .map(|i| {
                let user = format!("u{}", i % 50);
                raw(
                    &format!("e{i}"),
                    &user,
                    &format!("i{}", i % 40),
                    RawKind::View,
                )
            })
            .collect();
        let outcomes = h.engine.ingest(batch).await.unwrap();
        done.store(true, Ordering::SeqCst);
        assert!(outcomes.iter().all(|o| *o == EventOutcome::Accepted));
        assert!(
            !waiting.await.unwrap(),
            "the waiting task ran only after the whole batch"
        );
    }

    /// Replicas on a shared store: the model follows the log, yet the replica that acks
    /// an event has it in its model at the ack (as without a shared log), and following
    /// does not teach it again; other replicas learn it by following.
    #[tokio::test]
    async fn a_replica_following_the_log_learns_its_own_events_before_the_ack_once() {
        let a = Harness::new().await.following();
        let b = Harness::over(a.store.clone(), EngineConfig::default())
            .await
            .following();
        a.accept(views("a", "alice", "shoe", 2)).await;
        assert_eq!(a.model.events(), 2, "in A's model when ingest returns");
        assert_eq!(b.model.events(), 0, "B has not followed yet");
        assert_eq!(a.engine.follow().await.unwrap(), 2);
        assert_eq!(b.engine.follow().await.unwrap(), 2);
        assert_eq!(
            a.model.events(),
            2,
            "following does not teach A its own events again"
        );
        assert_eq!(b.model.events(), 2);
        assert_eq!(a.learnt("shoe"), 2.0 * a.weight(&EventKind::View));

        b.accept(views("b", "bob", "hat", 1)).await;
        assert_eq!(b.model.events(), 3);
        a.engine.follow().await.unwrap();
        b.engine.follow().await.unwrap();
        assert_eq!((a.model.events(), b.model.events()), (3, 3));

        // Following first, ingest's claim after: the event is not learnt a second time.
        a.store
            .append(&[crate::traits::LogRecord::Event {
                event: raw("c-0", "carol", "cap", RawKind::View)
                    .validate(
                        &crate::types::EventLimits::default(),
                        crate::types::now_ms(),
                    )
                    .unwrap(),
                filtered: false,
                ingested_ms: crate::types::now_ms(),
            }])
            .await
            .unwrap();
        a.engine.follow().await.unwrap();
        assert_eq!(a.model.events(), 4);
        assert!(
            !a.engine.claim_for_ingest(4),
            "followed already: ingest does not learn it"
        );
        assert!(
            a.engine.claim_for_ingest(5),
            "not followed yet: ingest learns it"
        );
        assert!(!a.engine.claim_for_ingest(5), "claimed once");
    }

    #[tokio::test]
    async fn a_duplicate_in_the_batch_or_later_is_duplicate_and_applied_once() {
        let h = Harness::new().await;
        let outcomes = h
            .engine
            .ingest(vec![
                raw("e1", "alice", "shoe", RawKind::View),
                raw("e1", "alice", "shoe", RawKind::View),
                raw("e2", "alice", "hat", RawKind::View),
            ])
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            [
                EventOutcome::Accepted,
                EventOutcome::Duplicate,
                EventOutcome::Accepted
            ]
        );
        let later = h
            .engine
            .ingest(vec![raw("e1", "alice", "shoe", RawKind::View)])
            .await
            .unwrap();
        assert_eq!(later, [EventOutcome::Duplicate]);

        assert_eq!(h.store.last_seq().await.unwrap(), 2);
        assert_eq!(h.profile_version("alice").await, 2);
        assert_eq!(h.model.events(), 2);
        assert_eq!(h.learnt("shoe"), h.weight(&EventKind::View));
    }

    #[tokio::test]
    async fn an_invalid_event_is_rejected_naming_the_field_while_the_rest_go_on() {
        let h = Harness::new().await;
        let no_timestamp = crate::types::RawEvent {
            timestamp_ms: None,
            ..raw("e3", "alice", "hat", RawKind::View)
        };
        let outcomes = h
            .engine
            .ingest(vec![
                raw("e1", "alice", "shoe", RawKind::View),
                raw("e2", "", "shoe", RawKind::View),
                no_timestamp,
                raw("e4", "alice", "sock", RawKind::Click),
            ])
            .await
            .unwrap();
        assert_eq!(outcomes[0], EventOutcome::Accepted);
        assert!(
            matches!(&outcomes[1], EventOutcome::Rejected(r) if r.contains("user_id")),
            "{outcomes:?}"
        );
        assert!(
            matches!(&outcomes[2], EventOutcome::Rejected(r) if r.contains("timestamp")),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[3], EventOutcome::Accepted);
        assert_eq!(h.store.last_seq().await.unwrap(), 2);
        assert_eq!(h.profile_version("alice").await, 2);
        assert_eq!(h.learnt("hat"), 0.0);
    }

    #[tokio::test]
    async fn an_oversize_batch_is_refused_whole() {
        let h = Harness::with(EngineConfig {
            max_batch: 2,
            ..EngineConfig::default()
        })
        .await;
        let refused = h.engine.ingest(views("big", "alice", "shoe", 3)).await;
        assert!(
            matches!(refused, Err(Error::ResourceExhausted(_))),
            "{refused:?}"
        );
        assert_eq!(h.store.last_seq().await.unwrap(), 0);
        assert_eq!(h.profile_version("alice").await, 0);
        assert_eq!(h.model.events(), 0);

        h.accept(views("big", "alice", "shoe", 2)).await;
        assert_eq!(h.profile_version("alice").await, 2);
    }

    #[tokio::test]
    async fn a_bot_event_is_logged_but_applied_to_nothing() {
        let h = Harness::new().await;
        let mut bot = raw("e1", "crawler-7", "shoe", RawKind::View);
        bot.context.insert(
            "user_agent".into(),
            "Mozilla/5.0 (compatible; Googlebot)".into(),
        );
        let outcomes = h.engine.ingest(vec![bot]).await.unwrap();
        assert!(
            matches!(&outcomes[0], EventOutcome::Filtered(r) if r.contains("user agent")),
            "{outcomes:?}"
        );
        assert_eq!(h.store.last_seq().await.unwrap(), 1, "kept for audit");
        assert_eq!(h.profile_version("crawler-7").await, 0);
        assert_eq!(h.model.events(), 0);
    }
}
