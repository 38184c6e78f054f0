//! The Redis backend: profiles, the event log with its dedupe window, and the catalog in
//! one Redis (standalone or Cluster), shared by every replica.
//!
//! Key layout (`P` is [`RedisConfig::prefix`]):
//! - `{P}:log` — the event log, a stream whose entry ids are `<seq>-0`, each with fields
//!   `t` (ingested ms) and `r` (the postcard-encoded [`LogRecord`]);
//! - `{P}:seq` — the last sequence number handed out;
//! - `{P}:dd:<event id>` — a dedupe key, expiring after the dedupe window;
//! - `P:p:{<user>}`, `P:r:{<user>}`, `P:b:{<user>}` — a user's profile hash (counters,
//!   session, times, version), recent interactions and purchases, expiring with the TTL;
//! - `{P}:catalog` — a hash of item id to postcard-encoded [`Item`].
//!
//! The log, its counter and the dedupe keys share one hash slot (`{P}`) so the append
//! script can check dedupe keys and append atomically; each user's keys share the user's
//! slot so their update script is atomic. On Cluster the log therefore lives on one shard
//! and profiles spread over all of them.
//!
//! Every write is one Lua script ([`scripts`]), called with `EVALSHA`. A batch costs one
//! append script plus one apply script per distinct user, all sent at once, which the
//! client pipelines on its connections: a handful of round trips per batch, not one per
//! event.

mod config;
mod scripts;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::{
    Builder, ClientLike, Config, Error as FredError, ErrorKind, HashesInterface, KeysInterface,
    LuaInterface, Pool, ReconnectPolicy, SortedSetsInterface, StreamsInterface, Value,
};
use fred::types::scan::Scanner;
use fred::types::scripts::Script;
use futures_util::{StreamExt, TryStreamExt, future};
use reflex_core::profile::{Interaction, Session};
use reflex_core::types::now_ms;
use reflex_core::{
    Appended, CatalogStore, Error, EventKind, EventSink, Item, ItemId, LogRecord, ModelStore,
    ModelVersion, Profile, ProfilePolicy, ProfileStore, ProfileUpdate, Result, Rollbacks, Seq,
    UserId,
};
use tracing::info;

pub use config::RedisConfig;

/// Errors of the Redis backend that are not Redis's own.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    /// Redis answered with something the scripts never write.
    #[error("unexpected reply: {0}")]
    Reply(String),
    /// A stored record or item could not be decoded.
    #[error("undecodable value: {0}")]
    Decode(#[from] postcard::Error),
}

