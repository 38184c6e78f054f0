//! `tower` layers around the gRPC services, composed in one `ServiceBuilder` by
//! [`crate::app`]: metrics outermost, then deadlines, load shedding, authentication, and
//! the oversize-message status fix next to the services.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Request, Response};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tower::{Layer, Service};

use crate::metrics::Metrics;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What tonic says when a request message is over `max_decoding_message_size`.
const TOO_LARGE: &str = "decoded message length too large";

/// Answers an oversize request message with `RESOURCE_EXHAUSTED`, as the API promises,
/// where tonic itself says `OUT_OF_RANGE`. Streams get the same treatment in the event
/// service, which sees the error itself; this layer covers unary calls, whose request
/// tonic decodes before any handler runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct OversizeAsResourceExhausted;

impl<S> Layer<S> for OversizeAsResourceExhausted {
    type Service = OversizeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizeService { inner }
    }
}

/// The service of [`OversizeAsResourceExhausted`].
#[derive(Clone, Debug)]
pub struct OversizeService<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for OversizeService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = futures_util::future::MapOk<S::Future, fn(Response<RB>) -> Response<RB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        use futures_util::TryFutureExt;
        self.inner.call(request).map_ok(rewrite as fn(_) -> _)
    }
}

fn rewrite<RB>(mut response: Response<RB>) -> Response<RB> {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() == b"11");
    let too_large = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| {
            m.contains(TOO_LARGE) || m.contains("decoded%20message%20length%20too%20large")
        });
    if out_of_range && too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
    response
}

/// The path of the one long-lived call, which a server-side cap must not cut short.
const STREAM_PATH: &str = "/reflex.v1.EventService/Stream";
/// Health checks stay answerable under overload and without a key, so probes work.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

fn status_response<RB: Default>(status: Status) -> Response<RB> {
    status.into_http()
}

/// Parses a `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Per-call deadlines: the client's `grpc-timeout`, capped by `max` for unary calls.
/// A call past its deadline is answered `DEADLINE_EXCEEDED` and its work dropped.
#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    /// Longest a unary call may run whatever the client asks.
    pub max: Duration,
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            max: self.max,
        }
    }
}

/// The service of [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    max: Duration,
}

impl<S, B, RB> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Tonic cancels a call at the client's own deadline from outside this layer, with
        // CANCELLED; ending a millisecond earlier answers the clearer DEADLINE_EXCEEDED.
        let client =
            grpc_timeout(request.headers()).map(|d| d.saturating_sub(Duration::from_millis(1)));
        let limit = if request.uri().path() == STREAM_PATH {
            client
        } else {
            Some(client.map_or(self.max, |c| c.min(self.max)))
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let Some(limit) = limit else {
                return call.await;
            };
            match tokio::time::timeout(limit, call).await {
                Ok(result) => result,
                Err(_) => Ok(status_response(Status::deadline_exceeded(format!(
                    "call exceeded its deadline of {} ms",
                    limit.as_millis()
                )))),
            }
        })
    }
}

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
        let mut status = Status::resource_exhausted(message);
        if let Ok(v) = self.pushback_ms.to_string().parse() {
            status.metadata_mut().insert("grpc-retry-pushback-ms", v);
        }
        status
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`AdmissionLayer`].
#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    layer: AdmissionLayer,
}

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

impl<S, B> Service<Request<B>> for Admission<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<tonic::body::Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let path = request.uri().path();
        if path.starts_with(HEALTH_PREFIX) {
            return Box::pin(self.inner.call(request));
        }
        let layer = &self.layer;
        let stream_permit = if path == STREAM_PATH {
            let Ok(permit) = layer.streams.clone().try_acquire_owned() else {
                let status = layer.refuse(
                    "streams",
                    format!(
                        "server is at its limit of {} open event streams; retry after {} ms \
                         with backoff",
                        layer.max_streams, layer.pushback_ms
                    ),
                );
                return Box::pin(async move { Ok(status_response(status)) });
            };
            Some(StreamPermit::new(
                permit,
                layer.metrics.open_streams.clone(),
            ))
        } else {
            None
        };
        let Ok(permit) = layer.permits.clone().try_acquire_owned() else {
            let status = layer.refuse(
                "calls",
                format!(
                    "server is at its limit of {} concurrent calls; retry after {} ms with \
                     backoff",
                    layer.max, layer.pushback_ms
                ),
            );
            return Box::pin(async move { Ok(status_response(status)) });
        };
        let call = self.inner.call(request);
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

/// What a starting server is waiting for, shared by its [`WhenReady`] services.
#[derive(Debug)]
pub struct Startup {
    /// The last attempt to open the store failed; it is being retried.
    store_unreachable: AtomicBool,
    /// Retry advice sent with the refusal, in ms.
    pushback_ms: u64,
}

