//! The backend traits the engine composes. All are object safe and used as `Arc<dyn _>`.
//!
//! Storage traits are async (a backend may be across a network); model traits are sync
//! because they are CPU work on in-memory state.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::catalog::{Item, ItemIdx};
use crate::error::Result;
use crate::model_store::ModelState;
use crate::profile::Profile;
// `Seq` lives in `types`, so `model_store` needs no import from here; re-exported for
// the paths that name it through this module.
pub use crate::types::Seq;
use crate::types::{Event, EventKind, ItemId, TimestampMs, UserId};

/// A boxed future, for work a backend hands back to be finished off the hot path.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One record of the event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LogRecord {
    /// An event that passed validation and was not a duplicate.
    Event {
        /// The event.
        event: Event,
        /// Judged bot or noise: kept for audit, applied to nothing.
        filtered: bool,
        /// Wall-clock time it was ingested, which profile TTLs count from on replay.
        ingested_ms: TimestampMs,
    },
    /// The user's profile was erased; earlier events of theirs no longer apply.
    Erase {
        /// Whose profile.
        user_id: UserId,
        /// Wall-clock time of the erase.
        erased_ms: TimestampMs,
    },
}

/// What the sink did with one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Durably recorded at this position.
    At(Seq),
    /// An event with this event id is already in the log within the dedupe window.
    Duplicate,
}

/// The durable event log, with the dedupe window.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Records `records` durably, in order, under the configured durability. Event records
    /// whose event id was recorded within the dedupe window (or earlier in the same call)
    /// come back [`Appended::Duplicate`] and are not recorded again. All or nothing: on
    /// error none of the records is recorded. The records are borrowed: the caller keeps
    /// them to apply once they are recorded.
    async fn append(&self, records: &[LogRecord]) -> Result<Vec<Appended>>;

    /// Records `records` as [`append`](Self::append) does and, in the same atomic step,
    /// applies each newly recorded event that is not filtered to its profile, as
    /// [`ProfileStore::apply`] would with `weights[i]` (the weight of `records[i]`) at the
    /// record's ingest time. `None` when the sink cannot (the default): the caller then
    /// appends and applies. Only a sink that is also the profile store may do it (the
    /// Redis store on a standalone Redis, where one script reaches both): one call per
    /// batch instead of two, and nothing pending between them.
    async fn append_applying(
        &self,
        records: &[LogRecord],
        weights: &[f32],
    ) -> Option<Result<Vec<Appended>>> {
        let _ = (records, weights);
        None
    }

    /// Up to `limit` records after position `after`, in order.
    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<(Seq, LogRecord)>>;

    /// Position of the last recorded record (0 when empty).
    async fn last_seq(&self) -> Result<Seq>;

    /// Housekeeping, called periodically: expiring dedupe keys and the like.
    async fn maintain(&self) -> Result<()> {
        Ok(())
    }

    /// Retention: drops the records at positions up to `through`, which the caller
    /// guarantees no recovery needs any more (a profile checkpoint and the newest model
    /// version cover them). Returns how many were dropped. The dedupe window is not
    /// affected: an id seen within it stays a duplicate. Backends whose log other
    /// replicas follow keep everything (the default).
    async fn trim(&self, through: Seq) -> Result<u64> {
        let _ = through;
        Ok(0)
    }

    /// Whether the sink can record events now, and its local disk if it has one; read
    /// by readiness and the disk metrics, about once a second.
    async fn health(&self) -> SinkHealth {
        SinkHealth::default()
    }
}

/// What an [`EventSink`] reports of its readiness to record events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkHealth {
    /// Why appends are refused now (a full disk, a store that stopped writing); `None`
    /// when they are taken.
    pub unwritable: Option<String>,
    /// The local disk the sink writes to, for a backend that has one.
    pub disk: Option<DiskSpace>,
}

/// Free space of the filesystem a backend writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes available to the process.
    pub free_bytes: u64,
    /// Size of the filesystem.
    pub total_bytes: u64,
    /// Free space below which ingest is refused.
    pub floor_bytes: u64,
}

/// One event to apply to a profile.
#[derive(Clone, Copy, Debug)]
pub struct ProfileUpdate<'a> {
    /// Its position in the log.
    pub seq: Seq,
    /// The event.
    pub event: &'a Event,
    /// Its learning weight.
    pub weight: f32,
    /// When it was ingested (wall clock).
    pub now_ms: TimestampMs,
}

