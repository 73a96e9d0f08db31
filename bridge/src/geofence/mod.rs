//! Geofences: circles and simple polygons that raise `enter` / `exit` when a vehicle crosses
//! them, with hysteresis so that GPS jitter at the edge does not flap.
//!
//! # Layout
//! - `shape`: [`Shape`] (what clients send, degrees), its checks ([`ShapeError`]) and
//!   [`Geometry`], the shape projected onto a local plane where the depth of a point (metres
//!   inside, negative outside) is measured.
//! - `engine`: [`GeofenceEngine`], the fences in an R*-tree per fleet (their boxes grown by the
//!   hysteresis) and which fences each vehicle is inside; [`GeofenceEngine::observe`] turns a
//!   position into [`Transition`]s.
//! - here: [`GeofenceOptions`] (`[geofences]`), the automatic fences (a circle around each
//!   configured store, one around each open order's drop-off) and [`Geofences`], the engine
//!   as the bridge shares it: heartbeats are noted on the MQTT path (one map insert) and
//!   evaluated in batches by the bridge's geofence task (`server`), which also keeps the
//!   stored and automatic fences in step with the store.
//!
//! Depends on `shared` only; `store` keeps custom fences (the shape as JSON text), `view`
//! makes the events, `api` the routes.

mod engine;
mod shape;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use shared::{FleetId, Heartbeat, Position, VehicleId};

pub use engine::{Crossing, Fence, FenceKind, GeofenceEngine, Sighting, Transition};
pub use shape::{Geometry, MAX_POINTS, MAX_RADIUS_M, Shape, ShapeError};

/// The geofence settings in force (`[geofences]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeofenceOptions {
    /// Radius of the automatic fence around each configured store, metres (default 60).
    pub store_radius_m: f64,
    /// Radius of the automatic fence around each open order's drop-off, metres (default 40).
    pub dropoff_radius_m: f64,
    /// How far inside a fence a vehicle must be to enter it, and outside to leave it, metres
    /// (default 15).
    pub hysteresis_m: f64,
    /// The most custom fences one fleet may have (default 10 000: the benchmark's largest
    /// count, about 2.7 µs per heartbeat).
    pub max_custom_per_fleet: usize,
}

impl Default for GeofenceOptions {
    fn default() -> Self {
        Self {
            store_radius_m: 60.0,
            dropoff_radius_m: 40.0,
            hysteresis_m: 15.0,
            max_custom_per_fleet: 10_000,
        }
    }
}

/// A configured store with a location: the centre of its automatic fence.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSite {
    /// The store id.
    pub store: String,
    /// The fleet that delivers its orders.
    pub fleet: FleetId,
    /// `[lat, lon]`, degrees.
    pub location: [f64; 2],
}

/// An open order's drop-off: the centre of its automatic fence.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenDropoff {
    /// The order id.
    pub order: String,
    /// The store that placed it.
    pub store: String,
    /// The fleet delivering it.
    pub fleet: FleetId,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// When it was placed, ms since the Unix epoch.
    pub created_ms: u64,
    /// The vehicle holding it, if any: the only one that enters its fence.
    pub carrier: Option<VehicleId>,
}

/// `pos` in degrees, `(lat, lon)`: what fences and sightings are measured in.
pub fn degrees(pos: Position) -> (f64, f64) {
    (f64::from(pos.lat_e7) * 1e-7, f64::from(pos.lon_e7) * 1e-7)
}

/// The automatic fence of a store: `store:{store}`, a circle of `radius_m`.
pub fn store_fence(site: &StoreSite, radius_m: f64) -> Fence {
    Fence {
        id: format!("store:{}", site.store),
        name: format!("store {}", site.store),
        fleet: site.fleet.clone(),
        kind: FenceKind::Store,
        shape: Shape::Circle {
            lat: site.location[0],
            lon: site.location[1],
            radius_m,
        },
        created_ms: 0,
        store: Some(site.store.clone()),
        order: None,
    }
}

/// The automatic fence of an open order's drop-off: `dropoff:{order}`, a circle of
/// `radius_m`.
pub fn dropoff_fence(dropoff: &OpenDropoff, radius_m: f64) -> Fence {
    Fence {
        id: format!("dropoff:{}", dropoff.order),
        name: format!("drop-off of {}", dropoff.order),
        fleet: dropoff.fleet.clone(),
        kind: FenceKind::Dropoff,
        shape: Shape::Circle {
            lat: dropoff.lat,
            lon: dropoff.lon,
            radius_m,
        },
        created_ms: dropoff.created_ms,
        store: Some(dropoff.store.clone()),
        order: Some(dropoff.order.clone()),
    }
}

