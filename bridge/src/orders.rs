//! Orders and delivery events: placing an order, assigning it to the nearest free vehicle,
//! recording each step durably and queueing it for every client it concerns.
//!
//! Assignment rule: among the vendor fleet's vehicles that are online, have reported a
//! position and hold no undelivered order, the nearest to the pickup point (great-circle
//! distance) is asked first; a vehicle that answers `busy`, `invalid` or nothing is skipped,
//! up to [`MAX_CANDIDATES`]. An order nobody accepts stays `created`.

use serde::Deserialize;
use serde_json::{Value, json};
use shared::{AckResult, CommandKind, DeliveryEvent, FleetId, OrderId, Position, Topic, VehicleId};
use thiserror::Error;
use tracing::{info, warn};

use crate::auth::{Grant, Role};
use crate::fleet::Liveness;
use crate::hub::Hub;
use crate::store::{ClientId, Enqueued, NewOrder, OrderView, StoreError};

/// How many vehicles are asked before an order is left unassigned.
pub const MAX_CANDIDATES: usize = 3;

/// A vendor's order: `pickup` on `/vendor`, or `POST /api/orders`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    /// Order id.
    pub order: String,
    /// Who receives the parcel.
    pub customer: String,
    /// Drop-off latitude in degrees.
    pub lat: f64,
    /// Drop-off longitude in degrees.
    pub lon: f64,
    /// Pickup latitude (defaults to the store's location).
    #[serde(default)]
    pub pickup_lat: Option<f64>,
    /// Pickup longitude (defaults to the store's location).
    #[serde(default)]
    pub pickup_lon: Option<f64>,
}

/// Why an order could not be placed.
#[derive(Debug, Error)]
pub enum OrderError {
    /// The request is malformed.
    #[error("invalid order: {0}")]
    Invalid(String),
    /// Only vendors place orders.
    #[error("only a vendor token can place orders")]
    NotVendor,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The outcome of placing an order.
#[derive(Debug, Clone)]
pub struct Placed {
    /// The order.
    pub order: OrderId,
    /// Whether it was new (false: the same order was placed before).
    pub created: bool,
    /// The vehicle carrying it, if one accepted.
    pub vehicle: Option<VehicleId>,
    /// Its state.
    pub state: String,
}

fn position(lat: f64, lon: f64) -> Result<Position, OrderError> {
    let p = Position::new((lat * 1e7).round() as i32, (lon * 1e7).round() as i32);
    if lat.is_finite() && lon.is_finite() && p.is_valid() {
        Ok(p)
    } else {
        Err(OrderError::Invalid("lat/lon out of range".into()))
    }
}

fn distance_m(a: Position, b: Position) -> f64 {
    let (la1, lo1, la2, lo2) = (
        a.lat().to_radians(),
        a.lon().to_radians(),
        b.lat().to_radians(),
        b.lon().to_radians(),
    );
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6_371_000.0 * h.sqrt().asin()
}

/// A grant for the bridge's own commands (assignments): every fleet.
fn system_grant() -> Grant {
    Grant {
        role: Role::Admin,
        name: "bridge".into(),
        fleets: None,
        store: None,
        fleet: None,
        location: None,
    }
}

impl Hub {
    /// Places `request` for the vendor `grant`, then assigns it (see the module docs).
    ///
    /// # Errors
    /// [`OrderError`] if the request is invalid, the caller is not a vendor, or storage fails.
    pub async fn place_order(
        &self,
        grant: &Grant,
        request: &OrderRequest,
    ) -> Result<Placed, OrderError> {
        let (Role::Vendor, Some(store), Some(fleet)) = (grant.role, &grant.store, &grant.fleet)
        else {
            return Err(OrderError::NotVendor);
        };
        let order = OrderId::new(&request.order)
            .map_err(|e| OrderError::Invalid(format!("order id: {e}")))?;
        if request.customer.trim().is_empty() || request.customer.len() > 200 {
            return Err(OrderError::Invalid(
                "customer must be 1 to 200 bytes".into(),
            ));
        }
        let dropoff = position(request.lat, request.lon)?;
        let pickup = match (request.pickup_lat, request.pickup_lon, grant.location) {
            (Some(lat), Some(lon), _) => position(lat, lon)?,
            (None, None, Some([lat, lon])) => position(lat, lon)?,
            _ => {
                return Err(OrderError::Invalid(
                    "pickup_lat/pickup_lon needed: the store has no location".into(),
                ));
            }
        };
        let created = self
            .store
            .create_order(&NewOrder {
                order: order.clone(),
                store: store.clone(),
                fleet: fleet.clone(),
                customer: request.customer.clone(),
                dropoff,
                pickup,
            })
            .await?;
        if created.vehicle.is_some() || !created.created && created.state.to_string() != "created" {
            return Ok(Placed {
                order,
                created: created.created,
                vehicle: created.vehicle,
                state: created.state.to_string(),
            });
        }
        let vehicle = self.assign(&order, fleet, pickup, dropoff).await?;
        let state = self
            .store
            .order(&order)
            .await?
            .map_or_else(|| "created".to_owned(), |o| o.state.to_string());
        Ok(Placed {
            order,
            created: created.created,
            vehicle,
            state,
        })
    }

