//! Behaviour signals, learnt online from every accepted event: what a user comes back to
//! ("buy it again") and what people go on to next (next-item co-occurrence). The
//! [`SignalModel`] the engine ranks with.
//!
//! Both signals score a candidate with an estimated probability, from counts, so they
//! rank on one scale and need no weights tuned per data set:
//!
//! - **Repeat** (purchases only). A user's purchases fall into baskets: purchases no more
//!   than [`SignalsConfig::basket_gap_ms`] apart. Each item learns its repurchase rate
//!   `r_j = (R_j + K_ITEM·r) / (O_j + K_ITEM)`: of the baskets its earlier buyers bought
//!   afterwards (`O_j`), the share that held it again (`R_j`), shrunk toward the rate `r`
//!   of its category (the first of its catalog categories; the same formula over the
//!   category's items, shrunk by `K_CATEGORY` toward the rate over all items), or toward
//!   the rate over all items when it has none. A new brand of milk is bought again from
//!   its first sale; a new sofa is not. A user's own evidence is their later baskets since they first
//!   bought it, `m`, and how many held it, `x`, both decayed by
//!   [`SignalsConfig::basket_decay`] per basket; the probability it is in their next
//!   basket is the Beta posterior mean `(x + K_USER·r_j) / (m + K_USER)`. Where nobody
//!   buys anything twice (MovieLens), every rate is 0 and repeats vanish by themselves.
//! - **Sequence**. For every event that is the user's first with its item, the item is
//!   counted as following each of the user's previous [`SignalsConfig::window`] items,
//!   weighted [`SignalsConfig::pair_decay`] per step apart, in that item's bounded list
//!   of followers. At request time the user's latest [`SignalsConfig::sources`] items
//!   (weighted [`SignalsConfig::source_decay`] per position back) give
//!   `P1(j) = Σ_s w_s·(C[s][j] + κ·q_j) / (M_s + κ) / Σ_s w_s`, with `q_j` the share of
//!   first interactions that were with `j` and κ [`SignalsConfig::smoothing`]. It
//!   becomes a basket-level figure like the repeat one: the expected count
//!   `λ = S_u·(1 − π_u)/(1 − π)·P1(j)`, with `S_u` the user's expected basket size and
//!   `π_u` the share of their events that are repeats (both shrunk toward everyone's),
//!   reported as the chance of at least one, `1 − e^(−λ)`.
//!   Once a background refit has installed item-to-item weights ([`crate::ease`]),
//!   `P1` becomes `(1 − β)·P1 + β·E(j)`, with β [`SignalsConfig::item_item_share`] and
//!   `E` the fitted scores from the latest [`SignalsConfig::item_item_sources`] items
//!   (weighted [`SignalsConfig::item_item_decay`] per position back), normalised over
//!   the eligible candidates.
//!
//! Measured (`reflex eval --protocol`, see BENCHMARKS.md), one set of defaults for
//! every data set. Clock skew: an event older than the user's latest by more than a
//! basket gap counts towards the item but opens no basket and follows nothing, so late
//! events never corrupt repurchase intervals. Memory is bounded: per user
//! [`SignalsConfig::max_user_items`] purchased items and the latest few items; per item
//! [`SignalsConfig::max_followers`] followers (the lighter half is dropped when full;
//! a full purchase list drops its stalest quarter).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use parking_lot::Mutex;
use reflex_core::types::{IdHashState, growth};
use reflex_core::{
    Error, EventKind, ImportUsers, ItemId, ItemIdx, ItemItemWeights, Result, Scored,
    SignalCandidate, SignalEvent, SignalModel, SignalSource, UserId,
};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Pseudo-baskets of the item's rate in a user's repeat estimate.
const K_USER: f32 = 1.0;
/// Pseudo-chances of its category's rate (everyone's, for an item without one) in an
/// item's repurchase rate.
const K_ITEM: f32 = 100.0;
/// Pseudo-chances of everyone's rate in a category's repurchase rate.
const K_CATEGORY: f32 = 100.0;
/// Pseudo-events of everyone's repeat share in a user's.
const K_SHARE: f32 = 10.0;
/// Pseudo-baskets of everyone's basket size in a user's.
const K_BASKET: f32 = 5.0;
/// Repurchase rate below which an item counts as one people do not buy again: fewer
/// than one later basket in a hundred of its buyers holds it again.
const MIN_REBUY_RATE: f32 = 0.01;

/// Settings of [`Signals`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SignalsConfig {
    /// Whether the signals are learnt and served.
    pub enabled: bool,
    /// Purchases further apart than this start a new basket, in ms.
    pub basket_gap_ms: i64,
    /// Weight of a user's evidence per basket back (1 keeps everything).
    pub basket_decay: f32,
    /// How many of the user's previous items a first interaction is counted as following.
    pub window: usize,
    /// Weight of a pair per step apart.
    pub pair_decay: f32,
    /// How many of the user's latest items propose what comes next.
    pub sources: usize,
    /// Weight of a source item per position back.
    pub source_decay: f32,
    /// Pseudo-count (κ) pulling an item's follower shares toward first-interaction
    /// popularity.
    pub smoothing: f32,
    /// Followers kept per item.
    pub max_followers: usize,
    /// Purchased items kept per user (the least recently bought goes first).
    pub max_user_items: usize,
    /// A user with no event for this long (wall clock, as a profile's TTL counts) is
    /// forgotten, in ms.
    pub user_ttl_ms: i64,
    /// Share of the next-item estimate given to the item-to-item weights the background
    /// refit fits ([`crate::ease`]), once there are any; the rest stays with the
    /// co-occurrence counts. 0 leaves the fitted weights unused.
    pub item_item_share: f32,
    /// How many of the user's latest items the fitted weights score from.
    pub item_item_sources: usize,
    /// Weight of such a source item per position back (1: the plain set of items).
    pub item_item_decay: f32,
}

impl Default for SignalsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            basket_gap_ms: 30 * 60 * 1000,
            basket_decay: 0.9,
            window: 10,
            pair_decay: 0.7,
            sources: 10,
            source_decay: 0.7,
            smoothing: 20.0,
            max_followers: 300,
            max_user_items: 200,
            user_ttl_ms: 30 * 24 * 3600 * 1000,
            item_item_share: 0.4,
            item_item_sources: 50,
            item_item_decay: 0.9,
        }
    }
}

impl SignalsConfig {
    /// Checks every setting; the message names the first one out of range.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let unit = |name: &str, v: f32| {
            if v.is_finite() && v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err(format!("{name} is {v}, expected a number in (0, 1]"))
            }
        };
        unit("basket_decay", self.basket_decay)?;
        unit("pair_decay", self.pair_decay)?;
        unit("source_decay", self.source_decay)?;
        unit("item_item_decay", self.item_item_decay)?;
        if !(self.item_item_share.is_finite() && (0.0..=1.0).contains(&self.item_item_share)) {
            return Err(format!(
                "item_item_share is {}, expected a number in [0, 1]",
                self.item_item_share
            ));
        }
        if self.user_ttl_ms <= 0 {
            return Err(format!("user_ttl_ms is {}, expected > 0", self.user_ttl_ms));
        }
        if self.basket_gap_ms <= 0 {
            return Err(format!(
                "basket_gap_ms is {}, expected > 0",
                self.basket_gap_ms
            ));
        }
        if !(self.smoothing.is_finite() && self.smoothing > 0.0) {
            return Err(format!("smoothing is {}, expected > 0", self.smoothing));
        }
        for (name, v, max) in [
            ("window", self.window, 100),
            ("sources", self.sources, 100),
            ("item_item_sources", self.item_item_sources, 1_000),
            ("max_followers", self.max_followers, 10_000),
            ("max_user_items", self.max_user_items, 100_000),
        ] {
            if v == 0 || v > max {
                return Err(format!("{name} is {v}, expected 1 to {max}"));
            }
        }
        Ok(())
    }
}

