//! The leave-last-out evaluation: each user's latest interaction held out, the rest
//! trained on, the whole catalog ranked per user (HR@10, NDCG@10, recall@20, coverage)
//! for ALS and training-set popularity.

use rayon::prelude::*;
use reflex_core::ItemIdx;
use serde::Serialize;

use super::data::{Dataset, Weighting};
use crate::als::{AlsModel, Csr};
use crate::topk::TopK;

/// Cut-off of the hit rate, NDCG and coverage of [`super::baseline_eval`].
pub const TOP_K: usize = 10;
/// Cut-off of the recall of [`super::baseline_eval`].
pub const RECALL_K: usize = 20;

/// A leave-last-out split of a [`Dataset`]: positions in [`Dataset::ratings`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaveLastOut {
    /// The training interactions, in file order.
    pub train: Vec<usize>,
    /// The held-out interactions, one per user with at least two, in time order (ties by
    /// file order).
    pub test: Vec<usize>,
}

/// Holds out each user's latest interaction (of two or more; among equal timestamps the
/// one later in the file). Users with a single interaction stay in training only.
pub fn leave_last_out(data: &Dataset) -> LeaveLastOut {
    let mut last: Vec<Option<usize>> = vec![None; data.users];
    let mut count = vec![0usize; data.users];
    for (i, r) in data.ratings.iter().enumerate() {
        let u = r.user as usize;
        let (Some(slot), Some(n)) = (last.get_mut(u), count.get_mut(u)) else {
            continue;
        };
        *n += 1;
        match *slot {
            Some(j) if data.ratings[j].timestamp_ms > r.timestamp_ms => {}
            _ => *slot = Some(i),
        }
    }
    let mut test: Vec<usize> = last
        .iter()
        .zip(&count)
        .filter_map(|(l, &n)| if n >= 2 { *l } else { None })
        .collect();
    let mut held = vec![false; data.ratings.len()];
    for &i in &test {
        held[i] = true;
    }
    test.sort_by_key(|&i| (data.ratings[i].timestamp_ms, i));
    LeaveLastOut {
        train: (0..data.ratings.len()).filter(|&i| !held[i]).collect(),
        test,
    }
}

/// The users × items matrix of the training interactions, weighted by `weighting`
/// (repeats summed).
pub fn train_matrix(data: &Dataset, split: &LeaveLastOut, weighting: Weighting) -> Csr {
    let triples: Vec<(u32, u32, f32)> = split
        .train
        .iter()
        .filter_map(|&i| data.ratings.get(i))
        .map(|r| (r.user, r.item, weighting.weight(r.rating)))
        .collect();
    Csr::from_triples(data.users, data.items, &triples)
}

/// Figures of one system in the leave-last-out evaluation.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OfflineReport {
    /// The system's name.
    pub system: String,
    /// Users evaluated (one held-out interaction each).
    pub users: u64,
    /// Share of users whose held-out item is in their top [`TOP_K`].
    pub hr_at_10: f64,
    /// Mean `1 / log2(rank + 2)` (0-based rank) of the held-out item within the top
    /// [`TOP_K`], 0 outside.
    pub ndcg_at_10: f64,
    /// Share of users whose held-out item is in their top [`RECALL_K`] (with one held-out
    /// item per user, recall is this hit rate).
    pub recall_at_20: f64,
    /// Distinct items over all top-[`TOP_K`] lists, as a share of the catalog.
    pub coverage_at_10: f64,
    /// Seconds to fit (0 for systems without a fit worth timing).
    pub fit_secs: f64,
}

/// Where each user's held-out item ranked (within the top [`RECALL_K`]) and their top
/// [`TOP_K`], for every held-out interaction of `split`, ranking all `items` by `score`
/// (which fills one score per item for a user) with the user's training items removed.
fn rank_held_out(
    data: &Dataset,
    split: &LeaveLastOut,
    train: &Csr,
    items: usize,
    score: &(dyn Fn(usize, &mut Vec<f32>) + Sync),
) -> Vec<(Option<usize>, Vec<ItemIdx>)> {
    split
        .test
        .par_iter()
        .map_init(Vec::new, |scores, &i| {
            let r = data.ratings[i];
            let u = r.user as usize;
            score(u, scores);
            scores.resize(items, f32::NEG_INFINITY);
            for &seen in train.row(u).0 {
                if let Some(s) = scores.get_mut(seen as usize) {
                    *s = f32::NEG_INFINITY;
                }
            }
            let mut top = TopK::new(RECALL_K);
            for (item, &s) in scores.iter().enumerate() {
                if s > f32::NEG_INFINITY && s.is_finite() {
                    top.offer(item as ItemIdx, f64::from(s), &|_| true);
                }
            }
            let ranked: Vec<ItemIdx> = top.into_sorted().map(|(item, _)| item).collect();
            let rank = ranked.iter().position(|&item| item == r.item);
            (rank, ranked.into_iter().take(TOP_K).collect())
        })
        .collect()
}