    /// Offers every unassigned order (oldest first) to free vehicles once more; returns how
    /// many found a vehicle. Run periodically: orders placed while every vehicle was busy are
    /// carried as vehicles become free.
    ///
    /// # Errors
    /// [`StoreError`] if the orders cannot be read.
    pub async fn assign_waiting(&self) -> Result<usize, StoreError> {
        let mut assigned = 0;
        for (order, fleet, pickup, dropoff) in self.store.unassigned_orders(64).await? {
            if self.free_vehicles(&fleet, pickup).await?.is_empty() {
                continue;
            }
            if self
                .assign(&order, &fleet, pickup, dropoff)
                .await?
                .is_some()
            {
                assigned += 1;
            }
        }
        Ok(assigned)
    }

    /// Free vehicles of `fleet` (online, with a position, no undelivered order), nearest to
    /// `pickup` first.
    async fn free_vehicles(
        &self,
        fleet: &FleetId,
        pickup: Position,
    ) -> Result<Vec<(f64, VehicleId)>, StoreError> {
        let busy = self.store.busy_vehicles(fleet).await?;
        let mut candidates: Vec<(f64, VehicleId)> = self
            .fleet()
            .snapshot(&crate::room::RoomName::Fleet(fleet.clone()))
            .into_iter()
            .filter(|v| v.status == Liveness::Online && !busy.contains(&v.vehicle))
            .filter_map(|v| {
                let p = v.position?;
                let at = Position::new((p.lat * 1e7).round() as i32, (p.lon * 1e7).round() as i32);
                Some((distance_m(at, pickup), v.vehicle))
            })
            .collect();
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(candidates)
    }

    /// Offers `order` to the nearest free vehicles of `fleet` until one accepts.
    async fn assign(
        &self,
        order: &OrderId,
        fleet: &FleetId,
        pickup: Position,
        dropoff: Position,
    ) -> Result<Option<VehicleId>, StoreError> {
        // One assignment at a time: the waiting-orders task and a new order must not offer
        // the same order to two vehicles, nor two orders to one vehicle.
        let _one_at_a_time = self.assigning.lock().await;
        if self
            .store
            .order(order)
            .await?
            .is_some_and(|o| o.vehicle.is_some())
        {
            return Ok(None);
        }
        let candidates = self.free_vehicles(fleet, pickup).await?;
        let system = system_grant();
        for (distance, vehicle) in candidates.into_iter().take(MAX_CANDIDATES) {
            let kind = CommandKind::AssignOrder {
                order: order.clone(),
                pickup,
                dropoff,
            };
            match self.command(&system, &vehicle, kind).await {
                Ok((_, AckResult::Ok)) => match self.store.assign(order, &vehicle).await {
                    Ok(()) => {
                        info!(%order, %vehicle, distance_m = distance as u64, "order assigned");
                        return Ok(Some(vehicle));
                    }
                    Err(err) => {
                        warn!(%order, %vehicle, cause = %err, "vehicle accepted but the assignment was refused")
                    }
                },
                Ok((_, result)) => {
                    info!(%order, %vehicle, result = result.as_str(), "vehicle declined the order")
                }
                Err(err) => info!(%order, %vehicle, cause = %err, "vehicle did not take the order"),
            }
        }
        info!(%order, %fleet, "no free vehicle accepted the order yet; it waits");
        Ok(None)
    }

