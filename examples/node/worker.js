#!/usr/bin/env node
// A wsbridge worker in Node.js, written from docs/PROTOCOL.md alone.
//
//     npm ci
//     WSBRIDGE_CA=certs/server.crt node worker.js --url wss://localhost:8443 --service orders \
//         [--worker-id eu-1 --meta region=eu]
//
// It dials out to the bridge, says hello, answers calls concurrently (at most
// --max-inflight), honours cancels, drains on SIGTERM and reconnects with
// backoff and jitter. No flow control, no compression, no resume: the simple
// worker of PROTOCOL.md section 11.2, which is complete on its own.
//
// Handlers, picked by the last segment of the path (the bridge forwards the
// path unchanged, route prefix included, so /orders/add and /node/add both
// reach `add`):
//
//     POST /<service>/add   {"a": 2, "b": 3}  -> {"sum": 5, "worker": ...}
//     POST /<service>/echo  any body          -> the same body and content-type,
//                                                and x-echo-worker: <worker id>
//     POST /<service>/slow  {"ms": 5000}      -> sleeps, then {"slept_ms": 5000}
//
// Every cancel is logged with the call's request id:
//     cancel id=7 request_id=01a2... reason=timeout
"use strict";

const fs = require("fs");
const os = require("os");
const { parseArgs } = require("util");
const { setTimeout: sleep } = require("timers/promises");
const WebSocket = require("ws");

const CHUNK = 256 * 1024; // reply bodies above this go out as response + body frames
const MAX_HEADER_LEN = 65536;

const { values: opt } = parseArgs({
  options: {
    url: { type: "string", default: process.env.WSBRIDGE_URL || "wss://localhost:8443/" },
    token: { type: "string", default: process.env.WSBRIDGE_TOKEN || "change-me" },
    ca: { type: "string", default: process.env.WSBRIDGE_CA },
    service: { type: "string", multiple: true, default: ["orders"] },
    "worker-id": { type: "string", default: `node-${os.hostname()}-${process.pid}` },
    id: { type: "string" }, // the same as --worker-id, as the Rust agent spells it
    meta: { type: "string", multiple: true, default: [] }, // KEY=VALUE, sent in the hello
    "max-inflight": { type: "string", default: "8" },
    "drain-timeout": { type: "string", default: "30" },
  },
});
const workerId = opt.id ?? opt["worker-id"];

// --meta KEY=VALUE (repeatable): the hello's metadata, for presence and fan-out
// selectors. Keys are 1 to 64 of A-Z a-z 0-9 _ - ., values at most 256 bytes of
// UTF-8, at most 16 entries (PROTOCOL.md 3.1): the bridge refuses a hello with more.
const metadata = Object.create(null); // "__proto__" is a key like any other
for (const pair of opt.meta) {
  const i = pair.indexOf("=");
  const key = i < 0 ? "" : pair.slice(0, i);
  const value = pair.slice(i + 1);
  if (i < 0) fatal(`--meta wants KEY=VALUE, got ${JSON.stringify(pair)}`);
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(key)) fatal(`metadata key ${JSON.stringify(key)} must be 1 to 64 of A-Z a-z 0-9 _ - .`);
  if (Buffer.byteLength(value, "utf8") > 256) fatal(`metadata value of ${JSON.stringify(key)} must be at most 256 bytes`);
  metadata[key] = value;
}
if (Object.keys(metadata).length > 16) fatal("at most 16 --meta entries");

function fatal(msg) {
  process.stderr.write(`worker.js: ${msg}\n`);
  process.exit(2);
}

function log(level, msg) {
  process.stderr.write(`${new Date().toISOString()} ${workerId} ${level} ${msg}\n`);
}

// --- frames (PROTOCOL.md 4.1) -------------------------------------------------

