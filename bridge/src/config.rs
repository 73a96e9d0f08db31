//! What the bridge needs to run: [`BridgeConfig`], and the layered [`Settings`] it is made
//! from (defaults, TOML file, environment, flags).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

// Socket.IO limits (issue 14)
pub use crate::api::limits::{SocketIoLimits, SocketIoSettings};
pub use crate::api::web::WebConfig;
pub use crate::domain::auth::{Role, TokenGrant};
pub use crate::domain::fleet::StaleRule;
use crate::error::BridgeError;
pub use crate::geofence::GeofenceOptions;
pub use crate::ingest::mqtt::{MqttEndpoint, MqttTls, redact_url};
pub use crate::store::Synchronous;
pub use crate::tls::TlsFiles;

/// A secret from the configuration (a password, a token): its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `secret`.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for where it is used (never for a log).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where the bridge's MQTT broker is.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "one value per process, read once at start: boxing would buy nothing"
)]
pub enum MqttTarget {
    /// Start the embedded broker in-process with this configuration and connect to it.
    Embedded(broker::BrokerConfig),
    /// Connect to an external broker.
    External(MqttEndpoint),
}

/// Everything the bridge needs to run.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Tokens and what they grant; empty means the demo tokens (logged loudly).
    pub tokens: Vec<TokenGrant>,
    /// The broker's credentials file with the device message keys; `None` is open mode.
    pub credentials: Option<PathBuf>,
    /// The bridge's MQTT password (username: [`Self::client_id`]).
    pub mqtt_password: Option<Secret>,
    /// Whether demo mode (no credentials file, no tokens: public demo tokens) may serve on
    /// an address other than loopback.
    pub allow_public_demo: bool,
    /// Whether `/metrics` is open to anyone (otherwise: to the metrics token, or loopback).
    pub metrics_public: bool,
    /// The SHA-256 of the token `/metrics` wants (`Authorization: Bearer`), 64 hex digits.
    pub metrics_token_sha256: Option<String>,
    /// How often coalesced positions are sent to dispatchers.
    pub tick: Duration,
    /// Below this many positions per second news goes to dispatchers at once, not at the next
    /// tick (`view::pace`); 0: always per tick.
    pub flush_at_once_below: u32,
    /// When a vehicle without heartbeats counts as stale.
    pub stale: StaleRule,
    /// How long a dispatcher's command waits for the vehicle's ack.
    pub command_timeout: Duration,
    /// How long a QoS 1 message from a vehicle without a key is held unacknowledged before it
    /// is parked durably in the store (and acknowledged), so that it no longer holds the
    /// PUBACKs behind it (`ingest::inbox`).
    pub key_wait_park_after: Duration,
    /// The SQLite database file (created if missing), or `:memory:`.
    pub store: String,
    /// Whether every commit is fsynced (`full`, the default) or not on every commit (`normal`).
    pub synchronous: Synchronous,
    /// How long a queued message waits for its client's acknowledgement before it expires.
    pub queue_retention: Duration,
    /// How long heartbeat history is kept.
    pub history_retention: Duration,
    /// The dispatcher page's base map.
    pub web: WebConfig,
    /// HTTPS: the certificate and key the listener serves (reloaded when they change), or
    /// `None` for plain HTTP.
    pub tls: Option<TlsFiles>,
    /// The MQTT broker to use.
    pub mqtt: MqttTarget,
    /// The MQTT client id of this bridge. With a persistent session, it must be stable across
    /// restarts and unique among bridges.
    pub client_id: String,
    /// Several bridges (issue #15): the MQTT shared-subscription group this bridge's device
    /// subscriptions join (`$share/{group}/fleet/+/+/{kind}`), so that the broker spreads
    /// the devices' messages over the bridges of the group. `None`: one bridge, plain
    /// subscriptions.
    pub shared_group: Option<String>,
    /// Several bridges (issue #15): the Redis server (`redis://`; TLS to Redis is not built in) of socketioxide's
    /// Redis adapter, which carries room broadcasts between bridges, and of the latest vehicle
    /// state they share. `None`: one bridge, Socket.IO's local adapter.
    pub redis_url: Option<Secret>,
    /// MQTT keep-alive interval.
    pub keep_alive: Duration,
    /// Upper bound of the reconnect backoff.
    pub max_backoff: Duration,
    /// How long graceful shutdown may take before remaining tasks are abandoned.
    pub shutdown_grace: Duration,
    // Socket.IO limits (issue 14)
    /// What one Socket.IO client may cost everyone (`[socketio]`).
    pub socketio: SocketIoLimits,
    /// Geofences (`[geofences]`): the automatic fences' radii and the hysteresis.
    pub geofences: GeofenceOptions,
    /// Orders (`[orders]`): when an order stuck on an offline vehicle is offered again.
    pub orders: OrderOptions,
}

/// How the bridge treats orders (`[orders]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderOptions {
    /// An order assigned to a vehicle that has been offline this long (and not picked up) is
    /// taken back and offered to another vehicle (default 120 s).
    pub reoffer_after: Duration,
}

impl Default for OrderOptions {
    fn default() -> Self {
        Self {
            reoffer_after: Duration::from_millis(DEFAULT_REOFFER_AFTER_MS),
        }
    }
}

/// The default of `[orders] reoffer_after_ms`: two minutes.
const DEFAULT_REOFFER_AFTER_MS: u64 = 120_000;

/// The order settings as the configuration layers give them (`[orders]` in the file,
/// `FLEETBEAT_ORDERS_*` in the environment, `--orders-*` flags); unset fields keep the
/// defaults of [`OrderOptions`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct OrderSettings {
    /// Orders: offer an order again when its vehicle has been offline this long without
    /// picking it up, in ms (default 120000; 1000 ..= 86400000).
    #[arg(
        long = "orders-reoffer-after-ms",
        env = "FLEETBEAT_ORDERS_REOFFER_AFTER_MS"
    )]
    pub reoffer_after_ms: Option<u64>,
}

impl OrderSettings {
    /// `self` with every field `over` sets replaced.
    #[must_use]
    pub fn overridden_by(self, over: Self) -> Self {
        Self {
            reoffer_after_ms: over.reoffer_after_ms.or(self.reoffer_after_ms),
        }
    }

