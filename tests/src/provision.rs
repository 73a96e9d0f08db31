//! Device and bridge credentials made with the real `broker add-device` / `add-client`, and the
//! matching secrets file for `device-sim --credentials`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context as _, bail};

use crate::bin;
use crate::stack::temp_dir;

/// What [`provision`] made.
#[derive(Debug, Clone)]
pub struct Provisioned {
    /// The broker's credentials file (hashed passwords, device keys): for `broker` and `bridge`.
    pub broker_file: PathBuf,
    /// The simulator's secrets file (plain passwords and keys): for `device-sim --credentials`.
    pub sim_file: PathBuf,
    /// The bridge's MQTT password (client `fleetbeat-bridge`).
    pub bridge_password: String,
    /// Each device's password and 32-byte key.
    pub devices: BTreeMap<String, (String, [u8; 32])>,
}

fn run_broker(args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new(bin::path("broker")?)
        .args(args)
        .output()
        .context("running broker")?;
    if !output.status.success() {
        bail!(
            "broker {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr))
}

fn field(text: &str, key: &str) -> anyhow::Result<String> {
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(key)?
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .with_context(|| format!("no {key} in {text:?}"))
}

/// Provisions `devices` and the bridge (client `fleetbeat-bridge`, role bridge) in a fresh
/// credentials file, and writes the simulator's secrets file beside it.
///
/// # Errors
/// If the `broker` commands fail or print something unexpected.
pub fn provision(devices: &[&str]) -> anyhow::Result<Provisioned> {
    let dir = temp_dir()?;
    let broker_file = dir.join("credentials.toml");
    let file = broker_file.to_str().context("utf-8 path")?.to_owned();
    let mut out = BTreeMap::new();
    let mut sim = String::new();
    for device in devices {
        let text = run_broker(&["add-device", device, "--credentials", &file])?;
        let password = field(&text, "password:")?;
        let key_hex = field(&text, "key:")?;
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(key_hex.get(2 * i..2 * i + 2).context("short key")?, 16)?;
        }
        sim.push_str(&format!(
            "[devices.{device}]\npassword = \"{password}\"\nkey = \"{key_hex}\"\n\n"
        ));
        out.insert((*device).to_owned(), (password, key));
    }
    let text = run_broker(&[
        "add-client",
        "fleetbeat-bridge",
        "--role",
        "bridge",
        "--credentials",
        &file,
    ])?;
    let bridge_password = field(&text, "password:")?;
    let sim_file = dir.join("sim-secrets.toml");
    std::fs::write(&sim_file, sim).context("writing the simulator's secrets")?;
    Ok(Provisioned {
        broker_file,
        sim_file,
        bridge_password,
        devices: out,
    })
}
