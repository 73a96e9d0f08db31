//! Simulated Fleetbeat delivery vehicles: the device logic a tracker would run, and a runner
//! that drives hundreds of them against an MQTT broker.
//!
//! Without the `runner` feature this crate is `no_std` and allocation-free: [`device`],
//! [`route`], [`outbox`], [`session`] and [`vehicle`] build for `thumbv7em-none-eabihf`, so
//! the state machines tested here are the ones an embedded engineer would flash (the
//! reference firmware in `firmware/` does). The `runner` feature (on by default) adds the
//! tokio simulator behind the `device-sim` binary, which drives that same [`vehicle`] over
//! tokio sockets.
//!
//! # Layout
//! - [`route`]: a generated street grid around a city centre, and the [`route::Driver`] that
//!   drives along its streets from intersection to intersection (`no_std`).
//! - [`device`]: the per-vehicle state machine [`device::Device`]: position, battery, heartbeat
//!   schedule, the delivery workflow and its events, the answers to dispatcher commands, and
//!   sealing what it publishes (`no_std`, no heap).
//! - [`outbox`]: store-and-forward: the fixed-capacity queues of heartbeats and delivery
//!   events a device keeps while offline, flushed in order, events kept until acknowledged
//!   (`no_std`, no heap).
//! - [`session`]: one vehicle's MQTT 3.1.1 session, the protocol state machine without I/O
//!   ([`session::Session`]: CONNECT with will and login, keep-alive, QoS 1 packet ids and
//!   PUBACKs with caller tags, the command subscription), in fixed buffers (`no_std`, no
//!   heap), with its own packet codec. The simulator and the firmware run this same code.
//! - [`vehicle`]: [`vehicle::Vehicle`], the device on its session without I/O: CONNECT with
//!   the sealed will, `Online` and the command subscription on CONNACK, the outbox flushed
//!   (events at QoS 1 with DUP after a lost connection), PUBACKs to the device, commands
//!   answered (`no_std`, no heap). The simulator's runner and the firmware both drive it; the
//!   runner hooks its chaos and counters in through [`vehicle::FlushHook`] and
//!   [`vehicle::Happened`].
//! - `mqtt` (feature `runner`): the simulator's side of a connection: `mqtt::Link` (TCP, or
//!   TLS over it with rustls, moving a session's bytes with tokio) and `mqtt::SessionClock`.
//! - `runner` (feature `runner`): one MQTT connection and one task per vehicle, each driving
//!   a [`vehicle::Vehicle`]: heartbeat scheduling, reconnects with backoff, chaos switches,
//!   counters and logs, a sped-up clock, and a clean goodbye. Split into
//!   `config` (`runner::SimConfig`, validated), `clock`, `vehicle` (one vehicle's task),
//!   `simulation` (`runner::Simulation`, `runner::run`, progress), `report` (counters) and
//!   `tls` (`runner::TlsConfig`: the CA file and per-vehicle client certificates).
//! - `secrets` (feature `runner`): the secrets file (per-vehicle MQTT password and message
//!   key, `secrets::DeviceSecrets`), read by `--credentials` and written by
//!   `device-sim provision`.
//! - `cli` (feature `runner`): the `device-sim` command line, turned into a
//!   `runner::SimConfig`, and the `provision` subcommand.
//!
//! The `device-sim` binary (`src/bin/device-sim/`) parses the command line, draws the live
//! status line on a terminal (a `runner::ProgressDisplay`) and runs the simulation;
//! `sim-bench` (`src/bin/sim-bench.rs`) measures what a vehicle costs against mosquitto.
#![cfg_attr(not(any(test, feature = "runner")), no_std)]

#[cfg(feature = "runner")]
pub mod cli;
pub mod device;
#[cfg(feature = "runner")]
pub mod mqtt;
pub mod outbox;
pub mod route;
#[cfg(feature = "runner")]
pub mod runner;
#[cfg(feature = "runner")]
pub mod secrets;
pub mod session;
pub mod vehicle;
