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

mod catalog;
mod config;
mod evaluation;
#[cfg(test)]
mod fixtures;
mod ingest;
mod recommend;
mod recovery;
mod refit;
mod types;
mod upkeep;
mod versions;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Mutex, RwLock};

use crate::catalog::ItemIndex;
use crate::filter::BotFilter;
use crate::model_store::ModelStore;
use crate::quality::{QualityConfig, QualityTracker, Sampler};
use crate::traits::{
    CatalogStore, ContentModel, EventSink, OnlineModel, ProfileStore, Retriever, SignalModel,
};
use crate::types::{EventLimits, Seq};

pub use self::config::{EngineConfig, PurchasedPolicy};
use self::evaluation::Sample;
use self::recommend::CacheKey;
pub use self::refit::{HoldoutCase, HoldoutFigures};
pub use self::types::{
    EventOutcome, Recommendation, RequestFilter, ScoredItem, SimilarSpace, Source,
};
pub use self::upkeep::EngineStats;
pub use self::versions::LEARNER_LEASE;

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
    /// When following the log: which of this replica's own events its ingest already
    /// taught the model (so it acks an event only once the model has it, as without a
    /// shared log) and where following has got to, so that each event is learnt once,
    /// by whichever of the two comes first.
    learnt_ahead: std::sync::Mutex<LearntAhead>,
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
    /// Repeat and next-item signals, when configured.
    signals: Option<Arc<dyn SignalModel>>,
}

/// Where the model stands in the shared log and the catalog (see [`Engine::follow`]).
#[derive(Default)]
struct Followed {
    seq: Seq,
    catalog_version: u64,
}

/// Who teaches the model an event of this replica's, when the model follows the shared
/// log: ingest claims the positions it appended, following claims what it reads, and the
/// first claim learns. Both sides claim under one lock.
#[derive(Default)]
pub(super) struct LearntAhead {
    /// The last position following has learnt (or skipped as claimed by ingest).
    followed: Seq,
    /// Positions after `followed` that ingest has claimed; following skips and drops them.
    claimed: std::collections::BTreeSet<Seq>,
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
            learnt_ahead: std::sync::Mutex::new(LearntAhead::default()),
            base_version: AtomicU64::new(0),
            rollback_generation: AtomicU64::new(0),
            sampler: Sampler::new(&QualityConfig::disabled()),
            quality: QualityTracker::new(QualityConfig::disabled()),
            samples: OnceLock::new(),
            learner: AtomicBool::new(false),
            content: None,
            signals: None,
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

    /// Adds the behaviour signals: every accepted event teaches them, recommendations
    /// rank their repeat and next-item candidates together with the model's, the
    /// `auto` purchased policy asks them what people buy again, and snapshots keep them.
    pub fn with_signals(mut self, signals: Arc<dyn SignalModel>) -> Self {
        self.signals = Some(signals);
        self
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
}
