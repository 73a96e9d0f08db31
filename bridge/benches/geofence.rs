//! Geofence benchmark: the cost of evaluating a moved vehicle against the fences (what the
//! bridge's geofence task does for every heartbeat), through the R*-tree index
//! (`GeofenceEngine::observe`) next to the baseline measured in the same run, a scan of
//! every fence of the fleet (`GeofenceEngine::observe_by_scan`).
//!
//! ```sh
//! cargo bench -p bridge --no-default-features --bench geofence
//! ```
//!
//! 10 000 vehicles random-walk (about 10 m per heartbeat) over a 10 km × 10 km city among
//! 10, 1 000 and 10 000 fences (three circles of 30 to 200 m for every hexagon of similar
//! size), hysteresis 15 m. Each configuration runs the same walk (same seed) through both
//! engines and checks they found the same transitions. Prints a markdown table; takes about
//! half a minute.

use std::time::{Duration, Instant};

use bridge::geofence::{Fence, FenceKind, GeofenceEngine, Shape, Sighting};
use shared::{FleetId, VehicleId};

/// The city centre.
const LAT: f64 = 52.52;
const LON: f64 = 13.405;
/// Degrees of latitude per metre; of longitude per metre at [`LAT`].
const LAT_PER_M: f64 = 1.0 / 111_195.0;
const LON_PER_M: f64 = 1.0 / (111_195.0 * 0.6083);
/// The city's half width, metres.
const HALF_M: f64 = 5_000.0;
const VEHICLES: usize = 10_000;
/// At most this long per engine and configuration (the scan of 10k fences is slow).
const BUDGET: Duration = Duration::from_secs(4);

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

fn fences(n: usize, fleet: &FleetId, rng: &mut fastrand::Rng) -> BenchResult<Vec<Fence>> {
    (0..n)
        .map(|i| {
            let lat = LAT + (rng.f64() * 2.0 - 1.0) * HALF_M * LAT_PER_M;
            let lon = LON + (rng.f64() * 2.0 - 1.0) * HALF_M * LON_PER_M;
            let r = 30.0 + rng.f64() * 170.0;
            let shape = if i % 4 == 3 {
                let points = (0..6)
                    .map(|k| {
                        let a = f64::from(k) * std::f64::consts::TAU / 6.0;
                        [lat + r * a.sin() * LAT_PER_M, lon + r * a.cos() * LON_PER_M]
                    })
                    .collect();
                Shape::Polygon { points }.validate()?
            } else {
                Shape::Circle {
                    lat,
                    lon,
                    radius_m: r,
                }
            };
            Ok(Fence {
                id: format!("f{i}"),
                name: format!("fence {i}"),
                fleet: fleet.clone(),
                kind: FenceKind::Custom,
                shape,
                created_ms: 0,
                store: None,
                order: None,
            })
        })
        .collect()
}

/// One engine's run: heartbeats evaluated, transitions found, time taken.
struct Run {
    heartbeats: u64,
    transitions: u64,
    elapsed: Duration,
}

impl Run {
    fn us_per_heartbeat(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e6 / self.heartbeats.max(1) as f64
    }
}

/// Walks the vehicles (seeded) through `engine` until [`BUDGET`] is spent or 20 rounds done.
fn walk(engine: &mut GeofenceEngine, fleet: &FleetId, scan: bool) -> BenchResult<Run> {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut sightings: Vec<Sighting> = (0..VEHICLES)
        .map(|v| {
            Ok(Sighting {
                vehicle: VehicleId::new(&format!("v{v:05}"))?,
                fleet: fleet.clone(),
                lat: LAT + (rng.f64() * 2.0 - 1.0) * HALF_M * LAT_PER_M,
                lon: LON + (rng.f64() * 2.0 - 1.0) * HALF_M * LON_PER_M,
                ts_ms: 0,
            })
        })
        .collect::<Result<_, shared::IdError>>()?;
    let (mut heartbeats, mut transitions) = (0u64, 0u64);
    let started = Instant::now();
    'rounds: for round in 1..=20u64 {
        for s in &mut sightings {
            s.lat += (rng.f64() * 2.0 - 1.0) * 10.0 * LAT_PER_M;
            s.lon += (rng.f64() * 2.0 - 1.0) * 10.0 * LON_PER_M;
            s.ts_ms = round * 1_000;
            let found = if scan {
                engine.observe_by_scan(s)
            } else {
                engine.observe(s)
            };
            transitions += found.len() as u64;
            heartbeats += 1;
            if heartbeats % 1_000 == 0 && started.elapsed() > BUDGET {
                break 'rounds;
            }
        }
    }
    Ok(Run {
        heartbeats,
        transitions,
        elapsed: started.elapsed(),
    })
}

fn main() -> BenchResult<()> {
    let fleet = FleetId::new("demo")?;
    println!(
        "| fences | vehicles | index µs/heartbeat | scan µs/heartbeat | scan / index | heartbeats/s (index, one core) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in [10, 1_000, 10_000] {
        let mut rng = fastrand::Rng::with_seed(n as u64);
        let fences = fences(n, &fleet, &mut rng)?;
        let mut indexed = GeofenceEngine::new(15.0);
        let mut scanned = GeofenceEngine::new(15.0);
        for f in fences {
            indexed.upsert(f.clone());
            scanned.upsert(f);
        }
        let index = walk(&mut indexed, &fleet, false)?;
        let scan = walk(&mut scanned, &fleet, true)?;
        // Same walk: over the heartbeats both evaluated, the same number of transitions.
        if scan.heartbeats == index.heartbeats && scan.transitions != index.transitions {
            return Err(format!(
                "{n} fences: the index found {} transitions, the scan {}",
                index.transitions, scan.transitions
            )
            .into());
        }
        println!(
            "| {n} | {VEHICLES} | {:.2} | {:.2} | {:.0}× | {:.0} |",
            index.us_per_heartbeat(),
            scan.us_per_heartbeat(),
            scan.us_per_heartbeat() / index.us_per_heartbeat(),
            1e6 / index.us_per_heartbeat(),
        );
        eprintln!(
            "{n} fences: index {} heartbeats, {} transitions; scan {} heartbeats, {} transitions",
            index.heartbeats, index.transitions, scan.heartbeats, scan.transitions
        );
    }
    Ok(())
}
