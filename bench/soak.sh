#!/usr/bin/env bash
# Soak: the default deployment (the release `bridge` with its embedded broker, a file store)
# under VEHICLES chaotic `device-sim` vehicles for MINUTES, sampled every SAMPLE_SECS into a
# CSV; at the end, whether the bridge's memory was flat over the last half of the run, and
# whether it exited cleanly on SIGTERM.
#
#   cargo build --release -p bridge -p device-sim && bench/soak.sh 60 1000
#
# Chaos (environment, defaults sized on the issue's run: 1 270 reconnects and 595 garbage
# payloads in 10 minutes of 1 000 vehicles): DROP_RATE=0.002 (per vehicle-second),
# GARBAGE_RATE=0.001 (per heartbeat), CLOCK_SKEW_MS=2000, RATE=1 (Hz). ORDER_EVERY=5: a vendor
# order every 5 s (0: none), so delivery events, commands and the queue run too.
# OUT=DIR (default soak-DATE/) gets soak.csv, bridge.log, sim.log. FLAT_MIB_PER_MIN=0.05: the
# largest slope of RSS over the last half that still counts as flat. BIN=DIR: the binaries.
# Needs curl. Exits 1 if memory was not flat or the bridge did not exit cleanly.
set -euo pipefail
minutes=${1:-60}
vehicles=${2:-1000}
root="$(cd "$(dirname "$0")/.." && pwd)"
bin=${BIN:-$root/target/release}
out=${OUT:-$root/soak-$(date +%Y%m%d-%H%M%S)}
every=${SAMPLE_SECS:-10}
flat=${FLAT_MIB_PER_MIN:-0.05}
mkdir -p "$out"
csv="$out/soak.csv"
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

store_dir=$(mktemp -d)
mqtt_port=$((20000 + RANDOM % 20000))
"$bin/bridge" --listen 127.0.0.1:0 --mqtt-listen "127.0.0.1:$mqtt_port" \
  --store "$store_dir/fleetbeat.db" > "$out/bridge.log" 2>&1 &
bridge=$!
sim=""
cleanup() {
  [ -n "$sim" ] && kill "$sim" 2>/dev/null || true
  kill "$bridge" 2>/dev/null || true
  rm -rf "$store_dir"
}
trap cleanup EXIT
for _ in $(seq 1 120); do grep -q "bridge started" "$out/bridge.log" && break; sleep 0.5; done
http=$(grep -o 'http=[0-9.:]*' "$out/bridge.log" | head -1 | cut -d= -f2)
[ -n "$http" ] || { echo "the bridge did not start:"; cat "$out/bridge.log"; exit 1; }
for _ in $(seq 1 120); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$http/readyz")" = 200 ] && break
  sleep 0.5
done

"$bin/device-sim" --vehicles "$vehicles" --broker "127.0.0.1:$mqtt_port" \
  --rate "${RATE:-1}" --drop-rate "${DROP_RATE:-0.002}" --garbage-rate "${GARBAGE_RATE:-0.001}" \
  --clock-skew "${CLOCK_SKEW_MS:-2000}" > "$out/sim.log" 2>&1 &
sim=$!

# One metric sample from a Prometheus text (the sum over its label sets).
metric() { awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }' <<< "$2"; }

