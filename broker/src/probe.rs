//! The listener probe: a minimal MQTT client over a raw socket that connects (clean session,
//! the broker's own [`ProbeLogin`]), publishes one QoS 0 message and closes the connection; and
//! [`ProbeReceiver`], the broker's internal connection that must receive that message for the
//! listener to count as alive (end to end: accept, our connection task, the router).
//!
//! The client is written by hand (its packets with `shared::frame`) rather than with an MQTT
//! client crate: it needs three packets, and it must report exactly what a listener answered,
//! including "not MQTT at all".

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use shared::frame::{Connect, FrameHeader, MalformedLength, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use crate::auth::constant_time_eq;
use crate::connection::pending::PendingConnects;
use crate::error::ProbeError;
use crate::listener::Listener;

/// Keep-alive announced in CONNECT, in seconds. rumqttd refuses 0.
const KEEP_ALIVE_SECS: u16 = 10;

/// CONNACK bodies are a few bytes (v5 adds properties); refuse to buffer a stranger's novel.
const MAX_CONNACK_LEN: usize = 256;

/// The broker's own login for its listener probes: random per broker, never in the
/// credentials file.
#[derive(Debug, Clone)]
pub(crate) struct ProbeLogin {
    pub(crate) username: String,
    pub(crate) password: String,
}

impl ProbeLogin {
    /// Whether a CONNECT's login is the probe's: `None` if the username is not the probe's,
    /// else whether the password matches.
    pub(crate) fn admits(&self, username: Option<&str>, password: Option<&str>) -> Option<bool> {
        (username == Some(self.username.as_str())).then(|| {
            password.is_some_and(|p| constant_time_eq(p.as_bytes(), self.password.as_bytes()))
        })
    }
}

/// The one message a probe publishes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProbeMessage<'a> {
    /// MQTT client id; none of `+ # / $`.
    pub(crate) client_id: &'a str,
    /// Username and password, if the listener wants them.
    pub(crate) login: Option<&'a ProbeLogin>,
    /// Topic published to.
    pub(crate) topic: &'a str,
    /// Payload published.
    pub(crate) payload: &'a [u8],
}

/// Connects to `addr`, completes CONNECT/CONNACK for `listener`'s protocol version, publishes
/// `message` at QoS 0 and closes the connection, all before `deadline`.
///
/// Returns once the PUBLISH is written; whether the message reached a router is for the caller
/// to observe. No DISCONNECT is sent: rumqttd 0.20 handles one twice and logs a spurious
/// "no-connection id .. is already gone" error, while a closed socket is a plain disconnect.
///
/// The connection is exempt from the bound on connections awaiting CONNECT (`pending`): it
/// comes from a socket bound first, whose address is registered there.
async fn publish_once(
    addr: SocketAddr,
    listener: Listener,
    message: ProbeMessage<'_>,
    deadline: Instant,
    pending: &Arc<PendingConnects>,
) -> Result<(), ProbeError> {
    let started = Instant::now();
    let elapsed = move || ProbeError::TimedOut(started.elapsed());

    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(ProbeError::Connect)?;
    // The listener's address is one of this host's: bind there, so the broker sees exactly
    // the address registered.
    socket
        .bind(SocketAddr::new(addr.ip(), 0))
        .map_err(ProbeError::Connect)?;
    let _exemption = pending.exempt(socket.local_addr().map_err(ProbeError::Connect)?);
    let mut stream: TcpStream = timeout_at(deadline, socket.connect(addr))
        .await
        .map_err(|_| elapsed())?
        .map_err(ProbeError::Connect)?;
    // Small packets, one round trip: do not let Nagle hold them back.
    stream.set_nodelay(true).map_err(ProbeError::Io)?;

    let exchange = async {
        stream
            .write_all(&connect_packet(listener, message.client_id, message.login))
            .await
            .map_err(ProbeError::Io)?;
        read_connack(&mut stream, listener).await?;
        let publish = publish_packet(listener, message.topic, message.payload);
        stream.write_all(&publish).await.map_err(ProbeError::Io)?;
        // FIN after the PUBLISH: rumqttd reads the message, then sees a closed connection.
        stream.shutdown().await.map_err(ProbeError::Io)
    };
    timeout_at(deadline, exchange)
        .await
        .map_err(|_| elapsed())?
}

