// The Orders board: every order the dispatcher may see, from `GET /api/orders` and kept live by
// the `order` and `pickup` events. Filtered by state, store and text; at most `ROW_CAP` rows
// exist in the DOM (the newest matching ones), so a thousand orders cost no more than a hundred.

import { ago, el } from "./format.js";

/** Rows drawn at most; the rest are counted ("N more: refine the filter"). */
const ROW_CAP = 150;
/** Below this speed (m/s) a vehicle is taken as stopped: no ETA. */
const MIN_SPEED_MPS = 0.5;
/** States after which nothing happens to an order any more. */
export const TERMINAL = new Set(["delivered", "cancelled"]);
export const STATES = ["created", "assigned", "picked-up", "in-transit", "delivered", "cancelled"];

/** Great-circle distance in metres between two `{lat, lon}`. */
export function distanceM(a, b) {
  const r = 6_371_000;
  const rad = Math.PI / 180;
  const dLat = (b.lat - a.lat) * rad;
  const dLon = (b.lon - a.lon) * rad;
  const h = Math.sin(dLat / 2) ** 2 + Math.cos(a.lat * rad) * Math.cos(b.lat * rad) * Math.sin(dLon / 2) ** 2;
  return 2 * r * Math.asin(Math.min(1, Math.sqrt(h)));
}

/** The stop the order's vehicle drives to next: the pickup while assigned, the drop-off after. */
export function nextStop(o) {
  if (o.state === "assigned") return o.pickup ?? null;
  if (o.state === "picked-up" || o.state === "in-transit") return o.dropoff ?? null;
  return null;
}

/**
 * Seconds until the order's vehicle reaches its next stop, from the straight-line distance and
 * the vehicle's current speed; null when there is no vehicle, no position or it stands still.
 */
export function etaSeconds(o, fleet) {
  const stop = nextStop(o);
  if (!stop || !o.vehicle) return null;
  const v = fleet.get(o.vehicle);
  if (!v?.pos || !Number.isFinite(v.pos.speed_mps) || v.pos.speed_mps < MIN_SPEED_MPS) return null;
  return Math.round(distanceM(v.pos, stop) / v.pos.speed_mps);
}

/** "45 s", "3 min", "1 h 5 min", or "—". */
export function duration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "—";
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

/** A valid `{lat, lon}` or null. */
function point(p) {
  return p && Number.isFinite(p.lat) && Number.isFinite(p.lon) ? { lat: p.lat, lon: p.lon } : null;
}

export class OrderBoard {
  constructor(fleet, { rows, more, empty, count, onSelect }) {
    this.fleet = fleet;
    /** @type {Map<string, object>} order id → Order */
    this.orders = new Map();
    this.rowsEl = rows;
    this.more = more;
    this.empty = empty;
    this.countEl = count;
    this.filter = { state: "all", store: "", text: "" };
    this.selected = null;
    this.frame = 0;
    this.revision = 0;
    rows.addEventListener("click", (e) => {
      const row = e.target.closest("[data-order]");
      if (row) onSelect(row.dataset.order);
    });
  }

  get size() {
    return this.orders.size;
  }

  get(id) {
    return this.orders.get(id);
  }

  clear() {
    this.orders.clear();
    this.revision++;
    this.schedule();
  }

  /** Takes an Order (list, `order` event); an older copy than the one held is ignored. */
  upsert(o) {
    if (!o || typeof o.order !== "string") return null;
    const had = this.orders.get(o.order);
    if (had && Number.isFinite(had.updated_ms) && Number.isFinite(o.updated_ms) && o.updated_ms < had.updated_ms) return had;
    const next = {
      ...had,
      ...o,
      pickup: point(o.pickup) ?? had?.pickup ?? null,
      dropoff: point(o.dropoff) ?? had?.dropoff ?? null,
    };
    next.created_ms ??= o.ts_ms ?? Date.now();
    next.updated_ms ??= o.ts_ms ?? next.created_ms;
    this.orders.set(o.order, next);
    this.revision++;
    this.schedule();
    return next;
  }

