//! The markdown tables (the format of BENCHMARKS.md's end-to-end section).

use std::fmt::Write as _;

use crate::cli::{BrokerMode, RunArgs, StackKind};
use crate::measure::Env;
use crate::measured::{ClusterFigures, Measured};
use crate::stages::StageRun;
use tests::procfs;

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// What was run, on what.
pub fn header(args: &RunArgs, env: &Env) -> String {
    let mut out = String::new();
    let commit = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(tests::workspace())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    let _ = writeln!(
        out,
        "loadbench: {} cores, load average {:.2} at start, commit {commit}, binaries in {}",
        cores(),
        procfs::load_average().unwrap_or(0.0),
        env.bins.display()
    );
    let _ = writeln!(
        out,
        "tick {} ms, slack {} ms, broker {}, {} dispatcher clients per node process, warm-up {} s\n",
        args.tick_ms(),
        args.slack_ms,
        if args.cluster() {
            format!(
                "mosquitto with {} bridge(s) in a shared group, Redis and PostgreSQL",
                args.bridges
            )
        } else {
            match args.broker {
                BrokerMode::Embedded => "embedded",
                BrokerMode::Separate => "separate",
            }
            .to_owned()
        },
        args.clients_per_process,
        args.warmup
    );
    out
}

fn name(kind: StackKind) -> &'static str {
    match kind {
        StackKind::Fleetbeat => "Fleetbeat",
        StackKind::Baseline => "baseline",
        StackKind::Careful => "careful",
        StackKind::Both => "both",
        StackKind::All => "all",
    }
}

/// A markdown table's header row and separator.
fn table(columns: &[&str]) -> String {
    format!(
        "| {} |\n|{}\n",
        columns.join(" | "),
        "---|".repeat(columns.len())
    )
}

/// Broker and bridge CPU per ingested heartbeat, µs.
fn us_per_heartbeat(m: &Measured) -> f64 {
    1e6 * m.server().cpu_secs / (m.ingested_per_s * m.window_secs).max(1.0)
}

/// Seconds until the stack settled, or a bold "no".
fn settled_after(m: &Measured) -> String {
    m.settle_secs
        .map_or_else(|| "**no**".to_owned(), |s| format!("{s:.0}"))
}

fn pct_core(cpu_secs: f64, secs: f64) -> f64 {
    100.0 * cpu_secs / secs.max(1e-9)
}

/// The rows of one run: (figure, value).
fn rows(m: &Measured) -> Vec<(String, f64)> {
    let mut rows = vec![
        ("heartbeats/s sent".to_owned(), m.sent_per_s),
        ("heartbeats/s ingested".to_owned(), m.ingested_per_s),
        (
            "positions/s delivered (all dispatchers)".to_owned(),
            m.delivered_per_s,
        ),
        ("position events/s received".to_owned(), m.events_per_s),
        ("latency p50 ms".to_owned(), m.latency.p50),
        ("latency p99 ms".to_owned(), m.latency.p99),
        ("latency p99.9 ms".to_owned(), m.latency.p999),
        ("latency max ms".to_owned(), m.latency.max),
        (
            "loss % in the window (heartbeats × dispatchers)".to_owned(),
            100.0 * m.window_loss_fraction(),
        ),
        (
            "loss % over the whole run, start-up included".to_owned(),
            100.0 * m.loss_fraction(),
        ),
    ];
    let server = m.server();
    let label = if m.cluster.is_some() {
        "server processes (mosquitto, Redis, PostgreSQL, bridges)"
    } else {
        "broker+bridge"
    };
    rows.push((
        format!("{label} CPU % of a core"),
        pct_core(server.cpu_secs, m.window_secs),
    ));
    rows.push((format!("{label} CPU µs per heartbeat"), us_per_heartbeat(m)));
    rows.push((format!("{label} peak RSS MiB"), server.peak_rss_mib));
    for p in &m.processes {
        if p.role == "broker+bridge" {
            continue;
        }
        rows.push((
            format!("{} CPU % of a core", p.role),
            pct_core(p.cpu_secs, m.window_secs),
        ));
        rows.push((format!("{} peak RSS MiB", p.role), p.peak_rss_mib));
    }
    if let Some(c) = &m.cluster {
        rows.extend(cluster_rows(m, c));
    }
    rows.push((
        format!("machine busy, cores (of {})", cores()),
        m.machine_busy_cores,
    ));
    rows.push((
        "… of which outside the benchmark's processes, cores".to_owned(),
        m.others_cores,
    ));
    rows
}

