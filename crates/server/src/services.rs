//! The tonic service implementations: thin adapters that validate, call the engine and
//! convert the answer.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use reflex_core::{Engine, EventOutcome, RawEvent};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::convert;
use crate::metrics::Metrics;
use crate::proto;
use crate::proto::catalog_service_server::CatalogService;
use crate::proto::event_service_server::EventService;
use crate::proto::model_service_server::ModelService;
use crate::proto::profile_service_server::ProfileService;
use crate::proto::recommend_service_server::RecommendService;
use crate::refit::Refitter;

/// Runs a model change (snapshot, rollback, refit) as a task of its own and waits for it:
/// a call dropped at its deadline, or by a client that hung up, never stops one halfway
/// (a rollback installed but not recorded, a refit installed without the log since its
/// fit replayed into it). The change then finishes and is logged as usual.
pub(crate) async fn to_the_end<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work)
        .await
        .map_err(|err| Status::internal(format!("the model change failed: {err}")))
}

/// Acks a stream may have queued for a slow reader before ingest of that stream waits:
/// bounded so a client that stops reading cannot grow server memory.
const ACK_QUEUE: usize = 16;

/// Hands accepted events on (the Kafka sink, `sink.kafka`): called after every ingest,
/// before its answer, so an ingest whose events were not handed on is not acknowledged.
#[tonic::async_trait]
pub trait EventMirror: Send + Sync {
    /// Hands on the events of `events` whose outcome is `Accepted` or `Duplicate` (a
    /// duplicate may be the retry of an ingest whose mirror failed); an error says the
    /// broker did not confirm them all.
    async fn mirror(&self, events: &[RawEvent], outcomes: &[EventOutcome]) -> Result<(), String>;
}

/// Counts one ingested batch's outcomes (`reflex_ingest_events_total`) and, for accepted
/// events with a timestamp, their freshness; shared by the gRPC stream and the Kafka
/// source.
pub fn record_outcomes(metrics: &Metrics, outcomes: &[EventOutcome], event_times: &[Option<i64>]) {
    let applied_ms = reflex_core::types::now_ms();
    let (mut accepted, mut duplicate, mut rejected, mut filtered) = (0u64, 0u64, 0u64, 0u64);
    for (outcome, ts) in outcomes.iter().zip(event_times) {
        match outcome {
            EventOutcome::Accepted => {
                accepted += 1;
                if let Some(ts) = ts {
                    metrics
                        .freshness_seconds
                        .observe((applied_ms - ts).max(0) as f64 / 1000.0);
                }
            }
            EventOutcome::Duplicate => duplicate += 1,
            EventOutcome::Rejected(_) => rejected += 1,
            EventOutcome::Filtered(_) => filtered += 1,
        }
    }
    for (status, n) in [
        ("accepted", accepted),
        ("duplicate", duplicate),
        ("rejected", rejected),
        ("filtered", filtered),
    ] {
        if n > 0 {
            metrics.ingest_events.with_label_values(&[status]).inc_by(n);
        }
    }
}

/// Implements all four Reflex services over one engine.
#[derive(Clone)]
pub struct Reflex {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    /// Where accepted events are mirrored, when a sink is configured.
    mirror: Option<Arc<dyn EventMirror>>,
    /// Turns true when the server drains: event streams finish the batch in hand, ack
    /// it, and end cleanly instead of reading more.
    draining: watch::Receiver<bool>,
    /// This replica's name, recorded with the model versions it takes.
    replica: Arc<str>,
    /// Runs `ModelService.Refit`; `None` where refits are not wired (tests of other parts).
    refitter: Option<Arc<Refitter>>,
}

impl Reflex {
    /// Services over `engine`, recording into `metrics`, draining when `draining` turns true.
    pub fn new(
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        draining: watch::Receiver<bool>,
        replica: Arc<str>,
    ) -> Self {
        Self {
            engine,
            metrics,
            mirror: None,
            draining,
            replica,
            refitter: None,
        }
    }

    /// The same services, answering `ModelService.Refit` with `refitter`.
    pub fn with_refitter(mut self, refitter: Arc<Refitter>) -> Self {
        self.refitter = Some(refitter);
        self
    }

    /// Mirrors every accepted event of the event stream to `mirror` before its ack.
    #[must_use]
    pub fn with_mirror(mut self, mirror: Option<Arc<dyn EventMirror>>) -> Self {
        self.mirror = mirror;
        self
    }
}

