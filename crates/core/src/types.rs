//! Validated domain types: ids, event kinds, events.
//!
//! Everything here is constructed through validation at the edge, so code past the edge
//! can rely on bounded, non-empty ids and finite numbers.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest accepted id (user, item, event, session), in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest accepted custom kind name, in bytes.
pub const MAX_CUSTOM_KIND_LEN: usize = 64;
/// Most context entries on one event.
pub const MAX_CONTEXT_ENTRIES: usize = 16;
/// Longest context key, in bytes.
pub const MAX_CONTEXT_KEY_LEN: usize = 64;
/// Longest context value, in bytes.
pub const MAX_CONTEXT_VALUE_LEN: usize = 256;
/// Largest absolute weight of a custom kind.
pub const MAX_ABS_WEIGHT: f64 = 10.0;

/// Milliseconds since the Unix epoch.
pub type TimestampMs = i64;

/// Sequence number of a record in the event log; the first record is 1.
pub type Seq = u64;

/// The hasher of the maps keyed by ids on the ingest and recommend paths: foldhash,
/// several times faster than the standard SipHash on short ids, and seeded at random
/// per process so clients cannot choose ids that collide.
pub type IdHashState = foldhash::fast::RandomState;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `raw` as this id; `field` names it in the error.
            pub fn parse(raw: &str, field: &str) -> Result<Self> {
                validate_id(raw, field)?;
                Ok(Self(Arc::from(raw)))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The shared string behind the id.
            pub fn as_arc(&self) -> &Arc<str> {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A user as the client names them.
    UserId
);
id_type!(
    /// An item as the client names it.
    ItemId
);
id_type!(
    /// A client-chosen idempotency key of one event.
    EventId
);

fn validate_id(raw: &str, field: &str) -> Result<()> {
    if raw.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if raw.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            field,
            format!("is {} bytes, at most {MAX_ID_LEN} allowed", raw.len()),
        ));
    }
    if raw.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// What a user did with an item.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// Looked at the item's page.
    View,
    /// Clicked the item in a list.
    Click,
    /// Put the item in the cart.
    AddToCart,
    /// Took the item out of the cart.
    RemoveFromCart,
    /// Bought the item.
    Purchase,
    /// A kind of the shop's own, by name.
    Custom(Arc<str>),
}

impl EventKind {
    /// Number of built-in kinds, which index [`KindWeights`] and profile counters.
    pub const BUILTIN: usize = 5;

    /// Position of a built-in kind, `None` for custom kinds.
    pub fn builtin_index(&self) -> Option<usize> {
        match self {
            Self::View => Some(0),
            Self::Click => Some(1),
            Self::AddToCart => Some(2),
            Self::RemoveFromCart => Some(3),
            Self::Purchase => Some(4),
            Self::Custom(_) => None,
        }
    }

    /// The built-in kind at position `index` (see [`builtin_index`](Self::builtin_index)).
    pub fn from_builtin_index(index: usize) -> Option<Self> {
        Some(match index {
            0 => Self::View,
            1 => Self::Click,
            2 => Self::AddToCart,
            3 => Self::RemoveFromCart,
            4 => Self::Purchase,
            _ => return None,
        })
    }

    /// Stable name used in profiles and metrics: `view`, …, `custom:<name>`.
    pub fn label(&self) -> String {
        match self {
            Self::View => "view".into(),
            Self::Click => "click".into(),
            Self::AddToCart => "add_to_cart".into(),
            Self::RemoveFromCart => "remove_from_cart".into(),
            Self::Purchase => "purchase".into(),
            Self::Custom(name) => format!("custom:{name}"),
        }
    }

    /// The kind a [`label`](Self::label) names; `None` for text no label produces.
    pub fn from_label(label: &str) -> Option<Self> {
        Some(match label {
            "view" => Self::View,
            "click" => Self::Click,
            "add_to_cart" => Self::AddToCart,
            "remove_from_cart" => Self::RemoveFromCart,
            "purchase" => Self::Purchase,
            other => Self::Custom(Arc::from(other.strip_prefix("custom:")?)),
        })
    }

