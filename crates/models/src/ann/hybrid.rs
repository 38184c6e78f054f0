//! [`HybridRetriever`]: exact below a catalog size, approximate above.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reflex_core::{IndexBacklog, ItemIdx, RecallChecks, Retriever, Scored};
use tracing::warn;

use super::{AnnConfig, AnnError, AnnRetriever};
use crate::factors::ItemFactors;
use crate::mf::OnlineMf;
use crate::retriever::ExactRetriever;

/// Scans exactly while the model knows fewer than [`AnnConfig::threshold_items`] items
/// (where a scan costs less than a graph walk and is exact) and searches the HNSW index
/// from then on.
///
/// Below the threshold the index only follows new items (one insert each); changed
/// vectors are not re-indexed, since nothing searches the index yet. Re-indexing every
/// item an event touched cost about 40% of both cores under flat-out ingest at 10k items,
/// for an index no request used. When the catalog crosses the threshold, a background
/// thread rebuilds the index from the current vectors and searches switch to it once
/// the rebuild is in; changes made meanwhile are re-indexed after it.
pub struct HybridRetriever {
    factors: Arc<ItemFactors>,
    exact: ExactRetriever,
    ann: Arc<AnnRetriever>,
    threshold: usize,
    /// The index is complete and current: searches use it from the threshold on.
    ready: Arc<AtomicBool>,
    /// The crossing rebuild is running.
    crossing: Arc<AtomicBool>,
}

impl HybridRetriever {
    /// A hybrid over `factors`; builds the index of the items known now (see
    /// [`AnnRetriever::new`]), which is ready at once when they reach the threshold.
    pub fn new(factors: Arc<ItemFactors>, config: AnnConfig) -> Result<Self, AnnError> {
        let threshold = config.threshold_items;
        let ready = factors.len() >= threshold;
        let exact = match config.scan_refresh_ms {
            0 => ExactRetriever::new(factors.clone()),
            ms => ExactRetriever::with_scan_copy(factors.clone(), Duration::from_millis(ms)),
        };
        Ok(Self {
            exact,
            ann: Arc::new(AnnRetriever::new(factors.clone(), config)?),
            factors,
            threshold,
            ready: Arc::new(AtomicBool::new(ready)),
            crossing: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A hybrid over `model`'s item factors.
    pub fn for_model(model: &OnlineMf, config: AnnConfig) -> Result<Self, AnnError> {
        Self::new(model.item_factors().clone(), config)
    }

    /// The approximate side, for rebuilds and stats.
    pub fn ann(&self) -> &AnnRetriever {
        &self.ann
    }

    /// Whether searches go to the index now: the catalog is at the threshold and the
    /// index was rebuilt since it crossed.
    pub fn uses_ann(&self) -> bool {
        self.factors.len() >= self.threshold && self.ready.load(Ordering::Acquire)
    }

    /// Starts the crossing rebuild the first time the catalog is at the threshold with
    /// the index not ready. Cheap when there is nothing to do (two loads).
    fn check_crossing(&self) {
        if self.ready.load(Ordering::Acquire)
            || self.factors.len() < self.threshold
            || self.crossing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let (ann, ready, crossing) = (self.ann.clone(), self.ready.clone(), self.crossing.clone());
        let spawned = std::thread::Builder::new()
            .name("reflex-ann-cross".into())
            .spawn(move || {
                match ann.rebuild() {
                    Ok(()) => ready.store(true, Ordering::Release),
                    Err(e) => warn!(error = %e, "building the index at the threshold failed; scanning exactly meanwhile"),
                }
                crossing.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the index build; retrying on the next call");
            self.crossing.store(false, Ordering::Release);
        }
    }
}

impl Retriever for HybridRetriever {
    fn search(&self, query: &[f32], k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        self.check_crossing();
        if self.uses_ann() {
            self.ann.search(query, k, filter)
        } else {
            self.exact.search(query, k, filter)
        }
    }

    /// Re-indexes `item` once the index is in use or being built; before, dropped (new
    /// items are still indexed, and the crossing rebuild reads every current vector).
    fn upsert(&self, item: ItemIdx, vector: &[f32]) {
        self.check_crossing();
        if self.ready.load(Ordering::Acquire) || self.crossing.load(Ordering::Acquire) {
            self.ann.upsert(item, vector);
        }
    }

    /// The index's checks (none are made while the exact scan answers).
    fn recall_checks(&self) -> Option<RecallChecks> {
        self.ann.recall_checks()
    }

    /// The index's backlog once it is in use or being built at the crossing (searches
    /// wait for it then); below the threshold the exact scan reads every vector as it
    /// is and nothing waits.
    fn backlog(&self) -> Option<IndexBacklog> {
        if self.ready.load(Ordering::Acquire) || self.crossing.load(Ordering::Acquire) {
            self.ann.backlog()
        } else {
            Some(IndexBacklog::default())
        }
    }

    fn len(&self) -> usize {
        if self.uses_ann() {
            self.ann.len()
        } else {
            self.exact.len()
        }
    }

    /// Rebuilds the index once it is in use; below the threshold there is nothing to do
    /// (the crossing rebuilds it).
    fn rebuild(&self) -> reflex_core::Result<()> {
        if !self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        Retriever::rebuild(self.ann.as_ref())
    }
}
