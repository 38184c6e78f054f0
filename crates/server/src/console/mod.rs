//! The web console: a few pages (live traffic, the model, a user, an item) served under
//! `/console/` on the metrics HTTP listener, and the JSON API they poll under
//! `/console/api/`.
//!
//! Layout:
//! - `mod.rs`: the `console` settings, [`Console`] (its state, the sampler, the routes)
//!   and the built-in assets;
//! - `api.rs`: the JSON handlers, which call the engine directly;
//! - `history.rs`: the counters sampled every second, turned into chart points;
//! - `assets/`: the page, its script and its style sheet, built into the binary with
//!   `include_str!`; the page fetches nothing from anywhere else (charts are inline SVG).
//!
//! Reading needs no key; rolling the model back needs an API key with the `admin`
//! scope when `auth.enabled` (the same keys and check as the gRPC API).

mod api;
pub mod history;

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{any, get, post};
use reflex_core::Engine;
use serde::{Deserialize, Serialize};

use self::history::{History, QualityPoint, Sample};
use crate::metrics::Metrics;
use crate::middleware::AuthLayer;

/// The `console` section.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Serve the console under `/console/` on the metrics listener (`metrics.listen`),
    /// which must then be enabled. Off by default: its pages show user profiles.
    pub enabled: bool,
}

impl ConsoleConfig {
    /// Refuses a console without the listener it is served on.
    pub fn validate(&self, metrics_enabled: bool) -> Result<(), String> {
        if self.enabled && !metrics_enabled {
            return Err(
                "enabled needs metrics.enabled: the console is served on the metrics listener"
                    .into(),
            );
        }
        Ok(())
    }
}

/// How often the sampler reads the counters.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples kept for the live charts: five minutes.
const LIVE_SAMPLES: usize = 300;
/// A quality point is kept every this many samples (10 s) …
const QUALITY_EVERY: u64 = 10;
/// … and this many of them: two hours.
const QUALITY_POINTS: usize = 720;

/// What the handlers share.
struct State {
    /// Set once the engine is recovered; until then data answers 503.
    engine: OnceLock<(Arc<Engine>, Arc<str>)>,
    metrics: Arc<Metrics>,
    /// The API keys when `auth.enabled`; `None` leaves every action open, as on gRPC.
    auth: Option<AuthLayer>,
    history: Mutex<History>,
}

/// The console of one server.
#[derive(Clone)]
pub struct Console {
    state: Arc<State>,
}

impl Console {
    /// A console reading `metrics`, checking admin actions against `auth` (when API keys
    /// are on). Starts its sampler, which ends when the console's routes are dropped.
    pub fn start(metrics: Arc<Metrics>, auth: Option<AuthLayer>) -> Self {
        let state = Arc::new(State {
            engine: OnceLock::new(),
            metrics,
            auth,
            history: Mutex::new(History::new(LIVE_SAMPLES, QUALITY_POINTS)),
        });
        tokio::spawn(sample(Arc::downgrade(&state)));
        Self { state }
    }

    /// Hands the recovered engine to the console, with this replica's name (recorded as
    /// who took a rollback).
    pub fn set_engine(&self, engine: Arc<Engine>, replica: Arc<str>) {
        let _ = self.state.engine.set((engine, replica));
    }

    /// The pages under `/console/` and the API under `/console/api/`.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route(
                "/console",
                get(|| async { Redirect::permanent("/console/") }),
            )
            .route(
                "/console/",
                get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
            )
            .route(
                "/console/console.js",
                get(|| async { asset(CONSOLE_JS, "text/javascript; charset=utf-8") }),
            )
            .route(
                "/console/console.css",
                get(|| async { asset(CONSOLE_CSS, "text/css; charset=utf-8") }),
            )
            .route("/console/api/live", get(api::live))
            .route("/console/api/model", get(api::model))
            .route("/console/api/users/{user}", get(api::user))
            .route("/console/api/items/{item}", get(api::item))
            .route("/console/api/rollback", post(api::rollback))
            .route("/console/api/{*rest}", any(api::no_such_endpoint))
            .with_state(self.state.clone())
    }
}

/// The page.
const INDEX_HTML: &str = include_str!("assets/index.html");
/// Its script: routing, polling and the SVG charts.
const CONSOLE_JS: &str = include_str!("assets/console.js");
/// Its style sheet.
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// A built-in asset. The policy forbids anything not served from here.
fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Milliseconds since the epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Samples the counters every second (and the quality every tenth) for as long as the
/// console exists.
async fn sample(state: Weak<State>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        let t = now_ms();
        let sample = Sample::read(&state.metrics, t);
        let quality = n
            .is_multiple_of(QUALITY_EVERY)
            .then(|| state.engine.get())
            .flatten()
            .map(|(engine, _)| QualityPoint::of(&engine.quality(), t));
        if let Ok(mut history) = state.history.lock() {
            history.push(sample);
            if let Some(point) = quality {
                history.push_quality(point);
            }
        }
        n += 1;
    }
}
