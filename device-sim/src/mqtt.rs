//! A small MQTT 3.1.1 client sized for one vehicle: the [`ClientState`] (the protocol state,
//! no I/O) and the [`Link`] (a TCP connection, or TLS over one ([`TlsTarget`]), that moves
//! the client state's bytes).
//!
//! The packets are encoded and decoded by rumqttc's public codec
//! ([`rumqttc::mqttbytes::v4`]); what this module adds is what a vehicle needs of a client and
//! no more, so that 10 000 of them fit in one process:
//!
//! - **Buffers sized for the traffic.** A vehicle receives a few tens of bytes at a time
//!   (CONNACK, SUBACK, PUBACK, PINGRESP, the odd command). The read buffer starts at
//!   `READ_BUFFER` (128) bytes and grows only to fit a larger packet, up to the hard maximum
//!   [`ClientOptions::max_packet`]; a larger packet ends the connection with
//!   [`LinkError::PacketTooLarge`]. Publishes are encoded into one reusable write buffer
//!   (`WRITE_BUFFER`, 256 bytes, to start with). Both shrink back after a burst.
//! - **No allocation per message.** The outgoing `Publish` and its topic string are reused,
//!   its payload is a view of one reusable scratch buffer, and decoding PUBACKs and PINGRESPs
//!   splits the read buffer without copying.
//! - **QoS 1 bookkeeping with caller tags.** Each QoS 1 publish gets a free packet id and
//!   carries a tag of the caller's (`T`), handed back with its PUBACK
//!   ([`Incoming::PubAck`]); at most `MAX_INFLIGHT` (20) are unacknowledged at once. Incoming
//!   QoS 1 publishes are acknowledged as they are decoded.
//! - **Keep-alive.** A PINGREQ goes out when nothing has been sent *or* received for the
//!   keep-alive, and the link is declared dead ([`LinkError::PingTimeout`]) when its
//!   PINGRESP does not come within [`ClientOptions::ping_timeout`]: a vehicle that only
//!   publishes QoS 0 notices a dead broker too. A CONNACK must come within
//!   [`ClientOptions::connack_timeout`].
//!
//! The client state never waits: the caller owns one timer and sleeps until
//! [`ClientState::deadline`], then calls [`ClientState::on_timer`]; it reads with
//! [`Link::exchange`] and takes decoded packets from [`ClientState::next_incoming`].
//!
//! Clean sessions only: after a lost connection nothing is resumed
//! ([`ClientState::reset`]); the caller sends again whatever was unacknowledged, with `dup`
//! set.

use std::future::poll_fn;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, LastWill, Login, Packet, PingReq, PubAck,
    Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{self, PacketType, QoS};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The read buffer's initial capacity: a command publish fits, a PUBACK many times over.
const READ_BUFFER: usize = 128;
/// The write buffer's initial capacity: a CONNECT with will and login, or a publish, fits.
const WRITE_BUFFER: usize = 256;
/// A buffer that grew beyond this for a burst is replaced by a fresh small one once empty.
const SHRINK_ABOVE: usize = 1024;
/// The largest incoming packet accepted by default (remaining length, bytes).
const MAX_PACKET: usize = 4096;
/// QoS 1 publishes awaiting their PUBACK at most.
pub(crate) const MAX_INFLIGHT: usize = 20;

/// How a [`ClientState`] talks to its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// The keep-alive sent in CONNECT, 1 ..= 65 535 whole seconds: a PINGREQ goes out after
    /// this long without sending or receiving anything.
    pub keep_alive: Duration,
    /// How long a PINGRESP may take before the link counts as dead.
    pub ping_timeout: Duration,
    /// How long the CONNACK may take.
    pub connack_timeout: Duration,
    /// The largest incoming packet (remaining length) accepted; a larger one ends the link.
    pub max_packet: usize,
}

