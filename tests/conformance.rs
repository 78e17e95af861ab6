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

/// Answers call `id` the way a worker streams a HEAD reply: a head that
/// declares the GET's `length`, then an empty end.
async fn stream_empty_head_reply(raw: &mut RawWorker, id: u64, length: u64) {
    let head = wsbridge::protocol::DataHead::Response(wsbridge::protocol::ResponseHead {
        id,
        status: 200,
        headers: vec![("content-length".into(), length.to_string())],
        latin1: vec![],
        end: false,
    });
    raw.send_binary(wsbridge::protocol::encode_data(&head, b""))
        .await;
    let end = wsbridge::protocol::DataHead::Body(wsbridge::protocol::BodyHead { id, end: true });
    raw.send_binary(wsbridge::protocol::encode_data(&end, b""))
        .await;
}

#[tokio::test]
async fn a_streamed_head_reply_over_http2_keeps_its_length_and_ends_cleanly() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let (mut sender, _conn) = h2_connection(bridge.http).await;
    with_timeout(sender.ready()).await.expect("ready");
    let req = Request::head(bridge.at("/file"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let caller = tokio::spawn(async move {
        let resp = sender.send_request(req).await.expect("h2 response");
        let (parts, body) = resp.into_parts();
        (parts, http_body_util::BodyExt::collect(body).await)
    });
    let (req, _) = raw.next_request().await;
    assert_eq!(req.method, "HEAD");
    // A worker may stream its HEAD reply (the agent does when its upstream
    // is slow): a head declaring the GET's length, then an empty end.
    stream_empty_head_reply(&mut raw, req.id, 452).await;
    let (parts, body) = with_timeout(caller).await.expect("join");
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(
        parts
            .headers
            .get(header::CONTENT_LENGTH)
            .map(|v| v.as_bytes()),
        Some(&b"452"[..])
    );
    // The stream ends cleanly: no reset for a body "452 bytes short".
    let body = body.expect("the HEAD stream ends without a reset");
    assert!(body.to_bytes().is_empty());
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

/// A worker (the Rust library) that sends back the raw bytes of the
/// caller's `x-obs` both as its body and as its own `x-back` header.
async fn mirroring_worker(bridge: &TestBridge) -> TestWorker {
    bridge
        .worker(&["default"], 16, |req: Request<Body>| async move {
            let seen = req.headers().get("x-obs").cloned();
            let body = seen
                .as_ref()
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default();
            let mut resp = Response::new(Body::from(body));
            if let Some(v) = seen {
                resp.headers_mut().insert("x-back", v);
            }
            resp
        })
        .await
}

/// `caf\xe9` (Latin-1 "café") is legal in a header and not UTF-8: it used to
/// arrive as `caf\xef\xbf\xbd` (U+FFFD) both ways.
const LATIN1: &[u8] = b"caf\xe9 \xff\x80 ok";

#[tokio::test]
async fn header_bytes_that_are_not_utf8_travel_unchanged_over_http1() {
    let bridge = TestBridge::start(|_| {}).await;
    let worker = mirroring_worker(&bridge).await;
    let mut request = b"GET /obs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Obs: ".to_vec();
    request.extend_from_slice(LATIN1);
    request.extend_from_slice(b"\r\n\r\n");
    let r = raw_http::exchange(bridge.http, &request).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, LATIN1, "what the worker saw");
    assert_eq!(
        r.header_bytes("x-back"),
        Some(LATIN1),
        "what the caller got"
    );
    worker.stop().await;
    bridge.stop().await;
}

#[tokio::test]
async fn header_bytes_that_are_not_utf8_travel_unchanged_over_http2() {
    let bridge = TestBridge::start(|_| {}).await;
    let worker = mirroring_worker(&bridge).await;
    let (mut sender, _conn) = h2_connection(bridge.http).await;
    with_timeout(sender.ready()).await.expect("ready");
    let req = Request::get(bridge.at("/obs"))
        .header(
            "x-obs",
            http::HeaderValue::from_bytes(LATIN1).expect("obs-text"),
        )
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = with_timeout(sender.send_request(req))
        .await
        .expect("h2 response");
    let back = resp.headers().get("x-back").map(|v| v.as_bytes().to_vec());
    let body = with_timeout(http_body_util::BodyExt::collect(resp.into_body()))
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, LATIN1, "what the worker saw");
    assert_eq!(back.as_deref(), Some(LATIN1), "what the caller got");
    worker.stop().await;
    bridge.stop().await;
}

/// The wire form (PROTOCOL 5.1), as a worker in another language sees and
/// writes it: the value as the string of its bytes read as Latin-1, and its
/// index in `"latin1"`; UTF-8 values are untouched and unlisted.
#[tokio::test]
async fn a_value_that_is_not_utf8_is_a_latin1_string_listed_by_index() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let addr = bridge.http;
    let caller = tokio::spawn(async move {
        let request =
            b"GET /wire HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Utf8: caf\xc3\xa9\r\nX-Obs: caf\xe9\r\n\r\n".to_vec();
        raw_http::exchange(addr, &request).await
    });
    let (req, _) = raw.next_request().await;
    let at = |name: &str| {
        req.headers
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", req.headers))
    };
    assert_eq!(req.headers[at("x-obs")].1, "caf\u{e9}");
    assert_eq!(req.headers[at("x-utf8")].1, "caf\u{e9}");
    assert_eq!(
        req.latin1,
        vec![at("x-obs")],
        "only the value that is not UTF-8"
    );
    // The reply: one Latin-1 value among UTF-8 ones.
    let head = wsbridge::protocol::DataHead::Response(wsbridge::protocol::ResponseHead {
        id: req.id,
        status: 200,
        headers: vec![
            ("x-a".into(), "\u{e9}t\u{e9}".into()),
            ("x-b".into(), "\u{e9}t\u{e9}".into()),
        ],
        latin1: vec![1],
        end: true,
    });
    raw.send_binary(wsbridge::protocol::encode_data(&head, b"ok"))
        .await;
    let r = with_timeout(caller).await.expect("join");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header_bytes("x-a"), Some("\u{e9}t\u{e9}".as_bytes()));
    assert_eq!(r.header_bytes("x-b"), Some(&b"\xe9t\xe9"[..]));
    bridge.stop().await;
}

