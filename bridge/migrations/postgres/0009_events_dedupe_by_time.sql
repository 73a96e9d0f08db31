-- Fleetbeat bridge store, schema 9, PostgreSQL: the delivery events' dedupe index keyed by the
-- device's time first. Kept in step with `../sqlite/0009_events_dedupe_by_time.sql`, which
-- says why.
DROP INDEX delivery_events_dedupe;
CREATE UNIQUE INDEX delivery_events_dedupe ON delivery_events (ts_ms, vehicle, seq);
