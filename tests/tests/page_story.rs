//! The delivery story on the dispatcher page, in a real headless Chromium (Debian's
//! `chromium`), through the real pipeline: the one-command demo's own simulated vehicles and
//! stores (`bridge --simulate 8 --sim-speed 10 --sim-stores 3`: the vehicles' clock and the
//! stores' order rate ten times faster than real time, so orders wait for a free vehicle).
//!
//! `page_tells_the_delivery_story` checks, on the page of `dispatch-demo`:
//! - the Orders board: an order is seen `created`, then `assigned`, `picked-up` and `delivered`
//!   (the states the board shows are recorded in the page every 20 ms), and the API agrees;
//!   selecting an order on its way draws its route (pickup, drop-off, line);
//! - the feed: a geofence `enter` (a vehicle arriving at a store or at a customer);
//! - the durable queue: each delivery message is shown once (by `message_id`), `received` is
//!   sent for them, and after a reload of the page the acknowledged ones are not replayed;
//! - history and replay: a vehicle's last hour is loaded, seeking from the start to the end
//!   moves the marker, and playing moves it over time.
//!
//! Screenshots of each view (board, route, feed, replay) go to `artifacts/` in the cargo target
//! directory (or `$FLEETBEAT_ARTIFACTS`); their paths are printed.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;
use tests::WAIT;
use tests::page::Page;
use tests::stack::start_demo;

/// The demo's simulated vehicles: fewer than the stores' orders need, so orders wait on the
/// board as `created` before a vehicle is free.
const VEHICLES: u32 = 8;
/// How much faster than real time the vehicles drive and the stores order.
const SPEED: f64 = 10.0;
/// The demo's simulated stores (`store-1` ... `store-3`).
const STORES: u32 = 3;
/// Bound on a story step that needs vehicles to drive (a whole delivery cycle at speed 10 is
/// about 12 s of real time; orders placed while every vehicle is busy wait for one).
const STORY_WAIT: Duration = Duration::from_secs(180);
/// The demo's dispatcher token (every fleet).
const DISPATCH: &str = "dispatch-demo";

/// Records in the page, every 20 ms, the states each order goes through on the board (as
/// `window.__fleetbeat.orders()` shows them).
const RECORDER: &str = r"(() => {
  if (window.__story) return true;
  const states = new Map();
  const record = () => {
    for (const o of window.__fleetbeat.orders()) {
      const seen = states.get(o.order) ?? [];
      if (seen[seen.length - 1] !== o.state) {
        seen.push(o.state);
        states.set(o.order, seen);
      }
    }
  };
  window.__story = { states, timer: setInterval(record, 20) };
  record();
  return true;
})()";

