//! The heartbeat history: every heartbeat, written in batches, read back as a vehicle's track.

use std::sync::LazyLock;

use shared::{FleetId, Heartbeat, Position, VehicleId};

use super::database::{Backend, Db, DbTx, Store, from_db, narrow, parse_id, to_db};
use super::error::StoreError;

/// One stored heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRow {
    /// The vehicle.
    pub vehicle: VehicleId,
    /// Its fleet.
    pub fleet: FleetId,
    /// The heartbeat's sequence number.
    pub seq: u32,
    /// Device clock, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Latitude, 1e-7 degrees.
    pub lat_e7: i32,
    /// Longitude, 1e-7 degrees.
    pub lon_e7: i32,
    /// Ground speed, cm/s.
    pub speed_cm_s: u16,
    /// Heading, degrees clockwise from north.
    pub heading_deg: u16,
    /// Battery charge, %.
    pub battery_pct: u8,
    /// Status flags (see `docs/protocol.md`).
    pub flags: u8,
    /// When the bridge received it, ms since the Unix epoch (bridge clock).
    pub received_ms: u64,
}

impl HeartbeatRow {
    /// The row for heartbeat `hb` of `vehicle` in `fleet`, received at `received_ms`.
    pub fn new(fleet: FleetId, vehicle: VehicleId, hb: &Heartbeat, received_ms: u64) -> Self {
        Self {
            vehicle,
            fleet,
            seq: hb.seq,
            ts_ms: hb.ts_ms,
            lat_e7: hb.pos.lat_e7,
            lon_e7: hb.pos.lon_e7,
            speed_cm_s: hb.speed_cm_s,
            heading_deg: hb.heading_deg,
            battery_pct: hb.battery_pct,
            flags: hb.flags.0,
            received_ms,
        }
    }

    /// Where the vehicle was.
    pub(crate) fn position(&self) -> Position {
        Position::new(self.lat_e7, self.lon_e7)
    }
}

const COLUMNS: &str = "vehicle, fleet, seq, ts_ms, lat_e7, lon_e7, speed_cm_s, heading_deg, \
                       battery_pct, flags, received_ms";
const COLUMN_COUNT: usize = 11;

/// Rows per multi-row `INSERT`: large enough that a statement's overhead is spread thin, small
/// enough to stay far below SQLite's limit of bound parameters (32766).
const CHUNK: usize = 256;

/// `INSERT INTO heartbeats (...) VALUES (?, ..., ?), (?, ...), ...` for `rows` rows (`$1`,
/// `$2`, ... on PostgreSQL, see [`Backend::push_placeholder`]).
fn insert_sql(backend: Backend, rows: usize) -> String {
    let mut sql = format!("INSERT INTO heartbeats ({COLUMNS}) VALUES ");
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for col in 0..COLUMN_COUNT {
            if col > 0 {
                sql.push_str(", ");
            }
            backend.push_placeholder(&mut sql, row * COLUMN_COUNT + col + 1);
        }
        sql.push(')');
    }
    sql
}

/// The statements for a full chunk, built once so that each is prepared once per connection.
static INSERT_CHUNK_SQLITE: LazyLock<String> = LazyLock::new(|| insert_sql(Backend::Sqlite, CHUNK));
static INSERT_CHUNK_POSTGRES: LazyLock<String> =
    LazyLock::new(|| insert_sql(Backend::Postgres, CHUNK));

type Row = (String, String, i64, i64, i32, i32, i32, i32, i16, i16, i64);

fn bind_rows<'q>(
    mut query: sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments>,
    rows: &'q [HeartbeatRow],
) -> sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments> {
    for row in rows {
        query = query
            .bind(row.vehicle.as_str())
            .bind(row.fleet.as_str())
            .bind(i64::from(row.seq))
            .bind(to_db(row.ts_ms))
            .bind(row.lat_e7)
            .bind(row.lon_e7)
            .bind(i32::from(row.speed_cm_s))
            .bind(i32::from(row.heading_deg))
            .bind(i16::from(row.battery_pct))
            .bind(i16::from(row.flags))
            .bind(to_db(row.received_ms));
    }
    query
}

