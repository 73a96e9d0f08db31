//! Fence shapes: circles and simple polygons in degrees, checked ([`Shape::validate`]) and
//! projected once ([`Geometry`]) onto a local plane around the fence, where the depth of a
//! point (how far inside, in metres; negative outside) is measured.
//!
//! The projection is equirectangular around the fence's own reference point: at city scale
//! (a fence of a few kilometres) its error is far below GPS noise.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The most points a polygon may have.
pub const MAX_POINTS: usize = 256;
/// The largest circle radius accepted, in metres.
pub const MAX_RADIUS_M: f64 = 100_000.0;
/// The mean Earth radius, in metres.
const EARTH_RADIUS_M: f64 = 6_371_008.8;
/// Metres per degree of latitude (and of longitude at the equator).
const M_PER_DEG: f64 = EARTH_RADIUS_M * std::f64::consts::PI / 180.0;

/// A fence's shape as clients send and receive it, in degrees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Shape {
    /// A circle around a centre.
    Circle {
        /// Latitude of the centre, degrees.
        lat: f64,
        /// Longitude of the centre, degrees.
        lon: f64,
        /// Radius, metres.
        radius_m: f64,
    },
    /// A simple polygon: `[lat, lon]` corners in order (3 ..= 256, not closed: the last
    /// corner joins the first; a repeated first corner at the end is dropped).
    Polygon {
        /// The corners, `[lat, lon]` in degrees.
        points: Vec<[f64; 2]>,
    },
}

/// Why a shape is refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ShapeError {
    /// A latitude or longitude is not a number within range.
    #[error(
        "bad coordinates [{lat}, {lon}]: latitude must be within -90 ..= 90, longitude within -180 ..= 180"
    )]
    BadCoordinates {
        /// The latitude given.
        lat: f64,
        /// The longitude given.
        lon: f64,
    },
    /// The radius is not within `0 < r <= 100 km`.
    #[error("radius_m {0}: must be more than 0 and at most {MAX_RADIUS_M}")]
    BadRadius(f64),
    /// Fewer than 3 or more than 256 corners.
    #[error("a polygon has 3 ..= {MAX_POINTS} points, not {0}")]
    PointCount(usize),
    /// Two consecutive corners are the same point.
    #[error("points {0} and {1} are the same")]
    RepeatedPoint(usize, usize),
    /// Two edges that are not neighbours cross or touch.
    #[error("the polygon crosses itself: edge {0} meets edge {1}")]
    SelfIntersecting(usize, usize),
    /// All corners on one line: no area.
    #[error("the polygon has no area (its points are on one line)")]
    NoArea,
    /// A polygon wider than a fence can be (its projection would be wrong).
    #[error("the polygon is too large: at most {MAX_RADIUS_M} m from its first point")]
    TooLarge,
}

fn check_point(lat: f64, lon: f64) -> Result<(), ShapeError> {
    if lat.is_finite()
        && lon.is_finite()
        && (-90.0..=90.0).contains(&lat)
        && (-180.0..=180.0).contains(&lon)
    {
        Ok(())
    } else {
        Err(ShapeError::BadCoordinates { lat, lon })
    }
}

impl Shape {
    /// The shape checked and normalised (a polygon's repeated closing point dropped).
    ///
    /// # Errors
    /// [`ShapeError`] saying what is wrong.
    pub fn validate(self) -> Result<Self, ShapeError> {
        match self {
            Self::Circle { lat, lon, radius_m } => {
                check_point(lat, lon)?;
                if !(radius_m.is_finite() && radius_m > 0.0 && radius_m <= MAX_RADIUS_M) {
                    return Err(ShapeError::BadRadius(radius_m));
                }
                Ok(Self::Circle { lat, lon, radius_m })
            }
            Self::Polygon { mut points } => {
                for &[lat, lon] in &points {
                    check_point(lat, lon)?;
                }
                if points.len() > 3 && points.first() == points.last() {
                    points.pop();
                }
                if !(3..=MAX_POINTS).contains(&points.len()) {
                    return Err(ShapeError::PointCount(points.len()));
                }
                let shape = Self::Polygon { points };
                Geometry::polygon_checked(&shape)?;
                Ok(shape)
            }
        }
    }

