//! What `/proc` says about a process: resident memory and CPU time (Linux only; elsewhere
//! both are `None` and the report leaves them out); and what the server's `/metrics`
//! says about its retrieval recall.

/// Resident set size of `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// User plus system CPU time of `pid` (all threads) in seconds, from `/proc/<pid>/stat`.
/// Clock ticks are taken as 100 a second, the value Linux reports to user space on
/// every mainstream architecture.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; the fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The server's cumulative recall checks, read from its `/metrics` at `addr`
/// (HOST:PORT) with one plain HTTP/1.0 GET; `None` when it cannot be read or exports
/// none.
pub async fn scrape_recall(addr: &str) -> Option<reflex_core::RecallChecks> {
    parse_recall(&scrape(addr).await?)
}

/// The server's retrieval backlog, read from its `/metrics` at `addr` (HOST:PORT);
/// `None` when it cannot be read or exports none (a server older than the gauge).
pub async fn scrape_backlog(addr: &str) -> Option<reflex_core::IndexBacklog> {
    parse_backlog(&scrape(addr).await?)
}

/// The text of the server's `/metrics` at `addr`, with one plain HTTP/1.0 GET.
async fn scrape(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await.ok()?;
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), fetch)
        .await
        .ok()?
}

/// The first sample of the series starting with `name` in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// The backlog gauges in a Prometheus text exposition.
fn parse_backlog(text: &str) -> Option<reflex_core::IndexBacklog> {
    Some(reflex_core::IndexBacklog {
        new: sample(text, "reflex_retrieval_backlog_items{kind=\"new\"} ")?,
        changed: sample(text, "reflex_retrieval_backlog_items{kind=\"changed\"} ")?,
    })
}

/// The recall counters in a Prometheus text exposition.
fn parse_recall(text: &str) -> Option<reflex_core::RecallChecks> {
    Some(reflex_core::RecallChecks {
        checks: sample(text, "reflex_retrieval_recall_checks_total ")?,
        wanted: sample(
            text,
            "reflex_retrieval_recall_items_total{kind=\"wanted\"} ",
        )?,
        found: sample(text, "reflex_retrieval_recall_items_total{kind=\"found\"} ")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        if !std::path::Path::new("/proc/self/status").exists() {
            return;
        }
        let pid = std::process::id();
        assert!(rss_bytes(pid).is_some_and(|b| b > 1024 * 1024));
        assert!(cpu_seconds(pid).is_some_and(|s| s >= 0.0));
        assert!(rss_bytes(u32::MAX).is_none());
    }

    #[test]
    fn recall_counters_parse_from_the_exposition() {
        let text = "HTTP/1.0 200 OK\r\n\r\n# HELP reflex_retrieval_recall_checks_total x\n\
                    reflex_retrieval_recall_checks_total 12\n\
                    reflex_retrieval_recall_items_total{kind=\"found\"} 118\n\
                    reflex_retrieval_recall_items_total{kind=\"wanted\"} 120\n";
        let r = parse_recall(text).unwrap();
        assert_eq!((r.checks, r.wanted, r.found), (12, 120, 118));
        assert!(parse_recall("reflex_index_items 3\n").is_none());
    }

    #[test]
    fn backlog_gauges_parse_from_the_exposition() {
        let text = "reflex_retrieval_backlog_items{kind=\"changed\"} 5\n\
                    reflex_retrieval_backlog_items{kind=\"new\"} 4096\n";
        let b = parse_backlog(text).unwrap();
        assert_eq!((b.new, b.changed), (4096, 5));
        assert!(parse_backlog("reflex_index_items 3\n").is_none());
    }
}
