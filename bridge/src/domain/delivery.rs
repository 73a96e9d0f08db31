//! Orders and delivery events, the hub's side: placing an order, assigning it to the nearest
//! free vehicle, recording each delivery step durably and queueing it for every client it
//! concerns. An order's states and the rules between them are in `order`.
//!
//! Assignment rule: among the vendor fleet's vehicles that are online, have reported a
//! position and hold no undelivered order, the nearest to the pickup point (great-circle
//! distance) is asked first; a vehicle that answers `busy`, `invalid` or nothing is skipped,
//! up to [`MAX_CANDIDATES`]. An order nobody accepts stays `created`.
//!
//! Dispatchers and admins may cancel an order (vendors: their own, before pickup) and
//! reassign it before pickup to a vehicle they choose; a vehicle that loses an order is sent
//! `CancelOrder`. An order assigned to a vehicle that stays offline longer than
//! `[orders] reoffer_after_ms` is taken back and offered again ([`Hub::reoffer_stranded`]).
//!
//! Every change of an order's state (placed, assigned, unassigned, each delivery step,
//! cancelled) is handed, with the order as it is then, to the hub's order-change channel, in
//! the order the changes were committed; the server emits each as an `order` event.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use shared::{AckResult, CommandKind, DeliveryEvent, FleetId, OrderId, Position, Topic, VehicleId};
use thiserror::Error;
use tracing::{info, warn};

use super::auth::{Grant, Role};
use super::command::CommandError;
use super::fleet::Liveness;
use super::hub::Hub;
use super::order::{EventFlag, OrderState};
use crate::store::{
    AssignedOrder, ClientId, Enqueued, NewOrder, OrderFilter, OrderView, StoreError, WaitingOrder,
};

/// How many vehicles are asked before an order is left unassigned.
const MAX_CANDIDATES: usize = 3;

/// At most this many vehicles wait to be told again that an order is no longer theirs.
const MAX_STRAYS: usize = 1024;

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
    /// The store the order is for: required when a dispatcher or an admin places it on the
    /// store's behalf; a vendor may only name its own.
    #[serde(default)]
    pub(crate) store: Option<String>,
}

/// A store as `GET /api/stores` lists it: a configured vendor store.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoreInfo {
    /// The store id.
    pub(crate) store: String,
    /// The fleet delivering its orders.
    pub(crate) fleet: FleetId,
    /// Where it is, `[lat, lon]` in degrees (the default pickup point), if configured.
    pub(crate) location: Option<[f64; 2]>,
}

/// Why an order could not be placed.
#[derive(Debug, Error)]
pub(crate) enum OrderError {
    /// The request is malformed.
    #[error("invalid order: {0}")]
    Invalid(String),
    /// Only vendors place orders (and dispatchers or admins on a store's behalf).
    #[error("only a vendor token can place orders")]
    NotVendor,
    /// No such order, or not one the caller may see: the same answer, so that it does not
    /// tell which order ids exist.
    #[error("unknown order")]
    UnknownOrder,
    /// No such configured store, or not one the caller may see.
    #[error("unknown store")]
    UnknownStore,
    /// No such vehicle, or not one the caller may see.
    #[error("unknown vehicle")]
    UnknownVehicle,
    /// The order's state (or the vehicle's) does not allow it now.
    #[error("{0}")]
    Conflict(String),
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
    /// The store it is for.
    pub(crate) store: String,
    /// The fleet delivering it.
    pub(crate) fleet: FleetId,
}

