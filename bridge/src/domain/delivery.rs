//! Orders and delivery events, the hub's side: placing an order, assigning it to the nearest
//! free vehicle, recording each delivery step durably and queueing it for every client it
//! concerns. An order's states and the rules between them are in `order`.
//!
//! Assignment rule: among the vendor fleet's vehicles that are online, have reported a
//! position and hold no undelivered order, the nearest to the pickup point (great-circle
//! distance) is asked first; a vehicle that answers `busy`, `invalid` or nothing is skipped,
//! up to [`MAX_CANDIDATES`]. An order nobody accepts stays `created`.

use serde::Deserialize;
use serde_json::Value;
use shared::{AckResult, CommandKind, DeliveryEvent, FleetId, OrderId, Position, Topic, VehicleId};
use thiserror::Error;
use tracing::{info, warn};

use super::auth::{Grant, Role};
use super::fleet::Liveness;
use super::hub::Hub;
use super::order::{EventFlag, OrderState};
use crate::store::{ClientId, Enqueued, NewOrder, OrderView, StoreError, WaitingOrder};

/// How many vehicles are asked before an order is left unassigned.
const MAX_CANDIDATES: usize = 3;

/// This process's name as the holder of order offer claims (`Store::claim_offer`): random,
/// so that two bridges never share it, whatever their configuration.
fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let mut bytes = [0u8; 8];
        if getrandom::fill(&mut bytes).is_err() {
            // No randomness: the process id and the time still tell bridges apart.
            bytes = (u64::from(std::process::id()) << 32 ^ crate::clock::now_ms()).to_le_bytes();
        }
        format!("bridge-{}", hex::encode(bytes))
    })
}

/// A vendor's order: `pickup` on `/vendor`, or `POST /api/orders`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OrderRequest {
    /// Order id.
    pub(crate) order: String,
    /// Who receives the parcel.
    pub(crate) customer: String,
    /// Drop-off latitude in degrees.
    pub(crate) lat: f64,
    /// Drop-off longitude in degrees.
    pub(crate) lon: f64,
    /// Pickup latitude (defaults to the store's location).
    pub(crate) pickup_lat: Option<f64>,
    /// Pickup longitude (defaults to the store's location).
    pub(crate) pickup_lon: Option<f64>,
}

/// Why an order could not be placed.
#[derive(Debug, Error)]
pub(crate) enum OrderError {
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
pub(crate) struct Placed {
    /// The order.
    pub(crate) order: OrderId,
    /// Whether it was new (false: the same order was placed before).
    pub(crate) created: bool,
    /// The vehicle carrying it, if one accepted.
    pub(crate) vehicle: Option<VehicleId>,
    /// Its state.
    pub(crate) state: OrderState,
}

/// Who a delivery event is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recipients {
    /// The store that placed the order, if the order exists.
    pub(crate) store: Option<String>,
    /// The queue identities the event goes to: the store, and every configured dispatcher
    /// identity that may see the vehicle's fleet.
    pub(crate) clients: Vec<ClientId>,
}

/// A position given in degrees, checked.
fn position(lat: f64, lon: f64) -> Result<Position, OrderError> {
    let p = Position::from_degrees(lat, lon);
    if lat.is_finite() && lon.is_finite() && p.is_valid() {
        Ok(p)
    } else {
        Err(OrderError::Invalid("lat/lon out of range".into()))
    }
}

/// The great-circle distance between `a` and `b`, in metres.
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

