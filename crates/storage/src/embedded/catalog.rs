//! The catalog: [`CatalogStore`] for [`EmbeddedStore`], on the `items` keyspace.

use async_trait::async_trait;
use reflex_core::{CatalogStore, Item, ItemId, Result};

use super::{EmbeddedStore, Handles, Shared, StoreError, decode, encode, fault};

impl Shared {
    fn upsert_blocking(
        &self,
        h: &Handles,
        encoded: Vec<(ItemId, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let mut batch = h.db.batch().durability(Some(self.persist));
        for (id, value) in encoded {
            batch.insert(&h.items, id.as_str().as_bytes(), value);
        }
        let _writer = self.catalog_writer.lock();
        self.commit(batch)
    }

    fn delete_blocking(&self, h: &Handles, id: &ItemId) -> Result<bool, StoreError> {
        let key = id.as_str().as_bytes();
        let _writer = self.catalog_writer.lock();
        if !h.items.contains_key(key)? {
            return Ok(false);
        }
        let mut batch = h.db.batch().durability(Some(self.persist));
        batch.remove(&h.items, key);
        self.commit(batch)?;
        Ok(true)
    }

    fn load_all_blocking(h: &Handles) -> Result<Vec<Item>, StoreError> {
        h.items
            .iter()
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                decode(&value, "catalog item", &key)
            })
            .collect()
    }
}

#[async_trait]
impl CatalogStore for EmbeddedStore {
    /// Writes every item in one batch with the configured durability.
    async fn upsert(&self, items: &[Item]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        // Encode here: the blocking task needs owned data, and encoded bytes are that.
        let encoded = items
            .iter()
            .map(|item| Ok((item.item_id.clone(), encode(item, "catalog item")?)))
            .collect::<Result<Vec<_>, StoreError>>()
            .map_err(fault("encoding catalog items"))?;
        self.blocking("upserting catalog items", move |s, h| {
            s.upsert_blocking(h, encoded)
        })
        .await
    }

    async fn get(&self, item: &ItemId) -> Result<Option<Item>> {
        let id = item.clone();
        self.blocking("reading a catalog item", move |_, h| {
            let key = id.as_str().as_bytes();
            h.items
                .get(key)?
                .map(|value| decode(&value, "catalog item", key))
                .transpose()
        })
        .await
    }

    async fn delete(&self, item: &ItemId) -> Result<bool> {
        let id = item.clone();
        self.blocking("deleting a catalog item", move |s, h| {
            s.delete_blocking(h, &id)
        })
        .await
    }

    async fn load_all(&self) -> Result<Vec<Item>> {
        self.blocking("loading the catalog", |_, h| Shared::load_all_blocking(h))
            .await
    }
}