impl ClientOptions {
    /// Keep-alive `keep_alive`, a PINGRESP timeout of the same length, 5 s for the CONNACK,
    /// packets up to 4 KiB (`MAX_PACKET`).
    pub const fn new(keep_alive: Duration) -> Self {
        Self {
            keep_alive,
            ping_timeout: keep_alive,
            connack_timeout: Duration::from_secs(5),
            max_packet: MAX_PACKET,
        }
    }
}

/// An application message to publish (or to leave as the last will).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// The topic name.
    pub topic: &'a str,
    /// The payload.
    pub payload: &'a [u8],
    /// At most once or at least once ([`QoS::ExactlyOnce`] is not supported).
    pub qos: QoS,
    /// Whether the broker retains it.
    pub retain: bool,
}

/// What a CONNECT carries besides the client options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRequest<'a> {
    /// The client id.
    pub client_id: &'a str,
    /// Username and password, if the broker wants a login.
    pub login: Option<(&'a str, &'a str)>,
    /// The last will, published by the broker if the link dies without a DISCONNECT.
    pub will: Option<Message<'a>>,
}

/// A packet from the broker that the caller has to act on (PINGRESP is handled inside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming<T> {
    /// The broker accepted the connection: publishing and subscribing may start.
    ConnAck,
    /// A message on a subscribed topic. A QoS 1 one is already acknowledged.
    Publish(Publish),
    /// The broker acknowledged a QoS 1 publish.
    PubAck {
        /// Its packet id.
        pkid: u16,
        /// The tag it was published with; `None` if no publish with this id was in flight
        /// (a late or duplicate acknowledgement).
        tag: Option<T>,
    },
    /// The broker answered a SUBSCRIBE.
    SubAck {
        /// Its packet id.
        pkid: u16,
        /// Whether the broker refused any of its filters.
        refused: bool,
    },
}

/// Why a connection is over. Every variant means: drop the [`Link`], [`ClientState::reset`], and
/// connect again later.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed.
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    /// The TCP connection (and the TLS handshake, over TLS) could not be made in time.
    #[error("connecting timed out")]
    ConnectTimeout,
    /// The TLS handshake failed: the broker's certificate is not signed by a trusted CA or
    /// does not name the broker's host, the broker wants a client certificate, no common
    /// protocol, ...
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
    /// The TLS layer failed after the handshake (a fatal alert from the broker, such as
    /// the refusal of a missing or unknown client certificate, or a bad record).
    #[error("TLS failed: {0}")]
    Tls(rustls::Error),
    /// The broker closed the connection.
    #[error("the broker closed the connection")]
    Closed,
    /// The broker refused the connection (CONNACK return code).
    #[error("the broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    /// No CONNACK within [`ClientOptions::connack_timeout`].
    #[error("no CONNACK within {0:?}")]
    ConnAckTimeout(Duration),
    /// No PINGRESP within [`ClientOptions::ping_timeout`].
    #[error("no PINGRESP within {0:?}")]
    PingTimeout(Duration),
    /// The broker sent a packet larger than [`ClientOptions::max_packet`].
    #[error("the broker sent a packet of {size} bytes, more than the {max} a vehicle accepts")]
    PacketTooLarge {
        /// Its remaining length.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The broker sent bytes that are not an MQTT 3.1.1 packet.
    #[error("malformed packet from the broker: {0}")]
    Malformed(mqttbytes::Error),
    /// The broker sent a packet a client never expects here (or a QoS 2 publish, which this
    /// client never subscribes to).
    #[error("unexpected {0:?} packet from the broker")]
    Unexpected(PacketType),
}

impl LinkError {
    /// Whether the broker sent a packet larger than the limit.
    pub(crate) const fn is_oversized(&self) -> bool {
        matches!(self, Self::PacketTooLarge { .. })
    }
}

