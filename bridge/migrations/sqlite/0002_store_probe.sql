-- Fleetbeat bridge store, schema 2: one row the bridge rewrites to learn whether the store can
-- write again, after writes failed while nothing else was being written
-- (`Store::probe_write`, bridge/src/store/health.rs).
CREATE TABLE store_probe (
    id         INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    written_ms BIGINT  NOT NULL
);
