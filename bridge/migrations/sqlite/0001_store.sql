-- Fleetbeat bridge store, schema 1: orders, delivery events, the per-client message queue and
-- the heartbeat history. Run by `sqlx::migrate!` when the store opens (bridge/src/store).
--
-- The SQL is portable to PostgreSQL except where a line says "SQLite:"; the PostgreSQL form
-- is given beside it. Integers that are u64 in Rust (milliseconds) are BIGINT here and i64
-- in the code; positions are integer 1e-7 degrees, as on the wire.

-- Orders placed by vendors. `state` only moves forward:
-- created -> assigned -> picked-up -> in-transit -> delivered.
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

-- A vehicle holds at most one undelivered order. Enforced here, so that even several writers
-- (several bridges on one PostgreSQL) cannot give one vehicle two orders; also the index
-- behind busy_vehicles(). Partial indexes exist in SQLite (>= 3.8) and PostgreSQL alike.
CREATE UNIQUE INDEX orders_open_by_vehicle
    ON orders (vehicle)
    WHERE vehicle IS NOT NULL AND state <> 'delivered';

-- Every (re)assignment of an order, for its timeline.
CREATE TABLE assignments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT, -- SQLite: PostgreSQL BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY
    order_id    TEXT    NOT NULL REFERENCES orders (order_id),
    vehicle     TEXT    NOT NULL,
    assigned_ms BIGINT  NOT NULL
);
CREATE INDEX assignments_by_order ON assignments (order_id, id);

-- Delivery events as vehicles reported them, each once. Events of unknown orders and events
-- that do not fit the order's state are kept too, with a `flag` saying why they did not move
-- the order (no foreign key on order_id for that reason).
CREATE TABLE delivery_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT, -- SQLite: PostgreSQL BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY
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
-- Deduplication: a re-sent event carries the same vehicle, seq and device timestamp. The
-- timestamp is part of the key so that a device whose event counter restarted at 0 (a reboot,
-- a new simulator run) is not mistaken for a stream of duplicates.
CREATE UNIQUE INDEX delivery_events_dedupe ON delivery_events (vehicle, seq, ts_ms);
CREATE INDEX delivery_events_by_order ON delivery_events (order_id, ts_ms);

-- The durable per-client queue: a row is a message not yet acknowledged by its client.
-- AUTOINCREMENT (not a plain rowid) so that an id is never handed out twice, even after the
-- newest message was acknowledged and deleted: clients drop messages whose id they have seen.
CREATE TABLE queue (
    id         INTEGER PRIMARY KEY AUTOINCREMENT, -- SQLite: PostgreSQL BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY
    client     TEXT    NOT NULL,
    payload    TEXT    NOT NULL, -- JSON text (PostgreSQL could use JSONB)
    created_ms BIGINT  NOT NULL
);
CREATE INDEX queue_by_client ON queue (client, id);
CREATE INDEX queue_by_age ON queue (created_ms);

-- Heartbeat history (QoS 0 data; written in batches, expired by retention).
CREATE TABLE heartbeats (
    id          INTEGER PRIMARY KEY, -- SQLite: the rowid; PostgreSQL BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY
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
-- track(vehicle, from, to): an index range scan, already in (ts_ms, id) order.
CREATE INDEX heartbeats_track ON heartbeats (vehicle, ts_ms);
-- expire_heartbeats(older_than): device clocks move together, so this index grows at its end.
CREATE INDEX heartbeats_by_age ON heartbeats (ts_ms);
