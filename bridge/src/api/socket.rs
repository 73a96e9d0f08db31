//! The Socket.IO side: namespaces, their connect middleware, and named handlers for what
//! clients send. `docs/socketio.md` is the reference for clients.
//!
//! - `/dispatch`: dispatchers `join` / `leave` rooms (`vehicle:{id}`, `fleet:{fleet}`, `all`)
//!   within their token's scope, get a `snapshot` on join, then live events; `command` a vehicle.
//! - `/vendor`: each store sits in `vendor:{store}` and cannot join another; `pickup` goes to
//!   the dispatchers of the store's fleet (and the store's other sockets), nobody else.
//! - `/admin`: `stats`, and `announce` to every socket of every namespace.
//!
//! `/dispatch` and `/vendor` both serve the durable queue: `received`, `getAll` (paged), and
//! the first page of pending messages re-sent on connect.
//!
//! What one client may cost is bounded by `limits` ([`SocketGuard`]): connections per token
//! (checked in the connect middleware), joins per second and rooms per socket (in `join`), the
//! page size of the queue.

use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::Value;
use shared::VehicleId;
use socketioxide::SocketIo;
use socketioxide::adapter::{Adapter, LocalAdapter};
use socketioxide::extract::{AckSender, Extension, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler as _;
use tracing::{debug, info, instrument, warn};

use super::adapter::{RedisLink, SharedAdapter};
use super::limits::{JoinBudget, Limit, SocketGuard, Ticket};
use crate::clock::now_ms;
use crate::domain::Hub;
use crate::domain::auth::{AuthError, Entrance, Grant, Role};
use crate::domain::command::CommandRequest;
use crate::domain::delivery::OrderRequest;
use crate::store::{MessageId, StoreError};
use crate::view::room::{ADMIN, DISPATCH, RoomName, VENDOR, scope_rooms, vendor_room};
use crate::view::vehicle::command_answer;
use crate::view::{emit, order, reply};

/// Opens every namespace on `$io` (a `SocketIo<$adapter>`, a concrete adapter: socketioxide
/// opens namespaces on those only); the adapter's answers, one per namespace.
macro_rules! open_all {
    ($io:expr, $adapter:ty) => {
        [
            open!($io, Dispatchers, $adapter),
            open!($io, Vendors, $adapter),
            open!($io, Admins, $adapter),
        ]
    };
}

/// Opens namespace `$ns` on `$io`: its connect middleware and handler.
macro_rules! open {
    ($io:expr, $ns:ty, $adapter:ty) => {
        $io.ns(
            <$ns as Entrance>::NAME,
            on_connect::<$ns, $adapter>.with(authorize::<$ns, $adapter>),
        )
    };
}

/// Registers every namespace, its middleware and its handlers on `io` (one bridge alone).
pub(crate) fn register(io: &SocketIo<LocalAdapter>) {
    let [(), (), ()] = open_all!(io, LocalAdapter);
}

/// Registers every namespace, its middleware and its handlers on `io` (several bridges,
/// through Redis). Returns the initialisation of each namespace's adapter (it subscribes to
/// the namespace's Redis channels): await them.
pub(crate) fn register_shared(
    io: &SocketIo<SharedAdapter>,
) -> [socketioxide_redis::InitRes<RedisLink>; 3] {
    open_all!(io, SharedAdapter)
}

/// A namespace: who may come in (its [`Entrance`]), and what they do there.
trait Namespace: Entrance + Send + Sync + 'static {
    /// Whether its clients have a durable queue (`received`, `getAll`, and their pending
    /// messages re-sent on connect).
    const QUEUE: bool;

    /// Whether its sockets sit in their token's scope rooms (`view::room::scope_rooms`), to
    /// get the `pickup`s of the fleets they may see.
    const SCOPED: bool;

    /// Registers the namespace's own event handlers on a connected socket.
    fn handlers<A: Adapter>(socket: &SocketRef<A>);
}

