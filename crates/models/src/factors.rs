//! The item factor store: a growable array of item vectors that many threads read and
//! write at once without a lock on the hot path.
//!
//! Items live in fixed-size chunks of [`CHUNK_ITEMS`] slots; each pair of values is two
//! `f32` kept as bits in one `AtomicU64` ([`StoredVector`]) and accessed with relaxed
//! loads and stores, so a 64-factor vector is 32 memory operations, not 64. Concurrent
//! SGD steps on the same item may lose each other's updates (Hogwild-style), which
//! stochastic gradient descent tolerates. The chunk list is a `boxcar::Vec`, lock-free to
//! read; growing it takes a mutex, once per [`CHUNK_ITEMS`] new items.
//!
//! A chunk is filled with deterministic pseudo-random values seeded by item index when
//! it is allocated, so an item's initial vector never depends on timing and a replay
//! rebuilds the same model. An item becomes *known* the first time the model learns from
//! it; only known items are searched, sampled as negatives and folded in.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use reflex_core::ItemIdx;

use crate::rng::{mix, unit_f32};

/// Items per chunk of the store.
pub const CHUNK_ITEMS: usize = 1024;

/// One chunk of item slots.
pub(crate) struct Chunk {
    /// `CHUNK_ITEMS × words` pairs of values, item-major.
    values: Box<[AtomicU64]>,
    /// Whether each slot's item was ever learnt from.
    known: Box<[AtomicBool]>,
    /// Time-decayed popularity of each slot as `log2` of its anchored score, `f64` bits
    /// (see [`crate::popularity`]).
    pub(crate) pop: Box<[AtomicU64]>,
}

/// Item vectors of one model, shared by the learner and the retrievers.
pub struct ItemFactors {
    factors: usize,
    /// Stored words per vector: `factors` values in pairs.
    words: usize,
    seed: u64,
    init_scale: f32,
    chunks: boxcar::Vec<Chunk>,
    grow: Mutex<()>,
    /// Known items in the order they became known, for uniform sampling and scans.
    known_list: boxcar::Vec<ItemIdx>,
    /// Bumped by every write from outside learning ([`Self::set`], [`Self::load`]), so
    /// copies of the vectors ([`crate::ExactRetriever`]'s scan copy) can tell that they
    /// no longer stand for them. SGD steps do not bump it: a copy may lag those.
    generation: AtomicU64,
}

impl ItemFactors {
    /// An empty store of `factors`-dimensional vectors; initial values are uniform in
    /// ±`init_scale / sqrt(factors)`, seeded by `seed` and the item index.
    pub fn new(factors: usize, init_scale: f32, seed: u64) -> Self {
        Self {
            factors: factors.max(1),
            words: factors.max(1).div_ceil(2),
            seed,
            init_scale: init_scale / (factors.max(1) as f32).sqrt(),
            chunks: boxcar::Vec::new(),
            grow: Mutex::new(()),
            known_list: boxcar::Vec::new(),
            generation: AtomicU64::new(0),
        }
    }

    /// Dimension of every vector.
    pub fn factors(&self) -> usize {
        self.factors
    }

    /// Number of known items.
    pub fn len(&self) -> usize {
        self.known_list.count()
    }

    /// Whether no item is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots allocated (known or not), a multiple of [`CHUNK_ITEMS`].
    pub fn capacity(&self) -> usize {
        self.chunks.count() * CHUNK_ITEMS
    }

    /// The initial value of dimension `d` of item `idx`.
    fn initial(&self, idx: usize, d: usize) -> f32 {
        let h = mix(self.seed ^ mix(((idx as u64) << 16) ^ d as u64));
        unit_f32(h) * self.init_scale
    }

    fn new_chunk(&self, chunk_no: usize) -> Chunk {
        let (k, words) = (self.factors, self.words);
        let base = chunk_no * CHUNK_ITEMS;
        let value = |item: usize, d: usize| {
            if d < k { self.initial(item, d) } else { 0.0 }
        };
        let values = (0..CHUNK_ITEMS * words)
            .map(|i| {
                let (item, w) = (base + i / words, i % words);
                AtomicU64::new(pack(value(item, 2 * w), value(item, 2 * w + 1)))
            })
            .collect();
        Chunk {
            values,
            known: (0..CHUNK_ITEMS).map(|_| AtomicBool::new(false)).collect(),
            pop: (0..CHUNK_ITEMS)
                .map(|_| AtomicU64::new(f64::NEG_INFINITY.to_bits()))
                .collect(),
        }
    }

    /// The chunk holding `idx`, if allocated.
    #[inline]
    pub(crate) fn chunk(&self, idx: ItemIdx) -> Option<&Chunk> {
        self.chunks.get(idx as usize / CHUNK_ITEMS)
    }

