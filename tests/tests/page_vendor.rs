//! The vendor page (`/vendor`) in a real headless Chromium (Debian's `chromium`), through the
//! real pipeline: the one-command demo (`bridge --simulate 40 --sim-speed 5 --sim-stores 3`,
//! its own vehicles, and simulated stores ordering too).
//!
//! `vendor_page_places_follows_and_catches_up`:
//! - the store `store-1` logs in with `vendor-demo`, places an order by clicking on the map
//!   for the drop-off and submitting the form, and follows it live (a vehicle takes it);
//! - the page is closed; the order is picked up and delivered meanwhile (seen through the
//!   API); the page is opened again, and what it missed comes in from the durable queue, is
//!   shown as missed and acknowledged (`received`): pending goes to 0;
//! - meanwhile `store-2`'s page (`vendor-demo-2`) shows its own orders and never one of
//!   `store-1`'s (checked in its page every 50 ms, from its first order to the end).
//!
//! Screenshots (`vendor-live.png`, `vendor-caught-up.png`, `vendor-store-2.png`) go to
//! `artifacts/` in the cargo target directory (or `$FLEETBEAT_ARTIFACTS`); paths printed.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;
use tests::WAIT;
use tests::page::Page;
use tests::stack::start_demo;

/// Enough vehicles for the simulated stores' orders and ours (no order waits long).
const VEHICLES: u32 = 40;
/// How much faster than real time the vehicles drive and the stores order (slow enough that
/// the order is still on its way when the page is closed).
const SPEED: f64 = 5.0;
/// The demo's simulated stores.
const STORES: u32 = 3;
/// Bound on a step that needs vehicles to drive.
const DRIVE_WAIT: Duration = Duration::from_secs(180);
/// The demo's dispatcher token (every fleet), for the API's view of the orders.
const DISPATCH: &str = "dispatch-demo";

