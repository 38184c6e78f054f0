//! The content model: item embeddings supplied with catalog items (computed upstream by
//! a text or image encoder) and a user embedding that is the decayed, weighted mean of
//! the embeddings of what the user touched.
//!
//! It learns nothing from events, so it serves items nobody has interacted with yet (the
//! new-item cold start MF cannot serve) and it is the same on every replica as soon as
//! the catalog is. Embeddings are stored unit length, so every score is a cosine.
//! Retrieval goes through the same [`HybridRetriever`] as MF: an exact scan for small
//! catalogs, the usearch HNSW index above [`AnnConfig::threshold_items`], with changed
//! embeddings indexed in the background.

use std::sync::Arc;

use reflex_core::{ContentModel, HistoryEntry, ItemIdx, Retriever, Scored};
use serde::{Deserialize, Serialize};

use crate::ann::{AnnConfig, AnnError, HybridRetriever};
use crate::factors::ItemFactors;
use crate::linalg::dot;

/// Settings of the content model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContentConfig {
    /// Length of the catalog's embeddings; 0 turns the content model off (embeddings are
    /// then stored with items but not used).
    pub dim: usize,
    /// Share of the content score in a blended recommendation, 0 to 1: 0 ranks by MF
    /// (content still serves items MF cannot score), 1 ranks by content.
    pub blend_weight: f32,
    /// Half-life of a touched item's weight in the user embedding, counted back from the
    /// user's newest interaction, in ms; 0 weighs all alike.
    pub half_life_ms: i64,
    /// Most recent interactions the user embedding is built from.
    pub history: usize,
}

impl Default for ContentConfig {
    fn default() -> Self {
        Self {
            dim: 0,
            blend_weight: 0.3,
            half_life_ms: 30 * 60 * 1000,
            history: 50,
        }
    }
}

impl ContentConfig {
    /// Whether the content model is on.
    pub fn enabled(&self) -> bool {
        self.dim > 0
    }

    /// Checks every field's range, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.dim > reflex_core::catalog::MAX_EMBEDDING_DIM {
            return Err(format!(
                "dim must be at most {}, got {}",
                reflex_core::catalog::MAX_EMBEDDING_DIM,
                self.dim
            ));
        }
        if !(0.0..=1.0).contains(&self.blend_weight) {
            return Err(format!(
                "blend_weight must be 0 to 1, got {}",
                self.blend_weight
            ));
        }
        if self.half_life_ms < 0 {
            return Err(format!(
                "half_life_ms must be >= 0, got {}",
                self.half_life_ms
            ));
        }
        if self.history == 0 {
            return Err("history must be > 0".into());
        }
        Ok(())
    }
}

/// The [`ContentModel`] over catalog embeddings.
pub struct ContentEmbeddings {
    config: ContentConfig,
    vectors: Arc<ItemFactors>,
    retriever: HybridRetriever,
}

