//! Prometheus metrics: the registry, the instruments the server records, and the
//! `/metrics` scrape endpoint on its own port.
//!
//! Instruments are created once and recorded through cheap handles (atomic adds), so the
//! hot paths pay no lookup beyond a label match.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::info;

/// Where the scrape endpoint listens.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics`; off leaves the instruments counting but unexposed.
    pub enabled: bool,
    /// Address of the scrape endpoint; port 0 picks a free one.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// Latency buckets from 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Freshness buckets from 1 ms to 1 h: event time can lag ingest by a lot.
const FRESHNESS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

/// Every instrument the server records.
pub struct Metrics {
    registry: Registry,
    /// Ingested events by status (`accepted`, `duplicate`, `rejected`, `filtered`).
    pub ingest_events: IntCounterVec,
    /// Time to apply and ack one batch.
    pub ingest_batch_seconds: Histogram,
    /// Time to answer one Recommend or SimilarItems call, by `method`.
    pub recommend_seconds: HistogramVec,
    /// Event time to applied, for accepted events.
    pub freshness_seconds: Histogram,
    /// Recommend cache lookups by `result` (`hit`, `miss`).
    pub cache_requests: IntCounterVec,
    /// Items the retriever can search.
    pub index_items: IntGauge,
    /// Profiles held.
    pub profiles: IntGauge,
    /// Backend failures by `op`.
    pub backend_errors: IntCounterVec,
    /// Backend call latency by `op`.
    pub backend_seconds: HistogramVec,
    /// gRPC calls by `method` and `code`.
    pub grpc_requests: IntCounterVec,
    /// gRPC calls in progress.
    pub grpc_inflight: IntGauge,
    /// Calls refused at a limit, by `reason`: `calls` (`limits.max_concurrent_calls`) or
    /// `streams` (`limits.max_streams`).
    pub load_shed: IntCounterVec,
    /// Event streams open now (each holds a `limits.max_streams` permit).
    pub open_streams: IntGauge,
    /// 1 while this replica holds the learner lease.
    pub learner: IntGauge,
    /// Model snapshots taken by this replica, by reason.
    pub snapshots: IntCounterVec,
    /// Refits of the batch baseline run by this replica, by `outcome` (`installed`,
    /// `kept`, `too_few_holdout_users`, `skipped`, `failed`).
    pub refits: IntCounterVec,
    /// Prequential model quality by `metric` (`hr@10`, `recall@20`), `population`
    /// (`all`, `holdout`) and `window` (`decayed`, `cumulative`).
    pub model_quality: GaugeVec,
    /// Model rollbacks this replica recorded, by `trigger` (`manual`, `auto`).
    pub rollbacks: IntCounterVec,
    /// Searches the approximate retriever checked against the exact scan.
    pub recall_checks: IntCounter,
    /// Items in the checked exact answers (`kind="wanted"`) and, of those, in the
    /// retriever's own answers (`kind="found"`): recall = rate(found) / rate(wanted).
    pub recall_items: IntCounterVec,
    /// The store's local disk by `kind`: `free`, `total`, and `floor` (the free space
    /// below which ingest is refused); absent for backends without a local disk.
    pub store_disk_bytes: IntGaugeVec,
    /// 1 while the store takes writes, 0 while it refuses them (readiness follows it).
    pub store_writable: IntGauge,
    /// Kafka source records by `topic` and `outcome` (`accepted`, `duplicate`,
    /// `rejected`, `filtered`, `unparseable`).
    pub kafka_records: IntCounterVec,
    /// Kafka source consumer lag in records by `topic` and `partition` (from librdkafka's
    /// statistics, every `statistics.interval.ms`).
    pub kafka_lag: IntGaugeVec,
    /// Time to commit one batch's offsets.
    pub kafka_commit_seconds: Histogram,
    /// Kafka source commits that failed (their records come again, answered `DUPLICATE`).
    pub kafka_commit_failures: IntCounter,
    /// Kafka source rebalances by `kind` (`assign`, `revoke`, `error`).
    pub kafka_rebalances: IntCounterVec,
    /// Records sent to the dead-letter topic by `result` (`delivered`, `failed`,
    /// `dropped` when no dead-letter topic is configured).
    pub kafka_dead_letters: IntCounterVec,
    /// Events mirrored to the sink topic by `result` (`delivered`, `failed`).
    pub kafka_sink_events: IntCounterVec,
    /// 1 while the Kafka source reaches a broker, 0 while it reaches none.
    pub kafka_source_up: IntGauge,
    /// 1 while the Kafka source holds its partitions paused (the engine refuses batches).
    pub kafka_paused: IntGauge,
}