/// Where user profiles live.
#[async_trait]
pub trait ProfileStore: Send + Sync + 'static {
    /// The user's profile, `None` when unknown or expired.
    async fn get(&self, user: &UserId) -> Result<Option<Profile>>;

    /// Applies events in order, atomically per user, with [`Profile::apply`].
    async fn apply(&self, updates: &[ProfileUpdate<'_>]) -> Result<()>;

    /// Forgets the user; `false` when there was nothing to forget.
    async fn erase(&self, user: &UserId) -> Result<bool>;

    /// Log position up to which the stored profiles are durable, so start-up replays the
    /// log after it; `None` when every apply is durable by itself and nothing needs replay.
    async fn durable_seq(&self) -> Result<Option<Seq>> {
        Ok(None)
    }

    /// Called while no apply is in flight and every record up to `seq` is applied: captures
    /// what a checkpoint must write and returns the work that writes it, which runs after
    /// ingest resumes. `None` when the store has nothing to checkpoint.
    fn capture_checkpoint(&self, _seq: Seq) -> Option<BoxFuture<'static, Result<()>>> {
        None
    }

    /// Whether the scheduled checkpoint should be written now that the log reaches `seq`
    /// (an explicit [`Engine::checkpoint`](crate::Engine::checkpoint) always writes). A
    /// store whose checkpoint rewrites whole profiles can wait until the log since the
    /// last one outweighs what the next would write. Cheap: called on every maintenance
    /// tick.
    fn checkpoint_due(&self, _seq: Seq) -> bool {
        true
    }

    /// Number of profiles held, including expired ones not yet evicted (for metrics and
    /// tests).
    async fn count(&self) -> Result<usize>;

    /// Log positions of events recorded more than `older_than_ms` ago whose profile update
    /// was never confirmed (the writer failed or died between logging and applying), for
    /// [`Engine::maintain`](crate::Engine::maintain) to apply again. Stores whose applies
    /// are covered by replay from [`durable_seq`](Self::durable_seq) keep none.
    async fn unapplied(&self, _older_than_ms: i64, _limit: usize) -> Result<Vec<Seq>> {
        Ok(Vec::new())
    }
}

/// Where catalog items live.
#[async_trait]
pub trait CatalogStore: Send + Sync + 'static {
    /// Inserts or replaces items, all or nothing.
    async fn upsert(&self, items: &[Item]) -> Result<()>;
    /// One item.
    async fn get(&self, item: &ItemId) -> Result<Option<Item>>;
    /// Removes an item; `false` when it was not there.
    async fn delete(&self, item: &ItemId) -> Result<bool>;
    /// Every item, for start-up.
    async fn load_all(&self) -> Result<Vec<Item>>;

    /// A number that changes whenever any writer changes the catalog, so replicas sharing
    /// the store notice each other's changes; stores only one process uses keep 0.
    async fn version(&self) -> Result<u64> {
        Ok(0)
    }
}

/// One accepted event, as a model learns from it.
#[derive(Clone, Copy, Debug)]
pub struct Observation<'a> {
    /// Who.
    pub user: &'a UserId,
    /// What.
    pub item: ItemIdx,
    /// Learning weight from the kind (negative for negative feedback).
    pub weight: f32,
    /// Event time.
    pub timestamp_ms: TimestampMs,
}

/// One past interaction, as fold-in reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HistoryEntry {
    /// The item.
    pub item: ItemIdx,
    /// Its learning weight.
    pub weight: f32,
    /// Event time.
    pub timestamp_ms: TimestampMs,
}

/// An item with a score, higher is better.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    /// The item.
    pub item: ItemIdx,
    /// Its score.
    pub score: f32,
}

/// How an approximate retriever's answers compare with the exact ones, on the sample of
/// searches it checked against a full scan (same query, `k` and filter). Counts since
/// start; recall over a span is `Δfound / Δwanted`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecallChecks {
    /// Searches checked.
    pub checks: u64,
    /// Items the exact answers held, summed over the checks.
    pub wanted: u64,
    /// Of those, items the retriever's own answers also held.
    pub found: u64,
}

/// What an approximate retriever's index has not caught up with yet. Counts now, not
/// since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexBacklog {
    /// Items the model knows that the index does not hold yet (until then only the
    /// exact fallback finds them).
    pub new: u64,
    /// Indexed items whose vectors changed and wait to be re-indexed.
    pub changed: u64,
}

