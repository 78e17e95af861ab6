//! A link that dies without a FIN (a NAT that forgot the mapping, a cable
//! pulled): both sides notice the silence through heartbeats within
//! `ping_interval * (ping_misses + 1)`. Without resuming, the calls on the
//! dead link fail or move to another worker; with resuming, the worker
//! comes back to its session and its calls complete, whether the bridge
//! noticed the cut first or not.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
    sync::mpsc,
    task::{JoinHandle, JoinSet},
};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};
use wsbridge::{
    body::Body,
    protocol::{self, Control},
    worker::Status,
};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A TCP proxy in front of the bridge's worker port. `freeze` makes every
/// connection it carries go silent in both directions while both sockets
/// stay open (a NAT that forgot the mapping, a link that died without FIN);
/// connections opened afterwards forward normally, unless new connections
/// are held (`hold_new`): then they wait, accepted but not yet forwarded,
/// until `open_new`.
struct FreezingProxy {
    addr: SocketAddr,
    /// Cancelled to freeze the connections accepted since the last freeze.
    current: Arc<Mutex<CancellationToken>>,
    accepted: Arc<AtomicUsize>,
    /// Whether new connections are forwarded yet.
    open: tokio::sync::watch::Sender<bool>,
    /// The accept loop, which owns every connection task: dropping the
    /// proxy closes everything.
    _task: AbortOnDropHandle<()>,
}

