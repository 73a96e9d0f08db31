//! Test support: a fresh, empty [`Store`] on each backend, and [`on_each_backend!`], which
//! turns one test body into a test per backend.
//!
//! PostgreSQL: each store is a new database on the test binary's shared server
//! (`testengines::postgres::TempPostgres::shared`, started on first use, stopped when the
//! process ends).

use std::sync::atomic::{AtomicU32, Ordering};

use testengines::postgres::TempPostgres;

use super::database::Db;
use super::{Store, StoreOptions};

/// A fresh in-memory SQLite store.
pub(crate) async fn sqlite() -> Store {
    super::in_memory().await
}

/// The URL of a new, empty database on the shared PostgreSQL server.
pub(crate) fn postgres_url() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!("store_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    TempPostgres::shared()
        .create_database(&name)
        .expect("a test database is created")
}

/// A fresh store on a new PostgreSQL database.
pub(crate) async fn postgres() -> Store {
    Store::open(&postgres_url(), StoreOptions::default())
        .await
        .expect("a PostgreSQL store opens")
}

/// Two stores on one new PostgreSQL database, as two bridges sharing it.
pub(crate) async fn two_postgres() -> (Store, Store) {
    let url = postgres_url();
    let (a, b) = tokio::join!(
        Store::open(&url, StoreOptions::default()),
        Store::open(&url, StoreOptions::default()),
    );
    (a.expect("a opens"), b.expect("b opens"))
}

/// `on_each_backend! { async fn name(store) { ... } }`: a module `name` with two tests,
/// `sqlite` and `postgres`, each running the body with `store` a fresh store on that backend.
/// Attributes (doc comments) go on both.
macro_rules! on_each_backend {
    ($(#[$meta:meta])* async fn $name:ident($store:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$meta])*
            #[tokio::test]
            async fn sqlite() {
                let $store = $crate::store::testing::sqlite().await;
                $body
            }

            $(#[$meta])*
            #[tokio::test]
            async fn postgres() {
                let $store = $crate::store::testing::postgres().await;
                $body
            }
        }
    };
}
pub(crate) use on_each_backend;

/// Sets order `order`'s state and the stamp of its last change directly, as another bridge
/// (whose clock may differ) or a hand-written `UPDATE` would.
pub(crate) async fn restamp_order(store: &Store, order: &str, state: &str, updated_ms: u64) {
    sqlx::query("UPDATE orders SET state = $1, updated_ms = $2 WHERE order_id = $3")
        .bind(state)
        .bind(super::backend::to_db(updated_ms))
        .bind(order)
        .execute(&store.write)
        .await
        .expect("the order is changed");
}

/// `query` with `binds` bound in order (i64 or text), as the plan helpers take them.
fn bind_all<'q, O>(
    query: sqlx::query::QueryAs<'q, Db, O, <Db as sqlx::Database>::Arguments>,
    binds: &[Result<i64, &'q str>],
) -> sqlx::query::QueryAs<'q, Db, O, <Db as sqlx::Database>::Arguments> {
    binds.iter().fold(query, |q, bind| match bind {
        Ok(n) => q.bind(*n),
        Err(text) => q.bind(*text),
    })
}

/// SQLite's plan for `sql` with `binds` (i64 or text), one line per step.
pub(crate) async fn sqlite_plan(store: &Store, sql: &str, binds: &[Result<i64, &str>]) -> String {
    let explain = format!("EXPLAIN QUERY PLAN {sql}");
    let query = sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(explain));
    let query = bind_all(query, binds);
    let rows = query.fetch_all(&store.read).await.expect("explained");
    rows.into_iter()
        .map(|(_, _, _, detail)| detail)
        .collect::<Vec<_>>()
        .join("\n")
}

/// PostgreSQL's plan for `sql` with `binds`, sequential scans switched off for the session so
/// that the plan shows whether an index can serve the statement at all (on a small test
/// table the planner would rightly scan it).
pub(crate) async fn postgres_plan(store: &Store, sql: &str, binds: &[Result<i64, &str>]) -> String {
    let mut connection = store.read.acquire().await.expect("a connection");
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *connection)
        .await
        .expect("set");
    let explain = format!("EXPLAIN {sql}");
    let query = sqlx::query_as::<_, (String,)>(sqlx::AssertSqlSafe(explain));
    let query = bind_all(query, binds);
    let rows = query.fetch_all(&mut *connection).await.expect("explained");
    sqlx::query("RESET enable_seqscan")
        .execute(&mut *connection)
        .await
        .expect("reset");
    rows.into_iter()
        .map(|(line,)| line)
        .collect::<Vec<_>>()
        .join("\n")
}
