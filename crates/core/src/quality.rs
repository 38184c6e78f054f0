//! Continuous, prequential evaluation of the model: every sampled event is scored
//! against the model as it was before learning that event, and the figures drive the
//! automatic rollback.
//!
//! - Sampling is by hash of the event id ([`QualityConfig::sample_ratio`]), so every
//!   replica and every run picks the same events.
//! - A hash-chosen holdout of users ([`QualityConfig::holdout_ratio`]) never trains the
//!   model; their profiles update and they are served normally, so their figures say how
//!   the model does on users it never learnt from.
//! - Per scored event: `hr@10` is 1 when the event's item ranks in the top 10 of the
//!   user's recommendations, `recall@20` is the share of the relevant items (the one
//!   item of the event) in the top 20, so 1 when it ranks in the top 20.
//! - Each figure is kept cumulative since start-up and decayed: exponentially weighted
//!   with a half-life of [`QualityConfig::half_life_events`] scored events.
//! - The rollback decision compares the decayed `hr@10` over all users with the figure
//!   recorded with the last good model version (the baseline): below
//!   `(1 - max_drop) × baseline` for `min_events` scored events in a row fires once per
//!   baseline.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::hash::stable_hash;

/// Settings of the continuous evaluation and the automatic rollback.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QualityConfig {
    /// Share of events scored, chosen by hash of the event id (0 turns scoring off).
    pub sample_ratio: f64,
    /// Share of users, chosen by hash of the user id, whose events never train the model.
    pub holdout_ratio: f64,
    /// Half-life of the decayed figures, in scored events.
    pub half_life_events: f64,
    /// Roll back to the last good version when quality drops.
    pub auto_rollback: bool,
    /// The drop, as a fraction of the last good version's `hr@10`, that counts as bad.
    pub max_drop: f64,
    /// Scored events in a row the decayed `hr@10` must stay below the threshold before
    /// the rollback fires.
    pub min_events: u64,
    /// Most events scored per second; samples beyond it are dropped, which bounds the
    /// CPU the evaluation takes (each costs a fold-in and a top-20 search).
    pub max_scored_per_sec: u32,
}

impl Default for QualityConfig {
    fn default() -> Self {
        Self {
            sample_ratio: 0.02,
            holdout_ratio: 0.01,
            half_life_events: 1000.0,
            auto_rollback: true,
            max_drop: 0.2,
            min_events: 2000,
            max_scored_per_sec: 200,
        }
    }
}

impl QualityConfig {
    /// No scoring and no holdout: every event trains the model.
    pub fn disabled() -> Self {
        Self {
            sample_ratio: 0.0,
            holdout_ratio: 0.0,
            auto_rollback: false,
            ..Self::default()
        }
    }
}

const SAMPLE_SALT: u64 = 0x5a4d_504c_4521;
const HOLDOUT_SALT: u64 = 0x484f_4c44_4f55;

/// Threshold under which a hash is "in" for a ratio in [0, 1].
fn threshold(ratio: f64) -> u64 {
    if ratio <= 0.0 || ratio.is_nan() {
        0
    } else if ratio >= 1.0 {
        u64::MAX
    } else {
        (ratio * u64::MAX as f64) as u64
    }
}

/// Decides, by hash, which events are scored and which users are held out.
#[derive(Clone, Copy, Debug)]
pub struct Sampler {
    sample: u64,
    holdout: u64,
}

impl Sampler {
    /// A sampler for `config`'s ratios.
    pub fn new(config: &QualityConfig) -> Self {
        Self {
            sample: threshold(config.sample_ratio),
            holdout: threshold(config.holdout_ratio),
        }
    }

    /// Whether the event with this id is scored.
    #[inline]
    pub fn sampled(&self, event_id: &str) -> bool {
        self.sample != 0
            && (self.sample == u64::MAX || stable_hash(event_id, SAMPLE_SALT) < self.sample)
    }

    /// Whether the user is in the holdout (their events never train the model).
    #[inline]
    pub fn holdout(&self, user_id: &str) -> bool {
        self.holdout != 0
            && (self.holdout == u64::MAX || stable_hash(user_id, HOLDOUT_SALT) < self.holdout)
    }
}

/// Hit-rate@10 and recall@20.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Share of scored events whose item ranked in the top 10.
    pub hit_rate_at_10: f64,
    /// Share of scored events' items found in the top 20.
    pub recall_at_20: f64,
}

