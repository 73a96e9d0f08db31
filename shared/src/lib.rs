//! Fleetbeat's wire contract: what a vehicle and the rest of the system say to each other.
//!
//! This crate is `no_std` (no heap, `heapless` strings) so the very same code runs on a
//! tracker's microcontroller, in the device simulator and in the bridge. Enable the `std`
//! feature on a host to get `std::error::Error` on the error types.
//!
//! # Layout
//! - [`id`]: validated, fixed-capacity identifiers ([`FleetId`], [`VehicleId`], [`OrderId`]).
//! - [`wire`]: the message types ([`Heartbeat`], [`DeliveryEvent`], [`Status`], [`Command`],
//!   [`CommandAck`]).
//! - [`topic`]: the MQTT topic scheme `fleet/{fleet}/{vehicle}/{kind}`, built and parsed
//!   without allocation, with the QoS and retain rule of every kind.
//! - [`codec`]: one protocol-version byte followed by the postcard body.
//! - [`seal`]: what vehicles publish is sealed with a per-vehicle key (HMAC tag + counter)
//!   so receivers can trust its origin and refuse replays.
//! - [`error`]: the typed errors of all of the above.
//! - `frame` (`std` feature): MQTT fixed-header framing and the few packets Fleetbeat's own
//!   tools write by hand (broker probe and router link, tests, benchmarks).
//!
//! The full protocol (fields, units, QoS, the version rule) is described in `docs/protocol.md`.
#![cfg_attr(not(any(test, feature = "std")), no_std)]

pub mod codec;
pub mod error;
#[cfg(feature = "std")]
pub mod frame;
pub mod id;
pub mod seal;
pub mod topic;
pub mod wire;

pub use codec::{MAX_PAYLOAD, PROTOCOL_VERSION, check_version, decode, encode, encode_vec};
pub use error::{CodecError, IdError, TopicError};
pub use id::{FleetId, OrderId, VehicleId};
pub use seal::{
    Counter, DeviceKey, Opened, ReplayGuard, open, open_mode_key, open_unverified, seal,
};
pub use topic::{Levels, Topic, TopicKind};
pub use wire::{
    AckResult, Command, CommandAck, CommandKind, DeliveryEvent, DeliveryKind, Heartbeat,
    OfflineReason, Position, Status, StatusFlags, WireMessage,
};
