-- Fleetbeat bridge store, schema 7: orders by state and the time of their last change.
-- - A bridge reads only the orders changed since its last read to keep the drop-off fences in
--   step (`Store::dropoffs_changed_since`, one range per state), rather than every open order
--   every 2 s.
-- - The re-offer pages through the orders assigned before a time (`Store::assigned_orders`)
--   by a range, rather than sorting every assigned order for each page.
-- An order's change moves its entry to the right end of its state's range, where the other
-- recent changes are: a group commit dirties few more pages for it.
-- Kept in step with `../postgres/0007_orders_by_updated.sql`.
CREATE INDEX orders_by_updated ON orders (state, updated_ms, order_id);
