//! The simulator's secrets file: each vehicle's MQTT password and message key.
//!
//! ```toml
//! # device-sim secrets: keep this file private (mode 0600).
//! [devices.north-0001]
//! password = "Vq3...24 characters"
//! key = "64 hex digits: the 32-byte key the vehicle seals its payloads with"
//! ```
//!
//! `device-sim provision` writes it ([`DeviceSecrets::provision`]); `device-sim --credentials`
//! reads it ([`DeviceSecrets::load`]). The broker holds the other half: a hash of each password
//! (for the login) and the same key (to open the payloads); see `docs/device-sim.md`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shared::{DeviceKey, VehicleId};

/// Characters of a generated password: letters and digits, nothing a shell or TOML minds.
const PASSWORD_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Length of a generated password: 24 characters of 62, about 143 bits.
const PASSWORD_LEN: usize = 24;

/// One vehicle's secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceSecret {
    /// The MQTT password (the username is the vehicle id).
    pub password: String,
    /// The key every payload is sealed with.
    pub key: DeviceKey,
}

impl std::fmt::Debug for DeviceSecret {
    /// Never prints the secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceSecret(..)")
    }
}

/// Every vehicle's secrets, by vehicle id: the devices' half of the secrets file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSecrets {
    devices: BTreeMap<VehicleId, DeviceSecret>,
}

/// Why a secrets file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The file cannot be read or written.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{path} is not a secrets file")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: toml::de::Error,
    },
    /// A `[devices.<id>]` table names an invalid vehicle id.
    #[error("invalid vehicle id {0:?} in the secrets file")]
    VehicleId(String),
    /// A key is not 64 hex digits.
    #[error("the key of {0} is not 64 hex digits")]
    Key(VehicleId),
    /// A password is empty.
    #[error("the password of {0} is empty")]
    Password(VehicleId),
    /// The operating system has no randomness to offer.
    #[error("cannot draw random bytes: {0}")]
    Random(getrandom::Error),
}

/// The file's shape.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretsToml {
    #[serde(default)]
    devices: BTreeMap<String, SecretEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretEntry {
    password: String,
    key: String,
}

