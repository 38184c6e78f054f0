//! Conversions between the protobuf API and the core domain, and the one mapping from
//! core errors to gRPC status codes.
//!
//! Protobuf messages are destructured exhaustively, so a new API field fails to compile
//! until it is handled here.

use std::sync::atomic::{AtomicU64, Ordering};

use prost_types::Timestamp;
use reflex_core::engine::{Recommendation, RequestFilter, ScoredItem, SimilarSpace, Source};
use reflex_core::profile::Profile;
use reflex_core::types::{EventKind, ItemId, RawEvent, RawKind, TimestampMs, UserId};
use reflex_core::{Error, ErrorCode, EventOutcome, Item};
use tonic::{Code, Status};

use crate::proto;

/// The retry advice (`grpc-retry-pushback-ms`) every `UNAVAILABLE` answer carries:
/// `limits.retry_pushback_ms`, set once at start-up by [`set_retry_pushback_ms`].
static RETRY_PUSHBACK_MS: AtomicU64 = AtomicU64::new(100);

/// Sets the retry advice of `UNAVAILABLE` answers (a full disk, a backend down).
pub fn set_retry_pushback_ms(ms: u64) {
    RETRY_PUSHBACK_MS.store(ms, Ordering::Relaxed);
}

/// Maps a core error to a gRPC status; the only place the mapping is made. An
/// `UNAVAILABLE` status carries retry advice (`grpc-retry-pushback-ms`), so clients back
/// off and retry instead of treating it as a bug.
pub fn status(err: Error) -> Status {
    let code = match err.code() {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::ResourceExhausted => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Internal => Code::Internal,
    };
    if code == Code::Internal {
        tracing::error!(error = %err, "internal error");
    }
    let mut status = Status::new(code, err.to_string());
    if code == Code::Unavailable
        && let Ok(v) = RETRY_PUSHBACK_MS
            .load(Ordering::Relaxed)
            .to_string()
            .parse()
    {
        status.metadata_mut().insert("grpc-retry-pushback-ms", v);
    }
    status
}

fn millis(ts: &Timestamp) -> TimestampMs {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos) / 1_000_000)
}

fn timestamp(ms: TimestampMs) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Turns a protobuf event into a raw event for validation by the engine.
pub fn raw_event(event: proto::Event) -> RawEvent {
    let proto::Event {
        event_id,
        user_id,
        item_id,
        kind,
        custom_kind,
        weight,
        timestamp,
        session_id,
        value,
        context,
    } = event;
    let kind = match proto::EventKind::try_from(kind) {
        Ok(proto::EventKind::View) => Some(RawKind::View),
        Ok(proto::EventKind::Click) => Some(RawKind::Click),
        Ok(proto::EventKind::AddToCart) => Some(RawKind::AddToCart),
        Ok(proto::EventKind::RemoveFromCart) => Some(RawKind::RemoveFromCart),
        Ok(proto::EventKind::Purchase) => Some(RawKind::Purchase),
        Ok(proto::EventKind::Custom) => Some(RawKind::Custom),
        Ok(proto::EventKind::Unspecified) | Err(_) => None,
    };
    RawEvent {
        event_id,
        user_id,
        item_id,
        kind,
        custom_kind,
        weight,
        timestamp_ms: timestamp.as_ref().map(millis),
        timestamp_nanos: timestamp.as_ref().map(|t| t.nanos),
        session_id,
        value,
        context,
    }
}

/// Builds the ack of one batch from the engine's outcomes.
pub fn ack(
    sequence: u64,
    event_ids: Vec<String>,
    outcomes: Vec<EventOutcome>,
) -> proto::IngestResponse {
    let mut ack = proto::IngestResponse {
        sequence,
        results: Vec::with_capacity(outcomes.len()),
        ..Default::default()
    };
    for (event_id, outcome) in event_ids.into_iter().zip(outcomes) {
        let (status, reason) = match outcome {
            EventOutcome::Accepted => {
                ack.accepted += 1;
                (proto::EventStatus::Accepted, String::new())
            }
            EventOutcome::Duplicate => {
                ack.duplicate += 1;
                (proto::EventStatus::Duplicate, String::new())
            }
            EventOutcome::Rejected(reason) => {
                ack.rejected += 1;
                (proto::EventStatus::Rejected, reason)
            }
            EventOutcome::Filtered(reason) => {
                ack.filtered += 1;
                (proto::EventStatus::Filtered, reason)
            }
        };
        ack.results.push(proto::EventResult {
            event_id,
            status: status as i32,
            reason,
        });
    }
    ack
}

