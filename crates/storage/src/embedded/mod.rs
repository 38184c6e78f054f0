//! The embedded backend: one fjall database in a local directory holds the event log, the
//! dedupe keys, profile checkpoints and the catalog. It is the default, and durable.
//!
//! Keyspaces:
//! - `events`: seq (u64 big-endian) → postcard [`LogRecord`]
//! - `dedupe`: event id → ingest time (i64 big-endian ms); compaction drops keys older
//!   than the window (see [`log::DedupeExpiry`])
//! - `profiles`: user id → postcard [`Profile`], as of the last checkpoint
//! - `meta`: `profiles_seq` → the log position (u64 big-endian) `profiles` is consistent with
//! - `items`: item id → postcard [`Item`]
//! - `models`: model versions and snapshots (see `models.rs`)
//!
//! Profiles live in memory and are written only by checkpoints; the event log is the
//! durable record that start-up replays after `profiles_seq` (see [`reflex_core::Engine`]).
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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fjall::config::PinningPolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::Mutex;
use reflex_core::{Error, ProfilePolicy, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::info;

pub use self::config::{Durability, EmbeddedConfig};
use self::log::LogState;
use self::profiles::ProfileState;

/// Name of the keyspace of dedupe keys, which the expiry filter is assigned to by name.
const DEDUPE_KEYSPACE: &str = "dedupe";

/// Key in `meta` of the log position the `profiles` keyspace is consistent with.
const PROFILES_SEQ_KEY: &[u8] = b"profiles_seq";

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
    db: Database,
    events: Keyspace,
    dedupe: Keyspace,
    profiles: Keyspace,
    meta: Keyspace,
    items: Keyspace,
    models: Keyspace,
    /// How appends and catalog writes reach the disk.
    persist: PersistMode,
    dedupe_window_ms: i64,
    log_retention_ms: i64,
    /// The free-space floor of ingest, and whether a failed write stopped the store.
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
        let expiry = log::DedupeExpiry::assigner(config.dedupe_window_ms);
        let db = Database::builder(dir)
            .with_compaction_filter_factories(expiry)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => Error::storage(context(), StoreError::Locked(dir.clone())),
                other => Error::storage(context(), other),
            })?;
        let keyspace = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|e| Error::storage(format!("opening keyspace {name}"), e))
        };
        let events = keyspace("events")?;
        // Nearly every dedupe lookup is for a new id, answered by the tables' bloom
        // filters alone; fjall pins only level 0's filters by default, so once the keys
        // of the window reached deeper levels each lookup read and checksummed a filter
        // block from disk, and ingest fell from 140k to 3k events/s. Pinned, the filters
        // cost about 1.25 bytes per key of the window in memory. (fjall stores a
        // keyspace's options when it creates it: a data directory made before this keeps
        // its old policy.)
        let dedupe = db
            .keyspace(DEDUPE_KEYSPACE, || {
                KeyspaceCreateOptions::default()
                    .filter_block_pinning_policy(PinningPolicy::all(true))
            })
            .map_err(|e| Error::storage(format!("opening keyspace {DEDUPE_KEYSPACE}"), e))?;
        let profiles = keyspace("profiles")?;
        let meta = keyspace("meta")?;
        let items = keyspace("items")?;
        let models = keyspace("models")?;

        let last_seq = log::last_seq_on_disk(&events).map_err(fault("reading the log's end"))?;
        let profile_state =
            ProfileState::load(&profiles, &meta, policy).map_err(fault("loading profiles"))?;
        info!(
            data_dir = %dir.display(),
            last_seq,
            profiles = profile_state.len(),
            profiles_seq = profile_state.durable_seq(),
            "embedded store opened"
        );
        Ok(Arc::new(Self {
            shared: Arc::new(Shared {
                db,
                events,
                dedupe,
                profiles,
                meta,
                items,
                models,
                persist: config.durability.persist_mode(),
                dedupe_window_ms: config.dedupe_window_ms,
                log_retention_ms: config.log_retention_ms,
                disk: disk::DiskGuard::new(dir, config.min_free_bytes),
                log: LogState::new(last_seq),
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

    /// Runs `work` on the blocking pool, so fjall's disk I/O never stalls the async
    /// runtime; `context` names the operation in errors.
    async fn blocking<T, F>(&self, context: &'static str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
    {
        run_blocking(Arc::clone(&self.shared), context, work).await
    }
}

/// [`EmbeddedStore::blocking`] for work that owns its `Arc` (checkpoint futures).
async fn run_blocking<T, F>(shared: Arc<Shared>, context: &'static str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
{
    let work = move || {
        let result = work(&shared);
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

/// What can go wrong inside the embedded backend; the trait methods turn it into
/// [`reflex_core::Error::Storage`] with the operation as context.
#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error("data directory {} is in use by another process (fjall lock held)", .0.display())]
    Locked(PathBuf),
    #[error(transparent)]
    Fjall(#[from] fjall::Error),
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
