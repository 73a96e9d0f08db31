//! Commands round-trip to a simulated vehicle and back, over Socket.IO and the HTTP API; a
//! vehicle that does not answer gives a timeout, not silence.

use serde_json::{Value, json};
use tests::WAIT;
use tests::sio::{DISPATCH_TOKEN, SioClient};
use tests::stack::{BridgeProcess, start_bridge, start_sim};

/// Sends `command` over Socket.IO and returns the ack.
async fn command(dispatcher: &mut SioClient, command: Value) -> anyhow::Result<Value> {
    dispatcher.emit_ack("command", json!([command])).await
}

/// Sends `command` to cmd-0001 over HTTP and returns status and answer.
async fn http_command(bridge: &BridgeProcess, command: Value) -> anyhow::Result<(u16, Value)> {
    bridge
        .post_json("/api/vehicles/cmd-0001/commands", DISPATCH_TOKEN, &command)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_round_trip_and_time_out() -> anyhow::Result<()> {
    let bridge = start_bridge(&["--command-timeout-ms", "1500"]).await?;
    let mut sim = start_sim(bridge.mqtt, 1, "cmd", &["--rate", "5"])?;
    let mut dispatcher = SioClient::dispatcher(&bridge.url()).await?;
    let mut watcher = SioClient::dispatcher(&bridge.url()).await?;
    for c in [&mut dispatcher, &mut watcher] {
        assert_eq!(c.join("vehicle:cmd-0001").await?, json!({ "ok": true }));
    }
    dispatcher
        .positions_until(WAIT, |p| p["vehicle"] == "cmd-0001")
        .await?;

    // Socket.IO: the ack callback completes with the device's answer.
    let pong = command(
        &mut dispatcher,
        json!({ "vehicle": "cmd-0001", "type": "ping" }),
    )
    .await?;
    assert_eq!(pong["ok"], true, "{pong}");
    assert_eq!(pong["result"], "ok");
    let id = pong["command_id"].as_u64().expect("command_id");
    // Everyone watching the vehicle sees the ack.
    let seen = watcher.next_event("ack", WAIT).await?;
    assert_eq!(
        (seen["vehicle"].as_str(), seen["command_id"].as_u64()),
        (Some("cmd-0001"), Some(id))
    );

    let rate = command(
        &mut dispatcher,
        json!({ "vehicle": "cmd-0001", "type": "set_rate", "interval_ms": 200 }),
    )
    .await?;
    assert_eq!(rate["result"], "ok", "{rate}");
    let bad = command(
        &mut dispatcher,
        json!({ "vehicle": "cmd-0001", "type": "set_rate", "interval_ms": 5 }),
    )
    .await?;
    assert_eq!(bad["ok"], false);
    assert!(
        bad["error"]
            .as_str()
            .unwrap_or_default()
            .contains("interval_ms"),
        "{bad}"
    );
    let unknown = command(
        &mut dispatcher,
        json!({ "vehicle": "nobody", "type": "ping" }),
    )
    .await?;
    assert_eq!(unknown["error"], "unknown vehicle");

    // HTTP API with the same tokens.
    let (status, list) = bridge
        .get_json("/api/vehicles", Some(DISPATCH_TOKEN))
        .await?;
    assert_eq!(status, 200);
    assert!(
        list.as_array()
            .is_some_and(|l| l.iter().any(|v| v["vehicle"] == "cmd-0001")),
        "{list}"
    );
    let (status, err) = bridge.get_json("/api/vehicles", None).await?;
    assert_eq!(status, 401);
    assert!(
        err["error"]
            .as_str()
            .is_some_and(|e| e.contains("missing token")),
        "{err}"
    );
    let (status, _) = bridge
        .get_json("/api/vehicles", Some("vendor-demo"))
        .await?;
    assert_eq!(status, 403);
    let (status, err) = bridge
        .get_json("/api/vehicles/nobody", Some(DISPATCH_TOKEN))
        .await?;
    assert_eq!(
        (status, err["error"].as_str()),
        (404, Some("unknown vehicle"))
    );
    let (status, answer) = http_command(&bridge, json!({ "type": "return_to_depot" })).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"], "ok");
    let (status, _) = http_command(&bridge, json!({ "type": "self_destruct" })).await?;
    assert_eq!(status, 400);

    // A frozen vehicle (connection open, nothing answered) gives a timeout.
    sim.signal("STOP")?;
    let silent = command(
        &mut dispatcher,
        json!({ "vehicle": "cmd-0001", "type": "ping" }),
    )
    .await?;
    assert_eq!(silent["ok"], false, "{silent}");
    assert!(
        silent["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("timeout"),
        "{silent}"
    );
    let (status, err) = http_command(&bridge, json!({ "type": "ping" })).await?;
    assert_eq!(status, 504, "{err}");
    sim.signal("CONT")?;
    sim.kill().await?;
    assert!(
        bridge
            .metric("fleetbeat_bridge_commands_timed_out_total")
            .await?
            >= 2.0
    );
    dispatcher.close().await;
    watcher.close().await;
    Ok(())
}
