-- Fleetbeat bridge store, schema 5, PostgreSQL: orders may be cancelled, and indexes for
-- `GET /api/orders`. Kept in step with `../sqlite/0005_order_cancel.sql`, which says what
-- changes (PostgreSQL changes the constraint and the partial index in place).
ALTER TABLE orders DROP CONSTRAINT orders_state_check;
ALTER TABLE orders ADD CONSTRAINT orders_state_check
    CHECK (state IN ('created', 'assigned', 'picked-up', 'in-transit', 'delivered',
                     'cancelled'));

DROP INDEX orders_open_by_vehicle;
CREATE UNIQUE INDEX orders_open_by_vehicle
    ON orders (vehicle)
    WHERE vehicle IS NOT NULL AND state NOT IN ('delivered', 'cancelled');

CREATE INDEX orders_by_created ON orders (created_ms, order_id);
CREATE INDEX orders_by_state ON orders (state, created_ms, order_id);
CREATE INDEX orders_by_store ON orders (store, created_ms, order_id);
CREATE INDEX orders_by_vehicle ON orders (vehicle, created_ms, order_id);
