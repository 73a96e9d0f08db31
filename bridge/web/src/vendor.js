// Fleetbeat store page (`/vendor`): a store logs in with its token (Socket.IO namespace
// `/vendor`, docs/socketio.md), places orders (drop-off clicked on the map), follows them live
// (`order`, `pickup`, `delivery`, `geofence` events), and after being offline sees what it
// missed: the bridge re-sends the store's pending `delivery` messages on connect, the page pages
// through the rest with `getAll`, shows each once (by `message_id`) and acknowledges it with
// `received`.

import "leaflet/dist/leaflet.css";
import "./style.css";
import "./vendor.css";
import * as L from "leaflet";
import { io } from "socket.io-client";
import { clock, el } from "./format.js";
import { createBaseMap, loadConfig } from "./map.js";

const TOKEN_KEY = "fleetbeat.vendor.token";
const ACK_MS = 10_000;
const FEED_CAP = 200;
/** The order states in their usual sequence (`cancelled` ends an order at any point). */
const STATES = ["created", "assigned", "picked-up", "in-transit", "delivered", "cancelled"];
const TERMINAL = new Set(["delivered", "cancelled"]);
const STATE_COLOURS = {
  created: "#6b7684",
  assigned: "#1d4ed8",
  "picked-up": "#b45309",
  "in-transit": "#e08a00",
  delivered: "#1f9d55",
  cancelled: "#c0362c",
};
/** A delivery event's kind → the order state it moves to. */
const KIND_STATE = { pickup: "picked-up", "in-transit": "in-transit", delivered: "delivered" };
const KIND_WORDS = { pickup: "picked up", "in-transit": "is on its way with", delivered: "delivered" };
const $ = (id) => document.getElementById(id);

let conn = null;
let token = null;
let map = null;
let store = null; // {store, fleet, lat, lon} once known
let selected = null;
let dropoff = null; // {lat, lon} chosen for the next order
let dropoffMarker = null;
let storeMarker = null;
let caughtUp = false;
let generation = 0;
/** Counts connects: a catch-up of an earlier connection stops when a newer one starts. */
let connects = 0;
/** Whether the order id field holds a typed id (not a generated one). */
let idTyped = false;
/** The map is centred on the store once per page load, not at every reconnect. */
let centred = false;
/** Orders by id: the Order JSON plus `last` (the newest event position) and `missed`. */
const orders = new Map();
const orderLayers = new Map();
/** Delivery message ids shown (the newest `SEEN_CAP`, oldest first in `seenOrder`). */
const seen = new Set();
const seenOrder = [];
const SEEN_CAP = 20_000;
/** Of those, the ones the bridge confirmed as received, and the ones it has not yet. */
const acked = new Set();
const unacked = new Set();
const acking = new Set();
const feedEntries = [];
const missedEntries = [];
const stats = { received: 0, duplicatesDropped: 0, receivedErrors: 0, getAllPages: 0 };

boot().catch((err) => {
  document.body.textContent = `The page could not start: ${err}`;
});

async function boot() {
  const config = await loadConfig();
  buildUi(config);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) login(saved);
  else showLogin();
}

function buildUi(config) {
  $("app").hidden = false; // Leaflet needs a sized container
  map = createBaseMap($("map"), config);
  new ResizeObserver(() => map.invalidateSize({ pan: false })).observe($("map"));
  map.createPane("orders").style.zIndex = 450;
  $("app").hidden = true;
  map.on("click", (e) => setDropoff(e.latlng.lat, e.latlng.lng));
  stateLegend().addTo(map);

  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("token").value.trim();
    if (t) login(t);
  });
  $("logout").addEventListener("click", logout);
  $("banner-close").addEventListener("click", () => ($("banner").hidden = true));
  $("v-new-id").addEventListener("click", () => {
    $("v-order").value = newOrderId();
    idTyped = false;
  });
  $("v-order").addEventListener("input", () => (idTyped = true));
  $("place").addEventListener("submit", (e) => {
    e.preventDefault();
    placeOrder();
  });
  $("orders-filter").addEventListener("change", renderOrders);
  $("orders").addEventListener("click", (e) => {
    const row = e.target.closest("[data-order]");
    if (row) selectOrder(row.dataset.order);
  });
  $("o-close").addEventListener("click", () => selectOrder(null));
  $("o-cancel").addEventListener("click", () => cancelOrder(selected));
  $("v-order").value = newOrderId();
  setInterval(renderOrders, 5000); // ages
}

