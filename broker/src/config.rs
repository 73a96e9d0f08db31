//! [`BrokerConfig`]: our listeners and memory bounds, and their translation into rumqttd's
//! `Config`.
//!
//! # How rumqttd spends memory, and which knob bounds it
//!
//! Facts from rumqttd 0.20's router, which the defaults below are chosen against:
//!
//! - **One commit log per subscription filter** (not per topic, not per subscriber). A publish
//!   is appended to the log of every filter matching its topic; a publish that matches no
//!   filter is dropped, not stored. A log is a queue of at most
//!   [`max_segment_count`](BrokerConfig::max_segment_count) segments (the one being written
//!   included); once the newest segment holds
//!   [`max_segment_size`](BrokerConfig::max_segment_size) bytes, a new one is started and, at
//!   the limit, the oldest is dropped. A subscriber still reading the dropped segment jumps
//!   ahead (rumqttd warns "cursor jump"): those messages are lost for it. Logs are never
//!   removed, even when their last subscriber leaves.
//! - Segment bytes are counted as `4 + topic + payload` per message, but each stored message
//!   also costs ≈232 bytes of bookkeeping (x86-64: `Publish` 72 B, its optional v5
//!   properties 144 B, a timestamp 16 B), and a new segment reserves room for 1024 of them
//!   (≈232 KiB of address space, touched as it fills). Payloads are slices of the socket read
//!   buffers they arrived in, and keep those alive. For ~100-byte heartbeats the real
//!   footprint of a full log is therefore several times its counted size; for large payloads
//!   close to 1×.
//! - rumqttd's own example configuration uses 10 segments × 100 MiB: ≈1 GiB counted, several
//!   GiB real, **per filter**, which is what this crate must not inherit.
//! - Per connection: two 10 KiB socket buffers, plus queues pre-sized by rumqttd constants
//!   (200 incoming packets × 392 B, 200 outgoing notifications × 248 B, ...): ≈200 KiB of
//!   address space, of which an idle publisher touches about one page per buffer. None of
//!   this is configurable in rumqttd 0.20.
//!
//! Measured with the defaults (release build, x86-64, 60-byte payloads on 15-byte topics,
//! one subscriber on `fleet/+/hb`):
//!
//! | scenario | result |
//! |---|---|
//! | subscriber stalled, 40 M messages published | process RSS levels off at ≈90 MB |
//! | same with rumqttd's example limits (10 × 100 MiB) | 760 MB after 3 M messages, growing |
//! | subscriber reading, 20 000 vehicles × 5 heartbeats at once | all 100 000 delivered |
//! | subscriber reading, 20 000 vehicles × 10 heartbeats at once | oldest ≈105 000 lost |
//! | 8 000 idle connections, one heartbeat each | ≈45 KiB RSS per connection |

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::error::BrokerError;

/// rumqttd's `CommitLog::new` panics on segments smaller than this.
const MIN_SEGMENT_SIZE: usize = 1024;

/// Large enough for any CONNECT/SUBSCRIBE a client (or our own readiness probe) sends.
const MIN_PAYLOAD_SIZE: usize = 128;

/// The largest remaining length MQTT can encode (four length bytes).
const MAX_MQTT_PACKET: usize = 268_435_455;

/// One of the broker's two MQTT listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    /// The MQTT 3.1.1 listener (protocol level 4), [`BrokerConfig::v4`].
    V4,
    /// The MQTT 5 listener, [`BrokerConfig::v5`].
    V5,
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Listener::V4 => "v4 (MQTT 3.1.1)",
            Listener::V5 => "v5 (MQTT 5)",
        })
    }
}

