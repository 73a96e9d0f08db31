//! The command line.

use std::path::PathBuf;

use anyhow::ensure;
use clap::ValueEnum;

/// The bridge's store engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// A SQLite file in the temporary directory (or `FLEETBEAT_BENCH_DIR`).
    Sqlite,
    /// A PostgreSQL server of its own (`pg_ctl` on a free port, `fsync` on).
    Postgres,
}

impl StoreKind {
    /// How the engine reads in the table.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Sqlite => "SQLite, synchronous=FULL",
            Self::Postgres => "PostgreSQL, fsync=on, synchronous_commit=on",
        }
    }
}

/// Durable delivery events end to end: vehicles' QoS 1 events → bridge → group commit with
/// fsync → PUBACK.
#[derive(Debug, clap::Parser)]
#[command(name = "eventbench")]
pub struct Cli {
    /// Vehicles publishing at once (lanes), one run each; a list such as `16,64,256`.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub vehicles: Vec<u32>,
    /// Events per lane (rounded down to whole orders of three events).
    #[arg(long, default_value_t = 1_500)]
    pub events_per_vehicle: u32,
    /// Stop starting new orders after this many seconds (the lanes finish the order at hand).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Unacknowledged events a vehicle may have at once (a vehicle has 3 events).
    #[arg(long, default_value_t = 1)]
    pub in_flight: u16,
    /// The store engine.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,
    /// Events of the one-lane baseline (one event at a time); 0 skips it.
    #[arg(long, default_value_t = 600)]
    pub baseline_events: u32,
    /// Skip the control run (the first `--vehicles` lanes connecting and disconnecting their
    /// vehicles without events: what the connections cost the bridge).
    #[arg(long)]
    pub no_control: bool,
    /// Where the release `bridge` binary is; default: beside this program.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Do not run `cargo build --release -p bridge --bin bridge` first.
    #[arg(long)]
    pub no_build: bool,
}

impl Cli {
    /// Checks the values clap cannot.
    ///
    /// # Errors
    /// A message naming the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            !self.vehicles.is_empty() && self.vehicles.iter().all(|&v| (1..=5_000).contains(&v)),
            "--vehicles: each within 1 ..= 5000"
        );
        ensure!(
            self.events_per_vehicle >= 3,
            "--events-per-vehicle: at least 3 (one order)"
        );
        ensure!(
            (1..=3).contains(&self.in_flight),
            "--in-flight: within 1 ..= 3 (a vehicle has three events)"
        );
        ensure!(
            self.duration.is_none_or(|d| d.is_finite() && d > 0.0),
            "--duration: a positive number of seconds"
        );
        Ok(())
    }

    /// Orders per lane for a run of `events_per_vehicle` events.
    pub const fn orders_per_lane(events_per_vehicle: u32) -> u32 {
        events_per_vehicle / 3
    }
}
