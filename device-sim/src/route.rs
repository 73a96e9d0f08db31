//! A generated street grid around a city centre, and the [`Driver`] that follows its streets.
//!
//! The grid is a rectangle of straight east–west and north–south streets. Street `0` of each
//! direction runs through the centre; the others are about [`GridConfig::block_m`] apart, give
//! or take an eighth of a block, so blocks are 150–250 m long with the default 200 m and the
//! map does not look like graph paper. Every fourth street is a main road (50 km/h), the rest
//! are side streets (30 km/h); where two main roads cross there is a traffic light.
//!
//! Positions are computed in local metres (east, north of the centre) and converted to
//! 1e-7 degree [`Position`]s with an equirectangular projection, which is exact to a few
//! centimetres over a city. All maths is `f32` via `libm` (a Cortex-M4F has a single-precision
//! FPU); only the one-off projection set-up uses `f64`.
//!
//! A [`Driver`] moves from intersection to intersection along the streets, never across a block:
//! at each intersection it picks the next street at random (straight on is likelier than a
//! turn, and it never turns around unless the street is a dead end), or, given a goal, a street
//! that brings it closer. It accelerates and brakes smoothly, slows down for turns, stops at red
//! lights and at its goal. Everything is deterministic for a given seed.

use libm::{atan2f, ceilf, fabsf, roundf, sqrtf};
use shared::Position;

/// Metres per degree of latitude (and of longitude at the equator) on a sphere of the WGS84
/// equatorial radius.
const M_PER_DEG: f64 = 111_319.490_8;
/// The speed limit of a main road: 50 km/h.
const MAIN_ROAD_M_S: f32 = 50.0 / 3.6;
/// The speed limit of a side street: 30 km/h.
const SIDE_STREET_M_S: f32 = 30.0 / 3.6;
/// Every this many streets, one is a main road.
const MAIN_ROAD_EVERY: i16 = 4;
/// Speed through a left or right turn: 15 km/h.
const TURN_M_S: f32 = 15.0 / 3.6;
/// Speed through a U-turn at a dead end: 7 km/h.
const U_TURN_M_S: f32 = 7.0 / 3.6;
/// Comfortable acceleration, m/s².
const ACCEL_M_S2: f32 = 1.5;
/// Comfortable braking, m/s².
const DECEL_M_S2: f32 = 2.0;
/// Closer than this to a stop line counts as stopped at it.
const STOP_SNAP_M: f32 = 0.05;
/// The chance that the light is red at a traffic light.
const RED_LIGHT_CHANCE: f32 = 0.35;
/// How long a red light lasts, in milliseconds.
const RED_LIGHT_MS: core::ops::Range<u32> = 5_000..25_000;

/// The shape of a street grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridConfig {
    /// The centre of the grid: the crossing of east–west street 0 and north–south street 0.
    pub centre: Position,
    /// The nominal distance between two parallel streets, in metres (50 ..= 1000).
    pub block_m: u16,
    /// Blocks from the centre to the east (and to the west) edge of the grid (0 ..= 100).
    pub half_width: u8,
    /// Blocks from the centre to the north (and to the south) edge of the grid (0 ..= 100).
    pub half_height: u8,
}

impl GridConfig {
    /// Berlin Mitte, 52.5200° N 13.4050° E.
    pub const BERLIN: Position = Position::new(525_200_000, 134_050_000);
}

impl Default for GridConfig {
    /// A 4 km × 4 km grid of 200 m blocks around [`GridConfig::BERLIN`]: 441 intersections.
    fn default() -> Self {
        Self {
            centre: Self::BERLIN,
            block_m: 200,
            half_width: 10,
            half_height: 10,
        }
    }
}

