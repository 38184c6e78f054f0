//! The `store` section of the configuration: which backend holds the state, the settings
//! of each, and [`StoreConfig::open`], which builds the chosen one. Every backend's
//! settings are read in every build; a backend left out of the build (its cargo feature
//! off) is refused by name when chosen.

use reflex_core::{Error, ProfilePolicy, Result};
use serde::{Deserialize, Serialize};

use crate::embedded::{EmbeddedConfig, EmbeddedStore};
use crate::redis::RedisConfig;
use crate::scylla::ScyllaConfig;
use crate::stores::Stores;

/// Which backend holds profiles, the event log and the catalog.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The backend in use.
    pub backend: Backend,
    /// Settings of the embedded backend.
    pub embedded: EmbeddedConfig,
    /// Settings of the Redis backend.
    pub redis: RedisConfig,
    /// Settings of the ScyllaDB backend.
    pub scylla: ScyllaConfig,
    /// With a shared backend, how often the model reads the shared event log for the
    /// events of every replica, in ms.
    pub follow_interval_ms: u64,
    /// With a shared backend that cannot be reached at start-up, the longest wait
    /// between attempts to open it, in ms (the first wait is 100 ms, then doubling).
    pub connect_retry_max_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::default(),
            embedded: EmbeddedConfig::default(),
            redis: RedisConfig::default(),
            scylla: ScyllaConfig::default(),
            follow_interval_ms: 10,
            connect_retry_max_ms: 5_000,
        }
    }
}

/// Available backends.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Durable local storage in a data directory (one replica).
    #[default]
    Embedded,
    /// Redis (standalone or Cluster), shared by many replicas.
    Redis,
    /// A ScyllaDB (or Cassandra) cluster, shared by many replicas.
    Scylla,
}

impl Backend {
    /// Whether several replicas share the backend, so each must follow the shared log.
    pub fn is_shared(self) -> bool {
        matches!(self, Self::Redis | Self::Scylla)
    }

    /// The name configuration uses (`store.backend`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Redis => "redis",
            Self::Scylla => "scylla",
        }
    }

    /// Whether this build holds the backend: the embedded one always, the others when
    /// their cargo feature of reflex-storage (named as the backend) is on.
    pub fn is_compiled_in(self) -> bool {
        match self {
            Self::Embedded => true,
            Self::Redis => cfg!(feature = "redis"),
            Self::Scylla => cfg!(feature = "scylla"),
        }
    }

    /// `Ok` when the backend is compiled in, otherwise [`not_compiled_in`](Self::not_compiled_in).
    pub fn check_compiled_in(self) -> Result<()> {
        if self.is_compiled_in() {
            Ok(())
        } else {
            Err(self.not_compiled_in())
        }
    }

    /// The error that says this build lacks the backend and which cargo feature would
    /// bring it in.
    pub fn not_compiled_in(self) -> Error {
        Error::invalid(
            "store.backend",
            format!(
                "{:?} is not compiled into this build (cargo feature {:?} of reflex-storage)",
                self.name(),
                self.name()
            ),
        )
    }
}

impl StoreConfig {
    /// Checks the chosen backend: that this build holds it, and its settings (the
    /// backend's own `validate`). The settings of backends not chosen are not checked.
    pub fn validate(&self) -> Result<()> {
        self.backend.check_compiled_in()?;
        if self.follow_interval_ms == 0 {
            return Err(Error::invalid(
                "store.follow_interval_ms",
                "must be at least 1 (ms between reads of the shared log)",
            ));
        }
        if self.connect_retry_max_ms < 100 {
            return Err(Error::invalid(
                "store.connect_retry_max_ms",
                format!(
                    "must be at least 100 (the first wait), got {}",
                    self.connect_retry_max_ms
                ),
            ));
        }
        match self.backend {
            Backend::Embedded => self.embedded.validate(),
            Backend::Redis => self.redis.validate(),
            Backend::Scylla => self.scylla.validate(),
        }
    }

    /// Opens (or connects to) the chosen backend, its profiles kept as `policy` says; one
    /// backend fills every storage role. Fails with `UNAVAILABLE` when a shared backend
    /// cannot be reached (retrying may work), and with `INVALID_ARGUMENT` naming the
    /// setting when [`validate`](Self::validate) fails.
    ///
    /// Opening the embedded store blocks on disk I/O (see [`EmbeddedStore::open`]).
    pub async fn open(&self, policy: &ProfilePolicy) -> Result<Stores> {
        self.validate()?;
        match self.backend {
            Backend::Embedded => Ok(Stores::all_in(EmbeddedStore::open(
                self.embedded.clone(),
                policy.clone(),
            )?)),
            Backend::Redis => self.open_redis(policy).await,
            Backend::Scylla => self.open_scylla(policy).await,
        }
    }

