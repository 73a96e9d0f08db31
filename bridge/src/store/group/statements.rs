//! The statements of a group's transaction: the group's orders read (and locked, on
//! PostgreSQL) at once, its events looked up at once, then inserted, its orders moved on and
//! its messages queued, each in one statement (or a few, for large groups) rather than one per
//! event. The judging between them is `domain::order::judge`, in memory, event after event in
//! arrival order, exactly as one transaction per event would apply it (see `Group::judge`).

use std::collections::HashMap;

use shared::{DeliveryEvent, FleetId, VehicleId};

use super::super::backend::{Backend, from_db, parse_id, to_db};
use super::super::error::StoreError;
use super::super::ids::{ClientId, MessageId};
use super::super::pool::DbTx;
use crate::domain::order::{EventFlag, OrderState};

/// The most rows one generated statement takes (well under both backends' limits on bound
/// values).
const ROWS_PER_STATEMENT: usize = 256;

/// An order of the group, as read at the start of its transaction.
#[derive(Debug, Clone)]
pub(super) struct OrderNow {
    /// Its state (changed in memory as the group's events move it on).
    pub(super) state: OrderState,
    /// The vehicle holding it.
    pub(super) holder: Option<String>,
    /// The vendor's store that placed it.
    pub(super) store: String,
}

/// The key a delivery event is deduplicated on: (vehicle, seq, device timestamp).
pub(super) type EventKey = (String, u32, u64);

/// What was recorded first under an event's key: its order and kind.
pub(super) type FirstRecorded = (String, String);

/// A new event of the group, judged, to insert.
pub(super) struct NewEvent<'a> {
    pub(super) vehicle: &'a VehicleId,
    pub(super) fleet: &'a FleetId,
    pub(super) event: &'a DeliveryEvent,
    pub(super) flag: Option<EventFlag>,
}

/// Appends `(?, ?, ...)` groups: `rows` rows of `columns` placeholders each.
fn push_rows(sql: &mut String, backend: Backend, rows: usize, columns: usize) {
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            backend.push_placeholder(sql, row * columns + column + 1);
        }
        sql.push(')');
    }
}

/// Reads the orders `ids` (sorted, distinct), locking them in that order on PostgreSQL: two
/// bridges take the locks of shared orders in the same order and wait instead of deadlocking.
pub(super) async fn read_orders(
    tx: &mut DbTx,
    backend: Backend,
    ids: &[&str],
) -> Result<HashMap<String, OrderNow>, StoreError> {
    let mut orders = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut sql =
            String::from("SELECT order_id, state, vehicle, store FROM orders WHERE order_id IN ");
        push_rows(&mut sql, backend, 1, chunk.len());
        sql.push_str(" ORDER BY order_id");
        sql.push_str(backend.for_update());
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(*id);
        }
        let rows: Vec<(String, String, Option<String>, String)> =
            query.fetch_all(&mut **tx).await?;
        for (id, state, holder, store) in rows {
            let state = parse_id::<OrderState>("order state", &state)?;
            orders.insert(
                id,
                OrderNow {
                    state,
                    holder,
                    store,
                },
            );
        }
    }
    Ok(orders)
}

/// The events among `keys` recorded before, with what was recorded first under each.
pub(super) async fn recorded_events(
    tx: &mut DbTx,
    backend: Backend,
    keys: &[(&VehicleId, &DeliveryEvent)],
) -> Result<HashMap<EventKey, FirstRecorded>, StoreError> {
    let mut found = HashMap::new();
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let mut sql =
            String::from("SELECT vehicle, seq, ts_ms, order_id, kind FROM delivery_events WHERE ");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(" OR ");
            }
            sql.push_str("(vehicle = ");
            backend.push_placeholder(&mut sql, 3 * i + 1);
            sql.push_str(" AND seq = ");
            backend.push_placeholder(&mut sql, 3 * i + 2);
            sql.push_str(" AND ts_ms = ");
            backend.push_placeholder(&mut sql, 3 * i + 3);
            sql.push(')');
        }
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        for (vehicle, event) in chunk {
            query = query
                .bind(vehicle.as_str())
                .bind(i64::from(event.seq))
                .bind(to_db(event.ts_ms));
        }
        let rows: Vec<(String, i64, i64, String, String)> = query.fetch_all(&mut **tx).await?;
        for (vehicle, seq, ts_ms, order, kind) in rows {
            let seq = u32::try_from(seq).unwrap_or(u32::MAX);
            found.insert((vehicle, seq, from_db(ts_ms)), (order, kind));
        }
    }
    Ok(found)
}