/// One item's learnt statistics.
#[derive(Clone, Debug, Default)]
struct ItemStats {
    /// Decayed follower weights.
    followers: Followers,
    /// Total weight counted as followed by something (M), including evicted followers.
    out_mass: f32,
}

/// One item: the counters are atomics (read for every candidate, bumped for every item
/// of a closing basket), the followers are locked.
#[derive(Default)]
struct ItemSlot {
    /// First interactions of a user with it.
    firsts: AtomicU64,
    /// Later baskets of earlier buyers (O).
    chances: AtomicU64,
    /// Of those, baskets that held it again (R).
    repeats: AtomicU64,
    stats: Mutex<ItemStats>,
}

/// The repurchase counters of one category: the sums of its items' (O, R).
#[derive(Default)]
struct CategoryRates {
    chances: AtomicU64,
    repeats: AtomicU64,
}

/// Categories by name, numbered in order of first sight, with their counters, and each
/// item's category.
#[derive(Default)]
struct Categories {
    numbers: Mutex<HashMap<Box<str>, u32>>,
    rates: boxcar::Vec<CategoryRates>,
    /// Each item's category number plus one (0: none), by item index: 4 bytes per item,
    /// grown only as far as the highest item given a category.
    of: boxcar::Vec<AtomicU32>,
}

impl Categories {
    /// The number of `name` plus one, assigning one the first time.
    fn number(&self, name: &str) -> u32 {
        let mut numbers = self.numbers.lock();
        if let Some(&n) = numbers.get(name) {
            return n;
        }
        let n = self.rates.push(CategoryRates::default()) as u32 + 1;
        numbers.insert(name.into(), n);
        n
    }

    /// The counters of number-plus-one `n` (0: none).
    fn get(&self, n: u32) -> Option<&CategoryRates> {
        n.checked_sub(1).and_then(|i| self.rates.get(i as usize))
    }

    /// The category number plus one of `item` (0: none).
    fn of(&self, item: ItemIdx) -> u32 {
        self.of
            .get(item as usize)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Gives `item` the category number plus one `n`; returns the one it had.
    fn set(&self, item: ItemIdx, n: u32) -> u32 {
        let idx = item as usize;
        if n == 0 && idx >= self.of.count() {
            return 0;
        }
        grown_to(&self.of, idx, || AtomicU32::new(0)).swap(n, Ordering::Relaxed)
    }
}

/// The element at `idx` of `vec`, pushing `fill()`s until there is one; lock-free, so
/// several threads may grow the vector at once (a few spare elements at the end are
/// harmless). `boxcar` counts the pushes that are complete, so another thread's push of
/// `idx` may still be in flight while a later one is complete: the count is then past
/// `idx` but the element is not there yet, and this waits for it rather than index it.
fn grown_to<T>(vec: &boxcar::Vec<T>, idx: usize, fill: impl Fn() -> T) -> &T {
    loop {
        if let Some(element) = vec.get(idx) {
            return element;
        }
        if vec.count() <= idx {
            vec.push(fill());
        } else {
            std::thread::yield_now();
        }
    }
}

/// One purchased item of a user.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
struct UserItem {
    item: ItemIdx,
    /// Basket of the first purchase.
    first: u32,
    /// Basket of the latest purchase.
    last: u32,
    /// Decayed count of later baskets that held it again, as of basket `evidence_at`.
    evidence: f32,
    evidence_at: u32,
}

/// Everything kept about one user.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct UserSignals {
    /// Event time of the latest purchase (basket clock) and of the latest event.
    last_purchase_ms: i64,
    last_ms: i64,
    /// Baskets started; the current one is `baskets − 1`.
    baskets: u32,
    /// Purchases, and of those after the first, how many were repeats.
    purchases: u32,
    eligible: u32,
    repeats: u32,
    /// Wall-clock time of the latest event, to the maintenance tick.
    touched_ms: i64,
    /// Latest items, newest last.
    recent: VecDeque<ItemIdx>,
    /// Purchased items, sorted by item.
    items: Vec<UserItem>,
}

impl UserSignals {
    fn bought(&self, item: ItemIdx) -> bool {
        self.items.binary_search_by_key(&item, |it| it.item).is_ok()
    }
}

/// Counters over everyone.
#[derive(Default)]
struct Totals {
    /// Events counted as first interactions (the denominator of `q_j`).
    firsts: AtomicU64,
    /// Purchases, baskets, eligible purchases and repeats among them.
    purchases: AtomicU64,
    baskets: AtomicU64,
    eligible: AtomicU64,
    repeats: AtomicU64,
    /// Σ O_j and Σ R_j, as thousandths (basket weights are whole numbers, so exact).
    chances: AtomicU64,
    rebought: AtomicU64,
}

/// The signals model; see the module documentation.
pub struct Signals {
    config: SignalsConfig,
    users: DashMap<UserId, UserSignals, IdHashState>,
    items: boxcar::Vec<ItemSlot>,
    categories: Categories,
    totals: Totals,
    clock_ms: AtomicI64,
    /// Wall clock as of the last [`SignalModel::maintain`] (coarse: no clock read per
    /// event).
    wall_ms: AtomicI64,
    /// The item-to-item weights the last refit installed, swapped whole.
    item_item: ArcSwapOption<ItemItem>,
}

/// Fitted item-to-item weights: per source item, its targets with positive weights.
#[derive(Debug, Default)]
struct ItemItem {
    rows: HashMap<ItemIdx, Box<[(ItemIdx, f32)]>, IdHashState>,
}

