//! The main phase over time: one row every `--timeline-secs` with the rate of accepted
//! events in that interval, the server's memory and CPU, and the size of its data
//! directory, so a rate that does not hold (or memory or disk that grow with the event
//! count) shows in a long run instead of being averaged away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::stats::{Phase, Recorder};
use super::sys;

/// One row of the timeline.
#[derive(Clone, Debug, Serialize)]
pub struct TimelineRow {
    /// Seconds since the main phase began, at the end of the interval.
    pub at_secs: f64,
    /// Events acked accepted per second over the interval.
    pub accepted_per_sec: f64,
    /// Events acked accepted since the main phase began.
    pub accepted_total: u64,
    /// Server resident memory at the end of the interval, in bytes.
    pub server_rss: Option<u64>,
    /// Server cores busy over the interval.
    pub server_cores: Option<f64>,
    /// Bytes under the server's data directory at the end of the interval.
    pub data_dir_bytes: Option<u64>,
}

/// Samples the main phase until it ends.
pub struct Sampler {
    /// Between rows.
    pub every: Duration,
    /// Whose ack counts to read.
    pub recorder: Arc<Recorder>,
    /// The server process, when its memory and CPU can be read.
    pub pid: Option<u32>,
    /// The server's data directory, when it is on this machine.
    pub data_dir: Option<PathBuf>,
}

impl Sampler {
    /// Rows until the recorder leaves the main phase.
    pub async fn run(self) -> Vec<TimelineRow> {
        let mut rows = Vec::new();
        let started = Instant::now();
        let mut last = (started, 0u64, self.pid.and_then(sys::cpu_seconds));
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.every, self.every);
        loop {
            tick.tick().await;
            if self.recorder.phase() != Phase::Main {
                break;
            }
            let Some(stats) = self.recorder.get(Phase::Main) else {
                break;
            };
            let now = Instant::now();
            let accepted = stats.ingest.accepted.load(Ordering::Relaxed);
            let cpu = self.pid.and_then(sys::cpu_seconds);
            let secs = now.duration_since(last.0).as_secs_f64().max(1e-6);
            let data_dir = self.data_dir.clone();
            let data_dir_bytes = match data_dir {
                Some(dir) => tokio::task::spawn_blocking(move || dir_bytes(&dir))
                    .await
                    .ok()
                    .flatten(),
                None => None,
            };
            rows.push(TimelineRow {
                at_secs: now.duration_since(started).as_secs_f64(),
                accepted_per_sec: accepted.saturating_sub(last.1) as f64 / secs,
                accepted_total: accepted,
                server_rss: self.pid.and_then(sys::rss_bytes),
                server_cores: match (last.2, cpu) {
                    (Some(a), Some(b)) => Some((b - a) / secs),
                    _ => None,
                },
                data_dir_bytes,
            });
            last = (now, accepted, cpu);
        }
        rows
    }
}

/// Total size of the files under `dir` (what the store holds on disk); `None` when it
/// cannot be read.
pub fn dir_bytes(dir: &Path) -> Option<u64> {
    let mut total = 0u64;
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).ok()? {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_bytes_counts_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 100]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub").join("b"), [0u8; 50]).unwrap();
        assert_eq!(dir_bytes(dir.path()), Some(150));
        assert_eq!(dir_bytes(&dir.path().join("missing")), None);
    }
}