    /// Validates the settings: `reoffer_after_ms` within 1000 ..= 86400000.
    ///
    /// # Errors
    /// A message naming the key and the problem.
    pub fn into_options(self) -> Result<OrderOptions, String> {
        let ms = self.reoffer_after_ms.unwrap_or(DEFAULT_REOFFER_AFTER_MS);
        if !(1_000..=86_400_000).contains(&ms) {
            return Err("reoffer_after_ms: must be within 1000 ..= 86400000 (ms)".to_owned());
        }
        Ok(OrderOptions {
            reoffer_after: Duration::from_millis(ms),
        })
    }
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            credentials: None,
            mqtt_password: None,
            allow_public_demo: false,
            metrics_public: false,
            metrics_token_sha256: None,
            tick: Duration::from_millis(DEFAULT_TICK_MS),
            flush_at_once_below: DEFAULT_FLUSH_AT_ONCE_BELOW,
            stale: StaleRule::default(),
            command_timeout: Duration::from_secs(10),
            key_wait_park_after: Duration::from_millis(DEFAULT_KEY_WAIT_PARK_AFTER_MS),
            store: "fleetbeat.db".to_owned(),
            synchronous: Synchronous::Full,
            queue_retention: Duration::from_secs(7 * 24 * 3600),
            history_retention: Duration::from_secs(7 * 24 * 3600),
            web: WebConfig::default(),
            tls: None,
            // Embedded: no journal (the bridge's commit acknowledges), the bridge's client id
            // as the durable consumer (the default's).
            mqtt: MqttTarget::Embedded(broker::BrokerConfig {
                journal: None,
                ..broker::BrokerConfig::default()
            }),
            client_id: "fleetbeat-bridge".to_owned(),
            shared_group: None,
            redis_url: None,
            keep_alive: Duration::from_secs(15),
            max_backoff: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            // Socket.IO limits (issue 14)
            socketio: SocketIoLimits::default(),
            geofences: GeofenceOptions::default(),
            orders: OrderOptions::default(),
        }
    }
}

/// The commented default configuration file, as `bridge default-config` prints it.
pub const DEFAULT_CONFIG: &str = include_str!("../default-config.toml");

/// The bridge's settings as they appear in the TOML file; every field is optional so that
/// layers (file, environment, flags) override only what they set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where HTTP and Socket.IO are served.
    pub listen: Option<SocketAddr>,
    /// An external MQTT broker URL (`mqtt://` or `mqtts://`); unset means the embedded broker.
    pub mqtt_url: Option<String>,
    /// The CA bundle (PEM) an `mqtts://` broker's certificate must be signed by.
    pub mqtt_ca_file: Option<PathBuf>,
    /// The bridge's client certificate (PEM) for an `mqtts://` broker that wants one.
    pub mqtt_client_cert: Option<PathBuf>,
    /// The key (PEM) of `mqtt_client_cert`.
    pub mqtt_client_key: Option<PathBuf>,
    /// HTTPS: the certificate chain (PEM) served; with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// HTTPS: the private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Where the embedded broker listens (MQTT 3.1.1).
    pub mqtt_listen: Option<SocketAddr>,
    /// MQTT client id.
    pub client_id: Option<String>,
    /// The MQTT shared-subscription group of the bridges (see [`BridgeConfig::shared_group`]).
    pub shared_group: Option<String>,
    /// The Redis server of the bridges (see [`BridgeConfig::redis_url`]).
    pub redis_url: Option<Secret>,
    /// The broker's credentials file with the device keys.
    pub credentials: Option<PathBuf>,
    /// The bridge's own MQTT password (username: the client id), for a broker that
    /// authenticates, embedded or external.
    pub mqtt_password: Option<Secret>,
    /// A file holding the bridge's MQTT password (its first line), instead of
    /// `mqtt_password`.
    pub mqtt_password_file: Option<PathBuf>,
    /// Let demo mode serve on a non-loopback address.
    pub allow_public_demo: Option<bool>,
    /// Serve `/metrics` to anyone.
    pub metrics_public: Option<bool>,
    /// The SHA-256 (64 hex digits) of the token `/metrics` wants.
    pub metrics_token_sha256: Option<String>,
    /// The token `/metrics` wants, in plain (accepted with a warning; prefer
    /// `metrics_token_sha256`).
    pub metrics_token: Option<Secret>,
    /// Position tick in ms.
    pub tick_ms: Option<u64>,
    /// Positions per second below which news goes out at once; 0: always per tick.
    pub flush_at_once_below: Option<u32>,
    /// Stale threshold in ms; 0 means 3 missed intervals.
    pub stale_after_ms: Option<u64>,
    /// Command timeout in ms.
    pub command_timeout_ms: Option<u64>,
    /// How long a message without its vehicle's key is held before it is parked, in ms.
    pub key_wait_park_after_ms: Option<u64>,
    /// The database file.
    pub store: Option<String>,
    /// `full` or `normal`.
    pub synchronous: Option<String>,
    /// Queue retention in hours.
    pub queue_retention_hours: Option<u64>,
    /// Heartbeat history retention in hours.
    pub history_retention_hours: Option<u64>,
    /// The dispatcher page's base map (`[web]`).
    pub web: Option<WebConfig>,
    /// Tokens and their grants.
    pub tokens: Vec<TokenGrant>,
    // Socket.IO limits (issue 14)
    /// The Socket.IO abuse limits (`[socketio]`).
    pub socketio: Option<SocketIoSettings>,
    /// Geofences (`[geofences]`).
    pub geofences: Option<GeofenceSettings>,
    /// Orders (`[orders]`).
    pub orders: Option<OrderSettings>,
    /// The embedded broker's own settings (`[broker]`, the keys of `broker default-config`),
    /// except those the bridge sets itself ([`BRIDGE_OWNED_BROKER_KEYS`]).
    pub broker: Option<toml::Table>,
}

