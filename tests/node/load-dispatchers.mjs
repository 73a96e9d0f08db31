// Several real socket.io-client dispatchers in one node process, for the load harness
// (tests/src/bin/loadbench/; see bench/README.md).
//
// Usage: node load-dispatchers.mjs '<config json>'
//   {url, namespace, token, room, clients, first, intervalMs, tickMs, slackMs}
// Each client is its own connection (forceNew, websocket only), joins `room` and counts the
// `position` events it receives: a batch (Fleetbeat) or a single object (the baseline).
//
// For every position: latency = receive time - ts_ms (the device clock; same machine), into a
// histogram shared by the process (0.1 ms buckets below 1 s, 1 ms buckets up to 60 s); and per
// vehicle the last seq seen. A gap of skipped seqs counts as lost beyond what coalescing may
// skip: floor((tickMs + slackMs) / intervalMs) heartbeats per gap (0 at 1 Hz with a 100 ms
// tick). The harness adds the tail: seqs sent after the last one a client received.
//
// stdin, one JSON object per line:       stdout, one JSON object per line:
//   {"op":"window-start"}                  {"type":"ready","clients":N}     (all joined)
//   {"op":"window-end"}                    {"type":"window",...}            (counts, histogram)
//   {"op":"report"}                        {"type":"report",...} then exit  (loss, last seqs)
//                                          {"type":"error","message":...}
import { performance } from "node:perf_hooks";
import { connect, out, readCommands } from "./harness.mjs";

const config = JSON.parse(process.argv[2] ?? "{}");
const { url, namespace, token, room, clients, first = 0 } = config;
const intervalMs = config.intervalMs ?? 1000;
const tickMs = config.tickMs ?? 100;
const slackMs = config.slackMs ?? 100;
if (!url || !namespace || !room || !clients) {
  console.error("usage: node load-dispatchers.mjs '{\"url\":...,\"namespace\":...,\"room\":...,\"clients\":N}'");
  process.exit(2);
}
// The devices stamp ts_ms with the wall clock, so latency is read on the wall clock too, at
// performance.now()'s resolution: `performance.timeOrigin` is the wall clock when the process
// started and does not follow a later step or slew of it (a VM's clock being corrected made
// every latency negative, i.e. 0, after a few minutes). Every second the offset is measured
// afresh at the edge of a wall-clock millisecond, which places it within a few microseconds.
let offset = 0;
function resync() {
  const start = Date.now();
  let wall = start;
  let mono = performance.now();
  // At most ~1 ms of spinning, once a second.
  while (wall === start) {
    mono = performance.now();
    wall = Date.now();
  }
  offset = wall - (performance.timeOrigin + mono);
}
resync();
setInterval(resync, 1000).unref();
const now = () => performance.timeOrigin + performance.now() + offset;

// Coalescing may replace this many consecutive heartbeats of one vehicle by a later one.
const allowedSkip = Math.floor((tickMs + slackMs) / intervalMs);
const lateMs = tickMs + slackMs;

const FINE = 10_000; // 0.1 ms buckets for 0 ..< 1000 ms
const HIST_LEN = FINE + 60_000; // then 1 ms buckets up to 61 s; the last bucket is overflow
let hist = new Float64Array(HIST_LEN);
let maxLatency = 0;
let late = 0;

function record(latency) {
  if (latency < 0) latency = 0;
  if (latency > maxLatency) maxLatency = latency;
  if (latency > lateMs) late++;
  const bucket = latency < 1000 ? Math.floor(latency * 10) : FINE + Math.floor(latency - 1000);
  hist[Math.min(bucket, HIST_LEN - 1)]++;
}

class Dispatcher {
  constructor(index) {
    this.index = index;
    this.positions = 0; // in the current window
    this.batches = 0;
    this.total = 0; // since start
    this.distinct = 0;
    this.duplicates = 0;
    this.gapLost = 0;
    this.windowGapLost = 0; // gaps found while the window is open
    this.inWindow = false;
    this.disconnects = 0;
    this.lastSeq = new Map();
    this.socket = connect(url, namespace, token ? { token } : undefined, {
      forceNew: true,
      reconnection: false,
    });
    this.socket.on("connect_error", (err) => out({ type: "error", message: `client ${index}: ${err.message}` }));
    this.socket.on("disconnect", (reason) => {
      this.disconnects++;
      out({ type: "error", message: `client ${index} disconnected: ${reason}` });
    });
    this.socket.on("position", (payload) => this.onPosition(payload));
  }

  async join() {
    await new Promise((resolve, reject) => {
      if (this.socket.connected) resolve();
      this.socket.once("connect", resolve);
      this.socket.once("connect_error", reject);
    });
    const reply = await this.socket.timeout(10_000).emitWithAck("join", room);
    if (!reply || !reply.ok) throw new Error(`join ${room} refused: ${JSON.stringify(reply)}`);
  }

  onPosition(payload) {
    const at = now();
    const list = Array.isArray(payload) ? payload : [payload];
    this.batches++;
    for (const p of list) {
      record(at - p.ts_ms);
      this.positions++;
      this.total++;
      const last = this.lastSeq.get(p.vehicle) ?? -1;
      if (p.seq > last) {
        const skipped = p.seq - last - 1;
        if (skipped > allowedSkip) {
          this.gapLost += skipped - allowedSkip;
          if (this.inWindow) this.windowGapLost += skipped - allowedSkip;
        }
        this.distinct++;
        this.lastSeq.set(p.vehicle, p.seq);
      } else {
        this.duplicates++;
      }
    }
  }
}

const dispatchers = [];
for (let i = 0; i < clients; i++) dispatchers.push(new Dispatcher(first + i));
try {
  await Promise.all(dispatchers.map((d) => d.join()));
  out({ type: "ready", clients });
} catch (err) {
  out({ type: "error", message: `not ready: ${err.message}` });
  process.exit(1);
}

function windowReport() {
  const buckets = [];
  for (let i = 0; i < HIST_LEN; i++) if (hist[i] > 0) buckets.push([i, hist[i]]);
  return {
    type: "window",
    clients: dispatchers.map((d) => ({
      index: d.index,
      positions: d.positions,
      batches: d.batches,
      gapLost: d.windowGapLost,
    })),
    buckets,
    maxLatencyMs: maxLatency,
    late,
  };
}

function resetWindow() {
  hist = new Float64Array(HIST_LEN);
  maxLatency = 0;
  late = 0;
  for (const d of dispatchers) {
    d.positions = 0;
    d.batches = 0;
    d.windowGapLost = 0;
    d.inWindow = true;
  }
}

readCommands(handle, {
  bad: (message) => out({ type: "error", message }),
  done: () => process.exit(0),
});

function handle(cmd) {
  switch (cmd.op) {
    case "window-start":
      resetWindow();
      out({ type: "window-started" });
      break;
    case "window-end":
      for (const d of dispatchers) d.inWindow = false;
      out(windowReport());
      break;
    case "report":
      // A large line: exit only once it is written.
      process.stdout.write(JSON.stringify({
        type: "report",
        clients: dispatchers.map((d) => ({
          index: d.index,
          total: d.total,
          distinct: d.distinct,
          duplicates: d.duplicates,
          gapLost: d.gapLost,
          disconnects: d.disconnects,
          lastSeq: Object.fromEntries(d.lastSeq),
        })),
      }) + "\n", () => process.exit(0));
      for (const d of dispatchers) d.socket.close();
      break;
    default:
      out({ type: "error", message: `unknown op ${cmd.op}` });
  }
}