/// How to run the broker: where it listens and how much memory it may hold.
///
/// The defaults bound memory for a fleet of 20 000 vehicles publishing small heartbeats to a
/// few subscribers (the bridge) that keep up, while absorbing a burst of several heartbeats
/// from every vehicle without dropping any; see each field. Start from [`Default`] or
/// [`BrokerConfig::ephemeral`] and change fields:
///
/// ```
/// let config = broker::BrokerConfig { v5: None, ..broker::BrokerConfig::ephemeral() };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Address of the MQTT 3.1.1 listener. Port 0 picks a free port on that interface; read it
    /// back with [`Broker::v4_addr`](crate::Broker::v4_addr). Default `127.0.0.1:1883`.
    pub v4: SocketAddr,

    /// Address of the MQTT 5 listener, or `None` for none. Port 0 as for [`Self::v4`].
    /// Default `Some(127.0.0.1:1884)`.
    pub v5: Option<SocketAddr>,

    /// Most MQTT connections the router registers at once; a CONNECT beyond it is dropped
    /// without CONNACK (rumqttd logs "no space for new connection"). Default 25 000:
    /// 20 000 vehicles plus headroom for the bridge, tools and reconnects. The router reserves
    /// a few hundred bytes of (untouched) address space per slot up front; the real cost is per
    /// live connection (see the [module docs](self)). The broker's internal probe connection
    /// comes on top of this number.
    pub max_connections: usize,

    /// Largest MQTT packet accepted from a client, in bytes of remaining length (topic,
    /// properties and payload). rumqttd disconnects a client announcing a bigger packet before
    /// reading it, so this also caps one connection's read buffer and one message's share of a
    /// segment. Default 16 KiB: heartbeats are under 100 bytes, this leaves room for growth.
    pub max_payload_size: usize,

    /// Bytes (counted as `4 + topic + payload` per message) after which a filter's commit log
    /// starts a new segment; the log's size is this times [`Self::max_segment_count`]. Default
    /// 1 MiB, ≈13 000 heartbeats: a slow subscriber loses at most that many at a time, and a
    /// segment's bookkeeping vector (232 B per message) stays a few MiB. Must be at least 1 KiB
    /// (rumqttd panics below) and at least [`Self::max_payload_size`] so a segment holds a full
    /// message.
    pub max_segment_size: usize,

    /// Segments one filter's commit log keeps; the oldest is dropped beyond it. Default 8: a
    /// retention window of 7–8 MiB counted per filter, ≈100 000 heartbeats of 80 counted bytes,
    /// i.e. 5 from each of 20 000 vehicles that a subscriber may fall behind by, during a
    /// burst, without losing any (measured, see the [module docs](self)); ≈80 MB real for a
    /// full log of such small messages. The same window is what a persistent-session
    /// subscriber can catch up on after being offline.
    pub max_segment_count: usize,

    /// QoS 0 messages the router moves from a commit log into one subscriber's outgoing queue
    /// per scheduling pass. rumqttd pauses a subscriber whose queue reaches 199 entries (its
    /// fixed channel capacity) until the connection task has written it out, so a queue peaks
    /// at ≈199 + this many notifications (248 B each, payloads shared with the log) and the
    /// socket write buffer at one such batch. Default 200, as in rumqttd's example config: big
    /// batches for a subscriber that keeps up, ≈100 KiB queued for one that does not. QoS 1
    /// forwards are capped by rumqttd's fixed in-flight window of 100 instead.
    pub max_outgoing_packet_count: u64,

    /// Packets one connection task parses from its socket buffer in one batch before handing
    /// them to the router. (rumqttd 0.20 names it "inflight", but it is this batch size, not a
    /// QoS 1 window.) Default 100: bounds a batch to 100 × [`Self::max_payload_size`] in the
    /// worst case, a few KiB for heartbeats; the router's 1000-event channel back-pressures all
    /// connections beyond that.
    pub max_inflight_count: usize,

    /// Milliseconds rumqttd waits, after accepting a TCP connection, for its CONNECT packet
    /// before closing it. Each such socket holds ≈20 KiB of buffers meanwhile, so this bounds
    /// what a reconnect storm or a port scan pins: accept rate × timeout × 20 KiB. Default
    /// 10 000: generous for a slow cellular link, short enough to shed idle sockets.
    pub connection_timeout_ms: u16,

    /// Milliseconds rumqttd sleeps after each accepted connection, per listener: an accept
    /// rate limit. Default 0: a fleet reconnecting after an outage should get back in as fast as
    /// it can, and [`Self::connection_timeout_ms`] already bounds sockets awaiting CONNECT. Set
    /// 1 to cap accepts at ≈1000/s per listener (rumqttd's example value).
    pub next_connection_delay_ms: u64,

    /// How long [`Broker::start`](crate::Broker::start) waits for every listener to complete
    /// an MQTT handshake before failing. Default 10 s.
    pub startup_timeout: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            v4: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1883),
            v5: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1884)),
            max_connections: 25_000,
            max_payload_size: 16 * 1024,
            max_segment_size: 1024 * 1024,
            max_segment_count: 8,
            max_outgoing_packet_count: 200,
            max_inflight_count: 100,
            connection_timeout_ms: 10_000,
            next_connection_delay_ms: 0,
            startup_timeout: Duration::from_secs(10),
        }
    }
}

