//! The bridge's durable storage: orders, delivery events, the per-client message queue and the
//! heartbeat history, in SQLite through `sqlx`.
//!
//! Every write that must survive a crash is one transaction, committed with the database in
//! WAL mode and `synchronous = FULL`: when a method returns `Ok`, the data is on disk and
//! survives `kill -9` and a power loss. Only then may the caller acknowledge the input (the
//! MQTT PUBACK of a delivery event) or emit the output (a queued message).
//!
//! # Layout
//! - `database`: [`Store`], opening (migrations run at open), closing, the durability
//!   read-back; `options`: [`StoreOptions`], [`Synchronous`].
//! - `backend`, `ids`, `pool`: below the rest, knowing no store: the `Backend` a store runs on
//!   and the conversions of SQL values; [`ClientId`] and [`MessageId`]; the pool types.
//! - `order`: orders, their assignment to vehicles, and [`Store::record_event`], which
//!   records a delivery event exactly once, moves its order on and queues its messages, in one
//!   transaction (by the rules of `domain::order`, the one thing above it the store uses).
//! - `group`: the group commit of delivery events: the events recorded at the same time share
//!   one transaction and one commit (one fsync), each answered only once it is committed; the
//!   [`Store`] holds its committer, so it uses only the modules below `database`.
//! - `queue`: the durable per-client message queue (`Store::pending`, `Store::ack`,
//!   `Store::expire`).
//! - `parked`: QoS 1 messages of vehicles without a key, parked after their wait
//!   (`Store::park`, `Store::parked_of`, `Store::unpark`, `Store::expire_parked`).
//! - `track`: the heartbeat history ([`Store::record_heartbeats`], `Store::track`).
//! - `track_keys`: the history's track numbers, one per (vehicle, fleet), kept in memory.
//! - `geofence`: custom geofences ([`StoredFence`], `Store::geofences`) and the drop-offs of
//!   open orders ([`Store::open_dropoffs`], and those changed since a time:
//!   [`Store::dropoffs_changed_since`]) that become automatic fences.
//! - `writer`: `HeartbeatWriter`, a task that batches heartbeats off the MQTT path.
//! - `health`: `StoreHealth`, whether the store can write, as its writes show it (for
//!   `/readyz` and `/metrics`); [`StoreError::is_outage`] tells an outage from refused data.
//! - `checkpoint`: SQLite's checkpoints, on a task and a connection of their own, off the
//!   commit path.
//! - `sqlite`, `postgres`: everything specific to one database (connection settings, how a
//!   write transaction begins, the durability read-back, migrations; `postgres` says how
//!   several bridges share one database). The queries elsewhere are portable SQL with `$N`
//!   placeholders; the few differences go through `Backend`.
//! - [`StoreError`]: what can go wrong.
//! - `testing` (tests only): a fresh store on each backend, and `on_each_backend!`, which
//!   runs a test on both.
//!
//! The schema lives in `bridge/migrations/sqlite/` and `bridge/migrations/postgres/`, kept in
//! step by a test.

mod backend;
mod checkpoint;
mod database;
mod error;
mod geofence;
mod group;
mod health;
mod ids;
mod latency;
mod options;
mod order;
mod order_row;
mod parked;
mod pool;
mod postgres;
mod queue;
mod sqlite;
#[cfg(test)]
pub(crate) mod testing;
mod track;
mod track_keys;
mod writer;

pub use database::Store;
#[cfg(test)]
pub(crate) use database::in_memory;
pub use error::StoreError;
pub use geofence::{DropoffChange, FenceWrite, OpenOrderDropoff, StoredFence};
pub use group::{GroupStats, Recorded};
pub(crate) use health::StoreHealth;
pub use latency::{BOUNDS_US as LATENCY_BOUNDS_US, Latencies};
pub use options::{StoreOptions, Synchronous};
pub(crate) use order::{AssignedOrder, OrderFilter, WaitingOrder};
pub use order::{CreatedOrder, NewOrder};
pub(crate) use order_row::OrderView;
pub(crate) use parked::ParkedMessage;
pub(crate) use queue::QueuedMessage;
pub use queue::{ClientId, Enqueued, MessageId};
pub use track::HeartbeatRow;
pub(crate) use writer::{HeartbeatSender, HeartbeatWriter, HeartbeatWriterOptions};
