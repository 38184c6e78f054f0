//! The event log and its dedupe window: [`EventSink`] for [`EmbeddedStore`].
//!
//! Every append is one fjall write batch over `events` and `dedupe`, committed under one
//! mutex with the configured durability, so positions are gap-free and the dedupe check
//! sees every earlier append. A failed commit advances nothing and stops the fjall
//! database, which refuses writes until the store reopens it (see `reopen.rs`); if the
//! failed batch did reach the journal, reopening removes it again, so a client retrying
//! it gets its events accepted, once. (A process restarted instead recovers the batch and
//! replays it, and the retry gets `duplicate`.)

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use fjall::compaction::filter::{
    CompactionFilter, CompactionFilterResult, Context, Factory, ItemAccessor, Verdict,
};
use fjall::{Keyspace, OwnedWriteBatch, PersistMode};
use parking_lot::Mutex;
use reflex_core::types::{IdHashState, TimestampMs, now_ms};
use reflex_core::{Appended, EventId, EventSink, LogRecord, Result, Seq, SinkHealth};
use tracing::{debug, error, warn};

use super::{
    DEDUPE_KEYSPACE, EmbeddedStore, Handles, Shared, StoreError, append_encoded, be_u64, decode,
    fault,
};

/// The append side's state.
pub(super) struct LogState {
    /// The one serialisation point of appends, holding the position of the last committed
    /// record; advanced only after a commit succeeds.
    pub(super) writer: Mutex<Seq>,
    /// Position of the last committed record, readable without the writer lock.
    last_seq: AtomicU64,
    /// The log's end as seen at each trim (time, position), oldest first: tells which
    /// positions are older than the retention without reading the records. Empty after a
    /// restart, so nothing recorded before it is trimmed until the retention has passed
    /// again.
    marks: Mutex<VecDeque<(TimestampMs, Seq)>>,
}

impl LogState {
    pub(super) fn new(last_seq: Seq) -> Self {
        Self {
            writer: Mutex::new(last_seq),
            last_seq: AtomicU64::new(last_seq),
            marks: Mutex::new(VecDeque::new()),
        }
    }
}

