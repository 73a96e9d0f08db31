#!/usr/bin/env python3
"""How many pages a group of delivery events writes to SQLite's log, and which index writes
them: the statements of the group committer (`bridge/src/store/group/statements.rs`) replayed
with python3's `sqlite3` on the bridge's own schema (every migration in
`bridge/migrations/sqlite/`, in order), in `eventbench`'s shape: ORDERS orders prepared and
assigned, LANES vehicles at once, each working through its own run of orders (lane l has
orders l*ORDERS/LANES onwards), three events per order (pickup, in-transit, delivered), each
with a device time near its commit's (as `eventbench`'s vehicles send the clock), GROUP events
per transaction, one queued message per recipient (the order's vendor and DISPATCHERS
dispatchers). Checkpoints are off, so the log's size counts every page each commit wrote.

    event-pages.py [--orders 12800] [--lanes 64] [--group 34] [--dispatchers 2] [--adjacent]
                   [INDEX...]

Prints the frames (pages) per commit and per event with every index, then with each index
named on the command line left out (all of the events and orders tables' indexes if none is
named): what that index costs a group.
"""
import argparse
import glob
import os
import sqlite3
import tempfile
import time

MIGRATIONS = os.path.join(os.path.dirname(__file__), "..", "bridge", "migrations", "sqlite")
KINDS = [("pickup", "picked-up"), ("in-transit", "in-transit"), ("delivered", "delivered")]
PAYLOAD = '{"vehicle":"ev1","fleet":"bench","store":"store-1","flag":null,"suspect":false,' \
          '"order":"eo1","kind":"pickup","seq":1,"ts_ms":1765000000000,"lat":52.52,"lon":13.405}'


def frames(args, leave_out):
    """WAL frames written per commit and per event with the indexes `leave_out` dropped."""
    with tempfile.TemporaryDirectory() as dir:
        path = os.path.join(dir, "store.db")
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA wal_autocheckpoint = 0")
        for migration in sorted(glob.glob(os.path.join(MIGRATIONS, "*.sql"))):
            db.executescript(open(migration).read())
        for index in leave_out:
            db.execute(f"DROP INDEX {index}")
        db.execute("BEGIN")
        for i in range(args.orders):
            db.execute(
                "INSERT INTO orders (order_id, store, fleet, customer, pickup_lat_e7, "
                "pickup_lon_e7, dropoff_lat_e7, dropoff_lon_e7, state, vehicle, created_ms, "
                "updated_ms) VALUES (?, ?, 'bench', ?, 1, 2, 3, 4, 'assigned', ?, ?, ?)",
                (f"eo{i}", f"store-{i % 20}", f"customer {i}", f"ev{i}", 1000 + i, 1000 + i))
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        per_lane = args.orders // args.lanes
        def order(lane, n):
            return n * args.lanes + lane if args.adjacent else lane * per_lane + n
        events = [(order(lane, n), k)
                  for n in range(per_lane) for k in range(3) for lane in range(args.lanes)]
        clients = [f"dispatcher:d{d}" for d in range(args.dispatchers)]
        now, commits = 10 ** 9, 0
        for start in range(0, len(events), args.group):
            now += 5
            db.execute("BEGIN IMMEDIATE")
            for i, k in events[start:start + args.group]:
                kind, state = KINDS[k]
                db.execute(
                    "INSERT OR FAIL INTO delivery_events (vehicle, seq, ts_ms, fleet, order_id, "
                    "kind, lat_e7, lon_e7, flag, received_ms) "
                    "VALUES (?, ?, ?, 'bench', ?, ?, 1, 2, NULL, ?)",
                    (f"ev{i}", k + 1, now + k, f"eo{i}", kind, now))
                db.execute("UPDATE OR FAIL orders SET state = ?, updated_ms = ? WHERE order_id = ?",
                           (state, now, f"eo{i}"))
                for client in [f"vendor:store-{i % 20}"] + clients:
                    db.execute("INSERT INTO queue (client, payload, created_ms) VALUES (?, ?, ?)",
                               (client, PAYLOAD, now))
            db.execute("COMMIT")
            commits += 1
        page = db.execute("PRAGMA page_size").fetchone()[0]
        written = (os.path.getsize(path + "-wal") - 32) // (page + 24)
        db.close()
        return written / commits, written / len(events)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=12800)
    parser.add_argument("--lanes", type=int, default=64)
    parser.add_argument("--group", type=int, default=34)
    parser.add_argument("--dispatchers", type=int, default=2)
    parser.add_argument("--adjacent", action="store_true",
                        help="lane l has orders l, l+LANES, ...: the orders in flight are "
                             "next to each other")
    parser.add_argument("index", nargs="*")
    args = parser.parse_args()
    indexes = args.index
    if not indexes:
        db = sqlite3.connect(":memory:")
        for migration in sorted(glob.glob(os.path.join(MIGRATIONS, "*.sql"))):
            db.executescript(open(migration).read())
        indexes = [name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            "AND tbl_name IN ('orders', 'delivery_events', 'queue') ORDER BY tbl_name, name")]
    started = time.time()
    base_commit, base_event = frames(args, [])
    print(f"| left out | frames per commit | per event | that index's share |")
    print(f"|---|--:|--:|--:|")
    print(f"| nothing | {base_commit:.1f} | {base_event:.2f} | |")
    for index in indexes:
        commit, event = frames(args, [index])
        print(f"| `{index}` | {commit:.1f} | {event:.2f} | {1 - commit / base_commit:.0%} |")
    shape = "adjacent" if args.adjacent else "far apart"
    print(f"\n{args.orders} orders, {args.lanes} lanes, {args.group} events per commit, "
          f"{args.dispatchers} dispatchers, the orders in flight {shape}; "
          f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
