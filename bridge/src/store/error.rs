//! Errors of the store.

use std::path::PathBuf;
use std::sync::Arc;

use shared::{OrderId, VehicleId};
use thiserror::Error;

use crate::domain::order::OrderState;

/// Why a store operation failed.
///
/// The variants a caller branches on ([`OrderConflict`](Self::OrderConflict),
/// [`UnknownOrder`](Self::UnknownOrder), [`OrderUnderway`](Self::OrderUnderway),
/// [`OrderTaken`](Self::OrderTaken), [`VehicleBusy`](Self::VehicleBusy)) are answers to the request; the others mean the
/// database did not do what was asked, and nothing of the operation was committed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The target is neither a file path, `:memory:`, a `sqlite:` URL nor a `postgres://` URL.
    #[error(
        "unsupported store {0:?}: expected a file path, :memory:, a sqlite: URL or a \
         postgres:// URL"
    )]
    UnsupportedTarget(String),
    /// The directory that should hold the database file could not be created.
    #[error("cannot create the store directory {path:?}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or configured.
    #[error("cannot open the store {target:?}: {source}")]
    Open {
        /// The path or URL as given (a password in it replaced by `***`).
        target: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// A schema migration failed, or the database was written by a newer bridge (it has a
    /// migration this build does not know).
    #[error("store schema migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed: I/O error, disk full, lock timeout, connection lost.
    #[error("store query failed: {0}")]
    Database(#[from] sqlx::Error),
    /// An order with this id exists, with other content than the one to create.
    #[error("order {order} already exists with different content")]
    OrderConflict {
        /// The order id.
        order: OrderId,
    },
    /// There is no order with this id.
    #[error("unknown order {0}")]
    UnknownOrder(OrderId),
    /// The order was picked up or delivered already: it cannot be (re)assigned.
    #[error("order {order} is {state} already")]
    OrderUnderway {
        /// The order id.
        order: OrderId,
        /// Its current state.
        state: OrderState,
    },
    /// The order is assigned to another vehicle already: it is taken back first (which tells
    /// that vehicle), never moved behind its back.
    #[error("order {order} is assigned to {vehicle} already")]
    OrderTaken {
        /// The order id.
        order: OrderId,
        /// The vehicle that holds it.
        vehicle: VehicleId,
    },
    /// The vehicle already holds another undelivered order.
    #[error("vehicle {vehicle} is busy with order {order}")]
    VehicleBusy {
        /// The vehicle asked for.
        vehicle: VehicleId,
        /// The order it holds.
        order: OrderId,
    },
    /// A stored value cannot be read back (an invalid id, an unknown state, bad JSON).
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// The transaction of a group of delivery events could not begin (see `store::group`):
    /// nothing of this event was recorded. The cause is shared by the events of the group.
    #[error("{0}")]
    Group(Arc<StoreError>),
    /// A delivery event was not recorded, for a reason of the group commit rather than of the
    /// database (see `store::group`): the store's committer stopped before it answered, or
    /// another bridge recorded one of the group's events between the group's read and its
    /// write. Nothing of it was committed; the same write may succeed when tried again.
    #[error("delivery event not recorded: {0}; try again")]
    NotRecorded(&'static str),
}

impl StoreError {
    /// Whether the store itself failed (locked, full, read-only, an I/O error, a connection
    /// lost, a damaged file, a PostgreSQL server shut down or out of reach) rather than
    /// refused this data (a constraint, a value it cannot hold or read back): the same write
    /// may succeed later, so a caller that must not lose it retries, and the store counts as
    /// unwritable meanwhile.
    pub fn is_outage(&self) -> bool {
        match self {
            Self::Directory { .. } | Self::Open { .. } | Self::NotRecorded(_) => true,
            Self::Group(cause) => cause.is_outage(),
            Self::Database(sqlx::Error::Database(db))
                if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some() =>
            {
                db.code().is_some_and(|code| is_outage_code(&code))
            }
            Self::Database(sqlx::Error::Database(db)) => {
                // SQLite's primary result codes for data it cannot take: TOOBIG, MISMATCH, RANGE.
                let primary = db
                    .code()
                    .and_then(|code| code.parse::<i32>().ok())
                    .map(|code| code & 0xff);
                db.kind() == sqlx::error::ErrorKind::Other && !matches!(primary, Some(18 | 20 | 25))
            }
            Self::Database(
                sqlx::Error::RowNotFound
                | sqlx::Error::TypeNotFound { .. }
                | sqlx::Error::ColumnIndexOutOfBounds { .. }
                | sqlx::Error::ColumnNotFound(_)
                | sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::Encode(_)
                | sqlx::Error::Decode(_)
                | sqlx::Error::InvalidArgument(_)
                | sqlx::Error::AnyDriverError(_),
            ) => false,
            Self::Database(_) => true,
            Self::UnsupportedTarget(_)
            | Self::Migrate(_)
            | Self::OrderConflict { .. }
            | Self::UnknownOrder(_)
            | Self::OrderUnderway { .. }
            | Self::OrderTaken { .. }
            | Self::VehicleBusy { .. }
            | Self::Corrupt(_) => false,
        }
    }

    /// A [`StoreError::Corrupt`] for column `what` holding `value`.
    pub(super) fn corrupt(what: &str, value: &str, cause: impl std::fmt::Display) -> Self {
        Self::Corrupt(format!("{what} {value:?}: {cause}"))
    }
}

/// Whether a PostgreSQL error with SQLSTATE `code` means the server cannot serve now (the
/// same statement may succeed later) rather than that it refused the data: connection
/// exceptions (`08`), transaction rollbacks (`40`: serialization failure, deadlock),
/// insufficient resources (`53`: disk full, too many connections), lock not available and
/// objects in use (`55`), operator intervention (`57`: `57P01` admin shutdown, cancelled
/// queries), system errors (`58`), internal errors (`XX`), and a read-only (standby) server
/// (`25006`). Constraint violations (`23`), data exceptions (`22`) and the rest are refusals.
fn is_outage_code(code: &str) -> bool {
    matches!(
        code.get(..2),
        Some("08" | "40" | "53" | "55" | "57" | "58" | "XX")
    ) || code == "25006"
}

#[cfg(test)]
mod tests {
    use testengines::postgres::TempPostgres;

    use super::is_outage_code;

    #[test]
    fn classifies_sqlstates() {
        for code in [
            "57P01", "08006", "08001", "53100", "55P03", "40001", "XX000", "25006",
        ] {
            assert!(is_outage_code(code), "{code}");
        }
        for code in ["23505", "23503", "23514", "22003", "22P02", "42601"] {
            assert!(!is_outage_code(code), "{code}");
        }
    }

    use super::*;
    use crate::store::{Store, StoreOptions};

    /// Against a real PostgreSQL server: constraint violations are refused data; a server
    /// that was shut down is an outage (`57P01`, a lost connection, a refused one), and the
    /// store writes again once the server is back.
    #[tokio::test]
    async fn postgres_outages_and_refusals() {
        let server = TempPostgres::start().expect("starts");
        let url = server.create_database("outage").expect("creates");
        let store = Store::open(&url, StoreOptions::default())
            .await
            .expect("opens");
        store.probe_write().await.expect("writes");

        let check = sqlx::query("INSERT INTO store_probe (id, written_ms) VALUES (2, 0)")
            .execute(&store.write)
            .await
            .map_err(StoreError::from)
            .expect_err("check constraint");
        assert!(!check.is_outage(), "{check}");
        let unique = sqlx::query("INSERT INTO store_probe (id, written_ms) VALUES (1, 0)")
            .execute(&store.write)
            .await
            .map_err(StoreError::from)
            .expect_err("primary key");
        assert!(!unique.is_outage(), "{unique}");

        server.stop().expect("stops");
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let err = store.probe_write().await.expect_err("server down");
            assert!(err.is_outage(), "{err:?}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(15),
                "{err:?}"
            );
        }
        server.restart().expect("restarts");
        let mut back = false;
        for _ in 0..50 {
            if store.probe_write().await.is_ok() {
                back = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(back, "the store writes again once the server is back");
        store.close().await;
    }
}
