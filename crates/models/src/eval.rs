//! Offline evaluation: MovieLens readers, a prequential streaming evaluation, and a
//! leave-last-out evaluation of the batch baseline ([`crate::als`]) with online learning
//! continuing from it.
//!
//! The streaming evaluation replays interactions in time order (stable, so ties keep file
//! order) and, for each event, first asks for the user's top `k` the way the server
//! would — fold-in from their most recent `history_window` interactions, retrieval with
//! the user's already-seen items excluded, popular fill-in when fold-in gives nothing —
//! and records a hit when the event's item is among them; then the model learns from
//! the event. Pure time-decayed popularity (the same model's, same exclusions) is scored
//! on the same events for comparison.
//!
//! The leave-last-out evaluation ([`baseline_eval`]) holds out each user's latest
//! interaction (ties by file order: the later row), trains on the rest with every
//! interaction a positive, and ranks the whole catalog for each user with their training
//! items removed: HR@10, NDCG@10, recall@20 (one held-out item, so the hit rate at 20)
//! and the catalog coverage of the top-10 lists, for ALS (`user · item`) and training-set
//! popularity. Then "online after the baseline": an [`OnlineMf`] starts from the ALS item
//! (and user) factors and training-set popularity, and the held-out events stream through
//! it in time order, prequentially — predict from fold-in over the user's recent history,
//! then learn — scored against its popularity and the frozen ALS model.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use flate2::read::GzDecoder;
use rayon::prelude::*;
use reflex_core::{HistoryEntry, ItemIdx, Observation, OnlineModel, Retriever, UserId};
use serde::Serialize;

use crate::als::{self, AlsConfig, AlsModel, Csr};
use crate::topk::TopK;
use crate::{ExactRetriever, MfConfig, OnlineMf};

/// One rating, with users and items numbered densely in order of first appearance in
/// the file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rating {
    /// Dense user number.
    pub user: u32,
    /// Dense item number.
    pub item: u32,
    /// The rating as given.
    pub rating: f32,
    /// Event time, ms since the Unix epoch.
    pub timestamp_ms: i64,
}

/// A set of ratings read from a file.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// The ratings, in file order.
    pub ratings: Vec<Rating>,
    /// Distinct users.
    pub users: usize,
    /// Distinct items.
    pub items: usize,
    /// Each dense item number's id as written in the file.
    pub item_ids: Vec<String>,
}

fn bad(line: usize, what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("line {line}: {what}"))
}

/// Reads tab-separated `user item rating timestamp(seconds)` rows after one header line.
pub fn read_ratings_tsv(reader: impl BufRead) -> io::Result<Dataset> {
    let mut users: HashMap<String, u32> = HashMap::new();
    let mut items: HashMap<String, u32> = HashMap::new();
    let mut ratings = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if n == 0 || line.trim().is_empty() {
            continue;
        }
        let mut cols = line.trim_end_matches('\r').split('\t');
        let (Some(u), Some(i), Some(r), Some(t)) =
            (cols.next(), cols.next(), cols.next(), cols.next())
        else {
            return Err(bad(n + 1, "expected 4 tab-separated columns"));
        };
        let rating: f32 = r
            .trim()
            .parse()
            .map_err(|_| bad(n + 1, "rating is not a number"))?;
        let secs: f64 = t
            .trim()
            .parse()
            .map_err(|_| bad(n + 1, "timestamp is not a number"))?;
        let next_user = users.len() as u32;
        let user = *users.entry(u.trim().to_string()).or_insert(next_user);
        let next_item = items.len() as u32;
        let item = *items.entry(i.trim().to_string()).or_insert(next_item);
        ratings.push(Rating {
            user,
            item,
            rating,
            timestamp_ms: (secs * 1000.0) as i64,
        });
    }
    let mut item_ids = vec![String::new(); items.len()];
    for (id, idx) in items {
        item_ids[idx as usize] = id;
    }
    Ok(Dataset {
        ratings,
        users: users.len(),
        items: item_ids.len(),
        item_ids,
    })
}

