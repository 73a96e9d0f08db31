// Fleetbeat dispatcher page: log in with a token, join rooms, watch vehicles live on the map,
// read the feeds, send commands. The protocol is docs/socketio.md (namespace `/dispatch`).

import "leaflet/dist/leaflet.css";
import "./style.css";
import { connect } from "./connection.js";
import { Feed } from "./feed.js";
import { Fleet } from "./fleet.js";
import { ago, clock, compass, el, kmh } from "./format.js";
import { VehicleList } from "./list.js";
import { createMap, fitToVehicles, STATUS_COLOURS } from "./map.js";

const TOKEN_KEY = "fleetbeat.token";
const ROOMS_KEY = "fleetbeat.rooms";
const $ = (id) => document.getElementById(id);

const fleet = new Fleet();
/** Rooms the dispatcher wants, in join order; re-joined after every reconnect. */
let wanted = loadRooms();
let conn = null;
let selected = null;
/** The map follows the fleet (fits all vehicles) until the dispatcher pans or zooms it. */
let autoFit = true;
/** Fit at the next data even if every vehicle is in view (after login, join and leave). */
let needFit = true;
let lastFit = 0;
/** True while the page itself moves the map (so that is not taken for the dispatcher's move). */
let fitting = false;
/** Command results per vehicle (DOM rows), newest first, a few each. */
const results = new Map();
let ui = null;
let countsFrame = 0;
const stats = { frames: 0, lastDrawMs: 0, batches: 0, positions: 0, snapshots: 0, statusEvents: 0 };
let probe = null;

boot().catch((err) => {
  document.body.textContent = `The page could not start: ${err}`;
});

async function boot() {
  const config = await loadConfig();
  ui = buildUi(config);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) login(token);
  else showLogin();
}

async function loadConfig() {
  try {
    const r = await fetch("/config.json", { cache: "no-store" });
    if (r.ok) return await r.json();
  } catch {
    // Served without the bridge's config: use the defaults (offline grid).
  }
  return {};
}

function buildUi(config) {
  $("app").hidden = false; // Leaflet needs a sized container
  const { map, vehicles } = createMap($("map"), fleet, config, {
    onSelect: (id) => select(id, { pan: false }),
    onHover: hover,
    onDraw: (ms, drawn) => {
      stats.frames++;
      stats.lastDrawMs = ms;
      probe?.draws.push(ms);
    },
  });
  $("app").hidden = true;

  const list = new VehicleList(fleet, {
    scroller: $("list"),
    spacer: $("list-spacer"),
    rows: $("list-rows"),
    empty: $("list-empty"),
    onSelect: (id) => select(id, { pan: true }),
  });
  const feed = new Feed($("feed"), { onSelect: (id) => select(id, { pan: true }) });

  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("token").value.trim();
    if (token) login(token);
  });
  $("logout").addEventListener("click", logout);
  $("fit").addEventListener("click", () => {
    autoFit = true;
    fit();
  });
  // The dispatcher took the map: stop following the fleet.
  for (const event of ["dragstart", "zoomstart"]) {
    map.on(event, () => {
      if (!fitting) autoFit = false;
    });
  }
  $("search").addEventListener("input", (e) => list.setQuery(e.target.value));
  $("counts").addEventListener("click", (e) => {
    const b = e.target.closest("[data-status]");
    if (!b) return;
    const active = list.setStatusFilter(b.dataset.status);
    for (const x of $("counts").querySelectorAll("[data-status]")) x.classList.toggle("on", x.dataset.status === active);
  });
  $("join-kind").addEventListener("change", (e) => {
    const kind = e.target.value;
    $("join-id").disabled = kind === "all";
    $("join-id").placeholder = kind === "vehicle" ? "vehicle id" : kind === "fleet" ? "fleet name" : "";
    $("join-id").setAttribute("list", kind === "fleet" ? "known-fleets" : "");
  });
  $("join-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const kind = $("join-kind").value;
    const id = $("join-id").value.trim();
    if (kind !== "all" && !id) return;
    join(kind === "all" ? "all" : `${kind}:${id}`).then((ok) => {
      if (ok) $("join-id").value = "";
    });
  });
  $("join-all").addEventListener("click", () => join("all"));
  $("rooms").addEventListener("click", (e) => {
    const b = e.target.closest("[data-leave]");
    if (b) leave(b.dataset.leave);
  });
  $("banner-close").addEventListener("click", () => ($("banner").hidden = true));
  $("d-close").addEventListener("click", () => select(null));
  $("cmd-ping").addEventListener("click", () => command("ping"));
  $("cmd-depot").addEventListener("click", () => command("return_to_depot"));
  $("cmd-rate").addEventListener("click", () => command("set_rate"));
  for (const tab of document.querySelectorAll(".tabs [data-filter]")) {
    tab.addEventListener("click", () => {
      for (const t of document.querySelectorAll(".tabs [data-filter]")) t.setAttribute("aria-selected", String(t === tab));
      feed.setFilter(tab.dataset.filter);
    });
  }

  // Values that age (last seen) and counts: refreshed a few times a second, never per event.
  let lastRevision = -1;
  setInterval(() => {
    if (fleet.revision !== lastRevision) {
      lastRevision = fleet.revision;
      renderCounts();
    }
    list.schedule();
    renderDetail();
  }, 500);

  return { map, vehicles, list, feed };
}

