//! Who may connect, and what they may publish and subscribe to.
//!
//! - [`Credentials`]: the credentials file, read-only. The bridge and device-sim read it too
//!   (for the per-device message keys of `shared::seal`).
//! - [`CredentialsFile`]: adds or updates entries in that file (`broker add-device`,
//!   `broker add-client`, or a provisioning tool in bulk), keeping its comments.
//! - `Authenticator`: the broker's check of a CONNECT against the file, with the cache that keeps
//!   a reconnect storm cheap, and `Identity`: who a connection is, with its topic ACL.
//!
//! # The file
//!
//! ```toml
//! # One table per vehicle: its MQTT username, which must also be its client id.
//! [devices.van-0001]
//! password = "$argon2id$v=19$m=1024,t=1,p=1$...$..."   # PHC string, never the password
//! key = "5f0c...e1"                                     # 32-byte message key, 64 hex digits
//!
//! # Other clients: the bridge, and observers such as an engineer's mosquitto_sub.
//! [clients.bridge]
//! role = "bridge"          # publish and subscribe anywhere
//! password = "$argon2id$..."
//!
//! [clients.alice]
//! role = "observer"        # subscribe anywhere, publish nothing
//! password = "$argon2id$..."
//! ```
//!
//! The file holds every device's message key in clear (the bridge needs them to verify seals):
//! [`CredentialsFile::save`] writes it with mode 0600; keep it that way.
//!
//! # Cost of a connect
//!
//! Passwords are argon2id hashes. Their cost is chosen by where the password came from:
//!
//! - **generated** (`add-device` without `--password`, every device in practice): 128 random
//!   bits. No amount of hashing protects such a secret further, nor does brute force threaten
//!   it, so the hash is cheap: argon2id m = 1 MiB, t = 1, p = 1 ([`GENERATED_PARAMS`]).
//! - **chosen by a person** (`--password`): OWASP's minimum for argon2id, m = 19 MiB, t = 2,
//!   p = 1 ([`CHOSEN_PARAMS`]), tens of milliseconds per check.
//!
//! On top of that, a successful check is remembered in memory: the username, the PHC string it
//! was checked against, and an HMAC-SHA256 of the password under a random per-process key. A
//! reconnect of the same device with the same password (the reconnect storm after a network
//! outage) costs one HMAC, not one argon2. A failed check is never cached. Checks that do run
//! argon2 run on Tokio's blocking pool, at most one per core at a time, so they never stall the
//! network tasks. Measured costs are in `docs/broker.md`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use shared::{Topic, TopicKind, VehicleId};
use tokio::sync::Semaphore;
use tracing::{error, info};

use crate::metrics::AuthRefusal;

/// argon2id parameters (memory KiB, iterations, lanes) for generated, 128-bit passwords.
pub const GENERATED_PARAMS: (u32, u32, u32) = (1024, 1, 1);

/// argon2id parameters (memory KiB, iterations, lanes) for passwords a person chose.
pub const CHOSEN_PARAMS: (u32, u32, u32) = (19 * 1024, 2, 1);

/// Longest client name in `[clients.<name>]`.
const MAX_CLIENT_NAME: usize = 64;

/// How often at most the credentials file is checked for changes.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

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
}

