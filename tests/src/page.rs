//! The dispatcher page (`/`) and the vendor page (`/vendor`) in a real headless Chromium
//! (Debian's `chromium`, driven by `tests/node/page-driver.mjs` through npm's
//! `playwright-core`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::WAIT;
use crate::node::node_dir;
use crate::peer::Peer;

/// Bound on starting Chromium.
const LAUNCH_WAIT: Duration = Duration::from_secs(90);

/// Where screenshots go: `$FLEETBEAT_ARTIFACTS`, or `artifacts/` in the cargo target directory
/// the running test was built in (`target/artifacts`, or `$CARGO_TARGET_DIR/artifacts`).
pub fn artifacts_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLEETBEAT_ARTIFACTS") {
        return PathBuf::from(dir);
    }
    // The test binary lives in <target>/<profile>/deps/.
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(|t| t.join("artifacts")))
        .unwrap_or_else(|| crate::workspace().join("target/artifacts"))
}

/// The path of screenshot `name` in [`artifacts_dir`].
fn artifact(name: &str) -> PathBuf {
    artifacts_dir().join(name)
}

/// The page in a headless Chromium, driven by `tests/node/page-driver.mjs`.
pub struct Page {
    driver: Peer,
    next_id: u64,
    /// Console errors and warnings, page errors and blocked external requests, as reported.
    problems: Vec<Value>,
}

