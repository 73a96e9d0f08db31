//! What vehicles publish, coming in: the MQTT task and payload verification.
//!
//! - [`mqtt`]: the task that owns the rumqttc event loop (connect, subscribe, reconnect).
//! - [`inbox`]: each PUBLISH, parsed, verified, recorded in the domain, and emitted through
//!   `view::emit` when clients must see it at once.
//! - [`verify`]: a payload is believed only once its origin is checked.
//! - [`keys`]: the device keys origins are checked against.
//!
//! A heartbeat goes `mqtt` → `inbox` → `Hub::record` (one lock of the fleet), and leaves with
//! the next tick's batch (`view::emit::send_batches`).

pub(crate) mod inbox;
pub(crate) mod keys;
pub(crate) mod mqtt;
pub(crate) mod verify;