    /// Validates a custom kind name.
    pub fn custom(name: &str, field: &str) -> Result<Self> {
        if name.is_empty() {
            return Err(Error::invalid(field, "must be set for a custom kind"));
        }
        if name.len() > MAX_CUSTOM_KIND_LEN {
            return Err(Error::invalid(
                field,
                format!(
                    "is {} bytes, at most {MAX_CUSTOM_KIND_LEN} allowed",
                    name.len()
                ),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(Error::invalid(field, "must not contain control characters"));
        }
        Ok(Self::Custom(Arc::from(name)))
    }
}

/// A validated interaction, as recorded in the event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Idempotency key.
    pub event_id: EventId,
    /// Who.
    pub user_id: UserId,
    /// What.
    pub item_id: ItemId,
    /// How.
    pub kind: EventKind,
    /// Weight given by the client for a custom kind.
    pub weight: Option<f64>,
    /// When it happened.
    pub timestamp_ms: TimestampMs,
    /// The client's session id, if it sent one.
    pub session_id: Option<Arc<str>>,
    /// Price, quantity or similar.
    pub value: Option<f64>,
    /// Device, channel, user agent and similar.
    pub context: BTreeMap<String, String>,
}

/// An event as it arrives, before validation (the gRPC layer fills it from protobuf).
#[derive(Clone, Debug, Default)]
pub struct RawEvent {
    /// See [`Event::event_id`].
    pub event_id: String,
    /// See [`Event::user_id`].
    pub user_id: String,
    /// See [`Event::item_id`].
    pub item_id: String,
    /// The built-in kind, `None` when unspecified or unknown.
    pub kind: Option<RawKind>,
    /// Name of a custom kind.
    pub custom_kind: String,
    /// See [`Event::weight`].
    pub weight: Option<f64>,
    /// `None` when the client sent no timestamp.
    pub timestamp_ms: Option<TimestampMs>,
    /// The nanoseconds field of a timestamp sent as seconds and nanos (protobuf), which
    /// must be 0 to 999,999,999; `None` for timestamps sent otherwise.
    pub timestamp_nanos: Option<i32>,
    /// Empty when the client sent none.
    pub session_id: String,
    /// See [`Event::value`].
    pub value: Option<f64>,
    /// See [`Event::context`].
    pub context: BTreeMap<String, String>,
}

/// The kind field as sent by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawKind {
    /// `EVENT_KIND_VIEW`.
    View,
    /// `EVENT_KIND_CLICK`.
    Click,
    /// `EVENT_KIND_ADD_TO_CART`.
    AddToCart,
    /// `EVENT_KIND_REMOVE_FROM_CART`.
    RemoveFromCart,
    /// `EVENT_KIND_PURCHASE`.
    Purchase,
    /// `EVENT_KIND_CUSTOM`.
    Custom,
}

/// Limits applied when validating events.
#[derive(Clone, Copy, Debug)]
pub struct EventLimits {
    /// How far past the server's clock an event timestamp may be.
    pub max_future_ms: i64,
}

impl Default for EventLimits {
    fn default() -> Self {
        Self {
            max_future_ms: 5 * 60 * 1000,
        }
    }
}

impl RawEvent {
    /// Validates every field; the error names the first bad field.
    pub fn validate(self, limits: &EventLimits, now_ms: TimestampMs) -> Result<Event> {
        let event_id = EventId::parse(&self.event_id, "event_id")?;
        let user_id = UserId::parse(&self.user_id, "user_id")?;
        let item_id = ItemId::parse(&self.item_id, "item_id")?;
        let kind = match self.kind {
            None => return Err(Error::invalid("kind", "must be set to a known event kind")),
            Some(RawKind::View) => EventKind::View,
            Some(RawKind::Click) => EventKind::Click,
            Some(RawKind::AddToCart) => EventKind::AddToCart,
            Some(RawKind::RemoveFromCart) => EventKind::RemoveFromCart,
            Some(RawKind::Purchase) => EventKind::Purchase,
            Some(RawKind::Custom) => EventKind::custom(&self.custom_kind, "custom_kind")?,
        };
        if let Some(w) = self.weight
            && (!w.is_finite() || w.abs() > MAX_ABS_WEIGHT)
        {
            return Err(Error::invalid(
                "weight",
                format!("must be finite and within ±{MAX_ABS_WEIGHT}"),
            ));
        }
        if let Some(nanos) = self.timestamp_nanos
            && !(0..1_000_000_000).contains(&nanos)
        {
            return Err(Error::invalid(
                "timestamp.nanos",
                format!("is {nanos}, expected 0 to 999999999"),
            ));
        }
        let timestamp_ms = match self.timestamp_ms {
            None => return Err(Error::invalid("timestamp", "is required")),
            Some(ts) if ts <= 0 => {
                return Err(Error::invalid("timestamp", "must be after 1970-01-01"));
            }
            Some(ts) if ts > now_ms.saturating_add(limits.max_future_ms) => {
                return Err(Error::invalid(
                    "timestamp",
                    format!(
                        "is {} s in the future, at most {} s allowed",
                        (ts - now_ms) / 1000,
                        limits.max_future_ms / 1000
                    ),
                ));
            }
            Some(ts) => ts,
        };
        let session_id = if self.session_id.is_empty() {
            None
        } else {
            validate_id(&self.session_id, "session_id")?;
            Some(Arc::from(self.session_id.as_str()))
        };
        if let Some(v) = self.value
            && !v.is_finite()
        {
            return Err(Error::invalid("value", "must be finite"));
        }
        if self.context.len() > MAX_CONTEXT_ENTRIES {
            return Err(Error::invalid(
                "context",
                format!(
                    "has {} entries, at most {MAX_CONTEXT_ENTRIES} allowed",
                    self.context.len()
                ),
            ));
        }
        for (k, v) in &self.context {
            if k.is_empty() || k.len() > MAX_CONTEXT_KEY_LEN {
                return Err(Error::invalid(
                    "context",
                    format!("key must be 1 to {MAX_CONTEXT_KEY_LEN} bytes"),
                ));
            }
            if v.len() > MAX_CONTEXT_VALUE_LEN {
                return Err(Error::invalid(
                    format!("context[{k}]"),
                    format!("value is longer than {MAX_CONTEXT_VALUE_LEN} bytes"),
                ));
            }
        }
        Ok(Event {
            event_id,
            user_id,
            item_id,
            kind,
            weight: self.weight,
            timestamp_ms,
            session_id,
            value: self.value,
            context: self.context,
        })
    }
}