impl DeviceEntry {
    /// The device's 32-byte message key (for `shared::seal`).
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// The message key as written in the file: 64 lowercase hex digits.
    pub fn key_hex(&self) -> String {
        to_hex(&self.key)
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

/// What went wrong with a credentials file.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file could not be read.
    #[error("cannot read the credentials file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's answer.
        #[source]
        source: io::Error,
    },
    /// The file is not valid TOML, or has keys the format does not know.
    #[error("the credentials file {} is not valid: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line.
        message: String,
    },
    /// One entry is invalid.
    #[error("the credentials file {} has an invalid entry `{entry}`: {reason}", path.display())]
    Entry {
        /// The file.
        path: PathBuf,
        /// The entry, e.g. `devices.van-1` or `clients.alice`.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A new entry could not be made (invalid name or password).
    #[error("cannot add `{entry}`: {reason}")]
    Invalid {
        /// The entry, e.g. `devices.van-1`.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file could not be written.
    #[error("cannot write the credentials file {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The operating system's answer.
        #[source]
        source: io::Error,
    },
    /// The operating system's random number generator failed.
    #[error("no randomness available: {0}")]
    Random(String),
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
    /// (a device id that is not a valid vehicle id, a key that is not 64 hex digits, a password
    /// that is not a PHC hash, a name used both as device and client).
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
            devices.insert(
                id,
                DeviceEntry {
                    password: raw.password,
                    key,
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

fn check_phc(phc: &str) -> Result<(), String> {
    let hash =
        PasswordHash::new(phc).map_err(|err| format!("`password` is not a PHC hash: {err}"))?;
    if Algorithm::try_from(hash.algorithm).is_err() {
        return Err(format!(
            "`password` uses {}, expected argon2id",
            hash.algorithm
        ));
    }
    Params::try_from(&hash)
        .map_err(|err| format!("`password` has invalid argon2 parameters: {err}"))?;
    Ok(())
}

fn parse_key(hex: &str) -> Result<[u8; 32], String> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return Err(format!(
            "`key` must be 64 hex digits, found {}",
            bytes.len()
        ));
    }
    let mut key = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            // Two hex digits make one byte: the cast cannot truncate.
            (Some(hi), Some(lo)) => key[i] = (hi * 16 + lo) as u8,
            _ => return Err("`key` must be 64 hex digits".to_owned()),
        }
    }
    Ok(key)
}

fn check_client_name(name: &str) -> Result<(), String> {
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

/// Lowercase hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn random_bytes<const N: usize>() -> Result<[u8; N], CredentialsError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|err| CredentialsError::Random(err.to_string()))?;
    Ok(bytes)
}

/// Hashes `password` as a PHC string with argon2id and `params` (memory KiB, iterations,
/// lanes).
fn hash_password(password: &str, params: (u32, u32, u32)) -> Result<String, CredentialsError> {
    let invalid = |reason: String| CredentialsError::Invalid {
        entry: "password".to_owned(),
        reason,
    };
    let (m, t, p) = params;
    let params = Params::new(m, t, p, None).map_err(|err| invalid(err.to_string()))?;
    let salt =
        SaltString::encode_b64(&random_bytes::<16>()?).map_err(|err| invalid(err.to_string()))?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| invalid(err.to_string()))
}

/// Whether `password` matches the PHC string `phc`. Slow by design (argon2).
fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .and_then(|hash| Argon2::default().verify_password(password.as_bytes(), &hash))
        .is_ok()
}

/// Where a new entry's password comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewPassword {
    /// Generate 128 random bits (32 hex digits), hashed with [`GENERATED_PARAMS`].
    Generate,
    /// Use this one, hashed with [`CHOSEN_PARAMS`]. At least 8 characters.
    Given(String),
}

/// What a new or updated entry's owner must be told, once: the password in clear, and for
/// a device its message key.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The password in clear.
    pub password: String,
    /// The device's message key (64 hex digits); `None` for a client.
    pub key: Option<String>,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

const FILE_HEADER: &str = "\
# Fleetbeat broker credentials, written by `broker add-device` and `broker add-client`.
# Passwords are stored as argon2id PHC hashes. Device keys are secret (message keys for the
# seals the bridge verifies): keep this file readable by the broker and the bridge only.
";

/// The credentials file opened for editing: entries added or replaced in memory, comments and
/// other entries kept, written back with [`CredentialsFile::save`].
///
/// Two programs editing the same file at once may lose one's changes: provision from one place.
#[derive(Debug)]
pub struct CredentialsFile {
    path: PathBuf,
    doc: toml_edit::DocumentMut,
    /// Comments of a file without entries yet, to put above the first entry (toml_edit would
    /// otherwise keep them at the end).
    header: Option<String>,
}