/// A CONNECT with a clean session, no will, and `login` if given.
fn connect_packet(listener: Listener, client_id: &str, login: Option<&ProbeLogin>) -> Vec<u8> {
    Connect {
        v5: listener == Listener::V5,
        client_id,
        keep_alive: KEEP_ALIVE_SECS,
        login: login.map(|login| (login.username.as_str(), login.password.as_str())),
        ..Connect::default()
    }
    .bytes()
}

/// A QoS 0 PUBLISH (no packet id), not retained.
fn publish_packet(listener: Listener, topic: &str, payload: &[u8]) -> Vec<u8> {
    Publish {
        v5: listener == Listener::V5,
        topic: topic.as_bytes(),
        payload,
        ..Publish::default()
    }
    .bytes()
}

/// Reads one packet and checks it is a CONNACK accepting the connection.
async fn read_connack(stream: &mut TcpStream, listener: Listener) -> Result<(), ProbeError> {
    let mut fixed = Vec::with_capacity(5);
    let header = loop {
        fixed.push(read_u8(stream).await?);
        match FrameHeader::parse(&fixed) {
            Ok(Some(header)) => break header,
            Ok(None) => {}
            Err(MalformedLength) => {
                return Err(ProbeError::NotConnAck(
                    "a remaining length over 4 bytes".to_owned(),
                ));
            }
        }
    };
    if header.first != 0x20 {
        return Err(ProbeError::NotConnAck(format!(
            "packet type byte {:#04x}",
            header.first
        )));
    }
    let len = header.remaining;
    if len > MAX_CONNACK_LEN {
        return Err(ProbeError::NotConnAck(format!("a {len}-byte CONNACK")));
    }
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await.map_err(eof_as_closed)?;
    check_connack(listener, &body)
}

/// Checks a CONNACK body (after the fixed header): session-present flags, then the return
/// code (v4, body exactly 2 bytes) or reason code (v5, followed by properties).
fn check_connack(listener: Listener, body: &[u8]) -> Result<(), ProbeError> {
    let well_formed = match listener {
        Listener::V4 => body.len() == 2,
        Listener::V5 => body.len() >= 3,
    };
    match body {
        [_, 0x00, ..] if well_formed => Ok(()),
        [_, code, ..] if well_formed => Err(ProbeError::Refused(*code)),
        _ => Err(ProbeError::NotConnAck(format!("CONNACK body {body:02x?}"))),
    }
}

async fn read_u8(stream: &mut TcpStream) -> Result<u8, ProbeError> {
    stream.read_u8().await.map_err(eof_as_closed)
}

fn eof_as_closed(err: std::io::Error) -> ProbeError {
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        ProbeError::Closed
    } else {
        ProbeError::Io(err)
    }
}

/// The router-side end of the probe: an internal connection subscribed to a random topic,
/// which every probe message must reach.
pub(crate) struct ProbeReceiver {
    /// Kept so the router keeps the subscription.
    _tx: LinkTx,
    rx: LinkRx,
    /// The topic probes publish on.
    pub(crate) topic: String,
    /// Where the probe's own connections are exempted from the pre-CONNECT bound.
    pending: Arc<PendingConnects>,
}

impl ProbeReceiver {
    /// Wraps a link already subscribed to `topic`; probe connections are exempted in
    /// `pending`.
    pub(crate) fn new(
        tx: LinkTx,
        rx: LinkRx,
        topic: String,
        pending: Arc<PendingConnects>,
    ) -> ProbeReceiver {
        ProbeReceiver {
            _tx: tx,
            rx,
            topic,
            pending,
        }
    }

    /// Waits until the router forwards a message with `payload` on the probe topic. Other
    /// messages (late ones of earlier probes, the SUBACK) are skipped.
    pub(crate) async fn delivered(&mut self, payload: &[u8]) -> Result<(), LinkError> {
        loop {
            match self.rx.next().await? {
                Some(Notification::Forward(forward))
                    if forward.publish.payload.as_ref() == payload =>
                {
                    return Ok(());
                }
                Some(Notification::Unschedule) => self.rx.wake().await?,
                _ => {}
            }
        }
    }

