//! The shared router link ("mux link") that serves device-like connections, so they do not
//! each need a rumqttd link of their own.
//!
//! rumqttd 0.20 pre-sizes every link's queues with constants (≈27 KiB resident per idle link,
//! ≈150 KiB once its rings have walked), and scans every subscription filter for every
//! publish. A vehicle only ever publishes and subscribes to its own `fleet/{f}/{v}/cmd`, so:
//!
//! - every PUBLISH of a clean-session connection goes to the router through this one link,
//!   in the connection's order; a QoS 1 publish gets a packet id of the mux link's own, and
//!   the router's PUBACK for it is handed back to the connection as the PUBACK of its own
//!   packet id ([`MuxEvent::PubAck`]), so a device is acknowledged only once the router took
//!   its message;
//! - the mux link subscribes once to `fleet/+/+/cmd` (QoS 1); a connection whose SUBSCRIBE
//!   names only exact command topics is answered by the front end and registered here; each
//!   command the router forwards to the mux link is handed to the connections subscribed to
//!   its topic ([`MuxEvent::Command`]), which write it with their own packet ids;
//! - retained commands are remembered here (the router forwards them to the mux link as
//!   plain messages), so a later exact subscriber still gets them on subscribe.
//!
//! Connections that subscribe to anything else, or ask for a persistent session, get a
//! dedicated router link as before (`connection`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_channel::mpsc;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    Filter, Packet, Protocol as _, PubAck, PubAckReason, Publish, PublishProperties, QoS,
    RetainForwardRule, Subscribe,
};
use shared::TopicKind;
use shared::frame;
use shared::topic::Levels;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use crate::expiry::Kept;
use crate::router::{
    LinkRefused, LinkRequest, Registrar, append_all_but_last, send_now, wait_for_router,
};

/// The filter the mux link subscribes to: every vehicle's command topic.
const COMMAND_FILTER: &str = TopicKind::Command.filter();

/// Packets waiting in the mux link's buffer beyond which publishers wait for the router, so
/// a flood stays in the senders' sockets (TCP pushes back) instead of in memory.
const MAX_BACKLOG: usize = 4096;

/// Longest a publisher waits for room in the mux link's buffer before appending anyway, so a
/// stuck router cannot hang a connection forever.
const BACKLOG_PATIENCE: Duration = Duration::from_secs(10);

/// What the mux hands to one connection.
#[derive(Debug, Clone)]
pub(crate) enum MuxEvent {
    /// The router took the connection's QoS 1 publish with this (the connection's) packet id.
    PubAck(u16),
    /// A publish of the connection that waited for durability (its entry in the
    /// connection's PUBACK queue) is durable (see `durability`).
    Durable(u64),
    /// A command on a topic the connection subscribed to, to write at `qos`.
    Command {
        /// The message.
        command: Arc<CommandMessage>,
        /// The QoS to deliver at: min(the command's QoS, the subscription's granted QoS).
        qos: u8,
    },
    /// A message a shared subscription group gives this connection (`share`), to write at
    /// `qos`.
    Shared {
        /// The message, and the group it came through.
        message: Arc<crate::share::SharedMessage>,
        /// The QoS to deliver at: min(the message's QoS, the member's granted QoS).
        qos: u8,
        /// The retain flag to deliver with (Retain As Published).
        retain: bool,
        /// The member's Subscription Identifier, to deliver with.
        id: Option<crate::share::SubId>,
    },
    /// A retained message sent again for a repeated SUBSCRIBE (`retained`), to write at `qos`
    /// (min(its QoS, the subscription's)) with the retain flag.
    Retained {
        /// The message.
        message: Box<crate::retained::RetainedMessage>,
        /// The QoS to deliver at.
        qos: u8,
    },
}

/// The sending side of a connection's port: what the mux link, durability and shared
/// subscription groups hand it ([`MuxEvent`]).
pub(crate) type PortTx = mpsc::UnboundedSender<MuxEvent>;

/// The receiving side of a connection's port.
pub(crate) type PortRx = mpsc::UnboundedReceiver<MuxEvent>;

/// A connection's port: an unbounded channel from `futures-channel`, not tokio's. Every vehicle
/// has one (its command subscription opens it), and tokio's channel allocates a 32-slot block
/// and cache-padded halves up front (≈1 KiB); this one a small node per event.
pub(crate) fn port() -> (PortTx, PortRx) {
    mpsc::unbounded()
}

impl crate::retained::RetainedPort for PortTx {
    fn give(&self, message: crate::retained::RetainedMessage, qos: u8) -> bool {
        let message = Box::new(message);
        self.unbounded_send(MuxEvent::Retained { message, qos })
            .is_ok()
    }
}

