//! The event log and its dedupe window: [`EventSink`] for [`EmbeddedStore`].
//!
//! Every append is one fjall write batch over `events`, committed under one mutex with the
//! configured durability, so positions are gap-free and the dedupe check sees every
//! earlier append: the ids of recent appends in memory (`recent_ids.rs`), older ones in
//! the `event_ids` keyspace (by their hash), to which a background hand-over moves them.
//! A failed commit advances nothing and stops the fjall database, which refuses writes
//! until the store reopens it (see `reopen.rs`); if the failed batch did reach the journal, reopening
//! removes it again, so a client retrying it gets its events accepted, once. (A process
//! restarted instead recovers the batch and replays it, and the retry gets `duplicate`.)

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use fjall::compaction::filter::{
    CompactionFilter, CompactionFilterResult, Context, Factory, ItemAccessor, Verdict,
};
use fjall::{Keyspace, OwnedWriteBatch, PersistMode};
use parking_lot::Mutex;
use reflex_core::types::{IdHashState, TimestampMs, now_ms};
use reflex_core::{Appended, EventId, EventSink, LogRecord, Result, Seq, SinkHealth};
use tracing::{debug, error, warn};

use super::recent_ids::{self, HandOver, IdHasher, IdKey, RecentIds};
use super::{
    DEDUPE_SEQ_KEY, EVENT_IDS_KEYSPACE, EmbeddedStore, Handles, ID_HASHER_KEY,
    LEGACY_DEDUPE_KEYSPACE, Shared, StoreError, append_encoded, be_u64, corrupt, decode, fault,
    run_blocking,
};

/// The append side's state.
pub(super) struct LogState {
    /// The one serialisation point of appends.
    pub(super) writer: Mutex<Writer>,
    /// The log position up to which the ids of appended events are in the `event_ids`
    /// keyspace (the rest are in [`Writer::recent`]).
    dedupe_seq: AtomicU64,
    /// Ids held in memory at which they are handed over to the keyspace.
    hand_over_at: usize,
    /// Set by an append that leaves at least `hand_over_at` ids in memory.
    hand_over_due: AtomicBool,
    /// A background hand-over is under way.
    hand_over_running: AtomicBool,
    /// Position of the last committed record, readable without the writer lock.
    last_seq: AtomicU64,
    /// Position up to which the log is known to be on disk as the durability setting
    /// asks (fsynced, or handed to the OS with `buffered`). Appends commit under the
    /// writer lock without waiting for the disk, then wait until this covers the log's
    /// end as they left it: one fsync serves every append committed before it (group
    /// commit), and no append, not even one answered `Duplicate`, returns before the
    /// records it relies on are durable.
    durable_seq: AtomicU64,
    /// Makes one fsync of the journal at a time; appends that wait for it find their
    /// positions covered when it is theirs.
    sync: Mutex<()>,
    /// Appends waiting for the group on the blocking pool to finish; the next group
    /// takes them all (see [`drain_appends`]).
    queue: Mutex<AppendQueue>,
    /// Makes the next sync fail as a full disk would (tests of the reopen).
    #[cfg(test)]
    pub(super) fail_next_sync: AtomicBool,
    /// The log's end as seen at each trim (time, position), oldest first: tells which
    /// positions are older than the retention without reading the records. Empty after a
    /// restart, so nothing recorded before it is trimmed until the retention has passed
    /// again.
    marks: Mutex<VecDeque<(TimestampMs, Seq)>>,
}

/// What appends change under [`LogState::writer`].
pub(super) struct Writer {
    /// The position of the last committed record; advanced only after a commit succeeds.
    pub(super) seq: Seq,
    /// The ids of the events appended after [`LogState::dedupe_seq`].
    recent: RecentIds,
}

impl Writer {
    /// Event ids held in memory.
    #[cfg(test)]
    pub(super) fn recent_len(&self) -> usize {
        self.recent.len()
    }
}

