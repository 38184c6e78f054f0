//! Mapping between Reflex's types and Scylla rows: profiles to the columns of `profiles`
//! and back, items to `catalog`, log records to their postcard blob.

use std::collections::VecDeque;
use std::sync::Arc;

use reflex_core::profile::Session;
use reflex_core::{EventKind, Item, ItemId, LogRecord, Profile, UserId};
use scylla::DeserializeRow;

/// Write stamps a profile row remembers, newest last: enough to tell, after a write whose
/// outcome is unknown (timeout), whether it landed, even when other writers followed it.
pub(super) const STAMPS_KEPT: usize = 32;

/// Why a stored value could not be turned back into a Reflex type.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    /// A column held something the store never writes.
    #[error("column {column}: {reason}")]
    Column {
        /// Which column.
        column: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A log record blob could not be decoded.
    #[error("undecodable log record: {0}")]
    Record(#[from] postcard::Error),
}

fn column(column: &'static str, reason: impl Into<String>) -> RowError {
    RowError::Column {
        column,
        reason: reason.into(),
    }
}

/// One interaction in `recent`: (item id, kind label, event ms, weight).
pub(super) type RecentEntry = (String, String, i64, f32);
/// The session: (id, started ms, last event ms, events).
pub(super) type SessionTuple = (String, i64, i64, i64);

/// A row of `profiles`, as read (by column name) and written (in
/// [`super::cql::PROFILE_COLUMNS`] order after the user id).
#[derive(Clone, Debug, PartialEq, DeserializeRow)]
pub(super) struct ProfileRow {
    pub user_id: String,
    pub version: Option<i64>,
    pub stamp: Option<i64>,
    pub stamps: Option<Vec<i64>>,
    pub last_seen_ms: Option<i64>,
    pub touched_ms: Option<i64>,
    pub counts: Option<Vec<i64>>,
    pub custom_counts: Option<Vec<(String, i64)>>,
    pub recent: Option<Vec<RecentEntry>>,
    pub purchased: Option<Vec<String>>,
    pub session: Option<SessionTuple>,
}

/// The ten profile columns, in bind order.
pub(super) type ProfileValues = (
    i64,
    i64,
    Vec<i64>,
    i64,
    i64,
    Vec<i64>,
    Vec<(String, i64)>,
    Vec<RecentEntry>,
    Vec<String>,
    Option<SessionTuple>,
);

impl ProfileRow {
    /// The row storing `profile`, written with `stamp` after the earlier `stamps`.
    pub(super) fn from_profile(profile: &Profile, stamp: i64, earlier: &[i64]) -> Self {
        let mut stamps: Vec<i64> = earlier
            .iter()
            .copied()
            .skip(earlier.len().saturating_sub(STAMPS_KEPT - 1))
            .collect();
        stamps.push(stamp);
        Self {
            user_id: profile.user_id.as_str().to_owned(),
            version: Some(profile.version as i64),
            stamp: Some(stamp),
            stamps: Some(stamps),
            last_seen_ms: Some(profile.last_seen_ms),
            touched_ms: Some(profile.touched_ms),
            counts: Some(profile.counts.iter().map(|&c| c as i64).collect()),
            custom_counts: Some(
                profile
                    .custom_counts
                    .iter()
                    .map(|(name, c)| (name.to_string(), *c as i64))
                    .collect(),
            ),
            recent: Some(
                profile
                    .recent
                    .iter()
                    .map(|i| {
                        (
                            i.item_id.as_str().to_owned(),
                            profile.kind_of(i).label(),
                            i.timestamp_ms,
                            i.weight,
                        )
                    })
                    .collect(),
            ),
            purchased: Some(
                profile
                    .purchased
                    .iter()
                    .map(|i| i.as_str().to_owned())
                    .collect(),
            ),
            session: profile.session.as_ref().map(|s| {
                (
                    s.session_id.to_string(),
                    s.started_ms,
                    s.last_event_ms,
                    i64::from(s.events),
                )
            }),
        }
    }

    /// The values bound after the user id, in [`super::cql::PROFILE_COLUMNS`] order.
    pub(super) fn values(self) -> ProfileValues {
        (
            self.version.unwrap_or(0),
            self.stamp.unwrap_or(0),
            self.stamps.unwrap_or_default(),
            self.last_seen_ms.unwrap_or(0),
            self.touched_ms.unwrap_or(0),
            self.counts.unwrap_or_default(),
            self.custom_counts.unwrap_or_default(),
            self.recent.unwrap_or_default(),
            self.purchased.unwrap_or_default(),
            self.session,
        )
    }

    /// The profile this row stores.
    pub(super) fn to_profile(&self) -> Result<Profile, RowError> {
        let user = UserId::parse(&self.user_id, "user_id")
            .map_err(|e| column("user_id", e.to_string()))?;
        let mut p = Profile::new(user);
        p.version = nonnegative("version", self.version.unwrap_or(0))?;
        p.last_seen_ms = self.last_seen_ms.unwrap_or(0);
        p.touched_ms = self.touched_ms.unwrap_or(0);
        let counts = self.counts.as_deref().unwrap_or(&[]);
        if !counts.is_empty() && counts.len() != EventKind::BUILTIN {
            return Err(column(
                "counts",
                format!("{} counters, expected {}", counts.len(), EventKind::BUILTIN),
            ));
        }
        for (slot, &c) in p.counts.iter_mut().zip(counts) {
            *slot = nonnegative("counts", c)?;
        }
        for (name, c) in self.custom_counts.iter().flatten() {
            p.custom_counts
                .push((Arc::from(name.as_str()), nonnegative("custom_counts", *c)?));
        }
        let recent = self.recent.iter().flatten();
        p.recent.reserve_exact(recent.clone().count());
        for (item, kind, ts, weight) in recent {
            let kind = EventKind::from_label(kind)
                .ok_or_else(|| column("recent", format!("unknown kind {kind:?}")))?;
            p.push_recent(item_id("recent", item)?, &kind, *ts, *weight);
        }
        p.purchased = self
            .purchased
            .iter()
            .flatten()
            .map(|item| item_id("purchased", item))
            .collect::<Result<VecDeque<_>, RowError>>()?;
        p.session = match &self.session {
            None => None,
            Some((id, started, last, events)) => Some(Session {
                session_id: Arc::from(id.as_str()),
                started_ms: *started,
                last_event_ms: *last,
                events: u32::try_from(*events)
                    .map_err(|_| column("session", format!("{events} events")))?,
            }),
        };
        Ok(p)
    }

    /// Whether the write stamped `stamp` is among those this row remembers.
    pub(super) fn remembers(&self, stamp: i64) -> bool {
        self.stamps.iter().flatten().any(|&s| s == stamp)
    }
}

fn nonnegative(name: &'static str, n: i64) -> Result<u64, RowError> {
    u64::try_from(n).map_err(|_| column(name, format!("{n} is negative")))
}

fn item_id(name: &'static str, id: &str) -> Result<ItemId, RowError> {
    ItemId::parse(id, "item_id").map_err(|e| column(name, e.to_string()))
}

/// A row of `catalog`.
#[derive(Clone, Debug, PartialEq, DeserializeRow)]
pub(super) struct ItemRow {
    pub item_id: String,
    pub title: Option<String>,
    pub categories: Option<Vec<String>>,
    pub available: Option<bool>,
    pub embedding: Option<Vec<f32>>,
}

/// The values of `INSERT INTO catalog`, in column order.
pub(super) type ItemValues<'a> = (&'a str, &'a str, &'a [String], bool, &'a [f32]);

/// The values storing `item`.
pub(super) fn item_values(item: &Item) -> ItemValues<'_> {
    (
        item.item_id.as_str(),
        &item.title,
        &item.categories,
        item.available,
        &item.embedding,
    )
}

