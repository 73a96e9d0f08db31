// The vehicles the dispatcher sees: their last known state from `snapshot`, `position` and
// `status` events, plus what the map needs to draw them (Web Mercator coordinates, the motion
// being interpolated, a short trail).
//
// Coordinates are kept in normalised Web Mercator (x, y in 0..1, y down), the space Leaflet's
// EPSG:3857 projects to, so the map turns them into pixels with one multiply and one add.

/** How many past positions a vehicle keeps for the selected vehicle's trail. */
export const TRAIL_POINTS = 32;
/** Longest time a move is spread over; a vehicle that jumps further than this waited is moved at once. */
const MAX_GLIDE_MS = 2500;
const MIN_GLIDE_MS = 80;
const MAX_LAT = 85.0511287798;
/** Scratch space for `Vehicle.move` (no allocation per position). */
const scratch = { x: 0, y: 0, h: 0 };

/** Normalised Web Mercator x of a longitude in degrees. */
export function mercX(lon) {
  return (lon + 180) / 360;
}

/** Normalised Web Mercator y of a latitude in degrees. */
export function mercY(lat) {
  const s = Math.sin((Math.max(-MAX_LAT, Math.min(MAX_LAT, lat)) * Math.PI) / 180);
  return 0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI);
}

/** One vehicle, as the page knows it. */
export class Vehicle {
  constructor(id, fleet) {
    this.id = id;
    this.fleet = fleet;
    /** "online" | "stale" | "offline" */
    this.status = "online";
    this.reason = null;
    /** Bridge time of the last heartbeat, ms since the epoch (or when the page received it). */
    this.lastSeenMs = 0;
    /** The last `Position` payload, or null before the first one. */
    this.pos = null;
    // Motion: from (x0, y0, h0) at t0 to (x1, y1, h1) at t0 + glide, in page time (ms).
    this.x0 = this.x1 = 0;
    this.y0 = this.y1 = 0;
    this.h0 = this.h1 = 0;
    this.t0 = 0;
    this.glide = 0;
    this.updatedAt = 0;
    // Trail: a ring of past (x, y), allocated on the first position.
    this.trail = null;
    this.trailHead = 0;
    this.trailLen = 0;
  }

  /** Where the vehicle is drawn at page time `now`: sets `out.x`, `out.y`, `out.h` (radians). */
  at(now, out) {
    const f = this.glide > 0 ? (now - this.t0) / this.glide : 1;
    if (f >= 1) {
      out.x = this.x1;
      out.y = this.y1;
      out.h = this.h1;
      return false;
    }
    const k = f <= 0 ? 0 : f;
    out.x = this.x0 + (this.x1 - this.x0) * k;
    out.y = this.y0 + (this.y1 - this.y0) * k;
    out.h = this.h0 + (this.h1 - this.h0) * k;
    return true;
  }

  /** Whether the vehicle is still gliding towards its last position at page time `now`. */
  moving(now) {
    return this.glide > 0 && now - this.t0 < this.glide;
  }

  /** Takes a new position; the drawn vehicle glides there from where it is drawn now. */
  move(p, now) {
    const x = mercX(p.lon);
    const y = mercY(p.lat);
    const h = ((p.heading_deg ?? 0) * Math.PI) / 180;
    if (this.pos === null) {
      this.x0 = this.x1 = x;
      this.y0 = this.y1 = y;
      this.h0 = this.h1 = h;
      this.glide = 0;
    } else {
      const cur = scratch;
      this.at(now, cur);
      this.x0 = cur.x;
      this.y0 = cur.y;
      this.h0 = cur.h;
      this.x1 = x;
      this.y1 = y;
      // Turn the short way round.
      let dh = h - (cur.h % (2 * Math.PI));
      if (dh > Math.PI) dh -= 2 * Math.PI;
      if (dh < -Math.PI) dh += 2 * Math.PI;
      this.h0 = cur.h % (2 * Math.PI);
      this.h1 = this.h0 + dh;
      // Spread the move over the time the last one took, so motion is continuous.
      const since = now - this.updatedAt;
      this.glide = since > MAX_GLIDE_MS ? 0 : Math.max(MIN_GLIDE_MS, since);
    }
    this.t0 = now;
    this.updatedAt = now;
    this.pos = p;
    this.pushTrail(x, y);
  }

  pushTrail(x, y) {
    if (this.trail === null) this.trail = new Float64Array(TRAIL_POINTS * 2);
    this.trail[this.trailHead * 2] = x;
    this.trail[this.trailHead * 2 + 1] = y;
    this.trailHead = (this.trailHead + 1) % TRAIL_POINTS;
    this.trailLen = Math.min(TRAIL_POINTS, this.trailLen + 1);
  }

