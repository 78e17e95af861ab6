//! Idempotency keys: a repeated call with the same `Idempotency-Key` gets
//! the stored response without reaching a worker again; a repeat that
//! arrives while the first is running waits for it. A key is bound to its
//! request (another body or path gets 422), and a call whose response was
//! streamed is never run twice (a repeat gets 409).

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::{
    sync::{mpsc, Mutex},
    task::JoinHandle,
};
use wsbridge::body::Body;

fn keyed(bridge: &TestBridge, path: &str, key: &str) -> JoinHandle<Reply> {
    keyed_body(bridge, path, key, "order")
}

/// `POST path` with `body` under `key`, in a task.
fn keyed_body(bridge: &TestBridge, path: &str, key: &str, body: &'static str) -> JoinHandle<Reply> {
    let req = Request::post(bridge.at(path))
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request");
    tokio::spawn(async move { send(&http_client(), req).await })
}

/// A worker that counts its calls and answers `created <n>` with 201.
async fn counting(bridge: &TestBridge, services: &[&str]) -> (TestWorker, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let worker = bridge
        .worker(services, 8, move |_req: Request<Body>| {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                Response::builder()
                    .status(201)
                    .header("x-order", n.to_string())
                    .body(Body::from(format!("created {n}")))
                    .expect("response")
            }
        })
        .await;
    (worker, calls)
}

#[tokio::test]
async fn a_repeat_gets_the_stored_response_without_a_second_call() {
    let bridge = TestBridge::start(|_| {}).await;
    let (_w, calls) = counting(&bridge, &["default"]).await;
    let first = with_timeout(keyed(&bridge, "/orders-x", "k-1"))
        .await
        .expect("join");
    let again = with_timeout(keyed(&bridge, "/orders-x", "k-1"))
        .await
        .expect("join");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        (first.head.status, first.body.as_ref()),
        (StatusCode::CREATED, &b"created 1"[..])
    );
    assert_eq!(
        (again.head.status, again.body.as_ref()),
        (StatusCode::CREATED, &b"created 1"[..])
    );
    assert_eq!(again.header("x-order"), "1");
    assert_eq!(again.header("idempotent-replayed"), "true");
    assert_eq!(first.header("idempotent-replayed"), "");
    assert_ne!(again.header("x-request-id"), first.header("x-request-id"));
    // Another key is another call.
    let other = with_timeout(keyed(&bridge, "/orders-x", "k-2"))
        .await
        .expect("join");
    assert_eq!(other.body, "created 2");
    bridge.stop().await;
}

#[tokio::test]
async fn a_repeat_during_the_first_call_waits_for_it() {
    let bridge = TestBridge::start(|_| {}).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let (release_tx, release) = mpsc::unbounded_channel::<()>();
    let release = Arc::new(Mutex::new(release));
    let seen = calls.clone();
    let _w = bridge
        .worker(&["default"], 8, move |_req: Request<Body>| {
            seen.fetch_add(1, Ordering::SeqCst);
            let (started_tx, release) = (started_tx.clone(), release.clone());
            async move {
                let _ = started_tx.send(());
                release.lock().await.recv().await;
                Response::new(Body::from("charged once"))
            }
        })
        .await;
    let first = keyed(&bridge, "/pay", "pay-7");
    with_timeout(started.recv())
        .await
        .expect("first call started");
    let second = keyed(&bridge, "/pay", "pay-7");
    // The repeat does not reach the worker while the first runs.
    let early = tokio::time::timeout(Duration::from_millis(300), started.recv()).await;
    assert!(early.is_err(), "the repeat reached the worker");
    release_tx.send(()).expect("release");
    let (a, b) = (
        with_timeout(first).await.expect("join"),
        with_timeout(second).await.expect("join"),
    );
    assert_eq!(
        (a.body.as_ref(), b.body.as_ref()),
        (&b"charged once"[..], &b"charged once"[..])
    );
    assert_eq!(b.header("idempotent-replayed"), "true");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    bridge.stop().await;
}

#[tokio::test]
async fn a_call_that_failed_in_the_bridge_is_not_stored() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_millis(100)).await;
    // No worker yet: 503, and nothing stored under the key.
    let r = with_timeout(keyed(&bridge, "/x", "k-9"))
        .await
        .expect("join");
    assert_eq!(r.error_code(), "no_worker");
    let (_w, calls) = counting(&bridge, &["default"]).await;
    let r = with_timeout(keyed(&bridge, "/x", "k-9"))
        .await
        .expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::CREATED, &b"created 1"[..])
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    bridge.stop().await;
}

