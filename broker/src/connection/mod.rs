//! Our network front end: one task per accepted TCP connection, speaking MQTT 3.1.1 or 5 with
//! rumqttd's own codecs, and registered with rumqttd's router through a local link.
//!
//! rumqttd 0.20's listener (`Server::start`) binds its own socket and runs its own accept loop,
//! which leaves no way to set `TCP_NODELAY`, to stop accepting, to refuse a login with a
//! CONNACK, or to see a packet. Its public parts are enough to do without it: the codecs
//! (`protocol::v4::V4`, `protocol::v5::V5`), the router (`Router::spawn`) and local links
//! (`local::LinkBuilder`), which is what rumqttd's own network link is built on. So each
//! connection here:
//!
//! 0. on a TLS listener, completes the TLS handshake within `connection_timeout_ms` (a
//!    failure is counted and closes the connection), and takes the vehicle id of a verified
//!    client certificate (`tls`) as the connection's login;
//! 1. reads the CONNECT within `connection_timeout_ms`, and refuses with a CONNACK (never a
//!    silent close) a wrong protocol level, a vehicle's keep-alive 0, an unusable client id,
//!    failed authentication, a last will the identity may not publish, or a full broker; tells
//!    MQTT 5 clients what the broker supports (shared subscriptions, topic aliases, ...);
//! 2. claims its client id (`client_ids`), registers with the router, writes the router's
//!    CONNACK;
//! 3. shuttles packets: from the socket to the router in batches of up to
//!    `max_inflight_count`, one batch pending in the router at a time (publishes checked
//!    against the identity's topic ACL, paced to `max_publish_rate`, and copied out of the read
//!    buffer so the commit log does not pin it), and from the router to the socket
//!    (MQTT 5 properties stripped for 3.1.1 clients, which rumqttd's v4 encoder would panic
//!    on); packets a client must never send (CONNACK, SUBACK, UNSUBACK, PINGRESP) are refused
//!    before rumqttd's decoder sees them, since its v5 decoder panics on two of them; each
//!    message is delivered at min(publish QoS, granted QoS) (`qos`), QoS 2 exchanges run
//!    here, both ways; shared subscriptions (`$share/...`) never reach the
//!    router: each group has an internal link whose messages go to one member (`share`);
//! 4. enforces keep-alive: nothing heard for 1.5 × the client's keep-alive ends the connection
//!    (keep-alive 0, allowed to clients that are not vehicles: never);
//! 5. ends by telling the router (which saves a persistent session, discarded when its MQTT 5
//!    Session Expiry Interval runs out) and, if the connection was lost rather than closed,
//!    publishing the client's last will.
//!
//! On shutdown a connection drains: it stops routing new publishes and forwarding new
//! messages, completes the QoS 1 exchanges in flight in both directions, then closes (MQTT 5
//! clients get DISCONNECT "server shutting down").
//!
//! # Layout
//!
//! - `front_end`: [`FrontEnd`], what every connection shares, and its [`Limits`];
//! - `handshake`: steps 1 and 2, CONNECT to CONNACK;
//! - `gate`: the PUBACKs a connection owes, written in the order of its PUBLISHes once
//!   the router has each message and, for those that wait for it, once it is durable
//!   (`durability`);
//! - `session`: steps 3 to 5, the established connection's loop and its end; `inbound`
//!   handles each packet from the client, `outbound` writes what the router and the mux link
//!   send it;
//! - `network`: the socket (plain or TLS), its buffers and rumqttd's codec, with packet size
//!   limits; `wellformed`: the reserved bits the codec does not check;
//! - `sessions`: which client ids have a session the router keeps, the bound on them, and MQTT
//!   5's Clean Start and Session Expiry mapped onto rumqttd's one clean-session flag;
//! - `rate`: the publish and subscribe rate limits;
//! - `pending`: the bound on connections that have not sent CONNECT yet.

mod acknowledge;
mod front_end;
mod gate;
mod handshake;
mod inbound;
mod network;
mod options;
mod outbound;
pub(crate) mod pending;
mod rate;
mod session;
mod sessions;
mod wellformed;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::{debug, warn};

pub(crate) use self::front_end::{FrontEnd, Limits};
use self::network::{Network, Stream};
pub(crate) use self::pending::PendingConnects;
use self::pending::PendingFull;
pub(crate) use self::sessions::Sessions;
use crate::listener::Listener;
use crate::metrics::ConnectRefusal;
use crate::tls::{ServerTls, certificate_vehicle_id};

