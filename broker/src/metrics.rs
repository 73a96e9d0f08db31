//! [`BrokerMetrics`]: what the broker counts, rendered in the Prometheus text format.
//!
//! Everything is counted by our own network front end (the `connection` module),
//! where every packet passes: rumqttd's own meters are only pushed by the timer thread of
//! `rumqttd::Broker::start`, which this crate does not run, and the event that would request
//! them is private to rumqttd (see `docs/broker.md`).
//!
//! Counters are relaxed atomics: a scrape may see one counter a message ahead of another, never
//! a torn or decreasing value. Every metric name starts with `fleetbeat_broker_`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};

use crate::config::Listener;

/// The kind of a message, from its topic's last level when the topic has Fleetbeat's
/// `fleet/{fleet}/{vehicle}/{kind}` shape, [`MessageKind::Other`] for everything else
/// (including the JSON mirror's `json/...` topics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// `fleet/+/+/hb`: heartbeats.
    Hb,
    /// `fleet/+/+/event`: delivery events.
    Event,
    /// `fleet/+/+/status`: online/offline status (and last wills).
    Status,
    /// `fleet/+/+/cmd`: commands to vehicles.
    Cmd,
    /// `fleet/+/+/ack`: command acknowledgements.
    Ack,
    /// Any other topic.
    Other,
}

impl MessageKind {
    /// Every kind, in label order.
    pub const ALL: [MessageKind; 6] = [
        MessageKind::Hb,
        MessageKind::Event,
        MessageKind::Status,
        MessageKind::Cmd,
        MessageKind::Ack,
        MessageKind::Other,
    ];

    /// The kind of a message published on `topic` (raw MQTT topic bytes).
    ///
    /// Only the shape is checked (four levels, the first `fleet`), not the identifiers: an
    /// invalid vehicle id on `fleet/x/bad+id/hb` still counts as `hb`.
    pub fn of_topic(topic: &[u8]) -> MessageKind {
        let mut levels = topic.split(|&b| b == b'/');
        match (
            levels.next(),
            levels.next(),
            levels.next(),
            levels.next(),
            levels.next(),
        ) {
            (Some(b"fleet"), Some(_), Some(_), Some(kind), None) => match kind {
                b"hb" => MessageKind::Hb,
                b"event" => MessageKind::Event,
                b"status" => MessageKind::Status,
                b"cmd" => MessageKind::Cmd,
                b"ack" => MessageKind::Ack,
                _ => MessageKind::Other,
            },
            _ => MessageKind::Other,
        }
    }

    /// The `kind` label value.
    pub const fn label(self) -> &'static str {
        match self {
            MessageKind::Hb => "hb",
            MessageKind::Event => "event",
            MessageKind::Status => "status",
            MessageKind::Cmd => "cmd",
            MessageKind::Ack => "ack",
            MessageKind::Other => "other",
        }
    }
}

/// Why a CONNECT was refused by authentication (the `reason` label of
/// `fleetbeat_broker_auth_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthRefusal {
    /// The CONNECT carried no username (or no password) while credentials are required.
    NoCredentials,
    /// The username names no device and no client in the credentials file.
    UnknownUser,
    /// The password does not match the stored hash.
    BadPassword,
    /// A device's client id differs from its username, or a client tried a device's client id.
    ClientIdMismatch,
    /// The last will's topic is not one the identity may publish to.
    WillNotAllowed,
}

impl AuthRefusal {
    /// Every reason, in label order.
    pub const ALL: [AuthRefusal; 5] = [
        AuthRefusal::NoCredentials,
        AuthRefusal::UnknownUser,
        AuthRefusal::BadPassword,
        AuthRefusal::ClientIdMismatch,
        AuthRefusal::WillNotAllowed,
    ];

    /// The `reason` label value.
    pub const fn label(self) -> &'static str {
        match self {
            AuthRefusal::NoCredentials => "no_credentials",
            AuthRefusal::UnknownUser => "unknown_user",
            AuthRefusal::BadPassword => "bad_password",
            AuthRefusal::ClientIdMismatch => "client_id_mismatch",
            AuthRefusal::WillNotAllowed => "will_not_allowed",
        }
    }
}