async fn insert_chunk(
    backend: Backend,
    tx: &mut DbTx,
    rows: &[HeartbeatRow],
) -> Result<(), StoreError> {
    let query = if rows.len() == CHUNK {
        sqlx::query(match backend {
            Backend::Sqlite => INSERT_CHUNK_SQLITE.as_str(),
            Backend::Postgres => INSERT_CHUNK_POSTGRES.as_str(),
        })
    } else {
        // A one-off size: not worth a slot in the statement cache.
        sqlx::query(sqlx::AssertSqlSafe(insert_sql(backend, rows.len()))).persistent(false)
    };
    bind_rows(query, rows).execute(&mut **tx).await?;
    Ok(())
}

impl Store {
    /// Stores `rows` in one transaction (multi-row inserts): all of them or, on error, none.
    ///
    /// # Errors
    /// [`StoreError::Database`] if they could not be committed.
    pub async fn record_heartbeats(&self, rows: &[HeartbeatRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for chunk in rows.chunks(CHUNK) {
            insert_chunk(self.backend, &mut tx, chunk).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// `vehicle`'s heartbeats with `from_ms <= ts_ms <= to_ms` (device clock), by time, at
    /// most `limit` of them (the earliest).
    ///
    /// # Errors
    /// [`StoreError::Database`] if the query fails, [`StoreError::Corrupt`] if a stored value
    /// cannot be read back.
    pub(crate) async fn track(
        &self,
        vehicle: &VehicleId,
        from_ms: u64,
        to_ms: u64,
        limit: u32,
    ) -> Result<Vec<HeartbeatRow>, StoreError> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT vehicle, fleet, seq, ts_ms, lat_e7, lon_e7, speed_cm_s, heading_deg, \
             battery_pct, flags, received_ms FROM heartbeats \
             WHERE vehicle = $1 AND ts_ms >= $2 AND ts_ms <= $3 \
             ORDER BY ts_ms, id LIMIT $4",
        )
        .bind(vehicle.as_str())
        .bind(to_db(from_ms))
        .bind(to_db(to_ms))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|row| {
                let (
                    vehicle,
                    fleet,
                    seq,
                    ts_ms,
                    lat_e7,
                    lon_e7,
                    speed,
                    heading,
                    battery,
                    flags,
                    received,
                ) = row;
                Ok(HeartbeatRow {
                    vehicle: parse_id("heartbeat vehicle", &vehicle)?,
                    fleet: parse_id("heartbeat fleet", &fleet)?,
                    seq: narrow("heartbeat seq", seq)?,
                    ts_ms: from_db(ts_ms),
                    lat_e7,
                    lon_e7,
                    speed_cm_s: narrow("heartbeat speed", i64::from(speed))?,
                    heading_deg: narrow("heartbeat heading", i64::from(heading))?,
                    battery_pct: narrow("heartbeat battery", i64::from(battery))?,
                    flags: narrow("heartbeat flags", i64::from(flags))?,
                    received_ms: from_db(received),
                })
            })
            .collect()
    }

