//! What the broker's end-to-end tests share: a broker on ephemeral ports, a raw MQTT client
//! for where the exact bytes matter (its packets built with [`shared::frame`]), a rumqttc
//! [`Subscriber`] for where a real client library does, and [`eventually`] for conditions the
//! broker reaches on its own time.

// Each test file uses its own part of the fixture.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use broker::{Broker, BrokerConfig, CredentialsFile, NewPassword, Role};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as ClientPacket, QoS};
use shared::frame::{Connect, PINGREQ, Publish, packet, put_str};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};

/// Outer bound on anything a test awaits; generous, the code under test has its own bounds.
pub const T: Duration = Duration::from_secs(20);

/// Starts a broker with `config`, within [`T`].
pub async fn start(config: BrokerConfig) -> Broker {
    timeout(T, Broker::start(config))
        .await
        .expect("Broker::start returns within its bound")
        .expect("the broker starts")
}

/// Starts a broker on ephemeral ports with every other setting at its default.
pub async fn start_ephemeral() -> Broker {
    start(BrokerConfig::ephemeral()).await
}

/// A credentials file provisioned for a test (devices and clients, each with a generated
/// password), removed when dropped.
pub struct Provisioned {
    path: PathBuf,
    passwords: HashMap<String, String>,
}

impl Provisioned {
    /// Devices named `devices`, clients named and with the roles of `clients`.
    pub fn new(devices: &[&str], clients: &[(&str, Role)]) -> Provisioned {
        let path = std::env::temp_dir().join(format!(
            "fleetbeat-broker-test-{}-{:08x}.toml",
            std::process::id(),
            fastrand::u32(..)
        ));
        let mut file = CredentialsFile::open(&path).unwrap();
        let mut passwords = HashMap::new();
        for device in devices {
            let issued = file
                .add_device(
                    device,
                    &shared::FleetId::new("f").unwrap(),
                    NewPassword::Generate,
                )
                .unwrap();
            passwords.insert((*device).to_owned(), issued.password);
        }
        for (name, role) in clients {
            let issued = file.add_client(name, *role, NewPassword::Generate).unwrap();
            passwords.insert((*name).to_owned(), issued.password);
        }
        file.save().unwrap();
        Provisioned { path, passwords }
    }

    /// A broker configuration on ephemeral ports using this file.
    pub fn config(&self) -> BrokerConfig {
        BrokerConfig {
            credentials: Some(self.path.clone()),
            ..BrokerConfig::ephemeral()
        }
    }

    /// The login (user name, password) of `name`.
    pub fn login(&self, name: &str) -> (&str, &str) {
        let (user, password) = self.passwords.get_key_value(name).expect("provisioned");
        (user.as_str(), password.as_str())
    }
}

impl Drop for Provisioned {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Waits until `check` holds, polling.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Packets.

/// A CONNECT as `client_id` in MQTT 3.1.1: clean session, keep-alive 30 s.
pub fn connect_as(client_id: &str) -> Connect<'_> {
    Connect {
        client_id,
        keep_alive: 30,
        ..Connect::default()
    }
}

/// A CONNECT as `client_id` in MQTT 5: clean start, keep-alive 30 s.
pub fn connect_v5_as(client_id: &str) -> Connect<'_> {
    Connect {
        v5: true,
        ..connect_as(client_id)
    }
}

/// An MQTT 3.1.1 PUBLISH of `payload` on `topic` at `qos`, with packet id `pkid` if QoS > 0.
pub fn publish(topic: &str, payload: &[u8], qos: u8, pkid: u16, retain: bool) -> Vec<u8> {
    Publish {
        topic: topic.as_bytes(),
        payload,
        qos,
        pkid,
        retain,
        ..Publish::default()
    }
    .bytes()
}

/// An MQTT 5 PUBLISH at QoS 0 with the encoded properties `props`.
pub fn publish_v5(topic: &str, payload: &[u8], retain: bool, props: &[u8]) -> Vec<u8> {
    Publish {
        v5: true,
        topic: topic.as_bytes(),
        payload,
        retain,
        props,
        ..Publish::default()
    }
    .bytes()
}

/// An MQTT 3.1.1 UNSUBSCRIBE from `filter` with packet id `pkid`.
pub fn unsubscribe(pkid: u16, filter: &str) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    put_str(&mut body, filter.as_bytes());
    packet(0xA2, &body)
}

/// Topic and payload of a raw PUBLISH body (3.1.1).
pub fn publish_fields(first: u8, body: &[u8]) -> (String, Vec<u8>) {
    let (topic, _, payload) =
        shared::frame::publish_fields(first, body).expect("a complete PUBLISH body");
    (String::from_utf8(topic.to_vec()).unwrap(), payload.to_vec())
}

/// The packet id of a raw QoS 1 PUBLISH.
pub fn publish_pkid(first: u8, body: &[u8]) -> u16 {
    shared::frame::publish_fields(first, body)
        .and_then(|(_, pkid, _)| pkid)
        .expect("a QoS 1 PUBLISH")
}

// ---------------------------------------------------------------------------------------------
// A raw MQTT client.

