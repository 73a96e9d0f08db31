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

/** A socket.io-client socket on `namespace` at `url`, WebSocket only, with the handshake `auth`. */
export const connect = (url, namespace, auth, options = {}) =>
  io(url + namespace, { auth, transports: ["websocket"], ...options });