impl ItemRow {
    /// The item this row stores.
    pub(super) fn into_item(self) -> Result<Item, RowError> {
        Ok(Item {
            item_id: item_id("item_id", &self.item_id)?,
            title: self.title.unwrap_or_default(),
            categories: self.categories.unwrap_or_default(),
            available: self.available.unwrap_or(false),
            embedding: self.embedding.unwrap_or_default(),
        })
    }
}

/// The blob stored for a log record.
pub(super) fn encode_record(record: &LogRecord) -> Result<Vec<u8>, RowError> {
    Ok(postcard::to_allocvec(record)?)
}

/// The log record a blob stores.
pub(super) fn decode_record(bytes: &[u8]) -> Result<LogRecord, RowError> {
    Ok(postcard::from_bytes(bytes)?)
}

/// Wall-clock time (ms) at which a record was ingested, which the log row keeps beside it.
pub(super) fn ingested_ms(record: &LogRecord) -> i64 {
    match record {
        LogRecord::Event { ingested_ms, .. } => *ingested_ms,
        LogRecord::Erase { erased_ms, .. } => *erased_ms,
    }
}

#[cfg(test)]
mod tests {
    use reflex_core::ProfilePolicy;

    use super::*;
    use crate::conformance::{event, user};

    /// A profile with every part filled: built-in and custom counts, late events, client
    /// and derived sessions, purchases.
    fn rich_profile() -> Profile {
        let policy = ProfilePolicy {
            max_recent: 8,
            max_purchased: 3,
            ..ProfilePolicy::default()
        };
        let kinds = [
            EventKind::View,
            EventKind::Purchase,
            EventKind::Custom(Arc::from("wishlist")),
            EventKind::Click,
            EventKind::Custom(Arc::from("share")),
            EventKind::AddToCart,
        ];
        let mut p = Profile::new(user("rows-u"));
        for i in 0..20i64 {
            let mut e = event(
                &format!("rows-{i}"),
                "rows-u",
                &format!("item-{}", i % 6),
                kinds[i as usize % kinds.len()].clone(),
                1_700_000_000_000 + i * 90_000 - if i % 5 == 3 { 400_000 } else { 0 },
            );
            if i % 7 == 0 {
                e.session_id = Some(Arc::from(format!("s-{i}")));
            }
            p.apply(&e, 0.1 + i as f32 / 3.0, &policy, 1_800_000_000_000 + i);
        }
        p
    }

