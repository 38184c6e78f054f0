//! The catalog: item metadata, and the dense item index every model and retriever shares.
//!
//! Models address items by [`ItemIdx`], a dense `u32` handed out the first time an item
//! is seen (in an event or a catalog upsert). The index is append-only and lock-free to
//! read, so recommendation filters can check availability and categories per candidate
//! without taking a lock.

use std::sync::Arc;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::types::{IdHashState, ItemId, MAX_CUSTOM_KIND_LEN};

/// Dense index of an item inside this process.
pub type ItemIdx = u32;

/// Most categories on one item.
pub const MAX_CATEGORIES: usize = 32;
/// Longest embedding accepted.
pub const MAX_EMBEDDING_DIM: usize = 4096;
/// Longest title, in bytes.
pub const MAX_TITLE_LEN: usize = 1024;

/// One catalog entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The item.
    pub item_id: ItemId,
    /// Human-readable title.
    pub title: String,
    /// Categories, for include/exclude filters.
    pub categories: Vec<String>,
    /// Whether the item may be recommended.
    pub available: bool,
    /// Content embedding computed upstream; empty when none.
    pub embedding: Vec<f32>,
}

impl Item {
    /// Checks bounds of everything but the id (validated when parsed); `field` prefixes errors.
    pub fn validate(&self, field: &str) -> Result<()> {
        if self.title.len() > MAX_TITLE_LEN {
            return Err(Error::invalid(
                format!("{field}.title"),
                format!("is longer than {MAX_TITLE_LEN} bytes"),
            ));
        }
        if self.categories.len() > MAX_CATEGORIES {
            return Err(Error::invalid(
                format!("{field}.categories"),
                format!("has more than {MAX_CATEGORIES} entries"),
            ));
        }
        if let Some(bad) = self
            .categories
            .iter()
            .find(|c| c.is_empty() || c.len() > MAX_CUSTOM_KIND_LEN)
        {
            return Err(Error::invalid(
                format!("{field}.categories"),
                format!("category {bad:?} must be 1 to {MAX_CUSTOM_KIND_LEN} bytes"),
            ));
        }
        if self.embedding.len() > MAX_EMBEDDING_DIM {
            return Err(Error::invalid(
                format!("{field}.embedding"),
                format!("has more than {MAX_EMBEDDING_DIM} values"),
            ));
        }
        if self.embedding.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(
                format!("{field}.embedding"),
                "must be all finite",
            ));
        }
        Ok(())
    }
}

/// What filters need to know about an item, swapped atomically on catalog changes.
#[derive(Debug, Default, Clone)]
pub struct ItemMeta {
    /// In the catalog (an item only seen in events is not).
    pub in_catalog: bool,
    /// May be recommended.
    pub available: bool,
    /// Categories.
    pub categories: Vec<String>,
    /// The catalog gave it a content embedding.
    pub has_embedding: bool,
}

struct Slot {
    id: ItemId,
    meta: ArcSwap<ItemMeta>,
}

/// Interner from [`ItemId`] to [`ItemIdx`] plus per-item filter metadata.
pub struct ItemIndex {
    by_id: DashMap<Arc<str>, ItemIdx, IdHashState>,
    slots: boxcar::Vec<Slot>,
}