/// Profiles, event log, dedupe window and catalog in Redis. Cheap to share: the pool's
/// connections are used by every caller concurrently.
pub struct RedisStore {
    pool: Pool,
    config: RedisConfig,
    policy: ProfilePolicy,
    append: Script,
    apply: Script,
    get: Script,
    catalog_upsert: Script,
    catalog_delete: Script,
    model_save: Script,
    lease_acquire: Script,
    lease_release: Script,
    record_rollback: Script,
    log_key: String,
    seq_key: String,
    catalog_key: String,
    catalog_version_key: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

/// Maps a Redis client error: connection trouble is `UNAVAILABLE` (retrying may work),
/// anything else a storage error.
fn redis_error(context: &str, e: FredError) -> Error {
    match e.kind() {
        ErrorKind::IO
        | ErrorKind::Timeout
        | ErrorKind::Canceled
        | ErrorKind::Routing
        | ErrorKind::Cluster
        | ErrorKind::Backpressure => Error::unavailable(context, e),
        _ if e.details().starts_with("LOADING")
            || e.details().starts_with("BUSY")
            || e.details().starts_with("TRYAGAIN")
            || e.details().starts_with("CLUSTERDOWN")
            || e.details().starts_with("MASTERDOWN") =>
        {
            Error::unavailable(context, e)
        }
        _ => Error::storage(context, e),
    }
}

fn reply_error(context: &str, what: impl Into<String>) -> Error {
    Error::storage(context, RedisStoreError::Reply(what.into()))
}

impl RedisStore {
    /// Connects to Redis as `config` says and loads the scripts. Fails with `UNAVAILABLE`
    /// when Redis cannot be reached within `connect_timeout_ms`.
    pub async fn connect(config: RedisConfig, policy: ProfilePolicy) -> Result<Arc<Self>> {
        config.validate()?;
        let context = "connecting to redis";
        let mut redis_config = Config::from_url(&config.url)
            .map_err(|e| Error::invalid("store.redis.url", e.to_string()))?;
        if let Some(var) = &config.password_env {
            let password = std::env::var(var).map_err(|_| {
                Error::invalid(
                    "store.redis.password_env",
                    format!("environment variable {var} is not set"),
                )
            })?;
            redis_config.password = Some(password);
        }
        let command_timeout = Duration::from_millis(config.command_timeout_ms);
        let pool = Builder::from_config(redis_config)
            .with_performance_config(|perf| perf.default_command_timeout = command_timeout)
            .with_connection_config(|conn| {
                conn.connection_timeout = Duration::from_millis(config.connect_timeout_ms);
                conn.internal_command_timeout = command_timeout;
                conn.max_command_attempts = 2;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
            .build_pool(config.pool_size)
            .map_err(|e| Error::invalid("store.redis", e.to_string()))?;
        pool.init().await.map_err(|e| redis_error(context, e))?;
        tokio::time::timeout(
            Duration::from_millis(config.connect_timeout_ms),
            pool.wait_for_connect(),
        )
        .await
        .map_err(|_| {
            Error::unavailable(
                context,
                format!("no connection within {} ms", config.connect_timeout_ms),
            )
        })?
        .map_err(|e| redis_error(context, e))?;

        let prefix = &config.prefix;
        let store = Self {
            log_key: format!("{{{prefix}}}:log"),
            seq_key: format!("{{{prefix}}}:seq"),
            catalog_key: format!("{{{prefix}}}:catalog"),
            catalog_version_key: format!("{{{prefix}}}:catalog:v"),
            catalog_upsert: Script::from_lua(scripts::CATALOG_UPSERT),
            catalog_delete: Script::from_lua(scripts::CATALOG_DELETE),
            model_save: Script::from_lua(scripts::MODEL_SAVE),
            lease_acquire: Script::from_lua(scripts::LEASE_ACQUIRE),
            lease_release: Script::from_lua(scripts::LEASE_RELEASE),
            record_rollback: Script::from_lua(scripts::RECORD_ROLLBACK),
            append: Script::from_lua(scripts::APPEND),
            apply: Script::from_lua(scripts::APPLY),
            get: Script::from_lua(scripts::GET),
            pool,
            config,
            policy,
        };
        for script in [
            &store.append,
            &store.apply,
            &store.get,
            &store.catalog_upsert,
            &store.catalog_delete,
            &store.model_save,
            &store.lease_acquire,
            &store.lease_release,
            &store.record_rollback,
        ] {
            script
                .load(store.pool.next())
                .await
                .map_err(|e| redis_error("loading redis scripts", e))?;
        }
        info!(url = %store.config.url_redacted(), prefix = %store.config.prefix, "redis store connected");
        Ok(Arc::new(store))
    }

    /// The settings in force.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Closes every connection.
    pub async fn quit(&self) {
        let _ = self.pool.quit().await;
    }

    /// A key in the shared `{prefix}` slot.
    fn shared_key(&self, name: &str) -> String {
        format!("{{{}}}:{name}", self.config.prefix)
    }

    fn dedupe_key(&self, event_id: &str) -> String {
        format!("{{{}}}:dd:{event_id}", self.config.prefix)
    }

    fn user_keys(&self, user: &UserId) -> [String; 3] {
        let p = &self.config.prefix;
        [
            format!("{p}:p:{{{user}}}"),
            format!("{p}:r:{{{user}}}"),
            format!("{p}:b:{{{user}}}"),
        ]
    }

    /// Runs a loaded script, loading it again when Redis forgot it (restart, failover,
    /// `SCRIPT FLUSH`).
    async fn run(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> std::result::Result<Value, FredError> {
        let client = self.pool.next();
        match client
            .evalsha(script.sha1().clone(), keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                script.load(client).await?;
                client.evalsha(script.sha1().clone(), keys, args).await
            }
            result => result,
        }
    }

    async fn apply_user(&self, user: &UserId, updates: &[&ProfileUpdate<'_>]) -> Result<()> {
        let mut args: Vec<Value> = Vec::with_capacity(4 + updates.len() * 7);
        args.push(Value::from(self.policy.max_recent as i64));
        args.push(Value::from(self.policy.max_purchased as i64));
        args.push(Value::from(self.policy.session_gap_ms));
        args.push(Value::from(self.policy.ttl_ms));
        for u in updates {
            let e = u.event;
            args.push(Value::from(u.seq as i64));
            args.push(Value::from(e.timestamp_ms));
            args.push(Value::from(u.now_ms));
            args.push(Value::from(u.weight.to_string()));
            args.push(Value::from(e.kind.label()));
            args.push(Value::from(e.item_id.as_str()));
            args.push(Value::from(e.session_id.as_deref().unwrap_or("")));
        }
        self.run(&self.apply, self.user_keys(user).into(), args)
            .await
            .map_err(|e| redis_error("applying events to a profile in redis", e))?;
        Ok(())
    }

    /// Drops log records ingested longer ago than `log_max_age_ms`: finds the first young
    /// record by binary search over sequence numbers, then trims everything before it.
    async fn trim_by_age(&self) -> Result<()> {
        let context = "trimming the redis event log";
        let cutoff = now_ms() - self.config.log_max_age_ms;
        let client = self.pool.next();
        let first: Vec<(String, Vec<(String, Bytes)>)> = client
            .xrange(&self.log_key, "-", "+", Some(1))
            .await
            .map_err(|e| redis_error(context, e))?;
        let Some((first_id, _)) = first.first() else {
            return Ok(());
        };
        let mut lo =
            parse_stream_id(first_id).ok_or_else(|| reply_error(context, first_id.clone()))?;
        let mut hi = self.last_seq().await? + 1;
        // Invariant: every record before `lo` is old; the one at `hi` (or the end) is young.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let page: Vec<(String, Vec<(String, Bytes)>)> = client
                .xrange(&self.log_key, format!("{mid}-0"), "+", Some(1))
                .await
                .map_err(|e| redis_error(context, e))?;
            let Some((id, fields)) = page.first() else {
                hi = mid;
                continue;
            };
            let seq = parse_stream_id(id).ok_or_else(|| reply_error(context, id.clone()))?;
            let ingested = fields
                .iter()
                .find(|(f, _)| f == "t")
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
                .ok_or_else(|| reply_error(context, "log entry without its time"))?;
            if ingested < cutoff {
                lo = seq + 1;
            } else {
                hi = mid.min(seq);
            }
        }
        let _: Value = client
            .custom(
                fred::cmd!("XTRIM"),
                vec![
                    Value::from(self.log_key.as_str()),
                    Value::from("MINID"),
                    Value::from(format!("{lo}-0")),
                ],
            )
            .await
            .map_err(|e| redis_error(context, e))?;
        Ok(())
    }
}

fn parse_stream_id(id: &str) -> Option<Seq> {
    id.split_once('-')?.0.parse().ok()
}

fn encode<T: serde::Serialize>(value: &T, context: &str) -> Result<Vec<u8>> {
    postcard::to_allocvec(value).map_err(|e| Error::storage(context, RedisStoreError::Decode(e)))
}

fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8], context: &str) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::storage(context, RedisStoreError::Decode(e)))
}

