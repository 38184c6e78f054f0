//! The engine's own settings.

use serde::{Deserialize, Serialize};

use crate::filter::BotFilterConfig;
use crate::types::{EventLimits, KindWeights};

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
