//! [`BrokerMetrics`]: what the broker counts, rendered in the Prometheus text format.
//!
//! Everything is counted by our own network front end (the `connection` module),
//! where every packet passes: rumqttd's own meters are only pushed by the timer thread of
//! `rumqttd::Broker::start`, which this crate does not run, and the event that would request
//! them is private to rumqttd (see `docs/broker.md`).
//!
//! Counters are relaxed atomics: a scrape may see one counter a message ahead of another, never
//! a torn or decreasing value. Every metric name starts with `fleetbeat_broker_`.
//!
//! - `reasons`: the label enums ([`AuthRefusal`], [`ConnectRefusal`], [`DisconnectReason`],
//!   [`DropReason`]);
//! - `render`: the Prometheus text exposition.
//!
//! Messages are counted by the kind of their topic (`Some(kind)` for Fleetbeat's
//! `fleet/{fleet}/{vehicle}/{kind}` shape, as [`shared::topic::kind_of`] reads it; `None` for
//! every other topic, including the JSON mirror's `json/...`), labelled with
//! [`TopicKind::level`] or `other`.

mod reasons;
mod render;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};

use shared::TopicKind;

pub use self::reasons::{
    AuthRefusal, ConnectRefusal, DisconnectReason, DropReason, SubscribeRefusal,
};
use crate::listener::Listener;

/// The `kind` label values of the message counters, in label order: every topic kind, then
/// `None` ("other").
const KINDS: [Option<TopicKind>; TopicKind::ALL.len() + 1] = [
    Some(TopicKind::Heartbeat),
    Some(TopicKind::Event),
    Some(TopicKind::Status),
    Some(TopicKind::Command),
    Some(TopicKind::Ack),
    None,
];

/// The `kind` label value of a message kind: the topic level, or `other`.
fn kind_label(kind: Option<TopicKind>) -> &'static str {
    kind.map_or("other", TopicKind::level)
}

/// The counter of a message kind in [`KINDS`].
fn kind_index(kind: Option<TopicKind>) -> usize {
    KINDS
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(KINDS.len() - 1)
}

/// Listener state as kept in the `listener_up` gauge.
const LISTENER_ABSENT: u8 = 2;