impl Signals {
    /// An empty model; refuses settings [`SignalsConfig::validate`] refuses.
    pub fn new(config: SignalsConfig) -> std::result::Result<Self, ModelError> {
        config
            .validate()
            .map_err(|reason| ModelError::invalid_config("signals", reason))?;
        Ok(Self {
            config,
            users: DashMap::with_hasher(IdHashState::default()),
            items: boxcar::Vec::new(),
            categories: Categories::default(),
            totals: Totals::default(),
            clock_ms: AtomicI64::new(i64::MIN),
            wall_ms: AtomicI64::new(reflex_core::types::now_ms()),
            item_item: ArcSwapOption::empty(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &SignalsConfig {
        &self.config
    }

    /// Users held.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Forgets users untouched for longer than the TTL at wall-clock time `now_ms`.
    fn expire(&self, now_ms: i64) {
        self.wall_ms.store(now_ms, Ordering::Relaxed);
        let horizon = now_ms.saturating_sub(self.config.user_ttl_ms);
        // One shard locked at a time, never the whole map.
        self.users.retain(|_, u| u.touched_ms >= horizon);
    }

    fn slot(&self, item: ItemIdx) -> &ItemSlot {
        grown_to(&self.items, item as usize, ItemSlot::default)
    }

    fn slot_if_any(&self, item: ItemIdx) -> Option<&ItemSlot> {
        self.items.get(item as usize)
    }

    fn global_rebuy_rate(&self) -> f32 {
        let chances = self.totals.chances.load(Ordering::Relaxed);
        if chances == 0 {
            return 0.0;
        }
        self.totals.rebought.load(Ordering::Relaxed) as f32 / chances as f32
    }

    fn global_repeat_share(&self) -> f32 {
        let eligible = self.totals.eligible.load(Ordering::Relaxed);
        if eligible == 0 {
            return 0.0;
        }
        self.totals.repeats.load(Ordering::Relaxed) as f32 / eligible as f32
    }

    fn rebuy_rate(&self, item: ItemIdx, global: f32) -> f32 {
        let Some(s) = self.slot_if_any(item) else {
            return global;
        };
        let repeats = s.repeats.load(Ordering::Relaxed);
        let chances = s.chances.load(Ordering::Relaxed);
        let prior = match self.categories.get(self.categories.of(item)) {
            Some(c) => {
                let (r, o) = (
                    c.repeats.load(Ordering::Relaxed),
                    c.chances.load(Ordering::Relaxed),
                );
                (r as f32 + K_CATEGORY * global) / (o as f32 + K_CATEGORY)
            }
            None => global,
        };
        (repeats as f32 + K_ITEM * prior) / (chances as f32 + K_ITEM)
    }

    /// Adds the item's counters to those of its category `category` (number plus
    /// one), or takes them out of them.
    fn count_in_category(&self, slot: &ItemSlot, category: u32, add: bool) {
        let Some(c) = self.categories.get(category) else {
            return;
        };
        for (from, to) in [(&slot.chances, &c.chances), (&slot.repeats, &c.repeats)] {
            let v = from.load(Ordering::Relaxed);
            if add {
                to.fetch_add(v, Ordering::Relaxed);
            } else {
                // Never below zero, whatever a racing basket did meanwhile.
                let _ = to.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                    Some(t.saturating_sub(v))
                });
            }
        }
    }

    /// Counts the basket `basket` of `user` as closed: every item they had bought before
    /// it had a chance to be bought again, taken when it holds the item.
    fn close_basket(&self, user: &UserSignals, basket: u32) {
        let (mut chances, mut rebought) = (0u64, 0u64);
        for it in user.items.iter().filter(|it| it.first < basket) {
            let slot = self.slot(it.item);
            let category = self.categories.get(self.categories.of(it.item));
            slot.chances.fetch_add(1, Ordering::Relaxed);
            chances += 1;
            if let Some(c) = category {
                c.chances.fetch_add(1, Ordering::Relaxed);
            }
            if it.last == basket {
                slot.repeats.fetch_add(1, Ordering::Relaxed);
                rebought += 1;
                if let Some(c) = category {
                    c.repeats.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.totals.chances.fetch_add(chances, Ordering::Relaxed);
        self.totals.rebought.fetch_add(rebought, Ordering::Relaxed);
    }

    /// Counts `item` as following the user's latest items.
    fn count_followers(&self, recent: &VecDeque<ItemIdx>, item: ItemIdx) {
        let mut w = 1.0f32;
        for &before in recent.iter().rev().take(self.config.window) {
            if before != item {
                let mut st = self.slot(before).stats.lock();
                st.out_mass += w;
                st.followers.add(item, w, self.config.max_followers);
            }
            w *= self.config.pair_decay;
        }
    }

    fn observe_purchase(&self, u: &mut UserSignals, item: ItemIdx, ts: i64, learn: bool) -> bool {
        let late = u.purchases > 0 && ts < u.last_purchase_ms - self.config.basket_gap_ms;
        if !late && (u.purchases == 0 || ts - u.last_purchase_ms > self.config.basket_gap_ms) {
            if u.baskets > 0 && learn {
                self.close_basket(u, u.baskets - 1);
            }
            u.baskets += 1;
            if learn {
                self.totals.baskets.fetch_add(1, Ordering::Relaxed);
            }
        }
        u.last_purchase_ms = u.last_purchase_ms.max(ts);
        let basket = u.baskets.saturating_sub(1);
        let pos = u.items.binary_search_by_key(&item, |it| it.item).ok();
        if u.purchases > 0 {
            let repeat = pos.is_some_and(|p| u.items[p].first < basket);
            u.eligible += 1;
            u.repeats += u32::from(repeat);
            if learn {
                self.totals.eligible.fetch_add(1, Ordering::Relaxed);
                self.totals
                    .repeats
                    .fetch_add(u64::from(repeat), Ordering::Relaxed);
            }
        }
        u.purchases += 1;
        if learn {
            self.totals.purchases.fetch_add(1, Ordering::Relaxed);
        }
        let new = pos.is_none();
        let pos = match pos {
            Some(p) => p,
            None => {
                if u.items.len() >= self.config.max_user_items {
                    evict_stalest(&mut u.items, self.config.max_user_items);
                }
                let at = u
                    .items
                    .binary_search_by_key(&item, |it| it.item)
                    .unwrap_or_else(|at| at);
                if u.items.len() == u.items.capacity() {
                    let more = growth(u.items.len(), self.config.max_user_items);
                    u.items.reserve_exact(more);
                }
                u.items.insert(
                    at,
                    UserItem {
                        item,
                        first: basket,
                        last: basket,
                        evidence: 0.0,
                        evidence_at: basket,
                    },
                );
                return new;
            }
        };
        let it = &mut u.items[pos];
        if it.last != basket && it.first < basket {
            let gamma = self.config.basket_decay;
            it.evidence =
                it.evidence * gamma.powi(basket.saturating_sub(it.evidence_at) as i32) + 1.0;
            it.evidence_at = basket;
        }
        it.last = it.last.max(basket);
        new
    }

    /// The probability that `it` is in the user's next basket.
    fn repeat_probability(&self, u: &UserSignals, it: &UserItem, global: f32) -> f32 {
        // The next basket is `u.baskets`; evidence counts later baskets from the first
        // purchase's up to the latest one.
        let gamma = self.config.basket_decay;
        let later = u.baskets.saturating_sub(1 + it.first);
        let m = if gamma < 1.0 {
            (1.0 - gamma.powi(later as i32)) / (1.0 - gamma)
        } else {
            later as f32
        };
        let x = it.evidence * gamma.powi(u.baskets.saturating_sub(1 + it.evidence_at) as i32);
        let r = self.rebuy_rate(it.item, global);
        (x + K_USER * r) / (m + K_USER)
    }
}

/// Makes room in a user's full list of purchased items: drops the quarter (at least one)
/// bought longest ago, the least re-bought first among equals, in one pass rather than
/// one scan per new item.
fn evict_stalest(items: &mut Vec<UserItem>, max: usize) {
    let drop = (max / 4).clamp(1, items.len());
    let key = |it: &UserItem| (it.last, it.evidence, it.item);
    let order = |a: &(u32, f32, ItemIdx), b: &(u32, f32, ItemIdx)| {
        a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2))
    };
    let mut keys: Vec<(u32, f32, ItemIdx)> = items.iter().map(key).collect();
    let (_, pivot, _) = keys.select_nth_unstable_by(drop - 1, order);
    let pivot = *pivot;
    items.retain(|it| order(&key(it), &pivot) == std::cmp::Ordering::Greater);
}

/// The followers of one item with their weights: an open-addressing table keyed by item
/// (Fibonacci hashing, linear probing, at most three quarters full), so counting a pair
/// reads one slot where a binary search over a sorted list read several cache lines.
/// When it holds `max` followers, the lighter half is dropped first (lossy counting: the
/// heavy followers keep exact counts, and a newcomer earns its place from zero rather
/// than inheriting an evicted weight).
#[derive(Clone, Debug, Default)]
struct Followers {
    /// `(item, weight)`, [`Followers::EMPTY`] for a free slot; empty or a power of two long.
    slots: Vec<(ItemIdx, f32)>,
    len: usize,
}

impl Followers {
    const EMPTY: ItemIdx = ItemIdx::MAX;

    /// A table holding `entries` (distinct items).
    fn from_entries(entries: &[(ItemIdx, f32)]) -> Self {
        let mut table = Self::default();
        table.rebuild(entries, Self::capacity_for(entries.len()));
        table
    }

    fn capacity_for(len: usize) -> usize {
        // At most three quarters full.
        (len * 4 / 3 + 1).next_power_of_two().max(8)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every follower and its weight, in no particular order.
    fn iter(&self) -> impl Iterator<Item = (ItemIdx, f32)> + '_ {
        self.slots.iter().copied().filter(|s| s.0 != Self::EMPTY)
    }

    /// Every follower, sorted by item.
    fn sorted(&self) -> Vec<(ItemIdx, f32)> {
        let mut out: Vec<_> = self.iter().collect();
        out.sort_unstable_by_key(|f| f.0);
        out
    }

    fn home(&self, item: ItemIdx) -> usize {
        let bits = self.slots.len().trailing_zeros();
        ((u64::from(item).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> (64 - bits)) as usize
    }

    /// Puts `entries` (distinct items) into a fresh table of `capacity` slots.
    fn rebuild(&mut self, entries: &[(ItemIdx, f32)], capacity: usize) {
        self.slots.clear();
        self.slots.resize(capacity, (Self::EMPTY, 0.0));
        self.len = 0;
        for &(item, w) in entries {
            self.insert_new(item, w);
        }
    }

    /// Inserts an item known to be absent, with room to spare.
    fn insert_new(&mut self, item: ItemIdx, w: f32) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(item);
        while self.slots[i].0 != Self::EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = (item, w);
        self.len += 1;
    }

    /// Adds `w` to `item`'s weight, making room as described on the type.
    fn add(&mut self, item: ItemIdx, w: f32, max: usize) {
        if item == Self::EMPTY {
            return;
        }
        if self.slots.is_empty() {
            self.rebuild(&[], 8);
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(item);
        loop {
            let slot = &mut self.slots[i];
            if slot.0 == item {
                slot.1 += w;
                return;
            }
            if slot.0 == Self::EMPTY {
                break;
            }
            i = (i + 1) & mask;
        }
        if self.len >= max {
            let mut kept: Vec<(ItemIdx, f32)> = self.iter().collect();
            let keep = max / 2;
            if keep < kept.len() {
                kept.select_nth_unstable_by(keep, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                kept.truncate(keep);
            }
            let capacity = self.slots.len();
            self.rebuild(&kept, capacity);
            self.insert_new(item, w);
        } else if (self.len + 1) * 4 > self.slots.len() * 3 {
            let entries: Vec<(ItemIdx, f32)> = self.iter().collect();
            self.rebuild(&entries, self.slots.len() * 2);
            self.insert_new(item, w);
        } else {
            self.slots[i] = (item, w);
            self.len += 1;
        }
    }
}

thread_local! {
    /// Each thread's scratch for [`SignalModel::candidates`]: the candidates' sums
    /// land in one array slot per item instead of a hash map, and nothing is cleared
    /// between calls (a slot counts only when stamped with the current call).
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Per item `(co-occurrence weight, fitted score, stamp)`, and the items stamped by the
/// current call in the order first touched.
#[derive(Default)]
struct Scratch {
    slots: Vec<(f32, f32, u32)>,
    touched: Vec<ItemIdx>,
    stamp: u32,
}

impl Scratch {
    /// Starts a call: every slot stops counting.
    fn begin(&mut self) {
        self.touched.clear();
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            // Wrapped: old stamps could collide, so clear once every 2^32 calls.
            self.slots.fill((0.0, 0.0, 0));
            self.stamp = 1;
        }
    }

    /// The sums of `item` in this call, starting at zero.
    #[inline]
    fn entry(&mut self, item: ItemIdx) -> &mut (f32, f32, u32) {
        let i = item as usize;
        if i >= self.slots.len() {
            self.slots
                .resize((i + 1).next_power_of_two(), (0.0, 0.0, 0));
        }
        let slot = &mut self.slots[i];
        if slot.2 != self.stamp {
            *slot = (0.0, 0.0, self.stamp);
            self.touched.push(item);
        }
        slot
    }
}

impl SignalModel for Signals {
    fn observe(&self, event: &SignalEvent<'_>) {
        let ts = event.timestamp_ms;
        let purchase = *event.kind == EventKind::Purchase;
        // Negative feedback (a removal from the cart) is no interest in what follows.
        if *event.kind == EventKind::RemoveFromCart {
            return;
        }
        if event.learn {
            self.clock_ms.fetch_max(ts, Ordering::Relaxed);
        }
        // A known user's entry without cloning (allocating) the id.
        let mut u = match self.users.get_mut(event.user) {
            Some(u) => u,
            None => self.users.entry(event.user.clone()).or_default(),
        };
        let late = u.last_ms != 0 && ts < u.last_ms - self.config.basket_gap_ms;
        let known = u.bought(event.item) || u.recent.contains(&event.item);
        if purchase {
            self.observe_purchase(&mut u, event.item, ts, event.learn);
        }
        if !known && event.learn {
            self.slot(event.item).firsts.fetch_add(1, Ordering::Relaxed);
            self.totals.firsts.fetch_add(1, Ordering::Relaxed);
            if !late {
                self.count_followers(&u.recent, event.item);
            }
        }
        if !late {
            let keep = self.config.window.max(self.config.sources);
            if u.recent.back() != Some(&event.item) {
                let len = u.recent.len();
                if len == u.recent.capacity() {
                    u.recent.reserve_exact(growth(len, keep));
                }
                u.recent.push_back(event.item);
            }
            while u.recent.len() > keep {
                u.recent.pop_front();
            }
        }
        u.last_ms = u.last_ms.max(ts);
        u.touched_ms = self.wall_ms.load(Ordering::Relaxed);
    }

    fn forget_user(&self, user: &UserId) {
        self.users.remove(user);
    }

    fn maintain(&self) {
        self.expire(reflex_core::types::now_ms());
    }

    fn candidates(
        &self,
        user: &UserId,
        recent: &[ItemIdx],
        k: usize,
        filter: &dyn Fn(ItemIdx) -> bool,
    ) -> Vec<SignalCandidate> {
        // Read in place (a shard's read lock, no copy of the user's lists).
        let held = self.users.get(user);
        let none = UserSignals::default();
        let u: &UserSignals = held.as_deref().unwrap_or(&none);
        let mut out: Vec<SignalCandidate> = Vec::new();
        let global_rate = self.global_rebuy_rate();
        for it in &u.items {
            if !filter(it.item) {
                continue;
            }
            let p = self.repeat_probability(u, it, global_rate);
            if p > 0.0 {
                out.push(SignalCandidate {
                    item: it.item,
                    probability: p,
                    source: SignalSource::Repeat,
                });
            }
        }

        // What follows the latest items, for items the user never bought: the
        // co-occurrence estimate P1, blended with the fitted item-to-item weights
        // (normalised over the eligible candidates) once a refit installed them.
        let firsts = self.totals.firsts.load(Ordering::Relaxed).max(1) as f32;
        let kappa = self.config.smoothing;
        // Per candidate: (co-occurrence weight, fitted score), summed in this thread's
        // dense scratch (one array slot per item, no hashing).
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.begin();
            let (mut wsum, mut prior) = (0.0f32, 0.0f32);
            let mut w = 1.0f32;
            let mut used: Vec<ItemIdx> = Vec::with_capacity(self.config.sources);
            for &source in recent.iter().take(self.config.sources) {
                if used.contains(&source) {
                    w *= self.config.source_decay;
                    continue;
                }
                used.push(source);
                if let Some(slot) = self.slot_if_any(source) {
                    let st = slot.stats.lock();
                    let norm = w / (st.out_mass + kappa);
                    for (j, c) in st.followers.iter() {
                        scratch.entry(j).0 += c * norm;
                    }
                    prior += kappa * norm;
                } else {
                    prior += w;
                }
                wsum += w;
                w *= self.config.source_decay;
            }
            let share_fitted = self.config.item_item_share;
            let fitted = self.item_item.load();
            if let (Some(fitted), true) = (fitted.as_deref(), share_fitted > 0.0) {
                used.clear();
                let mut w = 1.0f32;
                for &source in recent.iter().take(self.config.item_item_sources) {
                    if !used.contains(&source) {
                        used.push(source);
                        for &(j, b) in fitted.rows.get(&source).into_iter().flatten() {
                            scratch.entry(j).1 += w * b;
                        }
                    }
                    w *= self.config.item_item_decay;
                }
            }
            if wsum <= 0.0 || scratch.touched.is_empty() {
                return;
            }
            let baskets = self.totals.baskets.load(Ordering::Relaxed) as f32;
            let purchases = self.totals.purchases.load(Ordering::Relaxed) as f32;
            // Expected basket size; a stream of views alone has no baskets: one event.
            let size = if baskets > 0.0 && u.baskets > 0 {
                (u.purchases as f32 + K_BASKET * purchases / baskets)
                    / (u.baskets as f32 + K_BASKET)
            } else {
                1.0
            };
            let share = self.global_repeat_share();
            let mine = (u.repeats as f32 + K_SHARE * share) / (u.eligible as f32 + K_SHARE);
            let scale = size * (1.0 - mine) / (1.0 - share).max(1e-6);
            let Scratch { touched, slots, .. } = scratch;
            touched.retain(|&j| !u.bought(j) && filter(j));
            let fitted_total: f32 = touched.iter().map(|&j| slots[j as usize].1).sum();
            let share_fitted = if fitted_total > 0.0 {
                share_fitted
            } else {
                0.0
            };
            // Each candidate's expected count; the probability below grows with it, so
            // only the best k are turned into probabilities.
            let mut mixes: Vec<(ItemIdx, f32)> = touched
                .iter()
                .map(|&j| {
                    let (c, e, _) = slots[j as usize];
                    let q = self
                        .slot_if_any(j)
                        .map_or(0.0, |s| s.firsts.load(Ordering::Relaxed) as f32)
                        / firsts;
                    let p1 = (c + prior * q) / wsum;
                    let mix = if share_fitted > 0.0 {
                        (1.0 - share_fitted) * p1 + share_fitted * e / fitted_total
                    } else {
                        p1
                    };
                    (j, mix)
                })
                .collect();
            if k > 0 && mixes.len() > k {
                mixes.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                mixes.truncate(k);
            }
            out.extend(mixes.into_iter().map(|(j, mix)| SignalCandidate {
                item: j,
                // An expected count in the next basket; the chance of at least one
                // (Poisson), so it stays a probability beside the repeats.
                probability: -(-scale * mix).exp_m1(),
                source: SignalSource::Sequence,
            }));
        });
        // The best k in linear time, then only they sorted.
        let order = |a: &SignalCandidate, b: &SignalCandidate| {
            b.probability
                .total_cmp(&a.probability)
                .then(a.item.cmp(&b.item))
        };
        if k == 0 {
            out.clear();
        } else if out.len() > k {
            out.select_nth_unstable_by(k - 1, order);
            out.truncate(k);
        }
        out.sort_by(order);
        out
    }

    fn install_item_item(&self, rows: ItemItemWeights) {
        let rows = rows
            .into_iter()
            .filter(|(_, targets)| !targets.is_empty())
            .map(|(source, targets)| (source, targets.into_boxed_slice()))
            .collect();
        self.item_item.store(Some(Arc::new(ItemItem { rows })));
    }

    fn set_item_category(&self, item: ItemIdx, category: Option<&str>) {
        let number = category.map_or(0, |name| self.categories.number(name));
        let before = self.categories.set(item, number);
        if let (true, Some(slot)) = (before != number, self.slot_if_any(item)) {
            // The item's history moves with it.
            self.count_in_category(slot, before, false);
            self.count_in_category(slot, number, true);
        }
    }

    fn rebought(&self, item: ItemIdx) -> bool {
        self.rebuy_rate(item, self.global_rebuy_rate()) >= MIN_REBUY_RATE
    }

    fn related(&self, item: ItemIdx, k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        let Some(slot) = self.slot_if_any(item) else {
            return Vec::new();
        };
        let st = slot.stats.lock();
        let norm = st.out_mass + self.config.smoothing;
        let mut out: Vec<Scored> = st
            .followers
            .iter()
            .filter(|&(j, _)| j != item && filter(j))
            .map(|(j, c)| Scored {
                item: j,
                score: c / norm,
            })
            .collect();
        drop(st);
        out.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item)));
        out.truncate(k);
        out
    }

