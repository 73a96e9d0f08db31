//! The [`Store`] handle: opening (migrations run at open), closing, the durability
//! read-back; the [`Backend`] it runs on and the conversions between Rust and SQL values
//! are in `backend`.
//!
//! Every query goes through sqlx's `Any` driver, so it is written once; the backend, known at
//! run time, decides the few things that differ (how a write transaction begins, row locks,
//! placeholders of generated SQL), through the methods of [`Backend`].

use std::fmt;
use std::sync::{Arc, Once};

use tracing::info;

pub(super) use super::backend::{Backend, from_db, narrow, parse_id, to_db};
use super::checkpoint::Checkpoints;
use super::error::StoreError;
use super::group::{EventGroups, GroupStats};
use super::options::{Durability, StoreOptions};
pub(super) use super::pool::{Db, DbPool, DbTx, redacted};
use super::track_keys::TrackKeys;
use super::{postgres, sqlite};

/// Whether `target` names a PostgreSQL database.
fn is_postgres(target: &str) -> bool {
    target.starts_with("postgres://") || target.starts_with("postgresql://")
}

/// The bridge's durable storage. Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct Store {
    pub(super) write: DbPool,
    pub(super) read: DbPool,
    pub(super) backend: Backend,
    /// The committer of delivery events in groups (`store::group`).
    pub(super) events: Arc<EventGroups>,
    /// SQLite's checkpoint task (`store::checkpoint`); none for PostgreSQL or in memory.
    pub(super) checkpoints: Option<Arc<Checkpoints>>,
    /// The heartbeat history's track numbers in use (`store::track_keys`).
    pub(super) tracks: Arc<TrackKeys>,
    target: Arc<str>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating it if needed) the database at `target` and brings its schema up to
    /// date. `target` is a file path (its directory is created if missing), `:memory:` (a
    /// database that lives as long as the store, for tests), a `sqlite:` URL, or a
    /// `postgres://` / `postgresql://` URL (the database must exist; several bridges may
    /// share it).
    ///
    /// # Errors
    /// [`StoreError::UnsupportedTarget`] for anything else (e.g. a `mysql://` URL),
    /// [`StoreError::Directory`] or [`StoreError::Open`] if the database cannot be opened,
    /// [`StoreError::Migrate`] if the schema cannot be brought up to date, including a
    /// database written by a newer bridge.
    pub async fn open(target: &str, options: StoreOptions) -> Result<Self, StoreError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let backend = if is_postgres(target) {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let pools = match backend {
            Backend::Sqlite => sqlite::connect(target, &options).await?,
            Backend::Postgres => postgres::connect(target, &options).await?,
        };
        let checkpoints = match backend {
            Backend::Sqlite => sqlite::checkpoints(target).await?.map(Arc::new),
            Backend::Postgres => None,
        };
        let store = Self {
            write: pools.write,
            read: pools.read,
            backend,
            events: Arc::default(),
            checkpoints,
            tracks: Arc::default(),
            target: target.into(),
        };
        let durability = store.durability().await?;
        info!(
            store = %redacted(target),
            %backend,
            journal_mode = %durability.journal_mode,
            synchronous = %durability.synchronous,
            fsync = %durability.fsync,
            "store opened"
        );
        Ok(store)
    }

    /// Closes every connection, after waiting for the operations under way (the delivery
    /// events handed to the group committer are recorded and answered first). SQLite then
    /// checkpoints the write-ahead log into the database file. Operations after this fail.
    pub async fn close(&self) {
        self.events.close().await;
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.stop().await;
        }
        self.read.close().await;
        self.write.close().await;
        info!(store = %redacted(&self.target), "store closed");
    }

    /// Checkpoints that copied pages of SQLite's log into the database file off the commit
    /// path, so far (`store::checkpoint`); 0 on PostgreSQL and in memory.
    pub(crate) fn checkpoints(&self) -> u64 {
        self.checkpoints.as_ref().map_or(0, |c| c.done())
    }

    /// The durability settings in force, read back from the database (`PRAGMA`s on SQLite,
    /// `SHOW` on PostgreSQL).
    ///
    /// # Errors
    /// [`StoreError::Database`] if the database cannot be queried.
    pub(crate) async fn durability(&self) -> Result<Durability, StoreError> {
        match self.backend {
            Backend::Sqlite => sqlite::durability(&self.write).await,
            Backend::Postgres => postgres::durability(&self.write).await,
        }
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

    /// How the delivery events were committed so far: how many transactions, holding how
    /// many events (see `store::group`).
    pub fn event_groups(&self) -> GroupStats {
        self.events.stats()
    }

    /// Begins a write transaction (see [`Backend::begin_write`]).
    pub(super) async fn begin_write(&self) -> Result<DbTx, StoreError> {
        Ok(self.write.begin_with(self.backend.begin_write()).await?)
    }
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
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::testing;
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
        let err = Store::open("mysql://localhost/fleetbeat", StoreOptions::default())
            .await
            .expect_err("neither sqlite nor postgres");
        assert!(matches!(err, StoreError::UnsupportedTarget(_)), "{err}");
    }

    #[test]
    fn recognises_postgres_targets() {
        assert!(is_postgres("postgres://db/fleetbeat"));
        assert!(is_postgres("postgresql://u:p@db:5433/fleetbeat"));
        assert!(!is_postgres("data/postgres.db"));
        assert_eq!(
            redacted("postgres://fleet:secret@db/fleetbeat"),
            "postgres://fleet:***@db/fleetbeat"
        );
        assert_eq!(redacted("data/fleetbeat.db"), "data/fleetbeat.db");
    }

    /// A store written before the `Any` driver (sqlx's SQLite driver, the same migrations)
    /// opens: the migrations' checksums match, nothing is migrated again, the data is there.
    #[tokio::test]
    async fn opens_a_store_written_by_the_sqlite_driver() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.db");
        let native = sqlx::sqlite::SqlitePoolOptions::new()
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .expect("opens natively");
        sqlite::MIGRATOR.run(&native).await.expect("migrates");
        sqlx::query("INSERT INTO queue (client, payload, created_ms) VALUES ('dispatch', '7', 1)")
            .execute(&native)
            .await
            .expect("inserts");
        native.close().await;

        let store = Store::open(path.to_str().expect("utf-8"), StoreOptions::default())
            .await
            .expect("reopens through Any");
        let pending = store.pending(&ClientId::dispatch()).await.expect("pending");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].payload, serde_json::json!(7));
        store.close().await;
    }

    /// On PostgreSQL the read-back is `SHOW synchronous_commit` and `SHOW fsync`: `on` for a
    /// durable store, `off` when NORMAL is asked for; the test server runs with `fsync=off`.
    #[tokio::test]
    async fn postgres_durability_read_back() {
        let url = testing::postgres_url();
        let store = Store::open(&url, StoreOptions::default())
            .await
            .expect("opens");
        assert_eq!(store.backend, Backend::Postgres);
        assert_eq!(
            store.durability().await.expect("show"),
            Durability {
                backend: "postgres".into(),
                journal_mode: "wal".into(),
                synchronous: "on".into(),
                fsync: "off".into(),
            }
        );
        store.close().await;
        let options = StoreOptions {
            synchronous: Synchronous::Normal,
            ..StoreOptions::default()
        };
        let store = Store::open(&url, options).await.expect("reopens");
        assert_eq!(store.durability().await.expect("show").synchronous, "off");
        store.close().await;
    }

    /// The two migration sets have the same versions and descriptions, and after migrating
    /// both databases have the same tables, columns (name and nullability, in order) and
    /// indexes (name, columns in order, unique or not, partial or not).
    #[tokio::test]
    async fn migrations_are_in_step() {
        let versions = |migrator: &sqlx::migrate::Migrator| {
            migrator
                .iter()
                .map(|m| (m.version, m.description.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            versions(&sqlite::MIGRATOR),
            versions(&postgres::MIGRATOR),
            "migrations/sqlite and migrations/postgres"
        );
        let lite = in_memory().await;
        let pg = testing::postgres().await;
        let lite_schema = schema(&lite).await;
        assert!(lite_schema.0.contains_key("orders"), "{lite_schema:?}");
        let open = &lite_schema.1["orders_open_by_vehicle"];
        assert!(open.unique && open.partial, "{open:?}");
        // Schema 9: the dedupe index is keyed by time first (fewer pages per group).
        let dedupe = &lite_schema.1["delivery_events_dedupe"];
        assert_eq!(dedupe.columns, ["ts_ms", "vehicle", "seq"]);
        assert!(dedupe.unique && !dedupe.partial, "{dedupe:?}");
        assert_eq!(lite_schema, schema(&pg).await);
    }

    type Columns = Vec<(String, bool)>;

    /// A named index as both engines describe it.
    #[derive(Debug, Default, PartialEq)]
    struct Index {
        /// Its columns, in order.
        columns: Vec<String>,
        /// Whether it is `UNIQUE`.
        unique: bool,
        /// Whether it has a `WHERE` (a partial index).
        partial: bool,
    }

    /// The tables with their columns (name, NOT NULL) and the named indexes of `store`.
    async fn schema(store: &Store) -> (BTreeMap<String, Columns>, BTreeMap<String, Index>) {
        let (tables_sql, columns_sql, indexes_sql, kinds_sql) = match store.backend {
            Backend::Sqlite => (
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations'",
                // A primary key column is NOT NULL (SQLite does not say so of INTEGER ones).
                "SELECT name, CASE WHEN \"notnull\" = 1 OR pk > 0 THEN 1 ELSE 0 END \
                 FROM pragma_table_info($1) ORDER BY cid",
                "SELECT m.name, c.name FROM sqlite_master AS m, pragma_index_info(m.name) AS c \
                 WHERE m.type = 'index' AND m.sql IS NOT NULL ORDER BY m.name, c.seqno",
                "SELECT m.name, l.\"unique\", l.partial \
                 FROM sqlite_master AS m, pragma_index_list(m.tbl_name) AS l \
                 WHERE m.type = 'index' AND m.sql IS NOT NULL AND l.name = m.name",
            ),
            Backend::Postgres => (
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
                "SELECT column_name::text, CASE WHEN is_nullable = 'NO' THEN 1 ELSE 0 END \
                 FROM information_schema.columns WHERE table_schema = 'public' \
                 AND table_name = $1 ORDER BY ordinal_position",
                "SELECT c.relname::text, pg_get_indexdef(c.oid, k, true) \
                 FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid \
                 JOIN pg_namespace AS n ON n.oid = c.relnamespace, \
                 generate_series(1, i.indnatts) AS k \
                 WHERE n.nspname = 'public' AND c.relname NOT LIKE '%_pkey' \
                 ORDER BY c.relname, k",
                "SELECT c.relname::text, CASE WHEN i.indisunique THEN 1 ELSE 0 END, \
                 CASE WHEN i.indpred IS NULL THEN 0 ELSE 1 END \
                 FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid \
                 JOIN pg_namespace AS n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'public' AND c.relname NOT LIKE '%_pkey'",
            ),
        };
        let tables: Vec<String> = sqlx::query_scalar(tables_sql)
            .fetch_all(&store.read)
            .await
            .expect("tables");
        let mut columns = BTreeMap::new();
        for table in tables {
            let rows: Vec<(String, i32)> = sqlx::query_as(columns_sql)
                .bind(&table)
                .fetch_all(&store.read)
                .await
                .expect("columns");
            columns.insert(
                table,
                rows.into_iter()
                    .map(|(name, not_null)| (name, not_null == 1))
                    .collect(),
            );
        }
        let rows: Vec<(String, String)> = sqlx::query_as(indexes_sql)
            .fetch_all(&store.read)
            .await
            .expect("indexes");
        let mut indexes = BTreeMap::<String, Index>::new();
        for (index, column) in rows {
            indexes.entry(index).or_default().columns.push(column);
        }
        let kinds: Vec<(String, i32, i32)> = sqlx::query_as(kinds_sql)
            .fetch_all(&store.read)
            .await
            .expect("index kinds");
        for (index, unique, partial) in kinds {
            let index = indexes.get_mut(&index).expect("an index with columns");
            (index.unique, index.partial) = (unique == 1, partial == 1);
        }
        (columns, indexes)
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
                backend: "sqlite".into(),
                journal_mode: "wal".into(),
                synchronous: "full".into(),
                fsync: "on".into(),
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
                "SELECT * FROM heartbeats WHERE track = 7 AND ts_ms >= 1 AND ts_ms <= 2 \
                 ORDER BY ts_ms, id LIMIT 10",
                "heartbeats_track",
            ),
            (
                "SELECT id, fleet FROM tracks WHERE vehicle = 'v' ORDER BY fleet",
                "tracks_by_name",
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
                "SELECT vehicle FROM orders WHERE fleet = 'f' AND vehicle IS NOT NULL \
                 AND state NOT IN ('delivered', 'cancelled')",
                "orders_open_by_vehicle",
            ),
            (
                "SELECT order_id FROM orders WHERE vehicle = 'v' \
                 AND state NOT IN ('delivered', 'cancelled') AND order_id <> 'o'",
                "orders_open_by_vehicle",
            ),
            (
                "SELECT * FROM delivery_events WHERE order_id = 'o' ORDER BY ts_ms, id",
                "delivery_events_by_order",
            ),
            (
                "SELECT order_id, kind FROM delivery_events \
                 WHERE (vehicle = 'v' AND seq = 1 AND ts_ms = 2) \
                 OR (vehicle = 'w' AND seq = 3 AND ts_ms = 4)",
                "delivery_events_dedupe",
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
