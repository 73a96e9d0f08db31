//! The link's tests over loopback TCP against a scripted broker: a session's bytes go out
//! and come in, a full receive buffer is never mistaken for a closed socket, and the clock
//! maps deadlines to instants.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;
use crate::session::{ConnectRequest, Incoming, SessionOptions, VehicleSession};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test(start_paused = true)]
async fn the_clock_maps_milliseconds_to_instants() {
    let clock = SessionClock::new();
    let start = Instant::now();
    assert_eq!(clock.now_ms(), 0);
    tokio::time::advance(Duration::from_millis(1500)).await;
    assert_eq!(clock.now_ms(), 1500);
    assert_eq!(clock.instant(30_000), start + Duration::from_secs(30));
}

/// CONNECT out, CONNACK and more PUBACKs than the receive buffer holds in, then a clean
/// close: every PUBACK arrives, none is lost while the buffer is full.
#[tokio::test]
async fn moves_a_sessions_bytes_both_ways() {
    const ACKS: u16 = 200;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let broker = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut first = [0u8; 2];
        socket.read_exact(&mut first).await.expect("CONNECT header");
        assert_eq!(first[0], 0x10, "a CONNECT");
        let mut rest = vec![0u8; usize::from(first[1])];
        socket.read_exact(&mut rest).await.expect("CONNECT body");
        let mut reply = vec![0x20, 2, 0, 0];
        for pkid in 1..=ACKS {
            let [hi, lo] = pkid.to_be_bytes();
            reply.extend_from_slice(&[0x40, 2, hi, lo]);
        }
        socket.write_all(&reply).await.expect("write");
        // Then the DISCONNECT, and the end.
        let mut tail = Vec::new();
        socket.read_to_end(&mut tail).await.expect("read");
        assert_eq!(tail, [0xE0, 0]);
    });
    let mut link = tokio::time::timeout(WAIT, Link::connect("127.0.0.1", port, None, WAIT))
        .await
        .expect("in time")
        .expect("connects");
    let clock = SessionClock::new();
    let mut session: VehicleSession<()> = Session::new(SessionOptions::new(30));
    let request = ConnectRequest {
        client_id: "link-test",
        login: None,
        will: None,
    };
    session.begin(&request, clock.now_ms()).expect("encodes");
    let mut acks = 0;
    let mut connected = false;
    while acks < ACKS {
        tokio::time::timeout(WAIT, link.exchange(&mut session))
            .await
            .expect("in time")
            .expect("exchanges");
        while let Some(incoming) = session.next_incoming(clock.now_ms()).expect("valid") {
            match incoming {
                Incoming::ConnAck => connected = true,
                Incoming::PubAck { pkid, tag: None } => {
                    acks += 1;
                    assert_eq!(pkid, acks);
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(connected);
    session.disconnect(clock.now_ms()).expect("connected");
    tokio::time::timeout(WAIT, link.close(&mut session))
        .await
        .expect("in time")
        .expect("closes");
    tokio::time::timeout(WAIT, broker)
        .await
        .expect("in time")
        .expect("broker");
}

#[test]
fn an_oversized_packet_is_told_apart() {
    let oversized = LinkError::from(crate::session::SessionError::PacketTooLarge {
        size: 9000,
        max: 253,
    });
    assert!(oversized.is_oversized());
    assert!(!LinkError::Closed.is_oversized());
    assert_eq!(
        oversized.to_string(),
        "the broker sent a packet of 9000 bytes, more than the 253 a vehicle accepts"
    );
}