    fn export(&self, id_of: &dyn Fn(ItemIdx) -> Option<ItemId>) -> Result<Vec<u8>> {
        let mut ids: Vec<ItemId> = Vec::new();
        let mut local: HashMap<ItemIdx, u32> = HashMap::new();
        let mut name = |idx: ItemIdx| -> Option<u32> {
            if let Some(&n) = local.get(&idx) {
                return Some(n);
            }
            let id = id_of(idx)?;
            let n = ids.len() as u32;
            ids.push(id);
            local.insert(idx, n);
            Some(n)
        };
        let mut items = Vec::new();
        for (idx, slot) in self.items.iter() {
            let st = slot.stats.lock().clone();
            let firsts = slot.firsts.load(Ordering::Relaxed);
            let chances = slot.chances.load(Ordering::Relaxed);
            if firsts == 0 && st.followers.is_empty() && chances == 0 {
                continue;
            }
            let Some(me) = name(idx as ItemIdx) else {
                continue;
            };
            let followers = st
                .followers
                .sorted()
                .into_iter()
                .filter_map(|(j, c)| Some((name(j)?, c)))
                .collect();
            items.push(StoredItem {
                item: me,
                firsts,
                followers,
                out_mass: st.out_mass,
                chances,
                repeats: slot.repeats.load(Ordering::Relaxed),
            });
        }
        let mut users = Vec::with_capacity(self.users.len());
        for entry in &self.users {
            let mut u = entry.value().clone();
            u.recent = u
                .recent
                .iter()
                .filter_map(|&i| name(i))
                .collect::<VecDeque<_>>();
            u.items = u
                .items
                .iter()
                .filter_map(|it| {
                    Some(UserItem {
                        item: name(it.item)?,
                        ..*it
                    })
                })
                .collect();
            users.push((entry.key().clone(), u));
        }
        let mut fitted: Vec<(u32, Vec<(u32, f32)>)> = Vec::new();
        if let Some(ii) = self.item_item.load().as_deref() {
            let mut sources: Vec<_> = ii.rows.iter().collect();
            sources.sort_unstable_by_key(|(s, _)| **s);
            for (&source, row) in sources {
                let Some(me) = name(source) else { continue };
                let row: Vec<(u32, f32)> = row
                    .iter()
                    .filter_map(|&(j, w)| Some((name(j)?, w)))
                    .collect();
                fitted.push((me, row));
            }
        }
        let t = &self.totals;
        let stored = StoredSignals {
            format: STORED_FORMAT,
            clock_ms: self.clock_ms.load(Ordering::Relaxed),
            totals: [
                t.firsts.load(Ordering::Relaxed),
                t.purchases.load(Ordering::Relaxed),
                t.baskets.load(Ordering::Relaxed),
                t.eligible.load(Ordering::Relaxed),
                t.repeats.load(Ordering::Relaxed),
                t.chances.load(Ordering::Relaxed),
                t.rebought.load(Ordering::Relaxed),
            ],
            ids,
            items,
            users,
        };
        let mut bytes = postcard::to_allocvec(&stored)
            .map_err(|e| Error::storage("encoding the signals", e))?;
        // The fitted weights follow the counts, so a snapshot from before they existed
        // (nothing after the counts) still reads.
        if !fitted.is_empty() {
            bytes.extend(
                postcard::to_allocvec(&fitted)
                    .map_err(|e| Error::storage("encoding the item-to-item weights", e))?,
            );
        }
        Ok(bytes)
    }

