//! The console's short history: the server's counters sampled every second into a ring,
//! and the rates, latency quantiles and quality figures the charts draw from them.
//!
//! The history lives in the server, not the page, so a page opened (or reloaded) late
//! still shows the last minutes; each sample is a few hundred bytes.

use std::collections::VecDeque;

use serde::Serialize;

use crate::metrics::Metrics;

/// The ingest statuses, in the order samples keep them.
pub const STATUSES: [&str; 4] = ["accepted", "duplicate", "rejected", "filtered"];

/// A histogram's cumulative state: count, sum and `(upper bound, cumulative count)`
/// per finite bucket.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramState {
    count: u64,
    sum: f64,
    buckets: Vec<(f64, u64)>,
}

impl HistogramState {
    /// Reads `histogram` now.
    pub fn read(histogram: &prometheus::Histogram) -> Self {
        use prometheus::core::Metric as _;
        let metric = histogram.metric();
        let h = metric.get_histogram();
        Self {
            count: h.get_sample_count(),
            sum: h.get_sample_sum(),
            buckets: h
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .collect(),
        }
    }

    /// What was observed between `earlier` and `self`: count, mean and quantiles.
    fn since(&self, earlier: &Self) -> Option<Window> {
        let count = self.count.checked_sub(earlier.count)?;
        if count == 0 {
            return None;
        }
        let deltas: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .map(|(&(bound, now), &(_, then))| (bound, now.saturating_sub(then)))
            .collect();
        Some(Window {
            count,
            mean: (self.sum - earlier.sum) / count as f64,
            p50: quantile(&deltas, count, 0.5),
            p99: quantile(&deltas, count, 0.99),
        })
    }
}

/// Observations of one histogram in one interval.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Window {
    count: u64,
    mean: f64,
    p50: f64,
    p99: f64,
}

/// The `q` quantile of `count` observations whose cumulative bucket counts are
/// `buckets`, interpolated linearly inside its bucket as Prometheus's
/// `histogram_quantile` does; the largest finite bound when it lies above all of them.
fn quantile(buckets: &[(f64, u64)], count: u64, q: f64) -> f64 {
    let rank = q * count as f64;
    let mut lower = (0.0, 0u64);
    for &(bound, cumulative) in buckets {
        if cumulative as f64 >= rank {
            let inside = cumulative.saturating_sub(lower.1);
            if inside == 0 {
                return bound;
            }
            let share = (rank - lower.1 as f64) / inside as f64;
            return lower.0 + (bound - lower.0) * share;
        }
        lower = (bound, cumulative);
    }
    lower.0
}

/// Prequential figures at one moment (decayed window).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct QualityPoint {
    /// Milliseconds since the epoch.
    pub t: i64,
    /// `hr@10` over all users.
    pub all_hr10: f64,
    /// `recall@20` over all users.
    pub all_recall20: f64,
    /// `hr@10` over the holdout users.
    pub holdout_hr10: f64,
    /// `recall@20` over the holdout users.
    pub holdout_recall20: f64,
    /// Events scored since start-up (all users).
    pub scored: u64,
}

impl QualityPoint {
    /// The figures of `report` at `t`.
    pub fn of(report: &reflex_core::QualityReport, t: i64) -> Self {
        Self {
            t,
            all_hr10: report.all.decayed.hit_rate_at_10,
            all_recall20: report.all.decayed.recall_at_20,
            holdout_hr10: report.holdout.decayed.hit_rate_at_10,
            holdout_recall20: report.holdout.decayed.recall_at_20,
            scored: report.all.scored,
        }
    }
}

/// The counters at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Milliseconds since the epoch.
    pub t: i64,
    /// Cumulative events by status, in [`STATUSES`] order.
    pub events: [u64; 4],
    /// `Recommend` latency (seconds).
    pub recommend: HistogramState,
    /// Event time to applied (seconds).
    pub freshness: HistogramState,
}

impl Sample {
    /// Reads `metrics` now.
    pub fn read(metrics: &Metrics, t: i64) -> Self {
        Self {
            t,
            events: STATUSES.map(|s| metrics.ingest_events.with_label_values(&[s]).get()),
            recommend: HistogramState::read(
                &metrics.recommend_seconds.with_label_values(&["recommend"]),
            ),
            freshness: HistogramState::read(&metrics.freshness_seconds),
        }
    }
}

/// Latency of one interval, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Latency {
    /// Observations per second.
    pub per_sec: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Median (interpolated within its histogram bucket).
    pub p50_ms: f64,
    /// 99th percentile (interpolated within its histogram bucket).
    pub p99_ms: f64,
}