/// One counter per value of a label.
#[derive(Debug)]
struct Family<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Family<N> {
    fn default() -> Self {
        Family(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> Family<N> {
    fn bump(&self, index: usize) {
        self.0[index].fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, index: usize) -> u64 {
        self.0[index].load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Counters {
    open_mode: AtomicBool,
    mirror_heartbeats: AtomicBool,
    listener_up: [AtomicU8; Listener::ALL.len()],
    connections: [AtomicI64; Listener::ALL.len()],
    connections_total: Family<{ Listener::ALL.len() }>,
    devices_connected: AtomicI64,
    auth_refused: Family<{ AuthRefusal::ALL.len() }>,
    connect_refused: Family<{ ConnectRefusal::ALL.len() }>,
    disconnects: Family<{ DisconnectReason::ALL.len() }>,
    messages_in: Family<{ KINDS.len() }>,
    messages_out: Family<{ KINDS.len() }>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    dropped: Family<{ DropReason::ALL.len() }>,
    subscribe_denied: AtomicU64,
    subscriptions_refused: Family<{ SubscribeRefusal::ALL.len() }>,
    throttled: AtomicU64,
    wills_published: AtomicU64,
    sessions_expired: AtomicU64,
    mirror_published: AtomicU64,
    mirror_undecodable: AtomicU64,
    durability_waiting: AtomicI64,
    journal_rows: AtomicU64,
    journal_bytes: AtomicU64,
    journal_full: AtomicU64,
    journal_commits: AtomicU64,
    replayed: AtomicU64,
    tls_handshake_failures: AtomicU64,
    tls_reloads: AtomicU64,
    tls_reload_failures: AtomicU64,
    shared_groups: AtomicU64,
    shared_deliveries: AtomicU64,
    shared_redeliveries: AtomicU64,
    shared_undelivered: AtomicU64,
    link_names: AtomicU64,
    router_filters: AtomicU64,
}

/// The broker's counters; cheap to clone (one shared set), safe to update from any thread.
///
/// [`Broker::metrics`](crate::Broker::metrics) hands out the running broker's; the standalone
/// binary serves [`BrokerMetrics::render`] on `/metrics`, and an embedding program (the bridge)
/// appends it to its own `/metrics`.
///
/// Messages are counted by the kind of their topic, as [`shared::topic::kind_of`] reads it
/// (the label is [`TopicKind::level`]), or `None` (label `other`) for any other topic.
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
                listener_up: Listener::ALL.map(|_| AtomicU8::new(LISTENER_ABSENT)),
                connections: Default::default(),
                connections_total: Family::default(),
                devices_connected: AtomicI64::new(0),
                auth_refused: Family::default(),
                connect_refused: Family::default(),
                disconnects: Family::default(),
                messages_in: Family::default(),
                messages_out: Family::default(),
                bytes_in: AtomicU64::new(0),
                bytes_out: AtomicU64::new(0),
                dropped: Family::default(),
                subscribe_denied: AtomicU64::new(0),
                subscriptions_refused: Family::default(),
                throttled: AtomicU64::new(0),
                wills_published: AtomicU64::new(0),
                sessions_expired: AtomicU64::new(0),
                mirror_published: AtomicU64::new(0),
                mirror_undecodable: AtomicU64::new(0),
                durability_waiting: AtomicI64::new(0),
                journal_rows: AtomicU64::new(0),
                journal_bytes: AtomicU64::new(0),
                journal_full: AtomicU64::new(0),
                journal_commits: AtomicU64::new(0),
                replayed: AtomicU64::new(0),
                tls_handshake_failures: AtomicU64::new(0),
                tls_reloads: AtomicU64::new(0),
                tls_reload_failures: AtomicU64::new(0),
                shared_groups: AtomicU64::new(0),
                shared_deliveries: AtomicU64::new(0),
                shared_redeliveries: AtomicU64::new(0),
                shared_undelivered: AtomicU64::new(0),
                link_names: AtomicU64::new(0),
                router_filters: AtomicU64::new(0),
            }),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Updates, called by the broker as things happen.
impl BrokerMetrics {
    /// Sets whether the broker runs without authentication (`fleetbeat_broker_open_mode`).
    pub(crate) fn set_open_mode(&self, open: bool) {
        self.counters.open_mode.store(open, Ordering::Relaxed);
    }

    /// Sets whether the JSON mirror reads heartbeats (`fleetbeat_broker_mirror_heartbeats`).
    pub(crate) fn set_mirror_heartbeats(&self, on: bool) {
        self.counters.mirror_heartbeats.store(on, Ordering::Release);
    }

    /// Records the latest health check of `listener`.
    pub(crate) fn set_listener_up(&self, listener: Listener, up: bool) {
        self.counters.listener_up[listener.index()].store(u8::from(up), Ordering::Relaxed);
    }

    /// A connection on `listener` completed CONNECT/CONNACK.
    pub(crate) fn connection_opened(&self, listener: Listener, device: bool) {
        let c = &self.counters;
        c.connections[listener.index()].fetch_add(1, Ordering::Relaxed);
        c.connections_total.bump(listener.index());
        if device {
            c.devices_connected.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection opened with [`Self::connection_opened`] ended.
    pub(crate) fn connection_closed(
        &self,
        listener: Listener,
        device: bool,
        why: DisconnectReason,
    ) {
        let c = &self.counters;
        c.connections[listener.index()].fetch_sub(1, Ordering::Relaxed);
        if device {
            c.devices_connected.fetch_sub(1, Ordering::Relaxed);
        }
        c.disconnects.bump(why.index());
    }

    pub(crate) fn auth_refused(&self, why: AuthRefusal) {
        self.counters.auth_refused.bump(why.index());
    }

    pub(crate) fn connect_refused(&self, why: ConnectRefusal) {
        self.counters.connect_refused.bump(why.index());
    }

    /// A PUBLISH of `kind` (see [`BrokerMetrics`]) arrived from a client.
    pub(crate) fn message_in(&self, kind: Option<TopicKind>) {
        self.counters.messages_in.bump(kind_index(kind));
    }

    /// A PUBLISH of `kind` was written to a client.
    pub(crate) fn message_out(&self, kind: Option<TopicKind>) {
        self.counters.messages_out.bump(kind_index(kind));
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

    pub(crate) fn dropped(&self, why: DropReason) {
        self.counters.dropped.bump(why.index());
    }

    pub(crate) fn subscribe_denied(&self) {
        bump(&self.counters.subscribe_denied);
    }

    /// A subscription filter was refused for `why` (not by the topic ACL).
    pub(crate) fn subscription_refused(&self, why: SubscribeRefusal) {
        self.counters.subscriptions_refused.bump(why.index());
    }

    pub(crate) fn throttled(&self) {
        bump(&self.counters.throttled);
    }

    pub(crate) fn will_published(&self) {
        bump(&self.counters.wills_published);
    }

    pub(crate) fn session_expired(&self) {
        bump(&self.counters.sessions_expired);
    }

    pub(crate) fn mirror_published(&self, decoded: bool) {
        bump(&self.counters.mirror_published);
        if !decoded {
            bump(&self.counters.mirror_undecodable);
        }
    }

    /// `delta` more (or fewer) publishes wait for durability (see `durability`).
    pub(crate) fn waiting_for_durability(&self, delta: i64) {
        self.counters
            .durability_waiting
            .fetch_add(delta, Ordering::Relaxed);
    }

    /// The journal holds `rows` messages of `bytes` (topic + payload) now.
    pub(crate) fn set_journal(&self, rows: u64, bytes: u64) {
        self.counters.journal_rows.store(rows, Ordering::Relaxed);
        self.counters.journal_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The journal committed a batch.
    pub(crate) fn journal_commit(&self) {
        bump(&self.counters.journal_commits);
    }

    /// A message found the journal full: its PUBACK waits for a durable consumer.
    pub(crate) fn journal_full(&self) {
        bump(&self.counters.journal_full);
    }

    /// `n` waiting messages were published again to durable consumers.
    pub(crate) fn replayed(&self, n: u64) {
        self.counters.replayed.fetch_add(n, Ordering::Relaxed);
    }

    /// A TLS handshake failed, timed out, or its client certificate named no vehicle.
    pub(crate) fn tls_handshake_failed(&self) {
        bump(&self.counters.tls_handshake_failures);
    }

    /// The TLS files changed and were reloaded (`ok`), or do not load (the previous
    /// configuration stays).
    pub(crate) fn tls_reloaded(&self, ok: bool) {
        bump(if ok {
            &self.counters.tls_reloads
        } else {
            &self.counters.tls_reload_failures
        });
    }
}

/// Updates for shared subscriptions (`share`).
impl BrokerMetrics {
    /// Shared subscription groups now.
    pub(crate) fn set_shared_groups(&self, groups: usize) {
        self.counters
            .shared_groups
            .store(u64::try_from(groups).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// A message a group's link received was given to one of its members.
    pub(crate) fn shared_delivered(&self) {
        bump(&self.counters.shared_deliveries);
    }

    /// A message a member left unacknowledged was given to another member of its group.
    pub(crate) fn shared_redelivered(&self) {
        bump(&self.counters.shared_redeliveries);
    }

    /// A message for a group found no member to take it.
    pub(crate) fn shared_undelivered(&self) {
        bump(&self.counters.shared_undelivered);
    }

    /// Names the router was given for links no client knows by name (`router::LinkName`).
    pub(crate) fn set_link_names(&self, names: u64) {
        self.counters.link_names.store(names, Ordering::Relaxed);
    }

    /// Subscription filters clients made the router keep (`router::FilterBudget`).
    pub(crate) fn set_router_filters(&self, filters: u64) {
        self.counters
            .router_filters
            .store(filters, Ordering::Relaxed);
    }
}

/// Readings.
impl BrokerMetrics {
    /// Names the router was given for links no client knows by name (a clean session's own
    /// link, a shared subscription group's): they are reused, so this is the most such links
    /// ever open at once, not how many connections had one.
    pub fn link_names(&self) -> u64 {
        load(&self.counters.link_names)
    }

    /// Distinct subscription filters clients made the router keep (each a commit log it never
    /// frees), bounded by [`BrokerConfig::max_filters`](crate::BrokerConfig::max_filters).
    pub fn router_filters(&self) -> u64 {
        load(&self.counters.router_filters)
    }

    /// Shared subscription groups (`$share/{group}/{filter}`, keyed by both) now.
    pub fn shared_groups(&self) -> u64 {
        load(&self.counters.shared_groups)
    }

    /// Messages shared subscription groups gave to one of their members, since start.
    pub fn shared_deliveries_total(&self) -> u64 {
        load(&self.counters.shared_deliveries)
    }

    /// Messages a group member left (unsubscribed or disconnected) without acknowledging,
    /// given to another member of the group, since start.
    pub fn shared_redeliveries_total(&self) -> u64 {
        load(&self.counters.shared_redeliveries)
    }

    /// Messages for a shared subscription group that found no member to take them (the last
    /// one had left), since start. Durable kinds among them are published again by the
    /// durability replay.
    pub fn shared_undelivered_total(&self) -> u64 {
        load(&self.counters.shared_undelivered)
    }

    /// Whether the broker runs without authentication.
    pub fn open_mode(&self) -> bool {
        self.counters.open_mode.load(Ordering::Relaxed)
    }

    /// Whether the JSON mirror reads heartbeats: someone may be watching `json/...`. Once true,
    /// heartbeats published from then on are mirrored.
    pub fn mirror_heartbeats(&self) -> bool {
        self.counters.mirror_heartbeats.load(Ordering::Acquire)
    }

    /// Whether `listener` passed its latest health check; `None` if it is not configured.
    pub fn listener_up(&self, listener: Listener) -> Option<bool> {
        match self.counters.listener_up[listener.index()].load(Ordering::Relaxed) {
            LISTENER_ABSENT => None,
            up => Some(up == 1),
        }
    }

    /// MQTT connections currently established on `listener` (CONNACK sent, not yet closed).
    fn connections_on(&self, listener: Listener) -> i64 {
        self.counters.connections[listener.index()].load(Ordering::Relaxed)
    }

    /// MQTT connections currently established (CONNACK sent, not yet closed), all listeners.
    pub fn connections(&self) -> u64 {
        let open: i64 = Listener::ALL.map(|l| self.connections_on(l)).iter().sum();
        u64::try_from(open).unwrap_or(0)
    }

    /// Connections currently authenticated as devices.
    pub fn devices_connected(&self) -> u64 {
        u64::try_from(self.counters.devices_connected.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// CONNECTs refused by authentication for `why`, since start.
    pub fn auth_refused_total(&self, why: AuthRefusal) -> u64 {
        self.counters.auth_refused.get(why.index())
    }

    /// CONNECTs refused for `why` (not authentication), since start.
    pub fn connect_refused_total(&self, why: ConnectRefusal) -> u64 {
        self.counters.connect_refused.get(why.index())
    }

    /// Connections ended for `why`, since start.
    pub fn disconnects_total(&self, why: DisconnectReason) -> u64 {
        self.counters.disconnects.get(why.index())
    }

    /// PUBLISH packets received from clients on topics of `kind` (routed or not), since start;
    /// `None` counts every topic without Fleetbeat's `fleet/{fleet}/{vehicle}/{kind}` shape
    /// (the JSON mirror's `json/...` included).
    pub fn messages_in_total(&self, kind: Option<TopicKind>) -> u64 {
        self.counters.messages_in.get(kind_index(kind))
    }

    /// PUBLISH packets written to clients on topics of `kind`, since start; `None` as for
    /// [`Self::messages_in_total`].
    pub fn messages_out_total(&self, kind: Option<TopicKind>) -> u64 {
        self.counters.messages_out.get(kind_index(kind))
    }

    /// Bytes read from client sockets (all packets), since start.
    pub fn bytes_in_total(&self) -> u64 {
        load(&self.counters.bytes_in)
    }

    /// Bytes written to client sockets (all packets), since start.
    pub fn bytes_out_total(&self) -> u64 {
        load(&self.counters.bytes_out)
    }

    /// Messages not routed for `why`, since start.
    pub fn dropped_total(&self, why: DropReason) -> u64 {
        self.counters.dropped.get(why.index())
    }

    /// SUBSCRIBE packets refused by a topic ACL, since start.
    pub fn subscribe_denied_total(&self) -> u64 {
        load(&self.counters.subscribe_denied)
    }

    /// Subscription filters refused for `why` (the broker does not serve them), since start.
    pub fn subscriptions_refused_total(&self, why: SubscribeRefusal) -> u64 {
        self.counters.subscriptions_refused.get(why.index())
    }

    /// PUBLISH packets held back because their connection exceeded `max_publish_rate` (each
    /// was routed later, when the rate allowed), since start.
    pub fn throttled_total(&self) -> u64 {
        load(&self.counters.throttled)
    }

    /// Last wills published for lost connections, since start.
    pub fn wills_published_total(&self) -> u64 {
        load(&self.counters.wills_published)
    }

    /// Sessions discarded because their MQTT 5 Session Expiry Interval ran out (0: when
    /// their connection ended), since start.
    pub fn sessions_expired_total(&self) -> u64 {
        load(&self.counters.sessions_expired)
    }

    /// Documents the JSON mirror published, since start.
    pub fn mirror_published_total(&self) -> u64 {
        load(&self.counters.mirror_published)
    }

    /// Of those, documents describing a payload that could not be decoded.
    pub fn mirror_undecodable_total(&self) -> u64 {
        load(&self.counters.mirror_undecodable)
    }

    /// Publishes whose PUBACK waits for durability now (a durable consumer's acknowledgement,
    /// or the journal's commit): see `docs/broker.md`, Durability.
    pub fn durability_waiting(&self) -> u64 {
        u64::try_from(self.counters.durability_waiting.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Messages in the journal now: committed, not yet acknowledged by a durable consumer.
    pub fn journal_rows(&self) -> u64 {
        load(&self.counters.journal_rows)
    }

    /// Bytes (topic + payload) of the messages in the journal now.
    pub fn journal_bytes(&self) -> u64 {
        load(&self.counters.journal_bytes)
    }

    /// Messages that found the journal full (their PUBACK waited for a durable consumer
    /// instead), since start.
    pub fn journal_full_total(&self) -> u64 {
        load(&self.counters.journal_full)
    }

    /// Transactions the journal committed (each one fsync, for every message that arrived
    /// while the previous one ran), since start.
    pub fn journal_commits_total(&self) -> u64 {
        load(&self.counters.journal_commits)
    }

    /// Waiting messages published again to durable consumers (after a durable consumer
    /// subscribed, or after waiting long), since start.
    pub fn replayed_total(&self) -> u64 {
        load(&self.counters.replayed)
    }

    /// TLS handshakes that failed (a client that does not trust the certificate, presents no
    /// or an invalid client certificate where one is required, speaks plaintext to a TLS
    /// port, or does not finish within `connection_timeout_ms`), since start.
    pub fn tls_handshake_failures_total(&self) -> u64 {
        load(&self.counters.tls_handshake_failures)
    }

    /// Reloads of changed TLS files, since start.
    pub fn tls_reloads_total(&self) -> u64 {
        load(&self.counters.tls_reloads)
    }

    /// Changed TLS files that did not load (the previous certificate stayed in use), since
    /// start.
    pub fn tls_reload_failures_total(&self) -> u64 {
        load(&self.counters.tls_reload_failures)
    }
}

#[cfg(test)]
mod tests {
    use shared::topic::kind_of;

    use super::*;

    #[test]
    fn topic_kinds() {
        let kind = |topic: &[u8]| kind_label(kind_of(topic));
        assert_eq!(kind(b"fleet/a/b/hb"), "hb");
        assert_eq!(kind(b"fleet/a/b/event"), "event");
        assert_eq!(kind(b"fleet/a/b/status"), "status");
        assert_eq!(kind(b"fleet/a/b/cmd"), "cmd");
        assert_eq!(kind(b"fleet/a/b/ack"), "ack");
        for other in [
            &b"fleet/a/b/gps"[..],
            b"fleet/a/hb",
            b"fleet/a/b/hb/x",
            b"json/fleet/a/b",
            b"json/fleet/a/b/hb",
            b"",
            b"truck/a/b/hb",
        ] {
            assert_eq!(kind(other), "other", "{other:?}");
        }
        for (i, kind) in KINDS.into_iter().enumerate() {
            assert_eq!(kind_index(kind), i);
        }
    }

    #[test]
    fn clones_share_counters() {
        let a = BrokerMetrics::default();
        let b = a.clone();
        b.message_in(Some(TopicKind::Command));
        assert_eq!(a.messages_in_total(Some(TopicKind::Command)), 1);
    }
}
