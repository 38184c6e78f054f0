//! Operating the server: API keys, deadlines, load shedding, metrics, health, draining
//! and configuration precedence.

use std::time::Duration;

use reflex_server::proto;
use reflex_server::proto::EventKind::View;
use reflex_server::proto::event_service_client::EventServiceClient;
use reflex_server::proto::recommend_service_client::RecommendServiceClient;

use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::*;

const INGEST_KEY: &str = "ingest-key-0123456789";
const RECOMMEND_KEY: &str = "recommend-key-0123456789";

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-api-key", key.parse().unwrap());
    request
}

fn batch(prefix: &str, n: usize) -> proto::IngestRequest {
    proto::IngestRequest {
        sequence: 1,
        events: (0..n)
            .map(|i| {
                event(
                    &format!("{prefix}-{i}"),
                    &format!("u{}", i % 50),
                    &format!("i{}", i % 97),
                    View,
                )
            })
            .collect(),
    }
}

#[tokio::test]
async fn api_keys_and_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[keys]]\nname = \"collector\"\nkey = \"{INGEST_KEY}\"\nscopes = [\"ingest\"]\n\n\
             [[keys]]\nname = \"storefront\"\nkey = \"{RECOMMEND_KEY}\"\nscopes = [\"recommend\"]\n"
        ),
    )
    .unwrap();
    let server = Reflex::start_with(
        &dir.path().join("data"),
        &[
            ("REFLEX_AUTH__ENABLED", "true"),
            ("REFLEX_AUTH__KEYS_FILE", keys.to_str().unwrap()),
        ],
    );
    let channel = server.channel().await;
    let mut events = EventServiceClient::new(channel.clone());
    let mut recommend = RecommendServiceClient::new(channel.clone());

    let missing = events.ingest(batch("a", 1)).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing}");
    let wrong = events
        .ingest(with_key(batch("a", 1), "not-a-key-at-all-000"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong}");
    let unscoped = events
        .ingest(with_key(batch("a", 1), RECOMMEND_KEY))
        .await
        .unwrap_err();
    assert_eq!(unscoped.code(), Code::PermissionDenied, "{unscoped}");
    assert!(
        !unscoped.message().contains(RECOMMEND_KEY),
        "the key is never echoed"
    );

    let ack = events
        .ingest(with_key(batch("a", 1), INGEST_KEY))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 1);
    let rec = proto::RecommendRequest {
        user_id: "u0".into(),
        count: 3,
        filter: None,
    };
    assert_eq!(
        recommend
            .recommend(with_key(rec.clone(), INGEST_KEY))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert!(
        recommend
            .recommend(with_key(rec, RECOMMEND_KEY))
            .await
            .is_ok()
    );
    assert_eq!(
        health(&channel).await,
        ServingStatus::Serving,
        "probes need no key"
    );
}

#[tokio::test]
async fn deadlines_are_enforced_and_the_server_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    // The server caps unary calls at 20 ms; a batch of 20,000 events takes far longer.
    // (A client's own shorter grpc-timeout is honoured the same way, but the client
    // library then races the server to report it, so the cap is what is asserted.)
    let server = Reflex::start_with(
        dir.path(),
        &[
            ("REFLEX_LIMITS__MAX_CALL_MS", "20"),
            ("REFLEX_ENGINE__MAX_BATCH", "20000"),
            (
                "REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC",
                "0",
            ),
        ],
    );
    let channel = server.channel().await;
    let mut events = EventServiceClient::new(channel.clone());

    let err = events.ingest(batch("slow", 20_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("deadline"), "{err}");

    assert_eq!(health(&channel).await, ServingStatus::Serving);
    let resp = recommend(&channel, "u1", 3).await;
    assert!(resp.items.len() <= 3, "serves normally afterwards");
}

