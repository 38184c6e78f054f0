//! The engine: composes sink, profiles, catalog, model and retriever into ingest and
//! recommend.
//!
//! Ingest: validate → bot/noise filter → sink (dedupe + durable append) → profile
//! (sessionised there) → model. Recommend: profile → fold-in user vector → retrieve with
//! filters → popular fill-in → respond.
//!
//! Recovery: the event log is the durable record. Profiles are checkpointed by stores
//! that keep them in memory, and the model is rebuilt by replaying the log, so an event
//! acked `accepted` is never lost and never applied twice.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};
use tracing::{debug, info, warn};

use crate::blend::{Candidate, Credit, blend};
use crate::catalog::{Item, ItemIdx, ItemIndex};
use crate::error::{Error, Result};
use crate::filter::{BotFilter, BotFilterConfig};
use crate::model_store::{ItemState, ModelState, ModelStore, ModelVersion, StoredModel};
use crate::profile::Profile;
use crate::quality::{
    QualityConfig, QualityReport, QualityTracker, RollbackDecision, Sampler, VersionQuality,
};
use crate::traits::{
    Appended, CatalogStore, ContentModel, EventSink, HistoryEntry, LogRecord, Observation,
    OnlineModel, ProfileStore, ProfileUpdate, Retriever, Scored, Seq,
};
use crate::types::{Event, EventLimits, ItemId, KindWeights, RawEvent, UserId, now_ms};

/// Engine settings that are not a backend's own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Most events in one batch.
    pub max_batch: usize,
    /// How far in the future an event timestamp may be, in ms.
    pub max_future_ms: i64,
    /// Learning weight per kind.
    pub weights: KindWeights,
    /// Bot and noise rules.
    pub bot_filter: BotFilterConfig,
    /// Drop purchased items from recommendations unless the request says otherwise.
    pub exclude_purchased: bool,
    /// Drop every recently seen item unless the request says otherwise.
    pub exclude_seen: bool,
    /// Most items one request may ask for.
    pub max_count: usize,
    /// Recommend answers kept in the cache (entries); 0 turns it off.
    pub cache_entries: u64,
    /// Longest a cached answer is served, in ms. The user's own events never wait for it
    /// (they change the profile version in the key), nor do catalog changes and model
    /// version swaps; it bounds how long other users' events may move the shared model
    /// and popularity without the answer following.
    pub cache_ttl_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            max_future_ms: EventLimits::default().max_future_ms,
            weights: KindWeights::default(),
            bot_filter: BotFilterConfig::default(),
            exclude_purchased: true,
            exclude_seen: false,
            max_count: 500,
            cache_entries: 100_000,
            cache_ttl_ms: 1_000,
        }
    }
}

/// Name of the lease the learner holds in the model store.
pub const LEARNER_LEASE: &str = "learner";

/// The outcome for one event of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventOutcome {
    /// Recorded, applied to the profile, seen by the model.
    Accepted,
    /// Already accepted within the dedupe window.
    Duplicate,
    /// Invalid, with the reason (naming the field).
    Rejected(String),
    /// Recorded for audit but bot or noise, with the reason.
    Filtered(String),
}

/// Narrowing of candidates for one request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RequestFilter {
    /// Only items in one of these categories, when non-empty.
    pub include_categories: Vec<String>,
    /// Never items in these categories.
    pub exclude_categories: Vec<String>,
    /// Never these items.
    pub exclude_items: Vec<ItemId>,
    /// Overrides [`EngineConfig::exclude_purchased`].
    pub exclude_purchased: Option<bool>,
    /// Overrides [`EngineConfig::exclude_seen`].
    pub exclude_seen: Option<bool>,
}

/// Which model produced a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Matrix factorisation.
    Mf,
    /// The content model (embeddings from the catalog).
    Content,
    /// Trending popularity.
    Popular,
    /// Nearest neighbours of an item.
    Similar,
}

/// Which item space `SimilarItems` searches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SimilarSpace {
    /// MF when the item has an MF vector, else content when it has an embedding.
    #[default]
    Auto,
    /// The MF item vectors (learnt from interactions).
    Mf,
    /// The content embeddings (from the catalog).
    Content,
}

/// One recommended item.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredItem {
    /// The item.
    pub item_id: ItemId,
    /// Its score.
    pub score: f32,
    /// Which model produced it.
    pub source: Source,
}