/** What the pins' colours mean, bottom left. */
function stateLegend() {
  const control = L.control({ position: "bottomleft" });
  control.onAdd = () => {
    const box = L.DomUtil.create("div", "fb-legend leaflet-control");
    for (const [state, colour] of Object.entries(STATE_COLOURS)) {
      const item = L.DomUtil.create("span", "", box);
      const swatch = L.DomUtil.create("i", "", item);
      swatch.style.background = colour;
      swatch.style.borderRadius = "50%";
      item.append(state);
    }
    return box;
  };
  return control;
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

function login(t) {
  conn?.close();
  $("login-submit").disabled = true;
  $("login-error").hidden = true;
  const gen = ++generation;
  let established = false;
  const socket = io("/vendor", {
    auth: { token: t },
    transports: ["websocket", "polling"],
    reconnectionDelay: 500,
    reconnectionDelayMax: 5000,
  });
  const c = { socket, close: () => socket.disconnect() };
  conn = c;
  const mine = (fn) => (...args) => {
    if (gen === generation) fn(...args);
  };
  socket.on(
    "connect",
    mine(() => {
      established = true;
      token = t;
      sessionStorage.setItem(TOKEN_KEY, t);
      $("login").hidden = true;
      $("app").hidden = false;
      map.invalidateSize();
      setConn("up", "live");
      // Whatever arrives until the queue is paged through was missed while offline.
      caughtUp = false;
      renderCatchup();
      refresh(gen, ++connects);
    }),
  );
  socket.on(
    "connect_error",
    mine((err) => {
      const message = err?.message || String(err);
      if (socket.active) {
        if (!established) {
          $("login-submit").disabled = false;
          $("login-error").hidden = false;
          $("login-error").textContent = `Cannot reach the bridge (${message}); retrying…`;
        }
        setConn("down", `bridge unreachable: ${message} — retrying`);
      } else {
        conn = null;
        socket.disconnect();
        sessionStorage.removeItem(TOKEN_KEY);
        resetView();
        showLogin(`The bridge refused the token: ${message}`);
      }
    }),
  );
  socket.on(
    "disconnect",
    mine((reason) => {
      caughtUp = false;
      renderCatchup();
      setConn("down", reason === "io client disconnect" ? "disconnected" : `disconnected (${reason}) — reconnecting`);
    }),
  );
  socket.on("delivery", mine(onDelivery));
  socket.on("order", mine(onOrder));
  socket.on("pickup", mine(onPickup));
  socket.on("geofence", mine(onGeofence));
  socket.on("announce", mine(onAnnounce));
}

function logout() {
  generation++;
  conn?.close();
  conn = null;
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  resetView();
  $("token").value = "";
  showLogin();
}

function resetView() {
  orders.clear();
  for (const g of orderLayers.values()) g.remove();
  orderLayers.clear();
  seen.clear();
  seenOrder.length = 0;
  acked.clear();
  unacked.clear();
  acking.clear();
  feedEntries.length = 0;
  missedEntries.length = 0;
  Object.assign(stats, { received: 0, duplicatesDropped: 0, receivedErrors: 0, getAllPages: 0 });
  store = null;
  storeMarker?.remove();
  storeMarker = null;
  selectOrder(null);
  setDropoff(null);
  $("feed").replaceChildren();
  $("missed").replaceChildren();
  $("missed-box").hidden = true;
  $("banner").hidden = true;
  $("store").textContent = "";
  renderOrders();
  renderCounts();
}

function setConn(state, text) {
  $("conn").dataset.state = state;
  $("conn").textContent = text;
}

async function ack(event, payload) {
  const socket = conn?.socket;
  if (!socket) return { ok: false, error: "not connected" };
  try {
    const reply = payload === undefined ? await socket.timeout(ACK_MS).emitWithAck(event) : await socket.timeout(ACK_MS).emitWithAck(event, payload);
    return reply && typeof reply === "object" ? reply : { ok: false, error: `unexpected answer ${JSON.stringify(reply)}` };
  } catch {
    return { ok: false, error: `no answer from the bridge within ${ACK_MS / 1000} s` };
  }
}

async function api(path, init = {}) {
  const r = await fetch(path, {
    ...init,
    headers: { Authorization: `Bearer ${token ?? ""}`, ...(init.headers ?? {}) },
    cache: "no-store",
  });
  let body = null;
  try {
    body = await r.json();
  } catch {
    // no JSON body
  }
  if (!r.ok) throw new Error(body?.error ?? `HTTP ${r.status}`);
  return body;
}

/** After every (re)connect: the store, its orders, then everything pending in the queue. */
async function refresh(gen, connect) {
  await Promise.all([loadStore(), loadOrders()]);
  if (gen !== generation || connect !== connects) return;
  await catchUp(gen, connect);
}

async function loadStore() {
  try {
    const body = await api("/api/stores");
    const s = body?.stores?.[0];
    if (s) {
      store = s;
      $("store").textContent = s.store;
      // The generated id names the store once it is known (unless one was typed meanwhile).
      if (!idTyped) $("v-order").value = newOrderId();
      if (Number.isFinite(s.lat) && Number.isFinite(s.lon)) {
        storeMarker?.remove();
        storeMarker = L.marker([s.lat, s.lon], {
          pane: "orders",
          icon: L.divIcon({ className: "v-store-pin", html: "<span>▣</span>", iconSize: [22, 22] }),
          title: s.store,
          keyboard: false,
        }).addTo(map);
        storeMarker.bindTooltip(`${s.store} (your store)`);
        if (!centred) {
          centred = true;
          map.setView([s.lat, s.lon], 15, { animate: false });
        }
      }
    }
  } catch (err) {
    addFeed({ kind: "error", text: `Cannot read the store: ${err.message}` });
  }
}

async function loadOrders() {
  try {
    const body = await api("/api/orders?limit=200");
    for (const o of body?.orders ?? []) upsert(o);
    if (!store && body?.orders?.[0]) {
      store = { store: body.orders[0].store, fleet: body.orders[0].fleet };
      $("store").textContent = store.store;
    }
    renderOrders();
  } catch (err) {
    addFeed({ kind: "error", text: `Cannot list the orders: ${err.message}` });
  }
}

/**
 * Pages through the store's pending messages (`getAll` with the cursor until `next` is null):
 * each comes as a `delivery` event, shown once and acknowledged; then the page is caught up.
 */
async function catchUp(gen, connect) {
  let after = null;
  let failures = 0;
  for (let page = 0; page < 10_000; page++) {
    const reply = await ack("getAll", after === null ? {} : { after });
    if (gen !== generation || connect !== connects || !conn?.socket.connected) return; // the next connect starts again
    if (!reply.ok) {
      if (++failures < 3) {
        await new Promise((r) => setTimeout(r, 2000));
        page--;
        continue;
      }
      addFeed({ kind: "error", text: `Cannot fetch missed messages: ${reply.error ?? "refused"}` });
      break;
    }
    stats.getAllPages++;
    if (reply.next === null || reply.next === undefined) break;
    after = reply.next;
  }
  // The last page's events were emitted before its ack: they are all in.
  caughtUp = true;
  renderCatchup();
}

function renderCatchup() {
  const box = $("catchup");
  const missed = missedEntries.length;
  if (!conn?.socket.connected) box.textContent = "";
  else if (!caughtUp) box.textContent = "catching up…";
  else box.textContent = missed ? `caught up · ${missed} missed while offline` : "up to date";
  box.dataset.caughtUp = String(caughtUp);
}

// ---- events --------------------------------------------------------------------------------

function rank(state) {
  const i = STATES.indexOf(state);
  return i < 0 ? 0 : i;
}

/** Inserts or updates an order from a (possibly partial) Order object. */
function upsert(o) {
  if (!o || typeof o.order !== "string") return null;
  const old = orders.get(o.order);
  const next = { ...(old ?? { state: "created", created_ms: o.ts_ms ?? Date.now() }), ...o };
  delete next.ts_ms;
  delete next.timeline;
  // A late or repeated event must not move an order back (an `order` event is authoritative).
  if (old && o.state && !o.authoritative && (TERMINAL.has(old.state) || rank(o.state) < rank(old.state))) next.state = old.state;
  delete next.authoritative;
  next.last = o.last ?? old?.last ?? null;
  orders.set(o.order, next);
  drawOrder(next);
  return next;
}

function onOrder(o) {
  if (!o || typeof o.order !== "string") return;
  const before = orders.get(o.order);
  const now = upsert({ ...o, authoritative: true });
  if (!before || before.state !== now.state || before.vehicle !== now.vehicle) {
    const who = now.vehicle ? ` · ${now.vehicle}` : "";
    addFeed({ kind: "order", order: o.order, text: `order ${o.order}: ${now.state}${who}`, ts: o.ts_ms });
  }
  scheduleRender();
}

function onPickup(p) {
  if (!p || typeof p.order !== "string") return;
  const known = orders.has(p.order);
  upsert({
    order: p.order,
    store: p.store,
    customer: p.customer,
    vehicle: p.vehicle ?? null,
    state: p.state ?? "created",
    dropoff: { lat: p.lat, lon: p.lon },
    ts_ms: p.ts_ms,
  });
  if (!known) addFeed({ kind: "pickup", order: p.order, text: `order ${p.order} placed for ${p.customer}`, ts: p.ts_ms });
  scheduleRender();
}

function onDelivery(d) {
  if (!d || typeof d.order !== "string") return;
  const id = d.message_id;
  const hasId = id !== undefined && id !== null;
  if (hasId && seen.has(String(id))) {
    stats.duplicatesDropped++;
    // Shown already; if its acknowledgement never got through, send it again.
    if (!acked.has(String(id))) sendReceived(id);
    return;
  }
  const missed = !caughtUp;
  if (hasId) remember(String(id));
  const state = KIND_STATE[d.kind];
  const pos = Number.isFinite(d.lat) && Number.isFinite(d.lon) ? { lat: d.lat, lon: d.lon } : null;
  const known = orders.get(d.order);
  upsert({
    order: d.order,
    store: d.store ?? known?.store,
    vehicle: d.vehicle ?? known?.vehicle ?? null,
    state: state ?? known?.state,
    last: pos ? { ...pos, kind: d.kind, ts_ms: d.ts_ms, vehicle: d.vehicle } : known?.last,
    updated_ms: Math.max(known?.updated_ms ?? 0, d.ts_ms ?? 0),
  });
  const text = `${d.vehicle} ${KIND_WORDS[d.kind] ?? d.kind} order ${d.order}${d.flag ? ` (${d.flag})` : ""}`;
  const entry = addFeed({ kind: "delivery", order: d.order, text, ts: d.ts_ms, messageId: hasId ? id : undefined, missed });
  if (missed) addMissed(entry);
  if (hasId) sendReceived(id);
  scheduleRender();
}

function remember(key) {
  seen.add(key);
  unacked.add(key);
  seenOrder.push(key);
  if (seenOrder.length > SEEN_CAP) {
    const old = seenOrder.shift();
    seen.delete(old);
    acked.delete(old);
    unacked.delete(old);
  }
}

async function sendReceived(id) {
  const key = String(id);
  if (acking.has(key)) return;
  acking.add(key);
  const gen = generation;
  const reply = await ack("received", { messageId: Number(id) });
  acking.delete(key);
  if (gen !== generation) return;
  if (reply.ok) {
    if (seen.has(key) && !acked.has(key)) {
      acked.add(key);
      unacked.delete(key);
      stats.received++;
    }
    for (const li of document.querySelectorAll(`[data-message-id="${CSS.escape(key)}"]`)) li.dataset.acked = "true";
    for (const e of [...feedEntries, ...missedEntries]) if (e.messageId !== undefined && String(e.messageId) === key) e.acked = true;
  } else {
    stats.receivedErrors++;
  }
  renderCounts();
}

function onGeofence(g) {
  if (!g || typeof g.vehicle !== "string") return;
  const arrive = g.transition === "enter";
  let where = g.name ?? g.fence;
  if (g.kind === "dropoff" || (g.order && g.kind !== "store")) where = `the customer of order ${g.order}`;
  else if (g.kind === "store") where = g.store ?? g.name ?? "the store";
  addFeed({ kind: "geofence", order: g.order, text: `${g.vehicle} ${arrive ? "arrived at" : "left"} ${where}`, ts: g.ts_ms });
  if (!Number.isFinite(g.lat) || !Number.isFinite(g.lon)) return;
  // Where the vehicle is now, for the order the event names, or (a store fence names none) for
  // this store's open orders that vehicle carries.
  // (A drop-off fence tells about any vehicle passing by: only the order's own vehicle moves it.)
  const concerned = [...(g.order ? [orders.get(g.order)].filter(Boolean) : orders.values())].filter(
    (o) => o.vehicle === g.vehicle && !TERMINAL.has(o.state),
  );
  const what = `${arrive ? "arrived at" : "left"} ${g.kind === "dropoff" ? "the customer" : g.kind === "store" ? "the store" : where}`;
  for (const o of concerned) {
    upsert({ order: o.order, last: { lat: g.lat, lon: g.lon, kind: what, ts_ms: g.ts_ms, vehicle: g.vehicle }, state: o.state });
  }
  if (concerned.length) scheduleRender();
}

function onAnnounce(a) {
  if (!a) return;
  $("banner-text").textContent = a.message ?? "";
  $("banner-meta").textContent = `— ${a.from ?? "operator"}, ${clock(a.ts_ms ?? Date.now())}`;
  $("banner").hidden = false;
}

// ---- feed ------------------------------------------------------------------------------------

function feedItem(e) {
  const li = el("li", `k-${e.kind}`);
  if (e.order) li.dataset.order = e.order;
  if (e.messageId !== undefined) {
    li.dataset.messageId = String(e.messageId);
    li.dataset.acked = String(acked.has(String(e.messageId)));
  }
  const text = el("span", "text", e.text);
  if (e.messageId !== undefined) text.append(el("span", "tick", " ✓"));
  li.append(el("time", "", clock(e.ts)), el("span", "kind", e.kind), text);
  return li;
}

function addFeed({ kind, order, text, ts, messageId, missed = false }) {
  const entry = { kind, order, text, ts: ts ?? Date.now(), messageId, missed, acked: false };
  feedEntries.push(entry);
  if (feedEntries.length > FEED_CAP * 2) feedEntries.splice(0, feedEntries.length - FEED_CAP);
  const list = $("feed");
  list.prepend(feedItem(entry));
  while (list.childElementCount > FEED_CAP) list.lastElementChild.remove();
  return entry;
}

function addMissed(entry) {
  missedEntries.push(entry);
  $("missed-box").hidden = false;
  const list = $("missed");
  list.prepend(feedItem(entry));
  while (list.childElementCount > FEED_CAP) list.lastElementChild.remove();
  renderCounts();
  renderCatchup();
}

function renderCounts() {
  const pending = unacked.size;
  const missedAcked = missedEntries.filter((e) => e.messageId !== undefined && acked.has(String(e.messageId))).length;
  $("missed-count").textContent = `${missedAcked}/${missedEntries.length} acknowledged`;
  $("ack-count").textContent = `${stats.received} acknowledged${pending ? ` · ${pending} pending` : ""}`;
}

// ---- orders: list, map, detail ------------------------------------------------------------

let renderFrame = 0;
function scheduleRender() {
  if (renderFrame) return;
  renderFrame = requestAnimationFrame(() => {
    renderFrame = 0;
    renderOrders();
    renderDetail();
  });
}

function visibleOrders() {
  const filter = $("orders-filter").value;
  return [...orders.values()]
    .filter((o) => filter === "all" || (filter === "open") !== TERMINAL.has(o.state))
    .sort((a, b) => (b.created_ms ?? 0) - (a.created_ms ?? 0));
}

function age(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h`;
}

function renderOrders() {
  const rows = visibleOrders().slice(0, 300);
  $("orders").replaceChildren(
    ...rows.map((o) => {
      const li = el("li", "order-row");
      li.dataset.order = o.order;
      li.dataset.state = o.state;
      li.setAttribute("aria-selected", String(o.order === selected));
      const badge = el("span", "badge", o.state);
      badge.style.background = STATE_COLOURS[o.state] ?? "#6b7684";
      li.append(
        el("span", "oid", o.order),
        badge,
        el("span", "who", o.customer ?? ""),
        el("span", "veh", o.vehicle ?? "—"),
        el("span", "age", age(o.created_ms)),
      );
      return li;
    }),
  );
  $("orders-empty").hidden = rows.length > 0;
  const open = [...orders.values()].filter((o) => !TERMINAL.has(o.state)).length;
  $("orders-count").textContent = `${open} open · ${orders.size}`;
}

function drawOrder(o) {
  let group = orderLayers.get(o.order);
  if (!group) {
    group = L.layerGroup().addTo(map);
    orderLayers.set(o.order, group);
  }
  group.clearLayers();
  const colour = STATE_COLOURS[o.state] ?? "#6b7684";
  const isSel = o.order === selected;
  const drop = o.dropoff && Number.isFinite(o.dropoff.lat) ? [o.dropoff.lat, o.dropoff.lon] : null;
  // Finished orders stay on the map faintly (delivered) or not at all (cancelled), unless selected.
  if (o.state === "cancelled" && !isSel) return;
  const faint = TERMINAL.has(o.state) && !isSel;
  if (o.last && drop && !TERMINAL.has(o.state)) {
    group.addLayer(L.polyline([[o.last.lat, o.last.lon], drop], { pane: "orders", color: colour, weight: 2, dashArray: "4 6", interactive: false }));
  }
  if (drop) {
    const pin = L.circleMarker(drop, {
      pane: "orders",
      radius: isSel ? 9 : 6,
      color: isSel ? "#1c2430" : "#ffffff",
      weight: 2,
      fillColor: colour,
      fillOpacity: faint ? 0.35 : 1,
      opacity: faint ? 0.5 : 1,
      bubblingMouseEvents: false,
    });
    pin.bindTooltip(`${o.order} · ${o.customer ?? ""} · ${o.state}`);
    pin.on("click", () => selectOrder(o.order));
    group.addLayer(pin);
  }
  if (o.last && !faint) {
    const where = L.circleMarker([o.last.lat, o.last.lon], {
      pane: "orders",
      radius: 5,
      color: colour,
      weight: 2,
      fillColor: "#ffffff",
      fillOpacity: 1,
      bubblingMouseEvents: false,
    });
    where.bindTooltip(`${o.last.vehicle ?? o.vehicle ?? ""} ${o.last.kind ?? ""} · ${clock(o.last.ts_ms ?? Date.now())}`);
    where.on("click", () => selectOrder(o.order));
    group.addLayer(where);
  }
  const from = o.pickup && Number.isFinite(o.pickup.lat) ? [o.pickup.lat, o.pickup.lon] : null;
  if (isSel && from && drop && !o.last && !TERMINAL.has(o.state)) {
    group.addLayer(L.polyline([from, drop], { pane: "orders", color: colour, weight: 2, dashArray: "2 6", opacity: 0.8, interactive: false }));
  }
  if (isSel && o.timelinePoints?.length > 1) {
    group.addLayer(L.polyline(o.timelinePoints, { pane: "orders", color: colour, weight: 3, opacity: 0.8, interactive: false }));
  }
}

async function selectOrder(id) {
  const prev = selected;
  selected = id && orders.has(id) ? id : null;
  if (prev && orders.has(prev)) drawOrder(orders.get(prev));
  renderOrders();
  renderDetail();
  if (!selected) return;
  const o = orders.get(selected);
  drawOrder(o);
  if (o.dropoff) map.panTo([o.dropoff.lat, o.dropoff.lon], { animate: false });
  try {
    const full = await api(`/api/orders/${encodeURIComponent(selected)}`);
    if (selected !== full?.order) return;
    const cur = orders.get(full.order);
    cur.timeline = full.timeline ?? [];
    cur.timelinePoints = cur.timeline.filter((t) => t.position).map((t) => [t.position.lat, t.position.lon]);
    drawOrder(cur);
    renderDetail();
  } catch (err) {
    $("o-last").textContent = `cannot load the timeline: ${err.message}`;
  }
}

function renderDetail() {
  const o = selected ? orders.get(selected) : null;
  $("detail-empty").hidden = Boolean(o);
  $("detail-body").hidden = !o;
  if (!o) return;
  $("o-id").textContent = o.order;
  // A store may cancel until the parcel is picked up.
  $("o-cancel").hidden = !(o.state === "created" || o.state === "assigned");
  if ($("o-result").dataset.order !== o.order) $("o-result").textContent = "";
  $("o-state").textContent = o.state;
  $("o-state").style.background = STATE_COLOURS[o.state] ?? "#6b7684";
  $("o-customer").textContent = o.customer ?? "—";
  $("o-vehicle").textContent = o.vehicle ?? "not assigned yet";
  $("o-created").textContent = o.created_ms ? clock(o.created_ms) : "—";
  $("o-last").textContent = o.last ? `${o.last.kind ?? ""} at ${o.last.lat.toFixed(5)}, ${o.last.lon.toFixed(5)} · ${clock(o.last.ts_ms ?? Date.now())}` : "—";
  $("o-timeline").replaceChildren(
    ...(o.timeline ?? []).map((t) => {
      const li = el("li", "");
      li.append(el("time", "", clock(t.ts_ms)), el("span", "", `${t.kind}${t.vehicle ? ` · ${t.vehicle}` : ""}${t.flag ? ` (${t.flag})` : ""}`));
      return li;
    }),
  );
}

/** `POST /api/orders/{id}/cancel`; the `order` event updates the list, the answer too. */
async function cancelOrder(id) {
  if (!id) return;
  const out = $("o-result");
  out.dataset.order = id;
  $("o-cancel").disabled = true;
  try {
    const o = await api(`/api/orders/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    const { vehicle_ack: vehicleAck, ...order } = o ?? {};
    upsert({ ...order, authoritative: true });
    out.dataset.state = "ok";
    out.textContent = `cancelled${vehicleAck ? ` (vehicle: ${vehicleAck})` : ""}`;
  } catch (err) {
    out.dataset.state = "error";
    out.textContent = `not cancelled: ${err.message}`;
  } finally {
    $("o-cancel").disabled = false;
    scheduleRender();
  }
}

