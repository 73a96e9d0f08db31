// The live feed: delivery, order and geofence events, status changes, command acks and
// announcements, newest first, capped. Queued `delivery` messages carry a `message_id`: the
// bridge may send one again (after a reconnect, or a `getAll`), so the feed shows each id once.

import { clock, el } from "./format.js";

const CAP = 200;
/** How many message ids are remembered for de-duplication (oldest forgotten first). */
const SEEN_CAP = 20_000;

export class Feed {
  constructor(list, { onSelect }) {
    this.list = list;
    this.pending = [];
    this.frame = 0;
    this.count = 0;
    /** The newest entries (newest last), for the test hooks: `{kind, text, messageId?}`. */
    this.entries = [];
    /** Message ids shown, in arrival order (bounded), and as a set for lookups. */
    this.seen = new Set();
    this.seenOrder = [];
    this.duplicatesDropped = 0;
    list.addEventListener("click", (e) => {
      const item = e.target.closest("[data-vehicle], [data-order]");
      if (item) onSelect(item.dataset.vehicle ?? null, item.dataset.order ?? null);
    });
  }

  /** Whether a queued message with this id was shown already. */
  has(messageId) {
    return messageId !== undefined && messageId !== null && this.seen.has(String(messageId));
  }

  /**
   * Adds an entry: `kind` is "delivery", "pickup", "order", "geofence", "status", "ack" or
   * "announce"; `tone` colours it. With a `messageId` seen before, nothing is added and false
   * is returned (a duplicate).
   */
  add({ kind, vehicle, order, text, tone, ts, messageId }) {
    if (messageId !== undefined && messageId !== null) {
      const key = String(messageId);
      if (this.seen.has(key)) {
        this.duplicatesDropped++;
        return false;
      }
      this.seen.add(key);
      this.seenOrder.push(messageId);
      if (this.seenOrder.length > SEEN_CAP) this.seen.delete(String(this.seenOrder.shift()));
    }
    const entry = { kind, vehicle, order, text, tone, ts: ts ?? Date.now(), messageId: messageId ?? undefined };
    this.pending.push(entry);
    if (this.pending.length > CAP) this.pending.splice(0, this.pending.length - CAP);
    this.entries.push(entry);
    if (this.entries.length > CAP * 2) this.entries.splice(0, this.entries.length - CAP);
    this.count++;
    if (this.frame === 0) this.frame = requestAnimationFrame(() => this.flush());
    return true;
  }

  /** The entries, newest first (at most `CAP`). */
  snapshot() {
    const out = [];
    for (let i = this.entries.length - 1; i >= 0 && out.length < CAP; i--) {
      const e = this.entries[i];
      const item = { kind: e.kind, text: e.text };
      if (e.messageId !== undefined) item.messageId = e.messageId;
      out.push(item);
    }
    return out;
  }

  /** The message ids shown (oldest first). */
  ids() {
    return [...this.seenOrder];
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
      if (e.order) li.dataset.order = e.order;
      if (e.messageId !== undefined) li.dataset.messageId = String(e.messageId);
      li.append(el("time", "", clock(e.ts)), el("span", "kind", e.kind), el("span", "text", e.text));
      frag.append(li);
    }
    this.pending = [];
    this.list.prepend(frag);
    while (this.list.childElementCount > CAP) this.list.lastElementChild.remove();
  }

  /** Forgets what the feed shows (log out); the ids seen are kept only with `keepSeen`. */
  clear({ keepSeen = false } = {}) {
    this.pending = [];
    this.entries = [];
    this.list.replaceChildren();
    if (!keepSeen) {
      this.seen.clear();
      this.seenOrder = [];
    }
  }
}
