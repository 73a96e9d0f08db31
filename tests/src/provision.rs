//! Device and bridge credentials made with the real `broker add-device` / `add-client`, and the
//! matching secrets file for `device-sim --credentials`: for the bridge's embedded broker.
//! (A fleet provisioned the other way round, with `device-sim provision`, is
//! [`crate::stack::provision_fleet`].)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use crate::stack::broker_credentials_command;
use crate::temp_dir;

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
    /// The directory holding both files: removed when the last clone is dropped.
    _dir: Arc<tempfile::TempDir>,
}

/// Provisions `devices` and the bridge (client `fleetbeat-bridge`, role bridge) in a fresh
/// credentials file, and writes the simulator's secrets file beside it.
///
/// # Errors
/// If the `broker` commands fail or print something unexpected.
pub async fn provision(devices: &[&str]) -> anyhow::Result<Provisioned> {
    let dir = temp_dir()?;
    let broker_file = dir.path().join("credentials.toml");
    let file = broker_file.to_str().context("utf-8 path")?.to_owned();
    let mut out = BTreeMap::new();
    let mut sim = String::new();
    for device in devices {
        let (password, key_hex) =
            broker_credentials_command(&["add-device", device, "--credentials", &file]).await?;
        let key_hex = key_hex.with_context(|| format!("add-device {device} printed no key"))?;
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(key_hex.get(2 * i..2 * i + 2).context("short key")?, 16)?;
        }
        sim.push_str(&format!(
            "[devices.{device}]\npassword = \"{password}\"\nkey = \"{key_hex}\"\n\n"
        ));
        out.insert((*device).to_owned(), (password, key));
    }
    let (bridge_password, _) = broker_credentials_command(&[
        "add-client",
        "fleetbeat-bridge",
        "--role",
        "bridge",
        "--credentials",
        &file,
    ])
    .await?;
    let sim_file = dir.path().join("sim-secrets.toml");
    std::fs::write(&sim_file, sim).context("writing the simulator's secrets")?;
    Ok(Provisioned {
        broker_file,
        sim_file,
        bridge_password,
        devices: out,
        _dir: Arc::new(dir),
    })
}
