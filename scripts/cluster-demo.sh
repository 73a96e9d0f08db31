#!/usr/bin/env bash
# Fleetbeat cluster demo (issue #15, docs/scaling.md): one command starts
#   mosquitto (MQTT, shared subscriptions)       127.0.0.1:${MQTT_PORT:-18830}
#   redis-server (Socket.IO adapter, vehicle state) 127.0.0.1:${REDIS_PORT:-16379}
#   PostgreSQL (the store; initdb in a temp dir)  127.0.0.1:${PG_PORT:-15432}
#   bridge-1 and bridge-2 (one shared-subscription group "demo")
#                                                 http://127.0.0.1:8081 and http://127.0.0.1:8082
#   device-sim with ${VEHICLES:-200} vehicles
# and prints both dispatcher URLs. Ctrl-C (or SIGTERM) stops everything and removes the
# temporary directory; nothing is left running.
#
# Ports are fixed (the defaults above) so that the URLs are always the same; override them
# with the environment variables MQTT_PORT, REDIS_PORT, PG_PORT, HTTP_PORT_1, HTTP_PORT_2.
# The script refuses to start if one is taken. It never touches the system services on
# 1883/6379/5432.
#
# Needs: cargo, mosquitto, redis-server, PostgreSQL's initdb/pg_ctl (Debian: apt-get install -y
# mosquitto redis-server postgresql), curl. As root, PostgreSQL runs as the `postgres` user.
# PROFILE=debug uses debug binaries (faster to build) instead of release ones; BIN_DIR=DIR
# uses the binaries already in DIR (no build); KEEP_LOGS=1 keeps the temporary directory (its
# logs) after the end.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE="${PROFILE:-release}"
VEHICLES="${VEHICLES:-200}"
MQTT_PORT="${MQTT_PORT:-18830}"
REDIS_PORT="${REDIS_PORT:-16379}"
PG_PORT="${PG_PORT:-15432}"
HTTP_PORT_1="${HTTP_PORT_1:-8081}"
HTTP_PORT_2="${HTTP_PORT_2:-8082}"
GROUP="demo"

