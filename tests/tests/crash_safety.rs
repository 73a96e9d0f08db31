//! `kill -9` of the bridge at random moments during 200 deliveries loses nothing: every order
//! ends delivered in the store, and its vendor got every `delivered` event at least once.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use tests::sio::SioClient;
use tests::stack::{
    BridgeProcess, free_port, start_bridge_external, start_broker_process, start_sim, temp_dir,
};

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
    let store = temp_dir()?.join("fleetbeat.db");
    let store = store.to_str().unwrap_or_default().to_owned();
    let mut current = bridge(mqtt, &http, &store).await?;
    let _sim = start_sim(
        mqtt,
        VEHICLES,
        "demo",
        &["--rate", "2", "--time-scale", "100"],
    )?;

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
