// The map: Leaflet for panning, zooming, the scale and optional online tiles; a plain grid as
// the offline base map; and every vehicle drawn on ONE canvas by `VehicleLayer` (10,000
// vehicles are 10,000 triangles in three fills per frame, not 10,000 DOM nodes or Leaflet layers).

import * as L from "leaflet";
import { mercX, mercY } from "./fleet.js";

export const STATUS_COLOURS = {
  online: "#1f9d55",
  stale: "#e08a00",
  offline: "#8a94a0",
};
const SELECTED = "#1d4ed8";

/**
 * The offline base map: a light background with a graticule whose spacing follows the zoom
 * (minor lines about 64 px apart, every fifth one stronger and labelled), so the page is never
 * blank and distances stay readable without any tile server.
 */
const GridBase = L.GridLayer.extend({
  options: { tileSize: 256, updateWhenZooming: false, keepBuffer: 4, className: "fb-grid" },

  createTile(coords) {
    const tile = document.createElement("canvas");
    const size = this.getTileSize();
    const dpr = Math.min(window.devicePixelRatio || 1, 2);
    tile.width = size.x * dpr;
    tile.height = size.y * dpr;
    const ctx = tile.getContext("2d");
    ctx.scale(dpr, dpr);
    drawGridTile(ctx, coords, size.x);
    return tile;
  },
});

const STEPS = [];
for (let e = -5; e <= 2; e++) for (const m of [1, 2, 5]) STEPS.push(m * 10 ** e);

function niceStep(raw) {
  return STEPS.find((s) => s >= raw) ?? 90;
}

function lonOfX(x, world) {
  return (x / world) * 360 - 180;
}

function latOfY(y, world) {
  const n = Math.PI - (2 * Math.PI * y) / world;
  return (180 / Math.PI) * Math.atan(0.5 * (Math.exp(n) - Math.exp(-n)));
}

function drawGridTile(ctx, coords, size) {
  const world = size * 2 ** coords.z;
  const x0 = coords.x * size;
  const y0 = coords.y * size;
  ctx.fillStyle = "#eef1f4";
  ctx.fillRect(0, 0, size, size);
  const degPerPx = 360 / world;
  const minor = niceStep(degPerPx * 64);
  const major = minor * 5;
  const west = lonOfX(x0, world);
  const east = lonOfX(x0 + size, world);
  const north = latOfY(y0, world);
  const south = latOfY(y0 + size, world);
  const px = (lon) => ((lon + 180) / 360) * world - x0;
  const py = (lat) => mercY(lat) * world - y0;
  const isMajor = (v) => Math.abs(v / major - Math.round(v / major)) < 1e-6;
  ctx.lineWidth = 1;
  for (const pass of ["minor", "major"]) {
    ctx.strokeStyle = pass === "minor" ? "#dde3ea" : "#c3ccd6";
    ctx.lineWidth = pass === "minor" ? 1 : 2;
    ctx.beginPath();
    for (let lon = Math.floor(west / minor) * minor; lon <= east; lon += minor) {
      if ((pass === "major") !== isMajor(lon)) continue;
      const x = Math.round(px(lon)) + 0.5;
      ctx.moveTo(x, 0);
      ctx.lineTo(x, size);
    }
    for (let lat = Math.floor(south / minor) * minor; lat <= north; lat += minor) {
      if ((pass === "major") !== isMajor(lat)) continue;
      const y = Math.round(py(lat)) + 0.5;
      ctx.moveTo(0, y);
      ctx.lineTo(size, y);
    }
    ctx.stroke();
  }
  // Labels on major lines: longitudes along every third row of tiles, latitudes along every
  // third column, so they read like a ruler instead of repeating in every tile.
  ctx.fillStyle = "#7b8794";
  ctx.font = "10px system-ui, sans-serif";
  const digits = Math.max(0, -Math.floor(Math.log10(major) + 1e-9));
  const label = (text, x, y) => {
    if (x + ctx.measureText(text).width < size - 2 && y > 10) ctx.fillText(text, x, y);
  };
  if (coords.y % 3 === 0) {
    for (let lon = Math.ceil(west / major) * major; lon < east; lon += major) {
      label(`${Math.abs(lon).toFixed(digits)}°${lon < 0 ? "W" : "E"}`, px(lon) + 3, 11);
    }
  }
  if (coords.x % 3 === 0) {
    for (let lat = Math.ceil(south / major) * major; lat < north; lat += major) {
      label(`${Math.abs(lat).toFixed(digits)}°${lat < 0 ? "S" : "N"}`, 3, py(lat) - 3);
    }
  }
}

