//! An established connection: [`run`] sets it up, runs its loop until it ends, and tears it
//! down (the router told, the last will published if the connection was lost).
//!
//! Each turn of the loop routes what the read buffer holds (in batches, paced by the publish
//! rate), then waits for the next of: shutdown, the client's bytes, the mux link's events, the
//! own link's notifications, keep-alive expiry. What each packet from the client does is in
//! `inbound`; how the router's and the mux link's messages are written, in `outbound`.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::LinkError;
use rumqttd::protocol::{
    self, Disconnect, DisconnectReasonCode, LastWill, Packet, PublishProperties,
    SubscribeReasonCode, UnsubAckReason,
};
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::front_end::FrontEnd;
use super::gate::PubAckQueue;
use super::handshake::{Accepted, OwnLink};
use super::network::{Network, PacketError};
use super::rate::PublishRate;
use crate::auth::{Identity, Role};
use crate::listener::Listener;
use crate::metrics::{DisconnectReason, DropReason};
use crate::mux::{MuxEvent, PortRx, PortTx};
use crate::router::{LinkName, LinkRequest, hand_over};
use crate::share::{GroupKey, SharedMessage};

/// Packet ids the front end gives the commands it writes from the mux link. rumqttd's
/// links number their forwards 1..=100 (its `MAX_INFLIGHT`), so a connection that has both a
/// dedicated link and mux subscriptions never sees one id used twice.
pub(super) const MUX_PKIDS: RangeInclusive<u16> = 1024..=u16::MAX;

/// A connection's channel from the mux link (see `mux`), opened at its first QoS 1 publish or
/// command subscription.
pub(super) struct MuxPort {
    pub(super) tx: PortTx,
    pub(super) rx: PortRx,
}

/// An established connection.
pub(super) struct Established {
    pub(super) net: Network,
    /// The connection's own router link, if it has one: from CONNECT for a persistent
    /// session, from its first subscription the mux link does not serve otherwise.
    pub(super) link: Option<Box<OwnLink>>,
    /// A persistent session: everything goes through its own link, as rumqttd keeps it.
    pub(super) persistent: bool,
    /// Publishes for the mux link, in the client's order.
    pub(super) mux_batch: Vec<Packet>,
    /// Marks this connection's batch in the mux link's buffer (see `Mux::send`).
    mux_pending: Option<u64>,
    pub(super) port: Option<MuxPort>,
    /// This connection's id in the mux's subscription table.
    pub(super) connection: u64,
    /// The exact command topics this connection is subscribed to through the mux link.
    pub(super) mux_subscriptions: Vec<String>,
    /// Packet ids of QoS 1 commands written to the client from the mux link, not yet
    /// acknowledged by it.
    pub(super) mux_outgoing: Vec<u16>,
    pub(super) next_mux_pkid: u16,
    /// Boxed: every connection's task keeps room for `Established`, and an identity is
    /// 72 bytes (its vehicle and fleet ids inline) that the loop reads rarely.
    pub(super) identity: Box<Identity>,
    pub(super) ctx: Arc<FrontEnd>,
    pub(super) client_id: String,
    /// Shutdown began: route nothing new, finish what is in flight.
    pub(super) draining: bool,
    /// Packet ids of QoS 1 publishes from the client not yet acknowledged by the router.
    pub(super) incoming_inflight: Vec<u16>,
    /// Packet ids of QoS 1 publishes written to the client, not yet acknowledged by it.
    pub(super) outgoing_inflight: Vec<u16>,
    /// The PUBACKs owed to the client for its QoS 1 publishes, in their order (`gate`).
    pub(super) pubacks: PubAckQueue,
    /// Its QoS 1 `event`, `ack` and `status` publishes wait for durability (`durability`).
    pub(super) gated: bool,
    /// A durable consumer: its PUBACKs prove messages durable.
    pub(super) consumer: bool,
    /// What only some connections use, on the heap from its first use (see [`Extras`]).
    pub(super) extras: Option<Box<Extras>>,
    /// An MQTT 5 DISCONNECT asked for the will to be published.
    pub(super) will_on_disconnect: bool,
    /// How long after the connection is lost its will is published (MQTT 5: min(Will Delay
    /// Interval, Session Expiry Interval); zero otherwise).
    will_delay: Duration,
    /// Why the broker ends the connection, told to an MQTT 5 client in a last DISCONNECT (a
    /// protocol error: packet too large, topic alias invalid, receive maximum exceeded, ...).
    pub(super) farewell: Cell<Option<DisconnectReasonCode>>,
    pub(super) acl_warned: bool,
    /// The connection's publish rate limit, `None` if it has none.
    rate: Option<PublishRate>,
    /// The connection's SUBSCRIBE rate limit (the same token bucket), `None` if it has none.
    pub(super) subscribe_rate: Option<PublishRate>,
    /// The filters the connection subscribed to, while `max_subscriptions` is set.
    pub(super) filters: Filters,
    /// The PUBLISH at the head of the read buffer waits for the rate until then; the socket
    /// is not read meanwhile.
    throttled_until: Option<Instant>,
    /// The PUBLISH at the head of the read buffer has been held back (counted once).
    holding: bool,
    throttle_warned: bool,
}

