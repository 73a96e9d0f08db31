//! The store of a run: a fresh SQLite file or PostgreSQL database with the orders prepared
//! through the bridge's own library, and the check of what it holds after the run.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context as _, ensure};
use bridge::store::{NewOrder, Store, StoreOptions, Synchronous};
use shared::{FleetId, OrderId, Position, VehicleId};
use sqlx::Row as _;
use testengines::postgres::TempPostgres;

use crate::cli::StoreKind;

/// The fleet of every vehicle and order.
pub const FLEET: &str = "bench";
/// Where every order is picked up.
pub const PICKUP: Position = Position::new(525_000_000, 134_000_000);
/// Where every order is dropped off.
pub const DROPOFF: Position = Position::new(525_200_000, 134_050_000);

/// Where the stores of the runs live.
pub enum Engine {
    /// SQLite files in this directory (removed when dropped).
    Sqlite(tempfile::TempDir),
    /// Databases on this server (stopped and removed when dropped).
    Postgres(TempPostgres),
}

impl Engine {
    /// A directory on the temporary disk (`FLEETBEAT_BENCH_DIR` if set: it must be a real
    /// disk, not tmpfs, for fsync to mean anything), or a new PostgreSQL server with `fsync`
    /// on (and the default `synchronous_commit = on`).
    ///
    /// # Errors
    /// If the directory cannot be made or the server does not start.
    pub fn start(kind: StoreKind) -> anyhow::Result<Self> {
        match kind {
            StoreKind::Sqlite => {
                let mut builder = tempfile::Builder::new();
                builder.prefix("fleetbeat-eventbench-");
                let dir = match std::env::var_os("FLEETBEAT_BENCH_DIR") {
                    Some(parent) => builder.tempdir_in(parent),
                    None => builder.tempdir(),
                }
                .context("creating the store directory")?;
                Ok(Self::Sqlite(dir))
            }
            StoreKind::Postgres => Ok(Self::Postgres(
                TempPostgres::start_with_fsync(true).context("starting PostgreSQL")?,
            )),
        }
    }

    /// The engine's durability settings as the server reports them (PostgreSQL), or the
    /// directory of the SQLite files.
    ///
    /// # Errors
    /// If `psql` fails.
    pub fn describe(&self) -> anyhow::Result<String> {
        match self {
            Self::Sqlite(dir) => Ok(format!("SQLite files in {}", dir.path().display())),
            Self::Postgres(server) => {
                let show = |name: &str| -> anyhow::Result<String> {
                    Ok(server.psql(&format!("SHOW {name}"))?.trim().to_owned())
                };
                Ok(format!(
                    "PostgreSQL {} on 127.0.0.1:{} in {} (fsync={}, synchronous_commit={}, \
                     wal_sync_method={})",
                    show("server_version")?,
                    server.port(),
                    server.dir().display(),
                    show("fsync")?,
                    show("synchronous_commit")?,
                    show("wal_sync_method")?,
                ))
            }
        }
    }

    /// The PostgreSQL server's postmaster (its backends are its children), if any.
    pub fn server_pid(&self) -> Option<u32> {
        match self {
            Self::Sqlite(_) => None,
            Self::Postgres(server) => {
                let pid_file = server.dir().join("data").join("postmaster.pid");
                std::fs::read_to_string(pid_file)
                    .ok()?
                    .lines()
                    .next()?
                    .trim()
                    .parse()
                    .ok()
            }
        }
    }

    /// A new, empty store's target (`[a-z0-9_]` name): a file path or a database URL.
    ///
    /// # Errors
    /// If the database cannot be created.
    pub fn fresh(&self, name: &str) -> anyhow::Result<String> {
        match self {
            Self::Sqlite(dir) => Ok(path_str(dir.path().join(format!("{name}.db")))?),
            Self::Postgres(server) => Ok(server.create_database(name)?),
        }
    }
}

fn path_str(path: PathBuf) -> anyhow::Result<String> {
    path.into_os_string()
        .into_string()
        .map_err(|p| anyhow::anyhow!("not UTF-8: {}", p.display()))
}

