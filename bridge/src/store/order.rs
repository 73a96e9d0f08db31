//! Orders, their assignment to vehicles, and delivery events recorded exactly once.
//!
//! An order's state only moves forward: `created → assigned → picked-up → in-transit →
//! delivered`. A delivery event is stored whatever it says; one that cannot move its order
//! (an unknown order, another vehicle's order, a step behind the order's state) is stored
//! with an [`EventFlag`] saying why, never dropped.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;
use shared::{DeliveryEvent, DeliveryKind, FleetId, OrderId, Position, VehicleId};
use tracing::warn;

use super::queue::{self, ClientId, Enqueued};
use super::{Store, StoreError, from_db, narrow, now_ms, parse_id, to_db};

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrderState {
    /// Created, no vehicle yet.
    Created,
    /// A vehicle was assigned and is on its way to the pickup.
    Assigned,
    /// The vehicle has the parcel.
    PickedUp,
    /// The vehicle is on its way to the customer.
    InTransit,
    /// The customer has the parcel. The vehicle is free again.
    Delivered,
}

impl OrderState {
    /// The state's name: `created`, `assigned`, `picked-up`, `in-transit`, `delivered`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Assigned => "assigned",
            Self::PickedUp => "picked-up",
            Self::InTransit => "in-transit",
            Self::Delivered => "delivered",
        }
    }

    /// The state a delivery event of `kind` moves its order to.
    pub const fn after(kind: DeliveryKind) -> Self {
        match kind {
            DeliveryKind::Pickup => Self::PickedUp,
            DeliveryKind::InTransit => Self::InTransit,
            DeliveryKind::Delivered => Self::Delivered,
        }
    }
}

impl fmt::Display for OrderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            Self::Created,
            Self::Assigned,
            Self::PickedUp,
            Self::InTransit,
            Self::Delivered,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| format!("unknown order state {s:?}"))
    }
}

fn kind_from_str(s: &str) -> Result<DeliveryKind, StoreError> {
    [
        DeliveryKind::Pickup,
        DeliveryKind::InTransit,
        DeliveryKind::Delivered,
    ]
    .into_iter()
    .find(|kind| kind.as_str() == s)
    .ok_or_else(|| StoreError::corrupt("event kind", s, "unknown"))
}

/// Why a recorded delivery event did not move its order the usual one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventFlag {
    /// No order with this id (yet). The order is not changed.
    UnknownOrder,
    /// The order is not assigned to the reporting vehicle (another one, or none). The order is
    /// not changed.
    WrongVehicle,
    /// The event is behind the order's state (it arrived late, after a later step). The order
    /// is not changed.
    OutOfOrder,
    /// The same step was reported again under another event number. The order is not changed.
    Repeated,
    /// The event jumps over a step whose event has not arrived (yet): the order moves to the
    /// event's state anyway.
    SkippedStep,
}

impl EventFlag {
    /// The flag's name: `unknown-order`, `wrong-vehicle`, `out-of-order`, `repeated`,
    /// `skipped-step`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UnknownOrder => "unknown-order",
            Self::WrongVehicle => "wrong-vehicle",
            Self::OutOfOrder => "out-of-order",
            Self::Repeated => "repeated",
            Self::SkippedStep => "skipped-step",
        }
    }
}

impl fmt::Display for EventFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventFlag {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            Self::UnknownOrder,
            Self::WrongVehicle,
            Self::OutOfOrder,
            Self::Repeated,
            Self::SkippedStep,
        ]
        .into_iter()
        .find(|flag| flag.as_str() == s)
        .ok_or_else(|| format!("unknown event flag {s:?}"))
    }
}

/// An order as a vendor places it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    /// The order id, chosen by the vendor; creating it again is a no-op.
    pub order: OrderId,
    /// The vendor's store.
    pub store: String,
    /// The fleet that delivers the store's orders.
    pub fleet: FleetId,
    /// Who receives the parcel.
    pub customer: String,
    /// Where the parcel goes.
    pub dropoff: Position,
    /// Where the parcel is collected (the store).
    pub pickup: Position,
}

/// The outcome of [`Store::create_order`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedOrder {
    /// `true` if the order is new, `false` if it existed with the same content (a retry).
    pub created: bool,
    /// Its state now: `created` for a new order; for a retry, how far it got.
    pub state: OrderState,
    /// The vehicle it is assigned to, if any (a retry need not assign it again).
    pub vehicle: Option<VehicleId>,
}

