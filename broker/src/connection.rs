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
//! 1. reads the CONNECT within `connection_timeout_ms`, and refuses with a CONNACK (never a
//!    silent close) a wrong protocol level, keep-alive 0, an unusable client id, failed
//!    authentication, a last will the identity may not publish, or a full broker;
//! 2. [claims](crate::sessions) its client id, registers with the router, writes the router's
//!    CONNACK;
//! 3. shuttles packets: from the socket to the router in batches of up to
//!    `max_inflight_count`, one batch pending in the router at a time (publishes checked
//!    against the identity's topic ACL, paced to `max_publish_rate`, and copied out of the read
//!    buffer so the commit log does not pin it), and from the router to the socket
//!    (MQTT 5 properties stripped for 3.1.1 clients, which rumqttd's v4 encoder would panic
//!    on); packets a client must never send (CONNACK, SUBACK, UNSUBACK, PINGRESP) are refused
//!    before rumqttd's decoder sees them, since its v5 decoder panics on two of them;
//! 4. enforces keep-alive: nothing heard for 1.5 × the client's keep-alive ends the connection;
//! 5. ends by telling the router (which saves a persistent session) and, if the connection was
//!    lost rather than closed, publishing the client's last will.
//!
//! On shutdown a connection drains: it stops routing new publishes and forwarding new
//! messages, completes the QoS 1 exchanges in flight in both directions, then closes (MQTT 5
//! clients get DISCONNECT "server shutting down").

use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    self, ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode,
    LastWill, Packet, PingResp, Protocol, PubAck, PubAckReason, QoS, SubAck, SubscribeReasonCode,
    UnsubAck, UnsubAckReason,
};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::auth::{Authenticator, Identity, Role};
use crate::config::Listener;
use crate::metrics::{
    AuthRefusal, BrokerMetrics, ConnectRefusal, DisconnectReason, DropReason, MessageKind,
};
use crate::mux::{Mux, MuxEvent, is_command_topic, publish_with};
use crate::router::{INTERNAL_PREFIX, LinkRequest, RouterHandle, WillPublisher};
use crate::sessions::{Claim, Sessions};
use crate::watchers::MirrorWatchers;

/// How much room a connection's read buffer gets for one read; it grows for bigger packets.
/// Both buffers are allocated only while they hold bytes: an idle connection holds none.
const BUFFER_SIZE: usize = 1024;

/// Packet ids the front end gives the commands it writes from the mux link. rumqttd's
/// links number their forwards 1..=100 (its `MAX_INFLIGHT`), so a connection that has both a
/// dedicated link and mux subscriptions never sees one id used twice.
const MUX_PKIDS: std::ops::RangeInclusive<u16> = 1024..=u16::MAX;

/// How long a refusal CONNACK or a last DISCONNECT may take to write.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a connection waiting for the router to take its previous batch yields before
/// it sleeps between checks (see [`hand_over`]): the router usually takes a batch within
/// microseconds; a router that is behind is better left alone.
const HAND_OVER_SPIN: Duration = Duration::from_micros(200);

/// Longest a connection waits for the router to take its previous batch (see [`hand_over`]).
const HAND_OVER_PATIENCE: Duration = Duration::from_secs(10);

/// Most router notifications written in one go before the socket is flushed.
const MAX_WRITE_BATCH: usize = 1000;

/// The topic alias maximum rumqttd's router announces in its CONNACK (its `TOPIC_ALIAS_MAX`).
const TOPIC_ALIAS_MAX: u16 = 4096;

/// The limits a connection works within.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long a new connection may take to send CONNECT.
    pub(crate) connection_timeout: Duration,
    /// Largest packet accepted (remaining length).
    pub(crate) max_payload_size: usize,
    /// Packets handed to the router per batch.
    pub(crate) max_batch: usize,
    /// Most client connections at once (probes not counted).
    pub(crate) max_connections: usize,
    /// PUBLISH packets per second per client connection (0: no limit); see
    /// [`PublishRate`].
    pub(crate) max_publish_rate: u32,
}

/// The broker's own login for its listener probes.
#[derive(Debug, Clone)]
pub(crate) struct ProbeLogin {
    pub(crate) username: String,
    pub(crate) password: String,
}

/// Everything connections share.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) limits: Limits,
    /// `None` in open mode.
    pub(crate) auth: Option<Arc<Authenticator>>,
    pub(crate) probe: ProbeLogin,
    pub(crate) metrics: BrokerMetrics,
    pub(crate) sessions: Sessions,
    pub(crate) router: RouterHandle,
    /// The shared link that serves the publishes and command subscriptions of clean-session
    /// connections (see `mux`).
    pub(crate) mux: Arc<Mux>,
    /// Client ids whose persistent session rumqttd's router may still hold: a clean-session
    /// reconnect of one of them registers a link, which makes the router discard it.
    pub(crate) persistent_ids: std::sync::Mutex<std::collections::HashSet<String>>,
    pub(crate) wills: WillPublisher,
    /// Client connections with a router link of their own, open now.
    pub(crate) own_links: AtomicUsize,
    /// Subscriptions that may read the JSON mirror.
    pub(crate) watchers: Arc<MirrorWatchers>,
    /// Cancelled when a graceful shutdown begins: connections drain and close.
    pub(crate) draining: CancellationToken,
    /// Cancelled when connections must close now.
    pub(crate) stopping: CancellationToken,
    /// Client connections admitted (CONNECT accepted, not yet closed).
    pub(crate) admitted: AtomicUsize,
}

/// Serves one accepted TCP connection until it ends.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Listener,
    ctx: Arc<Context>,
) {
    // Small packets, latency matters: rumqttd 0.20 never sets this (a ≈40 ms p99 tail).
    if let Err(err) = stream.set_nodelay(true) {
        debug!(%peer, cause = %err, "cannot set TCP_NODELAY");
    }
    let mut net = Network::new(stream, listener, &ctx);
    let connected = tokio::select! {
        biased;
        () = ctx.stopping.cancelled() => return,
        connected = handshake(&mut net, peer, &ctx) => connected,
    };
    let Some(connected) = connected else {
        return;
    };
    run(net, connected, peer, ctx).await;
}

/// What the handshake established.
struct Connected {
    client_id: String,
    identity: Identity,
    will: Option<LastWill>,
    keep_alive: Duration,
    claim: Claim,
    persistent: bool,
    topic_alias_max: u16,
    link: Option<RouterLink>,
}

/// A connection's own link with rumqttd's router.
struct RouterLink {
    tx: LinkTx,
    rx: LinkRx,
}

