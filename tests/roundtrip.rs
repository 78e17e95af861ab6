//! A call goes through intact: method, path, query, headers and a binary
//! body one way; status, headers and body the other way.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use wsbridge::body::Body;
use wsbridge::worker::{self, CallInfo};

/// A handler that describes the request it got in headers and echoes the body.
async fn mirror(req: Request<Body>) -> Response<Body> {
    let info = req.extensions().get::<CallInfo>().cloned();
    let mut resp = Response::builder()
        .status(StatusCode::CREATED)
        .header("x-method", req.method().as_str())
        .header("x-uri", req.uri().to_string())
        .header(
            "x-service",
            info.as_ref().map_or("", |i| i.service.as_str()),
        )
        .header(
            "x-call-request-id",
            info.as_ref().map_or("", |i| i.request_id.as_str()),
        )
        .header("set-cookie", "a=1")
        .header("content-type", "application/octet-stream");
    for name in [
        "x-custom",
        "x-forwarded-for",
        "x-forwarded-proto",
        "connection",
        "keep-alive",
        "te",
    ] {
        let seen: Vec<&str> = req
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        resp = resp.header(format!("x-seen-{name}"), seen.join("|"));
    }
    resp = resp.header("set-cookie", "b=2");
    resp.body(req.into_body()).expect("response")
}

#[tokio::test]
async fn request_and_reply_arrive_intact() {
    let bridge = TestBridge::start(|_| {}).await;
    let _w = bridge.worker(&["orders"], 8, mirror).await;
    let client = http_client();
    let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let req = Request::put(bridge.at("/orders/42?x=1&y=%20z"))
        .header("x-custom", "one")
        .header("x-custom", "two")
        .header("x-request-id", "caller-id-1")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "not forwarded")
        .body(Full::new(Bytes::from(body.clone())))
        .expect("request");
    let r = send(&client, req).await;
    assert_eq!(r.head.status, StatusCode::CREATED);
    assert_eq!(r.body, Bytes::from(body), "binary body intact both ways");
    assert_eq!(r.header("x-method"), "PUT");
    assert_eq!(r.header("x-uri"), "/orders/42?x=1&y=%20z");
    assert_eq!(r.header("x-service"), "orders");
    assert_eq!(
        r.header("x-seen-x-custom"),
        "one|two",
        "repeated headers keep order"
    );
    assert_eq!(r.header("x-seen-x-forwarded-for"), "127.0.0.1");
    assert_eq!(r.header("x-seen-x-forwarded-proto"), "http");
    assert_eq!(
        r.header("x-seen-connection"),
        "",
        "hop-by-hop headers are stripped"
    );
    assert_eq!(r.header("x-request-id"), "caller-id-1");
    assert_eq!(
        r.header("x-call-request-id"),
        "caller-id-1",
        "request id reaches the worker"
    );
    assert_eq!(r.header("content-type"), "application/octet-stream");
    let cookies: Vec<_> = r.head.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"], "repeated response headers survive");
    bridge.stop().await;
}

#[tokio::test]
async fn forwarded_headers_extend_the_callers_chain_and_replace_the_rest() {
    let bridge = TestBridge::start(|_| {}).await;
    let _w = bridge.worker(&["orders"], 8, mirror).await;
    let client = http_client();
    let cases: [(&[&str], &str); 4] = [
        (&[], "127.0.0.1"),
        (&["10.0.0.1"], "10.0.0.1, 127.0.0.1"),
        (&["10.0.0.1", "10.0.0.2"], "10.0.0.1, 10.0.0.2, 127.0.0.1"),
        // An empty value adds nothing, not a dangling separator.
        (&[""], "127.0.0.1"),
    ];
    for (sent, expected) in cases {
        let mut req = Request::post(bridge.at("/orders/1")).header("x-forwarded-proto", "https");
        for value in sent {
            req = req.header("x-forwarded-for", *value);
        }
        let r = send(&client, req.body(Full::new(Bytes::new())).expect("request")).await;
        assert_eq!(r.head.status, StatusCode::CREATED, "{sent:?}");
        assert_eq!(r.header("x-seen-x-forwarded-for"), expected, "{sent:?}");
        assert_eq!(r.header("x-seen-x-forwarded-proto"), "http", "{sent:?}");
    }
    bridge.stop().await;
}

#[tokio::test]
async fn bodies_larger_than_a_chunk_travel_both_ways() {
    let bridge = TestBridge::start(|_| {}).await;
    let _w = bridge.worker(&["default"], 8, worker::echo).await;
    let client = http_client();
    let body: Bytes = (0..3_000_000u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let r = post(&client, &bridge.at("/big"), body.clone()).await;
    assert_eq!(r.head.status, StatusCode::OK);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body, "3 MB body came back byte for byte");
    bridge.stop().await;
}

#[tokio::test]
async fn every_response_has_a_request_id_and_errors_are_json() {
    let bridge = TestBridge::start(|c| c.default_service = None).await;
    let client = http_client();
    let r = get(&client, &bridge.at("/nowhere")).await;
    assert_eq!(r.head.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "no_route");
    let id = r.header("x-request-id").to_owned();
    assert_eq!(
        uuid::Uuid::parse_str(&id).map(|u| u.get_version_num()),
        Ok(7),
        "generated ids are UUID v7"
    );
    assert_eq!(r.json()["error"]["request_id"], id.as_str());
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("/nowhere")));
    bridge.stop().await;
}

#[tokio::test]
async fn keep_alive_connection_serves_many_calls() {
    let bridge = TestBridge::start(|_| {}).await;
    let _w = bridge.worker(&["default"], 8, worker::echo).await;
    // One connection, many sequential calls: hyper's pool reuses it.
    let client = http_client();
    for i in 0..200 {
        let r = post(&client, &bridge.at("/seq"), format!("call {i}")).await;
        assert_eq!(r.body, format!("call {i}").as_bytes());
    }
    bridge.stop().await;
}

/// A body whose start arrives as several chunks (chunked encoding: hyper
/// hands each chunk over as a frame of its own) reaches the worker whole and
/// in order, whether the first chunk is large enough to be kept as it came
/// or small enough to be copied.
#[tokio::test]
async fn a_body_read_in_several_chunks_arrives_whole_and_in_order() {
    let bridge = TestBridge::start(|_| {}).await;
    let _w = bridge.worker(&["default"], 8, worker::echo).await;
    let body = noise(20_000);
    for sizes in [
        &[5_000, 100, 3, 6_000][..],
        &[100, 5_000, 1][..],
        &[9_000][..],
    ] {
        let mut request = b"POST /pieces HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut sent = Vec::new();
        let mut at = 0;
        for &n in sizes {
            let piece = &body[at..at + n];
            at += n;
            request.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            request.extend_from_slice(piece);
            request.extend_from_slice(b"\r\n");
            sent.extend_from_slice(piece);
        }
        request.extend_from_slice(b"0\r\n\r\n");
        let r = raw_http::exchange(bridge.http, &request).await;
        assert_eq!(r.status, 200, "chunks {sizes:?}");
        assert!(
            r.body == sent,
            "chunks {sizes:?}: the body came back byte for byte"
        );
    }
    bridge.stop().await;
}