  /** Takes a `pickup` event: `{store, order, customer, lat, lon, vehicle, state, ts_ms}`. */
  pickup(p) {
    if (!p || typeof p.order !== "string") return null;
    const had = this.orders.get(p.order);
    // The `order` event carries more (pickup point, fleet); `pickup` only fills in what is missing.
    if (had && Number.isFinite(had.updated_ms) && Number.isFinite(p.ts_ms) && p.ts_ms < had.updated_ms) return had;
    return this.upsert({
      order: p.order,
      store: p.store ?? had?.store,
      fleet: had?.fleet ?? p.fleet,
      customer: p.customer ?? had?.customer,
      state: p.state ?? had?.state ?? "created",
      vehicle: p.vehicle ?? had?.vehicle ?? null,
      pickup: had?.pickup ?? null,
      dropoff: point(p) ?? had?.dropoff ?? null,
      created_ms: had?.created_ms ?? p.ts_ms,
      updated_ms: p.ts_ms ?? had?.updated_ms,
    });
  }

  setFilter(part) {
    Object.assign(this.filter, part);
    this.schedule();
  }

  select(id) {
    this.selected = id;
    this.schedule();
  }

  /** The stores seen on orders so far, sorted. */
  storeNames() {
    const names = new Set();
    for (const o of this.orders.values()) if (o.store) names.add(o.store);
    return [...names].sort();
  }

  matches(o) {
    const { state, store, text } = this.filter;
    if (state === "open" && TERMINAL.has(o.state)) return false;
    if (state !== "all" && state !== "open" && o.state !== state) return false;
    if (store && o.store !== store) return false;
    if (text) {
      const q = text.toLowerCase();
      const hay = `${o.order} ${o.customer ?? ""} ${o.vehicle ?? ""} ${o.store ?? ""}`.toLowerCase();
      if (!hay.includes(q)) return false;
    }
    return true;
  }

  /** The orders the filter lets through, newest first. */
  shown() {
    const out = [];
    for (const o of this.orders.values()) if (this.matches(o)) out.push(o);
    out.sort((a, b) => (b.created_ms ?? 0) - (a.created_ms ?? 0) || (a.order < b.order ? 1 : -1));
    return out;
  }

  schedule() {
    if (this.frame === 0) this.frame = requestAnimationFrame(() => this.render());
  }

  render() {
    this.frame = 0;
    const shown = this.shown();
    const now = Date.now();
    const n = Math.min(ROW_CAP, shown.length);
    const rows = this.rowsEl;
    while (rows.childElementCount < n) {
      const row = el("div", "orow");
      row.setAttribute("role", "option");
      const top = el("div", "line");
      top.append(el("span", "badge"), el("span", "oid"), el("span", "age"));
      const bottom = el("div", "line sub");
      bottom.append(el("span", "who"), el("span", "veh"), el("span", "eta"));
      row.append(top, bottom);
      rows.append(row);
    }
    while (rows.childElementCount > n) rows.lastElementChild.remove();
    for (let i = 0; i < n; i++) {
      const o = shown[i];
      const row = rows.children[i];
      row.dataset.order = o.order;
      row.dataset.state = o.state;
      row.dataset.testid = `order-${o.order}`;
      row.setAttribute("aria-selected", String(o.order === this.selected));
      const [top, bottom] = row.children;
      const [badge, oid, age] = top.children;
      const [who, veh, eta] = bottom.children;
      set(badge, o.state);
      set(oid, o.order);
      set(age, ago(o.created_ms, now));
      set(who, `${o.store ?? "?"} → ${o.customer ?? "?"}`);
      set(veh, o.vehicle ?? "no vehicle");
      const s = etaSeconds(o, this.fleet);
      set(eta, TERMINAL.has(o.state) ? "" : `ETA ${duration(s)}`);
    }
    this.more.hidden = shown.length <= ROW_CAP;
    this.more.textContent = `${(shown.length - ROW_CAP).toLocaleString("en")} more: refine the filter`;
    this.empty.hidden = shown.length > 0;
    this.countEl.textContent = shown.length === this.orders.size ? `${this.orders.size}` : `${shown.length} / ${this.orders.size}`;
  }
}

function set(node, text) {
  if (node.textContent !== text) node.textContent = text;
}
