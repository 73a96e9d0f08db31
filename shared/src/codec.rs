//! The payload encoding: one protocol-version byte, then the postcard body.
//!
//! ```text
//! +---------+-----------------------------+
//! | version | postcard(message)           |
//! | 1 byte  | varints, zig-zag for signed |
//! +---------+-----------------------------+
//! ```
//!
//! A decoder rejects an unknown version, a truncated or malformed body and trailing bytes with a
//! [`CodecError`]; it never panics and never returns a half-read message.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;

/// The protocol version this build speaks; the first byte of every payload.
pub const PROTOCOL_VERSION: u8 = 1;

/// An upper bound on the encoded size of every message type, for fixed buffers.
pub const MAX_PAYLOAD: usize = 128;

/// Encodes `msg` into `buf` and returns the used prefix.
///
/// # Errors
/// [`CodecError::BufferFull`] if `buf` is too small.
pub fn encode<'a, T: Serialize>(msg: &T, buf: &'a mut [u8]) -> Result<&'a mut [u8], CodecError> {
    let (version, body) = buf.split_first_mut().ok_or(CodecError::BufferFull)?;
    *version = PROTOCOL_VERSION;
    let used = postcard::to_slice(msg, body)
        .map_err(|_| CodecError::BufferFull)?
        .len();
    Ok(&mut buf[..=used])
}

/// Encodes `msg` into a fixed-capacity vector of [`MAX_PAYLOAD`] bytes.
///
/// # Errors
/// [`CodecError::BufferFull`] if the message does not fit.
pub fn encode_vec<T: Serialize>(msg: &T) -> Result<heapless::Vec<u8, MAX_PAYLOAD>, CodecError> {
    let mut buf = [0u8; MAX_PAYLOAD];
    let used = encode(msg, &mut buf)?;
    heapless::Vec::from_slice(used).map_err(|_| CodecError::BufferFull)
}

/// Checks the protocol-version byte at the start of `payload` and returns what follows it.
///
/// Every reader of Fleetbeat payloads (plain and sealed) goes through this one check.
///
/// # Errors
/// [`CodecError::Empty`] for an empty payload, [`CodecError::UnsupportedVersion`] for any
/// version but [`PROTOCOL_VERSION`].
pub fn check_version(payload: &[u8]) -> Result<&[u8], CodecError> {
    let (&version, rest) = payload.split_first().ok_or(CodecError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(CodecError::UnsupportedVersion {
            found: version,
            supported: PROTOCOL_VERSION,
        });
    }
    Ok(rest)
}

/// Decodes one message from a whole payload.
///
/// # Errors
/// [`CodecError`] if the payload is empty, of another version, truncated, malformed, or has
/// bytes after the message.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    decode_body(check_version(payload)?)
}

