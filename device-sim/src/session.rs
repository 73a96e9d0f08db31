//! A vehicle's MQTT 3.1.1 session: the protocol state machine, without I/O and without
//! allocation (`no_std`), shared by the simulator's runner and the firmware.
//!
//! A [`Session`] owns two fixed buffers, `RX` bytes for what arrives and `TX` bytes for what
//! goes out, and the protocol state: CONNECT (clean session, keep-alive, last will, login) and
//! the CONNACK timeout; keep-alive PINGREQ and the PINGRESP timeout; QoS 1 publishes with
//! packet ids, at most [`MAX_INFLIGHT`] unacknowledged, each carrying a tag of the caller's
//! (`T`) handed back with its PUBACK ([`Incoming::PubAck`]); SUBSCRIBE and SUBACK; incoming
//! publishes (a QoS 1 one acknowledged as it is taken); DISCONNECT.
//!
//! The driver (a tokio task in the simulator, an embassy task on the tracker) moves bytes and
//! time, nothing else:
//!
//! 1. [`Session::begin`] after the TCP connection is open (queues the CONNECT);
//! 2. writes [`Session::output`] to the socket and reports [`Session::wrote`];
//! 3. reads into [`Session::receive_buffer`] and reports [`Session::received`] (or hands
//!    bytes over with [`Session::feed`]), then takes packets with [`Session::next_incoming`]
//!    until it returns `Ok(None)`; an incoming publish borrows its topic and payload from the
//!    receive buffer (no copy);
//! 4. sleeps until [`Session::deadline`] and calls [`Session::on_timer`];
//! 5. on any [`SessionError`], or when the socket fails, drops the socket and calls
//!    [`Session::reset`] (clean sessions only: nothing is resumed; the caller publishes again
//!    what was unacknowledged, with `dup` set).
//!
//! Time is a monotonic millisecond count (`u64`) of the driver's choosing.
//!
//! # The codec
//! [`codec`] encodes and decodes the few MQTT 3.1.1 packets a vehicle needs itself, `no_std`
//! and without allocation: it encodes straight into the transmit buffer and decodes in
//! place from the receive buffer (byte ranges into it, no copy). It reads the fixed header
//! first (refusing an oversized packet before buffering it, and a packet type a client never
//! receives), checks that every field it reads is there, and refuses strings longer than
//! MQTT's two-byte lengths. It replaced [mqttrs] 0.4, whose packet enum takes 1.3 KB without
//! `std` (a `SUBSCRIBE` holds five 256-byte filters) and was built on the stack for every
//! packet: three of them inlined into the firmware's loop made its stack too large for the
//! device's 8 KiB of RAM (`docs/firmware.md`). mqttrs still checks it in the tests (the same
//! bytes, the same decoding), and so does rumqttc's codec. The property tests feed arbitrary
//! bytes to a session: errors, never a panic.
//!
//! [mqttrs]: https://docs.rs/mqttrs/0.4
//!
//! # Sizes
//! [`VehicleSession`] uses [`DEFAULT_RX`] (256) and [`DEFAULT_TX`] (512) bytes: the largest
//! packet a vehicle receives is a command publish (a topic of at most 80 bytes and a payload
//! of at most [`shared::MAX_PAYLOAD`] (128) bytes: 215 bytes with its headers); the largest
//! it sends is a CONNECT with will and login (under 400 bytes) or a sealed publish (215
//! bytes). A packet larger than the receive buffer (or than
//! [`SessionOptions::max_packet`]) ends the connection with [`SessionError::PacketTooLarge`],
//! detected from its fixed header. `size_of::<VehicleSession<T>>()` is about 1 KiB for a small
//! `T` (a test pins it).

pub mod codec;

use codec::{ConnectRefusal, PacketKind};

