// The dashboard in a real browser: Debian's headless Chromium, driven by
// playwright-core, against a running `wsbridge demo` (scripts/browser-test
// starts it and passes its URLs in the environment).
//
//   DASHBOARD_URL  the admin listener's dashboard, http://127.0.0.1:PORT/
//   CALLER_URL     a caller URL of the bridge, http://127.0.0.1:PORT/x
//   SCREENSHOT     where to save the screenshot (PNG)
//   BRIDGE_PID     the demo's pid: stopped at the end to see the "unreachable" banner
//   CHROMIUM       the browser (default /usr/bin/chromium)
//
// Every check prints what it expected and what it got; the first failure
// exits non-zero.

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";

const WAIT = 20_000; // the longest any one wait may take
const REQUESTS = 200;
let browser = null;
let profile = null;
let passed = 0;

class CheckFailed extends Error {}

function report(what, expected, got) {
  console.error(`FAIL ${what}\n  expected: ${expected}\n  got:      ${got}`);
  console.error(`dashboard test: ${passed} passed, 1 failed`);
}

function fail(what, expected, got) {
  report(what, expected, got);
  throw new CheckFailed(what);
}

function check(what, expected, got, ok) {
  if (!ok) fail(what, expected, got);
  passed++;
  console.log(`ok   ${what} (expected ${expected}, got ${got})`);
}

async function cleanup() {
  if (browser) await browser.close().catch(() => {});
  browser = null;
  if (profile) rmSync(profile, { recursive: true, force: true });
  profile = null;
}

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v == null) {
    report(`environment variable ${name}`, "set", "unset");
    process.exit(1);
  }
  return v;
};
const DASHBOARD_URL = env("DASHBOARD_URL");
const CALLER_URL = env("CALLER_URL");
const SCREENSHOT = env("SCREENSHOT", "target/dashboard.png");
const BRIDGE_PID = process.env.BRIDGE_PID ? Number(process.env.BRIDGE_PID) : null;
const CHROMIUM = env("CHROMIUM", "/usr/bin/chromium");

// Waits (bounded) until fn(arg) is truthy in the page; fails the check with
// what the page showed instead when it never is.
async function waitIn(page, what, expected, fn, arg, shown) {
  try {
    await page.waitForFunction(fn, arg, { timeout: WAIT, polling: 100 });
  } catch {
    fail(what, expected, `${await page.evaluate(shown, arg).catch((e) => e.message)} after ${WAIT / 1000}s`);
  }
  check(what, expected, await page.evaluate(shown, arg), true);
}

const overall = setTimeout(() => {
  report("whole test", "done within 120s", "still running");
  cleanup().finally(() => process.exit(1));
}, 120_000);

