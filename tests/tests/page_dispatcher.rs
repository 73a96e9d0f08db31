//! The dispatcher page in a real headless Chromium (Debian's `chromium`, driven by
//! `tests/node/page-driver.mjs` through npm's `playwright-core`) against the real bridge, its
//! embedded broker and real `device-sim` processes.
//!
//! - `page_shows_the_fleet_live`: a refused token shows the server's reason; the page logs in,
//!   shows 100 vehicles within seconds, shows an operator's announcement as a banner and a
//!   delivery in the feed, follows `join` / `leave`, sends commands from the page and shows the
//!   vehicle's acks, and shows a frozen vehicle turn stale, then offline when it dies. Saves
//!   screenshots (`target/artifacts/page.png` and `page-selected.png`, paths printed).
//! - `page_stays_interactive_with_10k_vehicles`: 10,000 vehicles on the map (fed to the page's
//!   event handlers, see `synthetic_fleet`) while the map is dragged; prints frame interval and
//!   draw time p50 / p95 (`FRAME TIMES`), and saves `target/artifacts/page-10k.png`.
//!
//! Both run one after the other (one browser at a time: frame times are measured).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};
use tests::WAIT;
use tests::page::Page;
use tests::sio::{DISPATCH_TOKEN as TOKEN, SioClient};
use tests::stack::{start_bridge, start_sim};
use tokio::sync::Mutex;

/// One browser at a time.
static BROWSER: Mutex<()> = Mutex::const_new(());

