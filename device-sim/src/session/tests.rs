//! The session's unit tests, byte level: what it sends is decoded by an independent codec
//! (rumqttc's `mqttbytes`, the one the simulator used before), what it receives is encoded by
//! it. CONNECT contents, packet ids and their tags, DUP, keep-alive deadlines, timeouts,
//! oversized and malformed packets, full buffers; and property tests: arbitrary bytes never
//! panic, arbitrary chunkings of valid packets decode the same.

use bytes::BytesMut;
use proptest::prelude::*;
use rumqttc::mqttbytes::QoS as WireQoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish as WirePublish, SubAck, SubscribeReasonCode,
};

use super::*;

type Tagged = VehicleSession<u32>;

const KEEP_ALIVE_S: u16 = 30;
const KEEP_ALIVE: u64 = 30_000;
const PING_TIMEOUT: u64 = 10_000;
const T0: u64 = 1_000_000;

fn options() -> SessionOptions {
    SessionOptions {
        ping_timeout_ms: PING_TIMEOUT,
        ..SessionOptions::new(KEEP_ALIVE_S)
    }
}

/// Decodes every packet in the session's output, as a broker would, and marks it written.
fn sent<const RX: usize, const TX: usize>(session: &mut Session<u32, RX, TX>) -> Vec<Packet> {
    let mut bytes = BytesMut::from(session.output());
    session.wrote(bytes.len());
    let mut packets = Vec::new();
    while !bytes.is_empty() {
        packets.push(Packet::read(&mut bytes, 1 << 20).expect("a valid packet"));
    }
    packets
}

/// The broker's `packet`, encoded.
fn encoded(packet: &Packet) -> Vec<u8> {
    let mut bytes = BytesMut::new();
    packet.write(&mut bytes, 1 << 20).expect("encodes");
    bytes.to_vec()
}

/// Feeds the broker's `packet` to the session.
fn receive<const RX: usize, const TX: usize>(session: &mut Session<u32, RX, TX>, packet: &Packet) {
    let bytes = encoded(packet);
    assert_eq!(session.feed(&bytes), bytes.len(), "fits the receive buffer");
}

fn request() -> ConnectRequest<'static> {
    ConnectRequest {
        client_id: "demo-0001",
        login: Some(("demo-0001", "secret")),
        will: Some(Message {
            topic: "fleet/demo/demo-0001/status",
            payload: b"gone",
            qos: QoS::AtLeastOnce,
            retain: true,
        }),
    }
}

fn connack(code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(ConnAck::new(code, false))
}

/// A session that has sent its CONNECT and received the CONNACK at `now`.
fn connected_with<const RX: usize, const TX: usize>(now: u64) -> Session<u32, RX, TX> {
    let mut session = Session::new(options());
    session.begin(&request(), now).expect("encodes");
    let _ = sent(&mut session);
    receive(&mut session, &connack(ConnectReturnCode::Success));
    assert_eq!(
        session.next_incoming(now).expect("valid"),
        Some(Incoming::ConnAck)
    );
    session
}

fn connected(now: u64) -> Tagged {
    connected_with(now)
}

/// Asserts that `session`'s timer still passes a millisecond before `deadline` and fails at
/// it; returns the failure.
fn expires_at(session: &mut Tagged, deadline: u64) -> SessionError {
    assert_eq!(session.deadline(), Some(deadline));
    session
        .on_timer(deadline - 1)
        .expect("still within the timeout");
    session.on_timer(deadline).expect_err("timed out")
}

fn message(payload: &[u8], qos: QoS) -> Message<'_> {
    Message {
        topic: "fleet/demo/demo-0001/event",
        payload,
        qos,
        retain: false,
    }
}

/// Every incoming packet, as owned values (`Publish` as (topic, payload, pkid)).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owned {
    ConnAck,
    Publish(String, Vec<u8>, u16),
    PubAck(u16, Option<u32>),
    SubAck(u16, bool),
}

fn owned(incoming: Incoming<'_, u32>) -> Owned {
    match incoming {
        Incoming::ConnAck => Owned::ConnAck,
        Incoming::Publish(p) => Owned::Publish(p.topic.to_string(), p.payload.to_vec(), p.pkid),
        Incoming::PubAck { pkid, tag } => Owned::PubAck(pkid, tag),
        Incoming::SubAck { pkid, refused } => Owned::SubAck(pkid, refused),
    }
}

fn drain<const RX: usize, const TX: usize>(
    session: &mut Session<u32, RX, TX>,
    now: u64,
) -> Vec<Owned> {
    let mut all = Vec::new();
    while let Some(incoming) = session.next_incoming(now).expect("valid") {
        all.push(owned(incoming));
    }
    all
}