impl CredentialsFile {
    /// Opens the file at `path` for editing, or starts an empty one if it does not exist.
    ///
    /// # Errors
    /// As [`Credentials::load`]: an existing file must be valid before it is edited.
    pub fn open(path: &Path) -> Result<CredentialsFile, CredentialsError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => FILE_HEADER.to_owned(),
            Err(source) => {
                return Err(CredentialsError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Credentials::parse(&text, path)?;
        let mut doc =
            text.parse::<toml_edit::DocumentMut>()
                .map_err(|err| CredentialsError::Syntax {
                    path: path.to_owned(),
                    message: err.to_string(),
                })?;
        let header = if doc.as_table().is_empty() {
            let header = doc.trailing().as_str().unwrap_or_default().to_owned();
            doc.set_trailing("");
            Some(header)
        } else {
            None
        };
        Ok(CredentialsFile {
            path: path.to_owned(),
            doc,
            header,
        })
    }

    /// Adds device `id`, or replaces its entry, with a new password and a fresh random key.
    ///
    /// # Errors
    /// [`CredentialsError::Invalid`] for an id that is not a vehicle id, a client of that name,
    /// or a given password shorter than 8 characters.
    pub fn add_device(
        &mut self,
        id: &str,
        password: NewPassword,
    ) -> Result<Issued, CredentialsError> {
        let (password, origin) = match password {
            NewPassword::Generate => (to_hex(&random_bytes::<16>()?), PasswordOrigin::Generated),
            NewPassword::Given(password) => (password, PasswordOrigin::Chosen),
        };
        let key = random_bytes::<32>()?;
        self.set_device(id, &password, origin, key)?;
        Ok(Issued {
            password,
            key: Some(to_hex(&key)),
        })
    }

    /// Adds device `id`, or replaces its entry, with a password and key chosen elsewhere (e.g.
    /// by a provisioning tool that keeps the device's half); the password is hashed at the cost
    /// its `origin` calls for.
    ///
    /// # Errors
    /// [`CredentialsError::Invalid`] for an id that is not a vehicle id, a client of that name,
    /// or a password shorter than 8 characters.
    pub fn set_device(
        &mut self,
        id: &str,
        password: &str,
        origin: PasswordOrigin,
        key: [u8; 32],
    ) -> Result<(), CredentialsError> {
        let entry = format!("devices.{id}");
        let invalid = |reason: String| CredentialsError::Invalid {
            entry: entry.clone(),
            reason,
        };
        VehicleId::new(id).map_err(|err| invalid(format!("not a vehicle id: {err}")))?;
        if self.doc.get("clients").and_then(|c| c.get(id)).is_some() {
            return Err(invalid(format!("`{id}` is already a client")));
        }
        let phc = hash_for(password, origin).map_err(|err| relabel(err, &entry))?;

        let mut table = self.new_entry();
        table.insert("password", toml_edit::value(phc));
        table.insert("key", toml_edit::value(to_hex(&key)));
        self.section("devices")
            .insert(id, toml_edit::Item::Table(table));
        Ok(())
    }

    /// Adds client `name` with `role`, or replaces its entry, with a new password.
    ///
    /// # Errors
    /// [`CredentialsError::Invalid`] for a name outside `[A-Za-z0-9_.-]{1,64}`, a device of that
    /// name, or a given password shorter than 8 characters.
    pub fn add_client(
        &mut self,
        name: &str,
        role: Role,
        password: NewPassword,
    ) -> Result<Issued, CredentialsError> {
        let entry = format!("clients.{name}");
        let invalid = |reason: String| CredentialsError::Invalid {
            entry: entry.clone(),
            reason,
        };
        check_client_name(name).map_err(invalid)?;
        if self.doc.get("devices").and_then(|d| d.get(name)).is_some() {
            return Err(invalid(format!("`{name}` is already a device")));
        }
        let (password, origin) = match password {
            NewPassword::Generate => (to_hex(&random_bytes::<16>()?), PasswordOrigin::Generated),
            NewPassword::Given(password) => (password, PasswordOrigin::Chosen),
        };
        let phc = hash_for(&password, origin).map_err(|err| relabel(err, &entry))?;

        let mut table = self.new_entry();
        table.insert("role", toml_edit::value(role.as_str()));
        table.insert("password", toml_edit::value(phc));
        self.section("clients")
            .insert(name, toml_edit::Item::Table(table));
        Ok(Issued {
            password,
            key: None,
        })
    }

    /// A new entry's table; the first one in a file carries the file's header comments.
    fn new_entry(&mut self) -> toml_edit::Table {
        let mut table = toml_edit::Table::new();
        if let Some(header) = self.header.take() {
            table.decor_mut().set_prefix(header);
        }
        table
    }

    /// The `[devices]` or `[clients]` table, created (implicit: only its sub-tables show).
    fn section(&mut self, name: &str) -> &mut toml_edit::Table {
        let item = self.doc.entry(name).or_insert_with(|| {
            let mut table = toml_edit::Table::new();
            table.set_implicit(true);
            toml_edit::Item::Table(table)
        });
        if !item.is_table() {
            // Only possible if the file had `devices = ...` as a value, which `open` refuses.
            *item = toml_edit::Item::Table(toml_edit::Table::new());
        }
        match item.as_table_mut() {
            Some(table) => table,
            None => unreachable!("the item was made a table just above"),
        }
    }

    /// Writes the file back atomically (a temporary file in the same directory, renamed over
    /// it), readable and writable by its owner only.
    ///
    /// # Errors
    /// [`CredentialsError::Write`] if it cannot be written.
    pub fn save(&self) -> Result<(), CredentialsError> {
        let text = self.doc.to_string();
        // What we write must load: never leave a file the broker would refuse.
        Credentials::parse(&text, &self.path)?;
        let write_err = |source| CredentialsError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file_name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "credentials".to_owned());
        let tmp = dir.join(format!(".{file_name}.{:016x}.tmp", fastrand::u64(..)));
        let written = (|| {
            let mut options = fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(write_err)
    }
}

fn relabel(err: CredentialsError, entry: &str) -> CredentialsError {
    match err {
        CredentialsError::Invalid { reason, .. } => CredentialsError::Invalid {
            entry: entry.to_owned(),
            reason,
        },
        other => other,
    }
}

/// Where a password came from, which decides what its hash costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordOrigin {
    /// Generated at random with at least 128 bits: hashed with [`GENERATED_PARAMS`].
    Generated,
    /// Chosen by a person: hashed with [`CHOSEN_PARAMS`].
    Chosen,
}

/// The PHC hash of `password` at the cost its `origin` calls for.
fn hash_for(password: &str, origin: PasswordOrigin) -> Result<String, CredentialsError> {
    if password.chars().count() < 8 {
        return Err(CredentialsError::Invalid {
            entry: String::new(),
            reason: "a password has at least 8 characters".to_owned(),
        });
    }
    match origin {
        PasswordOrigin::Generated => hash_password(password, GENERATED_PARAMS),
        PasswordOrigin::Chosen => hash_password(password, CHOSEN_PARAMS),
    }
}

/// Who a connection authenticated as; decides its topic ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// A vehicle: publishes only its own `hb`, `event`, `status`, `ack`; subscribes only to its
    /// own `cmd`.
    Device(VehicleId),
    /// A named client with a role.
    Client {
        /// Its name in the credentials file.
        name: String,
        /// What it may do.
        role: Role,
    },
    /// Anyone, in open mode: may do everything.
    Anonymous,
    /// The broker's own listener probe: publishes on the probe topics only.
    Probe,
}

