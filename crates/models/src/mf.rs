//! Online matrix factorisation over implicit feedback, with fold-in at request time.
//!
//! Learning (`observe`): one SGD step on a weighted squared loss per event — the event's
//! item towards score 1 (or 0 for negative feedback) with confidence from the weight, and
//! negatives towards 0 — updating the item's factors in the shared [`ItemFactors`] store
//! and the learner's own vector for the user. By default every known item is a negative
//! of weight `negatives / items`, and their summed pull on the user, `−w G p`, is one
//! product with the Gram matrix `G` of the item factors (the expected step of sampling
//! `negatives` items uniformly, at a fixed cost of k² per event instead of `negatives`
//! scattered item reads); [`crate::NegativeSampling`] also offers sampling.
//!
//! Serving (`user_vector`): the user's vector is solved from their recent history
//! against the current item factors, as in implicit ALS:
//! `(Σ c_h q_h q_hᵀ + β G + λ I) p = Σ c_h⁺ q_h`, with `G` the Gram matrix of all item
//! factors (recomputed periodically), standing in for the negatives of training.
//! Any replica holding the item factors and the profile gives the same answer, and it
//! reflects the very last event in the profile.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use half::f16;
use half::slice::HalfFloatSliceExt;
use parking_lot::Mutex;
use reflex_core::types::IdHashState;
use reflex_core::{
    Error, HistoryEntry, ImportUsers, ItemIdx, ItemState, ModelState, Observation, OnlineModel,
    Result, Scored, UserId,
};

use crate::config::{MfConfig, NegativeSampling};
use crate::error::ModelError;
use crate::factors::ItemFactors;
use crate::linalg::{OUTER_BLOCK, add_outer_lower, cholesky_solve, dot, sub_sym_product};
use crate::popularity::Popularity;
use crate::rng::{SplitMix, fnv1a, mix, unit_f32};

