//! The Fleetbeat bridge: vehicles speak MQTT, dispatchers speak Socket.IO, the bridge joins them.
//!
//! It subscribes to the vehicles' topics on an MQTT broker (the embedded one by default, or an
//! external one), decodes every payload with the [`shared`] wire contract, and emits the result as
//! JSON on the Socket.IO namespace `/dispatch`, to the rooms that cover the vehicle.
//!
//! # Layout
//! - [`config`]: what the bridge needs to run ([`BridgeConfig`], [`MqttTarget`]).
//! - [`room`]: Socket.IO room names (`vehicle:{id}`, `fleet:{fleet}`, `all`).
//! - [`view`]: JSON views of the wire messages, as dispatchers receive them.
//! - [`metrics`]: counters of what came in, went out and was rejected.
//! - [`mqtt`]: the task that owns the rumqttc event loop and routes what it receives.
//! - [`socket`]: namespaces and their named event handlers.
//! - [`http`]: the axum router (`/healthz`, `/readyz`, `/metrics`, Socket.IO).
//! - [`server`]: starts all of the above and shuts it down gracefully.
//! - [`error`]: the bridge's error type.

pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod room;
pub mod server;
pub mod socket;
pub mod view;

pub use config::{BridgeConfig, MqttTarget};
pub use error::BridgeError;
pub use server::{Bridge, run};
