//! The same `--seed` drives the same routes: in-process through the library, and through two
//! real `device-sim` runs whose heartbeats are compared position by position.

#[path = "sim_support.rs"]
mod sim_support;

use std::collections::BTreeMap;

use device_sim::route::{GridConfig, StreetGrid};
use device_sim::runner::SimConfig;
use shared::{Heartbeat, Position};
use sim_support::Watcher;
use tests::WAIT;
use tests::stack::{start_broker, start_sim};

/// The first `n` heartbeat positions of every vehicle the configuration builds.
fn routes(seed: u64, n: u64) -> anyhow::Result<Vec<Vec<Position>>> {
    let config = SimConfig {
        vehicles: 5,
        seed,
        ..SimConfig::default()
    };
    Ok(config
        .devices()?
        .into_iter()
        .map(|mut device| {
            (0..n)
                .filter_map(|s| device.tick(1_764_230_400_000 + s * 1000).map(|h| h.pos))
                .collect()
        })
        .collect())
}

#[test]
fn same_seed_same_routes_in_process() -> anyhow::Result<()> {
    let a = routes(42, 600)?;
    assert_eq!(a, routes(42, 600)?);
    assert_ne!(a, routes(43, 600)?);
    let grid = StreetGrid::new(GridConfig::default())?;
    for route in &a {
        assert_eq!(route.len(), 600);
        assert!(route.iter().all(|p| grid.is_on_street(*p, 0.5)));
        assert!(route.windows(2).any(|w| w[0] != w[1]), "it drives");
    }
    Ok(())
}

/// Heartbeat positions of each run's first vehicle, keyed by device time since its first
/// heartbeat, until every run has `count`.
async fn drives(
    watcher: &mut Watcher,
    fleets: &[&str],
    count: usize,
) -> anyhow::Result<Vec<BTreeMap<u64, Position>>> {
    let mut tracks = vec![BTreeMap::new(); fleets.len()];
    let mut firsts = vec![None; fleets.len()];
    while tracks.iter().any(|t| t.len() < count) {
        let received = watcher.next_on("-0001/hb", WAIT).await?;
        let Some(i) = fleets
            .iter()
            .position(|f| received.topic.starts_with(&format!("fleet/{f}/")))
        else {
            continue;
        };
        let hb = received.open::<Heartbeat>()?.msg;
        let t0 = *firsts[i].get_or_insert(hb.ts_ms);
        tracks[i].insert(hb.ts_ms - t0, hb.pos);
    }
    Ok(tracks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_routes_over_mqtt() -> anyhow::Result<()> {
    let broker = start_broker().await?;
    let mut watcher = Watcher::connect(broker.v4_addr(), "observer", &["fleet/+/+/hb"]).await?;
    // Ids differ by fleet, but vehicles are seeded by seed and slot only.
    let args = |seed: &'static str| ["--time-scale", "20", "--rate", "5", "--seed", seed];
    let _a = start_sim(broker.v4_addr(), 2, "runa", &args("9"))?;
    let _b = start_sim(broker.v4_addr(), 2, "runb", &args("9"))?;
    let _c = start_sim(broker.v4_addr(), 2, "runc", &args("10"))?;
    let tracks = drives(&mut watcher, &["runa", "runb", "runc"], 12).await?;
    let (a, b, c) = (&tracks[0], &tracks[1], &tracks[2]);

    // Compare the heartbeats both runs sent at the same device time since their first.
    let common: Vec<u64> = a.keys().filter(|t| b.contains_key(t)).copied().collect();
    assert!(common.len() >= 8, "too few common times: {a:?} {b:?}");
    for t in &common {
        assert_eq!(a[t], b[t], "runs with the same seed differ at +{t} ms");
    }
    let differs = c.iter().any(|(t, p)| a.get(t).is_some_and(|q| q != p));
    assert!(differs, "another seed drives the same route");
    Ok(())
}
