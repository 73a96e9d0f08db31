//! [`GeofenceEngine`]: the fences, an R*-tree per fleet over their bounding boxes, and which
//! fences each vehicle is inside; [`GeofenceEngine::observe`] turns one position into the
//! `enter` / `exit` transitions it causes, with hysteresis.
//!
//! Fences with the same box (every order's drop-off at one parcel locker, say) share one
//! entry of the tree: rstar removes an entry by searching every entry whose box holds its
//! box and comparing each, so thousands of equal boxes made each removal a scan of them all.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rstar::RTree;
use rstar::primitives::{GeomWithData, Rectangle};
use shared::{FleetId, VehicleId};

use super::shape::{Geometry, Shape};

/// What made a fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FenceKind {
    /// Drawn by a dispatcher or an operator, stored.
    Custom,
    /// Around a configured store's location (`store:{store}`).
    Store,
    /// Around an open order's drop-off (`dropoff:{order}`).
    Dropoff,
}

impl FenceKind {
    /// `custom`, `store` or `dropoff`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Custom => "custom",
            Self::Store => "store",
            Self::Dropoff => "dropoff",
        }
    }
}

/// One fence.
#[derive(Debug, Clone, PartialEq)]
pub struct Fence {
    /// Its id: a custom fence's own, `store:{store}` or `dropoff:{order}`.
    pub id: String,
    /// A name for people.
    pub name: String,
    /// The fleet whose vehicles it watches.
    pub fleet: FleetId,
    /// What made it.
    pub kind: FenceKind,
    /// Its shape.
    pub shape: Shape,
    /// When it was made, ms since the Unix epoch.
    pub created_ms: u64,
    /// The store concerned (store and drop-off fences).
    pub store: Option<String>,
    /// The order concerned (drop-off fences).
    pub order: Option<String>,
}

/// A vehicle's position, as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sighting {
    /// The vehicle.
    pub vehicle: VehicleId,
    /// Its fleet.
    pub fleet: FleetId,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// When (the heartbeat's device clock), ms since the Unix epoch.
    pub ts_ms: u64,
}

/// Which way a vehicle crossed a fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crossing {
    /// From outside to inside (by at least the hysteresis).
    Enter,
    /// From inside to outside (by at least the hysteresis).
    Exit,
}

impl Crossing {
    /// `enter` or `exit`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enter => "enter",
            Self::Exit => "exit",
        }
    }
}

/// A vehicle entered or left a fence.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The fence.
    pub fence: Arc<Fence>,
    /// Which way.
    pub crossing: Crossing,
    /// Where and when the vehicle was.
    pub sighting: Sighting,
}

/// A box's corners (`[lon, lat]` degrees, low then high) as bits: equal boxes, equal keys.
type BoxKey = [u64; 4];

/// A distinct box in a fleet's tree, with its key.
type Boxed = GeomWithData<Rectangle<[f64; 2]>, BoxKey>;

/// A fleet's fences: the tree of their distinct boxes, and the fences of each box.
#[derive(Default)]
struct FleetIndex {
    tree: RTree<Boxed>,
    boxes: HashMap<BoxKey, HashSet<Arc<str>>>,
}

impl FleetIndex {
    /// Adds fence `id` with box `boxed`.
    fn insert(&mut self, boxed: &Boxed, id: Arc<str>) {
        let fences = self.boxes.entry(boxed.data).or_default();
        if fences.is_empty() {
            self.tree.insert(*boxed);
        }
        fences.insert(id);
    }

    /// Removes fence `id` with box `boxed`; whether the fleet has no fence left.
    fn remove(&mut self, boxed: &Boxed, id: &str) -> bool {
        if let Some(fences) = self.boxes.get_mut(&boxed.data) {
            fences.remove(id);
            if fences.is_empty() {
                self.boxes.remove(&boxed.data);
                self.tree.remove(boxed);
            }
        }
        self.boxes.is_empty()
    }
}

