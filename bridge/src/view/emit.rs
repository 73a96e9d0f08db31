//! Server → client emission: what the bridge sends to which sockets.
//!
//! Positions and status changes are batched per flush (every tick, and between ticks while the
//! load is light: `super::pace`): each `/dispatch` socket gets one `status` batch (every
//! liveness change its rooms cover, in order) and one `position` batch (the latest position of
//! every vehicle its rooms cover that moved since the last flush). Sockets with the same rooms
//! share one serialized batch. Delivery, ack, pickup and announce events are sent one by one,
//! as they happen. Everything is queued on the socket in order; a socket whose queue is full
//! misses a batch, counted and logged, and gets fresh snapshots instead.
//!
//! No packet the bridge writes to a socket is larger than `max_packet_bytes`
//! (`[socketio]`, see `api::limits`): a batch or a snapshot that would be is split into several
//! events of the same name, in order ([`packed`]). With socketioxide's buffer bounded in packets
//! (`buffer_packets`), that bounds the bytes a socket may have waiting.

use std::any::TypeId;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use shared::{CommandAck, FleetId, Topic, VehicleId};
use socketioxide::SocketIo;
use socketioxide::adapter::{Adapter, LocalAdapter};
use socketioxide::extract::SocketRef;
use socketioxide::operators::BroadcastOperators;
use tracing::{debug, error, warn};

use super::order;
use super::room::{ADMIN, DISPATCH, RoomName, VENDOR, pickup_rooms, rooms_of, vendor_room};
use super::vehicle::{AckView, PositionView, StatusView, VehicleView};
use crate::domain::Hub;
use crate::domain::auth::Grant;
use crate::domain::fleet::{Moved, TickNews, VehicleState};
use crate::metrics::{Counter, Metrics};
use crate::store::{ClientId, Enqueued, QueuedMessage};

/// Emits `event` to the sockets in any of `rooms` of namespace `ns`, whichever bridge they are
/// connected to (through the adapter); see [`broadcast`].
pub(crate) async fn to_rooms<A: Adapter, T: Serialize + ?Sized>(
    io: &SocketIo<A>,
    metrics: &Metrics,
    ns: &str,
    rooms: Vec<String>,
    event: &str,
    data: &T,
) {
    if let Some(ops) = io.of(ns) {
        broadcast(ops.to(rooms), metrics, ns, event, data).await;
    }
}

/// Emits `event` to the sockets `ops` selects, on every bridge. A failed broadcast (with the
/// Redis adapter: Redis unreachable) is counted and logged, and the event goes to this
/// bridge's own sockets at least.
///
/// A bridge alone (socketioxide's [`LocalAdapter`]) first looks whether any socket is in the
/// rooms, and if none is, skips the event before serializing it (counted
/// [`Counter::EmitUnheard`]): an order's change and its queued messages are usually for rooms
/// nobody has open (a vendor offline, the queue is there for that; a fleet no dispatcher
/// watches). A socket that joins right after the look misses the event as one that joined
/// right after the emit would (its queued messages reach it as pending when it joins). With
/// the Redis adapter the sockets may be on other bridges, so every event is broadcast.
pub(crate) async fn broadcast<A: Adapter, T: Serialize + ?Sized>(
    ops: BroadcastOperators<A>,
    metrics: &Metrics,
    ns: &str,
    event: &str,
    data: &T,
) {
    if alone::<A>() && ops.clone().sockets().is_empty() {
        metrics.count(Counter::EmitUnheard);
        return;
    }
    let local = ops.clone().local();
    match ops.emit(event, data).await {
        Ok(()) => metrics.count(Counter::Emitted),
        Err(err) => {
            metrics.count(Counter::BroadcastFailed);
            warn!(%ns, %event, cause = %err, "Socket.IO broadcast failed: sent to this bridge's sockets only");
            if let Err(err) = local.emit(event, data).await {
                warn!(%ns, %event, cause = %err, "Socket.IO broadcast to this bridge's sockets failed");
            }
        }
    }
}

/// Whether `A` is socketioxide's [`LocalAdapter`]: this bridge's sockets are all there are.
fn alone<A: Adapter>() -> bool {
    TypeId::of::<A>() == TypeId::of::<LocalAdapter>()
}

