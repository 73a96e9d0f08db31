//! Who may connect and what they may do: authentication against the credentials file, client
//! ids, the connection limit, topic ACLs (MQTT 5 topic aliases included), and what a storm of
//! logins costs.
//!
//! The measurement here runs by hand, in release mode (docs/broker.md):
//! `cargo test -p broker --release --test auth measure_ -- --ignored --nocapture`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use broker::{
    AuthRefusal, BrokerConfig, ConnectRefusal, CredentialsFile, DropReason, NewPassword, Role,
};
use common::{
    Raw, Subscriber, client, connect_as, connect_v5_as, eventually, publish_fields, publish_v5,
    start, start_ephemeral,
};
use rumqttc::QoS;
use shared::frame::{Connect, DISCONNECT};
use tokio::time::Instant;

/// A credentials file with two devices and two clients, removed when dropped.
struct Provisioned {
    path: PathBuf,
    van1: String,
    van2: String,
    bridge: String,
    observer: String,
}

impl Drop for Provisioned {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Devices `van-1` and `van-2`, the bridge `bridge` and the observer `watch`, each with a
/// generated password.
fn provision() -> Provisioned {
    let path = std::env::temp_dir().join(format!(
        "fleetbeat-broker-test-{}-{:08x}.toml",
        std::process::id(),
        fastrand::u32(..)
    ));
    let mut file = CredentialsFile::open(&path).unwrap();
    let van1 = file
        .add_device(
            "van-1",
            &shared::FleetId::new("f").unwrap(),
            NewPassword::Generate,
        )
        .unwrap()
        .password;
    let van2 = file
        .add_device(
            "van-2",
            &shared::FleetId::new("f").unwrap(),
            NewPassword::Generate,
        )
        .unwrap()
        .password;
    let bridge = file
        .add_client("bridge", Role::Bridge, NewPassword::Generate)
        .unwrap()
        .password;
    let observer = file
        .add_client("watch", Role::Observer, NewPassword::Generate)
        .unwrap()
        .password;
    file.save().unwrap();
    Provisioned {
        path,
        van1,
        van2,
        bridge,
        observer,
    }
}

fn with_credentials(creds: &Provisioned) -> BrokerConfig {
    BrokerConfig {
        credentials: Some(creds.path.clone()),
        ..BrokerConfig::ephemeral()
    }
}

/// A CONNECT (3.1.1) as `client_id`, logged in as `user` with `pass`.
fn login_as<'a>(client_id: &'a str, user: &'a str, pass: &'a str) -> Connect<'a> {
    Connect {
        login: Some((user, pass)),
        ..connect_as(client_id)
    }
}

/// The bridge, subscribed to every fleet topic at `qos`.
async fn bridge(addr: std::net::SocketAddr, creds: &Provisioned, qos: QoS) -> Subscriber {
    Subscriber::connect(
        addr,
        "fleetbeat-bridge",
        Some(("bridge", &creds.bridge)),
        &[("fleet/#", qos)],
    )
    .await
}

#[tokio::test]
async fn devices_and_clients_must_authenticate() {
    let creds = provision();
    let broker = start(with_credentials(&creds)).await;
    assert!(!broker.open_mode());
    assert!(
        broker
            .metrics()
            .render()
            .contains("fleetbeat_broker_open_mode 0")
    );
    let addr = broker.v4_addr();
    let login = |user, pass| login_as(user, user, pass);

    let (_, code) = Raw::connect(addr, &login("van-1", &creds.van1)).await;
    assert_eq!(code, 0);
    let (_, code) = Raw::connect(addr, &login_as("mosq-1", "watch", &creds.observer)).await;
    assert_eq!(code, 0, "a client picks any client id");

    let refusals = [
        (login("van-1", "wrong"), 4, AuthRefusal::BadPassword),
        (login("van-9", &creds.van1), 4, AuthRefusal::UnknownUser),
        (connect_as("van-1"), 4, AuthRefusal::NoCredentials),
        (
            login_as("van-2", "van-1", &creds.van1),
            5,
            AuthRefusal::ClientIdMismatch,
        ),
        (
            login_as("van-2", "watch", &creds.observer),
            5,
            AuthRefusal::ClientIdMismatch,
        ),
        (
            Connect {
                will: Some(("fleet/f/van-2/status", b"x", true)),
                ..login("van-1", &creds.van1)
            },
            5,
            AuthRefusal::WillNotAllowed,
        ),
    ];
    for (connect, expected, why) in refusals {
        let before = broker.metrics().auth_refused_total(why);
        let (mut raw, code) = Raw::connect(addr, &connect).await;
        assert_eq!(code, expected, "{}: {why:?}", connect.client_id);
        assert!(raw.until_closed().await.is_empty());
        assert_eq!(
            broker.metrics().auth_refused_total(why),
            before + 1,
            "{why:?}"
        );
    }
    // MQTT 5 clients get MQTT 5 reason codes.
    let (_, code) = Raw::connect(
        broker.v5_addr().unwrap(),
        &Connect {
            v5: true,
            ..login("van-1", "wrong")
        },
    )
    .await;
    assert_eq!(code, 0x86);
    let _ = creds.van2;
}