/// The answer to a recommend or similar-items request.
#[derive(Clone, Debug, PartialEq)]
pub struct Recommendation {
    /// Best first.
    pub items: Vec<ScoredItem>,
    /// Model version that scored them.
    pub model_version: String,
    /// Profile version used (0 for an unknown user).
    pub profile_version: u64,
    /// Fell back because some state was unavailable.
    pub degraded: bool,
    /// Served from the recommend cache.
    pub cached: bool,
}

/// What a cached recommend answer depends on: an answer is reused only for the same
/// user at the same profile version (so never across one of their events), model
/// version, catalog generation and request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    user: UserId,
    profile_version: u64,
    model_version: u64,
    rollbacks: u64,
    catalog: u64,
    count: usize,
    filter: RequestFilter,
}

/// The backends an engine composes.
pub struct Backends {
    /// The event log.
    pub sink: Arc<dyn EventSink>,
    /// User profiles.
    pub profiles: Arc<dyn ProfileStore>,
    /// Catalog items.
    pub catalog: Arc<dyn CatalogStore>,
    /// The online model.
    pub model: Arc<dyn OnlineModel>,
    /// Search over the model's item vectors.
    pub retriever: Arc<dyn Retriever>,
    /// The item index shared with the model and retriever.
    pub items: Arc<ItemIndex>,
    /// Model snapshots and the learner lease.
    pub models: Arc<dyn ModelStore>,
}

/// Ingest and recommend over a set of backends.
pub struct Engine {
    backends: Backends,
    config: EngineConfig,
    limits: EventLimits,
    bots: BotFilter,
    /// Held shared by every ingest from append to model update, and exclusively for the
    /// instant a checkpoint captures a consistent cut. One uncontended read acquisition
    /// per batch, never per event.
    apply_gate: RwLock<()>,
    checkpoint_lock: Mutex<()>,
    events_applied: AtomicU64,
    /// Whether the model learns from the shared event log ([`Engine::follow`]) rather than
    /// from this engine's own ingest.
    follows_log: bool,
    /// Log position the model has learnt up to, when following the log, and the catalog
    /// version last loaded.
    followed: Mutex<Followed>,
    /// The model version the model started from (0: none), for answers' labels.
    base_version: AtomicU64,
    /// Rollback generation this engine has applied.
    rollback_generation: AtomicU64,
    /// Which events are scored and which users are held out.
    sampler: Sampler,
    /// The prequential figures and the rollback decision.
    quality: QualityTracker,
    /// Sampled events on their way to the evaluation task ([`Engine::start_quality`]);
    /// unset until it runs, and then samples are simply not taken.
    samples: OnceLock<tokio::sync::mpsc::Sender<Sample>>,
    /// Recent recommend answers ([`EngineConfig::cache_entries`]).
    cache: Option<moka::sync::Cache<CacheKey, Arc<[ScoredItem]>>>,
    /// Bumped on every catalog change, so cached answers never outlive one.
    catalog_generation: AtomicU64,
    /// Whether this engine held the learner lease at the last acquisition.
    learner: AtomicBool,
    /// The content model and its blend weight, when configured ([`Engine::with_content`]).
    content: Option<(Arc<dyn ContentModel>, f32)>,
}

/// Samples waiting for the evaluation task; more are dropped (and counted).
const SAMPLE_QUEUE: usize = 1024;

/// One sampled event, taken on the learn path just before the model learns it.
struct Sample {
    user: UserId,
    item: ItemIdx,
    timestamp_ms: i64,
    /// The item's vector before the model learnt the event, so the score is prequential
    /// even though the ranking runs a moment later.
    target: Option<Vec<f32>>,
    holdout: bool,
}

#[derive(Default)]
struct Followed {
    seq: Seq,
    catalog_version: u64,
}

/// Counters since start-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Events applied to profiles and the model (including replay).
    pub events_applied: u64,
}

