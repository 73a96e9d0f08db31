//! The dispatcher page against either bridge of a cluster (issue #15, "the dispatcher page
//! works against either bridge"): two bridges in one shared-subscription group behind Debian's
//! mosquitto, Redis and PostgreSQL (`tests::cluster`), real `device-sim` vehicles, and the page
//! in a real headless Chromium (`tests::page`) opened on each bridge in turn: each page logs in,
//! joins `all`, and shows every vehicle, although each bridge receives only part of their
//! heartbeats, with no console error; when the vehicles die, each last will reaches one
//! bridge, and the page on either bridge shows every vehicle offline.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use tests::cluster::{Cluster, ClusterOptions};
use tests::page::Page;
use tests::sio::DISPATCH_TOKEN as TOKEN;

/// Vehicles in the cluster.
const VEHICLES: u32 = 60;
/// Bound on a page showing every vehicle (Chromium's first start included).
const SHOWN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_every_vehicle_on_either_bridge() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions {
        bridges: 2,
        vehicles: VEHICLES,
        sim_args: ["--rate", "2"].iter().map(|s| (*s).to_owned()).collect(),
        ..ClusterOptions::default()
    })
    .await?;
    // One browser at a time: two Chromiums on two cores beside five servers is slow to no
    // purpose.
    let mut page = None;
    for bridge in 1..=2 {
        if let Some(previous) = page.take() {
            Page::close(previous).await;
        }
        page = Some(shows_every_vehicle(&cluster, bridge, "s.vehicles").await?);
    }
    // The simulator dies: the broker gives each vehicle's last will to ONE bridge of the
    // group, yet bridge 2's page, open, shows every vehicle go offline (the other bridge's
    // share comes through Redis), and bridge 1's page, opened afterwards, too.
    let mut page = page.context("a page is open")?;
    cluster
        .sim_mut()
        .context("the cluster runs device-sim")?
        .kill()
        .await?;
    let offline = format!("s.statuses.offline === {VEHICLES}");
    page.wait_stats(&offline, SHOWN).await?;
    page.close().await;
    shows_every_vehicle(&cluster, 1, &offline)
        .await?
        .close()
        .await;
    Ok(())
}

/// Opens the page on `bridge`, logs in, and waits until it shows every vehicle and
/// `condition` (a JS expression over the page's stats `s`) holds; no console error.
async fn shows_every_vehicle(
    cluster: &Cluster,
    bridge: usize,
    condition: &str,
) -> anyhow::Result<Page> {
    let mut page = Page::open(&format!("{}/", cluster.url(bridge)?)).await?;
    page.login(TOKEN).await?;
    page.wait_stats("s.connected", SHOWN).await?;
    let stats = page
        .wait_stats(
            &format!("s.vehicles === {VEHICLES} && s.rendered === {VEHICLES} && {condition}"),
            SHOWN,
        )
        .await?;
    eprintln!("bridge-{bridge}: {stats}");
    assert_eq!(stats["rooms"], json!(["all"]), "bridge-{bridge}: {stats}");
    let problems = page.problems();
    assert!(
        problems.is_empty(),
        "bridge-{bridge}: console errors or blocked requests: {problems:?}"
    );
    Ok(page)
}
