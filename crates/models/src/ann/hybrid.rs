//! [`HybridRetriever`]: exact below a catalog size, approximate above.

use std::sync::Arc;

use reflex_core::{ItemIdx, Retriever, Scored};

use super::{AnnConfig, AnnError, AnnRetriever};
use crate::factors::ItemFactors;
use crate::mf::OnlineMf;
use crate::retriever::ExactRetriever;

/// Scans exactly while the model knows fewer than [`AnnConfig::threshold_items`] items
/// (where a scan costs less than a graph walk and is exact) and searches the HNSW index
/// from then on. The index is maintained from the start, whatever the size, so it is
/// complete the moment the catalog crosses the threshold; below it that costs one
/// background re-index per changed item and little memory.
pub struct HybridRetriever {
    factors: Arc<ItemFactors>,
    exact: ExactRetriever,
    ann: AnnRetriever,
    threshold: usize,
}

impl HybridRetriever {
    /// A hybrid over `factors`; builds the index of the items known now (see
    /// [`AnnRetriever::new`]).
    pub fn new(factors: Arc<ItemFactors>, config: AnnConfig) -> Result<Self, AnnError> {
        let threshold = config.threshold_items;
        Ok(Self {
            exact: ExactRetriever::new(factors.clone()),
            ann: AnnRetriever::new(factors.clone(), config)?,
            factors,
            threshold,
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

    /// Whether searches go to the index now.
    pub fn uses_ann(&self) -> bool {
        self.factors.len() >= self.threshold
    }
}

impl Retriever for HybridRetriever {
    fn search(&self, query: &[f32], k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        if self.uses_ann() {
            self.ann.search(query, k, filter)
        } else {
            self.exact.search(query, k, filter)
        }
    }

    fn upsert(&self, item: ItemIdx, vector: &[f32]) {
        self.ann.upsert(item, vector);
    }

    fn len(&self) -> usize {
        if self.uses_ann() {
            self.ann.len()
        } else {
            self.exact.len()
        }
    }

    /// Rebuilds the index (kept below the threshold too, so it is ready when crossed).
    fn rebuild(&self) -> reflex_core::Result<()> {
        Retriever::rebuild(&self.ann)
    }
}
