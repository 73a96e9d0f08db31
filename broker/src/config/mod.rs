//! [`BrokerConfig`]: listeners, authentication, memory bounds and timeouts; how it is loaded
//! in layers ([`load`]); its translation into rumqttd's router configuration.
//!
//! # Layers
//!
//! Built-in defaults ([`BrokerConfig::default`], printed with comments by
//! `broker default-config`, see [`DEFAULT_CONFIG_TOML`]) → a TOML file (`--config PATH`) →
//! `FLEETBEAT_BROKER_*` environment variables (`FLEETBEAT_BROKER_MAX_CONNECTIONS=30000`) →
//! command-line flags ([`ConfigOverrides`]): each layer overrides only the keys it sets. The
//! result is validated once ([`BrokerConfig::validate`]); every error names the key, the
//! problem and, for a value of the wrong type, the layer it came from.
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
//!   removed, even when their last subscriber leaves. The filters of the QoS 1 kinds get a
//!   smaller pair of their own ([`qos1_segment_size`](BrokerConfig::qos1_segment_size),
//!   [`qos1_segment_count`](BrokerConfig::qos1_segment_count), rumqttd's `custom_segment`).
//! - Segment bytes are counted as `4 + topic + payload` per message, but each stored message
//!   also costs ≈232 bytes of bookkeeping (x86-64: `Publish` 72 B, its optional v5
//!   properties 144 B, a timestamp 16 B), and a new segment reserves room for 1024 of them
//!   (≈232 KiB of address space, touched as it fills). In rumqttd's own network code payloads
//!   are slices of the socket read buffers they arrived in, and keep those alive; our front end
//!   (`connection` module, see `docs/broker.md`) copies each routed topic and payload into an
//!   allocation of its own first, so a stored heartbeat pins its ≈100 bytes, not a read buffer.
//!   For ~100-byte heartbeats the real footprint of a full log is still a few times its counted
//!   size (the bookkeeping); for large payloads close to 1×.
//! - rumqttd's own example configuration uses 10 segments × 100 MiB: ≈1 GiB counted, several
//!   GiB real, **per filter**, which is what this crate must not inherit.
//! - Per connection: the router's queues pre-sized by rumqttd constants (200 incoming packets
//!   × 392 B, 200 outgoing notifications × 248 B, ...), ≈150 KiB of address space of which an
//!   idle publisher touches a few pages (26.8 KiB resident per registered link with glibc's
//!   malloc); not configurable in rumqttd 0.20. The outgoing queue and the link's receive cache
//!   are ring buffers emptied with `pop_front`, so after a few hundred notifications (QoS 1
//!   acks, commands) all of their pages are resident: ≈150 KiB per such connection. Our front
//!   end adds a read and a write buffer that start at 1 KiB and grow only for bigger packets
//!   (rumqttd's own network code starts both at 10 KiB), ≈13 KiB per connection in all.
//!
//! Measured with the defaults and rumqttd's own network code, before our front end replaced
//! it (release build, x86-64, 60-byte payloads on 15-byte topics, one subscriber on
//! `fleet/+/hb`); the benchmark re-measures with the front end:
//!
//! | scenario | result |
//! |---|---|
//! | subscriber stalled, 40 M messages published | process RSS levels off at ≈90 MB |
//! | same with rumqttd's example limits (10 × 100 MiB) | 760 MB after 3 M messages, growing |
//! | subscriber reading, 20 000 vehicles × 5 heartbeats at once | all 100 000 delivered |
//! | subscriber reading, 20 000 vehicles × 10 heartbeats at once | oldest ≈105 000 lost |
//! | 8 000 idle connections, one heartbeat each | ≈45 KiB RSS per connection |

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format as _, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};
use shared::TopicKind;

use crate::error::{BrokerError, ConfigError};
use crate::listener::Listener;

/// rumqttd's `CommitLog::new` panics on segments smaller than this.
const MIN_SEGMENT_SIZE: usize = 1024;

/// Large enough for any CONNECT/SUBSCRIBE a client (or our own readiness probe) sends.
const MIN_PAYLOAD_SIZE: usize = 128;

/// The largest remaining length MQTT can encode (four length bytes).
const MAX_MQTT_PACKET: usize = 268_435_455;

/// Shortest accepted listener probe interval.
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Most network threads accepted in `io_threads`.
const MAX_IO_THREADS: usize = 1024;

/// Prefix of the environment variables that set configuration keys.
const ENV_PREFIX: &str = "FLEETBEAT_BROKER_";

/// The bridge's default MQTT client id: the default durable consumer.
const DEFAULT_DURABLE_CONSUMER: &str = "fleetbeat-bridge";

/// The journal's default file, relative to the working directory.
const DEFAULT_JOURNAL: &str = "fleetbeat-broker-journal.db";

/// The commented default configuration file, as printed by `broker default-config`. It parses
/// to exactly [`BrokerConfig::default`] (tested).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../default-config.toml");

