//! The statements of a group's transaction: the group's orders read (and locked, on
//! PostgreSQL) at once, its events looked up at once, then inserted, its orders moved on and
//! its messages queued, each in one statement (or a few, for large groups) rather than one per
//! event. The judging between them is `domain::order::judge`, in memory, event after event in
//! arrival order, exactly as one transaction per event would apply it (see `group::record`).
//!
//! On SQLite (in-process: a statement costs no round trip) each step is its own statement,
//! generated for the group's size. On PostgreSQL, where each statement is a round trip to the
//! server and each new SQL text a new prepared statement (one per group size would overflow
//! sqlx's statement cache), the reads are one statement and the writes one data-modifying
//! `WITH` ([`read`], [`write`]), each of a fixed text: the group's rows are bound as one JSON
//! array per table, which the server unpacks (`json_to_recordset`). A group's transaction is
//! then four round trips (`BEGIN`, read, write, `COMMIT`) instead of seven or more.
//!
//! SQLite's writes are `OR FAIL`: a multi-row statement that may abort half-way (a `CHECK`, a
//! `NOT NULL`, a unique index) otherwise keeps a statement journal, a copy of every page it
//! changes (spilled to a temporary file past 64 KiB), so that it can undo its own rows and let
//! the transaction go on. Here no transaction goes on after a failed statement: any error rolls
//! the whole group back (`group::record`'s callers), so the journal only cost writes (a third of
//! the write statements' time in `eventbench`, bench/HISTORY.md).

use std::collections::HashMap;

use serde_json::json;
use shared::{DeliveryEvent, FleetId, VehicleId};
use sqlx::Row as _;

use super::super::backend::{Backend, from_db, parse_id, to_db};
use super::super::error::StoreError;
use super::super::ids::{ClientId, MessageId};
use super::super::order_row::{OrderView, order_fields, order_with_id};
use super::super::pool::DbConn;
use crate::domain::order::{EventFlag, OrderState};

/// Why [`write`] refuses a group one of whose events another transaction recorded after the
/// group's read looked it up ([`StoreError::NotRecorded`]). On PostgreSQL the read's lookup
/// sees the snapshot of its statement's start, even when its lock on the order waited for
/// that other transaction: a transaction begun after it sees the event, as a duplicate.
pub(super) const RECORDED_MEANWHILE: &str = "an event of the group was recorded meanwhile";

/// The most rows one generated statement takes (well under both backends' limits on bound
/// values).
const ROWS_PER_STATEMENT: usize = 256;

/// An event's dedupe key as its row gives it.
fn event_key(vehicle: String, seq: i64, ts_ms: i64) -> EventKey {
    (
        vehicle,
        u32::try_from(seq).unwrap_or(u32::MAX),
        from_db(ts_ms),
    )
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

/// What a group's transaction reads before it judges its events: its orders, by id, and
/// which of its events were recorded before.
pub(super) type GroupReads = (HashMap<String, OrderView>, HashMap<EventKey, FirstRecorded>);

/// Reads the orders `ids` (sorted, distinct), locking them in that order on PostgreSQL (see
/// [`read_orders`]), and looks up the events `keys` (see [`recorded_events`]).
pub(super) async fn read(
    tx: &mut DbConn,
    backend: Backend,
    ids: &[&str],
    keys: &[(&VehicleId, &DeliveryEvent)],
) -> Result<GroupReads, StoreError> {
    match backend {
        Backend::Sqlite => Ok((
            read_orders(tx, backend, ids).await?,
            recorded_events(tx, backend, keys).await?,
        )),
        Backend::Postgres => read_postgres(tx, ids, keys).await,
    }
}

/// PostgreSQL's [`read`], in one statement of a fixed text: the orders (id, then the columns
/// of `order_fields`) locked in the order of their ids (`ORDER BY` comes before `FOR
/// UPDATE`'s locks), then the recorded events (vehicle, seq, timestamp, order, kind, after
/// the orders' twelve columns left empty), each looked up by the dedupe index (`LIMIT 1`
/// keeps the lookup a nested loop whatever the planner estimates of the JSON rows).
const READ_POSTGRES: &str = concat!(
    "WITH o AS (SELECT order_id, ",
    order_fields!(),
    " FROM orders WHERE order_id = ANY (ARRAY(SELECT json_array_elements_text($1::json)))
    ORDER BY order_id FOR UPDATE)
SELECT order_id, ",
    order_fields!(),
    ", NULL::text, NULL::bigint, NULL::bigint, NULL::text, NULL::text FROM o
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       e.vehicle, e.seq, e.ts_ms, e.order_id, e.kind
FROM json_to_recordset($2::json) AS k (vehicle text, seq bigint, ts_ms bigint),
LATERAL (
    SELECT vehicle, seq, ts_ms, order_id, kind FROM delivery_events AS d
    WHERE d.vehicle = k.vehicle AND d.seq = k.seq AND d.ts_ms = k.ts_ms
    LIMIT 1
) AS e"
);

