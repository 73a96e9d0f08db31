//! The markdown report.

use std::fmt::Write as _;
use std::time::Duration;

use tests::procfs;

use crate::cli::Cli;
use crate::run::Figures;

/// Issue #17 item 5: durable events per second end to end.
pub const TARGET: f64 = 10_000.0;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The whole report: the command, the machine, one row per run, the ratios, the checks.
pub fn render(cli: &Cli, engine: &str, load_before: f64, runs: &[Figures]) -> String {
    let mut out = String::new();
    let command: Vec<String> = std::env::args().skip(1).collect();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let _ = writeln!(out, "### eventbench: durable delivery events end to end\n");
    let _ = writeln!(
        out,
        "`cargo run --release -p tests --bin eventbench -- {}`\n",
        command.join(" ")
    );
    let _ = writeln!(
        out,
        "Machine: {cores} CPUs (`nproc`), load average {load_before:.2} before the runs; \
         store: {engine}; the release `bridge` with its embedded broker and default settings \
         (`synchronous = full`). Window: from {}% of a run's events acknowledged to the first \
         lane out of orders. Each vehicle publishes its order's three events at QoS 1, \
         {} unacknowledged at most; `/proc` CPU of the bridge process and of this program \
         (the vehicles) per event.\n",
        10, cli.in_flight
    );
    let _ = writeln!(
        out,
        "| run | store | vehicles at once | in flight | events in window | window s | events/s | \
         of 10k/s | PUBACK p50 ms | p99 ms | max ms | in the store p50 / p99 ms | events per commit | bridge CPU µs/event | vehicles' CPU µs/event | \
         PostgreSQL CPU µs/event | machine busy | load (1 min) |"
    );
    let _ = writeln!(
        out,
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for run in runs {
        let w = &run.window;
        let per_event = |cpu: f64| cpu / w.events.max(1) as f64 * 1e6;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {:.0} | {:.0} | {} | {} | {:.2} |",
            if run.what == "control" {
                "control: per connection, no events"
            } else {
                run.what
            },
            run.store.label(),
            run.vehicles,
            run.in_flight,
            w.events,
            w.length.as_secs_f64(),
            w.rate(),
            if run.what == "control" {
                "–".to_owned()
            } else {
                format!("{:.0} %", w.rate() / TARGET * 100.0)
            },
            ms(w.latency(0.5)),
            ms(w.latency(0.99)),
            ms(w.latency(1.0)),
            run.in_store.map_or_else(
                || "–".to_owned(),
                |(p50, p99)| format!("{:.2} / {:.2}", ms(p50), ms(p99))
            ),
            run.events_per_commit
                .map_or_else(|| "–".to_owned(), |e| format!("{e:.1}")),
            per_event(w.bridge_cpu),
            per_event(w.bench_cpu),
            w.server_cpu
                .map_or_else(|| "–".to_owned(), |c| format!("{:.0}", per_event(c))),
            w.machine_busy
                .map_or_else(|| "?".to_owned(), |b| format!("{:.0} %", b * 100.0)),
            run.load,
        );
    }
    let _ = writeln!(out);
    if let Some(baseline) = runs.iter().find(|r| r.what == "baseline") {
        for run in runs.iter().filter(|r| r.what == "grouped") {
            let _ = writeln!(
                out,
                "- {} vehicles at once / one at a time: {:.1}× the events per second \
                 ({:.0} / {:.0}).",
                run.vehicles,
                run.window.rate() / baseline.window.rate(),
                run.window.rate(),
                baseline.window.rate()
            );
        }
    }
    if let Some(control) = runs.iter().find(|r| r.what == "control") {
        let per_connection = control.window.bridge_cpu / control.window.events.max(1) as f64 * 1e6;
        let _ = writeln!(
            out,
            "- Control ({} vehicles at once, connections only): a vehicle's CONNECT and \
             DISCONNECT cost the bridge {per_connection:.0} µs of CPU, {:.0} µs per event of \
             the grouped runs (one connection per order of three events).",
            control.vehicles,
            per_connection / 3.0
        );
    }
    for run in runs.iter().filter(|r| r.what != "control") {
        let v = &run.verified;
        let _ = writeln!(
            out,
            "- Verified ({} vehicles at once), the bridge stopped with SIGTERM: {} of {} \
             acknowledged events recorded unflagged ({} events in the store), {} of {} \
             completed orders `delivered`; orders prepared in {:.1} s.",
            run.vehicles,
            v.recorded,
            v.acknowledged,
            v.stored,
            v.delivered,
            v.completed,
            run.prepare_secs
        );
    }
    let _ = writeln!(
        out,
        "- Load average after the runs: {:.2}.",
        procfs::load_average().unwrap_or(f64::NAN)
    );
    out
}
