-- Fleetbeat bridge store, schema 4: which bridge is offering an order to vehicles right now
-- (`Store::claim_offer`, bridge/src/domain/delivery.rs). Several bridges on one database never
-- offer one order at once: a bridge offers an order only after claiming its row here, until
-- `until_ms` (a crashed bridge's claim lapses), and deletes the row when its round ends.
-- Kept in step with `../postgres/0004_order_offers.sql`.
CREATE TABLE order_offers (
    order_id TEXT   NOT NULL PRIMARY KEY,
    holder   TEXT   NOT NULL,
    until_ms BIGINT NOT NULL
);
