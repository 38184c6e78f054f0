//! User profiles and the one function that applies an event to them.
//!
//! Every backend stores [`Profile`] and calls [`Profile::apply`], so profiles evolve the
//! same way whatever holds them.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::types::{Event, EventKind, ItemId, TimestampMs, UserId, growth};

/// How profiles grow and age.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProfilePolicy {
    /// Most recent interactions kept.
    pub max_recent: usize,
    /// Most purchased items kept (oldest dropped first).
    pub max_purchased: usize,
    /// Inactivity that starts a new session for events without a session id, in ms.
    pub session_gap_ms: i64,
    /// A profile untouched this long (wall clock, ms) is gone.
    pub ttl_ms: i64,
}

impl Default for ProfilePolicy {
    fn default() -> Self {
        Self {
            max_recent: 50,
            max_purchased: 200,
            session_gap_ms: 30 * 60 * 1000,
            ttl_ms: 30 * 24 * 3600 * 1000,
        }
    }
}

/// One entry of the recent history: 32 bytes, since an active user holds up to
/// [`ProfilePolicy::max_recent`] of them (at 56 bytes with the kind inline, the recent
/// lists were most of a full profile's memory).
#[derive(Clone, Debug, PartialEq)]
pub struct Interaction {
    /// The item.
    pub item_id: ItemId,
    /// When (event time).
    pub timestamp_ms: TimestampMs,
    /// The learning weight the event had, kept so fold-in needs no configuration lookup.
    pub weight: f32,
    /// What the user did; [`Profile::kind_of`] names it.
    pub kind: KindCode,
}

/// What an [`Interaction`] was, in four bytes: a built-in kind by its
/// [`EventKind::builtin_index`], or a custom kind by the position of its name in the
/// profile's [`Profile::custom_counts`] (a profile holds each custom name once, however
/// many of its interactions have that kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindCode(u32);

impl KindCode {
    const FIRST_CUSTOM: u32 = EventKind::BUILTIN as u32;

    /// Where a custom kind's name is in [`Profile::custom_counts`]; `None` for a
    /// built-in kind.
    fn custom_position(self) -> Option<usize> {
        self.0
            .checked_sub(Self::FIRST_CUSTOM)
            .map(|pos| pos as usize)
    }
}

/// The user's current session.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Client-given or derived (`auto-<start ms>`).
    pub session_id: Arc<str>,
    /// Event time of the session's first event.
    pub started_ms: TimestampMs,
    /// Event time of its latest event.
    pub last_event_ms: TimestampMs,
    /// Events in the session.
    pub events: u32,
}

/// Everything Reflex keeps about one user.
///
/// Serialized as it always was, each recent entry with its kind in full, so checkpoints
/// written before [`KindCode`] still load.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "wire::ProfileIn")]
pub struct Profile {
    /// Whose profile.
    pub user_id: UserId,
    /// Applied events per built-in kind, in [`EventKind::builtin_index`] order.
    pub counts: [u64; EventKind::BUILTIN],
    /// Applied events per custom kind name; [`KindCode`]s of the recent entries point
    /// into it, so entries are only ever appended.
    pub custom_counts: Vec<(Arc<str>, u64)>,
    /// Most recent first, at most [`ProfilePolicy::max_recent`].
    pub recent: VecDeque<Interaction>,
    /// Current session, if any event was applied.
    pub session: Option<Session>,
    /// Purchased items, oldest first, at most [`ProfilePolicy::max_purchased`].
    pub purchased: VecDeque<ItemId>,
    /// Latest event time seen.
    pub last_seen_ms: TimestampMs,
    /// Wall-clock time of the last change, which the TTL counts from.
    pub touched_ms: TimestampMs,
    /// Grows by one on every applied event.
    pub version: u64,
}

impl Profile {
    /// An empty profile for `user_id`.
    pub fn new(user_id: UserId) -> Self {
        Self {
            user_id,
            counts: [0; EventKind::BUILTIN],
            custom_counts: Vec::new(),
            recent: VecDeque::new(),
            session: None,
            purchased: VecDeque::new(),
            last_seen_ms: 0,
            touched_ms: 0,
            version: 0,
        }
    }