#[async_trait]
impl EventSink for RedisStore {
    async fn append(&self, records: &[LogRecord]) -> Result<Vec<Appended>> {
        let context = "appending to the redis event log";
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys = Vec::with_capacity(3 + records.len());
        keys.push(self.log_key.clone());
        keys.push(self.seq_key.clone());
        keys.push(self.shared_key("pending"));
        let mut args: Vec<Value> = Vec::with_capacity(2 + records.len() * 3);
        args.push(Value::from(self.config.dedupe_window_ms));
        args.push(Value::from(self.config.log_max_len as i64));
        for record in records {
            match record {
                LogRecord::Event {
                    event, ingested_ms, ..
                } => {
                    keys.push(self.dedupe_key(event.event_id.as_str()));
                    args.push(Value::from("1"));
                    args.push(Value::from(*ingested_ms));
                }
                LogRecord::Erase { erased_ms, .. } => {
                    args.push(Value::from("0"));
                    args.push(Value::from(*erased_ms));
                }
            }
            args.push(Value::Bytes(Bytes::from(encode(record, context)?)));
        }
        let reply = self
            .run(&self.append, keys, args)
            .await
            .map_err(|e| redis_error(context, e))?;
        let Value::Array(seqs) = reply else {
            return Err(reply_error(context, format!("{reply:?}")));
        };
        if seqs.len() != records.len() {
            return Err(reply_error(
                context,
                format!("{} results for {} records", seqs.len(), records.len()),
            ));
        }
        seqs.into_iter()
            .map(|v| match v.as_u64() {
                Some(0) => Ok(Appended::Duplicate),
                Some(seq) => Ok(Appended::At(seq)),
                None => Err(reply_error(context, format!("{v:?}"))),
            })
            .collect()
    }

    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<(Seq, LogRecord)>> {
        let context = "reading the redis event log";
        if limit == 0 || after == Seq::MAX {
            return Ok(Vec::new());
        }
        let entries: Vec<(String, Vec<(String, Bytes)>)> = self
            .pool
            .next()
            .xrange(
                &self.log_key,
                format!("({after}-0"),
                "+",
                Some(limit as u64),
            )
            .await
            .map_err(|e| redis_error(context, e))?;
        entries
            .into_iter()
            .map(|(id, fields)| {
                let seq = parse_stream_id(&id).ok_or_else(|| reply_error(context, id.clone()))?;
                let payload = fields
                    .iter()
                    .find(|(f, _)| f == "r")
                    .ok_or_else(|| reply_error(context, format!("log entry {id} has no record")))?;
                Ok((seq, decode(&payload.1, context)?))
            })
            .collect()
    }

