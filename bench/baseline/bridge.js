// The reference bridge Fleetbeat is measured against (see bench/README.md).
//
// Written the way the classic parcel-service exercise does it: the npm `mqtt` client
// subscribes to the vehicles' heartbeats on a broker (Debian's mosquitto in the benchmark),
// every payload is JSON, and every message becomes one Socket.IO emit. Nothing is batched,
// coalesced or checked beyond JSON.parse. It keeps Fleetbeat's client-facing shape so the
// same dispatcher clients can watch either stack:
//
// - namespace `/dispatch`, handshake `auth: { token }` (DISPATCH_TOKEN, default dispatch-demo);
// - `join` / `leave` a room (`all`, `fleet:{fleet}`, `vehicle:{id}`), acked with `{ ok: true }`;
// - `position` events: the heartbeat's JSON object, to the rooms that cover the vehicle.
//
// Environment: MQTT_URL (default mqtt://127.0.0.1:1883), PORT (default 3000; 0 picks a free
// port), HOST (default 127.0.0.1). Also serves GET /metrics (counters, Prometheus text) and
// GET /readyz (200 once subscribed). Prints `listening on http://HOST:PORT` and `subscribed`.

const http = require("node:http");
const mqtt = require("mqtt");
const { Server } = require("socket.io");

const MQTT_URL = process.env.MQTT_URL || "mqtt://127.0.0.1:1883";
const HOST = process.env.HOST || "127.0.0.1";
const PORT = Number(process.env.PORT || 3000);
const TOKEN = process.env.DISPATCH_TOKEN || "dispatch-demo";

const counters = { received: 0, rejected: 0, emitted: 0 };
let subscribed = false;

const server = http.createServer((req, res) => {
  if (req.url === "/metrics") {
    res.setHeader("content-type", "text/plain; version=0.0.4");
    res.end(
      `baseline_mqtt_received_total ${counters.received}\n` +
        `baseline_mqtt_rejected_total ${counters.rejected}\n` +
        `baseline_socketio_emitted_total ${counters.emitted}\n` +
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

const client = mqtt.connect(MQTT_URL, { clientId: `baseline-bridge-${process.pid}`, clean: true });

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
  dispatch.to(["all", `fleet:${fleet}`, `vehicle:${vehicle}`]).emit("position", position);
  counters.emitted++;
});

server.listen(PORT, HOST, () => {
  const { address, port } = server.address();
  console.log(`listening on http://${address}:${port}`);
});

function shutdown() {
  client.end(true);
  io.close();
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
