//! End-to-end acknowledgement: a device's QoS 1 `event`, `ack` and `status` publishes get
//! their PUBACK only once durable, from a durable consumer's PUBACK (the embedded deployment)
//! or from the journal's commit (the standalone broker); in the order of the publishes; what
//! the journal holds survives a restart and goes once acknowledged; other traffic is
//! unchanged.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use broker::{Broker, BrokerConfig, Role};
use common::{Provisioned, Raw, client, client_subscribed, eventually, publish_fields, start};
use shared::frame::{Connect, puback};

/// Long enough for a PUBACK that was going to come to have come.
const QUIET: Duration = Duration::from_millis(400);

const EVENT: &str = "fleet/f/van-1/event";

/// A broker whose durable consumer is the client id `consumer`, without a journal: the
/// embedded deployment.
async fn with_consumer() -> Broker {
    start(BrokerConfig {
        durable_consumers: vec!["consumer".to_owned()],
        ..BrokerConfig::ephemeral()
    })
    .await
}

/// A broker journaling to `journal`, its durable consumer `consumer`: the standalone one.
async fn with_journal(journal: &Path) -> Broker {
    start(BrokerConfig {
        durable_consumers: vec!["consumer".to_owned()],
        journal: Some(journal.to_owned()),
        ..BrokerConfig::ephemeral()
    })
    .await
}

/// A journal path in a fresh directory, removed when the guard is dropped.
fn temp_journal(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("fleetbeat-durability-{name}-"))
        .tempdir()
        .unwrap();
    let path = dir.path().join("journal.db");
    (dir, path)
}

/// The consumer's next delivery: packet id and payload, asserting the topic.
async fn delivery(consumer: &mut Raw, topic: &str) -> (u16, Vec<u8>) {
    let (first, body) = consumer.read().await.expect("a delivery");
    assert_eq!(first & 0xF6, 0x32, "a QoS 1 PUBLISH, got {first:#04x}");
    let (got, payload) = publish_fields(first, &body);
    assert_eq!(got, topic);
    (common::publish_pkid(first, &body), payload)
}

/// The durable consumer `consumer`, subscribed to every event at QoS 1.
async fn subscribe_consumer(addr: SocketAddr) -> Raw {
    client_subscribed(addr, "consumer", 1, "fleet/+/+/event", 1).await
}

/// A broker [`with_consumer`], its durable consumer and the device `van-1` connected.
async fn with_consumer_and_van() -> (Broker, Raw, Raw) {
    let broker = with_consumer().await;
    let addr = broker.v4_addr();
    let consumer = subscribe_consumer(addr).await;
    let van = client(addr, "van-1").await;
    (broker, consumer, van)
}

/// A client `client_id`, logged in with the provisioned credentials of `name`.
async fn logged_in(
    provisioned: &Provisioned,
    addr: SocketAddr,
    name: &str,
    client_id: &str,
) -> Raw {
    let (user, password) = provisioned.login(name);
    let login = Connect {
        client_id,
        keep_alive: 30,
        login: Some((user, password)),
        ..Connect::default()
    };
    Raw::connected(addr, &login).await
}

/// Publishes an event from `van` at QoS 1 and returns the packet id of the consumer's copy,
/// asserting its payload.
async fn relayed(van: &mut Raw, consumer: &mut Raw, payload: &[u8], pkid: u16) -> u16 {
    van.publish(EVENT, payload, 1, pkid, false).await;
    let (copy, got) = delivery(consumer, EVENT).await;
    assert_eq!(got, payload);
    copy
}

/// Asserts that nothing arrives at `raw` for [`QUIET`].
async fn quiet(raw: &mut Raw, what: &str) {
    if let Some(packet) = raw.read_within(QUIET).await {
        panic!("{what}: got {packet:02x?}");
    }
}