    #[test]
    fn profiles_round_trip_through_rows() {
        let p = rich_profile();
        assert!(p.custom_counts.len() == 2 && p.session.is_some() && !p.purchased.is_empty());
        let row = ProfileRow::from_profile(&p, 42, &[]);
        assert_eq!(row.to_profile().unwrap(), p);

        // The fresh, never-applied profile too.
        let empty = Profile::new(user("rows-empty"));
        let row = ProfileRow::from_profile(&empty, 1, &[]);
        assert_eq!(row.session, None);
        assert_eq!(row.to_profile().unwrap(), empty);
    }

    #[test]
    fn values_follow_the_column_order_and_nulls_read_as_empty() {
        let p = rich_profile();
        let row = ProfileRow::from_profile(&p, 7, &[5, 6]);
        let (version, stamp, stamps, last_seen, touched, counts, custom, recent, bought, session) =
            row.clone().values();
        assert_eq!(version, p.version as i64);
        assert_eq!((stamp, stamps), (7, vec![5, 6, 7]));
        assert_eq!((last_seen, touched), (p.last_seen_ms, p.touched_ms));
        assert_eq!(counts.len(), EventKind::BUILTIN);
        assert_eq!(custom.len(), 2);
        assert_eq!(recent.len(), p.recent.len());
        assert_eq!(bought.len(), p.purchased.len());
        assert!(session.is_some());

        // Scylla may hand back empty frozen lists as null.
        let sparse = ProfileRow {
            user_id: "rows-sparse".into(),
            version: Some(1),
            stamp: Some(1),
            stamps: None,
            last_seen_ms: Some(3),
            touched_ms: Some(4),
            counts: None,
            custom_counts: None,
            recent: None,
            purchased: None,
            session: None,
        };
        let got = sparse.to_profile().unwrap();
        assert_eq!(got.version, 1);
        assert_eq!(got.counts, [0; EventKind::BUILTIN]);
        assert!(got.recent.is_empty() && got.purchased.is_empty());
    }

