#!/usr/bin/env bash
# BENCHMARKS.md in one command: runs every benchmark the document shows, each with the load
# average of the machine before and after it, and writes BENCHMARKS.md from
# bench/BENCHMARKS.in.md (the prose) and the runs' output (the figures).
#
#   bench/report.sh                    # every section: about 40 minutes on 2 cores, after the builds
#   bench/report.sh events page        # only these sections; the others keep their last run
#   bench/report.sh --assemble         # only write BENCHMARKS.md from the kept runs
#   bench/report.sh --list             # the sections
#
# Every section's output is kept in target/bench-report/SECTION.md (REPORT_DIR to change it)
# with the commit, the time and the load it ran at, so BENCHMARKS.md can be assembled from
# runs of several invocations and says for each section when and on what it ran. A section
# with no kept run (a fresh clone, another machine) keeps what BENCHMARKS.md has between the
# section's markers (`<!-- section NAME -->`), so running some sections never blanks the
# others. A section that fails keeps its last good output and the script goes on; it exits
# non-zero at the end.
#
# Needs what the benchmarks need: Debian's mosquitto, redis-server, chromium, valgrind and
# PostgreSQL 15 (`initdb`, `pg_ctl`), node 20 with npm, curl, python3; run as root or as a
# user that may `runuser -u postgres` like the tests (see .ci/run). Builds the release
# binaries first (and the DHAT build of the bridge in target/dhat for `allocations`).
# Run it on a quiet machine: other work shows in every latency tail.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
report_dir=${REPORT_DIR:-$root/target/bench-report}
template=$root/bench/BENCHMARKS.in.md
# The release programs the sections run (copies; see main), and that directory as shown.
bin=$report_dir/bin
shown=${bin#"$root"/}
sections=(broker store events idle geofence device-sim end-to-end stages profile cluster allocations page)

usage() {
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
}

# One line: the 1, 5 and 15 minute load averages.
load() { cut -d' ' -f1-3 /proc/loadavg; }

# The CPU's model name.
cpu() { grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'; }

# The section's commands print their markdown on stdout; what goes to stderr is the log.
section_broker() {
  echo '```sh'
  echo 'cargo bench --locked -p broker --bench broker-bench'
  echo '```'
  echo
  cargo bench --locked -p broker --bench broker-bench
}

section_store() {
  echo '```sh'
  echo 'FLEETBEAT_BENCH_PG=1 cargo bench --locked -p bridge --no-default-features --bench store'
  echo '```'
  FLEETBEAT_BENCH_PG=1 cargo bench --locked -p bridge --no-default-features --bench store
}

section_events() {
  echo '```sh'
  echo "$shown/eventbench --no-build --vehicles 64,256 --events-per-vehicle 600"
  echo "$shown/eventbench --no-build --store postgres --vehicles 64 --events-per-vehicle 600 --no-control"
  echo '```'
  echo
  "$bin"/eventbench --no-build --vehicles 64,256 --events-per-vehicle 600 || return
  echo
  "$bin"/eventbench --no-build --store postgres --vehicles 64 --events-per-vehicle 600 \
    --no-control
}

section_idle() {
  echo '```sh'
  echo "BIN=$shown bench/idle.sh 32000 30"
  echo '```'
  echo
  BIN="$bin" bench/idle.sh 32000 30
}

section_geofence() {
  echo '```sh'
  echo 'cargo bench --locked -p bridge --no-default-features --bench geofence'
  echo '```'
  echo
  cargo bench --locked -p bridge --no-default-features --bench geofence
}

section_device-sim() {
  echo '```sh'
  echo "$shown/sim-bench --vehicles 10000 --rate 1"
  echo '```'
  echo
  # The per-phase lines and the summary are plain text: keep them apart from the table.
  "$bin"/sim-bench --vehicles 10000 --rate 1 | awk '
    /^\|/ { if (text) { print "```"; text = 0 } print; next }
    NF == 0 { if (text) { print "```"; text = 0 } print; next }
    { if (!text) { print "```text"; text = 1 } print }
    END { if (text) print "```" }'
}

section_end-to-end() {
  echo '```sh'
  echo "$shown/loadbench --no-build --report --repeat 2 --settle-max 60"
  echo '```'
  echo
  "$bin"/loadbench --no-build --report --repeat 2 --settle-max 60
}

section_stages() {
  echo '```sh'
  echo "$shown/loadbench --no-build --stages --vehicles 10000 --rate 1 --duration 20 --settle-max 60"
  echo '```'
  echo
  "$bin"/loadbench --no-build --stages --vehicles 10000 --rate 1 --duration 20 \
    --settle-max 60
}

# `perf report`'s lines ("  12.34%  name") as the rows of a markdown table, the first $2.
perf_rows() {
  perf report -i "$1" --no-children --stdio -q --sort "$3" 2>/dev/null |
    awk -v most="$2" 'NF >= 2 && n < most {
      pct = $1; $1 = ""; name = substr($0, 2); n++
      if (length(name) > 140) name = substr(name, 1, 137) "..."
      printf "| `%s` | %s |\n", name, pct }'
}

# A profile given up half-way: stops its loadbench (which stops its programs on SIGINT) so
# that nothing of it runs beside the next section, and removes its files.
profile_abandon() {
  kill -INT "$1" 2>/dev/null
  wait "$1" 2>/dev/null
  cat "$2/loadbench.log" >&2
  rm -rf "$2"
}

section_profile() {
  local lb pid data rate before after cpu
  data=$(mktemp -d)
  echo '```sh'
  echo "$shown/loadbench --no-build --stack fleetbeat --vehicles 10000 --rate 1 --duration 50 --settle-max 60 &"
  echo '# once loadbench prints "measuring": 20 s of samples, then 20 s with call graphs'
  echo "perf record -F 999 -p \"\$(pgrep -n -f $shown/bridge)\" -o perf.data -- sleep 20"
  echo "perf record -F 499 --call-graph dwarf,16384 -p \"\$(pgrep -n -f $shown/bridge)\" -o stages.data -- sleep 20"
  echo 'perf report -i perf.data --no-children --stdio --sort comm    # then dso, then sym'
  echo '# CPU: utime + stime of the bridge process in s, during the first perf record (/proc/PID/stat)'
  echo 'perf script -i stages.data -F comm,tid,period,ip,sym | bench/profile-stages.py --rate 10000 --cpu-seconds CPU --seconds 20'
  echo '```'
  echo
  "$bin"/loadbench --no-build --stack fleetbeat --vehicles 10000 --rate 1 \
    --duration 50 --settle-max 60 > "$data/loadbench.md" 2> "$data/loadbench.log" &
  lb=$!
  until grep -qs 'loadbench: measuring' "$data/loadbench.log"; do
    kill -0 "$lb" 2>/dev/null || { cat "$data/loadbench.log" >&2; return 1; }
    sleep 1
  done
  pid=$(pgrep -n -f "^$bin/bridge ") ||
    { echo "no bridge process" >&2; profile_abandon "$lb" "$data"; return 1; }
  # The process's CPU time (utime + stime, clock ticks) over the 20 s without call graphs.
  before=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
  perf record -F 999 -p "$pid" -o "$data/perf.data" -- sleep 20 >&2 2>&1 ||
    { profile_abandon "$lb" "$data"; return 1; }
  after=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
  perf record -F 499 --call-graph dwarf,16384 -p "$pid" -o "$data/stages.data" \
    -- sleep 20 >&2 2>&1 || { profile_abandon "$lb" "$data"; return 1; }
  wait "$lb" || { cat "$data/loadbench.log" >&2; return 1; }
  cat "$data/loadbench.md" >&2
  echo "The bridge process (embedded broker and bridge) during loadbench's measured window of:"
  echo
  grep -E '^\| (heartbeats/s|latency p99|broker\+bridge CPU)' "$data/loadbench.md" |
    sed '1i | figure | Fleetbeat |\n|---|---|'
  echo
  echo '#### By stage'
  echo
  rate=$(awk -F'|' '$2 ~ /heartbeats\/s ingested/ { gsub(/ /, "", $3); print $3; exit }' \
    "$data/loadbench.md")
  cpu=$(awk -v t="$(( after - before ))" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }')
  echo "Shares from the 20 s with call graphs; CPU µs per heartbeat: that share of the process's"
  echo "$cpu s of CPU time in the 20 s before them (without call graphs), at the $rate heartbeats/s"
  echo "ingested of the window."
  echo
  perf script -i "$data/stages.data" -F comm,tid,period,ip,sym 2>/dev/null |
    python3 "$root/bench/profile-stages.py" --rate "$rate" --cpu-seconds "$cpu" \
      --seconds 20 || return 1
  echo
  echo '#### By thread'
  echo
  echo '| thread | share of the samples |'
  echo '|---|---:|'
  perf_rows "$data/perf.data" 12 comm
  echo
  echo '#### By binary'
  echo
  echo '| binary | share |'
  echo '|---|---:|'
  perf_rows "$data/perf.data" 8 dso
  echo
  echo '#### The 30 functions with the most samples'
  echo
  echo '| function | share |'
  echo '|---|---:|'
  perf_rows "$data/perf.data" 30 sym
  rm -rf "$data"
}

section_cluster() {
  local one two
  one=$(mktemp)
  two=$(mktemp)
  echo '```sh'
  echo "$shown/loadbench --no-build --stack fleetbeat --bridges 1 --cluster-engines --vehicles 2000 --rate 1 --duration 20 --settle-max 60"
  echo "$shown/loadbench --no-build --stack fleetbeat --bridges 2 --vehicles 2000 --rate 1 --duration 20 --settle-max 60"
  echo '```'
  echo
  "$bin"/loadbench --no-build --stack fleetbeat --bridges 1 --cluster-engines \
    --vehicles 2000 --rate 1 --duration 20 --settle-max 60 > "$one" || return
  "$bin"/loadbench --no-build --stack fleetbeat --bridges 2 \
    --vehicles 2000 --rate 1 --duration 20 --settle-max 60 > "$two" || return
  # The two runs' figures side by side, and two bridges ÷ one.
  echo '| figure | 1 bridge | 2 bridges | 2 bridges / 1 |'
  echo '|---|---:|---:|---:|'
  awk -F'|' '
    function trim(s) { gsub(/^ +| +$/, "", s); return s }
    function number(s) { gsub(/ /, "", s); return s ~ /^-?[0-9]+(\.[0-9]+)?$/ }
    NF == 4 && trim($2) != "figure" && $2 !~ /^-+$/ {
      label = trim($2); value = trim($3)
      if (FNR == NR) { if (!(label in first)) { first[label] = value; order[++n] = label } }
      else second[label] = value
    }
    END {
      for (i = 1; i <= n; i++) {
        l = order[i]; a = first[l]; b = (l in second) ? second[l] : "–"; r = "–"
        x = a; y = b; gsub(/ /, "", x); gsub(/ /, "", y)
        if (number(a) && number(b) && x + 0 != 0) r = sprintf("%.2f×", y / x)
        printf "| %s | %s | %s | %s |\n", l, a, b, r
      }
    }' "$one" "$two"
  echo
  echo '#### 1 bridge'
  grep -v '^|' "$one"
  echo '#### 2 bridges'
  grep -v '^|' "$two"
  rm -f "$one" "$two"
}

section_allocations() {
  echo '```sh'
  echo 'CARGO_TARGET_DIR=target/dhat cargo build --release --locked -p bridge --features system-allocator'
  echo 'CARGO_TARGET_DIR=target/dhat cargo build --release --locked -p device-sim'
  echo 'BIN=target/dhat/release SITES=1 bench/alloc-per-heartbeat.sh 10 30'
  echo '```'
  echo
  echo '```text'
  BIN=target/dhat/release SITES=1 bench/alloc-per-heartbeat.sh 10 30 || return
  echo '```'
}

section_page() {
  local out
  echo '```sh'
  echo 'cargo test --release --locked -p tests --test page_dispatcher page_alone -- --ignored --nocapture'
  echo '```'
  echo
  # The test prints its FRAME TIMES line on stderr.
  out=$(cargo test --release --locked -p tests --test page_dispatcher page_alone -- --ignored \
    --nocapture 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
  printf '%s\n' "$out" >&2
  printf '%s\n' "$out" | grep '^FRAME TIMES' || { echo "no FRAME TIMES line" >&2; return 1; }
}

# Runs one section into $report_dir/NAME.md (kept only when the section succeeded).
run_section() {
  local name=$1 before after started took rc commit body
  body=$(mktemp)
  commit=$(git rev-parse --short HEAD)
  # Documents do not change what is measured; code does.
  git diff --quiet HEAD -- . ':!*.md' || commit="$commit + uncommitted changes"
  before=$(load)
  started=$(date +%s)
  echo "bench/report.sh: $name (load $before) ..." >&2
  "section_$name" > "$body" 2> "$report_dir/$name.log"
  rc=$?
  after=$(load)
  took=$(($(date +%s) - started))
  if [ "$rc" -ne 0 ]; then
    echo "bench/report.sh: $name FAILED (exit $rc after $took s), log: $report_dir/$name.log" >&2
    rm -f "$body"
    return 1
  fi
  {
    printf '_Run %s, commit `%s`, %s s; load average (1, 5, 15 min) %s before, %s after, on %s CPUs (%s)._\n\n' \
      "$(date -u '+%Y-%m-%d %H:%M UTC')" "$commit" "$took" "$before" "$after" "$(nproc)" "$(cpu)"
    # The benchmarks' own headings sit below the section's (not the comments in code blocks).
    awk '/^```/ { code = !code } !code && /^##?#? / { sub(/^#+/, "####") } { print }' "$body"
  } > "$report_dir/$name.md"
  rm -f "$body"
  echo "bench/report.sh: $name done in $took s" >&2
}

# BENCHMARKS.md from the template: `@machine` becomes the machine's description, `@section
# NAME` the kept run of NAME between two markers. A section with no kept run here (a fresh
# clone, another machine) keeps what BENCHMARKS.md has between its markers, or says it has not
# run.
assemble() {
  local line name out=$root/BENCHMARKS.md.tmp old=$root/BENCHMARKS.md
  while IFS= read -r line; do
    case $line in
      @machine)
        printf 'Assembled %s on: %s, %s CPUs, %s GiB; %s; %s.\n' \
          "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(cpu)" "$(nproc)" \
          "$(awk '/MemTotal/ {printf "%.0f", $2 / 1048576}' /proc/meminfo)" \
          "$(. /etc/os-release && echo "$PRETTY_NAME")" "$(rustc --version | cut -d' ' -f1-2)"
        ;;
      "@section "*)
        name=${line#@section }
        printf '<!-- section %s -->\n' "$name"
        if [ -f "$report_dir/$name.md" ]; then
          cat "$report_dir/$name.md"
        elif grep -qx -- "<!-- section $name -->" "$old" 2>/dev/null; then
          awk -v start="<!-- section $name -->" -v end="<!-- /section $name -->" \
            '$0 == end { inside = 0 } inside { print } $0 == start { inside = 1 }' "$old"
        else
          printf '_Not run yet: `bench/report.sh %s`._\n' "$name"
        fi
        printf '<!-- /section %s -->\n' "$name"
        ;;
      *) printf '%s\n' "$line" ;;
    esac
  done < "$template" > "$out" && mv "$out" "$root/BENCHMARKS.md"
  echo "bench/report.sh: wrote BENCHMARKS.md" >&2
}