struct Entry {
    fence: Arc<Fence>,
    geometry: Geometry,
    boxed: Boxed,
}

/// The fences and the vehicles' inside-sets. Not shared: [`super::Geofences`] locks it.
pub struct GeofenceEngine {
    hysteresis_m: f64,
    fences: HashMap<Arc<str>, Entry>,
    trees: HashMap<FleetId, FleetIndex>,
    /// The fences each vehicle is inside (a few at most).
    inside: HashMap<VehicleId, Vec<Arc<str>>>,
    /// The vehicle holding each drop-off fence's order: only it enters that fence.
    carriers: HashMap<Arc<str>, VehicleId>,
}

impl std::fmt::Debug for GeofenceEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeofenceEngine")
            .field("hysteresis_m", &self.hysteresis_m)
            .field("fences", &self.fences.len())
            .field("vehicles_inside", &self.inside.len())
            .finish()
    }
}

impl GeofenceEngine {
    /// An engine without fences: a vehicle enters a fence once inside it by `hysteresis_m`
    /// metres and leaves it once outside by as much.
    pub fn new(hysteresis_m: f64) -> Self {
        Self {
            hysteresis_m: hysteresis_m.max(0.0),
            fences: HashMap::new(),
            trees: HashMap::new(),
            inside: HashMap::new(),
            carriers: HashMap::new(),
        }
    }

    /// How many fences there are.
    pub fn len(&self) -> usize {
        self.fences.len()
    }

    /// Whether there are no fences.
    pub fn is_empty(&self) -> bool {
        self.fences.is_empty()
    }

    /// A fence by id.
    pub fn fence(&self, id: &str) -> Option<Arc<Fence>> {
        self.fences.get(id).map(|e| Arc::clone(&e.fence))
    }

    /// Every fence, in no order.
    pub fn fences(&self) -> impl Iterator<Item = &Arc<Fence>> {
        self.fences.values().map(|e| &e.fence)
    }

    /// Adds `fence` (its shape already validated), or replaces the fence with its id. A
    /// vehicle inside the old shape stays inside until it is outside the new one.
    pub fn upsert(&mut self, fence: Fence) {
        if self
            .fences
            .get(fence.id.as_str())
            .is_some_and(|e| *e.fence == fence)
        {
            return;
        }
        self.remove(&fence.id);
        let id: Arc<str> = Arc::from(fence.id.as_str());
        let geometry = Geometry::new(&fence.shape);
        let (lo, hi) = geometry.bounds(self.hysteresis_m);
        let key = [lo[0], lo[1], hi[0], hi[1]].map(f64::to_bits);
        let boxed = GeomWithData::new(Rectangle::from_corners(lo, hi), key);
        self.trees
            .entry(fence.fleet.clone())
            .or_default()
            .insert(&boxed, Arc::clone(&id));
        self.fences.insert(
            id,
            Entry {
                fence: Arc::new(fence),
                geometry,
                boxed,
            },
        );
    }

    /// Removes a fence; returns it if it was there. Vehicles inside it forget it without an
    /// `exit` (an order that ended, a fence deleted).
    pub fn remove(&mut self, id: &str) -> Option<Arc<Fence>> {
        let entry = self.fences.remove(id)?;
        self.carriers.remove(id);
        if let Some(index) = self.trees.get_mut(&entry.fence.fleet)
            && index.remove(&entry.boxed, id)
        {
            self.trees.remove(&entry.fence.fleet);
        }
        Some(entry.fence)
    }

