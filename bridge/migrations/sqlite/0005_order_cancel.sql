-- Fleetbeat bridge store, schema 5: orders may be cancelled (issue #16). `cancelled` is a
-- terminal state like `delivered`, reached from any state before `delivered`
-- (`Store::cancel_order`); a cancelled order keeps the vehicle that last held it, for its
-- timeline, but no longer makes that vehicle busy. Also indexes for `GET /api/orders` (newest
-- first, filtered by state, store, fleet or vehicle). Kept in step with
-- `../postgres/0005_order_cancel.sql`.
--
-- SQLite cannot change a CHECK constraint: `orders` is rebuilt (the documented procedure:
-- new table, copy, drop, rename), inside this migration's transaction. `assignments`
-- references `orders`, and foreign keys are on (they cannot be switched off inside a
-- transaction), so it is rebuilt with it: the copies are made first, then the old child and
-- the old parent dropped (no row references a dropped row), then both renamed, which also
-- points the new child's foreign key at `orders`. Rows keep their ids (`assignments` keeps
-- its AUTOINCREMENT sequence); every index is created again.
CREATE TABLE orders_next (
    order_id       TEXT    NOT NULL PRIMARY KEY,
    store          TEXT    NOT NULL,
    fleet          TEXT    NOT NULL,
    customer       TEXT    NOT NULL,
    pickup_lat_e7  INTEGER NOT NULL,
    pickup_lon_e7  INTEGER NOT NULL,
    dropoff_lat_e7 INTEGER NOT NULL,
    dropoff_lon_e7 INTEGER NOT NULL,
    state          TEXT    NOT NULL
        CHECK (state IN ('created', 'assigned', 'picked-up', 'in-transit', 'delivered',
                         'cancelled')),
    vehicle        TEXT,
    created_ms     BIGINT  NOT NULL,
    updated_ms     BIGINT  NOT NULL
);
INSERT INTO orders_next (order_id, store, fleet, customer, pickup_lat_e7, pickup_lon_e7,
                         dropoff_lat_e7, dropoff_lon_e7, state, vehicle, created_ms, updated_ms)
    SELECT order_id, store, fleet, customer, pickup_lat_e7, pickup_lon_e7, dropoff_lat_e7,
           dropoff_lon_e7, state, vehicle, created_ms, updated_ms
    FROM orders;

CREATE TABLE assignments_next (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id    TEXT    NOT NULL REFERENCES orders_next (order_id),
    vehicle     TEXT    NOT NULL,
    assigned_ms BIGINT  NOT NULL
);
INSERT INTO assignments_next (id, order_id, vehicle, assigned_ms)
    SELECT id, order_id, vehicle, assigned_ms FROM assignments;

DROP TABLE assignments;
DROP TABLE orders;
ALTER TABLE orders_next RENAME TO orders;
ALTER TABLE assignments_next RENAME TO assignments;

-- As in schema 1, with `cancelled` freeing the vehicle like `delivered`.
CREATE UNIQUE INDEX orders_open_by_vehicle
    ON orders (vehicle)
    WHERE vehicle IS NOT NULL AND state NOT IN ('delivered', 'cancelled');
CREATE INDEX assignments_by_order ON assignments (order_id, id);

-- GET /api/orders, newest first: all of them (a scoped list filters the fleets on the way),
-- or within a state (also the waiting orders, oldest first), a store (vendors) or a vehicle.
-- No index leads with `fleet`: it would draw the busy-vehicle query away from the partial
-- index above (which holds only open orders).
CREATE INDEX orders_by_created ON orders (created_ms, order_id);
CREATE INDEX orders_by_state ON orders (state, created_ms, order_id);
CREATE INDEX orders_by_store ON orders (store, created_ms, order_id);
CREATE INDEX orders_by_vehicle ON orders (vehicle, created_ms, order_id);
