// Geofences on the map: custom fences (stored, drawn by dispatchers) and the automatic ones
// (a circle around each store, one around each open order's drop-off), styled apart. All are
// drawn below the vehicles and never take clicks (the map's click still selects vehicles).

import * as L from "leaflet";
import { distanceM } from "./orders.js";

const STYLES = {
  custom: { color: "#7c3aed", weight: 2, fillColor: "#7c3aed", fillOpacity: 0.08 },
  store: { color: "#0e7490", weight: 2, dashArray: "5 4", fillColor: "#0e7490", fillOpacity: 0.1 },
  dropoff: { color: "#be185d", weight: 1.5, dashArray: "2 4", fillColor: "#be185d", fillOpacity: 0.06 },
};

/** Whether `p` (`{lat, lon}`) lies in the polygon `points` (`[[lat, lon], ...]`), by ray casting. */
function inPolygon(p, points) {
  let inside = false;
  for (let i = 0, j = points.length - 1; i < points.length; j = i++) {
    const [yi, xi] = points[i];
    const [yj, xj] = points[j];
    if (yi > p.lat !== yj > p.lat && p.lon < ((xj - xi) * (p.lat - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

/** Whether fence `f` contains `p`. */
export function contains(f, p) {
  const s = f?.shape;
  if (!s) return false;
  if (s.type === "circle") return distanceM({ lat: s.lat, lon: s.lon }, p) <= s.radius_m;
  if (s.type === "polygon" && Array.isArray(s.points)) return inPolygon(p, s.points);
  return false;
}

export class FenceLayer {
  constructor(map) {
    const pane = map.getPane("fences") ?? map.createPane("fences");
    pane.style.zIndex = 420;
    pane.style.pointerEvents = "none";
    this.map = map;
    this.group = L.layerGroup().addTo(map);
    /** @type {Map<string, object>} fence id → Fence */
    this.fences = new Map();
    this.preview = null;
  }

  get size() {
    return this.fences.size;
  }

  /** Replaces every fence drawn with `list` (`[Fence]`). */
  set(list) {
    this.group.clearLayers();
    this.fences.clear();
    for (const f of Array.isArray(list) ? list : []) {
      if (!f || typeof f.id !== "string") continue;
      const layer = this.layerOf(f);
      if (!layer) continue;
      this.fences.set(f.id, f);
      layer.addTo(this.group);
    }
  }

  clear() {
    this.set([]);
  }

  layerOf(f) {
    const style = { ...(STYLES[f.kind] ?? STYLES.custom), pane: "fences", interactive: false };
    const s = f.shape;
    if (s?.type === "circle" && Number.isFinite(s.lat) && Number.isFinite(s.lon) && Number.isFinite(s.radius_m)) {
      return L.circle([s.lat, s.lon], { ...style, radius: s.radius_m });
    }
    if (s?.type === "polygon" && Array.isArray(s.points) && s.points.length >= 3) {
      return L.polygon(s.points, style);
    }
    return null;
  }

  /** The fences containing `p`, custom ones first. */
  at(p) {
    const out = [...this.fences.values()].filter((f) => contains(f, p));
    return out.sort((a, b) => (a.kind === "custom" ? 0 : 1) - (b.kind === "custom" ? 0 : 1));
  }

  /** Shows (or moves) the circle being drawn; `null` removes it. */
  showPreview(centre, radiusM) {
    if (!centre) {
      this.preview?.remove();
      this.preview = null;
      return;
    }
    if (!this.preview) {
      this.preview = L.circle([centre.lat, centre.lon], {
        ...STYLES.custom,
        dashArray: "6 4",
        radius: Math.max(1, radiusM),
        pane: "fences",
        interactive: false,
      }).addTo(this.map);
    } else {
      this.preview.setLatLng([centre.lat, centre.lon]);
      this.preview.setRadius(Math.max(1, radiusM));
    }
  }
}
