// Workers in browser tabs: Debian's headless Chromium, driven by
// playwright-core, opens examples/browser/index.html (which uses
// examples/browser/wsbridge-worker.js) in tabs that connect to a real
// `wsbridge serve` over wss as workers, and Node calls them over plain HTTP.
//
//   WSBRIDGE_BIN  the wsbridge binary (scripts/browser-test builds it)
//   CHROMIUM      the browser (default /usr/bin/chromium)
//
// Everything runs on loopback: two static page servers (the allowed origin
// and a foreign one), the bridge (its config written here, a self-signed
// certificate made at start-up, which Chromium takes with
// --ignore-certificate-errors), and the browser. Each check prints PASS or
// FAIL with what it expected and got; the run goes on after a failure where
// later checks still mean something, and exits non-zero if any failed.

import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { createServer } from "node:http";
import { mkdtempSync, readFileSync, rmSync, writeFileSync, openSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, extname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const PAGES = resolve(here, "../../examples/browser");
const BIN = process.env.WSBRIDGE_BIN ?? resolve(here, "../../target/debug/wsbridge");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const WAIT = 15_000; // the longest any one wait may take
const CALLS = 10;

let passed = 0, failed = 0;
let bridgeLog = null; // printed (its end) when a check failed
let bridges = 0;
const cleanups = [];
class Abort extends Error {}

function check(what, expected, got, ok) {
  if (ok) {
    passed++;
    console.log(`PASS ${what} (expected ${expected}, got ${got})`);
  } else {
    failed++;
    console.log(`FAIL ${what}\n  expected: ${expected}\n  got:      ${got}`);
  }
  return ok;
}
// A check the rest cannot do without.
function must(what, expected, got, ok) {
  if (!check(what, expected, got, ok)) throw new Abort(what);
}

async function cleanup() {
  while (cleanups.length) await cleanups.pop()().catch(() => {});
}

const overall = setTimeout(async () => {
  check("whole test", "done within 120s", "still running", false);
  await cleanup();
  process.exit(1);
}, 120_000);

// --- static pages ----------------------------------------------------------------

const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8" };

async function pageServer() {
  const server = createServer((req, res) => {
    const name = new URL(req.url, "http://x").pathname.replace(/^\/+/, "") || "index.html";
    if (!/^[\w.-]+$/.test(name) || !TYPES[extname(name)]) return res.writeHead(404).end();
    try {
      const body = readFileSync(join(PAGES, name));
      res.writeHead(200, { "content-type": TYPES[extname(name)], "cache-control": "no-store" }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((done) => server.listen(0, "127.0.0.1", done));
  cleanups.push(() => new Promise((done) => { server.closeAllConnections(); server.close(done); }));
  return `http://127.0.0.1:${server.address().port}`;
}

// --- the bridge ------------------------------------------------------------------

// Starts `wsbridge serve` on the addresses given (port 0: any free one),
// logging JSON at trace level to its own file.
async function startBridge(work, token, origin, at = { http: "127.0.0.1:0", workers: "127.0.0.1:0", admin: "127.0.0.1:0" }) {
  const config = join(work, "wsbridge.toml");
  writeFileSync(config, `
default_service = "tabs"
shutdown_timeout = "2s"

[http]
listen = "${at.http}"
request_timeout = "10s"
queue_timeout = "2s"

[workers]
listen = "${at.workers}"
tls_cert = "${join(work, "server.crt")}"
tls_key = "${join(work, "server.key")}"
auto_self_signed = true
tokens = [{ token = "${token}", worker_id_prefix = "tab-", services = ["tabs"] }]
allowed_origins = ["${origin}"]

[admin]
listen = "${at.admin}"

[[routes]]
prefix = "/slow"
service = "tabs"
request_timeout = "1s"
`);
  const logPath = join(work, `bridge-${++bridges}.log`);
  const log = openSync(logPath, "w");
  const bridge = spawn(BIN, ["--log-format", "json", "serve", "--config", config], {
    stdio: ["ignore", log, log],
    // trace: the token must stay out of even the most detailed log
    env: { ...process.env, RUST_LOG: "trace,h2=info,hyper=info,hyper_util=info,rustls=debug" },
  });
  bridgeLog = logPath;
  let exited = null;
  bridge.on("exit", (code, signal) => { exited = `exited (${signal ?? code})`; });
  const stop = async () => {
    if (exited) return;
    bridge.kill("SIGTERM");
    await new Promise((done) => { bridge.once("exit", done); setTimeout(() => { bridge.kill("SIGKILL"); done(); }, 5_000); });
  };
  cleanups.push(stop);
  // The addresses it bound (port 0), from its "listener ready" lines.
  const addrs = {};
  const deadline = Date.now() + WAIT;
  while (!(addrs.http && addrs.workers && addrs.admin)) {
    if (exited || Date.now() > deadline) {
      must("bridge start-up", "three 'listener ready' lines", `${exited ?? "timed out"}; log:\n${tail(logPath)}`, false);
    }
    for (const line of readFileSync(logPath, "utf8").split("\n")) {
      if (!line.includes("listener ready")) continue;
      const { fields } = JSON.parse(line);
      const kind = fields.message.startsWith("http") ? "http" : fields.message.startsWith("worker") ? "workers" : "admin";
      addrs[kind] = fields.addr;
    }
    await sleep(50);
  }
  return { ...addrs, logPath, stop, alive: () => !exited };
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
const tail = (path, n = 30) => readFileSync(path, "utf8").trimEnd().split("\n").slice(-n).join("\n");
// Its log without the trace and debug lines.
const infoTail = (path, n = 30) => readFileSync(path, "utf8").split("\n")
  .filter((l) => /"level":"(INFO|WARN|ERROR)"/.test(l)).slice(-n).join("\n");
const base64url = (s) => Buffer.from(s, "utf8").toString("base64url");

// --- the tabs ----------------------------------------------------------------------

async function openTab(context, pageOrigin, { bridgeUrl, token, workerId, metadata }) {
  const page = await context.newPage();
  page.errors = [];
  page.on("pageerror", (e) => page.errors.push(String(e)));
  const res = await page.goto(`${pageOrigin}/index.html`, { waitUntil: "load", timeout: WAIT });
  must(`${workerId}: page loads from ${pageOrigin}`, 200, res?.status(), res?.status() === 200);
  await page.fill("#url", bridgeUrl);
  await page.fill("#token", token);
  await page.fill("#worker-id", workerId);
  await page.fill("#services", "tabs");
  await page.fill("#metadata", metadata);
  await page.click("#connect");
  return page;
}

const stateOf = (page) => page.evaluate(() => `${document.getElementById("status").dataset.state}: ${document.getElementById("status").textContent}`);

async function waitState(page, state, timeout = WAIT) {
  try {
    await page.waitForFunction((s) => document.getElementById("status").dataset.state === s, state, { timeout, polling: 50 });
    return true;
  } catch {
    return false;
  }
}

// --- calls -------------------------------------------------------------------------

async function call(base, path, { method = "POST", body, headers = {} } = {}) {
  const res = await fetch(base + path, { method, body, headers, signal: AbortSignal.timeout(WAIT) });
  const bytes = new Uint8Array(await res.arrayBuffer());
  return { status: res.status, headers: res.headers, bytes, text: new TextDecoder().decode(bytes) };
}

async function presence(base, query = "service=tabs") {
  const r = await call(base, `/_wsbridge/workers?${query}`, { method: "GET" });
  if (r.status !== 200) return { status: r.status, text: r.text, workers: [] };
  return { status: r.status, text: r.text, ...JSON.parse(r.text) };
}

const ids = (workers) => workers.map((w) => w.worker_id).sort().join(",");

// --- the test ------------------------------------------------------------------------

async function main() {
  const work = mkdtempSync(join(tmpdir(), "wsbridge-tabs-"));
  cleanups.push(async () => rmSync(work, { recursive: true, force: true }));
  const allowed = await pageServer();
  const foreign = await pageServer();
  const token = `tabs-${randomBytes(12).toString("hex")}`;
  const bridge = await startBridge(work, token, allowed);
  const callers = `http://${bridge.http}`;
  const bridgeUrl = `wss://${bridge.workers}/`;
  console.log(`     pages: ${allowed} (allowed), ${foreign} (foreign); bridge: callers ${callers}, workers ${bridgeUrl}`);

  const profile = mkdtempSync(join(tmpdir(), "wsbridge-chromium-"));
  cleanups.push(async () => rmSync(profile, { recursive: true, force: true }));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--ignore-certificate-errors", // the bridge's self-signed certificate
    ],
    timeout: WAIT,
  });
  cleanups.push(() => context.close());

  // a. Two tabs connect as tab-1 and tab-2 of service tabs, with metadata.
  const tab1 = await openTab(context, allowed, { bridgeUrl, token, workerId: "tab-1", metadata: "region=eu, user=41" });
  const tab2 = await openTab(context, allowed, { bridgeUrl, token, workerId: "tab-2", metadata: "region=us, user=42" });
  for (const [name, tab] of [["tab-1", tab1], ["tab-2", tab2]]) {
    const ok = await waitState(tab, "ready");
    must(`a. ${name} connects and is welcomed`, "ready", await stateOf(tab), ok);
  }

  // c. Presence lists both, with their metadata.
  const listed = await presence(callers);
  const byId = Object.fromEntries((listed.workers ?? []).map((w) => [w.worker_id, w]));
  check("c. GET /_wsbridge/workers?service=tabs lists both tabs", "200, tab-1,tab-2",
    `${listed.status}, ${ids(listed.workers ?? [])}`, listed.status === 200 && ids(listed.workers) === "tab-1,tab-2");
  const metaShown = JSON.stringify([byId["tab-1"]?.metadata, byId["tab-2"]?.metadata]);
  check("c. presence shows each tab's metadata", '[{"region":"eu","user":"41"},{"region":"us","user":"42"}]', metaShown,
    byId["tab-1"]?.metadata?.region === "eu" && byId["tab-2"]?.metadata?.region === "us" && byId["tab-2"]?.metadata?.user === "42");
  check("c. presence: service, node, capacity", "tabs, local, 4",
    `${byId["tab-2"]?.service}, ${byId["tab-2"]?.node}, ${byId["tab-2"]?.capacity}`,
    byId["tab-2"]?.service === "tabs" && byId["tab-2"]?.node === "local" && byId["tab-2"]?.capacity === 4);
  const filtered = await presence(callers, "service=tabs&meta.region=us");
  check("c. presence filtered by meta.region=us", "tab-2", ids(filtered.workers ?? []) || filtered.text, ids(filtered.workers ?? []) === "tab-2");

  // b. Calls addressed to tab-2 reach tab-2, every time.
  const bad = [];
  for (let i = 0; i < CALLS; i++) {
    const body = `call ${i} for tab-2 ✓`;
    const r = await call(callers, `/hello/${i}?x=${i}`, { body, headers: { "wsbridge-worker": "tab-2", "content-type": "text/plain; charset=utf-8" } });
    const who = r.headers.get("x-echo-worker");
    if (r.status !== 200 || who !== "tab-2" || r.text !== body || r.headers.get("x-echo-path") !== `/hello/${i}?x=${i}`) {
      bad.push(`#${i}: ${r.status} x-echo-worker=${who} body=${JSON.stringify(r.text.slice(0, 80))}`);
    }
  }
  check(`b. ${CALLS} calls with Wsbridge-Worker: tab-2`, `${CALLS} x (200, x-echo-worker: tab-2, body echoed)`,
    bad.length ? `${CALLS - bad.length} ok; ${bad.slice(0, 3).join("; ")}` : `${CALLS} x ok`, bad.length === 0);
  const shown = async (tab) => tab.evaluate(() => [...document.querySelectorAll("#calls tbody tr")].filter((r) => r.dataset.outcome === "replied" && r.cells[3].textContent.startsWith("/hello/")).length);
  const [on1, on2] = [await shown(tab1), await shown(tab2)];
  check("b. the calls show in tab-2's page and not in tab-1's", `tab-2: ${CALLS}, tab-1: 0`, `tab-2: ${on2}, tab-1: ${on1}`, on2 === CALLS && on1 === 0);

  // A body longer than one frame each way: request continuation frames in,
  // a chunked reply out, byte for byte.
  const big = randomBytes(700 * 1024);
  const r = await call(callers, "/big", { body: big, headers: { "wsbridge-worker": "tab-1", "content-type": "application/octet-stream" } });
  check("b. a 700 KiB body through tab-1 comes back byte for byte", "200, 716800 equal bytes, x-echo-worker: tab-1",
    `${r.status}, ${r.bytes.length} bytes, equal: ${Buffer.from(r.bytes).equals(big)}, x-echo-worker: ${r.headers.get("x-echo-worker")}`,
    r.status === 200 && Buffer.from(r.bytes).equals(big) && r.headers.get("x-echo-worker") === "tab-1");

  // A call that times out: the bridge's cancel reaches the handler's signal.
  const slow = await call(callers, "/slow/wait?delay_ms=8000", { method: "GET", headers: { "wsbridge-worker": "tab-1", "x-request-id": "slow-1" } });
  check("b. a call past its 1s route timeout", "504", slow.status, slow.status === 504);
  let cancelled = "none";
  try {
    await tab1.waitForFunction(() => document.querySelector('tr[data-request-id="slow-1"]')?.dataset.outcome === "cancelled", null, { timeout: 5_000, polling: 50 });
    cancelled = await tab1.evaluate(() => document.querySelector('tr[data-request-id="slow-1"] [data-col="status"]').textContent);
  } catch {
    cancelled = await tab1.evaluate(() => document.querySelector('tr[data-request-id="slow-1"]')?.dataset.outcome ?? "no row");
  }
  check("b. tab-1 saw the cancel and did not reply", "cancelled: timeout", cancelled, cancelled === "cancelled: timeout");

  // d. Fan-out to every tab (docs: /work/notes/fanout-contract.md).
  const fan = await call(callers, "/fan", { body: "to every tab", headers: { "wsbridge-fanout": "all", "content-type": "text/plain" } });
  let result = null;
  try { result = JSON.parse(fan.text); } catch { /* below */ }
  const fanType = fan.headers.get("content-type") ?? "";
  if (!result || result.expected === undefined) {
    check("d. Wsbridge-Fanout: all answers with every tab's result", "200 application/json {expected: 2, ...}",
      `${fan.status} ${fanType}, x-echo-worker: ${fan.headers.get("x-echo-worker")}, body ${JSON.stringify(fan.text.slice(0, 120))} (one worker's reply: this bridge has no fan-out)`, false);
  } else {
    const results = result.results ?? [];
    const good = results.filter((x) => x.outcome === "ok" && x.status === 200 && x.body === "to every tab" && x.headers?.["x-echo-worker"] === x.worker_id);
    check("d. Wsbridge-Fanout: all answers with every tab's result", "200 application/json, expected 2, responded 2, complete, tab-1,tab-2 echoed",
      `${fan.status} ${fanType}, expected ${result.expected}, responded ${result.responded}, complete ${result.complete}, ok: ${ids(good)}`,
      fan.status === 200 && fanType.startsWith("application/json") && result.expected === 2 && result.responded === 2 && result.complete === true && ids(good) === "tab-1,tab-2");
    const eu = await call(callers, "/fan", { body: "eu only", headers: { "wsbridge-fanout": "region=eu" } });
    let euResult = {};
    try { euResult = JSON.parse(eu.text); } catch { /* below */ }
    check("d. Wsbridge-Fanout: region=eu reaches tab-1 alone", "expected 1, tab-1",
      `${eu.status}, expected ${euResult.expected}, ${ids(euResult.results ?? [])}`, euResult.expected === 1 && ids(euResult.results ?? []) === "tab-1");
  }

  // e. A page from a foreign origin is refused (403), and never appears.
  const evil = await openTab(context, foreign, { bridgeUrl, token, workerId: "tab-evil", metadata: "region=eu" });
  const evilWaiting = await waitState(evil, "waiting");
  await sleep(1_000); // time for a retry or two, which must fail as well
  const evilState = await stateOf(evil);
  check("e. a tab from a foreign origin fails to connect", "waiting (refused), never ready",
    evilState, evilWaiting && !evilState.startsWith("ready"));
  const refusals = readFileSync(bridge.logPath, "utf8").split("\n")
    .filter((l) => l.includes("worker handshake refused") && l.includes("403"));
  check("e. the bridge answered it 403", "a 'worker handshake refused ... 403' log line",
    refusals.length ? JSON.parse(refusals[0]).fields.reason : "none", refusals.length > 0);
  const after = await presence(callers);
  check("e. the foreign tab is not in presence", "tab-1,tab-2", ids(after.workers ?? []), ids(after.workers ?? []) === "tab-1,tab-2");
  await evil.close();

  // The token is limited to ids starting "tab-": another id is refused after
  // the hello, and the page says why.
  const other = await openTab(context, allowed, { bridgeUrl, token, workerId: "other-1", metadata: "" });
  let why = "";
  try {
    await other.waitForFunction(() => /forbidden_worker_id/.test(document.getElementById("status").textContent), null, { timeout: WAIT, polling: 50 });
  } catch { /* shown below */ }
  why = await stateOf(other);
  check("a tab claiming an id outside the token's prefix is refused", "waiting: ... forbidden_worker_id ...", why,
    why.startsWith("waiting") && why.includes("forbidden_worker_id"));
  await other.close();

  // close(): tab-1 drains; the bridge closes it with 1000 drained.
  await tab1.click("#disconnect");
  const stopped = await waitState(tab1, "stopped");
  check("tab-1 Disconnect drains and stops", "stopped (drained)", await stateOf(tab1), stopped && (await stateOf(tab1)).includes("drained"));
  const left = await presence(callers);
  check("presence after tab-1 left", "tab-2", ids(left.workers ?? []), ids(left.workers ?? []) === "tab-2");

  // The bridge restarts (same addresses): tab-2 reconnects by itself.
  await bridge.stop();
  const lost = await waitState(tab2, "waiting", 5_000);
  check("tab-2 sees the bridge go", "waiting (to redial)", await stateOf(tab2), lost);
  const bridge2 = await startBridge(work, token, allowed, { http: bridge.http, workers: bridge.workers, admin: bridge.admin });
  const back = await waitState(tab2, "ready");
  check("tab-2 reconnects to the restarted bridge", "ready", await stateOf(tab2), back);
  const again = await call(callers, "/again", { body: "still here", headers: { "wsbridge-worker": "tab-2" } });
  check("a call to tab-2 after the restart", "200, x-echo-worker: tab-2, body echoed",
    `${again.status}, x-echo-worker: ${again.headers.get("x-echo-worker")}, ${JSON.stringify(again.text.slice(0, 80))}`,
    again.status === 200 && again.headers.get("x-echo-worker") === "tab-2" && again.text === "still here");

  const errors = [...tab1.errors, ...tab2.errors];
  check("no uncaught errors in the tabs", "none", errors.join(" | ") || "none", errors.length === 0);
  check("the restarted bridge ran throughout", "running", bridge2.alive() ? "running" : "exited", bridge2.alive());

  // f. The token is in no line of the bridges' (trace-level) logs.
  await bridge2.stop(); // its log is complete
  const log = readFileSync(bridge.logPath, "utf8") + readFileSync(bridge2.logPath, "utf8");
  const lines = log.split("\n").length;
  const leaks = [token, base64url(token)].filter((t) => log.includes(t));
  check("f. the token is not in the bridges' logs", `neither it nor its base64url in ${lines} lines`,
    leaks.length ? `found ${leaks.length === 2 ? "both" : leaks[0] === token ? "the token" : "its base64url"}` : "absent",
    leaks.length === 0 && lines > 50);
}

main()
  .catch(async (e) => {
    if (!(e instanceof Abort)) check("unexpected error", "none", e?.stack ?? e, false);
  })
  .finally(async () => {
    if (failed && bridgeLog) {
      try { console.log(`-- the bridge's log (last 30 lines at info and above):\n${infoTail(bridgeLog)}`); } catch { /* none */ }
    }
    await cleanup();
    clearTimeout(overall);
    console.log(`workers test: ${passed} passed, ${failed} failed`);
    process.exit(failed ? 1 : 0);
  });
