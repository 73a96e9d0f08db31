//! Devices served by the shared mux link: their commands at QoS 1, their publishes
//! acknowledged with their own packet ids, their wills, retained commands, and what a
//! wildcard subscriber sees beside them.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    Raw, Subscriber, T, client, client_subscribed, connect_as, eventually, publish_fields,
    publish_pkid, start_ephemeral, unsubscribe,
};
use rumqttc::QoS;
use shared::TopicKind;
use shared::frame::{Connect, DISCONNECT, puback};
use tokio::time::{sleep, timeout};

/// Subscribes `raw` to `filter` at `qos` and asserts the SUBACK grants it.
async fn granted(raw: &mut Raw, pkid: u8, filter: &str, qos: u8) {
    assert_eq!(
        raw.subscribe(pkid.into(), filter, qos).await,
        (0x90, vec![0, pkid, qos]),
        "SUBACK QoS {qos} for {filter}"
    );
}

/// A client `dispatch` that has published the command `payload` to `van-1` at QoS 1 with
/// packet id `pkid`, and had it acknowledged.
async fn dispatched(addr: SocketAddr, payload: &[u8], pkid: u8, retain: bool) -> Raw {
    let mut dispatch = client(addr, "dispatch").await;
    dispatch
        .publish("fleet/f/van-1/cmd", payload, 1, pkid.into(), retain)
        .await;
    assert_eq!(dispatch.read().await.unwrap(), (0x40, vec![0, pkid]));
    dispatch
}

#[tokio::test]
async fn a_mux_served_device_receives_its_command_at_qos1_and_acknowledges_it() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut van = client(addr, "van-1").await;
    granted(&mut van, 7, "fleet/f/van-1/cmd", 1).await;
    assert_eq!(broker.own_links(), 0, "served by the shared link alone");

    let _dispatch = dispatched(addr, b"go", 3, false).await;
    let (first, body) = van.read().await.unwrap();
    assert_eq!(first & 0xF6, 0x32, "QoS 1 PUBLISH, got {first:#04x}");
    assert_eq!(
        publish_fields(first, &body),
        ("fleet/f/van-1/cmd".to_owned(), b"go".to_vec())
    );
    let pkid = publish_pkid(first, &body);
    assert_ne!(pkid, 0);
    let metrics = broker.metrics();
    assert_eq!(metrics.messages_out_total(Some(TopicKind::Command)), 1);

    // Unacknowledged, the command holds a graceful shutdown; acknowledged, it does not.
    let shutdown = tokio::spawn(broker.shutdown_within(Duration::from_secs(10)));
    sleep(Duration::from_millis(300)).await;
    assert!(!shutdown.is_finished(), "waits for the device's PUBACK");
    van.send(&puback(pkid)).await;
    let report = timeout(T, shutdown).await.unwrap().unwrap();
    assert_eq!(report.forced, 0);
}

#[tokio::test]
async fn a_device_publish_at_qos1_is_acknowledged_with_its_own_packet_ids_in_order() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut watcher = Subscriber::new(addr, "watcher", "fleet/+/+/event", QoS::AtLeastOnce).await;
    let mut van = client(addr, "van-1").await;
    for pkid in [9u16, 300, 65535] {
        let payload = pkid.to_be_bytes();
        van.publish("fleet/f/van-1/event", &payload, 1, pkid, false)
            .await;
    }
    for pkid in [9u16, 300, 65535] {
        assert_eq!(
            van.read().await.unwrap(),
            (0x40, pkid.to_be_bytes().to_vec())
        );
        assert_eq!(&watcher.next().await.payload[..], pkid.to_be_bytes());
    }
    assert_eq!(
        broker.own_links(),
        1,
        "only the watcher has a link of its own"
    );
}

