//! The bridge's durable storage: orders, delivery events, the per-client message queue and the
//! heartbeat history, in SQLite through `sqlx`.
//!
//! Every write that must survive a crash is one transaction, committed with the database in
//! WAL mode and `synchronous = FULL`: when a method returns `Ok`, the data is on disk and
//! survives `kill -9` and a power loss. Only then may the caller acknowledge the input (the
//! MQTT PUBACK of a delivery event) or emit the output (a queued message).
//!
//! # Layout
//! - [`Store`]: opening (migrations run at open), closing, the durability read-back.
//! - `order`: orders, their assignment to vehicles, and [`Store::record_event`], which
//!   records a delivery event exactly once, moves its order on and queues its messages, in one
//!   transaction.
//! - `queue`: the durable per-client message queue ([`Store::pending`], [`Store::ack`],
//!   [`Store::expire`]).
//! - `track`: the heartbeat history ([`Store::record_heartbeats`], [`Store::track`]).
//! - `writer`: [`HeartbeatWriter`], a task that batches heartbeats off the MQTT path.
//! - `sqlite`: everything specific to SQLite. The queries elsewhere are portable SQL with
//!   `$N` placeholders, meant to run unchanged on PostgreSQL for several bridges.
//! - [`StoreError`]: what can go wrong.
//!
//! The schema lives in `bridge/migrations/`.

mod error;
mod order;
mod queue;
mod sqlite;
mod track;
mod writer;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::info;

pub use error::StoreError;
pub use order::{
    CreatedOrder, EventFlag, NewOrder, OrderState, OrderView, Recorded, TimelineEntry, TimelineKind,
};
pub use queue::{ClientId, Enqueued, MessageId, QueuedMessage};
pub use track::HeartbeatRow;
pub use writer::{HeartbeatSender, HeartbeatWriter, HeartbeatWriterOptions, WriterCounters};

use sqlite::{DbPool, DbTx};

/// When a commit counts as done: SQLite's `synchronous` setting (in WAL mode).
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

/// How to open a [`Store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// When a commit counts as done (default [`Synchronous::Full`]).
    pub synchronous: Synchronous,
    /// Read-only connections for queries (default 4); writes always use one connection.
    pub read_connections: u32,
    /// How long a statement waits for a lock held by another connection before failing
    /// (default 5 s).
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
pub struct Durability {
    /// `PRAGMA journal_mode`: `wal` for a file, `memory` for an in-memory database.
    pub journal_mode: String,
    /// `PRAGMA synchronous` of the write connection: `full`, `normal`, `off` or `extra`.
    pub synchronous: String,
}

/// The bridge's durable storage. Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct Store {
    write: DbPool,
    read: DbPool,
    target: Arc<str>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating it if needed) the database at `target` and brings its schema up to
    /// date. `target` is a file path (its directory is created if missing), `:memory:` (a
    /// database that lives as long as the store, for tests), or a `sqlite:` URL.
    ///
    /// # Errors
    /// [`StoreError::UnsupportedTarget`] for anything else (e.g. a `postgres://` URL),
    /// [`StoreError::Directory`] or [`StoreError::Open`] if the file cannot be opened,
    /// [`StoreError::Migrate`] if the schema cannot be brought up to date, including a
    /// database written by a newer bridge.
    pub async fn open(target: &str, options: StoreOptions) -> Result<Self, StoreError> {
        let pools = sqlite::connect(target, &options).await?;
        let store = Self {
            write: pools.write,
            read: pools.read,
            target: target.into(),
        };
        let durability = store.durability().await?;
        info!(
            store = %target,
            journal_mode = %durability.journal_mode,
            synchronous = %durability.synchronous,
            "store opened"
        );
        Ok(store)
    }

    /// Closes every connection, after waiting for the operations under way. SQLite then
    /// checkpoints the write-ahead log into the database file. Operations after this fail.
    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
        info!(store = %self.target, "store closed");
    }

    /// The durability settings in force, read back from the database (`PRAGMA`s).
    ///
    /// # Errors
    /// [`StoreError::Database`] if the database cannot be queried.
    pub async fn durability(&self) -> Result<Durability, StoreError> {
        sqlite::durability(&self.write).await
    }

    /// Begins a write transaction (see [`sqlite::BEGIN_WRITE`]).
    async fn begin_write(&self) -> Result<DbTx, StoreError> {
        Ok(self.write.begin_with(sqlite::BEGIN_WRITE).await?)
    }
}

