//! What `/proc` says about a process: resident memory and CPU time (Linux only; elsewhere
//! both are `None` and the report leaves them out).

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
}