/// How to run the broker: where it listens, who may connect, how much memory it may hold.
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
///
/// In a configuration file (and as `FLEETBEAT_BROKER_*` variables) the keys are the field
/// names, except `v4` and `v5`, which are `listen` and `listen_v5` there. Durations are written
/// with a unit (`"10s"`, `"250ms"`), absent addresses as `"off"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Address of the MQTT 3.1.1 listener (key `listen`). Port 0 picks a free port on that
    /// interface; read it back with [`Broker::v4_addr`](crate::Broker::v4_addr). Default
    /// `127.0.0.1:1883`.
    #[serde(rename = "listen")]
    pub v4: SocketAddr,

    /// Address of the MQTT 5 listener, or `None` for none (key `listen_v5`, `"off"` for none).
    /// Port 0 as for [`Self::v4`]. Default `Some(127.0.0.1:1884)`: our front end writes every
    /// packet itself and strips MQTT 5 properties towards 3.1.1 clients, so rumqttd's
    /// v5-property panic cannot be triggered (see `docs/broker.md`).
    #[serde(rename = "listen_v5", with = "addr_or_off")]
    pub v5: Option<SocketAddr>,

    /// Address of the MQTT 3.1.1 over TLS listener, or `None` for none (key `listen_tls`,
    /// `"off"` for none). The usual address is `0.0.0.0:8883`. Needs [`Self::tls_cert`] and
    /// [`Self::tls_key`]. Port 0 picks a free port; read it back with
    /// [`Broker::tls_addr`](crate::Broker::tls_addr). Default `None`.
    #[serde(rename = "listen_tls", with = "addr_or_off")]
    pub tls_listen: Option<SocketAddr>,

    /// Address of the MQTT 5 over TLS listener, or `None` (key `listen_tls_v5`). As
    /// [`Self::tls_listen`]; read back with [`Broker::tls_v5_addr`](crate::Broker::tls_v5_addr).
    /// Default `None`.
    #[serde(rename = "listen_tls_v5", with = "addr_or_off")]
    pub tls_listen_v5: Option<SocketAddr>,

    /// The TLS listeners' certificate chain (PEM, the server's certificate first). Required
    /// if a TLS listener is set. Reloaded when it changes (see `docs/broker.md`, TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of [`Self::tls_cert`] (PEM: PKCS#8, PKCS#1 or SEC1). Required if a TLS
    /// listener is set. Reloaded when it changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,

    /// The CA certificates (PEM bundle) that client certificates must be issued by: mutual
    /// TLS, as [`Self::tls_client_certs`] says. A verified client certificate names its vehicle
    /// (subject CN, else its first DNS name), which then needs no password. Default `None`:
    /// no client certificates are asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,

    /// Whether TLS clients must present a certificate issued by [`Self::tls_client_ca`]:
    /// `optional` (the default: one is asked for and verified if sent; a client without one
    /// logs in with a password as on the plain listeners), `required` (the handshake of a
    /// client without a valid one fails) or `off` (none is asked for). Without
    /// `tls_client_ca`, `optional` and `off` ask for none and `required` is an error.
    pub tls_client_certs: ClientCerts,

    /// The credentials file (see [`Credentials`](crate::Credentials)), or `None` for **open
    /// mode**: every client is accepted and may publish and subscribe anywhere; the broker
    /// says so with a WARN at start and `fleetbeat_broker_open_mode 1`. Default `None` (the
    /// local demo).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<PathBuf>,

    /// Whether to republish device traffic as readable JSON on `json/fleet/...` (see
    /// `docs/debugging.md`). Default `true`.
    pub json_mirror: bool,

    /// Where the standalone `broker` binary serves `/metrics`, or `None` (`"off"`) for
    /// nowhere. [`Broker::start`](crate::Broker::start) does not serve HTTP: an embedding
    /// program serves [`BrokerMetrics::render`](crate::BrokerMetrics::render) itself. Default
    /// `127.0.0.1:9883`.
    #[serde(with = "addr_or_off")]
    pub metrics_listen: Option<SocketAddr>,

    /// Most MQTT connections at once; a CONNECT beyond it is refused with CONNACK "server
    /// unavailable". Default 25 000: 20 000 vehicles plus headroom for the bridge, tools and
    /// reconnects. The router reserves a few hundred bytes of (untouched) address space per
    /// slot up front; the real cost is per live connection (see the [module docs](self)). The
    /// broker's internal connections come on top of this number.
    pub max_connections: usize,

    /// Largest MQTT packet accepted from a client, in bytes of remaining length (topic,
    /// properties and payload). A client announcing a bigger packet is disconnected before it
    /// is read, so this also caps one connection's read buffer and one message's share of a
    /// segment. Default 16 KiB: heartbeats are under 100 bytes, this leaves room for growth.
    pub max_payload_size: usize,

    /// Bytes (counted as `4 + topic + payload` per message) after which a filter's commit log
    /// starts a new segment; the log's size is this times [`Self::max_segment_count`]. Default
    /// 64 KiB, ≈900 heartbeats of 73 counted bytes: a slow subscriber loses at most that many
    /// at a time, and a segment never outgrows the 1 024 entries (232 B each) rumqttd reserves
    /// for it (a bigger segment doubles that vector as it fills, and half of the last doubling
    /// is slack). Must be at least 1 KiB (rumqttd panics below) and at least
    /// [`Self::max_payload_size`] so a segment holds a full message.
    pub max_segment_size: usize,

    /// Segments one filter's commit log keeps; the oldest is dropped beyond it. Default 32: a
    /// retention window of 31–32 × 64 KiB = 2 MiB counted per filter, ≈28 000 heartbeats
    /// (≈9 MiB resident when full: 304 B per heartbeat, bookkeeping included), i.e. ≈2.8 s of
    /// 10 000 vehicles at 1 Hz, or 1.4 heartbeats from each of 20 000 vehicles, that a
    /// subscriber may fall behind by without losing any. The bridge reads continuously; a
    /// subscriber that falls further behind loses the oldest segment's messages, ≈900 at a
    /// time (rumqttd logs a WARN "Read cursor start jumped" with both cursors, whose
    /// difference is the count). The same window is what a persistent-session subscriber can
    /// catch up on after being offline. Was 8 × 1 MiB (≈100 000 heartbeats, ≈37 MiB resident).
    pub max_segment_count: usize,

    /// [`Self::max_segment_size`] for the filters of the QoS 1 kinds (`fleet/+/+/status`,
    /// `event`, `ack` and `cmd`, and any filter those match). Default 64 KiB, ≈700 statuses or
    /// events: a segment then never outgrows the 1 024 entries rumqttd reserves for it. These
    /// logs need not be a store: `status`, `event` and `ack` are acknowledged end to end (a
    /// message a lagging consumer's cursor skips is published again, see `docs/broker.md`,
    /// Durability), and commands are read by the broker's own shared link as they come. With
    /// the heartbeats' 8 MiB they grew for hours on reconnects alone (a will and an `online`
    /// each) towards ≈35 MiB apiece, which is what the soak saw as creeping memory.
    pub qos1_segment_size: usize,

    /// [`Self::max_segment_count`] for the filters of the QoS 1 kinds. Default 4: a window of
    /// ≈3 000 messages per kind (≈1.3 MiB resident when full) that the bridge may fall behind
    /// by before a skipped message has to be published again. Without end-to-end
    /// acknowledgement (no [`Self::durable_consumers`], no [`Self::journal`]) nothing publishes
    /// it again: a deployment like that whose subscribers may lag should raise the pair.
    pub qos1_segment_count: usize,

    /// QoS 0 messages the router moves from a commit log into one subscriber's outgoing queue
    /// per scheduling pass. rumqttd pauses a subscriber whose queue reaches 199 entries (its
    /// fixed channel capacity) until the connection task has written it out, so a queue peaks
    /// at ≈199 + this many notifications (248 B each, payloads shared with the log) and the
    /// socket write buffer at one such batch. Default 1000: a subscriber that has fallen behind
    /// catches up five times faster per pause than with rumqttd's example value of 200, which
    /// under a flood let publishers outrun the bridge's subscription until its commit-log
    /// cursor fell off the retained segments (at load ≈2, 5–25 % of a 1 M-message flood lost
    /// with 200, 0–0.6 % with 1000, measured with `broker-bench`, see bench/HISTORY.md);
    /// ≈300 KiB queued for a subscriber that does not keep up. QoS 1 forwards are capped by
    /// rumqttd's fixed in-flight window of 100 instead.
    pub max_outgoing_packet_count: u64,

    /// Packets one connection task parses from its socket buffer in one batch before handing
    /// them to the router. Default 100: bounds a batch to 100 × [`Self::max_payload_size`] in
    /// the worst case, a few KiB for heartbeats. A connection has at most one batch waiting for
    /// the router: it reads its socket no further until the router has taken it, so TCP pushes
    /// back on a client that sends faster than the router routes.
    pub max_inflight_count: usize,

    /// PUBLISH packets per second one client connection may send; beyond that it is throttled:
    /// the broker stops reading its socket until the rate allows the next one, so TCP pushes
    /// back on the client and nothing is lost (QoS 1 included), only delayed. Bursts of up to
    /// this many are let through at once. Counted in `fleetbeat_broker_throttled_total`, logged
    /// (WARN) once per connection. Clients with the `bridge` role and the broker's own links are
    /// exempt. 0 switches the limit off. Default 100: a vehicle sends at most 10 heartbeats a
    /// second, and its whole store-and-forward backlog (64 heartbeats and 32 events) after a
    /// reconnect fits in one burst; a client that floods gets one hundredth of what the router
    /// could take, and cannot slow the other connections down.
    pub max_publish_rate: u32,

    /// SUBSCRIBE packets per second one client connection may send (bursts of as many let
    /// through). Beyond it, every filter of the SUBSCRIBE is refused in the SUBACK (0x80),
    /// counted in `fleetbeat_broker_subscriptions_refused_total{reason="rate"}` and logged;
    /// the connection stays. Each filter costs the router a commit log that it never frees,
    /// so subscribing is not free. The broker's own links are exempt. 0 switches the limit
    /// off. Default 10: a client subscribes once after connecting.
    pub max_subscribe_rate: u32,

    /// Subscription filters one client connection may hold at once; a filter beyond it is
    /// refused in the SUBACK (0x80), counted in
    /// `fleetbeat_broker_subscriptions_refused_total{reason="filters"}` and logged. Counted per
    /// connection: filters a persistent session kept from an earlier connection are not. 0
    /// switches the limit off. Default 100: a vehicle needs 1, the bridge 4.
    pub max_subscriptions: usize,

    /// Client ids that may have a persistent session (clean session / clean start off): every
    /// id that had one since the broker started counts, connected or not, discarded or not.
    /// A CONNECT asking for a persistent session under an id that never had one, beyond this
    /// many, is refused (MQTT 3.1.1 CONNACK 3, MQTT 5 0x97 Quota exceeded), counted in
    /// `fleetbeat_broker_connect_refused_total{reason="sessions_full"}` and logged; clean
    /// sessions, and ids that had one before, are not refused. rumqttd's router keeps a
    /// persistent session (≈1.2 KiB) until a clean session of its id discards it, and then
    /// still the id's last connection events (≈0.7 KiB) for good, even after an MQTT 5
    /// session expired. So without this bound every new id asking for a persistent session would
    /// grow the broker's memory for good; with it, a restart is what frees them. 0 switches
    /// the limit off. Default 25 000, as `max_connections`: a fleet whose devices all keep
    /// persistent sessions fits as many as may connect.
    pub max_persistent_sessions: usize,

    /// Distinct subscription filters clients may make the router keep, all clients together
    /// (the filters of the broker's own links not counted). rumqttd's router gives every new
    /// filter a commit log (≈4 KiB empty, up to `max_segment_count` × `max_segment_size` full)
    /// and never frees one, even once nobody subscribes to it; so a SUBSCRIBE to a filter new
    /// to the router beyond this many is refused for that filter (SUBACK 0x80, MQTT 5 0x97),
    /// counted in `fleetbeat_broker_subscriptions_refused_total{reason="router_filters"}` and
    /// logged; a filter the router keeps already is never refused. Commands subscribed by
    /// devices through the shared link do not count. 0 switches the bound off. Default 1 000:
    /// the bridge needs five, a dispatcher's tool a few.
    pub max_filters: usize,

    /// Most TCP connections, in all, that have not sent their CONNECT yet; a connection
    /// accepted beyond it is closed at once (before a byte is read), counted in
    /// `fleetbeat_broker_connect_refused_total{reason="pending_limit"}`. Default 2 000: a
    /// reconnect storm of 20 000 vehicles over cellular links has a few hundred at a time.
    pub max_pending_connects: usize,

    /// As [`Self::max_pending_connects`], per client IP address. Default 100 (vehicles behind
    /// one carrier NAT share an address).
    pub max_pending_connects_per_ip: usize,

    /// Failed logins (wrong password, unknown user) from one IP address, or for one username,
    /// within [`Self::login_failure_window`] after which further attempts from that address or
    /// for that name are refused before any password is checked (CONNACK "bad user name or
    /// password", counted in `fleetbeat_broker_auth_refused_total{reason="throttled"}`), until
    /// the window has passed. A login whose password was verified before (the cache, see
    /// `docs/broker.md`) still gets in: a vehicle is not locked out by someone failing on its
    /// name. Unknown usernames count per address only. 0 switches throttling off. Default 10.
    pub max_login_failures: u32,

    /// The window of [`Self::max_login_failures`]. Default 60 s.
    #[serde(with = "duration")]
    pub login_failure_window: Duration,

    /// Password checks (argon2) running at once; further logins wait for one to finish. 0 for
    /// one per CPU core. Default 0.
    pub max_password_checks: usize,

    /// Milliseconds the broker waits, after accepting a TCP connection, for its CONNECT packet
    /// before closing it. Each such socket holds a few KiB meanwhile, so this bounds what a
    /// reconnect storm or a port scan pins: accept rate × timeout × buffers. Default 10 000:
    /// generous for a slow cellular link, short enough to shed idle sockets.
    pub connection_timeout_ms: u16,

    /// Longest keep-alive a client may use, in seconds; 0 for no maximum. A connection silent
    /// for one and a half keep-alives is closed, so this bounds how long a half-open
    /// connection (a vehicle that lost its link without a FIN) holds its client id and its
    /// buffers, and how late its last will comes. An MQTT 5 client asking for more, or for 0
    /// ("never time out"), is told this value in its CONNACK (Server Keep Alive, MQTT 5
    /// 3.2.2.3.14) and held to it; an MQTT 3.1.1 client, which cannot be told, is refused
    /// (CONNACK 2, identifier rejected, as mosquitto's `max_keepalive` does), counted in
    /// `fleetbeat_broker_connect_refused_total{reason="keep_alive_too_long"}` and logged.
    /// Default 0: vehicles on cellular links choose long keep-alives to spare their radio.
    pub max_keep_alive_secs: u16,

    /// Milliseconds to pause after each accepted connection, per listener: an accept rate
    /// limit. Default 0: a fleet reconnecting after an outage should get back in as fast as it
    /// can, and [`Self::connection_timeout_ms`] already bounds sockets awaiting CONNECT. Set 1 to
    /// cap accepts at ≈1000/s per listener.
    pub next_connection_delay_ms: u64,

    /// How long [`Broker::start`](crate::Broker::start) waits for every listener to pass its
    /// first end-to-end probe before failing. Default 10 s.
    #[serde(with = "duration")]
    pub startup_timeout: Duration,

    /// How often each listener is probed end to end (TCP connect, CONNECT, PUBLISH, delivery
    /// through the router); a listener that fails is reported dead (metric, ERROR log,
    /// [`Broker::listener_health`](crate::Broker::listener_health)). Default 5 s.
    #[serde(with = "duration")]
    pub probe_interval: Duration,

    /// Upper bound of a graceful shutdown: how long connections get to complete their
    /// in-flight QoS 1 exchanges before they are closed regardless. Default 10 s.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,

    /// Threads of the broker's network runtime; 0 for one per CPU core. Default 0.
    pub io_threads: usize,

    /// Client ids of the **durable consumers**: connections whose PUBACK of a message proves
    /// it durable, because they acknowledge only what they have committed (the bridge does).
    /// Logins with the `bridge` role count as well. While end-to-end acknowledgement is on
    /// (this list is not empty, or [`Self::journal`] is set), a QoS 1 publish on
    /// `fleet/{f}/{v}/event`, `ack` or `status` is acknowledged to its publisher only once it
    /// is durable: once a durable consumer acknowledged it, or (with a journal) once the
    /// journal committed it (see `docs/broker.md`, Durability). Default
    /// `["fleetbeat-bridge"]`, the bridge's default client id; the bridge puts its own client
    /// id here when it embeds the broker. Empty, without a journal: PUBACK once the router has
    /// the message, as rumqttd does.
    pub durable_consumers: Vec<String>,

    /// The broker's journal, a SQLite file, or `None` (`"off"`). With it, a QoS 1 `event`,
    /// `ack` or `status` publish is committed (group commit, fsynced) before its PUBACK, kept
    /// until a durable consumer acknowledged it, and published again to durable consumers
    /// after a restart: what the broker acknowledged survives its own crash. A relative path
    /// is relative to the working directory. Default `Some("fleetbeat-broker-journal.db")`:
    /// the standalone broker journals; the bridge's embedded broker does not (the bridge's
    /// own commit is what acknowledges there), nor does [`BrokerConfig::ephemeral`].
    #[serde(with = "path_or_off")]
    pub journal: Option<PathBuf>,

    /// Most messages the journal holds. When it is full a message is still routed, but its
    /// PUBACK waits for a durable consumer (the publisher keeps it and sends it again after a
    /// reconnect); counted in `fleetbeat_broker_journal_full_total` and logged. Default
    /// 100 000 (≈15 MB on disk at ≈150 bytes a row): what 20 000 vehicles report in a few
    /// minutes of the bridge being away.
    pub journal_max_rows: u64,

    /// Most bytes (topic + payload) the journal holds; as [`Self::journal_max_rows`].
    /// Default 64 MiB.
    pub journal_max_bytes: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        BrokerConfig {
            v4: SocketAddr::new(localhost, 1883),
            v5: Some(SocketAddr::new(localhost, 1884)),
            tls_listen: None,
            tls_listen_v5: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_client_certs: ClientCerts::default(),
            credentials: None,
            json_mirror: true,
            metrics_listen: Some(SocketAddr::new(localhost, 9883)),
            max_connections: 25_000,
            max_payload_size: 16 * 1024,
            max_segment_size: 64 * 1024,
            max_segment_count: 32,
            qos1_segment_size: 64 * 1024,
            qos1_segment_count: 4,
            max_outgoing_packet_count: 1000,
            max_inflight_count: 100,
            max_publish_rate: 100,
            max_subscribe_rate: 10,
            max_subscriptions: 100,
            max_persistent_sessions: 25_000,
            max_filters: 1_000,
            max_pending_connects: 2000,
            max_pending_connects_per_ip: 100,
            max_login_failures: 10,
            login_failure_window: Duration::from_secs(60),
            max_password_checks: 0,
            connection_timeout_ms: 10_000,
            max_keep_alive_secs: 0,
            next_connection_delay_ms: 0,
            startup_timeout: Duration::from_secs(10),
            probe_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            io_threads: 0,
            durable_consumers: vec![DEFAULT_DURABLE_CONSUMER.to_owned()],
            journal: Some(PathBuf::from(DEFAULT_JOURNAL)),
            journal_max_rows: 100_000,
            journal_max_bytes: 64 << 20,
        }
    }
}

