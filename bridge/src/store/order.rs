//! Orders, their assignment to vehicles, and delivery events recorded exactly once.
//!
//! The rules an order follows (its states, the flags of events that do not fit) are
//! `domain::order`'s; this module applies them inside the transactions that must see and
//! change an order atomically.

use std::collections::HashSet;

use serde_json::Value;
use shared::{DeliveryEvent, FleetId, OrderId, Position, VehicleId};
use tracing::warn;

use super::database::{Backend, DbTx, Store, from_db, narrow, parse_id, to_db};
use super::error::StoreError;
use super::group::{Messages, Recorded};
use super::order_row::{
    ORDER_COLUMNS, OrderRow, OrderView, TimelineEntry, TimelineKind, order_fields, order_from_row,
    order_with_id,
};
use super::postgres;
use super::queue::ClientId;
use crate::clock::now_ms;
use crate::domain::order::{EventFlag, OrderState, delivery_kind};

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

/// An order waiting for a vehicle, as [`Store::unassigned_orders`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WaitingOrder {
    /// The order id.
    pub(crate) order: OrderId,
    /// The fleet that delivers it.
    pub(crate) fleet: FleetId,
    /// Where the parcel is collected.
    pub(crate) pickup: Position,
    /// Where the parcel goes.
    pub(crate) dropoff: Position,
}

/// What `GET /api/orders` asks for: orders within a scope, matching every filter given,
/// newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderFilter {
    /// Only orders of these fleets (`None`: every fleet). Empty: none.
    pub(crate) fleets: Option<Vec<FleetId>>,
    /// Only this store's orders.
    pub(crate) store: Option<String>,
    /// Only orders in one of these states (empty: any state).
    pub(crate) states: Vec<OrderState>,
    /// Only orders held (or last held) by this vehicle.
    pub(crate) vehicle: Option<VehicleId>,
    /// At most this many.
    pub(crate) limit: u32,
}

/// The outcome of [`Store::cancel_order`]. Everything in it is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cancelled {
    /// Whether this call cancelled it (`false`: it was cancelled before).
    pub(crate) changed: bool,
    /// The vehicle that was carrying it out (assigned, picked up or in transit) and must be
    /// told; `None` if none was, or if it was cancelled before.
    pub(crate) holder: Option<VehicleId>,
    /// The order as it is now (without its timeline).
    pub(crate) order: OrderView,
}

/// An order assigned to a vehicle that has not picked it up yet, as
/// [`Store::assigned_orders`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AssignedOrder {
    /// The order id.
    pub(crate) order: OrderId,
    /// The fleet that delivers it.
    pub(crate) fleet: FleetId,
    /// The vehicle it is assigned to.
    pub(crate) vehicle: VehicleId,
    /// When it last changed (its assignment), ms since the Unix epoch (bridge clock).
    pub(crate) updated_ms: u64,
}

/// The columns of a delivery event row, as the timeline reads them.
type EventRow = (String, i64, i64, String, i32, i32, Option<String>);

/// The query of [`Store::list_orders`] for `filter` (with `$N` placeholders, the limit last)
/// and the values to bind before the limit. Only placeholders are formatted in.
fn list_query(filter: &OrderFilter) -> (String, Vec<String>) {
    // Only placeholders are formatted in; every value is bound.
    let mut sql = String::from(concat!(
        "SELECT order_id, ",
        order_fields!(),
        " FROM orders WHERE 1 = 1"
    ));
    let mut binds: Vec<String> = Vec::new();
    let mut any_of = |sql: &mut String, column: &str, values: Vec<String>| {
        let first = binds.len() + 1;
        let marks: Vec<String> = (first..first + values.len())
            .map(|n| format!("${n}"))
            .collect();
        sql.push_str(&format!(" AND {column} IN ({})", marks.join(", ")));
        binds.extend(values);
    };
    if let Some(fleets) = &filter.fleets {
        any_of(
            &mut sql,
            "fleet",
            fleets.iter().map(|f| f.as_str().to_owned()).collect(),
        );
    }
    if !filter.states.is_empty() {
        any_of(
            &mut sql,
            "state",
            filter
                .states
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
        );
    }
    if let Some(store) = &filter.store {
        any_of(&mut sql, "store", vec![store.clone()]);
    }
    if let Some(vehicle) = &filter.vehicle {
        any_of(&mut sql, "vehicle", vec![vehicle.as_str().to_owned()]);
    }
    sql.push_str(&format!(
        " ORDER BY created_ms DESC, order_id DESC LIMIT ${}",
        binds.len() + 1
    ));
    (sql, binds)
}