impl Hub {
    /// Places `request` for the vendor `grant`, then assigns it (see the module docs).
    ///
    /// # Errors
    /// [`OrderError`] if the request is invalid, the caller is not a vendor, or storage fails.
    pub(crate) async fn place_order(
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
        // A retry of an order that got a vehicle, or went further, is not offered again.
        if created.vehicle.is_some() || created.state != OrderState::Created {
            return Ok(Placed {
                order,
                created: created.created,
                vehicle: created.vehicle,
                state: created.state,
            });
        }
        let waiting = WaitingOrder {
            order,
            fleet: fleet.clone(),
            pickup,
            dropoff,
        };
        let vehicle = self.assign(&waiting).await?;
        let state = self
            .store
            .order(&waiting.order)
            .await?
            .map_or(OrderState::Created, |o| o.state);
        Ok(Placed {
            order: waiting.order,
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
    pub(crate) async fn assign_waiting(&self) -> Result<usize, StoreError> {
        let mut assigned = 0;
        for waiting in self.store.unassigned_orders(64).await? {
            if self
                .free_vehicles(&waiting.fleet, waiting.pickup)
                .await?
                .is_empty()
            {
                continue;
            }
            if self.assign(&waiting).await?.is_some() {
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
            .snapshot(|f, _| f == fleet)
            .into_iter()
            .filter(|v| v.status.liveness == Liveness::Online && !busy.contains(&v.status.vehicle))
            .filter_map(|v| Some((distance_m(v.heartbeat?.pos, pickup), v.status.vehicle)))
            .collect();
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(candidates)
    }

    /// Offers `waiting` to the nearest free vehicles of its fleet until one accepts, unless
    /// it is assigned already or another bridge is offering it.
    async fn assign(&self, waiting: &WaitingOrder) -> Result<Option<VehicleId>, StoreError> {
        let order = &waiting.order;
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
        // Several bridges on one store: only the bridge holding the order's offer claim asks
        // vehicles, for as long as its round may take; a crashed bridge's claim lapses.
        let holder = instance_id();
        let round = self.command_timeout() * (MAX_CANDIDATES as u32 + 1);
        let until_ms = crate::clock::now_ms() + round.as_millis() as u64;
        if !self.store.claim_offer(order, holder, until_ms).await? {
            info!(%order, "another bridge is offering the order");
            return Ok(None);
        }
        let assigned = self.offer(waiting).await;
        if let Err(err) = self.store.release_offer(order, holder).await {
            warn!(%order, cause = %err, "cannot release the order's offer claim (it lapses)");
        }
        assigned
    }

    /// Offers `waiting`, whose offer claim this bridge holds, to the nearest free vehicles of
    /// its fleet until one accepts.
    async fn offer(&self, waiting: &WaitingOrder) -> Result<Option<VehicleId>, StoreError> {
        let WaitingOrder {
            order,
            fleet,
            pickup,
            dropoff,
        } = waiting;
        let candidates = self.free_vehicles(fleet, *pickup).await?;
        let system = Grant::system();
        for (distance, vehicle) in candidates.into_iter().take(MAX_CANDIDATES) {
            let kind = CommandKind::AssignOrder {
                order: order.clone(),
                pickup: *pickup,
                dropoff: *dropoff,
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

    /// Who a delivery event about `order` from a vehicle of `fleet` goes to: the order's
    /// vendor, and every configured dispatcher identity that may see the fleet.
    ///
    /// # Errors
    /// [`StoreError`] if the order cannot be read.
    pub(crate) async fn delivery_recipients(
        &self,
        fleet: &FleetId,
        order: &OrderId,
    ) -> Result<Recipients, StoreError> {
        let store = self.store.order_store(order).await?;
        let mut clients: Vec<ClientId> =
            store.as_deref().map(ClientId::vendor).into_iter().collect();
        clients.extend(
            self.tokens
                .grants()
                .filter(|g| {
                    matches!(g.role, Role::Dispatcher | Role::Admin) && g.may_see_fleet(fleet)
                })
                .map(|g| ClientId::dispatcher(&g.name)),
        );
        clients.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        clients.dedup_by(|a, b| a.as_str() == b.as_str());
        Ok(Recipients { store, clients })
    }

    /// Records a vehicle's delivery event durably and queues it for `recipients`, in one
    /// transaction; `payload` makes the message for the event's flag (see `order::judge`).
    /// A suspect event (another vehicle's order, or an unknown order: [`EventFlag::is_suspect`])
    /// is stored flagged and queued for the dispatchers only: the order's vendor never gets it
    /// as genuine (it sees the flagged entry in the order's timeline). Returns the queued
    /// messages to emit (none for a duplicate).
    ///
    /// # Errors
    /// [`StoreError`] if it was not committed: the event must not be acknowledged.
    pub(crate) async fn record_delivery(
        &self,
        topic: &Topic,
        event: &DeliveryEvent,
        recipients: &[ClientId],
        payload: impl FnOnce(Option<EventFlag>) -> Value,
    ) -> Result<Vec<Enqueued>, StoreError> {
        let address = |flag: Option<EventFlag>| {
            let suspect = flag.is_some_and(EventFlag::is_suspect);
            let message = payload(flag);
            recipients
                .iter()
                .filter(|client| !(suspect && client.is_vendor()))
                .map(|client| (client.clone(), message.clone()))
                .collect()
        };
        let recorded = self
            .store
            .record_event_for(&topic.vehicle, &topic.fleet, event, address)
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

    /// The order `id` with its timeline, if it exists and `grant` may see it: vendors see
    /// their own store's orders, dispatchers those of the fleets they may see.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be read.
    pub(crate) async fn order_for(
        &self,
        grant: &Grant,
        id: &OrderId,
    ) -> Result<Option<OrderView>, StoreError> {
        Ok(self.store.order(id).await?.filter(|o| match grant.role {
            Role::Vendor => grant.store.as_deref() == Some(o.store.as_str()),
            Role::Dispatcher | Role::Admin => grant.may_see_fleet(&o.fleet),
        }))
    }
}