  /** Calls `f(x, y)` for the trail's points, oldest first, without the newest if `skipNewest`. */
  eachTrailPoint(skipNewest, f) {
    const n = skipNewest ? this.trailLen - 1 : this.trailLen;
    for (let i = 0; i < n; i++) {
      const j = (this.trailHead - this.trailLen + i + TRAIL_POINTS) % TRAIL_POINTS;
      f(this.trail[j * 2], this.trail[j * 2 + 1]);
    }
  }
}

/** Which vehicles a set of rooms covers (`all`, `fleet:{fleet}`, `vehicle:{id}`). */
export function covers(rooms, fleet, id) {
  return rooms.has("all") || rooms.has(`fleet:${fleet}`) || rooms.has(`vehicle:${id}`);
}

/** Every vehicle of the joined rooms, keyed by id. */
export class Fleet {
  constructor() {
    /** @type {Map<string, Vehicle>} */
    this.vehicles = new Map();
    /** Bumped when vehicles are added or removed (the list re-sorts). */
    this.membership = 0;
    /** Bumped on every change (the list re-renders). */
    this.revision = 0;
    /** Rooms the socket is in; events for vehicles outside them (late after a leave) are dropped. */
    this.rooms = new Set();
  }

  get size() {
    return this.vehicles.size;
  }

  get(id) {
    return this.vehicles.get(id);
  }

  ensure(id, fleet) {
    let v = this.vehicles.get(id);
    if (v === undefined) {
      if (!covers(this.rooms, fleet, id)) return undefined;
      v = new Vehicle(id, fleet);
      this.vehicles.set(id, v);
      this.membership++;
    }
    return v;
  }

  /** Applies a `snapshot`: `[VehicleState]`. Returns the vehicles it touched. */
  snapshot(states, now) {
    const touched = [];
    for (const s of states) {
      if (!s || typeof s.vehicle !== "string") continue;
      const v = this.ensure(s.vehicle, s.fleet);
      if (v === undefined) continue;
      if (s.status) v.status = s.status;
      v.reason = s.reason ?? null;
      if (s.last_seen_ms) v.lastSeenMs = s.last_seen_ms;
      if (s.position) {
        v.move(s.position, now);
        v.glide = 0; // a snapshot places, it does not animate
      }
      touched.push(v);
    }
    this.revision++;
    return touched;
  }

  /** Applies a `position` batch (an array; a lone object is accepted too). */
  positions(batch, now, wallNow) {
    const list = Array.isArray(batch) ? batch : [batch];
    let n = 0;
    for (const p of list) {
      if (!p || typeof p.vehicle !== "string" || !Number.isFinite(p.lat) || !Number.isFinite(p.lon)) continue;
      const v = this.ensure(p.vehicle, p.fleet);
      if (v === undefined) continue;
      v.move(p, now);
      v.lastSeenMs = wallNow;
      // A heartbeat is proof of life: the bridge sends `status` online too, but the map
      // should not show a moving vehicle as offline in between.
      if (v.status !== "online" && v.status !== "offline") v.status = "online";
      n++;
    }
    if (n > 0) this.revision++;
    return n;
  }

  /** Applies a `status` event. Returns the vehicle and its previous status, or undefined. */
  status(s) {
    if (!s || typeof s.vehicle !== "string") return undefined;
    const v = this.ensure(s.vehicle, s.fleet);
    if (v === undefined) return undefined;
    const before = v.status;
    v.status = s.status;
    v.reason = s.reason ?? null;
    if (s.last_seen_ms) v.lastSeenMs = s.last_seen_ms;
    this.revision++;
    return { vehicle: v, before };
  }

  /** Drops the vehicles no joined room covers any more (after a `leave`). */
  prune() {
    let removed = 0;
    for (const [id, v] of this.vehicles) {
      if (!covers(this.rooms, v.fleet, id)) {
        this.vehicles.delete(id);
        removed++;
      }
    }
    if (removed > 0) {
      this.membership++;
      this.revision++;
    }
    return removed;
  }

  clear() {
    this.vehicles.clear();
    this.rooms.clear();
    this.membership++;
    this.revision++;
  }

  /** How many vehicles are online, stale and offline. */
  counts() {
    const c = { online: 0, stale: 0, offline: 0 };
    for (const v of this.vehicles.values()) c[v.status] = (c[v.status] ?? 0) + 1;
    return c;
  }

  /** The fleets seen so far, sorted. */
  fleetNames() {
    const names = new Set();
    for (const v of this.vehicles.values()) names.add(v.fleet);
    return [...names].sort();
  }
}
