use device_sim::route::Node;
use shared::Position;

use super::store::{DROPOFF_M, dropoff};
use super::*;

/// The grid the demo's vehicles drive on.
fn grid() -> StreetGrid {
    DemoConfig {
        vehicles: 1,
        ..DemoConfig::default()
    }
    .validate()
    .expect("valid")
}

#[test]
fn dropoffs_are_a_short_drive_from_the_store() {
    let grid = grid();
    let block = u32::from(grid.config().block_m);
    let mut rng = fastrand::Rng::with_seed(7);
    for store in demo_stores() {
        let [lat, lon] = store.location;
        let at = grid
            .nearest_node(Position::from_degrees(lat, lon))
            .expect("on the grid");
        for _ in 0..200 {
            let node = dropoff(&grid, at, &mut rng);
            assert!(grid.contains(node));
            let drive = at.blocks_to(node) * block;
            assert!(DROPOFF_M.contains(&drive), "{drive} m");
        }
    }
}

/// The demo stores stand exactly on intersections of the simulator's grid (where vehicles
/// stop), at different ones, within about a kilometre of the centre.
#[test]
fn demo_stores_stand_on_the_grid() {
    let grid = grid();
    let stores = demo_stores();
    assert_eq!(
        stores.iter().map(|s| s.store.as_str()).collect::<Vec<_>>(),
        ["store-1", "store-2", "store-3"]
    );
    let mut nodes = Vec::new();
    for store in &stores {
        let [lat, lon] = store.location;
        let at = Position::from_degrees(lat, lon);
        let node = grid.nearest_node(at).expect("on the grid");
        assert_eq!(
            grid.position(node),
            at,
            "{store:?} is not on an intersection"
        );
        assert!(node.blocks_to(Node::CENTRE) * u32::from(grid.config().block_m) <= 1_000);
        nodes.push(node);
    }
    nodes.dedup();
    assert_eq!(nodes.len(), stores.len(), "different intersections");
}

#[test]
fn settings_are_checked() {
    let ok = DemoConfig {
        vehicles: 10,
        ..DemoConfig::default()
    };
    assert!(ok.validate().is_ok());
    let bad = |config: DemoConfig| config.validate().map(|_| ()).map_err(|e| e.to_string());
    assert!(
        bad(DemoConfig {
            stores: 4,
            ..ok.clone()
        })
        .is_err_and(|e| e.contains("--sim-stores 4"))
    );
    assert!(
        bad(DemoConfig {
            speed: 0.0,
            ..ok.clone()
        })
        .is_err()
    );
    assert!(
        bad(DemoConfig {
            order_every: Duration::ZERO,
            ..ok.clone()
        })
        .is_err()
    );
    // The speed divides the stores' interval too.
    let fast = DemoConfig {
        speed: 10.0,
        ..ok.clone()
    };
    assert_eq!(fast.order_interval(), Duration::from_millis(1_500));
}