/// `/dispatch`: dispatchers, and operators.
struct Dispatchers;
/// `/vendor`: stores.
struct Vendors;
/// `/admin`: operators.
struct Admins;

impl Entrance for Dispatchers {
    const NAME: &'static str = DISPATCH;
    const ROLES: &'static [Role] = &[Role::Dispatcher, Role::Admin];
}

impl Namespace for Dispatchers {
    const QUEUE: bool = true;
    const SCOPED: bool = true;

    fn handlers<A: Adapter>(socket: &SocketRef<A>) {
        socket.on("join", on_join::<A>);
        socket.on("leave", on_leave::<A>);
        socket.on("command", on_command::<A>);
    }
}

impl Entrance for Vendors {
    const NAME: &'static str = VENDOR;
    const ROLES: &'static [Role] = &[Role::Vendor];
}

impl Namespace for Vendors {
    const QUEUE: bool = true;
    const SCOPED: bool = false;

    fn handlers<A: Adapter>(socket: &SocketRef<A>) {
        socket.on("join", on_vendor_join::<A>);
        socket.on("pickup", on_pickup::<A>);
    }
}

impl Entrance for Admins {
    const NAME: &'static str = ADMIN;
    const ROLES: &'static [Role] = &[Role::Admin];
}

impl Namespace for Admins {
    const QUEUE: bool = false;
    const SCOPED: bool = false;

    fn handlers<A: Adapter>(socket: &SocketRef<A>) {
        socket.on("stats", on_stats::<A>);
        socket.on("announce", on_announce::<A>);
    }
}

/// The handshake's `auth` object.
#[derive(Debug, Deserialize)]
struct Handshake {
    token: Option<String>,
}

/// Why a handshake is refused; the message goes to the client in `connect_error`.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// The token.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The token has `connections_per_token` connections open already.
    #[error("too many connections with this token (at most {0})")]
    TooManyConnections(u32),
}

/// The connect middleware of namespace `N`: checks the handshake's token and that it has a
/// connection left (`connections_per_token`), and keeps its [`Grant`] and [`Ticket`] in the
/// socket's extensions.
async fn authorize<N: Namespace, A: Adapter>(
    socket: SocketRef<A>,
    auth: TryData<Handshake>,
    State(hub): State<Arc<Hub>>,
    State(guard): State<Arc<SocketGuard>>,
) -> Result<(), Refusal> {
    let token = auth.0.ok().and_then(|h| h.token);
    let admitted = hub
        .authorize::<N>(token.as_deref())
        .map_err(Refusal::from)
        .and_then(|grant| {
            let ticket = guard
                .admit(&grant.name)
                .map_err(Refusal::TooManyConnections)?;
            Ok((grant, ticket))
        });
    match admitted {
        Ok((grant, ticket)) => {
            debug!(sid = %socket.id, ns = N::NAME, who = %grant.name, "authorized");
            socket.extensions.insert(grant);
            socket.extensions.insert(ticket);
            socket.extensions.insert(guard.join_budget());
            Ok(())
        }
        Err(err) => {
            warn!(sid = %socket.id, ns = N::NAME, cause = %err, "handshake refused");
            Err(err)
        }
    }
}

/// A socket connected to namespace `N` (its token checked): counts it, puts it in its scope
/// rooms, registers the handlers, and serves its durable queue.
async fn on_connect<N: Namespace, A: Adapter>(
    socket: SocketRef<A>,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
    State(guard): State<Arc<SocketGuard>>,
) {
    hub.metrics().socket_delta(true);
    socket.on_disconnect(on_disconnect::<A>);
    if N::SCOPED {
        socket.join(scope_rooms(&grant));
    }
    N::handlers(&socket);
    if N::QUEUE {
        serve_queue(&socket, &grant, &hub, guard.limits().get_all_page).await;
    }
}

