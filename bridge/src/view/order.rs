//! What clients see of orders and delivery events: the `delivery` message (as queued and as
//! emitted), `pickup` announcements, the answer to a placed order, the Order JSON of
//! `GET /api/orders` and of the `order` event, `GET /api/orders/{id}`, `GET /api/stores`.

use serde_json::{Value, json};
use shared::{DeliveryEvent, FleetId, Position, Topic};

use crate::domain::auth::{Grant, Role};
use crate::domain::delivery::{OrderRequest, Placed, StoreInfo};
use crate::domain::order::EventFlag;
use crate::store::OrderView;

/// A delivery event as its recipients' queues store it (and `delivery` sends it, with its
/// `message_id`): `store` is the order's store, if the order exists; `flag` why the event did
/// not move its order the usual step, if it did not. A suspect event (not from the vehicle
/// holding the order, [`EventFlag::is_suspect`]) says `"suspect": true` and names no store:
/// only the reporting vehicle's dispatchers get it.
pub(crate) fn delivery(
    topic: &Topic,
    event: &DeliveryEvent,
    store: Option<&str>,
    flag: Option<EventFlag>,
) -> Value {
    let (lat, lon) = event.pos.to_degrees();
    let suspect = flag.is_some_and(EventFlag::is_suspect);
    json!({
        "vehicle": topic.vehicle,
        "fleet": topic.fleet,
        "store": if suspect { None } else { store },
        "flag": flag.map(EventFlag::as_str),
        "suspect": suspect,
        "order": event.order,
        "kind": event.kind.as_str(),
        "seq": event.seq,
        "ts_ms": event.ts_ms,
        "lat": lat,
        "lon": lon,
    })
}

/// Whether the holder of `grant` may see the queued delivery message `payload` (as made by
/// [`delivery`]): a vendor its own store's (never a suspect one: those name no store), a
/// dispatcher those of the fleets it may see.
pub(crate) fn visible_to(payload: &Value, grant: &Grant) -> bool {
    match grant.role {
        Role::Vendor => {
            grant.store.is_some() && payload["store"].as_str() == grant.store.as_deref()
        }
        Role::Dispatcher | Role::Admin => payload["fleet"]
            .as_str()
            .and_then(|f| FleetId::new(f).ok())
            .is_some_and(|fleet| grant.may_see_fleet(&fleet)),
    }
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

/// An order as `GET /api/orders` lists it and the `order` event carries it ("Order"):
/// `{order, store, fleet, customer, state, vehicle, pickup:{lat,lon}, dropoff:{lat,lon},
/// created_ms, updated_ms}`.
pub(crate) fn summary(view: &OrderView) -> Value {
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
    })
}

/// The `order` event: the order as it is after a change, and when it was emitted (`ts_ms`,
/// bridge clock).
pub(crate) fn changed(view: &OrderView, ts_ms: u64) -> Value {
    let mut event = summary(view);
    event["ts_ms"] = json!(ts_ms);
    event
}

/// A store as `GET /api/stores` lists it: `{store, fleet, lat, lon}` (null without a
/// configured location).
pub(crate) fn store(info: &StoreInfo) -> Value {
    let [lat, lon] = info
        .location
        .map_or([None, None], |[lat, lon]| [Some(lat), Some(lon)]);
    json!({ "store": info.store, "fleet": info.fleet, "lat": lat, "lon": lon })
}

/// An order as `GET /api/orders/{id}` returns it: [`summary`] and its `timeline`.
pub(crate) fn order(view: &OrderView) -> Value {
    let mut order = summary(view);
    order["timeline"] = json!(
        view.timeline
            .iter()
            .map(|t| json!({
                "kind": t.kind.as_str(),
                "ts_ms": t.ts_ms,
                "position": t.position.map(position),
                "vehicle": t.vehicle,
                "seq": t.seq,
                "flag": t.flag.map(|f| f.as_str()),
            }))
            .collect::<Vec<_>>()
    );
    order
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::auth::sample_tokens;

    #[test]
    fn queued_messages_are_visible_within_the_scope_only() {
        let t = sample_tokens();
        let north = t
            .authorize(Some("north-only"), "/dispatch", &[Role::Dispatcher])
            .expect("dispatcher");
        let vendor = t
            .authorize(Some("vendor-demo"), "/vendor", &[Role::Vendor])
            .expect("vendor");
        let message = |fleet: &str, store: Option<&str>| json!({ "fleet": fleet, "store": store });
        assert!(visible_to(&message("north", Some("store-9")), &north));
        assert!(!visible_to(&message("south", Some("store-9")), &north));
        assert!(!visible_to(&json!({}), &north));
        assert!(visible_to(&message("demo", Some("store-1")), &vendor));
        assert!(!visible_to(&message("demo", Some("store-2")), &vendor));
        assert!(
            !visible_to(&message("demo", None), &vendor),
            "a suspect one"
        );
    }
}