#[tracing::instrument(
    name = "ingest",
    skip_all,
    fields(batch = request.sequence, events = request.events.len())
)]
async fn ingest(
    engine: &Engine,
    metrics: &Metrics,
    mirror: Option<&dyn EventMirror>,
    request: proto::IngestRequest,
) -> Result<proto::IngestResponse, Status> {
    let started = Instant::now();
    let proto::IngestRequest { sequence, events } = request;
    let mut ids = Vec::with_capacity(events.len());
    let mut raw = Vec::with_capacity(events.len());
    for event in events {
        ids.push(event.event_id.clone());
        raw.push(convert::raw_event(event));
    }
    let event_times: Vec<Option<i64>> = raw.iter().map(|r| r.timestamp_ms).collect();
    // The mirror needs the events after ingest has taken them.
    let kept = mirror.map(|_| raw.clone());
    let outcomes = engine.ingest(raw).await.map_err(convert::status)?;
    record_outcomes(metrics, &outcomes, &event_times);
    if let (Some(mirror), Some(kept)) = (mirror, kept)
        && let Err(err) = mirror.mirror(&kept, &outcomes).await
    {
        // Applied but not handed on: the client's retry is answered DUPLICATE and
        // mirrored then.
        warn!(batch = sequence, error = %err, "mirroring the batch failed");
        return Err(Status::unavailable(format!(
            "the batch was recorded but not mirrored to the sink ({err}); retry it"
        )));
    }
    let ack = convert::ack(sequence, ids, outcomes);
    metrics
        .ingest_batch_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(ack)
}

