//! Who may be which client id, and which fleet a device speaks for (issue 14): an observer
//! cannot take over the bridge's session (nor anyone else's), a device publishes and
//! subscribes only in the fleet of its credentials. Raw MQTT against the real broker.

mod common;

use broker::{AuthRefusal, BrokerConfig, DisconnectReason, DropReason, Role};
use common::{Provisioned, Raw, connect_as, eventually, publish_fields};
use shared::frame::Connect;

/// Devices `van-1` (fleet `f`), the bridge-role login `ops`, observers `watch` and `eve`.
fn provisioned() -> Provisioned {
    Provisioned::new(
        &["van-1"],
        &[
            ("ops", Role::Bridge),
            ("watch", Role::Observer),
            ("eve", Role::Observer),
        ],
    )
}

fn login<'a>(creds: &'a Provisioned, client_id: &'a str, name: &str) -> Connect<'a> {
    Connect {
        login: Some(creds.login(name)),
        ..connect_as(client_id)
    }
}

#[tokio::test]
async fn an_observer_cannot_take_over_the_bridges_session_or_anyone_elses() {
    let creds = provisioned();
    // The bridge's client id, as the bridge sets it when it embeds the broker.
    let config = BrokerConfig {
        durable_consumers: vec!["fleetbeat-bridge".to_owned()],
        ..creds.config()
    };
    let broker = common::start(config).await;
    let addr = broker.v4_addr();
    let metrics = broker.metrics();

    // The bridge: a persistent session under its client id, and its heartbeat session.
    let mut bridge = Raw::connected(
        addr,
        &Connect {
            persistent: true,
            ..login(&creds, "fleetbeat-bridge", "ops")
        },
    )
    .await;
    let mut bridge_hb = Raw::connected(addr, &login(&creds, "fleetbeat-bridge-hb", "ops")).await;

    // The reproduction of issue 14, and its variants: CONNACK 5 "not authorized", counted.
    let mut refused = 0;
    for (client_id, persistent) in [
        ("fleetbeat-bridge", true),
        ("fleetbeat-bridge", false),
        ("fleetbeat-bridge-hb", false),
        // A device's session, and another client's.
        ("van-1", false),
        ("eve", false),
        ("eve-laptop", true),
        // An id nobody owns: a clean session only (a persistent one could be resumed by
        // anyone who learns the id).
        ("mosq-1", true),
    ] {
        let connect = Connect {
            persistent,
            ..login(&creds, client_id, "watch")
        };
        let (_raw, code) = Raw::connect(addr, &connect).await;
        assert_eq!(code, 5, "watch as {client_id} (persistent: {persistent})");
        refused += 1;
        assert_eq!(
            metrics.auth_refused_total(AuthRefusal::ClientIdMismatch),
            refused
        );
    }
    // The bridge kept both sessions: nobody was taken over.
    assert_eq!(bridge.ping().await, 0xD0);
    assert_eq!(bridge_hb.ping().await, 0xD0);
    assert_eq!(metrics.disconnects_total(DisconnectReason::TakenOver), 0);

    // What an observer may use: its name, `{name}-...`, and with a clean session an id
    // nobody owns, as mosquitto_sub's random `mosq-...`.
    let mut own = Raw::connected(
        addr,
        &Connect {
            persistent: true,
            ..login(&creds, "watch-laptop", "watch")
        },
    )
    .await;
    let mut free = Raw::connected(addr, &login(&creds, "mosq-1", "watch")).await;
    // While `watch` holds the free id, another login cannot take it over.
    let (_raw, code) = Raw::connect(addr, &login(&creds, "mosq-1", "eve")).await;
    assert_eq!(code, 5, "eve taking watch's live session");
    assert_eq!(free.ping().await, 0xD0);
    assert_eq!(own.ping().await, 0xD0);
    assert_eq!(metrics.disconnects_total(DisconnectReason::TakenOver), 0);

    // The bridge itself reconnecting takes its own session over, as before.
    let _again = Raw::connected(
        addr,
        &Connect {
            persistent: true,
            ..login(&creds, "fleetbeat-bridge", "ops")
        },
    )
    .await;
    assert!(bridge.until_closed().await.is_empty());
    eventually("the old bridge connection counted as taken over", || {
        metrics.disconnects_total(DisconnectReason::TakenOver) == 1
    })
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_device_publishes_and_subscribes_only_in_its_own_fleet() {
    let creds = provisioned();
    let broker = common::start(creds.config()).await;
    let addr = broker.v4_addr();
    let metrics = broker.metrics();
    let mut bridge = Raw::connected(addr, &login(&creds, "ops", "ops")).await;
    assert_eq!(bridge.subscribe(1, "fleet/#", 0).await.0, 0x90);

    let mut van = Raw::connected(addr, &login(&creds, "van-1", "van-1")).await;
    // Another fleet: refused (dropped, counted), for every kind; nothing is created there.
    for (i, kind) in ["hb", "event", "status", "ack"].into_iter().enumerate() {
        let qos = u8::from(kind != "hb");
        let pkid = u16::try_from(i).unwrap() + 1;
        van.publish(&format!("fleet/g/van-1/{kind}"), b"moved", qos, pkid, false)
            .await;
        if qos == 1 {
            // A refused QoS 1 publish is still acknowledged, so the device does not retry.
            let (first, _) = van.read().await.expect("a PUBACK");
            assert_eq!(first, 0x40);
        }
    }
    eventually("the four publishes in fleet g refused", || {
        metrics.dropped_total(DropReason::Acl) == 4
    })
    .await;
    // Its own fleet: routed. It was published after the refused ones, so they would have
    // arrived first.
    van.publish("fleet/f/van-1/hb", b"mine", 0, 0, false).await;
    let (first, body) = bridge.read().await.expect("the heartbeat");
    assert_eq!(
        publish_fields(first, &body),
        ("fleet/f/van-1/hb".to_owned(), b"mine".to_vec())
    );

    // Commands: only its own fleet's (or `+`).
    assert_eq!(
        van.subscribe(11, "fleet/g/van-1/cmd", 1).await.1[2..],
        [0x80]
    );
    assert_eq!(van.subscribe(12, "fleet/f/van-1/cmd", 1).await.1[2..], [1]);
    assert_eq!(van.subscribe(13, "fleet/+/van-1/cmd", 1).await.1[2..], [1]);
    // Its last will must be in its fleet too.
    let (_raw, code) = Raw::connect(
        addr,
        &Connect {
            will: Some(("fleet/g/van-1/status", b"offline", false)),
            ..login(&creds, "van-1", "van-1")
        },
    )
    .await;
    assert_eq!(code, 5, "a will in another fleet");
    assert_eq!(metrics.auth_refused_total(AuthRefusal::WillNotAllowed), 1);
    broker.shutdown().await;
}
