//! One measured run (store, bridge, lanes, window, verification), and every run of an
//! invocation.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bridge::store::LATENCY_BOUNDS_US;
use tests::procfs;

use crate::cli::{Cli, StoreKind};
use crate::engine::{self, Engine, Verified};
use crate::lanes::{self, LaneReport, Progress, Work};
use crate::report;

/// How often the window's counters are sampled.
const POLL: Duration = Duration::from_millis(10);
/// The share of a run's events (or of its `--duration`) before the window opens.
const WARM_UP: f64 = 0.1;
/// The bound on the bridge's graceful stop.
const STOP: Duration = Duration::from_secs(60);

/// What one run measured.
#[derive(Debug)]
pub struct Figures {
    /// `baseline` (one lane, one event at a time), `grouped`, or `control` (connections
    /// only: the window counts vehicle connections, not events).
    pub what: &'static str,
    /// The store engine.
    pub store: StoreKind,
    /// Lanes (vehicles publishing at once).
    pub vehicles: u32,
    /// Unacknowledged events per vehicle.
    pub in_flight: u16,
    /// What the measured window saw.
    pub window: Window,
    /// The 1-minute load average at the window's end.
    pub load: f64,
    /// Seconds spent preparing the store's orders.
    pub prepare_secs: f64,
    /// What the store held after the run.
    pub verified: Verified,
    /// Delivery events per transaction over the whole run, as the bridge's `/metrics` counts
    /// them (`None`: not readable).
    pub events_per_commit: Option<f64>,
    /// p50 and p99 of the bridge's `store_event_commit_seconds` over the window: how long an
    /// event took from its hand-over to the store until committed (`None`: not readable).
    pub in_store: Option<(Duration, Duration)>,
}

/// What the measured window of a run saw.
#[derive(Debug)]
pub struct Window {
    /// How long it lasted.
    pub length: Duration,
    /// Events acknowledged in it.
    pub events: u64,
    /// PUBACK latencies of its events, sorted.
    pub latencies: Vec<Duration>,
    /// CPU seconds of the bridge over it.
    pub bridge_cpu: f64,
    /// CPU seconds of this program over it.
    pub bench_cpu: f64,
    /// CPU seconds of the PostgreSQL server (postmaster and backends) over it.
    pub server_cpu: Option<f64>,
    /// Busy share of the machine's CPUs over it (0..1).
    pub machine_busy: Option<f64>,
}

impl Window {
    /// Events acknowledged per second.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.length.as_secs_f64()
    }

    /// Latency at quantile `q` (0..=1).
    pub fn latency(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[i.min(self.latencies.len() - 1)]
    }
}

/// The counters at one moment of a run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    acknowledged: u64,
    bridge_cpu: f64,
    bench_cpu: f64,
    server_cpu: Option<f64>,
    machine: Option<(f64, f64)>,
}

impl Sample {
    fn take(at: Instant, progress: &Progress, bridge: u32, server: Option<u32>) -> Self {
        Self {
            at,
            acknowledged: progress.acknowledged.load(Ordering::Relaxed),
            bridge_cpu: procfs::cpu_secs(bridge).unwrap_or(f64::NAN),
            bench_cpu: procfs::cpu_secs(std::process::id()).unwrap_or(f64::NAN),
            server_cpu: server.and_then(procfs::tree_cpu_secs),
            machine: procfs::machine(),
        }
    }
}

/// Builds the release bridge unless told not to, runs the baseline and every `--vehicles`
/// run, and prints the report.
///
/// # Errors
/// If the build, a run or a verification fails.
pub async fn all(cli: &Cli) -> anyhow::Result<()> {
    let bins = match &cli.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("locating eventbench")?
            .parent()
            .context("eventbench has no directory")?
            .to_path_buf(),
    };
    if !cli.no_build {
        build_bridge()?;
    }
    tests::bin::use_dir(bins)?;
    let engine = Engine::start(cli.store)?;
    let described = engine.describe()?;
    eprintln!("eventbench: {described}");
    let load_before = procfs::load_average().unwrap_or(f64::NAN);
    let mut runs = Vec::new();
    let mut n = 0;
    if cli.baseline_events >= 3 {
        runs.push(one(&engine, cli, n, 1, cli.baseline_events, Kind::Baseline).await?);
        n += 1;
    }
    for &vehicles in &cli.vehicles {
        let kind = Kind::Grouped(cli.in_flight);
        runs.push(one(&engine, cli, n, vehicles, cli.events_per_vehicle, kind).await?);
        n += 1;
    }
    if !cli.no_control
        && let Some(&vehicles) = cli.vehicles.first()
    {
        let control = one(
            &engine,
            cli,
            n,
            vehicles,
            cli.events_per_vehicle,
            Kind::Control,
        );
        runs.push(control.await?);
    }
    print!("{}", report::render(cli, &described, load_before, &runs));
    Ok(())
}

