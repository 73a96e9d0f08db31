//! Socket.IO abuse limits (issue 14), each set with its flag, each refusal seen by a real
//! `socket.io-client` and counted in `/metrics`: connections per token, rooms per socket, joins
//! per second, `getAll` pages, the Origin of the handshake, the size of an incoming message.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use shared::{DeliveryEvent, DeliveryKind, OrderId, Position, VehicleId};
use tests::WAIT;
use tests::node::node_dir;
use tests::peer::Peer;
use tests::sio::{DISPATCH_TOKEN, SioClient};
use tests::stack::{BridgeProcess, start_bridge};

/// The bridge's count of refusals by `limit`.
async fn refused(bridge: &BridgeProcess, limit: &str) -> anyhow::Result<f64> {
    bridge
        .metric(&format!(
            "fleetbeat_bridge_socketio_refused_total{{limit=\"{limit}\"}}"
        ))
        .await
}

/// Publishes a delivery event about an order nobody placed, from vehicle `vehicle` of the demo
/// fleet (open mode): queued, flagged, for the demo dispatchers.
async fn stray_event(bridge: &BridgeProcess, vehicle: &str, seq: u32) -> anyhow::Result<()> {
    let now = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?;
    let id = VehicleId::new(vehicle).map_err(anyhow::Error::msg)?;
    let event = DeliveryEvent {
        seq,
        order: OrderId::new(&format!("stray-{seq}")).map_err(anyhow::Error::msg)?,
        kind: DeliveryKind::Pickup,
        ts_ms: now,
        pos: Position::new(525_000_000, 133_900_000),
    };
    let topic = format!("fleet/demo/{vehicle}/event");
    let mut buf = [0u8; 128];
    let sealed = shared::seal(
        &event,
        &topic,
        now + u64::from(seq),
        &shared::open_mode_key(&id),
        &mut buf,
    )
    .map_err(anyhow::Error::msg)?;
    tests::mosquitto::publish(bridge.mqtt, &topic, sealed, 1).await
}

/// The `message_id`s of the `delivery` events `client` got so far, in order.
fn delivered_ids(client: &mut SioClient) -> Vec<u64> {
    client
        .drain_events("delivery")
        .iter()
        .filter_map(|d| d["message_id"].as_u64())
        .collect()
}

