//! The baseline evaluation ([`baseline_eval`]): leave-last-out figures of implicit ALS and
//! popularity, then (if asked) online learning continuing from the ALS factors, streamed
//! over the held-out events prequentially.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use reflex_core::{HistoryEntry, ItemIdx, Observation, OnlineModel, Retriever, UserId};
use serde::Serialize;

use super::data::Dataset;
use super::offline::{
    LeaveLastOut, OfflineReport, TOP_K, evaluate_als, evaluate_popularity, leave_last_out,
    train_matrix,
};
use super::streaming::EvalOptions;
use crate::als::{self, AlsConfig, AlsModel, Csr};
use crate::config::WARM_START_LEARNING_RATE;
use crate::error::ModelError;
use crate::topk::TopK;
use crate::{ExactRetriever, MfConfig, OnlineMf};

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
/// the model learns from it (see [`crate::eval`]). Refuses a `config` that
/// [`MfConfig::validate`] refuses.
pub fn online_after_baseline(
    data: &Dataset,
    split: &LeaveLastOut,
    train: &Csr,
    als: &AlsModel,
    config: &MfConfig,
    options: &EvalOptions,
) -> Result<OnlineAfterBaselineReport, ModelError> {
    let start = Instant::now();
    let k = options.k.max(1);
    let model = OnlineMf::new(MfConfig {
        factors: als.factors(),
        ..config.clone()
    })?;
    let items_loaded = model.load_item_factors(als.item_factors()) as u64;
    // The same fold-in over factors that never learn.
    let frozen = OnlineMf::new(model.config().clone())?;
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
    Ok(OnlineAfterBaselineReport {
        events,
        items_loaded,
        hr_online_mf: rate(hits_mf),
        hr_fold_in_frozen: rate(hits_fold_in),
        hr_popularity: rate(hits_pop),
        hr_frozen_als: rate(hits_als),
        observe_secs: observe_time.as_secs_f64(),
        wall_secs: start.elapsed().as_secs_f64(),
    })
}

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
/// (if asked) online learning after the baseline. Returns the fitted model too. Refuses
/// settings that [`AlsConfig::validate`] or (for the online part) [`MfConfig::validate`]
/// refuse, before fitting.
pub fn baseline_eval(
    data: &Dataset,
    options: &BaselineOptions,
) -> Result<(BaselineReport, AlsModel), ModelError> {
    if options.online {
        // The online model takes the baseline's factors; checked now, not after the fit.
        MfConfig {
            factors: options.als.factors,
            ..options.mf.clone()
        }
        .validate()
        .map_err(|reason| ModelError::invalid_config("model", reason))?;
    }
    let split = leave_last_out(data);
    let train = train_matrix(data, &split, options.stream.weighting);
    let t = Instant::now();
    let model = als::fit(&train, &options.als)?;
    let fit_secs = t.elapsed().as_secs_f64();
    let mut als_report = evaluate_als(data, &split, &train, &model);
    als_report.fit_secs = fit_secs;
    let popularity = evaluate_popularity(data, &split, &train);
    let online = if options.online {
        let stream = EvalOptions {
            k: TOP_K,
            ..options.stream.clone()
        };
        Some(online_after_baseline(
            data,
            &split,
            &train,
            &model,
            &options.mf,
            &stream,
        )?)
    } else {
        None
    };
    let report = BaselineReport {
        users: data.users as u64,
        items: data.items as u64,
        train: split.train.len() as u64,
        held_out: split.test.len() as u64,
        als: als_report,
        popularity,
        online,
    };
    Ok((report, model))
}