/// The geofence settings as the configuration layers give them (`[geofences]` in the file,
/// `FLEETBEAT_GEOFENCES_*` in the environment, `--geofences-*` flags); unset fields keep the
/// defaults of [`GeofenceOptions`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct GeofenceSettings {
    /// Geofences: radius of the automatic fence around each store, metres (default 60).
    #[arg(
        long = "geofences-store-radius-m",
        env = "FLEETBEAT_GEOFENCES_STORE_RADIUS_M"
    )]
    pub store_radius_m: Option<f64>,
    /// Geofences: radius of the automatic fence around each open order's drop-off, metres
    /// (default 40).
    #[arg(
        long = "geofences-dropoff-radius-m",
        env = "FLEETBEAT_GEOFENCES_DROPOFF_RADIUS_M"
    )]
    pub dropoff_radius_m: Option<f64>,
    /// Geofences: how far inside (outside) a fence a vehicle must be to enter (leave) it,
    /// metres (default 15).
    #[arg(
        long = "geofences-hysteresis-m",
        env = "FLEETBEAT_GEOFENCES_HYSTERESIS_M"
    )]
    pub hysteresis_m: Option<f64>,
    /// Geofences: the most custom fences one fleet may have (default 10000); creating one
    /// more is refused (409).
    #[arg(
        long = "geofences-max-custom-per-fleet",
        env = "FLEETBEAT_GEOFENCES_MAX_CUSTOM_PER_FLEET"
    )]
    pub max_custom_per_fleet: Option<usize>,
}

impl GeofenceSettings {
    /// `self` with every field `over` sets replaced.
    #[must_use]
    pub fn overridden_by(self, over: Self) -> Self {
        Self {
            store_radius_m: over.store_radius_m.or(self.store_radius_m),
            dropoff_radius_m: over.dropoff_radius_m.or(self.dropoff_radius_m),
            hysteresis_m: over.hysteresis_m.or(self.hysteresis_m),
            max_custom_per_fleet: over.max_custom_per_fleet.or(self.max_custom_per_fleet),
        }
    }

    /// Validates the settings: radii within 1 ..= 10000 m, the hysteresis within 0 ..= 1000 m,
    /// the custom fences per fleet within 1 ..= 100000.
    ///
    /// # Errors
    /// A message naming the key and the problem.
    pub fn into_options(self) -> Result<GeofenceOptions, String> {
        let d = GeofenceOptions::default();
        let within = |key: &str, value: f64, lo: f64, hi: f64| {
            if value.is_finite() && (lo..=hi).contains(&value) {
                Ok(value)
            } else {
                Err(format!("{key}: must be within {lo} ..= {hi} (metres)"))
            }
        };
        Ok(GeofenceOptions {
            store_radius_m: within(
                "store_radius_m",
                self.store_radius_m.unwrap_or(d.store_radius_m),
                1.0,
                10_000.0,
            )?,
            dropoff_radius_m: within(
                "dropoff_radius_m",
                self.dropoff_radius_m.unwrap_or(d.dropoff_radius_m),
                1.0,
                10_000.0,
            )?,
            hysteresis_m: within(
                "hysteresis_m",
                self.hysteresis_m.unwrap_or(d.hysteresis_m),
                0.0,
                1_000.0,
            )?,
            max_custom_per_fleet: match self.max_custom_per_fleet {
                None => d.max_custom_per_fleet,
                Some(n @ 1..=100_000) => n,
                Some(_) => return Err("max_custom_per_fleet: must be within 1 ..= 100000".into()),
            },
        })
    }
}

/// The keys of `[broker]` the bridge sets itself, each with the bridge's setting to use
/// instead: they are refused in `[broker]`.
pub const BRIDGE_OWNED_BROKER_KEYS: [(&str, &str); 5] = [
    ("listen", "set mqtt_listen instead"),
    (
        "credentials",
        "set the bridge's credentials instead (it reads the device keys too)",
    ),
    (
        "durable_consumers",
        "the bridge's client_id is the durable consumer",
    ),
    (
        "journal",
        "the embedded broker has no journal: the bridge's own commit acknowledges",
    ),
    (
        "metrics_listen",
        "the embedded broker's metrics are served at the bridge's /metrics",
    ),
];

/// The default position tick: positions wait at most this long for their batch, so it bounds
/// device → dispatcher latency (a tenth of what a 1 Hz vehicle reports), and costs a few % of a
/// core at 10 000 vehicles (BENCHMARKS.md).
const DEFAULT_TICK_MS: u64 = 10;

/// The load (positions per second the bridge sends) below which news goes to dispatchers at
/// once instead of at the next tick: a flush then carries about one position, a few emits per
/// socket, and latency does not wait for the tick on a quiet bridge (BENCHMARKS.md).
const DEFAULT_FLUSH_AT_ONCE_BELOW: u32 = 2_000;

/// How long a message without its vehicle's key is held before it is parked, by default.
const DEFAULT_KEY_WAIT_PARK_AFTER_MS: u64 = 60_000;

fn invalid(key: &str, reason: impl std::fmt::Display) -> BridgeError {
    BridgeError::Config(format!("{key}: {reason}"))
}