    #[test]
    fn stamps_keep_the_newest_and_remember_writes() {
        let earlier: Vec<i64> = (0..(STAMPS_KEPT as i64 + 10)).collect();
        let row = ProfileRow::from_profile(&Profile::new(user("rows-s")), -1, &earlier);
        let stamps = row.stamps.clone().unwrap();
        assert_eq!(stamps.len(), STAMPS_KEPT);
        assert_eq!(stamps.last(), Some(&-1));
        assert_eq!(stamps[0], earlier[earlier.len() - (STAMPS_KEPT - 1)]);
        assert!(row.remembers(-1) && row.remembers(earlier[earlier.len() - 1]));
        assert!(!row.remembers(0));
    }

    #[test]
    fn malformed_rows_are_errors_naming_the_column() {
        let good = ProfileRow::from_profile(&rich_profile(), 1, &[]);
        let bad = ProfileRow {
            counts: Some(vec![1, 2]),
            ..good.clone()
        };
        assert!(bad.to_profile().unwrap_err().to_string().contains("counts"));
        let bad = ProfileRow {
            recent: Some(vec![("i".into(), "not-a-kind".into(), 1, 1.0)]),
            ..good.clone()
        };
        assert!(bad.to_profile().unwrap_err().to_string().contains("recent"));
        let bad = ProfileRow {
            version: Some(-1),
            ..good
        };
        assert!(
            bad.to_profile()
                .unwrap_err()
                .to_string()
                .contains("version")
        );
    }

    #[test]
    fn items_round_trip_through_rows() {
        let item = Item {
            item_id: ItemId::parse("rows-item", "item_id").unwrap(),
            title: "Shoe".into(),
            categories: vec!["shoes".into(), "sale".into()],
            available: true,
            embedding: vec![0.5, -1.0, 2.25],
        };
        let (id, title, categories, available, embedding) = item_values(&item);
        let row = ItemRow {
            item_id: id.into(),
            title: Some(title.into()),
            categories: Some(categories.to_vec()),
            available: Some(available),
            embedding: Some(embedding.to_vec()),
        };
        assert_eq!(row.into_item().unwrap(), item);
        let bare = ItemRow {
            item_id: "rows-bare".into(),
            title: None,
            categories: None,
            available: None,
            embedding: None,
        };
        let bare = bare.into_item().unwrap();
        assert!(bare.categories.is_empty() && bare.embedding.is_empty() && !bare.available);
    }

    #[test]
    fn records_round_trip_through_blobs() {
        let mut e = event("rows-r", "rows-u", "shoe", EventKind::Purchase, 1_000);
        e.value = Some(19.99);
        e.context.insert("device".into(), "phone".into());
        let records = [
            LogRecord::Event {
                event: e,
                filtered: true,
                ingested_ms: 5_000,
            },
            LogRecord::Erase {
                user_id: user("rows-u"),
                erased_ms: 6_000,
            },
        ];
        for record in &records {
            let blob = encode_record(record).unwrap();
            assert_eq!(&decode_record(&blob).unwrap(), record);
        }
        assert_eq!(ingested_ms(&records[0]), 5_000);
        assert_eq!(ingested_ms(&records[1]), 6_000);
        assert!(decode_record(&[0xff, 0xff, 0xff]).is_err());
    }
}