/// What became of a cancellation.
#[derive(Debug, Clone)]
pub(crate) struct CancelOutcome {
    /// The order as it is now (cancelled).
    pub(crate) order: OrderView,
    /// What the vehicle that held it answered to `CancelOrder` (`ok`, `busy`, `invalid`,
    /// `unsupported`, or `timeout`, `offline`, `unsent`), if a vehicle held it.
    pub(crate) vehicle_ack: Option<&'static str>,
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
        let (store, fleet, location) = self.placing_store(grant, request.store.as_deref())?;
        let order = OrderId::new(&request.order)
            .map_err(|e| OrderError::Invalid(format!("order id: {e}")))?;
        if request.customer.trim().is_empty() || request.customer.len() > 200 {
            return Err(OrderError::Invalid(
                "customer must be 1 to 200 bytes".into(),
            ));
        }
        let dropoff = position(request.lat, request.lon)?;
        let pickup = match (request.pickup_lat, request.pickup_lon, location) {
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
        if created.created {
            self.order_changed(&order).await;
        }
        if created.vehicle.is_some() || created.state != OrderState::Created {
            return Ok(Placed {
                order,
                created: created.created,
                vehicle: created.vehicle,
                state: created.state,
                store,
                fleet,
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
            store,
            fleet,
        })
    }

    /// The store an order placed by `grant` is for, its fleet and location: a vendor's own
    /// (`named` must be it, if given); for a dispatcher or an admin, the configured vendor
    /// store `named`, of a fleet it may see.
    fn placing_store(
        &self,
        grant: &Grant,
        named: Option<&str>,
    ) -> Result<(String, FleetId, Option<[f64; 2]>), OrderError> {
        match grant.role {
            Role::Vendor => {
                let (Some(store), Some(fleet)) = (&grant.store, &grant.fleet) else {
                    return Err(OrderError::NotVendor);
                };
                if named.is_some_and(|named| named != store) {
                    return Err(OrderError::UnknownStore);
                }
                Ok((store.clone(), fleet.clone(), grant.location))
            }
            Role::Dispatcher | Role::Admin => {
                let named = named.ok_or_else(|| {
                    OrderError::Invalid("store needed: the store the order is for".into())
                })?;
                let info = self
                    .stores(grant)
                    .into_iter()
                    .find(|s| s.store == named)
                    .ok_or(OrderError::UnknownStore)?;
                Ok((info.store, info.fleet, info.location))
            }
        }
    }

    /// The configured vendor stores `grant` may see (a vendor: its own; a dispatcher: those
    /// of the fleets it may see; an admin: all), by store id, each once.
    pub(crate) fn stores(&self, grant: &Grant) -> Vec<StoreInfo> {
        let mut stores: Vec<StoreInfo> = Vec::new();
        for g in self.tokens.grants().filter(|g| g.role == Role::Vendor) {
            let (Some(store), Some(fleet)) = (&g.store, &g.fleet) else {
                continue;
            };
            let visible = match grant.role {
                Role::Vendor => grant.store.as_deref() == Some(store.as_str()),
                Role::Dispatcher | Role::Admin => grant.may_see_fleet(fleet),
            };
            if !visible {
                continue;
            }
            match stores.iter_mut().find(|s| &s.store == store) {
                // Several tokens of one store: the first with a location tells where it is.
                Some(known) => known.location = known.location.or(g.location),
                None => stores.push(StoreInfo {
                    store: store.clone(),
                    fleet: fleet.clone(),
                    location: g.location,
                }),
            }
        }
        stores.sort_by(|a, b| a.store.cmp(&b.store));
        stores
    }

    /// Hands the order `id` as it is now to the order-change channel (the `order` event).
    /// A read failure is logged: the change itself is committed.
    pub(crate) async fn order_changed(&self, id: &OrderId) {
        match self.store.order_summary(id).await {
            Ok(Some(view)) => self.publish_order_change(view),
            Ok(None) => warn!(order = %id, "a changed order is gone"),
            Err(err) => {
                warn!(order = %id, cause = %err, "cannot read a changed order for its event")
            }
        }
    }

    /// The orders `grant` may see that `filter` selects (its scope replaces the filter's
    /// fleets; a vendor's store replaces the filter's store), newest first.
    ///
    /// # Errors
    /// [`StoreError`] if the store cannot be read.
    pub(crate) async fn list_orders(
        &self,
        grant: &Grant,
        mut filter: OrderFilter,
    ) -> Result<Vec<OrderView>, StoreError> {
        match grant.role {
            Role::Vendor => {
                let Some(own) = &grant.store else {
                    return Ok(Vec::new());
                };
                if filter.store.as_ref().is_some_and(|s| s != own) {
                    return Ok(Vec::new());
                }
                filter.store = Some(own.clone());
                filter.fleets = grant.fleet.clone().map(|f| vec![f]);
            }
            Role::Dispatcher | Role::Admin => filter.fleets = grant.fleets.clone(),
        }
        self.store.list_orders(&filter).await
    }

    /// Cancels the order `id` for `grant`: a vendor its own store's, before pickup; a
    /// dispatcher or an admin any it may see, before delivery. Cancelling a cancelled order
    /// answers it as it is. A vehicle that held the order is sent `CancelOrder` once the
    /// cancellation is committed (it is cancelled whatever the vehicle answers).
    ///
    /// # Errors
    /// [`OrderError::UnknownOrder`] (also outside the caller's scope),
    /// [`OrderError::Conflict`] if it was delivered (or picked up, for a vendor),
    /// [`OrderError::Store`].
    pub(crate) async fn cancel_order(
        &self,
        grant: &Grant,
        id: &OrderId,
    ) -> Result<CancelOutcome, OrderError> {
        self.order_for(grant, id)
            .await?
            .ok_or(OrderError::UnknownOrder)?;
        let vendor = grant.role == Role::Vendor;
        let rule = |state: OrderState| {
            if vendor {
                state.may_be_assigned()
            } else {
                !state.is_final()
            }
        };
        let cancelled = match self.store.cancel_order(id, rule).await {
            Ok(cancelled) => cancelled,
            Err(StoreError::OrderUnderway { state, .. }) => {
                let why = if vendor && state != OrderState::Delivered {
                    format!("order is {state}: a store can cancel an order only before pickup")
                } else {
                    format!("order is {state}: it cannot be cancelled")
                };
                return Err(OrderError::Conflict(why));
            }
            Err(StoreError::UnknownOrder(_)) => return Err(OrderError::UnknownOrder),
            Err(err) => return Err(err.into()),
        };
        if !cancelled.changed {
            return Ok(CancelOutcome {
                order: cancelled.order,
                vehicle_ack: None,
            });
        }
        info!(order = %id, by = %grant.name, holder = ?cancelled.holder, "order cancelled");
        self.publish_order_change(cancelled.order.clone());
        let vehicle_ack = match &cancelled.holder {
            Some(vehicle) => Some(self.tell_cancelled(id, vehicle).await),
            None => None,
        };
        Ok(CancelOutcome {
            order: cancelled.order,
            vehicle_ack,
        })
    }

    /// Sends `vehicle` `CancelOrder` for `order` and waits for its answer: its name, or why
    /// there is none (`timeout`, `offline`, `unknown-vehicle`, `unsent`).
    async fn tell_cancelled(&self, order: &OrderId, vehicle: &VehicleId) -> &'static str {
        let kind = CommandKind::CancelOrder {
            order: order.clone(),
        };
        let answer = match self.command(&Grant::system(), vehicle, kind).await {
            Ok((_, result)) => result.as_str(),
            Err(CommandError::Timeout(_)) => "timeout",
            Err(CommandError::Offline) => "offline",
            Err(CommandError::UnknownVehicle) => "unknown-vehicle",
            Err(CommandError::Invalid(_) | CommandError::Publish(_)) => "unsent",
        };
        info!(%order, %vehicle, answer, "vehicle told that the order is no longer its");
        answer
    }

