//! Retries on worker loss: a call whose worker vanishes before replying goes
//! to another worker when that cannot make anything happen twice (the worker
//! never said `accepted`, the method is idempotent, or the caller sent an
//! Idempotency-Key); anything else fails with 502 and is never sent twice.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::task::JoinHandle;
use wsbridge::protocol::{self, Control, Hello};

/// A raw worker that promises `accepted` frames.
async fn acking(bridge: &TestBridge) -> RawWorker {
    let hello = Hello {
        worker_id: "acking".into(),
        metadata: Default::default(),
        services: vec!["default".into()],
        max_inflight: 4,
        flow_control: false,
        accepted: true,
        compression: Vec::new(),
        resumable: false,
        resume: None,
    };
    RawWorker::connect_hello(bridge, hello).await
}

async fn accept(raw: &mut RawWorker, id: u64) {
    raw.send_text(&protocol::encode_control(&Control::Accepted { id }))
        .await;
}

fn call(bridge: &TestBridge, method: &str, headers: &[(&str, &str)]) -> JoinHandle<Reply> {
    let mut req = Request::builder()
        .method(method)
        .uri(bridge.at("/call"))
        .header("x-request-id", "retry-1");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    tokio::spawn(async move { send(&http_client(), req).await })
}

/// A worker's process dies: its connection just ends.
fn vanish(raw: RawWorker) {
    drop(raw);
}

#[tokio::test]
async fn a_call_the_worker_never_accepted_goes_to_another_worker() {
    let bridge = TestBridge::start(|c| c.http.start_gate = true).await;
    let mut first = acking(&bridge).await;
    let caller = call(&bridge, "POST", &[]);
    first.next_request().await;
    // The call reached the worker, which died before it said `accepted`.
    let mut second = acking(&bridge).await;
    vanish(first);
    let (again, body) = second.next_request().await;
    assert_eq!(
        (again.method.as_str(), again.request_id.as_str(), &body[..]),
        ("POST", "retry-1", &b"{}"[..])
    );
    accept(&mut second, again.id).await;
    second.reply(again.id, 201, &[], b"created").await;
    let r = with_timeout(caller).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::CREATED, &b"created"[..])
    );
    assert_eq!(r.header("x-bridge-attempts"), "2");
    bridge.stop().await;
}

/// The call failed with 502 `worker_lost` after one attempt, and `second`
/// never saw it: the next frame it gets is a new call.
async fn failed_and_sent_nowhere_else(
    bridge: &TestBridge,
    caller: JoinHandle<Reply>,
    second: &mut RawWorker,
) {
    let r = with_timeout(caller).await.expect("join");
    assert_eq!(
        (r.head.status, r.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, "worker_lost")
    );
    assert_eq!(r.header("x-bridge-attempts"), "1");
    assert_eq!(r.json()["error"]["request_id"], "retry-1");
    let next = spawn_get(bridge, "/next");
    let (got, _) = second.next_request().await;
    assert_eq!(got.path, "/next");
    second.reply(got.id, 200, &[], b"ok").await;
    with_timeout(next).await.expect("join");
}

#[tokio::test]
async fn an_accepted_post_is_never_sent_twice() {
    let bridge = TestBridge::start(|c| c.http.start_gate = true).await;
    let mut first = acking(&bridge).await;
    let caller = call(&bridge, "POST", &[]);
    let (req, _) = first.next_request().await;
    // `accepted` travels ahead of the connection's end on the same socket,
    // so the bridge knows the call may have started. Another worker is
    // registered (connect returns after the welcome) and is not used.
    accept(&mut first, req.id).await;
    let mut second = acking(&bridge).await;
    vanish(first);
    failed_and_sent_nowhere_else(&bridge, caller, &mut second).await;
    bridge.stop().await;
}