    /// The chunk holding `idx`, allocating chunks up to it.
    fn chunk_or_grow(&self, idx: ItemIdx) -> Option<&Chunk> {
        let want = idx as usize / CHUNK_ITEMS;
        if let Some(c) = self.chunks.get(want) {
            return Some(c);
        }
        let _grow = self.grow.lock();
        // Chunks are pushed only under the lock, so their positions are their numbers.
        while self.chunks.count() <= want {
            let next = self.chunks.count();
            self.chunks.push(self.new_chunk(next));
        }
        self.chunks.get(want)
    }

    /// Marks `idx` known (allocating its chunk); `true` when it was not known before.
    pub(crate) fn ensure_known(&self, idx: ItemIdx) -> bool {
        let Some(chunk) = self.chunk_or_grow(idx) else {
            return false;
        };
        let flag = &chunk.known[idx as usize % CHUNK_ITEMS];
        if flag.load(Ordering::Acquire) {
            return false;
        }
        if flag
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.known_list.push(idx);
            true
        } else {
            false
        }
    }

    /// Whether the model has learnt `idx`.
    #[inline]
    pub fn is_known(&self, idx: ItemIdx) -> bool {
        self.chunk(idx)
            .is_some_and(|c| c.known[idx as usize % CHUNK_ITEMS].load(Ordering::Acquire))
    }

    /// The stored values of `idx` (known or not), if its chunk exists.
    #[inline]
    pub(crate) fn slot(&self, idx: ItemIdx) -> Option<StoredVector<'_>> {
        let words = self.words;
        let off = (idx as usize % CHUNK_ITEMS) * words;
        self.chunk(idx).map(|c| StoredVector {
            words: &c.values[off..off + words],
            len: self.factors,
        })
    }

    /// Starts moving `idx`'s vector into the cache ahead of its use (a hint only), so the
    /// steps of one event wait for their items' memory together rather than in turn.
    #[inline]
    pub(crate) fn prefetch(&self, idx: ItemIdx) {
        #[cfg(target_arch = "x86_64")]
        if let Some(slot) = self.slot(idx) {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let bytes = std::mem::size_of_val(slot.words);
            let base = slot.words.as_ptr().cast::<i8>();
            for off in (0..bytes).step_by(64) {
                // SAFETY: a prefetch is a hint that never faults nor reads into Rust values,
                // and the address lies inside `slot`. (The intrinsic is marked unsafe only for
                // its `target_feature`, SSE, which every x86_64 CPU has. The crate's other
                // `unsafe` is `linalg`'s CPU dispatch.)
                #[allow(unsafe_code)]
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(off));
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = idx;
    }

    /// The vector of a known item.
    pub fn get(&self, idx: ItemIdx) -> Option<Vec<f32>> {
        if !self.is_known(idx) {
            return None;
        }
        self.slot(idx).map(|s| s.to_vec())
    }

    /// Copies a known item's vector into `out`; `false` when unknown.
    pub fn read_into(&self, idx: ItemIdx, out: &mut [f32]) -> bool {
        if !self.is_known(idx) {
            return false;
        }
        match self.slot(idx) {
            Some(s) => {
                s.read_into(out);
                true
            }
            None => false,
        }
    }

    /// The `n`-th item that became known (0-based), for sampling.
    #[inline]
    pub(crate) fn known_at(&self, n: usize) -> Option<ItemIdx> {
        self.known_list.get(n).copied()
    }

    /// Calls `f(idx, values)` for every known item, in index order.
    pub fn for_each_known(&self, mut f: impl FnMut(ItemIdx, StoredVector<'_>)) {
        let words = self.words;
        for (c, chunk) in self.chunks.iter() {
            let base = c * CHUNK_ITEMS;
            for (i, flag) in chunk.known.iter().enumerate() {
                if flag.load(Ordering::Acquire) {
                    let stored = StoredVector {
                        words: &chunk.values[i * words..(i + 1) * words],
                        len: self.factors,
                    };
                    f((base + i) as ItemIdx, stored);
                }
            }
        }
    }

    /// Calls `f(idx, popularity_log2)` for every known item, in index order.
    pub(crate) fn for_each_known_pop(&self, mut f: impl FnMut(ItemIdx, f64)) {
        for (c, chunk) in self.chunks.iter() {
            let base = c * CHUNK_ITEMS;
            for (i, flag) in chunk.known.iter().enumerate() {
                if flag.load(Ordering::Acquire) {
                    f(
                        (base + i) as ItemIdx,
                        f64::from_bits(chunk.pop[i].load(Ordering::Relaxed)),
                    );
                }
            }
        }
    }

    /// Sets item `idx`'s vector to `values` and marks it known (e.g. item factors from a
    /// batch model such as [`crate::als`]); `false`, changing nothing, when `values` is not
    /// `factors` long or not finite.
    pub fn load(&self, idx: ItemIdx, values: &[f32]) -> bool {
        values.iter().all(|v| v.is_finite()) && self.set(idx, values)
    }

    /// Writes `values` as item `idx`'s vector and marks it known, allocating its chunk:
    /// for vectors trained elsewhere (an imported baseline, content embeddings) and for
    /// tests. `false` when `values` does not have the store's dimension. Concurrent SGD
    /// steps on the same item may interleave with the write, as they do with each other.
    pub fn set(&self, idx: ItemIdx, values: &[f32]) -> bool {
        if values.len() != self.factors || self.chunk_or_grow(idx).is_none() {
            return false;
        }
        // The values are written before the item becomes known, so no reader that sees
        // it known reads its initial values.
        let Some(slot) = self.slot(idx) else {
            return false;
        };
        slot.write(values);
        self.ensure_known(idx);
        self.generation.fetch_add(1, Ordering::Release);
        true
    }

    /// Count of writes from outside learning so far (see the field).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The stored popularity (`log2` form, see [`crate::popularity`]) of `idx`.
    pub(crate) fn popularity_log2(&self, idx: ItemIdx) -> f64 {
        self.chunk(idx).map_or(f64::NEG_INFINITY, |c| {
            f64::from_bits(c.pop[idx as usize % CHUNK_ITEMS].load(Ordering::Relaxed))
        })
    }

    /// Overwrites the stored popularity of `idx` (its chunk must exist).
    pub(crate) fn set_popularity_log2(&self, idx: ItemIdx, log2: f64) {
        if let Some(c) = self.chunk(idx) {
            c.pop[idx as usize % CHUNK_ITEMS].store(log2.to_bits(), Ordering::Relaxed);
        }
    }

    /// Inner product of `query` with a known item's vector.
    pub fn score(&self, idx: ItemIdx, query: &[f32]) -> Option<f32> {
        if !self.is_known(idx) {
            return None;
        }
        self.slot(idx).map(|s| s.dot(query))
    }
}

/// One item's vector where it is stored: value `2i` in the low and `2i + 1` in the high
/// half of word `i`, read and written with relaxed atomics (a value being written
/// concurrently reads as either its old or its new value; the two of a pair together).
/// An odd dimension's last word holds 0 in its high half.
#[derive(Clone, Copy)]
pub struct StoredVector<'a> {
    words: &'a [AtomicU64],
    len: usize,
}