#[tokio::test]
async fn two_devices_do_not_receive_each_others_commands() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut one = client(addr, "van-1").await;
    let mut two = client(addr, "van-2").await;
    granted(&mut one, 1, "fleet/f/van-1/cmd", 1).await;
    granted(&mut two, 1, "fleet/f/van-2/cmd", 0).await;

    let mut dispatch = client(addr, "dispatch").await;
    dispatch
        .publish("fleet/f/van-2/cmd", b"for-2", 1, 1, false)
        .await;
    assert_eq!(dispatch.read().await.unwrap().0, 0x40);
    let (first, body) = two.read().await.unwrap();
    assert_eq!(first, 0x30, "at the QoS 0 van-2 was granted");
    assert_eq!(publish_fields(first, &body).1, b"for-2");
    // van-1 gets nothing: the next thing it reads is the answer to its ping.
    sleep(Duration::from_millis(300)).await;
    assert_eq!(one.ping().await, 0xD0, "PINGRESP, not van-2's command");

    // After UNSUBSCRIBE, van-2 gets no more commands.
    two.send(&unsubscribe(5, "fleet/f/van-2/cmd")).await;
    assert_eq!(two.read().await.unwrap(), (0xB0, vec![0, 5]), "UNSUBACK");
    dispatch
        .publish("fleet/f/van-2/cmd", b"again", 0, 0, false)
        .await;
    sleep(Duration::from_millis(300)).await;
    assert_eq!(two.ping().await, 0xD0, "PINGRESP, no command");
    assert_eq!(broker.own_links(), 0);
}

#[tokio::test]
async fn a_mux_served_device_leaves_its_will_when_lost_but_not_after_disconnect() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut watcher = Subscriber::new(addr, "watcher", "fleet/+/+/status", QoS::AtLeastOnce).await;
    let connect = |client_id| Connect {
        will: Some(("fleet/f/gone/status", b"offline", true)),
        ..connect_as(client_id)
    };
    let mut polite = Raw::connected(addr, &connect("polite")).await;
    assert_eq!(polite.subscribe(1, "fleet/f/polite/cmd", 1).await.0, 0x90);
    let mut lost = Raw::connected(addr, &connect("lost")).await;
    assert_eq!(lost.subscribe(1, "fleet/f/lost/cmd", 1).await.0, 0x90);
    assert_eq!(
        broker.own_links(),
        1,
        "only the watcher has a link of its own"
    );

    polite.send(&DISCONNECT).await;
    assert!(polite.until_closed().await.is_empty());
    watcher.nothing_for(Duration::from_millis(400)).await;
    assert_eq!(broker.metrics().wills_published_total(), 0);

    drop(lost); // the connection is lost, not closed
    let will = watcher.next().await;
    assert_eq!(
        (will.topic.as_str(), &will.payload[..], will.retain),
        ("fleet/f/gone/status", &b"offline"[..], false)
    );
    let metrics = broker.metrics();
    eventually("the will counted", || metrics.wills_published_total() == 1).await;
}

#[tokio::test]
async fn a_retained_command_is_delivered_on_subscribe_and_can_be_cleared() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut dispatch = dispatched(addr, b"park", 1, true).await;

    let mut van = client(addr, "van-1").await;
    granted(&mut van, 2, "fleet/f/van-1/cmd", 1).await;
    let (first, body) = van.read().await.unwrap();
    assert_eq!(
        first & 0xF7,
        0x33,
        "retained QoS 1 PUBLISH, got {first:#04x}"
    );
    assert_eq!(publish_fields(first, &body).1, b"park");
    van.send(&puback(publish_pkid(first, &body))).await;
    // Another vehicle does not get it.
    let mut other = client_subscribed(addr, "van-2", 2, "fleet/f/van-2/cmd", 1).await;
    assert_eq!(other.ping().await, 0xD0);

    // An empty retained publish clears it.
    dispatch.publish("fleet/f/van-1/cmd", b"", 1, 2, true).await;
    assert_eq!(dispatch.read().await.unwrap().0, 0x40);
    let mut again = client_subscribed(addr, "van-1b", 3, "fleet/f/van-1/cmd", 1).await;
    assert_eq!(again.ping().await, 0xD0, "nothing retained any more");
}