    /// Makes the fences of `kind` exactly `wanted` (by id and content): adds the new ones,
    /// replaces the changed ones, removes the others of that kind. Returns how many changed.
    pub fn sync_kind(&mut self, kind: FenceKind, wanted: Vec<Fence>) -> usize {
        let keep: std::collections::HashSet<&str> = wanted.iter().map(|f| f.id.as_str()).collect();
        let gone: Vec<Arc<str>> = self
            .fences
            .iter()
            .filter(|(id, e)| e.fence.kind == kind && !keep.contains(&***id))
            .map(|(id, _)| Arc::clone(id))
            .collect();
        drop(keep);
        let mut changed = gone.len();
        for id in gone {
            self.remove(&id);
        }
        for fence in wanted {
            if self
                .fences
                .get(fence.id.as_str())
                .is_none_or(|e| *e.fence != fence)
            {
                changed += 1;
                self.upsert(fence);
            }
        }
        changed
    }

    /// Sets the vehicle holding the order of the drop-off fence `id` (`None`: nobody). A
    /// drop-off fence is the customer's door for its carrier only: other vehicles passing by
    /// raise nothing there (they neither enter nor tell the store). A vehicle inside when it
    /// stops being the carrier leaves the fence as usual, by distance.
    pub fn set_carrier(&mut self, id: &str, carrier: Option<VehicleId>) {
        match (self.fences.get_key_value(id), carrier) {
            (Some((key, _)), Some(vehicle)) => {
                self.carriers.insert(Arc::clone(key), vehicle);
            }
            _ => {
                self.carriers.remove(id);
            }
        }
    }

    /// The vehicle holding the order of the drop-off fence `id`, if any.
    pub fn carrier(&self, id: &str) -> Option<&VehicleId> {
        self.carriers.get(id)
    }

    /// Whether `vehicle` may enter `fence`: any fence of its fleet, but a drop-off fence
    /// only as the order's carrier.
    fn may_enter(&self, id: &str, fence: &Fence, vehicle: &VehicleId) -> bool {
        fence.kind != FenceKind::Dropoff || self.carriers.get(id) == Some(vehicle)
    }

    /// The transitions `sighting` causes, found through the fleet's R*-tree: the fences
    /// whose box holds the point, and the fences the vehicle is inside.
    pub fn observe(&mut self, sighting: &Sighting) -> Vec<Transition> {
        let point = [sighting.lon, sighting.lat];
        let mut candidates: Vec<Arc<str>> = Vec::new();
        if let Some(index) = self.trees.get(&sighting.fleet) {
            for boxed in index.tree.locate_all_at_point(&point) {
                if let Some(fences) = index.boxes.get(&boxed.data) {
                    candidates.extend(fences.iter().cloned());
                }
            }
        }
        self.apply(sighting, candidates)
    }

    /// [`Self::observe`] without the index: tests every fence of the fleet (the baseline of
    /// the benchmark, and the reference of the tests).
    pub fn observe_by_scan(&mut self, sighting: &Sighting) -> Vec<Transition> {
        let candidates: Vec<Arc<str>> = self
            .fences
            .iter()
            .filter(|(_, e)| e.fence.fleet == sighting.fleet)
            .map(|(id, _)| Arc::clone(id))
            .collect();
        self.apply(sighting, candidates)
    }

    /// Forgets a vehicle's inside-set (it left the bridge's view).
    pub fn forget(&mut self, vehicle: &VehicleId) {
        self.inside.remove(vehicle);
    }