fn summarise(system: &str, ranks: &[(Option<usize>, Vec<ItemIdx>)], items: usize) -> OfflineReport {
    let n = ranks.len().max(1) as f64;
    let (mut hits, mut ndcg, mut hits_recall) = (0u64, 0.0f64, 0u64);
    let mut covered = vec![false; items];
    for (rank, top) in ranks {
        if let Some(rank) = *rank {
            hits_recall += 1;
            if rank < TOP_K {
                hits += 1;
                ndcg += 1.0 / ((rank + 2) as f64).log2();
            }
        }
        for &item in top {
            if let Some(c) = covered.get_mut(item as usize) {
                *c = true;
            }
        }
    }
    OfflineReport {
        system: system.to_string(),
        users: ranks.len() as u64,
        hr_at_10: hits as f64 / n,
        ndcg_at_10: ndcg / n,
        recall_at_20: hits_recall as f64 / n,
        coverage_at_10: covered.iter().filter(|c| **c).count() as f64 / items.max(1) as f64,
        fit_secs: 0.0,
    }
}

/// Leave-last-out figures of `model` (scores `user · item`), trained on `train`.
pub fn evaluate_als(
    data: &Dataset,
    split: &LeaveLastOut,
    train: &Csr,
    model: &AlsModel,
) -> OfflineReport {
    let score = |u: usize, out: &mut Vec<f32>| match model.user(u) {
        Some(x) => model.score_all(x, out),
        None => out.clear(),
    };
    summarise(
        "ALS",
        &rank_held_out(data, split, train, data.items, &score),
        data.items,
    )
}

/// Leave-last-out figures of training-set popularity (sum of training weights per item;
/// ties to the lower item number).
pub fn evaluate_popularity(data: &Dataset, split: &LeaveLastOut, train: &Csr) -> OfflineReport {
    let mut counts = vec![0.0f32; data.items];
    for u in 0..train.rows() {
        let (cols, vals) = train.row(u);
        for (&c, &v) in cols.iter().zip(vals) {
            if let Some(x) = counts.get_mut(c as usize) {
                *x += v;
            }
        }
    }
    let score = |_: usize, out: &mut Vec<f32>| {
        out.clear();
        out.extend_from_slice(&counts);
    };
    summarise(
        "popularity",
        &rank_held_out(data, split, train, data.items, &score),
        data.items,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::data::Rating;

    fn rating(user: u32, item: u32, ts: i64) -> Rating {
        Rating {
            user,
            item,
            rating: 4.0,
            timestamp_ms: ts,
        }
    }

    #[test]
    fn holds_out_the_latest_with_ties_by_file_order() {
        let data = Dataset {
            ratings: vec![
                rating(0, 0, 5),
                rating(0, 1, 9),
                rating(1, 0, 3),
                rating(0, 2, 9),
                rating(2, 1, 1),
                rating(1, 2, 1),
            ],
            users: 3,
            items: 3,
            item_ids: vec!["a".into(), "b".into(), "c".into()],
        };
        let split = leave_last_out(&data);
        // User 0: rows 1 and 3 tie at 9, the later row is held out; user 1: row 2;
        // user 2 has one interaction and stays in training. Test in time order.
        assert_eq!(split.test, vec![2, 3]);
        assert_eq!(split.train, vec![0, 1, 4, 5]);
        let m = train_matrix(&data, &split, Weighting::Unit);
        assert_eq!(m.row(0), (&[0u32, 1][..], &[1.0f32, 1.0][..]));
        // Popularity: item 1 (two users) first; user 1 already saw item 2, user 0 did not.
        let pop = evaluate_popularity(&data, &split, &m);
        assert_eq!(pop.users, 2);
        assert_eq!(pop.hr_at_10, 1.0);
        assert_eq!(pop.recall_at_20, 1.0);
        // User 0's list is [2] (rank 0); user 1's is [1, 0]… held-out 0 at rank 1.
        assert!(
            (pop.ndcg_at_10 - (1.0 + 1.0 / 3f64.log2()) / 2.0).abs() < 1e-12,
            "{pop:?}"
        );
        assert!((pop.coverage_at_10 - 1.0).abs() < 1e-12);
    }
}
