//! The command line: what a run does, and the hidden `generate` subcommand.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, Subcommand, ValueEnum};

use crate::generator::GenArgs;

/// End-to-end load harness: Fleetbeat against two baselines (mosquitto + node mqtt/socket.io:
/// one emit per message, and the careful one that batches per tick).
#[derive(Debug, Parser)]
#[command(name = "loadbench")]
pub struct Cli {
    // (No doc comments on these two fields, nor on `Command`: clap would read them as help.)
    // `generate`, or none: a run.
    #[command(subcommand)]
    pub command: Option<Command>,
    // What the run does.
    #[command(flatten)]
    pub run: RunArgs,
}

// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Internal: the device side, driven over stdin/stdout by the harness.
    #[command(hide = true)]
    Generate(GenArgs),
}

/// Which stack a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StackKind {
    /// Fleetbeat: the `bridge` binary (and its embedded broker, or the `broker` binary).
    Fleetbeat,
    /// The reference stack: mosquitto + `bench/baseline/bridge.js` (one emit per message).
    Baseline,
    /// The careful reference stack: mosquitto + `bench/baseline/careful.js` (the latest
    /// position per vehicle, one volatile batch per room per tick).
    Careful,
    /// Fleetbeat and the baseline, one after the other on the same load, with ratios.
    Both,
    /// Fleetbeat and both baselines, one after the other on the same load, with ratios.
    All,
}

impl StackKind {
    /// Whether this is one of the node baselines (mosquitto + a node bridge).
    pub fn is_baseline(self) -> bool {
        matches!(self, Self::Baseline | Self::Careful)
    }
}

/// Where Fleetbeat's broker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerMode {
    /// Inside the bridge process (the default deployment).
    Embedded,
    /// The standalone `broker` binary, the bridge connecting with `--mqtt-url`.
    Separate,
}

/// What publishes the heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    /// `loadbench generate`: exact per-vehicle accounting, sealed or JSON payloads.
    Generator,
    /// The real simulator, `device-sim` (sealed payloads only).
    DeviceSim,
}

