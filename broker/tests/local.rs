//! The in-process subscription of an embedding program (`Broker::subscribe_local`, the
//! bridge's heartbeats): what devices publish on its filters reaches it in order, nothing
//! else does, and a subscriber that reads late is resumed by the router without losing what
//! the commit log still holds.

mod common;

use broker::{BrokerConfig, LocalMessage, LocalSubscriber};
use common::{T, client, start, start_ephemeral};
use shared::TopicKind;
use tokio::time::timeout;

/// Receives until `n` messages have come (within [`T`]).
async fn receive(subscriber: &mut LocalSubscriber, n: usize) -> Vec<LocalMessage> {
    let mut got = Vec::new();
    timeout(T, async {
        while got.len() < n {
            subscriber
                .recv(|message| got.push(message))
                .await
                .expect("the router is alive");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} messages within {T:?}, got {}", got.len()));
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_subscriber_receives_its_filters_messages_in_order() {
    let broker = start_ephemeral().await;
    let mut local = broker
        .subscribe_local("test", &[TopicKind::Heartbeat.filter()])
        .await
        .expect("subscribed");
    let mut van = client(broker.v4_addr(), "van-1").await;
    van.publish("fleet/f/van-1/hb", b"one", 0, 0, false).await;
    // Not on the filter: must not come.
    van.publish("fleet/f/van-1/status", b"online", 0, 0, false)
        .await;
    van.publish("fleet/f/van-1/hb", b"two", 0, 0, false).await;
    van.publish("fleet/g/van-2/hb", b"three", 0, 0, false).await;

    let got = receive(&mut local, 3).await;
    let seen: Vec<(&[u8], &[u8])> = got
        .iter()
        .map(|m| (m.topic.as_ref(), m.payload.as_ref()))
        .collect();
    assert_eq!(
        seen,
        [
            (&b"fleet/f/van-1/hb"[..], &b"one"[..]),
            (b"fleet/f/van-1/hb", b"two"),
            (b"fleet/g/van-2/hb", b"three"),
        ]
    );
    assert_eq!(
        broker
            .metrics()
            .messages_out_total(Some(TopicKind::Heartbeat)),
        3,
        "counted as delivered"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reader_is_resumed_and_loses_nothing_the_log_holds() {
    // One client publishes them all: no rate limit.
    let broker = start(BrokerConfig {
        max_publish_rate: 0,
        ..BrokerConfig::ephemeral()
    })
    .await;
    let mut local = broker
        .subscribe_local("late", &[TopicKind::Heartbeat.filter()])
        .await
        .expect("subscribed");
    // More than the router queues for a link (`max_outgoing_packet_count`, 1000) before
    // pausing it, fewer than the heartbeat commit log holds.
    const N: usize = 3_000;
    let mut van = client(broker.v4_addr(), "van-1").await;
    for i in 0..N {
        van.publish("fleet/f/van-1/hb", i.to_string().as_bytes(), 0, 0, false)
            .await;
    }
    // Every publish is routed before the subscriber reads any: a PINGREQ's answer comes
    // after them through the same connection.
    van.ping().await;

    let got = receive(&mut local, N).await;
    let payloads: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).expect("utf-8"))
        .collect();
    let expected: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(payloads, expected, "all of them, in order");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_local_subscriber_is_forgotten_by_the_router() {
    // The router has slots for `max_connections` clients and ≈1 000 more for the broker's own
    // links and shared groups; a subscriber it did not forget would keep its slot, and 2 000
    // in turn would run out of them.
    let broker = start(BrokerConfig {
        max_connections: 1,
        ..BrokerConfig::ephemeral()
    })
    .await;
    for round in 0..2_000 {
        let subscriber = broker
            .subscribe_local("again", &[TopicKind::Heartbeat.filter()])
            .await
            .unwrap_or_else(|err| panic!("round {round}: {err}"));
        drop(subscriber);
    }
    // And the last one still receives.
    let mut local = broker
        .subscribe_local("last", &[TopicKind::Heartbeat.filter()])
        .await
        .expect("subscribed");
    let mut van = client(broker.v4_addr(), "van-1").await;
    van.publish("fleet/f/van-1/hb", b"x", 0, 0, false).await;
    assert_eq!(receive(&mut local, 1).await[0].payload.as_ref(), b"x");
    broker.shutdown().await;
}