impl BrokerConfig {
    /// The defaults, with both listeners (and `metrics_listen`) on `127.0.0.1:0` (a free port
    /// each), without a journal and without durable consumers (a PUBACK once the router has
    /// the message): for tests and for running several brokers in one process.
    pub fn ephemeral() -> Self {
        let any_port = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        BrokerConfig {
            v4: any_port,
            v5: Some(any_port),
            metrics_listen: Some(any_port),
            durable_consumers: Vec::new(),
            journal: None,
            ..BrokerConfig::default()
        }
    }

    /// The listeners to start, v4 first.
    pub(crate) fn listeners(&self) -> impl Iterator<Item = (Listener, SocketAddr)> + use<> {
        std::iter::once((Listener::V4, self.v4)).chain(self.v5.map(|addr| (Listener::V5, addr)))
    }

    /// The TLS listeners to start, v4 first.
    pub(crate) fn tls_listeners(&self) -> impl Iterator<Item = (Listener, SocketAddr)> + use<> {
        self.tls_listen
            .map(|addr| (Listener::V4, addr))
            .into_iter()
            .chain(self.tls_listen_v5.map(|addr| (Listener::V5, addr)))
    }

    /// Checks the values rumqttd would panic on, or that would make the broker useless.
    /// [`Broker::start`](crate::Broker::start) and [`load`] call it.
    ///
    /// # Errors
    ///
    /// [`BrokerError::InvalidConfig`] naming the first offending key (as written in a
    /// configuration file) and the problem.
    pub fn validate(&self) -> Result<(), BrokerError> {
        fn invalid(field: &'static str, reason: String) -> Result<(), BrokerError> {
            Err(BrokerError::InvalidConfig { field, reason })
        }
        let clash = |a: SocketAddr, b: SocketAddr| a == b && a.port() != 0;

        if let Some(v5) = self.v5
            && clash(v5, self.v4)
        {
            return invalid("listen_v5", format!("must differ from listen ({v5})"));
        }
        if let Some(metrics) = self.metrics_listen
            && (clash(metrics, self.v4) || self.v5.is_some_and(|v5| clash(metrics, v5)))
        {
            return invalid(
                "metrics_listen",
                format!("must differ from the MQTT listeners ({metrics})"),
            );
        }
        self.validate_tls()?;
        if let Some(path) = &self.credentials
            && path.as_os_str().is_empty()
        {
            return invalid(
                "credentials",
                "must not be empty; leave the key out for open mode".to_owned(),
            );
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
        if self.qos1_segment_size < MIN_SEGMENT_SIZE.max(self.max_payload_size) {
            return invalid(
                "qos1_segment_size",
                format!(
                    "is {}, must be at least {MIN_SEGMENT_SIZE} bytes and at least \
                     max_payload_size ({})",
                    self.qos1_segment_size, self.max_payload_size
                ),
            );
        }
        if self.qos1_segment_count == 0 {
            return invalid("qos1_segment_count", "must be at least 1".to_owned());
        }
        if self.max_outgoing_packet_count == 0 {
            return invalid("max_outgoing_packet_count", "must be at least 1".to_owned());
        }
        if self.max_inflight_count == 0 {
            return invalid("max_inflight_count", "must be at least 1".to_owned());
        }
        if self.max_pending_connects == 0 {
            return invalid("max_pending_connects", "must be at least 1".to_owned());
        }
        if self.max_pending_connects_per_ip == 0 {
            return invalid(
                "max_pending_connects_per_ip",
                "must be at least 1".to_owned(),
            );
        }
        if self.max_login_failures > 0 && self.login_failure_window.is_zero() {
            return invalid(
                "login_failure_window",
                "must not be zero while max_login_failures is set".to_owned(),
            );
        }
        if self.connection_timeout_ms == 0 {
            return invalid("connection_timeout_ms", "must be at least 1".to_owned());
        }
        if self.startup_timeout.is_zero() {
            return invalid("startup_timeout", "must not be zero".to_owned());
        }
        if self.probe_interval < MIN_PROBE_INTERVAL {
            return invalid(
                "probe_interval",
                format!(
                    "is {}, must be at least {}",
                    duration::format(self.probe_interval),
                    duration::format(MIN_PROBE_INTERVAL)
                ),
            );
        }
        if self.shutdown_grace.is_zero() {
            return invalid("shutdown_grace", "must not be zero".to_owned());
        }
        if self.io_threads > MAX_IO_THREADS {
            return invalid(
                "io_threads",
                format!("is {}, must be at most {MAX_IO_THREADS}", self.io_threads),
            );
        }
        if self.durable_consumers.iter().any(String::is_empty) {
            return invalid(
                "durable_consumers",
                "must not list an empty client id".to_owned(),
            );
        }
        if let Some(path) = &self.journal
            && path.as_os_str().is_empty()
        {
            return invalid(
                "journal",
                "must not be empty; \"off\" for no journal".to_owned(),
            );
        }
        if self.journal_max_rows == 0 {
            return invalid("journal_max_rows", "must be at least 1".to_owned());
        }
        if self.journal_max_bytes < self.max_payload_size as u64 {
            return invalid(
                "journal_max_bytes",
                format!(
                    "is {}, must be at least max_payload_size ({})",
                    self.journal_max_bytes, self.max_payload_size
                ),
            );
        }
        Ok(())
    }

    /// The TLS keys: files set when a TLS listener is, addresses distinct from the others.
    fn validate_tls(&self) -> Result<(), BrokerError> {
        fn invalid(field: &'static str, reason: String) -> Result<(), BrokerError> {
            Err(BrokerError::InvalidConfig { field, reason })
        }
        let clash = |a: SocketAddr, b: SocketAddr| a == b && a.port() != 0;
        let plain: Vec<SocketAddr> = self
            .listeners()
            .map(|(_, addr)| addr)
            .chain(self.metrics_listen)
            .collect();
        for (field, addr) in [
            ("listen_tls", self.tls_listen),
            ("listen_tls_v5", self.tls_listen_v5),
        ] {
            if let Some(addr) = addr
                && plain.iter().any(|other| clash(addr, *other))
            {
                return invalid(
                    field,
                    format!("must differ from the other listeners ({addr})"),
                );
            }
        }
        if let (Some(a), Some(b)) = (self.tls_listen, self.tls_listen_v5)
            && clash(a, b)
        {
            return invalid(
                "listen_tls_v5",
                format!("must differ from listen_tls ({b})"),
            );
        }
        for (field, path) in [
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("tls_client_ca", &self.tls_client_ca),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return invalid(field, "must not be empty".to_owned());
            }
        }
        if self.tls_listen.is_some() || self.tls_listen_v5.is_some() {
            if self.tls_cert.is_none() {
                return invalid(
                    "tls_cert",
                    "must be set (a PEM certificate chain) when listen_tls or listen_tls_v5 is"
                        .to_owned(),
                );
            }
            if self.tls_key.is_none() {
                return invalid(
                    "tls_key",
                    "must be set (a PEM private key) when listen_tls or listen_tls_v5 is"
                        .to_owned(),
                );
            }
        }
        if self.tls_client_certs == ClientCerts::Required && self.tls_client_ca.is_none() {
            return invalid(
                "tls_client_certs",
                "is \"required\", which needs tls_client_ca (the CA of client certificates)"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// Threads for the network runtime: [`Self::io_threads`], or one per core (at least 2, so
    /// a blocked thread never stalls every connection).
    pub(crate) fn network_threads(&self) -> usize {
        match self.io_threads {
            0 => std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .max(2),
            n => n,
        }
    }

    /// The segment configuration of the QoS 1 kinds' filters, keyed by filter: rumqttd gives
    /// it to every filter these match when it creates the filter's commit log.
    fn qos1_segments(&self) -> HashMap<String, rumqttd::SegmentConfig> {
        TopicKind::ALL
            .into_iter()
            .filter(|kind| kind.qos() == 1)
            .map(|kind| {
                let segment = rumqttd::SegmentConfig {
                    max_segment_size: self.qos1_segment_size,
                    max_segment_count: self.qos1_segment_count,
                };
                (kind.filter().to_owned(), segment)
            })
            .collect()
    }

    /// rumqttd's router configuration for this one; `internal` connection slots are added for
    /// the broker's own links (probe, wills, mirror).
    pub(crate) fn router_config(&self, internal: usize) -> rumqttd::RouterConfig {
        rumqttd::RouterConfig {
            max_connections: self.max_connections.saturating_add(internal),
            max_outgoing_packet_count: self.max_outgoing_packet_count,
            max_segment_size: self.max_segment_size,
            max_segment_count: self.max_segment_count,
            custom_segment: Some(self.qos1_segments()),
            initialized_filters: None,
            shared_subscriptions_strategy: rumqttd::Strategy::default(),
        }
    }
}

/// Whether TLS clients present a certificate ([`BrokerConfig::tls_client_certs`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientCerts {
    /// None is asked for: every TLS client logs in with a password (or, in open mode, not).
    Off,
    /// One is asked for and, if sent, must be valid (issued by `tls_client_ca`); it then names
    /// the vehicle. A client without one logs in with a password.
    #[default]
    Optional,
    /// Every TLS client must present a valid one: the handshake fails without it.
    Required,
}

/// Command-line overrides of configuration keys, the last layer of [`load`]: each one given
/// replaces what the file and the environment said. Flatten it into a binary's clap parser.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, clap::Args)]
pub struct ConfigOverrides {
    /// Address of the MQTT 3.1.1 listener [key: listen].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Address of the MQTT 5 listener, or "off" [key: listen_v5].
    #[arg(long, value_name = "ADDR|off")]
    pub listen_v5: Option<String>,

    /// Run without the MQTT 5 listener: the same as `--listen-v5 off`.
    #[arg(long, conflicts_with = "listen_v5")]
    #[serde(skip)]
    pub no_v5: bool,

    /// Address of the MQTT 3.1.1 over TLS listener (usually 0.0.0.0:8883), or "off"
    /// [key: listen_tls].
    #[arg(long, value_name = "ADDR|off")]
    pub listen_tls: Option<String>,

    /// Address of the MQTT 5 over TLS listener, or "off" [key: listen_tls_v5].
    #[arg(long, value_name = "ADDR|off")]
    pub listen_tls_v5: Option<String>,

    /// The TLS listeners' certificate chain, PEM [key: tls_cert].
    #[arg(long, value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,

    /// The TLS listeners' private key, PEM [key: tls_key].
    #[arg(long, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) of client certificates: mutual TLS [key: tls_client_ca].
    #[arg(long, value_name = "PATH")]
    pub tls_client_ca: Option<PathBuf>,

    /// Whether TLS clients must present a certificate [key: tls_client_certs].
    #[arg(long, value_enum, value_name = "off|optional|required")]
    pub tls_client_certs: Option<ClientCerts>,

    /// The credentials file; without one the broker runs in open mode [key: credentials].
    #[arg(long, value_name = "PATH")]
    pub credentials: Option<PathBuf>,

    /// Publish the readable JSON mirror on json/fleet/... [key: json_mirror].
    #[arg(long, value_name = "BOOL")]
    pub json_mirror: Option<bool>,

    /// Where to serve /metrics over HTTP, or "off" [key: metrics_listen].
    #[arg(long, value_name = "ADDR|off")]
    pub metrics_listen: Option<String>,

    /// Most MQTT connections at once [key: max_connections].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Largest MQTT packet accepted, in bytes [key: max_payload_size].
    #[arg(long, value_name = "BYTES")]
    pub max_payload_size: Option<usize>,

    /// Bytes per commit-log segment [key: max_segment_size].
    #[arg(long, value_name = "BYTES")]
    pub max_segment_size: Option<usize>,

    /// Segments per subscription filter's commit log [key: max_segment_count].
    #[arg(long, value_name = "N")]
    pub max_segment_count: Option<usize>,

    /// PUBLISHes per second per client connection, 0 for no limit [key: max_publish_rate].
    #[arg(long, value_name = "N")]
    pub max_publish_rate: Option<u32>,

    /// SUBSCRIBE packets per second per client connection, 0 for no limit
    /// [key: max_subscribe_rate].
    #[arg(long, value_name = "N")]
    pub max_subscribe_rate: Option<u32>,

    /// Subscription filters per client connection, 0 for no limit [key: max_subscriptions].
    #[arg(long, value_name = "N")]
    pub max_subscriptions: Option<usize>,

    /// Persistent sessions kept, connected or not, 0 for no limit
    /// [key: max_persistent_sessions].
    #[arg(long, value_name = "N")]
    pub max_persistent_sessions: Option<usize>,

    /// Distinct subscription filters clients may make the router keep, 0 for no bound
    /// [key: max_filters].
    #[arg(long, value_name = "N")]
    pub max_filters: Option<usize>,

    /// Connections that have not sent CONNECT yet, in all [key: max_pending_connects].
    #[arg(long, value_name = "N")]
    pub max_pending_connects: Option<usize>,

    /// Connections that have not sent CONNECT yet, per IP address
    /// [key: max_pending_connects_per_ip].
    #[arg(long, value_name = "N")]
    pub max_pending_connects_per_ip: Option<usize>,

    /// Failed logins per IP address and per username within the window before further
    /// attempts are refused unchecked, 0 for no throttling [key: max_login_failures].
    #[arg(long, value_name = "N")]
    pub max_login_failures: Option<u32>,

    /// The window of max_login_failures, e.g. "60s" [key: login_failure_window].
    #[arg(long, value_name = "DURATION")]
    pub login_failure_window: Option<String>,

    /// Password checks (argon2) at once, 0 for one per core [key: max_password_checks].
    #[arg(long, value_name = "N")]
    pub max_password_checks: Option<usize>,

    /// Longest keep-alive a client may use, in seconds, 0 for no maximum
    /// [key: max_keep_alive_secs].
    #[arg(long, value_name = "SECONDS")]
    pub max_keep_alive_secs: Option<u16>,

    /// Bound of a graceful shutdown, e.g. "10s" [key: shutdown_grace].
    #[arg(long, value_name = "DURATION")]
    pub shutdown_grace: Option<String>,

    /// Threads of the network runtime, 0 for one per core [key: io_threads].
    #[arg(long, value_name = "N")]
    pub io_threads: Option<usize>,

    /// The journal (a SQLite file), or "off" [key: journal].
    #[arg(long, value_name = "PATH|off")]
    pub journal: Option<String>,
}

/// The command-line layer as a figment provider, so errors say "command line".
struct CommandLine<'a>(&'a ConfigOverrides);

impl Provider for CommandLine<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::named("command line")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut data = if self.0.no_v5 {
            let overrides = ConfigOverrides {
                listen_v5: Some("off".to_owned()),
                ..self.0.clone()
            };
            Serialized::defaults(overrides).data()?
        } else {
            Serialized::defaults(self.0).data()?
        };
        // Only the flags given override: the others serialize as empty values, left out.
        for keys in data.values_mut() {
            keys.retain(|_, value| !matches!(value, Value::Empty(..)));
        }
        Ok(data)
    }
}