    /// What [`open`](Self::open) does, naming the backend and where it is (passwords
    /// masked), as the context of its errors.
    pub fn opening(&self) -> String {
        match self.backend {
            Backend::Embedded => format!(
                "opening the embedded store in {} (is another process using it?)",
                self.embedded.data_dir.display()
            ),
            Backend::Redis => format!("connecting to redis at {}", self.redis.url_redacted()),
            Backend::Scylla => format!(
                "connecting to scylla at {} (keyspace {})",
                self.scylla.contact_points.join(","),
                self.scylla.keyspace
            ),
        }
    }

    #[cfg(feature = "redis")]
    async fn open_redis(&self, policy: &ProfilePolicy) -> Result<Stores> {
        let store = crate::redis::RedisStore::connect(self.redis.clone(), policy.clone()).await?;
        Ok(Stores::connected(store))
    }

    #[cfg(not(feature = "redis"))]
    async fn open_redis(&self, _policy: &ProfilePolicy) -> Result<Stores> {
        Err(Backend::Redis.not_compiled_in())
    }

    #[cfg(feature = "scylla")]
    async fn open_scylla(&self, policy: &ProfilePolicy) -> Result<Stores> {
        let store =
            crate::scylla::ScyllaStore::connect(self.scylla.clone(), policy.clone()).await?;
        Ok(Stores::all_in(store))
    }

    #[cfg(not(feature = "scylla"))]
    async fn open_scylla(&self, _policy: &ProfilePolicy) -> Result<Stores> {
        Err(Backend::Scylla.not_compiled_in())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_reads_as_before_and_refuses_unknown_keys() {
        let config: StoreConfig = serde_json::from_str(
            r#"{"backend": "redis", "redis": {"url": "redis://r:6379", "prefix": "shop"},
                "follow_interval_ms": 25}"#,
        )
        .unwrap();
        assert_eq!(config.backend, Backend::Redis);
        assert_eq!(config.redis.url, "redis://r:6379");
        assert_eq!(config.redis.pool_size, RedisConfig::default().pool_size);
        assert_eq!(config.follow_interval_ms, 25);
        assert_eq!(config.connect_retry_max_ms, 5_000, "defaults fill the rest");
        assert_eq!(config.scylla, ScyllaConfig::default());
        let back = serde_json::to_value(&config).unwrap();
        assert_eq!(back["backend"], "redis");
        assert!(serde_json::from_str::<StoreConfig>(r#"{"backends": "redis"}"#).is_err());
        assert!(serde_json::from_str::<StoreConfig>(r#"{"backend": "memory"}"#).is_err());
    }

    #[test]
    fn only_the_chosen_backend_is_validated() {
        let mut config = StoreConfig::default();
        config.redis.pool_size = 0;
        config.validate().unwrap();
        config.backend = Backend::Redis;
        let err = config.validate().unwrap_err().to_string();
        if cfg!(feature = "redis") {
            assert!(err.contains("store.redis.pool_size"), "{err}");
        } else {
            assert!(err.contains("not compiled"), "{err}");
        }
        config.backend = Backend::Embedded;
        config.embedded.dedupe_window_ms = -1;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("store.embedded.dedupe_window_ms"), "{err}");
    }

    #[test]
    fn each_backend_says_whether_it_is_compiled_in() {
        assert!(Backend::Embedded.check_compiled_in().is_ok());
        for (backend, compiled) in [
            (Backend::Redis, cfg!(feature = "redis")),
            (Backend::Scylla, cfg!(feature = "scylla")),
        ] {
            assert_eq!(backend.is_compiled_in(), compiled);
            match backend.check_compiled_in() {
                Ok(()) => assert!(compiled),
                Err(e) => {
                    let name = backend.name();
                    assert_eq!(
                        e.to_string(),
                        format!(
                            "invalid store.backend: \"{name}\" is not compiled into this build \
                             (cargo feature \"{name}\" of reflex-storage)"
                        )
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn opening_a_backend_left_out_of_the_build_says_so() {
        for backend in [Backend::Redis, Backend::Scylla] {
            if backend.is_compiled_in() {
                continue;
            }
            let config = StoreConfig {
                backend,
                ..StoreConfig::default()
            };
            let err = config
                .open(&ProfilePolicy::default())
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("is not compiled into this build"), "{err}");
        }
    }

    #[tokio::test]
    async fn the_embedded_store_opens_in_every_role() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            embedded: EmbeddedConfig::in_dir(dir.path()),
            ..StoreConfig::default()
        };
        let stores = config.open(&ProfilePolicy::default()).await.unwrap();
        assert!(stores.connections.is_none());
        assert_eq!(stores.sink.last_seq().await.unwrap(), 0);
        stores.close().await;
        assert!(config.opening().contains(&dir.path().display().to_string()));
    }
}