    fn apply(&mut self, sighting: &Sighting, candidates: Vec<Arc<str>>) -> Vec<Transition> {
        let h = self.hysteresis_m;
        let mut out = Vec::new();
        let inside = self.inside.remove(&sighting.vehicle).unwrap_or_default();
        let mut still = Vec::with_capacity(inside.len());
        // The fences it is inside, candidates or not: exits (and fences gone, forgotten).
        for id in inside {
            let Some(entry) = self.fences.get(&id) else {
                continue;
            };
            if entry.geometry.depth(sighting.lat, sighting.lon) <= -h {
                out.push(Transition {
                    fence: Arc::clone(&entry.fence),
                    crossing: Crossing::Exit,
                    sighting: sighting.clone(),
                });
            } else {
                still.push(id);
            }
        }
        for id in candidates {
            if still.contains(&id) || out.iter().any(|t| *t.fence.id == *id) {
                continue;
            }
            let Some(entry) = self.fences.get(&id) else {
                continue;
            };
            if entry.fence.fleet == sighting.fleet
                && self.may_enter(&id, &entry.fence, &sighting.vehicle)
                && entry.geometry.depth(sighting.lat, sighting.lon) >= h
            {
                out.push(Transition {
                    fence: Arc::clone(&entry.fence),
                    crossing: Crossing::Enter,
                    sighting: sighting.clone(),
                });
                still.push(id);
            }
        }
        if !still.is_empty() {
            self.inside.insert(sighting.vehicle.clone(), still);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAT: f64 = 52.52;
    const LON: f64 = 13.405;
    /// Degrees of latitude per metre.
    const DEG_PER_M: f64 = 1.0 / 111_195.0;

    fn fleet(f: &str) -> FleetId {
        FleetId::new(f).expect("valid")
    }

    fn circle(id: &str, fleet_id: &str, lat: f64, lon: f64, r: f64) -> Fence {
        Fence {
            id: id.into(),
            name: id.into(),
            fleet: fleet(fleet_id),
            kind: FenceKind::Custom,
            shape: Shape::Circle {
                lat,
                lon,
                radius_m: r,
            },
            created_ms: 0,
            store: None,
            order: None,
        }
    }

    fn at(vehicle: &str, north_m: f64) -> Sighting {
        Sighting {
            vehicle: VehicleId::new(vehicle).expect("valid"),
            fleet: fleet("demo"),
            lat: LAT + north_m * DEG_PER_M,
            lon: LON,
            ts_ms: 1,
        }
    }

    fn crossings(t: &[Transition]) -> Vec<(String, Crossing)> {
        t.iter().map(|t| (t.fence.id.clone(), t.crossing)).collect()
    }

    fn want(w: &[(&str, Crossing)]) -> Vec<(String, Crossing)> {
        w.iter().map(|(id, c)| ((*id).to_owned(), *c)).collect()
    }

    #[test]
    fn enter_and_exit_need_the_hysteresis() {
        let mut engine = GeofenceEngine::new(15.0);
        engine.upsert(circle("c", "demo", LAT, LON, 50.0));
        // Approaching from 200 m north: nothing until 15 m inside the 50 m rim.
        for north in [200.0, 100.0, 60.0, 50.0, 40.0, 36.0] {
            assert!(engine.observe(&at("v1", north)).is_empty(), "at {north} m");
        }
        assert_eq!(
            crossings(&engine.observe(&at("v1", 34.0))),
            want(&[("c", Crossing::Enter)])
        );
        // Jitter around the rim: no flapping.
        for north in [45.0, 55.0, 48.0, 62.0, 40.0, 64.0, 30.0] {
            assert!(
                engine.observe(&at("v1", north)).is_empty(),
                "jitter at {north} m"
            );
        }
        assert_eq!(
            crossings(&engine.observe(&at("v1", 66.0))),
            want(&[("c", Crossing::Exit)])
        );
        for north in [55.0, 45.0, 64.0, 36.0] {
            assert!(
                engine.observe(&at("v1", north)).is_empty(),
                "jitter outside at {north} m"
            );
        }
        // Another fleet's fence never fires; another vehicle has its own state.
        engine.upsert(circle("other", "north", LAT, LON, 500.0));
        assert_eq!(
            crossings(&engine.observe(&at("v2", 0.0))),
            want(&[("c", Crossing::Enter)])
        );
    }

    #[test]
    fn a_fence_left_far_behind_still_exits_and_removed_fences_are_forgotten() {
        let mut engine = GeofenceEngine::new(10.0);
        engine.upsert(circle("a", "demo", LAT, LON, 30.0));
        engine.upsert(circle("b", "demo", LAT, LON, 100.0));
        let mut t = crossings(&engine.observe(&at("v1", 0.0)));
        t.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(t, want(&[("a", Crossing::Enter), ("b", Crossing::Enter)]));
        // A jump of 10 km: outside every box, both exit.
        let mut t = crossings(&engine.observe(&at("v1", 10_000.0)));
        t.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(t, want(&[("a", Crossing::Exit), ("b", Crossing::Exit)]));
        assert_eq!(engine.observe(&at("v1", 0.0)).len(), 2);
        assert!(engine.remove("a").is_some());
        assert!(
            engine
                .observe(&at("v1", 10_000.0))
                .iter()
                .all(|t| t.fence.id == "b")
        );
        assert_eq!(engine.len(), 1);
    }

    #[test]
    fn fences_with_one_box_share_an_entry_and_leave_one_by_one() {
        let mut engine = GeofenceEngine::new(5.0);
        // Many orders to one parcel locker: the same circle, hence the same box.
        for i in 0..1000 {
            engine.upsert(circle(&format!("locker-{i}"), "demo", LAT, LON, 40.0));
        }
        engine.upsert(circle("wide", "demo", LAT, LON, 400.0));
        let index = &engine.trees[&fleet("demo")];
        assert_eq!(index.tree.size(), 2, "one entry per distinct box");
        assert_eq!(engine.observe(&at("v1", 0.0)).len(), 1001);
        for i in (0..1000).filter(|i| i % 2 == 0) {
            assert!(engine.remove(&format!("locker-{i}")).is_some());
        }
        assert_eq!(engine.trees[&fleet("demo")].tree.size(), 2);
        // v2 enters what is left, and nothing removed.
        let entered = engine.observe(&at("v2", 0.0));
        assert_eq!(entered.len(), 501);
        assert!(entered.iter().all(|t| {
            t.fence.id == "wide" || t.fence.id[7..].parse::<u32>().is_ok_and(|i| i % 2 == 1)
        }));
        for i in (0..1000).filter(|i| i % 2 == 1) {
            assert!(engine.remove(&format!("locker-{i}")).is_some());
        }
        assert_eq!(
            engine.trees[&fleet("demo")].tree.size(),
            1,
            "the box went with its last fence"
        );
        assert!(engine.remove("wide").is_some());
        assert!(engine.trees.is_empty() && engine.is_empty());
        assert!(engine.observe(&at("v3", 0.0)).is_empty());
    }

    #[test]
    fn sync_kind_adds_changes_and_removes() {
        let mut engine = GeofenceEngine::new(5.0);
        engine.upsert(circle("custom", "demo", LAT, LON, 30.0));
        let drop = |id: &str, r: f64| Fence {
            kind: FenceKind::Dropoff,
            ..circle(id, "demo", LAT, LON, r)
        };
        assert_eq!(
            engine.sync_kind(FenceKind::Dropoff, vec![drop("d1", 40.0), drop("d2", 40.0)]),
            2
        );
        assert_eq!(
            engine.sync_kind(FenceKind::Dropoff, vec![drop("d1", 40.0), drop("d2", 40.0)]),
            0
        );
        assert_eq!(
            engine.sync_kind(FenceKind::Dropoff, vec![drop("d2", 45.0)]),
            2
        );
        assert_eq!(engine.len(), 2, "custom kept, d1 gone, d2 changed");
        assert!(engine.fence("custom").is_some() && engine.fence("d1").is_none());
        assert_eq!(
            engine.fence("d2").map(|f| f.shape.clone()),
            Some(Shape::Circle {
                lat: LAT,
                lon: LON,
                radius_m: 45.0
            })
        );
    }

    #[test]
    fn a_dropoff_fence_is_entered_by_its_carrier_only() {
        let mut engine = GeofenceEngine::new(5.0);
        engine.upsert(Fence {
            kind: FenceKind::Dropoff,
            ..circle("dropoff:o-1", "demo", LAT, LON, 40.0)
        });
        // Nobody holds the order: nobody enters.
        assert!(engine.observe(&at("v1", 0.0)).is_empty());
        engine.set_carrier("dropoff:o-1", Some(VehicleId::new("v2").expect("valid")));
        assert!(engine.observe(&at("v1", 0.0)).is_empty(), "v1 passes by");
        let t = engine.observe(&at("v2", 0.0));
        assert_eq!((t.len(), t[0].crossing), (1, Crossing::Enter));
        // Reassigned away while inside: v2 leaves by distance; v1, now the carrier, enters.
        engine.set_carrier("dropoff:o-1", Some(VehicleId::new("v1").expect("valid")));
        assert!(engine.observe(&at("v2", 0.0)).is_empty(), "no flap");
        assert_eq!(engine.observe(&at("v1", 0.0)).len(), 1);
        let t = engine.observe(&at("v2", 10_000.0));
        assert_eq!((t.len(), t[0].crossing), (1, Crossing::Exit));
        // A carrier for a fence that is not there is not remembered.
        engine.set_carrier("dropoff:gone", Some(VehicleId::new("v1").expect("valid")));
        assert!(engine.carriers.len() == 1);
        engine.remove("dropoff:o-1");
        assert!(engine.carriers.is_empty());
    }

    /// The index finds exactly what a scan of every fence finds, on random fences and walks.
    #[test]
    fn index_matches_brute_force() {
        let mut rng = fastrand::Rng::with_seed(16);
        for round in 0..5 {
            let h = [0.0, 5.0, 15.0, 30.0, 60.0][round];
            let mut indexed = GeofenceEngine::new(h);
            let mut scanned = GeofenceEngine::new(h);
            for i in 0..300 {
                let (lat, lon) = (
                    LAT + (rng.f64() - 0.5) * 0.05,
                    LON + (rng.f64() - 0.5) * 0.08,
                );
                let fence = if i % 3 == 0 {
                    let d = 0.0005 + rng.f64() * 0.002;
                    Fence {
                        shape: Shape::Polygon {
                            points: vec![
                                [lat, lon],
                                [lat + d, lon + d * 0.5],
                                [lat, lon + d * 1.5],
                                [lat - d * 0.7, lon + d * 0.4],
                            ],
                        }
                        .validate()
                        .expect("a simple quadrilateral"),
                        ..circle(
                            &format!("p{i}"),
                            if i % 5 == 0 { "north" } else { "demo" },
                            lat,
                            lon,
                            1.0,
                        )
                    }
                } else {
                    circle(
                        &format!("c{i}"),
                        if i % 5 == 0 { "north" } else { "demo" },
                        lat,
                        lon,
                        10.0 + rng.f64() * 200.0,
                    )
                };
                indexed.upsert(fence.clone());
                scanned.upsert(fence);
            }
            let mut total = 0;
            for v in 0..50 {
                let vehicle = VehicleId::new(&format!("v{v}")).expect("valid");
                let (mut lat, mut lon) = (
                    LAT + (rng.f64() - 0.5) * 0.05,
                    LON + (rng.f64() - 0.5) * 0.08,
                );
                for step in 0..200u64 {
                    lat += (rng.f64() - 0.5) * 0.0008;
                    lon += (rng.f64() - 0.5) * 0.0012;
                    let s = Sighting {
                        vehicle: vehicle.clone(),
                        fleet: fleet("demo"),
                        lat,
                        lon,
                        ts_ms: step,
                    };
                    let mut a = crossings(&indexed.observe(&s));
                    let mut b = crossings(&scanned.observe_by_scan(&s));
                    a.sort_by(|x, y| x.0.cmp(&y.0));
                    b.sort_by(|x, y| x.0.cmp(&y.0));
                    assert_eq!(a, b, "round {round}, vehicle {v}, step {step}");
                    total += a.len();
                }
            }
            assert!(
                total > 50,
                "the walks cross fences ({total} transitions, round {round})"
            );
        }
    }
}
