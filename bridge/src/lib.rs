//! The Fleetbeat bridge: vehicles speak MQTT, dispatchers speak Socket.IO, the bridge joins them.
//!
//! It subscribes to the vehicles' topics on an MQTT broker (the embedded one by default, or an
//! external one), decodes every payload with the [`shared`] wire contract, and emits the result as
//! JSON on the Socket.IO namespace `/dispatch`, to the rooms that cover the vehicle.
//!
//! # Layout
//! The layers, bottom up; each uses only the layers listed before it (one exception: the store
//! applies an order's rules, `domain::order`, inside its transactions). No file imports a file
//! that imports it back.
//! - `store/`: durable storage in SQLite (orders, delivery events, the per-client queue,
//!   heartbeat history); [`store`] is public for the benchmarks.
//! - `domain/`: what the bridge knows and decides: the fleet cache (`fleet`), commands
//!   (`command`), an order's life (`order`, whose rules the store applies), placing and
//!   assigning orders and recording delivery events (`delivery`), tokens and grants (`auth`),
//!   and `Hub`, the shared state behind named operations. Its types are wire types
//!   (`shared::Heartbeat`, `shared::Position`), never JSON.
//! - `view/`: every JSON shape clients receive (`vehicle`, `order`, `reply`; degrees are made
//!   here), the namespaces and rooms (`room`), and what is sent to which sockets (`emit`).
//! - `ingest/`: what vehicles publish, coming in: the MQTT task (`mqtt`), each PUBLISH
//!   verified and recorded (`inbox`, `verify`), the device keys (`keys`).
//! - `api/`: what clients call: Socket.IO handlers (`socket`), HTTP (`http`), the page (`web`),
//!   HTTPS and WSS on the same listener (`https`), the Redis link of the Socket.IO adapter of
//!   several bridges (`adapter`).
//! - `cluster/`: the latest vehicle states shared with the other bridges through Redis, merged
//!   into the fleet cache.
//! - [`geofence`]: fences (circles, polygons), their R*-tree and the hysteresis that turns
//!   heartbeats into `geofence` enter / exit events (public for the benchmarks); uses
//!   `shared` only.
//! - `server`: starts all of the above ([`Bridge`], [`run`]) and shuts it down gracefully.
//!
//! Beside them: [`config`] (what the bridge needs to run), [`error`] ([`BridgeError`]),
//! [`tls`] (the rustls configurations of HTTPS and of MQTT over TLS, from PEM files),
//! `metrics` (counters for `/metrics`, updated by every layer) and `clock`.
//!
//! A heartbeat's way: `ingest::mqtt` → `ingest::inbox` (verified) → `Hub::record` (one lock
//! of the fleet) → at the next tick, `view::emit::send_batches` → `view::vehicle::PositionView`
//! → the `position` event.
//!
//! Several bridges (`redis_url`, issue #15) behave as one: Socket.IO runs on socketioxide's Redis
//! adapter, so everything addressed to a client identity (queued delivery messages, `pickup`,
//! command acks, announcements) goes to rooms through the adapter and reaches the client on
//! whichever bridge it is connected to; the per-tick `position` and `status` batches stay
//! local, each bridge sending them to its own sockets from a fleet cache that `cluster` keeps
//! complete. Each bridge registers its `client_id` in Redis (`server`).

mod api;
mod clock;
mod cluster;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
mod domain;
pub mod error;
pub mod geofence;
mod ingest;
mod metrics;
mod server;
pub mod store;
pub mod tls;
mod view;

pub use config::{BridgeConfig, MqttTarget};
pub use error::BridgeError;
pub use server::{Bridge, run};