async fn on_disconnect<A: Adapter>(
    socket: SocketRef<A>,
    State(hub): State<Arc<Hub>>,
    State(guard): State<Arc<SocketGuard>>,
) {
    hub.metrics().socket_delta(false);
    if let Some(ticket) = socket.extensions.remove::<Ticket>() {
        guard.release(&ticket);
    }
    debug!(sid = %socket.id, ns = socket.ns(), "socket disconnected");
}

/// Sends `result` as the ack of a client event.
fn reply<A: Adapter>(ack: AckSender<A>, result: Result<Value, String>) {
    if let Err(err) = ack.send(&reply::ack(result)) {
        debug!(cause = %err, "could not send ack");
    }
}

// ---- the durable queue (/dispatch and /vendor) -----------------------------------------

/// Serves the client's durable queue on `socket`: puts it in its queue identity's room (a
/// vendor's is its store room, `vendor:{store}`), re-sends the first `page` messages pending
/// for it, and answers `received` and `getAll`.
async fn serve_queue<A: Adapter>(socket: &SocketRef<A>, grant: &Grant, hub: &Hub, page: u32) {
    socket.on("received", on_received::<A>);
    socket.on("getAll", on_get_all::<A>);
    let Some(client) = grant.queue_client() else {
        return;
    };
    socket.join(client.as_str().to_owned());
    match resend_pending(socket, grant, hub, MessageId(0), page).await {
        Ok((0, _)) => {}
        Ok((n, next)) => {
            info!(sid = %socket.id, %client, pending = n, more = next.is_some(), "re-sent pending messages on connect")
        }
        Err(err) => {
            warn!(sid = %socket.id, %client, cause = %err, "could not read pending messages")
        }
    }
}

/// Emits one page of the messages still pending for the queue of `grant` to this socket,
/// oldest first: at most `limit` with an id above `after`, those it may still see. Returns how
/// many were sent, and the cursor of the next page if there is more (the last id read).
async fn resend_pending<A: Adapter>(
    socket: &SocketRef<A>,
    grant: &Grant,
    hub: &Hub,
    after: MessageId,
    limit: u32,
) -> Result<(usize, Option<MessageId>), StoreError> {
    let Some(client) = grant.queue_client() else {
        return Ok((0, None));
    };
    // One more than the page: whether there is a next page, without a second query.
    let mut pending = hub
        .pending_messages(&client, after, limit.saturating_add(1))
        .await?;
    let more = pending.len() > limit as usize;
    pending.truncate(limit as usize);
    let held_back = emit::pending(socket, grant, &pending);
    if held_back > 0 {
        warn!(sid = %socket.id, %client, held_back, "queued messages outside the token's scope not sent");
    }
    let next = more.then(|| pending.last().map(|m| m.id)).flatten();
    Ok((pending.len() - held_back, next))
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

async fn on_received<A: Adapter>(
    data: TryData<Received>,
    ack: AckSender<A>,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
) {
    let result = async {
        let id = match data.0.map_err(|_| "expected {messageId}".to_owned())? {
            Received::Object { message_id } | Received::Id(message_id) => message_id,
        };
        let client = grant.queue_client().ok_or("no queue for this client")?;
        let removed = hub
            .acknowledge_message(&client, MessageId(id))
            .await
            .map_err(|e| e.to_string())?;
        Ok(reply::removed(removed))
    }
    .await;
    reply(ack, result);
}

/// The optional argument of `getAll`: where the page starts and how long it may be.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageRequest {
    /// The cursor: the `next` of the page before (messages with a higher id).
    after: Option<u64>,
    /// At most this many (capped at `get_all_page`).
    limit: Option<u32>,
}