/// Why a [`GridConfig`] cannot be built into a [`StreetGrid`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GridError {
    /// The centre is not on the globe, or too close to a pole (beyond ±80°) for a flat grid.
    #[error("grid centre must be a valid position within ±80° latitude")]
    Centre,
    /// The block size is outside 50 ..= 1000 m.
    #[error("block size {0} m is outside 50 ..= 1000 m")]
    BlockSize(u16),
    /// A half extent is above 100 blocks, or both are zero (a single intersection, no street).
    #[error("grid extent must be 0 ..= 100 blocks each way and have at least one street")]
    Extent,
    /// Part of the grid would lie beyond the valid latitude or longitude range.
    #[error("the grid crosses the poles or the antimeridian")]
    OffTheGlobe,
}

/// An intersection, as street indices counted from the centre.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Node {
    /// The north–south street through this intersection: 0 at the centre, positive to the east.
    pub east: i16,
    /// The east–west street through this intersection: 0 at the centre, positive to the north.
    pub north: i16,
}

impl Node {
    /// The centre intersection.
    pub const CENTRE: Node = Node::new(0, 0);

    /// The intersection of north–south street `east` and east–west street `north`.
    pub const fn new(east: i16, north: i16) -> Self {
        Self { east, north }
    }

    /// The number of blocks between two intersections, driving along the streets.
    pub fn blocks_to(self, other: Node) -> u32 {
        u32::from(self.east.abs_diff(other.east)) + u32::from(self.north.abs_diff(other.north))
    }
}

/// A point in local metres relative to the grid centre.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Point {
    /// Metres east of the centre (negative: west).
    pub east_m: f32,
    /// Metres north of the centre (negative: south).
    pub north_m: f32,
}

impl Point {
    /// The straight-line distance to `other`, in metres.
    pub fn distance_to(self, other: Point) -> f32 {
        let de = other.east_m - self.east_m;
        let dn = other.north_m - self.north_m;
        sqrtf(de * de + dn * dn)
    }
}

/// A validated street grid with its map projection: `Copy`, 20 bytes, no tables.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreetGrid {
    config: GridConfig,
    /// 1e-7 degrees of longitude per metre east at the centre's latitude.
    e7_per_m_east: f32,
    /// 1e-7 degrees of latitude per metre north.
    e7_per_m_north: f32,
}

impl StreetGrid {
    /// Validates `config` and sets up the projection around its centre.
    ///
    /// # Errors
    /// [`GridError`] names the offending setting.
    pub fn new(config: GridConfig) -> Result<Self, GridError> {
        let centre = config.centre;
        if !centre.is_valid() || centre.lat_e7.unsigned_abs() > 800_000_000 {
            return Err(GridError::Centre);
        }
        if !(50..=1000).contains(&config.block_m) {
            return Err(GridError::BlockSize(config.block_m));
        }
        if config.half_width > 100
            || config.half_height > 100
            || (config.half_width == 0 && config.half_height == 0)
        {
            return Err(GridError::Extent);
        }
        let cos_lat = libm::cos(centre.lat().to_radians());
        let grid = Self {
            config,
            e7_per_m_east: (1e7 / (M_PER_DEG * cos_lat)) as f32,
            e7_per_m_north: (1e7 / M_PER_DEG) as f32,
        };
        let (lo, hi) = grid.corners();
        let inside = |p: Point| {
            let lat = i64::from(centre.lat_e7) + (p.north_m * grid.e7_per_m_north) as i64;
            let lon = i64::from(centre.lon_e7) + (p.east_m * grid.e7_per_m_east) as i64;
            (-900_000_000..=900_000_000).contains(&lat)
                && (-1_800_000_000..=1_800_000_000).contains(&lon)
        };
        if !inside(lo) || !inside(hi) {
            return Err(GridError::OffTheGlobe);
        }
        Ok(grid)
    }

    /// The configuration this grid was built from.
    pub const fn config(&self) -> &GridConfig {
        &self.config
    }

    /// Whether `node` is an intersection of this grid.
    pub fn contains(&self, node: Node) -> bool {
        node.east.unsigned_abs() <= u16::from(self.config.half_width)
            && node.north.unsigned_abs() <= u16::from(self.config.half_height)
    }

