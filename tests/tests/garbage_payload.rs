//! Garbage on a heartbeat topic is counted and logged, and the bridge keeps serving.
//! This scenario also runs the bridge against an external broker (`--mqtt-url`).

use serde_json::json;
use tests::sio::SioClient;
use tests::stack::{start_bridge_external, start_broker, start_sim};
use tests::{WAIT, mosquitto};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_counted_logged_and_survived() -> anyhow::Result<()> {
    let broker = start_broker().await?;
    let mut bridge = start_bridge_external(broker.v4_addr(), &[]).await?;
    let decode_rejects = "fleetbeat_bridge_mqtt_rejected_total{reason=\"decode\"}";
    let topic_rejects = "fleetbeat_bridge_mqtt_rejected_total{reason=\"topic\"}";
    assert_eq!(bridge.metric(decode_rejects).await?, 0.0);

    // Not postcard at all, a future protocol version, and a truncated heartbeat.
    let garbage: [&[u8]; 3] = [b"{\"lat\": 52.5}", &[9, 1, 2, 3], &[1, 0xd2]];
    for payload in garbage {
        mosquitto::publish(broker.v4_addr(), "fleet/west/west-0001/hb", payload, 0).await?;
    }
    // A heartbeat on a topic whose vehicle id is invalid.
    mosquitto::publish(broker.v4_addr(), "fleet/west/bad:id/hb", &[1, 0], 0).await?;

    let deadline = tokio::time::Instant::now() + WAIT;
    while bridge.metric(decode_rejects).await? < 3.0 || bridge.metric(topic_rejects).await? < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rejections not counted:\n{}",
            bridge.program.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(bridge.metric(decode_rejects).await?, 3.0);
    let line = bridge.program.wait_for_line("bad payload", WAIT).await?;
    assert!(
        line.contains("fleet/west/west-0001/hb"),
        "the log names the topic: {line}"
    );
    bridge
        .program
        .wait_for_line("unsupported protocol version 9", WAIT)
        .await?;
    bridge.program.wait_for_line("bad topic", WAIT).await?;

    // Still serving: a real vehicle's positions reach a dispatcher.
    let _sim = start_sim(broker.v4_addr(), 1, "west", &["--rate", "5"])?;
    let mut client = SioClient::dispatcher(&bridge.url()).await?;
    assert_eq!(client.join("fleet:west").await?, json!({ "ok": true }));
    let positions = client
        .positions_until(WAIT, |p| p["vehicle"] == "west-0001")
        .await?;
    assert!(!positions.is_empty());
    assert!(bridge.program.is_running());
    client.close().await;
    Ok(())
}
