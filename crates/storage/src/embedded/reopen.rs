//! The open fjall database, and reopening it in place after a failed write.
//!
//! fjall stops a database for good when a write fails (a full disk, an I/O error):
//! every later write answers `Poisoned`, and its flush and compaction workers may have
//! quit. Rather than wait for a restart, the store drops the database and opens it again
//! once the disk has room above the floor, as a restart would, while what lives in
//! memory stays: profiles, the log's end and the checkpoint position.
//!
//! The two must then agree. The batch whose commit failed may have reached the journal
//! whole (fjall flushes what it buffered when the old database is dropped) or not at
//! all, and reopening recovers what is there. Its client was answered `UNAVAILABLE`
//! and its events were applied to nothing, so reopening removes those records again
//! ([`Shared::drop_unacked`]; their ids were never noted as appended): the retry is
//! accepted and applied once, rather than answered `Duplicate` for events no profile
//! holds. Every acked record was
//! in the journal before its ack, so none is lost.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fjall::config::{FilterPolicy, PinningPolicy};
use fjall::{
    CompressionType, Database, Keyspace, KeyspaceCreateOptions, KvSeparationOptions, PersistMode,
};
use reflex_core::types::{TimestampMs, now_ms};
use tracing::{debug, info, warn};

use super::{
    EVENT_IDS_KEYSPACE, LEGACY_DEDUPE_KEYSPACE, LEGACY_DEDUPE_UNTIL_KEY, Shared, StoreError, log,
};

/// How long after a reopen attempt the next may start: a store that cannot reopen yet
/// (the disk failing rather than full) is retried about once a second, not per call.
const RETRY_MS: TimestampMs = 1_000;

/// How long a reopen waits for operations still using the stopped database to finish
/// before it gives up until the next attempt.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How often, and how far apart, opening is tried again while the directory's lock is
/// still held (fjall releases it when the last handle of the old database is dropped).
const LOCKED_RETRIES: u32 = 10;
const LOCKED_PAUSE: Duration = Duration::from_millis(100);

/// Profiles encoded larger than this are kept apart from the checkpoints' keys (in blob
/// files): a user with a few events already takes more.
const PROFILE_SEPARATION_BYTES: u32 = 256;

/// How long a reopen waits for the stopped database's last files to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The settings the database and its keyspaces are opened with (again on a reopen).
#[derive(Clone, Copy, Debug)]
pub(super) struct Tuning {
    /// How long a dedupe key lives (the compaction filter drops it after).
    pub(super) dedupe_window_ms: i64,
    /// The memtable size of the profile checkpoints (and of the id keyspaces, which
    /// hand-overs write by ingestion, bypassing it), and the recent ids' budget.
    pub(super) memtable_bytes: u64,
    /// The memtable size of the event log.
    pub(super) log_memtable_bytes: u64,
}

/// The open database and its keyspaces (see the crate's `embedded` module for what each
/// holds).
pub(super) struct Handles {
    pub(super) db: Database,
    pub(super) events: Keyspace,
    /// The ids of the dedupe window by their 128-bit hash (see `recent_ids.rs`).
    pub(super) event_ids: Keyspace,
    /// The ids an earlier build recorded by the id itself, consulted as well until they
    /// have all left the window; `None` in a data directory that never had them.
    pub(super) legacy_dedupe: Option<Keyspace>,
    pub(super) profiles: Keyspace,
    pub(super) meta: Keyspace,
    pub(super) items: Keyspace,
    pub(super) models: Keyspace,
}

