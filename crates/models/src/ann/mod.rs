//! Approximate nearest-neighbour retrieval by inner product over the model's item factors,
//! with a usearch HNSW index kept current in the background.
//!
//! - [`AnnRetriever`]: the index, an upsert path that only marks items dirty, a background
//!   thread that re-indexes dirty and newly learnt items in batches, a rebuild built off
//!   to the side and swapped in atomically, and a search that always returns `k` items
//!   when `k` pass the filter (usearch's predicate-filtered search, then wider searches,
//!   then an exact scan) with scores recomputed from the current vectors.
//! - [`HybridRetriever`]: the exact scan below [`AnnConfig::threshold_items`] items, the
//!   index above.
//!
//! Why usearch: a single-header C++ HNSW with a maintained Rust binding, thread-safe
//! concurrent add and search, removal and predicate-filtered search in the index itself
//! (filters are applied while walking the graph, not after), and optional f16/i8
//! storage. Settings always chosen here: metric inner product (`MetricKind::IP`, whose
//! distance is `1 - dot`), unique keys (`multi = false`), keys = `ItemIdx`, and the
//! scalar kind from [`Quantization`] (usearch's own default is BF16).
//!
//! Layout:
//! - `index`: the usearch wrapper (creation, upsert, filtered search, copy-to-grow)
//! - `retriever`: [`AnnRetriever`] and its background drainer
//! - `hybrid`: [`HybridRetriever`]

mod hybrid;
mod index;
mod retriever;

use serde::{Deserialize, Serialize};

pub use hybrid::HybridRetriever;
pub use index::IndexShape;
pub use retriever::{AnnRetriever, AnnStats};

/// How vectors are stored in the index. Scores returned are always recomputed from the
/// model's `f32` vectors; quantisation only affects which candidates the graph finds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// 4 bytes a value: the graph sees the exact vectors.
    F32,
    /// IEEE half precision, 2 bytes a value: about 3 significant digits, range ±65504.
    /// The default: at 100k items of 64 factors it holds the index in 49 MiB instead of
    /// 81 MiB and builds it about a fifth faster, with the same recall@10 (0.988 against
    /// the exact scan on clustered vectors); answers are rescored from the `f32` vectors.
    #[default]
    F16,
    /// 1 byte a value. usearch scales each vector to unit length before rounding, so the
    /// graph ranks by cosine, not inner product: candidates are good only when item norms
    /// are similar.
    I8,
}

/// Settings of [`AnnRetriever`] and [`HybridRetriever`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnConfig {
    /// Storage of vectors in the index.
    pub quantization: Quantization,
    /// HNSW connectivity M: neighbours kept per node (2·M on the base layer). Higher
    /// raises recall and memory.
    pub connectivity: usize,
    /// Beam width while inserting (efConstruction): graph quality against build time.
    pub expansion_add: usize,
    /// Beam width while searching (ef): recall against latency; a search for `k` items
    /// uses at least `k`.
    pub expansion_search: usize,
    /// Most items the background drainer re-indexes before looking at the clock again.
    pub upsert_batch: usize,
    /// Pause of the background drainer between passes over the dirty items, in ms: the
    /// bound on how long an upserted vector waits before the index reflects it.
    pub upsert_interval_ms: u64,
    /// Below this many items [`HybridRetriever`] scans exactly (cheaper than a graph
    /// walk for small catalogs, and exact).
    pub threshold_items: usize,
    /// How often, in ms, the exact scan's 8-bit copy of the item vectors is refreshed
    /// while searches come (see [`crate::ExactRetriever::with_scan_copy`]): how far the
    /// choice of candidates may lag the learner (their scores never do). 0 scans the
    /// full-precision vectors instead.
    pub scan_refresh_ms: u64,
    /// One search in this many is also answered by the exact scan and the two answers
    /// compared ([`reflex_core::RecallChecks`], the `reflex_retrieval_recall_*` metrics),
    /// so recall under live traffic and a lagging index is measured, not assumed. Costs
    /// one full scan per that many searches; 0 never checks.
    pub recall_check_every: u64,
    /// Items with the longest vectors (the most interacted-with, under online MF) that
    /// every search scores exactly beside the graph's candidates, so the answer does
    /// not depend on how far re-indexing lags the items that change most; recomputed
    /// every 500 ms by the drainer. 0 relies on the graph alone.
    pub head_items: usize,
    /// The most of one core the background re-indexing may take (0.01 to 1): each pass
    /// lasts at most `upsert_interval_ms` and then rests in proportion. Adding new items
    /// is not limited (until indexed, only the exact fallback finds them). Under heavier
    /// change the graph lags (answers stay right through the head and exact rescoring)
    /// rather than taking the CPU requests and ingest need; measured at 100k items under
    /// flat-out ingest, unbounded upkeep took a third of the server's CPU.
    pub upkeep_max_share: f32,
    /// Threads inserting during a build or rebuild; 0 means one per available core.
    pub build_threads: usize,
    /// Searches that may run at once. usearch holds one context per concurrent
    /// operation and fails (rather than waits) when all are taken; such a search falls
    /// back to the exact scan.
    pub max_concurrent_searches: usize,
    /// A changed item is re-indexed only when its vector moved at least this much
    /// (`‖new − indexed‖ / ‖indexed‖`) since it was indexed; 0 re-indexes every change.
    /// Scores are always recomputed from the current vector, so a small drift only
    /// shifts which candidates the graph walk visits, while re-indexing every item an
    /// event touched was most of the ingest cost at 100k items.
    pub reindex_min_drift: f32,
    /// The server rebuilds the index off to the side this often, in ms, so a graph
    /// updated in place for hours stays compact; 0 never (it is also rebuilt whenever a
    /// model version is installed).
    pub rebuild_interval_ms: u64,
}

