//! Counters of the bridge, rendered in the Prometheus text format at `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shared::TopicKind;

use crate::store::{GroupStats, LATENCY_BOUNDS_US, Latencies, StoreHealth};

/// Why an MQTT message was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// The topic is not a Fleetbeat topic.
    Topic,
    /// The payload did not decode.
    Decode,
    /// The payload's origin could not be verified: no key for the vehicle, or a tag that does
    /// not match (spoofed, altered or moved from another topic).
    Auth,
    /// The payload's counter is not newer than one already accepted: a replay.
    Replay,
    /// A delivery event the store refused as data (a constraint, a corrupt order row), not
    /// for an outage: retrying would not help, so it is acknowledged and dropped.
    Store,
    /// Published under another fleet than the vehicle's fleet in the credentials file.
    Fleet,
    /// From a vehicle whose key was removed from the credentials file (revoked).
    Revoked,
}

impl Rejection {
    const ALL: [Rejection; 7] = [
        Self::Topic,
        Self::Decode,
        Self::Auth,
        Self::Replay,
        Self::Store,
        Self::Fleet,
        Self::Revoked,
    ];

    /// The `reason` label of the rejection counter.
    fn label(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Decode => "decode",
            Self::Auth => "auth",
            Self::Replay => "replay",
            Self::Store => "store",
            Self::Fleet => "fleet",
            Self::Revoked => "revoked",
        }
    }

    /// What the log says about a message rejected for this reason.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Auth => "unauthenticated origin",
            Self::Replay => "replay",
            Self::Topic => "bad topic",
            Self::Decode => "bad payload",
            Self::Store => "refused by the store",
            Self::Fleet => "not the vehicle's fleet",
            Self::Revoked => "revoked key",
        }
    }
}

/// A plain counter of the bridge, rendered as `fleetbeat_bridge_{name}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    /// A heartbeat the history writer had no room for.
    HistoryDropped,
    /// A heartbeat lost because its batch could not be written.
    HistoryFailed,
    /// A queued message removed by retention.
    QueueExpired,
    /// A delivery event whose first commit failed: its PUBACK waits while it is retried.
    EventsUnacked,
    /// A commit of a delivery event tried again after a failure.
    StoreRetries,
    /// A `position` batch sent to one socket.
    PositionBatches,
    /// An emit that could not be delivered to a socket (gone, or its buffer full).
    EmitDropped,
    /// A command published to a vehicle.
    CommandsSent,
    /// A command whose vehicle did not answer in time.
    CommandsTimedOut,
    /// A Socket.IO event emitted to rooms.
    Emitted,
    /// A successful MQTT (re)connection.
    MqttConnects,
    /// An MQTT connection error.
    MqttErrors,
    /// A successful MQTT (re)connection of the heartbeats session.
    MqttHeartbeatConnects,
    /// An MQTT connection error of the heartbeats session.
    MqttHeartbeatErrors,
    /// The broker closed a session soon after accepting it, several times in a row: another
    /// client probably uses the bridge's client id (issue #15).
    MqttSessionTakeovers,
    /// The credentials file changed and its device keys were reloaded.
    KeysReloaded,
    /// The credentials file changed but did not load: the previous keys stay.
    KeysReloadFailed,
    /// A QoS 1 message held unacknowledged because the bridge has no key for its vehicle yet.
    KeyWaits,
    /// An HTTPS connection whose TLS handshake failed (or was refused: too many at once).
    TlsHandshakeFailed,
    /// An HTTPS connection whose TLS handshake did not finish in time.
    TlsHandshakeTimedOut,
    /// The HTTPS certificate files changed and were reloaded.
    TlsReloads,
    /// The HTTPS certificate files changed but did not load: the previous certificate stays.
    TlsReloadFailed,
    /// A QoS 1 message from a vehicle without a key parked in the store after its wait.
    Parked,
    /// A parked message removed by retention, its vehicle's key never known.
    ParkedExpired,
    /// A command ack of another bridge's command (every bridge receives every ack): ignored.
    AcksForOtherBridges,
    /// A Socket.IO broadcast that failed (with the Redis adapter: Redis unreachable).
    BroadcastFailed,
    /// Redis lost by the Socket.IO adapter's link, or a failed refresh of the bridge's
    /// registration (its client id): Redis is unreachable, or another bridge took the client id.
    RedisErrors,
    /// A vehicle entered or left a geofence (one `geofence` event).
    GeofenceTransitions,
    /// A new custom geofence refused: its fleet had the most allowed.
    GeofencesRefused,
    /// A Socket.IO event for rooms no socket was in, not serialized (one bridge alone: with
    /// the Redis adapter every event is broadcast, other bridges may have the sockets).
    EmitUnheard,
}

