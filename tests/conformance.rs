//! HTTP conformance at the caller's edge, checked with exact bytes on real
//! sockets (and HTTP/2 where it differs): what a reverse proxy such as
//! nginx does with an ambiguous `Host`, `CONNECT`, a `HEAD` reply's length,
//! and header bytes that are not UTF-8.

mod common;

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use bytes::Bytes;
use common::*;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use wsbridge::body::Body;

/// A worker that answers every call with 200 "seen" and counts the calls.
async fn counting_worker(bridge: &TestBridge) -> (TestWorker, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let worker = bridge
        .worker(&["default"], 16, move |_req: Request<Body>| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                Response::new(Body::from("seen"))
            }
        })
        .await;
    (worker, calls)
}

#[tokio::test]
async fn a_missing_empty_or_repeated_host_is_a_json_400() {
    let bridge = TestBridge::start(|_| {}).await;
    let (worker, calls) = counting_worker(&bridge).await;
    for (request, what) in [
        (
            &b"GET /h HTTP/1.1\r\nX-Request-Id: host-none\r\nConnection: close\r\n\r\n"[..],
            "no Host",
        ),
        (
            b"GET /h HTTP/1.1\r\nHost:\r\nX-Request-Id: host-empty\r\nConnection: close\r\n\r\n",
            "an empty Host",
        ),
        (
            b"GET /h HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nX-Request-Id: host-two\r\nConnection: close\r\n\r\n",
            "two Hosts",
        ),
        (
            b"GET /h HTTP/1.0\r\nHost: a.example\r\nHost: b.example\r\nX-Request-Id: host-two-10\r\n\r\n",
            "two Hosts in HTTP/1.0",
        ),
    ] {
        let r = raw_http::exchange(bridge.http, request).await;
        r.assert_json_error(400, "bad_request");
        let message = r.json()["error"]["message"].to_string();
        assert!(message.contains("Host"), "{what}: {message}");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "no call reached the worker"
    );
    // HTTP/1.0 has no Host requirement; one Host on HTTP/1.1 is the norm.
    for request in [
        &b"GET /h HTTP/1.0\r\n\r\n"[..],
        b"GET /h HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    ] {
        let r = raw_http::exchange(bridge.http, request).await;
        assert_eq!((r.status, r.body.as_slice()), (200, &b"seen"[..]), "{r:?}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    worker.stop().await;
    bridge.stop().await;
}

#[tokio::test]
async fn connect_is_refused_with_a_json_405() {
    let bridge = TestBridge::start(|_| {}).await;
    let (worker, calls) = counting_worker(&bridge).await;
    let r = raw_http::exchange(
        bridge.http,
        b"CONNECT upstream.example:443 HTTP/1.1\r\nHost: upstream.example:443\r\nX-Request-Id: tunnel-1\r\nConnection: close\r\n\r\n",
    )
    .await;
    r.assert_json_error(405, "method_not_allowed");
    assert_eq!(r.header("x-request-id"), "tunnel-1");
    assert!(!r.header("allow").contains("CONNECT"), "{r:?}");
    assert!(r.header("allow").contains("GET"), "{r:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the worker never saw it");
    worker.stop().await;
    bridge.stop().await;
}

/// A worker that answers `HEAD` as a server does: the length of the body a
/// `GET` would have, and no body.
async fn sized_worker(bridge: &TestBridge) -> TestWorker {
    bridge
        .worker(&["default"], 16, |req: Request<Body>| async move {
            let body = if req.method() == http::Method::HEAD {
                Body::empty()
            } else {
                Body::from(vec![b'x'; 452])
            };
            let mut resp = Response::new(body);
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, http::HeaderValue::from(452));
            resp
        })
        .await
}

#[tokio::test]
async fn a_head_reply_keeps_its_content_length_over_http1() {
    let bridge = TestBridge::start(|_| {}).await;
    let worker = sized_worker(&bridge).await;
    let r = raw_http::exchange_head(
        bridge.http,
        b"HEAD /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-length"), "452", "{r:?}");
    assert!(r.body.is_empty(), "a HEAD reply has no body: {r:?}");
    // A GET still gets the body, framed by its own length.
    let r = raw_http::exchange(
        bridge.http,
        b"GET /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        (r.header("content-length"), r.body.len()),
        ("452".into(), 452)
    );
    worker.stop().await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_head_reply_keeps_its_content_length_over_http2() {
    let bridge = TestBridge::start(|_| {}).await;
    let worker = sized_worker(&bridge).await;
    let (mut sender, _conn) = h2_connection(bridge.http).await;
    with_timeout(sender.ready()).await.expect("ready");
    let req = Request::head(bridge.at("/file"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = with_timeout(sender.send_request(req))
        .await
        .expect("h2 response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .map(|v| v.as_bytes()),
        Some(&b"452"[..]),
        "{resp:?}"
    );
    worker.stop().await;
    bridge.stop().await;
}

#[tokio::test]
async fn connect_over_http2_is_refused_with_a_json_405() {
    let bridge = TestBridge::start(|_| {}).await;
    let (worker, calls) = counting_worker(&bridge).await;
    let (mut sender, _conn) = h2_connection(bridge.http).await;
    with_timeout(sender.ready()).await.expect("ready");
    let req = Request::connect("upstream.example:443")
        .header("x-request-id", "tunnel-2")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = with_timeout(sender.send_request(req))
        .await
        .expect("h2 response");
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the worker never saw it");
    worker.stop().await;
    bridge.stop().await;
}
