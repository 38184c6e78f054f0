//! [`AnnRetriever`]: a usearch HNSW index over the item factors, kept current by a
//! background drainer, rebuilt off to the side, searched with the caller's filter.
//!
//! Request path. `search` loads the current index through an `ArcSwap` (no lock), runs
//! usearch's filtered search with the caller's filter as the predicate, and recomputes
//! each candidate's score from the current vector in [`ItemFactors`]. When fewer than `k`
//! candidates come back (a filter that rejects most items can starve the graph walk, and
//! items not yet indexed are invisible to it) it asks again for twice as many, up to
//! [`MAX_OVERFETCH`]·k, and then answers with the exact scan, so `k` items come back
//! whenever `k` pass the filter. `upsert` only counts the item in a sharded concurrent
//! map (`DashMap`) of changed items; it never touches the index.
//!
//! Background. One thread per retriever wakes every `upsert_interval_ms` and drains, in
//! batches of `upsert_batch`: items that became known since the last pass (it follows the
//! store's append-only list of known items, so a new item is indexed even if nobody
//! calls `upsert`) and the dirty set, most-changed items first: when events change items
//! faster than the graph can take them (a re-insert costs ~100 µs; flat-out ingest
//! marks tens of thousands a second), the popular items, which change most and fill most
//! answers, stay current while rarely touched ones wait (their scores are exact anyway;
//! only the graph's idea of where they are lags). Each item is taken out of the dirty
//! set *before* its current vector is read, so a change that lands meanwhile marks it
//! dirty again and is never lost. A replace is remove + add (usearch refuses to add a present key). When
//! the index is full, the drainer copies it into a larger one (`HnswIndex::grown`) and
//! swaps that in, because usearch's `reserve` must not run alongside searches.
//!
//! Rebuild. [`AnnRetriever::rebuild`] inserts every known item into a fresh index on
//! `build_threads` threads while searches and the drainer keep using the old one; items
//! the drainer applied meanwhile are marked dirty again after the swap, so the new index
//! catches up with them. Readers that loaded the old index finish on it; it is freed when
//! the last one drops it.
//!
//! Dropping the retriever stops and joins the drainer thread (within one interval).

use std::any::Any;
use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use parking_lot::{Condvar, Mutex, RwLock};
use reflex_core::types::IdHashState;
use reflex_core::{IndexBacklog, ItemIdx, RecallChecks, Retriever, Scored};
use tracing::{debug, warn};

use super::index::{HnswIndex, IndexShape};
use super::{AnnConfig, AnnError};
use crate::factors::ItemFactors;
use crate::mf::OnlineMf;
use crate::retriever::ExactRetriever;
use crate::topk::TopK;

/// Widest search tried before the exact scan, as a multiple of `k`.
pub const MAX_OVERFETCH: usize = 8;

/// Items a build inserts on one thread before the others join in: concurrent inserts
/// into a nearly empty graph are where usearch's parallel build is weakest.
const SEQUENTIAL_SEED: usize = 1000;