/// Vehicle id of order `index` (one order per vehicle id).
pub fn vehicle(index: u32) -> anyhow::Result<VehicleId> {
    VehicleId::new(&format!("ev{index}")).map_err(anyhow::Error::msg)
}

/// Order id of order `index`.
pub fn order(index: u32) -> anyhow::Result<OrderId> {
    OrderId::new(&format!("eo{index}")).map_err(anyhow::Error::msg)
}

/// The fleet id.
pub fn fleet() -> anyhow::Result<FleetId> {
    FleetId::new(FLEET).map_err(anyhow::Error::msg)
}

/// Creates `orders` orders in the store at `target`, order `i` assigned to vehicle `i`
/// (committed without waiting for the disk: this is set-up, not what is measured).
///
/// # Errors
/// If the store refuses one.
pub async fn prepare(target: &str, orders: u32) -> anyhow::Result<()> {
    let options = StoreOptions {
        synchronous: Synchronous::Off,
        ..StoreOptions::default()
    };
    let store = Store::open(target, options)
        .await
        .context("opening the store to prepare it")?;
    let fleet = fleet()?;
    for i in 0..orders {
        let order = order(i)?;
        store
            .create_order(&NewOrder {
                order: order.clone(),
                store: format!("store-{}", i % 20),
                fleet: fleet.clone(),
                customer: format!("customer {i}"),
                dropoff: DROPOFF,
                pickup: PICKUP,
            })
            .await
            .with_context(|| format!("creating order {order}"))?;
        store
            .assign(&order, &vehicle(i)?)
            .await
            .with_context(|| format!("assigning order {order}"))?;
    }
    store.close().await;
    Ok(())
}

/// What the store held after a run.
#[derive(Debug, Clone, Copy)]
pub struct Verified {
    /// Delivery events acknowledged to the vehicles.
    pub acknowledged: usize,
    /// Of those, recorded without a flag.
    pub recorded: usize,
    /// Delivery events in the store in all.
    pub stored: usize,
    /// Orders whose three events were all acknowledged.
    pub completed: usize,
    /// Of those, in state `delivered`.
    pub delivered: usize,
}

/// Reads the store at `target` (the bridge stopped) and checks that every event of
/// `acknowledged` (vehicle, seq) is recorded without a flag, and every order of `completed`
/// is `delivered`.
///
/// # Errors
/// If the store cannot be read, or it misses something (the counts in the message).
pub async fn verify(
    target: &str,
    acknowledged: &[(u32, u32)],
    completed: &[u32],
) -> anyhow::Result<Verified> {
    sqlx::any::install_default_drivers();
    let url = if target.starts_with("postgres") {
        target.to_owned()
    } else {
        format!("sqlite://{target}?mode=ro")
    };
    let db = sqlx::AnyPool::connect(&url)
        .await
        .context("opening the store to verify it")?;
    let rows = sqlx::query("SELECT vehicle, seq, flag FROM delivery_events")
        .fetch_all(&db)
        .await
        .context("reading delivery_events")?;
    let mut unflagged = HashSet::with_capacity(rows.len());
    for row in &rows {
        let flag: Option<String> = row.try_get("flag")?;
        if flag.is_none() {
            let vehicle: String = row.try_get("vehicle")?;
            let seq: i64 = row.try_get("seq")?;
            unflagged.insert((vehicle, seq));
        }
    }
    let delivered: HashSet<String> =
        sqlx::query_scalar("SELECT order_id FROM orders WHERE state = 'delivered'")
            .fetch_all(&db)
            .await
            .context("reading orders")?
            .into_iter()
            .collect();
    db.close().await;
    let recorded = acknowledged
        .iter()
        .filter(|(v, seq)| unflagged.contains(&(format!("ev{v}"), i64::from(*seq))))
        .count();
    let delivered_count = completed
        .iter()
        .filter(|i| delivered.contains(&format!("eo{i}")))
        .count();
    let verified = Verified {
        acknowledged: acknowledged.len(),
        recorded,
        stored: rows.len(),
        completed: completed.len(),
        delivered: delivered_count,
    };
    ensure!(
        verified.recorded == verified.acknowledged && verified.delivered == verified.completed,
        "the store misses acknowledged work: {verified:?}"
    );
    Ok(verified)
}
