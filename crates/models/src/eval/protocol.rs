//! Evaluation protocols that match what a shop sees: what does the user do next?
//!
//! - [`Protocol::NextItem`]: each user's latest interaction is held out (ties by file
//!   order), as in [`super::leave_last_out`].
//! - [`Protocol::NextBasket`]: each user's last basket is held out: the run of their
//!   latest interactions with no gap longer than the basket gap between consecutive ones
//!   (a grocery order, a session). Its distinct items are the targets.
//!
//! Every ranking is a list of ten items per held-out user; nothing is filtered here, so a
//! system that repeats items the user already had is credited when they come back (the
//! [`Baselines`] filter as the protocol says, and the served ranking filters as the
//! serving policy says). Figures ([`ProtocolReport`]): recall@10 (share of the targets in
//! the ten, averaged over users), HR@10 (share of users with at least one), NDCG@10
//! (binary gains, ideal = every target first), and recall split into repeat targets (items
//! the user had interacted with before the held-out part) and new ones.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;

use super::data::Dataset;
use super::offline::leave_last_out;
use crate::als::{self, AlsConfig, Csr};
use crate::error::ModelError;
use crate::topk::TopK;

/// Cut-off of every figure of this module.
pub const CUTOFF: usize = 10;

/// Which part of each user's history is held out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// The latest interaction.
    NextItem,
    /// The latest basket: interactions no more than the basket gap apart.
    NextBasket,
}

/// One user's held-out part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Dense user number.
    pub user: u32,
    /// Distinct held-out items, in the order first seen.
    pub items: Vec<u32>,
    /// Event time of the first held-out interaction: what a ranking may know is before it.
    pub from_ms: i64,
}

/// A split of a [`Dataset`] under a [`Protocol`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Positions in [`Dataset::ratings`] of everything not held out, in time order (ties
    /// by file order): the order to replay them in.
    pub train: Vec<usize>,
    /// One target per user with something left to train on, by user number.
    pub targets: Vec<Target>,
}

impl Split {
    /// Splits `data`. `basket_gap_ms` is the longest gap within a basket
    /// ([`Protocol::NextBasket`] only). Users whose whole history would be held out stay
    /// in training only.
    pub fn new(data: &Dataset, protocol: Protocol, basket_gap_ms: i64) -> Self {
        let held = match protocol {
            Protocol::NextItem => leave_last_out(data).test,
            Protocol::NextBasket => last_baskets(data, basket_gap_ms),
        };
        let mut is_held = vec![false; data.ratings.len()];
        for &i in &held {
            is_held[i] = true;
        }
        let mut by_user: HashMap<u32, Target> = HashMap::new();
        let mut ordered = held.clone();
        ordered.sort_by_key(|&i| (data.ratings[i].timestamp_ms, i));
        for i in ordered {
            let r = data.ratings[i];
            let t = by_user.entry(r.user).or_insert_with(|| Target {
                user: r.user,
                items: Vec::new(),
                from_ms: r.timestamp_ms,
            });
            if !t.items.contains(&r.item) {
                t.items.push(r.item);
            }
        }
        let mut targets: Vec<Target> = by_user.into_values().collect();
        targets.sort_by_key(|t| t.user);
        let mut train: Vec<usize> = (0..data.ratings.len()).filter(|&i| !is_held[i]).collect();
        train.sort_by_key(|&i| (data.ratings[i].timestamp_ms, i));
        Self { train, targets }
    }

    /// Each user's training items, as sets by user number.
    pub fn history(&self, data: &Dataset) -> Vec<HashSet<u32>> {
        let mut out = vec![HashSet::new(); data.users];
        for &i in &self.train {
            let r = data.ratings[i];
            if let Some(set) = out.get_mut(r.user as usize) {
                set.insert(r.item);
            }
        }
        out
    }
}