// ---- login and connection -------------------------------------------------------------

function showLogin(message) {
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").hidden = !message;
  $("login-error").textContent = message ?? "";
  $("login-submit").disabled = false;
  $("token").focus();
}

function login(token) {
  conn?.close();
  $("login-submit").disabled = true;
  $("login-error").hidden = true;
  setConn("connecting", "connecting…");
  let established = false;
  const c = connect(token, {
    connect() {
      if (c !== conn) return;
      established = true;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("login").hidden = true;
      $("app").hidden = false;
      ui.map.invalidateSize();
      setConn("up", "live");
      rejoin();
    },
    refused(message) {
      if (c !== conn) return;
      conn = null;
      sessionStorage.removeItem(TOKEN_KEY);
      c.close();
      resetView();
      showLogin(`The bridge refused the token: ${message}`);
    },
    unreachable(message) {
      if (c !== conn) return;
      if (!established) {
        $("login-submit").disabled = false;
        $("login-error").hidden = false;
        $("login-error").textContent = `Cannot reach the bridge (${message}); retrying…`;
      }
      setConn("down", `bridge unreachable: ${message} — retrying`);
    },
    disconnect(reason) {
      if (c !== conn) return;
      setConn("down", reason === "io client disconnect" ? "disconnected" : `disconnected (${reason}) — reconnecting`);
    },
    snapshot: onSnapshot,
    position: onPosition,
    status: onStatus,
    delivery: onDelivery,
    ack: onAck,
    announce: onAnnounce,
  });
  conn = c;
}

function logout() {
  conn?.close();
  conn = null;
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(ROOMS_KEY);
  wanted = null;
  resetView();
  $("token").value = "";
  showLogin();
}

function resetView() {
  fleet.clear();
  autoFit = true;
  needFit = true;
  select(null);
  ui.feed.clear();
  $("banner").hidden = true;
  renderRooms();
  renderCounts();
  ui.list.schedule();
  ui.vehicles.redraw();
}

function setConn(state, text) {
  $("conn").dataset.state = state;
  $("conn").textContent = text;
}

// ---- rooms ------------------------------------------------------------------------------

function loadRooms() {
  try {
    const rooms = JSON.parse(sessionStorage.getItem(ROOMS_KEY) ?? "null");
    return Array.isArray(rooms) ? rooms.filter((r) => typeof r === "string") : null;
  } catch {
    return null;
  }
}

function saveRooms() {
  sessionStorage.setItem(ROOMS_KEY, JSON.stringify(wanted));
}

/** After every (re)connect: the bridge has forgotten our rooms, join them again. */
async function rejoin() {
  fleet.rooms.clear();
  // First visit: try `all`; a token limited to some fleets is told to pick one.
  const firstVisit = wanted === null;
  const rooms = wanted ?? ["all"];
  wanted = [];
  for (const room of rooms) await join(room, { quiet: firstVisit });
  renderRooms();
}