/// Why a packet could not be queued; the connection itself is fine.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No CONNACK yet (or the link is down, or closing).
    #[error("not connected")]
    NotConnected,
    /// `MAX_INFLIGHT` (20) QoS 1 publishes await their PUBACK: wait for one.
    #[error("{MAX_INFLIGHT} publishes await their acknowledgement already")]
    InFlightFull,
    /// QoS 2 is not supported.
    #[error("QoS 2 is not supported")]
    Qos2,
    /// The packet cannot be encoded (a topic or payload too long for MQTT).
    #[error("cannot encode the packet: {0}")]
    Encode(mqttbytes::Error),
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No connection.
    Idle,
    /// CONNECT queued at `since`, no CONNACK yet.
    AwaitingConnAck { since: Instant },
    /// CONNACK received.
    Connected,
    /// DISCONNECT queued: nothing more goes out.
    Closing,
}

/// One client's MQTT state, without I/O: what to send (the output), what arrived (the input),
/// packet ids in flight, keep-alive. See the [module docs](self).
#[derive(Debug)]
pub struct ClientState<T> {
    options: ClientOptions,
    state: State,
    /// Bytes received and not yet decoded.
    read: BytesMut,
    /// Bytes of the frame being received that are still missing (a hint for growing `read`).
    missing: usize,
    /// Encoded packets not yet written.
    write: BytesMut,
    /// The outgoing payload, copied here so the reused `outgoing` can point at it.
    scratch: BytesMut,
    /// The PUBLISH being encoded, reused (its topic string keeps its capacity).
    outgoing: Publish,
    next_pkid: u16,
    /// QoS 1 publishes awaiting their PUBACK: (packet id, tag), oldest first.
    in_flight: heapless::Vec<(u16, T), MAX_INFLIGHT>,
    last_sent: Instant,
    last_received: Instant,
    /// When the unanswered PINGREQ went out.
    ping_sent: Option<Instant>,
}

impl<T: Copy> ClientState<T> {
    /// An idle client state; no buffer is allocated before [`begin`](Self::begin).
    pub fn new(options: ClientOptions) -> Self {
        let now = Instant::now();
        Self {
            options,
            state: State::Idle,
            read: BytesMut::new(),
            missing: 0,
            write: BytesMut::new(),
            scratch: BytesMut::new(),
            outgoing: Publish::from_bytes(String::new(), QoS::AtMostOnce, Bytes::new()),
            next_pkid: 0,
            in_flight: heapless::Vec::new(),
            last_sent: now,
            last_received: now,
            ping_sent: None,
        }
    }

    /// Starts a connection over a freshly opened link: queues the CONNECT (clean session).
    ///
    /// # Errors
    /// [`SendError::Encode`] if an id, topic or login is too long for MQTT;
    /// [`SendError::Qos2`] for a QoS 2 will.
    pub fn begin(&mut self, request: &ConnectRequest<'_>, now: Instant) -> Result<(), SendError> {
        self.reset();
        let mut connect = Connect::new(request.client_id);
        connect.clean_session = true;
        connect.keep_alive = u16::try_from(self.options.keep_alive.as_secs()).unwrap_or(u16::MAX);
        if let Some((username, password)) = request.login {
            connect.login = Some(Login::new(username, password));
        }
        if let Some(will) = request.will {
            if will.qos == QoS::ExactlyOnce {
                return Err(SendError::Qos2);
            }
            connect.last_will = Some(LastWill::new(
                will.topic,
                will.payload,
                will.qos,
                will.retain,
            ));
        }
        if self.read.capacity() == 0 {
            self.read = BytesMut::with_capacity(READ_BUFFER);
        }
        if self.write.capacity() == 0 {
            self.write = BytesMut::with_capacity(WRITE_BUFFER);
        }
        if self.scratch.capacity() == 0 {
            self.scratch = BytesMut::with_capacity(shared::MAX_PAYLOAD);
        }
        self.write.reserve(connect.size());
        connect.write(&mut self.write).map_err(SendError::Encode)?;
        self.state = State::AwaitingConnAck { since: now };
        self.last_sent = now;
        self.last_received = now;
        Ok(())
    }