/// Positions of each user's last basket, for users with something before it.
fn last_baskets(data: &Dataset, gap_ms: i64) -> Vec<usize> {
    let mut per_user: Vec<Vec<usize>> = vec![Vec::new(); data.users];
    for (i, r) in data.ratings.iter().enumerate() {
        if let Some(v) = per_user.get_mut(r.user as usize) {
            v.push(i);
        }
    }
    let mut out = Vec::new();
    for mut rows in per_user {
        rows.sort_by_key(|&i| (data.ratings[i].timestamp_ms, i));
        let mut start = rows.len();
        while start > 0 {
            let later = data.ratings[rows[start - 1]].timestamp_ms;
            if start < rows.len() && data.ratings[rows[start]].timestamp_ms - later > gap_ms {
                break;
            }
            start -= 1;
        }
        if start > 0 {
            out.extend_from_slice(&rows[start..]);
        }
    }
    out
}

/// Figures of one ranking under a protocol.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProtocolReport {
    /// The ranking's name.
    pub system: String,
    /// Users ranked.
    pub users: u64,
    /// Mean share of a user's targets in their ten.
    pub recall_at_10: f64,
    /// Share of users with at least one target in their ten.
    pub hr_at_10: f64,
    /// Mean NDCG@10 with binary gains.
    pub ndcg_at_10: f64,
    /// Targets the user had before that are in the ten, over all such targets
    /// (micro-averaged, since many users have none).
    pub repeat_recall: f64,
    /// Targets new to the user that are in the ten, over all such targets.
    pub new_recall: f64,
    /// Share of all targets the user had before.
    pub repeat_share: f64,
}

/// Scores `lists` (one per target, same order, best first; only the first
/// [`CUTOFF`] count) against `split`'s targets.
pub fn score(
    system: &str,
    split: &Split,
    history: &[HashSet<u32>],
    lists: &[Vec<u32>],
) -> ProtocolReport {
    let mut report = ProtocolReport {
        system: system.to_owned(),
        ..ProtocolReport::default()
    };
    let (mut recall, mut hits, mut ndcg) = (0.0f64, 0u64, 0.0f64);
    let (mut rep_total, mut rep_hit, mut new_total, mut new_hit) = (0u64, 0u64, 0u64, 0u64);
    for (target, list) in split.targets.iter().zip(lists) {
        if target.items.is_empty() {
            continue;
        }
        report.users += 1;
        let wanted: HashSet<u32> = target.items.iter().copied().collect();
        let top = &list[..list.len().min(CUTOFF)];
        let mut found = 0usize;
        let mut dcg = 0.0f64;
        let mut seen = HashSet::new();
        for (rank, item) in top.iter().enumerate() {
            if wanted.contains(item) && seen.insert(*item) {
                found += 1;
                dcg += 1.0 / ((rank + 2) as f64).log2();
            }
        }
        let ideal: f64 = (0..wanted.len().min(CUTOFF))
            .map(|r| 1.0 / ((r + 2) as f64).log2())
            .sum();
        recall += found as f64 / wanted.len() as f64;
        hits += u64::from(found > 0);
        ndcg += dcg / ideal;
        let had = history.get(target.user as usize);
        for item in &wanted {
            let hit = seen.contains(item);
            if had.is_some_and(|h| h.contains(item)) {
                rep_total += 1;
                rep_hit += u64::from(hit);
            } else {
                new_total += 1;
                new_hit += u64::from(hit);
            }
        }
    }
    let n = report.users.max(1) as f64;
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    report.recall_at_10 = recall / n;
    report.hr_at_10 = hits as f64 / n;
    report.ndcg_at_10 = ndcg / n;
    report.repeat_recall = ratio(rep_hit, rep_total);
    report.new_recall = ratio(new_hit, new_total);
    report.repeat_share = ratio(rep_total, rep_total + new_total);
    report
}

/// Rankings computed from the training part alone, to compare a system with.
pub struct Baselines<'a> {
    data: &'a Dataset,
    split: &'a Split,
    history: &'a [HashSet<u32>],
    /// Items by training interactions, most first (ties to the lower number).
    popular: Vec<u32>,
}