#[tokio::test]
async fn devices_may_only_publish_as_themselves() {
    let creds = provision();
    let broker = start(with_credentials(&creds)).await;
    let addr = broker.v4_addr();
    let mut bridge = bridge(addr, &creds, QoS::AtLeastOnce).await;
    let mut van1 = Raw::connected(addr, &login_as("van-1", "van-1", &creds.van1)).await;

    // Spoofing van-2, at QoS 0 and QoS 1: dropped (the QoS 1 one acknowledged, so the device
    // does not retry forever), counted.
    van1.publish("fleet/f/van-2/hb", b"spoof", 0, 0, false)
        .await;
    van1.publish("fleet/f/van-2/event", b"spoof", 1, 3, false)
        .await;
    assert_eq!(van1.read().await.unwrap(), (0x40, vec![0, 3]));
    // Commands are the bridge's to send.
    van1.publish("fleet/f/van-1/cmd", b"self-command", 0, 0, false)
        .await;
    // Its own heartbeat goes through.
    van1.publish("fleet/f/van-1/hb", b"mine", 0, 0, false).await;
    let got = bridge.next().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("fleet/f/van-1/hb", &b"mine"[..])
    );
    bridge.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(broker.metrics().dropped_total(DropReason::Acl), 3);

    // A device subscribes to its own commands only.
    assert_eq!(
        van1.subscribe(9, "fleet/#", 1).await,
        (0x90, vec![0, 9, 0x80]),
        "SUBACK failure"
    );
    assert_eq!(
        van1.subscribe(10, "fleet/+/van-1/cmd", 1).await,
        (0x90, vec![0, 10, 1])
    );
    assert_eq!(broker.metrics().subscribe_denied_total(), 1);

    // The bridge may command it.
    bridge
        .client
        .publish("fleet/f/van-1/cmd", QoS::AtLeastOnce, false, b"go".to_vec())
        .await
        .unwrap();
    let (first, body) = van1.read().await.unwrap();
    assert_eq!(
        publish_fields(first, &body),
        ("fleet/f/van-1/cmd".to_owned(), b"go".to_vec())
    );

    // Observers publish nothing.
    let mut observer = Raw::connected(addr, &login_as("mosq-2", "watch", &creds.observer)).await;
    observer
        .publish("fleet/f/van-1/cmd", b"no", 0, 0, false)
        .await;
    assert_eq!(observer.ping().await, 0xD0);
    assert_eq!(broker.metrics().dropped_total(DropReason::Acl), 4);
}

#[tokio::test]
async fn mqtt5_topic_aliases_are_checked_against_the_topic_they_stand_for() {
    let creds = provision();
    let broker = start(with_credentials(&creds)).await;
    let mut bridge = bridge(broker.v4_addr(), &creds, QoS::AtMostOnce).await;
    let v5 = broker.v5_addr().unwrap();
    let login = Connect {
        login: Some(("van-1", &creds.van1)),
        ..connect_v5_as("van-1")
    };
    let mut van1 = Raw::connected(v5, &login).await;
    let alias = |n: u8| [0x23, 0x00, n];
    van1.send(&publish_v5("fleet/f/van-1/hb", b"1", false, &alias(1)))
        .await;
    van1.send(&publish_v5("", b"2", false, &alias(1))).await;
    for expected in [&b"1"[..], b"2"] {
        let got = bridge.next().await;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            ("fleet/f/van-1/hb", expected)
        );
    }
    // An alias for another vehicle's topic is refused like the topic itself.
    van1.send(&publish_v5("fleet/f/van-2/hb", b"3", false, &alias(2)))
        .await;
    van1.send(&publish_v5("", b"4", false, &alias(2))).await;
    bridge.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(broker.metrics().dropped_total(DropReason::Acl), 2);
    // An alias never set ends the connection, with DISCONNECT "protocol error".
    van1.send(&publish_v5("", b"5", false, &alias(3))).await;
    let closing = van1.until_closed().await;
    let last: Vec<_> = closing
        .iter()
        .map(|(first, body)| (*first, body[0]))
        .collect();
    assert_eq!(last, [(0xE0, 0x82)]);
}

