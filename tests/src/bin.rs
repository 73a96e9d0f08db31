//! Builds the workspace binaries and returns their paths.
//!
//! Tests build them once per test process, with the test's own profile, so they always run the
//! current code; `loadbench` builds the release binaries itself (or not, with `--no-build`) and
//! points here with [`use_dir`].

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, bail};

static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The directory holding the built binaries (`target/debug` or `target/release`).
///
/// Unless [`use_dir`] chose one, the first call runs [`build`] with the same profile as the
/// running test binary.
///
/// # Errors
/// If cargo cannot build them.
pub fn dir() -> anyhow::Result<PathBuf> {
    DIR.get_or_init(|| test_profile_dir().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Takes the binaries from `dir` from now on, without building them.
///
/// # Errors
/// If [`dir`] was already decided.
pub fn use_dir(dir: PathBuf) -> anyhow::Result<()> {
    DIR.set(Ok(dir))
        .map_err(|_| anyhow::anyhow!("the binaries' directory was already chosen"))
}

/// The path of binary `name`.
///
/// # Errors
/// If the binaries cannot be built or `name` is not among them.
pub fn path(name: &str) -> anyhow::Result<PathBuf> {
    let path = dir()?.join(name);
    if !path.exists() {
        bail!(
            "{} was not built (cargo build -p {name} --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `cargo build --bins` for `bridge`, `device-sim` and `broker` in the workspace: in the
/// release profile if `release`, else in the debug profile with the broker's
/// `fault-injection` feature (as `cargo test --workspace` builds them).
///
/// # Errors
/// If cargo fails.
pub fn build(release: bool) -> anyhow::Result<()> {
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
    } else {
        // As `cargo test --workspace` builds them (this crate enables the feature), so the
        // binaries are not rebuilt here, and the tests can inject a broker thread's death.
        cmd.args(["--features", "broker/fault-injection"]);
    }
    let status = cmd
        .current_dir(crate::workspace())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the binaries failed: {status}");
    }
    Ok(())
}

/// Builds the binaries in the running test's profile and returns their directory.
fn test_profile_dir() -> anyhow::Result<PathBuf> {
    // The test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().context("locating the test binary")?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary is not in target/<profile>/deps")?
        .to_path_buf();
    build(profile_dir.file_name().is_some_and(|n| n == "release"))?;
    Ok(profile_dir)
}