async function join(room, { quiet = false } = {}) {
  if (!conn) return false;
  $("join-error").hidden = true;
  // Cover the room before the snapshot arrives: it is sent right after the ack.
  const had = fleet.rooms.has(room);
  fleet.rooms.add(room);
  const reply = await conn.join(room);
  if (!reply.ok) {
    if (!had) fleet.rooms.delete(room);
    if (!quiet) {
      $("join-error").hidden = false;
      $("join-error").textContent = `Cannot join ${room}: ${reply.error ?? "refused"}`;
    }
    renderRooms();
    return false;
  }
  wanted ??= [];
  if (!wanted.includes(room)) wanted.push(room);
  autoFit = true;
  needFit = true;
  saveRooms();
  renderRooms();
  return true;
}

async function leave(room) {
  if (!conn) return;
  const reply = await conn.leave(room);
  if (!reply.ok) {
    $("join-error").hidden = false;
    $("join-error").textContent = `Cannot leave ${room}: ${reply.error ?? "refused"}`;
    return;
  }
  wanted = (wanted ?? []).filter((r) => r !== room);
  fleet.rooms.delete(room);
  saveRooms();
  fleet.prune();
  if (autoFit) needFit = true;
  if (selected && !fleet.get(selected)) select(null);
  renderRooms();
  renderCounts();
  ui.list.schedule();
  ui.vehicles.redraw();
}

function renderRooms() {
  const list = $("rooms");
  list.replaceChildren(
    ...(wanted ?? []).map((room) => {
      const li = el("li", "chip");
      li.dataset.room = room;
      li.append(el("span", "", room));
      const x = el("button", "", "×");
      x.type = "button";
      x.dataset.leave = room;
      x.setAttribute("aria-label", `Leave ${room}`);
      li.append(x);
      return li;
    }),
  );
  $("rooms-empty").hidden = (wanted ?? []).length > 0;
  const known = $("known-fleets");
  known.replaceChildren(...fleet.fleetNames().map((f) => Object.assign(document.createElement("option"), { value: f })));
}

// ---- events from the bridge ---------------------------------------------------------------

function onSnapshot(states) {
  if (!Array.isArray(states)) return;
  stats.snapshots++;
  fleet.snapshot(states, performance.now());
  afterData();
  renderRooms();
}

function onPosition(batch) {
  stats.batches++;
  stats.positions += fleet.positions(batch, performance.now(), Date.now());
  afterData();
}

function afterData() {
  const now = performance.now();
  if (autoFit && (needFit || (now - lastFit > 1000 && ui.vehicles.drawn < countPlaced()))) {
    lastFit = now;
    needFit = !fit();
  }
  ui.vehicles.redraw();
}

function fit() {
  fitting = true;
  try {
    return fitToVehicles(ui.map, fleet);
  } finally {
    fitting = false;
  }
}

function countPlaced() {
  let n = 0;
  for (const v of fleet.vehicles.values()) if (v.pos !== null) n++;
  return n;
}

/** A `status` batch: `[StatusChange]`, oldest first (a single change is accepted as well). */
function onStatus(changes) {
  for (const s of Array.isArray(changes) ? changes : [changes]) onStatusChange(s);
}

function onStatusChange(s) {
  if (!s || typeof s.vehicle !== "string") return;
  stats.statusEvents++;
  const changed = fleet.status(s);
  if (!changed) return;
  ui.vehicles.redraw();
  // Status changes are rare and matter: show them on the next frame, not the next tick.
  ui.list.schedule();
  if (countsFrame === 0) {
    countsFrame = requestAnimationFrame(() => {
      countsFrame = 0;
      renderCounts();
    });
  }
  const reason = s.reason ? ` (${s.reason})` : "";
  ui.feed.add({
    kind: "status",
    vehicle: s.vehicle,
    text: `${s.vehicle} ${s.status}${reason}`,
    tone: s.status,
  });
}

