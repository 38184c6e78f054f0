//! The Redis store itself: its pool of connections, the scripts it loads, its key names,
//! and how Redis errors map to Reflex's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::prelude::{
    Builder, ClientLike, Config, Error as FredError, ErrorKind, LuaInterface, Pool,
    ReconnectPolicy, Value,
};
use fred::types::scripts::Script;
use reflex_core::{Error, ProfilePolicy, Result, UserId};
use tracing::{info, warn};

use super::RedisConfig;
use super::scripts;
use crate::remote::{connect_within, password_from_env};
use crate::stores::Connections;

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
    pub(super) pool: Pool,
    pub(super) config: RedisConfig,
    pub(super) policy: ProfilePolicy,
    pub(super) append: Script,
    pub(super) append_apply: Script,
    pub(super) apply: Script,
    pub(super) get: Script,
    pub(super) catalog_upsert: Script,
    pub(super) catalog_delete: Script,
    pub(super) model_save: Script,
    pub(super) lease_acquire: Script,
    pub(super) lease_release: Script,
    pub(super) record_rollback: Script,
    pub(super) log_key: String,
    pub(super) seq_key: String,
    /// The set of log positions appended but not yet applied to profiles.
    pub(super) pending_key: String,
    /// Whether Redis is a Cluster, where the apply script cannot reach the pending set.
    pub(super) clustered: bool,
    /// Whether Redis is known to be unreachable, so reads fail at once instead of each
    /// waiting out a timeout.
    pub(super) outage: Arc<Outage>,
    pub(super) catalog_key: String,
    pub(super) catalog_version_key: String,
    /// The last profile count and when it was taken: counting scans every profile key,
    /// so it is taken again at most every [`PROFILE_COUNT_MAX_AGE`].
    pub(super) profile_count: Mutex<Option<(Instant, usize)>>,
}

/// How long a profile count is reused. Counting `SCAN`s every key (dedupe keys too: about
/// 2 s of Redis time at 1M keys), and the maintenance tick asks every few seconds for a
/// gauge: a scan per tick took a tenth or more of Redis's CPU away from ingest.
pub(super) const PROFILE_COUNT_MAX_AGE: Duration = Duration::from_secs(600);

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