impl Metrics {
    /// Creates and registers every instrument.
    pub fn new() -> anyhow::Result<Arc<Self>> {
        let registry = Registry::new();
        let ingest_events = IntCounterVec::new(
            Opts::new("reflex_ingest_events_total", "Ingested events by status"),
            &["status"],
        )?;
        let ingest_batch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "reflex_ingest_batch_duration_seconds",
                "Time to apply and acknowledge one batch",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let recommend_seconds = HistogramVec::new(
            HistogramOpts::new(
                "reflex_recommend_duration_seconds",
                "Time to answer a recommendation call",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method"],
        )?;
        let freshness_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "reflex_freshness_seconds",
                "From an accepted event's timestamp to its being applied",
            )
            .buckets(FRESHNESS_BUCKETS.to_vec()),
        )?;
        let cache_requests = IntCounterVec::new(
            Opts::new(
                "reflex_recommend_cache_requests_total",
                "Recommend cache lookups",
            ),
            &["result"],
        )?;
        let index_items = IntGauge::new("reflex_index_items", "Items the retriever can search")?;
        let profiles = IntGauge::new("reflex_profiles", "Profiles held")?;
        let backend_errors = IntCounterVec::new(
            Opts::new(
                "reflex_backend_errors_total",
                "Backend failures by operation",
            ),
            &["op"],
        )?;
        let backend_seconds = HistogramVec::new(
            HistogramOpts::new(
                "reflex_backend_duration_seconds",
                "Backend call latency by operation",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )?;
        let grpc_requests = IntCounterVec::new(
            Opts::new(
                "reflex_grpc_requests_total",
                "gRPC calls by method and code",
            ),
            &["method", "code"],
        )?;
        let grpc_inflight = IntGauge::new("reflex_grpc_inflight", "gRPC calls in progress")?;
        let load_shed = IntCounterVec::new(
            Opts::new(
                "reflex_load_shed_total",
                "Calls refused at a limit, by reason (calls: concurrent calls, streams: open event streams)",
            ),
            &["reason"],
        )?;
        // Both series exist from the start, so a rate over them is defined before any refusal.
        for reason in ["calls", "streams"] {
            load_shed.with_label_values(&[reason]);
        }
        let open_streams = IntGauge::new("reflex_open_streams", "Event streams open now")?;
        registry.register(Box::new(open_streams.clone()))?;
        registry.register(Box::new(ingest_events.clone()))?;
        registry.register(Box::new(ingest_batch_seconds.clone()))?;
        registry.register(Box::new(recommend_seconds.clone()))?;
        registry.register(Box::new(freshness_seconds.clone()))?;
        registry.register(Box::new(cache_requests.clone()))?;
        registry.register(Box::new(index_items.clone()))?;
        registry.register(Box::new(profiles.clone()))?;
        registry.register(Box::new(backend_errors.clone()))?;
        registry.register(Box::new(backend_seconds.clone()))?;
        registry.register(Box::new(grpc_requests.clone()))?;
        registry.register(Box::new(grpc_inflight.clone()))?;
        let learner = IntGauge::new(
            "reflex_learner",
            "1 while this replica holds the learner lease (takes scheduled snapshots)",
        )?;
        let snapshots = IntCounterVec::new(
            Opts::new(
                "reflex_model_snapshots_total",
                "Model versions saved by this replica, by trigger",
            ),
            &["trigger"],
        )?;
        registry.register(Box::new(load_shed.clone()))?;
        registry.register(Box::new(learner.clone()))?;
        registry.register(Box::new(snapshots.clone()))?;
        let refits = IntCounterVec::new(
            Opts::new(
                "reflex_model_refits_total",
                "Refits of the batch baseline run by this replica, by outcome",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(refits.clone()))?;
        let model_quality = GaugeVec::new(
            Opts::new(
                "reflex_model_quality",
                "Prequential model quality (each sampled event scored before the model learns it)",
            ),
            &["metric", "population", "window"],
        )?;
        let rollbacks = IntCounterVec::new(
            Opts::new(
                "reflex_model_rollbacks_total",
                "Model rollbacks recorded by this replica, by trigger",
            ),
            &["trigger"],
        )?;
        registry.register(Box::new(model_quality.clone()))?;
        registry.register(Box::new(rollbacks.clone()))?;
        let recall_checks = IntCounter::new(
            "reflex_retrieval_recall_checks_total",
            "Searches of the approximate retriever also answered by the exact scan",
        )?;
        let recall_items = IntCounterVec::new(
            Opts::new(
                "reflex_retrieval_recall_items_total",
                "Items of the checked exact answers (wanted) and of those the approximate \
                 answers held (found)",
            ),
            &["kind"],
        )?;
        for kind in ["wanted", "found"] {
            recall_items.with_label_values(&[kind]);
        }
        let store_disk_bytes = IntGaugeVec::new(
            Opts::new(
                "reflex_store_disk_bytes",
                "The store's local disk: free, total, and the floor below which ingest is refused",
            ),
            &["kind"],
        )?;
        let store_writable = IntGauge::new(
            "reflex_store_writable",
            "1 while the store takes writes, 0 while it refuses them (readiness follows it)",
        )?;
        store_writable.set(1);
        registry.register(Box::new(store_disk_bytes.clone()))?;
        registry.register(Box::new(store_writable.clone()))?;
        let kafka_records = IntCounterVec::new(
            Opts::new(
                "reflex_kafka_records_total",
                "Kafka source records by topic and outcome",
            ),
            &["topic", "outcome"],
        )?;
        let kafka_lag = IntGaugeVec::new(
            Opts::new(
                "reflex_kafka_consumer_lag",
                "Kafka source consumer lag in records by topic and partition",
            ),
            &["topic", "partition"],
        )?;
        let kafka_commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "reflex_kafka_commit_duration_seconds",
                "Time of one offset commit of the Kafka source (one commit covers the batches settled while the one before ran)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let kafka_commit_failures = IntCounter::new(
            "reflex_kafka_commit_failures_total",
            "Kafka source offset commits that failed (their records are redelivered)",
        )?;
        let kafka_rebalances = IntCounterVec::new(
            Opts::new(
                "reflex_kafka_rebalances_total",
                "Kafka source rebalances by kind (assign, revoke, error)",
            ),
            &["kind"],
        )?;
        let kafka_dead_letters = IntCounterVec::new(
            Opts::new(
                "reflex_kafka_dead_letters_total",
                "Records for the dead-letter topic by result (delivered, failed, dropped)",
            ),
            &["result"],
        )?;
        let kafka_sink_events = IntCounterVec::new(
            Opts::new(
                "reflex_kafka_sink_events_total",
                "Events mirrored to the sink topic by result (delivered, failed)",
            ),
            &["result"],
        )?;
        let kafka_source_up = IntGauge::new(
            "reflex_kafka_source_up",
            "1 while the Kafka source reaches a broker, 0 while it reaches none",
        )?;
        let kafka_paused = IntGauge::new(
            "reflex_kafka_paused",
            "1 while the Kafka source holds its partitions paused (the engine refuses batches)",
        )?;
        registry.register(Box::new(kafka_records.clone()))?;
        registry.register(Box::new(kafka_lag.clone()))?;
        registry.register(Box::new(kafka_commit_seconds.clone()))?;
        registry.register(Box::new(kafka_commit_failures.clone()))?;
        registry.register(Box::new(kafka_rebalances.clone()))?;
        registry.register(Box::new(kafka_dead_letters.clone()))?;
        registry.register(Box::new(kafka_sink_events.clone()))?;
        registry.register(Box::new(kafka_source_up.clone()))?;
        registry.register(Box::new(kafka_paused.clone()))?;
        // Registered by `watch_recall`, once there is a retriever to read.
        Ok(Arc::new(Self {
            kafka_records,
            kafka_lag,
            kafka_commit_seconds,
            kafka_commit_failures,
            kafka_rebalances,
            kafka_dead_letters,
            kafka_sink_events,
            kafka_source_up,
            kafka_paused,
            store_disk_bytes,
            store_writable,
            registry,
            ingest_events,
            ingest_batch_seconds,
            recommend_seconds,
            freshness_seconds,
            cache_requests,
            index_items,
            profiles,
            backend_errors,
            backend_seconds,
            grpc_requests,
            grpc_inflight,
            load_shed,
            open_streams,
            learner,
            snapshots,
            refits,
            model_quality,
            rollbacks,
            recall_checks,
            recall_items,
        }))
    }