/// Approximate maximum-inner-product search over a model's item factors (see the
/// module documentation for how it stays current).
pub struct AnnRetriever {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

/// State shared by the retriever and its drainer thread.
struct Shared {
    factors: Arc<ItemFactors>,
    /// Read by the drainer, builds and stats, never by searches; written only by
    /// [`AnnRetriever::set_expansion_search`].
    config: RwLock<AnnConfig>,
    exact: ExactRetriever,
    index: ArcSwap<HnswIndex>,
    /// Items whose vector changed since they were last indexed.
    /// Items whose vector changed since they were last indexed, with how many changes.
    dirty: DashMap<ItemIdx, u32, IdHashState>,
    /// Held while a batch is applied, an index is grown or swapped: one writer at a time.
    drain: Mutex<DrainState>,
    /// One rebuild at a time.
    rebuild: Mutex<()>,
    /// Set on drop; the drainer waits on `wake` between passes.
    stop: Mutex<bool>,
    wake: Condvar,
    counters: Counters,
    /// The longest item vectors, scored exactly on every search.
    head: ArcSwap<Head>,
    /// When the head is next recomputed.
    head_due: Mutex<Instant>,
    /// [`AnnConfig::recall_check_every`], where searches read it without the lock.
    recall_check_every: u64,
}

struct DrainState {
    /// Positions of the store's known-item list below this have been indexed.
    cursor: usize,
    /// While a rebuild runs: items applied to the old index meanwhile, to apply again
    /// to the new one.
    replay: Option<Vec<ItemIdx>>,
}

#[derive(Default)]
struct Counters {
    searches: AtomicU64,
    overfetch_retries: AtomicU64,
    exact_fallbacks: AtomicU64,
    applied: AtomicU64,
    upsert_errors: AtomicU64,
    reindex_skipped: AtomicU64,
    rebuilds: AtomicU64,
    grows: AtomicU64,
    recall_checks: AtomicU64,
    recall_wanted: AtomicU64,
    recall_found: AtomicU64,
}

/// What the retriever has done, for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnnStats {
    /// Vectors in the current index.
    pub indexed: usize,
    /// Vectors the current index has room for before it is copied into a larger one.
    pub capacity: usize,
    /// Items the model knows (what a complete index holds).
    pub known: usize,
    /// Items marked changed and not yet re-indexed.
    pub dirty: usize,
    /// Searches served.
    pub searches: u64,
    /// Wider searches run because one returned fewer than `k`.
    pub overfetch_retries: u64,
    /// Searches answered by the exact scan.
    pub exact_fallbacks: u64,
    /// Items (re-)indexed by the drainer.
    pub applied: u64,
    /// Items the index refused (retried on the next pass).
    pub upsert_errors: u64,
    /// Changed items not re-indexed because their vector moved less than
    /// [`AnnConfig::reindex_min_drift`].
    pub reindex_skipped: u64,
    /// Rebuilds swapped in.
    pub rebuilds: u64,
    /// Times the index was copied into a larger one.
    pub grows: u64,
}