    /// Whether the broker has accepted the connection (and no DISCONNECT is queued).
    pub(crate) fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Queues a PUBLISH; `dup` marks a QoS 1 message sent again after a lost connection.
    /// Returns its packet id (0 at QoS 0); a QoS 1 publish is reported back with `tag` when
    /// its PUBACK arrives.
    ///
    /// # Errors
    /// [`SendError`]: not connected, too many in flight, QoS 2, or not encodable. Nothing is
    /// queued then.
    pub fn publish(
        &mut self,
        message: &Message<'_>,
        dup: bool,
        tag: T,
        now: Instant,
    ) -> Result<u16, SendError> {
        if self.state != State::Connected {
            return Err(SendError::NotConnected);
        }
        let pkid = match message.qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce if self.in_flight.is_full() => return Err(SendError::InFlightFull),
            QoS::AtLeastOnce => self.free_pkid(),
            QoS::ExactlyOnce => return Err(SendError::Qos2),
        };
        // The scratch buffer is uniquely ours again (the last payload view was dropped), so
        // this reclaims its space instead of allocating.
        self.scratch.reserve(message.payload.len());
        self.scratch.extend_from_slice(message.payload);
        let outgoing = &mut self.outgoing;
        outgoing.topic.clear();
        outgoing.topic.push_str(message.topic);
        outgoing.payload = self.scratch.split().freeze();
        outgoing.qos = message.qos;
        outgoing.retain = message.retain;
        outgoing.dup = dup && pkid != 0;
        outgoing.pkid = pkid;
        self.write.reserve(outgoing.size());
        let written = outgoing.write(&mut self.write);
        outgoing.payload = Bytes::new();
        written.map_err(SendError::Encode)?;
        if pkid != 0 {
            // Cannot fail: checked above.
            let _ = self.in_flight.push((pkid, tag));
        }
        self.last_sent = now;
        Ok(pkid)
    }

    /// Queues a SUBSCRIBE to one filter; returns its packet id.
    ///
    /// # Errors
    /// [`SendError::NotConnected`] before the CONNACK; [`SendError::Encode`] for a filter too
    /// long for MQTT.
    pub fn subscribe(&mut self, filter: &str, qos: QoS, now: Instant) -> Result<u16, SendError> {
        if self.state != State::Connected {
            return Err(SendError::NotConnected);
        }
        let mut subscribe = Subscribe::new(filter, qos);
        subscribe.pkid = self.free_pkid();
        self.write.reserve(subscribe.size());
        subscribe
            .write(&mut self.write)
            .map_err(SendError::Encode)?;
        self.last_sent = now;
        Ok(subscribe.pkid)
    }

    /// Queues a DISCONNECT; nothing else can be queued after it.
    ///
    /// # Errors
    /// [`SendError::NotConnected`] before the CONNACK.
    pub fn disconnect(&mut self, now: Instant) -> Result<(), SendError> {
        if self.state != State::Connected {
            return Err(SendError::NotConnected);
        }
        Disconnect
            .write(&mut self.write)
            .map_err(SendError::Encode)?;
        self.state = State::Closing;
        self.last_sent = now;
        Ok(())
    }

    /// QoS 1 publishes awaiting their PUBACK.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether encoded packets wait to be written.
    pub(crate) fn has_output(&self) -> bool {
        !self.write.is_empty()
    }

    /// The encoded packets waiting to be written.
    fn output(&self) -> &[u8] {
        &self.write
    }

    /// `n` bytes of [`output`](Self::output) were written.
    fn wrote(&mut self, n: usize) {
        self.write.advance(n.min(self.write.len()));
        if self.write.is_empty() && self.write.capacity() > SHRINK_ABOVE {
            self.write = BytesMut::with_capacity(WRITE_BUFFER);
        }
    }

    /// The buffer to read into, with room for at least the rest of the frame being received
    /// (as far as its header told), or some room if nothing is known.
    fn read_buffer(&mut self) -> &mut BytesMut {
        let spare = self.read.capacity() - self.read.len();
        if spare == 0 || spare < self.missing {
            self.read.reserve(self.missing.max(READ_BUFFER / 2));
        }
        &mut self.read
    }

    /// Throws away what was received and not yet decoded (while closing).
    fn discard_input(&mut self) {
        self.read.clear();
        self.missing = 0;
    }

    /// Decodes the next complete packet received; `None` until one is complete. Answers
    /// PINGRESP and acknowledges incoming QoS 1 publishes by itself (the PUBACK joins the
    /// output).
    ///
    /// # Errors
    /// [`LinkError::PacketTooLarge`], [`LinkError::Malformed`], [`LinkError::Refused`],
    /// [`LinkError::Unexpected`]: the connection is over.
    pub fn next_incoming(&mut self, now: Instant) -> Result<Option<Incoming<T>>, LinkError> {
        loop {
            if self.read.is_empty() {
                if self.read.capacity() > SHRINK_ABOVE {
                    self.read = BytesMut::with_capacity(READ_BUFFER);
                }
                return Ok(None);
            }
            let packet = match Packet::read(&mut self.read, self.options.max_packet) {
                Ok(packet) => packet,
                Err(mqttbytes::Error::InsufficientBytes(missing)) => {
                    self.missing = missing;
                    return Ok(None);
                }
                Err(mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
                    return Err(LinkError::PacketTooLarge {
                        size,
                        max: self.options.max_packet,
                    });
                }
                Err(err) => return Err(LinkError::Malformed(err)),
            };
            self.missing = 0;
            self.last_received = now;
            if let Some(incoming) = self.on_packet(packet, now)? {
                return Ok(Some(incoming));
            }
        }
    }

    fn on_packet(
        &mut self,
        packet: Packet,
        now: Instant,
    ) -> Result<Option<Incoming<T>>, LinkError> {
        if let State::AwaitingConnAck { .. } = self.state {
            let Packet::ConnAck(ConnAck { code, .. }) = packet else {
                return Err(LinkError::Unexpected(packet_type(&packet)));
            };
            if code != ConnectReturnCode::Success {
                return Err(LinkError::Refused(code));
            }
            self.state = State::Connected;
            return Ok(Some(Incoming::ConnAck));
        }
        match packet {
            Packet::PingResp => {
                self.ping_sent = None;
                Ok(None)
            }
            Packet::PubAck(PubAck { pkid }) => {
                let tag = self
                    .in_flight
                    .iter()
                    .position(|&(p, _)| p == pkid)
                    .map(|i| self.in_flight.remove(i).1);
                Ok(Some(Incoming::PubAck { pkid, tag }))
            }
            Packet::SubAck(ack) => Ok(Some(Incoming::SubAck {
                pkid: ack.pkid,
                refused: ack
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, SubscribeReasonCode::Failure)),
            })),
            Packet::Publish(publish) => match publish.qos {
                QoS::AtMostOnce => Ok(Some(Incoming::Publish(publish))),
                QoS::AtLeastOnce => {
                    if self.state == State::Connected {
                        let ack = PubAck::new(publish.pkid);
                        self.write.reserve(ack.size());
                        ack.write(&mut self.write).map_err(LinkError::Malformed)?;
                        self.last_sent = now;
                    }
                    Ok(Some(Incoming::Publish(publish)))
                }
                QoS::ExactlyOnce => Err(LinkError::Unexpected(PacketType::Publish)),
            },
            other => Err(LinkError::Unexpected(packet_type(&other))),
        }
    }

    /// When [`on_timer`](Self::on_timer) has something to do next (`None` while idle). It
    /// only moves later as traffic flows, so a timer armed for it may fire early: call
    /// `on_timer` then and arm it for the new deadline.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Idle | State::Closing => None,
            State::AwaitingConnAck { since } => Some(since + self.options.connack_timeout),
            State::Connected => Some(match self.ping_sent {
                Some(sent) => sent + self.options.ping_timeout,
                None => self.last_sent.min(self.last_received) + self.options.keep_alive,
            }),
        }
    }

    /// Keep-alive and timeouts at `now`: queues a PINGREQ if the link has been quiet for the
    /// keep-alive (in either direction).
    ///
    /// # Errors
    /// [`LinkError::ConnAckTimeout`] or [`LinkError::PingTimeout`]: the connection is over.
    pub fn on_timer(&mut self, now: Instant) -> Result<(), LinkError> {
        match self.state {
            State::Idle | State::Closing => Ok(()),
            State::AwaitingConnAck { since } => {
                if now >= since + self.options.connack_timeout {
                    Err(LinkError::ConnAckTimeout(self.options.connack_timeout))
                } else {
                    Ok(())
                }
            }
            State::Connected => {
                if let Some(sent) = self.ping_sent {
                    if now >= sent + self.options.ping_timeout {
                        return Err(LinkError::PingTimeout(self.options.ping_timeout));
                    }
                } else if now >= self.last_sent.min(self.last_received) + self.options.keep_alive {
                    PingReq
                        .write(&mut self.write)
                        .map_err(LinkError::Malformed)?;
                    self.ping_sent = Some(now);
                    self.last_sent = now;
                }
                Ok(())
            }
        }
    }

    /// The link is gone: forgets the packets in flight and everything buffered (a clean
    /// session resumes nothing), and gives back the memory of a burst.
    pub fn reset(&mut self) {
        self.state = State::Idle;
        self.in_flight.clear();
        self.ping_sent = None;
        self.missing = 0;
        self.read.clear();
        self.write.clear();
        if self.read.capacity() > SHRINK_ABOVE {
            self.read = BytesMut::with_capacity(READ_BUFFER);
        }
        if self.write.capacity() > SHRINK_ABOVE {
            self.write = BytesMut::with_capacity(WRITE_BUFFER);
        }
    }

    /// A packet id not in flight, never 0.
    fn free_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            let pkid = self.next_pkid;
            if !self.in_flight.iter().any(|&(p, _)| p == pkid) {
                return pkid;
            }
        }
    }
}

