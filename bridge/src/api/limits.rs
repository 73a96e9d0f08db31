//! Socket.IO abuse limits: what one client may cost everyone else.
//!
//! Each limit is configurable (`[socketio]` in the configuration file, `FLEETBEAT_SOCKETIO_*`,
//! `--socketio-*`; see [`SocketIoSettings`]), and each refusal is logged where it happens and
//! counted in `/metrics` as `fleetbeat_bridge_socketio_refused_total{limit="..."}`:
//!
//! - `connections_per_token`: Socket.IO connections open at once with one token (its name),
//!   over every namespace; one more is refused in the handshake.
//! - `joins_per_second`: `join`s per socket (a token bucket: a burst of that many, then that
//!   many a second); each join builds a snapshot under the fleet lock.
//! - `rooms_per_socket`: rooms a `/dispatch` socket may be in at once (even a `*` dispatcher
//!   cannot join unlimited `vehicle:` rooms).
//! - `get_all_page`: the largest page `getAll` (and the re-send on connect) reads and sends.
//! - `allowed_origins`: the `Origin`s whose browsers may open Socket.IO (polling or WebSocket);
//!   empty means the page's own origin (the `Host` the request was sent to). A request
//!   without `Origin` (not a browser) is let through: browsers always send it.
//! - `buffer_bytes`, `max_packet_bytes` and `buffer_packets`: what a socket may have waiting to
//!   be written. socketioxide (0.18) keeps that buffer as a channel of packets and tells nobody
//!   when a packet leaves, so its bytes cannot be counted as they come and go; instead no packet
//!   the bridge writes is larger than `max_packet_bytes` (batches and snapshots are split,
//!   `view::emit::packed`), and the channel holds at most `buffer_bytes / max_packet_bytes`
//!   packets (and at most `buffer_packets`): a socket's waiting bytes never pass
//!   `buffer_bytes`. One queued message or answer is never split; each is far smaller than a
//!   packet (an MQTT event payload is at most a few hundred bytes).
//! - `max_payload_bytes`: the bytes of one incoming message (HTTP request or WebSocket
//!   message).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::Deserialize;

/// The Socket.IO limits as the configuration layers give them (`[socketio]` in the file,
/// `FLEETBEAT_SOCKETIO_*` in the environment, `--socketio-*` flags); unset fields keep the
/// defaults of [`SocketIoLimits`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct SocketIoSettings {
    /// Socket.IO: joins per second per socket (a burst of as many).
    #[arg(
        long = "socketio-joins-per-second",
        env = "FLEETBEAT_SOCKETIO_JOINS_PER_SECOND"
    )]
    pub joins_per_second: Option<u32>,
    /// Socket.IO: rooms a /dispatch socket may be in at once.
    #[arg(
        long = "socketio-rooms-per-socket",
        env = "FLEETBEAT_SOCKETIO_ROOMS_PER_SOCKET"
    )]
    pub rooms_per_socket: Option<u32>,
    /// Socket.IO: the largest page of queued messages getAll sends.
    #[arg(
        long = "socketio-get-all-page",
        env = "FLEETBEAT_SOCKETIO_GET_ALL_PAGE"
    )]
    pub get_all_page: Option<u32>,
    /// Socket.IO: connections open at once with one token.
    #[arg(
        long = "socketio-connections-per-token",
        env = "FLEETBEAT_SOCKETIO_CONNECTIONS_PER_TOKEN"
    )]
    pub connections_per_token: Option<u32>,
    /// Socket.IO: packets a socket may have waiting to be written.
    #[arg(
        long = "socketio-buffer-packets",
        env = "FLEETBEAT_SOCKETIO_BUFFER_PACKETS"
    )]
    pub buffer_packets: Option<u32>,
    /// Socket.IO: the bytes a socket may have waiting to be written.
    #[arg(
        long = "socketio-buffer-bytes",
        env = "FLEETBEAT_SOCKETIO_BUFFER_BYTES"
    )]
    pub buffer_bytes: Option<u64>,
    /// Socket.IO: the largest packet the bridge writes (larger batches are split), bytes.
    #[arg(
        long = "socketio-max-packet-bytes",
        env = "FLEETBEAT_SOCKETIO_MAX_PACKET_BYTES"
    )]
    pub max_packet_bytes: Option<u32>,
    /// Socket.IO: the largest incoming message (HTTP request or WebSocket message), bytes.
    #[arg(
        long = "socketio-max-payload-bytes",
        env = "FLEETBEAT_SOCKETIO_MAX_PAYLOAD_BYTES"
    )]
    pub max_payload_bytes: Option<u64>,
    /// Socket.IO: the browser origins allowed (comma-separated); unset: the page's own.
    #[arg(
        long = "socketio-allowed-origins",
        env = "FLEETBEAT_SOCKETIO_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Option<Vec<String>>,
}