impl AnnRetriever {
    /// Indexes every item `factors` knows now on `build_threads` threads, blocking for
    /// the build, and starts the background drainer. Measured at the defaults (64-dim
    /// clustered vectors, release): 100k items in 13 s on one thread; 1M in 280 s on
    /// one thread, 140 s on two.
    pub fn new(factors: Arc<ItemFactors>, config: AnnConfig) -> Result<Self, AnnError> {
        config.validate().map_err(AnnError::Config)?;
        let items = known_prefix(&factors);
        let started = Instant::now();
        let index = build(&factors, &config, &items)?;
        debug!(
            items = items.len(),
            ms = started.elapsed().as_millis() as u64,
            "ann index built"
        );
        let head = Head::of(&factors, config.head_items);
        let shared = Arc::new(Shared {
            exact: ExactRetriever::new(factors.clone()),
            factors,
            recall_check_every: config.recall_check_every,
            config: RwLock::new(config),
            index: ArcSwap::from_pointee(index),
            dirty: DashMap::with_hasher(IdHashState::default()),
            drain: Mutex::new(DrainState {
                cursor: items.len(),
                replay: None,
            }),
            rebuild: Mutex::new(()),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            counters: Counters::default(),
            head: ArcSwap::from_pointee(head),
            head_due: Mutex::new(Instant::now() + HEAD_REFRESH),
        });
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("reflex-ann".into())
                .spawn(move || shared.run())?
        };
        Ok(Self {
            shared,
            worker: Some(worker),
        })
    }

    /// A retriever over `model`'s item factors.
    pub fn for_model(model: &OnlineMf, config: AnnConfig) -> Result<Self, AnnError> {
        Self::new(model.item_factors().clone(), config)
    }

    /// The settings in force.
    pub fn config(&self) -> AnnConfig {
        self.shared.config.read().clone()
    }

    /// Changes the search beam width (ef) without a rebuild: the index is copied with
    /// the new setting and swapped in (usearch's setting is a plain field that searches
    /// read, so it is not changed under them). Costs a copy of the index: about a
    /// second per million 64-dimensional f32 vectors.
    pub fn set_expansion_search(&self, expansion: usize) -> Result<(), AnnError> {
        if expansion == 0 {
            return Err(AnnError::Config("expansion_search must be > 0".into()));
        }
        let s = &self.shared;
        let _st = s.drain.lock();
        let config = {
            let mut config = s.config.write();
            config.expansion_search = expansion;
            config.clone()
        };
        let current = s.index.load_full();
        let copy = current.grown(&config, current.capacity())?;
        s.index.store(Arc::new(copy));
        Ok(())
    }

    /// Builds a fresh index from every item's current vector, off to the side, and
    /// swaps it in. Searches keep running on the old index meanwhile and never wait;
    /// changes applied during the build are applied again to the new index. Blocks the
    /// caller for the build (run it on a blocking thread); a second call waits for the
    /// first. On error the old index stays in service.
    pub fn rebuild(&self) -> Result<(), AnnError> {
        let s = &self.shared;
        let _one = s.rebuild.lock();
        let items = {
            let mut st = s.drain.lock();
            st.replay = Some(Vec::new());
            known_prefix(&s.factors)
        };
        let started = Instant::now();
        let config = s.config.read().clone();
        let built = build(&s.factors, &config, &items);
        let mut st = s.drain.lock();
        let replay = st.replay.take().unwrap_or_default();
        let index = built?;
        // The beam width may have changed during the build; the new index is not yet
        // published, so setting it directly is safe.
        index.set_expansions(&s.config.read());
        s.index.store(Arc::new(index));
        st.cursor = st.cursor.max(items.len());
        for item in &replay {
            s.mark(*item);
        }
        drop(st);
        s.counters.rebuilds.fetch_add(1, Ordering::Relaxed);
        self.refresh_head();
        debug!(
            items = items.len(),
            replayed = replay.len(),
            ms = started.elapsed().as_millis() as u64,
            "ann index rebuilt and swapped"
        );
        Ok(())
    }

    /// Applies every pending change now, on the calling thread, instead of waiting for
    /// the drainer; returns the number of items applied.
    pub fn flush(&self) -> Result<usize, AnnError> {
        self.shared.drain_pending(None)
    }

    /// Recomputes the head (see [`AnnConfig::head_items`]) now rather than on the
    /// drainer's next turn.
    pub fn refresh_head(&self) {
        let s = &self.shared;
        let wanted = s.config.read().head_items;
        s.head.store(Arc::new(Head::of(&s.factors, wanted)));
    }

    /// Counters and sizes.
    pub fn stats(&self) -> AnnStats {
        let s = &self.shared;
        let index = s.index.load();
        let c = &s.counters;
        AnnStats {
            indexed: index.size(),
            capacity: index.capacity(),
            known: s.factors.len(),
            dirty: s.dirty.len(),
            searches: c.searches.load(Ordering::Relaxed),
            overfetch_retries: c.overfetch_retries.load(Ordering::Relaxed),
            exact_fallbacks: c.exact_fallbacks.load(Ordering::Relaxed),
            applied: c.applied.load(Ordering::Relaxed),
            upsert_errors: c.upsert_errors.load(Ordering::Relaxed),
            reindex_skipped: c.reindex_skipped.load(Ordering::Relaxed),
            rebuilds: c.rebuilds.load(Ordering::Relaxed),
            grows: c.grows.load(Ordering::Relaxed),
        }
    }

    /// The live index's settings, as usearch reports them.
    pub fn shape(&self) -> IndexShape {
        self.shared.index.load().describe()
    }

    /// The vector the index holds for `item` (after quantisation), `None` when it holds
    /// none: for checking that the index caught up.
    pub fn indexed_vector(&self, item: ItemIdx) -> Option<Vec<f32>> {
        self.shared.index.load().vector(item)
    }

    /// The `k` best candidates usearch's filtered search finds for `query`, rescored,
    /// without the widening and exact fallback of [`Retriever::search`]: for measuring
    /// recall. `None` when usearch refused the search.
    pub fn search_index_only(
        &self,
        query: &[f32],
        k: usize,
        filter: &dyn Fn(ItemIdx) -> bool,
    ) -> Option<Vec<Scored>> {
        let index = self.shared.index.load();
        let keys = guarded_search(&index, query, k, filter).ok()?;
        Some(self.shared.rescore(keys, query, k))
    }
}