impl FreezingProxy {
    async fn start(upstream: SocketAddr) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let current = Arc::new(Mutex::new(CancellationToken::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (open, _) = tokio::sync::watch::channel(true);
        let (tokens, count, gate) = (current.clone(), accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            let mut links = JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let freeze = lock(&tokens).clone();
                let mut gate = gate.subscribe();
                links.spawn(async move {
                    if gate.wait_for(|open| *open).await.is_ok() {
                        link(down, upstream, freeze).await;
                    }
                });
            }
        });
        FreezingProxy {
            addr,
            current,
            accepted,
            open,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// New connections wait until `open_new`.
    fn hold_new(&self) {
        self.open.send_replace(false);
    }

    /// New connections (and those waiting) are forwarded.
    fn open_new(&self) {
        self.open.send_replace(true);
    }

    /// Silences every connection open now; later ones are not affected.
    fn freeze(&self) {
        let mut current = lock(&self.current);
        current.cancel();
        *current = CancellationToken::new();
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Forwards one connection both ways until it ends, or until `freeze`;
/// then holds both sockets open, silent, until the proxy is dropped.
async fn link(down: TcpStream, upstream: SocketAddr, freeze: CancellationToken) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = (down.set_nodelay(true), up.set_nodelay(true));
    let (down_rd, down_wr) = down.into_split();
    let (up_rd, up_wr) = up.into_split();
    let _held = tokio::join!(pump(down_rd, up_wr, &freeze), pump(up_rd, down_wr, &freeze));
    if freeze.is_cancelled() {
        std::future::pending::<()>().await;
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    freeze: &CancellationToken,
) -> (OwnedReadHalf, OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            biased;
            _ = freeze.cancelled() => return (from, to),
            r = from.read(&mut buf) => match r {
                Ok(n) if n > 0 => n,
                _ => break,
            },
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    (from, to)
}

/// Sends `method path` with `x-request-id: id` on a fresh connection and
/// returns the reply with the time it took.
fn timed_call(
    bridge: &TestBridge,
    method: &str,
    path: &str,
    id: &str,
) -> JoinHandle<(Reply, Duration)> {
    let req = Request::builder()
        .method(method)
        .uri(bridge.at(path))
        .header("x-request-id", id)
        .body(Full::new(Bytes::from(format!("body of {id}"))))
        .expect("request");
    tokio::spawn(async move {
        let started = Instant::now();
        let reply = send(&http_client(), req).await;
        (reply, started.elapsed())
    })
}

const PING_INTERVAL: Duration = Duration::from_millis(200);
const PING_MISSES: u32 = 2;
const CUT_REQUEST_TIMEOUT: Duration = Duration::from_secs(8);

/// `ping_interval * (ping_misses + 1)`: the silence either side tolerates.
fn silence_bound() -> Duration {
    PING_INTERVAL * (PING_MISSES + 1)
}

/// Slack on top of `silence_bound` for scheduling on a small machine.
const SLACK: Duration = Duration::from_millis(600);

/// A bridge with a fast heartbeat, for the link-cut tests; with the start
/// gate, so that the cuts show what it saves.
async fn heartbeat_bridge(resume_window: Duration) -> TestBridge {
    TestBridge::start(|c| {
        c.http.start_gate = true;
        c.workers.ping_interval = PING_INTERVAL;
        c.workers.ping_misses = PING_MISSES;
        c.workers.resume_window = resume_window;
        c.http.request_timeout = CUT_REQUEST_TIMEOUT;
        c.http.queue_timeout = CUT_REQUEST_TIMEOUT;
    })
    .await
}

/// Worker A of the link-cut tests, behind `proxy`. Its handler answers
/// `/probe` at once and parks every other call until `release` has a
/// permit (then answers `a:METHOD PATH`), reporting when a parked call
/// starts and when its future is dropped.
struct ParkingWorker {
    worker: TestWorker,
    session: String,
    /// Every status change, with when it happened.
    statuses: mpsc::UnboundedReceiver<(Instant, Status)>,
    started: mpsc::UnboundedReceiver<String>,
    dropped: mpsc::UnboundedReceiver<()>,
    release: Arc<tokio::sync::Semaphore>,
    _recorder: AbortOnDropHandle<()>,
}

impl ParkingWorker {
    async fn start(bridge: &TestBridge, proxy: &FreezingProxy) -> ParkingWorker {
        let mut cfg = bridge.worker_config(&["default"], 8);
        cfg.url = format!("wss://localhost:{}", proxy.addr.port());
        cfg.worker_id = "behind-proxy".into();
        // Slow enough that the Disconnected state is seen before the redial.
        cfg.backoff_initial = Duration::from_millis(200);
        cfg.backoff_max = Duration::from_millis(400);
        let (started_tx, started) = mpsc::unbounded_channel::<String>();
        let (dropped_tx, dropped) = mpsc::unbounded_channel::<()>();
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let gate = release.clone();
        let worker = TestWorker::start(cfg, move |req: Request<Body>| {
            let (started_tx, dropped_tx, gate) =
                (started_tx.clone(), dropped_tx.clone(), gate.clone());
            async move {
                let what = format!("{} {}", req.method(), req.uri().path());
                if req.uri().path() != "/probe" {
                    let _guard = OnDrop(dropped_tx);
                    let _ = started_tx.send(what.clone());
                    let _permit = gate.acquire().await.expect("gate open");
                }
                Response::new(Body::from(format!("a:{what}")))
            }
        })
        .await;
        let session = match &*worker.status.borrow() {
            Status::Connected { session_id } => session_id.clone(),
            other => panic!("worker A is not connected: {other:?}"),
        };
        let (status_tx, statuses) = mpsc::unbounded_channel();
        let mut watch = worker.status.clone();
        let recorder = tokio::spawn(async move {
            while watch.changed().await.is_ok() {
                let now = Instant::now();
                let status = watch.borrow_and_update().clone();
                if status_tx.send((now, status)).is_err() {
                    break;
                }
            }
        });
        ParkingWorker {
            worker,
            session,
            statuses,
            started,
            dropped,
            release,
            _recorder: AbortOnDropHandle::new(recorder),
        }
    }

    /// Waits for A to notice the silence; returns when, after `frozen`.
    async fn notices_silence(&mut self, frozen: Instant) -> Duration {
        let (at, status) = within(
            silence_bound() + SLACK,
            "A notices the silence",
            self.statuses.recv(),
        )
        .await
        .expect("status");
        match &status {
            Status::Disconnected { reason } => assert!(reason.contains("silent"), "{reason}"),
            other => panic!("expected Disconnected, got {other:?}"),
        }
        let noticed = at.duration_since(frozen);
        assert!(
            noticed >= PING_INTERVAL * PING_MISSES - Duration::from_millis(50)
                && noticed <= silence_bound() + SLACK,
            "A noticed the silence {noticed:?} after the cut (bound {:?})",
            silence_bound()
        );
        noticed
    }

    /// Waits for A to be connected again; returns its session id.
    async fn reconnects(&mut self) -> String {
        within(Duration::from_secs(5), "A reconnects", async {
            loop {
                match self.statuses.recv().await {
                    Some((_, Status::Connected { session_id })) => break session_id,
                    Some(_) => continue,
                    None => panic!("status channel closed"),
                }
            }
        })
        .await
    }
}

/// The calls caught by a cut, and worker B.
struct Cut {
    /// `GET /g` and `POST /p`: running on A, accepted, when the link froze.
    get: JoinHandle<(Reply, Duration)>,
    post: JoinHandle<(Reply, Duration)>,
    /// `POST /late`: sent to A after the link froze; A never sees it.
    late: JoinHandle<(Reply, Duration)>,
    frozen: Instant,
    /// Connected directly, after the calls were in flight.
    b: TestWorker,
}

/// Starts two calls on A, waits until the bridge knows A accepted both,
/// freezes the link, sends a third call into it, and connects worker B.
async fn cut_link_mid_calls(
    bridge: &TestBridge,
    proxy: &FreezingProxy,
    a: &mut ParkingWorker,
) -> Cut {
    let get_call = timed_call(bridge, "GET", "/g", "cut-get");
    let post_call = timed_call(bridge, "POST", "/p", "cut-post");
    let mut running = vec![
        with_timeout(a.started.recv())
            .await
            .expect("a handler started"),
        with_timeout(a.started.recv())
            .await
            .expect("a handler started"),
    ];
    running.sort();
    assert_eq!(running, ["GET /g", "POST /p"]);
    // The library flushes `accepted` before a handler runs, and this reply
    // travels behind both on the same connection: once it is back, the
    // bridge knows both calls were accepted.
    let probe = get(&http_client(), &bridge.at("/probe")).await;
    assert_eq!(
        (probe.head.status, probe.body.as_ref()),
        (StatusCode::OK, &b"a:GET /probe"[..])
    );
    assert_eq!(bridge.handle.in_flight(), 2);

    proxy.freeze();
    let frozen = Instant::now();
    let late = timed_call(bridge, "POST", "/late", "cut-late");
    within(Duration::from_secs(5), "the late call goes to A", async {
        while bridge.handle.in_flight() < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let b = bridge
        .worker(&["default"], 8, |req: Request<Body>| async move {
            let text = format!("b:{} {}", req.method(), req.uri().path());
            let mut resp = Response::new(Body::from(text));
            resp.headers_mut()
                .insert("x-served-by", http::HeaderValue::from_static("b"));
            resp
        })
        .await;
    Cut {
        get: get_call,
        post: post_call,
        late,
        frozen,
        b,
    }
}

/// Awaits a call of a cut and checks its status, body and attempts.
async fn expect_reply(
    call: JoinHandle<(Reply, Duration)>,
    id: &str,
    status: StatusCode,
    attempts: &str,
) -> Reply {
    let (r, took) = within(CUT_REQUEST_TIMEOUT, id, call).await.expect("join");
    assert_eq!(
        r.head.status,
        status,
        "{id}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("x-bridge-attempts"), attempts, "{id}");
    assert_eq!(r.header("x-request-id"), id);
    assert!(took < CUT_REQUEST_TIMEOUT, "{id} took {took:?}");
    r
}

#[tokio::test]
async fn a_link_cut_without_fin_is_detected_by_heartbeats_and_its_calls_fail_or_move() {
    // Without resuming: the calls on the dead link end when it is noticed.
    let bridge = heartbeat_bridge(Duration::ZERO).await;
    let proxy = FreezingProxy::start(bridge.workers).await;
    let mut a = ParkingWorker::start(&bridge, &proxy).await;
    let cut = cut_link_mid_calls(&bridge, &proxy, &mut a).await;

    // The accepted POST fails as soon as the heartbeat gives up on A, and
    // is not sent again.
    let r = expect_reply(cut.post, "cut-post", StatusCode::BAD_GATEWAY, "1").await;
    let detected = cut.frozen.elapsed();
    assert_eq!(r.error_code(), "worker_lost");
    assert_eq!(r.json()["error"]["request_id"], "cut-post");
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("pong"), "not the heartbeat: {message}");
    assert!(
        detected >= PING_INTERVAL * PING_MISSES - Duration::from_millis(50)
            && detected <= silence_bound() + SLACK,
        "the bridge dropped A {detected:?} after the cut; bound {:?}",
        silence_bound()
    );
    // The GET (idempotent) and the POST A never saw went to B.
    for (call, id, body) in [
        (cut.get, "cut-get", "b:GET /g"),
        (cut.late, "cut-late", "b:POST /late"),
    ] {
        let r = expect_reply(call, id, StatusCode::OK, "2").await;
        assert_eq!(String::from_utf8_lossy(&r.body), body, "{id}");
        assert_eq!(r.header("x-served-by"), "b", "{id}");
    }

    // A notices the silence by itself and redials through a fresh proxy
    // connection; its session is gone, so it abandons the parked calls.
    let noticed = a.notices_silence(cut.frozen).await;
    let session = a.reconnects().await;
    assert_ne!(session, a.session, "a new session");
    assert_eq!(
        proxy.accepted(),
        2,
        "A redialled through a fresh connection"
    );
    for _ in 0..2 {
        within(
            Duration::from_secs(1),
            "A's parked handlers end",
            a.dropped.recv(),
        )
        .await
        .expect("handler dropped");
    }
    eprintln!(
        "link cut, no resume: the bridge failed the accepted POST {detected:?} after the cut, \
         A noticed after {noticed:?}; bound {:?}",
        silence_bound()
    );
    // With B gone, A serves again.
    cut.b.stop().await;
    let r = get(&http_client(), &bridge.at("/probe")).await;
    assert_eq!(r.body, "a:GET /probe");
    a.worker.stop().await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_link_cut_without_fin_is_resumed_and_its_calls_complete() {
    let bridge = heartbeat_bridge(Duration::from_secs(5)).await;
    let proxy = FreezingProxy::start(bridge.workers).await;
    let mut a = ParkingWorker::start(&bridge, &proxy).await;
    // The network comes back only after the bridge has noticed the cut: a
    // resume that comes first is another story (see the ignored test).
    proxy.hold_new();
    let cut = cut_link_mid_calls(&bridge, &proxy, &mut a).await;

    // The bridge takes A out of dispatch when the heartbeat gives up...
    within(silence_bound() + SLACK, "the bridge drops A", async {
        while bridge.handle.workers("default") > 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let detected = cut.frozen.elapsed();
    assert!(
        detected >= PING_INTERVAL * PING_MISSES - Duration::from_millis(50),
        "the bridge dropped A {detected:?} after the cut"
    );
    // ...keeps the POST it accepted for a resume instead of failing it, and
    // moves the GET to B at once: it may run twice, so it does not wait.
    let r = expect_reply(cut.get, "cut-get", StatusCode::OK, "2").await;
    assert_eq!(String::from_utf8_lossy(&r.body), "b:GET /g");
    assert!(
        cut.frozen.elapsed() < silence_bound() + SLACK,
        "the GET waited {:?} for a resume",
        cut.frozen.elapsed()
    );
    assert!(!cut.post.is_finished());
    proxy.open_new();
    // A notices the silence, redials through a fresh connection and takes
    // its session back; its handlers were never stopped.
    let noticed = a.notices_silence(cut.frozen).await;
    let session = a.reconnects().await;
    assert_eq!(session, a.session, "the same session continues");
    assert_eq!(
        proxy.accepted(),
        2,
        "A redialled through a fresh connection"
    );
    // The GET that moved is cancelled on A (a `cancel` comes with the
    // resume); the POST's handler was never stopped.
    within(
        Duration::from_secs(1),
        "A drops the GET that moved",
        a.dropped.recv(),
    )
    .await;
    // The resumed connection lives on through its first pings.
    let next = tokio::time::timeout(PING_INTERVAL * 2, a.statuses.recv()).await;
    assert!(
        next.is_err(),
        "the resumed connection ended at once: {next:?}"
    );
    assert!(
        a.dropped.try_recv().is_err(),
        "the POST's parked handler was stopped"
    );
    // The POST finishes on the resumed session, sent once; the call A never
    // saw is sent again (to A or B).
    a.release.add_permits(3);
    let r = expect_reply(cut.post, "cut-post", StatusCode::OK, "1").await;
    assert_eq!(String::from_utf8_lossy(&r.body), "a:POST /p");
    let r = expect_reply(cut.late, "cut-late", StatusCode::OK, "2").await;
    assert!(
        String::from_utf8_lossy(&r.body).ends_with(":POST /late"),
        "{:?}",
        r.body
    );
    eprintln!(
        "link cut, resumed: the bridge dropped A {detected:?} after the cut, A noticed after \
         {noticed:?} and resumed; bound {:?}",
        silence_bound()
    );
    cut.b.stop().await;
    a.worker.stop().await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_session_resumed_after_missed_pongs_survives_its_first_pings() {
    let bridge = heartbeat_bridge(Duration::from_secs(5)).await;
    let mut old = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let session_id = old.welcome.session_id.clone();
    let call = spawn_post(&bridge, "/order", "x");
    let (req, _) = old.next_request().await;
    old.send_text(&protocol::encode_control(&Control::Accepted { id: req.id }))
        .await;
    // The old connection stops reading, so it answers no pings: after
    // ping_misses the bridge detaches the session and keeps the call.
    within(
        silence_bound() + SLACK,
        "the bridge drops the old link",
        async {
            while bridge.handle.workers("default") > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        },
    )
    .await;
    let resume = protocol::Resume {
        session_id: session_id.clone(),
        running: vec![req.id],
        replied: vec![],
    };
    let mut back = RawWorker::connect_hello(&bridge, resumable_hello(Some(resume))).await;
    assert!(back.welcome.resumed);
    // Reading (so answering every ping) for two ping intervals: the resumed
    // connection must stay up.
    let early = tokio::time::timeout(PING_INTERVAL * 2, back.next()).await;
    assert!(
        early.is_err(),
        "the resumed connection ended at once: {early:?}"
    );
    back.reply(req.id, 201, &[], b"done").await;
    let r = within(Duration::from_secs(2), "the resumed call", call)
        .await
        .expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::CREATED, &b"done"[..])
    );
    assert_eq!(r.header("x-bridge-attempts"), "1");
    drop(old);
    bridge.stop().await;
}

#[tokio::test]
async fn a_resume_that_beats_the_heartbeat_still_takes_the_session_back() {
    // The default test heartbeat (5 s, 2 misses): the bridge will not notice
    // the dead link during this test. The worker, with a shorter fuse or on
    // a less busy machine, has already given up on it and comes back.
    let bridge = TestBridge::start(|c| c.workers.resume_window = Duration::from_secs(5)).await;
    let mut old = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let session_id = old.welcome.session_id.clone();
    let call = spawn_post(&bridge, "/order", "x");
    let (req, _) = old.next_request().await;
    old.send_text(&protocol::encode_control(&Control::Accepted { id: req.id }))
        .await;
    // The old link goes silent (no FIN: the socket stays open, unread).
    let resume = protocol::Resume {
        session_id: session_id.clone(),
        running: vec![req.id],
        replied: vec![],
    };
    let mut back = RawWorker::connect_hello(&bridge, resumable_hello(Some(resume))).await;
    assert!(back.welcome.resumed, "the session was not resumed");
    assert_eq!(back.welcome.session_id, session_id);
    back.reply(req.id, 201, &[], b"done").await;
    let r = within(Duration::from_secs(2), "the resumed call", call)
        .await
        .expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::CREATED, &b"done"[..])
    );
    drop(old);
    bridge.stop().await;
}