/// Why a CONNECT was refused before authentication mattered (the `reason` label of
/// `fleetbeat_broker_connect_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectRefusal {
    /// No CONNECT arrived within `connection_timeout_ms`, or the first packet was not one.
    NoConnect,
    /// The CONNECT was malformed, or of another protocol version than the listener's.
    Protocol,
    /// Keep-alive 0 ("never time out"): refused, see `docs/broker.md`.
    KeepAliveZero,
    /// The client id is unusable: reserved, contains `+ # / $`, or empty without clean session.
    ClientId,
    /// [`BrokerConfig::max_connections`](crate::BrokerConfig::max_connections) reached, or
    /// the router refused the connection.
    ServerFull,
    /// The broker is shutting down.
    ShuttingDown,
}

impl ConnectRefusal {
    /// Every reason, in label order.
    pub const ALL: [ConnectRefusal; 6] = [
        ConnectRefusal::NoConnect,
        ConnectRefusal::Protocol,
        ConnectRefusal::KeepAliveZero,
        ConnectRefusal::ClientId,
        ConnectRefusal::ServerFull,
        ConnectRefusal::ShuttingDown,
    ];

    /// The `reason` label value.
    pub const fn label(self) -> &'static str {
        match self {
            ConnectRefusal::NoConnect => "no_connect",
            ConnectRefusal::Protocol => "protocol",
            ConnectRefusal::KeepAliveZero => "keep_alive_zero",
            ConnectRefusal::ClientId => "client_id",
            ConnectRefusal::ServerFull => "server_full",
            ConnectRefusal::ShuttingDown => "shutting_down",
        }
    }
}

/// Why an established connection ended (the `reason` label of
/// `fleetbeat_broker_disconnects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// The client sent DISCONNECT.
    Client,
    /// Nothing arrived for 1.5 × the client's keep-alive.
    KeepAlive,
    /// The socket failed or was closed without DISCONNECT.
    Network,
    /// The client broke the protocol (malformed or oversized packet, second CONNECT, ...).
    Protocol,
    /// A new connection with the same client id took over.
    TakenOver,
    /// rumqttd's router dropped the connection.
    Router,
    /// The broker shut down.
    Shutdown,
}

impl DisconnectReason {
    /// Every reason, in label order.
    pub const ALL: [DisconnectReason; 7] = [
        DisconnectReason::Client,
        DisconnectReason::KeepAlive,
        DisconnectReason::Network,
        DisconnectReason::Protocol,
        DisconnectReason::TakenOver,
        DisconnectReason::Router,
        DisconnectReason::Shutdown,
    ];

    /// The `reason` label value.
    pub const fn label(self) -> &'static str {
        match self {
            DisconnectReason::Client => "client",
            DisconnectReason::KeepAlive => "keep_alive",
            DisconnectReason::Network => "network",
            DisconnectReason::Protocol => "protocol",
            DisconnectReason::TakenOver => "taken_over",
            DisconnectReason::Router => "router",
            DisconnectReason::Shutdown => "shutdown",
        }
    }

    /// Whether the client's last will is published: the connection was lost, not closed
    /// on purpose (DISCONNECT), replaced by the same client, or ended by our shutdown.
    pub const fn fires_will(self) -> bool {
        matches!(
            self,
            DisconnectReason::KeepAlive
                | DisconnectReason::Network
                | DisconnectReason::Protocol
                | DisconnectReason::Router
        )
    }
}

/// Why a message was not routed (the `reason` label of `fleetbeat_broker_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The publisher may not publish on that topic (its role's topic ACL).
    Acl,
    /// The packet was larger than `max_payload_size`; the connection was closed.
    Oversized,
    /// Published or due for delivery while the broker was shutting down.
    Shutdown,
    /// The JSON mirror could not republish it.
    Mirror,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 4] = [
        DropReason::Acl,
        DropReason::Oversized,
        DropReason::Shutdown,
        DropReason::Mirror,
    ];

    /// The `reason` label value.
    pub const fn label(self) -> &'static str {
        match self {
            DropReason::Acl => "acl",
            DropReason::Oversized => "oversized",
            DropReason::Shutdown => "shutdown",
            DropReason::Mirror => "mirror",
        }
    }
}