impl Drop for AnnRetriever {
    fn drop(&mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            warn!("ann drainer thread panicked");
        }
    }
}

impl AnnRetriever {
    /// [`Retriever::search`] without the recall check.
    fn search_unchecked(
        &self,
        query: &[f32],
        k: usize,
        filter: &dyn Fn(ItemIdx) -> bool,
    ) -> Vec<Scored> {
        match self.search_graph(query, k, filter) {
            Some(found) => self.shared.with_head(found, query, k, filter),
            None => {
                let s = &self.shared;
                s.counters.exact_fallbacks.fetch_add(1, Ordering::Relaxed);
                s.exact.search(query, k, filter)
            }
        }
    }

    /// The graph's answer, rescored; `None` when it cannot fill `k` (the exact scan
    /// answers then).
    fn search_graph(
        &self,
        query: &[f32],
        k: usize,
        filter: &dyn Fn(ItemIdx) -> bool,
    ) -> Option<Vec<Scored>> {
        let s = &self.shared;
        let index = s.index.load();
        let size = index.size();
        // usearch's filtered search first, then ever wider ones while they come back
        // short. With fewer items indexed than `k` (none yet, or a tiny catalog) the graph
        // cannot fill the answer, so that goes straight to the exact scan.
        let mut count = k;
        while count <= size {
            match guarded_search(&index, query, count, filter) {
                Ok(keys) => {
                    let top = s.rescore(keys, query, k);
                    if top.len() >= k {
                        return Some(top);
                    }
                }
                Err(e) => {
                    debug!(error = %e, "ann search refused, scanning exactly");
                    break;
                }
            }
            if count >= size || count >= k.saturating_mul(MAX_OVERFETCH) {
                break;
            }
            count = count.saturating_mul(2).min(size);
            s.counters.overfetch_retries.fetch_add(1, Ordering::Relaxed);
        }
        None
    }
}

impl Retriever for AnnRetriever {
    /// Empty when `query` does not have the model's dimension. One search in
    /// [`AnnConfig::recall_check_every`] is also answered by the exact scan and counted
    /// in [`Retriever::recall_checks`].
    fn search(&self, query: &[f32], k: usize, filter: &dyn Fn(ItemIdx) -> bool) -> Vec<Scored> {
        let s = &self.shared;
        // A non-finite query scores nothing finite (the exact scan answers empty too).
        if k == 0 || query.len() != s.factors.factors() || !query.iter().all(|v| v.is_finite()) {
            return Vec::new();
        }
        let n = s.counters.searches.fetch_add(1, Ordering::Relaxed);
        let top = self.search_unchecked(query, k, filter);
        let every = s.recall_check_every;
        if every > 0 && n % every == every - 1 {
            let exact = s.exact.search(query, k, filter);
            let found = exact
                .iter()
                .filter(|e| top.iter().any(|t| t.item == e.item))
                .count();
            let c = &s.counters;
            c.recall_checks.fetch_add(1, Ordering::Relaxed);
            c.recall_wanted
                .fetch_add(exact.len() as u64, Ordering::Relaxed);
            c.recall_found.fetch_add(found as u64, Ordering::Relaxed);
        }
        top
    }

    fn recall_checks(&self) -> Option<RecallChecks> {
        let c = &self.shared.counters;
        Some(RecallChecks {
            checks: c.recall_checks.load(Ordering::Relaxed),
            wanted: c.recall_wanted.load(Ordering::Relaxed),
            found: c.recall_found.load(Ordering::Relaxed),
        })
    }

    fn backlog(&self) -> Option<IndexBacklog> {
        let s = &self.shared;
        // Items left out for a non-finite vector count as new: rare, and never indexed.
        let indexed = s.index.load().size() as u64;
        Some(IndexBacklog {
            new: (s.factors.len() as u64).saturating_sub(indexed),
            changed: s.dirty.len() as u64,
        })
    }