    /// The reference point of the local projection: a circle's centre, a polygon's first
    /// corner.
    fn origin(&self) -> (f64, f64) {
        match self {
            Self::Circle { lat, lon, .. } => (*lat, *lon),
            Self::Polygon { points } => points.first().map_or((0.0, 0.0), |p| (p[0], p[1])),
        }
    }
}

/// A local plane around a reference point: `(x, y)` in metres east and north of it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Plane {
    lat0: f64,
    lon0: f64,
    /// Metres per degree of longitude at `lat0`.
    kx: f64,
}

impl Plane {
    fn new(lat0: f64, lon0: f64) -> Self {
        // Never 0 (a fence at a pole): a tiny scale keeps the arithmetic finite.
        let kx = (M_PER_DEG * lat0.to_radians().cos()).max(1.0);
        Self { lat0, lon0, kx }
    }

    fn project(&self, lat: f64, lon: f64) -> (f64, f64) {
        let mut dlon = lon - self.lon0;
        if dlon > 180.0 {
            dlon -= 360.0;
        } else if dlon < -180.0 {
            dlon += 360.0;
        }
        (dlon * self.kx, (lat - self.lat0) * M_PER_DEG)
    }

    /// Degrees `(lat, lon)` of local `(x, y)`.
    fn unproject(&self, x: f64, y: f64) -> (f64, f64) {
        (self.lat0 + y / M_PER_DEG, self.lon0 + x / self.kx)
    }
}

/// A shape projected and ready to measure depths.
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    plane: Plane,
    form: Form,
}

#[derive(Debug, Clone, PartialEq)]
enum Form {
    Circle { radius_m: f64 },
    Polygon { corners: Vec<(f64, f64)> },
}

/// The sign of the turn `a → b → c`: positive counter-clockwise, 0 collinear.
fn orient(a: (f64, f64), b: (f64, f64), c: (f64, f64)) -> f64 {
    (b.0 - a.0) * (c.1 - a.1) - (b.1 - a.1) * (c.0 - a.0)
}

/// Whether `p` (collinear with `a`–`b`) lies within the segment's box.
fn on_segment(a: (f64, f64), b: (f64, f64), p: (f64, f64)) -> bool {
    p.0 >= a.0.min(b.0) && p.0 <= a.0.max(b.0) && p.1 >= a.1.min(b.1) && p.1 <= a.1.max(b.1)
}

/// Whether segments `a`–`b` and `c`–`d` meet (cross or touch).
fn segments_meet(a: (f64, f64), b: (f64, f64), c: (f64, f64), d: (f64, f64)) -> bool {
    let (d1, d2) = (orient(c, d, a), orient(c, d, b));
    let (d3, d4) = (orient(a, b, c), orient(a, b, d));
    if ((d1 > 0.0 && d2 < 0.0) || (d1 < 0.0 && d2 > 0.0))
        && ((d3 > 0.0 && d4 < 0.0) || (d3 < 0.0 && d4 > 0.0))
    {
        return true;
    }
    (d1 == 0.0 && on_segment(c, d, a))
        || (d2 == 0.0 && on_segment(c, d, b))
        || (d3 == 0.0 && on_segment(a, b, c))
        || (d4 == 0.0 && on_segment(a, b, d))
}

/// The distance from `p` to segment `a`–`b`, in the plane's metres.
fn segment_distance(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (cx, cy) = (a.0 + t * dx, a.1 + t * dy);
    ((p.0 - cx).powi(2) + (p.1 - cy).powi(2)).sqrt()
}