/// One Chromium at a time: the 10k-vehicle page kept two cores busy enough that the other
/// page's first join went unanswered within its bound on a loaded CI machine.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_the_fleet_live() -> anyhow::Result<()> {
    let _one_browser = ONE_BROWSER.lock().await;
    let _one_browser = BROWSER.lock().await;
    let bridge = start_bridge(&[]).await?;
    let _demo = start_sim(bridge.mqtt, 100, "demo", &["--rate", "2"])?;
    // A second fleet whose process the test freezes, then kills.
    // (Another seed: not driving in the tracks of demo-0001 and demo-0002.)
    let mut north = start_sim(bridge.mqtt, 2, "north", &["--rate", "2", "--seed", "7"])?;
    let mut page = Page::open(&format!("{}/", bridge.url())).await?;

    // A refused token: the server's reason is on the login form.
    page.login("not-a-token").await?;
    let refused = page.shown_text("login-error").await?;
    assert!(
        refused.contains("refused") && refused.contains("unknown token"),
        "{refused}"
    );

    // The real token: the page joins `all` by itself and shows the fleet.
    let started = Instant::now();
    page.login(TOKEN).await?;
    page.wait_stats("s.connected", WAIT).await?;
    let stats = page.wait_stats("s.rendered >= 102", WAIT).await?;
    let took = started.elapsed();
    eprintln!("login to 102 vehicles on the map: {took:?}; {stats}");
    assert_eq!(stats["rooms"], json!(["all"]));
    assert_eq!(stats["vehicles"], 102);
    // The token stays in the tab's session storage, nowhere else.
    let stored = page
        .eval("[sessionStorage.getItem('fleetbeat.token'), localStorage.length]")
        .await?;
    assert_eq!(stored, json!([TOKEN, 0]));
    // The list shows them too (virtualised: only the visible rows exist).
    let rows = page
        .eval("document.querySelectorAll('#list-rows .row:not([hidden])').length")
        .await?;
    assert!(
        rows.as_u64().is_some_and(|n| (10..102).contains(&n)),
        "{rows}"
    );
    page.search("north-", "rows.length === 2").await?;
    page.fill("#search", "").await?;

    // An operator's announcement (a real `/admin` client) shows as a banner.
    let mut admin = SioClient::connect(
        &bridge.url(),
        "/admin",
        Some(json!({ "token": "admin-demo" })),
    )
    .await?;
    let ack = admin
        .emit_ack(
            "announce",
            json!([{ "message": "Depot closes at 18:00 today" }]),
        )
        .await?;
    assert_eq!(ack["ok"], true, "{ack}");
    page.wait(
        "(() => { const b = document.getElementById('banner'); return !b.hidden && b.textContent.includes('Depot closes at 18:00 today'); })()",
        WAIT,
    )
    .await
    .context("the announcement banner")?;
    admin.close().await;

    // Delivery events come from orders ([6/7]); until vehicles have orders, one is handed to
    // the page's `delivery` handler as the bridge would send it. The Deliveries tab shows it.
    page.eval(
        "window.__fleetbeat.inject('delivery', { vehicle: 'demo-0003', fleet: 'demo', order: 'o-17', \
         kind: 'delivered', ts_ms: Date.now(), lat: 52.52, lon: 13.40 })",
    )
    .await?;
    page.click(".tabs [data-filter='delivery']").await?;
    page.wait(
        "[...document.querySelectorAll('#feed li')].filter(li => li.offsetParent !== null).map(li => li.textContent).join('|').includes('demo-0003 delivered order o-17')",
        WAIT,
    )
    .await?;
    page.click(".tabs [data-filter='all']").await?;

    // Rooms: leave `all` → nothing; join fleet:north → just north; add fleet:demo → all 102.
    page.leave("all").await?;
    page.wait_stats("s.vehicles === 0 && s.rendered === 0", WAIT)
        .await?;
    page.join("fleet", "north").await?;
    let only_north = page
        .wait_stats("s.vehicles === 2 && s.rendered === 2", WAIT)
        .await?;
    assert_eq!(only_north["rooms"], json!(["fleet:north"]));
    let north_only = page
        .eval("['north-0001', 'north-0002', 'demo-0001'].map(id => window.__fleetbeat.vehicle(id)?.fleet ?? null)")
        .await?;
    assert_eq!(north_only, json!(["north", "north", null]));
    page.join("fleet", "demo").await?;
    page.wait_stats("s.vehicles === 102 && s.rendered === 102", WAIT)
        .await?;
    // A room the bridge refuses is reported, not silently ignored.
    page.join_refused("vehicle", "no/such").await?;

    // Selecting: a click on a vehicle drawn on the canvas selects it (hit testing); the list
    // selects exactly the one searched for.
    page.click_vehicle("demo-0042").await?;
    let picked = page.wait_stats("s.selected", WAIT).await?;
    eprintln!(
        "clicked near demo-0042 on the map, selected {}",
        picked["selected"]
    );
    // The list shows the one match (rows are recycled: click only once it has re-rendered).
    page.search(
        "demo-0007",
        "rows.length === 1 && rows[0].dataset.id === 'demo-0007'",
    )
    .await?;
    page.click("#list-rows .row:not([hidden])[data-id='demo-0007']")
        .await?;
    page.wait_stats("s.selected === 'demo-0007'", WAIT).await?;
    page.wait(
        "document.getElementById('d-id').textContent === 'demo-0007'",
        WAIT,
    )
    .await?;
    page.fill("#search", "").await?;

    // A command from the page: ping the selected vehicle, see the vehicle's ack.
    page.click("#cmd-ping").await?;
    let ping = command_result(&mut page, "true").await?;
    eprintln!("ping from the page: {ping}");
    assert_eq!(ping["state"], "ok", "{ping}");
    assert_eq!(ping["result"], "ok", "{ping}");
    page.fill("#cmd-interval", "500").await?;
    page.click("#cmd-rate").await?;
    let rate = command_result(&mut page, "r.dataset.type === 'set_rate'").await?;
    assert_eq!(rate["result"], "ok", "{rate}");

    // Proof of life: freeze north's process (no heartbeats, connection still open) → stale;
    // kill it (the broker publishes its last will) → offline.
    north.signal("STOP")?;
    let stale = page.vehicle_status("north-0001", "stale", WAIT).await?;
    eprintln!("north-0001 on the page: {stale}");
    page.wait(
        "[...document.querySelectorAll('#feed li.k-status.t-stale')].some(li => li.textContent.includes('north-0001'))",
        WAIT,
    )
    .await
    .context("the stale status in the feed")?;
    north.kill().await?;
    let offline = page
        .vehicle_status("north-0001", "offline", WAIT + WAIT)
        .await?;
    eprintln!("north-0001 on the page: {offline}");
    let stats = page
        .wait_stats(
            "s.statuses.offline === 2 && s.statuses.online === 100",
            WAIT,
        )
        .await?;
    eprintln!("after the freeze and the kill: {}", stats["statuses"]);
    page.wait(
        "document.getElementById('counts').textContent.includes('2 offline')",
        WAIT,
    )
    .await
    .context("the counts in the sidebar")?;

    // The pictures a dispatcher sees: the whole fleet (two vehicles offline, grey) with the
    // feed and the command results; then a close-up of the selected vehicle and its trail.
    page.click("#fit").await?;
    page.wait_stats("s.rendered === 102", WAIT).await?;
    page.screenshot("page.png").await?;
    let at = page.vehicle_point("demo-0007").await?;
    page.mouse("move", &at).await?;
    page.wheel(-240).await?;
    page.wait_stats("s.zoom >= 16", WAIT).await?;
    // A few more heartbeats (2 Hz) for the trail.
    let seq = page
        .eval("window.__fleetbeat.vehicle('demo-0007').position.seq")
        .await?;
    page.wait(
        &format!("window.__fleetbeat.vehicle('demo-0007').position.seq >= {seq} + 6"),
        WAIT,
    )
    .await?;
    page.screenshot("page-selected.png").await?;

    close_clean(page).await
}

