//! With a credentials file, the bridge's embedded broker authenticates every device and the
//! bridge itself: provisioned vehicles flow to dispatchers, a wrong password is refused.

use tests::provision::provision;
use tests::sio::SioClient;
use tests::stack::{start_bridge, start_sim, write_bridge_config};
use tests::{WAIT, mosquitto};

/// The token `SioClient::dispatcher` presents, configured (in plain: the test's own).
const DISPATCHER: &str =
    "[[tokens]]\ntoken = \"dispatch-demo\"\nrole = \"dispatcher\"\nfleets = [\"*\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_authenticates_devices_and_bridge() -> anyhow::Result<()> {
    let creds = provision(&["auth-0001"]).await?;
    let broker_file = creds.broker_file.to_str().unwrap_or_default();
    let sim_file = creds.sim_file.to_str().unwrap_or_default();
    // With a credentials file the demo tokens are off: the dispatcher's token is configured.
    let config = write_bridge_config(DISPATCHER)?;
    let config_arg = config.path().to_str().unwrap_or_default();
    let mut bridge = start_bridge(&[
        "--credentials",
        broker_file,
        "--mqtt-password",
        &creds.bridge_password,
        "--config",
        config_arg,
    ])
    .await?;
    let _sim = start_sim(
        bridge.mqtt,
        1,
        "auth",
        &["--rate", "5", "--credentials", sim_file],
    )?;
    let mut dispatcher = SioClient::dispatcher(&bridge.url()).await?;
    dispatcher.join("vehicle:auth-0001").await?;
    dispatcher
        .positions_until(WAIT, |p| p["vehicle"] == "auth-0001")
        .await?;

    // A wrong password is refused by the broker, which counts it; the vehicle is unaffected.
    let mut cmd = mosquitto::client("mosquitto_pub", bridge.mqtt);
    cmd.args([
        "-i",
        "auth-0001",
        "-u",
        "auth-0001",
        "-P",
        "not-the-password",
    ])
    .args(["-t", "fleet/auth/auth-0001/hb", "-m", "x"]);
    let refused = mosquitto::finish(cmd, None).await?;
    assert!(!refused.status.success(), "a wrong password was accepted");
    let refusals = bridge
        .metric_sum("fleetbeat_broker_auth_refused_total")
        .await?;
    assert!(refusals >= 1.0, "refusals counted: {refusals}");
    bridge.program.wait_for_line("auth-0001", WAIT).await?;
    dispatcher.drain_events("position");
    dispatcher
        .positions_until(WAIT, |p| p["vehicle"] == "auth-0001")
        .await?;
    dispatcher.close().await;
    Ok(())
}
