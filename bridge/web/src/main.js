// Fleetbeat dispatcher page: log in with a token, join rooms, watch vehicles live on the map,
// read the feeds, send commands. The protocol is docs/socketio.md (namespace `/dispatch`).

import "leaflet/dist/leaflet.css";
import "./style.css";
import { connect } from "./connection.js";
import { Feed } from "./feed.js";
import { Fleet } from "./fleet.js";
import { ago, clock, compass, el, kmh } from "./format.js";
import { VehicleList } from "./list.js";
import { createMap, fitToVehicles, loadConfig, STATUS_COLOURS } from "./map.js";
import { FenceLayer } from "./geofences.js";
import { distanceM, duration, etaSeconds, OrderBoard, TERMINAL } from "./orders.js";
import { Replay } from "./replay.js";
import { RouteLayer } from "./route.js";

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
const stats = { frames: 0, lastDrawMs: 0, batches: 0, positions: 0, snapshots: 0, statusEvents: 0, received: 0 };
let probe = null;
/** The token of the connection, for the HTTP API (`Authorization: Bearer`). */
let token = null;
/** The order selected on the board (its pins and route are drawn), or null. */
let selectedOrder = null;
/** The stored track of the selected order's vehicle since the order was placed: `[[lat, lon]]`. */
let orderTrack = { order: null, vehicle: null, points: [], loadedAt: 0 };
/** What a click on the map does now: null (select a vehicle), "dropoff", "fence-centre", "fence-radius". */
let mode = null;
/** The new order's drop-off, and the centre of the fence being drawn. */
let newDropoff = null;
let fenceCentre = null;
/** Stores the token may place orders for (`GET /api/stores`). */
let stores = [];
/** True while a test hook injects an event: nothing is sent to the bridge then. */
let injecting = false;
/** Message id → the state of its `received`: "sent", "ok" or "failed". */
const receipts = new Map();

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
    onClick: mapClick,
    onMove: mapMove,
  });
  const replay = new Replay(map, $("replay"), {
    token: () => token,
    selected: () => selected,
  });
  const fences = new FenceLayer(map);
  const route = new RouteLayer(map);
  $("app").hidden = true;

  const list = new VehicleList(fleet, {
    scroller: $("list"),
    spacer: $("list-spacer"),
    rows: $("list-rows"),
    empty: $("list-empty"),
    onSelect: (id) => select(id, { pan: true }),
  });
  const feed = new Feed($("feed"), {
    onSelect: (id, order) => {
      if (order && board.get(order)) selectOrder(order);
      else if (id) select(id, { pan: true });
    },
  });
  const board = new OrderBoard(fleet, {
    rows: $("orders-rows"),
    more: $("orders-more"),
    empty: $("orders-empty"),
    count: $("orders-count"),
    onSelect: (id) => selectOrder(id),
  });
  wireOrders(board);
  wireFences();

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
  for (const tab of document.querySelectorAll(".side-tabs [data-pane]")) {
    tab.addEventListener("click", () => showPane(tab.dataset.pane));
  }
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && mode !== null) endMode();
  });
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
    // Ages and ETAs change with time and positions: the board and the route follow.
    if (!$("orders-pane").hidden) board.schedule();
    renderOrderDetail();
    drawRoute();
    const stale = orderTrack.order !== null && Date.now() - orderTrack.loadedAt > 10_000;
    const o = selectedOrder ? board.get(selectedOrder) : null;
    if (stale && o && !TERMINAL.has(o.state)) loadOrderTrack(o);
  }, 500);

  return { map, vehicles, list, feed, board, fences, route, replay };
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

