//! Resilience: a bridge restarted under 50 agents, and hostile workers and
//! callers. In every case the calls caught in it end in bounded time with
//! the answer the docs promise, and everyone else keeps being served.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    raw_http::{read_reply, RawReply},
    *,
};
use futures_util::SinkExt;
use http::StatusCode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::{JoinHandle, JoinSet},
};
use tokio_tungstenite::tungstenite::{
    protocol::frame::{coding::OpCode, Frame as WsFrame},
    Message,
};
use tokio_util::task::AbortOnDropHandle;
use wsbridge::{
    protocol::{self, BodyHead, Control, DataHead, RequestHead},
    worker,
};

// ---------------------------------------------------------------------------
// 2. A bridge restarted under 50 agents
// ---------------------------------------------------------------------------

const AGENTS: usize = 50;

/// A free loopback port (bound and released; good enough for a test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The `worker=` field of a log line.
fn worker_field(line: &str) -> Option<String> {
    let rest = line.split(" worker=").nth(1)?;
    rest.split_whitespace().next().map(str::to_owned)
}

/// Reads `bridge`'s log until `n` distinct workers have logged `worker
/// connected`; returns when each did.
async fn until_connected(
    bridge: &mut BridgeProcess,
    n: usize,
    limit: Duration,
) -> HashMap<String, Duration> {
    let mut seen = HashMap::new();
    let deadline = tokio::time::Instant::now() + limit;
    while seen.len() < n {
        let line = match tokio::time::timeout_at(deadline, bridge.next_log_line()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the bridge exited; {} workers connected", seen.len()),
            Err(_) => panic!(
                "only {} of {n} workers connected within {limit:?}",
                seen.len()
            ),
        };
        if line.contains("worker connected") {
            let who = worker_field(&line).expect("worker= on the connect line");
            let at = log_time(&line).expect("time stamp");
            seen.entry(who).or_insert(at);
        }
    }
    seen
}

/// SIGTERM, then the log to its end: when each worker was let go.
async fn terminate(mut bridge: BridgeProcess) -> HashMap<String, Duration> {
    bridge.signal("TERM");
    let mut gone = HashMap::new();
    while let Some(line) = within(
        Duration::from_secs(10),
        "bridge stops",
        bridge.next_log_line(),
    )
    .await
    {
        if line.contains("worker disconnected") {
            let who = worker_field(&line).expect("worker= on the disconnect line");
            gone.insert(who, log_time(&line).expect("time stamp"));
        }
    }
    let exit = within(Duration::from_secs(10), "bridge exit", bridge.wait())
        .await
        .expect("wait");
    assert!(exit.success(), "SIGTERM ends the bridge cleanly: {exit}");
    gone
}

/// `wsbridge worker --echo` named `agent-{i}`, quiet, killed on drop.
fn quiet_agent(url: &str, ca: &Path, i: usize) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbridge"))
        .args(["worker", "--connect", url, "--service", "default", "--echo"])
        .arg("--ca")
        .arg(ca)
        .args(["--id", &format!("agent-{i}")])
        .env("WSBRIDGE_TOKEN", TOKEN)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn wsbridge worker")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Now, as time since the Unix epoch (the clock the log time stamps use).
fn wall_clock() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
}

/// How a set of instants is spread: first to last, the most that fall in
/// any 10 ms window, and a histogram in 10 ms steps from the first.
fn spread(instants: &[Duration]) -> (Duration, usize, String) {
    let mut sorted = instants.to_vec();
    sorted.sort();
    let (first, last) = (sorted[0], sorted[sorted.len() - 1]);
    let window = Duration::from_millis(10);
    let burst = (0..sorted.len())
        .map(|i| {
            sorted[i..]
                .iter()
                .take_while(|t| **t - sorted[i] < window)
                .count()
        })
        .max()
        .unwrap_or(0);
    let mut buckets: Vec<(u128, usize)> = Vec::new();
    for t in &sorted {
        let bucket = (*t - first).as_millis() / 10;
        match buckets.last_mut() {
            Some((b, n)) if *b == bucket => *n += 1,
            _ => buckets.push((bucket, 1)),
        }
    }
    let histogram = buckets
        .iter()
        .map(|(b, n)| format!("+{}ms:{n}", b * 10))
        .collect::<Vec<_>>()
        .join(" ");
    (last - first, burst, histogram)
}