    /// The intersection of this grid nearest to `node` (the node itself if it is on the grid).
    pub fn clamp(&self, node: Node) -> Node {
        let w = i16::from(self.config.half_width);
        let h = i16::from(self.config.half_height);
        Node::new(node.east.clamp(-w, w), node.north.clamp(-h, h))
    }

    /// The number of intersections.
    pub fn node_count(&self) -> u32 {
        (2 * u32::from(self.config.half_width) + 1) * (2 * u32::from(self.config.half_height) + 1)
    }

    /// The `index`-th intersection in row-major order, south-west first.
    fn node_at(&self, index: u32) -> Node {
        let columns = 2 * u32::from(self.config.half_width) + 1;
        let index = index % self.node_count();
        // Both quotients are at most 200, so the casts are lossless.
        Node::new(
            (index % columns) as i16 - i16::from(self.config.half_width),
            (index / columns) as i16 - i16::from(self.config.half_height),
        )
    }

    /// A start intersection for the `slot`-th of many vehicles: consecutive slots land far apart
    /// (a golden-ratio stride over all intersections), and no two of the first
    /// [`node_count`](Self::node_count) slots share an intersection.
    pub fn spread_node(&self, slot: u32) -> Node {
        let count = u64::from(self.node_count());
        // The stride nearest to count / φ that is coprime to count: a permutation of the nodes.
        let mut stride = (count * 618_034 / 1_000_000).max(1);
        while gcd(stride, count) != 1 {
            stride += 1;
        }
        // Less than `count`, which fits a u32.
        self.node_at(((u64::from(slot) * stride) % count) as u32)
    }

    /// A uniformly random intersection.
    pub(crate) fn random_node(&self, rng: &mut fastrand::Rng) -> Node {
        self.node_at(rng.u32(..self.node_count()))
    }

    /// Where north–south street `index` crosses the east–west axis, in metres east.
    fn street_east_m(&self, index: i16) -> f32 {
        self.street_offset_m(index, 0x5EED_EA57)
    }

    /// Where east–west street `index` crosses the north–south axis, in metres north.
    fn street_north_m(&self, index: i16) -> f32 {
        self.street_offset_m(index, 0x0DD5_0A17)
    }

