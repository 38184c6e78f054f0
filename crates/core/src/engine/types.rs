//! What the engine answers: per-event outcomes, recommendations, and the request
//! filters and spaces that narrow them.

use crate::types::ItemId;

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
    /// Overrides [`EngineConfig::exclude_purchased`](super::EngineConfig::exclude_purchased).
    pub exclude_purchased: Option<bool>,
    /// Overrides [`EngineConfig::exclude_seen`](super::EngineConfig::exclude_seen).
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
    /// The user's own earlier item, likely wanted again now.
    Repeat,
    /// What tends to follow the user's latest items (or a given item).
    Sequence,
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
    /// What people go on to after the item ("bought together"), from the signals.
    Sequence,
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