impl crate::share::MemberPort for PortTx {
    fn give(
        &self,
        message: Arc<crate::share::SharedMessage>,
        qos: u8,
        retain: bool,
        id: Option<crate::share::SubId>,
    ) -> bool {
        self.unbounded_send(MuxEvent::Shared {
            message,
            qos,
            retain,
            id,
        })
        .is_ok()
    }
}

/// A message on a command topic.
#[derive(Debug)]
pub(crate) struct CommandMessage {
    pub(crate) topic: Bytes,
    pub(crate) payload: Bytes,
    /// Delivered because it was retained (on subscribe), not live.
    pub(crate) retain: bool,
    /// The QoS it was published at (at most [`qos::MAX_QOS`](crate::qos::MAX_QOS)).
    pub(crate) qos: u8,
    /// Its MQTT 5 properties (user properties, correlation data, response topic, ...) as they
    /// left or entered the router: the broker's markers are still in (`carry`), removed as it
    /// is written; a retained one's interval is in `carry::EXPIRES` (`expiry`).
    pub(crate) properties: Option<PublishProperties>,
    /// When the front end took it: its Message Expiry Interval runs on (`expiry`).
    pub(crate) kept: Kept,
}

/// One connection's subscription to one exact command topic.
#[derive(Debug)]
struct CommandSubscriber {
    connection: u64,
    qos: u8,
    tx: PortTx,
}

/// QoS 1 publishes sent through the mux link and not yet acknowledged by the router: the
/// mux link's packet id → (the connection's channel, the connection's packet id).
#[derive(Debug, Default)]
struct AwaitingAck {
    next: u16,
    by_pkid: HashMap<u16, (PortTx, u16)>,
}

/// Why the mux link cannot take a publish.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MuxError {
    /// The router is gone (rumqttd's `LinkError`, over 800 bytes, kept as its message).
    #[error("the shared router link is gone: {0}")]
    LinkGone(String),
    /// The router already dropped the mux link.
    #[error("the shared router link was dropped by the router")]
    Dropped,
}

/// The shared link and who is subscribed to what through it.
pub(crate) struct Mux {
    /// The link, and the number of times a publisher found its buffer empty (the router had
    /// taken everything appended before): a connection whose batch went in at the current
    /// count, with the buffer not empty, has a batch still pending.
    tx: tokio::sync::Mutex<(LinkTx, u64)>,
    awaiting_ack: Mutex<AwaitingAck>,
    subscribers: Mutex<HashMap<Bytes, Vec<CommandSubscriber>>>,
    retained: Mutex<HashMap<Bytes, Arc<CommandMessage>>>,
    connections: AtomicU64,
    /// Cancelled when the router dropped the mux link.
    dead: CancellationToken,
    /// The same, for [`Mux::send`]'s check on every batch without locking the token.
    gone: AtomicBool,
}