/// What an entry of an order's timeline records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimelineKind {
    /// The order was assigned to a vehicle (bridge clock).
    Assigned,
    /// A vehicle reported a delivery step (device clock).
    Delivery(DeliveryKind),
}

impl TimelineKind {
    /// `assigned`, `pickup`, `in-transit` or `delivered`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Assigned => "assigned",
            Self::Delivery(kind) => kind.as_str(),
        }
    }
}

impl Serialize for TimelineKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One entry of an order's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineEntry {
    /// What happened.
    pub kind: TimelineKind,
    /// When, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Where the vehicle was (delivery events only).
    pub position: Option<Position>,
    /// The vehicle assigned, or the vehicle that reported.
    pub vehicle: VehicleId,
    /// The vehicle's event number (delivery events only).
    pub seq: Option<u32>,
    /// Why the event did not move the order the usual step, if it did not.
    pub flag: Option<EventFlag>,
}

/// An order with its state and timeline, for `GET /api/orders/{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderView {
    /// The order id.
    pub order: OrderId,
    /// The vendor's store.
    pub store: String,
    /// The fleet delivering it.
    pub fleet: FleetId,
    /// Who receives the parcel.
    pub customer: String,
    /// Where it is in its life.
    pub state: OrderState,
    /// The vehicle assigned, if any.
    pub vehicle: Option<VehicleId>,
    /// Where the parcel is collected.
    pub pickup: Position,
    /// Where the parcel goes.
    pub dropoff: Position,
    /// When it was created, ms since the Unix epoch (bridge clock).
    pub created_ms: u64,
    /// When it last changed, ms since the Unix epoch (bridge clock).
    pub updated_ms: u64,
    /// Its assignments and delivery events, by time (assignments on the bridge's clock,
    /// events on the device's).
    pub timeline: Vec<TimelineEntry>,
}

/// The outcome of [`Store::record_event`]. Everything in it is committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The event had been recorded before (a re-send): nothing was changed or queued.
    pub duplicate: bool,
    /// Why the event did not move its order the usual one step, if it did not.
    pub flag: Option<EventFlag>,
    /// Whether the order's state changed.
    pub advanced: bool,
    /// The order's state after the event (`None`: unknown order, or a duplicate).
    pub state: Option<OrderState>,
    /// The order's store (`None`: unknown order, or a duplicate).
    pub store: Option<String>,
    /// The messages queued, one per recipient, to emit now that they are committed.
    pub messages: Vec<Enqueued>,
}

/// How an event relates to its order: its flag, and the state to move the order to.
fn judge(
    order: Option<(OrderState, Option<&str>)>,
    vehicle: &VehicleId,
    kind: DeliveryKind,
) -> (Option<EventFlag>, Option<OrderState>) {
    let Some((state, holder)) = order else {
        return (Some(EventFlag::UnknownOrder), None);
    };
    if holder != Some(vehicle.as_str()) {
        return (Some(EventFlag::WrongVehicle), None);
    }
    let target = OrderState::after(kind);
    if target == state {
        (Some(EventFlag::Repeated), None)
    } else if target < state {
        (Some(EventFlag::OutOfOrder), None)
    } else if target as u8 == state as u8 + 1 {
        (None, Some(target))
    } else {
        (Some(EventFlag::SkippedStep), Some(target))
    }
}

/// The columns of an order row, as stored.
type OrderRow = (
    String,
    String,
    String,
    i32,
    i32,
    i32,
    i32,
    String,
    Option<String>,
    i64,
    i64,
);

/// The columns of a delivery event row, as the timeline reads them.
type EventRow = (String, i64, i64, String, i32, i32, Option<String>);

const ORDER_COLUMNS: &str = "SELECT store, fleet, customer, pickup_lat_e7, pickup_lon_e7, dropoff_lat_e7, \
     dropoff_lon_e7, state, vehicle, created_ms, updated_ms FROM orders WHERE order_id = $1";

fn parse_state(value: &str) -> Result<OrderState, StoreError> {
    value
        .parse()
        .map_err(|cause: String| StoreError::corrupt("order state", value, cause))
}