/// Topic prefix the broker's own probes publish on.
pub(crate) const PROBE_TOPIC_PREFIX: &str = "fleetbeat-broker/probe/";

impl Identity {
    /// Whether this identity may publish on `topic`.
    pub(crate) fn may_publish(&self, topic: &[u8]) -> bool {
        match self {
            Identity::Anonymous
            | Identity::Client {
                role: Role::Bridge, ..
            } => true,
            Identity::Client {
                role: Role::Observer,
                ..
            } => false,
            Identity::Probe => topic.starts_with(PROBE_TOPIC_PREFIX.as_bytes()),
            Identity::Device(id) => std::str::from_utf8(topic)
                .ok()
                .and_then(|t| Topic::parse(t).ok())
                .is_some_and(|t| &t.vehicle == id && t.kind != TopicKind::Command),
        }
    }

    /// Whether this identity may subscribe to `filter`.
    pub(crate) fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Identity::Anonymous | Identity::Client { .. } => true,
            Identity::Probe => false,
            Identity::Device(id) => {
                let mut levels = filter.split('/');
                match (
                    levels.next(),
                    levels.next(),
                    levels.next(),
                    levels.next(),
                    levels.next(),
                ) {
                    (Some(shared::topic::ROOT), Some(fleet), Some(vehicle), Some("cmd"), None) => {
                        vehicle == id.as_str()
                            && (fleet == "+" || shared::FleetId::new(fleet).is_ok())
                    }
                    _ => false,
                }
            }
        }
    }

    /// Whether this is a device (counted in `devices_connected`).
    pub(crate) fn is_device(&self) -> bool {
        matches!(self, Identity::Device(_))
    }

    /// A short description for logs.
    pub(crate) fn describe(&self) -> String {
        match self {
            Identity::Device(id) => format!("device {id}"),
            Identity::Client { name, role } => format!("{role} {name}"),
            Identity::Anonymous => "anonymous (open mode)".to_owned(),
            Identity::Probe => "listener probe".to_owned(),
        }
    }
}