/// Reads MovieLens 100K's `ml-100k.inter` (header
/// `user_id:token item_id:token rating:float timestamp:float`).
pub fn read_movielens_100k(path: &Path) -> io::Result<Dataset> {
    read_ratings_tsv(BufReader::new(File::open(path)?))
}

/// Reads MovieLens 1M's `ratings_numeric.tsv.gz` (header
/// `user_id item_idx rating timestamp`, gzip).
pub fn read_movielens_1m(path: &Path) -> io::Result<Dataset> {
    read_ratings_tsv(BufReader::new(GzDecoder::new(File::open(path)?)))
}

/// Reads a ratings file of either format: tab-separated `user item rating
/// timestamp(seconds)` after a header line, gzip-compressed or not (told by its first two
/// bytes). Errors name the file.
pub fn read_ratings_file(path: &Path) -> io::Result<Dataset> {
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let mut file = BufReader::new(File::open(path).map_err(context)?);
    let gzip = file.fill_buf().map_err(context)?.starts_with(&[0x1f, 0x8b]);
    if gzip {
        read_ratings_tsv(BufReader::new(GzDecoder::new(file))).map_err(context)
    } else {
        read_ratings_tsv(file).map_err(context)
    }
}

/// How a rating becomes a learning weight.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Weighting {
    /// Every interaction is a positive of weight 1; ratings are ignored.
    #[default]
    Unit,
    /// Weight `rating / 3` (1 to 5 stars become 0.33 to 1.67).
    Rating,
}

impl Weighting {
    /// The learning weight of `rating`.
    pub fn weight(self, rating: f32) -> f32 {
        match self {
            Self::Unit => 1.0,
            Self::Rating => rating / 3.0,
        }
    }
}

/// Settings of a streaming evaluation.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Length of each recommendation list.
    pub k: usize,
    /// Most recent interactions folded in (the server's profile keeps 50).
    pub history_window: usize,
    /// Stop after this many events (in time order); `None` for all.
    pub max_events: Option<usize>,
    /// Rating to weight.
    pub weighting: Weighting,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            k: 10,
            history_window: 50,
            max_events: None,
            weighting: Weighting::Unit,
        }
    }
}

impl EvalOptions {
    /// Positions in `data.ratings` in the order a streaming evaluation replays them: by
    /// time, ties in file order, cut at `max_events`.
    pub(crate) fn replay_order(&self, data: &Dataset) -> Vec<usize> {
        let mut order: Vec<usize> = (0..data.ratings.len()).collect();
        order.sort_by_key(|&i| data.ratings[i].timestamp_ms);
        if let Some(max) = self.max_events {
            order.truncate(max);
        }
        order
    }
}

/// Figures of one streaming evaluation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamingReport {
    /// Events scored (and learnt).
    pub events: u64,
    /// Events whose user had at least one earlier event.
    pub events_with_history: u64,
    /// Hit rate of the model's top k (fold-in, popular when fold-in gives nothing).
    pub hr_mf: f64,
    /// Hit rate of time-decayed popularity's top k.
    pub hr_popularity: f64,
    /// [`Self::hr_mf`] over events whose user had an earlier event.
    pub hr_mf_with_history: f64,
    /// [`Self::hr_popularity`] over events whose user had an earlier event.
    pub hr_popularity_with_history: f64,
    /// Seconds spent in `observe` alone.
    pub observe_secs: f64,
    /// Events per second of `observe` alone.
    pub observe_events_per_sec: f64,
    /// Wall time of the whole run, predictions included, in seconds.
    pub wall_secs: f64,
}

impl std::fmt::Display for StreamingReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "events {} (with history {}): HR@k mf {:.4} popularity {:.4} ({:.2}x); \
             with history: mf {:.4} popularity {:.4}; observe {:.0} events/s; wall {:.2} s",
            self.events,
            self.events_with_history,
            self.hr_mf,
            self.hr_popularity,
            self.hr_mf / self.hr_popularity.max(f64::MIN_POSITIVE),
            self.hr_mf_with_history,
            self.hr_popularity_with_history,
            self.observe_events_per_sec,
            self.wall_secs,
        )
    }
}

