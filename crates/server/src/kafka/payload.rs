//! Kafka record payloads to raw events: the JSON schema and the binary protobuf
//! `reflex.v1.Event`, the kind a topic imposes, and the event id a record without one gets.

use std::collections::BTreeMap;

use prost::Message as _;
use reflex_core::hash;
use reflex_core::{EventKind, RawEvent, RawKind};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{KIND_FROM_PAYLOAD, PayloadFormat};
use crate::import_cmd::{parse_kind, parse_timestamp};
use crate::proto;

/// Where a record came from: what a missing event id and timestamp are derived from.
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    /// The record's topic.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The record's own timestamp (create or log-append time), in ms.
    pub timestamp_ms: Option<i64>,
}

/// The kind every record of a topic carries: a fixed one, or the record's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicKind {
    /// Each record names its kind (`kind` in JSON, `kind`/`custom_kind` in protobuf).
    FromPayload,
    /// Every record is of this kind, whatever it says.
    Fixed(RawKind, String),
}

impl TopicKind {
    /// The kind a `source.kafka.topics` value names (`click`, `custom:NAME`, `payload`).
    pub fn parse(label: &str) -> Result<Self, String> {
        if label == KIND_FROM_PAYLOAD {
            return Ok(Self::FromPayload);
        }
        let (kind, custom) = parse_kind(label)?;
        Ok(Self::Fixed(kind, custom))
    }
}

/// The id of an event whose record carries none: its topic, partition and offset, so a
/// redelivered record gets the same id and is answered `DUPLICATE`. Longer than an
/// event id may be (a topic name may have 249 bytes), it is hashed.
pub fn derived_event_id(origin: &Origin<'_>) -> String {
    let plain = format!(
        "kafka:{}:{}:{}",
        origin.topic, origin.partition, origin.offset
    );
    if plain.len() <= reflex_core::types::MAX_ID_LEN {
        return plain;
    }
    format!(
        "kafka:{:016x}{:016x}:{}:{}",
        hash::hash_from(hash::FNV_OFFSET, origin.topic.as_bytes()),
        hash::hash_from(0x6c62_272e_07bb_0142, origin.topic.as_bytes()),
        origin.partition,
        origin.offset
    )
}

/// The JSON schema of a record; unknown fields are ignored. Ids may be strings or
/// integers; `timestamp` is Unix milliseconds (a number or a string of digits) or an
/// RFC 3339 date-time.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct JsonEvent {
    event_id: Option<Value>,
    user_id: Option<Value>,
    item_id: Option<Value>,
    kind: Option<String>,
    weight: Option<f64>,
    timestamp: Option<Value>,
    session_id: Option<Value>,
    value: Option<f64>,
    context: Option<BTreeMap<String, Value>>,
}

/// A JSON id or scalar as text: strings as they are, numbers and booleans printed.
fn text(field: &str, value: Option<Value>) -> Result<String, String> {
    match value {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(other) => Err(format!("{field} must be a string or a number, got {other}")),
    }
}

/// A JSON timestamp in ms: a number is Unix ms, a string is Unix ms or RFC 3339.
fn json_timestamp(value: Value) -> Result<Option<i64>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_i64() {
            Some(ms) => Ok(Some(ms)),
            None => match n.as_f64() {
                Some(ms) if ms.is_finite() && ms.abs() < 9.0e15 => Ok(Some(ms.round() as i64)),
                _ => Err(format!("timestamp {n} is not Unix milliseconds")),
            },
        },
        Value::String(s) => {
            let s = s.trim();
            if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
                return s
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("timestamp {s:?} is out of range"));
            }
            parse_timestamp(s).map(Some)
        }
        other => Err(format!(
            "timestamp must be Unix milliseconds or an RFC 3339 string, got {other}"
        )),
    }
}

/// Parses a JSON record into a raw event (validation is ingest's).
fn from_json(payload: &[u8]) -> Result<RawEvent, String> {
    let event: JsonEvent =
        serde_json::from_slice(payload).map_err(|e| format!("invalid JSON event: {e}"))?;
    let (kind, custom_kind) = match event.kind.as_deref() {
        None | Some("") => (None, String::new()),
        Some(label) => {
            let (kind, custom) = parse_kind(label)?;
            (Some(kind), custom)
        }
    };
    let mut context = BTreeMap::new();
    for (key, value) in event.context.unwrap_or_default() {
        let value = text(&format!("context.{key}"), Some(value))?;
        context.insert(key, value);
    }
    Ok(RawEvent {
        event_id: text("event_id", event.event_id)?,
        user_id: text("user_id", event.user_id)?,
        item_id: text("item_id", event.item_id)?,
        kind,
        custom_kind,
        weight: event.weight,
        timestamp_ms: match event.timestamp {
            Some(ts) => json_timestamp(ts)?,
            None => None,
        },
        timestamp_nanos: None,
        session_id: text("session_id", event.session_id)?,
        value: event.value,
        context,
    })
}

/// Parses one record into a raw event: decodes it in `format`, imposes the topic's
/// kind, and fills a missing event id (from topic, partition and offset) and a missing
/// timestamp (from the record's). The error is the reason for the dead-letter topic.
pub fn parse(
    format: PayloadFormat,
    kind: &TopicKind,
    payload: Option<&[u8]>,
    origin: &Origin<'_>,
) -> Result<RawEvent, String> {
    let payload = payload.ok_or("the record has no value")?;
    let mut raw = match format {
        PayloadFormat::Json => from_json(payload)?,
        PayloadFormat::Protobuf => crate::convert::raw_event(
            proto::Event::decode(payload)
                .map_err(|e| format!("invalid protobuf reflex.v1.Event: {e}"))?,
        ),
    };
    if let TopicKind::Fixed(fixed, custom) = kind {
        raw.kind = Some(*fixed);
        raw.custom_kind.clone_from(custom);
    }
    if raw.event_id.is_empty() {
        raw.event_id = derived_event_id(origin);
    }
    if raw.timestamp_ms.is_none() {
        raw.timestamp_ms = origin.timestamp_ms;
        raw.timestamp_nanos = None;
    }
    Ok(raw)
}

