//! How a store is opened ([`StoreOptions`], [`Synchronous`]) and the durability it reports
//! ([`Durability`]).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// When a commit counts as done: SQLite's `synchronous` setting (in WAL mode); on PostgreSQL,
/// `synchronous_commit` (`on` for [`Synchronous::Full`], `off` otherwise: the server's crash,
/// not the bridge's, can then lose the last commits; `fsync` is the server's own setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Every commit waits for the write-ahead log to reach the disk (fsync): a committed
    /// write survives a crash of the process and a power loss. The default.
    #[default]
    Full,
    /// Commits do not wait for the disk, the log is synced at checkpoints: a committed
    /// write survives a crash of the process (`kill -9`), but the last commits can be lost in
    /// a power loss or an OS crash. Much faster on slow disks.
    Normal,
    /// No syncing at all: for benchmarks and throwaway stores only. A power loss can
    /// corrupt the database.
    Off,
}

impl Synchronous {
    /// The setting's name: `full`, `normal`, `off`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Normal => "normal",
            Self::Off => "off",
        }
    }
}

impl fmt::Display for Synchronous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Synchronous {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Self::Full),
            "normal" => Ok(Self::Normal),
            "off" => Ok(Self::Off),
            _ => Err(format!(
                "unknown synchronous setting {s:?}: expected full, normal or off"
            )),
        }
    }
}

/// How to open a [`Store`](super::Store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// When a commit counts as done (default [`Synchronous::Full`]).
    pub synchronous: Synchronous,
    /// Read-only connections for queries (default 4); on SQLite writes always use one
    /// connection; on PostgreSQL reads and writes share one pool of this many plus one.
    pub read_connections: u32,
    /// How long a statement waits for a lock held by another connection before failing
    /// (default 5 s): SQLite's `busy_timeout`, PostgreSQL's `lock_timeout`.
    pub busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            read_connections: 4,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// The durability settings in force, as the database reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Durability {
    /// The database: `sqlite` or `postgres`.
    pub(crate) backend: String,
    /// SQLite: `PRAGMA journal_mode`, `wal` for a file, `memory` for an in-memory database.
    /// PostgreSQL: always `wal` (it always writes ahead to its log).
    pub(crate) journal_mode: String,
    /// SQLite: `PRAGMA synchronous` of the write connection, `full`, `normal`, `off` or
    /// `extra`. PostgreSQL: `SHOW synchronous_commit` of a write connection (`on`: a commit
    /// waits for its log to reach the disk; `off` for [`Synchronous::Normal`] and
    /// [`Synchronous::Off`]).
    pub(crate) synchronous: String,
    /// Whether the database syncs to the disk at all. SQLite: `off` when `synchronous` is
    /// `off`, `on` otherwise. PostgreSQL: `SHOW fsync`, a server setting (`off` only on test
    /// and throwaway servers: a crash of the machine can then corrupt the database).
    pub(crate) fsync: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synchronous_parses() {
        assert_eq!("NORMAL".parse(), Ok(Synchronous::Normal));
        assert_eq!(Synchronous::default(), Synchronous::Full);
        assert!("fast".parse::<Synchronous>().is_err());
    }
}
