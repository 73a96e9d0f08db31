//! The broker's topic ACLs, with the real Debian clients: a device with valid credentials may
//! publish only as itself (not on another vehicle's topics, not commands) and subscribe only to
//! its own commands; an observer publishes nothing. Refusals are dropped, counted and logged,
//! and the vehicle that was impersonated keeps publishing, its messages intact. (The bridge's
//! own check of each message's seal is tested in `origin_trust.rs`.)

use shared::Heartbeat;
use tests::WAIT;
use tests::mosquitto::{client, finish, hex, unhex, watch_as};
use tests::stack::provision_fleet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_publish_only_as_themselves_and_observers_not_at_all() -> anyhow::Result<()> {
    let fleet = provision_fleet(1, "north").await?;
    let (van, _) = fleet.add_device("van-0001").await?;
    let alice = fleet.add_client("alice", "observer").await?;
    let mut broker = fleet.start_broker(&[]).await?;
    let _sim = fleet.start_sim(broker.mqtt, &["--rate", "5"])?;
    let all_hex = ["-t", "fleet/#", "-F", "%t %x"];
    let mut watch = watch_as(broker.mqtt, "watch-1", ("alice", &alice), &all_hex).await?;
    watch
        .next_matching(WAIT, |l| l.starts_with("fleet/north/north-0001/hb "))
        .await?;

    let mqtt = broker.mqtt;
    let publish = |login: (&str, &str), topic: &str, payload: &str, qos: &str| {
        let mut cmd = client("mosquitto_pub", mqtt);
        cmd.args(["-i", login.0, "-u", login.0, "-P", login.1]);
        cmd.args(["-t", topic, "-m", payload, "-q", qos]);
        cmd
    };
    let acl = "fleetbeat_broker_dropped_total{reason=\"acl\"}";

    // van-0001, properly logged in, speaks for north-0001, at QoS 1 and QoS 0. The QoS 1
    // one is acknowledged (so the device does not retry forever), and dropped.
    for (payload, qos) in [("spoof-qos1", "1"), ("spoof-qos0", "0")] {
        let done = finish(
            publish(
                ("van-0001", &van),
                "fleet/north/north-0001/hb",
                payload,
                qos,
            ),
            None,
        )
        .await?;
        assert!(done.status.success(), "{done:?}");
    }
    broker.wait_metric(acl, |n| n == 2.0).await?;
    let line = broker.log_line("publish refused by the topic ACL").await?;
    assert!(
        line.contains("client_id=\"van-0001\"") && line.contains("fleet/north/north-0001/hb"),
        "{line}"
    );
    // Commands are the bridge's to send, not a device's, even to itself.
    let done = finish(
        publish(("van-0001", &van), "fleet/north/van-0001/cmd", "self", "1"),
        None,
    )
    .await?;
    assert!(done.status.success(), "{done:?}");
    broker.wait_metric(acl, |n| n == 3.0).await?;
    // An observer publishes nothing.
    let mut cmd = client("mosquitto_pub", broker.mqtt);
    cmd.args(["-i", "alice-pub", "-u", "alice", "-P", &alice]);
    cmd.args(["-t", "fleet/north/north-0001/cmd", "-m", "go", "-q", "1"]);
    assert!(finish(cmd, None).await?.status.success());
    broker.wait_metric(acl, |n| n == 4.0).await?;

    // What van-0001 may publish goes through; it was sent after the refused ones, so by the
    // time it arrives, a refused one would have too.
    let done = finish(
        publish(("van-0001", &van), "fleet/north/van-0001/hb", "mine", "1"),
        None,
    )
    .await?;
    assert!(done.status.success(), "{done:?}");
    watch
        .next_matching(WAIT, |l| {
            l == format!("fleet/north/van-0001/hb {}", hex(b"mine"))
        })
        .await?;
    let leaked: Vec<&String> = watch
        .seen()
        .iter()
        .filter(|l| {
            ["spoof-qos1", "spoof-qos0", "self", "go"]
                .iter()
                .any(|p| l.ends_with(&format!(" {}", hex(p.as_bytes()))))
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "refused publishes were delivered: {leaked:?}"
    );

    // A device subscribes to its own commands only.
    let mut cmd = client("mosquitto_sub", broker.mqtt);
    cmd.args(["-i", "van-0001", "-u", "van-0001", "-P", &van]);
    cmd.args(["-t", "fleet/+/north-0001/cmd", "-C", "1"]);
    let denied = finish(cmd, None).await?;
    assert!(
        denied
            .stderr
            .contains("All subscription requests were denied"),
        "{denied:?}"
    );
    assert_eq!(
        broker
            .metric("fleetbeat_broker_subscribe_denied_total")
            .await?,
        1.0
    );
    let own = watch_as(
        broker.mqtt,
        "van-0001",
        ("van-0001", &van),
        &["-t", "fleet/+/van-0001/cmd", "-q", "1"],
    )
    .await?;
    own.stop().await;

    // The impersonated vehicle is unaffected: its heartbeats keep coming, genuine (sealed with
    // its own key), and it is still connected.
    let (_, key) = fleet.device("north-0001")?;
    for _ in 0..3 {
        let line = watch
            .next_matching(WAIT, |l| l.starts_with("fleet/north/north-0001/hb "))
            .await?;
        let payload = unhex(line.rsplit(' ').next().unwrap_or_default())?;
        shared::open::<Heartbeat>(&payload, "fleet/north/north-0001/hb", &key)
            .map_err(|e| anyhow::anyhow!("not genuine: {e}: {line}"))?;
    }
    broker
        .wait_metric("fleetbeat_broker_devices_connected", |n| n == 1.0)
        .await?;
    watch.stop().await;
    Ok(())
}