/// The figures of a cluster run: bridge CPU per heartbeat, Redis and PostgreSQL load.
fn cluster_rows(m: &Measured, c: &ClusterFigures) -> Vec<(String, f64)> {
    let heartbeats = (m.ingested_per_s * m.window_secs).max(1.0);
    let bridges = m.bridges();
    // Each bridge emits every vehicle's positions (its own and those Redis brought) to its own
    // sockets, one batch per tick: a dispatcher receives its bridge's batches, and the
    // cluster's batches are that times the bridges.
    let batches_per_s = c.bridges as f64 * m.events_per_s / f64::from(m.dispatchers).max(1.0);
    let tick_s = m.tick_ms as f64 / 1000.0;
    vec![
        (
            format!("bridges ({}) CPU % of a core", c.bridges),
            pct_core(bridges.cpu_secs, m.window_secs),
        ),
        (
            "bridges CPU µs per heartbeat".to_owned(),
            1e6 * bridges.cpu_secs / heartbeats,
        ),
        (
            "heartbeats ingested per bridge CPU-second".to_owned(),
            heartbeats / bridges.cpu_secs.max(1e-9),
        ),
        (
            "position batches emitted/s, all bridges".to_owned(),
            batches_per_s,
        ),
        ("Redis commands/s".to_owned(), c.redis_commands_per_s),
        (
            "Redis commands per heartbeat".to_owned(),
            c.redis_commands_per_s / m.ingested_per_s.max(1e-9),
        ),
        (
            "Redis commands per position batch".to_owned(),
            c.redis_commands_per_s / batches_per_s.max(1e-9),
        ),
        (
            format!("Redis commands per {} ms tick per bridge", m.tick_ms),
            c.redis_commands_per_s * tick_s / (c.bridges as f64).max(1.0),
        ),
        ("PostgreSQL commits/s".to_owned(), c.pg_commits_per_s),
        (
            "PostgreSQL rows written/s (inserted+updated+deleted)".to_owned(),
            c.pg_rows_written_per_s,
        ),
        ("PostgreSQL rows inserted/s".to_owned(), c.pg_inserted_per_s),
        (
            "PostgreSQL rows written per heartbeat".to_owned(),
            c.pg_rows_written_per_s / m.ingested_per_s.max(1e-9),
        ),
    ]
}

