//! The dispatcher page in a real headless Chromium (Debian's `chromium`, driven by
//! `tests/node/page-driver.mjs` through npm's `playwright-core`) against the real bridge, its
//! embedded broker and real `device-sim` processes.
//!
//! - `page_shows_the_fleet_live`: a refused token shows the server's reason; the page logs in,
//!   shows 100 vehicles within seconds, shows an operator's announcement as a banner and a
//!   delivery in the feed, follows `join` / `leave`, sends commands from the page and shows the
//!   vehicle's acks, and shows a frozen vehicle turn stale, then offline when it dies. Saves
//!   screenshots (`target/artifacts/page.png` and `page-selected.png`, paths printed).
//! - `page_stays_interactive_with_10k_vehicles`: 10,000 vehicles of the RELEASE `device-sim`
//!   (built by the test if needed, see `release_device_sim`) at 0.2 Hz through the bridge's
//!   embedded broker and the bridge: every one reaches the page, the map is dragged while they
//!   move (prints frame interval p50 / p95 / max and draw time, `FRAME TIMES through the
//!   pipeline`), a real click on the canvas selects the vehicle under it, the list searches
//!   among 10,000 ids; saves `page-10k.png`.
//! - `page_alone_with_10k_injected_vehicles` (`#[ignore]`d, a benchmark of the page alone): the
//!   same 10,000 vehicles fed to the page's own event handlers (see `synthetic_fleet`) at 1 Hz,
//!   no vehicles behind them: `cargo test --release -p tests --test page_dispatcher
//!   page_alone -- --ignored --nocapture` (BENCHMARKS.md, "Dispatcher page").
//!
//! Screenshots go to `artifacts/` in the cargo target directory (or `$FLEETBEAT_ARTIFACTS`);
//! their paths are printed. The tests run one after the other (one browser at a time: frame
//! times are measured).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tests::WAIT;
use tests::page::Page;
use tests::process::Program;
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

    page.close_clean().await;
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

/// How many vehicles the 10k tests put on the page.
const FLEET_10K: u64 = 10_000;

/// The heartbeat rate of the 10k pipeline test, per vehicle: 0.2 Hz is 2,000 sealed heartbeats
/// a second, which the DEBUG bridge (the one `cargo test` builds) verifies, records and
/// batches to the page on two shared cores with room to spare (about one core).
const RATE_10K: &str = "0.2";

/// Bound on building the release `device-sim` (a cold build takes about 90 s on two cores;
/// other builds may hold the target directory's lock meanwhile).
const RELEASE_BUILD_WAIT: Duration = Duration::from_secs(900);

/// Bound on 10,000 vehicles connecting and all reaching the page.
const FLEET_10K_WAIT: Duration = Duration::from_secs(180);

/// The release `device-sim`, built first with `cargo build --release -p device-sim --bin
/// device-sim` into the cargo target directory of the running test (a no-op when it is up to
/// date, e.g. after `.ci/run` built it): 10,000 MQTT connections from a debug build take
/// minutes to open, from a release build seconds.
async fn release_device_sim() -> anyhow::Result<PathBuf> {
    // The test binary lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().context("locating the test binary")?;
    let target = exe
        .ancestors()
        .nth(3)
        .context("the test binary is not in <target>/<profile>/deps")?
        .to_path_buf();
    let mut cmd = tokio::process::Command::from(tests::bin::cargo());
    cmd.args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "device-sim",
        "--bin",
        "device-sim",
    ])
    .arg("--target-dir")
    .arg(&target)
    .kill_on_drop(true);
    let started = Instant::now();
    let status = tokio::time::timeout(RELEASE_BUILD_WAIT, cmd.status())
        .await
        .with_context(|| {
            format!("cargo build --release -p device-sim: not done within {RELEASE_BUILD_WAIT:?}")
        })?
        .context("running cargo build --release -p device-sim")?;
    if !status.success() {
        bail!("cargo build --release -p device-sim failed: {status}");
    }
    let path = target.join("release").join("device-sim");
    anyhow::ensure!(path.exists(), "{} was not built", path.display());
    eprintln!(
        "release device-sim ready in {:?}: {}",
        started.elapsed(),
        path.display()
    );
    Ok(path)
}

