#!/usr/bin/env python3
"""What clients that come and go leave behind in the broker: its resident memory (VmRSS)
while waves of short-lived MQTT 3.1.1 clients, each under a client id never used before,
connect and disconnect, one after the other, over loopback.

    broker-churn.py [--waves 3] [--per-wave 20000] BROKER [BASELINE_BROKER]

Three workloads, each on a fresh broker (open mode, ephemeral port, no MQTT 5 listener,
metrics off):

- tools: a clean session subscribing to one wildcard filter (`test/#`), as `mosquitto_sub`
  with its random client id does; what rumqttd's router remembers of each client id;
- sessions: the same with a persistent session (clean session off): the sessions the broker
  keeps (`max_persistent_sessions`);
- cycled: each id connects with a persistent session, then again with a clean one, which
  discards the session (what the router keeps of the id after that);
- filters: 200 connections a wave, each subscribing to 100 filters nobody used before in one
  SUBSCRIBE: the commit logs the router keeps (`max_filters`).

Prints the RSS before and after each wave, and with a second broker binary, the same for it
and the ratio of the growth (last wave's RSS less the start's) of BROKER to BASELINE_BROKER.
Needs nothing beyond python3; the brokers are the release `broker` binaries to compare.
"""
import argparse
import os
import socket
import struct
import subprocess
import tempfile
import time


def enc_len(n):
    out = b""
    while True:
        digit, n = n % 128, n // 128
        out += bytes([digit | (0x80 if n else 0)])
        if not n:
            return out


def string(text):
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def packet(first, body):
    return bytes([first]) + enc_len(len(body)) + body


def read_packet(sock):
    first = sock.recv(1)
    if not first:
        raise EOFError("the broker closed the connection")
    mult, length = 1, 0
    while True:
        byte = sock.recv(1)[0]
        length += (byte & 127) * mult
        mult *= 128
        if not byte & 128:
            break
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return first[0], body


def client(port, client_id, filters, persistent):
    """One client: CONNECT, SUBSCRIBE `filters` (if accepted), DISCONNECT. Returns
    (accepted, filters granted)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        flags = 0x00 if persistent else 0x02
        sock.sendall(packet(0x10, string("MQTT") + bytes([4, flags]) + struct.pack(">H", 30)
                            + string(client_id)))
        kind, body = read_packet(sock)
        assert kind == 0x20, f"CONNACK expected, got {kind:#x}"
        if body[1] != 0:
            return False, 0
        sub = struct.pack(">H", 1) + b"".join(string(f) + b"\x00" for f in filters)
        sock.sendall(packet(0x82, sub))
        kind, body = read_packet(sock)
        assert kind == 0x90, f"SUBACK expected, got {kind:#x}"
        sock.sendall(bytes([0xE0, 0]))
        return True, sum(1 for code in body[2:] if code < 0x80)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_listening(port, proc):
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the broker does not listen")


def run(broker, workload, waves, per_wave, logs):
    port = free_port()
    log = open(os.path.join(logs, f"{os.path.basename(broker)}-{workload}.log"), "w")
    # A directory of its own: the broker keeps its journal in the working directory.
    workdir = tempfile.mkdtemp(prefix=f"{workload}.", dir=logs)
    proc = subprocess.Popen([os.path.abspath(broker), "--listen", f"127.0.0.1:{port}",
                             "--no-v5", "--metrics-listen", "off"],
                            stdout=log, stderr=log, cwd=workdir)
    try:
        wait_listening(port, proc)
        readings, notes = [rss_kib(proc.pid)], []
        for wave in range(waves):
            started, refused, granted = time.time(), 0, 0
            if workload == "filters":
                for c in range(per_wave // 100):
                    ok, n = client(port, f"f{wave}-{c}",
                                   [f"f/{wave}/{c}/{k}" for k in range(100)], False)
                    refused += not ok
                    granted += n
                note = f"{granted} of {per_wave} filters granted"
            elif workload == "cycled":
                for c in range(per_wave):
                    ok, _ = client(port, f"cycled-{wave}-{c}", ["test/#"], True)
                    refused += not ok
                    client(port, f"cycled-{wave}-{c}", ["test/#"], False)
                note = f"{refused} of {per_wave} refused"
            else:
                for c in range(per_wave):
                    ok, _ = client(port, f"{workload}-{wave}-{c}", ["test/#"],
                                   workload == "sessions")
                    refused += not ok
                note = f"{refused} of {per_wave} refused"
            readings.append(rss_kib(proc.pid))
            notes.append(f"{note}, {time.time() - started:.1f} s")
        return readings, notes
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--per-wave", type=int, default=20000)
    parser.add_argument("broker")
    parser.add_argument("baseline", nargs="?")
    args = parser.parse_args()
    logs = tempfile.mkdtemp(prefix="broker-churn.")
    brokers = [args.broker] + ([args.baseline] if args.baseline else [])
    print("| workload | broker | RSS MiB: start, then after each wave | growth MiB | each wave |")
    print("|---|---|---|--:|---|")
    for workload in ("tools", "sessions", "cycled", "filters"):
        growth = {}
        for broker in brokers:
            readings, notes = run(broker, workload, args.waves, args.per_wave, logs)
            growth[broker] = (readings[-1] - readings[0]) / 1024
            mib = ", ".join(f"{r / 1024:.1f}" for r in readings)
            print(f"| {workload} | `{broker}` | {mib} | {growth[broker]:.1f} | "
                  f"{'; '.join(notes)} |")
        if args.baseline and growth[args.baseline] > 0:
            print(f"| {workload} | ratio | | {growth[args.broker] / growth[args.baseline]:.2f}× "
                  f"the baseline's growth | |")
    print(f"\n{args.waves} waves of {args.per_wave} client ids each; broker logs in {logs}")


if __name__ == "__main__":
    main()
