//! The [`Store`] handle: opening (migrations run at open), closing, the durability
//! read-back, and the conversions between Rust and SQL values every query shares.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use tracing::info;

use super::error::StoreError;
use super::options::{Durability, StoreOptions};
use super::sqlite::{self, DbPool, DbTx};

/// The bridge's durable storage. Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct Store {
    pub(super) write: DbPool,
    pub(super) read: DbPool,
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
    pub(crate) async fn durability(&self) -> Result<Durability, StoreError> {
        sqlite::durability(&self.write).await
    }

    /// Rewrites the one row of `store_probe` and commits: whether the store can write now.
    /// Used while writes are failing and nothing else is written.
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    pub(crate) async fn probe_write(&self) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO store_probe (id, written_ms) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET written_ms = excluded.written_ms",
        )
        .bind(to_db(crate::clock::now_ms()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Begins a write transaction (see [`sqlite::BEGIN_WRITE`]).
    pub(super) async fn begin_write(&self) -> Result<DbTx, StoreError> {
        Ok(self.write.begin_with(sqlite::BEGIN_WRITE).await?)
    }
}

/// A `u64` as stored (SQL integers are signed 64-bit): values past `i64::MAX` saturate, so
/// order is kept.
pub(super) fn to_db(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A stored integer back as `u64` (negative values, which the store never writes, read as 0).
pub(super) fn from_db(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Parses an identifier read from column `what`.
pub(super) fn parse_id<T: FromStr>(what: &str, value: &str) -> Result<T, StoreError>
where
    T::Err: fmt::Display,
{
    value
        .parse()
        .map_err(|cause| StoreError::corrupt(what, value, cause))
}

/// Converts a stored integer into a narrower type, or reports which column held it.
pub(super) fn narrow<T: TryFrom<i64>>(what: &str, value: i64) -> Result<T, StoreError> {
    T::try_from(value).map_err(|_| StoreError::corrupt(what, &value.to_string(), "out of range"))
}

/// A fresh in-memory store, for the unit tests.
#[cfg(test)]
pub(crate) async fn in_memory() -> Store {
    Store::open(":memory:", StoreOptions::default())
        .await
        .expect("an in-memory store opens")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ClientId, Synchronous};

    #[tokio::test]
    async fn opens_in_memory() {
        let store = in_memory().await;
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
        let store = in_memory().await;
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
}