impl ContentEmbeddings {
    /// An empty model of `config.dim`-long embeddings (at least 1), indexed with
    /// `retrieval`'s settings.
    pub fn new(config: ContentConfig, retrieval: AnnConfig) -> Result<Self, AnnError> {
        // Initial values 0: a slot only becomes searchable once an embedding is set.
        let vectors = Arc::new(ItemFactors::new(config.dim.max(1), 0.0, 0));
        let retriever = HybridRetriever::new(vectors.clone(), retrieval)?;
        Ok(Self {
            config,
            vectors,
            retriever,
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &ContentConfig {
        &self.config
    }

    /// The index, for stats and tests.
    pub fn retriever(&self) -> &HybridRetriever {
        &self.retriever
    }
}

/// `v` scaled to unit length; `None` when it is (about) zero or not finite.
fn unit(mut v: Vec<f32>) -> Option<Vec<f32>> {
    let norm = dot(&v, &v).sqrt();
    if !norm.is_finite() || norm < 1e-12 {
        return None;
    }
    v.iter_mut().for_each(|x| *x /= norm);
    Some(v)
}

impl ContentModel for ContentEmbeddings {
    fn dim(&self) -> usize {
        self.vectors.factors()
    }

    fn set_item(&self, item: ItemIdx, embedding: &[f32]) {
        if embedding.len() != self.dim() {
            return;
        }
        // A zero embedding is stored as zeros: it scores 0 and adds nothing to users.
        let normalised = unit(embedding.to_vec()).unwrap_or_else(|| vec![0.0; self.dim()]);
        if self.vectors.get(item).as_deref() == Some(normalised.as_slice()) {
            return;
        }
        if self.vectors.set(item, &normalised) {
            self.retriever.upsert(item, &[]);
        }
    }

    fn user_vector(&self, history: &[HistoryEntry]) -> Option<Vec<f32>> {
        let history = &history[..history.len().min(self.config.history)];
        let newest = history.iter().map(|h| h.timestamp_ms).max()?;
        let half_life = self.config.half_life_ms as f64;
        let mut sum = vec![0.0f32; self.dim()];
        let mut item = vec![0.0f32; self.dim()];
        let mut any = false;
        for h in history {
            if !self.vectors.read_into(h.item, &mut item) {
                continue;
            }
            let decay = if half_life > 0.0 {
                0.5f64.powf((newest - h.timestamp_ms).max(0) as f64 / half_life)
            } else {
                1.0
            };
            let w = h.weight * decay as f32;
            if w == 0.0 || !w.is_finite() {
                continue;
            }
            any = true;
            sum.iter_mut().zip(&item).for_each(|(s, x)| *s += w * x);
        }
        if !any {
            return None;
        }
        unit(sum)
    }

    fn item_vector(&self, item: ItemIdx) -> Option<Vec<f32>> {
        // Stored unit length already; zeros (no usable embedding) come back `None`.
        self.vectors.get(item).and_then(unit)
    }

    fn score(&self, item: ItemIdx, query: &[f32]) -> Option<f32> {
        if query.len() != self.dim() {
            return None;
        }
        self.vectors.score(item, query)
    }

    fn search(&self, query: &[f32], k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        self.retriever.search(query, k, filter)
    }

    fn len(&self) -> usize {
        self.vectors.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(dim: usize, half_life_ms: i64) -> ContentEmbeddings {
        ContentEmbeddings::new(
            ContentConfig {
                dim,
                half_life_ms,
                ..ContentConfig::default()
            },
            AnnConfig::default(),
        )
        .unwrap()
    }

    fn touched(item: ItemIdx, weight: f32, timestamp_ms: i64) -> HistoryEntry {
        HistoryEntry {
            item,
            weight,
            timestamp_ms,
        }
    }

    #[test]
    fn embeddings_are_stored_unit_length_and_scored_by_cosine() {
        let m = model(2, 0);
        m.set_item(0, &[3.0, 4.0]);
        m.set_item(1, &[0.0, -2.0]);
        m.set_item(2, &[1.0]); // wrong dimension: ignored
        assert_eq!(m.len(), 2);
        assert_eq!(m.item_vector(0), Some(vec![0.6, 0.8]));
        assert_eq!(m.item_vector(2), None);
        assert!((m.score(1, &[0.6, 0.8]).unwrap() + 0.8).abs() < 1e-6);
        assert_eq!(m.score(1, &[1.0]), None);
        let found = m.search(&[0.0, 1.0], 5, &|_| true);
        assert_eq!(found.iter().map(|s| s.item).collect::<Vec<_>>(), vec![0, 1]);
        // A zero embedding clears the item: no vector, no pull on users.
        m.set_item(0, &[0.0, 0.0]);
        assert_eq!(m.item_vector(0), None);
        assert_eq!(m.user_vector(&[touched(0, 1.0, 5)]), None);
    }

    #[test]
    fn the_user_embedding_is_the_decayed_weighted_mean_of_touched_items() {
        let minute = 60_000;
        let m = model(2, minute);
        m.set_item(0, &[1.0, 0.0]);
        m.set_item(1, &[0.0, 1.0]);
        // Same weight and time: halfway between.
        let both = m
            .user_vector(&[touched(0, 1.0, 0), touched(1, 1.0, 0)])
            .unwrap();
        assert!((both[0] - both[1]).abs() < 1e-6 && (both[0] - 0.5f32.sqrt()).abs() < 1e-6);
        // Item 1 touched one half-life before item 0: half its pull.
        let decayed = m
            .user_vector(&[touched(0, 1.0, minute), touched(1, 1.0, 0)])
            .unwrap();
        assert!((decayed[1] / decayed[0] - 0.5).abs() < 1e-4, "{decayed:?}");
        // A purchase-like weight outweighs a view.
        let weighted = m
            .user_vector(&[touched(0, 1.0, 0), touched(1, 4.0, 0)])
            .unwrap();
        assert!(
            (weighted[1] / weighted[0] - 4.0).abs() < 1e-4,
            "{weighted:?}"
        );
        // Nothing known: no embedding.
        assert_eq!(m.user_vector(&[touched(7, 1.0, 0)]), None);
        assert_eq!(m.user_vector(&[]), None);
        let unit_len = dot(&weighted, &weighted).sqrt();
        assert!((unit_len - 1.0).abs() < 1e-5);
    }

    #[test]
    fn only_the_configured_history_counts_and_unchanged_embeddings_are_not_reindexed() {
        let m = ContentEmbeddings::new(
            ContentConfig {
                dim: 2,
                history: 1,
                half_life_ms: 0,
                ..ContentConfig::default()
            },
            AnnConfig::default(),
        )
        .unwrap();
        m.set_item(0, &[1.0, 0.0]);
        m.set_item(1, &[0.0, 1.0]);
        let newest_only = m
            .user_vector(&[touched(1, 1.0, 9), touched(0, 1.0, 1)])
            .unwrap();
        assert_eq!(newest_only, vec![0.0, 1.0]);
        let ann = m.retriever().ann();
        ann.flush().unwrap();
        m.set_item(1, &[0.0, 5.0]); // same direction: same stored vector
        assert_eq!(ann.stats().dirty, 0);
        m.set_item(1, &[1.0, 5.0]);
        assert_eq!(m.item_vector(1).map(|v| v[0] > 0.0), Some(true));
    }

    #[test]
    fn config_ranges_are_checked() {
        assert!(ContentConfig::default().validate().is_ok());
        assert!(!ContentConfig::default().enabled());
        for bad in [
            ContentConfig {
                blend_weight: 1.5,
                ..ContentConfig::default()
            },
            ContentConfig {
                half_life_ms: -1,
                ..ContentConfig::default()
            },
            ContentConfig {
                history: 0,
                ..ContentConfig::default()
            },
            ContentConfig {
                dim: 5000,
                ..ContentConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
