// The vehicle list: virtualised (only the ~30 visible rows exist in the DOM, recycled while
// scrolling), so 10,000 vehicles scroll and filter as fast as 10.

import { ago, el, kmh } from "./format.js";

const ROW_PX = 28;
const OVERSCAN = 6;
const collator = new Intl.Collator(undefined, { numeric: true });

export class VehicleList {
  constructor(fleet, { scroller, spacer, rows, empty, onSelect }) {
    this.fleet = fleet;
    this.scroller = scroller;
    this.spacer = spacer;
    this.rowsEl = rows;
    this.empty = empty;
    this.onSelect = onSelect;
    this.query = "";
    this.statusFilter = null;
    this.selected = null;
    this.sorted = [];
    this.sortedAt = -1;
    this.shown = [];
    this.pool = [];
    this.frame = 0;
    scroller.addEventListener("scroll", () => this.schedule(), { passive: true });
    rows.addEventListener("click", (e) => {
      const row = e.target.closest("[data-id]");
      if (row) this.onSelect(row.dataset.id);
    });
    scroller.addEventListener("keydown", (e) => this.key(e));
    new ResizeObserver(() => this.schedule()).observe(scroller);
  }

  setQuery(text) {
    this.query = text.trim().toLowerCase();
    this.scroller.scrollTop = 0;
    this.schedule();
  }

  setStatusFilter(status) {
    this.statusFilter = this.statusFilter === status ? null : status;
    this.schedule();
    return this.statusFilter;
  }

  select(id) {
    this.selected = id;
    this.schedule();
  }

  /** Scrolls so that `id` is visible. */
  reveal(id) {
    this.refresh();
    const i = this.shown.indexOf(id);
    if (i < 0) return;
    const top = i * ROW_PX;
    const view = this.scroller.clientHeight;
    if (top < this.scroller.scrollTop || top + ROW_PX > this.scroller.scrollTop + view) {
      this.scroller.scrollTop = Math.max(0, top - view / 2);
    }
    this.schedule();
  }

  schedule() {
    if (this.frame === 0) this.frame = requestAnimationFrame(() => this.render());
  }

  refresh() {
    const fleet = this.fleet;
    if (this.sortedAt !== fleet.membership) {
      this.sorted = [...fleet.vehicles.keys()].sort(collator.compare);
      this.sortedAt = fleet.membership;
    }
    const q = this.query;
    const st = this.statusFilter;
    if (!q && !st) {
      this.shown = this.sorted;
    } else {
      this.shown = this.sorted.filter((id) => {
        if (q && !id.toLowerCase().includes(q)) return false;
        return !st || fleet.vehicles.get(id)?.status === st;
      });
    }
  }

  render() {
    this.frame = 0;
    this.refresh();
    const shown = this.shown;
    this.spacer.style.height = `${shown.length * ROW_PX}px`;
    this.empty.hidden = shown.length > 0 || this.fleet.size === 0;
    const top = this.scroller.scrollTop;
    const first = Math.max(0, Math.floor(top / ROW_PX) - OVERSCAN);
    const last = Math.min(shown.length, Math.ceil((top + this.scroller.clientHeight) / ROW_PX) + OVERSCAN);
    const count = Math.max(0, last - first);
    while (this.pool.length < count) {
      const row = el("div", "row");
      row.setAttribute("role", "option");
      row.append(el("span", "dot"), el("span", "id"), el("span", "num"), el("span", "num"), el("span", "num seen"));
      this.rowsEl.append(row);
      this.pool.push(row);
    }
    this.rowsEl.style.transform = `translateY(${first * ROW_PX}px)`;
    const now = Date.now();
    for (let i = 0; i < this.pool.length; i++) {
      const row = this.pool[i];
      const v = i < count ? this.fleet.vehicles.get(shown[first + i]) : undefined;
      if (!v) {
        // A spare row: hidden, and no longer naming a vehicle.
        row.hidden = true;
        delete row.dataset.id;
        continue;
      }
      row.hidden = false;
      row.dataset.id = v.id;
      row.dataset.status = v.status;
      row.setAttribute("aria-selected", String(v.id === this.selected));
      const [dot, id, speed, battery, seen] = row.children;
      dot.title = v.status;
      set(id, v.id);
      set(speed, v.pos ? kmh(v.pos.speed_mps) : "—");
      set(battery, v.pos ? `${v.pos.battery_pct}%` : "—");
      set(seen, ago(v.lastSeenMs, now));
    }
  }

  key(e) {
    if (e.key !== "ArrowDown" && e.key !== "ArrowUp") return;
    e.preventDefault();
    this.refresh();
    const i = this.shown.indexOf(this.selected);
    const next = this.shown[Math.max(0, Math.min(this.shown.length - 1, i + (e.key === "ArrowDown" ? 1 : -1)))];
    if (next) {
      this.onSelect(next);
      this.reveal(next);
    }
  }
}

function set(node, text) {
  if (node.textContent !== text) node.textContent = text;
}