impl Engine {
    /// An engine over `backends`; call [`Engine::recover`] before serving.
    pub fn new(backends: Backends, config: EngineConfig) -> Self {
        let cache = (config.cache_entries > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.cache_entries)
                .time_to_live(Duration::from_millis(config.cache_ttl_ms.max(1)))
                .build()
        });
        let limits = EventLimits {
            max_future_ms: config.max_future_ms,
        };
        Self {
            bots: BotFilter::new(config.bot_filter.clone()),
            backends,
            config,
            limits,
            apply_gate: RwLock::new(()),
            checkpoint_lock: Mutex::new(()),
            events_applied: AtomicU64::new(0),
            follows_log: false,
            followed: Mutex::new(Followed::default()),
            base_version: AtomicU64::new(0),
            rollback_generation: AtomicU64::new(0),
            sampler: Sampler::new(&QualityConfig::disabled()),
            quality: QualityTracker::new(QualityConfig::disabled()),
            samples: OnceLock::new(),
            learner: AtomicBool::new(false),
            content: None,
            cache,
            catalog_generation: AtomicU64::new(0),
        }
    }

    /// Adds the content model: catalog embeddings (which must then have its dimension)
    /// feed it, recommendations blend it with MF at `weight` (0 = MF order, 1 = content
    /// order; see [`crate::blend`]) and fall back to it for items with no interactions
    /// yet, and `SimilarItems` can search its space.
    pub fn with_content(mut self, content: Arc<dyn ContentModel>, weight: f32) -> Self {
        self.content = Some((content, weight));
        self
    }

    /// Records a stored catalog item in the item index and, when it has an embedding, in
    /// the content model.
    fn index_item(&self, item: &Item) {
        self.catalog_generation.fetch_add(1, Ordering::Relaxed);
        let idx = self.backends.items.set_catalog(item);
        if let Some((content, _)) = &self.content
            && item.embedding.len() == content.dim()
        {
            content.set_item(idx, &item.embedding);
        }
    }

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
    async fn refresh_baseline(&self) -> Result<()> {
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
            for (_, record) in &page {
                match record {
                    LogRecord::Event {
                        event,
                        filtered: false,
                        ..
                    } => self.learn(event, self.weight(event), true),
                    LogRecord::Event { filtered: true, .. } => {}
                    LogRecord::Erase { user_id, .. } => self.backends.model.forget_user(user_id),
                }
            }
        }
        Ok(read)
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The retriever's recall checks against the exact scan, when it makes them (see
    /// [`crate::RecallChecks`]).
    pub fn recall_checks(&self) -> Option<crate::RecallChecks> {
        self.backends.retriever.recall_checks()
    }

    /// The shared item index.
    pub fn items(&self) -> &Arc<ItemIndex> {
        &self.backends.items
    }

    /// Counters since start-up.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            events_applied: self.events_applied.load(Ordering::Relaxed),
        }
    }

    /// Makes the item index match the stored catalog, upserts and deletes alike.
    async fn reload_catalog(&self) -> Result<()> {
        self.catalog_generation.fetch_add(1, Ordering::Relaxed);
        let items = &self.backends.items;
        let stored = self.backends.catalog.load_all().await?;
        let present: HashSet<&str> = stored.iter().map(|i| i.item_id.as_str()).collect();
        for idx in 0..items.len() as ItemIdx {
            if let (Some(id), Some(meta)) = (items.id(idx), items.meta(idx))
                && meta.in_catalog
                && !present.contains(id.as_str())
            {
                items.set_deleted(id);
            }
        }
        for item in &stored {
            self.index_item(item);
        }
        Ok(())
    }

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
                self.install(&StoredModel::decode(&bytes)?)?;
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
            let page = self.backends.sink.read(after, 4096).await?;
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
            let mut updates = Vec::with_capacity(page.len());
            for (seq, record) in &page {
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
                            self.learn(event, weight, false);
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
                            self.backends.model.forget_user(user_id);
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
        info!(replayed, model_seq, ?profile_seq, "event log replayed");
        self.refresh_baseline().await?;
        Ok(replayed)
    }

    /// Loads `stored` into the model (items by id, interned here) and tells the retriever
    /// about every item.
    fn install(&self, stored: &StoredModel) -> Result<()> {
        let items = &self.backends.items;
        let state = ModelState {
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
        };
        self.backends.model.import(&state)?;
        for item in &state.items {
            self.backends.retriever.upsert(item.item, &[]);
        }
        self.reindex_in_background();
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

    async fn save_snapshot(
        &self,
        reason: &str,
        taken_by: &str,
        quality: Option<VersionQuality>,
    ) -> Result<ModelVersion> {
        let (seq, state) = if self.follows_log {
            let followed = self.followed.lock().await;
            (followed.seq, self.backends.model.export())
        } else {
            let _gate = self.apply_gate.write().await;
            (
                self.backends.sink.last_seq().await?,
                self.backends.model.export(),
            )
        };
        let Some(state) = state else {
            return Err(Error::Internal(format!(
                "model {} cannot export snapshots",
                self.backends.model.version()
            )));
        };
        let items = &self.backends.items;
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
    async fn rollback_as(
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
            let _followed = self.followed.lock().await;
            let _gate = self.apply_gate.write().await;
            self.install(&stored)?;
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
            let _followed = self.followed.lock().await;
            let _gate = self.apply_gate.write().await;
            self.install(&stored)?;
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

    fn weight(&self, event: &Event) -> f32 {
        self.config.weights.weight(&event.kind, event.weight)
    }

    /// Teaches the model one event, unless its user is held out; with `evaluate`, a
    /// sampled event is first handed to the evaluation with the item's vector as it is
    /// before learning (prequential).
    fn learn(&self, event: &Event, weight: f32, evaluate: bool) {
        let item = self.backends.items.intern(&event.item_id);
        let holdout = self.sampler.holdout(event.user_id.as_str());
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

        let _gate = self.apply_gate.read().await;
        let appended = self.backends.sink.append(&records).await?;
        if appended.len() != records.len() {
            return Err(Error::Internal(format!(
                "sink answered {} outcomes for {} records",
                appended.len(),
                records.len()
            )));
        }
        let mut updates = Vec::with_capacity(records.len());
        for ((record, outcome), slot) in records.iter().zip(&appended).zip(&slots) {
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
                    weight: self.weight(event),
                    now_ms: now,
                }),
            }
        }
        if !updates.is_empty() {
            self.backends.profiles.apply(&updates).await?;
            if !self.follows_log {
                for u in &updates {
                    self.learn(u.event, u.weight, true);
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

    /// Personal recommendations for `user`.
    pub async fn recommend(
        &self,
        user: &UserId,
        count: usize,
        filter: &RequestFilter,
    ) -> Result<Recommendation> {
        let count = self.check_count(count)?;
        let (profile, degraded) = match self.backends.profiles.get(user).await {
            Ok(p) => (p, false),
            Err(err) => {
                tracing::warn!(%user, error = %err, "profile unavailable, serving popular items");
                (None, true)
            }
        };
        let key = self.cache.as_ref().filter(|_| !degraded).map(|_| CacheKey {
            user: user.clone(),
            profile_version: profile.as_ref().map_or(0, |p| p.version),
            model_version: self.base_version.load(Ordering::Relaxed),
            rollbacks: self.rollback_generation.load(Ordering::Relaxed),
            catalog: self.catalog_generation.load(Ordering::Relaxed),
            count,
            filter: filter.clone(),
        });
        if let (Some(cache), Some(key)) = (&self.cache, &key)
            && let Some(items) = cache.get(key)
        {
            return Ok(Recommendation {
                items: items.to_vec(),
                model_version: self.model_version(),
                profile_version: key.profile_version,
                degraded: false,
                cached: true,
            });
        }
        let excluded = self.excluded(profile.as_ref(), filter);
        let pass = |idx: ItemIdx| self.passes(idx, &excluded, filter);
        let model = &self.backends.model;

        let history: Vec<HistoryEntry> = profile
            .as_ref()
            .map(|p| {
                p.recent
                    .iter()
                    .filter_map(|i| {
                        Some(HistoryEntry {
                            item: self.backends.items.get(i.item_id.as_str())?,
                            weight: i.weight,
                            timestamp_ms: i.timestamp_ms,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut items = Vec::with_capacity(count);
        let mf_vector = model.user_vector(&history);
        // A blend weight of 0 leaves content out of recommendations (it still serves
        // `SimilarItems`), so its search is not even run.
        let content = self
            .content
            .as_ref()
            .filter(|(_, w)| *w > 0.0)
            .and_then(|(c, w)| Some((c.as_ref(), *w, c.user_vector(&history)?)));
        match (mf_vector, content) {
            (mf_vector, Some((content, weight, content_vector))) => {
                let found = self.blended(
                    content,
                    weight,
                    mf_vector.as_deref(),
                    &content_vector,
                    count,
                    &pass,
                );
                items.extend(found);
            }
            (Some(vector), None) => {
                let found = self.backends.retriever.search(&vector, count, &pass);
                self.push_scored(&mut items, &found, Source::Mf);
            }
            (None, None) => {}
        }
        if items.len() < count {
            let chosen: HashSet<ItemIdx> = items
                .iter()
                .filter_map(|s: &ScoredItem| self.backends.items.get(s.item_id.as_str()))
                .collect();
            let fill = model.popular(count - items.len(), &|idx| {
                !chosen.contains(&idx) && pass(idx)
            });
            self.push_scored(&mut items, &fill, Source::Popular);
        }
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            cache.insert(key, items.as_slice().into());
        }
        Ok(Recommendation {
            items,
            model_version: self.model_version(),
            profile_version: profile.map_or(0, |p| p.version),
            degraded,
            cached: false,
        })
    }

    /// MF and content candidates for one user, blended ([`crate::blend`]): each model
    /// proposes twice `count` items passing `pass`, every candidate is scored by both
    /// models where they can, and the best `count` come back credited to the model that
    /// contributed most. Items nobody has interacted with yet come only from content.
    fn blended(
        &self,
        content: &dyn ContentModel,
        weight: f32,
        mf_vector: Option<&[f32]>,
        content_vector: &[f32],
        count: usize,
        pass: &dyn Fn(ItemIdx) -> bool,
    ) -> Vec<ScoredItem> {
        let items = &self.backends.items;
        let has_embedding = |idx: ItemIdx| items.meta(idx).is_some_and(|m| m.has_embedding);
        let content_score = |idx: ItemIdx| {
            has_embedding(idx)
                .then(|| content.score(idx, content_vector))
                .flatten()
        };
        let fetch = count.saturating_mul(2);
        let mut candidates: Vec<Candidate> = Vec::with_capacity(2 * fetch);
        if let Some(v) = mf_vector {
            for s in self.backends.retriever.search(v, fetch, pass) {
                candidates.push(Candidate {
                    item: s.item,
                    mf: Some(s.score),
                    content: content_score(s.item),
                });
            }
        }
        let from_mf: HashSet<ItemIdx> = candidates.iter().map(|c| c.item).collect();
        let content_pass = |idx: ItemIdx| has_embedding(idx) && pass(idx);
        for s in content.search(content_vector, fetch, &content_pass) {
            if !from_mf.contains(&s.item) {
                candidates.push(Candidate {
                    item: s.item,
                    mf: mf_vector.and_then(|v| self.backends.model.score(s.item, v)),
                    content: Some(s.score),
                });
            }
        }
        blend(&candidates, weight, count)
            .into_iter()
            .filter_map(|b| {
                Some(ScoredItem {
                    item_id: items.id(b.item)?.clone(),
                    score: b.score,
                    source: match b.credit {
                        Credit::Mf => Source::Mf,
                        Credit::Content => Source::Content,
                    },
                })
            })
            .collect()
    }

    /// Items whose vectors are nearest to `item`'s in `space`. NOT_FOUND when the item
    /// has no vector there (never interacted with, for MF; no embedding, for content).
    pub async fn similar_items(
        &self,
        item: &ItemId,
        count: usize,
        filter: &RequestFilter,
        space: SimilarSpace,
    ) -> Result<Recommendation> {
        let count = self.check_count(count)?;
        let not_found = || Error::NotFound(format!("item {item:?}"));
        let idx = self
            .backends
            .items
            .get(item.as_str())
            .ok_or_else(not_found)?;
        let content = self.content.as_ref().map(|(c, _)| c.as_ref());
        let has_embedding = || {
            self.backends
                .items
                .meta(idx)
                .is_some_and(|m| m.has_embedding)
        };
        let content_vector = || {
            content
                .filter(|_| has_embedding())
                .and_then(|c| c.item_vector(idx))
        };
        let (vector, use_content) = match space {
            SimilarSpace::Mf => (self.backends.model.item_vector(idx), false),
            SimilarSpace::Content if content.is_none() => {
                return Err(Error::invalid(
                    "space",
                    "the content model is not configured (set content.dim)",
                ));
            }
            SimilarSpace::Content => (content_vector(), true),
            SimilarSpace::Auto => match self.backends.model.item_vector(idx) {
                Some(v) => (Some(v), false),
                None => (content_vector(), true),
            },
        };
        let vector = vector.ok_or_else(not_found)?;
        let mut excluded = self.excluded(None, filter);
        excluded.insert(idx);
        let pass = |i: ItemIdx| self.passes(i, &excluded, filter);
        let mut items = Vec::with_capacity(count);
        match content {
            Some(content) if use_content => {
                let found = content.search(&vector, count, &|i| {
                    self.backends.items.meta(i).is_some_and(|m| m.has_embedding) && pass(i)
                });
                self.push_scored(&mut items, &found, Source::Content);
            }
            _ => {
                let found = self.backends.retriever.search(&vector, count, &pass);
                self.push_scored(&mut items, &found, Source::Similar);
            }
        }
        Ok(Recommendation {
            items,
            model_version: self.model_version(),
            profile_version: 0,
            degraded: false,
            cached: false,
        })
    }

    fn check_count(&self, count: usize) -> Result<usize> {
        match count {
            0 => Ok(10.min(self.config.max_count)),
            n if n > self.config.max_count => Err(Error::invalid(
                "count",
                format!("is {n}, at most {} allowed", self.config.max_count),
            )),
            n => Ok(n),
        }
    }

    fn excluded(&self, profile: Option<&Profile>, filter: &RequestFilter) -> HashSet<ItemIdx> {
        let items = &self.backends.items;
        let mut out: HashSet<ItemIdx> = filter
            .exclude_items
            .iter()
            .filter_map(|i| items.get(i.as_str()))
            .collect();
        if let Some(p) = profile {
            if filter
                .exclude_purchased
                .unwrap_or(self.config.exclude_purchased)
            {
                out.extend(p.purchased.iter().filter_map(|i| items.get(i.as_str())));
            }
            if filter.exclude_seen.unwrap_or(self.config.exclude_seen) {
                out.extend(
                    p.recent
                        .iter()
                        .filter_map(|i| items.get(i.item_id.as_str())),
                );
            }
        }
        out
    }

    fn passes(&self, idx: ItemIdx, excluded: &HashSet<ItemIdx>, filter: &RequestFilter) -> bool {
        if excluded.contains(&idx) {
            return false;
        }
        let Some(meta) = self.backends.items.meta(idx) else {
            return false;
        };
        if !meta.available {
            return false;
        }
        if !filter.include_categories.is_empty()
            && !meta
                .categories
                .iter()
                .any(|c| filter.include_categories.contains(c))
        {
            return false;
        }
        !meta
            .categories
            .iter()
            .any(|c| filter.exclude_categories.contains(c))
    }

    fn push_scored(&self, out: &mut Vec<ScoredItem>, found: &[Scored], source: Source) {
        out.extend(found.iter().filter_map(|s| {
            Some(ScoredItem {
                item_id: self.backends.items.id(s.item)?.clone(),
                score: s.score,
                source,
            })
        }));
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
        self.backends.model.forget_user(user);
        self.backends.profiles.erase(user).await
    }

    /// Validates and stores catalog items, then makes them visible to filters.
    pub async fn upsert_items(&self, items: Vec<Item>) -> Result<usize> {
        for (i, item) in items.iter().enumerate() {
            item.validate(&format!("items[{i}]"))?;
            if let Some((content, _)) = &self.content
                && !item.embedding.is_empty()
                && item.embedding.len() != content.dim()
            {
                return Err(Error::invalid(
                    format!("items[{i}].embedding"),
                    format!(
                        "has {} values; the content model takes {}",
                        item.embedding.len(),
                        content.dim()
                    ),
                ));
            }
        }
        self.backends.catalog.upsert(&items).await?;
        for item in &items {
            self.index_item(item);
        }
        Ok(items.len())
    }

    /// One catalog item.
    pub async fn item(&self, item: &ItemId) -> Result<Item> {
        self.backends
            .catalog
            .get(item)
            .await?
            .ok_or_else(|| Error::NotFound(format!("item {item:?}")))
    }

    /// Deletes a catalog item; it is never recommended again until upserted.
    pub async fn delete_item(&self, item: &ItemId) -> Result<bool> {
        let deleted = self.backends.catalog.delete(item).await?;
        self.backends.items.set_deleted(item);
        self.catalog_generation.fetch_add(1, Ordering::Relaxed);
        Ok(deleted)
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

    /// Periodic housekeeping: checkpoint, dedupe expiry, rate-limiter pruning.
    pub async fn maintain(&self) -> Result<()> {
        self.bots.maintain();
        self.backends.sink.maintain().await?;
        self.repair_profiles().await?;
        self.checkpoint().await?;
        Ok(())
    }

    /// Applies again the events whose profile update was never confirmed (see
    /// [`ProfileStore::unapplied`]); stores make that idempotent. Returns how many.
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

    /// Number of profiles held.
    pub async fn profile_count(&self) -> Result<usize> {
        self.backends.profiles.count().await
    }
}
