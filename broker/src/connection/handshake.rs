//! CONNECT to CONNACK: read the CONNECT, check it, authenticate, admit, claim the client id,
//! register with the router, answer. Refusals are answered with a CONNACK (never a silent
//! close, except when there is no CONNECT to answer), counted and logged here.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    self, ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, LastWill,
    LastWillProperties, Login, Packet, PublishProperties,
};
use tokio::time::timeout;
use tracing::{debug, error, warn};

use super::front_end::FrontEnd;
use super::network::{Network, PacketError};
use super::options::LinkFilters;
use super::pending::PendingSlot;
use super::sessions::{self, SessionRequest, SessionsFull, Term};
use crate::auth::{Attempt, Identity, is_vehicle_topic};
use crate::client_ids::Claim;
use crate::listener::Listener;
use crate::metrics::{AuthRefusal, ConnectRefusal};
use crate::qos;
use crate::router::{INTERNAL_PREFIX, LinkName, LinkRequest, TOPIC_ALIAS_MAX};
use crate::topic_syntax::valid_topic_name;

/// What the handshake established.
pub(super) struct Accepted {
    /// The client id: the CONNECT's, or the one the broker assigned.
    pub(super) client_id: String,
    /// Who the client authenticated as.
    pub(super) identity: Identity,
    /// The last will, checked against the identity's topic ACL.
    pub(super) will: Option<LastWill>,
    /// The last will's MQTT 5 properties, as it will be published (see
    /// [`will_publish_properties`]).
    pub(super) will_properties: Option<PublishProperties>,
    /// How long after the connection is lost the will is published: MQTT 5's min(Will Delay
    /// Interval, Session Expiry Interval), zero in 3.1.1.
    pub(super) will_delay: Duration,
    /// The keep-alive the client announced; zero (never time out) for clients that are not
    /// vehicles only.
    pub(super) keep_alive: Duration,
    /// The connection's hold on its client id.
    pub(super) claim: Claim,
    /// A persistent session: its link is registered with clean session off, so the router
    /// keeps (or took up) the session (MQTT 5: Clean Start and the Session Expiry Interval,
    /// see `sessions`).
    pub(super) persistent: bool,
    /// The connection's own router link, if it needed one from the start.
    pub(super) link: Option<Box<OwnLink>>,
}

/// A connection's own link with rumqttd's router; kept boxed, so connections without one
/// (vehicles) do not carry its room.
pub(super) struct OwnLink {
    pub(super) tx: LinkTx,
    pub(super) rx: LinkRx,
    /// The notification the connection's loop took from `rx`, until it delivers it.
    pub(super) ready: Option<rumqttd::Notification>,
    /// The name the link is registered under, for a clean session: one of the router's reused
    /// names, given back when the link is dropped (after its disconnect was handed over).
    /// `None`: the client id (a persistent session, or a clean one discarding one).
    pub(super) name: Option<LinkName>,
    /// A persistent session's terms (`sessions`): what becomes of it when the connection ends.
    pub(super) term: Option<Term>,
    /// The link's filters in the router, and the options of those that have some the router
    /// does not implement (`options`): the connection's, with those of the session it took
    /// up. `None` until the link's first SUBSCRIBE.
    pub(super) filters: Option<Box<LinkFilters>>,
    /// A resumed session's QoS 2 publishes received (PUBREC sent) whose PUBREL had not come
    /// when its last connection ended: taken by the new connection (`session`).
    pub(super) qos2_received: Vec<u16>,
}

/// Why a CONNECT is refused, mapped to each version's CONNACK code.
#[derive(Debug, Clone, Copy)]
enum RefusalCode {
    BadCredentials,
    NotAuthorized,
    ClientId,
    Busy,
    Unavailable,
    Quota,
    /// MQTT 5 only: a CONNECT that breaks the protocol in a way the decoder lets through.
    Protocol,
    /// MQTT 5 only: an Authentication Method the broker does not support (any).
    AuthMethod,
}