echo "t_s,rss_kib,rss_anon_kib,rss_file_kib,fds,threads,store_kib,hb_received,rejected,mqtt_connects,mqtt_errors,acks_waiting,history_queued,socketio_sockets,store_writable,broker_connections,broker_disconnects" > "$csv"
# One row of the CSV: the bridge's memory, descriptors and store size, and its /metrics.
sample() {
  local status m
  status=$(cat "/proc/$bridge/status")
  field() { awk -v f="$1:" '$1 == f { print $2 }' <<< "$status"; }
  m=$(curl -s --max-time 5 "http://$http/metrics" || true)
  echo "$(($(date +%s) - start)),$(field VmRSS),$(field RssAnon),$(field RssFile),$(ls "/proc/$bridge/fd" | wc -l),$(field Threads),$(du -sk "$store_dir" | cut -f1),$(metric 'fleetbeat_bridge_mqtt_received_total{kind="hb"}' "$m"),$(metric fleetbeat_bridge_mqtt_rejected_total "$m"),$(metric fleetbeat_bridge_mqtt_connects_total "$m"),$(metric fleetbeat_bridge_mqtt_errors_total "$m"),$(metric fleetbeat_bridge_acks_waiting "$m"),$(metric fleetbeat_bridge_history_queued "$m"),$(metric fleetbeat_bridge_socketio_sockets "$m"),$(metric fleetbeat_bridge_store_writable "$m"),$(metric fleetbeat_broker_connections "$m"),$(metric fleetbeat_broker_disconnects_total "$m")" >> "$csv"
  tail -1 "$csv"
}
start=$(date +%s)
end=$((start + minutes * 60))
next_order=$start
next_sample=$start
orders=0
echo "soak: $vehicles vehicles for $minutes min; bridge pid $bridge on http://$http; CSV $csv"
while [ "$(date +%s)" -lt "$end" ]; do
  now=$(date +%s)
  if [ "${ORDER_EVERY:-5}" != 0 ] && [ "$now" -ge "$next_order" ]; then
    orders=$((orders + 1))
    curl -s -o /dev/null -H 'Authorization: Bearer vendor-demo' -H 'content-type: application/json' \
      -d "{\"order\":\"soak-$orders\",\"customer\":\"c $orders\",\"lat\":52.51,\"lon\":13.40}" \
      "http://$http/api/orders" &
    next_order=$((now + ${ORDER_EVERY:-5}))
  fi
  if [ "$now" -ge "$next_sample" ]; then
    next_sample=$((next_sample + every))
    kill -0 "$bridge" 2>/dev/null || { echo "the bridge died"; tail -20 "$out/bridge.log"; exit 1; }
    sample
  fi
  sleep 1
done
sample

kill -INT "$sim" 2>/dev/null || true
wait "$sim" 2>/dev/null || true
sim=""
t0=$(date +%s%N)
kill -TERM "$bridge"
code=0
wait "$bridge" || code=$?
stop_ms=$((($(date +%s%N) - t0) / 1000000))

# RSS at 1, 5, 10, 30, 60 minutes, and the slope of a least-squares line over the last half.
awk -F, -v flat="$flat" -v code="$code" -v stop_ms="$stop_ms" -v orders="$orders" '
  NR == 1 { next }
  { t[n] = $1; r[n] = $2 / 1024; n++ }
  END {
    for (i = 0; i < n; i++) for (m = 1; m <= 60; m++)
      if (!(m in at) && t[i] >= m * 60 && (m == 1 || m == 5 || m == 10 || m == 30 || m == 60)) at[m] = r[i]
    line = "RSS MiB:"
    for (m = 1; m <= 60; m++) if (m in at) line = line sprintf(" %d min %.1f,", m, at[m])
    printf "%s end %.1f\n", line, r[n - 1]
    h = int(n / 2); k = 0; sx = sy = sxy = sxx = 0
    for (i = h; i < n; i++) { x = t[i] / 60; sx += x; sy += r[i]; sxy += x * r[i]; sxx += x * x; k++ }
    slope = (k > 1) ? (k * sxy - sx * sy) / (k * sxx - sx * sx) : 0
    verdict = (slope <= flat) ? "flat" : "GROWING"
    printf "last half (%d samples): %+.3f MiB/min: %s (limit %.3f)\n", k, slope, verdict, flat
    printf "orders placed: %d; bridge exit code %d after SIGTERM, in %d ms\n", orders, code, stop_ms
    exit (verdict == "flat" && code == 0) ? 0 : 1
  }' "$csv"