/// The engine as the bridge shares it: the fences behind one lock, and the positions noted
/// since the last evaluation behind another (so the MQTT path never waits for an
/// evaluation).
#[derive(Debug)]
pub struct Geofences {
    options: GeofenceOptions,
    engine: Mutex<GeofenceEngine>,
    noted: Mutex<HashMap<VehicleId, Sighting>>,
    /// This bridge's edits of custom fences, changed under the engine's lock.
    edits: Mutex<CustomEdits>,
}

/// The custom fences this bridge made, changed or removed ([`Geofences::upsert_custom`],
/// [`Geofences::remove_custom`]): a reload of the custom fences read from the store before one
/// of them may not hold it ([`Geofences::sync_custom`]).
#[derive(Debug, Default)]
struct CustomEdits {
    /// How many so far.
    count: u64,
    /// Each fence's last edit, by that count; kept until a reload read after it is applied.
    last: HashMap<String, u64>,
}

impl Default for Geofences {
    fn default() -> Self {
        Self::new(GeofenceOptions::default())
    }
}

impl Geofences {
    /// No fences yet, with `options`.
    pub fn new(options: GeofenceOptions) -> Self {
        Self {
            options,
            engine: Mutex::new(GeofenceEngine::new(options.hysteresis_m)),
            noted: Mutex::new(HashMap::new()),
            edits: Mutex::new(CustomEdits::default()),
        }
    }

    /// The settings in force.
    pub fn options(&self) -> GeofenceOptions {
        self.options
    }

    /// Locks the engine (a poisoned lock is recovered: a half-done update leaves at worst a
    /// missed transition).
    pub fn engine(&self) -> MutexGuard<'_, GeofenceEngine> {
        self.engine.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes a heartbeat of `vehicle` for the next evaluation; a newer one replaces it.
    pub fn note(&self, fleet: &FleetId, vehicle: &VehicleId, heartbeat: &Heartbeat) {
        let (lat, lon) = degrees(heartbeat.pos);
        let sighting = Sighting {
            vehicle: vehicle.clone(),
            fleet: fleet.clone(),
            lat,
            lon,
            ts_ms: heartbeat.ts_ms,
        };
        let mut noted = self.noted.lock().unwrap_or_else(PoisonError::into_inner);
        match noted.get_mut(vehicle) {
            Some(old) if old.ts_ms > sighting.ts_ms => {}
            Some(old) => *old = sighting,
            None => {
                noted.insert(vehicle.clone(), sighting);
            }
        }
    }

    /// Evaluates the positions noted since the last call: the transitions they cause.
    pub fn evaluate(&self) -> Vec<Transition> {
        let noted = std::mem::take(&mut *self.noted.lock().unwrap_or_else(PoisonError::into_inner));
        if noted.is_empty() {
            return Vec::new();
        }
        let mut engine = self.engine();
        noted.values().flat_map(|s| engine.observe(s)).collect()
    }

    /// Makes the store fences those of `sites`.
    pub fn sync_stores(&self, sites: &[StoreSite]) -> usize {
        let fences = sites
            .iter()
            .map(|s| store_fence(s, self.options.store_radius_m))
            .collect();
        self.engine().sync_kind(FenceKind::Store, fences)
    }

    /// Makes the drop-off fences those of `open` orders, each entered by its carrier only.
    pub fn sync_dropoffs(&self, open: &[OpenDropoff]) -> usize {
        let fences = open
            .iter()
            .map(|d| dropoff_fence(d, self.options.dropoff_radius_m))
            .collect();
        let mut engine = self.engine();
        let changed = engine.sync_kind(FenceKind::Dropoff, fences);
        for d in open {
            engine.set_carrier(&format!("dropoff:{}", d.order), d.carrier.clone());
        }
        changed
    }

    /// How many custom fences this bridge made, changed or removed so far: read it before
    /// reading the custom fences from the store, and hand it to [`Geofences::sync_custom`].
    pub fn custom_edits(&self) -> u64 {
        self.edits().count
    }