impl Geometry {
    /// Projects a shape (already [validated](Shape::validate)).
    pub fn new(shape: &Shape) -> Self {
        let (lat0, lon0) = shape.origin();
        let plane = Plane::new(lat0, lon0);
        let form = match shape {
            Shape::Circle { radius_m, .. } => Form::Circle {
                radius_m: *radius_m,
            },
            Shape::Polygon { points } => Form::Polygon {
                corners: points.iter().map(|p| plane.project(p[0], p[1])).collect(),
            },
        };
        Self { plane, form }
    }

    /// Projects a polygon and checks that it is simple, with an area, and not too large.
    fn polygon_checked(shape: &Shape) -> Result<Self, ShapeError> {
        let geometry = Self::new(shape);
        let Form::Polygon { corners } = &geometry.form else {
            return Ok(geometry);
        };
        let n = corners.len();
        if corners.iter().any(|c| c.0.hypot(c.1) > MAX_RADIUS_M) {
            return Err(ShapeError::TooLarge);
        }
        for i in 0..n {
            if corners[i] == corners[(i + 1) % n] {
                return Err(ShapeError::RepeatedPoint(i, (i + 1) % n));
            }
        }
        // Every corner on the line of the first two (within a square millimetre): no area.
        if corners
            .iter()
            .all(|&c| orient(corners[0], corners[1], c).abs() < 1e-6)
        {
            return Err(ShapeError::NoArea);
        }
        for i in 0..n {
            for j in (i + 1)..n {
                // Neighbours share a corner: only checked for folding back onto each other.
                let adjacent = j == i + 1 || (i == 0 && j == n - 1);
                let (a, b) = (corners[i], corners[(i + 1) % n]);
                let (c, d) = (corners[j], corners[(j + 1) % n]);
                if adjacent {
                    // The far ends of two neighbours: collinear and overlapping means a fold.
                    let (shared, p, q) = if j == i + 1 { (b, a, d) } else { (a, b, c) };
                    if orient(p, shared, q) == 0.0
                        && ((p.0 - shared.0) * (q.0 - shared.0)
                            + (p.1 - shared.1) * (q.1 - shared.1))
                            > 0.0
                    {
                        return Err(ShapeError::SelfIntersecting(i, j));
                    }
                } else if segments_meet(a, b, c, d) {
                    return Err(ShapeError::SelfIntersecting(i, j));
                }
            }
        }
        let area2: f64 = (0..n)
            .map(|i| {
                let (a, b) = (corners[i], corners[(i + 1) % n]);
                a.0 * b.1 - b.0 * a.1
            })
            .sum();
        if area2.abs() < 1e-6 {
            return Err(ShapeError::NoArea);
        }
        Ok(geometry)
    }

    /// How far `(lat, lon)` is inside the shape, in metres: positive inside (the distance to
    /// the boundary), negative outside (minus the distance to it).
    pub fn depth(&self, lat: f64, lon: f64) -> f64 {
        let p = self.plane.project(lat, lon);
        match &self.form {
            Form::Circle { radius_m } => radius_m - p.0.hypot(p.1),
            Form::Polygon { corners } => {
                let n = corners.len();
                let mut inside = false;
                let mut nearest = f64::INFINITY;
                for i in 0..n {
                    let (a, b) = (corners[i], corners[(i + 1) % n]);
                    if (a.1 > p.1) != (b.1 > p.1) {
                        let x = a.0 + (p.1 - a.1) / (b.1 - a.1) * (b.0 - a.0);
                        if p.0 < x {
                            inside = !inside;
                        }
                    }
                    nearest = nearest.min(segment_distance(p, a, b));
                }
                if inside { nearest } else { -nearest }
            }
        }
    }