/// What one run (or each point of the curve) does.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Simulated vehicles.
    #[arg(long, default_value_t = 1000)]
    pub vehicles: u32,
    /// Heartbeats per second per vehicle.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Dispatcher clients (real socket.io-client connections), each joined to `all`; 0: none
    /// (the stack emits to nobody).
    #[arg(long, default_value_t = 10)]
    pub dispatchers: u32,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Seconds between the first heartbeat and the measured window, at least.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// After the warm-up, wait (up to this many seconds) until the stack has settled: its
    /// ingest rate has stayed within 5 % of the offered rate (neither falling behind nor still
    /// catching up) for 3 s in a row. The time it took is
    /// reported ("settled after"). 0: measure right after the warm-up.
    #[arg(long, default_value_t = 120)]
    pub settle_max: u64,
    /// The stack to measure.
    #[arg(long, value_enum, default_value_t = StackKind::Both)]
    pub stack: StackKind,
    /// Fleetbeat's broker: inside the bridge, or the separate `broker` binary.
    #[arg(long, value_enum, default_value_t = BrokerMode::Embedded)]
    pub broker: BrokerMode,
    /// Fleetbeat bridges sharing the load (issue #15). 1: one bridge, as set up by `--broker`.
    /// 2 or more: Debian's mosquitto, a redis-server, a PostgreSQL database and N bridges
    /// (`--shared-group loadbench --redis-url … --store postgres://… --client-id bridge-i`);
    /// dispatchers are spread round-robin over the bridges, ingest is summed over them.
    #[arg(long, default_value_t = 1)]
    pub bridges: u32,
    /// Run Fleetbeat on the cluster's engines (mosquitto, Redis, PostgreSQL) even with
    /// `--bridges 1`, so that one and several bridges compare on the same setup.
    #[arg(long)]
    pub cluster_engines: bool,
    /// Fleetbeat's position tick in ms (`bridge --tick-ms`), also the careful baseline's
    /// (`TICK_MS`); unset: the bridge's default (10).
    #[arg(long)]
    pub tick_ms: Option<u64>,
    /// Latency beyond the tick that still counts as on time, for loss and `late`, in ms.
    #[arg(long, default_value_t = 100)]
    pub slack_ms: u64,
    /// The device side: this program's generator (both stacks), or the real `device-sim`
    /// (Fleetbeat only; at most 10 000 vehicles; loss then counts gaps only, not the tail).
    #[arg(long, value_enum, default_value_t = DeviceKind::Generator)]
    pub devices: DeviceKind,
    /// Devices do not subscribe to their `cmd` topics (real vehicles do: one subscription
    /// per vehicle, which is what makes a broker's topic matching work).
    #[arg(long)]
    pub no_subscribe: bool,
    /// Dispatcher clients per node process.
    #[arg(long, default_value_t = 5)]
    pub clients_per_process: u32,
    /// Vehicles sharing one MQTT connection; unset: 1, or as many as keep connections at or
    /// under 15 000 (a process may hold 20 000 file descriptors here).
    #[arg(long)]
    pub per_connection: Option<u32>,
    /// The scaling curve: run Fleetbeat (with `--stack baseline` or `careful`: that baseline)
    /// at each of `--curve-points` vehicles for `--curve-duration` seconds and print p99 and
    /// CPU against vehicles.
    #[arg(long)]
    pub curve: bool,
    /// Vehicle counts of the curve.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,1000,5000,10000,20000"
    )]
    pub curve_points: Vec<u32>,
    /// Seconds measured per curve point.
    #[arg(long, default_value_t = 15)]
    pub curve_duration: u64,
    /// Sustained throughput: at `--vehicles`, raise the rate through `--saturate-rates` for each
    /// stack (`--curve-duration` seconds each) until a step is not sustained.
    #[arg(long, conflicts_with = "curve")]
    pub saturate: bool,
    /// The whole report of BENCHMARKS.md's end-to-end section in one go: side by side at
    /// `--report-fleets` vehicles (Fleetbeat and both baselines, `--repeat` times each), the
    /// scaling curve of Fleetbeat, and the sustained throughput of the three stacks at 10 000
    /// vehicles. About 30 minutes.
    #[arg(long, conflicts_with_all = ["curve", "saturate"])]
    pub report: bool,
    /// Fleet sizes of the side-by-side tables of `--report`.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub report_fleets: Vec<u32>,
    /// What each stage of Fleetbeat costs per heartbeat, by ablation (issue #17): Fleetbeat at
    /// `--vehicles` × `--rate` as deployed, then once per part switched off (the embedded
    /// broker's JSON mirror, the dispatchers, the store's disk, the devices' subscriptions) and
    /// with the broker as its own process; broker and bridge CPU µs per heartbeat of each run
    /// and the differences. `--repeat` runs each variant that many times (the least disturbed
    /// counts).
    #[arg(long, conflicts_with_all = ["curve", "saturate", "report"])]
    pub stages: bool,
    /// One more argument for every Fleetbeat `bridge` (repeatable, in order), e.g.
    /// `--bridge-arg=--config --bridge-arg=FILE`; a `--store` here replaces loadbench's fresh
    /// SQLite file. For ablation runs and experiments.
    #[arg(long = "bridge-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub bridge_args: Vec<String>,
    /// Heartbeat rates (Hz per vehicle) of `--saturate`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,1.25,1.5,1.75,2,3,4,5,5.5,6,7,8"
    )]
    pub saturate_rates: Vec<f64>,
    /// Side by side: run each stack this many times, alternating, and report for each the run
    /// the rest of the machine disturbed least (all runs are listed too).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Where the release binaries are (`bridge`, `broker`, `device-sim`); default: beside this
    /// program.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Do not run `cargo build --release` for the binaries first.
    #[arg(long)]
    pub no_build: bool,
    /// The mosquitto binary for the baseline.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto: PathBuf,
    /// Also append the markdown report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl RunArgs {
    /// The bridge's position tick.
    pub fn tick_ms(&self) -> u64 {
        self.tick_ms.unwrap_or(10)
    }

    /// Whether Fleetbeat runs as a cluster: mosquitto, Redis, PostgreSQL and
    /// [`Self::bridges`] bridges.
    pub fn cluster(&self) -> bool {
        self.bridges >= 2 || self.cluster_engines
    }

    /// Vehicles per MQTT connection for `vehicles` vehicles.
    pub fn per_connection(&self, vehicles: u32) -> u32 {
        self.per_connection
            .unwrap_or_else(|| vehicles.div_ceil(15_000))
            .max(1)
    }

    /// Checks what the flags cannot say alone.
    ///
    /// # Errors
    /// If a count is 0 (but the dispatchers), the rate is out of range, `device-sim` is asked to feed the
    /// baseline, or a cluster is asked for with the separate broker.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.vehicles == 0 || self.clients_per_process == 0 {
            bail!("--vehicles and --clients-per-process must be at least 1");
        }
        if self.rate.is_nan() || self.rate <= 0.0 || self.rate > 100.0 {
            bail!("--rate must be within (0, 100] Hz");
        }
        if self.bridges == 0 {
            bail!("--bridges must be at least 1");
        }
        if self.cluster() && self.broker == BrokerMode::Separate {
            bail!("--bridges 2+ and --cluster-engines use mosquitto: leave out --broker separate");
        }
        if self.devices == DeviceKind::DeviceSim && self.stack != StackKind::Fleetbeat {
            bail!(
                "--devices device-sim publishes sealed heartbeats only: use it with --stack fleetbeat"
            );
        }
        Ok(())
    }

    /// The stacks [`Self::stack`] stands for, in the order they run.
    pub fn stacks(&self) -> &'static [StackKind] {
        match self.stack {
            StackKind::Both => &[StackKind::Fleetbeat, StackKind::Baseline],
            StackKind::All => &[
                StackKind::Fleetbeat,
                StackKind::Baseline,
                StackKind::Careful,
            ],
            StackKind::Fleetbeat => &[StackKind::Fleetbeat],
            StackKind::Baseline => &[StackKind::Baseline],
            StackKind::Careful => &[StackKind::Careful],
        }
    }
}