#[tokio::test]
async fn internal_and_invalid_client_ids_are_refused() {
    let broker = start_ephemeral().await;
    for client_id in ["fleetbeat-internal-mirror-x", "a/b", "a+b", "$SYS"] {
        let (_, code) = Raw::connect(broker.v4_addr(), &connect_as(client_id)).await;
        assert_eq!(code, 2, "{client_id}");
    }
    let (_, code) = Raw::connect(
        broker.v4_addr(),
        &Connect {
            persistent: true,
            ..connect_as("")
        },
    )
    .await;
    assert_eq!(code, 2);
    let (_, code) = Raw::connect(broker.v4_addr(), &connect_as("")).await;
    assert_eq!(
        code, 0,
        "an empty client id with a clean session gets one assigned"
    );
}

#[tokio::test]
async fn max_connections_is_enforced_with_a_connack() {
    let broker = start(BrokerConfig {
        max_connections: 1,
        ..BrokerConfig::ephemeral()
    })
    .await;
    let _first = client(broker.v4_addr(), "one").await;
    let (_, code) = Raw::connect(broker.v4_addr(), &connect_as("two")).await;
    assert_eq!(code, 3, "server unavailable");
    let metrics = broker.metrics();
    assert_eq!(metrics.connect_refused_total(ConnectRefusal::ServerFull), 1);
    // The broker's own probes are not counted against the limit.
    assert!(broker.is_ready());
}

/// A reconnect storm: N devices with generated passwords connect at once (at most 2 000 in
/// flight), after a broker restart (cold: every password through argon2) and after a network
/// outage (warm: the cache). `FLEETBEAT_STORM_DEVICES` sets N (default 10 000).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, run by hand in release mode"]
async fn measure_reconnect_storm() {
    use std::sync::Arc;

    let devices: usize = std::env::var("FLEETBEAT_STORM_DEVICES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let path = std::env::temp_dir().join(format!("fleetbeat-storm-{}.toml", std::process::id()));
    let started = Instant::now();
    let mut file = CredentialsFile::open(&path).unwrap();
    let mut logins = Vec::with_capacity(devices);
    for i in 0..devices {
        let id = format!("van-{i:05}");
        let password = file
            .add_device(
                &id,
                &shared::FleetId::new("f").unwrap(),
                NewPassword::Generate,
            )
            .unwrap()
            .password;
        logins.push((id, password));
    }
    file.save().unwrap();
    println!("provisioned {devices} devices in {:?}", started.elapsed());
    let logins = Arc::new(logins);

    let broker = start(BrokerConfig {
        credentials: Some(path.clone()),
        max_connections: devices + 10,
        ..BrokerConfig::ephemeral()
    })
    .await;
    let addr = broker.v4_addr();
    let storm = |logins: Arc<Vec<(String, String)>>| async move {
        let gate = Arc::new(tokio::sync::Semaphore::new(2_000));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..logins.len() {
            let gate = Arc::clone(&gate);
            let logins = Arc::clone(&logins);
            tasks.spawn(async move {
                let _permit = gate.acquire().await.unwrap();
                let (id, password) = &logins[i];
                let (mut raw, code) = Raw::connect(addr, &login_as(id, id, password)).await;
                assert_eq!(code, 0);
                raw.send(&DISCONNECT).await;
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        started.elapsed()
    };
    let cold = storm(Arc::clone(&logins)).await;
    let metrics = broker.metrics();
    eventually("all gone", || metrics.connections() == 0).await;
    let warm = storm(Arc::clone(&logins)).await;
    println!(
        "{devices} devices on {} cores: cold storm {cold:?} ({:?}/connect), warm storm {warm:?} ({:?}/connect)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cold / devices as u32,
        warm / devices as u32,
    );
    std::fs::remove_file(&path).ok();
}