impl DeviceSecrets {
    /// Reads a secrets file.
    ///
    /// # Errors
    /// [`SecretsError`] if it cannot be read or holds an invalid entry.
    pub fn load(path: &Path) -> Result<Self, SecretsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|err| match err {
            SecretsError::Toml { source, .. } => SecretsError::Toml {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses the text of a secrets file.
    ///
    /// # Errors
    /// [`SecretsError`] for invalid TOML or an invalid entry.
    pub fn parse(text: &str) -> Result<Self, SecretsError> {
        let file: SecretsToml = toml::from_str(text).map_err(|source| SecretsError::Toml {
            path: PathBuf::new(),
            source,
        })?;
        let mut devices = BTreeMap::new();
        for (id, entry) in file.devices {
            let vehicle = VehicleId::new(&id).map_err(|_| SecretsError::VehicleId(id))?;
            let mut key = [0u8; 32];
            hex::decode_to_slice(entry.key.trim(), &mut key)
                .map_err(|_| SecretsError::Key(vehicle.clone()))?;
            if entry.password.is_empty() {
                return Err(SecretsError::Password(vehicle));
            }
            devices.insert(
                vehicle,
                DeviceSecret {
                    password: entry.password,
                    key,
                },
            );
        }
        Ok(Self { devices })
    }

    /// The secrets of `vehicle`, if the file has them.
    pub fn get(&self, vehicle: &VehicleId) -> Option<&DeviceSecret> {
        self.devices.get(vehicle)
    }

    /// How many vehicles have secrets.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether no vehicle has secrets.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The vehicles that have secrets, in id order.
    pub fn vehicles(&self) -> impl Iterator<Item = &VehicleId> {
        self.devices.keys()
    }

    /// Adds fresh random secrets (from the operating system's CSPRNG) for each of `vehicles`
    /// that has none yet; existing ones are kept, so provisioning more vehicles never rotates
    /// the secrets of those already deployed. Returns how many were added.
    ///
    /// # Errors
    /// [`SecretsError::Random`] if the OS has no randomness.
    pub fn provision<'a>(
        &mut self,
        vehicles: impl IntoIterator<Item = &'a VehicleId>,
    ) -> Result<usize, SecretsError> {
        let mut added = 0;
        for vehicle in vehicles {
            if self.devices.contains_key(vehicle) {
                continue;
            }
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(SecretsError::Random)?;
            self.devices.insert(
                vehicle.clone(),
                DeviceSecret {
                    password: random_password()?,
                    key,
                },
            );
            added += 1;
        }
        Ok(added)
    }

    /// The secrets file's text.
    fn to_toml(&self) -> String {
        let mut out = String::from(
            "# device-sim secrets: each vehicle's MQTT password and 32-byte message key (hex).\n\
             # Keep this file private. The broker gets the matching entries from\n\
             # `broker add-device` (see docs/device-sim.md).\n",
        );
        for (vehicle, secret) in &self.devices {
            // Vehicle ids are [A-Za-z0-9_.-]: quoted, they are always valid TOML keys.
            out.push_str(&format!(
                "\n[devices.\"{vehicle}\"]\npassword = \"{}\"\nkey = \"{}\"\n",
                secret.password,
                hex::encode(secret.key)
            ));
        }
        out
    }

    /// Writes the secrets file, readable by its owner only (on Unix).
    ///
    /// # Errors
    /// [`SecretsError::Io`] if it cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), SecretsError> {
        let io = |source| SecretsError::Io {
            path: path.to_owned(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(io)?;
        file.write_all(self.to_toml().as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }
}

fn random_password() -> Result<String, SecretsError> {
    let mut out = String::with_capacity(PASSWORD_LEN);
    let mut bytes = [0u8; 64];
    while out.len() < PASSWORD_LEN {
        getrandom::fill(&mut bytes).map_err(SecretsError::Random)?;
        // Rejection sampling: 248 = 4 × 62, so every character is equally likely.
        for &b in bytes.iter().filter(|&&b| b < 248) {
            if out.len() == PASSWORD_LEN {
                break;
            }
            out.push(char::from(
                PASSWORD_ALPHABET[usize::from(b) % PASSWORD_ALPHABET.len()],
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> VehicleId {
        VehicleId::new(s).expect("valid")
    }

    #[test]
    fn provisions_round_trips_and_keeps_existing_secrets() {
        let mut secrets = DeviceSecrets::default();
        let first = [id("north-0001"), id("south-0001")];
        assert_eq!(secrets.provision(&first).expect("random"), 2);
        let secret = secrets.get(&first[0]).expect("provisioned").clone();
        assert_eq!(secret.password.len(), PASSWORD_LEN);
        assert!(secret.password.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(secret.key, secrets.get(&first[1]).expect("provisioned").key);
        let more = [id("north-0001"), id("north-0002")];
        assert_eq!(secrets.provision(&more).expect("random"), 1);
        assert_eq!(secrets.get(&first[0]), Some(&secret), "not rotated");

        let parsed = DeviceSecrets::parse(&secrets.to_toml()).expect("valid");
        assert_eq!(parsed, secrets);
        assert_eq!(parsed.len(), 3);
    }

    #[test]
    fn rejects_bad_entries() {
        let key = "00".repeat(32);
        let ok = format!("[devices.v1]\npassword = \"p\"\nkey = \"{key}\"\n");
        assert_eq!(DeviceSecrets::parse(&ok).expect("valid").len(), 1);
        let bad_key = "[devices.v1]\npassword = \"p\"\nkey = \"abc\"\n";
        assert!(matches!(
            DeviceSecrets::parse(bad_key),
            Err(SecretsError::Key(_))
        ));
        let bad_id = format!("[devices.\"a/b\"]\npassword = \"p\"\nkey = \"{key}\"\n");
        assert!(matches!(
            DeviceSecrets::parse(&bad_id),
            Err(SecretsError::VehicleId(_))
        ));
        let empty = format!("[devices.v1]\npassword = \"\"\nkey = \"{key}\"\n");
        assert!(matches!(
            DeviceSecrets::parse(&empty),
            Err(SecretsError::Password(_))
        ));
        assert!(matches!(
            DeviceSecrets::parse("[devices.v1]\npassword = 1"),
            Err(SecretsError::Toml { .. })
        ));
    }

    #[test]
    fn debug_hides_secrets() {
        let secret = DeviceSecret {
            password: "hunter2".into(),
            key: [1; 32],
        };
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