/// Reads CONNECT, checks it, registers with the router and answers CONNACK. Refusals are
/// answered, counted and logged here; `None` means the connection is over.
async fn handshake(net: &mut Network, peer: SocketAddr, ctx: &Context) -> Option<Connected> {
    let first = match timeout(ctx.limits.connection_timeout, net.read_packet()).await {
        Ok(Ok(packet)) => packet,
        Ok(Err(FrameError::Codec(protocol::Error::InvalidProtocolLevel(level)))) => {
            // A client on the wrong port: answer in the format it understands.
            ctx.metrics.connect_refused(ConnectRefusal::Protocol);
            warn!(%peer, listener = net.version.label(), level, "CONNECT refused: wrong MQTT version for this listener");
            let answer: &[u8] = if level == 5 {
                &[0x20, 0x03, 0x00, 0x84, 0x00]
            } else {
                &[0x20, 0x02, 0x00, 0x01]
            };
            net.write.extend_from_slice(answer);
            let _ = timeout(FAREWELL_TIMEOUT, net.flush()).await;
            return None;
        }
        Ok(Err(err)) => {
            ctx.metrics.connect_refused(ConnectRefusal::NoConnect);
            debug!(%peer, cause = %err, "connection closed before a valid CONNECT");
            return None;
        }
        Err(_) => {
            ctx.metrics.connect_refused(ConnectRefusal::NoConnect);
            debug!(%peer, "no CONNECT within connection_timeout_ms");
            return None;
        }
    };
    let Packet::Connect(connect, properties, will, _will_properties, login) = first.packet else {
        ctx.metrics.connect_refused(ConnectRefusal::NoConnect);
        warn!(%peer, "first packet was not CONNECT: closing");
        return None;
    };

    let mut client_id = connect.client_id;
    if connect.keep_alive == 0 {
        ctx.metrics.connect_refused(ConnectRefusal::KeepAliveZero);
        warn!(%peer, client_id, reason = "keep_alive_zero", "CONNECT refused: keep-alive 0 is not allowed, a vehicle must prove it is alive");
        refuse(net, Refusal::NotAuthorized).await;
        return None;
    }
    let mut assigned = None;
    if client_id.is_empty() {
        if !connect.clean_session {
            ctx.metrics.connect_refused(ConnectRefusal::ClientId);
            warn!(%peer, reason = "client_id", "CONNECT refused: an empty client id needs a clean session");
            refuse(net, Refusal::ClientId).await;
            return None;
        }
        client_id = format!("fleetbeat-{:016x}", fastrand::u64(..));
        assigned = Some(client_id.clone());
    }
    if client_id.contains(['+', '#', '/', '$']) {
        ctx.metrics.connect_refused(ConnectRefusal::ClientId);
        warn!(%peer, client_id, reason = "client_id", "CONNECT refused: client id contains + # / or $");
        refuse(net, Refusal::ClientId).await;
        return None;
    }

    let (username, password) = match &login {
        Some(login) => (Some(login.username.as_str()), Some(login.password.as_str())),
        None => (None, None),
    };
    let identity = if username == Some(ctx.probe.username.as_str()) {
        if password.is_some_and(|p| constant_time_eq(p.as_bytes(), ctx.probe.password.as_bytes())) {
            Identity::Probe
        } else {
            ctx.metrics.auth_refused(AuthRefusal::BadPassword);
            warn!(%peer, client_id, reason = AuthRefusal::BadPassword.label(), "CONNECT refused: authentication failed");
            refuse(net, Refusal::BadCredentials).await;
            return None;
        }
    } else if let Some(auth) = &ctx.auth {
        match auth.authenticate(&client_id, username, password).await {
            Ok(identity) => identity,
            Err(why) => {
                ctx.metrics.auth_refused(why);
                warn!(%peer, client_id, username = username.unwrap_or(""), reason = why.label(), "CONNECT refused: authentication failed");
                let code = match why {
                    AuthRefusal::ClientIdMismatch | AuthRefusal::WillNotAllowed => {
                        Refusal::NotAuthorized
                    }
                    _ => Refusal::BadCredentials,
                };
                refuse(net, code).await;
                return None;
            }
        }
    } else {
        Identity::Anonymous
    };
    if client_id.starts_with(INTERNAL_PREFIX) && identity != Identity::Probe {
        ctx.metrics.connect_refused(ConnectRefusal::ClientId);
        warn!(%peer, client_id, reason = "client_id", "CONNECT refused: client ids starting with {INTERNAL_PREFIX} are the broker's own");
        refuse(net, Refusal::ClientId).await;
        return None;
    }
    if let Some(will) = &will
        && !(valid_topic_name(&will.topic) && identity.may_publish(&will.topic))
    {
        ctx.metrics.auth_refused(AuthRefusal::WillNotAllowed);
        warn!(%peer, client_id, topic = %String::from_utf8_lossy(&will.topic), reason = AuthRefusal::WillNotAllowed.label(), "CONNECT refused: the last will's topic is not allowed");
        refuse(net, Refusal::NotAuthorized).await;
        return None;
    }

    let counted = identity != Identity::Probe;
    if ctx.draining.is_cancelled() {
        ctx.metrics.connect_refused(ConnectRefusal::ShuttingDown);
        refuse(net, Refusal::Unavailable).await;
        return None;
    }
    if counted && ctx.admitted.fetch_add(1, Ordering::AcqRel) >= ctx.limits.max_connections {
        ctx.admitted.fetch_sub(1, Ordering::AcqRel);
        ctx.metrics.connect_refused(ConnectRefusal::ServerFull);
        warn!(%peer, client_id, reason = "server_full", max_connections = ctx.limits.max_connections, "CONNECT refused: too many connections");
        refuse(net, Refusal::Busy).await;
        return None;
    }
    let release_slot = || {
        if counted {
            ctx.admitted.fetch_sub(1, Ordering::AcqRel);
        }
    };

    let claim = ctx.sessions.claim(&client_id).await;
    let topic_alias_max = properties
        .as_ref()
        .and_then(|p| p.topic_alias_max)
        .unwrap_or(0);
    let persistent = !connect.clean_session;
    let had_session = {
        let mut ids = match ctx.persistent_ids.lock() {
            Ok(ids) => ids,
            Err(poisoned) => poisoned.into_inner(),
        };
        if persistent {
            !ids.insert(client_id.clone())
        } else {
            ids.remove(&client_id)
        }
    };
    if had_session && !persistent {
        // The router discards the persistent session, subscriptions and all.
        ctx.watchers.session_ended(&client_id);
    }
    // A persistent session lives in the router: it needs a link from the start. So does a
    // clean session replacing one (registering it makes the router discard the old state).
    // Every other connection is served by the shared mux link until it subscribes to
    // something other than its commands.
    let registered = if persistent || had_session {
        ctx.router
            .link(LinkRequest {
                client_id: &client_id,
                clean_session: connect.clean_session,
                topic_alias_max,
            })
            .map(|(tx, rx, connack)| (Some(RouterLink { tx, rx }), connack.into()))
    } else {
        let ack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
        };
        // What rumqttd's router answers a new clean session.
        let properties = ConnAckProperties {
            topic_alias_max: Some(TOPIC_ALIAS_MAX),
            ..Default::default()
        };
        Ok((None, Some(Packet::ConnAck(ack, Some(properties)))))
    };
    let (link, connack) = match registered {
        Ok(registered) => {
            if registered.0.is_some() {
                ctx.own_links.fetch_add(1, Ordering::AcqRel);
            }
            registered
        }
        Err(err) => {
            ctx.sessions.release(claim);
            release_slot();
            ctx.metrics.connect_refused(ConnectRefusal::ServerFull);
            error!(%peer, client_id, cause = %err, "CONNECT refused: the router did not register the connection");
            refuse(net, Refusal::Busy).await;
            return None;
        }
    };
    let mut connack: Option<Packet> = connack;
    if let Some(Packet::ConnAck(_, props)) = &mut connack
        && assigned.is_some()
    {
        props
            .get_or_insert_with(ConnAckProperties::default)
            .assigned_client_identifier = assigned;
    }
    let written = match connack {
        Some(packet @ Packet::ConnAck(..)) => {
            net.queue(packet).is_ok() && net.flush().await.is_ok()
        }
        _ => false,
    };
    if !written {
        debug!(%peer, client_id, "could not answer CONNACK");
        if link.is_some() {
            ctx.own_links.fetch_sub(1, Ordering::AcqRel);
        }
        ctx.sessions.release(claim);
        release_slot();
        return None;
    }

    if counted {
        ctx.metrics
            .connection_opened(net.version, identity.is_device());
    }
    debug!(%peer, client_id, identity = %identity.describe(), listener = net.version.label(), "connected");
    Some(Connected {
        client_id,
        identity,
        will,
        keep_alive: Duration::from_secs(u64::from(connect.keep_alive)),
        claim,
        persistent,
        topic_alias_max,
        link,
    })
}

