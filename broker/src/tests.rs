//! End-to-end tests of the running broker over real sockets: a raw MQTT client where the exact
//! bytes matter, rumqttc where a real client library does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet as ClientPacket, QoS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};

use crate::auth::{CredentialsFile, NewPassword, Role};
use crate::config::{BrokerConfig, Listener};
use crate::error::BrokerError;
use crate::metrics::{AuthRefusal, ConnectRefusal, DisconnectReason, DropReason, MessageKind};
use crate::server::Broker;

/// Outer bound on anything a test awaits; generous, the code under test has its own bounds.
const T: Duration = Duration::from_secs(20);

async fn start(config: BrokerConfig) -> Broker {
    timeout(T, Broker::start(config))
        .await
        .expect("Broker::start returns within its bound")
        .expect("the broker starts")
}

fn fast_probes() -> BrokerConfig {
    BrokerConfig {
        probe_interval: Duration::from_millis(200),
        ..BrokerConfig::ephemeral()
    }
}

/// Waits until `check` holds, polling.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// A raw MQTT client.

fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

#[derive(Default, Clone)]
struct Connect<'a> {
    v5: bool,
    client_id: &'a str,
    keep_alive: u16,
    persistent: bool,
    login: Option<(&'a str, &'a str)>,
    /// Topic, payload, retain (QoS 1).
    will: Option<(&'a str, &'a [u8], bool)>,
}

impl Connect<'_> {
    fn bytes(&self) -> Vec<u8> {
        let mut body = Vec::new();
        put(&mut body, b"MQTT");
        body.push(if self.v5 { 5 } else { 4 });
        let mut flags = if self.persistent { 0 } else { 0x02 };
        if let Some((_, _, retain)) = self.will {
            flags |= 0x04 | 0x08; // will, QoS 1
            if retain {
                flags |= 0x20;
            }
        }
        if self.login.is_some() {
            flags |= 0xC0;
        }
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.v5 {
            body.push(0);
        }
        put(&mut body, self.client_id.as_bytes());
        if let Some((topic, payload, _)) = self.will {
            if self.v5 {
                body.push(0);
            }
            put(&mut body, topic.as_bytes());
            put(&mut body, payload);
        }
        if let Some((user, pass)) = self.login {
            put(&mut body, user.as_bytes());
            put(&mut body, pass.as_bytes());
        }
        packet(0x10, &body)
    }
}

fn publish(
    v5: bool,
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    retain: bool,
    props: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    put(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        remaining_length(props.len(), &mut body);
        body.extend_from_slice(props);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | u8::from(retain), &body)
}

fn subscribe(v5: bool, pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    put(&mut body, filter.as_bytes());
    body.push(qos);
    packet(0x82, &body)
}

fn puback(pkid: u16) -> Vec<u8> {
    packet(0x40, &pkid.to_be_bytes())
}

struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A raw MQTT 3.1.1 client connected as `client_id` (clean session, keep-alive 30 s).
async fn client(addr: SocketAddr, client_id: &str) -> Raw {
    Raw::connected(
        addr,
        &Connect {
            client_id,
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await
}

impl Raw {
    async fn open(addr: SocketAddr) -> Raw {
        let stream = timeout(T, TcpStream::connect(addr)).await.unwrap().unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and returns the CONNACK's return/reason code.
    async fn connect(addr: SocketAddr, connect: &Connect<'_>) -> (Raw, u8) {
        let mut raw = Raw::open(addr).await;
        raw.send(&connect.bytes()).await;
        let (first, body) = raw
            .read()
            .await
            .expect("a CONNACK, not a closed connection");
        assert_eq!(
            first, 0x20,
            "CONNACK expected, got {first:#04x} {body:02x?}"
        );
        (raw, body[1])
    }

    async fn connected(addr: SocketAddr, connect: &Connect<'_>) -> Raw {
        let (raw, code) = Raw::connect(addr, connect).await;
        assert_eq!(code, 0, "CONNACK refused {}", connect.client_id);
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next packet (first byte, body), or `None` once the broker closed the connection.
    async fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        timeout(T, async {
            loop {
                if self.buf.len() >= 2 {
                    let mut len = 0usize;
                    let mut at = 1;
                    let mut complete = false;
                    for shift in [0, 7, 14, 21] {
                        let Some(&b) = self.buf.get(at) else { break };
                        len |= usize::from(b & 0x7F) << shift;
                        at += 1;
                        if b & 0x80 == 0 {
                            complete = true;
                            break;
                        }
                    }
                    if complete && self.buf.len() >= at + len {
                        let first = self.buf[0];
                        let body = self.buf[at..at + len].to_vec();
                        self.buf.drain(..at + len);
                        return Some((first, body));
                    }
                }
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("the broker answers or closes within the bound")
    }

    /// Reads until the connection is closed, returning what came before.
    async fn until_closed(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut packets = Vec::new();
        while let Some(p) = self.read().await {
            packets.push(p);
        }
        packets
    }
}

/// Topic and payload of a raw PUBLISH body (3.1.1).
fn publish_fields(first: u8, body: &[u8]) -> (String, Vec<u8>) {
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + len].to_vec()).unwrap();
    let skip = if (first >> 1) & 3 > 0 { 2 } else { 0 };
    (topic, body[2 + len + skip..].to_vec())
}

// ---------------------------------------------------------------------------------------------
// A rumqttc subscriber.

struct Subscriber {
    client: AsyncClient,
    messages: mpsc::UnboundedReceiver<rumqttc::Publish>,
}

impl Subscriber {
    async fn new(
        addr: SocketAddr,
        id: &str,
        login: Option<(&str, &str)>,
        filters: &[(&str, QoS)],
    ) -> Subscriber {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(10));
        if let Some((user, pass)) = login {
            options.set_credentials(user, pass);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        for (filter, qos) in filters {
            client.subscribe(*filter, *qos).await.unwrap();
        }
        let (tx, messages) = mpsc::unbounded_channel();
        let (acked_tx, mut acked) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(ClientPacket::Publish(p))) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(ClientPacket::SubAck(ack))) => {
                        let _ = acked_tx.send(ack);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        for _ in filters {
            timeout(T, acked.recv()).await.unwrap().expect("SUBACK");
        }
        Subscriber { client, messages }
    }

    async fn next(&mut self) -> rumqttc::Publish {
        timeout(T, self.messages.recv())
            .await
            .expect("a message within the bound")
            .expect("the subscriber runs")
    }

    /// Asserts nothing arrives for a while.
    async fn nothing_for(&mut self, wait: Duration) {
        if let Ok(Some(p)) = timeout(wait, self.messages.recv()).await {
            panic!("unexpected message on {}: {:?}", p.topic, p.payload);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Start-up.

#[tokio::test]
async fn ephemeral_broker_answers_mqtt_on_both_listeners() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let v5 = broker.v5_addr().expect("a v5 listener");
    assert_ne!(broker.v4_addr().port(), 0);
    assert_ne!(v5.port(), 0);
    assert_ne!(v5, broker.v4_addr());
    assert!(broker.is_ready() && broker.is_alive());
    assert!(broker.open_mode());
    assert_eq!(broker.metrics().listener_up(Listener::V4), Some(true));
    assert!(
        broker
            .metrics()
            .render()
            .contains("fleetbeat_broker_open_mode 1")
    );

    let (_, code) = Raw::connect(
        broker.v4_addr(),
        &Connect {
            client_id: "a",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0);
    let (_, code) = Raw::connect(
        v5,
        &Connect {
            v5: true,
            client_id: "b",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0);
}

#[tokio::test]
async fn v5_listener_is_optional() {
    let broker = start(BrokerConfig {
        v5: None,
        ..BrokerConfig::ephemeral()
    })
    .await;
    assert_eq!(broker.v5_addr(), None);
    assert_eq!(broker.listener_health().len(), 1);
    assert_eq!(broker.metrics().listener_up(Listener::V5), None);
}

#[tokio::test]
async fn two_brokers_run_in_one_process() {
    let (a, b) = tokio::join!(
        start(BrokerConfig::ephemeral()),
        start(BrokerConfig::ephemeral())
    );
    let mut ports = [
        a.v4_addr().port(),
        a.v5_addr().unwrap().port(),
        b.v4_addr().port(),
        b.v5_addr().unwrap().port(),
    ];
    ports.sort_unstable();
    assert!(ports.windows(2).all(|w| w[0] != w[1]), "ports {ports:?}");
}

#[tokio::test]
async fn taken_port_is_a_bind_error_not_a_hang() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap();
    for (listener, config) in [
        (
            Listener::V4,
            BrokerConfig {
                v4: taken,
                ..BrokerConfig::ephemeral()
            },
        ),
        (
            Listener::V5,
            BrokerConfig {
                v5: Some(taken),
                ..BrokerConfig::ephemeral()
            },
        ),
    ] {
        let started = Instant::now();
        match timeout(T, Broker::start(config)).await.unwrap() {
            Err(BrokerError::Bind {
                listener: l,
                addr,
                source,
            }) => {
                assert_eq!((l, addr), (listener, taken));
                assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
            }
            other => panic!("expected a bind error for {listener}, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "it fails at once"
        );
    }
}

#[tokio::test]
async fn an_invalid_config_or_credentials_file_is_refused_at_start() {
    let err = Broker::start(BrokerConfig {
        max_segment_count: 0,
        ..BrokerConfig::ephemeral()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("max_segment_count"), "{err}");

    let missing = BrokerConfig {
        credentials: Some(PathBuf::from("/nonexistent/credentials.toml")),
        ..BrokerConfig::ephemeral()
    };
    assert!(matches!(
        Broker::start(missing).await,
        Err(BrokerError::Credentials(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Routing, latency, retained, QoS.

#[tokio::test]
async fn routes_qos0_qos1_and_retained_messages() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut sub = Subscriber::new(
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
    publisher
        .send(&publish(false, "fleet/f/v/hb", b"hb", 0, 0, false, &[]))
        .await;
    publisher
        .send(&publish(false, "fleet/f/v/event", b"ev", 1, 7, false, &[]))
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
        .send(&publish(false, "fleet/f/v/status", b"on", 1, 8, true, &[]))
        .await;
    publisher.read().await.unwrap();
    let mut late = Subscriber::new(
        addr,
        "late",
        None,
        &[("fleet/+/+/status", QoS::AtLeastOnce)],
    )
    .await;
    let status = late.next().await;
    assert_eq!((&status.payload[..], status.retain), (&b"on"[..], true));

    let metrics = broker.metrics();
    eventually("counters", || {
        metrics.messages_out_total(MessageKind::Status) >= 1
    })
    .await;
    assert_eq!(metrics.messages_in_total(MessageKind::Hb), 1);
    assert_eq!(metrics.messages_in_total(MessageKind::Event), 1);
    assert_eq!(metrics.messages_out_total(MessageKind::Hb), 1);
    assert!(metrics.bytes_in_total() > 0 && metrics.bytes_out_total() > 0);
    assert!(metrics.connections() >= 3);
}

/// rumqttd 0.20 never sets TCP_NODELAY: with Nagle, each small write waits for the ACK of the
/// previous one, and delayed ACKs make a ping-pong take ≈40 ms per round. Ours sets it.
#[tokio::test]
async fn small_messages_are_not_held_back_by_nagle() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut sub = client(addr, "sub").await;
    sub.send(&subscribe(false, 1, "ping/#", 0)).await;
    assert_eq!(sub.read().await.unwrap().0, 0x90);
    let mut publisher = client(addr, "pub").await;

    let rounds = 100;
    let started = Instant::now();
    for i in 0..rounds {
        publisher
            .send(&publish(
                false,
                "ping/x",
                format!("{i}").as_bytes(),
                0,
                0,
                false,
                &[],
            ))
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

// ---------------------------------------------------------------------------------------------
// Proof of life: keep-alive and last will.

#[tokio::test]
async fn silent_clients_are_dropped_after_one_and_a_half_keep_alives_and_their_will_fires() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut watcher = Subscriber::new(
        addr,
        "watcher",
        None,
        &[("fleet/+/+/status", QoS::AtLeastOnce)],
    )
    .await;

    let started = Instant::now();
    let mut silent = Raw::connected(
        addr,
        &Connect {
            client_id: "van-1",
            keep_alive: 1,
            will: Some(("fleet/f/van-1/status", b"offline", true)),
            ..Default::default()
        },
    )
    .await;
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
    let mut late = Subscriber::new(
        addr,
        "late",
        None,
        &[("fleet/+/+/status", QoS::AtLeastOnce)],
    )
    .await;
    assert_eq!(&late.next().await.payload[..], b"offline");
}

#[tokio::test]
async fn a_clean_disconnect_does_not_fire_the_will_and_pings_keep_a_client_alive() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut watcher = Subscriber::new(
        addr,
        "watcher",
        None,
        &[("fleet/+/+/status", QoS::AtLeastOnce)],
    )
    .await;
    let mut client = Raw::connected(
        addr,
        &Connect {
            client_id: "van-1",
            keep_alive: 1,
            will: Some(("fleet/f/van-1/status", b"offline", true)),
            ..Default::default()
        },
    )
    .await;
    for _ in 0..4 {
        sleep(Duration::from_millis(700)).await;
        client.send(&[0xC0, 0x00]).await; // PINGREQ
        assert_eq!(client.read().await.unwrap().0, 0xD0, "PINGRESP");
    }
    client.send(&[0xE0, 0x00]).await; // DISCONNECT
    assert!(client.until_closed().await.is_empty());
    watcher.nothing_for(Duration::from_millis(500)).await;
    assert_eq!(
        broker.metrics().disconnects_total(DisconnectReason::Client),
        1
    );
    assert_eq!(broker.metrics().wills_published_total(), 0);
}

#[tokio::test]
async fn keep_alive_zero_is_refused_with_a_connack() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let (mut raw, code) = Raw::connect(
        broker.v4_addr(),
        &Connect {
            client_id: "lazy",
            keep_alive: 0,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 5, "not authorised");
    assert!(raw.until_closed().await.is_empty());
    let (_, code) = Raw::connect(
        broker.v5_addr().unwrap(),
        &Connect {
            v5: true,
            client_id: "lazy",
            keep_alive: 0,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0x87);
    assert_eq!(
        broker
            .metrics()
            .connect_refused_total(ConnectRefusal::KeepAliveZero),
        2
    );
}

#[tokio::test]
async fn a_takeover_closes_the_old_connection_without_its_will() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut watcher = Subscriber::new(
        addr,
        "watcher",
        None,
        &[("fleet/+/+/status", QoS::AtLeastOnce)],
    )
    .await;
    let connect = Connect {
        client_id: "van-1",
        keep_alive: 30,
        will: Some(("fleet/f/van-1/status", b"offline", true)),
        ..Default::default()
    };
    let mut old = Raw::connected(addr, &connect).await;
    let mut new = Raw::connected(addr, &connect).await;
    assert!(
        old.until_closed().await.is_empty(),
        "the old connection is closed"
    );
    watcher.nothing_for(Duration::from_millis(300)).await;
    new.send(&publish(
        false,
        "fleet/f/van-1/status",
        b"online",
        0,
        0,
        true,
        &[],
    ))
    .await;
    assert_eq!(&watcher.next().await.payload[..], b"online");
    assert_eq!(
        broker
            .metrics()
            .disconnects_total(DisconnectReason::TakenOver),
        1
    );
    assert_eq!(broker.metrics().wills_published_total(), 0);
}

// ---------------------------------------------------------------------------------------------
// Authentication and topic ACLs.

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

fn provision() -> Provisioned {
    let path = std::env::temp_dir().join(format!(
        "fleetbeat-broker-test-{}-{:08x}.toml",
        std::process::id(),
        fastrand::u32(..)
    ));
    let mut file = CredentialsFile::open(&path).unwrap();
    let van1 = file
        .add_device("van-1", NewPassword::Generate)
        .unwrap()
        .password;
    let van2 = file
        .add_device("van-2", NewPassword::Generate)
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
    let login = |user, pass| Connect {
        client_id: user,
        keep_alive: 30,
        login: Some((user, pass)),
        ..Default::default()
    };

    let (_, code) = Raw::connect(addr, &login("van-1", &creds.van1)).await;
    assert_eq!(code, 0);
    let (_, code) = Raw::connect(
        addr,
        &Connect {
            client_id: "mosq-1",
            keep_alive: 30,
            login: Some(("watch", &creds.observer)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0, "a client picks any client id");

    let refusals = [
        (login("van-1", "wrong"), 4, AuthRefusal::BadPassword),
        (login("van-9", &creds.van1), 4, AuthRefusal::UnknownUser),
        (
            Connect {
                client_id: "van-1",
                keep_alive: 30,
                ..Default::default()
            },
            4,
            AuthRefusal::NoCredentials,
        ),
        (
            Connect {
                client_id: "van-2",
                keep_alive: 30,
                login: Some(("van-1", &creds.van1)),
                ..Default::default()
            },
            5,
            AuthRefusal::ClientIdMismatch,
        ),
        (
            Connect {
                client_id: "van-2",
                keep_alive: 30,
                login: Some(("watch", &creds.observer)),
                ..Default::default()
            },
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
    let mut bridge = Subscriber::new(
        addr,
        "fleetbeat-bridge",
        Some(("bridge", &creds.bridge)),
        &[("fleet/#", QoS::AtLeastOnce)],
    )
    .await;
    let mut van1 = Raw::connected(
        addr,
        &Connect {
            client_id: "van-1",
            keep_alive: 30,
            login: Some(("van-1", &creds.van1)),
            ..Default::default()
        },
    )
    .await;

    // Spoofing van-2, at QoS 0 and QoS 1: dropped (the QoS 1 one acknowledged, so the device
    // does not retry forever), counted.
    van1.send(&publish(
        false,
        "fleet/f/van-2/hb",
        b"spoof",
        0,
        0,
        false,
        &[],
    ))
    .await;
    van1.send(&publish(
        false,
        "fleet/f/van-2/event",
        b"spoof",
        1,
        3,
        false,
        &[],
    ))
    .await;
    assert_eq!(van1.read().await.unwrap(), (0x40, vec![0, 3]));
    // Commands are the bridge's to send.
    van1.send(&publish(
        false,
        "fleet/f/van-1/cmd",
        b"self-command",
        0,
        0,
        false,
        &[],
    ))
    .await;
    // Its own heartbeat goes through.
    van1.send(&publish(
        false,
        "fleet/f/van-1/hb",
        b"mine",
        0,
        0,
        false,
        &[],
    ))
    .await;
    let got = bridge.next().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("fleet/f/van-1/hb", &b"mine"[..])
    );
    bridge.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(broker.metrics().dropped_total(DropReason::Acl), 3);

    // A device subscribes to its own commands only.
    van1.send(&subscribe(false, 9, "fleet/#", 1)).await;
    assert_eq!(
        van1.read().await.unwrap(),
        (0x90, vec![0, 9, 0x80]),
        "SUBACK failure"
    );
    van1.send(&subscribe(false, 10, "fleet/+/van-1/cmd", 1))
        .await;
    assert_eq!(van1.read().await.unwrap(), (0x90, vec![0, 10, 1]));
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
    let mut observer = Raw::connected(
        addr,
        &Connect {
            client_id: "mosq-2",
            keep_alive: 30,
            login: Some(("watch", &creds.observer)),
            ..Default::default()
        },
    )
    .await;
    observer
        .send(&publish(
            false,
            "fleet/f/van-1/cmd",
            b"no",
            0,
            0,
            false,
            &[],
        ))
        .await;
    observer.send(&[0xC0, 0x00]).await;
    assert_eq!(observer.read().await.unwrap().0, 0xD0);
    assert_eq!(broker.metrics().dropped_total(DropReason::Acl), 4);
}

#[tokio::test]
async fn internal_and_invalid_client_ids_are_refused() {
    let broker = start(BrokerConfig::ephemeral()).await;
    for client_id in ["fleetbeat-internal-mirror-x", "a/b", "a+b", "$SYS"] {
        let (_, code) = Raw::connect(
            broker.v4_addr(),
            &Connect {
                client_id,
                keep_alive: 30,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(code, 2, "{client_id}");
    }
    let (_, code) = Raw::connect(
        broker.v4_addr(),
        &Connect {
            client_id: "",
            keep_alive: 30,
            persistent: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 2);
    let (_, code) = Raw::connect(
        broker.v4_addr(),
        &Connect {
            client_id: "",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
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
    let _first = Raw::connected(
        broker.v4_addr(),
        &Connect {
            client_id: "one",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
    let (_, code) = Raw::connect(
        broker.v4_addr(),
        &Connect {
            client_id: "two",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 3, "server unavailable");
    assert_eq!(
        broker
            .metrics()
            .connect_refused_total(ConnectRefusal::ServerFull),
        1
    );
    // The broker's own probes are not counted against the limit.
    assert!(broker.is_ready());
}

// ---------------------------------------------------------------------------------------------
// Bad input and rumqttd's defects.

/// The rumqttd 0.20 repro: `mosquitto_pub -V 5 -r -t r/a -m x -D publish user-property a 2`,
/// then `mosquitto_sub -V 311 -t 'r/#'`. In rumqttd's own network code the v4 encoder hits
/// `unreachable!()` on the properties and the v4 listener stops answering.
#[tokio::test]
async fn a_v5_property_does_not_harm_v4_subscribers() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let mut v5 = Raw::connected(
        broker.v5_addr().unwrap(),
        &Connect {
            v5: true,
            client_id: "v5pub",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
    // User property ("a", "2").
    let props = [0x26, 0, 1, b'a', 0, 1, b'2'];
    v5.send(&publish(true, "r/a", b"x", 0, 0, true, &props))
        .await;
    v5.send(&[0xE0, 0x00]).await;

    let mut v4 =
        Subscriber::new(broker.v4_addr(), "v4sub", None, &[("r/#", QoS::AtMostOnce)]).await;
    let got = v4.next().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.retain),
        ("r/a", &b"x"[..], true)
    );
    // Live (not retained) deliveries too.
    let mut v5 = Raw::connected(
        broker.v5_addr().unwrap(),
        &Connect {
            v5: true,
            client_id: "v5pub",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
    v5.send(&publish(true, "r/b", b"y", 0, 0, false, &props))
        .await;
    assert_eq!(&v4.next().await.payload[..], b"y");

    let (_, code) = Raw::connect(
        broker.v4_addr(),
        &Connect {
            client_id: "after",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0, "the v4 listener still answers");
    assert!(broker.is_ready());
}

/// rumqttd's v5 decoder panics (`unreachable!()`) on a CONNACK or UNSUBACK from a client.
#[tokio::test]
async fn server_only_packets_from_a_client_end_only_that_connection() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let v5 = broker.v5_addr().unwrap();
    for evil in [
        &[0x20u8, 0x03, 0x00, 0x00, 0x00][..],
        &[0xB0, 0x04, 0x00, 0x01, 0x00, 0x00],
    ] {
        let mut raw = Raw::connected(
            v5,
            &Connect {
                v5: true,
                client_id: "evil",
                keep_alive: 30,
                ..Default::default()
            },
        )
        .await;
        raw.send(evil).await;
        assert!(raw.until_closed().await.is_empty());
    }
    let (_, code) = Raw::connect(
        v5,
        &Connect {
            v5: true,
            client_id: "fine",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(
        broker
            .metrics()
            .disconnects_total(DisconnectReason::Protocol),
        2
    );
}

#[tokio::test]
async fn oversized_packets_close_the_connection_and_are_counted() {
    let broker = start(BrokerConfig {
        max_payload_size: 1024,
        max_segment_size: 1024,
        ..BrokerConfig::ephemeral()
    })
    .await;
    let mut raw = Raw::connected(
        broker.v4_addr(),
        &Connect {
            client_id: "big",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
    raw.send(&publish(
        false,
        "fleet/f/v/hb",
        &[0; 2000],
        0,
        0,
        false,
        &[],
    ))
    .await;
    assert!(raw.until_closed().await.is_empty());
    assert_eq!(broker.metrics().dropped_total(DropReason::Oversized), 1);
    assert!(broker.is_ready());
}

#[tokio::test]
async fn the_wrong_protocol_version_gets_an_answer_it_understands() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let mut raw = Raw::open(broker.v4_addr()).await;
    raw.send(
        &Connect {
            v5: true,
            client_id: "x",
            keep_alive: 30,
            ..Default::default()
        }
        .bytes(),
    )
    .await;
    // Each client is answered in its own version's format.
    assert_eq!(
        raw.read().await,
        Some((0x20, vec![0x00, 0x84, 0x00])),
        "5: unsupported protocol version"
    );
    let mut raw = Raw::open(broker.v5_addr().unwrap()).await;
    raw.send(
        &Connect {
            client_id: "x",
            keep_alive: 30,
            ..Default::default()
        }
        .bytes(),
    )
    .await;
    assert_eq!(
        raw.read().await,
        Some((0x20, vec![0x00, 0x01])),
        "3.1.1: unacceptable protocol version"
    );
    assert_eq!(
        broker
            .metrics()
            .connect_refused_total(ConnectRefusal::Protocol),
        2
    );
}

// ---------------------------------------------------------------------------------------------
// Dead listeners.

#[tokio::test]
async fn a_dead_listener_is_detected_reported_and_logged() {
    let broker = start(fast_probes()).await;
    assert!(broker.is_ready());
    broker.stop_listener(Listener::V4);
    eventually("v4 reported dead", || {
        broker.metrics().listener_up(Listener::V4) == Some(false)
    })
    .await;
    assert!(!broker.is_ready());
    assert!(broker.is_alive(), "v5 still answers");
    let health = broker.listener_health();
    let v4 = health.iter().find(|h| h.listener == Listener::V4).unwrap();
    assert!(!v4.up && v4.last_error.is_some());
    assert!(
        health
            .iter()
            .find(|h| h.listener == Listener::V5)
            .unwrap()
            .up
    );
    assert!(
        broker
            .metrics()
            .render()
            .contains("fleetbeat_broker_listener_up{listener=\"v4\"} 0\n")
    );
    // Nothing listens there any more.
    assert!(TcpStream::connect(broker.v4_addr()).await.is_err());
}

// ---------------------------------------------------------------------------------------------
// The JSON mirror.

/// A QoS 0 PUBLISH of `msg` on `topic`, sealed with the vehicle's open-mode key.
fn sealed_publish<T: serde::Serialize>(msg: &T, topic: &str, counter: u64) -> Vec<u8> {
    let vehicle = shared::Topic::parse(topic).unwrap().vehicle;
    let mut buf = [0u8; 128];
    let sealed = shared::seal(
        msg,
        topic,
        counter,
        &shared::open_mode_key(&vehicle),
        &mut buf,
    )
    .unwrap()
    .to_vec();
    publish(false, topic, &sealed, 0, 0, false, &[])
}

/// Waits until the mirror reads heartbeats (or no longer does): it follows the `json/...`
/// subscriptions a moment after their SUBACK.
async fn mirror_heartbeats(broker: &Broker, on: bool) {
    let deadline = tokio::time::Instant::now() + T;
    while broker.metrics().mirror_heartbeats() != on {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mirror_heartbeats never {on}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn device_traffic_is_mirrored_as_json() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut json = Subscriber::new(addr, "engineer", None, &[("json/#", QoS::AtMostOnce)]).await;
    mirror_heartbeats(&broker, true).await;
    let mut device = client(addr, "demo-0001").await;

    let topic = "fleet/demo/demo-0001/hb";
    let vehicle = shared::VehicleId::new("demo-0001").unwrap();
    let hb = shared::Heartbeat {
        seq: 42,
        ..Default::default()
    };
    let mut buf = [0u8; 128];
    let sealed = shared::seal(&hb, topic, 5, &shared::open_mode_key(&vehicle), &mut buf)
        .unwrap()
        .to_vec();
    device
        .send(&publish(false, topic, &sealed, 0, 0, false, &[]))
        .await;
    let doc = json.next().await;
    assert_eq!(doc.topic, "json/fleet/demo/demo-0001/hb");
    assert!(!doc.retain);
    let value: serde_json::Value = serde_json::from_slice(&doc.payload).unwrap();
    assert_eq!(
        (value["seq"].as_u64(), value["origin"].as_str()),
        (Some(42), Some("verified"))
    );

    device
        .send(&publish(false, topic, &[9, 9], 0, 0, false, &[]))
        .await;
    let value: serde_json::Value = serde_json::from_slice(&json.next().await.payload).unwrap();
    assert_eq!(value["bytes"], "0909");
    assert!(
        value["error"]
            .as_str()
            .unwrap()
            .contains("unsupported protocol version 9")
    );

    // Status is retained on the mirror: a late watcher sees it.
    let status_topic = "fleet/demo/demo-0001/status";
    let sealed = shared::seal(
        &shared::Status::Online,
        status_topic,
        6,
        &shared::open_mode_key(&vehicle),
        &mut buf,
    )
    .unwrap()
    .to_vec();
    device
        .send(&publish(false, status_topic, &sealed, 1, 1, true, &[]))
        .await;
    assert_eq!(device.read().await.unwrap().0, 0x40);
    let live = json.next().await;
    assert_eq!(live.topic, "json/fleet/demo/demo-0001/status");
    let mut late = Subscriber::new(
        addr,
        "late",
        None,
        &[("json/fleet/+/+/status", QoS::AtMostOnce)],
    )
    .await;
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
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut device = client(addr, "demo-0001").await;
    let topic = "fleet/demo/demo-0001/hb";
    let heartbeat = |seq: u32| {
        let hb = shared::Heartbeat {
            seq,
            ..Default::default()
        };
        sealed_publish(&hb, topic, u64::from(seq))
    };
    // A subscriber that cannot see the mirror does not switch it on.
    let mut fleet =
        Subscriber::new(addr, "bridge-like", None, &[("fleet/#", QoS::AtMostOnce)]).await;
    device.send(&heartbeat(1)).await;
    assert_eq!(fleet.next().await.topic, topic);
    assert_eq!(
        broker.metrics().mirror_published_total(),
        0,
        "nobody watches"
    );

    assert!(!broker.metrics().mirror_heartbeats());
    let mut json =
        Subscriber::new(addr, "engineer", None, &[("json/fleet/#", QoS::AtMostOnce)]).await;
    mirror_heartbeats(&broker, true).await;
    device.send(&heartbeat(2)).await;
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
    device.send(&heartbeat(3)).await;
    let status_topic = "fleet/demo/demo-0001/status";
    device
        .send(&sealed_publish(&shared::Status::Online, status_topic, 4))
        .await;
    assert_eq!(fleet.next().await.topic, topic);
    assert_eq!(fleet.next().await.topic, status_topic);
    let deadline = tokio::time::Instant::now() + T;
    while broker.metrics().mirror_published_total() == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the status was not mirrored"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    json_idle(&broker, before + 1).await;
}

/// Asserts the mirror's count stays at `expected` for a moment (nothing more is coming).
async fn json_idle(broker: &Broker, expected: u64) {
    sleep(Duration::from_millis(200)).await;
    assert_eq!(broker.metrics().mirror_published_total(), expected);
}

#[tokio::test]
async fn the_mirror_can_be_switched_off() {
    let broker = start(BrokerConfig {
        json_mirror: false,
        ..BrokerConfig::ephemeral()
    })
    .await;
    let mut json = Subscriber::new(
        broker.v4_addr(),
        "engineer",
        None,
        &[("json/#", QoS::AtMostOnce)],
    )
    .await;
    let mut device = Raw::connected(
        broker.v4_addr(),
        &Connect {
            client_id: "demo-0001",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
    device
        .send(&publish(
            false,
            "fleet/demo/demo-0001/hb",
            &[1, 2, 3],
            0,
            0,
            false,
            &[],
        ))
        .await;
    json.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(broker.metrics().mirror_published_total(), 0);
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown.

#[tokio::test]
async fn shutdown_completes_in_flight_qos1_then_closes() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let v5 = broker.v5_addr().unwrap();

    // A subscriber that has received a QoS 1 message and acknowledges it late.
    let mut sub = client(addr, "sub").await;
    sub.send(&subscribe(false, 1, "fleet/+/+/event", 1)).await;
    assert_eq!(sub.read().await.unwrap().0, 0x90);
    let mut publisher = client(addr, "pub").await;
    publisher
        .send(&publish(false, "fleet/f/v/event", b"e1", 1, 1, false, &[]))
        .await;
    assert_eq!(publisher.read().await.unwrap(), (0x40, vec![0, 1]));
    let (first, body) = sub.read().await.unwrap();
    assert_eq!(first & 0xF6, 0x32, "QoS 1 PUBLISH");
    let pkid = {
        let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        u16::from_be_bytes([body[2 + len], body[3 + len]])
    };
    // An MQTT 5 client, idle.
    let mut idle5 = Raw::connected(
        v5,
        &Connect {
            v5: true,
            client_id: "idle5",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;

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
    let broker = start(BrokerConfig::ephemeral()).await;
    let mut publisher = Raw::connected(
        broker.v4_addr(),
        &Connect {
            client_id: "pub",
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await;
    publisher
        .send(&publish(false, "fleet/f/v/event", b"e1", 1, 1, false, &[]))
        .await;
    let metrics = broker.metrics();
    eventually("the publish was read", || {
        metrics.messages_in_total(MessageKind::Event) == 1
    })
    .await;
    // Read only once the shutdown is over: the PUBACK must have come before the close.
    let report = broker.shutdown_within(Duration::from_secs(5)).await;
    assert_eq!(publisher.until_closed().await, vec![(0x40, vec![0, 1])]);
    assert_eq!(report.forced, 0);
}

#[tokio::test]
async fn shutdown_is_bounded_when_a_client_never_acknowledges() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut sub = client(addr, "sub").await;
    sub.send(&subscribe(false, 1, "x/#", 1)).await;
    assert_eq!(sub.read().await.unwrap().0, 0x90);
    let mut publisher = client(addr, "pub").await;
    publisher
        .send(&publish(false, "x/y", b"m", 1, 1, false, &[]))
        .await;
    assert_eq!(sub.read().await.unwrap().0 & 0xF0, 0x30);

    let started = Instant::now();
    let report = broker.shutdown_within(Duration::from_millis(500)).await;
    assert_eq!(report.forced, 1, "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(sub.until_closed().await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Measurements (run by hand, in release mode, see docs/broker.md):
//   cargo test -p broker --release --lib measure_ -- --ignored --nocapture

/// What one password check costs, cold (argon2) and warm (the cache).
#[tokio::test]
#[ignore = "a measurement, run by hand in release mode"]
async fn measure_auth_cost_per_connect() {
    use crate::auth::{Authenticator, CHOSEN_PARAMS, GENERATED_PARAMS};
    let path = std::env::temp_dir().join(format!("fleetbeat-measure-{}.toml", std::process::id()));
    let mut file = CredentialsFile::open(&path).unwrap();
    let generated = file
        .add_device("van-1", NewPassword::Generate)
        .unwrap()
        .password;
    let chosen = "a person's passphrase".to_owned();
    file.add_device("van-2", NewPassword::Given(chosen.clone()))
        .unwrap();
    file.save().unwrap();
    let auth = Authenticator::load(&path).unwrap();
    for (user, password, params) in [
        ("van-1", &generated, GENERATED_PARAMS),
        ("van-2", &chosen, CHOSEN_PARAMS),
    ] {
        let rounds = 20;
        let started = Instant::now();
        for _ in 0..rounds {
            // A wrong password is never cached: every check runs argon2.
            let wrong = format!("{password}x");
            assert!(
                auth.authenticate(user, Some(user), Some(&wrong))
                    .await
                    .is_err()
            );
        }
        let cold = started.elapsed() / rounds;
        auth.authenticate(user, Some(user), Some(password))
            .await
            .unwrap();
        let started = Instant::now();
        for _ in 0..1000 {
            auth.authenticate(user, Some(user), Some(password))
                .await
                .unwrap();
        }
        let warm = started.elapsed() / 1000;
        println!(
            "argon2id m={} KiB t={} p={}: cold check {cold:?}, cached check {warm:?}",
            params.0, params.1, params.2
        );
    }
    std::fs::remove_file(&path).ok();
}

/// Resident memory of the process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What one connection costs in rumqttd's router alone: N local links registered (no socket,
/// no task of ours), each sent one CONNACK, against the process's resident memory.
/// `FLEETBEAT_LINKS` sets N (default 10 000). The broker binary's whole per-connection cost is
/// measured by `cargo bench -p broker --bench broker-bench` (BENCHMARKS.md).
#[test]
#[ignore = "a measurement, run by hand in release mode"]
fn measure_rss_per_router_link() {
    let links: usize = std::env::var("FLEETBEAT_LINKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let config = BrokerConfig::default();
    let router = crate::router::RouterHandle::spawn(config.router_config(8));
    let before = rss_kib();
    let mut held = Vec::with_capacity(links);
    for i in 0..links {
        let link = router
            .link(crate::router::LinkRequest {
                client_id: &format!("link-{i}"),
                clean_session: true,
                topic_alias_max: 0,
            })
            .unwrap();
        held.push(link);
    }
    let after = rss_kib();
    println!(
        "{links} router links: {} KiB resident, {:.1} KiB each",
        after - before,
        (after - before) as f64 / links as f64
    );
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
            .add_device(&id, NewPassword::Generate)
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
                let connect = Connect {
                    client_id: id,
                    keep_alive: 30,
                    login: Some((id, password)),
                    ..Default::default()
                };
                let (mut raw, code) = Raw::connect(addr, &connect).await;
                assert_eq!(code, 0);
                raw.send(&[0xE0, 0x00]).await;
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

#[tokio::test]
async fn mqtt5_topic_aliases_are_checked_against_the_topic_they_stand_for() {
    let creds = provision();
    let broker = start(with_credentials(&creds)).await;
    let mut bridge = Subscriber::new(
        broker.v4_addr(),
        "fleetbeat-bridge",
        Some(("bridge", &creds.bridge)),
        &[("fleet/#", QoS::AtMostOnce)],
    )
    .await;
    let v5 = broker.v5_addr().unwrap();
    let login = Connect {
        v5: true,
        client_id: "van-1",
        keep_alive: 30,
        login: Some(("van-1", &creds.van1)),
        ..Default::default()
    };
    let mut van1 = Raw::connected(v5, &login).await;
    let alias = |n: u8| [0x23, 0x00, n];
    van1.send(&publish(
        true,
        "fleet/f/van-1/hb",
        b"1",
        0,
        0,
        false,
        &alias(1),
    ))
    .await;
    van1.send(&publish(true, "", b"2", 0, 0, false, &alias(1)))
        .await;
    for expected in [&b"1"[..], b"2"] {
        let got = bridge.next().await;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            ("fleet/f/van-1/hb", expected)
        );
    }
    // An alias for another vehicle's topic is refused like the topic itself.
    van1.send(&publish(
        true,
        "fleet/f/van-2/hb",
        b"3",
        0,
        0,
        false,
        &alias(2),
    ))
    .await;
    van1.send(&publish(true, "", b"4", 0, 0, false, &alias(2)))
        .await;
    bridge.nothing_for(Duration::from_millis(300)).await;
    assert_eq!(broker.metrics().dropped_total(DropReason::Acl), 2);
    // An alias never set ends the connection.
    van1.send(&publish(true, "", b"5", 0, 0, false, &alias(3)))
        .await;
    assert!(van1.until_closed().await.is_empty());
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

    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut client = client(addr, "c").await;
    drop(broker);
    assert!(client.until_closed().await.is_empty());
    eventually("nothing listens", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
}

#[tokio::test]
async fn a_persistent_session_gets_what_was_published_while_it_was_away() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let session = Connect {
        client_id: "fleetbeat-bridge",
        keep_alive: 30,
        persistent: true,
        ..Default::default()
    };
    let mut bridge = Raw::connected(addr, &session).await;
    bridge
        .send(&subscribe(false, 1, "fleet/+/+/event", 1))
        .await;
    assert_eq!(bridge.read().await.unwrap().0, 0x90);
    bridge.send(&[0xE0, 0x00]).await;
    assert!(bridge.until_closed().await.is_empty());

    let mut device = client(addr, "van-1").await;
    device
        .send(&publish(
            false,
            "fleet/f/van-1/event",
            b"while away",
            1,
            1,
            false,
            &[],
        ))
        .await;
    assert_eq!(device.read().await.unwrap(), (0x40, vec![0, 1]));

    let (mut bridge, _) = Raw::connect(addr, &session).await;
    let (first, body) = bridge.read().await.unwrap();
    assert_eq!(
        publish_fields(first, &body),
        ("fleet/f/van-1/event".to_owned(), b"while away".to_vec())
    );
}

// ---------------------------------------------------------------------------------------------
// Devices served by the shared mux link.

/// The packet id of a raw QoS 1 PUBLISH body.
fn publish_pkid(body: &[u8]) -> u16 {
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    u16::from_be_bytes([body[2 + len], body[3 + len]])
}

async fn device(addr: SocketAddr, client_id: &str) -> Raw {
    Raw::connected(
        addr,
        &Connect {
            client_id,
            keep_alive: 30,
            ..Default::default()
        },
    )
    .await
}

#[tokio::test]
async fn a_mux_served_device_receives_its_command_at_qos1_and_acknowledges_it() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut van = device(addr, "van-1").await;
    van.send(&subscribe(false, 7, "fleet/f/van-1/cmd", 1)).await;
    assert_eq!(
        van.read().await.unwrap(),
        (0x90, vec![0, 7, 1]),
        "SUBACK QoS 1"
    );
    assert_eq!(broker.own_links(), 0, "served by the shared link alone");

    let mut dispatch = device(addr, "dispatch").await;
    dispatch
        .send(&publish(
            false,
            "fleet/f/van-1/cmd",
            b"go",
            1,
            3,
            false,
            &[],
        ))
        .await;
    assert_eq!(dispatch.read().await.unwrap(), (0x40, vec![0, 3]));
    let (first, body) = van.read().await.unwrap();
    assert_eq!(first & 0xF6, 0x32, "QoS 1 PUBLISH, got {first:#04x}");
    assert_eq!(
        publish_fields(first, &body),
        ("fleet/f/van-1/cmd".to_owned(), b"go".to_vec())
    );
    let pkid = publish_pkid(&body);
    assert_ne!(pkid, 0);
    assert_eq!(broker.metrics().messages_out_total(MessageKind::Cmd), 1);

    // Unacknowledged, the command holds a graceful shutdown; acknowledged, it does not.
    let shutdown = tokio::spawn(broker.shutdown_within(Duration::from_secs(10)));
    sleep(Duration::from_millis(300)).await;
    assert!(!shutdown.is_finished(), "waits for the device's PUBACK");
    van.send(&puback(pkid)).await;
    let report = timeout(T, shutdown).await.unwrap().unwrap();
    assert_eq!(report.forced, 0);
}

#[tokio::test]
async fn a_qos1_publish_is_acknowledged_only_once_the_router_took_it() {
    // The mux on its own router: the PUBACK comes from the router, not from the front end.
    let config = BrokerConfig::default();
    let router = crate::router::RouterHandle::spawn(config.router_config(8));
    let (mux, mux_rx) = crate::mux::Mux::new(&router, "fleetbeat-internal-mux-test")
        .await
        .unwrap();
    tokio::spawn(std::sync::Arc::clone(&mux).dispatch(mux_rx));
    let (mut watch_tx, mut watch_rx, _) = router
        .link(crate::router::LinkRequest {
            client_id: "watch",
            clean_session: true,
            topic_alias_max: 0,
        })
        .unwrap();
    watch_tx.subscribe("fleet/+/+/event").unwrap();
    sleep(Duration::from_millis(100)).await;

    let (reply, mut acks) = mpsc::unbounded_channel();
    let publish = rumqttd::protocol::Publish::new(
        bytes::Bytes::from_static(b"fleet/f/van-1/event"),
        bytes::Bytes::from_static(b"e1"),
        false,
    );
    let packet = mux.qos1(&publish, None, &reply, 4242);
    sleep(Duration::from_millis(200)).await;
    assert!(
        acks.try_recv().is_err(),
        "no PUBACK before the router has it"
    );

    mux.send(&mut vec![packet], &mut None).await.unwrap();
    let ack = timeout(T, acks.recv()).await.unwrap().unwrap();
    assert!(
        matches!(ack, crate::mux::MuxEvent::PubAck(4242)),
        "the device's own packet id: {ack:?}"
    );
    // And the router did route it.
    let delivered = timeout(T, async {
        loop {
            match watch_rx.next().await.unwrap() {
                Some(rumqttd::Notification::Forward(forward)) => return forward.publish,
                Some(rumqttd::Notification::Unschedule) => watch_rx.wake().await.unwrap(),
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&delivered.payload[..], b"e1");
}

#[tokio::test]
async fn a_device_publish_at_qos1_is_acknowledged_with_its_own_packet_ids_in_order() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut watcher = Subscriber::new(
        addr,
        "watcher",
        None,
        &[("fleet/+/+/event", QoS::AtLeastOnce)],
    )
    .await;
    let mut van = device(addr, "van-1").await;
    for pkid in [9u16, 300, 65535] {
        van.send(&publish(
            false,
            "fleet/f/van-1/event",
            &pkid.to_be_bytes(),
            1,
            pkid,
            false,
            &[],
        ))
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
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut one = device(addr, "van-1").await;
    let mut two = device(addr, "van-2").await;
    one.send(&subscribe(false, 1, "fleet/f/van-1/cmd", 1)).await;
    two.send(&subscribe(false, 1, "fleet/f/van-2/cmd", 0)).await;
    assert_eq!(one.read().await.unwrap(), (0x90, vec![0, 1, 1]));
    assert_eq!(two.read().await.unwrap(), (0x90, vec![0, 1, 0]));

    let mut dispatch = device(addr, "dispatch").await;
    dispatch
        .send(&publish(
            false,
            "fleet/f/van-2/cmd",
            b"for-2",
            1,
            1,
            false,
            &[],
        ))
        .await;
    assert_eq!(dispatch.read().await.unwrap().0, 0x40);
    let (first, body) = two.read().await.unwrap();
    assert_eq!(first, 0x30, "at the QoS 0 van-2 was granted");
    assert_eq!(publish_fields(first, &body).1, b"for-2");
    // van-1 gets nothing: the next thing it reads is the answer to its ping.
    sleep(Duration::from_millis(300)).await;
    one.send(&[0xC0, 0x00]).await;
    assert_eq!(
        one.read().await.unwrap().0,
        0xD0,
        "PINGRESP, not van-2's command"
    );

    // After UNSUBSCRIBE, van-2 gets no more commands.
    two.send(&packet(
        0xA2,
        &[
            0, 5, 0, 17, b'f', b'l', b'e', b'e', b't', b'/', b'f', b'/', b'v', b'a', b'n', b'-',
            b'2', b'/', b'c', b'm', b'd',
        ],
    ))
    .await;
    assert_eq!(two.read().await.unwrap(), (0xB0, vec![0, 5]), "UNSUBACK");
    dispatch
        .send(&publish(
            false,
            "fleet/f/van-2/cmd",
            b"again",
            0,
            0,
            false,
            &[],
        ))
        .await;
    sleep(Duration::from_millis(300)).await;
    two.send(&[0xC0, 0x00]).await;
    assert_eq!(two.read().await.unwrap().0, 0xD0, "PINGRESP, no command");
    assert_eq!(broker.own_links(), 0);
}

#[tokio::test]
async fn a_mux_served_device_leaves_its_will_when_lost_but_not_after_disconnect() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut watcher = Subscriber::new(
        addr,
        "watcher",
        None,
        &[("fleet/+/+/status", QoS::AtLeastOnce)],
    )
    .await;
    let connect = |client_id| Connect {
        client_id,
        keep_alive: 30,
        will: Some(("fleet/f/gone/status", b"offline", true)),
        ..Default::default()
    };
    let mut polite = Raw::connected(addr, &connect("polite")).await;
    polite
        .send(&subscribe(false, 1, "fleet/f/polite/cmd", 1))
        .await;
    assert_eq!(polite.read().await.unwrap().0, 0x90);
    let mut lost = Raw::connected(addr, &connect("lost")).await;
    lost.send(&subscribe(false, 1, "fleet/f/lost/cmd", 1)).await;
    assert_eq!(lost.read().await.unwrap().0, 0x90);
    assert_eq!(
        broker.own_links(),
        1,
        "only the watcher has a link of its own"
    );

    polite.send(&[0xE0, 0x00]).await;
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
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut dispatch = device(addr, "dispatch").await;
    dispatch
        .send(&publish(
            false,
            "fleet/f/van-1/cmd",
            b"park",
            1,
            1,
            true,
            &[],
        ))
        .await;
    assert_eq!(dispatch.read().await.unwrap().0, 0x40);

    let mut van = device(addr, "van-1").await;
    van.send(&subscribe(false, 2, "fleet/f/van-1/cmd", 1)).await;
    assert_eq!(van.read().await.unwrap(), (0x90, vec![0, 2, 1]));
    let (first, body) = van.read().await.unwrap();
    assert_eq!(
        first & 0xF7,
        0x33,
        "retained QoS 1 PUBLISH, got {first:#04x}"
    );
    assert_eq!(publish_fields(first, &body).1, b"park");
    van.send(&puback(publish_pkid(&body))).await;
    // Another vehicle does not get it.
    let mut other = device(addr, "van-2").await;
    other
        .send(&subscribe(false, 2, "fleet/f/van-2/cmd", 1))
        .await;
    assert_eq!(other.read().await.unwrap().0, 0x90);
    other.send(&[0xC0, 0x00]).await;
    assert_eq!(other.read().await.unwrap().0, 0xD0);

    // An empty retained publish clears it.
    dispatch
        .send(&publish(false, "fleet/f/van-1/cmd", b"", 1, 2, true, &[]))
        .await;
    assert_eq!(dispatch.read().await.unwrap().0, 0x40);
    let mut again = device(addr, "van-1b").await;
    again
        .send(&subscribe(false, 3, "fleet/f/van-1/cmd", 1))
        .await;
    assert_eq!(again.read().await.unwrap().0, 0x90);
    again.send(&[0xC0, 0x00]).await;
    assert_eq!(
        again.read().await.unwrap().0,
        0xD0,
        "nothing retained any more"
    );
}

#[tokio::test]
async fn a_wildcard_subscriber_still_gets_everything() {
    let broker = start(BrokerConfig::ephemeral()).await;
    let addr = broker.v4_addr();
    let mut everything =
        Subscriber::new(addr, "everything", None, &[("fleet/#", QoS::AtLeastOnce)]).await;
    assert_eq!(broker.own_links(), 1);
    let mut van = device(addr, "van-1").await;
    van.send(&subscribe(false, 1, "fleet/f/van-1/cmd", 1)).await;
    assert_eq!(van.read().await.unwrap().0, 0x90);
    van.send(&publish(false, "fleet/f/van-1/hb", b"hb", 0, 0, false, &[]))
        .await;
    van.send(&publish(
        false,
        "fleet/f/van-1/event",
        b"ev",
        1,
        5,
        false,
        &[],
    ))
    .await;
    assert_eq!(van.read().await.unwrap(), (0x40, vec![0, 5]));
    let mut dispatch = device(addr, "dispatch").await;
    dispatch
        .send(&publish(
            false,
            "fleet/f/van-1/cmd",
            b"cmd",
            1,
            1,
            false,
            &[],
        ))
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
    van.send(&subscribe(false, 2, "fleet/f/+/status", 0)).await;
    assert_eq!(van.read().await.unwrap(), (0x90, vec![0, 2, 0]));
    assert_eq!(broker.own_links(), 2);
    dispatch
        .send(&publish(
            false,
            "fleet/f/van-9/status",
            b"up",
            0,
            0,
            false,
            &[],
        ))
        .await;
    let (first, body) = van.read().await.unwrap();
    assert_eq!(publish_fields(first, &body).1, b"up");
}
