//! [`BrokerMetrics::render`]: the Prometheus text exposition format (version 0.0.4).

use std::fmt::Write as _;

use super::{
    AuthRefusal, BrokerMetrics, ConnectRefusal, DisconnectReason, DropReason, KINDS,
    SubscribeRefusal, kind_label,
};
use crate::listener::Listener;

const GAUGE: &str = "gauge";
const COUNTER: &str = "counter";

/// An exposition being written: metric families, each announced by `# HELP` and `# TYPE`.
struct Exposition(String);

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.0, "# HELP fleetbeat_broker_{name} {help}");
        let _ = writeln!(self.0, "# TYPE fleetbeat_broker_{name} {kind}");
    }

    fn sample(&mut self, name: &str, label: Option<(&str, &str)>, value: u64) {
        let _ = write!(self.0, "fleetbeat_broker_{name}");
        if let Some((key, value)) = label {
            // Label values are our own constants: nothing to escape.
            let _ = write!(self.0, "{{{key}=\"{value}\"}}");
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A metric without labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.header(name, kind, help);
        self.sample(name, None, value);
    }

    /// A metric with one sample per value of the label `key`.
    fn labelled(
        &mut self,
        (name, kind, help): (&str, &str, &str),
        key: &str,
        samples: impl IntoIterator<Item = (&'static str, u64)>,
    ) {
        self.header(name, kind, help);
        for (label, value) in samples {
            self.sample(name, Some((key, label)), value);
        }
    }
}

impl BrokerMetrics {
    /// All metrics in the Prometheus text exposition format (version 0.0.4), each with its
    /// `# HELP` and `# TYPE` lines, ending with a newline: append it to another exposition
    /// as is.
    pub fn render(&self) -> String {
        let c = &self.counters;
        let mut out = Exposition(String::with_capacity(4096));
        let per_listener =
            |count: &dyn Fn(Listener) -> u64| Listener::ALL.map(|l| (l.label(), count(l)));

        out.single(
            "open_mode",
            GAUGE,
            "1 if the broker accepts every client without authentication (no credentials file).",
            u64::from(self.open_mode()),
        );
        out.single(
            "mirror_heartbeats",
            GAUGE,
            "1 while the JSON mirror documents heartbeats (some subscription may match json/...).",
            u64::from(self.mirror_heartbeats()),
        );
        out.labelled(
            (
                "listener_up",
                GAUGE,
                "1 if the listener passed its latest end-to-end MQTT probe, 0 if it is dead.",
            ),
            "listener",
            Listener::ALL
                .into_iter()
                .filter_map(|l| Some((l.label(), u64::from(self.listener_up(l)?)))),
        );
        out.labelled(
            (
                "connections",
                GAUGE,
                "MQTT connections currently established, per listener.",
            ),
            "listener",
            per_listener(&|l| u64::try_from(self.connections_on(l)).unwrap_or(0)),
        );
        out.labelled(
            (
                "connections_total",
                COUNTER,
                "MQTT connections accepted (CONNACK sent), per listener.",
            ),
            "listener",
            per_listener(&|l| c.connections_total.get(l.index())),
        );
        out.single(
            "devices_connected",
            GAUGE,
            "Connections currently authenticated as devices (vehicles).",
            self.devices_connected(),
        );

        out.labelled(
            (
                "auth_refused_total",
                COUNTER,
                "CONNECTs refused by authentication, by reason.",
            ),
            "reason",
            AuthRefusal::ALL.map(|why| (why.label(), self.auth_refused_total(why))),
        );
        out.labelled(
            (
                "connect_refused_total",
                COUNTER,
                "CONNECTs refused for other reasons than authentication, by reason.",
            ),
            "reason",
            ConnectRefusal::ALL.map(|why| (why.label(), self.connect_refused_total(why))),
        );
        out.labelled(
            (
                "disconnects_total",
                COUNTER,
                "Established connections that ended, by reason.",
            ),
            "reason",
            DisconnectReason::ALL.map(|why| (why.label(), self.disconnects_total(why))),
        );

        out.labelled(
            (
                "messages_in_total",
                COUNTER,
                "PUBLISH packets received from clients, by topic kind.",
            ),
            "kind",
            KINDS.map(|kind| (kind_label(kind), self.messages_in_total(kind))),
        );
        out.labelled(
            (
                "messages_out_total",
                COUNTER,
                "PUBLISH packets written to clients, by topic kind.",
            ),
            "kind",
            KINDS.map(|kind| (kind_label(kind), self.messages_out_total(kind))),
        );
        let singles = [
            (
                "bytes_in_total",
                "Bytes read from client sockets.",
                self.bytes_in_total(),
            ),
            (
                "bytes_out_total",
                "Bytes written to client sockets.",
                self.bytes_out_total(),
            ),
        ];
        for (name, help, value) in singles {
            out.single(name, COUNTER, help, value);
        }

        out.labelled(
            ("dropped_total", COUNTER, "Messages not routed, by reason."),
            "reason",
            DropReason::ALL.map(|why| (why.label(), self.dropped_total(why))),
        );
        out.labelled(
            (
                "subscriptions_refused_total",
                COUNTER,
                "Subscription filters refused because the broker does not serve them, by reason.",
            ),
            "reason",
            SubscribeRefusal::ALL.map(|why| (why.label(), self.subscriptions_refused_total(why))),
        );
        let singles = [
            (
                "subscribe_denied_total",
                "SUBSCRIBE packets refused by a topic ACL.",
                self.subscribe_denied_total(),
            ),
            (
                "throttled_total",
                "PUBLISH packets held back because their connection exceeded max_publish_rate.",
                self.throttled_total(),
            ),
            (
                "wills_published_total",
                "Last wills published for connections that were lost.",
                self.wills_published_total(),
            ),
            (
                "sessions_expired_total",
                "Sessions discarded when their MQTT 5 Session Expiry Interval ran out (0: as their connection ended).",
                self.sessions_expired_total(),
            ),
            (
                "mirror_published_total",
                "Documents published by the JSON mirror on json/fleet/...",
                self.mirror_published_total(),
            ),
            (
                "mirror_undecodable_total",
                "JSON mirror documents describing a payload that could not be decoded.",
                self.mirror_undecodable_total(),
            ),
        ];
        for (name, help, value) in singles {
            out.single(name, COUNTER, help, value);
        }

        let durability = [
            (
                "durability_waiting",
                GAUGE,
                "QoS 1 event/ack/status publishes whose PUBACK waits for durability.",
                self.durability_waiting(),
            ),
            (
                "journal_rows",
                GAUGE,
                "Messages in the journal: committed, not yet acknowledged by a durable consumer.",
                self.journal_rows(),
            ),
            (
                "journal_bytes",
                GAUGE,
                "Bytes (topic + payload) of the messages in the journal.",
                self.journal_bytes(),
            ),
            (
                "journal_full_total",
                COUNTER,
                "Messages that found the journal full: their PUBACK waited for a durable consumer.",
                self.journal_full_total(),
            ),
            (
                "journal_commits_total",
                COUNTER,
                "Journal transactions committed (group commit: one fsync each).",
                self.journal_commits_total(),
            ),
            (
                "replayed_total",
                COUNTER,
                "Waiting messages published again to durable consumers.",
                self.replayed_total(),
            ),
        ];
        for (name, kind, help, value) in durability {
            out.single(name, kind, help, value);
        }
        let shared = [
            (
                "shared_groups",
                GAUGE,
                "Shared subscription groups ($share/{group}/{filter}, keyed by group and filter).",
                self.shared_groups(),
            ),
            (
                "shared_deliveries_total",
                COUNTER,
                "Messages a shared subscription group gave to one of its members.",
                self.shared_deliveries_total(),
            ),
            (
                "shared_redeliveries_total",
                COUNTER,
                "Messages a group member left unacknowledged, given to another member.",
                self.shared_redeliveries_total(),
            ),
            (
                "shared_undelivered_total",
                COUNTER,
                "Messages for a shared subscription group that found no member left.",
                self.shared_undelivered_total(),
            ),
        ];
        for (name, kind, help, value) in shared {
            out.single(name, kind, help, value);
        }
        out.single(
            "router_filters",
            GAUGE,
            "Distinct subscription filters clients made the router keep (a commit log each, never freed); at most max_filters.",
            self.router_filters(),
        );
        out.single(
            "router_link_names",
            GAUGE,
            "Names the router was given for links no client knows by name (clean sessions' own links, shared groups), reused: the most such links open at once.",
            self.link_names(),
        );
        let tls = [
            (
                "tls_handshake_failures_total",
                "TLS handshakes that failed or timed out (untrusted certificate, missing or invalid client certificate, plaintext on a TLS port).",
                self.tls_handshake_failures_total(),
            ),
            (
                "tls_reloads_total",
                "Changed TLS certificate or key files reloaded.",
                self.tls_reloads_total(),
            ),
            (
                "tls_reload_failures_total",
                "Changed TLS files that did not load (the previous certificate stays in use).",
                self.tls_reload_failures_total(),
            ),
        ];
        for (name, help, value) in tls {
            out.single(name, COUNTER, help, value);
        }
        out.0
    }
}

#[cfg(test)]
mod tests {
    use shared::TopicKind;

    use super::*;

    #[test]
    fn render_is_prometheus_text() {
        let metrics = BrokerMetrics::default();
        metrics.set_open_mode(true);
        metrics.set_listener_up(Listener::V4, true);
        metrics.connection_opened(Listener::V4, true);
        metrics.connection_opened(Listener::V5, false);
        metrics.connection_closed(Listener::V5, false, DisconnectReason::KeepAlive);
        metrics.auth_refused(AuthRefusal::BadPassword);
        metrics.message_in(Some(TopicKind::Heartbeat));
        metrics.message_in(Some(TopicKind::Heartbeat));
        metrics.message_out(None);
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
}
