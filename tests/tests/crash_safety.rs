//! `kill -9` of the bridge at random moments during 200 deliveries loses nothing: every order
//! ends delivered in the store, and its vendor got every `delivered` event at least once.
//! And `kill -9` of the standalone broker while the bridge is down loses nothing it
//! acknowledged: its journal has it.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use tests::crash::{EventPipeline, kill_count, start_fast_demo_sim, wait_stored};
use tests::sio::SioClient;
use tests::stack::{
    BridgeProcess, free_port, start_bridge_external, start_broker_process, start_broker_standalone,
};
use tests::temp_dir;

const ORDERS: usize = 200;
const VEHICLES: u32 = 25;
const RUN_BOUND: Duration = Duration::from_secs(300);

async fn bridge(
    mqtt: std::net::SocketAddr,
    http: &str,
    store: &str,
) -> anyhow::Result<BridgeProcess> {
    start_bridge_external(
        mqtt,
        &[
            "--listen",
            http,
            "--store",
            store,
            "--command-timeout-ms",
            "2000",
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_200_deliveries_loses_nothing() -> anyhow::Result<()> {
    // The broker outlives the bridge and keeps the bridge's persistent session meanwhile.
    let mqtt = free_port()?;
    let _broker = start_broker_process(mqtt, &[]).await?;
    let http = free_port()?.to_string();
    let store_dir = temp_dir()?;
    let store = store_dir.path().join("fleetbeat.db");
    let store = store.to_str().unwrap_or_default().to_owned();
    let mut current = bridge(mqtt, &http, &store).await?;
    let _sim = start_fast_demo_sim(mqtt, VEHICLES)?;

    // The vendor stays connected (socket.io-client reconnects by itself) and acknowledges.
    let mut vendor =
        SioClient::connect_with_token(&current.url(), "/vendor", "vendor-demo").await?;
    let orders: Vec<String> = (0..ORDERS).map(|i| format!("crash-{i:03}")).collect();
    let mut placed = 0;
    let mut delivered: BTreeSet<String> = BTreeSet::new();
    let mut kills = 0;
    let mut next_kill = tokio::time::Instant::now() + Duration::from_millis(1500);
    let deadline = tokio::time::Instant::now() + RUN_BOUND;

    while delivered.len() < ORDERS {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {ORDERS} delivered after {RUN_BOUND:?} ({kills} kills); missing e.g. {:?}",
            delivered.len(),
            orders.iter().find(|o| !delivered.contains(*o))
        );
        // Place the orders a few at a time; a placement cut by a kill is retried (idempotent).
        if placed < ORDERS {
            let i = placed;
            let body = json!({
                "order": orders[i],
                "customer": format!("customer {i}"),
                "lat": 52.51 + 0.0005 * (i % 40) as f64,
                "lon": 13.39 + 0.0007 * (i % 30) as f64,
            });
            if let Ok((status, _)) = current.post_json("/api/orders", "vendor-demo", &body).await
                && (status == 200 || status == 201)
            {
                placed += 1;
            }
        }
        // Kill the bridge at random moments, restart it on the same port and database.
        if tokio::time::Instant::now() >= next_kill && kills < 8 {
            current.program.kill().await?;
            kills += 1;
            current = bridge(mqtt, &http, &store).await?;
            next_kill = tokio::time::Instant::now() + Duration::from_millis(1000 + fastrand_ms());
        }
        // Collect and acknowledge what reached the vendor (waiting a little once all orders
        // are placed, so the loop does not spin).
        let mut batch = vendor.drain_events("delivery");
        if batch.is_empty()
            && placed == ORDERS
            && let Ok(d) = vendor
                .next_event("delivery", Duration::from_millis(200))
                .await
        {
            batch.push(d);
        }
        for d in batch {
            if d["kind"] == "delivered" {
                delivered.insert(d["order"].as_str().unwrap_or_default().to_owned());
            }
            if let Some(id) = d["message_id"].as_u64() {
                vendor
                    .emit("received", json!([{ "messageId": id }]))
                    .await?;
            }
        }
    }
    assert!(kills >= 3, "the bridge was killed {kills} times");

    // The store shows every order delivered.
    for order in &orders {
        let (status, view) = current
            .get_json(&format!("/api/orders/{order}"), Some("vendor-demo"))
            .await?;
        assert_eq!(status, 200, "{order}: {view}");
        assert_eq!(view["state"], "delivered", "{order}: {view}");
    }
    vendor.close().await;
    Ok(())
}

/// 0 ..= 2000 ms, from the clock (no seeded RNG needed: any moment is a fair moment).
fn fastrand_ms() -> u64 {
    u64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_millis()),
    ) * 2
}

