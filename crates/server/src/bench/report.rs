//! What `reflex bench` reports, and the report as text.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::args::BenchArgs;
use super::stats::{self, Phase, PhaseSummary};

/// Server memory at each stage of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Memory {
    /// Whose.
    pub pid: u32,
    /// The load generator shares the process (in-process server).
    pub includes_load_generator: bool,
    /// Before the catalog.
    pub rss_start: u64,
    /// After the catalog upsert.
    pub rss_after_catalog: u64,
    /// After one event per item (every item has factors; seeding profiles erased).
    pub rss_after_items: u64,
    /// After seeding every returning user.
    pub rss_after_users: u64,
    /// At the end of the run.
    pub rss_end: u64,
    /// `(rss_after_items - rss_start) / items`.
    pub bytes_per_item: f64,
    /// `(rss_after_users - rss_after_items) / users`, at `seed_events` events each.
    pub bytes_per_user: f64,
}

/// The server's own recall checks (one approximate search in `recall_check_every`
/// answered again by the exact scan) that fell in the main phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Recall {
    /// Searches checked.
    pub checks: u64,
    /// Items of the exact answers.
    pub wanted: u64,
    /// Of those, items the approximate answers held.
    pub found: u64,
    /// `found / wanted`; `None` without a check (the exact scan answered every search).
    pub recall: Option<f64>,
}

impl Recall {
    pub(super) fn between(
        start: reflex_core::RecallChecks,
        end: reflex_core::RecallChecks,
    ) -> Self {
        let wanted = end.wanted.saturating_sub(start.wanted);
        let found = end.found.saturating_sub(start.found);
        Self {
            checks: end.checks.saturating_sub(start.checks),
            wanted,
            found,
            recall: (wanted > 0).then(|| found as f64 / wanted as f64),
        }
    }
}

/// CPU used during the main phase, in cores (CPU seconds per second).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cpu {
    /// The server process (which includes the load generator when in-process).
    pub server_cores: Option<f64>,
    /// This process, when the server is elsewhere.
    pub load_generator_cores: Option<f64>,
}

/// Loading and seeding.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Setup {
    /// Catalog items upserted.
    pub catalog_items: usize,
    /// Seconds the upsert took.
    pub catalog_seconds: f64,
    /// Events sent to seed items.
    pub seed_item_events: u64,
    /// Events sent to seed users.
    pub seed_user_events: u64,
    /// Seconds seeding took (items, erasing seed users, users).
    pub seed_seconds: f64,
    /// Seed events accepted per second.
    pub seed_events_per_sec: f64,
    /// Seed events the server filtered.
    pub seed_filtered: u64,
    /// Seconds waited after seeding for the server's index to hold every seeded item
    /// (`--index-wait`; 0 when not waited).
    pub index_wait_seconds: f64,
}

/// Recommend against the no-op RPC at the same concurrency.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Ratios {
    /// Recommend QPS / no-op QPS.
    pub qps: f64,
    /// Recommend p99 / no-op p99.
    pub p99: f64,
}

/// Everything `reflex bench` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// What was driven.
    pub target: String,
    /// The flags.
    pub args: BenchArgs,
    /// Catalog and seeding.
    pub setup: Setup,
    /// Ingest + Recommend + probe.
    pub main: PhaseSummary,
    /// Ingest + no-op health checks.
    pub noop: Option<PhaseSummary>,
    /// Recommend relative to the no-op RPC.
    pub ratios: Option<Ratios>,
    /// The server's retrieval recall over the main phase, when its metrics were read.
    pub recall: Option<Recall>,
    /// Server memory.
    pub memory: Option<Memory>,
    /// CPU in the main phase.
    pub cpu: Cpu,
    /// The main phase over time (empty with `--timeline-secs 0`).
    pub timeline: Vec<super::timeline::TimelineRow>,
    /// Things that make the figures suspect.
    pub warnings: Vec<String>,
}