    /// One end-to-end probe of the listener at `addr`: connect, log in, publish a fresh token,
    /// see it delivered here; all before `deadline`.
    pub(crate) async fn check(
        &mut self,
        listener: Listener,
        addr: SocketAddr,
        client_id: &str,
        login: &ProbeLogin,
        deadline: Instant,
    ) -> Result<(), ProbeError> {
        let payload = format!("{} {:016x}", listener.label(), fastrand::u64(..));
        let message = ProbeMessage {
            client_id,
            login: Some(login),
            topic: &self.topic,
            payload: payload.as_bytes(),
        };
        publish_once(addr, listener, message, deadline, &self.pending).await?;
        let started = Instant::now();
        match timeout_at(deadline, self.delivered(payload.as_bytes())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => {
                debug!(cause = %err, "the probe link is gone");
                Err(ProbeError::NotDelivered(started.elapsed()))
            }
            Err(_) => Err(ProbeError::NotDelivered(started.elapsed())),
        }
    }
}

/// How long to wait before the next attempt, doubling from 1 ms up to 50 ms.
pub(crate) fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(Duration::from_millis(1), Duration::from_millis(50))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_connect_bytes() {
        assert_eq!(
            connect_packet(Listener::V4, "probe", None),
            [
                0x10, 17, // CONNECT, remaining length
                0, 4, b'M', b'Q', b'T', b'T', // protocol name
                4,    // protocol level 3.1.1
                0x02, // clean session
                0, 10, // keep-alive 10 s
                0, 5, b'p', b'r', b'o', b'b', b'e', // client id
            ]
        );
    }

    #[test]
    fn v5_connect_bytes() {
        assert_eq!(
            connect_packet(Listener::V5, "p", None),
            [
                0x10, 14, // CONNECT, remaining length
                0, 4, b'M', b'Q', b'T', b'T', // protocol name
                5,    // protocol level 5
                0x02, // clean start
                0, 10, // keep-alive 10 s
                0,  // no properties
                0, 1, b'p', // client id
            ]
        );
    }

    #[test]
    fn connect_with_login_bytes() {
        let login = ProbeLogin {
            username: "u".to_owned(),
            password: "pw".to_owned(),
        };
        assert_eq!(
            connect_packet(Listener::V4, "p", Some(&login)),
            [
                0x10, 20, // CONNECT, remaining length
                0, 4, b'M', b'Q', b'T', b'T', // protocol name
                4,    // protocol level 3.1.1
                0xC2, // username, password, clean session
                0, 10, // keep-alive 10 s
                0, 1, b'p', // client id
                0, 1, b'u', // username
                0, 2, b'p', b'w', // password
            ]
        );
    }

    #[test]
    fn publish_bytes() {
        assert_eq!(
            publish_packet(Listener::V4, "a/b", b"hi"),
            [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i']
        );
        assert_eq!(
            publish_packet(Listener::V5, "a/b", b"hi"),
            [0x30, 8, 0, 3, b'a', b'/', b'b', 0, b'h', b'i']
        );
    }

    #[test]
    fn remaining_length_uses_continuation_bytes() {
        let big = shared::frame::packet(0x30, &[0; 321]);
        assert_eq!(&big[..3], [0x30, 0xC1, 0x02]);
        assert_eq!(big.len(), 3 + 321);
    }

    #[test]
    fn connack_checks() {
        assert!(check_connack(Listener::V4, &[0, 0]).is_ok());
        assert!(matches!(
            check_connack(Listener::V4, &[0, 5]),
            Err(ProbeError::Refused(5))
        ));
        assert!(matches!(
            check_connack(Listener::V4, &[0, 0, 0]),
            Err(ProbeError::NotConnAck(_))
        ));
        // v5: flags, reason code, properties (here: topic alias maximum 4096).
        assert!(check_connack(Listener::V5, &[0, 0, 3, 0x22, 0x10, 0x00]).is_ok());
        assert!(matches!(
            check_connack(Listener::V5, &[0, 0x87, 0]),
            Err(ProbeError::Refused(0x87))
        ));
        assert!(matches!(
            check_connack(Listener::V5, &[0, 0]),
            Err(ProbeError::NotConnAck(_))
        ));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(next_backoff(Duration::ZERO), Duration::from_millis(1));
        assert_eq!(
            next_backoff(Duration::from_millis(4)),
            Duration::from_millis(8)
        );
        assert_eq!(
            next_backoff(Duration::from_millis(40)),
            Duration::from_millis(50)
        );
    }
}