/**
 * Every vehicle on one canvas. The canvas lives in a Leaflet pane, so it follows the map while
 * dragging, and scales with the tiles during a zoom animation (as Leaflet's own canvas renderer
 * does); it is redrawn on each animation frame while something moves, and not at all otherwise.
 */
const VehicleLayer = L.Layer.extend({
  initialize(fleet, options) {
    this._fleet = fleet;
    this._selected = null;
    this._dirty = true;
    this._frozen = false;
    this._moving = false;
    this._frame = 0;
    this._onFrame = this._onFrame.bind(this);
    // Where each drawn vehicle ended up on screen in the last frame, for hit testing.
    this._hitIds = [];
    this._hitXY = new Float32Array(0);
    this.drawn = 0;
    this.onDraw = options?.onDraw ?? null;
  },

  onAdd(map) {
    const pane = map.getPane("vehicles") ?? map.createPane("vehicles");
    pane.style.zIndex = 450;
    pane.style.pointerEvents = "none";
    this._canvas = L.DomUtil.create("canvas", "fb-vehicles leaflet-zoom-animated", pane);
    this._ctx = this._canvas.getContext("2d");
    this._resize();
    this._schedule();
  },

  onRemove() {
    cancelAnimationFrame(this._frame);
    this._frame = 0;
    L.DomUtil.remove(this._canvas);
  },

  getEvents() {
    return {
      resize: this._resize,
      move: this.redraw,
      zoomanim: this._animZoom,
      zoomend: this._zoomEnd,
      viewreset: this.redraw,
    };
  },

  /** Draw again on the next frame. */
  redraw() {
    this._dirty = true;
    this._schedule();
  },

  select(id) {
    this._selected = id;
    this.redraw();
  },

  _schedule() {
    if (this._frame === 0 && this._map) this._frame = requestAnimationFrame(this._onFrame);
  },

  _resize() {
    const size = this._map.getSize();
    const dpr = window.devicePixelRatio || 1;
    this._dpr = dpr;
    this._canvas.width = Math.round(size.x * dpr);
    this._canvas.height = Math.round(size.y * dpr);
    this._canvas.style.width = `${size.x}px`;
    this._canvas.style.height = `${size.y}px`;
    this.redraw();
  },

  _animZoom(e) {
    // Scale the last drawing like the tiles until the animation ends (Leaflet's Renderer does
    // the same); `getZoom()` is still the old zoom meanwhile.
    this._frozen = true;
    const map = this._map;
    const scale = map.getZoomScale(e.zoom, this._drawZoom);
    const offset = map
      .getSize()
      .multiplyBy(-0.5 * scale)
      .add(map.project(this._drawCenter, e.zoom))
      .subtract(map._getNewPixelOrigin(e.center, e.zoom));
    L.DomUtil.setTransform(this._canvas, offset, scale);
  },

  _zoomEnd() {
    this._frozen = false;
    this.redraw();
  },

  _onFrame() {
    this._frame = 0;
    if (this._frozen) {
      this._schedule();
      return;
    }
    if (this._dirty || this._moving) {
      const t = performance.now();
      this._moving = this._draw(performance.now());
      this._dirty = false;
      this.onDraw?.(performance.now() - t, this.drawn);
      if (this._moving) this._schedule();
    }
  },

  _draw(now) {
    const map = this._map;
    const ctx = this._ctx;
    const size = map.getSize();
    const w = size.x;
    const h = size.y;
    this._drawCenter = map.getCenter();
    this._drawZoom = map.getZoom();
    L.DomUtil.setPosition(this._canvas, map.containerPointToLayerPoint([0, 0]));

    const world = 256 * 2 ** this._drawZoom;
    const ox = w / 2 - mercX(this._drawCenter.lng) * world;
    const oy = h / 2 - mercY(this._drawCenter.lat) * world;
    ctx.setTransform(this._dpr, 0, 0, this._dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);

    // Arrow size follows the zoom: small dots far out, clear arrows up close.
    // Thousands in view: a bit smaller, so a dense fleet still shows its streets.
    const dense = this.drawn > 3000 ? 0.75 : 1;
    const len = Math.max(4, Math.min(14, 6 + (this._drawZoom - 10) * 1.5) * dense);
    const wid = len * 0.62;
    const margin = len + 2;
    const vehicles = this._fleet.vehicles;
    if (this._hitXY.length < vehicles.size * 2) this._hitXY = new Float32Array(vehicles.size * 2 + 1024);
    const hitXY = this._hitXY;
    const hitIds = this._hitIds;
    hitIds.length = 0;
    // Visible vehicles per status as (x, y, heading) triples: drawn status by status below.
    const n = vehicles.size;
    if (this._buf === undefined || this._buf.online.length < n * 3) {
      const cap = n * 3 + 3072;
      this._buf = { online: new Float32Array(cap), stale: new Float32Array(cap), offline: new Float32Array(cap) };
    }
    const buf = this._buf;
    const count = { online: 0, stale: 0, offline: 0 };
    const p = { x: 0, y: 0, h: 0 };
    let moving = false;
    let selected = null;
    for (const v of vehicles.values()) {
      if (v.pos === null) continue;
      if (v.at(now, p)) moving = true;
      const x = p.x * world + ox;
      const y = p.y * world + oy;
      if (x < -margin || y < -margin || x > w + margin || y > h + margin) continue;
      const i = hitIds.length;
      hitIds.push(v.id);
      hitXY[i * 2] = x;
      hitXY[i * 2 + 1] = y;
      if (v.id === this._selected) {
        selected = { v, x, y, h: p.h };
        continue;
      }
      const status = v.status in count ? v.status : "online";
      const k = count[status]++ * 3;
      const b = buf[status];
      b[k] = x;
      b[k + 1] = y;
      b[k + 2] = p.h;
    }
    this.drawn = hitIds.length;

    if (this._selected !== null) {
      const v = vehicles.get(this._selected);
      if (v?.trail) {
        ctx.beginPath();
        let first = true;
        // The newest trail point is where the arrow is gliding to: end at the arrow instead.
        v.eachTrailPoint(selected !== null, (tx, ty) => {
          const x = tx * world + ox;
          const y = ty * world + oy;
          if (first) ctx.moveTo(x, y);
          else ctx.lineTo(x, y);
          first = false;
        });
        if (selected) ctx.lineTo(selected.x, selected.y);
        ctx.strokeStyle = "rgba(29, 78, 216, 0.55)";
        ctx.lineWidth = 3;
        ctx.lineJoin = "round";
        ctx.lineCap = "round";
        ctx.stroke();
      }
    }

    // White outlines help when vehicles are few and large; with thousands they only cost.
    const outline = len >= 6 && this.drawn <= 3000;
    ctx.lineWidth = 1;
    ctx.strokeStyle = "rgba(255, 255, 255, 0.9)";
    // Live vehicles first; the ones that need a look (offline, then stale) on top.
    for (const status of ["online", "offline", "stale"]) {
      ctx.fillStyle = STATUS_COLOURS[status];
      fillArrows(ctx, buf[status], count[status], len, wid, outline);
    }

    if (selected) {
      const r = len + 6;
      ctx.beginPath();
      ctx.arc(selected.x, selected.y, r, 0, 2 * Math.PI);
      ctx.lineWidth = 3;
      ctx.strokeStyle = SELECTED;
      ctx.stroke();
      ctx.beginPath();
      arrow(ctx, selected.x, selected.y, selected.h, len * 1.3, wid * 1.3);
      ctx.fillStyle = STATUS_COLOURS[selected.v.status] ?? STATUS_COLOURS.online;
      ctx.fill();
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "#ffffff";
      ctx.stroke();
    }
    return moving;
  },

  /** The id of the vehicle drawn nearest to container point (x, y), within `radius` px. */
  hit(x, y, radius = 12) {
    let best = null;
    let bestD = radius * radius;
    const xy = this._hitXY;
    for (let i = 0; i < this._hitIds.length; i++) {
      const dx = xy[i * 2] - x;
      const dy = xy[i * 2 + 1] - y;
      const d = dx * dx + dy * dy;
      if (d <= bestD) {
        bestD = d;
        best = this._hitIds[i];
      }
    }
    return best;
  },

  /** Where vehicle `id` was drawn in the last frame (container px), or null. */
  screenPoint(id) {
    const i = this._hitIds.indexOf(id);
    return i < 0 ? null : { x: this._hitXY[i * 2], y: this._hitXY[i * 2 + 1] };
  },
});

