//! Call metrics: calls by method and code, and calls in flight.

use std::sync::Arc;
use std::time::Instant;

use http::Request;
use tower::Layer;

use super::{Answer, Inner, Intercept, Intercepted};
use crate::metrics::Metrics;

/// Counts calls by method and code and tracks calls in flight. The code is read from the
/// response head, which carries it for every refused or failed unary call; a stream that
/// fails after it started counts as `0` (its status travels in trailers).
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl GrpcMetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Intercepted::new(inner, self.clone())
    }
}

/// The service of [`GrpcMetricsLayer`].
pub type GrpcMetrics<S> = Intercepted<S, GrpcMetricsLayer>;

impl<S: Inner<B, RB>, B, RB: Default + Send + 'static> Intercept<S, B, RB> for GrpcMetricsLayer {
    fn intercept(&self, inner: &mut S, request: Request<B>) -> Answer<S, B> {
        let method = request.uri().path().to_owned();
        let metrics = self.metrics.clone();
        metrics.grpc_inflight.inc();
        let started = Instant::now();
        let call = inner.call(request);
        Box::pin(async move {
            let result = call.await;
            metrics.grpc_inflight.dec();
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Err(_) => "transport".to_owned(),
            };
            metrics
                .grpc_requests
                .with_label_values(&[method.as_str(), code.as_str()])
                .inc();
            tracing::trace!(%method, %code, elapsed_us = started.elapsed().as_micros() as u64, "call");
            result
        })
    }
}
