//! The event ids of recent appends, held in memory instead of fjall's memtable.
//!
//! Every append looks each new event id up in the dedupe window. In fjall's memtable (a
//! skiplist) a lookup and an insert each walk the list's levels through cold memory, for
//! every new id: with random ids (UUIDs) that was 39% of the server's CPU under ingest
//! and 30% less ingest than with ids that sort in the order they are sent (BENCHMARKS.md,
//! session 27). Here recent ids live in a hash table of 128-bit hashes (24 bytes an entry,
//! one probe a lookup) until maintenance hands them over to the `event_ids` keyspace in
//! one sorted write that bypasses the memtable (fjall's ingestion).
//!
//! The keyspace is keyed by the same 128-bit hashes, so a hand-over writes the sealed
//! table as it is (nothing is read back from the log) and its tables hold 16 bytes a key
//! whatever the ids' length: a UUID's string key was 36. The hash's keys are drawn once per
//! data directory and kept in `meta` ([`IdHasher`]).
//!
//! Nothing here needs to be durable: the event log holds every appended id with its
//! ingest time, and `meta` records the log position up to which the ids are in the
//! keyspace (`dedupe_seq`); start-up puts the ids after it back in memory, and log
//! retention never trims past it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use reflex_core::Seq;
use reflex_core::types::TimestampMs;
use siphasher::sip128::SipHasher13;

/// An event id's 128-bit hash (SipHash-1-3 with [`IdHasher`]'s keys). Two ids collide with
/// probability 2⁻¹²⁸ per pair, and a client cannot aim at a collision without the keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IdKey(u64, u64);

impl IdKey {
    /// The key in the `event_ids` keyspace: big-endian, so keys sort as the pairs do.
    pub(super) fn to_bytes(self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.0.to_be_bytes());
        bytes[8..].copy_from_slice(&self.1.to_be_bytes());
        bytes
    }
}

impl Hash for IdKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a uniform hash: the table's own hasher passes it through.
        state.write_u64(self.0);
    }
}

/// How event ids become [`IdKey`]s: SipHash-1-3 with two secret 64-bit keys, drawn at
/// random when a data directory is created and kept in its `meta` keyspace, since the
/// ids on disk must hash alike after a restart.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct IdHasher {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for IdHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys are a secret.
        f.write_str("IdHasher")
    }
}

impl IdHasher {
    /// New random keys, for a new data directory.
    pub(super) fn random() -> Self {
        Self {
            k0: rand::random(),
            k1: rand::random(),
        }
    }

    /// The keys as `meta` keeps them.
    pub(super) fn to_bytes(self) -> [u8; 16] {
        IdKey(self.k0, self.k1).to_bytes()
    }

    /// Keys read back from `meta`; `None` unless 16 bytes.
    pub(super) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: [u8; 16] = bytes.try_into().ok()?;
        let (k0, k1) = bytes.split_at(8);
        Some(Self {
            k0: u64::from_be_bytes(k0.try_into().ok()?),
            k1: u64::from_be_bytes(k1.try_into().ok()?),
        })
    }

    /// The key of `id`.
    pub(super) fn key(&self, id: &str) -> IdKey {
        let hash = SipHasher13::new_with_keys(self.k0, self.k1).hash(id.as_bytes());
        IdKey(hash.h1, hash.h2)
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
    hasher: IdHasher,
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
}

impl HandOver {
    /// The sealed ids recorded at `cutoff` or later, as keyspace keys with their times,
    /// in key order (what an ingestion takes).
    pub(super) fn entries(&self, cutoff: TimestampMs) -> Vec<([u8; 16], TimestampMs)> {
        let mut entries: Vec<(IdKey, TimestampMs)> = self
            .sealed
            .iter()
            .filter(|&(_, &at)| at >= cutoff)
            .map(|(&key, &at)| (key, at))
            .collect();
        entries.sort_unstable_by_key(|&(key, _)| (key.0, key.1));
        entries
            .into_iter()
            .map(|(key, at)| (key.to_bytes(), at))
            .collect()
    }
}

impl RecentIds {
    /// Empty, holding the ids of the positions after `dedupe_seq` once they are noted, in
    /// tables sized for a budget of `budget` bytes (see [`hand_over_at`]).
    pub(super) fn new(dedupe_seq: Seq, budget: u64, hasher: IdHasher) -> Self {
        let capacity = capacity(budget);
        Self {
            hasher,
            capacity,
            active: Table::with_capacity_and_hasher(capacity, Default::default()),
            active_from: dedupe_seq + 1,
            sealed: None,
        }
    }

    /// The key of `id`.
    pub(super) fn key(&self, id: &str) -> IdKey {
        self.hasher.key(id)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_found_while_active_and_sealed_and_forgotten_once_handed_over() {
        let mut ids = RecentIds::new(10, 1 << 20, IdHasher::random());
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
        let mut ids = RecentIds::new(0, 1 << 20, IdHasher::random());
        let a = ids.key("a");
        ids.insert(a, 1);
        let first = ids.seal(1).expect("id 1 to hand over");
        let b = ids.key("b");
        ids.insert(b, 2);
        assert_eq!(
            first.entries(0),
            [(a.to_bytes(), 1)],
            "b came after the seal"
        );
        ids.hand_over_failed(first);
        assert_eq!(ids.recorded_at(&a), Some(1));
        let again = ids.seal(2).expect("ids 1 and 2 to hand over");
        assert_eq!((again.from, again.through), (1, 2));
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn tables_fill_at_most_half_the_budget_and_hand_over_before_they_would_grow() {
        // The default 64 MiB: 2^20 slots of 25 bytes.
        assert_eq!(slots(64 << 20), 1 << 20);
        assert_eq!(capacity(64 << 20), 917_504);
        assert_eq!(hand_over_at(64 << 20), 655_360);
        assert_eq!(slots(1 << 20), 16_384);
        let ids = RecentIds::new(0, 64 << 20, IdHasher::random());
        let made = ids.active.capacity();
        assert!(made >= capacity(64 << 20) && made < 2 * capacity(64 << 20));
    }

    #[test]
    fn keys_read_back_from_meta_hash_ids_alike_and_other_keys_do_not() {
        let hasher = IdHasher::random();
        let again = IdHasher::from_bytes(&hasher.to_bytes()).unwrap();
        assert_eq!(again.key("event-1"), hasher.key("event-1"));
        assert_ne!(IdHasher::random().key("event-1"), hasher.key("event-1"));
        assert_eq!(IdHasher::from_bytes(&[0; 15]), None);
    }

    #[test]
    fn a_hand_over_writes_its_ids_in_key_order_without_the_expired() {
        let mut ids = RecentIds::new(0, 1 << 20, IdHasher::random());
        for n in 0..100 {
            ids.insert(ids.key(&format!("e{n}")), n);
        }
        let hand_over = ids.seal(100).unwrap();
        let entries = hand_over.entries(40);
        assert_eq!(entries.len(), 60);
        assert!(
            entries.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, no repeats"
        );
        assert!(entries.iter().all(|&(_, at)| at >= 40));
        assert!(entries.contains(&(ids.key("e77").to_bytes(), 77)));
    }

    #[test]
    fn nothing_to_hand_over_before_an_append() {
        let mut ids = RecentIds::new(7, 1 << 20, IdHasher::random());
        assert!(ids.seal(7).is_none());
    }
}