/// A connection's state that vehicles (QoS 0 and 1, MQTT 3.1.1, their own commands) never
/// use: durable consumers, own router links, QoS 2, subscriptions the front end answers in
/// part, shared subscriptions, MQTT 5 topic aliases, the deliveries a Receive Maximum holds
/// back and retained messages sent again. Every connection's task keeps room for
/// [`Established`] as long as it lives; these ≈380 bytes are allocated only by a connection
/// that needs them.
#[derive(Default)]
pub(super) struct Extras {
    /// A durable consumer's QoS 1 forwards of such messages, by packet id, until it
    /// acknowledges them.
    pub(super) consumer_forwards: HashMap<u16, crate::durability::MessageKey>,
    /// The router's QoS 1 forwards on the connection's own link, in the order it sent them,
    /// each with whether it may be acknowledged to the router yet (the client's PUBACK came, or
    /// it was delivered at QoS 0): rumqttd takes PUBACKs in that order only.
    pub(super) router_forwards: VecDeque<(u16, bool)>,
    /// Packet ids of QoS 2 publishes from the client, routed and answered with PUBREC, whose
    /// PUBREL has not arrived: a resend of one is not routed again.
    pub(super) qos2_received: Vec<u16>,
    /// The router's forwards delivered to the client at QoS 2 whose exchange is not over, by
    /// packet id, each with whether it was released (PUBREC came, PUBREL sent).
    pub(super) qos2_delivered: Vec<(u16, bool)>,
    /// QoS 1 and 2 deliveries waiting for the client to acknowledge earlier ones (its MQTT 5
    /// Receive Maximum), in order (see `outbound`).
    pub(super) held: VecDeque<Held>,
    /// SUBSCRIBEs handed to the router without the filters the front end refused (see
    /// `inbound`): packet id → each refused filter's position and SUBACK code, put back into
    /// the router's SUBACK.
    pub(super) suback_refusals: Vec<(u16, Vec<(usize, SubscribeReasonCode)>)>,
    /// SUBSCRIBEs handed to the router one filter at a time (filters with options, see
    /// `options`): packet id → how many SUBACKs are still to come, and the codes so far,
    /// merged into one SUBACK for the client.
    pub(super) split_subacks: Vec<(u16, usize, Vec<SubscribeReasonCode>)>,
    /// SUBSCRIBEs that repeated filters the own link has: packet id → those filters, with what
    /// they were granted, whose retained messages are sent again once the SUBACK is written
    /// (`retained`).
    pub(super) resend: Vec<(u16, Vec<crate::retained::Repeated>)>,
    /// UNSUBSCRIBEs handed to the router without the filters the front end answered (shared
    /// subscriptions, `$` filters): packet id → each one's position and UNSUBACK reason.
    pub(super) unsuback_answers: Vec<(u16, Vec<(usize, UnsubAckReason)>)>,
    /// The shared subscription groups (`share`) this connection is a member of.
    pub(super) shared_subscriptions: Vec<GroupKey>,
    /// QoS 1 messages from shared subscription groups written to the client and not yet
    /// acknowledged, by packet id (from [`MUX_PKIDS`]): given to another member if the
    /// connection ends first.
    pub(super) shared_outgoing: HashMap<u16, Arc<SharedMessage>>,
    /// MQTT 5 topic aliases the client set, so an aliased publish (empty topic) is checked
    /// against the topic it stands for.
    pub(super) topic_aliases: HashMap<u16, Bytes>,
    /// A persistent session's deliveries written and not acknowledged yet, by packet id, with
    /// their topic and place in the router's log: handed to the session when the connection
    /// ends, so that the next one marks their resend DUP (`options::LinkFilters`).
    pub(super) unacknowledged: Vec<(u16, Bytes, (u64, u64))>,
}