/// One user's state in a streaming evaluation: their id, recent history and seen items.
pub(crate) struct UserState {
    pub(crate) id: UserId,
    pub(crate) history: VecDeque<HistoryEntry>,
    pub(crate) seen: HashSet<ItemIdx>,
}

impl UserState {
    /// Dense user `user`'s state in `users`, created on first use; `None` when `user` is
    /// out of range.
    pub(crate) fn get(users: &mut [Option<UserState>], user: u32) -> Option<&mut UserState> {
        let slot = users.get_mut(user as usize)?;
        if slot.is_none() {
            let id = UserId::parse(&format!("u{user}"), "user_id").ok()?;
            *slot = Some(UserState {
                id,
                history: VecDeque::new(),
                seen: HashSet::new(),
            });
        }
        slot.as_mut()
    }

    /// Records an interaction after it was scored: newest first in the history (kept to
    /// `window` entries) and among the seen items.
    pub(crate) fn record(&mut self, item: ItemIdx, weight: f32, timestamp_ms: i64, window: usize) {
        self.history.push_front(HistoryEntry {
            item,
            weight,
            timestamp_ms,
        });
        self.history.truncate(window);
        self.seen.insert(item);
    }
}

/// `hits / n`, 0 when `n` is 0.
pub(crate) fn rate(hits: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { hits as f64 / n as f64 }
}

/// MovieLens `"100k"` or `"1m"` from [`data_dir`], for the examples.
pub fn read_movielens(which: &str) -> io::Result<Dataset> {
    let dir = data_dir();
    match which {
        "1m" => read_movielens_1m(&dir.join("movielens-1m/ratings_numeric.tsv.gz")),
        "100k" => read_movielens_100k(&dir.join("movielens-100k/ml-100k.inter")),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown dataset {other:?}: 100k or 1m"),
        )),
    }
}

/// Where the evaluation data is: `REFLEX_DATA_DIR`, else `../shared/data` beside the
/// checkout, else the workplace's `/work/shared/data` (for checkouts made elsewhere, such
/// as a CI clone in /tmp). For the examples and tests; the data is never copied here.
pub fn data_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("REFLEX_DATA_DIR") {
        return dir.into();
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if beside.exists() {
        beside
    } else {
        "/work/shared/data".into()
    }
}

/// Throughput of model updates alone: [`learn_throughput`]'s figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LearnReport {
    /// Events learnt.
    pub events: u64,
    /// Seconds the `observe` loop took, on one thread.
    pub secs: f64,
    /// `events / secs`.
    pub events_per_sec: f64,
}

/// Times a fresh [`OnlineMf`] with `config` learning every event of `data` in time order
/// on the calling thread and nothing else: ids, item indices and observations are made
/// before the clock starts, so the figure is the model's update cost (as a stream
/// learner's `learn_one` loop would measure it), with no scoring in between to cool the
/// caches.
pub fn learn_throughput(data: &Dataset, config: &MfConfig, options: &EvalOptions) -> LearnReport {
    let order = options.replay_order(data);
    let model = OnlineMf::new(config.clone());
    let user_ids: Vec<Option<UserId>> = (0..data.users)
        .map(|u| UserId::parse(&format!("u{u}"), "user_id").ok())
        .collect();
    let mut item_idx: Vec<Option<ItemIdx>> = vec![None; data.items];
    let mut next_idx: ItemIdx = 0;
    let mut events: Vec<(usize, ItemIdx, f32, i64)> = Vec::with_capacity(order.len());
    for &i in &order {
        let r = data.ratings[i];
        let Some(slot) = item_idx.get_mut(r.item as usize) else {
            continue;
        };
        let item = *slot.get_or_insert_with(|| {
            next_idx += 1;
            next_idx - 1
        });
        if user_ids.get(r.user as usize).is_some_and(Option::is_some) {
            events.push((
                r.user as usize,
                item,
                options.weighting.weight(r.rating),
                r.timestamp_ms,
            ));
        }
    }
    let start = Instant::now();
    for &(user, item, weight, timestamp_ms) in &events {
        if let Some(Some(user)) = user_ids.get(user) {
            model.observe(&Observation {
                user,
                item,
                weight,
                timestamp_ms,
            });
        }
    }
    let secs = start.elapsed().as_secs_f64();
    LearnReport {
        events: events.len() as u64,
        secs,
        events_per_sec: if secs > 0.0 {
            events.len() as f64 / secs
        } else {
            0.0
        },
    }
}

