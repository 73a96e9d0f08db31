//! What rumqttd's decoders let through that MQTT calls malformed: the reserved bits of a
//! packet (the fixed header's flags, the CONNECT flags, a SUBSCRIBE's options), and an MQTT 5
//! property given twice. Checked on the bytes of a complete packet before it is decoded; a
//! packet that breaks one ends the connection (MQTT 5: DISCONNECT 0x81 Malformed Packet for
//! reserved bits, 0x82 Protocol Error for a repeated property), as MQTT 3.1.1 §2.2.2,
//! §3.1.2.3, §3.3.1, §3.8.3.1 and MQTT 5 §2.1.3, §2.2.2, §3.1.2.3, §3.3.1.1, §3.8.3.1
//! require.

/// Why `packet` (one complete packet: its fixed header of `header_len` bytes, then the rest)
/// is malformed by its reserved bits, if it is; `v5` for MQTT 5. A packet too short to say is
/// left to the decoder.
pub(super) fn broken_reserved_bits(
    packet: &[u8],
    header_len: usize,
    v5: bool,
) -> Option<&'static str> {
    let first = *packet.first()?;
    let body = packet.get(header_len..)?;
    let flags = first & 0x0F;
    match first >> 4 {
        1 if flags != 0 => Some("CONNECT with fixed header flags set"),
        1 => connect_flags(body, v5),
        3 if flags & 0b0110 == 0b0110 => Some("PUBLISH with QoS 3"),
        3 if flags & 0b1000 != 0 && flags & 0b0110 == 0 => Some("QoS 0 PUBLISH with DUP set"),
        4 | 5 | 7 | 12 | 14 | 15 if flags != 0 => Some("fixed header flags set"),
        6 | 8 | 10 if flags != 0b0010 => Some("fixed header flags other than 0010"),
        8 => subscribe_options(body, v5),
        _ => None,
    }
}

/// The CONNECT flags' rules: reserved bit 0 clear; no will QoS nor will retain without a
/// will, never will QoS 3; in 3.1.1 no password without a user name.
fn connect_flags(body: &[u8], v5: bool) -> Option<&'static str> {
    let name_len = u16_at(body, 0)?;
    let flags = *body.get(2 + name_len + 1)?;
    let will = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    if flags & 1 != 0 {
        Some("CONNECT with its reserved flag set")
    } else if !will && (will_qos != 0 || flags & 0b0010_0000 != 0) {
        Some("CONNECT with a will QoS or will retain but no will")
    } else if will_qos == 3 {
        Some("CONNECT with will QoS 3")
    } else if !v5 && flags & 0b0100_0000 != 0 && flags & 0b1000_0000 == 0 {
        Some("CONNECT with a password but no user name")
    } else {
        None
    }
}

/// Each subscription's options byte: in 3.1.1 only the QoS bits, in MQTT 5 bits 6 and 7
/// clear (QoS 3 and Retain Handling 3 are the decoder's to refuse).
fn subscribe_options(body: &[u8], v5: bool) -> Option<&'static str> {
    let mut at = 2;
    if v5 {
        let (len, used) = varint(body.get(at..)?)?;
        at += used + len;
    }
    let reserved = if v5 { 0b1100_0000 } else { 0b1111_1100 };
    while at < body.len() {
        let len = u16_at(body, at)?;
        let options = *body.get(at + 2 + len)?;
        if options & reserved != 0 {
            return Some("SUBSCRIBE with reserved option bits set");
        }
        at += 2 + len + 1;
    }
    None
}