/// What the live charts draw for one interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LivePoint {
    /// End of the interval, milliseconds since the epoch.
    pub t: i64,
    /// Events per second by status, in [`STATUSES`] order.
    pub events: [f64; 4],
    /// `Recommend` latency; `None` when no call was answered.
    pub recommend: Option<Latency>,
    /// Freshness of accepted events; `None` when none was accepted.
    pub freshness: Option<Latency>,
}

/// The rings the sampler fills.
#[derive(Debug)]
pub struct History {
    samples: VecDeque<Sample>,
    capacity: usize,
    quality: VecDeque<QualityPoint>,
    quality_capacity: usize,
}

impl History {
    /// Keeps the last `capacity` samples and `quality_capacity` quality points.
    pub fn new(capacity: usize, quality_capacity: usize) -> Self {
        Self {
            samples: VecDeque::with_capacity(capacity.max(2)),
            capacity: capacity.max(2),
            quality: VecDeque::with_capacity(quality_capacity.max(1)),
            quality_capacity: quality_capacity.max(1),
        }
    }

    /// Adds a sample, dropping the oldest when full.
    pub fn push(&mut self, sample: Sample) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// Adds a quality point, dropping the oldest when full.
    pub fn push_quality(&mut self, point: QualityPoint) {
        if self.quality.len() == self.quality_capacity {
            self.quality.pop_front();
        }
        self.quality.push_back(point);
    }

    /// The quality points, oldest first.
    pub fn quality(&self) -> Vec<QualityPoint> {
        self.quality.iter().copied().collect()
    }

    /// One point per interval between consecutive samples, oldest first.
    pub fn live(&self) -> Vec<LivePoint> {
        let samples: Vec<&Sample> = self.samples.iter().collect();
        samples
            .windows(2)
            .filter_map(|pair| {
                let (a, b) = (pair[0], pair[1]);
                let secs = (b.t - a.t) as f64 / 1000.0;
                if secs <= 0.0 {
                    return None;
                }
                let ms = |w: Window| Latency {
                    per_sec: w.count as f64 / secs,
                    mean_ms: w.mean * 1000.0,
                    p50_ms: w.p50 * 1000.0,
                    p99_ms: w.p99 * 1000.0,
                };
                let mut events = [0.0; 4];
                for (rate, (now, then)) in events.iter_mut().zip(b.events.iter().zip(&a.events)) {
                    *rate = now.saturating_sub(*then) as f64 / secs;
                }
                Some(LivePoint {
                    t: b.t,
                    events,
                    recommend: b.recommend.since(&a.recommend).map(ms),
                    freshness: b.freshness.since(&a.freshness).map(ms),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        // 10 observations: 4 up to 1, 4 more up to 2, 2 more up to 4.
        let buckets = [(1.0, 4), (2.0, 8), (4.0, 10)];
        assert!((quantile(&buckets, 10, 0.5) - 1.25).abs() < 1e-9);
        assert!((quantile(&buckets, 10, 0.99) - 3.9).abs() < 1e-9);
        assert!((quantile(&buckets, 10, 0.2) - 0.5).abs() < 1e-9);
        // Above every finite bucket: the largest bound.
        assert_eq!(quantile(&[(1.0, 1)], 4, 0.99), 1.0);
    }

    #[test]
    fn live_points_are_rates_and_latencies_between_samples() {
        let metrics = Metrics::new().unwrap();
        let mut history = History::new(3, 2);
        history.push(Sample::read(&metrics, 0));
        metrics
            .ingest_events
            .with_label_values(&["accepted"])
            .inc_by(20);
        metrics
            .ingest_events
            .with_label_values(&["rejected"])
            .inc_by(2);
        let recommend = metrics.recommend_seconds.with_label_values(&["recommend"]);
        for _ in 0..4 {
            recommend.observe(0.002);
        }
        history.push(Sample::read(&metrics, 2_000));
        let live = history.live();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].t, 2_000);
        assert_eq!(live[0].events, [10.0, 0.0, 1.0, 0.0]);
        let latency = live[0].recommend.unwrap();
        assert_eq!(latency.per_sec, 2.0);
        assert!((latency.mean_ms - 2.0).abs() < 1e-9);
        // All four in the (1 ms, 2.5 ms] bucket.
        assert!(latency.p50_ms > 1.0 && latency.p50_ms <= 2.5, "{latency:?}");
        assert_eq!(live[0].freshness, None);
        // The ring drops the oldest sample.
        history.push(Sample::read(&metrics, 3_000));
        history.push(Sample::read(&metrics, 4_000));
        assert_eq!(history.live().len(), 2);
        assert_eq!(history.live()[0].t, 3_000);
        for t in 0..3 {
            history.push_quality(QualityPoint {
                t,
                ..Default::default()
            });
        }
        let quality: Vec<i64> = history.quality().iter().map(|q| q.t).collect();
        assert_eq!(quality, [1, 2]);
    }
}
