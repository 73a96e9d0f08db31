// What the node programs driven by the Rust harness share (tests/src/peer.rs): the JSON-lines
// protocol on stdin and stdout, and how a client connects to a bridge's namespace.
import { createInterface } from "node:readline";
import { io } from "socket.io-client";

/** Writes one JSON object as a line on stdout. */
export const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

/**
 * Reads one JSON command per stdin line (blank lines skipped) and hands it to `handle`. A line
 * that is not JSON goes to `bad` as a message; `done` runs when stdin closes (the harness is
 * gone, or the test is over).
 */
export function readCommands(handle, { bad, done }) {
  const lines = createInterface({ input: process.stdin });
  lines.on("line", (line) => {
    if (!line.trim()) return;
    let cmd;
    try {
      cmd = JSON.parse(line);
    } catch (err) {
      bad(`bad command: ${err.message}`);
      return;
    }
    handle(cmd);
  });
  lines.on("close", done);
}

/**
 * Extra socket.io-client options from the environment: `FLEETBEAT_SIO_OPTIONS`, a JSON object
 * (e.g. `{"extraHeaders": {"Origin": "http://elsewhere.example"}}`, what a browser on another
 * site would send). Empty when unset.
 */
const optionsFromEnv = () => {
  const raw = process.env.FLEETBEAT_SIO_OPTIONS;
  return raw ? JSON.parse(raw) : {};
};

/**
 * A socket.io-client socket on `namespace` at `url`, WebSocket only, with the handshake `auth`;
 * `options` and then `FLEETBEAT_SIO_OPTIONS` override the defaults.
 */
export const connect = (url, namespace, auth, options = {}) =>
  io(url + namespace, { auth, transports: ["websocket"], ...options, ...optionsFromEnv() });
