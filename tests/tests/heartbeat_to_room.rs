//! A device-sim vehicle's heartbeats reach the dispatchers in its room, and only them.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use tests::WAIT;
use tests::sio::SioClient;
use tests::stack::{start_bridge, start_sim};

fn vehicle(v: &Value) -> &str {
    v["vehicle"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_follow_room_membership() -> anyhow::Result<()> {
    let bridge = start_bridge(&[]).await?;
    let _sim = start_sim(bridge.mqtt, 2, "north", &["--rate", "5"])?;

    let mut watcher = SioClient::dispatcher(&bridge.url()).await?;
    let mut witness = SioClient::dispatcher(&bridge.url()).await?;
    for client in [&mut watcher, &mut witness] {
        let ack = client.join("vehicle:north-0001").await?;
        assert_eq!(ack, json!({ "ok": true }));
    }

    // Positions of north-0001 arrive; those of north-0002 (same broker, same fleet) do not.
    let mut seen = Vec::new();
    while seen.len() < 5 {
        seen.extend(watcher.positions_until(WAIT, |_| true).await?);
    }
    assert!(seen.iter().all(|p| vehicle(p) == "north-0001"), "{seen:?}");
    let first = &seen[0];
    assert_eq!(first["fleet"], "north");
    let (lat, lon) = (
        first["lat"].as_f64().unwrap_or(0.0),
        first["lon"].as_f64().unwrap_or(0.0),
    );
    assert!((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) && lat != 0.0);
    let seqs: Vec<u64> = seen.iter().filter_map(|p| p["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence numbers increase: {seqs:?}"
    );

    // After leaving, the watcher gets nothing more while the witness keeps receiving.
    let ack = watcher
        .emit_ack("leave", json!(["vehicle:north-0001"]))
        .await?;
    assert_eq!(ack, json!({ "ok": true }));
    watcher.drain_events("position");
    witness.drain_events("position");
    for _ in 0..3 {
        witness.positions_until(WAIT, |_| true).await?;
    }
    let late = watcher.drain_events("position");
    assert!(late.is_empty(), "positions after leave: {late:?}");

    // Joining the fleet room brings both vehicles.
    let ack = watcher.join("fleet:north").await?;
    assert_eq!(ack, json!({ "ok": true }));
    let mut vehicles = BTreeSet::new();
    while vehicles.len() < 2 {
        for p in watcher.positions_until(WAIT, |_| true).await? {
            vehicles.insert(vehicle(&p).to_owned());
        }
    }
    assert_eq!(
        vehicles.into_iter().collect::<Vec<_>>(),
        ["north-0001", "north-0002"]
    );

    watcher.close().await;
    witness.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_refuses_unknown_room_forms() -> anyhow::Result<()> {
    let bridge = start_bridge(&[]).await?;
    let mut client = SioClient::dispatcher(&bridge.url()).await?;
    for bad in [
        json!(["truck:7"]),
        json!(["vehicle:"]),
        json!(["fleet:a/b"]),
        json!([42]),
    ] {
        let ack = client.emit_ack("join", bad.clone()).await?;
        assert_eq!(ack["ok"], false, "{bad} was accepted");
        assert!(
            ack["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{ack}"
        );
    }
    let ack = client.join("all").await?;
    assert_eq!(ack, json!({ "ok": true }));
    // The bridge outlives bad requests.
    let (status, _) = bridge.get("/healthz").await?;
    assert_eq!(status, 200);
    client.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_are_coalesced_into_one_batch_per_tick() -> anyhow::Result<()> {
    // Always per tick (a bridge this quiet would otherwise send each position at once).
    let bridge = start_bridge(&["--tick-ms", "200", "--flush-at-once-below", "0"]).await?;
    // 10 Hz per vehicle: two heartbeats per vehicle per tick.
    let _sim = start_sim(bridge.mqtt, 4, "many", &["--rate", "10"])?;
    let mut client = SioClient::dispatcher(&bridge.url()).await?;
    // Three overlapping rooms: each vehicle must still come once per batch.
    for room in ["all", "fleet:many", "vehicle:many-0001"] {
        assert_eq!(client.join(room).await?, json!({ "ok": true }));
    }
    client.next_event("position", WAIT).await?;
    let started = tokio::time::Instant::now();
    let mut batches = 0u32;
    let mut seen = BTreeSet::new();
    while batches < 15 {
        let batch = client.next_event("position", WAIT).await?;
        let batch = batch.as_array().cloned().unwrap_or_default();
        let ids: Vec<&str> = batch.iter().map(vehicle).collect();
        let unique: BTreeSet<&str> = ids.iter().copied().collect();
        assert_eq!(
            ids.len(),
            unique.len(),
            "a vehicle twice in one batch: {ids:?}"
        );
        assert!(ids.len() <= 4, "{ids:?}");
        seen.extend(unique.into_iter().map(str::to_owned));
        batches += 1;
    }
    let elapsed = started.elapsed();
    // At most one batch per 200 ms tick (plus one for the tick in progress).
    let ticks = (elapsed.as_millis() / 200) as u32 + 1;
    assert!(batches <= ticks, "{batches} batches in {elapsed:?}");
    assert_eq!(seen.len(), 4, "{seen:?}");
    client.close().await;
    Ok(())
}

/// On a quiet bridge a position goes out as it arrives, not at the next tick: with a 10 s tick
/// a dispatcher still gets a vehicle's 1 Hz positions one by one. With flushes between ticks
/// turned off (`--flush-at-once-below 0`) the same wait sees at most the tick's batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_bridge_sends_positions_at_once_not_per_tick() -> anyhow::Result<()> {
    for (at_once, flag) in [(true, "2000"), (false, "0")] {
        let bridge = start_bridge(&["--tick-ms", "10000", "--flush-at-once-below", flag]).await?;
        let _sim = start_sim(bridge.mqtt, 1, "quiet", &["--rate", "2"])?;
        let mut dispatcher = SioClient::dispatcher(&bridge.url()).await?;
        assert_eq!(dispatcher.join("all").await?, json!({ "ok": true }));
        // Wait for the vehicle's first position, then count the batches of the next 4 s.
        dispatcher.positions_until(WAIT, |_| true).await?;
        let window = std::time::Duration::from_secs(4);
        let end = tokio::time::Instant::now() + window;
        let mut batches = 0;
        while let Ok(Ok(_)) =
            tokio::time::timeout_at(end, dispatcher.next_event("position", window)).await
        {
            batches += 1;
        }
        if at_once {
            // 2 Hz for 4 s: 8 positions, each in its own batch (a loaded machine may merge a few).
            assert!(batches >= 4, "{batches} position batches in 4 s at once");
        } else {
            // One tick in 10 s: at most one batch in 4 s (the interval's ticks, not the news).
            assert!(
                batches <= 1,
                "{batches} position batches in 4 s per 10 s tick"
            );
        }
        dispatcher.close().await;
    }
    Ok(())
}
