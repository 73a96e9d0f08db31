//! Everything that is specific to PostgreSQL, in one place: the connection settings
//! (`synchronous_commit`, `lock_timeout`), the pool, how a write transaction starts, the
//! placeholders of generated SQL, the one-assigner lock, the `SHOW` read-back, which errors
//! mean the server is out of reach, and the migrations in `migrations/postgres/`.
//!
//! # Several bridges on one database
//! Every write is a transaction (`BEGIN`, read committed). Where a transaction reads a row and
//! then writes what it decided from it (`Store::record_event`, `Store::assign`), the read is
//! `SELECT ... FOR UPDATE` (`Backend::for_update`): a second bridge handling the same order
//! waits for the first to commit, then reads what it committed. A delivery event two bridges
//! record at once is inserted once: the unique index `delivery_events_dedupe` makes the second
//! `INSERT ... ON CONFLICT DO NOTHING` wait for the first and then do nothing (a duplicate,
//! nothing queued). Assignment is one at a time for the cluster: the assigning transaction
//! first takes the transaction-scoped advisory lock [`ASSIGNER_LOCK`] with
//! `pg_advisory_xact_lock` (waiting for another bridge's short assignment to commit), released
//! when the transaction ends. Before that, a bridge offers an order to vehicles only after it
//! claimed the order's offer (`Store::claim_offer`, the `order_offers` table): two bridges
//! never offer one order at once. Beneath that, the unique index `orders_open_by_vehicle`
//! refuses a second undelivered order for a vehicle whatever happens.

use std::time::Duration;

use sqlx::Executor;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnectionMetadata;

use super::error::StoreError;
use super::options::{Durability, StoreOptions, Synchronous};
use super::pool::{DbPool, DbTx, Pools, redacted};

/// How a write transaction begins: a plain `BEGIN`. Read-then-write transactions lock the rows
/// they read (`FOR UPDATE`), see the module doc.
pub(super) const BEGIN_WRITE: &str = "BEGIN";

/// The key of the advisory lock the assigning transaction holds: one assigner for all the
/// bridges on a database (the ASCII of `fleetbe1`).
pub(super) const ASSIGNER_LOCK: i64 = 0x666c_6565_7462_6531;

/// The first key of the advisory locks that let one transaction at a time count and add a
/// fleet's custom fences (the ASCII of `gfen`); the second is the fleet's `hashtext` (two
/// fleets with the same hash only wait for each other).
pub(super) const FENCE_LOCK: i32 = 0x6766_656e;

/// Appends the placeholder of the `n`th (1-based) bound value to generated SQL: `$n`.
pub(super) fn push_placeholder(sql: &mut String, n: usize) {
    sql.push('$');
    sql.push_str(&n.to_string());
}

/// The schema migrations in `bridge/migrations/postgres/`, embedded at build time.
pub(super) static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// The settings every connection takes once, after it connects.
fn settings(options: &StoreOptions) -> String {
    let commit = match options.synchronous {
        Synchronous::Full => "on",
        Synchronous::Normal | Synchronous::Off => "off",
    };
    format!(
        "SET synchronous_commit = {commit}; SET lock_timeout = {};",
        options.busy_timeout.as_millis()
    )
}

/// Opens the pool for `target` (a `postgres://` or `postgresql://` URL) and runs the
/// migrations. Reads and writes share one pool: the server runs them concurrently.
pub(super) async fn connect(target: &str, options: &StoreOptions) -> Result<Pools, StoreError> {
    let open_error = |source| StoreError::Open {
        target: redacted(target),
        source,
    };
    let connect_options: AnyConnectOptions = target.parse().map_err(open_error)?;
    let settings = settings(options);
    let pool = AnyPoolOptions::new()
        .after_connect(move |conn, _: PoolConnectionMetadata| {
            let settings = settings.clone();
            Box::pin(async move {
                conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(settings)))
                    .await
                    .map(drop)
            })
        })
        .max_connections(options.read_connections.max(1) + 1)
        .min_connections(1)
        // While the server is out of reach a write fails after this (an outage, retried by
        // its caller) instead of hanging.
        .acquire_timeout(options.busy_timeout.max(Duration::from_secs(5)))
        .connect_with(connect_options)
        .await
        .map_err(open_error)?;
    MIGRATOR.run(&pool).await?;
    Ok(Pools {
        write: pool.clone(),
        read: pool,
    })
}

/// Takes the assigner lock ([`ASSIGNER_LOCK`]) for the rest of `tx`, waiting (up to the
/// connection's `lock_timeout`) while another transaction (another bridge) holds it:
/// assignments on one database happen one at a time, and each is short (no network round trip
/// to a vehicle inside it: the offer is claimed per order beforehand, see
/// `Store::claim_offer`).
///
/// # Errors
/// [`StoreError::Database`] if the query fails or the lock wait times out.
pub(super) async fn assigner_lock(tx: &mut DbTx) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ASSIGNER_LOCK)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Takes the lock of `fleet`'s custom fences ([`FENCE_LOCK`]) for the rest of `tx`, waiting
/// (up to the connection's `lock_timeout`) while another transaction (another bridge) holds
/// it: the count a new fence is checked against cannot change before `tx` ends.
///
/// # Errors
/// [`StoreError::Database`] if the query fails or the lock wait times out.
pub(super) async fn fence_lock(tx: &mut DbTx, fleet: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(FENCE_LOCK)
        .bind(fleet)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Whether another transaction holds the assigner lock now, without waiting (for tests).
#[cfg(test)]
pub(super) async fn try_assigner_lock(tx: &mut DbTx) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(ASSIGNER_LOCK)
        .fetch_one(&mut **tx)
        .await?)
}

/// Reads back the settings that decide durability, on a write connection.
pub(super) async fn durability(write: &DbPool) -> Result<Durability, StoreError> {
    let mut conn = write.acquire().await?;
    let synchronous: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut *conn)
        .await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync")
        .fetch_one(&mut *conn)
        .await?;
    Ok(Durability {
        backend: "postgres".to_owned(),
        journal_mode: "wal".to_owned(),
        synchronous,
        fsync,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered() {
        let mut sql = String::new();
        push_placeholder(&mut sql, 1);
        sql.push_str(", ");
        push_placeholder(&mut sql, 12);
        assert_eq!(sql, "$1, $12");
    }
}
