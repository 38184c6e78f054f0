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

use crate::config::{Config, LogFormat};

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

/// Installs the global subscriber. `quiet` lowers the default level to warnings (the demo
/// prints its own story). `RUST_LOG` wins over `log.filter`. Must run inside a Tokio
/// runtime when OTLP export is on.
pub fn init(config: &Config, quiet: bool) -> anyhow::Result<TelemetryGuard> {
    let default = if quiet {
        "warn"
    } else {
        config.log.filter.as_str()
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match config.log.format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let (otel, provider) = match &config.telemetry.otlp_endpoint {
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
                    config.telemetry.sample_ratio.clamp(0.0, 1.0),
                ))))
                .with_resource(
                    Resource::builder()
                        .with_service_name(config.telemetry.service_name.clone())
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
