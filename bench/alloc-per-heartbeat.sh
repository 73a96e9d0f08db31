#!/usr/bin/env bash
# Heap allocations per heartbeat through the embedded broker + bridge, counted by valgrind's
# DHAT: the release `bridge` (no dispatcher connected) under DHAT, fed by `device-sim` (100
# vehicles at 2 Hz: what the bridge keeps up with under valgrind), twice, for SHORT and LONG
# seconds; the difference between the two runs divides out start-up and shutdown.
#
#   CARGO_TARGET_DIR=target/dhat cargo build --release -p bridge --features system-allocator
#   CARGO_TARGET_DIR=target/dhat cargo build --release -p device-sim
#   BIN=target/dhat/release bench/alloc-per-heartbeat.sh 10 30
#
# The bridge must be built with `--features system-allocator`: DHAT counts only what goes
# through the system's malloc, and the release bridge allocates through jemalloc (a normal
# build would count little more than SQLite's allocations). Needs valgrind and curl. Prints
# blocks and bytes per heartbeat; with SITES=1 also where they are allocated (the two runs'
# DHAT profiles compared site by site, `bench/dhat-sites.py`, which needs python3); KEEP=1
# keeps the two profiles (for `dh_view` or another `dhat-sites.py` depth).
set -euo pipefail
short=${1:-10}
long=${2:-30}
bin="${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}"
bin="$(cd "$bin" && pwd)"
run() {
  local secs=$1 dir port http hb pid
  dir=$(mktemp -d)
  port=$((20000 + RANDOM % 20000))
  valgrind --tool=dhat --dhat-out-file="$dir/dhat.out" "$bin/bridge" --listen 127.0.0.1:0 \
    --mqtt-listen "127.0.0.1:$port" --store "$dir/fleetbeat.db" > "$dir/bridge.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 120); do grep -q "bridge started" "$dir/bridge.log" && break; sleep 1; done
  "$bin/device-sim" --vehicles 100 --rate 2 --broker "127.0.0.1:$port" --duration "$secs" \
    > "$dir/sim.log" 2>&1
  http=$(grep -o 'http=[0-9.:]*' "$dir/bridge.log" | head -1 | cut -d= -f2)
  hb=$(curl -s "http://$http/metrics" | awk '/bridge_mqtt_received_total\{kind="hb"\}/ {print $2}')
  kill -INT "$pid"
  wait "$pid" || true
  # DHAT's summary: "Total:     53,275,191 bytes in 85,155 blocks"
  read -r bytes blocks < <(grep -m1 "Total:" "$dir/bridge.log" | tr -d , |
    awk '{print $(NF-4), $(NF-1)}')
  echo "$hb $bytes $blocks $dir"
}
read -r hb1 bytes1 blocks1 dir1 < <(run "$short")
read -r hb2 bytes2 blocks2 dir2 < <(run "$long")
awk -v h1="$hb1" -v h2="$hb2" -v b1="$bytes1" -v b2="$bytes2" -v k1="$blocks1" -v k2="$blocks2" \
  'BEGIN { n = h2 - h1; printf "%d heartbeats more in the long run: %.1f allocations, %.0f bytes per heartbeat\n", n, (k2 - k1) / n, (b2 - b1) / n }'
if [ "${SITES:-0}" = 1 ]; then
  python3 "$(dirname "$0")/dhat-sites.py" "$dir1/dhat.out" "$dir2/dhat.out" "$hb1" "$hb2"
fi
if [ "${KEEP:-0}" = 1 ]; then
  echo "profiles kept: $dir1/dhat.out $dir2/dhat.out (heartbeats $hb1, $hb2)"
else
  rm -rf "$dir1" "$dir2"
fi