    /// The shape's bounding box grown by `margin_m` metres on every side, as
    /// `([min_lon, min_lat], [max_lon, max_lat])` in degrees.
    pub fn bounds(&self, margin_m: f64) -> ([f64; 2], [f64; 2]) {
        let (mut x0, mut y0, mut x1, mut y1) = match &self.form {
            Form::Circle { radius_m } => (-radius_m, -radius_m, *radius_m, *radius_m),
            Form::Polygon { corners } => corners.iter().fold(
                (
                    f64::INFINITY,
                    f64::INFINITY,
                    f64::NEG_INFINITY,
                    f64::NEG_INFINITY,
                ),
                |(x0, y0, x1, y1), c| (x0.min(c.0), y0.min(c.1), x1.max(c.0), y1.max(c.1)),
            ),
        };
        x0 -= margin_m;
        y0 -= margin_m;
        x1 += margin_m;
        y1 += margin_m;
        let (lat_lo, lon_lo) = self.plane.unproject(x0, y0);
        let (lat_hi, lon_hi) = self.plane.unproject(x1, y1);
        ([lon_lo, lat_lo], [lon_hi, lat_hi])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// About 0.0001° of latitude is 11.1 m.
    const LAT: f64 = 52.52;
    const LON: f64 = 13.405;

    /// A point `north_m` north and `east_m` east of (LAT, LON).
    fn at(north_m: f64, east_m: f64) -> (f64, f64) {
        Plane::new(LAT, LON).unproject(east_m, north_m)
    }

    fn square(half_m: f64) -> Shape {
        let corners = [
            (-half_m, -half_m),
            (-half_m, half_m),
            (half_m, half_m),
            (half_m, -half_m),
        ];
        Shape::Polygon {
            points: corners
                .iter()
                .map(|&(n, e)| {
                    let (la, lo) = at(n, e);
                    [la, lo]
                })
                .collect(),
        }
    }

    #[test]
    fn circle_depth_is_distance_to_the_rim() {
        let shape = Shape::Circle {
            lat: LAT,
            lon: LON,
            radius_m: 50.0,
        }
        .validate()
        .expect("valid");
        let g = Geometry::new(&shape);
        for (north, east, want) in [
            (0.0, 0.0, 50.0),
            (30.0, 0.0, 20.0),
            (0.0, -70.0, -20.0),
            (60.0, 80.0, -50.0),
        ] {
            let (lat, lon) = at(north, east);
            assert!(
                (g.depth(lat, lon) - want).abs() < 0.05,
                "({north},{east}): {} != {want}",
                g.depth(lat, lon)
            );
        }
    }

    #[test]
    fn polygon_depth_inside_and_out() {
        let shape = square(100.0).validate().expect("valid");
        let g = Geometry::new(&shape);
        for (north, east, want) in [
            (0.0, 0.0, 100.0),
            (90.0, 0.0, 10.0),
            (0.0, 130.0, -30.0),
            (130.0, 140.0, -50.0),
            (-99.0, -50.0, 1.0),
        ] {
            let (lat, lon) = at(north, east);
            let depth = g.depth(lat, lon);
            assert!(
                (depth - want).abs() < 0.1,
                "({north},{east}): {depth} != {want}"
            );
        }
    }

    #[test]
    fn bounds_contain_the_shape_and_the_margin() {
        let g = Geometry::new(&Shape::Circle {
            lat: LAT,
            lon: LON,
            radius_m: 50.0,
        });
        let (lo, hi) = g.bounds(15.0);
        let (n, e) = at(64.0, 64.0);
        assert!(lo[0] < e && e < hi[0] && lo[1] < n && n < hi[1]);
        let (n, _) = at(66.0, 0.0);
        assert!(n > hi[1], "66 m north is past 50 + 15 m");
    }

    #[test]
    fn bad_shapes_are_refused_with_a_reason() {
        let p = |pts: &[[f64; 2]]| {
            Shape::Polygon {
                points: pts.to_vec(),
            }
            .validate()
        };
        let circle = |lat, lon, r| {
            Shape::Circle {
                lat,
                lon,
                radius_m: r,
            }
            .validate()
        };
        assert!(matches!(
            circle(91.0, 0.0, 10.0),
            Err(ShapeError::BadCoordinates { .. })
        ));
        assert!(matches!(
            circle(0.0, 181.0, 10.0),
            Err(ShapeError::BadCoordinates { .. })
        ));
        assert!(matches!(
            circle(f64::NAN, 0.0, 10.0),
            Err(ShapeError::BadCoordinates { .. })
        ));
        assert!(matches!(
            circle(0.0, 0.0, 0.0),
            Err(ShapeError::BadRadius(_))
        ));
        assert!(matches!(
            circle(0.0, 0.0, -5.0),
            Err(ShapeError::BadRadius(_))
        ));
        assert!(matches!(
            circle(0.0, 0.0, f64::INFINITY),
            Err(ShapeError::BadRadius(_))
        ));
        assert!(matches!(
            p(&[[0.0, 0.0], [0.0, 0.001]]),
            Err(ShapeError::PointCount(2))
        ));
        let many: Vec<[f64; 2]> = (0..257)
            .map(|i| {
                let a = f64::from(i) * std::f64::consts::TAU / 257.0;
                [LAT + 0.001 * a.sin(), LON + 0.001 * a.cos()]
            })
            .collect();
        assert!(matches!(p(&many), Err(ShapeError::PointCount(257))));
        assert!(p(&many[..256]).is_ok(), "256 points on a circle are fine");
        // A bow tie crosses itself.
        let bow = [[0.0, 0.0], [0.001, 0.001], [0.0, 0.001], [0.001, 0.0]];
        assert!(matches!(p(&bow), Err(ShapeError::SelfIntersecting(..))));
        // A corner touching a non-neighbouring edge.
        let touch = [
            [0.0, 0.0],
            [0.0, 0.002],
            [0.002, 0.002],
            [0.0, 0.001],
            [0.002, 0.0],
        ];
        assert!(matches!(p(&touch), Err(ShapeError::SelfIntersecting(..))));
        assert!(matches!(
            p(&[[0.0, 0.0], [0.001, 0.001], [0.002, 0.002]]),
            Err(ShapeError::NoArea)
        ));
        assert!(matches!(
            p(&[[0.0, 0.0], [0.0, 0.0], [0.001, 0.001], [0.0, 0.001]]),
            Err(ShapeError::RepeatedPoint(0, 1))
        ));
        assert!(matches!(
            p(&[[0.0, 0.0], [0.0, 5.0], [5.0, 5.0]]),
            Err(ShapeError::TooLarge)
        ));
        // A closed ring (first point repeated) is accepted and normalised.
        let closed = p(&[[0.0, 0.0], [0.0, 0.001], [0.001, 0.001], [0.0, 0.0]]).expect("valid");
        assert_eq!(
            closed,
            Shape::Polygon {
                points: vec![[0.0, 0.0], [0.0, 0.001], [0.001, 0.001]]
            }
        );
        // A concave (L-shaped) polygon is simple.
        let l = [
            [0.0, 0.0],
            [0.0, 0.002],
            [0.001, 0.002],
            [0.001, 0.001],
            [0.002, 0.001],
            [0.002, 0.0],
        ];
        assert!(p(&l).is_ok());
    }

    #[test]
    fn shapes_read_and_write_the_contract_json() {
        let circle: Shape =
            serde_json::from_str(r#"{"type":"circle","lat":52.5,"lon":13.4,"radius_m":40}"#)
                .expect("circle");
        assert_eq!(
            circle,
            Shape::Circle {
                lat: 52.5,
                lon: 13.4,
                radius_m: 40.0
            }
        );
        let poly: Shape =
            serde_json::from_str(r#"{"type":"polygon","points":[[1,2],[3,4],[5,7]]}"#)
                .expect("polygon");
        assert_eq!(
            serde_json::to_value(&poly).expect("json"),
            serde_json::json!({"type":"polygon","points":[[1.0,2.0],[3.0,4.0],[5.0,7.0]]})
        );
        assert!(serde_json::from_str::<Shape>(r#"{"type":"square","lat":1}"#).is_err());
    }
}