#[tokio::test]
async fn keys_are_per_service() {
    let bridge = TestBridge::start(|_| {}).await;
    let (_w, calls) = counting(&bridge, &["default", "orders"]).await;
    let a = with_timeout(keyed(&bridge, "/x", "same"))
        .await
        .expect("join");
    let b = with_timeout(keyed(&bridge, "/orders/1", "same"))
        .await
        .expect("join");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_ne!(a.body, b.body);
    bridge.stop().await;
}

#[tokio::test]
async fn a_key_reused_for_another_request_gets_422_and_reaches_no_worker() {
    let bridge = TestBridge::start(|_| {}).await;
    let (_w, calls) = counting(&bridge, &["default"]).await;
    let first = with_timeout(keyed_body(&bridge, "/pay?to=a", "k-1", "10 EUR"))
        .await
        .expect("join");
    assert_eq!(first.head.status, StatusCode::CREATED);
    // Another body, another path, another query: each refused.
    for (path, body) in [
        ("/pay?to=a", "99 EUR"),
        ("/pay?to=b", "10 EUR"),
        ("/refund?to=a", "10 EUR"),
    ] {
        let r = with_timeout(keyed_body(&bridge, path, "k-1", body))
            .await
            .expect("join");
        assert_eq!(
            r.head.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path} {body}"
        );
        assert_eq!(r.error_code(), "idempotency_key_mismatch");
        assert_eq!(r.json()["error"]["request_id"], r.header("x-request-id"));
    }
    // The same request is still replayed.
    let again = with_timeout(keyed_body(&bridge, "/pay?to=a", "k-1", "10 EUR"))
        .await
        .expect("join");
    assert_eq!(again.body, "created 1");
    assert_eq!(again.header("idempotent-replayed"), "true");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    bridge.stop().await;
}

/// Size of the streamed replies below: well over what is read whole.
const STREAMED: usize = 2 << 20;

#[tokio::test]
async fn a_key_is_scoped_by_the_callers_authorization() {
    let bridge = TestBridge::start(|_| {}).await;
    let (_w, calls) = counting(&bridge, &["default"]).await;
    let as_user = |auth: &str| {
        let req = Request::post(bridge.at("/pay?to=a"))
            .header("idempotency-key", "order-7")
            .header("authorization", auth)
            .body(Full::new(Bytes::from_static(b"10 EUR")))
            .expect("request");
        tokio::spawn(async move { send(&http_client(), req).await })
    };
    let alice = with_timeout(as_user("Bearer alice")).await.expect("join");
    assert_eq!(alice.body, "created 1");
    // Another caller guessing the same key gets a call of its own, never
    // the response made for alice's credentials.
    let mallory = with_timeout(as_user("Bearer mallory")).await.expect("join");
    assert_eq!(mallory.body, "created 2");
    assert!(mallory.header("idempotent-replayed").is_empty());
    // Each caller's own repeat is still replayed.
    let again = with_timeout(as_user("Bearer alice")).await.expect("join");
    assert_eq!(again.body, "created 1");
    assert_eq!(again.header("idempotent-replayed"), "true");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    bridge.stop().await;
}

/// A worker that counts its calls, waits for `release` (when given) and
/// answers each with a streamed body of [`STREAMED`] bytes.
async fn streaming(
    bridge: &TestBridge,
    started: mpsc::UnboundedSender<()>,
    release: Option<mpsc::UnboundedReceiver<()>>,
) -> (TestWorker, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let release = Arc::new(Mutex::new(release));
    let worker = bridge
        .worker(&["default"], 8, move |_req: Request<Body>| {
            seen.fetch_add(1, Ordering::SeqCst);
            let (started, release) = (started.clone(), release.clone());
            async move {
                let _ = started.send(());
                if let Some(release) = release.lock().await.as_mut() {
                    release.recv().await;
                }
                let (tx, body) = Body::channel();
                tokio::spawn(async move {
                    let data = noise(STREAMED);
                    for piece in data.chunks(64 << 10) {
                        if !tx.send(Bytes::copy_from_slice(piece)) {
                            return;
                        }
                    }
                    tx.finish();
                });
                Response::new(body)
            }
        })
        .await;
    (worker, calls)
}