/// The label of a raw kind (`click`, `custom:NAME`); `None` when unset.
pub fn kind_label(raw: &RawEvent) -> Option<String> {
    Some(match raw.kind? {
        RawKind::View => EventKind::View.label(),
        RawKind::Click => EventKind::Click.label(),
        RawKind::AddToCart => EventKind::AddToCart.label(),
        RawKind::RemoveFromCart => EventKind::RemoveFromCart.label(),
        RawKind::Purchase => EventKind::Purchase.label(),
        RawKind::Custom => format!("custom:{}", raw.custom_kind),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: Origin<'static> = Origin {
        topic: "user_clicks",
        partition: 3,
        offset: 42,
        timestamp_ms: Some(1_700_000_000_000),
    };

    fn json(text: &str, kind: &TopicKind) -> Result<RawEvent, String> {
        parse(PayloadFormat::Json, kind, Some(text.as_bytes()), &ORIGIN)
    }

    #[test]
    fn json_with_every_field_and_unknown_ones() -> Result<(), String> {
        let raw = json(
            r#"{"event_id":"e1","user_id":"u1","item_id":7,"kind":"purchase",
                "timestamp":"2026-11-28T10:00:00.5Z","session_id":"s1","value":12.5,
                "context":{"device":"ios","bot":false},"shop":"ignored"}"#,
            &TopicKind::FromPayload,
        )?;
        assert_eq!(raw.event_id, "e1");
        assert_eq!(raw.item_id, "7");
        assert_eq!(raw.kind, Some(RawKind::Purchase));
        assert_eq!(raw.timestamp_ms, Some(1_795_860_000_500));
        assert_eq!(raw.session_id, "s1");
        assert_eq!(raw.value, Some(12.5));
        assert_eq!(raw.context.get("bot").map(String::as_str), Some("false"));
        Ok(())
    }

    #[test]
    fn missing_id_and_timestamp_come_from_the_record() -> Result<(), String> {
        let raw = json(
            r#"{"user_id":"u1","item_id":"i1"}"#,
            &TopicKind::parse("click")?,
        )?;
        assert_eq!(raw.event_id, "kafka:user_clicks:3:42");
        assert_eq!(raw.timestamp_ms, ORIGIN.timestamp_ms);
        assert_eq!(raw.kind, Some(RawKind::Click));
        let ms = json(r#"{"timestamp":1764324000123}"#, &TopicKind::FromPayload)?;
        assert_eq!(ms.timestamp_ms, Some(1_764_324_000_123));
        let text_ms = json(r#"{"timestamp":"1764324000123"}"#, &TopicKind::FromPayload)?;
        assert_eq!(text_ms.timestamp_ms, Some(1_764_324_000_123));
        Ok(())
    }

    #[test]
    fn a_topic_kind_overrides_the_record_and_custom_kinds_parse() -> Result<(), String> {
        let raw = json(
            r#"{"user_id":"u","item_id":"i","kind":"view"}"#,
            &TopicKind::parse("custom:wishlist")?,
        )?;
        assert_eq!(raw.kind, Some(RawKind::Custom));
        assert_eq!(raw.custom_kind, "wishlist");
        assert_eq!(kind_label(&raw).as_deref(), Some("custom:wishlist"));
        Ok(())
    }

    #[test]
    fn unparseable_records_say_why() {
        let reason = |text: &str| {
            json(text, &TopicKind::FromPayload)
                .err()
                .unwrap_or_default()
        };
        assert!(reason("not json").contains("invalid JSON event"));
        assert!(reason(r#"{"kind":"teleport"}"#).contains("teleport"));
        assert!(reason(r#"{"timestamp":"yesterday"}"#).contains("RFC 3339"));
        assert!(reason(r#"{"user_id":{"a":1}}"#).contains("user_id"));
        let none = parse(PayloadFormat::Json, &TopicKind::FromPayload, None, &ORIGIN);
        assert!(none.is_err());
    }

    #[test]
    fn protobuf_records_decode_and_long_topics_hash() -> Result<(), String> {
        let event = proto::Event {
            user_id: "u1".into(),
            item_id: "i1".into(),
            kind: proto::EventKind::AddToCart as i32,
            ..Default::default()
        };
        let bytes = prost::Message::encode_to_vec(&event);
        let raw = parse(
            PayloadFormat::Protobuf,
            &TopicKind::FromPayload,
            Some(&bytes),
            &ORIGIN,
        )?;
        assert_eq!(raw.kind, Some(RawKind::AddToCart));
        assert_eq!(raw.event_id, "kafka:user_clicks:3:42");
        let garbage = parse(
            PayloadFormat::Protobuf,
            &TopicKind::FromPayload,
            Some(&[0xff, 0xff, 0xff]),
            &ORIGIN,
        );
        assert!(garbage.is_err_and(|e| e.contains("protobuf")));
        let long = "t".repeat(200);
        let id = derived_event_id(&Origin {
            topic: &long,
            ..ORIGIN
        });
        assert!(id.len() <= reflex_core::types::MAX_ID_LEN, "{id}");
        assert_ne!(id, derived_event_id(&ORIGIN));
        Ok(())
    }
}