impl Startup {
    /// A start that has not failed yet, advising retries after `pushback_ms`.
    pub fn new(pushback_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            store_unreachable: AtomicBool::new(false),
            pushback_ms,
        })
    }

    /// Records whether the store was unreachable at the last attempt.
    pub fn set_store_unreachable(&self, unreachable: bool) {
        self.store_unreachable.store(unreachable, Ordering::Relaxed);
    }

    /// The answer to a call that comes before the engine is ready.
    fn refusal(&self) -> Status {
        let what = if self.store_unreachable.load(Ordering::Relaxed) {
            "store not reachable yet"
        } else {
            "recovering state"
        };
        let mut status = Status::unavailable(format!(
            "starting: {what}; retry after {} ms with backoff",
            self.pushback_ms
        ));
        if let Ok(v) = self.pushback_ms.to_string().parse() {
            status.metadata_mut().insert("grpc-retry-pushback-ms", v);
        }
        status
    }
}

/// A gRPC service added to the server before the engine it needs exists: until
/// [`set`](Self::set) it answers every call `UNAVAILABLE` with retry advice, afterwards it
/// forwards to the service set. Once set, a call costs one atomic load (no lock).
pub struct WhenReady<S> {
    service: Arc<OnceLock<S>>,
    startup: Arc<Startup>,
}

impl<S> Clone for WhenReady<S> {
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
            startup: self.startup.clone(),
        }
    }
}

impl<S> WhenReady<S> {
    /// A service that refuses calls as `startup` says until it is set.
    pub fn new(startup: Arc<Startup>) -> Self {
        Self {
            service: Arc::new(OnceLock::new()),
            startup,
        }
    }

    /// Starts forwarding calls to `service`; only the first call has an effect.
    pub fn set(&self, service: S) {
        let _ = self.service.set(service);
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for WhenReady<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> Service<Request<B>> for WhenReady<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        tower::util::Oneshot<S, Request<B>>,
        futures_util::future::Ready<Result<Response<RB>, S::Error>>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The service's own readiness is awaited per call, by `oneshot`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        use futures_util::future::{Either, ready};
        use tower::ServiceExt as _;
        match self.service.get() {
            Some(service) => Either::Left(service.clone().oneshot(request)),
            None => Either::Right(ready(Ok(status_response(self.startup.refusal())))),
        }
    }
}

/// What an API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// `EventService`.
    Ingest,
    /// `RecommendService`.
    Recommend,
    /// Everything, including `CatalogService` and `ProfileService`.
    Admin,
}

/// One API key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Who holds it; logged instead of the key.
    pub name: String,
    /// The secret itself; never logged, masked by `reflex config`.
    pub key: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

/// Authentication settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require a key on every call but health checks and reflection.
    pub enabled: bool,
    /// Keys given inline (prefer `keys_file` or the environment for real secrets).
    pub keys: Vec<ApiKey>,
    /// A TOML file of `[[keys]]` tables with `name`, `key` and `scopes`.
    pub keys_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<ApiKey>,
}

impl AuthConfig {
    /// Every key: inline ones and those of `keys_file`.
    pub fn load_keys(&self) -> anyhow::Result<Vec<ApiKey>> {
        use anyhow::Context as _;
        let mut keys = self.keys.clone();
        if let Some(path) = &self.keys_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the API keys file {}", path.display()))?;
            let file: KeysFile = toml::from_str(&text)
                .with_context(|| format!("parsing the API keys file {}", path.display()))?;
            keys.extend(file.keys);
        }
        if let Some(bad) = keys.iter().find(|k| k.key.len() < 16) {
            anyhow::bail!("API key {:?} is shorter than 16 characters", bad.name);
        }
        Ok(keys)
    }
}

/// The scope a method needs; `None` for calls open to all (health, reflection).
fn required_scope(path: &str) -> Option<Scope> {
    if path.starts_with(HEALTH_PREFIX) || path.starts_with("/grpc.reflection.") {
        None
    } else if path.starts_with("/reflex.v1.EventService/") {
        Some(Scope::Ingest)
    } else if path.starts_with("/reflex.v1.RecommendService/") {
        Some(Scope::Recommend)
    } else {
        Some(Scope::Admin)
    }
}

struct Key {
    name: String,
    secret: Vec<u8>,
    scopes: HashSet<Scope>,
}

/// API keys with scopes, read from `x-api-key` or `authorization: Bearer …`: no key (or
/// an unknown one) is `UNAUTHENTICATED`, a key without the method's scope is
/// `PERMISSION_DENIED`. Every key is compared in constant time.
#[derive(Clone)]
pub struct AuthLayer {
    keys: Arc<Vec<Key>>,
}

impl AuthLayer {
    /// Checks calls against `keys`.
    pub fn new(keys: Vec<ApiKey>) -> Self {
        let keys = keys
            .into_iter()
            .map(|k| Key {
                name: k.name,
                secret: k.key.into_bytes(),
                scopes: k.scopes.into_iter().collect(),
            })
            .collect();
        Self {
            keys: Arc::new(keys),
        }
    }