/// A QoS 1 or 2 delivery held back by the client's Receive Maximum. Those that carry MQTT 5
/// properties are stamped when held: their Message Expiry Interval runs on (`expiry`).
pub(super) enum Held {
    /// A forward of the connection's own router link.
    Router {
        forward: Box<rumqttd::Forward>,
        kept: crate::expiry::Kept,
    },
    /// A command from the mux link, to write at `qos`.
    Command {
        command: Arc<crate::mux::CommandMessage>,
        qos: u8,
    },
    /// A shared subscription group's message, to write at `qos` with the retain flag
    /// `retain` and the Subscription Identifier `id`.
    Shared {
        message: Arc<SharedMessage>,
        qos: u8,
        retain: bool,
        id: Option<crate::share::SubId>,
    },
    /// A retained message sent again (`retained`), to write at `qos`.
    Retained {
        message: Box<crate::retained::RetainedMessage>,
        qos: u8,
        kept: crate::expiry::Kept,
    },
}

/// The filters a connection subscribed to, counted against `max_subscriptions` (100 by
/// default): a `Vec` scanned in full, since a vehicle has one filter and a hash set's first
/// insert makes room for four.
#[derive(Default)]
pub(super) struct Filters(Vec<String>);

impl Filters {
    pub(super) fn contains(&self, filter: &str) -> bool {
        self.0.iter().any(|f| f == filter)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn insert(&mut self, filter: String) {
        if !self.contains(&filter) {
            if self.0.is_empty() {
                self.0.reserve_exact(1);
            }
            self.0.push(filter);
        }
    }

    pub(super) fn remove(&mut self, filter: &str) {
        if let Some(at) = self.0.iter().position(|f| f == filter) {
            self.0.swap_remove(at);
        }
    }
}

/// A connection's last will and its MQTT 5 properties, kept on the heap (only connections
/// that set one pay for it).
type Will = Box<(LastWill, Option<PublishProperties>)>;

/// Runs an established connection to its end, then tears it down.
///
/// The session is set up before the returned future is, so that the future holds the
/// session once (an `async fn` keeps its arguments beside what it moves them into): its size
/// is what every connection's task allocates for as long as it lives (see `docs/broker.md`,
/// Memory).
pub(super) fn run(
    net: Network,
    accepted: Accepted,
    peer: SocketAddr,
    ctx: Arc<FrontEnd>,
) -> impl Future<Output = ()> + Send {
    let Accepted {
        client_id,
        identity,
        will,
        will_properties,
        will_delay,
        keep_alive,
        claim,
        persistent,
        link,
    } = accepted;
    let counted = identity != Identity::Probe;
    let device = identity.is_device();
    let rate = match &identity {
        Identity::Probe
        | Identity::Client {
            role: Role::Bridge, ..
        } => None,
        _ => PublishRate::new(ctx.limits.max_publish_rate, Instant::now()),
    };
    let subscribe_rate = match &identity {
        Identity::Probe => None,
        _ => PublishRate::new(ctx.limits.max_subscribe_rate, Instant::now()),
    };
    let consumer = ctx.durability.is_consumer(&identity, &client_id);
    let gated = ctx.durability.gates(&identity, consumer);
    if consumer {
        ctx.durability.consumer_connected(true);
    }
    let mut session = Established {
        net,
        link,
        persistent,
        mux_batch: Vec::new(),
        mux_pending: None,
        port: None,
        connection: ctx.mux.connection_id(),
        mux_subscriptions: Vec::new(),
        mux_outgoing: Vec::new(),
        next_mux_pkid: *MUX_PKIDS.start(),
        identity: Box::new(identity),
        ctx: Arc::clone(&ctx),
        client_id,
        draining: false,
        incoming_inflight: Vec::new(),
        outgoing_inflight: Vec::new(),
        pubacks: PubAckQueue::default(),
        gated,
        consumer,
        extras: None,
        will_on_disconnect: false,
        will_delay,
        farewell: Cell::new(None),
        acl_warned: false,
        rate,
        subscribe_rate,
        filters: Filters::default(),
        throttled_until: None,
        holding: false,
        throttle_warned: false,
    };
    // A resumed session's QoS 2 publishes still awaiting their PUBREL (see `sessions`).
    let pending = session
        .link
        .as_mut()
        .map(|link| std::mem::take(&mut link.qos2_received))
        .unwrap_or_default();
    if !pending.is_empty() {
        session.extras().qos2_received = pending;
    }

    let will: Option<Will> = will.map(|will| Box::new((will, will_properties)));
    async move {
        // The claim's token is this connection's own (polled on every wake of it, a shared one
        // would be a lock every connection contends for, see `Established::run`), and a child
        // of the broker's `stopping`.
        let end = tokio::select! {
            biased;
            () = claim.kicked.cancelled() => if ctx.stopping.is_cancelled() {
                DisconnectReason::Shutdown
            } else {
                DisconnectReason::TakenOver
            },
            end = session.run(keep_alive) => end,
        };

        // Boxed: the teardown's future is as large as the loop's, and needed once.
        Box::pin(session.end(end, will)).await;
        ctx.client_ids.release(claim);
        if counted {
            ctx.release_slot(true);
            ctx.metrics
                .connection_closed(session.net.version, device, end);
        }
        debug!(%peer, client_id = session.client_id, reason = end.label(), "disconnected");
    }
}

impl Established {
    /// The connection's [`Extras`], allocated at the first use.
    pub(super) fn extras(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    async fn run(&mut self, keep_alive: Duration) -> DisconnectReason {
        // MQTT: a server disconnects a client it has heard nothing from for 1.5 × keep-alive;
        // keep-alive 0 (allowed for clients that are not vehicles) means never.
        let idle_limit = (!keep_alive.is_zero()).then(|| keep_alive + keep_alive / 2);
        let mut last_heard = Instant::now();
        let mut batch = Vec::new();
        if let Some(link) = self.link.as_mut()
            && let Some(table) = link.filters.as_mut()
        {
            // A resumed session's filters with options get their identifiers back, before
            // anything the client sends.
            let mut restore = table.restore();
            if hand_over(&mut link.tx, &mut restore).await.is_err() {
                return DisconnectReason::Router;
            }
        }
        let mux = Arc::clone(&self.ctx.mux);
        // Made once, not once per turn of the loop, and on a child token of this
        // connection's own: polling a cancellation future locks its token's node, and a node
        // shared by every connection is a lock both cores fight over on every message. One
        // token (a few hundred bytes for each connection) for both alarms: draining began, the
        // shared router link died.
        let alarm = self.ctx.alarm.child_token().cancelled_owned();
        // One timer for the loop's life, moved only to an earlier deadline. A later one (each
        // message heard moves keep-alive's on) waits until the timer fires: it then finds the
        // deadline still ahead and sets itself to it. A timer made or moved on every message
        // cost a registration and a removal in the runtime's timer wheel per message.
        let timer = tokio::time::sleep(Duration::MAX);
        tokio::pin!(alarm, timer);
        let mut alarm_heard = false;
        loop {
            if let Err(end) = self.route_buffered(&mut batch).await {
                return end;
            }
            if self.draining
                && (self.incoming_inflight.is_empty() || self.owes_only_lost_causes())
                && self.outgoing_inflight.is_empty()
                && self.mux_outgoing.is_empty()
            {
                return DisconnectReason::Shutdown;
            }
            let throttled = self.throttled_until;
            // Owing too many PUBACKs (publishes waiting for durability): its socket waits too,
            // so TCP pushes back on the client, and keep-alive counts from when reading resumes.
            let owing = self.pubacks.is_full();
            if owing {
                last_heard = Instant::now();
            }
            let deadline = match (throttled, idle_limit) {
                (Some(until), _) => Some(until),
                (None, Some(limit)) if !owing => Some(last_heard + limit),
                (None, _) => None,
            };
            if let Some(due) = deadline
                && due < timer.deadline()
            {
                timer.as_mut().reset(due);
            }
            tokio::select! {
                biased;
                () = &mut alarm, if !alarm_heard => {
                    if !self.persistent && mux.dead().is_cancelled() {
                        debug!(client_id = self.client_id, "the shared router link is gone");
                        return DisconnectReason::Router;
                    }
                    if self.ctx.draining.is_cancelled() {
                        self.draining = true;
                        alarm_heard = true;
                    } else {
                        // The shared link died, which a persistent session does not use: it
                        // listens for draining alone from now.
                        alarm.set(self.ctx.draining.child_token().cancelled_owned());
                    }
                }
                // One timer, the throttle's or keep-alive's (never both: a throttled client is
                // evidently sending), so the task keeps room for one.
                () = &mut timer, if deadline.is_some() => {
                    let due = deadline.unwrap_or(last_heard);
                    let now = Instant::now();
                    if now < due {
                        // Set for a deadline that has moved on since.
                        timer.as_mut().reset(due);
                    } else if throttled.is_some() {
                        // Its socket waited, so TCP pushed back on it; keep-alive counts from
                        // when reading resumes.
                        last_heard = now;
                    } else {
                        debug!(client_id = self.client_id, ?keep_alive, "keep-alive expired");
                        return DisconnectReason::KeepAlive;
                    }
                }
                read = self.net.read_more(), if throttled.is_none() && !owing => match read {
                    Ok(()) => last_heard = Instant::now(),
                    Err(err) => {
                        debug!(client_id = self.client_id, cause = %err, "connection lost");
                        return DisconnectReason::Network;
                    }
                },
                // Both deliveries are boxed: their futures are larger than the rest of this
                // loop's, and the task's allocation is sized for the largest state it has.
                event = next_event(&mut self.port) => {
                    if let Err(end) = Box::pin(self.deliver_mux(event)).await {
                        return end;
                    }
                }
                note = next_notification(&mut self.link) => match note {
                    Ok(()) => {
                        let first = self.link.as_mut().and_then(|link| link.ready.take());
                        if let Err(end) = Box::pin(self.deliver(first)).await {
                            return end;
                        }
                    }
                    Err(err) => {
                        debug!(client_id = self.client_id, cause = %err, "the router dropped the connection");
                        return DisconnectReason::Router;
                    }
                },
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
            let received = match self.net.next_packet() {
                Ok(Some(received)) => received,
                Ok(None) => break,
                Err(err) => return Err(self.protocol_error(&err)),
            };
            if let Some(end) = self.on_packet(received, batch) {
                self.route(batch).await?;
                self.flush().await?;
                return Err(end);
            }
            if batch.len() + self.mux_batch.len() >= self.ctx.limits.max_batch {
                self.route(batch).await?;
            }
        }
        self.route(batch).await?;
        // Both batches are empty now: give their memory back (a `Packet` is ≈400 bytes, and
        // a vehicle's one heartbeat a second would otherwise keep room for four of them).
        if batch.capacity() > 0 {
            *batch = Vec::new();
        }
        if self.mux_batch.capacity() > 0 {
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
        if !self.net.publish_is_next() || self.draining || !self.net.has_packet() {
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

    /// Logs (and counts, for an oversized packet) why the client's bytes end the connection.
    pub(super) fn protocol_error(&self, err: &PacketError) -> DisconnectReason {
        self.farewell.set(Some(match err {
            PacketError::Codec(protocol::Error::PayloadSizeLimitExceeded(_)) => {
                DisconnectReasonCode::PacketTooLarge
            }
            PacketError::Codec(_) | PacketError::Reserved(_) => {
                DisconnectReasonCode::MalformedPacket
            }
            _ => DisconnectReasonCode::ProtocolError,
        }));
        if let PacketError::Codec(protocol::Error::PayloadSizeLimitExceeded(size)) = err {
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

    /// Queues `packet` for the client; a packet that cannot be encoded ends the connection.
    pub(super) fn answer(&mut self, packet: Packet) -> Result<(), DisconnectReason> {
        match self.net.queue(packet) {
            Ok(_) => Ok(()),
            Err(err) => Err(self.protocol_error(&err)),
        }
    }

    /// The connection's channel from the mux link, opened on first use.
    pub(super) fn port(&mut self) -> &mut MuxPort {
        self.port.get_or_insert_with(|| {
            let (tx, rx) = crate::mux::port();
            MuxPort { tx, rx }
        })
    }

    /// Registers the connection's own router link if it has none yet.
    pub(super) fn ensure_link(&mut self) -> Result<(), DisconnectReason> {
        if self.link.is_some() {
            return Ok(());
        }
        // A clean session's link is registered under a reused name, not the client id: the
        // router would remember the id for good (see `router::LinkName`). A persistent
        // session's link is registered from CONNECT, under the client id (`handshake`).
        let name = (!self.persistent).then(|| self.ctx.registrar.link_name());
        let registered = self.ctx.registrar.link(LinkRequest {
            client_id: name.as_ref().map_or(&self.client_id, LinkName::as_str),
            clean_session: !self.persistent,
        });
        match registered {
            Ok((tx, rx, _connack)) => {
                debug!(
                    client_id = self.client_id,
                    link = name.as_ref().map(LinkName::as_str),
                    "subscription beyond commands: the connection gets its own router link"
                );
                self.link = Some(Box::new(OwnLink {
                    tx,
                    rx,
                    ready: None,
                    name,
                    term: None,
                    filters: None,
                    qos2_received: Vec::new(),
                }));
                self.ctx.count_own_link(true);
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

    /// Writes what is queued for the client.
    pub(super) async fn flush(&mut self) -> Result<(), DisconnectReason> {
        self.net.flush().await.map_err(|err| {
            debug!(client_id = self.client_id, cause = %err, "write failed");
            DisconnectReason::Network
        })
    }

    /// Tears the connection down after it ended for `end`: the last DISCONNECT (MQTT 5, at
    /// shutdown or after a protocol error, with its reason), the mux subscriptions and mirror
    /// watches dropped, the router told, the last `will` published (after its delay) if the
    /// connection was lost (or the client asked for it).
    async fn end(&mut self, end: DisconnectReason, will: Option<Will>) {
        let ctx = Arc::clone(&self.ctx);
        // Its client sends what was not acknowledged again, on its next connection.
        ctx.durability
            .forget(self.connection, self.pubacks.waiting());
        if self.consumer {
            ctx.durability.consumer_connected(false);
        }
        // MQTT 5 clients are told why the broker ends the connection (a silent one too: the
        // link may be one-way only, 0x8D); after a protocol error
        // the socket is drained a moment, so that the DISCONNECT is read rather than lost to
        // a reset (the client may still be sending).
        let farewell = match end {
            DisconnectReason::Shutdown => Some(DisconnectReasonCode::ServerShuttingDown),
            DisconnectReason::KeepAlive => Some(DisconnectReasonCode::KeepAliveTimeout),
            DisconnectReason::Protocol => self.farewell.get(),
            _ => None,
        };
        if let Some(reason_code) = farewell
            && self.net.version == Listener::V5
        {
            let bye = Disconnect { reason_code };
            self.net.farewell(Packet::Disconnect(bye, None)).await;
            if end == DisconnectReason::Protocol {
                self.net.linger().await;
            }
        }
        for topic in self.mux_subscriptions.drain(..) {
            ctx.mux.unsubscribe(self.connection, &topic);
        }
        self.leave_shared_groups();
        if !self.persistent {
            ctx.watchers.session_ended(&self.client_id);
        }
        if let Some(link) = &mut self.link
            && end != DisconnectReason::Router
        {
            // The router forgets the connection (and keeps a persistent session's state).
            let bye = Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            };
            if let Err(err) =
                hand_over(&mut link.tx, &mut vec![Packet::Disconnect(bye, None)]).await
            {
                debug!(client_id = self.client_id, cause = %err, "router gone at disconnect");
            }
        }
        // A will comes from its client: its No Local subscriptions (a persistent session's,
        // kept beyond this connection) must not get it back (see `carry`).
        let no_local = self.has_no_local();
        // A QoS 2 publish whose PUBREL has not come stays received with the session: its
        // resend to the next connection is answered, not routed again.
        let qos2_received = self
            .extras
            .as_mut()
            .map(|extras| std::mem::take(&mut extras.qos2_received))
            .unwrap_or_default();
        if let Some(link) = &mut self.link {
            // The router has the link's disconnect before any registration under its name
            // that follows (one channel, in order): the name may be taken again.
            drop(link.name.take());
            if let (Some(filters), Some(extras)) = (link.filters.as_mut(), self.extras.as_mut()) {
                let sent = extras.unacknowledged.drain(..);
                filters.unacknowledged(sent.map(|(_, topic, cursor)| (topic, cursor)));
            }
            // And before the discard of its session, now or when the session expires.
            if let Some(term) = link.term {
                ctx.sessions
                    .ended(&self.client_id, term, link.filters.take(), qos2_received);
            }
        }
        if let Some(will) = will
            && (end.fires_will() || self.will_on_disconnect)
        {
            let (will, will_properties) = *will;
            if self.will_delay.is_zero() {
                publish_will(&ctx, &self.client_id, will, will_properties, no_local).await;
            } else {
                // MQTT 5 Will Delay: published later, unless the client connected again by
                // then (even if that connection has ended too) or the broker stops.
                let (delay, client_id) = (self.will_delay, self.client_id.clone());
                let delayed = ctx.client_ids.delay_will(&client_id);
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = delayed.called_off.cancelled() => {}
                    }
                    if ctx.client_ids.will_due(&delayed) {
                        publish_will(&ctx, &client_id, will, will_properties, no_local).await;
                    } else {
                        debug!(
                            client_id,
                            "client back within its will delay, or the broker stopping: no will"
                        );
                    }
                });
            }
        }
        if self.link.is_some() {
            ctx.count_own_link(false);
        }
    }
}

impl Established {
    /// Leaves every shared subscription group, and gives what they gave this connection and
    /// it did not acknowledge (written or still queued) to other members (MQTT 5 §4.8.2).
    fn leave_shared_groups(&mut self) {
        let mut unacknowledged: Vec<Arc<SharedMessage>> = Vec::new();
        if let Some(extras) = &mut self.extras {
            for key in extras.shared_subscriptions.drain(..) {
                self.ctx.shared.leave(&key, self.connection);
            }
            unacknowledged.extend(extras.shared_outgoing.drain().map(|(_, message)| message));
            // Held back by the client's Receive Maximum, never written.
            for held in extras.held.drain(..) {
                if let Held::Shared { message, .. } = held {
                    unacknowledged.push(message);
                }
            }
        }
        if let Some(port) = &mut self.port {
            while let Ok(event) = port.rx.try_recv() {
                if let MuxEvent::Shared { message, .. } = event {
                    unacknowledged.push(message);
                }
            }
        }
        if !unacknowledged.is_empty() {
            debug!(
                client_id = self.client_id,
                messages = unacknowledged.len(),
                "shared subscription messages left unacknowledged: given to other members"
            );
            self.ctx.shared.redeliver(unacknowledged);
        }
    }
}

/// Publishes the last `will` of `client_id`, with its MQTT 5 `properties`, as published at
/// its QoS (see `qos`); marked as the client's (`carry::ORIGIN`) if it has a No Local
/// subscription (`no_local`).
async fn publish_will(
    ctx: &FrontEnd,
    client_id: &str,
    will: LastWill,
    properties: Option<PublishProperties>,
    no_local: bool,
) {
    let qos = will.qos as u8;
    // As the client sent them: without a marker of the broker's it may have forged (`carry`).
    let mut recorded = properties.clone();
    crate::carry::remove_forged(&mut recorded);
    ctx.mux.record(
        &will.topic,
        &will.message,
        will.retain,
        qos,
        recorded.as_ref(),
    );
    let topic = will.topic.clone();
    match ctx
        .wills
        .publish(
            will.topic,
            will.message,
            will.retain,
            qos,
            properties,
            no_local.then_some(client_id),
        )
        .await
    {
        Ok(()) => {
            ctx.metrics.will_published();
            debug!(client_id, topic = %String::from_utf8_lossy(&topic), "last will published");
        }
        Err(err) => {
            error!(client_id, cause = %err, "could not publish the last will");
        }
    }
}

/// Waits for the next notification from a connection's own link and leaves it in the link's
/// `ready`; never ready without a link.
///
/// The loop's `select!` keeps room in every connection's task for each branch's future and
/// for the largest outcome of its branches, and only connections with a link of their own (the
/// bridge, tools) should pay for rumqttd's future (≈300 bytes, boxed: one allocation per
/// wake-up, not per message, since `deliver` takes what else is ready without it), a
/// notification (≈250, left in the boxed link) or a `LinkError` (over 800, boxed).
async fn next_notification(link: &mut Option<Box<OwnLink>>) -> Result<(), Box<LinkError>> {
    match link {
        Some(link) => match Box::pin(link.rx.next()).await {
            Ok(notification) => {
                link.ready = notification;
                Ok(())
            }
            Err(err) => Err(Box::new(err)),
        },
        None => std::future::pending().await,
    }
}

/// The next event from the mux link for this connection; never ready without a port. The
/// port holds a sender of its own channel, so the channel never closes.
async fn next_event(port: &mut Option<MuxPort>) -> MuxEvent {
    match port {
        Some(port) => match port.rx.recv().await {
            Ok(event) => event,
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
