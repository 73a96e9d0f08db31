//! The domain: what the bridge knows and decides, whatever the transport.
//!
//! - [`hub`]: [`Hub`], the state every part of the bridge shares, behind named operations.
//! - [`fleet`]: the cache of every vehicle (last heartbeat, liveness, last seen, replay
//!   guard) and what the next tick sends.
//! - [`command`]: commands to vehicles and matching their acks.
//! - [`order`]: an order's states and how a delivery event moves it on (used by the store).
//! - [`delivery`]: placing and assigning orders, recording delivery events and queueing them.
//! - [`auth`]: tokens, roles and what they grant.
//!
//! Nothing here imports the JSON views (`view`) or the transports (`ingest`, `api`): they
//! call in. Below it is only `store`.

pub(crate) mod auth;
pub(crate) mod command;
pub(crate) mod delivery;
pub(crate) mod fleet;
pub(crate) mod hub;
pub(crate) mod order;

pub(crate) use hub::{Hub, HubParts};