    /// `index` blocks from the centre, moved by up to an eighth of a block either way (street 0
    /// stays at the centre): neighbouring streets are 3/4 to 5/4 of a block apart.
    fn street_offset_m(&self, index: i16, salt: u32) -> f32 {
        let block = f32::from(self.config.block_m);
        if index == 0 {
            return 0.0;
        }
        let mut h = u32::from(index as u16) ^ salt;
        h = h.wrapping_mul(0x9E37_79B1);
        h ^= h >> 15;
        h = h.wrapping_mul(0x85EB_CA77);
        h ^= h >> 13;
        let unit = (h >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
        f32::from(index) * block + unit * block / 8.0
    }

    /// The nearest street index to `metres` among streets `-half ..= half` placed by `place`.
    fn nearest_street(&self, metres: f32, half: u8, place: impl Fn(i16) -> f32) -> i16 {
        let half = i16::from(half);
        let guess = roundf(metres / f32::from(self.config.block_m));
        let guess = guess.clamp(f32::from(-half), f32::from(half)) as i16;
        let mut best = guess;
        for candidate in [guess - 1, guess + 1] {
            if (-half..=half).contains(&candidate)
                && fabsf(place(candidate) - metres) < fabsf(place(best) - metres)
            {
                best = candidate;
            }
        }
        best
    }

    /// The south-west and north-east corners of the grid.
    fn corners(&self) -> (Point, Point) {
        let w = i16::from(self.config.half_width);
        let h = i16::from(self.config.half_height);
        (self.local(Node::new(-w, -h)), self.local(Node::new(w, h)))
    }

    /// An intersection in local metres.
    pub fn local(&self, node: Node) -> Point {
        Point {
            east_m: self.street_east_m(node.east),
            north_m: self.street_north_m(node.north),
        }
    }

    /// An intersection as a position.
    pub fn position(&self, node: Node) -> Position {
        self.to_position(self.local(node))
    }

    /// Converts local metres into a position (rounded to 1e-7 degrees, about a centimetre).
    pub fn to_position(&self, point: Point) -> Position {
        let centre = self.config.centre;
        // `new` checked that the whole grid maps onto the globe; saturate rather than wrap
        // for points off the grid.
        Position::new(
            centre
                .lat_e7
                .saturating_add(roundf(point.north_m * self.e7_per_m_north) as i32),
            centre
                .lon_e7
                .saturating_add(roundf(point.east_m * self.e7_per_m_east) as i32),
        )
    }

    /// Converts a position into local metres.
    pub fn to_local(&self, position: Position) -> Point {
        let centre = self.config.centre;
        let d_lat = i64::from(position.lat_e7) - i64::from(centre.lat_e7);
        let d_lon = i64::from(position.lon_e7) - i64::from(centre.lon_e7);
        Point {
            east_m: d_lon as f32 / self.e7_per_m_east,
            north_m: d_lat as f32 / self.e7_per_m_north,
        }
    }

    /// The intersection nearest to `position`, or `None` if the position is more than a block
    /// outside the grid (or not a valid position at all): the service area.
    pub fn nearest_node(&self, position: Position) -> Option<Node> {
        if !position.is_valid() {
            return None;
        }
        let p = self.to_local(position);
        let (lo, hi) = self.corners();
        let margin = f32::from(self.config.block_m);
        if p.east_m < lo.east_m - margin
            || p.east_m > hi.east_m + margin
            || p.north_m < lo.north_m - margin
            || p.north_m > hi.north_m + margin
        {
            return None;
        }
        Some(Node::new(
            self.nearest_street(p.east_m, self.config.half_width, |i| self.street_east_m(i)),
            self.nearest_street(p.north_m, self.config.half_height, |i| {
                self.street_north_m(i)
            }),
        ))
    }

    /// Whether `position` lies on one of the grid's streets, within `tolerance_m` metres.
    pub fn is_on_street(&self, position: Position, tolerance_m: f32) -> bool {
        let p = self.to_local(position);
        let (lo, hi) = self.corners();
        let within = |v: f32, a: f32, b: f32| v >= a - tolerance_m && v <= b + tolerance_m;
        let column =
            self.nearest_street(p.east_m, self.config.half_width, |i| self.street_east_m(i));
        let row = self.nearest_street(p.north_m, self.config.half_height, |i| {
            self.street_north_m(i)
        });
        let on_north_south = fabsf(p.east_m - self.street_east_m(column)) <= tolerance_m
            && within(p.north_m, lo.north_m, hi.north_m);
        let on_east_west = fabsf(p.north_m - self.street_north_m(row)) <= tolerance_m
            && within(p.east_m, lo.east_m, hi.east_m);
        on_north_south || on_east_west
    }

    /// The intersections one block away from `node` along a street, in the order north, east,
    /// south, west.
    fn neighbours(&self, node: Node) -> heapless::Vec<Node, 4> {
        let mut out = heapless::Vec::new();
        for (de, dn) in [(0, 1), (1, 0), (0, -1), (-1, 0)] {
            let next = Node::new(node.east + de, node.north + dn);
            if self.contains(next) {
                // Cannot overflow: at most four directions.
                let _ = out.push(next);
            }
        }
        out
    }

    /// The speed limit on the street from `a` to the adjacent `b`, in m/s.
    fn speed_limit_m_s(&self, a: Node, b: Node) -> f32 {
        let street = if a.north == b.north { a.north } else { a.east };
        if street % MAIN_ROAD_EVERY == 0 {
            MAIN_ROAD_M_S
        } else {
            SIDE_STREET_M_S
        }
    }

    /// Whether two main roads cross at `node` (and so there is a traffic light).
    fn has_traffic_light(&self, node: Node) -> bool {
        node.east % MAIN_ROAD_EVERY == 0 && node.north % MAIN_ROAD_EVERY == 0
    }
}

const fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

/// How a [`Driver`] takes the intersection it is driving towards.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Crossing {
    /// Drive through it at up to this speed (straight on, or slowed down for a turn).
    Through(f32),
    /// Stop at a red light, then go on.
    RedLight,
    /// Stop: it is the goal.
    Goal,
}