fn packet_type(packet: &Packet) -> PacketType {
    match packet {
        Packet::Connect(_) => PacketType::Connect,
        Packet::ConnAck(_) => PacketType::ConnAck,
        Packet::Publish(_) => PacketType::Publish,
        Packet::PubAck(_) => PacketType::PubAck,
        Packet::PubRec(_) => PacketType::PubRec,
        Packet::PubRel(_) => PacketType::PubRel,
        Packet::PubComp(_) => PacketType::PubComp,
        Packet::Subscribe(_) => PacketType::Subscribe,
        Packet::SubAck(_) => PacketType::SubAck,
        Packet::Unsubscribe(_) => PacketType::Unsubscribe,
        Packet::UnsubAck(_) => PacketType::UnsubAck,
        Packet::PingReq => PacketType::PingReq,
        Packet::PingResp => PacketType::PingResp,
        Packet::Disconnect => PacketType::Disconnect,
    }
}

/// How to reach the broker over TLS: the rustls client configuration (the trusted CAs and,
/// with mutual TLS, the client certificate) and the name the broker's certificate must carry
/// (a DNS name or an IP address). Cheap to clone: the configuration is shared.
#[derive(Clone)]
pub struct TlsTarget {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl TlsTarget {
    /// TLS with `config`, expecting a certificate for `server_name`.
    pub fn new(
        config: std::sync::Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Self {
        Self {
            connector: TlsConnector::from(config),
            server_name,
        }
    }

    /// The name the broker's certificate must carry.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }
}

impl std::fmt::Debug for TlsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTarget")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A connection to the broker, moving a [`ClientState`]'s bytes: plain TCP
/// (`TCP_NODELAY`), or TLS over it.
#[derive(Debug)]
pub struct Link {
    stream: Stream,
}

/// The socket under a [`Link`].
#[derive(Debug)]
enum Stream {
    /// Plain TCP, driven by readiness (`try_read` / `try_write`), no copies.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the TLS session is large, and the plain path stays small).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Link {
    /// Connects to `host:port` within `timeout`, with `TCP_NODELAY`; over TLS if `tls` is
    /// given (the handshake is part of the `timeout`).
    ///
    /// # Errors
    /// [`LinkError::Io`], [`LinkError::ConnectTimeout`] or [`LinkError::TlsHandshake`].
    pub async fn connect(
        host: &str,
        port: u16,
        tls: Option<&TlsTarget>,
        timeout: Duration,
    ) -> Result<Self, LinkError> {
        let connecting = async {
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            let stream = match tls {
                None => Stream::Plain(stream),
                Some(tls) => Stream::Tls(Box::new(
                    tls.connector
                        .connect(tls.server_name.clone(), stream)
                        .await
                        .map_err(LinkError::TlsHandshake)?,
                )),
            };
            Ok(Self { stream })
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| LinkError::ConnectTimeout)?
    }

