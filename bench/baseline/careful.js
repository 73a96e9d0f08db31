// The careful reference bridge (see bench/README.md): bridge.js as a careful Node engineer
// writes it, on the same packages.
//
// Like bridge.js it subscribes to the vehicles' heartbeats with the npm `mqtt` client and
// JSON.parses each payload, but it does not emit per message: it keeps the latest position of
// each vehicle (a Map per fleet, a newer heartbeat replaces an older one) and every tick
// (TICK_MS, default 10 ms) emits one volatile `position` batch per room, an ARRAY of positions:
// `fleet:{fleet}` gets its fleet's, `all` gets every fleet's, a watched `vehicle:{id}` its one.
// A room nobody joined is skipped before anything is encoded. Volatile: a socket whose
// transport is still busy with the previous batch misses this one (a newer one follows).
// A socket joined to two rooms that cover a vehicle gets its position twice (unlike
// Fleetbeat, which sends it once per socket); the benchmark's dispatchers join `all` only.
//
// Same client-facing shape as bridge.js (and Fleetbeat):
// - namespace `/dispatch`, handshake `auth: { token }` (DISPATCH_TOKEN, default dispatch-demo);
// - `join` / `leave` a room (`all`, `fleet:{fleet}`, `vehicle:{id}`), acked with `{ ok: true }`;
// - `position` events: an array of heartbeat JSON objects, as Fleetbeat's batches.
//
// Environment: MQTT_URL (default mqtt://127.0.0.1:1883), PORT (default 3000; 0 picks a free
// port), HOST (default 127.0.0.1), TICK_MS (default 10). Also serves GET /metrics (counters,
// Prometheus text; the names of bridge.js, plus positions emitted) and GET /readyz (200 once
// subscribed). Prints `listening on http://HOST:PORT` and `subscribed`.

const http = require("node:http");
const mqtt = require("mqtt");
const { Server } = require("socket.io");

const MQTT_URL = process.env.MQTT_URL || "mqtt://127.0.0.1:1883";
const HOST = process.env.HOST || "127.0.0.1";
const PORT = Number(process.env.PORT || 3000);
const TOKEN = process.env.DISPATCH_TOKEN || "dispatch-demo";
const TICK_MS = Math.max(1, Number(process.env.TICK_MS || 10));

const counters = { received: 0, rejected: 0, emitted: 0, positions: 0 };
let subscribed = false;

const server = http.createServer((req, res) => {
  if (req.url === "/metrics") {
    res.setHeader("content-type", "text/plain; version=0.0.4");
    res.end(
      `baseline_mqtt_received_total ${counters.received}\n` +
        `baseline_mqtt_rejected_total ${counters.rejected}\n` +
        `baseline_socketio_emitted_total ${counters.emitted}\n` +
        `baseline_socketio_positions_total ${counters.positions}\n` +
        `baseline_socketio_sockets ${dispatch.sockets.size}\n`,
    );
  } else if (req.url === "/readyz") {
    res.statusCode = subscribed ? 200 : 503;
    res.end(subscribed ? "ready\n" : "not subscribed\n");
  } else {
    res.statusCode = 404;
    res.end();
  }
});

const io = new Server(server, { cors: { origin: "*" } });
const dispatch = io.of("/dispatch");

dispatch.use((socket, next) => {
  if (socket.handshake.auth && socket.handshake.auth.token === TOKEN) next();
  else next(new Error("unknown token"));
});

dispatch.on("connection", (socket) => {
  socket.on("join", (room, ack) => {
    socket.join(room);
    if (typeof ack === "function") ack({ ok: true });
  });
  socket.on("leave", (room, ack) => {
    socket.leave(room);
    if (typeof ack === "function") ack({ ok: true });
  });
});

const client = mqtt.connect(MQTT_URL, { clientId: `baseline-careful-${process.pid}`, clean: true });

client.on("connect", () => {
  client.subscribe("fleet/+/+/hb", { qos: 0 }, (err) => {
    if (err) {
      console.error("subscribe failed:", err.message);
      return;
    }
    subscribed = true;
    console.log("subscribed");
  });
});
client.on("error", (err) => console.error("mqtt error:", err.message));

// fleet -> (vehicle -> its latest position since the last tick)
const latest = new Map();

client.on("message", (topic, message) => {
  let position;
  try {
    position = JSON.parse(message.toString());
  } catch {
    counters.rejected++;
    return;
  }
  counters.received++;
  const [, fleet, vehicle] = topic.split("/");
  let vehicles = latest.get(fleet);
  if (vehicles === undefined) {
    vehicles = new Map();
    latest.set(fleet, vehicles);
  }
  vehicles.set(vehicle, position);
});

function emitBatch(room, batch) {
  dispatch.to(room).volatile.emit("position", batch);
  counters.emitted++;
  counters.positions += batch.length;
}

function flush() {
  const rooms = dispatch.adapter.rooms;
  const everyone = rooms.has("all") ? [] : null;
  for (const [fleet, vehicles] of latest) {
    if (vehicles.size === 0) continue;
    const batch = [];
    for (const [vehicle, position] of vehicles) {
      batch.push(position);
      if (everyone !== null) everyone.push(position);
      const own = `vehicle:${vehicle}`;
      if (rooms.has(own)) emitBatch(own, [position]);
    }
    vehicles.clear();
    const room = `fleet:${fleet}`;
    if (rooms.has(room)) emitBatch(room, batch);
  }
  if (everyone !== null && everyone.length > 0) emitBatch("all", everyone);
}
const ticker = setInterval(flush, TICK_MS);

server.listen(PORT, HOST, () => {
  const { address, port } = server.address();
  console.log(`listening on http://${address}:${port}`);
});

function shutdown() {
  clearInterval(ticker);
  client.end(true);
  io.close();
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