impl Handles {
    /// Opens (or creates) the database in `dir` and its keyspaces.
    pub(super) fn open(dir: &Path, tuning: Tuning) -> Result<Self, StoreError> {
        let expiry = log::DedupeExpiry::assigner(tuning.dedupe_window_ms);
        let db = Database::builder(dir)
            .with_compaction_filter_factories(expiry)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => StoreError::Locked(dir.to_owned()),
                other => StoreError::Fjall(other),
            })?;
        let keyspace = |name: &'static str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|source| StoreError::Keyspace { name, source })
        };
        // The keyspaces every event writes to hold at most their memtable size in memory.
        // The log and the checkpoints are only ever read in ranges, never by key, so
        // their tables carry no bloom filters: those would cost CPU at every flush and
        // compaction, and memory, for lookups that never come.
        let written_per_event = |name: &'static str, memtable_bytes: u64| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(memtable_bytes)
                    .filter_policy(FilterPolicy::disabled())
            })
            .map_err(|source| StoreError::Keyspace { name, source })
        };
        let events = written_per_event("events", tuning.log_memtable_bytes)?;
        // A checkpoint rewrites each changed profile whole, so most of the checkpoints'
        // tables are superseded profiles. With the values apart (key-value separation),
        // compaction moves keys and pointers instead of the profiles, and a blob file
        // whose profiles have all been rewritten since goes whole.
        let profiles = db
            .keyspace("profiles", || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(tuning.memtable_bytes)
                    .filter_policy(FilterPolicy::disabled())
                    .with_kv_separation(Some(
                        KvSeparationOptions::default()
                            .separation_threshold(PROFILE_SEPARATION_BYTES)
                            .compression(CompressionType::None),
                    ))
            })
            .map_err(|source| StoreError::Keyspace {
                name: "profiles",
                source,
            })?;
        // Nearly every dedupe lookup is for a new id, answered by the tables' bloom
        // filters alone; fjall pins only level 0's filters by default, so once the keys
        // of the window reached deeper levels each lookup read and checksummed a filter
        // block from disk, and ingest fell from 140k to 3k events/s. Pinned, the filters
        // cost about 1.25 bytes per key of the window in memory. (fjall stores a
        // keyspace's options when it creates it: a data directory made before this keeps
        // its old policy.)
        let id_keyspace = |name: &'static str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(tuning.memtable_bytes)
                    .filter_block_pinning_policy(PinningPolicy::all(true))
            })
            .map_err(|source| StoreError::Keyspace { name, source })
        };
        let event_ids = id_keyspace(EVENT_IDS_KEYSPACE)?;
        let meta = keyspace("meta")?;
        let legacy_dedupe = if db.keyspace_exists(LEGACY_DEDUPE_KEYSPACE) {
            let legacy = id_keyspace(LEGACY_DEDUPE_KEYSPACE)?;
            legacy_within_window(&db, &meta, legacy, tuning.dedupe_window_ms)?
        } else {
            None
        };
        Ok(Self {
            events,
            event_ids,
            legacy_dedupe,
            profiles,
            meta,
            items: keyspace("items")?,
            models: keyspace("models")?,
            db,
        })
    }

    /// [`Handles::open`], tried again for a while when the directory is still locked.
    fn open_when_unlocked(dir: &Path, tuning: Tuning) -> Result<Self, StoreError> {
        let mut tries = 0;
        loop {
            match Self::open(dir, tuning) {
                Err(StoreError::Locked(_)) if tries < LOCKED_RETRIES => {
                    tries += 1;
                    std::thread::sleep(LOCKED_PAUSE);
                }
                other => return other,
            }
        }
    }
}

/// When the next reopen may be tried.
#[derive(Default)]
pub(super) struct Attempts {
    next_ms: TimestampMs,
}

impl Shared {
    /// The database as it is now; `Reopening` while it is being reopened.
    pub(super) fn handles(&self) -> Result<Arc<Handles>, StoreError> {
        self.handles.load_full().ok_or(StoreError::Reopening)
    }

    /// Reopens the database if a failed write stopped it, the disk has room above the
    /// floor and no attempt started in the last [`RETRY_MS`]. Costs one atomic load when
    /// the database is not stopped, and never waits for a reopen another thread runs.
    pub(super) fn heal(&self) {
        if !self.disk.stopped() {
            return;
        }
        let Some(mut attempts) = self.reopen.try_lock() else {
            return;
        };
        let now = now_ms();
        if !self.disk.stopped() || now < attempts.next_ms {
            return;
        }
        attempts.next_ms = now.saturating_add(RETRY_MS);
        if let Err(err) = self.disk.admit(now) {
            debug!(%err, "the embedded store stays stopped until the disk has room");
            return;
        }
        let started = Instant::now();
        match self.reopen() {
            Ok(dropped) => info!(
                data_dir = %self.data_dir.display(),
                dropped_unacked = dropped,
                took_ms = started.elapsed().as_millis() as u64,
                "embedded store reopened after a failed write: it takes writes again"
            ),
            Err(err) => warn!(
                data_dir = %self.data_dir.display(),
                %err,
                "reopening the embedded store after a failed write failed; trying again in 1 s"
            ),
        }
    }