#[tokio::test]
async fn an_event_is_acknowledged_once_a_durable_consumer_acknowledged_its_copy() {
    let (broker, mut consumer, mut van) = with_consumer_and_van().await;

    let pkid = relayed(&mut van, &mut consumer, b"e1", 5).await;
    quiet(
        &mut van,
        "no PUBACK while the consumer has not acknowledged",
    )
    .await;
    assert_eq!(broker.metrics().durability_waiting(), 1);

    consumer.send(&puback(pkid)).await;
    assert_eq!(
        van.read().await,
        Some((0x40, vec![0, 5])),
        "the device's PUBACK"
    );
    eventually("nothing waits", || {
        broker.metrics().durability_waiting() == 0
    })
    .await;
    let text = broker.metrics().render();
    assert!(
        text.contains("fleetbeat_broker_durability_waiting 0\n"),
        "{text}"
    );
}

#[tokio::test]
async fn pubacks_keep_the_order_of_the_publishes() {
    let (_broker, mut consumer, mut van) = with_consumer_and_van().await;

    // An event, a heartbeat at QoS 1 (no durability to wait for), another event.
    van.publish(EVENT, b"first", 1, 1, false).await;
    van.publish("fleet/f/van-1/hb", b"hb", 1, 2, false).await;
    van.publish(EVENT, b"second", 1, 3, false).await;
    let (pkid_first, _) = delivery(&mut consumer, EVENT).await;
    let (pkid_second, payload) = delivery(&mut consumer, EVENT).await;
    assert_eq!(payload, b"second");
    quiet(
        &mut van,
        "the heartbeat's PUBACK waits for the first event's",
    )
    .await;

    // The later event acknowledged first: still nothing, the first one holds everything.
    consumer.send(&puback(pkid_second)).await;
    quiet(
        &mut van,
        "the second event's PUBACK waits for the first event's",
    )
    .await;

    consumer.send(&puback(pkid_first)).await;
    for pkid in [1u8, 2, 3] {
        assert_eq!(
            van.read().await,
            Some((0x40, vec![0, pkid])),
            "PUBACK {pkid} in order"
        );
    }
}

#[tokio::test]
async fn a_dup_resend_and_a_closed_connection_leave_no_waiter() {
    let (broker, mut consumer, mut van) = with_consumer_and_van().await;

    van.publish(EVENT, b"once", 1, 9, false).await;
    let resend = shared::frame::Publish {
        topic: EVENT.as_bytes(),
        payload: b"once",
        qos: 1,
        pkid: 9,
        dup: true,
        ..shared::frame::Publish::default()
    };
    van.send(&resend.bytes()).await;
    let (pkid, _) = delivery(&mut consumer, EVENT).await;
    quiet(
        &mut consumer,
        "the DUP re-send of a waiting publish is not routed again",
    )
    .await;
    assert_eq!(broker.metrics().durability_waiting(), 1, "one waiter");
    consumer.send(&puback(pkid)).await;
    assert_eq!(van.read().await, Some((0x40, vec![0, 9])));
    quiet(&mut van, "one PUBACK for both copies").await;
    assert_eq!(broker.metrics().durability_waiting(), 0);

    // A device that leaves before its event is durable takes its waiter with it.
    let mut gone = client(broker.v4_addr(), "van-2").await;
    gone.publish("fleet/f/van-2/event", b"left", 1, 1, false)
        .await;
    let _ = delivery(&mut consumer, "fleet/f/van-2/event").await;
    assert_eq!(broker.metrics().durability_waiting(), 1);
    drop(gone);
    eventually("the closed connection's waiter is gone", || {
        broker.metrics().durability_waiting() == 0
    })
    .await;
}

