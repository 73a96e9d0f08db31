//! The heartbeat history: every heartbeat, written in batches, read back as a vehicle's track,
//! and that track exported as GPX 1.1 ([`HeartbeatRow::gpx`]) or CSV ([`HeartbeatRow::csv`])
//! for other tools.
//!
//! A row names its vehicle and fleet by their track's number (`store::track_keys`): the
//! writer binds only integers, and a vehicle's track is read by that number.

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

const COLUMNS: &str = "track, seq, ts_ms, lat_e7, lon_e7, speed_cm_s, heading_deg, \
                       battery_pct, flags, received_ms";
const COLUMN_COUNT: usize = 10;

/// Rows per multi-row `INSERT` at most: large enough that a statement's overhead is spread
/// thin, small enough to stay far below SQLite's limit of bound parameters (32766). A power of
/// two (see [`pieces`]).
const CHUNK: usize = 256;

/// `INSERT INTO heartbeats (...) VALUES (?, ..., ?), (?, ...), ...` for `rows` rows (`$1`,
/// `$2`, ... on PostgreSQL, see [`Backend::push_placeholder`]).
///
/// `OR FAIL` on SQLite: a multi-row `INSERT` that may abort half-way otherwise keeps a
/// statement journal (a copy of every page it changes) to undo its own rows and let the
/// transaction go on; here any error rolls the whole batch back (as in
/// `group::statements`), so the journal only cost page writes.
fn insert_sql(backend: Backend, rows: usize) -> String {
    let verb = match backend {
        Backend::Sqlite => "INSERT OR FAIL",
        Backend::Postgres => "INSERT",
    };
    let mut sql = format!("{verb} INTO heartbeats ({COLUMNS}) VALUES ");
    backend.push_rows(&mut sql, rows, COLUMN_COUNT);
    sql
}

/// The statements for every piece size, 1, 2, 4, ... [`CHUNK`] rows (index: the size's
/// log2), built once: each is prepared once per connection and then found in its statement
/// cache, whatever the size of the batch.
static INSERTS_SQLITE: LazyLock<Vec<String>> = LazyLock::new(|| inserts(Backend::Sqlite));
static INSERTS_POSTGRES: LazyLock<Vec<String>> = LazyLock::new(|| inserts(Backend::Postgres));

fn inserts(backend: Backend) -> Vec<String> {
    (0..=CHUNK.ilog2())
        .map(|log2| insert_sql(backend, 1 << log2))
        .collect()
}

/// `rows` cut, in order, into pieces of [`CHUNK`] rows and then of the powers of two that
/// make up the rest, largest first (300 rows: 256, 32, 8 and 4): every piece has a statement
/// of its own size that stays prepared, where one statement for the rest (a new size nearly
/// every batch) would be parsed and planned for each batch and dropped.
fn pieces<T>(rows: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        let len = rest.len();
        if len == 0 {
            return None;
        }
        let (piece, tail) = rest.split_at(CHUNK.min(1 << len.ilog2()));
        rest = tail;
        Some(piece)
    })
}

/// A stored heartbeat as [`Store::track`] reads it: id, then the columns after `track` in
/// [`COLUMNS`].
type Row = (i64, i64, i64, i32, i32, i32, i32, i16, i16, i64);

