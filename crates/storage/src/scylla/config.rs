//! Configuration of the ScyllaDB backend.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use reflex_core::{Error, Result};
#[cfg(feature = "scylla")]
use scylla::statement::{Consistency, SerialConsistency};
use serde::{Deserialize, Serialize};

/// Seven days, the dedupe window the ingest contract promises by default.
const DEFAULT_DEDUPE_WINDOW_MS: i64 = 7 * 24 * 3600 * 1000;

/// Longest TTL Scylla accepts (20 years), in seconds.
pub(super) const MAX_TTL_SECONDS: i64 = 630_720_000;

/// Longest keyspace name Scylla accepts.
const MAX_KEYSPACE_LEN: usize = 48;

/// How the keyspace replicates.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum ReplicationClass {
    /// One ring, `replication_factor` copies; for a single datacenter or tests.
    SimpleStrategy,
    /// Copies per datacenter (`replication_factors`, or `replication_factor` in
    /// `local_datacenter`); what production clusters use.
    #[default]
    NetworkTopologyStrategy,
}

/// Consistency level of ordinary reads and writes (and the commit of lightweight
/// transactions). Written in lower case in configuration: `local_quorum`, `quorum`, `one`…
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ConsistencyLevel {
    /// Any replica or hint (writes only).
    Any,
    /// One replica.
    One,
    /// Two replicas.
    Two,
    /// Three replicas.
    Three,
    /// A majority of all replicas.
    Quorum,
    /// Every replica.
    All,
    /// A majority of the replicas in the local datacenter.
    #[default]
    LocalQuorum,
    /// A majority in every datacenter (writes only).
    EachQuorum,
    /// One replica in the local datacenter.
    LocalOne,
}

impl ConsistencyLevel {
    const ALL: [(Self, &'static str); 9] = [
        (Self::Any, "any"),
        (Self::One, "one"),
        (Self::Two, "two"),
        (Self::Three, "three"),
        (Self::Quorum, "quorum"),
        (Self::All, "all"),
        (Self::LocalQuorum, "local_quorum"),
        (Self::EachQuorum, "each_quorum"),
        (Self::LocalOne, "local_one"),
    ];

    /// The name configuration uses.
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(level, _)| *level == self)
            .map_or("local_quorum", |(_, name)| name)
    }

    /// The driver's value.
    #[cfg(feature = "scylla")]
    pub fn to_driver(self) -> Consistency {
        match self {
            Self::Any => Consistency::Any,
            Self::One => Consistency::One,
            Self::Two => Consistency::Two,
            Self::Three => Consistency::Three,
            Self::Quorum => Consistency::Quorum,
            Self::All => Consistency::All,
            Self::LocalQuorum => Consistency::LocalQuorum,
            Self::EachQuorum => Consistency::EachQuorum,
            Self::LocalOne => Consistency::LocalOne,
        }
    }
}

/// Normalises spellings like `LOCAL-QUORUM` or `Local_Quorum` to the configuration form.
fn normalise(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace('-', "_")
}

impl FromStr for ConsistencyLevel {
    type Err = String;

    /// Case-insensitive; `-` may stand for `_`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let name = normalise(s);
        Self::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(level, _)| *level)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                format!(
                    "unknown consistency {s:?}, expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl TryFrom<String> for ConsistencyLevel {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<ConsistencyLevel> for String {
    fn from(level: ConsistencyLevel) -> Self {
        level.as_str().into()
    }
}

impl fmt::Display for ConsistencyLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Consistency of the Paxos phase of lightweight transactions (`IF …`) and of the reads
/// that settle their uncertain outcomes: `local_serial` or `serial`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SerialConsistencyLevel {
    /// Paxos among the replicas of every datacenter.
    Serial,
    /// Paxos among the replicas of the local datacenter.
    #[default]
    LocalSerial,
}

impl SerialConsistencyLevel {
    /// The name configuration uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serial => "serial",
            Self::LocalSerial => "local_serial",
        }
    }

    /// The driver's value for the Paxos phase.
    #[cfg(feature = "scylla")]
    pub fn to_driver(self) -> SerialConsistency {
        match self {
            Self::Serial => SerialConsistency::Serial,
            Self::LocalSerial => SerialConsistency::LocalSerial,
        }
    }

    /// The driver's value for a linearizable read.
    #[cfg(feature = "scylla")]
    pub fn to_read_consistency(self) -> Consistency {
        match self {
            Self::Serial => Consistency::Serial,
            Self::LocalSerial => Consistency::LocalSerial,
        }
    }
}

