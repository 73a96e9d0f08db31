//! Counters of the bridge, rendered in the Prometheus text format at `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shared::TopicKind;

/// Why an MQTT message was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The topic is not a Fleetbeat topic.
    Topic,
    /// The payload did not decode.
    Decode,
    /// The payload's origin could not be verified: no key for the vehicle, or a tag that does
    /// not match (spoofed, altered or moved from another topic).
    Auth,
    /// The payload's counter is not newer than one already accepted: a replay.
    Replay,
}

impl Rejection {
    const ALL: [Rejection; 4] = [Self::Topic, Self::Decode, Self::Auth, Self::Replay];

    fn label(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Decode => "decode",
            Self::Auth => "auth",
            Self::Replay => "replay",
        }
    }
}

/// The bridge's counters. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    received: [AtomicU64; 5],
    rejected: [AtomicU64; 4],
    emitted: AtomicU64,
    batches: AtomicU64,
    dropped: AtomicU64,
    commands_sent: AtomicU64,
    commands_timed_out: AtomicU64,
    history_dropped: AtomicU64,
    queue_expired: AtomicU64,
    events_unacked: AtomicU64,
    mqtt_connects: AtomicU64,
    mqtt_errors: AtomicU64,
    mqtt_ready: AtomicBool,
    sockets: AtomicU64,
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

impl Metrics {
    /// Counts a valid message of `kind` received from MQTT.
    pub fn received(&self, kind: TopicKind) {
        self.received[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// How many valid messages of `kind` were received.
    pub fn received_count(&self, kind: TopicKind) -> u64 {
        self.received[kind_index(kind)].load(Ordering::Relaxed)
    }

    /// Counts a rejected MQTT message.
    pub fn rejected(&self, why: Rejection) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many MQTT messages were rejected for `why`.
    pub fn rejected_count(&self, why: Rejection) -> u64 {
        self.rejected[why as usize].load(Ordering::Relaxed)
    }

    /// Counts a Socket.IO event emitted to rooms.
    pub fn emitted(&self) {
        self.emitted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a `position` batch sent to one socket.
    pub fn batch_sent(&self) {
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an emit that could not be delivered to a socket (gone, or its buffer full).
    pub fn emit_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a command published to a vehicle.
    pub fn command_sent(&self) {
        self.commands_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a command whose vehicle did not answer in time.
    pub fn command_timed_out(&self) {
        self.commands_timed_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a heartbeat the history writer had no room for.
    pub fn history_dropped(&self) {
        self.history_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts queued messages removed by retention.
    pub fn queue_expired(&self, n: u64) {
        self.queue_expired.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a delivery event that could not be stored (left unacknowledged for redelivery).
    pub fn event_unacked(&self) {
        self.events_unacked.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a successful MQTT (re)connection.
    pub fn mqtt_connected(&self) {
        self.mqtt_connects.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an MQTT connection error.
    pub fn mqtt_error(&self) {
        self.mqtt_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets whether MQTT is connected with every subscription acknowledged.
    pub fn set_mqtt_ready(&self, ready: bool) {
        self.mqtt_ready.store(ready, Ordering::Relaxed);
    }

    /// Whether MQTT is connected with every subscription acknowledged.
    pub fn mqtt_ready(&self) -> bool {
        self.mqtt_ready.load(Ordering::Relaxed)
    }

    /// Counts a Socket.IO socket connecting (`+1`) or disconnecting (`-1`).
    pub fn socket_delta(&self, connected: bool) {
        if connected {
            self.sockets.fetch_add(1, Ordering::Relaxed);
        } else {
            self.sockets.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// How many Socket.IO sockets are connected.
    pub fn sockets(&self) -> u64 {
        self.sockets.load(Ordering::Relaxed)
    }

    /// Renders every counter in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(1024);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP fleetbeat_bridge_mqtt_received_total Valid MQTT messages received, by topic kind.\n");
        out.push_str("# TYPE fleetbeat_bridge_mqtt_received_total counter\n");
        for kind in TopicKind::ALL {
            let _ = writeln!(
                out,
                "fleetbeat_bridge_mqtt_received_total{{kind=\"{}\"}} {}",
                kind.level(),
                self.received_count(kind)
            );
        }
        out.push_str(
            "# HELP fleetbeat_bridge_mqtt_rejected_total MQTT messages rejected, by reason.\n",
        );
        out.push_str("# TYPE fleetbeat_bridge_mqtt_rejected_total counter\n");
        for why in Rejection::ALL {
            let _ = writeln!(
                out,
                "fleetbeat_bridge_mqtt_rejected_total{{reason=\"{}\"}} {}",
                why.label(),
                self.rejected_count(why)
            );
        }
        let gauges: [(&str, &str, &str, u64); 12] = [
            (
                "history_dropped_total",
                "counter",
                "Heartbeats not stored: the history writer was full.",
                load(&self.history_dropped),
            ),
            (
                "queue_expired_total",
                "counter",
                "Queued messages removed by retention before their client acknowledged them.",
                load(&self.queue_expired),
            ),
            (
                "events_unacked_total",
                "counter",
                "Delivery events not stored, left unacknowledged for redelivery.",
                load(&self.events_unacked),
            ),
            (
                "position_batches_total",
                "counter",
                "position batches sent to sockets.",
                load(&self.batches),
            ),
            (
                "socketio_dropped_total",
                "counter",
                "Emits a socket could not take (gone or full).",
                load(&self.dropped),
            ),
            (
                "commands_sent_total",
                "counter",
                "Commands published to vehicles.",
                load(&self.commands_sent),
            ),
            (
                "commands_timed_out_total",
                "counter",
                "Commands whose vehicle did not answer in time.",
                load(&self.commands_timed_out),
            ),
            (
                "socketio_emitted_total",
                "counter",
                "Socket.IO events emitted to rooms.",
                load(&self.emitted),
            ),
            (
                "mqtt_connects_total",
                "counter",
                "Successful MQTT connections.",
                load(&self.mqtt_connects),
            ),
            (
                "mqtt_errors_total",
                "counter",
                "MQTT connection errors.",
                load(&self.mqtt_errors),
            ),
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
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(out, "# HELP fleetbeat_bridge_{name} {help}");
            let _ = writeln!(out, "# TYPE fleetbeat_bridge_{name} {kind}");
            let _ = writeln!(out, "fleetbeat_bridge_{name} {value}");
        }
        out
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
}