thread_local! {
    /// Per-thread scratch of one SGD update (the user's old vector, its gradient and one
    /// item vector), so learning allocates nothing per event.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-thread list of one event's sampled negatives.
    static NEGATIVES: std::cell::RefCell<Vec<ItemIdx>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Version label of this model.
pub const VERSION: &str = "online-mf";

/// Unit weights for summing a block of item vectors into a Gram matrix.
const ONES: [f32; OUTER_BLOCK] = [1.0; OUTER_BLOCK];

/// Adds the first `pending` vectors of `q` (`k` values each, at most [`OUTER_BLOCK`]) to
/// the Gram sum `acc` in one block (cheaper per vector than one by one), and empties it.
fn add_pending(acc: &mut [f32], k: usize, q: &[f32], pending: &mut usize) {
    add_outer_lower(acc, k, &q[..*pending * k], &ONES[..*pending]);
    *pending = 0;
}

/// Gram matrix of the item factors at some point.
struct Gram {
    /// `k × k`, row-major, symmetric (both triangles filled).
    g: Vec<f32>,
    /// Its trace, `Σ |q|²` over the items summed.
    trace: f32,
    /// Items summed.
    items: usize,
}

impl Gram {
    /// The published form of a sum whose lower triangle `g` holds (`k × k`).
    fn from_lower(mut g: Vec<f32>, k: usize, items: usize) -> Self {
        for r in 0..k {
            for c in 0..r {
                g[c * k + r] = g[r * k + c];
            }
        }
        let trace = (0..k).map(|d| g[d * k + d]).sum();
        Self { g, trace, items }
    }

    /// Subtracts `w · G p` from `out` (`k` values each): the summed user gradient of
    /// every item as a negative of weight `w`, `Σ_j w (0 − p·q_j) q_j`.
    fn sub_product(&self, w: f32, p: &[f32], out: &mut [f32]) {
        sub_sym_product(&self.g, w, p, out);
    }
}

/// The Gram matrix being summed a little per event ([`OnlineMf::advance_gram`]).
struct GramBuild {
    /// Partial sum, `k × k`, lower triangle.
    acc: Vec<f32>,
    /// Vectors read but not yet added to `acc`: up to [`OUTER_BLOCK`], `k` values each.
    q: Vec<f32>,
    /// Vectors waiting in `q`.
    pending: usize,
    /// Position in the known-item list of the next item to add.
    next: usize,
    /// Items this pass covers: those known when it began.
    target: usize,
    /// Event number at which this pass began.
    started: u64,
}

/// Online implicit matrix factorisation with fold-in and time-decayed popularity.
pub struct OnlineMf {
    config: MfConfig,
    items: Arc<ItemFactors>,
    /// The learner's user vectors, stored as `f16` (half the memory of a user's largest
    /// piece of state); SGD steps run in `f32` on a copy.
    users: DashMap<UserId, Box<[f16]>, IdHashState>,
    popularity: Popularity,
    gram: ArcSwap<Gram>,
    gram_build: Mutex<GramBuild>,
    /// Events observed, which also numbers each event's random stream.
    events: AtomicU64,
    /// Recent positive items, for popularity-proportional negatives.
    ring: Box<[AtomicU32]>,
    ring_pos: AtomicU64,
    /// The SGD step size in use (`f32` bits): the configured rate, or the warm-start
    /// rate once the factors come from a batch fit.
    learning_rate: AtomicU32,
    /// See [`ModelState::batch_origin`].
    batch_origin: Mutex<Option<String>>,
}

impl OnlineMf {
    /// A new, empty model; refuses `config` when [`MfConfig::validate`] does (an
    /// out-of-range setting is an error naming the field, never replaced by its default).
    pub fn new(config: MfConfig) -> std::result::Result<Arc<Self>, ModelError> {
        config
            .validate()
            .map_err(|reason| ModelError::invalid_config("model", reason))?;
        let k = config.factors;
        Ok(Arc::new(Self {
            items: Arc::new(ItemFactors::new(k, config.init_scale, config.seed)),
            users: DashMap::with_hasher(IdHashState::default()),
            popularity: Popularity::new(
                config.popularity_half_life_ms,
                config.popular_refresh_events,
                config.popular_cache,
            ),
            gram: ArcSwap::from_pointee(Gram {
                g: vec![0.0; k * k],
                trace: 0.0,
                items: 0,
            }),
            gram_build: Mutex::new(GramBuild {
                acc: vec![0.0; k * k],
                q: vec![0.0; OUTER_BLOCK * k],
                pending: 0,
                next: 0,
                target: 0,
                started: 0,
            }),
            events: AtomicU64::new(0),
            ring: (0..config.recent_ring).map(|_| AtomicU32::new(0)).collect(),
            ring_pos: AtomicU64::new(0),
            learning_rate: AtomicU32::new(config.learning_rate.to_bits()),
            batch_origin: Mutex::new(None),
            config,
        }))
    }

    /// The settings in force.
    pub fn config(&self) -> &MfConfig {
        &self.config
    }

    /// The shared item factor store (what [`crate::ExactRetriever`] scans).
    pub fn item_factors(&self) -> &Arc<ItemFactors> {
        &self.items
    }

    /// Events observed so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Users the learner holds a vector for.
    pub fn learner_users(&self) -> usize {
        self.users.len()
    }

    /// The learner's own vector for `user` (what SGD trains; requests use fold-in).
    pub fn learner_vector(&self, user: &UserId) -> Option<Vec<f32>> {
        self.users.get(user).map(|p| widen(&p))
    }

    /// Time-decayed popularity of `item` at event time `at_ms`.
    pub fn popularity(&self, item: ItemIdx, at_ms: i64) -> f32 {
        self.popularity.score(&self.items, item, at_ms)
    }

    /// The SGD step size in use: [`MfConfig::learning_rate`], or
    /// [`MfConfig::warm_start_learning_rate`] when the factors descend from a batch fit.
    pub fn learning_rate(&self) -> f32 {
        f32::from_bits(self.learning_rate.load(Ordering::Relaxed))
    }

    /// Records where the factors came from and picks the step size for it.
    fn set_origin(&self, origin: Option<String>) {
        let rate = match origin {
            Some(_) => self.config.warm_start_learning_rate,
            None => self.config.learning_rate,
        };
        self.learning_rate.store(rate.to_bits(), Ordering::Relaxed);
        *self.batch_origin.lock() = origin;
    }

    /// Starts the item factors from a batch model's (row-major, `factors` values per item,
    /// item `i` at row `i`, e.g. [`crate::AlsModel::item_factors`]), then refreshes the
    /// Gram matrix and the popular list, and switches learning to the warm-start rate.
    /// All-zero rows (items the batch model had no data for) are skipped and stay
    /// unknown. Returns the number of items loaded; 0, loading nothing, when the length
    /// is not a multiple of this model's factors.
    pub fn load_item_factors(&self, factors: &[f32]) -> usize {
        let k = self.config.factors;
        if !factors.len().is_multiple_of(k) {
            return 0;
        }
        let mut loaded = 0;
        for (i, v) in factors.chunks_exact(k).enumerate() {
            if v.iter().any(|x| *x != 0.0) && self.items.load(i as ItemIdx, v) {
                loaded += 1;
            }
        }
        if loaded > 0 {
            self.set_origin(Some("batch factors".to_owned()));
        }
        self.refresh();
        loaded
    }

    /// Sets the learner's own vector for `user` (e.g. from a batch model's user factors),
    /// so SGD continues from it rather than from a random start; `false` when `vector` is
    /// not `factors` long or not finite.
    pub fn load_user_vector(&self, user: &UserId, vector: &[f32]) -> bool {
        if vector.len() != self.config.factors || !vector.iter().all(|v| v.is_finite()) {
            return false;
        }
        self.users.insert(user.clone(), narrow(vector));
        true
    }

    /// Adds an event to time-decayed popularity only, without learning from it (to replay
    /// history whose factors came from a batch model). Marks the item known.
    pub fn record_popularity(&self, item: ItemIdx, weight: f32, timestamp_ms: i64) {
        if !weight.is_finite() || weight == 0.0 {
            return;
        }
        self.items.ensure_known(item);
        self.popularity
            .record(&self.items, item, weight, timestamp_ms);
    }

    /// Recomputes the Gram matrix and the popular list now (e.g. after a replay), instead
    /// of waiting for the rolling refresh.
    pub fn refresh(&self) {
        let mut build = self.gram_build.lock();
        self.rebuild_gram();
        build.acc.fill(0.0);
        build.pending = 0;
        build.next = 0;
        build.target = 0;
        build.started = self.events();
        self.popularity.rebuild(&self.items);
    }

    /// Adds one more item to the Gram matrix being summed and publishes it once it
    /// covers every item known when its pass began, so the cost of keeping the matrix
    /// fresh is one `k × k` outer product per event, never a whole rebuild on one
    /// event's path (which at a million items would stall that event for a second). A
    /// pass lasts as many events as it has items (times `gram_stride`), and a new one
    /// starts `gram_refresh_events` after the last began, or as soon as the known items
    /// have doubled since (so a young model's matrix keeps up with its catalog, at a
    /// geometric, linear total cost). Skipped when another thread holds the build: a
    /// concurrent event does the step.
    fn advance_gram(&self, event_no: u64) {
        if !event_no.is_multiple_of(self.config.gram_stride) {
            return;
        }
        let Some(mut guard) = self.gram_build.try_lock() else {
            return;
        };
        let k = self.config.factors;
        let b = &mut *guard;
        if b.next < b.target {
            let slot = b.pending * k;
            if let Some(idx) = self.items.known_at(b.next)
                && self.items.read_into(idx, &mut b.q[slot..slot + k])
            {
                b.pending += 1;
            }
            b.next += 1;
            if b.pending == OUTER_BLOCK || b.next == b.target {
                add_pending(&mut b.acc, k, &b.q, &mut b.pending);
            }
            return;
        }
        let known = self.items.len();
        if event_no.saturating_sub(b.started) < self.config.gram_refresh_events
            && known < 2 * b.target.max(1)
        {
            return;
        }
        if b.target > 0 {
            let g = std::mem::replace(&mut b.acc, vec![0.0; k * k]);
            self.gram.store(Arc::new(Gram::from_lower(g, k, b.target)));
        }
        b.next = 0;
        b.target = known;
        b.started = event_no;
    }

    fn rebuild_gram(&self) {
        let k = self.config.factors;
        let mut g = vec![0.0f32; k * k];
        let mut q = vec![0.0f32; OUTER_BLOCK * k];
        let (mut items, mut pending) = (0, 0);
        self.items.for_each_known(|_, stored| {
            stored.read_into(&mut q[pending * k..(pending + 1) * k]);
            pending += 1;
            items += 1;
            if pending == OUTER_BLOCK {
                add_pending(&mut g, k, &q, &mut pending);
            }
        });
        add_pending(&mut g, k, &q, &mut pending);
        self.gram.store(Arc::new(Gram::from_lower(g, k, items)));
    }

    fn initial_user(&self, user: &UserId) -> Box<[f16]> {
        let k = self.config.factors;
        let scale = self.config.init_scale / (k as f32).sqrt();
        let h = mix(self.config.seed ^ fnv1a(user.as_str().as_bytes()));
        (0..k)
            .map(|d| f16::from_f32(unit_f32(mix(h ^ d as u64)) * scale))
            .collect()
    }

    fn sample_negative(&self, rng: &mut SplitMix) -> Option<ItemIdx> {
        if self.config.negative_sampling == NegativeSampling::Popularity {
            let filled = (self.ring_pos.load(Ordering::Relaxed) as usize).min(self.ring.len());
            if filled > 0 {
                return Some(self.ring[rng.below(filled)].load(Ordering::Relaxed));
            }
        }
        let n = self.items.len();
        if n == 0 {
            return None;
        }
        self.items.known_at(rng.below(n))
    }

    /// One squared-loss SGD step of item `idx` towards `target` with confidence `c` (at
    /// most `cap`), against the user's vector `p`; adds the user's gradient to `grad_p`
    /// and returns the step's curvature for the user, `c · |q|²`. With `item_step` off
    /// the item's vector is left as it is.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        idx: ItemIdx,
        p: &[f32],
        target: f32,
        c: f32,
        cap: f32,
        grad_p: &mut [f32],
        q: &mut [f32],
        item_step: bool,
    ) -> f32 {
        let Some(slot) = self.items.slot(idx) else {
            return 0.0;
        };
        slot.read_into(q);
        let (pq, qq) = (dot(p, q), dot(q, q));
        let c = c.min(cap);
        let err = c * (target - pq);
        if !err.is_finite() {
            return 0.0;
        }
        if !item_step {
            for (g, x) in grad_p.iter_mut().zip(q.iter()) {
                *g += err * x;
            }
            return c * qq;
        }
        let (lr, reg) = (self.learning_rate(), self.config.regularisation);
        for ((g, x), pd) in grad_p.iter_mut().zip(q.iter_mut()).zip(p) {
            *g += err * *x;
            *x += lr * (err * pd - reg * *x);
        }
        slot.write(q);
        c * qq
    }

    fn learn(&self, obs: &Observation<'_>, event_no: u64) {
        let k = self.config.factors;
        let mut rng = SplitMix::new(mix(self.config.seed ^ mix(event_no)));
        let mut entry = match self.users.get_mut(obs.user) {
            Some(e) => e,
            None => self
                .users
                .entry(obs.user.clone())
                .or_insert_with(|| self.initial_user(obs.user)),
        };
        let stored: &mut [f16] = entry.value_mut();
        SCRATCH.with_borrow_mut(|scratch| {
            NEGATIVES.with_borrow_mut(|negatives| {
                scratch.clear();
                scratch.resize(4 * k, 0.0);
                let (p, rest) = scratch.split_at_mut(k);
                let (p_old, rest) = rest.split_at_mut(k);
                let (grad, q) = rest.split_at_mut(k);
                stored.convert_to_f32_slice(p);
                p_old.copy_from_slice(p);
                self.sgd(obs, &mut rng, p, p_old, grad, q, negatives);
                stored.convert_from_f32_slice(p);
            })
        });
    }

    /// The SGD steps of one event: the item (and the negatives) against `p_old`, the
    /// user's vector before the event, then the user's own step into `p`.
    ///
    /// Sampled negatives are drawn first and every item's vector is prefetched before the
    /// first step: the items are scattered over memory far larger than the cache, and
    /// waiting for them one step at a time cost more than all the arithmetic.
    #[allow(clippy::too_many_arguments)]
    fn sgd(
        &self,
        obs: &Observation<'_>,
        rng: &mut SplitMix,
        p: &mut [f32],
        p_old: &[f32],
        grad: &mut [f32],
        q: &mut [f32],
        negatives: &mut Vec<ItemIdx>,
    ) {
        let c = obs.weight.abs().min(self.config.max_confidence);
        // Sampled negatives: all of them, or with Gram negatives the `gram_samples` drawn
        // beside the Gram term (which then carries the rest of the weight).
        let gram_mode = self.config.negative_sampling == NegativeSampling::Gram;
        let samples = if gram_mode {
            self.config.gram_samples.min(self.config.negatives)
        } else {
            self.config.negatives
        };
        negatives.clear();
        if obs.weight > 0.0 {
            for _ in 0..samples {
                if let Some(j) = self.sample_negative(rng)
                    && j != obs.item
                {
                    negatives.push(j);
                }
            }
        }
        self.items.prefetch(obs.item);
        for &j in negatives.iter() {
            self.items.prefetch(j);
        }
        // Step sizes that never overshoot. An item step of confidence c moves the item's
        // score by lr·c·|p|² times its error, so above 1 it passes the target, and
        // repeated overshoots (a heavy buyer, a high learning rate) grow until the
        // factors are infinite: confidence is capped at 1 / (lr·|p|²). The user's step
        // sums every item's pull, lr·Σ c|q|², and is scaled down the same way.
        let (lr, reg) = (self.learning_rate(), self.config.regularisation);
        let pp = dot(p_old, p_old);
        let cap = if lr * pp > f32::MIN_POSITIVE {
            1.0 / (lr * pp)
        } else {
            f32::INFINITY
        };
        let mut curvature = 0.0;
        if obs.weight > 0.0 {
            curvature += self.step(obs.item, p_old, 1.0, c, cap, grad, q, true);
            let (neg_c, neg_steps) = (self.config.negative_weight, self.config.negative_item_steps);
            for &j in negatives.iter() {
                curvature += self.step(j, p_old, 0.0, neg_c, cap, grad, q, neg_steps);
            }
            if gram_mode && samples < self.config.negatives {
                let gram = self.gram.load();
                if gram.items > 0 {
                    let w = neg_c.min(cap) * (self.config.negatives - samples) as f32
                        / gram.items as f32;
                    gram.sub_product(w, p_old, grad);
                    curvature += w * gram.trace;
                }
            }
        } else {
            curvature += self.step(obs.item, p_old, 0.0, c, cap, grad, q, true);
        }
        let scale = if lr * curvature > 1.0 {
            1.0 / (lr * curvature)
        } else {
            1.0
        };
        for ((pd, g), old) in p.iter_mut().zip(grad.iter()).zip(p_old) {
            *pd += lr * (scale * g - reg * old);
        }
    }

    /// Solves the fold-in system for `history` (see the module documentation).
    pub fn fold_in(&self, history: &[HistoryEntry]) -> Option<Vec<f32>> {
        let k = self.config.factors;
        let newest = history.iter().map(|h| h.timestamp_ms).max()?;
        let mut a = vec![0.0f32; k * k];
        let mut b = vec![0.0f32; k];
        // The history's vectors and confidences, summed into `a` in one call.
        let mut qs = vec![0.0f32; history.len() * k];
        let mut weights = Vec::with_capacity(history.len());
        let mut positives = 0usize;
        let half_life = self.config.fold_in_half_life_ms;
        for h in history {
            if !h.weight.is_finite() || h.weight == 0.0 {
                continue;
            }
            let q = &mut qs[weights.len() * k..(weights.len() + 1) * k];
            if !self.items.read_into(h.item, q) {
                continue;
            }
            let mut c = h.weight.abs().min(self.config.max_confidence);
            if half_life > 0 {
                c *= ((h.timestamp_ms - newest) as f64 / half_life as f64).exp2() as f32;
            }
            if h.weight > 0.0 {
                positives += 1;
                for (bd, qd) in b.iter_mut().zip(q.iter()) {
                    *bd += c * qd;
                }
            }
            weights.push(c);
        }
        add_outer_lower(&mut a, k, &qs[..weights.len() * k], &weights);
        if positives == 0 {
            return None;
        }
        // The first fold-in after start-up sums the Gram matrix at once rather than
        // waiting for the rolling pass (unless another thread holds the build).
        if self.gram.load().items == 0
            && !self.items.is_empty()
            && let Some(_build) = self.gram_build.try_lock()
        {
            self.rebuild_gram();
        }
        let gram = self.gram.load();
        if gram.items > 0 {
            let beta = self.config.fold_in_gram_weight
                * self.config.negatives as f32
                * self.config.negative_weight
                * positives as f32
                / gram.items as f32;
            for (x, g) in a.iter_mut().zip(&gram.g) {
                *x += beta * g;
            }
        }
        for d in 0..k {
            a[d * k + d] += self.config.fold_in_regularisation;
        }
        cholesky_solve(&a, &b, k)
    }
}