    /// Whether the profile has outlived its TTL at wall-clock time `now_ms`.
    pub fn is_expired(&self, policy: &ProfilePolicy, now_ms: TimestampMs) -> bool {
        now_ms.saturating_sub(self.touched_ms) > policy.ttl_ms
    }

    /// Applies one accepted event with learning weight `weight`, ingested at wall-clock
    /// `now_ms`: counters, recent list, session, purchases, times and version.
    pub fn apply(
        &mut self,
        event: &Event,
        weight: f32,
        policy: &ProfilePolicy,
        now_ms: TimestampMs,
    ) {
        let kind = self.kind_code(&event.kind);
        let count = match kind.custom_position() {
            None => self.counts.get_mut(kind.0 as usize),
            Some(pos) => self.custom_counts.get_mut(pos).map(|(_, c)| c),
        };
        if let Some(c) = count {
            *c += 1;
        }

        // Keep the recent list ordered by event time, newest first, so late events land
        // where they belong instead of masquerading as the latest interest.
        let pos = self
            .recent
            .iter()
            .position(|i| i.timestamp_ms <= event.timestamp_ms)
            .unwrap_or(self.recent.len());
        if pos < policy.max_recent {
            // The default growth starts at four entries and doubles to 64 for a bound of
            // 50, 0.2–0.8 KiB per profile held for nothing.
            if self.recent.len() == self.recent.capacity() {
                self.recent
                    .reserve_exact(growth(self.recent.len(), policy.max_recent));
            }
            self.recent.insert(
                pos,
                Interaction {
                    item_id: event.item_id.clone(),
                    timestamp_ms: event.timestamp_ms,
                    weight,
                    kind,
                },
            );
            self.recent.truncate(policy.max_recent);
        }

        self.sessionise(event, policy);

        if event.kind == EventKind::Purchase && !self.purchased.contains(&event.item_id) {
            if self.purchased.len() == self.purchased.capacity() {
                self.purchased
                    .reserve_exact(growth(self.purchased.len(), policy.max_purchased));
            }
            self.purchased.push_back(event.item_id.clone());
            while self.purchased.len() > policy.max_purchased {
                self.purchased.pop_front();
            }
        }
        self.last_seen_ms = self.last_seen_ms.max(event.timestamp_ms);
        self.touched_ms = self.touched_ms.max(now_ms);
        self.version += 1;
    }

    fn sessionise(&mut self, event: &Event, policy: &ProfilePolicy) {
        let ts = event.timestamp_ms;
        match (&mut self.session, &event.session_id) {
            (Some(s), Some(id)) if *s.session_id == **id => s.extend(ts),
            (_, Some(id)) => self.session = Some(Session::start(id.clone(), ts)),
            (Some(s), None) if ts - s.last_event_ms <= policy.session_gap_ms => s.extend(ts),
            (_, None) => {
                self.session = Some(Session::start(Arc::from(format!("auto-{ts}")), ts));
            }
        }
    }