impl StoredVector<'_> {
    /// Dimension of the vector.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no dimension (never, for a store's vectors).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the values into `out` (as many as both have).
    #[inline]
    pub fn read_into(&self, out: &mut [f32]) {
        let n = self.len.min(out.len());
        // Eight values at a time, stored together: the SIMD loads of the arithmetic that
        // follows then forward from whole vector stores (two 8-byte stores read back as
        // one 16-byte load stall instead).
        let mut blocks = out[..n].chunks_exact_mut(8);
        for (block, w) in (&mut blocks).zip(self.words.chunks_exact(4)) {
            block.copy_from_slice(&load8(w));
        }
        let done = n - blocks.into_remainder().len();
        let out = &mut out[done..n];
        let words = &self.words[done / 2..];
        let last_word = words.get(out.len() / 2);
        let mut pairs = out.chunks_exact_mut(2);
        for (pair, w) in (&mut pairs).zip(words) {
            let (a, b) = unpack(w.load(Ordering::Relaxed));
            pair[0] = a;
            pair[1] = b;
        }
        if let [last] = pairs.into_remainder()
            && let Some(w) = last_word
        {
            *last = unpack(w.load(Ordering::Relaxed)).0;
        }
    }

    /// The values, copied out.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len];
        self.read_into(&mut out);
        out
    }

    /// Stores `values` (as many as both have; an odd dimension's pad stays 0).
    #[inline]
    pub(crate) fn write(&self, values: &[f32]) {
        let values = &values[..self.len.min(values.len())];
        let mut pairs = values.chunks_exact(2);
        for (w, pair) in self.words.iter().zip(&mut pairs) {
            w.store(pack(pair[0], pair[1]), Ordering::Relaxed);
        }
        if let [last] = pairs.remainder()
            && let Some(w) = self.words.get(values.len() / 2)
        {
            w.store(pack(*last, 0.0), Ordering::Relaxed);
        }
    }

    /// Inner product with `query` (over the dimensions both have), with independent
    /// accumulators so the loop pipelines.
    #[inline]
    pub fn dot(&self, query: &[f32]) -> f32 {
        let n = self.len.min(query.len());
        let mut acc = [0.0f32; 8];
        let mut qs = query[..n].chunks_exact(8);
        for (x, w) in (&mut qs).zip(self.words.chunks_exact(4)) {
            for l in 0..4 {
                let (a, b) = unpack(w[l].load(Ordering::Relaxed));
                acc[2 * l] += x[2 * l] * a;
                acc[2 * l + 1] += x[2 * l + 1] * b;
            }
        }
        let done = n - qs.remainder().len();
        let mut tail = 0.0;
        for (i, x) in qs.remainder().iter().enumerate() {
            let d = done + i;
            if let Some(w) = self.words.get(d / 2) {
                let (a, b) = unpack(w.load(Ordering::Relaxed));
                tail += x * if d.is_multiple_of(2) { a } else { b };
            }
        }
        (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
    }
}