impl FromStr for SerialConsistencyLevel {
    type Err = String;

    /// Case-insensitive; `-` may stand for `_`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match normalise(s).as_str() {
            "serial" => Ok(Self::Serial),
            "local_serial" => Ok(Self::LocalSerial),
            _ => Err(format!(
                "unknown serial consistency {s:?}, expected serial or local_serial"
            )),
        }
    }
}

impl TryFrom<String> for SerialConsistencyLevel {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<SerialConsistencyLevel> for String {
    fn from(level: SerialConsistencyLevel) -> Self {
        level.as_str().into()
    }
}

/// Settings of the ScyllaDB store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ScyllaConfig {
    /// Nodes to learn the cluster from, `host:port` (the driver discovers the rest).
    pub contact_points: Vec<String>,
    /// Keyspace holding Reflex's tables; created at start-up when missing. Lower-case
    /// letters, digits and `_`, starting with a letter, at most 48 characters.
    pub keyspace: String,
    /// Datacenter whose nodes are preferred (and which `local_*` consistency levels mean);
    /// `None` treats every node alike. Requests are token-aware either way.
    pub local_datacenter: Option<String>,
    /// Replication strategy of the keyspace, used only when it is created.
    pub replication_class: ReplicationClass,
    /// Copies of each row: the factor for `SimpleStrategy`, and for
    /// `NetworkTopologyStrategy` the factor in `local_datacenter` when
    /// `replication_factors` is empty.
    pub replication_factor: u32,
    /// Copies per datacenter for `NetworkTopologyStrategy`, e.g. `{ dc1 = 3, dc2 = 3 }`.
    pub replication_factors: BTreeMap<String, u32>,
    /// Consistency of reads and writes.
    pub consistency: ConsistencyLevel,
    /// Consistency of the Paxos phase of lightweight transactions.
    pub serial_consistency: SerialConsistencyLevel,
    /// User name for password authentication; `None` connects without.
    pub username: Option<String>,
    /// Name of an environment variable holding the password (e.g. filled from a
    /// Kubernetes Secret); required with `username`.
    pub password_env: Option<String>,
    /// How long to wait for connections at start-up, in ms.
    pub connect_timeout_ms: u64,
    /// How long one request may take before it fails with `UNAVAILABLE`, in ms.
    pub request_timeout_ms: u64,
    /// How long an event id stays a duplicate after it was first recorded, in ms.
    pub dedupe_window_ms: i64,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        Self {
            contact_points: vec!["127.0.0.1:9042".into()],
            keyspace: "reflex".into(),
            local_datacenter: None,
            replication_class: ReplicationClass::SimpleStrategy,
            replication_factor: 1,
            replication_factors: BTreeMap::new(),
            consistency: ConsistencyLevel::LocalQuorum,
            serial_consistency: SerialConsistencyLevel::LocalSerial,
            username: None,
            password_env: None,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 2_000,
            dedupe_window_ms: DEFAULT_DEDUPE_WINDOW_MS,
        }
    }
}

fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