impl Default for ItemIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl ItemIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            by_id: DashMap::with_hasher(IdHashState::default()),
            slots: boxcar::Vec::new(),
        }
    }

    /// The index of `id`, assigning the next one the first time; items first seen in
    /// events count as available until the catalog says otherwise.
    pub fn intern(&self, id: &ItemId) -> ItemIdx {
        if let Some(idx) = self.by_id.get(id.as_str()) {
            return *idx;
        }
        *self.by_id.entry(id.as_arc().clone()).or_insert_with(|| {
            let meta = ItemMeta {
                in_catalog: false,
                available: true,
                categories: Vec::new(),
                has_embedding: false,
            };
            self.slots.push(Slot {
                id: id.clone(),
                meta: ArcSwap::from_pointee(meta),
            }) as ItemIdx
        })
    }

    /// Interns `id` (see [`intern`](Self::intern)) and makes it share the index's string,
    /// so a profile that keeps it holds no copy of its own: a profile's recent items
    /// then cost a pointer each, not a string allocation per event.
    pub fn canonicalize(&self, id: &mut ItemId) -> ItemIdx {
        let idx = self.intern(id);
        if let Some(shared) = self.id(idx)
            && !Arc::ptr_eq(shared.as_arc(), id.as_arc())
        {
            *id = shared.clone();
        }
        idx
    }

    /// The index of `id` if it was ever seen.
    pub fn get(&self, id: &str) -> Option<ItemIdx> {
        self.by_id.get(id).map(|r| *r)
    }

    /// The id at `idx`.
    pub fn id(&self, idx: ItemIdx) -> Option<&ItemId> {
        self.slots.get(idx as usize).map(|s| &s.id)
    }

    /// Filter metadata of `idx`.
    pub fn meta(&self, idx: ItemIdx) -> Option<arc_swap::Guard<Arc<ItemMeta>>> {
        self.slots.get(idx as usize).map(|s| s.meta.load())
    }

    /// Records a catalog upsert.
    pub fn set_catalog(&self, item: &Item) -> ItemIdx {
        let idx = self.intern(&item.item_id);
        if let Some(slot) = self.slots.get(idx as usize) {
            slot.meta.store(Arc::new(ItemMeta {
                in_catalog: true,
                available: item.available,
                categories: item.categories.clone(),
                has_embedding: !item.embedding.is_empty(),
            }));
        }
        idx
    }

    /// Records a catalog delete: the item stays known to models but is never recommended.
    pub fn set_deleted(&self, id: &ItemId) {
        if let Some(idx) = self.get(id.as_str())
            && let Some(slot) = self.slots.get(idx as usize)
        {
            slot.meta.store(Arc::new(ItemMeta {
                in_catalog: false,
                available: false,
                categories: Vec::new(),
                has_embedding: false,
            }));
        }
    }

    /// Number of items ever seen.
    pub fn len(&self) -> usize {
        self.slots.count()
    }

    /// Whether no item was ever seen.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ItemId {
        ItemId::parse(s, "item_id").unwrap()
    }

    #[test]
    fn canonical_ids_share_the_index_string() {
        let index = ItemIndex::default();
        let mut first = id("milk");
        let mut second = id("milk");
        assert!(!Arc::ptr_eq(first.as_arc(), second.as_arc()));
        assert_eq!(index.canonicalize(&mut first), 0);
        assert_eq!(index.canonicalize(&mut second), 0);
        assert!(Arc::ptr_eq(first.as_arc(), second.as_arc()));
        assert_eq!(second.as_str(), "milk");
        assert_eq!(index.canonicalize(&mut id("bread")), 1);
    }

    #[test]
    fn interning_is_stable_and_dense() {
        let index = ItemIndex::new();
        assert_eq!(index.intern(&id("a")), 0);
        assert_eq!(index.intern(&id("b")), 1);
        assert_eq!(index.intern(&id("a")), 0);
        assert_eq!(index.len(), 2);
        assert_eq!(index.id(1).unwrap().as_str(), "b");
        assert!(index.meta(0).unwrap().available);
    }

    #[test]
    fn catalog_changes_are_visible_to_filters() {
        let index = ItemIndex::new();
        let idx = index.set_catalog(&Item {
            item_id: id("shoe"),
            title: "Shoe".into(),
            categories: vec!["shoes".into()],
            available: false,
            embedding: vec![],
        });
        let meta = index.meta(idx).unwrap();
        assert!(meta.in_catalog && !meta.available);
        assert_eq!(meta.categories, vec!["shoes".to_string()]);
        index.set_deleted(&id("shoe"));
        assert!(!index.meta(idx).unwrap().in_catalog);
    }

    #[test]
    fn item_validation_names_the_field() {
        let mut item = Item {
            item_id: id("x"),
            title: String::new(),
            categories: vec![String::new()],
            available: true,
            embedding: vec![],
        };
        let err = item.validate("items[2]").unwrap_err().to_string();
        assert!(err.contains("items[2].categories"), "{err}");
        item.categories.clear();
        item.embedding = vec![f32::NAN];
        let err = item.validate("items[2]").unwrap_err().to_string();
        assert!(err.contains("items[2].embedding"), "{err}");
    }
}
