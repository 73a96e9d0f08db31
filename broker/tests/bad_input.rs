//! Bad input and rumqttd's defects: what a client can send that rumqttd's own network code
//! would choke on, and what the broker does instead.

mod common;

use broker::{BrokerConfig, ConnectRefusal, DisconnectReason, DropReason};
use common::{
    Raw, Subscriber, client, client_v5, connect_as, connect_v5_as, eventually, publish_v5, start,
    start_ephemeral,
};
use rumqttc::QoS;
use shared::frame::DISCONNECT;

/// The rumqttd 0.20 repro: `mosquitto_pub -V 5 -r -t r/a -m x -D publish user-property a 2`,
/// then `mosquitto_sub -V 311 -t 'r/#'`. In rumqttd's own network code the v4 encoder hits
/// `unreachable!()` on the properties and the v4 listener stops answering.
#[tokio::test]
async fn a_v5_property_does_not_harm_v4_subscribers() {
    let broker = start_ephemeral().await;
    let mut v5 = client_v5(broker.v5_addr().unwrap(), "v5pub").await;
    // User property ("a", "2").
    let props = [0x26, 0, 1, b'a', 0, 1, b'2'];
    v5.send(&publish_v5("r/a", b"x", true, &props)).await;
    v5.send(&DISCONNECT).await;

    let mut v4 = Subscriber::new(broker.v4_addr(), "v4sub", "r/#", QoS::AtMostOnce).await;
    let got = v4.next().await;
    // Retained, or live if the subscription reached the router before the publish did (a
    // loaded machine): either way through the v4 encoder.
    assert_eq!((got.topic.as_str(), &got.payload[..]), ("r/a", &b"x"[..]));
    // Now the message is surely retained: a second v4 subscriber gets it from the store.
    let mut late = Subscriber::new(broker.v4_addr(), "v4late", "r/#", QoS::AtMostOnce).await;
    let got = late.next().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.retain),
        ("r/a", &b"x"[..], true)
    );
    // Live (not retained) deliveries too.
    let mut v5 = client_v5(broker.v5_addr().unwrap(), "v5pub").await;
    v5.send(&publish_v5("r/b", b"y", false, &props)).await;
    let mut live = v4.next().await;
    if (live.topic.as_str(), &live.payload[..]) == ("r/a", &b"x"[..]) {
        // rumqttd 0.20 defect 7 (docs/broker.md): `x` routed between the SUBSCRIBE and the
        // router's first read for it reaches the subscriber retained and live.
        live = v4.next().await;
    }
    assert_eq!((live.topic.as_str(), &live.payload[..]), ("r/b", &b"y"[..]));

    let (_, code) = Raw::connect(broker.v4_addr(), &connect_as("after")).await;
    assert_eq!(code, 0, "the v4 listener still answers");
    assert!(broker.is_ready());
}

/// rumqttd's v5 decoder panics (`unreachable!()`) on a CONNACK or UNSUBACK from a client.
#[tokio::test]
async fn server_only_packets_from_a_client_end_only_that_connection() {
    let broker = start_ephemeral().await;
    let v5 = broker.v5_addr().unwrap();
    for evil in [
        &[0x20u8, 0x03, 0x00, 0x00, 0x00][..],
        &[0xB0, 0x04, 0x00, 0x01, 0x00, 0x00],
    ] {
        let mut raw = client_v5(v5, "evil").await;
        raw.send(evil).await;
        // Closed, after a DISCONNECT "protocol error" that says why.
        let told: Vec<_> = raw
            .until_closed()
            .await
            .into_iter()
            .map(|(first, body)| (first, body[0]))
            .collect();
        assert_eq!(told, [(0xE0, 0x82)]);
    }
    let (_, code) = Raw::connect(v5, &connect_v5_as("fine")).await;
    assert_eq!(code, 0);
    // The broker counts a disconnect as it tears the connection down, which may come after
    // the client saw the close.
    let metrics = broker.metrics();
    eventually("both protocol disconnects counted", || {
        metrics.disconnects_total(DisconnectReason::Protocol) == 2
    })
    .await;
}

#[tokio::test]
async fn oversized_packets_close_the_connection_and_are_counted() {
    let broker = start(BrokerConfig {
        max_payload_size: 1024,
        max_segment_size: 1024,
        ..BrokerConfig::ephemeral()
    })
    .await;
    let mut raw = client(broker.v4_addr(), "big").await;
    raw.publish("fleet/f/v/hb", &[0; 2000], 0, 0, false).await;
    assert!(raw.until_closed().await.is_empty());
    assert_eq!(broker.metrics().dropped_total(DropReason::Oversized), 1);
    assert!(broker.is_ready());
}

#[tokio::test]
async fn the_wrong_protocol_version_gets_an_answer_it_understands() {
    let broker = start_ephemeral().await;
    let mut raw = Raw::open(broker.v4_addr()).await;
    raw.send(&connect_v5_as("x").bytes()).await;
    // Each client is answered in its own version's format.
    assert_eq!(
        raw.read().await,
        Some((0x20, vec![0x00, 0x84, 0x00])),
        "5: unsupported protocol version"
    );
    let mut raw = Raw::open(broker.v5_addr().unwrap()).await;
    raw.send(&connect_as("x").bytes()).await;
    assert_eq!(
        raw.read().await,
        Some((0x20, vec![0x00, 0x01])),
        "3.1.1: unacceptable protocol version"
    );
    let metrics = broker.metrics();
    assert_eq!(metrics.connect_refused_total(ConnectRefusal::Protocol), 2);
}
