//! The JSON mirror on `json/fleet/...`: what it documents, when it reads heartbeats, and
//! switching it off.

mod common;

use std::time::Duration;

use broker::{Broker, BrokerConfig};
use common::{Subscriber, client, eventually, publish, start, start_ephemeral};
use rumqttc::QoS;
use tokio::time::sleep;

/// `msg` sealed for `topic` with the vehicle's open-mode key.
fn sealed<T: serde::Serialize>(msg: &T, topic: &str, counter: u64) -> Vec<u8> {
    let key = shared::open_mode_key(&shared::Topic::parse(topic).unwrap().vehicle);
    let mut buf = [0u8; 128];
    shared::seal(msg, topic, counter, &key, &mut buf)
        .unwrap()
        .to_vec()
}

/// A QoS 0 PUBLISH of `msg` on `topic`, sealed with the vehicle's open-mode key.
fn sealed_publish<T: serde::Serialize>(msg: &T, topic: &str, counter: u64) -> Vec<u8> {
    publish(topic, &sealed(msg, topic, counter), 0, 0, false)
}

/// A sealed heartbeat numbered `seq` (also its counter) on `topic`.
fn heartbeat(topic: &str, seq: u32) -> Vec<u8> {
    let hb = shared::Heartbeat {
        seq,
        ..Default::default()
    };
    sealed_publish(&hb, topic, u64::from(seq))
}

/// Waits until the mirror reads heartbeats (or no longer does): it follows the `json/...`
/// subscriptions a moment after their SUBACK.
async fn mirror_heartbeats(broker: &Broker, on: bool) {
    eventually(&format!("mirror_heartbeats {on}"), || {
        broker.metrics().mirror_heartbeats() == on
    })
    .await;
}

/// Asserts the mirror's count stays at `expected` for a moment (nothing more is coming).
async fn json_idle(broker: &Broker, expected: u64) {
    sleep(Duration::from_millis(200)).await;
    assert_eq!(broker.metrics().mirror_published_total(), expected);
}

#[tokio::test]
async fn device_traffic_is_mirrored_as_json() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut json = Subscriber::new(addr, "engineer", "json/#", QoS::AtMostOnce).await;
    mirror_heartbeats(&broker, true).await;
    let mut device = client(addr, "demo-0001").await;

    let topic = "fleet/demo/demo-0001/hb";
    let hb = shared::Heartbeat {
        seq: 42,
        ..Default::default()
    };
    device.send(&sealed_publish(&hb, topic, 5)).await;
    let doc = json.next().await;
    assert_eq!(doc.topic, "json/fleet/demo/demo-0001/hb");
    assert!(!doc.retain);
    let value: serde_json::Value = serde_json::from_slice(&doc.payload).unwrap();
    assert_eq!(
        (value["seq"].as_u64(), value["origin"].as_str()),
        (Some(42), Some("open mode: public key, not proof"))
    );

    device.publish(topic, &[9, 9], 0, 0, false).await;
    let value: serde_json::Value = serde_json::from_slice(&json.next().await.payload).unwrap();
    assert_eq!(value["bytes"], "0909");
    let error = value["error"].as_str().unwrap();
    assert!(error.contains("unsupported protocol version 9"), "{error}");

    // Status is retained on the mirror: a late watcher sees it.
    let status_topic = "fleet/demo/demo-0001/status";
    let status = sealed(&shared::Status::Online, status_topic, 6);
    device.publish(status_topic, &status, 1, 1, true).await;
    assert_eq!(device.read().await.unwrap().0, 0x40);
    let live = json.next().await;
    assert_eq!(live.topic, "json/fleet/demo/demo-0001/status");
    let mut late = Subscriber::new(addr, "late", "json/fleet/+/+/status", QoS::AtMostOnce).await;
    let retained = late.next().await;
    assert!(retained.retain);
    let value: serde_json::Value = serde_json::from_slice(&retained.payload).unwrap();
    assert_eq!(value["status"], "online");

    // One document per message: the mirror does not feed itself.
    json.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(broker.metrics().mirror_published_total(), 3);
    assert_eq!(broker.metrics().mirror_undecodable_total(), 1);
}

#[tokio::test]
async fn heartbeats_are_mirrored_only_while_someone_may_read_them() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut device = client(addr, "demo-0001").await;
    let topic = "fleet/demo/demo-0001/hb";
    // A subscriber that cannot see the mirror does not switch it on.
    let mut fleet = Subscriber::new(addr, "bridge-like", "fleet/#", QoS::AtMostOnce).await;
    device.send(&heartbeat(topic, 1)).await;
    assert_eq!(fleet.next().await.topic, topic);
    assert_eq!(
        broker.metrics().mirror_published_total(),
        0,
        "nobody watches"
    );

    assert!(!broker.metrics().mirror_heartbeats());
    let mut json = Subscriber::new(addr, "engineer", "json/fleet/#", QoS::AtMostOnce).await;
    mirror_heartbeats(&broker, true).await;
    device.send(&heartbeat(topic, 2)).await;
    assert_eq!(fleet.next().await.topic, topic);
    let doc = json.next().await;
    assert_eq!(doc.topic, "json/fleet/demo/demo-0001/hb");
    let value: serde_json::Value = serde_json::from_slice(&doc.payload).unwrap();
    assert_eq!(value["seq"], 2);
    assert_eq!(broker.metrics().mirror_published_total(), 1);

    // The engineer leaves: the mirror stops reading heartbeats. A status is always documented:
    // once it is, the heartbeat sent before it would have been too (the router takes the
    // device's packets in order), and the count shows it was not.
    json.client.disconnect().await.unwrap();
    mirror_heartbeats(&broker, false).await;
    let before = broker.metrics().mirror_published_total();
    device.send(&heartbeat(topic, 3)).await;
    let status_topic = "fleet/demo/demo-0001/status";
    device
        .send(&sealed_publish(&shared::Status::Online, status_topic, 4))
        .await;
    assert_eq!(fleet.next().await.topic, topic);
    assert_eq!(fleet.next().await.topic, status_topic);
    eventually("the status mirrored", || {
        broker.metrics().mirror_published_total() != before
    })
    .await;
    json_idle(&broker, before + 1).await;
}

#[tokio::test]
async fn the_mirror_can_be_switched_off() {
    let without_mirror = BrokerConfig {
        json_mirror: false,
        ..BrokerConfig::ephemeral()
    };
    let broker = start(without_mirror).await;
    let mut json = Subscriber::new(broker.v4_addr(), "engineer", "json/#", QoS::AtMostOnce).await;
    let mut device = client(broker.v4_addr(), "demo-0001").await;
    device
        .publish("fleet/demo/demo-0001/hb", &[1, 2, 3], 0, 0, false)
        .await;
    json.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(broker.metrics().mirror_published_total(), 0);
}