// ---- placing an order ----------------------------------------------------------------------

function newOrderId() {
  const prefix = (store?.store ?? "order").replace(/[^A-Za-z0-9_.-]/g, "").slice(0, 12) || "order";
  const rand = Math.floor(Math.random() * 36 ** 4)
    .toString(36)
    .padStart(4, "0");
  return `${prefix}-${Date.now().toString(36)}-${rand}`.slice(0, 32);
}

function setDropoff(lat, lon) {
  if (lat === null || lat === undefined) {
    dropoff = null;
    dropoffMarker?.remove();
    dropoffMarker = null;
  } else {
    dropoff = { lat, lon };
    if (!dropoffMarker) {
      dropoffMarker = L.marker([lat, lon], {
        pane: "orders",
        icon: L.divIcon({ className: "v-drop-pin", html: "<span>✚</span>", iconSize: [22, 22] }),
        keyboard: false,
        interactive: false,
      }).addTo(map);
    } else dropoffMarker.setLatLng([lat, lon]);
  }
  $("v-dropoff").textContent = dropoff ? `${dropoff.lat.toFixed(5)}, ${dropoff.lon.toFixed(5)}` : "—";
  $("v-place").disabled = !dropoff;
  $("place-hint").textContent = dropoff ? "Drop-off set; click again to move it." : "Click on the map where the parcel goes.";
}