/// Records in `store-2`'s page, every 50 ms, the orders it shows (list and feed).
const SHOWN_RECORDER: &str = r"(() => {
  const shown = new Map();
  const record = () => {
    const h = window.__fleetbeatVendor;
    for (const o of h.orders()) shown.set(o.order, o.store ?? null);
    for (const f of h.feed()) if (f.order && !shown.has(f.order)) shown.set(f.order, 'feed');
  };
  window.__shown = { shown, timer: setInterval(record, 50) };
  record();
  return true;
})()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_page_places_follows_and_catches_up() -> anyhow::Result<()> {
    let demo = start_demo(VEHICLES, SPEED, STORES, &[]).await?;
    let vendor_url = format!("{}/vendor", demo.url());

    // Another store's page, open the whole time.
    let mut other = Page::open(&vendor_url).await?;
    other.login("vendor-demo-2").await?;
    other
        .wait_vendor_stats("s.connected && s.store === 'store-2'", WAIT)
        .await?;
    other.eval(SHOWN_RECORDER).await?;

    // Store 1 logs in and places an order: a click on the map for the drop-off, a customer,
    // the form submitted.
    let mut page = Page::open(&vendor_url).await?;
    page.login("vendor-demo").await?;
    let stats = page
        .wait_vendor_stats("s.connected && s.store === 'store-1' && s.caughtUp", WAIT)
        .await?;
    eprintln!("store-1's page: {stats}");
    let store = page
        .wait(
            "(() => { const s = window.__fleetbeatVendor.storeInfo(); return s && Number.isFinite(s.lat) && s; })()",
            WAIT,
        )
        .await?;
    let (lat, lon) = (
        store["lat"].as_f64().unwrap_or(f64::NAN) + 0.0027,
        store["lon"].as_f64().unwrap_or(f64::NAN) + 0.0015,
    );
    // About 330 m north-east of the store: on the map at the page's first zoom.
    let at = page
        .wait(
            &format!("window.__fleetbeatVendor.screenPoint({lat}, {lon})"),
            WAIT,
        )
        .await?;
    page.mouse("click", &at).await?;
    let dropoff = page
        .wait_vendor_stats("s.dropoff", WAIT)
        .await
        .context("the drop-off chosen by clicking on the map")?["dropoff"]
        .clone();
    eprintln!("clicked the map at {at}: drop-off {dropoff}");
    assert!(
        (dropoff["lat"].as_f64().unwrap_or(0.0) - lat).abs() < 0.0005
            && (dropoff["lon"].as_f64().unwrap_or(0.0) - lon).abs() < 0.0005,
        "the drop-off {dropoff} is not where the map was clicked ({lat}, {lon})"
    );
    let order = format!("vt-{}", std::process::id());
    page.fill("#v-order", &order).await?;
    page.fill("#v-customer", "Ada Lovelace").await?;
    page.click("#v-place").await?;
    let placed = page.shown_text("place-result").await?;
    eprintln!("placed: {placed}");
    assert!(placed.contains(&order), "{placed}");
    let (status, api) = demo
        .get_json(&format!("/api/orders/{order}"), Some("vendor-demo"))
        .await?;
    assert_eq!(status, 200, "{api}");
    assert_eq!(api["store"], "store-1", "{api}");
    assert!(
        (api["dropoff"]["lat"].as_f64().unwrap_or(0.0) - lat).abs() < 0.0005,
        "{api}"
    );

    // Followed live: a vehicle takes it (the `order` event), the detail panel says so.
    let taken = page
        .wait(
            &format!(
                "(() => {{ const o = window.__fleetbeatVendor.orders().find(o => o.order === '{order}'); return o && o.vehicle && o.state !== 'created' && o; }})()"
            ),
            DRIVE_WAIT,
        )
        .await
        .context("a vehicle taking the order, on the page")?;
    eprintln!("on the page: {taken}");
    page.click(&format!("#orders [data-order='{order}']"))
        .await?;
    page.wait(
        &format!(
            "document.getElementById('o-id').textContent === '{order}' && document.getElementById('o-vehicle').textContent.startsWith('demo-')"
        ),
        WAIT,
    )
    .await
    .context("the order's detail")?;
    page.screenshot("vendor-live.png").await?;
    let live = page.eval("window.__fleetbeatVendor.stats()").await?;
    assert_eq!(live["pending"], 0, "{live}");
    let problems = page.problems();
    assert!(problems.is_empty(), "{problems:#?}");
    page.close().await;

    // Closed: the order must still be on its way, then delivered while nobody watches.
    let (_, closed_at) = demo
        .get_json(&format!("/api/orders/{order}"), Some("vendor-demo"))
        .await?;
    eprintln!("page closed with the order {}", closed_at["state"]);
    assert_ne!(
        closed_at["state"], "delivered",
        "delivered before the page closed: nothing to miss ({closed_at})"
    );
    let closed = Instant::now();
    let delivered = wait_delivered(&demo, &order).await?;
    eprintln!(
        "delivered {:?} after the page closed: {}",
        closed.elapsed(),
        delivered["timeline"]
    );

    // Opened again: the missed messages come in from the durable queue and are acknowledged.
    let mut page = Page::open(&vendor_url).await?;
    page.login("vendor-demo").await?;
    let caught_up = page
        .wait_vendor_stats(
            "s.connected && s.caughtUp && s.missed > 0 && s.pending === 0 && s.received > 0 && s.missedAcked === s.missed",
            WAIT + WAIT,
        )
        .await
        .context("catching up after being closed")?;
    eprintln!("caught up: {caught_up}");
    let missed = page.eval("window.__fleetbeatVendor.missed()").await?;
    let ours: Vec<&Value> = missed
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|e| {
                    e["text"]
                        .as_str()
                        .is_some_and(|t| t.contains(&format!("order {order}")))
                })
                .collect()
        })
        .unwrap_or_default();
    eprintln!("missed messages about {order}: {ours:?}");
    assert!(
        ours.iter()
            .any(|e| e["text"].as_str().is_some_and(|t| t.contains("delivered"))),
        "the delivery of {order} was not among the missed messages: {missed}"
    );
    assert!(
        ours.iter()
            .all(|e| e["acked"] == true && !e["messageId"].is_null()),
        "{missed}"
    );
    let row = page
        .wait(
            &format!(
                "window.__fleetbeatVendor.orders().find(o => o.order === '{order}' && o.state === 'delivered')"
            ),
            WAIT,
        )
        .await?;
    eprintln!("the order on the page: {row}");
    page.screenshot("vendor-caught-up.png").await?;
    let problems = page.problems();
    assert!(problems.is_empty(), "{problems:#?}");
    page.close().await;

    // Store 2's page all along: its own orders, never one of store 1's.
    let (status, store_1) = demo
        .get_json("/api/orders?store=store-1&limit=1000", Some(DISPATCH))
        .await?;
    assert_eq!(status, 200, "{store_1}");
    let store_1: Vec<String> = store_1["orders"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|o| o["order"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert!(store_1.contains(&order), "{store_1:?}");
    let shown = other
        .eval("Object.fromEntries(window.__shown.shown)")
        .await?;
    let shown = shown.as_object().cloned().unwrap_or_default();
    eprintln!("store-2's page showed {} orders", shown.len());
    assert!(
        !shown.is_empty(),
        "store-2's page showed none of its orders"
    );
    let leaked: Vec<&String> = store_1.iter().filter(|o| shown.contains_key(*o)).collect();
    assert!(
        leaked.is_empty(),
        "store-2's page showed store-1's orders {leaked:?}"
    );
    // Every order it listed with a store is store 2's.
    assert!(
        shown
            .values()
            .all(|s| s.as_str().is_none_or(|s| s == "store-2" || s == "feed")),
        "{shown:?}"
    );
    other.screenshot("vendor-store-2.png").await?;
    let problems = other.problems();
    assert!(problems.is_empty(), "{problems:#?}");
    other.close().await;
    Ok(())
}

/// Waits until the API says `order` is delivered; returns it (with its timeline).
async fn wait_delivered(demo: &tests::stack::BridgeProcess, order: &str) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + DRIVE_WAIT;
    loop {
        let (status, body) = demo
            .get_json(&format!("/api/orders/{order}"), Some("vendor-demo"))
            .await?;
        anyhow::ensure!(status == 200, "GET /api/orders/{order}: {status} {body}");
        if body["state"] == "delivered" {
            return Ok(body);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{order} not delivered within {DRIVE_WAIT:?}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
