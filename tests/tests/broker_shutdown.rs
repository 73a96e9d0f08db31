//! The standalone broker stops gracefully on SIGTERM: it stops accepting at once, completes the
//! QoS 1 exchange in flight (a message delivered to a subscriber that has not acknowledged it
//! yet), and exits 0 within `shutdown_grace`, also when a client never acknowledges. When a
//! broker thread dies, the `broker` and the `bridge` (embedded broker) exit 1 with an ERROR line.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tests::WAIT;
use tests::mosquitto::{client, finish};
use tests::process::Program;
use tests::stack::{BrokerProcess, start_broker_standalone};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};

/// A subscriber on `fleet/+/+/event` at QoS 1 that acknowledges only when told to.
struct SlowAcker {
    client: AsyncClient,
    publishes: mpsc::UnboundedReceiver<Publish>,
    closed: oneshot::Receiver<()>,
}

impl SlowAcker {
    async fn connect(broker: &BrokerProcess) -> anyhow::Result<SlowAcker> {
        let mut options = MqttOptions::new("slow-acker", "127.0.0.1", broker.mqtt.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_manual_acks(true);
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        client
            .subscribe("fleet/+/+/event", QoS::AtLeastOnce)
            .await?;
        let (tx, publishes) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = oneshot::channel();
        let (closed_tx, closed) = oneshot::channel();
        tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let _ = tx.send(publish);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        // The broker closed the connection: do not reconnect.
                        let _ = closed_tx.send(());
                        return;
                    }
                }
            }
        });
        timeout(WAIT, subscribed).await??;
        Ok(SlowAcker {
            client,
            publishes,
            closed,
        })
    }
}

/// The log line with `needle` of a program that may have exited (its last lines may still be
/// on their way through the pipe).
async fn logged(program: &Program, needle: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(line) = program.find_line(needle) {
            return Ok(line);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no {needle:?} in:\n{}",
            program.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A delivered QoS 1 message that `acker` holds unacknowledged.
async fn one_in_flight(broker: &BrokerProcess, acker: &mut SlowAcker) -> anyhow::Result<Publish> {
    let mut cmd = client("mosquitto_pub", broker.mqtt);
    cmd.args(["-t", "fleet/demo/demo-0001/event", "-q", "1", "-m", "e1"]);
    let sent = finish(cmd, None).await?;
    assert!(
        sent.status.success(),
        "the broker acknowledged it: {sent:?}"
    );
    let publish = timeout(WAIT, acker.publishes.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the subscriber ended"))?;
    assert_eq!(publish.qos, QoS::AtLeastOnce);
    assert_eq!(&publish.payload[..], b"e1");
    Ok(publish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_completes_the_qos1_in_flight_then_exits_0() -> anyhow::Result<()> {
    let mut broker = start_broker_standalone(&["--shutdown-grace", "10s"]).await?;
    let mut acker = SlowAcker::connect(&broker).await?;
    let publish = one_in_flight(&broker, &mut acker).await?;

    // SIGTERM, without waiting for the exit.
    broker.program.signal("TERM")?;
    broker.log_line("shutting down: no new connections").await?;
    // New connections are refused at once.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut cmd = client("mosquitto_pub", broker.mqtt);
        cmd.args(["-t", "fleet/demo/demo-0001/event", "-m", "late"]);
        let late = finish(cmd, None).await?;
        if !late.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "still accepting connections");
    }
    // The broker waits for the acknowledgement it is owed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(broker.program.is_running(), "exited with a QoS 1 in flight");
    let acked = Instant::now();
    acker.client.ack(&publish).await?;

    // Then the subscriber is closed and the broker exits 0, well within the grace period.
    timeout(WAIT, &mut acker.closed).await??;
    // (`terminate` sends a second SIGTERM, which the broker ignores, and reaps the exit.)
    let status = broker.program.terminate(WAIT).await?;
    assert!(status.success(), "exit status {status}");
    assert!(
        acked.elapsed() < Duration::from_secs(5),
        "took {:?} after the ack",
        acked.elapsed()
    );
    let bye = logged(&broker.program, "bye forced=").await?;
    assert!(bye.contains("forced=0"), "{bye}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_grace_period_when_a_client_never_acknowledges()
-> anyhow::Result<()> {
    let mut broker = start_broker_standalone(&["--shutdown-grace", "1s"]).await?;
    let mut acker = SlowAcker::connect(&broker).await?;
    let _never_acked = one_in_flight(&broker, &mut acker).await?;

    let started = Instant::now();
    let status = broker.program.terminate(WAIT).await?;
    let took = started.elapsed();
    assert!(status.success(), "exit status {status}");
    // The grace period, then at most 2 s for the forced closes.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "took {took:?}"
    );
    let bye = logged(&broker.program, "bye forced=").await?;
    assert!(bye.contains("forced=1"), "{bye}");
    timeout(WAIT, &mut acker.closed).await??;
    Ok(())
}

/// The death of rumqttd's router thread (injected: `FLEETBEAT_FAULT=router-panic`, the
/// `$share` panic of issue #13 caused through the router's own API) ends `program` with a
/// non-zero exit and one clear ERROR line, instead of leaving a zombie that accepts and does
/// not route.
async fn dies_loudly(mut program: Program, what: &str) -> anyhow::Result<()> {
    logged(&program, "FLEETBEAT_FAULT=router-panic").await?;
    let status = program.wait_exit(WAIT).await?;
    assert_eq!(status.code(), Some(1), "{what} exit: {status:?}");
    let line = logged(&program, "the broker cannot go on").await?;
    assert!(
        line.contains("rumqttd's router thread") || line.contains("shared link"),
        "{line}"
    );
    assert!(line.contains("ERROR"), "{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_binary_exits_1_when_its_router_thread_dies() -> anyhow::Result<()> {
    let dir = tests::temp_dir()?;
    let mut cmd = tokio::process::Command::new(tests::bin::path("broker")?);
    cmd.args(["--listen", "127.0.0.1:0", "--listen-v5", "off"])
        .arg("--journal")
        .arg(dir.path().join("journal.db"))
        .env("FLEETBEAT_FAULT", "router-panic");
    let mut program = Program::spawn("broker", cmd)?;
    program.keep(dir);
    dies_loudly(program, "broker").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_exits_1_when_its_embedded_broker_dies() -> anyhow::Result<()> {
    let dir = tests::temp_dir()?;
    let mut cmd = tokio::process::Command::new(tests::bin::path("bridge")?);
    cmd.args(["--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"])
        .arg("--store")
        .arg(dir.path().join("fleetbeat.db"))
        .env("FLEETBEAT_FAULT", "router-panic");
    let mut program = Program::spawn("bridge", cmd)?;
    program.keep(dir);
    dies_loudly(program, "bridge").await
}