/// Maps a Redis client error: connection trouble is `UNAVAILABLE` (retrying may work),
/// anything else a storage error.
pub(super) fn redis_error(context: &str, e: FredError) -> Error {
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

pub(super) fn reply_error(context: &str, what: impl Into<String>) -> Error {
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
            let password = password_from_env(var, "store.redis.password_env")?;
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
        connect_within(config.connect_timeout_ms, context, pool.wait_for_connect())
            .await?
            .map_err(|e| redis_error(context, e))?;

        let prefix = &config.prefix;
        let store = Self {
            log_key: format!("{{{prefix}}}:log"),
            seq_key: format!("{{{prefix}}}:seq"),
            pending_key: format!("{{{prefix}}}:pending"),
            clustered: pool.next().is_clustered(),
            outage: Arc::new(Outage::default()),
            catalog_key: format!("{{{prefix}}}:catalog"),
            catalog_version_key: format!("{{{prefix}}}:catalog:v"),
            profile_count: Mutex::new(None),
            catalog_upsert: Script::from_lua(scripts::CATALOG_UPSERT),
            catalog_delete: Script::from_lua(scripts::CATALOG_DELETE),
            model_save: Script::from_lua(scripts::MODEL_SAVE),
            lease_acquire: Script::from_lua(scripts::LEASE_ACQUIRE),
            lease_release: Script::from_lua(scripts::LEASE_RELEASE),
            record_rollback: Script::from_lua(scripts::RECORD_ROLLBACK),
            append: Script::from_lua(scripts::APPEND),
            append_apply: Script::from_lua(scripts::APPEND_APPLY),
            apply: Script::from_lua(scripts::APPLY),
            get: Script::from_lua(scripts::GET),
            pool,
            config,
            policy,
        };
        for script in [
            &store.append,
            &store.append_apply,
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

    /// Whether the apply script confirms the positions it applies itself (atomically, so
    /// each event is applied exactly once): on a standalone Redis, where one script may
    /// touch the user's keys and the pending set together.
    pub(super) fn confirms_in_apply(&self) -> bool {
        !self.clustered
    }

    /// A key in the shared `{prefix}` slot.
    pub(super) fn shared_key(&self, name: &str) -> String {
        format!("{{{}}}:{name}", self.config.prefix)
    }

    pub(super) fn dedupe_key(&self, event_id: &str) -> String {
        format!("{{{}}}:dd:{event_id}", self.config.prefix)
    }

    pub(super) fn user_keys(&self, user: &UserId) -> [String; 3] {
        let p = &self.config.prefix;
        [
            format!("{p}:p:{{{user}}}"),
            format!("{p}:r:{{{user}}}"),
            format!("{p}:b:{{{user}}}"),
        ]
    }

    /// Runs a loaded script, loading it again when Redis forgot it (restart, failover,
    /// `SCRIPT FLUSH`).
    pub(super) async fn run(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> std::result::Result<Value, FredError> {
        let client = self.pool.next();
        let result = match client
            .evalsha(script.sha1().clone(), keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                script.load(client).await?;
                client.evalsha(script.sha1().clone(), keys, args).await
            }
            result => result,
        };
        match &result {
            Ok(_) => self.note_answer(),
            Err(e) => self.note_error(e),
        }
        result
    }

    /// Clears an outage mark: Redis answered a command, so it is back (the probe, if it
    /// still runs, ends at its next turn).
    pub(super) fn note_answer(&self) {
        if self.outage.down.load(Ordering::Acquire)
            && self.outage.down.swap(false, Ordering::AcqRel)
        {
            info!("redis answers again");
        }
    }

    /// Records an outage when `e` says Redis cannot be reached (or answers too late), and
    /// starts probing for its return.
    pub(super) fn note_error(&self, e: &FredError) {
        if is_outage(e) {
            self.note_outage(&e.to_string());
        }
    }

    /// Marks Redis as down, if it was not yet, and probes in the background (a `PING`
    /// every [`PROBE_INTERVAL`], each given as long) until it answers again.
    pub(super) fn note_outage(&self, why: &str) {
        if self.outage.down.swap(true, Ordering::AcqRel) {
            return;
        }
        warn!(
            error = why,
            "redis is unreachable: reads answer degraded until it is back"
        );
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to probe on: the next successful command clears the mark.
            return;
        };
        let outage = Arc::downgrade(&self.outage);
        let pool = self.pool.clone();
        runtime.spawn(probe(pool, outage));
    }

    /// Whether Redis is known to be down right now.
    pub(super) fn is_down(&self) -> bool {
        self.outage.down.load(Ordering::Acquire)
    }
}

/// How often a Redis known to be down is probed, and how long each probe may take.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// What the store knows about Redis being reachable.
#[derive(Debug, Default)]
pub(super) struct Outage {
    down: AtomicBool,
}

/// Pings Redis until it answers, then clears the outage; ends early when the store is
/// gone.
async fn probe(pool: Pool, outage: Weak<Outage>) {
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let Some(outage) = outage.upgrade() else {
            return;
        };
        if !outage.down.load(Ordering::Acquire) {
            return; // a command got through meanwhile
        }
        let ping = tokio::time::timeout(PROBE_INTERVAL, pool.next().ping::<Value>(None)).await;
        if let Ok(Ok(_)) = ping {
            if outage.down.swap(false, Ordering::AcqRel) {
                info!("redis answers again");
            }
            return;
        }
    }
}

/// Whether a client error means Redis cannot be reached (or does not answer in time), as
/// opposed to a command it refused.
fn is_outage(e: &FredError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::IO | ErrorKind::Timeout | ErrorKind::Canceled | ErrorKind::Backpressure
    ) || e.details().starts_with("LOADING")
        || e.details().starts_with("BUSY")
        || e.details().starts_with("MASTERDOWN")
}

pub(super) fn encode<T: serde::Serialize>(value: &T, context: &str) -> Result<Vec<u8>> {
    postcard::to_allocvec(value).map_err(|e| Error::storage(context, RedisStoreError::Decode(e)))
}

pub(super) fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8], context: &str) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::storage(context, RedisStoreError::Decode(e)))
}

#[async_trait]
impl Connections for RedisStore {
    async fn close(&self) {
        self.quit().await;
    }
}
