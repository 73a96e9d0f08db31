//! Bad input against the standalone broker, with the real Debian clients: an oversized packet
//! is refused, a client that floods is throttled (nothing lost, nothing else slowed down), and
//! the rumqttd 0.20 repro (an MQTT 5 PUBLISH with a user property, then a 3.1.1 subscriber)
//! harms nothing. Each is logged and counted; a vehicle publishing meanwhile is unaffected.

use std::time::Duration;

use tests::WAIT;
use tests::mosquitto::{Finished, Watch, client, finish, watch};
use tests::process::Program;
use tests::stack::{BrokerProcess, start_broker_standalone, start_sim};
use tokio::time::Instant;

/// The standalone broker (`extra` on its command line) with one demo vehicle publishing at
/// 5 Hz.
async fn broker_with_a_vehicle(extra: &[&str]) -> anyhow::Result<(BrokerProcess, Program)> {
    let broker = start_broker_standalone(extra).await?;
    let sim = start_sim(broker.mqtt, 1, "demo", &["--rate", "5"])?;
    Ok((broker, sim))
}

/// Connections the MQTT 3.1.1 listener accepted so far.
async fn v4_connections(broker: &BrokerProcess) -> anyhow::Result<f64> {
    broker
        .metric("fleetbeat_broker_connections_total{listener=\"v4\"}")
        .await
}

/// Publishes `size` bytes on `topic` at QoS 1 with `mosquitto_pub` as `client_id`.
async fn publish_sized(
    broker: &BrokerProcess,
    client_id: &str,
    topic: &str,
    size: usize,
) -> anyhow::Result<Finished> {
    let mut cmd = client("mosquitto_pub", broker.mqtt);
    cmd.args(["-i", client_id, "-t", topic, "-q", "1", "-s"]);
    finish(cmd, Some(&vec![b'x'; size])).await
}

