//! Builds the workspace binaries once per test process and returns their paths.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, bail};

static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The directory holding the built binaries (`target/debug` or `target/release`).
///
/// The first call runs `cargo build --bins` for the programs under test, with the same
/// profile as the running test, so the tests always run the current code.
///
/// # Errors
/// If cargo cannot build them.
pub fn dir() -> anyhow::Result<PathBuf> {
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The path of binary `name`.
///
/// # Errors
/// If the binaries cannot be built or `name` is not among them.
pub fn path(name: &str) -> anyhow::Result<PathBuf> {
    let path = dir()?.join(name);
    if !path.exists() {
        bail!("{} was not built", path.display());
    }
    Ok(path)
}

fn build() -> anyhow::Result<PathBuf> {
    // The test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().context("locating the test binary")?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary is not in target/<profile>/deps")?
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "bridge",
        "-p",
        "device-sim",
        "-p",
        "broker",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the binaries failed: {status}");
    }
    Ok(profile_dir)
}
