#!/usr/bin/env python3
"""A wsbridge worker in Python, written from docs/PROTOCOL.md alone.

    python3 -m venv venv && venv/bin/pip install -r requirements.txt
    venv/bin/python worker.py --url wss://localhost:8443 --token change-me \\
        --ca certs/server.crt --service orders [--worker-id eu-1 --meta region=eu]

It dials out to the bridge, says hello, answers calls concurrently (at most
--max-inflight), honours cancels, drains on SIGTERM and reconnects with
backoff and jitter. No flow control, no compression, no resume: the simple
worker of PROTOCOL.md section 11.2, which is complete on its own.

Handlers, picked by the last segment of the path (the bridge forwards the
path unchanged, route prefix included, so /orders/add and /py/add both reach
`add`):

    POST /<service>/add   {"a": 2, "b": 3}  -> {"sum": 5, "worker": ...}
    POST /<service>/echo  any body          -> the same body and content-type,
                                               and x-echo-worker: <worker id>
    POST /<service>/slow  {"ms": 5000}      -> sleeps, then {"slept_ms": 5000}

Every cancel is logged with the call's request id:
    cancel id=7 request_id=01a2... reason=timeout
"""

import argparse
import asyncio
import json
import logging
import os
import random
import re
import signal
import socket
import ssl
import struct
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

CHUNK = 256 * 1024  # reply bodies above this go out as response + body frames
MAX_HEADER_LEN = 65536

log = logging.getLogger("worker")


# --- frames (PROTOCOL.md 4.1) -------------------------------------------------


def decode_frame(frame: bytes):
    if len(frame) < 4:
        raise ValueError("truncated frame")
    (prefix,) = struct.unpack(">I", frame[:4])
    if prefix >> 24:
        raise ValueError("flags 0x%02x set, but no compression was negotiated" % (prefix >> 24))
    n = prefix & 0x00FFFFFF
    if n > MAX_HEADER_LEN or len(frame) < 4 + n:
        raise ValueError("bad header length %d" % n)
    head = json.loads(frame[4 : 4 + n])
    head.setdefault("end", True)  # absent means true
    return head, frame[4 + n :]


def encode_frame(head: dict, body: bytes = b"") -> bytes:
    j = json.dumps(head, separators=(",", ":")).encode("utf-8")
    return struct.pack(">I", len(j)) + j + body


# --- the application -----------------------------------------------------------


def json_reply(status, obj):
    return status, [["content-type", "application/json"]], json.dumps(obj).encode()


def number(v):
    if isinstance(v, bool):
        raise ValueError("not a number: %r" % v)
    x = float(v)  # accepts 2, 2.5 and "2" (PHP's $_GET values are strings)
    return int(x) if x.is_integer() else x


async def add(call):
    try:
        args = json.loads(call.body or b"{}")
        return json_reply(200, {"sum": number(args["a"]) + number(args["b"]), "worker": call.worker_id})
    except (ValueError, KeyError, TypeError) as e:
        return json_reply(400, {"error": {"code": "bad_input", "message": "want {\"a\": n, \"b\": n}: %s" % e}})


async def echo(call):
    # As bytes: a content type that is not UTF-8 goes back byte for byte (PROTOCOL 5.1).
    ctype = call.header_bytes("content-type") or b"application/octet-stream"
    return 200, [["content-type", ctype], ["x-echo-worker", call.worker_id]], call.body


async def slow(call):
    ms = int(json.loads(call.body or b"{}").get("ms", 5000))
    log.info("slow start id=%s request_id=%s ms=%d", call.id, call.request_id, ms)
    await asyncio.sleep(ms / 1000)  # a cancel interrupts this with CancelledError
    log.info("slow done id=%s request_id=%s", call.id, call.request_id)
    return json_reply(200, {"slept_ms": ms, "worker": call.worker_id})


HANDLERS = {"/add": add, "/echo": echo, "/slow": slow}


# --- the protocol ----------------------------------------------------------------


