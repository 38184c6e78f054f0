//! Load shedding: limits on concurrent calls and on open event streams, refused at once
//! with retry advice.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tower::Layer;

use super::{
    Answer, HEALTH_PREFIX, Inner, Intercept, Intercepted, STREAM_PATH, status_response,
    with_pushback,
};
use crate::metrics::Metrics;

/// Load shedding: at most `max_concurrent` calls run at once across all connections, and
/// at most `max_streams` event streams are open at once; one more of either is refused at
/// once with `RESOURCE_EXHAUSTED` and retry advice (`grpc-retry-pushback-ms`) instead of
/// queueing without bound. Health checks are exempt.
///
/// A call holds its concurrency permit until its response starts, which for an event
/// stream is almost at once; so a stream also takes a stream permit, which travels with
/// its response body and is released when the body is dropped: when the stream ends, the
/// client cancels it or its connection goes away.
#[derive(Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    max: usize,
    streams: Arc<Semaphore>,
    max_streams: usize,
    pushback_ms: u64,
    metrics: Arc<Metrics>,
}

impl AdmissionLayer {
    /// Admits `max_concurrent` calls and `max_streams` open event streams at once,
    /// advising a retry after `pushback_ms`.
    pub fn new(
        max_concurrent: usize,
        max_streams: usize,
        pushback_ms: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            max: max_concurrent,
            streams: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            pushback_ms,
            metrics,
        }
    }

    /// The refusal at a limit, counted under `reason`.
    fn refuse(&self, reason: &str, message: String) -> Status {
        self.metrics.load_shed.with_label_values(&[reason]).inc();
        with_pushback(Status::resource_exhausted(message), self.pushback_ms)
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Intercepted::new(inner, self.clone())
    }
}

/// The service of [`AdmissionLayer`].
pub type Admission<S> = Intercepted<S, AdmissionLayer>;

/// One open event stream's place under `limits.max_streams`, counted in
/// `reflex_open_streams` while it lives.
struct StreamPermit {
    _permit: OwnedSemaphorePermit,
    open: prometheus::IntGauge,
}

impl StreamPermit {
    fn new(permit: OwnedSemaphorePermit, open: prometheus::IntGauge) -> Self {
        open.inc();
        Self {
            _permit: permit,
            open,
        }
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A response body that holds a [`StreamPermit`] until hyper drops it, which it does
/// when the stream has sent its trailers, was reset by the client, or lost its connection.
struct WithPermit<B> {
    inner: B,
    _permit: StreamPermit,
}

impl<B: http_body::Body + Unpin> http_body::Body for WithPermit<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S: Inner<B, tonic::body::Body>, B> Intercept<S, B, tonic::body::Body> for AdmissionLayer {
    fn intercept(&self, inner: &mut S, request: Request<B>) -> Answer<S, B> {
        let path = request.uri().path();
        if path.starts_with(HEALTH_PREFIX) {
            return Box::pin(inner.call(request));
        }
        let stream_permit = if path == STREAM_PATH {
            let Ok(permit) = self.streams.clone().try_acquire_owned() else {
                let status = self.refuse(
                    "streams",
                    format!(
                        "server is at its limit of {} open event streams; retry after {} ms \
                         with backoff",
                        self.max_streams, self.pushback_ms
                    ),
                );
                return Box::pin(async move { Ok(status_response(status)) });
            };
            Some(StreamPermit::new(permit, self.metrics.open_streams.clone()))
        } else {
            None
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let status = self.refuse(
                "calls",
                format!(
                    "server is at its limit of {} concurrent calls; retry after {} ms with \
                     backoff",
                    self.max, self.pushback_ms
                ),
            );
            return Box::pin(async move { Ok(status_response(status)) });
        };
        let call = inner.call(request);
        Box::pin(async move {
            let result = call.await;
            drop(permit);
            match (result, stream_permit) {
                (Ok(response), Some(stream)) => Ok(response.map(|inner| {
                    tonic::body::Body::new(WithPermit {
                        inner,
                        _permit: stream,
                    })
                })),
                (result, _) => result,
            }
        })
    }
}