/// Min, median and max, in ms.
fn summary(values: &[Duration]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort();
    format!(
        "min {:.1} ms, median {:.1} ms, max {:.1} ms",
        ms(sorted[0]),
        ms(sorted[sorted.len() / 2]),
        ms(sorted[sorted.len() - 1])
    )
}

/// Holds the worker port while the bridge is down, as a bridge that is not
/// ready yet: it notes when each connection arrives, then takes the TLS
/// handshake, upgrade and hello only to learn which agent dialled, and
/// hangs up (the agent backs off as after any failed attempt). Returns,
/// per agent, when its first redial arrived, once `n` agents have dialled.
async fn record_first_redials(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    n: usize,
) -> HashMap<String, Duration> {
    let tls = tokio_rustls::TlsAcceptor::from(
        wsbridge::tls::server_config(cert, key, None).expect("the bridge's certificate"),
    );
    // The stopping bridge closes its listener before it closes its worker
    // connections; take the port as soon as it is free. (Nothing announces
    // that moment, so this looks every millisecond.)
    let listener = within(Duration::from_secs(5), "the worker port frees up", async {
        loop {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.set_reuseaddr(true).expect("reuseaddr");
            match socket.bind(addr) {
                Ok(()) => break socket.listen(1024).expect("listen"),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        }
    })
    .await;
    let (tx, mut hellos) = mpsc::unbounded_channel::<(String, Duration)>();
    let mut tasks = JoinSet::new();
    let mut first = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while first.len() < n {
        let tcp = tokio::select! {
            accepted = listener.accept() => accepted.expect("accept").0,
            Some((who, at)) = hellos.recv() => {
                first.entry(who).or_insert(at);
                continue;
            }
            _ = tokio::time::sleep_until(deadline) => {
                panic!("only {} of {n} agents redialled within 5 s", first.len())
            }
        };
        let at = wall_clock();
        let (tls, tx) = (tls.clone(), tx.clone());
        tasks.spawn(async move {
            #[allow(clippy::result_large_err)]
            let offer = |_: &tokio_tungstenite::tungstenite::handshake::server::Request,
                         mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                resp.headers_mut().insert(
                    "sec-websocket-protocol",
                    http::HeaderValue::from_static(protocol::SUBPROTOCOL),
                );
                Ok(resp)
            };
            let Ok(stream) = tls.accept(tcp).await else {
                return;
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, offer).await else {
                return;
            };
            while let Some(Ok(msg)) = futures_util::StreamExt::next(&mut ws).await {
                if let Message::Text(text) = msg {
                    if let Ok(Control::Hello(hello)) = protocol::decode_control(&text) {
                        let _ = tx.send((hello.worker_id, at));
                    }
                    break;
                }
            }
        });
    }
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_come_back_after_a_bridge_restart_spread_by_jitter() {
    let dir = TempDir::new("restart50");
    let (http_port, workers_port) = (free_port(), free_port());
    let cert = dir.0.join("server.crt");
    let config = dir.0.join("wsbridge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            default_service = "default"
            shutdown_timeout = "2s"
            [http]
            listen = "127.0.0.1:{http_port}"
            [workers]
            listen = "127.0.0.1:{workers_port}"
            tls_cert = "{}"
            tls_key = "{}"
            auto_self_signed = true
            tokens = ["{TOKEN}"]
            "#,
            cert.display(),
            dir.0.join("server.key").display()
        ),
    )
    .expect("write config");
    let setup = Instant::now();
    let mut bridge = BridgeProcess::with_config(&config, &cert).await;
    let url = format!("wss://localhost:{workers_port}");
    let _agents: Vec<_> = (0..AGENTS).map(|i| quiet_agent(&url, &cert, i)).collect();
    until_connected(&mut bridge, AGENTS, Duration::from_secs(20)).await;
    eprintln!("{AGENTS} agents connected in {:?}", setup.elapsed());

    // SIGTERM. While the bridge is down, its port notes each agent's first
    // redial: the backoff's first wait, 100 ms x [0.5, 1), after its
    // disconnect.
    let addr = SocketAddr::from(([127, 0, 0, 1], workers_port));
    let key = dir.0.join("server.key");
    let (gone, dials) = tokio::join!(
        terminate(bridge),
        record_first_redials(addr, &cert, &key, AGENTS)
    );
    assert_eq!(gone.len(), AGENTS, "the bridge let every agent go");
    let (first_gone, last_gone) = (
        *gone.values().min().expect("disconnects"),
        *gone.values().max().expect("disconnects"),
    );
    // Then the bridge again: same config, same ports, same certificate.
    let mut bridge = BridgeProcess::with_config(&config, &cert).await;
    let back = until_connected(&mut bridge, AGENTS, Duration::from_secs(10)).await;

    // Per agent, from the old bridge's "worker disconnected" line.
    let since_gone = |at: &HashMap<String, Duration>| -> Vec<Duration> {
        at.iter()
            .map(|(who, t)| {
                let left = gone.get(who).expect("an agent that had left");
                t.saturating_sub(*left)
            })
            .collect()
    };
    let redials = since_gone(&dials);
    let delays = since_gone(&back);
    let (redial_spread, redial_burst, redial_histogram) = spread(&redials);
    let instants: Vec<Duration> = back.values().copied().collect();
    let (back_spread, back_burst, back_histogram) = spread(&instants);
    let ready = bridge.ready_at.expect("time stamp on the ready line");
    let gap = ready.saturating_sub(last_gone);
    eprintln!(
        "bridge restart, {AGENTS} agents (disconnected within {:.1} ms of each other):\n  \
         first redial: {} after the agent's disconnect; at most {redial_burst} in any 10 ms; \
         per 10 ms from the first: {redial_histogram}\n  \
         reconnect to the new bridge (listening {:.1} ms after the last disconnect): {} after the \
         agent's disconnect; first to last {:.1} ms; at most {back_burst} in any 10 ms; \
         per 10 ms from the first: {back_histogram}",
        ms(last_gone - first_gone),
        summary(&redials),
        ms(gap),
        summary(&delays),
        ms(back_spread),
    );

    // The first redials follow the backoff's first wait, 100 ms x [0.5, 1):
    // none sooner (with slack: the bridge logs a disconnect only after it
    // has closed the connection, a few ms after the agent started waiting),
    // many well inside it (a starved machine may delay some), and spread
    // over that 50 ms window. Without jitter every agent would redial
    // 100 ms after its disconnect, all 50 within a few milliseconds.
    let earliest = *redials.iter().min().expect("redials");
    assert!(
        earliest >= Duration::from_millis(35),
        "an agent redialled {earliest:?} after its disconnect; the backoff waits at least 50 ms"
    );
    let early = redials
        .iter()
        .filter(|d| **d < Duration::from_millis(95))
        .count();
    assert!(
        early >= AGENTS / 4,
        "only {early} of {AGENTS} agents redialled within 95 ms; the backoff waits 50..100 ms"
    );
    assert!(
        redial_spread >= Duration::from_millis(30),
        "all first redials within {redial_spread:?}"
    );
    assert!(
        redial_burst <= AGENTS / 2,
        "{redial_burst} of {AGENTS} first redials within 10 ms"
    );
    // All come back. An agent whose try failed at time t after its
    // disconnect waits less than 2 (t + 50 ms) before the next one, so once
    // the bridge listens (gap after the disconnects) everyone is back within
    // 3 gap + 100 ms, plus time for 50 handshakes on a small machine.
    let bound = gap * 3 + Duration::from_millis(100) + Duration::from_secs(1);
    let last_back = delays.iter().max().expect("delays");
    assert!(
        *last_back <= bound,
        "the last agent came back {last_back:?} after its disconnect, bound {bound:?}"
    );
    // The reconnects are not one instant either. (How many land in one
    // 10 ms window here depends on how fast this machine completes 50 TLS
    // handshakes, so it is printed, not asserted.)
    assert!(
        back_spread >= Duration::from_millis(30),
        "all reconnects within {back_spread:?}"
    );

    // The restarted bridge serves calls.
    let r = post(
        &http_client(),
        &format!("http://127.0.0.1:{http_port}/after-restart"),
        "still here",
    )
    .await;
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"still here"[..])
    );
    assert_eq!(r.header("x-echo-path"), "/after-restart");
}

