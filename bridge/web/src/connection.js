// The Socket.IO connection to the bridge's `/dispatch` namespace (docs/socketio.md).

import { io } from "socket.io-client";

/** How long the page waits for the bridge to acknowledge `join` / `leave`. */
const ROOM_ACK_MS = 10_000;
/**
 * How long the page waits for a command's ack. The bridge answers `{ok: false, error: "timeout"}`
 * itself when the vehicle is silent, well before this; this bound only covers a bridge that does
 * not answer at all.
 */
export const COMMAND_ACK_MS = 30_000;

/**
 * Connects with `token` and forwards what happens to `on`:
 * `connect()`, `refused(message)` (the bridge turned the token down: no retry),
 * `unreachable(message)` (transport trouble: Socket.IO retries by itself), `disconnect(reason)`,
 * and every server event by name (`snapshot`, `position`, `status`, `delivery`, `ack`, `announce`,
 * `pickup`, `order`, `geofence`, `geofences`).
 */
export function connect(token, on) {
  const socket = io("/dispatch", {
    auth: { token },
    transports: ["websocket", "polling"],
    reconnectionDelay: 500,
    reconnectionDelayMax: 5000,
  });
  socket.on("connect", () => on.connect());
  socket.on("connect_error", (err) => {
    const message = err?.message || String(err);
    // `active` is false when the server refused the handshake (bad token): Socket.IO does not
    // retry then, and the message is the server's reason.
    if (socket.active) on.unreachable(message);
    else on.refused(message);
  });
  socket.on("disconnect", (reason) => on.disconnect(reason));
  for (const event of ["snapshot", "position", "status", "delivery", "ack", "announce", "pickup", "order", "geofence", "geofences"]) {
    socket.on(event, (payload) => on[event]?.(payload));
  }

  return {
    socket,
    /** `join` a room; resolves to the ack (`{ok}` or `{ok: false, error}`). */
    join: (room) => ack(socket, ROOM_ACK_MS, "join", room),
    /** `leave` a room; resolves to the ack. */
    leave: (room) => ack(socket, ROOM_ACK_MS, "leave", room),
    /** Sends a `command`; resolves to the ack. */
    command: (body) => ack(socket, COMMAND_ACK_MS, "command", body),
    /** Acknowledges a queued `delivery` (`received {messageId}`); resolves to the ack. */
    received: (messageId) => ack(socket, ROOM_ACK_MS, "received", { messageId }),
    /** `getAll` one page of the pending queue (`{after?, limit?}`); resolves to `{ok, count, next}`. */
    getAll: (page) => ack(socket, ROOM_ACK_MS, "getAll", page ?? {}),
    close: () => socket.disconnect(),
  };
}

async function ack(socket, ms, event, payload) {
  try {
    const reply = await socket.timeout(ms).emitWithAck(event, payload);
    return reply && typeof reply === "object" ? reply : { ok: false, error: `unexpected answer ${JSON.stringify(reply)}` };
  } catch {
    return { ok: false, error: `no answer from the bridge within ${ms / 1000} s` };
  }
}
