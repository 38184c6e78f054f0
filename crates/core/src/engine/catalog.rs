//! The catalog: item upserts, reads and deletes, and keeping the item index (and the
//! content model) in step with the stored catalog.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Engine;
use crate::catalog::{Item, ItemIdx, ItemIndex};
use crate::error::{Error, Result};
use crate::types::ItemId;

impl Engine {
    /// Validates and stores catalog items, then makes them visible to filters.
    pub async fn upsert_items(&self, items: Vec<Item>) -> Result<usize> {
        for (i, item) in items.iter().enumerate() {
            item.validate(&format!("items[{i}]"))?;
            if let Some((content, _)) = &self.content
                && !item.embedding.is_empty()
                && item.embedding.len() != content.dim()
            {
                return Err(Error::invalid(
                    format!("items[{i}].embedding"),
                    format!(
                        "has {} values; the content model takes {}",
                        item.embedding.len(),
                        content.dim()
                    ),
                ));
            }
        }
        self.backends.catalog.upsert(&items).await?;
        for item in &items {
            self.index_item(item);
        }
        Ok(items.len())
    }

    /// One catalog item.
    pub async fn item(&self, item: &ItemId) -> Result<Item> {
        self.backends
            .catalog
            .get(item)
            .await?
            .ok_or_else(|| Error::NotFound(format!("item {item:?}")))
    }

    /// Deletes a catalog item; it is never recommended again until upserted.
    pub async fn delete_item(&self, item: &ItemId) -> Result<bool> {
        let deleted = self.backends.catalog.delete(item).await?;
        self.backends.items.set_deleted(item);
        self.catalog_generation.fetch_add(1, Ordering::Relaxed);
        Ok(deleted)
    }

    /// Records a stored catalog item in the item index and, when it has an embedding, in
    /// the content model.
    pub(super) fn index_item(&self, item: &Item) {
        self.catalog_generation.fetch_add(1, Ordering::Relaxed);
        let idx = self.backends.items.set_catalog(item);
        if let Some(signals) = &self.signals {
            signals.set_item_category(idx, item.categories.first().map(String::as_str));
        }
        if let Some((content, _)) = &self.content
            && item.embedding.len() == content.dim()
        {
            content.set_item(idx, &item.embedding);
        }
    }

    /// Makes the item index match the stored catalog, upserts and deletes alike.
    pub(super) async fn reload_catalog(&self) -> Result<()> {
        self.catalog_generation.fetch_add(1, Ordering::Relaxed);
        let items = &self.backends.items;
        let stored = self.backends.catalog.load_all().await?;
        let present: HashSet<&str> = stored.iter().map(|i| i.item_id.as_str()).collect();
        for idx in 0..items.len() as ItemIdx {
            if let (Some(id), Some(meta)) = (items.id(idx), items.meta(idx))
                && meta.in_catalog
                && !present.contains(id.as_str())
            {
                items.set_deleted(id);
            }
        }
        for item in &stored {
            self.index_item(item);
        }
        Ok(())
    }

    /// The shared item index.
    pub fn items(&self) -> &Arc<ItemIndex> {
        &self.backends.items
    }
}
