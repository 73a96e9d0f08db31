//! Store benchmark: delivery events committed per second with fsync on (`synchronous = FULL`),
//! and heartbeats stored per second in batches of 100 and 1000, each next to a baseline
//! measured in the same run (`synchronous = OFF`: the same work without waiting for the disk).
//!
//! The heartbeat history is also written as the bridge's writer writes it under a fleet
//! ([`FLEET`] vehicles at 1 and 3 Hz, one batch a second: one or three rows per vehicle per
//! transaction) into a history that already holds [`FLEET_ROUNDS`] heartbeats of each vehicle,
//! so that each vehicle's newest entries in the track index sit on a page of their own, as
//! after a few minutes of a real fleet. There a commit costs one index page per vehicle, which
//! the batches of 50 vehicles above never show.
//!
//! Delivery events are measured twice: one caller after the other (each event its own
//! transaction), and [`PRODUCERS`] vehicles at once, each one event after the other as the
//! PUBACK queue commits them, which the store records in groups (`store::group`, one
//! transaction and one fsync per group). The group-committed rows compare with the one-by-one
//! row of the same setting, and report the latency from handing an event to the store to its
//! commit confirmed (p50 / p99), and the mean events per commit.
//!
//! ```sh
//! cargo bench -p bridge --no-default-features --bench store
//! ```
//!
//! Prints a markdown table. The database lives in the system's temporary directory, or in
//! `FLEETBEAT_BENCH_DIR` if set: it must be on a real disk (not tmpfs) for the fsync figures to
//! mean anything. The whole run takes about 40 s.
//!
//! With `FLEETBEAT_BENCH_PG=1` the same runs go to PostgreSQL too, on a server of its own
//! (`testengines::postgres::TempPostgres`, with `fsync` on, in the temporary directory):
//! `synchronous_commit = on` for FULL, `off` for the baseline; the bench talks to it over
//! loopback TCP.

use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

use bridge::store::{ClientId, HeartbeatRow, NewOrder, Store, StoreOptions, Synchronous};
use serde_json::json;
use shared::{DeliveryEvent, DeliveryKind, FleetId, OrderId, Position, VehicleId};
use testengines::postgres::TempPostgres;

/// How long each measurement runs (it also stops when it runs out of prepared work).
const BUDGET: Duration = Duration::from_millis(2_000);
/// Orders prepared for the event runs: three events each.
const ORDERS: u32 = 8_000;
/// Vehicles reporting at once in the group-committed runs.
const PRODUCERS: u32 = 64;
/// Vehicles of the fleet-shaped history runs: one heartbeat each per transaction.
const FLEET: u32 = 10_000;
/// Heartbeats of each of them already stored when those runs start.
const FLEET_ROUNDS: u32 = 256;
/// Rows per transaction while that history is written.
const FILL_BATCH: u32 = 51_200;

type BenchResult<T> = Result<T, Box<dyn Error>>;

/// Where the stores of a run live.
enum Engine<'a> {
    /// SQLite files in this directory.
    Sqlite(&'a Path),
    /// Databases on this PostgreSQL server.
    Postgres(&'a TempPostgres),
}

impl Engine<'_> {
    /// A new, empty store's target, named after `name` (`[a-z0-9_]`).
    fn fresh(&self, name: &str) -> BenchResult<String> {
        match self {
            Self::Sqlite(dir) => Ok(path_str(&dir.join(format!("{name}.db")))?.to_owned()),
            Self::Postgres(server) => Ok(server.create_database(name)?),
        }
    }

    /// A copy of a prepared database (`template`, closed, made by [`Engine::fresh`] with the
    /// name `template_name`), named after `name`.
    fn copy(&self, template: &str, template_name: &str, name: &str) -> BenchResult<String> {
        match self {
            Self::Sqlite(dir) => {
                let path = dir.join(format!("{name}.db"));
                std::fs::copy(template, &path)?;
                Ok(path_str(&path)?.to_owned())
            }
            Self::Postgres(server) => {
                server.psql(&format!("CREATE DATABASE {name} TEMPLATE {template_name}"))?;
                Ok(server.database_url(name))
            }
        }
    }

    /// How `synchronous` reads in the table on this engine.
    fn setting(&self, synchronous: Synchronous) -> String {
        match self {
            Self::Sqlite(_) => setting(synchronous),
            Self::Postgres(_) => match synchronous {
                Synchronous::Full => "PostgreSQL, synchronous_commit=on (fsync per commit)".into(),
                Synchronous::Normal | Synchronous::Off => {
                    "PostgreSQL, synchronous_commit=off (baseline)".into()
                }
            },
        }
    }
}