    /// Removes the heartbeats with `ts_ms < older_than_ms` (device clock) and returns how
    /// many. Deletes in chunks of a few thousand rows, each its own transaction, so that event
    /// commits are not held up behind one long delete.
    ///
    /// # Errors
    /// [`StoreError::Database`] if a chunk could not be committed (the chunks before it are).
    pub(crate) async fn expire_heartbeats(&self, older_than_ms: u64) -> Result<u64, StoreError> {
        const DELETE_CHUNK: i64 = 5_000;
        let mut total = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM heartbeats WHERE id IN \
                 (SELECT id FROM heartbeats WHERE ts_ms < $1 ORDER BY ts_ms LIMIT $2)",
            )
            .bind(to_db(older_than_ms))
            .bind(DELETE_CHUNK)
            .execute(&self.write)
            .await?;
            total += done.rows_affected();
            if done.rows_affected() < DELETE_CHUNK.unsigned_abs() {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use shared::StatusFlags;

    use super::*;
    use crate::store::testing::on_each_backend;

    fn row(vehicle: &str, seq: u32, ts_ms: u64) -> HeartbeatRow {
        let hb = Heartbeat {
            seq,
            ts_ms,
            pos: Position::new(
                525_000_000 + i32::try_from(seq).expect("small"),
                -134_000_000,
            ),
            speed_cm_s: 1_250,
            heading_deg: 359,
            battery_pct: 100,
            flags: StatusFlags(StatusFlags::MOVING | StatusFlags::GPS_FIX),
        };
        HeartbeatRow::new(
            "demo".parse().expect("fleet"),
            vehicle.parse().expect("vehicle"),
            &hb,
            ts_ms + 5,
        )
    }

    #[test]
    fn builds_one_placeholder_per_value() {
        let row = format!("({})", ["?"; COLUMN_COUNT].join(", "));
        assert_eq!(
            insert_sql(Backend::Sqlite, 2),
            format!("INSERT INTO heartbeats ({COLUMNS}) VALUES {row}, {row}")
        );
        let numbered = |from: usize| {
            let values: Vec<String> = (from..from + COLUMN_COUNT)
                .map(|n| format!("${n}"))
                .collect();
            format!("({})", values.join(", "))
        };
        assert_eq!(
            insert_sql(Backend::Postgres, 2),
            format!(
                "INSERT INTO heartbeats ({COLUMNS}) VALUES {}, {}",
                numbered(1),
                numbered(1 + COLUMN_COUNT)
            )
        );
    }

    on_each_backend! {
        async fn batches_are_stored_and_tracked_in_time_order(store) {
            // 600 rows: two full chunks and a remainder; received out of time order.
            let mut rows: Vec<HeartbeatRow> = (0..300u32)
                .rev()
                .map(|i| row("v-1", i, 1_000 + u64::from(i) * 10))
                .collect();
            rows.extend((0..300u32).map(|i| row("v-2", i, 1_000 + u64::from(i) * 10)));
            store.record_heartbeats(&rows).await.expect("stores");
            store
                .record_heartbeats(&[])
                .await
                .expect("nothing to store");

            let vehicle = "v-1".parse().expect("vehicle");
            let track = store
                .track(&vehicle, 0, u64::MAX, 10_000)
                .await
                .expect("track");
            assert_eq!(track.len(), 300);
            assert!(track.windows(2).all(|w| w[0].ts_ms < w[1].ts_ms), "by time");
            assert!(track.iter().all(|r| r.vehicle == vehicle));
            assert_eq!(track[0], row("v-1", 0, 1_000), "every field round-trips");

            // The window is inclusive at both ends; the limit keeps the earliest.
            let window = store
                .track(&vehicle, 1_100, 1_200, 10_000)
                .await
                .expect("track");
            assert_eq!(
                window.iter().map(|r| r.seq).collect::<Vec<_>>(),
                (10..=20).collect::<Vec<_>>()
            );
            let limited = store.track(&vehicle, 1_100, 1_200, 3).await.expect("track");
            assert_eq!(
                limited.iter().map(|r| r.seq).collect::<Vec<_>>(),
                [10, 11, 12]
            );
            assert!(
                store
                    .track(&"v-3".parse().expect("vehicle"), 0, u64::MAX, 10)
                    .await
                    .expect("track")
                    .is_empty()
            );

            // Retention by device time, for every vehicle.
            assert_eq!(store.expire_heartbeats(1_050).await.expect("expires"), 10);
            let track = store
                .track(&vehicle, 0, u64::MAX, 10_000)
                .await
                .expect("track");
            assert_eq!(track.first().map(|r| r.ts_ms), Some(1_050));
            assert_eq!(
                store.expire_heartbeats(u64::MAX).await.expect("expires"),
                590
            );
        }
    }

    on_each_backend! {
        async fn big_expiry_runs_in_chunks(store) {
            let rows: Vec<HeartbeatRow> = (0..12_000u32)
                .map(|i| row("v-1", i, u64::from(i)))
                .collect();
            store.record_heartbeats(&rows).await.expect("stores");
            assert_eq!(
                store.expire_heartbeats(11_000).await.expect("expires"),
                11_000
            );
            assert_eq!(
                store
                    .track(&"v-1".parse().expect("vehicle"), 0, u64::MAX, 100_000)
                    .await
                    .expect("track")
                    .len(),
                1_000
            );
        }
    }
}