class Call:
    def __init__(self, head, worker_id):
        self.head = head
        self.id = head["id"]
        self.request_id = head.get("request_id", "")
        self.worker_id = worker_id
        self.body = bytearray()
        self.task = None  # set once the body is complete and the handler runs

    def header(self, name):
        """The first value of header `name` as text, or None."""
        return next((v for k, v in self.head.get("headers", []) if k == name), None)

    def header_bytes(self, name):
        """The first value of header `name` as the caller's exact bytes, or None.
        A value that is not UTF-8 comes as Latin-1 text listed in "latin1" (PROTOCOL 5.1)."""
        latin1 = set(self.head.get("latin1", []))
        for i, (k, v) in enumerate(self.head.get("headers", [])):
            if k == name:
                return v.encode("latin-1") if i in latin1 else v.encode("utf-8")
        return None


def wire_headers(headers):
    """Reply headers as the frame carries them: [name, value] pairs, where a value
    may be str or bytes; bytes that are not UTF-8 go as Latin-1 text, their index
    listed in "latin1" (PROTOCOL 5.1). Returns (pairs, latin1)."""
    pairs, latin1 = [], []
    for name, value in headers:
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                latin1.append(len(pairs))
                value = bytes(value).decode("latin-1")
        pairs.append([name, value])
    return pairs, latin1


class Refused(Exception):
    pass