/// A future of an emission, boxed: what [`Outlet`] returns.
pub(crate) type Emitting<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What the MQTT side emits, whatever the Socket.IO adapter: implemented by every
/// `SocketIo<A>`, so that `ingest` holds an `Arc<dyn Outlet>` and is not generic.
pub(crate) trait Outlet: Send + Sync + 'static {
    /// [`queued`] on this server.
    fn queued<'a>(&'a self, metrics: &'a Metrics, messages: &'a [Enqueued]) -> Emitting<'a>;

    /// [`command_ack`] on this server.
    fn command_ack<'a>(
        &'a self,
        metrics: &'a Metrics,
        topic: &'a Topic,
        ack: &'a CommandAck,
    ) -> Emitting<'a>;
}

impl<A: Adapter> Outlet for SocketIo<A> {
    fn queued<'a>(&'a self, metrics: &'a Metrics, messages: &'a [Enqueued]) -> Emitting<'a> {
        Box::pin(queued(self, metrics, messages))
    }

    fn command_ack<'a>(
        &'a self,
        metrics: &'a Metrics,
        topic: &'a Topic,
        ack: &'a CommandAck,
    ) -> Emitting<'a> {
        Box::pin(command_ack(self, metrics, topic, ack))
    }
}

/// Emits freshly queued messages, each as a `delivery` event with its `message_id`, to the
/// sockets of the client it is queued for (a vendor's store room, a dispatcher identity's room).
pub(crate) async fn queued<A: Adapter>(io: &SocketIo<A>, metrics: &Metrics, messages: &[Enqueued]) {
    for m in messages {
        to_client(io, metrics, &m.client, m.id.0, &m.payload).await;
    }
}

/// Emits one queued message to the sockets of `client`.
async fn to_client<A: Adapter>(
    io: &SocketIo<A>,
    metrics: &Metrics,
    client: &ClientId,
    id: u64,
    payload: &Value,
) {
    let ns = if client.is_vendor() { VENDOR } else { DISPATCH };
    let message = order::message(id, payload);
    let room = vec![client.as_str().to_owned()];
    to_rooms(io, metrics, ns, room, "delivery", &message).await;
}

/// Re-sends messages still pending for the client of `socket`, oldest first, as `delivery`
/// events to that socket only.
///
/// A message `grant` may no longer see (its token's scope was narrowed since it was queued:
/// another fleet, another store) is not sent; it stays queued until retention removes it.
/// Returns how many were held back.
pub(crate) fn pending<A: Adapter>(
    socket: &SocketRef<A>,
    grant: &Grant,
    messages: &[QueuedMessage],
) -> usize {
    let mut held_back = 0;
    for m in messages {
        if !order::visible_to(&m.payload, grant) {
            held_back += 1;
            continue;
        }
        if let Err(err) = socket.emit("delivery", &order::message(m.id.0, &m.payload)) {
            debug!(cause = %err, "could not re-send a pending message");
        }
    }
    held_back
}

/// Emits an `ack` event to the rooms covering the vehicle.
pub(crate) async fn command_ack<A: Adapter>(
    io: &SocketIo<A>,
    metrics: &Metrics,
    topic: &Topic,
    ack: &CommandAck,
) {
    let view = AckView::new(&topic.vehicle, ack);
    let rooms = rooms_of(&topic.fleet, &topic.vehicle).to_vec();
    to_rooms(io, metrics, DISPATCH, rooms, "ack", &view).await;
}

/// Emits `event` to every socket of every namespace, on every bridge.
pub(crate) async fn everywhere<A: Adapter, T: Serialize + ?Sized>(
    io: &SocketIo<A>,
    metrics: &Metrics,
    event: &str,
    data: &T,
) {
    for ns in [DISPATCH, VENDOR, ADMIN] {
        if let Some(ops) = io.of(ns) {
            broadcast(ops, metrics, ns, event, data).await;
        }
    }
}

/// Announces a placed order of `fleet` (`announced`, see [`order::pickup`], with the
/// customer's details) as `pickup`: to every `/dispatch` socket whose token may see `fleet`
/// (the scope rooms of [`pickup_rooms`], joined at connect), and to the placing store's own
/// other sockets (its room `store_room`, not `sender`: the sender has its ack), on every
/// bridge. Never to other stores, never to dispatchers of other fleets.
pub(crate) async fn pickup<A: Adapter>(
    io: &SocketIo<A>,
    metrics: &Metrics,
    (fleet, store_room): (&FleetId, &str),
    sender: Option<&SocketRef<A>>,
    announced: &Value,
) {
    to_rooms(
        io,
        metrics,
        DISPATCH,
        pickup_rooms(fleet).to_vec(),
        "pickup",
        announced,
    )
    .await;
    // The store's other sockets: not the sender, which has its ack.
    let own = match sender {
        Some(sender) => Some(sender.to(store_room.to_owned())),
        None => io.of(VENDOR).map(|ops| ops.to(store_room.to_owned())),
    };
    if let Some(own) = own {
        broadcast(own, metrics, VENDOR, "pickup", announced).await;
    }
}