/// Binds `rows`, each with its track's number (`tracks`, in the same order).
fn bind_rows<'q>(
    mut query: sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments>,
    rows: &[&'q HeartbeatRow],
    tracks: &[i64],
) -> sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments> {
    for (row, track) in rows.iter().zip(tracks) {
        query = query
            .bind(*track)
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

/// Inserts one piece (see [`pieces`]: its length is a power of two, at most [`CHUNK`]), each
/// row with its track's number (`tracks`, in the same order).
async fn insert_piece(
    backend: Backend,
    tx: &mut DbTx,
    rows: &[&HeartbeatRow],
    tracks: &[i64],
) -> Result<(), StoreError> {
    debug_assert!(
        rows.len().is_power_of_two() && rows.len() <= CHUNK,
        "a piece"
    );
    let statements = match backend {
        Backend::Sqlite => &INSERTS_SQLITE,
        Backend::Postgres => &INSERTS_POSTGRES,
    };
    let sql = statements[rows.len().ilog2() as usize].as_str();
    bind_rows(sqlx::query(sql), rows, tracks)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The order heartbeats are written in: by vehicle (sort stably, to keep each vehicle's own).
pub(crate) fn by_vehicle_id(a: &HeartbeatRow, b: &HeartbeatRow) -> std::cmp::Ordering {
    a.vehicle.as_str().cmp(b.vehicle.as_str())
}

impl Store {
    /// Stores `rows` in one transaction (multi-row inserts): all of them or, on error, none.
    ///
    /// The rows go in vehicle by vehicle (each vehicle's in the order given): what a batch
    /// costs is mostly the track index's page of each vehicle in it, which a vehicle's rows
    /// then change one after the other, instead of in turns with every other vehicle's (when a
    /// batch holds several heartbeats of a vehicle: one that reports faster than the writer
    /// commits, or a catch-up), each turn after the page may have left SQLite's cache.
    ///
    /// # Errors
    /// [`StoreError::Database`] if they could not be committed.
    pub async fn record_heartbeats(&self, rows: &[HeartbeatRow]) -> Result<(), StoreError> {
        // Stable: a vehicle's rows keep their order, and with it their ids' (the track's order
        // for equal times).
        let mut by_vehicle: Vec<&HeartbeatRow> = rows.iter().collect();
        by_vehicle.sort_by(|a, b| by_vehicle_id(a, b));
        self.record_sorted_heartbeats(&by_vehicle).await
    }

    /// [`Store::record_heartbeats`] for rows already in [`by_vehicle_id`] order (stably), held
    /// elsewhere: the history writer's batch, in slices.
    ///
    /// # Errors
    /// [`StoreError::Database`] if they could not be committed.
    pub(crate) async fn record_sorted_heartbeats(
        &self,
        by_vehicle: &[&HeartbeatRow],
    ) -> Result<(), StoreError> {
        debug_assert!(
            by_vehicle.is_sorted_by(|a, b| by_vehicle_id(a, b).is_le()),
            "heartbeats in vehicle order"
        );
        if by_vehicle.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(&VehicleId, &FleetId)> =
            by_vehicle.iter().map(|r| (&r.vehicle, &r.fleet)).collect();
        let tracks = self.tracks.of(&self.write, self.backend, &pairs).await?;
        let mut tx = self.begin_write().await?;
        let mut rest = tracks.as_slice();
        for piece in pieces(by_vehicle) {
            let (numbers, tail) = rest.split_at(piece.len());
            rest = tail;
            insert_piece(self.backend, &mut tx, piece, numbers).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// `vehicle`'s heartbeats with `from_ms <= ts_ms <= to_ms` (device clock), by time (then
    /// by id: the order they were written in), at most `limit` of them (the earliest).
    ///
    /// Each of the vehicle's tracks (nearly always one: a vehicle that changed fleet has one
    /// per fleet) is read by its own index range, already in that order; several are merged.
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
        let tracks: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, fleet FROM tracks WHERE vehicle = $1 ORDER BY fleet")
                .bind(vehicle.as_str())
                .fetch_all(&self.read)
                .await?;
        let mut found: Vec<(i64, HeartbeatRow)> = Vec::new();
        for (track, fleet) in &tracks {
            let fleet: FleetId = parse_id("heartbeat fleet", fleet)?;
            let rows: Vec<Row> = sqlx::query_as(
                "SELECT id, seq, ts_ms, lat_e7, lon_e7, speed_cm_s, heading_deg, battery_pct, \
                 flags, received_ms FROM heartbeats \
                 WHERE track = $1 AND ts_ms >= $2 AND ts_ms <= $3 \
                 ORDER BY ts_ms, id LIMIT $4",
            )
            .bind(*track)
            .bind(to_db(from_ms))
            .bind(to_db(to_ms))
            .bind(i64::from(limit))
            .fetch_all(&self.read)
            .await?;
            for row in rows {
                let (id, seq, ts_ms, lat_e7, lon_e7, speed, heading, battery, flags, received) =
                    row;
                found.push((
                    id,
                    HeartbeatRow {
                        vehicle: vehicle.clone(),
                        fleet: fleet.clone(),
                        seq: narrow("heartbeat seq", seq)?,
                        ts_ms: from_db(ts_ms),
                        lat_e7,
                        lon_e7,
                        speed_cm_s: narrow("heartbeat speed", i64::from(speed))?,
                        heading_deg: narrow("heartbeat heading", i64::from(heading))?,
                        battery_pct: narrow("heartbeat battery", i64::from(battery))?,
                        flags: narrow("heartbeat flags", i64::from(flags))?,
                        received_ms: from_db(received),
                    },
                ));
            }
        }
        if tracks.len() > 1 {
            found.sort_by_key(|(id, row)| (row.ts_ms, *id));
            found.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        }
        Ok(found.into_iter().map(|(_, row)| row).collect())
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

/// `ms` since the Unix epoch as ISO 8601 in UTC with milliseconds: `2026-12-04T05:42:47.123Z`.
fn iso8601_utc(ms: u64) -> String {
    let (days, ms_of_day) = (ms / 86_400_000, ms % 86_400_000);
    // Howard Hinnant's `civil_from_days`, on days counted from 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let (h, m, s, milli) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1_000 % 60,
        ms_of_day % 1_000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// `e7` (1e-7 degrees) as decimal degrees with seven decimals, exactly (no float rounding).
fn degrees_e7(e7: i32) -> String {
    let sign = if e7 < 0 { "-" } else { "" };
    let abs = e7.unsigned_abs();
    format!("{sign}{}.{:07}", abs / 10_000_000, abs % 10_000_000)
}

/// `cm_s` as metres per second with two decimals, exactly.
fn m_s(cm_s: u16) -> String {
    format!("{}.{:02}", cm_s / 100, cm_s % 100)
}

/// `text` with the five XML special characters escaped.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A track for other tools.
impl HeartbeatRow {
    /// The header line of a track exported as CSV ([`HeartbeatRow::csv`]).
    pub(crate) const CSV_HEADER: &str = "ts_ms,time,lat,lon,speed_m_s,heading_deg,battery_pct,seq";

    /// The track `rows` of `vehicle` as a GPX 1.1 document: one `trk` with one `trkseg`, a
    /// `trkpt` per heartbeat with its `<time>` (ISO 8601, UTC); speed, heading, battery and
    /// sequence number in the point's `extensions` (namespace `urn:fleetbeat:gpx:1`), since GPX
    /// 1.1 has no elements for them.
    pub(crate) fn gpx(vehicle: &VehicleId, rows: &[Self]) -> String {
        use std::fmt::Write as _;
        let name = xml_escape(vehicle.as_str());
        let mut out = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <gpx version=\"1.1\" creator=\"Fleetbeat\" \
             xmlns=\"http://www.topografix.com/GPX/1/1\" xmlns:fb=\"urn:fleetbeat:gpx:1\">\n\
             <trk><name>{name}</name><trkseg>\n"
        );
        for r in rows {
            // Writing into a String cannot fail.
            let _ = writeln!(
                out,
                "<trkpt lat=\"{}\" lon=\"{}\"><time>{}</time><extensions>\
                 <fb:speed_m_s>{}</fb:speed_m_s><fb:heading_deg>{}</fb:heading_deg>\
                 <fb:battery_pct>{}</fb:battery_pct><fb:seq>{}</fb:seq></extensions></trkpt>",
                degrees_e7(r.lat_e7),
                degrees_e7(r.lon_e7),
                iso8601_utc(r.ts_ms),
                m_s(r.speed_cm_s),
                r.heading_deg,
                r.battery_pct,
                r.seq,
            );
        }
        out.push_str("</trkseg></trk>\n</gpx>\n");
        out
    }

    /// The track `rows` as CSV: [`HeartbeatRow::CSV_HEADER`], then a line per heartbeat (`\r\n`-free, `\n`
    /// line ends; no field needs quoting).
    pub(crate) fn csv(rows: &[Self]) -> String {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(64 * (rows.len() + 1));
        out.push_str(Self::CSV_HEADER);
        out.push('\n');
        for r in rows {
            // Writing into a String cannot fail.
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{}",
                r.ts_ms,
                iso8601_utc(r.ts_ms),
                degrees_e7(r.lat_e7),
                degrees_e7(r.lon_e7),
                m_s(r.speed_cm_s),
                r.heading_deg,
                r.battery_pct,
                r.seq,
            );
        }
        out
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
            format!("INSERT OR FAIL INTO heartbeats ({COLUMNS}) VALUES {row}, {row}")
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

    #[test]
    fn a_batch_is_cut_into_pieces_of_the_prepared_sizes() {
        for len in [0, 1, 2, 3, 7, 255, 256, 257, 300, 600, 1_000] {
            let rows: Vec<usize> = (0..len).collect();
            let cut: Vec<&[usize]> = pieces(&rows).collect();
            assert_eq!(cut.concat(), rows, "{len}: in order, every row once");
            assert!(
                cut.iter()
                    .all(|p| p.len().is_power_of_two() && p.len() <= CHUNK),
                "{len}: a prepared size each"
            );
            assert!(
                cut.windows(2).all(|w| w[0].len() >= w[1].len()),
                "{len}: largest first"
            );
        }
        assert_eq!(
            pieces(&[0u8; 300]).map(<[u8]>::len).collect::<Vec<_>>(),
            [256, 32, 8, 4]
        );
        // One statement per size, each with its own number of rows.
        let statements = inserts(Backend::Sqlite);
        assert_eq!(statements.len(), 9);
        assert_eq!(statements[3], insert_sql(Backend::Sqlite, 8));
    }

    #[test]
    fn formats_times_as_iso8601_utc() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601_utc(1_796_363_367_123), "2026-12-04T05:49:27.123Z");
        assert_eq!(iso8601_utc(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn exports_gpx_and_csv() {
        let mut rows = vec![
            row("v-1", 1, 1_796_363_367_123),
            row("v-1", 2, 1_796_363_368_000),
        ];
        rows[1].lat_e7 = -5_000_001;
        rows[1].speed_cm_s = 5;
        let csv = HeartbeatRow::csv(&rows);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines,
            [
                HeartbeatRow::CSV_HEADER,
                "1796363367123,2026-12-04T05:49:27.123Z,52.5000001,-13.4000000,12.50,359,100,1",
                "1796363368000,2026-12-04T05:49:28.000Z,-0.5000001,-13.4000000,0.05,359,100,2",
            ]
        );
        let gpx = HeartbeatRow::gpx(&"v-1".parse().expect("vehicle"), &rows);
        assert!(
            gpx.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<gpx version=\"1.1\"")
        );
        assert_eq!(gpx.matches("<trkpt ").count(), 2);
        assert!(gpx.contains(
            "<trkpt lat=\"-0.5000001\" lon=\"-13.4000000\"><time>2026-12-04T05:49:28.000Z</time>"
        ));
        assert!(gpx.ends_with("</trkseg></trk>\n</gpx>\n"));
        assert_eq!(xml_escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
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
        async fn interleaved_vehicles_keep_their_own_order(store) {
            // A batch as the writer takes it at 3 Hz: three rounds of every vehicle, and each
            // vehicle's three heartbeats on one device millisecond (a clock that did not move).
            // Stored vehicle by vehicle, each vehicle's rows must still come back as they came.
            let vehicles: Vec<String> = (0..700).map(|v| format!("v-{v}")).collect();
            let rows: Vec<HeartbeatRow> = (0..3u32)
                .flat_map(|seq| vehicles.iter().map(move |v| row(v, seq, 5_000)))
                .collect();
            store.record_heartbeats(&rows).await.expect("stores");
            for vehicle in [&vehicles[0], &vehicles[10], &vehicles[699]] {
                let id = vehicle.parse().expect("vehicle");
                let track = store.track(&id, 0, u64::MAX, 100).await.expect("track");
                assert_eq!(
                    track.iter().map(|r| r.seq).collect::<Vec<_>>(),
                    [0, 1, 2],
                    "{vehicle}: as they came"
                );
            }
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

    /// `row` with its fleet set to `fleet`.
    fn in_fleet(mut row: HeartbeatRow, fleet: &str) -> HeartbeatRow {
        row.fleet = fleet.parse().expect("fleet");
        row
    }

    on_each_backend! {
        async fn a_vehicle_that_changed_fleet_reads_as_one_track(store) {
            // v-1 reports in two fleets, in turns, two of them on one device millisecond;
            // v-2 in one. Written in two batches, so the second finds its tracks known.
            let first: Vec<HeartbeatRow> = (0..6u32)
                .map(|i| {
                    let fleet = if i % 2 == 0 { "north" } else { "south" };
                    in_fleet(row("v-1", i, 1_000 + u64::from(i / 3) * 10), fleet)
                })
                .chain([in_fleet(row("v-2", 0, 1_000), "north")])
                .collect();
            store.record_heartbeats(&first).await.expect("stores");
            let second = [
                in_fleet(row("v-1", 6, 2_000), "south"),
                in_fleet(row("v-2", 1, 2_000), "north"),
            ];
            store.record_heartbeats(&second).await.expect("stores");

            let vehicle: VehicleId = "v-1".parse().expect("vehicle");
            let track = store
                .track(&vehicle, 0, u64::MAX, 100)
                .await
                .expect("track");
            let mut expected: Vec<HeartbeatRow> = first[..6].to_vec();
            expected.push(second[0].clone());
            assert_eq!(track, expected, "by time, then as written, with each row's fleet");
            let limited = store.track(&vehicle, 0, u64::MAX, 4).await.expect("track");
            assert_eq!(limited, expected[..4], "the limit keeps the earliest of both");
            let v2 = store
                .track(&"v-2".parse().expect("vehicle"), 0, u64::MAX, 100)
                .await
                .expect("track");
            assert_eq!(v2, [first[6].clone(), second[1].clone()]);

            let tracks: Vec<(String, String)> =
                sqlx::query_as("SELECT vehicle, fleet FROM tracks ORDER BY vehicle, fleet")
                    .fetch_all(&store.read)
                    .await
                    .expect("tracks");
            let names = |v: &str, f: &str| (v.to_owned(), f.to_owned());
            assert_eq!(
                tracks,
                [names("v-1", "north"), names("v-1", "south"), names("v-2", "north")],
                "one track per vehicle and fleet, made once"
            );
        }
    }

    /// Two stores on one database (two bridges on one PostgreSQL) make the same new tracks
    /// at once: each track is made once, and both write their heartbeats to it.
    #[tokio::test]
    async fn two_stores_make_a_track_once() {
        let (a, b) = crate::store::testing::two_postgres().await;
        let rows = |from: u32| -> Vec<HeartbeatRow> {
            (0..50u32)
                .map(|v| row(&format!("v-{v}"), from, u64::from(from)))
                .collect()
        };
        let (rows_a, rows_b) = (rows(0), rows(1));
        let (written_a, written_b) =
            tokio::join!(a.record_heartbeats(&rows_a), b.record_heartbeats(&rows_b));
        written_a.expect("a stores");
        written_b.expect("b stores");
        let tracks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tracks")
            .fetch_one(&a.read)
            .await
            .expect("counts");
        assert_eq!(tracks, 50);
        for store in [&a, &b] {
            let track = store
                .track(&"v-7".parse().expect("vehicle"), 0, u64::MAX, 10)
                .await
                .expect("track");
            assert_eq!(track.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1]);
        }
        a.close().await;
        b.close().await;
    }

    /// The schema-7 history (the names on every row) written by `old`, read back after
    /// schema 8: every row, with its vehicle and fleet, in its order; new rows follow it.
    async fn history_survives_schema_8(store: Store) {
        let vehicle: VehicleId = "v-1".parse().expect("vehicle");
        let track = store
            .track(&vehicle, 0, u64::MAX, 100)
            .await
            .expect("track");
        let mut expected = vec![
            in_fleet(row("v-1", 0, 1_000), "north"),
            in_fleet(row("v-1", 1, 1_000), "south"),
            in_fleet(row("v-1", 2, 1_010), "north"),
        ];
        assert_eq!(track, expected);
        store
            .record_heartbeats(&[in_fleet(row("v-1", 3, 1_010), "south")])
            .await
            .expect("stores");
        expected.push(in_fleet(row("v-1", 3, 1_010), "south"));
        let track = store
            .track(&vehicle, 0, u64::MAX, 100)
            .await
            .expect("track");
        assert_eq!(
            track, expected,
            "a new row after the old ones of its millisecond"
        );
        let others = store
            .track(&"v-2".parse().expect("vehicle"), 0, u64::MAX, 100)
            .await
            .expect("track");
        assert_eq!(others, [in_fleet(row("v-2", 0, 1_005), "north")]);
        store.close().await;
    }

    /// The schema-7 rows of [`history_survives_schema_8`], in the order they are inserted.
    const OLD_ROWS: [(&str, &str, u32, i64); 4] = [
        ("v-1", "north", 0, 1_000),
        ("v-2", "north", 0, 1_005),
        ("v-1", "south", 1, 1_000),
        ("v-1", "north", 2, 1_010),
    ];

    /// `INSERT` of one [`OLD_ROWS`] row into the schema-7 `heartbeats`, as [`row`] makes it.
    fn old_insert((vehicle, fleet, seq, ts_ms): (&str, &str, u32, i64)) -> String {
        let lat = 525_000_000 + i64::from(seq);
        format!(
            "INSERT INTO heartbeats (vehicle, fleet, seq, ts_ms, lat_e7, lon_e7, speed_cm_s, \
             heading_deg, battery_pct, flags, received_ms) VALUES ('{vehicle}', '{fleet}', \
             {seq}, {ts_ms}, {lat}, -134000000, 1250, 359, 100, {flags}, {received})",
            flags = StatusFlags::MOVING | StatusFlags::GPS_FIX,
            received = ts_ms + 5,
        )
    }

    /// Writes the schema-7 history of [`OLD_ROWS`] into the database at `url`, migrated by
    /// `migrator` up to schema 7 only.
    async fn write_schema_7(url: &str, migrator: &sqlx::migrate::Migrator) {
        sqlx::any::install_default_drivers();
        let old = sqlx::AnyPool::connect(url).await.expect("opens");
        migrator.run_to(7, &old).await.expect("migrates to 7");
        for old_row in OLD_ROWS {
            sqlx::query(sqlx::AssertSqlSafe(old_insert(old_row)))
                .execute(&old)
                .await
                .expect("inserts");
        }
        old.close().await;
    }

    #[tokio::test]
    async fn a_sqlite_history_from_schema_7_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.db");
        let path = path.to_str().expect("utf-8");
        write_schema_7(
            &format!("sqlite://{path}?mode=rwc"),
            &crate::store::sqlite::MIGRATOR,
        )
        .await;
        let store = Store::open(path, crate::store::StoreOptions::default())
            .await
            .expect("migrates to 8");
        history_survives_schema_8(store).await;
    }

    #[tokio::test]
    async fn a_postgres_history_from_schema_7_is_kept() {
        let url = crate::store::testing::postgres_url();
        write_schema_7(&url, &crate::store::postgres::MIGRATOR).await;
        let store = Store::open(&url, crate::store::StoreOptions::default())
            .await
            .expect("migrates to 8");
        history_survives_schema_8(store).await;
    }
}
