// Drives the dispatcher page in a real headless Chromium (Debian's `chromium`, through npm's
// `playwright-core`, which downloads no browser), one JSON command per stdin line, for the Rust
// tests in tests/tests/page_*.rs.
//
// Usage: node page-driver.mjs
// stdin, one JSON object per line, each with an "id" the reply carries back:
//   {"id":1,"op":"launch","width":1440,"height":900}  start Chromium with a fresh profile
//   {"id":2,"op":"goto","url":"http://127.0.0.1:PORT/"}
//   {"id":3,"op":"eval","expr":"window.__fleetbeat.stats()"}        value of a JS expression
//   {"id":4,"op":"wait","expr":"...","timeoutMs":5000}               until the expression is truthy
//   {"id":5,"op":"fill","selector":"#token","value":"x"} / "click" / "press" (+"key") / "select"
//   {"id":6,"op":"mouse","action":"click","x":10,"y":20}
//   {"id":7,"op":"frames","ms":5000}       frame times while dragging and zooming the map
//   {"id":8,"op":"screenshot","path":"/abs/page.png"}
//   {"id":9,"op":"exit"}
// stdout, one JSON object per line:
//   {"id":1,"ok":true,"value":...} or {"id":1,"ok":false,"error":"..."}
//   {"type":"console","level":"error","text":"..."}  {"type":"pageerror","message":"..."}
//   {"type":"external-request","url":"..."}  (blocked: the page must not leave 127.0.0.1)
import { execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { chromium } from "playwright-core";
import { out, readCommands } from "./harness.mjs";

function chromiumPath() {
  if (process.env.CHROMIUM_PATH) return process.env.CHROMIUM_PATH;
  for (const name of ["chromium", "chromium-browser"]) {
    try {
      return execFileSync("which", [name], { encoding: "utf8" }).trim();
    } catch {
      // try the next name
    }
  }
  throw new Error("no chromium in PATH (apt-get install chromium)");
}

let context = null;
let page = null;
let profile = null;

const LOCAL = new Set(["127.0.0.1", "localhost", "[::1]"]);

async function launch({ width = 1440, height = 900 }) {
  profile = mkdtempSync(join(tmpdir(), "fleetbeat-chromium-"));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath(),
    headless: true,
    viewport: { width, height },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
    ],
  });
  // Nothing may come from outside: block it, and tell the test.
  await context.route("**/*", (route) => {
    const url = new URL(route.request().url());
    if (url.protocol === "data:" || LOCAL.has(url.hostname)) return route.continue();
    out({ type: "external-request", url: url.href });
    return route.abort();
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (msg) => {
    if (msg.type() === "error" || msg.type() === "warning") out({ type: "console", level: msg.type(), text: msg.text() });
  });
  page.on("pageerror", (err) => out({ type: "pageerror", message: String(err) }));
  return { version: context.browser()?.version() ?? null };
}

/** Frame times while a person pans and zooms: drags the map around its centre for `ms`. */
async function frames({ ms = 5000 }) {
  const box = await page.locator("#map").boundingBox();
  const cx = box.x + box.width / 2;
  const cy = box.y + box.height / 2;
  await page.evaluate(() => window.__fleetbeat.startFrameProbe());
  const end = Date.now() + ms;
  let i = 0;
  while (Date.now() < end) {
    const dx = 120 * Math.cos(i);
    const dy = 80 * Math.sin(i);
    await page.mouse.move(cx, cy);
    await page.mouse.down();
    for (let s = 1; s <= 10; s++) await page.mouse.move(cx + (dx * s) / 10, cy + (dy * s) / 10);
    for (let s = 9; s >= 0; s--) await page.mouse.move(cx + (dx * s) / 10, cy + (dy * s) / 10);
    await page.mouse.up();
    i++;
  }
  return page.evaluate(() => window.__fleetbeat.stopFrameProbe());
}

/**
 * Polls a JS expression until it is truthy and returns its value. (Not `waitForFunction`: that
 * evaluates strings with `eval`, which the page's Content-Security-Policy rightly forbids.)
 */
async function waitFor(expr, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await page.evaluate(expr);
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`not true within ${timeoutMs} ms: ${expr}; last value ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function handle(cmd) {
  switch (cmd.op) {
    case "launch":
      return launch(cmd);
    case "goto":
      await page.goto(cmd.url, { waitUntil: "load", timeout: cmd.timeoutMs ?? 20000 });
      return null;
    case "eval":
      return page.evaluate(cmd.expr);
    case "wait":
      return waitFor(cmd.expr, cmd.timeoutMs ?? 20000);
    case "fill":
      await page.fill(cmd.selector, cmd.value, { timeout: cmd.timeoutMs ?? 5000 });
      return null;
    case "click":
      await page.click(cmd.selector, { timeout: cmd.timeoutMs ?? 5000 });
      return null;
    case "press":
      await page.press(cmd.selector, cmd.key, { timeout: cmd.timeoutMs ?? 5000 });
      return null;
    case "select":
      await page.selectOption(cmd.selector, cmd.value, { timeout: cmd.timeoutMs ?? 5000 });
      return null;
    case "mouse":
      if (cmd.action === "click") await page.mouse.click(cmd.x, cmd.y);
      else if (cmd.action === "move") await page.mouse.move(cmd.x, cmd.y);
      else if (cmd.action === "wheel") await page.mouse.wheel(0, cmd.dy ?? 0);
      return null;
    case "frames":
      return frames(cmd);
    case "screenshot":
      mkdirSync(dirname(cmd.path), { recursive: true });
      await page.screenshot({ path: cmd.path });
      return cmd.path;
    case "exit":
      await shutdown(0);
      return null;
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

async function shutdown(code) {
  try {
    await context?.close();
  } finally {
    if (profile) rmSync(profile, { recursive: true, force: true });
    process.exit(code);
  }
}

// Commands run one at a time, in order.
let queue = Promise.resolve();
readCommands(
  (cmd) => {
    queue = queue.then(async () => {
      try {
        out({ id: cmd.id, ok: true, value: (await handle(cmd)) ?? null });
      } catch (err) {
        out({ id: cmd.id, ok: false, error: String(err?.message ?? err) });
      }
    });
  },
  {
    bad: (error) => out({ id: null, ok: false, error }),
    // The test closing stdin means it is over.
    done: () => queue.then(() => shutdown(0)),
  },
);
