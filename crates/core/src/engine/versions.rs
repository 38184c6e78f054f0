//! Model versions: snapshots, the learner lease, pruning and rollbacks (operator's,
//! automatic, and other replicas').

use std::sync::atomic::Ordering;

use tracing::{info, warn};

use super::Engine;
use crate::error::{Error, Result};
use crate::model_store::{ModelVersion, StoredModel};
use crate::quality::VersionQuality;
use crate::traits::ImportUsers;
use crate::types::now_ms;

/// Name of the lease the learner holds in the model store.
pub const LEARNER_LEASE: &str = "learner";

impl Engine {
    /// Label of the model answering: the model's kind, and the version it started from.
    pub fn model_version(&self) -> String {
        match self.base_version.load(Ordering::Relaxed) {
            0 => self.backends.model.version(),
            v => format!("{}/v{v}", self.backends.model.version()),
        }
    }

    /// Snapshots the model at a consistent log position into the model store. `reason`
    /// and `taken_by` go into its metadata.
    /// The quality figures now go into its metadata and, when good, become the baseline
    /// of the automatic rollback.
    pub async fn snapshot(&self, reason: &str, taken_by: &str) -> Result<ModelVersion> {
        let quality = self.quality.snapshot_quality();
        let saved = self.save_snapshot(reason, taken_by, quality).await?;
        if let Some(q) = &saved.quality {
            self.quality.set_baseline(saved.id, q, true);
        }
        Ok(saved)
    }

    pub(super) async fn save_snapshot(
        &self,
        reason: &str,
        taken_by: &str,
        quality: Option<VersionQuality>,
    ) -> Result<ModelVersion> {
        let items = &self.backends.items;
        let export_signals = || {
            self.signals
                .as_ref()
                .map(|s| s.export(&|idx| items.id(idx).cloned()))
                .transpose()
        };
        let (seq, state, signals) = if self.follows_log {
            let followed = self.followed.lock().await;
            (
                followed.seq,
                self.backends.model.export(),
                export_signals()?,
            )
        } else {
            let _gate = self.apply_gate.write().await;
            (
                self.backends.sink.last_seq().await?,
                self.backends.model.export(),
                export_signals()?,
            )
        };
        let Some(state) = state else {
            return Err(Error::Internal(format!(
                "model {} cannot export snapshots",
                self.backends.model.version()
            )));
        };
        let stored = StoredModel {
            kind: self.backends.model.version(),
            factors: state.factors as u32,
            items: state
                .items
                .into_iter()
                .filter_map(|i| Some((items.id(i.item)?.clone(), i.vector, i.popularity)))
                .collect(),
            users: state.users,
            events: state.events,
            latest_ms: state.latest_ms,
            batch_origin: state.batch_origin,
            signals,
        };
        let version = ModelVersion {
            id: 0,
            created_ms: now_ms(),
            log_seq: seq,
            events: stored.events,
            items: stored.items.len() as u64,
            bytes: 0,
            reason: reason.to_owned(),
            taken_by: taken_by.to_owned(),
            quality,
        };
        let bytes = stored.encode()?;
        let saved = self.backends.models.save(version, bytes).await?;
        info!(
            version = saved.id,
            log_seq = seq,
            bytes = saved.bytes,
            reason,
            "model snapshot saved"
        );
        Ok(saved)
    }

    /// Takes or renews the learner lease for `holder`; `false` when another replica has it.
    /// On taking it over, the quality baseline becomes the newest good version (which the
    /// previous learner may have saved since this replica last looked), so the automatic
    /// rollback compares against it rather than against what was current at start-up.
    pub async fn acquire_learner_lease(&self, holder: &str, ttl_ms: u64) -> Result<bool> {
        let held = self
            .backends
            .models
            .acquire_lease(LEARNER_LEASE, holder, ttl_ms)
            .await?;
        let was_learner = self.learner.swap(held, Ordering::Relaxed);
        if held && !was_learner {
            self.refresh_baseline().await?;
        }
        Ok(held)
    }

