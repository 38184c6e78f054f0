//! OTLP metrics export: every `telemetry.otlp_metrics_interval_ms` the Prometheus
//! registry (the one `/metrics` serves) is converted to OTLP and pushed to the collector,
//! so both exports always carry the same figures.
//!
//! Counters become monotonic cumulative sums, gauges gauges, histograms cumulative
//! explicit-bucket histograms (Prometheus buckets are cumulative, OTLP's are not: each
//! bucket count is the difference to the previous bound).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus::proto::{MetricFamily, MetricType};
use tracing::{debug, warn};

use crate::metrics::Metrics;

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..KeyValue::default()
    }
}

/// Converts gathered Prometheus families to OTLP metrics; `start` is when counting began.
pub fn convert(families: &[MetricFamily], start: u64, now: u64) -> Vec<Metric> {
    let mut out = Vec::with_capacity(families.len());
    for family in families {
        let points = family.get_metric();
        let attributes = |m: &prometheus::proto::Metric| -> Vec<KeyValue> {
            m.get_label()
                .iter()
                .map(|l| text(l.name(), l.value()))
                .collect()
        };
        let number = |m: &prometheus::proto::Metric, value: f64| NumberDataPoint {
            attributes: attributes(m),
            start_time_unix_nano: start,
            time_unix_nano: now,
            value: Some(number_data_point::Value::AsDouble(value)),
            ..NumberDataPoint::default()
        };
        let data = match family.get_field_type() {
            MetricType::COUNTER => metric::Data::Sum(Sum {
                data_points: points
                    .iter()
                    .map(|m| number(m, m.get_counter().get_value()))
                    .collect(),
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            }),
            MetricType::GAUGE => metric::Data::Gauge(Gauge {
                data_points: points
                    .iter()
                    .map(|m| number(m, m.get_gauge().get_value()))
                    .collect(),
            }),
            MetricType::HISTOGRAM => metric::Data::Histogram(Histogram {
                data_points: points
                    .iter()
                    .map(|m| {
                        let h = m.get_histogram();
                        let mut bounds = Vec::new();
                        let mut counts = Vec::new();
                        let mut below = 0u64;
                        for b in h.get_bucket() {
                            if b.upper_bound().is_finite() {
                                bounds.push(b.upper_bound());
                                counts.push(b.cumulative_count().saturating_sub(below));
                                below = b.cumulative_count();
                            }
                        }
                        counts.push(h.get_sample_count().saturating_sub(below));
                        HistogramDataPoint {
                            attributes: attributes(m),
                            start_time_unix_nano: start,
                            time_unix_nano: now,
                            count: h.get_sample_count(),
                            sum: Some(h.get_sample_sum()),
                            bucket_counts: counts,
                            explicit_bounds: bounds,
                            ..HistogramDataPoint::default()
                        }
                    })
                    .collect(),
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            }),
            // Reflex registers no summaries or untyped metrics.
            _ => continue,
        };
        out.push(Metric {
            name: family.name().to_owned(),
            description: family.help().to_owned(),
            data: Some(data),
            ..Metric::default()
        });
    }
    out
}

/// Pushes the registry to `endpoint` every `every` until the task is dropped. Failures
/// are logged and retried at the next tick; export never blocks serving.
pub async fn run(metrics: Arc<Metrics>, endpoint: String, service_name: String, every: Duration) {
    let start = nanos(SystemTime::now());
    let mut client = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if client.is_none() {
            match MetricsServiceClient::connect(endpoint.clone()).await {
                Ok(c) => client = Some(c),
                Err(err) => {
                    warn!(%endpoint, error = %err, "cannot reach the OTLP collector for metrics");
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![text("service.name", &service_name)],
                    ..Resource::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "reflex".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..InstrumentationScope::default()
                    }),
                    metrics: convert(
                        &metrics.registry().gather(),
                        start,
                        nanos(SystemTime::now()),
                    ),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        match c.export(request).await {
            Ok(_) => debug!("metrics exported over OTLP"),
            Err(status) => {
                warn!(%endpoint, %status, "OTLP metrics export failed");
                client = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

    use super::*;

    #[test]
    fn counters_and_histograms_convert_faithfully() {
        let registry = Registry::new();
        let counter = IntCounterVec::new(Opts::new("events_total", "events"), &["status"]).unwrap();
        let histogram =
            Histogram::with_opts(HistogramOpts::new("latency", "l").buckets(vec![0.1, 1.0]))
                .unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        registry.register(Box::new(histogram.clone())).unwrap();
        counter.with_label_values(&["accepted"]).inc_by(7);
        for v in [0.05, 0.5, 0.7, 3.0] {
            histogram.observe(v);
        }
        let metrics = convert(&registry.gather(), 1, 2);
        let by_name = |n: &str| metrics.iter().find(|m| m.name == n).unwrap();
        let Some(metric::Data::Sum(sum)) = &by_name("events_total").data else {
            panic!("a sum")
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.data_points[0].value,
            Some(number_data_point::Value::AsDouble(7.0))
        );
        assert_eq!(sum.data_points[0].attributes[0].key, "status");
        let Some(metric::Data::Histogram(h)) = &by_name("latency").data else {
            panic!("a histogram")
        };
        let p = &h.data_points[0];
        assert_eq!(p.explicit_bounds, [0.1, 1.0]);
        assert_eq!(p.bucket_counts, [1, 2, 1], "per bucket, not cumulative");
        assert_eq!(p.count, 4);
    }
}
