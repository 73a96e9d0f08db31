-- Fleetbeat bridge store, schema 7, PostgreSQL: orders by state and the time of their last
-- change. Kept in step with `../sqlite/0007_orders_by_updated.sql`, which says how it is used.
CREATE INDEX orders_by_updated ON orders (state, updated_ms, order_id);