/// A recorded event's columns of a [`READ_POSTGRES`] row: vehicle, seq, timestamp, order,
/// kind (all empty in an order's row).
type RecordedRow = (
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// The column of a [`READ_POSTGRES`] row where a recorded event's columns start.
const EVENT_COLUMNS: usize = 12;

/// See [`READ_POSTGRES`].
async fn read_postgres(
    tx: &mut DbConn,
    ids: &[&str],
    keys: &[(&VehicleId, &DeliveryEvent)],
) -> Result<GroupReads, StoreError> {
    let keys: Vec<_> = keys
        .iter()
        .map(|(vehicle, event)| {
            json!({"vehicle": vehicle.as_str(), "seq": event.seq, "ts_ms": to_db(event.ts_ms)})
        })
        .collect();
    let rows = sqlx::query(READ_POSTGRES)
        .bind(json!(ids).to_string())
        .bind(serde_json::Value::from(keys).to_string())
        .fetch_all(&mut *tx)
        .await?;
    let mut orders = HashMap::with_capacity(ids.len());
    let mut found = HashMap::new();
    for row in rows {
        if row.try_get::<Option<String>, _>(0)?.is_some() {
            let (id, order) = order_with_id(&row)?;
            orders.insert(id, order);
            continue;
        }
        let e = EVENT_COLUMNS;
        let event: RecordedRow = (
            row.try_get(e)?,
            row.try_get(e + 1)?,
            row.try_get(e + 2)?,
            row.try_get(e + 3)?,
            row.try_get(e + 4)?,
        );
        let (Some(vehicle), Some(seq), Some(ts_ms), Some(order), Some(kind)) = event else {
            return Err(StoreError::Corrupt(
                "a row of the group's read is empty".into(),
            ));
        };
        found.insert(event_key(vehicle, seq, ts_ms), (order, kind));
    }
    Ok((orders, found))
}

/// Inserts `events` (see [`insert_events`]), moves the orders in `moved` to their new state
/// (see [`update_orders`]) and queues `messages` (see [`insert_messages`]), all at `now`;
/// returns the messages' ids, in order.
///
/// # Errors
/// As any query; [`StoreError::NotRecorded`] if one of the events was recorded meanwhile.
pub(super) async fn write(
    tx: &mut DbConn,
    backend: Backend,
    events: &[NewEvent<'_>],
    moved: &[(&str, OrderState)],
    messages: &[(&ClientId, &str)],
    now: u64,
) -> Result<Vec<MessageId>, StoreError> {
    match backend {
        Backend::Sqlite => {
            insert_events(tx, backend, events, now).await?;
            update_orders(tx, backend, moved, now).await?;
            insert_messages(tx, backend, messages, now).await
        }
        // Only duplicates: nothing to write.
        Backend::Postgres if events.is_empty() && moved.is_empty() && messages.is_empty() => {
            Ok(Vec::new())
        }
        Backend::Postgres => write_postgres(tx, events, moved, messages, now).await,
    }
}

/// PostgreSQL's [`write`], in one statement of a fixed text. Its parts see the same snapshot
/// and touch different tables. The orders to move are found by their index (`= ANY`), not by
/// a join the planner might make a scan of the table. It returns how many events were inserted and the queued
/// messages' ids, ascending: one `INSERT` allocates them in the order of its rows, which is
/// the messages' order (`WITH ORDINALITY ... ORDER BY`).
const WRITE_POSTGRES: &str = "\
WITH e AS (
    INSERT INTO delivery_events
        (vehicle, seq, ts_ms, fleet, order_id, kind, lat_e7, lon_e7, flag, received_ms)
    SELECT vehicle, seq, ts_ms, fleet, order_id, kind, lat_e7, lon_e7, flag, $4
    FROM json_to_recordset($1::json) AS r (vehicle text, seq bigint, ts_ms bigint,
        fleet text, order_id text, kind text, lat_e7 integer, lon_e7 integer, flag text)
    ON CONFLICT (vehicle, seq, ts_ms) DO NOTHING
    RETURNING 1
), u AS (
    UPDATE orders SET state = m.state, updated_ms = $4
    FROM json_to_recordset($2::json) AS m (order_id text, state text)
    WHERE orders.order_id = m.order_id
        AND orders.order_id = ANY (ARRAY(
            SELECT order_id FROM json_to_recordset($2::json) AS i (order_id text)))
    RETURNING 1
), q AS (
    INSERT INTO queue (client, payload, created_ms)
    SELECT m ->> 'client', m ->> 'payload', $4
    FROM json_array_elements($3::json) WITH ORDINALITY AS r (m, n)
    ORDER BY n
    RETURNING id
)
SELECT (SELECT count(*) FROM e), (SELECT string_agg(id::text, ',' ORDER BY id) FROM q)";

/// See [`WRITE_POSTGRES`].
async fn write_postgres(
    tx: &mut DbConn,
    events: &[NewEvent<'_>],
    moved: &[(&str, OrderState)],
    messages: &[(&ClientId, &str)],
    now: u64,
) -> Result<Vec<MessageId>, StoreError> {
    let events: Vec<_> = events
        .iter()
        .map(|new| {
            json!({
                "vehicle": new.vehicle.as_str(),
                "seq": new.event.seq,
                "ts_ms": to_db(new.event.ts_ms),
                "fleet": new.fleet.as_str(),
                "order_id": new.event.order.as_str(),
                "kind": new.event.kind.as_str(),
                "lat_e7": new.event.pos.lat_e7,
                "lon_e7": new.event.pos.lon_e7,
                "flag": new.flag.map(EventFlag::as_str),
            })
        })
        .collect();
    let count = events.len();
    let moved: Vec<_> = moved
        .iter()
        .map(|(order, state)| json!({"order_id": order, "state": state.as_str()}))
        .collect();
    let queued: Vec<_> = messages
        .iter()
        .map(|(client, payload)| json!({"client": client.as_str(), "payload": payload}))
        .collect();
    let (inserted, ids): (i64, Option<String>) = sqlx::query_as(WRITE_POSTGRES)
        .bind(serde_json::Value::from(events).to_string())
        .bind(serde_json::Value::from(moved).to_string())
        .bind(serde_json::Value::from(queued).to_string())
        .bind(to_db(now))
        .fetch_one(&mut *tx)
        .await?;
    if inserted != count as i64 {
        return Err(StoreError::NotRecorded(RECORDED_MEANWHILE));
    }
    let ids = ids
        .iter()
        .flat_map(|ids| ids.split(','))
        .map(|id| parse_id::<u64>("queue id", id).map(MessageId))
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() != messages.len() {
        return Err(StoreError::NotRecorded("a queued message has no id"));
    }
    Ok(ids)
}

/// Reads the orders `ids` (sorted, distinct), locking them in that order on PostgreSQL: two
/// bridges take the locks of shared orders in the same order and wait instead of deadlocking.
async fn read_orders(
    tx: &mut DbConn,
    backend: Backend,
    ids: &[&str],
) -> Result<HashMap<String, OrderView>, StoreError> {
    let mut orders = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(concat!(
            "SELECT order_id, ",
            order_fields!(),
            " FROM orders WHERE order_id IN "
        ));
        backend.push_rows(&mut sql, 1, chunk.len());
        sql.push_str(" ORDER BY order_id");
        sql.push_str(backend.for_update());
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut *tx).await? {
            let (id, order) = order_with_id(&row)?;
            orders.insert(id, order);
        }
    }
    Ok(orders)
}