/// What happened during one [`Driver::step`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Step {
    /// Metres driven.
    pub distance_m: f32,
    /// The driver came to a stop at its goal (reported once per goal).
    pub arrived: bool,
}

/// A vehicle's driver on a [`StreetGrid`]: where it is on which street, how fast, and where it
/// turns next. About 90 bytes, no heap.
#[derive(Debug, Clone)]
pub struct Driver {
    grid: StreetGrid,
    rng: fastrand::Rng,
    /// The intersection last passed.
    from: Node,
    /// The intersection being driven towards.
    to: Node,
    /// The intersection after `to`, planned ahead so the driver can slow down for the turn.
    next: Node,
    /// The cruising speed planned for the street `to` → `next`.
    next_cruise_m_s: f32,
    /// How `to` is taken.
    crossing: Crossing,
    /// Metres driven from `from` towards `to`.
    travelled_m: f32,
    /// The length of the street `from` → `to`.
    length_m: f32,
    /// The driver's preferred speed on this street.
    cruise_m_s: f32,
    speed_m_s: f32,
    heading_deg: u16,
    /// Milliseconds left at a red light.
    wait_ms: u32,
    /// Stopped at the goal until [`Driver::resume`].
    parked: bool,
    goal: Option<Node>,
    /// Whether the arrival at the current goal has been reported.
    arrival_reported: bool,
}

impl Driver {
    /// A driver starting from rest at `start` (clamped onto the grid) on a random street.
    pub fn new(grid: StreetGrid, start: Node, seed: u64) -> Self {
        let start = grid.clamp(start);
        let mut driver = Self {
            grid,
            rng: fastrand::Rng::with_seed(seed),
            from: start,
            to: start,
            next: start,
            next_cruise_m_s: 0.0,
            crossing: Crossing::Through(0.0),
            travelled_m: 0.0,
            length_m: 0.0,
            cruise_m_s: 0.0,
            speed_m_s: 0.0,
            heading_deg: 0,
            wait_ms: 0,
            parked: false,
            goal: None,
            arrival_reported: false,
        };
        driver.depart_from_rest();
        driver
    }

    /// The grid this driver drives on.
    pub const fn grid(&self) -> &StreetGrid {
        &self.grid
    }

    /// Where the driver is, in local metres.
    pub fn local(&self) -> Point {
        let a = self.grid.local(self.from);
        let b = self.grid.local(self.to);
        let t = if self.length_m > 0.0 {
            (self.travelled_m / self.length_m).clamp(0.0, 1.0)
        } else {
            1.0
        };
        Point {
            east_m: a.east_m + (b.east_m - a.east_m) * t,
            north_m: a.north_m + (b.north_m - a.north_m) * t,
        }
    }

    /// Where the driver is.
    pub fn position(&self) -> Position {
        self.grid.to_position(self.local())
    }

    /// The current speed in m/s.
    pub const fn speed_m_s(&self) -> f32 {
        self.speed_m_s
    }

    /// The current speed in cm/s, as a heartbeat carries it.
    pub fn speed_cm_s(&self) -> u16 {
        // At most 50 km/h = 1389 cm/s.
        roundf(self.speed_m_s * 100.0) as u16
    }

    /// The direction of travel in degrees clockwise from north, 0 ..= 359.
    pub const fn heading_deg(&self) -> u16 {
        self.heading_deg
    }

    /// Whether the vehicle is moving.
    pub fn is_moving(&self) -> bool {
        self.speed_m_s > 0.0
    }

