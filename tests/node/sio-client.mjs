// A real socket.io-client, driven line by line by the Rust integration tests.
//
// Usage: node sio-client.mjs <url> <namespace> [auth-json]   (FLEETBEAT_SIO_CA: see below)
// stdin, one JSON object per line:
//   {"op":"emit","event":"join","args":["vehicle:v1"],"ack":7}  emit; if "ack" is set, the
//                                                               server's ack is reported with it
//   {"op":"disconnect"} / {"op":"connect"}                      drop / re-open the connection
//   {"op":"exit"}                                               close and exit 0
// stdout, one JSON object per line:
//   {"type":"connect","id":...} {"type":"connect_error","message":...}
//   {"type":"disconnect","reason":...}
//   {"type":"event","event":...,"args":[...]} {"type":"ack","ack":7,"args":[...]}
import { readFileSync } from "node:fs";
import { connect, out, readCommands } from "./harness.mjs";

// FLEETBEAT_SIO_CA: a PEM file of the CA(s) to trust for an https:// url (wss://), instead of
// node's built-in roots; certificates are always verified (rejectUnauthorized).
const tls = process.env.FLEETBEAT_SIO_CA
  ? { ca: readFileSync(process.env.FLEETBEAT_SIO_CA), rejectUnauthorized: true }
  : {};

const [url, namespace, authJson] = process.argv.slice(2);
if (!url || !namespace) {
  console.error("usage: node sio-client.mjs <url> <namespace> [auth-json]");
  process.exit(2);
}
const socket = connect(url, namespace, authJson ? JSON.parse(authJson) : undefined, {
  reconnection: true,
  reconnectionDelay: 100,
  reconnectionDelayMax: 1000,
  ...tls,
});
socket.on("connect", () => out({ type: "connect", id: socket.id }));
socket.on("connect_error", (err) => out({ type: "connect_error", message: err.message, data: err.data ?? null }));
socket.on("disconnect", (reason) => out({ type: "disconnect", reason }));
socket.onAny((event, ...args) => out({ type: "event", event, args }));

readCommands(handle, {
  bad: (message) => out({ type: "error", message }),
  // The test harness closing stdin means the test is over.
  done: () => {
    socket.close();
    process.exit(0);
  },
});

function handle(cmd) {
  switch (cmd.op) {
    case "emit": {
      const args = cmd.args ?? [];
      if (cmd.ack !== undefined) {
        socket.timeout(cmd.timeoutMs ?? 10000).emit(cmd.event, ...args, (err, ...reply) => {
          if (err) out({ type: "ack_timeout", ack: cmd.ack });
          else out({ type: "ack", ack: cmd.ack, args: reply });
        });
      } else {
        socket.emit(cmd.event, ...args);
      }
      break;
    }
    case "disconnect":
      socket.disconnect();
      break;
    case "connect":
      socket.connect();
      break;
    case "exit":
      socket.close();
      process.exit(0);
      break;
    default:
      out({ type: "error", message: `unknown op ${cmd.op}` });
  }
}
