//! CONNECT to CONNACK: read the CONNECT, check it, authenticate, admit, claim the client id,
//! register with the router, answer. Refusals are answered with a CONNACK (never a silent
//! close, except when there is no CONNECT to answer), counted and logged here.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    self, ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, LastWill,
    Login, Packet,
};
use tokio::time::timeout;
use tracing::{debug, error, warn};

use super::front_end::FrontEnd;
use super::network::{Network, PacketError, valid_topic_name};
use crate::auth::Identity;
use crate::client_ids::Claim;
use crate::listener::Listener;
use crate::metrics::{AuthRefusal, ConnectRefusal};
use crate::router::{INTERNAL_PREFIX, LinkRequest, TOPIC_ALIAS_MAX};

/// What the handshake established.
pub(super) struct Accepted {
    /// The client id: the CONNECT's, or the one the broker assigned.
    pub(super) client_id: String,
    /// Who the client authenticated as.
    pub(super) identity: Identity,
    /// The last will, checked against the identity's topic ACL.
    pub(super) will: Option<LastWill>,
    /// The keep-alive the client announced (never zero).
    pub(super) keep_alive: Duration,
    /// The connection's hold on its client id.
    pub(super) claim: Claim,
    /// A persistent session (clean session / clean start off).
    pub(super) persistent: bool,
    /// The client's topic alias maximum (MQTT 5), 0 for none.
    pub(super) topic_alias_max: u16,
    /// The connection's own router link, if it needed one from the start.
    pub(super) link: Option<OwnLink>,
}

/// A connection's own link with rumqttd's router.
pub(super) struct OwnLink {
    pub(super) tx: LinkTx,
    pub(super) rx: LinkRx,
}

/// Why a CONNECT is refused, mapped to each version's CONNACK code.
#[derive(Debug, Clone, Copy)]
enum RefusalCode {
    BadCredentials,
    NotAuthorized,
    ClientId,
    Busy,
    Unavailable,
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
    login: Option<Login>,
}

/// Runs the handshake; `None` means the connection is over (refused, answered if it could be).
pub(super) async fn handshake(
    net: &mut Network,
    peer: SocketAddr,
    ctx: &FrontEnd,
) -> Option<Accepted> {
    match negotiate(net, peer, ctx).await {
        Ok(accepted) => Some(accepted),
        Err(Refused::With(code)) => {
            refuse(net, code).await;
            None
        }
        Err(Refused::Silently) => None,
    }
}

/// The handshake's steps, in order.
async fn negotiate(
    net: &mut Network,
    peer: SocketAddr,
    ctx: &FrontEnd,
) -> Result<Accepted, Refused> {
    let ConnectPacket {
        connect,
        properties,
        will,
        login,
    } = read_connect(net, peer, ctx).await?;
    check_keep_alive(&connect, peer, ctx)?;
    let (client_id, assigned) = choose_client_id(&connect, peer, ctx)?;
    let identity = identify(&client_id, login.as_ref(), peer, ctx).await?;
    check_reserved(&client_id, &identity, peer, ctx)?;
    check_will(will.as_ref(), &client_id, &identity, peer, ctx)?;

    let counted = identity != Identity::Probe;
    admit(&client_id, counted, peer, ctx)?;
    let claim = ctx.client_ids.claim(&client_id).await;
    let topic_alias_max = properties
        .as_ref()
        .and_then(|p| p.topic_alias_max)
        .unwrap_or(0);
    let persistent = !connect.clean_session;
    let registered = register(&client_id, persistent, topic_alias_max, ctx);
    let (link, connack) = match registered {
        Ok(registered) => registered,
        Err(err) => {
            ctx.client_ids.release(claim);
            ctx.release_slot(counted);
            ctx.metrics.connect_refused(ConnectRefusal::ServerFull);
            error!(%peer, client_id, cause = %err, "CONNECT refused: the router did not register the connection");
            return Err(Refused::With(RefusalCode::Busy));
        }
    };
    if !answer(net, connack, assigned).await {
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
        keep_alive: Duration::from_secs(u64::from(connect.keep_alive)),
        claim,
        persistent,
        topic_alias_max,
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
    let Packet::Connect(connect, properties, will, _will_properties, login) = first.packet else {
        ctx.metrics.connect_refused(ConnectRefusal::NoConnect);
        warn!(%peer, "first packet was not CONNECT: closing");
        return Err(Refused::Silently);
    };
    Ok(ConnectPacket {
        connect,
        properties,
        will,
        login,
    })
}

/// Keep-alive 0 ("never time out") is refused: a vehicle must prove it is alive.
fn check_keep_alive(connect: &Connect, peer: SocketAddr, ctx: &FrontEnd) -> Result<(), Refused> {
    if connect.keep_alive == 0 {
        ctx.metrics.connect_refused(ConnectRefusal::KeepAliveZero);
        warn!(%peer, client_id = connect.client_id, reason = "keep_alive_zero", "CONNECT refused: keep-alive 0 is not allowed, a vehicle must prove it is alive");
        return Err(Refused::With(RefusalCode::NotAuthorized));
    }
    Ok(())
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

/// Who the connection is: the broker's own probe, whoever the credentials file says, or
/// anyone in open mode.
async fn identify(
    client_id: &str,
    login: Option<&Login>,
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
        return Ok(Identity::Anonymous);
    };
    auth.authenticate(client_id, username, password)
        .await
        .map_err(|why| {
            ctx.metrics.auth_refused(why);
            warn!(%peer, client_id, username = username.unwrap_or(""), reason = why.label(), "CONNECT refused: authentication failed");
            Refused::With(match why {
                AuthRefusal::ClientIdMismatch | AuthRefusal::WillNotAllowed => {
                    RefusalCode::NotAuthorized
                }
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
/// mux link) with the CONNACK rumqttd's router would have answered. Returns the link and the
/// CONNACK to write.
fn register(
    client_id: &str,
    persistent: bool,
    topic_alias_max: u16,
    ctx: &FrontEnd,
) -> Result<(Option<OwnLink>, Option<Packet>), crate::router::LinkRefused> {
    let had_session = ctx.note_session(client_id, persistent);
    if had_session && !persistent {
        // The router discards the persistent session, subscriptions and all.
        ctx.watchers.session_ended(client_id);
    }
    // A persistent session lives in the router: it needs a link from the start. So does a
    // clean session replacing one (registering it makes the router discard the old state).
    // Every other connection is served by the shared mux link until it subscribes to
    // something other than its commands.
    if persistent || had_session {
        let (tx, rx, connack) = ctx.registrar.link(LinkRequest {
            client_id,
            clean_session: !persistent,
            topic_alias_max,
        })?;
        ctx.count_own_link(true);
        return Ok((Some(OwnLink { tx, rx }), connack.into()));
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

/// Writes the CONNACK (telling an `assigned` client id); whether it went out.
async fn answer(net: &mut Network, connack: Option<Packet>, assigned: Option<String>) -> bool {
    let mut connack = connack;
    if let Some(Packet::ConnAck(_, props)) = &mut connack
        && assigned.is_some()
    {
        props
            .get_or_insert_with(ConnAckProperties::default)
            .assigned_client_identifier = assigned;
    }
    match connack {
        Some(packet @ Packet::ConnAck(..)) => {
            net.queue(packet).is_ok() && net.flush().await.is_ok()
        }
        _ => false,
    }
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
    };
    let connack = ConnAck {
        session_present: false,
        code,
    };
    net.farewell(Packet::ConnAck(connack, None)).await;
}
