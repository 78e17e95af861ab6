//! Idempotency keys: a repeated call with the same `Idempotency-Key` gets
//! the stored response without reaching a worker again; a repeat that
//! arrives while the first is running waits for it.

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
    let req = Request::post(bridge.at(path))
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"order")))
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
