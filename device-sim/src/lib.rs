//! Simulated Fleetbeat delivery vehicles: the device logic a tracker would run, and a runner
//! that drives hundreds of them against an MQTT broker.
//!
//! Without the `runner` feature this crate is `no_std` and allocation-free: [`device`] and
//! [`route`] build for `thumbv7em-none-eabihf`, so the state machine tested here is the one an
//! embedded engineer would flash. The `runner` feature (on by default) adds the tokio + rumqttc
//! simulator behind the `device-sim` binary.
//!
//! # Layout
//! - [`route`]: a generated street grid around a city centre, and the [`route::Driver`] that
//!   drives along its streets from intersection to intersection (`no_std`).
//! - [`device`]: the per-vehicle state machine [`device::Device`]: position, battery, heartbeat
//!   schedule, missions, and the answers to dispatcher commands (`no_std`, no heap).
//! - `runner` (feature `runner`): one MQTT connection and one task per vehicle; online status,
//!   last will, heartbeats, command acks, reconnects with backoff, and a clean goodbye.
//! - `cli` (feature `runner`): the `device-sim` command line, turned into a
//!   `runner::SimConfig`.
#![cfg_attr(not(any(test, feature = "runner")), no_std)]

#[cfg(feature = "runner")]
pub mod cli;
pub mod device;
pub mod route;
#[cfg(feature = "runner")]
pub mod runner;