#[tokio::test]
async fn what_the_router_delivered_to_nobody_reaches_a_consumer_that_subscribes_later() {
    // A device reconnecting after a crash may publish before the bridge has subscribed: the
    // router drops the message (no subscription matches), the device keeps waiting, and the
    // consumer's subscription brings it.
    let broker = with_consumer().await;
    let addr = broker.v4_addr();
    let mut van = client(addr, "van-1").await;
    van.publish(EVENT, b"early", 1, 4, false).await;
    quiet(&mut van, "no PUBACK without a durable consumer").await;

    let mut consumer = subscribe_consumer(addr).await;
    let (pkid, payload) = delivery(&mut consumer, EVENT).await;
    assert_eq!(payload, b"early");
    consumer.send(&puback(pkid)).await;
    assert_eq!(van.read().await, Some((0x40, vec![0, 4])));
    assert!(broker.metrics().replayed_total() >= 1);
}

#[tokio::test]
async fn the_bridge_role_is_a_durable_consumer() {
    let provisioned = Provisioned::new(&["van-1"], &[("bridge", Role::Bridge)]);
    let broker = start(BrokerConfig {
        // Any client id: the role decides.
        durable_consumers: vec!["someone-else".to_owned()],
        ..provisioned.config()
    })
    .await;
    let addr = broker.v4_addr();
    let mut bridge = logged_in(&provisioned, addr, "bridge", "bridge-1").await;
    assert_eq!(bridge.subscribe(1, "fleet/+/+/status", 1).await.0, 0x90);
    let mut van = logged_in(&provisioned, addr, "van-1", "van-1").await;
    van.publish("fleet/f/van-1/status", b"online", 1, 2, true)
        .await;
    let (pkid, _) = delivery(&mut bridge, "fleet/f/van-1/status").await;
    quiet(&mut van, "waits for the bridge").await;
    bridge.send(&puback(pkid)).await;
    assert_eq!(van.read().await, Some((0x40, vec![0, 2])));
}

#[tokio::test]
async fn other_traffic_is_acknowledged_as_before() {
    // A durable consumer is configured but not connected: only event, ack and status wait.
    let broker = with_consumer().await;
    let addr = broker.v4_addr();
    let mut van = client(addr, "van-1").await;
    van.publish("fleet/f/van-1/hb", b"hb", 1, 1, false).await;
    assert_eq!(
        van.read().await,
        Some((0x40, vec![0, 1])),
        "a QoS 1 heartbeat"
    );
    van.publish("other/topic", b"x", 1, 2, false).await;
    assert_eq!(van.read().await, Some((0x40, vec![0, 2])), "another topic");
    van.publish(EVENT, b"qos0", 0, 0, false).await;
    quiet(&mut van, "nothing owed for a QoS 0 event").await;
    assert_eq!(broker.metrics().durability_waiting(), 0);

    // And without durable consumers or a journal (BrokerConfig::ephemeral), nothing waits.
    let plain = start(BrokerConfig::ephemeral()).await;
    let mut van = client(plain.v4_addr(), "van-1").await;
    van.publish(EVENT, b"e", 1, 3, false).await;
    assert_eq!(van.read().await, Some((0x40, vec![0, 3])));
}

#[tokio::test]
async fn the_journal_acknowledges_survives_a_restart_and_is_pruned_by_the_consumer() {
    let (_dir, journal) = temp_journal("restart");

    // No consumer anywhere: the journal's commit is what acknowledges.
    let broker = with_journal(&journal).await;
    let mut van = client(broker.v4_addr(), "van-1").await;
    for pkid in 1..=3u8 {
        van.publish(EVENT, &[b'e', pkid], 1, pkid.into(), false)
            .await;
    }
    for pkid in 1..=3u8 {
        assert_eq!(
            van.read().await,
            Some((0x40, vec![0, pkid])),
            "PUBACK from the journal"
        );
    }
    let metrics = broker.metrics();
    assert_eq!(metrics.journal_rows(), 3);
    assert!(metrics.journal_commits_total() >= 1);
    assert!(
        metrics
            .render()
            .contains("fleetbeat_broker_journal_rows 3\n")
    );
    drop(van);
    broker.shutdown().await;

    // Restarted on the same journal: the consumer's subscription brings what it holds.
    let broker = with_journal(&journal).await;
    assert_eq!(broker.metrics().journal_rows(), 3, "loaded at start");
    let mut consumer = subscribe_consumer(broker.v4_addr()).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let (pkid, payload) = delivery(&mut consumer, EVENT).await;
        got.push(payload);
        consumer.send(&puback(pkid)).await;
    }
    assert_eq!(
        got,
        [b"e\x01".to_vec(), b"e\x02".to_vec(), b"e\x03".to_vec()]
    );
    let metrics = broker.metrics();
    eventually("acknowledged rows are deleted", || {
        metrics.journal_rows() == 0
    })
    .await;
    drop(consumer);
    broker.shutdown().await;

    // Pruned for good: the next restart has nothing to deliver.
    let broker = with_journal(&journal).await;
    assert_eq!(broker.metrics().journal_rows(), 0);
    let mut consumer = subscribe_consumer(broker.v4_addr()).await;
    quiet(&mut consumer, "nothing left in the journal").await;
    broker.shutdown().await;
    if let Some(dir) = journal.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test]
