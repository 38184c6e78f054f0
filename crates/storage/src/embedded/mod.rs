//! The embedded backend: one fjall database in a local directory holds the event log, the
//! dedupe keys, profile checkpoints and the catalog. It is the default, and durable.
//!
//! Keyspaces:
//! - `events`: seq (u64 big-endian) → postcard [`LogRecord`]
//! - `event_ids`: an event id's 128-bit keyed hash → ingest time (i64 big-endian ms), for
//!   ids handed over from memory (see `recent_ids.rs`); compaction drops keys older than
//!   the window (see [`log::DedupeExpiry`]). A data directory of an earlier build also has
//!   `dedupe` (the same by the id itself), looked up too until its ids leave the window.
//! - `profiles`: user id → postcard [`Profile`], as of the last checkpoint
//! - `meta`: `profiles_seq` → the log position (u64 big-endian) `profiles` is consistent
//!   with; `dedupe_seq` → the log position up to which the ids are in `event_ids`;
//!   `id_hasher` → the keys of the ids' hash
//! - `items`: item id → postcard [`Item`]
//! - `models`: model versions and snapshots (see `models.rs`)
//!
//! Profiles live in memory and are written only by checkpoints; the event log is the
//! durable record that start-up replays after `profiles_seq` (see [`reflex_core::Engine`]).
//!
//! A write that fails (a full disk) stops the fjall database for good; the store then
//! reopens it in place once the disk has room again (see `reopen.rs`), keeping what lives
//! in memory.
//!
//! [`LogRecord`]: reflex_core::LogRecord
//! [`Profile`]: reflex_core::Profile
//! [`Item`]: reflex_core::Item

