//! One measured run: the stack, the dispatchers, the devices; warm-up, settling, the window,
//! the drain, and the figures.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::cli::{DeviceKind, RunArgs, StackKind};
use crate::devices::Devices;
use crate::dispatchers::{Dispatchers, losses};
use crate::engines::EngineCounters;
use crate::measured::{ClusterFigures, Measured, ProcessFigures};
use crate::stack::{Probe, Stack};
use tests::procfs;

/// What every run shares.
pub struct Env {
    /// Where the release binaries are.
    pub bins: PathBuf,
    /// `tests/node`, with socket.io-client installed.
    pub node_dir: PathBuf,
    /// This program, to run the generator.
    pub exe: PathBuf,
}

impl Env {
    /// Locates everything a run needs, and has the `tests` library take the binaries from
    /// `bins`.
    ///
    /// # Errors
    /// If a piece is missing.
    pub fn new(bins: PathBuf) -> anyhow::Result<Self> {
        tests::bin::use_dir(bins.clone())?;
        Ok(Self {
            bins,
            node_dir: tests::node::node_dir()?,
            exe: std::env::current_exe().context("locating loadbench")?,
        })
    }
}

/// The counters at one end of the window.
struct Snapshot {
    at: Instant,
    cpu: Vec<Option<f64>>,
    machine: Option<(f64, f64)>,
    ingested: f64,
    sent: f64,
    engines: Option<EngineCounters>,
}

/// CPU seconds of `probe` so far.
fn probe_cpu(probe: &Probe) -> Option<f64> {
    let pid = probe.pid?;
    if probe.tree {
        procfs::tree_cpu_secs(pid)
    } else {
        procfs::cpu_secs(pid)
    }
}

/// Peak RSS of `probe` in KiB (summed over its children for a tree).
fn probe_peak_kib(probe: &Probe) -> Option<u64> {
    let pid = probe.pid?;
    let own = procfs::status_kib(pid, "VmHWM")?;
    if !probe.tree {
        return Some(own);
    }
    let children: u64 = procfs::children(pid)
        .into_iter()
        .filter_map(|child| procfs::status_kib(child, "VmHWM"))
        .sum();
    Some(own + children)
}

async fn snapshot(
    stack: &Stack,
    probes: &[Probe],
    devices: &mut Devices,
) -> anyhow::Result<Snapshot> {
    let at = Instant::now();
    let cpu = probes.iter().map(probe_cpu).collect();
    let machine = procfs::machine();
    let sent = devices.sent().await?;
    let ingested = stack.metric(stack.ingest_metric).await?;
    let engines = match &stack.engines {
        Some(engines) => Some(engines.counters().await?),
        None => None,
    };
    Ok(Snapshot {
        at,
        cpu,
        machine,
        ingested,
        sent,
        engines,
    })
}

/// Waits out the warm-up, then until the stack keeps up with the offered load (see
/// [`RunArgs::settle_max`]); returns the seconds since the devices started, or `None` if it
/// did not settle in time (the run is measured anyway).
async fn settle(args: &RunArgs, stack: &Stack, devices: &Devices) -> anyhow::Result<Option<f64>> {
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    if args.settle_max == 0 || !devices.exact() {
        return Ok(Some(began.elapsed().as_secs_f64()));
    }
    let offered = f64::from(args.vehicles) * args.rate;
    let deadline = began + Duration::from_secs(args.warmup + args.settle_max);
    let mut last = (Instant::now(), stack.metric(stack.ingest_metric).await?);
    let mut steady = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = (Instant::now(), stack.metric(stack.ingest_metric).await?);
        let rate = (now.1 - last.1) / now.0.duration_since(last.0).as_secs_f64();
        last = now;
        // Heartbeats lost at start-up never arrive, so a backlog of sent − ingested need
        // not drain: the rate is what tells a stack that keeps up.
        let even = (rate - offered).abs() <= 0.05 * offered;
        steady = if even { steady + 1 } else { 0 };
        if steady >= 3 {
            return Ok(Some(began.elapsed().as_secs_f64()));
        }
    }
    eprintln!(
        "loadbench: not settled within {} s; measuring anyway",
        args.settle_max
    );
    Ok(None)
}

/// Runs `stack` under the load of `args` and measures it.
///
/// # Errors
/// If a program fails to start, answer or stay up.
pub async fn measure(env: &Env, args: &RunArgs, kind: StackKind) -> anyhow::Result<Measured> {
    let stack = Stack::start(kind, args).await?;
    let result = drive(env, args, &stack).await;
    stack.stop().await;
    result
}