impl Settings {
    /// Reads a TOML settings file.
    ///
    /// # Errors
    /// [`BridgeError::Config`] naming the file and the problem.
    pub fn load(path: &Path) -> Result<Self, BridgeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BridgeError::Config(format!("reading {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| BridgeError::Config(format!("{}: {e}", path.display())))
    }

    /// The built-in defaults (the default configuration file).
    ///
    /// # Errors
    /// Never in a tested build: the default file is parsed by a unit test.
    pub fn defaults() -> Result<Self, BridgeError> {
        toml::from_str(DEFAULT_CONFIG)
            .map_err(|e| BridgeError::Config(format!("default config: {e}")))
    }

    /// `self` with every field `over` sets replaced; tokens are replaced when `over` has any.
    #[must_use]
    pub fn overridden_by(self, over: Settings) -> Self {
        Self {
            listen: over.listen.or(self.listen),
            mqtt_url: over.mqtt_url.or(self.mqtt_url),
            mqtt_ca_file: over.mqtt_ca_file.or(self.mqtt_ca_file),
            mqtt_client_cert: over.mqtt_client_cert.or(self.mqtt_client_cert),
            mqtt_client_key: over.mqtt_client_key.or(self.mqtt_client_key),
            tls_cert: over.tls_cert.or(self.tls_cert),
            tls_key: over.tls_key.or(self.tls_key),
            mqtt_listen: over.mqtt_listen.or(self.mqtt_listen),
            client_id: over.client_id.or(self.client_id),
            shared_group: over.shared_group.or(self.shared_group),
            redis_url: over.redis_url.or(self.redis_url),
            credentials: over.credentials.or(self.credentials),
            mqtt_password: over.mqtt_password.or(self.mqtt_password),
            mqtt_password_file: over.mqtt_password_file.or(self.mqtt_password_file),
            allow_public_demo: over.allow_public_demo.or(self.allow_public_demo),
            metrics_public: over.metrics_public.or(self.metrics_public),
            metrics_token_sha256: over.metrics_token_sha256.or(self.metrics_token_sha256),
            metrics_token: over.metrics_token.or(self.metrics_token),
            tick_ms: over.tick_ms.or(self.tick_ms),
            flush_at_once_below: over.flush_at_once_below.or(self.flush_at_once_below),
            stale_after_ms: over.stale_after_ms.or(self.stale_after_ms),
            command_timeout_ms: over.command_timeout_ms.or(self.command_timeout_ms),
            key_wait_park_after_ms: over.key_wait_park_after_ms.or(self.key_wait_park_after_ms),
            store: over.store.or(self.store),
            synchronous: over.synchronous.or(self.synchronous),
            queue_retention_hours: over.queue_retention_hours.or(self.queue_retention_hours),
            history_retention_hours: over
                .history_retention_hours
                .or(self.history_retention_hours),
            web: over.web.or(self.web),
            tokens: if over.tokens.is_empty() {
                self.tokens
            } else {
                over.tokens
            },
            // Socket.IO limits (issue 14)
            socketio: match (self.socketio, over.socketio) {
                (Some(base), Some(over)) => Some(base.overridden_by(over)),
                (base, over) => over.or(base),
            },
            geofences: match (self.geofences, over.geofences) {
                (Some(base), Some(over)) => Some(base.overridden_by(over)),
                (base, over) => over.or(base),
            },
            orders: match (self.orders, over.orders) {
                (Some(base), Some(over)) => Some(base.overridden_by(over)),
                (base, over) => over.or(base),
            },
            broker: over.broker.or(self.broker),
        }
    }

    /// Validates the merged settings into the listen address and the bridge configuration.
    ///
    /// # Errors
    /// [`BridgeError::Config`] naming the key and the problem.
    pub fn into_config(mut self) -> Result<(SocketAddr, BridgeConfig), BridgeError> {
        let defaults = BridgeConfig::default();
        let listen = self.listen.ok_or_else(|| invalid("listen", "missing"))?;
        let mqtt = match self.mqtt_url.as_deref().filter(|u| !u.is_empty()) {
            Some(_) if self.broker.is_some() => {
                return Err(invalid(
                    "broker",
                    "[broker] configures the embedded broker, which is not started with \
                     mqtt_url (an external broker): remove one of them",
                ));
            }
            Some(url) => MqttTarget::External(
                MqttEndpoint::parse_with_tls(url, self.mqtt_tls()?)
                    .map_err(|e| invalid("mqtt_url", e))?,
            ),
            None => {
                let stray = [
                    ("mqtt_ca_file", self.mqtt_ca_file.is_some()),
                    ("mqtt_client_cert", self.mqtt_client_cert.is_some()),
                    ("mqtt_client_key", self.mqtt_client_key.is_some()),
                ];
                if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                    return Err(invalid(
                        key,
                        "only with an external broker (mqtt_url = \"mqtts://...\"); the \
                         bridge reaches its embedded broker over loopback",
                    ));
                }
                let listen = self
                    .mqtt_listen
                    .ok_or_else(|| invalid("mqtt_listen", "missing"))?;
                let client_id = self.client_id.clone().unwrap_or(defaults.client_id.clone());
                MqttTarget::Embedded(embedded_broker(
                    self.broker.take(),
                    listen,
                    self.credentials.clone(),
                    client_id,
                )?)
            }
        };
        let tls = match (self.tls_cert.take(), self.tls_key.take()) {
            (Some(cert), Some(key)) => {
                // Loaded once here for a clear error at start; the server loads it again.
                crate::tls::server_config(&cert, &key).map_err(|e| invalid("tls_cert", e))?;
                Some(TlsFiles { cert, key })
            }
            (None, None) => None,
            (Some(_), None) => return Err(invalid("tls_key", "missing (tls_cert is set)")),
            (None, Some(_)) => return Err(invalid("tls_cert", "missing (tls_key is set)")),
        };
        let tick_ms = self.tick_ms.unwrap_or(DEFAULT_TICK_MS);
        if !(10..=10_000).contains(&tick_ms) {
            return Err(invalid("tick_ms", "must be within 10 ..= 10000"));
        }
        let flush_at_once_below = self
            .flush_at_once_below
            .unwrap_or(DEFAULT_FLUSH_AT_ONCE_BELOW);
        if flush_at_once_below > 1_000_000 {
            return Err(invalid(
                "flush_at_once_below",
                "must be within 0 ..= 1000000 (0: always per tick)",
            ));
        }
        let command_timeout_ms = self.command_timeout_ms.unwrap_or(10_000);
        if !(100..=600_000).contains(&command_timeout_ms) {
            return Err(invalid(
                "command_timeout_ms",
                "must be within 100 ..= 600000",
            ));
        }
        let park_after_ms = self
            .key_wait_park_after_ms
            .unwrap_or(DEFAULT_KEY_WAIT_PARK_AFTER_MS);
        if !(100..=3_600_000).contains(&park_after_ms) {
            return Err(invalid(
                "key_wait_park_after_ms",
                "must be within 100 ..= 3600000",
            ));
        }
        let stale = match self.stale_after_ms.unwrap_or(0) {
            0 => StaleRule::default(),
            ms if ms < 100 => return Err(invalid("stale_after_ms", "must be 0 or at least 100")),
            ms => StaleRule::After(Duration::from_millis(ms)),
        };
        let client_id = self.client_id.unwrap_or(defaults.client_id.clone());
        if client_id.is_empty() || client_id.len() > 64 {
            return Err(invalid("client_id", "must be 1 to 64 bytes"));
        }
        let shared_group = match self.shared_group {
            None => None,
            Some(group) if group.is_empty() => None,
            Some(group) => {
                // MQTT 5 4.8.2: a share name is one topic level without wildcards.
                if group.len() > 64 || group.contains(['/', '+', '#', '\0']) {
                    return Err(invalid(
                        "shared_group",
                        "must be 1 to 64 bytes without '/', '+', '#' or NUL",
                    ));
                }
                Some(group)
            }
        };
        let redis_url = match self.redis_url {
            None => None,
            Some(url) if url.expose().is_empty() => None,
            Some(url) => {
                let parsed = url::Url::parse(url.expose())
                    .map_err(|_| invalid("redis_url", "is not a URL (redis://host:port)"))?;
                // `rediss://` (TLS) would need the redis crate's TLS feature: refused here
                // with a clear reason rather than at the first connection.
                if parsed.scheme() != "redis" {
                    return Err(invalid(
                        "redis_url",
                        "must start with redis:// (TLS to Redis is not built in: use a private network or a TLS tunnel)",
                    ));
                }
                Some(url)
            }
        };
        crate::domain::auth::Tokens::new(&self.tokens).map_err(|e| invalid("tokens", e))?;
        let mqtt_password = match (self.mqtt_password, &self.mqtt_password_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "mqtt_password_file",
                    "set mqtt_password or mqtt_password_file, not both",
                ));
            }
            (Some(password), None) => Some(password),
            (None, Some(path)) => Some(Secret::new(read_password_file(path)?)),
            (None, None) => None,
        };
        let metrics_token_sha256 = match (self.metrics_token_sha256, self.metrics_token) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "metrics_token",
                    "set metrics_token_sha256 or metrics_token, not both",
                ));
            }
            (Some(hex_digits), None) => {
                crate::domain::auth::parse_token_hash(&hex_digits)
                    .map_err(|e| invalid("metrics_token_sha256", e))?;
                Some(hex_digits.trim().to_lowercase())
            }
            (None, Some(token)) if token.expose().len() < 16 => {
                return Err(invalid("metrics_token", "must be at least 16 characters"));
            }
            (None, Some(token)) => {
                tracing::warn!(
                    "metrics_token is a plain token in the configuration: store \
                     metrics_token_sha256 instead (sha256sum of the token)"
                );
                Some(hex::encode(crate::domain::auth::hash_token(token.expose())))
            }
            (None, None) => None,
        };
        let synchronous = match self.synchronous.as_deref().unwrap_or("full") {
            "full" => Synchronous::Full,
            "normal" => Synchronous::Normal,
            other => {
                return Err(invalid(
                    "synchronous",
                    format!("{other:?}: expected full or normal"),
                ));
            }
        };
        let hours = |key: &str, v: Option<u64>| match v.unwrap_or(168) {
            0 => Err(invalid(key, "must be at least 1")),
            h => Ok(Duration::from_secs(h * 3600)),
        };
        let web = self.web.unwrap_or_default();
        web.validate().map_err(|e| invalid("web", e))?;
        let store = self.store.unwrap_or(defaults.store.clone());
        if store.is_empty() {
            return Err(invalid("store", "must name a file or :memory:"));
        }
        Ok((
            listen,
            BridgeConfig {
                tokens: self.tokens,
                credentials: self.credentials,
                mqtt_password,
                allow_public_demo: self.allow_public_demo.unwrap_or(false),
                metrics_public: self.metrics_public.unwrap_or(false),
                metrics_token_sha256,
                tick: Duration::from_millis(tick_ms),
                flush_at_once_below,
                stale,
                command_timeout: Duration::from_millis(command_timeout_ms),
                key_wait_park_after: Duration::from_millis(park_after_ms),
                store,
                synchronous,
                queue_retention: hours("queue_retention_hours", self.queue_retention_hours)?,
                history_retention: hours("history_retention_hours", self.history_retention_hours)?,
                web,
                tls,
                mqtt,
                client_id,
                shared_group,
                redis_url,
                // Socket.IO limits (issue 14)
                socketio: self
                    .socketio
                    .unwrap_or_default()
                    .into_limits()
                    .map_err(|e| invalid("socketio", e))?,
                geofences: self
                    .geofences
                    .unwrap_or_default()
                    .into_options()
                    .map_err(|e| invalid("geofences", e))?,
                orders: self
                    .orders
                    .unwrap_or_default()
                    .into_options()
                    .map_err(|e| invalid("orders", e))?,
                ..defaults
            },
        ))
    }
}