// ---------------------------------------------------------------------------
// 3. Hostile workers and callers
// ---------------------------------------------------------------------------

/// A text frame the bridge answers with `unknown_frame`: sent after a frame
/// that should produce no answer, the next frame read must be the answer to
/// this one (the reader handles frames in order).
const MARKER: &str = r#"{"type":"marker"}"#;

async fn expect_error(raw: &mut RawWorker, want_id: Option<u64>, want_code: &str, what: &str) {
    match raw.next().await {
        Frame::Control(Control::Error { id, code, message }) => {
            assert_eq!(
                (id, code.as_str()),
                (want_id, want_code),
                "{what}: {message}"
            );
        }
        other => panic!("{what}: expected an error frame, got {other:?}"),
    }
}

/// Sends `MARKER` and checks that its answer is the next frame: whatever was
/// sent before it produced no frame.
async fn expect_silence(raw: &mut RawWorker, what: &str) {
    raw.send_text(MARKER).await;
    match raw.next().await {
        Frame::Control(Control::Error {
            id: None,
            code,
            message,
        }) if code == "unknown_frame" && message.contains("control") => {}
        other => panic!("{what}: expected no answer, got {other:?}"),
    }
}

fn binary_frame(prefix: u32, json: &str, body: &[u8]) -> Bytes {
    let mut frame = prefix.to_be_bytes().to_vec();
    frame.extend_from_slice(json.as_bytes());
    frame.extend_from_slice(body);
    Bytes::from(frame)
}