/// Serves one accepted TCP connection until it ends; over TLS if `tls` is given (the
/// handshake runs here, in the connection's own task, never in the accept loop).
///
/// The connection's task is allocated once, for the largest state its future has, and kept
/// as long as the connection lives: so the steps up to the CONNACK run in a future of their
/// own, boxed and freed once they are done, and what they leave behind (the socket, the
/// accepted CONNECT) is moved into the session before it is awaited (see `docs/broker.md`,
/// Memory). The arguments go into that boxed future, not beside the session: an `async fn`
/// keeps its arguments for as long as it runs.
pub(crate) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Listener,
    tls: Option<Arc<ServerTls>>,
    ctx: Arc<FrontEnd>,
) -> impl Future<Output = ()> + Send {
    let establishing = Box::pin(async move {
        let (net, accepted) = establish(stream, peer, listener, tls, &ctx).await?;
        Some((net, accepted, peer, ctx))
    });
    async move {
        let session = {
            let Some((net, accepted, peer, ctx)) = establishing.await else {
                return;
            };
            session::run(net, accepted, peer, ctx)
        };
        session.await;
    }
}

/// Steps 0 to 2: the TLS handshake (on a TLS listener), the CONNECT, the CONNACK. `None` if
/// the connection ended before it was established (refused, timed out, shutdown).
async fn establish(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Listener,
    tls: Option<Arc<ServerTls>>,
    ctx: &Arc<FrontEnd>,
) -> Option<(Network, handshake::Accepted)> {
    let pending = match ctx.pending.enter(peer) {
        Ok(slot) => slot,
        Err(full) => {
            ctx.metrics.connect_refused(ConnectRefusal::PendingLimit);
            let bound = match full {
                PendingFull::Total => "max_pending_connects",
                PendingFull::PerIp => "max_pending_connects_per_ip",
            };
            if ctx
                .metrics
                .connect_refused_total(ConnectRefusal::PendingLimit)
                % 1000
                == 1
            {
                warn!(%peer, bound, "connection closed at once: too many connections have not sent CONNECT yet (logged once per 1000)");
            }
            return None;
        }
    };
    // Small packets, latency matters: rumqttd 0.20 never sets this (a ≈40 ms p99 tail).
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%peer, cause = %err, "cannot set TCP_NODELAY");
    }
    // The pending slot is held through the TLS handshake: a flood of handshakes that never
    // finish is bounded like one of silent connections.
    let (stream, certificate) = match tls {
        None => (Stream::Plain(stream), None),
        Some(tls) => {
            let handshake = tls_handshake(stream, peer, &tls, ctx);
            let established = tokio::select! {
                biased;
                () = ctx.stopping.cancelled() => return None,
                established = handshake => established,
            };
            match established {
                Some((stream, certificate)) => (Stream::Tls(Box::new(stream)), certificate),
                None => return None,
            }
        }
    };
    let mut net = Network::new(stream, listener, ctx.limits.max_payload_size, &ctx.metrics);
    let accepted = tokio::select! {
        biased;
        () = ctx.stopping.cancelled() => return None,
        accepted = handshake::handshake(&mut net, peer, ctx, pending, certificate) => accepted,
    };
    Some((net, accepted?))
}

/// The TLS handshake, within `connection_timeout_ms`. Returns the stream and the vehicle id
/// of the client certificate, if the client presented one (rustls has verified it by then);
/// `None` if the handshake failed (counted and logged, rate-limited) or the certificate names
/// no vehicle.
async fn tls_handshake(
    stream: TcpStream,
    peer: SocketAddr,
    tls: &ServerTls,
    ctx: &FrontEnd,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Option<String>)> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    let stream = match timeout(ctx.limits.connection_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tls.handshake_failed(peer, &err);
            return None;
        }
        Err(_) => {
            tls.handshake_failed(peer, &"no TLS handshake within connection_timeout_ms");
            return None;
        }
    };
    let presented = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first());
    let certificate = match presented {
        None => None,
        Some(cert) => match certificate_vehicle_id(cert) {
            Some(id) => Some(id),
            None => {
                tls.handshake_failed(
                    peer,
                    &"the client certificate names no vehicle (no subject CN, no DNS name)",
                );
                return None;
            }
        },
    };
    Some((stream, certificate))
}