function decodeFrame(buf) {
  if (buf.length < 4) throw new Error("truncated frame");
  const prefix = buf.readUInt32BE(0);
  if (prefix >>> 24) throw new Error(`flags ${prefix >>> 24} set, but no compression was negotiated`);
  const n = prefix & 0x00ffffff;
  if (n > MAX_HEADER_LEN || buf.length < 4 + n) throw new Error(`bad header length ${n}`);
  const head = JSON.parse(buf.subarray(4, 4 + n).toString("utf8"));
  if (head.end === undefined) head.end = true; // absent means true
  return [head, buf.subarray(4 + n)];
}

function encodeFrame(head, body = Buffer.alloc(0)) {
  const json = Buffer.from(JSON.stringify(head), "utf8"); // byte length, not string length
  const prefix = Buffer.alloc(4);
  prefix.writeUInt32BE(json.length);
  return Buffer.concat([prefix, json, body]);
}

// --- the application -----------------------------------------------------------

const jsonReply = (status, obj) => [status, [["content-type", "application/json"]], Buffer.from(JSON.stringify(obj))];

function number(v) {
  const x = typeof v === "number" ? v : typeof v === "string" && v.trim() !== "" ? Number(v) : NaN;
  if (!Number.isFinite(x)) throw new Error(`not a number: ${JSON.stringify(v)}`);
  return x; // "2" is fine: PHP's $_GET values are strings
}

const parseJson = (body) => (body.length ? JSON.parse(body.toString("utf8")) : {});

const handlers = {
  async "/add"(call) {
    try {
      const args = parseJson(call.body);
      return jsonReply(200, { sum: number(args.a) + number(args.b), worker: workerId });
    } catch (e) {
      return jsonReply(400, { error: { code: "bad_input", message: `want {"a": n, "b": n}: ${e.message}` } });
    }
  },
  async "/echo"(call) {
    // As bytes: a content type that is not UTF-8 goes back byte for byte (PROTOCOL.md 5.1).
    const ctype = call.headerBytes("content-type") || "application/octet-stream";
    return [200, [["content-type", ctype], ["x-echo-worker", workerId]], call.body];
  },
  async "/slow"(call) {
    const ms = Number(parseJson(call.body).ms ?? 5000);
    log("INFO", `slow start id=${call.id} request_id=${call.requestId} ms=${ms}`);
    await sleep(ms, undefined, { signal: call.abort.signal }); // a cancel rejects this with AbortError
    log("INFO", `slow done id=${call.id} request_id=${call.requestId}`);
    return jsonReply(200, { slept_ms: ms, worker: workerId });
  },
};

// --- the protocol ----------------------------------------------------------------

class Call {
  constructor(head) {
    this.head = head;
    this.id = head.id;
    this.requestId = head.request_id || "";
    this.pieces = [];
    this.body = null; // a Buffer once the request body is complete
    this.abort = new AbortController();
  }
  header(name) {
    const pair = (this.head.headers || []).find(([k]) => k === name);
    return pair ? pair[1] : undefined;
  }
  // The first value of header `name` as the caller's exact bytes (a Buffer). A value
  // that is not UTF-8 comes as Latin-1 text listed in "latin1" (PROTOCOL.md 5.1).
  headerBytes(name) {
    const headers = this.head.headers || [];
    const i = headers.findIndex(([k]) => k === name);
    if (i < 0) return undefined;
    return Buffer.from(headers[i][1], (this.head.latin1 || []).includes(i) ? "latin1" : "utf8");
  }
}

// Reply headers as the frame carries them: a value may be a string or a Buffer; a
// Buffer that is not UTF-8 goes as Latin-1 text, its index listed in "latin1".
function wireHeaders(headers) {
  const pairs = [];
  const latin1 = [];
  for (const [name, value] of headers) {
    if (Buffer.isBuffer(value)) {
      const text = value.toString("utf8");
      if (Buffer.from(text, "utf8").equals(value)) {
        pairs.push([name, text]);
      } else {
        latin1.push(pairs.length);
        pairs.push([name, value.toString("latin1")]);
      }
    } else {
      pairs.push([name, value]);
    }
  }
  return { pairs, latin1 };
}

