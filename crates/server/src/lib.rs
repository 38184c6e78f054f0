//! The `reflex` server: tonic services over the core engine, configuration, the demo,
//! and the generated API (also used by clients and the black-box tests).
//!
//! Layout:
//! - [`proto`]: generated `reflex.v1` messages, servers and clients
//! - [`convert`]: protobuf ↔ domain conversions and the error → status mapping
//! - [`services`]: the service implementations
//! - [`config`]: layered configuration
//! - [`middleware`]: tower layers, one file each: call metrics, deadlines, load shedding,
//!   API keys, the oversize-status rewrite; and the services that wait for start-up
//! - [`metrics`]: Prometheus instruments and the `/metrics` endpoint
//! - [`console`]: the web console and its JSON API, on the metrics listener
//! - [`telemetry`]: logs and optional OTLP trace export
//! - [`otlp_metrics`]: optional OTLP export of the Prometheus registry
//! - [`instrumented`]: backend decorators recording latency and failures
//! - `kafka` (cargo feature `kafka`): the Kafka source and sink
//! - [`als_args`]: the ALS flags shared by `reflex eval` and `reflex train`
//! - [`app`]: wiring and the server loop
//! - [`demo`]: the synthetic shopping demo
//! - [`bench`]: `reflex bench`, the load generator
//! - [`eval_cmd`]: `reflex eval`, the offline evaluation of the batch baseline
//! - [`import_cmd`]: `reflex import`, bulk loading of historical events through ingest
//! - [`train_cmd`]: `reflex train`, implicit ALS from the event log as a model version

pub mod als_args;
pub mod app;
pub mod bench;
pub mod config;
pub mod console;
pub mod convert;
pub mod demo;
pub mod eval_cmd;
pub mod import_cmd;
pub mod instrumented;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod middleware;
pub mod otlp_metrics;
pub mod proto;
pub mod refit;
pub mod served_eval;
pub mod services;
pub mod telemetry;
pub mod train_cmd;
