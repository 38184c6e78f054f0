//! The event ids of recent appends, held in memory instead of fjall's memtable.
//!
//! Every append looks each new event id up in the dedupe window. In fjall's memtable (a
//! skiplist) a lookup and an insert each walk the list's levels through cold memory, for
//! every new id: with random ids (UUIDs) that was 39% of the server's CPU under ingest
//! and 30% less ingest than with ids that sort in the order they are sent (BENCHMARKS.md,
//! session 27). Here recent ids live in a hash table of 128-bit hashes (24 bytes an entry,
//! one probe a lookup) until maintenance hands them over to the `dedupe` keyspace in one
//! sorted write that bypasses the memtable (fjall's ingestion).
//!
//! Nothing here needs to be durable: the event log holds every appended id with its
//! ingest time, and `meta` records the log position up to which the ids are in the
//! keyspace (`dedupe_seq`); start-up puts the ids after it back in memory, and log
//! retention never trims past it.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use reflex_core::Seq;
use reflex_core::types::TimestampMs;

/// An event id's 128-bit hash: two independent SipHash-1-3 hashes with keys drawn at
/// start-up. Two ids collide with probability 2⁻¹²⁸ per pair, and a client cannot aim at
/// a collision without the keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IdKey(u64, u64);

impl Hash for IdKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a uniform hash: the table's own hasher passes it through.
        state.write_u64(self.0);
    }
}

/// The table's hasher: passes an [`IdKey`]'s first half through.
#[derive(Default)]
pub(super) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Table = HashMap<IdKey, TimestampMs, BuildHasherDefault<PassThrough>>;

/// Bytes a slot of the table takes: the key, the time, and its control byte.
const SLOT_BYTES: u64 = 25;

/// The table's slots for a budget of `budget` bytes: the largest power of two (the table
/// grows by doubling) whose slots take at most half the budget, since a hand-over keeps
/// the sealed table and a new one side by side. Ids hash uniformly, so every page of a
/// table is touched long before it is full: a table costs its whole size, and sizing it
/// up front avoids rehashing a large table under the writer lock.
fn slots(budget: u64) -> usize {
    let most = (budget / 2 / SLOT_BYTES).max(16);
    (1u64 << (63 - most.leading_zeros())) as usize
}

/// How many ids the table holds at most before it would grow (hashbrown keeps 7 in 8
/// slots usable).
fn capacity(budget: u64) -> usize {
    slots(budget) / 8 * 7
}

/// How many ids in memory start a hand-over: five in eight slots, leaving room for the
/// events that arrive while it starts.
pub(super) fn hand_over_at(budget: u64) -> usize {
    slots(budget) / 8 * 5
}

/// Ids appended since the last hand-over (`active`), and those of a hand-over under way
/// (`sealed`, until the keyspace holds them).
pub(super) struct RecentIds {
    hashers: (std::hash::RandomState, std::hash::RandomState),
    /// Ids a table is made for.
    capacity: usize,
    active: Table,
    /// The first log position whose id is in `active` (ids after the last hand-over).
    active_from: Seq,
    sealed: Option<Arc<Table>>,
}

/// What a hand-over writes: the ids of the log positions `from..=through`, with the
/// ingest times the sealed table holds for them.
pub(super) struct HandOver {
    pub(super) from: Seq,
    pub(super) through: Seq,
    sealed: Arc<Table>,
    hashers: (std::hash::RandomState, std::hash::RandomState),
}

impl HandOver {
    /// When `id` was appended, if it is among the sealed ids.
    pub(super) fn recorded_at(&self, id: &str) -> Option<TimestampMs> {
        let key = IdKey(self.hashers.0.hash_one(id), self.hashers.1.hash_one(id));
        self.sealed.get(&key).copied()
    }
}

impl RecentIds {
    /// Empty, holding the ids of the positions after `dedupe_seq` once they are noted, in
    /// tables sized for a budget of `budget` bytes (see [`hand_over_at`]).
    pub(super) fn new(dedupe_seq: Seq, budget: u64) -> Self {
        let capacity = capacity(budget);
        Self {
            hashers: (Default::default(), Default::default()),
            capacity,
            active: Table::with_capacity_and_hasher(capacity, Default::default()),
            active_from: dedupe_seq + 1,
            sealed: None,
        }
    }

    /// The key of `id`.
    pub(super) fn key(&self, id: &str) -> IdKey {
        IdKey(self.hashers.0.hash_one(id), self.hashers.1.hash_one(id))
    }

    /// When the id of `key` was appended, if it is held here.
    pub(super) fn recorded_at(&self, key: &IdKey) -> Option<TimestampMs> {
        self.active
            .get(key)
            .or_else(|| self.sealed.as_ref().and_then(|s| s.get(key)))
            .copied()
    }

    /// Notes an id appended at `at`.
    pub(super) fn insert(&mut self, key: IdKey, at: TimestampMs) {
        self.active.insert(key, at);
    }

    /// Ids held, sealed ones included.
    pub(super) fn len(&self) -> usize {
        self.active.len() + self.sealed.as_ref().map_or(0, |s| s.len())
    }

    /// Seals the ids appended up to `last` (the log's end) for a hand-over, unless one
    /// is under way or there is nothing to hand over.
    pub(super) fn seal(&mut self, last: Seq) -> Option<HandOver> {
        if self.sealed.is_some() || last < self.active_from {
            return None;
        }
        let from = self.active_from;
        let fresh = Table::with_capacity_and_hasher(self.capacity, Default::default());
        let sealed = Arc::new(std::mem::replace(&mut self.active, fresh));
        self.sealed = Some(Arc::clone(&sealed));
        self.active_from = last + 1;
        Some(HandOver {
            from,
            through: last,
            sealed,
            hashers: self.hashers.clone(),
        })
    }