impl Settings {
    /// The TLS towards an external broker the settings ask for: `None` without
    /// `mqtt_ca_file` (an `mqtts://` URL then fails, naming it).
    fn mqtt_tls(&self) -> Result<Option<MqttTls>, BridgeError> {
        let client = match (&self.mqtt_client_cert, &self.mqtt_client_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "mqtt_client_key",
                    "missing (mqtt_client_cert is set)",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "mqtt_client_cert",
                    "missing (mqtt_client_key is set)",
                ));
            }
        };
        match &self.mqtt_ca_file {
            Some(ca) => Ok(Some(
                MqttTls::load(ca, client).map_err(|e| invalid("mqtt_ca_file", e))?,
            )),
            None if client.is_some() => Err(invalid(
                "mqtt_ca_file",
                "missing (a client certificate is only used over mqtts://, which needs it)",
            )),
            None => Ok(None),
        }
    }
}

/// The embedded broker's configuration: the `[broker]` table's keys over the broker's
/// defaults (MQTT 5 off unless `listen_v5` is given), then what the bridge sets itself: MQTT
/// 3.1.1 on `listen`, the `credentials` file (the broker authenticates devices and the bridge
/// alike), `client_id` as the durable consumer, no journal, no metrics listener.
///
/// # Errors
/// [`BridgeError::Config`] naming `broker.<key>`: a key the broker does not know, a value of
/// the wrong type, a key the bridge owns ([`BRIDGE_OWNED_BROKER_KEYS`]), or a value the broker
/// refuses.
fn embedded_broker(
    table: Option<toml::Table>,
    listen: SocketAddr,
    credentials: Option<PathBuf>,
    client_id: String,
) -> Result<broker::BrokerConfig, BridgeError> {
    let table = table.unwrap_or_default();
    for (key, value) in &table {
        let name = format!("broker.{key}");
        if let Some((_, instead)) = BRIDGE_OWNED_BROKER_KEYS.iter().find(|(k, _)| k == key) {
            return Err(invalid(&name, format!("set by the bridge: {instead}")));
        }
        // One key at a time, so that the error names it.
        let mut one = toml::Table::new();
        one.insert(key.clone(), value.clone());
        if let Err(err) = one.try_into::<broker::BrokerConfig>() {
            let reason = if err.message().starts_with("unknown field") {
                "unknown key (`broker default-config` lists the keys)".to_owned()
            } else {
                err.message().trim().to_owned()
            };
            return Err(invalid(&name, reason));
        }
    }
    let v5_given = table.contains_key("listen_v5");
    let mut config: broker::BrokerConfig = table
        .try_into()
        .map_err(|e| invalid("broker", e.message().trim()))?;
    // MQTT 3.1.1 only unless asked (the standalone broker offers MQTT 5 by default).
    if !v5_given {
        config.v5 = None;
    }
    config.v4 = listen;
    config.credentials = credentials;
    // The bridge acknowledges a vehicle's message to the embedded broker once its store
    // committed it: the vehicle's PUBACK waits for that (no journal).
    config.durable_consumers = vec![client_id];
    config.journal = None;
    config.metrics_listen = None;
    config.validate().map_err(|e| match e {
        broker::BrokerError::InvalidConfig { field, reason } => {
            invalid(&format!("broker.{field}"), reason)
        }
        other => invalid("broker", other),
    })?;
    Ok(config)
}

