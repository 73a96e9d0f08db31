//! What one run measured, and the figures derived from it.

use std::collections::HashMap;

use crate::cli::StackKind;

/// CPU and memory of one process.
#[derive(Debug, Clone)]
pub struct ProcessFigures {
    /// Its role (`broker+bridge`, `broker`, `bridge`, `devices`, `dispatchers`).
    pub role: String,
    /// How many processes are summed here.
    pub count: usize,
    /// CPU seconds (user + system) over the window.
    pub cpu_secs: f64,
    /// Peak RSS (`VmHWM`) in MiB, summed over the processes.
    pub peak_rss_mib: f64,
}

/// What a cluster run (`--bridges N`, `--cluster-engines`) measured of its engines, per
/// second of the window.
#[derive(Debug, Clone)]
pub struct ClusterFigures {
    /// Bridges.
    pub bridges: usize,
    /// Redis commands processed (`total_commands_processed`).
    pub redis_commands_per_s: f64,
    /// Redis calls per command (`INFO commandstats`), those called in the window.
    pub redis_per_s_by_command: Vec<(String, f64)>,
    /// PostgreSQL transactions committed in the bridges' database.
    pub pg_commits_per_s: f64,
    /// Rows inserted, updated or deleted.
    pub pg_rows_written_per_s: f64,
    /// Of which inserted.
    pub pg_inserted_per_s: f64,
}

/// Latency percentiles in ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest seen.
    pub max: f64,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Measured {
    /// The stack.
    pub stack: StackKind,
    /// Vehicles, rate, dispatchers.
    pub vehicles: u32,
    /// Heartbeats per second per vehicle.
    pub rate: f64,
    /// Dispatcher clients.
    pub dispatchers: u32,
    /// MQTT connections of the devices.
    pub connections: u64,
    /// Seconds the devices took to connect.
    pub connect_secs: f64,
    /// Seconds from the first heartbeat until the stack kept up (`None`: it did not).
    pub settle_secs: Option<f64>,
    /// Whether settling was checked (not with `device-sim`, whose offered rate is unknown,
    /// nor with `--settle-max 0`): otherwise `settle_secs` is the warm-up.
    pub settle_checked: bool,
    /// The window's length in seconds.
    pub window_secs: f64,
    /// Heartbeats the devices published per second.
    pub sent_per_s: f64,
    /// Heartbeats the bridge accepted per second.
    pub ingested_per_s: f64,
    /// Positions all dispatchers together received per second.
    pub delivered_per_s: f64,
    /// Position events (batches or single emits) all dispatchers received per second.
    pub events_per_s: f64,
    /// Device→dispatcher latency.
    pub latency: Latency,
    /// Positions received later than tick + slack.
    pub late: f64,
    /// Heartbeats sent, whole run.
    pub sent_total: u64,
    /// Heartbeats × dispatchers that should have arrived and did not (whole run).
    pub lost: u64,
    /// The worst dispatcher's lost heartbeats.
    pub lost_worst: u64,
    /// Heartbeats sent during the window.
    pub sent_window: f64,
    /// Heartbeats × dispatchers skipped (beyond coalescing) among the positions received
    /// during the window: loss in the steady state, without the start-up.
    pub lost_window: f64,
    /// Dispatchers that disconnected.
    pub disconnects: u64,
    /// Per process role.
    pub processes: Vec<ProcessFigures>,
    /// Machine CPU busy over the window, in cores.
    pub machine_busy_cores: f64,
    /// Of that, what the benchmark's own processes did not use (other work on the machine
    /// and kernel time not charged to a process, such as loopback softirqs), in cores.
    pub others_cores: f64,
    /// 1-minute load average at the window's start.
    pub load_before: f64,
    /// Heartbeats the devices could not write (socket full) or lost to a dead connection.
    pub device_blocked: u64,
    /// Device-side errors (dead connections).
    pub device_errors: u64,
    /// The latest a device sent behind its schedule, ms (device-side starvation).
    pub device_max_late_ms: f64,
    /// Emits the bridge could not hand to a socket, whole run (Fleetbeat's
    /// `socketio_dropped_total`: volatile batches skipped, reliable events failed).
    pub emits_dropped: Option<f64>,
    /// Log lines of the stack's programs at WARN or reporting a failed broadcast.
    pub warnings: usize,
    /// The most frequent of those, digits masked, with their counts.
    pub top_warnings: Vec<(usize, String)>,
    /// The bridge's position tick, ms.
    pub tick_ms: u64,
    /// The engines' figures of a cluster run.
    pub cluster: Option<ClusterFigures>,
}

impl Measured {
    /// Loss over the whole run (start-up included), as a fraction of heartbeats ×
    /// dispatchers.
    pub fn loss_fraction(&self) -> f64 {
        self.lost as f64 / (self.sent_total as f64 * f64::from(self.dispatchers)).max(1.0)
    }

