//! The Kafka sink (`sink.kafka`): every accepted event, normalised as JSON and keyed by
//! user, to one topic, confirmed by the broker before the ingest that produced it is
//! acknowledged (at least once; consumers deduplicate by `event_id`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::producer::{FutureProducer, FutureRecord};
use reflex_core::{EventOutcome, RawEvent};
use serde::Serialize;

use super::KafkaError;
use super::client::{ProducerLog, client_config, set_default};
use super::payload::kind_label;
use crate::config::KafkaSinkConfig;
use crate::metrics::Metrics;
use crate::services::EventMirror;

/// An idempotent producer (acks from all in-sync replicas, no duplicates from its own
/// retries) over `config`, waiting at most `delivery_timeout_ms` for each record.
pub fn producer(
    mut config: rdkafka::ClientConfig,
    delivery_timeout_ms: u64,
    what: &str,
) -> Result<FutureProducer<ProducerLog>, KafkaError> {
    config.set("message.timeout.ms", delivery_timeout_ms.to_string());
    set_default(&mut config, "enable.idempotence", "true");
    set_default(&mut config, "linger.ms", "1");
    config
        .create_with_context(ProducerLog)
        .map_err(|source| KafkaError::Client {
            what: format!("creating the {what} producer"),
            source,
        })
}

/// One event as the sink topic carries it.
#[derive(Debug, Serialize)]
struct Mirrored<'a> {
    event_id: &'a str,
    user_id: &'a str,
    item_id: &'a str,
    kind: Option<String>,
    /// Event time, Unix milliseconds.
    timestamp: Option<i64>,
    session_id: Option<&'a str>,
    value: Option<f64>,
    weight: Option<f64>,
    context: &'a BTreeMap<String, String>,
    /// `accepted`, or `duplicate` for a repeat of an accepted event (a retry).
    status: &'static str,
    /// When Reflex ingested it, Unix milliseconds.
    ingested_ms: i64,
}

/// The normalised JSON of one event with its ingest `status`.
fn encode(raw: &RawEvent, status: &'static str, ingested_ms: i64) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&Mirrored {
        event_id: &raw.event_id,
        user_id: &raw.user_id,
        item_id: &raw.item_id,
        kind: kind_label(raw),
        timestamp: raw.timestamp_ms,
        session_id: (!raw.session_id.is_empty()).then_some(raw.session_id.as_str()),
        value: raw.value,
        weight: raw.weight,
        context: &raw.context,
        status,
        ingested_ms,
    })
    .map_err(|e| format!("encoding a mirrored event: {e}"))
}

/// Mirrors accepted events to the sink topic.
pub struct KafkaMirror {
    producer: FutureProducer<ProducerLog>,
    topic: String,
    queue_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl KafkaMirror {
    /// A producer for `config.topic`; the broker is first contacted by the first send.
    pub fn new(config: &KafkaSinkConfig, metrics: Arc<Metrics>) -> Result<Self, KafkaError> {
        let client = client_config(
            &config.brokers,
            &config.properties,
            &config.secret_properties,
            "sink.kafka",
        )?;
        Ok(Self {
            producer: producer(client, config.delivery_timeout_ms, "sink")?,
            topic: config.topic.clone(),
            queue_timeout: Duration::from_millis(config.delivery_timeout_ms),
            metrics,
        })
    }
}

#[tonic::async_trait]
impl EventMirror for KafkaMirror {
    async fn mirror(&self, events: &[RawEvent], outcomes: &[EventOutcome]) -> Result<(), String> {
        let now = reflex_core::types::now_ms();
        let mut records = Vec::new();
        for (raw, outcome) in events.iter().zip(outcomes) {
            let status = match outcome {
                EventOutcome::Accepted => "accepted",
                EventOutcome::Duplicate => "duplicate",
                EventOutcome::Rejected(_) | EventOutcome::Filtered(_) => continue,
            };
            records.push((raw.user_id.as_str(), encode(raw, status, now)?));
        }
        if records.is_empty() {
            return Ok(());
        }
        // Every send is enqueued at once (waiting while librdkafka's queue is full) and
        // the batch waits for all confirmations together.
        let sends = records.iter().map(|(user, payload)| {
            self.producer.send(
                FutureRecord::to(&self.topic).key(*user).payload(payload),
                self.queue_timeout,
            )
        });
        let mut first_error = None;
        let (mut delivered, mut failed) = (0u64, 0u64);
        for result in join_all(sends).await {
            match result {
                Ok(_) => delivered += 1,
                Err((err, _)) => {
                    failed += 1;
                    first_error.get_or_insert(err);
                }
            }
        }
        let count = |result: &str, n: u64| {
            if n > 0 {
                self.metrics
                    .kafka_sink_events
                    .with_label_values(&[result])
                    .inc_by(n);
            }
        };
        count("delivered", delivered);
        count("failed", failed);
        match first_error {
            None => Ok(()),
            Some(err) => Err(format!(
                "{failed} of {} events not delivered to {}: {err}",
                records.len(),
                self.topic
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrored_events_are_normalised_json() -> Result<(), String> {
        let raw = RawEvent {
            event_id: "e1".into(),
            user_id: "u1".into(),
            item_id: "i1".into(),
            kind: Some(reflex_core::RawKind::AddToCart),
            timestamp_ms: Some(1_764_324_000_000),
            ..Default::default()
        };
        let json: serde_json::Value =
            serde_json::from_slice(&encode(&raw, "accepted", 5)?).map_err(|e| e.to_string())?;
        assert_eq!(json["kind"], "add_to_cart");
        assert_eq!(json["timestamp"], 1_764_324_000_000i64);
        assert_eq!(json["session_id"], serde_json::Value::Null);
        assert_eq!(json["status"], "accepted");
        Ok(())
    }
}