/// Loads the configuration in layers: defaults, then the TOML file at `file` (if given), then
/// `FLEETBEAT_BROKER_*` environment variables, then `overrides`; and validates the result.
///
/// # Errors
///
/// - [`ConfigError::File`] if `file` cannot be read;
/// - [`ConfigError::Layer`] for invalid TOML, an unknown key, or a value of the wrong type,
///   naming the key and where the value came from;
/// - [`ConfigError::Invalid`] if the combined values fail [`BrokerConfig::validate`].
pub fn load(file: Option<&Path>, overrides: &ConfigOverrides) -> Result<BrokerConfig, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(BrokerConfig::default()));
    if let Some(path) = file {
        std::fs::metadata(path).map_err(|source| ConfigError::File {
            path: path.to_owned(),
            source,
        })?;
        figment = figment.merge(Toml::file_exact(path));
    }
    let config: BrokerConfig = figment
        .merge(Env::prefixed(ENV_PREFIX))
        .merge(CommandLine(overrides))
        .extract()
        .map_err(layer_error)?;
    config.validate().map_err(|err| match err {
        BrokerError::InvalidConfig { field, reason } => ConfigError::Invalid { field, reason },
        other => ConfigError::Invalid {
            field: "?",
            reason: other.to_string(),
        },
    })?;
    Ok(config)
}

