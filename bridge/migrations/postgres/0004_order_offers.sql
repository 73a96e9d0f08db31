-- Fleetbeat bridge store, schema 4, PostgreSQL: which bridge is offering an order to vehicles
-- right now. Kept in step with `../sqlite/0004_order_offers.sql`, which says how it is used.
CREATE TABLE order_offers (
    order_id TEXT   NOT NULL PRIMARY KEY,
    holder   TEXT   NOT NULL,
    until_ms BIGINT NOT NULL
);
