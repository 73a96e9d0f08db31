//! The MQTT client state's unit tests: CONNECT contents, packet ids and their tags, keep-alive,
//! timeouts, incoming publishes, buffer sizes.

use super::*;

type Tagged = ClientState<u32>;

const KEEP_ALIVE: Duration = Duration::from_secs(30);

fn options() -> ClientOptions {
    ClientOptions {
        ping_timeout: Duration::from_secs(10),
        ..ClientOptions::new(KEEP_ALIVE)
    }
}

/// Decodes every packet in the client state's output, as a broker would, and marks it written.
fn sent(client: &mut Tagged) -> Vec<Packet> {
    let mut bytes = BytesMut::from(client.output());
    client.wrote(bytes.len());
    let mut packets = Vec::new();
    while !bytes.is_empty() {
        packets.push(Packet::read(&mut bytes, 1 << 20).expect("a valid packet"));
    }
    packets
}

/// Feeds the broker's `packet` to the client.
fn receive(client: &mut Tagged, packet: &Packet) {
    let mut bytes = BytesMut::new();
    packet.write(&mut bytes, 1 << 20).expect("encodes");
    client.read_buffer().extend_from_slice(&bytes);
}

fn connected(now: Instant) -> Tagged {
    let mut client = Tagged::new(options());
    let request = ConnectRequest {
        client_id: "demo-0001",
        login: Some(("demo-0001", "secret")),
        will: Some(Message {
            topic: "fleet/demo/demo-0001/status",
            payload: b"gone",
            qos: QoS::AtLeastOnce,
            retain: true,
        }),
    };
    client.begin(&request, now).expect("encodes");
    let packets = sent(&mut client);
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
    assert!(will.retain && will.qos == QoS::AtLeastOnce);
    assert!(!client.is_connected());
    receive(
        &mut client,
        &Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
    );
    assert_eq!(
        client.next_incoming(now).expect("valid"),
        Some(Incoming::ConnAck)
    );
    assert!(client.is_connected());
    client
}

/// Asserts that `client`'s timer still passes a second before `deadline` and fails at it;
/// returns the failure.
fn expires_at(client: &mut Tagged, deadline: Instant) -> LinkError {
    client
        .on_timer(deadline - Duration::from_secs(1))
        .expect("still within the timeout");
    client.on_timer(deadline).expect_err("timed out")
}

fn message(payload: &[u8], qos: QoS) -> Message<'_> {
    Message {
        topic: "fleet/demo/demo-0001/event",
        payload,
        qos,
        retain: false,
    }
}

#[test]
fn pubacks_come_back_with_their_tags() {
    let now = Instant::now();
    let mut client = connected(now);
    let a = client
        .publish(&message(b"a", QoS::AtLeastOnce), false, 10, now)
        .expect("queued");
    let b = client
        .publish(&message(b"b", QoS::AtLeastOnce), true, 11, now)
        .expect("queued");
    let zero = client
        .publish(&message(b"hb", QoS::AtMostOnce), true, 99, now)
        .expect("queued");
    assert_eq!(zero, 0, "QoS 0 has no packet id");
    assert_ne!(a, b);
    assert_eq!(client.in_flight(), 2);
    let packets = sent(&mut client);
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
    receive(&mut client, &Packet::PubAck(PubAck::new(b)));
    receive(&mut client, &Packet::PubAck(PubAck::new(777)));
    receive(&mut client, &Packet::PubAck(PubAck::new(a)));
    let acks: Vec<_> = std::iter::from_fn(|| client.next_incoming(now).expect("valid")).collect();
    assert_eq!(
        acks,
        [
            Incoming::PubAck {
                pkid: b,
                tag: Some(11)
            },
            Incoming::PubAck {
                pkid: 777,
                tag: None
            },
            Incoming::PubAck {
                pkid: a,
                tag: Some(10)
            },
        ]
    );
    assert_eq!(client.in_flight(), 0);
}

