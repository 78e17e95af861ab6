//! Protocol violations by a worker: each is answered with an error frame
//! and counted; the call concerned fails with 502; a worker that keeps
//! violating is closed with 1008; nobody else notices.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::{protocol::frame::coding::CloseCode, Message};
use wsbridge::protocol::{self, BodyHead, Control, DataHead, ResponseHead};

#[tokio::test]
async fn a_reply_to_a_call_never_sent_is_a_counted_violation() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    raw.reply(999, 200, &[], b"made up").await;
    match raw.next().await {
        Frame::Control(Control::Error { id, code, .. }) => {
            assert_eq!((id, code.as_str()), (Some(999), "unknown_call"));
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    assert_eq!(bridge.handle.protocol_violations(), 1);
    // The connection is still good.
    let call = spawn_get(&bridge, "/after");
    let (req, _) = raw.next_request().await;
    raw.reply(req.id, 200, &[], b"fine").await;
    assert_eq!(with_timeout(call).await.expect("join").body, "fine");
    bridge.stop().await;
}

#[tokio::test]
async fn a_duplicate_reply_is_ignored_and_the_first_one_counts() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let call = spawn_get(&bridge, "/once");
    let (req, _) = raw.next_request().await;
    raw.reply(req.id, 200, &[], b"first").await;
    raw.reply(req.id, 500, &[], b"second").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"first"[..])
    );
    // A late or repeated reply is not held against the worker: replies that
    // cross a cancel are normal.
    let call = spawn_get(&bridge, "/next");
    let (next, _) = raw.next_request().await;
    raw.reply(next.id, 200, &[], b"next").await;
    assert_eq!(with_timeout(call).await.expect("join").body, "next");
    assert_eq!(bridge.handle.protocol_violations(), 0);
    bridge.stop().await;
}

#[tokio::test]
async fn a_worker_that_keeps_sending_garbage_is_closed_with_1008() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut good = RawWorker::connect(&bridge, &["default"], 4).await;
    let mut bad = RawWorker::connect(&bridge, &["default"], 4).await;
    // A call lands on one of them; make sure the bad one holds one (a POST
    // from a worker without `accepted` frames: it will not be retried).
    let (mut held, mut spare) = (None, None);
    while held.is_none() {
        let call = spawn_post(&bridge, "/held", "x");
        tokio::select! {
            (req, _) = bad.next_request() => held = Some((req, call)),
            (req, _) = good.next_request() => spare = Some((req, call)),
        }
    }
    for i in 0..100 {
        let junk = Message::Binary(vec![0xff, 0, 0, i].into());
        if bad.ws.send(junk).await.is_err() {
            break; // already closed
        }
    }
    let close = with_timeout(async {
        loop {
            match bad.ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => break None,
            }
        }
    })
    .await
    .expect("a close frame");
    assert_eq!(close.code, CloseCode::Policy);
    assert!(close.reason.contains("violations"), "{}", close.reason);
    assert!(bridge.handle.protocol_violations() >= 32);
    let (_, call) = held.expect("held");
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.error_code(), "worker_lost");
    // The well-behaved worker keeps serving.
    if let Some((req, call)) = spare {
        good.reply(req.id, 200, &[], b"ok").await;
        with_timeout(call).await.expect("join");
    }
    let call = spawn_get(&bridge, "/after");
    let (req, _) = good.next_request().await;
    good.reply(req.id, 200, &[], b"ok").await;
    assert_eq!(with_timeout(call).await.expect("join").body, "ok");
    bridge.stop().await;
}

/// A worker whose streamed reply declares a `Content-Length` and then sends
/// more or fewer bytes: the caller must never get a reply that looks
/// complete. Before, a longer body was cut to the declared length on a
/// kept-alive connection, which is a whole, wrong reply.
#[tokio::test]
async fn a_streamed_reply_that_breaks_its_content_length_never_looks_complete() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    for (declared, rest, whole) in [
        ("11", &b" world"[..], true),
        ("5", &b" world"[..], false),
        ("20", &b" world"[..], false),
    ] {
        let addr = bridge.http;
        let caller = tokio::spawn(async move {
            raw_http::exchange_bytes(
                addr,
                b"GET /cl HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
        });
        let (req, _) = raw.next_request().await;
        let head = DataHead::Response(ResponseHead {
            id: req.id,
            status: 200,
            headers: vec![("content-length".into(), declared.into())],
            latin1: vec![],
            end: false,
        });
        raw.send_binary(protocol::encode_data(&head, b"hello"))
            .await;
        let body = DataHead::Body(BodyHead {
            id: req.id,
            end: true,
        });
        raw.send_binary(protocol::encode_data(&body, rest)).await;
        let wire = with_timeout(caller).await.expect("join");
        // Cut off before the head was written is a failure the caller sees
        // too: nothing at all.
        let r = (!wire.is_empty()).then(|| raw_http::parse_response(&wire, false));
        let complete = r.as_ref().is_some_and(|r| {
            r.header("content-length") == declared && r.body.len().to_string() == declared
        });
        assert_eq!(complete, whole, "declared {declared}, got {r:?}");
        if whole {
            assert_eq!(r.map(|r| r.body), Some(b"hello world".to_vec()));
        }
    }
    bridge.stop().await;
}

#[tokio::test]
async fn frame_errors_name_the_frame_type_and_the_problem() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let mut error_for = async |text: &str| {
        raw.send_text(text).await;
        match raw.next().await {
            Frame::Control(Control::Error { code, message, .. }) => (code, message),
            other => panic!("expected an error frame for {text}, got {other:?}"),
        }
    };
    // A second hello: named, not dumped as a Rust value.
    let hello = r#"{"type":"hello","worker_id":"again","services":["default"],"max_inflight":1}"#;
    let (code, message) = error_for(hello).await;
    assert_eq!(code, "unexpected_frame");
    assert!(
        message.contains("hello") && !message.contains('{'),
        "{message}"
    );
    let (code, message) = error_for(r#"{"type":"start","id":1}"#).await;
    assert_eq!(code, "unexpected_frame");
    assert!(message.starts_with("start frames"), "{message}");
    // Not JSON at all, and JSON that is not a control frame.
    let (code, message) = error_for("{not json").await;
    assert_eq!(code, "malformed_frame");
    assert!(
        message.contains("invalid JSON in a text frame"),
        "{message}"
    );
    let (code, message) = error_for(r#"{"type":"credit","id":"one"}"#).await;
    assert_eq!(code, "malformed_frame");
    assert!(message.contains("invalid control frame"), "{message}");
    bridge.stop().await;
}
