//! Rebuilds the bridge when a migration is added or changed: `sqlx::migrate!` embeds
//! `migrations/sqlite/` and `migrations/postgres/` at compile time (sqlx's documented recipe).

fn main() {
    println!("cargo:rerun-if-changed=migrations/sqlite");
    println!("cargo:rerun-if-changed=migrations/postgres");
}
