//! Server → client emission: what the bridge sends to which sockets.
//!
//! Positions and status changes are batched per tick: every tick, each `/dispatch` socket gets
//! one reliable `status` batch (every liveness change its rooms cover, in order) and one volatile
//! `position` batch (the latest position of every vehicle its rooms cover that moved since the
//! last tick). Sockets with the same rooms share one serialized batch. Delivery, ack and
//! announce events are reliable and sent one by one, as they happen.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::value::RawValue;
use shared::{CommandAck, FleetId, Topic, VehicleId};
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use tracing::{debug, warn};

use crate::fleet::{PendingPosition, StatusChange, VehicleState, covers};
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

/// A socket that missed a reliable batch (its buffer was full): it gets fresh snapshots of its
/// rooms as soon as its buffer has room again, so its picture converges instead of staying wrong.
#[derive(Debug, Clone, Copy)]
struct NeedsSnapshot;

/// Sends this tick's news to every `/dispatch` socket: one reliable `status` batch (the liveness
/// changes of the vehicles its rooms cover, oldest first) and one volatile `position` batch
/// (the latest position of every vehicle its rooms cover that moved), each vehicle once.
/// Sockets with the same rooms share the serialized batches.
///
/// A socket whose buffer is too full for a `status` batch is counted, logged and marked: the
/// next ticks send it `snapshot`s of its rooms (built by `snapshot`) until one gets through.
pub fn tick(
    io: &SocketIo,
    metrics: &Metrics,
    statuses: &[StatusChange],
    pending: &[PendingPosition],
    snapshot: impl Fn(&RoomName) -> Vec<VehicleState>,
) {
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
        let covered =
            |fleet: &FleetId, vehicle: &VehicleId| rooms.iter().any(|r| covers(r, fleet, vehicle));
        let status_batch: Vec<&StatusChange> = statuses
            .iter()
            .filter(|s| covered(&s.fleet, &s.vehicle))
            .collect();
        let status_json = serialize(&status_batch);
        let position_batch: Vec<&RawValue> = pending
            .iter()
            .filter(|p| covered(&p.fleet, &p.vehicle))
            .map(|p| &*p.json)
            .collect();
        let position_json = serialize(&position_batch);
        for socket in sockets {
            if socket.extensions.get::<NeedsSnapshot>().is_some() {
                resync(&socket, metrics, &rooms, &snapshot);
            } else if let Some(json) = &status_json {
                match socket.emit("status", json) {
                    Ok(()) => metrics.emitted(),
                    Err(err) => {
                        metrics.emit_dropped();
                        warn!(sid = %socket.id, changes = status_batch.len(), cause = %err,
                            "status batch not sent: the socket will get fresh snapshots");
                        socket.extensions.insert(NeedsSnapshot);
                    }
                }
            }
            if let Some(json) = &position_json {
                // Volatile: a socket whose buffer is full skips this batch instead of stalling.
                match socket.volatile().emit("position", json) {
                    Ok(()) => metrics.batch_sent(),
                    Err(err) => {
                        metrics.emit_dropped();
                        debug!(sid = %socket.id, cause = %err, "position batch dropped");
                    }
                }
            }
        }
    }
}

/// Serializes a non-empty batch once.
fn serialize<T: Serialize>(batch: &[T]) -> Option<Box<RawValue>> {
    if batch.is_empty() {
        return None;
    }
    serde_json::value::to_raw_value(batch)
        .inspect_err(|err| warn!(cause = %err, "cannot serialize a batch"))
        .ok()
}

/// Sends a socket that missed a `status` batch a snapshot of each of its rooms; clears the mark
/// once all of them got through.
fn resync(
    socket: &SocketRef,
    metrics: &Metrics,
    rooms: &[RoomName],
    snapshot: &impl Fn(&RoomName) -> Vec<VehicleState>,
) {
    for room in rooms {
        if let Err(err) = socket.emit("snapshot", &snapshot(room)) {
            debug!(sid = %socket.id, %room, cause = %err, "snapshot for a resync not sent yet");
            return;
        }
        metrics.emitted();
    }
    socket.extensions.remove::<NeedsSnapshot>();
    warn!(sid = %socket.id, "socket resynchronised with fresh snapshots");
}