async fn a_full_journal_withholds_the_puback_until_a_consumer_acknowledges() {
    let (_dir, journal) = temp_journal("full");
    let broker = start(BrokerConfig {
        durable_consumers: vec!["consumer".to_owned()],
        journal: Some(journal.clone()),
        journal_max_rows: 1,
        ..BrokerConfig::ephemeral()
    })
    .await;
    let addr = broker.v4_addr();
    let mut van = client(addr, "van-1").await;
    van.publish(EVENT, b"fits", 1, 1, false).await;
    assert_eq!(van.read().await, Some((0x40, vec![0, 1])));
    let mut consumer = subscribe_consumer(addr).await;
    // The journaled one comes first (the subscription brings it), unacknowledged for now.
    let (journaled, payload) = delivery(&mut consumer, EVENT).await;
    assert_eq!(payload, b"fits");

    let pkid = relayed(&mut van, &mut consumer, b"no room", 2).await;
    quiet(
        &mut van,
        "the journal is full: the PUBACK waits for the consumer",
    )
    .await;
    let metrics = broker.metrics();
    assert_eq!(metrics.journal_full_total(), 1);
    assert!(
        metrics
            .render()
            .contains("fleetbeat_broker_journal_full_total 1\n")
    );
    consumer.send(&puback(pkid)).await;
    assert_eq!(van.read().await, Some((0x40, vec![0, 2])));
    consumer.send(&puback(journaled)).await;
    eventually("pruned", || metrics.journal_rows() == 0).await;
    if let Some(dir) = journal.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test]
async fn a_second_broker_on_the_same_journal_is_refused() {
    let (_dir, journal) = temp_journal("twice");
    let _first = with_journal(&journal).await;
    let err = Broker::start(BrokerConfig {
        journal: Some(journal.clone()),
        ..BrokerConfig::ephemeral()
    })
    .await
    .expect_err("the journal is in use");
    assert!(matches!(err, broker::BrokerError::Journal(_)), "{err:?}");
    assert!(err.to_string().contains("another broker"), "{err}");
}

#[tokio::test]
async fn a_graceful_shutdown_does_not_wait_for_a_durability_that_cannot_come() {
    // The bridge stops its MQTT client before its embedded broker: a device's event that its
    // store never acknowledged must not hold the broker's shutdown for the whole grace period.
    let (broker, mut consumer, mut van) = with_consumer_and_van().await;
    van.publish(EVENT, b"never acknowledged", 1, 1, false).await;
    let _ = delivery(&mut consumer, EVENT).await;
    drop(consumer);
    common::eventually("the consumer is gone", || {
        broker.metrics().connections() == 1
    })
    .await;
    let report = broker.shutdown().await;
    assert_eq!(report.forced, 0, "{report:?}");
    assert!(report.elapsed < Duration::from_secs(5), "{report:?}");
    assert_eq!(van.until_closed().await, [], "closed without the PUBACK");
}