    fn import(
        &self,
        bytes: &[u8],
        intern: &dyn Fn(&ItemId) -> ItemIdx,
        keep: ImportUsers,
    ) -> Result<()> {
        let (stored, rest): (StoredSignals, &[u8]) = postcard::take_from_bytes(bytes)
            .map_err(|e| Error::storage("decoding the signals", e))?;
        let fitted_stored: Vec<(u32, Vec<(u32, f32)>)> = if rest.is_empty() {
            Vec::new()
        } else {
            postcard::from_bytes(rest)
                .map_err(|e| Error::storage("decoding the item-to-item weights", e))?
        };
        if stored.format != STORED_FORMAT {
            return Err(Error::invalid(
                "signals",
                format!("snapshot format {} is not {STORED_FORMAT}", stored.format),
            ));
        }
        let idx: Vec<ItemIdx> = stored.ids.iter().map(intern).collect();
        let map = |n: u32| -> Result<ItemIdx> {
            idx.get(n as usize).copied().ok_or_else(|| {
                Error::invalid(
                    "signals",
                    format!("snapshot names item #{n} it does not hold"),
                )
            })
        };
        // Check everything before replacing anything.
        let mut items = Vec::with_capacity(stored.items.len());
        for it in &stored.items {
            let mut followers = it
                .followers
                .iter()
                .map(|&(j, c)| Ok((map(j)?, c)))
                .collect::<Result<Vec<_>>>()?;
            followers.sort_unstable_by_key(|f| f.0);
            items.push((map(it.item)?, it, followers));
        }
        let mut fitted = Vec::with_capacity(fitted_stored.len());
        for (source, row) in &fitted_stored {
            let row = row
                .iter()
                .map(|&(j, w)| Ok((map(j)?, w)))
                .collect::<Result<Vec<_>>>()?;
            fitted.push((map(*source)?, row));
        }
        let mut users = Vec::with_capacity(stored.users.len());
        for (user, u) in &stored.users {
            let mut u = u.clone();
            u.recent = u.recent.iter().map(|&n| map(n)).collect::<Result<_>>()?;
            for it in &mut u.items {
                it.item = map(it.item)?;
            }
            u.items.sort_unstable_by_key(|it| it.item);
            users.push((user.clone(), u));
        }
        for slot in self.items.iter().map(|(_, s)| s) {
            slot.firsts.store(0, Ordering::Relaxed);
            slot.chances.store(0, Ordering::Relaxed);
            slot.repeats.store(0, Ordering::Relaxed);
            *slot.stats.lock() = ItemStats::default();
        }
        for (item, it, followers) in items {
            let slot = self.slot(item);
            slot.firsts.store(it.firsts, Ordering::Relaxed);
            slot.chances.store(it.chances, Ordering::Relaxed);
            slot.repeats.store(it.repeats, Ordering::Relaxed);
            *slot.stats.lock() = ItemStats {
                followers: Followers::from_entries(&followers),
                out_mass: it.out_mass,
            };
        }
        // The categories' counters are their items' sums; the categories themselves
        // come from the catalog, not the snapshot.
        for c in self.categories.rates.iter().map(|(_, c)| c) {
            c.chances.store(0, Ordering::Relaxed);
            c.repeats.store(0, Ordering::Relaxed);
        }
        for (item, slot) in self.items.iter() {
            self.count_in_category(slot, self.categories.of(item as ItemIdx), true);
        }
        if keep == ImportUsers::Restore {
            self.users.clear();
            for (user, u) in users {
                self.users.insert(user, u);
            }
        }
        let t = &self.totals;
        for (counter, v) in [
            &t.firsts,
            &t.purchases,
            &t.baskets,
            &t.eligible,
            &t.repeats,
            &t.chances,
            &t.rebought,
        ]
        .into_iter()
        .zip(stored.totals)
        {
            counter.store(v, Ordering::Relaxed);
        }
        self.clock_ms.store(stored.clock_ms, Ordering::Relaxed);
        if fitted.is_empty() {
            self.item_item.store(None);
        } else {
            self.install_item_item(fitted);
        }
        Ok(())
    }
}