async fn drive(env: &Env, args: &RunArgs, stack: &Stack) -> anyhow::Result<Measured> {
    let interval_ms = 1000.0 / args.rate;
    let tick_ms = args.tick_ms();

    // Dispatchers first, so they see every heartbeat from the first one.
    let mut dispatchers = Dispatchers::start(env, args, &stack.bridges).await?;

    // Devices: connect every vehicle, then start publishing.
    let (mut devices, connections, connect_secs) = Devices::start(env, args, stack).await?;
    eprintln!(
        "loadbench: {} vehicles on {connections} connections in {connect_secs:.1} s; warming up {} s",
        args.vehicles, args.warmup
    );
    let settle_secs = settle(args, stack, &devices).await?;

    // The window.
    let stack_probes = stack.probes();
    let mut probes: Vec<Probe> = stack_probes.iter().map(|(_, p)| *p).collect();
    let single = |pid| Probe { pid, tree: false };
    probes.push(single(devices.pid()));
    probes.extend(dispatchers.pids().map(single));
    let load_before = procfs::load_average().unwrap_or(0.0);
    dispatchers.open_window().await?;
    let begin = snapshot(stack, &probes, &mut devices).await?;
    eprintln!("loadbench: measuring {} s", args.duration);
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let end = snapshot(stack, &probes, &mut devices).await?;
    let window = dispatchers.close_window().await?;

    let peak: Vec<Option<u64>> = probes.iter().map(probe_peak_kib).collect();

    // Stop the devices, let the last positions arrive, collect what each client saw.
    let done = devices.stop().await?;
    tokio::time::sleep(Duration::from_millis(tick_ms + args.slack_ms + 1000)).await;
    let reports = dispatchers.finish().await?;

    // Figures.
    let secs = end.at.duration_since(begin.at).as_secs_f64();
    let emits_dropped = match stack.dropped_metric {
        Some(sample) => Some(stack.metric(sample).await?),
        None => None,
    };
    let (warnings, top_warnings) = warnings(stack);
    let allowed = ((tick_ms + args.slack_ms) as f64 / interval_ms).floor() as i64;
    let lost = losses(&reports, done.last_seq.as_deref().unwrap_or(&[]), allowed);

    let roles: Vec<String> = stack_probes
        .iter()
        .map(|(role, _)| role.clone())
        .chain(std::iter::once("devices".to_owned()))
        .chain(std::iter::repeat_n("dispatchers".to_owned(), reports.len()))
        .collect();
    let cpu: Vec<f64> = begin
        .cpu
        .iter()
        .zip(&end.cpu)
        .map(|pair| match pair {
            (Some(a), Some(b)) => b - a,
            _ => 0.0,
        })
        .collect();
    let ours: f64 = cpu.iter().sum();
    let cluster = match (&begin.engines, &end.engines) {
        (Some(a), Some(b)) => Some(ClusterFigures {
            bridges: stack.bridges.len(),
            redis_commands_per_s: (b.redis_commands - a.redis_commands) / secs,
            redis_per_s_by_command: b
                .redis_by_command
                .iter()
                .map(|(name, calls)| {
                    let before = a.redis_by_command.get(name).copied().unwrap_or(0.0);
                    (name.clone(), (calls - before) / secs)
                })
                .filter(|(_, rate)| *rate > 0.0)
                .collect(),
            pg_commits_per_s: (b.pg_commits - a.pg_commits) / secs,
            pg_rows_written_per_s: (b.pg_rows_written - a.pg_rows_written) / secs,
            pg_inserted_per_s: (b.pg_inserted - a.pg_inserted) / secs,
        }),
        _ => None,
    };
    let machine_busy_cores = match (begin.machine, end.machine) {
        (Some((b0, _)), Some((b1, _))) => (b1 - b0) / secs,
        _ => 0.0,
    };
    Ok(Measured {
        stack: stack.kind,
        vehicles: args.vehicles,
        rate: args.rate,
        dispatchers: args.dispatchers,
        connections,
        connect_secs,
        settle_secs,
        settle_checked: args.settle_max > 0 && args.devices == DeviceKind::Generator,
        window_secs: secs,
        sent_per_s: (end.sent - begin.sent) / secs,
        ingested_per_s: (end.ingested - begin.ingested) / secs,
        delivered_per_s: window.positions / secs,
        events_per_s: window.events / secs,
        latency: window.latency,
        late: window.late,
        sent_total: done.sent_total,
        lost: lost.total,
        lost_worst: lost.worst,
        sent_window: end.sent - begin.sent,
        lost_window: window.lost,
        disconnects: lost.disconnects,
        processes: ProcessFigures::by_role(&roles, &cpu, &peak),
        machine_busy_cores,
        others_cores: (machine_busy_cores - ours / secs).max(0.0),
        load_before,
        device_blocked: done.blocked,
        device_errors: done.errors,
        device_max_late_ms: done.max_late_ms,
        emits_dropped,
        warnings,
        top_warnings,
        tick_ms,
        cluster,
    })
}

/// The log lines of the stack's programs at WARN or reporting a failed broadcast: how many,
/// and the three most frequent (digits masked) with their counts.
fn warnings(stack: &Stack) -> (usize, Vec<(usize, String)>) {
    let mut kinds: HashMap<String, usize> = HashMap::new();
    let mut warnings = 0;
    for (_, program) in &stack.programs {
        for line in program.log_text().lines() {
            let warning = line.contains(" WARN ") || line.contains("broadcast failed");
            // The start-up notices of the demo setup (open mode, demo tokens) are expected.
            if !warning || line.contains(" MODE") {
                continue;
            }
            warnings += 1;
            // The message without timestamp and numbers, to count alike lines together.
            let message = line.split_once(" WARN ").map_or(line, |(_, m)| m);
            let masked: String = message
                .chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .take(140)
                .collect();
            *kinds.entry(masked).or_default() += 1;
        }
    }
    let mut top_warnings: Vec<(usize, String)> = kinds.into_iter().map(|(m, n)| (n, m)).collect();
    top_warnings.sort_unstable_by(|a, b| b.cmp(a));
    top_warnings.truncate(3);
    (warnings, top_warnings)
}