/// A raw MQTT connection: sends the bytes it is given, reads whole packets.
pub struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A raw MQTT 3.1.1 client connected as `client_id` (clean session, keep-alive 30 s).
pub async fn client(addr: SocketAddr, client_id: &str) -> Raw {
    Raw::connected(addr, &connect_as(client_id)).await
}

/// A raw MQTT 5 client connected as `client_id` (clean start, keep-alive 30 s).
pub async fn client_v5(addr: SocketAddr, client_id: &str) -> Raw {
    Raw::connected(addr, &connect_v5_as(client_id)).await
}

/// A raw MQTT 3.1.1 client connected as `client_id` and subscribed to `filter` at `qos` with
/// packet id `pkid` (the SUBACK asserted, its grants not).
pub async fn client_subscribed(
    addr: SocketAddr,
    client_id: &str,
    pkid: u16,
    filter: &str,
    qos: u8,
) -> Raw {
    let mut raw = client(addr, client_id).await;
    assert_eq!(raw.subscribe(pkid, filter, qos).await.0, 0x90, "SUBACK");
    raw
}

impl Raw {
    /// A TCP connection to `addr`, nothing sent yet.
    pub async fn open(addr: SocketAddr) -> Raw {
        let stream = timeout(T, TcpStream::connect(addr)).await.unwrap().unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and returns the CONNACK's return/reason code.
    pub async fn connect(addr: SocketAddr, connect: &Connect<'_>) -> (Raw, u8) {
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

    /// Connects and asserts the CONNACK accepts.
    pub async fn connected(addr: SocketAddr, connect: &Connect<'_>) -> Raw {
        let (raw, code) = Raw::connect(addr, connect).await;
        assert_eq!(code, 0, "CONNACK refused {}", connect.client_id);
        raw
    }

    /// Writes `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends an MQTT 3.1.1 PUBLISH (see [`publish`]).
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, pkid: u16, retain: bool) {
        self.send(&publish(topic, payload, qos, pkid, retain)).await;
    }

    /// Sends an MQTT 3.1.1 SUBSCRIBE to `filter` at `qos` and returns the next packet (the
    /// SUBACK, first byte and body).
    pub async fn subscribe(&mut self, pkid: u16, filter: &str, qos: u8) -> (u8, Vec<u8>) {
        self.send(&shared::frame::subscribe(false, pkid, &[(filter, qos)]))
            .await;
        self.read()
            .await
            .expect("a SUBACK, not a closed connection")
    }

    /// Sends a PINGREQ and returns the first byte of the next packet (a PINGRESP's is 0xD0).
    pub async fn ping(&mut self) -> u8 {
        self.send(&PINGREQ).await;
        self.read()
            .await
            .expect("a packet, not a closed connection")
            .0
    }

    /// The next packet (first byte, body), or `None` once the broker closed the connection.
    pub async fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        timeout(T, self.next_packet())
            .await
            .expect("the broker answers or closes within the bound")
    }

    /// The next packet if one arrives within `wait` (`None` also once the broker closed the
    /// connection).
    pub async fn read_within(&mut self, wait: Duration) -> Option<(u8, Vec<u8>)> {
        timeout(wait, self.next_packet()).await.ok().flatten()
    }

    /// Puts a packet read before back, to be read first again.
    pub fn unread(&mut self, first: u8, body: &[u8]) {
        let mut bytes = packet(first, body);
        bytes.extend_from_slice(&self.buf);
        self.buf = bytes;
    }

    /// The next packet, however long it takes. Cancel-safe: bytes read are kept.
    async fn next_packet(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(header) = shared::frame::frame(&self.buf) {
                let body = self.buf[header.header_len..header.total()].to_vec();
                self.buf.drain(..header.total());
                return Some((header.first, body));
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until the connection is closed, returning what came before.
    pub async fn until_closed(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut packets = Vec::new();
        while let Some(p) = self.read().await {
            packets.push(p);
        }
        packets
    }
}

// ---------------------------------------------------------------------------------------------
// A rumqttc subscriber.

/// A rumqttc client subscribed to some filters, its event loop polled by a task of its own.
pub struct Subscriber {
    /// The client, to publish or disconnect with.
    pub client: AsyncClient,
    messages: mpsc::UnboundedReceiver<rumqttc::Publish>,
}

impl Subscriber {
    /// Connects anonymously as `id` and subscribes to `filter` at `qos`, the SUBACK awaited.
    pub async fn new(addr: SocketAddr, id: &str, filter: &str, qos: QoS) -> Subscriber {
        Subscriber::connect(addr, id, None, &[(filter, qos)]).await
    }

    /// Connects as `id`, logged in as `login` (user, password) if given, and subscribes to
    /// `filters`, each SUBACK awaited.
    pub async fn connect(
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

    /// The next message, within [`T`].
    pub async fn next(&mut self) -> rumqttc::Publish {
        timeout(T, self.messages.recv())
            .await
            .expect("a message within the bound")
            .expect("the subscriber runs")
    }

    /// Asserts nothing arrives for a while.
    pub async fn nothing_for(&mut self, wait: Duration) {
        if let Ok(Some(p)) = timeout(wait, self.messages.recv()).await {
            panic!("unexpected message on {}: {:?}", p.topic, p.payload);
        }
    }
}
