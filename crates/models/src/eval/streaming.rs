//! The prequential streaming evaluation (predict, then learn, in time order) of a fresh
//! [`OnlineMf`] against its time-decayed popularity, and the throughput of learning alone.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use reflex_core::{
    EventKind, HistoryEntry, ItemIdx, Observation, OnlineModel, Retriever, SignalEvent,
    SignalModel, UserId,
};
use serde::Serialize;

use super::data::{Dataset, Weighting};
use crate::error::ModelError;
use crate::{ExactRetriever, MfConfig, OnlineMf, Signals, SignalsConfig};

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
/// caches. With `signals`, a fresh [`Signals`] learns every event in the same loop, so
/// the figure is what all online updates of an event cost together. Refuses settings
/// that [`MfConfig::validate`] or [`SignalsConfig::validate`] refuse.
pub fn learn_throughput(
    data: &Dataset,
    config: &MfConfig,
    signals: Option<&SignalsConfig>,
    options: &EvalOptions,
) -> Result<LearnReport, ModelError> {
    let order = options.replay_order(data);
    let model = OnlineMf::new(config.clone())?;
    let signals = signals.map(|c| Signals::new(c.clone())).transpose()?;
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
    let kind = EventKind::Purchase;
    let start = Instant::now();
    for &(user, item, weight, timestamp_ms) in &events {
        if let Some(Some(user)) = user_ids.get(user) {
            model.observe(&Observation {
                user,
                item,
                weight,
                timestamp_ms,
            });
            if let Some(signals) = &signals {
                signals.observe(&SignalEvent {
                    user,
                    item,
                    kind: &kind,
                    timestamp_ms,
                    learn: true,
                });
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(LearnReport {
        events: events.len() as u64,
        secs,
        events_per_sec: if secs > 0.0 {
            events.len() as f64 / secs
        } else {
            0.0
        },
    })
}

/// Runs the prequential evaluation of a fresh [`OnlineMf`] with `config` over `data`.
/// Refuses a `config` that [`MfConfig::validate`] refuses.
pub fn streaming_eval(
    data: &Dataset,
    config: &MfConfig,
    options: &EvalOptions,
) -> Result<StreamingReport, ModelError> {
    let start = Instant::now();
    let k = options.k.max(1);
    let order = options.replay_order(data);

    let model = OnlineMf::new(config.clone())?;
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
    Ok(StreamingReport {
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
    })
}
