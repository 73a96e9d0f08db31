-- Fleetbeat bridge store, schema 6, PostgreSQL: custom geofences. Kept in step with
-- `../sqlite/0006_geofences.sql`, which says how it is used.
CREATE TABLE geofences (
    fence_id   TEXT   NOT NULL PRIMARY KEY,
    name       TEXT   NOT NULL,
    fleet      TEXT   NOT NULL,
    shape      TEXT   NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX geofences_by_fleet ON geofences (fleet);
