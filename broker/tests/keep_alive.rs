//! Proof of life: keep-alive, last wills, and the takeover of a client id.

mod common;

use std::time::Duration;

use broker::{ConnectRefusal, DisconnectReason};
use common::{Raw, Subscriber, connect_as, eventually, start_ephemeral};
use rumqttc::QoS;
use shared::frame::{Connect, DISCONNECT};
use tokio::time::{Instant, sleep};

/// A CONNECT as `van-1` with `keep_alive`, leaving a retained offline will on its status topic.
fn van_with_will(keep_alive: u16) -> Connect<'static> {
    Connect {
        keep_alive,
        will: Some(("fleet/f/van-1/status", b"offline", true)),
        ..connect_as("van-1")
    }
}

/// A subscriber to every vehicle's status, connected as `id`.
async fn status_watcher(addr: std::net::SocketAddr, id: &str) -> Subscriber {
    Subscriber::new(addr, id, "fleet/+/+/status", QoS::AtLeastOnce).await
}

#[tokio::test]
async fn silent_clients_are_dropped_after_one_and_a_half_keep_alives_and_their_will_fires() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut watcher = status_watcher(addr, "watcher").await;

    let started = Instant::now();
    let mut silent = Raw::connected(addr, &van_with_will(1)).await;
    assert!(silent.until_closed().await.is_empty());
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(1400) && lived < Duration::from_secs(4),
        "{lived:?}"
    );

    let will = watcher.next().await;
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("fleet/f/van-1/status", &b"offline"[..])
    );
    let metrics = broker.metrics();
    eventually("counted", || {
        metrics.disconnects_total(DisconnectReason::KeepAlive) == 1
    })
    .await;
    assert_eq!(metrics.wills_published_total(), 1);

    // The will was retained: a newcomer sees the vehicle offline.
    let mut late = status_watcher(addr, "late").await;
    assert_eq!(&late.next().await.payload[..], b"offline");
}

#[tokio::test]
async fn a_clean_disconnect_does_not_fire_the_will_and_pings_keep_a_client_alive() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut watcher = status_watcher(addr, "watcher").await;
    let mut client = Raw::connected(addr, &van_with_will(1)).await;
    for _ in 0..4 {
        sleep(Duration::from_millis(700)).await;
        assert_eq!(client.ping().await, 0xD0, "PINGRESP");
    }
    client.send(&DISCONNECT).await;
    assert!(client.until_closed().await.is_empty());
    watcher.nothing_for(Duration::from_millis(500)).await;
    assert_eq!(
        broker.metrics().disconnects_total(DisconnectReason::Client),
        1
    );
    assert_eq!(broker.metrics().wills_published_total(), 0);
}

/// A vehicle must prove it is alive: keep-alive 0 is refused to it (in open mode a vehicle is
/// told by its last will on a vehicle topic; clients that are not vehicles may use 0, see
/// `conformance.rs`).
#[tokio::test]
async fn keep_alive_zero_is_refused_to_a_vehicle_with_a_connack() {
    let broker = start_ephemeral().await;
    let (mut raw, code) = Raw::connect(broker.v4_addr(), &van_with_will(0)).await;
    assert_eq!(code, 5, "not authorised");
    assert!(raw.until_closed().await.is_empty());
    let (_, code) = Raw::connect(
        broker.v5_addr().unwrap(),
        &Connect {
            v5: true,
            ..van_with_will(0)
        },
    )
    .await;
    assert_eq!(code, 0x87);
    let metrics = broker.metrics();
    assert_eq!(
        metrics.connect_refused_total(ConnectRefusal::KeepAliveZero),
        2
    );
}

#[tokio::test]
async fn a_takeover_closes_the_old_connection_without_its_will() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut watcher = status_watcher(addr, "watcher").await;
    let connect = van_with_will(30);
    let mut old = Raw::connected(addr, &connect).await;
    let mut new = Raw::connected(addr, &connect).await;
    assert!(
        old.until_closed().await.is_empty(),
        "the old connection is closed"
    );
    watcher.nothing_for(Duration::from_millis(300)).await;
    new.publish("fleet/f/van-1/status", b"online", 0, 0, true)
        .await;
    assert_eq!(&watcher.next().await.payload[..], b"online");
    let metrics = broker.metrics();
    assert_eq!(metrics.disconnects_total(DisconnectReason::TakenOver), 1);
    assert_eq!(metrics.wills_published_total(), 0);
}