impl Counter {
    /// Name and help text of every counter, in the order of the variants (and of `/metrics`).
    const RENDERED: [(&'static str, &'static str); 30] = [
        (
            "history_dropped_total",
            "Heartbeats not stored: the history writer was full.",
        ),
        (
            "history_failed_total",
            "Heartbeats not stored: their batch could not be written.",
        ),
        (
            "queue_expired_total",
            "Queued messages removed by retention before their client acknowledged them.",
        ),
        (
            "events_unacked_total",
            "Delivery events whose commit failed; their PUBACK waits while they are retried.",
        ),
        (
            "store_write_retries_total",
            "Commits of delivery events tried again after a failure.",
        ),
        (
            "position_batches_total",
            "position batches sent to sockets.",
        ),
        (
            "socketio_dropped_total",
            "Emits a socket could not take (gone or full).",
        ),
        ("commands_sent_total", "Commands published to vehicles."),
        (
            "commands_timed_out_total",
            "Commands whose vehicle did not answer in time.",
        ),
        (
            "socketio_emitted_total",
            "Socket.IO events emitted to rooms.",
        ),
        (
            "mqtt_connects_total",
            "Successful MQTT connections (events session).",
        ),
        (
            "mqtt_errors_total",
            "MQTT connection errors (events session).",
        ),
        (
            "mqtt_heartbeat_connects_total",
            "Successful MQTT connections (heartbeats session).",
        ),
        (
            "mqtt_heartbeat_errors_total",
            "MQTT connection errors (heartbeats session).",
        ),
        (
            "mqtt_session_takeovers_total",
            "Times the broker closed a session soon after accepting it, 3 times in a row: another client probably uses this bridge's client id.",
        ),
        (
            "credentials_reloads_total",
            "Times the credentials file changed and its device keys were reloaded.",
        ),
        (
            "credentials_reload_failures_total",
            "Times the credentials file changed but did not load (the previous keys stay).",
        ),
        (
            "key_waits_total",
            "QoS 1 messages held unacknowledged until their vehicle's key is known.",
        ),
        (
            "tls_handshake_failures_total",
            "HTTPS connections whose TLS handshake failed or was refused (too many at once).",
        ),
        (
            "tls_handshake_timeouts_total",
            "HTTPS connections whose TLS handshake did not finish in time.",
        ),
        (
            "tls_reloads_total",
            "Times the HTTPS certificate files changed and were reloaded.",
        ),
        (
            "tls_reload_failures_total",
            "Times the HTTPS certificate files changed but did not load (the previous stays).",
        ),
        (
            "parked_total",
            "QoS 1 messages of vehicles without a key, parked in the store after their wait.",
        ),
        (
            "parked_expired_total",
            "Parked messages removed by retention, their vehicle's key never known.",
        ),
        (
            "acks_for_other_bridges_total",
            "Command acks of commands another bridge sent (every bridge receives every ack): ignored.",
        ),
        (
            "socketio_broadcast_failures_total",
            "Socket.IO broadcasts that failed (with the Redis adapter: Redis unreachable).",
        ),
        (
            "redis_errors_total",
            "Redis lost by the Socket.IO adapter, or a failed refresh of the bridge's registration (Redis unreachable, or the client id taken).",
        ),
        (
            "geofence_transitions_total",
            "Vehicles that entered or left a geofence (geofence events raised).",
        ),
        (
            "geofences_refused_total",
            "New custom geofences refused: their fleet had max_custom_per_fleet already.",
        ),
        (
            "socketio_emits_unheard_total",
            "Socket.IO events for rooms no socket was in: not serialized (a bridge alone; with the Redis adapter every event is broadcast).",
        ),
    ];
}

/// The bridge's counters. Cheap to update from any task.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    received: [AtomicU64; 5],
    rejected: [AtomicU64; Rejection::ALL.len()],
    counters: [AtomicU64; Counter::RENDERED.len()],
    mqtt_ready: AtomicBool,
    mqtt_heartbeats_ready: AtomicBool,
    sockets: AtomicU64,
    acks_waiting: AtomicU64,
    history_queued: AtomicU64,
    parked: AtomicU64,
    store: StoreHealth,
}

