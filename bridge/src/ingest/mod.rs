//! What vehicles publish, coming in: the MQTT task and payload verification.
//!
//! - [`mqtt`]: the tasks that own the rumqttc event loops (connect, subscribe, reconnect), one
//!   per session: events (QoS 1, persistent, manual acks) and heartbeats (QoS 0).
//! - [`local`]: with the embedded broker, the heartbeats come in-process instead, from its
//!   router (`broker::LocalSubscriber`), not over a second MQTT connection.
//! - [`inbox`]: each PUBLISH, parsed, verified, recorded in the domain, and emitted through
//!   `view::emit` when clients must see it at once.
//! - [`acks`]: the events session's PUBACKs, released in order, a delivery event's once it is
//!   committed (retried while the store cannot write: back-pressure, not a reconnect loop).
//! - [`verify`]: a payload is believed only once its origin is checked.
//! - [`keys`]: the device keys origins are checked against.
//!
//! A heartbeat goes `mqtt` (or `local`) → `inbox` → `Hub::record` (one lock of the fleet), and leaves with
//! the next tick's batch (`view::emit::send_batches`). A delivery event goes `mqtt` → `inbox`
//! (verified) → `acks` (committed, emitted, then acknowledged in its turn).

pub(crate) mod acks;
pub(crate) mod inbox;
pub(crate) mod keys;
pub(crate) mod local;
pub(crate) mod mqtt;
pub(crate) mod verify;