#[test]
fn connect_carries_the_will_the_login_and_the_keep_alive() {
    let mut session = Tagged::new(options());
    assert!(session.is_idle());
    assert_eq!(session.deadline(), None);
    session.begin(&request(), T0).expect("encodes");
    let packets = sent(&mut session);
    let [Packet::Connect(connect)] = packets.as_slice() else {
        panic!("{packets:?}");
    };
    assert_eq!(connect.client_id, "demo-0001");
    assert!(connect.clean_session);
    assert_eq!(connect.keep_alive, 30);
    let login = connect.login.as_ref().expect("login");
    assert_eq!(
        (login.username.as_str(), login.password.as_str()),
        ("demo-0001", "secret")
    );
    let will = connect.last_will.as_ref().expect("will");
    assert_eq!(will.topic, "fleet/demo/demo-0001/status");
    assert_eq!(&will.message[..], b"gone");
    assert!(will.retain && will.qos == WireQoS::AtLeastOnce);
    assert!(!session.is_connected());
    receive(&mut session, &connack(ConnectReturnCode::Success));
    assert_eq!(drain(&mut session, T0), [Owned::ConnAck]);
    assert!(session.is_connected());

    // Without will and login; a QoS 2 will is refused.
    let mut bare = Tagged::new(options());
    let request = ConnectRequest {
        client_id: "x",
        login: None,
        will: None,
    };
    bare.begin(&request, T0).expect("encodes");
    let packets = sent(&mut bare);
    let [Packet::Connect(connect)] = packets.as_slice() else {
        panic!("{packets:?}");
    };
    assert!(connect.login.is_none() && connect.last_will.is_none());
    let qos2 = ConnectRequest {
        will: Some(message(b"x", QoS::ExactlyOnce)),
        ..request
    };
    assert_eq!(bare.begin(&qos2, T0), Err(SendError::Qos2));
    assert!(bare.is_idle() && !bare.has_output());
}

#[test]
fn pubacks_come_back_with_their_tags() {
    let mut session = connected(T0);
    let a = session
        .publish(&message(b"a", QoS::AtLeastOnce), false, 10, T0)
        .expect("queued")
        .expect("QoS 1 has an id");
    let b = session
        .publish(&message(b"b", QoS::AtLeastOnce), true, 11, T0)
        .expect("queued")
        .expect("QoS 1 has an id");
    let zero = session
        .publish(&message(b"hb", QoS::AtMostOnce), true, 99, T0)
        .expect("queued");
    assert_eq!(zero, None, "QoS 0 has no packet id");
    assert_ne!(a, b);
    assert_eq!(session.in_flight(), 2);
    let packets = sent(&mut session);
    let publishes: Vec<(u16, bool, &[u8])> = packets
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => (p.pkid, p.dup, &p.payload[..]),
            other => panic!("{other:?}"),
        })
        .collect();
    // DUP only where asked and only at QoS 1.
    assert_eq!(
        publishes,
        [
            (a, false, &b"a"[..]),
            (b, true, &b"b"[..]),
            (0, false, &b"hb"[..])
        ]
    );

    // Acknowledged out of order, and a stray ack: each maps back to its own tag.
    receive(&mut session, &Packet::PubAck(PubAck::new(b)));
    receive(&mut session, &Packet::PubAck(PubAck::new(777)));
    receive(&mut session, &Packet::PubAck(PubAck::new(a)));
    assert_eq!(
        drain(&mut session, T0),
        [
            Owned::PubAck(b, Some(11)),
            Owned::PubAck(777, None),
            Owned::PubAck(a, Some(10)),
        ]
    );
    assert_eq!(session.in_flight(), 0);
}

#[test]
fn unacknowledged_events_go_again_with_dup_after_a_reconnect() {
    let mut session = connected(T0);
    let first = session
        .publish(&message(b"ev", QoS::AtLeastOnce), false, 5, T0)
        .expect("queued")
        .expect("id");
    let _ = sent(&mut session);
    // The link dies before the PUBACK: a clean session forgets it.
    session.reset();
    assert_eq!(session.in_flight(), 0);
    assert!(session.is_idle());
    session.begin(&request(), T0 + 100).expect("encodes");
    let _ = sent(&mut session);
    receive(&mut session, &connack(ConnectReturnCode::Success));
    assert_eq!(drain(&mut session, T0 + 100), [Owned::ConnAck]);
    let again = session
        .publish(&message(b"ev", QoS::AtLeastOnce), true, 5, T0 + 100)
        .expect("queued")
        .expect("id");
    let packets = sent(&mut session);
    let [Packet::Publish(publish)] = packets.as_slice() else {
        panic!("{packets:?}");
    };
    assert!(publish.dup);
    assert_eq!(publish.pkid, again);
    assert_ne!(again, first, "ids go on after a reset");
    // A PUBACK of the old id is stray now; the new one carries the tag.
    receive(&mut session, &Packet::PubAck(PubAck::new(first)));
    receive(&mut session, &Packet::PubAck(PubAck::new(again)));
    assert_eq!(
        drain(&mut session, T0 + 100),
        [Owned::PubAck(first, None), Owned::PubAck(again, Some(5))]
    );
}