    /// Marks `item` for re-indexing from the model's current vector (`_vector` is not
    /// read: the drainer reads the newest value when it gets to the item).
    fn upsert(&self, item: ItemIdx, _vector: &[f32]) {
        self.shared.mark(item);
    }

    /// Items in the index.
    fn len(&self) -> usize {
        self.shared.index.load().size()
    }

    fn rebuild(&self) -> reflex_core::Result<()> {
        AnnRetriever::rebuild(self)
            .map_err(|e| reflex_core::Error::Internal(format!("rebuilding the ann index: {e}")))
    }
}

impl Shared {
    /// Merges the graph's answer `found` with the head's items scored exactly: the best
    /// `k` of both that pass `filter`.
    fn with_head(
        &self,
        found: Vec<Scored>,
        query: &[f32],
        k: usize,
        filter: &dyn Fn(ItemIdx) -> bool,
    ) -> Vec<Scored> {
        let head = self.head.load();
        if head.items.is_empty() {
            return found;
        }
        let mut top = TopK::new(k);
        for s in &found {
            top.offer(s.item, f64::from(s.score), &|_| true);
        }
        let mut taken: Vec<ItemIdx> = found.iter().map(|s| s.item).collect();
        taken.sort_unstable();
        for &item in head.items.iter() {
            if taken.binary_search(&item).is_ok() {
                continue;
            }
            if let Some(score) = self.factors.score(item, query)
                && score.is_finite()
            {
                top.offer(item, f64::from(score), filter);
            }
        }
        top.into_scored()
    }

    /// Recomputes the head (the `head_items` longest vectors) when it is due: every
    /// [`HEAD_REFRESH`], and no more than a twentieth of the time (reading every vector
    /// costs about 5 ms at 100k items).
    fn refresh_head_if_due(&self) {
        let wanted = self.config.read().head_items;
        let mut due = self.head_due.lock();
        if Instant::now() < *due {
            return;
        }
        let started = Instant::now();
        let head = Head::of(&self.factors, wanted);
        self.head.store(Arc::new(head));
        *due = Instant::now() + HEAD_REFRESH.max(started.elapsed() * 20);
    }

    /// Marks `item` changed once more.
    fn mark(&self, item: ItemIdx) {
        let mut count = self.dirty.entry(item).or_insert(0);
        *count = count.saturating_add(1);
    }

    /// The drainer thread's loop.
    fn run(&self) {
        let (interval, share) = {
            let c = self.config.read();
            (
                Duration::from_millis(c.upsert_interval_ms),
                c.upkeep_max_share.clamp(0.01, 1.0),
            )
        };
        let mut pause = interval;
        loop {
            {
                let mut stop = self.stop.lock();
                if !*stop {
                    self.wake.wait_for(&mut stop, pause);
                }
                if *stop {
                    return;
                }
            }
            let started = Instant::now();
            self.refresh_head_if_due();
            // A pass lasts at most one interval, then rests long enough that upkeep
            // takes at most `share` of a core: under heavier change the graph lags
            // (the head and exact rescoring keep answers right) instead of taking the
            // CPU that requests and ingest need.
            if let Err(e) = self.drain_pending(Some(started + interval)) {
                warn!(error = %e, "ann drain failed; retrying on the next pass");
            }
            let busy = started.elapsed();
            pause = interval.max(busy.mul_f32((1.0 - share) / share));
        }
    }

    fn stopping(&self) -> bool {
        *self.stop.lock()
    }

    /// Applies batches until one comes back short (nothing left) or fails, or, with a
    /// `deadline` (the drainer's passes), the deadline passes with no new item left to
    /// add or the retriever is being dropped.
    fn drain_pending(&self, deadline: Option<Instant>) -> Result<usize, AnnError> {
        let mut total = 0;
        loop {
            let (applied, full) = self.drain_batch(deadline)?;
            total += applied;
            if deadline.is_some() {
                self.refresh_head_if_due();
            }
            let late = deadline.is_some_and(|d| Instant::now() >= d)
                && self.drain.lock().cursor >= self.factors.len();
            if !full || late || (deadline.is_some() && self.stopping()) {
                return Ok(total);
            }
        }
    }