/// An assignment row as a timeline entry.
fn assignment_entry((vehicle, ts_ms): (String, i64)) -> Result<TimelineEntry, StoreError> {
    Ok(TimelineEntry {
        kind: TimelineKind::Assigned,
        ts_ms: from_db(ts_ms),
        position: None,
        vehicle: parse_id("assigned vehicle", &vehicle)?,
        seq: None,
        flag: None,
    })
}

/// A delivery event row as a timeline entry.
fn event_entry(row: EventRow) -> Result<TimelineEntry, StoreError> {
    let (vehicle, seq, ts_ms, kind, lat_e7, lon_e7, flag) = row;
    Ok(TimelineEntry {
        kind: TimelineKind::Delivery(
            delivery_kind(&kind)
                .map_err(|cause| StoreError::corrupt("event kind", &kind, cause))?,
        ),
        ts_ms: from_db(ts_ms),
        position: Some(Position::new(lat_e7, lon_e7)),
        vehicle: parse_id("event vehicle", &vehicle)?,
        seq: Some(narrow("event seq", seq)?),
        flag: flag
            .as_deref()
            .map(|f| parse_id("event flag", f))
            .transpose()?,
    })
}

/// A page of the orders the re-offer looks at ([`Store::assigned_orders`]): the page starts
/// where the last one ended, as a range on `(updated_ms, order_id)`, so that a round over N
/// assigned orders reads N rows, not N²/page from the first one each time.
pub(super) const ASSIGNED_PAGE: &str = "SELECT order_id, fleet, vehicle, updated_ms FROM orders \
     WHERE state = 'assigned' AND updated_ms <= $1 AND (updated_ms, order_id) > ($2, $3) \
     ORDER BY updated_ms, order_id LIMIT $4";

