//! MQTT as the real Debian clients expect it, against the standalone broker (issue #13, items 3
//! and 4): `mosquitto_sub -q 2` sees each message at the QoS it was published at (QoS 2 is
//! granted as 1), a vehicle's heartbeats stay QoS 0 for a QoS 1 subscriber, MQTT 5 properties
//! arrive as sent, and a shared subscription (issue #13's reproduction, persistent session) is
//! refused without stopping routing.

use tests::WAIT;
use tests::mosquitto::{client, finish, publish, watch};
use tests::stack::{start_broker_standalone, start_sim};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_at_qos_2_sees_each_message_at_the_qos_it_was_published_at()
-> anyhow::Result<()> {
    let broker = start_broker_standalone(&["--listen-v5", "127.0.0.1:0"]).await?;
    let mut sub = watch(broker.mqtt, &["-t", "test/qos", "-q", "2", "-F", "%q %p"]).await?;
    for qos in [0u8, 1, 2] {
        publish(broker.mqtt, "test/qos", format!("at {qos}").as_bytes(), qos).await?;
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(sub.next(WAIT).await?);
    }
    assert_eq!(
        seen,
        ["0 at 0", "1 at 1", "1 at 2"],
        "QoS 2 is granted as 1"
    );
    sub.stop().await;

    // A vehicle's heartbeats (QoS 0) stay QoS 0 for a QoS 1 subscriber; its retained status
    // (QoS 1) comes at QoS 1.
    let _sim = start_sim(broker.mqtt, 1, "demo", &["--rate", "5"])?;
    let mut hb = watch(
        broker.mqtt,
        &["-t", "fleet/+/+/hb", "-q", "1", "-F", "%q %t"],
    )
    .await?;
    assert_eq!(hb.next(WAIT).await?, "0 fleet/demo/demo-0001/hb");
    let mut status = watch(
        broker.mqtt,
        &["-t", "fleet/+/+/status", "-q", "2", "-F", "%q %r %t"],
    )
    .await?;
    assert_eq!(status.next(WAIT).await?, "1 1 fleet/demo/demo-0001/status");

    // MQTT 5: the publisher's user property arrives, nothing of the broker's.
    let v5 = broker.mqtt_v5.expect("the MQTT 5 listener");
    let mut sub5 = watch(
        v5,
        &["-V", "5", "-t", "test/v5", "-q", "2", "-F", "%q %P %p"],
    )
    .await?;
    let mut cmd = client("mosquitto_pub", v5);
    cmd.args(["-V", "5", "-t", "test/v5", "-q", "0", "-m", "hello"])
        .args(["-D", "publish", "user-property", "a", "2"]);
    let published = finish(cmd, None).await?;
    assert!(published.status.success(), "{published:?}");
    assert_eq!(sub5.next(WAIT).await?, "0 a:2 hello");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_is_refused_and_the_broker_goes_on_routing() -> anyhow::Result<()> {
    let broker = start_broker_standalone(&[]).await?;
    let mut sub = watch(broker.mqtt, &["-t", "test/#", "-q", "1", "-F", "%t %p"]).await?;
    // Issue #13's reproduction: a persistent session subscribes to `$share/...` at QoS 1. On
    // rumqttd alone, once it leaves with a QoS 1 message unacknowledged, routing stops.
    let mut cmd = client("mosquitto_sub", broker.mqtt);
    cmd.args(["-i", "sharer", "-c", "-q", "1", "-t", "$share/g/test/#"]);
    let refused = finish(cmd, None).await?;
    let said = format!("{}{}", refused.stdout, refused.stderr);
    assert!(
        said.contains("All subscription requests were denied"),
        "{refused:?}"
    );
    publish(broker.mqtt, "test/after", b"still routing", 1).await?;
    assert_eq!(sub.next(WAIT).await?, "test/after still routing");
    let counted = broker
        .metric("fleetbeat_broker_subscriptions_refused_total{reason=\"shared\"}")
        .await?;
    assert!((counted - 1.0).abs() < f64::EPSILON, "{counted}");
    assert!(
        broker
            .program
            .log_text()
            .contains("subscription refused: the broker does not serve this filter"),
        "logged"
    );
    Ok(())
}
