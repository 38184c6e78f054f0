//! Per-call deadlines: the client's `grpc-timeout`, capped for unary calls.

use std::time::Duration;

use http::{HeaderMap, Request};
use tonic::Status;
use tower::Layer;

use super::{Answer, Inner, Intercept, Intercepted, STREAM_PATH, status_response};

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

/// Model changes that take as long as the model is big (a refit fits the whole log):
/// only the client's own deadline bounds them, and they run to the end even past it
/// ([`crate::services::to_the_end`]).
const LONG_PATHS: [&str; 3] = [
    "/reflex.v1.ModelService/Snapshot",
    "/reflex.v1.ModelService/Rollback",
    "/reflex.v1.ModelService/Refit",
];

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
        Intercepted::new(inner, *self)
    }
}

/// The service of [`DeadlineLayer`].
pub type Deadline<S> = Intercepted<S, DeadlineLayer>;

impl<S: Inner<B, RB>, B, RB: Default + Send + 'static> Intercept<S, B, RB> for DeadlineLayer {
    fn intercept(&self, inner: &mut S, request: Request<B>) -> Answer<S, B> {
        // Tonic cancels a call at the client's own deadline from outside this layer, with
        // CANCELLED; ending a millisecond earlier answers the clearer DEADLINE_EXCEEDED.
        let client =
            grpc_timeout(request.headers()).map(|d| d.saturating_sub(Duration::from_millis(1)));
        let limit =
            if request.uri().path() == STREAM_PATH || LONG_PATHS.contains(&request.uri().path()) {
                client
            } else {
                Some(client.map_or(self.max, |c| c.min(self.max)))
            };
        let call = inner.call(request);
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

#[cfg(test)]
mod tests {
    use http::HeaderValue;

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

    /// A unary call is cut at the cap; a refit (or snapshot, or rollback) only at the
    /// client's own deadline.
    #[tokio::test]
    async fn model_changes_are_not_cut_at_the_unary_cap() {
        use tower::ServiceExt as _;
        let slow = tower::service_fn(|_: Request<()>| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("done")))
        });
        let layer = DeadlineLayer {
            max: Duration::from_millis(50),
        };
        let call = |path: &str, timeout: Option<&'static str>| {
            let mut request = Request::builder().uri(path).body(()).unwrap();
            if let Some(t) = timeout {
                request
                    .headers_mut()
                    .insert("grpc-timeout", HeaderValue::from_static(t));
            }
            layer.layer(slow).oneshot(request)
        };
        let code = |response: http::Response<String>| {
            tonic::Status::from_header_map(response.headers()).map(|s| s.code())
        };
        let cut = call("/reflex.v1.RecommendService/Recommend", Some("5S"))
            .await
            .unwrap();
        assert_eq!(code(cut), Some(tonic::Code::DeadlineExceeded));
        for path in LONG_PATHS {
            let done = call(path, Some("5S")).await.unwrap();
            assert_eq!(code(done), None, "{path}");
            let cut = call(path, Some("100m")).await.unwrap();
            assert_eq!(code(cut), Some(tonic::Code::DeadlineExceeded), "{path}");
        }
        let done = call("/reflex.v1.ModelService/Refit", None).await.unwrap();
        assert_eq!(code(done), None);
    }
}
