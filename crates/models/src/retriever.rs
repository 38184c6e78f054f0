//! Exact maximum-inner-product search over the model's item factors, optionally through
//! a compact copy of them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use reflex_core::{ItemIdx, Retriever, Scored};
use tracing::warn;

use crate::factors::ItemFactors;
use crate::mf::OnlineMf;
use crate::topk::TopK;

/// Scans every known item's vector and keeps the best `k` that pass the filter in a
/// bounded min-heap. The filter runs only for items that would enter the heap, so an
/// expensive filter costs little. Cost: items × factors per search.
///
/// Made with [`Self::with_scan_copy`], it scans a copy of the vectors rounded to 8 bits
/// (one scale per item) instead, refreshed by a background thread, and rescores the best
/// `max(4k, k + 32)` from the current vectors. The scan is bound by memory traffic (a
/// 64-factor store is 256 bytes an item, 2.5 MB at 10k items, more than the cache
/// holds); the copy is a quarter of it. Answers carry exact current scores; only which
/// candidates are rescored can lag the learner by the refresh interval. Items that
/// became known after the copy are scanned from the store, and a write from outside
/// learning ([`ItemFactors::set`]) sends searches to the full-precision scan until the
/// copy is rebuilt.
pub struct ExactRetriever {
    factors: Arc<ItemFactors>,
    copy: Option<Arc<CopyShared>>,
}

impl ExactRetriever {
    /// A retriever over `factors`, shared with the model that trains them, scanning the
    /// store itself (deterministic: what the evaluations use).
    pub fn new(factors: Arc<ItemFactors>) -> Self {
        Self {
            factors,
            copy: None,
        }
    }

    /// A retriever over `factors` that scans an 8-bit copy refreshed every `refresh`
    /// while searches come (see the type's documentation). Scans the store until the
    /// first copy is in, and for good when the refresh thread cannot start.
    pub fn with_scan_copy(factors: Arc<ItemFactors>, refresh: Duration) -> Self {
        let shared = Arc::new(CopyShared {
            factors: factors.clone(),
            copy: ArcSwapOption::empty(),
            wanted: AtomicBool::new(true),
            refresh,
        });
        let weak = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new()
            .name("reflex-scan-copy".into())
            .spawn(move || refresh_copies(&weak, refresh));
        let copy = match spawned {
            Ok(_) => Some(shared),
            Err(e) => {
                warn!(error = %e, "could not start the scan copy's refresh thread; scanning the full vectors");
                None
            }
        };
        Self { factors, copy }
    }

    /// A retriever over `model`'s item factors.
    pub fn for_model(model: &OnlineMf) -> Self {
        Self::new(model.item_factors().clone())
    }

    /// Builds the scan copy now, on this thread (for tests and benchmarks; the refresh
    /// thread does this in service). `false` without a copy.
    pub fn refresh_copy(&self) -> bool {
        match &self.copy {
            Some(shared) => {
                shared.rebuild();
                true
            }
            None => false,
        }
    }

    fn scan_store(&self, query: &[f32], k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        let mut top = TopK::new(k);
        self.factors.for_each_known(|item, stored| {
            let score = stored.dot(query);
            if score.is_finite() {
                top.offer(item, f64::from(score), filter);
            }
        });
        top.into_scored()
    }

    fn scan_copy(
        &self,
        copy: &ScanCopy,
        query: &[f32],
        k: usize,
        filter: &dyn Fn(ItemIdx) -> bool,
    ) -> Vec<Scored> {
        let (q, q_scale) = quantise_query(query, copy.stride);
        let mut candidates = TopK::new((4 * k).max(k + 32));
        let codes = copy.codes.chunks_exact(copy.stride);
        for ((&item, &scale), codes) in copy.items.iter().zip(&copy.scales).zip(codes) {
            let score = scale * q_scale * dot_i8(codes, &q) as f32;
            if score.is_finite() {
                candidates.offer(item, f64::from(score), filter);
            }
        }
        // Items that became known after the copy was made.
        for n in copy.items.len()..self.factors.len() {
            if let Some(item) = self.factors.known_at(n)
                && let Some(score) = self.factors.score(item, query)
                && score.is_finite()
            {
                candidates.offer(item, f64::from(score), filter);
            }
        }
        let mut top = TopK::new(k);
        for (item, _) in candidates.into_sorted() {
            if let Some(score) = self.factors.score(item, query)
                && score.is_finite()
            {
                top.offer(item, f64::from(score), &|_| true);
            }
        }
        top.into_scored()
    }
}

