//! A Debian `mosquitto` bridged to the standalone broker over MQTT 5 (`bridge_protocol_version
//! mqttv50`, `topic bridged/# both 1`): the way an operator joins a broker they already run to
//! Fleetbeat's. mosquitto's bridge subscribes with No Local and Retain As Published, which
//! rumqttd's router ignores and the broker's front end applies: without them the bridge got
//! each of its own messages back (mosquitto's subscribers saw them twice), and a message
//! retained on Fleetbeat's broker reached mosquitto unflagged, so mosquitto did not keep it.

use std::time::Duration;

use tests::WAIT;
use tests::mosquitto::{client, finish, publish, start_broker, watch};
use tests::stack::start_broker_standalone;

/// Nothing more is expected within this: an echo through the bridge takes milliseconds.
const QUIET: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mosquitto_mqtt5_bridge_gets_its_messages_once_and_retained_ones_retained()
-> anyhow::Result<()> {
    let broker = start_broker_standalone(&["--listen-v5", "127.0.0.1:0"]).await?;
    let v5 = broker.mqtt_v5.expect("the MQTT 5 listener");
    let dir = tempfile::tempdir()?;
    let bridge = format!(
        "connection fleetbeat\naddress {v5}\nbridge_protocol_version mqttv50\n\
         topic bridged/# both 1\ncleansession true\n"
    );
    let mosquitto = start_broker(dir.path(), &bridge).await?;

    // The bridge is up once what is published on Fleetbeat's broker reaches mosquitto (its
    // subscription there may take a moment after mosquitto starts).
    let mut far = watch(mosquitto.addr, &["-t", "bridged/#", "-F", "%t %r %p"]).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        publish(broker.mqtt, "bridged/ready", b"?", 1).await?;
        match far.next(Duration::from_millis(500)).await {
            Ok(line) => {
                assert_eq!(line, "bridged/ready 0 ?");
                break;
            }
            Err(err) if tokio::time::Instant::now() > deadline => return Err(err),
            Err(_) => {}
        }
    }
    // Readiness probes that were still on their way.
    while far.next(QUIET).await.is_ok() {}

    // A message published on mosquitto reaches Fleetbeat's broker, and mosquitto's subscriber
    // once: the bridge's subscription there (No Local) does not send it back.
    let mut near = watch(broker.mqtt, &["-t", "bridged/#", "-F", "%t %p"]).await?;
    publish(mosquitto.addr, "bridged/from-mosquitto", b"hello", 1).await?;
    assert_eq!(near.next(WAIT).await?, "bridged/from-mosquitto hello");
    assert_eq!(far.next(WAIT).await?, "bridged/from-mosquitto 0 hello");
    assert!(far.next(QUIET).await.is_err(), "an echo: {:?}", far.seen());

    // Retained on Fleetbeat's broker, retained on mosquitto: the bridge gets it live with its
    // retain flag (Retain As Published), so a late subscriber of mosquitto's finds it.
    let mut cmd = client("mosquitto_pub", broker.mqtt);
    cmd.args(["-t", "bridged/kept", "-m", "kept", "-q", "1", "-r"]);
    let published = finish(cmd, None).await?;
    assert!(published.status.success(), "{published:?}");
    assert_eq!(far.next(WAIT).await?, "bridged/kept 0 kept");
    let mut late = watch(mosquitto.addr, &["-t", "bridged/kept", "-F", "%r %p"]).await?;
    assert_eq!(late.next(WAIT).await?, "1 kept");
    Ok(())
}