/// A demo dispatcher at `url`, connected as soon as its token has a connection free (a slot
/// given back when the bridge has seen a closed connection go).
async fn connect_when_free(url: &str) -> anyhow::Result<SioClient> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut client =
            SioClient::spawn(url, "/dispatch", Some(json!({ "token": DISPATCH_TOKEN })))?;
        let outcome = client
            .next_matching(WAIT, |v| {
                matches!(v["type"].as_str(), Some("connect" | "connect_error"))
            })
            .await?;
        if outcome["type"] == "connect" {
            return Ok(client);
        }
        client.close().await;
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no connection free within {WAIT:?}: {outcome}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_rooms_and_queue_pages_are_bounded() -> anyhow::Result<()> {
    let bridge = start_bridge(&[
        "--socketio-connections-per-token",
        "2",
        "--socketio-rooms-per-socket",
        "2",
        "--socketio-get-all-page",
        "2",
    ])
    .await?;
    let url = bridge.url();

    // Connections per token: a third one with the same token is refused in the handshake.
    let mut first = SioClient::dispatcher(&url).await?;
    let second = SioClient::dispatcher(&url).await?;
    let token = Some(json!({ "token": DISPATCH_TOKEN }));
    let third = SioClient::refused(&url, "/dispatch", token.clone()).await?;
    assert!(third.contains("too many connections"), "{third}");
    assert!(refused(&bridge, "connections_per_token").await? >= 1.0);
    // Another token is counted on its own.
    SioClient::connect_with_token(&url, "/admin", "admin-demo")
        .await?
        .close()
        .await;

    // Rooms per socket, even for a dispatcher of every fleet.
    for room in ["vehicle:r1", "vehicle:r2"] {
        assert_eq!(first.join(room).await?, json!({ "ok": true }), "{room}");
    }
    let third_room = first.join("vehicle:r3").await?;
    assert_eq!(third_room["ok"], false, "{third_room}");
    assert!(
        third_room["error"]
            .as_str()
            .is_some_and(|e| e.contains("too many rooms")),
        "{third_room}"
    );
    assert_eq!(refused(&bridge, "rooms_per_socket").await?, 1.0);
    assert_eq!(
        first.join("vehicle:r1").await?["ok"],
        true,
        "a room it is in"
    );
    assert_eq!(
        first.emit_ack("leave", json!(["vehicle:r1"])).await?["ok"],
        true
    );
    assert_eq!(first.join("vehicle:r3").await?["ok"], true, "after a leave");

    // The second connection closes: its slot is given back (once the bridge has seen it go).
    second.close().await;
    let again = connect_when_free(&url).await?;

    // getAll pages: 5 messages queued for the demo dispatcher identity, pages of 2.
    for seq in 1..=5 {
        stray_event(&bridge, "v-stray", seq).await?;
    }
    let mut live = Vec::new();
    while live.len() < 5 {
        let d = first.next_event("delivery", WAIT).await?;
        live.push(d["message_id"].as_u64().unwrap_or_default());
    }
    again.close().await;
    let mut reader = connect_when_free(&url).await?;
    // On connect: the first page only (more would show in the first getAll's page below).
    let mut on_connect = Vec::new();
    while on_connect.len() < 2 {
        let d = reader.next_event("delivery", WAIT).await?;
        on_connect.push(d["message_id"].as_u64().unwrap_or_default());
    }
    assert_eq!(
        on_connect,
        live[..2],
        "the first page is re-sent on connect"
    );

    let page = reader.emit_ack("getAll", json!([])).await?;
    assert_eq!(page["count"], 2, "{page}");
    assert_eq!(page["next"], json!(live[1]), "{page}");
    let mut pages = vec![delivered_ids(&mut reader)];
    let mut next: Value = page["next"].clone();
    while !next.is_null() {
        let page = reader
            .emit_ack("getAll", json!([{ "after": next, "limit": 1000 }]))
            .await?;
        assert_eq!(page["ok"], true, "{page}");
        assert!(page["count"].as_u64().is_some_and(|c| c <= 2), "{page}");
        pages.push(delivered_ids(&mut reader));
        next = page["next"].clone();
    }
    assert_eq!(pages, [&live[..2], &live[2..4], &live[4..]], "pages of 2");
    let bad = reader.emit_ack("getAll", json!(["everything"])).await?;
    assert_eq!(bad["ok"], false, "{bad}");
    for c in [first, reader] {
        c.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_are_throttled_per_socket() -> anyhow::Result<()> {
    let bridge = start_bridge(&["--socketio-joins-per-second", "1"]).await?;
    let mut dispatcher = SioClient::dispatcher(&bridge.url()).await?;
    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(dispatcher.join("all").await?);
    }
    assert_eq!(answers[0], json!({ "ok": true }), "the first join");
    let throttled = answers
        .iter()
        .filter(|a| {
            a["error"]
                .as_str()
                .is_some_and(|e| e.contains("too many joins"))
        })
        .count();
    // A burst of one, then one a second: ten joins in a row cannot all pass unless they took
    // nine seconds.
    assert!(throttled >= 1, "{answers:?}");
    assert_eq!(
        refused(&bridge, "joins_per_second").await?,
        throttled as f64
    );
    // Another socket has its own budget.
    let mut other = SioClient::dispatcher(&bridge.url()).await?;
    assert_eq!(other.join("all").await?, json!({ "ok": true }));
    for c in [dispatcher, other] {
        c.close().await;
    }
    Ok(())
}

/// The outcome (`connect` or `connect_error`) of a `socket.io-client` on `/dispatch` with the
/// demo token and the extra client `options` (headers, transports).
async fn handshake_with(bridge: &BridgeProcess, options: Value) -> anyhow::Result<Value> {
    let mut cmd = tokio::process::Command::new("node");
    let dir = node_dir()?;
    cmd.arg(dir.join("sio-client.mjs"))
        .arg(bridge.url())
        .arg("/dispatch")
        .arg(json!({ "token": DISPATCH_TOKEN }).to_string())
        .env("FLEETBEAT_SIO_OPTIONS", options.to_string())
        .current_dir(&dir);
    let mut client = Peer::spawn("sio-client", cmd)?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let outcome = loop {
        match client.next_until(deadline).await {
            Ok(Some(v)) if matches!(v["type"].as_str(), Some("connect" | "connect_error")) => {
                break v;
            }
            Ok(Some(_)) => {}
            Ok(None) => anyhow::bail!("sio-client exited"),
            Err(_) => anyhow::bail!("no handshake outcome within {WAIT:?}"),
        }
    };
    let _ = client.send_json(&json!({ "op": "exit" })).await;
    client.finish(Duration::from_secs(5)).await;
    Ok(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origins_and_oversized_messages_are_refused() -> anyhow::Result<()> {
    let bridge = start_bridge(&["--socketio-max-payload-bytes", "2000"]).await?;
    let own = bridge.url();
    for transport in ["websocket", "polling"] {
        let foreign = handshake_with(
            &bridge,
            json!({
                "transports": [transport],
                "reconnection": false,
                "extraHeaders": { "Origin": "http://elsewhere.example" },
            }),
        )
        .await?;
        assert_eq!(foreign["type"], "connect_error", "{transport}: {foreign}");
        let same = handshake_with(
            &bridge,
            json!({
                "transports": [transport],
                "reconnection": false,
                "extraHeaders": { "Origin": own },
            }),
        )
        .await?;
        assert_eq!(same["type"], "connect", "{transport}: {same}");
    }
    assert!(refused(&bridge, "origin").await? >= 2.0);
    // Without an Origin (not a browser): let through.
    let mut dispatcher = SioClient::dispatcher(&own).await?;
    assert_eq!(dispatcher.join("all").await?["ok"], true);

    // A message over max_payload_bytes closes the connection instead of being read.
    let huge = "x".repeat(10_000);
    dispatcher.emit("join", json!([huge])).await?;
    dispatcher
        .next_matching(WAIT, |v| v["type"] == "disconnect")
        .await?;
    dispatcher.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_packet_to_a_socket_is_larger_than_max_packet_bytes() -> anyhow::Result<()> {
    // 4 KiB packets; a slow tick, never a flush between ticks, so that each tick's position
    // batch carries every vehicle.
    let bridge = start_bridge(&[
        "--socketio-max-packet-bytes",
        "4096",
        "--tick-ms",
        "1000",
        "--flush-at-once-below",
        "0",
    ])
    .await?;
    let _sim = tests::stack::start_sim(bridge.mqtt, 120, "north", &["--rate", "2"])?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, vehicles) = bridge
            .get_json("/api/vehicles", Some(DISPATCH_TOKEN))
            .await?;
        let known = vehicles.as_array().map_or(0, Vec::len);
        if known == 120 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the bridge knows {known} of 120 vehicles"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A snapshot of 120 vehicles (~20 KB) comes in parts, each within the bound, together
    // naming every vehicle once.
    let mut dispatcher = SioClient::dispatcher(&bridge.url()).await?;
    assert_eq!(dispatcher.join("fleet:north").await?, json!({ "ok": true }));
    let mut vehicles = std::collections::BTreeSet::new();
    let mut parts = 0;
    while vehicles.len() < 120 {
        let part = dispatcher.next_event("snapshot", WAIT).await?;
        let size = serde_json::to_string(&part)?.len();
        assert!(size <= 4096, "a snapshot part of {size} bytes");
        for v in part.as_array().map(Vec::as_slice).unwrap_or_default() {
            let id = v["vehicle"]
                .as_str()
                .or(v["id"].as_str())
                .unwrap_or_default();
            assert!(vehicles.insert(id.to_owned()), "{id} twice");
        }
        parts += 1;
    }
    assert!(parts >= 4, "120 vehicles in {parts} parts");

    // Position batches too: a tick's positions (every vehicle's, once a second) in several
    // `position` events, none past the bound, and none lost: the parts of one tick arrive
    // together (a second apart from the next tick's), and together they name every vehicle
    // once. (Emitted volatile, each part would replace the previous one not yet written.)
    dispatcher.drain_events("position");
    let mut ticks: Vec<Vec<String>> = Vec::new();
    let mut last = tokio::time::Instant::now();
    while ticks.len() < 4 {
        let batch = dispatcher.next_event("position", WAIT).await?;
        let now = tokio::time::Instant::now();
        let size = serde_json::to_string(&batch)?.len();
        assert!(size <= 4096, "a position batch of {size} bytes");
        if ticks.is_empty() || now.duration_since(last) > Duration::from_millis(400) {
            ticks.push(Vec::new());
        }
        last = now;
        let tick = ticks.last_mut().expect("a tick");
        for p in batch.as_array().map(Vec::as_slice).unwrap_or_default() {
            tick.push(p["vehicle"].as_str().unwrap_or_default().to_owned());
        }
    }
    // The first tick may have been partly drained, the last may still be arriving.
    for (i, tick) in ticks[1..3].iter().enumerate() {
        let distinct: std::collections::BTreeSet<&String> = tick.iter().collect();
        assert_eq!(
            (tick.len(), distinct.len()),
            (120, 120),
            "tick {}: {} positions of {} vehicles, not 120 of 120",
            i + 1,
            tick.len(),
            distinct.len()
        );
    }
    Ok(())
}