impl ScyllaConfig {
    /// A default configuration for the cluster at `contact_point`, tables in `keyspace`.
    pub fn new(contact_point: impl Into<String>, keyspace: impl Into<String>) -> Self {
        Self {
            contact_points: vec![contact_point.into()],
            keyspace: keyspace.into(),
            ..Self::default()
        }
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<()> {
        if self.contact_points.is_empty() || self.contact_points.iter().any(|c| c.is_empty()) {
            return Err(Error::invalid(
                "store.scylla.contact_points",
                "must name at least one host:port, none empty",
            ));
        }
        let ks = &self.keyspace;
        let mut chars = ks.chars();
        if !chars.next().is_some_and(|c| c.is_ascii_lowercase())
            || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            || ks.len() > MAX_KEYSPACE_LEN
        {
            return Err(Error::invalid(
                "store.scylla.keyspace",
                format!(
                    "{ks:?} must start with a lower-case letter and hold only a-z, 0-9 and _, \
                     at most {MAX_KEYSPACE_LEN} characters"
                ),
            ));
        }
        if let Some(dc) = &self.local_datacenter
            && !plain_name(dc)
        {
            return Err(Error::invalid(
                "store.scylla.local_datacenter",
                "must be a non-empty name of letters, digits, `_`, `-` and `.`",
            ));
        }
        if self.replication_factor == 0 {
            return Err(Error::invalid(
                "store.scylla.replication_factor",
                "must be at least 1",
            ));
        }
        if let Some((dc, _)) = self
            .replication_factors
            .iter()
            .find(|(dc, n)| !plain_name(dc) || **n == 0)
        {
            return Err(Error::invalid(
                "store.scylla.replication_factors",
                format!("datacenter {dc:?} needs a plain name and a factor of at least 1"),
            ));
        }
        match self.replication_class {
            ReplicationClass::SimpleStrategy if !self.replication_factors.is_empty() => {
                return Err(Error::invalid(
                    "store.scylla.replication_factors",
                    "applies to NetworkTopologyStrategy only; SimpleStrategy uses \
                     replication_factor",
                ));
            }
            ReplicationClass::NetworkTopologyStrategy
                if self.replication_factors.is_empty() && self.local_datacenter.is_none() =>
            {
                return Err(Error::invalid(
                    "store.scylla.replication_class",
                    "NetworkTopologyStrategy needs replication_factors or local_datacenter",
                ));
            }
            _ => {}
        }
        if self.username.is_some() != self.password_env.is_some() {
            return Err(Error::invalid(
                "store.scylla.password_env",
                "username and password_env go together",
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err(Error::invalid(
                "store.scylla.connect_timeout_ms",
                "must be positive",
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(Error::invalid(
                "store.scylla.request_timeout_ms",
                "must be positive",
            ));
        }
        if self.dedupe_window_ms <= 0 || self.dedupe_window_ms / 1000 >= MAX_TTL_SECONDS {
            return Err(Error::invalid(
                "store.scylla.dedupe_window_ms",
                format!(
                    "is {}, must be positive and under 20 years",
                    self.dedupe_window_ms
                ),
            ));
        }
        Ok(())
    }

    /// The replication map of `CREATE KEYSPACE`, e.g.
    /// `{'class': 'SimpleStrategy', 'replication_factor': 3}`. Call after
    /// [`validate`](Self::validate), which keeps quotes out of datacenter names.
    pub fn replication(&self) -> String {
        match self.replication_class {
            ReplicationClass::SimpleStrategy => format!(
                "{{'class': 'SimpleStrategy', 'replication_factor': {}}}",
                self.replication_factor
            ),
            ReplicationClass::NetworkTopologyStrategy => {
                let factors: Vec<String> = if self.replication_factors.is_empty() {
                    self.local_datacenter
                        .iter()
                        .map(|dc| format!("'{dc}': {}", self.replication_factor))
                        .collect()
                } else {
                    self.replication_factors
                        .iter()
                        .map(|(dc, n)| format!("'{dc}': {n}"))
                        .collect()
                };
                format!(
                    "{{'class': 'NetworkTopologyStrategy', {}}}",
                    factors.join(", ")
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_the_field() {
        ScyllaConfig::default().validate().unwrap();
        type Change = Box<dyn Fn(&mut ScyllaConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("contact_points", Box::new(|c| c.contact_points.clear())),
            ("keyspace", Box::new(|c| c.keyspace = "Reflex".into())),
            ("keyspace", Box::new(|c| c.keyspace = "1abc".into())),
            ("keyspace", Box::new(|c| c.keyspace = "a;drop".into())),
            ("keyspace", Box::new(|c| c.keyspace = "a".repeat(49))),
            (
                "local_datacenter",
                Box::new(|c| c.local_datacenter = Some("dc'1".into())),
            ),
            ("replication_factor", Box::new(|c| c.replication_factor = 0)),
            (
                "replication_factors",
                Box::new(|c| {
                    c.replication_factors.insert("dc1".into(), 3);
                }),
            ),
            (
                "replication_class",
                Box::new(|c| c.replication_class = ReplicationClass::NetworkTopologyStrategy),
            ),
            (
                "password_env",
                Box::new(|c| c.username = Some("reflex".into())),
            ),
            ("connect_timeout_ms", Box::new(|c| c.connect_timeout_ms = 0)),
            ("request_timeout_ms", Box::new(|c| c.request_timeout_ms = 0)),
            ("dedupe_window_ms", Box::new(|c| c.dedupe_window_ms = 0)),
        ];
        for (field, change) in cases {
            let mut c = ScyllaConfig::default();
            change(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains(&format!("store.scylla.{field}")),
                "{field}: {err}"
            );
        }
    }

    #[test]
    fn replication_maps_for_both_strategies() {
        let simple = ScyllaConfig {
            replication_factor: 3,
            ..ScyllaConfig::default()
        };
        assert_eq!(
            simple.replication(),
            "{'class': 'SimpleStrategy', 'replication_factor': 3}"
        );

        let local = ScyllaConfig {
            replication_class: ReplicationClass::NetworkTopologyStrategy,
            local_datacenter: Some("eu-west".into()),
            replication_factor: 3,
            ..ScyllaConfig::default()
        };
        local.validate().unwrap();
        assert_eq!(
            local.replication(),
            "{'class': 'NetworkTopologyStrategy', 'eu-west': 3}"
        );

        let multi = ScyllaConfig {
            replication_class: ReplicationClass::NetworkTopologyStrategy,
            replication_factors: [("dc2".to_string(), 2), ("dc1".to_string(), 3)].into(),
            ..ScyllaConfig::default()
        };
        multi.validate().unwrap();
        assert_eq!(
            multi.replication(),
            "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"
        );
    }

    #[test]
    fn consistency_levels_parse_in_any_case_and_round_trip() {
        for (level, name) in ConsistencyLevel::ALL {
            assert_eq!(name.parse::<ConsistencyLevel>(), Ok(level));
            assert_eq!(name.to_uppercase().parse::<ConsistencyLevel>(), Ok(level));
            assert_eq!(level.to_string(), name);
        }
        assert_eq!(
            "LOCAL-QUORUM".parse::<ConsistencyLevel>(),
            Ok(ConsistencyLevel::LocalQuorum)
        );
        let err = "serial".parse::<ConsistencyLevel>().unwrap_err();
        assert!(err.contains("local_quorum"), "{err}");

        assert_eq!(
            "SERIAL".parse::<SerialConsistencyLevel>(),
            Ok(SerialConsistencyLevel::Serial)
        );
        assert_eq!(
            "local_serial".parse::<SerialConsistencyLevel>(),
            Ok(SerialConsistencyLevel::LocalSerial)
        );
        assert!("quorum".parse::<SerialConsistencyLevel>().is_err());
    }

    #[test]
    #[cfg(feature = "scylla")]
    fn levels_map_to_the_drivers_values() {
        assert_eq!(
            ConsistencyLevel::LocalQuorum.to_driver(),
            Consistency::LocalQuorum
        );
        assert_eq!(
            ConsistencyLevel::EachQuorum.to_driver(),
            Consistency::EachQuorum
        );
        assert_eq!(
            SerialConsistencyLevel::LocalSerial.to_driver(),
            SerialConsistency::LocalSerial
        );
        assert_eq!(
            SerialConsistencyLevel::Serial.to_read_consistency(),
            Consistency::Serial
        );
    }

    #[test]
    fn config_reads_from_json_with_string_levels_and_rejects_unknown_fields() {
        let c: ScyllaConfig = serde_json::from_str(
            r#"{"contact_points": ["10.0.0.1:9042", "10.0.0.2:9042"], "keyspace": "shop",
                "consistency": "QUORUM", "serial_consistency": "serial",
                "replication_class": "NetworkTopologyStrategy", "local_datacenter": "dc1"}"#,
        )
        .unwrap();
        assert_eq!(c.consistency, ConsistencyLevel::Quorum);
        assert_eq!(c.serial_consistency, SerialConsistencyLevel::Serial);
        assert_eq!(c.request_timeout_ms, 2_000, "defaults fill the rest");
        c.validate().unwrap();
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["consistency"], "quorum");

        assert!(serde_json::from_str::<ScyllaConfig>(r#"{"consistency": "most"}"#).is_err());
        assert!(serde_json::from_str::<ScyllaConfig>(r#"{"hosts": []}"#).is_err());
    }
}
