//! What clients see of orders and delivery events: the `delivery` message (as queued and as
//! emitted), `pickup` announcements, the answer to a placed order, `GET /api/orders/{id}`.

use serde_json::{Value, json};
use shared::{DeliveryEvent, Position, Topic};

use crate::domain::delivery::{OrderRequest, Placed};
use crate::store::OrderView;

/// A delivery event as its recipients' queues store it (and `delivery` sends it, with its
/// `message_id`): `store` is the order's store, if the order exists.
pub(crate) fn delivery(topic: &Topic, event: &DeliveryEvent, store: Option<&str>) -> Value {
    let (lat, lon) = event.pos.to_degrees();
    json!({
        "vehicle": topic.vehicle,
        "fleet": topic.fleet,
        "store": store,
        "order": event.order,
        "kind": event.kind.as_str(),
        "seq": event.seq,
        "ts_ms": event.ts_ms,
        "lat": lat,
        "lon": lon,
    })
}

/// A queued message as the client receives it: the payload plus `message_id`.
pub(crate) fn message(id: u64, payload: &Value) -> Value {
    let mut message = payload.clone();
    if let Value::Object(fields) = &mut message {
        fields.insert("message_id".into(), json!(id));
    }
    message
}

/// The answer to a placed order (`pickup` ack, `POST /api/orders`).
pub(crate) fn placed(placed: &Placed) -> Value {
    json!({ "order": placed.order, "created": placed.created, "vehicle": placed.vehicle, "state": placed.state })
}

/// A `pickup` announcement: `store` placed `request`, at `ts_ms`.
pub(crate) fn pickup(store: &str, request: &OrderRequest, placed: &Placed, ts_ms: u64) -> Value {
    json!({
        "store": store,
        "order": placed.order,
        "customer": request.customer,
        "lat": request.lat,
        "lon": request.lon,
        "vehicle": placed.vehicle,
        "state": placed.state,
        "ts_ms": ts_ms,
    })
}

fn position(p: Position) -> Value {
    let (lat, lon) = p.to_degrees();
    json!({ "lat": lat, "lon": lon })
}

/// An order as the HTTP API returns it.
pub(crate) fn order(view: &OrderView) -> Value {
    json!({
        "order": view.order,
        "store": view.store,
        "fleet": view.fleet,
        "customer": view.customer,
        "state": view.state.as_str(),
        "vehicle": view.vehicle,
        "pickup": position(view.pickup),
        "dropoff": position(view.dropoff),
        "created_ms": view.created_ms,
        "updated_ms": view.updated_ms,
        "timeline": view.timeline.iter().map(|t| json!({
            "kind": t.kind.as_str(),
            "ts_ms": t.ts_ms,
            "position": t.position.map(position),
            "vehicle": t.vehicle,
            "seq": t.seq,
            "flag": t.flag.map(|f| f.as_str()),
        })).collect::<Vec<_>>(),
    })
}