impl Default for AnnConfig {
    fn default() -> Self {
        Self {
            quantization: Quantization::F16,
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 64,
            upsert_batch: 1024,
            upsert_interval_ms: 50,
            threshold_items: 20_000,
            scan_refresh_ms: 50,
            recall_check_every: 1000,
            head_items: 2048,
            upkeep_max_share: 0.25,
            build_threads: 0,
            max_concurrent_searches: 256,
            rebuild_interval_ms: 60 * 60 * 1000,
            reindex_min_drift: 0.05,
        }
    }
}

impl AnnConfig {
    /// Checks every field's range, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=1024).contains(&self.connectivity) {
            return Err(format!(
                "connectivity must be 2 to 1024, got {}",
                self.connectivity
            ));
        }
        if self.expansion_add == 0 || self.expansion_search == 0 {
            return Err("expansion_add and expansion_search must be > 0".into());
        }
        if self.upsert_batch == 0 {
            return Err("upsert_batch must be > 0".into());
        }
        if !(self.upkeep_max_share >= 0.01 && self.upkeep_max_share <= 1.0) {
            return Err(format!(
                "upkeep_max_share must be 0.01 to 1, got {}",
                self.upkeep_max_share
            ));
        }
        if self.upsert_interval_ms == 0 {
            return Err("upsert_interval_ms must be > 0".into());
        }
        if !(self.reindex_min_drift.is_finite() && self.reindex_min_drift >= 0.0) {
            return Err(format!(
                "reindex_min_drift must be finite and >= 0, got {}",
                self.reindex_min_drift
            ));
        }
        if self.max_concurrent_searches == 0 {
            return Err("max_concurrent_searches must be > 0".into());
        }
        Ok(())
    }

    /// Threads used by a build: `build_threads`, or the available cores when 0.
    pub fn effective_build_threads(&self) -> usize {
        if self.build_threads > 0 {
            self.build_threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Per-thread contexts an index reserves: concurrent searches, builders, and the
    /// background drainer.
    fn index_threads(&self) -> usize {
        self.max_concurrent_searches + self.effective_build_threads() + 1
    }
}

/// What can go wrong building or maintaining the index.
#[derive(Debug, thiserror::Error)]
pub enum AnnError {
    /// A setting is out of range.
    #[error("invalid ann config: {0}")]
    Config(String),
    /// usearch refused an operation.
    #[error("usearch {op} failed: {message}")]
    Usearch {
        /// The operation.
        op: &'static str,
        /// usearch's message.
        message: String,
    },
    /// The background drainer thread could not be started.
    #[error("cannot start the ann drainer thread: {0}")]
    Spawn(#[from] std::io::Error),
}

impl AnnError {
    fn usearch(op: &'static str, e: &dyn std::fmt::Display) -> Self {
        Self::Usearch {
            op,
            message: e.to_string(),
        }
    }
}
