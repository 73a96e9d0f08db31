//! A dispatcher gets the snapshot first, then live positions; a vehicle that falls silent turns
//! stale, then offline when the broker gives up on it.

use serde_json::{Value, json};
use tests::WAIT;
use tests::sio::SioClient;
use tests::stack::{start_bridge, start_sim};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_live_then_stale_then_offline() -> anyhow::Result<()> {
    // Stale after 0.5 s of silence: sooner than the broker gives up (a parked vehicle reports
    // only every few seconds, so the default of 3 intervals could come after the last will).
    let bridge = start_bridge(&["--stale-after-ms", "500"]).await?;
    // A keep-alive of 1 s: the broker declares a silent vehicle dead after 1.5 s.
    let mut sim = start_sim(
        bridge.mqtt,
        2,
        "live",
        &["--rate", "5", "--keep-alive", "1"],
    )?;

    // Let the bridge learn both vehicles before the dispatcher arrives.
    let mut early = SioClient::dispatcher(&bridge.url()).await?;
    early.join("fleet:live").await?;
    early.vehicles_seen(2, WAIT).await?;

    let mut dispatcher = SioClient::dispatcher(&bridge.url()).await?;
    let ack = dispatcher.join("fleet:live").await?;
    assert_eq!(ack, json!({ "ok": true }));
    let snapshot = dispatcher.next_event("snapshot", WAIT).await?;
    let snapshot = snapshot.as_array().cloned().unwrap_or_default();
    let ids: Vec<&str> = snapshot
        .iter()
        .filter_map(|v| v["vehicle"].as_str())
        .collect();
    assert_eq!(ids, ["live-0001", "live-0002"]);
    for v in &snapshot {
        assert_eq!(v["status"], "online", "{v}");
        assert_eq!(v["fleet"], "live");
        assert!(
            v["position"]["lat"].as_f64().is_some(),
            "snapshot carries the last position: {v}"
        );
        assert!(v["last_seen_ms"].as_u64().unwrap_or(0) > 0);
    }
    // Live positions follow, newer than the snapshot.
    let snap_seq = snapshot[0]["position"]["seq"].as_u64().unwrap_or(0);
    let live = dispatcher
        .positions_until(WAIT, |p| {
            p["vehicle"] == "live-0001" && p["seq"].as_u64().unwrap_or(0) > snap_seq
        })
        .await?;
    assert!(!live.is_empty());

    // Freeze the simulator: its connections stay open but nothing is sent.
    sim.signal("STOP")?;
    let mut stale = Vec::new();
    let mut offline = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while offline.len() < 2 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // A `status` event is the batch of one tick's changes, oldest first.
        let batch: Value = dispatcher.next_event("status", left).await?;
        let changes = batch.as_array().expect("a status batch is an array");
        assert!(!changes.is_empty(), "empty status batch");
        for s in changes {
            match s["status"].as_str() {
                Some("stale") => {
                    assert!(offline.is_empty(), "stale after offline: {s}");
                    stale.push(s["vehicle"].clone());
                }
                Some("offline") => {
                    assert!(stale.contains(&s["vehicle"]), "offline before stale: {s}");
                    assert_eq!(s["reason"], "connection-lost");
                    offline.push(s["vehicle"].clone());
                }
                _ => {}
            }
        }
    }
    assert_eq!(stale.len(), 2);
    sim.signal("CONT")?;
    sim.kill().await?;

    // The HTTP API agrees.
    let (status, state) = bridge
        .get_json("/api/vehicles/live-0001", Some("dispatch-demo"))
        .await?;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["status"], "offline");
    dispatcher.close().await;
    early.close().await;
    Ok(())
}