/// Version of [`StoredSignals`]; a snapshot of another is refused, not misread.
const STORED_FORMAT: u32 = 1;

/// What [`Signals::export`] writes: items by position in `ids`.
#[derive(Serialize, Deserialize)]
struct StoredSignals {
    format: u32,
    clock_ms: i64,
    totals: [u64; 7],
    ids: Vec<ItemId>,
    items: Vec<StoredItem>,
    users: Vec<(UserId, UserSignals)>,
}

#[derive(Serialize, Deserialize)]
struct StoredItem {
    item: u32,
    firsts: u64,
    followers: Vec<(u32, f32)>,
    out_mass: f32,
    chances: u64,
    repeats: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    fn user(name: &str) -> UserId {
        UserId::parse(name, "user_id").unwrap()
    }

    /// Names item `i` as `item-i`, as a snapshot's exporter would.
    fn item_name(i: ItemIdx) -> Option<ItemId> {
        ItemId::parse(&format!("item-{i}"), "item_id").ok()
    }

    /// Threads growing the item slots at once (ingest streams meeting new items) each
    /// get their element, never one whose push is still in flight on another thread.
    #[test]
    fn slots_grown_by_racing_threads_are_always_there() {
        for _ in 0..20 {
            let vec: boxcar::Vec<AtomicU32> = boxcar::Vec::new();
            std::thread::scope(|scope| {
                for t in 0..4u32 {
                    let vec = &vec;
                    scope.spawn(move || {
                        for idx in 0..20_000 {
                            grown_to(vec, idx, || AtomicU32::new(0))
                                .fetch_add(t, Ordering::Relaxed);
                        }
                    });
                }
            });
            assert!(vec.count() >= 20_000);
            assert_eq!(vec.iter().filter(|(i, _)| *i < 20_000).count(), 20_000);
        }
    }

    /// The number of an item named by [`item_name`].
    fn item_number(id: &ItemId) -> ItemIdx {
        id.as_str()
            .trim_start_matches("item-")
            .parse::<ItemIdx>()
            .unwrap()
    }

