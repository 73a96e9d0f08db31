-- Fleetbeat bridge store, schema 8, PostgreSQL: the heartbeat history keyed by an integer per
-- track. Kept in step with `../sqlite/0008_track_keys.sql`, which says why. Here the table is
-- changed in place (the rows keep their ids, the identity goes on from where it was).
CREATE TABLE tracks (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vehicle TEXT NOT NULL,
    fleet   TEXT NOT NULL
);
CREATE UNIQUE INDEX tracks_by_name ON tracks (vehicle, fleet);
INSERT INTO tracks (vehicle, fleet)
    SELECT DISTINCT vehicle, fleet FROM heartbeats ORDER BY vehicle, fleet;

ALTER TABLE heartbeats ADD COLUMN track BIGINT;
UPDATE heartbeats AS h SET track = t.id
    FROM tracks AS t WHERE t.vehicle = h.vehicle AND t.fleet = h.fleet;
ALTER TABLE heartbeats ALTER COLUMN track SET NOT NULL;
DROP INDEX heartbeats_track;
ALTER TABLE heartbeats DROP COLUMN vehicle, DROP COLUMN fleet;
CREATE INDEX heartbeats_track ON heartbeats (track, ts_ms);