/**
 * Fills `n` arrows from `buf` (x, y, heading triples) in paths of 16: Chromium's software
 * rasteriser fills one path of 10,000 small shapes ~15x slower than 600 paths of 16 (measured:
 * ~120 ms against ~7 ms), and one path per arrow costs ~40% more than 16.
 */
function fillArrows(ctx, buf, n, len, wid, outline) {
  const CHUNK = 16;
  for (let i = 0; i < n; i += CHUNK) {
    ctx.beginPath();
    const end = Math.min(n, i + CHUNK);
    for (let j = i; j < end; j++) arrow(ctx, buf[j * 3], buf[j * 3 + 1], buf[j * 3 + 2], len, wid);
    ctx.fill();
    if (outline) ctx.stroke();
  }
}

/** Adds an arrow pointing along `heading` (radians clockwise from north) centred at (x, y). */
function arrow(path, x, y, heading, len, wid) {
  const s = Math.sin(heading);
  const c = Math.cos(heading);
  // Tip ahead, two corners behind, a notch in the tail.
  const tipX = x + s * len * 0.6;
  const tipY = y - c * len * 0.6;
  const backX = x - s * len * 0.4;
  const backY = y + c * len * 0.4;
  path.moveTo(tipX, tipY);
  path.lineTo(backX + c * wid, backY + s * wid);
  path.lineTo(x - s * len * 0.15, y + c * len * 0.15);
  path.lineTo(backX - c * wid, backY - s * wid);
  path.closePath();
}

