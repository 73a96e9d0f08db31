//! Graceful shutdown: in-flight QoS 1 completes within the grace period, then everything
//! closes; dropping the broker stops it at once.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use broker::{Broker, BrokerConfig};
use common::{
    Raw, T, client, client_subscribed, client_v5, eventually, publish_pkid, start_ephemeral,
};
use shared::TopicKind;
use shared::frame::puback;
use tokio::time::{Instant, sleep, timeout};

/// A subscriber `sub` to `filter` at QoS 1 and a publisher `pub`.
async fn sub_and_pub(addr: SocketAddr, filter: &str) -> (Raw, Raw) {
    let sub = client_subscribed(addr, "sub", 1, filter, 1).await;
    (sub, client(addr, "pub").await)
}

#[tokio::test]
async fn shutdown_completes_in_flight_qos1_then_closes() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let v5 = broker.v5_addr().unwrap();

    // A subscriber that has received a QoS 1 message and acknowledges it late.
    let (mut sub, mut publisher) = sub_and_pub(addr, "fleet/+/+/event").await;
    publisher
        .publish("fleet/f/v/event", b"e1", 1, 1, false)
        .await;
    assert_eq!(publisher.read().await.unwrap(), (0x40, vec![0, 1]));
    let (first, body) = sub.read().await.unwrap();
    assert_eq!(first & 0xF6, 0x32, "QoS 1 PUBLISH");
    let pkid = publish_pkid(first, &body);
    // An MQTT 5 client, idle.
    let mut idle5 = client_v5(v5, "idle5").await;

    let shutdown = tokio::spawn(broker.shutdown_within(Duration::from_secs(10)));
    // Accepting stops at once.
    eventually("accepting stopped", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    // The MQTT 5 client is told why and closed.
    assert_eq!(idle5.until_closed().await, vec![(0xE0, vec![0x8B])]);
    // The publisher had nothing in flight: closed.
    assert!(publisher.until_closed().await.is_empty());
    // The subscriber still owes its PUBACK: the broker waits for it.
    sleep(Duration::from_millis(300)).await;
    assert!(!shutdown.is_finished());
    sub.send(&puback(pkid)).await;
    assert!(sub.until_closed().await.is_empty());
    let report = timeout(T, shutdown).await.unwrap().unwrap();
    assert_eq!(report.forced, 0);
    assert!(report.open_connections >= 3);
    assert!(
        report.elapsed >= Duration::from_millis(300) && report.elapsed < Duration::from_secs(10),
        "{report:?}"
    );
}

#[tokio::test]
async fn shutdown_acknowledges_a_qos1_publish_the_broker_took() {
    let broker = start_ephemeral().await;
    let mut publisher = client(broker.v4_addr(), "pub").await;
    publisher
        .publish("fleet/f/v/event", b"e1", 1, 1, false)
        .await;
    let metrics = broker.metrics();
    eventually("the publish was read", || {
        metrics.messages_in_total(Some(TopicKind::Event)) == 1
    })
    .await;
    // Read only once the shutdown is over: the PUBACK must have come before the close.
    let report = broker.shutdown_within(Duration::from_secs(5)).await;
    assert_eq!(publisher.until_closed().await, vec![(0x40, vec![0, 1])]);
    assert_eq!(report.forced, 0);
}

#[tokio::test]
async fn shutdown_is_bounded_when_a_client_never_acknowledges() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let (mut sub, mut publisher) = sub_and_pub(addr, "x/#").await;
    publisher.publish("x/y", b"m", 1, 1, false).await;
    assert_eq!(sub.read().await.unwrap().0 & 0xF0, 0x30);

    let started = Instant::now();
    let report = broker.shutdown_within(Duration::from_millis(500)).await;
    assert_eq!(report.forced, 1, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(sub.until_closed().await.is_empty());
}

#[tokio::test]
async fn dropping_the_broker_or_its_start_stops_it_cleanly() {
    // Abandoning start-up midway must not panic (a runtime dropped in async code would).
    let _ = timeout(
        Duration::from_millis(1),
        Broker::start(BrokerConfig::ephemeral()),
    )
    .await;
    sleep(Duration::from_millis(100)).await;

    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut client = client(addr, "c").await;
    drop(broker);
    assert!(client.until_closed().await.is_empty());
    eventually("nothing listens", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
}
