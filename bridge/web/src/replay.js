// History and replay in the dispatcher page: a vehicle's stored track for a time range
// (`GET /api/vehicles/{id}/track`), drawn as a trail, and a marker moved along it at the recorded
// times by a slider, play/pause and a speed (1x, 10x, 60x). Exports (GPX, CSV, GeoJSON, JSON)
// are fetched with the token as a header and saved from a blob.

import * as L from "leaflet";
import "./replay.css";
import { clock } from "./format.js";

/** Replay speeds offered: recorded seconds per real second. */
const SPEEDS = [1, 10, 60];
/** Time-range presets: label, span in ms (`null`: the custom from–to fields). */
const PRESETS = [
  ["last 15 min", 15 * 60_000],
  ["last 1 h", 60 * 60_000],
  ["from – to", null],
];
const EXPORTS = [
  ["gpx", "GPX"],
  ["csv", "CSV"],
  ["geojson", "GeoJSON"],
  ["json", "JSON"],
];
const SLIDER_STEPS = 1000;

function make(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

/** `Date` → the value of an `<input type="datetime-local">` (local time, minutes). */
function localInput(ms) {
  const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60_000);
  return d.toISOString().slice(0, 16);
}

/**
 * The replay panel and its map layers. `panel` is an empty element the panel is built in;
 * `token()` gives the bearer token for the HTTP API, `selected()` the selected vehicle id (or
 * null). Attaches the test hooks (`replay`, `startReplay`, `replaySeek`, `replayPlay`,
 * `replayPause`) to `window.__fleetbeat`.
 */
export class Replay {
  constructor(map, panel, { token, selected }) {
    this.map = map;
    this.token = token ?? (() => sessionStorage.getItem("fleetbeat.token"));
    this.selected = selected ?? (() => null);
    this.vehicle = null;
    this.points = [];
    this.range = null;
    this.t = 0;
    this.index = 0;
    this.speed = 10;
    this.playing = false;
    this.frame = 0;
    this.lastFrame = 0;
    this.loading = 0;
    this.seq = 0;
    this.pane = map.getPane("replay") ?? map.createPane("replay");
    this.pane.style.zIndex = 460;
    this.layer = L.layerGroup().addTo(map);
    this.trail = null;
    this.marker = null;
    this.onFrame = this.onFrame.bind(this);
    if (panel) this.build(panel);
    this.installHooks();
  }

