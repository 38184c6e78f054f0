//! Offline evaluation: MovieLens readers and a prequential streaming evaluation.
//!
//! The streaming evaluation replays interactions in time order (stable, so ties keep file
//! order) and, for each event, first asks for the user's top `k` the way the server
//! would — fold-in from their most recent `history_window` interactions, retrieval with
//! the user's already-seen items excluded, popular fill-in when fold-in gives nothing —
//! and records a hit when the event's item is among them; then the model learns from
//! the event. Pure time-decayed popularity (the same model's, same exclusions) is scored
//! on the same events for comparison.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use flate2::read::GzDecoder;
use reflex_core::{HistoryEntry, ItemIdx, Observation, OnlineModel, Retriever, UserId};

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
    Ok(Dataset {
        ratings,
        users: users.len(),
        items: items.len(),
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

/// How a rating becomes a learning weight.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Weighting {
    /// Every interaction is a positive of weight 1; ratings are ignored.
    #[default]
    Unit,
    /// Weight `rating / 3` (1 to 5 stars become 0.33 to 1.67).
    Rating,
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

struct UserState {
    id: UserId,
    history: VecDeque<HistoryEntry>,
    seen: HashSet<ItemIdx>,
}

/// Runs the prequential evaluation of a fresh [`OnlineMf`] with `config` over `data`.
pub fn streaming_eval(data: &Dataset, config: &MfConfig, options: &EvalOptions) -> StreamingReport {
    let start = Instant::now();
    let k = options.k.max(1);
    let mut order: Vec<usize> = (0..data.ratings.len()).collect();
    order.sort_by_key(|&i| data.ratings[i].timestamp_ms);
    if let Some(max) = options.max_events {
        order.truncate(max);
    }

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
        let Some(slot) = users.get_mut(r.user as usize) else {
            continue;
        };
        if slot.is_none() {
            let Ok(id) = UserId::parse(&format!("u{}", r.user), "user_id") else {
                continue;
            };
            *slot = Some(UserState {
                id,
                history: VecDeque::new(),
                seen: HashSet::new(),
            });
        }
        let Some(user) = slot.as_mut() else {
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

        let weight = match options.weighting {
            Weighting::Unit => 1.0,
            Weighting::Rating => r.rating / 3.0,
        };
        let t = Instant::now();
        model.observe(&Observation {
            user: &user.id,
            item,
            weight,
            timestamp_ms: r.timestamp_ms,
        });
        observe_time += t.elapsed();

        user.history.push_front(HistoryEntry {
            item,
            weight,
            timestamp_ms: r.timestamp_ms,
        });
        user.history.truncate(options.history_window);
        user.seen.insert(item);
    }

    let events = order.len() as u64;
    let rate = |h: u64, n: u64| if n == 0 { 0.0 } else { h as f64 / n as f64 };
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