/// Why a CONNECT is refused, mapped to each version's CONNACK code.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    BadCredentials,
    NotAuthorized,
    ClientId,
    Busy,
    Unavailable,
}

async fn refuse(net: &mut Network, why: Refusal) {
    let v4 = net.version == Listener::V4;
    let code = match why {
        Refusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
        Refusal::NotAuthorized => ConnectReturnCode::NotAuthorized,
        Refusal::ClientId => ConnectReturnCode::ClientIdentifierNotValid,
        Refusal::Busy if v4 => ConnectReturnCode::ServiceUnavailable,
        Refusal::Busy => ConnectReturnCode::ServerBusy,
        Refusal::Unavailable if v4 => ConnectReturnCode::ServiceUnavailable,
        Refusal::Unavailable => ConnectReturnCode::ServerUnavailable,
    };
    let connack = ConnAck {
        session_present: false,
        code,
    };
    if net.queue(Packet::ConnAck(connack, None)).is_ok() {
        let _ = timeout(FAREWELL_TIMEOUT, net.flush()).await;
    }
}

/// Runs an established connection to its end, then tears it down.
async fn run(net: Network, connected: Connected, peer: SocketAddr, ctx: Arc<Context>) {
    let Connected {
        client_id,
        identity,
        will,
        keep_alive,
        claim,
        persistent,
        topic_alias_max,
        link,
    } = connected;
    let counted = identity != Identity::Probe;
    let device = identity.is_device();
    let rate = match &identity {
        Identity::Probe
        | Identity::Client {
            role: Role::Bridge, ..
        } => None,
        _ => PublishRate::new(ctx.limits.max_publish_rate, Instant::now()),
    };
    let mut session = Session {
        net,
        link,
        persistent,
        topic_alias_max,
        mux_batch: Vec::new(),
        mux_pending: None,
        port: None,
        connection: ctx.mux.connection_id(),
        mux_subscriptions: Vec::new(),
        mux_outgoing: Vec::new(),
        next_mux_pkid: *MUX_PKIDS.start(),
        identity,
        ctx: Arc::clone(&ctx),
        client_id,
        draining: false,
        incoming_inflight: Vec::new(),
        outgoing_inflight: Vec::new(),
        will_on_disconnect: false,
        acl_warned: false,
        topic_aliases: HashMap::new(),
        rate,
        throttled_until: None,
        holding: false,
        throttle_warned: false,
    };

    // A child token: polled on every wake of this connection, the shared one would be a lock
    // every connection contends for (see `Session::run`).
    let stopping = ctx.stopping.child_token();
    let end = tokio::select! {
        biased;
        () = claim.kicked.cancelled() => DisconnectReason::TakenOver,
        () = stopping.cancelled() => DisconnectReason::Shutdown,
        end = session.run(keep_alive) => end,
    };

    if end == DisconnectReason::Shutdown && session.net.version == Listener::V5 {
        let bye = Disconnect {
            reason_code: DisconnectReasonCode::ServerShuttingDown,
        };
        if session.net.queue(Packet::Disconnect(bye, None)).is_ok() {
            let _ = timeout(FAREWELL_TIMEOUT, session.net.flush()).await;
        }
    }
    for topic in session.mux_subscriptions.drain(..) {
        ctx.mux.unsubscribe(session.connection, &topic);
    }
    if !session.persistent {
        ctx.watchers.session_ended(&session.client_id);
    }
    if let Some(link) = &mut session.link
        && end != DisconnectReason::Router
    {
        // The router forgets the connection (and keeps a persistent session's state).
        let bye = Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        };
        if let Err(err) = hand_over(&mut link.tx, &mut vec![Packet::Disconnect(bye, None)]).await {
            debug!(client_id = session.client_id, cause = %err, "router gone at disconnect");
        }
    }
    if let Some(will) = will
        && (end.fires_will() || session.will_on_disconnect)
    {
        ctx.mux.record(&will.topic, &will.message, will.retain);
        match ctx
            .wills
            .publish(will.topic.clone(), will.message.clone(), will.retain)
            .await
        {
            Ok(()) => {
                ctx.metrics.will_published();
                debug!(client_id = session.client_id, topic = %String::from_utf8_lossy(&will.topic), "last will published");
            }
            Err(err) => {
                error!(client_id = session.client_id, cause = %err, "could not publish the last will");
            }
        }
    }
    if session.link.is_some() {
        ctx.own_links.fetch_sub(1, Ordering::AcqRel);
    }
    ctx.sessions.release(claim);
    if counted {
        ctx.admitted.fetch_sub(1, Ordering::AcqRel);
        ctx.metrics
            .connection_closed(session.net.version, device, end);
    }
    debug!(%peer, client_id = session.client_id, reason = end.label(), "disconnected");
}

/// A connection's channel from the mux link (see `mux`), opened at its first QoS 1 publish or
/// command subscription.
struct MuxPort {
    tx: UnboundedSender<MuxEvent>,
    rx: UnboundedReceiver<MuxEvent>,
}