/// Cumulative and decayed sums of one population.
#[derive(Clone, Copy, Debug, Default)]
struct Series {
    decayed_hits10: f64,
    decayed_hits20: f64,
    decayed_weight: f64,
    hits10: u64,
    hits20: u64,
    scored: u64,
}

impl Series {
    fn record(&mut self, hit10: bool, hit20: bool, keep: f64) {
        self.decayed_hits10 = self.decayed_hits10 * keep + f64::from(u8::from(hit10));
        self.decayed_hits20 = self.decayed_hits20 * keep + f64::from(u8::from(hit20));
        self.decayed_weight = self.decayed_weight * keep + 1.0;
        self.hits10 += u64::from(hit10);
        self.hits20 += u64::from(hit20);
        self.scored += 1;
    }

    fn decayed(&self) -> Figures {
        if self.decayed_weight <= 0.0 {
            return Figures::default();
        }
        Figures {
            hit_rate_at_10: self.decayed_hits10 / self.decayed_weight,
            recall_at_20: self.decayed_hits20 / self.decayed_weight,
        }
    }

    fn cumulative(&self) -> Figures {
        if self.scored == 0 {
            return Figures::default();
        }
        Figures {
            hit_rate_at_10: self.hits10 as f64 / self.scored as f64,
            recall_at_20: self.hits20 as f64 / self.scored as f64,
        }
    }

    fn report(&self) -> PopulationQuality {
        PopulationQuality {
            decayed: self.decayed(),
            cumulative: self.cumulative(),
            scored: self.scored,
        }
    }

    fn reset_window(&mut self) {
        self.decayed_hits10 = 0.0;
        self.decayed_hits20 = 0.0;
        self.decayed_weight = 0.0;
    }
}

/// The figures of one population.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PopulationQuality {
    /// Exponentially weighted over the recent scored events.
    pub decayed: Figures,
    /// Since start-up.
    pub cumulative: Figures,
    /// Events scored since start-up.
    pub scored: u64,
}

/// What the automatic rollback compares with: the last good version's figure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Baseline {
    /// The model version.
    pub version: u64,
    /// Its decayed `hr@10` over all users when it was taken.
    pub hit_rate_at_10: f64,
}

/// Quality as recorded with a model version at snapshot time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionQuality {
    /// Events scored since start-up when it was taken.
    pub scored: u64,
    /// Decayed figures over all users.
    pub all: Figures,
    /// Decayed figures over the holdout.
    pub holdout: Figures,
    /// Quality was below the rollback threshold when it was taken, so the version is not
    /// a "last good version".
    pub degraded: bool,
}

/// A rollback the figures call for.
#[derive(Clone, Debug, PartialEq)]
pub struct RollbackDecision {
    /// The last good version.
    pub to: u64,
    /// Decayed `hr@10` now.
    pub current: f64,
    /// The baseline's `hr@10`.
    pub baseline: f64,
    /// The factor the baseline is multiplied by (`1 - max_drop`).
    pub factor: f64,
    /// Scored events it has been below for.
    pub span: u64,
}

impl RollbackDecision {
    /// The reason recorded with the rollback version and logged.
    pub fn reason(&self) -> String {
        format!(
            "auto-rollback to {}: hr@10 {:.3} < {} × {:.3} over {} events",
            self.to, self.current, self.factor, self.baseline, self.span
        )
    }
}

/// Everything the tracker knows, for the API and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QualityReport {
    /// Over all users.
    pub all: PopulationQuality,
    /// Over the holdout users.
    pub holdout: PopulationQuality,
    /// Samples dropped because the evaluation was at its rate limit or behind.
    pub dropped: u64,
    /// Sampled events not scored because the user had no earlier history.
    pub cold: u64,
    /// What the automatic rollback compares with, once a version recorded quality.
    pub baseline: Option<Baseline>,
    /// `(1 - max_drop) × baseline`: the decayed `hr@10` below which events count.
    pub threshold: Option<f64>,
    /// Scored events in a row the decayed `hr@10` has been below the threshold.
    pub below_for: u64,
    /// Whether the automatic rollback can fire (enabled, with a baseline, and not fired
    /// since the baseline was set).
    pub armed: bool,
}

#[derive(Default)]
struct State {
    all: Series,
    holdout: Series,
    dropped: u64,
    cold: u64,
    baseline: Option<Baseline>,
    below_for: u64,
    fired: bool,
    pending: Option<RollbackDecision>,
}

