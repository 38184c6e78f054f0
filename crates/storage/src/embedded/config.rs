//! Configuration of the embedded backend.

use std::path::PathBuf;

use fjall::PersistMode;
use reflex_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Seven days, the dedupe window the ingest contract promises by default.
const DEFAULT_DEDUPE_WINDOW_MS: i64 = 7 * 24 * 3600 * 1000;

/// One day: how long the event log keeps a record by default once recovery no longer
/// needs it (for `reflex train` and for looking back at what came in).
const DEFAULT_LOG_RETENTION_MS: i64 = 24 * 3600 * 1000;

/// A scheduled checkpoint waits until the log since the last one holds this many events
/// per profile it would rewrite (see [`EmbeddedConfig::checkpoint_events_per_profile`]).
/// At 8, ten minutes of ingest flat out with 100k users (each about one event a second)
/// wrote and compacted every profile every few seconds, and the rate fell further over
/// the run; at 32 with the profiles apart from their keys it fell less (BENCHMARKS.md,
/// session 28). With ordinary traffic per user, `checkpoint_max_interval_ms` decides.
const DEFAULT_CHECKPOINT_EVENTS_PER_PROFILE: u64 = 32;

/// One minute: the longest a changed profile waits for its checkpoint by default.
const DEFAULT_CHECKPOINT_MAX_INTERVAL_MS: i64 = 60_000;

/// 64 MiB (fjall's own default): the size at which the checkpoints' memtable is written
/// out, and the budget of the recent event ids (see [`EmbeddedConfig::memtable_bytes`]).
/// Measured with 4 streams flat out for 60 s when the dedupe keys still had a memtable:
/// 16 MiB saved 300–400 bytes per user at 100k users but ingested 10% fewer events/s,
/// as more dedupe lookups reached the tables.
const DEFAULT_MEMTABLE_BYTES: u64 = 64 * 1024 * 1024;

/// 16 MiB: the size at which the event log's memtable is written out (see
/// [`EmbeddedConfig::log_memtable_bytes`]). The log is only appended to and read back in
/// ranges, so a smaller memtable costs it little: measured at 100k users with 4 streams
/// flat out, 16 MiB against 64 MiB held 700–800 bytes less per user with no visible
/// change in ingest speed (BENCHMARKS.md).
const DEFAULT_LOG_MEMTABLE_BYTES: u64 = 16 * 1024 * 1024;

/// The smallest memtable accepted: below it every few hundred events would make a table.
const MIN_MEMTABLE_BYTES: u64 = 1024 * 1024;

/// 128 MiB: room for checkpoints, compaction and snapshots after ingest stops.
const DEFAULT_MIN_FREE_BYTES: u64 = 128 * 1024 * 1024;

/// Settings of the embedded store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// Directory holding the database; created when missing. One process at a time.
    pub data_dir: PathBuf,
    /// When an append counts as recorded.
    pub durability: Durability,
    /// How long an event id stays a duplicate after it was first recorded, in ms.
    pub dedupe_window_ms: i64,
    /// How long the event log keeps a record after it was recorded, in ms, once a
    /// profile checkpoint and the newest model version cover it (a record recovery still
    /// needs is kept however old). Bounds the log's disk use to about this long a stretch
    /// of traffic; `reflex train` fits on what the log still holds.
    pub log_retention_ms: i64,
    /// Free space the data directory's filesystem must keep, in bytes: below it ingest is
    /// refused with `UNAVAILABLE` (and readiness turns NOT_SERVING) while checkpoints,
    /// compaction and snapshots can still write; ingest resumes once space returns.
    pub min_free_bytes: u64,
    /// A checkpoint rewrites each changed profile whole (its recent items, purchases,
    /// counters), so writing one every maintenance tick under heavy traffic costs a
    /// profile's encoding per few events. A scheduled checkpoint therefore waits until the
    /// log since the last one holds at least this many events per changed profile (or
    /// `checkpoint_max_interval_ms` passed): its cost per event stays a fraction of a
    /// profile, and the log that recovery replays stays short. 0 checkpoints on every
    /// maintenance tick.
    pub checkpoint_events_per_profile: u64,
    /// The longest a changed profile waits for a checkpoint, in ms; it bounds the log that
    /// start-up replays after a crash to this stretch of traffic.
    pub checkpoint_max_interval_ms: i64,
    /// How much of the profile checkpoints stays in memory (a memtable) before it is
    /// written out as a table, in bytes, and the budget of the recent event ids' table
    /// (a table takes at most half of it; two exist while one is handed over to the
    /// `event_ids` keyspace). Memory grows by up to about twice this (more while a flush
    /// lags), so it is a fixed cost of the process; larger means fewer, larger tables and
    /// less compaction, and more dedupe lookups answered from memory. The memtable's size
    /// is set when its keyspace is created: a data directory made before keeps it.
    pub memtable_bytes: u64,
    /// The same for the event log, which is only appended to and read back in ranges, so
    /// it gains little from a large memtable. Set when the log's keyspace is created.
    pub log_memtable_bytes: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./reflex-data"),
            durability: Durability::default(),
            dedupe_window_ms: DEFAULT_DEDUPE_WINDOW_MS,
            log_retention_ms: DEFAULT_LOG_RETENTION_MS,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            checkpoint_events_per_profile: DEFAULT_CHECKPOINT_EVENTS_PER_PROFILE,
            checkpoint_max_interval_ms: DEFAULT_CHECKPOINT_MAX_INTERVAL_MS,
            memtable_bytes: DEFAULT_MEMTABLE_BYTES,
            log_memtable_bytes: DEFAULT_LOG_MEMTABLE_BYTES,
        }
    }
}