/// Asserts that the page logged no console or page errors and asked nothing of the outside,
/// then closes it.
async fn close_clean(mut page: Page) -> anyhow::Result<()> {
    let problems = page.problems();
    assert!(
        problems.is_empty(),
        "console errors, page errors or requests to the outside: {problems:#?}"
    );
    page.close().await;
    Ok(())
}

/// Waits until the newest result in the command panel satisfies `condition` (a JS expression
/// over `r`, its list item) and is no longer pending; returns its data and text.
async fn command_result(page: &mut Page, condition: &str) -> anyhow::Result<Value> {
    let expr = format!(
        "(() => {{ const r = document.querySelector('#cmd-results li'); return r && {condition} && r.dataset.state !== 'pending' && {{...r.dataset, text: r.textContent}}; }})()"
    );
    page.wait(&expr, WAIT + WAIT).await
}

/// A fleet of `n` vehicles driving a street grid around Berlin at 1 Hz, fed to the page through
/// `window.__fleetbeat.inject` exactly as the bridge's events would arrive: a `snapshot`, then a
/// `position` batch every 100 ms (the bridge's default tick: a tenth of the fleet each), each
/// batch through a JSON round trip as Socket.IO would parse it, and a few `status` changes.
fn synthetic_fleet(n: u64) -> String {
    format!(
        r#"(() => {{
  const N = {n};
  let seed = 42;
  const random = () => {{ // mulberry32: the same fleet every run
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }};
  const vs = [];
  for (let i = 0; i < N; i++) {{
    vs.push({{ vehicle: `city-${{String(i + 1).padStart(5, "0")}}`, fleet: "city", seq: 0,
      lat: 52.45 + 0.14 * random(), lon: 13.25 + 0.3 * random(),
      heading_deg: 90 * (i % 4), speed_mps: 6 + (i % 7), battery_pct: 40 + (i % 60), flags: 1, moving: true }});
  }}
  const pos = (v) => ({{ ...v, ts_ms: Date.now() }});
  const wire = (x) => JSON.parse(JSON.stringify(x));
  window.__fleetbeat.inject("snapshot", wire(vs.map((v) => ({{ vehicle: v.vehicle, fleet: v.fleet,
    status: "online", reason: null, last_seen_ms: Date.now(), position: pos(v) }}))));
  let tick = 0;
  window.__syntheticFeed = setInterval(() => {{
    const batch = [];
    for (let i = tick % 10; i < N; i += 10) {{
      const v = vs[i];
      const r = v.heading_deg * Math.PI / 180;
      v.lat += Math.cos(r) * v.speed_mps / 111000;
      v.lon += Math.sin(r) * v.speed_mps / 68000;
      if ((i + tick) % 97 === 0) v.heading_deg = (v.heading_deg + 90) % 360;
      v.seq++;
      batch.push(pos(v));
    }}
    window.__fleetbeat.inject("position", wire(batch));
    if (tick % 10 === 0) {{
      const v = vs[(tick * 31) % N];
      window.__fleetbeat.inject("status", {{ vehicle: v.vehicle, fleet: v.fleet, status: tick % 20 ? "stale" : "online",
        reason: null, last_seen_ms: Date.now() }});
    }}
    tick++;
  }}, 100);
  return true;
}})()"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_stays_interactive_with_10k_vehicles() -> anyhow::Result<()> {
    let _one_browser = ONE_BROWSER.lock().await;
    // 10,000 real device-sim vehicles are 10,000 MQTT connections: in a debug build on two
    // shared cores they take minutes to connect. What this test measures is the page, so the
    // vehicles are fed to it through its own event handlers (see `synthetic_fleet`), while it
    // stays connected to a real bridge.
    const VEHICLES: u64 = 10_000;
    let _one_browser = BROWSER.lock().await;
    let bridge = start_bridge(&[]).await?;
    let mut page = Page::open(&format!("{}/", bridge.url())).await?;
    page.login(TOKEN).await?;
    page.wait_stats("s.connected && s.rooms.includes('all')", WAIT)
        .await?;
    page.eval(&synthetic_fleet(VEHICLES)).await?;
    let stats = page
        .wait_stats(
            &format!("s.vehicles >= {VEHICLES} && s.rendered >= {VEHICLES}"),
            WAIT,
        )
        .await?;
    assert_eq!(stats["vehicles"], VEHICLES);
    // Let the map fit the fleet and the feed run for a moment before measuring.
    page.wait_stats("s.batches >= 20", WAIT).await?;

    // Frame times while the map is dragged back and forth for 5 s, every vehicle in view and
    // gliding (interpolated every frame).
    let frames = page
        .call(
            json!({ "op": "frames", "ms": 5000 }),
            Duration::from_secs(60),
        )
        .await?;
    let (interval, draw) = (&frames["frameInterval"], &frames["draw"]);
    eprintln!(
        "FRAME TIMES with {} vehicles drawn, dragging the map: frame interval p50 {:.1} ms, \
         p95 {:.1} ms, max {:.1} ms ({} frames); vehicle layer draw p50 {:.1} ms, p95 {:.1} ms",
        frames["rendered"],
        interval["p50"].as_f64().unwrap_or(f64::NAN),
        interval["p95"].as_f64().unwrap_or(f64::NAN),
        interval["max"].as_f64().unwrap_or(f64::NAN),
        interval["count"],
        draw["p50"].as_f64().unwrap_or(f64::NAN),
        draw["p95"].as_f64().unwrap_or(f64::NAN),
    );
    assert_eq!(frames["rendered"], VEHICLES, "{frames}");
    // The page keeps drawing while dragged with every vehicle in view. How fast is a benchmark
    // figure, not a test assertion (a loaded CI machine made a frame-time bound flaky): the
    // FRAME TIMES line above is the recipe's output (BENCHMARKS.md, "Dispatcher page"); here
    // only that frames kept coming and the draw finished.
    assert!(
        interval["count"].as_u64().is_some_and(|n| n >= 10),
        "the page stopped drawing while dragged: {frames}"
    );
    assert!(interval["p50"].as_f64().is_some(), "{frames}");

    // The list stays fast: search among 10,000 ids.
    page.search("city-09999", "rows.length === 1").await?;
    page.fill("#search", "").await?;
    page.screenshot("page-10k.png").await?;

    close_clean(page).await
}