impl BrokerConfig {
    /// The defaults, with both listeners on `127.0.0.1:0` (a free port each): for tests and
    /// for running several brokers in one process.
    pub fn ephemeral() -> Self {
        let any_port = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        BrokerConfig {
            v4: any_port,
            v5: Some(any_port),
            ..BrokerConfig::default()
        }
    }

    /// The listeners to start, v4 first.
    pub(crate) fn listeners(&self) -> impl Iterator<Item = (Listener, SocketAddr)> + use<> {
        std::iter::once((Listener::V4, self.v4)).chain(self.v5.map(|addr| (Listener::V5, addr)))
    }

    /// Checks the values rumqttd would panic on, or that would make the broker useless.
    /// [`Broker::start`](crate::Broker::start) calls it first.
    ///
    /// # Errors
    ///
    /// [`BrokerError::InvalidConfig`] naming the first offending field.
    pub fn validate(&self) -> Result<(), BrokerError> {
        fn invalid(field: &'static str, reason: String) -> Result<(), BrokerError> {
            Err(BrokerError::InvalidConfig { field, reason })
        }

        if let Some(v5) = self.v5
            && v5 == self.v4
            && v5.port() != 0
        {
            return invalid("v5", format!("must differ from v4 ({v5})"));
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be at least 1".to_owned());
        }
        if !(MIN_PAYLOAD_SIZE..=MAX_MQTT_PACKET).contains(&self.max_payload_size) {
            return invalid(
                "max_payload_size",
                format!(
                    "is {}, must be between {MIN_PAYLOAD_SIZE} and {MAX_MQTT_PACKET} bytes",
                    self.max_payload_size
                ),
            );
        }
        if self.max_segment_size < MIN_SEGMENT_SIZE.max(self.max_payload_size) {
            return invalid(
                "max_segment_size",
                format!(
                    "is {}, must be at least {MIN_SEGMENT_SIZE} bytes and at least \
                     max_payload_size ({})",
                    self.max_segment_size, self.max_payload_size
                ),
            );
        }
        if self.max_segment_count == 0 {
            return invalid("max_segment_count", "must be at least 1".to_owned());
        }
        if self.max_outgoing_packet_count == 0 {
            return invalid("max_outgoing_packet_count", "must be at least 1".to_owned());
        }
        if self.max_inflight_count == 0 {
            return invalid("max_inflight_count", "must be at least 1".to_owned());
        }
        if self.connection_timeout_ms == 0 {
            return invalid("connection_timeout_ms", "must be at least 1".to_owned());
        }
        if self.startup_timeout.is_zero() {
            return invalid("startup_timeout", "must not be zero".to_owned());
        }
        Ok(())
    }

    /// rumqttd's configuration for this one, listening on `v4` and `v5` (ports resolved):
    /// no console, no Prometheus exporter, no websocket, no cluster, no bridge, no auth.
    pub(crate) fn to_rumqttd(&self, v4: SocketAddr, v5: Option<SocketAddr>) -> rumqttd::Config {
        let connections = rumqttd::ConnectionSettings {
            connection_timeout_ms: self.connection_timeout_ms,
            max_payload_size: self.max_payload_size,
            max_inflight_count: self.max_inflight_count,
            auth: None,
            external_auth: None,
            // Dead code for publishes in rumqttd 0.20 (its topic match never reports "no
            // filter"); off so a fixed rumqttd would not start one log per topic.
            dynamic_filters: false,
        };
        let server = |name: &str, listen: SocketAddr| {
            let settings = rumqttd::ServerSettings {
                // rumqttd names the listener's thread after it.
                name: name.to_owned(),
                listen,
                tls: None,
                next_connection_delay_ms: self.next_connection_delay_ms,
                connections: connections.clone(),
            };
            HashMap::from([(name.to_owned(), settings)])
        };

        rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                // One more for the internal link that proves readiness.
                max_connections: self.max_connections.saturating_add(1),
                max_outgoing_packet_count: self.max_outgoing_packet_count,
                max_segment_size: self.max_segment_size,
                max_segment_count: self.max_segment_count,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: rumqttd::Strategy::default(),
            },
            v4: Some(server("rumqttd-v4", v4)),
            v5: v5.map(|addr| server("rumqttd-v5", addr)),
            ws: None,
            cluster: None,
            console: None,
            bridge: None,
            prometheus: None,
            metrics: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_listen_on_loopback_with_bounded_memory() {
        let config = BrokerConfig::default();
        assert_eq!(config.v4, "127.0.0.1:1883".parse().unwrap());
        assert_eq!(config.v5, Some("127.0.0.1:1884".parse().unwrap()));
        assert!(config.max_connections >= 20_000);
        assert_eq!(config.max_payload_size, 16 * 1024);
        // Counted bytes one filter may hold: 8 MiB, not rumqttd's example 1 GiB.
        assert_eq!(config.max_segment_size * config.max_segment_count, 8 << 20);
        config.validate().unwrap();
    }