/// Prints a `FRAME TIMES` line (`what`: how the vehicles were fed) and checks that frames kept
/// coming with every vehicle drawn.
fn report_frames(what: &str, frames: &Value) {
    let (interval, draw) = (&frames["frameInterval"], &frames["draw"]);
    let ms = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "FRAME TIMES {what}, {} vehicles drawn, dragging the map: frame interval p50 {:.1} ms, \
         p95 {:.1} ms, max {:.1} ms ({} frames); vehicle layer draw p50 {:.1} ms, p95 {:.1} ms, \
         max {:.1} ms",
        frames["rendered"],
        ms(&interval["p50"]),
        ms(&interval["p95"]),
        ms(&interval["max"]),
        interval["count"],
        ms(&draw["p50"]),
        ms(&draw["p95"]),
        ms(&draw["max"]),
    );
    assert_eq!(frames["rendered"], FLEET_10K, "{frames}");
    // The page keeps drawing while dragged with every vehicle in view. How fast is a benchmark
    // figure, not a test assertion (a loaded CI machine made a frame-time bound flaky): the
    // FRAME TIMES line is the figure of BENCHMARKS.md, "Dispatcher page"; here only that frames
    // kept coming and the draw finished.
    assert!(
        interval["count"].as_u64().is_some_and(|n| n >= 10),
        "the page stopped drawing while dragged: {frames}"
    );
    assert!(interval["p50"].as_f64().is_some(), "{frames}");
}