async function placeOrder() {
  const result = $("place-result");
  const order = $("v-order").value.trim();
  const customer = $("v-customer").value.trim();
  const show = (ok, text) => {
    result.hidden = false;
    result.dataset.state = ok ? "ok" : "error";
    result.textContent = text;
  };
  if (!dropoff) return show(false, "Click on the map to choose the drop-off first.");
  if (!/^[A-Za-z0-9_.-]{1,32}$/.test(order)) return show(false, "Order ids are 1 to 32 letters, digits, '_', '-' or '.'.");
  if (!customer) return show(false, "Who receives the parcel?");
  $("v-place").disabled = true;
  const request = { order, customer, lat: dropoff.lat, lon: dropoff.lon };
  const reply = await ack("pickup", request);
  $("v-place").disabled = !dropoff;
  if (!reply.ok) return show(false, `Not placed: ${reply.error ?? "refused"}`);
  upsert({
    order: reply.order ?? order,
    store: store?.store,
    fleet: store?.fleet,
    customer,
    vehicle: reply.vehicle ?? null,
    state: reply.state ?? "created",
    dropoff: { lat: request.lat, lon: request.lon },
    pickup: store && Number.isFinite(store.lat) ? { lat: store.lat, lon: store.lon } : undefined,
    ts_ms: Date.now(),
  });
  show(true, `${reply.created === false ? "Already placed" : "Placed"}: ${order} · ${reply.state ?? "created"}${reply.vehicle ? ` · ${reply.vehicle}` : " · waiting for a vehicle"}`);
  addFeed({ kind: "pickup", order, text: `you placed order ${order} for ${customer}` });
  $("v-order").value = newOrderId();
  idTyped = false;
  $("v-customer").value = "";
  setDropoff(null);
  renderOrders();
  selectOrder(order);
}

