#!/usr/bin/env python3
"""What each stage of a heartbeat's way costs, from a call-graph profile of the bridge process.

Reads `perf script -F comm,tid,period,ip,sym` of a `perf record --call-graph dwarf` of the
bridge (embedded broker and bridge) on stdin, gives each sample to one stage and prints a
markdown table: the share of the process's samples for every stage, and that share of the CPU
time the process used per heartbeat while it was not recording call graphs (unwinding costs
the profiled process CPU time of its own, spread over the stages like the samples are).

A sample's stage is found from its thread and its stack: walking from the sampled function out
towards the thread's start, the first frame a rule of the thread's list knows decides (so the
seal check's SHA-256 counts as the seal check, not as the ingest task around it). Frames the
rules name include inlined ones, whose names carry their task's type (`poll<bridge::server::
ticker...>`), so what no finer rule claims falls to its task. A sample no rule claims is the
runtime's own: the scheduler, epoll, timers, parking and waking threads.

Usage: perf script -i perf.data -F comm,tid,period,ip,sym | \
           bench/profile-stages.py --rate HEARTBEATS_PER_S --cpu-seconds CPU --seconds SECONDS
(CPU: the process's utime + stime over SECONDS of the same load, without call graphs.)
"""

import argparse
import re
import sys
from collections import defaultdict

# A thread's rules: [(stage, frame pattern), ...], the finer stages first where one frame
# could match two.
BROKER_FRONT_END = [
    ("broker: JSON mirror (re-encode, route json/...)", r"broker::mirror"),
    (
        "broker: hand-off to the router (links, channel, wake-up)",
        r"broker::router::|broker::mux::Mux::send|rumqttd::link::local::LinkTx|"
        r"Established::route\b|Established::route::",
    ),
    (
        "broker: socket write (acknowledgements, deliveries)",
        r"__send\b|__libc_send|writev|Network::flush|Network::write",
    ),
    (
        "broker: socket read, MQTT decode, checks (ACL, rate, topic)",
        r"__libc_recv|recvfrom|mio::net::tcp|Registration::(try_io|poll_read_ready|clear_readiness)|"
        r"broker::connection::network|rumqttd::protocol|broker::connection::inbound|"
        r"Established::rate_wait|broker::connection::rate|Identity::may_publish|shared::topic|"
        r"broker::qos|^on_publish\b|^on_packet\b",
    ),
    (
        "broker: connection loop (select, timers, cancellation, deliveries in)",
        r"broker::connection|broker::mux|cancellation_token",
    ),
]

BRIDGE = [
    (
        "bridge: seal check (SHA-256 MAC, key, replay window)",
        r"shared::seal|bridge::ingest::verify|sha2::|DeviceKeys::lookup|bridge::ingest::replay",
    ),
    ("bridge: geofences", r"bridge::geofence"),
    (
        "bridge: emit (batches built, serialised, written to dispatchers)",
        r"bridge::view|bridge::server::ticker|socketioxide|engineioxide|tungstenite|"
        r"Hub::take_tick_news|Fleet::take_moved|hyper",
    ),
    (
        "bridge: fleet update (latest position, state)",
        r"bridge::domain::hub::Hub::record|bridge::domain::fleet|bridge::domain::hub",
    ),
    ("bridge: history write (rows batched and bound)", r"bridge::store|sqlx"),
    (
        "bridge: intake (router link read, topic and postcard decode)",
        r"rumqttd::link::local::LinkRx|broker::local|bridge::ingest|shared::codec|shared::topic|"
        r"postcard",
    ),
]

# Thread name (as the kernel keeps it: 15 characters) -> (its part, for the runtime's row;
# its rules).
THREADS = {
    "fleetbeat-mqtt": ("broker front end", BROKER_FRONT_END),
    "tokio-rt-worker": ("bridge", BRIDGE),
}

# Threads whose every sample is one stage.
WHOLE_THREAD = {
    "router-0": "router: routing, commit logs, waking the readers",
    "sqlx-sqlite-wor": "history write: SQLite (SQL, WAL, fsync, checkpoints)",
}


def samples(lines):
    """(thread, period, [frames from the sampled function outwards]) for each sample."""
    comm, period, frames = None, 0, []
    for line in lines:
        if not line.strip():
            continue
        if line[0] not in " \t":
            if comm is not None:
                yield comm, period, frames
            fields = line.split()
            # `comm tid period`; a thread name may hold spaces, the last two fields are numbers.
            comm, period, frames = " ".join(fields[:-2]), int(fields[-1]), []
        else:
            parts = line.strip().split(None, 1)
            frames.append(parts[1] if len(parts) > 1 else "")
    if comm is not None:
        yield comm, period, frames


def classify(comm, frames, compiled):
    if comm in WHOLE_THREAD:
        return WHOLE_THREAD[comm]
    rules = compiled.get(comm)
    if rules is None:
        return f"other threads (`{comm}`)"
    for frame in frames:
        for stage, pattern in rules:
            if pattern.search(frame):
                return stage
    return f"runtime: scheduler, epoll, timers, wake-ups ({THREADS[comm][0]})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, required=True, help="heartbeats/s ingested")
    parser.add_argument(
        "--cpu-seconds", type=float, required=True, help="the process's CPU time over --seconds"
    )
    parser.add_argument("--seconds", type=float, required=True, help="seconds of that CPU time")
    args = parser.parse_args()

    compiled = {
        comm: [(stage, re.compile(pattern)) for stage, pattern in rules]
        for comm, (_, rules) in THREADS.items()
    }
    ns = defaultdict(int)
    count = defaultdict(int)
    total_ns = 0
    n = 0
    for comm, period, frames in samples(sys.stdin):
        stage = classify(comm, frames, compiled)
        ns[stage] += period
        count[stage] += 1
        total_ns += period
        n += 1
    if n == 0:
        sys.exit("profile-stages: no samples on stdin")
    if args.rate <= 0 or args.seconds <= 0:
        sys.exit("profile-stages: --rate and --seconds must be positive")
    us_per_heartbeat = args.cpu_seconds * 1e6 / (args.rate * args.seconds)

    print("| stage | share of the samples | CPU µs per heartbeat | samples |")
    print("|---|---:|---:|---:|")
    for stage in sorted(ns, key=lambda s: -ns[s]):
        share = ns[stage] / total_ns
        print(f"| {stage} | {100 * share:.1f}% | {share * us_per_heartbeat:.2f} | {count[stage]} |")
    print(f"| **the process** | 100% | **{us_per_heartbeat:.2f}** | {n} |")


if __name__ == "__main__":
    main()