#[tokio::test]
async fn idempotent_calls_and_idempotency_keys_are_retried_even_after_accepted() {
    let bridge = TestBridge::start(|_| {}).await;
    for (method, headers) in [
        ("GET", &[][..]),
        ("PUT", &[][..]),
        ("DELETE", &[][..]),
        ("POST", &[("idempotency-key", "order-7")][..]),
    ] {
        let mut first = acking(&bridge).await;
        let caller = call(&bridge, method, headers);
        let (req, _) = first.next_request().await;
        accept(&mut first, req.id).await;
        let mut second = acking(&bridge).await;
        vanish(first);
        let (again, _) = second.next_request().await;
        assert_eq!(again.method, method);
        second.reply(again.id, 200, &[], method.as_bytes()).await;
        let r = with_timeout(caller).await.expect("join");
        assert_eq!(r.body, method, "{method}");
        assert_eq!(r.header("x-bridge-attempts"), "2", "{method}");
        vanish(second);
        // The next round's call must not meet this worker before the bridge
        // has noticed it is gone (seen once in CI: attempts 3 for PUT).
        with_timeout(async {
            while bridge.handle.workers("default") > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
    }
    bridge.stop().await;
}

#[tokio::test]
async fn retries_stop_at_max_retries() {
    let bridge = TestBridge::start(|c| c.http.max_retries = 1).await;
    let mut first = acking(&bridge).await;
    let caller = call(&bridge, "GET", &[]);
    first.next_request().await;
    let mut second = acking(&bridge).await;
    vanish(first);
    second.next_request().await;
    let mut third = acking(&bridge).await;
    vanish(second);
    let r = with_timeout(caller).await.expect("join");
    assert_eq!(r.error_code(), "worker_lost");
    assert_eq!(r.header("x-bridge-attempts"), "2");
    // The third worker was never given the call.
    let next = spawn_get(&bridge, "/next");
    let (got, _) = third.next_request().await;
    assert_eq!(got.path, "/next");
    third.reply(got.id, 200, &[], b"ok").await;
    with_timeout(next).await.expect("join");
    bridge.stop().await;
}

#[tokio::test]
async fn the_start_gate_is_asked_for_only_where_it_decides_a_retry() {
    // Gated: a POST that could go to another worker only because it never
    // started. Not gated: calls retried anyway (idempotent, keyed) and the
    // last attempt, which nothing would retry.
    let bridge = TestBridge::start(|c| {
        c.http.start_gate = true;
        c.http.max_retries = 1;
    })
    .await;
    let mut worker = acking(&bridge).await;
    let mut gated = Vec::new();
    for (method, headers, gate) in [
        ("POST", &[][..], true),
        ("PATCH", &[][..], true),
        ("GET", &[][..], false),
        ("PUT", &[][..], false),
        ("POST", &[("idempotency-key", "k-1")][..], false),
    ] {
        let caller = call(&bridge, method, headers);
        let (req, _) = worker.next_request().await;
        assert_eq!(
            (req.method.as_str(), req.gate),
            (method, gate),
            "{headers:?}"
        );
        if gate {
            accept(&mut worker, req.id).await;
            gated.push(req.id);
        }
        worker.reply(req.id, 200, &[], b"ok").await;
        assert_eq!(with_timeout(caller).await.expect("join").body, "ok");
    }
    // Each `accepted` was answered with `start` (read while waiting for the
    // next request, which the bridge sent after it).
    assert_eq!(worker.started, gated);
    // The retry of a POST that was never accepted is its last attempt
    // (max_retries = 1): it goes ungated, and a loss now would be final.
    let caller = call(&bridge, "POST", &[]);
    let (first, _) = worker.next_request().await;
    assert!(first.gate);
    let mut second = acking(&bridge).await;
    vanish(worker);
    let (again, _) = second.next_request().await;
    assert!(!again.gate, "the last attempt is not gated");
    second.reply(again.id, 201, &[], b"created").await;
    let r = with_timeout(caller).await.expect("join");
    assert_eq!(r.header("x-bridge-attempts"), "2");
    bridge.stop().await;
}

#[tokio::test]
async fn by_default_no_post_waits_for_the_gate_and_one_whose_worker_dies_fails() {
    // `start_gate` is off by default: even to a worker that offers the
    // gate, a POST goes with `"gate": false`, starts on arrival, and so
    // cannot be sent elsewhere once its worker is gone, accepted or not.
    let bridge = TestBridge::start(|_| {}).await;
    let mut first = acking(&bridge).await;
    let caller = call(&bridge, "POST", &[]);
    let (req, _) = first.next_request().await;
    assert!(!req.gate, "a POST is not gated by default");
    let mut second = acking(&bridge).await;
    vanish(first);
    failed_and_sent_nowhere_else(&bridge, caller, &mut second).await;
    bridge.stop().await;
}

#[tokio::test]
async fn with_no_retries_a_post_skips_the_gate_and_its_loss_is_final() {
    // With no retries configured the gate would decide nothing, so a POST
    // goes without it (no `accepted`), and losing its worker ends the call
    // with 502 after one attempt. (Whether an ungated call counts as
    // started on a resume is checked in tests/resume.rs.)
    let bridge = TestBridge::start(|c| {
        c.http.start_gate = true;
        c.http.max_retries = 0;
    })
    .await;
    let mut first = acking(&bridge).await;
    let caller = call(&bridge, "POST", &[]);
    let (req, _) = first.next_request().await;
    assert!(!req.gate);
    let _second = acking(&bridge).await;
    vanish(first);
    let r = with_timeout(caller).await.expect("join");
    assert_eq!(r.error_code(), "worker_lost");
    assert_eq!(r.header("x-bridge-attempts"), "1");
    bridge.stop().await;
}

/// An upstream that counts the requests it receives by `x-request-id` and
/// answers after a delay, so that calls are in flight when an agent dies.
async fn counting_upstream() -> (SocketAddr, Arc<Mutex<HashMap<String, usize>>>) {
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counts = seen.clone();
    let addr = serve_http(move |req: Request<Incoming>| {
        let counts = counts.clone();
        async move {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            *counts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id)
                .or_default() += 1;
            let _ = req.into_body().collect().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            Response::new(Full::new(Bytes::from_static(b"done")))
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_agent_loses_no_idempotent_call_and_repeats_no_post() {
    // A killed worker looks like a dropped connection: its calls wait
    // resume_window for it to come back before they fail or move on.
    let bridge = TestBridge::start(|c| {
        c.http.queue_timeout = Duration::from_secs(20);
        c.workers.resume_window = Duration::from_millis(500);
    })
    .await;
    let dir = TempDir::new("kill9");
    let ca = dir.0.join("bridge.crt");
    std::fs::write(&ca, &bridge.cert.cert_pem).expect("write cert");
    let (up, seen) = counting_upstream().await;
    let upstream = format!("http://{up}");
    let mut victim = spawn_agent(&bridge.url(), &ca, &["--upstream", &upstream]);
    let _survivor = spawn_agent(&bridge.url(), &ca, &["--upstream", &upstream]);
    with_timeout(async {
        while bridge.handle.workers("default") < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // 40 calls at once, half GET and half POST, each with its own id. Two
    // of each in turn: the registry alternates between two idle workers, so
    // a strict GET/POST alternation could give the victim only GETs (seen
    // once in CI: nothing for the POST half of the test to check).
    let calls: Vec<(String, JoinHandle<Reply>)> = (0..40)
        .map(|i| {
            let method = if i % 4 < 2 { "GET" } else { "POST" };
            let id = format!("{method}-{i}");
            let req = Request::builder()
                .method(method)
                .uri(bridge.at("/orders"))
                .header("x-request-id", &id)
                .body(Full::new(Bytes::from_static(b"{}")))
                .expect("request");
            (
                id,
                tokio::spawn(async move { send(&http_client(), req).await }),
            )
        })
        .collect();
    // Once the upstream holds most of them, the victim dies without a word.
    with_timeout(async {
        while seen.lock().unwrap_or_else(|p| p.into_inner()).len() < 30 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    victim.start_kill().expect("kill -9");
    let (mut posts_failed, mut retried) = (0, 0);
    for (id, call) in calls {
        let r = with_timeout(call).await.expect("join");
        let hits = seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
            .unwrap_or(0);
        if r.header("x-bridge-attempts") == "2" {
            retried += 1;
        }
        if id.starts_with("GET") {
            assert_eq!(
                (r.head.status, r.body.as_ref()),
                (StatusCode::OK, &b"done"[..]),
                "{id}"
            );
        } else {
            assert!(hits <= 1, "{id} reached the upstream {hits} times");
            match r.head.status {
                StatusCode::OK => {}
                StatusCode::BAD_GATEWAY => {
                    assert_eq!(r.error_code(), "worker_lost");
                    posts_failed += 1;
                }
                other => panic!("{id}: unexpected {other}"),
            }
        }
    }
    eprintln!("kill -9 with 40 calls in flight: {retried} retried elsewhere, {posts_failed} POSTs failed 502");
    // The kill hit calls in flight: some GETs went to the survivor and some
    // POSTs (accepted by the victim) failed rather than run twice.
    assert!(retried > 0 && posts_failed > 0);
    bridge.stop().await;
}

#[tokio::test]
async fn a_call_whose_handler_started_is_never_sent_elsewhere() {
    // The worker's handler runs only after the bridge has recorded
    // `accepted` (and said `start`), so a link cut right after the handler
    // started can only end the POST with 502, never run it twice.
    started_post_is_never_sent_elsewhere(true).await;
}

#[tokio::test]
async fn without_the_start_gate_a_started_call_is_never_sent_elsewhere_either() {
    // `start_gate: false`: no `accepted`, the handler runs on arrival. The
    // bridge then cannot tell a call in a dead socket from a running one,
    // so it must treat every call as started: 502, never a second run.
    started_post_is_never_sent_elsewhere(false).await;
}

async fn started_post_is_never_sent_elsewhere(start_gate: bool) {
    let bridge = TestBridge::start(|c| c.workers.resume_window = Duration::ZERO).await;
    let proxy = CutProxy::start(bridge.workers).await;
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let handler = |name: &'static str| {
        let (runs, started_tx) = (runs.clone(), started_tx.clone());
        move |_req: Request<wsbridge::body::Body>| {
            let (runs, started_tx) = (runs.clone(), started_tx.clone());
            async move {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = started_tx.send(name);
                std::future::pending::<()>().await;
                Response::new(wsbridge::body::Body::from(name))
            }
        }
    };
    let mut cfg = bridge.worker_config(&["default"], 8);
    cfg.url = format!("wss://localhost:{}", proxy.addr.port());
    cfg.start_gate = start_gate;
    let _a = TestWorker::start(cfg, handler("a")).await;
    let call = spawn_post(&bridge, "/order", "x");
    assert_eq!(with_timeout(started.recv()).await, Some("a"));
    proxy.cut();
    let _b = TestWorker::start(bridge.worker_config(&["default"], 8), handler("b")).await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.error_code(), "worker_lost");
    assert_eq!(r.header("x-bridge-attempts"), "1");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    bridge.stop().await;
}
