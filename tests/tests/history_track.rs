//! Every heartbeat is stored; the history API returns the track a vehicle drove, in order, as
//! JSON and GeoJSON.

use serde_json::{Value, json};
use tests::sio::{DISPATCH_TOKEN, SioClient};
use tests::stack::{BridgeProcess, start_bridge, start_sim};

/// `GET /api/vehicles/hist-0001/track{query}` as a dispatcher: status and body.
async fn get_track(bridge: &BridgeProcess, query: &str) -> anyhow::Result<(u16, Value)> {
    let path = format!("/api/vehicles/hist-0001/track{query}");
    bridge.get_json(&path, Some(DISPATCH_TOKEN)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_comes_back_in_order_in_both_formats() -> anyhow::Result<()> {
    let bridge = start_bridge(&[]).await?;
    let _sim = start_sim(bridge.mqtt, 1, "hist", &["--rate", "10"])?;
    let mut dispatcher = SioClient::dispatcher(&bridge.url()).await?;
    dispatcher.join("vehicle:hist-0001").await?;
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.extend(dispatcher.positions_until(tests::WAIT, |_| true).await?);
    }
    let last_ts = seen
        .iter()
        .filter_map(|p| p["ts_ms"].as_u64())
        .max()
        .unwrap_or_default();

    // The history writer flushes in batches: wait until it holds what the dispatcher saw.
    let to_last = format!("?to={last_ts}");
    let deadline = tokio::time::Instant::now() + tests::WAIT;
    let points = loop {
        let (status, track) = get_track(&bridge, &to_last).await?;
        assert_eq!(status, 200, "{track}");
        let points = track["points"].as_array().cloned().unwrap_or_default();
        if points.last().and_then(|p| p["ts_ms"].as_u64()) == Some(last_ts) {
            break points;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "track never caught up: {track}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(points.len() >= 10, "{} points", points.len());
    let ts: Vec<u64> = points.iter().filter_map(|p| p["ts_ms"].as_u64()).collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "in time order: {ts:?}");
    let seqs: Vec<u64> = points.iter().filter_map(|p| p["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // The very positions the dispatcher saw live are in the history.
    for p in &seen {
        let stored = points
            .iter()
            .find(|q| q["seq"] == p["seq"])
            .expect("stored");
        assert_eq!((&stored["lat"], &stored["lon"]), (&p["lat"], &p["lon"]));
    }

    let (status, geo) = get_track(&bridge, &format!("{to_last}&format=geojson")).await?;
    assert_eq!(status, 200);
    assert_eq!(geo["type"], "Feature");
    assert_eq!(geo["geometry"]["type"], "LineString");
    let coords = geo["geometry"]["coordinates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(coords.len(), points.len());
    assert_eq!(
        coords[0],
        json!([points[0]["lon"], points[0]["lat"]]),
        "GeoJSON is [lon, lat]"
    );

    // A window, and bad requests.
    let mid = ts[ts.len() / 2];
    let (_, window) = get_track(&bridge, &format!("?from={mid}&to={last_ts}")).await?;
    let window = window["points"].as_array().cloned().unwrap_or_default();
    assert!(window.iter().all(|p| p["ts_ms"].as_u64() >= Some(mid)));
    assert_eq!(window.len(), ts.iter().filter(|t| **t >= mid).count());
    let (status, _) = get_track(&bridge, "?format=kml").await?;
    assert_eq!(status, 400);
    let (status, _) = get_track(&bridge, "?from=5&to=1").await?;
    assert_eq!(status, 400);
    let (status, _) = bridge
        .get_json("/api/vehicles/hist-0001/track", None)
        .await?;
    assert_eq!(status, 401);
    dispatcher.close().await;
    Ok(())
}