/// Runs the prequential evaluation of a fresh [`OnlineMf`] with `config` over `data`.
pub fn streaming_eval(data: &Dataset, config: &MfConfig, options: &EvalOptions) -> StreamingReport {
    let start = Instant::now();
    let k = options.k.max(1);
    let order = options.replay_order(data);

    let model = OnlineMf::new(config.clone());
    let retriever = ExactRetriever::for_model(&model);
    let mut item_idx: Vec<Option<ItemIdx>> = vec![None; data.items];
    let mut next_idx: ItemIdx = 0;
    let mut users: Vec<Option<UserState>> = (0..data.users).map(|_| None).collect();
    let mut observe_time = Duration::ZERO;
    let (mut hits_mf, mut hits_pop, mut hits_mf_h, mut hits_pop_h) = (0u64, 0u64, 0u64, 0u64);
    let mut with_history = 0u64;
    let mut history: Vec<HistoryEntry> = Vec::with_capacity(options.history_window);

    for &i in &order {
        let r = data.ratings[i];
        // Items get indices in order of first appearance in time, as the server's index.
        let item = match item_idx.get_mut(r.item as usize) {
            Some(Some(idx)) => *idx,
            Some(slot) => {
                let idx = next_idx;
                next_idx += 1;
                *slot = Some(idx);
                idx
            }
            None => continue,
        };
        let Some(user) = UserState::get(&mut users, r.user) else {
            continue;
        };

        history.clear();
        history.extend(user.history.iter().copied());
        let seen = &user.seen;
        let filter = |idx: ItemIdx| !seen.contains(&idx);
        let mut top = match model.user_vector(&history) {
            Some(v) => retriever.search(&v, k, &filter),
            None => Vec::new(),
        };
        if top.len() < k {
            let chosen: Vec<ItemIdx> = top.iter().map(|s| s.item).collect();
            let fill = model.popular(k - top.len(), &|idx| !chosen.contains(&idx) && filter(idx));
            top.extend(fill);
        }
        let popular = model.popular(k, &filter);
        let hit_mf = top.iter().any(|s| s.item == item);
        let hit_pop = popular.iter().any(|s| s.item == item);
        hits_mf += u64::from(hit_mf);
        hits_pop += u64::from(hit_pop);
        if !history.is_empty() {
            with_history += 1;
            hits_mf_h += u64::from(hit_mf);
            hits_pop_h += u64::from(hit_pop);
        }

        let weight = options.weighting.weight(r.rating);
        let t = Instant::now();
        model.observe(&Observation {
            user: &user.id,
            item,
            weight,
            timestamp_ms: r.timestamp_ms,
        });
        observe_time += t.elapsed();

        user.record(item, weight, r.timestamp_ms, options.history_window);
    }

    let events = order.len() as u64;
    let observe_secs = observe_time.as_secs_f64();
    StreamingReport {
        events,
        events_with_history: with_history,
        hr_mf: rate(hits_mf, events),
        hr_popularity: rate(hits_pop, events),
        hr_mf_with_history: rate(hits_mf_h, with_history),
        hr_popularity_with_history: rate(hits_pop_h, with_history),
        observe_secs,
        observe_events_per_sec: if observe_secs > 0.0 {
            events as f64 / observe_secs
        } else {
            0.0
        },
        wall_secs: start.elapsed().as_secs_f64(),
    }
}

/// Cut-off of the hit rate, NDCG and coverage of [`baseline_eval`].
pub const TOP_K: usize = 10;
/// Cut-off of the recall of [`baseline_eval`].
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

