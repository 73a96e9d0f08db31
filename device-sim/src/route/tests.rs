//! The street grid's and the driver's unit tests.

use super::*;

const DT_S: f32 = 0.1;

fn grid() -> StreetGrid {
    StreetGrid::new(GridConfig::default()).expect("valid grid")
}

/// Positions once a second for `seconds`, stepping at 10 Hz.
fn track(driver: &mut Driver, seconds: u32) -> std::vec::Vec<(Position, f32, u16)> {
    (0..seconds)
        .map(|_| {
            for _ in 0..10 {
                driver.step(DT_S);
            }
            (driver.position(), driver.speed_m_s(), driver.heading_deg())
        })
        .collect()
}

#[test]
fn rejects_bad_configs() {
    let ok = GridConfig::default();
    let bad_centre = GridConfig {
        centre: Position::new(850_000_000, 0),
        ..ok
    };
    assert_eq!(StreetGrid::new(bad_centre), Err(GridError::Centre));
    let bad_block = GridConfig { block_m: 10, ..ok };
    assert_eq!(StreetGrid::new(bad_block), Err(GridError::BlockSize(10)));
    let empty = GridConfig {
        half_width: 0,
        half_height: 0,
        ..ok
    };
    assert_eq!(StreetGrid::new(empty), Err(GridError::Extent));
    let antimeridian = GridConfig {
        centre: Position::new(0, 1_799_990_000),
        ..ok
    };
    assert_eq!(StreetGrid::new(antimeridian), Err(GridError::OffTheGlobe));
}

#[test]
fn blocks_are_150_to_250_m() {
    let grid = grid();
    for i in -10..10 {
        let a = grid.local(Node::new(i, i));
        let b = grid.local(Node::new(i + 1, i + 1));
        for len in [b.east_m - a.east_m, b.north_m - a.north_m] {
            assert!((150.0..=250.0).contains(&len), "block of {len} m");
        }
    }
    assert_eq!(grid.position(Node::CENTRE), GridConfig::BERLIN);
}

#[test]
fn projection_round_trips_to_a_centimetre() {
    let grid = grid();
    let p = Point {
        east_m: 1834.25,
        north_m: -1999.5,
    };
    let back = grid.to_local(grid.to_position(p));
    assert!(back.distance_to(p) < 0.02, "{back:?}");
    // One block north is about 200 m, i.e. 0.0018 degrees.
    let north = grid.position(Node::new(0, 1));
    assert!((north.lat() - 52.5218).abs() < 0.0003, "{north:?}");
}

#[test]
fn nearest_node_covers_the_service_area() {
    let grid = grid();
    for node in [Node::CENTRE, Node::new(-10, 10), Node::new(3, -7)] {
        assert_eq!(grid.nearest_node(grid.position(node)), Some(node));
    }
    let just_outside = grid.to_position(Point {
        east_m: grid.local(Node::new(10, 0)).east_m + 150.0,
        north_m: 0.0,
    });
    assert_eq!(grid.nearest_node(just_outside), Some(Node::new(10, 0)));
    assert_eq!(grid.nearest_node(Position::new(0, 0)), None);
    assert_eq!(grid.nearest_node(Position::new(i32::MAX, 0)), None);
}

#[test]
fn spread_nodes_are_distinct_and_on_the_grid() {
    let grid = grid();
    let mut seen = std::collections::HashSet::new();
    for slot in 0..grid.node_count() {
        let node = grid.spread_node(slot);
        assert!(grid.contains(node));
        assert!(seen.insert(node), "slot {slot} reuses {node:?}");
    }
    // Neighbouring slots start several blocks apart.
    for slot in 0..100 {
        let gap = grid.spread_node(slot).blocks_to(grid.spread_node(slot + 1));
        assert!(
            gap >= 4,
            "slots {slot} and {} are {gap} blocks apart",
            slot + 1
        );
    }
}

#[test]
fn stays_on_streets_without_jumps() {
    let grid = grid();
    let mut driver = Driver::new(grid, grid.spread_node(7), 42);
    let start = driver.position();
    let track = track(&mut driver, 3600);
    let mut previous = (start, 0.0_f32);
    let mut moving = 0;
    let mut headings = std::collections::HashSet::new();
    for &(pos, speed, heading) in &track {
        assert!(grid.is_on_street(pos, 0.1), "{pos:?} is off the streets");
        assert!((0.0..=MAIN_ROAD_M_S + 0.01).contains(&speed), "{speed} m/s");
        let hop = grid.to_local(previous.0).distance_to(grid.to_local(pos));
        // No faster than the top speed over the last second.
        assert!(hop <= MAIN_ROAD_M_S + 0.05, "jumped {hop} m in a second");
        assert!([0, 90, 180, 270].contains(&heading), "heading {heading}");
        headings.insert(heading);
        if speed > 0.0 {
            moving += 1;
        }
        previous = (pos, speed);
    }
    assert!(moving > 2400, "moving only {moving} of 3600 s");
    assert_eq!(headings.len(), 4, "an hour of driving goes every way");
    // An hour at city speeds covers kilometres, but stays on the 4 km grid.
    let far = track
        .iter()
        .map(|(p, _, _)| grid.to_local(*p).distance_to(grid.to_local(start)))
        .fold(0.0_f32, f32::max);
    assert!(far > 500.0, "stayed within {far} m");
}