fn fmt(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn notes(m: &Measured) -> String {
    format!(
        "{}: {} vehicles × {} Hz on {} connections (connected in {:.1} s, settled {}), {} dispatchers, \
         {:.1} s window; load average {:.2} before the window, {:.2} cores busy outside the \
         benchmark during it; {} heartbeats sent in all, \
         {} lost (worst dispatcher {}), {} late (> tick + slack), {} dispatcher disconnects; \
         devices: {} blocked, {} errors, at most {:.1} ms behind schedule; emits the bridge \
         could not hand to a socket: {}; warnings logged by the stack: {}",
        name(m.stack),
        m.vehicles,
        m.rate,
        m.connections,
        m.connect_secs,
        settled(m),
        m.dispatchers,
        m.window_secs,
        m.load_before,
        m.others_cores,
        m.sent_total,
        m.lost,
        m.lost_worst,
        m.late,
        m.disconnects,
        m.device_blocked,
        m.device_errors,
        m.device_max_late_ms,
        m.emits_dropped
            .map_or_else(|| "not counted".to_owned(), |d| format!("{d:.0}")),
        m.warnings,
    )
}

/// "window / whole run" loss in %.
fn loss_pair(m: &Measured) -> String {
    format!(
        "{} / {}",
        fmt(100.0 * m.window_loss_fraction()),
        fmt(100.0 * m.loss_fraction())
    )
}

fn settled(m: &Measured) -> String {
    if !m.settle_checked {
        return "not checked: measured after the warm-up".to_owned();
    }
    m.settle_secs.map_or_else(
        || "**not within --settle-max**".to_owned(),
        |s| format!("{s:.0} s after the first heartbeat"),
    )
}

/// The Redis commands of a cluster run, most called first.
fn redis_commands(m: &Measured) -> String {
    let Some(c) = &m.cluster else {
        return String::new();
    };
    let mut by: Vec<&(String, f64)> = c.redis_per_s_by_command.iter().collect();
    by.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    let list: Vec<String> = by
        .iter()
        .take(6)
        .map(|(name, rate)| format!("{name} {}/s", fmt(*rate)))
        .collect();
    format!("; Redis commands in the window: {}", list.join(", "))
}

fn warnings(m: &Measured) -> String {
    m.top_warnings
        .iter()
        .map(|(n, message)| format!("\n  - {n} × `{}`", message.replace('`', "'")))
        .collect()
}

/// The baselines Fleetbeat is compared with, in the order of their columns.
const BASELINES: [StackKind; 2] = [StackKind::Baseline, StackKind::Careful];

/// Fleetbeat's `value` of the figure `label` against a baseline's `other`: the baseline's
/// cell and the ratio's.
fn compared(label: &str, value: f64, other: Option<f64>) -> (String, String) {
    match other {
        Some(o) if label.starts_with('…') => (fmt(o), "–".into()),
        Some(o) if o != 0.0 => (fmt(o), format!("{:.2}×", value / o)),
        Some(o) => (fmt(o), "–".into()),
        None => ("–".into(), "–".into()),
    }
}

/// One table per run; when Fleetbeat ran with one or both baselines, one table with a column
/// per stack and a ratio "Fleetbeat / baseline" per baseline.
pub fn side_by_side(results: &[Measured]) -> String {
    let mut out = String::new();
    let fleetbeat = results.iter().find(|m| m.stack == StackKind::Fleetbeat);
    let baselines: Vec<&Measured> = BASELINES
        .iter()
        .filter_map(|&kind| results.iter().find(|m| m.stack == kind))
        .collect();
    match fleetbeat {
        Some(f) if !baselines.is_empty() => {
            let ratios: Vec<String> = baselines
                .iter()
                .map(|b| format!("Fleetbeat / {}", name(b.stack)))
                .collect();
            let mut columns = vec!["figure", "Fleetbeat"];
            columns.extend(baselines.iter().map(|b| name(b.stack)));
            columns.extend(ratios.iter().map(String::as_str));
            out.push_str(&table(&columns));
            let fr = rows(f);
            let brs: Vec<Vec<(String, f64)>> = baselines.iter().map(|b| rows(b)).collect();
            for (label, value) in &fr {
                let cells: Vec<(String, String)> = brs
                    .iter()
                    .map(|br| {
                        let other = br.iter().find(|(l, _)| l == label).map(|r| r.1);
                        compared(label, *value, other)
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "| {label} | {} | {} | {} |",
                    fmt(*value),
                    cells
                        .iter()
                        .map(|c| c.0.as_str())
                        .collect::<Vec<_>>()
                        .join(" | "),
                    cells
                        .iter()
                        .map(|c| c.1.as_str())
                        .collect::<Vec<_>>()
                        .join(" | "),
                );
            }
            // The baselines' own rows (their processes), once each, in order.
            let mut extra: Vec<&str> = Vec::new();
            for br in &brs {
                for (label, _) in br {
                    let new =
                        !fr.iter().any(|(l, _)| l == label) && !extra.contains(&label.as_str());
                    if new {
                        extra.push(label);
                    }
                }
            }
            for label in extra {
                let values: Vec<String> = brs
                    .iter()
                    .map(|br| {
                        br.iter()
                            .find(|(l, _)| l == label)
                            .map_or_else(|| "–".to_owned(), |r| fmt(r.1))
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "| {label} | – | {} | {} |",
                    values.join(" | "),
                    vec!["–"; brs.len()].join(" | ")
                );
            }
        }
        _ => {
            for m in results {
                out.push_str(&table(&["figure", name(m.stack)]));
                for (label, value) in rows(m) {
                    let _ = writeln!(out, "| {label} | {} |", fmt(value));
                }
            }
        }
    }
    out.push('\n');
    for m in results {
        let _ = writeln!(out, "- {}{}{}", notes(m), redis_commands(m), warnings(m));
    }
    out
}

/// Every run of a repeated side by side, in order, with the figures that vary most.
pub fn runs(runs: &[Measured]) -> String {
    let mut out = String::from(
        "\nAll runs (the table above shows, per stack, the one with the least CPU busy outside the benchmark):\n\n",
    );
    out.push_str(&table(&[
        "run",
        "stack",
        "ingested/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "loss % window / whole run",
        "broker+bridge CPU % of a core",
        "outside the benchmark, cores",
    ]));
    for (i, m) in runs.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {:.1} | {:.2} |",
            i + 1,
            name(m.stack),
            m.ingested_per_s,
            fmt(m.latency.p50),
            fmt(m.latency.p99),
            fmt(m.latency.max),
            loss_pair(m),
            pct_core(m.server().cpu_secs, m.window_secs),
            m.others_cores,
        );
    }
    out
}

/// The sustained-throughput steps, and the best sustained step of each stack.
pub fn saturation(steps: &[Measured]) -> String {
    let mut out = table(&[
        "stack",
        "vehicles × Hz",
        "offered/s",
        "settled after s",
        "sent/s",
        "ingested/s",
        "positions/s delivered",
        "p50 ms",
        "p99 ms",
        "loss % window / whole run",
        "broker+bridge CPU % of a core",
        "broker+bridge peak RSS MiB",
        "machine busy cores",
        "outside the benchmark, cores",
        "sustained",
    ]);
    for m in steps {
        let server = m.server();
        let _ = writeln!(
            out,
            "| {} | {} × {} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {} |",
            name(m.stack),
            m.vehicles,
            m.rate,
            f64::from(m.vehicles) * m.rate,
            settled_after(m),
            m.sent_per_s,
            m.ingested_per_s,
            m.delivered_per_s,
            fmt(m.latency.p50),
            fmt(m.latency.p99),
            loss_pair(m),
            pct_core(server.cpu_secs, m.window_secs),
            server.peak_rss_mib,
            m.machine_busy_cores,
            m.others_cores,
            if m.sustained() { "yes" } else { "**no**" },
        );
    }
    out.push('\n');
    let best = |kind: StackKind| {
        steps
            .iter()
            .filter(|m| m.stack == kind && m.sustained())
            .max_by(|a, b| a.ingested_per_s.total_cmp(&b.ingested_per_s))
    };
    for kind in [
        StackKind::Fleetbeat,
        StackKind::Baseline,
        StackKind::Careful,
    ] {
        if let Some(m) = best(kind) {
            let _ = writeln!(
                out,
                "- {} sustained {:.0} heartbeats/s (p99 {} ms)",
                name(kind),
                m.ingested_per_s,
                fmt(m.latency.p99)
            );
        }
    }
    for kind in BASELINES {
        if let (Some(f), Some(b)) = (best(StackKind::Fleetbeat), best(kind)) {
            let _ = writeln!(
                out,
                "- Fleetbeat / {} sustained throughput: {:.2}×, p99 {:.2}×",
                name(kind),
                f.ingested_per_s / b.ingested_per_s.max(1.0),
                f.latency.p99 / b.latency.p99.max(1e-9)
            );
        }
    }
    out
}

/// The scaling curve.
pub fn curve(points: &[Measured]) -> String {
    let mut out = table(&[
        "vehicles",
        "connections",
        "settled after s",
        "heartbeats/s ingested",
        "positions/s delivered",
        "p50 ms",
        "p99 ms",
        "max ms",
        "loss % window / whole run",
        "broker+bridge CPU % of a core",
        "µs CPU per heartbeat",
        "broker+bridge peak RSS MiB",
        "devices CPU %",
        "dispatchers CPU %",
        "machine busy cores",
        "outside the benchmark, cores",
    ]);
    for m in points {
        let server = m.server();
        let cpu = |role: &str| {
            m.process(role)
                .map_or(0.0, |p| pct_core(p.cpu_secs, m.window_secs))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            m.vehicles,
            m.connections,
            settled_after(m),
            m.ingested_per_s,
            m.delivered_per_s,
            fmt(m.latency.p50),
            fmt(m.latency.p99),
            fmt(m.latency.max),
            loss_pair(m),
            pct_core(server.cpu_secs, m.window_secs),
            us_per_heartbeat(m),
            server.peak_rss_mib,
            cpu("devices"),
            cpu("dispatchers"),
            m.machine_busy_cores,
            m.others_cores,
        );
    }
    out.push('\n');
    for m in points {
        let _ = writeln!(out, "- {}{}", notes(m), warnings(m));
    }
    out
}

/// CPU µs per ingested heartbeat of the process with `role`, if the run had one.
fn role_us_per_heartbeat(m: &Measured, role: &str) -> Option<f64> {
    let p = m.process(role)?;
    Some(1e6 * p.cpu_secs / (m.ingested_per_s * m.window_secs).max(1.0))
}

/// The ablation of `--stages`: each run's broker and bridge CPU per heartbeat, and the
/// difference to its reference, the cost of what the run switched off.
pub fn stages(runs: &[StageRun]) -> String {
    let mut out = table(&[
        "run",
        "broker+bridge CPU µs per heartbeat",
        "broker µs",
        "bridge µs",
        "Δ µs per heartbeat (reference − run)",
        "the Δ is the cost of",
        "broker+bridge CPU % of a core",
        "heartbeats/s ingested",
        "p50 ms",
        "p99 ms",
        "loss % window / whole run",
        "outside the benchmark, cores",
        "load average before",
    ]);
    let opt = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), fmt);
    for (i, run) in runs.iter().enumerate() {
        let m = &run.measured;
        let total = us_per_heartbeat(m);
        let delta = run
            .variant
            .reference
            .and_then(|r| runs.get(r))
            .map(|r| us_per_heartbeat(&r.measured) - total);
        let reference = run
            .variant
            .reference
            .map_or_else(String::new, |r| format!(" (against run {})", r + 1));
        let _ = writeln!(
            out,
            "| {}. {} | {} | {} | {} | {} | {}{} | {:.1} | {:.0} | {} | {} | {} | {:.2} | {:.2} |",
            i + 1,
            run.variant.name,
            fmt(total),
            opt(role_us_per_heartbeat(m, "broker")),
            opt(role_us_per_heartbeat(m, "bridge")),
            opt(delta),
            run.variant.stage,
            reference,
            pct_core(m.server().cpu_secs, m.window_secs),
            m.ingested_per_s,
            fmt(m.latency.p50),
            fmt(m.latency.p99),
            loss_pair(m),
            m.others_cores,
            m.load_before,
        );
    }
    out.push_str(
        "\nNot separable by a flag or the configuration today (each would need a switch in the \
         bridge or broker; the separate-broker run splits the broker's share from the bridge's; \
         a call-graph profile measures each without a switch: `bench/report.sh profile`, \
         bench/profile-stages.py):\n\
         - socket read and MQTT decode, router: the broker's share in the separate-broker run \
         (with the forwarding to the bridge); to isolate them, a broker that drops `fleet/+/+/hb` \
         after decoding (e.g. `[broker] discard_topics`);\n\
         - seal check: a bridge flag that skips `shared::seal` opening in open mode (e.g. \
         `--trust-unsealed`, heartbeats accepted as plain postcard);\n\
         - fleet update: a flag that stops after the seal and replay checks (e.g. \
         `--ingest-only`);\n\
         - history write (the SQL, not the file): a flag that does not queue history rows (e.g. \
         `history_retention_hours = 0` meaning none; today 0 is refused);\n\
         - emit, split: the Δ of `--dispatchers 0` is building, serialising and writing the \
         batches for `--dispatchers` sockets together; a bridge that builds batches for rooms \
         nobody joined would show the building part as the Δ of one dispatcher against none.\n\n",
    );
    for (i, run) in runs.iter().enumerate() {
        let m = &run.measured;
        let _ = writeln!(out, "- run {}: {}{}", i + 1, notes(m), warnings(m));
    }
    out
}
