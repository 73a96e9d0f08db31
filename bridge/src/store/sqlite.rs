//! Everything that is specific to SQLite, in one place: the pool types, the connection
//! settings (WAL, `synchronous`), how a write transaction starts, and the `PRAGMA` read-back.
//!
//! The queries in the sibling modules are plain SQL with `$N` placeholders, which SQLite and
//! PostgreSQL both accept. Moving to PostgreSQL means replacing this file (`Db`, `connect`,
//! [`BEGIN_WRITE`]) and the DDL types marked "SQLite:" in the migrations, not the queries.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::error::StoreError;
use super::options::{Durability, StoreOptions, Synchronous};

/// The database the store runs on.
pub(super) type Db = sqlx::Sqlite;
/// A pool of connections to it.
pub(super) type DbPool = sqlx::Pool<Db>;
/// A transaction on it.
pub(super) type DbTx = sqlx::Transaction<'static, Db>;

/// How a write transaction begins. SQLite: `BEGIN IMMEDIATE` takes the write lock at once
/// (waiting up to the busy timeout), so a transaction that reads before it writes cannot fail
/// with `SQLITE_BUSY` when it upgrades. PostgreSQL: `BEGIN`, with `SELECT ... FOR UPDATE` on
/// the order row where a transaction reads before it writes.
pub(super) const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// Appends the placeholder of the `n`th (1-based) bound value to generated SQL. SQLite: an
/// anonymous `?`, because SQLite looks numbered (`$n`, `?n`) parameters up by a linear scan,
/// which makes binding a multi-row insert of thousands of values quadratic (measured: 4x
/// slower at 256 rows). PostgreSQL: `$n`.
pub(super) fn push_placeholder(sql: &mut String, _n: usize) {
    sql.push('?');
}

/// The schema migrations in `bridge/migrations/`, embedded at build time.
pub(super) static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The two pools of an open store.
pub(super) struct Pools {
    /// One connection: SQLite has one writer at a time, so writes queue here, in the process,
    /// instead of spinning on the file lock.
    pub write: DbPool,
    /// Read-only connections: in WAL mode readers never wait for the writer. For an in-memory
    /// database this is the write pool (a second connection would see another database).
    pub read: DbPool,
}

impl From<Synchronous> for SqliteSynchronous {
    fn from(value: Synchronous) -> Self {
        match value {
            Synchronous::Full => Self::Full,
            Synchronous::Normal => Self::Normal,
            Synchronous::Off => Self::Off,
        }
    }
}

/// Whether `target` names an in-memory database.
fn is_memory(target: &str) -> bool {
    target == ":memory:" || target == "sqlite::memory:" || target.contains("mode=memory")
}

/// Parses `target`: a file path, `:memory:`, or a `sqlite:` URL.
fn parse_target(target: &str) -> Result<SqliteConnectOptions, StoreError> {
    let unsupported = || StoreError::UnsupportedTarget(target.to_owned());
    if target.is_empty() {
        return Err(unsupported());
    }
    if is_memory(target) && !target.starts_with("sqlite:") {
        return SqliteConnectOptions::from_str("sqlite::memory:").map_err(|source| {
            StoreError::Open {
                target: target.to_owned(),
                source,
            }
        });
    }
    if target.starts_with("sqlite:") {
        return SqliteConnectOptions::from_str(target).map_err(|source| StoreError::Open {
            target: target.to_owned(),
            source,
        });
    }
    if target.contains("://") {
        return Err(unsupported());
    }
    let path = Path::new(target);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
            path: dir.to_owned(),
            source,
        })?;
    }
    Ok(SqliteConnectOptions::new().filename(path))
}

/// Opens the pools for `target` and runs the migrations.
pub(super) async fn connect(target: &str, options: &StoreOptions) -> Result<Pools, StoreError> {
    let open_error = |source| StoreError::Open {
        target: target.to_owned(),
        source,
    };
    let memory = is_memory(target);
    let base = parse_target(target)?
        .create_if_missing(true)
        .busy_timeout(options.busy_timeout)
        .foreign_keys(true);
    let write_options = if memory {
        base.clone()
    } else {
        // WAL: readers and the writer do not block each other, a commit is one append (and
        // one fsync with synchronous = FULL) to the log instead of two syncs of a rollback
        // journal. The setting is stored in the database file.
        base.clone()
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(options.synchronous.into())
    };
    let write = SqlitePoolOptions::new()
        .max_connections(1)
        // Keep the connection: an in-memory database lives only as long as one is open, and a
        // file's WAL index stays warm.
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(write_options)
        .await
        .map_err(open_error)?;
    MIGRATOR.run(&write).await?;
    let read = if memory {
        write.clone()
    } else {
        SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .min_connections(0)
            .max_lifetime(None)
            .test_before_acquire(false)
            .connect_lazy_with(base.read_only(true))
    };
    Ok(Pools { write, read })
}

/// Reads back the settings that decide durability, on the write connection.
pub(super) async fn durability(write: &DbPool) -> Result<Durability, StoreError> {
    let mut conn = write.acquire().await?;
    let journal_mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await?;
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&mut *conn)
        .await?;
    let synchronous = match synchronous {
        0 => "off",
        1 => "normal",
        2 => "full",
        3 => "extra",
        _ => "unknown",
    };
    Ok(Durability {
        journal_mode: journal_mode.to_ascii_lowercase(),
        synchronous: synchronous.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_targets() {
        assert!(is_memory(":memory:"));
        assert!(is_memory("sqlite::memory:"));
        assert!(!is_memory("data/fleetbeat.db"));
        assert!(parse_target("postgres://db/fleetbeat").is_err());
        assert!(parse_target("").is_err());
        assert!(parse_target("sqlite://fleetbeat.db?mode=rwc").is_ok());
    }
}