impl OnlineModel for OnlineMf {
    fn version(&self) -> String {
        VERSION.to_string()
    }

    fn observe(&self, obs: &Observation<'_>) {
        if !obs.weight.is_finite() || obs.weight == 0.0 {
            return;
        }
        self.items.ensure_known(obs.item);
        let event_no = self.events.fetch_add(1, Ordering::Relaxed);
        self.learn(obs, event_no);
        if obs.weight > 0.0 && self.config.negative_sampling == NegativeSampling::Popularity {
            let pos = self.ring_pos.fetch_add(1, Ordering::Relaxed) as usize;
            self.ring[pos % self.ring.len()].store(obs.item, Ordering::Relaxed);
        }
        self.popularity
            .record(&self.items, obs.item, obs.weight, obs.timestamp_ms);
        self.advance_gram(event_no);
    }

    fn forget_user(&self, user: &UserId) {
        self.users.remove(user);
    }

    fn export(&self) -> Option<ModelState> {
        let mut items = Vec::with_capacity(self.items.len());
        self.items.for_each_known(|item, values| {
            items.push(ItemState {
                item,
                vector: values.to_vec(),
                popularity: self.items.popularity_log2(item),
            });
        });
        let users = self
            .users
            .iter()
            .map(|e| (e.key().clone(), widen(e.value())))
            .collect();
        Some(ModelState {
            factors: self.config.factors,
            items,
            users,
            events: self.events(),
            latest_ms: self.popularity.latest_ms(),
            batch_origin: self.batch_origin.lock().clone(),
        })
    }

