//! Configuration of the Redis backend.

use reflex_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Seven days, the dedupe window the ingest contract promises by default.
const DEFAULT_DEDUPE_WINDOW_MS: i64 = 7 * 24 * 3600 * 1000;

/// Settings of the Redis store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Where Redis is: `redis://[user:password@]host:port[/db]`, `rediss://…` for TLS,
    /// `redis-cluster://host:port?node=host2:port2` (or `rediss-cluster://`) for Cluster.
    /// Prefer `password_env` to a password in the URL.
    pub url: String,
    /// Name of an environment variable holding the password (e.g. filled from a
    /// Kubernetes Secret); overrides a password in the URL when set.
    pub password_env: Option<String>,
    /// Prefix of every key Reflex writes, so several deployments can share one Redis.
    pub prefix: String,
    /// Connections in the pool; commands are pipelined on each.
    pub pool_size: usize,
    /// How long to wait for the first connection at start-up, in ms.
    pub connect_timeout_ms: u64,
    /// How long one command may take before it fails with `UNAVAILABLE`, in ms. Bounds
    /// how long ingest waits while Redis is down.
    pub command_timeout_ms: u64,
    /// How long a profile read may take before `Recommend` answers degraded without it,
    /// in ms (at most `command_timeout_ms`). Once a read or any command finds Redis
    /// unreachable, reads fail at once until a background probe finds it back.
    pub read_timeout_ms: u64,
    /// How long an event id stays a duplicate after it was first recorded, in ms.
    pub dedupe_window_ms: i64,
    /// The event log (a stream) keeps about this many records; 0 keeps all.
    pub log_max_len: u64,
    /// Maintenance drops log records ingested longer ago than this, in ms; 0 keeps all.
    pub log_max_age_ms: i64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            password_env: None,
            prefix: "reflex".into(),
            pool_size: 4,
            connect_timeout_ms: 5_000,
            command_timeout_ms: 2_000,
            read_timeout_ms: 300,
            dedupe_window_ms: DEFAULT_DEDUPE_WINDOW_MS,
            log_max_len: 10_000_000,
            log_max_age_ms: 0,
        }
    }
}

impl RedisConfig {
    /// A default configuration for the Redis at `url`, keys under `prefix`.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: prefix.into(),
            ..Self::default()
        }
    }

    /// The URL with any password masked, for logs and `reflex config`.
    pub fn url_redacted(&self) -> String {
        let url = &self.url;
        match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://********{}", &url[..scheme], &url[at..])
            }
            _ => url.clone(),
        }
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<()> {
        if self.url.is_empty() {
            return Err(Error::invalid("store.redis.url", "must not be empty"));
        }
        if self.prefix.is_empty() || self.prefix.contains(['{', '}', '*', '?', '[', ']']) {
            return Err(Error::invalid(
                "store.redis.prefix",
                "must be non-empty and free of `{}*?[]`",
            ));
        }
        if self.pool_size == 0 {
            return Err(Error::invalid(
                "store.redis.pool_size",
                "must be at least 1",
            ));
        }
        if self.read_timeout_ms == 0 || self.read_timeout_ms > self.command_timeout_ms {
            return Err(Error::invalid(
                "store.redis.read_timeout_ms",
                format!(
                    "is {}, must be between 1 and command_timeout_ms ({})",
                    self.read_timeout_ms, self.command_timeout_ms
                ),
            ));
        }
        if self.dedupe_window_ms <= 0 {
            return Err(Error::invalid(
                "store.redis.dedupe_window_ms",
                format!("is {}, must be positive", self.dedupe_window_ms),
            ));
        }
        if self.log_max_age_ms < 0 {
            return Err(Error::invalid(
                "store.redis.log_max_age_ms",
                "must not be negative",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        let with = RedisConfig::new("redis://user:secret@host:6379/0", "p");
        assert_eq!(with.url_redacted(), "redis://********@host:6379/0");
        let without = RedisConfig::new("redis://host:6379", "p");
        assert_eq!(without.url_redacted(), "redis://host:6379");
    }

    #[test]
    fn defaults_validate_and_bad_values_name_the_field() {
        RedisConfig::default().validate().unwrap();
        let bad = RedisConfig {
            prefix: "a{b}".into(),
            ..RedisConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("prefix"));
        let bad = RedisConfig {
            dedupe_window_ms: 0,
            ..RedisConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("dedupe_window_ms")
        );
    }
}
