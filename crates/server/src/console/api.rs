//! The console's JSON API: every answer is a JSON object, and every refusal one with an
//! `error` message and the HTTP `status` (400 bad input, 401/403 key, 404 unknown,
//! 415 not JSON, 503 still starting). Input is validated before the engine sees it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State as Extract};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use reflex_core::{
    Engine, ErrorCode, EventKind, ItemId, ModelVersion, Profile, RequestFilter, ScoredItem,
    SimilarSpace, Source, UserId,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::history::{QualityPoint, STATUSES};
use super::{State, now_ms};
use crate::middleware::Scope;

type Shared = Extract<Arc<State>>;

/// Items a page shows when the request does not say.
const DEFAULT_COUNT: usize = 10;

/// A refusal, answered as `{"error": …, "status": …}`.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.message, "status": self.status.as_u16() });
        json_response(self.status, &body)
    }
}

/// The HTTP status of a core error; the console's counterpart of `convert::status`.
impl From<reflex_core::Error> for ApiError {
    fn from(err: reflex_core::Error) -> Self {
        let status = match err.code() {
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => {
                tracing::error!(error = %err, "console: internal error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self::new(status, err.to_string())
    }
}

type Answer = Result<Response, ApiError>;

fn ok(body: Value) -> Answer {
    Ok(json_response(StatusCode::OK, &body))
}

/// `body` as a JSON answer that no cache keeps.
fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// The engine, or 503 while the server is still recovering.
fn engine(state: &State) -> Result<&(Arc<Engine>, Arc<str>), ApiError> {
    state.engine.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is still starting (recovering its state)",
        )
    })
}

/// The path segment, or a 400 naming what is wrong with it.
fn segment(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(s)| s)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

/// `count` from the query string (default [`DEFAULT_COUNT`]); other parameters are ignored.
fn count(query: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("count="))
    else {
        return Ok(DEFAULT_COUNT);
    };
    match raw.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "count must be a whole number above 0, got {raw:?}"
        ))),
    }
}

fn source(source: Source) -> &'static str {
    match source {
        Source::Mf => "mf",
        Source::Content => "content",
        Source::Popular => "popular",
        Source::Similar => "similar",
        Source::Repeat => "repeat",
        Source::Sequence => "sequence",
    }
}

/// Scored items with their catalog titles (none for an item not in the catalog).
async fn scored(engine: &Engine, items: &[ScoredItem]) -> Vec<Value> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let title = engine.item(&item.item_id).await.ok().map(|i| i.title);
        out.push(json!({
            "item_id": item.item_id.as_str(),
            "title": title,
            "score": item.score,
            "source": source(item.source),
        }));
    }
    out
}

/// `GET /console/api/live`: totals now and a point per second of the last minutes.
pub(super) async fn live(Extract(state): Shared) -> Answer {
    let metrics = &state.metrics;
    let totals: serde_json::Map<String, Value> = STATUSES
        .iter()
        .map(|s| {
            let n = metrics.ingest_events.with_label_values(&[s]).get();
            ((*s).to_owned(), json!(n))
        })
        .collect();
    let points = state
        .history
        .lock()
        .map(|history| history.live())
        .unwrap_or_default();
    let engine = state.engine.get().map(|(engine, _)| engine);
    ok(json!({
        "now": now_ms(),
        "ready": engine.is_some(),
        "model_version": engine.map(|e| e.model_version()),
        "items": engine.map(|e| e.items().len()),
        "profiles": metrics.profiles.get(),
        "open_streams": metrics.open_streams.get(),
        "statuses": STATUSES,
        "totals": totals,
        "points": points,
    }))
}

fn version(v: &ModelVersion) -> Value {
    let figures = |f: &reflex_core::quality::Figures| json!({ "hr10": f.hit_rate_at_10, "recall20": f.recall_at_20 });
    json!({
        "id": v.id,
        "created_ms": v.created_ms,
        "log_seq": v.log_seq,
        "events": v.events,
        "items": v.items,
        "bytes": v.bytes,
        "reason": v.reason,
        "taken_by": v.taken_by,
        "quality": v.quality.map(|q| json!({
            "scored": q.scored,
            "all": figures(&q.all),
            "holdout": figures(&q.holdout),
            "degraded": q.degraded,
        })),
    })
}

/// `GET /console/api/model`: the serving version, the stored ones with their figures,
/// the quality now and its history.
pub(super) async fn model(Extract(state): Shared) -> Answer {
    let (engine, _) = engine(&state)?;
    let versions = engine.model_versions().await?;
    let report = engine.quality();
    let figures = |f: &reflex_core::quality::Figures| json!({ "hr10": f.hit_rate_at_10, "recall20": f.recall_at_20 });
    let population = |p: &reflex_core::quality::PopulationQuality| {
        json!({
            "decayed": figures(&p.decayed),
            "cumulative": figures(&p.cumulative),
            "scored": p.scored,
        })
    };
    let mut history = state
        .history
        .lock()
        .map(|history| history.quality())
        .unwrap_or_default();
    history.push(QualityPoint::of(&report, now_ms()));
    ok(json!({
        "serving": engine.model_version(),
        "rollback_needs_key": state.auth.is_some(),
        "quality": {
            "all": population(&report.all),
            "holdout": population(&report.holdout),
            "baseline": report.baseline.map(|b| json!({
                "version": b.version,
                "hr10": b.hit_rate_at_10,
            })),
            "threshold": report.threshold,
            "below_for": report.below_for,
            "armed": report.armed,
            "dropped": report.dropped,
            "cold": report.cold,
        },
        "history": history,
        "versions": versions.iter().map(version).collect::<Vec<_>>(),
    }))
}

