//! Services that exist before the engine they need: they refuse calls `UNAVAILABLE`
//! with retry advice until the engine is recovered, then forward.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::Status;
use tower::Service;

use super::{status_response, with_pushback};

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
        let status = Status::unavailable(format!(
            "starting: {what}; retry after {} ms with backoff",
            self.pushback_ms
        ));
        with_pushback(status, self.pushback_ms)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
