//! [`Network`]: a connection's socket with its read and write buffers and rumqttd's codec for
//! the listener's MQTT version; the packet size limit, the packets a client may not send, and
//! the 3.1.1 form of what rumqttd's router writes.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{self, Packet, Protocol};
use shared::frame::{self, FrameHeader};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::timeout;

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
    #[error("the MQTT codec panicked")]
    Panicked,
    #[error("connection closed")]
    Closed(#[source] io::Error),
}

/// The socket with its buffers and codec.
pub(super) struct Network {
    stream: TcpStream,
    read: BytesMut,
    write: BytesMut,
    codec: Box<dyn Protocol + Send + Sync>,
    /// The listener's MQTT version.
    pub(super) version: Listener,
    max_payload_size: usize,
    metrics: BrokerMetrics,
}

impl Network {
    pub(super) fn new(
        stream: TcpStream,
        version: Listener,
        max_payload_size: usize,
        metrics: &BrokerMetrics,
    ) -> Network {
        let codec: Box<dyn Protocol + Send + Sync> = match version {
            Listener::V4 => Box::new(V4),
            Listener::V5 => Box::new(V5),
        };
        Network {
            stream,
            read: BytesMut::new(),
            write: BytesMut::new(),
            codec,
            version,
            max_payload_size,
            metrics: metrics.clone(),
        }
    }

    /// Reads whatever the socket has (at least one byte). Cancel-safe: bytes read are kept.
    pub(super) async fn read_more(&mut self) -> io::Result<()> {
        // Wait for bytes without a buffer, so an idle connection holds none.
        let n = loop {
            self.stream.readable().await?;
            if self.read.capacity() - self.read.len() < BUFFER_SIZE / 4 {
                self.read.reserve(BUFFER_SIZE);
            }
            match self.stream.try_read_buf(&mut self.read) {
                Ok(n) => break n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
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
        let publish = if packet_type == 3 {
            publish_info(&self.read)
        } else {
            None
        };
        let max = self.max_payload_size;
        let (codec, read) = (&mut self.codec, &mut self.read);
        match catch_unwind(AssertUnwindSafe(|| codec.read_mut(read, max))) {
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
        let (codec, write) = (&self.codec, &mut self.write);
        match catch_unwind(AssertUnwindSafe(|| codec.write(packet, write))) {
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

/// Whether `topic` can be published to: non-empty UTF-8 without wildcards.
pub(super) fn valid_topic_name(topic: &[u8]) -> bool {
    !topic.is_empty()
        && std::str::from_utf8(topic).is_ok()
        && !topic.iter().any(|&b| b == b'+' || b == b'#' || b == 0)
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
    fn topic_names() {
        assert!(valid_topic_name(b"fleet/a/b/status"));
        assert!(!valid_topic_name(b""));
        assert!(!valid_topic_name(b"fleet/+/b/status"));
        assert!(!valid_topic_name(b"fleet/#"));
        assert!(!valid_topic_name(&[0xff, 0xfe]));
    }
}
