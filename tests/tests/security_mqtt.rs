//! MQTT identity and the broker's abuse limits (issue 14), with the real Debian clients
//! against the real binaries: an observer cannot take the bridge's session (the reproduction
//! of the issue) and the bridge keeps receiving; a device cannot publish into another fleet;
//! repeated failed logins are throttled.

use std::time::Duration;

use tests::WAIT;
use tests::mosquitto::{Finished, client, finish, hex, watch_as};
use tests::provision::provision;
use tests::stack::{broker_credentials_command, provision_fleet, start_bridge, start_sim};

/// Waits until `read` returns more than `above`.
async fn until_above<F, Fut>(what: &str, above: f64, read: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<f64>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value = read().await?;
        if value > above {
            return Ok(value);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what} stayed at {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `mosquitto_sub` as `client_id`, logged in as `login`, for one message of `topic`.
async fn sub_once(
    mqtt: std::net::SocketAddr,
    client_id: &str,
    login: (&str, &str),
    extra: &[&str],
) -> anyhow::Result<Finished> {
    let mut cmd = client("mosquitto_sub", mqtt);
    cmd.args(["-i", client_id, "-u", login.0, "-P", login.1]);
    cmd.args(["-t", "fleet/#", "-C", "1", "-W", "10"]);
    cmd.args(extra);
    finish(cmd, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_cannot_take_the_bridges_session() -> anyhow::Result<()> {
    let creds = provision(&["sec-0001"]).await?;
    let broker_file = creds.broker_file.to_str().unwrap_or_default();
    let sim_file = creds.sim_file.to_str().unwrap_or_default();
    let (alice, _) = broker_credentials_command(&[
        "add-client",
        "alice",
        "--role",
        "observer",
        "--credentials",
        broker_file,
    ])
    .await?;
    let bridge = start_bridge(&[
        "--credentials",
        broker_file,
        "--mqtt-password",
        &creds.bridge_password,
    ])
    .await?;
    let _sim = start_sim(
        bridge.mqtt,
        1,
        "sec",
        &["--rate", "5", "--credentials", sim_file],
    )?;
    let received = || bridge.metric_sum("fleetbeat_bridge_mqtt_received_total");
    until_above("the bridge's received messages", 0.0, received).await?;

    // The reproduction: alice (observer) connects as the bridge, with a persistent session
    // (`-c`) to keep its queued events, and as its heartbeat session. Refused: CONNACK 5.
    for (client_id, extra) in [
        ("fleetbeat-bridge", &["-c"][..]),
        ("fleetbeat-bridge", &[][..]),
        ("fleetbeat-bridge-hb", &[][..]),
        ("sec-0001", &[][..]),
    ] {
        let refused = sub_once(bridge.mqtt, client_id, ("alice", &alice), extra).await?;
        assert_eq!(refused.status.code(), Some(5), "{client_id}: {refused:?}");
        assert!(
            refused.stderr.contains("not authorised"),
            "{client_id}: {}",
            refused.stderr
        );
    }
    assert_eq!(
        bridge
            .metric("fleetbeat_broker_auth_refused_total{reason=\"client_id_mismatch\"}")
            .await?,
        4.0
    );
    // The bridge kept its sessions: nobody was taken over, and it still receives.
    assert_eq!(
        bridge
            .metric("fleetbeat_broker_disconnects_total{reason=\"taken_over\"}")
            .await?,
        0.0
    );
    let now = received().await?;
    until_above("the bridge's received messages", now, received).await?;
    assert_eq!(bridge.metric("fleetbeat_bridge_mqtt_ready").await?, 1.0);

    // What alice may do: watch under her own name, or mosquitto's random id (clean session).
    let seen = sub_once(bridge.mqtt, "alice-laptop", ("alice", &alice), &["-c"]).await?;
    assert!(seen.status.success(), "{seen:?}");
    let mut cmd = client("mosquitto_sub", bridge.mqtt);
    cmd.args([
        "-u", "alice", "-P", &alice, "-t", "fleet/#", "-C", "1", "-W", "10",
    ]);
    let seen = finish(cmd, None).await?;
    assert!(seen.status.success(), "{seen:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_publish_into_another_fleet() -> anyhow::Result<()> {
    let fleet = provision_fleet(1, "north").await?;
    let (van, _) = fleet.add_device("van-0001").await?;
    let alice = fleet.add_client("alice", "observer").await?;
    let mut broker = fleet.start_broker(&[]).await?;
    let mut watch = watch_as(
        broker.mqtt,
        "alice",
        ("alice", &alice),
        &["-t", "fleet/#", "-F", "%t %x"],
    )
    .await?;
    let mqtt = broker.mqtt;
    let publish = |topic: &str, payload: &str| {
        let mut cmd = client("mosquitto_pub", mqtt);
        cmd.args(["-i", "van-0001", "-u", "van-0001", "-P", &van]);
        cmd.args(["-t", topic, "-m", payload, "-q", "1"]);
        cmd
    };
    // van-0001 of fleet north publishes as if it were in south: acknowledged (so it does not
    // retry forever), dropped, counted, logged.
    for kind in ["hb", "event", "status", "ack"] {
        let done = finish(
            publish(&format!("fleet/south/van-0001/{kind}"), "moved"),
            None,
        )
        .await?;
        assert!(done.status.success(), "{done:?}");
    }
    let acl = "fleetbeat_broker_dropped_total{reason=\"acl\"}";
    broker.wait_metric(acl, |n| n == 4.0).await?;
    let line = broker.log_line("publish refused by the topic ACL").await?;
    assert!(line.contains("fleet/south/van-0001/"), "{line}");
    // Its own fleet goes through; sent after the refused ones, it would arrive after them.
    let done = finish(publish("fleet/north/van-0001/hb", "mine"), None).await?;
    assert!(done.status.success(), "{done:?}");
    watch
        .next_matching(WAIT, |l| {
            l == format!("fleet/north/van-0001/hb {}", hex(b"mine"))
        })
        .await?;
    let leaked: Vec<&String> = watch
        .seen()
        .iter()
        .filter(|l| l.starts_with("fleet/south/"))
        .collect();
    assert!(
        leaked.is_empty(),
        "delivered into another fleet: {leaked:?}"
    );
    // Nor may it wait for another fleet's commands.
    let mut cmd = client("mosquitto_sub", broker.mqtt);
    cmd.args(["-i", "van-0001", "-u", "van-0001", "-P", &van]);
    cmd.args(["-t", "fleet/south/van-0001/cmd", "-C", "1", "-W", "5"]);
    let denied = finish(cmd, None).await?;
    assert!(
        denied.stderr.contains("denied") || !denied.status.success(),
        "{denied:?}"
    );
    watch.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_are_throttled() -> anyhow::Result<()> {
    let fleet = provision_fleet(1, "north").await?;
    let (van, _) = fleet.add_device("van-0001").await?;
    let broker = fleet
        .start_broker(&["--max-login-failures", "2", "--login-failure-window", "10m"])
        .await?;
    let login = |password: &str| {
        let mut cmd = client("mosquitto_pub", broker.mqtt);
        cmd.args(["-i", "van-0001", "-u", "van-0001", "-P", password]);
        cmd.args(["-t", "fleet/north/van-0001/hb", "-m", "x"]);
        cmd
    };
    // The device, once: its password is verified and remembered.
    assert!(finish(login(&van), None).await?.status.success());
    for _ in 0..2 {
        let refused = finish(login("guess-guess"), None).await?;
        assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    }
    // Beyond the bound: the same answer, without a password check, counted apart.
    let refused = finish(login("guess-again"), None).await?;
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("Connection Refused: bad user name or password"),
        "{refused:?}"
    );
    let throttled = "fleetbeat_broker_auth_refused_total{reason=\"throttled\"}";
    assert_eq!(broker.metric(throttled).await?, 1.0);
    assert_eq!(
        broker
            .metric("fleetbeat_broker_auth_refused_total{reason=\"bad_password\"}")
            .await?,
        2.0
    );
    // The device itself is not locked out.
    assert!(finish(login(&van), None).await?.status.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_standalone_broker_the_bridges_id_belongs_to_bridge_logins() -> anyhow::Result<()> {
    let fleet = provision_fleet(1, "north").await?;
    let ops = fleet.add_client("ops", "bridge").await?;
    let alice = fleet.add_client("alice", "observer").await?;
    // `durable_consumers` is `["fleetbeat-bridge"]` by default: the bridge's client id.
    let broker = fleet.start_broker(&[]).await?;
    let _sim = fleet.start_sim(broker.mqtt, &["--rate", "5"])?;
    // A bridge-role login holds the bridge's persistent session.
    let mut bridge = watch_as(
        broker.mqtt,
        "fleetbeat-bridge",
        ("ops", &ops),
        &["-c", "-q", "1", "-t", "fleet/+/+/hb", "-F", "%t"],
    )
    .await?;
    bridge
        .next_matching(WAIT, |l| l == "fleet/north/north-0001/hb")
        .await?;
    for extra in [&["-c"][..], &[][..]] {
        let refused = sub_once(broker.mqtt, "fleetbeat-bridge", ("alice", &alice), extra).await?;
        assert_eq!(refused.status.code(), Some(5), "{refused:?}");
    }
    assert_eq!(
        broker
            .metric("fleetbeat_broker_auth_refused_total{reason=\"client_id_mismatch\"}")
            .await?,
        2.0
    );
    assert_eq!(
        broker
            .metric("fleetbeat_broker_disconnects_total{reason=\"taken_over\"}")
            .await?,
        0.0
    );
    // The holder still receives, on the same connection: a heartbeat that arrives after this
    // point (the lines read so far may hold heartbeats not taken yet; those are old).
    let seen = bridge.seen().len();
    let fresh = tokio::time::timeout(WAIT, async {
        loop {
            bridge
                .next_matching(WAIT, |l| l == "fleet/north/north-0001/hb")
                .await?;
            if bridge.seen().len() > seen {
                return anyhow::Ok(());
            }
        }
    })
    .await;
    assert!(
        matches!(fresh, Ok(Ok(()))),
        "no heartbeat after the refused logins: {fresh:?}"
    );
    bridge.stop().await;
    Ok(())
}