    /// Count of events of `kind` applied so far.
    pub fn count(&self, kind: &EventKind) -> u64 {
        match (kind.builtin_index(), kind) {
            (Some(i), _) => self.counts[i],
            (None, EventKind::Custom(name)) => self
                .custom_counts
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, c)| *c),
            (None, _) => 0,
        }
    }

    /// The kind of `interaction`, one of this profile's.
    pub fn kind_of(&self, interaction: &Interaction) -> EventKind {
        let code = interaction.kind;
        match code.custom_position() {
            None => EventKind::from_builtin_index(code.0 as usize),
            Some(pos) => self
                .custom_counts
                .get(pos)
                .map(|(name, _)| EventKind::Custom(name.clone())),
        }
        // Only a hand-built entry can point past the names; say so rather than guess.
        .unwrap_or_else(|| EventKind::Custom(Arc::from(format!("unknown-kind-{}", code.0))))
    }

    /// The code of `kind` in this profile, adding a custom kind's name (with a count of
    /// zero) the first time it is seen.
    pub fn kind_code(&mut self, kind: &EventKind) -> KindCode {
        match kind {
            EventKind::Custom(name) => {
                let pos = match self.custom_counts.iter().position(|(n, _)| n == name) {
                    Some(pos) => pos,
                    None => {
                        self.custom_counts.push((name.clone(), 0));
                        self.custom_counts.len() - 1
                    }
                };
                KindCode(KindCode::FIRST_CUSTOM + pos as u32)
            }
            builtin => KindCode(builtin.builtin_index().map_or(0, |i| i as u32)),
        }
    }

    /// Appends an entry, older than those already held, to the recent list: for
    /// backends that store the list in their own format and rebuild it in order.
    pub fn push_recent(
        &mut self,
        item_id: ItemId,
        kind: &EventKind,
        timestamp_ms: TimestampMs,
        weight: f32,
    ) {
        let kind = self.kind_code(kind);
        self.recent.push_back(Interaction {
            item_id,
            timestamp_ms,
            weight,
            kind,
        });
    }

    /// Whether the user bought `item`.
    pub fn has_purchased(&self, item: &ItemId) -> bool {
        self.purchased.contains(item)
    }
}

impl Session {
    fn start(session_id: Arc<str>, ts: TimestampMs) -> Self {
        Self {
            session_id,
            started_ms: ts,
            last_event_ms: ts,
            events: 1,
        }
    }

    fn extend(&mut self, ts: TimestampMs) {
        self.started_ms = self.started_ms.min(ts);
        self.last_event_ms = self.last_event_ms.max(ts);
        self.events += 1;
    }
}

/// How a [`Profile`] is serialized: the layout it had before [`KindCode`], each recent
/// entry with its kind in full, so profiles stored before and after read the same.
mod wire {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use serde::{Deserialize, Serialize, Serializer};

    use super::{Profile, Session};
    use crate::types::{EventKind, ItemId, TimestampMs, UserId};

    /// One recent entry as stored.
    #[derive(Serialize, Deserialize)]
    #[serde(rename = "Interaction")]
    pub(super) struct Entry<I> {
        item_id: I,
        kind: EventKind,
        timestamp_ms: TimestampMs,
        weight: f32,
    }

    /// A profile as read; the field order is the format (postcard names no fields).
    #[derive(Deserialize)]
    #[serde(rename = "Profile")]
    pub(super) struct ProfileIn {
        user_id: UserId,
        counts: [u64; EventKind::BUILTIN],
        custom_counts: Vec<(Arc<str>, u64)>,
        recent: Vec<Entry<ItemId>>,
        session: Option<Session>,
        purchased: VecDeque<ItemId>,
        last_seen_ms: TimestampMs,
        touched_ms: TimestampMs,
        version: u64,
    }