/// An established connection.
struct Session {
    net: Network,
    /// The connection's own router link, if it has one: from CONNECT for a persistent
    /// session, from its first subscription the mux link does not serve otherwise.
    link: Option<RouterLink>,
    /// A persistent session: everything goes through its own link, as rumqttd keeps it.
    persistent: bool,
    topic_alias_max: u16,
    /// Publishes for the mux link, in the client's order.
    mux_batch: Vec<Packet>,
    /// Marks this connection's batch in the mux link's buffer (see `Mux::send`).
    mux_pending: Option<u64>,
    port: Option<MuxPort>,
    /// This connection's id in the mux's subscription table.
    connection: u64,
    /// The exact command topics this connection is subscribed to through the mux link.
    mux_subscriptions: Vec<String>,
    /// Packet ids of QoS 1 commands written to the client from the mux link, not yet
    /// acknowledged by it.
    mux_outgoing: Vec<u16>,
    next_mux_pkid: u16,
    identity: Identity,
    ctx: Arc<Context>,
    client_id: String,
    /// Shutdown began: route nothing new, finish what is in flight.
    draining: bool,
    /// Packet ids of QoS 1 publishes from the client not yet acknowledged by the router.
    incoming_inflight: Vec<u16>,
    /// Packet ids of QoS 1 publishes written to the client, not yet acknowledged by it.
    outgoing_inflight: Vec<u16>,
    /// An MQTT 5 DISCONNECT asked for the will to be published.
    will_on_disconnect: bool,
    acl_warned: bool,
    /// MQTT 5 topic aliases the client set, so an aliased publish (empty topic) is checked
    /// against the topic it stands for.
    topic_aliases: HashMap<u16, Bytes>,
    /// The connection's publish rate limit, `None` if it has none.
    rate: Option<PublishRate>,
    /// The PUBLISH at the head of the read buffer waits for the rate until then; the socket
    /// is not read meanwhile.
    throttled_until: Option<Instant>,
    /// The PUBLISH at the head of the read buffer has been held back (counted once).
    holding: bool,
    throttle_warned: bool,
}

impl Session {
    async fn run(&mut self, keep_alive: Duration) -> DisconnectReason {
        // MQTT: a server disconnects a client it has heard nothing from for 1.5 × keep-alive.
        let idle_limit = keep_alive + keep_alive / 2;
        let mut last_heard = Instant::now();
        let mut batch = Vec::new();
        let mux = Arc::clone(&self.ctx.mux);
        // Made once, not once per turn of the loop, and on child tokens of this connection's
        // own: polling a cancellation future locks its token's node, and a node shared by
        // every connection is a lock both cores fight over on every message.
        let draining = self.ctx.draining.child_token().cancelled_owned();
        tokio::pin!(draining);
        let dead = mux.dead().child_token().cancelled_owned();
        tokio::pin!(dead);
        loop {
            if let Err(end) = self.route_buffered(&mut batch).await {
                return end;
            }
            if self.draining
                && self.incoming_inflight.is_empty()
                && self.outgoing_inflight.is_empty()
                && self.mux_outgoing.is_empty()
            {
                return DisconnectReason::Shutdown;
            }
            let throttled = self.throttled_until;
            tokio::select! {
                biased;
                () = &mut draining, if !self.draining => {
                    self.draining = true;
                }
                // Throttled: the client is evidently sending; its socket waits, so TCP pushes
                // back on it, and keep-alive counts from when reading resumes.
                () = sleep_until(throttled.unwrap_or(last_heard)), if throttled.is_some() => {
                    last_heard = Instant::now();
                }
                read = self.net.read_more(), if throttled.is_none() => match read {
                    Ok(()) => last_heard = Instant::now(),
                    Err(err) => {
                        debug!(client_id = self.client_id, cause = %err, "connection lost");
                        return DisconnectReason::Network;
                    }
                },
                () = &mut dead, if !self.persistent => {
                    debug!(client_id = self.client_id, "the shared router link is gone");
                    return DisconnectReason::Router;
                }
                event = next_event(&mut self.port) => {
                    if let Err(end) = self.deliver_mux(event).await {
                        return end;
                    }
                }
                note = next_notification(&mut self.link) => match note {
                    Ok(first) => {
                        if let Err(end) = self.deliver(first).await {
                            return end;
                        }
                    }
                    Err(err) => {
                        debug!(client_id = self.client_id, cause = %err, "the router dropped the connection");
                        return DisconnectReason::Router;
                    }
                },
                () = sleep_until(last_heard + idle_limit), if throttled.is_none() => {
                    debug!(client_id = self.client_id, ?keep_alive, "keep-alive expired");
                    return DisconnectReason::KeepAlive;
                }
            }
        }
    }

