//! The session's packets on the wire: the fixed header read here first (type, size limit),
//! then the fields of exactly one frame checked and decoded in place (byte ranges, no copy);
//! and the few packets a vehicle sends, encoded straight into the transmit buffer. No packet
//! is ever built as a value on the stack (see the [session docs](super) for why).

use super::{ConnectRequest, Message, QoS, SendError, SessionError};

/// A PINGREQ.
pub(crate) const PINGREQ: [u8; 2] = [0xC0, 0];
/// A DISCONNECT.
pub(crate) const DISCONNECT: [u8; 2] = [0xE0, 0];

/// Why the broker refused a connection: the CONNACK return codes 1 to 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ConnectRefusal {
    /// 1: the broker does not speak MQTT 3.1.1.
    #[error("unacceptable protocol version")]
    ProtocolVersion,
    /// 2: the client id is not allowed.
    #[error("client identifier rejected")]
    IdentifierRejected,
    /// 3: the MQTT service is unavailable.
    #[error("server unavailable")]
    ServerUnavailable,
    /// 4: wrong username or password.
    #[error("bad username or password")]
    BadCredentials,
    /// 5: the client may not connect.
    #[error("not authorized")]
    NotAuthorized,
}

/// An MQTT control packet type, for [`SessionError::Unexpected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketKind {
    /// CONNECT (1).
    Connect,
    /// CONNACK (2).
    ConnAck,
    /// PUBLISH (3).
    Publish,
    /// PUBACK (4).
    PubAck,
    /// PUBREC (5).
    PubRec,
    /// PUBREL (6).
    PubRel,
    /// PUBCOMP (7).
    PubComp,
    /// SUBSCRIBE (8).
    Subscribe,
    /// SUBACK (9).
    SubAck,
    /// UNSUBSCRIBE (10).
    Unsubscribe,
    /// UNSUBACK (11).
    UnsubAck,
    /// PINGREQ (12).
    PingReq,
    /// PINGRESP (13).
    PingResp,
    /// DISCONNECT (14).
    Disconnect,
}

impl PacketKind {
    /// The type of a fixed header's first byte; `None` for the reserved types 0 and 15.
    pub const fn of(first: u8) -> Option<Self> {
        Some(match first >> 4 {
            1 => Self::Connect,
            2 => Self::ConnAck,
            3 => Self::Publish,
            4 => Self::PubAck,
            5 => Self::PubRec,
            6 => Self::PubRel,
            7 => Self::PubComp,
            8 => Self::Subscribe,
            9 => Self::SubAck,
            10 => Self::Unsubscribe,
            11 => Self::UnsubAck,
            12 => Self::PingReq,
            13 => Self::PingResp,
            14 => Self::Disconnect,
            _ => return None,
        })
    }
}

/// The fixed header of a packet whose bytes are all buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    /// The first byte: type and flags.
    pub(crate) first: u8,
    /// Bytes of the fixed header (2 to 5).
    pub(crate) header_len: usize,
    /// The remaining length.
    pub(crate) remaining: usize,
    /// The whole packet's size.
    pub(crate) total: usize,
}

/// The next complete packet at the start of `buf`, from its fixed header: `None` while it is
/// incomplete.
///
/// # Errors
/// [`SessionError::PacketTooLarge`] as soon as the remaining length says the packet is larger
/// than `max_packet` or does not fit `rx` bytes; [`SessionError::Unexpected`] for a type a
/// client never receives; [`SessionError::Malformed`] for a reserved type or a remaining
/// length of more than four bytes.
pub(crate) fn frame(
    buf: &[u8],
    max_packet: usize,
    rx: usize,
) -> Result<Option<Frame>, SessionError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some(kind) = PacketKind::of(first) else {
        return Err(SessionError::Malformed("reserved packet type"));
    };
    if !matches!(
        kind,
        PacketKind::ConnAck
            | PacketKind::Publish
            | PacketKind::PubAck
            | PacketKind::SubAck
            | PacketKind::PingResp
    ) {
        return Err(SessionError::Unexpected(kind));
    }
    let mut remaining = 0usize;
    let mut header_len = None;
    for (i, shift) in [0u32, 7, 14, 21].into_iter().enumerate() {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            header_len = Some(2 + i);
            break;
        }
    }
    let Some(header_len) = header_len else {
        return Err(SessionError::Malformed(
            "remaining length longer than four bytes",
        ));
    };
    let max = max_packet.min(rx.saturating_sub(header_len));
    if remaining > max {
        return Err(SessionError::PacketTooLarge {
            size: remaining,
            max,
        });
    }
    let total = header_len + remaining;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(Frame {
        first,
        header_len,
        remaining,
        total,
    }))
}