    /// Applies one batch of new and dirty items; returns how many and whether the batch
    /// was full (more may be waiting).
    fn drain_batch(&self, deadline: Option<Instant>) -> Result<(usize, bool), AnnError> {
        let max = self.config.read().upsert_batch;
        let mut st = self.drain.lock();
        let mut batch = Vec::with_capacity(max.min(4096));
        // Items that became known since the last pass. The list is append-only; a slot
        // still being written reads as `None`, and the cursor waits for it.
        let known = self.factors.len();
        while st.cursor < known && batch.len() < max {
            match self.factors.known_at(st.cursor) {
                Some(item) => {
                    batch.push(item);
                    st.cursor += 1;
                }
                None => break,
            }
        }
        if batch.len() < max && !self.dirty.is_empty() {
            let room = max - batch.len();
            let mut picked: Vec<(ItemIdx, u32)> =
                self.dirty.iter().map(|e| (*e.key(), *e.value())).collect();
            if picked.len() > room {
                // Most-changed first, but head items last: searches score them exactly
                // wherever the graph has them, and as the items that change most they
                // would otherwise be most of the work. They are re-indexed once the
                // drainer catches up.
                let head = self.head.load();
                for (item, count) in &mut picked {
                    if head.contains(*item) {
                        *count = 0;
                    }
                }
                picked.select_nth_unstable_by(room, |a, b| b.1.cmp(&a.1));
                picked.truncate(room);
            }
            // Out of the set before the vector is read: a later change re-marks it.
            batch.extend(
                picked
                    .into_iter()
                    .filter(|(item, _)| self.dirty.remove(item).is_some())
                    .map(|(item, _)| item),
            );
        }
        let full = batch.len() >= max;
        if batch.is_empty() {
            return Ok((0, false));
        }
        batch.sort_unstable();
        batch.dedup();

        let mut index = self.index.load_full();
        let incoming = batch.iter().filter(|item| !index.contains(**item)).count();
        if index.size() + incoming > index.capacity() {
            let wanted = HnswIndex::capacity_for(index.size(), incoming);
            let config = self.config.read().clone();
            match index.grown(&config, wanted) {
                Ok(grown) => {
                    index = Arc::new(grown);
                    self.index.store(index.clone());
                    self.counters.grows.fetch_add(1, Ordering::Relaxed);
                    debug!(capacity = index.capacity(), "ann index grown");
                }
                Err(e) => {
                    for item in batch {
                        self.mark(item);
                    }
                    return Err(e);
                }
            }
        }

        let mut vector = vec![0.0f32; self.factors.factors()];
        let mut failed = None;
        let mut applied = 0;
        let min_drift = self.config.read().reindex_min_drift;
        let mut late = false;
        for (n, &item) in batch.iter().enumerate() {
            // The head stays fresh through a long pass (a bulk of new items).
            if n % 64 == 0 && deadline.is_some() {
                self.refresh_head_if_due();
                late = deadline.is_some_and(|d| Instant::now() >= d);
            }
            // Past the pass's deadline, re-indexing waits for the next pass, item by
            // item: new items are still added (until indexed, only the exact fallback
            // finds them), but the changed ones beside them in the batch are not, or a
            // steady trickle of new items would keep every pass re-indexing past its
            // deadline and the upkeep over its share of a core.
            if late && index.contains(item) {
                self.mark(item);
                continue;
            }
            if !self.factors.read_into(item, &mut vector) {
                continue;
            }
            if min_drift > 0.0
                && let Some(held) = index.vector(item)
                && relative_drift(&held, &vector) < min_drift
            {
                // Close enough to where the graph has it: scores are recomputed from the
                // current vector anyway, so only the candidate walk sees the difference.
                self.counters
                    .reindex_skipped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // A non-finite vector would poison the graph's distances; such an item is
            // left out (the exact scan skips it too).
            let result = if vector.iter().all(|v| v.is_finite()) {
                index.upsert(item, &vector)
            } else {
                index.remove(item)
            };
            match result {
                Ok(()) => applied += 1,
                Err(e) => {
                    self.counters.upsert_errors.fetch_add(1, Ordering::Relaxed);
                    self.mark(item);
                    failed.get_or_insert(e);
                }
            }
        }
        self.counters
            .applied
            .fetch_add(applied as u64, Ordering::Relaxed);
        if let Some(replay) = st.replay.as_mut() {
            replay.extend_from_slice(&batch);
        }
        drop(st);
        match failed {
            Some(e) => Err(e),
            None => Ok((applied, full)),
        }
    }

    /// Scores `keys` with the current vectors and keeps the best `k` (ties: lower index).
    fn rescore(&self, keys: Vec<u64>, query: &[f32], k: usize) -> Vec<Scored> {
        let mut top: Vec<Scored> = keys
            .into_iter()
            .filter_map(|key| {
                let item = ItemIdx::try_from(key).ok()?;
                let score = self.factors.score(item, query)?;
                score.is_finite().then_some(Scored { item, score })
            })
            .collect();
        top.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item)));
        top.truncate(k);
        top
    }
}