/// What an event stream answers when reading its next batch failed: `None` when the
/// client cancelled (it reads nothing more), otherwise the status that ends the stream.
/// An undecodable message is the client's fault (`INVALID_ARGUMENT`, naming the last
/// batch that was read); other transport failures keep their code.
fn inbound_failure(status: Status, last_seq: Option<u64>) -> Option<Status> {
    let after = match last_seq {
        Some(seq) => format!("after batch {seq}"),
        None => "before any batch".to_owned(),
    };
    match status.code() {
        Code::Cancelled => {
            debug!(%status, "event stream cancelled by the client");
            None
        }
        Code::Internal if status.message().contains("decode") => {
            warn!(%status, after, "undecodable message on an event stream, ending it");
            Some(Status::invalid_argument(format!(
                "undecodable message on the event stream {after}: {}; later batches were not applied",
                status.message()
            )))
        }
        _ => {
            warn!(%status, after, "event stream failed, ending it");
            Some(Status::new(
                status.code(),
                format!("event stream failed {after}: {}", status.message()),
            ))
        }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<proto::IngestResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for Reflex {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<proto::IngestRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(ACK_QUEUE);
        let engine = self.engine.clone();
        let metrics = self.metrics.clone();
        let mirror = self.mirror.clone();
        let mut draining = self.draining.clone();
        tokio::spawn(async move {
            // Batches of one stream are applied one after another, so acks come back in
            // order; different streams run concurrently.
            let mut last_seq: Option<u64> = None;
            loop {
                if *draining.borrow() {
                    debug!("server draining, ending the event stream");
                    break;
                }
                let next = tokio::select! {
                    next = inbound.next() => next,
                    changed = draining.changed() => {
                        if changed.is_err() {
                            break; // the server is gone
                        }
                        continue;
                    }
                };
                let Some(next) = next else { break };
                let batch = match next {
                    Ok(batch) => batch,
                    Err(status) if status.message().contains("message length too large") => {
                        // Tonic says OUT_OF_RANGE; the API promises RESOURCE_EXHAUSTED.
                        let _ = tx
                            .send(Err(Status::resource_exhausted(status.message())))
                            .await;
                        break;
                    }
                    Err(status) => {
                        // A client that cancels or resets the stream is gone and reads
                        // nothing; anything else (an undecodable frame, a protocol error)
                        // ends the stream with an error status, never OK, so the client
                        // can tell that its later batches were not applied.
                        if let Some(status) = inbound_failure(status, last_seq) {
                            let _ = tx.send(Err(status)).await;
                        }
                        break;
                    }
                };
                let seq = batch.sequence;
                last_seq = Some(seq);
                let result = ingest(&engine, &metrics, mirror.as_deref(), batch).await;
                let failed = result.is_err();
                if let Err(status) = &result {
                    warn!(batch = seq, %status, "batch refused, closing the stream");
                }
                if tx.send(result).await.is_err() {
                    debug!(batch = seq, "client went away before its ack");
                    break;
                }
                if failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ingest(
        &self,
        request: Request<proto::IngestRequest>,
    ) -> Result<Response<proto::IngestResponse>, Status> {
        ingest(
            &self.engine,
            &self.metrics,
            self.mirror.as_deref(),
            request.into_inner(),
        )
        .await
        .map(Response::new)
    }
}

#[tonic::async_trait]
impl RecommendService for Reflex {
    #[tracing::instrument(name = "recommend", skip_all)]
    async fn recommend(
        &self,
        request: Request<proto::RecommendRequest>,
    ) -> Result<Response<proto::RecommendResponse>, Status> {
        let proto::RecommendRequest {
            user_id,
            count,
            filter,
        } = request.into_inner();
        let started = Instant::now();
        let user = convert::user_id(&user_id)?;
        let filter = convert::filter(filter)?;
        let rec = self
            .engine
            .recommend(&user, count as usize, &filter)
            .await
            .map_err(convert::status)?;
        self.metrics
            .cache_requests
            .with_label_values(&[if rec.cached { "hit" } else { "miss" }])
            .inc();
        self.metrics
            .recommend_seconds
            .with_label_values(&["recommend"])
            .observe(started.elapsed().as_secs_f64());
        Ok(Response::new(convert::recommend_response(rec)))
    }

    #[tracing::instrument(name = "similar_items", skip_all)]
    async fn similar_items(
        &self,
        request: Request<proto::SimilarItemsRequest>,
    ) -> Result<Response<proto::SimilarItemsResponse>, Status> {
        let proto::SimilarItemsRequest {
            item_id,
            count,
            filter,
            space,
        } = request.into_inner();
        let started = Instant::now();
        let item = convert::item_id(&item_id)?;
        let filter = convert::filter(filter)?;
        let space = convert::similar_space(space)?;
        let rec = self
            .engine
            .similar_items(&item, count as usize, &filter, space)
            .await
            .map_err(convert::status)?;
        self.metrics
            .recommend_seconds
            .with_label_values(&["similar_items"])
            .observe(started.elapsed().as_secs_f64());
        Ok(Response::new(convert::similar_response(rec)))
    }
}

#[tonic::async_trait]
impl CatalogService for Reflex {
    async fn upsert_items(
        &self,
        request: Request<proto::UpsertItemsRequest>,
    ) -> Result<Response<proto::UpsertItemsResponse>, Status> {
        let proto::UpsertItemsRequest { items } = request.into_inner();
        let items = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| convert::item(item, &format!("items[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let upserted = self
            .engine
            .upsert_items(items)
            .await
            .map_err(convert::status)?;
        Ok(Response::new(proto::UpsertItemsResponse {
            upserted: upserted as u32,
        }))
    }

    async fn get_item(
        &self,
        request: Request<proto::GetItemRequest>,
    ) -> Result<Response<proto::Item>, Status> {
        let item = convert::item_id(&request.into_inner().item_id)?;
        let item = self.engine.item(&item).await.map_err(convert::status)?;
        Ok(Response::new(convert::item_to_proto(item)))
    }

    async fn delete_item(
        &self,
        request: Request<proto::DeleteItemRequest>,
    ) -> Result<Response<proto::DeleteItemResponse>, Status> {
        let item = convert::item_id(&request.into_inner().item_id)?;
        let deleted = self
            .engine
            .delete_item(&item)
            .await
            .map_err(convert::status)?;
        Ok(Response::new(proto::DeleteItemResponse { deleted }))
    }
}

#[tonic::async_trait]
impl ProfileService for Reflex {
    async fn get_profile(
        &self,
        request: Request<proto::GetProfileRequest>,
    ) -> Result<Response<proto::Profile>, Status> {
        let user = convert::user_id(&request.into_inner().user_id)?;
        match self.engine.profile(&user).await.map_err(convert::status)? {
            Some(profile) => Ok(Response::new(convert::profile(profile))),
            None => Err(Status::not_found(format!(
                "profile of user {user:?} not found"
            ))),
        }
    }

    async fn erase_profile(
        &self,
        request: Request<proto::EraseProfileRequest>,
    ) -> Result<Response<proto::EraseProfileResponse>, Status> {
        let user = convert::user_id(&request.into_inner().user_id)?;
        let erased = self
            .engine
            .erase_profile(&user)
            .await
            .map_err(convert::status)?;
        Ok(Response::new(proto::EraseProfileResponse { erased }))
    }
}

#[tonic::async_trait]
impl ModelService for Reflex {
    async fn list_versions(
        &self,
        _request: Request<proto::ListVersionsRequest>,
    ) -> Result<Response<proto::ListVersionsResponse>, Status> {
        let versions = self
            .engine
            .model_versions()
            .await
            .map_err(convert::status)?;
        Ok(Response::new(proto::ListVersionsResponse {
            versions: versions.into_iter().map(convert::model_version).collect(),
            serving: self.engine.model_version(),
        }))
    }

    async fn snapshot(
        &self,
        request: Request<proto::SnapshotRequest>,
    ) -> Result<Response<proto::ModelVersion>, Status> {
        let mut reason = request.into_inner().reason;
        if reason.is_empty() {
            "on-demand".clone_into(&mut reason);
        }
        let (engine, replica) = (self.engine.clone(), self.replica.clone());
        let version = to_the_end(async move { engine.snapshot(&reason, &replica).await })
            .await?
            .map_err(convert::status)?;
        Ok(Response::new(convert::model_version(version)))
    }

    async fn rollback(
        &self,
        request: Request<proto::RollbackRequest>,
    ) -> Result<Response<proto::ModelVersion>, Status> {
        let id = request.into_inner().version;
        let (engine, replica) = (self.engine.clone(), self.replica.clone());
        let metrics = self.metrics.clone();
        let version = to_the_end(async move {
            let version = engine.rollback(id, &replica).await;
            if version.is_ok() {
                metrics.rollbacks.with_label_values(&["manual"]).inc();
            }
            version
        })
        .await?
        .map_err(convert::status)?;
        Ok(Response::new(convert::model_version(version)))
    }

    async fn get_quality(
        &self,
        _request: Request<proto::GetQualityRequest>,
    ) -> Result<Response<proto::GetQualityResponse>, Status> {
        Ok(Response::new(quality_response(&self.engine.quality())))
    }

    async fn refit(
        &self,
        request: Request<proto::RefitRequest>,
    ) -> Result<Response<proto::RefitResponse>, Status> {
        let install_anyway = request.into_inner().install_anyway;
        let Some(refitter) = &self.refitter else {
            return Err(Status::failed_precondition(
                "refits are not available on this server",
            ));
        };
        let (refitter, replica) = (refitter.clone(), self.replica.clone());
        let metrics = self.metrics.clone();
        let report = to_the_end(async move {
            let report = refitter.run(true, install_anyway, &replica).await;
            let outcome = report.as_ref().map_or("failed", |r| r.outcome.label());
            metrics.refits.with_label_values(&[outcome]).inc();
            report
        })
        .await?
        .map_err(|err| Status::internal(format!("refit failed: {err:#}")))?;
        Ok(Response::new(proto::RefitResponse {
            outcome: report.outcome.label().to_owned(),
            holdout_users: report.holdout_cases as u64,
            candidate_hit_rate_at_10: report.candidate.hit_rate(),
            running_hit_rate_at_10: report.running.hit_rate(),
            events: report.events,
            version: report.version.map(convert::model_version),
            item_item_sources: report.item_item_sources as u64,
        }))
    }
}

/// The quality report on the wire.
fn quality_response(r: &reflex_core::QualityReport) -> proto::GetQualityResponse {
    let figures = |f: &reflex_core::quality::Figures| proto::QualityFigures {
        hit_rate_at_10: f.hit_rate_at_10,
        recall_at_20: f.recall_at_20,
    };
    let population = |p: &reflex_core::quality::PopulationQuality| proto::PopulationQuality {
        decayed: Some(figures(&p.decayed)),
        cumulative: Some(figures(&p.cumulative)),
        events_scored: p.scored,
    };
    proto::GetQualityResponse {
        all: Some(population(&r.all)),
        holdout: Some(population(&r.holdout)),
        events_scored: r.all.scored,
        baseline: r.baseline.map(|b| proto::QualityBaseline {
            version: b.version,
            hit_rate_at_10: b.hit_rate_at_10,
            threshold: r.threshold.unwrap_or_default(),
        }),
        events_below: r.below_for,
        auto_rollback_armed: r.armed,
        samples_dropped: r.dropped,
        samples_cold: r.cold,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    /// A model change whose call is given up (its future dropped, as at a deadline)
    /// still runs to the end.
    #[tokio::test]
    async fn a_model_change_finishes_when_its_call_is_dropped() {
        let done = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let call = to_the_end({
            let done = done.clone();
            async move {
                let _ = started_tx.send(());
                tokio::time::sleep(Duration::from_millis(50)).await;
                done.store(true, Ordering::SeqCst);
            }
        });
        let given_up = tokio::time::timeout(Duration::from_millis(1), async {
            tokio::join!(call, async {
                let _ = started_rx.await;
            })
        })
        .await;
        assert!(
            given_up.is_err(),
            "the call was dropped before the change ended"
        );
        assert!(!done.load(Ordering::SeqCst));
        for _ in 0..200 {
            if done.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the change stopped with its call");
    }
}