/// A page of the orders waiting for a vehicle ([`Store::unassigned_orders`]), oldest first,
/// from where the last page ended: a range on `orders_by_state (state, created_ms,
/// order_id)`, as [`ASSIGNED_PAGE`].
pub(super) const UNASSIGNED_PAGE: &str = "SELECT order_id, fleet, pickup_lat_e7, \
     pickup_lon_e7, dropoff_lat_e7, dropoff_lon_e7, created_ms FROM orders \
     WHERE state = 'created' AND (created_ms, order_id) > ($1, $2) \
     ORDER BY created_ms, order_id LIMIT $3";

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
        tx.rollback().await?;
        let existing = order_from_row(&new.order, row)?;
        let same = existing.store == new.store
            && existing.fleet == new.fleet
            && existing.customer == new.customer
            && existing.pickup == new.pickup
            && existing.dropoff == new.dropoff;
        if !same {
            return Err(StoreError::OrderConflict {
                order: new.order.clone(),
            });
        }
        Ok(CreatedOrder {
            created: false,
            state: existing.state,
            vehicle: existing.vehicle,
        })
    }

    /// Assigns the waiting `order` (state `created`) to `vehicle` (state `assigned`).
    /// Assigning it again to the same vehicle is a no-op. An order another vehicle holds is
    /// refused: moving it is `unassign` (and telling that vehicle) first, so two
    /// bridges that each had a vehicle accept the same order never both succeed.
    ///
    /// On PostgreSQL one bridge assigns at a time (see the `postgres` module): the others wait
    /// for its (short) transaction.
    ///
    /// # Errors
    /// [`StoreError::UnknownOrder`], [`StoreError::OrderUnderway`] once the order was picked
    /// up, [`StoreError::OrderTaken`] if another vehicle holds it,
    /// [`StoreError::VehicleBusy`] if the vehicle holds another undelivered order,
    /// [`StoreError::Database`] if it could not be committed.
    pub async fn assign(&self, order: &OrderId, vehicle: &VehicleId) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        // Ended explicitly either way: on PostgreSQL the transaction holds the assigner lock
        // and the order's row lock until it ends, and a dropped transaction ends only when
        // its connection is next used.
        match self.assign_in(&mut tx, order, vehicle).await {
            Ok(true) => Ok(tx.commit().await?),
            Ok(false) => Ok(tx.rollback().await?),
            Err(err) => {
                if let Err(cause) = tx.rollback().await {
                    warn!(%order, %cause, "cannot roll back a refused assignment");
                }
                Err(err)
            }
        }
    }

    /// [`Store::assign`] inside `tx`; whether it changed anything (to commit).
    async fn assign_in(
        &self,
        tx: &mut DbTx,
        order: &OrderId,
        vehicle: &VehicleId,
    ) -> Result<bool, StoreError> {
        let now = to_db(now_ms());
        if self.backend == Backend::Postgres {
            postgres::assigner_lock(tx).await?;
        }
        let row: Option<(String, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT state, vehicle FROM orders WHERE order_id = $1{}",
            self.backend.for_update()
        )))
        .bind(order.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        let (state, holder) = row.ok_or_else(|| StoreError::UnknownOrder(order.clone()))?;
        let state: OrderState = parse_id("order state", &state)?;
        if !state.may_be_assigned() {
            return Err(StoreError::OrderUnderway {
                order: order.clone(),
                state,
            });
        }
        if let Some(holder) = holder.filter(|_| state == OrderState::Assigned) {
            if holder == vehicle.as_str() {
                return Ok(false);
            }
            return Err(StoreError::OrderTaken {
                order: order.clone(),
                vehicle: parse_id("order vehicle", &holder)?,
            });
        }
        let other: Option<String> = sqlx::query_scalar(
            "SELECT order_id FROM orders \
             WHERE vehicle = $1 AND state NOT IN ('delivered', 'cancelled') \
             AND order_id <> $2",
        )
        .bind(vehicle.as_str())
        .bind(order.as_str())
        .fetch_optional(&mut **tx)
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
        .execute(&mut **tx)
        .await?;
        sqlx::query("INSERT INTO assignments (order_id, vehicle, assigned_ms) VALUES ($1, $2, $3)")
            .bind(order.as_str())
            .bind(vehicle.as_str())
            .bind(now)
            .execute(&mut **tx)
            .await?;
        Ok(true)
    }

    /// The order `id` with its timeline, if it exists.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored value
    /// cannot be read back.
    pub(crate) async fn order(&self, id: &OrderId) -> Result<Option<OrderView>, StoreError> {
        // One read transaction: the order and its timeline from the same snapshot.
        let mut tx = self.read.begin_with(self.backend.begin_read()).await?;
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

        let mut order = order_from_row(id, row)?;
        order.timeline = assignments
            .into_iter()
            .map(assignment_entry)
            .chain(events.into_iter().map(event_entry))
            .collect::<Result<_, _>>()?;
        // Stable: assignments stay before events of the same millisecond.
        order.timeline.sort_by_key(|entry| entry.ts_ms);
        Ok(Some(order))
    }

    /// The order `id` without its timeline, if it exists: what an `order` event says.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored value
    /// cannot be read back.
    pub(crate) async fn order_summary(
        &self,
        id: &OrderId,
    ) -> Result<Option<OrderView>, StoreError> {
        let row: Option<OrderRow> = sqlx::query_as(ORDER_COLUMNS)
            .bind(id.as_str())
            .fetch_optional(&self.read)
            .await?;
        row.map(|row| order_from_row(id, row)).transpose()
    }

    /// The orders `filter` selects, newest first (without their timelines). The scope (its
    /// fleets, its store) is applied in the query, as every other filter.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored value
    /// cannot be read back.
    pub(crate) async fn list_orders(
        &self,
        filter: &OrderFilter,
    ) -> Result<Vec<OrderView>, StoreError> {
        if filter.fleets.as_ref().is_some_and(Vec::is_empty) || filter.limit == 0 {
            return Ok(Vec::new());
        }
        let (sql, binds) = list_query(filter);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for value in &binds {
            query = query.bind(value.as_str());
        }
        let rows = query
            .bind(i64::from(filter.limit))
            .fetch_all(&self.read)
            .await?;
        rows.iter()
            .map(|row| order_with_id(row).map(|(_, order)| order))
            .collect()
    }

    /// Cancels `order` if `may_cancel` allows it in its current state, in one transaction
    /// (the order's row locked on PostgreSQL). Cancelling a cancelled order changes nothing
    /// (`changed: false`). The order keeps the vehicle that held it, for its timeline; a
    /// cancelled order does not make that vehicle busy.
    ///
    /// # Errors
    /// [`StoreError::UnknownOrder`], [`StoreError::OrderUnderway`] if it is delivered or
    /// `may_cancel` refuses its state, [`StoreError::Database`] if it could not be committed.
    pub(crate) async fn cancel_order(
        &self,
        order: &OrderId,
        may_cancel: impl FnOnce(OrderState) -> bool,
    ) -> Result<Cancelled, StoreError> {
        let mut tx = self.begin_write().await?;
        let result = self.cancel_in(&mut tx, order, may_cancel).await;
        // Ended explicitly either way: on PostgreSQL the transaction holds the row lock.
        match &result {
            Ok(cancelled) if cancelled.changed => tx.commit().await?,
            Ok(_) => tx.rollback().await?,
            Err(_) => {
                if let Err(cause) = tx.rollback().await {
                    warn!(%order, %cause, "cannot roll back a refused cancellation");
                }
            }
        }
        result
    }

    /// [`Store::cancel_order`] inside `tx`.
    async fn cancel_in(
        &self,
        tx: &mut DbTx,
        order: &OrderId,
        may_cancel: impl FnOnce(OrderState) -> bool,
    ) -> Result<Cancelled, StoreError> {
        let row: Option<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{ORDER_COLUMNS}{}",
            self.backend.for_update()
        )))
        .bind(order.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        let row = row.ok_or_else(|| StoreError::UnknownOrder(order.clone()))?;
        let mut view = order_from_row(order, row)?;
        if view.state == OrderState::Cancelled {
            return Ok(Cancelled {
                changed: false,
                holder: None,
                order: view,
            });
        }
        if view.state == OrderState::Delivered || !may_cancel(view.state) {
            return Err(StoreError::OrderUnderway {
                order: order.clone(),
                state: view.state,
            });
        }
        let holder = if view.state == OrderState::Created {
            None
        } else {
            view.vehicle.clone()
        };
        let now = now_ms();
        sqlx::query("UPDATE orders SET state = 'cancelled', updated_ms = $2 WHERE order_id = $1")
            .bind(order.as_str())
            .bind(to_db(now))
            .execute(&mut **tx)
            .await?;
        view.state = OrderState::Cancelled;
        view.updated_ms = now;
        Ok(Cancelled {
            changed: true,
            holder,
            order: view,
        })
    }

    /// Takes `order` back from `vehicle` before pickup (state `created` again, no vehicle):
    /// `true` if it was assigned to `vehicle` and now waits for another one, `false` if it
    /// was not (any more) `vehicle`'s assigned order. One statement: it checks and changes
    /// the row atomically on both backends.
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    pub(crate) async fn unassign(
        &self,
        order: &OrderId,
        vehicle: &VehicleId,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE orders SET state = 'created', vehicle = NULL, updated_ms = $3 \
             WHERE order_id = $1 AND state = 'assigned' AND vehicle = $2",
        )
        .bind(order.as_str())
        .bind(vehicle.as_str())
        .bind(to_db(now_ms()))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(changed == 1)
    }

    /// Whether `order` was ever assigned to `vehicle` (its timeline has such an assignment).
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails.
    pub(crate) async fn was_assigned(
        &self,
        order: &OrderId,
        vehicle: &VehicleId,
    ) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM assignments WHERE order_id = $1 AND vehicle = $2 LIMIT 1",
        )
        .bind(order.as_str())
        .bind(vehicle.as_str())
        .fetch_optional(&self.read)
        .await?;
        Ok(found.is_some())
    }

    /// Orders assigned to a vehicle that has not picked them up and unchanged since
    /// `changed_by_ms` (at or before), oldest change first, at most `limit`, those after
    /// `after` (the last of the previous page, `None` for the first): the orders the bridge
    /// may re-offer when their vehicle stays offline, in pages so none is starved however many
    /// vehicles hold one.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored id is
    /// invalid.
    pub(crate) async fn assigned_orders(
        &self,
        changed_by_ms: u64,
        after: Option<&AssignedOrder>,
        limit: u32,
    ) -> Result<Vec<AssignedOrder>, StoreError> {
        let (after_ms, after_id) =
            after.map_or((-1, ""), |a| (to_db(a.updated_ms), a.order.as_str()));
        let rows: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(ASSIGNED_PAGE)
            .bind(to_db(changed_by_ms))
            .bind(after_ms)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&self.read)
            .await?;
        rows.into_iter()
            .filter_map(|(order, fleet, vehicle, updated)| {
                let vehicle = vehicle?;
                Some((order, fleet, vehicle, updated))
            })
            .map(|(order, fleet, vehicle, updated)| {
                Ok(AssignedOrder {
                    order: parse_id("order id", &order)?,
                    fleet: parse_id("order fleet", &fleet)?,
                    vehicle: parse_id("order vehicle", &vehicle)?,
                    updated_ms: from_db(updated),
                })
            })
            .collect()
    }

    /// The vehicles of `fleet` that hold an undelivered order. The bridge assigns a new order
    /// to the nearest vehicle of the fleet that is not in this set.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored
    /// vehicle id is invalid.
    pub(crate) async fn busy_vehicles(
        &self,
        fleet: &FleetId,
    ) -> Result<HashSet<VehicleId>, StoreError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT vehicle FROM orders \
             WHERE fleet = $1 AND vehicle IS NOT NULL \
             AND state NOT IN ('delivered', 'cancelled')",
        )
        .bind(fleet.as_str())
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(|v| parse_id("order vehicle", v)).collect()
    }

    /// Claims the right to offer `order` to vehicles for `holder` (a bridge instance) until
    /// `until_ms`: `true` if it is now `holder`'s (no claim, a lapsed claim, or already its
    /// own), `false` while another bridge holds a live claim. Several bridges on one database
    /// never offer one order at once; a crashed bridge's claim lapses at `until_ms`.
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    pub(crate) async fn claim_offer(
        &self,
        order: &OrderId,
        holder: &str,
        until_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let claimed: Option<String> = sqlx::query_scalar(
            "INSERT INTO order_offers (order_id, holder, until_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (order_id) DO UPDATE SET holder = excluded.holder, \
             until_ms = excluded.until_ms \
             WHERE order_offers.until_ms < $4 OR order_offers.holder = excluded.holder \
             RETURNING order_id",
        )
        .bind(order.as_str())
        .bind(holder)
        .bind(to_db(until_ms))
        .bind(to_db(now_ms()))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(claimed.is_some())
    }

    /// Ends `holder`'s claim on offering `order` (see [`Store::claim_offer`]); another
    /// bridge's claim is left alone.
    ///
    /// # Errors
    /// [`StoreError::Database`] if it could not be committed.
    pub(crate) async fn release_offer(
        &self,
        order: &OrderId,
        holder: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM order_offers WHERE order_id = $1 AND holder = $2")
            .bind(order.as_str())
            .bind(holder)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Orders still waiting for a vehicle (state `created`), oldest first, at most `limit`,
    /// those after `after` (the `(created_ms, order)` of the last of the previous page, `None`
    /// for the first), each with its `created_ms`: read in pages, so every waiting order is
    /// offered however many wait before it.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored id is
    /// invalid.
    pub(crate) async fn unassigned_orders(
        &self,
        after: Option<(u64, &OrderId)>,
        limit: u32,
    ) -> Result<Vec<(u64, WaitingOrder)>, StoreError> {
        let (after_ms, after_id) = after.map_or((-1, ""), |(ms, id)| (to_db(ms), id.as_str()));
        let rows: Vec<(String, String, i32, i32, i32, i32, i64)> = sqlx::query_as(UNASSIGNED_PAGE)
            .bind(after_ms)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&self.read)
            .await?;
        rows.into_iter()
            .map(|(order, fleet, plat, plon, dlat, dlon, created)| {
                Ok((
                    from_db(created),
                    WaitingOrder {
                        order: parse_id("order id", &order)?,
                        fleet: parse_id("order fleet", &fleet)?,
                        pickup: Position::new(plat, plon),
                        dropoff: Position::new(dlat, dlon),
                    },
                ))
            })
            .collect()
    }

    /// The fleets with orders waiting for a vehicle (state `created`), in no order: the
    /// assigner looks for free vehicles in these before it reads a page of orders.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored id is
    /// invalid.
    pub(crate) async fn waiting_fleets(&self) -> Result<Vec<FleetId>, StoreError> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT fleet FROM orders WHERE state = 'created'")
                .fetch_all(&self.read)
                .await?;
        rows.iter().map(|f| parse_id("order fleet", f)).collect()
    }

    /// Records a delivery event that `vehicle` of `fleet` reported, exactly once, in one
    /// transaction:
    ///
    /// 1. stores the event, deduplicated on (vehicle, seq, device timestamp): a re-sent event
    ///    returns `duplicate: true` and changes nothing;
    /// 2. moves its order on if the event fits (flags it otherwise, see `EventFlag`);
    /// 3. queues `payload` once for each of `recipients` (duplicates in the list count once),
    ///    flagged events included.
    ///
    /// When this returns `Ok`, all of it is committed: the caller may acknowledge the event to
    /// the broker, then emit [`Recorded::messages`]. The caller resolves the recipients
    /// (typically [`ClientId::vendor`] of the order's store, and [`ClientId::dispatch`]; the
    /// crate's `record_event_for` is given the store as the transaction read it).
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
        let (recipients, payload) = (recipients.to_vec(), payload.clone());
        self.record_event_for(vehicle, fleet, event, move |_, _| {
            recipients
                .iter()
                .map(|client| (client.clone(), payload.clone()))
                .collect()
        })
        .await
    }

    /// [`Store::record_event`], with the messages chosen once the event is judged: `address`
    /// gets the event's flag (`None`: it moved its order the usual step) and the store that
    /// placed the order (`None`: no such order), as the transaction read them, and returns
    /// what to queue for whom, in the same transaction. A flagged event can so go to fewer
    /// clients, or say that it is flagged; the order's vendor is found without a read of its
    /// own. It is called in the store's group committer, once per try.
    ///
    /// # Errors
    /// As [`Store::record_event`].
    pub(crate) async fn record_event_for(
        &self,
        vehicle: &VehicleId,
        fleet: &FleetId,
        event: &DeliveryEvent,
        address: impl Fn(Option<EventFlag>, Option<&str>) -> Messages + Send + Sync + 'static,
    ) -> Result<Recorded, StoreError> {
        self.events
            .record(
                vehicle,
                fleet,
                event,
                Box::new(address),
                &self.write,
                self.backend,
            )
            .await
    }
}

#[cfg(test)]
mod tests;
