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
/// credentials file, and writes the simulator's secrets file beside it. Each device's fleet
/// is taken from its id as the simulator names vehicles, `{fleet}-{number}` (`north-0001` is
/// in fleet `north`); [`provision_in`] names the fleet.
///
/// # Errors
/// If an id is not `{fleet}-{number}`, or the `broker` commands fail or print something
/// unexpected.
pub async fn provision(devices: &[&str]) -> anyhow::Result<Provisioned> {
    let mut with_fleets = Vec::with_capacity(devices.len());
    for device in devices {
        let (fleet, _) = device
            .rsplit_once('-')
            .with_context(|| format!("{device} is not `{{fleet}}-{{number}}`"))?;
        with_fleets.push((fleet, *device));
    }
    provision_devices(&with_fleets).await
}

/// As [`provision`], with every device in `fleet`.
///
/// # Errors
/// If the `broker` commands fail or print something unexpected.
pub async fn provision_in(fleet: &str, devices: &[&str]) -> anyhow::Result<Provisioned> {
    let with_fleets: Vec<(&str, &str)> = devices.iter().map(|d| (fleet, *d)).collect();
    provision_devices(&with_fleets).await
}

/// Provisions each `(fleet, device)` and the bridge (see [`provision`]).
async fn provision_devices(devices: &[(&str, &str)]) -> anyhow::Result<Provisioned> {
    let dir = temp_dir()?;
    let broker_file = dir.path().join("credentials.toml");
    let file = broker_file.to_str().context("utf-8 path")?.to_owned();
    let mut out = BTreeMap::new();
    let mut sim = String::new();
    for &(fleet, device) in devices {
        let args = [
            "add-device",
            device,
            "--fleet",
            fleet,
            "--credentials",
            &file,
        ];
        let (password, key_hex) = broker_credentials_command(&args).await?;
        let key_hex = key_hex.with_context(|| format!("add-device {device} printed no key"))?;
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(key_hex.get(2 * i..2 * i + 2).context("short key")?, 16)?;
        }
        sim.push_str(&format!(
            "[devices.{device}]\npassword = \"{password}\"\nkey = \"{key_hex}\"\n\n"
        ));
        out.insert(device.to_owned(), (password, key));
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