/// A frame whose prefix sets the LZ4 flag (bit 24).
fn lz4_flagged(json: &str, body: &[u8]) -> Bytes {
    binary_frame(1 << 24 | json.len() as u32, json, body)
}

/// A `request` frame, which only the bridge may send.
fn request_frame(id: u64) -> Bytes {
    protocol::encode_data(
        &DataHead::Request(RequestHead {
            id,
            request_id: "r".into(),
            service: "default".into(),
            method: "GET".into(),
            path: "/".into(),
            headers: vec![],
            latin1: vec![],
            end: true,
            gate: true,
        }),
        b"",
    )
}

fn len_prefixed(json: &str) -> Bytes {
    binary_frame(json.len() as u32, json, b"")
}

/// A call to the echo worker serving `orders`.
async fn served_by_echo(bridge: &TestBridge, what: &str) {
    let path = format!("/orders/{what}");
    let r = post(&http_client(), &bridge.at(&path), what.to_owned()).await;
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, what.as_bytes()),
        "{what}"
    );
    assert_eq!(r.header("x-echo-path"), path);
}

#[tokio::test]
async fn garbage_from_a_worker_is_answered_and_nobody_else_notices() {
    let bridge = TestBridge::start(|_| {}).await;
    let _echo = bridge.worker(&["orders"], 8, worker::echo).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    // A call on the hostile connection is in flight throughout.
    let pending = spawn_get(&bridge, "/in-flight");
    let (inflight, _) = raw.next_request().await;

    let mut noise = vec![0u8; 1000];
    let mut x = 0x2545_f491_u32;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    noise[0] = 0x7f; // unknown flag bits
    let garbage: Vec<(&str, Message, Option<u64>, Option<&str>)> = vec![
        (
            "text, not JSON",
            Message::text("}{ not json"),
            None,
            Some("malformed_frame"),
        ),
        (
            "text, JSON array",
            Message::text("[1,2,3]"),
            None,
            Some("malformed_frame"),
        ),
        (
            "a second hello",
            Message::text(
                r#"{"type":"hello","worker_id":"x","services":["default"],"max_inflight":1}"#,
            ),
            None,
            Some("unexpected_frame"),
        ),
        (
            "a cancel, which only the bridge sends",
            Message::text(r#"{"type":"cancel","id":1,"reason":"x"}"#),
            None,
            Some("unexpected_frame"),
        ),
        (
            "credit for no call",
            Message::text(r#"{"type":"credit","id":424242,"bytes":99999999}"#),
            None,
            None,
        ),
        (
            "accepted for no call",
            Message::text(r#"{"type":"accepted","id":424242}"#),
            None,
            None,
        ),
        (
            "an error for no call",
            Message::text(r#"{"type":"error","code":"x","message":"y"}"#),
            None,
            None,
        ),
        (
            "binary, empty",
            Message::Binary(Bytes::new()),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, 2 bytes",
            Message::Binary(Bytes::from_static(&[0, 1])),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, length past the end",
            Message::Binary(binary_frame(50, "{}", b"")),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, length over MAX_HEADER_LEN",
            Message::Binary(binary_frame(0x00ff_ffff, "{}", b"")),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, noise",
            Message::Binary(Bytes::from(noise)),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, compressed without agreement",
            Message::Binary(lz4_flagged(
                r#"{"type":"response","id":424242,"status":200}"#,
                &[4, 0, 0, 0, 0x40, b'a', b'b', b'c', b'd'],
            )),
            Some(424_242),
            Some("malformed_frame"),
        ),
        (
            "binary, JSON header not an object",
            Message::Binary(len_prefixed("\"response\"")),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, unknown type",
            Message::Binary(len_prefixed(r#"{"type":"launch","id":1}"#)),
            None,
            Some("unknown_frame"),
        ),
        (
            "binary, a request from a worker",
            Message::Binary(request_frame(0)),
            None,
            Some("unexpected_frame"),
        ),
        (
            "binary, a reply for no call",
            Message::Binary(protocol::encode_data(
                &response_head(424_242, 200, true),
                b"x",
            )),
            Some(424_242),
            Some("unknown_call"),
        ),
        (
            "binary, a body chunk for no call",
            Message::Binary(protocol::encode_data(
                &DataHead::Body(BodyHead {
                    id: 424_242,
                    end: true,
                }),
                b"x",
            )),
            Some(424_242),
            Some("unknown_call"),
        ),
    ];
    // Each error frame and each marker is a counted violation; fewer than
    // the 32 that close a connection.
    let mut violations = 0;
    for (what, msg, id, code) in garbage {
        with_timeout(raw.ws.send(msg)).await.expect("send");
        match code {
            Some(code) => expect_error(&mut raw, id, code, what).await,
            None => expect_silence(&mut raw, what).await,
        }
        violations += 1;
        // Everyone else is served meanwhile.
        served_by_echo(&bridge, "meanwhile").await;
    }
    // The hostile connection itself is intact: its call in flight is
    // answered, and a new one is served.
    raw.reply(inflight.id, 200, &[], b"still correlated").await;
    let r = with_timeout(pending).await.expect("join");
    assert_eq!(r.body, "still correlated");
    served_by_raw(&bridge, &mut raw, "/after-garbage").await;
    assert_eq!(bridge.handle.protocol_violations(), violations);

    // Text that is not UTF-8 breaks the WebSocket itself: that connection
    // ends, with a close frame, and nothing else does.
    let bad_utf8 = WsFrame::message(
        Bytes::from_static(&[0xff, 0xfe, 0x80]),
        OpCode::Data(tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Text),
        true,
    );
    with_timeout(raw.ws.send(Message::Frame(bad_utf8)))
        .await
        .expect("send");
    assert!(matches!(raw.next().await, Frame::Closed));
    within(
        Duration::from_secs(5),
        "the hostile worker is unregistered",
        async {
            while bridge.handle.workers("default") > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        },
    )
    .await;
    served_by_echo(&bridge, "after").await;
    bridge.stop().await;
}

// Duplicate whole replies are covered by tests/violations.rs; these are the
// streamed cases.
#[tokio::test]
async fn a_second_head_for_a_streamed_reply_is_ignored_after_it_ended_and_cuts_it_off_before() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;

    // A streamed reply that has ended, then a second head for its id.
    let call = spawn_get(&bridge, "/dup-streamed");
    let (req, _) = raw.next_request().await;
    raw.send_binary(protocol::encode_data(
        &response_head(req.id, 200, false),
        b"one,",
    ))
    .await;
    let last = DataHead::Body(BodyHead {
        id: req.id,
        end: true,
    });
    raw.send_binary(protocol::encode_data(&last, b"two")).await;
    raw.reply(req.id, 200, &[], b"again").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.body, "one,two");
    expect_silence(&mut raw, "a head after a finished stream").await;

    // A second head while the stream is still open is a broken reply: the
    // caller's body is cut off, the worker is told.
    let (req, resp) = raw.streamed_reply(&bridge, "/dup-open", b"part").await;
    raw.reply(req.id, 200, &[], b"impostor").await;
    let body = within(
        Duration::from_secs(2),
        "the cut-off body ends",
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await;
    assert!(body.is_err(), "the body must be cut off, not end cleanly");
    expect_error(&mut raw, Some(req.id), "bad_response", "a head mid-stream").await;

    // Every reply still goes to its own caller.
    served_by_raw(&bridge, &mut raw, "/next").await;
    bridge.until_idle().await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_worker_that_stops_reading_is_dropped_after_the_write_stall_bound() {
    let interval = Duration::from_millis(200);
    let misses = 2;
    let bridge = TestBridge::start(|c| {
        c.workers.ping_interval = interval;
        c.workers.ping_misses = misses;
        c.http.max_body = wsbridge::config::ByteSize(64 << 20);
        c.http.request_timeout = Duration::from_secs(10);
    })
    .await;
    let stall = interval * (misses + 1);
    // A worker without flow control that never reads again after its
    // welcome: it answers no pings, and an upload to it fills every buffer
    // on the way until the bridge's writes stop making progress.
    let stuck = RawWorker::connect(&bridge, &["default"], 4).await;
    const UPLOAD: usize = 32 << 20;
    let tcp = with_timeout(TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    let (rd, mut wr) = tcp.into_split();
    let started = Instant::now();
    let _writer = AbortOnDropHandle::new(tokio::spawn(async move {
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nX-Request-Id: stuck-1\r\nContent-Length: {UPLOAD}\r\n\r\n"
        );
        if wr.write_all(head.as_bytes()).await.is_err() {
            return wr;
        }
        let chunk = vec![b'u'; 64 * 1024];
        for _ in 0..UPLOAD / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        wr
    }));
    let upload = tokio::spawn(async move {
        let reply = read_reply(rd).await;
        (reply, started.elapsed())
    });
    within(
        Duration::from_secs(5),
        "the upload reaches the worker",
        async {
            while bridge.handle.in_flight() < 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        },
    )
    .await;
    // Everyone else is served while the stuck worker holds its call.
    let _echo = bridge.worker(&["default"], 8, worker::echo).await;
    let r = post(&http_client(), &bridge.at("/meanwhile"), "served").await;
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"served"[..])
    );
    assert!(
        !upload.is_finished(),
        "the upload ended before the other call was served"
    );

    let (reply, took) = within(
        stall + Duration::from_secs(2),
        "the stuck upload ends",
        upload,
    )
    .await
    .expect("join");
    assert_eq!(
        reply.status,
        502,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["error"]["code"], "worker_lost");
    assert_eq!(reply.json()["error"]["request_id"], "stuck-1");
    assert_eq!(reply.header("x-request-id"), "stuck-1");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        message.contains("stopped reading"),
        "not the write stall: {message}"
    );
    assert!(
        took >= stall && took <= stall + Duration::from_millis(1500),
        "dropped {took:?} after the upload began; the stall bound is {stall:?}"
    );
    eprintln!("a worker that stopped reading was dropped {took:?} after the upload began (bound {stall:?})");
    within(
        Duration::from_secs(5),
        "the stuck worker is unregistered",
        async {
            while bridge.handle.workers("default") > 1 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        },
    )
    .await;
    let r = post(&http_client(), &bridge.at("/after"), "still served").await;
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"still served"[..])
    );
    drop(stuck);
    bridge.stop().await;
}

#[tokio::test]
async fn slowloris_callers_are_cut_off_after_header_read_timeout_while_others_are_served() {
    let header_timeout = Duration::from_millis(800);
    let bridge = TestBridge::start(|c| c.http.header_read_timeout = header_timeout).await;
    let _w = bridge.worker(&["default"], 8, worker::echo).await;
    const LORISES: usize = 20;
    const DRIBBLE: usize = 100; // bytes, one every 50 ms: 5 s if never cut
    let lorises: Vec<JoinHandle<(Duration, usize, Vec<u8>)>> = (0..LORISES)
        .map(|_| {
            let addr = bridge.http;
            tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let _ = tcp.set_nodelay(true);
                let started = Instant::now();
                let (mut rd, mut wr) = tcp.into_split();
                let sent = Arc::new(AtomicUsize::new(0));
                let counter = sent.clone();
                let _dribbler = AbortOnDropHandle::new(tokio::spawn(async move {
                    let head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: ";
                    if wr.write_all(head).await.is_err() {
                        return;
                    }
                    for _ in 0..DRIBBLE {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if wr.write_all(b"a").await.is_err() {
                            return;
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                }));
                let mut got = Vec::new();
                // EOF or a reset: either way the bridge let go.
                let _ = rd.read_to_end(&mut got).await;
                (started.elapsed(), sent.load(Ordering::SeqCst), got)
            })
        })
        .collect();
    // Other callers, each on its own connection (header_read_timeout also
    // closes idle keep-alive connections), are served while they dribble.
    for i in 0..10 {
        let r = post(&http_client(), &bridge.at("/busy"), format!("call {i}")).await;
        assert_eq!(r.body, format!("call {i}"));
    }
    assert!(
        lorises.iter().all(|l| !l.is_finished()),
        "the calls were served while every slowloris was still connected"
    );
    for loris in lorises {
        let (open, sent, got) = within(Duration::from_secs(3), "a slowloris is cut off", loris)
            .await
            .expect("join");
        assert!(
            open >= header_timeout - Duration::from_millis(50)
                && open <= header_timeout + Duration::from_secs(1),
            "a slowloris connection stayed open {open:?} (header_read_timeout {header_timeout:?})"
        );
        assert!(sent < DRIBBLE, "it was still sending when cut off");
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    let r = post(&http_client(), &bridge.at("/after"), "after").await;
    assert_eq!(r.body, "after");
    bridge.stop().await;
}

/// Sends raw request bytes on a new connection and reads the response.
async fn raw_request(bridge: &TestBridge, bytes: Vec<u8>) -> RawReply {
    let tcp = with_timeout(TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    let (rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        wr
    });
    let reply = with_timeout(read_reply(rd)).await;
    drop(writer);
    reply
}

fn assert_json_error(r: &RawReply, status: u16, code: &str, request_id: &str) {
    assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("x-request-id"), request_id);
    let json = r.json();
    assert_eq!(json["error"]["code"], code);
    assert_eq!(json["error"]["request_id"], request_id);
}

#[tokio::test]
async fn oversized_headers_and_bodies_get_json_errors_naming_the_request_id() {
    let bridge = TestBridge::start(|c| {
        c.http.max_body = wsbridge::config::ByteSize(1000);
        // A route with room for a body that streams (over one chunk).
        c.routes[0].max_body = Some(wsbridge::config::ByteSize(300 * 1024));
    })
    .await;
    let mut raw = RawWorker::connect(&bridge, &["default", "orders"], 4).await;

    // Headers that do not fit a frame header.
    let mut req = b"GET /big-headers HTTP/1.1\r\nHost: x\r\nX-Request-Id: hdr-1\r\n".to_vec();
    for i in 0..80 {
        req.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(1000)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    assert_json_error(
        &raw_request(&bridge, req).await,
        431,
        "headers_too_large",
        "hdr-1",
    );
    // A long path counts too.
    let req = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\nX-Request-Id: path-1\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(60_000),
        "q".repeat(10_000)
    );
    assert_json_error(
        &raw_request(&bridge, req.into_bytes()).await,
        431,
        "headers_too_large",
        "path-1",
    );
    // A body over max_body by its Content-Length.
    let mut req =
        b"POST /x HTTP/1.1\r\nHost: x\r\nX-Request-Id: cl-1\r\nContent-Length: 1001\r\n\r\n"
            .to_vec();
    req.extend_from_slice(&[b'a'; 1001]);
    assert_json_error(
        &raw_request(&bridge, req).await,
        413,
        "body_too_large",
        "cl-1",
    );
    // ...and by what arrives, chunked.
    let mut req =
        b"POST /x HTTP/1.1\r\nHost: x\r\nX-Request-Id: chunked-1\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..20 {
        req.extend_from_slice(format!("64\r\n{}\r\n", "b".repeat(100)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    assert_json_error(
        &raw_request(&bridge, req).await,
        413,
        "body_too_large",
        "chunked-1",
    );
    // None of these reached the worker: the next call it sees is this one.
    served_by_raw(&bridge, &mut raw, "/fine").await;

    // A body that crosses max_body while it streams to the worker, before
    // any reply: 413 for the caller, `cancel` body_too_large for the worker.
    let tcp = with_timeout(TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    let (rd, mut wr) = tcp.into_split();
    let piece = |n: usize| {
        let mut p = format!("{n:x}\r\n").into_bytes();
        p.extend(std::iter::repeat_n(b'c', n));
        p.extend_from_slice(b"\r\n");
        p
    };
    wr.write_all(
        b"POST /orders/upload HTTP/1.1\r\nHost: x\r\nX-Request-Id: streamed-1\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .expect("write head");
    for _ in 0..4 {
        wr.write_all(&piece(70 * 1024)).await.expect("write body");
    }
    let reply = tokio::spawn(read_reply(rd));
    let req = match raw.next().await {
        Frame::Data(DataHead::Request(h), _) => h,
        other => panic!("expected a streamed request, got {other:?}"),
    };
    assert!(!req.end, "280 KiB streams");
    assert_eq!(req.request_id, "streamed-1");
    wr.write_all(&piece(30 * 1024)).await.expect("write body");
    assert_json_error(
        &with_timeout(reply).await.expect("join"),
        413,
        "body_too_large",
        "streamed-1",
    );
    let reason = loop {
        match raw.next().await {
            Frame::Data(DataHead::Body(b), _) => assert_eq!(b.id, req.id),
            Frame::Control(Control::Cancel { id, reason }) => {
                assert_eq!(id, req.id);
                break reason;
            }
            other => panic!("expected the upload, then a cancel, got {other:?}"),
        }
    };
    assert_eq!(reason, "body_too_large");
    drop(wr);
    served_by_raw(&bridge, &mut raw, "/still-fine").await;
    bridge.stop().await;
}

#[tokio::test]
#[ignore = "known limitation: requests over hyper's own parser limits (more than 100 header lines over HTTP/1, a head over ~400 KB, a URI over 64 KiB) get hyper's bare 431/414 without JSON or X-Request-Id; hyper writes those responses itself (proto/h1/conn.rs on_parse_error, no hook), and raising its header bound costs every call (src/bridge/conformance.rs). Over HTTP/2 more than 100 headers get the JSON 431: tests/conformance.rs"]
async fn requests_over_hypers_limits_still_get_json_errors_naming_the_request_id() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let mut many = b"GET /many HTTP/1.1\r\nHost: x\r\nX-Request-Id: many-1\r\n".to_vec();
    for i in 0..1100 {
        many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let huge = format!(
        "GET /huge HTTP/1.1\r\nHost: x\r\nX-Request-Id: huge-1\r\nX-Big: {}\r\n\r\n",
        "h".repeat(500_000)
    )
    .into_bytes();
    for (req, id) in [(many, "many-1"), (huge, "huge-1")] {
        assert_json_error(
            &raw_request(&bridge, req).await,
            431,
            "headers_too_large",
            id,
        );
    }
    served_by_raw(&bridge, &mut raw, "/fine").await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_request_frame_from_a_worker_is_unexpected_whatever_its_id() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    for id in [0, 9] {
        raw.send_binary(request_frame(id)).await;
        expect_error(&mut raw, None, "unexpected_frame", &format!("request {id}")).await;
    }
    served_by_raw(&bridge, &mut raw, "/fine").await;
    bridge.stop().await;
}