/// Asserts that the MQTT 3.1.1 listener accepted four connections in all: the vehicle's, the
/// watcher's and the two of `others` (nobody reconnected), then stops `watch`.
async fn four_connections_at_the_end(
    broker: &BrokerProcess,
    watch: Watch,
    others: &str,
) -> anyhow::Result<()> {
    assert_eq!(
        v4_connections(broker).await?,
        4.0,
        "the vehicle, the watcher and {others}: nobody reconnected or was disconnected"
    );
    watch.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_packet_closes_only_that_connection() -> anyhow::Result<()> {
    let (mut broker, _sim) = broker_with_a_vehicle(&["--max-payload-size", "16384"]).await?;
    let mut watch = watch(broker.mqtt, &["-t", "fleet/+/+/hb", "-F", "%t"]).await?;
    watch.next(WAIT).await?;

    let refused = publish_sized(&broker, "big-1", "fleet/demo/demo-0001/event", 20_000).await?;
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        refused.stderr.contains("The connection was lost"),
        "{refused:?}"
    );
    broker
        .wait_metric(
            "fleetbeat_broker_dropped_total{reason=\"oversized\"}",
            |n| n == 1.0,
        )
        .await?;
    let line = broker.log_line("packet too large: disconnecting").await?;
    assert!(
        line.contains("client_id=\"big-1\"") && line.contains("max=16384"),
        "{line}"
    );
    broker
        .wait_metric(
            "fleetbeat_broker_disconnects_total{reason=\"protocol\"}",
            |n| n == 1.0,
        )
        .await?;

    // Just under the limit goes through; the vehicle never noticed.
    let accepted = publish_sized(&broker, "big-2", "fleet/demo/big-2/event", 16_000).await?;
    assert!(accepted.status.success(), "{accepted:?}");
    for _ in 0..3 {
        watch
            .next_matching(WAIT, |t| t == "fleet/demo/demo-0001/hb")
            .await?;
    }
    four_connections_at_the_end(&broker, watch, "the two publishers").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_throttled_and_nobody_else_slowed_down() -> anyhow::Result<()> {
    const RATE: usize = 200;
    const FLOOD: usize = 1_000;
    let rate = RATE.to_string();
    let (mut broker, _sim) = broker_with_a_vehicle(&["--max-publish-rate", &rate]).await?;
    let mut watch = watch(broker.mqtt, &["-t", "fleet/#", "-F", "%t %p"]).await?;
    watch
        .next_matching(WAIT, |l| l.starts_with("fleet/demo/demo-0001/hb "))
        .await?;

    // `mosquitto_pub -l` publishes a message per line of its input, as fast as it can.
    let lines: String = (0..FLOOD).map(|n| format!("{n}\n")).collect();
    let mut flooder = client("mosquitto_pub", broker.mqtt);
    flooder.args(["-i", "flooder", "-t", "fleet/flood/flooder/hb", "-l"]);
    let started = Instant::now();
    let flood = tokio::spawn(async move { finish(flooder, Some(lines.as_bytes())).await });
    watch
        .next_matching(WAIT, |l| l == "fleet/flood/flooder/hb 0")
        .await?;
    // The broker holds the flood back: the flooder's messages come at the allowed rate, and
    // another client's message overtakes them.
    broker
        .log_line("client publishes faster than max_publish_rate")
        .await
        .map(|line| assert!(line.contains("client_id=\"flooder\""), "{line}"))?;
    let mut cmd = client("mosquitto_pub", broker.mqtt);
    cmd.args([
        "-i",
        "bystander",
        "-t",
        "fleet/flood/bystander/hb",
        "-m",
        "hello",
    ]);
    let sent = finish(cmd, None).await?;
    assert!(sent.status.success(), "{sent:?}");
    watch
        .next_matching(WAIT, |l| l == "fleet/flood/bystander/hb hello")
        .await?;
    let flood_seen_before_bystander = watch
        .seen()
        .iter()
        .filter(|l| l.starts_with("fleet/flood/flooder/hb "))
        .count();
    assert!(
        flood_seen_before_bystander < FLOOD / 2,
        "the bystander waited behind {flood_seen_before_bystander} flood messages"
    );

    // All of the flood arrives, in order, at about the allowed rate.
    let last = format!("fleet/flood/flooder/hb {}", FLOOD - 1);
    watch
        .next_matching(Duration::from_secs(30), |l| l == last)
        .await?;
    let took = started.elapsed();
    let done = flood.await??;
    assert!(done.status.success(), "{done:?}");
    let floods: Vec<usize> = watch
        .seen()
        .iter()
        .filter_map(|l| l.strip_prefix("fleet/flood/flooder/hb ")?.parse().ok())
        .collect();
    assert_eq!(floods, (0..FLOOD).collect::<Vec<_>>(), "lost or reordered");
    let paced = Duration::from_secs_f64((FLOOD - RATE) as f64 / RATE as f64);
    assert!(
        took >= paced.mul_f64(0.9) && took < paced * 3,
        "{FLOOD} messages at {RATE}/s took {took:?}"
    );
    let throttled = broker.metric("fleetbeat_broker_throttled_total").await?;
    assert!(
        throttled >= (FLOOD - RATE) as f64 * 0.9 && throttled <= FLOOD as f64,
        "throttled_total {throttled}"
    );

    // The vehicle kept its pace throughout (5 heartbeats a second).
    let heartbeats = watch
        .seen()
        .iter()
        .filter(|l| l.starts_with("fleet/demo/demo-0001/hb "))
        .count();
    let expected = took.as_secs_f64() * 5.0;
    assert!(
        heartbeats as f64 >= expected * 0.7,
        "{heartbeats} heartbeats in {took:?}"
    );
    four_connections_at_the_end(&broker, watch, "the flooder and the bystander").await
}

/// The rumqttd 0.20 defect from the issue: `mosquitto_pub -p V5PORT -V 5 -r -t r/a -m x -D
/// publish user-property a 2`, then `mosquitto_sub -p V4PORT -V 311 -t 'r/#'`, killed the v4
/// listener. Run exactly so against the broker's default listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v5_user_property_repro_harms_nothing() -> anyhow::Result<()> {
    let (broker, _sim) = broker_with_a_vehicle(&["--listen-v5", "127.0.0.1:0"]).await?;
    let v5 = broker.mqtt_v5.expect("asked for a v5 listener");
    let publish_v5 = |topic: &str, message: &str| {
        let mut cmd = client("mosquitto_pub", v5);
        cmd.args(["-V", "5", "-r", "-t", topic, "-m", message]);
        cmd.args(["-D", "publish", "user-property", "a", "2"]);
        cmd
    };
    let sent = finish(publish_v5("r/a", "x"), None).await?;
    assert!(sent.status.success(), "{sent:?}");

    let mut cmd = client("mosquitto_sub", broker.mqtt);
    cmd.args(["-V", "311", "-t", "r/#", "-C", "1", "-v", "-W", "10"]);
    let got = finish(cmd, None).await?;
    assert!(got.status.success(), "{got:?}");
    assert_eq!(got.stdout.trim_end(), "r/a x");

    // Live deliveries too, and the v4 listener keeps taking new connections.
    let mut v4 = watch(broker.mqtt, &["-V", "311", "-t", "r/#", "-v"]).await?;
    v4.next_matching(WAIT, |l| l == "r/a x").await?;
    assert!(finish(publish_v5("r/b", "y"), None).await?.status.success());
    v4.next_matching(WAIT, |l| l == "r/b y").await?;
    let mut cmd = client("mosquitto_pub", broker.mqtt);
    cmd.args(["-V", "311", "-t", "r/c", "-m", "z"]);
    assert!(finish(cmd, None).await?.status.success());
    v4.next_matching(WAIT, |l| l == "r/c z").await?;
    // An MQTT 5 subscriber still gets the property.
    let mut cmd = client("mosquitto_sub", v5);
    cmd.args([
        "-V", "5", "-t", "r/a", "-C", "1", "-F", "%t %p %P", "-W", "10",
    ]);
    let got = finish(cmd, None).await?;
    assert_eq!(got.stdout.trim_end(), "r/a x a:2", "{got:?}");

    // Nothing was hurt: both listeners answer their probes, no connection was cut, and the
    // vehicle's traffic flows.
    let mut fleet = watch(
        broker.mqtt,
        &["-V", "311", "-t", "fleet/+/+/hb", "-F", "%t"],
    )
    .await?;
    fleet.next(WAIT).await?;
    for listener in ["v4", "v5"] {
        assert_eq!(
            broker
                .metric(&format!(
                    "fleetbeat_broker_listener_up{{listener=\"{listener}\"}}"
                ))
                .await?,
            1.0
        );
    }
    assert_eq!(
        broker
            .metric("fleetbeat_broker_disconnects_total{reason=\"protocol\"}")
            .await?,
        0.0
    );
    assert!(
        broker.program.find_line("DEAD").is_none() && broker.program.find_line("panic").is_none(),
        "{}",
        broker.program.log_text()
    );
    v4.stop().await;
    fleet.stop().await;
    Ok(())
}