/// A recommendation model that learns online from every accepted event.
pub trait OnlineModel: Send + Sync + 'static {
    /// Version label reported with each answer.
    fn version(&self) -> String;

    /// Learns from one accepted event.
    fn observe(&self, obs: &Observation<'_>);

    /// Drops everything the model keeps per user (profile erase).
    fn forget_user(&self, user: &UserId);

    /// The user's vector folded in from their history (most recent first); `None` when the
    /// history tells the model nothing (no known items).
    fn user_vector(&self, history: &[HistoryEntry]) -> Option<Vec<f32>>;

    /// The item's vector; `None` when the model has not learnt it.
    fn item_vector(&self, item: ItemIdx) -> Option<Vec<f32>>;

    /// Inner product of `query` with the item's vector; `None` when the model has not
    /// learnt the item. Models override it to score without copying the vector.
    fn score(&self, item: ItemIdx, query: &[f32]) -> Option<f32> {
        let v = self.item_vector(item)?;
        Some(v.iter().zip(query).map(|(a, b)| a * b).sum())
    }

    /// The `k` most popular items right now passing `filter`, best first.
    fn popular(&self, k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored>;

    /// The learnt state, for a snapshot; `None` when the model cannot export it.
    fn export(&self) -> Option<ModelState> {
        None
    }

    /// Replaces the learnt state of every item in `state` (items it does not name keep
    /// theirs), and of users as `users` says. Fails when the state does not fit (e.g.
    /// other dimensions).
    fn import(&self, _state: &ModelState, _users: ImportUsers) -> Result<()> {
        Err(crate::Error::Internal(format!(
            "model {} cannot load snapshots",
            self.version()
        )))
    }
}

/// What a model's `import` does with the per-user state it holds (user vectors, recent
/// and purchased items): the snapshot's, or the live one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportUsers {
    /// The snapshot's users replace the live ones: at start-up, and for a refit that
    /// replays the log written since the snapshot.
    Restore,
    /// The live users stay as they are; only what was learnt about items comes from the
    /// snapshot. A rollback undoes a model, not what users did since: a purchase since
    /// the snapshot stays a repeat candidate, and a user erased since stays erased.
    KeepLive,
}

/// One accepted event, as the behaviour signals learn from it.
#[derive(Clone, Copy, Debug)]
pub struct SignalEvent<'a> {
    /// Who.
    pub user: &'a UserId,
    /// What.
    pub item: ItemIdx,
    /// What the user did.
    pub kind: &'a EventKind,
    /// Event time.
    pub timestamp_ms: TimestampMs,
    /// Whether the shared statistics learn from it: `false` for a user held out of
    /// learning, whose own history is still kept (it is their data, as the profile is).
    pub learn: bool,
}

/// Which signal proposed a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalSource {
    /// The user's own earlier item, likely wanted again.
    Repeat,
    /// What tends to follow the user's latest items.
    Sequence,
}

/// A candidate item a [`SignalModel`] proposes for a user.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SignalCandidate {
    /// The item.
    pub item: ItemIdx,
    /// The estimated probability that the user's next interaction is with it.
    pub probability: f32,
    /// Which signal proposed it.
    pub source: SignalSource,
}

/// Item-to-item weights fitted in batch: per source item, its targets with positive
/// weights, heaviest first; items numbered (`ItemIdx`) or named (`ItemId`).
pub type ItemItemWeights<I = ItemIdx> = Vec<(I, Vec<(I, f32)>)>;

