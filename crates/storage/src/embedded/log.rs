//! The event log and its dedupe window: [`EventSink`] for [`EmbeddedStore`].
//!
//! Every append is one fjall write batch over `events` and `dedupe`, committed under one
//! mutex with the configured durability, so positions are gap-free and the dedupe check
//! sees every earlier append. A failed commit advances nothing and poisons the fjall
//! database, which then refuses writes until the process restarts; if the failed batch
//! did reach the journal, it is recovered then, and a client retrying it gets `duplicate`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use fjall::{Keyspace, OwnedWriteBatch};
use parking_lot::Mutex;
use reflex_core::types::{TimestampMs, now_ms};
use reflex_core::{Appended, EventSink, LogRecord, Result, Seq};
use tracing::debug;

use super::{EmbeddedStore, Shared, StoreError, append_encoded, be_u64, decode};

/// Dedupe keys examined per maintenance step; the writer lock is held for one step.
const EXPIRY_CHUNK: usize = 4096;

/// The append side's state.
pub(super) struct LogState {
    /// The one serialisation point of appends, holding the position of the last committed
    /// record; advanced only after a commit succeeds.
    writer: Mutex<Seq>,
    /// Position of the last committed record, readable without the writer lock.
    last_seq: AtomicU64,
}

impl LogState {
    pub(super) fn new(last_seq: Seq) -> Self {
        Self {
            writer: Mutex::new(last_seq),
            last_seq: AtomicU64::new(last_seq),
        }
    }
}

/// The position of the last record in `events`, 0 when empty.
pub(super) fn last_seq_on_disk(events: &Keyspace) -> Result<Seq, StoreError> {
    match events.last_key_value() {
        None => Ok(0),
        Some(guard) => {
            let key = guard.key()?;
            be_u64(&key, "log key", &key)
        }
    }
}

impl Shared {
    fn append_blocking(&self, records: Vec<LogRecord>) -> Result<Vec<Appended>, StoreError> {
        // Encode before taking the writer lock, so concurrent appends overlap this part;
        // one buffer for the whole call, `ends[i]` marks where record `i` stops.
        let mut encoded = Vec::with_capacity(records.len() * 192);
        let mut ends = Vec::with_capacity(records.len());
        for record in &records {
            append_encoded(record, &mut encoded, "log record")?;
            ends.push(encoded.len());
        }

        let now = now_ms();
        let now_bytes = now.to_be_bytes();
        let mut outcomes = Vec::with_capacity(records.len());
        let mut in_call: HashSet<&str> = HashSet::with_capacity(records.len());
        let mut writer = self.log.writer.lock();
        let mut batch = OwnedWriteBatch::with_capacity(self.db.clone(), 2 * records.len())
            .durability(Some(self.persist));
        let mut seq = *writer;
        let mut start = 0;
        for (record, &end) in records.iter().zip(&ends) {
            let bytes = &encoded[start..end];
            start = end;
            if let LogRecord::Event { event, .. } = record {
                let id = event.event_id.as_str();
                if !in_call.insert(id) || self.recorded_within_window(id.as_bytes(), now)? {
                    outcomes.push(Appended::Duplicate);
                    continue;
                }
                batch.insert(&self.dedupe, id.as_bytes(), &now_bytes[..]);
            }
            seq += 1;
            batch.insert(&self.events, &seq.to_be_bytes()[..], bytes);
            outcomes.push(Appended::At(seq));
        }
        if seq != *writer {
            batch.commit()?;
            *writer = seq;
            self.log.last_seq.store(seq, Ordering::Release);
        }
        Ok(outcomes)
    }

    /// Whether `id` was recorded no longer than the dedupe window before `now`.
    fn recorded_within_window(&self, id: &[u8], now: TimestampMs) -> Result<bool, StoreError> {
        match self.dedupe.get(id)? {
            None => Ok(false),
            Some(value) => {
                let at = be_u64(&value, "dedupe entry", id)? as TimestampMs;
                Ok(now.saturating_sub(at) <= self.dedupe_window_ms)
            }
        }
    }

    fn read_blocking(&self, after: Seq, limit: usize) -> Result<Vec<(Seq, LogRecord)>, StoreError> {
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        for guard in self.events.range(first.to_be_bytes()..).take(limit) {
            let (key, value) = guard.into_inner()?;
            let seq = be_u64(&key, "log key", &key)?;
            out.push((seq, decode(&value, "log record", &key)?));
        }
        Ok(out)
    }

    /// Deletes dedupe keys older than the window; returns how many.
    ///
    /// Cost: reads every dedupe key (one per event of the last window, so up to the
    /// ingest rate times the window), in chunks; each chunk re-checks its keys and deletes
    /// them under the writer lock, so a key re-recorded meanwhile is kept. The deletes are
    /// not fsynced: a lost delete only means the key is deleted again next time, and an
    /// expired key counts as absent anyway.
    fn expire_dedupe_blocking(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let expired = |value: &[u8], key: &[u8]| -> Result<bool, StoreError> {
            let at = be_u64(value, "dedupe entry", key)? as TimestampMs;
            Ok(now.saturating_sub(at) > self.dedupe_window_ms)
        };
        let mut removed = 0;
        let mut candidates = Vec::with_capacity(EXPIRY_CHUNK);
        let mut scan = self.dedupe.iter();
        loop {
            candidates.clear();
            for guard in scan.by_ref() {
                let (key, value) = guard.into_inner()?;
                if expired(&value, &key)? {
                    candidates.push(key);
                    if candidates.len() == EXPIRY_CHUNK {
                        break;
                    }
                }
            }
            if candidates.is_empty() {
                return Ok(removed);
            }
            let _writer = self.log.writer.lock();
            let mut batch = self.db.batch();
            for key in &candidates {
                // Re-read under the lock: an append may have recorded the id again.
                let still_expired = match self.dedupe.get(key)? {
                    Some(value) => expired(&value, key)?,
                    None => false,
                };
                if still_expired {
                    batch.remove(&self.dedupe, key.clone());
                    removed += 1;
                }
            }
            batch.commit()?;
        }
    }
}

#[async_trait]
impl EventSink for EmbeddedStore {
    async fn append(&self, records: Vec<LogRecord>) -> Result<Vec<Appended>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.blocking("appending to the event log", move |s| {
            s.append_blocking(records)
        })
        .await
    }

    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<(Seq, LogRecord)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.blocking("reading the event log", move |s| {
            s.read_blocking(after, limit)
        })
        .await
    }

    async fn last_seq(&self) -> Result<Seq> {
        Ok(self.shared.log.last_seq.load(Ordering::Acquire))
    }

    /// Expires dedupe keys older than the window (a scan of every dedupe key, see
    /// `expire_dedupe_blocking`) and evicts expired profiles from memory (a scan of every
    /// profile), both on the blocking pool.
    async fn maintain(&self) -> Result<()> {
        let (removed, evicted) = self
            .blocking("maintaining the embedded store", |s| {
                let removed = s.expire_dedupe_blocking()?;
                Ok((removed, s.profile_state.evict_expired(now_ms())))
            })
            .await?;
        debug!(removed, evicted, "embedded store maintained");
        Ok(())
    }
}