impl Page {
    /// Starts Chromium with a fresh profile and opens `url`.
    ///
    /// # Errors
    /// If node or Chromium cannot be started, or the page does not load.
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        let mut page = Self {
            driver: Peer::node("page-driver", &node_dir()?, "page-driver.mjs", &[])?,
            next_id: 1,
            problems: Vec::new(),
        };
        let launched = page
            .call(
                json!({ "op": "launch", "width": 1440, "height": 900 }),
                // Chromium's first start on a busy 2-core machine (two page tests start one
                // each at the same time) can take longer than an ordinary step.
                LAUNCH_WAIT,
            )
            .await
            .context("launching chromium (apt-get install chromium)")?;
        eprintln!("chromium {}", launched["version"]);
        page.call(json!({ "op": "goto", "url": url }), WAIT).await?;
        Ok(page)
    }

    /// Sends one command and waits (at most `timeout`) for its reply's value.
    ///
    /// # Errors
    /// If the driver reports a failure, exits, or does not answer in time.
    pub async fn call(&mut self, mut command: Value, timeout: Duration) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        command["id"] = json!(id);
        let op = command["op"].clone();
        self.driver
            .send_json(&command)
            .await
            .context("writing to the page driver")?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = match self.driver.next_until(deadline).await {
                Ok(Some(msg)) => msg,
                Ok(None) => bail!("the page driver exited during {op}"),
                Err(_) => bail!("no reply to {op} within {timeout:?}"),
            };
            if msg["id"] == id {
                if msg["ok"] == true {
                    return Ok(msg["value"].clone());
                }
                bail!("{op} failed: {}", msg["error"]);
            }
            if msg.get("type").is_some() {
                eprintln!("[page] {msg}");
                self.problems.push(msg);
            }
        }
    }

    /// A command whose reply carries nothing of interest, within the bound.
    async fn act(&mut self, command: Value) -> anyhow::Result<()> {
        self.call(command, WAIT).await.map(drop)
    }

    /// The value of a JS expression in the page.
    ///
    /// # Errors
    /// If it throws, or the driver does not answer within the bound.
    pub async fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        self.call(json!({ "op": "eval", "expr": expr }), WAIT).await
    }

    /// Waits until a JS expression is truthy in the page; returns its value.
    ///
    /// # Errors
    /// If it is not truthy within `timeout`.
    pub async fn wait(&mut self, expr: &str, timeout: Duration) -> anyhow::Result<Value> {
        let ms = timeout.as_millis() as u64;
        self.call(
            json!({ "op": "wait", "expr": expr, "timeoutMs": ms }),
            timeout + Duration::from_secs(5),
        )
        .await
    }

    /// Waits until the dispatcher page's `stats()` satisfies `condition` (a JS expression over
    /// `s`).
    ///
    /// # Errors
    /// If it does not within `timeout`; the error carries the last stats.
    pub async fn wait_stats(
        &mut self,
        condition: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.wait_hook_stats("__fleetbeat", condition, timeout)
            .await
    }

    /// Waits until the vendor page's `window.__fleetbeatVendor.stats()` satisfies `condition`
    /// (a JS expression over `s`).
    ///
    /// # Errors
    /// If it does not within `timeout`; the error carries the last stats.
    pub async fn wait_vendor_stats(
        &mut self,
        condition: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.wait_hook_stats("__fleetbeatVendor", condition, timeout)
            .await
    }

    /// Waits until `window[hook].stats()` satisfies `condition` (a JS expression over `s`).
    async fn wait_hook_stats(
        &mut self,
        hook: &str,
        condition: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let expr = format!(
            "(() => {{ const s = window.{hook}?.stats(); return s && ({condition}) && s; }})()"
        );
        match self.wait(&expr, timeout).await {
            Ok(stats) => Ok(stats),
            Err(err) => {
                let last = self
                    .eval(&format!("window.{hook}?.stats() ?? null"))
                    .await?;
                Err(err.context(format!("waiting for stats where {condition}; last: {last}")))
            }
        }
    }

    /// Loads `url` in the same tab (a reload, when it is the page's own address): the tab's
    /// session storage stays.
    ///
    /// # Errors
    /// If it does not load within the bound.
    pub async fn goto(&mut self, url: &str) -> anyhow::Result<()> {
        self.act(json!({ "op": "goto", "url": url })).await
    }

    /// Waits until the element with id `id` is shown and returns its text.
    ///
    /// # Errors
    /// If it is not shown within the bound.
    pub async fn shown_text(&mut self, id: &str) -> anyhow::Result<String> {
        let text = self
            .wait(
                &format!(
                    "(() => {{ const e = document.getElementById('{id}'); return !e.hidden && e.textContent; }})()"
                ),
                WAIT,
            )
            .await?;
        Ok(text.as_str().unwrap_or_default().to_owned())
    }

    /// Types `value` into the field `selector`.
    ///
    /// # Errors
    /// If there is no such field.
    pub async fn fill(&mut self, selector: &str, value: &str) -> anyhow::Result<()> {
        self.act(json!({ "op": "fill", "selector": selector, "value": value }))
            .await
    }

    /// Clicks the element `selector`.
    ///
    /// # Errors
    /// If there is no such element.
    pub async fn click(&mut self, selector: &str) -> anyhow::Result<()> {
        self.act(json!({ "op": "click", "selector": selector }))
            .await
    }

    /// Chooses `value` in the select box `selector`.
    ///
    /// # Errors
    /// If there is no such select box or value.
    pub async fn select(&mut self, selector: &str, value: &str) -> anyhow::Result<()> {
        self.act(json!({ "op": "select", "selector": selector, "value": value }))
            .await
    }

    /// A real mouse event: `action` is `click` or `move` at `at` (`{x, y}`).
    ///
    /// # Errors
    /// If the driver fails.
    pub async fn mouse(&mut self, action: &str, at: &Value) -> anyhow::Result<()> {
        self.act(json!({ "op": "mouse", "action": action, "x": at["x"], "y": at["y"] }))
            .await
    }

    /// Turns the mouse wheel by `dy`.
    ///
    /// # Errors
    /// If the driver fails.
    pub async fn wheel(&mut self, dy: i64) -> anyhow::Result<()> {
        self.act(json!({ "op": "mouse", "action": "wheel", "dy": dy }))
            .await
    }

    /// Types `text` into the vehicle list's search box and waits until the list's visible
    /// rows satisfy `condition` (a JS expression over `rows`).
    ///
    /// # Errors
    /// If they do not within the bound.
    pub async fn search(&mut self, text: &str, condition: &str) -> anyhow::Result<()> {
        self.fill("#search", text).await?;
        let expr = format!(
            "(() => {{ const rows = document.querySelectorAll('#list-rows .row:not([hidden])'); return {condition}; }})()"
        );
        self.wait(&expr, WAIT).await.map(drop)
    }

    /// Logs in with `token` through the form.
    ///
    /// # Errors
    /// If the form does not show or cannot be filled in.
    pub async fn login(&mut self, token: &str) -> anyhow::Result<()> {
        self.wait("!document.getElementById('login').hidden", WAIT)
            .await?;
        self.fill("#token", token).await?;
        self.click("#login-submit").await
    }

    /// Submits the sidebar's join form for a room (`fleet`, `vehicle` or `all`).
    async fn submit_join(&mut self, kind: &str, id: &str) -> anyhow::Result<()> {
        self.select("#join-kind", kind).await?;
        if kind != "all" {
            self.fill("#join-id", id).await?;
        }
        self.click("#join-form button[type=submit]").await
    }

    /// Joins a room through the sidebar form (`fleet`, `vehicle` or `all`).
    ///
    /// # Errors
    /// If its chip does not appear within the bound.
    pub async fn join(&mut self, kind: &str, id: &str) -> anyhow::Result<()> {
        self.submit_join(kind, id).await?;
        let room = if kind == "all" {
            "all".to_owned()
        } else {
            format!("{kind}:{id}")
        };
        self.wait_chip(&room, true)
            .await
            .with_context(|| format!("joining {room}"))
    }

    /// Waits until the sidebar shows the chip of `room` (or no longer does, if not `shown`).
    async fn wait_chip(&mut self, room: &str, shown: bool) -> anyhow::Result<()> {
        let not = if shown { "" } else { "!" };
        let expr = format!("{not}document.querySelector('#rooms [data-room=\"{room}\"]')");
        self.wait(&expr, WAIT).await.map(drop)
    }

    /// Tries to join a room the bridge refuses and checks the page says why.
    ///
    /// # Errors
    /// If no error naming the room shows.
    pub async fn join_refused(&mut self, kind: &str, id: &str) -> anyhow::Result<()> {
        self.submit_join(kind, id).await?;
        let error = self.shown_text("join-error").await?;
        if !error.contains(&format!("{kind}:{id}")) {
            bail!("unexpected join error {error:?}");
        }
        Ok(())
    }

    /// Leaves a room with the × of its chip.
    ///
    /// # Errors
    /// If the chip does not go within the bound.
    pub async fn leave(&mut self, room: &str) -> anyhow::Result<()> {
        self.click(&format!("#rooms [data-leave=\"{room}\"]"))
            .await?;
        self.wait_chip(room, false)
            .await
            .with_context(|| format!("leaving {room}"))
    }

    /// Waits until vehicle `id` has `status` (`online`, `stale`, `offline`) on the page;
    /// returns what the page knows of it.
    ///
    /// # Errors
    /// If it does not within `timeout`.
    pub async fn vehicle_status(
        &mut self,
        id: &str,
        status: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let expr = format!(
            "(() => {{ const v = window.__fleetbeat.vehicle('{id}'); return v && v.status === '{status}' && v; }})()"
        );
        self.wait(&expr, timeout).await
    }

    /// Where vehicle `id` is drawn on the canvas, once it is (`{x, y}`).
    ///
    /// # Errors
    /// If it is not drawn within the bound.
    pub async fn vehicle_point(&mut self, id: &str) -> anyhow::Result<Value> {
        self.wait(&format!("window.__fleetbeat.screenPoint('{id}')"), WAIT)
            .await
    }

    /// Clicks vehicle `id` where the canvas drew it (a real click, through hit testing).
    ///
    /// # Errors
    /// If it is not drawn within the bound.
    pub async fn click_vehicle(&mut self, id: &str) -> anyhow::Result<()> {
        let at = self.vehicle_point(id).await?;
        self.mouse("click", &at).await
    }

    /// Saves a screenshot as [`artifact`] `name` and returns its path.
    ///
    /// # Errors
    /// If it cannot be taken or saved.
    pub async fn screenshot(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        let path = artifact(name);
        self.act(json!({ "op": "screenshot", "path": path.to_string_lossy() }))
            .await?;
        eprintln!("screenshot: {}", path.display());
        Ok(path)
    }

    /// Console errors, page errors and external requests seen so far, after draining what
    /// the driver reported since the last call.
    pub fn problems(&mut self) -> Vec<Value> {
        while let Some(msg) = self.driver.try_next() {
            if msg.get("type").is_some() {
                self.problems.push(msg);
            }
        }
        self.problems
            .iter()
            .filter(|p| p["type"] != "console" || p["level"] == "error")
            .cloned()
            .collect()
    }

    /// Asserts that the page logged no console or page errors and asked nothing of the
    /// outside, then closes it.
    ///
    /// # Panics
    /// If it did, listing what.
    pub async fn close_clean(mut self) {
        let problems = self.problems();
        assert!(
            problems.is_empty(),
            "console errors, page errors or requests to the outside: {problems:#?}"
        );
        self.close().await;
    }

    /// Closes the browser and the driver.
    pub async fn close(mut self) {
        let _ = self
            .call(json!({ "op": "exit" }), Duration::from_secs(10))
            .await;
        self.driver.finish(Duration::from_secs(10)).await;
    }
}