impl Retriever for ExactRetriever {
    /// Empty when `query` does not have the model's dimension.
    fn search(&self, query: &[f32], k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        if k == 0 || query.len() != self.factors.factors() {
            return Vec::new();
        }
        if let Some(shared) = &self.copy {
            let copy = shared.copy.load();
            match copy.as_deref() {
                Some(copy) if copy.generation == self.factors.generation() => {
                    if copy.built.elapsed() >= shared.refresh {
                        shared.wanted.store(true, Ordering::Relaxed);
                    }
                    return self.scan_copy(copy, query, k, filter);
                }
                _ => shared.wanted.store(true, Ordering::Relaxed),
            }
        }
        self.scan_store(query, k, filter)
    }

    fn len(&self) -> usize {
        self.factors.len()
    }
}

/// What the refresh thread and the searches share.
struct CopyShared {
    factors: Arc<ItemFactors>,
    copy: ArcSwapOption<ScanCopy>,
    /// A search found the copy missing, outdated or older than `refresh`.
    wanted: AtomicBool,
    refresh: Duration,
}

impl CopyShared {
    fn rebuild(&self) {
        self.copy
            .store(Some(Arc::new(ScanCopy::build(&self.factors))));
    }
}

/// The refresh thread: rebuilds the copy when searches want it, at most every `refresh`
/// and at most a tenth of the time (a rebuild that took 5 ms waits 50 ms for the next);
/// ends once the retriever is dropped.
fn refresh_copies(shared: &Weak<CopyShared>, refresh: Duration) {
    let mut wait = refresh;
    loop {
        std::thread::sleep(wait);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.wanted.swap(false, Ordering::Relaxed) {
            let started = Instant::now();
            shared.rebuild();
            wait = refresh.max(started.elapsed() * 10);
        }
    }
}

/// The item vectors rounded to `i8`, each with its own scale (`value ≈ code · scale`,
/// the largest magnitude at ±127), item-major, each padded to `stride` with zeros.
struct ScanCopy {
    /// Items covered: the first `items.len()` known items, in the order they became known.
    items: Vec<ItemIdx>,
    codes: Vec<i8>,
    scales: Vec<f32>,
    /// Codes per item: the dimension rounded up to 16.
    stride: usize,
    /// [`ItemFactors::generation`] when the copy began.
    generation: u64,
    built: Instant,
}

impl ScanCopy {
    fn build(factors: &ItemFactors) -> Self {
        // Read before the vectors: a write from outside learning during the build makes
        // the copy outdated at once rather than missing it.
        let generation = factors.generation();
        let n = factors.len();
        let stride = factors.factors().next_multiple_of(16);
        let mut copy = Self {
            items: Vec::with_capacity(n),
            codes: Vec::with_capacity(n * stride),
            scales: Vec::with_capacity(n),
            stride,
            generation,
            built: Instant::now(),
        };
        let mut v = vec![0.0f32; factors.factors()];
        for i in 0..n {
            let Some(item) = factors.known_at(i) else {
                break;
            };
            if !factors.read_into(item, &mut v) {
                v.fill(0.0);
            }
            let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            // A vector with a non-finite value gets scale NaN: its approximate score is
            // not finite, so it is skipped, as the full scan skips its score.
            let scale = if max.is_finite() {
                max / 127.0
            } else {
                f32::NAN
            };
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            copy.items.push(item);
            copy.scales.push(scale);
            copy.codes.extend(
                v.iter()
                    .map(|x| (x * inv).round().clamp(-127.0, 127.0) as i8),
            );
            copy.codes.resize(copy.items.len() * stride, 0);
        }
        copy
    }
}