/// Behaviour signals learnt online from every accepted event: what each user comes back
/// to ("buy it again", learnt per item from everyone's repurchases) and what follows what
/// (next-item co-occurrence). Their scores are probabilities estimated from counts, so
/// repeat and next-item candidates rank together on one scale. Time is event time: the
/// model's clock is the latest event time it has seen.
pub trait SignalModel: Send + Sync + 'static {
    /// Learns from one accepted event.
    fn observe(&self, event: &SignalEvent<'_>);

    /// Drops everything kept about the user (profile erase).
    fn forget_user(&self, user: &UserId);

    /// Housekeeping, called periodically: forgetting users inactive for longer than the
    /// model keeps them, so memory follows the active users.
    fn maintain(&self) {}

    /// The user's best `k` candidates passing `filter`, most probable first. `recent`
    /// is the user's latest items, most recent first, from their profile (which every
    /// replica reads fresh, while the signals of a replica following a shared log may
    /// lag): what follows them is proposed.
    fn candidates(
        &self,
        user: &UserId,
        recent: &[ItemIdx],
        k: usize,
        filter: &dyn Fn(ItemIdx) -> bool,
    ) -> Vec<SignalCandidate>;

    /// Whether people buy `item` again, so a purchase of it is no reason to leave it out
    /// ([`PurchasedPolicy::Auto`](crate::engine::PurchasedPolicy::Auto)).
    fn rebought(&self, item: ItemIdx) -> bool;

    /// Items that most often follow `item`, best first ("bought together"), with the
    /// share of `item`'s followers each one is.
    fn related(&self, item: ItemIdx, k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored>;

    /// Sets the category `item`'s repurchase rate is shrunk toward (the first of its
    /// catalog categories; `None` for none), so an item few people have bought yet takes
    /// its category's rate instead of everyone's. A model that keeps no such rates
    /// ignores it.
    fn set_item_category(&self, item: ItemIdx, category: Option<&str>) {
        let _ = (item, category);
    }

    /// Replaces the item-to-item weights fitted in batch (the background refit's):
    /// per source item, its targets with positive weights, heaviest first. A model that
    /// uses none ignores them.
    fn install_item_item(&self, rows: ItemItemWeights) {
        let _ = rows;
    }

    /// Everything learnt, encoded, items named through `id_of`.
    fn export(&self, id_of: &dyn Fn(ItemIdx) -> Option<ItemId>) -> Result<Vec<u8>>;

    /// Replaces everything learnt about items with what [`export`](Self::export) wrote,
    /// items numbered through `intern`, and the users' state as `users` says.
    fn import(
        &self,
        bytes: &[u8],
        intern: &dyn Fn(&ItemId) -> ItemIdx,
        users: ImportUsers,
    ) -> Result<()>;
}

/// The content model: items described by embeddings supplied with catalog items (computed
/// upstream, e.g. by a text or image encoder), and users by a decayed, weighted mean of
/// the embeddings of what they touched. It needs no interactions with an item, so it
/// serves items nobody has touched yet (cold start) and blends with the MF model.
pub trait ContentModel: Send + Sync + 'static {
    /// Length every embedding must have; the engine refuses catalog items with another.
    fn dim(&self) -> usize;

    /// Sets the item's embedding (`dim` finite values) and indexes it off the request
    /// path. Unchanged embeddings cost a comparison and no re-indexing.
    fn set_item(&self, item: ItemIdx, embedding: &[f32]);

    /// The user's embedding from their history (most recent first), unit length; `None`
    /// when no item in it has an embedding.
    fn user_vector(&self, history: &[HistoryEntry]) -> Option<Vec<f32>>;

    /// The item's embedding, unit length; `None` when it has none.
    fn item_vector(&self, item: ItemIdx) -> Option<Vec<f32>>;

    /// Cosine of `query` (unit length) with the item's embedding; `None` when it has none.
    fn score(&self, item: ItemIdx, query: &[f32]) -> Option<f32>;

    /// The `k` items whose embeddings are closest to `query` that pass `filter`, best
    /// first; fewer only when fewer pass.
    fn search(&self, query: &[f32], k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored>;

    /// Number of items with an embedding.
    fn len(&self) -> usize;

    /// Whether no item has an embedding.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Nearest-neighbour search over item vectors by inner product.
pub trait Retriever: Send + Sync + 'static {
    /// The `k` items with the highest inner product with `query` that pass `filter`, best
    /// first; fewer only when fewer items pass.
    fn search(&self, query: &[f32], k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored>;

    /// Tells the retriever an item's vector changed. `vector` is the new vector, or empty
    /// when the retriever reads vectors from the model's shared store itself (as every
    /// retriever of `reflex-models` does; the engine passes it empty). Must be cheap and
    /// must not block: indexes apply changes in the background.
    fn upsert(&self, _item: ItemIdx, _vector: &[f32]) {}

    /// Number of items searchable.
    fn len(&self) -> usize;

    /// Whether nothing is searchable.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The recall checks of an approximate retriever (see [`RecallChecks`]); `None` for
    /// one that is exact or does not check.
    fn recall_checks(&self) -> Option<RecallChecks> {
        None
    }

    /// What an index kept current in the background has not caught up with (see
    /// [`IndexBacklog`]); `None` for a retriever without one.
    fn backlog(&self) -> Option<IndexBacklog> {
        None
    }

    /// Re-indexes every item from its current vector off to the side and swaps the new
    /// index in, while searches go on against the old one: after a new model version is
    /// installed, and periodically so an index updated in place stays compact. Blocks
    /// the caller for the build (call it on a blocking thread). Retrievers without an
    /// index do nothing.
    fn rebuild(&self) -> Result<()> {
        Ok(())
    }
}
