//! Device message keys: what the bridge checks every vehicle's sealed payloads against.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use shared::{DeviceKey, VehicleId};
use thiserror::Error;

/// Where device keys come from.
#[derive(Debug, Clone, Default)]
pub enum DeviceKeys {
    /// Open mode (the demo): every vehicle's key is derived from its id, so anyone can forge
    /// any vehicle. Logged loudly at start.
    #[default]
    Open,
    /// Keys provisioned per vehicle in the credentials file; unknown vehicles are refused.
    Provisioned(HashMap<VehicleId, DeviceKey>),
}

/// Why the credentials file cannot be used.
#[derive(Debug, Error)]
pub enum KeysError {
    /// The file cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The parse error.
        source: toml::de::Error,
    },
    /// An entry is invalid.
    #[error("{path}: devices.{vehicle}: {reason}")]
    Entry {
        /// The file.
        path: String,
        /// The entry's vehicle id.
        vehicle: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
struct CredentialsFile {
    #[serde(default)]
    devices: HashMap<String, DeviceEntry>,
}

#[derive(Deserialize)]
struct DeviceEntry {
    key: String,
}

impl DeviceKeys {
    /// Reads the `key` of every `[devices.<vehicle-id>]` entry of the broker's credentials file
    /// (other fields, such as password hashes, are the broker's business).
    ///
    /// # Errors
    /// [`KeysError`] if the file cannot be read or an entry is invalid.
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: shown.clone(),
            source,
        })?;
        let file: CredentialsFile = toml::from_str(&text).map_err(|source| KeysError::Parse {
            path: shown.clone(),
            source,
        })?;
        let mut keys = HashMap::with_capacity(file.devices.len());
        for (vehicle, entry) in file.devices {
            let bad = |reason: String| KeysError::Entry {
                path: shown.clone(),
                vehicle: vehicle.clone(),
                reason,
            };
            let id = VehicleId::new(&vehicle).map_err(|e| bad(e.to_string()))?;
            let mut key = [0u8; 32];
            hex::decode_to_slice(entry.key.trim(), &mut key)
                .map_err(|e| bad(format!("key must be 64 hex digits: {e}")))?;
            keys.insert(id, key);
        }
        Ok(Self::Provisioned(keys))
    }

    /// The key of `vehicle`, or `None` if it is not provisioned.
    pub fn key(&self, vehicle: &VehicleId) -> Option<DeviceKey> {
        match self {
            Self::Open => Some(shared::open_mode_key(vehicle)),
            Self::Provisioned(keys) => keys.get(vehicle).copied(),
        }
    }

    /// Whether this is open mode.
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_keys_and_refuses_unknown_vehicles() {
        let dir = std::env::temp_dir().join(format!("fleetbeat-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("credentials.toml");
        let key = "ab".repeat(32);
        std::fs::write(
            &path,
            format!("[devices.van-1]\npassword = \"$argon2id$...\"\nkey = \"{key}\"\n"),
        )
        .expect("write");
        let keys = DeviceKeys::load(&path).expect("valid file");
        assert_eq!(
            keys.key(&VehicleId::new("van-1").expect("valid")),
            Some([0xab; 32])
        );
        assert_eq!(keys.key(&VehicleId::new("van-2").expect("valid")), None);

        std::fs::write(&path, "[devices.van-1]\nkey = \"xyz\"\n").expect("write");
        let err = DeviceKeys::load(&path).expect_err("bad key");
        assert!(err.to_string().contains("devices.van-1"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn open_mode_derives_keys() {
        let v = VehicleId::new("v").expect("valid");
        assert_eq!(DeviceKeys::Open.key(&v), Some(shared::open_mode_key(&v)));
    }
}
