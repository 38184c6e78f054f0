//! Logs and traces: a `tracing` subscriber writing text or JSON lines to stderr, plus,
//! when an OTLP endpoint is configured, an OpenTelemetry layer exporting spans over OTLP
//! gRPC in batches (off by default).

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// OpenTelemetry export.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP gRPC collector, e.g. `http://otel-collector:4317`; unset turns export off.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Share of traces kept, 0 to 1.
    pub sample_ratio: f64,
    /// With an endpoint, how often metrics are pushed over OTLP, in ms.
    pub otlp_metrics_interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "reflex".into(),
            sample_ratio: 1.0,
            otlp_metrics_interval_ms: 10_000,
        }
    }
}

/// The shortest push interval of OTLP metrics, in ms.
pub const MIN_OTLP_METRICS_INTERVAL_MS: u64 = 100;

impl TelemetryConfig {
    /// Checks every field's range, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!(
                "sample_ratio must be 0 to 1, got {}",
                self.sample_ratio
            ));
        }
        if self.otlp_metrics_interval_ms < MIN_OTLP_METRICS_INTERVAL_MS {
            return Err(format!(
                "otlp_metrics_interval_ms must be at least {MIN_OTLP_METRICS_INTERVAL_MS}, got {}",
                self.otlp_metrics_interval_ms
            ));
        }
        Ok(())
    }
}

/// Log output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info,reflex_core=debug`; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flushes and stops trace export when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("flushing traces failed: {err}");
        }
    }
}

/// Installs the global subscriber: lines as `log` says, spans exported as `telemetry`
/// says. `quiet` lowers the default level to warnings (the demo prints its own story).
/// `RUST_LOG` wins over `log.filter`. Must run inside a Tokio runtime when OTLP export
/// is on.
pub fn init(
    log: &LogConfig,
    telemetry: &TelemetryConfig,
    quiet: bool,
) -> anyhow::Result<TelemetryGuard> {
    let default = if quiet { "warn" } else { log.filter.as_str() };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match log.format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let (otel, provider) = match &telemetry.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .with_context(|| format!("building the OTLP span exporter for {endpoint}"))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    telemetry.sample_ratio,
                ))))
                .with_resource(
                    Resource::builder()
                        .with_service_name(telemetry.service_name.clone())
                        .build(),
                )
                .build();
            let tracer = provider.tracer("reflex");
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(provider),
            )
        }
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(TelemetryGuard { provider })
}
