//! [`Credentials`]: the credentials file, read and checked; its [`DeviceEntry`] and
//! [`ClientEntry`] entries and the client [`Role`]s.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};
use shared::{FleetId, VehicleId};

use super::password::check_phc;
use crate::error::CredentialsError;

/// Longest client name in `[clients.<name>]`.
const MAX_CLIENT_NAME: usize = 64;

/// What a client (not a device) may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Publish and subscribe anywhere: the bridge (and operators sending commands).
    Bridge,
    /// Subscribe anywhere, publish nothing: for watching traffic with `mosquitto_sub`.
    Observer,
}

impl Role {
    /// The role's name in the credentials file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Bridge => "bridge",
            Role::Observer => "observer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device's entry: `[devices.<vehicle-id>]`.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    password: String,
    key: [u8; 32],
    fleet: FleetId,
}

impl DeviceEntry {
    /// The fleet the device belongs to: the only `fleet/{fleet}/...` level it may publish
    /// and subscribe under, and the fleet the bridge files it in.
    pub fn fleet(&self) -> &FleetId {
        &self.fleet
    }

    /// The device's 32-byte message key (for `shared::seal`).
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// The message key as written in the file: 64 lowercase hex digits.
    pub fn key_hex(&self) -> String {
        hex::encode(self.key)
    }

    /// The stored password hash, a PHC string.
    pub fn password_hash(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for DeviceEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("DeviceEntry")
            .field("password", &self.password)
            .field("key", &"<32 bytes>")
            .field("fleet", &self.fleet)
            .finish()
    }
}

/// A client's entry: `[clients.<name>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEntry {
    role: Role,
    password: String,
}

