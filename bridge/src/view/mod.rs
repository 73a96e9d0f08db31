//! What clients see, and where it is sent: every JSON shape of the Socket.IO events and of
//! the HTTP API's answers, made from the domain's types (coordinates turned into degrees here,
//! and only here), and the emission of them to namespaces and rooms.
//!
//! - [`room`]: the namespaces and room names (`vehicle:{id}`, `fleet:{fleet}`, `all`,
//!   `vendor:{store}`), which vehicles a room covers and who may join it.
//! - [`vehicle`]: `position`, `status`, `snapshot`, `ack`, the vehicle API and the track.
//! - [`order`]: `delivery`, `pickup`, placed orders, the order API.
//! - [`reply`]: the acks of client events, `announce` and `stats`.
//! - [`geofence`]: fences in the API, the `geofence` and `geofences` events and their rooms.
//! - [`emit`]: what is sent to which sockets (the per-tick batches, events as they happen).
//! - [`pace`]: when the batches go: at once under light load, per tick under load.
//!
//! The HTTP plumbing's own small bodies (errors, health, readiness) stay in `api::http`.

pub(crate) mod emit;
pub(crate) mod geofence;
pub(crate) mod order;
pub(crate) mod pace;
pub(crate) mod reply;
pub(crate) mod room;
pub(crate) mod vehicle;
