//! Time-decayed popularity ("trending"), kept per item with lazy exponential decay.
//!
//! An item's popularity at time `T` is `Σ wₑ · 2^(−(T − tₑ)/h)` over its positive events
//! `e`, with half-life `h`. Every item decays by the same factor, so the store keeps the
//! time-independent `log2 Σ wₑ · 2^(tₑ/h)` per item, updated with one lock-free
//! log-add-exp on each event; ranking never needs a decay pass, and the score at `T` is
//! `2^(stored − T/h)`. Keeping the log avoids the overflow of the anchored sum.
//!
//! Top-k is served from a cached list of the best [`crate::MfConfig::popular_cache`]
//! items, refreshed by whichever `observe` finds it due (every
//! [`crate::MfConfig::popular_refresh_events`] events, and no more often than once per
//! items / 16 events, so the amortised cost stays under 16 item visits per event). A
//! refresh starts from the old list: entries whose score did not move keep their order,
//! and only the moved ones and the items that rose to its last score are sorted and
//! merged in (a fallen score rebuilds in full). A request whose filter rejects too much of
//! the list falls back to a full scan.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use reflex_core::{ItemIdx, Scored};

use crate::factors::{CHUNK_ITEMS, ItemFactors};
use crate::topk::TopK;

/// `log2(2^a + 2^b)`: how one event's `log2` weight adds to an item's stored popularity
/// (here and in the batch [`crate::TrainingSet`], so both keep the same figure).
#[inline]
pub(crate) fn log_add_exp2(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (1.0 + (lo - hi).exp2()).log2()
}

