//! Per-frame LZ4 compression: negotiated in hello/welcome, used only for
//! large bodies that shrink, never for bodies that are already compressed,
//! and a compressed frame can never make the bridge inflate more than it
//! accepts.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use wsbridge::{
    body::Body,
    protocol::{self, Compression, Hello},
};

/// JSON-like text: LZ4 shrinks it several times.
fn text(len: usize) -> Bytes {
    let line = br#"{"order":12345,"sku":"ABC-123","qty":1,"note":"deliver to the back door"}"#;
    line.iter().copied().cycle().take(len).collect()
}

fn hello(compression: &[&str]) -> Hello {
    Hello {
        worker_id: "lz4".into(),
        metadata: Default::default(),
        services: vec!["default".into()],
        max_inflight: 4,
        flow_control: false,
        accepted: false,
        compression: compression.iter().map(|c| c.to_string()).collect(),
        resumable: false,
        resume: None,
    }
}

async fn post_with(bridge: &TestBridge, headers: &[(&str, &str)], body: Bytes) -> Reply {
    let mut req = Request::post(bridge.at("/up"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    send(&http_client(), req.body(Full::new(body)).expect("request")).await
}

#[tokio::test]
async fn uploads_travel_compressed_to_a_worker_that_asked() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect_hello(&bridge, hello(&["zstd", "lz4"])).await;
    assert_eq!(raw.welcome.compression.as_deref(), Some("lz4"));

    // 1 MiB of text: a head and three chunks, each an LZ4 block.
    let body = text(1 << 20);
    let call = tokio::spawn({
        let (url, body) = (bridge.at("/up"), body.clone());
        async move { post(&http_client(), &url, body).await }
    });
    let (head, got) = raw.next_request().await;
    assert_eq!(got, body, "the worker reads the body as it was sent");
    assert!(
        raw.wire_bytes < body.len() / 4,
        "{} bytes on the wire for a {}-byte body",
        raw.wire_bytes,
        body.len()
    );
    raw.reply(head.id, 200, &[], b"ok").await;
    assert_eq!(with_timeout(call).await.expect("join").body, "ok");

    // Already compressed (Content-Encoding) or incompressible: sent as is.
    for (headers, body) in [
        (&[("content-encoding", "gzip")][..], text(300_000)),
        (&[][..], noise(300_000)),
    ] {
        let before = raw.wire_bytes;
        let call = tokio::spawn({
            let (bridge_url, body) = (bridge.at("/up"), body.clone());
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            async move {
                let mut req = Request::post(bridge_url);
                for (n, v) in &headers {
                    req = req.header(n, v);
                }
                send(&http_client(), req.body(Full::new(body)).expect("request")).await
            }
        });
        let (head, got) = raw.next_request().await;
        assert_eq!(got, body);
        assert!(raw.wire_bytes - before > body.len(), "sent uncompressed");
        raw.reply(head.id, 200, &[], b"ok").await;
        assert_eq!(with_timeout(call).await.expect("join").body, "ok");
    }
}

#[tokio::test]
async fn compressed_replies_reach_the_caller_inflated() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect_hello(&bridge, hello(&["lz4"])).await;
    let call = spawn_get(&bridge, "/down");
    let (head, _) = raw.next_request().await;
    let body = text(200_000);
    let frame = protocol::encode_frame(&response_head(head.id, 200, true), &body, Compression::Lz4);
    assert!(frame.len() < body.len() / 4);
    raw.send_binary(frame).await;
    let reply = with_timeout(call).await.expect("join");
    assert_eq!(reply.head.status, 200);
    assert_eq!(reply.body, body);
    assert_eq!(reply.header("content-length"), body.len().to_string());
}

#[tokio::test]
async fn compression_is_off_unless_both_sides_agree() {
    // The bridge forbids it: a worker that compresses anyway fails the call
    // with 502 bad_response, naming the cause.
    let bridge = TestBridge::start(|c| c.workers.compression = false).await;
    let mut raw = RawWorker::connect_hello(&bridge, hello(&["lz4"])).await;
    assert_eq!(raw.welcome.compression, None);
    let call = spawn_get(&bridge, "/down");
    let (head, _) = raw.next_request().await;
    let frame = protocol::encode_frame(
        &response_head(head.id, 200, true),
        &text(100_000),
        Compression::Lz4,
    );
    raw.send_binary(frame).await;
    let reply = with_timeout(call).await.expect("join");
    assert_eq!(reply.head.status, 502);
    assert_eq!(reply.error_code(), "bad_response");
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("not negotiated"),
        "{:?}",
        reply.json()
    );

    // A worker that did not offer it gets plain frames.
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect_hello(&bridge, hello(&[])).await;
    assert_eq!(raw.welcome.compression, None);
    let body = text(500_000);
    let call = tokio::spawn({
        let (url, body) = (bridge.at("/up"), body.clone());
        async move { post(&http_client(), &url, body).await }
    });
    let (head, got) = raw.next_request().await;
    assert_eq!(got, body);
    assert!(raw.wire_bytes > body.len());
    raw.reply(head.id, 200, &[], b"ok").await;
    with_timeout(call).await.expect("join");
}

#[tokio::test]
async fn a_compressed_frame_cannot_inflate_past_max_frame() {
    let bridge = TestBridge::start(|_| {}).await;
    let limit = bridge.config.workers.max_frame.bytes();
    let mut raw = RawWorker::connect_hello(&bridge, hello(&["lz4"])).await;
    let call = spawn_get(&bridge, "/bomb");
    let (head, _) = raw.next_request().await;
    // A few KiB on the wire that would inflate to more than max_frame.
    let bomb = vec![0u8; limit + 1];
    let frame = protocol::encode_frame(&response_head(head.id, 200, true), &bomb, Compression::Lz4);
    assert!(frame.len() < limit / 100);
    raw.send_binary(frame).await;
    let reply = with_timeout(call).await.expect("join");
    assert_eq!(reply.head.status, 502);
    assert_eq!(reply.error_code(), "bad_response");
    assert!(!reply.json()["error"]["request_id"]
        .as_str()
        .unwrap_or("")
        .is_empty());
    // The worker is told why, and the connection survives: the next call
    // is answered.
    match raw.next().await {
        Frame::Control(protocol::Control::Error { id, code, message }) => {
            assert_eq!((id, code.as_str()), (Some(head.id), "malformed_frame"));
            assert!(message.contains("limit"), "{message}");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    let call = spawn_get(&bridge, "/after");
    let (head, _) = raw.next_request().await;
    raw.reply(head.id, 200, &[], b"fine").await;
    assert_eq!(with_timeout(call).await.expect("join").body, "fine");
}

#[tokio::test]
async fn library_workers_compress_both_ways_when_configured() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut cfg = bridge.worker_config(&["default"], 8);
    cfg.compression = true;
    // Echo: the request body streams back as the reply body.
    let _w = TestWorker::start(cfg, |req: Request<Body>| async move {
        Response::new(Body::wrap(req.into_body()))
    })
    .await;
    for body in [text(3 << 20), noise(1 << 20), text(100)] {
        let reply = post_with(&bridge, &[], body.clone()).await;
        assert_eq!(reply.head.status, 200);
        assert_eq!(reply.body.len(), body.len());
        assert!(reply.body == body, "the echo matches byte for byte");
    }
    // A streamed reply of compressible chunks arrives whole as well.
    let resp = with_timeout(
        http_client().request(
            Request::post(bridge.at("/s"))
                .body(Full::new(text(600_000)))
                .expect("request"),
        ),
    )
    .await
    .expect("head");
    let got = with_timeout(resp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(got, text(600_000));
}