say() { printf 'cluster-demo: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found ($2)"; }
need cargo "install Rust: https://rustup.rs"
need mosquitto "apt-get install -y mosquitto"
need redis-server "apt-get install -y redis-server"
need redis-cli "apt-get install -y redis-tools"
need curl "apt-get install -y curl"

# PostgreSQL's programs: on PATH, or in Debian's versioned directory.
PG_BIN=""
if command -v initdb >/dev/null 2>&1; then
    PG_BIN="$(dirname "$(command -v initdb)")"
else
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/initdb" ] && PG_BIN="$dir"
    done
fi
[ -n "$PG_BIN" ] || die "initdb not found (apt-get install -y postgresql)"

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$MQTT_PORT" "$REDIS_PORT" "$PG_PORT" "$HTTP_PORT_1" "$HTTP_PORT_2"; do
    if port_taken "$port"; then
        die "port $port is taken (set MQTT_PORT, REDIS_PORT, PG_PORT, HTTP_PORT_1 or HTTP_PORT_2)"
    fi
done

# The binaries, built once (not `cargo run` per process: Ctrl-C must reach the programs
# themselves, and one build is enough), unless BIN_DIR names a directory that holds them.
if [ -n "${BIN_DIR:-}" ]; then
    BIN="$BIN_DIR"
else
    if [ "$PROFILE" = release ]; then
        say "building bridge and device-sim (release; PROFILE=debug is faster to build)"
        (cd "$ROOT" && cargo build --release -p bridge -p device-sim --bins)
    else
        say "building bridge and device-sim ($PROFILE)"
        (cd "$ROOT" && cargo build -p bridge -p device-sim --bins)
    fi
    TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
    case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
    BIN="$TARGET_DIR/$PROFILE"
fi
[ -x "$BIN/bridge" ] && [ -x "$BIN/device-sim" ] || die "no bridge and device-sim in $BIN"

WORK="$(mktemp -d -t fleetbeat-cluster-demo.XXXXXX)"
chmod 755 "$WORK"
PIDS=()          # our background processes, stopped in reverse order
SLEEPER=""       # the main loop's current `sleep`
PG_STARTED=""
AS_PG=()
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the postgres user (apt-get install -y postgresql)"
    AS_PG=(runuser -u postgres --)
fi

# Every program runs in a session of its own (setsid): Ctrl-C in the terminal reaches only
# this script, which stops them in order (a bridge must shut down before MQTT, Redis and
# PostgreSQL do).
STOPPING=""
stop_all() {
    [ -n "$STOPPING" ] && return
    STOPPING=1
    trap - INT TERM
    say "stopping"
    [ -n "$SLEEPER" ] && kill "$SLEEPER" 2>/dev/null || true
    local i pid
    # In reverse order of start, each one gone before the next: the devices, the bridges
    # (which shut down gracefully while MQTT, Redis and PostgreSQL are still there), then the
    # engines. Whatever does not stop within 10 s of SIGTERM is killed.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[$i]}"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$PG_STARTED" ]; then
        "${AS_PG[@]}" "$PG_BIN/pg_ctl" stop -D "$WORK/pg" -m fast -w >/dev/null 2>&1 ||
            "${AS_PG[@]}" "$PG_BIN/pg_ctl" stop -D "$WORK/pg" -m immediate -w >/dev/null 2>&1 || true
    fi
    if [ -n "${KEEP_LOGS:-}" ]; then
        say "logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    say "stopped"
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap 'stop_all' EXIT

# Waits (up to 30 s) until "$@" succeeds; $1 of the message says what.
wait_until() {
    local what="$1"
    shift
    for _ in $(seq 300); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what did not come up within 30 s (logs in $WORK; KEEP_LOGS=1 keeps them)"
}

# --- PostgreSQL ----------------------------------------------------------------------------
say "PostgreSQL on 127.0.0.1:$PG_PORT"
mkdir -p "$WORK/pg"
[ "${#AS_PG[@]}" -gt 0 ] && chown postgres "$WORK/pg"
"${AS_PG[@]}" "$PG_BIN/initdb" -D "$WORK/pg" -A trust -U postgres --no-sync >"$WORK/initdb.log" 2>&1 ||
    die "initdb failed: $(tail -5 "$WORK/initdb.log")"
PG_STARTED=1
setsid "${AS_PG[@]}" "$PG_BIN/pg_ctl" start -D "$WORK/pg" -w -t 30 -l "$WORK/pg/postgres.log" \
    -o "-p $PG_PORT -k $WORK/pg -c listen_addresses=127.0.0.1" >/dev/null ||
    die "PostgreSQL did not start: $(tail -5 "$WORK/pg/postgres.log")"
STORE="postgres://postgres@127.0.0.1:$PG_PORT/postgres"

# --- Redis ---------------------------------------------------------------------------------
say "redis-server on 127.0.0.1:$REDIS_PORT"
setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" --daemonize no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_until "redis-server" redis-cli -p "$REDIS_PORT" ping
REDIS_URL="redis://127.0.0.1:$REDIS_PORT"

# --- mosquitto -----------------------------------------------------------------------------
say "mosquitto on 127.0.0.1:$MQTT_PORT"
cat >"$WORK/mosquitto.conf" <<EOF
# Written by scripts/cluster-demo.sh.
persistence false
log_dest stderr
# The bridges' persistent sessions keep the QoS 1 messages dealt to a bridge that is down
# (shared subscription): hold more than the default 1000 per client.
max_queued_messages 1000000
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
EOF
setsid mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
PIDS+=($!)
wait_until "mosquitto" port_taken "$MQTT_PORT"
MQTT_URL="mqtt://127.0.0.1:$MQTT_PORT"

# --- two bridges ---------------------------------------------------------------------------
for n in 1 2; do
    port_var="HTTP_PORT_$n"
    port="${!port_var}"
    say "bridge-$n on http://127.0.0.1:$port"
    RUST_LOG="${RUST_LOG:-info}" setsid "$BIN/bridge" --client-id "bridge-$n" --shared-group "$GROUP" \
        --redis-url "$REDIS_URL" --store "$STORE" --mqtt-url "$MQTT_URL" \
        --listen "127.0.0.1:$port" >"$WORK/bridge-$n.log" 2>&1 &
    PIDS+=($!)
done
for n in 1 2; do
    port_var="HTTP_PORT_$n"
    wait_until "bridge-$n" curl -fsS "http://127.0.0.1:${!port_var}/readyz"
done

# --- devices -------------------------------------------------------------------------------
say "device-sim with $VEHICLES vehicles"
setsid "$BIN/device-sim" --broker "$MQTT_URL" --vehicles "$VEHICLES" >"$WORK/device-sim.log" 2>&1 &
PIDS+=($!)

cat <<EOF

Fleetbeat cluster is up: mosquitto $MQTT_URL, Redis $REDIS_URL, PostgreSQL $STORE
  dispatcher on bridge-1: http://127.0.0.1:$HTTP_PORT_1/
  dispatcher on bridge-2: http://127.0.0.1:$HTTP_PORT_2/
Logs: $WORK (bridge-1.log, bridge-2.log, device-sim.log, mosquitto.log, redis.log, pg/postgres.log)
Press Ctrl-C to stop everything.

EOF

# Runs until interrupted, or until one of the programs dies (then everything stops).
while true; do
    for pid in "${PIDS[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            say "a program exited (pid $pid); see the logs in $WORK"
            KEEP_LOGS=1
            exit 1
        fi
    done
    sleep 1 &
    SLEEPER=$!
    wait "$SLEEPER" || true
done