/// The bridge's delivery events per committed transaction so far (its group commit's yield),
/// from `/metrics`; `None` if it cannot be read or nothing was committed.
async fn events_per_commit(bridge: &tests::stack::BridgeProcess) -> Option<f64> {
    let events = bridge
        .metric("fleetbeat_bridge_store_events_committed_total")
        .await
        .ok()?;
    let commits = bridge
        .metric("fleetbeat_bridge_store_event_commits_total")
        .await
        .ok()?;
    (commits > 0.0).then(|| events / commits)
}

/// The bridge's histogram of how long committed events took in the store
/// (`store_event_commit_seconds`) between two scrapes of `/metrics`: its p50 and p99,
/// interpolated within their buckets as Prometheus' `histogram_quantile` does; `None` if it
/// cannot be read or nothing was committed between them.
fn in_store(before: &str, after: &str) -> Option<(Duration, Duration)> {
    const NAME: &str = "fleetbeat_bridge_store_event_commit_seconds_bucket";
    let les = LATENCY_BOUNDS_US
        .iter()
        .map(|&bound| (bound as f64 / 1e6, (bound as f64 / 1e6).to_string()))
        .chain([(f64::INFINITY, "+Inf".to_owned())]);
    let mut buckets = Vec::with_capacity(LATENCY_BOUNDS_US.len() + 1);
    for (bound, le) in les {
        let sample = format!("{NAME}{{le=\"{le}\"}}");
        let count = |text| tests::stack::sample_value(text, &sample);
        buckets.push((bound, count(after)? - count(before)?));
    }
    let at = |q: f64| quantile(&buckets, q).map(Duration::from_secs_f64);
    Some((at(0.5)?, at(0.99)?))
}

/// The `q` quantile of cumulative `buckets` (upper bound, count up to it; the last `+Inf`):
/// linear within the bucket it falls in; the highest finite bound if it falls in `+Inf`.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut below = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(below.0);
            }
            let share = if count > below.1 {
                (rank - below.1) / (count - below.1)
            } else {
                0.0
            };
            return Some(below.0 + (bound - below.0) * share);
        }
        below = (bound, count);
    }
    Some(below.0)
}

/// `cargo build --release --locked -p bridge --bin bridge` in the workspace.
fn build_bridge() -> anyhow::Result<()> {
    let status = tests::bin::cargo()
        .args([
            "build",
            "--quiet",
            "--release",
            "--locked",
            "-p",
            "bridge",
            "--bin",
            "bridge",
        ])
        .status()
        .context("running cargo build")?;
    ensure!(
        status.success(),
        "cargo build of the bridge failed: {status}"
    );
    Ok(())
}

/// What a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One lane, one event at a time.
    Baseline,
    /// Lanes at once, with this many events in flight per vehicle.
    Grouped(u16),
    /// Lanes at once, connecting and disconnecting their vehicles without events.
    Control,
}

