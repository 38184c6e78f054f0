//! The one typed configuration: built-in defaults, then a TOML file, then `REFLEX_…`
//! environment variables (`__` separates nested keys), then command-line flags. Unknown
//! keys are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use reflex_core::{EngineConfig, ProfilePolicy, QualityConfig};
use reflex_models::MfConfig;
use serde::{Deserialize, Serialize};

use crate::metrics::MetricsConfig;
use crate::middleware::AuthConfig;
pub use crate::telemetry::{LogConfig, LogFormat, TelemetryConfig};

/// Everything `reflex serve` can be told.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server listens on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// How often checkpoints and housekeeping run, in ms.
    pub maintenance_interval_ms: u64,
    /// How long shutdown waits for open calls to finish before closing them, in ms.
    pub shutdown_grace_ms: u64,
    /// How long health reports NOT_SERVING before the server stops accepting, so load
    /// balancers move traffic away first, in ms.
    pub drain_delay_ms: u64,
    /// Concurrency and deadlines.
    pub limits: LimitsConfig,
    /// API keys.
    pub auth: AuthConfig,
    /// The Prometheus scrape endpoint.
    pub metrics: MetricsConfig,
    /// The web console, served on the metrics listener.
    pub console: crate::console::ConsoleConfig,
    /// TLS for the gRPC server.
    pub tls: TlsConfig,
    /// OpenTelemetry trace export.
    pub telemetry: TelemetryConfig,
    /// Logging.
    pub log: LogConfig,
    /// Ingest and recommend behaviour.
    pub engine: EngineConfig,
    /// How profiles grow and age.
    pub profiles: ProfilePolicy,
    /// Where state lives.
    pub store: StoreConfig,
    /// The online matrix factorisation model.
    pub model: MfConfig,
    /// Retrieval: exact scan below `retrieval.threshold_items` items, usearch HNSW above.
    pub retrieval: reflex_models::AnnConfig,
    /// The content model over catalog embeddings (off while `content.dim` is 0).
    pub content: reflex_models::ContentConfig,
    /// Repeat ("buy it again") and next-item signals learnt from every event.
    pub signals: reflex_models::SignalsConfig,
    /// Model versions: scheduled snapshots, retention, the learner lease.
    pub versions: VersionsConfig,
    /// Continuous prequential evaluation, the holdout and the automatic rollback.
    pub quality: QualityConfig,
    /// Scheduled refits of the batch baseline, judged on the holdout.
    pub refit: crate::refit::RefitConfig,
    /// Where events come from besides the gRPC stream: Kafka topics (off by default).
    pub source: SourceConfig,
    /// Where accepted events are mirrored: a Kafka topic (off by default).
    pub sink: SinkConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_message_bytes: 4 * 1024 * 1024,
            maintenance_interval_ms: 5_000,
            shutdown_grace_ms: 10_000,
            drain_delay_ms: 0,
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            metrics: MetricsConfig::default(),
            console: crate::console::ConsoleConfig::default(),
            tls: TlsConfig::default(),
            telemetry: TelemetryConfig::default(),
            log: LogConfig::default(),
            engine: EngineConfig::default(),
            profiles: ProfilePolicy::default(),
            store: StoreConfig::default(),
            model: MfConfig::default(),
            retrieval: reflex_models::AnnConfig::default(),
            content: reflex_models::ContentConfig::default(),
            signals: reflex_models::SignalsConfig::default(),
            versions: VersionsConfig::default(),
            quality: QualityConfig::default(),
            refit: crate::refit::RefitConfig::default(),
            source: SourceConfig::default(),
            sink: SinkConfig::default(),
        }
    }
}

/// Model versions and the learner.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VersionsConfig {
    /// The learner snapshots the model this often, in ms; 0 never (on demand only).
    pub snapshot_interval_ms: u64,
    /// Versions kept; older ones are pruned after each scheduled snapshot.
    pub keep: usize,
    /// Snapshot when the learner shuts down, so the next start replays less of the log.
    pub snapshot_on_shutdown: bool,
    /// How long the learner lease lasts without renewal, in ms: the longest another
    /// replica waits to take over when the learner dies. Renewed every third of it.
    pub lease_ttl_ms: u64,
    /// This replica's name in the lease and in versions; the host name (or `reflex`)
    /// and the process id when empty.
    pub replica_name: String,
}