class Worker:
    def __init__(self, args):
        self.args = args
        self.worker_id = args.worker_id
        self.term = asyncio.Event()  # SIGTERM/SIGINT seen: drain and exit
        self.outbox = None  # queue of the current connection's writer, once welcomed
        self.ws = None
        self.drain_failed = False

    # SIGTERM: ask the bridge for no new calls; it closes us (1000 "drained")
    # once the calls in flight have been answered (PROTOCOL.md 3.5).
    def on_signal(self, signame):
        if self.term.is_set():
            return
        self.term.set()
        log.info("%s: draining", signame)
        if self.outbox is not None:
            self.outbox.put_nowait(json.dumps({"type": "drain"}))
        asyncio.get_running_loop().call_later(self.args.drain_timeout, self.drain_deadline)

    def drain_deadline(self):
        if self.ws is not None:
            log.error("drain: still connected after %ss; closing with calls in flight", self.args.drain_timeout)
            self.drain_failed = True
            asyncio.ensure_future(self.ws.close())

    async def run(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig.name)
        delay = 0.1
        while not self.term.is_set():
            started = time.monotonic()
            code = None
            try:
                code = await self.serve_once()
            except InvalidStatus as e:
                body = e.response.body.decode("utf-8", "replace") if e.response.body else ""
                log.warning("bridge refused the connection: HTTP %d %s", e.response.status_code, body)
            except Refused as e:
                log.warning("bridge refused the hello: %s", e)
            except (OSError, asyncio.TimeoutError, WebSocketException) as e:
                log.warning("connection failed: %s", e or type(e).__name__)
            except (ValueError, KeyError, TypeError) as e:  # e.g. a welcome that is not JSON
                log.warning("unexpected reply from the bridge: %r", e)
            if self.term.is_set():
                if self.drain_failed:
                    return 1
                if code not in (None, 1000):
                    log.warning("connection ended with close code %s while draining", code)
                log.info("drained, exiting")
                return 0
            # reconnect with exponential backoff and jitter (PROTOCOL.md 8.4)
            if time.monotonic() - started >= 30:
                delay = 0.1
            wait = delay * random.uniform(0.5, 1.0)
            delay = min(delay * 2, 30.0)
            log.info("reconnecting in %.2fs", wait)
            try:
                await asyncio.wait_for(self.term.wait(), wait)  # a SIGTERM ends the wait
            except asyncio.TimeoutError:
                pass
        log.info("stopped while not connected, exiting")
        return 0

    async def serve_once(self):
        a = self.args
        ssl_ctx = None
        if a.url.startswith("wss:"):
            ssl_ctx = ssl.create_default_context(cafile=a.ca) if a.ca else ssl.create_default_context()
        async with connect(
            a.url,
            subprotocols=["wsbridge.v1"],
            additional_headers={"Authorization": "Bearer " + a.token},
            ssl=ssl_ctx,
            open_timeout=10,
            ping_interval=None,  # we ping on the bridge's schedule, from the welcome
            compression=None,  # the bridge negotiates no WebSocket extensions
            # websockets 15+ follows https_proxy/wss_proxy from the environment;
            # a worker dials its bridge directly (remove this to go through one).
            proxy=None,
        ) as ws:
            hello = {"type": "hello", "worker_id": self.worker_id, "services": a.service, "max_inflight": a.max_inflight}
            if a.meta:
                hello["metadata"] = a.meta
            await ws.send(json.dumps(hello))
            first = await asyncio.wait_for(ws.recv(), 10)
            welcome = json.loads(first) if isinstance(first, str) else {}
            if welcome.get("type") != "welcome":
                raise Refused(first if isinstance(first, str) else "binary frame instead of welcome")
            if welcome.get("version") != 1:
                raise Refused("unsupported protocol version %r" % welcome.get("version"))
            log.info("connected session=%s services=%s", welcome.get("session_id"), ",".join(a.service))
            interval = welcome["ping_interval_ms"] / 1000
            silence = interval * (welcome["ping_misses"] + 1)
            calls = {}
            outbox = asyncio.Queue()
            writer = asyncio.create_task(self.write_loop(ws, outbox))
            pinger = asyncio.create_task(self.keepalive(ws, interval, silence))
            self.ws, self.outbox = ws, outbox
            if self.term.is_set():  # SIGTERM arrived while connecting
                outbox.put_nowait(json.dumps({"type": "drain"}))
            try:
                async for msg in ws:
                    if isinstance(msg, str):
                        self.on_text(msg, calls)
                    else:
                        self.on_binary(msg, calls, outbox)
            except ConnectionClosed:
                pass
            finally:
                self.ws = self.outbox = None
                for c in calls.values():
                    if c.task:
                        c.task.cancel()  # their replies cannot go out on another connection
                writer.cancel()
                pinger.cancel()
            log.info("connection closed: code=%s reason=%r", ws.close_code, ws.close_reason)
            return ws.close_code

    def on_text(self, msg, calls):
        try:
            f = json.loads(msg)
            kind = f["type"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable control frame: %r", msg[:200])
            return
        if kind == "cancel" or (kind == "error" and "id" in f):
            if kind == "error":
                log.warning("bridge error for call %s: %s %s", f["id"], f.get("code"), f.get("message"))
            call = calls.pop(f["id"], None)
            if call is None:
                return  # already answered or never seen: the two crossed on the wire
            log.info("cancel id=%s request_id=%s reason=%s", call.id, call.request_id, f.get("reason", f.get("code")))
            if call.task:
                call.task.cancel()
        elif kind == "error":
            log.warning("bridge error: %s %s", f.get("code"), f.get("message"))
        elif kind == "drain":
            log.info("bridge is shutting down")
        # credit, start and unknown types: nothing to do for this worker

    def on_binary(self, msg, calls, outbox):
        try:
            head, body = decode_frame(msg)
            kind, cid = head["type"], head["id"]
        except (ValueError, KeyError, TypeError) as e:
            log.warning("undecodable binary frame: %s", e)
            return
        if kind == "request":
            call = calls[cid] = Call(head, self.worker_id)
        elif kind == "body":
            call = calls.get(cid)
            if call is None or call.task is not None:
                return  # a chunk of a cancelled or finished call
        else:
            log.warning("unknown binary frame type %r", kind)
            return
        call.body += body
        if head["end"]:
            call.task = asyncio.create_task(self.handle(call, calls, outbox))

    async def handle(self, call, calls, outbox):
        path = call.head["path"].split("?", 1)[0]
        handler = HANDLERS.get("/" + path.rsplit("/", 1)[-1])
        try:
            if handler is None:
                status, headers, out = json_reply(
                    404, {"error": {"code": "not_found", "message": "no handler for %s" % call.head["path"]}}
                )
            else:
                status, headers, out = await handler(call)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a handler bug becomes a 500 the caller can read
            log.exception("handler for call %s failed", call.id)
            status, headers, out = json_reply(500, {"error": {"code": "handler_failed", "message": str(e)}})
        if calls.pop(call.id, None) is None:
            return  # cancelled meanwhile
        out = bytes(out)
        chunks = [out[i : i + CHUNK] for i in range(0, len(out), CHUNK)] or [b""]
        pairs, latin1 = wire_headers(headers)
        head = {"type": "response", "id": call.id, "status": status, "headers": pairs, "end": len(chunks) == 1}
        if latin1:
            head["latin1"] = latin1
        outbox.put_nowait(encode_frame(head, chunks[0]))
        for i, chunk in enumerate(chunks[1:], start=2):
            outbox.put_nowait(encode_frame({"type": "body", "id": call.id, "end": i == len(chunks)}, chunk))

    async def write_loop(self, ws, outbox):
        # One writer per connection: handlers never write to the socket themselves.
        try:
            while True:
                await ws.send(await outbox.get())
        except ConnectionClosed:
            pass

    async def keepalive(self, ws, interval, silence):
        # websockets answers the bridge's pings but never shows them to us, so we
        # ping the bridge ourselves and give up if no pong comes (PROTOCOL.md 8.3).
        try:
            while True:
                await asyncio.sleep(interval)
                pong = await ws.ping()
                try:
                    await asyncio.wait_for(pong, silence)
                except asyncio.TimeoutError:
                    log.warning("no pong from the bridge within %.1fs: reconnecting", silence)
                    ws.transport.abort()
                    return
        except ConnectionClosed:
            pass


MAX_METADATA_KEYS = 16  # PROTOCOL.md 3.1; the bridge refuses a hello with more


def meta_pair(text):
    """A --meta KEY=VALUE: a key of 1 to 64 bytes of A-Z a-z 0-9 _ - . and a
    value of at most 256 bytes of UTF-8 (the bridge's limits for `metadata`)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("want KEY=VALUE, got %r" % text)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", key):
        raise argparse.ArgumentTypeError("metadata key %r must be 1 to 64 of A-Z a-z 0-9 _ - ." % key)
    if len(value.encode("utf-8")) > 256:
        raise argparse.ArgumentTypeError("metadata value of %r must be at most 256 bytes" % key)
    return key, value


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    env = os.environ.get
    p.add_argument("--url", default=env("WSBRIDGE_URL", "wss://localhost:8443/"))
    p.add_argument("--token", default=env("WSBRIDGE_TOKEN", "change-me"))
    p.add_argument("--ca", default=env("WSBRIDGE_CA"), help="PEM file to trust, e.g. the bridge's certs/server.crt")
    p.add_argument("--service", action="append", help="a service to answer (repeatable; default: orders)")
    p.add_argument(
        "--worker-id",
        "--id",
        default="py-%s-%d" % (socket.gethostname(), os.getpid()),
        help="this worker's address: calls with the header Wsbridge-Worker: <id> come to it alone",
    )
    p.add_argument(
        "--meta",
        action="append",
        type=meta_pair,
        default=[],
        metavar="KEY=VALUE",
        help="metadata sent in the hello, for presence and fan-out selectors (repeatable)",
    )
    p.add_argument("--max-inflight", type=int, default=8)
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to wait for the bridge to close us")
    args = p.parse_args()
    args.service = args.service or ["orders"]
    args.meta = dict(args.meta)
    if len(args.meta) > MAX_METADATA_KEYS:
        p.error("at most %d --meta entries" % MAX_METADATA_KEYS)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s " + args.worker_id + " %(levelname)s %(message)s"
    )
    sys.exit(asyncio.run(Worker(args).run()))


if __name__ == "__main__":
    main()