/// `getAll` (optionally `{after, limit}`): re-sends one page of what is still pending for the
/// client, in order; the ack says how many, and `next`, the cursor of the next page, if there
/// is more.
async fn on_get_all<A: Adapter>(
    socket: SocketRef<A>,
    data: TryData<Option<PageRequest>>,
    ack: AckSender<A>,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
    State(guard): State<Arc<SocketGuard>>,
) {
    let result = async {
        let page = match data.0 {
            Ok(page) => page,
            // `getAll` without an argument.
            Err(err) if err.to_string().contains("first element not found") => None,
            Err(err) => return Err(format!("expected nothing or {{after, limit}}: {err}")),
        }
        .unwrap_or_default();
        grant.queue_client().ok_or("no queue for this client")?;
        let max = guard.limits().get_all_page;
        let limit = page.limit.unwrap_or(max).clamp(1, max);
        let (count, next) = resend_pending(
            &socket,
            &grant,
            &hub,
            MessageId(page.after.unwrap_or(0)),
            limit,
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(reply::resent(count, next.map(|id| id.0)))
    }
    .await;
    reply(ack, result);
}

// ---- /dispatch -------------------------------------------------------------------------

/// Parses the room argument of `join` / `leave`.
fn requested_room(data: TryData<String>) -> Result<RoomName, String> {
    let raw = data
        .0
        .map_err(|_| "expected the room name as a string".to_owned())?;
    raw.parse::<RoomName>().map_err(|err| err.to_string())
}

/// Whether `socket` may join `room` now: within its join budget (`joins_per_second`) and its
/// room count (`rooms_per_socket`; a room it is in already does not count again). Refusals
/// are counted.
fn within_limits<A: Adapter>(
    socket: &SocketRef<A>,
    room: &RoomName,
    guard: &SocketGuard,
) -> Result<(), String> {
    let limits = guard.limits();
    let budget = socket.extensions.get::<JoinBudget>();
    if budget.is_some_and(|b| !b.take(limits.joins_per_second, Instant::now())) {
        guard.refused(Limit::JoinRate);
        return Err(format!(
            "too many joins: at most {} per second",
            limits.joins_per_second
        ));
    }
    let name = room.to_string();
    let rooms: Vec<String> = socket
        .rooms()
        .iter()
        .map(ToString::to_string)
        .filter(|r| r.parse::<RoomName>().is_ok())
        .collect();
    if !rooms.contains(&name) && rooms.len() >= limits.rooms_per_socket as usize {
        guard.refused(Limit::Rooms);
        return Err(format!(
            "too many rooms: at most {} per socket, leave one first",
            limits.rooms_per_socket
        ));
    }
    Ok(())
}

#[instrument(skip_all, fields(sid = %socket.id, who = %grant.name))]
async fn on_join<A: Adapter>(
    socket: SocketRef<A>,
    data: TryData<String>,
    ack: AckSender<A>,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
    State(guard): State<Arc<SocketGuard>>,
) {
    let result = requested_room(data).and_then(|room| {
        within_limits(&socket, &room, &guard)?;
        let vehicle_fleet = match &room {
            RoomName::Vehicle(v) => hub.fleet_of(v),
            _ => None,
        };
        // The same answer for a vehicle of another fleet and one that does not exist.
        if !room.admits(&grant, vehicle_fleet.as_ref()) {
            return Err(format!("not allowed to join {room}"));
        }
        let snapshot = hub.snapshot(|fleet, vehicle| room.covers(fleet, vehicle));
        // The current state first, then live data.
        if let Err(err) =
            emit::snapshot(&socket, &snapshot, guard.limits().max_packet_bytes as usize)
        {
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

async fn on_leave<A: Adapter>(socket: SocketRef<A>, data: TryData<String>, ack: AckSender<A>) {
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
async fn on_command<A: Adapter>(
    socket: SocketRef<A>,
    data: TryData<CommandMessage>,
    ack: AckSender<A>,
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
        Ok(command_answer(command_id, result))
    }
    .await;
    if let Err(error) = &result {
        warn!(%error, "command failed");
    }
    reply(ack, result);
}

// ---- /vendor ---------------------------------------------------------------------------

async fn on_vendor_join<A: Adapter>(
    data: TryData<String>,
    ack: AckSender<A>,
    Extension(grant): Extension<Grant>,
) {
    let own = grant.store.as_deref().map(vendor_room);
    let result = match data.0 {
        Ok(room) if Some(&room) == own.as_ref() => Ok(Value::Null),
        Ok(room) => Err(format!("a vendor can only be in its own room, not {room}")),
        Err(_) => Err("expected the room name as a string".to_owned()),
    };
    reply(ack, result);
}

/// Places `request` for `grant` (a vendor; a dispatcher or an admin on a store's behalf) and
/// announces it as `pickup` to the dispatchers of the store's fleet and to the store's other
/// sockets (not `sender`, when it comes from a
/// socket: the sender gets the answer); `Ok` is the answer to the vendor.
///
/// # Errors
/// The order could not be placed (see `Hub::place_order`).
pub(crate) async fn place_and_announce<A: Adapter>(
    hub: &Hub,
    io: &SocketIo<A>,
    sender: Option<&SocketRef<A>>,
    grant: &Grant,
    request: &OrderRequest,
) -> Result<crate::domain::delivery::Placed, crate::domain::delivery::OrderError> {
    let placed = hub.place_order(grant, request).await?;
    let announced = order::pickup(&placed.store, request, &placed, now_ms());
    let room = vendor_room(&placed.store);
    emit::pickup(
        io,
        hub.metrics(),
        (&placed.fleet, &room),
        sender,
        &announced,
    )
    .await;
    Ok(placed)
}

#[instrument(skip_all, fields(sid = %socket.id, who = %grant.name))]
async fn on_pickup<A: Adapter>(
    socket: SocketRef<A>,
    io: SocketIo<A>,
    data: TryData<OrderRequest>,
    ack: AckSender<A>,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
) {
    let result = async {
        let request = data.0.map_err(|e| format!("invalid pickup: {e}"))?;
        let placed = place_and_announce(&hub, &io, Some(&socket), &grant, &request)
            .await
            .map_err(|e| e.to_string())?;
        info!(order = %placed.order, vehicle = ?placed.vehicle, "order placed");
        Ok(order::placed(&placed))
    }
    .await;
    reply(ack, result);
}

// ---- /admin ----------------------------------------------------------------------------

async fn on_stats<A: Adapter>(
    io: SocketIo<A>,
    ack: AckSender<A>,
    State(hub): State<Arc<Hub>>,
    State(guard): State<Arc<SocketGuard>>,
) {
    let clients = |ns: &str| io.of(ns).map_or(0, |ops| ops.sockets().len());
    let stats = reply::stats(reply::Stats {
        mqtt_ready: hub.metrics().mqtt_ready(),
        commands_waiting: hub.commands_waiting(),
        metrics: hub.metrics_text() + &guard.render(),
        vehicles: hub.liveness_counts(),
        clients: [clients(DISPATCH), clients(VENDOR), clients(ADMIN)],
    });
    reply(ack, Ok(stats));
}

/// An operator's `announce`.
#[derive(Debug, Deserialize)]
struct Announce {
    message: String,
}

async fn on_announce<A: Adapter>(
    io: SocketIo<A>,
    data: TryData<Announce>,
    ack: AckSender<A>,
    Extension(grant): Extension<Grant>,
    State(hub): State<Arc<Hub>>,
) {
    let result = match data.0 {
        Err(err) => Err(format!("expected {{message}}: {err}")),
        Ok(Announce { message }) if message.trim().is_empty() || message.len() > 1000 => {
            Err("message must be 1 to 1000 bytes".to_owned())
        }
        Ok(Announce { message }) => {
            let payload = reply::announcement(&message, &grant.name, now_ms());
            emit::everywhere(&io, hub.metrics(), "announce", &payload).await;
            info!(from = %grant.name, "announcement sent");
            Ok(Value::Null)
        }
    };
    reply(ack, result);
}
