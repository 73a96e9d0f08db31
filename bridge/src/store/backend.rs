//! The database a store runs on ([`Backend`]: the few things SQLite and PostgreSQL do
//! differently in the SQL the store generates) and the conversions between Rust and SQL values
//! every query shares. Below every other store module: it knows no store.

use std::fmt;
use std::str::FromStr;

use super::error::StoreError;
use super::{postgres, sqlite};

/// The database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// A SQLite file (or an in-memory database): one bridge.
    Sqlite,
    /// A PostgreSQL server: one or several bridges.
    Postgres,
}

impl Backend {
    /// `sqlite` or `postgres`.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }

    /// The statement that begins a write transaction ([`sqlite::BEGIN_WRITE`],
    /// [`postgres::BEGIN_WRITE`]).
    pub(super) const fn begin_write(self) -> &'static str {
        match self {
            Self::Sqlite => sqlite::BEGIN_WRITE,
            Self::Postgres => postgres::BEGIN_WRITE,
        }
    }

    /// The statement that begins a read transaction whose queries all see one snapshot:
    /// `BEGIN` on SQLite (a read transaction there is a snapshot), `BEGIN ISOLATION LEVEL
    /// REPEATABLE READ READ ONLY` on PostgreSQL (read committed takes a snapshot per
    /// statement).
    pub(super) const fn begin_read(self) -> &'static str {
        match self {
            Self::Sqlite => "BEGIN",
            Self::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        }
    }

    /// What ends a `SELECT` that reads a row the transaction then changes: `FOR UPDATE` on
    /// PostgreSQL, which locks the row until the transaction ends, so that a second bridge
    /// handling the same order waits and then reads what the first committed; nothing on
    /// SQLite (which rejects it), whose write transactions already exclude each other.
    pub(super) const fn for_update(self) -> &'static str {
        match self {
            Self::Sqlite => "",
            Self::Postgres => " FOR UPDATE",
        }
    }

    /// Appends the placeholder of the `n`th (1-based) bound value to generated SQL
    /// ([`sqlite::push_placeholder`], [`postgres::push_placeholder`]).
    pub(super) fn push_placeholder(self, sql: &mut String, n: usize) {
        match self {
            Self::Sqlite => sqlite::push_placeholder(sql, n),
            Self::Postgres => postgres::push_placeholder(sql, n),
        }
    }

    /// Appends `(?, ?, ...), (?, ?, ...)`: `rows` rows of `columns` placeholders each, for a
    /// multi-row `VALUES` (or, one row, an `IN` list).
    pub(super) fn push_rows(self, sql: &mut String, rows: usize, columns: usize) {
        for row in 0..rows {
            sql.push_str(if row == 0 { "(" } else { ", (" });
            for column in 0..columns {
                if column > 0 {
                    sql.push_str(", ");
                }
                self.push_placeholder(sql, row * columns + column + 1);
            }
            sql.push(')');
        }
    }

    /// Appends `(a = ? AND b = ?) OR (a = ? AND b = ?) ...`: a condition that matches any of
    /// `rows` rows on `columns`, their values bound row after row, in the columns' order.
    pub(super) fn push_any_of(self, sql: &mut String, rows: usize, columns: &[&str]) {
        for row in 0..rows {
            sql.push_str(if row == 0 { "(" } else { " OR (" });
            for (i, column) in columns.iter().enumerate() {
                if i > 0 {
                    sql.push_str(" AND ");
                }
                sql.push_str(column);
                sql.push_str(" = ");
                self.push_placeholder(sql, row * columns.len() + i + 1);
            }
            sql.push(')');
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