impl Report {
    /// The report as text.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let a = &self.args;
        let _ = writeln!(out, "reflex bench: {}", self.target);
        let _ = writeln!(
            out,
            "workload: {} items (Zipf s={}), {} returning users, new users {:.1}%, new items {:.2}%; \
             {} stream(s) x batch {} (depth {}), {}; {} recommend worker(s) (k={}), {}",
            a.items,
            a.zipf,
            a.users,
            a.new_users * 100.0,
            a.new_items * 100.0,
            a.streams,
            a.batch,
            a.depth,
            a.rate.map_or("flat out".to_string(), |r| format!(
                "{r:.0} events/s offered"
            )),
            a.recommenders,
            a.count,
            a.recommend_rate.map_or("flat out".to_string(), |r| format!(
                "{r:.0} calls/s offered"
            )),
        );
        let s = &self.setup;
        let _ = writeln!(
            out,
            "setup: catalog of {} items in {:.2} s; seeded {} item + {} user events in {:.2} s \
             ({:.0} accepted/s)",
            s.catalog_items,
            s.catalog_seconds,
            s.seed_item_events,
            s.seed_user_events,
            s.seed_seconds,
            s.seed_events_per_sec
        );
        if s.index_wait_seconds > 0.0 {
            let _ = writeln!(
                out,
                "       the server's index held every seeded item {:.1} s after seeding",
                s.index_wait_seconds
            );
        }
        let lat = |l: &stats::LatencySummary| {
            format!(
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  (n={})",
                l.p50, l.p90, l.p99, l.p999, l.max, l.count
            )
        };
        let calls = |out: &mut String, name: &str, qps: f64, l: &stats::LatencySummary| {
            let _ = writeln!(out, "  {name:<10} {qps:>10.0} QPS  {}", lat(l));
        };
        let recall = self.recall.as_ref();
        let phase = |out: &mut String, name: &str, p: &PhaseSummary| {
            let i = &p.ingest;
            let _ = writeln!(out, "\n{name} ({:.1} s)", p.seconds);
            if i.batches > 0 {
                let _ = writeln!(
                    out,
                    "  ingest     {:>10.0} events/s accepted  ({:.0} batches/s; accepted {}, \
                     duplicate {}, rejected {}, filtered {})",
                    i.events_accepted_per_sec,
                    i.batches_per_sec,
                    i.accepted,
                    i.duplicate,
                    i.rejected,
                    i.filtered
                );
                let _ = writeln!(out, "  batch ack  {}", lat(&i.ack_latency_ms));
            }
            if p.recommend_ms.count > 0 {
                calls(out, "recommend", p.recommend_qps, &p.recommend_ms);
                let _ = writeln!(
                    out,
                    "             personalised (first item not from the popular fallback): {:.1}%",
                    100.0 * p.recommend_personalised as f64 / p.recommend_ms.count as f64
                );
            }
            if let Some(r) = recall.filter(|_| p.recommend_ms.count > 0) {
                let _ = match r.recall {
                    Some(recall) => writeln!(
                        out,
                        "             recall@k of the index (server's check): {:.3} over {} checks",
                        recall, r.checks
                    ),
                    None => writeln!(
                        out,
                        "             recall@k of the index: no check (the exact scan answered)"
                    ),
                };
            }
            if p.noop_ms.count > 0 {
                calls(out, "noop RPC", p.noop_qps, &p.noop_ms);
            }
            if p.freshness_ms.count > 0 {
                let _ = writeln!(out, "  freshness  ack -> visible: {}", lat(&p.freshness_ms));
                let _ = writeln!(
                    out,
                    "             probe batch ack: p50 {:.3}  p99 {:.3} ms; stale reads {}, \
                     timeouts {}",
                    p.probe_ack_ms.p50, p.probe_ack_ms.p99, p.stale_reads, p.probe_timeouts
                );
            }
            if p.errors.is_empty() {
                let _ = writeln!(out, "  errors     none");
            } else {
                for e in &p.errors {
                    let _ = writeln!(out, "  errors     {} {}: {}", e.source, e.code, e.count);
                }
            }
        };
        phase(
            &mut out,
            "main phase: ingest + recommend + probe",
            &self.main,
        );
        if let Some(noop) = &self.noop {
            phase(
                &mut out,
                "no-op phase: ingest + health check at the same concurrency",
                noop,
            );
        }
        if let Some(r) = &self.ratios {
            let _ = writeln!(
                out,
                "\nrecommend vs no-op RPC: QPS {:.1}% of the no-op's, p99 {:.2}x the no-op's",
                r.qps * 100.0,
                r.p99
            );
        }
        if let Some(m) = &self.memory {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            let _ = writeln!(
                out,
                "\nmemory (VmRSS of pid {}{}): start {:.1} MiB, catalog {:.1}, items seeded {:.1}, \
                 users seeded {:.1}, end {:.1}",
                m.pid,
                if m.includes_load_generator {
                    ", load generator included"
                } else {
                    ""
                },
                mib(m.rss_start),
                mib(m.rss_after_catalog),
                mib(m.rss_after_items),
                mib(m.rss_after_users),
                mib(m.rss_end)
            );
            let _ = writeln!(
                out,
                "  per item {:.0} B, per user {:.0} B (at {} events each)",
                m.bytes_per_item, m.bytes_per_user, a.seed_events
            );
        }
        if let Some(c) = self.cpu.server_cores {
            let _ = write!(out, "\ncpu in the main phase: server {c:.2} cores");
            if let Some(l) = self.cpu.load_generator_cores {
                let _ = write!(out, ", load generator {l:.2} cores");
            }
            let _ = writeln!(out);
        }
        if !self.timeline.is_empty() {
            let mib = |b: Option<u64>| {
                b.map_or("-".to_owned(), |b| {
                    format!("{:.0}", b as f64 / (1024.0 * 1024.0))
                })
            };
            let _ = writeln!(
                out,
                "
timeline of the main phase:
  {:>7}  {:>12}  {:>12}  {:>8}  {:>6}  {:>9}",
                "at s", "accepted/s", "accepted", "RSS MiB", "cores", "disk MiB"
            );
            for r in &self.timeline {
                let _ = writeln!(
                    out,
                    "  {:>7.0}  {:>12.0}  {:>12}  {:>8}  {:>6}  {:>9}",
                    r.at_secs,
                    r.accepted_per_sec,
                    r.accepted_total,
                    mib(r.server_rss),
                    r.server_cores.map_or("-".to_owned(), |c| format!("{c:.2}")),
                    mib(r.data_dir_bytes)
                );
            }
        }
        out
    }
}

/// One line of live figures for the progress bar.
pub(super) fn live_line(phase: Phase, stats: &stats::PhaseStats) -> String {
    let secs = stats.seconds().max(1e-3);
    let accepted = stats.ingest.accepted.load(Ordering::Relaxed);
    let filtered = stats.ingest.filtered.load(Ordering::Relaxed);
    let mut line = format!(
        "{:<6} ingest {:>8.0} ev/s",
        format!("{phase:?}").to_lowercase(),
        accepted as f64 / secs
    );
    if phase == Phase::Noop {
        let _ = write!(line, "  noop {:>7.0}/s", stats.noop_count() as f64 / secs);
    } else {
        let _ = write!(
            line,
            "  recommend {:>6.0}/s",
            stats.recommend_count() as f64 / secs
        );
    }
    if filtered > 0 {
        let _ = write!(line, "  FILTERED {filtered}");
    }
    let errors = stats.error_count();
    if errors > 0 {
        let _ = write!(line, "  errors {errors}");
    }
    line
}