/// A packet a client receives, its byte ranges relative to the start of its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Packet {
    /// CONNACK: accepted (`None`) or refused.
    ConnAck { refusal: Option<ConnectRefusal> },
    /// PUBACK.
    PubAck { pkid: u16 },
    /// SUBACK: whether any filter was refused.
    SubAck { pkid: u16, refused: bool },
    /// PINGRESP.
    PingResp,
    /// PUBLISH at QoS 0 or 1 (packet id 0 at QoS 0).
    Publish {
        qos: QoS,
        pkid: u16,
        dup: bool,
        retain: bool,
        topic: (usize, usize),
        payload: (usize, usize),
    },
}

impl Packet {
    /// Its type.
    pub(crate) const fn kind(&self) -> PacketKind {
        match self {
            Self::ConnAck { .. } => PacketKind::ConnAck,
            Self::PubAck { .. } => PacketKind::PubAck,
            Self::SubAck { .. } => PacketKind::SubAck,
            Self::PingResp => PacketKind::PingResp,
            Self::Publish { .. } => PacketKind::Publish,
        }
    }
}

/// Decodes the packet `bytes` (exactly the frame `frame` tells), in place: the result
/// holds byte ranges, no copy, and nothing large is built on the stack.
///
/// # Errors
/// [`SessionError::Malformed`] for a packet that is not valid MQTT 3.1.1 (too short for its
/// fields, a bad flag, QoS or return code, a topic that is not UTF-8, packet id 0, more than
/// five SUBACK return codes); [`SessionError::Unexpected`] for a QoS 2 publish.
pub(crate) fn decode(bytes: &[u8], frame: &Frame) -> Result<Packet, SessionError> {
    let body = bytes.get(frame.header_len..frame.total).unwrap_or_default();
    let kind = PacketKind::of(frame.first);
    // Every field read below must be there.
    let fits = match kind {
        Some(PacketKind::ConnAck | PacketKind::PubAck) => frame.remaining == 2,
        Some(PacketKind::SubAck) => frame.remaining >= 3,
        Some(PacketKind::PingResp) => frame.remaining == 0,
        Some(PacketKind::Publish) => match body {
            [hi, lo, ..] => {
                let pkid_len = if frame.first & 0b0110 == 0 { 0 } else { 2 };
                2 + usize::from(u16::from_be_bytes([*hi, *lo])) + pkid_len <= frame.remaining
            }
            _ => false,
        },
        _ => false,
    };
    if !fits || body.len() != frame.remaining {
        return Err(SessionError::Malformed("packet too short for its fields"));
    }
    let flags = frame.first & 0b1111;
    match kind {
        Some(PacketKind::Publish) => decode_publish(body, frame),
        _ if flags != 0 => Err(SessionError::Malformed("bad fixed header flags")),
        Some(PacketKind::ConnAck) => Ok(Packet::ConnAck {
            refusal: match body[1] {
                0 => None,
                1 => Some(ConnectRefusal::ProtocolVersion),
                2 => Some(ConnectRefusal::IdentifierRejected),
                3 => Some(ConnectRefusal::ServerUnavailable),
                4 => Some(ConnectRefusal::BadCredentials),
                5 => Some(ConnectRefusal::NotAuthorized),
                _ => return Err(SessionError::Malformed("unknown CONNACK return code")),
            },
        }),
        Some(PacketKind::PubAck) => Ok(Packet::PubAck {
            pkid: read_pkid(body)?,
        }),
        Some(PacketKind::SubAck) => {
            let pkid = read_pkid(body)?;
            let mut refused = false;
            for (i, &code) in body[2..].iter().enumerate() {
                match code {
                    0x80 => refused = true,
                    0..=2 => {}
                    _ => return Err(SessionError::Malformed("QoS 3")),
                }
                if i >= MAX_SUBACK_CODES {
                    return Err(SessionError::Malformed("bad length"));
                }
            }
            Ok(Packet::SubAck { pkid, refused })
        }
        Some(PacketKind::PingResp) => Ok(Packet::PingResp),
        // The type was checked by `frame`: a client receives nothing else.
        _ => Err(SessionError::Malformed("packet type and body disagree")),
    }
}

/// Return codes of one SUBACK at most (one per filter of a SUBSCRIBE; this session
/// subscribes to one filter at a time, and mqttrs, which decoded them before, held five).
const MAX_SUBACK_CODES: usize = 5;