#[tokio::test]
async fn a_burst_beyond_the_limit_is_shed_with_retry_advice() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start_with(
        dir.path(),
        &[
            ("REFLEX_LIMITS__MAX_CONCURRENT_CALLS", "2"),
            (
                "REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC",
                "0",
            ),
        ],
    );
    let channel = server.channel().await;
    let calls: Vec<_> = (0..40)
        .map(|c| {
            let mut events = EventServiceClient::new(channel.clone());
            tokio::spawn(async move { events.ingest(batch(&format!("burst{c}"), 1000)).await })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
                assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());
                shed += 1;
            }
        }
    }
    assert!(ok >= 1 && shed >= 1, "{ok} served, {shed} shed");
    assert_eq!(health(&channel).await, ServingStatus::Serving);
    let ack = EventServiceClient::new(channel.clone())
        .ingest(batch("calm", 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 5, "serves again after the burst");
    let text = scrape(&server).await;
    let line = text
        .lines()
        .find(|l| l.starts_with("reflex_load_shed_total{reason=\"calls\"}"))
        .unwrap();
    assert_eq!(
        line,
        format!("reflex_load_shed_total{{reason=\"calls\"}} {shed}")
    );
}

/// The value of the unlabelled or fully labelled series `series` in a scrape.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Opens an event stream as soon as the server admits one (within 5 s).
async fn open_when_admitted(channel: &Channel) -> EventStream {
    let start = std::time::Instant::now();
    loop {
        match EventStream::try_open(channel.clone()).await {
            Ok(stream) => return stream,
            Err(status)
                if status.code() == Code::ResourceExhausted
                    && start.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("no stream admitted within 5 s: {status}"),
        }
    }
}