  build(panel) {
    panel.replaceChildren();
    const $ = (id) => panel.querySelector(`#${id}`);
    const presets = make("select", { id: "replay-range", "aria-label": "Time range" });
    PRESETS.forEach(([label], i) => presets.append(make("option", { value: String(i), text: label })));
    const now = Date.now();
    const from = make("input", { id: "replay-from", type: "datetime-local", "aria-label": "From" });
    const to = make("input", { id: "replay-to", type: "datetime-local", "aria-label": "To" });
    from.value = localInput(now - 60 * 60_000);
    to.value = localInput(now);
    const custom = make("span", { class: "replay-custom", hidden: "" }, from, to);
    const speed = make("select", { id: "replay-speed", "aria-label": "Replay speed" });
    for (const s of SPEEDS) speed.append(make("option", { value: String(s), text: `${s}×` }));
    speed.value = String(this.speed);
    const exports = make("span", { class: "replay-exports" }, make("span", { class: "hint", text: "Export:" }));
    for (const [format, label] of EXPORTS) {
      const b = make("button", { type: "button", id: `replay-export-${format}`, "data-format": format, text: label });
      b.disabled = true;
      exports.append(b);
    }
    panel.append(
      make(
        "div",
        { class: "replay-head" },
        make("h3", { text: "History" }),
        make("span", { id: "replay-vehicle", class: "replay-vehicle" }),
        make("button", { type: "button", id: "replay-close", "aria-label": "Close replay", text: "×", hidden: "" }),
      ),
      make(
        "div",
        { class: "replay-query" },
        presets,
        custom,
        make("button", { type: "button", id: "replay-load", text: "Load track" }),
      ),
      make(
        "div",
        { class: "replay-player", hidden: "" },
        make("button", { type: "button", id: "replay-play", text: "▶", "aria-label": "Play" }),
        make("input", { id: "replay-slider", type: "range", min: "0", max: String(SLIDER_STEPS), value: "0", "aria-label": "Replay position" }),
        speed,
      ),
      make("div", { id: "replay-info", class: "replay-info hint" }),
      exports,
    );
    this.ui = {
      panel,
      presets,
      custom,
      from,
      to,
      speed,
      exports,
      vehicle: $("replay-vehicle"),
      close: $("replay-close"),
      load: $("replay-load"),
      player: panel.querySelector(".replay-player"),
      play: $("replay-play"),
      slider: $("replay-slider"),
      info: $("replay-info"),
    };
    presets.addEventListener("change", () => (custom.hidden = PRESETS[Number(presets.value)][1] !== null));
    this.ui.load.addEventListener("click", () => {
      const vehicle = this.selected();
      if (!vehicle) return;
      const span = PRESETS[Number(presets.value)][1];
      if (span === null) {
        const f = new Date(from.value).getTime();
        const t = new Date(to.value).getTime();
        if (!Number.isFinite(f) || !Number.isFinite(t) || f > t) {
          this.say("Choose a start before the end.");
          return;
        }
        this.start(vehicle, f, t);
      } else {
        // Up to the newest point: a sped-up simulator's clock runs ahead of this one.
        this.start(vehicle, Date.now() - span, null);
      }
    });
    this.ui.play.addEventListener("click", () => (this.playing ? this.pause() : this.play()));
    this.ui.slider.addEventListener("input", () => {
      this.pause();
      this.seek(Number(this.ui.slider.value) / SLIDER_STEPS);
    });
    speed.addEventListener("change", () => (this.speed = Number(speed.value)));
    this.ui.close.addEventListener("click", () => this.close());
    exports.addEventListener("click", (e) => {
      const b = e.target.closest("[data-format]");
      if (b) this.download(b.dataset.format, b);
    });
    // The panel names the vehicle it would load (the selection changes without telling us).
    setInterval(() => this.renderHead(), 500);
    this.renderHead();
  }

  renderHead() {
    if (!this.ui) return;
    const sel = this.selected();
    const shown = this.vehicle && this.points.length ? this.vehicle : sel;
    this.ui.vehicle.textContent = shown ?? "";
    this.ui.load.disabled = !sel || this.loading > 0;
    this.ui.load.textContent = this.vehicle && sel && sel !== this.vehicle ? `Load ${sel}` : "Load track";
  }

  say(text) {
    if (this.ui) this.ui.info.textContent = text;
  }

  /** The track URL for the current vehicle and range, in `format`. */
  url(format, vehicle = this.vehicle, range = this.range) {
    const q = new URLSearchParams({ from: String(Math.max(0, Math.floor(range.from))) });
    if (range.to !== null) q.set("to", String(Math.floor(range.to)));
    q.set("format", format);
    return `/api/vehicles/${encodeURIComponent(vehicle)}/track?${q}`;
  }

  async fetchTrack(format, vehicle, range) {
    const r = await fetch(this.url(format, vehicle, range), {
      headers: { Authorization: `Bearer ${this.token() ?? ""}` },
      cache: "no-store",
    });
    if (!r.ok) {
      let reason = `${r.status}`;
      try {
        reason = (await r.json()).error ?? reason;
      } catch {
        // not JSON: the status says enough
      }
      throw new Error(reason);
    }
    return r;
  }