/// Why [`register`] did not register a connection.
#[derive(Debug, thiserror::Error)]
enum NotRegistered {
    /// A persistent session under a new client id beyond `max_persistent_sessions`.
    #[error("max_persistent_sessions client ids had a persistent session already")]
    SessionsFull(SessionsFull),
    /// The router refused.
    #[error(transparent)]
    Router(#[from] crate::router::LinkRefused),
    /// The router did not take the discard of the session a Clean Start 1 replaces.
    #[error(transparent)]
    Discard(#[from] sessions::DiscardError),
}

impl From<SessionsFull> for NotRegistered {
    fn from(full: SessionsFull) -> Self {
        NotRegistered::SessionsFull(full)
    }
}

/// How a handshake that does not succeed ends (counted and logged where it was decided).
enum Refused {
    /// With a CONNACK refusing the connection.
    With(RefusalCode),
    /// Without an answer: there is no CONNECT to answer, or the answer could not be written.
    Silently,
}

/// The parts of a CONNECT packet.
struct ConnectPacket {
    connect: Connect,
    properties: Option<ConnectProperties>,
    will: Option<LastWill>,
    will_properties: Option<PublishProperties>,
    /// The Will Delay Interval, in seconds (MQTT 5).
    will_delay: u32,
    login: Option<Login>,
}

/// The properties a last will is published with: those of its CONNECT (MQTT 5) that a PUBLISH
/// carries. The Will Delay Interval is not: the will is published when the connection is lost.
fn will_publish_properties(will: LastWillProperties) -> Option<PublishProperties> {
    let properties = PublishProperties {
        payload_format_indicator: will.payload_format_indicator,
        message_expiry_interval: will.message_expiry_interval,
        content_type: will.content_type,
        response_topic: will.response_topic,
        correlation_data: will.correlation_data,
        user_properties: will.user_properties,
        ..PublishProperties::default()
    };
    (properties != PublishProperties::default()).then_some(properties)
}

/// Runs the handshake; `None` means the connection is over (refused, answered if it could be).
/// `certificate` is the vehicle id of the client's verified TLS certificate, if it presented
/// one.
pub(super) async fn handshake(
    net: &mut Network,
    peer: SocketAddr,
    ctx: &FrontEnd,
    pending: PendingSlot,
    certificate: Option<String>,
) -> Option<Accepted> {
    match negotiate(net, peer, ctx, pending, certificate.as_deref()).await {
        Ok(accepted) => Some(accepted),
        Err(Refused::With(code)) => {
            refuse(net, code).await;
            None
        }
        Err(Refused::Silently) => None,
    }
}

/// The handshake's steps, in order; the connection stops counting as `pending` once its
/// CONNECT is read.
async fn negotiate(
    net: &mut Network,
    peer: SocketAddr,
    ctx: &FrontEnd,
    pending: PendingSlot,
    certificate: Option<&str>,
) -> Result<Accepted, Refused> {
    let ConnectPacket {
        connect,
        properties,
        will,
        will_properties,
        will_delay,
        login,
    } = read_connect(net, peer, ctx).await?;
    drop(pending);
    let (client_id, assigned) = choose_client_id(&connect, peer, ctx)?;
    let session_expiry = properties.as_ref().and_then(|p| p.session_expiry_interval);
    let request = match net.version {
        Listener::V4 => SessionRequest::v4(connect.clean_session),
        Listener::V5 => SessionRequest::v5(connect.clean_session, session_expiry),
    };
    let identity = identify(
        &client_id,
        request.may_persist(),
        login.as_ref(),
        certificate,
        peer,
        ctx,
    )
    .await?;
    let identity = check_keep_alive(&connect, will.as_ref(), identity, peer, ctx)?;
    let server_keep_alive = bound_keep_alive(&connect, net.version, &identity, peer, ctx)?;
    check_reserved(&client_id, &identity, peer, ctx)?;
    check_will(will.as_ref(), &client_id, &identity, peer, ctx)?;
    check_properties(properties.as_ref(), &client_id, peer, ctx)?;
    let receive_max = properties.as_ref().and_then(|p| p.receive_maximum);

    let counted = identity != Identity::Probe;
    admit(&client_id, counted, peer, ctx)?;
    let holder = login_name(&identity);
    let Some(claim) = ctx.client_ids.claim(&client_id, holder).await else {
        ctx.release_slot(counted);
        ctx.metrics.auth_refused(AuthRefusal::ClientIdMismatch);
        warn!(%peer, client_id, username = holder.unwrap_or(""), reason = AuthRefusal::ClientIdMismatch.label(), "CONNECT refused: another login holds this client id");
        return Err(Refused::With(RefusalCode::NotAuthorized));
    };
    net.set_client_max_packet_size(properties.as_ref().and_then(|p| p.max_packet_size));
    net.set_client_receive_max(receive_max);
    net.set_client_topic_alias_max(
        properties
            .as_ref()
            .and_then(|p| p.topic_alias_max)
            .unwrap_or(0),
    );
    // A will waits for the shorter of its delay and the session's expiry (MQTT 5, 3.1.3.2.2).
    let will_delay = Duration::from_secs(u64::from(will_delay.min(session_expiry.unwrap_or(0))));
    let registered = register(&client_id, request, ctx);
    let (link, connack) = match registered {
        Ok(registered) => registered,
        Err(NotRegistered::SessionsFull(SessionsFull)) => {
            ctx.client_ids.release(claim);
            ctx.release_slot(counted);
            ctx.metrics.connect_refused(ConnectRefusal::SessionsFull);
            warn!(%peer, client_id, reason = "sessions_full", max_persistent_sessions = ctx.limits.max_persistent_sessions, "CONNECT refused: as many client ids as max_persistent_sessions had a persistent session since the broker started (ids that had one, and clean sessions, are let in; raise max_persistent_sessions, or restart the broker to forget them)");
            return Err(Refused::With(RefusalCode::Quota));
        }
        Err(err @ (NotRegistered::Router(_) | NotRegistered::Discard(_))) => {
            ctx.client_ids.release(claim);
            ctx.release_slot(counted);
            ctx.metrics.connect_refused(ConnectRefusal::ServerFull);
            error!(%peer, client_id, cause = %err, "CONNECT refused: the router did not register the connection");
            return Err(Refused::With(RefusalCode::Busy));
        }
    };
    let persistent = link.as_ref().is_some_and(|link| link.term.is_some());
    let told = Told {
        assigned,
        max_payload_size: ctx.limits.max_payload_size,
        server_keep_alive,
    };
    if !answer(net, connack, told).await {
        debug!(%peer, client_id, "could not answer CONNACK");
        if link.is_some() {
            ctx.count_own_link(false);
        }
        ctx.client_ids.release(claim);
        ctx.release_slot(counted);
        return Err(Refused::Silently);
    }

    if counted {
        ctx.metrics
            .connection_opened(net.version, identity.is_device());
    }
    debug!(%peer, client_id, identity = %identity.describe(), listener = net.version.label(), "connected");
    Ok(Accepted {
        client_id,
        identity,
        will,
        will_properties,
        will_delay,
        keep_alive: Duration::from_secs(u64::from(server_keep_alive.unwrap_or(connect.keep_alive))),
        claim,
        persistent,
        link,
    })
}

/// Reads the first packet within `connection_timeout_ms`; it must be a CONNECT of the
/// listener's protocol version.
async fn read_connect(
    net: &mut Network,
    peer: SocketAddr,
    ctx: &FrontEnd,
) -> Result<ConnectPacket, Refused> {
    let first = match timeout(ctx.limits.connection_timeout, net.read_packet()).await {
        Ok(Ok(received)) => received,
        Ok(Err(PacketError::Codec(protocol::Error::InvalidProtocolLevel(level)))) => {
            // A client on the wrong port: answer in the format it understands.
            ctx.metrics.connect_refused(ConnectRefusal::Protocol);
            warn!(%peer, listener = net.version.label(), level, "CONNECT refused: wrong MQTT version for this listener");
            let answer: &[u8] = if level == 5 {
                &[0x20, 0x03, 0x00, 0x84, 0x00]
            } else {
                &[0x20, 0x02, 0x00, 0x01]
            };
            net.queue_bytes(answer);
            net.flush_farewell().await;
            return Err(Refused::Silently);
        }
        Ok(Err(err)) => {
            ctx.metrics.connect_refused(ConnectRefusal::NoConnect);
            debug!(%peer, cause = %err, "connection closed before a valid CONNECT");
            return Err(Refused::Silently);
        }
        Err(_) => {
            ctx.metrics.connect_refused(ConnectRefusal::NoConnect);
            debug!(%peer, "no CONNECT within connection_timeout_ms");
            return Err(Refused::Silently);
        }
    };
    let Packet::Connect(connect, properties, will, will_properties, login) = first.packet else {
        ctx.metrics.connect_refused(ConnectRefusal::NoConnect);
        warn!(%peer, "first packet was not CONNECT: closing");
        return Err(Refused::Silently);
    };
    Ok(ConnectPacket {
        connect,
        properties,
        will,
        will_delay: will_properties
            .as_ref()
            .and_then(|p| p.delay_interval)
            .unwrap_or(0),
        will_properties: will_properties.and_then(will_publish_properties),
        login,
    })
}

/// Holds a client to `max_keep_alive_secs`, if set (internal probes aside): a keep-alive
/// within it stands; beyond it, or 0 ("never time out"), an MQTT 5 client is told the maximum
/// (Server Keep Alive, returned) and an MQTT 3.1.1 client, which cannot be told, is refused
/// with CONNACK 2 (identifier rejected), as mosquitto's `max_keepalive` does.
fn bound_keep_alive(
    connect: &Connect,
    version: Listener,
    identity: &Identity,
    peer: SocketAddr,
    ctx: &FrontEnd,
) -> Result<Option<u16>, Refused> {
    let Some(max) = ctx.limits.max_keep_alive else {
        return Ok(None);
    };
    let asked = connect.keep_alive;
    if *identity == Identity::Probe || (asked != 0 && asked <= max) {
        return Ok(None);
    }
    if version == Listener::V5 {
        debug!(%peer, client_id = connect.client_id, asked, server_keep_alive = max, "keep-alive beyond max_keep_alive_secs: the client is told the maximum");
        return Ok(Some(max));
    }
    ctx.metrics
        .connect_refused(ConnectRefusal::KeepAliveTooLong);
    warn!(%peer, client_id = connect.client_id, identity = %identity.describe(), reason = "keep_alive_too_long", asked, max_keep_alive_secs = max, "CONNECT refused: an MQTT 3.1.1 keep-alive beyond max_keep_alive_secs (0: never time out), which 3.1.1 has no way to lower");
    Err(Refused::With(RefusalCode::ClientId))
}

/// Keep-alive 0 ("never time out") is refused to vehicles, which must prove they are alive,
/// and accepted for every other client (tools, observers, the bridge). A vehicle is a device
/// login; in open mode, where anyone may connect under any id, a connection whose last will
/// is on a vehicle topic (every Fleetbeat vehicle leaves its `offline` status as its will).
/// Any other open-mode connection with keep-alive 0 is an [`Identity::Tool`], which may not
/// publish on vehicle topics either. Returns the connection's identity.
fn check_keep_alive(
    connect: &Connect,
    will: Option<&LastWill>,
    identity: Identity,
    peer: SocketAddr,
    ctx: &FrontEnd,
) -> Result<Identity, Refused> {
    if connect.keep_alive != 0 {
        return Ok(identity);
    }
    let vehicle = match &identity {
        Identity::Device { .. } => true,
        Identity::Anonymous => will.is_some_and(|will| is_vehicle_topic(&will.topic)),
        Identity::Client { .. } | Identity::Tool | Identity::Probe => false,
    };
    if vehicle {
        ctx.metrics.connect_refused(ConnectRefusal::KeepAliveZero);
        warn!(%peer, client_id = connect.client_id, identity = %identity.describe(), reason = "keep_alive_zero", "CONNECT refused: keep-alive 0 is not allowed for a vehicle, which must prove it is alive");
        return Err(Refused::With(RefusalCode::NotAuthorized));
    }
    Ok(match identity {
        Identity::Anonymous => Identity::Tool,
        other => other,
    })
}

/// The connection's client id: the CONNECT's, or one assigned for an empty one (with a clean
/// session only), returned a second time to be told in CONNACK.
fn choose_client_id(
    connect: &Connect,
    peer: SocketAddr,
    ctx: &FrontEnd,
) -> Result<(String, Option<String>), Refused> {
    let mut client_id = connect.client_id.clone();
    let mut assigned = None;
    if client_id.is_empty() {
        if !connect.clean_session {
            ctx.metrics.connect_refused(ConnectRefusal::ClientId);
            warn!(%peer, reason = "client_id", "CONNECT refused: an empty client id needs a clean session");
            return Err(Refused::With(RefusalCode::ClientId));
        }
        client_id = format!("fleetbeat-{:016x}", fastrand::u64(..));
        assigned = Some(client_id.clone());
    }
    if client_id.contains(['+', '#', '/', '$']) {
        ctx.metrics.connect_refused(ConnectRefusal::ClientId);
        warn!(%peer, client_id, reason = "client_id", "CONNECT refused: client id contains + # / or $");
        return Err(Refused::With(RefusalCode::ClientId));
    }
    Ok((client_id, assigned))
}

/// The login whose session a connection of `identity` is, for [`crate::client_ids`]: `None`
/// in open mode (anyone may take any session there) and for the probe.
fn login_name(identity: &Identity) -> Option<&str> {
    match identity {
        Identity::Device { id, .. } => Some(id.as_str()),
        Identity::Client { name, .. } => Some(name),
        Identity::Anonymous | Identity::Tool | Identity::Probe => None,
    }
}

/// Who the connection is: the broker's own probe, whoever the credentials file says (which
/// also decides whether it may use `client_id`, with a `persistent` session or not), or
/// anyone in open mode. A verified TLS client `certificate` (its vehicle id) stands for the
/// device's password; in open mode it binds the client id to that vehicle.
async fn identify(
    client_id: &str,
    persistent: bool,
    login: Option<&Login>,
    certificate: Option<&str>,
    peer: SocketAddr,
    ctx: &FrontEnd,
) -> Result<Identity, Refused> {
    let username = login.map(|login| login.username.as_str());
    let password = login.map(|login| login.password.as_str());
    if let Some(admitted) = ctx.probe.admits(username, password) {
        if admitted {
            return Ok(Identity::Probe);
        }
        ctx.metrics.auth_refused(AuthRefusal::BadPassword);
        warn!(%peer, client_id, reason = AuthRefusal::BadPassword.label(), "CONNECT refused: authentication failed");
        return Err(Refused::With(RefusalCode::BadCredentials));
    }
    let Some(auth) = &ctx.auth else {
        if let Some(vehicle) = certificate
            && vehicle != client_id
        {
            let why = AuthRefusal::CertificateMismatch;
            ctx.metrics.auth_refused(why);
            warn!(%peer, client_id, certificate = vehicle, reason = why.label(), "CONNECT refused: the client id is not the vehicle of the client certificate");
            return Err(Refused::With(RefusalCode::NotAuthorized));
        }
        return Ok(Identity::Anonymous);
    };
    let attempt = Attempt {
        peer: peer.ip(),
        client_id,
        persistent,
        username,
        password,
        certificate,
    };
    auth.authenticate(attempt)
        .await
        .map_err(|why| {
            ctx.metrics.auth_refused(why);
            match certificate {
                // Operators grep `username=... reason=...`: the certificate's name comes after.
                Some(certificate) => warn!(%peer, client_id, username = username.unwrap_or(""), reason = why.label(), certificate, "CONNECT refused: authentication failed"),
                None => warn!(%peer, client_id, username = username.unwrap_or(""), reason = why.label(), "CONNECT refused: authentication failed"),
            }
            Refused::With(match why {
                AuthRefusal::ClientIdMismatch
                | AuthRefusal::WillNotAllowed
                | AuthRefusal::CertificateMismatch => RefusalCode::NotAuthorized,
                _ => RefusalCode::BadCredentials,
            })
        })
}

/// Client ids starting with [`INTERNAL_PREFIX`] are the broker's own.
fn check_reserved(
    client_id: &str,
    identity: &Identity,
    peer: SocketAddr,
    ctx: &FrontEnd,
) -> Result<(), Refused> {
    if client_id.starts_with(INTERNAL_PREFIX) && *identity != Identity::Probe {
        ctx.metrics.connect_refused(ConnectRefusal::ClientId);
        warn!(%peer, client_id, reason = "client_id", "CONNECT refused: client ids starting with {INTERNAL_PREFIX} are the broker's own");
        return Err(Refused::With(RefusalCode::ClientId));
    }
    Ok(())
}

/// A last will must go to a valid topic the identity may publish to.
fn check_will(
    will: Option<&LastWill>,
    client_id: &str,
    identity: &Identity,
    peer: SocketAddr,
    ctx: &FrontEnd,
) -> Result<(), Refused> {
    if let Some(will) = will
        && !(valid_topic_name(&will.topic) && identity.may_publish(&will.topic))
    {
        ctx.metrics.auth_refused(AuthRefusal::WillNotAllowed);
        warn!(%peer, client_id, topic = %String::from_utf8_lossy(&will.topic), reason = AuthRefusal::WillNotAllowed.label(), "CONNECT refused: the last will's topic is not allowed");
        return Err(Refused::With(RefusalCode::NotAuthorized));
    }
    Ok(())
}

/// Takes a connection slot (see [`FrontEnd::admit`]), unless the broker is shutting down.
fn admit(client_id: &str, counted: bool, peer: SocketAddr, ctx: &FrontEnd) -> Result<(), Refused> {
    if ctx.draining.is_cancelled() {
        ctx.metrics.connect_refused(ConnectRefusal::ShuttingDown);
        return Err(Refused::With(RefusalCode::Unavailable));
    }
    if !ctx.admit(counted) {
        ctx.metrics.connect_refused(ConnectRefusal::ServerFull);
        warn!(%peer, client_id, reason = "server_full", max_connections = ctx.limits.max_connections, "CONNECT refused: too many connections");
        return Err(Refused::With(RefusalCode::Busy));
    }
    Ok(())
}

/// Registers the connection: with a link of its own if it needs one now, else (served by the
/// mux link) with the CONNACK rumqttd's router would have answered. Returns the link (with
/// the session's [`Term`] if it is persistent, see `sessions`) and the CONNACK to write.
fn register(
    client_id: &str,
    request: SessionRequest,
    ctx: &FrontEnd,
) -> Result<(Option<Box<OwnLink>>, Option<Packet>), NotRegistered> {
    let noted = ctx
        .sessions
        .note(client_id, request, ctx.limits.max_persistent_sessions)?;
    if noted.had && !(noted.persistent && request.resume) {
        // The router discards the persistent session, subscriptions and all: by the clean
        // link below, or (Clean Start 1 with an expiry) by one of its own first.
        ctx.watchers.session_ended(client_id);
        if noted.persistent {
            ctx.sessions.discard(client_id).inspect_err(|_| {
                ctx.sessions.forget(client_id);
            })?;
        }
    }
    // A persistent session lives in the router: it needs a link from the start. So does a
    // clean session replacing one (registering it makes the router discard the old state).
    // Every other connection is served by the shared mux link until it subscribes to
    // something other than its commands.
    if noted.persistent || noted.had {
        let registered = ctx.registrar.link(LinkRequest {
            client_id,
            clean_session: !noted.persistent,
        });
        let (tx, rx, connack) = registered.inspect_err(|_| {
            if noted.persistent && !noted.had {
                ctx.sessions.forget(client_id);
            }
        })?;
        ctx.count_own_link(true);
        let term = noted.persistent.then_some(Term {
            epoch: noted.epoch,
            expiry: request.expiry,
            may_change: request.expiry != 0,
        });
        let resumed = noted.had && noted.persistent && request.resume;
        let (filters, qos2_received) = if resumed {
            ctx.sessions.resume(client_id)
        } else {
            (None, Vec::new())
        };
        return Ok((
            Some(Box::new(OwnLink {
                tx,
                rx,
                ready: None,
                name: None,
                term,
                filters,
                qos2_received,
            })),
            connack.into(),
        ));
    }
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
}

/// Writes the CONNACK with what it tells the client ([`Told`]: an assigned client id, and in
/// MQTT 5 what the broker supports for the connection and a Server Keep Alive); whether it
/// went out.
async fn answer(net: &mut Network, connack: Option<Packet>, told: Told) -> bool {
    let mut connack = connack;
    if let Some(Packet::ConnAck(_, props)) = &mut connack {
        let props = props.get_or_insert_with(ConnAckProperties::default);
        props.assigned_client_identifier = told.assigned;
        if net.version == Listener::V5 {
            announce_capabilities(props, told.max_payload_size);
            props.server_keep_alive = told.server_keep_alive;
        }
    }
    match connack {
        Some(packet @ Packet::ConnAck(..)) => {
            net.queue(packet).is_ok() && net.flush().await.is_ok()
        }
        _ => false,
    }
}

/// What a successful CONNACK tells the client beyond its code and Session Present.
struct Told {
    /// The client id the broker chose, for a CONNECT without one.
    assigned: Option<String>,
    /// The largest packet accepted (MQTT 5 Maximum Packet Size).
    max_payload_size: usize,
    /// The keep-alive the broker holds an MQTT 5 client to instead of its own.
    server_keep_alive: Option<u16>,
}

/// Tells an MQTT 5 client what the broker supports, so that it adapts instead of failing
/// (MQTT 5, 3.2.2.3): retained messages and wildcard subscriptions yes; shared subscriptions
/// yes (served by the front end, never by rumqttd's router, see `share`); subscription identifiers yes (such a SUBSCRIBE goes to the
/// connection's own router link, which attaches them); QoS 2 (the default, unsaid: a
/// persistent session's QoS 2 receptions outlive its connection, `sessions`); at most
/// [`qos::RECEIVE_MAXIMUM`] QoS 1 and 2 publishes unacknowledged; packets whose remaining
/// length is at most `max_payload_size` (a bigger one ends the connection, DISCONNECT 0x95).
/// The Topic Alias Maximum is the front end's, which resolves aliases itself
/// ([`TOPIC_ALIAS_MAX`]).
fn announce_capabilities(props: &mut ConnAckProperties, max_payload_size: usize) {
    let mut header = Vec::with_capacity(5);
    shared::frame::put_remaining_length(&mut header, max_payload_size);
    props.max_packet_size = u32::try_from(max_payload_size + 1 + header.len()).ok();
    props.retain_available = Some(1);
    props.wildcard_subscription_available = Some(1);
    props.shared_subscription_available = Some(1);
    props.subscription_identifiers_available = Some(1);
    props.receive_max = Some(qos::RECEIVE_MAXIMUM);
    props.topic_alias_max = Some(TOPIC_ALIAS_MAX);
}

/// What an MQTT 5 CONNECT's properties may not say: Receive Maximum 0 or Maximum Packet Size
/// 0 (protocol errors, §3.1.2.11.3 and §3.1.2.11.4), or an Authentication Method: the
/// broker has no enhanced authentication, and MQTT 5 §4.12 requires it to close the
/// connection then (CONNACK 0x8C first).
fn check_properties(
    properties: Option<&ConnectProperties>,
    client_id: &str,
    peer: SocketAddr,
    ctx: &FrontEnd,
) -> Result<(), Refused> {
    let Some(properties) = properties else {
        return Ok(());
    };
    let (why, code, what) = if properties.receive_maximum == Some(0) {
        (
            ConnectRefusal::Protocol,
            RefusalCode::Protocol,
            "Receive Maximum 0 is a protocol error (MQTT 5 §3.1.2.11.3)",
        )
    } else if properties.max_packet_size == Some(0) {
        (
            ConnectRefusal::Protocol,
            RefusalCode::Protocol,
            "Maximum Packet Size 0 is a protocol error (MQTT 5 §3.1.2.11.4)",
        )
    } else if properties.authentication_method.is_some() {
        (
            ConnectRefusal::AuthMethod,
            RefusalCode::AuthMethod,
            "enhanced authentication (an Authentication Method) is not supported",
        )
    } else {
        return Ok(());
    };
    ctx.metrics.connect_refused(why);
    warn!(%peer, client_id, reason = why.label(), "CONNECT refused: {what}");
    Err(Refused::With(code))
}

/// Answers a refused CONNECT with the CONNACK code for `why` in the listener's version.
async fn refuse(net: &mut Network, why: RefusalCode) {
    let v4 = net.version == Listener::V4;
    let code = match why {
        RefusalCode::BadCredentials => ConnectReturnCode::BadUserNamePassword,
        RefusalCode::NotAuthorized => ConnectReturnCode::NotAuthorized,
        RefusalCode::ClientId => ConnectReturnCode::ClientIdentifierNotValid,
        RefusalCode::Busy if v4 => ConnectReturnCode::ServiceUnavailable,
        RefusalCode::Busy => ConnectReturnCode::ServerBusy,
        RefusalCode::Unavailable if v4 => ConnectReturnCode::ServiceUnavailable,
        RefusalCode::Unavailable => ConnectReturnCode::ServerUnavailable,
        RefusalCode::Quota if v4 => ConnectReturnCode::ServiceUnavailable,
        RefusalCode::Quota => ConnectReturnCode::QuotaExceeded,
        RefusalCode::Protocol if v4 => ConnectReturnCode::RefusedProtocolVersion,
        RefusalCode::Protocol => ConnectReturnCode::ProtocolError,
        RefusalCode::AuthMethod if v4 => ConnectReturnCode::NotAuthorized,
        RefusalCode::AuthMethod => ConnectReturnCode::BadAuthenticationMethod,
    };
    let connack = ConnAck {
        session_present: false,
        code,
    };
    net.farewell(Packet::ConnAck(connack, None)).await;
}