    fn import(&self, state: &ModelState, users: ImportUsers) -> Result<()> {
        let k = self.config.factors;
        if state.factors != k {
            return Err(Error::invalid(
                "model",
                format!("snapshot has {} factors, this model {k}", state.factors),
            ));
        }
        let bad = |what: &str| Error::invalid("model", format!("snapshot has a malformed {what}"));
        if state
            .items
            .iter()
            .any(|i| i.vector.len() != k || !i.vector.iter().all(|v| v.is_finite()))
        {
            return Err(bad("item vector"));
        }
        if state
            .users
            .iter()
            .any(|(_, v)| v.len() != k || !v.iter().all(|x| x.is_finite()))
        {
            return Err(bad("user vector"));
        }
        for item in &state.items {
            self.items.load(item.item, &item.vector);
            self.items.set_popularity_log2(item.item, item.popularity);
        }
        if users == ImportUsers::Restore {
            self.users.clear();
            for (user, vector) in &state.users {
                self.users.insert(user.clone(), narrow(vector));
            }
        }
        self.events.store(state.events, Ordering::Relaxed);
        self.set_origin(state.batch_origin.clone());
        self.popularity.saw(state.latest_ms);
        self.refresh();
        Ok(())
    }

    fn user_vector(&self, history: &[HistoryEntry]) -> Option<Vec<f32>> {
        self.fold_in(history)
    }