/// QoS 1 publishes awaiting their PUBACK at most.
pub const MAX_INFLIGHT: usize = 20;
/// The default receive buffer: a command publish (215 bytes at most) fits.
pub const DEFAULT_RX: usize = 256;
/// The default transmit buffer: a CONNECT with will and login, or two sealed publishes.
pub const DEFAULT_TX: usize = 512;
/// The default for [`SessionOptions::max_packet`]: no limit below the receive buffer's.
pub const MAX_PACKET: usize = 4096;
/// Bytes of the transmit buffer kept free for a PINGREQ and the DISCONNECT: a publish or a
/// subscription never takes them.
const RESERVE: usize = 4;

/// The longest topic a vehicle publishes on (`shared::topic::TopicName`'s capacity).
pub const MAX_TOPIC: usize = 80;
/// The largest PUBLISH a vehicle sends: a [`MAX_TOPIC`] topic, a [`shared::MAX_PAYLOAD`]
/// payload, QoS 1 (215 bytes). A driver that keeps [`Session::output_room`] at least this
/// large can always queue a command's answer or its goodbye.
pub const LARGEST_PUBLISH: usize = publish_len(MAX_TOPIC, shared::MAX_PAYLOAD, QoS::AtLeastOnce);

/// The encoded size of a PUBLISH of `topic_len` and `payload_len` bytes at `qos`.
pub const fn publish_len(topic_len: usize, payload_len: usize, qos: QoS) -> usize {
    codec::publish_len(topic_len, payload_len, qos)
}

/// A session with the default buffers, sized for a vehicle.
pub type VehicleSession<T> = Session<T, DEFAULT_RX, DEFAULT_TX>;

/// An MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QoS {
    /// At most once: no acknowledgement.
    AtMostOnce,
    /// At least once: acknowledged by a PUBACK, sent again (DUP) if it never came.
    AtLeastOnce,
    /// Exactly once: not supported by this session (refused when publishing).
    ExactlyOnce,
}

impl QoS {
    /// The QoS of a level (0, 1 or 2); `None` for any other.
    pub const fn from_level(level: u8) -> Option<Self> {
        match level {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// How a [`Session`] talks to its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// The keep-alive sent in CONNECT, in whole seconds (0: none): a PINGREQ goes out after
    /// this long without sending or receiving anything.
    pub keep_alive_secs: u16,
    /// How long a PINGRESP may take (ms) before the connection counts as dead.
    pub ping_timeout_ms: u64,
    /// How long the CONNACK may take (ms).
    pub connack_timeout_ms: u64,
    /// The largest incoming packet (remaining length) accepted; the receive buffer bounds it
    /// too. A larger one ends the connection.
    pub max_packet: usize,
}

impl SessionOptions {
    /// Keep-alive `keep_alive_secs`, a PINGRESP timeout of the same length, 5 s for the
    /// CONNACK, packets up to [`MAX_PACKET`] (or the receive buffer, if smaller).
    pub const fn new(keep_alive_secs: u16) -> Self {
        Self {
            keep_alive_secs,
            ping_timeout_ms: keep_alive_secs as u64 * 1000,
            connack_timeout_ms: 5000,
            max_packet: MAX_PACKET,
        }
    }

    /// The keep-alive in milliseconds.
    const fn keep_alive_ms(&self) -> u64 {
        self.keep_alive_secs as u64 * 1000
    }
}

/// An application message to publish (or to leave as the last will).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// The topic name.
    pub topic: &'a str,
    /// The payload.
    pub payload: &'a [u8],
    /// At most once or at least once ([`QoS::ExactlyOnce`] is refused).
    pub qos: QoS,
    /// Whether the broker retains it.
    pub retain: bool,
}

/// What a CONNECT carries besides the [`SessionOptions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRequest<'a> {
    /// The client id.
    pub client_id: &'a str,
    /// Username and password, if the broker wants a login.
    pub login: Option<(&'a str, &'a str)>,
    /// The last will, published by the broker if the connection dies without a DISCONNECT.
    pub will: Option<Message<'a>>,
}

/// A message from the broker, borrowed from the session's receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    /// The topic name.
    pub topic: &'a str,
    /// The payload.
    pub payload: &'a [u8],
    /// [`QoS::AtMostOnce`] or [`QoS::AtLeastOnce`].
    pub qos: QoS,
    /// The broker's packet id (0 at QoS 0).
    pub pkid: u16,
    /// Whether the broker sends it again.
    pub dup: bool,
    /// Whether it is a retained message.
    pub retain: bool,
}

