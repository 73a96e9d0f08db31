-- Fleetbeat bridge store, schema 6: custom geofences (bridge/src/geofence), drawn by
-- dispatchers and operators through `POST /api/geofences`. The automatic fences (stores,
-- open orders' drop-offs) are not stored: they follow the configuration and the orders.
-- `shape` is the fence's shape as JSON text (`{"type":"circle",...}` or
-- `{"type":"polygon","points":[[lat,lon],...]}`), checked before it is written.
-- Kept in step with `../postgres/0006_geofences.sql`.
CREATE TABLE geofences (
    fence_id   TEXT   NOT NULL PRIMARY KEY,
    name       TEXT   NOT NULL,
    fleet      TEXT   NOT NULL,
    shape      TEXT   NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX geofences_by_fleet ON geofences (fleet);
