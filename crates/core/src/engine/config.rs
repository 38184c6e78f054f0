//! The engine's own settings.

use serde::{Deserialize, Serialize};

use crate::filter::BotFilterConfig;
use crate::types::{EventLimits, KindWeights};

/// Engine settings that are not a backend's own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Most events in one batch.
    pub max_batch: usize,
    /// How far in the future an event timestamp may be, in ms.
    pub max_future_ms: i64,
    /// Learning weight per kind.
    pub weights: KindWeights,
    /// Bot and noise rules.
    pub bot_filter: BotFilterConfig,
    /// Which purchased items recommendations leave out unless the request says otherwise
    /// (`true`, `false` or `"auto"`).
    pub exclude_purchased: PurchasedPolicy,
    /// Drop every recently seen item unless the request says otherwise.
    pub exclude_seen: bool,
    /// Most items one request may ask for.
    pub max_count: usize,
    /// Recommend answers kept in the cache (entries); 0 turns it off.
    pub cache_entries: u64,
    /// Longest a cached answer is served, in ms. The user's own events never wait for it
    /// (they change the profile version in the key), nor do catalog changes and model
    /// version swaps; it bounds how long other users' events may move the shared model
    /// and popularity without the answer following.
    pub cache_ttl_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            max_future_ms: EventLimits::default().max_future_ms,
            weights: KindWeights::default(),
            bot_filter: BotFilterConfig::default(),
            exclude_purchased: PurchasedPolicy::Auto,
            exclude_seen: false,
            max_count: 500,
            cache_entries: 100_000,
            cache_ttl_ms: 1_000,
        }
    }
}

/// Which items a user bought are left out of their recommendations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PurchasedPolicy {
    /// Every one (`true`).
    All,
    /// None (`false`).
    None,
    /// What people do not buy again (a sofa) is left out; what they do (milk) comes back,
    /// ranked by how likely the user is to want it now. Learnt from the event stream.
    #[default]
    Auto,
}

impl From<bool> for PurchasedPolicy {
    fn from(exclude: bool) -> Self {
        if exclude { Self::All } else { Self::None }
    }
}

impl Serialize for PurchasedPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::All => s.serialize_bool(true),
            Self::None => s.serialize_bool(false),
            Self::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for PurchasedPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PurchasedPolicy;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(v.into())
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v.trim().to_ascii_lowercase().as_str() {
                    "auto" => Ok(PurchasedPolicy::Auto),
                    "true" => Ok(PurchasedPolicy::All),
                    "false" => Ok(PurchasedPolicy::None),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::PurchasedPolicy;

    #[test]
    fn the_purchased_policy_reads_booleans_and_auto() {
        #[derive(serde::Deserialize)]
        struct T {
            p: PurchasedPolicy,
        }
        let read = |s: &str| toml::from_str::<T>(s).map(|t| t.p);
        assert_eq!(read("p = true").unwrap(), PurchasedPolicy::All);
        assert_eq!(read("p = false").unwrap(), PurchasedPolicy::None);
        assert_eq!(read("p = \"auto\"").unwrap(), PurchasedPolicy::Auto);
        assert_eq!(read("p = \"TRUE\"").unwrap(), PurchasedPolicy::All);
        let err = read("p = \"sometimes\"").unwrap_err().to_string();
        assert!(err.contains("true, false or \"auto\""), "{err}");
    }
}