/// Validates a user id from a request.
pub fn user_id(raw: &str) -> Result<UserId, Status> {
    UserId::parse(raw, "user_id").map_err(status)
}

/// Validates an item id from a request.
pub fn item_id(raw: &str) -> Result<ItemId, Status> {
    ItemId::parse(raw, "item_id").map_err(status)
}

/// Converts a request filter.
pub fn filter(filter: Option<proto::Filter>) -> Result<RequestFilter, Status> {
    let Some(proto::Filter {
        include_categories,
        exclude_categories,
        exclude_item_ids,
        exclude_purchased,
        exclude_seen,
    }) = filter
    else {
        return Ok(RequestFilter::default());
    };
    let exclude_items = exclude_item_ids
        .iter()
        .enumerate()
        .map(|(i, id)| ItemId::parse(id, &format!("filter.exclude_item_ids[{i}]")))
        .collect::<Result<_, _>>()
        .map_err(status)?;
    Ok(RequestFilter {
        include_categories,
        exclude_categories,
        exclude_items,
        exclude_purchased,
        exclude_seen,
    })
}

fn source(source: Source) -> proto::Source {
    match source {
        Source::Mf => proto::Source::Mf,
        Source::Content => proto::Source::Content,
        Source::Popular => proto::Source::Popular,
        Source::Similar => proto::Source::Similar,
        Source::Repeat => proto::Source::Repeat,
        Source::Sequence => proto::Source::Sequence,
    }
}

fn scored_items(items: Vec<ScoredItem>) -> Vec<proto::ScoredItem> {
    items
        .into_iter()
        .map(
            |ScoredItem {
                 item_id,
                 score,
                 source: s,
             }| proto::ScoredItem {
                item_id: item_id.as_str().to_owned(),
                score,
                source: source(s) as i32,
            },
        )
        .collect()
}

/// Converts a recommendation to the response.
pub fn recommend_response(rec: Recommendation) -> proto::RecommendResponse {
    let Recommendation {
        items,
        model_version,
        profile_version,
        degraded,
        cached: _,
    } = rec;
    proto::RecommendResponse {
        items: scored_items(items),
        model_version,
        profile_version,
        degraded,
    }
}

/// Reads `SimilarItemsRequest.space`.
pub fn similar_space(space: i32) -> Result<SimilarSpace, Status> {
    match proto::SimilarSpace::try_from(space) {
        Ok(proto::SimilarSpace::Unspecified) => Ok(SimilarSpace::Auto),
        Ok(proto::SimilarSpace::Mf) => Ok(SimilarSpace::Mf),
        Ok(proto::SimilarSpace::Content) => Ok(SimilarSpace::Content),
        Ok(proto::SimilarSpace::Sequence) => Ok(SimilarSpace::Sequence),
        Err(_) => Err(Status::invalid_argument(format!(
            "invalid space: {space} is not a SimilarSpace value"
        ))),
    }
}

/// Converts similar items to the response.
pub fn similar_response(rec: Recommendation) -> proto::SimilarItemsResponse {
    proto::SimilarItemsResponse {
        items: scored_items(rec.items),
        model_version: rec.model_version,
    }
}

/// Validates a catalog item from a request; `field` names it in errors.
pub fn item(item: proto::Item, field: &str) -> Result<Item, Status> {
    let proto::Item {
        item_id,
        title,
        categories,
        available,
        embedding,
    } = item;
    Ok(Item {
        item_id: ItemId::parse(&item_id, &format!("{field}.item_id")).map_err(status)?,
        title,
        categories,
        available: available.unwrap_or(true),
        embedding,
    })
}

/// Converts a catalog item to the API.
pub fn item_to_proto(item: Item) -> proto::Item {
    let Item {
        item_id,
        title,
        categories,
        available,
        embedding,
    } = item;
    proto::Item {
        item_id: item_id.as_str().to_owned(),
        title,
        categories,
        available: Some(available),
        embedding,
    }
}

