//! Everything that is specific to SQLite, in one place: the connection settings (WAL,
//! `synchronous`, busy timeout, foreign keys, set by `PRAGMA`s on each new connection), the
//! one write connection beside the read pool and the checkpoint task's (`checkpoint`), how a write transaction starts, the placeholders
//! of generated SQL, the `PRAGMA` read-back, and the migrations in `migrations/sqlite/`.
//!
//! The connections are sqlx `Any` connections (see `database`), opened from a `sqlite:` URL:
//! the `Any` driver takes only a URL, so the settings `SqliteConnectOptions` would carry are
//! `PRAGMA`s run after each connect instead.

use std::path::Path;
use std::time::Duration;

use sqlx::Executor;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnectionMetadata;

use super::checkpoint::{self, Checkpoints};
use super::error::StoreError;
use super::options::{Durability, StoreOptions};
use super::pool::{DbPool, Pools};

/// How a write transaction begins: `BEGIN IMMEDIATE` takes the write lock at once (waiting up
/// to the busy timeout), so a transaction that reads before it writes cannot fail with
/// `SQLITE_BUSY` when it upgrades.
pub(super) const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// Appends the placeholder of the `n`th (1-based) bound value to generated SQL: an anonymous
/// `?`, because SQLite looks numbered (`$n`, `?n`) parameters up by a linear scan, which makes
/// binding a multi-row insert of thousands of values quadratic (measured: 4x slower at 256
/// rows).
pub(super) fn push_placeholder(sql: &mut String, _n: usize) {
    sql.push('?');
}

/// The schema migrations in `bridge/migrations/sqlite/`, embedded at build time.
pub(super) static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Whether `target` names an in-memory database.
fn is_memory(target: &str) -> bool {
    target == ":memory:" || target == "sqlite::memory:" || target.contains("mode=memory")
}

/// `path` as the path part of a `sqlite:` URL (sqlx percent-decodes it).
fn url_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            '%' => out.push_str("%25"),
            '?' => out.push_str("%3F"),
            '#' => out.push_str("%23"),
            _ => out.push(c),
        }
    }
    out
}

/// `url` with its `mode=` parameter set to `mode` (`rwc`, `ro`).
fn with_mode(url: &str, mode: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("mode="))
        .collect();
    let mode = format!("mode={mode}");
    params.push(&mode);
    format!("{base}?{}", params.join("&"))
}

/// Parses `target` (a file path, `:memory:`, or a `sqlite:` URL) into the `sqlite:` URL to
/// connect to, creating the file's directory if needed.
fn parse_target(target: &str) -> Result<String, StoreError> {
    let unsupported = || StoreError::UnsupportedTarget(target.to_owned());
    if target.is_empty() {
        return Err(unsupported());
    }
    if is_memory(target) && !target.starts_with("sqlite:") {
        return Ok("sqlite::memory:".to_owned());
    }
    if target.starts_with("sqlite:") {
        // Checked here, so that a bad URL is an `Open` error naming it.
        <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(target).map_err(
            |source| StoreError::Open {
                target: target.to_owned(),
                source,
            },
        )?;
        return Ok(target.to_owned());
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
    Ok(format!("sqlite://{}", url_path(target)))
}

/// The `PRAGMA`s every connection runs once, after it connects. WAL: readers and the writer do
/// not block each other, a commit is one append (and one fsync with `synchronous = FULL`) to
/// the log instead of two syncs of a rollback journal; the setting is stored in the file, so
/// only the write connection sets it (and an in-memory database keeps `memory`).
fn pragmas(options: &StoreOptions, write: bool, memory: bool) -> String {
    let mut sql = format!(
        "PRAGMA busy_timeout = {}; PRAGMA foreign_keys = ON;",
        options.busy_timeout.as_millis()
    );
    if write {
        if !memory {
            sql.push_str(" PRAGMA journal_mode = WAL;");
            // The checkpoint task copies the log meanwhile; this is its backstop.
            sql.push_str(&format!(
                " PRAGMA wal_autocheckpoint = {};",
                checkpoint::WRITER_PAGES
            ));
        }
        sql.push_str(&format!(
            " PRAGMA synchronous = {};",
            options.synchronous.as_str().to_ascii_uppercase()
        ));
    }
    sql
}

/// Pool options that run `pragmas` on each new connection.
fn with_pragmas(pool: AnyPoolOptions, pragmas: String) -> AnyPoolOptions {
    pool.after_connect(move |conn, _: PoolConnectionMetadata| {
        let pragmas = pragmas.clone();
        Box::pin(async move {
            conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(pragmas)))
                .await
                .map(drop)
        })
    })
}

