//! Device message keys: what the bridge checks every vehicle's sealed payloads against.
//!
//! They come from the broker's credentials file, read by the broker's own reader
//! ([`broker::Credentials`]): one file format, one parser.

use std::collections::HashMap;
use std::path::Path;

use broker::{Credentials, CredentialsError};
use shared::{DeviceKey, VehicleId};

/// Where device keys come from.
#[derive(Debug, Clone, Default)]
pub(crate) enum DeviceKeys {
    /// Open mode (the demo): every vehicle's key is derived from its id, so anyone can forge
    /// any vehicle. Logged loudly at start.
    #[default]
    Open,
    /// Keys provisioned per vehicle in the credentials file; unknown vehicles are refused.
    Provisioned(HashMap<VehicleId, DeviceKey>),
}

impl DeviceKeys {
    /// Reads the key of every `[devices.<vehicle-id>]` entry of the broker's credentials file
    /// (the file is checked as the broker checks it).
    ///
    /// # Errors
    /// [`CredentialsError`] if the file cannot be read or an entry is invalid.
    pub(crate) fn load(path: &Path) -> Result<Self, CredentialsError> {
        let credentials = Credentials::load(path)?;
        let mut keys = HashMap::new();
        for (vehicle, entry) in credentials.devices() {
            // The broker's reader accepts only valid vehicle ids: this does not fail.
            let id = VehicleId::new(vehicle).map_err(|e| CredentialsError::Entry {
                path: path.to_owned(),
                entry: format!("devices.{vehicle}"),
                reason: format!("not a vehicle id: {e}"),
            })?;
            keys.insert(id, entry.key());
        }
        Ok(Self::Provisioned(keys))
    }

    /// The key of `vehicle`, or `None` if it is not provisioned.
    pub(crate) fn key(&self, vehicle: &VehicleId) -> Option<DeviceKey> {
        match self {
            Self::Open => Some(shared::open_mode_key(vehicle)),
            Self::Provisioned(keys) => keys.get(vehicle).copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed argon2id PHC string (the broker checks the form, the bridge never the
    /// password).
    const PHC: &str = "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    #[test]
    fn loads_keys_and_refuses_unknown_vehicles() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("credentials.toml");
        let key = "ab".repeat(32);
        std::fs::write(
            &path,
            format!("[devices.van-1]\npassword = \"{PHC}\"\nkey = \"{key}\"\n"),
        )
        .expect("write");
        let keys = DeviceKeys::load(&path).expect("valid file");
        assert_eq!(
            keys.key(&VehicleId::new("van-1").expect("valid")),
            Some([0xab; 32])
        );
        assert_eq!(keys.key(&VehicleId::new("van-2").expect("valid")), None);

        std::fs::write(
            &path,
            format!("[devices.van-1]\npassword = \"{PHC}\"\nkey = \"xyz\"\n"),
        )
        .expect("write");
        let err = DeviceKeys::load(&path).expect_err("bad key");
        assert!(err.to_string().contains("devices.van-1"), "{err}");
    }

    #[test]
    fn open_mode_derives_keys() {
        let v = VehicleId::new("v").expect("valid");
        assert_eq!(DeviceKeys::Open.key(&v), Some(shared::open_mode_key(&v)));
    }
}