impl Default for VersionsConfig {
    fn default() -> Self {
        Self {
            snapshot_interval_ms: 10 * 60 * 1000,
            keep: 10,
            snapshot_on_shutdown: true,
            lease_ttl_ms: 10_000,
            replica_name: String::new(),
        }
    }
}

impl VersionsConfig {
    /// The replica's name: configured, or host name and process id.
    pub fn replica(&self) -> String {
        if !self.replica_name.is_empty() {
            return self.replica_name.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "reflex".into());
        format!("{host}-{}", std::process::id())
    }

    /// Checks every field's range, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        at_least("keep", self.keep, 1)?;
        at_least("lease_ttl_ms", self.lease_ttl_ms, MIN_LEASE_TTL_MS)
    }
}

/// Concurrency limits and deadlines.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Calls running at once across all connections; more are refused, not queued.
    /// An event stream counts only until its response starts: `max_streams` bounds it.
    pub max_concurrent_calls: usize,
    /// `EventService.Stream` calls open at once, each counted for its whole life; one
    /// more is refused at once, not queued.
    pub max_streams: usize,
    /// Longest a unary call may run, whatever deadline the client sets, in ms; not
    /// `ModelService`'s `Snapshot`, `Rollback` and `Refit`, which take as long as the
    /// model needs (within the client's own deadline, and to the end even past it).
    pub max_call_ms: u64,
    /// Retry advice sent with a refusal at the call or stream limit, in ms.
    pub retry_pushback_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_concurrent_calls: 1024,
            max_streams: 256,
            max_call_ms: 10_000,
            retry_pushback_ms: 100,
        }
    }
}

impl LimitsConfig {
    /// Checks every field's range, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        at_least("max_concurrent_calls", self.max_concurrent_calls, 1)?;
        at_least("max_streams", self.max_streams, 1)
    }
}

/// TLS for the gRPC server (rustls).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Serve TLS instead of plaintext.
    pub enabled: bool,
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate it signed.
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    /// The tonic TLS settings, reading the PEM files.
    pub fn server_config(&self) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
        use anyhow::Context as _;
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .with_context(|| format!("reading the TLS {what} {}", path.display()))
        };
        let identity = Identity::from_pem(
            read(&self.cert_file, "certificate")?,
            read(&self.key_file, "key")?,
        );
        let mut tls = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca_file {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
        }
        Ok(tls)
    }
}

/// The `source` section: event sources besides the gRPC stream.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Consume Kafka topics as a consumer group (`source.kafka.*`).
    pub kafka: KafkaSourceConfig,
}

/// The `sink` section: where accepted events are handed on.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Mirror accepted events to a Kafka topic (`sink.kafka.*`).
    pub kafka: KafkaSinkConfig,
}

/// How the records of the source's topics are encoded.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// One JSON object a record (see the README, "Events from Kafka").
    #[default]
    Json,
    /// The binary protobuf `reflex.v1.Event`.
    Protobuf,
}

/// Where a consumer group without committed offsets starts reading.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartPosition {
    /// The oldest record the broker holds.
    #[default]
    Earliest,
    /// Only records produced after the group first joins.
    Latest,
}

/// The topic kind that means "each record names its own kind".
pub const KIND_FROM_PAYLOAD: &str = "payload";