/// One measured line of the table.
struct Measured {
    what: String,
    setting: String,
    ops: u64,
    unit: &'static str,
    elapsed: Duration,
    /// Per call, sorted.
    latencies: Vec<Duration>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }
}

fn options(synchronous: Synchronous) -> StoreOptions {
    StoreOptions {
        synchronous,
        ..StoreOptions::default()
    }
}

fn vehicle(i: u32) -> BenchResult<VehicleId> {
    Ok(format!("v-{i}").parse()?)
}

fn order_id(i: u32) -> BenchResult<OrderId> {
    Ok(format!("o-{i}").parse()?)
}

/// A database with `ORDERS` orders, each assigned to its own vehicle, closed (checkpointed)
/// so that it can be copied for each run.
async fn prepare_orders(target: &str) -> BenchResult<()> {
    let store = Store::open(target, options(Synchronous::Off)).await?;
    let fleet: FleetId = "bench".parse()?;
    for i in 0..ORDERS {
        let order = order_id(i)?;
        store
            .create_order(&NewOrder {
                order: order.clone(),
                store: format!("store-{}", i % 20),
                fleet: fleet.clone(),
                customer: format!("customer {i}"),
                dropoff: Position::new(525_200_000, 134_050_000),
                pickup: Position::new(525_000_000, 134_000_000),
            })
            .await?;
        store.assign(&order, &vehicle(i)?).await?;
    }
    store.close().await;
    Ok(())
}

fn path_string(dir: &Path) -> BenchResult<String> {
    Ok(path_str(&dir.join("orders.db"))?.to_owned())
}

/// Every line of the table on `engine`; `template` is where the prepared orders go.
async fn measure(engine: &Engine<'_>, template: &str) -> BenchResult<Vec<(Measured, f64)>> {
    prepare_orders(template).await?;
    let mut rows = Vec::new();
    let events_off = bench_events(engine, template, Synchronous::Off).await?;
    let baseline = events_off.rate();
    let settings: &[Synchronous] = match engine {
        Engine::Sqlite(_) => &[Synchronous::Full, Synchronous::Normal],
        Engine::Postgres(_) => &[Synchronous::Full],
    };
    for &synchronous in settings {
        let one_by_one = bench_events(engine, template, synchronous).await?;
        let rate = one_by_one.rate();
        rows.push((one_by_one, baseline));
        rows.push((
            bench_grouped_events(engine, template, synchronous).await?,
            rate,
        ));
    }
    let off_rate = events_off.rate();
    rows.push((events_off, baseline));
    rows.push((
        bench_grouped_events(engine, template, Synchronous::Off).await?,
        off_rate,
    ));
    for batch in [100, 1_000] {
        let off = bench_heartbeats(engine, Synchronous::Off, batch).await?;
        let baseline = off.rate();
        rows.push((
            bench_heartbeats(engine, Synchronous::Full, batch).await?,
            baseline,
        ));
        rows.push((off, baseline));
    }
    let history = engine.fresh("history")?;
    prepare_history(&history).await?;
    for per_vehicle in [1, 3] {
        let off = bench_fleet_heartbeats(engine, &history, Synchronous::Off, per_vehicle).await?;
        let baseline = off.rate();
        rows.push((
            bench_fleet_heartbeats(engine, &history, Synchronous::Full, per_vehicle).await?,
            baseline,
        ));
        rows.push((off, baseline));
    }
    Ok(rows)
}

fn path_str(path: &Path) -> BenchResult<&str> {
    path.to_str()
        .ok_or_else(|| "non-UTF-8 temporary path".into())
}