    /// Routes every complete packet in the read buffer, in batches; stops early at a PUBLISH
    /// the connection's rate limit holds back (see [`Self::throttled_until`]).
    async fn route_buffered(&mut self, batch: &mut Vec<Packet>) -> Result<(), DisconnectReason> {
        self.throttled_until = None;
        loop {
            if let Some(until) = self.rate_wait() {
                self.throttled_until = Some(until);
                break;
            }
            let frame = match self.net.next_packet() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(err) => return Err(self.protocol_error(&err)),
            };
            if let Some(end) = self.on_packet(frame, batch) {
                self.route(batch).await?;
                self.flush().await?;
                return Err(end);
            }
            if batch.len() + self.mux_batch.len() >= self.ctx.limits.max_batch {
                self.route(batch).await?;
            }
        }
        self.route(batch).await?;
        if batch.capacity() > 64 {
            // A burst grew it: give the memory back.
            *batch = Vec::new();
        }
        if self.mux_batch.capacity() > 64 {
            self.mux_batch = Vec::new();
        }
        self.net.release_read_buffer();
        // Acknowledgements we wrote ourselves (ACL refusals, mux-served SUBACKs, PINGRESPs).
        self.flush().await
    }

    /// If the next buffered packet is a complete PUBLISH that the rate limit holds back, until
    /// when. Takes the PUBLISH's token if it may go (an incomplete packet takes none: it is
    /// checked again once it is whole).
    fn rate_wait(&mut self) -> Option<Instant> {
        let rate = self.rate.as_mut()?;
        let is_publish = self.net.read.first().is_some_and(|b| b >> 4 == 3);
        if !is_publish || self.draining || !self.net.has_packet() {
            return None;
        }
        let now = Instant::now();
        match rate.wait(now) {
            Some(until) => {
                if !self.holding {
                    self.holding = true;
                    self.ctx.metrics.throttled();
                    if !self.throttle_warned {
                        self.throttle_warned = true;
                        warn!(
                            client_id = self.client_id,
                            identity = %self.identity.describe(),
                            max_publish_rate = self.ctx.limits.max_publish_rate,
                            "client publishes faster than max_publish_rate: throttled (further throttling on this connection is only counted)"
                        );
                    }
                }
                Some(until)
            }
            None => {
                rate.take();
                self.holding = false;
                None
            }
        }
    }

    fn protocol_error(&self, err: &FrameError) -> DisconnectReason {
        if let FrameError::Codec(protocol::Error::PayloadSizeLimitExceeded(size)) = err {
            self.ctx.metrics.dropped(DropReason::Oversized);
            warn!(
                client_id = self.client_id,
                size,
                max = self.ctx.limits.max_payload_size,
                "packet too large: disconnecting"
            );
        } else {
            warn!(client_id = self.client_id, cause = %err, "protocol error: disconnecting");
        }
        DisconnectReason::Protocol
    }

    /// Handles one packet from the client: into `batch` for the router, or answered here.
    /// Returns how the connection ends, if it does.
    fn on_packet(&mut self, frame: Frame, batch: &mut Vec<Packet>) -> Option<DisconnectReason> {
        match frame.packet {
            Packet::Publish(mut publish, properties) => {
                if let Some(alias) = properties.as_ref().and_then(|p| p.topic_alias) {
                    if alias == 0 || alias > TOPIC_ALIAS_MAX {
                        warn!(
                            client_id = self.client_id,
                            alias, "invalid topic alias: disconnecting"
                        );
                        return Some(DisconnectReason::Protocol);
                    }
                    if publish.topic.is_empty() {
                        match self.topic_aliases.get(&alias) {
                            Some(topic) => publish.topic = topic.clone(),
                            None => {
                                warn!(
                                    client_id = self.client_id,
                                    alias, "unknown topic alias: disconnecting"
                                );
                                return Some(DisconnectReason::Protocol);
                            }
                        }
                    } else {
                        self.topic_aliases
                            .insert(alias, Bytes::copy_from_slice(&publish.topic));
                    }
                }
                let kind = MessageKind::of_topic(&publish.topic);
                self.ctx.metrics.message_in(kind);
                let (qos, pkid) = frame.publish.map_or((0, 0), |p| (p.qos, p.pkid));
                if self.draining {
                    // Unacknowledged: a QoS 1 sender sends it again after reconnecting.
                    self.ctx.metrics.dropped(DropReason::Shutdown);
                    return None;
                }
                if !self.identity.may_publish(&publish.topic) {
                    self.ctx.metrics.dropped(DropReason::Acl);
                    if !self.acl_warned {
                        self.acl_warned = true;
                        warn!(client_id = self.client_id, identity = %self.identity.describe(), topic = %String::from_utf8_lossy(&publish.topic), "publish refused by the topic ACL (further refusals on this connection are only counted)");
                    }
                    return match qos {
                        0 => None,
                        1 => {
                            // Acknowledge so the client does not resend it forever.
                            let reason = if self.net.version == Listener::V5 {
                                PubAckReason::NotAuthorized
                            } else {
                                PubAckReason::Success
                            };
                            let ack = PubAck { pkid, reason };
                            self.net
                                .queue(Packet::PubAck(ack, None))
                                .err()
                                .map(|err| self.protocol_error(&err))
                        }
                        // QoS 2 has no way to refuse in 3.1.1: end the connection.
                        _ => Some(DisconnectReason::Protocol),
                    };
                }
                let mut properties = properties;
                let via_link = self.persistent || qos == 2;
                if !via_link {
                    // What rumqttd's router would refuse by dropping the link: here that would
                    // be the link of every device, so the front end refuses it first.
                    if !valid_topic_name(&publish.topic) {
                        warn!(client_id = self.client_id, topic = %String::from_utf8_lossy(&publish.topic), "invalid topic name in PUBLISH: disconnecting");
                        return Some(DisconnectReason::Protocol);
                    }
                    if let Some(props) = &mut properties {
                        if !props.subscription_identifiers.is_empty() {
                            warn!(
                                client_id = self.client_id,
                                "PUBLISH with a subscription identifier: disconnecting"
                            );
                            return Some(DisconnectReason::Protocol);
                        }
                        // Resolved above; the mux link's alias table is not this client's.
                        props.topic_alias = None;
                    }
                }
                if qos == 1 && !self.incoming_inflight.contains(&pkid) {
                    self.incoming_inflight.push(pkid);
                }
                // Our own copy: the commit log must not keep the whole read buffer alive.
                publish.topic = Bytes::copy_from_slice(&publish.topic);
                publish.payload = Bytes::copy_from_slice(&publish.payload);
                self.ctx
                    .mux
                    .record(&publish.topic, &publish.payload, publish.retain);
                if via_link {
                    if let Err(end) = self.ensure_link() {
                        return Some(end);
                    }
                    batch.push(Packet::Publish(publish, properties));
                } else if qos == 1 {
                    let reply = self.port().tx.clone();
                    let packet = self.ctx.mux.qos1(&publish, properties, &reply, pkid);
                    self.mux_batch.push(packet);
                } else {
                    self.mux_batch.push(Packet::Publish(publish, properties));
                }
            }
            Packet::PubAck(ack, properties) => {
                if let Some(at) = self.mux_outgoing.iter().position(|&p| p == ack.pkid) {
                    self.mux_outgoing.swap_remove(at);
                } else if self.link.is_some() {
                    self.outgoing_inflight.retain(|&p| p != ack.pkid);
                    batch.push(Packet::PubAck(ack, properties));
                }
            }
            Packet::PingReq(_) => {
                if let Err(err) = self.net.queue(Packet::PingResp(PingResp)) {
                    return Some(self.protocol_error(&err));
                }
            }
            Packet::Unsubscribe(unsubscribe, properties) => {
                if self.draining {
                    return None;
                }
                let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
                let mut others = false;
                for filter in &unsubscribe.filters {
                    if let Some(at) = self.mux_subscriptions.iter().position(|t| t == filter) {
                        self.mux_subscriptions.swap_remove(at);
                        self.ctx.mux.unsubscribe(self.connection, filter);
                        reasons.push(UnsubAckReason::Success);
                    } else {
                        others = true;
                        self.ctx.watchers.unsubscribed(&self.client_id, filter);
                        reasons.push(UnsubAckReason::NoSubscriptionExisted);
                    }
                }
                if others && self.link.is_some() {
                    batch.push(Packet::Unsubscribe(unsubscribe, properties));
                } else {
                    let ack = UnsubAck {
                        pkid: unsubscribe.pkid,
                        reasons,
                    };
                    if let Err(err) = self.net.queue(Packet::UnsubAck(ack, None)) {
                        return Some(self.protocol_error(&err));
                    }
                }
            }
            Packet::Subscribe(subscribe, properties) => {
                if self.draining {
                    return None;
                }
                if subscribe
                    .filters
                    .iter()
                    .all(|f| self.identity.may_subscribe(&f.path))
                {
                    if !self.persistent
                        && subscribe.filters.iter().all(|f| is_command_topic(&f.path))
                    {
                        return self.subscribe_commands(&subscribe);
                    }
                    if let Err(end) = self.ensure_link() {
                        return Some(end);
                    }
                    for filter in &subscribe.filters {
                        self.ctx.watchers.subscribed(&self.client_id, &filter.path);
                    }
                    batch.push(Packet::Subscribe(subscribe, properties));
                } else {
                    self.ctx.metrics.subscribe_denied();
                    let filters: Vec<&str> =
                        subscribe.filters.iter().map(|f| f.path.as_str()).collect();
                    warn!(client_id = self.client_id, identity = %self.identity.describe(), ?filters, "subscribe refused by the topic ACL");
                    let code = if self.net.version == Listener::V5 {
                        SubscribeReasonCode::NotAuthorized
                    } else {
                        SubscribeReasonCode::Failure
                    };
                    let ack = SubAck {
                        pkid: subscribe.pkid,
                        return_codes: vec![code; subscribe.filters.len()],
                    };
                    if let Err(err) = self.net.queue(Packet::SubAck(ack, None)) {
                        return Some(self.protocol_error(&err));
                    }
                }
            }
            Packet::Disconnect(disconnect, _) => {
                self.will_on_disconnect =
                    disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                return Some(DisconnectReason::Client);
            }
            Packet::Connect(..) => {
                warn!(client_id = self.client_id, "second CONNECT: disconnecting");
                return Some(DisconnectReason::Protocol);
            }
            // PUBREL, PUBREC, PUBCOMP: QoS 2 exchanges, which run on the connection's link.
            other => {
                if self.link.is_some() {
                    batch.push(other);
                }
            }
        }
        None
    }

    /// Serves a SUBSCRIBE to exact command topics from the mux link: registers each topic,
    /// answers the SUBACK, and queues the retained command of each topic after it.
    fn subscribe_commands(
        &mut self,
        subscribe: &rumqttd::protocol::Subscribe,
    ) -> Option<DisconnectReason> {
        let connection = self.connection;
        let reply = self.port().tx.clone();
        let mut return_codes = Vec::with_capacity(subscribe.filters.len());
        for filter in &subscribe.filters {
            // Commands are delivered at QoS 0 or 1: a QoS 2 request is granted 1.
            let (granted, qos) = match filter.qos {
                QoS::AtMostOnce => (QoS::AtMostOnce, 0),
                _ => (QoS::AtLeastOnce, 1),
            };
            let retained = self
                .ctx
                .mux
                .subscribe(connection, &filter.path, qos, &reply);
            if !self.mux_subscriptions.contains(&filter.path) {
                self.mux_subscriptions.push(filter.path.clone());
            }
            if let Some(command) = retained {
                // Written after the SUBACK: the channel is read once this batch is done.
                let _ = reply.send(MuxEvent::Command { command, qos });
            }
            return_codes.push(SubscribeReasonCode::Success(granted));
        }
        let ack = SubAck {
            pkid: subscribe.pkid,
            return_codes,
        };
        self.net
            .queue(Packet::SubAck(ack, None))
            .err()
            .map(|err| self.protocol_error(&err))
    }

    /// The connection's channel from the mux link, opened on first use.
    fn port(&mut self) -> &mut MuxPort {
        self.port.get_or_insert_with(|| {
            let (tx, rx) = unbounded_channel();
            MuxPort { tx, rx }
        })
    }

    /// Registers the connection's own router link if it has none yet.
    fn ensure_link(&mut self) -> Result<(), DisconnectReason> {
        if self.link.is_some() {
            return Ok(());
        }
        let registered = self.ctx.router.link(LinkRequest {
            client_id: &self.client_id,
            clean_session: !self.persistent,
            topic_alias_max: self.topic_alias_max,
        });
        match registered {
            Ok((tx, rx, _connack)) => {
                debug!(
                    client_id = self.client_id,
                    "subscription beyond commands: the connection gets its own router link"
                );
                self.link = Some(RouterLink { tx, rx });
                self.ctx.own_links.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(err) => {
                error!(client_id = self.client_id, cause = %err, "the router did not register the connection's own link");
                Err(DisconnectReason::Router)
            }
        }
    }

    /// Hands the mux batch to the mux link and `batch` to the connection's own link (see
    /// [`hand_over`]).
    async fn route(&mut self, batch: &mut Vec<Packet>) -> Result<(), DisconnectReason> {
        if !self.mux_batch.is_empty() {
            self.ctx
                .mux
                .send(&mut self.mux_batch, &mut self.mux_pending)
                .await
                .map_err(|err| {
                    debug!(client_id = self.client_id, cause = %err, "shared router link gone");
                    DisconnectReason::Router
                })?;
        }
        let Some(link) = &mut self.link else {
            batch.clear();
            return Ok(());
        };
        hand_over(&mut link.tx, batch).await.map_err(|err| {
            debug!(client_id = self.client_id, cause = %err, "router gone");
            DisconnectReason::Router
        })
    }

    /// The next packet id for a command written from the mux link.
    fn next_mux_pkid(&mut self) -> u16 {
        loop {
            let pkid = self.next_mux_pkid;
            self.next_mux_pkid = if pkid == *MUX_PKIDS.end() {
                *MUX_PKIDS.start()
            } else {
                pkid + 1
            };
            if !self.mux_outgoing.contains(&pkid) {
                return pkid;
            }
        }
    }

    /// Writes what the mux link handed this connection: `first` and whatever else is queued.
    async fn deliver_mux(&mut self, first: MuxEvent) -> Result<(), DisconnectReason> {
        let mut next = Some(first);
        let mut written = 0;
        while let Some(event) = next.take() {
            match event {
                MuxEvent::PubAck(pkid) => {
                    self.incoming_inflight.retain(|&p| p != pkid);
                    let ack = PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    };
                    if let Err(err) = self.net.queue(Packet::PubAck(ack, None)) {
                        return Err(self.protocol_error(&err));
                    }
                }
                MuxEvent::Command { command, qos } => {
                    if self.draining {
                        self.ctx.metrics.dropped(DropReason::Shutdown);
                    } else {
                        let pkid = if qos > 0 { self.next_mux_pkid() } else { 0 };
                        let publish = publish_with(
                            &command.topic,
                            &command.payload,
                            qos,
                            pkid,
                            command.retain,
                        );
                        if let Err(err) = self.net.queue(Packet::Publish(publish, None)) {
                            return Err(self.protocol_error(&err));
                        }
                        self.ctx
                            .metrics
                            .message_out(MessageKind::of_topic(&command.topic));
                        if qos > 0 {
                            self.mux_outgoing.push(pkid);
                        }
                    }
                }
            }
            written += 1;
            if written >= MAX_WRITE_BATCH {
                self.flush().await?;
                written = 0;
            }
            next = self.port.as_mut().and_then(|port| port.rx.try_recv().ok());
        }
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), DisconnectReason> {
        self.net.flush().await.map_err(|err| {
            debug!(client_id = self.client_id, cause = %err, "write failed");
            DisconnectReason::Network
        })
    }

    /// Writes what the router sent: `first` and whatever else is already queued.
    async fn deliver(&mut self, first: Option<Notification>) -> Result<(), DisconnectReason> {
        let mut unscheduled = false;
        let mut end = None;
        let mut next = first;
        let mut written = 0;
        while let Some(notification) = next.take() {
            match notification {
                Notification::Forward(forward) => {
                    if self.draining {
                        self.ctx.metrics.dropped(DropReason::Shutdown);
                    } else {
                        let kind = MessageKind::of_topic(&forward.publish.topic);
                        match self
                            .net
                            .queue(Packet::Publish(forward.publish, forward.properties))
                        {
                            Ok(info) => {
                                self.ctx.metrics.message_out(kind);
                                if let Some(PublishInfo { qos: 1, pkid }) = info
                                    && !self.outgoing_inflight.contains(&pkid)
                                {
                                    self.outgoing_inflight.push(pkid);
                                }
                            }
                            Err(err) => return Err(self.protocol_error(&err)),
                        }
                    }
                }
                Notification::DeviceAck(ack) => {
                    let packet: Packet = ack.into();
                    if let Packet::PubAck(ack, _) = &packet {
                        self.incoming_inflight.retain(|&p| p != ack.pkid);
                    }
                    if let Err(err) = self.net.queue(packet) {
                        return Err(self.protocol_error(&err));
                    }
                }
                Notification::Unschedule => unscheduled = true,
                Notification::Disconnect(disconnect, properties) => {
                    debug!(client_id = self.client_id, reason = ?disconnect.reason_code, "the router disconnects the client");
                    if self.net.version == Listener::V5 {
                        let _ = self.net.queue(Packet::Disconnect(disconnect, properties));
                    }
                    end = Some(DisconnectReason::Router);
                    break;
                }
                other => {
                    debug!(client_id = self.client_id, notification = ?other, "unexpected notification ignored")
                }
            }
            written += 1;
            if written >= MAX_WRITE_BATCH {
                self.flush().await?;
                written = 0;
            }
            next = self.link.as_mut().and_then(|link| try_next(&mut link.rx));
        }
        self.flush().await?;
        if let Some(end) = end {
            return Err(end);
        }
        if unscheduled {
            // The router paused us while our queue was full; we have emptied it.
            if let Some(link) = &mut self.link {
                link.rx.wake().await.map_err(|_| DisconnectReason::Router)?;
            }
        }
        Ok(())
    }
}