impl Store {
    /// Creates an order in state `created`. Idempotent per order id: creating it again with
    /// the same content returns the order as it is now (`created: false`).
    ///
    /// # Errors
    /// [`StoreError::OrderConflict`] if an order with this id exists with other content,
    /// [`StoreError::Database`] if it could not be committed.
    pub async fn create_order(&self, new: &NewOrder) -> Result<CreatedOrder, StoreError> {
        let now = to_db(now_ms());
        let mut tx = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO orders (order_id, store, fleet, customer, pickup_lat_e7, pickup_lon_e7, \
             dropoff_lat_e7, dropoff_lon_e7, state, vehicle, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'created', NULL, $9, $9) \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(new.order.as_str())
        .bind(&new.store)
        .bind(new.fleet.as_str())
        .bind(&new.customer)
        .bind(new.pickup.lat_e7)
        .bind(new.pickup.lon_e7)
        .bind(new.dropoff.lat_e7)
        .bind(new.dropoff.lon_e7)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 1 {
            tx.commit().await?;
            return Ok(CreatedOrder {
                created: true,
                state: OrderState::Created,
                vehicle: None,
            });
        }
        let row: OrderRow = sqlx::query_as(ORDER_COLUMNS)
            .bind(new.order.as_str())
            .fetch_one(&mut *tx)
            .await?;
        drop(tx);
        let (store, fleet, customer, p_lat, p_lon, d_lat, d_lon, state, vehicle, ..) = row;
        let same = store == new.store
            && fleet == new.fleet.as_str()
            && customer == new.customer
            && Position::new(p_lat, p_lon) == new.pickup
            && Position::new(d_lat, d_lon) == new.dropoff;
        if !same {
            return Err(StoreError::OrderConflict {
                order: new.order.clone(),
            });
        }
        Ok(CreatedOrder {
            created: false,
            state: parse_state(&state)?,
            vehicle: vehicle
                .as_deref()
                .map(|v| parse_id("order vehicle", v))
                .transpose()?,
        })
    }

