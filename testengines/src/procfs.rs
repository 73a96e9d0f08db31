//! CPU time and memory of processes, and of the machine, from `/proc` (Linux): for the
//! benchmarks (`loadbench`, `eventbench`, `broker-bench`).

use std::sync::OnceLock;

/// Clock ticks per second of `/proc/*/stat` times.
fn ticks_per_sec() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces): the
/// state is `[0]`, the parent `[1]`, utime `[11]`, stime `[12]`, cutime `[13]`, cstime `[14]`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The sum of `/proc/PID/stat` fields `which`, in seconds.
fn stat_secs(fields: &[String], which: &[usize]) -> Option<f64> {
    let mut ticks = 0.0;
    for &i in which {
        ticks += fields.get(i)?.parse::<f64>().ok()?;
    }
    Some(ticks / ticks_per_sec())
}

/// User + system CPU seconds `pid` has used so far.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    stat_secs(&stat_fields(pid)?, &[11, 12])
}

/// The children of `pid` (one level), from `/proc/*/stat`.
pub fn children(pid: u32) -> Vec<u32> {
    let parent = pid.to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| stat_fields(child).is_some_and(|f| f.get(1) == Some(&parent)))
        .collect()
}

/// CPU seconds of `pid` and its children, those still running and those it has reaped
/// (PostgreSQL: the postmaster and its backends).
pub fn tree_cpu_secs(pid: u32) -> Option<f64> {
    let own = stat_secs(&stat_fields(pid)?, &[11, 12, 13, 14])?;
    let children: f64 = children(pid)
        .into_iter()
        .filter_map(|child| stat_secs(&stat_fields(child)?, &[11, 12, 13, 14]))
        .sum();
    Some(own + children)
}

/// A `/proc/PID/status` field in KiB (`VmHWM` = peak RSS, `VmRSS` = RSS now).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// The machine's CPU time so far: (busy seconds, total seconds), summed over cores.
pub fn machine() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: f64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4)?;
    let ticks = ticks_per_sec();
    Some(((total - idle) / ticks, total / ticks))
}

/// The 1-minute load average.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