    /// Gives the order `id`, not yet picked up, to `vehicle` (dispatcher or admin `grant`):
    /// the vehicle must be of the order's fleet, online and free. The vehicle that held it is
    /// sent `CancelOrder` and the order goes back to `created`; then `vehicle` is sent
    /// `AssignOrder`. If it refuses (or does not answer), the order stays `created` and is
    /// offered again like any waiting order. Giving it to the vehicle that holds it changes
    /// nothing.
    ///
    /// # Errors
    /// [`OrderError::UnknownOrder`], [`OrderError::UnknownVehicle`] (also outside the
    /// caller's scope), [`OrderError::Conflict`] (picked up already; the vehicle is of another
    /// fleet, offline, busy, refused or silent), [`OrderError::Store`].
    pub(crate) async fn reassign(
        &self,
        grant: &Grant,
        id: &OrderId,
        vehicle: &VehicleId,
    ) -> Result<OrderView, OrderError> {
        let view = self
            .order_for(grant, id)
            .await?
            .ok_or(OrderError::UnknownOrder)?;
        let target = self
            .vehicle(vehicle)
            .filter(|v| grant.may_see_fleet(&v.status.fleet))
            .ok_or(OrderError::UnknownVehicle)?;
        if !view.state.may_be_assigned() {
            return Err(OrderError::Conflict(format!(
                "order is {}: only an order not picked up yet can be reassigned",
                view.state
            )));
        }
        if view.state == OrderState::Assigned && view.vehicle.as_ref() == Some(vehicle) {
            return Ok(view);
        }
        if target.status.fleet != view.fleet {
            return Err(OrderError::Conflict(format!(
                "vehicle {vehicle} is not of the order's fleet {}",
                view.fleet
            )));
        }
        if target.status.liveness != Liveness::Online {
            return Err(OrderError::Conflict(format!(
                "vehicle {vehicle} is not online"
            )));
        }
        if self
            .store
            .busy_vehicles(&view.fleet)
            .await?
            .contains(vehicle)
        {
            return Err(OrderError::Conflict(format!(
                "vehicle {vehicle} is busy with another order"
            )));
        }
        // One assignment at a time, and this bridge's offer claim: nobody offers the order
        // while it moves.
        let _one_at_a_time = self.assigning.lock().await;
        let holder = instance_id();
        let round = self.command_timeout() * 3;
        let until_ms = crate::clock::now_ms() + round.as_millis() as u64;
        if !self.store.claim_offer(id, holder, until_ms).await? {
            return Err(OrderError::Conflict(
                "another bridge is offering the order right now; try again".into(),
            ));
        }
        let moved = self.move_order(&view, vehicle).await;
        if let Err(err) = self.store.release_offer(id, holder).await {
            warn!(order = %id, cause = %err, "cannot release the order's offer claim (it lapses)");
        }
        moved
    }

