//! `eventbench`: durable delivery events end to end (issue #17 item 5). A vehicle's QoS 1
//! PUBLISH of a sealed `DeliveryEvent` → the embedded broker → the bridge's seal check → the
//! store's group commit with fsync → the PUBACK back at the vehicle.
//!
//! ```sh
//! cargo run --release -p tests --bin eventbench -- --vehicles 64
//! cargo run --release -p tests --bin eventbench -- --vehicles 16,64,256 --store sqlite
//! cargo run --release -p tests --bin eventbench -- --vehicles 64 --store postgres
//! ```
//!
//! One run, on this machine and on loopback only:
//! 1. prepares a fresh store (a SQLite file in the system's temporary directory, or a
//!    database on a PostgreSQL server of its own, `fsync` on) through the bridge's library
//!    (`Store::open`, `create_order`, `assign`, as `bridge/benches/store.rs` does): one order
//!    per vehicle id, assigned to it (the store lets a vehicle hold one undelivered order);
//! 2. starts the release `bridge` on it with its embedded broker and default durable settings
//!    (`synchronous = full`: SQLite `synchronous = FULL`, PostgreSQL `synchronous_commit = on`);
//! 3. runs V lanes at once. A lane is one vehicle at a time, on its own MQTT 3.1.1 connection
//!    with client id = vehicle id (open mode, no login): it publishes the three events of the
//!    vehicle's order (pickup, in-transit, delivered; `seq` 1, 2, 3), sealed with the vehicle's
//!    open-mode key, at QoS 1, at most `--in-flight` unacknowledged (default 1: the next one
//!    after the PUBACK of the one before, as a device's outbox sends), disconnects, and goes on
//!    as the next vehicle id of its lane (whose connection it opened meanwhile);
//! 4. measures a window (from 10 % of the events acknowledged to the first lane running out of
//!    orders): events acknowledged per second, the PUBACK latency (PUBLISH written → PUBACK
//!    read) p50 / p99 / max, CPU seconds of the bridge and of this program per event, and the
//!    machine's load average;
//! 5. stops the bridge gracefully (SIGTERM) and checks in the store that every acknowledged
//!    event is recorded (unflagged) and every order whose three events were acknowledged is
//!    `delivered`; it fails if not.
//!
//! A baseline of one lane (one event at a time: one transaction and one fsync each) runs in
//! the same invocation, for the grouped / one-by-one ratio. The report (markdown) goes to
//! stdout; `bench/README.md` explains it, BENCHMARKS.md holds the results.
//!
//! # Layout
//! - [`cli`]: the command line.
//! - [`engine`]: the store of a run (SQLite or PostgreSQL): preparing it, and checking it after.
//! - [`lanes`]: the vehicles: hand-written MQTT over tokio sockets.
//! - [`run`]: one measured run: store, bridge, lanes, window, verification.
//! - [`report`]: the markdown table.

mod cli;
mod engine;
mod lanes;
mod report;
mod run;

use anyhow::{Context as _, bail};
use clap::Parser as _;

use crate::cli::Cli;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.validate()?;
    // One thread: the lanes wait on the network almost all the time, and the two cores of a
    // small machine are left to the bridge (this program's CPU is measured and reported).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        tokio::select! {
            result = run::all(&cli) => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })
}