/// `source.kafka`: consume interaction topics as a consumer group. Every record goes
/// through the same ingest as a gRPC event; offsets are committed only once the engine
/// has recorded the records, so a redelivery answers `DUPLICATE`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSourceConfig {
    /// Consume; nothing below matters while off.
    pub enabled: bool,
    /// Bootstrap brokers, `host:port` separated by commas (librdkafka `bootstrap.servers`).
    pub brokers: String,
    /// Consumer group; replicas in one group share the partitions.
    pub group_id: String,
    /// Topics to consume, each with the event kind its records carry (`view`, `click`,
    /// `add_to_cart`, `remove_from_cart`, `purchase`, `custom:NAME`) or `payload` when
    /// each record names its own. A configured kind overrides the record's.
    pub topics: std::collections::BTreeMap<String, String>,
    /// How records are encoded: `json` or `protobuf`.
    pub format: PayloadFormat,
    /// Where a group without committed offsets starts: `earliest` or `latest`.
    pub start: StartPosition,
    /// Topic that receives records that cannot be parsed or are rejected, with the
    /// reason in the `reflex-reason` header; empty drops them (logged and counted).
    pub dead_letter_topic: String,
    /// Most records handed to ingest at once (at most `engine.max_batch`).
    pub max_batch: usize,
    /// How long a batch waits for more records after its first, in ms.
    pub batch_linger_ms: u64,
    /// First wait before ingest is retried while the engine refuses a batch (store
    /// unavailable, overloaded), doubled up to 5 s; the partitions are paused meanwhile.
    pub retry_backoff_ms: u64,
    /// More librdkafka settings, passed through as they are (`security.protocol`,
    /// `sasl.mechanism`, `ssl.ca.location`, `session.timeout.ms`, …).
    pub properties: std::collections::BTreeMap<String, String>,
    /// librdkafka settings whose value is read from an environment variable, named
    /// here (`"sasl.password" = "REFLEX_SECRET_KAFKA_PASSWORD"`), so secrets stay out of
    /// the file.
    pub secret_properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaSourceConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            brokers: "localhost:9092".into(),
            group_id: "reflex".into(),
            topics: Default::default(),
            format: PayloadFormat::Json,
            start: StartPosition::Earliest,
            dead_letter_topic: String::new(),
            max_batch: 500,
            batch_linger_ms: 5,
            retry_backoff_ms: 100,
            properties: Default::default(),
            secret_properties: Default::default(),
        }
    }
}

impl KafkaSourceConfig {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        non_empty("brokers", &self.brokers)?;
        non_empty("group_id", &self.group_id)?;
        if self.topics.is_empty() {
            return Err("topics must name at least one topic while enabled".into());
        }
        for (topic, kind) in &self.topics {
            non_empty("topics (a topic name)", topic)?;
            if kind != KIND_FROM_PAYLOAD && reflex_core::EventKind::from_label(kind).is_none() {
                return Err(format!(
                    "topics.{topic} is {kind:?}: expected view, click, add_to_cart, \
                     remove_from_cart, purchase, custom:NAME or {KIND_FROM_PAYLOAD}"
                ));
            }
        }
        if self.topics.contains_key(&self.dead_letter_topic) {
            return Err(format!(
                "dead_letter_topic {:?} is also a source topic",
                self.dead_letter_topic
            ));
        }
        at_least("max_batch", self.max_batch, 1)?;
        at_least("retry_backoff_ms", self.retry_backoff_ms, 1)?;
        reserved_properties(&self.properties, &self.secret_properties, SOURCE_OWNED)
    }
}

/// `sink.kafka`: mirror every accepted event (and every duplicate, so a retry after a
/// failed delivery is mirrored too) as JSON to a topic keyed by user, at least once:
/// an ingest whose mirror was not delivered is not acknowledged (gRPC answers
/// `UNAVAILABLE`, the source does not commit), and its retry is mirrored as
/// `duplicate`. Consumers deduplicate by `event_id`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSinkConfig {
    /// Mirror; nothing below matters while off.
    pub enabled: bool,
    /// Bootstrap brokers, `host:port` separated by commas.
    pub brokers: String,
    /// The topic that receives the events.
    pub topic: String,
    /// Longest wait for the broker to confirm a batch's records, in ms (librdkafka
    /// `message.timeout.ms`).
    pub delivery_timeout_ms: u64,
    /// More librdkafka producer settings, passed through as they are.
    pub properties: std::collections::BTreeMap<String, String>,
    /// librdkafka settings read from the environment variable named here.
    pub secret_properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaSinkConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            brokers: "localhost:9092".into(),
            topic: "reflex_events".into(),
            delivery_timeout_ms: 5_000,
            properties: Default::default(),
            secret_properties: Default::default(),
        }
    }
}

