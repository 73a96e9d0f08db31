//! The `tests/node` folder: the node programs the tests drive (`sio-client.mjs`,
//! `page-driver.mjs`, `load-dispatchers.mjs`) and their npm packages.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::bail;

static NODE_READY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The `tests/node` folder, with its npm packages (socket.io-client, playwright-core)
/// installed.
///
/// # Errors
/// If `npm ci` fails.
pub fn node_dir() -> anyhow::Result<PathBuf> {
    NODE_READY
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node");
            npm_ci(&dir, &["socket.io-client", "playwright-core"]).map_err(|e| format!("{e:#}"))?;
            Ok(dir)
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Runs `npm ci` in `dir` (from its committed lock file) unless every one of `packages` is
/// already in its `node_modules`.
///
/// # Errors
/// If `npm ci` cannot be run or fails.
pub fn npm_ci(dir: &Path, packages: &[&str]) -> anyhow::Result<()> {
    if packages
        .iter()
        .all(|p| dir.join("node_modules").join(p).exists())
    {
        return Ok(());
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--silent"])
        .current_dir(dir)
        .status()
        .map_err(|e| anyhow::anyhow!("running npm ci in {}: {e}", dir.display()))?;
    if !status.success() {
        bail!("npm ci in {} failed: {status}", dir.display());
    }
    Ok(())
}
