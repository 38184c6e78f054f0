//! Model versions in Scylla: [`ModelStore`] for [`ScyllaStore`].
//!
//! A version is its metadata row in `model_versions` (postcard [`ModelVersion`]) and its
//! snapshot in `model_chunks`, cut into rows of 512 KiB in one partition per version.
//! Ids come from the `models` row of `sequences`, reserved like log positions. The
//! chunks are written first and the metadata last, so a listed version is complete. The
//! rollback record is one row changed by compare-and-set; the learner lease is one row
//! per name taken with `INSERT … IF NOT EXISTS` and renewed or taken over with a
//! compare-and-set on (holder, expiry). The expiry is kept in milliseconds in the row,
//! because TTLs count whole seconds; replicas compare it with their own clocks, so
//! clock skew between replicas shortens or stretches a lease by as much.

use async_trait::async_trait;
use futures_util::future;
use reflex_core::types::now_ms;
use reflex_core::{Error, ModelStore, ModelVersion, Result, Rollbacks};
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use super::cql::{MODEL_CHUNK, MODEL_SEQUENCE, Statements};
use super::store::{
    MAX_CAS_ATTEMPTS, ScyllaStore, ScyllaStoreError, backoff, prepare_error, ttl_seconds,
};

/// Name of the rollback record's row.
const ROLLBACKS: &str = "models";

/// The model statements, prepared once at connect.
pub(super) struct ModelPrepared {
    insert_version: PreparedStatement,
    scan_versions: PreparedStatement,
    select_version: PreparedStatement,
    delete_version: PreparedStatement,
    insert_chunk: PreparedStatement,
    select_chunks: PreparedStatement,
    delete_chunks: PreparedStatement,
    select_rollbacks: PreparedStatement,
    insert_rollbacks: PreparedStatement,
    advance_rollbacks: PreparedStatement,
    claim_lease: PreparedStatement,
    take_lease: PreparedStatement,
    release_lease: PreparedStatement,
}

impl ModelPrepared {
    pub(super) async fn prepare(session: &Session, text: &Statements) -> Result<Self> {
        let context = "preparing scylla model statements";
        let prepare = |cql: &str| {
            let cql = cql.to_owned();
            async move {
                session
                    .prepare(cql)
                    .await
                    .map_err(|e| prepare_error(context, e))
            }
        };
        let mut prepared = Self {
            insert_version: prepare(&text.insert_model_version).await?,
            scan_versions: prepare(&text.scan_model_versions).await?,
            select_version: prepare(&text.select_model_version).await?,
            delete_version: prepare(&text.delete_model_version).await?,
            insert_chunk: prepare(&text.insert_model_chunk).await?,
            select_chunks: prepare(&text.select_model_chunks).await?,
            delete_chunks: prepare(&text.delete_model_chunks).await?,
            select_rollbacks: prepare(&text.select_rollbacks).await?,
            insert_rollbacks: prepare(&text.insert_rollbacks).await?,
            advance_rollbacks: prepare(&text.advance_rollbacks).await?,
            claim_lease: prepare(&text.claim_lease).await?,
            take_lease: prepare(&text.take_lease).await?,
            release_lease: prepare(&text.release_lease).await?,
        };
        for plain in [
            &mut prepared.insert_version,
            &mut prepared.scan_versions,
            &mut prepared.select_version,
            &mut prepared.delete_version,
            &mut prepared.insert_chunk,
            &mut prepared.select_chunks,
            &mut prepared.delete_chunks,
            &mut prepared.select_rollbacks,
        ] {
            plain.set_is_idempotent(true);
        }
        Ok(prepared)
    }
}

fn encode_version(version: &ModelVersion, context: &str) -> Result<Vec<u8>> {
    postcard::to_allocvec(version).map_err(|e| Error::storage(context, e))
}

fn decode_version(bytes: &[u8], context: &str) -> Result<ModelVersion> {
    postcard::from_bytes(bytes).map_err(|e| Error::storage(context, e))
}

impl ScyllaStore {
    async fn version_meta(&self, id: u64, context: &str) -> Result<Option<ModelVersion>> {
        let row: Option<(Option<Vec<u8>>,)> = self
            .first_row(&self.models.select_version, (id as i64,), context)
            .await?;
        row.and_then(|(meta,)| meta)
            .map(|meta| decode_version(&meta, context))
            .transpose()
    }
}

#[async_trait]
impl ModelStore for ScyllaStore {
    async fn save(&self, mut version: ModelVersion, snapshot: Vec<u8>) -> Result<ModelVersion> {
        let context = "saving a model version to scylla";
        version.id = self.reserve(MODEL_SEQUENCE, 1).await?;
        version.bytes = snapshot.len() as u64;
        let id = version.id as i64;
        let writes = snapshot
            .chunks(MODEL_CHUNK)
            .enumerate()
            .map(|(i, chunk)| self.exec(&self.models.insert_chunk, (id, i as i32, chunk), context));
        future::try_join_all(writes).await?;
        let meta = encode_version(&version, context)?;
        self.exec(&self.models.insert_version, (id, meta), context)
            .await?;
        Ok(version)
    }

    async fn list(&self) -> Result<Vec<ModelVersion>> {
        let context = "listing model versions in scylla";
        let result = self.exec(&self.models.scan_versions, (), context).await?;
        let rows = result
            .into_rows_result()
            .map_err(|e| Error::storage(context, e))?;
        let mut versions = rows
            .rows::<(i64, Option<Vec<u8>>)>()
            .map_err(|e| Error::storage(context, e))?
            .filter_map(|row| match row {
                Ok((_, Some(meta))) => Some(decode_version(&meta, context)),
                Ok((_, None)) => None,
                Err(e) => Some(Err(Error::storage(context, e))),
            })
            .collect::<Result<Vec<_>>>()?;
        versions.sort_by_key(|v| v.id);
        Ok(versions)
    }

