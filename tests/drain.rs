//! Draining workers: a worker that asks to drain gets no new calls, its calls
//! in flight finish, then the bridge closes its connection; the library and
//! the agent drain on shutdown, so restarting workers one by one under load
//! fails no call.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::sync::mpsc;
use wsbridge::{body::Body, protocol};

/// Waits until the bridge has read the drain: no worker of `default` takes
/// new calls. Only observable by looking, so this looks every millisecond.
async fn until_not_accepting(bridge: &TestBridge) {
    with_timeout(async {
        while bridge.handle.accepting("default") > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_draining_worker_finishes_its_calls_then_the_bridge_closes_it() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let first = spawn_get(&bridge, "/first");
    let (req, _) = raw.next_request().await;
    raw.send_text(&protocol::encode_control(&protocol::Control::Drain))
        .await;
    // Once the bridge has read the drain (a call dispatched before that is
    // still the worker's to answer), a new call is not given to the
    // draining worker: it waits in the queue.
    until_not_accepting(&bridge).await;
    assert_eq!(bridge.handle.workers("default"), 1);
    let second = spawn_get(&bridge, "/second");
    bridge.until_queued("default", 1).await;
    // The call in flight still gets its answer; after it, the bridge closes.
    raw.reply(req.id, 200, &[], b"one").await;
    assert_eq!(with_timeout(first).await.expect("join").body, "one");
    assert!(matches!(raw.next().await, Frame::Closed));
    // A worker that connects (or reconnects) gets the waiting call at once.
    let mut fresh = RawWorker::connect(&bridge, &["default"], 4).await;
    let (req, _) = fresh.next_request().await;
    assert_eq!(req.path, "/second");
    fresh.reply(req.id, 200, &[], b"two").await;
    assert_eq!(with_timeout(second).await.expect("join").body, "two");
    // An idle worker that drains is closed at once.
    let mut idle = RawWorker::connect(&bridge, &["default"], 4).await;
    idle.send_text(&protocol::encode_control(&protocol::Control::Drain))
        .await;
    assert!(matches!(idle.next().await, Frame::Closed));
    bridge.stop().await;
}

#[tokio::test]
async fn the_bridge_tells_its_workers_when_it_shuts_down() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    bridge.begin_stop();
    match raw.next().await {
        Frame::Control(protocol::Control::Drain) => {}
        other => panic!("expected drain, got {other:?}"),
    }
    assert!(matches!(raw.next().await, Frame::Closed));
}

#[tokio::test]
async fn a_library_worker_drains_on_shutdown() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    // The handler holds each call until the test releases it.
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let (release_tx, release) = mpsc::unbounded_channel::<()>();
    let release = Arc::new(tokio::sync::Mutex::new(release));
    let worker = bridge
        .worker(&["default"], 4, move |_req: Request<Body>| {
            let (started_tx, release) = (started_tx.clone(), release.clone());
            async move {
                let _ = started_tx.send(());
                release.lock().await.recv().await;
                Response::new(Body::from("finished"))
            }
        })
        .await;
    let first = spawn_get(&bridge, "/first");
    with_timeout(started.recv()).await.expect("handler started");
    // Shut the worker down while its call is in flight.
    let stopping = tokio::spawn(worker.stop());
    // Once the bridge has the drain, new calls queue instead.
    until_not_accepting(&bridge).await;
    let second = spawn_get(&bridge, "/second");
    bridge.until_queued("default", 1).await;
    assert!(!stopping.is_finished(), "the worker waits for its call");
    release_tx.send(()).expect("release");
    let r = with_timeout(first).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"finished"[..])
    );
    with_timeout(stopping)
        .await
        .expect("worker stopped cleanly");
    // A replacement takes the queued call.
    let _next = bridge
        .worker(&["default"], 4, |_req: Request<Body>| async {
            Response::new(Body::from("replacement"))
        })
        .await;
    assert_eq!(
        with_timeout(second).await.expect("join").body,
        "replacement"
    );
    bridge.stop().await;
}

/// An upstream that answers after a short delay, so that calls are in
/// flight whenever an agent is stopped.
async fn slow_upstream() -> SocketAddr {
    serve_http(|req: Request<Incoming>| async move {
        let path = req.uri().path().to_owned();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut out = path.into_bytes();
        out.extend_from_slice(&body);
        Response::new(Full::new(Bytes::from(out)))
    })
    .await
}

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("agent still running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_agents_one_by_one_under_load_fails_no_call() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    let dir = TempDir::new("rolling");
    let ca = dir.0.join("bridge.crt");
    std::fs::write(&ca, &bridge.cert.cert_pem).expect("write cert");
    let upstream = format!("http://{}", slow_upstream().await);
    let spawn = || spawn_agent(&bridge.url(), &ca, &["--upstream", &upstream]);
    let mut agents: Vec<_> = (0..3).map(|_| spawn()).collect();
    let handle = bridge.handle.clone();
    let all_connected = |n: usize| {
        let handle = handle.clone();
        with_timeout(async move {
            while handle.workers("default") != n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    all_connected(3).await;

    // Continuous load: 8 callers, each POSTing numbered calls back to back
    // and checking every reply.
    let stop = Arc::new(AtomicBool::new(false));
    let (made, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let callers: Vec<_> = (0..8)
        .map(|c| {
            let (stop, made, failed) = (stop.clone(), made.clone(), failed.clone());
            let url = bridge.at("/rolling");
            tokio::spawn(async move {
                let client = http_client();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body = format!("-{c}-{n}");
                    let r = post(&client, &url, body.clone()).await;
                    made.fetch_add(1, Ordering::Relaxed);
                    if r.head.status != StatusCode::OK || r.body != format!("/rolling{body}") {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed call: {} {:?}", r.head.status, r.body);
                    }
                    n += 1;
                }
            })
        })
        .collect();

    let started = Instant::now();
    for agent in agents.iter_mut() {
        let before = made.load(Ordering::Relaxed);
        // Let traffic flow, then restart agent i: SIGTERM, a new one in its place.
        with_timeout(async {
            while made.load(Ordering::Relaxed) < before + 150 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        sigterm(agent);
        let mut old = std::mem::replace(agent, spawn());
        let exit = with_timeout(old.wait()).await.expect("agent exit");
        assert!(exit.success(), "a draining agent exits 0, got {exit}");
        all_connected(3).await;
    }
    let before = made.load(Ordering::Relaxed);
    with_timeout(async {
        while made.load(Ordering::Relaxed) < before + 150 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        with_timeout(c).await.expect("caller");
    }
    let (made, failed) = (made.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "rolling restart of 3 agents: {made} calls made, {failed} failed, in {:?}",
        started.elapsed()
    );
    assert!(made >= 600, "too little load: {made} calls");
    assert_eq!(failed, 0);
    bridge.stop().await;
}
