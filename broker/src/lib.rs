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
//! - [`config`]: [`BrokerConfig`], its layers (defaults, file, environment, flags) and why each
//!   memory bound is what it is.
//! - [`auth`]: the credentials file ([`Credentials`], [`CredentialsFile`]), password hashing,
//!   the per-connection identity and its topic ACL.
//! - [`server`]: [`Broker`]: start, listener health, shutdown.
//! - `connection`: the network front end, one task per MQTT connection, on rumqttd's
//!   router; `mux` is the one router link shared by device-like connections (their publishes
//!   and command subscriptions); `sessions` orders takeovers of a client id; `router` wraps
//!   rumqttd's router and the broker's own publisher.
//! - [`mirror`]: the JSON mirror on `json/fleet/...`; `watchers` tracks the subscriptions that
//!   may read it.
//! - [`metrics`]: [`BrokerMetrics`] and its Prometheus rendering; [`http`]: `/metrics`.
//! - [`logging`]: the tracing filter for programs that run the broker.
//! - `probe`: the raw-socket MQTT client the listener health checks use.
//! - [`error`]: [`ConfigError`], [`BrokerError`], [`ProbeError`].
//!
//! [rumqttd]: https://docs.rs/rumqttd/0.20

pub mod auth;
pub mod config;
mod connection;
pub mod error;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod mirror;
mod mux;
mod probe;
mod router;
pub mod server;
mod sessions;
mod watchers;

pub use auth::{
    ClientEntry, Credentials, CredentialsError, CredentialsFile, DeviceEntry, NewPassword,
    PasswordOrigin, Role,
};
pub use config::{BrokerConfig, ConfigOverrides, Listener};
pub use error::{BrokerError, ConfigError, ProbeError};
pub use metrics::{AuthRefusal, BrokerMetrics, ConnectRefusal, DisconnectReason, DropReason};
pub use server::{Broker, ListenerHealth, ShutdownReport};

#[cfg(test)]
mod tests;
