//! A store that cannot write is back-pressure, not a reconnect loop. The bridge (the default
//! deployment: embedded broker, file store) has its database locked by another connection (as
//! a stuck backup or a second process would hold it) while a raw vehicle publishes sealed QoS 1
//! delivery events and a `device-sim` vehicle sends heartbeats. While the lock lasts: the
//! events get no PUBACK and are not stored, `/readyz` is 503 with the store's error, `/metrics`
//! show it, heartbeats keep coming in. Once the lock is gone, without anything restarted: each
//! event is stored before its PUBACK, it reaches the fleet's dispatcher, `/readyz` is 200
//! again, and neither the bridge nor the vehicle ever reconnected. (The order is assigned to
//! the simulated vehicle, so the raw vehicle's events are stored flagged `wrong-vehicle` and
//! told to the dispatchers as `suspect`, not to the vendor: issue #14.)

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use sqlx::Connection as _;
use tests::WAIT;
use tests::crash::{EventPipeline, stored_events, wait_stored};
use tests::sio::SioClient;
use tests::stack::{start_bridge, start_sim};
use tests::temp_dir;

const VEHICLE: &str = "bp-0001";
const HEARTBEATS: &str = "fleetbeat_bridge_mqtt_received_total{kind=\"hb\"}";
/// The bridge's first failed write takes up to two busy timeouts (5 s each: a heartbeat
/// batch may hold the write connection first).
const FIRST_FAILURE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_store_holds_acks_back_until_it_writes_again() -> anyhow::Result<()> {
    let store_dir = temp_dir()?;
    let store = store_dir.path().join("fleetbeat.db");
    let store_arg = store.display().to_string();
    let bridge = start_bridge(&["--store", &store_arg]).await?;
    let _sim = start_sim(bridge.mqtt, 1, "demo", &["--rate", "5"])?;
    let mut dispatcher = SioClient::dispatcher(&bridge.url()).await?;
    // The raw vehicle's events 1 and 2 are `raw-0` going in transit, then delivered.
    let order = json!({ "order": "raw-0", "customer": "c", "lat": 52.51, "lon": 13.39 });
    let (status, placed) = bridge
        .post_json("/api/orders", "vendor-demo", &order)
        .await?;
    ensure!(status == 201, "order not placed: {status} {placed}");
    bridge.wait_metric(HEARTBEATS, |n| n > 0.0, WAIT).await?;

    let lock = StoreLock::take(&store).await?;
    let pipeline = EventPipeline::start(bridge.mqtt, "demo", VEHICLE, 2)?;
    bridge
        .wait_metric(
            "fleetbeat_bridge_store_writable",
            |n| n == 0.0,
            FIRST_FAILURE,
        )
        .await?;

    // Reported: /readyz with the store's error, the metrics.
    let (code, body) = bridge.get("/readyz").await?;
    assert_eq!(code, 503, "{body}");
    let body: Value = serde_json::from_str(&body).context("/readyz is JSON")?;
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("the store cannot write"), "{body}");
    let error = body["store"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("locked"), "{body}");
    for counter in [
        "fleetbeat_bridge_store_write_failures_total",
        "fleetbeat_bridge_events_unacked_total",
        "fleetbeat_bridge_acks_waiting",
    ] {
        assert!(bridge.metric(counter).await? >= 1.0, "{counter}");
    }
    // Heartbeats keep coming in meanwhile; their history is dropped, and counted.
    let heartbeats = bridge.metric(HEARTBEATS).await?;
    bridge
        .wait_metric(HEARTBEATS, |n| n >= heartbeats + 5.0, WAIT)
        .await?;
    bridge
        .wait_metric(
            "fleetbeat_bridge_history_failed_total",
            |n| n > 0.0,
            FIRST_FAILURE,
        )
        .await?;
    // Nothing acknowledged, nothing stored, nothing told.
    assert_eq!(pipeline.acked(), 0, "a PUBACK while the store cannot write");
    assert!(stored_events(&store, VEHICLE).await?.is_empty());
    assert!(dispatcher.drain_events("delivery").is_empty());

    lock.release().await?;
    // Each event is in the store by the time its PUBACK reaches the vehicle.
    pipeline.wait_acked_beyond(0, WAIT).await?;
    let acked = pipeline.report().acked;
    let stored = stored_events(&store, VEHICLE).await?;
    assert!(
        acked.is_subset(&stored),
        "acknowledged {acked:?}, stored {stored:?}"
    );
    // (Once acknowledged, the vehicle goes on publishing until it is stopped.)
    let report = pipeline.finish(WAIT).await?;
    assert!(
        report.acked.contains(&1) && report.acked.contains(&2),
        "{report:?}"
    );
    assert_eq!(report.connections, 1, "the vehicle had to reconnect");
    wait_stored(&store, VEHICLE, &report.acked, WAIT).await?;
    let delivered = dispatcher
        .next_matching(WAIT, |m| {
            m["event"] == "delivery"
                && m["args"][0]["kind"] == "delivered"
                && m["args"][0]["vehicle"] == VEHICLE
        })
        .await?;
    assert_eq!(delivered["args"][0]["order"], "raw-0", "{delivered}");
    assert_eq!(delivered["args"][0]["suspect"], true, "{delivered}");

    // Recovered by itself, without a reconnect loop.
    bridge.wait_ready().await?;
    assert_eq!(bridge.metric("fleetbeat_bridge_store_writable").await?, 1.0);
    assert_eq!(bridge.metric("fleetbeat_bridge_acks_waiting").await?, 0.0);
    for (sample, expected) in [
        ("fleetbeat_bridge_mqtt_connects_total", 1.0),
        ("fleetbeat_bridge_mqtt_errors_total", 0.0),
        // The embedded broker's heartbeats come in-process: no connection to count.
        ("fleetbeat_bridge_mqtt_heartbeat_connects_total", 0.0),
        ("fleetbeat_bridge_mqtt_heartbeat_errors_total", 0.0),
    ] {
        assert_eq!(bridge.metric(sample).await?, expected, "{sample}");
    }
    assert!(
        bridge.program.find_line("the store writes again").is_some(),
        "the recovery is logged"
    );
    dispatcher.close().await;
    Ok(())
}

/// An exclusive lock on the bridge's database, held by a connection of the test's own.
struct StoreLock(sqlx::SqliteConnection);

impl StoreLock {
    /// Takes the write lock of the database at `path` (SQLite `BEGIN EXCLUSIVE`; in WAL mode
    /// readers go on, writers wait for their busy timeout and fail).
    async fn take(path: &Path) -> anyhow::Result<Self> {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_secs(5));
        let mut conn = sqlx::SqliteConnection::connect_with(&options)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut conn)
            .await
            .context("locking the store")?;
        Ok(Self(conn))
    }

    /// Ends the transaction and closes the connection.
    async fn release(mut self) -> anyhow::Result<()> {
        sqlx::query("ROLLBACK")
            .execute(&mut self.0)
            .await
            .context("unlocking the store")?;
        self.0
            .close()
            .await
            .context("closing the lock's connection")?;
        Ok(())
    }
}
