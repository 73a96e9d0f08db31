//! The Socket.IO side: namespaces, their connect middleware, rooms, and named handlers.
//! `docs/socketio.md` is the reference for clients.
//!
//! - `/dispatch`: dispatchers `join` / `leave` rooms (`vehicle:{id}`, `fleet:{fleet}`, `all`)
//!   within their token's scope, get a `snapshot` on join, then live events; `command` a vehicle.
//! - `/vendor`: each store sits in `vendor:{store}` and cannot join another; `pickup` is
//!   broadcast to every other vendor and to the dispatchers.
//! - `/admin`: `stats`, and `announce` to every socket of every namespace.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};
use shared::VehicleId;
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, Extension, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler as _;
use tracing::{debug, info, instrument, warn};

use crate::auth::{AuthError, Grant, Role};
use crate::command::CommandRequest;
use crate::emit;
use crate::fleet::now_ms;
use crate::hub::Hub;
use crate::orders::{OrderRequest, Placed, client_of, message_json};
use crate::room::{RoomName, vendor_room};
use crate::store::{ClientId, MessageId, StoreError};

/// The dispatchers' namespace.
pub const DISPATCH: &str = "/dispatch";
/// The vendors' (stores') namespace.
pub const VENDOR: &str = "/vendor";
/// The operators' namespace.
pub const ADMIN: &str = "/admin";

/// Registers every namespace, its middleware and its handlers on `io`.
pub fn register(io: &SocketIo) {
    io.ns(DISPATCH, on_dispatch_connect.with(authorize_dispatcher));
    io.ns(VENDOR, on_vendor_connect.with(authorize_vendor));
    io.ns(ADMIN, on_admin_connect.with(authorize_admin));
}

/// The handshake's `auth` object.
#[derive(Debug, Deserialize)]
struct Handshake {
    token: Option<String>,
}

fn authorize(
    socket: &SocketRef,
    auth: TryData<Handshake>,
    hub: &Hub,
    ns: &'static str,
    roles: &[Role],
) -> Result<(), AuthError> {
    let token = auth.0.ok().and_then(|h| h.token);
    match hub.tokens.authorize(token.as_deref(), ns, roles) {
        Ok(grant) => {
            debug!(sid = %socket.id, %ns, who = %grant.name, "authorized");
            socket.extensions.insert(grant);
            Ok(())
        }
        Err(err) => {
            warn!(sid = %socket.id, %ns, cause = %err, "handshake refused");
            Err(err)
        }
    }
}

async fn authorize_dispatcher(
    socket: SocketRef,
    auth: TryData<Handshake>,
    State(hub): State<Arc<Hub>>,
) -> Result<(), AuthError> {
    authorize(
        &socket,
        auth,
        &hub,
        DISPATCH,
        &[Role::Dispatcher, Role::Admin],
    )
}

async fn authorize_vendor(
    socket: SocketRef,
    auth: TryData<Handshake>,
    State(hub): State<Arc<Hub>>,
) -> Result<(), AuthError> {
    authorize(&socket, auth, &hub, VENDOR, &[Role::Vendor])
}

async fn authorize_admin(
    socket: SocketRef,
    auth: TryData<Handshake>,
    State(hub): State<Arc<Hub>>,
) -> Result<(), AuthError> {
    authorize(&socket, auth, &hub, ADMIN, &[Role::Admin])
}

async fn on_disconnect(socket: SocketRef, State(hub): State<Arc<Hub>>) {
    hub.metrics.socket_delta(false);
    debug!(sid = %socket.id, ns = socket.ns(), "socket disconnected");
}

fn reply(ack: AckSender, result: Result<Value, String>) {
    let body = match result {
        Ok(Value::Object(mut fields)) => {
            fields.insert("ok".into(), Value::Bool(true));
            Value::Object(fields)
        }
        Ok(_) => json!({ "ok": true }),
        Err(error) => json!({ "ok": false, "error": error }),
    };
    if let Err(err) = ack.send(&body) {
        debug!(cause = %err, "could not send ack");
    }
}

// ---- /dispatch -------------------------------------------------------------------------

async fn on_dispatch_connect(
    socket: SocketRef,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
) {
    hub.metrics.socket_delta(true);
    socket.on("join", on_join);
    socket.on("leave", on_leave);
    socket.on("command", on_command);
    socket.on("received", on_received);
    socket.on("getAll", on_get_all);
    socket.on_disconnect(on_disconnect);
    join_queue_room(&socket, &grant, &hub).await;
}

/// Puts the socket in its queue identity's room and re-sends what is pending for it.
async fn join_queue_room(socket: &SocketRef, grant: &Grant, hub: &Hub) {
    let Some(client) = client_of(grant) else {
        return;
    };
    socket.join(client.as_str().to_owned());
    match resend_pending(socket, &client, hub).await {
        Ok(0) => {}
        Ok(n) => {
            info!(sid = %socket.id, %client, pending = n, "re-sent pending messages on connect")
        }
        Err(err) => {
            warn!(sid = %socket.id, %client, cause = %err, "could not read pending messages")
        }
    }
}

