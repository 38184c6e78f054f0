//! The catalog in Scylla: [`CatalogStore`] for [`ScyllaStore`], one row per item and a
//! counter that replicas watch.

use async_trait::async_trait;
use futures_util::TryStreamExt;
use reflex_core::{CatalogStore, Error, Item, ItemId, Result};
use scylla::statement::batch::{Batch, BatchType};
use scylla::value::Counter;

use super::rows::{ItemRow, item_values};
use super::store::{ScyllaStore, exec_error, pager_error, row_stream_error};

#[async_trait]
impl CatalogStore for ScyllaStore {
    async fn upsert(&self, items: &[Item]) -> Result<()> {
        let context = "writing catalog items to scylla";
        if items.is_empty() {
            return Ok(());
        }
        // One logged batch: every item lands or (after a failure the batch log cannot
        // repair) none does; then the version moves so other replicas reload.
        let mut batch = Batch::new(BatchType::Logged);
        let values: Vec<_> = items.iter().map(item_values).collect();
        for _ in items {
            batch.append_statement(self.st.upsert_item.clone());
        }
        batch.set_is_idempotent(true);
        self.session
            .batch(&batch, values)
            .await
            .map_err(|e| exec_error(context, e))?;
        self.exec(&self.st.bump_catalog_version, (), context)
            .await?;
        Ok(())
    }

    async fn get(&self, item: &ItemId) -> Result<Option<Item>> {
        let context = "reading a catalog item from scylla";
        let row: Option<ItemRow> = self
            .first_row(&self.st.select_item, (item.as_str(),), context)
            .await?;
        row.map(|r| r.into_item().map_err(|e| Error::storage(context, e)))
            .transpose()
    }

    async fn delete(&self, item: &ItemId) -> Result<bool> {
        let context = "deleting a catalog item in scylla";
        // Read, then a plain delete: two concurrent deletes may both answer `true`, which
        // is harmless, and catalog rows stay free of lightweight transactions (mixing
        // them with plain upserts of the same rows is unsafe in Scylla).
        if CatalogStore::get(self, item).await?.is_none() {
            return Ok(false);
        }
        self.exec(&self.st.delete_item, (item.as_str(),), context)
            .await?;
        self.exec(&self.st.bump_catalog_version, (), context)
            .await?;
        Ok(true)
    }

    async fn load_all(&self) -> Result<Vec<Item>> {
        let context = "loading the catalog from scylla";
        let rows: Vec<ItemRow> = self
            .session
            .execute_iter(self.st.scan_items.clone(), ())
            .await
            .map_err(|e| pager_error(context, e))?
            .rows_stream::<ItemRow>()
            .map_err(|e| Error::storage(context, e))?
            .map_err(|e| row_stream_error(context, e))
            .try_collect()
            .await?;
        rows.into_iter()
            .map(|r| r.into_item().map_err(|e| Error::storage(context, e)))
            .collect()
    }

    async fn version(&self) -> Result<u64> {
        let context = "reading the scylla catalog version";
        let row: Option<(Option<Counter>,)> = self
            .first_row(&self.st.select_catalog_version, (), context)
            .await?;
        Ok(row
            .and_then(|(v,)| v)
            .map_or(0, |Counter(v)| v.max(0) as u64))
    }
}
