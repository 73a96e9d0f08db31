//! Device message keys and fleets: what the bridge checks every vehicle's sealed payloads
//! against, and the fleet each vehicle belongs to.
//!
//! They come from the broker's credentials file, read by the broker's own reader
//! ([`broker::Credentials`]): one file format, one parser. The file is reloaded by the same
//! rule as the broker's ([`broker::FileWatch`]): when its modification time or size changed,
//! checked at most once a second as messages come;
//! a file that no longer loads is reported and the previous keys stay. So a device added at
//! run time is known within a second, and a revoked one stops being believed as soon.

use broker::{Credentials, CredentialsError, FileWatch};
use shared::{DeviceKey, FleetId, VehicleId};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tracing::{error, info};

use crate::metrics::{Counter, Metrics};

/// What the bridge knows of one vehicle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Its key, and the fleet it belongs to (`None` in open mode: the topic says it).
    Known(DeviceKey, Option<FleetId>),
    /// It was in the credentials file and is no longer: its key is revoked.
    Revoked,
    /// The bridge has no key for it (yet).
    Unknown,
}

/// Where device keys come from.
#[derive(Debug, Clone, Default)]
pub(crate) enum DeviceKeys {
    /// Open mode (the demo): every vehicle's key is derived from its id, so anyone can forge
    /// any vehicle; the fleet is the topic's. Logged loudly at start.
    #[default]
    Open,
    /// Keys and fleets provisioned per vehicle in the credentials file, reloaded when it
    /// changes; unknown vehicles are refused.
    Provisioned(Arc<KeyFile>),
}

/// One vehicle's entry, as the bridge keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Device {
    key: DeviceKey,
    fleet: FleetId,
}

/// The credentials file's keys and fleets, reloaded when the file changes.
#[derive(Debug)]
pub(crate) struct KeyFile {
    path: PathBuf,
    metrics: Arc<Metrics>,
    loaded: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    devices: HashMap<VehicleId, Device>,
    /// Vehicles that were in an earlier version of the file and are not in this one.
    revoked: HashSet<VehicleId>,
    watch: FileWatch,
}

impl DeviceKeys {
    /// Reads the key and fleet of every `[devices.<vehicle-id>]` entry of the broker's
    /// credentials file (the file is checked as the broker checks it), to be reloaded when it
    /// changes; reloads are counted in `metrics`.
    ///
    /// # Errors
    /// [`CredentialsError`] if the file cannot be read or an entry is invalid.
    pub(crate) fn load(path: &Path, metrics: Arc<Metrics>) -> Result<Self, CredentialsError> {
        let watch = FileWatch::new(path);
        let devices = read_devices(path)?;
        Ok(Self::Provisioned(Arc::new(KeyFile {
            path: path.to_owned(),
            metrics,
            loaded: RwLock::new(Loaded {
                devices,
                revoked: HashSet::new(),
                watch,
            }),
        })))
    }

    /// What the bridge knows of `vehicle` now (the file is reloaded first if it changed).
    pub(crate) fn lookup(&self, vehicle: &VehicleId) -> Lookup {
        match self {
            Self::Open => Lookup::Known(shared::open_mode_key(vehicle), None),
            Self::Provisioned(file) => file.lookup(vehicle),
        }
    }

    /// The key of `vehicle`, or `None` if it is not provisioned (or revoked).
    #[cfg(test)]
    pub(crate) fn key(&self, vehicle: &VehicleId) -> Option<DeviceKey> {
        match self.lookup(vehicle) {
            Lookup::Known(key, _) => Some(key),
            Lookup::Revoked | Lookup::Unknown => None,
        }
    }
}