/// `Σ codes[d] · query[d]` in integers, over equal lengths that are multiples of 16,
/// with independent accumulators so the loop vectorises (as 16-bit multiply-adds).
#[inline]
fn dot_i8(codes: &[i8], query: &[i16]) -> i32 {
    let mut acc = [0i32; 16];
    for (c, q) in codes.chunks_exact(16).zip(query.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += i32::from(c[l]) * i32::from(q[l]);
        }
    }
    acc.iter().sum()
}

/// `query` rounded to integers for [`dot_i8`] against codes of `stride` values, padded
/// with zeros to `stride`, and the scale that turns the integer dot back into `f32`.
/// The largest magnitude maps to at most 32767, less when `stride` is so long that the
/// sum could overflow an `i32`.
fn quantise_query(query: &[f32], stride: usize) -> (Vec<i16>, f32) {
    let limit = (i32::MAX as f32 / (127.0 * stride.max(1) as f32)).min(32767.0);
    let max = query.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 && max.is_finite() {
        max / limit
    } else {
        1.0
    };
    let mut out = vec![0i16; stride];
    for (o, x) in out.iter_mut().zip(query) {
        *o = (x / scale).round().clamp(-limit, limit) as i16;
    }
    (out, scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MfConfig;
    use reflex_core::{Observation, OnlineModel, UserId};

    #[test]
    fn exact_search_honours_the_filter_and_returns_k() {
        let model = OnlineMf::new(MfConfig {
            factors: 8,
            ..MfConfig::default()
        })
        .unwrap();
        let u = UserId::parse("u", "user_id").unwrap();
        for item in 0..200 {
            model.observe(&Observation {
                user: &u,
                item,
                weight: 1.0,
                timestamp_ms: 0,
            });
        }
        let retriever = ExactRetriever::for_model(&model);
        assert_eq!(retriever.len(), 200);
        let query: Vec<f32> = (0..8).map(|d| d as f32 - 3.5).collect();
        let odd = |i: ItemIdx| i % 2 == 1;
        let found = retriever.search(&query, 10, &odd);
        assert_eq!(found.len(), 10);
        assert!(found.iter().all(|s| odd(s.item)));
        // Same as brute force.
        let mut all: Vec<Scored> = (0..200)
            .filter(|i| odd(*i))
            .map(|item| Scored {
                item,
                score: crate::linalg::dot(&query, &model.item_vector(item).unwrap()),
            })
            .collect();
        all.sort_by(|a, b| b.score.total_cmp(&a.score));
        let want: Vec<ItemIdx> = all[..10].iter().map(|s| s.item).collect();
        let got: Vec<ItemIdx> = found.iter().map(|s| s.item).collect();
        assert_eq!(got, want);
        assert!(found.windows(2).all(|w| w[0].score >= w[1].score));
        // Fewer only when fewer pass; the best-scoring items being filtered out does not
        // shrink the answer.
        let few = retriever.search(&query, 10, &|i| i < 3);
        assert_eq!(few.len(), 3);
        let top_out = |i: ItemIdx| !want.contains(&i);
        assert_eq!(retriever.search(&query, 10, &top_out).len(), 10);
        assert!(retriever.search(&query, 0, &odd).is_empty());
        assert!(retriever.search(&[1.0, 2.0], 10, &odd).is_empty());
    }

    /// Items with clustered random vectors (64 factors), so near-ties are common.
    fn clustered(items: usize) -> Arc<ItemFactors> {
        let f = Arc::new(ItemFactors::new(64, 0.1, 3));
        let centre =
            |c: usize, d: usize| crate::rng::unit_f32(crate::rng::mix((c * 64 + d) as u64));
        for i in 0..items {
            let c = i % 25;
            let v: Vec<f32> = (0..64)
                .map(|d| {
                    centre(c, d)
                        + 0.3 * crate::rng::unit_f32(crate::rng::mix(1 << 40 | (i * 64 + d) as u64))
                })
                .collect();
            assert!(f.set(i as ItemIdx, &v));
        }
        f
    }

    fn query(n: u64) -> Vec<f32> {
        (0..64)
            .map(|d| crate::rng::unit_f32(crate::rng::mix(n << 20 | d)))
            .collect()
    }

    #[test]
    fn scan_copy_answers_as_the_full_scan() {
        let f = clustered(3000);
        let plain = ExactRetriever::new(f.clone());
        let copied = ExactRetriever::with_scan_copy(f.clone(), Duration::from_secs(3600));
        assert!(copied.refresh_copy());
        let filters: [&dyn Fn(ItemIdx) -> bool; 3] =
            [&|_| true, &|i| i % 3 == 0, &|i| i % 500 == 1];
        for n in 0..50 {
            let q = query(n);
            for filter in filters {
                let want = plain.search(&q, 10, filter);
                let got = copied.search(&q, 10, filter);
                assert_eq!(got, want, "query {n}");
            }
        }
    }

    #[test]
    fn scan_copy_follows_new_items_and_outside_writes_at_once() {
        let f = clustered(2000);
        let r = ExactRetriever::with_scan_copy(f.clone(), Duration::from_secs(3600));
        assert!(r.refresh_copy());
        let q = query(7);
        let all = |_: ItemIdx| true;
        // A new item, known only after the copy: scanned from the store.
        let big: Vec<f32> = q.iter().map(|x| x * 10.0).collect();
        let slot = 5000;
        let before = f.generation();
        assert!(f.set(slot, &big));
        assert!(f.generation() > before);
        assert_eq!(r.search(&q, 1, &all)[0].item, slot);
        // An outside write to a covered item: the copy no longer stands for the store,
        // so the full scan answers until it is rebuilt.
        let bigger: Vec<f32> = q.iter().map(|x| x * 20.0).collect();
        assert!(f.set(3, &bigger));
        assert_eq!(r.search(&q, 1, &all)[0].item, 3);
        assert!(r.refresh_copy());
        let top = r.search(&q, 2, &all);
        assert_eq!(
            top.iter().map(|s| s.item).collect::<Vec<_>>(),
            vec![3, slot]
        );
    }

    #[test]
    fn scan_copy_rescores_from_the_current_vectors() {
        let f = clustered(1000);
        let r = ExactRetriever::with_scan_copy(f.clone(), Duration::from_secs(3600));
        assert!(r.refresh_copy());
        let q = query(9);
        let all = |_: ItemIdx| true;
        let first = r.search(&q, 1, &all)[0];
        // A learning write (no generation bump) doubles the best item: the copy still
        // picks it as a candidate and its score is the current one.
        let mut v = f.get(first.item).unwrap();
        v.iter_mut().for_each(|x| *x *= 2.0);
        f.slot(first.item).unwrap().write(&v);
        let again = r.search(&q, 1, &all)[0];
        assert_eq!(again.item, first.item);
        assert!((again.score - 2.0 * first.score).abs() < 1e-3 * first.score.abs());
    }

    #[test]
    fn the_refresh_thread_builds_the_copy_when_searches_come() {
        let f = clustered(500);
        let r = ExactRetriever::with_scan_copy(f.clone(), Duration::from_millis(5));
        let q = query(1);
        let current = |r: &ExactRetriever| {
            r.copy.as_ref().is_some_and(|s| {
                s.copy
                    .load()
                    .as_ref()
                    .is_some_and(|c| c.generation == f.generation() && c.items.len() == 500)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !current(&r) && Instant::now() < deadline {
            r.search(&q, 5, &|_| true);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(current(&r), "no copy built within 10 s");
        // A write from outside learning outdates it; the next searches ask for another.
        assert!(f.set(0, &q));
        assert!(!current(&r));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !current(&r) && Instant::now() < deadline {
            r.search(&q, 5, &|_| true);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(current(&r), "the copy was not rebuilt after a write");
    }
}