function login(tok) {
  conn?.close();
  token = tok;
  $("login-submit").disabled = true;
  $("login-error").hidden = true;
  setConn("connecting", "connecting…");
  let established = false;
  const c = connect(token, {
    connect() {
      if (c !== conn) return;
      established = true;
      sessionStorage.setItem(TOKEN_KEY, tok);
      $("login").hidden = true;
      $("app").hidden = false;
      ui.map.invalidateSize();
      setConn("up", "live");
      rejoin();
      afterConnect();
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
    ...EVENT_HANDLERS,
  });
  conn = c;
}

/** The bridge's events and what the page does with each (also `fleetbeat.inject`). */
const EVENT_HANDLERS = {
  snapshot: onSnapshot,
  position: onPosition,
  status: onStatus,
  delivery: onDelivery,
  ack: onAck,
  announce: onAnnounce,
  pickup: onPickup,
  order: onOrder,
  geofence: onGeofence,
  geofences: onGeofencesChanged,
};

function logout() {
  conn?.close();
  conn = null;
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(ROOMS_KEY);
  wanted = null;
  token = null;
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
  receipts.clear();
  announced.clear();
  ui.board.clear();
  ui.fences.clear();
  selectOrder(null);
  endMode();
  ui.replay.close?.();
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
  // On a first visit `wanted` stays null until a join succeeds: a connection lost meanwhile
  // tries `all` again instead of joining nothing.
  const firstVisit = wanted === null;
  const rooms = wanted ?? ["all"];
  if (!firstVisit) wanted = [];
  for (const room of rooms) await join(room, { quiet: firstVisit, retries: 2 });
  renderRooms();
}

/** A join refused for now (no answer in time, the join rate limit), not for good. */
function transient(reply) {
  return !reply.ok && /no answer|too many joins/.test(reply.error ?? "");
}

async function join(room, { quiet = false, retries = 0 } = {}) {
  if (!conn) return false;
  $("join-error").hidden = true;
  // Cover the room before the snapshot arrives: it is sent right after the ack.
  const had = fleet.rooms.has(room);
  fleet.rooms.add(room);
  const c = conn;
  let reply = await c.join(room);
  for (let i = 0; i < retries && transient(reply) && c === conn && c.socket.connected; i++) {
    await new Promise((r) => setTimeout(r, 1000));
    reply = await c.join(room);
  }
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

/**
 * A `delivery` from the durable queue: shown once per `message_id` (the bridge re-sends what
 * was not acknowledged after a reconnect or a `getAll`), and acknowledged with `received` so
 * that the next connection does not replay it.
 */
function onDelivery(d) {
  if (!d || typeof d.vehicle !== "string") return;
  const id = d.message_id ?? null;
  const suspect = d.suspect ? ` (suspect: ${d.flag ?? "flagged"})` : d.flag ? ` (${d.flag})` : "";
  const shown = ui.feed.add({
    kind: "delivery",
    vehicle: d.vehicle,
    order: d.order,
    text: `${d.vehicle} ${DELIVERY_WORDS[d.kind] ?? d.kind} order ${d.order}${suspect}`,
    tone: d.suspect ? "suspect" : d.kind === "delivered" ? "done" : null,
    ts: d.ts_ms,
    messageId: id ?? undefined,
  });
  if (id === null || injecting) return;
  // A duplicate whose `received` was sent and answered (or is on its way) needs nothing; one
  // whose `received` failed is acknowledged again.
  if (shown || receipts.get(String(id)) === "failed") sendReceived(id);
  catchUp.maxId = Math.max(catchUp.maxId, Number(id) || 0);
  if (catchUp.active) {
    clearTimeout(catchUp.timer);
    catchUp.timer = setTimeout(catchUpStep, 400);
  }
}

async function sendReceived(id) {
  const c = conn;
  if (!c) return;
  const key = String(id);
  stats.received++;
  receipts.set(key, "sent");
  const reply = await c.received(id);
  receipts.set(key, reply.ok ? "ok" : "failed");
  if (receipts.size > 20_000) receipts.delete(receipts.keys().next().value);
}

/**
 * Catching up after a (re)connect: the bridge re-sends the first page of this token's queue by
 * itself; once that burst is over, `getAll` asks for what lies after it, page by page, until
 * the bridge says there is no more (each page's burst triggers the next step).
 */
const catchUp = { active: false, maxId: 0, timer: 0, pages: 0 };

function startCatchUp() {
  clearTimeout(catchUp.timer);
  Object.assign(catchUp, { active: true, maxId: 0, pages: 0 });
  // Nothing queued: no burst comes, and catching up ends.
  catchUp.timer = setTimeout(() => (catchUp.active = false), 5000);
}

async function catchUpStep() {
  const c = conn;
  if (!c || !catchUp.active) return;
  if (catchUp.pages++ >= 100) {
    catchUp.active = false;
    return;
  }
  const reply = await c.getAll(catchUp.maxId > 0 ? { after: catchUp.maxId } : {});
  if (!reply.ok || reply.next === null || reply.next === undefined || reply.count === 0) catchUp.active = false;
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
  ui.feed.add({ kind: "announce", text: `${a.from ?? "operator"}: ${a.message ?? ""}`, ts: a.ts_ms });
}

/** A `pickup` broadcast: an order placed by a store (or on a store's behalf). */
function onPickup(p) {
  if (!p || typeof p.order !== "string") return;
  const known = announced.has(p.order) || ui.board.get(p.order) !== undefined;
  ui.board.pickup(p);
  if (!known) {
    reloadFencesSoon(1000);
    announce(p.order, `${p.state ?? "created"}|${p.vehicle ?? ""}`);
    ui.feed.add({
      kind: "pickup",
      vehicle: p.vehicle ?? undefined,
      order: p.order,
      text: `${p.store ?? "a store"} placed order ${p.order} for ${p.customer ?? "a customer"}${p.vehicle ? ` → ${p.vehicle}` : ""}`,
      ts: p.ts_ms,
    });
  }
  afterOrderChange(p.order);
}

const ORDER_WORDS = {
  created: "waits for a vehicle",
  assigned: "assigned to",
  "picked-up": "picked up by",
  "in-transit": "in transit with",
  delivered: "delivered by",
  cancelled: "cancelled",
};

/** An `order` event: an order changed state (placed, assigned, picked up, ..., cancelled). */
function onOrder(o) {
  if (!o || typeof o.order !== "string") return;
  const before = ui.board.get(o.order);
  const prev = before ? { state: before.state, vehicle: before.vehicle } : null;
  const now = ui.board.upsert(o);
  if (!now) return;
  // Shown once per state and vehicle, whether the event or an HTTP answer reached the board first.
  const key = `${now.state}|${now.vehicle ?? ""}`;
  if (announced.get(now.order) !== key) {
    announce(now.order, key);
    let text;
    if (!prev && now.state === "created") text = `${now.store ?? "a store"} placed order ${now.order} for ${now.customer ?? "a customer"}`;
    else if (now.state === "created" && prev?.vehicle) text = `order ${now.order} taken from ${prev.vehicle}: offered again`;
    else if (now.state === "cancelled") text = `order ${now.order} cancelled${prev?.vehicle ? ` (was on ${prev.vehicle})` : ""}`;
    else text = `order ${now.order} ${ORDER_WORDS[now.state] ?? now.state}${now.vehicle && now.state !== "created" ? ` ${now.vehicle}` : ""}`;
    ui.feed.add({
      kind: "order",
      vehicle: now.vehicle ?? undefined,
      order: now.order,
      text,
      tone: now.state === "delivered" ? "done" : now.state === "cancelled" ? "cancelled" : null,
      ts: o.ts_ms,
    });
  }
  // A drop-off fence comes with each open order and goes with it.
  if (!prev || (TERMINAL.has(now.state) && !TERMINAL.has(prev.state))) reloadFencesSoon(1000);
  afterOrderChange(o.order);
}

function afterOrderChange(id) {
  renderStoreFilter();
  if (id === selectedOrder) {
    renderOrderDetail();
    const o = ui.board.get(id);
    if (!o) return;
    // Reassigned: the new vehicle is the one to follow.
    if (o.vehicle && o.vehicle !== selected && fleet.get(o.vehicle)) select(o.vehicle, { pan: false });
    if (o.vehicle !== orderTrack.vehicle) orderTrack = { order: o.order, vehicle: o.vehicle, points: [], loadedAt: 0 };
    loadOrderTrack(o);
    renderAssignChoices();
  }
}

/** What the feed last said about each order (`state|vehicle`), so each change shows once. */
const announced = new Map();

function announce(order, key) {
  announced.delete(order);
  announced.set(order, key);
  if (announced.size > 5000) announced.delete(announced.keys().next().value);
}

/** "north-0003 arrived at store-1" / "north-0003 left store-1". */
function fenceLabel(g) {
  if (g.kind === "store") return g.store ?? g.name ?? g.fence;
  if (g.kind === "dropoff") return `the customer of order ${g.order ?? g.name ?? g.fence}`;
  return g.name ?? g.fence;
}

function onGeofence(g) {
  if (!g || typeof g.vehicle !== "string") return;
  const verb = g.transition === "exit" ? "left" : "arrived at";
  ui.feed.add({
    kind: "geofence",
    vehicle: g.vehicle,
    order: g.order ?? undefined,
    text: `${g.vehicle} ${verb} ${fenceLabel(g)}`,
    tone: g.transition === "exit" ? "exit" : "enter",
    ts: g.ts_ms,
  });
}

let fencesReload = 0;
/** `geofences`: a custom fence was created, changed or deleted: reload the list (debounced). */
function onGeofencesChanged() {
  reloadFencesSoon(250);
}

function reloadFencesSoon(ms) {
  if (injecting) return;
  clearTimeout(fencesReload);
  fencesReload = setTimeout(loadFences, ms);
}

// ---- HTTP API ---------------------------------------------------------------------------------

/** Calls the bridge's HTTP API with the token: `{ok, status, data, error}`. */
async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  try {
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
    let data = null;
    try {
      data = r.status === 204 ? null : await r.json();
    } catch {
      // Not JSON: the status says enough.
    }
    return { ok: r.ok, status: r.status, data, error: r.ok ? null : (data?.error ?? `HTTP ${r.status}`) };
  } catch (err) {
    return { ok: false, status: 0, data: null, error: String(err?.message ?? err) };
  }
}

/** After every (re)connect: the orders, stores and fences as they are now, and the queue. */
function afterConnect() {
  loadOrders();
  loadStores();
  loadFences();
  startCatchUp();
}

async function loadOrders() {
  const r = await api("GET", "/api/orders?limit=1000");
  if (!r.ok || !Array.isArray(r.data?.orders)) return;
  for (const o of r.data.orders) {
    const held = ui.board.upsert(o);
    if (held && !announced.has(held.order)) announce(held.order, `${held.state}|${held.vehicle ?? ""}`);
  }
  renderStoreFilter();
}

async function loadStores() {
  const r = await api("GET", "/api/stores");
  if (!r.ok || !Array.isArray(r.data?.stores)) return;
  stores = r.data.stores.filter((x) => x && typeof x.store === "string");
  const sel = $("no-store");
  const keep = sel.value;
  sel.replaceChildren(...stores.map((x) => Object.assign(document.createElement("option"), { value: x.store, textContent: `${x.store} (${x.fleet})` })));
  if (stores.some((x) => x.store === keep)) sel.value = keep;
  renderStoreFilter();
}

async function loadFences() {
  const r = await api("GET", "/api/geofences");
  if (!r.ok || !Array.isArray(r.data?.geofences)) return;
  ui.fences.set(r.data.geofences.filter((f) => $("fence-auto").checked || f.kind === "custom"));
  renderFences(r.data.geofences);
}

function renderStoreFilter() {
  const sel = $("orders-store");
  const names = new Set([...ui.board.storeNames(), ...stores.map((x) => x.store)]);
  const want = [...names].sort();
  const have = [...sel.options].slice(1).map((o) => o.value);
  if (want.join("\n") === have.join("\n")) return;
  const keep = sel.value;
  sel.replaceChildren(
    Object.assign(document.createElement("option"), { value: "", textContent: "all stores" }),
    ...want.map((n) => Object.assign(document.createElement("option"), { value: n, textContent: n })),
  );
  sel.value = want.includes(keep) ? keep : "";
}

// ---- side panes, orders, fences -----------------------------------------------------------------

function showPane(pane) {
  for (const t of document.querySelectorAll(".side-tabs [data-pane]")) {
    const on = t.dataset.pane === pane;
    t.setAttribute("aria-selected", String(on));
    $(t.dataset.pane).hidden = !on;
  }
  if (pane === "vehicles-pane") ui.list.schedule();
  if (pane === "orders-pane") ui.board.schedule();
}

function wireOrders(board) {
  $("orders-state").addEventListener("change", (e) => board.setFilter({ state: e.target.value }));
  $("orders-store").addEventListener("change", (e) => board.setFilter({ store: e.target.value }));
  $("orders-search").addEventListener("input", (e) => board.setFilter({ text: e.target.value.trim() }));
  $("new-order").addEventListener("click", () => {
    const open = $("order-form").hidden;
    $("order-form").hidden = !open;
    $("new-order").setAttribute("aria-expanded", String(open));
    if (open) loadStores();
    else endMode();
  });
  $("no-cancel").addEventListener("click", () => {
    $("order-form").hidden = true;
    $("new-order").setAttribute("aria-expanded", "false");
    endMode();
  });
  $("no-pick").addEventListener("click", () => startMode("dropoff"));
  $("order-form").addEventListener("submit", (e) => {
    e.preventDefault();
    placeOrder();
  });
  $("o-close").addEventListener("click", () => selectOrder(null));
  $("o-cancel").addEventListener("click", cancelOrder);
  $("o-assign").addEventListener("click", reassignOrder);
  $("o-assign-vehicle").addEventListener("focus", renderAssignChoices);
}

function result(node, ok, text) {
  node.dataset.state = ok ? "ok" : "error";
  node.textContent = text;
}

async function placeOrder() {
  const out = $("no-result");
  const store = $("no-store").value;
  const customer = $("no-customer").value.trim();
  if (!store || !customer) return result(out, false, "Choose a store and a customer.");
  if (!newDropoff) return result(out, false, "Pick the drop-off on the map first.");
  const order = $("no-id").value.trim() || `d-${Date.now().toString(36)}`;
  out.dataset.state = "pending";
  out.textContent = "placing…";
  const r = await api("POST", "/api/orders", { order, customer, lat: newDropoff.lat, lon: newDropoff.lon, store });
  if (!r.ok) return result(out, false, `refused: ${r.error}`);
  result(out, true, `order ${r.data?.order ?? order} ${r.data?.state ?? "placed"}${r.data?.vehicle ? ` → ${r.data.vehicle}` : ""}`);
  $("no-id").value = "";
  newDropoff = null;
  $("no-dropoff").textContent = "no drop-off yet";
  ui.route.showPick(null);
  if (r.data && typeof r.data.order === "string" && r.data.store) ui.board.upsert(r.data);
}

async function cancelOrder() {
  const id = selectedOrder;
  if (!id) return;
  const out = $("o-result");
  out.dataset.state = "pending";
  out.textContent = "cancelling…";
  const r = await api("POST", `/api/orders/${encodeURIComponent(id)}/cancel`);
  if (!r.ok) return result(out, false, `cancel refused: ${r.error}`);
  if (r.data?.order) ui.board.upsert(r.data);
  const va = r.data?.vehicle_ack ? ` · vehicle answered ${r.data.vehicle_ack}` : "";
  result(out, true, `cancelled${va}`);
  afterOrderChange(id);
}

async function reassignOrder() {
  const id = selectedOrder;
  const vehicle = $("o-assign-vehicle").value;
  if (!id) return;
  const out = $("o-result");
  if (!vehicle) return result(out, false, "Choose a vehicle.");
  out.dataset.state = "pending";
  out.textContent = `assigning to ${vehicle}…`;
  const r = await api("POST", `/api/orders/${encodeURIComponent(id)}/assign`, { vehicle });
  if (!r.ok) return result(out, false, `reassign refused: ${r.error}`);
  if (r.data?.order) ui.board.upsert(r.data);
  result(out, true, `assigned to ${r.data?.vehicle ?? vehicle}`);
  afterOrderChange(id);
}

/** Vehicles a dispatcher may hand the selected order to: online, of its fleet, free, nearest first. */
function renderAssignChoices() {
  const o = selectedOrder ? ui.board.get(selectedOrder) : null;
  const sel = $("o-assign-vehicle");
  if (!o) return sel.replaceChildren();
  const busy = new Set();
  for (const x of ui.board.orders.values()) if (x.vehicle && !TERMINAL.has(x.state) && x.order !== o.order) busy.add(x.vehicle);
  const target = o.pickup ?? o.dropoff;
  const choices = [];
  for (const v of fleet.vehicles.values()) {
    if (v.status !== "online" || !v.pos || busy.has(v.id) || v.id === o.vehicle) continue;
    if (o.fleet && v.fleet !== o.fleet) continue;
    choices.push({ id: v.id, d: target ? distanceM(v.pos, target) : 0 });
  }
  choices.sort((a, b) => a.d - b.d);
  const keep = sel.value;
  sel.replaceChildren(
    ...choices.slice(0, 40).map((c) =>
      Object.assign(document.createElement("option"), { value: c.id, textContent: `${c.id} · ${(c.d / 1000).toFixed(1)} km` }),
    ),
  );
  if (choices.some((c) => c.id === keep)) sel.value = keep;
}

function selectOrder(id) {
  const o = id ? ui.board.get(id) : undefined;
  selectedOrder = o ? id : null;
  ui.board.select(selectedOrder);
  $("o-result").textContent = "";
  delete $("o-result").dataset.state;
  if (!o) {
    orderTrack = { order: null, vehicle: null, points: [], loadedAt: 0 };
    ui.route.show(null);
    renderOrderDetail();
    return;
  }
  if (o.vehicle && fleet.get(o.vehicle)) select(o.vehicle, { pan: false });
  orderTrack = { order: o.order, vehicle: o.vehicle, points: [], loadedAt: Date.now() };
  loadOrderTrack(o);
  renderAssignChoices();
  renderOrderDetail();
  drawRoute();
  const b = ui.route.bounds();
  if (b?.isValid()) {
    autoFit = false;
    fitting = true;
    try {
      ui.map.fitBounds(b, { padding: [60, 60], maxZoom: 17, animate: false });
    } finally {
      fitting = false;
    }
  }
}

/** The way the order's vehicle drove since the order was placed, from the stored track. */
async function loadOrderTrack(o) {
  orderTrack.loadedAt = Date.now();
  if (!o.vehicle) {
    orderTrack = { order: o.order, vehicle: null, points: [], loadedAt: Date.now() };
    return;
  }
  // The track is in the vehicle's clock (a simulator's may run fast): count back from its
  // latest heartbeat by the wall-clock time since the order was placed.
  const wall = Date.now();
  const device = fleet.get(o.vehicle)?.pos?.ts_ms ?? wall;
  const placed = o.created_ms ?? wall - 3_600_000;
  const from = Math.max(0, Math.floor(device - (wall - placed)));
  const to = TERMINAL.has(o.state) && o.updated_ms ? `&to=${Math.ceil(device - (wall - o.updated_ms))}` : "";
  const r = await api("GET", `/api/vehicles/${encodeURIComponent(o.vehicle)}/track?from=${from}${to}&limit=5000`);
  if (selectedOrder !== o.order) return;
  const pts = r.ok && Array.isArray(r.data?.points) ? r.data.points : [];
  orderTrack = {
    order: o.order,
    vehicle: o.vehicle,
    points: pts.filter((p) => Number.isFinite(p.lat) && Number.isFinite(p.lon)).map((p) => [p.lat, p.lon]),
    loadedAt: Date.now(),
  };
  drawRoute();
}

/** The route of the selected order: `{order, vehicle, pickup, dropoff, driven, planned, points}`. */
function currentRoute() {
  const o = selectedOrder ? ui.board.get(selectedOrder) : null;
  if (!o) return null;
  const v = o.vehicle ? fleet.get(o.vehicle) : null;
  const open = !TERMINAL.has(o.state);
  const driven = orderTrack.order === o.order && orderTrack.vehicle === o.vehicle ? orderTrack.points.slice() : [];
  const here = v?.pos && open ? [v.pos.lat, v.pos.lon] : null;
  if (here) driven.push(here);
  const planned = [];
  if (open) {
    if (here) planned.push(here);
    if ((o.state === "created" || o.state === "assigned") && o.pickup) planned.push([o.pickup.lat, o.pickup.lon]);
    if (o.dropoff) planned.push([o.dropoff.lat, o.dropoff.lon]);
  }
  return {
    order: o.order,
    vehicle: o.vehicle ?? null,
    pickup: o.pickup,
    dropoff: o.dropoff,
    driven,
    planned,
    points: [...driven, ...planned.slice(here ? 1 : 0)],
  };
}

function drawRoute() {
  if (!ui) return;
  ui.route.show(currentRoute());
}

function renderOrderDetail() {
  const o = selectedOrder ? ui.board.get(selectedOrder) : null;
  $("order-detail").hidden = !o;
  if (!o) return;
  $("o-id").textContent = o.order;
  $("o-state").textContent = o.state;
  $("o-state").dataset.state = o.state;
  $("o-store").textContent = o.store ?? "—";
  $("o-customer").textContent = o.customer ?? "—";
  $("o-vehicle").textContent = o.vehicle ?? "none yet";
  const age = ago(o.created_ms);
  $("o-age").textContent = age === "now" || age === "—" ? age : `${age} ago`;
  $("o-eta").textContent = TERMINAL.has(o.state) ? "—" : duration(etaSeconds(o, fleet));
  const open = !TERMINAL.has(o.state);
  $("o-cancel").disabled = !open;
  const canReassign = o.state === "created" || o.state === "assigned";
  $("o-assign").disabled = !canReassign;
  $("o-assign-vehicle").disabled = !canReassign;
}

function wireFences() {
  $("fence-draw").addEventListener("click", () => startMode("fence-centre"));
  $("fence-cancel").addEventListener("click", endMode);
  $("fence-auto").addEventListener("change", loadFences);
  $("fence-radius").addEventListener("input", () => {
    const r = Number($("fence-radius").value);
    if (fenceCentre && r > 0) ui.fences.showPreview(fenceCentre, r);
  });
  $("fence-form").addEventListener("submit", (e) => {
    e.preventDefault();
    saveFence();
  });
  $("fence-list").addEventListener("click", (e) => {
    const b = e.target.closest("[data-delete]");
    if (b) deleteFence(b.dataset.delete);
  });
}

function renderFences(list) {
  const custom = list.filter((f) => f.kind === "custom");
  const auto = list.length - custom.length;
  $("fences-count").textContent = String(list.length);
  $("fence-list").replaceChildren(
    ...custom.map((f) => {
      const li = el("li", "");
      li.dataset.fence = f.id;
      const shape = f.shape?.type === "circle" ? `circle ${Math.round(f.shape.radius_m)} m` : `polygon ${f.shape?.points?.length ?? "?"} points`;
      li.append(el("span", "name", f.name ?? f.id), el("span", "hint", `${f.fleet} · ${shape}`));
      const x = el("button", "", "Delete");
      x.type = "button";
      x.dataset.delete = f.id;
      x.dataset.testid = `fence-delete-${f.id}`;
      li.append(x);
      return li;
    }),
    el("li", "hint", `${auto} automatic fence${auto === 1 ? "" : "s"} (stores, drop-offs)`),
  );
}

async function saveFence() {
  const name = $("fence-name").value.trim();
  const fleetName = $("fence-fleet").value;
  const radius = Number($("fence-radius").value);
  if (!fenceCentre || !name || !fleetName || !(radius > 0)) return result($("fence-result"), false, "Name, fleet and radius are needed.");
  const r = await api("POST", "/api/geofences", {
    name,
    fleet: fleetName,
    shape: { type: "circle", lat: fenceCentre.lat, lon: fenceCentre.lon, radius_m: radius },
  });
  if (!r.ok) return result($("fence-result"), false, `refused: ${r.error}`);
  result($("fence-result"), true, `fence ${r.data?.name ?? name} saved`);
  endMode();
  loadFences();
}

async function deleteFence(id) {
  const r = await api("DELETE", `/api/geofences/${encodeURIComponent(id)}`);
  if (!r.ok) return result($("fence-result"), false, `cannot delete: ${r.error}`);
  result($("fence-result"), true, "fence deleted");
  loadFences();
}

// ---- map modes: choosing a drop-off, drawing a fence ------------------------------------------

function startMode(m) {
  endMode();
  mode = m;
  $("map").classList.add("fb-picking");
  if (m === "dropoff") {
    $("no-dropoff").textContent = "click the drop-off on the map (Esc: stop)";
  } else {
    $("fence-hint").hidden = false;
    $("fence-hint").textContent = "Click the fence's centre on the map (Esc: stop).";
  }
}

function endMode() {
  if (mode === "dropoff" && !newDropoff) $("no-dropoff").textContent = "no drop-off yet";
  if (mode?.startsWith("fence")) {
    ui.fences.showPreview(null);
    fenceCentre = null;
    $("fence-form").hidden = true;
    $("fence-hint").hidden = true;
  }
  mode = null;
  $("map").classList.remove("fb-picking");
}

/** A click on the map in a mode: taken here (true), else it selects a vehicle. */
function mapClick(e) {
  const p = { lat: e.latlng.lat, lon: e.latlng.lng };
  if (mode === "dropoff") {
    newDropoff = p;
    ui.route.showPick(p);
    $("no-dropoff").textContent = `drop-off ${p.lat.toFixed(5)}, ${p.lon.toFixed(5)}`;
    mode = null;
    $("map").classList.remove("fb-picking");
    return true;
  }
  if (mode === "fence-centre") {
    fenceCentre = p;
    mode = "fence-radius";
    ui.fences.showPreview(p, 10);
    $("fence-hint").textContent = "Click the edge of the fence (or type the radius).";
    openFenceForm(50);
    return true;
  }
  if (mode === "fence-radius") {
    const r = Math.max(5, Math.round(distanceM(fenceCentre, p)));
    $("fence-radius").value = String(r);
    ui.fences.showPreview(fenceCentre, r);
    mode = "fence-form";
    $("map").classList.remove("fb-picking");
    $("fence-hint").textContent = "Name the fence and save it.";
    $("fence-name").focus();
    return true;
  }
  return false;
}

function mapMove(e) {
  if (mode !== "fence-radius" || !fenceCentre) return;
  const r = Math.max(5, Math.round(distanceM(fenceCentre, { lat: e.latlng.lat, lon: e.latlng.lng })));
  $("fence-radius").value = String(r);
  ui.fences.showPreview(fenceCentre, r);
}

function openFenceForm(radius) {
  const sel = $("fence-fleet");
  const names = fleet.fleetNames();
  const keep = sel.value;
  sel.replaceChildren(...names.map((n) => Object.assign(document.createElement("option"), { value: n, textContent: n })));
  if (names.includes(keep)) sel.value = keep;
  if (!$("fence-radius").value) $("fence-radius").value = String(radius);
  if (!$("fence-name").value) $("fence-name").value = `fence ${clock(Date.now())}`;
  $("fence-form").hidden = false;
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
      orders: ui?.board.size ?? 0,
      fences: ui?.fences.size ?? 0,
      feedIds: ui?.feed.ids() ?? [],
      duplicatesDropped: ui?.feed.duplicatesDropped ?? 0,
      selectedOrder,
    };
  },
  /** The orders as the board shows them (filtered, newest first). */
  orders() {
    if (!ui) return [];
    return ui.board.shown().map((o) => ({
      order: o.order,
      state: o.state,
      store: o.store ?? null,
      vehicle: o.vehicle ?? null,
      etaS: TERMINAL.has(o.state) ? null : etaSeconds(o, fleet),
    }));
  },
  /** The feed, newest first: `[{kind, text, messageId?}]`. */
  feed() {
    return ui ? ui.feed.snapshot() : [];
  },
  /** Selects an order on the board (pins, route, its vehicle); null deselects. */
  selectOrder(id) {
    selectOrder(id ?? null);
    return selectedOrder;
  },
  /** The selected order's route as drawn: `{order, pickup, dropoff, points}` or null. */
  route() {
    return currentRoute();
  },
  /** The geofences drawn: `[Fence]`. */
  fenceList() {
    return ui ? [...ui.fences.fences.values()] : [];
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
    const handlers = EVENT_HANDLERS;
    if (!Object.hasOwn(handlers, event)) throw new Error(`no handler for ${event}`);
    injecting = true;
    try {
      handlers[event](payload);
    } finally {
      injecting = false;
    }
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
