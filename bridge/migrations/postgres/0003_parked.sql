-- Fleetbeat bridge store, schema 3, PostgreSQL: QoS 1 messages from vehicles whose key the
-- bridge did not have, parked until it is known. Kept in step with `../sqlite/0003_parked.sql`,
-- which says how they are used.
CREATE TABLE parked (
    id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vehicle     TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    payload     BYTEA   NOT NULL,
    received_ms BIGINT  NOT NULL
);
CREATE INDEX parked_by_vehicle ON parked (vehicle, id);