const DELIVERY_WORDS = { pickup: "picked up", "in-transit": "in transit with", delivered: "delivered" };

function onDelivery(d) {
  if (!d || typeof d.vehicle !== "string") return;
  ui.feed.add({
    kind: "delivery",
    vehicle: d.vehicle,
    text: `${d.vehicle} ${DELIVERY_WORDS[d.kind] ?? d.kind} order ${d.order}`,
    tone: d.kind === "delivered" ? "done" : null,
    ts: d.ts_ms,
  });
}

function onAck(a) {
  if (!a || typeof a.vehicle !== "string") return;
  ui.feed.add({ kind: "ack", vehicle: a.vehicle, text: `${a.vehicle} answered command #${a.command_id}: ${a.result}` });
}

function onAnnounce(a) {
  if (!a) return;
  $("banner-text").textContent = a.message ?? "";
  $("banner-meta").textContent = `— ${a.from ?? "operator"}, ${clock(a.ts_ms ?? Date.now())}`;
  $("banner").hidden = false;
}

// ---- selection, details, commands ----------------------------------------------------------

function select(id, { pan = false } = {}) {
  selected = id && fleet.get(id) ? id : null;
  ui.vehicles.select(selected);
  ui.list.select(selected);
  if (selected) {
    ui.list.reveal(selected);
    const v = fleet.get(selected);
    if (pan && v.pos) {
      autoFit = false;
      ui.map.panTo([v.pos.lat, v.pos.lon], { animate: false });
    }
    $("cmd-results").replaceChildren(...(results.get(selected) ?? []));
  }
  renderDetail();
}

function renderDetail() {
  const v = selected ? fleet.get(selected) : null;
  $("detail-empty").hidden = v !== null && v !== undefined;
  $("detail-body").hidden = !v;
  if (!v) return;
  $("d-id").textContent = v.id;
  const pill = $("d-status");
  pill.textContent = v.status + (v.reason && v.status !== "online" ? ` · ${v.reason}` : "");
  pill.style.background = STATUS_COLOURS[v.status] ?? STATUS_COLOURS.online;
  $("d-fleet").textContent = v.fleet;
  $("d-speed").textContent = v.pos ? `${kmh(v.pos.speed_mps)} km/h${v.pos.moving ? "" : " (stopped)"}` : "—";
  $("d-heading").textContent = v.pos ? compass(v.pos.heading_deg) : "—";
  $("d-battery").textContent = v.pos ? `${v.pos.battery_pct}%` : "—";
  const seen = ago(v.lastSeenMs);
  $("d-seen").textContent = seen === "now" || seen === "—" ? seen : `${seen} ago`;
  $("d-pos").textContent = v.pos ? `${v.pos.lat.toFixed(5)}, ${v.pos.lon.toFixed(5)}` : "—";
}

async function command(type) {
  const vehicle = selected;
  if (!conn || !vehicle) return;
  const body = { vehicle, type };
  let label = type.replaceAll("_", " ");
  if (type === "set_rate") {
    const ms = Number($("cmd-interval").value);
    if (!Number.isInteger(ms) || ms < 100 || ms > 3_600_000) {
      $("cmd-interval").setCustomValidity("100 to 3,600,000 ms");
      $("cmd-interval").reportValidity();
      return;
    }
    $("cmd-interval").setCustomValidity("");
    body.interval_ms = ms;
    label = `set rate ${ms} ms`;
  }
  const row = el("li", "pending");
  row.dataset.type = type;
  row.dataset.state = "pending";
  row.append(el("time", "", clock(Date.now())), el("span", "what", label), el("span", "outcome", "waiting for the vehicle…"));
  const rows = results.get(vehicle) ?? [];
  rows.unshift(row);
  rows.length = Math.min(rows.length, 8);
  results.set(vehicle, rows);
  if (selected === vehicle) $("cmd-results").replaceChildren(...rows);

  const started = performance.now();
  const reply = await conn.command(body);
  const took = Math.round(performance.now() - started);
  const outcome = row.querySelector(".outcome");
  if (reply.ok) {
    row.dataset.state = reply.result === "ok" ? "ok" : "refused";
    row.dataset.result = reply.result;
    outcome.textContent = `${reply.result} · #${reply.command_id} · ${took} ms`;
  } else {
    row.dataset.state = "error";
    row.dataset.error = reply.error ?? "";
    outcome.textContent = `error: ${reply.error ?? "unknown"}`;
  }
  row.className = row.dataset.state;
}

