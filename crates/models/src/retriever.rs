//! Exact maximum-inner-product search over the model's item factors.

use std::sync::Arc;

use reflex_core::{ItemIdx, Retriever, Scored};

use crate::factors::ItemFactors;
use crate::mf::OnlineMf;
use crate::topk::TopK;

/// Scans every known item's vector in place (no copy) and keeps the best `k` that pass
/// the filter in a bounded min-heap. The filter runs only for items that would enter the
/// heap, so an expensive filter costs little. Cost: items × factors per search.
pub struct ExactRetriever {
    factors: Arc<ItemFactors>,
}

impl ExactRetriever {
    /// A retriever over `factors`, shared with the model that trains them.
    pub fn new(factors: Arc<ItemFactors>) -> Self {
        Self { factors }
    }

    /// A retriever over `model`'s item factors.
    pub fn for_model(model: &OnlineMf) -> Self {
        Self::new(model.item_factors().clone())
    }
}

impl Retriever for ExactRetriever {
    /// Empty when `query` does not have the model's dimension.
    fn search(&self, query: &[f32], k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        if k == 0 || query.len() != self.factors.factors() {
            return Vec::new();
        }
        let mut top = TopK::new(k);
        self.factors.for_each_known(|item, stored| {
            let score = stored.dot(query);
            if score.is_finite() {
                top.offer(item, f64::from(score), filter);
            }
        });
        top.into_sorted()
            .map(|(item, score)| Scored {
                item,
                score: score as f32,
            })
            .collect()
    }

    fn len(&self) -> usize {
        self.factors.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MfConfig;
    use reflex_core::{Observation, OnlineModel, UserId};

    #[test]
    fn exact_search_honours_the_filter_and_returns_k() {
        let model = OnlineMf::new(MfConfig {
            factors: 8,
            ..MfConfig::default()
        });
        let u = UserId::parse("u", "user_id").unwrap();
        for item in 0..200 {
            model.observe(&Observation {
                user: &u,
                item,
                weight: 1.0,
                timestamp_ms: 0,
            });
        }
        let retriever = ExactRetriever::for_model(&model);
        assert_eq!(retriever.len(), 200);
        let query: Vec<f32> = (0..8).map(|d| d as f32 - 3.5).collect();
        let odd = |i: ItemIdx| i % 2 == 1;
        let found = retriever.search(&query, 10, &odd);
        assert_eq!(found.len(), 10);
        assert!(found.iter().all(|s| odd(s.item)));
        // Same as brute force.
        let mut all: Vec<Scored> = (0..200)
            .filter(|i| odd(*i))
            .map(|item| Scored {
                item,
                score: crate::linalg::dot(&query, &model.item_vector(item).unwrap()),
            })
            .collect();
        all.sort_by(|a, b| b.score.total_cmp(&a.score));
        let want: Vec<ItemIdx> = all[..10].iter().map(|s| s.item).collect();
        let got: Vec<ItemIdx> = found.iter().map(|s| s.item).collect();
        assert_eq!(got, want);
        assert!(found.windows(2).all(|w| w[0].score >= w[1].score));
        // Fewer only when fewer pass; the best-scoring items being filtered out does not
        // shrink the answer.
        let few = retriever.search(&query, 10, &|i| i < 3);
        assert_eq!(few.len(), 3);
        let top_out = |i: ItemIdx| !want.contains(&i);
        assert_eq!(retriever.search(&query, 10, &top_out).len(), 10);
        assert!(retriever.search(&query, 0, &odd).is_empty());
        assert!(retriever.search(&[1.0, 2.0], 10, &odd).is_empty());
    }
}