impl<'a> Baselines<'a> {
    /// Baselines over `split`'s training part.
    pub fn new(data: &'a Dataset, split: &'a Split, history: &'a [HashSet<u32>]) -> Self {
        let mut counts = vec![0u64; data.items];
        for &i in &split.train {
            if let Some(c) = counts.get_mut(data.ratings[i].item as usize) {
                *c += 1;
            }
        }
        let mut popular: Vec<u32> = (0..data.items as u32).collect();
        popular.sort_by_key(|&i| std::cmp::Reverse(counts[i as usize]));
        Self {
            data,
            split,
            history,
            popular,
        }
    }

    /// Most interacted-with items, without the user's own when `exclude_seen`.
    pub fn popularity(&self, exclude_seen: bool) -> Vec<Vec<u32>> {
        self.split
            .targets
            .iter()
            .map(|t| self.fill(Vec::new(), t.user, exclude_seen))
            .collect()
    }

    /// "Buy it again": the user's own items by how often they had them (ties to the most
    /// recent), then popular items they never had. With `exclude_seen` (for protocols
    /// where nothing comes back) it is popularity.
    pub fn personal_frequency(&self, exclude_seen: bool) -> Vec<Vec<u32>> {
        if exclude_seen {
            return self.popularity(true);
        }
        let mut mine: Vec<HashMap<u32, (u32, i64)>> = vec![HashMap::new(); self.data.users];
        for &i in &self.split.train {
            let r = self.data.ratings[i];
            if let Some(m) = mine.get_mut(r.user as usize) {
                let e = m.entry(r.item).or_insert((0, i64::MIN));
                e.0 += 1;
                e.1 = e.1.max(r.timestamp_ms);
            }
        }
        self.split
            .targets
            .iter()
            .map(|t| {
                let mut own: Vec<(u32, (u32, i64))> = mine
                    .get(t.user as usize)
                    .map(|m| m.iter().map(|(&i, &s)| (i, s)).collect())
                    .unwrap_or_default();
                own.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                own.truncate(CUTOFF);
                self.fill(own.into_iter().map(|(i, _)| i).collect(), t.user, true)
            })
            .collect()
    }

    /// Implicit ALS fitted on the training part (every interaction a positive of weight
    /// 1, repeats summed), ranking the whole catalog by `user · item`, without the user's
    /// own items when `exclude_seen`. Also returns the fit time in seconds.
    pub fn als(
        &self,
        config: &AlsConfig,
        exclude_seen: bool,
    ) -> Result<(Vec<Vec<u32>>, f64), ModelError> {
        let triples: Vec<(u32, u32, f32)> = self
            .split
            .train
            .iter()
            .map(|&i| (self.data.ratings[i].user, self.data.ratings[i].item, 1.0))
            .collect();
        let matrix = Csr::from_triples(self.data.users, self.data.items, &triples);
        let started = std::time::Instant::now();
        let model = als::fit(&matrix, config)?;
        let fit_secs = started.elapsed().as_secs_f64();
        let lists = self
            .split
            .targets
            .par_iter()
            .map_init(Vec::new, |scores, t| {
                let Some(x) = model.user(t.user as usize) else {
                    return self.fill(Vec::new(), t.user, exclude_seen);
                };
                model.score_all(x, scores);
                let had = self.history.get(t.user as usize);
                let mut top = TopK::new(CUTOFF);
                for (item, &s) in scores.iter().enumerate() {
                    let item = item as u32;
                    if s.is_finite() && !(exclude_seen && had.is_some_and(|h| h.contains(&item))) {
                        top.offer(item, f64::from(s), &|_| true);
                    }
                }
                top.into_sorted().map(|(item, _)| item).collect()
            })
            .collect();
        Ok((lists, fit_secs))
    }

