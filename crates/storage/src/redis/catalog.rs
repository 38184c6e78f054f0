//! The catalog in Redis: [`CatalogStore`] for [`RedisStore`], one hash of items and a
//! version counter that replicas watch.

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::{HashesInterface, KeysInterface, Value};
use fred::types::scan::Scanner;
use futures_util::StreamExt;
use reflex_core::{CatalogStore, Item, ItemId, Result};

use super::store::{RedisStore, decode, encode, redis_error, reply_error};

#[async_trait]
impl CatalogStore for RedisStore {
    async fn upsert(&self, items: &[Item]) -> Result<()> {
        let context = "writing catalog items to redis";
        if items.is_empty() {
            return Ok(());
        }
        let mut args: Vec<Value> = Vec::with_capacity(items.len() * 2);
        for item in items {
            args.push(Value::from(item.item_id.as_str()));
            args.push(Value::Bytes(Bytes::from(encode(item, context)?)));
        }
        // One script: all items and the version bump, or nothing.
        self.run(
            &self.catalog_upsert,
            vec![self.catalog_key.clone(), self.catalog_version_key.clone()],
            args,
        )
        .await
        .map_err(|e| redis_error(context, e))?;
        Ok(())
    }

    async fn get(&self, item: &ItemId) -> Result<Option<Item>> {
        let context = "reading a catalog item from redis";
        let bytes: Option<Bytes> = self
            .pool
            .next()
            .hget(&self.catalog_key, item.as_str())
            .await
            .map_err(|e| redis_error(context, e))?;
        bytes.map(|b| decode(&b, context)).transpose()
    }

    async fn delete(&self, item: &ItemId) -> Result<bool> {
        let context = "deleting a catalog item in redis";
        let removed = self
            .run(
                &self.catalog_delete,
                vec![self.catalog_key.clone(), self.catalog_version_key.clone()],
                vec![Value::from(item.as_str())],
            )
            .await
            .map_err(|e| redis_error(context, e))?;
        Ok(removed.as_u64().is_some_and(|n| n > 0))
    }

    async fn load_all(&self) -> Result<Vec<Item>> {
        let context = "loading the catalog from redis";
        let client = self.pool.next();
        let mut pages = std::pin::pin!(client.hscan(&self.catalog_key, "*", Some(1000)));
        let mut items = Vec::new();
        while let Some(page) = pages.next().await {
            let mut page = page.map_err(|e| redis_error(context, e))?;
            if let Some(map) = page.take_results() {
                for (_, value) in map.iter() {
                    let bytes = value
                        .as_bytes()
                        .ok_or_else(|| reply_error(context, format!("{value:?}")))?;
                    items.push(decode(bytes, context)?);
                }
            }
        }
        Ok(items)
    }

    async fn version(&self) -> Result<u64> {
        let v: Option<u64> = self
            .pool
            .next()
            .get(&self.catalog_version_key)
            .await
            .map_err(|e| redis_error("reading the redis catalog version", e))?;
        Ok(v.unwrap_or(0))
    }
}