#[test]
fn packet_ids_skip_zero_and_those_in_flight_and_are_bounded() {
    // A transmit buffer large enough for 20 publishes at once.
    let mut session: Session<u32, 256, 1024> = connected_with(T0);
    session.next_pkid = u16::MAX - 1;
    let mut ids = Vec::new();
    for tag in 0..MAX_INFLIGHT as u32 {
        ids.push(
            session
                .publish(&message(b"x", QoS::AtLeastOnce), false, tag, T0)
                .expect("room")
                .expect("id"),
        );
    }
    assert_eq!(&ids[..3], [u16::MAX, 1, 2], "wraps past 0");
    assert_eq!(
        session.publish(&message(b"x", QoS::AtLeastOnce), false, 0, T0),
        Err(SendError::InFlightFull)
    );
    assert!(!session.can_publish(26, 1, QoS::AtLeastOnce));
    // QoS 0 still goes.
    assert!(session.can_publish(26, 1, QoS::AtMostOnce));
    assert!(
        session
            .publish(&message(b"x", QoS::AtMostOnce), false, 0, T0)
            .is_ok()
    );
    // Free one in the middle, then wrap around again: ids in flight are never reused.
    receive(&mut session, &Packet::PubAck(PubAck::new(2)));
    assert!(session.next_incoming(T0).expect("valid").is_some());
    session.next_pkid = u16::MAX - 1;
    let next = session
        .publish(&message(b"x", QoS::AtLeastOnce), false, 0, T0)
        .expect("room");
    assert_eq!(next, Some(2));
    // Subscriptions take ids from the same space.
    let _ = sent(&mut session);
    let sub = session
        .subscribe("fleet/demo/demo-0001/cmd", QoS::AtLeastOnce, T0)
        .expect("queued");
    assert!(!ids.contains(&sub) || sub == 2);
    let packets = sent(&mut session);
    let [Packet::Subscribe(subscribe)] = packets.as_slice() else {
        panic!("{packets:?}");
    };
    assert_eq!(subscribe.pkid, sub);
    assert_eq!(subscribe.filters[0].path, "fleet/demo/demo-0001/cmd");
    assert_eq!(subscribe.filters[0].qos, WireQoS::AtLeastOnce);
    receive(
        &mut session,
        &Packet::SubAck(SubAck::new(sub, vec![SubscribeReasonCode::Failure])),
    );
    assert_eq!(drain(&mut session, T0), [Owned::SubAck(sub, true)]);
    // A lost link forgets them all.
    session.reset();
    assert_eq!(session.in_flight(), 0);
    assert_eq!(
        session.publish(&message(b"x", QoS::AtMostOnce), false, 0, T0),
        Err(SendError::NotConnected)
    );
}

#[test]
fn pings_when_quiet_and_times_out_without_pingresp() {
    let mut session = connected(T0);
    assert_eq!(session.deadline(), Some(T0 + KEEP_ALIVE));
    // Busy sending: no ping, but nothing received either, so the keep-alive still runs
    // from the last packet received.
    let later = T0 + 20_000;
    session
        .publish(&message(b"hb", QoS::AtMostOnce), false, 0, later)
        .expect("queued");
    let _ = sent(&mut session);
    session.on_timer(later).expect("alive");
    assert!(!session.has_output());
    assert_eq!(session.deadline(), Some(T0 + KEEP_ALIVE));

    let due = T0 + KEEP_ALIVE;
    session.on_timer(due).expect("alive");
    assert_eq!(sent(&mut session), [Packet::PingReq]);
    assert_eq!(session.deadline(), Some(due + PING_TIMEOUT));
    // The PINGRESP comes: the link lives on, the next ping is a keep-alive later.
    receive(&mut session, &Packet::PingResp);
    assert_eq!(session.next_incoming(due + 1000).expect("valid"), None);
    session.on_timer(due + PING_TIMEOUT).expect("answered");
    assert!(!session.has_output());

    // The next one, a keep-alive after the last PINGREQ, is never answered.
    let next = due + KEEP_ALIVE;
    assert_eq!(session.deadline(), Some(next));
    session.on_timer(next).expect("alive");
    assert_eq!(sent(&mut session), [Packet::PingReq]);
    let timed_out = expires_at(&mut session, next + PING_TIMEOUT);
    assert_eq!(timed_out, SessionError::PingTimeout { ms: PING_TIMEOUT });

    // No keep-alive: no timer once connected.
    let mut quiet = Tagged::new(SessionOptions::new(0));
    quiet.begin(&request(), T0).expect("encodes");
    receive(&mut quiet, &connack(ConnectReturnCode::Success));
    assert!(quiet.next_incoming(T0).expect("valid").is_some());
    assert_eq!(quiet.deadline(), None);
}

#[test]
fn connack_must_come_in_time_and_be_a_success() {
    let mut session = Tagged::new(options());
    let request = ConnectRequest {
        client_id: "demo-0001",
        login: None,
        will: None,
    };
    session.begin(&request, T0).expect("encodes");
    assert_eq!(
        session.publish(&message(b"x", QoS::AtMostOnce), false, 0, T0),
        Err(SendError::NotConnected)
    );
    let timed_out = expires_at(&mut session, T0 + 5000);
    assert_eq!(timed_out, SessionError::ConnAckTimeout { ms: 5000 });

    session.begin(&request, T0).expect("encodes");
    receive(&mut session, &connack(ConnectReturnCode::NotAuthorized));
    assert_eq!(
        session.next_incoming(T0),
        Err(SessionError::Refused(ConnectRefusal::NotAuthorized))
    );
    session.begin(&request, T0).expect("encodes");
    receive(
        &mut session,
        &connack(ConnectReturnCode::BadUserNamePassword),
    );
    assert_eq!(
        session.next_incoming(T0),
        Err(SessionError::Refused(ConnectRefusal::BadCredentials))
    );

    session.begin(&request, T0).expect("encodes");
    receive(&mut session, &Packet::PingResp);
    assert_eq!(
        session.next_incoming(T0),
        Err(SessionError::Unexpected(PacketKind::PingResp))
    );
    // A second CONNACK once connected is a protocol error too.
    let mut session = connected(T0);
    receive(&mut session, &connack(ConnectReturnCode::Success));
    assert_eq!(
        session.next_incoming(T0),
        Err(SessionError::Unexpected(PacketKind::ConnAck))
    );
}

