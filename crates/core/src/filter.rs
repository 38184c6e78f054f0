//! The bot and noise filter: a context flag, user-agent rules and a per-user rate limit.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use crate::types::{Event, UserId};

/// Rules that mark events as bot or noise traffic.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BotFilterConfig {
    /// Context key whose value `true` (or `1`) marks the event as bot traffic.
    pub flag_key: String,
    /// Context key holding the user agent.
    pub user_agent_key: String,
    /// Case-insensitive substrings of the user agent that mark bots.
    pub user_agent_patterns: Vec<String>,
    /// Sustained events per second one user may send before further events are filtered;
    /// 0 turns the rate limit off.
    pub max_events_per_user_per_sec: u32,
    /// Burst allowed above the sustained rate.
    pub burst: u32,
}

impl Default for BotFilterConfig {
    fn default() -> Self {
        Self {
            flag_key: "bot".into(),
            user_agent_key: "user_agent".into(),
            user_agent_patterns: vec!["bot".into(), "crawler".into(), "spider".into()],
            max_events_per_user_per_sec: 50,
            burst: 200,
        }
    }
}

/// Classifies events as genuine or bot/noise.
pub struct BotFilter {
    config: BotFilterConfig,
    patterns: Vec<String>,
    limiter: Option<DefaultKeyedRateLimiter<UserId>>,
}

impl BotFilter {
    /// A filter with `config`.
    pub fn new(config: BotFilterConfig) -> Self {
        let limiter = NonZeroU32::new(config.max_events_per_user_per_sec).map(|rate| {
            let burst = NonZeroU32::new(config.burst.max(rate.get())).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        let patterns = config
            .user_agent_patterns
            .iter()
            .map(|p| p.to_lowercase())
            .collect();
        Self {
            config,
            patterns,
            limiter,
        }
    }

    /// Why `event` is bot or noise traffic, or `None` when it is genuine.
    pub fn check(&self, event: &Event) -> Option<String> {
        if let Some(flag) = event.context.get(&self.config.flag_key)
            && (flag.eq_ignore_ascii_case("true") || flag == "1")
        {
            return Some(format!("context {} is set", self.config.flag_key));
        }
        if let Some(agent) = event.context.get(&self.config.user_agent_key) {
            let agent = agent.to_lowercase();
            if let Some(p) = self.patterns.iter().find(|p| agent.contains(p.as_str())) {
                return Some(format!("user agent matches {p:?}"));
            }
        }
        if let Some(limiter) = &self.limiter
            && limiter.check_key(&event.user_id).is_err()
        {
            return Some(format!(
                "user exceeds {} events/s",
                self.config.max_events_per_user_per_sec
            ));
        }
        None
    }

    /// Forgets rate-limit state of users idle long enough to be back at full burst.
    pub fn maintain(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::types::{EventId, EventKind, ItemId};

    fn event(user: &str, context: &[(&str, &str)]) -> Event {
        Event {
            event_id: EventId::parse("e", "event_id").unwrap(),
            user_id: UserId::parse(user, "user_id").unwrap(),
            item_id: ItemId::parse("i", "item_id").unwrap(),
            kind: EventKind::View,
            weight: None,
            timestamp_ms: 1,
            session_id: None,
            value: None,
            context: context
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn flags_context_and_user_agents() {
        let f = BotFilter::new(BotFilterConfig::default());
        assert!(f.check(&event("u", &[])).is_none());
        assert!(f.check(&event("u", &[("bot", "true")])).is_some());
        assert!(f.check(&event("u", &[("bot", "false")])).is_none());
        let ua = f.check(&event("u", &[("user_agent", "Googlebot/2.1")]));
        assert!(ua.unwrap().contains("bot"));
    }

    #[test]
    fn rate_limits_per_user() {
        let f = BotFilter::new(BotFilterConfig {
            max_events_per_user_per_sec: 1,
            burst: 3,
            ..BotFilterConfig::default()
        });
        let passed = (0..10)
            .filter(|_| f.check(&event("fast", &[])).is_none())
            .count();
        assert_eq!(passed, 3, "only the burst passes");
        assert!(
            f.check(&event("other", &[])).is_none(),
            "limits are per user"
        );
    }
}
