//! Protocol violations by a worker: each is answered with an error frame
//! and counted; the call concerned fails with 502; a worker that keeps
//! violating is closed with 1008; nobody else notices. Garbage of every
//! kind (not JSON, unknown or unexpected frames, a second head for a
//! streamed reply) gets an answer or nothing, and the connection's other
//! calls go on.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::{
    protocol::frame::{
        coding::{CloseCode, OpCode},
        Frame as WsFrame,
    },
    Message,
};
use wsbridge::{
    protocol::{self, BodyHead, Control, DataHead, RequestHead, ResponseHead},
    worker,
};

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

/// A text frame the bridge answers with `unknown_frame`: sent after a frame
/// that should produce no answer, the next frame read must be the answer to
/// this one (the reader handles frames in order).
const MARKER: &str = r#"{"type":"marker"}"#;

async fn expect_error(raw: &mut RawWorker, want_id: Option<u64>, want_code: &str, what: &str) {
    match raw.next().await {
        Frame::Control(Control::Error { id, code, message }) => {
            assert_eq!(
                (id, code.as_str()),
                (want_id, want_code),
                "{what}: {message}"
            );
        }
        other => panic!("{what}: expected an error frame, got {other:?}"),
    }
}

/// Sends `MARKER` and checks that its answer is the next frame: whatever was
/// sent before it produced no frame.
async fn expect_silence(raw: &mut RawWorker, what: &str) {
    raw.send_text(MARKER).await;
    match raw.next().await {
        Frame::Control(Control::Error {
            id: None,
            code,
            message,
        }) if code == "unknown_frame" && message.contains("control") => {}
        other => panic!("{what}: expected no answer, got {other:?}"),
    }
}

fn binary_frame(prefix: u32, json: &str, body: &[u8]) -> Bytes {
    let mut frame = prefix.to_be_bytes().to_vec();
    frame.extend_from_slice(json.as_bytes());
    frame.extend_from_slice(body);
    Bytes::from(frame)
}

/// A frame whose prefix sets the LZ4 flag (bit 24).
fn lz4_flagged(json: &str, body: &[u8]) -> Bytes {
    binary_frame(1 << 24 | json.len() as u32, json, body)
}

/// A `request` frame, which only the bridge may send.
fn request_frame(id: u64) -> Bytes {
    protocol::encode_data(
        &DataHead::Request(RequestHead {
            id,
            request_id: "r".into(),
            service: "default".into(),
            method: "GET".into(),
            path: "/".into(),
            headers: vec![],
            latin1: vec![],
            end: true,
            gate: true,
        }),
        b"",
    )
}

fn len_prefixed(json: &str) -> Bytes {
    binary_frame(json.len() as u32, json, b"")
}

/// A call to the echo worker serving `orders`.
async fn served_by_echo(bridge: &TestBridge, what: &str) {
    let path = format!("/orders/{what}");
    let r = post(&http_client(), &bridge.at(&path), what.to_owned()).await;
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, what.as_bytes()),
        "{what}"
    );
    assert_eq!(r.header("x-echo-path"), path);
}