main() {
  local chosen=() name failed=0
  case ${1:-} in
    -h | --help) usage; return 0 ;;
    --list) printf '%s\n' "${sections[@]}"; return 0 ;;
    --assemble) mkdir -p "$report_dir"; assemble; return ;;
  esac
  for name in "$@"; do
    printf '%s\n' "${sections[@]}" | grep -qx -- "$name" ||
      { echo "bench/report.sh: unknown section $name (--list)" >&2; return 2; }
    chosen+=("$name")
  done
  [ ${#chosen[@]} -gt 0 ] || chosen=("${sections[@]}")
  mkdir -p "$report_dir"
  ulimit -n 20000 || { echo "bench/report.sh: cannot raise the open files limit" >&2; return 1; }
  echo "bench/report.sh: building the release binaries" >&2
  # The benches and the page's test too, so no section's time or load includes a build.
  cargo bench --locked --no-run -p broker --bench broker-bench >&2 || return 1
  cargo bench --locked --no-run -p bridge --no-default-features --bench store --bench geofence \
    >&2 || return 1
  cargo test --release --locked --no-run -p tests --test page_dispatcher >&2 || return 1
  # The programs as a user builds them, copied apart: `cargo bench` and `cargo test` build the
  # packages' binaries with their own features into target/release too (the bridge without its
  # default features, for one), and the sections run them in between.
  cargo build --release --locked -p bridge -p broker -p device-sim -p tests >&2 || return 1
  rm -rf "$bin" && mkdir -p "$bin" || return 1
  for name in bridge broker device-sim sim-bench loadbench eventbench; do
    cp "target/release/$name" "$bin/" || return 1
  done
  (cd bench/baseline && npm ci --silent >&2) || return 1
  if printf '%s\n' "${chosen[@]}" | grep -qx allocations; then
    CARGO_TARGET_DIR=target/dhat cargo build --release --locked -p bridge \
      --features system-allocator >&2 || return 1
    CARGO_TARGET_DIR=target/dhat cargo build --release --locked -p device-sim >&2 || return 1
  fi
  for name in "${chosen[@]}"; do
    run_section "$name" || failed=1
  done
  assemble
  return "$failed"
}

main "$@"