    async fn load(&self, id: u64) -> Result<Option<Vec<u8>>> {
        let context = "loading a model version from scylla";
        let Some(meta) = self.version_meta(id, context).await? else {
            return Ok(None);
        };
        let result = self
            .exec(&self.models.select_chunks, (id as i64,), context)
            .await?;
        let rows = result
            .into_rows_result()
            .map_err(|e| Error::storage(context, e))?;
        let mut bytes = Vec::with_capacity(meta.bytes as usize);
        for (n, row) in rows
            .rows::<(i32, Vec<u8>)>()
            .map_err(|e| Error::storage(context, e))?
            .enumerate()
        {
            let (chunk, data) = row.map_err(|e| Error::storage(context, e))?;
            if chunk as usize != n {
                return Err(Error::storage(
                    context,
                    format!("model {id} lacks chunk {n}"),
                ));
            }
            bytes.extend_from_slice(&data);
        }
        if bytes.len() as u64 != meta.bytes {
            return Err(Error::storage(
                context,
                format!("model {id} has {} of {} bytes", bytes.len(), meta.bytes),
            ));
        }
        Ok(Some(bytes))
    }

    async fn prune(&self, keep: usize) -> Result<usize> {
        let context = "pruning model versions in scylla";
        let versions = self.list().await?;
        let protected = self.rollbacks().await?.version;
        let excess = versions.len().saturating_sub(keep);
        let mut pruned = 0;
        for v in versions.iter().take(excess).filter(|v| v.id != protected) {
            // Metadata first, so the version is never listed without its snapshot.
            self.exec(&self.models.delete_version, (v.id as i64,), context)
                .await?;
            self.exec(&self.models.delete_chunks, (v.id as i64,), context)
                .await?;
            pruned += 1;
        }
        Ok(pruned)
    }

    async fn rollbacks(&self) -> Result<Rollbacks> {
        let context = "reading the rollback record in scylla";
        let row: Option<(Option<i64>, Option<i64>)> = self
            .first_row(&self.models.select_rollbacks, (ROLLBACKS,), context)
            .await?;
        Ok(row.map_or(Rollbacks::default(), |(g, v)| Rollbacks {
            generation: g.unwrap_or(0).max(0) as u64,
            version: v.unwrap_or(0).max(0) as u64,
        }))
    }

    async fn record_rollback(&self, version: u64) -> Result<Rollbacks> {
        let context = "recording a rollback in scylla";
        let mut current = self.rollbacks().await?.generation;
        let mut exists = current > 0;
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let next = current + 1;
            let answer = if exists {
                self.lwt(
                    &self.models.advance_rollbacks,
                    (next as i64, version as i64, ROLLBACKS, current as i64),
                    context,
                )
                .await?
            } else {
                self.lwt(
                    &self.models.insert_rollbacks,
                    (ROLLBACKS, next as i64, version as i64),
                    context,
                )
                .await?
            };
            match answer {
                Some(a) if a.applied => {
                    return Ok(Rollbacks {
                        generation: next,
                        version,
                    });
                }
                Some(a) => {
                    exists = true;
                    current = a.bigint("generation").unwrap_or(0).max(0) as u64;
                }
                None => {
                    // Unknown outcome: a repeated rollback to the same version is harmless
                    // but would count twice, so settle by reading.
                    let now = self.rollbacks().await?;
                    if now.generation == next && now.version == version {
                        return Ok(now);
                    }
                    exists = now.generation > 0;
                    current = now.generation;
                }
            }
            backoff(attempt).await;
        }
        Err(Error::unavailable(
            context,
            ScyllaStoreError::Contention(MAX_CAS_ATTEMPTS),
        ))
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: u64) -> Result<bool> {
        let context = "taking the lease in scylla";
        let ttl_ms = i64::try_from(ttl_ms).unwrap_or(i64::MAX);
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let now = now_ms();
            let expires = now.saturating_add(ttl_ms);
            let ttl = ttl_seconds(ttl_ms.saturating_add(1000));
            let Some(answer) = self
                .lwt(
                    &self.models.claim_lease,
                    (name, holder, expires, ttl),
                    context,
                )
                .await?
            else {
                // Unknown outcome: ask again, which renews if it landed.
                backoff(attempt).await;
                continue;
            };
            if answer.applied {
                return Ok(true);
            }
            let current_holder = answer
                .columns
                .get("holder")
                .and_then(|v| v.as_text())
                .cloned();
            let current_expiry = answer.bigint("expires_ms");
            let (Some(current_holder), Some(current_expiry)) = (current_holder, current_expiry)
            else {
                // Expired by its TTL meanwhile: claim it afresh.
                continue;
            };
            if current_holder != holder && current_expiry > now {
                return Ok(false);
            }
            // Ours to renew, or someone else's that ran out: take it over.
            match self
                .lwt(
                    &self.models.take_lease,
                    (
                        ttl,
                        holder,
                        expires,
                        name,
                        current_holder.as_str(),
                        current_expiry,
                    ),
                    context,
                )
                .await?
            {
                Some(a) if a.applied => return Ok(true),
                _ => backoff(attempt).await,
            }
        }
        Err(Error::unavailable(
            context,
            ScyllaStoreError::Contention(MAX_CAS_ATTEMPTS),
        ))
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        // Unknown outcome is fine: the lease runs out by itself.
        self.lwt(
            &self.models.release_lease,
            (name, holder),
            "releasing the lease in scylla",
        )
        .await?;
        Ok(())
    }
}
