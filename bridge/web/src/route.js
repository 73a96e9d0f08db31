// The selected order on the map: pickup and drop-off pins, the way already driven (from the
// vehicle's stored track since the order was placed, then its live trail) and the way still to
// go (vehicle → pickup → drop-off, or vehicle → drop-off once picked up). Nothing here takes clicks.

import * as L from "leaflet";

export class RouteLayer {
  constructor(map) {
    const pane = map.getPane("route") ?? map.createPane("route");
    pane.style.zIndex = 430;
    pane.style.pointerEvents = "none";
    this.map = map;
    const common = { pane: "route", interactive: false };
    this.driven = L.polyline([], { ...common, color: "#1d4ed8", weight: 4, opacity: 0.75 });
    this.planned = L.polyline([], { ...common, color: "#1d4ed8", weight: 3, opacity: 0.8, dashArray: "8 6" });
    this.pickup = L.circleMarker([0, 0], { ...common, radius: 8, color: "#fff", weight: 2, fillColor: "#0e7490", fillOpacity: 1 });
    this.dropoff = L.circleMarker([0, 0], { ...common, radius: 8, color: "#fff", weight: 2, fillColor: "#be185d", fillOpacity: 1 });
    this.pick = L.circleMarker([0, 0], { ...common, radius: 7, color: "#be185d", weight: 3, fillColor: "#fff", fillOpacity: 1 });
    this.shown = null;
  }

  /**
   * Draws `route`: `{order, pickup, dropoff, driven: [[lat, lon]...], planned: [[lat, lon]...]}`;
   * null hides it.
   */
  show(route) {
    this.shown = route;
    if (!route) {
      for (const l of [this.driven, this.planned, this.pickup, this.dropoff]) l.remove();
      return;
    }
    this.driven.setLatLngs(route.driven).addTo(this.map);
    this.planned.setLatLngs(route.planned).addTo(this.map);
    if (route.pickup) this.pickup.setLatLng([route.pickup.lat, route.pickup.lon]).addTo(this.map);
    else this.pickup.remove();
    if (route.dropoff) this.dropoff.setLatLng([route.dropoff.lat, route.dropoff.lon]).addTo(this.map);
    else this.dropoff.remove();
  }

  /** Marks the drop-off being chosen for a new order (null removes the mark). */
  showPick(p) {
    if (p) this.pick.setLatLng([p.lat, p.lon]).addTo(this.map);
    else this.pick.remove();
  }

  /** Every point drawn, for fitting the map. */
  bounds() {
    const r = this.shown;
    if (!r) return null;
    const pts = [...r.driven, ...r.planned];
    if (r.pickup) pts.push([r.pickup.lat, r.pickup.lon]);
    if (r.dropoff) pts.push([r.dropoff.lat, r.dropoff.lon]);
    return pts.length ? L.latLngBounds(pts) : null;
  }
}
