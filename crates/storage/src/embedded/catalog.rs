//! The catalog: [`CatalogStore`] for [`EmbeddedStore`], on the `items` keyspace.

use async_trait::async_trait;
use reflex_core::{CatalogStore, Item, ItemId, Result};

use super::{EmbeddedStore, Shared, StoreError, decode, encode, fault};

impl Shared {
    fn upsert_blocking(&self, encoded: Vec<(ItemId, Vec<u8>)>) -> Result<(), StoreError> {
        let mut batch = self.db.batch().durability(Some(self.persist));
        for (id, value) in encoded {
            batch.insert(&self.items, id.as_str().as_bytes(), value);
        }
        let _writer = self.catalog_writer.lock();
        batch.commit()?;
        Ok(())
    }

    fn delete_blocking(&self, id: &ItemId) -> Result<bool, StoreError> {
        let key = id.as_str().as_bytes();
        let _writer = self.catalog_writer.lock();
        if !self.items.contains_key(key)? {
            return Ok(false);
        }
        let mut batch = self.db.batch().durability(Some(self.persist));
        batch.remove(&self.items, key);
        batch.commit()?;
        Ok(true)
    }

    fn load_all_blocking(&self) -> Result<Vec<Item>, StoreError> {
        self.items
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
        self.blocking("upserting catalog items", move |s| {
            s.upsert_blocking(encoded)
        })
        .await
    }

    async fn get(&self, item: &ItemId) -> Result<Option<Item>> {
        let id = item.clone();
        self.blocking("reading a catalog item", move |s| {
            let key = id.as_str().as_bytes();
            s.items
                .get(key)?
                .map(|value| decode(&value, "catalog item", key))
                .transpose()
        })
        .await
    }

    async fn delete(&self, item: &ItemId) -> Result<bool> {
        let id = item.clone();
        self.blocking("deleting a catalog item", move |s| s.delete_blocking(&id))
            .await
    }

    async fn load_all(&self) -> Result<Vec<Item>> {
        self.blocking("loading the catalog", |s| s.load_all_blocking())
            .await
    }
}
