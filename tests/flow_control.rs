//! Per-call flow control (PROTOCOL.md §7.3) and the worker slot of a
//! streamed reply (§6.2), driven by hand-written workers so that every
//! credit is sent, withheld or counted by the test itself.
//!
//! The invariants checked here, from `src/bridge/http.rs` (`Upload`) and
//! `src/bridge/session.rs` (`credit`, `on_response`, `on_body`):
//!
//! * upload: the bridge has at most `window` request body bytes sent and not
//!   credited; a credit never raises that above one window;
//! * download: the bridge credits a streamed reply exactly as the caller's
//!   connection takes it, never more than it was sent; a flow-controlled
//!   worker with more than `window` bytes waiting for the caller is cut off
//!   (caller's body ends in error, worker gets `error` `bad_response`), one
//!   that keeps to its window never is;
//! * a streamed reply keeps its worker slot until the caller has taken the
//!   whole body, not just until its head (or its last frame) arrived.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use wsbridge::protocol::{self, BodyHead, Control, DataHead};

/// How long "nothing more arrives" is watched for, to prove an absence.
/// An upload takes one such wait per window, so it is kept short; on a busy
/// machine it can only make a check weaker, never make it fail wrongly.
const QUIET: Duration = Duration::from_millis(150);

/// How long a stalled stream is watched before it counts as stalled.
const STALL: Duration = Duration::from_millis(300);

/// Bound on waiting for an event that must come soon (a credit, an error),
/// shorter than `LIMIT` so that a broken bridge fails the test quickly.
const SOON: Duration = Duration::from_secs(5);

/// Body bytes per frame a test worker streams.
const PIECE: usize = 64 * 1024;

/// Position-dependent bytes: a lost, repeated or reordered piece shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8 ^ (i >> 18) as u8)
        .collect()
}

/// Compares two large bodies without printing megabytes.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes, want {}; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

/// The next frame, or `None` if nothing arrives within `wait`.
async fn next_within(raw: &mut RawWorker, wait: Duration) -> Option<Frame> {
    tokio::time::timeout(wait, raw.next()).await.ok()
}

async fn send_credit(raw: &mut RawWorker, id: u64, bytes: usize) {
    let credit = Control::Credit {
        id,
        bytes: bytes as u64,
    };
    raw.send_text(&protocol::encode_control(&credit)).await;
}

async fn send_body(raw: &mut RawWorker, id: u64, end: bool, data: &[u8]) {
    let head = DataHead::Body(BodyHead { id, end });
    raw.send_binary(protocol::encode_data(&head, data)).await;
}

async fn flow_worker(bridge: &TestBridge) -> (RawWorker, usize) {
    let raw = RawWorker::connect_with(bridge, &["default"], 4, true).await;
    let window = raw.welcome.window as usize;
    assert_eq!(window, protocol::WINDOW, "flow control was negotiated");
    (raw, window)
}

/// Reads a reply's body to its end in a task; returns the bytes it got
/// and whether the body ended cleanly or in an error.
fn read_body(
    resp: http::Response<hyper::body::Incoming>,
) -> tokio::task::JoinHandle<(Vec<u8>, Result<(), String>)> {
    tokio::spawn(async move {
        let mut body = resp.into_body();
        let mut got = Vec::new();
        loop {
            match body.frame().await {
                None => return (got, Ok(())),
                Some(Ok(frame)) => got.extend_from_slice(&frame.into_data().unwrap_or_default()),
                Some(Err(e)) => return (got, Err(e.to_string())),
            }
        }
    })
}

/// A caller on a raw socket with a tiny receive buffer that sends `GET path`
/// and then reads nothing until the test says so.
async fn silent_caller(bridge: &TestBridge, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut tcp = with_timeout(socket.connect(bridge.http))
        .await
        .expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    with_timeout(tcp.write_all(req.as_bytes()))
        .await
        .expect("write request");
    tcp
}