// ---- hooks for tests and people at the console --------------------------------------------

function publicOrder(o) {
  return {
    order: o.order,
    state: o.state,
    store: o.store ?? null,
    customer: o.customer ?? null,
    vehicle: o.vehicle ?? null,
    dropoff: o.dropoff ?? null,
    last: o.last ? { lat: o.last.lat, lon: o.last.lon, kind: o.last.kind } : null,
  };
}

window.__fleetbeatVendor = {
  /** What the page shows right now. */
  stats() {
    const pending = unacked.size;
    return {
      connected: conn?.socket.connected ?? false,
      store: store?.store ?? null,
      orders: orders.size,
      feed: feedEntries.length,
      caughtUp,
      received: stats.received,
      pending,
      missed: missedEntries.length,
      missedAcked: missedEntries.filter((e) => e.messageId !== undefined && acked.has(String(e.messageId))).length,
      duplicatesDropped: stats.duplicatesDropped,
      feedIds: seenOrder.map(Number),
      getAllPages: stats.getAllPages,
      selected,
      dropoff,
    };
  },
  /** The orders as the list knows them, newest first. */
  orders() {
    return [...orders.values()].sort((a, b) => (b.created_ms ?? 0) - (a.created_ms ?? 0)).map(publicOrder);
  },
  /** The feed, newest first: `{kind, text, messageId?, missed, acked}`. */
  feed() {
    return feedEntries
      .slice()
      .reverse()
      .map((e) => {
        const item = { kind: e.kind, text: e.text, missed: e.missed, acked: e.messageId !== undefined && acked.has(String(e.messageId)) };
        if (e.messageId !== undefined) item.messageId = e.messageId;
        if (e.order) item.order = e.order;
        return item;
      });
  },
  /** The messages shown as missed while offline, oldest first: `{messageId, text, acked}`. */
  missed() {
    return missedEntries.map((e) => ({ messageId: e.messageId, text: e.text, acked: e.messageId !== undefined && acked.has(String(e.messageId)) }));
  },
  selectOrder,
  /** Where `[lat, lon]` is on the page (for a real click on the map), or null if off the map. */
  screenPoint(lat, lon) {
    if (!map) return null;
    const p = map.latLngToContainerPoint([lat, lon]);
    const box = $("map").getBoundingClientRect();
    if (p.x < 0 || p.y < 0 || p.x > box.width || p.y > box.height) return null;
    return { x: box.left + p.x, y: box.top + p.y };
  },
  /** The store's location, once known: `{store, fleet, lat, lon}`. */
  storeInfo() {
    return store;
  },
};