/// An order the board showed first as `created`, then `assigned`, `picked-up` and `delivered`
/// in that order (`{order, seen}`), or null.
const FULL_STORY: &str = r"(() => {
  const want = ['created', 'assigned', 'picked-up', 'delivered'];
  for (const [order, seen] of window.__story.states) {
    if (seen[0] !== 'created') continue;
    let i = 0;
    for (const s of seen) if (s === want[i]) i++;
    if (i === want.length) return { order, seen };
  }
  return null;
})()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_tells_the_delivery_story() -> anyhow::Result<()> {
    let demo = start_demo(VEHICLES, SPEED, STORES, &["--sim-rate", "2"]).await?;
    let url = format!("{}/", demo.url());
    let mut page = Page::open(&url).await?;
    page.login(DISPATCH).await?;
    page.wait_stats("s.connected", WAIT).await?;
    page.wait_stats(&format!("s.vehicles === {VEHICLES}"), WAIT)
        .await?;
    page.eval(RECORDER).await?;
    let started = Instant::now();

    // The board: one order through every state, seen as the page shows it.
    let story = page
        .wait(FULL_STORY, STORY_WAIT)
        .await
        .context("an order created → assigned → picked-up → delivered on the board")?;
    let order = story["order"].as_str().unwrap_or_default().to_owned();
    eprintln!(
        "order {order} on the board after {:?}: {}",
        started.elapsed(),
        story["seen"]
    );
    let (status, api) = demo
        .get_json(&format!("/api/orders/{order}"), Some(DISPATCH))
        .await?;
    assert_eq!(status, 200, "{api}");
    assert_eq!(api["state"], "delivered", "{api}");
    let vehicle = api["vehicle"].as_str().unwrap_or_default().to_owned();
    assert!(vehicle.starts_with("demo-"), "{api}");
    let board = page
        .eval(&format!(
            "window.__fleetbeat.orders().find(o => o.order === '{order}')"
        ))
        .await?;
    assert_eq!(board["state"], "delivered", "{board}");
    assert_eq!(board["vehicle"], vehicle.as_str(), "{board}");
    assert!(
        board["store"]
            .as_str()
            .is_some_and(|s| s.starts_with("store-")),
        "{board}"
    );
    let stats = page.wait_stats("s.orders > 0", WAIT).await?;
    eprintln!("orders on the board: {}", stats["orders"]);
    page.screenshot("story-board.png").await?;

    // The route of an order on its way: pickup and drop-off pins and the line between.
    let moving = page
        .wait(
            "window.__fleetbeat.orders().find(o => ['assigned', 'picked-up', 'in-transit'].includes(o.state) && o.vehicle)",
            STORY_WAIT,
        )
        .await
        .context("an order on its way")?;
    let moving_id = moving["order"].as_str().unwrap_or_default().to_owned();
    page.eval(&format!("window.__fleetbeat.selectOrder('{moving_id}')"))
        .await?;
    let route = page
        .wait(
            &format!(
                "(() => {{ const r = window.__fleetbeat.route(); return r && r.order === '{moving_id}' && r.pickup && r.dropoff && r; }})()"
            ),
            WAIT,
        )
        .await
        .context("the selected order's route")?;
    eprintln!(
        "route of {moving_id}: pickup {} dropoff {}",
        route["pickup"], route["dropoff"]
    );
    page.screenshot("story-route.png").await?;
    page.eval("window.__fleetbeat.selectOrder(null)").await?;

    // The feed: a vehicle arriving at a store or at a customer (an automatic fence).
    let arrival = page
        .wait(
            "window.__fleetbeat.feed().find(f => f.kind === 'geofence' && /^demo-\\d+ arrived at /.test(f.text))",
            STORY_WAIT,
        )
        .await
        .context("a geofence enter in the feed")?;
    eprintln!("geofence in the feed: {arrival}");
    page.click(".tabs [data-filter='geofence']").await?;
    page.screenshot("story-feed.png").await?;
    page.click(".tabs [data-filter='all']").await?;

    // The durable queue: delivery messages shown once each and acknowledged with `received`.
    let before = page
        .wait_stats("s.received > 0 && s.feedIds.length >= 3", STORY_WAIT)
        .await?;
    let acked = ids(&before["feedIds"]);
    assert_once(&mut page).await?;
    // Every id shown has had its `received` sent; wait for newer deliveries (seconds later) so
    // that the bridge has long handled those acknowledgements before the reload.
    let newest = acked.iter().copied().max().unwrap_or(0);
    page.wait_stats(
        &format!(
            "s.received >= {} && s.feedIds.filter(id => Number(id) > {newest}).length >= 2",
            acked.len()
        ),
        STORY_WAIT,
    )
    .await
    .context("newer deliveries after the acknowledged ones")?;

    // Reload: the same tab (its session keeps the token) connects again; what it acknowledged
    // is not replayed, newer deliveries keep coming.
    page.goto(&url).await?;
    page.wait_stats("s.connected", WAIT).await?;
    let after = page
        .wait_stats(
            &format!("s.feedIds.filter(id => Number(id) > {newest}).length >= 3"),
            STORY_WAIT,
        )
        .await
        .context("deliveries after the reload")?;
    let replayed: Vec<i64> = ids(&after["feedIds"])
        .into_iter()
        .filter(|id| acked.contains(id))
        .collect();
    eprintln!(
        "before the reload {} ids shown and acknowledged; after it {} shown, duplicates dropped {}",
        acked.len(),
        after["feedIds"].as_array().map_or(0, Vec::len),
        after["duplicatesDropped"]
    );
    assert!(
        replayed.is_empty(),
        "acknowledged messages replayed after the reload: {replayed:?}"
    );
    assert_once(&mut page).await?;

    // History and replay: the vehicle that delivered the order, over the last hour.
    let from = now_ms() - 3_600_000;
    let loaded = page
        .eval(&format!(
            "window.__fleetbeat.startReplay('{vehicle}', {from}, null)"
        ))
        .await?;
    eprintln!("replay of {vehicle} loaded: {loaded}");
    let replay = page
        .wait(
            "(() => { const r = window.__fleetbeat.replay(); const n = Array.isArray(r?.points) ? r.points.length : r?.points; return r && n >= 10 && r.marker && r; })()",
            WAIT,
        )
        .await
        .context("the replay's track")?;
    assert_eq!(replay["vehicle"], vehicle.as_str(), "{replay}");
    let start = page.eval("window.__fleetbeat.replaySeek(0)").await?;
    let end = page.eval("window.__fleetbeat.replaySeek(1)").await?;
    eprintln!("replay at 0: {}; at 1: {}", start["marker"], end["marker"]);
    assert!(
        start["marker"]["lat"].is_number() && end["marker"]["lat"].is_number(),
        "{start} {end}"
    );
    assert_ne!(
        start["marker"], end["marker"],
        "seeking did not move the marker"
    );
    page.eval("window.__fleetbeat.replaySeek(0)").await?;
    page.eval("window.__fleetbeat.replayPlay(60)").await?;
    let (lat, lon) = (&start["marker"]["lat"], &start["marker"]["lon"]);
    let played = page
        .wait(
            &format!(
                "(() => {{ const r = window.__fleetbeat.replay(); return r.playing && r.index > 0 && (r.marker.lat !== {lat} || r.marker.lon !== {lon}) && r; }})()"
            ),
            WAIT,
        )
        .await
        .context("playing the replay")?;
    eprintln!("playing: {played}");
    page.screenshot("story-replay.png").await?;
    let paused = page.eval("window.__fleetbeat.replayPause()").await?;
    assert_eq!(paused["playing"], false, "{paused}");

    page.close_clean().await;
    Ok(())
}

/// The message ids in a JSON array (numbers, or numbers in strings).
fn ids(value: &Value) -> HashSet<i64> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|id| id.as_i64().or_else(|| id.as_str()?.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that the feed shows each delivery message once: no message id twice among the ids
/// shown, nor among the feed's delivery entries.
async fn assert_once(page: &mut Page) -> anyhow::Result<()> {
    let shown = page
        .eval(
            "(() => { const s = window.__fleetbeat.stats(); return { ids: s.feedIds, feed: window.__fleetbeat.feed().filter(f => f.kind === 'delivery' && f.messageId !== undefined).map(f => f.messageId) }; })()",
        )
        .await?;
    for key in ["ids", "feed"] {
        let list = shown[key].as_array().cloned().unwrap_or_default();
        let unique: HashSet<String> = list.iter().map(Value::to_string).collect();
        assert_eq!(unique.len(), list.len(), "a message shown twice: {shown}");
    }
    assert!(
        shown["feed"].as_array().is_some_and(|a| !a.is_empty()),
        "no delivery message with an id in the feed: {shown}"
    );
    Ok(())
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