    /// [`Hub::reassign`] once checked, holding the assignment lock and the offer claim.
    async fn move_order(
        &self,
        view: &OrderView,
        vehicle: &VehicleId,
    ) -> Result<OrderView, OrderError> {
        let id = &view.order;
        if let (OrderState::Assigned, Some(old)) = (view.state, &view.vehicle)
            && self.store.unassign(id, old).await?
        {
            info!(order = %id, from = %old, to = %vehicle, "order taken back for reassignment");
            self.order_changed(id).await;
            self.tell_cancelled(id, old).await;
        }
        let kind = CommandKind::AssignOrder {
            order: id.clone(),
            pickup: view.pickup,
            dropoff: view.dropoff,
        };
        let refused = match self.command(&Grant::system(), vehicle, kind).await {
            Ok((_, AckResult::Ok)) => match self.store.assign(id, vehicle).await {
                Ok(()) => {
                    info!(order = %id, %vehicle, "order reassigned");
                    self.order_changed(id).await;
                    return self
                        .store
                        .order_summary(id)
                        .await?
                        .ok_or(OrderError::UnknownOrder);
                }
                Err(err) => {
                    // Cancelled meanwhile, or the vehicle took another order: it must drop it.
                    self.tell_cancelled(id, vehicle).await;
                    format!("the assignment was refused: {err}")
                }
            },
            Ok((_, result)) => format!("vehicle {vehicle} answered {}", result.as_str()),
            Err(err) => format!("vehicle {vehicle} did not take the order: {err}"),
        };
        info!(order = %id, %vehicle, why = %refused, "reassignment failed; the order waits to be offered again");
        Err(OrderError::Conflict(format!(
            "{refused}; the order waits for a vehicle"
        )))
    }