#[test]
fn packet_ids_skip_zero_and_those_in_flight_and_are_bounded() {
    let now = Instant::now();
    let mut client = connected(now);
    client.next_pkid = u16::MAX - 1;
    let mut ids = Vec::new();
    for tag in 0..MAX_INFLIGHT as u32 {
        ids.push(
            client
                .publish(&message(b"x", QoS::AtLeastOnce), false, tag, now)
                .expect("room"),
        );
    }
    assert_eq!(&ids[..3], [u16::MAX, 1, 2], "wraps past 0");
    assert!(matches!(
        client.publish(&message(b"x", QoS::AtLeastOnce), false, 0, now),
        Err(SendError::InFlightFull)
    ));
    // QoS 0 still goes.
    assert!(
        client
            .publish(&message(b"x", QoS::AtMostOnce), false, 0, now)
            .is_ok()
    );
    // Free one in the middle, then wrap around again: ids in flight are never reused.
    receive(&mut client, &Packet::PubAck(PubAck::new(2)));
    assert!(client.next_incoming(now).expect("valid").is_some());
    client.next_pkid = u16::MAX - 1;
    let next = client
        .publish(&message(b"x", QoS::AtLeastOnce), false, 0, now)
        .expect("room");
    assert_eq!(next, 2);
    // A lost link forgets them all.
    client.reset();
    assert_eq!(client.in_flight(), 0);
    assert!(matches!(
        client.publish(&message(b"x", QoS::AtMostOnce), false, 0, now),
        Err(SendError::NotConnected)
    ));
}

#[test]
fn pings_when_quiet_and_times_out_without_pingresp() {
    let start = Instant::now();
    let mut client = connected(start);
    assert_eq!(client.deadline(), Some(start + KEEP_ALIVE));
    // Busy sending: no ping, but nothing received either, so the keep-alive still runs
    // from the last packet received.
    let later = start + Duration::from_secs(20);
    client
        .publish(&message(b"hb", QoS::AtMostOnce), false, 0, later)
        .expect("queued");
    let _ = sent(&mut client);
    client.on_timer(later).expect("alive");
    assert!(!client.has_output());
    assert_eq!(client.deadline(), Some(start + KEEP_ALIVE));

    let due = start + KEEP_ALIVE;
    client.on_timer(due).expect("alive");
    assert_eq!(sent(&mut client), [Packet::PingReq]);
    assert_eq!(client.deadline(), Some(due + Duration::from_secs(10)));
    // The PINGRESP comes: the link lives on, the next ping is a keep-alive later.
    receive(&mut client, &Packet::PingResp);
    let answered = due + Duration::from_secs(1);
    assert_eq!(client.next_incoming(answered).expect("valid"), None);
    client
        .on_timer(due + Duration::from_secs(10))
        .expect("answered");
    assert!(!client.has_output());

    // The next one, a keep-alive after the last PINGREQ, is never answered.
    let next = due + KEEP_ALIVE;
    assert_eq!(client.deadline(), Some(next));
    client.on_timer(next).expect("alive");
    assert_eq!(sent(&mut client), [Packet::PingReq]);
    let timed_out = expires_at(&mut client, next + Duration::from_secs(10));
    assert!(matches!(timed_out, LinkError::PingTimeout(_)));
}

#[test]
fn connack_must_come_in_time_and_be_a_success() {
    let now = Instant::now();
    let mut client = Tagged::new(options());
    let request = ConnectRequest {
        client_id: "demo-0001",
        login: None,
        will: None,
    };
    client.begin(&request, now).expect("encodes");
    assert!(matches!(
        client.publish(&message(b"x", QoS::AtMostOnce), false, 0, now),
        Err(SendError::NotConnected)
    ));
    let timed_out = expires_at(&mut client, now + Duration::from_secs(5));
    assert!(matches!(timed_out, LinkError::ConnAckTimeout(_)));

    client.begin(&request, now).expect("encodes");
    receive(
        &mut client,
        &Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false)),
    );
    assert!(matches!(
        client.next_incoming(now),
        Err(LinkError::Refused(ConnectReturnCode::NotAuthorized))
    ));

    client.begin(&request, now).expect("encodes");
    receive(&mut client, &Packet::PingResp);
    assert!(matches!(
        client.next_incoming(now),
        Err(LinkError::Unexpected(PacketType::PingResp))
    ));
}

