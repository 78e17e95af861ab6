// wsbridge-worker.js: a wsbridge worker that runs in a browser tab.
//
// One ES module, no dependencies, no build step. It speaks docs/PROTOCOL.md
// as a worker without flow control, compression, the start gate or resume
// (the simple worker of PROTOCOL 11.2, which is complete on its own):
//
//   <script type="module">
//     import { WsbridgeWorker } from "./wsbridge-worker.js";
//     const worker = new WsbridgeWorker({
//       url: "wss://bridge.example.com:8443/",
//       token: "browser-token",            // sent as a subprotocol, see below
//       workerId: "user-42/tab-1",         // the address callers name in Wsbridge-Worker
//       services: ["tabs"],
//       metadata: { region: "eu" },        // shown by presence, matched by fan-out
//       handler: async (req) => ({ status: 200, body: "hello " + req.text() }),
//     });
//     worker.addEventListener("status", (e) => console.log(e.detail.state));
//     worker.start();
//     // later: await worker.close();    // drain: finish the calls in flight, then stop
//   </script>
//
// (From a page without modules, a three-line <script type="module"> that
// imports the class and sets `window.WsbridgeWorker` does the same.)
//
// The bridge needs the page's origin in `[workers] allowed_origins` and the
// token in `[workers] tokens`, ideally one limited to an id prefix:
// `tokens = [{ token = "...", worker_id_prefix = "user-42/", services = ["tabs"] }]`.
//
// The handler gets a request { id, requestId, service, method, path,
// headers: [[name, value], ...], header(name), body: Uint8Array, text(),
// json(), signal } and returns (or resolves to) { status = 200, headers =
// [[name, value], ...] or an object or a Headers, body = string | Uint8Array
// | ArrayBuffer | null }. `signal` aborts when the bridge cancels the call
// (the caller left or timed out) or the connection drops; no reply is sent
// then. A handler that throws answers 500.
//
// Events (CustomEvent, details in `e.detail`):
//   status  {state: "connecting" | "ready" | "draining" | "waiting" | "stopped",
//            code?, reason?, retryInMs?, sessionId?}
//   call    {request}                      a call arrived
//   reply   {request, status, ms}          its reply was sent
//   cancel  {request, reason}              the bridge cancelled it
//   problem {message}                      an error frame, a bad frame, a refusal
//
// What a browser cannot do, and what follows:
// - It cannot set `Authorization` on a WebSocket, so the token travels as the
//   subprotocol `base64url.bearer.wsbridge.<base64url(token)>` beside
//   `wsbridge.v1`; the bridge echoes only `wsbridge.v1`.
// - It does not say why an upgrade was refused (401 token, 403 origin, 400):
//   the socket just closes with 1006. The bridge's log says why.
// - It answers the bridge's pings by itself, but never shows them and cannot
//   send any, so PROTOCOL 8.3's silence limit cannot be applied here. The
//   bridge still drops a tab that stops answering; the tab sees a dead path
//   only when TCP does, or at once when the browser reports going offline.
//
// Bounds: a request body larger than `maxBody` (10 MiB, the bridge's default
// max_body) is answered 413 without being kept; replies go out in 256 KiB
// frames, each only once the socket has less than 1 MiB waiting to be sent.

const SUBPROTOCOL = "wsbridge.v1";
const TOKEN_PROTOCOL = "base64url.bearer.wsbridge.";
const CHUNK = 256 * 1024; // PROTOCOL 4.5: body bytes per frame
const MAX_HEADER_LEN = 65536; // PROTOCOL 4.1: largest JSON head
const HIGH_WATER = 1024 * 1024; // bytes queued in the socket before a reply waits
const WELCOME_TIMEOUT = 10_000;
const FIRST_DELAY = 100, MAX_DELAY = 30_000, STABLE_MS = 30_000; // PROTOCOL 8.4

const enc = new TextEncoder();
const dec = new TextDecoder();