/// The MQTT 5 property `packet` (complete, fixed header of `header_len` bytes) gives more
/// than once, if any: only User Property (0x26) may repeat in what a client sends. A block too
/// short or with a property the packet may not carry is left to the decoder.
pub(super) fn repeated_property(packet: &[u8], header_len: usize) -> Option<u8> {
    let first = *packet.first()?;
    let body = packet.get(header_len..)?;
    match first >> 4 {
        1 => {
            // Name, level, flags, keep-alive; then the properties, the client id and, with a
            // will, the will's properties.
            let name_len = u16_at(body, 0)?;
            let flags = *body.get(2 + name_len + 1)?;
            let at = 2 + name_len + 4;
            let (repeated, end) = repeated_in_block(body, at)?;
            if repeated.is_some() || flags & 0b0000_0100 == 0 {
                return repeated;
            }
            let id_len = u16_at(body, end)?;
            repeated_in_block(body, end + 2 + id_len)?.0
        }
        3 => {
            let topic_len = u16_at(body, 0)?;
            let pkid = if first & 0b0110 == 0 { 0 } else { 2 };
            repeated_in_block(body, 2 + topic_len + pkid)?.0
        }
        // PUBACK, PUBREC, PUBREL, PUBCOMP: packet id, reason code, properties (each optional
        // at the end).
        4..=7 if body.len() > 3 => repeated_in_block(body, 3)?.0,
        8 | 10 => repeated_in_block(body, 2)?.0,
        // DISCONNECT, AUTH: reason code, properties.
        14 | 15 if body.len() > 1 => repeated_in_block(body, 1)?.0,
        _ => None,
    }
}

/// The property given twice in the property block at `at` in `body` (`None` if none is), and
/// where the block ends; `None` for a block that is cut short or holds an unknown property.
fn repeated_in_block(body: &[u8], at: usize) -> Option<(Option<u8>, usize)> {
    let (len, used) = varint(body.get(at..)?)?;
    let end = at + used + len;
    let block = body.get(at + used..end)?;
    let mut seen = 0u64;
    let mut i = 0;
    while i < block.len() {
        let id = block[i];
        i += 1;
        let size = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0B => varint(block.get(i..)?)?.1,
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => 2 + u16_at(block, i)?,
            0x26 => {
                let key = u16_at(block, i)?;
                let at = i + 2 + key;
                2 + key + 2 + u16_at(block, at)?
            }
            _ => return None,
        };
        if id != 0x26 {
            let bit = 1u64 << id;
            if seen & bit != 0 {
                return Some((Some(id), end));
            }
            seen |= bit;
        }
        i += size;
    }
    Some((None, end))
}

/// The two-byte integer at `at` in `buf` (a string's or a packet id's length field).
fn u16_at(buf: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes([
        *buf.get(at)?,
        *buf.get(at + 1)?,
    ])))
}