    /// Takes back every order assigned to a vehicle that has not been online for `after`
    /// (counted from when the bridge last heard from it, or from the assignment if that is
    /// later, or if the bridge does not know the vehicle): the order goes back to `created`
    /// and the waiting-orders task offers it to another vehicle. Returns how many. First
    /// sends `CancelOrder` to the vehicles that reported events of an order taken from them
    /// since the last call (noted by [`Hub::record_delivery`]).
    ///
    /// # Errors
    /// [`StoreError`] if the orders cannot be read.
    pub(crate) async fn reoffer_stranded(&self, after: Duration) -> Result<usize, StoreError> {
        let strays = std::mem::take(
            &mut *self
                .strays
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (order, vehicle) in strays {
            info!(%order, %vehicle, "a vehicle still reports an order taken from it");
            self.tell_cancelled(&order, &vehicle).await;
        }
        const PAGE: u32 = 256;
        let now = crate::clock::now_ms();
        let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        // Only orders assigned at least `after` ago can be stranded that long.
        let changed_by = now.saturating_sub(after_ms);
        let mut taken = 0;
        let mut last: Option<AssignedOrder> = None;
        loop {
            let page = self
                .store
                .assigned_orders(changed_by, last.as_ref(), PAGE)
                .await?;
            let full = page.len() == PAGE as usize;
            for assigned in &page {
                let since = match self.vehicle(&assigned.vehicle) {
                    Some(v) if v.status.liveness == Liveness::Online => continue,
                    Some(v) => v.status.last_seen_ms.max(assigned.updated_ms),
                    None => assigned.updated_ms,
                };
                if now.saturating_sub(since) < after_ms {
                    continue;
                }
                if self
                    .store
                    .unassign(&assigned.order, &assigned.vehicle)
                    .await?
                {
                    taken += 1;
                    warn!(order = %assigned.order, vehicle = %assigned.vehicle, offline_ms = now.saturating_sub(since), "order taken back from an offline vehicle, to be offered again");
                    self.order_changed(&assigned.order).await;
                }
            }
            last = page.into_iter().last();
            if !full {
                break;
            }
        }
        Ok(taken)
    }

    /// Offers every unassigned order (oldest first, read in pages) to free vehicles once
    /// more; returns how many found a vehicle. Run periodically: orders placed while every
    /// vehicle was busy are carried as vehicles become free. Only the fleets with a free
    /// vehicle now are looked at, and the round ends once none has one left: orders waiting
    /// in a fleet with no vehicle to spare (all busy, or all offline overnight) cost one read
    /// of the waiting fleets per round, not a read of every waiting order.
    ///
    /// # Errors
    /// [`StoreError`] if the orders cannot be read.
    pub(crate) async fn assign_waiting(&self) -> Result<usize, StoreError> {
        const PAGE: u32 = 64;
        let mut spare: HashSet<FleetId> = HashSet::new();
        for fleet in self.store.waiting_fleets().await? {
            if !self.free_vehicles_of(&fleet).await?.is_empty() {
                spare.insert(fleet);
            }
        }
        let mut assigned = 0;
        let mut last: Option<(u64, OrderId)> = None;
        while !spare.is_empty() {
            let page = self
                .store
                .unassigned_orders(last.as_ref().map(|(ms, id)| (*ms, id)), PAGE)
                .await?;
            let full = page.len() == PAGE as usize;
            for (_, waiting) in &page {
                if !spare.contains(&waiting.fleet) {
                    continue;
                }
                if self.free_vehicles_of(&waiting.fleet).await?.is_empty() {
                    spare.remove(&waiting.fleet);
                    continue;
                }
                if self.assign(waiting).await?.is_some() {
                    assigned += 1;
                }
            }
            last = page.into_iter().last().map(|(ms, w)| (ms, w.order));
            if !full {
                break;
            }
        }
        Ok(assigned)
    }

    /// Free vehicles of `fleet` (online, with a position, no undelivered order), with their
    /// positions, by id.
    async fn free_vehicles_of(
        &self,
        fleet: &FleetId,
    ) -> Result<Vec<(Position, VehicleId)>, StoreError> {
        let busy = self.store.busy_vehicles(fleet).await?;
        Ok(self
            .snapshot(|f, _| f == fleet)
            .into_iter()
            .filter(|v| v.status.liveness == Liveness::Online && !busy.contains(&v.status.vehicle))
            .filter_map(|v| Some((v.heartbeat?.pos, v.status.vehicle)))
            .collect())
    }

    /// Free vehicles of `fleet` ([`Hub::free_vehicles_of`]), nearest to `pickup` first.
    async fn free_vehicles(
        &self,
        fleet: &FleetId,
        pickup: Position,
    ) -> Result<Vec<(f64, VehicleId)>, StoreError> {
        let mut candidates: Vec<(f64, VehicleId)> = self
            .free_vehicles_of(fleet)
            .await?
            .into_iter()
            .map(|(pos, vehicle)| (distance_m(pos, pickup), vehicle))
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
        // Several bridges on one store: only the bridge holding the order's offer claim asks
        // vehicles, for as long as its round may take; a crashed bridge's claim lapses.
        let holder = instance_id();
        let round = self.command_timeout() * (MAX_CANDIDATES as u32 + 1);
        let until_ms = crate::clock::now_ms() + round.as_millis() as u64;
        if !self.store.claim_offer(order, holder, until_ms).await? {
            info!(%order, "another bridge is offering the order");
            return Ok(None);
        }
        // Read with the claim held: a bridge releases its claim only after its assignment
        // committed, so an order another bridge just gave away is seen as taken here (read
        // before the claim, it could still look waiting).
        let assigned = match self.store.order(order).await {
            Ok(Some(o)) if o.vehicle.is_some() || o.state != OrderState::Created => Ok(None),
            Ok(Some(_)) => self.offer(waiting).await,
            Ok(None) => Ok(None),
            Err(err) => Err(err),
        };
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
                        self.order_changed(order).await;
                        return Ok(Some(vehicle));
                    }
                    Err(err) => {
                        warn!(%order, %vehicle, cause = %err, "vehicle accepted but the assignment was refused");
                        // It is driving for an order it does not hold (cancelled, or given
                        // to another vehicle meanwhile).
                        self.tell_cancelled(order, &vehicle).await;
                        if matches!(
                            err,
                            StoreError::OrderUnderway { .. } | StoreError::OrderTaken { .. }
                        ) {
                            return Ok(None);
                        }
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

    /// The configured dispatcher identities that may see `fleet`: every delivery event of the
    /// fleet goes to them (and to the order's vendor).
    fn dispatcher_recipients(&self, fleet: &FleetId) -> Vec<ClientId> {
        self.tokens
            .grants()
            .filter(|g| matches!(g.role, Role::Dispatcher | Role::Admin) && g.may_see_fleet(fleet))
            .map(|g| ClientId::dispatcher(&g.name))
            .collect()
    }

    /// Records a vehicle's delivery event durably and queues it for its recipients (the
    /// order's vendor and the dispatchers who may see the fleet), in one transaction;
    /// `payload` makes the message for the event's flag (see `order::judge`) and the store
    /// that placed the order, both as the transaction read them. A suspect event (another
    /// vehicle's order, or an unknown order: [`EventFlag::is_suspect`]) is stored flagged and
    /// queued for the dispatchers only: the order's vendor never gets it as genuine (it sees
    /// the flagged entry in the order's timeline). Returns the queued messages to emit (none
    /// for a duplicate).
    ///
    /// # Errors
    /// [`StoreError`] if it was not committed: the event must not be acknowledged.
    pub(crate) async fn record_delivery(
        &self,
        topic: &Topic,
        event: &DeliveryEvent,
        payload: impl Fn(Option<EventFlag>, Option<&str>) -> Value + Send + Sync + 'static,
    ) -> Result<Vec<Enqueued>, StoreError> {
        let dispatchers = self.dispatcher_recipients(&topic.fleet);
        let address = move |flag: Option<EventFlag>, store: Option<&str>| {
            let message = payload(flag, store);
            // A suspect event never goes to the order's vendor as genuine.
            let vendor = store.filter(|_| !flag.is_some_and(EventFlag::is_suspect));
            let mut clients: Vec<ClientId> = vendor.map(ClientId::vendor).into_iter().collect();
            clients.extend(dispatchers.iter().cloned());
            clients.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            clients.dedup_by(|a, b| a.as_str() == b.as_str());
            clients
                .into_iter()
                .map(|client| (client, message.clone()))
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
        // A vehicle still delivering an order taken from it or cancelled (it was offline
        // then, or missed the `CancelOrder`): it is told again, off this path.
        let stray = match recorded.flag {
            Some(EventFlag::CancelledOrder) => true,
            Some(EventFlag::WrongVehicle) => self
                .store
                .was_assigned(&event.order, &topic.vehicle)
                .await
                .unwrap_or(false),
            _ => false,
        };
        if stray {
            let mut strays = self
                .strays
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = (event.order.clone(), topic.vehicle.clone());
            if strays.len() < MAX_STRAYS && !strays.contains(&entry) {
                strays.push(entry);
            }
        }
        // The order as this event left it, read in the event's transaction (a change that
        // followed is announced by whoever made it).
        if recorded.advanced
            && let Some(view) = recorded.order
        {
            self.publish_order_change(view);
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