fn kind_index(kind: TopicKind) -> usize {
    match kind {
        TopicKind::Heartbeat => 0,
        TopicKind::Event => 1,
        TopicKind::Status => 2,
        TopicKind::Command => 3,
        TopicKind::Ack => 4,
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Metrics {
    /// Counts one `counter` event.
    pub(crate) fn count(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// Counts `n` `counter` events.
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        self.counters[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The value of `counter`.
    #[cfg(test)]
    pub(crate) fn counter(&self, counter: Counter) -> u64 {
        load(&self.counters[counter as usize])
    }

    /// Counts a valid message of `kind` received from MQTT.
    pub(crate) fn received(&self, kind: TopicKind) {
        self.received[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a rejected MQTT message.
    pub(crate) fn rejected(&self, why: Rejection) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Sets whether the events session is connected with every subscription acknowledged.
    pub(crate) fn set_mqtt_ready(&self, ready: bool) {
        self.mqtt_ready.store(ready, Ordering::Relaxed);
    }

    /// Sets whether the heartbeats session is connected with its subscription acknowledged.
    pub(crate) fn set_mqtt_heartbeats_ready(&self, ready: bool) {
        self.mqtt_heartbeats_ready.store(ready, Ordering::Relaxed);
    }

    /// Whether both MQTT sessions are connected with every subscription acknowledged.
    pub(crate) fn mqtt_ready(&self) -> bool {
        self.mqtt_ready.load(Ordering::Relaxed)
            && self.mqtt_heartbeats_ready.load(Ordering::Relaxed)
    }

    /// What the store's writes have shown lately.
    pub(crate) fn store(&self) -> &StoreHealth {
        &self.store
    }

    /// Counts QoS 1 messages handed to the ack queue (`n > 0`) or acknowledged or dropped
    /// from it (`n < 0`).
    pub(crate) fn acks_waiting_delta(&self, n: i64) {
        if n >= 0 {
            self.acks_waiting
                .fetch_add(n.unsigned_abs(), Ordering::Relaxed);
        } else {
            self.acks_waiting
                .fetch_sub(n.unsigned_abs(), Ordering::Relaxed);
        }
    }

    /// QoS 1 messages whose PUBACK waits (for their turn, or for their delivery event to be
    /// stored).
    pub(crate) fn acks_waiting(&self) -> u64 {
        load(&self.acks_waiting)
    }

    /// Sets how many heartbeats wait for the history writer.
    pub(crate) fn set_history_queued(&self, n: usize) {
        self.history_queued
            .store(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Sets how many messages are parked in the store, waiting for their vehicle's key.
    pub(crate) fn set_parked(&self, n: u64) {
        self.parked.store(n, Ordering::Relaxed);
    }

    /// Counts a Socket.IO socket connecting (`true`) or disconnecting (`false`).
    pub(crate) fn socket_delta(&self, connected: bool) {
        if connected {
            self.sockets.fetch_add(1, Ordering::Relaxed);
        } else {
            self.sockets.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Renders every counter in the Prometheus text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(1024);
        let received = TopicKind::ALL.map(|kind| {
            let value = load(&self.received[kind_index(kind)]);
            (format!("{{kind=\"{}\"}}", kind.level()), value)
        });
        family(
            &mut out,
            ("mqtt_received_total", "counter"),
            "Valid MQTT messages received, by topic kind.",
            received,
        );
        let rejected = Rejection::ALL.map(|why| {
            let value = load(&self.rejected[why as usize]);
            (format!("{{reason=\"{}\"}}", why.label()), value)
        });
        family(
            &mut out,
            ("mqtt_rejected_total", "counter"),
            "MQTT messages rejected, by reason.",
            rejected,
        );
        let counters = Counter::RENDERED
            .iter()
            .zip(&self.counters)
            .map(|(&(name, help), value)| (name, "counter", help, load(value)));
        let gauges = [
            (
                "mqtt_ready",
                "gauge",
                "1 when MQTT is connected and subscribed.",
                u64::from(self.mqtt_ready()),
            ),
            (
                "socketio_sockets",
                "gauge",
                "Connected Socket.IO sockets.",
                load(&self.sockets),
            ),
            (
                "store_writable",
                "gauge",
                "1 while the store's writes succeed, 0 from a failed write until one succeeds.",
                u64::from(self.store.writable()),
            ),
            (
                "store_write_failures_total",
                "counter",
                "Store writes that failed because the store could not write.",
                self.store.failures(),
            ),
            (
                "acks_waiting",
                "gauge",
                "QoS 1 messages whose PUBACK waits: for their turn, or their event's commit.",
                self.acks_waiting(),
            ),
            (
                "history_queued",
                "gauge",
                "Heartbeats waiting for the history writer.",
                load(&self.history_queued),
            ),
            (
                "parked",
                "gauge",
                "Messages parked in the store, waiting for their vehicle's key.",
                load(&self.parked),
            ),
        ];
        for (name, kind, help, value) in counters.chain(gauges) {
            family(&mut out, (name, kind), help, [(String::new(), value)]);
        }
        out
    }
}

/// Writes how the store committed the delivery events (`Store::event_groups`): transactions,
/// events in them, and the most one held (events per commit is the group commit's yield: near
/// 1 while events come one at a time, higher while many wait for the store); and SQLite's
/// checkpoints off the commit path (`Store::checkpoints`).
pub(crate) fn render_store(out: &mut String, groups: GroupStats, checkpoints: u64) {
    let families = [
        (
            "store_event_commits_total",
            "counter",
            "Transactions the store committed that held delivery events (group commit).",
            groups.commits,
        ),
        (
            "store_events_committed_total",
            "counter",
            "Delivery events committed in those transactions.",
            groups.events,
        ),
        (
            "store_event_group_largest",
            "gauge",
            "The most delivery events one of those transactions held.",
            groups.largest,
        ),
        (
            "store_checkpoints_total",
            "counter",
            "SQLite checkpoints that copied the log into the database file off the commit path.",
            checkpoints,
        ),
    ];
    for (name, kind, help, value) in families {
        family(out, (name, kind), help, [(String::new(), value)]);
    }
    histogram(
        out,
        "store_event_commit_seconds",
        "How long each committed delivery event took from its hand-over to the store (the \
         wait for the transaction before it, then its own) until it was committed.",
        &groups.latency,
    );
}

/// Writes the histogram `fleetbeat_bridge_{name}` of `latencies`: its cumulative buckets
/// (`le` in seconds), sum and count.
fn histogram(out: &mut String, name: &str, help: &str, latencies: &Latencies) {
    let _ = writeln!(out, "# HELP fleetbeat_bridge_{name} {help}");
    let _ = writeln!(out, "# TYPE fleetbeat_bridge_{name} histogram");
    let mut cumulative = 0;
    for (bound, count) in LATENCY_BOUNDS_US.iter().zip(&latencies.counts) {
        cumulative += count;
        let le = *bound as f64 / 1e6;
        let _ = writeln!(
            out,
            "fleetbeat_bridge_{name}_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    let count = latencies.count();
    let _ = writeln!(out, "fleetbeat_bridge_{name}_bucket{{le=\"+Inf\"}} {count}");
    let sum = latencies.sum_us as f64 / 1e6;
    let _ = writeln!(out, "fleetbeat_bridge_{name}_sum {sum}");
    let _ = writeln!(out, "fleetbeat_bridge_{name}_count {count}");
}

/// Writes the metric family `fleetbeat_bridge_{name}` of type `kind`: its `HELP` and `TYPE`
/// lines, then one sample per `(labels, value)` (labels as `{kind="hb"}`, or empty).
fn family(
    out: &mut String,
    (name, kind): (&str, &str),
    help: &str,
    samples: impl IntoIterator<Item = (String, u64)>,
) {
    let _ = writeln!(out, "# HELP fleetbeat_bridge_{name} {help}");
    let _ = writeln!(out, "# TYPE fleetbeat_bridge_{name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "fleetbeat_bridge_{name}{labels} {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::default();
        m.received(TopicKind::Heartbeat);
        m.rejected(Rejection::Decode);
        m.rejected(Rejection::Decode);
        let text = m.render();
        assert!(text.contains("fleetbeat_bridge_mqtt_received_total{kind=\"hb\"} 1\n"));
        assert!(text.contains("fleetbeat_bridge_mqtt_rejected_total{reason=\"decode\"} 2\n"));
        assert!(text.contains("fleetbeat_bridge_mqtt_ready 0\n"));
    }

    /// The commit latencies render as a Prometheus histogram: cumulative buckets up to
    /// `+Inf`, the sum in seconds, the count.
    #[test]
    fn renders_the_commit_latency_histogram() {
        let mut latency = Latencies::default();
        latency.counts[0] = 2;
        latency.counts[2] = 1;
        latency.counts[LATENCY_BOUNDS_US.len()] = 1;
        latency.sum_us = 2_001_500;
        let mut text = String::new();
        render_store(
            &mut text,
            GroupStats {
                latency,
                ..GroupStats::default()
            },
            0,
        );
        let name = "fleetbeat_bridge_store_event_commit_seconds";
        for line in [
            format!("# TYPE {name} histogram\n"),
            format!("{name}_bucket{{le=\"0.00025\"}} 2\n"),
            format!("{name}_bucket{{le=\"0.0005\"}} 2\n"),
            format!("{name}_bucket{{le=\"0.001\"}} 3\n"),
            format!("{name}_bucket{{le=\"1\"}} 3\n"),
            format!("{name}_bucket{{le=\"+Inf\"}} 4\n"),
            format!("{name}_sum 2.0015\n"),
            format!("{name}_count 4\n"),
        ] {
            assert!(text.contains(&line), "{line:?} in\n{text}");
        }
    }
}