/// How often the drainer recomputes the head (at least; see
/// [`Shared::refresh_head_if_due`]).
const HEAD_REFRESH: Duration = Duration::from_millis(500);

/// The items with the longest vectors, which every search scores exactly beside the
/// graph's candidates.
///
/// Online MF gives the items people interact with most the longest vectors (every event
/// pulls its item towards the user), and those win most inner products. They also
/// change fastest, so the graph, which re-inserts a changed item at ~100 µs each, lags
/// them most under heavy ingest: measured in a server at 100k items under flat-out
/// ingest, the graph's answers held none of the exact top 10, whose items were the
/// popular ones, indexed while their vectors were a sixth as long. Scoring the head
/// exactly (2,048 dot products, tens of µs) makes the answer independent of how far the
/// graph lags for exactly those items.
#[derive(Default)]
struct Head {
    /// Sorted by index, for the drainer's membership test (searches score them all, in
    /// any order).
    items: Vec<ItemIdx>,
}

impl Head {
    fn contains(&self, item: ItemIdx) -> bool {
        self.items.binary_search(&item).is_ok()
    }
}

impl Head {
    /// The `n` known items with the longest vectors.
    fn of(factors: &ItemFactors, n: usize) -> Self {
        if n == 0 {
            return Self::default();
        }
        let mut norms: Vec<(f32, ItemIdx)> = Vec::with_capacity(factors.len());
        let mut v = vec![0.0f32; factors.factors()];
        factors.for_each_known(|item, stored| {
            stored.read_into(&mut v);
            let norm = v.iter().map(|x| x * x).sum::<f32>();
            if norm.is_finite() {
                norms.push((norm, item));
            }
        });
        if norms.len() > n {
            norms.select_nth_unstable_by(n, |a, b| b.0.total_cmp(&a.0));
            norms.truncate(n);
        }
        let mut items: Vec<ItemIdx> = norms.into_iter().map(|(_, item)| item).collect();
        items.sort_unstable();
        Self { items }
    }
}

/// `‖now − held‖ / ‖held‖`; infinite when `held` is zero, so it is always re-indexed.
fn relative_drift(held: &[f32], now: &[f32]) -> f32 {
    let (mut diff, mut norm) = (0.0f32, 0.0f32);
    for (h, n) in held.iter().zip(now) {
        diff += (n - h) * (n - h);
        norm += h * h;
    }
    if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        f32::INFINITY
    }
}

/// usearch's filtered search with `filter` as the predicate. usearch calls the predicate
/// from C++, where a panic cannot unwind: a panic is caught, the remaining keys are
/// rejected, and the panic resumes once the search is back in Rust.
fn guarded_search(
    index: &HnswIndex,
    query: &[f32],
    count: usize,
    filter: &dyn Fn(ItemIdx) -> bool,
) -> Result<Vec<u64>, AnnError> {
    let panicked: RefCell<Option<Box<dyn Any + Send>>> = RefCell::new(None);
    let allow = |key: u64| -> bool {
        if panicked.borrow().is_some() {
            return false;
        }
        let Ok(item) = ItemIdx::try_from(key) else {
            return false;
        };
        match catch_unwind(AssertUnwindSafe(|| filter(item))) {
            Ok(pass) => pass,
            Err(payload) => {
                *panicked.borrow_mut() = Some(payload);
                false
            }
        }
    };
    let found = index.filtered_search(query, count, allow);
    if let Some(payload) = panicked.borrow_mut().take() {
        resume_unwind(payload);
    }
    found
}