/// Inserts `events`, received at `now`.
///
/// # Errors
/// As any query; [`StoreError::NotRecorded`] if one of them was recorded meanwhile (by another
/// bridge, for an order the group could not lock): the group is then recorded one event per
/// transaction.
pub(super) async fn insert_events(
    tx: &mut DbTx,
    backend: Backend,
    events: &[NewEvent<'_>],
    now: u64,
) -> Result<(), StoreError> {
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "INSERT INTO delivery_events (vehicle, seq, ts_ms, fleet, order_id, kind, lat_e7, \
             lon_e7, flag, received_ms) VALUES ",
        );
        push_rows(&mut sql, backend, chunk.len(), 10);
        sql.push_str(" ON CONFLICT (vehicle, seq, ts_ms) DO NOTHING");
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for new in chunk {
            query = query
                .bind(new.vehicle.as_str())
                .bind(i64::from(new.event.seq))
                .bind(to_db(new.event.ts_ms))
                .bind(new.fleet.as_str())
                .bind(new.event.order.as_str())
                .bind(new.event.kind.as_str())
                .bind(new.event.pos.lat_e7)
                .bind(new.event.pos.lon_e7)
                .bind(new.flag.map(EventFlag::as_str))
                .bind(to_db(now));
        }
        let inserted = query.execute(&mut **tx).await?.rows_affected();
        if inserted != chunk.len() as u64 {
            return Err(StoreError::NotRecorded(
                "an event of the group was recorded meanwhile",
            ));
        }
    }
    Ok(())
}

/// Moves the orders in `moved` to their new state, at `now`.
pub(super) async fn update_orders(
    tx: &mut DbTx,
    backend: Backend,
    moved: &[(&str, OrderState)],
    now: u64,
) -> Result<(), StoreError> {
    for chunk in moved.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from("UPDATE orders SET state = CASE order_id");
        let mut n = 0;
        let mut next = |sql: &mut String| {
            n += 1;
            backend.push_placeholder(sql, n);
        };
        for _ in chunk {
            sql.push_str(" WHEN ");
            next(&mut sql);
            sql.push_str(" THEN ");
            next(&mut sql);
        }
        sql.push_str(" END, updated_ms = ");
        next(&mut sql);
        sql.push_str(" WHERE order_id IN (");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            next(&mut sql);
        }
        sql.push(')');
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (order, state) in chunk {
            query = query.bind(*order).bind(state.as_str());
        }
        query = query.bind(to_db(now));
        for (order, _) in chunk {
            query = query.bind(*order);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Queues `messages` (recipient and payload), created at `now`; returns their ids, in order.
pub(super) async fn insert_messages(
    tx: &mut DbTx,
    backend: Backend,
    messages: &[(&ClientId, &str)],
    now: u64,
) -> Result<Vec<MessageId>, StoreError> {
    let mut ids = Vec::with_capacity(messages.len());
    for chunk in messages.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from("INSERT INTO queue (client, payload, created_ms) VALUES ");
        push_rows(&mut sql, backend, chunk.len(), 3);
        sql.push_str(" RETURNING id");
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql));
        for (client, payload) in chunk {
            query = query.bind(client.as_str()).bind(*payload).bind(to_db(now));
        }
        let mut chunk_ids: Vec<i64> = query.fetch_all(&mut **tx).await?;
        if chunk_ids.len() != chunk.len() {
            return Err(StoreError::NotRecorded("a queued message has no id"));
        }
        // The ids are given in the order of the rows; RETURNING need not list them so.
        chunk_ids.sort_unstable();
        ids.extend(chunk_ids.into_iter().map(|id| MessageId(from_db(id))));
    }
    Ok(ids)
}
