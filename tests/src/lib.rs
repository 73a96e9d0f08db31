//! Fleetbeat's integration-test harness: starts the real programs and drives real clients.
//! The `loadbench` and `eventbench` binaries (`src/bin/`) run the same programs through it.
//!
//! # Layout
//! - [`bin`]: builds and locates the workspace binaries (`broker`, `bridge`, `device-sim`).
//! - [`process`]: a child process whose output is watched line by line, killed on drop.
//! - [`peer`]: a child process that speaks JSON lines on stdin/stdout (the node clients, the
//!   load generator).
//! - [`stack`]: `start_bridge()`, `start_broker_standalone()`, `start_sim()`, ...: the real
//!   programs on ephemeral ports, and their `/metrics`.
//! - [`provision`]: credentials made with the real `broker add-device` / `add-client` and
//!   `device-sim provision`.
//! - [`node`]: the `tests/node` folder and its npm packages.
//! - [`sio`]: a real `socket.io-client` under node, driven over stdin/stdout.
//! - [`page`]: the dispatcher page in a headless Chromium, driven over stdin/stdout.
//! - [`mosquitto`]: the real Debian `mosquitto_sub` / `mosquitto_pub`.
//! - [`crash`]: the crash tests' raw event pipeline, store reader and kill count.
//! - [`tls`]: a test CA and the certificates the TLS tests make with `rcgen`.
//! - [`procfs`]: CPU seconds, RSS and load average from `/proc`, for the benchmarks.
//!
//! The scenarios live in `tests/tests/*.rs`, one file each. Every wait on the outside world has
//! a timeout.

pub mod bin;
pub mod cluster;
pub mod crash;
pub mod mosquitto;
pub mod node;
pub mod page;
pub mod peer;
pub mod process;
pub use testengines::procfs;
pub mod provision;
pub mod sio;
pub mod stack;
pub mod tls;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

/// The default bound for waiting on something the outside world must do.
pub const WAIT: Duration = Duration::from_secs(20);

/// The workspace root (the parent of this crate's folder).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A fresh directory under the system's temporary directory, for one test's files; it is
/// removed with everything in it when the returned guard is dropped.
///
/// # Errors
/// If it cannot be created.
pub fn temp_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("fleetbeat-test-")
        .tempdir()
        .context("creating a temporary directory")
}