/// Emits an `order` event (`event`, see [`order::changed`]) about an order of `fleet` placed
/// by `store`: to every `/dispatch` socket whose token may see `fleet` (the scope rooms of
/// [`pickup_rooms`], as `pickup`) and to every `/vendor` socket of that store (its room
/// `vendor:{store}`), on every bridge. Reliable, not queued.
pub(crate) async fn order<A: Adapter>(
    io: &SocketIo<A>,
    metrics: &Metrics,
    (fleet, store): (&FleetId, &str),
    event: &Value,
) {
    to_rooms(
        io,
        metrics,
        DISPATCH,
        pickup_rooms(fleet).to_vec(),
        "order",
        event,
    )
    .await;
    to_rooms(
        io,
        metrics,
        VENDOR,
        vec![vendor_room(store)],
        "order",
        event,
    )
    .await;
}

/// Sends `socket` the `snapshot` of a room: the state of every vehicle in `states`, in one
/// `snapshot` event or, past `max_packet` bytes, in several (each a list of vehicles; a client
/// applies each as it comes).
///
/// # Errors
/// Socketioxide's error if the socket cannot take a part (gone, or its buffer full).
pub(crate) fn snapshot<A: Adapter>(
    socket: &SocketRef<A>,
    states: &[VehicleState],
    max_packet: usize,
) -> Result<(), socketioxide::SendError> {
    let views: Vec<Box<RawValue>> = VehicleView::all(states)
        .iter()
        .filter_map(|view| {
            serde_json::value::to_raw_value(view)
                .inspect_err(|err| error!(cause = %err, "cannot serialize a vehicle's state"))
                .ok()
        })
        .collect();
    let parts = packed(views.iter().map(|v| &**v), max_packet);
    if parts.is_empty() {
        return socket.emit("snapshot", &[(); 0]);
    }
    for part in &parts {
        socket.emit("snapshot", part)?;
    }
    Ok(())
}

/// `items` (serialized JSON values) as JSON arrays of at most `max_bytes` bytes each, in
/// order; an item too large for any array is alone in its own. None for no items.
///
/// Each array is written by serializing the items as raw values, never parsed again: a
/// `RawValue::from_string` of the joined text would check the whole batch's JSON once more
/// (about a tenth of the emit stage's samples in a call-graph profile at 10 000 vehicles ×
/// 1 Hz, bench/HISTORY.md).
pub(crate) fn packed<'a>(
    items: impl IntoIterator<Item = &'a RawValue>,
    max_bytes: usize,
) -> Vec<Box<RawValue>> {
    let mut parts = Vec::new();
    let mut current: Vec<&RawValue> = Vec::new();
    // The length of `current` as a JSON array: `[` + items + `,` between them + `]`.
    let mut len = 2;
    let close = |array: &mut Vec<&RawValue>, parts: &mut Vec<Box<RawValue>>| {
        match serde_json::value::to_raw_value(array) {
            Ok(raw) => parts.push(raw),
            Err(err) => error!(cause = %err, "a packed batch cannot be serialized"),
        }
        array.clear();
    };
    for item in items {
        let size = item.get().len();
        if !current.is_empty() && len + 1 + size > max_bytes {
            close(&mut current, &mut parts);
            len = 2;
        }
        len += size + usize::from(!current.is_empty());
        current.push(item);
    }
    if !current.is_empty() {
        close(&mut current, &mut parts);
    }
    parts
}

/// A socket that missed a batch (its buffer was full): it gets fresh snapshots of its
/// rooms as soon as its buffer has room again, so its picture converges instead of staying wrong.
#[derive(Debug, Clone, Copy)]
struct NeedsSnapshot;

