//! Reflex core: the domain, its validation and errors, the backend traits, and the
//! engine that composes backends into ingest and recommend.
//!
//! Layout:
//! - [`types`]: ids, log positions, event kinds, events and their validation at the edge
//! - [`profile`]: user profiles and how an event changes one
//! - [`catalog`]: catalog items and the shared dense item index
//! - [`filter`]: the bot and noise filter
//! - [`hash`]: the stable hash (FNV-1a, SplitMix64) every crate shares
//! - [`traits`]: `EventSink`, `ProfileStore`, `CatalogStore`, `OnlineModel`, `ContentModel`,
//!   `Retriever`
//! - [`blend`]: how MF and content scores combine into one ranking
//! - [`model_store`]: model snapshots and versions, the model store and learner lease
//! - [`quality`]: prequential evaluation, the holdout and the automatic rollback decision
//! - [`engine`]: ingest, recommend, recovery, checkpoints, snapshots and rollback, one
//!   file per concern
//! - [`error`]: the error type and its transport-neutral codes
//! - `testing` (the `testing` feature, and this crate's tests): an in-memory backend and
//!   a minimal model, test doubles for engine tests

pub mod blend;
pub mod catalog;
pub mod engine;
pub mod error;
pub mod filter;
pub mod hash;
pub mod model_store;
pub mod profile;
pub mod quality;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod traits;
pub mod types;

pub use catalog::{Item, ItemIdx, ItemIndex};
pub use engine::{
    Backends, Engine, EngineConfig, EventOutcome, HoldoutCase, HoldoutFigures, Recommendation,
    RequestFilter, ScoredItem, SimilarSpace, Source,
};
pub use error::{Error, ErrorCode, Result};
pub use model_store::{ItemState, ModelState, ModelStore, ModelVersion, Rollbacks, StoredModel};
pub use profile::{Profile, ProfilePolicy};
pub use quality::{QualityConfig, QualityReport, VersionQuality};
pub use traits::{
    Appended, CatalogStore, ContentModel, DiskSpace, EventSink, HistoryEntry, ImportUsers,
    IndexBacklog, ItemItemWeights, LogRecord, Observation, OnlineModel, ProfileStore,
    ProfileUpdate, RecallChecks, Retriever, Scored, SignalCandidate, SignalEvent, SignalModel,
    SignalSource, SinkHealth,
};
pub use types::{Event, EventId, EventKind, ItemId, KindWeights, RawEvent, RawKind, Seq, UserId};
