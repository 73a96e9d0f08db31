//! [`Network`]: a connection's socket with its read and write buffers and rumqttd's codec for
//! the listener's MQTT version; the packet size limit, the packets a client may not send, and
//! the 3.1.1 form of what rumqttd's router writes.

use std::collections::HashMap;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{self, Packet, Protocol, PublishProperties};
use shared::frame::{self, FrameHeader};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;

use super::wellformed::{broken_reserved_bits, repeated_property};
use crate::listener::Listener;
use crate::metrics::BrokerMetrics;

/// How much room a connection's read buffer gets for one read; it grows for bigger packets.
/// Both buffers are allocated only while they hold bytes: an idle connection holds none.
const BUFFER_SIZE: usize = 1024;

/// How long a refusal CONNACK or a last DISCONNECT may take to write.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// QoS and packet id of a PUBLISH, read from its encoding (rumqttd keeps them private).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PublishInfo {
    pub(super) qos: u8,
    pub(super) pkid: u16,
}

/// A packet read from the client, with its QoS and packet id if it is a PUBLISH.
pub(super) struct Received {
    pub(super) packet: Packet,
    pub(super) publish: Option<PublishInfo>,
}

/// Why bytes from a client are not a packet we accept.
#[derive(Debug, thiserror::Error)]
pub(super) enum PacketError {
    #[error("{0}")]
    Codec(protocol::Error),
    #[error("a client may not send packets of type {0}")]
    ServerOnly(u8),
    #[error("malformed packet: {0}")]
    Reserved(&'static str),
    #[error("protocol error: property {0:#04x} given twice")]
    Repeated(u8),
    #[error("the MQTT codec panicked")]
    Panicked,
    #[error("connection closed")]
    Closed(#[source] io::Error),
}

/// A connection's byte stream: the socket itself, or TLS over it.
pub(super) enum Stream {
    /// Plain TCP: read only once the socket is readable, so an idle connection holds no
    /// buffer.
    Plain(TcpStream),
    /// TLS (boxed: rustls's state is large): rustls buffers what it decrypts, so reads go
    /// through it into a buffer reserved first.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(stream) => stream.write_all(bytes).await,
            Stream::Tls(stream) => {
                stream.write_all(bytes).await?;
                // rustls holds the records until flushed.
                stream.flush().await
            }
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(stream) => stream.shutdown().await,
            Stream::Tls(stream) => stream.shutdown().await,
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(stream) => stream.read(buf).await,
            Stream::Tls(stream) => stream.read(buf).await,
        }
    }
}

/// The socket with its buffers and codec.
pub(super) struct Network {
    stream: Stream,
    read: BytesMut,
    write: BytesMut,
    /// The listener's MQTT version.
    pub(super) version: Listener,
    max_payload_size: usize,
    /// The largest packet the client accepts (MQTT 5 `Maximum Packet Size`), if it set one.
    client_max_packet_size: Option<u32>,
    /// How many topic aliases the client accepts from the broker (MQTT 5 `Topic Alias
    /// Maximum`), and those set on this connection: topic → alias.
    client_topic_alias_max: u16,
    /// How many QoS 1 and 2 deliveries the client takes unacknowledged at once (MQTT 5
    /// `Receive Maximum`; 65 535, the default, in 3.1.1).
    client_receive_max: u16,
    /// On the heap from the first alias: only MQTT 5 clients that accept aliases need it.
    #[expect(
        clippy::box_collection,
        reason = "8 bytes instead of 48 in every connection's task (docs/broker.md, Memory)"
    )]
    topic_aliases: Option<Box<HashMap<Bytes, u16>>>,
    metrics: BrokerMetrics,
}

impl Network {
    pub(super) fn new(
        stream: Stream,
        version: Listener,
        max_payload_size: usize,
        metrics: &BrokerMetrics,
    ) -> Network {
        Network {
            stream,
            read: BytesMut::new(),
            write: BytesMut::new(),
            version,
            max_payload_size,
            client_max_packet_size: None,
            client_topic_alias_max: 0,
            client_receive_max: u16::MAX,
            topic_aliases: None,
            metrics: metrics.clone(),
        }
    }

    /// Sets the largest packet the client accepts (its CONNECT's `Maximum Packet Size`): a
    /// forward bigger than that is not sent (MQTT 5, 3.1.2.11.4).
    pub(super) fn set_client_max_packet_size(&mut self, max: Option<u32>) {
        self.client_max_packet_size = max;
    }