impl ClientEntry {
    /// What the client may do.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The stored password hash, a PHC string.
    pub fn password_hash(&self) -> &str {
        &self.password
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    devices: BTreeMap<String, DeviceFormat>,
    #[serde(default)]
    clients: BTreeMap<String, ClientFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFormat {
    password: String,
    key: String,
    /// Required; `Option` only so that a missing one gets our own error naming the device.
    fleet: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFormat {
    role: Role,
    password: String,
}

/// The credentials file, loaded and checked: every device and client with its password hash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    devices: BTreeMap<String, DeviceEntry>,
    clients: BTreeMap<String, ClientEntry>,
}

impl Credentials {
    /// Reads and checks the credentials file at `path`.
    ///
    /// # Errors
    /// [`CredentialsError::Read`] if it cannot be read, [`CredentialsError::Syntax`] if it is not
    /// valid TOML of this format, [`CredentialsError::Entry`] naming the first invalid entry
    /// (a device id that is not a valid vehicle id, a key that is not 64 hex digits, a device
    /// without a valid `fleet`, a password that is not a PHC hash, a name used both as device
    /// and client).
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let text = fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Credentials::parse(&text, path)
    }

    /// Parses credentials from `text`; `path` is only used in error messages.
    ///
    /// # Errors
    /// As [`Credentials::load`], without [`CredentialsError::Read`].
    pub fn parse(text: &str, path: &Path) -> Result<Credentials, CredentialsError> {
        let file: FileFormat = toml::from_str(text).map_err(|err| CredentialsError::Syntax {
            path: path.to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })?;
        let bad = |entry: String, reason: String| CredentialsError::Entry {
            path: path.to_owned(),
            entry,
            reason,
        };

        let mut devices = BTreeMap::new();
        for (id, raw) in file.devices {
            let entry = format!("devices.{id}");
            VehicleId::new(&id)
                .map_err(|err| bad(entry.clone(), format!("not a vehicle id: {err}")))?;
            check_phc(&raw.password).map_err(|reason| bad(entry.clone(), reason))?;
            let key = parse_key(&raw.key).map_err(|reason| bad(entry.clone(), reason))?;
            let fleet = parse_fleet(raw.fleet.as_deref(), &id)
                .map_err(|reason| bad(entry.clone(), reason))?;
            devices.insert(
                id,
                DeviceEntry {
                    password: raw.password,
                    key,
                    fleet,
                },
            );
        }
        let mut clients = BTreeMap::new();
        for (name, raw) in file.clients {
            let entry = format!("clients.{name}");
            check_client_name(&name).map_err(|reason| bad(entry.clone(), reason))?;
            if devices.contains_key(&name) {
                return Err(bad(
                    entry,
                    format!("`{name}` is also a device: usernames must be unique"),
                ));
            }
            check_phc(&raw.password).map_err(|reason| bad(entry.clone(), reason))?;
            clients.insert(
                name,
                ClientEntry {
                    role: raw.role,
                    password: raw.password,
                },
            );
        }
        Ok(Credentials { devices, clients })
    }

    /// The entry of the device with vehicle id `id`.
    pub fn device(&self, id: &str) -> Option<&DeviceEntry> {
        self.devices.get(id)
    }

    /// The entry of the client named `name`.
    pub fn client(&self, name: &str) -> Option<&ClientEntry> {
        self.clients.get(name)
    }

    /// Every device, by vehicle id.
    pub fn devices(&self) -> impl Iterator<Item = (&str, &DeviceEntry)> {
        self.devices.iter().map(|(id, entry)| (id.as_str(), entry))
    }

    /// Every client, by name.
    pub fn clients(&self) -> impl Iterator<Item = (&str, &ClientEntry)> {
        self.clients
            .iter()
            .map(|(name, entry)| (name.as_str(), entry))
    }
}

/// The device's fleet: required (a device without one could publish in any fleet, so an old
/// file is refused, naming the device, rather than loaded with a warning).
fn parse_fleet(text: Option<&str>, id: &str) -> Result<FleetId, String> {
    let Some(text) = text else {
        return Err(format!(
            "no `fleet`: every device belongs to one fleet; add `fleet = \"<fleet>\"` to \
             [devices.{id}] by hand"
        ));
    };
    FleetId::new(text).map_err(|err| format!("`fleet` is not a fleet id: {err}"))
}

/// The 32-byte message key written as 64 hex digits.
fn parse_key(text: &str) -> Result<[u8; 32], String> {
    if text.len() != 64 {
        return Err(format!("`key` must be 64 hex digits, found {}", text.len()));
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(text, &mut key).map_err(|_| "`key` must be 64 hex digits".to_owned())?;
    Ok(key)
}

/// Checks a client name: 1 to 64 of `A-Z a-z 0-9 _ . -`; the reason if not.
pub(crate) fn check_client_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_CLIENT_NAME {
        return Err(format!(
            "a client name has 1 to {MAX_CLIENT_NAME} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "a client name has only A-Z a-z 0-9 _ . - (found {c:?})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::auth::testing::FAST_PHC_OF_SECRET;

    #[test]
    fn parses_the_documented_format() {
        let phc = FAST_PHC_OF_SECRET();
        let text = format!(
            r#"
            [devices.van-0001]
            password = "{phc}"
            key = "{}"
            fleet = "north"

            [clients.bridge]
            role = "bridge"
            password = "{phc}"

            [clients.alice]
            role = "observer"
            password = "{phc}"
            "#,
            "ab".repeat(32)
        );
        let creds = Credentials::parse(&text, Path::new("c.toml")).unwrap();
        let device = creds.device("van-0001").unwrap();
        assert_eq!(device.key(), [0xab; 32]);
        assert_eq!(device.password_hash(), phc);
        assert_eq!(device.fleet().as_str(), "north");
        assert!(
            !format!("{device:?}").contains("abab"),
            "Debug must not show the key"
        );
        assert_eq!(creds.client("bridge").unwrap().role(), Role::Bridge);
        assert_eq!(creds.client("alice").unwrap().role(), Role::Observer);
        assert!(creds.device("bridge").is_none());
        assert_eq!(creds.devices().count(), 1);
        assert_eq!(creds.clients().count(), 2);
    }

    #[test]
    fn rejects_invalid_entries_naming_them() {
        let phc = FAST_PHC_OF_SECRET();
        let key = "00".repeat(32);
        let cases = [
            (
                format!(
                    "[devices.\"bad/id\"]\npassword = \"{phc}\"\nkey = \"{key}\"\nfleet = \"n\""
                ),
                "devices.bad/id",
            ),
            (
                format!("[devices.van-1]\npassword = \"{phc}\"\nkey = \"abc\"\nfleet = \"n\""),
                "devices.van-1",
            ),
            (
                format!("[devices.van-1]\npassword = \"hunter2\"\nkey = \"{key}\"\nfleet = \"n\""),
                "devices.van-1",
            ),
            (
                format!(
                    "[devices.van-1]\npassword = \"{phc}\"\nkey = \"{key}\"\nfleet = \"n\"\n\
                     [clients.van-1]\nrole = \"observer\"\npassword = \"{phc}\""
                ),
                "clients.van-1",
            ),
            (
                format!("[devices.van-1]\npassword = \"{phc}\"\nkey = \"{key}\"\nfleet = \"a/b\""),
                "devices.van-1",
            ),
            (
                format!("[clients.\"a b\"]\nrole = \"observer\"\npassword = \"{phc}\""),
                "clients.a b",
            ),
        ];
        for (text, entry) in cases {
            match Credentials::parse(&text, Path::new("c.toml")) {
                Err(CredentialsError::Entry { entry: got, .. }) => assert_eq!(got, entry),
                other => panic!("{entry}: expected an Entry error, got {other:?}"),
            }
        }
        // A device without a fleet (a file from before fleets were credentials) is refused,
        // naming the device and saying what to add.
        let old = format!("[devices.van-9]\npassword = \"{phc}\"\nkey = \"{key}\"");
        match Credentials::parse(&old, Path::new("c.toml")) {
            Err(err @ CredentialsError::Entry { .. }) => {
                let text = err.to_string();
                assert!(
                    text.contains("devices.van-9") && text.contains("fleet"),
                    "{text}"
                );
            }
            other => panic!("a device without a fleet must be refused, got {other:?}"),
        }
        for text in [
            "[devices.van-1]\npassword = \"x\"",
            "[clients.a]\nrole = \"admin\"\npassword = \"x\"",
            "[strangers.a]\nx = 1",
            "not toml at all [",
        ] {
            assert!(
                matches!(
                    Credentials::parse(text, Path::new("c.toml")),
                    Err(CredentialsError::Syntax { .. })
                ),
                "{text}"
            );
        }
    }
}
