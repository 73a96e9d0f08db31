//! Fleetbeat's integration-test harness: starts the real programs and drives real clients.
//!
//! # Layout
//! - [`bin`]: builds and locates the workspace binaries (`broker`, `bridge`, `device-sim`).
//! - [`process`]: a child process whose stderr is watched line by line, killed on drop.
//! - [`stack`]: `start_bridge()`, `start_sim()`: the real programs on ephemeral ports.
//! - [`sio`]: a real `socket.io-client` under node, driven over stdin/stdout.
//! - [`mosquitto`]: the real Debian `mosquitto_sub` / `mosquitto_pub`.
//! - [`provision`]: credentials made with the real `broker add-device` / `add-client`.
//!
//! The scenarios live in `tests/tests/*.rs`, one file each. Every wait on the outside world has
//! a timeout.

pub mod bin;
pub mod mosquitto;
pub mod process;
pub mod provision;
pub mod sio;
pub mod stack;

use std::time::Duration;

/// The default bound for waiting on something the outside world must do.
pub const WAIT: Duration = Duration::from_secs(20);

/// Installs a tracing-free panic-safe setup shared by all tests (currently nothing but a
/// place to grow); kept so test files start the same way.
pub fn init() {}
