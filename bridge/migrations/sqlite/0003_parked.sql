-- Fleetbeat bridge store, schema 3: QoS 1 messages from vehicles whose key the bridge did not
-- have, parked after they were held for `key_wait_park_after_ms` (bridge/src/ingest/inbox.rs),
-- so that they no longer hold the PUBACKs behind them. Each is handled, in id order, once its
-- vehicle's key is known, then deleted; rejected and deleted if the vehicle is revoked or the
-- payload does not verify; expired by the queue retention otherwise (counted).
CREATE TABLE parked (
    id          INTEGER PRIMARY KEY AUTOINCREMENT, -- SQLite: PostgreSQL BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY
    vehicle     TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    payload     BLOB    NOT NULL, -- SQLite: PostgreSQL BYTEA
    received_ms BIGINT  NOT NULL
);
-- A vehicle's parked messages, in the order they came.
CREATE INDEX parked_by_vehicle ON parked (vehicle, id);