/// The next notification from a connection's own link; never ready without one.
async fn next_notification(
    link: &mut Option<RouterLink>,
) -> Result<Option<Notification>, LinkError> {
    match link {
        Some(link) => link.rx.next().await,
        None => std::future::pending().await,
    }
}

/// The next event from the mux link for this connection; never ready without a port. The
/// port holds a sender of its own channel, so the channel never closes.
async fn next_event(port: &mut Option<MuxPort>) -> MuxEvent {
    match port {
        Some(port) => match port.rx.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Hands `batch` to the router through `tx`, emptying it.
///
/// rumqttd's public way to signal new data is `LinkTx::send`, one notification per call, and
/// the router takes the link's whole buffer per notification. So a connection hands over one
/// batch at a time: while the buffer still holds the previous batch (the router has not taken
/// it yet), it waits. Without that wait a connection that reads faster than the router routes
/// (a flood) piles packets into the buffer without bound: memory grows, and the router spends
/// ever longer on one connection's backlog while nothing is delivered to subscribers, whose
/// commit-log cursors then fall behind the retained segments and lose messages. Waiting
/// instead leaves the packets in the socket, so TCP pushes back on the sender.
///
/// The router has no signal for "buffer taken": the wait yields to other tasks for up to
/// [`HAND_OVER_SPIN`], then checks every millisecond. After [`HAND_OVER_PATIENCE`] it gives up waiting and appends to the buffer
/// (the router still takes it with the pending notification), so a stuck router cannot hang
/// a connection's teardown.
pub(crate) async fn hand_over(tx: &mut LinkTx, batch: &mut Vec<Packet>) -> Result<(), LinkError> {
    let Some(last) = batch.pop() else {
        return Ok(());
    };
    let started = Instant::now();
    let deadline = started + HAND_OVER_PATIENCE;
    loop {
        {
            let mut buffer = tx.buffer();
            if buffer.is_empty() {
                buffer.extend(batch.drain(..));
                break;
            }
            if Instant::now() >= deadline {
                buffer.extend(batch.drain(..));
                buffer.push_back(last);
                return Ok(());
            }
        }
        if started.elapsed() < HAND_OVER_SPIN {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    tx.send(last).await.map(drop)
}

/// The next notification if one is ready now, without waiting.
pub(crate) fn try_next(rx: &mut LinkRx) -> Option<Notification> {
    let mut cx = TaskContext::from_waker(Waker::noop());
    match pin!(rx.next()).poll(&mut cx) {
        Poll::Ready(Ok(notification)) => notification,
        _ => None,
    }
}

/// A connection's publish rate limit: a token bucket of `rate` tokens refilled at `rate` per
/// second; each PUBLISH takes one.
#[derive(Debug, Clone)]
struct PublishRate {
    rate: f64,
    tokens: f64,
    updated: Instant,
}

impl PublishRate {
    /// A full bucket for `per_second` publishes a second; `None` for 0 (no limit).
    fn new(per_second: u32, now: Instant) -> Option<PublishRate> {
        (per_second > 0).then(|| PublishRate {
            rate: f64::from(per_second),
            tokens: f64::from(per_second),
            updated: now,
        })
    }

    /// `None` if a publish may go now, else when it may.
    fn wait(&mut self, now: Instant) -> Option<Instant> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.updated = now;
        (self.tokens < 1.0).then(|| now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }

    /// One publish went.
    fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

/// QoS and packet id of a PUBLISH, read from its encoding (rumqttd keeps them private).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PublishInfo {
    qos: u8,
    pkid: u16,
}

/// A packet read from the client, with its QoS and packet id if it is a PUBLISH.
struct Frame {
    packet: Packet,
    publish: Option<PublishInfo>,
}

/// Why bytes from a client are not a packet we accept.
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("{0}")]
    Codec(protocol::Error),
    #[error("a client may not send packets of type {0}")]
    ServerOnly(u8),
    #[error("the MQTT codec panicked")]
    Panicked,
    #[error("connection closed")]
    Closed(#[source] io::Error),
}

/// The socket with its buffers and codec.
struct Network {
    stream: TcpStream,
    read: BytesMut,
    write: BytesMut,
    codec: Box<dyn Protocol + Send + Sync>,
    version: Listener,
    max_payload_size: usize,
    metrics: BrokerMetrics,
}

impl Network {
    fn new(stream: TcpStream, version: Listener, ctx: &Context) -> Network {
        let codec: Box<dyn Protocol + Send + Sync> = match version {
            Listener::V4 => Box::new(V4),
            Listener::V5 => Box::new(V5),
        };
        Network {
            stream,
            read: BytesMut::new(),
            write: BytesMut::new(),
            codec,
            version,
            max_payload_size: ctx.limits.max_payload_size,
            metrics: ctx.metrics.clone(),
        }
    }

    /// Reads whatever the socket has (at least one byte). Cancel-safe: bytes read are kept.
    async fn read_more(&mut self) -> io::Result<()> {
        // Wait for bytes without a buffer, so an idle connection holds none.
        let n = loop {
            self.stream.readable().await?;
            if self.read.capacity() - self.read.len() < BUFFER_SIZE / 4 {
                self.read.reserve(BUFFER_SIZE);
            }
            match self.stream.try_read_buf(&mut self.read) {
                Ok(n) => break n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed by the peer",
            ));
        }
        self.metrics.bytes_in(n);
        Ok(())
    }

    /// Reads until one complete packet is buffered and returns it.
    async fn read_packet(&mut self) -> Result<Frame, FrameError> {
        loop {
            if let Some(frame) = self.next_packet()? {
                return Ok(frame);
            }
            self.read_more().await.map_err(FrameError::Closed)?;
        }
    }

    /// Whether the read buffer holds one complete packet (or a length that is malformed or
    /// too big, which the decoder then reports).
    fn has_packet(&self) -> bool {
        let mut remaining = 0usize;
        for (i, shift) in [0, 7, 14, 21].into_iter().enumerate() {
            let Some(&byte) = self.read.get(1 + i) else {
                return false;
            };
            remaining |= usize::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return remaining > self.max_payload_size || self.read.len() >= 2 + i + remaining;
            }
        }
        true
    }

    /// Decodes the next complete packet in the read buffer, if there is one.
    fn next_packet(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(&first) = self.read.first() else {
            return Ok(None);
        };
        let packet_type = first >> 4;
        // CONNACK, SUBACK, UNSUBACK, PINGRESP only ever go to clients; rumqttd's v5 decoder
        // panics on CONNACK and UNSUBACK.
        if matches!(packet_type, 2 | 9 | 11 | 13) {
            return Err(FrameError::ServerOnly(packet_type));
        }
        let publish = if packet_type == 3 {
            publish_info(&self.read)
        } else {
            None
        };
        let max = self.max_payload_size;
        let (codec, read) = (&mut self.codec, &mut self.read);
        match catch_unwind(AssertUnwindSafe(|| codec.read_mut(read, max))) {
            Ok(Ok(packet)) => Ok(Some(Frame { packet, publish })),
            Ok(Err(protocol::Error::InsufficientBytes(_))) => Ok(None),
            Ok(Err(err)) => Err(FrameError::Codec(err)),
            Err(_) => Err(FrameError::Panicked),
        }
    }

    /// Encodes `packet` into the write buffer (MQTT 5 properties dropped for 3.1.1 clients).
    /// Returns QoS and packet id if it is a PUBLISH.
    fn queue(&mut self, packet: Packet) -> Result<Option<PublishInfo>, FrameError> {
        let packet = match self.version {
            Listener::V4 => match for_v4(packet) {
                Some(packet) => packet,
                None => return Ok(None),
            },
            Listener::V5 => packet,
        };
        let start = self.write.len();
        let (codec, write) = (&self.codec, &mut self.write);
        match catch_unwind(AssertUnwindSafe(|| codec.write(packet, write))) {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                self.write.truncate(start);
                return Err(FrameError::Codec(err));
            }
            Err(_) => {
                self.write.truncate(start);
                return Err(FrameError::Panicked);
            }
        }
        let written = &self.write[start..];
        Ok(if written.first().is_some_and(|b| b >> 4 == 3) {
            publish_info(written)
        } else {
            None
        })
    }

    /// Writes the write buffer out.
    async fn flush(&mut self) -> io::Result<()> {
        if self.write.is_empty() {
            return Ok(());
        }
        self.stream.write_all(&self.write).await?;
        self.metrics.bytes_out(self.write.len());
        self.write.clear();
        // Most connections write rarely (a PUBACK, a command): keep no buffer between writes.
        self.write = BytesMut::new();
        Ok(())
    }

    /// Frees the read buffer once it holds no partial packet, so an idle connection keeps no
    /// buffer (the next read allocates one).
    fn release_read_buffer(&mut self) {
        if self.read.is_empty() && self.read.capacity() > 0 {
            self.read = BytesMut::new();
        }
    }
}