/// Frame times while the map is dragged back and forth for 5 s.
async fn drag_frames(page: &mut Page) -> anyhow::Result<Value> {
    page.call(
        json!({ "op": "frames", "ms": 5000 }),
        Duration::from_secs(60),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_stays_interactive_with_10k_vehicles() -> anyhow::Result<()> {
    let _one_browser = ONE_BROWSER.lock().await;
    let _one_browser = BROWSER.lock().await;
    let sim_path = release_device_sim().await?;
    let bridge = start_bridge(&[]).await?;
    let mut page = Page::open(&format!("{}/", bridge.url())).await?;
    page.login(TOKEN).await?;
    page.wait_stats("s.connected && s.rooms.includes('all')", WAIT)
        .await?;

    // 10,000 real MQTT connections (fleet `city`, ids city-0001 ... city-10000) from the
    // release simulator, sealed heartbeats every 5 s, through the embedded broker and the
    // bridge to the page.
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&sim_path);
    cmd.arg("--broker")
        .arg(bridge.mqtt.to_string())
        .args(["--vehicles", &FLEET_10K.to_string(), "--fleet", "city"])
        .args(["--rate", RATE_10K]);
    let mut sim = Program::spawn("device-sim (release)", cmd)?;
    let all_there = format!(
        "s.vehicles === {FLEET_10K} && s.rendered === {FLEET_10K} && s.statuses.online === {FLEET_10K}"
    );
    let stats = page
        .wait_stats(&all_there, FLEET_10K_WAIT)
        .await
        .with_context(|| format!("device-sim log:\n{}", tail(&sim.log_text(), 20)))?;
    eprintln!(
        "{FLEET_10K} device-sim vehicles on the page {:?} after the simulator started: {stats}",
        started.elapsed()
    );
    // Every one of them, by id, with a position that came through the pipeline. Awaited, not
    // read once: on a loaded machine a vehicle whose heartbeat came late is marked stale by the
    // bridge and online again at its next one (a CI run caught one such vehicle right after the
    // counters above), so the page shows it online again within the bound.
    let missing = format!(
        "(() => {{ const missing = []; for (let i = 1; i <= {FLEET_10K}; i++) {{ \
           const id = `city-${{String(i).padStart(4, '0')}}`; const v = window.__fleetbeat.vehicle(id); \
           if (!v || v.status !== 'online' || !v.position) missing.push(v ?? id); }} return missing; }})()"
    );
    if let Err(e) = page.wait(&format!("{missing}.length === 0"), WAIT).await {
        let left = page.eval(&missing).await?;
        bail!(
            "vehicles the page does not show online with a position after {WAIT:?}: {left} ({e:#})"
        );
    }
    // They keep coming: every vehicle heartbeats again (position batches keep arriving).
    let batches = stats["batches"].as_u64().unwrap_or(0);
    page.wait_stats(&format!("s.batches >= {batches} + 20"), WAIT)
        .await?;

    // Frame times while the map is dragged back and forth for 5 s, every vehicle in view, the
    // bridge's batches arriving and the vehicles gliding.
    let frames = drag_frames(&mut page).await?;
    report_frames(
        &format!("through the pipeline (release device-sim at {RATE_10K} Hz, debug bridge)"),
        &frames,
    );

    // Interactive: a real click on the canvas selects the vehicle drawn under the pointer.
    let at = page.vehicle_point("city-0042").await?;
    page.mouse("click", &at).await?;
    let picked = page.wait_stats("s.selected", WAIT).await?;
    let selected = picked["selected"].as_str().unwrap_or_default().to_owned();
    let now_at = page
        .eval(&format!("window.__fleetbeat.screenPoint('{selected}')"))
        .await?;
    let distance = (now_at["x"].as_f64().unwrap_or(f64::MAX) - at["x"].as_f64().unwrap_or(0.0))
        .hypot(now_at["y"].as_f64().unwrap_or(f64::MAX) - at["y"].as_f64().unwrap_or(0.0));
    eprintln!("clicked city-0042 at {at}, selected {selected} drawn {distance:.1} px away");
    // The hit radius is 12 px; the vehicles glide a little between the click and the read.
    assert!(
        distance <= 24.0,
        "selected {selected} is {distance} px from the click"
    );
    page.wait(
        &format!("document.getElementById('d-id').textContent === '{selected}'"),
        WAIT,
    )
    .await
    .context("the selected vehicle's details")?;

    // The list stays fast: search among 10,000 ids.
    page.search(
        "city-9999",
        "rows.length === 1 && rows[0].dataset.id === 'city-9999'",
    )
    .await?;
    page.fill("#search", "").await?;
    page.screenshot("page-10k.png").await?;
    assert!(sim.is_running(), "device-sim exited:\n{}", sim.log_text());
    page.close_clean().await;
    Ok(())
}

/// The last `n` lines of `log`.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of the page alone: cargo test --release -p tests --test page_dispatcher page_alone -- --ignored --nocapture"]
async fn page_alone_with_10k_injected_vehicles() -> anyhow::Result<()> {
    let _one_browser = ONE_BROWSER.lock().await;
    let _one_browser = BROWSER.lock().await;
    // What this measures is the page alone: 10,000 vehicles fed to it through its own event
    // handlers (see `synthetic_fleet`), no vehicles behind them, while it stays connected to a
    // real bridge.
    let bridge = start_bridge(&[]).await?;
    let mut page = Page::open(&format!("{}/", bridge.url())).await?;
    page.login(TOKEN).await?;
    page.wait_stats("s.connected && s.rooms.includes('all')", WAIT)
        .await?;
    page.eval(&synthetic_fleet(FLEET_10K)).await?;
    let stats = page
        .wait_stats(
            &format!("s.vehicles >= {FLEET_10K} && s.rendered >= {FLEET_10K}"),
            WAIT,
        )
        .await?;
    assert_eq!(stats["vehicles"], FLEET_10K);
    // Let the map fit the fleet and the feed run for a moment before measuring.
    page.wait_stats("s.batches >= 20", WAIT).await?;
    let frames = drag_frames(&mut page).await?;
    report_frames("of the page alone (injected, 1 Hz)", &frames);
    page.search("city-09999", "rows.length === 1").await?;
    page.fill("#search", "").await?;
    page.screenshot("page-10k-injected.png").await?;
    page.close_clean().await;
    Ok(())
}