    async fn last_seq(&self) -> Result<Seq> {
        let seq: Option<u64> = self
            .pool
            .next()
            .get(&self.seq_key)
            .await
            .map_err(|e| redis_error("reading the redis log position", e))?;
        Ok(seq.unwrap_or(0))
    }

    async fn maintain(&self) -> Result<()> {
        // Dedupe keys expire by themselves; only age-bounded logs need work.
        if self.config.log_max_age_ms > 0 {
            self.trim_by_age().await?;
        }
        Ok(())
    }
}

#[async_trait]
impl ProfileStore for RedisStore {
    async fn get(&self, user: &UserId) -> Result<Option<Profile>> {
        let context = "reading a profile from redis";
        let reply = self
            .run(&self.get, self.user_keys(user).into(), Vec::new())
            .await
            .map_err(|e| redis_error(context, e))?;
        match reply {
            Value::Null => Ok(None),
            Value::Array(parts) => profile_from_reply(user, parts)
                .map(Some)
                .map_err(|what| reply_error(context, what)),
            other => Err(reply_error(context, format!("{other:?}"))),
        }
    }

    async fn apply(&self, updates: &[ProfileUpdate<'_>]) -> Result<()> {
        // Group by user, keeping each user's events in order; users' scripts go out at
        // once and are pipelined.
        let mut by_user: Vec<(&UserId, Vec<&ProfileUpdate<'_>>)> = Vec::new();
        let mut index: std::collections::HashMap<&UserId, usize> = std::collections::HashMap::new();
        for u in updates {
            let slot = *index.entry(&u.event.user_id).or_insert_with(|| {
                by_user.push((&u.event.user_id, Vec::new()));
                by_user.len() - 1
            });
            by_user[slot].1.push(u);
        }
        future::try_join_all(by_user.iter().map(|(user, ups)| self.apply_user(user, ups))).await?;
        // Confirmed: no longer pending.
        let seqs: Vec<Value> = updates.iter().map(|u| Value::from(u.seq as i64)).collect();
        if !seqs.is_empty() {
            let _: u64 = self
                .pool
                .next()
                .zrem(self.shared_key("pending"), seqs)
                .await
                .map_err(|e| redis_error("confirming profile updates in redis", e))?;
        }
        Ok(())
    }

    async fn unapplied(&self, older_than_ms: i64, limit: usize) -> Result<Vec<Seq>> {
        let context = "reading unconfirmed profile updates in redis";
        let key = self.shared_key("pending");
        let client = self.pool.next();
        let now = now_ms();
        // Positions older than the dedupe window are beyond repair (and likely trimmed).
        let _: u64 = client
            .zremrangebyscore(&key, "-inf", (now - self.config.dedupe_window_ms) as f64)
            .await
            .map_err(|e| redis_error(context, e))?;
        let seqs: Vec<u64> = client
            .zrangebyscore(
                &key,
                "-inf",
                (now - older_than_ms) as f64,
                false,
                Some((0, limit as i64)),
            )
            .await
            .map_err(|e| redis_error(context, e))?;
        Ok(seqs)
    }

    async fn erase(&self, user: &UserId) -> Result<bool> {
        let removed: u64 = self
            .pool
            .next()
            .del(self.user_keys(user).to_vec())
            .await
            .map_err(|e| redis_error("erasing a profile in redis", e))?;
        Ok(removed > 0)
    }

    async fn count(&self) -> Result<usize> {
        let pattern = format!("{}:p:*", self.config.prefix);
        let client = self.pool.next();
        let keys = if client.is_clustered() {
            client
                .scan_cluster_buffered(pattern, Some(1000), None)
                .try_fold(0usize, |n, _| future::ready(Ok(n + 1)))
                .await
        } else {
            client
                .scan_buffered(pattern, Some(1000), None)
                .try_fold(0usize, |n, _| future::ready(Ok(n + 1)))
                .await
        };
        keys.map_err(|e| redis_error("counting profiles in redis", e))
    }
}

/// Builds a profile from the GET script's reply; `Err` describes what was malformed.
fn profile_from_reply(user: &UserId, parts: Vec<Value>) -> std::result::Result<Profile, String> {
    let mut parts = parts.into_iter();
    let (Some(Value::Array(fields)), Some(recent), Some(purchased)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err("profile reply is not three arrays".into());
    };
    let text = |v: &Value| {
        v.as_str()
            .map(|s| s.into_owned())
            .ok_or_else(|| format!("{v:?} is not text"))
    };
    let int = |v: &Value| v.as_i64().ok_or_else(|| format!("{v:?} is not an integer"));
    let item = |s: &str| ItemId::parse(s, "item_id").map_err(|e| e.to_string());

    let mut p = Profile::new(user.clone());
    let (mut sid, mut sst, mut slt, mut sn) = (None, 0, 0, 0);
    for pair in fields.chunks_exact(2) {
        let name = text(&pair[0])?;
        let value = &pair[1];
        match name.as_str() {
            "v" => p.version = int(value)? as u64,
            "ls" => p.last_seen_ms = int(value)?,
            "t" => p.touched_ms = int(value)?,
            "sid" => sid = Some(text(value)?),
            "sst" => sst = int(value)?,
            "slt" => slt = int(value)?,
            "sn" => sn = int(value)?,
            "as" => {} // log positions applied lately, for idempotence
            counter => {
                let label = counter
                    .strip_prefix("c:")
                    .ok_or_else(|| format!("unknown profile field {counter}"))?;
                let kind =
                    EventKind::from_label(label).ok_or_else(|| format!("unknown kind {label}"))?;
                let n = int(value)? as u64;
                match (kind.builtin_index(), kind) {
                    (Some(i), _) => p.counts[i] = n,
                    (None, EventKind::Custom(name)) => p.custom_counts.push((name, n)),
                    (None, _) => {}
                }
            }
        }
    }
    p.custom_counts.sort();
    p.session = sid.map(|sid| Session {
        session_id: Arc::from(sid),
        started_ms: sst,
        last_event_ms: slt,
        events: sn as u32,
    });
    for entry in recent.into_array() {
        let entry = text(&entry)?;
        let mut f = entry.splitn(4, '\u{1f}');
        let (Some(ts), Some(weight), Some(kind), Some(id)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return Err(format!("malformed recent entry {entry:?}"));
        };
        p.recent.push_back(Interaction {
            item_id: item(id)?,
            kind: EventKind::from_label(kind).ok_or_else(|| format!("unknown kind {kind}"))?,
            timestamp_ms: ts.parse().map_err(|_| format!("bad time in {entry:?}"))?,
            weight: weight
                .parse()
                .map_err(|_| format!("bad weight in {entry:?}"))?,
        });
    }
    for id in purchased.into_array() {
        p.purchased.push_back(item(&text(&id)?)?);
    }
    Ok(p)
}

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
