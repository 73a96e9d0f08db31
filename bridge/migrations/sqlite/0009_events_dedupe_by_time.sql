-- Fleetbeat bridge store, schema 9: the delivery events' dedupe index keyed by the device's
-- time first, (ts_ms, vehicle, seq) instead of (vehicle, seq, ts_ms).
-- - The same key, so the same uniqueness: an event is a duplicate when its vehicle, seq and
--   device time are all equal, in any column order. The group's lookup binds all three
--   (`store::group::statements`), and `ON CONFLICT (vehicle, seq, ts_ms)` names the same
--   columns, which both engines match to the index in any order.
-- - Keyed by vehicle first, each event of a group went to its own vehicle's end of the index:
--   a page per event. Keyed by time first, the events of a group are next to each other at
--   the index's right end: a few pages per group. A group of 34 events writes 148 pages of
--   log instead of 178 (`bench/event-pages.py`, bench/HISTORY.md).
-- The index is rebuilt once, in the migration's transaction.
-- Kept in step with `../postgres/0009_events_dedupe_by_time.sql`.
DROP INDEX delivery_events_dedupe;
CREATE UNIQUE INDEX delivery_events_dedupe ON delivery_events (ts_ms, vehicle, seq);