    fn check(&self, headers: &HeaderMap, path: &str) -> Result<(), Status> {
        let Some(scope) = required_scope(path) else {
            return Ok(());
        };
        let presented = headers
            .get("x-api-key")
            .map(HeaderValue::as_bytes)
            .or_else(|| {
                headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            })
            .ok_or_else(|| Status::unauthenticated("an API key is required (x-api-key header)"))?;
        // Compare against every key so timing tells nothing about which one nearly matched.
        let mut found = None;
        for key in self.keys.iter() {
            if bool::from(key.secret.as_slice().ct_eq(presented)) {
                found = Some(key);
            }
        }
        let key = found.ok_or_else(|| Status::unauthenticated("unknown API key"))?;
        if key.scopes.contains(&scope) || key.scopes.contains(&Scope::Admin) {
            Ok(())
        } else {
            tracing::debug!(key = %key.name, ?scope, path, "key lacks scope");
            Err(Status::permission_denied(format!(
                "API key {:?} lacks the {scope:?} scope this method needs",
                key.name
            )))
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S, B, RB> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.layer.check(request.headers(), request.uri().path()) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => Box::pin(async move { Ok(status_response(status)) }),
        }
    }
}

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
        GrpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`GrpcMetricsLayer`].
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> Service<Request<B>> for GrpcMetrics<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let metrics = self.metrics.clone();
        metrics.grpc_inflight.inc();
        let started = Instant::now();
        let call = self.inner.call(request);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_timeout(&h), None);
        for (v, d) in [
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("2M", Duration::from_secs(120)),
        ] {
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            assert_eq!(grpc_timeout(&h), Some(d), "{v}");
        }
        h.insert("grpc-timeout", HeaderValue::from_static("5x"));
        assert_eq!(grpc_timeout(&h), None);
    }

    #[test]
    fn scopes_follow_services() {
        assert_eq!(required_scope("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_scope("/reflex.v1.EventService/Stream"),
            Some(Scope::Ingest)
        );
        assert_eq!(
            required_scope("/reflex.v1.RecommendService/Recommend"),
            Some(Scope::Recommend)
        );
        assert_eq!(
            required_scope("/reflex.v1.CatalogService/UpsertItems"),
            Some(Scope::Admin)
        );
    }

    #[test]
    fn auth_distinguishes_missing_unknown_and_unscoped_keys() {
        let auth = AuthLayer::new(vec![ApiKey {
            name: "shop".into(),
            key: "0123456789abcdef".into(),
            scopes: vec![Scope::Recommend],
        }]);
        let mut h = HeaderMap::new();
        let path = "/reflex.v1.RecommendService/Recommend";
        assert_eq!(
            auth.check(&h, path).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        h.insert("x-api-key", HeaderValue::from_static("0123456789abcdeX"));
        assert_eq!(
            auth.check(&h, path).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        h.insert("x-api-key", HeaderValue::from_static("0123456789abcdef"));
        assert!(auth.check(&h, path).is_ok());
        let err = auth
            .check(&h, "/reflex.v1.EventService/Stream")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            !err.message().contains("0123456789abcdef"),
            "never echo the key"
        );
        let mut bearer = HeaderMap::new();
        bearer.insert(
            "authorization",
            HeaderValue::from_static("Bearer 0123456789abcdef"),
        );
        assert!(auth.check(&bearer, path).is_ok());
        assert!(
            auth.check(&HeaderMap::new(), "/grpc.health.v1.Health/Check")
                .is_ok()
        );
    }

    #[tokio::test]
    async fn when_ready_refuses_until_set_then_forwards() {
        use tower::ServiceExt as _;
        let startup = Startup::new(250);
        let service = WhenReady::new(startup.clone());
        let call = |service: WhenReady<_>| async move {
            let response: Response<String> = service
                .oneshot(Request::new(()))
                .await
                .unwrap_or_else(|never: std::convert::Infallible| match never {});
            response
        };
        let refused = call(service.clone()).await;
        let status = tonic::Status::from_header_map(refused.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("recovering state"), "{status}");
        assert_eq!(refused.headers()["grpc-retry-pushback-ms"], "250");

        startup.set_store_unreachable(true);
        let refused = call(service.clone()).await;
        let status = tonic::Status::from_header_map(refused.headers()).unwrap();
        assert!(status.message().contains("store not reachable"), "{status}");

        service.set(tower::service_fn(|_: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new("served".to_string()))
        }));
        let served = call(service).await;
        assert!(tonic::Status::from_header_map(served.headers()).is_none());
        assert_eq!(served.body(), "served");
    }

    #[test]
    fn rewrites_only_oversize_out_of_range() {
        let status = tonic::Status::out_of_range(format!("Error, {TOO_LARGE}: found 9 bytes"));
        let response = rewrite(status.into_http::<()>());
        let again = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_eq!(again.code(), tonic::Code::ResourceExhausted);

        let other = tonic::Status::out_of_range("page 9 does not exist");
        let response = rewrite(other.into_http::<()>());
        let again = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_eq!(again.code(), tonic::Code::OutOfRange);
    }
}
