//! MQTT framing for the few packets Fleetbeat's own tools write and read by hand: the broker's
//! router link and health probe, its tests, `broker-bench` and `loadbench`.
//!
//! This is not an MQTT client: it knows the fixed header (packet type and flags, then the
//! variable-length "remaining length"), length-prefixed strings, and builders for `CONNECT`,
//! `PUBLISH`, `SUBSCRIBE`, `PUBACK`, `PINGREQ` and `DISCONNECT` in MQTT 3.1.1 and 5 (with empty
//! property sets unless given). It needs the standard library (`std` feature).
//!
//! ```text
//! +--------------+------------------------+----------------------+
//! | type | flags | remaining length       | variable header, body |
//! | 1 byte       | 1-4 bytes, 7 bits each | remaining length bytes |
//! +--------------+------------------------+----------------------+
//! ```

use std::vec::Vec;

/// The largest remaining length MQTT can express (four 7-bit groups).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Appends `len` as an MQTT variable byte integer (the fixed header's remaining length, or a
/// v5 property length).
///
/// Lengths above [`MAX_REMAINING_LENGTH`] are written with their low 28 bits: callers build
/// packets far smaller than that.
pub fn put_remaining_length(out: &mut Vec<u8>, len: usize) {
    let mut len = len & MAX_REMAINING_LENGTH;
    loop {
        // Lossless: the value is masked to seven bits.
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

/// Appends a two-byte length prefix and `bytes` (an MQTT string or binary field).
///
/// Fields longer than 65,535 bytes are cut to that length: MQTT cannot carry more.
pub fn put_str(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

/// Appends a whole packet: the first byte (type and flags), the remaining length, the body.
pub fn put_packet(out: &mut Vec<u8>, first: u8, body: &[u8]) {
    out.push(first);
    put_remaining_length(out, body.len());
    out.extend_from_slice(body);
}

/// A whole packet as a new vector.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    put_packet(&mut out, first, body);
    out
}

/// The fixed header of one complete packet at the start of `buf`: its first byte, the length
/// of the fixed header and the remaining length.
///
/// `None` while `buf` does not hold the whole packet yet, or if the remaining length is
/// malformed (more than four bytes), which a reader should treat as a protocol error: see
/// [`FrameHeader::parse`] to tell the two apart.
pub fn frame(buf: &[u8]) -> Option<FrameHeader> {
    match FrameHeader::parse(buf) {
        Ok(Some(header)) if buf.len() >= header.total() => Some(header),
        _ => None,
    }
}

/// The fixed header of an MQTT packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The first byte: packet type (high nibble) and flags (low nibble).
    pub first: u8,
    /// Bytes taken by the fixed header (2 to 5).
    pub header_len: usize,
    /// The remaining length: bytes after the fixed header.
    pub remaining: usize,
}

/// A remaining length that runs past four bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed remaining length: more than four bytes")]
pub struct MalformedLength;

impl FrameHeader {
    /// Reads the fixed header at the start of `buf`: `Ok(None)` while it is incomplete.
    ///
    /// # Errors
    /// [`MalformedLength`] if the remaining length has more than four bytes.
    pub fn parse(buf: &[u8]) -> Result<Option<FrameHeader>, MalformedLength> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let mut remaining = 0usize;
        for (i, shift) in [0u32, 7, 14, 21].into_iter().enumerate() {
            let Some(&byte) = buf.get(1 + i) else {
                return Ok(None);
            };
            remaining |= usize::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(Some(FrameHeader {
                    first,
                    header_len: 2 + i,
                    remaining,
                }));
            }
        }
        Err(MalformedLength)
    }

    /// The packet type (the first byte's high nibble: 1 CONNECT ... 14 DISCONNECT).
    pub const fn packet_type(&self) -> u8 {
        self.first >> 4
    }

    /// Fixed header plus remaining length: the whole packet's size.
    pub const fn total(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// A `CONNECT` packet, built field by field.
#[derive(Debug, Default, Clone)]
pub struct Connect<'a> {
    /// MQTT 5 (protocol level 5) instead of 3.1.1 (level 4).
    pub v5: bool,
    /// The client identifier.
    pub client_id: &'a str,
    /// Keep-alive in seconds.
    pub keep_alive: u16,
    /// A persistent session (clean-session / clean-start flag off).
    pub persistent: bool,
    /// MQTT 5: the Session Expiry Interval in seconds (`None`: absent, the session ends with
    /// the connection; `u32::MAX`: it never expires).
    pub session_expiry: Option<u32>,
    /// User name and password.
    pub login: Option<(&'a str, &'a str)>,
    /// A last will: topic, payload, retain; always QoS 1.
    pub will: Option<(&'a str, &'a [u8], bool)>,
}

impl Connect<'_> {
    /// The encoded packet.
    pub fn bytes(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(32 + self.client_id.len());
        put_str(&mut body, b"MQTT");
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
            match self.session_expiry {
                Some(seconds) => {
                    body.push(5); // property length
                    body.push(0x11); // Session Expiry Interval
                    body.extend_from_slice(&seconds.to_be_bytes());
                }
                None => body.push(0), // no properties
            }
        }
        put_str(&mut body, self.client_id.as_bytes());
        if let Some((topic, payload, _)) = self.will {
            if self.v5 {
                body.push(0); // no will properties
            }
            put_str(&mut body, topic.as_bytes());
            put_str(&mut body, payload);
        }
        if let Some((user, pass)) = self.login {
            put_str(&mut body, user.as_bytes());
            put_str(&mut body, pass.as_bytes());
        }
        packet(0x10, &body)
    }
}