#[derive(Debug)]
struct Loaded {
    credentials: Arc<Credentials>,
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

/// The broker's side of authentication: the credentials file (reloaded when it changes), the
/// cache of successful checks and the bound on concurrent argon2 checks.
#[derive(Debug)]
pub(crate) struct Authenticator {
    path: PathBuf,
    loaded: RwLock<Loaded>,
    /// username → (PHC string checked against, HMAC of the password under `cache_key`).
    cache: Mutex<HashMap<String, (String, [u8; 32])>>,
    cache_key: [u8; 32],
    hashing: Semaphore,
}

type HmacSha256 = Hmac<Sha256>;

impl Authenticator {
    /// Loads the credentials file at `path`.
    pub(crate) fn load(path: &Path) -> Result<Authenticator, CredentialsError> {
        let credentials = Credentials::load(path)?;
        let stamp = file_stamp(path);
        let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Authenticator {
            path: path.to_owned(),
            loaded: RwLock::new(Loaded {
                credentials: Arc::new(credentials),
                stamp,
                checked: Instant::now(),
            }),
            cache: Mutex::new(HashMap::new()),
            cache_key: random_bytes::<32>()?,
            hashing: Semaphore::new(parallelism),
        })
    }

    /// The credentials currently in force (reloaded if the file changed).
    pub(crate) fn credentials(&self) -> Arc<Credentials> {
        self.reload_if_changed();
        match self.loaded.read() {
            Ok(loaded) => Arc::clone(&loaded.credentials),
            Err(poisoned) => Arc::clone(&poisoned.into_inner().credentials),
        }
    }

    /// Re-reads the file if its modification time or size changed, at most once a second.
    /// A file that no longer loads is reported and ignored: the previous credentials stay.
    fn reload_if_changed(&self) {
        {
            let Ok(loaded) = self.loaded.read() else {
                return;
            };
            if loaded.checked.elapsed() < RELOAD_CHECK_INTERVAL {
                return;
            }
        }
        let Ok(mut loaded) = self.loaded.write() else {
            return;
        };
        if loaded.checked.elapsed() < RELOAD_CHECK_INTERVAL {
            return;
        }
        loaded.checked = Instant::now();
        let stamp = file_stamp(&self.path);
        if stamp == loaded.stamp {
            return;
        }
        match Credentials::load(&self.path) {
            Ok(credentials) => {
                info!(
                    path = %self.path.display(),
                    devices = credentials.devices.len(),
                    clients = credentials.clients.len(),
                    "credentials file changed: reloaded"
                );
                loaded.credentials = Arc::new(credentials);
                loaded.stamp = stamp;
            }
            Err(err) => {
                error!(
                    path = %self.path.display(),
                    cause = %err,
                    "credentials file changed but does not load: keeping the previous credentials"
                );
                loaded.stamp = stamp;
            }
        }
    }