impl LogState {
    /// Notes the log's end at `now`, and returns the last position recorded at least
    /// `retention_ms` before `now` (0 when none is known to be).
    fn expired_through(&self, now: TimestampMs, last: Seq, retention_ms: i64) -> Seq {
        let mut marks = self.marks.lock();
        if marks.back().is_none_or(|&(_, seq)| seq < last) {
            marks.push_back((now, last));
        }
        let cutoff = now.saturating_sub(retention_ms);
        let mut expired = 0;
        while let Some(&(at, seq)) = marks.front() {
            if at > cutoff {
                break;
            }
            expired = seq;
            marks.pop_front();
        }
        if expired > 0 {
            // Keep the newest expired mark: it still bounds the next trim.
            marks.push_front((cutoff, expired));
        }
        expired
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
    fn append_blocking(
        &self,
        h: &Handles,
        records: EncodedRecords,
    ) -> Result<Vec<Appended>, StoreError> {
        let EncodedRecords { bytes, ends, ids } = &records;
        let now = now_ms();
        self.disk.admit(now)?;
        let now_bytes = now.to_be_bytes();
        let mut outcomes = Vec::with_capacity(ends.len());
        let mut in_call: HashSet<&str, IdHashState> =
            HashSet::with_capacity_and_hasher(ends.len(), IdHashState::default());
        let mut writer = self.log.writer.lock();
        let mut batch = OwnedWriteBatch::with_capacity(h.db.clone(), 2 * ends.len())
            .durability(Some(self.persist));
        let mut seq = *writer;
        let mut start = 0;
        for (id, &end) in ids.iter().zip(ends) {
            let bytes = &bytes[start..end];
            start = end;
            if let Some(id) = id {
                let id = id.as_str();
                if !in_call.insert(id) || self.recorded_within_window(h, id.as_bytes(), now)? {
                    outcomes.push(Appended::Duplicate);
                    continue;
                }
                batch.insert(&h.dedupe, id.as_bytes(), &now_bytes[..]);
            }
            seq += 1;
            batch.insert(&h.events, &seq.to_be_bytes()[..], bytes);
            outcomes.push(Appended::At(seq));
        }
        if seq != *writer {
            self.commit(batch)?;
            *writer = seq;
            self.log.last_seq.store(seq, Ordering::Release);
        }
        Ok(outcomes)
    }

    /// Whether `id` was recorded no longer than the dedupe window before `now`.
    fn recorded_within_window(
        &self,
        h: &Handles,
        id: &[u8],
        now: TimestampMs,
    ) -> Result<bool, StoreError> {
        match h.dedupe.get(id)? {
            None => Ok(false),
            Some(value) => {
                let at = be_u64(&value, "dedupe entry", id)? as TimestampMs;
                Ok(now.saturating_sub(at) <= self.dedupe_window_ms)
            }
        }
    }

    /// Drops the log records up to `through`, except the last record of the log (in one
    /// write batch per call, at most [`TRIM_BATCH`] of them, oldest first), and returns
    /// how many. It never takes the
    /// writer lock: appends only add positions above every trimmed one.
    fn trim_blocking(&self, h: &Handles, through: Seq) -> Result<u64, StoreError> {
        // The last record always stays: start-up finds the log's end from it, and a log
        // emptied entirely would number its next records from 1 again.
        let last = self.log.last_seq.load(Ordering::Acquire);
        let expired = self
            .log
            .expired_through(now_ms(), last, self.log_retention_ms);
        let through = through.min(expired).min(last.saturating_sub(1));
        if through == 0 {
            return Ok(0);
        }
        let mut batch =
            OwnedWriteBatch::with_capacity(h.db.clone(), TRIM_BATCH).durability(Some(self.persist));
        let mut dropped = 0u64;
        for guard in h.events.range(..=through.to_be_bytes()).take(TRIM_BATCH) {
            let key = guard.key()?;
            batch.remove(&h.events, key);
            dropped += 1;
        }
        if dropped > 0 {
            self.commit(batch)?;
        }
        Ok(dropped)
    }

    fn read_blocking(
        &self,
        h: &Handles,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<(Seq, LogRecord)>, StoreError> {
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        for guard in h.events.range(first.to_be_bytes()..).take(limit) {
            let (key, value) = guard.into_inner()?;
            let seq = be_u64(&key, "log key", &key)?;
            out.push((seq, decode(&value, "log record", &key)?));
        }
        Ok(out)
    }

    /// Makes a reopened log end where the last acked append left it (`acked`): removes
    /// the records after it, which only the append whose commit failed can have left in
    /// the journal, together with their dedupe keys, in one fsynced batch; returns how
    /// many. Their client was answered `UNAVAILABLE` and nothing applied them, so its
    /// retry must find them absent.
    pub(super) fn drop_unacked(&self, h: &Handles, acked: Seq) -> Result<u64, StoreError> {
        let on_disk = last_seq_on_disk(&h.events)?;
        if on_disk < acked {
            // Every acked append reached the journal (at least the OS) before its ack, so
            // this is a disk that lost data; positions go on after `acked` regardless,
            // so none is given out twice.
            error!(
                acked,
                on_disk, "the reopened event log ends before the last acked record"
            );
        }
        if on_disk <= acked {
            return Ok(0);
        }
        let mut batch = h.db.batch().durability(Some(PersistMode::SyncAll));
        let mut dropped = 0u64;
        for guard in h.events.range((acked + 1).to_be_bytes()..) {
            let (key, value) = guard.into_inner()?;
            if let LogRecord::Event { event, .. } = decode(&value, "log record", &key)? {
                batch.remove(&h.dedupe, event.event_id.as_str().as_bytes());
            }
            batch.remove(&h.events, key);
            dropped += 1;
        }
        self.commit(batch)?;
        warn!(
            acked,
            dropped, "removed the records of an append that failed but reached the journal"
        );
        Ok(dropped)
    }
}

/// Most log records one trim drops, so one maintenance tick stays short however far
/// behind retention is (the next tick continues).
const TRIM_BATCH: usize = 100_000;

/// An append's records encoded (on the caller's thread, before the blocking pool and
/// its writer lock): one buffer for the call, `ends[i]` marks where record `i` stops,
/// and `ids[i]` is its event id (none for an erasure).
struct EncodedRecords {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    ids: Vec<Option<EventId>>,
}

impl EncodedRecords {
    fn new(records: &[LogRecord]) -> Result<Self, StoreError> {
        let mut bytes = Vec::with_capacity(records.len() * 192);
        let mut ends = Vec::with_capacity(records.len());
        let mut ids = Vec::with_capacity(records.len());
        for record in records {
            append_encoded(record, &mut bytes, "log record")?;
            ends.push(bytes.len());
            ids.push(match record {
                LogRecord::Event { event, .. } => Some(event.event_id.clone()),
                LogRecord::Erase { .. } => None,
            });
        }
        Ok(Self { bytes, ends, ids })
    }
}

/// Expires dedupe keys: a compaction filter on the `dedupe` keyspace that drops every key
/// recorded longer than the window before the compaction began.
///
/// Expiry thus costs nothing beyond the compactions that run anyway: a scan of the
/// keyspace would read every event id of the window (a week of ingest by default) on
/// each pass. Until a compaction reaches it, an expired key lingers on disk, and the
/// append path treats it as absent (see `recorded_within_window`). A dropped key leaves
/// a tombstone, so an older copy of it never reappears.
pub(super) struct DedupeExpiry {
    window_ms: i64,
}

impl DedupeExpiry {
    /// The database's filter assigner: this filter for `dedupe`, none for the rest.
    pub(super) fn assigner(window_ms: i64) -> FilterAssigner {
        let factory: Arc<dyn Factory> = Arc::new(Self { window_ms });
        Arc::new(move |keyspace: &str| (keyspace == DEDUPE_KEYSPACE).then(|| factory.clone()))
    }
}

impl Factory for DedupeExpiry {
    fn name(&self) -> &str {
        "reflex-dedupe-expiry"
    }

    fn make_filter(&self, _ctx: &Context) -> Box<dyn CompactionFilter> {
        Box::new(ExpireBefore(now_ms().saturating_sub(self.window_ms)))
    }
}

/// What `DatabaseBuilder::with_compaction_filter_factories` takes (fjall does not export
/// its name for it).
pub(super) type FilterAssigner = Arc<dyn Fn(&str) -> Option<Arc<dyn Factory>> + Send + Sync>;

/// One compaction's filter: drops dedupe keys recorded before this time.
struct ExpireBefore(TimestampMs);

impl CompactionFilter for ExpireBefore {
    fn filter_item(&mut self, item: ItemAccessor<'_>, _ctx: &Context) -> CompactionFilterResult {
        // A value that is not a timestamp is kept: the append path reports it as an
        // error with its key, rather than the filter losing it silently.
        let recorded = <[u8; 8]>::try_from(&item.value()?[..]).map(i64::from_be_bytes);
        Ok(match recorded {
            Ok(at) if at < self.0 => Verdict::Remove,
            _ => Verdict::Keep,
        })
    }
}

#[async_trait]
impl EventSink for EmbeddedStore {
    async fn append(&self, records: &[LogRecord]) -> Result<Vec<Appended>> {
        const CONTEXT: &str = "appending to the event log";
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let encoded = EncodedRecords::new(records).map_err(fault(CONTEXT))?;
        self.blocking(CONTEXT, move |s, h| s.append_blocking(h, encoded))
            .await
    }

    async fn read(&self, after: Seq, limit: usize) -> Result<Vec<(Seq, LogRecord)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.blocking("reading the event log", move |s, h| {
            s.read_blocking(h, after, limit)
        })
        .await
    }

    async fn last_seq(&self) -> Result<Seq> {
        Ok(self.shared.log.last_seq.load(Ordering::Acquire))
    }

    async fn health(&self) -> SinkHealth {
        let shared = Arc::clone(&self.shared);
        // Readiness asks about once a second, which also makes this the clock that
        // reopens a stopped database once space returns, with no write needed to try.
        let disk = tokio::task::spawn_blocking(move || {
            let disk = shared.disk.refresh(now_ms());
            shared.probe();
            shared.heal();
            (shared.disk.unwritable(), disk)
        })
        .await;
        match disk {
            Ok((unwritable, disk)) => SinkHealth { unwritable, disk },
            Err(err) => SinkHealth {
                unwritable: Some(format!("reading the disk's free space failed: {err}")),
                disk: None,
            },
        }
    }

    async fn trim(&self, through: Seq) -> Result<u64> {
        self.blocking("trimming the event log", move |s, h| {
            s.trim_blocking(h, through)
        })
        .await
    }

    /// Evicts expired profiles from memory (a scan of every profile), on the blocking
    /// pool. Dedupe keys need no pass: compaction expires them ([`DedupeExpiry`]).
    async fn maintain(&self) -> Result<()> {
        let evicted = self
            .blocking("maintaining the embedded store", |s, _| {
                Ok(s.profile_state.evict_expired(now_ms()))
            })
            .await?;
        debug!(evicted, "embedded store maintained");
        Ok(())
    }
}