/** Unpadded base64url of a string's UTF-8 bytes. */
export function base64url(text) {
  let bin = "";
  for (const b of enc.encode(text)) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** A binary frame: u32 big-endian head length | JSON head | body (PROTOCOL 4.1). */
export function encodeFrame(head, body = new Uint8Array(0)) {
  const json = enc.encode(JSON.stringify(head));
  if (json.length > MAX_HEADER_LEN) throw new Error(`frame head of ${json.length} bytes exceeds ${MAX_HEADER_LEN}`);
  const out = new Uint8Array(4 + json.length + body.length);
  new DataView(out.buffer).setUint32(0, json.length);
  out.set(json, 4);
  out.set(body, 4 + json.length);
  return out;
}

/** [head, body] of a binary frame; throws on a bad one. */
export function decodeFrame(buf) {
  if (buf.byteLength < 4) throw new Error("truncated frame");
  const prefix = new DataView(buf.buffer, buf.byteOffset, buf.byteLength).getUint32(0);
  const n = prefix & 0x00ffffff;
  if (prefix >>> 24) throw new Error("compressed frame, but no compression was negotiated");
  if (n > MAX_HEADER_LEN || buf.byteLength < 4 + n) throw new Error("bad header length");
  const head = JSON.parse(dec.decode(buf.subarray(4, 4 + n)));
  if (head.end === undefined) head.end = true; // absent means true
  return [head, buf.subarray(4 + n)];
}

function toBytes(body) {
  if (body == null) return new Uint8Array(0);
  if (typeof body === "string") return enc.encode(body);
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  if (ArrayBuffer.isView(body)) return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  throw new TypeError("reply body must be a string, Uint8Array, ArrayBuffer or null");
}

function toPairs(headers) {
  if (headers == null) return [];
  const it = Array.isArray(headers) || typeof headers[Symbol.iterator] === "function"
    ? headers : Object.entries(headers);
  return [...it].map(([k, v]) => [String(k), String(v)]);
}

function concat(pieces, size) {
  if (pieces.length === 1) return pieces[0];
  const out = new Uint8Array(size);
  let at = 0;
  for (const p of pieces) { out.set(p, at); at += p.length; }
  return out;
}

export class WsbridgeWorker extends EventTarget {
  /**
   * @param {object} o
   * @param {string} o.url          wss://HOST:PORT/ of the bridge's worker listener
   * @param {string} o.token        a token of `[workers] tokens`
   * @param {string} o.workerId     this worker's id (its address)
   * @param {string[]} o.services   services it answers
   * @param {object} [o.metadata]   up to 16 string pairs for presence and fan-out
   * @param {number} [o.maxInflight=4]
   * @param {number} [o.maxBody=10485760]  largest request body kept
   * @param {(req) => Promise<object>} o.handler
   */
  constructor({ url, token, workerId, services, metadata = {}, maxInflight = 4, maxBody = 10 << 20, handler }) {
    super();
    if (!url || !token || !services?.length || typeof handler !== "function") {
      throw new TypeError("url, token, services and handler are required");
    }
    Object.assign(this, { url, token, workerId: workerId ?? "", services, metadata, maxInflight, maxBody, handler });
    this.state = "stopped";
    this.ws = null;
    this.calls = new Map(); // id -> call of the current connection
    this.stopping = false;
    this.delay = FIRST_DELAY;
    this.timer = null;
    this.onClosed = null; // resolves close()'s wait
  }

  // The browser is back online: a tab waiting to redial does so at once.
  wake = () => { if (this.state === "waiting") this.dial(); };

  // The browser went offline: the connection is most likely dead, and TCP
  // would take minutes to say so.
  dropNow = () => { if (this.ws) this.abandon(this.ws, "offline"); };

  /** Connects, and reconnects after every drop until close(). */
  start() {
    if (this.state !== "stopped") return;
    this.stopping = false;
    this.delay = FIRST_DELAY;
    globalThis.addEventListener?.("online", this.wake);
    globalThis.addEventListener?.("offline", this.dropNow);
    this.dial();
  }

  /**
   * Stops: sends `drain`, lets the calls in flight finish, and resolves once
   * the bridge has closed the connection (or after `timeoutMs`).
   */
  close({ timeoutMs = 30_000 } = {}) {
    this.stopping = true;
    clearTimeout(this.timer);
    globalThis.removeEventListener?.("online", this.wake);
    globalThis.removeEventListener?.("offline", this.dropNow);
    const ws = this.ws;
    if (!ws || this.state !== "ready") { // nothing in flight: stop at once
      if (ws) this.abandon(ws, "stopping"); // ends in state "stopped"
      else this.setState("stopped");
      return Promise.resolve();
    }
    this.setState("draining");
    ws.send(JSON.stringify({ type: "drain" }));
    return new Promise((resolve) => {
      const t = setTimeout(() => this.abandon(ws, "drain timeout"), timeoutMs);
      this.onClosed = () => { clearTimeout(t); resolve(); };
    });
  }

  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  setState(state, extra = {}) {
    this.state = state;
    this.emit("status", { state, ...extra });
  }

  dial() {
    clearTimeout(this.timer);
    this.setState("connecting");
    let ws;
    try {
      ws = new WebSocket(this.url, [SUBPROTOCOL, TOKEN_PROTOCOL + base64url(this.token)]);
    } catch (e) { // a malformed URL: retrying will not help
      this.emit("problem", { message: String(e.message ?? e) });
      this.setState("stopped");
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    let welcomedAt = 0;
    let refusal = ""; // an error frame in place of the welcome: why the hello was refused
    const welcomeTimer = setTimeout(() => this.abandon(ws, "no welcome within 10 s"), WELCOME_TIMEOUT);

    ws.onopen = () => {
      if (ws.protocol !== SUBPROTOCOL) return this.abandon(ws, `bridge chose subprotocol ${ws.protocol}`);
      ws.send(JSON.stringify({
        type: "hello", worker_id: this.workerId, services: this.services,
        max_inflight: this.maxInflight, metadata: this.metadata,
      }));
    };
    ws.onmessage = (m) => {
      if (typeof m.data !== "string") return this.onBinary(ws, new Uint8Array(m.data));
      let f;
      try { f = JSON.parse(m.data); } catch { return this.emit("problem", { message: "text frame is not JSON" }); }
      if (f.type === "welcome" && !welcomedAt) {
        clearTimeout(welcomeTimer);
        welcomedAt = Date.now();
        this.setState(this.stopping ? "draining" : "ready", { sessionId: f.session_id });
      } else if (f.type === "cancel" || (f.type === "error" && f.id !== undefined)) {
        this.cancel(f.id, f.reason ?? `error ${f.code}: ${f.message}`);
      } else if (f.type === "error") {
        if (!welcomedAt) refusal = `${f.code}: ${f.message}`; // bad_hello, forbidden_worker_id, ...
        this.emit("problem", { message: `bridge: ${f.code}: ${f.message}` });
      } // drain (the bridge is stopping: its close follows), credit, unknown: nothing to do
    };
    ws.onerror = () => {}; // a close always follows
    ws.onclose = (e) => {
      clearTimeout(welcomeTimer);
      this.finish(ws);
      if (this.ws !== ws) return; // abandoned already
      this.ws = null;
      const replaced = e.reason.startsWith("replaced");
      if (this.stopping || replaced) { // a newer tab took this id: reconnecting would take it back
        globalThis.removeEventListener?.("online", this.wake);
        globalThis.removeEventListener?.("offline", this.dropNow);
        this.setState("stopped", { code: e.code, reason: e.reason });
        this.onClosed?.();
        this.onClosed = null;
        return;
      }
      // PROTOCOL 8.4: a connection that lived 30 s resets the backoff; one that
      // was up for 1 s and ended without a close frame (a blip) redials at once.
      const up = welcomedAt ? Date.now() - welcomedAt : 0;
      if (up >= STABLE_MS) this.delay = FIRST_DELAY;
      let wait = 0;
      if (!(up >= 1000 && !e.wasClean)) {
        wait = Math.round(this.delay * (0.5 + Math.random() / 2));
        this.delay = Math.min(this.delay * 2, MAX_DELAY);
      }
      const reason = refusal || e.reason || (welcomedAt ? "connection lost" : "refused or unreachable (see the bridge's log)");
      this.setState("waiting", { code: e.code, reason, retryInMs: wait });
      this.timer = setTimeout(() => this.dial(), wait);
    };
  }

  // Gives a connection up now, without waiting for its closing handshake
  // (which a dead path would hold up for a minute): it ends as if closed.
  abandon(ws, reason) {
    ws.close(4000, reason.slice(0, 100));
    ws.onclose?.({ code: 4000, reason, wasClean: false });
    ws.onclose = ws.onmessage = ws.onopen = null;
  }

  // Aborts every call of a connection that has ended: their replies cannot
  // be delivered on another one (PROTOCOL 8.4).
  finish(ws) {
    for (const call of this.calls.values()) {
      if (call.ws === ws) {
        this.calls.delete(call.id);
        call.controller.abort(new Error("connection closed"));
      }
    }
  }

  cancel(id, reason) {
    const call = this.calls.get(id);
    if (!call) return; // finished, or never known: ignore
    this.calls.delete(id);
    call.controller.abort(new Error(`cancelled: ${reason}`));
    if (call.request) this.emit("cancel", { request: call.request, reason });
  }

  onBinary(ws, buf) {
    let head, body;
    try { [head, body] = decodeFrame(buf); } catch (e) {
      return this.emit("problem", { message: `bad frame from the bridge: ${e.message}` });
    }
    if (head.type === "request") {
      const call = { id: head.id, ws, head, pieces: [], size: 0, controller: new AbortController() };
      this.calls.set(head.id, call);
      this.addBody(call, body, head.end);
    } else if (head.type === "body") {
      const call = this.calls.get(head.id);
      if (call && call.pieces) this.addBody(call, body, head.end); // unknown ids: ignore
    }
  }

  addBody(call, bytes, end) {
    call.size += bytes.length;
    if (call.size > this.maxBody) { // bounded: answer now, keep nothing
      call.pieces = null;
      const msg = `request body over ${this.maxBody} bytes`;
      this.reply(call, { status: 413, headers: [["content-type", "text/plain"]], body: msg });
      return;
    }
    if (bytes.length) call.pieces.push(bytes.slice()); // a copy: `bytes` views the whole frame
    if (end) {
      const body = concat(call.pieces, call.size);
      call.pieces = null;
      this.run(call, body);
    }
  }

  async run(call, body) {
    const h = call.head;
    const request = {
      id: h.id, requestId: h.request_id, service: h.service, method: h.method, path: h.path,
      headers: h.headers ?? [], body, signal: call.controller.signal, workerId: this.workerId,
      header(name) {
        const n = name.toLowerCase();
        return this.headers.find(([k]) => k === n)?.[1];
      },
      text() { return dec.decode(this.body); },
      json() { return JSON.parse(this.text()); },
    };
    call.request = request;
    call.started = performance.now();
    this.emit("call", { request });
    let res;
    try {
      res = await this.handler(request);
      if (typeof Response === "function" && res instanceof Response) { // a fetch() Response works too
        res = { status: res.status, headers: res.headers, body: new Uint8Array(await res.arrayBuffer()) };
      }
    } catch (e) {
      if (call.controller.signal.aborted) return;
      res = { status: 500, headers: [["content-type", "text/plain"]], body: `handler failed: ${e?.message ?? e}` };
    }
    if (call.controller.signal.aborted) return; // cancelled or disconnected: no reply
    await this.reply(call, res ?? {});
  }

  async reply(call, res) {
    const ws = call.ws;
    let status = res.status ?? 200, headers, body;
    try {
      headers = toPairs(res.headers);
      body = toBytes(res.body);
    } catch (e) {
      status = 500;
      headers = [["content-type", "text/plain"]];
      body = enc.encode(`bad reply: ${e.message}`);
    }
    const live = () => this.calls.get(call.id) === call && this.ws === ws && ws.readyState === WebSocket.OPEN;
    try {
      for (let at = 0; at === 0 || at < body.length; at += CHUNK) {
        while (ws.bufferedAmount > HIGH_WATER && live()) await new Promise((r) => setTimeout(r, 10));
        if (!live()) return;
        const piece = body.subarray(at, at + CHUNK);
        const end = at + CHUNK >= body.length;
        const head = at === 0
          ? { type: "response", id: call.id, status, headers, end }
          : { type: "body", id: call.id, end };
        ws.send(encodeFrame(head, piece));
      }
    } catch (e) { // a head over 64 KiB: tell the bridge, the caller gets 502
      if (live()) ws.send(JSON.stringify({ type: "error", id: call.id, code: "bad_response", message: e.message }));
    }
    this.calls.delete(call.id);
    if (call.request) this.emit("reply", { request: call.request, status, ms: performance.now() - call.started });
  }
}
