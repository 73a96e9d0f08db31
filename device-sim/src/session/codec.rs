//! The session's packets on the wire, through [`mqttrs`]: the fixed header read here first
//! (type, size limit), the fields mqttrs indexes checked, then exactly one frame decoded by
//! mqttrs; and the few packets a vehicle sends, encoded by mqttrs into the transmit buffer.
//! See the [session docs](super) for why mqttrs needs the checks.

use mqttrs::{Pid, QosPid};

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

/// Decodes the packet `bytes` (exactly the frame `frame` tells).
///
/// # Errors
/// [`SessionError::Malformed`] for a packet that is not valid MQTT 3.1.1 (too short for its
/// fields, a bad flag, QoS or return code, a topic that is not UTF-8, packet id 0);
/// [`SessionError::Unexpected`] for a QoS 2 publish.
pub(crate) fn decode(bytes: &[u8], frame: &Frame) -> Result<Packet, SessionError> {
    let body = bytes.get(frame.header_len..).unwrap_or_default();
    // What mqttrs indexes without checking must be there (it would panic otherwise).
    let fits = match PacketKind::of(frame.first) {
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
    if !fits {
        return Err(SessionError::Malformed("packet too short for its fields"));
    }
    let packet = match mqttrs::decode_slice(bytes) {
        Ok(Some(packet)) => packet,
        Ok(None) => return Err(SessionError::Malformed("incomplete packet")),
        Err(err) => return Err(SessionError::Malformed(describe(&err))),
    };
    Ok(match packet {
        mqttrs::Packet::Connack(ack) => Packet::ConnAck {
            refusal: match ack.code {
                mqttrs::ConnectReturnCode::Accepted => None,
                mqttrs::ConnectReturnCode::RefusedProtocolVersion => {
                    Some(ConnectRefusal::ProtocolVersion)
                }
                mqttrs::ConnectReturnCode::RefusedIdentifierRejected => {
                    Some(ConnectRefusal::IdentifierRejected)
                }
                mqttrs::ConnectReturnCode::ServerUnavailable => {
                    Some(ConnectRefusal::ServerUnavailable)
                }
                mqttrs::ConnectReturnCode::BadUsernamePassword => {
                    Some(ConnectRefusal::BadCredentials)
                }
                mqttrs::ConnectReturnCode::NotAuthorized => Some(ConnectRefusal::NotAuthorized),
            },
        },
        mqttrs::Packet::Puback(pid) => Packet::PubAck { pkid: pid.get() },
        mqttrs::Packet::Suback(ack) => Packet::SubAck {
            pkid: ack.pid.get(),
            refused: ack
                .return_codes
                .iter()
                .any(|code| matches!(code, mqttrs::SubscribeReturnCodes::Failure)),
        },
        mqttrs::Packet::Pingresp => Packet::PingResp,
        mqttrs::Packet::Publish(publish) => {
            let (qos, pkid, pkid_len) = match publish.qospid {
                QosPid::AtMostOnce => (QoS::AtMostOnce, 0, 0),
                QosPid::AtLeastOnce(pid) => (QoS::AtLeastOnce, pid.get(), 2),
                QosPid::ExactlyOnce(_) => {
                    return Err(SessionError::Unexpected(PacketKind::Publish));
                }
            };
            // Where mqttrs found them: the topic after its length, the payload after the
            // packet id, up to the end of the frame.
            let topic_start = frame.header_len + 2;
            let topic_end = topic_start + publish.topic_name.len();
            let payload = (topic_end + pkid_len, frame.total);
            debug_assert_eq!(bytes.get(payload.0..payload.1), Some(publish.payload));
            Packet::Publish {
                qos,
                pkid,
                dup: publish.dup,
                retain: publish.retain,
                topic: (topic_start, topic_end),
                payload,
            }
        }
        // The type was checked by `frame`: a client receives nothing else.
        _ => return Err(SessionError::Malformed("packet type and body disagree")),
    })
}

/// What went wrong, in words.
fn describe(err: &mqttrs::Error) -> &'static str {
    match err {
        mqttrs::Error::WriteZero => "packet larger than its buffer",
        mqttrs::Error::InvalidPid => "packet id 0",
        mqttrs::Error::InvalidQos(_) => "QoS 3",
        mqttrs::Error::InvalidConnectReturnCode(_) => "unknown CONNACK return code",
        mqttrs::Error::InvalidProtocol(..) => "unknown protocol",
        mqttrs::Error::InvalidHeader => "bad fixed header flags",
        mqttrs::Error::InvalidLength => "bad length",
        mqttrs::Error::InvalidString(_) => "a string that is not UTF-8",
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

/// Refuses a string or binary field longer than MQTT's two-byte length (mqttrs would write
/// its length cut to 16 bits).
fn check_field(field: &[u8], what: &'static str) -> Result<(), SendError> {
    if field.len() > usize::from(u16::MAX) {
        Err(SendError::Encode(what))
    } else {
        Ok(())
    }
}

/// The QoS of mqttrs.
const fn wire_qos(qos: QoS) -> mqttrs::QoS {
    match qos {
        QoS::AtMostOnce => mqttrs::QoS::AtMostOnce,
        QoS::AtLeastOnce => mqttrs::QoS::AtLeastOnce,
        QoS::ExactlyOnce => mqttrs::QoS::ExactlyOnce,
    }
}

/// Encodes mqttrs' `packet` into `buf`; returns its size.
fn encode(packet: &mqttrs::Packet<'_>, buf: &mut [u8]) -> Result<usize, SendError> {
    match mqttrs::encode_slice(packet, buf) {
        Ok(n) => Ok(n),
        Err(mqttrs::Error::WriteZero) => Err(SendError::OutputFull),
        Err(err) => Err(SendError::Encode(describe(&err))),
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
    let last_will = match request.will {
        Some(will) => {
            if will.qos == QoS::ExactlyOnce {
                return Err(SendError::Qos2);
            }
            check_field(will.topic.as_bytes(), "will topic too long")?;
            check_field(will.payload, "will payload too long")?;
            Some(mqttrs::LastWill {
                topic: will.topic,
                message: will.payload,
                qos: wire_qos(will.qos),
                retain: will.retain,
            })
        }
        None => None,
    };
    let connect = mqttrs::Connect {
        protocol: mqttrs::Protocol::MQTT311,
        keep_alive: keep_alive_secs,
        client_id: request.client_id,
        clean_session: true,
        last_will,
        username: request.login.map(|(username, _)| username),
        password: request.login.map(|(_, password)| password.as_bytes()),
    };
    encode(&connect.into(), buf).map_err(|err| match err {
        SendError::OutputFull => SendError::Encode("CONNECT larger than the transmit buffer"),
        other => other,
    })
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
    let qospid = match pkid {
        None => QosPid::AtMostOnce,
        Some(pkid) => QosPid::AtLeastOnce(pid(pkid)?),
    };
    let publish = mqttrs::Publish {
        dup: dup && pkid.is_some(),
        qospid,
        retain: message.retain,
        topic_name: message.topic,
        payload: message.payload,
    };
    encode(&publish.into(), buf)
}

/// Encodes a SUBSCRIBE to `filter` into `buf`; returns its size.
pub(crate) fn encode_subscribe(
    filter: &str,
    qos: QoS,
    pkid: u16,
    buf: &mut [u8],
) -> Result<usize, SendError> {
    // mqttrs holds a filter in 256 bytes without `std` (and would panic on a longer one).
    if filter.len() > 256 {
        return Err(SendError::Encode("filter longer than 256 bytes"));
    }
    let topic = mqttrs::SubscribeTopic {
        topic_path: filter.into(),
        qos: wire_qos(qos),
    };
    let subscribe = mqttrs::Subscribe::new(pid(pkid)?, core::iter::once(topic).collect());
    encode(&subscribe.into(), buf)
}

/// Writes a PUBACK for `pkid` (never 0: a decoded publish's) into `buf` (4 bytes).
pub(crate) fn encode_puback(pkid: u16, buf: &mut [u8]) {
    if let [a, b, c, d, ..] = buf {
        let [hi, lo] = pkid.to_be_bytes();
        [*a, *b, *c, *d] = [0x40, 2, hi, lo];
    }
}

/// mqttrs' packet id.
fn pid(pkid: u16) -> Result<Pid, SendError> {
    Pid::try_from(pkid).map_err(|_| SendError::Encode("packet id 0"))
}