/**
 * Creates the map in `element`. `config` is the bridge's `/config.json`.
 * `onClick(event, vehicleId)` may take a click first (return true); `onMove(event)` sees the mouse.
 * Returns `{ map, vehicles }`.
 */
export function createMap(element, fleet, config, { onSelect, onHover, onDraw, onClick, onMove }) {
  const map = createBaseMap(element, config);
  legend().addTo(map);
  // The banner and the window change the map's size: Leaflet must know, or clicks miss.
  new ResizeObserver(() => map.invalidateSize({ pan: false })).observe(element);
  return addVehicles(map, element, fleet, { onSelect, onHover, onDraw, onClick, onMove });
}

/**
 * The bridge's `/config.json` (the map's tiles and view), or `{}` when the page is served
 * without it: the offline grid.
 */
export async function loadConfig() {
  try {
    const r = await fetch("/config.json", { cache: "no-store" });
    if (r.ok) return await r.json();
  } catch {
    // No bridge behind the page: the defaults.
  }
  return {};
}

/**
 * The base map alone, as every page of the bridge draws it (the dispatcher's and the vendor's):
 * a Leaflet map in `element` with the offline grid, the configured tiles above it (if any) and
 * the scale. `config` is the bridge's `/config.json`.
 */
export function createBaseMap(element, config) {
  const map = L.map(element, {
    center: config.centre ?? [20, 0],
    zoom: config.centre ? 12 : 2,
    minZoom: 2,
    maxZoom: config.tile_max_zoom ?? 19,
    worldCopyJump: false,
    zoomControl: true,
  });
  map.attributionControl.setPrefix('<a href="/assets/LICENSES.txt" target="_blank" rel="noopener">Leaflet</a>');
  new GridBase().addTo(map);
  if (config.tile_url) {
    L.tileLayer(config.tile_url, {
      attribution: config.tile_attribution ?? "",
      maxZoom: config.tile_max_zoom ?? 19,
      crossOrigin: false,
    }).addTo(map);
  }
  L.control.scale({ imperial: false }).addTo(map);
  return map;
}

