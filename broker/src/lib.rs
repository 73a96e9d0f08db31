//! Fleetbeat's MQTT broker: [rumqttd] behind an API that starts it on its own thread, returns
//! only once every listener really answers MQTT, and bounds its memory from the start.
//!
//! No other Fleetbeat crate touches rumqttd: the bridge embeds the broker and the tests start
//! it through [`Broker::start`], on ephemeral ports with [`BrokerConfig::ephemeral`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), broker::BrokerError> {
//! let broker = broker::Broker::start(broker::BrokerConfig::ephemeral()).await?;
//! println!("MQTT 3.1.1 on {}, MQTT 5 on {:?}", broker.v4_addr(), broker.v5_addr());
//! # Ok(()) }
//! ```
//!
//! rumqttd cannot be stopped: a started broker runs until the process exits (see [`Broker`]).
//! The library installs no tracing subscriber; rumqttd's own events go to whichever the
//! application installed.
//!
//! # Layout
//!
//! - [`config`]: [`BrokerConfig`] (listeners, memory bounds and why they are what they are),
//!   translated into rumqttd's `Config`.
//! - [`server`]: [`Broker`], the rumqttd thread and the readiness check.
//! - `probe`: the minimal raw-socket MQTT client the readiness check uses.
//! - [`error`]: [`BrokerError`] and [`ProbeError`].
//!
//! [rumqttd]: https://docs.rs/rumqttd/0.20

pub mod config;
pub mod error;
mod probe;
pub mod server;

pub use config::{BrokerConfig, Listener};
pub use error::{BrokerError, ProbeError};
pub use server::Broker;
