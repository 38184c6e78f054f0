//! The flags of `reflex bench` and their validation.

use std::path::PathBuf;

use anyhow::bail;
use serde::Serialize;

use super::drivers::BenchKey;

/// Flags of `reflex bench`.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct BenchArgs {
    /// Server to drive, as HOST:PORT (or `http://HOST:PORT`); without it a server is started in this process on a
    /// scratch embedded store (with the per-user bot rate limit off).
    #[arg(long)]
    pub addr: Option<String>,
    /// API key sent as `x-api-key` on every call, for a server with `auth.enabled`; it
    /// needs the `ingest`, `recommend` and `admin` scopes (the run loads the catalog and
    /// erases its seeding users). Never printed.
    #[arg(long, env = "REFLEX_BENCH_API_KEY", hide_env_values = true)]
    #[serde(skip)]
    pub api_key: Option<BenchKey>,
    /// Items in the catalog.
    #[arg(long, default_value_t = 10_000)]
    pub items: usize,
    /// Returning users.
    #[arg(long, default_value_t = 100_000)]
    pub users: usize,
    /// Exponent of the Zipf item popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Share of sessions and recommend calls from users never seen before.
    #[arg(long, default_value_t = 0.05)]
    pub new_users: f64,
    /// Share of events on items outside the initial catalog.
    #[arg(long, default_value_t = 0.0001)]
    pub new_items: f64,
    /// Events per returning user sent while seeding (0 skips user seeding).
    #[arg(long, default_value_t = 5)]
    pub seed_events: usize,
    /// Skip seeding one event per catalog item.
    #[arg(long)]
    pub no_seed_items: bool,
    /// Bidirectional ingest streams, each on its own connection (0: no ingest).
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Events per batch.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Batches in flight per stream.
    #[arg(long, default_value_t = 4)]
    pub depth: usize,
    /// Open shopping sessions interleaved across all streams.
    #[arg(long, default_value_t = 20_000)]
    pub sessions: usize,
    /// Total events per second to offer; flat out when absent.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Concurrent `Recommend` workers, one call in flight each, each on its own connection
    /// (the no-op phase uses the same workers).
    #[arg(long, default_value_t = 4)]
    pub recommenders: usize,
    /// Total `Recommend` calls per second to offer; flat out when absent.
    #[arg(long)]
    pub recommend_rate: Option<f64>,
    /// Items asked per `Recommend`.
    #[arg(long, default_value_t = 10)]
    pub count: u32,
    /// With `--metrics-addr`: the most seconds to wait after seeding until the server's
    /// index holds every seeded item (`reflex_retrieval_backlog_items{kind="new"}` at
    /// 0), so the load measures the steady state, not the index catching up (about a
    /// minute of one core for 100k new items). 0 does not wait.
    #[arg(long, default_value_t = 300.0)]
    pub index_wait: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Seconds of the main phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of the no-op phase; defaults to `--duration`, 0 skips it.
    #[arg(long)]
    pub noop_duration: Option<f64>,
    /// Milliseconds between freshness probes (0: no probe). Keep it above 20 against a
    /// server with the default bot rate limit (50 events/s per user).
    #[arg(long, default_value_t = 25)]
    pub probe_ms: u64,
    /// Process id of the server, to report its memory (VmRSS) at each stage and its CPU
    /// use; a server in this process is measured by itself (load generator included).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Seconds between the rows of the main phase's timeline (events per second, server
    /// memory, CPU and data directory size over time, to see whether a rate holds over a
    /// long run); 0 leaves the timeline out.
    #[arg(long, default_value_t = 5.0)]
    pub timeline_secs: f64,
    /// The data directory of a server elsewhere on this machine, to report its size over
    /// time in the timeline; a server in this process is measured by itself.
    #[arg(long)]
    pub server_data_dir: Option<PathBuf>,
    /// The server's metrics endpoint (HOST:PORT), to report the recall of its
    /// approximate retrieval over the main phase (its own sampled check against the exact
    /// scan); a server in this process is read without it.
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Event ids are random UUIDs, as many clients send, instead of the run's tag and a
    /// counter (ids that sort in the order they are sent, which a store indexing them
    /// finds cheaper to keep).
    #[arg(long)]
    pub random_event_ids: bool,
    /// Seed of the workload.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The gRPC endpoint for `--addr`: `HOST:PORT`, or the same with an `http://` prefix.
pub(super) fn endpoint_of(addr: &str) -> anyhow::Result<String> {
    if addr.starts_with("https://") {
        anyhow::bail!("--addr {addr}: reflex bench speaks plaintext gRPC only (no TLS)");
    }
    let bare = addr
        .strip_prefix("http://")
        .unwrap_or(addr)
        .trim_end_matches('/');
    anyhow::ensure!(
        !bare.is_empty() && !bare.contains("://") && !bare.contains('/'),
        "--addr {addr}: expected HOST:PORT, e.g. 127.0.0.1:50051"
    );
    Ok(format!("http://{bare}"))
}

/// Refuses flag values the run cannot use, naming the flag.
pub(super) fn validate(args: &BenchArgs) -> anyhow::Result<()> {
    if args.items == 0 {
        bail!("--items must be at least 1");
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    for (name, share) in [
        ("--new-users", args.new_users),
        ("--new-items", args.new_items),
    ] {
        if !(0.0..=1.0).contains(&share) {
            bail!("{name} must be a share between 0 and 1, got {share}");
        }
    }
    for (name, secs) in [
        ("--warmup", args.warmup),
        ("--index-wait", args.index_wait),
        ("--duration", args.duration),
        ("--noop-duration", args.noop_duration.unwrap_or(0.0)),
        ("--timeline-secs", args.timeline_secs),
    ] {
        if !(secs.is_finite() && secs >= 0.0) {
            bail!("{name} must be a number of seconds, got {secs}");
        }
    }
    if args.duration <= 0.0 {
        bail!("--duration must be positive");
    }
    if !(args.zipf.is_finite() && args.zipf >= 0.0) {
        bail!("--zipf must be finite and >= 0");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::endpoint_of;

    #[test]
    fn addr_takes_host_port_or_an_http_url() {
        for addr in [
            "127.0.0.1:50051",
            "http://127.0.0.1:50051",
            "http://127.0.0.1:50051/",
        ] {
            assert_eq!(endpoint_of(addr).unwrap(), "http://127.0.0.1:50051");
        }
        assert!(
            endpoint_of("https://x:1")
                .unwrap_err()
                .to_string()
                .contains("TLS")
        );
        assert!(endpoint_of("grpc://x:1").is_err());
        assert!(endpoint_of("").is_err());
    }
}
