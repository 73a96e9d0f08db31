//! What every part of the store shares and neither backend owns: the database type of every
//! query (sqlx's `Any`), the pool and transaction types, the [`Pools`] a backend's `connect`
//! returns, and how a store URL is shown without its password. Depends on nothing else in
//! the store, so that `database` (the handle) and the backends (`sqlite`, `postgres`) can
//! both use it without importing each other.

/// The database type of every query: sqlx's `Any`, which forwards to the backend.
pub(super) type Db = sqlx::Any;
/// A pool of connections.
pub(super) type DbPool = sqlx::AnyPool;
/// A transaction.
pub(super) type DbTx = sqlx::Transaction<'static, Db>;
/// A connection (what a transaction's statements run on).
pub(super) type DbConn = sqlx::AnyConnection;

/// The pools of an open store, as a backend's `connect` returns them.
pub(super) struct Pools {
    /// Where writes go.
    pub(super) write: DbPool,
    /// Where reads go (the write pool itself where a second pool would not help).
    pub(super) read: DbPool,
}

/// `target` without a password, for the log and error messages.
pub(super) fn redacted(target: &str) -> String {
    match url::Url::parse(target) {
        Ok(mut url) if url.password().is_some() => {
            // Cannot fail on a URL that has a password (it has a host).
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => target.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn a_store_url_is_shown_without_its_password() {
        let shown = redacted("postgres://fleet:s3cret@db.internal:5432/fleetbeat");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("fleet:***@db.internal:5432/fleetbeat"),
            "{shown}"
        );
        assert_eq!(redacted("/var/lib/fleetbeat.db"), "/var/lib/fleetbeat.db");
        assert_eq!(
            redacted("postgres://fleet@db/fleetbeat"),
            "postgres://fleet@db/fleetbeat"
        );
    }
}