/// Decodes a PUBLISH whose `body` (after the fixed header) was checked to hold the topic
/// and the packet id its QoS needs.
fn decode_publish(body: &[u8], frame: &Frame) -> Result<Packet, SessionError> {
    let qos = match (frame.first >> 1) & 0b11 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return Err(SessionError::Malformed("QoS 3")),
    };
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    if core::str::from_utf8(&body[2..2 + topic_len]).is_err() {
        return Err(SessionError::Malformed("a string that is not UTF-8"));
    }
    let (pkid, pkid_len) = match qos {
        QoS::AtMostOnce => (0, 0),
        QoS::AtLeastOnce | QoS::ExactlyOnce => (read_pkid(&body[2 + topic_len..])?, 2),
    };
    if qos == QoS::ExactlyOnce {
        return Err(SessionError::Unexpected(PacketKind::Publish));
    }
    // Relative to the start of the frame: the topic after its length, the payload after
    // the packet id, up to the end of the frame.
    let topic_start = frame.header_len + 2;
    let topic_end = topic_start + topic_len;
    Ok(Packet::Publish {
        qos,
        pkid,
        dup: frame.first & 0b1000 != 0,
        retain: frame.first & 1 != 0,
        topic: (topic_start, topic_end),
        payload: (topic_end + pkid_len, frame.total),
    })
}

/// The packet id at the start of `field` (checked to be there), never 0.
fn read_pkid(field: &[u8]) -> Result<u16, SessionError> {
    match field {
        [hi, lo, ..] if [*hi, *lo] != [0, 0] => Ok(u16::from_be_bytes([*hi, *lo])),
        [_, _, ..] => Err(SessionError::Malformed("packet id 0")),
        _ => Err(SessionError::Malformed("packet too short for its fields")),
    }
}

/// Bytes of a remaining length's encoding.
const fn length_len(remaining: usize) -> usize {
    match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The encoded size of a PUBLISH.
pub(crate) const fn publish_len(topic_len: usize, payload_len: usize, qos: QoS) -> usize {
    let pkid = match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce | QoS::ExactlyOnce => 2,
    };
    let remaining = 2 + topic_len + pkid + payload_len;
    1 + length_len(remaining) + remaining
}

/// The encoded size of a SUBSCRIBE to one filter.
pub(crate) const fn subscribe_len(filter_len: usize) -> usize {
    let remaining = 2 + 2 + filter_len + 1;
    1 + length_len(remaining) + remaining
}

/// Refuses a string or binary field longer than MQTT's two-byte length (it would be written
/// cut to 16 bits).
fn check_field(field: &[u8], what: &'static str) -> Result<(), SendError> {
    if field.len() > usize::from(u16::MAX) {
        Err(SendError::Encode(what))
    } else {
        Ok(())
    }
}

/// The largest remaining length MQTT can express (four bytes of it).
const MAX_REMAINING: usize = 268_435_455;

/// Writes packets into a slice known to be large enough (checked before with the packet's
/// size): the cursor of the encoders below.
struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn u8(&mut self, byte: u8) {
        self.buf[self.at] = byte;
        self.at += 1;
    }

    fn u16(&mut self, value: u16) {
        self.bytes(&value.to_be_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }

    /// A string or binary field: its two-byte length (checked by [`check_field`]), then
    /// its bytes.
    fn field(&mut self, field: &[u8]) {
        self.u16(field.len() as u16);
        self.bytes(field);
    }

    /// The fixed header: `first`, then `remaining` in one to four bytes.
    fn header(&mut self, first: u8, remaining: usize) {
        self.u8(first);
        let mut rest = remaining;
        loop {
            let byte = (rest % 128) as u8;
            rest /= 128;
            if rest == 0 {
                self.u8(byte);
                break;
            }
            self.u8(byte | 0x80);
        }
    }
}

/// A writer for a packet of `remaining` bytes after its fixed header at the start of
/// `buf`, and the packet's whole size.
///
/// # Errors
/// [`SendError::OutputFull`] if it does not fit `buf`; [`SendError::Encode`] if MQTT cannot
/// express its length.
fn writer(buf: &mut [u8], remaining: usize) -> Result<(Writer<'_>, usize), SendError> {
    if remaining > MAX_REMAINING {
        return Err(SendError::Encode("bad length"));
    }
    let total = 1 + length_len(remaining) + remaining;
    if buf.len() < total {
        return Err(SendError::OutputFull);
    }
    Ok((Writer { buf, at: 0 }, total))
}