    /// This bridge's edits of custom fences (a poisoned lock is recovered: an edit changes
    /// them in one step).
    fn edits(&self) -> MutexGuard<'_, CustomEdits> {
        self.edits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds or replaces the custom fence `fence`, just committed to the store by this bridge.
    pub fn upsert_custom(&self, fence: Fence) {
        let mut engine = self.engine();
        let id = fence.id.clone();
        engine.upsert(fence);
        self.edited_now(id);
    }

    /// Removes the custom fence `id`, just deleted from the store by this bridge; returns it.
    pub fn remove_custom(&self, id: &str) -> Option<Arc<Fence>> {
        let mut engine = self.engine();
        let removed = engine.remove(id);
        self.edited_now(id.to_owned());
        removed
    }

    /// Counts an edit of the custom fence `id` by this bridge (called under the engine's
    /// lock).
    fn edited_now(&self, id: String) {
        let mut edits = self.edits();
        edits.count += 1;
        let edit = edits.count;
        edits.last.insert(id, edit);
    }

    /// Makes the custom fences `fences`, read from the store after [`Geofences::custom_edits`]
    /// gave `read_after`; returns how many changed. A fence this bridge made, changed or
    /// removed since may be missing from the read, or be there as it was: it is left as
    /// this bridge's edit made it (applying the read would undo the edit until the next
    /// reload, and shorten the count of the fleet's fences, which caps how many more it may
    /// make). Every other fence is made as read, so the edits of other bridges arrive with
    /// every reload, however often this bridge edits.
    pub fn sync_custom(&self, fences: Vec<Fence>, read_after: u64) -> usize {
        let mut engine = self.engine();
        let mut edits = self.edits();
        let edited = &mut edits.last;
        // The read holds the edits up to `read_after`: those need no keeping any more.
        edited.retain(|_, edit| *edit > read_after);
        if edited.is_empty() {
            return engine.sync_kind(FenceKind::Custom, fences);
        }
        let mut wanted: Vec<Fence> = fences
            .into_iter()
            .filter(|f| !edited.contains_key(&f.id))
            .collect();
        wanted.extend(
            edited
                .keys()
                .filter_map(|id| engine.fence(id))
                .filter(|f| f.kind == FenceKind::Custom)
                .map(|f| (*f).clone()),
        );
        engine.sync_kind(FenceKind::Custom, wanted)
    }

    /// An order is open (placed, assigned, on its way): its drop-off fence is added, or
    /// changed to `dropoff` with its carrier. Returns whether anything changed.
    pub fn order_opened(&self, dropoff: &OpenDropoff) -> bool {
        let fence = dropoff_fence(dropoff, self.options.dropoff_radius_m);
        let id = fence.id.clone();
        let mut engine = self.engine();
        if engine.fence(&id).is_some_and(|f| *f == fence)
            && engine.carrier(&id) == dropoff.carrier.as_ref()
        {
            return false;
        }
        engine.upsert(fence);
        engine.set_carrier(&id, dropoff.carrier.clone());
        true
    }

    /// An order ended (delivered, cancelled): its drop-off fence goes. Returns whether it was
    /// there.
    pub fn order_closed(&self, order: &str) -> bool {
        self.engine().remove(&format!("dropoff:{order}")).is_some()
    }

    /// The fences for which `wanted` holds, sorted by kind then id.
    pub fn list(&self, wanted: impl Fn(&Fence) -> bool) -> Vec<Arc<Fence>> {
        let mut fences: Vec<Arc<Fence>> = self
            .engine()
            .fences()
            .filter(|f| wanted(f))
            .cloned()
            .collect();
        fences.sort_by(|a, b| (a.kind.as_str(), &a.id).cmp(&(b.kind.as_str(), &b.id)));
        fences
    }
}

#[cfg(test)]
mod tests {
    use shared::{Heartbeat, Position};

    use super::*;

    /// A custom fence `id` of `fleet`: a 50 m circle.
    fn custom_fence(id: &str, fleet: &FleetId) -> Fence {
        Fence {
            id: id.into(),
            name: id.into(),
            fleet: fleet.clone(),
            kind: FenceKind::Custom,
            shape: Shape::Circle {
                lat: 52.5,
                lon: 13.4,
                radius_m: 50.0,
            },
            created_ms: 1,
            store: None,
            order: None,
        }
    }

