//! Rebuilds the bridge when a migration is added or changed: `sqlx::migrate!` embeds
//! `migrations/` at compile time (sqlx's documented recipe).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