/// What `bridge add-token` makes a token for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NewTokenRole {
    /// A dispatcher of the fleets given (`--fleet`, repeatable; `*` for every fleet).
    Dispatcher,
    /// A vendor: its store (`--store`) and the fleet that delivers its orders (`--fleet`).
    Vendor,
    /// An operator.
    Admin,
    /// The scraper of `/metrics` (sets `metrics_token_sha256`; one at a time).
    Metrics,
}

/// A token to add to a configuration file ([`add_token`]).
#[derive(Debug, Clone)]
pub struct NewToken {
    /// What it grants.
    pub role: NewTokenRole,
    /// Dispatchers: the fleets; vendors: exactly one, their delivering fleet.
    pub fleets: Vec<String>,
    /// Vendors: their store id.
    pub store: Option<String>,
    /// A name for logs and the client's queue identity (default: `{role}-{hash prefix}`).
    pub name: Option<String>,
}

/// Makes a new random token (32 bytes, 64 hex digits), adds its SHA-256 with what it grants
/// to the configuration file at `path` (created if missing; its other content and comments
/// are kept), and returns the token: it is stored nowhere else, so it can be shown only once.
///
/// # Errors
/// [`BridgeError::Config`] if the request is incomplete, the file cannot be read, parsed or
/// written, or the result would not be a valid configuration.
pub fn add_token(path: &Path, request: &NewToken) -> Result<String, BridgeError> {
    use crate::domain::auth::{Tokens, hash_token, new_token};

    let bad = |reason: String| BridgeError::Config(format!("add-token: {reason}"));
    let token = new_token().map_err(|e| bad(format!("no random source: {e}")))?;
    let hash = hex::encode(hash_token(&token));
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(bad(format!("reading {}: {e}", path.display()))),
    };
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let role = match request.role {
        NewTokenRole::Metrics => {
            doc.remove("metrics_token");
            doc["metrics_token_sha256"] = toml_edit::value(hash.clone());
            None
        }
        NewTokenRole::Dispatcher => Some(Role::Dispatcher),
        NewTokenRole::Vendor => Some(Role::Vendor),
        NewTokenRole::Admin => Some(Role::Admin),
    };
    if let Some(role) = role {
        let grant = match role {
            Role::Dispatcher if request.fleets.is_empty() => {
                return Err(bad(
                    "a dispatcher needs --fleet F (repeatable, or '*')".into()
                ));
            }
            Role::Dispatcher => TokenGrant {
                fleets: request.fleets.clone(),
                ..TokenGrant::default()
            },
            Role::Vendor => match (&request.store, request.fleets.as_slice()) {
                (Some(store), [fleet]) => TokenGrant {
                    store: Some(store.clone()),
                    fleet: Some(fleet.clone()),
                    ..TokenGrant::default()
                },
                _ => return Err(bad("a vendor needs --store S and one --fleet F".into())),
            },
            Role::Admin => TokenGrant::default(),
        };
        let name = request
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", format!("{role:?}").to_lowercase(), &hash[..8]));
        let grant = TokenGrant {
            token_sha256: Some(hash),
            role,
            name: Some(name),
            ..grant
        };
        Tokens::new(std::slice::from_ref(&grant)).map_err(|e| bad(e.reason))?;
        let mut table = toml_edit::Table::new();
        let serialized = toml::to_string(&grant).map_err(|e| bad(e.to_string()))?;
        let parsed: toml_edit::DocumentMut = serialized.parse().map_err(|e| bad(format!("{e}")))?;
        for (key, item) in parsed.iter() {
            table.insert(key, item.clone());
        }
        match doc.get_mut("tokens") {
            None => {
                let mut tables = toml_edit::ArrayOfTables::new();
                tables.push(table);
                doc.insert("tokens", toml_edit::Item::ArrayOfTables(tables));
            }
            Some(toml_edit::Item::ArrayOfTables(tables)) => tables.push(table),
            Some(_) => {
                return Err(bad(format!(
                    "{}: `tokens` is not [[tokens]]",
                    path.display()
                )));
            }
        }
    }
    let new_text = doc.to_string();
    // The result must be a valid configuration (e.g. no duplicate names or tokens).
    let settings: Settings =
        toml::from_str(&new_text).map_err(|e| bad(format!("the result would not parse: {e}")))?;
    Tokens::new(&settings.tokens).map_err(|e| bad(format!("the result would be invalid: {e}")))?;
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, new_text)
        .and_then(|()| {
            if let Ok(meta) = std::fs::metadata(path) {
                std::fs::set_permissions(&tmp, meta.permissions())?;
            }
            std::fs::rename(&tmp, path)
        })
        .map_err(|e| bad(format!("writing {}: {e}", path.display())))?;
    Ok(token)
}

