//! librdkafka client settings (brokers, passed-through properties, secrets from the
//! environment) and the callbacks of the source's consumer: broker reachability, consumer
//! lag and rebalances, recorded as metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError as RdError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{info, warn};

use super::KafkaError;
use crate::metrics::Metrics;

/// How often librdkafka reports statistics (lag, broker states) unless set otherwise.
const STATISTICS_INTERVAL_MS: &str = "2000";

/// A librdkafka configuration: `brokers`, then `properties` as they are, then each of
/// `secrets` (property → environment variable) read from the environment.
pub fn client_config(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, String>,
    section: &str,
) -> Result<ClientConfig, KafkaError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    config.set_log_level(RDKafkaLogLevel::Warning);
    for (key, value) in properties {
        config.set(key, value);
    }
    for (key, var) in secrets {
        let value = std::env::var(var).map_err(|_| {
            KafkaError::Setting(format!(
                "{section}.secret_properties.{key} names the environment variable {var}, \
                 which is not set"
            ))
        })?;
        config.set(key, value);
    }
    Ok(config)
}

/// Sets `key` to `value` unless the configuration already has it.
pub fn set_default(config: &mut ClientConfig, key: &str, value: &str) {
    if config.get(key).is_none() {
        config.set(key, value);
    }
}

/// Sets librdkafka statistics on (for lag and broker states) unless configured.
pub fn with_statistics(config: &mut ClientConfig) {
    set_default(config, "statistics.interval.ms", STATISTICS_INTERVAL_MS);
}

/// The source consumer's callbacks: they keep `reachable` and the lag, rebalance and
/// reachability metrics current.
pub struct SourceContext {
    /// Where the metrics go.
    pub metrics: Arc<Metrics>,
    /// True while some broker answers (from statistics, errors and received records).
    pub reachable: Arc<AtomicBool>,
}

impl SourceContext {
    /// Notes whether a broker is reachable.
    pub fn set_reachable(&self, up: bool) {
        self.reachable.store(up, Ordering::Relaxed);
        self.metrics.kafka_source_up.set(i64::from(up));
    }
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        let up = statistics
            .brokers
            .values()
            .any(|broker| broker.nodeid >= 0 && broker.state == "UP");
        self.set_reachable(up);
        for (name, topic) in &statistics.topics {
            for (partition, stats) in &topic.partitions {
                // -1 is librdkafka's internal "unassigned" partition; a lag of -1 is unknown.
                if *partition < 0 || stats.consumer_lag < 0 {
                    continue;
                }
                self.metrics
                    .kafka_lag
                    .with_label_values(&[name.as_str(), &partition.to_string()])
                    .set(stats.consumer_lag);
            }
        }
    }

    fn error(&self, error: RdError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.set_reachable(false);
        }
        warn!(%error, reason, "kafka source client error");
    }
}

impl ConsumerContext for SourceContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                self.metrics
                    .kafka_rebalances
                    .with_label_values(&["assign"])
                    .inc();
                info!(partitions = partitions.count(), "kafka partitions assigned");
            }
            Rebalance::Revoke(partitions) => {
                self.metrics
                    .kafka_rebalances
                    .with_label_values(&["revoke"])
                    .inc();
                for element in partitions.elements() {
                    let _ = self
                        .metrics
                        .kafka_lag
                        .remove_label_values(&[element.topic(), &element.partition().to_string()]);
                }
                info!(partitions = partitions.count(), "kafka partitions revoked");
            }
            Rebalance::Error(err) => {
                self.metrics
                    .kafka_rebalances
                    .with_label_values(&["error"])
                    .inc();
                warn!(error = %err, "kafka rebalance failed");
            }
        }
    }
}

/// The callbacks of the producers (sink and dead-letter topic): errors are logged.
pub struct ProducerLog;

impl ClientContext for ProducerLog {
    fn error(&self, error: RdError, reason: &str) {
        warn!(%error, reason, "kafka producer error");
    }
}