/// Sends the news since the last flush to every `/dispatch` socket: one `status` batch (the
/// liveness changes of the vehicles its rooms cover, oldest first) and one `position` batch
/// (the latest position of every vehicle its rooms cover that moved), each vehicle once.
/// Sockets with the same rooms share the serialized batches.
///
/// A socket whose buffer is too full for a batch is counted, logged and marked: the next ticks
/// send it `snapshot`s of its rooms until one gets through. `resync` is false for a
/// flush between ticks ([`super::pace`]): a marked socket then gets nothing and waits for the
/// tick's snapshots, so a slow socket costs one snapshot per tick at most.
///
/// A batch larger than `max_packet` bytes goes as several events of the same name ([`packed`]).
/// `news` is the caller's, kept from flush to flush so that its lists keep their room.
/// Returns how many vehicles' positions went out.
pub(crate) fn send_batches<A: Adapter>(
    io: &SocketIo<A>,
    hub: &Hub,
    news: &mut TickNews,
    max_packet: usize,
    resync: bool,
) -> usize {
    hub.take_tick_news(news);
    let news = &*news;
    let moved = news.moved.len();
    let metrics = hub.metrics();
    let Some(ops) = io.of(DISPATCH) else {
        return moved;
    };
    // Group sockets by their set of rooms: a batch is built and serialized once per group.
    let mut groups: HashMap<Vec<String>, Vec<SocketRef<A>>> = HashMap::new();
    for socket in ops.sockets() {
        // Only the rooms that cover vehicles: not the identity and scope rooms.
        let mut rooms: Vec<String> = socket
            .rooms()
            .into_iter()
            .map(|r| r.to_string())
            .filter(|r| r.parse::<RoomName>().is_ok())
            .collect();
        if rooms.is_empty() {
            continue;
        }
        rooms.sort_unstable();
        groups.entry(rooms).or_default().push(socket);
    }
    if groups.is_empty() {
        // Nobody watches a vehicle: nothing to serialize.
        return moved;
    }
    // Each status change and each position is serialized once, whatever the number of
    // batches it goes into.
    let statuses: Vec<Option<Box<RawValue>>> = news
        .statuses
        .iter()
        .map(|change| {
            serde_json::value::to_raw_value(&StatusView::new(change))
                .inspect_err(|err| error!(vehicle = %change.vehicle, cause = %err, "cannot serialize a status change"))
                .ok()
        })
        .collect();
    let positions: Vec<(&Moved, Box<RawValue>)> = news
        .moved
        .iter()
        .filter_map(|m| {
            let view = PositionView::new(&m.fleet, &m.vehicle, &m.heartbeat);
            serde_json::value::to_raw_value(&view)
                .inspect_err(
                    |err| error!(vehicle = %m.vehicle, cause = %err, "cannot serialize a position"),
                )
                .ok()
                .map(|json| (m, json))
        })
        .collect();
    for (rooms, sockets) in groups {
        let rooms: Vec<RoomName> = rooms.iter().filter_map(|r| r.parse().ok()).collect();
        let covered =
            |fleet: &FleetId, vehicle: &VehicleId| rooms.iter().any(|r| r.covers(fleet, vehicle));
        let status_parts = packed(
            news.statuses
                .iter()
                .zip(&statuses)
                .filter(|(change, _)| covered(&change.fleet, &change.vehicle))
                .filter_map(|(_, json)| json.as_deref()),
            max_packet,
        );
        let position_parts = packed(
            positions
                .iter()
                .filter(|(m, _)| covered(&m.fleet, &m.vehicle))
                .map(|(_, json)| &**json),
            max_packet,
        );
        for socket in sockets {
            if socket.extensions.get::<NeedsSnapshot>().is_some() {
                if !resync {
                    continue;
                }
                self::resync(&socket, hub, &rooms, max_packet);
            } else {
                for json in &status_parts {
                    if let Err(err) = socket.emit("status", json) {
                        metrics.count(Counter::EmitDropped);
                        warn!(sid = %socket.id, cause = %err,
                            "status batch not sent: the socket will get fresh snapshots");
                        socket.extensions.insert(NeedsSnapshot);
                        break;
                    }
                    metrics.count(Counter::Emitted);
                }
            }
            if socket.extensions.get::<NeedsSnapshot>().is_some() {
                // It gets every vehicle's latest state in its snapshots.
                continue;
            }
            for json in &position_parts {
                // Queued like any packet, never overwritten: socketioxide's volatile emit keeps
                // one packet per socket and a newer one silently replaces an unwritten one, which
                // would lose the other parts of a split batch and, with flushes between ticks,
                // whole batches. A socket whose buffer is full misses this batch: counted,
                // logged, and it gets fresh snapshots (so a vehicle that stops moving is not
                // left at an old position).
                match socket.emit("position", json) {
                    Ok(()) => metrics.count(Counter::PositionBatches),
                    Err(err) => {
                        metrics.count(Counter::EmitDropped);
                        warn!(sid = %socket.id, cause = %err,
                            "position batch not sent: the socket will get fresh snapshots");
                        socket.extensions.insert(NeedsSnapshot);
                        break;
                    }
                }
            }
        }
    }
    moved
}

