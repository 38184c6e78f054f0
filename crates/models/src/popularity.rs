//! Time-decayed popularity ("trending"), kept per item with lazy exponential decay.
//!
//! An item's popularity at time `T` is `Σ wₑ · 2^(−(T − tₑ)/h)` over its positive events
//! `e`, with half-life `h`. Every item decays by the same factor, so the store keeps the
//! time-independent `log2 Σ wₑ · 2^(tₑ/h)` per item, updated with one lock-free
//! log-add-exp on each event; ranking never needs a decay pass, and the score at `T` is
//! `2^(stored − T/h)`. Keeping the log avoids the overflow of the anchored sum.
//!
//! Top-k is served from a cached list of the best [`crate::MfConfig::popular_cache`]
//! items, rebuilt by whichever `observe` finds it due (every
//! [`crate::MfConfig::popular_refresh_events`] events, and no more often than once per
//! items / 16 events, so the amortised cost stays under 16 item visits per event). A
//! request whose filter rejects too much of the list falls back to a full scan.

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
    refreshing: Mutex<()>,
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
            refreshing: Mutex::new(()),
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

    /// Rebuilds the cached top list unless another thread is already at it.
    fn try_rebuild(&self, store: &ItemFactors) {
        if let Some(_guard) = self.refreshing.try_lock() {
            self.since_refresh.store(0, Ordering::Relaxed);
            self.rebuild(store);
        }
    }

    /// Rebuilds the cached top list now.
    pub(crate) fn rebuild(&self, store: &ItemFactors) {
        let known = store.len();
        let mut all = Vec::with_capacity(known);
        store.for_each_known_pop(|idx, l| {
            if l > f64::NEG_INFINITY {
                all.push((idx, l));
            }
        });
        let by_score =
            |a: &(ItemIdx, f64), b: &(ItemIdx, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
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