/// `record_event` in a loop: pickup, in-transit, delivered for one order after another, each
/// event queued for the order's vendor and the dispatchers.
async fn bench_events(
    engine: &Engine<'_>,
    template: &str,
    synchronous: Synchronous,
) -> BenchResult<Measured> {
    let target = engine.copy(template, "orders", &format!("events_{synchronous}"))?;
    let store = Store::open(&target, options(synchronous)).await?;
    let fleet: FleetId = "bench".parse()?;
    let mut latencies = Vec::new();
    let start = Instant::now();
    'orders: for i in 0..ORDERS {
        let vehicle = vehicle(i)?;
        for (event, recipients, payload) in order_events(i)? {
            let t = Instant::now();
            let recorded = store
                .record_event(&vehicle, &fleet, &event, &recipients, &payload)
                .await?;
            latencies.push(t.elapsed());
            if recorded.duplicate || recorded.flag.is_some() {
                return Err(format!("unexpected outcome for {i}: {recorded:?}").into());
            }
            if start.elapsed() >= BUDGET {
                break 'orders;
            }
        }
    }
    let elapsed = start.elapsed();
    store.close().await;
    latencies.sort_unstable();
    Ok(Measured {
        what: "`record_event` one by one (event + order update + 2 queue rows, 1 tx)".into(),
        setting: engine.setting(synchronous),
        ops: latencies.len() as u64,
        unit: "events/s",
        elapsed,
        latencies,
    })
}

/// The events of order `i` (vehicle `v-{i}`): pickup, in-transit, delivered, each with its
/// recipients and payload.
fn order_events(i: u32) -> BenchResult<Vec<(DeliveryEvent, [ClientId; 2], serde_json::Value)>> {
    let vehicle = vehicle(i)?;
    let order = order_id(i)?;
    let mut events = Vec::new();
    for (n, kind) in [
        DeliveryKind::Pickup,
        DeliveryKind::InTransit,
        DeliveryKind::Delivered,
    ]
    .into_iter()
    .enumerate()
    {
        let event = DeliveryEvent {
            seq: i * 3 + n as u32,
            order: order.clone(),
            kind,
            ts_ms: 1_750_000_000_000 + u64::from(i) * 1_000 + n as u64,
            pos: Position::new(525_100_000, 134_020_000),
        };
        let payload = json!({
            "vehicle": vehicle.as_str(), "fleet": "bench", "order": order.as_str(),
            "kind": kind.as_str(), "seq": event.seq, "ts_ms": event.ts_ms,
            "lat": event.pos.lat(), "lon": event.pos.lon(),
        });
        let recipients = [
            ClientId::vendor(&format!("store-{}", i % 20)),
            ClientId::dispatch(),
        ];
        events.push((event, recipients, payload));
    }
    Ok(events)
}