/// A Latin-1 value with a character that is no byte, or an index past the
/// headers, is an invalid reply: 502 `bad_response`, never a guess.
#[tokio::test]
async fn a_latin1_list_that_does_not_fit_is_a_bad_response() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    for (value, latin1) in [("\u{20ac}", vec![0]), ("fine", vec![3])] {
        let addr = bridge.http;
        let caller = tokio::spawn(async move {
            raw_http::exchange(
                addr,
                b"GET /bad HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
        });
        let (req, _) = raw.next_request().await;
        let head = wsbridge::protocol::DataHead::Response(wsbridge::protocol::ResponseHead {
            id: req.id,
            status: 200,
            headers: vec![("x-a".into(), value.into())],
            latin1,
            end: true,
        });
        raw.send_binary(wsbridge::protocol::encode_data(&head, b"no"))
            .await;
        let r = with_timeout(caller).await.expect("join");
        r.assert_json_error(502, "bad_response");
        // The worker is told why.
        match raw.next().await {
            Frame::Control(wsbridge::protocol::Control::Error { code, .. }) => {
                assert_eq!(code, "bad_response");
            }
            other => panic!("expected an error frame, got {other:?}"),
        }
    }
    bridge.stop().await;
}

/// More header lines than the bridge takes: a JSON 431 naming the request
/// id, like every other refusal. Over 100 lines hyper used to answer a bare
/// 431 itself; it now parses up to 1024 and the bridge refuses past 100.
#[tokio::test]
async fn more_than_100_headers_get_a_431_and_over_http2_the_json_naming_the_request_id() {
    let bridge = TestBridge::start(|_| {}).await;
    let (worker, calls) = counting_worker(&bridge).await;
    // HTTP/1: hyper's parser stops at 100 lines and answers 431 itself
    // (a bare one: see conformance::MAX_HEADERS for why it stays so).
    for count in [101, 120, 1000] {
        let mut request =
            b"GET /many HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-Id: many-1\r\n"
                .to_vec();
        for i in 0..count {
            request.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        let r = raw_http::exchange(bridge.http, &request).await;
        assert_eq!(r.status, 431, "{count} lines: {r:?}");
    }
    // HTTP/2 has no such parser limit: the bridge's own check answers.
    let (mut sender, _conn) = h2_connection(bridge.http).await;
    with_timeout(sender.ready()).await.expect("ready");
    let mut req = Request::get(bridge.at("/many")).header("x-request-id", "many-2");
    for i in 0..101 {
        req = req.header(format!("x-h{i}"), "v");
    }
    let resp =
        with_timeout(sender.send_request(req.body(Full::new(Bytes::new())).expect("request")))
            .await
            .expect("h2 response");
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(
        resp.headers().get("x-request-id").map(|v| v.as_bytes()),
        Some(&b"many-2"[..])
    );
    let body = with_timeout(http_body_util::BodyExt::collect(resp.into_body()))
        .await
        .expect("body")
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error body");
    assert_eq!(json["error"]["code"], "headers_too_large");
    assert_eq!(json["error"]["request_id"], "many-2");
    // 100 lines in all (the three below and 97 more) still go through.
    let mut request = b"GET /fine HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
    for i in 0..97 {
        request.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    request.extend_from_slice(b"X-Request-Id: fine-1\r\n\r\n");
    let r = raw_http::exchange(bridge.http, &request).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    worker.stop().await;
    bridge.stop().await;
}

/// A worker may answer `HEAD` with a streamed head (`end: false`) carrying
/// the length, then end it with no bytes: the caller gets the length, and
/// the connection stays usable (a length the body does not match is only
/// an error when there is a body to send).
#[tokio::test]
async fn a_streamed_head_reply_keeps_its_length_and_its_connection() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let addr = bridge.http;
    let caller = tokio::spawn(async move {
        // Two requests on one connection: the second is answered only if
        // the first left it usable.
        raw_http::exchange_bytes(
            addr,
            b"HEAD /file HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
    });
    let (req, _) = raw.next_request().await;
    assert_eq!(req.method, "HEAD");
    stream_empty_head_reply(&mut raw, req.id, 452).await;
    // hyper drops a HEAD reply's body unread, which may reach the worker
    // as a `cancel` of the call it has just ended: harmless, skipped here.
    let after = loop {
        match raw.next().await {
            Frame::Data(wsbridge::protocol::DataHead::Request(h), _) => break h,
            Frame::Control(wsbridge::protocol::Control::Cancel { id, .. }) if id == req.id => {}
            other => panic!("expected the second request, got {other:?}"),
        }
    };
    raw.reply(after.id, 200, &[], b"after").await;
    let wire = with_timeout(caller).await.expect("join");
    let text = String::from_utf8_lossy(&wire);
    let first = raw_http::parse_response(&wire, true);
    assert_eq!(first.header("content-length"), "452", "{text}");
    assert!(text.ends_with("\r\n\r\nafter"), "{text}");
    bridge.stop().await;
}