/// The wall clock in milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A `u64` as stored (SQL integers are signed 64-bit): values past `i64::MAX` saturate, so
/// order is kept.
fn to_db(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A stored integer back as `u64` (negative values, which the store never writes, read as 0).
fn from_db(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Parses an identifier read from column `what`.
fn parse_id<T: FromStr>(what: &str, value: &str) -> Result<T, StoreError>
where
    T::Err: fmt::Display,
{
    value
        .parse()
        .map_err(|cause| StoreError::corrupt(what, value, cause))
}

/// Converts a stored integer into a narrower type, or reports which column held it.
fn narrow<T: TryFrom<i64>>(what: &str, value: i64) -> Result<T, StoreError> {
    T::try_from(value).map_err(|_| StoreError::corrupt(what, &value.to_string(), "out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opens_in_memory() {
        let store = Store::open(":memory:", StoreOptions::default())
            .await
            .expect("opens");
        let durability = store.durability().await.expect("pragmas");
        assert_eq!(durability.journal_mode, "memory");
        store.close().await;
    }

    #[tokio::test]
    async fn refuses_other_databases() {
        let err = Store::open("postgres://localhost/fleetbeat", StoreOptions::default())
            .await
            .expect_err("not sqlite");
        assert!(matches!(err, StoreError::UnsupportedTarget(_)), "{err}");
    }

    /// A durable store is WAL with synchronous = FULL, and both are in force again after the
    /// file is reopened; NORMAL is honoured when asked for.
    #[tokio::test]
    async fn durability_settings_hold_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/fleetbeat.db");
        let path = path.to_str().expect("utf-8 path");
        let store = Store::open(path, StoreOptions::default())
            .await
            .expect("opens");
        store
            .enqueue(&ClientId::dispatch(), &serde_json::json!({"n": 1}))
            .await
            .expect("enqueues");
        // No close: as if the process was killed after the commit.
        drop(store);

        let store = Store::open(path, StoreOptions::default())
            .await
            .expect("reopens");
        assert_eq!(
            store.durability().await.expect("pragmas"),
            Durability {
                journal_mode: "wal".into(),
                synchronous: "full".into(),
            }
        );
        // Also on a plain connection of our own: WAL is a property of the file.
        let mut conn =
            <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!("sqlite://{path}"))
                .await
                .expect("connects");
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut conn)
            .await
            .expect("pragma");
        assert_eq!(mode, "wal");
        let pending = store.pending(&ClientId::dispatch()).await.expect("pending");
        assert_eq!(pending.len(), 1);
        store.close().await;

        let options = StoreOptions {
            synchronous: Synchronous::Normal,
            ..StoreOptions::default()
        };
        let store = Store::open(path, options).await.expect("reopens");
        assert_eq!(
            store.durability().await.expect("pragmas").synchronous,
            "normal"
        );
        store.close().await;
    }

    /// The hot queries are index range scans, not table scans.
    #[tokio::test]
    async fn queries_use_their_indexes() {
        let store = Store::open(":memory:", StoreOptions::default())
            .await
            .expect("opens");
        for (query, index) in [
            (
                "SELECT * FROM heartbeats WHERE vehicle = 'v' AND ts_ms >= 1 AND ts_ms <= 2 \
                 ORDER BY ts_ms, id LIMIT 10",
                "heartbeats_track",
            ),
            (
                "SELECT id FROM heartbeats WHERE ts_ms < 5 ORDER BY ts_ms LIMIT 10",
                "heartbeats_by_age",
            ),
            (
                "SELECT id, payload FROM queue WHERE client = 'c' ORDER BY id",
                "queue_by_client",
            ),
            (
                "SELECT vehicle FROM orders \
                 WHERE fleet = 'f' AND vehicle IS NOT NULL AND state <> 'delivered'",
                "orders_open_by_vehicle",
            ),
            (
                "SELECT order_id FROM orders \
                 WHERE vehicle = 'v' AND state <> 'delivered' AND order_id <> 'o'",
                "orders_open_by_vehicle",
            ),
            (
                "SELECT * FROM delivery_events WHERE order_id = 'o' ORDER BY ts_ms, id",
                "delivery_events_by_order",
            ),
        ] {
            let plan: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {query}")))
                    .fetch_all(&store.read)
                    .await
                    .expect("plans");
            let plan: Vec<String> = plan.into_iter().map(|row| row.3).collect();
            assert!(
                plan.iter().any(|step| step.contains(index)),
                "{query}: {plan:?}"
            );
            assert!(
                !plan.iter().any(|step| step.contains("TEMP B-TREE")),
                "{query} sorts: {plan:?}"
            );
        }
    }

    #[test]
    fn synchronous_parses() {
        assert_eq!("NORMAL".parse(), Ok(Synchronous::Normal));
        assert_eq!(Synchronous::default(), Synchronous::Full);
        assert!("fast".parse::<Synchronous>().is_err());
    }
}
