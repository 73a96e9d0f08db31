//! Several bridges show one fleet (issue #15): with a shared MQTT subscription each bridge
//! receives only part of the heartbeats, and the latest vehicle state shared through Redis
//! (`bridge::cluster`) makes every bridge's fleet cache cover every vehicle. Real `bridge`
//! processes in one `--shared-group` with one `--redis-url`, Debian's `mosquitto`,
//! `device-sim --vehicles 200`, a real `redis-server`, real `socket.io-client`s.
//!
//! - A dispatcher on EACH bridge receives positions of all 200 vehicles, and a dispatcher that
//!   joins gets a snapshot of all 200, although each bridge received only part of the
//!   heartbeats (mosquitto shares them message by message, so this alone would not need Redis).
//! - When the simulator dies, each vehicle's last will (offline) reaches ONE bridge; both
//!   bridges show all 200 offline (without the shared state, half would only turn stale).
//! - A bridge restarted after that (no vehicle publishes any more) still answers `join` with
//!   all 200 vehicles, offline, with their last positions: loaded from Redis at start.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tests::WAIT;
use tests::cluster::{Cluster, ClusterOptions, eventually};
use tests::sio::SioClient;

const VEHICLES: usize = 200;
const ROOM: &str = "fleet:demo";
/// How long the next part of a split snapshot may take (they are sent back to back).
const PART_WAIT: Duration = Duration::from_secs(2);

/// The heartbeats bridge `i` received from MQTT itself.
const OWN_HEARTBEATS: &str = "fleetbeat_bridge_mqtt_received_total{kind=\"hb\"}";
/// The vehicle states bridge `i` merged from the other bridges' news.
const MERGED: &str = "fleetbeat_bridge_cluster_merged_vehicles_total";
/// The vehicle states bridge `i` loaded from the fleet hashes.
const LOADED: &str = "fleetbeat_bridge_cluster_loaded_vehicles_total";

/// A fresh dispatcher on `url` joins [`ROOM`]; returns the snapshot it gets.
async fn snapshot(url: &str) -> anyhow::Result<Vec<Value>> {
    let mut dispatcher = SioClient::dispatcher_in(url, ROOM).await?;
    let snapshot = dispatcher.next_event("snapshot", WAIT).await?;
    let mut vehicles = snapshot
        .as_array()
        .cloned()
        .context("a snapshot is an array")?;
    // A snapshot larger than one packet comes in several `snapshot` events, one after the other.
    while ids(&vehicles).len() < VEHICLES {
        let Ok(part) = dispatcher.next_event("snapshot", PART_WAIT).await else {
            break;
        };
        vehicles.extend(part.as_array().cloned().unwrap_or_default());
    }
    dispatcher.disconnect().await?;
    Ok(vehicles)
}

fn ids(vehicles: &[Value]) -> BTreeSet<String> {
    vehicles
        .iter()
        .filter_map(|v| v["vehicle"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bridge_shows_every_vehicle_and_a_restarted_one_loads_them() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    assert_eq!(cluster.options().vehicles as usize, VEHICLES);

    // Positions: a dispatcher on each bridge sees every vehicle move.
    for i in 1..=2 {
        let mut dispatcher = SioClient::dispatcher_in(&cluster.url(i)?, ROOM).await?;
        let seen = dispatcher.vehicles_seen(VEHICLES, WAIT).await?;
        assert_eq!(seen.len(), VEHICLES, "bridge {i}'s dispatcher saw {seen:?}");
        dispatcher.disconnect().await?;
    }
    // Each bridge heard only part of the heartbeats itself, and merged the others' news.
    for i in 1..=2 {
        let bridge = cluster.bridge(i)?;
        let own = bridge.metric(OWN_HEARTBEATS).await?;
        let merged = bridge.metric(MERGED).await?;
        assert!(
            own > 0.0,
            "bridge {i} received no heartbeat: the group is not shared"
        );
        assert!(
            merged > 0.0,
            "bridge {i} merged nothing from the other bridge"
        );
    }
    // Snapshots: a dispatcher joining either bridge gets all 200 vehicles, with positions.
    for i in 1..=2 {
        let vehicles = snapshot(&cluster.url(i)?).await?;
        assert_eq!(ids(&vehicles).len(), VEHICLES, "bridge {i}'s snapshot");
        assert!(
            vehicles.iter().all(|v| v["position"]["lat"].is_number()),
            "every vehicle of bridge {i}'s snapshot has its last position"
        );
    }

    // The simulator dies: the broker publishes each vehicle's will to one bridge of the group.
    let sim = cluster.sim_mut().context("the cluster runs device-sim")?;
    sim.kill().await?;
    for i in 1..=2 {
        let url = cluster.url(i)?;
        eventually(WAIT, || async {
            let vehicles = snapshot(&url).await?;
            let offline = vehicles.iter().filter(|v| v["status"] == "offline").count();
            anyhow::ensure!(
                ids(&vehicles).len() == VEHICLES && offline == VEHICLES,
                "bridge {i}: {offline} of {} vehicles offline",
                vehicles.len()
            );
            Ok(())
        })
        .await?;
    }

    // No vehicle publishes any more; bridge 2 starts again with an empty cache.
    cluster.restart_bridge(2).await?;
    let loaded = cluster.bridge(2)?.metric(LOADED).await?;
    assert!(
        loaded >= VEHICLES as f64,
        "bridge 2 loaded {loaded} states from Redis"
    );
    let vehicles = snapshot(&cluster.url(2)?).await?;
    assert_eq!(
        ids(&vehicles).len(),
        VEHICLES,
        "the restarted bridge's snapshot"
    );
    assert!(
        vehicles.iter().all(|v| v["status"] == "offline"),
        "the restarted bridge knows they are offline"
    );
    assert!(
        vehicles.iter().all(|v| v["position"]["lat"].is_number()),
        "the restarted bridge knows every last position (heartbeats are never queued for it)"
    );
    Ok(())
}