/// Opens the pools for `target` and runs the migrations: one write connection (SQLite has one
/// writer at a time, so writes queue here, in the process, instead of spinning on the file
/// lock) and read-only connections (in WAL mode readers never wait for the writer; for an
/// in-memory database the read pool is the write pool, a second connection would see another
/// database).
pub(super) async fn connect(target: &str, options: &StoreOptions) -> Result<Pools, StoreError> {
    let open_error = |source| StoreError::Open {
        target: target.to_owned(),
        source,
    };
    let memory = is_memory(target);
    let url = parse_target(target)?;
    let write_url = if memory {
        url.clone()
    } else {
        with_mode(&url, "rwc")
    };
    let write_options: AnyConnectOptions = write_url.parse().map_err(open_error)?;
    // Kept open: an in-memory database lives only as long as one is open, and a file's WAL
    // index stays warm.
    let write = with_pragmas(one_kept_connection(), pragmas(options, true, memory))
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(write_options)
        .await
        .map_err(open_error)?;
    MIGRATOR.run(&write).await?;
    let read = if memory {
        write.clone()
    } else {
        let read_options: AnyConnectOptions = with_mode(&url, "ro").parse().map_err(open_error)?;
        with_pragmas(AnyPoolOptions::new(), pragmas(options, false, memory))
            .max_connections(options.read_connections.max(1))
            .min_connections(0)
            .max_lifetime(None)
            .test_before_acquire(false)
            .connect_lazy_with(read_options)
    };
    Ok(Pools { write, read })
}

/// Starts the checkpoint task of the database `target` (see `checkpoint`), on a connection
/// of its own; `None` for an in-memory database (no log to checkpoint).
///
/// # Errors
/// [`StoreError::Open`] if its connection cannot be opened.
pub(super) async fn checkpoints(target: &str) -> Result<Option<Checkpoints>, StoreError> {
    if is_memory(target) {
        return Ok(None);
    }
    let open_error = |source| StoreError::Open {
        target: target.to_owned(),
        source,
    };
    let url = with_mode(&parse_target(target)?, "rw");
    let options: AnyConnectOptions = url.parse().map_err(open_error)?;
    let pool = one_kept_connection()
        .connect_with(options)
        .await
        .map_err(open_error)?;
    Ok(Some(Checkpoints::start(pool)))
}

/// A pool of one connection, opened at once and kept for the store's life (the write
/// connection, the checkpoint task's).
fn one_kept_connection() -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
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
        backend: "sqlite".to_owned(),
        journal_mode: journal_mode.to_ascii_lowercase(),
        synchronous: synchronous.to_owned(),
        fsync: if synchronous == "off" { "off" } else { "on" }.to_owned(),
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
        assert_eq!(
            parse_target("sqlite://fleetbeat.db?mode=rwc")
                .ok()
                .as_deref(),
            Some("sqlite://fleetbeat.db?mode=rwc")
        );
        assert_eq!(
            parse_target("/tmp/a?b#c%d.db").ok().as_deref(),
            Some("sqlite:///tmp/a%3Fb%23c%25d.db")
        );
        assert_eq!(with_mode("sqlite://a.db", "ro"), "sqlite://a.db?mode=ro");
        assert_eq!(
            with_mode("sqlite://a.db?mode=rwc&cache=private", "ro"),
            "sqlite://a.db?cache=private&mode=ro"
        );
    }
}