    /// A profile as written, borrowing it.
    #[derive(Serialize)]
    #[serde(rename = "Profile")]
    struct ProfileOut<'a> {
        user_id: &'a UserId,
        counts: &'a [u64; EventKind::BUILTIN],
        custom_counts: &'a Vec<(Arc<str>, u64)>,
        recent: Recent<'a>,
        session: &'a Option<Session>,
        purchased: &'a VecDeque<ItemId>,
        last_seen_ms: TimestampMs,
        touched_ms: TimestampMs,
        version: u64,
    }

    /// The recent list of a profile, each entry's kind named.
    struct Recent<'a>(&'a Profile);

    impl Serialize for Recent<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.recent.iter().map(|i| Entry {
                item_id: &i.item_id,
                kind: self.0.kind_of(i),
                timestamp_ms: i.timestamp_ms,
                weight: i.weight,
            }))
        }
    }

    impl Serialize for Profile {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            ProfileOut {
                user_id: &self.user_id,
                counts: &self.counts,
                custom_counts: &self.custom_counts,
                recent: Recent(self),
                session: &self.session,
                purchased: &self.purchased,
                last_seen_ms: self.last_seen_ms,
                touched_ms: self.touched_ms,
                version: self.version,
            }
            .serialize(serializer)
        }
    }

    impl From<ProfileIn> for Profile {
        fn from(stored: ProfileIn) -> Self {
            let mut profile = Profile {
                user_id: stored.user_id,
                counts: stored.counts,
                custom_counts: stored.custom_counts,
                recent: VecDeque::with_capacity(stored.recent.len()),
                session: stored.session,
                purchased: stored.purchased,
                last_seen_ms: stored.last_seen_ms,
                touched_ms: stored.touched_ms,
                version: stored.version,
            };
            for entry in stored.recent {
                profile.push_recent(entry.item_id, &entry.kind, entry.timestamp_ms, entry.weight);
            }
            profile
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::types::EventId;

    fn event(item: &str, kind: EventKind, ts: i64) -> Event {
        Event {
            event_id: EventId::parse(&format!("{item}-{ts}"), "event_id").unwrap(),
            user_id: UserId::parse("u", "user_id").unwrap(),
            item_id: ItemId::parse(item, "item_id").unwrap(),
            kind,
            weight: None,
            timestamp_ms: ts,
            session_id: None,
            value: None,
            context: BTreeMap::new(),
        }
    }

    fn profile() -> Profile {
        Profile::new(UserId::parse("u", "user_id").unwrap())
    }

    #[test]
    fn counts_purchases_and_versions() {
        let policy = ProfilePolicy::default();
        let mut p = profile();
        p.apply(&event("a", EventKind::View, 1_000), 1.0, &policy, 5);
        p.apply(&event("a", EventKind::Purchase, 2_000), 8.0, &policy, 6);
        p.apply(&event("a", EventKind::Purchase, 3_000), 8.0, &policy, 7);
        assert_eq!(p.count(&EventKind::View), 1);
        assert_eq!(p.count(&EventKind::Purchase), 2);
        assert_eq!(
            p.purchased.len(),
            1,
            "a repeat purchase is one purchased item"
        );
        assert_eq!(p.version, 3);
        assert_eq!(p.last_seen_ms, 3_000);
        assert_eq!(p.touched_ms, 7);
    }

    #[test]
    fn recent_is_bounded_and_newest_first_even_for_late_events() {
        let policy = ProfilePolicy {
            max_recent: 3,
            ..ProfilePolicy::default()
        };
        let mut p = profile();
        for (i, ts) in [10, 30, 20, 40, 5].into_iter().enumerate() {
            p.apply(
                &event(&format!("i{i}"), EventKind::Click, ts),
                2.0,
                &policy,
                0,
            );
        }
        let times: Vec<_> = p.recent.iter().map(|i| i.timestamp_ms).collect();
        assert_eq!(times, vec![40, 30, 20]);
    }

    #[test]
    fn recent_list_holds_no_room_it_cannot_use() {
        let policy = ProfilePolicy::default();
        let mut p = profile();
        p.apply(&event("a", EventKind::View, 1), 1.0, &policy, 0);
        assert_eq!(p.recent.capacity(), 1, "one event, room for one");
        for ts in 2..200 {
            p.apply(&event("a", EventKind::View, ts), 1.0, &policy, 0);
            assert!(p.recent.capacity() <= policy.max_recent + 1);
        }
        assert_eq!(p.recent.len(), policy.max_recent);
    }

    #[test]
    fn sessions_split_on_inactivity_gap() {
        let policy = ProfilePolicy::default();
        let gap = policy.session_gap_ms;
        let mut p = profile();
        p.apply(&event("a", EventKind::View, 1_000), 1.0, &policy, 0);
        p.apply(&event("b", EventKind::View, 1_000 + gap), 1.0, &policy, 0);
        let first = p.session.clone().unwrap();
        assert_eq!(first.events, 2);
        p.apply(
            &event("c", EventKind::View, 2_001 + 2 * gap),
            1.0,
            &policy,
            0,
        );
        let second = p.session.clone().unwrap();
        assert_ne!(first.session_id, second.session_id);
        assert_eq!(second.events, 1);

        let mut e = event("d", EventKind::View, 2_002 + 2 * gap);
        e.session_id = Some(Arc::from("client-session"));
        p.apply(&e, 1.0, &policy, 0);
        assert_eq!(&*p.session.unwrap().session_id, "client-session");
    }

    #[test]
    fn expires_after_ttl_from_last_touch() {
        let policy = ProfilePolicy::default();
        let mut p = profile();
        p.apply(&event("a", EventKind::View, 1), 1.0, &policy, 1_000);
        assert!(!p.is_expired(&policy, 1_000 + policy.ttl_ms));
        assert!(p.is_expired(&policy, 1_001 + policy.ttl_ms));
    }

    #[test]
    fn custom_kinds_are_counted_by_name() {
        let policy = ProfilePolicy::default();
        let mut p = profile();
        let wish = EventKind::Custom(Arc::from("wishlist"));
        p.apply(&event("a", wish.clone(), 1), 3.0, &policy, 0);
        p.apply(&event("b", wish.clone(), 2), 3.0, &policy, 0);
        assert_eq!(p.count(&wish), 2);
        assert_eq!(p.count(&EventKind::Custom(Arc::from("other"))), 0);
    }

    #[test]
    fn a_recent_entry_names_its_kind_in_four_bytes() {
        assert_eq!(std::mem::size_of::<Interaction>(), 32);
        let policy = ProfilePolicy::default();
        let mut p = profile();
        let wish = EventKind::Custom(Arc::from("wishlist"));
        let share = EventKind::Custom(Arc::from("share"));
        for (n, kind) in [&wish, &EventKind::Purchase, &share, &wish, &EventKind::View]
            .into_iter()
            .enumerate()
        {
            p.apply(&event("a", kind.clone(), n as i64), 1.0, &policy, 0);
        }
        let kinds: Vec<EventKind> = p.recent.iter().map(|i| p.kind_of(i)).collect();
        assert_eq!(
            kinds,
            [&EventKind::View, &wish, &share, &EventKind::Purchase, &wish].map(Clone::clone)
        );
        // Each custom name is held once, however many entries have that kind.
        assert_eq!(p.custom_counts.len(), 2);
        assert_eq!((p.count(&wish), p.count(&share)), (2, 1));
    }

    /// The layout of `Profile` before recent entries held a [`KindCode`].
    #[derive(Serialize)]
    struct OldProfile {
        user_id: UserId,
        counts: [u64; EventKind::BUILTIN],
        custom_counts: Vec<(Arc<str>, u64)>,
        recent: VecDeque<OldInteraction>,
        session: Option<Session>,
        purchased: VecDeque<ItemId>,
        last_seen_ms: TimestampMs,
        touched_ms: TimestampMs,
        version: u64,
    }

    #[derive(Serialize)]
    struct OldInteraction {
        item_id: ItemId,
        kind: EventKind,
        timestamp_ms: TimestampMs,
        weight: f32,
    }

    #[test]
    fn profiles_are_stored_in_the_layout_they_always_had() {
        let policy = ProfilePolicy::default();
        let mut p = profile();
        let wish = EventKind::Custom(Arc::from("wishlist"));
        p.apply(&event("a", EventKind::View, 1), 1.0, &policy, 5);
        p.apply(&event("b", wish.clone(), 2), 3.0, &policy, 6);
        p.apply(&event("c", EventKind::Purchase, 3), 4.0, &policy, 7);
        let old = OldProfile {
            user_id: p.user_id.clone(),
            counts: p.counts,
            custom_counts: p.custom_counts.clone(),
            recent: p
                .recent
                .iter()
                .map(|i| OldInteraction {
                    item_id: i.item_id.clone(),
                    kind: p.kind_of(i),
                    timestamp_ms: i.timestamp_ms,
                    weight: i.weight,
                })
                .collect(),
            session: p.session.clone(),
            purchased: p.purchased.clone(),
            last_seen_ms: p.last_seen_ms,
            touched_ms: p.touched_ms,
            version: p.version,
        };
        let stored = postcard::to_allocvec(&old).unwrap();
        assert_eq!(postcard::to_allocvec(&p).unwrap(), stored);
        let read: Profile = postcard::from_bytes(&stored).unwrap();
        assert_eq!(read, p);
        assert_eq!(read.kind_of(&read.recent[1]), wish);
    }
}
