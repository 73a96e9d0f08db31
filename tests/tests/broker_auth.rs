//! Logging in to the standalone broker with the real Debian clients: the credentials come
//! from `broker add-device` / `broker add-client` and from `device-sim provision`. A wrong
//! password, an unknown user, a missing login and a borrowed client id are each refused with
//! the CONNACK `mosquitto_pub` reports, counted in `/metrics` and logged with the client id,
//! while the vehicles already connected keep publishing, untouched.

use tests::WAIT;
use tests::mosquitto::{Watch, client, finish, watch_as};
use tests::stack::{BrokerProcess, provision_fleet};

/// `mosquitto_pub` publishing one QoS 1 message as `client_id`, logged in as `login`.
fn publish_as(
    broker: std::net::SocketAddr,
    client_id: &str,
    login: Option<(&str, &str)>,
    topic: &str,
) -> tokio::process::Command {
    let mut cmd = client("mosquitto_pub", broker);
    cmd.args(["-i", client_id, "-t", topic, "-q", "1", "-m", "x"]);
    if let Some((user, password)) = login {
        cmd.args(["-u", user, "-P", password]);
    }
    cmd
}

/// Both vehicles publish, seen by `watch`, and are connected.
async fn both_vehicles_publish(watch: &mut Watch, broker: &BrokerProcess) -> anyhow::Result<()> {
    for vehicle in ["north-0001", "north-0002"] {
        watch
            .next_matching(WAIT, |topic| topic == format!("fleet/north/{vehicle}/hb"))
            .await?;
    }
    broker
        .wait_metric("fleetbeat_broker_devices_connected", |n| n == 2.0)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_checked_counted_and_logged_and_vehicles_are_unaffected() -> anyhow::Result<()> {
    let fleet = provision_fleet(2, "north").await?;
    let (van, key) = fleet.add_device("van-0001").await?;
    assert_eq!(key.map(|k| k.len()), Some(64), "add-device prints the key");
    let alice = fleet.add_client("alice", "observer").await?;
    let mut broker = fleet.start_broker(&["--listen-v5", "127.0.0.1:0"]).await?;
    assert_eq!(broker.metric("fleetbeat_broker_open_mode").await?, 0.0);
    let mut sim = fleet.start_sim(broker.mqtt, &["--rate", "5"])?;

    // An observer sees both vehicles' heartbeats.
    let mut watch = watch_as(
        broker.mqtt,
        "watch-1",
        ("alice", &alice),
        &["-t", "fleet/+/+/hb", "-F", "%t"],
    )
    .await?;
    both_vehicles_publish(&mut watch, &broker).await?;

    // The right password gets in.
    let ok = finish(
        publish_as(
            broker.mqtt,
            "van-0001",
            Some(("van-0001", &van)),
            "fleet/north/van-0001/hb",
        ),
        None,
    )
    .await?;
    assert!(ok.status.success(), "{ok:?}");

    // Each refusal: client id, login, mosquitto_pub's exit status (the CONNACK code) and
    // message, the reason label counted and logged.
    let refusals = [
        (
            "van-0001",
            Some(("van-0001", "not-the-password")),
            4,
            "Connection Refused: bad user name or password",
            "bad_password",
        ),
        (
            "stranger-9",
            Some(("stranger-9", van.as_str())),
            4,
            "Connection Refused: bad user name or password",
            "unknown_user",
        ),
        (
            "anonymous-1",
            None,
            4,
            "Connection Refused: bad user name or password",
            "no_credentials",
        ),
        (
            "borrowed-id",
            Some(("van-0001", van.as_str())),
            5,
            "Connection Refused: not authorised",
            "client_id_mismatch",
        ),
        // An observer taking a vehicle's client id would take its session over: refused
        // before it can.
        (
            "north-0002",
            Some(("alice", alice.as_str())),
            5,
            "Connection Refused: not authorised",
            "client_id_mismatch",
        ),
    ];
    for (client_id, login, code, message, reason) in refusals {
        let sample = format!("fleetbeat_broker_auth_refused_total{{reason=\"{reason}\"}}");
        let before = broker.metric(&sample).await?;
        let refused = finish(
            publish_as(broker.mqtt, client_id, login, "fleet/north/van-0001/hb"),
            None,
        )
        .await?;
        assert_eq!(
            refused.status.code(),
            Some(code),
            "{client_id}: {refused:?}"
        );
        assert!(
            refused.stderr.contains(message),
            "{client_id}: {}",
            refused.stderr
        );
        assert_eq!(broker.metric(&sample).await?, before + 1.0, "{sample}");
        let username = login.map_or("", |(user, _)| user);
        let line = broker
            .program
            .wait_for_line(
                &format!("client_id=\"{client_id}\" username=\"{username}\" reason=\"{reason}\""),
                WAIT,
            )
            .await?;
        assert!(line.contains("WARN"), "{line}");
    }

    // MQTT 5 clients get MQTT 5 reason codes (0x86 bad user name or password).
    let v5 = broker.mqtt_v5.expect("the v5 listener was asked for");
    let mut cmd = publish_as(
        v5,
        "van-0001",
        Some(("van-0001", "not-the-password")),
        "fleet/north/van-0001/hb",
    );
    cmd.args(["-V", "5"]);
    let refused = finish(cmd, None).await?;
    assert_eq!(refused.status.code(), Some(0x86), "{refused:?}");
    assert_eq!(
        broker
            .metric("fleetbeat_broker_auth_refused_total{reason=\"bad_password\"}")
            .await?,
        2.0
    );

    // The vehicles never noticed: still connected on their first connection, still publishing.
    both_vehicles_publish(&mut watch, &broker).await?;
    assert_eq!(
        broker
            .metric("fleetbeat_broker_disconnects_total{reason=\"taken_over\"}")
            .await?,
        0.0
    );
    // Two vehicles, the observer and the one good login: nobody reconnected.
    assert_eq!(
        broker
            .metric("fleetbeat_broker_connections_total{listener=\"v4\"}")
            .await?,
        4.0
    );
    assert!(sim.is_running());
    watch.stop().await;
    Ok(())
}