fn kind(kind: &EventKind) -> (proto::EventKind, String) {
    match kind {
        EventKind::View => (proto::EventKind::View, String::new()),
        EventKind::Click => (proto::EventKind::Click, String::new()),
        EventKind::AddToCart => (proto::EventKind::AddToCart, String::new()),
        EventKind::RemoveFromCart => (proto::EventKind::RemoveFromCart, String::new()),
        EventKind::Purchase => (proto::EventKind::Purchase, String::new()),
        EventKind::Custom(name) => (proto::EventKind::Custom, name.to_string()),
    }
}

/// Converts a profile to the API.
pub fn profile(p: Profile) -> proto::Profile {
    let Profile {
        user_id,
        counts: _,
        custom_counts: _,
        recent,
        session,
        purchased,
        last_seen_ms,
        touched_ms: _,
        version,
    } = &p;
    let mut kind_counts = std::collections::BTreeMap::new();
    for k in [
        EventKind::View,
        EventKind::Click,
        EventKind::AddToCart,
        EventKind::RemoveFromCart,
        EventKind::Purchase,
    ] {
        let n = p.count(&k);
        if n > 0 {
            kind_counts.insert(k.label(), n);
        }
    }
    for (name, n) in &p.custom_counts {
        kind_counts.insert(EventKind::Custom(name.clone()).label(), *n);
    }
    proto::Profile {
        user_id: user_id.as_str().to_owned(),
        kind_counts,
        recent: recent
            .iter()
            .map(|i| {
                let (k, custom_kind) = kind(&p.kind_of(i));
                proto::Interaction {
                    item_id: i.item_id.as_str().to_owned(),
                    kind: k as i32,
                    custom_kind,
                    timestamp: Some(timestamp(i.timestamp_ms)),
                }
            })
            .collect(),
        session: session.as_ref().map(|s| proto::Session {
            session_id: s.session_id.to_string(),
            started: Some(timestamp(s.started_ms)),
            last_event: Some(timestamp(s.last_event_ms)),
            events: s.events,
        }),
        purchased_item_ids: purchased.iter().map(|i| i.as_str().to_owned()).collect(),
        last_seen: Some(timestamp(*last_seen_ms)),
        version: *version,
    }
}

/// A model version's metadata on the wire.
pub fn model_version(v: reflex_core::ModelVersion) -> proto::ModelVersion {
    proto::ModelVersion {
        id: v.id,
        created: Some(timestamp(v.created_ms)),
        log_seq: v.log_seq,
        events: v.events,
        items: v.items,
        bytes: v.bytes,
        reason: v.reason,
        taken_by: v.taken_by,
        quality: v.quality.map(|q| {
            let figures = |f: reflex_core::quality::Figures| proto::QualityFigures {
                hit_rate_at_10: f.hit_rate_at_10,
                recall_at_20: f.recall_at_20,
            };
            proto::VersionQuality {
                scored: q.scored,
                all_users: Some(figures(q.all)),
                holdout: Some(figures(q.holdout)),
                degraded: q.degraded,
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_epoch() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1, -1001] {
            assert_eq!(millis(&timestamp(ms)), ms);
        }
    }

    #[test]
    fn unknown_kind_numbers_become_none() {
        let raw = raw_event(proto::Event {
            kind: 99,
            ..Default::default()
        });
        assert_eq!(raw.kind, None);
        let raw = raw_event(proto::Event {
            kind: proto::EventKind::Purchase as i32,
            ..Default::default()
        });
        assert_eq!(raw.kind, Some(RawKind::Purchase));
    }

    #[test]
    fn error_codes_map_to_grpc() {
        assert_eq!(
            status(Error::invalid("x", "y")).code(),
            Code::InvalidArgument
        );
        assert_eq!(status(Error::NotFound("x".into())).code(), Code::NotFound);
        assert_eq!(
            status(Error::ResourceExhausted("x".into())).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            status(Error::unavailable("x", "y")).code(),
            Code::Unavailable
        );
        assert_eq!(status(Error::Internal("x".into())).code(), Code::Internal);
    }

    #[test]
    fn absent_availability_means_available() {
        let item = item(
            proto::Item {
                item_id: "a".into(),
                ..Default::default()
            },
            "items[0]",
        )
        .unwrap();
        assert!(item.available);
        let err = super::item(proto::Item::default(), "items[3]").unwrap_err();
        assert!(
            err.message().contains("items[3].item_id"),
            "{}",
            err.message()
        );
    }
}