#[test]
fn heading_follows_the_motion() {
    let grid = grid();
    let mut driver = Driver::new(grid, Node::new(2, 2), 3);
    let mut before = driver.local();
    for _ in 0..2000 {
        driver.step(DT_S);
        let after = driver.local();
        let (de, dn) = (after.east_m - before.east_m, after.north_m - before.north_m);
        // Compare only within one street: a step through a turn moves along two.
        if (de.abs() > 0.05) != (dn.abs() > 0.05) {
            let expected = match (de > 0.05, de < -0.05, dn > 0.05) {
                (true, _, _) => 90,
                (_, true, _) => 270,
                (_, _, true) => 0,
                _ => 180,
            };
            assert_eq!(driver.heading_deg(), expected, "moved {de}, {dn}");
        }
        before = after;
    }
}

#[test]
fn same_seed_same_drive_other_seed_other_drive() {
    let grid = grid();
    let a = track(&mut Driver::new(grid, Node::CENTRE, 1), 600);
    let b = track(&mut Driver::new(grid, Node::CENTRE, 1), 600);
    let c = track(&mut Driver::new(grid, Node::CENTRE, 2), 600);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn slows_down_for_turns() {
    let grid = grid();
    let mut driver = Driver::new(grid, Node::CENTRE, 5);
    let mut turns = 0;
    for _ in 0..20_000 {
        let heading = driver.heading_deg();
        let speed = driver.speed_m_s();
        driver.step(DT_S);
        if driver.heading_deg() != heading && heading.abs_diff(driver.heading_deg()) != 180 {
            turns += 1;
            // Braking is computed per step, so allow the overshoot of one step.
            assert!(speed <= 5.0, "turned at {speed} m/s");
        }
    }
    assert!(turns > 10, "only {turns} turns");
}

#[test]
fn drives_to_a_goal_and_parks_there() {
    let grid = grid();
    let mut driver = Driver::new(grid, Node::new(-8, -9), 11);
    let goal = Node::new(6, 4);
    driver.set_goal(Some(goal));
    let mut arrivals = 0;
    let mut seconds = 0.0;
    while !driver.is_parked() {
        arrivals += u32::from(driver.step(DT_S).arrived);
        seconds += DT_S;
        assert!(seconds < 1800.0, "never arrived");
    }
    for _ in 0..100 {
        arrivals += u32::from(driver.step(DT_S).arrived);
    }
    assert_eq!(arrivals, 1, "arrival is reported once");
    assert_eq!(driver.position(), grid.position(goal));
    assert!(!driver.is_moving());
    // 27 blocks of about 200 m at up to 50 km/h, with turns and lights.
    assert!(
        seconds > 27.0 * 200.0 / MAIN_ROAD_M_S,
        "too fast: {seconds} s"
    );

    // A goal where it already stands is reached at once.
    driver.set_goal(Some(goal));
    assert!(driver.step(DT_S).arrived);
    driver.set_goal(None);
    driver.resume();
    for _ in 0..100 {
        driver.step(DT_S);
    }
    assert!(driver.is_moving());
}

#[test]
fn turns_around_only_at_dead_ends() {
    // A single street: both ends are dead ends.
    let grid = StreetGrid::new(GridConfig {
        half_height: 0,
        half_width: 2,
        ..GridConfig::default()
    })
    .expect("valid grid");
    let mut driver = Driver::new(grid, Node::CENTRE, 9);
    let mut u_turns = 0;
    let mut heading = driver.heading_deg();
    for _ in 0..20_000 {
        driver.step(DT_S);
        assert!(grid.is_on_street(driver.position(), 0.1));
        if driver.heading_deg() != heading {
            u_turns += 1;
            // Only at the ends of the street.
            assert_eq!(
                driver.from.east.abs(),
                2,
                "turned around at {:?}",
                driver.from
            );
            heading = driver.heading_deg();
        }
    }
    assert!(u_turns > 5);
}