/// The Socket.IO limits in force (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketIoLimits {
    /// `join`s per second per socket, and the burst allowed.
    pub joins_per_second: u32,
    /// Rooms a `/dispatch` socket may be in at once.
    pub rooms_per_socket: u32,
    /// The largest page of queued messages `getAll` (and the re-send on connect) sends.
    pub get_all_page: u32,
    /// Connections open at once with one token.
    pub connections_per_token: u32,
    /// Packets a socket may have waiting to be written: the configured `buffer_packets`, or
    /// fewer so that `buffer_packets × max_packet_bytes ≤ buffer_bytes`.
    pub buffer_packets: u32,
    /// Bytes a socket may have waiting to be written.
    pub buffer_bytes: u64,
    /// The largest packet the bridge writes to a socket, in bytes.
    pub max_packet_bytes: u32,
    /// The largest incoming message, in bytes.
    pub max_payload_bytes: u64,
    /// Browser origins allowed, as `scheme://host[:port]`; empty: the page's own origin.
    pub allowed_origins: Vec<String>,
}

impl Default for SocketIoLimits {
    fn default() -> Self {
        Self {
            joins_per_second: 20,
            rooms_per_socket: 100,
            get_all_page: 100,
            connections_per_token: 100,
            // A `/dispatch` socket gets at most two batches per tick (10 ms by default): seconds
            // of slack for a slow client; the deliveries and acks of a busy vendor fit as well.
            buffer_packets: 1024,
            // 1024 packets of at most 64 KiB: the same slack in packets as before, now also a
            // bound in bytes. A 64 KiB packet holds ~500 positions or vehicle states.
            buffer_bytes: 64 * 1024 * 1024,
            max_packet_bytes: 64 * 1024,
            max_payload_bytes: 100_000,
            allowed_origins: Vec::new(),
        }
    }
}

impl SocketIoSettings {
    /// `self` with every field `over` sets replaced.
    #[must_use]
    pub fn overridden_by(self, over: Self) -> Self {
        Self {
            joins_per_second: over.joins_per_second.or(self.joins_per_second),
            rooms_per_socket: over.rooms_per_socket.or(self.rooms_per_socket),
            get_all_page: over.get_all_page.or(self.get_all_page),
            connections_per_token: over.connections_per_token.or(self.connections_per_token),
            buffer_packets: over.buffer_packets.or(self.buffer_packets),
            buffer_bytes: over.buffer_bytes.or(self.buffer_bytes),
            max_packet_bytes: over.max_packet_bytes.or(self.max_packet_bytes),
            max_payload_bytes: over.max_payload_bytes.or(self.max_payload_bytes),
            allowed_origins: over.allowed_origins.or(self.allowed_origins),
        }
    }