/// The QoS bits of a QoS.
const fn qos_bits(qos: QoS) -> u8 {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

/// Encodes the CONNECT of `request` (clean session) into `buf`; returns its size.
pub(crate) fn encode_connect(
    request: &ConnectRequest<'_>,
    keep_alive_secs: u16,
    buf: &mut [u8],
) -> Result<usize, SendError> {
    check_field(request.client_id.as_bytes(), "client id too long")?;
    if let Some((username, password)) = request.login {
        check_field(username.as_bytes(), "username too long")?;
        check_field(password.as_bytes(), "password too long")?;
    }
    // Protocol name and level, flags, keep-alive, the client id.
    let mut remaining = 6 + 1 + 1 + 2 + 2 + request.client_id.len();
    // Clean session.
    let mut flags = 0b10;
    if let Some(will) = &request.will {
        if will.qos == QoS::ExactlyOnce {
            return Err(SendError::Qos2);
        }
        check_field(will.topic.as_bytes(), "will topic too long")?;
        check_field(will.payload, "will payload too long")?;
        flags |= 0b100 | qos_bits(will.qos) << 3;
        if will.retain {
            flags |= 0b10_0000;
        }
        remaining += 2 + will.topic.len() + 2 + will.payload.len();
    }
    if let Some((username, password)) = request.login {
        flags |= 0b1100_0000;
        remaining += 2 + username.len() + 2 + password.len();
    }
    let (mut out, total) = writer(buf, remaining).map_err(|err| match err {
        SendError::OutputFull => SendError::Encode("CONNECT larger than the transmit buffer"),
        other => other,
    })?;
    out.header(0x10, remaining);
    out.bytes(&[0, 4, b'M', b'Q', b'T', b'T', 4, flags]);
    out.u16(keep_alive_secs);
    out.field(request.client_id.as_bytes());
    if let Some(will) = &request.will {
        out.field(will.topic.as_bytes());
        out.field(will.payload);
    }
    if let Some((username, password)) = request.login {
        out.field(username.as_bytes());
        out.field(password.as_bytes());
    }
    Ok(total)
}

/// Encodes a PUBLISH of `message` into `buf`: at QoS 1 with `pkid` (`dup` as given), at
/// QoS 0 without (and without DUP). Returns its size.
pub(crate) fn encode_publish(
    message: &Message<'_>,
    pkid: Option<u16>,
    dup: bool,
    buf: &mut [u8],
) -> Result<usize, SendError> {
    check_field(message.topic.as_bytes(), "topic too long")?;
    let pkid = pkid.map(check_pkid).transpose()?;
    let pkid_len = if pkid.is_some() { 2 } else { 0 };
    let remaining = 2 + message.topic.len() + pkid_len + message.payload.len();
    let (mut out, total) = writer(buf, remaining)?;
    let mut first = 0x30;
    if pkid.is_some() {
        first |= 0b0010;
        if dup {
            first |= 0b1000;
        }
    }
    if message.retain {
        first |= 1;
    }
    out.header(first, remaining);
    out.field(message.topic.as_bytes());
    if let Some(pkid) = pkid {
        out.u16(pkid);
    }
    out.bytes(message.payload);
    Ok(total)
}

/// Encodes a SUBSCRIBE to `filter` into `buf`; returns its size.
pub(crate) fn encode_subscribe(
    filter: &str,
    qos: QoS,
    pkid: u16,
    buf: &mut [u8],
) -> Result<usize, SendError> {
    // The limit mqttrs, which encoded it before, had without `std`.
    if filter.len() > 256 {
        return Err(SendError::Encode("filter longer than 256 bytes"));
    }
    let pkid = check_pkid(pkid)?;
    let remaining = 2 + 2 + filter.len() + 1;
    let (mut out, total) = writer(buf, remaining)?;
    out.header(0x82, remaining);
    out.u16(pkid);
    out.field(filter.as_bytes());
    out.u8(qos_bits(qos));
    Ok(total)
}

/// Writes a PUBACK for `pkid` (never 0: a decoded publish's) into `buf` (4 bytes).
pub(crate) fn encode_puback(pkid: u16, buf: &mut [u8]) {
    if let [a, b, c, d, ..] = buf {
        let [hi, lo] = pkid.to_be_bytes();
        [*a, *b, *c, *d] = [0x40, 2, hi, lo];
    }
}

/// A packet id to send: never 0.
fn check_pkid(pkid: u16) -> Result<u16, SendError> {
    if pkid == 0 {
        Err(SendError::Encode("packet id 0"))
    } else {
        Ok(pkid)
    }
}