let draining = false;
let drainFailed = false;
let current = null; // the open, welcomed WebSocket
let delay = 100; // reconnect backoff in ms (PROTOCOL.md 8.4)

function connect() {
  const started = Date.now();
  const ws = new WebSocket(opt.url, "wsbridge.v1", {
    headers: { Authorization: `Bearer ${opt.token}` },
    ca: opt.ca ? fs.readFileSync(opt.ca) : undefined,
    perMessageDeflate: false, // the bridge negotiates no WebSocket extensions
    handshakeTimeout: 10000,
  });
  const calls = new Map(); // id -> Call
  let welcomed = false;
  let refused = false; // the upgrade got an HTTP error, already logged
  let silenceTimer = null;
  let silenceMs = 0;

  // The bridge pings every ping_interval_ms; ws shows us those pings, so any
  // message or ping restarts the silence timer (PROTOCOL.md 8.3).
  const alive = () => {
    if (!silenceMs) return;
    clearTimeout(silenceTimer);
    silenceTimer = setTimeout(() => {
      log("WARN", `nothing from the bridge for ${silenceMs}ms: reconnecting`);
      ws.terminate();
    }, silenceMs);
  };

  const helloTimer = setTimeout(() => {
    log("WARN", "no welcome within 20s of dialling");
    ws.terminate();
  }, 20000);

  ws.on("unexpected-response", (req, res) => {
    refused = true;
    let body = "";
    res.on("data", (d) => (body += d));
    res.on("end", () => {
      log("WARN", `bridge refused the connection: HTTP ${res.statusCode} ${body}`);
      ws.terminate();
    });
    res.on("error", () => ws.terminate());
  });

  ws.on("open", () => {
    const hello = { type: "hello", worker_id: workerId, services: opt.service, max_inflight: Number(opt["max-inflight"]) };
    if (Object.keys(metadata).length) hello.metadata = metadata;
    ws.send(JSON.stringify(hello));
  });

  ws.on("ping", alive);

  ws.on("message", (data, isBinary) => {
    alive();
    if (!welcomed) {
      const f = isBinary ? {} : safeJson(data.toString("utf8"));
      if (f.type !== "welcome" || f.version !== 1) {
        log("WARN", `bridge refused the hello: ${isBinary ? "binary frame" : data.toString("utf8")}`);
        ws.close();
        return;
      }
      welcomed = true;
      clearTimeout(helloTimer);
      current = ws;
      silenceMs = f.ping_interval_ms * (f.ping_misses + 1);
      alive();
      log("INFO", `connected session=${f.session_id} services=${opt.service.join(",")}`);
      return;
    }
    if (isBinary) onBinary(data);
    else onText(data.toString("utf8"));
  });

  function onText(text) {
    const f = safeJson(text);
    if (f.type === "cancel" || (f.type === "error" && f.id !== undefined)) {
      if (f.type === "error") log("WARN", `bridge error for call ${f.id}: ${f.code} ${f.message}`);
      const call = calls.get(f.id);
      if (!call) return; // already answered or never seen: the two crossed on the wire
      calls.delete(f.id);
      log("INFO", `cancel id=${call.id} request_id=${call.requestId} reason=${f.reason ?? f.code}`);
      call.abort.abort();
    } else if (f.type === "error") {
      log("WARN", `bridge error: ${f.code} ${f.message}`);
    } else if (f.type === "drain") {
      log("INFO", "bridge is shutting down");
    } else if (f.type === undefined) {
      log("WARN", `unreadable control frame: ${text.slice(0, 200)}`);
    } // credit, start and unknown types: nothing to do for this worker
  }

  function onBinary(buf) {
    let head, body;
    try {
      [head, body] = decodeFrame(buf);
    } catch (e) {
      log("WARN", `undecodable binary frame: ${e.message}`);
      return;
    }
    let call;
    if (head.type === "request") {
      call = new Call(head);
      calls.set(head.id, call);
    } else if (head.type === "body") {
      call = calls.get(head.id);
      if (!call || call.body) return; // a chunk of a cancelled or finished call
    } else {
      log("WARN", `unknown binary frame type ${head.type}`);
      return;
    }
    call.pieces.push(Buffer.from(body)); // copy: ws may reuse the message buffer
    if (head.end) {
      call.body = Buffer.concat(call.pieces);
      call.pieces = null;
      handle(call);
    }
  }

  async function handle(call) {
    const path = call.head.path.split("?")[0];
    const handler = handlers["/" + path.slice(path.lastIndexOf("/") + 1)];
    let status, headers, out;
    try {
      [status, headers, out] = handler
        ? await handler(call)
        : jsonReply(404, { error: { code: "not_found", message: `no handler for ${call.head.path}` } });
    } catch (e) {
      if (call.abort.signal.aborted) return; // cancelled: no reply
      log("ERROR", `handler for call ${call.id} failed: ${e.stack}`);
      [status, headers, out] = jsonReply(500, { error: { code: "handler_failed", message: e.message } });
    }
    if (calls.get(call.id) !== call || ws.readyState !== WebSocket.OPEN) return; // cancelled meanwhile
    calls.delete(call.id);
    // ws.send queues messages in order, so handlers never interleave a frame.
    const n = Math.max(1, Math.ceil(out.length / CHUNK));
    const { pairs, latin1 } = wireHeaders(headers);
    const head = { type: "response", id: call.id, status, headers: pairs, end: n === 1 };
    if (latin1.length) head.latin1 = latin1;
    ws.send(encodeFrame(head, out.subarray(0, CHUNK)));
    for (let i = 1; i < n; i++) {
      ws.send(encodeFrame({ type: "body", id: call.id, end: i === n - 1 }, out.subarray(i * CHUNK, (i + 1) * CHUNK)));
    }
  }

  ws.on("error", (e) => refused || log("WARN", `connection failed: ${e.message}`));

  ws.on("close", (code, reason) => {
    clearTimeout(helloTimer);
    clearTimeout(silenceTimer);
    for (const call of calls.values()) call.abort.abort(); // replies cannot go out on another connection
    calls.clear();
    if (current === ws) current = null;
    if (welcomed) log("INFO", `connection closed: code=${code} reason=${JSON.stringify(reason.toString())}`);
    if (draining) {
      if (code !== 1000) log("WARN", `connection ended with close code ${code} while draining`);
      log("INFO", "drained, exiting");
      process.exit(drainFailed ? 1 : 0);
    }
    if (Date.now() - started >= 30000) delay = 100;
    const wait = delay * (0.5 + Math.random() / 2);
    delay = Math.min(delay * 2, 30000);
    log("INFO", `reconnecting in ${(wait / 1000).toFixed(2)}s`);
    setTimeout(connect, wait);
  });
}

function safeJson(text) {
  try {
    const v = JSON.parse(text);
    return v && typeof v === "object" ? v : {};
  } catch {
    return {};
  }
}

// SIGTERM: ask the bridge for no new calls; it closes us (1000 "drained") once
// the calls in flight have been answered (PROTOCOL.md 3.5).
function onSignal(name) {
  if (draining) return;
  draining = true;
  log("INFO", `${name}: draining`);
  if (!current) {
    log("INFO", "stopped while not connected, exiting");
    process.exit(0);
  }
  current.send(JSON.stringify({ type: "drain" }));
  setTimeout(() => {
    log("ERROR", `drain: still connected after ${opt["drain-timeout"]}s; closing with calls in flight`);
    drainFailed = true;
    if (current) current.terminate();
    else process.exit(1);
  }, Number(opt["drain-timeout"]) * 1000).unref();
}
process.on("SIGTERM", () => onSignal("SIGTERM"));
process.on("SIGINT", () => onSignal("SIGINT"));

connect();