/// The 3.1.1 form of a packet from rumqttd's router: without MQTT 5 properties, which
/// rumqttd's v4 encoder meets with `unreachable!()` (the "v5 property kills the v4 listener"
/// defect). `None` for packets 3.1.1 has no server-to-client form of (DISCONNECT).
fn for_v4(packet: Packet) -> Option<Packet> {
    Some(match packet {
        Packet::Publish(publish, _) => Packet::Publish(publish, None),
        Packet::PubAck(ack, _) => Packet::PubAck(ack, None),
        Packet::PubRec(rec, _) => Packet::PubRec(rec, None),
        Packet::PubRel(rel, _) => Packet::PubRel(rel, None),
        Packet::PubComp(comp, _) => Packet::PubComp(comp, None),
        Packet::SubAck(ack, _) => Packet::SubAck(ack, None),
        Packet::UnsubAck(ack, _) => Packet::UnsubAck(ack, None),
        Packet::ConnAck(ack, _) => Packet::ConnAck(ack, None),
        Packet::Disconnect(..) => return None,
        other => other,
    })
}

/// QoS and packet id of the PUBLISH at the start of `buf`, if it is complete.
fn publish_info(buf: &[u8]) -> Option<PublishInfo> {
    let first = *buf.first()?;
    let mut remaining = 0usize;
    let mut header = 1;
    for (i, shift) in [0, 7, 14, 21].into_iter().enumerate() {
        let byte = *buf.get(1 + i)?;
        remaining |= usize::from(byte & 0x7F) << shift;
        header += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    if buf.len() < header + remaining {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    if qos == 0 {
        return Some(PublishInfo { qos, pkid: 0 });
    }
    let topic_len = usize::from(u16::from_be_bytes([
        *buf.get(header)?,
        *buf.get(header + 1)?,
    ]));
    let at = header + 2 + topic_len;
    let pkid = u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]);
    Some(PublishInfo { qos, pkid })
}