#[test]
fn incoming_qos1_publish_is_acknowledged_and_split_reads_reassemble() {
    let mut session = connected(T0);
    let mut command = WirePublish::new("fleet/demo/demo-0001/cmd", WireQoS::AtLeastOnce, [7u8; 40]);
    command.pkid = 42;
    command.retain = true;
    let bytes = encoded(&Packet::Publish(command));
    // It arrives in three pieces, read like a socket does.
    for piece in [&bytes[..1], &bytes[1..20], &bytes[20..]] {
        assert_eq!(session.next_incoming(T0).expect("valid"), None);
        let buffer = session.receive_buffer();
        buffer[..piece.len()].copy_from_slice(piece);
        session.received(piece.len());
    }
    match session.next_incoming(T0 + 5).expect("valid") {
        Some(Incoming::Publish(publish)) => {
            assert_eq!(publish.topic, "fleet/demo/demo-0001/cmd");
            assert_eq!(publish.payload, [7u8; 40]);
            assert_eq!(
                (publish.qos, publish.pkid, publish.retain, publish.dup),
                (QoS::AtLeastOnce, 42, true, false)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(session.next_incoming(T0).expect("valid"), None);
    assert_eq!(sent(&mut session), [Packet::PubAck(PubAck::new(42))]);
    // Receiving counts as traffic for the keep-alive; so does the PUBACK sent.
    assert_eq!(session.deadline(), Some(T0 + 5 + KEEP_ALIVE));
}

#[test]
fn refuses_an_oversized_packet_from_its_header() {
    // The largest packet the receive buffer holds is accepted.
    let mut session = connected(T0);
    let topic = "fleet/demo/demo-0001/cmd";
    // 1 + 2 (length) + 2 + topic + payload = DEFAULT_RX.
    let payload = vec![1u8; DEFAULT_RX - 5 - topic.len()];
    let largest = WirePublish::new(topic, WireQoS::AtMostOnce, payload.clone());
    receive(&mut session, &Packet::Publish(largest));
    assert_eq!(
        drain(&mut session, T0),
        [Owned::Publish(topic.to_string(), payload.clone(), 0)]
    );

    // One byte more: refused from its first 3 bytes.
    let mut too_big = payload.clone();
    too_big.push(1);
    let bytes = encoded(&Packet::Publish(WirePublish::new(
        topic,
        WireQoS::AtMostOnce,
        too_big,
    )));
    session.feed(&bytes[..3]);
    match session.next_incoming(T0) {
        Err(err @ SessionError::PacketTooLarge { size, max }) => {
            assert_eq!(max, DEFAULT_RX - 3);
            assert_eq!(size, DEFAULT_RX - 2);
            assert!(err.is_oversized());
        }
        other => panic!("{other:?}"),
    }

    // A PUBLISH announcing 1 MiB, and a tighter max_packet.
    let mut session = connected(T0);
    session.feed(&[0x30, 0x80, 0x80, 0x40]);
    assert!(matches!(
        session.next_incoming(T0),
        Err(SessionError::PacketTooLarge {
            size: 1_048_576,
            ..
        })
    ));
    let mut strict = Tagged::new(SessionOptions {
        max_packet: 64,
        ..options()
    });
    strict.begin(&request(), T0).expect("encodes");
    receive(&mut strict, &connack(ConnectReturnCode::Success));
    assert!(strict.next_incoming(T0).expect("valid").is_some());
    strict.feed(&[0x30, 65]);
    assert_eq!(
        strict.next_incoming(T0),
        Err(SessionError::PacketTooLarge { size: 65, max: 64 })
    );
}

#[test]
fn malformed_packets_are_errors() {
    let cases: &[(&[u8], SessionError)] = &[
        // A PUBACK without its packet id (mqttrs alone would index past the end).
        (
            &[0x40, 0],
            SessionError::Malformed("packet too short for its fields"),
        ),
        (
            &[0x40, 1, 0],
            SessionError::Malformed("packet too short for its fields"),
        ),
        // A QoS 1 PUBLISH whose topic fills it, leaving no packet id.
        (
            &[0x32, 3, 0, 1, b'a'],
            SessionError::Malformed("packet too short for its fields"),
        ),
        // A topic length past the end.
        (
            &[0x30, 2, 0, 9],
            SessionError::Malformed("packet too short for its fields"),
        ),
        // Not UTF-8.
        (
            &[0x30, 3, 0, 1, 0xFF],
            SessionError::Malformed("a string that is not UTF-8"),
        ),
        // QoS 3.
        (
            &[0x36, 5, 0, 1, b'a', 0, 1],
            SessionError::Malformed("QoS 3"),
        ),
        // Packet id 0.
        (&[0x40, 2, 0, 0], SessionError::Malformed("packet id 0")),
        // Bad flags on a PUBACK.
        (
            &[0x41, 2, 0, 1],
            SessionError::Malformed("bad fixed header flags"),
        ),
        // Reserved types.
        (&[0x00, 0], SessionError::Malformed("reserved packet type")),
        (&[0xF0, 0], SessionError::Malformed("reserved packet type")),
        // A remaining length of five bytes.
        (
            &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            SessionError::Malformed("remaining length longer than four bytes"),
        ),
        // Packets a client never receives.
        (&[0xC0, 0], SessionError::Unexpected(PacketKind::PingReq)),
        (
            &[0x82, 3, 0, 1, 0],
            SessionError::Unexpected(PacketKind::Subscribe),
        ),
        // QoS 2.
        (
            &[0x34, 5, 0, 1, b'a', 0, 1],
            SessionError::Unexpected(PacketKind::Publish),
        ),
        // A SUBACK without return codes.
        (
            &[0x90, 2, 0, 1],
            SessionError::Malformed("packet too short for its fields"),
        ),
    ];
    for (bytes, expected) in cases {
        let mut session = connected(T0);
        session.feed(bytes);
        assert_eq!(
            session.next_incoming(T0).as_ref(),
            Err(expected),
            "{bytes:02x?}"
        );
    }
}

/// Why the session checks each frame before it reads a field: mqttrs 0.4.1, the codec it
/// used before, panics on a truncated packet. (If this starts failing, a newer mqttrs checks
/// bounds itself.)
#[test]
fn mqttrs_alone_panics_on_truncated_packets() {
    for bytes in [&[0x40u8, 0][..], &[0x32, 3, 0, 1, b'a'], &[0x20, 0]] {
        let decoded = std::panic::catch_unwind(|| mqttrs::decode_slice(bytes).map(|_| ()));
        assert!(decoded.is_err(), "{bytes:02x?}");
    }
}

/// What mqttrs decodes a whole frame into, in the session's terms (`None`: an error).
fn mqttrs_view(bytes: &[u8]) -> Option<codec::Packet> {
    let frame = codec::frame(bytes, MAX_PACKET, 4096).ok()??;
    let packet = std::panic::catch_unwind(|| mqttrs::decode_slice(bytes)).ok()?;
    Some(match packet.ok()?? {
        mqttrs::Packet::Connack(ack) => codec::Packet::ConnAck {
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
        mqttrs::Packet::Puback(pid) => codec::Packet::PubAck { pkid: pid.get() },
        mqttrs::Packet::Suback(ack) => codec::Packet::SubAck {
            pkid: ack.pid.get(),
            refused: ack
                .return_codes
                .iter()
                .any(|code| matches!(code, mqttrs::SubscribeReturnCodes::Failure)),
        },
        mqttrs::Packet::Pingresp => codec::Packet::PingResp,
        mqttrs::Packet::Publish(publish) => {
            let (qos, pkid, pkid_len) = match publish.qospid {
                mqttrs::QosPid::AtMostOnce => (QoS::AtMostOnce, 0, 0),
                mqttrs::QosPid::AtLeastOnce(pid) => (QoS::AtLeastOnce, pid.get(), 2),
                mqttrs::QosPid::ExactlyOnce(_) => return None,
            };
            let topic_start = frame.header_len + 2;
            let topic_end = topic_start + publish.topic_name.len();
            codec::Packet::Publish {
                qos,
                pkid,
                dup: publish.dup,
                retain: publish.retain,
                topic: (topic_start, topic_end),
                payload: (topic_end + pkid_len, frame.total),
            }
        }
        _ => return None,
    })
}

/// Client-bound frames: mostly well-formed packets, with any byte changed now and then.
fn client_frame() -> impl Strategy<Value = Vec<u8>> {
    let body = proptest::collection::vec(any::<u8>(), 0..40);
    (
        prop_oneof![Just(0x20u8), Just(0x30), Just(0x40), Just(0x90), Just(0xD0)],
        0u8..16,
        body,
        proptest::option::of((any::<usize>(), any::<u8>())),
    )
        .prop_map(|(kind, flags, mut body, change)| {
            let flags = if flags < 8 { 0 } else { flags & 0x0F };
            if kind == 0x30 && body.len() >= 2 {
                // A topic length that mostly fits.
                let len = body.len().saturating_sub(2) as u16 / 2;
                body[..2].copy_from_slice(&len.to_be_bytes());
            }
            if let Some((at, byte)) = change
                && !body.is_empty()
            {
                let at = at % body.len();
                body[at] = byte;
            }
            let mut bytes = vec![kind | flags, body.len() as u8];
            bytes.extend_from_slice(&body);
            bytes
        })
}

proptest! {
    /// What the session's decoder takes, mqttrs (where it does not panic) reads the same;
    /// what mqttrs refuses, the session refuses. (The session is stricter: a packet longer
    /// than its fields is refused too.)
    #[test]
    fn decoding_agrees_with_mqttrs(bytes in client_frame()) {
        let Ok(Some(frame)) = codec::frame(&bytes, MAX_PACKET, 4096) else {
            return Ok(());
        };
        let ours = codec::decode(&bytes, &frame);
        let Ok(theirs) = std::panic::catch_unwind(|| mqttrs::decode_slice(&bytes).map(|_| ()))
        else {
            return Ok(());
        };
        if let Ok(packet) = ours {
            prop_assert_eq!(Some(packet), mqttrs_view(&bytes), "{:02x?}", bytes);
        }
        if theirs.is_err() {
            prop_assert!(ours.is_err(), "{:02x?}", bytes);
        }
    }

    /// The session encodes CONNECT, PUBLISH and SUBSCRIBE to the very bytes mqttrs writes.
    #[test]
    fn encoding_agrees_with_mqttrs(
        id in "[a-z0-9-]{0,30}",
        topic in "[a-z/]{0,60}",
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        login in proptest::option::of(("[a-z]{0,10}", "[ -~]{0,20}")),
        will in any::<bool>(),
        qos1 in any::<bool>(),
        retain in any::<bool>(),
        dup in any::<bool>(),
        pkid in 1u16..,
        keep_alive in any::<u16>(),
    ) {
        let qos = if qos1 { QoS::AtLeastOnce } else { QoS::AtMostOnce };
        let wire_qos = if qos1 { mqttrs::QoS::AtLeastOnce } else { mqttrs::QoS::AtMostOnce };
        let message = Message { topic: &topic, payload: &payload, qos, retain };
        let (mut ours, mut theirs) = ([0u8; 1024], [0u8; 1024]);

        let request = ConnectRequest {
            client_id: &id,
            login: login.as_ref().map(|(user, password)| (user.as_str(), password.as_str())),
            will: will.then_some(message),
        };
        let n = codec::encode_connect(&request, keep_alive, &mut ours).expect("fits");
        let connect = mqttrs::Connect {
            protocol: mqttrs::Protocol::MQTT311,
            keep_alive,
            client_id: &id,
            clean_session: true,
            last_will: will.then_some(mqttrs::LastWill {
                topic: &topic,
                message: &payload,
                qos: wire_qos,
                retain,
            }),
            username: login.as_ref().map(|(user, _)| user.as_str()),
            password: login.as_ref().map(|(_, password)| password.as_bytes()),
        };
        let m = mqttrs::encode_slice(&connect.into(), &mut theirs).expect("fits");
        prop_assert_eq!(&ours[..n], &theirs[..m]);

        let pid = mqttrs::Pid::try_from(pkid).expect("not 0");
        let n = codec::encode_publish(&message, qos1.then_some(pkid), dup, &mut ours)
            .expect("fits");
        let publish = mqttrs::Publish {
            dup: dup && qos1,
            qospid: if qos1 {
                mqttrs::QosPid::AtLeastOnce(pid)
            } else {
                mqttrs::QosPid::AtMostOnce
            },
            retain,
            topic_name: &topic,
            payload: &payload,
        };
        let m = mqttrs::encode_slice(&publish.into(), &mut theirs).expect("fits");
        prop_assert_eq!(&ours[..n], &theirs[..m]);
        prop_assert_eq!(n, codec::publish_len(topic.len(), payload.len(), qos));

        let n = codec::encode_subscribe(&topic, qos, pkid, &mut ours).expect("fits");
        let filter = mqttrs::SubscribeTopic {
            topic_path: topic.as_str().into(),
            qos: wire_qos,
        };
        let subscribe = mqttrs::Subscribe::new(pid, std::iter::once(filter).collect());
        let m = mqttrs::encode_slice(&subscribe.into(), &mut theirs).expect("fits");
        prop_assert_eq!(&ours[..n], &theirs[..m]);
        prop_assert_eq!(n, codec::subscribe_len(topic.len()));

        // Too small a buffer: refused, never a panic.
        prop_assert_eq!(
            codec::encode_publish(&message, None, false, &mut ours[..n.min(3)]),
            Err(SendError::OutputFull)
        );
    }
}

#[test]
fn closing_sends_disconnect_last_and_nothing_after() {
    let mut session = connected(T0);
    session
        .publish(&message(b"bye", QoS::AtLeastOnce), false, 1, T0)
        .expect("queued");
    session.disconnect(T0).expect("connected");
    assert_eq!(
        session.publish(&message(b"late", QoS::AtMostOnce), false, 0, T0),
        Err(SendError::NotConnected)
    );
    assert_eq!(session.disconnect(T0), Err(SendError::NotConnected));
    let packets = sent(&mut session);
    assert!(matches!(
        packets.as_slice(),
        [Packet::Publish(_), Packet::Disconnect]
    ));
    assert_eq!(session.deadline(), None);
}

#[test]
fn a_full_transmit_buffer_holds_publishes_back_but_never_a_ping_or_disconnect() {
    let mut session = connected(T0);
    let payload = [5u8; shared::MAX_PAYLOAD];
    let topic = "fleet/demo/demo-0001/event-with-a-long-name-to-fill-the-buffer-x";
    let large = Message {
        topic,
        payload: &payload,
        qos: QoS::AtMostOnce,
        retain: false,
    };
    let mut queued = 0;
    while session.can_publish(topic.len(), payload.len(), QoS::AtMostOnce) {
        session.publish(&large, false, 0, T0).expect("room");
        queued += 1;
    }
    assert!(queued >= 2, "two sealed publishes fit");
    assert_eq!(
        session.publish(&large, false, 0, T0),
        Err(SendError::OutputFull)
    );
    // The keep-alive and the goodbye still fit.
    session.on_timer(T0 + KEEP_ALIVE).expect("alive");
    session.disconnect(T0 + KEEP_ALIVE).expect("fits");
    let packets = sent(&mut session);
    assert_eq!(packets.len(), queued + 2);
    assert_eq!(packets[queued..], [Packet::PingReq, Packet::Disconnect]);

    // Written in part: the rest moves to the front to make room.
    let mut session = connected(T0);
    session.publish(&large, false, 0, T0).expect("room");
    session.publish(&large, false, 0, T0).expect("room");
    assert_eq!(
        session.publish(&large, false, 0, T0),
        Err(SendError::OutputFull)
    );
    let len = codec::publish_len(topic.len(), payload.len(), QoS::AtMostOnce);
    assert_eq!(session.output().len(), 2 * len);
    session.wrote(100);
    session
        .publish(&large, false, 0, T0)
        .expect("room after the write");
    assert_eq!(session.output().len(), 3 * len - 100);
    let mut rest = BytesMut::from(&session.output()[len - 100..]);
    for _ in 0..2 {
        assert!(matches!(
            Packet::read(&mut rest, 1 << 20),
            Ok(Packet::Publish(_))
        ));
    }
    assert!(rest.is_empty());

    // A packet that can never fit.
    let huge = [0u8; DEFAULT_TX];
    assert!(matches!(
        session.publish(&message(&huge, QoS::AtMostOnce), false, 0, T0),
        Err(SendError::Encode(_))
    ));
}

#[test]
fn a_qos1_command_waits_while_its_puback_has_no_room() {
    let mut session = connected(T0);
    // 4-byte publishes until fewer than 8 bytes are left: room for a PINGREQ and the
    // DISCONNECT, not for a PUBACK too.
    let tiny = Message {
        topic: "",
        payload: b"",
        qos: QoS::AtMostOnce,
        retain: false,
    };
    while session.publish(&tiny, false, 0, T0).is_ok() {}
    let mut command = WirePublish::new("fleet/demo/demo-0001/cmd", WireQoS::AtLeastOnce, [1u8; 8]);
    command.pkid = 9;
    receive(&mut session, &Packet::Publish(command));
    assert_eq!(session.next_incoming(T0).expect("valid"), None, "waits");
    let _ = sent(&mut session);
    assert!(matches!(
        session.next_incoming(T0).expect("valid"),
        Some(Incoming::Publish(Publish { pkid: 9, .. }))
    ));
    assert_eq!(sent(&mut session), [Packet::PubAck(PubAck::new(9))]);
}

#[test]
fn a_full_receive_buffer_takes_nothing_more_until_packets_are_taken() {
    let mut session = connected(T0);
    let ack = encoded(&Packet::PubAck(PubAck::new(1)));
    let mut stream = Vec::new();
    for _ in 0..DEFAULT_RX {
        stream.extend_from_slice(&ack);
    }
    let mut fed = session.feed(&stream);
    assert_eq!(fed, DEFAULT_RX);
    assert!(session.receive_buffer().is_empty());
    assert_eq!(session.feed(&stream[fed..]), 0);
    let mut acks = drain(&mut session, T0).len();
    while fed < stream.len() {
        fed += session.feed(&stream[fed..]);
        acks += drain(&mut session, T0).len();
    }
    assert_eq!(acks, DEFAULT_RX);
}

/// The RAM budget of one vehicle's session (the firmware's is ≤ 8 KiB for the device core,
/// its outbox and the session together).
#[test]
fn a_vehicle_session_stays_within_its_budget() {
    let size = core::mem::size_of::<VehicleSession<u32>>();
    // RX + TX, 20 × (packet id, tag), timers and indices.
    assert!(size <= DEFAULT_RX + DEFAULT_TX + 320, "{size} bytes");
    println!("VehicleSession<u32>: {size} bytes");
    // The largest packets a vehicle sends and receives fit.
    let topic = shared::topic::TopicName::new().capacity();
    assert_eq!(topic, MAX_TOPIC);
    assert_eq!(LARGEST_PUBLISH, 215);
    assert!(codec::publish_len(topic, shared::MAX_PAYLOAD, QoS::AtLeastOnce) <= DEFAULT_RX);
    assert!(
        2 * codec::publish_len(topic, shared::MAX_PAYLOAD, QoS::AtLeastOnce) + RESERVE
            <= DEFAULT_TX
    );
}

#[test]
fn a_connect_with_the_largest_will_and_login_fits() {
    let topic = "f".repeat(shared::topic::TopicName::new().capacity());
    let id = "v".repeat(shared::VehicleId::CAPACITY);
    let password = "p".repeat(64);
    let payload = [0u8; shared::MAX_PAYLOAD];
    let mut session = Tagged::new(options());
    session
        .begin(
            &ConnectRequest {
                client_id: &id,
                login: Some((&id, &password)),
                will: Some(Message {
                    topic: &topic,
                    payload: &payload,
                    qos: QoS::AtLeastOnce,
                    retain: true,
                }),
            },
            T0,
        )
        .expect("fits");
    assert!(matches!(
        sent(&mut session).as_slice(),
        [Packet::Connect(_)]
    ));
}

/// A broker's stream of valid packets for a connected session.
fn valid_packets() -> impl Strategy<Value = Vec<Packet>> {
    let packet = prop_oneof![
        (1u16..).prop_map(|pkid| Packet::PubAck(PubAck::new(pkid))),
        Just(Packet::PingResp),
        (1u16.., any::<bool>()).prop_map(|(pkid, refused)| Packet::SubAck(SubAck::new(
            pkid,
            vec![if refused {
                SubscribeReasonCode::Failure
            } else {
                SubscribeReasonCode::Success(WireQoS::AtLeastOnce)
            }]
        ))),
        (
            "[a-z/]{0,40}",
            proptest::collection::vec(any::<u8>(), 0..128),
            1u16..,
            any::<bool>()
        )
            .prop_map(|(topic, payload, pkid, qos1)| {
                let qos = if qos1 {
                    WireQoS::AtLeastOnce
                } else {
                    WireQoS::AtMostOnce
                };
                let mut publish = WirePublish::new(topic, qos, payload);
                publish.pkid = if qos1 { pkid } else { 0 };
                Packet::Publish(publish)
            }),
    ];
    proptest::collection::vec(packet, 0..12)
}

proptest! {
    /// Whatever a vehicle publishes is encoded as valid MQTT with its topic, payload, QoS,
    /// retain and DUP (only at QoS 1), or refused as not fitting; never a panic.
    #[test]
    fn publishes_encode_to_valid_packets(
        topic in "[a-z0-9/]{0,120}",
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        qos1 in any::<bool>(),
        dup in any::<bool>(),
        retain in any::<bool>(),
    ) {
        let mut session = connected(T0);
        let qos = if qos1 { QoS::AtLeastOnce } else { QoS::AtMostOnce };
        let message = Message { topic: &topic, payload: &payload, qos, retain };
        let fits = publish_len(topic.len(), payload.len(), qos) <= session.output_room();
        prop_assert_eq!(session.can_publish(topic.len(), payload.len(), qos), fits);
        match session.publish(&message, dup, 7, T0) {
            Ok(pkid) => {
                prop_assert!(fits);
                prop_assert_eq!(session.output().len(), publish_len(topic.len(), payload.len(), qos));
                let packets = sent(&mut session);
                let [Packet::Publish(publish)] = packets.as_slice() else {
                    panic!("{packets:?}");
                };
                prop_assert_eq!(&publish.topic, &topic);
                prop_assert_eq!(&publish.payload[..], &payload[..]);
                prop_assert_eq!(publish.retain, retain);
                prop_assert_eq!(publish.dup, dup && qos1);
                prop_assert_eq!(publish.pkid, pkid.unwrap_or(0));
                prop_assert_eq!(publish.qos == WireQoS::AtLeastOnce, qos1);
            }
            Err(err) => {
                prop_assert!(!fits, "{err}");
                prop_assert!(!session.has_output());
                prop_assert_eq!(session.in_flight(), 0);
            }
        }
    }

    /// Arbitrary bytes from a broker: errors or packets, never a panic, never more output
    /// than the buffer.
    #[test]
    fn arbitrary_bytes_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)
    ) {
        for connected_first in [true, false] {
            let mut session = if connected_first {
                connected(T0)
            } else {
                let mut session = Tagged::new(options());
                session.begin(&request(), T0).expect("encodes");
                session
            };
            'feed: for chunk in &chunks {
                let mut rest = &chunk[..];
                loop {
                    let n = session.feed(rest);
                    rest = &rest[n..];
                    loop {
                        match session.next_incoming(T0) {
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(_) => break 'feed,
                        }
                    }
                    let written = session.output().len();
                    prop_assert!(written <= DEFAULT_TX);
                    session.wrote(written);
                    if rest.is_empty() || n == 0 && session.receive_buffer().is_empty() {
                        break;
                    }
                }
            }
        }
    }

    /// Valid packets in arbitrary pieces decode to the same as when they come whole, and
    /// every QoS 1 publish is acknowledged.
    #[test]
    fn chunked_valid_packets_decode_the_same(
        packets in valid_packets(),
        cuts in proptest::collection::vec(1usize..64, 0..40),
    ) {
        let stream: Vec<u8> = packets.iter().flat_map(encoded).collect();
        let expected: Vec<Owned> = packets
            .iter()
            .filter_map(|p| match p {
                Packet::PubAck(ack) => Some(Owned::PubAck(ack.pkid, None)),
                Packet::SubAck(ack) => Some(Owned::SubAck(
                    ack.pkid,
                    matches!(ack.return_codes[0], SubscribeReasonCode::Failure),
                )),
                Packet::Publish(p) => {
                    Some(Owned::Publish(p.topic.clone(), p.payload.to_vec(), p.pkid))
                }
                _ => None,
            })
            .collect();
        let acks: Vec<Packet> = packets
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) if p.qos == WireQoS::AtLeastOnce => {
                    Some(Packet::PubAck(PubAck::new(p.pkid)))
                }
                _ => None,
            })
            .collect();
        let mut session = connected(T0);
        let mut got = Vec::new();
        let mut written = Vec::new();
        let mut at = 0;
        let mut cut = cuts.iter().cycle();
        while at < stream.len() {
            let len = cut.next().copied().unwrap_or(stream.len()).min(stream.len() - at);
            at += session.feed(&stream[at..at + len]);
            got.extend(drain(&mut session, T0));
            written.extend(sent(&mut session));
        }
        got.extend(drain(&mut session, T0));
        written.extend(sent(&mut session));
        prop_assert_eq!(got, expected);
        prop_assert_eq!(written, acks);
    }
}