    /// Checks a CONNECT's client id and login against the credentials.
    pub(crate) async fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<Identity, AuthRefusal> {
        let (Some(username), Some(password)) = (username, password) else {
            return Err(AuthRefusal::NoCredentials);
        };
        if username.is_empty() {
            return Err(AuthRefusal::NoCredentials);
        }
        let credentials = self.credentials();
        let (identity, phc) = if let Some(device) = credentials.device(username) {
            if client_id != username {
                return Err(AuthRefusal::ClientIdMismatch);
            }
            let id = VehicleId::new(username).map_err(|_| AuthRefusal::UnknownUser)?;
            (Identity::Device(id), device.password.clone())
        } else if let Some(client) = credentials.client(username) {
            if credentials.device(client_id).is_some() {
                // Taking a device's client id would kick that vehicle off.
                return Err(AuthRefusal::ClientIdMismatch);
            }
            (
                Identity::Client {
                    name: username.to_owned(),
                    role: client.role,
                },
                client.password.clone(),
            )
        } else {
            return Err(AuthRefusal::UnknownUser);
        };

        let tag = self.tag(username, password);
        if self.cached(username, &phc, &tag) {
            return Ok(identity);
        }
        if self.verify(password, &phc).await {
            if let Ok(mut cache) = self.cache.lock() {
                cache.insert(username.to_owned(), (phc, tag));
            }
            Ok(identity)
        } else {
            Err(AuthRefusal::BadPassword)
        }
    }