    /// Registers the recall counters, read from `source` (the retriever's cumulative
    /// counts) whenever the registry is gathered, by a scrape or an OTLP export, so they
    /// are never behind. Call once.
    pub fn watch_recall(
        &self,
        source: impl Fn() -> Option<reflex_core::RecallChecks> + Send + Sync + 'static,
    ) -> anyhow::Result<()> {
        self.registry.register(Box::new(RecallCollector {
            source: Box::new(source),
            checks: self.recall_checks.clone(),
            items: self.recall_items.clone(),
        }))?;
        Ok(())
    }

    /// Registers `reflex_retrieval_backlog_items`, read from `source` (the retriever's
    /// [`reflex_core::IndexBacklog`]) whenever the registry is gathered. A retriever
    /// without an index to keep current has nothing waiting: 0. Call once.
    pub fn watch_backlog(
        &self,
        source: impl Fn() -> Option<reflex_core::IndexBacklog> + Send + Sync + 'static,
    ) -> anyhow::Result<()> {
        let items = IntGaugeVec::new(
            Opts::new(
                "reflex_retrieval_backlog_items",
                "Items the retriever's index has not caught up with: new ones it does not \
                 hold yet (kind=new) and changed ones waiting to be re-indexed (kind=changed)",
            ),
            &["kind"],
        )?;
        self.registry.register(Box::new(BacklogCollector {
            source: Box::new(source),
            items,
        }))?;
        Ok(())
    }

