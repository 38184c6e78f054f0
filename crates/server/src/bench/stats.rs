//! What the load generator measures: counters and latency histograms per phase, errors by
//! gRPC code, and their summaries for the report.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Phases of a run. Drivers look at the current one to decide what to do, and every
/// measurement is booked to the phase it started in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Load runs, nothing is reported.
    Warmup = 0,
    /// Ingest, `Recommend` workers and the freshness probe: the headline figures.
    Main = 1,
    /// Ingest again, with the same workers calling the no-op health check instead.
    Noop = 2,
    /// Drivers stop.
    Done = 3,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Warmup, Phase::Main, Phase::Noop];

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Warmup,
            1 => Self::Main,
            2 => Self::Noop,
            _ => Self::Done,
        }
    }
}

/// Microsecond histogram from 1 µs to 100 s at three significant digits.
fn histogram() -> Result<Mutex<Histogram<u64>>, hdrhistogram::CreationError> {
    Ok(Mutex::new(Histogram::new_with_bounds(1, 100_000_000, 3)?))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn micros(d: Duration) -> u64 {
    d.as_micros().try_into().unwrap_or(u64::MAX).max(1)
}

/// Ack counts of one phase.
#[derive(Default)]
pub struct IngestCounters {
    /// Batches acknowledged.
    pub batches: AtomicU64,
    /// Events per status.
    pub accepted: AtomicU64,
    /// Already seen.
    pub duplicate: AtomicU64,
    /// Invalid.
    pub rejected: AtomicU64,
    /// Bot or noise.
    pub filtered: AtomicU64,
}

/// Everything measured in one phase.
pub struct PhaseStats {
    started: Mutex<Option<Instant>>,
    ended: Mutex<Option<Instant>>,
    /// Ack counts.
    pub ingest: IngestCounters,
    ack_latency: Mutex<Histogram<u64>>,
    recommend: Mutex<Histogram<u64>>,
    /// `Recommend` answers that said they fell back.
    pub degraded: AtomicU64,
    /// `Recommend` answers led by a model's pick (MF or content), not popularity.
    pub personalised: AtomicU64,
    noop: Mutex<Histogram<u64>>,
    freshness: Mutex<Histogram<u64>>,
    probe_ack: Mutex<Histogram<u64>>,
    /// `Recommend` calls of the probe, after the ack, that did not yet reflect the event.
    pub stale_reads: AtomicU64,
    /// Probe events the server filtered (so nothing could become visible).
    pub probe_filtered: AtomicU64,
    /// Probes that gave up waiting for the event to become visible.
    pub probe_timeouts: AtomicU64,
    errors: Mutex<BTreeMap<(String, String), u64>>,
}

impl PhaseStats {
    fn new() -> Result<Self, hdrhistogram::CreationError> {
        Ok(Self {
            started: Mutex::new(None),
            ended: Mutex::new(None),
            ingest: IngestCounters::default(),
            ack_latency: histogram()?,
            recommend: histogram()?,
            degraded: AtomicU64::new(0),
            personalised: AtomicU64::new(0),
            noop: histogram()?,
            freshness: histogram()?,
            probe_ack: histogram()?,
            stale_reads: AtomicU64::new(0),
            probe_filtered: AtomicU64::new(0),
            probe_timeouts: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
        })
    }

    /// Books one batch ack.
    pub fn ack(&self, latency: Duration, counts: [u32; 4]) {
        let c = &self.ingest;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.accepted.fetch_add(counts[0].into(), Ordering::Relaxed);
        c.duplicate.fetch_add(counts[1].into(), Ordering::Relaxed);
        c.rejected.fetch_add(counts[2].into(), Ordering::Relaxed);
        c.filtered.fetch_add(counts[3].into(), Ordering::Relaxed);
        lock(&self.ack_latency).saturating_record(micros(latency));
    }

    /// Books one successful `Recommend`; `personalised` when a model, not popularity,
    /// chose its first item.
    pub fn recommend(&self, latency: Duration, degraded: bool, personalised: bool) {
        if degraded {
            self.degraded.fetch_add(1, Ordering::Relaxed);
        }
        if personalised {
            self.personalised.fetch_add(1, Ordering::Relaxed);
        }
        lock(&self.recommend).saturating_record(micros(latency));
    }

    /// Books one successful health check.
    pub fn noop(&self, latency: Duration) {
        lock(&self.noop).saturating_record(micros(latency));
    }

    /// Books one freshness sample: ack to visible, and the probe batch's own round trip.
    pub fn freshness(&self, visible_after_ack: Duration, ack_rtt: Duration) {
        lock(&self.freshness).saturating_record(micros(visible_after_ack));
        lock(&self.probe_ack).saturating_record(micros(ack_rtt));
    }

    /// Books one failed call of `source` with gRPC code `code`.
    pub fn error(&self, source: &str, code: tonic::Code) {
        *lock(&self.errors)
            .entry((source.to_string(), format!("{code:?}")))
            .or_default() += 1;
    }

    /// Seconds between the phase's start and end (or now, while it runs).
    pub fn seconds(&self) -> f64 {
        let started = *lock(&self.started);
        let ended = *lock(&self.ended);
        match started {
            Some(s) => ended
                .unwrap_or_else(Instant::now)
                .duration_since(s)
                .as_secs_f64(),
            None => 0.0,
        }
    }

    /// Completed recommend calls so far.
    pub fn recommend_count(&self) -> u64 {
        lock(&self.recommend).len()
    }

    /// Completed noop calls so far.
    pub fn noop_count(&self) -> u64 {
        lock(&self.noop).len()
    }

    /// Failed calls so far.
    pub fn error_count(&self) -> u64 {
        lock(&self.errors).values().sum()
    }

    /// The phase's figures.
    pub fn summary(&self) -> PhaseSummary {
        let secs = self.seconds();
        let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let c = &self.ingest;
        let accepted = c.accepted.load(Ordering::Relaxed);
        let batches = c.batches.load(Ordering::Relaxed);
        let recommend = LatencySummary::of(&lock(&self.recommend));
        let noop = LatencySummary::of(&lock(&self.noop));
        PhaseSummary {
            seconds: secs,
            ingest: IngestSummary {
                events_accepted_per_sec: per_sec(accepted),
                batches_per_sec: per_sec(batches),
                batches,
                accepted,
                duplicate: c.duplicate.load(Ordering::Relaxed),
                rejected: c.rejected.load(Ordering::Relaxed),
                filtered: c.filtered.load(Ordering::Relaxed),
                ack_latency_ms: LatencySummary::of(&lock(&self.ack_latency)),
            },
            recommend_qps: per_sec(recommend.count),
            recommend_ms: recommend,
            recommend_degraded: self.degraded.load(Ordering::Relaxed),
            recommend_personalised: self.personalised.load(Ordering::Relaxed),
            noop_qps: per_sec(noop.count),
            noop_ms: noop,
            freshness_ms: LatencySummary::of(&lock(&self.freshness)),
            probe_ack_ms: LatencySummary::of(&lock(&self.probe_ack)),
            stale_reads: self.stale_reads.load(Ordering::Relaxed),
            probe_filtered: self.probe_filtered.load(Ordering::Relaxed),
            probe_timeouts: self.probe_timeouts.load(Ordering::Relaxed),
            errors: lock(&self.errors)
                .iter()
                .map(|((source, code), count)| ErrorCount {
                    source: source.clone(),
                    code: code.clone(),
                    count: *count,
                })
                .collect(),
        }
    }
}

/// The phase clock and the stats of every phase.
pub struct Recorder {
    phase: AtomicU8,
    phases: [PhaseStats; 3],
}

impl Recorder {
    /// A recorder in the warm-up phase.
    pub fn new() -> Result<Self, hdrhistogram::CreationError> {
        let r = Self {
            phase: AtomicU8::new(Phase::Warmup as u8),
            phases: [PhaseStats::new()?, PhaseStats::new()?, PhaseStats::new()?],
        };
        *lock(&r.phases[0].started) = Some(Instant::now());
        Ok(r)
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Ends the current phase and starts `next`.
    pub fn enter(&self, next: Phase) {
        let now = Instant::now();
        let current = self.phase();
        if let Some(stats) = self.get(current) {
            *lock(&stats.ended) = Some(now);
        }
        if let Some(stats) = self.get(next) {
            *lock(&stats.started) = Some(now);
        }
        self.phase.store(next as u8, Ordering::Release);
    }

    /// The stats of `phase` (`None` for `Done`).
    pub fn get(&self, phase: Phase) -> Option<&PhaseStats> {
        Phase::ALL
            .iter()
            .position(|p| *p == phase)
            .map(|i| &self.phases[i])
    }

    /// The stats of the current phase (`None` once done).
    pub fn current(&self) -> Option<&PhaseStats> {
        self.get(self.phase())
    }
}

/// Percentiles of one latency histogram, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Ingest figures of one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IngestSummary {
    /// Events acked `accepted`, per second of the phase.
    pub events_accepted_per_sec: f64,
    /// Batches acked per second.
    pub batches_per_sec: f64,
    /// Batches acked.
    pub batches: u64,
    /// Events acked `accepted`.
    pub accepted: u64,
    /// Events acked `duplicate`.
    pub duplicate: u64,
    /// Events acked `rejected`.
    pub rejected: u64,
    /// Events acked `filtered` (bot/noise filter: the synthetic traffic should see none).
    pub filtered: u64,
    /// Batch send to ack.
    pub ack_latency_ms: LatencySummary,
}

/// Failed calls of one source with one code.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorCount {
    /// `ingest`, `recommend`, `noop`, `probe`.
    pub source: String,
    /// The gRPC code.
    pub code: String,
    /// How many.
    pub count: u64,
}

