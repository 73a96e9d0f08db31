// Small formatting helpers for people.

/** "now", "42 s", "5 min", "3 h", "2 d" since `ms` (epoch ms); "—" if never. */
export function ago(ms, now = Date.now()) {
  if (!ms) return "—";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 2) return "now";
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

/** km/h from m/s, no decimals. */
export function kmh(mps) {
  return Number.isFinite(mps) ? String(Math.round(mps * 3.6)) : "—";
}

/** HH:MM:SS of an epoch time in ms, local time. */
export function clock(ms) {
  const d = new Date(ms);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
}

/** Creates an element with a class and text. */
export function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

/** Compass name of a heading in degrees. */
export function compass(deg) {
  if (!Number.isFinite(deg)) return "—";
  const names = ["N", "NE", "E", "SE", "S", "SW", "W", "NW"];
  return `${Math.round(deg)}° ${names[Math.round(deg / 45) % 8]}`;
}
