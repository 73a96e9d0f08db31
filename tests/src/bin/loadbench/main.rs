//! `loadbench`: Fleetbeat end to end under load, side by side with the stack people use today
//! (written plainly, and written carefully).
//!
//! ```sh
//! cargo run --release -p tests --bin loadbench -- --vehicles 1000 --rate 1 --dispatchers 10 --duration 30
//! cargo run --release -p tests --bin loadbench -- --curve          # p99 and CPU against vehicles
//! cargo run --release -p tests --bin loadbench -- --stack fleetbeat --bridges 2  # a cluster
//! ```
//!
//! One run starts, on this machine and on loopback only:
//! - the stack under test: **Fleetbeat** (the release `bridge` with its embedded broker, or
//!   `broker` + `bridge --mqtt-url` with `--broker separate`), or the **baseline** (Debian's
//!   `mosquitto` + `bench/baseline/bridge.js`, npm `mqtt` + `socket.io`, one emit per message),
//!   or the **careful** baseline (the same with `bench/baseline/careful.js`: the latest position
//!   per vehicle, one volatile batch per room per tick, as Fleetbeat sends);
//!   with `--bridges N` (N ≥ 2) or `--cluster-engines`, Fleetbeat runs as a cluster (issue #15):
//!   Debian's `mosquitto`, a `redis-server`, a PostgreSQL database and N bridges in the
//!   shared-subscription group `loadbench`, the dispatchers spread round-robin over them, and
//!   the report adds Redis commands and PostgreSQL writes per second;
//! - the **devices**: this program again as a child (`loadbench generate`), V vehicles at R Hz,
//!   each vehicle a real MQTT 3.1.1 client connection subscribed to its own `cmd` topic and
//!   publishing QoS 0 heartbeats: sealed postcard `Heartbeat`s (`shared::seal`, open-mode keys)
//!   to Fleetbeat, the same heartbeat as a JSON object to the baseline (or, for Fleetbeat,
//!   the real `device-sim` with `--devices device-sim`);
//! - K **dispatchers**: real `socket.io-client` connections, several per node process
//!   (`tests/node/load-dispatchers.mjs`), each joined to the room `all`.
//!
//! It warms up, measures a window, stops the devices, lets the last positions drain, and
//! reports: heartbeats/s sent and ingested (the bridge's `/metrics`), positions/s delivered to
//! the dispatchers, device→dispatcher latency p50/p99/max (`ts_ms` from the device clock against
//! the receive time, same machine), CPU seconds over the window and peak RSS (`VmHWM`) of every
//! process, and loss. Loss is what coalescing does not explain: a dispatcher that skips more
//! consecutive heartbeats of a vehicle than `(tick + slack) / interval`, or never receives a
//! vehicle's last heartbeat, lost them. `bench/README.md` explains every figure.
//!
//! The programs are started through the `tests` library (`tests::stack`, `tests::peer`), the
//! same harness as the integration tests.
//!
//! # Layout
//! - [`cli`]: the command line; `generate` is the device side, run as a child.
//! - [`modes`]: side by side, the scaling curve, sustained throughput, the whole report.
//! - [`stages`]: what each stage of Fleetbeat costs per heartbeat, by ablation runs.
//! - [`stack`]: starting Fleetbeat (one bridge or a cluster) or a baseline.
//! - [`engines`]: Redis and PostgreSQL of a cluster run, and their counters.
//! - [`devices`]: the device side of a run: the generator, or `device-sim`.
//! - [`generator`]: the generator itself: hand-written MQTT over non-blocking sockets.
//! - [`dispatchers`]: the node processes holding the dispatcher clients.
//! - [`measure`]: one measured run: warm-up, settling, the window, the drain.
//! - [`measured`]: what a run measured, and the figures derived from it.
//! - `tests::procfs` (the library): CPU seconds and RSS from `/proc`.
//! - [`report`]: the markdown tables.

mod cli;
mod devices;
mod dispatchers;
mod engines;
mod generator;
mod measure;
mod measured;
mod modes;
mod report;
mod stack;
mod stages;

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser as _;

use crate::cli::{Cli, Command};

/// The bound on waiting for a child to answer.
const ANSWER: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Generate(args)) = cli.command {
        return generator::main(&args);
    }
    let args = cli.run;
    args.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        tokio::select! {
            result = modes::run(args) => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })
}
