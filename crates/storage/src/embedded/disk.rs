//! The data directory's disk: the free-space floor below which ingest is refused, and
//! what a full or failed disk looks like to clients and to readiness.
//!
//! Ingest stops at the floor, before the disk is full, so the writes that keep the store
//! healthy (profile checkpoints, compaction, model snapshots) still find room, and
//! ingest resumes by itself as soon as space returns. A write that fails anyway (another
//! process filled the disk) leaves fjall refusing every later write: the store then
//! reports itself unwritable so readiness can say so, and reopens the database once the
//! free space is above the floor again (see `reopen.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use reflex_core::types::TimestampMs;
use reflex_core::{DiskSpace, Error};

use super::StoreError;

/// How long a reading of the free space is trusted before the next append reads it
/// again: one `statvfs` per 250 ms, not per batch.
const RECHECK_MS: TimestampMs = 250;

/// The free-space floor and the last reading of the data directory's filesystem.
pub(super) struct DiskGuard {
    dir: PathBuf,
    floor_bytes: u64,
    free_bytes: AtomicU64,
    total_bytes: AtomicU64,
    checked_ms: AtomicI64,
    /// A write failed and fjall refuses every later one until the database is reopened.
    poisoned: AtomicBool,
}

impl DiskGuard {
    pub(super) fn new(dir: &Path, floor_bytes: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            floor_bytes,
            free_bytes: AtomicU64::new(u64::MAX),
            total_bytes: AtomicU64::new(0),
            checked_ms: AtomicI64::new(TimestampMs::MIN),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Refuses an append while the free space is below the floor (reading it again when
    /// the last reading is older than [`RECHECK_MS`]).
    pub(super) fn admit(&self, now: TimestampMs) -> Result<(), StoreError> {
        if now.saturating_sub(self.checked_ms.load(Ordering::Relaxed)) >= RECHECK_MS {
            self.refresh(now);
        }
        let free_bytes = self.free_bytes.load(Ordering::Relaxed);
        if free_bytes < self.floor_bytes {
            return Err(StoreError::BelowFloor {
                dir: self.dir.clone(),
                free_bytes,
                floor_bytes: self.floor_bytes,
            });
        }
        Ok(())
    }

    /// Reads the filesystem's free space now. A failed reading keeps the last one: the
    /// appends themselves will fail if the disk is really gone.
    pub(super) fn refresh(&self, now: TimestampMs) -> Option<DiskSpace> {
        self.checked_ms.store(now, Ordering::Relaxed);
        match rustix::fs::statvfs(&self.dir) {
            Ok(stat) => {
                let free = stat.f_bavail.saturating_mul(stat.f_frsize);
                let total = stat.f_blocks.saturating_mul(stat.f_frsize);
                self.free_bytes.store(free, Ordering::Relaxed);
                self.total_bytes.store(total, Ordering::Relaxed);
                Some(DiskSpace {
                    free_bytes: free,
                    total_bytes: total,
                    floor_bytes: self.floor_bytes,
                })
            }
            Err(err) => {
                tracing::warn!(dir = %self.dir.display(), %err, "cannot read the data directory's free space");
                None
            }
        }
    }

    /// Notes a failed commit: after one, fjall accepts no other write until the
    /// database is reopened.
    pub(super) fn note_failed_commit(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    /// Notes that the database was reopened and takes writes again.
    pub(super) fn note_reopened(&self) {
        self.poisoned.store(false, Ordering::Release);
    }

    /// Whether a failed write stopped the database (and it is not reopened yet).
    pub(super) fn stopped(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Why the store cannot take writes now, if it cannot.
    pub(super) fn unwritable(&self) -> Option<String> {
        if self.stopped() {
            return Some(format!(
                "a write to {} failed (see the log); the embedded store refuses writes until \
                 it has reopened its database, which it does by itself once the disk has \
                 more than store.embedded.min_free_bytes = {} free",
                self.dir.display(),
                mib(self.floor_bytes)
            ));
        }
        let free_bytes = self.free_bytes.load(Ordering::Relaxed);
        (free_bytes < self.floor_bytes).then(|| {
            format!(
                "{} has {} free, below the floor store.embedded.min_free_bytes = {}",
                self.dir.display(),
                mib(free_bytes),
                mib(self.floor_bytes)
            )
        })
    }
}

/// `n` bytes in MiB, for messages.
pub(super) fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

/// Whether `err` is the disk running out of room (or of quota).
pub(super) fn is_disk_full(err: &StoreError) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    match err {
        StoreError::BelowFloor { .. } => true,
        StoreError::Fjall(fjall::Error::Io(io)) => {
            io.kind() == std::io::ErrorKind::StorageFull
                || matches!(io.raw_os_error(), Some(ENOSPC | EDQUOT))
        }
        _ => false,
    }
}

/// The core error for a store error met while doing `context`: a full disk or a
/// refusing store is `UNAVAILABLE` (retry later; nothing was recorded), the rest a
/// storage fault.
pub(super) fn classify(context: &'static str, err: StoreError) -> Error {
    if is_disk_full(&err) {
        return Error::unavailable(format!("{context}: the data directory's disk is full"), err);
    }
    if matches!(
        err,
        StoreError::Fjall(fjall::Error::Poisoned) | StoreError::Reopening
    ) {
        return Error::unavailable(
            format!(
                "{context}: the embedded store refuses writes after an earlier write failed \
                 (a full or failing disk) until it has reopened its database, which it does \
                 by itself once the disk has room again"
            ),
            err,
        );
    }
    Error::storage(context, err)
}