/// The eight values in four words (`w` must be 4 long; missing words read as 0).
#[inline]
fn load8(w: &[AtomicU64]) -> [f32; 8] {
    let mut u = [0u64; 4];
    for (u, w) in u.iter_mut().zip(w) {
        *u = w.load(Ordering::Relaxed);
    }
    // A plain bit cast on little-endian targets, where value `2i` (the low half of word
    // `i`) comes first in memory; it lets the compiler move whole words into vector
    // registers instead of splitting each into two 32-bit halves.
    if cfg!(target_endian = "little") {
        bytemuck::cast(u)
    } else {
        let mut v = [0.0f32; 8];
        for (i, w) in u.iter().enumerate() {
            (v[2 * i], v[2 * i + 1]) = unpack(*w);
        }
        v
    }
}

#[inline]
fn pack(a: f32, b: f32) -> u64 {
    u64::from(a.to_bits()) | (u64::from(b.to_bits()) << 32)
}

#[inline]
fn unpack(w: u64) -> (f32, f32) {
    (f32::from_bits(w as u32), f32::from_bits((w >> 32) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_vectors_round_trip_and_dot_at_odd_and_even_dimensions() {
        for k in [1, 2, 5, 8, 19, 64] {
            let store = ItemFactors::new(k, 0.1, 3);
            let v: Vec<f32> = (0..k).map(|i| i as f32 * 0.5 - 3.0).collect();
            let q: Vec<f32> = (0..k).map(|i| (i as f32).sin()).collect();
            assert!(store.load(7, &v));
            assert_eq!(store.get(7), Some(v.clone()), "k = {k}");
            let naive: f32 = v.iter().zip(&q).map(|(x, y)| x * y).sum();
            let score = store.score(7, &q).unwrap();
            assert!((score - naive).abs() < 1e-4, "k = {k}: {score} vs {naive}");
            // A shorter query uses the dimensions both have.
            let short: f32 = v.iter().zip(&q[..k / 2]).map(|(x, y)| x * y).sum();
            assert!((store.score(7, &q[..k / 2]).unwrap() - short).abs() < 1e-4);
            let mut out = vec![9.0; k + 1];
            assert!(store.read_into(7, &mut out));
            assert_eq!(&out[..k], &v[..]);
            assert_eq!(out[k], 9.0, "k = {k}: read past the vector");
        }
    }

    #[test]
    fn items_are_initialised_deterministically_and_grow_on_demand() {
        let a = ItemFactors::new(8, 0.1, 7);
        let b = ItemFactors::new(8, 0.1, 7);
        assert!(a.get(5).is_none());
        assert!(a.ensure_known(3000));
        assert!(!a.ensure_known(3000));
        assert!(b.ensure_known(3000));
        assert_eq!(a.get(3000), b.get(3000));
        assert_eq!(a.len(), 1);
        assert_eq!(a.capacity(), 3 * CHUNK_ITEMS);
        assert!(!a.is_known(5));
        let v = a.get(3000).unwrap();
        assert!(v.iter().all(|x| x.abs() <= 0.1 / 8f32.sqrt()));
        assert!(v.iter().any(|x| *x != 0.0));
        let mut seen = Vec::new();
        a.for_each_known(|i, _| seen.push(i));
        assert_eq!(seen, vec![3000]);
    }

    #[test]
    fn loaded_vectors_are_known_and_read_back() {
        let a = ItemFactors::new(2, 0.1, 7);
        assert!(a.load(1500, &[0.5, -1.0]));
        assert_eq!(a.get(1500), Some(vec![0.5, -1.0]));
        assert_eq!(a.len(), 1);
        assert!(!a.load(3, &[1.0]));
        assert!(!a.load(3, &[1.0, f32::NAN]));
        assert!(!a.is_known(3));
    }
}