const LISTENERS: [Listener; 2] = [Listener::V4, Listener::V5];

fn listener_index(listener: Listener) -> usize {
    match listener {
        Listener::V4 => 0,
        Listener::V5 => 1,
    }
}

/// Listener state as kept in the `listener_up` gauge.
const LISTENER_ABSENT: u8 = 2;

#[derive(Debug)]
struct Counters {
    open_mode: AtomicBool,
    mirror_heartbeats: AtomicBool,
    listener_up: [AtomicU8; 2],
    connections: [AtomicI64; 2],
    connections_total: [AtomicU64; 2],
    devices_connected: AtomicI64,
    auth_refused: [AtomicU64; AuthRefusal::ALL.len()],
    connect_refused: [AtomicU64; ConnectRefusal::ALL.len()],
    disconnects: [AtomicU64; DisconnectReason::ALL.len()],
    messages_in: [AtomicU64; MessageKind::ALL.len()],
    messages_out: [AtomicU64; MessageKind::ALL.len()],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    acl_denied_subscribe: AtomicU64,
    throttled: AtomicU64,
    wills_published: AtomicU64,
    mirror_published: AtomicU64,
    mirror_undecodable: AtomicU64,
}

/// The broker's counters; cheap to clone (one shared set), safe to update from any thread.
///
/// [`Broker::metrics`](crate::Broker::metrics) hands out the running broker's; the standalone
/// binary serves [`BrokerMetrics::render`] on `/metrics`, and an embedding program (the bridge)
/// appends it to its own `/metrics`.
#[derive(Debug, Clone)]
pub struct BrokerMetrics {
    counters: Arc<Counters>,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        BrokerMetrics {
            counters: Arc::new(Counters {
                open_mode: AtomicBool::new(false),
                mirror_heartbeats: AtomicBool::new(false),
                listener_up: [
                    AtomicU8::new(LISTENER_ABSENT),
                    AtomicU8::new(LISTENER_ABSENT),
                ],
                connections: Default::default(),
                connections_total: Default::default(),
                devices_connected: AtomicI64::new(0),
                auth_refused: Default::default(),
                connect_refused: Default::default(),
                disconnects: Default::default(),
                messages_in: Default::default(),
                messages_out: Default::default(),
                bytes_in: AtomicU64::new(0),
                bytes_out: AtomicU64::new(0),
                dropped: Default::default(),
                acl_denied_subscribe: AtomicU64::new(0),
                throttled: AtomicU64::new(0),
                wills_published: AtomicU64::new(0),
                mirror_published: AtomicU64::new(0),
                mirror_undecodable: AtomicU64::new(0),
            }),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn index_of<T: PartialEq>(all: &[T], item: T) -> usize {
    // The label enums are tiny; a scan is as fast as a match and cannot fall out of step.
    all.iter().position(|x| *x == item).unwrap_or(0)
}

impl BrokerMetrics {
    /// Sets whether the broker runs without authentication (`fleetbeat_broker_open_mode`).
    pub(crate) fn set_open_mode(&self, open: bool) {
        self.counters.open_mode.store(open, Ordering::Relaxed);
    }

    /// Whether the broker runs without authentication.
    pub fn open_mode(&self) -> bool {
        self.counters.open_mode.load(Ordering::Relaxed)
    }

    /// Sets whether the JSON mirror reads heartbeats (`fleetbeat_broker_mirror_heartbeats`).
    pub(crate) fn set_mirror_heartbeats(&self, on: bool) {
        self.counters.mirror_heartbeats.store(on, Ordering::Release);
    }

    /// Whether the JSON mirror reads heartbeats: someone may be watching `json/...`. Once true,
    /// heartbeats published from then on are mirrored.
    pub fn mirror_heartbeats(&self) -> bool {
        self.counters.mirror_heartbeats.load(Ordering::Acquire)
    }

    /// Records the latest health check of `listener`.
    pub(crate) fn set_listener_up(&self, listener: Listener, up: bool) {
        self.counters.listener_up[listener_index(listener)].store(u8::from(up), Ordering::Relaxed);
    }

    /// Whether `listener` passed its latest health check; `None` if it is not configured.
    pub fn listener_up(&self, listener: Listener) -> Option<bool> {
        match self.counters.listener_up[listener_index(listener)].load(Ordering::Relaxed) {
            LISTENER_ABSENT => None,
            up => Some(up == 1),
        }
    }

    /// A connection on `listener` completed CONNECT/CONNACK.
    pub(crate) fn connection_opened(&self, listener: Listener, device: bool) {
        let i = listener_index(listener);
        self.counters.connections[i].fetch_add(1, Ordering::Relaxed);
        bump(&self.counters.connections_total[i]);
        if device {
            self.counters
                .devices_connected
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection opened with [`Self::connection_opened`] ended.
    pub(crate) fn connection_closed(
        &self,
        listener: Listener,
        device: bool,
        why: DisconnectReason,
    ) {
        self.counters.connections[listener_index(listener)].fetch_sub(1, Ordering::Relaxed);
        if device {
            self.counters
                .devices_connected
                .fetch_sub(1, Ordering::Relaxed);
        }
        bump(&self.counters.disconnects[index_of(&DisconnectReason::ALL, why)]);
    }

    /// MQTT connections currently established (CONNACK sent, not yet closed), all listeners.
    pub fn connections(&self) -> u64 {
        let sum: i64 = self
            .counters
            .connections
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        u64::try_from(sum).unwrap_or(0)
    }

    /// Connections currently authenticated as devices.
    pub fn devices_connected(&self) -> u64 {
        u64::try_from(self.counters.devices_connected.load(Ordering::Relaxed)).unwrap_or(0)
    }

    pub(crate) fn auth_refused(&self, why: AuthRefusal) {
        bump(&self.counters.auth_refused[index_of(&AuthRefusal::ALL, why)]);
    }

    /// CONNECTs refused by authentication for `why`, since start.
    pub fn auth_refused_total(&self, why: AuthRefusal) -> u64 {
        self.counters.auth_refused[index_of(&AuthRefusal::ALL, why)].load(Ordering::Relaxed)
    }

    pub(crate) fn connect_refused(&self, why: ConnectRefusal) {
        bump(&self.counters.connect_refused[index_of(&ConnectRefusal::ALL, why)]);
    }

    /// CONNECTs refused for `why` (not authentication), since start.
    pub fn connect_refused_total(&self, why: ConnectRefusal) -> u64 {
        self.counters.connect_refused[index_of(&ConnectRefusal::ALL, why)].load(Ordering::Relaxed)
    }

    /// Connections ended for `why`, since start.
    pub fn disconnects_total(&self, why: DisconnectReason) -> u64 {
        self.counters.disconnects[index_of(&DisconnectReason::ALL, why)].load(Ordering::Relaxed)
    }

    pub(crate) fn message_in(&self, kind: MessageKind) {
        bump(&self.counters.messages_in[index_of(&MessageKind::ALL, kind)]);
    }

    /// PUBLISH packets received from clients on topics of `kind` (routed or not), since start.
    pub fn messages_in_total(&self, kind: MessageKind) -> u64 {
        self.counters.messages_in[index_of(&MessageKind::ALL, kind)].load(Ordering::Relaxed)
    }

    pub(crate) fn message_out(&self, kind: MessageKind) {
        bump(&self.counters.messages_out[index_of(&MessageKind::ALL, kind)]);
    }

    /// PUBLISH packets written to clients on topics of `kind`, since start.
    pub fn messages_out_total(&self, kind: MessageKind) -> u64 {
        self.counters.messages_out[index_of(&MessageKind::ALL, kind)].load(Ordering::Relaxed)
    }

    pub(crate) fn bytes_in(&self, n: usize) {
        self.counters
            .bytes_in
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn bytes_out(&self, n: usize) {
        self.counters
            .bytes_out
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes read from client sockets (all packets), since start.
    pub fn bytes_in_total(&self) -> u64 {
        self.counters.bytes_in.load(Ordering::Relaxed)
    }

    /// Bytes written to client sockets (all packets), since start.
    pub fn bytes_out_total(&self) -> u64 {
        self.counters.bytes_out.load(Ordering::Relaxed)
    }

    pub(crate) fn dropped(&self, why: DropReason) {
        bump(&self.counters.dropped[index_of(&DropReason::ALL, why)]);
    }

    /// Messages not routed for `why`, since start.
    pub fn dropped_total(&self, why: DropReason) -> u64 {
        self.counters.dropped[index_of(&DropReason::ALL, why)].load(Ordering::Relaxed)
    }

    pub(crate) fn subscribe_denied(&self) {
        bump(&self.counters.acl_denied_subscribe);
    }

    /// SUBSCRIBE packets refused by a topic ACL, since start.
    pub fn subscribe_denied_total(&self) -> u64 {
        self.counters.acl_denied_subscribe.load(Ordering::Relaxed)
    }

    pub(crate) fn throttled(&self) {
        bump(&self.counters.throttled);
    }

    /// PUBLISH packets held back because their connection exceeded `max_publish_rate` (each
    /// was routed later, when the rate allowed), since start.
    pub fn throttled_total(&self) -> u64 {
        self.counters.throttled.load(Ordering::Relaxed)
    }

    pub(crate) fn will_published(&self) {
        bump(&self.counters.wills_published);
    }

    /// Last wills published for lost connections, since start.
    pub fn wills_published_total(&self) -> u64 {
        self.counters.wills_published.load(Ordering::Relaxed)
    }

    pub(crate) fn mirror_published(&self, decoded: bool) {
        bump(&self.counters.mirror_published);
        if !decoded {
            bump(&self.counters.mirror_undecodable);
        }
    }

    /// Documents the JSON mirror published, since start.
    pub fn mirror_published_total(&self) -> u64 {
        self.counters.mirror_published.load(Ordering::Relaxed)
    }

    /// Of those, documents describing a payload that could not be decoded.
    pub fn mirror_undecodable_total(&self) -> u64 {
        self.counters.mirror_undecodable.load(Ordering::Relaxed)
    }

    /// All metrics in the Prometheus text exposition format (version 0.0.4), each with its
    /// `# HELP` and `# TYPE` lines, ending with a newline: append it to another exposition
    /// as is.
    pub fn render(&self) -> String {
        let c = &self.counters;
        let mut out = String::with_capacity(4096);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        header(
            &mut out,
            "open_mode",
            "gauge",
            "1 if the broker accepts every client without authentication (no credentials file).",
        );
        line(&mut out, "open_mode", &[], u64::from(self.open_mode()));
        header(
            &mut out,
            "mirror_heartbeats",
            "gauge",
            "1 while the JSON mirror documents heartbeats (some subscription may match json/...).",
        );
        line(
            &mut out,
            "mirror_heartbeats",
            &[],
            u64::from(self.mirror_heartbeats()),
        );

        header(
            &mut out,
            "listener_up",
            "gauge",
            "1 if the listener passed its latest end-to-end MQTT probe, 0 if it is dead.",
        );
        for listener in LISTENERS {
            if let Some(up) = self.listener_up(listener) {
                line(
                    &mut out,
                    "listener_up",
                    &[("listener", listener.label())],
                    u64::from(up),
                );
            }
        }

        header(
            &mut out,
            "connections",
            "gauge",
            "MQTT connections currently established, per listener.",
        );
        for listener in LISTENERS {
            let n = c.connections[listener_index(listener)].load(Ordering::Relaxed);
            line(
                &mut out,
                "connections",
                &[("listener", listener.label())],
                u64::try_from(n).unwrap_or(0),
            );
        }
        header(
            &mut out,
            "connections_total",
            "counter",
            "MQTT connections accepted (CONNACK sent), per listener.",
        );
        for listener in LISTENERS {
            line(
                &mut out,
                "connections_total",
                &[("listener", listener.label())],
                load(&c.connections_total[listener_index(listener)]),
            );
        }
        header(
            &mut out,
            "devices_connected",
            "gauge",
            "Connections currently authenticated as devices (vehicles).",
        );
        line(&mut out, "devices_connected", &[], self.devices_connected());

        header(
            &mut out,
            "auth_refused_total",
            "counter",
            "CONNECTs refused by authentication, by reason.",
        );
        for why in AuthRefusal::ALL {
            line(
                &mut out,
                "auth_refused_total",
                &[("reason", why.label())],
                self.auth_refused_total(why),
            );
        }
        header(
            &mut out,
            "connect_refused_total",
            "counter",
            "CONNECTs refused for other reasons than authentication, by reason.",
        );
        for why in ConnectRefusal::ALL {
            line(
                &mut out,
                "connect_refused_total",
                &[("reason", why.label())],
                self.connect_refused_total(why),
            );
        }
        header(
            &mut out,
            "disconnects_total",
            "counter",
            "Established connections that ended, by reason.",
        );
        for why in DisconnectReason::ALL {
            line(
                &mut out,
                "disconnects_total",
                &[("reason", why.label())],
                self.disconnects_total(why),
            );
        }

        header(
            &mut out,
            "messages_in_total",
            "counter",
            "PUBLISH packets received from clients, by topic kind.",
        );
        for kind in MessageKind::ALL {
            line(
                &mut out,
                "messages_in_total",
                &[("kind", kind.label())],
                self.messages_in_total(kind),
            );
        }
        header(
            &mut out,
            "messages_out_total",
            "counter",
            "PUBLISH packets written to clients, by topic kind.",
        );
        for kind in MessageKind::ALL {
            line(
                &mut out,
                "messages_out_total",
                &[("kind", kind.label())],
                self.messages_out_total(kind),
            );
        }
        header(
            &mut out,
            "bytes_in_total",
            "counter",
            "Bytes read from client sockets.",
        );
        line(&mut out, "bytes_in_total", &[], load(&c.bytes_in));
        header(
            &mut out,
            "bytes_out_total",
            "counter",
            "Bytes written to client sockets.",
        );
        line(&mut out, "bytes_out_total", &[], load(&c.bytes_out));

        header(
            &mut out,
            "dropped_total",
            "counter",
            "Messages not routed, by reason.",
        );
        for why in DropReason::ALL {
            line(
                &mut out,
                "dropped_total",
                &[("reason", why.label())],
                self.dropped_total(why),
            );
        }
        header(
            &mut out,
            "subscribe_denied_total",
            "counter",
            "SUBSCRIBE packets refused by a topic ACL.",
        );
        line(
            &mut out,
            "subscribe_denied_total",
            &[],
            load(&c.acl_denied_subscribe),
        );
        header(
            &mut out,
            "throttled_total",
            "counter",
            "PUBLISH packets held back because their connection exceeded max_publish_rate.",
        );
        line(&mut out, "throttled_total", &[], load(&c.throttled));
        header(
            &mut out,
            "wills_published_total",
            "counter",
            "Last wills published for connections that were lost.",
        );
        line(
            &mut out,
            "wills_published_total",
            &[],
            load(&c.wills_published),
        );
        header(
            &mut out,
            "mirror_published_total",
            "counter",
            "Documents published by the JSON mirror on json/fleet/...",
        );
        line(
            &mut out,
            "mirror_published_total",
            &[],
            load(&c.mirror_published),
        );
        header(
            &mut out,
            "mirror_undecodable_total",
            "counter",
            "JSON mirror documents describing a payload that could not be decoded.",
        );
        line(
            &mut out,
            "mirror_undecodable_total",
            &[],
            load(&c.mirror_undecodable),
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP fleetbeat_broker_{name} {help}");
    let _ = writeln!(out, "# TYPE fleetbeat_broker_{name} {kind}");
}

fn line(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    let _ = write!(out, "fleetbeat_broker_{name}");
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // Label values are our own constants: nothing to escape.
            let _ = write!(out, "{key}=\"{value}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_kinds() {
        assert_eq!(MessageKind::of_topic(b"fleet/a/b/hb"), MessageKind::Hb);
        assert_eq!(
            MessageKind::of_topic(b"fleet/a/b/event"),
            MessageKind::Event
        );
        assert_eq!(
            MessageKind::of_topic(b"fleet/a/b/status"),
            MessageKind::Status
        );
        assert_eq!(MessageKind::of_topic(b"fleet/a/b/cmd"), MessageKind::Cmd);
        assert_eq!(MessageKind::of_topic(b"fleet/a/b/ack"), MessageKind::Ack);
        for other in [
            &b"fleet/a/b/gps"[..],
            b"fleet/a/hb",
            b"fleet/a/b/hb/x",
            b"json/fleet/a/b",
            b"json/fleet/a/b/hb",
            b"",
            b"truck/a/b/hb",
        ] {
            assert_eq!(
                MessageKind::of_topic(other),
                MessageKind::Other,
                "{other:?}"
            );
        }
    }

    #[test]
    fn render_is_prometheus_text() {
        let metrics = BrokerMetrics::default();
        metrics.set_open_mode(true);
        metrics.set_listener_up(Listener::V4, true);
        metrics.connection_opened(Listener::V4, true);
        metrics.connection_opened(Listener::V5, false);
        metrics.connection_closed(Listener::V5, false, DisconnectReason::KeepAlive);
        metrics.auth_refused(AuthRefusal::BadPassword);
        metrics.message_in(MessageKind::Hb);
        metrics.message_in(MessageKind::Hb);
        metrics.message_out(MessageKind::Other);
        metrics.bytes_in(100);
        metrics.dropped(DropReason::Acl);

        let text = metrics.render();
        for expected in [
            "fleetbeat_broker_open_mode 1\n",
            "fleetbeat_broker_listener_up{listener=\"v4\"} 1\n",
            "fleetbeat_broker_connections{listener=\"v4\"} 1\n",
            "fleetbeat_broker_connections{listener=\"v5\"} 0\n",
            "fleetbeat_broker_connections_total{listener=\"v5\"} 1\n",
            "fleetbeat_broker_devices_connected 1\n",
            "fleetbeat_broker_auth_refused_total{reason=\"bad_password\"} 1\n",
            "fleetbeat_broker_auth_refused_total{reason=\"unknown_user\"} 0\n",
            "fleetbeat_broker_disconnects_total{reason=\"keep_alive\"} 1\n",
            "fleetbeat_broker_messages_in_total{kind=\"hb\"} 2\n",
            "fleetbeat_broker_messages_out_total{kind=\"other\"} 1\n",
            "fleetbeat_broker_bytes_in_total 100\n",
            "fleetbeat_broker_dropped_total{reason=\"acl\"} 1\n",
            "# TYPE fleetbeat_broker_messages_in_total counter\n",
            "# TYPE fleetbeat_broker_connections gauge\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // A listener that is not configured has no sample at all.
        assert!(!text.contains("listener=\"v5\"} 0\nfleetbeat_broker_listener"));
        assert!(!text.contains("fleetbeat_broker_listener_up{listener=\"v5\"}"));

        // Every sample line belongs to a metric announced by HELP and TYPE.
        let mut announced = Vec::new();
        for row in text.lines() {
            if let Some(rest) = row.strip_prefix("# TYPE ") {
                announced.push(rest.split(' ').next().unwrap().to_owned());
            } else if !row.starts_with('#') {
                let name = row.split(['{', ' ']).next().unwrap();
                assert!(announced.iter().any(|a| a == name), "{row}");
                assert!(name.starts_with("fleetbeat_broker_"));
                let value = row.rsplit(' ').next().unwrap();
                value.parse::<u64>().unwrap();
            }
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn listener_gauge_reports_dead_listeners() {
        let metrics = BrokerMetrics::default();
        assert_eq!(metrics.listener_up(Listener::V4), None);
        metrics.set_listener_up(Listener::V4, false);
        assert_eq!(metrics.listener_up(Listener::V4), Some(false));
        assert!(
            metrics
                .render()
                .contains("fleetbeat_broker_listener_up{listener=\"v4\"} 0\n")
        );
    }

    #[test]
    fn clones_share_counters() {
        let a = BrokerMetrics::default();
        let b = a.clone();
        b.message_in(MessageKind::Cmd);
        assert_eq!(a.messages_in_total(MessageKind::Cmd), 1);
    }
}
