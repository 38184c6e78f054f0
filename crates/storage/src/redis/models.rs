//! Model versions in Redis: [`ModelStore`] for [`RedisStore`], the snapshots, the
//! rollback record and the learner lease under the shared `{prefix}` slot.

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::{HashesInterface, KeysInterface, Value};
use reflex_core::{ModelStore, ModelVersion, Result, Rollbacks};

use super::store::{RedisStore, decode, encode, redis_error, reply_error};

#[async_trait]
impl ModelStore for RedisStore {
    async fn save(&self, mut version: ModelVersion, snapshot: Vec<u8>) -> Result<ModelVersion> {
        let context = "saving a model version to redis";
        version.id = self
            .pool
            .next()
            .incr(self.shared_key("models:id"))
            .await
            .map_err(|e| redis_error(context, e))?;
        version.bytes = snapshot.len() as u64;
        let meta = encode(&version, context)?;
        self.run(
            &self.model_save,
            vec![
                self.shared_key(&format!("model:{}", version.id)),
                self.shared_key("models"),
            ],
            vec![
                Value::from(version.id as i64),
                Value::Bytes(Bytes::from(meta)),
                Value::Bytes(Bytes::from(snapshot)),
            ],
        )
        .await
        .map_err(|e| redis_error(context, e))?;
        Ok(version)
    }

    async fn list(&self) -> Result<Vec<ModelVersion>> {
        let context = "listing model versions in redis";
        let all: Vec<Bytes> = self
            .pool
            .next()
            .hvals(self.shared_key("models"))
            .await
            .map_err(|e| redis_error(context, e))?;
        let mut versions = all
            .iter()
            .map(|b| decode::<ModelVersion>(b, context))
            .collect::<Result<Vec<_>>>()?;
        versions.sort_by_key(|v| v.id);
        Ok(versions)
    }

    async fn load(&self, id: u64) -> Result<Option<Vec<u8>>> {
        let bytes: Option<Bytes> = self
            .pool
            .next()
            .get(self.shared_key(&format!("model:{id}")))
            .await
            .map_err(|e| redis_error("loading a model version from redis", e))?;
        Ok(bytes.map(|b| b.to_vec()))
    }

    async fn prune(&self, keep: usize) -> Result<usize> {
        let context = "pruning model versions in redis";
        let versions = self.list().await?;
        let protected = self.rollbacks().await?.version;
        let excess = versions.len().saturating_sub(keep);
        let mut pruned = 0;
        for v in versions.iter().take(excess).filter(|v| v.id != protected) {
            let client = self.pool.next();
            let _: u64 = client
                .hdel(self.shared_key("models"), v.id.to_string())
                .await
                .map_err(|e| redis_error(context, e))?;
            let _: u64 = client
                .del(self.shared_key(&format!("model:{}", v.id)))
                .await
                .map_err(|e| redis_error(context, e))?;
            pruned += 1;
        }
        Ok(pruned)
    }

    async fn rollbacks(&self) -> Result<Rollbacks> {
        let context = "reading the rollback record in redis";
        let fields: std::collections::HashMap<String, u64> = self
            .pool
            .next()
            .hgetall(self.shared_key("rollbacks"))
            .await
            .map_err(|e| redis_error(context, e))?;
        Ok(Rollbacks {
            generation: fields.get("generation").copied().unwrap_or(0),
            version: fields.get("version").copied().unwrap_or(0),
        })
    }

    async fn record_rollback(&self, version: u64) -> Result<Rollbacks> {
        let context = "recording a rollback in redis";
        let generation = self
            .run(
                &self.record_rollback,
                vec![self.shared_key("rollbacks")],
                vec![Value::from(version as i64)],
            )
            .await
            .map_err(|e| redis_error(context, e))?
            .as_u64()
            .ok_or_else(|| reply_error(context, "generation is not a number"))?;
        Ok(Rollbacks {
            generation,
            version,
        })
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: u64) -> Result<bool> {
        let granted = self
            .run(
                &self.lease_acquire,
                vec![self.shared_key(&format!("lease:{name}"))],
                vec![Value::from(holder), Value::from(ttl_ms as i64)],
            )
            .await
            .map_err(|e| redis_error("taking the lease in redis", e))?;
        Ok(granted.as_u64() == Some(1))
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        self.run(
            &self.lease_release,
            vec![self.shared_key(&format!("lease:{name}"))],
            vec![Value::from(holder)],
        )
        .await
        .map_err(|e| redis_error("releasing the lease in redis", e))?;
        Ok(())
    }
}