#[tokio::test]
async fn a_streamed_reply_under_a_key_runs_once_and_a_repeat_gets_409() {
    let bridge = TestBridge::start(|_| {}).await;
    let (started, _seen) = mpsc::unbounded_channel();
    let (_w, calls) = streaming(&bridge, started, None).await;
    let first = with_timeout(keyed(&bridge, "/report", "r-1"))
        .await
        .expect("join");
    assert_eq!(first.head.status, StatusCode::OK);
    assert_eq!(first.body, noise(STREAMED));
    let again = with_timeout(keyed(&bridge, "/report", "r-1"))
        .await
        .expect("join");
    assert_eq!(again.head.status, StatusCode::CONFLICT);
    assert_eq!(again.error_code(), "idempotency_key_not_replayable");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    bridge.stop().await;
}

/// `wsbridge_requests_in_flight` of service `default`, from `/metrics`.
async fn in_flight(admin: std::net::SocketAddr) -> u64 {
    let r = get(&http_client(), &format!("http://{admin}/metrics")).await;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("wsbridge_requests_in_flight{service=\"default\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_caller_parked_on_a_streamed_call_gets_409() {
    let bridge = TestBridge::start(|_| {}).await;
    let admin = bridge.admin.expect("admin listener");
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (release_tx, release) = mpsc::unbounded_channel();
    let (_w, calls) = streaming(&bridge, started_tx, Some(release)).await;
    let first = keyed(&bridge, "/report", "r-2");
    with_timeout(started.recv())
        .await
        .expect("first call started");
    let parked = keyed(&bridge, "/report", "r-2");
    // Both calls are counted as in flight once the repeat has been routed,
    // which is in the same step as it looking up (and parking on) its key.
    with_timeout(async {
        while in_flight(admin).await < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    release_tx.send(()).expect("release");
    let first = with_timeout(first).await.expect("join");
    assert_eq!(first.body.len(), STREAMED);
    let parked = with_timeout(parked).await.expect("join");
    assert_eq!(parked.head.status, StatusCode::CONFLICT);
    assert_eq!(parked.error_code(), "idempotency_key_not_replayable");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    bridge.stop().await;
}

#[tokio::test]
async fn a_2_mib_reply_streamed_by_the_agent_runs_its_upstream_once() {
    // A generous queue_timeout: the first call waits for the agent to connect.
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    let calls: Counter = Arc::default();
    let seen = calls.clone();
    let up = serve_http(move |_req| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move { Response::new(Full::new(noise(STREAMED))) }
    })
    .await;
    let dir = TempDir::new("idempotency-agent");
    let ca = dir.0.join("bridge.crt");
    std::fs::write(&ca, &bridge.cert.cert_pem).expect("write cert");
    let _agent = spawn_agent(&bridge.url(), &ca, &["--upstream", &format!("http://{up}")]);
    let first = with_timeout(keyed(&bridge, "/export", "e-1"))
        .await
        .expect("join");
    assert_eq!(
        (first.head.status, first.body.len()),
        (StatusCode::OK, STREAMED)
    );
    let again = with_timeout(keyed(&bridge, "/export", "e-1"))
        .await
        .expect("join");
    assert_eq!(again.error_code(), "idempotency_key_not_replayable");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    bridge.stop().await;
}

#[tokio::test]
async fn x_bridge_attempts_is_on_every_response_including_the_bridges_own() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_millis(100)).await;
    // Refused before dispatch: no worker was sent the call.
    let r = with_timeout(keyed(&bridge, "/x", "a-1"))
        .await
        .expect("join");
    assert_eq!(
        (r.error_code().as_str(), r.header("x-bridge-attempts")),
        ("no_worker", "0")
    );
    let (_w, _calls) = counting(&bridge, &["default"]).await;
    let r = with_timeout(keyed(&bridge, "/x", "a-1"))
        .await
        .expect("join");
    assert_eq!(
        (r.head.status, r.header("x-bridge-attempts")),
        (StatusCode::CREATED, "1")
    );
    // Replayed, and refused for another body: no worker this time.
    let r = with_timeout(keyed(&bridge, "/x", "a-1"))
        .await
        .expect("join");
    assert_eq!(
        (
            r.header("idempotent-replayed"),
            r.header("x-bridge-attempts")
        ),
        ("true", "0")
    );
    let r = with_timeout(keyed_body(&bridge, "/x", "a-1", "other"))
        .await
        .expect("join");
    assert_eq!(
        (r.error_code().as_str(), r.header("x-bridge-attempts")),
        ("idempotency_key_mismatch", "0")
    );
    bridge.stop().await;
}