/// Learning weight per built-in kind; custom kinds carry their own or a configured one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KindWeights {
    /// Weight of a view.
    pub view: f32,
    /// Weight of a click.
    pub click: f32,
    /// Weight of an add-to-cart.
    pub add_to_cart: f32,
    /// Weight of a remove-from-cart (negative: the user changed their mind).
    pub remove_from_cart: f32,
    /// Weight of a purchase.
    pub purchase: f32,
    /// Weights of custom kinds by name; an event's own weight wins.
    pub custom: BTreeMap<String, f32>,
    /// Weight of a custom kind with neither its own nor a configured weight.
    pub custom_default: f32,
}

impl Default for KindWeights {
    fn default() -> Self {
        Self {
            view: 1.0,
            click: 2.0,
            add_to_cart: 4.0,
            remove_from_cart: -2.0,
            purchase: 8.0,
            custom: BTreeMap::new(),
            custom_default: 1.0,
        }
    }
}

impl KindWeights {
    /// Weight of `kind`, taking a custom event's own weight first.
    pub fn weight(&self, kind: &EventKind, own: Option<f64>) -> f32 {
        match kind {
            EventKind::View => self.view,
            EventKind::Click => self.click,
            EventKind::AddToCart => self.add_to_cart,
            EventKind::RemoveFromCart => self.remove_from_cart,
            EventKind::Purchase => self.purchase,
            EventKind::Custom(name) => own.map(|w| w as f32).unwrap_or_else(|| {
                self.custom
                    .get(&**name)
                    .copied()
                    .unwrap_or(self.custom_default)
            }),
        }
    }
}

