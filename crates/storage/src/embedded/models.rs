//! Model versions: [`ModelStore`] for [`EmbeddedStore`], on the `models` keyspace.
//!
//! Keys: `v` + id (u64 big-endian) → postcard [`ModelVersion`]; `s` + id → the snapshot;
//! `rollbacks` → postcard [`Rollbacks`]. One process owns the directory, so the learner
//! lease is always granted.

use async_trait::async_trait;
use reflex_core::{ModelStore, ModelVersion, Result, Rollbacks};

use super::{EmbeddedStore, Shared, StoreError, decode, encode};

const ROLLBACKS_KEY: &[u8] = b"rollbacks";

fn key(prefix: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

impl Shared {
    fn versions_blocking(&self) -> Result<Vec<ModelVersion>, StoreError> {
        self.models
            .prefix(b"v")
            .map(|guard| {
                let (k, value) = guard.into_inner()?;
                decode(&value, "model version", &k)
            })
            .collect()
    }

    fn save_blocking(
        &self,
        mut version: ModelVersion,
        snapshot: Vec<u8>,
    ) -> Result<ModelVersion, StoreError> {
        let _writer = self.catalog_writer.lock();
        let last = self
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
        let mut batch = self.db.batch().durability(Some(self.persist));
        batch.insert(&self.models, key(b's', version.id), snapshot);
        batch.insert(
            &self.models,
            key(b'v', version.id),
            encode(&version, "model version")?,
        );
        batch.commit()?;
        Ok(version)
    }

    fn rollbacks_blocking(&self) -> Result<Rollbacks, StoreError> {
        match self.models.get(ROLLBACKS_KEY)? {
            Some(v) => decode(&v, "rollbacks", ROLLBACKS_KEY),
            None => Ok(Rollbacks::default()),
        }
    }

    fn prune_blocking(&self, keep: usize) -> Result<usize, StoreError> {
        let _writer = self.catalog_writer.lock();
        let versions = self.versions_blocking()?;
        let protected = self.rollbacks_blocking()?.version;
        let excess = versions.len().saturating_sub(keep);
        let mut batch = self.db.batch().durability(Some(self.persist));
        let mut pruned = 0;
        for v in versions.iter().take(excess).filter(|v| v.id != protected) {
            batch.remove(&self.models, key(b'v', v.id));
            batch.remove(&self.models, key(b's', v.id));
            pruned += 1;
        }
        batch.commit()?;
        Ok(pruned)
    }
}

#[async_trait]
impl ModelStore for EmbeddedStore {
    async fn save(&self, version: ModelVersion, snapshot: Vec<u8>) -> Result<ModelVersion> {
        self.blocking("saving a model version", move |s| {
            s.save_blocking(version, snapshot)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<ModelVersion>> {
        self.blocking("listing model versions", |s| s.versions_blocking())
            .await
    }

    async fn load(&self, id: u64) -> Result<Option<Vec<u8>>> {
        self.blocking("loading a model version", move |s| {
            Ok(s.models.get(key(b's', id))?.map(|v| v.to_vec()))
        })
        .await
    }

    async fn prune(&self, keep: usize) -> Result<usize> {
        self.blocking("pruning model versions", move |s| s.prune_blocking(keep))
            .await
    }

    async fn rollbacks(&self) -> Result<Rollbacks> {
        self.blocking("reading the rollback record", |s| s.rollbacks_blocking())
            .await
    }

    async fn record_rollback(&self, version: u64) -> Result<Rollbacks> {
        self.blocking("recording a rollback", move |s| {
            let _writer = s.catalog_writer.lock();
            let mut r = s.rollbacks_blocking()?;
            r.generation += 1;
            r.version = version;
            let mut batch = s.db.batch().durability(Some(s.persist));
            batch.insert(&s.models, ROLLBACKS_KEY, encode(&r, "rollbacks")?);
            batch.commit()?;
            Ok(r)
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