impl LogState {
    /// The state of a log ending at `last_seq` whose ids up to `dedupe_seq` are in the
    /// keyspace; `recent` holds those after it, in tables sized for `budget` bytes
    /// (`memtable_bytes`).
    pub(super) fn new(last_seq: Seq, dedupe_seq: Seq, recent: RecentIds, budget: u64) -> Self {
        Self {
            writer: Mutex::new(Writer {
                seq: last_seq,
                recent,
            }),
            dedupe_seq: AtomicU64::new(dedupe_seq),
            hand_over_at: recent_ids::hand_over_at(budget),
            hand_over_due: AtomicBool::new(false),
            hand_over_running: AtomicBool::new(false),
            last_seq: AtomicU64::new(last_seq),
            durable_seq: AtomicU64::new(last_seq),
            sync: Mutex::new(()),
            queue: Mutex::new(AppendQueue::default()),
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
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

/// The ids of the events appended after the position `meta` says the `event_ids` keyspace
/// reaches, read back from the log (with that position). A data directory without the
/// position (written by a build that put every id in the keyspace at once) reaches the
/// log's end, `last_seq`, which is recorded. The ids' hash keys come from `meta` too,
/// drawn and recorded the first time.
pub(super) fn recent_ids_on_disk(
    h: &Handles,
    last_seq: Seq,
    budget: u64,
) -> Result<(Seq, RecentIds), StoreError> {
    let dedupe_seq = match h.meta.get(DEDUPE_SEQ_KEY)? {
        Some(value) => be_u64(&value, "dedupe position", DEDUPE_SEQ_KEY)?,
        None => {
            h.meta.insert(DEDUPE_SEQ_KEY, last_seq.to_be_bytes())?;
            h.db.persist(PersistMode::SyncAll)?;
            last_seq
        }
    };
    let hasher = match h.meta.get(ID_HASHER_KEY)? {
        Some(value) => IdHasher::from_bytes(&value).ok_or_else(|| {
            corrupt(
                "event id hash keys",
                ID_HASHER_KEY,
                format!("{} bytes, expected 16", value.len()),
            )
        })?,
        None => {
            let hasher = IdHasher::random();
            h.meta.insert(ID_HASHER_KEY, hasher.to_bytes())?;
            h.db.persist(PersistMode::SyncAll)?;
            hasher
        }
    };
    let mut recent = RecentIds::new(dedupe_seq, budget, hasher);
    for guard in h.events.range((dedupe_seq + 1).to_be_bytes()..) {
        let (key, value) = guard.into_inner()?;
        if let LogRecord::Event {
            event, ingested_ms, ..
        } = decode(&value, "log record", &key)?
        {
            let key = recent.key(event.event_id.as_str());
            recent.insert(key, ingested_ms);
        }
    }
    Ok((dedupe_seq, recent))
}

impl Shared {
    /// Appends a group of calls' records in order, each as [`Shared::append_committed`]
    /// does, then waits for one fsync that covers them all. A failed fsync fails every
    /// append of the group that had committed.
    fn append_group(
        &self,
        h: &Handles,
        group: Vec<EncodedRecords>,
    ) -> Vec<Result<Vec<Appended>, StoreError>> {
        let mut results: Vec<_> = group
            .into_iter()
            .map(|records| self.append_committed(h, records))
            .collect();
        // The log's end as the group left it: what its records, duplicates included,
        // rely on.
        let through = self.log.last_seq.load(Ordering::Acquire);
        if let Err(err) = self.make_durable(h, through) {
            let mut err = Some(err);
            for result in results.iter_mut().filter(|r| r.is_ok()) {
                *result = Err(err
                    .take()
                    .unwrap_or(StoreError::Fjall(fjall::Error::Poisoned)));
            }
        }
        results
    }

    /// Checks one call's ids and commits its new records under the writer lock, without
    /// waiting for the disk (see [`Shared::make_durable`]).
    fn append_committed(
        &self,
        h: &Handles,
        records: EncodedRecords,
    ) -> Result<Vec<Appended>, StoreError> {
        let EncodedRecords { bytes, ends, ids } = &records;
        let now = now_ms();
        self.disk.admit(now)?;
        let mut outcomes = Vec::with_capacity(ends.len());
        let mut in_call: HashSet<&str, IdHashState> =
            HashSet::with_capacity_and_hasher(ends.len(), IdHashState::default());
        let mut writer = self.log.writer.lock();
        // Not persisted here: see `make_durable`, after the lock.
        let mut batch = OwnedWriteBatch::with_capacity(h.db.clone(), ends.len()).durability(None);
        let mut fresh = Vec::with_capacity(ends.len());
        let mut seq = writer.seq;
        let mut start = 0;
        for (id, &end) in ids.iter().zip(ends) {
            let bytes = &bytes[start..end];
            start = end;
            if let Some(id) = id {
                let id = id.as_str();
                let key = writer.recent.key(id);
                if !in_call.insert(id)
                    || self.recorded_within_window(h, &writer.recent, id, &key, now)?
                {
                    outcomes.push(Appended::Duplicate);
                    continue;
                }
                fresh.push(key);
            }
            seq += 1;
            batch.insert(&h.events, &seq.to_be_bytes()[..], bytes);
            outcomes.push(Appended::At(seq));
        }
        if seq != writer.seq {
            self.commit(batch)?;
            writer.seq = seq;
            for key in fresh {
                writer.recent.insert(key, now);
            }
            self.log.hand_over_due.store(
                writer.recent.active_len() >= self.log.hand_over_at,
                Ordering::Release,
            );
            self.log.last_seq.store(seq, Ordering::Release);
        }
        Ok(outcomes)
    }

    /// Returns once the log is durable through `through`: at once if an fsync since
    /// covered it, otherwise after one of its own, which covers every record committed
    /// so far (the journal is one file, written in commit order). A failed fsync stops
    /// the database like a failed commit; the appends it leaves undurable are answered
    /// with the error and removed again when the store reopens
    /// ([`Shared::drop_unacked`]).
    fn make_durable(&self, h: &Handles, through: Seq) -> Result<(), StoreError> {
        if self.log.durable_seq.load(Ordering::Acquire) >= through {
            return Ok(());
        }
        let _sync = self.log.sync.lock();
        if self.log.durable_seq.load(Ordering::Acquire) >= through {
            return Ok(());
        }
        // Every record up to here is in the journal before the fsync starts.
        let target = self.log.last_seq.load(Ordering::Acquire);
        #[cfg(test)]
        if self.log.fail_next_sync.swap(false, Ordering::AcqRel) {
            self.disk.note_failed_commit();
            return Err(StoreError::Fjall(fjall::Error::Poisoned));
        }
        h.db.persist(self.persist)
            .inspect_err(|_| self.disk.note_failed_commit())?;
        self.log.durable_seq.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// Whether `id` (whose key is `key`) was recorded no longer than the dedupe window
    /// before `now`. An id held in memory is newer than any copy in the keyspaces.
    fn recorded_within_window(
        &self,
        h: &Handles,
        recent: &RecentIds,
        id: &str,
        key: &IdKey,
        now: TimestampMs,
    ) -> Result<bool, StoreError> {
        let at = match recent.recorded_at(key) {
            Some(at) => at,
            None => {
                let key = key.to_bytes();
                if let Some(value) = h.event_ids.get(key)? {
                    be_u64(&value, "dedupe entry", &key)? as TimestampMs
                } else if let Some(legacy) = &h.legacy_dedupe
                    && let Some(value) = legacy.get(id)?
                {
                    be_u64(&value, "dedupe entry", id.as_bytes())? as TimestampMs
                } else {
                    return Ok(false);
                }
            }
        };
        Ok(now.saturating_sub(at) <= self.dedupe_window_ms)
    }

    /// Hands the ids held in memory over to the `event_ids` keyspace once there are at
    /// least [`LogState::hand_over_at`] of them (any number with `force`); returns how many
    /// it wrote, in one sorted write of their hashes that bypasses the memtable (fjall's
    /// ingestion). Appends go on meanwhile, finding the handed-over ids in memory until
    /// the keyspace holds them. Then `meta` records, durably, the log position they reach.
    pub(super) fn hand_over_ids(&self, h: &Handles, force: bool) -> Result<u64, StoreError> {
        let hand_over = {
            let mut writer = self.log.writer.lock();
            if !force && writer.recent.active_len() < self.log.hand_over_at {
                return Ok(0);
            }
            let last = writer.seq;
            match writer.recent.seal(last) {
                Some(hand_over) => hand_over,
                None => return Ok(0),
            }
        };
        let written = self.write_ids(h, &hand_over);
        let mut writer = self.log.writer.lock();
        match written {
            Ok(written) => {
                writer.recent.handed_over();
                self.log
                    .dedupe_seq
                    .store(hand_over.through, Ordering::Release);
                debug!(
                    written,
                    through = hand_over.through,
                    "event ids handed over to the event_ids keyspace"
                );
                Ok(written)
            }
            Err(err) => {
                writer.recent.hand_over_failed(hand_over);
                Err(err)
            }
        }
    }

    /// Writes the ids `hand_over` sealed with their ingest times, in one sorted
    /// ingestion, skipping those already out of the window; then records the position in
    /// `meta`.
    fn write_ids(&self, h: &Handles, hand_over: &HandOver) -> Result<u64, StoreError> {
        let cutoff = now_ms().saturating_sub(self.dedupe_window_ms);
        let ids = hand_over.entries(cutoff);
        if !ids.is_empty() {
            let mut ingestion = h.event_ids.start_ingestion()?;
            for (key, at) in &ids {
                ingestion.write(&key[..], at.to_be_bytes())?;
            }
            ingestion.finish()?;
        }
        h.meta
            .insert(DEDUPE_SEQ_KEY, hand_over.through.to_be_bytes())?;
        h.db.persist(PersistMode::SyncAll)?;
        Ok(ids.len() as u64)
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
        // Records whose ids are only in memory stay: start-up reads the ids back from them.
        let through = through
            .min(expired)
            .min(last.saturating_sub(1))
            .min(self.log.dedupe_seq.load(Ordering::Acquire));
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

    /// Makes a reopened log end where the last durable append left it, as a restart
    /// would find it: removes the records after that position, which only appends
    /// answered with an error can have left (a commit that failed, or records committed
    /// whose fsync failed), with their ids in the id keyspaces, in one fsynced batch;
    /// then reads the ids held in memory back from the disk, and numbers the next
    /// records after that position. Returns how many records it removed. Their clients
    /// were answered `UNAVAILABLE` and nothing applied them, so a retry must find them
    /// absent.
    pub(super) fn drop_unacked(&self, h: &Handles, writer: &mut Writer) -> Result<u64, StoreError> {
        let acked = self.log.durable_seq.load(Ordering::Acquire);
        let on_disk = last_seq_on_disk(&h.events)?;
        if on_disk < acked {
            // Every acked append was durable before its ack, so this is a disk that lost
            // data; positions go on after `acked` regardless, so none is given out twice.
            error!(
                acked,
                on_disk, "the reopened event log ends before the last acked record"
            );
        }
        let mut batch = h.db.batch().durability(Some(PersistMode::SyncAll));
        let mut dropped = 0u64;
        for guard in h.events.range((acked + 1).to_be_bytes()..) {
            let (key, value) = guard.into_inner()?;
            if let LogRecord::Event { event, .. } = decode(&value, "log record", &key)? {
                let id = event.event_id.as_str();
                // A hand-over may have written the id before the fsync failed.
                batch.remove(&h.event_ids, writer.recent.key(id).to_bytes());
                if let Some(legacy) = &h.legacy_dedupe {
                    batch.remove(legacy, id.as_bytes());
                }
            }
            batch.remove(&h.events, key);
            dropped += 1;
        }
        // Ids of the removed positions are read back from the log below, not taken as
        // handed over.
        let dedupe_seq = self.log.dedupe_seq.load(Ordering::Acquire);
        if dedupe_seq > acked {
            batch.insert(&h.meta, DEDUPE_SEQ_KEY, acked.to_be_bytes());
        }
        if !batch.is_empty() {
            self.commit(batch)?;
        }
        let (dedupe_seq, recent) = recent_ids_on_disk(h, acked, self.tuning.memtable_bytes)?;
        writer.recent = recent;
        writer.seq = acked;
        self.log.dedupe_seq.store(dedupe_seq, Ordering::Release);
        self.log.last_seq.store(acked, Ordering::Release);
        self.log.hand_over_due.store(
            writer.recent.active_len() >= self.log.hand_over_at,
            Ordering::Release,
        );
        if dropped > 0 {
            warn!(
                acked,
                dropped, "removed the records of appends that failed but reached the journal"
            );
        }
        Ok(dropped)
    }
}

impl EmbeddedStore {
    /// Starts a hand-over of the event ids held in memory in the background once enough
    /// have gathered (one at a time), so the table that holds them stays at its size
    /// between maintenance ticks however fast events come.
    fn hand_over_ids_when_due(&self) {
        let log = &self.shared.log;
        if !log.hand_over_due.load(Ordering::Acquire)
            || log.hand_over_running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let result = run_blocking(
                Arc::clone(&shared),
                "handing event ids over to the event_ids keyspace",
                |s, h| s.hand_over_ids(h, false),
            )
            .await;
            shared.log.hand_over_running.store(false, Ordering::Release);
            if let Err(err) = result {
                warn!(error = %err, "event ids stay in memory until the next hand-over");
            }
        });
    }
}

/// Most log records one trim drops, so one maintenance tick stays short however far
/// behind retention is (the next tick continues).
const TRIM_BATCH: usize = 100_000;

/// Appends waiting for their turn on the blocking pool.
#[derive(Default)]
pub(super) struct AppendQueue {
    waiting: Vec<Queued>,
    /// A task is draining the queue ([`drain_appends`]).
    draining: bool,
}

/// One append in the queue, and where its answer goes.
struct Queued {
    records: EncodedRecords,
    answer: tokio::sync::oneshot::Sender<Result<Vec<Appended>>>,
}

const APPEND_CONTEXT: &str = "appending to the event log";

/// Takes the queued appends as one group to the blocking pool, again and again until the
/// queue is empty: one hop to a pool thread, one fsync and one wake-up per group rather
/// than a thread, a lock wait and an fsync per append, however many streams send small
/// batches at once. Each append of a group keeps its own answer. Holds the store only
/// weakly between groups, so a store dropped after its last answer closes at once.
async fn drain_appends(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let group = {
            let mut queue = strong.log.queue.lock();
            if queue.waiting.is_empty() {
                queue.draining = false;
                return;
            }
            std::mem::take(&mut queue.waiting)
        };
        let (records, answers): (Vec<_>, Vec<_>) = group
            .into_iter()
            .map(|queued| (queued.records, queued.answer))
            .unzip();
        let results = run_blocking(strong, APPEND_CONTEXT, move |s, h| {
            Ok(s.append_group(h, records))
        })
        .await;
        match results {
            Ok(results) => {
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(result.map_err(fault(APPEND_CONTEXT)));
                }
            }
            Err(err) => {
                let reason = err.to_string();
                for answer in answers {
                    let _ = answer.send(Err(reflex_core::Error::unavailable(
                        APPEND_CONTEXT,
                        reason.clone(),
                    )));
                }
            }
        }
    }
}

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

/// Expires dedupe keys: a compaction filter on the `event_ids` keyspace (and the legacy
/// `dedupe`) that drops every key recorded longer than the window before the compaction
/// began.
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
    /// The database's filter assigner: this filter for the id keyspaces, none for the
    /// rest.
    pub(super) fn assigner(window_ms: i64) -> FilterAssigner {
        let factory: Arc<dyn Factory> = Arc::new(Self { window_ms });
        Arc::new(move |keyspace: &str| {
            (keyspace == EVENT_IDS_KEYSPACE || keyspace == LEGACY_DEDUPE_KEYSPACE)
                .then(|| factory.clone())
        })
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
    /// Queues the records for the next group of appends ([`drain_appends`]) and waits
    /// for their answer.
    async fn append(&self, records: &[LogRecord]) -> Result<Vec<Appended>> {
        const CONTEXT: &str = APPEND_CONTEXT;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let encoded = EncodedRecords::new(records).map_err(fault(CONTEXT))?;
        let (answer, answered) = tokio::sync::oneshot::channel();
        let lead = {
            let mut queue = self.shared.log.queue.lock();
            queue.waiting.push(Queued {
                records: encoded,
                answer,
            });
            !std::mem::replace(&mut queue.draining, true)
        };
        if lead {
            // A task of its own: a caller that goes away never strands those queued after.
            tokio::spawn(drain_appends(Arc::downgrade(&self.shared)));
        }
        let appended = answered.await.map_err(|_| {
            reflex_core::Error::Internal(format!("{CONTEXT}: the append was dropped unanswered"))
        })??;
        self.hand_over_ids_when_due();
        Ok(appended)
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

    /// The last durable position: a checkpoint noted at it never covers a record that a
    /// reopen may still remove.
    async fn last_seq(&self) -> Result<Seq> {
        Ok(self.shared.log.durable_seq.load(Ordering::Acquire))
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
    /// pool, after handing the event ids held in memory over to the `event_ids` keyspace
    /// once there are enough of them. Dedupe keys need no expiry pass: compaction expires
    /// them ([`DedupeExpiry`]).
    async fn maintain(&self) -> Result<()> {
        let evicted = self
            .blocking("maintaining the embedded store", |s, h| {
                s.hand_over_ids(h, false)?;
                Ok(s.profile_state.evict_expired(now_ms()))
            })
            .await?;
        debug!(evicted, "embedded store maintained");
        Ok(())
    }
}