/// Reads the bridge's MQTT password from `path`: its first line, without the line end.
fn read_password_file(path: &Path) -> Result<String, BridgeError> {
    let key = "mqtt_password_file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("reading {}: {e}", path.display())))?;
    let password = text.lines().next().unwrap_or_default();
    if password.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(password.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_is_the_built_in_default() {
        let (listen, config) = Settings::defaults()
            .expect("parses")
            .into_config()
            .expect("valid");
        assert_eq!(listen.to_string(), "127.0.0.1:8080");
        let built_in = BridgeConfig::default();
        assert_eq!(config.tick, built_in.tick);
        assert_eq!(config.command_timeout, built_in.command_timeout);
        assert_eq!(config.stale, built_in.stale);
        assert_eq!(config.client_id, built_in.client_id);
        assert!(config.tokens.is_empty() && config.credentials.is_none());
        assert!(matches!(config.mqtt, MqttTarget::Embedded(b) if b.v4.port() == 1883));
    }

    #[test]
    fn add_token_stores_only_the_hash_and_keeps_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bridge.toml");
        std::fs::write(&path, "# my settings\ntick_ms = 50\n").expect("write");
        let dispatcher = NewToken {
            role: NewTokenRole::Dispatcher,
            fleets: vec!["north".into()],
            store: None,
            name: None,
        };
        let token = add_token(&path, &dispatcher).expect("added");
        let vendor = NewToken {
            role: NewTokenRole::Vendor,
            fleets: vec!["north".into()],
            store: Some("store-7".into()),
            name: Some("store-7".into()),
        };
        let vendor_token = add_token(&path, &vendor).expect("added");
        let metrics = NewToken {
            role: NewTokenRole::Metrics,
            fleets: vec![],
            store: None,
            name: None,
        };
        let metrics_token = add_token(&path, &metrics).expect("added");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# my settings\ntick_ms = 50\n"), "{text}");
        for secret in [&token, &vendor_token, &metrics_token] {
            assert!(
                !text.contains(secret.as_str()),
                "a token in the file:\n{text}"
            );
        }
        let settings = Settings::load(&path).expect("valid");
        assert_eq!(settings.tick_ms, Some(50));
        assert_eq!(settings.tokens.len(), 2);
        let tokens = crate::domain::auth::Tokens::new(&settings.tokens).expect("valid");
        let grant = tokens
            .authorize(Some(&token), "/dispatch", &[Role::Dispatcher])
            .expect("admitted");
        assert_eq!(
            grant.fleets,
            Some(vec![shared::FleetId::new("north").expect("id")])
        );
        assert!(
            tokens
                .authorize(Some(&vendor_token), "/vendor", &[Role::Vendor])
                .is_ok()
        );
        let hash = crate::domain::auth::hash_token(&metrics_token);
        assert_eq!(settings.metrics_token_sha256, Some(hex::encode(hash)));

        let incomplete = NewToken {
            role: NewTokenRole::Vendor,
            fleets: vec![],
            store: Some("s".into()),
            name: None,
        };
        assert!(add_token(&path, &incomplete).is_err());
        assert_eq!(Settings::load(&path).expect("valid").tokens.len(), 2);
    }

    #[test]
    fn mqtt_password_from_a_file_and_not_twice() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("password");
        std::fs::write(&path, "s3cret\n").expect("write");
        let from_file = Settings {
            mqtt_password_file: Some(path.clone()),
            ..Settings::defaults().expect("parses")
        };
        let (_, config) = from_file.clone().into_config().expect("valid");
        assert_eq!(
            config.mqtt_password.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert!(!format!("{config:?}").contains("s3cret"), "{config:?}");
        let both = Settings {
            mqtt_password: Some(Secret::new("other")),
            ..from_file
        };
        let err = both.into_config().expect_err("both").to_string();
        assert!(err.contains("mqtt_password_file"), "{err}");
        let missing = Settings {
            mqtt_password_file: Some(dir.path().join("nope")),
            ..Settings::defaults().expect("parses")
        };
        assert!(missing.into_config().is_err());
    }

    #[test]
    fn the_broker_table_reaches_the_embedded_broker() {
        let file: Settings = toml::from_str(
            "[broker]\nmax_pending_connects_per_ip = 1\nlogin_failure_window = \"5s\"\n",
        )
        .expect("parses");
        let (_, config) = Settings::defaults()
            .expect("parses")
            .overridden_by(file)
            .into_config()
            .expect("valid");
        let MqttTarget::Embedded(broker) = config.mqtt else {
            panic!("embedded");
        };
        assert_eq!(broker.max_pending_connects_per_ip, 1);
        assert_eq!(broker.login_failure_window, Duration::from_secs(5));
        // What the bridge sets itself.
        assert_eq!(broker.v4.port(), 1883);
        assert_eq!(broker.v5, None);
        assert_eq!(broker.journal, None);
        assert_eq!(
            broker.durable_consumers,
            vec!["fleetbeat-bridge".to_owned()]
        );

        let refused = |toml: &str| {
            let file: Settings = toml::from_str(toml).expect("parses");
            Settings::defaults()
                .expect("parses")
                .overridden_by(file)
                .into_config()
                .expect_err("refused")
                .to_string()
        };
        let err = refused("[broker]\nnope = 1\n");
        assert!(
            err.contains("broker.nope") && err.contains("unknown key"),
            "{err}"
        );
        let err = refused("[broker]\nmax_pending_connects = \"many\"\n");
        assert!(err.contains("broker.max_pending_connects"), "{err}");
        let err = refused("[broker]\njournal = \"j.db\"\n");
        assert!(
            err.contains("broker.journal") && err.contains("bridge"),
            "{err}"
        );
        let err = refused("[broker]\nmax_segment_size = 10\n");
        assert!(err.contains("broker.max_segment_size"), "{err}");
        let err = refused("mqtt_url = \"mqtt://h\"\n[broker]\nmax_login_failures = 3\n");
        assert!(err.contains("broker") && err.contains("mqtt_url"), "{err}");
    }

    #[test]
    fn tls_settings_come_in_pairs() {
        let bad = |settings: Settings| {
            Settings::defaults()
                .expect("parses")
                .overridden_by(settings)
                .into_config()
                .expect_err("refused")
                .to_string()
        };
        let err = bad(Settings {
            tls_cert: Some("c.pem".into()),
            ..Settings::default()
        });
        assert!(err.contains("tls_key"), "{err}");
        let err = bad(Settings {
            tls_cert: Some("/nonexistent/c.pem".into()),
            tls_key: Some("/nonexistent/k.pem".into()),
            ..Settings::default()
        });
        assert!(err.contains("tls_cert") && err.contains("c.pem"), "{err}");
        let err = bad(Settings {
            mqtt_url: Some("mqtts://broker".into()),
            ..Settings::default()
        });
        assert!(err.contains("mqtt_ca_file"), "{err}");
        let err = bad(Settings {
            mqtt_ca_file: Some("ca.pem".into()),
            ..Settings::default()
        });
        assert!(
            err.contains("mqtt_ca_file") && err.contains("external"),
            "{err}"
        );
    }

    #[test]
    fn layers_override_and_bad_values_name_the_key() {
        let file: Settings = toml::from_str("tick_ms = 50\nclient_id = \"b1\"").expect("parses");
        let flags = Settings {
            tick_ms: Some(20),
            ..Settings::default()
        };
        let merged = Settings::defaults()
            .expect("parses")
            .overridden_by(file)
            .overridden_by(flags);
        let (_, config) = merged.clone().into_config().expect("valid");
        assert_eq!(config.tick, Duration::from_millis(20));
        assert_eq!(config.client_id, "b1");

        let bad = merged.clone().overridden_by(Settings {
            tick_ms: Some(1),
            ..Settings::default()
        });
        let err = bad.into_config().expect_err("tick too small").to_string();
        assert!(err.contains("tick_ms"), "{err}");
        let bad = merged.overridden_by(Settings {
            mqtt_url: Some("http://nope".into()),
            ..Settings::default()
        });
        assert!(
            bad.into_config()
                .expect_err("bad url")
                .to_string()
                .contains("mqtt_url")
        );
        assert!(
            toml::from_str::<Settings>("tick = 5").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn geofence_keys_layer_and_are_validated() {
        let file: Settings =
            toml::from_str("[geofences]\nhysteresis_m = 5\nmax_custom_per_fleet = 50\n")
                .expect("parses");
        let flags = Settings {
            geofences: Some(GeofenceSettings {
                max_custom_per_fleet: Some(7),
                ..GeofenceSettings::default()
            }),
            ..Settings::default()
        };
        let merged = Settings::defaults()
            .expect("parses")
            .overridden_by(file)
            .overridden_by(flags);
        let (_, config) = merged.clone().into_config().expect("valid");
        assert_eq!(
            (
                config.geofences.hysteresis_m,
                config.geofences.max_custom_per_fleet,
                config.geofences.store_radius_m
            ),
            (5.0, 7, 60.0)
        );
        for bad in [
            "max_custom_per_fleet = 0",
            "store_radius_m = 0",
            "hysteresis_m = -1",
        ] {
            let file: Settings = toml::from_str(&format!("[geofences]\n{bad}\n")).expect("parses");
            let err = Settings::defaults()
                .expect("parses")
                .overridden_by(file)
                .into_config()
                .expect_err(bad)
                .to_string();
            let key = bad.split(' ').next().unwrap_or_default();
            assert!(
                err.contains("geofences") && err.contains(key),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn cluster_keys_are_validated() {
        let from_file: Settings = toml::from_str(
            "shared_group = \"fleetbeat\"\nredis_url = \"redis://:pw@127.0.0.1:6390\"",
        )
        .expect("parses");
        let (_, config) = Settings::defaults()
            .expect("defaults")
            .overridden_by(from_file)
            .into_config()
            .expect("valid");
        assert_eq!(config.shared_group.as_deref(), Some("fleetbeat"));
        assert_eq!(
            config.redis_url.as_ref().map(Secret::expose),
            Some("redis://:pw@127.0.0.1:6390")
        );
        let (_, single) = Settings::defaults()
            .expect("defaults")
            .into_config()
            .expect("valid");
        assert_eq!(single.shared_group, None, "one bridge by default");
        assert!(single.redis_url.is_none());
        for (group, ok) in [
            ("a/b", false),
            ("g+", false),
            ("#", false),
            ("bridges-1", true),
        ] {
            let result = Settings::defaults()
                .expect("defaults")
                .overridden_by(Settings {
                    shared_group: Some(group.to_owned()),
                    ..Settings::default()
                })
                .into_config();
            assert_eq!(result.is_ok(), ok, "shared_group {group:?}");
            if let Err(err) = result {
                assert!(err.to_string().contains("shared_group"), "{err}");
            }
        }
        let err = Settings::defaults()
            .expect("defaults")
            .overridden_by(Settings {
                redis_url: Some(Secret::new("http://:secret@127.0.0.1:6379")),
                ..Settings::default()
            })
            .into_config()
            .expect_err("not redis")
            .to_string();
        assert!(
            err.contains("redis_url") && !err.contains("secret"),
            "{err}"
        );
        let err = Settings::defaults()
            .expect("defaults")
            .overridden_by(Settings {
                redis_url: Some(Secret::new("rediss://127.0.0.1:6379")),
                ..Settings::default()
            })
            .into_config()
            .expect_err("no TLS to Redis")
            .to_string();
        assert!(err.contains("TLS"), "{err}");
    }
}