/// Turns figment's error (the first of possibly several) into one that names the key and the
/// layer it came from, in the words of the configuration file.
fn layer_error(err: figment::Error) -> ConfigError {
    let key = (!err.path.is_empty()).then(|| err.path.join("."));
    let origin = err.metadata.as_ref().map(|metadata| {
        let profile = err.profile.clone().unwrap_or_default();
        match &metadata.source {
            Some(figment::Source::File(path)) => format!("file {}", path.display()),
            // figment names the variable without its prefix.
            _ if metadata.name.contains("environment") => format!(
                "environment variable {ENV_PREFIX}{}",
                metadata.interpolate(&profile, &err.path)
            ),
            _ => metadata.name.to_string(),
        }
    });
    ConfigError::Layer {
        key,
        origin,
        message: err.kind.to_string(),
    }
}

/// `Option<SocketAddr>` as `"host:port"` or `"off"`.
mod addr_or_off {
    use std::net::SocketAddr;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        addr: &Option<SocketAddr>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => serializer.collect_str(addr),
            None => serializer.serialize_str("off"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.trim() {
            "off" => Ok(None),
            addr => addr.parse().map(Some).map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{text}` is not an address like 127.0.0.1:1884, nor \"off\""
                ))
            }),
        }
    }
}

/// `Option<PathBuf>` as a path or `"off"`.
mod path_or_off {
    use std::path::PathBuf;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        path: &Option<PathBuf>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match path {
            Some(path) => serializer.collect_str(&path.display()),
            None => serializer.serialize_str("off"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<PathBuf>, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.trim() {
            "off" => Ok(None),
            _ => Ok(Some(PathBuf::from(text))),
        }
    }
}

/// `Duration` as a string with a unit: `"250ms"`, `"10s"`, `"5m"`, `"1h"`.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    /// The shortest exact form: `"10s"`, `"1500ms"`.
    pub(crate) fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if ms.is_multiple_of(1000) && ms > 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }

    /// Parses `<integer><unit>` with unit `ms`, `s`, `m` or `h`.
    pub(crate) fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let expected =
            || format!("`{text}` is not a duration with a unit, like \"10s\", \"250ms\" or \"2m\"");
        let n: u64 = number.parse().map_err(|_| expected())?;
        match unit {
            "ms" => Ok(Duration::from_millis(n)),
            "s" => Ok(Duration::from_secs(n)),
            "m" => n
                .checked_mul(60)
                .map(Duration::from_secs)
                .ok_or_else(expected),
            "h" => n
                .checked_mul(3600)
                .map(Duration::from_secs)
                .ok_or_else(expected),
            _ => Err(expected()),
        }
    }

    pub(super) fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