    /// Whether the driver is parked at its goal.
    pub const fn is_parked(&self) -> bool {
        self.parked
    }

    /// The intersection the driver heads for, if any (else it drives around at random).
    pub const fn goal(&self) -> Option<Node> {
        self.goal
    }

    /// The intersection the driver is driving towards (or parked at).
    pub const fn next_intersection(&self) -> Node {
        self.to
    }

    /// Heads for `goal` (clamped onto the grid), or drives around at random with `None`. A
    /// parked driver stays parked until [`resume`](Self::resume); if it is parked at the new
    /// goal, the next [`step`](Self::step) reports the arrival.
    pub fn set_goal(&mut self, goal: Option<Node>) {
        self.goal = goal.map(|g| self.grid.clamp(g));
        self.arrival_reported = false;
        if self.parked {
            return;
        }
        if self.wait_ms > 0 {
            if self.goal == Some(self.to) {
                // Waiting at a red light at the new goal: that is arriving.
                self.wait_ms = 0;
                self.parked = true;
            } else {
                // Waiting at a red light: only the way on changes.
                self.choose_next(false);
            }
        } else {
            self.plan_crossing();
        }
    }

    /// Drives off again after parking at a goal, unless the goal is where the driver is.
    pub fn resume(&mut self) {
        if self.parked && self.goal != Some(self.to) {
            self.parked = false;
            self.depart_from_rest();
        }
    }

    /// Brings the vehicle to an immediate stop (the engine died). It drives off again from rest
    /// on the next [`step`](Self::step).
    pub fn halt(&mut self) {
        self.speed_m_s = 0.0;
    }

    /// Advances the driver by `dt_s` seconds. Keep steps short (≤ 0.25 s) for smooth braking.
    pub fn step(&mut self, dt_s: f32) -> Step {
        if self.parked {
            let arrived = self.goal == Some(self.to) && !self.arrival_reported;
            self.arrival_reported |= arrived;
            return Step {
                distance_m: 0.0,
                arrived,
            };
        }
        if self.wait_ms > 0 {
            // Whole milliseconds; a step is far shorter than u32::MAX ms.
            let dt_ms = ceilf(dt_s * 1000.0) as u32;
            self.wait_ms = self.wait_ms.saturating_sub(dt_ms);
            if self.wait_ms == 0 {
                self.depart();
            }
            return Step::default();
        }

        let remaining = (self.length_m - self.travelled_m).max(0.0);
        let approach = match self.crossing {
            Crossing::Through(speed) => speed,
            Crossing::RedLight | Crossing::Goal => 0.0,
        };
        let brake_limit = sqrtf(approach * approach + 2.0 * DECEL_M_S2 * remaining);
        let target = self.cruise_m_s.min(brake_limit);
        self.speed_m_s = if self.speed_m_s < target {
            (self.speed_m_s + ACCEL_M_S2 * dt_s).min(target)
        } else {
            target
        };
        let wanted = self.speed_m_s * dt_s;
        let stopping = approach == 0.0;
        if wanted < remaining && !(stopping && remaining - wanted < STOP_SNAP_M) {
            self.travelled_m += wanted;
            return Step {
                distance_m: wanted,
                arrived: false,
            };
        }

        // Reached `to`.
        match self.crossing {
            Crossing::Through(_) => {
                let carry = (wanted - remaining).max(0.0);
                self.depart();
                // A step is far shorter than a block: the carry stays on the new street.
                self.travelled_m = carry.min(self.length_m);
                Step {
                    distance_m: wanted,
                    arrived: false,
                }
            }
            Crossing::RedLight | Crossing::Goal => {
                // Stopped at `to`: waiting for green, or parked at the goal.
                self.travelled_m = self.length_m;
                self.speed_m_s = 0.0;
                let arrived = self.crossing == Crossing::Goal;
                if arrived {
                    self.parked = true;
                    self.arrival_reported = true;
                } else {
                    self.wait_ms = self.rng.u32(RED_LIGHT_MS).max(1);
                }
                Step {
                    distance_m: remaining,
                    arrived,
                }
            }
        }
    }