    /// Validates the settings into the limits in force.
    ///
    /// # Errors
    /// A message naming the key and the problem.
    pub fn into_limits(self) -> Result<SocketIoLimits, String> {
        let d = SocketIoLimits::default();
        let within = |key: &str, value: u32, range: std::ops::RangeInclusive<u32>| {
            if range.contains(&value) {
                Ok(value)
            } else {
                Err(format!(
                    "{key}: must be within {} ..= {}",
                    range.start(),
                    range.end()
                ))
            }
        };
        let max_payload_bytes = self.max_payload_bytes.unwrap_or(d.max_payload_bytes);
        if !(1_000..=100_000_000).contains(&max_payload_bytes) {
            return Err("max_payload_bytes: must be within 1000 ..= 100000000".into());
        }
        let max_packet_bytes = within(
            "max_packet_bytes",
            self.max_packet_bytes.unwrap_or(d.max_packet_bytes),
            4_096..=16_777_216,
        )?;
        let buffer_bytes = self.buffer_bytes.unwrap_or(d.buffer_bytes);
        let fits = buffer_bytes / u64::from(max_packet_bytes);
        if fits < 16 {
            return Err(format!(
                "buffer_bytes: must hold at least 16 packets of max_packet_bytes ({max_packet_bytes}), i.e. at least {}",
                16 * u64::from(max_packet_bytes)
            ));
        }
        let buffer_packets = within(
            "buffer_packets",
            self.buffer_packets.unwrap_or(d.buffer_packets),
            16..=1_000_000,
        )?
        .min(u32::try_from(fits).unwrap_or(u32::MAX));
        let allowed_origins = self
            .allowed_origins
            .unwrap_or_default()
            .iter()
            .filter(|o| !o.trim().is_empty())
            .map(|o| {
                normalized_origin(o.trim())
                    .ok_or_else(|| format!("allowed_origins: {o:?} is not scheme://host[:port]"))
            })
            .collect::<Result<_, _>>()?;
        Ok(SocketIoLimits {
            joins_per_second: within(
                "joins_per_second",
                self.joins_per_second.unwrap_or(d.joins_per_second),
                1..=10_000,
            )?,
            rooms_per_socket: within(
                "rooms_per_socket",
                self.rooms_per_socket.unwrap_or(d.rooms_per_socket),
                1..=100_000,
            )?,
            get_all_page: within(
                "get_all_page",
                self.get_all_page.unwrap_or(d.get_all_page),
                1..=10_000,
            )?,
            connections_per_token: within(
                "connections_per_token",
                self.connections_per_token
                    .unwrap_or(d.connections_per_token),
                1..=1_000_000,
            )?,
            buffer_packets,
            buffer_bytes,
            max_packet_bytes,
            max_payload_bytes,
            allowed_origins,
        })
    }
}

/// An origin as browsers send it, `scheme://host[:port]` (lowercase, no default port, no
/// path), or `None` if `raw` is not one.
fn normalized_origin(raw: &str) -> Option<String> {
    let url = url::Url::parse(raw).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return None;
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || !url.username().is_empty() {
        return None;
    }
    Some(url.origin().ascii_serialization())
}

/// A limit a client ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// Too many connections with one token.
    Connections,
    /// Too many joins per second on one socket.
    JoinRate,
    /// Too many rooms on one socket.
    Rooms,
    /// A browser of another origin.
    Origin,
}

impl Limit {
    const ALL: [Self; 4] = [Self::Connections, Self::JoinRate, Self::Rooms, Self::Origin];

    /// The `limit` label of the refusal counter.
    fn label(self) -> &'static str {
        match self {
            Self::Connections => "connections_per_token",
            Self::JoinRate => "joins_per_second",
            Self::Rooms => "rooms_per_socket",
            Self::Origin => "origin",
        }
    }
}

/// A connection counted against its token; give it back with [`SocketGuard::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ticket(String);

/// The limits in force, the connections open per token and the refusals counted. Shared by
/// every socket and the HTTP layer.
#[derive(Debug)]
pub(crate) struct SocketGuard {
    limits: SocketIoLimits,
    connections: Mutex<HashMap<String, u32>>,
    refused: [AtomicU64; Limit::ALL.len()],
}

impl SocketGuard {
    /// A guard enforcing `limits`.
    pub(crate) fn new(limits: SocketIoLimits) -> Self {
        Self {
            limits,
            connections: Mutex::new(HashMap::new()),
            refused: Default::default(),
        }
    }

