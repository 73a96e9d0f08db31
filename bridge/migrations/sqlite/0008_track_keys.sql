-- Fleetbeat bridge store, schema 8: the heartbeat history keyed by an integer per track.
-- - A track is the heartbeats of one vehicle in one fleet; `tracks` gives each (vehicle,
--   fleet) a number once, and every heartbeat row carries that number instead of the two
--   names. The writer keeps the numbers in memory (`store::track_keys`), so a heartbeat binds
--   only integers: no text to copy on its way to SQLite, a smaller row, a smaller track index.
-- - A number is never reused or removed (a few bytes per vehicle ever seen): a heartbeat's
--   track always names its vehicle and fleet, whatever retention removed.
-- The table is rebuilt (SQLite cannot change a column in place); the rows keep their ids, so
-- the track order for equal times (by id) is kept.
-- Kept in step with `../postgres/0008_track_keys.sql`.
CREATE TABLE tracks (
    id      INTEGER PRIMARY KEY, -- SQLite: the rowid; PostgreSQL BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY
    vehicle TEXT NOT NULL,
    fleet   TEXT NOT NULL
);
CREATE UNIQUE INDEX tracks_by_name ON tracks (vehicle, fleet);
INSERT INTO tracks (vehicle, fleet)
    SELECT DISTINCT vehicle, fleet FROM heartbeats ORDER BY vehicle, fleet;

CREATE TABLE heartbeats_by_track (
    id          INTEGER PRIMARY KEY,
    seq         BIGINT   NOT NULL,
    ts_ms       BIGINT   NOT NULL,
    lat_e7      INTEGER  NOT NULL,
    lon_e7      INTEGER  NOT NULL,
    speed_cm_s  INTEGER  NOT NULL,
    heading_deg INTEGER  NOT NULL,
    battery_pct SMALLINT NOT NULL,
    flags       SMALLINT NOT NULL,
    received_ms BIGINT   NOT NULL,
    -- tracks.id (no foreign key: a check per row, and no track is ever removed). Last, as
    -- PostgreSQL's `ADD COLUMN` puts it.
    track       BIGINT   NOT NULL
);
INSERT INTO heartbeats_by_track (id, seq, ts_ms, lat_e7, lon_e7, speed_cm_s, heading_deg,
                                 battery_pct, flags, received_ms, track)
    SELECT h.id, h.seq, h.ts_ms, h.lat_e7, h.lon_e7, h.speed_cm_s, h.heading_deg,
           h.battery_pct, h.flags, h.received_ms, t.id
    FROM heartbeats AS h JOIN tracks AS t ON t.vehicle = h.vehicle AND t.fleet = h.fleet
    ORDER BY h.id;
DROP TABLE heartbeats;
ALTER TABLE heartbeats_by_track RENAME TO heartbeats;
-- track(vehicle, from, to): per track of the vehicle, an index range scan, already in
-- (ts_ms, id) order.
CREATE INDEX heartbeats_track ON heartbeats (track, ts_ms);
-- expire_heartbeats(older_than): device clocks move together, so this index grows at its end.
CREATE INDEX heartbeats_by_age ON heartbeats (ts_ms);