/// A packet from the broker that the caller acts on (PINGRESP is handled inside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming<'a, T> {
    /// The broker accepted the connection: publishing and subscribing may start.
    ConnAck,
    /// A message on a subscribed topic. A QoS 1 one is already acknowledged (the PUBACK is
    /// in the output).
    Publish(Publish<'a>),
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

/// Why a connection is over. Every variant means: drop the socket, [`Session::reset`], and
/// connect again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The broker refused the connection (the CONNACK return code).
    #[error("the broker refused the connection: {0}")]
    Refused(ConnectRefusal),
    /// No CONNACK within [`SessionOptions::connack_timeout_ms`].
    #[error("no CONNACK within {ms} ms")]
    ConnAckTimeout {
        /// The timeout.
        ms: u64,
    },
    /// No PINGRESP within [`SessionOptions::ping_timeout_ms`].
    #[error("no PINGRESP within {ms} ms")]
    PingTimeout {
        /// The timeout.
        ms: u64,
    },
    /// The broker sent a packet larger than [`SessionOptions::max_packet`] or the receive
    /// buffer (told by its fixed header, before it is buffered).
    #[error("the broker sent a packet of {size} bytes, more than the {max} a vehicle accepts")]
    PacketTooLarge {
        /// Its remaining length.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The broker sent bytes that are not an MQTT 3.1.1 packet.
    #[error("malformed packet from the broker: {0}")]
    Malformed(&'static str),
    /// The broker sent a packet a client never expects here (or a QoS 2 publish, which this
    /// session never subscribes to).
    #[error("unexpected {0:?} packet from the broker")]
    Unexpected(PacketKind),
}

impl SessionError {
    /// Whether the broker sent a packet larger than the limit.
    pub const fn is_oversized(&self) -> bool {
        matches!(self, Self::PacketTooLarge { .. })
    }
}

/// Why a packet could not be queued; the connection itself is fine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No CONNACK yet (or no connection, or a DISCONNECT is queued).
    #[error("not connected")]
    NotConnected,
    /// [`MAX_INFLIGHT`] (20) QoS 1 publishes await their PUBACK: wait for one.
    #[error("{MAX_INFLIGHT} publishes await their acknowledgement already")]
    InFlightFull,
    /// QoS 2 is not supported.
    #[error("QoS 2 is not supported")]
    Qos2,
    /// The transmit buffer has no room for the packet now: write the output, then try again.
    #[error("the transmit buffer is full")]
    OutputFull,
    /// The packet cannot be encoded: a string longer than MQTT allows, or a packet larger
    /// than the whole transmit buffer.
    #[error("cannot encode the packet: {0}")]
    Encode(&'static str),
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No connection.
    Idle,
    /// CONNECT queued at `since` (ms), no CONNACK yet.
    AwaitingConnAck { since: u64 },
    /// CONNACK received.
    Connected,
    /// DISCONNECT queued: nothing more goes out.
    Closing,
}

/// One vehicle's MQTT session, without I/O: `RX` bytes of receive buffer, `TX` bytes of
/// transmit buffer, packet ids in flight with their tags (`T`), keep-alive. See the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct Session<T, const RX: usize = DEFAULT_RX, const TX: usize = DEFAULT_TX> {
    options: SessionOptions,
    state: State,
    /// Received bytes: `rx[rx_start..rx_end]` not yet taken.
    rx: [u8; RX],
    rx_start: usize,
    rx_end: usize,
    /// Bytes of the packet last returned by `next_incoming` (still borrowed by the caller),
    /// dropped on the next call.
    rx_taken: usize,
    /// Encoded packets: `tx[tx_start..tx_end]` not yet written.
    tx: [u8; TX],
    tx_start: usize,
    tx_end: usize,
    /// The last packet id handed out.
    next_pkid: u16,
    /// QoS 1 publishes awaiting their PUBACK: (packet id, tag), oldest first.
    in_flight: heapless::Vec<(u16, T), MAX_INFLIGHT>,
    /// When something was last sent or received (ms).
    last_sent: u64,
    last_received: u64,
    /// When the unanswered PINGREQ went out (ms).
    ping_sent: Option<u64>,
}

impl<T: Copy, const RX: usize, const TX: usize> Session<T, RX, TX> {
    /// An idle session.
    pub const fn new(options: SessionOptions) -> Self {
        Self {
            options,
            state: State::Idle,
            rx: [0; RX],
            rx_start: 0,
            rx_end: 0,
            rx_taken: 0,
            tx: [0; TX],
            tx_start: 0,
            tx_end: 0,
            next_pkid: 0,
            in_flight: heapless::Vec::new(),
            last_sent: 0,
            last_received: 0,
            ping_sent: None,
        }
    }

    /// The options it was made with.
    pub const fn options(&self) -> &SessionOptions {
        &self.options
    }

    /// Starts a connection over a freshly opened socket at `now` (ms): forgets the last one
    /// ([`reset`](Self::reset)) and queues the CONNECT (clean session).
    ///
    /// # Errors
    /// [`SendError::Encode`] if an id, topic or login is too long for MQTT or the CONNECT
    /// does not fit the transmit buffer; [`SendError::Qos2`] for a QoS 2 will. Nothing is
    /// queued then, and the session stays idle.
    pub fn begin(&mut self, request: &ConnectRequest<'_>, now: u64) -> Result<(), SendError> {
        self.reset();
        let n = codec::encode_connect(request, self.options.keep_alive_secs, &mut self.tx)?;
        self.tx_end = n;
        self.state = State::AwaitingConnAck { since: now };
        self.last_sent = now;
        self.last_received = now;
        Ok(())
    }

    /// Whether the broker has accepted the connection (and no DISCONNECT is queued).
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Whether there is no connection at all (before [`begin`](Self::begin), after
    /// [`reset`](Self::reset)).
    pub fn is_idle(&self) -> bool {
        self.state == State::Idle
    }

    /// Queues a PUBLISH at `now` (ms); `dup` marks a QoS 1 message sent again after a lost
    /// connection (ignored at QoS 0). Returns its packet id, `None` at QoS 0; a QoS 1 publish
    /// is reported back with `tag` when its PUBACK arrives.
    ///
    /// # Errors
    /// [`SendError`]: not connected, too many in flight, QoS 2, no room in the transmit
    /// buffer now ([`SendError::OutputFull`]), or not encodable. Nothing is queued then.
    pub fn publish(
        &mut self,
        message: &Message<'_>,
        dup: bool,
        tag: T,
        now: u64,
    ) -> Result<Option<u16>, SendError> {
        if self.state != State::Connected {
            return Err(SendError::NotConnected);
        }
        let pkid = match message.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce if self.in_flight.is_full() => return Err(SendError::InFlightFull),
            QoS::AtLeastOnce => Some(self.free_pkid()),
            QoS::ExactlyOnce => return Err(SendError::Qos2),
        };
        let len = codec::publish_len(message.topic.len(), message.payload.len(), message.qos);
        let at = self.make_room(len, RESERVE)?;
        let n = codec::encode_publish(message, pkid, dup, &mut self.tx[at..TX - RESERVE])?;
        self.tx_end = at + n;
        if let Some(pkid) = pkid {
            // Cannot fail: checked above.
            let _ = self.in_flight.push((pkid, tag));
        }
        self.last_sent = now;
        Ok(pkid)
    }

    /// Whether a publish of `topic_len` and `payload_len` bytes at `qos` fits the transmit
    /// buffer now (in flight permitting): check before taking a message off a queue.
    pub fn can_publish(&self, topic_len: usize, payload_len: usize, qos: QoS) -> bool {
        let len = codec::publish_len(topic_len, payload_len, qos);
        self.state == State::Connected
            && (qos != QoS::AtLeastOnce || !self.in_flight.is_full())
            && len <= self.output_room()
    }

    /// Bytes of the transmit buffer a publish or subscription can take now (the unwritten
    /// output moved to the front); compare with [`publish_len`].
    pub fn output_room(&self) -> usize {
        TX.saturating_sub(self.tx_end - self.tx_start + RESERVE)
    }

    /// Queues a SUBSCRIBE to one filter at `now` (ms); returns its packet id.
    ///
    /// # Errors
    /// [`SendError::NotConnected`] before the CONNACK; [`SendError::Qos2`];
    /// [`SendError::OutputFull`]; [`SendError::Encode`] for a filter longer than 256 bytes.
    pub fn subscribe(&mut self, filter: &str, qos: QoS, now: u64) -> Result<u16, SendError> {
        if self.state != State::Connected {
            return Err(SendError::NotConnected);
        }
        if qos == QoS::ExactlyOnce {
            return Err(SendError::Qos2);
        }
        let len = codec::subscribe_len(filter.len());
        let at = self.make_room(len, RESERVE)?;
        let pkid = self.free_pkid();
        let n = codec::encode_subscribe(filter, qos, pkid, &mut self.tx[at..TX - RESERVE])?;
        self.tx_end = at + n;
        self.last_sent = now;
        Ok(pkid)
    }

    /// Queues a DISCONNECT at `now` (ms); nothing else can be queued after it, and the
    /// timers stop.
    ///
    /// # Errors
    /// [`SendError::NotConnected`] before the CONNACK (or after a DISCONNECT).
    pub fn disconnect(&mut self, now: u64) -> Result<(), SendError> {
        if self.state != State::Connected {
            return Err(SendError::NotConnected);
        }
        // The reserve keeps room for it.
        let at = self.make_room(2, 0)?;
        self.tx[at..at + 2].copy_from_slice(&codec::DISCONNECT);
        self.tx_end = at + 2;
        self.state = State::Closing;
        self.last_sent = now;
        Ok(())
    }

    /// QoS 1 publishes awaiting their PUBACK.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether encoded packets wait to be written.
    pub fn has_output(&self) -> bool {
        self.tx_end > self.tx_start
    }

    /// The encoded packets waiting to be written, oldest first.
    pub fn output(&self) -> &[u8] {
        &self.tx[self.tx_start..self.tx_end]
    }

    /// The first `n` bytes of [`output`](Self::output) were written (more than there are
    /// counts as all).
    pub fn wrote(&mut self, n: usize) {
        self.tx_start = (self.tx_start + n).min(self.tx_end);
        if self.tx_start == self.tx_end {
            self.tx_start = 0;
            self.tx_end = 0;
        }
    }

    /// The free part of the receive buffer: read into it, then report how much with
    /// [`received`](Self::received). Empty while the buffer holds only complete packets not
    /// yet taken: take them with [`next_incoming`](Self::next_incoming) first (never read
    /// into an empty slice: a read of 0 bytes would look like a closed socket).
    pub fn receive_buffer(&mut self) -> &mut [u8] {
        self.drop_taken();
        if self.rx_start > 0 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        &mut self.rx[self.rx_end..]
    }

    /// `n` bytes were read into [`receive_buffer`](Self::receive_buffer) (at most its
    /// length counts).
    pub fn received(&mut self, n: usize) {
        self.rx_end = (self.rx_end + n).min(RX);
    }

    /// Copies as much of `bytes` into the receive buffer as fits; returns how many bytes it
    /// took (0 when full: take packets with [`next_incoming`](Self::next_incoming) first).
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let free = self.receive_buffer();
        let n = free.len().min(bytes.len());
        free[..n].copy_from_slice(&bytes[..n]);
        self.received(n);
        n
    }

    /// Throws away everything received and not yet taken (while closing).
    pub fn discard_input(&mut self) {
        self.rx_start = 0;
        self.rx_end = 0;
        self.rx_taken = 0;
    }

    /// Decodes the next complete packet received at `now` (ms); `None` until one is complete
    /// (or while the transmit buffer has no room for the PUBACK of a QoS 1 publish: write the
    /// output first). Handles PINGRESP by itself and acknowledges an incoming QoS 1 publish
    /// (the PUBACK joins the output). The packet borrows the receive buffer until the next
    /// call.
    ///
    /// # Errors
    /// [`SessionError::PacketTooLarge`], [`SessionError::Malformed`],
    /// [`SessionError::Refused`], [`SessionError::Unexpected`]: the connection is over.
    pub fn next_incoming(&mut self, now: u64) -> Result<Option<Incoming<'_, T>>, SessionError> {
        self.drop_taken();
        loop {
            let max = self.options.max_packet;
            let frame = match codec::frame(&self.rx[self.rx_start..self.rx_end], max, RX)? {
                None => return Ok(None),
                Some(frame) => frame,
            };
            let start = self.rx_start;
            let bytes = &self.rx[start..start + frame.total];
            let packet = codec::decode(bytes, &frame)?;
            if let codec::Packet::Publish {
                qos: QoS::AtLeastOnce,
                ..
            } = packet
                && self.state == State::Connected
                && TX - (self.tx_end - self.tx_start) < 4 + RESERVE
            {
                // No room for its PUBACK now: leave it where it is until the output moves.
                return Ok(None);
            }
            self.last_received = now;
            match self.on_packet(packet, now)? {
                Some(incoming) => {
                    self.rx_taken = frame.total;
                    return Ok(Some(self.incoming(incoming, start, frame.total)));
                }
                None => {
                    self.rx_start += frame.total;
                }
            }
        }
    }

    /// When [`on_timer`](Self::on_timer) has something to do next (ms); `None` while idle,
    /// closing, or connected without a keep-alive. It only moves later as traffic flows, so
    /// a timer armed for it may fire early: call `on_timer` then and arm it again.
    pub fn deadline(&self) -> Option<u64> {
        match self.state {
            State::Idle | State::Closing => None,
            State::AwaitingConnAck { since } => {
                Some(since.saturating_add(self.options.connack_timeout_ms))
            }
            State::Connected => match self.ping_sent {
                Some(sent) => Some(sent.saturating_add(self.options.ping_timeout_ms)),
                None if self.options.keep_alive_secs == 0 => None,
                None => Some(
                    self.last_sent
                        .min(self.last_received)
                        .saturating_add(self.options.keep_alive_ms()),
                ),
            },
        }
    }

    /// Keep-alive and timeouts at `now` (ms): queues a PINGREQ if the connection has been
    /// quiet for the keep-alive (in either direction).
    ///
    /// # Errors
    /// [`SessionError::ConnAckTimeout`] or [`SessionError::PingTimeout`]: the connection is
    /// over.
    pub fn on_timer(&mut self, now: u64) -> Result<(), SessionError> {
        let Some(deadline) = self.deadline() else {
            return Ok(());
        };
        if now < deadline {
            return Ok(());
        }
        match self.state {
            State::AwaitingConnAck { .. } => Err(SessionError::ConnAckTimeout {
                ms: self.options.connack_timeout_ms,
            }),
            State::Connected if self.ping_sent.is_some() => Err(SessionError::PingTimeout {
                ms: self.options.ping_timeout_ms,
            }),
            State::Connected => {
                // The reserve keeps room for it: only one PINGREQ is ever unanswered.
                if let Ok(at) = self.make_room(2, 2) {
                    self.tx[at..at + 2].copy_from_slice(&codec::PINGREQ);
                    self.tx_end = at + 2;
                }
                self.ping_sent = Some(now);
                self.last_sent = now;
                Ok(())
            }
            State::Idle | State::Closing => Ok(()),
        }
    }

    /// The connection is gone: forgets the packets in flight and everything buffered (a
    /// clean session resumes nothing). Packet ids go on from where they were.
    pub fn reset(&mut self) {
        self.state = State::Idle;
        self.in_flight.clear();
        self.ping_sent = None;
        self.discard_input();
        self.tx_start = 0;
        self.tx_end = 0;
    }

    /// Drops the packet the caller was handed last.
    fn drop_taken(&mut self) {
        self.rx_start += self.rx_taken;
        self.rx_taken = 0;
        if self.rx_start >= self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
    }

    /// Makes `len` bytes of room at the end of the output, keeping `reserve` bytes free
    /// after them (moving the unwritten output to the front if need be); returns where the
    /// packet goes.
    fn make_room(&mut self, len: usize, reserve: usize) -> Result<usize, SendError> {
        if len + reserve > TX {
            return Err(SendError::Encode("larger than the transmit buffer"));
        }
        if TX - self.tx_end < len + reserve && self.tx_start > 0 {
            self.tx.copy_within(self.tx_start..self.tx_end, 0);
            self.tx_end -= self.tx_start;
            self.tx_start = 0;
        }
        if TX - self.tx_end < len + reserve {
            return Err(SendError::OutputFull);
        }
        Ok(self.tx_end)
    }

    /// Acts on a decoded packet; returns what the caller is to see of it.
    fn on_packet(
        &mut self,
        packet: codec::Packet,
        now: u64,
    ) -> Result<Option<Received<T>>, SessionError> {
        if let State::AwaitingConnAck { .. } = self.state {
            let codec::Packet::ConnAck { refusal } = packet else {
                return Err(SessionError::Unexpected(packet.kind()));
            };
            if let Some(refusal) = refusal {
                return Err(SessionError::Refused(refusal));
            }
            self.state = State::Connected;
            return Ok(Some(Received::ConnAck));
        }
        match packet {
            codec::Packet::PingResp => {
                self.ping_sent = None;
                Ok(None)
            }
            codec::Packet::PubAck { pkid } => {
                let tag = self
                    .in_flight
                    .iter()
                    .position(|&(p, _)| p == pkid)
                    .map(|i| self.in_flight.remove(i).1);
                Ok(Some(Received::PubAck { pkid, tag }))
            }
            codec::Packet::SubAck { pkid, refused } => Ok(Some(Received::SubAck { pkid, refused })),
            codec::Packet::Publish {
                qos,
                pkid,
                dup,
                retain,
                topic,
                payload,
            } => {
                if qos == QoS::AtLeastOnce && self.state == State::Connected {
                    // Room checked by the caller.
                    if let Ok(at) = self.make_room(4, RESERVE) {
                        codec::encode_puback(pkid, &mut self.tx[at..at + 4]);
                        self.tx_end = at + 4;
                        self.last_sent = now;
                    }
                }
                Ok(Some(Received::Publish {
                    qos,
                    pkid,
                    dup,
                    retain,
                    topic,
                    payload,
                }))
            }
            other @ codec::Packet::ConnAck { .. } => Err(SessionError::Unexpected(other.kind())),
        }
    }

    /// The caller's view of a packet at `rx[start..start + len]`.
    fn incoming(&self, received: Received<T>, start: usize, len: usize) -> Incoming<'_, T> {
        match received {
            Received::ConnAck => Incoming::ConnAck,
            Received::PubAck { pkid, tag } => Incoming::PubAck { pkid, tag },
            Received::SubAck { pkid, refused } => Incoming::SubAck { pkid, refused },
            Received::Publish {
                qos,
                pkid,
                dup,
                retain,
                topic,
                payload,
            } => {
                let frame = &self.rx[start..start + len];
                let topic = frame.get(topic.0..topic.1).unwrap_or_default();
                Incoming::Publish(Publish {
                    // Checked by the codec: valid UTF-8.
                    topic: core::str::from_utf8(topic).unwrap_or_default(),
                    payload: frame.get(payload.0..payload.1).unwrap_or_default(),
                    qos,
                    pkid,
                    dup,
                    retain,
                })
            }
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

/// A decoded packet for the caller, its byte ranges relative to its frame.
#[derive(Debug, Clone, Copy)]
enum Received<T> {
    ConnAck,
    PubAck {
        pkid: u16,
        tag: Option<T>,
    },
    SubAck {
        pkid: u16,
        refused: bool,
    },
    Publish {
        qos: QoS,
        pkid: u16,
        dup: bool,
        retain: bool,
        topic: (usize, usize),
        payload: (usize, usize),
    },
}

#[cfg(test)]
mod tests;
