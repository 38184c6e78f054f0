//! The rewrite of tonic's status for an oversize request message to
//! `RESOURCE_EXHAUSTED`.

use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

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

#[cfg(test)]
mod tests {
    use super::*;

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
