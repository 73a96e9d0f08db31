//! Server → client emission: what the bridge sends to which sockets.
//!
//! Positions are coalesced: every tick, each `/dispatch` socket gets one volatile `position`
//! batch with the latest position of every vehicle its rooms cover that moved since the last
//! tick. Sockets with the same rooms share one serialized batch. Status, delivery, ack and
//! announce events are reliable and never coalesced.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::value::RawValue;
use shared::{CommandAck, Topic};
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use tracing::{debug, warn};

use crate::fleet::{PendingPosition, StatusChange, covers};
use crate::metrics::Metrics;
use crate::orders::message_json;
use crate::room::{RoomName, rooms_of};
use crate::socket::{ADMIN, DISPATCH, VENDOR};
use crate::store::{ClientId, Enqueued};

/// An `ack` event: a vehicle answered a command.
#[derive(Debug, Clone, Serialize)]
pub struct AckView<'a> {
    /// Vehicle id.
    pub vehicle: &'a str,
    /// The command's id.
    pub command_id: u32,
    /// `ok`, `busy`, `unsupported` or `invalid`.
    pub result: &'static str,
}

async fn to_rooms<T: Serialize + ?Sized>(
    io: &SocketIo,
    metrics: &Metrics,
    ns: &str,
    rooms: Vec<String>,
    event: &str,
    data: &T,
) {
    let Some(ops) = io.of(ns) else {
        return;
    };
    match ops.to(rooms).emit(event, data).await {
        Ok(()) => metrics.emitted(),
        Err(err) => warn!(%event, cause = %err, "Socket.IO broadcast failed"),
    }
}

/// Emits a `status` change to the rooms covering the vehicle.
pub async fn status(io: &SocketIo, metrics: &Metrics, change: &StatusChange) {
    let rooms = rooms_of(&change.fleet, &change.vehicle).to_vec();
    to_rooms(io, metrics, DISPATCH, rooms, "status", change).await;
}

/// Emits freshly queued messages, each as a `delivery` event with its `message_id`, to the
/// sockets of the client it is queued for (a vendor's store room, a dispatcher identity's room).
pub async fn queued(io: &SocketIo, metrics: &Metrics, messages: &[Enqueued]) {
    for m in messages {
        to_client(io, metrics, &m.client, m.id.0, &m.payload).await;
    }
}

/// Emits one queued message to the sockets of `client`.
pub async fn to_client(
    io: &SocketIo,
    metrics: &Metrics,
    client: &ClientId,
    id: u64,
    payload: &serde_json::Value,
) {
    let ns = if client.as_str().starts_with("vendor:") {
        VENDOR
    } else {
        DISPATCH
    };
    let message = message_json(id, payload);
    to_rooms(
        io,
        metrics,
        ns,
        vec![client.as_str().to_owned()],
        "delivery",
        &message,
    )
    .await;
}

/// Emits an `ack` event to the rooms covering the vehicle.
pub async fn ack(io: &SocketIo, metrics: &Metrics, topic: &Topic, ack: &CommandAck) {
    let view = AckView {
        vehicle: topic.vehicle.as_str(),
        command_id: ack.id,
        result: ack.result.as_str(),
    };
    let rooms = rooms_of(&topic.fleet, &topic.vehicle).to_vec();
    to_rooms(io, metrics, DISPATCH, rooms, "ack", &view).await;
}

/// Emits `event` to every socket of every namespace.
pub async fn everywhere<T: Serialize + ?Sized>(
    io: &SocketIo,
    metrics: &Metrics,
    event: &str,
    data: &T,
) {
    for ns in [DISPATCH, VENDOR, ADMIN] {
        if let Some(ops) = io.of(ns) {
            match ops.emit(event, data).await {
                Ok(()) => metrics.emitted(),
                Err(err) => warn!(%ns, %event, cause = %err, "Socket.IO broadcast failed"),
            }
        }
    }
}

/// Sends this tick's positions: one volatile `position` batch per `/dispatch` socket with the
/// vehicles its rooms cover, each vehicle once.
pub fn positions(io: &SocketIo, metrics: &Metrics, pending: &[PendingPosition]) {
    if pending.is_empty() {
        return;
    }
    let Some(ops) = io.of(DISPATCH) else {
        return;
    };
    // Group sockets by their set of rooms: a batch is built and serialized once per group.
    let mut groups: HashMap<Vec<String>, Vec<SocketRef>> = HashMap::new();
    for socket in ops.sockets() {
        let mut rooms: Vec<String> = socket.rooms().into_iter().map(|r| r.to_string()).collect();
        if rooms.is_empty() {
            continue;
        }
        rooms.sort_unstable();
        groups.entry(rooms).or_default().push(socket);
    }
    for (rooms, sockets) in groups {
        let rooms: Vec<RoomName> = rooms.iter().filter_map(|r| r.parse().ok()).collect();
        let batch: Vec<&RawValue> = pending
            .iter()
            .filter(|p| rooms.iter().any(|r| covers(r, &p.fleet, &p.vehicle)))
            .map(|p| &*p.json)
            .collect();
        if batch.is_empty() {
            continue;
        }
        let json = match serde_json::value::to_raw_value(&batch) {
            Ok(json) => json,
            Err(err) => {
                warn!(cause = %err, "cannot serialize a position batch");
                continue;
            }
        };
        for socket in sockets {
            // Volatile: a socket whose buffer is full skips this batch instead of stalling.
            match socket.volatile().emit("position", &json) {
                Ok(()) => metrics.batch_sent(),
                Err(err) => {
                    metrics.emit_dropped();
                    debug!(sid = %socket.id, cause = %err, "position batch dropped");
                }
            }
        }
    }
}