impl EmbeddedConfig {
    /// A default configuration storing its data in `data_dir`.
    pub fn in_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ..Self::default()
        }
    }

    /// Checks values serde cannot: a negative window would make every id new again.
    pub fn validate(&self) -> Result<()> {
        if self.dedupe_window_ms < 0 {
            return Err(Error::invalid(
                "store.embedded.dedupe_window_ms",
                format!("is {}, must not be negative", self.dedupe_window_ms),
            ));
        }
        if self.log_retention_ms < 0 {
            return Err(Error::invalid(
                "store.embedded.log_retention_ms",
                format!("is {}, must not be negative", self.log_retention_ms),
            ));
        }
        if self.checkpoint_max_interval_ms < 0 {
            return Err(Error::invalid(
                "store.embedded.checkpoint_max_interval_ms",
                format!(
                    "is {}, must not be negative",
                    self.checkpoint_max_interval_ms
                ),
            ));
        }
        for (field, bytes) in [
            ("store.embedded.memtable_bytes", self.memtable_bytes),
            ("store.embedded.log_memtable_bytes", self.log_memtable_bytes),
        ] {
            if bytes < MIN_MEMTABLE_BYTES {
                return Err(Error::invalid(
                    field,
                    format!("is {bytes}, must be at least {MIN_MEMTABLE_BYTES} (1 MiB)"),
                ));
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(Error::invalid(
                "store.embedded.data_dir",
                "must not be empty",
            ));
        }
        Ok(())
    }
}

/// When an append returns, relative to the disk.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Every append is fsynced before it returns (appends committed meanwhile share the
    /// fsync): an acked event survives power loss.
    #[default]
    Sync,
    /// Every append reaches the OS before it returns but is not fsynced: an acked event
    /// survives a crash of the process, not of the machine.
    Buffered,
}

impl Durability {
    /// The fjall persist mode that gives this durability.
    pub(super) fn persist_mode(self) -> PersistMode {
        match self {
            Self::Sync => PersistMode::SyncAll,
            Self::Buffered => PersistMode::Buffer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_durable_with_a_week_of_dedupe() {
        let config = EmbeddedConfig::default();
        assert_eq!(config.durability, Durability::Sync);
        assert_eq!(config.dedupe_window_ms, 604_800_000);
        assert_eq!(config.data_dir, PathBuf::from("./reflex-data"));
        config.validate().unwrap();
    }

    #[test]
    fn deserialises_partially_and_refuses_unknown_keys() {
        let config: EmbeddedConfig =
            serde_json::from_str(r#"{"durability":"buffered","dedupe_window_ms":5}"#).unwrap();
        assert_eq!(config.durability, Durability::Buffered);
        assert_eq!(config.dedupe_window_ms, 5);
        assert_eq!(config.data_dir, PathBuf::from("./reflex-data"));
        assert!(serde_json::from_str::<EmbeddedConfig>(r#"{"profile":{}}"#).is_err());
    }

    #[test]
    fn refuses_a_negative_window() {
        let config = EmbeddedConfig {
            dedupe_window_ms: -1,
            ..EmbeddedConfig::default()
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn refuses_a_memtable_under_a_mebibyte_naming_the_key() {
        let config = EmbeddedConfig {
            memtable_bytes: 4096,
            ..EmbeddedConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("store.embedded.memtable_bytes"), "{err}");
        let config = EmbeddedConfig {
            log_memtable_bytes: 4096,
            ..EmbeddedConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("store.embedded.log_memtable_bytes"), "{err}");
    }
}
