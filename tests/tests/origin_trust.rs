//! A device cannot speak for another: spoofed, moved and replayed payloads are rejected,
//! counted and logged, and the vehicle they pretended to be is unaffected.

use shared::{Heartbeat, Position, Topic};
use tests::provision::provision;
use tests::sio::SioClient;
use tests::stack::{
    free_port, start_bridge_external, start_broker_process, start_sim, write_bridge_config,
};
use tests::{WAIT, mosquitto};

/// The token `SioClient::dispatcher_in` presents, configured (in plain: the test's own).
const DISPATCHER: &str =
    "[[tokens]]\ntoken = \"dispatch-demo\"\nrole = \"dispatcher\"\nfleets = [\"*\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_and_replayed_payloads_are_rejected() -> anyhow::Result<()> {
    // Real credentials: the embedded broker authenticates every device and the bridge; the
    // bridge checks every payload's seal against the device's key.
    let creds = provision(&["spoof-0001", "spoof-0002"]).await?;
    let broker_file = creds.broker_file.to_str().unwrap_or_default();
    let sim_file = creds.sim_file.to_str().unwrap_or_default();
    // An external broker with no topic ACLs (any broker a user may run): the bridge alone
    // stands between a device and another vehicle's identity.
    let mqtt = free_port()?;
    let _broker = start_broker_process(mqtt, &[]).await?;
    // With a credentials file the demo tokens are off: the dispatcher's token is configured.
    let config = write_bridge_config(DISPATCHER)?;
    let config_arg = config.path().to_str().unwrap_or_default();
    let mut bridge = start_bridge_external(
        mqtt,
        &["--credentials", broker_file, "--config", config_arg],
    )
    .await?;
    let _sim = start_sim(
        bridge.mqtt,
        2,
        "spoof",
        &["--rate", "5", "--credentials", sim_file],
    )?;
    let key = |d: &str| creds.devices.get(d).map(|(_, k)| *k).unwrap_or_default();

    let mut dispatcher = SioClient::dispatcher_in(&bridge.url(), "vehicle:spoof-0001").await?;
    dispatcher
        .positions_until(WAIT, |p| p["vehicle"] == "spoof-0001")
        .await?;

    // 1. spoof-0002 (valid credentials, its own key) publishes on spoof-0001's topic.
    let victim = Topic::parse("fleet/spoof/spoof-0001/hb").map_err(anyhow::Error::msg)?;
    let fake = Heartbeat {
        seq: 4_242_424,
        ts_ms: u64::MAX / 2,
        pos: Position::new(10_000_000, 10_000_000),
        ..Heartbeat::default()
    };
    let mut buf = [0u8; shared::MAX_PAYLOAD];
    let attacker_key = key("spoof-0002");
    let spoofed = shared::seal(&fake, &victim.name(), u64::MAX / 2, &attacker_key, &mut buf)
        .map_err(anyhow::Error::msg)?
        .to_vec();
    mosquitto::publish(bridge.mqtt, &victim.name(), &spoofed, 0).await?;
    // 2. A vehicle nobody provisioned.
    mosquitto::publish(bridge.mqtt, "fleet/spoof/ghost-0001/hb", &spoofed, 0).await?;
    // 3. A genuine heartbeat of spoof-0001, captured and played again.
    let captured = mosquitto::sub_payloads(bridge.mqtt, &victim.name(), 1).await?;
    let genuine = shared::open::<Heartbeat>(&captured[0], &victim.name(), &key("spoof-0001"))
        .map_err(|e| anyhow::anyhow!("the simulator's payload must be sealed with its key: {e}"))?;
    dispatcher
        .positions_until(WAIT, |p| {
            p["seq"].as_u64() > Some(u64::from(genuine.msg.seq))
        })
        .await?;
    mosquitto::publish(bridge.mqtt, &victim.name(), &captured[0], 0).await?;

    let auth = "fleetbeat_bridge_mqtt_rejected_total{reason=\"auth\"}";
    let replay = "fleetbeat_bridge_mqtt_rejected_total{reason=\"replay\"}";
    let deadline = tokio::time::Instant::now() + WAIT;
    while bridge.metric(auth).await? < 2.0 || bridge.metric(replay).await? < 1.0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "not counted:\n{}",
            bridge.program.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let line = bridge
        .program
        .wait_for_line("unauthenticated origin", WAIT)
        .await?;
    assert!(line.contains("fleet/spoof/spoof-0001/hb"), "{line}");
    bridge.program.wait_for_line("ghost-0001", WAIT).await?;
    bridge
        .program
        .wait_for_line("rejected MQTT message: replay", WAIT)
        .await?;

    // The victim is unaffected: its real positions keep coming, the fake one never arrived.
    let after = dispatcher
        .positions_until(WAIT, |p| {
            p["seq"].as_u64() > Some(u64::from(genuine.msg.seq) + 5)
        })
        .await?;
    let mut all = after;
    all.extend(
        dispatcher
            .drain_events("position")
            .into_iter()
            .flat_map(|b| b.as_array().cloned().unwrap_or_default()),
    );
    assert!(
        all.iter().all(|p| p["seq"] != 4_242_424),
        "the spoofed position was delivered"
    );
    let (_, state) = bridge
        .get_json("/api/vehicles/spoof-0001", Some("dispatch-demo"))
        .await?;
    assert_eq!(state["status"], "online", "{state}");
    assert_ne!(state["position"]["seq"], 4_242_424);
    dispatcher.close().await;
    Ok(())
}
