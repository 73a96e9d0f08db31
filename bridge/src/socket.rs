//! The Socket.IO side: namespaces, their rooms, and named event handlers.
//!
//! `/dispatch` — dispatchers. Clients `join` / `leave` rooms (`vehicle:{id}`, `fleet:{fleet}`,
//! `all`) and receive `position` and `status` events for the vehicles those rooms cover.
//! Every `join` / `leave` is acknowledged with `{ok: true}` or `{ok: false, error}`.

use std::sync::Arc;

use serde::Serialize;
use serde_json::json;
use shared::Topic;
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, SocketRef, State, TryData};
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::room::{RoomName, rooms_of};

/// The dispatchers' namespace.
pub const DISPATCH: &str = "/dispatch";

/// Registers every namespace and its handlers on `io`.
pub fn register(io: &SocketIo) {
    io.ns(DISPATCH, on_dispatch_connect);
}

async fn on_dispatch_connect(socket: SocketRef, State(metrics): State<Arc<Metrics>>) {
    metrics.socket_delta(true);
    debug!(sid = %socket.id, ns = DISPATCH, "socket connected");
    socket.on("join", on_join);
    socket.on("leave", on_leave);
    socket.on_disconnect(on_disconnect);
}

async fn on_disconnect(socket: SocketRef, State(metrics): State<Arc<Metrics>>) {
    metrics.socket_delta(false);
    debug!(sid = %socket.id, "socket disconnected");
}

/// Parses the room argument of `join` / `leave`, or says why it is not acceptable.
fn requested_room(data: TryData<String>) -> Result<RoomName, String> {
    let TryData(raw) = data;
    let raw = raw.map_err(|_| "expected the room name as a string".to_owned())?;
    raw.parse::<RoomName>().map_err(|err| err.to_string())
}

fn reply(ack: AckSender, result: Result<(), String>) {
    let body = match result {
        Ok(()) => json!({ "ok": true }),
        Err(error) => json!({ "ok": false, "error": error }),
    };
    if let Err(err) = ack.send(&body) {
        debug!(cause = %err, "could not send ack");
    }
}

async fn on_join(socket: SocketRef, data: TryData<String>, ack: AckSender) {
    let result = requested_room(data).map(|room| {
        debug!(sid = %socket.id, %room, "join");
        socket.join(room.to_string());
    });
    if let Err(error) = &result {
        warn!(sid = %socket.id, %error, "join refused");
    }
    reply(ack, result);
}

async fn on_leave(socket: SocketRef, data: TryData<String>, ack: AckSender) {
    let result = requested_room(data).map(|room| {
        debug!(sid = %socket.id, %room, "leave");
        socket.leave(room.to_string());
    });
    reply(ack, result);
}

/// Emits `event` with `data` on `/dispatch` to every room covering the topic's vehicle; a
/// socket in several of those rooms receives it once.
pub async fn emit_to_vehicle<T: Serialize + ?Sized>(
    io: &SocketIo,
    metrics: &Metrics,
    topic: &Topic,
    event: &str,
    data: &T,
) {
    let Some(ns) = io.of(DISPATCH) else {
        return;
    };
    match ns
        .to(rooms_of(&topic.fleet, &topic.vehicle))
        .emit(event, data)
        .await
    {
        Ok(()) => metrics.emitted(),
        Err(err) => warn!(%event, cause = %err, "Socket.IO broadcast failed"),
    }
}