/// Run `n`: `vehicles` lanes of `events_per_vehicle` events each (of their vehicles'
/// connections only, for [`Kind::Control`]).
async fn one(
    engine: &Engine,
    cli: &Cli,
    n: u32,
    vehicles: u32,
    events_per_vehicle: u32,
    kind: Kind,
) -> anyhow::Result<Figures> {
    let (what, work, in_flight) = match kind {
        Kind::Baseline => ("baseline", Work::Events(1), 1),
        Kind::Grouped(k) => ("grouped", Work::Events(usize::from(k)), k),
        Kind::Control => ("control", Work::ConnectOnly, 0),
    };
    let per_lane = Cli::orders_per_lane(events_per_vehicle);
    let orders = vehicles.checked_mul(per_lane).context("too many orders")?;
    let target = engine.fresh(&format!("eventbench_{n}_{vehicles}"))?;
    eprintln!("run {n}: {vehicles} vehicles × {per_lane} orders: preparing {orders} orders");
    let prepared = Instant::now();
    engine::prepare(&target, orders).await?;
    let prepare_secs = prepared.elapsed().as_secs_f64();

    let mut bridge = tests::stack::start_bridge(&["--store", &target]).await?;
    let pid = bridge.program.pid().context("the bridge has exited")?;
    let server = engine.server_pid();
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let lanes: Vec<_> = (0..vehicles)
        .map(|lane| {
            let orders = (lane * per_lane..(lane + 1) * per_lane).collect();
            tokio::spawn(lanes::lane(
                lane,
                bridge.mqtt,
                orders,
                work,
                progress.clone(),
            ))
        })
        .collect();

    let per_order = if kind == Kind::Control { 1 } else { 3 };
    let planned = f64::from(vehicles) * f64::from(per_lane * per_order);
    let stop_at = if kind == Kind::Baseline {
        None
    } else {
        cli.duration.map(|d| started + Duration::from_secs_f64(d))
    };
    let warm_at = stop_at.map(|at| started + (at - started).mul_f64(WARM_UP));
    let mut start: Option<Sample> = None;
    // `/metrics` at the window's start and end: the store's latency histogram over it.
    let mut metrics_at_start = None;
    let end = loop {
        tokio::time::sleep(POLL).await;
        let now = Instant::now();
        if stop_at.is_some_and(|at| now >= at) {
            progress.stop.store(true, Ordering::Relaxed);
        }
        let acknowledged = progress.acknowledged.load(Ordering::Relaxed) as f64;
        let warm = acknowledged >= planned * WARM_UP || warm_at.is_some_and(|at| now >= at);
        if start.is_none() && warm {
            start = Some(Sample::take(now, &progress, pid, server));
            metrics_at_start = bridge.scrape_metrics().await.ok();
        }
        let done = progress.lanes_done.load(Ordering::Relaxed);
        if start.is_some() && (done > 0 || progress.stop.load(Ordering::Relaxed)) {
            break Some(Sample::take(now, &progress, pid, server));
        }
        if done >= u64::from(vehicles) {
            break None;
        }
    };

    let mut reports = Vec::with_capacity(lanes.len());
    for lane in lanes {
        let report = tokio::time::timeout(STOP, lane)
            .await
            .context("a lane did not finish")?
            .context("a lane panicked")?;
        match report {
            Ok(report) => reports.push(report),
            Err(err) => bail!(
                "a lane failed: {err:#}\nbridge log:\n{}",
                bridge.program.log_text()
            ),
        }
    }
    let load = procfs::load_average().unwrap_or(f64::NAN);
    let in_store = match (metrics_at_start, bridge.scrape_metrics().await) {
        (Some(before), Ok(after)) => in_store(&before, &after),
        _ => None,
    };
    let events_per_commit = events_per_commit(&bridge).await;
    let status = bridge.program.terminate(STOP).await?;
    ensure!(status.success(), "the bridge stopped with {status}");
    let (Some(start), Some(end)) = (start, end) else {
        bail!("the run was too short for a measured window (more events per vehicle)");
    };

    let acknowledged: Vec<(u32, u32)> = reports
        .iter()
        .flat_map(|r| r.acks.iter().map(|a| (a.order, a.seq)))
        .collect();
    let completed: Vec<u32> = reports.iter().flat_map(|r| r.completed.clone()).collect();
    // The control run published nothing: the store must hold no event.
    let verified = engine::verify(&target, &acknowledged, &completed).await?;
    ensure!(
        kind != Kind::Control || verified.stored == 0,
        "the control run stored events: {verified:?}"
    );
    let figures = Figures {
        what,
        store: cli.store,
        vehicles,
        in_flight,
        window: window(&reports, start, end),
        load,
        prepare_secs,
        verified,
        events_per_commit,
        in_store,
    };
    eprintln!(
        "run {n}: {:.0} events/s, p99 {:.1} ms, verified {:?}",
        figures.window.rate(),
        figures.window.latency(0.99).as_secs_f64() * 1e3,
        figures.verified
    );
    Ok(figures)
}

/// The window from the lanes' acknowledgements and the samples at its ends.
fn window(reports: &[LaneReport], start: Sample, end: Sample) -> Window {
    let mut latencies: Vec<Duration> = reports
        .iter()
        .flat_map(|r| r.acks.iter())
        .filter(|a| a.at >= start.at && a.at <= end.at)
        .map(|a| a.latency)
        .collect();
    latencies.sort_unstable();
    let machine_busy = match (start.machine, end.machine) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            Some((busy1 - busy0) / (total1 - total0))
        }
        _ => None,
    };
    Window {
        length: end.at - start.at,
        events: end.acknowledged - start.acknowledged,
        latencies,
        bridge_cpu: end.bridge_cpu - start.bridge_cpu,
        bench_cpu: end.bench_cpu - start.bench_cpu,
        server_cpu: end.server_cpu.zip(start.server_cpu).map(|(e, s)| e - s),
        machine_busy,
    }
}

#[cfg(test)]
mod quantiles {
    use super::quantile;

    /// A quantile falls linearly within its bucket; one in `+Inf` is the highest finite bound;
    /// an empty histogram has none.
    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let buckets = [
            (0.001, 10.0),
            (0.002, 30.0),
            (0.005, 40.0),
            (f64::INFINITY, 50.0),
        ];
        let near = |q, want: f64| {
            let got = quantile(&buckets, q).expect("some");
            assert!((got - want).abs() < 1e-12, "q {q}: {got} against {want}");
        };
        near(0.1, 0.0005);
        near(0.5, 0.00175);
        near(0.7, 0.0035);
        near(0.99, 0.005);
        assert_eq!(quantile(&[(0.001, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
    }
}