/// A `PUBLISH` packet.
#[derive(Debug, Default, Clone, Copy)]
pub struct Publish<'a> {
    /// MQTT 5: a property length (and `props`) follows the packet id.
    pub v5: bool,
    /// The topic name.
    pub topic: &'a [u8],
    /// The application payload.
    pub payload: &'a [u8],
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// The packet id (written only for QoS > 0).
    pub pkid: u16,
    /// The retain flag.
    pub retain: bool,
    /// The duplicate-delivery flag.
    pub dup: bool,
    /// Encoded MQTT 5 properties (ignored for 3.1.1).
    pub props: &'a [u8],
}

impl Publish<'_> {
    /// Appends the encoded packet to `out`.
    pub fn put(&self, out: &mut Vec<u8>) {
        let mut len = 2 + self.topic.len() + self.payload.len();
        if self.qos > 0 {
            len += 2;
        }
        let mut props_len = Vec::new();
        if self.v5 {
            put_remaining_length(&mut props_len, self.props.len());
            len += props_len.len() + self.props.len();
        }
        out.push(0x30 | (u8::from(self.dup) << 3) | ((self.qos & 3) << 1) | u8::from(self.retain));
        put_remaining_length(out, len);
        put_str(out, self.topic);
        if self.qos > 0 {
            out.extend_from_slice(&self.pkid.to_be_bytes());
        }
        if self.v5 {
            out.extend_from_slice(&props_len);
            out.extend_from_slice(self.props);
        }
        out.extend_from_slice(self.payload);
    }

    /// The encoded packet as a new vector.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.topic.len() + self.payload.len() + 12);
        self.put(&mut out);
        out
    }
}

/// A `SUBSCRIBE` packet with packet id `pkid` for `filters` (filter, requested QoS).
pub fn subscribe(v5: bool, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v5 {
        body.push(0); // no properties
    }
    for (filter, qos) in filters {
        put_str(&mut body, filter.as_bytes());
        body.push(*qos);
    }
    packet(0x82, &body)
}

/// A `PUBACK` for packet id `pkid`.
pub fn puback(pkid: u16) -> Vec<u8> {
    packet(0x40, &pkid.to_be_bytes())
}

/// A `PINGREQ`.
pub const PINGREQ: [u8; 2] = [0xC0, 0];

/// A `DISCONNECT` (normal, no properties, in both versions).
pub const DISCONNECT: [u8; 2] = [0xE0, 0];

/// Topic, packet id (QoS > 0) and payload of a `PUBLISH` body in MQTT 3.1.1, or `None` if the
/// body is too short for what its header announces.
pub fn publish_fields(first: u8, body: &[u8]) -> Option<(&[u8], Option<u16>, &[u8])> {
    let len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let topic = body.get(2..2 + len)?;
    let rest = &body[2 + len..];
    if (first >> 1) & 3 > 0 {
        let pkid = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
        Some((topic, Some(pkid), &rest[2..]))
    } else {
        Some((topic, None, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_bytes() {
        for (len, bytes) in [
            (0usize, &[0x00][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (MAX_REMAINING_LENGTH, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut out = Vec::new();
            put_remaining_length(&mut out, len);
            assert_eq!(out, bytes, "{len}");
            let mut packet = vec![0x30];
            packet.extend_from_slice(&out);
            let header = FrameHeader::parse(&packet).unwrap().unwrap();
            assert_eq!((header.header_len, header.remaining), (1 + out.len(), len));
        }
    }

    #[test]
    fn incomplete_and_malformed_headers() {
        assert_eq!(FrameHeader::parse(&[]), Ok(None));
        assert_eq!(FrameHeader::parse(&[0x30]), Ok(None));
        assert_eq!(FrameHeader::parse(&[0x30, 0x80]), Ok(None));
        assert_eq!(
            FrameHeader::parse(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(MalformedLength)
        );
        assert_eq!(frame(&[0x30, 3, 0, 1]), None, "body incomplete");
        assert_eq!(
            frame(&[0x30, 3, 0, 1, b'a', 0xFF]).map(|h| h.total()),
            Some(5)
        );
    }

    #[test]
    fn connect_bytes() {
        let connect = Connect {
            client_id: "probe",
            keep_alive: 10,
            ..Connect::default()
        };
        assert_eq!(
            connect.bytes(),
            [
                0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10, 0, 5, b'p', b'r', b'o',
                b'b', b'e',
            ]
        );
        let v5 = Connect {
            v5: true,
            client_id: "p",
            keep_alive: 10,
            ..Connect::default()
        };
        assert_eq!(
            v5.bytes(),
            [
                0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 10, 0, 0, 1, b'p'
            ]
        );
        let kept = Connect {
            persistent: true,
            session_expiry: Some(300),
            ..v5
        };
        assert_eq!(
            kept.bytes(),
            [
                0x10, 19, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x00, 0, 10, 5, 0x11, 0, 0, 1, 44, 0, 1,
                b'p'
            ]
        );
    }

    #[test]
    fn publish_round_trip() {
        let publish = Publish {
            topic: b"fleet/a/b/event",
            payload: b"xyz",
            qos: 1,
            pkid: 7,
            retain: true,
            ..Publish::default()
        };
        let bytes = publish.bytes();
        assert_eq!(bytes[0], 0x33);
        let header = frame(&bytes).unwrap();
        let body = &bytes[header.header_len..header.total()];
        assert_eq!(
            publish_fields(header.first, body),
            Some((&b"fleet/a/b/event"[..], Some(7), &b"xyz"[..]))
        );
        assert_eq!(publish_fields(0x30, &[0, 9, b'a']), None);
    }

    #[test]
    fn subscribe_and_acks() {
        assert_eq!(
            subscribe(false, 1, &[("a/b", 1)]),
            [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'b', 1]
        );
        assert_eq!(puback(258), [0x40, 2, 1, 2]);
    }
}