    fn buy(s: &Signals, who: &str, item: ItemIdx, ts: i64) {
        s.observe(&SignalEvent {
            user: &user(who),
            item,
            kind: &EventKind::Purchase,
            timestamp_ms: ts,
            learn: true,
        });
    }

    fn view(s: &Signals, who: &str, item: ItemIdx, ts: i64) {
        s.observe(&SignalEvent {
            user: &user(who),
            item,
            kind: &EventKind::View,
            timestamp_ms: ts,
            learn: true,
        });
    }

    /// The user's latest items, most recent first, as a profile would give them.
    fn latest(s: &Signals, who: &str) -> Vec<ItemIdx> {
        s.users
            .get(&user(who))
            .map(|u| u.recent.iter().rev().copied().collect())
            .unwrap_or_default()
    }

    fn ranked(s: &Signals, who: &str) -> Vec<(ItemIdx, SignalSource)> {
        s.candidates(&user(who), &latest(s, who), 10, &|_| true)
            .into_iter()
            .map(|c| (c.item, c.source))
            .collect()
    }

    /// 300 shoppers buy a sofa (2) once, and every week for ten weeks milk (1) and
    /// something they never buy again (numbered from 1000): most of what is bought is
    /// not bought again, as in a real shop.
    fn grocery() -> Signals {
        let s = Signals::new(SignalsConfig::default()).unwrap();
        for u in 0..300i64 {
            let who = format!("s{u}");
            buy(&s, &who, 2, u);
            for week in 0..10i64 {
                let t = week * 7 * DAY + u;
                buy(&s, &who, 1, t);
                buy(&s, &who, 1000 + (u * 10 + week) as ItemIdx, t + 1);
            }
        }
        s
    }

    #[test]
    fn a_full_follower_table_keeps_the_heavier_half_and_counts_exactly() {
        let mut f = Followers::default();
        for i in 0..10u32 {
            f.add(i, (i + 1) as f32, 10);
        }
        f.add(3, 0.5, 10);
        assert_eq!(f.len(), 10);
        assert_eq!(f.sorted()[3], (3, 4.5));
        // Full: the five heaviest stay with their counts, the newcomer starts from its own.
        f.add(100, 1.0, 10);
        assert_eq!(
            f.sorted(),
            vec![
                (5, 6.0),
                (6, 7.0),
                (7, 8.0),
                (8, 9.0),
                (9, 10.0),
                (100, 1.0)
            ]
        );
        // Growing past its first capacity keeps every count.
        let mut g = Followers::default();
        for round in 0..3 {
            for i in 0..1000u32 {
                g.add(i * 7919, 1.0, 5000);
            }
            assert_eq!(g.len(), 1000, "round {round}");
        }
        assert!(g.iter().all(|(_, w)| w == 3.0));
        assert_eq!(Followers::from_entries(&g.sorted()).sorted(), g.sorted());
    }

    #[test]
    fn a_full_purchase_list_drops_its_stalest_quarter_at_once() {
        let mut items: Vec<UserItem> = (0..8u32)
            .map(|i| UserItem {
                item: i,
                first: 0,
                last: 10 - i,
                evidence: 0.0,
                evidence_at: 0,
            })
            .collect();
        evict_stalest(&mut items, 8);
        let kept: Vec<ItemIdx> = items.iter().map(|it| it.item).collect();
        assert_eq!(
            kept,
            vec![0, 1, 2, 3, 4, 5],
            "items 6 and 7 were bought longest ago"
        );
    }

    #[test]
    fn milk_comes_back_and_the_sofa_does_not() {
        let s = grocery();
        assert!(s.rebought(1), "milk is bought again");
        assert!(!s.rebought(2), "nobody buys a second sofa");
        // A new shopper buys both, then something else a week later: milk is proposed
        // first, at about its rate halved by one basket without it; the sofa hardly.
        buy(&s, "new", 2, 80 * DAY);
        buy(&s, "new", 1, 80 * DAY + 1);
        buy(&s, "new", 3, 87 * DAY);
        let got = s.candidates(&user("new"), &latest(&s, "new"), 10, &|_| true);
        assert_eq!(
            (got[0].item, got[0].source),
            (1, SignalSource::Repeat),
            "{got:?}"
        );
        assert!(
            got[0].probability > 0.3 && got[0].probability <= 1.0,
            "{got:?}"
        );
        let sofa = got
            .iter()
            .find(|c| c.item == 2)
            .map_or(0.0, |c| c.probability);
        assert!(sofa < 0.01, "{got:?}");
    }

    #[test]
    fn what_follows_what_is_proposed_after_the_latest_item() {
        let s = Signals::new(SignalsConfig::default()).unwrap();
        // Everyone who views 10 goes on to 11, never to 12 first.
        for u in 0..10 {
            let who = format!("v{u}");
            view(&s, &who, 10, u * HOUR);
            view(&s, &who, 11, u * HOUR + 1);
            view(&s, &who, 12, u * HOUR + 2);
        }
        view(&s, "me", 10, 100 * HOUR);
        let got = ranked(&s, "me");
        assert_eq!(got.first(), Some(&(11, SignalSource::Sequence)), "{got:?}");
        assert!(
            got.iter().all(|&(i, _)| i != 10),
            "the source itself is not proposed"
        );
        let related = s.related(10, 5, &|_| true);
        assert_eq!(related[0].item, 11);
        assert!(related[0].score > related[1].score);
        // The filter is obeyed.
        let none = s.candidates(&user("me"), &latest(&s, "me"), 10, &|i| i != 11);
        assert!(none.iter().all(|c| c.item != 11));
    }

    #[test]
    fn late_events_neither_open_baskets_nor_follow_anything() {
        let s = grocery();
        buy(&s, "late", 1, 100 * DAY);
        buy(&s, "late", 1, 107 * DAY);
        let before = s.users.get(&user("late")).unwrap().clone();
        // A purchase from a month earlier arrives now.
        buy(&s, "late", 5, 70 * DAY);
        let after = s.users.get(&user("late")).unwrap().clone();
        assert_eq!(after.baskets, before.baskets);
        assert_eq!(after.last_purchase_ms, 107 * DAY);
        assert_eq!(
            after.recent, before.recent,
            "ordering unknown: follows nothing"
        );
        assert!(s.related(1, 10, &|_| true).iter().all(|r| r.item != 5));
    }

    #[test]
    fn memory_per_user_is_bounded_and_erase_forgets_everything() {
        let config = SignalsConfig {
            max_user_items: 5,
            ..SignalsConfig::default()
        };
        let s = Signals::new(config).unwrap();
        for i in 0..50 {
            buy(&s, "big", i, i64::from(i) * DAY);
        }
        let u = s.users.get(&user("big")).unwrap().clone();
        assert_eq!(u.items.len(), 5);
        assert!(
            u.items.iter().all(|it| it.item >= 45),
            "the latest are kept"
        );
        assert!(u.recent.len() <= 10);
        s.forget_user(&user("big"));
        assert!(ranked(&s, "big").is_empty());
        assert_eq!(s.users(), 0);
    }

    #[test]
    fn users_inactive_past_the_ttl_are_forgotten() {
        let s = Signals::new(SignalsConfig::default()).unwrap();
        let start = reflex_core::types::now_ms();
        // Event times do not matter (a replay of old data keeps everyone), the wall
        // clock of the last event does.
        buy(&s, "old", 1, 0);
        s.expire(start + 20 * DAY);
        buy(&s, "recent", 1, DAY);
        s.expire(start + 25 * DAY);
        assert_eq!(s.users(), 2, "nobody is past 30 days yet");
        s.expire(start + 40 * DAY);
        assert_eq!(s.users(), 1);
        assert!(s.users.contains_key(&user("recent")));
    }

