//! Kafka in and out (cargo feature `kafka`): the source that consumes interaction topics
//! as a consumer group and ingests them like the gRPC stream (`source.rs`), the sink that
//! mirrors accepted events to a topic (`sink.rs`), record payloads (`payload.rs`) and the
//! librdkafka client settings, callbacks and metrics they share (`client.rs`).
//!
//! librdkafka is built from its bundled source (crate `rdkafka`, feature `cmake-build`):
//! the system's librdkafka 2.0 fails the ApiVersion handshake with the brokers tested.

mod client;
pub mod payload;
mod sink;
mod source;

pub use sink::KafkaMirror;
pub use source::{SOURCE_HEALTH_SERVICE, Source};

/// Errors of the Kafka source and sink.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// A librdkafka client could not be created or subscribed.
    #[error("{what}: {source}")]
    Client {
        /// What was being done.
        what: String,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// A setting is missing or bad (such as a secret's environment variable).
    #[error("{0}")]
    Setting(String),
    /// The thread that commits the source's offsets could not be started.
    #[error("starting the kafka offset commit thread: {0}")]
    Thread(#[source] std::io::Error),
}