/// A variable byte integer at the start of `buf`: its value and the bytes it took.
fn varint(buf: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, &byte) in buf.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(flags: u8) -> Vec<u8> {
        let mut packet = vec![0x10, 10, 0, 4];
        packet.extend_from_slice(b"MQTT");
        packet.extend_from_slice(&[4, flags, 0, 30]);
        packet
    }

    #[test]
    fn fixed_header_flags() {
        assert_eq!(broken_reserved_bits(&[0xC0, 0], 2, false), None);
        assert!(broken_reserved_bits(&[0xC1, 0], 2, false).is_some());
        assert!(broken_reserved_bits(&[0xE8, 0], 2, true).is_some());
        assert_eq!(broken_reserved_bits(&[0x62, 2, 0, 1], 2, false), None);
        assert!(broken_reserved_bits(&[0x60, 2, 0, 1], 2, false).is_some());
        assert!(broken_reserved_bits(&[0xA0, 2, 0, 1], 2, false).is_some());
        // PUBLISH: QoS 3, and DUP at QoS 0; DUP at QoS 1 and RETAIN are fine.
        let publish = |first: u8| [first, 3, 0, 1, b'a'];
        assert!(broken_reserved_bits(&publish(0x36), 2, false).is_some());
        assert!(broken_reserved_bits(&publish(0x38), 2, false).is_some());
        assert_eq!(broken_reserved_bits(&publish(0x3B), 2, false), None);
        assert_eq!(broken_reserved_bits(&publish(0x31), 2, false), None);
    }

    #[test]
    fn connect_flags_rules() {
        assert_eq!(broken_reserved_bits(&connect(0x02), 2, false), None);
        assert_eq!(broken_reserved_bits(&connect(0xC2 | 0x2C), 2, false), None);
        for broken in [0x03, 0x0A, 0x22, 0x1C, 0x42] {
            assert!(
                broken_reserved_bits(&connect(broken), 2, false).is_some(),
                "{broken:#04x}"
            );
        }
        // A password without a user name is fine in MQTT 5.
        let mut v5 = connect(0x42);
        v5[8] = 5;
        assert_eq!(broken_reserved_bits(&v5, 2, true), None);
    }

    #[test]
    fn repeated_properties() {
        // PUBLISH QoS 0 "a", properties: Payload Format Indicator twice.
        let twice = [0x30, 9, 0, 1, b'a', 4, 0x01, 1, 0x01, 1, b'x'];
        assert_eq!(repeated_property(&twice, 2), Some(0x01));
        // User Property twice is fine; Message Expiry then Content Type once each.
        let users = [
            0x30, 19, 0, 1, b'a', 14, 0x26, 0, 1, b'k', 0, 1, b'v', 0x26, 0, 1, b'k', 0, 1, b'w',
            b'x',
        ];
        assert_eq!(repeated_property(&users, 2), None);
        let once = [
            0x32, 16, 0, 1, b'a', 0, 7, 9, 0x02, 0, 0, 0, 9, 0x03, 0, 1, b't', b'x',
        ];
        assert_eq!(repeated_property(&once, 2), None);
        // QoS 1 (a packet id before the properties): Message Expiry Interval twice.
        let expiry = [
            0x32, 17, 0, 1, b'a', 0, 7, 10, 0x02, 0, 0, 0, 9, 0x02, 0, 0, 0, 9, b'x',
        ];
        assert_eq!(repeated_property(&expiry, 2), Some(0x02));
        // CONNECT with Session Expiry Interval twice.
        let mut connect = vec![0x10, 0, 0, 4];
        connect.extend_from_slice(b"MQTT");
        connect.extend_from_slice(&[5, 0x02, 0, 30, 10, 0x11, 0, 0, 0, 5, 0x11, 0, 0, 0, 5]);
        connect.extend_from_slice(&[0, 1, b'c']);
        connect[1] = u8::try_from(connect.len() - 2).unwrap();
        assert_eq!(repeated_property(&connect, 2), Some(0x11));
        // A will's properties: Will Delay Interval twice.
        let mut will = vec![0x10, 0, 0, 4];
        will.extend_from_slice(b"MQTT");
        will.extend_from_slice(&[5, 0x06, 0, 30, 0, 0, 1, b'c']);
        will.extend_from_slice(&[
            10, 0x18, 0, 0, 0, 1, 0x18, 0, 0, 0, 1, 0, 1, b't', 0, 1, b'p',
        ]);
        will[1] = u8::try_from(will.len() - 2).unwrap();
        assert_eq!(repeated_property(&will, 2), Some(0x18));
        // DISCONNECT with a Reason String twice; a cut block is the decoder's.
        let bye = [0xE0, 10, 0, 8, 0x1F, 0, 1, b'a', 0x1F, 0, 1, b'b'];
        assert_eq!(repeated_property(&bye, 2), Some(0x1F));
        assert_eq!(repeated_property(&bye[..9], 2), None);
    }

    #[test]
    fn subscribe_option_bits() {
        // 3.1.1: pkid 1, "a/b" at QoS 1, then "c" with a reserved bit.
        let v4 = [0x82, 12, 0, 1, 0, 3, b'a', b'/', b'b', 1, 0, 1, b'c', 0x05];
        assert!(broken_reserved_bits(&v4, 2, false).is_some());
        assert_eq!(broken_reserved_bits(&v4[..10], 2, false), None);
        // MQTT 5: pkid 1, no properties, "a" with No Local and Retain Handling 2 (fine), then
        // bit 6.
        let v5 = [0x82, 10, 0, 1, 0, 0, 1, b'a', 0x25, 0, 1, b'b', 0x41];
        assert!(broken_reserved_bits(&v5, 2, true).is_some());
        assert_eq!(broken_reserved_bits(&v5[..9], 2, true), None);
    }
}
