//! [`CredentialsFile`]: adds or replaces entries of the credentials file, keeping its comments.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use shared::{FleetId, VehicleId};

use super::credentials::{Credentials, Role, check_client_name};
use super::password::{PasswordOrigin, hash_for, random_bytes};
use crate::error::CredentialsError;

/// Where a new entry's password comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewPassword {
    /// Generate 128 random bits (32 hex digits), hashed cheaply (argon2id m = 1 MiB, t = 1).
    Generate,
    /// Use this one, hashed expensively (argon2id m = 19 MiB, t = 2). At least 8 characters.
    Given(String),
}

impl NewPassword {
    /// The password in clear and where it came from: generated now, or given.
    fn resolve(self) -> Result<(String, PasswordOrigin), CredentialsError> {
        Ok(match self {
            NewPassword::Generate => (
                hex::encode(random_bytes::<16>()?),
                PasswordOrigin::Generated,
            ),
            NewPassword::Given(password) => (password, PasswordOrigin::Chosen),
        })
    }
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

    /// Adds device `id` of `fleet`, or replaces its entry, with a new password and a fresh
    /// random key.
    ///
    /// # Errors
    /// [`CredentialsError::Invalid`] for an id that is not a vehicle id, a client of that name,
    /// or a given password shorter than 8 characters.
    pub fn add_device(
        &mut self,
        id: &str,
        fleet: &FleetId,
        password: NewPassword,
    ) -> Result<Issued, CredentialsError> {
        let (password, origin) = password.resolve()?;
        let key = random_bytes::<32>()?;
        self.set_device(id, fleet, &password, origin, key)?;
        Ok(Issued {
            password,
            key: Some(hex::encode(key)),
        })
    }

    /// Adds device `id` of `fleet`, or replaces its entry, with a password and key chosen
    /// elsewhere (e.g.
    /// by a provisioning tool that keeps the device's half); the password is hashed at the cost
    /// its `origin` calls for.
    ///
    /// # Errors
    /// [`CredentialsError::Invalid`] for an id that is not a vehicle id, a client of that name,
    /// or a password shorter than 8 characters.
    pub fn set_device(
        &mut self,
        id: &str,
        fleet: &FleetId,
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
        table.insert("key", toml_edit::value(hex::encode(key)));
        table.insert("fleet", toml_edit::value(fleet.as_str()));
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
        let (password, origin) = password.resolve()?;
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

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::auth::password::verify_password;

    fn north() -> FleetId {
        FleetId::new("north").unwrap()
    }
    use crate::auth::testing::temp_path;

    #[test]
    fn editing_adds_updates_and_keeps_comments() {
        let path = temp_path("edit");
        fs::write(&path, "# my comment\n").unwrap();
        let mut file = CredentialsFile::open(&path).unwrap();
        let van = file
            .add_device("van-1", &north(), NewPassword::Generate)
            .unwrap();
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
        assert_eq!(entry.fleet().as_str(), "north");
        assert_eq!(van.password.len(), 32);
        assert_eq!(van.key.as_deref(), Some(hex::encode(entry.key()).as_str()));
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
        let again = file
            .add_device("van-1", &north(), NewPassword::Generate)
            .unwrap();
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
        assert!(
            file.add_device("bad/id", &north(), NewPassword::Generate)
                .is_err()
        );
        assert!(
            file.add_device("bridge", &north(), NewPassword::Generate)
                .is_err()
        );
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
    fn provisioning_with_a_given_password_and_key() {
        let path = temp_path("set");
        let mut file = CredentialsFile::open(&path).unwrap();
        file.set_device(
            "van-7",
            &north(),
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
        assert_eq!(entry.fleet(), &north());
        assert!(verify_password(
            "Vq3xxxxxxxxxxxxxxxxxxxxx",
            entry.password_hash()
        ));
        fs::remove_file(&path).unwrap();
    }
}
