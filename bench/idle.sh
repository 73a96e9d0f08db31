#!/usr/bin/env bash
# What an idle bridge costs with a backlog: the release `bridge` (embedded broker, SQLite, no
# vehicle and no dispatcher connected) on a store with ORDERS orders waiting for a vehicle
# (state `created`, open: each is a drop-off fence too), against the same bridge on an empty
# store in the same run. Nothing happens, so what it spends is what its periodic tasks cost:
# the assigner's round every second, the geofences' read of the store every 2 s, retention.
#
#   cargo build --release --locked -p bridge
#   bench/idle.sh                      # 32000 orders, 30 s measured after 8 s settling
#   BIN=target/bench-report/bin bench/idle.sh 32000 30
#
# The orders are written straight into the SQLite file (python3's sqlite3) once the bridge
# has created its schema and stopped: set-up, not what is measured. CPU is the bridge
# process's utime + stime from /proc over the window. Prints a markdown table.
set -euo pipefail
orders=${1:-32000}
secs=${2:-30}
bin="${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}"
bin="$(cd "$bin" && pwd)"
hz=$(getconf CLK_TCK)

# Starts the bridge on the store in $1; sets $pid; waits until it has started.
start() {
  local dir=$1
  "$bin/bridge" --listen 127.0.0.1:0 --mqtt-listen "127.0.0.1:0" --store "$dir/fleetbeat.db" \
    >> "$dir/bridge.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    grep -q "bridge started" "$dir/bridge.log" && return 0
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.1
  done
  echo "bench/idle.sh: the bridge did not start:" >&2
  cat "$dir/bridge.log" >&2
  return 1
}

stop() { kill -TERM "$pid" && wait "$pid" || true; }

# The bridge's CPU ticks so far.
ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }

# Prints `ms_per_s load` for a bridge on a store with $1 waiting orders.
measure() {
  local n=$1 dir a b load
  dir=$(mktemp -d)
  start "$dir"
  stop
  python3 - "$dir/fleetbeat.db" "$n" << 'EOF'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1])
n = int(sys.argv[2])
# Placed ten minutes ago, spread over 5 km north of the stores.
at = int(time.time() * 1000) - 600_000
db.executemany(
    "INSERT INTO orders (order_id, store, fleet, customer, pickup_lat_e7, pickup_lon_e7, "
    "dropoff_lat_e7, dropoff_lon_e7, state, vehicle, created_ms, updated_ms) "
    "VALUES (?, 'store-1', 'demo', 'customer', 525200000, 134050000, ?, 134060000, "
    "'created', NULL, ?, ?)",
    [(f"idle-{k:06}", 525200000 + (k * 450_000) // max(n, 1), at + k // 100, at + k // 100)
     for k in range(n)],
)
db.commit()
EOF
  start "$dir"
  sleep 8
  a=$(ticks)
  sleep "$secs"
  b=$(ticks)
  load=$(cut -d' ' -f1 /proc/loadavg)
  stop
  rm -rf "$dir"
  echo "$(((b - a) * 1000 / hz / secs)) $load"
}

read -r empty empty_load < <(measure 0)
read -r backlog backlog_load < <(measure "$orders")
echo "| store | orders waiting | bridge CPU, ms per s | × the empty store | load (1 min) after |"
echo "|---|--:|--:|--:|--:|"
echo "| empty | 0 | $empty | 1.00 | $empty_load |"
ratio=$(awk -v a="$backlog" -v b="$empty" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
echo "| backlog | $orders | $backlog | $ratio | $backlog_load |"
echo
echo "Measured over $secs s after 8 s settling, \`$(basename "$bin")/bridge\`, $(nproc) CPUs."