// ---- hover tooltip -------------------------------------------------------------------------

function hover(id, point) {
  const tip = $("tooltip");
  const v = id ? fleet.get(id) : null;
  if (!v || !point) {
    tip.hidden = true;
    return;
  }
  tip.textContent = `${v.id} · ${v.status}${v.pos ? ` · ${kmh(v.pos.speed_mps)} km/h · ${v.pos.battery_pct}%` : ""}`;
  const box = $("map").getBoundingClientRect();
  tip.style.left = `${box.left + point.x + 14}px`;
  tip.style.top = `${box.top + point.y + 10}px`;
  tip.hidden = false;
}

function renderCounts() {
  const c = fleet.counts();
  const box = $("counts");
  if (box.childElementCount === 0) {
    for (const s of ["online", "stale", "offline"]) {
      const b = el("button", `count s-${s}`);
      b.type = "button";
      b.dataset.status = s;
      b.title = `Show only ${s} vehicles`;
      box.append(b);
    }
  }
  for (const b of box.children) b.textContent = `${c[b.dataset.status].toLocaleString("en")} ${b.dataset.status}`;
  $("totals").textContent = `${fleet.size.toLocaleString("en")} vehicles`;
}

// ---- hooks for tests and people at the console --------------------------------------------

function percentile(sorted, p) {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

window.__fleetbeat = {
  /** What the page shows right now. */
  stats() {
    return {
      connected: conn?.socket.connected ?? false,
      rooms: [...fleet.rooms],
      vehicles: fleet.size,
      rendered: ui?.vehicles.drawn ?? 0,
      statuses: fleet.counts(),
      selected,
      zoom: ui?.map.getZoom() ?? null,
      autoFit,
      feed: ui?.feed.count ?? 0,
      ...stats,
    };
  },
  /** One vehicle as the page knows it. */
  vehicle(id) {
    const v = fleet.get(id);
    return v ? { id: v.id, fleet: v.fleet, status: v.status, reason: v.reason, lastSeenMs: v.lastSeenMs, position: v.pos } : null;
  },
  /**
   * Handles `payload` as if the bridge had sent `event` (load tests and demos without
   * vehicles). Only changes what this page shows; nothing is sent anywhere.
   */
  inject(event, payload) {
    const handlers = { snapshot: onSnapshot, position: onPosition, status: onStatus, delivery: onDelivery, ack: onAck, announce: onAnnounce };
    if (!handlers[event]) throw new Error(`no handler for ${event}`);
    handlers[event](payload);
  },
  /** Where a vehicle was drawn in the last frame, in page coordinates (for a real click). */
  screenPoint(id) {
    const p = ui?.vehicles.screenPoint(id);
    if (!p) return null;
    const box = $("map").getBoundingClientRect();
    return { x: box.left + p.x, y: box.top + p.y };
  },
  /** Starts measuring frames: every animation frame's interval, and the vehicle layer's draw time. */
  startFrameProbe() {
    probe = { frames: [], draws: [], last: 0, running: true };
    const p = probe;
    const tick = (t) => {
      if (!p.running) return;
      if (p.last) p.frames.push(t - p.last);
      p.last = t;
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  },
  /** Stops measuring; frame intervals and draw times in ms (p50, p95, max). */
  stopFrameProbe() {
    if (!probe) return null;
    probe.running = false;
    const sum = (xs) => {
      const s = [...xs].sort((a, b) => a - b);
      return { count: s.length, p50: percentile(s, 50), p95: percentile(s, 95), max: s[s.length - 1] ?? 0 };
    };
    const out = { frameInterval: sum(probe.frames), draw: sum(probe.draws), rendered: ui.vehicles.drawn };
    probe = null;
    return out;
  },
};