/// Prequential figures of online learning continuing from the batch baseline.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OnlineAfterBaselineReport {
    /// Held-out events streamed.
    pub events: u64,
    /// Items whose factors came from the baseline.
    pub items_loaded: u64,
    /// HR@[`TOP_K`] of the online MF (fold-in over recent history, retrieval, popular
    /// fill-in), learning from each event after scoring it.
    pub hr_online_mf: f64,
    /// HR@[`TOP_K`] of the same fold-in and retrieval over the baseline's item factors
    /// never updated: what request-time fold-in over recent history adds to the frozen
    /// model, apart from online learning.
    pub hr_fold_in_frozen: f64,
    /// HR@[`TOP_K`] of the same model's time-decayed popularity.
    pub hr_popularity: f64,
    /// HR@[`TOP_K`] of the frozen ALS model (its own user vectors, never updated).
    pub hr_frozen_als: f64,
    /// Seconds spent in `observe` alone.
    pub observe_secs: f64,
    /// Wall time of the streaming run, in seconds.
    pub wall_secs: f64,
}

/// The top `k` of `model` for user `u`, without `seen` (sorted).
fn als_top(
    model: &AlsModel,
    u: usize,
    k: usize,
    seen: &[u32],
    scores: &mut Vec<f32>,
) -> Vec<ItemIdx> {
    let Some(x) = model.user(u) else {
        return Vec::new();
    };
    model.score_all(x, scores);
    let mut top = TopK::new(k);
    for (item, &s) in scores.iter().enumerate() {
        if s.is_finite() {
            top.offer(item as ItemIdx, f64::from(s), &|i| {
                seen.binary_search(&i).is_err()
            });
        }
    }
    top.into_sorted().map(|(item, _)| item).collect()
}