/// The store's known items in the order they became known, up to the first slot still
/// being written.
fn known_prefix(factors: &ItemFactors) -> Vec<ItemIdx> {
    let len = factors.len();
    (0..len).map_while(|n| factors.known_at(n)).collect()
}

/// A new index holding the current vectors of `items`, inserted by
/// `config.build_threads` threads (the first [`SEQUENTIAL_SEED`] by one).
fn build(
    factors: &ItemFactors,
    config: &AnnConfig,
    items: &[ItemIdx],
) -> Result<HnswIndex, AnnError> {
    let index = HnswIndex::new(
        factors.factors(),
        config,
        HnswIndex::capacity_for(items.len(), 0),
    )?;
    let insert = |items: &[ItemIdx], stride: usize, offset: usize| -> Result<(), AnnError> {
        let mut vector = vec![0.0f32; factors.factors()];
        for &item in items.iter().skip(offset).step_by(stride) {
            if factors.read_into(item, &mut vector) && vector.iter().all(|v| v.is_finite()) {
                index.upsert(item, &vector)?;
            }
        }
        Ok(())
    };
    let seed = items.len().min(SEQUENTIAL_SEED);
    insert(&items[..seed], 1, 0)?;
    let rest = &items[seed..];
    let threads = config.effective_build_threads().clamp(1, rest.len().max(1));
    if threads == 1 {
        insert(rest, 1, 0)?;
    } else {
        std::thread::scope(|scope| -> Result<(), AnnError> {
            let mut handles = Vec::with_capacity(threads);
            for t in 0..threads {
                let insert = &insert;
                handles.push(
                    std::thread::Builder::new()
                        .name(format!("reflex-ann-build-{t}"))
                        .spawn_scoped(scope, move || insert(rest, threads, t))?,
                );
            }
            let mut first_error = None;
            for handle in handles {
                match handle.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                    Err(payload) => resume_unwind(payload),
                }
            }
            first_error.map_or(Ok(()), Err)
        })?;
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass past its deadline adds the new items of its batch and leaves the changed
    /// ones beside them for the next pass.
    #[test]
    fn past_the_deadline_new_items_are_added_and_changed_ones_wait() {
        let factors = Arc::new(ItemFactors::new(8, 0.1, 7));
        for item in 0..200 {
            assert!(factors.set(item, &[1.0 + item as f32 * 0.01; 8]));
        }
        // The drainer thread sleeps for the whole test: this drives the passes itself.
        let config = AnnConfig {
            upsert_interval_ms: 3_600_000,
            build_threads: 1,
            reindex_min_drift: 0.0,
            ..AnnConfig::default()
        };
        let ann = AnnRetriever::new(factors.clone(), config).expect("ann");
        assert_eq!(ann.len(), 200);
        // Every indexed item changes, and 100 new ones arrive.
        for item in 0..200 {
            assert!(factors.set(item, &[-1.0; 8]));
            ann.shared.mark(item);
        }
        for item in 200..300 {
            assert!(factors.set(item, &[0.5; 8]));
        }
        assert_eq!(ann.backlog().map(|b| b.new), Some(100));
        let past = Instant::now() - Duration::from_secs(1);
        ann.shared.drain_pending(Some(past)).expect("a pass");
        assert_eq!(ann.len(), 300, "every new item is added");
        let stats = ann.stats();
        assert_eq!(stats.dirty, 200, "changed items wait for the next pass");
        assert_eq!(
            ann.backlog(),
            Some(IndexBacklog {
                new: 0,
                changed: 200
            })
        );
        // Without a deadline everything is applied.
        ann.flush().expect("flush");
        assert_eq!(ann.stats().dirty, 0);
        assert_eq!(ann.indexed_vector(0), Some(vec![-1.0; 8]));
    }
}