impl KafkaSinkConfig {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        non_empty("brokers", &self.brokers)?;
        non_empty("topic", &self.topic)?;
        at_least("delivery_timeout_ms", self.delivery_timeout_ms, 1)?;
        reserved_properties(&self.properties, &self.secret_properties, SINK_OWNED)
    }
}

/// librdkafka settings the source sets itself: passing them would break its guarantees.
const SOURCE_OWNED: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
];
/// librdkafka settings the sink sets itself.
const SINK_OWNED: &[&str] = &["bootstrap.servers", "message.timeout.ms"];

/// Refuses passed-through librdkafka settings that the section's own keys set.
fn reserved_properties(
    properties: &std::collections::BTreeMap<String, String>,
    secrets: &std::collections::BTreeMap<String, String>,
    owned: &[&str],
) -> Result<(), String> {
    for key in properties.keys().chain(secrets.keys()) {
        if owned.contains(&key.as_str()) {
            return Err(format!(
                "properties.{key} is set by the section's own keys and cannot be passed through"
            ));
        }
    }
    Ok(())
}

/// Refuses an empty (or blank) `value` of the setting `name`.
fn non_empty(name: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{name} must not be empty"));
    }
    Ok(())
}

/// The `store` section (which backend holds profiles, the event log and the catalog, and
/// the settings of each) lives with the backends, which open it.
pub use reflex_storage::{Backend, StoreConfig};

/// Settings given as command-line flags, which win over everything else.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlagOverrides {
    /// `--listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `--data-dir`, stored as `store.embedded.data_dir`.
    #[serde(skip)]
    pub data_dir: Option<PathBuf>,
}

/// `REFLEX_…` variables that are not settings, so the strict loader must not see them:
/// the configuration file's own path, and the variables of the project's test and chart
/// tooling (which share the prefix and would otherwise make every key unknown).
pub const NOT_SETTINGS: &[&str] = &["config", "data_dir", "bin", "helm_optional"];

/// `REFLEX_SECRET_…` variables are not settings either: they hold secrets that settings
/// such as `store.scylla.password_env` or `store.redis.password_env` name (the chart
/// fills them from Kubernetes Secrets).
pub const SECRET_VARIABLES: &str = "secret_";

/// The shortest `maintenance_interval_ms`: checkpoints more often would only cost.
pub const MIN_MAINTENANCE_INTERVAL_MS: u64 = 10;

/// The shortest `versions.lease_ttl_ms`: the lease is renewed every third of it, at most
/// every 10 ms.
pub const MIN_LEASE_TTL_MS: u64 = 30;

/// Refuses `value` of the setting `name` below `min`.
fn at_least<T: PartialOrd + std::fmt::Display>(name: &str, value: T, min: T) -> Result<(), String> {
    if value < min {
        return Err(format!("{name} must be at least {min}, got {value}"));
    }
    Ok(())
}

/// Checks the `engine` section, naming its first bad key.
fn validate_engine(engine: &EngineConfig) -> Result<(), String> {
    at_least("max_batch", engine.max_batch, 1)?;
    at_least("max_count", engine.max_count, 1)?;
    if engine.cache_entries > 0 && engine.cache_ttl_ms == 0 {
        return Err(
            "cache_ttl_ms must be at least 1 while the cache is on (cache_entries > 0)".into(),
        );
    }
    Ok(())
}

/// Checks the `quality` section, naming its first bad key.
fn validate_quality(quality: &QualityConfig) -> Result<(), String> {
    for (name, share) in [
        ("sample_ratio", quality.sample_ratio),
        ("holdout_ratio", quality.holdout_ratio),
        ("max_drop", quality.max_drop),
    ] {
        if !(0.0..=1.0).contains(&share) {
            return Err(format!("{name} must be 0 to 1, got {share}"));
        }
    }
    if !(quality.half_life_events.is_finite() && quality.half_life_events > 0.0) {
        return Err(format!(
            "half_life_events must be finite and > 0, got {}",
            quality.half_life_events
        ));
    }
    at_least("min_events", quality.min_events, 1)?;
    at_least("max_scored_per_sec", quality.max_scored_per_sec, 1)
}

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file, variable or flag did not fit the schema.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// The configuration file given does not exist.
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    /// Settings out of range, every one found, each named by its section and key
    /// (see [`Config::validate`]).
    #[error("invalid configuration: {}", .0.join("; "))]
    Settings(Vec<String>),
}

