-- Fleetbeat bridge store, schema 1, PostgreSQL: orders, delivery events, the per-client message
-- queue and the heartbeat history. Run by `sqlx::migrate!` when the store opens
-- (bridge/src/store). Kept in step with `../sqlite/0001_store.sql` (same tables, columns,
-- nullability and index names; a unit test checks it): see that file for what each table holds.

CREATE TABLE orders (
    order_id       TEXT    NOT NULL PRIMARY KEY,
    store          TEXT    NOT NULL,
    fleet          TEXT    NOT NULL,
    customer       TEXT    NOT NULL,
    pickup_lat_e7  INTEGER NOT NULL,
    pickup_lon_e7  INTEGER NOT NULL,
    dropoff_lat_e7 INTEGER NOT NULL,
    dropoff_lon_e7 INTEGER NOT NULL,
    state          TEXT    NOT NULL
        CHECK (state IN ('created', 'assigned', 'picked-up', 'in-transit', 'delivered')),
    vehicle        TEXT,
    created_ms     BIGINT  NOT NULL,
    updated_ms     BIGINT  NOT NULL
);

-- A vehicle holds at most one undelivered order, whichever bridge assigns it.
CREATE UNIQUE INDEX orders_open_by_vehicle
    ON orders (vehicle)
    WHERE vehicle IS NOT NULL AND state <> 'delivered';

CREATE TABLE assignments (
    id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id    TEXT    NOT NULL REFERENCES orders (order_id),
    vehicle     TEXT    NOT NULL,
    assigned_ms BIGINT  NOT NULL
);
CREATE INDEX assignments_by_order ON assignments (order_id, id);

CREATE TABLE delivery_events (
    id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vehicle     TEXT    NOT NULL,
    seq         BIGINT  NOT NULL,
    ts_ms       BIGINT  NOT NULL,
    fleet       TEXT    NOT NULL,
    order_id    TEXT    NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('pickup', 'in-transit', 'delivered')),
    lat_e7      INTEGER NOT NULL,
    lon_e7      INTEGER NOT NULL,
    flag        TEXT,
    received_ms BIGINT  NOT NULL
);
CREATE UNIQUE INDEX delivery_events_dedupe ON delivery_events (vehicle, seq, ts_ms);
CREATE INDEX delivery_events_by_order ON delivery_events (order_id, ts_ms);

-- Identity values are never handed out twice (a sequence), as AUTOINCREMENT on SQLite.
CREATE TABLE queue (
    id         BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client     TEXT    NOT NULL,
    payload    TEXT    NOT NULL, -- JSON text, as on SQLite
    created_ms BIGINT  NOT NULL
);
CREATE INDEX queue_by_client ON queue (client, id);
CREATE INDEX queue_by_age ON queue (created_ms);

CREATE TABLE heartbeats (
    id          BIGINT   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vehicle     TEXT     NOT NULL,
    fleet       TEXT     NOT NULL,
    seq         BIGINT   NOT NULL,
    ts_ms       BIGINT   NOT NULL,
    lat_e7      INTEGER  NOT NULL,
    lon_e7      INTEGER  NOT NULL,
    speed_cm_s  INTEGER  NOT NULL,
    heading_deg INTEGER  NOT NULL,
    battery_pct SMALLINT NOT NULL,
    flags       SMALLINT NOT NULL,
    received_ms BIGINT   NOT NULL
);
CREATE INDEX heartbeats_track ON heartbeats (vehicle, ts_ms);
CREATE INDEX heartbeats_by_age ON heartbeats (ts_ms);