    /// Gives the learner lease up (at shutdown), so another replica takes over at once.
    pub async fn release_learner_lease(&self, holder: &str) -> Result<()> {
        self.learner.store(false, Ordering::Relaxed);
        self.backends
            .models
            .release_lease(LEARNER_LEASE, holder)
            .await
    }

    /// Deletes all but the newest `keep` model versions.
    pub async fn prune_versions(&self, keep: usize) -> Result<usize> {
        self.backends.models.prune(keep.max(1)).await
    }

    /// Every stored model version, oldest first.
    pub async fn model_versions(&self) -> Result<Vec<ModelVersion>> {
        self.backends.models.list().await
    }

    /// Rolls the model back to version `id`: loads it, records the result as a new
    /// version (so replicas that start later load it) and a rollback (so running replicas
    /// load it too). Requests keep being served throughout; the swap is per item.
    pub async fn rollback(&self, id: u64, taken_by: &str) -> Result<ModelVersion> {
        self.rollback_as(id, &format!("rollback to {id}"), taken_by, false)
            .await
    }

    /// [`Engine::rollback`] recording `reason`. The new version carries the quality
    /// version `id` recorded, which becomes the baseline; the decayed figures restart.
    pub(super) async fn rollback_as(
        &self,
        id: u64,
        reason: &str,
        taken_by: &str,
        auto: bool,
    ) -> Result<ModelVersion> {
        let Some(bytes) = self.backends.models.load(id).await? else {
            return Err(Error::NotFound(format!("model version {id}")));
        };
        let quality = self
            .backends
            .models
            .list()
            .await?
            .into_iter()
            .find(|v| v.id == id)
            .and_then(|v| v.quality);
        let stored = StoredModel::decode(&bytes)?;
        {
            // Nothing learns while the old state goes in.
            let followed = self.followed.lock().await;
            let _gate = self.apply_gate.write().await;
            self.install(&stored, ImportUsers::KeepLive)?;
            self.reset_learnt_ahead(followed.seq);
        }
        self.quality.reset_window();
        let saved = self.save_snapshot(reason, taken_by, quality).await?;
        if let Some(q) = &saved.quality {
            // An operator's rollback re-arms; an automatic one fires once per good version.
            self.quality.set_baseline(saved.id, q, !auto);
        }
        let rollbacks = self.backends.models.record_rollback(saved.id).await?;
        self.rollback_generation
            .store(rollbacks.generation, Ordering::Relaxed);
        self.base_version.store(saved.id, Ordering::Relaxed);
        warn!(to = id, new_version = saved.id, reason, "model rolled back");
        Ok(saved)
    }

