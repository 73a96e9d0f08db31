#!/usr/bin/env bash
# The stock Eclipse Paho interoperability suite (MQTT 3.1.1: interoperability/client_test.py,
# MQTT 5: interoperability/client_test5.py) against the Fleetbeat broker and Debian's mosquitto,
# in the same run, each on free loopback ports; prints one table (docs/broker.md records it).
#
#   git clone https://github.com/eclipse/paho.mqtt.testing /tmp/paho   # not part of this repo
#   bench/paho.sh /tmp/paho
#
# Needs python3 (the suite is pure Python 3) and mosquitto (/usr/sbin/mosquitto). Builds the
# release `broker` first; BROKER=path/to/broker uses another binary. Every test runs in a
# process of its own, bounded by TEST_TIMEOUT seconds (60); the whole run takes about ten
# minutes (the tests sleep). Logs (one per test, the brokers') stay in the directory printed
# at the end.
set -euo pipefail

paho=${1:?usage: bench/paho.sh PAHO_DIR (a checkout of eclipse/paho.mqtt.testing)}
suite="$(cd "$paho" && pwd)/interoperability"
[ -f "$suite/client_test.py" ] || { echo "no interoperability/client_test.py in $paho" >&2; exit 2; }
root="$(cd "$(dirname "$0")/.." && pwd)"
mosquitto=${MOSQUITTO:-/usr/sbin/mosquitto}
test_timeout=${TEST_TIMEOUT:-60}
if [ -z "${BROKER:-}" ]; then
  (cd "$root" && cargo build --release -q -p broker --bin broker)
  BROKER="$root/target/release/broker"
fi
BROKER=$(realpath "$BROKER")
work=$(mktemp -d /tmp/paho-run.XXXXXX)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # port
  for _ in $(seq 1 100); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# Runs every test of one suite file against one port, each in a process of its own (the suite's
# setUpClass cleans the broker's state before each), bounded by TEST_TIMEOUT seconds: a few
# tests block forever on some brokers (test_flow_control1 reads a socket without a timeout).
# Prints "passed/total|failing tests". The suites read the port from the command line and then
# hand the whole command line to unittest, which refuses `-p`: they run with unittest's
# arguments replaced by the one test's name.
run_suite() { # name file port
  local dir="$work/$1" passed=0 total=0 failed="" test status
  mkdir -p "$dir"
  for test in $(sed -n 's/^    def \(test[a-zA-Z0-9_]*\)(.*/\1/p' "$suite/$2"); do
    total=$((total + 1))
    status=0
    (cd "$suite" && timeout "$test_timeout" python3 - "$2" "$test" -p "$3" <<'PY') \
      > "$dir/$test.log" 2>&1 || status=$?
import runpy, sys, unittest
main = unittest.main
test = sys.argv.pop(2)
unittest.main = lambda *args, **kwargs: main(*args, argv=["paho", "Test." + test], **kwargs)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
PY
    if [ "$status" = 0 ] && grep -q '^OK' "$dir/$test.log"; then
      passed=$((passed + 1))
    elif [ "$status" = 124 ]; then
      failed="$failed $test(timeout)"
    else
      failed="$failed $test"
    fi
  done
  echo "$passed/$total|${failed# }"
}

# Two instances of each broker: the 3.1.1 suite runs against the defaults, the MQTT 5 suite
# against a maximum keep-alive of 60 s (`test_server_keep_alive` expects that Server Keep Alive
# in its CONNACK). Apart, because 3.1.1 has no way to lower a client's keep-alive: both brokers
# refuse a 3.1.1 CONNECT beyond the maximum, or with 0, which the 3.1.1 suite's clean-up sends.
# Fleetbeat: open mode, no /metrics, no JSON mirror, each in a directory of its own (the
# journal file); mosquitto: anonymous, one listener for both versions.
start_fleetbeat() { # name port_v4 port_v5 extra-args...
  local name=$1 v4=$2 v5=$3
  shift 3
  mkdir -p "$work/$name"
  (cd "$work/$name" && RUST_LOG=${RUST_LOG:-warn} exec "$BROKER" --listen "127.0.0.1:$v4" \
    --listen-v5 "127.0.0.1:$v5" --metrics-listen off --json-mirror false "$@") \
    > "$work/$name.log" 2>&1 &
  pids+=($!)
}
start_mosquitto() { # name port extra-config
  printf 'listener %s 127.0.0.1\nallow_anonymous true\n%s' "$2" "$3" > "$work/$1.conf"
  "$mosquitto" -c "$work/$1.conf" > "$work/$1.log" 2>&1 &
  pids+=($!)
}
fb4=$(free_port)
fb5=$(free_port)
fb5_v4=$(free_port)
fb5_v5=$(free_port)
mq=$(free_port)
mq5=$(free_port)
start_fleetbeat fleetbeat-broker "$fb4" "$fb5"
start_fleetbeat fleetbeat-broker-max-keep-alive "$fb5_v4" "$fb5_v5" --max-keep-alive-secs 60
start_mosquitto mosquitto "$mq" ""
start_mosquitto mosquitto-max-keep-alive "$mq5" "max_keepalive 60"$'\n'
for port in "$fb4" "$fb5" "$fb5_v4" "$fb5_v5" "$mq" "$mq5"; do
  wait_port "$port"
done

fb_v4=$(run_suite fleetbeat-3.1.1 client_test.py "$fb4")
mq_v4=$(run_suite mosquitto-3.1.1 client_test.py "$mq")
fb_v5=$(run_suite fleetbeat-5 client_test5.py "$fb5_v5")
mq_v5=$(run_suite mosquitto-5 client_test5.py "$mq5")

version=$({ "$mosquitto" -h 2>/dev/null || true; } | sed -n 's/^mosquitto version \([^ ]*\).*/\1/p' | head -1)
echo
echo "| suite | broker | passed | failing tests |"
echo "|---|---|---|---|"
row() { echo "| $1 | $2 | ${3%%|*} | ${3#*|} |"; }
row "MQTT 3.1.1 (client_test.py)" "Fleetbeat" "$fb_v4"
row "MQTT 3.1.1 (client_test.py)" "mosquitto ${version:-?}" "$mq_v4"
row "MQTT 5 (client_test5.py)" "Fleetbeat" "$fb_v5"
row "MQTT 5 (client_test5.py)" "mosquitto ${version:-?}" "$mq_v5"
echo
echo "suite paho.mqtt.testing $(git -C "$paho" rev-parse --short HEAD 2>/dev/null || echo '?'); logs in $work"