function addVehicles(map, element, fleet, { onSelect, onHover, onDraw, onClick, onMove }) {
  const vehicles = new VehicleLayer(fleet, { onDraw });
  vehicles.addTo(map);

  map.on("click", (e) => {
    const id = vehicles.hit(e.containerPoint.x, e.containerPoint.y);
    // A mode (choosing a drop-off, drawing a fence) takes the click before vehicle selection.
    if (onClick?.(e, id)) return;
    onSelect(id);
  });
  let hoverFrame = 0;
  let lastMouse = null;
  map.on("mousemove", (e) => {
    onMove?.(e);
    lastMouse = e.containerPoint;
    if (hoverFrame) return;
    hoverFrame = requestAnimationFrame(() => {
      hoverFrame = 0;
      const id = vehicles.hit(lastMouse.x, lastMouse.y);
      element.classList.toggle("fb-over-vehicle", id !== null);
      onHover(id, lastMouse);
    });
  });
  map.on("mouseout", () => onHover(null, null));
  return { map, vehicles };
}

/** What the colours mean, bottom left. */
function legend() {
  const control = L.control({ position: "bottomleft" });
  control.onAdd = () => {
    const box = L.DomUtil.create("div", "fb-legend leaflet-control");
    for (const [status, colour] of Object.entries(STATUS_COLOURS)) {
      const item = L.DomUtil.create("span", "", box);
      const swatch = L.DomUtil.create("i", "", item);
      swatch.style.background = colour;
      item.append(status);
    }
    // Geofences: the automatic ones (stores, drop-offs) dashed, the dispatchers' own solid.
    for (const [name, colour, dashed] of [["store fence", "#0e7490", true], ["drop-off fence", "#be185d", true], ["fence", "#7c3aed", false]]) {
      const item = L.DomUtil.create("span", "", box);
      const swatch = L.DomUtil.create("i", "fence", item);
      swatch.style.borderColor = colour;
      swatch.style.borderStyle = dashed ? "dashed" : "solid";
      item.append(name);
    }
    return box;
  };
  return control;
}

/** Fits the map to the vehicles that have a position. */
export function fitToVehicles(map, fleet) {
  let s = 90;
  let n = -90;
  let w = 180;
  let e = -180;
  let any = false;
  for (const v of fleet.vehicles.values()) {
    if (v.pos === null) continue;
    any = true;
    s = Math.min(s, v.pos.lat);
    n = Math.max(n, v.pos.lat);
    w = Math.min(w, v.pos.lon);
    e = Math.max(e, v.pos.lon);
  }
  if (!any) return false;
  map.fitBounds(
    [
      [s, w],
      [n, e],
    ],
    { padding: [30, 30], maxZoom: 16, animate: false },
  );
  return true;
}