  /**
   * Loads `vehicle`'s track from `fromMs` to `toMs` (null: up to its newest point), draws it
   * and shows the player at its start. Resolves to the number of points.
   */
  async start(vehicle, fromMs, toMs = null) {
    this.pause();
    const range = { from: Number(fromMs) || 0, to: toMs === null || toMs === undefined ? null : Number(toMs) };
    const ticket = ++this.seq;
    this.loading++;
    this.renderHead();
    this.say(`Loading ${vehicle}…`);
    let points;
    try {
      const body = await (await this.fetchTrack("json", vehicle, range)).json();
      points = (body.points ?? []).filter((p) => Number.isFinite(p.lat) && Number.isFinite(p.lon));
    } catch (err) {
      if (ticket === this.seq) this.say(`Cannot load the track: ${err.message}`);
      throw err;
    } finally {
      this.loading--;
      this.renderHead();
    }
    if (ticket !== this.seq) return points.length; // a newer load replaced this one
    this.vehicle = vehicle;
    this.range = range;
    this.points = points;
    this.draw();
    this.seek(0);
    if (this.ui) {
      this.ui.player.hidden = points.length === 0;
      this.ui.close.hidden = false;
      for (const b of this.ui.exports.querySelectorAll("button")) b.disabled = false;
    }
    if (points.length === 0) this.say(`${vehicle}: no positions stored in that range.`);
    this.renderHead();
    return points.length;
  }

  draw() {
    this.layer.clearLayers();
    this.trail = null;
    this.marker = null;
    if (this.points.length === 0) return;
    const latlngs = this.points.map((p) => [p.lat, p.lon]);
    this.trail = L.polyline(latlngs, { pane: "replay", color: "#7c3aed", weight: 4, opacity: 0.75, interactive: false });
    this.layer.addLayer(this.trail);
    this.layer.addLayer(L.circleMarker(latlngs[0], { pane: "replay", radius: 4, color: "#7c3aed", fillOpacity: 1, interactive: false }));
    this.marker = L.circleMarker(latlngs[0], {
      pane: "replay",
      radius: 8,
      color: "#ffffff",
      weight: 2,
      fillColor: "#7c3aed",
      fillOpacity: 1,
      interactive: false,
    });
    this.layer.addLayer(this.marker);
    this.map.fitBounds(this.trail.getBounds(), { padding: [40, 40], maxZoom: 17, animate: false });
  }

  get t0() {
    return this.points.length ? this.points[0].ts_ms : 0;
  }

  get t1() {
    return this.points.length ? this.points[this.points.length - 1].ts_ms : 0;
  }

