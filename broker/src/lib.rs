//! Fleetbeat's MQTT broker: rumqttd's router behind our own network front end, with device
//! authentication and topic ACLs, Prometheus metrics, a readable JSON mirror of device traffic,
//! listener health checks and a graceful shutdown.
//!
//! No other Fleetbeat crate touches rumqttd: the bridge embeds the broker and the tests start
//! it through [`Broker::start`], on ephemeral ports with [`BrokerConfig::ephemeral`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), broker::BrokerError> {
//! let broker = broker::Broker::start(broker::BrokerConfig::ephemeral()).await?;
//! println!("MQTT 3.1.1 on {}, MQTT 5 on {:?}", broker.v4_addr(), broker.v5_addr());
//! println!("{}", broker.metrics().render());
//! broker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The library installs no tracing subscriber and serves no HTTP; the `broker` binary does
//! both. Why rumqttd is used this way, its defects and what this crate does about each:
//! `docs/broker.md`.
//!
//! # Layout
//!
//! Public modules are the paths programs use; every public type is also at the crate root.
//!
//! - [`config`]: [`BrokerConfig`], its layers (defaults, file, environment, flags:
//!   [`config::load`], [`ConfigOverrides`]) and why each memory bound is what it is;
//!   [`Listener`] (`listener`) names the MQTT 3.1.1 and 5 listeners.
//! - `auth`: the credentials file ([`Credentials`], edited with [`CredentialsFile`]), password
//!   hashing, the broker's check of a CONNECT with its cache and its failed-login throttle,
//!   which client ids each login may use, and each connection's identity with its topic ACL.
//! - `server`: [`Broker`]: start, shutdown; `health`: the listener probes
//!   ([`ListenerHealth`]), through `probe`, the raw-socket MQTT client they use.
//! - `connection`: the network front end, one task per MQTT connection (handshake, session,
//!   framing, publish and subscribe rate limits, the bound on connections awaiting CONNECT)
//!   on rumqttd's router; `mux`: the one router link shared by
//!   device-like connections (their publishes and command subscriptions); `share`: shared
//!   subscriptions (`$share/{group}/{filter}`), one router link per group, each message
//!   given to one member by the front end; `client_ids`:
//!   takeovers of a client id (only by the login holding it); `router`: registering links with rumqttd's router, handing
//!   them packets, and the broker's own publisher (last wills); `qos`: the QoS granted and
//!   delivered at, min(publish QoS, granted QoS), which rumqttd's router does not keep;
//!   `topic_syntax`: the topic names and filters MQTT allows, checked before the router sees
//!   them; `watchdog`: the parts the broker cannot live without, watched (their death ends the
//!   broker, [`Broker::failed`]).
//! - `durability`: end-to-end acknowledgement: which publishes wait for durability, the
//!   durable consumers whose PUBACKs prove it, the journal (SQLite, group commit) and the
//!   replays to durable consumers.
//! - `tls`: MQTT over TLS: the server certificate, key and client CA from PEM files into a
//!   rustls configuration, reloaded when a file changes; the vehicle id of a client
//!   certificate (mutual TLS).
//! - `mirror`: the JSON mirror on `json/fleet/...`; `watchers`: the subscriptions that may
//!   read it.
//! - `metrics`: [`BrokerMetrics`], the reasons it counts by and its Prometheus rendering;
//!   [`http`]: `/metrics`.
//! - [`logging`]: the tracing filter for programs that run the broker.
//! - `error`: [`ConfigError`], [`CredentialsError`], [`JournalError`], [`BrokerError`],
//!   [`TlsError`], [`ProbeError`].
//!
//! [rumqttd]: https://docs.rs/rumqttd/0.20

/// Implements `Debug` for types whose fields are not `Debug` (rumqttd's link halves): the
/// type's name only.
macro_rules! opaque_debug {
    ($($name:ident),+) => {$(
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).finish_non_exhaustive()
            }
        }
    )+};
}

mod auth;
mod carry;
mod client_ids;
pub mod config;
mod connection;
mod durability;
mod error;
mod expiry;
#[cfg(any(test, feature = "fault-injection"))]
mod fault;
mod file_watch;
mod health;
pub mod http;
mod listener;
mod local;
pub mod logging;
mod metrics;
mod mirror;
mod mux;
mod probe;
mod qos;
mod reserved;
mod retained;
mod router;
mod server;
mod share;
mod tls;
mod topic_syntax;
mod watchdog;
mod watchers;

pub use auth::{
    ClientEntry, Credentials, CredentialsFile, DeviceEntry, Issued, NewPassword, PasswordOrigin,
    Role,
};
pub use config::{BrokerConfig, ClientCerts, ConfigOverrides};
pub use error::{BrokerError, ConfigError, CredentialsError, JournalError, ProbeError, TlsError};
pub use file_watch::FileWatch;
pub use health::ListenerHealth;
pub use listener::Listener;
pub use local::{LocalMessage, LocalSubscriber};
pub use metrics::{
    AuthRefusal, BrokerMetrics, ConnectRefusal, DisconnectReason, DropReason, SubscribeRefusal,
};
pub use server::{Broker, ShutdownReport};