#[tokio::test]
async fn open_event_streams_are_limited_for_their_whole_life() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start_with(dir.path(), &[("REFLEX_LIMITS__MAX_STREAMS", "2")]);
    let channel = server.channel().await;
    // Two long-lived streams, each on its own connection; both ack a batch, so both are
    // open on the server, well past the start of their responses.
    let (first_conn, second_conn) = (server.channel().await, server.channel().await);
    let mut first = EventStream::open(first_conn.clone()).await;
    let mut second = EventStream::open(second_conn.clone()).await;
    first.round_trip(vec![event("s1", "u1", "i1", View)]).await;
    second.round_trip(vec![event("s2", "u2", "i2", View)]).await;
    let text = scrape(&server).await;
    assert_eq!(metric(&text, "reflex_open_streams"), Some(2.0), "{text}");

    // A third is refused at once, with retry advice.
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        EventServiceClient::new(channel.clone()).stream(tokio_stream::iter(vec![batch("s3", 1)])),
    )
    .await
    .expect("refused at once, not queued")
    .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
    assert!(refused.message().contains("event streams"), "{refused}");
    assert!(
        refused.metadata().get("grpc-retry-pushback-ms").is_some(),
        "{refused:?}"
    );
    // Unary calls are not streams: still served.
    let ack = EventServiceClient::new(channel.clone())
        .ingest(batch("unary", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 2);
    recommend(&channel, "u1", 3).await;
    let text = scrape(&server).await;
    assert_eq!(
        metric(&text, "reflex_load_shed_total{reason=\"streams\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "reflex_load_shed_total{reason=\"calls\"}"),
        Some(0.0)
    );

    // A stream that ends cleanly frees its place.
    first.finish().await;
    let mut third = open_when_admitted(&channel).await;
    third.round_trip(vec![event("s4", "u3", "i3", View)]).await;
    let refused = EventStream::try_open(channel.clone())
        .await
        .err()
        .expect("full again");
    assert_eq!(refused.code(), Code::ResourceExhausted);

    // So does one whose client vanishes: its connection goes away mid-stream.
    drop(second);
    drop(second_conn);
    let mut fourth = open_when_admitted(&channel).await;
    fourth.round_trip(vec![event("s5", "u4", "i4", View)]).await;
    drop(first_conn);
    let text = scrape(&server).await;
    assert_eq!(metric(&text, "reflex_open_streams"), Some(2.0), "{text}");
}

#[tokio::test]
async fn metrics_reflect_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let server = Reflex::start(dir.path());
    let channel = server.channel().await;
    let mut stream = EventStream::open(channel.clone()).await;
    let mut bad = event("m3", "", "i1", View);
    bad.user_id.clear();
    let ack = stream
        .round_trip(vec![
            event("m1", "u1", "i1", View),
            event("m2", "u1", "i2", View),
            bad,
            event("m1", "u1", "i1", View),
        ])
        .await;
    assert_eq!((ack.accepted, ack.rejected, ack.duplicate), (2, 1, 1));
    recommend(&channel, "u1", 5).await;
    recommend(&channel, "u2", 5).await;

    let text = scrape(&server).await;
    for expected in [
        "reflex_ingest_events_total{status=\"accepted\"} 2",
        "reflex_ingest_events_total{status=\"rejected\"} 1",
        "reflex_ingest_events_total{status=\"duplicate\"} 1",
        "reflex_ingest_batch_duration_seconds_count 1",
        "reflex_recommend_duration_seconds_count{method=\"recommend\"} 2",
        "reflex_freshness_seconds_count 2",
        "reflex_backend_duration_seconds_count{op=\"append\"} 1",
        "reflex_backend_duration_seconds_count{op=\"get_profile\"} 2",
        "reflex_grpc_requests_total{code=\"0\",method=\"/reflex.v1.RecommendService/Recommend\"} 2",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
}

#[tokio::test]
async fn sigterm_drains_streams_and_keeps_every_acked_event() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("REFLEX_DRAIN_DELAY_MS", "700"),
        (
            "REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC",
            "0",
        ),
    ];
    let mut server = Reflex::start_with(dir.path(), &env);
    let channel = server.channel().await;
    assert_eq!(health(&channel).await, ServingStatus::Serving);

    let producer = {
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut stream = EventStream::open(channel).await;
            let mut acked = 0u64;
            for b in 0.. {
                let events = batch(&format!("t{b}"), 50).events;
                if stream.send_checked(events).await.is_err() {
                    break;
                }
                match stream.next_ack().await {
                    Some(Ok(ack)) => acked += u64::from(ack.accepted),
                    Some(Err(status)) => {
                        panic!("stream failed instead of ending cleanly: {status}")
                    }
                    None => break, // the clean end
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let terminating = tokio::spawn(async move {
        server.terminate().await;
        server
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        health(&channel).await,
        ServingStatus::NotServing,
        "draining is visible to probes"
    );
    let acked = tokio::time::timeout(Duration::from_secs(20), producer)
        .await
        .unwrap()
        .unwrap();
    let _server = terminating.await.unwrap();
    assert!(acked > 0);
    drop(channel);

    let server = Reflex::start_with(dir.path(), &env);
    let channel = server.channel().await;
    let mut total = 0;
    for u in 0..50 {
        total += applied_events(&channel, &format!("u{u}")).await;
    }
    assert_eq!(
        total, acked,
        "every acked event persisted, nothing else applied"
    );
}

#[test]
fn configuration_precedence_file_env_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("reflex.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:7001\"\nmax_message_bytes = 1000\n[engine]\nmax_batch = 11\n\
         [[auth.keys]]\nname = \"shop\"\nkey = \"very-secret-key-0001\"\nscopes = [\"admin\"]\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_reflex"))
        .args(["config", "--config"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:7003"])
        .env("REFLEX_MAX_MESSAGE_BYTES", "2000")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("listen = \"127.0.0.1:7003\""),
        "flag wins:\n{text}"
    );
    assert!(
        text.contains("max_message_bytes = 2000"),
        "env beats file:\n{text}"
    );
    assert!(
        text.contains("max_batch = 11"),
        "file beats defaults:\n{text}"
    );
    assert!(
        !text.contains("very-secret-key-0001"),
        "secrets are masked:\n{text}"
    );

    std::fs::write(&file, "max_batch = 11\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_reflex"))
        .args(["config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success(), "unknown keys are errors");
    assert!(String::from_utf8_lossy(&output.stderr).contains("max_batch"));
}

#[tokio::test]
async fn serves_tls_when_configured() {
    use tonic::transport::{Certificate, ClientTlsConfig};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // A leaf, not a CA: rustls refuses a CA certificate as a server's own.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl makes the test certificate");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let server = Reflex::start_with(
        &dir.path().join("data"),
        &[
            ("REFLEX_TLS__ENABLED", "true"),
            ("REFLEX_TLS__CERT_FILE", cert.to_str().unwrap()),
            ("REFLEX_TLS__KEY_FILE", key.to_str().unwrap()),
        ],
    );
    let pem = std::fs::read(&cert).unwrap();
    let channel = Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .expect("TLS handshake with the server's certificate");
    assert_eq!(health(&channel).await, ServingStatus::Serving);
    let ack = EventServiceClient::new(channel)
        .ingest(batch("tls", 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 3);

    // A plaintext client cannot talk to it.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert!(
            HealthClient::new(plain)
                .check(HealthCheckRequest::default())
                .await
                .is_err()
        );
    }
}

mod otlp {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status};

    /// A stand-in OTLP collector that remembers span names and the latest value of
    /// each sum metric (by name and attributes).
    #[derive(Clone, Default)]
    pub struct Collector {
        pub spans: Arc<Mutex<Vec<String>>>,
        pub sums: Arc<Mutex<HashMap<String, f64>>>,
    }

    #[tonic::async_trait]
    impl MetricsService for Collector {
        async fn export(
            &self,
            request: Request<ExportMetricsServiceRequest>,
        ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
            let mut sums = self.sums.lock().unwrap();
            for resource in request.into_inner().resource_metrics {
                for scope in resource.scope_metrics {
                    for m in scope.metrics {
                        if let Some(metric::Data::Sum(sum)) = m.data {
                            for p in sum.data_points {
                                let labels: Vec<String> = p
                                    .attributes
                                    .iter()
                                    .map(|a| {
                                        match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                                            Some(any_value::Value::StringValue(v)) => {
                                                format!("{}={v}", a.key)
                                            }
                                            other => format!("{}={other:?}", a.key),
                                        }
                                    })
                                    .collect();
                                if let Some(number_data_point::Value::AsDouble(v)) = p.value {
                                    sums.insert(format!("{}{{{}}}", m.name, labels.join(",")), v);
                                }
                            }
                        }
                    }
                }
            }
            Ok(Response::new(ExportMetricsServiceResponse {
                partial_success: None,
            }))
        }
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: Request<ExportTraceServiceRequest>,
        ) -> Result<Response<ExportTraceServiceResponse>, Status> {
            let mut spans = self.spans.lock().unwrap();
            for resource in request.into_inner().resource_spans {
                for scope in resource.scope_spans {
                    spans.extend(scope.spans.into_iter().map(|s| s.name));
                }
            }
            Ok(Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    /// Starts the collector on a free port; returns its endpoint.
    pub async fn start(collector: Collector) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .add_service(MetricsServiceServer::new(collector))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_are_exported_over_otlp_when_configured() {
    let collector = otlp::Collector::default();
    let endpoint = otlp::start(collector.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Reflex::start_with(
        dir.path(),
        &[
            ("REFLEX_TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("REFLEX_TELEMETRY__OTLP_METRICS_INTERVAL_MS", "100"),
            ("RUST_LOG", "info"),
        ],
    );
    let channel = server.channel().await;
    let ack = EventServiceClient::new(channel.clone())
        .ingest(batch("otlp", 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 3);
    recommend(&channel, "u1", 3).await;
    // Metrics arrive every 100 ms with the same figures /metrics shows.
    let accepted = "reflex_ingest_events_total{status=accepted}";
    let start = std::time::Instant::now();
    loop {
        let seen = collector.sums.lock().unwrap().get(accepted).copied();
        if seen == Some(3.0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no accepted=3 sum over OTLP: {:?}",
            collector.sums.lock().unwrap().keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(channel);
    // Shutdown flushes the batch exporter.
    server.terminate().await;
    let spans = collector.spans.lock().unwrap().clone();
    for name in ["ingest", "recommend"] {
        assert!(
            spans.iter().any(|s| s == name),
            "no {name} span among {spans:?}"
        );
    }
}