    /// Sets the `reflex_model_quality` gauges from `report`.
    pub fn record_quality(&self, report: &reflex_core::QualityReport) {
        for (population, figures) in [("all", &report.all), ("holdout", &report.holdout)] {
            for (window, f) in [
                ("decayed", &figures.decayed),
                ("cumulative", &figures.cumulative),
            ] {
                self.model_quality
                    .with_label_values(&["hr@10", population, window])
                    .set(f.hit_rate_at_10);
                self.model_quality
                    .with_label_values(&["recall@20", population, window])
                    .set(f.recall_at_20);
            }
        }
    }

    /// The registry holding every instrument (what OTLP export reads).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every instrument.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %err, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Sets the backlog gauges from the retriever at each gather.
struct BacklogCollector {
    source: Box<dyn Fn() -> Option<reflex_core::IndexBacklog> + Send + Sync>,
    items: IntGaugeVec,
}

impl Collector for BacklogCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.items.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = (self.source)().unwrap_or_default();
        let gauge = |kind: &str, n: u64| {
            self.items
                .with_label_values(&[kind])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        };
        gauge("new", now.new);
        gauge("changed", now.changed);
        self.items.collect()
    }
}

/// Brings the recall counters up to the retriever's own counts at each gather.
struct RecallCollector {
    source: Box<dyn Fn() -> Option<reflex_core::RecallChecks> + Send + Sync>,
    checks: IntCounter,
    items: IntCounterVec,
}