    /// The limits in force.
    pub(crate) fn limits(&self) -> &SocketIoLimits {
        &self.limits
    }

    /// Counts a refusal because of `limit`.
    pub(crate) fn refused(&self, limit: Limit) {
        self.refused[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one more connection of the token named `who`, unless it has
    /// `connections_per_token` open already (then the refusal is counted and `Err` holds the
    /// limit).
    pub(crate) fn admit(&self, who: &str) -> Result<Ticket, u32> {
        let max = self.limits.connections_per_token;
        let mut open = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(who.to_owned()).or_default();
        if *count >= max {
            drop(open);
            self.refused(Limit::Connections);
            return Err(max);
        }
        *count += 1;
        Ok(Ticket(who.to_owned()))
    }

    /// Gives back a connection counted by [`Self::admit`].
    pub(crate) fn release(&self, ticket: &Ticket) {
        let mut open = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&ticket.0) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&ticket.0);
            }
        }
    }

    /// A fresh join budget for one socket.
    pub(crate) fn join_budget(&self) -> JoinBudget {
        JoinBudget(Arc::new(Mutex::new(Bucket {
            tokens: f64::from(self.limits.joins_per_second),
            at: Instant::now(),
        })))
    }

    /// Whether a browser request with `Origin: origin`, sent to `Host: host`, may open
    /// Socket.IO: its origin is in `allowed_origins`, or (with none listed) it is the page's
    /// own origin, the host the request was sent to.
    pub(crate) fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let Some(origin) = normalized_origin(origin) else {
            return false;
        };
        if !self.limits.allowed_origins.is_empty() {
            return self.limits.allowed_origins.contains(&origin);
        }
        let Some(host) = host else {
            return false;
        };
        // The origin's authority, without its scheme (and without a default port, already).
        let authority = origin.split_once("://").map_or("", |(_, a)| a);
        let scheme = origin.split_once("://").map_or("", |(s, _)| s);
        let default_port = if scheme == "https" { ":443" } else { ":80" };
        let host = host.to_ascii_lowercase();
        let host = host.strip_suffix(default_port).unwrap_or(&host);
        authority == host
    }

    /// Renders the refusal counter in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP fleetbeat_bridge_socketio_refused_total Socket.IO requests refused by an abuse limit, by limit."
        );
        let _ = writeln!(
            out,
            "# TYPE fleetbeat_bridge_socketio_refused_total counter"
        );
        for limit in Limit::ALL {
            let _ = writeln!(
                out,
                "fleetbeat_bridge_socketio_refused_total{{limit=\"{}\"}} {}",
                limit.label(),
                self.refused[limit as usize].load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// The join budget of one socket: a token bucket of `joins_per_second`, refilled at that rate.
#[derive(Debug, Clone)]
pub(crate) struct JoinBudget(Arc<Mutex<Bucket>>);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl JoinBudget {
    /// Takes one join from the budget at `now`, if there is one; `rate` is joins per second.
    pub(crate) fn take(&self, rate: u32, now: Instant) -> bool {
        let mut bucket = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let rate = f64::from(rate);
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn buffer_bytes_caps_the_packets() {
        let limits = super::SocketIoSettings::default()
            .into_limits()
            .expect("defaults");
        assert_eq!(limits.buffer_packets, 1024);
        assert!(
            u64::from(limits.buffer_packets) * u64::from(limits.max_packet_bytes)
                <= limits.buffer_bytes
        );
        let tight = super::SocketIoSettings {
            buffer_bytes: Some(1024 * 1024),
            max_packet_bytes: Some(16 * 1024),
            ..super::SocketIoSettings::default()
        };
        let limits = tight.into_limits().expect("valid");
        assert_eq!(limits.buffer_packets, 64, "1 MiB of 16 KiB packets");
        let too_small = super::SocketIoSettings {
            buffer_bytes: Some(64 * 1024),
            max_packet_bytes: Some(16 * 1024),
            ..super::SocketIoSettings::default()
        };
        let err = too_small.into_limits().expect_err("4 packets");
        assert!(err.starts_with("buffer_bytes:"), "{err}");
        let tiny_packet = super::SocketIoSettings {
            max_packet_bytes: Some(100),
            ..super::SocketIoSettings::default()
        };
        assert!(
            tiny_packet
                .into_limits()
                .expect_err("too small")
                .starts_with("max_packet_bytes:")
        );
    }

    use std::time::Duration;

    use super::*;

    fn guard(origins: &[&str]) -> SocketGuard {
        let settings = SocketIoSettings {
            connections_per_token: Some(2),
            allowed_origins: Some(origins.iter().map(|o| (*o).to_owned()).collect()),
            ..SocketIoSettings::default()
        };
        SocketGuard::new(settings.into_limits().expect("valid"))
    }

    #[test]
    fn defaults_are_valid_and_bad_values_name_the_key() {
        assert_eq!(
            SocketIoSettings::default().into_limits(),
            Ok(SocketIoLimits::default())
        );
        let bad = SocketIoSettings {
            rooms_per_socket: Some(0),
            ..SocketIoSettings::default()
        };
        assert!(
            bad.into_limits()
                .is_err_and(|e| e.contains("rooms_per_socket"))
        );
        let bad = SocketIoSettings {
            allowed_origins: Some(vec!["example.com".into()]),
            ..SocketIoSettings::default()
        };
        assert!(
            bad.into_limits()
                .is_err_and(|e| e.contains("allowed_origins"))
        );
        let layered = SocketIoSettings {
            joins_per_second: Some(5),
            ..SocketIoSettings::default()
        }
        .overridden_by(SocketIoSettings {
            get_all_page: Some(7),
            ..SocketIoSettings::default()
        });
        let limits = layered.into_limits().expect("valid");
        assert_eq!((limits.joins_per_second, limits.get_all_page), (5, 7));
    }

    #[test]
    fn connections_per_token_are_counted_and_given_back() {
        let g = guard(&[]);
        let a = g.admit("ops").expect("first");
        let _b = g.admit("ops").expect("second");
        assert_eq!(g.admit("ops"), Err(2));
        assert!(g.admit("other").is_ok(), "per token");
        g.release(&a);
        assert!(g.admit("ops").is_ok(), "a slot was given back");
        assert!(g.render().contains("{limit=\"connections_per_token\"} 1\n"));
    }

    #[test]
    fn join_budget_refills_at_its_rate() {
        let g = guard(&[]);
        let budget = g.join_budget();
        let start = Instant::now();
        let rate = 3;
        let taken = (0..10).filter(|_| budget.take(rate, start)).count();
        assert_eq!(taken, 3, "a burst of the rate");
        assert!(budget.take(rate, start + Duration::from_millis(400)));
        assert!(!budget.take(rate, start + Duration::from_millis(400)));
    }

    #[test]
    fn origins_same_host_or_listed() {
        let same = guard(&[]);
        assert!(same.origin_allowed("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(same.origin_allowed("https://Fleet.Example", Some("fleet.example:443")));
        // HTTPS on a port of its own (tls_cert): the page's origin is https://host:port.
        assert!(same.origin_allowed("https://127.0.0.1:8443", Some("127.0.0.1:8443")));
        assert!(!same.origin_allowed("https://127.0.0.1:8443", Some("127.0.0.1:8080")));
        assert!(!same.origin_allowed("http://evil.example", Some("127.0.0.1:8080")));
        assert!(!same.origin_allowed("http://127.0.0.1:9999", Some("127.0.0.1:8080")));
        assert!(!same.origin_allowed("null", Some("127.0.0.1:8080")));
        assert!(!same.origin_allowed("http://127.0.0.1:8080", None));
        let listed = guard(&["https://ops.example/", "http://localhost:3000"]);
        assert!(listed.origin_allowed("https://ops.example", Some("bridge:8080")));
        assert!(listed.origin_allowed("http://localhost:3000", Some("bridge:8080")));
        assert!(!listed.origin_allowed("http://bridge:8080", Some("bridge:8080")));
    }
}