/// [`PRODUCERS`] vehicles at once, each recording its orders' events one after the other
/// (`record_event`, as the PUBACK queue does: one event of a vehicle at a time): the store
/// commits what arrives together in one transaction.
async fn bench_grouped_events(
    engine: &Engine<'_>,
    template: &str,
    synchronous: Synchronous,
) -> BenchResult<Measured> {
    let target = engine.copy(template, "orders", &format!("grouped_{synchronous}"))?;
    let store = Store::open(&target, options(synchronous)).await?;
    let start = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let store = store.clone();
        producers.spawn(async move {
            let fleet: FleetId = "bench".parse().map_err(|e| format!("{e}"))?;
            let mut latencies = Vec::new();
            'orders: for i in (p..ORDERS).step_by(PRODUCERS as usize) {
                let vehicle = vehicle(i).map_err(|e| e.to_string())?;
                for (event, recipients, payload) in order_events(i).map_err(|e| e.to_string())? {
                    let t = Instant::now();
                    let recorded = store
                        .record_event(&vehicle, &fleet, &event, &recipients, &payload)
                        .await
                        .map_err(|e| e.to_string())?;
                    latencies.push(t.elapsed());
                    if recorded.duplicate || recorded.flag.is_some() {
                        return Err(format!("unexpected outcome for {i}: {recorded:?}"));
                    }
                    if start.elapsed() >= BUDGET {
                        break 'orders;
                    }
                }
            }
            Ok::<_, String>(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(joined) = producers.join_next().await {
        latencies.extend(joined??);
    }
    let elapsed = start.elapsed();
    let groups = store.event_groups();
    store.close().await;
    latencies.sort_unstable();
    Ok(Measured {
        what: format!(
            "`record_event`, {PRODUCERS} vehicles at once, group commit ({:.1} events per commit, \
             at most {}; vs: one by one, same setting)",
            groups.events as f64 / groups.commits.max(1) as f64,
            groups.largest
        ),
        setting: engine.setting(synchronous),
        ops: latencies.len() as u64,
        unit: "events/s",
        elapsed,
        latencies,
    })
}

/// `record_heartbeats` in a loop, `batch` rows per call (one transaction each), 50 vehicles.
async fn bench_heartbeats(
    engine: &Engine<'_>,
    synchronous: Synchronous,
    batch: u32,
) -> BenchResult<Measured> {
    let target = engine.fresh(&format!("heartbeats_{synchronous}_{batch}"))?;
    let store = Store::open(&target, options(synchronous)).await?;
    let fleet: FleetId = "bench".parse()?;
    let vehicles: Vec<VehicleId> = (0..50).map(vehicle).collect::<BenchResult<_>>()?;
    let mut seq: u32 = 0;
    let timed = time_heartbeats(store, || {
        (0..batch)
            .map(|i| {
                seq += 1;
                let v = (i % 50) as usize;
                HeartbeatRow {
                    vehicle: vehicles[v].clone(),
                    fleet: fleet.clone(),
                    seq,
                    ts_ms: 1_750_000_000_000 + u64::from(seq) * 20,
                    lat_e7: 525_000_000 + seq as i32,
                    lon_e7: 134_000_000 - seq as i32,
                    speed_cm_s: 1_250,
                    heading_deg: 90,
                    battery_pct: 80,
                    flags: 0b1_1001,
                    received_ms: 1_750_000_000_000 + u64::from(seq) * 20 + 15,
                }
            })
            .collect()
    })
    .await?;
    Ok(timed.measured(
        format!("`record_heartbeats`, batches of {batch} (1 tx each)"),
        engine.setting(synchronous),
    ))
}

/// Calls of `record_heartbeats` timed one by one.
struct Timed {
    rows: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Timed {
    fn measured(mut self, what: String, setting: String) -> Measured {
        self.latencies.sort_unstable();
        Measured {
            what,
            setting,
            ops: self.rows,
            unit: "heartbeats/s",
            elapsed: self.elapsed,
            latencies: self.latencies,
        }
    }
}

/// `record_heartbeats` of one batch of `next` after the other, for [`BUDGET`]; then closes
/// the store.
async fn time_heartbeats(
    store: Store,
    mut next: impl FnMut() -> Vec<HeartbeatRow>,
) -> BenchResult<Timed> {
    let mut latencies = Vec::new();
    let mut rows = 0;
    let start = Instant::now();
    while start.elapsed() < BUDGET {
        let batch = next();
        let t = Instant::now();
        store.record_heartbeats(&batch).await?;
        latencies.push(t.elapsed());
        rows += batch.len() as u64;
    }
    let elapsed = start.elapsed();
    store.close().await;
    Ok(Timed {
        rows,
        elapsed,
        latencies,
    })
}

/// Heartbeat `round` of vehicle `v` of `vehicles` (one a second).
fn fleet_row(vehicles: &[VehicleId], fleet: &FleetId, v: usize, round: u32) -> HeartbeatRow {
    let ts_ms = 1_750_000_000_000 + u64::from(round) * 1_000 + v as u64 % 1_000;
    HeartbeatRow {
        vehicle: vehicles[v].clone(),
        fleet: fleet.clone(),
        seq: round,
        ts_ms,
        lat_e7: 525_000_000 + (v as i32) * 10 + round as i32,
        lon_e7: 134_000_000 - (v as i32) * 10 - round as i32,
        speed_cm_s: 1_250,
        heading_deg: 90,
        battery_pct: 80,
        flags: 0b1_1001,
        received_ms: ts_ms + 15,
    }
}

fn fleet_vehicles() -> BenchResult<Vec<VehicleId>> {
    (0..FLEET).map(vehicle).collect()
}

/// A history of [`FLEET_ROUNDS`] heartbeats of each of [`FLEET`] vehicles, closed
/// (checkpointed) so that it can be copied for each run.
async fn prepare_history(target: &str) -> BenchResult<()> {
    let store = Store::open(target, options(Synchronous::Off)).await?;
    let fleet: FleetId = "bench".parse()?;
    let vehicles = fleet_vehicles()?;
    let mut rows = Vec::with_capacity(FILL_BATCH as usize);
    for v in 0..vehicles.len() {
        for round in 0..FLEET_ROUNDS {
            rows.push(fleet_row(&vehicles, &fleet, v, round));
            if rows.len() == FILL_BATCH as usize {
                store.record_heartbeats(&rows).await?;
                rows.clear();
            }
        }
    }
    store.record_heartbeats(&rows).await?;
    store.close().await;
    Ok(())
}

/// `record_heartbeats` as the bridge's writer calls it under a fleet: each call `per_vehicle`
/// heartbeats of each of [`FLEET`] vehicles (one transaction; the writer's batch of a second at
/// `per_vehicle` Hz), into a copy of the prepared history.
async fn bench_fleet_heartbeats(
    engine: &Engine<'_>,
    template: &str,
    synchronous: Synchronous,
    per_vehicle: u32,
) -> BenchResult<Measured> {
    let target = engine.copy(
        template,
        "history",
        &format!("fleet_{synchronous}_{per_vehicle}"),
    )?;
    let store = Store::open(&target, options(synchronous)).await?;
    let fleet: FleetId = "bench".parse()?;
    let vehicles = fleet_vehicles()?;
    let mut round = FLEET_ROUNDS;
    let timed = time_heartbeats(store, || {
        // In the order they arrive: round after round, each round vehicle after vehicle.
        let rows = (round..round + per_vehicle)
            .flat_map(|r| (0..vehicles.len()).map(move |v| (v, r)))
            .map(|(v, r)| fleet_row(&vehicles, &fleet, v, r))
            .collect();
        round += per_vehicle;
        rows
    })
    .await?;
    Ok(timed.measured(
        format!(
            "`record_heartbeats`, {FLEET} vehicles × {per_vehicle} each (1 tx), after \
             {FLEET_ROUNDS} each"
        ),
        engine.setting(synchronous),
    ))
}

fn setting(synchronous: Synchronous) -> String {
    match synchronous {
        Synchronous::Full => "WAL, synchronous=FULL (fsync per commit)".into(),
        Synchronous::Normal => "WAL, synchronous=NORMAL".into(),
        Synchronous::Off => "WAL, synchronous=OFF (baseline)".into(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn print_table(rows: &[(Measured, f64)]) {
    println!("| what | setting | done | time | rate | per call p50 / p99 (ms) | vs baseline |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (m, baseline) in rows {
        println!(
            "| {} | {} | {} | {:.2} s | {:.0} {} | {} / {} | {:.2}× |",
            m.what,
            m.setting,
            m.ops,
            m.elapsed.as_secs_f64(),
            m.rate(),
            m.unit,
            ms(m.percentile(0.5)),
            ms(m.percentile(0.99)),
            m.rate() / baseline,
        );
    }
}

async fn run() -> BenchResult<()> {
    let base = std::env::var_os("FLEETBEAT_BENCH_DIR")
        .map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    let dir = tempfile::Builder::new()
        .prefix("fleetbeat-bench-")
        .tempdir_in(&base)?;
    // Other work on the machine shows in the tail latencies: say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let started = Instant::now();

    let mut rows = measure(&Engine::Sqlite(dir.path()), &path_string(dir.path())?).await?;
    let postgres = std::env::var_os("FLEETBEAT_BENCH_PG").is_some_and(|v| v == "1");
    if postgres {
        let server = TempPostgres::start_with_fsync(true)?;
        let template = server.create_database("orders")?;
        rows.extend(measure(&Engine::Postgres(&server), &template).await?);
    }

    println!();
    println!("## Store benchmark");
    println!();
    println!(
        "{} CPUs (load average before the run: {load}), database in `{}`; {} prepared orders; \
         each line runs for at most {:.1} s.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        base.display(),
        ORDERS,
        BUDGET.as_secs_f64()
    );
    println!();
    print_table(&rows);
    println!();
    println!("Total run time {:.1} s.", started.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> BenchResult<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run())
}