/// Everything measured in one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseSummary {
    /// Length of the phase.
    pub seconds: f64,
    /// Ingest.
    pub ingest: IngestSummary,
    /// Completed `Recommend` calls per second.
    pub recommend_qps: f64,
    /// `Recommend` latency.
    pub recommend_ms: LatencySummary,
    /// `Recommend` answers flagged degraded.
    pub recommend_degraded: u64,
    /// `Recommend` answers whose first item a model chose (MF or content), not
    /// popularity: a share near 0 for returning users means the model is not working.
    pub recommend_personalised: u64,
    /// Completed health checks per second.
    pub noop_qps: f64,
    /// Health check latency.
    pub noop_ms: LatencySummary,
    /// Probe: from the ack of its event to the first `Recommend` answer reflecting it
    /// (that answer's round trip included).
    pub freshness_ms: LatencySummary,
    /// Probe: round trip of its one-event batch.
    pub probe_ack_ms: LatencySummary,
    /// Probe `Recommend` calls after an ack that did not reflect the event yet (a
    /// read-your-writes violation when non-zero).
    pub stale_reads: u64,
    /// Probe events filtered by the server.
    pub probe_filtered: u64,
    /// Probes that never saw their event.
    pub probe_timeouts: u64,
    /// Failed calls.
    pub errors: Vec<ErrorCount>,
}
