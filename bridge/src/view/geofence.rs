//! Geofences as clients see them: the fence JSON of the API, the `geofence` event (a vehicle
//! entered or left a fence) and the `geofences` event (a custom fence changed), and who gets
//! them.
//!
//! `geofence` goes to the `/dispatch` sockets whose token may see the fleet (the scope rooms,
//! as `pickup`), and for a store or drop-off fence also to that store's `/vendor` room.

use serde::Serialize;
use serde_json::{Value, json};
use shared::FleetId;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;

use super::emit::to_rooms;
use super::room::{DISPATCH, VENDOR, pickup_rooms, vendor_room};
use crate::geofence::{Fence, Shape, Transition};
use crate::metrics::{Counter, Metrics};

/// A fence in the API: `{id, name, fleet, kind, shape, created_ms, store?, order?}`.
#[derive(Debug, Serialize)]
pub(crate) struct FenceView<'a> {
    id: &'a str,
    name: &'a str,
    fleet: &'a str,
    kind: &'static str,
    shape: &'a Shape,
    created_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    order: Option<&'a str>,
}

impl<'a> FenceView<'a> {
    /// The view of `fence`.
    pub(crate) fn new(fence: &'a Fence) -> Self {
        Self {
            id: &fence.id,
            name: &fence.name,
            fleet: fence.fleet.as_str(),
            kind: fence.kind.as_str(),
            shape: &fence.shape,
            created_ms: fence.created_ms,
            store: fence.store.as_deref(),
            order: fence.order.as_deref(),
        }
    }
}

/// The `geofence` event of a transition: `{vehicle, fleet, fence, name, kind, transition,
/// lat, lon, ts_ms, store?, order?}`.
pub(crate) fn event(t: &Transition) -> Value {
    let mut event = json!({
        "vehicle": t.sighting.vehicle.as_str(),
        "fleet": t.sighting.fleet.as_str(),
        "fence": t.fence.id,
        "name": t.fence.name,
        "kind": t.fence.kind.as_str(),
        "transition": t.crossing.as_str(),
        "lat": t.sighting.lat,
        "lon": t.sighting.lon,
        "ts_ms": t.sighting.ts_ms,
    });
    if let Some(store) = &t.fence.store {
        event["store"] = json!(store);
    }
    if let Some(order) = &t.fence.order {
        event["order"] = json!(order);
    }
    event
}

/// Emits the `geofence` event of each transition: to the dispatchers who may see the fleet,
/// and for a store or drop-off fence to that store's vendor room.
pub(crate) async fn transitions<A: Adapter>(
    io: &SocketIo<A>,
    metrics: &Metrics,
    transitions: &[Transition],
) {
    for t in transitions {
        metrics.count(Counter::GeofenceTransitions);
        let data = event(t);
        to_rooms(
            io,
            metrics,
            DISPATCH,
            pickup_rooms(&t.sighting.fleet).to_vec(),
            "geofence",
            &data,
        )
        .await;
        if let Some(store) = t.fence.store.as_deref() {
            to_rooms(
                io,
                metrics,
                VENDOR,
                vec![vendor_room(store)],
                "geofence",
                &data,
            )
            .await;
        }
    }
}

/// Emits `geofences` `{changed: id}` to the dispatchers who may see `fleet`: a custom fence
/// was created, changed or deleted, pages reload the list.
pub(crate) async fn changed<A: Adapter>(
    io: &SocketIo<A>,
    metrics: &Metrics,
    fleet: &FleetId,
    id: &str,
) {
    let data = json!({ "changed": id });
    to_rooms(
        io,
        metrics,
        DISPATCH,
        pickup_rooms(fleet).to_vec(),
        "geofences",
        &data,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shared::VehicleId;

    use super::*;
    use crate::geofence::{Crossing, FenceKind, Sighting};

    #[test]
    fn the_event_has_the_contract_fields() {
        let fleet = FleetId::new("demo").expect("valid");
        let fence = Fence {
            id: "dropoff:o-1".into(),
            name: "drop-off of o-1".into(),
            fleet: fleet.clone(),
            kind: FenceKind::Dropoff,
            shape: Shape::Circle {
                lat: 52.5,
                lon: 13.4,
                radius_m: 40.0,
            },
            created_ms: 7,
            store: Some("store-1".into()),
            order: Some("o-1".into()),
        };
        let t = Transition {
            fence: Arc::new(fence.clone()),
            crossing: Crossing::Enter,
            sighting: Sighting {
                vehicle: VehicleId::new("v1").expect("valid"),
                fleet,
                lat: 52.5,
                lon: 13.4,
                ts_ms: 99,
            },
        };
        assert_eq!(
            event(&t),
            json!({"vehicle":"v1","fleet":"demo","fence":"dropoff:o-1","name":"drop-off of o-1","kind":"dropoff",
                   "transition":"enter","lat":52.5,"lon":13.4,"ts_ms":99,"store":"store-1","order":"o-1"})
        );
        assert_eq!(
            serde_json::to_value(FenceView::new(&fence)).expect("json"),
            json!({"id":"dropoff:o-1","name":"drop-off of o-1","fleet":"demo","kind":"dropoff",
                   "shape":{"type":"circle","lat":52.5,"lon":13.4,"radius_m":40.0},"created_ms":7,"store":"store-1","order":"o-1"})
        );
    }
}