impl KeyFile {
    fn lookup(&self, vehicle: &VehicleId) -> Lookup {
        self.reload_if_changed();
        let loaded = match self.loaded.read() {
            Ok(loaded) => loaded,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(device) = loaded.devices.get(vehicle) {
            Lookup::Known(device.key, Some(device.fleet.clone()))
        } else if loaded.revoked.contains(vehicle) {
            Lookup::Revoked
        } else {
            Lookup::Unknown
        }
    }

    /// Re-reads the file if its modification time or size changed, at most once a second.
    fn reload_if_changed(&self) {
        {
            let loaded = match self.loaded.read() {
                Ok(loaded) => loaded,
                Err(poisoned) => poisoned.into_inner(),
            };
            if !loaded.watch.due() {
                return;
            }
        }
        let mut loaded = match self.loaded.write() {
            Ok(loaded) => loaded,
            Err(poisoned) => poisoned.into_inner(),
        };
        let path = self.path.clone();
        if !loaded.watch.changed(&path) {
            return;
        }
        match read_devices(&self.path) {
            Ok(devices) => {
                let gone: Vec<VehicleId> = loaded
                    .devices
                    .keys()
                    .filter(|v| !devices.contains_key(*v))
                    .cloned()
                    .collect();
                let mut revoked = std::mem::take(&mut loaded.revoked);
                revoked.retain(|v| !devices.contains_key(v));
                revoked.extend(gone);
                info!(
                    path = %self.path.display(),
                    devices = devices.len(),
                    revoked = revoked.len(),
                    "credentials file changed: device keys reloaded"
                );
                loaded.devices = devices;
                loaded.revoked = revoked;
                self.metrics.count(Counter::KeysReloaded);
            }
            Err(err) => {
                error!(
                    path = %self.path.display(),
                    cause = %err,
                    "credentials file changed but does not load: keeping the previous device keys"
                );
                self.metrics.count(Counter::KeysReloadFailed);
            }
        }
    }
}

fn read_devices(path: &Path) -> Result<HashMap<VehicleId, Device>, CredentialsError> {
    let credentials = Credentials::load(path)?;
    let mut devices = HashMap::new();
    for (vehicle, entry) in credentials.devices() {
        // The broker's reader accepts only valid vehicle ids: this does not fail.
        let id = VehicleId::new(vehicle).map_err(|e| CredentialsError::Entry {
            path: path.to_owned(),
            entry: format!("devices.{vehicle}"),
            reason: format!("not a vehicle id: {e}"),
        })?;
        devices.insert(
            id,
            Device {
                key: entry.key(),
                fleet: entry.fleet().clone(),
            },
        );
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed argon2id PHC string (the broker checks the form, the bridge never the
    /// password).
    const PHC: &str = "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    fn entry(vehicle: &str, fleet: &str, key: &str) -> String {
        format!("[devices.{vehicle}]\nfleet = \"{fleet}\"\npassword = \"{PHC}\"\nkey = \"{key}\"\n")
    }

    fn vehicle(id: &str) -> VehicleId {
        VehicleId::new(id).expect("valid")
    }

    /// Makes the next look-up check the file again, as if a second had passed.
    fn age(keys: &DeviceKeys) {
        let DeviceKeys::Provisioned(file) = keys else {
            panic!("provisioned");
        };
        file.loaded.write().expect("lock").watch.expire();
    }

    #[test]
    fn loads_keys_and_fleets_and_refuses_unknown_vehicles() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("credentials.toml");
        std::fs::write(&path, entry("van-1", "north", &"ab".repeat(32))).expect("write");
        let keys = DeviceKeys::load(&path, Arc::default()).expect("valid file");
        assert_eq!(
            keys.lookup(&vehicle("van-1")),
            Lookup::Known([0xab; 32], Some(FleetId::new("north").expect("valid")))
        );
        assert_eq!(keys.lookup(&vehicle("van-2")), Lookup::Unknown);

        std::fs::write(&path, entry("van-1", "north", "xyz")).expect("write");
        let err = DeviceKeys::load(&path, Arc::default()).expect_err("bad key");
        assert!(err.to_string().contains("devices.van-1"), "{err}");
    }

    #[test]
    fn a_changed_file_is_reloaded_added_and_revoked_keys_take_effect() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("credentials.toml");
        std::fs::write(&path, entry("van-1", "north", &"ab".repeat(32))).expect("write");
        let metrics = Arc::new(Metrics::default());
        let keys = DeviceKeys::load(&path, Arc::clone(&metrics)).expect("valid file");

        // van-2 added, van-1 removed.
        std::fs::write(&path, entry("van-2", "south", &"cd".repeat(32))).expect("write");
        assert_eq!(
            keys.key(&vehicle("van-1")),
            Some([0xab; 32]),
            "checked at most once a second"
        );
        age(&keys);
        assert_eq!(keys.key(&vehicle("van-2")), Some([0xcd; 32]));
        assert_eq!(keys.lookup(&vehicle("van-1")), Lookup::Revoked);
        assert_eq!(metrics.counter(Counter::KeysReloaded), 1);

        // A file that does not load keeps the previous keys, and is counted.
        std::fs::write(&path, "[devices.van-3\n").expect("write");
        age(&keys);
        assert_eq!(keys.key(&vehicle("van-2")), Some([0xcd; 32]));
        assert_eq!(metrics.counter(Counter::KeysReloadFailed), 1);

        // Re-added: known again, no longer revoked.
        std::fs::write(
            &path,
            entry("van-1", "north", &"ef".repeat(32)) + &entry("van-2", "south", &"cd".repeat(32)),
        )
        .expect("write");
        age(&keys);
        assert_eq!(keys.key(&vehicle("van-1")), Some([0xef; 32]));
    }

    #[test]
    fn open_mode_derives_keys() {
        let v = vehicle("v");
        assert_eq!(DeviceKeys::Open.key(&v), Some(shared::open_mode_key(&v)));
    }
}