/// Streams the held-out events of `split` in time order through an [`OnlineMf`] (with
/// `config`, its factors set to the baseline's) that starts from `als`'s item and user
/// factors and from the popularity of the training events; each event is scored before
/// the model learns from it (see the module documentation).
pub fn online_after_baseline(
    data: &Dataset,
    split: &LeaveLastOut,
    train: &Csr,
    als: &AlsModel,
    config: &MfConfig,
    options: &EvalOptions,
) -> OnlineAfterBaselineReport {
    let start = Instant::now();
    let k = options.k.max(1);
    let model = OnlineMf::new(MfConfig {
        factors: als.factors(),
        ..config.clone()
    });
    let items_loaded = model.load_item_factors(als.item_factors()) as u64;
    // The same fold-in over factors that never learn.
    let frozen = OnlineMf::new(model.config().clone());
    frozen.load_item_factors(als.item_factors());
    let frozen_retriever = ExactRetriever::for_model(&frozen);
    let user_id = |u: u32| UserId::parse(&format!("u{u}"), "user_id").ok();
    for u in 0..train.rows().min(als.users()) {
        if let (false, Some(id), Some(x)) =
            (train.row(u).0.is_empty(), user_id(u as u32), als.user(u))
        {
            model.load_user_vector(&id, x);
        }
    }
    // Training events in time order: popularity, and each user's recent history.
    let mut by_time = split.train.clone();
    by_time.sort_by_key(|&i| (data.ratings[i].timestamp_ms, i));
    let mut recent: Vec<VecDeque<HistoryEntry>> = vec![VecDeque::new(); data.users];
    for &i in &by_time {
        let r = data.ratings[i];
        let weight = options.weighting.weight(r.rating);
        model.record_popularity(r.item, weight, r.timestamp_ms);
        if let Some(h) = recent.get_mut(r.user as usize) {
            h.push_front(HistoryEntry {
                item: r.item,
                weight,
                timestamp_ms: r.timestamp_ms,
            });
            h.truncate(options.history_window);
        }
    }
    model.refresh();

    let retriever = ExactRetriever::for_model(&model);
    let mut extra_seen: HashMap<u32, Vec<ItemIdx>> = HashMap::new();
    let (mut hits_mf, mut hits_pop, mut hits_als) = (0u64, 0u64, 0u64);
    let mut hits_fold_in = 0u64;
    let mut observe_time = Duration::ZERO;
    let mut scores = Vec::new();
    let mut history: Vec<HistoryEntry> = Vec::with_capacity(options.history_window);
    let mut events = 0u64;
    for &i in &split.test {
        let r = data.ratings[i];
        let (Some(id), Some(h)) = (user_id(r.user), recent.get_mut(r.user as usize)) else {
            continue;
        };
        events += 1;
        let seen_train = train.row(r.user as usize).0;
        let seen_extra = extra_seen.entry(r.user).or_default();
        let filter =
            |idx: ItemIdx| seen_train.binary_search(&idx).is_err() && !seen_extra.contains(&idx);

        history.clear();
        history.extend(h.iter().copied());
        let recommend = |m: &OnlineMf, retriever: &ExactRetriever| {
            let mut top = match m.user_vector(&history) {
                Some(v) => retriever.search(&v, k, &filter),
                None => Vec::new(),
            };
            if top.len() < k {
                let chosen: Vec<ItemIdx> = top.iter().map(|s| s.item).collect();
                top.extend(
                    model.popular(k - top.len(), &|idx| !chosen.contains(&idx) && filter(idx)),
                );
            }
            top.iter().any(|s| s.item == r.item)
        };
        hits_mf += u64::from(recommend(&model, &retriever));
        hits_fold_in += u64::from(recommend(&frozen, &frozen_retriever));
        hits_pop += u64::from(model.popular(k, &filter).iter().any(|s| s.item == r.item));
        let mut seen_all: Vec<u32> = seen_train.to_vec();
        seen_all.extend(seen_extra.iter().copied());
        seen_all.sort_unstable();
        hits_als +=
            u64::from(als_top(als, r.user as usize, k, &seen_all, &mut scores).contains(&r.item));

        let weight = options.weighting.weight(r.rating);
        let t = Instant::now();
        model.observe(&Observation {
            user: &id,
            item: r.item,
            weight,
            timestamp_ms: r.timestamp_ms,
        });
        observe_time += t.elapsed();
        h.push_front(HistoryEntry {
            item: r.item,
            weight,
            timestamp_ms: r.timestamp_ms,
        });
        h.truncate(options.history_window);
        seen_extra.push(r.item);
    }
    let rate = |h: u64| {
        if events == 0 {
            0.0
        } else {
            h as f64 / events as f64
        }
    };
    OnlineAfterBaselineReport {
        events,
        items_loaded,
        hr_online_mf: rate(hits_mf),
        hr_fold_in_frozen: rate(hits_fold_in),
        hr_popularity: rate(hits_pop),
        hr_frozen_als: rate(hits_als),
        observe_secs: observe_time.as_secs_f64(),
        wall_secs: start.elapsed().as_secs_f64(),
    }
}

/// SGD step size of the online model when it continues from ALS factors (the default of
/// [`MfConfig::warm_start_learning_rate`]). The from-scratch rate (then 0.1) overwrites
/// what ALS learnt: prequential HR@10 over the held-out events of ML-1M was 0.098 with it
/// when negatives stepped their items too (0.165 since they shape only the user's step),
/// 0.196–0.203 with no learning at all (fold-in alone) and 0.205 to 0.212 from 0.01 to
/// 0.03 (0.2086 at 0.02 with Gram negatives).
pub const WARM_START_LEARNING_RATE: f32 = 0.02;

/// Settings of [`baseline_eval`].
#[derive(Clone, Debug)]
pub struct BaselineOptions {
    /// The batch model.
    pub als: AlsConfig,
    /// The online model that continues from it (its factors are set to the baseline's;
    /// by default [`MfConfig::default`] with [`WARM_START_LEARNING_RATE`]).
    pub mf: MfConfig,
    /// Rating to weight, and fold-in history length, of the online part (`k` is fixed at
    /// [`TOP_K`]).
    pub stream: EvalOptions,
    /// Whether to run the online part.
    pub online: bool,
}

impl Default for BaselineOptions {
    fn default() -> Self {
        Self {
            als: AlsConfig::default(),
            mf: MfConfig {
                learning_rate: WARM_START_LEARNING_RATE,
                ..MfConfig::default()
            },
            stream: EvalOptions::default(),
            online: false,
        }
    }
}