    /// Sets how many topic aliases the client accepts (its CONNECT's `Topic Alias Maximum`):
    /// forwards to it then carry aliases (see [`Self::alias_topic`]).
    pub(super) fn set_client_topic_alias_max(&mut self, max: u16) {
        self.client_topic_alias_max = max;
    }

    /// Sets how many QoS 1 and 2 deliveries the client takes unacknowledged at once (its
    /// CONNECT's `Receive Maximum`; absent: 65 535, MQTT 5 §3.1.2.11.3).
    pub(super) fn set_client_receive_max(&mut self, max: Option<u16>) {
        self.client_receive_max = max.unwrap_or(u16::MAX);
    }

    /// How many QoS 1 and 2 deliveries the client takes unacknowledged at once.
    pub(super) fn client_receive_max(&self) -> u16 {
        self.client_receive_max
    }

    /// Reads whatever the socket has (at least one byte). Cancel-safe: bytes read are kept.
    pub(super) async fn read_more(&mut self) -> io::Result<()> {
        let n = match &mut self.stream {
            // Wait for bytes without a buffer, so an idle connection holds none.
            Stream::Plain(stream) => loop {
                stream.readable().await?;
                if self.read.capacity() - self.read.len() < BUFFER_SIZE / 4 {
                    self.read.reserve(BUFFER_SIZE);
                }
                match stream.try_read_buf(&mut self.read) {
                    Ok(n) => break n,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Err(err),
                }
            },
            // rustls has no readiness of its own: reserve, then read (cancel-safe: nothing is
            // taken from rustls unless the read completes).
            Stream::Tls(stream) => {
                if self.read.capacity() - self.read.len() < BUFFER_SIZE / 4 {
                    self.read.reserve(BUFFER_SIZE);
                }
                stream.read_buf(&mut self.read).await?
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed by the peer",
            ));
        }
        self.metrics.bytes_in(n);
        Ok(())
    }

    /// Reads until one complete packet is buffered and returns it.
    pub(super) async fn read_packet(&mut self) -> Result<Received, PacketError> {
        loop {
            if let Some(received) = self.next_packet()? {
                return Ok(received);
            }
            self.read_more().await.map_err(PacketError::Closed)?;
        }
    }

    /// Whether the read buffer starts with a PUBLISH (complete or not).
    pub(super) fn publish_is_next(&self) -> bool {
        self.read.first().is_some_and(|&b| b >> 4 == 3)
    }

    /// Whether the read buffer holds one complete packet (or a length that is malformed or
    /// too big, which the decoder then reports).
    pub(super) fn has_packet(&self) -> bool {
        match FrameHeader::parse(&self.read) {
            Ok(Some(header)) => {
                header.remaining > self.max_payload_size || self.read.len() >= header.total()
            }
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// Decodes the next complete packet in the read buffer, if there is one.
    pub(super) fn next_packet(&mut self) -> Result<Option<Received>, PacketError> {
        let Some(&first) = self.read.first() else {
            return Ok(None);
        };
        let packet_type = first >> 4;
        // CONNACK, SUBACK, UNSUBACK, PINGRESP only ever go to clients; rumqttd's v5 decoder
        // panics on CONNACK and UNSUBACK.
        if matches!(packet_type, 2 | 9 | 11 | 13) {
            return Err(PacketError::ServerOnly(packet_type));
        }
        let v5 = self.version == Listener::V5;
        if let Ok(Some(header)) = FrameHeader::parse(&self.read)
            && let Some(packet) = self.read.get(..header.total())
        {
            if let Some(why) = broken_reserved_bits(packet, header.header_len, v5) {
                return Err(PacketError::Reserved(why));
            }
            if v5 && let Some(id) = repeated_property(packet, header.header_len) {
                return Err(PacketError::Repeated(id));
            }
        }
        let publish = if packet_type == 3 {
            publish_info(&self.read)
        } else {
            None
        };
        let max = self.max_payload_size;
        let (version, read) = (self.version, &mut self.read);
        // rumqttd's codecs are unit structs: nothing of theirs is kept per connection.
        let decode = || match version {
            Listener::V4 => V4.read_mut(read, max),
            Listener::V5 => V5.read_mut(read, max),
        };
        match catch_unwind(AssertUnwindSafe(decode)) {
            Ok(Ok(packet)) => Ok(Some(Received { packet, publish })),
            Ok(Err(protocol::Error::InsufficientBytes(_))) => Ok(None),
            Ok(Err(err)) => Err(PacketError::Codec(err)),
            Err(_) => Err(PacketError::Panicked),
        }
    }

    /// Encodes `packet` into the write buffer (MQTT 5 properties dropped for 3.1.1 clients).
    /// Returns QoS and packet id if it is a PUBLISH.
    pub(super) fn queue(&mut self, packet: Packet) -> Result<Option<PublishInfo>, PacketError> {
        let packet = match self.version {
            Listener::V4 => match for_v4(packet) {
                Some(packet) => packet,
                None => return Ok(None),
            },
            Listener::V5 => packet,
        };
        let start = self.write.len();
        if let Packet::Publish(publish, _) = &packet {
            // Room for the whole packet at once (fixed header, topic, packet id, a few MQTT 5
            // properties), not the codec's growth from an empty buffer, byte by byte.
            self.write
                .reserve(publish.topic.len() + publish.payload.len() + 16);
        }
        let (version, write) = (self.version, &mut self.write);
        let encode = || match version {
            Listener::V4 => V4.write(packet, write),
            Listener::V5 => V5.write(packet, write),
        };
        match catch_unwind(AssertUnwindSafe(encode)) {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                self.write.truncate(start);
                return Err(PacketError::Codec(err));
            }
            Err(_) => {
                self.write.truncate(start);
                return Err(PacketError::Panicked);
            }
        }
        let written = &self.write[start..];
        Ok(if written.first().is_some_and(|b| b >> 4 == 3) {
            publish_info(written)
        } else {
            None
        })
    }

    /// Queues a PUBLISH the router forwarded (at the subscription's QoS) to be delivered at
    /// most at `max_qos` (min(publish QoS, granted QoS), see `qos`). A forward above it is
    /// rewritten at `max_qos`: at QoS 0 without its packet id, or from QoS 2 to 1 in place
    /// (the client's PUBACK then acknowledges it); one bigger than the client's maximum packet
    /// size is not sent at all. Returns the QoS and packet id as written (`None` if not sent),
    /// and the packet id the router forwarded it under if it was downgraded to QoS 0 or not
    /// sent: the router waits for a PUBACK the client will not send. `dup`: a resend, written
    /// with the DUP flag if it goes at QoS 1 or 2.
    pub(super) fn queue_forward(
        &mut self,
        packet: Packet,
        max_qos: u8,
        dup: bool,
    ) -> Result<(Option<PublishInfo>, Option<u16>), PacketError> {
        let (packet, new_alias) = self.alias_topic(packet);
        let start = self.write.len();
        let mut info = self.queue(packet)?;
        let mut router_pkid = None;
        if let Some(PublishInfo { qos: 2, pkid }) = info
            && max_qos == 1
        {
            // QoS bits 2 → 1 in place: the packet id stays, so does everything else.
            self.write[start] = (self.write[start] & !0b0110) | 0b0010;
            info = Some(PublishInfo { qos: 1, pkid });
        } else if let Some(PublishInfo { qos, pkid }) = info
            && qos > max_qos
        {
            if !downgrade_to_qos0(&mut self.write, start) {
                self.write.truncate(start);
                return Err(PacketError::Codec(protocol::Error::MalformedPacket));
            }
            info = Some(PublishInfo { qos: 0, pkid: 0 });
            router_pkid = Some(pkid);
        }
        if dup && info.is_some_and(|i| i.qos > 0) {
            self.write[start] |= 0b1000;
        }
        if let Some(max) = self.client_max_packet_size
            && self.write.len() - start > usize::try_from(max).unwrap_or(usize::MAX)
        {
            self.write.truncate(start);
            if let (Some(topic), Some(aliases)) = (new_alias, &mut self.topic_aliases) {
                aliases.remove(&topic);
            }
            let pkid = router_pkid.or(info.filter(|i| i.qos > 0).map(|i| i.pkid));
            return Ok((None, pkid));
        }
        Ok((info, router_pkid))
    }

    /// For an MQTT 5 client that accepts topic aliases: the first PUBLISH on a topic carries
    /// the topic and sets an alias for it (while the client's maximum allows a new one), the
    /// next ones the alias alone, as MQTT 5 allows a server to (3.3.2.3.4). Returns the packet
    /// and the topic whose alias it set, if it set one.
    fn alias_topic(&mut self, packet: Packet) -> (Packet, Option<Bytes>) {
        let Packet::Publish(mut publish, mut properties) = packet else {
            return (packet, None);
        };
        if self.client_topic_alias_max == 0
            || self.version != Listener::V5
            || publish.topic.is_empty()
        {
            return (Packet::Publish(publish, properties), None);
        }
        let mut set = None;
        let aliases = self.topic_aliases.get_or_insert_with(Box::default);
        let alias = match aliases.get(&publish.topic) {
            Some(&alias) => {
                publish.topic = Bytes::new();
                Some(alias)
            }
            None => u16::try_from(aliases.len() + 1)
                .ok()
                .filter(|alias| *alias <= self.client_topic_alias_max)
                .inspect(|alias| {
                    aliases.insert(publish.topic.clone(), *alias);
                    set = Some(publish.topic.clone());
                }),
        };
        if let Some(alias) = alias {
            properties
                .get_or_insert_with(PublishProperties::default)
                .topic_alias = Some(alias);
        }
        (Packet::Publish(publish, properties), set)
    }

    /// Queues bytes already encoded.
    pub(super) fn queue_bytes(&mut self, bytes: &[u8]) {
        self.write.extend_from_slice(bytes);
    }

    /// Writes the write buffer out.
    pub(super) async fn flush(&mut self) -> io::Result<()> {
        if self.write.is_empty() {
            return Ok(());
        }
        self.stream.write_all(&self.write).await?;
        self.metrics.bytes_out(self.write.len());
        self.write.clear();
        // Most connections write rarely (a PUBACK, a command): keep no buffer between writes.
        self.write = BytesMut::new();
        Ok(())
    }

    /// Writes the write buffer out as the connection's last words: for at most
    /// [`FAREWELL_TIMEOUT`], failures ignored (the connection closes either way).
    pub(super) async fn flush_farewell(&mut self) {
        let _ = timeout(FAREWELL_TIMEOUT, self.flush()).await;
    }

    /// Queues `packet` and writes it as the connection's last words (see
    /// [`Self::flush_farewell`]); nothing is written if it cannot be encoded.
    pub(super) async fn farewell(&mut self, packet: Packet) {
        if self.queue(packet).is_ok() {
            self.flush_farewell().await;
        }
    }

    /// After a last DISCONNECT (see [`Self::farewell`]) for a protocol error: stops writing and
    /// reads (and drops) what the client still sends until it closes, for at most
    /// [`FAREWELL_TIMEOUT`]. Closing with unread bytes would reset the connection, and the
    /// client could lose the DISCONNECT that says why.
    pub(super) async fn linger(&mut self) {
        let _ = timeout(FAREWELL_TIMEOUT, async {
            let _ = self.stream.shutdown().await;
            let mut sink = [0u8; 1024];
            loop {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        self.read = BytesMut::new();
    }

    /// Frees the read buffer once it holds no partial packet, so an idle connection keeps no
    /// buffer (the next read allocates one).
    pub(super) fn release_read_buffer(&mut self) {
        if self.read.is_empty() && self.read.capacity() > 0 {
            self.read = BytesMut::new();
        }
    }
}

/// The 3.1.1 form of a packet from rumqttd's router: without MQTT 5 properties, which
/// rumqttd's v4 encoder meets with `unreachable!()` (the "v5 property kills the v4 listener"
/// defect). `None` for packets 3.1.1 has no server-to-client form of (DISCONNECT).
fn for_v4(packet: Packet) -> Option<Packet> {
    Some(match packet {
        Packet::Publish(publish, _) => Packet::Publish(publish, None),
        Packet::PubAck(ack, _) => Packet::PubAck(ack, None),
        Packet::PubRec(rec, _) => Packet::PubRec(rec, None),
        Packet::PubRel(rel, _) => Packet::PubRel(rel, None),
        Packet::PubComp(comp, _) => Packet::PubComp(comp, None),
        Packet::SubAck(ack, _) => Packet::SubAck(ack, None),
        Packet::UnsubAck(ack, _) => Packet::UnsubAck(ack, None),
        Packet::ConnAck(ack, _) => Packet::ConnAck(ack, None),
        Packet::Disconnect(..) => return None,
        other => other,
    })
}

/// Rewrites the QoS 1 or 2 PUBLISH encoded at the end of `buf`, from `start`, as QoS 0: QoS
/// and DUP bits cleared, the packet id taken out, the remaining length shortened by two.
/// `false` (and `buf` untouched) if no such complete PUBLISH is there.
fn downgrade_to_qos0(buf: &mut BytesMut, start: usize) -> bool {
    let Some(encoded) = buf.get(start..) else {
        return false;
    };
    let Some(header) = frame::frame(encoded) else {
        return false;
    };
    let Some(body) = encoded.get(header.header_len..header.total()) else {
        return false;
    };
    let topic_end = match body {
        [hi, lo, ..] => 2 + usize::from(u16::from_be_bytes([*hi, *lo])),
        _ => return false,
    };
    if header.first >> 4 != 3 || (header.first >> 1) & 3 == 0 || body.len() < topic_end + 2 {
        return false;
    }
    let mut rest = Vec::with_capacity(body.len() - 2);
    rest.extend_from_slice(&body[..topic_end]);
    rest.extend_from_slice(&body[topic_end + 2..]);
    let mut packet = Vec::with_capacity(rest.len() + 5);
    frame::put_packet(&mut packet, header.first & 0b1111_0001, &rest);
    buf.truncate(start);
    buf.extend_from_slice(&packet);
    true
}

/// QoS and packet id of the PUBLISH at the start of `buf`, if it is complete.
fn publish_info(buf: &[u8]) -> Option<PublishInfo> {
    let header = frame::frame(buf)?;
    let qos = (header.first >> 1) & 0b11;
    if qos == 0 {
        return Some(PublishInfo { qos, pkid: 0 });
    }
    let body = &buf[header.header_len..header.total()];
    let (_topic, pkid, _payload) = frame::publish_fields(header.first, body)?;
    Some(PublishInfo {
        qos,
        pkid: pkid.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use rumqttd::protocol::{Disconnect, DisconnectReasonCode};

    use super::*;

    #[test]
    fn publish_info_reads_qos_and_packet_id() {
        // QoS 1, topic "a/b", pkid 0x0102, payload "x".
        let qos1 = [0x32, 8, 0, 3, b'a', b'/', b'b', 1, 2, b'x'];
        assert_eq!(
            publish_info(&qos1),
            Some(PublishInfo {
                qos: 1,
                pkid: 0x0102
            })
        );
        // QoS 0: no packet id.
        let qos0 = [0x30, 6, 0, 3, b'a', b'/', b'b', b'x'];
        assert_eq!(publish_info(&qos0), Some(PublishInfo { qos: 0, pkid: 0 }));
        // Incomplete frames are not read.
        assert_eq!(publish_info(&qos1[..5]), None);
        assert_eq!(publish_info(&[0x32]), None);
    }

    #[test]
    fn v4_form_strips_properties() {
        let publish = rumqttd::protocol::Publish::new(
            Bytes::from_static(b"r/a"),
            Bytes::from_static(b"x"),
            true,
        );
        let properties = rumqttd::protocol::PublishProperties {
            user_properties: vec![("a".into(), "2".into())],
            ..Default::default()
        };
        let packet = for_v4(Packet::Publish(publish.clone(), Some(properties)));
        assert_eq!(packet, Some(Packet::Publish(publish, None)));
        let bye = Disconnect {
            reason_code: DisconnectReasonCode::ServerShuttingDown,
        };
        assert_eq!(for_v4(Packet::Disconnect(bye, None)), None);
    }

    #[test]
    fn a_forward_is_downgraded_to_qos_0_in_place() {
        for v5 in [false, true] {
            let qos1 = shared::frame::Publish {
                v5,
                topic: b"a/b",
                payload: b"hello",
                qos: 1,
                pkid: 7,
                retain: true,
                dup: true,
                props: &[0x26, 0, 1, b'k', 0, 1, b'v'],
            };
            let qos0 = shared::frame::Publish {
                qos: 0,
                pkid: 0,
                dup: false,
                ..qos1
            };
            let mut buf = BytesMut::from(&b"\xd0\x00"[..]);
            buf.extend_from_slice(&qos1.bytes());
            assert!(downgrade_to_qos0(&mut buf, 2));
            let mut expected = b"\xd0\x00".to_vec();
            expected.extend_from_slice(&qos0.bytes());
            assert_eq!(&buf[..], &expected[..], "v5: {v5}");
            assert_eq!(
                publish_info(&buf[2..]),
                Some(PublishInfo { qos: 0, pkid: 0 })
            );
            // Already QoS 0: left alone.
            assert!(!downgrade_to_qos0(&mut buf, 2));
            assert_eq!(&buf[..], &expected[..]);
        }
        // A remaining length that shrinks by a byte (128 → 126).
        let payload = [7u8; 123];
        let big = shared::frame::Publish {
            topic: b"a",
            payload: &payload,
            qos: 1,
            pkid: 1,
            ..Default::default()
        };
        let mut buf = BytesMut::from(&big.bytes()[..]);
        assert_eq!(buf.len(), 1 + 2 + 128);
        assert!(downgrade_to_qos0(&mut buf, 0));
        let small = shared::frame::Publish { qos: 0, ..big };
        assert_eq!(&buf[..], &small.bytes()[..]);
    }
}