async function main() {
  profile = mkdtempSync(join(tmpdir(), "wsbridge-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1440, height: 1000 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: WAIT,
  });
  browser = context;
  const page = context.pages()[0] ?? (await context.newPage());
  const consoleErrors = [];
  page.on("console", (m) => {
    if (m.type() === "error") consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));

  // 1. The page loads and renders.
  const res = await page.goto(DASHBOARD_URL, { waitUntil: "load", timeout: WAIT });
  check("GET / status", 200, res?.status(), res?.status() === 200);
  const type = res.headers()["content-type"] ?? "";
  check("GET / content type", "text/html", type, type.startsWith("text/html"));
  const title = await page.title();
  check("page title", "contains 'wsbridge'", JSON.stringify(title), title.includes("wsbridge"));
  const requests = await page.evaluate(() => performance.getEntriesByType("resource").map((r) => r.name));
  const external = requests.filter((u) => !u.startsWith(new URL(DASHBOARD_URL).origin) && !u.startsWith("data:"));
  check("no external assets", "none", external.length ? external.join(", ") : "none", external.length === 0);

  await waitIn(page, "first poll rendered", "a version in the header",
    () => /\d/.test(document.getElementById("version")?.textContent ?? ""), null,
    () => JSON.stringify(document.getElementById("version")?.textContent));
  await waitIn(page, "connection indicator", "'live'",
    () => document.getElementById("conn")?.textContent === "live", null,
    () => JSON.stringify(document.getElementById("conn")?.textContent));
  const banner = await page.locator("#banner").isVisible();
  check("unreachable banner while the bridge is up", "hidden", banner ? "visible" : "hidden", !banner);

  // 2. The demo's echo worker is in the worker table.
  const row = '#workers tbody tr[data-worker-id="demo-echo"]';
  await waitIn(page, "worker table shows demo-echo", "a row for demo-echo",
    (sel) => !!document.querySelector(sel), row,
    () => JSON.stringify([...document.querySelectorAll("#workers tbody tr")].map((r) => r.dataset.workerId ?? r.textContent)));
  const state = await page.locator(`${row} td[data-col="state"]`).textContent();
  check("demo-echo state", "ready", state, state === "ready");
  const services = await page.locator(`${row} td[data-col="services"]`).textContent();
  check("demo-echo services", "non-empty", JSON.stringify(services), services.trim().length > 0);
  const svcRows = await page.locator("#services tbody tr[data-service]").count();
  check("services table rows", ">= 1", svcRows, svcRows >= 1);
  // A single bridge (no [cluster]) shows no cluster card.
  const clusterShown = await page.evaluate(() => !document.getElementById("cluster-card").hidden);
  check("cluster card of a single node", "hidden", clusterShown ? "visible" : "hidden", !clusterShown);

  const totalOf = () => page.evaluate(() => Number(document.getElementById("total-requests").dataset.value));
  const before = await totalOf();
  check("displayed total requests is a number", "a number >= 0", before, Number.isFinite(before) && before >= 0);

  // 3. Real traffic: REQUESTS POSTs over a few seconds (4 at a time, paced),
  //    so the 1-second polls see a rate.
  let sent = 0, okCount = 0, firstBad = null;
  const lane = async (n) => {
    for (let i = 0; i < n; i++) {
      const r = await fetch(CALLER_URL, { method: "POST", body: `hello ${sent++}`, signal: AbortSignal.timeout(10_000) });
      const body = await r.text();
      if (r.status === 200) okCount++;
      else firstBad ??= `${r.status} ${body.slice(0, 200)}`;
      await new Promise((done) => setTimeout(done, 40));
    }
  };
  const started = Date.now();
  await Promise.all([0, 1, 2, 3].map(() => lane(REQUESTS / 4)));
  console.log(`     sent ${REQUESTS} requests in ${((Date.now() - started) / 1000).toFixed(1)}s`);
  check("bridge answered every request", `${REQUESTS} x 200`, firstBad ? `${okCount} x 200, first other: ${firstBad}` : `${okCount} x 200`, okCount === REQUESTS);

  await waitIn(page, "displayed total requests increased", `>= ${before + REQUESTS}`,
    (want) => Number(document.getElementById("total-requests").dataset.value) >= want, before + REQUESTS,
    () => document.getElementById("total-requests").dataset.value);
  await waitIn(page, "req/s chart drew a rate", "peak > 0",
    () => Number(document.getElementById("chart-rps").dataset.max) > 0, null,
    () => document.getElementById("chart-rps").dataset.max);
  await waitIn(page, "latency chart drew p50/p99", "max > 0",
    () => Number(document.getElementById("chart-latency").dataset.max) > 0, null,
    () => document.getElementById("chart-latency").dataset.max);
  const served = Number((await page.locator(`${row} td[data-col="served"]`).textContent()).replace(/,/g, ""));
  check("demo-echo served", `>= ${REQUESTS}`, served, served >= REQUESTS);
  const shown = await page.locator("#total-requests").textContent();
  check("total requests text", "digits", JSON.stringify(shown), /^\d[\d,]*$/.test(shown));

  // Two more polls so the charts show the rate falling back, then the picture.
  await page.waitForTimeout(2_000);
  mkdirSync(dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  console.log(`     screenshot: ${SCREENSHOT}`);
  check("console errors", "none", consoleErrors.length ? consoleErrors.join(" | ") : "none", consoleErrors.length === 0);

  // 4. The bridge goes away: the page says so and keeps retrying.
  if (BRIDGE_PID) {
    process.kill(BRIDGE_PID, "SIGTERM");
    await waitIn(page, "banner once the bridge is gone", "visible, says 'unreachable'",
      () => {
        const b = document.getElementById("banner");
        return b.classList.contains("show") && /unreachable/i.test(b.textContent);
      }, null,
      () => JSON.stringify(document.getElementById("banner").textContent));
    const conn = await page.locator("#conn").textContent();
    check("connection indicator", "unreachable", conn, conn === "unreachable");
    const errs = consoleErrors.filter((e) => !/Failed to load resource|ERR_CONNECTION_REFUSED|Failed to fetch/i.test(e));
    check("page errors apart from the failed fetches", "none", errs.length ? errs.join(" | ") : "none", errs.length === 0);
  }

  await cleanup();
  clearTimeout(overall);
  console.log(`dashboard test: ${passed} passed, 0 failed`);
}

main().catch(async (e) => {
  if (!(e instanceof CheckFailed)) report("unexpected error", "none", e?.stack ?? e);
  await cleanup();
  process.exit(1);
});