    /// Asks fjall whether the database still takes writes, noting it stopped if not: a
    /// flush or compaction that failed stops it too, with no write of ours failing.
    pub(super) fn probe(&self) {
        if let Ok(handles) = self.handles()
            && handles.db.persist(PersistMode::Buffer).is_err()
        {
            self.disk.note_failed_commit();
        }
    }

    /// Drops the stopped database, opens it again and makes it agree with memory;
    /// returns how many records of a failed append it removed. Leaves the store without
    /// a database (`Reopening`) when opening fails, for the next attempt to retry.
    fn reopen(&self) -> Result<u64, StoreError> {
        if let Some(old) = self.handles.swap(None) {
            // New operations now find no database; those holding the old one finish (its
            // writes all fail) before it can be dropped and the directory unlocked.
            if let Err(old) = close_when_unused(old) {
                self.handles.store(Some(old));
                return Err(StoreError::StillInUse {
                    waited_ms: DRAIN_TIMEOUT.as_millis() as u64,
                });
            }
            wait_until_closed(&self.data_dir);
        }
        let handles = Handles::open_when_unlocked(&self.data_dir, self.tuning)?;
        // No append runs without a database, but the lock keeps the log's end still
        // while the records after it are compared and removed.
        let mut writer = self.log.writer.lock();
        let dropped = self.drop_unacked(&handles, &mut writer)?;
        self.profile_state.reload_durable_seq(&handles.meta)?;
        self.handles.store(Some(Arc::new(handles)));
        self.disk.note_reopened();
        drop(writer);
        Ok(dropped)
    }
}

/// Waits until this process holds no file under `dir` open. fjall's worker threads let
/// go of the stopped database (and its journal, which flushes what it buffered when it
/// closes) just after dropping it returns: a flush that came after the reopened database
/// recovered the journal could overwrite what it writes next. Reads `/proc/self/fd`, so
/// it returns at once where there is none; after [`CLOSE_TIMEOUT`] it goes on with a
/// warning, as fjall's lock still keeps a database that is really open from opening twice.
fn wait_until_closed(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else {
        return;
    };
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    loop {
        let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
            return;
        };
        let still_open = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|target| target.starts_with(&dir));
        if !still_open {
            return;
        }
        if Instant::now() >= deadline {
            warn!(
                data_dir = %dir.display(),
                "files of the stopped database are still open; reopening it regardless"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Drops `old` once nothing else holds it, which stops fjall's workers and releases the
/// directory's lock; gives it back if it is still in use after [`DRAIN_TIMEOUT`].
fn close_when_unused(mut old: Arc<Handles>) -> Result<(), Arc<Handles>> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        match Arc::try_unwrap(old) {
            Ok(handles) => {
                drop(handles);
                return Ok(());
            }
            Err(still_shared) if Instant::now() < deadline => {
                old = still_shared;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(still_shared) => return Err(still_shared),
        }
    }
}

/// The `dedupe` keyspace of an earlier build while it may still hold ids of the window.
/// The first open by this build notes in `meta` when the last of them leaves the window;
/// an open after that time (or one that finds the keyspace empty) drops the keyspace.
fn legacy_within_window(
    db: &Database,
    meta: &Keyspace,
    legacy: Keyspace,
    window_ms: i64,
) -> Result<Option<Keyspace>, StoreError> {
    let now = now_ms();
    let until = match meta.get(LEGACY_DEDUPE_UNTIL_KEY)? {
        Some(value) => {
            super::be_u64(&value, "legacy dedupe end", LEGACY_DEDUPE_UNTIL_KEY)? as TimestampMs
        }
        None => {
            let until = now.saturating_add(window_ms);
            meta.insert(LEGACY_DEDUPE_UNTIL_KEY, until.to_be_bytes())?;
            db.persist(PersistMode::SyncAll)?;
            until
        }
    };
    if now <= until && !legacy.is_empty()? {
        info!(
            until_ms = until,
            "event ids of an earlier build are looked up too until they leave the window"
        );
        return Ok(Some(legacy));
    }
    db.delete_keyspace(legacy)?;
    meta.remove(LEGACY_DEDUPE_UNTIL_KEY)?;
    info!("dropped the event ids of an earlier build: none is in the window any more");
    Ok(None)
}
