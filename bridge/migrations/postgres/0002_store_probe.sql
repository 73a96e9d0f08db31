-- Fleetbeat bridge store, schema 2, PostgreSQL: one row the bridge rewrites to learn whether the
-- store can write again (`Store::probe_write`). Kept in step with `../sqlite/0002_store_probe.sql`.
CREATE TABLE store_probe (
    id         INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    written_ms BIGINT  NOT NULL
);