    /// Ids appended since the last seal.
    pub(super) fn active_len(&self) -> usize {
        self.active.len()
    }

    /// The keyspace holds the sealed ids now: forget them.
    pub(super) fn handed_over(&mut self) {
        self.sealed = None;
    }

    /// The hand-over failed: its ids go back to the active table, to be handed over with
    /// the next (an id appended again since keeps its newer time).
    pub(super) fn hand_over_failed(&mut self, hand_over: HandOver) {
        self.sealed = None;
        let sealed = Arc::try_unwrap(hand_over.sealed).unwrap_or_else(|shared| (*shared).clone());
        for (key, at) in sealed {
            self.active.entry(key).or_insert(at);
        }
        self.active_from = hand_over.from;
    }
}

/// The event id of an encoded log record, read without decoding the rest: `None` for an
/// erasure. Relies on postcard's layout of [`LogRecord`](reflex_core::LogRecord): the
/// variant index (`Event` is 0) as a varint, then the event, whose first field is its id,
/// a string (a varint length and the bytes); a unit test holds it to the real encoding.
pub(super) fn event_id_of(record: &[u8]) -> Option<&str> {
    let (&variant, rest) = record.split_first()?;
    if variant != 0 {
        return None;
    }
    let mut len = 0usize;
    let mut shift = 0;
    let mut at = 0;
    loop {
        let byte = *rest.get(at)?;
        at += 1;
        len |= usize::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    std::str::from_utf8(rest.get(at..at.checked_add(len)?)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_found_while_active_and_sealed_and_forgotten_once_handed_over() {
        let mut ids = RecentIds::new(10, 1 << 20);
        let a = ids.key("a");
        assert_ne!(a, ids.key("b"));
        assert_eq!(ids.recorded_at(&a), None);
        ids.insert(a, 5);
        assert_eq!(ids.recorded_at(&a), Some(5));
        let hand_over = ids.seal(12).expect("ids 11 and 12 to hand over");
        assert_eq!((hand_over.from, hand_over.through), (11, 12));
        assert!(ids.seal(13).is_none(), "one hand-over at a time");
        assert_eq!(ids.recorded_at(&a), Some(5), "sealed ids are still found");
        ids.insert(ids.key("c"), 6);
        ids.handed_over();
        assert_eq!(ids.recorded_at(&a), None);
        assert_eq!(ids.len(), 1);
        let next = ids.seal(14).expect("id 13 and 14 to hand over");
        assert_eq!((next.from, next.through), (13, 14));
    }

    #[test]
    fn a_failed_hand_over_keeps_its_ids_for_the_next() {
        let mut ids = RecentIds::new(0, 1 << 20);
        let a = ids.key("a");
        ids.insert(a, 1);
        let first = ids.seal(1).expect("id 1 to hand over");
        let b = ids.key("b");
        ids.insert(b, 2);
        assert_eq!(first.recorded_at("a"), Some(1));
        assert_eq!(first.recorded_at("b"), None);
        ids.hand_over_failed(first);
        assert_eq!(ids.recorded_at(&a), Some(1));
        let again = ids.seal(2).expect("ids 1 and 2 to hand over");
        assert_eq!((again.from, again.through), (1, 2));
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn the_event_id_is_read_from_an_encoded_record() {
        use reflex_core::{Event, EventKind, ItemId, LogRecord, UserId};
        for id in ["e1", &"x".repeat(128)] {
            let record = LogRecord::Event {
                event: Event {
                    event_id: reflex_core::EventId::parse(id, "event_id").unwrap(),
                    user_id: UserId::parse("u", "user_id").unwrap(),
                    item_id: ItemId::parse("i", "item_id").unwrap(),
                    kind: EventKind::Purchase,
                    weight: None,
                    timestamp_ms: 5,
                    session_id: None,
                    value: None,
                    context: Default::default(),
                },
                filtered: false,
                ingested_ms: 6,
            };
            let bytes = postcard::to_allocvec(&record).unwrap();
            assert_eq!(event_id_of(&bytes), Some(id));
            assert_eq!(event_id_of(&bytes[..3]), None, "a cut record has no id");
        }
        let erase = LogRecord::Erase {
            user_id: UserId::parse("u", "user_id").unwrap(),
            erased_ms: 1,
        };
        assert_eq!(event_id_of(&postcard::to_allocvec(&erase).unwrap()), None);
    }

    #[test]
    fn tables_fill_at_most_half_the_budget_and_hand_over_before_they_would_grow() {
        // The default 64 MiB: 2^20 slots of 25 bytes.
        assert_eq!(slots(64 << 20), 1 << 20);
        assert_eq!(capacity(64 << 20), 917_504);
        assert_eq!(hand_over_at(64 << 20), 655_360);
        assert_eq!(slots(1 << 20), 16_384);
        let ids = RecentIds::new(0, 64 << 20);
        let made = ids.active.capacity();
        assert!(made >= capacity(64 << 20) && made < 2 * capacity(64 << 20));
    }

    #[test]
    fn nothing_to_hand_over_before_an_append() {
        let mut ids = RecentIds::new(7, 1 << 20);
        assert!(ids.seal(7).is_none());
    }
}