#[tokio::test]
async fn garbage_from_a_worker_is_answered_and_nobody_else_notices() {
    let bridge = TestBridge::start(|_| {}).await;
    let _echo = bridge.worker(&["orders"], 8, worker::echo).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    // A call on the hostile connection is in flight throughout.
    let pending = spawn_get(&bridge, "/in-flight");
    let (inflight, _) = raw.next_request().await;

    let mut noise = vec![0u8; 1000];
    let mut x = 0x2545_f491_u32;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    noise[0] = 0x7f; // unknown flag bits
    let garbage: Vec<(&str, Message, Option<u64>, Option<&str>)> = vec![
        (
            "text, not JSON",
            Message::text("}{ not json"),
            None,
            Some("malformed_frame"),
        ),
        (
            "text, JSON array",
            Message::text("[1,2,3]"),
            None,
            Some("malformed_frame"),
        ),
        (
            "a second hello",
            Message::text(
                r#"{"type":"hello","worker_id":"x","services":["default"],"max_inflight":1}"#,
            ),
            None,
            Some("unexpected_frame"),
        ),
        (
            "a cancel, which only the bridge sends",
            Message::text(r#"{"type":"cancel","id":1,"reason":"x"}"#),
            None,
            Some("unexpected_frame"),
        ),
        (
            "credit for no call",
            Message::text(r#"{"type":"credit","id":424242,"bytes":99999999}"#),
            None,
            None,
        ),
        (
            "accepted for no call",
            Message::text(r#"{"type":"accepted","id":424242}"#),
            None,
            None,
        ),
        (
            "an error for no call",
            Message::text(r#"{"type":"error","code":"x","message":"y"}"#),
            None,
            None,
        ),
        (
            "binary, empty",
            Message::Binary(Bytes::new()),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, 2 bytes",
            Message::Binary(Bytes::from_static(&[0, 1])),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, length past the end",
            Message::Binary(binary_frame(50, "{}", b"")),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, length over MAX_HEADER_LEN",
            Message::Binary(binary_frame(0x00ff_ffff, "{}", b"")),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, noise",
            Message::Binary(Bytes::from(noise)),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, compressed without agreement",
            Message::Binary(lz4_flagged(
                r#"{"type":"response","id":424242,"status":200}"#,
                &[4, 0, 0, 0, 0x40, b'a', b'b', b'c', b'd'],
            )),
            Some(424_242),
            Some("malformed_frame"),
        ),
        (
            "binary, JSON header not an object",
            Message::Binary(len_prefixed("\"response\"")),
            None,
            Some("malformed_frame"),
        ),
        (
            "binary, unknown type",
            Message::Binary(len_prefixed(r#"{"type":"launch","id":1}"#)),
            None,
            Some("unknown_frame"),
        ),
        (
            "binary, a request from a worker",
            Message::Binary(request_frame(0)),
            None,
            Some("unexpected_frame"),
        ),
        (
            "binary, a reply for no call",
            Message::Binary(protocol::encode_data(
                &response_head(424_242, 200, true),
                b"x",
            )),
            Some(424_242),
            Some("unknown_call"),
        ),
        (
            "binary, a body chunk for no call",
            Message::Binary(protocol::encode_data(
                &DataHead::Body(BodyHead {
                    id: 424_242,
                    end: true,
                }),
                b"x",
            )),
            Some(424_242),
            Some("unknown_call"),
        ),
    ];
    // Each error frame and each marker is a counted violation; fewer than
    // the 32 that close a connection.
    let mut violations = 0;
    for (what, msg, id, code) in garbage {
        with_timeout(raw.ws.send(msg)).await.expect("send");
        match code {
            Some(code) => expect_error(&mut raw, id, code, what).await,
            None => expect_silence(&mut raw, what).await,
        }
        violations += 1;
        // Everyone else is served meanwhile.
        served_by_echo(&bridge, "meanwhile").await;
    }
    // The hostile connection itself is intact: its call in flight is
    // answered, and a new one is served.
    raw.reply(inflight.id, 200, &[], b"still correlated").await;
    let r = with_timeout(pending).await.expect("join");
    assert_eq!(r.body, "still correlated");
    served_by_raw(&bridge, &mut raw, "/after-garbage").await;
    assert_eq!(bridge.handle.protocol_violations(), violations);

    // Text that is not UTF-8 breaks the WebSocket itself: that connection
    // ends, with a close frame, and nothing else does.
    let bad_utf8 = WsFrame::message(
        Bytes::from_static(&[0xff, 0xfe, 0x80]),
        OpCode::Data(tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Text),
        true,
    );
    with_timeout(raw.ws.send(Message::Frame(bad_utf8)))
        .await
        .expect("send");
    assert!(matches!(raw.next().await, Frame::Closed));
    within(
        Duration::from_secs(5),
        "the hostile worker is unregistered",
        async {
            while bridge.handle.workers("default") > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        },
    )
    .await;
    served_by_echo(&bridge, "after").await;
    bridge.stop().await;
}

// Duplicate whole replies are covered above
// (a_duplicate_reply_is_ignored_and_the_first_one_counts); these are the
// streamed cases.
#[tokio::test]
async fn a_second_head_for_a_streamed_reply_is_ignored_after_it_ended_and_cuts_it_off_before() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;

    // A streamed reply that has ended, then a second head for its id.
    let call = spawn_get(&bridge, "/dup-streamed");
    let (req, _) = raw.next_request().await;
    raw.send_binary(protocol::encode_data(
        &response_head(req.id, 200, false),
        b"one,",
    ))
    .await;
    let last = DataHead::Body(BodyHead {
        id: req.id,
        end: true,
    });
    raw.send_binary(protocol::encode_data(&last, b"two")).await;
    raw.reply(req.id, 200, &[], b"again").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.body, "one,two");
    expect_silence(&mut raw, "a head after a finished stream").await;

    // A second head while the stream is still open is a broken reply: the
    // caller's body is cut off, the worker is told.
    let (req, resp) = raw.streamed_reply(&bridge, "/dup-open", b"part").await;
    raw.reply(req.id, 200, &[], b"impostor").await;
    let body = within(
        Duration::from_secs(2),
        "the cut-off body ends",
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await;
    assert!(body.is_err(), "the body must be cut off, not end cleanly");
    expect_error(&mut raw, Some(req.id), "bad_response", "a head mid-stream").await;

    // Every reply still goes to its own caller.
    served_by_raw(&bridge, &mut raw, "/next").await;
    bridge.until_idle().await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_request_frame_from_a_worker_is_unexpected_whatever_its_id() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    for id in [0, 9] {
        raw.send_binary(request_frame(id)).await;
        expect_error(&mut raw, None, "unexpected_frame", &format!("request {id}")).await;
    }
    served_by_raw(&bridge, &mut raw, "/fine").await;
    bridge.stop().await;
}
