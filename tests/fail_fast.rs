//! Resume does not cost the fail-fast promise (PROTOCOL.md 8.2, 8.5): when a
//! resumable worker's connection drops, only the calls nothing else can save
//! wait for it to come back; the rest move to another worker at once, an
//! accepted POST fails within the (short) resume window, and the worker
//! itself redials at once and never outwaits the window.

mod common;

use std::{
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use futures_util::StreamExt;
use http::StatusCode;
use tokio::{sync::Notify, time::Instant};
use tokio_tungstenite::tungstenite::Message;
use wsbridge::{
    body::Body,
    protocol::{self, Control, Resume},
    worker::Status,
};

/// Long enough that a call waiting for it could never pass the bounds below.
const LONG_WINDOW: Duration = Duration::from_secs(10);

/// What "at once" means here: far below `LONG_WINDOW`, far above a busy
/// machine's scheduling noise.
const AT_ONCE: Duration = Duration::from_secs(3);

fn long_window(c: &mut wsbridge::config::Config) {
    c.http.request_timeout = Duration::from_secs(30);
    c.http.queue_timeout = Duration::from_secs(20);
    c.workers.resume_window = LONG_WINDOW;
}

#[tokio::test]
async fn an_idempotent_call_moves_to_a_live_worker_at_once_and_the_resumed_worker_is_told_to_drop_it(
) {
    let bridge = TestBridge::start(long_window).await;
    let mut first = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let session_id = first.welcome.session_id.clone();
    let call = spawn_get(&bridge, "/report");
    let (req, _) = first.next_request().await;
    assert!(!req.gate, "an idempotent call goes without the gate");
    // Another worker comes up; then the first one's link dies mid-call.
    let mut second = RawWorker::connect(&bridge, &["default"], 8).await;
    let dropped = Instant::now();
    drop(first);
    let (again, _) = second.next_request().await;
    assert_eq!(again.path, "/report");
    second.reply(again.id, 200, &[], b"from the second").await;
    let r = with_timeout(call).await.expect("join");
    assert!(
        dropped.elapsed() < AT_ONCE,
        "the GET waited {:?} for a resume",
        dropped.elapsed()
    );
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"from the second"[..])
    );
    assert_eq!(r.header("x-bridge-attempts"), "2");
    // The first worker comes back still running the call: it is told to
    // drop it, and its late reply reaches nobody.
    let resume = Resume {
        session_id,
        running: vec![req.id],
        replied: vec![],
    };
    let mut back = RawWorker::connect_hello(&bridge, resumable_hello(Some(resume))).await;
    assert!(back.welcome.resumed);
    match back.next().await {
        Frame::Control(Control::Cancel { id, reason }) => {
            assert_eq!((id, reason.as_str()), (req.id, "gone"));
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    back.reply(req.id, 200, &[], b"late").await;
    assert_eq!(bridge.handle.protocol_violations(), 0);
    bridge.stop().await;
}

#[tokio::test]
async fn a_post_that_never_started_moves_to_a_live_worker_at_once() {
    let bridge = TestBridge::start(|c| {
        long_window(c);
        c.http.start_gate = true;
    })
    .await;
    let mut first = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let call = spawn_post(&bridge, "/order", "x");
    // Read, but never accepted: it waits for `start` and cannot have run.
    let (req, _) = first.next_request().await;
    assert!(req.gate);
    let mut second = RawWorker::connect(&bridge, &["default"], 8).await;
    let dropped = Instant::now();
    drop(first);
    let (again, body) = second.next_request().await;
    assert_eq!((again.path.as_str(), &body[..]), ("/order", &b"x"[..]));
    second.reply(again.id, 201, &[], b"made").await;
    let r = with_timeout(call).await.expect("join");
    assert!(dropped.elapsed() < AT_ONCE, "{:?}", dropped.elapsed());
    assert_eq!(r.head.status, StatusCode::CREATED);
    assert_eq!(r.header("x-bridge-attempts"), "2");
    bridge.stop().await;
}

#[tokio::test]
async fn a_call_that_may_move_waits_for_the_resumed_worker_when_no_other_is_free() {
    // No other worker: the call queues, and the worker that comes back
    // takes it as a new call.
    let bridge = TestBridge::start(long_window).await;
    let mut first = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let session_id = first.welcome.session_id.clone();
    let call = spawn_get(&bridge, "/report");
    let (req, _) = first.next_request().await;
    drop(first);
    bridge.until_queued("default", 1).await;
    let resume = Resume {
        session_id,
        running: vec![req.id],
        replied: vec![],
    };
    let mut back = RawWorker::connect_hello(&bridge, resumable_hello(Some(resume))).await;
    assert!(back.welcome.resumed);
    // The cancel of the old id and the call under a new id, in either order.
    let mut again = None;
    let mut cancelled = false;
    while again.is_none() || !cancelled {
        match back.next().await {
            Frame::Control(Control::Cancel { id, .. }) => {
                assert_eq!(id, req.id);
                cancelled = true;
            }
            Frame::Data(protocol::DataHead::Request(head), _) => {
                assert_eq!(head.path, "/report");
                assert_ne!(head.id, req.id);
                again = Some(head.id);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    back.reply(again.expect("the call"), 200, &[], b"after the blip")
        .await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.body, "after the blip");
    assert_eq!(r.header("x-bridge-attempts"), "2");
    bridge.stop().await;
}

#[tokio::test]
async fn a_call_stays_with_a_worker_that_resumes_before_the_bridge_noticed_the_drop() {
    // The worker saw the link die first and is already back: nothing is
    // moved, the GET's reply comes on the new connection.
    let bridge = TestBridge::start(long_window).await;
    let mut old = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let session_id = old.welcome.session_id.clone();
    let call = spawn_get(&bridge, "/report");
    let (req, _) = old.next_request().await;
    let resume = Resume {
        session_id,
        running: vec![req.id],
        replied: vec![],
    };
    // `old` is still open as far as the bridge knows.
    let mut back = RawWorker::connect_hello(&bridge, resumable_hello(Some(resume))).await;
    assert!(back.welcome.resumed);
    back.reply(req.id, 200, &[], b"same worker").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.body, "same worker");
    assert_eq!(r.header("x-bridge-attempts"), "1");
    drop(old);
    bridge.stop().await;
}

#[tokio::test]
async fn an_accepted_post_of_a_killed_worker_fails_well_before_the_request_timeout() {
    // The default resume window, and a request timeout far beyond it.
    let bridge = TestBridge::start(|c| c.http.request_timeout = Duration::from_secs(30)).await;
    let window = bridge.config.workers.resume_window;
    assert!(window <= Duration::from_millis(2500), "{window:?}");
    let mut raw = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let call = spawn_post(&bridge, "/pay", "x");
    let (req, _) = raw.next_request().await;
    raw.send_text(&protocol::encode_control(&Control::Accepted { id: req.id }))
        .await;
    // The bridge reads the `accepted` before the end of the stream.
    let killed = Instant::now();
    drop(raw); // what the kernel does for a killed process: FIN, no close frame
    let r = with_timeout(call).await.expect("join");
    let waited = killed.elapsed();
    assert_eq!(
        (r.head.status, r.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, "worker_lost")
    );
    assert!(waited >= window, "failed before the window: {waited:?}");
    assert!(
        waited < window + Duration::from_secs(2),
        "waited {waited:?} with a {window:?} resume window"
    );
    bridge.stop().await;
}

/// Log output, kept for a test to look at.
#[derive(Clone, Default)]
struct Captured {
    text: Arc<Mutex<String>>,
    written: Arc<Notify>,
}

impl Captured {
    /// Waits for a line containing `needle`, and returns it.
    async fn line(&self, needle: &str) -> String {
        with_timeout(async {
            loop {
                let written = self.written.notified();
                tokio::pin!(written);
                written.as_mut().enable();
                let found = {
                    let text = self.text.lock().unwrap_or_else(|p| p.into_inner());
                    text.lines().find(|l| l.contains(needle)).map(str::to_owned)
                };
                if let Some(line) = found {
                    return line;
                }
                written.await;
            }
        })
        .await
    }
}

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.text
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_str(&String::from_utf8_lossy(buf));
        self.written.notify_waiters();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// Current-thread: the bridge's tasks run on this thread, so they log to
// this test's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn a_worker_dropped_for_missed_pongs_is_logged_with_that_cause() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("wsbridge=info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _logs = tracing::subscriber::set_default(subscriber);
    let bridge = TestBridge::start(|c| {
        c.workers.ping_interval = Duration::from_millis(100);
        c.workers.ping_misses = 2;
        c.workers.resume_window = LONG_WINDOW;
    })
    .await;
    // A worker that never reads never answers a ping.
    let raw = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let held = captured.line("keeping its calls for a resume").await;
    assert!(held.contains("missed 2 pongs in a row"), "{held}");
    let gone = captured.line("worker disconnected").await;
    assert!(gone.contains("missed 2 pongs in a row"), "{gone}");
    assert!(!gone.contains("shutting down"), "{gone}");
    drop(raw);
    bridge.stop().await;
}

#[tokio::test]
async fn the_bridge_writes_gate_false_only_to_workers_that_gate() {
    let bridge = TestBridge::start(|_| {}).await;
    // A worker without `accepted`: the header has no `gate` at all.
    let mut plain = RawWorker::connect(&bridge, &["default"], 8).await;
    let call = spawn_get(&bridge, "/plain");
    let frame = loop {
        match with_timeout(plain.ws.next()).await {
            Some(Ok(Message::Binary(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    };
    let text = String::from_utf8_lossy(&frame);
    assert!(!text.contains("\"gate\""), "{text}");
    let (head, _) = protocol::decode_data(&frame, 0).expect("request frame");
    let protocol::DataHead::Request(req) = head else {
        panic!("expected a request, got {head:?}");
    };
    plain.reply(req.id, 200, &[], b"ok").await;
    with_timeout(call).await.expect("join");
    drop(plain);
    // A worker that gates: an idempotent call says it skips the gate.
    let mut gating = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let call = spawn_get(&bridge, "/gating");
    let (req, _) = gating.next_request().await;
    assert!(!req.gate);
    gating.reply(req.id, 200, &[], b"ok").await;
    with_timeout(call).await.expect("join");
    bridge.stop().await;
}

/// A worker for `bridge`, redialling with `backoff_initial`.
async fn fake_worker(
    url: &str,
    backoff_initial: Duration,
) -> (
    tokio::sync::watch::Receiver<Status>,
    tokio_util::sync::CancellationToken,
) {
    let mut cfg = wsbridge::worker::WorkerConfig::new(url, TOKEN, ["default"]);
    cfg.backoff_initial = backoff_initial;
    cfg.backoff_max = backoff_initial * 4;
    let worker = wsbridge::worker::Worker::new(cfg, |_req: http::Request<Body>| async {
        http::Response::new(Body::from("ok"))
    });
    let status = worker.subscribe();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(worker.run(stop.clone()));
    (status, stop)
}

#[tokio::test]
async fn the_worker_redials_at_once_after_losing_a_working_connection() {
    let fake = FakeBridge::bind().await;
    // A backoff that could never pass the bound below.
    let (_status, stop) = fake_worker(&fake.url, Duration::from_secs(20)).await;
    let link = fake.accept(welcome(60_000, 2)).await;
    // The connection works for a while (a redial is immediate only after
    // a connection that was up for a second; twice that, for a busy
    // machine that handles the welcome late), then drops.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let dropped = Instant::now();
    drop(link);
    let _again = fake.accept(welcome(60_000, 2)).await;
    assert!(dropped.elapsed() < AT_ONCE, "{:?}", dropped.elapsed());
    stop.cancel();
}

#[tokio::test]
async fn while_its_session_is_held_the_worker_never_waits_longer_than_the_window() {
    let fake = FakeBridge::bind().await;
    let (_status, stop) = fake_worker(&fake.url, Duration::from_secs(20)).await;
    let mut resumable = welcome(60_000, 2);
    resumable.resume_window_ms = 2000;
    let link = fake.accept(resumable.clone()).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    drop(link);
    // The immediate redial fails (refused before the welcome); the next
    // one must still come within the window.
    fake.refuse_next().await;
    let refused = Instant::now();
    let _again = fake.accept(resumable).await;
    assert!(
        refused.elapsed() < Duration::from_secs(2),
        "{:?}",
        refused.elapsed()
    );
    stop.cancel();
}

#[tokio::test]
async fn a_worker_whose_silence_limit_fires_drops_the_link_without_a_close_frame() {
    let fake = FakeBridge::bind().await;
    let (_status, stop) = fake_worker(&fake.url, Duration::from_secs(20)).await;
    let mut resumable = welcome(100, 1);
    resumable.resume_window_ms = 5000;
    // The bridge says nothing: after 200 ms the worker gives the link up.
    let mut link = fake.accept(resumable).await;
    let ended = with_timeout(link.ws.next()).await;
    assert!(
        !matches!(ended, Some(Ok(Message::Close(_)))),
        "a close frame would end the session: {ended:?}"
    );
    stop.cancel();
}

/// An upstream whose first request for each path never gets an answer
/// (the agent holding it is killed meanwhile); a repeat gets `done`.
/// Returns its address and the paths it has seen, with a wake-up per visit.
async fn hanging_upstream() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>, Arc<Notify>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let visited = Arc::new(Notify::new());
    let (log, wake) = (seen.clone(), visited.clone());
    let addr = serve_http(move |req: http::Request<hyper::body::Incoming>| {
        let (log, wake) = (log.clone(), wake.clone());
        async move {
            let path = req.uri().path().to_owned();
            let first = {
                let mut seen = log.lock().unwrap_or_else(|p| p.into_inner());
                let first = !seen.contains(&path);
                seen.push(path);
                first
            };
            wake.notify_waiters();
            if first {
                std::future::pending::<()>().await;
            }
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
                b"done",
            )))
        }
    })
    .await;
    (addr, seen, visited)
}

async fn until_workers(bridge: &TestBridge, n: usize) {
    with_timeout(async {
        while bridge.handle.workers("default") != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_agent_moves_its_get_at_once_and_fails_its_post_after_the_window() {
    // The outside check: a killed agent's calls waited the whole
    // resume window (5 s then) on top of everything.
    let window = Duration::from_secs(4);
    let bridge = TestBridge::start(|c| {
        c.http.request_timeout = Duration::from_secs(30);
        c.http.queue_timeout = Duration::from_secs(20);
        c.workers.resume_window = window;
    })
    .await;
    let dir = TempDir::new("failfast");
    let ca = dir.0.join("bridge.crt");
    std::fs::write(&ca, &bridge.cert.cert_pem).expect("write cert");
    let (up, seen, visited) = hanging_upstream().await;
    let upstream = format!("http://{up}");
    let mut victim = spawn_agent(&bridge.url(), &ca, &["--upstream", &upstream]);
    until_workers(&bridge, 1).await;
    let get = spawn_get(&bridge, "/get");
    let post = spawn_post(&bridge, "/post", "x");
    // Both reach the upstream through the victim (the POST once `start`
    // allowed it: from then on it may have run).
    with_timeout(async {
        loop {
            let visit = visited.notified();
            tokio::pin!(visit);
            visit.as_mut().enable();
            if seen.lock().unwrap_or_else(|p| p.into_inner()).len() == 2 {
                break;
            }
            visit.await;
        }
    })
    .await;
    let _survivor = spawn_agent(&bridge.url(), &ca, &["--upstream", &upstream]);
    until_workers(&bridge, 2).await;
    let killed = Instant::now();
    victim.start_kill().expect("kill -9");
    let r = with_timeout(get).await.expect("join");
    let moved = killed.elapsed();
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"done"[..])
    );
    assert_eq!(r.header("x-bridge-attempts"), "2");
    assert!(moved < window / 2, "the GET waited {moved:?}");
    let r = with_timeout(post).await.expect("join");
    let failed = killed.elapsed();
    assert_eq!(
        (r.head.status, r.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, "worker_lost")
    );
    assert!(
        failed >= window && failed < window + Duration::from_secs(2),
        "the POST failed {failed:?} after the kill, window {window:?}"
    );
    let posts = seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|p| *p == "/post")
        .count();
    assert_eq!(posts, 1, "the POST ran once");
    bridge.stop().await;
}