    /// Applies a rollback another replica recorded, if there is a new one. Returns the
    /// version installed.
    pub async fn follow_rollbacks(&self) -> Result<Option<u64>> {
        let rollbacks = self.backends.models.rollbacks().await?;
        if rollbacks.generation <= self.rollback_generation.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let Some(bytes) = self.backends.models.load(rollbacks.version).await? else {
            return Err(Error::NotFound(format!(
                "model version {} (installed by a rollback)",
                rollbacks.version
            )));
        };
        let stored = StoredModel::decode(&bytes)?;
        {
            let followed = self.followed.lock().await;
            let _gate = self.apply_gate.write().await;
            self.install(&stored, ImportUsers::KeepLive)?;
            self.reset_learnt_ahead(followed.seq);
        }
        self.rollback_generation
            .store(rollbacks.generation, Ordering::Relaxed);
        self.base_version
            .store(rollbacks.version, Ordering::Relaxed);
        self.quality.reset_window();
        self.refresh_baseline().await?;
        info!(
            version = rollbacks.version,
            "rollback by another replica applied"
        );
        Ok(Some(rollbacks.version))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{Harness, item, raw, user, views};
    use crate::engine::{Recommendation, RequestFilter, Source};
    use crate::types::{EventKind, RawKind};

    #[tokio::test]
    async fn a_rollback_installs_the_older_version_here_on_replicas_and_after_a_restart() {
        let h = Harness::new().await;
        let view = h.weight(&EventKind::View);
        h.accept(views("a", "alice", "shoe", 1)).await;
        let v1 = h.engine.snapshot("first", "t").await.unwrap();
        // A replica on the same store starts from v1 and learns on its own (after a
        // checkpoint, so its recovery has no profile to replay into the shared store).
        assert_eq!(h.engine.checkpoint().await.unwrap(), Some(1));
        let replica = Harness::over(h.store.clone(), h.engine.config().clone()).await;
        assert_eq!(replica.learnt("shoe"), view);
        replica.accept(views("r", "bob", "shoe", 2)).await;
        assert_eq!(replica.engine.follow_rollbacks().await.unwrap(), None);

        h.accept(views("b", "alice", "shoe", 3)).await;
        assert_eq!(h.learnt("shoe"), 4.0 * view);
        let v2 = h.engine.rollback(v1.id, "t").await.unwrap();
        assert_eq!(h.learnt("shoe"), view);
        assert_eq!(v2.reason, format!("rollback to {}", v1.id));
        assert!(v2.id > v1.id);
        assert_eq!(h.engine.model_version(), format!("counting/v{}", v2.id));
        let listed: Vec<u64> = h
            .engine
            .model_versions()
            .await
            .unwrap()
            .iter()
            .map(|v| v.id)
            .collect();
        assert_eq!(listed, [v1.id, v2.id]);

        assert_eq!(replica.learnt("shoe"), 3.0 * view);
        assert_eq!(
            replica.engine.follow_rollbacks().await.unwrap(),
            Some(v2.id)
        );
        assert_eq!(replica.learnt("shoe"), view);
        assert_eq!(
            replica.engine.follow_rollbacks().await.unwrap(),
            None,
            "once"
        );

        assert_eq!(h.engine.checkpoint().await.unwrap(), Some(6));
        let (restarted, replayed) = h.after_crash().recover().await;
        assert_eq!(replayed, 0, "the rollback version covers the whole log");
        assert_eq!(restarted.learnt("shoe"), view);
    }

    /// A rollback undoes what the model learnt, not what users did: a purchase made
    /// after the version rolled back to is still the user's, and a user erased since is
    /// not brought back by the older snapshot.
    #[tokio::test]
    async fn a_rollback_keeps_purchases_since_and_users_erased_since() {
        let (h, _signals) = Harness::new().await.with_signals(&["milk", "eggs"]);
        h.engine
            .upsert_items(vec![item("milk", true, &[]), item("eggs", true, &[])])
            .await
            .unwrap();
        h.accept(vec![
            raw("a1", "alice", "milk", RawKind::Purchase),
            raw("b1", "bob", "milk", RawKind::Purchase),
        ])
        .await;
        let v1 = h.engine.snapshot("first", "t").await.unwrap();
        h.accept(vec![raw("a2", "alice", "eggs", RawKind::Purchase)])
            .await;
        assert!(h.engine.erase_profile(&user("bob")).await.unwrap());

        h.engine.rollback(v1.id, "t").await.unwrap();
        let repeats = |answer: &Recommendation| -> Vec<String> {
            answer
                .items
                .iter()
                .filter(|i| i.source == Source::Repeat)
                .map(|i| i.item_id.as_str().to_owned())
                .collect()
        };
        let filter = RequestFilter::default();
        let alice = h
            .engine
            .recommend(&user("alice"), 10, &filter)
            .await
            .unwrap();
        assert_eq!(repeats(&alice), ["eggs", "milk"]);
        let bob = h.engine.recommend(&user("bob"), 10, &filter).await.unwrap();
        assert_eq!(repeats(&bob), Vec::<String>::new(), "bob stays erased");
        assert_eq!(
            h.model.user_weight(&user("bob")),
            None,
            "so does the model's"
        );
        let purchase = h.weight(&EventKind::Purchase);
        assert_eq!(h.model.user_weight(&user("alice")), Some(2.0 * purchase));
    }
}
