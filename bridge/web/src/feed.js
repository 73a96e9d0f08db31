// The live feed: delivery events, status changes and command acks, newest first, capped.

import { clock, el } from "./format.js";

const CAP = 200;

export class Feed {
  constructor(list, { onSelect }) {
    this.list = list;
    this.pending = [];
    this.frame = 0;
    this.count = 0;
    list.addEventListener("click", (e) => {
      const item = e.target.closest("[data-vehicle]");
      if (item) onSelect(item.dataset.vehicle);
    });
  }

  /** Adds an entry: `kind` is "delivery", "status" or "ack"; `tone` colours it. */
  add({ kind, vehicle, text, tone, ts }) {
    this.pending.push({ kind, vehicle, text, tone, ts: ts ?? Date.now() });
    if (this.pending.length > CAP) this.pending.splice(0, this.pending.length - CAP);
    this.count++;
    if (this.frame === 0) this.frame = requestAnimationFrame(() => this.flush());
  }

  setFilter(filter) {
    this.list.dataset.filter = filter;
  }

  flush() {
    this.frame = 0;
    const frag = document.createDocumentFragment();
    // Newest first: the last pending entry goes on top.
    for (let i = this.pending.length - 1; i >= 0; i--) {
      const e = this.pending[i];
      const li = el("li", `k-${e.kind}${e.tone ? ` t-${e.tone}` : ""}`);
      if (e.vehicle) li.dataset.vehicle = e.vehicle;
      li.append(el("time", "", clock(e.ts)), el("span", "kind", e.kind), el("span", "text", e.text));
      frag.append(li);
    }
    this.pending = [];
    this.list.prepend(frag);
    while (this.list.childElementCount > CAP) this.list.lastElementChild.remove();
  }

  clear() {
    this.pending = [];
    this.list.replaceChildren();
  }
}