impl Collector for RecallCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.checks.desc();
        descs.extend(self.items.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(now) = (self.source)() {
            let raise = |counter: &IntCounter, to: u64| {
                let at = counter.get();
                if to > at {
                    counter.inc_by(to - at);
                }
            };
            raise(&self.checks, now.checks);
            raise(&self.items.with_label_values(&["wanted"]), now.wanted);
            raise(&self.items.with_label_values(&["found"]), now.found);
        }
        let mut families = self.checks.collect();
        families.extend(self.items.collect());
        families
    }
}

/// Serves `/metrics` (and the `console`'s routes, when given) on `listener` until
/// `shutdown` resolves.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: TcpListener,
    console: Option<axum::Router>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("reading the metrics address")?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    let app = match console {
        Some(console) => app.merge(console),
        None => app,
    };
    info!(%addr, "metrics endpoint serving /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving /metrics")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_by_its_exported_name() {
        let m = Metrics::new().unwrap();
        m.ingest_events.with_label_values(&["accepted"]).inc_by(3);
        m.recommend_seconds
            .with_label_values(&["recommend"])
            .observe(0.001);
        m.ingest_batch_seconds.observe(0.002);
        m.freshness_seconds.observe(0.002);
        m.grpc_requests.with_label_values(&["/x", "ok"]).inc();
        m.cache_requests.with_label_values(&["miss"]).inc();
        m.backend_errors.with_label_values(&["append"]).inc();
        let mut quality = reflex_core::QualityReport::default();
        quality.all.decayed.hit_rate_at_10 = 0.5;
        m.record_quality(&quality);
        m.rollbacks.with_label_values(&["auto"]).inc();
        let seen = Arc::new(std::sync::Mutex::new((2u64, 20u64, 19u64)));
        let source = seen.clone();
        m.watch_recall(move || {
            let (checks, wanted, found) = *source.lock().ok()?;
            Some(reflex_core::RecallChecks {
                checks,
                wanted,
                found,
            })
        })
        .unwrap();
        m.watch_backlog(|| {
            Some(reflex_core::IndexBacklog {
                new: 7,
                changed: 11,
            })
        })
        .unwrap();
        assert!(
            m.render()
                .contains("reflex_retrieval_recall_checks_total 2")
        );
        // Read at each gather: no maintenance tick in between.
        *seen.lock().unwrap() = (4, 40, 38);
        let text = m.render();
        for name in [
            "reflex_ingest_events_total{status=\"accepted\"} 3",
            "reflex_recommend_duration_seconds_bucket",
            "reflex_ingest_batch_duration_seconds_count 1",
            "reflex_freshness_seconds_bucket",
            "reflex_grpc_requests_total",
            "reflex_grpc_inflight 0",
            "reflex_load_shed_total{reason=\"calls\"} 0",
            "reflex_load_shed_total{reason=\"streams\"} 0",
            "reflex_open_streams 0",
            "reflex_index_items 0",
            "reflex_profiles 0",
            "reflex_recommend_cache_requests_total",
            "reflex_backend_errors_total",
            "reflex_model_quality{metric=\"hr@10\",population=\"all\",window=\"decayed\"} 0.5",
            "reflex_model_quality{metric=\"recall@20\",population=\"holdout\",window=\"cumulative\"} 0",
            "reflex_model_rollbacks_total{trigger=\"auto\"} 1",
            "reflex_retrieval_recall_checks_total 4",
            "reflex_retrieval_recall_items_total{kind=\"wanted\"} 40",
            "reflex_retrieval_recall_items_total{kind=\"found\"} 38",
            "reflex_retrieval_backlog_items{kind=\"new\"} 7",
            "reflex_retrieval_backlog_items{kind=\"changed\"} 11",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