  /** Moves the marker to recorded time `t` (ms, device clock), interpolating between points. */
  setTime(t) {
    const pts = this.points;
    if (pts.length === 0) return;
    this.t = Math.min(this.t1, Math.max(this.t0, t));
    // The last point at or before t (binary search: a track has up to 10,000 points).
    let lo = 0;
    let hi = pts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (pts[mid].ts_ms <= this.t) lo = mid;
      else hi = mid - 1;
    }
    this.index = lo;
    const a = pts[lo];
    const b = pts[Math.min(lo + 1, pts.length - 1)];
    const span = b.ts_ms - a.ts_ms;
    const f = span > 0 ? (this.t - a.ts_ms) / span : 0;
    this.pos = { lat: a.lat + (b.lat - a.lat) * f, lon: a.lon + (b.lon - a.lon) * f };
    this.marker?.setLatLng([this.pos.lat, this.pos.lon]);
    if (this.ui) {
      const whole = this.t1 - this.t0;
      this.ui.slider.value = String(whole > 0 ? Math.round(((this.t - this.t0) / whole) * SLIDER_STEPS) : 0);
      const speed = a.speed_mps !== undefined ? ` · ${(a.speed_mps * 3.6).toFixed(0)} km/h` : "";
      this.ui.info.textContent = `${clock(this.t)} · point ${lo + 1} of ${pts.length}${speed} · ${clock(this.t0)}–${clock(this.t1)}`;
    }
  }

  /** Jumps to `fraction` (0 = the first point, 1 = the last) of the loaded track's time span. */
  seek(fraction) {
    const f = Math.min(1, Math.max(0, Number(fraction) || 0));
    this.setTime(this.t0 + f * (this.t1 - this.t0));
  }

  /** Plays from where the marker is (from the start if it is at the end), at `speed`. */
  play(speed) {
    if (speed !== undefined) {
      this.speed = Number(speed) || 1;
      if (this.ui) {
        if (!SPEEDS.includes(this.speed)) this.ui.speed.append(make("option", { value: String(this.speed), text: `${this.speed}×` }));
        this.ui.speed.value = String(this.speed);
      }
    }
    if (this.points.length < 2) return;
    if (this.t >= this.t1) this.setTime(this.t0);
    this.playing = true;
    this.lastFrame = performance.now();
    this.renderPlay();
    if (this.frame === 0) this.frame = requestAnimationFrame(this.onFrame);
  }

  pause() {
    this.playing = false;
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.renderPlay();
  }

  onFrame(now) {
    this.frame = 0;
    if (!this.playing) return;
    const dt = Math.max(0, now - this.lastFrame);
    this.lastFrame = now;
    this.setTime(this.t + dt * this.speed);
    if (this.t >= this.t1) {
      this.pause();
      return;
    }
    this.frame = requestAnimationFrame(this.onFrame);
  }

  renderPlay() {
    if (!this.ui) return;
    this.ui.play.textContent = this.playing ? "❚❚" : "▶";
    this.ui.play.setAttribute("aria-label", this.playing ? "Pause" : "Play");
    this.ui.play.dataset.playing = String(this.playing);
  }

  /** Removes the trail and the marker. */
  close() {
    this.pause();
    this.layer.clearLayers();
    this.vehicle = null;
    this.points = [];
    this.range = null;
    this.pos = null;
    this.trail = null;
    this.marker = null;
    if (this.ui) {
      this.ui.player.hidden = true;
      this.ui.close.hidden = true;
      this.ui.info.textContent = "";
      for (const b of this.ui.exports.querySelectorAll("button")) b.disabled = true;
    }
    this.renderHead();
  }

  /** Saves the loaded range in `format`: fetched with the token, saved from a blob. */
  async download(format, button) {
    if (!this.vehicle || !this.range) return;
    const ext = format === "geojson" ? "geojson" : format;
    button?.setAttribute("data-state", "loading");
    try {
      const r = await this.fetchTrack(format, this.vehicle, this.range);
      const blob = await r.blob();
      const named = /filename="?([^";]+)"?/.exec(r.headers.get("content-disposition") ?? "");
      const name = named?.[1] ?? `${this.vehicle}-${Math.floor(this.range.from)}-${Math.floor(this.range.to ?? this.t1)}.${ext}`;
      const href = URL.createObjectURL(blob);
      const a = make("a", { href, download: name });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(href), 10_000);
      button?.setAttribute("data-state", "ok");
      this.lastExport = { format, name, bytes: blob.size, type: blob.type };
    } catch (err) {
      button?.setAttribute("data-state", "error");
      this.say(`Export failed: ${err.message}`);
      this.lastExport = { format, error: err.message };
    }
  }

  /** What the replay shows, for tests: null when nothing is loaded. */
  state() {
    if (!this.vehicle) return null;
    return {
      vehicle: this.vehicle,
      points: this.points.length,
      index: this.index,
      playing: this.playing,
      speed: this.speed,
      t: this.t,
      from: this.t0,
      to: this.t1,
      marker: this.pos ? { lat: this.pos.lat, lon: this.pos.lon } : null,
    };
  }

  hooks() {
    return {
      /** `{vehicle, points (count), index, playing, speed, t, from, to, marker: {lat, lon}}` or null. */
      replay: () => this.state(),
      /** Loads a track (`toMs` null: up to the newest point); resolves to the number of points. */
      startReplay: (vehicle, fromMs, toMs = null) => this.start(vehicle, fromMs, toMs),
      replaySeek: (fraction) => {
        this.pause();
        this.seek(fraction);
        return this.state();
      },
      replayPlay: (speed) => {
        this.play(speed);
        return this.state();
      },
      replayPause: () => {
        this.pause();
        return this.state();
      },
      /** Downloads the loaded range (`gpx`, `csv`, `geojson`, `json`); resolves to `{format, name, bytes, type}` or `{format, error}`. */
      replayExport: async (format) => {
        await this.download(format, this.ui?.exports.querySelector(`[data-format="${format}"]`));
        return this.lastExport ?? null;
      },
    };
  }

  installHooks() {
    const hooks = this.hooks();
    const attach = () => Object.assign((window.__fleetbeat ??= {}), hooks);
    attach();
    // In case the page (re)assigns its hooks object after this: attach again once it has.
    queueMicrotask(attach);
    setTimeout(attach, 0);
  }
}
