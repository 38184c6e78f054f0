//! User profiles and the one function that applies an event to them.
//!
//! Every backend stores [`Profile`] and calls [`Profile::apply`], so profiles evolve the
//! same way whatever holds them.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::types::{Event, EventKind, ItemId, TimestampMs, UserId};

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

/// One entry of the recent history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// The item.
    pub item_id: ItemId,
    /// What the user did.
    pub kind: EventKind,
    /// When (event time).
    pub timestamp_ms: TimestampMs,
    /// The learning weight the event had, kept so fold-in needs no configuration lookup.
    pub weight: f32,
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Whose profile.
    pub user_id: UserId,
    /// Applied events per built-in kind, in [`EventKind::builtin_index`] order.
    pub counts: [u64; EventKind::BUILTIN],
    /// Applied events per custom kind name.
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
        match event.kind.builtin_index() {
            Some(i) => self.counts[i] += 1,
            None => {
                if let EventKind::Custom(name) = &event.kind {
                    match self.custom_counts.iter_mut().find(|(n, _)| n == name) {
                        Some((_, c)) => *c += 1,
                        None => self.custom_counts.push((name.clone(), 1)),
                    }
                }
            }
        }

        // Keep the recent list ordered by event time, newest first, so late events land
        // where they belong instead of masquerading as the latest interest.
        let pos = self
            .recent
            .iter()
            .position(|i| i.timestamp_ms <= event.timestamp_ms)
            .unwrap_or(self.recent.len());
        if pos < policy.max_recent {
            // Grow by doubling from one entry, never past the bound (+1 for the insert
            // before the truncate): the default growth starts at four entries and ends
            // at 64 for a bound of 50, 0.2–0.8 KiB per profile held for nothing.
            let len = self.recent.len();
            if len == self.recent.capacity() {
                let want = (2 * len).clamp(1, policy.max_recent + 1);
                self.recent.reserve_exact(want.saturating_sub(len));
            }
            self.recent.insert(
                pos,
                Interaction {
                    item_id: event.item_id.clone(),
                    kind: event.kind.clone(),
                    timestamp_ms: event.timestamp_ms,
                    weight,
                },
            );
            self.recent.truncate(policy.max_recent);
        }

        self.sessionise(event, policy);

        if event.kind == EventKind::Purchase && !self.purchased.contains(&event.item_id) {
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
}
