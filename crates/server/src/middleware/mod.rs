//! `tower` layers around the gRPC services, composed in one `ServiceBuilder` by
//! [`crate::app`]: metrics outermost, then deadlines, load shedding, authentication, and
//! the oversize-message status fix next to the services.
//!
//! Layout, one file per layer:
//! - `call_metrics`: [`GrpcMetricsLayer`], calls by method and code, calls in flight
//! - `deadline`: [`DeadlineLayer`], the client's `grpc-timeout` capped for unary calls
//! - `admission`: [`AdmissionLayer`], the call and stream limits
//! - `auth`: [`AuthLayer`] and its settings, API keys with scopes
//! - `oversize`: [`OversizeAsResourceExhausted`], tonic's oversize status rewritten
//! - `startup`: [`WhenReady`] and [`Startup`], services that refuse calls until the
//!   engine is recovered
//!
//! The layers that answer with a boxed future share their `Service` half,
//! [`Intercepted`]: each only says what it does with one call ([`Intercept`]).

mod admission;
mod auth;
mod call_metrics;
mod deadline;
mod oversize;
mod startup;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tower::Service;

pub use self::admission::{Admission, AdmissionLayer};
pub use self::auth::{ApiKey, Auth, AuthConfig, AuthLayer, Scope};
pub use self::call_metrics::{GrpcMetrics, GrpcMetricsLayer};
pub use self::deadline::{Deadline, DeadlineLayer};
pub use self::oversize::{OversizeAsResourceExhausted, OversizeService};
pub use self::startup::{Startup, WhenReady};

/// The future of an intercepted call.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The path of the one long-lived call, which a server-side cap must not cut short.
const STREAM_PATH: &str = "/reflex.v1.EventService/Stream";
/// Health checks stay answerable under overload and without a key, so probes work.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

fn status_response<RB: Default>(status: Status) -> Response<RB> {
    status.into_http()
}

/// `status` with retry advice: `grpc-retry-pushback-ms`, as gRPC clients read it.
fn with_pushback(mut status: Status, pushback_ms: u64) -> Status {
    if let Ok(v) = pushback_ms.to_string().parse() {
        status.metadata_mut().insert("grpc-retry-pushback-ms", v);
    }
    status
}

/// A service an intercepting layer can wrap: it answers HTTP responses (whose body can
/// be an error status's), with a future that can be boxed.
pub trait Inner<B, RB: Default + Send + 'static>:
    Service<Request<B>, Response = Response<RB>, Future: Send + 'static>
{
}

impl<S, B, RB> Inner<B, RB> for S
where
    S: Service<Request<B>, Response = Response<RB>, Future: Send + 'static>,
    RB: Default + Send + 'static,
{
}

/// The answer of an intercepted call to `S`.
pub type Answer<S, B> =
    BoxFuture<Result<<S as Service<Request<B>>>::Response, <S as Service<Request<B>>>::Error>>;

/// What a layer does with one call: look at the request, then answer at once or call
/// `inner` and work on its future. The layer's settings are the interceptor itself.
pub trait Intercept<S: Inner<B, RB>, B, RB: Default + Send + 'static> {
    /// Handles `request`, calling `inner` (which is ready) at most once.
    fn intercept(&self, inner: &mut S, request: Request<B>) -> Answer<S, B>;
}

/// The service of a layer `L` that intercepts calls to `S` ([`Intercept`]); it is ready
/// when `S` is.
#[derive(Clone, Debug)]
pub struct Intercepted<S, L> {
    inner: S,
    layer: L,
}

impl<S, L> Intercepted<S, L> {
    /// `inner` with its calls intercepted by `layer`.
    fn new(inner: S, layer: L) -> Self {
        Self { inner, layer }
    }
}

impl<S, L, B, RB> Service<Request<B>> for Intercepted<S, L>
where
    S: Service<Request<B>, Response = Response<RB>, Future: Send + 'static>,
    RB: Default + Send + 'static,
    L: Intercept<S, B, RB>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.layer.intercept(&mut self.inner, request)
    }
}