/// Sends a socket that missed a `status` batch a snapshot of each of its rooms; clears the mark
/// once all of them got through.
fn resync<A: Adapter>(socket: &SocketRef<A>, hub: &Hub, rooms: &[RoomName], max_packet: usize) {
    for room in rooms {
        let states = hub.snapshot(|fleet, vehicle| room.covers(fleet, vehicle));
        if let Err(err) = snapshot(socket, &states, max_packet) {
            debug!(sid = %socket.id, %room, cause = %err, "snapshot for a resync not sent yet");
            return;
        }
        hub.metrics().count(Counter::Emitted);
    }
    socket.extensions.remove::<NeedsSnapshot>();
    warn!(sid = %socket.id, "socket resynchronised with fresh snapshots");
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use serde::{Serialize, Serializer};
    use serde_json::Value;
    use serde_json::value::{RawValue, to_raw_value};
    use socketioxide::SocketIo;

    use super::{packed, to_rooms};
    use crate::metrics::{Counter, Metrics};
    use crate::view::room::DISPATCH;

    /// Data that notes when it is serialized.
    struct Watched(AtomicBool);

    impl Serialize for Watched {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            self.0.store(true, Ordering::Relaxed);
            serializer.serialize_u8(1)
        }
    }

    /// A bridge alone skips an event for rooms no socket is in before serializing it, and
    /// counts it; the Redis adapter's case (every event broadcast) runs in the cluster tests.
    #[tokio::test]
    async fn an_event_for_rooms_nobody_is_in_is_not_serialized() {
        let (_layer, io) = SocketIo::builder().build_layer();
        io.ns(DISPATCH, async || ());
        let metrics = Metrics::default();
        let data = Watched(AtomicBool::new(false));
        let rooms = vec!["fleet:demo".to_owned(), "vehicle:demo:v1".to_owned()];
        to_rooms(&io, &metrics, DISPATCH, rooms, "order", &data).await;
        assert!(!data.0.load(Ordering::Relaxed), "serialized for nobody");
        assert_eq!(metrics.counter(Counter::EmitUnheard), 1);
        assert_eq!(metrics.counter(Counter::Emitted), 0);
    }

    #[test]
    fn packed_parts_stay_under_the_bound_in_order() {
        let items: Vec<Box<RawValue>> = (0..500)
            .map(|i| {
                to_raw_value(&serde_json::json!({ "vehicle": format!("v-{i:04}"), "n": i }))
                    .expect("json")
            })
            .collect();
        let parts = packed(items.iter().map(|i| &**i), 4096);
        assert!(parts.len() > 1, "500 items do not fit 4 KiB");
        let mut seen = Vec::new();
        for part in &parts {
            assert!(
                part.get().len() <= 4096,
                "a part of {} bytes",
                part.get().len()
            );
            let array: Vec<Value> = serde_json::from_str(part.get()).expect("a JSON array");
            seen.extend(array.into_iter().map(|v| v["n"].as_u64().expect("n")));
        }
        assert_eq!(
            seen,
            (0..500).collect::<Vec<u64>>(),
            "every item once, in order"
        );

        // Everything in one part when it fits; nothing for nothing; an item larger than the
        // bound alone in its part (never dropped, never cut).
        assert_eq!(packed(items.iter().take(3).map(|i| &**i), 4096).len(), 1);
        assert!(packed(std::iter::empty(), 4096).is_empty());
        let big = to_raw_value(&"x".repeat(5000)).expect("json");
        let small = to_raw_value(&1).expect("json");
        let parts = packed([&*small, &*big, &*small], 4096);
        let texts: Vec<&str> = parts.iter().map(|p| p.get()).collect();
        assert_eq!(texts.len(), 3);
        assert_eq!(texts[0], "[1]");
        assert_eq!(texts[1], format!("[{}]", big.get()));
        assert_eq!(texts[2], "[1]");
        // The items as they are, joined by commas: nothing re-formatted.
        let spaced = RawValue::from_string("{ \"a\" : [1, 2] }".to_string()).expect("json");
        let parts = packed([&*small, &*spaced, &*small], 4096);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].get(), "[1,{ \"a\" : [1, 2] },1]");
    }
}
