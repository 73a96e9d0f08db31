//! `kill -9` of the `bridge` with its embedded broker (the default deployment), at random
//! moments, while `device-sim` vehicles deliver orders and a raw vehicle pipelines sealed
//! QoS 1 events: every event a vehicle got a PUBACK for is in the store after the last
//! restart, and every `delivered` reaches its vendor.
//!
//! Kills: `FLEETBEAT_CRASH_KILLS` (default 10; `docs/broker.md` has the 100-kill recipe).

use std::time::Duration;

use tests::crash::{
    EventPipeline, OrderRun, kill_count, random_pause, start_fast_demo_sim, wait_stored,
};
use tests::stack::{free_port, spawn_bridge};
use tests::temp_dir;
use tokio::time::Instant;

const ORDERS: usize = 30;
const VEHICLES: u32 = 10;
const RAW_VEHICLE: &str = "raw-embedded";
/// Events the raw vehicle keeps unacknowledged at most.
const WINDOW: usize = 50;
/// After the last restart: the time everything left gets to arrive.
const SETTLE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_bridge_loses_no_acknowledged_event() -> anyhow::Result<()> {
    let kills = kill_count();
    let http = free_port()?.to_string();
    let mqtt_addr = free_port()?;
    let mqtt = mqtt_addr.to_string();
    let store_dir = temp_dir()?;
    let store = store_dir.path().join("fleetbeat.db");
    let store_arg = store.display().to_string();
    let args = [
        "--listen",
        &http,
        "--mqtt-listen",
        &mqtt,
        "--store",
        &store_arg,
        "--command-timeout-ms",
        "2000",
    ];
    let mut bridge = spawn_bridge(&args).await?;
    let _sim = start_fast_demo_sim(mqtt_addr, VEHICLES)?;
    let pipeline = EventPipeline::start(mqtt_addr, "demo", RAW_VEHICLE, WINDOW)?;
    let mut run = OrderRun::new(&bridge, "emb", ORDERS).await?;

    let started = Instant::now();
    let mut acked_at_kill = Vec::with_capacity(kills);
    let mut next_kill = Instant::now() + random_pause(ms(1000), ms(2500));
    while acked_at_kill.len() < kills {
        run.step(&bridge, ms(50)).await?;
        if Instant::now() >= next_kill {
            bridge.program.kill().await?;
            acked_at_kill.push(pipeline.acked());
            bridge = spawn_bridge(&args).await?;
            next_kill = Instant::now() + random_pause(ms(300), ms(2500));
        }
    }
    let killing = started.elapsed();

    // Everything the raw vehicle published is acknowledged in the end, and every event that
    // got a PUBACK is in the store.
    let report = pipeline.finish(SETTLE).await?;
    let stored = wait_stored(&store, RAW_VEHICLE, &report.acked, SETTLE).await?;

    // Every order reaches the vendor as delivered, and the store says so.
    let deadline = Instant::now() + SETTLE;
    while !run.done() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {ORDERS} orders delivered {SETTLE:?} after the last of {kills} kills; \
             missing e.g. {:?}",
            run.delivered(),
            run.missing()
        );
        run.step(&bridge, ms(200)).await?;
    }
    run.check_store(&bridge).await?;
    run.close().await;
    eprintln!(
        "{kills} kills in {killing:.1?}; raw vehicle: {} events published, {} acknowledged \
         (acknowledged at each kill: {acked_at_kill:?}), {} stored, {} sent again after \
         reconnects over {} connections; {ORDERS} orders delivered",
        report.published,
        report.acked.len(),
        stored,
        report.resent,
        report.connections,
    );
    Ok(())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