    /// Loss in the window (the steady state), as a fraction of heartbeats × dispatchers.
    /// Gaps found in the window may have opened before it: a stack far behind can lose
    /// more than the window's heartbeats, so this is capped at 1.
    pub fn window_loss_fraction(&self) -> f64 {
        (self.lost_window / (self.sent_window * f64::from(self.dispatchers)).max(1.0)).min(1.0)
    }

    /// The figures of one role, if present.
    pub fn process(&self, role: &str) -> Option<&ProcessFigures> {
        self.processes.iter().find(|p| p.role == role)
    }

    /// Whether the stack sustained the offered load: it settled, ingested at least 97 % of
    /// vehicles × rate, lost at most 0.1 % in the window, kept p99 within a second and dropped no
    /// dispatcher.
    pub fn sustained(&self) -> bool {
        let offered = f64::from(self.vehicles) * self.rate;
        self.settle_secs.is_some()
            && self.ingested_per_s >= 0.97 * offered
            && self.window_loss_fraction() <= 0.001
            && self.latency.p99 <= 1000.0
            && self.disconnects == 0
    }

    /// Broker and bridge together; in a cluster run, every server process (mosquitto, Redis,
    /// PostgreSQL and the bridges).
    pub fn server(&self) -> ProcessFigures {
        let mut sum = ProcessFigures {
            role: "broker+bridge".into(),
            count: 0,
            cpu_secs: 0.0,
            peak_rss_mib: 0.0,
        };
        for p in &self.processes {
            let server = matches!(
                p.role.as_str(),
                "broker" | "bridge" | "broker+bridge" | "mosquitto" | "redis" | "postgres"
            ) || p.role.starts_with("bridge-");
            if server {
                sum.count += p.count;
                sum.cpu_secs += p.cpu_secs;
                sum.peak_rss_mib += p.peak_rss_mib;
            }
        }
        sum
    }
}

impl Measured {
    /// The bridges alone (`bridge-1` ...; `bridge` or `broker+bridge` outside a cluster).
    pub fn bridges(&self) -> ProcessFigures {
        let mut sum = ProcessFigures {
            role: "bridges".into(),
            count: 0,
            cpu_secs: 0.0,
            peak_rss_mib: 0.0,
        };
        for p in &self.processes {
            if p.role == "bridge" || p.role == "broker+bridge" || p.role.starts_with("bridge-") {
                sum.count += p.count;
                sum.cpu_secs += p.cpu_secs;
                sum.peak_rss_mib += p.peak_rss_mib;
            }
        }
        sum
    }
}

/// Latency histogram buckets as node reports them: 0.1 ms below 1 s, then 1 ms.
const FINE: usize = 10_000;

/// The middle of `bucket`, in ms.
fn bucket_ms(bucket: usize) -> f64 {
    if bucket < FINE {
        (bucket as f64 + 0.5) / 10.0
    } else {
        1000.0 + (bucket - FINE) as f64 + 0.5
    }
}

/// The percentiles of a latency histogram (counts per bucket, see [`FINE`]) whose largest
/// value is `max`.
pub fn percentiles(histogram: &HashMap<usize, f64>, max: f64) -> Latency {
    let total: f64 = histogram.values().sum();
    let mut buckets: Vec<(usize, f64)> = histogram.iter().map(|(&b, &c)| (b, c)).collect();
    buckets.sort_unstable_by_key(|&(b, _)| b);
    let at = |q: f64| {
        let target = (q * total).ceil().max(1.0);
        let mut seen = 0.0;
        for &(bucket, count) in &buckets {
            seen += count;
            if seen >= target {
                return bucket_ms(bucket).min(max);
            }
        }
        max
    };
    if total == 0.0 {
        return Latency::default();
    }
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max,
    }
}

impl ProcessFigures {
    /// The figures per role: process `i` has role `roles[i]`, used `cpu_secs[i]` over the
    /// window and peaked at `peak_kib[i]` KiB; roles that recur are summed, in the order they
    /// first appear.
    pub fn by_role(roles: &[String], cpu_secs: &[f64], peak_kib: &[Option<u64>]) -> Vec<Self> {
        let mut processes: Vec<Self> = Vec::new();
        for ((role, &cpu), peak) in roles.iter().zip(cpu_secs).zip(peak_kib) {
            let rss = peak.unwrap_or(0) as f64 / 1024.0;
            match processes.iter_mut().find(|p| &p.role == role) {
                Some(p) => {
                    p.count += 1;
                    p.cpu_secs += cpu;
                    p.peak_rss_mib += rss;
                }
                None => processes.push(Self {
                    role: role.clone(),
                    count: 1,
                    cpu_secs: cpu,
                    peak_rss_mib: rss,
                }),
            }
        }
        processes
    }
}
