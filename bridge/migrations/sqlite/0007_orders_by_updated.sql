-- Fleetbeat bridge store, schema 7: orders by the time of their last change, so that a bridge
-- reads only the orders changed since its last read to keep the drop-off fences in step
-- (`Store::dropoffs_changed_since`), rather than every open order every 2 s. An order's
-- change moves its entry to the right end of this index, where the other recent changes are:
-- a group commit dirties few more pages for it.
-- Kept in step with `../postgres/0007_orders_by_updated.sql`.
CREATE INDEX orders_by_updated ON orders (updated_ms);