mod catalog;
mod config;
mod disk;
mod log;
mod models;
mod profiles;
mod recent_ids;
mod reopen;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use fjall::{OwnedWriteBatch, PersistMode};
use parking_lot::Mutex;
use reflex_core::{Error, ProfilePolicy, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::info;

pub use self::config::{Durability, EmbeddedConfig};
use self::log::LogState;
use self::profiles::ProfileState;
use self::reopen::Handles;

/// Name of the keyspace of the dedupe window's event ids (by their hash), which the
/// expiry filter is assigned to by name.
const EVENT_IDS_KEYSPACE: &str = "event_ids";

/// Name of the keyspace where builds before the hashed ids kept the dedupe window's ids
/// (by the id itself); expired like `event_ids`, and dropped once its ids have left the
/// window.
const LEGACY_DEDUPE_KEYSPACE: &str = "dedupe";

/// Key in `meta` of the keys the event ids are hashed with (see `recent_ids.rs`).
const ID_HASHER_KEY: &[u8] = b"id_hasher";

/// Key in `meta` of the time after which every id in the legacy `dedupe` keyspace is
/// out of the window, so the keyspace can go.
const LEGACY_DEDUPE_UNTIL_KEY: &[u8] = b"legacy_dedupe_until";

/// Key in `meta` of the log position the `profiles` keyspace is consistent with.
const PROFILES_SEQ_KEY: &[u8] = b"profiles_seq";

/// Key in `meta` of the log position up to which the appended events' ids are in the
/// `event_ids` keyspace (those after it are read back from the log at start-up).
const DEDUPE_SEQ_KEY: &[u8] = b"dedupe_seq";

/// The embedded store: implements [`EventSink`], [`ProfileStore`], [`CatalogStore`] and
/// [`ModelStore`](reflex_core::ModelStore), so one `Arc` fills every storage slot of the
/// engine's backends.
///
/// [`EventSink`]: reflex_core::EventSink
/// [`ProfileStore`]: reflex_core::ProfileStore
/// [`CatalogStore`]: reflex_core::CatalogStore
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

/// Everything the store's blocking work needs, behind one `Arc` so it can move onto the
/// blocking thread pool.
struct Shared {
    /// The open database. Swapped whole when the store reopens after a failed write, so
    /// an operation loads it once (one atomic load, no lock) and uses that copy
    /// throughout; `None` while a reopen is under way.
    handles: ArcSwapOption<Handles>,
    /// Makes one reopen at a time and spaces out attempts; taken only on that cold path.
    reopen: Mutex<reopen::Attempts>,
    /// How appends and catalog writes reach the disk.
    persist: PersistMode,
    dedupe_window_ms: i64,
    /// What the database is opened with, also on a reopen.
    tuning: reopen::Tuning,
    log_retention_ms: i64,
    /// When a scheduled checkpoint is due (see [`EmbeddedConfig`]).
    checkpoint_events_per_profile: u64,
    checkpoint_max_interval_ms: i64,
    /// The free-space floor of ingest, and whether a failed write stopped the database.
    disk: disk::DiskGuard,
    log: LogState,
    profile_state: ProfileState,
    /// Makes a catalog delete's "was it there" and its removal one step (and the same for
    /// model version numbering).
    catalog_writer: Mutex<()>,
    data_dir: PathBuf,
}

impl EmbeddedStore {
    /// Opens (or creates) the database in `config.data_dir`, loads the last profile
    /// checkpoint into memory and finds the end of the log. Blocks on disk I/O, so call it
    /// at start-up or from a blocking context. Fails when another process holds the
    /// directory.
    pub fn open(config: EmbeddedConfig, policy: ProfilePolicy) -> Result<Arc<Self>> {
        config.validate()?;
        let dir = &config.data_dir;
        let context = || format!("opening embedded store in {}", dir.display());
        std::fs::create_dir_all(dir).map_err(|e| Error::storage(context(), e))?;
        let tuning = reopen::Tuning {
            dedupe_window_ms: config.dedupe_window_ms,
            memtable_bytes: config.memtable_bytes,
            log_memtable_bytes: config.log_memtable_bytes,
        };
        let handles = Handles::open(dir, tuning).map_err(|e| Error::storage(context(), e))?;
        let last_seq =
            log::last_seq_on_disk(&handles.events).map_err(fault("reading the log's end"))?;
        let (dedupe_seq, recent) =
            log::recent_ids_on_disk(&handles, last_seq, config.memtable_bytes)
                .map_err(fault("reading the recent event ids back from the log"))?;
        let profile_state = ProfileState::load(&handles.profiles, &handles.meta, policy)
            .map_err(fault("loading profiles"))?;
        info!(
            data_dir = %dir.display(),
            last_seq,
            profiles = profile_state.len(),
            profiles_seq = profile_state.durable_seq(),
            dedupe_seq,
            recent_ids = recent.len(),
            "embedded store opened"
        );
        Ok(Arc::new(Self {
            shared: Arc::new(Shared {
                handles: ArcSwapOption::from_pointee(handles),
                reopen: Mutex::new(reopen::Attempts::default()),
                persist: config.durability.persist_mode(),
                dedupe_window_ms: config.dedupe_window_ms,
                tuning,
                log_retention_ms: config.log_retention_ms,
                checkpoint_events_per_profile: config.checkpoint_events_per_profile,
                checkpoint_max_interval_ms: config.checkpoint_max_interval_ms,
                disk: disk::DiskGuard::new(dir, config.min_free_bytes),
                log: LogState::new(last_seq, dedupe_seq, recent, config.memtable_bytes),
                profile_state,
                catalog_writer: Mutex::new(()),
                data_dir: config.data_dir,
            }),
        }))
    }

    /// The directory the database lives in.
    pub fn data_dir(&self) -> &Path {
        &self.shared.data_dir
    }

    /// Hands every event id held in memory over to the `event_ids` keyspace now (maintenance
    /// does it once enough have gathered); returns how many it wrote.
    #[cfg(test)]
    async fn hand_over_ids(&self) -> Result<u64> {
        self.blocking("handing event ids over", |s, h| s.hand_over_ids(h, true))
            .await
    }

    /// Runs `work` on the blocking pool, so fjall's disk I/O never stalls the async
    /// runtime; `context` names the operation in errors.
    async fn blocking<T, F>(&self, context: &'static str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared, &Handles) -> Result<T, StoreError> + Send + 'static,
    {
        run_blocking(Arc::clone(&self.shared), context, work).await
    }
}

/// [`EmbeddedStore::blocking`] for work that owns its `Arc` (checkpoint futures).
///
/// A database stopped by a failed write is reopened first when it can be (see
/// [`Shared::heal`]); `work` then gets the database as it is now, which stays open until
/// `work` returns.
async fn run_blocking<T, F>(shared: Arc<Shared>, context: &'static str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Shared, &Handles) -> Result<T, StoreError> + Send + 'static,
{
    let work = move || {
        shared.heal();
        let handles = shared.handles()?;
        let result = work(&shared, &handles);
        // Noted while `handles` is still held: a reopen waits for every holder of the
        // old database, so this can never mark the new one stopped.
        if let Err(StoreError::Fjall(fjall::Error::Poisoned)) = &result {
            shared.disk.note_failed_commit();
        }
        result
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(fault(context)),
        Err(e) if e.is_panic() => Err(Error::Internal(format!("{context}: storage task panicked"))),
        Err(e) => Err(Error::unavailable(context, e)),
    }
}

impl Shared {
    /// Commits `batch`; a failed commit stops the fjall database (it refuses every later
    /// write), which is noted so that readiness says so and the store reopens it.
    fn commit(&self, batch: OwnedWriteBatch) -> Result<(), StoreError> {
        batch
            .commit()
            .inspect_err(|_| self.disk.note_failed_commit())?;
        Ok(())
    }
}

/// What can go wrong inside the embedded backend; the trait methods turn it into
/// [`reflex_core::Error::Storage`] with the operation as context.
#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error("data directory {} is in use by another process (fjall lock held)", .0.display())]
    Locked(PathBuf),
    #[error(transparent)]
    Fjall(#[from] fjall::Error),
    #[error("opening keyspace {name}: {source}")]
    Keyspace {
        name: &'static str,
        source: fjall::Error,
    },
    #[error("the database is being reopened after a failed write")]
    Reopening,
    #[error("the stopped database is still in use after {waited_ms} ms; reopening it later")]
    StillInUse { waited_ms: u64 },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("corrupt {what} under key {key:?}: {reason}")]
    Corrupt {
        what: &'static str,
        key: String,
        reason: String,
    },
    #[error("checkpoint at log position {seq} is older than the durable one at {durable}")]
    StaleCheckpoint { seq: u64, durable: u64 },
    #[error(
        "{} has {} free, below the floor store.embedded.min_free_bytes = {}; ingest resumes \
         by itself once space is freed",
        dir.display(), disk::mib(*free_bytes), disk::mib(*floor_bytes)
    )]
    BelowFloor {
        dir: PathBuf,
        free_bytes: u64,
        floor_bytes: u64,
    },
}

/// Maps a [`StoreError`] to the core error with `context` (a full disk is `UNAVAILABLE`,
/// see [`disk::classify`]).
fn fault(context: &'static str) -> impl FnOnce(StoreError) -> Error {
    move |e| disk::classify(context, e)
}

/// Encodes `value` with postcard at the end of `buf`, reusing its allocation.
fn append_encoded<T: Serialize>(
    value: &T,
    buf: &mut Vec<u8>,
    what: &'static str,
) -> Result<(), StoreError> {
    postcard::to_io(value, &mut *buf).map_err(|source| StoreError::Encode { what, source })?;
    Ok(())
}

/// Encodes `value` with postcard into a new buffer.
fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|source| StoreError::Encode { what, source })
}

/// Decodes a postcard value stored under `key`.
fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
    key: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| corrupt(what, key, e))
}

/// Reads a big-endian integer of 8 bytes stored under `key`.
fn be_u64(bytes: &[u8], what: &'static str, key: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| corrupt(what, key, format!("{} bytes, expected 8", bytes.len())))?;
    Ok(u64::from_be_bytes(array))
}

fn corrupt(what: &'static str, key: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests;