    /// The queue identities a delivery event of `fleet` goes to: the order's vendor, and
    /// every configured dispatcher identity that may see the fleet.
    pub fn recipients(&self, fleet: &FleetId, store: Option<&str>) -> Vec<ClientId> {
        let mut out: Vec<ClientId> = store.map(ClientId::vendor).into_iter().collect();
        out.extend(
            self.tokens
                .grants()
                .filter(|g| {
                    matches!(g.role, Role::Dispatcher | Role::Admin) && g.may_see_fleet(fleet)
                })
                .map(|g| dispatcher_client(&g.name)),
        );
        out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        out.dedup_by(|a, b| a.as_str() == b.as_str());
        out
    }

    /// Records a vehicle's delivery event durably and queues it for its recipients, in one
    /// transaction. Returns the queued messages to emit (none for a duplicate).
    ///
    /// # Errors
    /// [`StoreError`] if it was not committed: the event must not be acknowledged.
    pub async fn record_delivery(
        &self,
        topic: &Topic,
        event: &DeliveryEvent,
    ) -> Result<Vec<Enqueued>, StoreError> {
        let store = self.store.order_store(&event.order).await?;
        let recipients = self.recipients(&topic.fleet, store.as_deref());
        let payload = json!({
            "vehicle": topic.vehicle,
            "fleet": topic.fleet,
            "store": store,
            "order": event.order,
            "kind": event.kind.as_str(),
            "seq": event.seq,
            "ts_ms": event.ts_ms,
            "lat": event.pos.lat(),
            "lon": event.pos.lon(),
        });
        let recorded = self
            .store
            .record_event(&topic.vehicle, &topic.fleet, event, &recipients, &payload)
            .await?;
        if recorded.duplicate {
            tracing::debug!(vehicle = %topic.vehicle, seq = event.seq, "duplicate delivery event");
            return Ok(Vec::new());
        }
        if let Some(flag) = recorded.flag {
            warn!(vehicle = %topic.vehicle, order = %event.order, ?flag, "delivery event does not fit its order");
        }
        info!(vehicle = %topic.vehicle, order = %event.order, kind = event.kind.as_str(), "delivery event recorded");
        Ok(recorded.messages)
    }
}

/// The queue identity of a dispatcher token: `dispatch:{name}`.
pub fn dispatcher_client(name: &str) -> ClientId {
    ClientId::new(format!("dispatch:{name}"))
}

/// The queue identity of a connected client's grant.
pub fn client_of(grant: &Grant) -> Option<ClientId> {
    match grant.role {
        Role::Vendor => grant.store.as_deref().map(ClientId::vendor),
        Role::Dispatcher | Role::Admin => Some(dispatcher_client(&grant.name)),
    }
}

/// A queued message as the client receives it: the payload plus `message_id`.
pub fn message_json(id: u64, payload: &Value) -> Value {
    let mut message = payload.clone();
    if let Value::Object(fields) = &mut message {
        fields.insert("message_id".into(), json!(id));
    }
    message
}

fn position_json(p: Position) -> Value {
    json!({ "lat": p.lat(), "lon": p.lon() })
}

/// An order as the HTTP API returns it.
pub fn order_json(view: &OrderView) -> Value {
    json!({
        "order": view.order,
        "store": view.store,
        "fleet": view.fleet,
        "customer": view.customer,
        "state": view.state.to_string(),
        "vehicle": view.vehicle,
        "pickup": position_json(view.pickup),
        "dropoff": position_json(view.dropoff),
        "created_ms": view.created_ms,
        "updated_ms": view.updated_ms,
        "timeline": view.timeline.iter().map(|t| json!({
            "kind": t.kind,
            "ts_ms": t.ts_ms,
            "position": t.position.map(position_json),
            "vehicle": t.vehicle,
            "seq": t.seq,
            "flag": t.flag,
        })).collect::<Vec<_>>(),
    })
}