    fn item_vector(&self, item: ItemIdx) -> Option<Vec<f32>> {
        self.items.get(item)
    }

    fn score(&self, item: ItemIdx, query: &[f32]) -> Option<f32> {
        if query.len() != self.config.factors {
            return None;
        }
        self.items.score(item, query)
    }

    fn popular(&self, k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        self.popularity.top(&self.items, k, filter)
    }
}

/// A learner vector as stored.
fn narrow(vector: &[f32]) -> Box<[f16]> {
    vector.iter().map(|&v| f16::from_f32(v)).collect()
}

/// A stored learner vector in `f32`.
fn widen(stored: &[f16]) -> Vec<f32> {
    stored.iter().map(|v| v.to_f32()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name, "user_id").unwrap()
    }

    fn small(factors: usize, negatives: usize) -> MfConfig {
        MfConfig {
            factors,
            negatives,
            ..MfConfig::default()
        }
    }

    fn observe(m: &OnlineMf, u: &UserId, item: ItemIdx, weight: f32, ts: i64) {
        m.observe(&Observation {
            user: u,
            item,
            weight,
            timestamp_ms: ts,
        });
    }

    fn learner_score(m: &OnlineMf, u: &UserId, item: ItemIdx) -> f32 {
        dot(&m.learner_vector(u).unwrap(), &m.item_vector(item).unwrap())
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
    }

    /// Heavy, repeated, high-confidence events (buyers hammering a few products, with a
    /// learning rate a user may well set) must not make the factors overshoot and blow up to
    /// infinity or NaN: a diverged model ranks nothing and serves popular items only.
    #[test]
    fn heavy_repeated_events_never_diverge() {
        let m = OnlineMf::new(MfConfig {
            learning_rate: 0.3,
            ..MfConfig::default()
        })
        .unwrap();
        let users: Vec<UserId> = (0..4).map(|i| user(&format!("buyer-{i}"))).collect();
        for n in 0..20_000i64 {
            let u = &users[(n % 4) as usize];
            let item = (n % 3) as ItemIdx;
            observe(&m, u, item, 10.0, n);
            observe(&m, u, 100 + (n % 50) as ItemIdx, 1.0, n);
        }
        for item in (0..3).chain(100..150) {
            let v = m.item_vector(item).unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "item {item}: {v:?}");
            assert!(
                dot(&v, &v) < 1e4,
                "item {item} blew up: |v|² = {}",
                dot(&v, &v)
            );
        }
        for u in &users {
            let p = m.learner_vector(u).unwrap();
            assert!(
                p.iter().all(|x| x.is_finite()) && dot(&p, &p) < 1e4,
                "{p:?}"
            );
            let heavy = learner_score(&m, u, 0);
            let light = (100..150).map(|i| learner_score(&m, u, i)).sum::<f32>() / 50.0;
            assert!(heavy > light, "heavy {heavy} vs light {light}");
        }
    }

    #[test]
    fn sgd_step_raises_the_positive_and_lowers_negatives() {
        // With item steps for negatives: without them a negative's score falls only
        // through the user's vector, which the positive pulls more (see the next test).
        let m = OnlineMf::new(MfConfig {
            learning_rate: 0.05,
            negative_item_steps: true,
            negative_sampling: NegativeSampling::Uniform,
            ..small(8, 8)
        })
        .unwrap();
        let (alice, bob) = (user("alice"), user("bob"));
        // Make items 0 and 1 known, through another user.
        observe(&m, &bob, 0, 1.0, 0);
        observe(&m, &bob, 1, 1.0, 0);
        observe(&m, &alice, 1, 1.0, 0);
        let (pos0, neg0) = (learner_score(&m, &alice, 0), learner_score(&m, &alice, 1));
        // A positive on item 0; item 1 (the only other known item) is sampled as negative.
        observe(&m, &alice, 0, 1.0, 1);
        let (pos1, neg1) = (learner_score(&m, &alice, 0), learner_score(&m, &alice, 1));
        assert!(pos1 > pos0, "positive score {pos0} -> {pos1}");
        assert!(neg1 < neg0, "negative score {neg0} -> {neg1}");
        // Negative feedback lowers the item's score.
        let before = learner_score(&m, &alice, 0);
        observe(&m, &alice, 0, -2.0, 2);
        assert!(learner_score(&m, &alice, 0) < before);
        assert_eq!(m.events(), 5);
    }

    #[test]
    fn negatives_step_their_items_only_when_configured() {
        for negative_item_steps in [false, true] {
            let m = OnlineMf::new(MfConfig {
                negative_item_steps,
                negative_sampling: NegativeSampling::Uniform,
                ..small(8, 8)
            })
            .unwrap();
            let (alice, bob) = (user("alice"), user("bob"));
            observe(&m, &bob, 0, 1.0, 0);
            observe(&m, &bob, 1, 1.0, 0);
            let before = m.item_vector(1).unwrap();
            // Item 1, the only other known item, is sampled as alice's negative.
            observe(&m, &alice, 0, 1.0, 1);
            assert_eq!(m.item_vector(1).unwrap() != before, negative_item_steps);
        }
    }

    /// Gram negatives: the user's step is exactly the expected step of uniform sampling,
    /// `c (1 − p·q) q − (negatives · negative_weight / items) G p`, from the published
    /// Gram matrix `G`, and no negative item moves.
    #[test]
    fn gram_negatives_take_the_expected_user_step() {
        let (k, negatives, lr, reg) = (8, 4, 0.05f32, 0.01f32);
        let m = OnlineMf::new(MfConfig {
            learning_rate: lr,
            regularisation: reg,
            negative_sampling: NegativeSampling::Gram,
            ..small(k, negatives)
        })
        .unwrap();
        let (alice, bob) = (user("alice"), user("bob"));
        for item in 0..10 {
            observe(&m, &bob, item, 1.0, 0);
        }
        observe(&m, &alice, 3, 1.0, 0);
        m.refresh();
        let p = m.learner_vector(&alice).unwrap();
        let q: Vec<Vec<f32>> = (0..10).map(|i| m.item_vector(i).unwrap()).collect();
        observe(&m, &alice, 0, 1.0, 1);

        let w = negatives as f32 / q.len() as f32;
        let mut grad: Vec<f32> = q[0].iter().map(|x| (1.0 - dot(&p, &q[0])) * x).collect();
        let mut curvature = dot(&q[0], &q[0]);
        for qj in &q {
            let pq = dot(&p, qj);
            for (g, x) in grad.iter_mut().zip(qj) {
                *g -= w * pq * x;
            }
            curvature += w * dot(qj, qj);
        }
        let scale = if lr * curvature > 1.0 {
            1.0 / (lr * curvature)
        } else {
            1.0
        };
        let want: Vec<f32> = (0..k)
            .map(|d| p[d] + lr * (scale * grad[d] - reg * p[d]))
            .collect();
        // Stored as f16: within one unit in the last place (2^-10 relative).
        let got = m.learner_vector(&alice).unwrap();
        for d in 0..k {
            assert!(
                (got[d] - want[d]).abs() <= want[d].abs() / 1024.0 + 1e-6,
                "dimension {d}: {got:?} vs {want:?}"
            );
        }
        for (i, qi) in q.iter().enumerate().skip(1) {
            assert_eq!(
                &m.item_vector(i as ItemIdx).unwrap(),
                qi,
                "negative item {i} moved"
            );
        }
        assert_ne!(m.item_vector(0).unwrap(), q[0], "the positive item steps");
    }

    /// `gram_samples` draws its negatives as uniform sampling does, and the Gram term
    /// carries only the rest: with every negative sampled, Gram mode learns exactly what
    /// uniform sampling learns.
    #[test]
    fn gram_samples_draw_like_uniform_sampling() {
        let uniform = OnlineMf::new(MfConfig {
            negative_sampling: NegativeSampling::Uniform,
            ..small(8, 4)
        })
        .unwrap();
        let all_sampled = OnlineMf::new(MfConfig {
            negative_sampling: NegativeSampling::Gram,
            gram_samples: 4,
            ..small(8, 4)
        })
        .unwrap();
        let gram_only = OnlineMf::new(small(8, 4)).unwrap();
        let users: Vec<UserId> = (0..5).map(|u| user(&format!("u{u}"))).collect();
        for n in 0..500u32 {
            for m in [&uniform, &all_sampled, &gram_only] {
                observe(m, &users[n as usize % 5], (n * 7) % 40, 1.0, i64::from(n));
            }
        }
        for u in &users {
            assert_eq!(uniform.learner_vector(u), all_sampled.learner_vector(u));
            assert_ne!(uniform.learner_vector(u), gram_only.learner_vector(u));
        }
    }

    /// A young model's Gram matrix keeps up with a growing catalog: a new pass starts as
    /// soon as the known items double, without waiting for `gram_refresh_events`.
    #[test]
    fn the_gram_matrix_follows_a_growing_catalog() {
        let m = OnlineMf::new(MfConfig {
            gram_refresh_events: 1_000_000,
            ..small(8, 4)
        })
        .unwrap();
        let u = user("u");
        for n in 0..400u32 {
            observe(&m, &u, n / 2, 1.0, i64::from(n));
        }
        let covered = m.gram.load().items;
        assert!(
            (50..=200).contains(&covered),
            "the published Gram matrix covers {covered} of 200 items"
        );
    }

    #[test]
    fn fold_in_recovers_the_learners_direction() {
        // Two tastes: users 0..20 like items 0..20, users 20..40 like items 20..40.
        let m = OnlineMf::new(MfConfig {
            fold_in_half_life_ms: 0,
            ..small(8, 4)
        })
        .unwrap();
        let users: Vec<UserId> = (0..40).map(|u| user(&format!("u{u}"))).collect();
        let mut rng = SplitMix::new(3);
        let mut ts = 0;
        let mut histories: Vec<Vec<HistoryEntry>> = vec![Vec::new(); 40];
        for _round in 0..60 {
            for (u, id) in users.iter().enumerate() {
                let item = (rng.below(20) + if u < 20 { 0 } else { 20 }) as ItemIdx;
                ts += 1000;
                observe(&m, id, item, 1.0, ts);
                histories[u].insert(
                    0,
                    HistoryEntry {
                        item,
                        weight: 1.0,
                        timestamp_ms: ts,
                    },
                );
            }
        }
        m.refresh();
        for u in [3usize, 27] {
            let history = &histories[u][..30];
            let folded = m.user_vector(history).unwrap();
            let learnt = m.learner_vector(&users[u]).unwrap();
            let cos = cosine(&folded, &learnt);
            // Unrelated vectors in 8 dimensions have |cosine| around 0.35; the learner's
            // vector also carries the noise of its SGD path: 0.64 and 0.79 here with the
            // default Gram negatives, 0.78 and 0.83 with 4 uniform samples at rate 0.1.
            assert!(cos > 0.6, "user {u}: cosine {cos}");
            // And it ranks the user's own taste first.
            let own = if u < 20 { 0..20 } else { 20..40 };
            let mut scored: Vec<(f32, ItemIdx)> = (0..40)
                .map(|i| (dot(&folded, &m.item_vector(i).unwrap()), i))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            assert!(
                scored[..10].iter().all(|(_, i)| own.contains(i)),
                "{scored:?}"
            );
        }
        // Nothing known, nothing positive: no vector.
        let unknown = [HistoryEntry {
            item: 999,
            weight: 1.0,
            timestamp_ms: 0,
        }];
        assert!(m.user_vector(&unknown).is_none());
        assert!(m.user_vector(&[]).is_none());
        let only_negative = [HistoryEntry {
            item: 1,
            weight: -1.0,
            timestamp_ms: 0,
        }];
        assert!(m.user_vector(&only_negative).is_none());
    }

    #[test]
    fn popularity_halves_after_one_half_life_and_ranks() {
        let day = 24 * 3600 * 1000;
        let m = OnlineMf::new(MfConfig {
            popularity_half_life_ms: day,
            popular_refresh_events: 1,
            ..small(4, 0)
        })
        .unwrap();
        let u = user("u");
        let t0 = 1_700_000_000_000;
        observe(&m, &u, 0, 2.0, t0);
        let now = m.popularity(0, t0);
        assert!((now - 2.0).abs() < 1e-4, "{now}");
        let later = m.popularity(0, t0 + day);
        assert!((later - 1.0).abs() < 1e-4, "{later}");
        assert!((m.popularity(0, t0 + 3 * day) - 0.25).abs() < 1e-4);
        // Item 1 gets three events a day later: now more popular than item 0's decayed 1.0.
        for _ in 0..3 {
            observe(&m, &u, 1, 1.0, t0 + day);
        }
        observe(&m, &u, 2, -1.0, t0 + day);
        let top = m.popular(10, &|_| true);
        let items: Vec<ItemIdx> = top.iter().map(|s| s.item).collect();
        assert_eq!(items, vec![1, 0], "negative-only items are never popular");
        assert!((top[0].score - 3.0).abs() < 1e-3 && (top[1].score - 1.0).abs() < 1e-3);
        assert_eq!(m.popular(10, &|i| i != 1)[0].item, 0);
        assert!(m.popular(0, &|_| true).is_empty());
    }

    #[test]
    fn popular_falls_back_to_a_scan_when_the_cache_runs_out() {
        let m = OnlineMf::new(MfConfig {
            popular_cache: 2,
            popular_refresh_events: 1,
            ..small(4, 0)
        })
        .unwrap();
        let u = user("u");
        for item in 0..10u32 {
            for _ in 0..=item {
                observe(&m, &u, item, 1.0, 0);
            }
        }
        let top = m.popular(3, &|i| i % 2 == 0);
        let items: Vec<ItemIdx> = top.iter().map(|s| s.item).collect();
        assert_eq!(items, vec![8, 6, 4]);
    }

    #[test]
    fn forget_user_drops_the_learners_vector() {
        let m = OnlineMf::new(small(4, 1)).unwrap();
        let u = user("gone");
        observe(&m, &u, 0, 1.0, 0);
        assert_eq!(m.learner_users(), 1);
        m.forget_user(&u);
        assert!(m.learner_vector(&u).is_none());
        assert_eq!(m.version(), "online-mf");
        assert!(m.item_vector(0).is_some() && m.item_vector(1).is_none());
    }

    #[test]
    fn replay_is_deterministic() {
        let run = || {
            let m = OnlineMf::new(small(8, 4)).unwrap();
            for e in 0..500u32 {
                observe(&m, &user(&format!("u{}", e % 7)), e % 13, 1.0, i64::from(e));
            }
            (0..13)
                .map(|i| m.item_vector(i).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn concurrent_observe_and_read_do_not_panic() {
        let m = OnlineMf::new(small(16, 4)).unwrap();
        let retriever = crate::ExactRetriever::for_model(&m);
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let m = &m;
                s.spawn(move || {
                    for e in 0..3000u32 {
                        let u = user(&format!("t{t}-u{}", e % 50));
                        // Items grow past several chunks while others learn.
                        let item = (e * 4 + t) % 6000;
                        observe(
                            m,
                            &u,
                            item,
                            if e % 17 == 0 { -1.0 } else { 1.0 },
                            i64::from(e),
                        );
                        if e % 500 == 0 {
                            m.forget_user(&u);
                        }
                    }
                });
            }
            let (m, retriever) = (&m, &retriever);
            s.spawn(move || {
                for e in 0..300u32 {
                    let history: Vec<HistoryEntry> = (0..20)
                        .map(|i| HistoryEntry {
                            item: (e * 7 + i) % 6000,
                            weight: 1.0,
                            timestamp_ms: i64::from(i),
                        })
                        .collect();
                    if let Some(v) = m.user_vector(&history) {
                        let found =
                            reflex_core::Retriever::search(retriever, &v, 10, &|i| i % 3 != 0);
                        assert!(found.iter().all(|s| s.item % 3 != 0));
                    }
                    let _ = m.popular(10, &|_| true);
                }
            });
        });
        assert_eq!(m.events(), 12_000);
        assert_eq!(m.item_factors().len(), 6000);
        assert!((0..6000).all(|i| {
            m.item_vector(i)
                .is_some_and(|v| v.iter().all(|x| x.is_finite()))
        }));
    }

    #[test]
    fn export_then_import_restores_scores_and_popularity() {
        let a = OnlineMf::new(small(4, 8)).unwrap();
        let alice = user("alice");
        for i in 0..200u32 {
            a.observe(&Observation {
                user: &alice,
                item: i % 10,
                weight: 1.0,
                timestamp_ms: 1_000 + i as i64,
            });
        }
        let state = a.export().unwrap();
        assert_eq!(state.items.len(), 10);
        let b = OnlineMf::new(small(4, 8)).unwrap();
        b.import(&state, ImportUsers::Restore).unwrap();
        for i in 0..10 {
            assert_eq!(a.item_vector(i), b.item_vector(i));
            assert_eq!(a.popularity(i, 2_000), b.popularity(i, 2_000));
        }
        assert_eq!(a.learner_vector(&alice), b.learner_vector(&alice));
        assert_eq!(a.popular(3, &|_| true), b.popular(3, &|_| true));
        assert_eq!(b.events(), 200);
        let wrong = ModelState {
            factors: 3,
            ..state.clone()
        };
        assert!(b.import(&wrong, ImportUsers::Restore).is_err());
    }

    #[test]
    fn a_batch_start_learns_at_the_warm_rate_through_snapshots() {
        let config = MfConfig {
            learning_rate: 0.1,
            warm_start_learning_rate: 0.02,
            ..small(2, 4)
        };
        let m = OnlineMf::new(config.clone()).unwrap();
        assert_eq!(m.learning_rate(), 0.1);
        assert_eq!(m.export().unwrap().batch_origin, None);
        m.load_item_factors(&[1.0, 0.0, 0.0, 1.0]);
        assert_eq!(m.learning_rate(), 0.02);
        // A snapshot of it keeps the origin, and a model restored from it the rate.
        let warm = m.export().unwrap();
        assert!(warm.batch_origin.is_some());
        let restored = OnlineMf::new(config.clone()).unwrap();
        restored.import(&warm, ImportUsers::Restore).unwrap();
        assert_eq!(restored.learning_rate(), 0.02);
        // Rolling back to a version learnt from scratch restores the configured rate.
        let cold = OnlineMf::new(config).unwrap().export().unwrap();
        restored.import(&cold, ImportUsers::Restore).unwrap();
        assert_eq!(restored.learning_rate(), 0.1);
        assert_eq!(restored.export().unwrap().batch_origin, None);
    }

    #[test]
    fn starts_from_batch_item_factors() {
        let m = OnlineMf::new(small(2, 4)).unwrap();
        // Items 0 and 2 loaded; item 1 (all zero) skipped; a wrong length loads nothing.
        assert_eq!(m.load_item_factors(&[1.0, 0.0, 0.0, 0.0, 0.0, 1.0]), 2);
        assert_eq!(m.load_item_factors(&[1.0, 0.0, 0.0]), 0);
        assert_eq!(m.item_vector(0), Some(vec![1.0, 0.0]));
        assert_eq!(m.item_vector(1), None);
        let alice = user("alice");
        assert!(m.load_user_vector(&alice, &[0.0, 2.0]));
        assert!(!m.load_user_vector(&alice, &[0.0]));
        assert_eq!(learner_score(&m, &alice, 2), 2.0);
        m.record_popularity(2, 1.0, 10);
        m.record_popularity(0, 1.0, 10);
        m.record_popularity(2, 1.0, 10);
        m.refresh();
        let top: Vec<ItemIdx> = m.popular(2, &|_| true).iter().map(|s| s.item).collect();
        assert_eq!(top, vec![2, 0]);
        assert_eq!(m.events(), 0);
        // Folding in a history of item 2 points at item 2.
        let v = m
            .user_vector(&[HistoryEntry {
                item: 2,
                weight: 1.0,
                timestamp_ms: 10,
            }])
            .unwrap();
        assert!(dot(&v, &[0.0, 1.0]) > dot(&v, &[1.0, 0.0]));
    }
}
