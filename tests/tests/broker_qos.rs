//! MQTT as the real Debian clients expect it, against the standalone broker (issue #13, items 3
//! and 4): `mosquitto_sub -q 2` sees each message at the QoS it was published at (QoS 2
//! included: its exchange runs in the broker's front end), a vehicle's heartbeats stay QoS 0 for a QoS 1 subscriber, MQTT 5 properties
//! arrive as sent, and shared subscriptions (issue #13's reproduction: a persistent session
//! that leaves one behind) share the messages without ever stopping routing; and an MQTT 5
//! `mosquitto_sub -c -x N` keeps its session N seconds after it is gone, no longer.

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
    assert_eq!(seen, ["0 at 0", "1 at 1", "2 at 2"]);
    // A persistent session (`-c`) is granted QoS 1 at most: QoS 2 comes at 1.
    let mut kept = watch(
        broker.mqtt,
        &[
            "-i",
            "kept",
            "-c",
            "-t",
            "test/kept",
            "-q",
            "2",
            "-F",
            "%q %p",
        ],
    )
    .await?;
    publish(broker.mqtt, "test/kept", b"at 2", 2).await?;
    assert_eq!(kept.next(WAIT).await?, "1 at 2");
    kept.stop().await;
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
async fn shared_subscriptions_share_the_messages_and_never_stop_routing() -> anyhow::Result<()> {
    let broker = start_broker_standalone(&[]).await?;
    let mut sub = watch(broker.mqtt, &["-t", "test/#", "-q", "1", "-F", "%t %p"]).await?;
    // Issue #13's reproduction: a persistent session subscribes to `$share/...` at QoS 1 and
    // leaves with its subscription behind (`-C 1`: it exits after one message). On rumqttd
    // alone, routing stopped. Here the broker serves the group itself.
    let mut cmd = client("mosquitto_sub", broker.mqtt);
    cmd.args([
        "-i",
        "sharer",
        "-c",
        "-q",
        "1",
        "-t",
        "$share/g/test/#",
        "-C",
        "1",
        "-F",
        "%t %p",
    ]);
    let sharer = tokio::spawn(finish(cmd, None));
    let groups = "fleetbeat_broker_shared_groups";
    broker.wait_metric(groups, |v| v >= 1.0).await?;
    publish(broker.mqtt, "test/one", b"to the group", 1).await?;
    let sharer = sharer.await??;
    assert_eq!(sharer.stdout.trim(), "test/one to the group", "{sharer:?}");
    assert_eq!(sub.next(WAIT).await?, "test/one to the group");
    publish(broker.mqtt, "test/after", b"still routing", 1).await?;
    assert_eq!(sub.next(WAIT).await?, "test/after still routing");

    // Two members of one group: each message reaches exactly one of them.
    let mut members = [
        watch(
            broker.mqtt,
            &["-t", "$share/pair/test/#", "-q", "1", "-F", "%p"],
        )
        .await?,
        watch(
            broker.mqtt,
            &["-V", "mqttv311", "-t", "$share/pair/test/#", "-F", "%p"],
        )
        .await?,
    ];
    for i in 0..10 {
        publish(broker.mqtt, "test/shared", format!("m{i}").as_bytes(), 1).await?;
    }
    let mut got: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < 10 && tokio::time::Instant::now() < deadline {
        for member in &mut members {
            if let Ok(message) = member.next(std::time::Duration::from_millis(100)).await {
                got.push(message);
            }
        }
    }
    got.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    expected.sort();
    assert_eq!(got, expected, "each message once, to one member");
    for member in &mut members {
        assert!(
            !member.seen().is_empty(),
            "round-robin gives each member some"
        );
    }

    // A malformed share filter is refused and counted; routing goes on.
    let mut cmd = client("mosquitto_sub", broker.mqtt);
    cmd.args(["-t", "$share//x", "-C", "1"]);
    let refused = finish(cmd, None).await?;
    let said = format!("{}{}", refused.stdout, refused.stderr);
    assert!(said.contains("denied"), "{refused:?}");
    let counted = broker
        .metric("fleetbeat_broker_subscriptions_refused_total{reason=\"shared\"}")
        .await?;
    assert!((counted - 1.0).abs() < f64::EPSILON, "{counted}");
    publish(broker.mqtt, "test/last", b"routing", 1).await?;
    assert_eq!(
        sub.next_matching(WAIT, |l| l.starts_with("test/last"))
            .await?,
        "test/last routing"
    );
    Ok(())
}

/// MQTT 5 session expiry with the real client: `mosquitto_sub -V 5 -c -x 2` killed (its
/// connection lost) finds what was published meanwhile when it is back within 2 s; once the
/// broker discarded its session after 2 s (`sessions_expired_total`), what was published to the
/// expired session is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_v5_keeps_its_session_for_its_expiry_interval() -> anyhow::Result<()> {
    let broker = start_broker_standalone(&["--listen-v5", "127.0.0.1:0"]).await?;
    let v5 = broker.mqtt_v5.expect("the MQTT 5 listener");
    let keeper = [
        "-V",
        "5",
        "-i",
        "keeper",
        "-c",
        "-x",
        "2",
        "-t",
        "test/kept",
        "-q",
        "1",
        "-F",
        "%p",
    ];
    watch(v5, &keeper).await?.stop().await;
    publish(broker.mqtt, "test/kept", b"while away", 1).await?;
    let mut back = watch(v5, &keeper).await?;
    assert_eq!(back.next(WAIT).await?, "while away");
    back.stop().await;
    let expired = "fleetbeat_broker_sessions_expired_total";
    broker.wait_metric(expired, |n| n >= 1.0).await?;
    publish(broker.mqtt, "test/kept", b"for the expired session", 1).await?;
    let mut again = watch(v5, &keeper).await?;
    publish(broker.mqtt, "test/kept", b"for the new session", 1).await?;
    assert_eq!(again.next(WAIT).await?, "for the new session");
    again.stop().await;
    Ok(())
}