/// Decodes a complete postcard body: no bytes may be missing or left over.
pub(crate) fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (msg, rest) = postcard::take_from_bytes::<T>(body).map_err(|err| match err {
        postcard::Error::DeserializeUnexpectedEnd => CodecError::Truncated,
        _ => CodecError::Malformed,
    })?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes {
            extra: u16::try_from(rest.len()).unwrap_or(u16::MAX),
        });
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use core::fmt::Debug;

    use proptest::prelude::*;

    use super::*;
    use crate::id::OrderId;
    use crate::wire::*;

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            flags: StatusFlags(StatusFlags::MOVING | StatusFlags::IGNITION | StatusFlags::GPS_FIX),
            ..Heartbeat::sample()
        }
    }

    fn order() -> OrderId {
        OrderId::new("ord-1").expect("valid")
    }

    fn golden<T: Serialize + DeserializeOwned + PartialEq + Debug>(msg: &T, bytes: &[u8]) {
        let mut buf = [0u8; MAX_PAYLOAD];
        let encoded = encode(msg, &mut buf).expect("fits");
        assert_eq!(
            encoded, bytes,
            "encoding changed: that is a protocol change"
        );
        assert_eq!(&decode::<T>(bytes).expect("decodes"), msg);
    }

    #[test]
    fn golden_heartbeat() {
        golden(
            &heartbeat(),
            &[
                1, // version
                0xd2, 0x09, // seq 1234
                0x80, 0x90, 0xce, 0xa2, 0xac, 0x33, // ts_ms
                0x80, 0xaa, 0xef, 0xf4, 0x03, // lat_e7 (zig-zag)
                0xa0, 0xc3, 0xeb, 0x7f, // lon_e7 (zig-zag)
                0xed, 0x0a, // speed 1389 cm/s
                0x8e, 0x02, // heading 270
                87,   // battery
                0x0b, // flags
            ],
        );
    }

    #[test]
    fn typical_heartbeat_is_at_most_30_bytes() {
        let mut hb = heartbeat();
        hb.seq = u32::MAX;
        hb.pos = Position::new(-899_999_999, -1_799_999_999);
        let mut buf = [0u8; MAX_PAYLOAD];
        let len = encode(&hb, &mut buf).expect("fits").len();
        assert!(len <= 30, "worst-case position and seq: {len} bytes");
    }

    #[test]
    fn golden_delivery_event() {
        golden(
            &DeliveryEvent {
                seq: 3,
                order: order(),
                kind: DeliveryKind::InTransit,
                ts_ms: 1000,
                pos: Position::new(-1, 1),
            },
            &[1, 3, 5, b'o', b'r', b'd', b'-', b'1', 1, 0xe8, 0x07, 1, 2],
        );
    }

    #[test]
    fn golden_status() {
        golden(&Status::Online, &[1, 0]);
        golden(&Status::Offline(OfflineReason::Shutdown), &[1, 1, 0]);
        golden(&Status::Offline(OfflineReason::ConnectionLost), &[1, 1, 1]);
        golden(&Status::Offline(OfflineReason::LowBattery), &[1, 1, 2]);
    }

    #[test]
    fn golden_commands() {
        golden(
            &Command {
                id: 7,
                kind: CommandKind::Ping,
            },
            &[1, 7, 0],
        );
        golden(
            &Command {
                id: 8,
                kind: CommandKind::SetRate { interval_ms: 500 },
            },
            &[1, 8, 1, 0xf4, 0x03],
        );
        golden(
            &Command {
                id: 9,
                kind: CommandKind::ReturnToDepot,
            },
            &[1, 9, 2],
        );
        golden(
            &Command {
                id: 300,
                kind: CommandKind::AssignOrder {
                    order: order(),
                    pickup: Position::new(10, -10),
                    dropoff: Position::new(0, 64),
                },
            },
            &[
                1, 0xac, 0x02, 3, 5, b'o', b'r', b'd', b'-', b'1', 20, 19, 0, 0x80, 0x01,
            ],
        );
        golden(
            &Command {
                id: 10,
                kind: CommandKind::CancelOrder { order: order() },
            },
            &[1, 10, 4, 5, b'o', b'r', b'd', b'-', b'1'],
        );
    }

    #[test]
    fn golden_command_ack() {
        for (id, result, bytes) in [
            (7, AckResult::Ok, [1, 7, 0]),
            (8, AckResult::Busy, [1, 8, 1]),
            (9, AckResult::Unsupported, [1, 9, 2]),
            (10, AckResult::Invalid, [1, 10, 3]),
        ] {
            golden(&CommandAck { id, result }, &bytes);
        }
    }

    #[test]
    fn typed_errors() {
        assert_eq!(decode::<Status>(&[]), Err(CodecError::Empty));
        assert_eq!(
            decode::<Status>(&[2, 0]),
            Err(CodecError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        );
        assert_eq!(decode::<Heartbeat>(&[1, 0xd2]), Err(CodecError::Truncated));
        assert_eq!(decode::<Status>(&[1, 9]), Err(CodecError::Malformed));
        assert_eq!(
            decode::<Status>(&[1, 0, 0, 0]),
            Err(CodecError::TrailingBytes { extra: 2 })
        );
        // An order id with a character ids may not have is refused, not passed on.
        assert_eq!(
            decode::<Command>(&[1, 1, 3, 1, b'/', 0, 0, 0, 0]),
            Err(CodecError::Malformed)
        );
        let mut tiny = [0u8; 4];
        assert_eq!(encode(&heartbeat(), &mut tiny), Err(CodecError::BufferFull));
        assert_eq!(
            encode(&Status::Online, &mut []),
            Err(CodecError::BufferFull)
        );
    }

    fn any_position() -> impl Strategy<Value = Position> {
        (any::<i32>(), any::<i32>()).prop_map(|(a, b)| Position::new(a, b))
    }

    fn any_order() -> impl Strategy<Value = OrderId> {
        "[A-Za-z0-9_.-]{1,32}".prop_map(|s| OrderId::new(&s).expect("regex yields valid ids"))
    }

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(msg: &T) {
        let mut buf = [0u8; MAX_PAYLOAD];
        let encoded = encode(msg, &mut buf).expect("every message fits MAX_PAYLOAD");
        assert_eq!(&decode::<T>(encoded).expect("decodes"), msg);
    }

    proptest! {
        #[test]
        fn heartbeat_roundtrips(
            seq: u32, ts_ms: u64, pos in any_position(), speed_cm_s: u16,
            heading_deg: u16, battery_pct: u8, flags: u8,
        ) {
            roundtrip(&Heartbeat {
                seq, ts_ms, pos, speed_cm_s, heading_deg, battery_pct, flags: StatusFlags(flags),
            });
        }

        #[test]
        fn event_roundtrips(
            seq: u32, order in any_order(), kind in 0u8..3, ts_ms: u64, pos in any_position(),
        ) {
            let kind = [DeliveryKind::Pickup, DeliveryKind::InTransit, DeliveryKind::Delivered]
                [usize::from(kind)];
            roundtrip(&DeliveryEvent { seq, order, kind, ts_ms, pos });
        }

        #[test]
        fn command_roundtrips(
            id: u32, order in any_order(), pickup in any_position(), dropoff in any_position(),
            interval_ms: u32,
        ) {
            roundtrip(&Command { id, kind: CommandKind::AssignOrder { order, pickup, dropoff } });
            roundtrip(&Command { id, kind: CommandKind::SetRate { interval_ms } });
            roundtrip(&Command { id, kind: CommandKind::CancelOrder { order: OrderId::new("o-1").expect("valid") } });
            roundtrip(&CommandAck { id, result: AckResult::Busy });
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode::<Heartbeat>(&bytes);
            let _ = decode::<DeliveryEvent>(&bytes);
            let _ = decode::<Status>(&bytes);
            let _ = decode::<Command>(&bytes);
            let _ = decode::<CommandAck>(&bytes);
        }

        #[test]
        fn truncation_is_an_error(seq: u32, ts_ms: u64, pos in any_position(), cut in 0usize..30) {
            let hb = Heartbeat { seq, ts_ms, pos, ..Heartbeat::default() };
            let mut buf = [0u8; MAX_PAYLOAD];
            let encoded = encode(&hb, &mut buf).expect("fits");
            let cut = cut.min(encoded.len() - 1);
            prop_assert!(decode::<Heartbeat>(&encoded[..cut]).is_err());
        }
    }
}