/// Emits every message still pending for `client` to this socket, oldest first.
async fn resend_pending(
    socket: &SocketRef,
    client: &ClientId,
    hub: &Hub,
) -> Result<usize, StoreError> {
    let pending = hub.store.pending(client).await?;
    for m in &pending {
        if let Err(err) = socket.emit("delivery", &message_json(m.id.0, &m.payload)) {
            debug!(cause = %err, "could not re-send a pending message");
        }
    }
    Ok(pending.len())
}

/// `received`: the client acknowledges a queued message, by `{messageId}` or the bare id.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Received {
    Object {
        #[serde(rename = "messageId")]
        message_id: u64,
    },
    Id(u64),
}

async fn on_received(
    data: TryData<Received>,
    ack: AckSender,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
) {
    let result = async {
        let id = match data.0.map_err(|_| "expected {messageId}".to_owned())? {
            Received::Object { message_id } | Received::Id(message_id) => message_id,
        };
        let client = client_of(&grant).ok_or("no queue for this client")?;
        let removed = hub
            .store
            .ack(&client, MessageId(id))
            .await
            .map_err(|e| e.to_string())?;
        Ok(json!({ "removed": removed }))
    }
    .await;
    reply(ack, result);
}

/// `getAll`: re-sends everything still pending for the client, in order; the ack says how
/// many.
async fn on_get_all(
    socket: SocketRef,
    ack: AckSender,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
) {
    let result = match client_of(&grant) {
        None => Err("no queue for this client".to_owned()),
        Some(client) => resend_pending(&socket, &client, &hub)
            .await
            .map(|n| json!({ "count": n }))
            .map_err(|e| e.to_string()),
    };
    reply(ack, result);
}

/// Parses the room argument of `join` / `leave`.
fn requested_room(data: TryData<String>) -> Result<RoomName, String> {
    let raw = data
        .0
        .map_err(|_| "expected the room name as a string".to_owned())?;
    raw.parse::<RoomName>().map_err(|err| err.to_string())
}

#[instrument(skip_all, fields(sid = %socket.id, who = %grant.name))]
async fn on_join(
    socket: SocketRef,
    data: TryData<String>,
    ack: AckSender,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
) {
    let result = requested_room(data).and_then(|room| {
        let snapshot = {
            let fleet = hub.fleet();
            let vehicle_fleet = match &room {
                RoomName::Vehicle(v) => fleet.fleet_of(v).cloned(),
                _ => None,
            };
            if !grant.may_join(&room, vehicle_fleet.as_ref()) {
                return Err(format!("not allowed to join {room}"));
            }
            fleet.snapshot(&room)
        };
        // The current state first, then live data.
        if let Err(err) = socket.emit("snapshot", &snapshot) {
            debug!(cause = %err, "could not send snapshot");
        }
        socket.join(room.to_string());
        debug!(%room, vehicles = snapshot.len(), "joined");
        Ok(Value::Null)
    });
    if let Err(error) = &result {
        warn!(%error, "join refused");
    }
    reply(ack, result);
}

async fn on_leave(socket: SocketRef, data: TryData<String>, ack: AckSender) {
    let result = requested_room(data).map(|room| {
        socket.leave(room.to_string());
        Value::Null
    });
    reply(ack, result);
}

/// A `command` from a dispatcher: `{vehicle, type, ...}`.
#[derive(Debug, Deserialize)]
struct CommandMessage {
    vehicle: String,
    #[serde(flatten)]
    request: CommandRequest,
}

#[instrument(skip_all, fields(sid = %socket.id, who = %grant.name))]
async fn on_command(
    socket: SocketRef,
    data: TryData<CommandMessage>,
    ack: AckSender,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
) {
    let result = async {
        let message = data.0.map_err(|e| format!("invalid command: {e}"))?;
        let vehicle =
            VehicleId::new(&message.vehicle).map_err(|e| format!("invalid vehicle: {e}"))?;
        let kind = message.request.to_wire().map_err(|e| e.to_string())?;
        let (command_id, result) = hub
            .command(&grant, &vehicle, kind)
            .await
            .map_err(|e| e.to_string())?;
        info!(%vehicle, command_id, result = result.as_str(), "command answered");
        Ok(json!({ "command_id": command_id, "result": result.as_str() }))
    }
    .await;
    if let Err(error) = &result {
        warn!(%error, "command failed");
    }
    reply(ack, result);
}

// ---- /vendor ---------------------------------------------------------------------------