    /// Completes `list` to [`CUTOFF`] with popular items not in it (nor the user's own
    /// when `exclude_seen`).
    fn fill(&self, mut list: Vec<u32>, user: u32, exclude_seen: bool) -> Vec<u32> {
        let had = self.history.get(user as usize);
        for &item in &self.popular {
            if list.len() >= CUTOFF {
                break;
            }
            if list.contains(&item) || (exclude_seen && had.is_some_and(|h| h.contains(&item))) {
                continue;
            }
            list.push(item);
        }
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::Rating;

    fn data(rows: &[(u32, u32, i64)]) -> Dataset {
        Dataset {
            ratings: rows
                .iter()
                .map(|&(user, item, t)| Rating {
                    user,
                    item,
                    rating: 1.0,
                    timestamp_ms: t,
                })
                .collect(),
            users: rows.iter().map(|r| r.0 as usize + 1).max().unwrap_or(0),
            items: rows.iter().map(|r| r.1 as usize + 1).max().unwrap_or(0),
            item_ids: Vec::new(),
        }
    }

    #[test]
    fn the_last_basket_is_the_run_of_latest_events_within_the_gap() {
        // User 0: baskets {0, 1} at 0–10 and {1, 2, 2} at 1000–1020; user 1 has one
        // basket only, so nothing is held out for them.
        let d = data(&[
            (0, 0, 0),
            (0, 1, 10),
            (0, 1, 1000),
            (1, 3, 5),
            (0, 2, 1010),
            (0, 2, 1020),
            (1, 0, 6),
        ]);
        let split = Split::new(&d, Protocol::NextBasket, 100);
        assert_eq!(split.targets.len(), 1);
        assert_eq!(split.targets[0].items, vec![1, 2]);
        assert_eq!(split.targets[0].from_ms, 1000);
        assert_eq!(split.train, vec![0, 3, 6, 1], "time order");

        let next = Split::new(&d, Protocol::NextItem, 100);
        let items: Vec<_> = next.targets.iter().map(|t| t.items.clone()).collect();
        assert_eq!(items, vec![vec![2], vec![0]]);
    }

    #[test]
    fn figures_split_repeat_and_new_targets() {
        let d = data(&[(0, 0, 0), (0, 1, 1), (0, 0, 500), (0, 5, 501)]);
        let split = Split::new(&d, Protocol::NextBasket, 100);
        let history = split.history(&d);
        // Targets {0 (repeat), 5 (new)}; the list finds 0 at rank 2.
        let r = score("x", &split, &history, &[vec![3, 0, 4]]);
        assert_eq!(r.users, 1);
        assert!((r.recall_at_10 - 0.5).abs() < 1e-12);
        assert!((r.hr_at_10 - 1.0).abs() < 1e-12);
        let ideal = 1.0 + 1.0 / 3f64.log2();
        assert!((r.ndcg_at_10 - (1.0 / 3f64.log2()) / ideal).abs() < 1e-12);
        assert!((r.repeat_recall - 1.0).abs() < 1e-12);
        assert!(r.new_recall.abs() < 1e-12);
        assert!((r.repeat_share - 0.5).abs() < 1e-12);
        // Only the first ten count, and an item twice counts once.
        let long: Vec<u32> = (10..20).chain([0, 5]).collect();
        assert_eq!(score("x", &split, &history, &[long]).recall_at_10, 0.0);
        let twice = score("x", &split, &history, &[vec![0, 0]]);
        assert!((twice.recall_at_10 - 0.5).abs() < 1e-12);
    }

    #[test]
    fn personal_frequency_ranks_own_items_by_count_then_recency_then_fills() {
        let d = data(&[
            (0, 1, 0),
            (0, 2, 1),
            (0, 2, 2),
            (0, 3, 3),
            (1, 4, 0),
            (1, 4, 1),
            (1, 0, 2),
            (0, 9, 900),
        ]);
        let split = Split::new(&d, Protocol::NextBasket, 100);
        let history = split.history(&d);
        let b = Baselines::new(&d, &split, &history);
        let lists = b.personal_frequency(false);
        assert_eq!(split.targets[0].user, 0);
        assert_eq!(
            &lists[0][..4],
            &[2, 3, 1, 4],
            "count, then recency, then popular"
        );
        assert_eq!(lists[0].len(), CUTOFF);
        let pop = b.popularity(true);
        assert!(!pop[0].iter().any(|i| [1, 2, 3].contains(i)));
        assert_eq!(pop[0][0], 4);
    }
}
