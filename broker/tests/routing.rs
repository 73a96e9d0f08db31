//! Routing: QoS 0 and 1, retained messages, persistent sessions, and latency.

mod common;

use std::time::Duration;

use common::{
    Raw, Subscriber, client, client_subscribed, connect_as, eventually, publish_fields,
    start_ephemeral,
};
use rumqttc::QoS;
use shared::TopicKind;
use shared::frame::{Connect, DISCONNECT};
use tokio::time::Instant;

#[tokio::test]
async fn routes_qos0_qos1_and_retained_messages() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut sub = Subscriber::connect(
        addr,
        "sub",
        None,
        &[
            ("fleet/+/+/hb", QoS::AtMostOnce),
            ("fleet/+/+/event", QoS::AtLeastOnce),
        ],
    )
    .await;

    let mut publisher = client(addr, "pub").await;
    publisher.publish("fleet/f/v/hb", b"hb", 0, 0, false).await;
    publisher
        .publish("fleet/f/v/event", b"ev", 1, 7, false)
        .await;
    let (first, body) = publisher.read().await.unwrap();
    assert_eq!(
        (first, body),
        (0x40, vec![0, 7]),
        "PUBACK for the QoS 1 publish"
    );

    let hb = sub.next().await;
    assert_eq!(
        (hb.topic.as_str(), &hb.payload[..], hb.qos),
        ("fleet/f/v/hb", &b"hb"[..], QoS::AtMostOnce)
    );
    let ev = sub.next().await;
    assert_eq!(
        (ev.topic.as_str(), ev.qos),
        ("fleet/f/v/event", QoS::AtLeastOnce)
    );

    // Retained: a late subscriber gets the last status.
    publisher
        .publish("fleet/f/v/status", b"on", 1, 8, true)
        .await;
    publisher.read().await.unwrap();
    let mut late = Subscriber::new(addr, "late", "fleet/+/+/status", QoS::AtLeastOnce).await;
    let status = late.next().await;
    assert_eq!((&status.payload[..], status.retain), (&b"on"[..], true));

    let metrics = broker.metrics();
    eventually("counters", || {
        metrics.messages_out_total(Some(TopicKind::Status)) >= 1
    })
    .await;
    assert_eq!(metrics.messages_in_total(Some(TopicKind::Heartbeat)), 1);
    assert_eq!(metrics.messages_in_total(Some(TopicKind::Event)), 1);
    assert_eq!(metrics.messages_out_total(Some(TopicKind::Heartbeat)), 1);
    assert!(metrics.bytes_in_total() > 0 && metrics.bytes_out_total() > 0);
    assert!(metrics.connections() >= 3);
}

/// rumqttd 0.20 never sets TCP_NODELAY: with Nagle, each small write waits for the ACK of the
/// previous one, and delayed ACKs make a ping-pong take ≈40 ms per round. Ours sets it.
#[tokio::test]
async fn small_messages_are_not_held_back_by_nagle() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut sub = client_subscribed(addr, "sub", 1, "ping/#", 0).await;
    let mut publisher = client(addr, "pub").await;

    let rounds = 100;
    let started = Instant::now();
    for i in 0..rounds {
        publisher
            .publish("ping/x", format!("{i}").as_bytes(), 0, 0, false)
            .await;
        let (first, _) = sub.read().await.unwrap();
        assert_eq!(first >> 4, 3);
    }
    let elapsed = started.elapsed();
    // With Nagle and delayed ACKs this takes seconds; without, milliseconds.
    assert!(
        elapsed < Duration::from_secs(1),
        "{rounds} round trips took {elapsed:?}"
    );
}

#[tokio::test]
async fn a_persistent_session_gets_what_was_published_while_it_was_away() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let session = Connect {
        persistent: true,
        ..connect_as("fleetbeat-bridge")
    };
    let mut bridge = Raw::connected(addr, &session).await;
    assert_eq!(bridge.subscribe(1, "fleet/+/+/event", 1).await.0, 0x90);
    bridge.send(&DISCONNECT).await;
    assert!(bridge.until_closed().await.is_empty());

    let mut device = client(addr, "van-1").await;
    device
        .publish("fleet/f/van-1/event", b"while away", 1, 1, false)
        .await;
    assert_eq!(device.read().await.unwrap(), (0x40, vec![0, 1]));

    let (mut bridge, _) = Raw::connect(addr, &session).await;
    let (first, body) = bridge.read().await.unwrap();
    assert_eq!(
        publish_fields(first, &body),
        ("fleet/f/van-1/event".to_owned(), b"while away".to_vec())
    );
}
