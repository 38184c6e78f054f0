//! A bounded top-k selection shared by retrieval and popularity.

use std::cmp::Ordering as Cmp;
use std::collections::BinaryHeap;

use reflex_core::{ItemIdx, Scored};

/// Candidate in a bounded min-heap: the smallest score (then the largest index) on top.
#[derive(Clone, Copy, PartialEq)]
struct Candidate<S> {
    score: S,
    item: ItemIdx,
}

impl<S: PartialOrd> Eq for Candidate<S> {}

impl Ord for Candidate<f64> {
    fn cmp(&self, other: &Self) -> Cmp {
        other
            .score
            .total_cmp(&self.score)
            .then(self.item.cmp(&other.item))
    }
}

impl PartialOrd for Candidate<f64> {
    fn partial_cmp(&self, other: &Self) -> Option<Cmp> {
        Some(self.cmp(other))
    }
}

/// Keeps the `k` best-scoring items offered that pass a filter. The filter runs only for
/// items that would enter the heap, so an expensive filter costs little.
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Candidate<f64>>,
}

impl TopK {
    /// An empty selection of at most `k` items.
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// Considers `item` with `score`.
    pub(crate) fn offer(&mut self, item: ItemIdx, score: f64, filter: &dyn Fn(ItemIdx) -> bool) {
        if self.k == 0 {
            return;
        }
        let cand = Candidate { score, item };
        if self.heap.len() == self.k {
            match self.heap.peek() {
                Some(min) if cand < *min => {}
                _ => return,
            }
        }
        if filter(item) {
            self.heap.push(cand);
            if self.heap.len() > self.k {
                self.heap.pop();
            }
        }
    }

    /// The selection as `Scored` (score narrowed to `f32`), best first.
    pub(crate) fn into_scored(self) -> Vec<Scored> {
        self.into_sorted()
            .map(|(item, score)| Scored {
                item,
                score: score as f32,
            })
            .collect()
    }

    /// The selection, best first (ties: lower index first).
    pub(crate) fn into_sorted(self) -> impl Iterator<Item = (ItemIdx, f64)> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|c| (c.item, c.score))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_k_that_pass() {
        let mut top = TopK::new(3);
        for (item, score) in [(0, 1.0), (1, 5.0), (2, 3.0), (3, 4.0), (4, 9.0), (5, 2.0)] {
            top.offer(item, score, &|i| i != 4);
        }
        let got: Vec<_> = top.into_sorted().collect();
        assert_eq!(got, vec![(1, 5.0), (3, 4.0), (2, 3.0)]);
    }

    #[test]
    fn zero_k_selects_nothing() {
        let mut top = TopK::new(0);
        top.offer(1, 1.0, &|_| true);
        assert_eq!(top.into_sorted().count(), 0);
    }
}
