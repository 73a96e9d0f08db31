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

/// Builds the binaries of `bridge`, `device-sim` and `broker`: in the release profile if
/// `release` (`cargo build --release -p … --bins`); else in the debug profile as
/// `cargo test --workspace` builds their libraries (`cargo build --workspace --tests --bins`:
/// the same features everywhere, the broker's `fault-injection` included, so under
/// `cargo test --workspace` only the two binaries are linked and nothing is compiled twice).
///
/// # Errors
/// If cargo fails.
pub fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--quiet"]);
    if release {
        cmd.args([
            "--release",
            "-p",
            "bridge",
            "-p",
            "device-sim",
            "-p",
            "broker",
            "--bins",
        ]);
    } else {
        // The features `cargo test --workspace` resolves (dev-dependencies of every member
        // and `tests`' `broker/fault-injection`): its libraries are reused, not rebuilt with
        // another feature set, and the tests can inject a broker thread's death.
        cmd.args(["--workspace", "--tests", "--bins"]);
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the binaries failed: {status}");
    }
    Ok(())
}

/// `cargo` (the one running the tests, if any) in the workspace, without the variables cargo
/// sets for the running crate (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …).
///
/// Build scripts watch some of them (`ring`'s: `CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, …):
/// a cargo started with the test's values would see them changed since the build that made
/// the test, and build `ring` and everything above it again (80 s of a CI run).
#[must_use]
pub fn cargo() -> Command {
    let program = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let set_for_the_crate = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
            || matches!(
                name,
                "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            );
        if set_for_the_crate {
            cmd.env_remove(name);
        }
    }
    cmd.current_dir(crate::workspace());
    cmd
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