#[tokio::test]
async fn a_wildcard_subscriber_still_gets_everything() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let mut everything = Subscriber::new(addr, "everything", "fleet/#", QoS::AtLeastOnce).await;
    assert_eq!(broker.own_links(), 1);
    let mut van = client_subscribed(addr, "van-1", 1, "fleet/f/van-1/cmd", 1).await;
    van.publish("fleet/f/van-1/hb", b"hb", 0, 0, false).await;
    van.publish("fleet/f/van-1/event", b"ev", 1, 5, false).await;
    assert_eq!(van.read().await.unwrap(), (0x40, vec![0, 5]));
    let mut dispatch = client(addr, "dispatch").await;
    dispatch
        .publish("fleet/f/van-1/cmd", b"cmd", 1, 1, false)
        .await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let p = everything.next().await;
        seen.push((p.topic, p.payload.to_vec()));
    }
    assert_eq!(
        seen,
        vec![
            ("fleet/f/van-1/hb".to_owned(), b"hb".to_vec()),
            ("fleet/f/van-1/event".to_owned(), b"ev".to_vec()),
            ("fleet/f/van-1/cmd".to_owned(), b"cmd".to_vec()),
        ]
    );
    let (first, body) = van.read().await.unwrap();
    assert_eq!(publish_fields(first, &body).1, b"cmd");

    // A device that also subscribes to a wildcard gets its own link for it, and keeps both.
    granted(&mut van, 2, "fleet/f/+/status", 0).await;
    assert_eq!(broker.own_links(), 2);
    dispatch
        .publish("fleet/f/van-9/status", b"up", 0, 0, false)
        .await;
    let (first, body) = van.read().await.unwrap();
    assert_eq!(publish_fields(first, &body).1, b"up");
}

/// Connections with a router link of their own under a clean session are registered with the
/// router under reused names, not their client ids: rumqttd's router remembers every id it was
/// given, so twenty tools connecting under twenty random ids, one after the other, leave one
/// name behind, not twenty. A name is taken again only once its link is gone, the connection
/// under it starts clean, and two links open at once have two names.
#[tokio::test]
async fn clean_sessions_reuse_link_names_start_clean_and_never_share_one() {
    let broker = start_ephemeral().await;
    let addr = broker.v4_addr();
    let before = broker.link_names();
    for i in 0..20 {
        let mut tool = client(addr, &format!("mosq-{i:04}")).await;
        granted(&mut tool, 1, &format!("churn/{i}/#"), 0).await;
        assert_eq!(broker.own_links(), 1);
        tool.send(&DISCONNECT).await;
        tool.until_closed().await;
        eventually("the link gone", || broker.own_links() == 0).await;
    }
    assert_eq!(
        broker.link_names(),
        before + 1,
        "one name for twenty connections"
    );

    // The next link takes that name: it has only its own subscription, not the last one's.
    let mut publisher = client(addr, "publisher").await;
    let mut late = client(addr, "late").await;
    granted(&mut late, 1, "other/#", 0).await;
    assert_eq!(broker.link_names(), before + 1);
    publisher.publish("churn/19/x", b"old", 0, 0, false).await;
    publisher.publish("other/x", b"new", 0, 0, false).await;
    let (first, body) = late.read().await.expect("a publish");
    assert_eq!(
        publish_fields(first, &body),
        ("other/x".to_owned(), b"new".to_vec())
    );
    assert!(late.read_within(Duration::from_millis(300)).await.is_none());

    // Two links at once: two names, each subscriber gets its one copy.
    let mut second = client(addr, "second").await;
    granted(&mut second, 1, "other/#", 0).await;
    assert_eq!(broker.link_names(), before + 2);
    publisher.publish("other/y", b"both", 0, 0, false).await;
    for subscriber in [&mut late, &mut second] {
        let (first, body) = subscriber.read().await.expect("a publish");
        assert_eq!(
            publish_fields(first, &body),
            ("other/y".to_owned(), b"both".to_vec())
        );
        assert!(
            subscriber
                .read_within(Duration::from_millis(300))
                .await
                .is_none(),
            "one copy"
        );
    }
    assert!(
        broker.metrics().render().contains(&format!(
            "fleetbeat_broker_router_link_names {}",
            before + 2
        )),
        "the gauge"
    );
}