#[test]
fn incoming_qos1_publish_is_acknowledged_and_split_reads_reassemble() {
    let now = Instant::now();
    let mut client = connected(now);
    let mut command = Publish::new("fleet/demo/demo-0001/cmd", QoS::AtLeastOnce, vec![7u8; 40]);
    command.pkid = 42;
    let mut bytes = BytesMut::new();
    Packet::Publish(command.clone())
        .write(&mut bytes, 1 << 20)
        .expect("encodes");
    // It arrives in three pieces.
    for piece in [&bytes[..1], &bytes[1..20], &bytes[20..]] {
        assert_eq!(client.next_incoming(now).expect("valid"), None);
        client.read_buffer().extend_from_slice(piece);
    }
    assert_eq!(
        client.next_incoming(now).expect("valid"),
        Some(Incoming::Publish(command))
    );
    assert_eq!(sent(&mut client), [Packet::PubAck(PubAck::new(42))]);
}

#[test]
fn grows_for_a_large_packet_refuses_an_oversized_one_and_shrinks_back() {
    let now = Instant::now();
    let mut client = connected(now);
    assert!(client.read_buffer().capacity() <= READ_BUFFER);
    // 3000 bytes: more than the read buffer, within the limit.
    let big = Publish::new("fleet/demo/demo-0001/cmd", QoS::AtMostOnce, vec![1u8; 3000]);
    let mut bytes = BytesMut::new();
    Packet::Publish(big.clone())
        .write(&mut bytes, 1 << 20)
        .expect("encodes");
    let mut fed = 0;
    let mut decoded = None;
    while decoded.is_none() {
        // Read like a socket does: at most the spare capacity.
        let buffer = client.read_buffer();
        let room = buffer.capacity() - buffer.len();
        let n = room.min(bytes.len() - fed);
        assert!(n > 0, "the buffer makes room");
        buffer.extend_from_slice(&bytes[fed..fed + n]);
        fed += n;
        decoded = client.next_incoming(now).expect("within the limit");
    }
    assert_eq!(decoded, Some(Incoming::Publish(big)));
    assert_eq!(client.next_incoming(now).expect("empty"), None);
    assert!(
        client.read_buffer().capacity() <= READ_BUFFER,
        "back to a small buffer after the burst"
    );

    // Above the limit: refused from its header alone, before it is buffered.
    let huge = Publish::new(
        "fleet/demo/demo-0001/cmd",
        QoS::AtMostOnce,
        vec![1u8; MAX_PACKET],
    );
    let mut bytes = BytesMut::new();
    Packet::Publish(huge)
        .write(&mut bytes, 1 << 20)
        .expect("encodes");
    client.read_buffer().extend_from_slice(&bytes[..8]);
    match client.next_incoming(now) {
        Err(err @ LinkError::PacketTooLarge { size, max }) => {
            assert_eq!(max, MAX_PACKET);
            assert!(size > MAX_PACKET);
            assert!(err.is_oversized());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn closing_sends_disconnect_last_and_nothing_after() {
    let now = Instant::now();
    let mut client = connected(now);
    client
        .publish(&message(b"bye", QoS::AtLeastOnce), false, 1, now)
        .expect("queued");
    client.disconnect(now).expect("connected");
    assert!(matches!(
        client.publish(&message(b"late", QoS::AtMostOnce), false, 0, now),
        Err(SendError::NotConnected)
    ));
    let packets = sent(&mut client);
    assert!(matches!(
        packets.as_slice(),
        [Packet::Publish(_), Packet::Disconnect]
    ));
    assert_eq!(client.deadline(), None);
}

#[test]
fn reuses_its_buffers_across_publishes() {
    let now = Instant::now();
    let mut client = connected(now);
    let payload = [5u8; shared::MAX_PAYLOAD];
    for _ in 0..1000 {
        client
            .publish(&message(&payload, QoS::AtMostOnce), false, 0, now)
            .expect("queued");
        let n = client.output().len();
        client.wrote(n);
    }
    assert!(
        client.write.capacity() <= WRITE_BUFFER,
        "{}",
        client.write.capacity()
    );
    assert!(client.scratch.capacity() <= shared::MAX_PAYLOAD);
    assert!(client.outgoing.payload.is_empty(), "no payload kept alive");
}