async fn on_vendor_connect(
    socket: SocketRef,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
) {
    hub.metrics.socket_delta(true);
    socket.on("join", on_vendor_join);
    socket.on("pickup", on_pickup);
    socket.on("received", on_received);
    socket.on("getAll", on_get_all);
    socket.on_disconnect(on_disconnect);
    // A vendor's queue room is its store room, `vendor:{store}`.
    join_queue_room(&socket, &grant, &hub).await;
}

async fn on_vendor_join(data: TryData<String>, ack: AckSender, Extension(grant): Extension<Grant>) {
    let own = grant.store.as_deref().map(vendor_room);
    let result = match data.0 {
        Ok(room) if Some(&room) == own.as_ref() => Ok(Value::Null),
        Ok(room) => Err(format!("a vendor can only be in its own room, not {room}")),
        Err(_) => Err("expected the room name as a string".to_owned()),
    };
    reply(ack, result);
}

/// Announces a placed order as `pickup` to every other vendor (not `except`) and every
/// dispatcher.
pub async fn announce_pickup(
    io: &SocketIo,
    except: Option<&SocketRef>,
    store: &str,
    request: &OrderRequest,
    placed: &Placed,
) {
    let announced = json!({
        "store": store,
        "order": placed.order,
        "customer": request.customer,
        "lat": request.lat,
        "lon": request.lon,
        "vehicle": placed.vehicle,
        "state": placed.state,
        "ts_ms": now_ms(),
    });
    // Every other vendor, as in the classic hub, and every dispatcher.
    let vendors = match except {
        Some(sender) => sender.broadcast().emit("pickup", &announced).await,
        None => match io.of(VENDOR) {
            Some(ops) => ops.emit("pickup", &announced).await,
            None => Ok(()),
        },
    };
    if let Err(err) = vendors {
        warn!(cause = %err, "pickup broadcast to vendors failed");
    }
    if let Some(ops) = io.of(DISPATCH)
        && let Err(err) = ops.emit("pickup", &announced).await
    {
        warn!(cause = %err, "pickup broadcast to dispatchers failed");
    }
}

/// The JSON answer to a placed order.
pub fn placed_json(placed: &Placed) -> Value {
    json!({ "order": placed.order, "created": placed.created, "vehicle": placed.vehicle, "state": placed.state })
}

#[instrument(skip_all, fields(sid = %socket.id, who = %grant.name))]
async fn on_pickup(
    socket: SocketRef,
    io: SocketIo,
    data: TryData<OrderRequest>,
    ack: AckSender,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
) {
    let result = async {
        let request = data.0.map_err(|e| format!("invalid pickup: {e}"))?;
        let placed = hub
            .place_order(&grant, &request)
            .await
            .map_err(|e| e.to_string())?;
        let store = grant.store.clone().unwrap_or_default();
        announce_pickup(&io, Some(&socket), &store, &request, &placed).await;
        info!(order = %placed.order, vehicle = ?placed.vehicle, "order placed");
        Ok(placed_json(&placed))
    }
    .await;
    reply(ack, result);
}

// ---- /admin ----------------------------------------------------------------------------

async fn on_admin_connect(socket: SocketRef, State(hub): State<Arc<Hub>>) {
    hub.metrics.socket_delta(true);
    socket.on("stats", on_stats);
    socket.on("announce", on_announce);
    socket.on_disconnect(on_disconnect);
}

async fn on_stats(io: SocketIo, ack: AckSender, State(hub): State<Arc<Hub>>) {
    let clients = |ns: &str| io.of(ns).map_or(0, |ops| ops.sockets().len());
    let stats = json!({
        "bridge": {
            "mqtt_ready": hub.metrics.mqtt_ready(),
            "commands_waiting": hub.commands.len(),
            "metrics": hub.metrics.render(),
        },
        "vehicles": hub.fleet().counts(),
        "clients": {
            "dispatch": clients(DISPATCH),
            "vendor": clients(VENDOR),
            "admin": clients(ADMIN),
        },
    });
    reply(ack, Ok(stats));
}

/// An operator's `announce`.
#[derive(Debug, Deserialize)]
struct Announce {
    message: String,
}

async fn on_announce(
    io: SocketIo,
    data: TryData<Announce>,
    ack: AckSender,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
) {
    let result = match data.0 {
        Err(err) => Err(format!("expected {{message}}: {err}")),
        Ok(Announce { message }) if message.trim().is_empty() || message.len() > 1000 => {
            Err("message must be 1 to 1000 bytes".to_owned())
        }
        Ok(Announce { message }) => {
            let payload = json!({ "message": message, "from": grant.name, "ts_ms": now_ms() });
            emit::everywhere(&io, &hub.metrics, "announce", &payload).await;
            info!(from = %grant.name, "announcement sent");
            Ok(Value::Null)
        }
    };
    reply(ack, result);
}