    /// Assigns `order` to `vehicle` (state `assigned`). Assigning it again to the same vehicle
    /// is a no-op; assigning it to another vehicle before pickup moves it there, and frees the
    /// first one.
    ///
    /// # Errors
    /// [`StoreError::UnknownOrder`], [`StoreError::OrderUnderway`] once the order was picked
    /// up, [`StoreError::VehicleBusy`] if the vehicle holds another undelivered order,
    /// [`StoreError::Database`] if it could not be committed.
    pub async fn assign(&self, order: &OrderId, vehicle: &VehicleId) -> Result<(), StoreError> {
        let now = to_db(now_ms());
        let mut tx = self.begin_write().await?;
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT state, vehicle FROM orders WHERE order_id = $1")
                .bind(order.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let (state, holder) = row.ok_or_else(|| StoreError::UnknownOrder(order.clone()))?;
        let state = parse_state(&state)?;
        if state > OrderState::Assigned {
            return Err(StoreError::OrderUnderway {
                order: order.clone(),
                state,
            });
        }
        if state == OrderState::Assigned && holder.as_deref() == Some(vehicle.as_str()) {
            return Ok(());
        }
        let other: Option<String> = sqlx::query_scalar(
            "SELECT order_id FROM orders \
             WHERE vehicle = $1 AND state <> 'delivered' AND order_id <> $2",
        )
        .bind(vehicle.as_str())
        .bind(order.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(other) = other {
            return Err(StoreError::VehicleBusy {
                vehicle: vehicle.clone(),
                order: parse_id("order id", &other)?,
            });
        }
        sqlx::query(
            "UPDATE orders SET state = 'assigned', vehicle = $2, updated_ms = $3 \
             WHERE order_id = $1",
        )
        .bind(order.as_str())
        .bind(vehicle.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO assignments (order_id, vehicle, assigned_ms) VALUES ($1, $2, $3)")
            .bind(order.as_str())
            .bind(vehicle.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The order `id` with its timeline, if it exists.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored value
    /// cannot be read back.
    pub async fn order(&self, id: &OrderId) -> Result<Option<OrderView>, StoreError> {
        // One read transaction: the order and its timeline from the same snapshot.
        let mut tx = self.read.begin().await?;
        let row: Option<OrderRow> = sqlx::query_as(ORDER_COLUMNS)
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let assignments: Vec<(String, i64)> = sqlx::query_as(
            "SELECT vehicle, assigned_ms FROM assignments WHERE order_id = $1 ORDER BY id",
        )
        .bind(id.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let events: Vec<EventRow> = sqlx::query_as(
            "SELECT vehicle, seq, ts_ms, kind, lat_e7, lon_e7, flag FROM delivery_events \
             WHERE order_id = $1 ORDER BY ts_ms, id",
        )
        .bind(id.as_str())
        .fetch_all(&mut *tx)
        .await?;
        drop(tx);

        let mut timeline = Vec::with_capacity(assignments.len() + events.len());
        for (vehicle, ts_ms) in assignments {
            timeline.push(TimelineEntry {
                kind: TimelineKind::Assigned,
                ts_ms: from_db(ts_ms),
                position: None,
                vehicle: parse_id("assigned vehicle", &vehicle)?,
                seq: None,
                flag: None,
            });
        }
        for (vehicle, seq, ts_ms, kind, lat_e7, lon_e7, flag) in events {
            timeline.push(TimelineEntry {
                kind: TimelineKind::Delivery(kind_from_str(&kind)?),
                ts_ms: from_db(ts_ms),
                position: Some(Position::new(lat_e7, lon_e7)),
                vehicle: parse_id("event vehicle", &vehicle)?,
                seq: Some(narrow("event seq", seq)?),
                flag: flag
                    .as_deref()
                    .map(|f| {
                        f.parse()
                            .map_err(|cause: String| StoreError::corrupt("event flag", f, cause))
                    })
                    .transpose()?,
            });
        }
        // Stable: assignments stay before events of the same millisecond.
        timeline.sort_by_key(|entry| entry.ts_ms);

        let (store, fleet, customer, p_lat, p_lon, d_lat, d_lon, state, vehicle, created, updated) =
            row;
        Ok(Some(OrderView {
            order: id.clone(),
            store,
            fleet: parse_id("order fleet", &fleet)?,
            customer,
            state: parse_state(&state)?,
            vehicle: vehicle
                .as_deref()
                .map(|v| parse_id("order vehicle", v))
                .transpose()?,
            pickup: Position::new(p_lat, p_lon),
            dropoff: Position::new(d_lat, d_lon),
            created_ms: from_db(created),
            updated_ms: from_db(updated),
            timeline,
        }))
    }

    /// The store that placed `order`, if the order exists: who its events are for.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails.
    pub async fn order_store(&self, order: &OrderId) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT store FROM orders WHERE order_id = $1")
                .bind(order.as_str())
                .fetch_optional(&self.read)
                .await?,
        )
    }

    /// The vehicles of `fleet` that hold an undelivered order. The bridge assigns a new order
    /// to the nearest vehicle of the fleet that is not in this set.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored
    /// vehicle id is invalid.
    pub async fn busy_vehicles(&self, fleet: &FleetId) -> Result<HashSet<VehicleId>, StoreError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT vehicle FROM orders \
             WHERE fleet = $1 AND vehicle IS NOT NULL AND state <> 'delivered'",
        )
        .bind(fleet.as_str())
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(|v| parse_id("order vehicle", v)).collect()
    }

    /// Orders still waiting for a vehicle (state `created`), oldest first, at most `limit`:
    /// `(order, fleet, pickup, dropoff)`.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored id is
    /// invalid.
    pub async fn unassigned_orders(
        &self,
        limit: u32,
    ) -> Result<Vec<(OrderId, FleetId, Position, Position)>, StoreError> {
        let rows: Vec<(String, String, i32, i32, i32, i32)> = sqlx::query_as(
            "SELECT order_id, fleet, pickup_lat_e7, pickup_lon_e7, dropoff_lat_e7, dropoff_lon_e7 \
             FROM orders WHERE state = 'created' ORDER BY created_ms, order_id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|(order, fleet, plat, plon, dlat, dlon)| {
                Ok((
                    parse_id("order id", &order)?,
                    parse_id("order fleet", &fleet)?,
                    Position::new(plat, plon),
                    Position::new(dlat, dlon),
                ))
            })
            .collect()
    }

    /// Records a delivery event that `vehicle` of `fleet` reported, exactly once, in one
    /// transaction:
    ///
    /// 1. stores the event, deduplicated on (vehicle, seq, device timestamp): a re-sent event
    ///    returns `duplicate: true` and changes nothing;
    /// 2. moves its order on if the event fits (flags it otherwise, see [`EventFlag`]);
    /// 3. queues `payload` once for each of `recipients` (duplicates in the list count once),
    ///    flagged events included.
    ///
    /// When this returns `Ok`, all of it is committed: the caller may acknowledge the event to
    /// the broker, then emit [`Recorded::messages`]. The caller resolves the recipients
    /// (typically [`ClientId::vendor`] of [`Store::order_store`], and [`ClientId::dispatch`]).
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed: nothing of it was, the caller
    /// must not acknowledge the event.
    pub async fn record_event(
        &self,
        vehicle: &VehicleId,
        fleet: &FleetId,
        event: &DeliveryEvent,
        recipients: &[ClientId],
        payload: &Value,
    ) -> Result<Recorded, StoreError> {
        let now = now_ms();
        let text = payload.to_string();
        let mut tx = self.begin_write().await?;
        let order: Option<(String, Option<String>, String)> =
            sqlx::query_as("SELECT state, vehicle, store FROM orders WHERE order_id = $1")
                .bind(event.order.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let (current, store) = match &order {
            Some((state, holder, store)) => {
                (Some((parse_state(state)?, holder.as_deref())), Some(store))
            }
            None => (None, None),
        };
        let (flag, next) = judge(current, vehicle, event.kind);

        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO delivery_events (vehicle, seq, ts_ms, fleet, order_id, kind, lat_e7, \
             lon_e7, flag, received_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (vehicle, seq, ts_ms) DO NOTHING RETURNING id",
        )
        .bind(vehicle.as_str())
        .bind(i64::from(event.seq))
        .bind(to_db(event.ts_ms))
        .bind(fleet.as_str())
        .bind(event.order.as_str())
        .bind(event.kind.as_str())
        .bind(event.pos.lat_e7)
        .bind(event.pos.lon_e7)
        .bind(flag.map(EventFlag::as_str))
        .bind(to_db(now))
        .fetch_optional(&mut *tx)
        .await?;
        if inserted.is_none() {
            let first: Option<(String, String)> = sqlx::query_as(
                "SELECT order_id, kind FROM delivery_events \
                 WHERE vehicle = $1 AND seq = $2 AND ts_ms = $3",
            )
            .bind(vehicle.as_str())
            .bind(i64::from(event.seq))
            .bind(to_db(event.ts_ms))
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((order, kind)) = first
                && (order != event.order.as_str() || kind != event.kind.as_str())
            {
                warn!(
                    %vehicle, seq = event.seq, ts_ms = event.ts_ms,
                    first = %format!("{order} {kind}"),
                    now = %format!("{} {}", event.order, event.kind.as_str()),
                    "delivery event number reused with other content: kept the first"
                );
            }
            return Ok(Recorded {
                duplicate: true,
                flag: None,
                advanced: false,
                state: None,
                store: None,
                messages: Vec::new(),
            });
        }
        if let Some(next) = next {
            sqlx::query("UPDATE orders SET state = $2, updated_ms = $3 WHERE order_id = $1")
                .bind(event.order.as_str())
                .bind(next.as_str())
                .bind(to_db(now))
                .execute(&mut *tx)
                .await?;
        }
        let mut messages: Vec<Enqueued> = Vec::with_capacity(recipients.len());
        for client in recipients {
            if messages.iter().any(|m| &m.client == client) {
                continue;
            }
            let id = queue::insert(&mut tx, client, &text, now).await?;
            messages.push(Enqueued {
                client: client.clone(),
                id,
                payload: payload.clone(),
            });
        }
        tx.commit().await?;
        if let Some(flag) = flag {
            warn!(%vehicle, order = %event.order, kind = event.kind.as_str(), seq = event.seq, %flag, "delivery event recorded with a flag");
        }
        Ok(Recorded {
            duplicate: false,
            flag,
            advanced: next.is_some(),
            state: next.or(current.map(|(state, _)| state)),
            store: store.cloned(),
            messages,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::StoreOptions;

    fn id<T: FromStr>(s: &str) -> T
    where
        T::Err: fmt::Debug,
    {
        s.parse().expect("valid id")
    }

    fn new_order(order: &str) -> NewOrder {
        NewOrder {
            order: id(order),
            store: "store-1".into(),
            fleet: id("demo"),
            customer: "Ada".into(),
            dropoff: Position::new(525_200_000, 134_050_000),
            pickup: Position::new(525_000_000, 134_000_000),
        }
    }

    fn event(seq: u32, order: &str, kind: DeliveryKind, ts_ms: u64) -> DeliveryEvent {
        DeliveryEvent {
            seq,
            order: id(order),
            kind,
            ts_ms,
            pos: Position::new(525_100_000, 134_020_000),
        }
    }

    async fn memory() -> Store {
        Store::open(":memory:", StoreOptions::default())
            .await
            .expect("opens")
    }

    fn recipients() -> [ClientId; 2] {
        [ClientId::vendor("store-1"), ClientId::dispatch()]
    }

    #[tokio::test]
    async fn create_order_is_idempotent() {
        let store = memory().await;
        let order = new_order("o-1");
        let first = store.create_order(&order).await.expect("creates");
        assert!(first.created);
        assert_eq!(first.state, OrderState::Created);
        let again = store.create_order(&order).await.expect("idempotent");
        assert!(!again.created);
        assert_eq!(again.vehicle, None);

        store
            .assign(&order.order, &id("v-1"))
            .await
            .expect("assigns");
        let again = store.create_order(&order).await.expect("idempotent");
        assert_eq!(
            (again.created, again.state, again.vehicle),
            (false, OrderState::Assigned, Some(id("v-1")))
        );

        let conflicting = NewOrder {
            customer: "Bob".into(),
            ..order.clone()
        };
        let err = store
            .create_order(&conflicting)
            .await
            .expect_err("conflict");
        assert!(matches!(err, StoreError::OrderConflict { .. }), "{err}");
        let view = store
            .order(&order.order)
            .await
            .expect("reads")
            .expect("exists");
        assert_eq!(view.customer, "Ada", "the first content stays");
    }

    #[tokio::test]
    async fn assignment_rules() {
        let store = memory().await;
        for o in ["o-1", "o-2"] {
            store.create_order(&new_order(o)).await.expect("creates");
        }
        let (o1, o2): (OrderId, OrderId) = (id("o-1"), id("o-2"));
        let (v1, v2): (VehicleId, VehicleId) = (id("v-1"), id("v-2"));
        let err = store.assign(&id("nope"), &v1).await.expect_err("unknown");
        assert!(matches!(err, StoreError::UnknownOrder(_)), "{err}");

        store.assign(&o1, &v1).await.expect("assigns");
        store
            .assign(&o1, &v1)
            .await
            .expect("same vehicle again: no-op");
        let err = store.assign(&o2, &v1).await.expect_err("busy");
        assert!(
            matches!(&err, StoreError::VehicleBusy { order, .. } if *order == o1),
            "{err}"
        );
        assert_eq!(
            store.busy_vehicles(&id("demo")).await.expect("busy"),
            HashSet::from([v1.clone()])
        );
        assert!(
            store
                .busy_vehicles(&id("other"))
                .await
                .expect("busy")
                .is_empty()
        );

        // Reassignment before pickup moves the order and frees the first vehicle.
        store.assign(&o1, &v2).await.expect("reassigns");
        store.assign(&o2, &v1).await.expect("v-1 is free again");

        store
            .record_event(
                &v2,
                &id("demo"),
                &event(0, "o-1", DeliveryKind::Pickup, 10),
                &[],
                &json!({}),
            )
            .await
            .expect("records");
        let err = store.assign(&o1, &v1).await.expect_err("underway");
        assert!(
            matches!(
                err,
                StoreError::OrderUnderway {
                    state: OrderState::PickedUp,
                    ..
                }
            ),
            "{err}"
        );

        let view = store.order(&o1).await.expect("reads").expect("exists");
        let kinds: Vec<_> = view
            .timeline
            .iter()
            .map(|e| (e.kind.as_str(), e.vehicle.as_str()))
            .collect();
        // By time: the pickup carries the device's clock (10 ms after the epoch here).
        assert_eq!(
            kinds,
            [("pickup", "v-2"), ("assigned", "v-1"), ("assigned", "v-2")]
        );
    }

    #[tokio::test]
    async fn delivery_moves_the_order_and_queues_messages() {
        let store = memory().await;
        let order = new_order("o-1");
        store.create_order(&order).await.expect("creates");
        let (vehicle, fleet): (VehicleId, FleetId) = (id("v-1"), id("demo"));
        store.assign(&order.order, &vehicle).await.expect("assigns");
        let t0 = now_ms();
        let mut all_ids = Vec::new();
        for (seq, kind, state) in [
            (0, DeliveryKind::Pickup, OrderState::PickedUp),
            (1, DeliveryKind::InTransit, OrderState::InTransit),
            (2, DeliveryKind::Delivered, OrderState::Delivered),
        ] {
            let payload = json!({ "order": "o-1", "kind": kind.as_str() });
            let recorded = store
                .record_event(
                    &vehicle,
                    &fleet,
                    &event(seq, "o-1", kind, t0 + u64::from(seq)),
                    &recipients(),
                    &payload,
                )
                .await
                .expect("records");
            assert!(!recorded.duplicate);
            assert!(recorded.advanced);
            assert_eq!(recorded.flag, None);
            assert_eq!(recorded.state, Some(state));
            assert_eq!(recorded.store.as_deref(), Some("store-1"));
            assert_eq!(
                recorded
                    .messages
                    .iter()
                    .map(|m| m.client.clone())
                    .collect::<Vec<_>>(),
                recipients()
            );
            assert!(recorded.messages.iter().all(|m| m.payload == payload));
            all_ids.extend(recorded.messages.iter().map(|m| m.id));
        }
        assert!(all_ids.windows(2).all(|w| w[0] < w[1]), "{all_ids:?}");
        let vendor = store
            .pending(&ClientId::vendor("store-1"))
            .await
            .expect("pending");
        assert_eq!(vendor.len(), 3);
        assert_eq!(vendor[2].payload["kind"], "delivered");
        assert_eq!(
            store
                .pending(&ClientId::dispatch())
                .await
                .expect("pending")
                .len(),
            3
        );
        assert!(
            store.busy_vehicles(&fleet).await.expect("busy").is_empty(),
            "delivered frees the vehicle"
        );

        let view = store
            .order(&order.order)
            .await
            .expect("reads")
            .expect("exists");
        assert_eq!(view.state, OrderState::Delivered);
        assert_eq!(view.vehicle, Some(vehicle));
        assert_eq!(view.pickup, order.pickup);
        assert_eq!(view.dropoff, order.dropoff);
        let kinds: Vec<&str> = view.timeline.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["assigned", "pickup", "in-transit", "delivered"]);
        assert_eq!(view.timeline[1].seq, Some(0));
        assert_eq!(
            view.timeline[1].position,
            Some(Position::new(525_100_000, 134_020_000))
        );
    }

    #[tokio::test]
    async fn duplicates_change_nothing() {
        let store = memory().await;
        store
            .create_order(&new_order("o-1"))
            .await
            .expect("creates");
        let (vehicle, fleet): (VehicleId, FleetId) = (id("v-1"), id("demo"));
        store.assign(&id("o-1"), &vehicle).await.expect("assigns");
        let pickup = event(7, "o-1", DeliveryKind::Pickup, 1_000);
        let first = store
            .record_event(&vehicle, &fleet, &pickup, &recipients(), &json!(1))
            .await
            .expect("records");
        assert!(!first.duplicate);
        assert_eq!(first.messages.len(), 2);
        for _ in 0..3 {
            let again = store
                .record_event(&vehicle, &fleet, &pickup, &recipients(), &json!(1))
                .await
                .expect("records");
            assert!(again.duplicate);
            assert!(again.messages.is_empty());
            assert!(!again.advanced);
        }
        // Same number reused with other content (device lost its counter): still a duplicate.
        let reused = event(7, "o-1", DeliveryKind::Delivered, 1_000);
        assert!(
            store
                .record_event(&vehicle, &fleet, &reused, &recipients(), &json!(2))
                .await
                .expect("records")
                .duplicate
        );
        // The same number at another time (the counter restarted at 0 after a reboot) is a new event.
        let restarted = event(7, "o-1", DeliveryKind::InTransit, 5_000);
        let recorded = store
            .record_event(&vehicle, &fleet, &restarted, &recipients(), &json!(3))
            .await
            .expect("records");
        assert!(!recorded.duplicate);
        assert_eq!(recorded.state, Some(OrderState::InTransit));

        assert_eq!(
            store
                .pending(&ClientId::dispatch())
                .await
                .expect("pending")
                .len(),
            2
        );
        let view = store
            .order(&id("o-1"))
            .await
            .expect("reads")
            .expect("exists");
        assert_eq!(view.timeline.iter().filter(|e| e.seq.is_some()).count(), 2);
    }

    #[tokio::test]
    async fn out_of_order_and_unknown_events_are_kept_and_flagged() {
        let store = memory().await;
        store
            .create_order(&new_order("o-1"))
            .await
            .expect("creates");
        let (v1, v2, fleet): (VehicleId, VehicleId, FleetId) = (id("v-1"), id("v-2"), id("demo"));
        store.assign(&id("o-1"), &v1).await.expect("assigns");
        let record = |vehicle: VehicleId, ev: DeliveryEvent| {
            let store = store.clone();
            let fleet = fleet.clone();
            async move {
                store
                    .record_event(&vehicle, &fleet, &ev, &[ClientId::dispatch()], &json!({}))
                    .await
                    .expect("records")
            }
        };

        // in-transit before pickup: the order moves on, the skip is flagged.
        let r = record(v1.clone(), event(1, "o-1", DeliveryKind::InTransit, 20)).await;
        assert_eq!(
            (r.flag, r.advanced, r.state),
            (
                Some(EventFlag::SkippedStep),
                true,
                Some(OrderState::InTransit)
            )
        );
        // the late pickup: kept, flagged, the order stays.
        let r = record(v1.clone(), event(0, "o-1", DeliveryKind::Pickup, 10)).await;
        assert_eq!(
            (r.flag, r.advanced, r.state),
            (
                Some(EventFlag::OutOfOrder),
                false,
                Some(OrderState::InTransit)
            )
        );
        // in-transit again under a new number.
        let r = record(v1.clone(), event(2, "o-1", DeliveryKind::InTransit, 30)).await;
        assert_eq!((r.flag, r.advanced), (Some(EventFlag::Repeated), false));
        // another vehicle claims the order.
        let r = record(v2.clone(), event(0, "o-1", DeliveryKind::Delivered, 40)).await;
        assert_eq!(
            (r.flag, r.advanced, r.state),
            (
                Some(EventFlag::WrongVehicle),
                false,
                Some(OrderState::InTransit)
            )
        );
        // an order nobody created.
        let r = record(v2, event(1, "ghost", DeliveryKind::Pickup, 50)).await;
        assert_eq!(
            (r.flag, r.advanced, r.state, r.store),
            (Some(EventFlag::UnknownOrder), false, None, None)
        );
        assert_eq!(r.messages.len(), 1, "still queued for the recipients");
        // the real delivery.
        let r = record(v1, event(3, "o-1", DeliveryKind::Delivered, 60)).await;
        assert_eq!(
            (r.flag, r.advanced, r.state),
            (None, true, Some(OrderState::Delivered))
        );

        let view = store
            .order(&id("o-1"))
            .await
            .expect("reads")
            .expect("exists");
        let timeline: Vec<(&str, Option<EventFlag>)> = view
            .timeline
            .iter()
            .filter(|e| e.kind != TimelineKind::Assigned)
            .map(|e| (e.kind.as_str(), e.flag))
            .collect();
        assert_eq!(
            timeline,
            [
                ("pickup", Some(EventFlag::OutOfOrder)),
                ("in-transit", Some(EventFlag::SkippedStep)),
                ("in-transit", Some(EventFlag::Repeated)),
                ("delivered", Some(EventFlag::WrongVehicle)),
                ("delivered", None),
            ]
        );
        assert_eq!(
            store
                .pending(&ClientId::dispatch())
                .await
                .expect("pending")
                .len(),
            6
        );
        assert_eq!(store.order(&id("ghost")).await.expect("reads"), None);
    }

    #[test]
    fn judge_covers_the_state_machine() {
        let v: VehicleId = id("v-1");
        let mine = |state| Some((state, Some("v-1")));
        use DeliveryKind::{Delivered as D, InTransit as T, Pickup as P};
        use OrderState::{Assigned, Created, Delivered, InTransit, PickedUp};
        assert_eq!(judge(mine(Assigned), &v, P), (None, Some(PickedUp)));
        assert_eq!(judge(mine(PickedUp), &v, T), (None, Some(InTransit)));
        assert_eq!(judge(mine(InTransit), &v, D), (None, Some(Delivered)));
        assert_eq!(
            judge(mine(Assigned), &v, D),
            (Some(EventFlag::SkippedStep), Some(Delivered))
        );
        assert_eq!(
            judge(mine(Delivered), &v, P),
            (Some(EventFlag::OutOfOrder), None)
        );
        assert_eq!(
            judge(mine(Delivered), &v, D),
            (Some(EventFlag::Repeated), None)
        );
        assert_eq!(
            judge(Some((Created, None)), &v, P),
            (Some(EventFlag::WrongVehicle), None)
        );
        assert_eq!(judge(None, &v, P), (Some(EventFlag::UnknownOrder), None));
    }

    #[test]
    fn names_round_trip() {
        for state in [
            OrderState::Created,
            OrderState::Assigned,
            OrderState::PickedUp,
            OrderState::InTransit,
            OrderState::Delivered,
        ] {
            assert_eq!(state.as_str().parse(), Ok(state));
            assert_eq!(
                serde_json::to_value(state).expect("json"),
                json!(state.as_str())
            );
        }
        for flag in [
            EventFlag::UnknownOrder,
            EventFlag::WrongVehicle,
            EventFlag::OutOfOrder,
            EventFlag::Repeated,
            EventFlag::SkippedStep,
        ] {
            assert_eq!(flag.as_str().parse(), Ok(flag));
            assert_eq!(
                serde_json::to_value(flag).expect("json"),
                json!(flag.as_str())
            );
        }
    }
}