/// The events among `keys` recorded before, with what was recorded first under each.
async fn recorded_events(
    tx: &mut DbConn,
    backend: Backend,
    keys: &[(&VehicleId, &DeliveryEvent)],
) -> Result<HashMap<EventKey, FirstRecorded>, StoreError> {
    let mut found = HashMap::new();
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let mut sql =
            String::from("SELECT vehicle, seq, ts_ms, order_id, kind FROM delivery_events WHERE ");
        backend.push_any_of(&mut sql, chunk.len(), &["vehicle", "seq", "ts_ms"]);
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        for (vehicle, event) in chunk {
            query = query
                .bind(vehicle.as_str())
                .bind(i64::from(event.seq))
                .bind(to_db(event.ts_ms));
        }
        let rows: Vec<(String, i64, i64, String, String)> = query.fetch_all(&mut *tx).await?;
        for (vehicle, seq, ts_ms, order, kind) in rows {
            found.insert(event_key(vehicle, seq, ts_ms), (order, kind));
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
async fn insert_events(
    tx: &mut DbConn,
    backend: Backend,
    events: &[NewEvent<'_>],
    now: u64,
) -> Result<(), StoreError> {
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "INSERT OR FAIL INTO delivery_events (vehicle, seq, ts_ms, fleet, order_id, kind, \
             lat_e7, lon_e7, flag, received_ms) VALUES ",
        );
        backend.push_rows(&mut sql, chunk.len(), 10);
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
        let inserted = query.execute(&mut *tx).await?.rows_affected();
        if inserted != chunk.len() as u64 {
            return Err(StoreError::NotRecorded(RECORDED_MEANWHILE));
        }
    }
    Ok(())
}

/// Moves the orders in `moved` to their new state, at `now`.
async fn update_orders(
    tx: &mut DbConn,
    backend: Backend,
    moved: &[(&str, OrderState)],
    now: u64,
) -> Result<(), StoreError> {
    for chunk in moved.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from("UPDATE OR FAIL orders SET state = CASE order_id");
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
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Queues `messages` (recipient and payload), created at `now`; returns their ids, in order.
async fn insert_messages(
    tx: &mut DbConn,
    backend: Backend,
    messages: &[(&ClientId, &str)],
    now: u64,
) -> Result<Vec<MessageId>, StoreError> {
    let mut ids = Vec::with_capacity(messages.len());
    for chunk in messages.chunks(ROWS_PER_STATEMENT) {
        let mut sql =
            String::from("INSERT OR FAIL INTO queue (client, payload, created_ms) VALUES ");
        backend.push_rows(&mut sql, chunk.len(), 3);
        sql.push_str(match backend {
            // One row back instead of one per message: each row is a hand-over from sqlx's
            // SQLite thread. The rows of one INSERT get consecutive ids under the write lock
            // (`AUTOINCREMENT`: one more than the largest ever; at the largest possible id
            // the INSERT fails), so the last one names them all. (sqlx's `Any` does not pass
            // SQLite's last row id on.)
            Backend::Sqlite => "; SELECT last_insert_rowid()",
            Backend::Postgres => " RETURNING id",
        });
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql));
        for (client, payload) in chunk {
            query = query.bind(client.as_str()).bind(*payload).bind(to_db(now));
        }
        let mut chunk_ids: Vec<i64> = query.fetch_all(&mut *tx).await?;
        if backend == Backend::Sqlite
            && let [last] = chunk_ids[..]
        {
            let first = last - (chunk.len() as i64 - 1);
            chunk_ids = (first..=last).collect();
        }
        if chunk_ids.len() != chunk.len() || chunk_ids.first().is_none_or(|first| *first < 1) {
            return Err(StoreError::NotRecorded("a queued message has no id"));
        }
        // The ids are given in the order of the rows; RETURNING need not list them so.
        chunk_ids.sort_unstable();
        ids.extend(chunk_ids.into_iter().map(|id| MessageId(from_db(id))));
    }
    Ok(ids)
}