/// An upper bound on the reply bytes the bridge's HTTP side can hand on
/// towards a caller that reads nothing: the most the kernel lets the
/// bridge's send buffer grow to (`tcp_wmem` max), the caller's receive
/// buffer, and 1 MiB for hyper's own write buffer (about 400 KiB).
fn buffer_slack(caller: &TcpStream) -> usize {
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<usize>().ok())
        .unwrap_or(16 << 20);
    let rcvbuf = socket2::SockRef::from(caller)
        .recv_buffer_size()
        .expect("SO_RCVBUF");
    wmem_max + rcvbuf + (1 << 20)
}

/// Reads a raw caller's connection to its end (or reset).
async fn read_to_close(mut tcp: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match with_timeout(tcp.read(&mut buf)).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Splits a raw HTTP/1.1 response into its head and its de-chunked body;
/// `complete` is true only if the terminating zero-size chunk arrived.
fn dechunk(raw: &[u8]) -> (String, Vec<u8>, bool) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut rest = &raw[split + 4..];
    let mut body = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (head, body, false);
        };
        let line = std::str::from_utf8(&rest[..eol]).expect("chunk size line");
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        rest = &rest[eol + 2..];
        if size == 0 {
            return (head, body, rest.starts_with(b"\r\n"));
        }
        if rest.len() < size + 2 {
            body.extend_from_slice(&rest[..size.min(rest.len())]);
            return (head, body, false);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// A worker-side upload receiver: the call's id once seen, the body so far,
/// whether its end arrived.
#[derive(Default)]
struct Upload {
    id: Option<u64>,
    body: Vec<u8>,
    ended: bool,
}

impl Upload {
    /// Reads one round: the first frame (which must come), then every frame
    /// until nothing arrives for `QUIET`. Returns the body bytes received;
    /// fails as soon as they exceed `window` (no credit is sent meanwhile).
    async fn round(&mut self, raw: &mut RawWorker, window: usize) -> usize {
        let mut received = 0;
        let mut frame = Some(raw.next().await);
        while let Some(f) = frame {
            match f {
                Frame::Data(DataHead::Request(h), data) => {
                    assert!(self.id.is_none(), "a second request head");
                    assert!(!h.end, "a body of several windows streams");
                    self.id = Some(h.id);
                    received += data.len();
                    self.body.extend_from_slice(&data);
                }
                Frame::Data(DataHead::Body(b), data) => {
                    assert_eq!(Some(b.id), self.id, "a chunk of the upload");
                    assert!(!self.ended, "a chunk after the end");
                    received += data.len();
                    self.body.extend_from_slice(&data);
                    self.ended = b.end;
                }
                other => panic!("expected upload frames, got {other:?}"),
            }
            assert!(
                received <= window,
                "the bridge sent {received} body bytes without credit, window {window} \
                 ({} received in all)",
                self.body.len()
            );
            frame = next_within(raw, QUIET).await;
        }
        received
    }

    fn id(&self) -> u64 {
        self.id.expect("the request head arrived")
    }
}

#[tokio::test]
async fn an_upload_never_runs_more_than_a_window_ahead_of_the_workers_credit() {
    let bridge = TestBridge::start(|c| c.http.request_timeout = Duration::from_secs(20)).await;
    let (mut raw, window) = flow_worker(&bridge).await;
    let data = pattern(4 << 20);
    let url = bridge.at("/upload");
    let sent = Bytes::from(data.clone());
    let call = tokio::spawn(async move { post(&http_client(), &url, sent).await });

    // Each round: take everything the bridge sends without credit, check it
    // is within the window, then credit exactly that and expect more.
    let mut up = Upload::default();
    while !up.ended {
        let received = up.round(&mut raw, window).await;
        assert!(
            received > 0 || up.ended,
            "credit of a whole round brought nothing"
        );
        send_credit(&mut raw, up.id(), received).await;
    }
    assert_same(&up.body, &data, "the upload the worker received");

    raw.reply(up.id(), 200, &[], b"stored").await;
    let reply = with_timeout(call).await.expect("join");
    assert_eq!(
        (reply.head.status, reply.body.as_ref()),
        (StatusCode::OK, &b"stored"[..])
    );
    bridge.until_idle().await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_credit_never_lets_the_bridge_send_more_than_one_window_ahead() {
    let bridge = TestBridge::start(|c| c.http.request_timeout = Duration::from_secs(20)).await;
    let (mut raw, window) = flow_worker(&bridge).await;
    let data = pattern(2 << 20);
    let url = bridge.at("/upload");
    let sent = Bytes::from(data.clone());
    let call = tokio::spawn(async move { post(&http_client(), &url, sent).await });

    let mut up = Upload::default();
    let first = up.round(&mut raw, window).await;
    assert_eq!(
        first, window,
        "the head carries one chunk, which fills the window"
    );
    // A confused worker credits eight windows at once: the bridge keeps the
    // one window that is free and drops the rest, so it still sends at most
    // one window before the next credit.
    send_credit(&mut raw, up.id(), 8 * window).await;
    let second = up.round(&mut raw, window).await;
    assert!(second > 0, "the credit let more through");
    send_credit(&mut raw, up.id(), second).await;
    while !up.ended {
        let received = up.round(&mut raw, window).await;
        send_credit(&mut raw, up.id(), received).await;
    }
    assert_same(&up.body, &data, "the upload the worker received");

    raw.reply(up.id(), 200, &[], b"ok").await;
    let reply = with_timeout(call).await.expect("join");
    assert_eq!(reply.head.status, StatusCode::OK);
    bridge.until_idle().await;
    bridge.stop().await;
}

/// Reads frames until an `error` for call `id` arrives, skipping the
/// bridge's credits for it; returns the error's code.
async fn expect_call_error(raw: &mut RawWorker, id: u64) -> String {
    loop {
        match next_within(raw, SOON).await {
            Some(Frame::Control(Control::Credit { id: c, .. })) if c == id => {}
            Some(Frame::Control(Control::Error {
                id: Some(e), code, ..
            })) if e == id => return code,
            Some(other) => panic!("expected an error for call {id}, got {other:?}"),
            None => panic!("no error for call {id} within {SOON:?}"),
        }
    }
}

#[tokio::test]
async fn a_worker_chunk_larger_than_the_window_cuts_the_reply_off() {
    let bridge = TestBridge::start(|_| {}).await;
    let (mut raw, window) = flow_worker(&bridge).await;
    // The caller has the head (so nothing can stop it from being relayed)
    // and 1000 body bytes in it.
    let (req, resp) = raw.streamed_reply(&bridge, "/overrun", &[b'h'; 1000]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let caller = read_body(resp);
    // More than a window at once, with no credit for it: a violation
    // whatever the caller has read so far. The clean end that follows must
    // not make the cut-off reply look complete.
    send_body(&mut raw, req.id, false, &vec![b'x'; window + 1]).await;
    send_body(&mut raw, req.id, true, b"").await;

    let (got, end) = with_timeout(caller).await.expect("join");
    assert!(
        end.is_err(),
        "an overrun reply must end in an error, got a clean end after {} bytes",
        got.len()
    );
    assert!(
        got.len() <= 1000 && got.iter().all(|&b| b == b'h'),
        "the overrunning chunk must not reach the caller ({} bytes did)",
        got.len()
    );
    assert_eq!(expect_call_error(&mut raw, req.id).await, "bad_response");
    bridge.until_idle().await;
    bridge.stop().await;
}

/// What a caller made of a reply: its status and whole body, or the error
/// that ended it (a failed head or a cut-off body).
fn spawn_call(bridge: &TestBridge, path: &str) -> tokio::task::JoinHandle<Result<Reply, String>> {
    let url = bridge.at(path);
    tokio::spawn(async move {
        let req = Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = http_client()
            .request(req)
            .await
            .map_err(|e| format!("head: {e}"))?;
        let (head, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Reply { head, body })
    })
}

#[tokio::test]
async fn a_streamed_head_carrying_more_than_the_window_is_refused() {
    let bridge = TestBridge::start(|_| {}).await;
    let (mut raw, window) = flow_worker(&bridge).await;
    let call = spawn_call(&bridge, "/big-head");
    let (req, _) = raw.next_request().await;
    // The head's bytes count against the window (PROTOCOL.md 7.3): a head
    // with window + 1 of them has more than a window waiting for the caller
    // the moment it arrives.
    raw.send_binary(protocol::encode_data(
        &response_head(req.id, 200, false),
        &vec![b'x'; window + 1],
    ))
    .await;
    // If the bridge let it through, wait until the caller's connection has
    // taken all of it (the bridge's credits say so) and end the reply: the
    // later chunk then finds nothing waiting and cannot be what fails it.
    let mut credited = 0;
    let mut refused = false;
    while credited < window + 1 && !refused {
        match next_within(&mut raw, SOON).await {
            Some(Frame::Control(Control::Credit { id, bytes })) if id == req.id => {
                credited += bytes as usize;
            }
            Some(Frame::Control(Control::Error {
                id: Some(id), code, ..
            })) if id == req.id => {
                assert_eq!(code, "bad_response");
                refused = true;
            }
            other => panic!("expected credits or an error, got {other:?}"),
        }
    }
    if !refused {
        send_body(&mut raw, req.id, true, b"").await;
    }
    let outcome = with_timeout(call).await.expect("join");
    if let Ok(reply) = &outcome {
        assert_ne!(
            (reply.head.status, reply.body.len()),
            (StatusCode::OK, window + 1),
            "a head over the window passed as a complete reply"
        );
    }
    assert!(refused, "the worker was not told its reply was refused");
    bridge.until_idle().await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_worker_that_streams_without_credit_to_a_caller_that_reads_nothing_is_cut_off() {
    let bridge = TestBridge::start(|_| {}).await;
    let (mut raw, window) = flow_worker(&bridge).await;
    let caller = silent_caller(&bridge, "/flood").await;
    let (req, _) = raw.next_request().await;
    // Well below max_response_body (64 MiB), the limit for workers without
    // flow control: only the window can stop this worker.
    let cap = buffer_slack(&caller) + 8 * window;
    raw.send_binary(protocol::encode_data(
        &response_head(req.id, 200, false),
        b"",
    ))
    .await;
    // Each chunk fits the window on its own; together they overrun it
    // once the caller's buffers are full. Never wait for credit.
    let chunk = vec![b'f'; protocol::CHUNK_SIZE];
    let mut sent = 0;
    let mut code = None;
    while sent < cap && code.is_none() {
        send_body(&mut raw, req.id, false, &chunk).await;
        sent += chunk.len();
        while let Some(frame) = next_within(&mut raw, Duration::ZERO).await {
            match frame {
                Frame::Control(Control::Credit { id, .. }) if id == req.id => {}
                Frame::Control(Control::Error {
                    id: Some(id),
                    code: c,
                    ..
                }) if id == req.id => code = Some(c),
                other => panic!("expected credits or an error, got {other:?}"),
            }
        }
    }
    let code = match code {
        Some(code) => code,
        None => expect_call_error(&mut raw, req.id).await,
    };
    assert_eq!(code, "bad_response", "after {sent} bytes without credit");

    // The caller's reply is cut off: it never gets the terminating chunk.
    let answer = read_to_close(caller).await;
    let (head, body, complete) = dechunk(&answer);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !complete,
        "a cut-off reply must not end like a complete one"
    );
    assert!(body.len() < sent, "{} of {sent} bytes", body.len());
    bridge.until_idle().await;
    bridge.stop().await;
}

/// The worker's side of a streamed reply under flow control: what it sent
/// and what the bridge credited, and the window between them.
struct Stream {
    id: u64,
    window: usize,
    sent: usize,
    credited: usize,
}

impl Stream {
    fn room(&self) -> usize {
        self.window - (self.sent - self.credited)
    }

    async fn send(&mut self, raw: &mut RawWorker, data: &[u8]) {
        assert!(
            data.len() <= self.room(),
            "the test worker keeps its window"
        );
        send_body(raw, self.id, false, data).await;
        self.sent += data.len();
    }

    /// Waits up to `wait` for a credit; false if none came.
    async fn credit(&mut self, raw: &mut RawWorker, wait: Duration) -> bool {
        match next_within(raw, wait).await {
            None => false,
            Some(Frame::Control(Control::Credit { id, bytes })) if id == self.id => {
                self.credited += bytes as usize;
                assert!(
                    self.credited <= self.sent,
                    "the bridge credited {} bytes of {} sent",
                    self.credited,
                    self.sent
                );
                true
            }
            Some(other) => panic!("expected a credit for call {}, got {other:?}", self.id),
        }
    }

    /// Sends `data[from..]` in pieces, each as soon as the window allows.
    async fn send_rest(&mut self, raw: &mut RawWorker, data: &[u8], from: usize) {
        let mut at = from;
        while at < data.len() {
            let piece = PIECE.min(data.len() - at);
            if self.room() < piece {
                assert!(
                    self.credit(raw, SOON).await,
                    "no credit within {SOON:?} ({} sent, {} credited)",
                    self.sent,
                    self.credited
                );
                continue;
            }
            self.send(raw, &data[at..at + piece]).await;
            at += piece;
        }
    }

    /// Reads credits until all that was sent is credited.
    async fn until_all_credited(&mut self, raw: &mut RawWorker) {
        while self.credited < self.sent {
            assert!(
                self.credit(raw, SOON).await,
                "credits stopped at {} of {} bytes the caller read",
                self.credited,
                self.sent
            );
        }
    }
}

#[tokio::test]
async fn a_worker_that_keeps_to_its_window_completes_a_large_download() {
    let bridge = TestBridge::start(|_| {}).await;
    let (mut raw, window) = flow_worker(&bridge).await;
    let (req, resp) = raw.streamed_reply(&bridge, "/download", b"").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let caller = read_body(resp);
    let data = pattern(3 << 20);
    let mut stream = Stream {
        id: req.id,
        window,
        sent: 0,
        credited: 0,
    };
    // A whole window in one frame: exactly the limit, which is allowed.
    stream.send(&mut raw, &data[..window]).await;
    stream.send_rest(&mut raw, &data, window).await;
    send_body(&mut raw, req.id, true, b"").await;

    let (got, end) = with_timeout(caller).await.expect("join");
    assert_eq!(end, Ok(()), "the download ends cleanly");
    assert_same(&got, &data, "the download the caller received");
    // Every byte the caller took is credited, and never more.
    stream.until_all_credited(&mut raw).await;
    assert_eq!(stream.credited, data.len());
    bridge.until_idle().await;
    bridge.stop().await;
}

#[tokio::test]
async fn the_bridge_credits_a_reply_only_as_fast_as_the_caller_reads_it() {
    let bridge = TestBridge::start(|_| {}).await;
    let (mut raw, window) = flow_worker(&bridge).await;
    let caller = silent_caller(&bridge, "/slow-reader").await;
    let (req, _) = raw.next_request().await;
    let slack = buffer_slack(&caller);
    let data = pattern((slack + 4 * window).next_multiple_of(PIECE));
    raw.send_binary(protocol::encode_data(
        &response_head(req.id, 200, false),
        b"",
    ))
    .await;
    let mut stream = Stream {
        id: req.id,
        window,
        sent: 0,
        credited: 0,
    };

    // The caller reads nothing: the worker sends whenever it has window,
    // and the credits must stop once the buffers towards the caller are
    // full, long before the whole reply is sent.
    loop {
        assert!(
            stream.sent < data.len(),
            "all {} bytes were credited to a caller that read none",
            data.len()
        );
        let piece = PIECE.min(data.len() - stream.sent);
        if stream.room() >= piece {
            let at = stream.sent;
            stream.send(&mut raw, &data[at..at + piece]).await;
        } else if !stream.credit(&mut raw, STALL).await {
            break;
        }
    }
    assert!(
        stream.credited <= slack,
        "{} bytes credited while the caller read nothing; its buffers hold at most {slack}",
        stream.credited
    );
    let stalled_at = stream.sent;

    // Now the caller reads: credits resume and the reply completes.
    let reader = tokio::spawn(read_to_close(caller));
    stream.send_rest(&mut raw, &data, stalled_at).await;
    send_body(&mut raw, req.id, true, b"").await;
    let answer = with_timeout(reader).await.expect("join");
    let (head, body, complete) = dechunk(&answer);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(complete, "the reply ends cleanly");
    assert_same(&body, &data, "the reply the caller read");
    stream.until_all_credited(&mut raw).await;
    assert_eq!(stream.credited, data.len());
    bridge.until_idle().await;
    bridge.stop().await;
}

/// Waits until `n` calls are queued, failing at once if instead a frame
/// reaches the worker (the call was dispatched, not queued).
async fn queued_not_dispatched(bridge: &TestBridge, raw: &mut RawWorker, n: usize) {
    tokio::select! {
        () = bridge.until_queued("default", n) => {}
        frame = raw.next() => panic!("the worker got {frame:?} while its only slot was taken"),
    }
}

#[tokio::test]
async fn a_streamed_reply_keeps_the_worker_slot_until_its_body_ends() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 1).await;
    let (req1, resp1) = raw.streamed_reply(&bridge, "/one", b"first ").await;
    assert_eq!(resp1.status(), StatusCode::OK);

    // The head has been relayed, the body is still open: the slot is taken,
    // so a second call waits in the queue instead of reaching the worker.
    let call2 = spawn_get(&bridge, "/two");
    queued_not_dispatched(&bridge, &mut raw, 1).await;
    assert_eq!(bridge.handle.in_flight(), 1);

    // The body ends: the slot frees and the queued call arrives.
    send_body(&mut raw, req1.id, true, b"and last").await;
    let (req2, _) = raw.next_request().await;
    assert_eq!(req2.path, "/two");
    raw.reply(req2.id, 200, &[], b"second").await;
    let body1 = with_timeout(resp1.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body1, "first and last");
    assert_eq!(with_timeout(call2).await.expect("join").body, "second");
    bridge.until_idle().await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_streamed_reply_keeps_the_worker_slot_until_the_caller_has_taken_it() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 1).await;
    let caller = silent_caller(&bridge, "/big").await;
    let (req1, _) = raw.next_request().await;
    // More than the buffers towards the caller hold, so some of it is still
    // in the bridge after the worker's last frame (no flow control: the
    // bridge may hold up to max_response_body).
    let data = pattern((buffer_slack(&caller) + (2 << 20)).next_multiple_of(PIECE));
    raw.send_binary(protocol::encode_data(
        &response_head(req1.id, 200, false),
        b"",
    ))
    .await;
    for piece in data.chunks(protocol::CHUNK_SIZE) {
        send_body(&mut raw, req1.id, false, piece).await;
    }
    send_body(&mut raw, req1.id, true, b"").await;
    // The bridge has the worker's last frame once the call leaves the
    // pending map; the caller still has most of the body to take.
    bridge.until_idle().await;

    let call2 = spawn_get(&bridge, "/two");
    queued_not_dispatched(&bridge, &mut raw, 1).await;
    assert!(
        next_within(&mut raw, STALL).await.is_none(),
        "a call reached the worker before the caller took the last reply"
    );

    let reader = tokio::spawn(read_to_close(caller));
    let (req2, _) = raw.next_request().await;
    assert_eq!(req2.path, "/two");
    raw.reply(req2.id, 200, &[], b"second").await;
    let answer = with_timeout(reader).await.expect("join");
    let (head, body, complete) = dechunk(&answer);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(complete, "the reply ends cleanly");
    assert_same(&body, &data, "the reply the caller read");
    assert_eq!(with_timeout(call2).await.expect("join").body, "second");
    bridge.stop().await;
}