    /// Picks a first street from rest at `to` (turning around is fine from rest) and drives on.
    fn depart_from_rest(&mut self) {
        self.choose_next(true);
        self.speed_m_s = 0.0;
        self.depart();
    }

    /// Turns into the planned street `to` → `next` and plans the crossing after it.
    fn depart(&mut self) {
        self.from = self.to;
        self.to = self.next;
        self.cruise_m_s = self.next_cruise_m_s;
        self.travelled_m = 0.0;
        let a = self.grid.local(self.from);
        let b = self.grid.local(self.to);
        self.length_m = a.distance_to(b);
        let heading = atan2f(b.east_m - a.east_m, b.north_m - a.north_m).to_degrees();
        // In -180 ..= 180; normalised into 0 ..= 359.
        self.heading_deg = (roundf(heading + 360.0) as u16) % 360;
        self.plan_crossing();
    }

    /// Decides where to go after `to` and how to take it.
    fn plan_crossing(&mut self) {
        if self.goal == Some(self.to) {
            self.crossing = Crossing::Goal;
            return;
        }
        let turn = self.choose_next(false);
        self.crossing = if self.grid.has_traffic_light(self.to)
            && turn != Turn::Around
            && self.rng.f32() < RED_LIGHT_CHANCE
        {
            Crossing::RedLight
        } else {
            Crossing::Through(match turn {
                Turn::Straight => self.next_cruise_m_s,
                Turn::Side => TURN_M_S,
                Turn::Around => U_TURN_M_S,
            })
        };
    }

    /// Chooses `next`, the street after `to`: towards the goal if there is one, never back the
    /// way the driver came unless `to` is a dead end (or `from_rest`), straight on twice as
    /// likely as each turn.
    fn choose_next(&mut self, from_rest: bool) -> Turn {
        let here = self.to;
        let all = self.grid.neighbours(here);
        let mut options: heapless::Vec<Node, 4> = all
            .iter()
            .copied()
            .filter(|&n| from_rest || n != self.from)
            .collect();
        if options.is_empty() {
            options = all;
        }
        if let Some(goal) = self.goal {
            let closer: heapless::Vec<Node, 4> = options
                .iter()
                .copied()
                .filter(|n| n.blocks_to(goal) < here.blocks_to(goal))
                .collect();
            if !closer.is_empty() {
                options = closer;
            }
        }
        let weighted: heapless::Vec<(Node, u32), 4> = options
            .iter()
            .map(|&n| {
                (
                    n,
                    if self.turn_to(n) == Turn::Straight {
                        2
                    } else {
                        1
                    },
                )
            })
            .collect();
        let total: u32 = weighted.iter().map(|(_, w)| w).sum();
        let mut pick = self.rng.u32(..total.max(1));
        // Every node has a neighbour (a grid has at least one street), so this is overwritten.
        let mut next = self.from;
        for &(n, w) in &weighted {
            if pick < w {
                next = n;
                break;
            }
            pick -= w;
        }
        self.next = next;
        self.next_cruise_m_s = self.grid.speed_limit_m_s(here, next) * (0.8 + 0.2 * self.rng.f32());
        self.turn_to(next)
    }

    /// What kind of turn `from` → `to` → `next` is.
    fn turn_to(&self, next: Node) -> Turn {
        let (de_in, dn_in) = (
            self.to.east - self.from.east,
            self.to.north - self.from.north,
        );
        let (de_out, dn_out) = (next.east - self.to.east, next.north - self.to.north);
        if (de_in, dn_in) == (0, 0) || (de_in, dn_in) == (de_out, dn_out) {
            Turn::Straight
        } else if (de_in, dn_in) == (-de_out, -dn_out) {
            Turn::Around
        } else {
            Turn::Side
        }
    }
}

/// The kind of turn at an intersection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    Straight,
    Side,
    Around,
}

#[cfg(test)]
mod tests;