    #[test]
    fn ephemeral_uses_port_zero_on_loopback() {
        let config = BrokerConfig::ephemeral();
        assert_eq!(config.v4, "127.0.0.1:0".parse().unwrap());
        assert_eq!(config.v5, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(
            config.max_segment_count,
            BrokerConfig::default().max_segment_count
        );
        config.validate().unwrap();
    }

    #[test]
    fn validate_rejects_what_rumqttd_would_panic_on() {
        type BreakIt = fn(&mut BrokerConfig);
        let cases: [(&str, BreakIt); 8] = [
            ("max_segment_size", |c| c.max_segment_size = 512),
            ("max_segment_size", |c| {
                c.max_segment_size = c.max_payload_size - 1
            }),
            ("max_segment_count", |c| c.max_segment_count = 0),
            ("max_connections", |c| c.max_connections = 0),
            ("max_payload_size", |c| c.max_payload_size = 16),
            ("max_outgoing_packet_count", |c| {
                c.max_outgoing_packet_count = 0
            }),
            ("connection_timeout_ms", |c| c.connection_timeout_ms = 0),
            ("v5", |c| c.v5 = Some(c.v4)),
        ];
        for (field, break_it) in cases {
            let mut config = BrokerConfig::default();
            break_it(&mut config);
            match config.validate() {
                Err(BrokerError::InvalidConfig { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn same_ephemeral_address_twice_is_fine() {
        // Port 0 twice means two different free ports.
        BrokerConfig::ephemeral().validate().unwrap();
    }

    #[test]
    fn rumqttd_config_has_only_our_listeners_and_limits() {
        let config = BrokerConfig::default();
        let v4: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let v5: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        let rumqttd = config.to_rumqttd(v4, Some(v5));

        let v4_servers = rumqttd.v4.as_ref().unwrap();
        assert_eq!(v4_servers.len(), 1);
        let server = v4_servers.values().next().unwrap();
        assert_eq!(server.listen, v4);
        assert!(server.tls.is_none());
        assert_eq!(server.connections.max_payload_size, config.max_payload_size);
        assert_eq!(
            server.connections.max_inflight_count,
            config.max_inflight_count
        );
        assert_eq!(
            server.connections.connection_timeout_ms,
            config.connection_timeout_ms
        );
        assert!(!server.connections.dynamic_filters);
        assert_eq!(
            rumqttd.v5.as_ref().unwrap().values().next().unwrap().listen,
            v5
        );

        assert!(rumqttd.ws.is_none());
        assert!(rumqttd.console.is_none());
        assert!(rumqttd.prometheus.is_none());
        assert!(rumqttd.metrics.is_none());
        assert!(rumqttd.bridge.is_none());
        assert!(rumqttd.cluster.is_none());

        let router = &rumqttd.router;
        assert_eq!(router.max_connections, config.max_connections + 1);
        assert_eq!(router.max_segment_size, config.max_segment_size);
        assert_eq!(router.max_segment_count, config.max_segment_count);
        assert_eq!(
            router.max_outgoing_packet_count,
            config.max_outgoing_packet_count
        );
        assert!(router.custom_segment.is_none());

        assert!(config.to_rumqttd(v4, None).v5.is_none());
    }
}