opaque_debug!(Mux);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Mux {
    /// Registers the mux link as `client_id` and subscribes it to [`COMMAND_FILTER`] at
    /// QoS 1. Run [`Mux::dispatch`] with the returned receiver.
    pub(crate) async fn new(
        registrar: &Registrar,
        client_id: &str,
    ) -> Result<(Arc<Mux>, LinkRx), LinkRefused> {
        let (mut tx, rx, _connack) = registrar.link(LinkRequest::internal(client_id))?;
        let subscribe = Subscribe {
            pkid: 1,
            filters: vec![Filter {
                path: COMMAND_FILTER.to_owned(),
                qos: QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::Never,
            }],
        };
        tx.send(Packet::Subscribe(subscribe, None))
            .await
            .map_err(|err| LinkRefused(err.to_string()))?;
        let mux = Mux {
            tx: tokio::sync::Mutex::new((tx, 0)),
            awaiting_ack: Mutex::new(AwaitingAck::default()),
            subscribers: Mutex::new(HashMap::new()),
            retained: Mutex::new(HashMap::new()),
            connections: AtomicU64::new(0),
            dead: CancellationToken::new(),
            gone: AtomicBool::new(false),
        };
        Ok((Arc::new(mux), rx))
    }

    /// A fresh id for a connection's subscriptions.
    pub(crate) fn connection_id(&self) -> u64 {
        self.connections.fetch_add(1, Ordering::Relaxed)
    }

    /// Cancelled once the router dropped the mux link.
    pub(crate) fn dead(&self) -> &CancellationToken {
        &self.dead
    }

    /// The publish to hand to the router for a connection's QoS 1 `publish` with packet id
    /// `device_pkid`: the same message under a packet id of the mux link's own. The router's
    /// PUBACK for it reaches `reply` as [`MuxEvent::PubAck`]`(device_pkid)`.
    pub(crate) fn qos1(
        &self,
        publish: &Publish,
        properties: Option<PublishProperties>,
        reply: &PortTx,
        device_pkid: u16,
    ) -> Packet {
        let pkid = {
            let mut awaiting = lock(&self.awaiting_ack);
            // 65 535 ids; more than that many unacknowledged publishes at once does not happen
            // with max_inflight-bounded batches, but never reuse one still awaited.
            let mut pkid = awaiting.next;
            for _ in 0..=u16::MAX {
                pkid = pkid.wrapping_add(1).max(1);
                if !awaiting.by_pkid.contains_key(&pkid) {
                    break;
                }
            }
            awaiting.next = pkid;
            awaiting.by_pkid.insert(pkid, (reply.clone(), device_pkid));
            pkid
        };
        Packet::Publish(
            publish_with(&publish.topic, &publish.payload, 1, pkid, publish.retain),
            properties,
        )
    }

    /// Appends `batch` (publishes, in the connection's order) to the mux link's buffer and
    /// tells the router, emptying `batch`. As with a link of its own, a connection has one
    /// batch pending at a time: it waits while the router has not taken its previous one
    /// (`pending`, updated here), and while the buffer holds more than [`MAX_BACKLOG`]
    /// packets, up to [`BACKLOG_PATIENCE`]. So a flooding client is held back by TCP rather
    /// than filling the router's turn with its backlog.
    ///
    /// # Errors
    ///
    /// [`MuxError`] if the router dropped the mux link or is gone.
    pub(crate) async fn send(
        &self,
        batch: &mut Vec<Packet>,
        pending: &mut Option<u64>,
    ) -> Result<(), MuxError> {
        if self.gone.load(Ordering::Acquire) {
            return Err(MuxError::Dropped);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        // The batch stays in its `Vec` until it goes (see `router::hand_over`).
        loop {
            {
                let mut guard = self.tx.lock().await;
                let (tx, taken) = &mut *guard;
                let last = {
                    let mut buffer = tx.buffer();
                    if buffer.is_empty() {
                        *taken += 1;
                    }
                    let ours_pending = *pending == Some(*taken) && !buffer.is_empty();
                    let room = (buffer.len() < MAX_BACKLOG && !ours_pending)
                        || started.elapsed() >= BACKLOG_PATIENCE;
                    if room {
                        append_all_but_last(&mut buffer, batch)
                    } else {
                        None
                    }
                };
                if let Some(last) = last {
                    *pending = Some(*taken);
                    // One notification per batch: the router takes the whole buffer for it.
                    return send_now(tx, last).map_err(|err| MuxError::LinkGone(err.to_string()));
                }
            }
            wait_for_router(started).await;
        }
    }

    /// Subscribes `connection` to the exact command topic `topic` at `qos`, replacing a
    /// subscription it had to it. Returns the retained command on `topic`, if there is one.
    pub(crate) fn subscribe(
        &self,
        connection: u64,
        topic: &str,
        qos: u8,
        tx: &PortTx,
    ) -> Option<Arc<CommandMessage>> {
        let topic = Bytes::copy_from_slice(topic.as_bytes());
        {
            let mut subscribers = lock(&self.subscribers);
            // Room for one: a vehicle's command topic has one subscriber.
            let list = subscribers
                .entry(topic.clone())
                .or_insert_with(|| Vec::with_capacity(1));
            list.retain(|s| s.connection != connection);
            list.push(CommandSubscriber {
                connection,
                qos,
                tx: tx.clone(),
            });
        }
        lock(&self.retained).get(&topic).cloned()
    }

    /// Removes `connection`'s subscription to `topic`; whether it had one.
    pub(crate) fn unsubscribe(&self, connection: u64, topic: &str) -> bool {
        let mut subscribers = lock(&self.subscribers);
        let Some(list) = subscribers.get_mut(topic.as_bytes()) else {
            return false;
        };
        let before = list.len();
        list.retain(|s| s.connection != connection);
        let removed = list.len() != before;
        if list.is_empty() {
            subscribers.remove(topic.as_bytes());
        }
        removed
    }

    /// Remembers a publish on a command topic, published at `qos` with `properties`, the way
    /// rumqttd's router treats retained messages: a retained one replaces the topic's, an
    /// empty payload clears it.
    pub(crate) fn record(
        &self,
        topic: &[u8],
        payload: &Bytes,
        retain: bool,
        qos: u8,
        properties: Option<&PublishProperties>,
    ) {
        if !is_command_topic(topic) {
            return;
        }
        if payload.is_empty() {
            lock(&self.retained).remove(topic);
        } else if retain {
            let topic = Bytes::copy_from_slice(topic);
            let mut properties = properties.cloned();
            // Its interval counts from now, for every later subscriber.
            crate::expiry::carry_retained(true, &mut properties);
            let command = CommandMessage {
                topic: topic.clone(),
                payload: payload.clone(),
                retain: true,
                qos: qos.min(crate::qos::MAX_QOS),
                kept: Kept::of(&properties),
                properties,
            };
            lock(&self.retained).insert(topic, Arc::new(command));
        }
    }

    /// Reads what the router sends the mux link, forever: PUBACKs go to the connection that
    /// published, commands to the connections subscribed to their topic.
    pub(crate) async fn dispatch(self: Arc<Mux>, mut rx: LinkRx) {
        loop {
            let notification = match rx.next().await {
                Ok(Some(notification)) => notification,
                Ok(None) => continue,
                Err(err) => {
                    debug!(cause = %err, "the shared router link is closed");
                    break;
                }
            };
            match notification {
                Notification::DeviceAck(ack) => {
                    if let Packet::PubAck(ack, _) = Packet::from(ack) {
                        let waiting = lock(&self.awaiting_ack).by_pkid.remove(&ack.pkid);
                        if let Some((tx, device_pkid)) = waiting {
                            // The connection may be gone: its PUBACK goes nowhere.
                            let _ = tx.unbounded_send(MuxEvent::PubAck(device_pkid));
                        }
                    }
                }
                Notification::Forward(forward) => {
                    let pkid = publish_pkid(&forward.publish);
                    let qos =
                        crate::qos::original(&forward.publish.topic, forward.properties.as_ref())
                            .min(crate::qos::MAX_QOS);
                    self.forward(forward.publish, qos, forward.properties);
                    if let Some(pkid) = pkid {
                        // Handed to every subscriber's queue: acknowledge, so the router's
                        // in-flight window for the mux link moves on.
                        let ack = PubAck {
                            pkid,
                            reason: PubAckReason::Success,
                        };
                        let mut guard = self.tx.lock().await;
                        if let Err(err) = guard.0.send(Packet::PubAck(ack, None)).await {
                            debug!(cause = %err, "router gone");
                            break;
                        }
                    }
                }
                Notification::Unschedule => {
                    if rx.wake().await.is_err() {
                        break;
                    }
                }
                Notification::Disconnect(disconnect, _) => {
                    error!(reason = ?disconnect.reason_code, "the router dropped the shared link of device connections");
                    break;
                }
                other => {
                    debug!(notification = ?other, "unexpected notification on the shared link")
                }
            }
        }
        self.gone.store(true, Ordering::Release);
        self.dead.cancel();
    }

    /// Hands a command published at `qos`, with `properties`, to the connections subscribed
    /// to its topic.
    fn forward(&self, publish: Publish, qos: u8, properties: Option<PublishProperties>) {
        let mut subscribers = lock(&self.subscribers);
        let Some(list) = subscribers.get_mut(&publish.topic) else {
            return;
        };
        let command = Arc::new(CommandMessage {
            topic: publish.topic,
            payload: publish.payload,
            retain: false,
            qos,
            kept: Kept::of(&properties),
            properties,
        });
        list.retain(|s| {
            s.tx.unbounded_send(MuxEvent::Command {
                command: Arc::clone(&command),
                qos: s.qos.min(qos),
            })
            .is_ok()
        });
        if list.is_empty() {
            subscribers.remove(&command.topic);
        }
    }
}

/// Whether `topic` (or a filter) is one exact command topic `fleet/{fleet}/{vehicle}/cmd`,
/// which the mux link's subscription covers: valid UTF-8, neither id empty nor a wildcard.
pub(crate) fn is_command_topic(topic: &[u8]) -> bool {
    let plain =
        |level: &[u8]| !level.is_empty() && !level.iter().any(|&b| matches!(b, b'+' | b'#' | 0));
    Levels::split(topic).is_some_and(|levels| {
        levels.topic_kind() == Some(TopicKind::Command)
            && plain(levels.fleet)
            && plain(levels.vehicle)
    }) && std::str::from_utf8(topic).is_ok()
}

/// A `Publish` with the given QoS and packet id. rumqttd keeps both fields private and offers
/// no constructor for QoS > 0, so the packet is encoded and read back with its own codec.
pub(crate) fn publish_with(
    topic: &[u8],
    payload: &[u8],
    qos: u8,
    pkid: u16,
    retain: bool,
) -> Publish {
    let encoded = frame::Publish {
        topic,
        payload,
        qos,
        pkid,
        retain,
        ..frame::Publish::default()
    }
    .bytes();
    let mut encoded = BytesMut::from(Bytes::from(encoded));
    match V4.read_mut(&mut encoded, usize::MAX) {
        Ok(Packet::Publish(publish, _)) => publish,
        // Unreachable for a topic under 64 KiB (ours come from decoded packets); fall back to
        // what the public constructor allows rather than panicking.
        _ => Publish::new(
            Bytes::copy_from_slice(topic),
            Bytes::copy_from_slice(payload),
            retain,
        ),
    }
}

/// The packet id of a forwarded publish if it is QoS 1 or 2 (rumqttd keeps it private): one
/// encoding of the publish.
pub(crate) fn publish_pkid(publish: &Publish) -> Option<u16> {
    let mut encoded = BytesMut::new();
    V4.write(Packet::Publish(publish.clone(), None), &mut encoded)
        .ok()?;
    let header = frame::frame(&encoded)?;
    let body = &encoded[header.header_len..header.total()];
    frame::publish_fields(header.first, body)?.1
}

#[cfg(test)]
mod tests {
    use tokio::time::{sleep, timeout};

    use super::*;
    use crate::BrokerConfig;

    /// Outer bound on anything a test awaits; generous, the code under test has its own bounds.
    const T: Duration = Duration::from_secs(20);

    #[test]
    fn command_topics_are_exact() {
        assert!(is_command_topic(b"fleet/acme/van-1/cmd"));
        assert!(!is_command_topic(b"fleet/+/van-1/cmd"));
        assert!(!is_command_topic(b"fleet/acme/#"));
        assert!(!is_command_topic(b"fleet/acme/van-1/hb"));
        assert!(!is_command_topic(b"fleet/acme/van-1/cmd/x"));
        assert!(!is_command_topic(b"fleet//van-1/cmd"));
        assert!(!is_command_topic(b"json/fleet/acme/van-1/cmd"));
    }

    #[test]
    fn publish_with_sets_qos_and_packet_id() {
        let publish = publish_with(b"fleet/a/b/cmd", b"go", 1, 777, true);
        assert_eq!(publish_pkid(&publish), Some(777));
        assert!(publish.retain);
        assert_eq!(&publish.topic[..], b"fleet/a/b/cmd");
        assert_eq!(&publish.payload[..], b"go");
        let qos0 = publish_with(b"a", b"x", 0, 0, false);
        assert_eq!(publish_pkid(&qos0), None);
    }

    #[tokio::test]
    async fn a_qos1_publish_is_acknowledged_only_once_the_router_took_it() {
        // The mux on its own router: the PUBACK comes from the router, not from the front end.
        let config = BrokerConfig::default();
        let registrar = Registrar::spawn(config.router_config(8));
        let (mux, mux_rx) = Mux::new(&registrar, "fleetbeat-internal-mux-test")
            .await
            .unwrap();
        tokio::spawn(Arc::clone(&mux).dispatch(mux_rx));
        let (mut watch_tx, mut watch_rx, _) =
            registrar.link(LinkRequest::internal("watch")).unwrap();
        watch_tx.subscribe("fleet/+/+/event").unwrap();
        sleep(Duration::from_millis(100)).await;

        let (reply, mut acks) = port();
        let publish = rumqttd::protocol::Publish::new(
            Bytes::from_static(b"fleet/f/van-1/event"),
            Bytes::from_static(b"e1"),
            false,
        );
        let packet = mux.qos1(&publish, None, &reply, 4242);
        sleep(Duration::from_millis(200)).await;
        assert!(
            acks.try_recv().is_err(),
            "no PUBACK before the router has it"
        );

        mux.send(&mut vec![packet], &mut None).await.unwrap();
        let ack = timeout(T, acks.recv()).await.unwrap().unwrap();
        assert!(
            matches!(ack, MuxEvent::PubAck(4242)),
            "the device's own packet id: {ack:?}"
        );
        // And the router did route it.
        let delivered = timeout(T, async {
            loop {
                match watch_rx.next().await.unwrap() {
                    Some(rumqttd::Notification::Forward(forward)) => return forward.publish,
                    Some(rumqttd::Notification::Unschedule) => watch_rx.wake().await.unwrap(),
                    _ => {}
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(&delivered.payload[..], b"e1");
    }
}