impl Config {
    /// Loads defaults, then `file` (if given), then `REFLEX_…` variables, then flags.
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::MissingFile(file.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment
            .merge(
                Env::prefixed("REFLEX_")
                    .ignore(NOT_SETTINGS)
                    .filter(|key| {
                        !key.as_str()
                            .get(..SECRET_VARIABLES.len())
                            .is_some_and(|p| p.eq_ignore_ascii_case(SECRET_VARIABLES))
                    })
                    .split("__"),
            )
            .merge(Serialized::defaults(flags));
        if let Some(dir) = &flags.data_dir {
            figment = figment.merge(Serialized::default("store.embedded.data_dir", dir));
        }
        let config: Self = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every section (each section's own check names its first bad key), so that
    /// an out-of-range value is refused at load by name rather than quietly replaced or
    /// clamped where it is used. Returns every section's problem at once, each as
    /// `section.key …`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut section = |name: &str, checked: Result<(), String>| {
            if let Err(problem) = checked {
                problems.push(if name.is_empty() {
                    problem
                } else {
                    format!("{name}.{problem}")
                });
            }
        };
        section("", self.validate_top_level());
        section("limits", self.limits.validate());
        section("console", self.console.validate(self.metrics.enabled));
        section("telemetry", self.telemetry.validate());
        section("engine", validate_engine(&self.engine));
        section("model", self.model.validate());
        section("retrieval", self.retrieval.validate());
        section("content", self.content.validate());
        section("signals", self.signals.validate());
        section("versions", self.versions.validate());
        section("refit", self.refit.validate());
        section("quality", validate_quality(&self.quality));
        section("source.kafka", self.source.kafka.validate());
        section("sink.kafka", self.sink.kafka.validate());
        if let Err(err) = self.store.validate() {
            // The backends name their keys in full (`store.redis.prefix`).
            problems.push(match err {
                reflex_core::Error::InvalidArgument { field, reason } => {
                    format!("{field} {reason}")
                }
                other => format!("store: {other}"),
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Settings(problems))
        }
    }

    /// Checks the keys outside every section.
    fn validate_top_level(&self) -> Result<(), String> {
        at_least("max_message_bytes", self.max_message_bytes, 1)?;
        at_least(
            "maintenance_interval_ms",
            self.maintenance_interval_ms,
            MIN_MAINTENANCE_INTERVAL_MS,
        )
    }

    /// The effective configuration as TOML with every secret masked, for `reflex config`.
    pub fn to_toml_redacted(&self) -> Result<String, toml::ser::Error> {
        let mut shown = self.clone();
        shown.store.redis.url = shown.store.redis.url_redacted();
        for key in &mut shown.auth.keys {
            key.key = "********".into();
        }
        // Secrets belong in `secret_properties`; any passed through in the clear are
        // masked all the same.
        for properties in [
            &mut shown.source.kafka.properties,
            &mut shown.sink.kafka.properties,
        ] {
            for (key, value) in properties.iter_mut() {
                if key.contains("password") || key.contains("secret") || key.contains("key.pem") {
                    *value = "********".into();
                }
            }
        }
        toml::to_string_pretty(&shown)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn defaults_load_without_any_source() {
        figment::Jail::expect_with(|_| {
            let config =
                Config::load(None, &FlagOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(config, Config::default());
            Ok(())
        });
    }

    #[test]
    fn out_of_range_model_settings_are_refused_by_name() {
        // The load's error, which must name `setting`.
        fn refused(setting: &str) -> Result<(), String> {
            let err = Config::load(None, &FlagOverrides::default())
                .err()
                .ok_or(format!("a bad {setting} was accepted"))?
                .to_string();
            assert!(err.contains(setting), "{err}");
            Ok(())
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("REFLEX_MODEL__NEGATIVE_ITEM_STEPS", "true");
            refused("model.negative_item_steps")?;
            jail.set_env("REFLEX_MODEL__NEGATIVE_SAMPLING", "uniform");
            jail.set_env("REFLEX_MODEL__FACTORS", "0");
            refused("model.factors")?;
            jail.set_env("REFLEX_MODEL__FACTORS", "32");
            let config =
                Config::load(None, &FlagOverrides::default()).map_err(|e| e.to_string())?;
            assert!(config.model.negative_item_steps);
            Ok(())
        });
    }

    #[test]
    fn bad_values_in_two_sections_are_both_refused_by_name() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("REFLEX_MODEL__FACTORS", "0");
            jail.set_env("REFLEX_STORE__BACKEND", "redis");
            jail.set_env("REFLEX_STORE__REDIS__PREFIX", "a{b}");
            let err = Config::load(None, &FlagOverrides::default())
                .err()
                .ok_or("bad settings were accepted")?
                .to_string();
            assert!(err.starts_with("invalid configuration: "), "{err}");
            assert!(err.contains("model.factors must be 1 to"), "{err}");
            assert!(err.contains("; store.redis.prefix must be"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn values_once_clamped_where_used_are_refused() {
        let mut config = Config::default();
        config.validate().unwrap();
        config.maintenance_interval_ms = 5;
        config.limits.max_streams = 0;
        config.telemetry.sample_ratio = 1.5;
        config.engine.max_batch = 0;
        config.versions.lease_ttl_ms = 20;
        config.quality.max_drop = -0.1;
        config.content.blend_weight = 2.0;
        config.retrieval.connectivity = 1;
        config.store.embedded.data_dir = PathBuf::new();
        let Err(ConfigError::Settings(problems)) = config.validate() else {
            panic!("bad settings were accepted");
        };
        let named: Vec<&str> = problems
            .iter()
            .map(|p| p.split(' ').next().unwrap_or_default())
            .collect();
        assert_eq!(
            named,
            [
                "maintenance_interval_ms",
                "limits.max_streams",
                "telemetry.sample_ratio",
                "engine.max_batch",
                "retrieval.connectivity",
                "content.blend_weight",
                "versions.lease_ttl_ms",
                "quality.max_drop",
                "store.embedded.data_dir",
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn file_then_env_then_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "reflex.toml",
                "listen = \"127.0.0.1:1\"\nmax_message_bytes = 10\n[engine]\nmax_batch = 7\n",
            )?;
            jail.set_env("REFLEX_MAX_MESSAGE_BYTES", "20");
            jail.set_env("REFLEX_ENGINE__MAX_BATCH", "8");
            let flags = FlagOverrides {
                listen: Some(
                    "127.0.0.1:3"
                        .parse()
                        .map_err(|e: std::net::AddrParseError| e.to_string())?,
                ),
                data_dir: Some("/tmp/x".into()),
            };
            let config =
                Config::load(Some(Path::new("reflex.toml")), &flags).map_err(|e| e.to_string())?;
            assert_eq!(config.listen.port(), 3, "flag beats file");
            assert_eq!(config.max_message_bytes, 20, "env beats file");
            assert_eq!(config.engine.max_batch, 8, "nested env key");
            assert_eq!(config.store.embedded.data_dir, PathBuf::from("/tmp/x"));
            assert_eq!(config.quality, QualityConfig::default());
            Ok(())
        });
    }

    #[test]
    fn quality_section_loads_and_rejects_unknown_keys() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "reflex.toml",
                "[quality]\nsample_ratio = 1.0\nmin_events = 50\nauto_rollback = false\n",
            )?;
            jail.set_env("REFLEX_QUALITY__MAX_DROP", "0.3");
            let config = Config::load(Some(Path::new("reflex.toml")), &FlagOverrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(config.quality.sample_ratio, 1.0);
            assert_eq!(config.quality.min_events, 50);
            assert!(!config.quality.auto_rollback);
            assert_eq!(config.quality.max_drop, 0.3);
            assert_eq!(config.quality.holdout_ratio, 0.01, "default kept");
            jail.create_file("bad.toml", "[quality]\nsample_rate = 1.0\n")?;
            let err =
                Config::load(Some(Path::new("bad.toml")), &FlagOverrides::default()).unwrap_err();
            assert!(err.to_string().contains("sample_rate"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn printed_configuration_masks_keys() {
        let mut config = Config::default();
        config.auth.keys.push(crate::middleware::ApiKey {
            name: "shop".into(),
            key: "super-secret-key-123".into(),
            scopes: vec![crate::middleware::Scope::Ingest],
        });
        let text = config.to_toml_redacted().unwrap();
        assert!(!text.contains("super-secret-key-123"));
        assert!(text.contains("shop"));
    }

    #[test]
    fn tooling_variables_are_not_settings() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("REFLEX_HELM_OPTIONAL", "1");
            jail.set_env("REFLEX_DATA_DIR", "/somewhere");
            jail.set_env("REFLEX_BIN", "/bin/reflex");
            jail.set_env("REFLEX_CONFIG", "/nowhere.toml");
            jail.set_env("REFLEX_SECRET_SCYLLA_PASSWORD", "hunter2");
            jail.set_env(
                "REFLEX_STORE__SCYLLA__PASSWORD_ENV",
                "REFLEX_SECRET_SCYLLA_PASSWORD",
            );
            let config =
                Config::load(None, &FlagOverrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(
                config.store.scylla.password_env.as_deref(),
                Some("REFLEX_SECRET_SCYLLA_PASSWORD")
            );
            jail.set_env("REFLEX_LISTNE", "127.0.0.1:1");
            assert!(Config::load(None, &FlagOverrides::default()).is_err());
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("reflex.toml", "listne = \"127.0.0.1:1\"\n")?;
            let err = Config::load(Some(Path::new("reflex.toml")), &FlagOverrides::default())
                .unwrap_err();
            assert!(err.to_string().contains("listne"), "{err}");
            jail.clear_env();
            Ok(())
        });
    }

    #[test]
    fn the_kafka_source_and_sink_load_from_variables_and_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("REFLEX_SOURCE__KAFKA__ENABLED", "true");
            jail.set_env("REFLEX_SOURCE__KAFKA__BROKERS", "k1:9092,k2:9092");
            jail.set_env(
                "REFLEX_SOURCE__KAFKA__TOPICS",
                r#"{user_clicks="click",shop_events="payload"}"#,
            );
            jail.set_env("REFLEX_SOURCE__KAFKA__FORMAT", "protobuf");
            jail.set_env("REFLEX_SOURCE__KAFKA__START", "latest");
            jail.set_env(
                "REFLEX_SOURCE__KAFKA__PROPERTIES",
                r#"{"security.protocol"="SASL_SSL","sasl.password"="hunter2"}"#,
            );
            jail.set_env("REFLEX_SINK__KAFKA__ENABLED", "true");
            let config =
                Config::load(None, &FlagOverrides::default()).map_err(|e| e.to_string())?;
            let kafka = &config.source.kafka;
            assert_eq!(
                kafka.topics.get("user_clicks").map(String::as_str),
                Some("click")
            );
            assert_eq!(
                kafka.topics.get("shop_events").map(String::as_str),
                Some("payload")
            );
            assert_eq!(kafka.format, PayloadFormat::Protobuf);
            assert_eq!(kafka.start, StartPosition::Latest);
            assert_eq!(
                kafka
                    .properties
                    .get("security.protocol")
                    .map(String::as_str),
                Some("SASL_SSL")
            );
            let shown = config.to_toml_redacted().map_err(|e| e.to_string())?;
            assert!(!shown.contains("hunter2"), "{shown}");
            assert_eq!(config.sink.kafka.topic, "reflex_events");

            jail.set_env(
                "REFLEX_SOURCE__KAFKA__TOPICS",
                r#"{user_clicks="teleport"}"#,
            );
            jail.set_env("REFLEX_SOURCE__KAFKA__PROPERTIES", r#"{"group.id"="x"}"#);
            jail.set_env("REFLEX_SINK__KAFKA__TOPIC", "");
            let err = Config::load(None, &FlagOverrides::default())
                .err()
                .ok_or("bad kafka settings were accepted")?
                .to_string();
            assert!(err.contains("source.kafka.topics.user_clicks"), "{err}");
            assert!(err.contains("sink.kafka.topic must not be empty"), "{err}");
            Ok(())
        });
    }
}