/// Whether `topic` can be published to: non-empty UTF-8 without wildcards.
fn valid_topic_name(topic: &[u8]) -> bool {
    !topic.is_empty()
        && std::str::from_utf8(topic).is_ok()
        && !topic.iter().any(|&b| b == b'+' || b == b'#' || b == 0)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_info_reads_qos_and_packet_id() {
        // QoS 1, topic "a/b", pkid 0x0102, payload "x".
        let qos1 = [0x32, 8, 0, 3, b'a', b'/', b'b', 1, 2, b'x'];
        assert_eq!(
            publish_info(&qos1),
            Some(PublishInfo {
                qos: 1,
                pkid: 0x0102
            })
        );
        // QoS 0: no packet id.
        let qos0 = [0x30, 6, 0, 3, b'a', b'/', b'b', b'x'];
        assert_eq!(publish_info(&qos0), Some(PublishInfo { qos: 0, pkid: 0 }));
        // Incomplete frames are not read.
        assert_eq!(publish_info(&qos1[..5]), None);
        assert_eq!(publish_info(&[0x32]), None);
    }

    #[test]
    fn v4_form_strips_properties() {
        let publish = rumqttd::protocol::Publish::new(
            Bytes::from_static(b"r/a"),
            Bytes::from_static(b"x"),
            true,
        );
        let properties = rumqttd::protocol::PublishProperties {
            user_properties: vec![("a".into(), "2".into())],
            ..Default::default()
        };
        let packet = for_v4(Packet::Publish(publish.clone(), Some(properties)));
        assert_eq!(packet, Some(Packet::Publish(publish, None)));
        let bye = Disconnect {
            reason_code: DisconnectReasonCode::ServerShuttingDown,
        };
        assert_eq!(for_v4(Packet::Disconnect(bye, None)), None);
    }

    #[test]
    fn publish_rate_lets_a_burst_through_then_paces() {
        let start = Instant::now();
        assert!(PublishRate::new(0, start).is_none(), "0 is no limit");
        let mut rate = PublishRate::new(10, start).unwrap();
        for _ in 0..10 {
            assert_eq!(rate.wait(start), None);
            rate.take();
        }
        let until = rate.wait(start).expect("the burst is spent");
        assert_eq!(until - start, Duration::from_millis(100));
        assert_eq!(rate.wait(until), None);
        rate.take();
        // Idle time refills, up to one burst.
        let later = until + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(rate.wait(later), None);
            rate.take();
        }
        assert!(rate.wait(later).is_some());
    }

    #[test]
    fn topic_names() {
        assert!(valid_topic_name(b"fleet/a/b/status"));
        assert!(!valid_topic_name(b""));
        assert!(!valid_topic_name(b"fleet/+/b/status"));
        assert!(!valid_topic_name(b"fleet/#"));
        assert!(!valid_topic_name(&[0xff, 0xfe]));
    }
}