    /// Writes as much of the client state's output as the socket takes now, without waiting.
    ///
    /// # Errors
    /// [`LinkError::Io`], [`LinkError::Tls`] or [`LinkError::Closed`].
    pub fn write_now<T: Copy>(&mut self, client: &mut ClientState<T>) -> Result<(), LinkError> {
        match &mut self.stream {
            Stream::Plain(stream) => write_plain(stream, client),
            Stream::Tls(stream) => {
                // Polled once, without a waker to call: whatever the socket does not take now
                // is written by the next `exchange`, which waits with a real one.
                let mut cx = Context::from_waker(Waker::noop());
                match poll_write_tls(stream, &mut cx, client) {
                    Poll::Ready(Err(err)) => Err(err),
                    Poll::Ready(Ok(_)) | Poll::Pending => Ok(()),
                }
            }
        }
    }

    /// Waits until the socket can be read (or written, while the client has output), then
    /// writes what it can and reads what arrived into the client: take the packets with
    /// [`ClientState::next_incoming`]. Cancel safe: nothing is lost if it is dropped while
    /// waiting.
    ///
    /// # Errors
    /// [`LinkError::Io`], [`LinkError::Tls`] or [`LinkError::Closed`].
    pub async fn exchange<T: Copy>(
        &mut self,
        client: &mut ClientState<T>,
    ) -> Result<(), LinkError> {
        let stream = match &mut self.stream {
            Stream::Plain(stream) => return exchange_plain(stream, client).await,
            Stream::Tls(stream) => stream,
        };
        poll_fn(|cx| {
            let wrote = match poll_write_tls(stream, cx, client) {
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Ready(Ok(wrote)) => wrote,
                Poll::Pending => false,
            };
            let read = {
                let reading = pin!(stream.read_buf(client.read_buffer()));
                reading.poll(cx)
            };
            match read {
                Poll::Ready(Ok(0)) => Poll::Ready(Err(LinkError::Closed)),
                Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
                Poll::Ready(Err(err)) => Poll::Ready(Err(tls_error(err))),
                Poll::Pending if wrote => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Ends the connection cleanly: writes the rest of the output (a DISCONNECT last, see
    /// [`ClientState::disconnect`]), closes the sending side (over TLS after a
    /// `close_notify`), and waits until the broker has closed its side, discarding whatever
    /// it still sends. Put a timeout around it.
    ///
    /// # Errors
    /// [`LinkError::Io`] or [`LinkError::Tls`] if the socket fails on the way.
    pub async fn close<T: Copy>(mut self, client: &mut ClientState<T>) -> Result<(), LinkError> {
        match &mut self.stream {
            Stream::Plain(stream) => {
                while client.has_output() {
                    stream.writable().await?;
                    write_plain(stream, client)?;
                }
            }
            Stream::Tls(stream) => {
                while client.has_output() {
                    match stream.write(client.output()).await {
                        Ok(0) => return Err(LinkError::Closed),
                        Ok(n) => client.wrote(n),
                        Err(err) => return Err(tls_error(err)),
                    }
                }
            }
        }
        match &mut self.stream {
            Stream::Plain(stream) => {
                stream.shutdown().await?;
                loop {
                    stream.readable().await?;
                    match stream.try_read_buf(client.read_buffer()) {
                        Ok(0) => return Ok(()),
                        Ok(_) => client.discard_input(),
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(err) => return Err(err.into()),
                    }
                }
            }
            Stream::Tls(stream) => {
                stream.shutdown().await.map_err(tls_error)?;
                drain(stream, client).await
            }
        }
    }
}

/// Writes as much of the client's output as the TCP socket takes now, without waiting.
fn write_plain<T: Copy>(stream: &TcpStream, client: &mut ClientState<T>) -> Result<(), LinkError> {
    while client.has_output() {
        match stream.try_write(client.output()) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(n) => client.wrote(n),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// [`Link::exchange`] over plain TCP: readiness, then `try_write` / `try_read`.
async fn exchange_plain<T: Copy>(
    stream: &TcpStream,
    client: &mut ClientState<T>,
) -> Result<(), LinkError> {
    let interest = if client.has_output() {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    let ready = stream.ready(interest).await?;
    if ready.is_writable() {
        write_plain(stream, client)?;
    }
    if ready.is_readable() || ready.is_read_closed() {
        match stream.try_read_buf(client.read_buffer()) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// Hands the client's output to the TLS session as far as it takes it, and pushes the
/// session's records to the socket. `Ready(true)` if any output was taken; `Pending` (with
/// `cx` woken when the socket can take more) if the socket is full and nothing was taken.
fn poll_write_tls<S, T: Copy>(
    stream: &mut S,
    cx: &mut Context<'_>,
    client: &mut ClientState<T>,
) -> Poll<Result<bool, LinkError>>
where
    S: AsyncWrite + Unpin,
{
    let mut wrote = false;
    while client.has_output() {
        match Pin::new(&mut *stream).poll_write(cx, client.output()) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(LinkError::Closed)),
            Poll::Ready(Ok(n)) => {
                client.wrote(n);
                wrote = true;
            }
            Poll::Ready(Err(err)) => return Poll::Ready(Err(tls_error(err))),
            Poll::Pending => break,
        }
    }
    // Records the session holds back (the socket was full) go out as the socket takes them.
    match Pin::new(&mut *stream).poll_flush(cx) {
        Poll::Ready(Err(err)) => Poll::Ready(Err(tls_error(err))),
        Poll::Ready(Ok(())) => Poll::Ready(Ok(wrote)),
        Poll::Pending if wrote => Poll::Ready(Ok(true)),
        Poll::Pending => Poll::Pending,
    }
}

/// Reads and discards until the broker closes its side.
async fn drain<S, T: Copy>(stream: &mut S, client: &mut ClientState<T>) -> Result<(), LinkError>
where
    S: AsyncRead + Unpin,
{
    loop {
        match stream.read_buf(client.read_buffer()).await {
            Ok(0) => return Ok(()),
            Ok(_) => client.discard_input(),
            // The broker closed without a `close_notify`: closed all the same.
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(tls_error(err)),
        }
    }
}

/// An I/O error of a TLS stream as a [`LinkError`]: the TLS layer's own errors (alerts, bad
/// records) as [`LinkError::Tls`], an end without `close_notify` as [`LinkError::Closed`].
fn tls_error(err: io::Error) -> LinkError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        return LinkError::Closed;
    }
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => LinkError::Tls(tls.clone()),
        None => LinkError::Io(err),
    }
}

#[cfg(test)]
mod tests;