/// Figures of [`baseline_eval`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BaselineReport {
    /// Users in the data.
    pub users: u64,
    /// Items in the data.
    pub items: u64,
    /// Training interactions.
    pub train: u64,
    /// Held-out interactions (users evaluated).
    pub held_out: u64,
    /// The batch model, offline.
    pub als: OfflineReport,
    /// Training-set popularity, offline.
    pub popularity: OfflineReport,
    /// Online learning after the baseline, when asked for.
    pub online: Option<OnlineAfterBaselineReport>,
}

impl std::fmt::Display for BaselineReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "leave-last-out: {} users, {} items, {} training interactions, {} held out",
            self.users, self.items, self.train, self.held_out
        )?;
        writeln!(
            f,
            "{:<12} {:>7} {:>8} {:>9} {:>9} {:>9}",
            "system", "HR@10", "NDCG@10", "recall@20", "coverage", "fit"
        )?;
        for r in [&self.als, &self.popularity] {
            let fit = if r.fit_secs > 0.0 {
                format!("{:.2} s", r.fit_secs)
            } else {
                "-".to_string()
            };
            writeln!(
                f,
                "{:<12} {:>7.4} {:>8.4} {:>9.4} {:>9.4} {:>9}",
                r.system, r.hr_at_10, r.ndcg_at_10, r.recall_at_20, r.coverage_at_10, fit
            )?;
        }
        if let Some(o) = &self.online {
            writeln!(
                f,
                "online after the baseline: prequential HR@10 over {} held-out events in time order",
                o.events
            )?;
            writeln!(f, "  online MF from ALS factors  {:.4}", o.hr_online_mf)?;
            writeln!(
                f,
                "  same fold-in, no learning   {:.4}",
                o.hr_fold_in_frozen
            )?;
            writeln!(f, "  decayed popularity          {:.4}", o.hr_popularity)?;
            writeln!(f, "  frozen ALS                  {:.4}", o.hr_frozen_als)?;
            writeln!(
                f,
                "  ({} items loaded; observe {:.3} s, wall {:.2} s)",
                o.items_loaded, o.observe_secs, o.wall_secs
            )?;
        }
        Ok(())
    }
}

/// Runs the whole leave-last-out evaluation of `data`: ALS and popularity offline, then
/// (if asked) online learning after the baseline. Returns the fitted model too.
pub fn baseline_eval(data: &Dataset, options: &BaselineOptions) -> (BaselineReport, AlsModel) {
    let split = leave_last_out(data);
    let train = train_matrix(data, &split, options.stream.weighting);
    let t = Instant::now();
    let model = als::fit(&train, &options.als);
    let fit_secs = t.elapsed().as_secs_f64();
    let mut als_report = evaluate_als(data, &split, &train, &model);
    als_report.fit_secs = fit_secs;
    let popularity = evaluate_popularity(data, &split, &train);
    let online = options.online.then(|| {
        let stream = EvalOptions {
            k: TOP_K,
            ..options.stream.clone()
        };
        online_after_baseline(data, &split, &train, &model, &options.mf, &stream)
    });
    let report = BaselineReport {
        users: data.users as u64,
        items: data.items as u64,
        train: split.train.len() as u64,
        held_out: split.test.len() as u64,
        als: als_report,
        popularity,
        online,
    };
    (report, model)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn reads_plain_and_gzip_files() {
        let dir = tempfile::tempdir().unwrap();
        let text = "user\titem\trating\ttimestamp\nu1\ti1\t5\t10\nu2\ti1\t3\t11\n";
        let plain = dir.path().join("r.tsv");
        std::fs::write(&plain, text).unwrap();
        let gz = dir.path().join("r.tsv.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, text.as_bytes()).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        for p in [&plain, &gz] {
            let d = read_ratings_file(p).unwrap();
            assert_eq!((d.ratings.len(), d.users, d.items), (2, 2, 1));
            assert_eq!(d.ratings[1].timestamp_ms, 11_000);
        }
        let err = read_ratings_file(&dir.path().join("missing.tsv")).unwrap_err();
        assert!(err.to_string().contains("missing.tsv"), "{err}");
    }
}
