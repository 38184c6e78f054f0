//! Model versions: [`ModelStore`] for [`EmbeddedStore`], on the `models` keyspace.
//!
//! Keys: `v` + id (u64 big-endian) → postcard [`ModelVersion`]; `s` + id → the snapshot;
//! `rollbacks` → postcard [`Rollbacks`]. One process owns the directory, so the learner
//! lease is always granted.

use async_trait::async_trait;
use reflex_core::{ModelStore, ModelVersion, Result, Rollbacks};

use super::{EmbeddedStore, Handles, Shared, StoreError, decode, encode};

const ROLLBACKS_KEY: &[u8] = b"rollbacks";

fn key(prefix: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

impl Shared {
    fn versions_blocking(h: &Handles) -> Result<Vec<ModelVersion>, StoreError> {
        h.models
            .prefix(b"v")
            .map(|guard| {
                let (k, value) = guard.into_inner()?;
                decode(&value, "model version", &k)
            })
            .collect()
    }

    fn save_blocking(
        &self,
        h: &Handles,
        mut version: ModelVersion,
        snapshot: Vec<u8>,
    ) -> Result<ModelVersion, StoreError> {
        let _writer = self.catalog_writer.lock();
        let last = h
            .models
            .prefix(b"v")
            .next_back()
            .map(|guard| guard.into_inner())
            .transpose()?;
        version.id = match last {
            Some((k, value)) => decode::<ModelVersion>(&value, "model version", &k)?.id + 1,
            None => 1,
        };
        version.bytes = snapshot.len() as u64;
        let mut batch = h.db.batch().durability(Some(self.persist));
        batch.insert(&h.models, key(b's', version.id), snapshot);
        batch.insert(
            &h.models,
            key(b'v', version.id),
            encode(&version, "model version")?,
        );
        self.commit(batch)?;
        Ok(version)
    }

    fn rollbacks_blocking(h: &Handles) -> Result<Rollbacks, StoreError> {
        match h.models.get(ROLLBACKS_KEY)? {
            Some(v) => decode(&v, "rollbacks", ROLLBACKS_KEY),
            None => Ok(Rollbacks::default()),
        }
    }

    fn prune_blocking(&self, h: &Handles, keep: usize) -> Result<usize, StoreError> {
        let _writer = self.catalog_writer.lock();
        let versions = Self::versions_blocking(h)?;
        let protected = Self::rollbacks_blocking(h)?.version;
        let excess = versions.len().saturating_sub(keep);
        let mut batch = h.db.batch().durability(Some(self.persist));
        let mut pruned = 0;
        for v in versions.iter().take(excess).filter(|v| v.id != protected) {
            batch.remove(&h.models, key(b'v', v.id));
            batch.remove(&h.models, key(b's', v.id));
            pruned += 1;
        }
        self.commit(batch)?;
        Ok(pruned)
    }

    fn record_rollback_blocking(&self, h: &Handles, version: u64) -> Result<Rollbacks, StoreError> {
        let _writer = self.catalog_writer.lock();
        let mut r = Self::rollbacks_blocking(h)?;
        r.generation += 1;
        r.version = version;
        let mut batch = h.db.batch().durability(Some(self.persist));
        batch.insert(&h.models, ROLLBACKS_KEY, encode(&r, "rollbacks")?);
        self.commit(batch)?;
        Ok(r)
    }
}

#[async_trait]
impl ModelStore for EmbeddedStore {
    async fn save(&self, version: ModelVersion, snapshot: Vec<u8>) -> Result<ModelVersion> {
        self.blocking("saving a model version", move |s, h| {
            s.save_blocking(h, version, snapshot)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ModelVersion>> {
        self.blocking("listing model versions", |_, h| {
            Shared::versions_blocking(h)
        })
        .await
    }

    async fn load(&self, id: u64) -> Result<Option<Vec<u8>>> {
        self.blocking("loading a model version", move |_, h| {
            Ok(h.models.get(key(b's', id))?.map(|v| v.to_vec()))
        })
        .await
    }

    async fn prune(&self, keep: usize) -> Result<usize> {
        self.blocking("pruning model versions", move |s, h| {
            s.prune_blocking(h, keep)
        })
        .await
    }

    async fn rollbacks(&self) -> Result<Rollbacks> {
        self.blocking("reading the rollback record", |_, h| {
            Shared::rollbacks_blocking(h)
        })
        .await
    }

    async fn record_rollback(&self, version: u64) -> Result<Rollbacks> {
        self.blocking("recording a rollback", move |s, h| {
            s.record_rollback_blocking(h, version)
        })
        .await
    }

    async fn acquire_lease(&self, _name: &str, _holder: &str, _ttl_ms: u64) -> Result<bool> {
        Ok(true)
    }

    async fn release_lease(&self, _name: &str, _holder: &str) -> Result<()> {
        Ok(())
    }
}