    #[test]
    fn held_out_users_keep_their_history_but_teach_nobody() {
        let s = Signals::new(SignalsConfig::default()).unwrap();
        for t in 0..3 {
            s.observe(&SignalEvent {
                user: &user("held"),
                item: 7,
                kind: &EventKind::Purchase,
                timestamp_ms: t * DAY,
                learn: false,
            });
        }
        assert_eq!(s.totals.purchases.load(Ordering::Relaxed), 0);
        assert_eq!(ranked(&s, "held").len(), 1, "their own repeat is kept");
    }

    /// An item nobody has bought twice yet takes its category's repurchase rate: a new
    /// brand of milk is bought again, a new armchair is not, and an item without a
    /// category keeps everyone's rate. A snapshot restores the categories' counters from
    /// their items.
    #[test]
    fn a_new_item_takes_its_categorys_repurchase_rate() {
        let s = grocery();
        s.set_item_category(1, Some("dairy"));
        s.set_item_category(2, Some("furniture"));
        s.set_item_category(3, Some("dairy"));
        s.set_item_category(4, Some("furniture"));
        assert!(s.rebought(1) && !s.rebought(2));
        assert!(s.rebought(3), "new milk: dairy is bought again");
        assert!(!s.rebought(4), "new armchair: furniture is not");
        assert!(
            s.rebought(5),
            "no category: everyone's rate, which milk lifts"
        );

        let bytes = s.export(&item_name).unwrap();
        let t = Signals::new(SignalsConfig::default()).unwrap();
        t.set_item_category(2, Some("furniture"));
        t.set_item_category(4, Some("furniture"));
        t.import(&bytes, &item_number, ImportUsers::Restore)
            .unwrap();
        assert!(
            !t.rebought(4),
            "the category's counters come back from its items"
        );

        // The sofa leaves furniture, taking its history along: the armchair's category
        // now knows nothing, so it takes everyone's rate.
        s.set_item_category(2, None);
        assert!(s.rebought(4));
    }

    /// Importing with the live users (a rollback) restores what was learnt about items
    /// and leaves every user's own items as they are now.
    #[test]
    fn an_import_keeping_live_users_restores_items_only() {
        let s = grocery();
        let before = s.export(&item_name).unwrap();
        // Since the snapshot: a newcomer buys milk, then something nobody bought before.
        buy(&s, "new", 1, 80 * DAY);
        buy(&s, "new", 5000, 80 * DAY + 1);
        let follows = |s: &Signals| s.related(1, 1000, &|_| true).iter().any(|f| f.item == 5000);
        assert!(follows(&s));
        s.import(&before, &item_number, ImportUsers::KeepLive)
            .unwrap();
        assert!(!follows(&s), "the items' statistics are the snapshot's");
        assert_eq!(s.users(), 301, "the newcomer is still known");
        assert_eq!(latest(&s, "new"), [5000, 1]);
        s.import(&before, &item_number, ImportUsers::Restore)
            .unwrap();
        assert_eq!(s.users(), 300);
        assert!(latest(&s, "new").is_empty());
    }

    #[test]
    fn a_snapshot_restores_every_answer_under_other_item_numbers() {
        let s = grocery();
        view(&s, "me", 1, 60 * DAY);
        view(&s, "me", 3, 60 * DAY + 1);
        s.install_item_item(vec![(3, vec![(50, 0.5), (51, 0.25)])]);
        assert!(ranked(&s, "me").contains(&(50, SignalSource::Sequence)));
        let bytes = s.export(&item_name).unwrap();
        let t = Signals::new(SignalsConfig::default()).unwrap();
        // The other process numbers items differently: idx + 100.
        t.import(
            &bytes,
            &|id: &ItemId| item_number(id) + 100,
            ImportUsers::Restore,
        )
        .unwrap();
        for who in ["s3", "me"] {
            let a: Vec<_> = s
                .candidates(&user(who), &latest(&s, who), 10, &|_| true)
                .into_iter()
                .map(|c| (c.item + 100, c.probability))
                .collect();
            let b: Vec<_> = t
                .candidates(&user(who), &latest(&t, who), 10, &|_| true)
                .into_iter()
                .map(|c| (c.item, c.probability))
                .collect();
            assert_eq!(a, b, "{who}");
        }
        assert!(t.rebought(101) && !t.rebought(102));
        assert_eq!(t.users(), s.users());
        assert!(
            t.import(&bytes[..bytes.len() / 2], &|_| 0, ImportUsers::Restore)
                .is_err()
        );
        // A snapshot without fitted weights (as every one before them) still reads, and
        // leaves none behind.
        let without = grocery();
        view(&without, "me", 1, 60 * DAY);
        view(&without, "me", 3, 60 * DAY + 1);
        let bytes = without.export(&item_name).unwrap();
        t.import(&bytes, &item_number, ImportUsers::Restore)
            .unwrap();
        assert!(!ranked(&t, "me").iter().any(|&(i, _)| i == 50 || i == 51));
    }

    #[test]
    fn fitted_item_to_item_weights_propose_what_the_counts_never_saw() {
        let with_share = |share: f32| {
            let s = Signals::new(SignalsConfig {
                item_item_share: share,
                ..SignalsConfig::default()
            })
            .unwrap();
            // Everyone who views 10 goes on to 11; nobody was ever seen going to 20.
            for u in 0..10 {
                let who = format!("v{u}");
                view(&s, &who, 10, u * HOUR);
                view(&s, &who, 11, u * HOUR + 1);
            }
            view(&s, "me", 10, 100 * HOUR);
            buy(&s, "me", 21, 100 * HOUR + 1);
            view(&s, "me", 10, 100 * HOUR + 2);
            // The fit says 10 predicts 20 strongly, and 21, which "me" bought.
            s.install_item_item(vec![(10, vec![(20, 2.0), (21, 1.0)])]);
            s
        };
        let s = with_share(0.4);
        let got = ranked(&s, "me");
        assert!(got.contains(&(20, SignalSource::Sequence)), "{got:?}");
        assert!(got.contains(&(11, SignalSource::Sequence)), "{got:?}");
        assert!(
            !got.contains(&(21, SignalSource::Sequence)),
            "what the user bought is not proposed as new: {got:?}"
        );
        let filtered = s.candidates(&user("me"), &latest(&s, "me"), 10, &|i| i != 20);
        assert!(filtered.iter().all(|c| c.item != 20));
        // A share of 0 leaves the fitted weights unused.
        let got = ranked(&with_share(0.0), "me");
        assert!(!got.iter().any(|&(i, _)| i == 20), "{got:?}");
    }

    #[test]
    fn settings_out_of_range_are_refused_by_name() {
        for (config, name) in [
            (
                SignalsConfig {
                    basket_decay: 0.0,
                    ..SignalsConfig::default()
                },
                "basket_decay",
            ),
            (
                SignalsConfig {
                    window: 0,
                    ..SignalsConfig::default()
                },
                "window",
            ),
            (
                SignalsConfig {
                    smoothing: f32::NAN,
                    ..SignalsConfig::default()
                },
                "smoothing",
            ),
            (
                SignalsConfig {
                    item_item_share: 1.5,
                    ..SignalsConfig::default()
                },
                "item_item_share",
            ),
        ] {
            let err = Signals::new(config).err().unwrap().to_string();
            assert!(err.contains(name), "{err}");
        }
    }
}
