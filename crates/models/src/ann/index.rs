//! A thin owner of one usearch HNSW index: options from [`AnnConfig`], inner-product
//! metric, `ItemIdx` keys, and the few operations the retriever needs, with usearch's
//! C++ exceptions turned into [`AnnError`].
//!
//! usearch's `Index` is `Send + Sync`, and `add`, `remove` and `search` may run on many
//! threads at once, each borrowing one of the per-thread contexts reserved ahead (an
//! operation that finds none free fails instead of waiting). `reserve` is different: the
//! header says no add or search may run during it. So a published index is never
//! reserved again; [`HnswIndex::grown`] copies it into a larger one off to the side
//! instead, which the retriever swaps in.

use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use reflex_core::ItemIdx;

use super::{AnnConfig, AnnError, Quantization};

/// Slots added at least when an index grows, so small indexes do not copy themselves
/// every few inserts.
const MIN_GROWTH: usize = 1024;

/// One HNSW index over item vectors.
pub(crate) struct HnswIndex {
    index: Index,
    /// Per-thread contexts reserved: concurrent searches plus builders plus the drainer.
    threads: usize,
}

impl HnswIndex {
    /// An empty index of `dims`-dimensional vectors with room for `capacity` of them.
    pub(crate) fn new(dims: usize, config: &AnnConfig, capacity: usize) -> Result<Self, AnnError> {
        let options = IndexOptions {
            dimensions: dims,
            metric: MetricKind::IP,
            // usearch's own default is BF16; the choice is always explicit here.
            quantization: match config.quantization {
                Quantization::F32 => ScalarKind::F32,
                Quantization::F16 => ScalarKind::F16,
                Quantization::I8 => ScalarKind::I8,
            },
            connectivity: config.connectivity,
            expansion_add: config.expansion_add,
            expansion_search: config.expansion_search,
            multi: false,
        };
        let index = Index::new(&options).map_err(|e| AnnError::usearch("create", &e))?;
        let this = Self {
            index,
            threads: config.index_threads(),
        };
        this.index
            .reserve_capacity_and_threads(capacity.max(MIN_GROWTH), this.threads)
            .map_err(|e| AnnError::usearch("reserve", &e))?;
        Ok(this)
    }

    /// Vectors held.
    pub(crate) fn size(&self) -> usize {
        self.index.size()
    }

    /// Vectors it has room for without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.index.capacity()
    }

    /// Whether `item` has a vector in the index.
    pub(crate) fn contains(&self, item: ItemIdx) -> bool {
        self.index.contains(u64::from(item))
    }

    /// The vector stored for `item` (after quantisation, as `f32`).
    pub(crate) fn vector(&self, item: ItemIdx) -> Option<Vec<f32>> {
        let mut out = vec![0.0f32; self.index.dimensions()];
        match self.index.get(u64::from(item), &mut out) {
            Ok(1) => Some(out),
            _ => None,
        }
    }

    /// Inserts `item`, or replaces its vector. usearch refuses a second `add` of a key in
    /// a unique index, so a present key is removed first; the freed node is reused by
    /// the add. Only one thread may replace a given key at a time (the drainer, or one
    /// builder per key).
    pub(crate) fn upsert(&self, item: ItemIdx, vector: &[f32]) -> Result<(), AnnError> {
        let key = u64::from(item);
        if self.index.contains(key) {
            self.index
                .remove(key)
                .map_err(|e| AnnError::usearch("remove", &e))?;
        }
        self.index
            .add(key, vector)
            .map_err(|e| AnnError::usearch("add", &e))
    }

    /// Removes `item` if present.
    pub(crate) fn remove(&self, item: ItemIdx) -> Result<(), AnnError> {
        self.index
            .remove(u64::from(item))
            .map(|_| ())
            .map_err(|e| AnnError::usearch("remove", &e))
    }

    /// Up to `count` keys nearest to `query` by inner product among those `allow`
    /// accepts, best first by the index's (possibly quantised) distance.
    pub(crate) fn filtered_search(
        &self,
        query: &[f32],
        count: usize,
        allow: impl Fn(u64) -> bool,
    ) -> Result<Vec<u64>, AnnError> {
        self.index
            .filtered_search(query, count, allow)
            .map(|m| m.keys)
            .map_err(|e| AnnError::usearch("search", &e))
    }

    /// How many slots an index of `size` vectors needing `incoming` more should have.
    pub(crate) fn capacity_for(size: usize, incoming: usize) -> usize {
        let needed = size.saturating_add(incoming);
        needed.saturating_add((needed / 2).max(MIN_GROWTH))
    }

    /// A copy of this index with room for at least `capacity` vectors, made by
    /// serialising it and loading the bytes into a new index: a memory copy rather than
    /// re-inserting every vector into a new graph. Searches may run on `self` meanwhile;
    /// adds to `self` must not (the caller holds the drain lock).
    pub(crate) fn grown(&self, config: &AnnConfig, capacity: usize) -> Result<Self, AnnError> {
        let mut bytes = vec![0u8; self.index.serialized_length()];
        self.index
            .save_to_buffer(&mut bytes)
            .map_err(|e| AnnError::usearch("serialise", &e))?;
        let index =
            Index::restore_from_buffer(&bytes).map_err(|e| AnnError::usearch("load", &e))?;
        drop(bytes);
        index
            .reserve_capacity_and_threads(capacity.max(self.capacity()), self.threads)
            .map_err(|e| AnnError::usearch("reserve", &e))?;
        let copy = Self {
            index,
            threads: self.threads,
        };
        // Expansion settings are not part of the header; set them again.
        copy.set_expansions(config);
        Ok(copy)
    }

    /// Sets the beam widths. usearch stores them as plain fields that searches read, so
    /// this is only for an index no other thread can reach yet.
    pub(crate) fn set_expansions(&self, config: &AnnConfig) {
        self.index.change_expansion_add(config.expansion_add);
        self.index.change_expansion_search(config.expansion_search);
    }

    /// Settings as usearch reports them, for checks.
    pub(crate) fn describe(&self) -> IndexShape {
        IndexShape {
            dimensions: self.index.dimensions(),
            connectivity: self.index.connectivity(),
            expansion_add: self.index.expansion_add(),
            expansion_search: self.index.expansion_search(),
            inner_product: self.index.metric_kind() == MetricKind::IP,
            scalar: format!("{:?}", self.index.scalar_kind()),
            memory_bytes: self.index.memory_usage(),
        }
    }
}

/// Settings of the live index as usearch reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexShape {
    /// Vector dimension.
    pub dimensions: usize,
    /// Graph connectivity (M).
    pub connectivity: usize,
    /// Beam width while inserting.
    pub expansion_add: usize,
    /// Beam width while searching.
    pub expansion_search: usize,
    /// Whether the metric is inner product.
    pub inner_product: bool,
    /// Stored scalar kind (`F32`, `F16`, `I8`).
    pub scalar: String,
    /// usearch's estimate of its memory use, in bytes.
    pub memory_bytes: usize,
}