    fn tag(&self, username: &str, password: &str) -> [u8; 32] {
        let mut mac = match <HmacSha256 as hmac::KeyInit>::new_from_slice(&self.cache_key) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        mac.update(username.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Whether `username` was verified with this password against this very hash before.
    fn cached(&self, username: &str, phc: &str, tag: &[u8; 32]) -> bool {
        let Ok(cache) = self.cache.lock() else {
            return false;
        };
        cache.get(username).is_some_and(|(cached_phc, cached_tag)| {
            // Constant time: the tags are secret-derived.
            cached_phc == phc
                && cached_tag
                    .iter()
                    .zip(tag)
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
    }

    /// Runs argon2 on the blocking pool, at most one check per core at a time.
    async fn verify(&self, password: &str, phc: &str) -> bool {
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        let (password, phc) = (password.to_owned(), phc.to_owned());
        tokio::task::spawn_blocking(move || verify_password(&password, &phc))
            .await
            .unwrap_or(false)
    }
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "fleetbeat-auth-{name}-{}-{:08x}.toml",
            std::process::id(),
            fastrand::u32(..)
        ))
    }

    const FAST_PHC_OF_SECRET: fn() -> String =
        || hash_password("s3cret-pw", GENERATED_PARAMS).unwrap();

    #[test]
    fn parses_the_documented_format() {
        let phc = FAST_PHC_OF_SECRET();
        let text = format!(
            r#"
            [devices.van-0001]
            password = "{phc}"
            key = "{}"

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
                format!("[devices.\"bad/id\"]\npassword = \"{phc}\"\nkey = \"{key}\""),
                "devices.bad/id",
            ),
            (
                format!("[devices.van-1]\npassword = \"{phc}\"\nkey = \"abc\""),
                "devices.van-1",
            ),
            (
                format!("[devices.van-1]\npassword = \"hunter2\"\nkey = \"{key}\""),
                "devices.van-1",
            ),
            (
                format!(
                    "[devices.van-1]\npassword = \"{phc}\"\nkey = \"{key}\"\n\
                     [clients.van-1]\nrole = \"observer\"\npassword = \"{phc}\""
                ),
                "clients.van-1",
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

    #[test]
    fn editing_adds_updates_and_keeps_comments() {
        let path = temp_path("edit");
        fs::write(&path, "# my comment\n").unwrap();
        let mut file = CredentialsFile::open(&path).unwrap();
        let van = file.add_device("van-1", NewPassword::Generate).unwrap();
        let bridge = file
            .add_client("bridge", Role::Bridge, NewPassword::Generate)
            .unwrap();
        file.save().unwrap();

        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# my comment\n"), "{text}");
        assert!(text.contains("[devices.van-1]"), "{text}");
        assert!(!text.contains("[devices]\n"), "{text}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let creds = Credentials::load(&path).unwrap();
        let entry = creds.device("van-1").unwrap();
        assert_eq!(van.password.len(), 32);
        assert_eq!(van.key.as_deref(), Some(to_hex(&entry.key()).as_str()));
        assert!(verify_password(&van.password, entry.password_hash()));
        assert!(
            entry
                .password_hash()
                .starts_with("$argon2id$v=19$m=1024,t=1,p=1$")
        );
        assert!(verify_password(
            &bridge.password,
            creds.client("bridge").unwrap().password_hash()
        ));

        // Updating replaces password and key.
        let mut file = CredentialsFile::open(&path).unwrap();
        let again = file.add_device("van-1", NewPassword::Generate).unwrap();
        file.save().unwrap();
        let creds = Credentials::load(&path).unwrap();
        assert_ne!(again.key, van.key);
        assert_eq!(creds.devices().count(), 1);
        assert!(!verify_password(
            &van.password,
            creds.device("van-1").unwrap().password_hash()
        ));

        // Names are checked, and a name is either a device or a client.
        let mut file = CredentialsFile::open(&path).unwrap();
        assert!(file.add_device("bad/id", NewPassword::Generate).is_err());
        assert!(file.add_device("bridge", NewPassword::Generate).is_err());
        assert!(
            file.add_client("van-1", Role::Observer, NewPassword::Generate)
                .is_err()
        );
        assert!(
            file.add_client("eve", Role::Observer, NewPassword::Given("short".into()))
                .is_err()
        );
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn chosen_passwords_get_the_strong_parameters() {
        let phc = hash_for("correct horse", PasswordOrigin::Chosen).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        let phc = hash_for("0123456789abcdef", PasswordOrigin::Generated).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{phc}");
        assert!(hash_for("short", PasswordOrigin::Generated).is_err());
    }

    #[test]
    fn provisioning_with_a_given_password_and_key() {
        let path = temp_path("set");
        let mut file = CredentialsFile::open(&path).unwrap();
        file.set_device(
            "van-7",
            "Vq3xxxxxxxxxxxxxxxxxxxxx",
            PasswordOrigin::Generated,
            [9; 32],
        )
        .unwrap();
        file.save().unwrap();
        let creds = Credentials::load(&path).unwrap();
        let entry = creds.device("van-7").unwrap();
        assert_eq!(entry.key(), [9; 32]);
        assert_eq!(entry.key_hex(), "09".repeat(32));
        assert!(verify_password(
            "Vq3xxxxxxxxxxxxxxxxxxxxx",
            entry.password_hash()
        ));
        fs::remove_file(&path).unwrap();
    }

    fn authenticator_with(text: &str) -> (Authenticator, PathBuf) {
        let path = temp_path("authn");
        fs::write(&path, text).unwrap();
        (Authenticator::load(&path).unwrap(), path)
    }

    #[tokio::test]
    async fn authentication_rules() {
        let phc = FAST_PHC_OF_SECRET();
        let key = "00".repeat(32);
        let (auth, path) = authenticator_with(&format!(
            "[devices.van-1]\npassword = \"{phc}\"\nkey = \"{key}\"\n\
             [clients.watcher]\nrole = \"observer\"\npassword = \"{phc}\"\n"
        ));
        let ok = Some("s3cret-pw");
        assert_eq!(
            auth.authenticate("van-1", Some("van-1"), ok).await,
            Ok(Identity::Device(VehicleId::new("van-1").unwrap()))
        );
        assert_eq!(
            auth.authenticate("mosq-1", Some("watcher"), ok).await,
            Ok(Identity::Client {
                name: "watcher".into(),
                role: Role::Observer
            })
        );
        for (client_id, user, pass, why) in [
            ("van-1", None, None, AuthRefusal::NoCredentials),
            ("van-1", Some("van-1"), None, AuthRefusal::NoCredentials),
            ("van-1", Some(""), ok, AuthRefusal::NoCredentials),
            ("van-2", Some("van-2"), ok, AuthRefusal::UnknownUser),
            (
                "van-1",
                Some("van-1"),
                Some("wrong"),
                AuthRefusal::BadPassword,
            ),
            ("other", Some("van-1"), ok, AuthRefusal::ClientIdMismatch),
            ("van-1", Some("watcher"), ok, AuthRefusal::ClientIdMismatch),
        ] {
            assert_eq!(
                auth.authenticate(client_id, user, pass).await,
                Err(why),
                "{client_id} {user:?} {pass:?}"
            );
        }
        fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn successful_checks_are_cached_and_failures_are_not() {
        let phc = FAST_PHC_OF_SECRET();
        let (auth, path) = authenticator_with(&format!(
            "[devices.van-1]\npassword = \"{phc}\"\nkey = \"{}\"\n",
            "00".repeat(32)
        ));
        assert!(
            auth.authenticate("van-1", Some("van-1"), Some("nope"))
                .await
                .is_err()
        );
        assert!(auth.cache.lock().unwrap().is_empty());
        auth.authenticate("van-1", Some("van-1"), Some("s3cret-pw"))
            .await
            .unwrap();
        assert!(auth.cached("van-1", &phc, &auth.tag("van-1", "s3cret-pw")));
        assert!(!auth.cached("van-1", &phc, &auth.tag("van-1", "other")));
        // A cached success does not let another password in.
        assert_eq!(
            auth.authenticate("van-1", Some("van-1"), Some("s3cret-pwX"))
                .await,
            Err(AuthRefusal::BadPassword)
        );
        fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn a_changed_file_is_reloaded() {
        let path = temp_path("reload");
        let mut file = CredentialsFile::open(&path).unwrap();
        file.add_device("van-1", NewPassword::Generate).unwrap();
        file.save().unwrap();
        let auth = Authenticator::load(&path).unwrap();

        let mut file = CredentialsFile::open(&path).unwrap();
        let van2 = file.add_device("van-2", NewPassword::Generate).unwrap();
        file.save().unwrap();
        // Within the check interval the old credentials stay...
        assert_eq!(
            auth.authenticate("van-2", Some("van-2"), Some(&van2.password))
                .await,
            Err(AuthRefusal::UnknownUser)
        );
        // ...and after it the new device is known.
        auth.loaded.write().unwrap().checked -= RELOAD_CHECK_INTERVAL;
        assert!(
            auth.authenticate("van-2", Some("van-2"), Some(&van2.password))
                .await
                .is_ok()
        );

        // A broken file keeps what was loaded.
        fs::write(&path, "garbage [").unwrap();
        auth.loaded.write().unwrap().checked -= RELOAD_CHECK_INTERVAL;
        assert!(auth.credentials().device("van-2").is_some());
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn device_acl() {
        let me = Identity::Device(VehicleId::new("van-1").unwrap());
        for topic in [
            "fleet/north/van-1/hb",
            "fleet/north/van-1/event",
            "fleet/north/van-1/status",
            "fleet/south/van-1/ack",
        ] {
            assert!(me.may_publish(topic.as_bytes()), "{topic}");
        }
        for topic in [
            "fleet/north/van-2/hb",
            "fleet/north/van-1/cmd",
            "fleet/north/van-1/gps",
            "fleet/north/van-1",
            "json/fleet/north/van-1/hb",
            "anything",
        ] {
            assert!(!me.may_publish(topic.as_bytes()), "{topic}");
        }
        assert!(me.may_subscribe("fleet/+/van-1/cmd"));
        assert!(me.may_subscribe("fleet/north/van-1/cmd"));
        for filter in [
            "fleet/+/+/cmd",
            "fleet/+/van-2/cmd",
            "fleet/#",
            "#",
            "fleet/+/van-1/#",
            "fleet/+/van-1/hb",
            "fleet/a+b/van-1/cmd",
        ] {
            assert!(!me.may_subscribe(filter), "{filter}");
        }
    }

    #[test]
    fn role_acls() {
        let bridge = Identity::Client {
            name: "b".into(),
            role: Role::Bridge,
        };
        let observer = Identity::Client {
            name: "o".into(),
            role: Role::Observer,
        };
        assert!(bridge.may_publish(b"fleet/a/b/cmd") && bridge.may_subscribe("#"));
        assert!(!observer.may_publish(b"fleet/a/b/cmd") && observer.may_subscribe("fleet/#"));
        assert!(Identity::Anonymous.may_publish(b"x") && Identity::Anonymous.may_subscribe("#"));
        assert!(Identity::Probe.may_publish(b"fleetbeat-broker/probe/1"));
        assert!(!Identity::Probe.may_publish(b"fleet/a/b/hb"));
        assert!(!Identity::Probe.may_subscribe("#"));
    }
}