/// Current wall-clock time in milliseconds since the epoch.
pub fn now_ms() -> TimestampMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Room to add to a full per-user list of `len` entries that holds at most `bound`
/// (+1 for an insert made before trimming): half as much again, at least one, never
/// past the bound. Per-user lists grow this way instead of doubling from four, which
/// held room for thousands of entries per thousand users that never came.
pub fn growth(len: usize, bound: usize) -> usize {
    (len / 2).max(1).min((bound + 1).saturating_sub(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_lists_grow_by_half_up_to_their_bound() {
        let mut caps = vec![0];
        while let Some(&cap) = caps.last().filter(|&&c| c < 51) {
            caps.push(cap + growth(cap, 50));
        }
        assert_eq!(caps, [0, 1, 2, 3, 4, 6, 9, 13, 19, 28, 42, 51]);
        assert_eq!(growth(51, 50), 0, "full at the bound plus one");
        assert_eq!(growth(80, 50), 0, "a list longer than a lowered bound");
    }

    fn raw() -> RawEvent {
        RawEvent {
            event_id: "e1".into(),
            user_id: "u1".into(),
            item_id: "i1".into(),
            kind: Some(RawKind::View),
            timestamp_ms: Some(1_700_000_000_000),
            ..RawEvent::default()
        }
    }

    const NOW: i64 = 1_700_000_000_000;

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected invalid argument, got {other}"),
        }
    }

    #[test]
    fn kind_labels_round_trip() {
        let kinds = [
            EventKind::View,
            EventKind::Click,
            EventKind::AddToCart,
            EventKind::RemoveFromCart,
            EventKind::Purchase,
            EventKind::custom("wishlist", "kind").unwrap(),
        ];
        for kind in kinds {
            assert_eq!(EventKind::from_label(&kind.label()), Some(kind));
        }
        assert_eq!(EventKind::from_label("nonsense"), None);
        assert!(EventKind::custom("a\u{1f}b", "kind").is_err());
    }

    #[test]
    fn accepts_a_well_formed_event() {
        let e = raw().validate(&EventLimits::default(), NOW).unwrap();
        assert_eq!(e.user_id.as_str(), "u1");
        assert_eq!(e.kind, EventKind::View);
        assert!(e.session_id.is_none());
    }

    #[test]
    fn rejects_empty_and_long_ids_naming_the_field() {
        let mut r = raw();
        r.user_id.clear();
        assert_eq!(
            field_of(r.validate(&EventLimits::default(), NOW).unwrap_err()),
            "user_id"
        );
        let mut r = raw();
        r.item_id = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(
            field_of(r.validate(&EventLimits::default(), NOW).unwrap_err()),
            "item_id"
        );
        let mut r = raw();
        r.item_id = "x".repeat(MAX_ID_LEN);
        assert!(r.validate(&EventLimits::default(), NOW).is_ok());
        let mut r = raw();
        r.event_id = "a\nb".into();
        assert_eq!(
            field_of(r.validate(&EventLimits::default(), NOW).unwrap_err()),
            "event_id"
        );
    }

    #[test]
    fn rejects_unknown_kind_and_nameless_custom_kind() {
        let mut r = raw();
        r.kind = None;
        assert_eq!(
            field_of(r.validate(&EventLimits::default(), NOW).unwrap_err()),
            "kind"
        );
        let mut r = raw();
        r.kind = Some(RawKind::Custom);
        assert_eq!(
            field_of(r.validate(&EventLimits::default(), NOW).unwrap_err()),
            "custom_kind"
        );
        let mut r = raw();
        r.kind = Some(RawKind::Custom);
        r.custom_kind = "wishlist".into();
        let e = r.validate(&EventLimits::default(), NOW).unwrap();
        assert_eq!(e.kind.label(), "custom:wishlist");
    }

    #[test]
    fn rejects_missing_and_future_timestamps() {
        let mut r = raw();
        r.timestamp_ms = None;
        assert_eq!(
            field_of(r.validate(&EventLimits::default(), NOW).unwrap_err()),
            "timestamp"
        );
        let mut r = raw();
        r.timestamp_ms = Some(NOW + 3_600_000);
        assert_eq!(
            field_of(r.validate(&EventLimits::default(), NOW).unwrap_err()),
            "timestamp"
        );
        let mut r = raw();
        r.timestamp_ms = Some(NOW + 60_000);
        assert!(r.validate(&EventLimits::default(), NOW).is_ok());
    }

    #[test]
    fn rejects_timestamp_nanos_out_of_range() {
        for nanos in [-1, 1_000_000_000, i32::MAX, i32::MIN] {
            let mut r = raw();
            r.timestamp_nanos = Some(nanos);
            let err = r.validate(&EventLimits::default(), NOW).unwrap_err();
            assert!(err.to_string().contains(&nanos.to_string()), "{err}");
            assert_eq!(field_of(err), "timestamp.nanos");
        }
        for nanos in [0, 999_999_999] {
            let mut r = raw();
            r.timestamp_nanos = Some(nanos);
            assert!(r.validate(&EventLimits::default(), NOW).is_ok());
        }
    }

    #[test]
    fn rejects_non_finite_numbers() {
        let mut r = raw();
        r.value = Some(f64::NAN);
        assert_eq!(
            field_of(r.validate(&EventLimits::default(), NOW).unwrap_err()),
            "value"
        );
        let mut r = raw();
        r.weight = Some(f64::INFINITY);
        assert_eq!(
            field_of(r.validate(&EventLimits::default(), NOW).unwrap_err()),
            "weight"
        );
    }

    #[test]
    fn rejects_oversized_context() {
        let mut r = raw();
        for i in 0..=MAX_CONTEXT_ENTRIES {
            r.context.insert(format!("k{i}"), "v".into());
        }
        assert_eq!(
            field_of(r.validate(&EventLimits::default(), NOW).unwrap_err()),
            "context"
        );
    }

    #[test]
    fn weights_prefer_the_events_own_for_custom_kinds() {
        let mut w = KindWeights::default();
        w.custom.insert("wishlist".into(), 3.0);
        let wish = EventKind::Custom(Arc::from("wishlist"));
        assert_eq!(w.weight(&wish, None), 3.0);
        assert_eq!(w.weight(&wish, Some(5.0)), 5.0);
        assert_eq!(w.weight(&EventKind::Custom(Arc::from("other")), None), 1.0);
        assert_eq!(w.weight(&EventKind::Purchase, Some(5.0)), 8.0);
    }
}
