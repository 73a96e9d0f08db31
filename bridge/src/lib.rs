//! The Fleetbeat bridge: vehicles speak MQTT, dispatchers speak Socket.IO, the bridge joins them.
//!
//! It subscribes to the vehicles' topics on an MQTT broker (the embedded one by default, or an
//! external one), decodes every payload with the [`shared`] wire contract, and emits the result as
//! JSON on the Socket.IO namespace `/dispatch`, to the rooms that cover the vehicle.
//!
//! # Layout
//! - [`config`]: what the bridge needs to run ([`BridgeConfig`], [`MqttTarget`]).
//! - [`auth`]: tokens, roles and scopes.
//! - [`keys`]: device message keys, to check the origin of what vehicles publish.
//! - [`room`]: Socket.IO room names (`vehicle:{id}`, `fleet:{fleet}`, `all`, `vendor:{store}`).
//! - [`view`]: JSON views of the wire messages, as dispatchers receive them.
//! - [`fleet`]: the bridge's cache of every vehicle: position, liveness, last seen.
//! - [`command`]: commands to vehicles and matching their acks.
//! - [`hub`]: the shared state, and accepting what vehicles publish.
//! - [`metrics`]: counters of what came in, went out and was rejected.
//! - [`mqtt`]: the task that owns the rumqttc event loop and routes what it receives.
//! - [`socket`]: namespaces, their middleware and named event handlers.
//! - [`emit`]: what is sent to which sockets (coalesced position batches, events).
//! - [`http`]: the axum router (`/healthz`, `/readyz`, `/metrics`, `/api`, Socket.IO).
//! - [`orders`]: placing and assigning orders, recording delivery events and queueing them.
//! - [`store`]: durable storage (orders, delivery events, per-client queue, heartbeat history)
//!   in SQLite.
//! - [`web`]: the dispatcher page at `/` (embedded assets, `/config.json`).
//! - [`server`]: starts all of the above and shuts it down gracefully.
//! - [`error`]: the bridge's error type.

pub mod auth;
pub mod command;
pub mod config;
pub mod emit;
pub mod error;
pub mod fleet;
pub mod http;
pub mod hub;
pub mod keys;
pub mod metrics;
pub mod mqtt;
pub mod orders;
pub mod room;
pub mod server;
pub mod socket;
pub mod store;
pub mod view;
pub mod web;

pub use config::{BridgeConfig, MqttTarget};
pub use error::BridgeError;
pub use server::{Bridge, run};