fn profile(p: &Profile) -> Value {
    let mut counts = serde_json::Map::new();
    for kind in [
        EventKind::View,
        EventKind::Click,
        EventKind::AddToCart,
        EventKind::RemoveFromCart,
        EventKind::Purchase,
    ] {
        let n = p.count(&kind);
        if n > 0 {
            counts.insert(kind.label(), json!(n));
        }
    }
    for (name, n) in &p.custom_counts {
        counts.insert(EventKind::Custom(name.clone()).label(), json!(n));
    }
    json!({
        "version": p.version,
        "last_seen_ms": p.last_seen_ms,
        "counts": counts,
        "recent": p.recent.iter().map(|i| json!({
            "item_id": i.item_id.as_str(),
            "kind": p.kind_of(i).label(),
            "timestamp_ms": i.timestamp_ms,
            "weight": i.weight,
        })).collect::<Vec<_>>(),
        "session": p.session.as_ref().map(|s| json!({
            "session_id": &*s.session_id,
            "started_ms": s.started_ms,
            "last_event_ms": s.last_event_ms,
            "events": s.events,
        })),
        "purchased": p.purchased.iter().map(ItemId::as_str).collect::<Vec<_>>(),
    })
}

/// `GET /console/api/users/{user}?count=N`: the profile (`null` for a user without
/// one) and the current recommendations, as `Recommend` answers them.
pub(super) async fn user(
    Extract(state): Shared,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Answer {
    let user = UserId::parse(&segment(path)?, "user_id")?;
    let count = count(query.as_deref())?;
    let (engine, _) = engine(&state)?;
    let profile = engine.profile(&user).await?;
    let rec = engine
        .recommend(&user, count, &RequestFilter::default())
        .await?;
    ok(json!({
        "user_id": user.as_str(),
        "profile": profile.as_ref().map(self::profile),
        "recommendations": {
            "model_version": rec.model_version,
            "profile_version": rec.profile_version,
            "cached": rec.cached,
            "degraded": rec.degraded,
            "items": scored(engine, &rec.items).await,
        },
    }))
}

/// `GET /console/api/items/{item}?count=N`: the catalog entry (`null` for an item only
/// known from events) and its nearest items; 404 when neither knows it.
pub(super) async fn item(
    Extract(state): Shared,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Answer {
    let item = ItemId::parse(&segment(path)?, "item_id")?;
    let count = count(query.as_deref())?;
    let (engine, _) = engine(&state)?;
    let entry = match engine.item(&item).await {
        Ok(entry) => Some(entry),
        Err(err) if err.code() == ErrorCode::NotFound => None,
        Err(err) => return Err(err.into()),
    };
    let similar = match engine
        .similar_items(&item, count, &RequestFilter::default(), SimilarSpace::Auto)
        .await
    {
        Ok(rec) => Ok(scored(engine, &rec.items).await),
        Err(err) if err.code() == ErrorCode::NotFound => Err(err.to_string()),
        Err(err) => return Err(err.into()),
    };
    if entry.is_none() && similar.is_err() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "item {:?} is neither in the catalog nor known from events",
                item.as_str()
            ),
        ));
    }
    let (similar, similar_note) = match similar {
        Ok(items) => (items, None),
        Err(why) => (Vec::new(), Some(why)),
    };
    ok(json!({
        "item_id": item.as_str(),
        "catalog": entry.map(|i| json!({
            "title": i.title,
            "categories": i.categories,
            "available": i.available,
            "embedding_dim": i.embedding.len(),
        })),
        "similar": similar,
        "similar_note": similar_note,
    }))
}

/// The body of a rollback.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    /// The stored version to install.
    version: u64,
}

/// `POST /console/api/rollback` with `{"version": N}`: installs stored version N. With
/// `auth.enabled` the request must carry an API key with the `admin` scope
/// (`x-api-key` or `authorization: Bearer …`): 401 without a known key, 403 without
/// the scope. Only JSON bodies are taken, so a plain cross-site form cannot post one.
pub(super) async fn rollback(Extract(state): Shared, headers: HeaderMap, body: Bytes) -> Answer {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as JSON (content-type: application/json)",
        ));
    }
    if let Some(auth) = &state.auth {
        auth.authorize(&headers, Scope::Admin).map_err(|status| {
            let code = match status.code() {
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            ApiError::new(code, status.message())
        })?;
    }
    let body: RollbackBody = serde_json::from_slice(&body).map_err(|err| {
        ApiError::bad_request(format!("the body must be {{\"version\": N}}: {err}"))
    })?;
    let (engine, replica) = engine(&state)?;
    let installed = {
        let (engine, replica, metrics) = (engine.clone(), replica.clone(), state.metrics.clone());
        crate::services::to_the_end(async move {
            let installed = engine.rollback(body.version, &replica).await;
            if installed.is_ok() {
                metrics.rollbacks.with_label_values(&["manual"]).inc();
            }
            installed
        })
        .await
        .map_err(|status| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, status.message()))??
    };
    tracing::info!(
        to = body.version,
        version = installed.id,
        "rollback from the console"
    );
    ok(json!({
        "version": version(&installed),
        "serving": engine.model_version(),
    }))
}

/// Any other path under `/console/api/`.
pub(super) async fn no_such_endpoint() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such console API endpoint")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_defaults_and_refuses_what_is_not_a_positive_number() {
        assert_eq!(count(None).unwrap(), DEFAULT_COUNT);
        assert_eq!(count(Some("x=1")).unwrap(), DEFAULT_COUNT);
        assert_eq!(count(Some("x=1&count=25")).unwrap(), 25);
        for bad in ["count=0", "count=-1", "count=ten", "count="] {
            let err = count(Some(bad)).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