/// `kill -9` of the standalone broker while the bridge is down, then both restarted, again
/// and again (`FLEETBEAT_CRASH_KILLS` rounds, default 10): every event the broker acknowledged
/// (from its journal, the bridge being down) reaches the store, and the journal empties once
/// the bridge has taken everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_broker_while_the_bridge_is_down_loses_no_acknowledged_event()
-> anyhow::Result<()> {
    const VEHICLE: &str = "raw-standalone";
    const SETTLE: Duration = Duration::from_secs(60);
    let rounds = kill_count();
    let mqtt = free_port()?.to_string();
    let journal_dir = temp_dir()?;
    let journal = journal_dir.path().join("broker-journal.db");
    let journal = journal.to_str().unwrap_or_default().to_owned();
    let broker_args = ["--listen", mqtt.as_str(), "--journal", journal.as_str()];
    let http = free_port()?.to_string();
    let store_dir = temp_dir()?;
    let store = store_dir.path().join("fleetbeat.db");
    let store_arg = store.to_str().unwrap_or_default().to_owned();
    let bridge_args = ["--listen", http.as_str(), "--store", store_arg.as_str()];

    let mut broker = start_broker_standalone(&broker_args).await?;
    let mut bridge = start_bridge_external(broker.mqtt, &bridge_args).await?;
    let pipeline = EventPipeline::start(broker.mqtt, "demo", VEHICLE, 20)?;
    let mut acked_while_down = Vec::with_capacity(rounds);
    let mut replayed = 0.0;
    for _ in 0..rounds {
        // Everything flows, and what the broker acknowledged before it was last killed (its
        // journal's replay to the bridge) is in the store; then the bridge goes away and the
        // journal acknowledges alone.
        pipeline
            .wait_acked_beyond(pipeline.acked() + 20, Duration::from_secs(20))
            .await?;
        wait_stored(&store, VEHICLE, &pipeline.report().acked, SETTLE).await?;
        replayed += broker.metric("fleetbeat_broker_replayed_total").await?;
        bridge.program.kill().await?;
        let before = pipeline.acked();
        pipeline
            .wait_acked_beyond(before + 20, Duration::from_secs(20))
            .await?;
        acked_while_down.push(pipeline.acked() - before);
        // The broker dies holding them; both come back.
        broker.program.kill().await?;
        broker = start_broker_standalone(&broker_args).await?;
        bridge = start_bridge_external(broker.mqtt, &bridge_args).await?;
    }
    let report = pipeline.finish(SETTLE).await?;
    let stored = wait_stored(&store, VEHICLE, &report.acked, SETTLE).await?;
    broker
        .wait_metric("fleetbeat_broker_journal_rows", |rows| rows == 0.0)
        .await?;
    replayed += broker.metric("fleetbeat_broker_replayed_total").await?;
    eprintln!(
        "{rounds} broker kills with the bridge down; raw vehicle: {} events published, {} \
         acknowledged ({acked_while_down:?} of them while the bridge was down), {stored} \
         stored; {replayed} published again by the restarted brokers",
        report.published,
        report.acked.len(),
    );
    drop(bridge);
    Ok(())
}