    #[test]
    fn noted_heartbeats_are_evaluated_once_newest_first() {
        let geofences = Geofences::new(GeofenceOptions {
            store_radius_m: 60.0,
            dropoff_radius_m: 40.0,
            hysteresis_m: 10.0,
            ..GeofenceOptions::default()
        });
        let fleet = FleetId::new("demo").expect("valid");
        let vehicle = VehicleId::new("v1").expect("valid");
        geofences.sync_stores(&[StoreSite {
            store: "store-1".into(),
            fleet: fleet.clone(),
            location: [52.52, 13.405],
        }]);
        let mut dropoff = OpenDropoff {
            order: "o-1".into(),
            store: "store-1".into(),
            fleet: fleet.clone(),
            lat: 52.53,
            lon: 13.405,
            created_ms: 5,
            carrier: None,
        };
        assert!(geofences.order_opened(&dropoff));
        assert!(!geofences.order_opened(&dropoff), "as it was");
        dropoff.carrier = Some(vehicle.clone());
        assert!(geofences.order_opened(&dropoff), "a carrier now");
        assert!(!geofences.order_opened(&dropoff), "as it was");
        assert_eq!(geofences.list(|_| true).len(), 2);
        let hb = |lat: f64, ts_ms| Heartbeat {
            ts_ms,
            pos: Position::new((lat * 1e7) as i32, 134_050_000),
            ..Heartbeat::default()
        };
        // The older heartbeat noted last does not replace the newer one.
        geofences.note(&fleet, &vehicle, &hb(52.53, 20));
        geofences.note(&fleet, &vehicle, &hb(52.52, 10));
        let t = geofences.evaluate();
        assert_eq!(t.len(), 1);
        assert_eq!(
            (
                t[0].fence.id.as_str(),
                t[0].crossing,
                t[0].fence.order.as_deref()
            ),
            ("dropoff:o-1", Crossing::Enter, Some("o-1"))
        );
        assert!(geofences.evaluate().is_empty(), "nothing noted since");
        assert!(geofences.order_closed("o-1"));
        assert!(!geofences.order_closed("o-1"), "gone already");
        assert_eq!(geofences.list(|_| true).len(), 1);
    }

    /// A reload of the custom fences read before this bridge made, changed or removed one
    /// leaves that fence as the edit made it (the read would undo the edit, and shorten the
    /// fleet's count, which caps how many more it may make), and applies the rest: another
    /// bridge's fences arrive with every reload, however often this bridge edits.
    #[test]
    fn a_reload_read_before_an_own_edit_keeps_the_edit_and_applies_the_rest() {
        let geofences = Geofences::default();
        let custom = |id: &str| custom_fence(id, &FleetId::new("north").expect("valid"));
        let ids = |g: &Geofences| {
            let mut ids: Vec<String> = g
                .list(|f| f.kind == FenceKind::Custom)
                .into_iter()
                .map(|f| f.id.clone())
                .collect();
            ids.sort();
            ids
        };
        // The store held gf-1 and another bridge's gf-9 when the reload read it; this bridge
        // then made gf-2.
        let read_after = geofences.custom_edits();
        geofences.upsert_custom(custom("gf-2"));
        assert_eq!(
            geofences.sync_custom(vec![custom("gf-1"), custom("gf-9")], read_after),
            2
        );
        assert_eq!(ids(&geofences), ["gf-1", "gf-2", "gf-9"], "gf-2 stays");
        // A reload read after the edit is applied whole: gf-9 was deleted meanwhile.
        let read_after = geofences.custom_edits();
        assert_eq!(
            geofences.sync_custom(vec![custom("gf-1"), custom("gf-2")], read_after),
            1
        );
        assert_eq!(ids(&geofences), ["gf-1", "gf-2"]);
        // A removal and a change: a reload that still holds gf-2, and gf-1 as it was, brings
        // neither back; the other bridge's new gf-8 arrives with it.
        let read_after = geofences.custom_edits();
        assert!(geofences.remove_custom("gf-2").is_some());
        let moved = Fence {
            name: "moved".into(),
            ..custom("gf-1")
        };
        geofences.upsert_custom(moved.clone());
        assert_eq!(
            geofences.sync_custom(
                vec![custom("gf-1"), custom("gf-2"), custom("gf-8")],
                read_after
            ),
            1
        );
        assert_eq!(ids(&geofences), ["gf-1", "gf-8"], "gf-2 stays removed");
        assert_eq!(
            geofences.engine().fence("gf-1").as_deref(),
            Some(&moved),
            "gf-1 as changed"
        );
    }
}