/// Accumulates scored events and decides when to roll back. Cheap: one short lock per
/// scored event (only sampled events are scored).
pub struct QualityTracker {
    config: QualityConfig,
    keep: f64,
    state: Mutex<State>,
}

impl QualityTracker {
    /// A tracker for `config`.
    pub fn new(config: QualityConfig) -> Self {
        let keep = if config.half_life_events > 0.0 {
            0.5f64.powf(1.0 / config.half_life_events)
        } else {
            0.0
        };
        Self {
            config,
            keep,
            state: Mutex::new(State::default()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &QualityConfig {
        &self.config
    }

    fn factor(&self) -> f64 {
        (1.0 - self.config.max_drop).clamp(0.0, 1.0)
    }

    /// Records one scored event; returns a rollback decision when this event completes
    /// the span below the threshold (at most once per baseline).
    pub fn record(&self, holdout: bool, hit10: bool, hit20: bool) -> Option<RollbackDecision> {
        let mut s = self.state.lock();
        s.all.record(hit10, hit20, self.keep);
        if holdout {
            s.holdout.record(hit10, hit20, self.keep);
        }
        let baseline = s.baseline?;
        let current = s.all.decayed().hit_rate_at_10;
        if current < self.factor() * baseline.hit_rate_at_10 {
            s.below_for += 1;
        } else {
            s.below_for = 0;
        }
        if self.config.auto_rollback && !s.fired && s.below_for >= self.config.min_events.max(1) {
            s.fired = true;
            let decision = RollbackDecision {
                to: baseline.version,
                current,
                baseline: baseline.hit_rate_at_10,
                factor: self.factor(),
                span: s.below_for,
            };
            s.pending = Some(decision.clone());
            return Some(decision);
        }
        None
    }

    /// Counts a sample that could not be scored for lack of capacity.
    pub fn record_dropped(&self) {
        self.state.lock().dropped += 1;
    }

    /// Counts a sampled event whose user had no earlier history.
    pub fn record_cold(&self) {
        self.state.lock().cold += 1;
    }

    /// Takes the decision waiting to be acted on, if any.
    pub fn take_pending(&self) -> Option<RollbackDecision> {
        self.state.lock().pending.take()
    }

    /// Puts back a decision that could not be carried out (the store failed), so the next
    /// [`take_pending`](Self::take_pending) returns it again; a newer decision wins.
    pub fn retry_later(&self, decision: RollbackDecision) {
        let mut s = self.state.lock();
        if s.pending.is_none() {
            s.pending = Some(decision);
        }
    }

    /// Quality to record with a snapshot taken now; `None` before anything was scored
    /// since start-up or the last rollback.
    pub fn snapshot_quality(&self) -> Option<VersionQuality> {
        let s = self.state.lock();
        if s.all.decayed_weight <= 0.0 {
            return None;
        }
        let all = s.all.decayed();
        let degraded = s
            .baseline
            .is_some_and(|b| all.hit_rate_at_10 < self.factor() * b.hit_rate_at_10);
        Some(VersionQuality {
            scored: s.all.scored,
            all,
            holdout: s.holdout.decayed(),
            degraded,
        })
    }

    /// Makes `version` the last good version (it recorded `quality`); with `rearm`, the
    /// rollback may fire again (not after an automatic rollback, whose new version carries
    /// the old figure: a stream that stays bad must not roll back over and over). A
    /// degraded version is ignored.
    pub fn set_baseline(&self, version: u64, quality: &VersionQuality, rearm: bool) {
        if quality.degraded {
            return;
        }
        let mut s = self.state.lock();
        s.baseline = Some(Baseline {
            version,
            hit_rate_at_10: quality.all.hit_rate_at_10,
        });
        s.below_for = 0;
        if rearm {
            s.fired = false;
        }
    }

    /// The model changed under the figures (a rollback): forgets the decayed window and
    /// the span below the threshold; cumulative figures stay.
    pub fn reset_window(&self) {
        let mut s = self.state.lock();
        s.all.reset_window();
        s.holdout.reset_window();
        s.below_for = 0;
        s.pending = None;
    }

    /// The figures now.
    pub fn report(&self) -> QualityReport {
        let s = self.state.lock();
        QualityReport {
            all: s.all.report(),
            holdout: s.holdout.report(),
            dropped: s.dropped,
            cold: s.cold,
            baseline: s.baseline,
            threshold: s.baseline.map(|b| self.factor() * b.hit_rate_at_10),
            below_for: s.below_for,
            armed: self.config.auto_rollback && s.baseline.is_some() && !s.fired,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(min_events: u64) -> QualityConfig {
        QualityConfig {
            half_life_events: 10.0,
            min_events,
            ..QualityConfig::default()
        }
    }

    #[test]
    fn decayed_and_cumulative_figures() {
        let t = QualityTracker::new(config(5));
        for i in 0..100 {
            t.record(false, i % 4 == 0, i % 2 == 0);
        }
        let r = t.report();
        assert_eq!(r.all.scored, 100);
        assert!((r.all.cumulative.hit_rate_at_10 - 0.25).abs() < 1e-9);
        assert!((r.all.cumulative.recall_at_20 - 0.5).abs() < 1e-9);
        // After a long run of misses the decayed figure falls towards 0, halving every
        // half-life; the cumulative one barely moves.
        for _ in 0..10 {
            t.record(false, false, false);
        }
        let r = t.report();
        assert!(r.all.decayed.hit_rate_at_10 < 0.25 * 0.6, "{r:?}");
        assert!(r.all.decayed.hit_rate_at_10 > 0.25 * 0.4, "{r:?}");
        assert!((r.all.cumulative.hit_rate_at_10 - 25.0 / 110.0).abs() < 1e-9);
        assert_eq!(r.holdout.scored, 0);
    }

    #[test]
    fn decay_weights_one_half_life_back_by_half() {
        let t = QualityTracker::new(QualityConfig {
            half_life_events: 1.0,
            ..config(5)
        });
        t.record(false, true, true);
        t.record(false, false, false);
        // Weights 0.5 (the hit) and 1 (the miss): 0.5 / 1.5.
        let d = t.report().all.decayed;
        assert!((d.hit_rate_at_10 - 1.0 / 3.0).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn holdout_and_sample_choice_is_stable_and_near_the_ratio() {
        let c = QualityConfig {
            sample_ratio: 0.1,
            holdout_ratio: 0.05,
            ..QualityConfig::default()
        };
        let a = Sampler::new(&c);
        let b = Sampler::new(&c.clone());
        let users: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        let held: Vec<bool> = users.iter().map(|u| a.holdout(u)).collect();
        assert_eq!(held, users.iter().map(|u| b.holdout(u)).collect::<Vec<_>>());
        let share = held.iter().filter(|h| **h).count() as f64 / users.len() as f64;
        assert!((share - 0.05).abs() < 0.01, "{share}");
        let sampled = users.iter().filter(|u| a.sampled(u)).count() as f64 / 20_000.0;
        assert!((sampled - 0.1).abs() < 0.015, "{sampled}");
        // The hash is fixed, not per process: a known value pins it.
        assert_eq!(stable_hash("user-1", 0), 0xc499_b5f8_a721_df58);
        assert_eq!(stable_hash("user-1", SAMPLE_SALT), 0xd4e1_5f5f_9302_6cd0);
        assert_eq!(stable_hash("ev-9", HOLDOUT_SALT), 0xa9f5_1219_f144_0ef8);
        assert_ne!(stable_hash("user-1", 0), stable_hash("user-2", 0));
        let all = Sampler::new(&QualityConfig {
            sample_ratio: 1.0,
            holdout_ratio: 0.0,
            ..QualityConfig::default()
        });
        assert!(users.iter().all(|u| all.sampled(u) && !all.holdout(u)));
    }

    #[test]
    fn holdout_events_count_in_both_populations() {
        let t = QualityTracker::new(config(5));
        t.record(true, true, true);
        t.record(false, false, false);
        let r = t.report();
        assert_eq!((r.all.scored, r.holdout.scored), (2, 1));
        assert_eq!(r.holdout.cumulative.hit_rate_at_10, 1.0);
    }

    #[test]
    fn rollback_fires_only_after_min_events_below_the_threshold() {
        let t = QualityTracker::new(config(20));
        for _ in 0..50 {
            assert_eq!(t.record(false, true, true), None, "no baseline yet");
        }
        let q = t.snapshot_quality().unwrap();
        assert!(!q.degraded);
        t.set_baseline(3, &q, true);
        assert!(t.report().armed);
        // A short dip does not fire, and recovering resets the span.
        let mut fired = None;
        let mut run_start = None;
        for i in 0..200 {
            let hit = !(10..16).contains(&i) && i < 40;
            let before = t.report().below_for;
            if let Some(d) = t.record(false, hit, hit) {
                fired = Some((i, d));
                break;
            }
            if before == 0 && t.report().below_for == 1 {
                run_start = Some(i);
            }
        }
        let (i, d) = fired.expect("a long drop fires");
        let run_start = run_start.unwrap();
        assert!(run_start >= 40, "the dip's span was reset: {run_start}");
        assert_eq!(i - run_start + 1, 20, "exactly min_events below: {d:?}");
        assert_eq!(d.to, 3);
        assert_eq!(d.span, 20);
        assert!(d.current < 0.8 * d.baseline);
        assert!(
            d.reason().starts_with("auto-rollback to 3: hr@10 "),
            "{}",
            d.reason()
        );
        assert_eq!(t.take_pending(), Some(d.clone()));
        assert_eq!(t.take_pending(), None);
        // A rollback the store could not carry out is tried again.
        t.retry_later(d.clone());
        assert_eq!(t.take_pending(), Some(d));
        assert_eq!(t.take_pending(), None);
        // Once per baseline: staying bad does not fire again.
        for _ in 0..100 {
            assert_eq!(t.record(false, false, false), None);
        }
        assert!(!t.report().armed);
        // A snapshot taken now is degraded and does not become the baseline.
        let bad = t.snapshot_quality().unwrap();
        assert!(bad.degraded);
        t.set_baseline(4, &bad, true);
        assert_eq!(t.report().baseline.map(|b| b.version), Some(3));
        // The version an automatic rollback records becomes the baseline without
        // re-arming; a good snapshot later re-arms.
        let good = VersionQuality {
            degraded: false,
            ..bad
        };
        t.set_baseline(5, &good, false);
        assert_eq!(t.report().baseline.map(|b| b.version), Some(5));
        assert!(!t.report().armed);
        t.set_baseline(6, &good, true);
        assert!(t.report().armed);
    }

    #[test]
    fn a_short_dip_never_fires() {
        let t = QualityTracker::new(config(30));
        for _ in 0..50 {
            t.record(false, true, true);
        }
        t.set_baseline(1, &t.snapshot_quality().unwrap(), true);
        for round in 0..20 {
            for _ in 0..10 {
                assert_eq!(t.record(false, false, false), None, "round {round}");
            }
            for _ in 0..40 {
                assert_eq!(t.record(false, true, true), None, "round {round}");
            }
        }
    }

    #[test]
    fn disabled_auto_rollback_never_fires() {
        let t = QualityTracker::new(QualityConfig {
            auto_rollback: false,
            ..config(1)
        });
        for _ in 0..20 {
            t.record(false, true, true);
        }
        t.set_baseline(1, &t.snapshot_quality().unwrap(), true);
        for _ in 0..100 {
            assert_eq!(t.record(false, false, false), None);
        }
        assert!(!t.report().armed);
        assert!(t.report().below_for >= 90);
    }
}

#[cfg(test)]
mod cost {
    use super::*;

    /// The per-event work scoring adds on the learn path, timed (run with
    /// `cargo test --release -p reflex-core on_path_cost -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn on_path_cost() {
        let sampler = Sampler::new(&QualityConfig::default());
        let ids: Vec<String> = (0..1_000_000).map(|i| format!("run-s0-{i}")).collect();
        let users: Vec<String> = (0..1_000_000)
            .map(|i| format!("user-{:07}", i % 100_000))
            .collect();
        let started = std::time::Instant::now();
        let mut n = 0u64;
        for (id, user) in ids.iter().zip(&users) {
            n += u64::from(sampler.holdout(std::hint::black_box(user)));
            n += u64::from(sampler.sampled(std::hint::black_box(id)));
        }
        let per_event = started.elapsed().as_nanos() as f64 / ids.len() as f64;
        println!("holdout + sample decision: {per_event:.1} ns/event ({n})");

        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Vec<f32>)>(1024);
        let vector = vec![0.5f32; 64];
        let started = std::time::Instant::now();
        let rounds = 100_000;
        for (i, user) in users.iter().take(rounds).enumerate() {
            let _ = tx.try_send((user.clone(), vector.clone()));
            if i % 1000 == 999 {
                rt.block_on(async { while rx.try_recv().is_ok() {} });
            }
        }
        let per_sample = started.elapsed().as_nanos() as f64 / rounds as f64;
        println!(
            "sample hand-off (user id + 64-float vector copy + try_send): {per_sample:.1} ns/sample"
        );
    }
}
