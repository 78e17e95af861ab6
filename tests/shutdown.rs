//! Graceful shutdown: calls in flight finish, new ones are refused, and the
//! drain is bounded by `shutdown_timeout`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

#[tokio::test]
async fn calls_in_flight_finish_during_shutdown() {
    let bridge = TestBridge::start(|c| c.shutdown_timeout = Duration::from_secs(10)).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let call = spawn_post(&bridge, "/in-flight", "x");
    let (req, _) = raw.next_request().await;
    bridge.begin_stop();
    // New callers are no longer accepted...
    with_timeout(async {
        while tokio::net::TcpStream::connect(bridge.http).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // ...but the worker is still connected and its answer still delivered.
    raw.reply(req.id, 200, &[], b"finished").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"finished"[..])
    );
    bridge.stop().await;
}

#[tokio::test]
async fn the_drain_is_bounded_by_shutdown_timeout() {
    let bridge = TestBridge::start(|c| {
        c.shutdown_timeout = Duration::from_millis(300);
        c.http.request_timeout = Duration::from_secs(30);
    })
    .await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let call = spawn_post(&bridge, "/never", "x");
    let _ = raw.next_request().await;
    let started = Instant::now();
    bridge.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    // The caller is told, not left hanging.
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.error_code(), "worker_lost");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("shutting down")),
        "{}",
        r.json()
    );
}