/// The cached list's order: best stored score first, ties to the lower item.
fn by_score(a: &(ItemIdx, f64), b: &(ItemIdx, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

#[derive(Default)]
struct TopList {
    /// Best first: (item, stored log score).
    items: Vec<(ItemIdx, f64)>,
    /// Whether it held every item with a positive popularity when built.
    complete: bool,
    /// Known items when built.
    known: usize,
}

/// Time-decayed popularity over an [`ItemFactors`] store's items.
pub(crate) struct Popularity {
    half_life_ms: f64,
    latest_ms: AtomicI64,
    top: ArcSwap<TopList>,
    since_refresh: AtomicU64,
    refresh_events: u64,
    cache: usize,
    /// Held by the thread rebuilding the list; guards its scratch bitset of the old
    /// list's members.
    refreshing: Mutex<Vec<u64>>,
}

impl Popularity {
    pub(crate) fn new(half_life_ms: i64, refresh_events: u64, cache: usize) -> Self {
        Self {
            half_life_ms: half_life_ms.max(1) as f64,
            latest_ms: AtomicI64::new(i64::MIN),
            top: ArcSwap::from_pointee(TopList::default()),
            since_refresh: AtomicU64::new(0),
            refresh_events: refresh_events.max(1),
            cache: cache.max(1),
            refreshing: Mutex::new(Vec::new()),
        }
    }

    /// Adds a positive event of weight `weight` at `ts_ms` to `idx` (which must be known).
    pub(crate) fn record(&self, store: &ItemFactors, idx: ItemIdx, weight: f32, ts_ms: i64) {
        self.latest_ms.fetch_max(ts_ms, Ordering::Relaxed);
        let chunk = if weight > 0.0 { store.chunk(idx) } else { None };
        if let Some(chunk) = chunk {
            let x = f64::from(weight).log2() + ts_ms as f64 / self.half_life_ms;
            let cell = &chunk.pop[idx as usize % CHUNK_ITEMS];
            // The closure always answers `Some`, so this cannot fail.
            let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(log_add_exp2(f64::from_bits(old), x).to_bits())
            });
        }
        let n = self.since_refresh.fetch_add(1, Ordering::Relaxed) + 1;
        let due = self.refresh_events.max(store.len() as u64 / 16);
        if n >= due {
            self.try_rebuild(store);
        }
    }

    /// Moves the latest event time seen forward to `ts_ms` (after loading a snapshot).
    pub(crate) fn saw(&self, ts_ms: i64) {
        self.latest_ms.fetch_max(ts_ms, Ordering::Relaxed);
    }

    /// The latest event time seen.
    pub(crate) fn latest_ms(&self) -> i64 {
        self.latest_ms.load(Ordering::Relaxed)
    }

    fn decayed(&self, log_score: f64, at_ms: i64) -> f32 {
        (log_score - at_ms as f64 / self.half_life_ms).exp2() as f32
    }

    /// Popularity of `idx` at event time `at_ms` (0 for an item never seen positively).
    pub(crate) fn score(&self, store: &ItemFactors, idx: ItemIdx, at_ms: i64) -> f32 {
        store.chunk(idx).map_or(0.0, |c| {
            self.decayed(
                f64::from_bits(c.pop[idx as usize % CHUNK_ITEMS].load(Ordering::Relaxed)),
                at_ms,
            )
        })
    }

    /// Brings the cached top list up to date unless another thread is already at it.
    ///
    /// Between two such updates scores only grow (an event adds to its item's), so
    /// the update starts from the old list: its entries whose score did not move stay
    /// in order, and only the ones that moved, plus the items outside it that rose to
    /// its last score, are sorted and merged in. That is exactly the list a full
    /// rebuild makes, for a sort of the few that moved instead of a selection over
    /// every item and a sort of the whole list. A score that fell (a snapshot loaded
    /// meanwhile) makes it a full rebuild.
    fn try_rebuild(&self, store: &ItemFactors) {
        if let Some(mut members) = self.refreshing.try_lock() {
            self.since_refresh.store(0, Ordering::Relaxed);
            if !self.update(store, &mut members) {
                self.rebuild(store);
            }
        }
    }

    /// The incremental update of [`Popularity::try_rebuild`]; `false` (nothing changed)
    /// when it cannot apply and a full rebuild is needed.
    fn update(&self, store: &ItemFactors, members: &mut Vec<u64>) -> bool {
        let prev = self.top.load();
        let Some(&(_, floor)) = prev.items.last() else {
            return false;
        };
        if prev.complete || prev.items.len() < self.cache {
            return false;
        }
        let known = store.len();
        // One bit per item index up to the old list's highest.
        let highest = prev.items.iter().map(|e| e.0 as usize).max().unwrap_or(0);
        members.clear();
        members.resize(highest / 64 + 1, 0);
        let mut stay = Vec::with_capacity(prev.items.len());
        let mut moved = Vec::new();
        for &(idx, old) in &prev.items {
            let now = store.popularity_log2(idx);
            if now < old || now.is_nan() {
                return false;
            }
            if let Some(word) = members.get_mut(idx as usize / 64) {
                *word |= 1 << (idx % 64);
            }
            if now == old {
                stay.push((idx, now));
            } else {
                moved.push((idx, now));
            }
        }
        store.for_each_known_pop(|idx, l| {
            let member = members
                .get(idx as usize / 64)
                .is_some_and(|w| w & (1 << (idx % 64)) != 0);
            if !member && l >= floor && l > f64::NEG_INFINITY {
                moved.push((idx, l));
            }
        });
        moved.sort_unstable_by(by_score);
        let mut items = Vec::with_capacity(self.cache);
        let (mut a, mut b) = (stay.iter().peekable(), moved.iter().peekable());
        while items.len() < self.cache {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if by_score(y, x).is_lt() => b.next(),
                (Some(_), _) => a.next(),
                (None, _) => b.next(),
            };
            match next {
                Some(&entry) => items.push(entry),
                None => break,
            }
        }
        self.top.store(Arc::new(TopList {
            items,
            complete: false,
            known,
        }));
        true
    }

    /// Rebuilds the cached top list now, from every item.
    pub(crate) fn rebuild(&self, store: &ItemFactors) {
        let known = store.len();
        let mut all = Vec::with_capacity(known);
        store.for_each_known_pop(|idx, l| {
            if l > f64::NEG_INFINITY {
                all.push((idx, l));
            }
        });
        let complete = all.len() <= self.cache;
        if !complete {
            all.select_nth_unstable_by(self.cache - 1, by_score);
            all.truncate(self.cache);
        }
        all.sort_unstable_by(by_score);
        self.top.store(Arc::new(TopList {
            items: all,
            complete,
            known,
        }));
    }

    /// The `k` most popular items passing `filter`, best first, scored at the latest
    /// event time.
    pub(crate) fn top(
        &self,
        store: &ItemFactors,
        k: usize,
        filter: &dyn Fn(ItemIdx) -> bool,
    ) -> Vec<Scored> {
        if k == 0 {
            return Vec::new();
        }
        let at = self.latest_ms();
        let top = self.top.load();
        let mut out = Vec::with_capacity(k);
        for &(item, l) in &top.items {
            if filter(item) {
                out.push(Scored {
                    item,
                    score: self.decayed(l, at),
                });
                if out.len() == k {
                    return out;
                }
            }
        }
        if top.complete && top.known == store.len() {
            return out;
        }
        // The cache ran out (or is stale): scan everything.
        let mut top = TopK::new(k);
        store.for_each_known_pop(|item, l| {
            if l != f64::NEG_INFINITY {
                top.offer(item, l, filter);
            }
        });
        top.into_sorted()
            .map(|(item, l)| Scored {
                item,
                score: self.decayed(l, at),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix;

    /// The rolling update keeps exactly the list a full rebuild makes, ties and late
    /// newcomers included, over a skewed random stream.
    #[test]
    fn the_rolling_update_keeps_exactly_the_full_rebuilds_list() {
        let store = ItemFactors::new(4, 0.1, 7);
        let rolling = Popularity::new(1000, 10, 20);
        let full = Popularity::new(1000, u64::MAX, 20);
        let mut rng = SplitMix::new(11);
        let mut updates = 0;
        for event in 0..20_000i64 {
            // Skewed items, a few weights, so scores tie and popular items change.
            let r = rng.next_u64();
            let item = ((r % 300) * ((r >> 20) % 300) / 300) as ItemIdx + (event / 100) as ItemIdx;
            assert!(store.ensure_known(item) || store.is_known(item));
            let weight = [1.0, 1.0, 2.0, 0.5][(r >> 40) as usize % 4];
            rolling.record(&store, item, weight, event * 10);
            if rolling.since_refresh.load(Ordering::Relaxed) == 0 {
                updates += 1;
                full.rebuild(&store);
                let (a, b) = (rolling.top.load(), full.top.load());
                assert_eq!(a.items, b.items, "after event {event}");
                assert_eq!(a.complete, b.complete);
            }
        }
        assert!(updates > 100, "{updates} updates");
    }

    /// A score that fell (a snapshot loaded) makes the update a full rebuild.
    #[test]
    fn a_fallen_score_rebuilds_in_full() {
        let store = ItemFactors::new(4, 0.1, 7);
        let pop = Popularity::new(1000, 1, 2);
        for item in 0..4u32 {
            store.ensure_known(item);
            for _ in 0..=item {
                pop.record(&store, item, 1.0, 0);
            }
        }
        let top = |p: &Popularity| p.top.load().items.iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(top(&pop), [3, 2]);
        store.set_popularity_log2(3, f64::NEG_INFINITY);
        pop.record(&store, 0, 1.0, 0);
        assert_eq!(top(&pop), [2, 0]);
    }
}
