//! Workers come, go, stall and misbehave; callers always get a clear answer
//! in bounded time.

mod common;

use std::time::{Duration, Instant};
use wsbridge::body::Body;

use bytes::Bytes;
use common::{raw_http::read_reply, *};
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_tungstenite::tungstenite::{
    protocol::frame::{
        coding::{CloseCode, Data, OpCode},
        Frame as WsFrame,
    },
    Message,
};
use tokio_util::task::AbortOnDropHandle;
use wsbridge::{
    protocol::{self, Control, DataHead},
    worker::{self, Status, WorkerConfig},
};

#[tokio::test]
async fn timeout_gives_504_and_the_worker_gets_a_cancel() {
    let bridge = TestBridge::start(|c| c.http.request_timeout = Duration::from_millis(300)).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let call = spawn_post(&bridge, "/slow", "x");
    let (req, _) = raw.next_request().await;
    // Never reply; the bridge must give up and say so.
    match raw.next().await {
        Frame::Control(Control::Cancel { id, reason }) => {
            assert_eq!(id, req.id);
            assert_eq!(reason, "timeout");
        }
        other => panic!("expected cancel, got {other:?}"),
    }
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.head.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.error_code(), "timeout");
    assert_eq!(r.json()["error"]["request_id"], req.request_id.as_str());
    // A late reply is ignored, and the next call gets its own reply, not it.
    raw.reply(req.id, 200, &[], b"too late").await;
    let call = spawn_post(&bridge, "/next", "x");
    let (next, _) = raw.next_request().await;
    assert_ne!(next.id, req.id);
    raw.reply(next.id, 200, &[], b"on time").await;
    assert_eq!(with_timeout(call).await.expect("join").body, "on time");
    bridge.stop().await;
}

#[tokio::test]
async fn per_route_timeout_overrides_the_global_one() {
    let bridge = TestBridge::start(|c| {
        c.http.request_timeout = Duration::from_secs(20);
        c.routes[0].request_timeout = Some(Duration::from_millis(200));
    })
    .await;
    let mut raw = RawWorker::connect(&bridge, &["orders"], 4).await;
    let client = http_client();
    let started = Instant::now();
    let url = bridge.at("/orders/slow");
    let call = tokio::spawn(async move { post(&client, &url, "x").await });
    let _ = raw.next_request().await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.head.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    bridge.stop().await;
}

#[tokio::test]
async fn no_worker_gives_503_after_queue_timeout() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_millis(200)).await;
    let client = http_client();
    let started = Instant::now();
    let r = get(&client, &bridge.at("/orders/1")).await;
    let waited = started.elapsed();
    assert_eq!(r.head.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "no_worker");
    assert_eq!(r.header("retry-after"), "1");
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("orders")));
    assert!(
        waited >= Duration::from_millis(200),
        "answered before queue_timeout: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "answered long after queue_timeout: {waited:?}"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_worker_that_connects_within_queue_timeout_serves_the_call() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(10)).await;
    let call = spawn_post(&bridge, "/orders/late", "waited");
    bridge.until_queued("orders", 1).await;
    let w = bridge.worker(&["orders"], 1, worker::echo).await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.head.status, StatusCode::OK);
    assert_eq!(r.body, "waited");
    w.stop().await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_full_queue_gives_503_queue_full() {
    let bridge = TestBridge::start(|c| {
        c.http.queue_limit = 1;
        c.http.queue_timeout = Duration::from_secs(10);
    })
    .await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 1).await;
    let client = http_client();
    // The first call occupies the worker's only slot, the second the queue.
    let (c1, c2) = (client.clone(), client.clone());
    let (u1, u2) = (bridge.at("/a"), bridge.at("/b"));
    let first = tokio::spawn(async move { post(&c1, &u1, "1").await });
    let (req, _) = raw.next_request().await;
    let second = tokio::spawn(async move { post(&c2, &u2, "2").await });
    bridge.until_queued("default", 1).await;
    // The third finds the queue full.
    let r = get(&client, &bridge.at("/c")).await;
    assert_eq!(r.head.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "queue_full");
    assert_eq!(r.header("retry-after"), "1");
    raw.reply(req.id, 200, &[], b"one").await;
    let (req2, _) = raw.next_request().await;
    raw.reply(req2.id, 200, &[], b"two").await;
    assert_eq!(with_timeout(first).await.expect("join").body, "one");
    assert_eq!(with_timeout(second).await.expect("join").body, "two");
    bridge.stop().await;
}

#[tokio::test]
async fn a_worker_killed_mid_request_gives_502_at_once() {
    let bridge = TestBridge::start(|c| c.http.request_timeout = Duration::from_secs(20)).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let call = spawn_post(&bridge, "/doomed", "x");
    let (req, _) = raw.next_request().await;
    let killed = Instant::now();
    // Drop the socket without a close frame: what a crashed process leaves.
    drop(raw);
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.head.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "worker_lost");
    assert_eq!(r.json()["error"]["request_id"], req.request_id.as_str());
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "took {:?}",
        killed.elapsed()
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_worker_that_stops_answering_pings_is_dropped() {
    let interval = Duration::from_millis(300);
    let misses = 2;
    let bridge = TestBridge::start(|c| {
        c.workers.ping_interval = interval;
        c.workers.ping_misses = misses;
        c.http.request_timeout = Duration::from_secs(20);
    })
    .await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let call = spawn_post(&bridge, "/frozen", "x");
    let _ = raw.next_request().await;
    // From now on the worker reads nothing, so it answers no pings: a frozen
    // process, or a connection cut without FIN.
    let frozen = Instant::now();
    let r = with_timeout(call).await.expect("join");
    let detected = frozen.elapsed();
    assert_eq!(r.head.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "worker_lost");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("pong")),
        "{}",
        r.json()
    );
    let bound = interval * (misses + 1);
    assert!(
        detected <= bound + Duration::from_millis(600),
        "dropped after {detected:?}, bound {bound:?}"
    );
    drop(raw);
    bridge.stop().await;
}

#[tokio::test]
async fn the_worker_reconnects_when_the_bridge_goes_silent() {
    // A fake bridge that welcomes the worker with a 100 ms ping interval and
    // then says nothing at all, like a peer behind a dead NAT mapping.
    let bridge = FakeBridge::bind().await;
    let url = bridge.url.clone();
    let fake = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..2 {
            // Keep the socket open, never write again.
            held.push(bridge.accept(welcome(100, 1)).await);
        }
        held
    });
    let mut cfg = WorkerConfig::new(url, TOKEN, ["default"]);
    cfg.backoff_initial = Duration::from_millis(10);
    let w = TestWorker::start(cfg, worker::echo).await;
    let mut status = w.status.clone();
    let silent_since = Instant::now();
    let reason = with_timeout(status.wait_for(|s| matches!(s, Status::Disconnected { .. })))
        .await
        .expect("status")
        .clone();
    assert!(
        matches!(&reason, Status::Disconnected { reason } if reason.contains("silent")),
        "{reason:?}"
    );
    assert!(
        silent_since.elapsed() < Duration::from_secs(2),
        "{:?}",
        silent_since.elapsed()
    );
    // ...and it dials again.
    let held = with_timeout(fake).await.expect("fake bridge");
    assert_eq!(held.len(), 2);
    w.stop().await;
}

#[tokio::test]
async fn unknown_frames_get_an_error_frame_and_the_connection_stays() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    raw.send_text(r#"{"type":"teleport","to":"mars"}"#).await;
    match raw.next().await {
        Frame::Control(Control::Error { code, .. }) => assert_eq!(code, "unknown_frame"),
        other => panic!("expected error frame, got {other:?}"),
    }
    let mut frame = 9u32.to_be_bytes().to_vec();
    frame.extend_from_slice(br#"{"x":1}{}"#);
    raw.send_binary(Bytes::from(frame)).await;
    match raw.next().await {
        Frame::Control(Control::Error { code, .. }) => assert_eq!(code, "malformed_frame"),
        other => panic!("expected error frame, got {other:?}"),
    }
    // Still serving.
    let call = spawn_post(&bridge, "/after", "x");
    let (req, body) = raw.next_request().await;
    raw.reply(req.id, 200, &[("x-ok", "1")], &body).await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!((r.head.status, r.header("x-ok")), (StatusCode::OK, "1"));
    bridge.stop().await;
}

#[tokio::test]
async fn invalid_replies_give_502_bad_response() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let client = http_client();
    type Case<'a> = (&'a str, u16, &'a [(&'a str, &'a str)]);
    let cases: [Case; 3] = [
        ("/bad-status", 42, &[]),
        ("/informational", 101, &[]),
        ("/bad-header", 200, &[("bad header", "x")]),
    ];
    for (path, status, headers) in cases {
        let (c, url) = (client.clone(), bridge.at(path));
        let call = tokio::spawn(async move { get(&c, &url).await });
        let (req, _) = raw.next_request().await;
        raw.reply(req.id, status, headers, b"").await;
        let r = with_timeout(call).await.expect("join");
        assert_eq!(r.head.status, StatusCode::BAD_GATEWAY, "{path}");
        assert_eq!(r.error_code(), "bad_response", "{path}");
        match raw.next().await {
            Frame::Control(Control::Error { id, code, .. }) => {
                assert_eq!((id, code.as_str()), (Some(req.id), "bad_response"))
            }
            other => panic!("expected error frame, got {other:?}"),
        }
    }
    // A header that is JSON but not a valid response names its call, which
    // fails at once instead of at the deadline.
    let call = spawn_get(&bridge, "/garbled");
    let (req, _) = raw.next_request().await;
    let json = format!(
        r#"{{"type":"response","id":{},"status":"two hundred"}}"#,
        req.id
    );
    let mut frame = (json.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(json.as_bytes());
    raw.send_binary(Bytes::from(frame)).await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, r.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, "bad_response")
    );
    match raw.next().await {
        Frame::Control(Control::Error { id, code, .. }) => {
            assert_eq!((id, code.as_str()), (Some(req.id), "malformed_frame"))
        }
        other => panic!("expected error frame, got {other:?}"),
    }
    // A worker may fail a call explicitly.
    let call = spawn_get(&bridge, "/refused");
    let (req, _) = raw.next_request().await;
    let err = Control::Error {
        id: Some(req.id),
        code: "overloaded".into(),
        message: "try later".into(),
    };
    raw.send_text(&protocol::encode_control(&err)).await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.error_code(), "bad_response");
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("try later")));
    bridge.stop().await;
}

#[tokio::test]
async fn chunked_replies_from_a_worker_are_assembled() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let call = spawn_get(&bridge, "/chunks");
    let (req, _) = raw.next_request().await;
    let head = response_head(req.id, 200, false);
    raw.send_binary(protocol::encode_data(&head, b"one,")).await;
    let mid = DataHead::Body(protocol::BodyHead {
        id: req.id,
        end: false,
    });
    raw.send_binary(protocol::encode_data(&mid, b"two,")).await;
    let last = DataHead::Body(protocol::BodyHead {
        id: req.id,
        end: true,
    });
    raw.send_binary(protocol::encode_data(&last, b"three"))
        .await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.body, "one,two,three");
    bridge.stop().await;
}

#[tokio::test]
async fn a_draining_worker_gets_no_new_calls() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_millis(300)).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let client = http_client();
    let (c, url) = (client.clone(), bridge.at("/inflight"));
    let inflight = tokio::spawn(async move { get(&c, &url).await });
    let (req, _) = raw.next_request().await;
    raw.send_text(r#"{"type":"drain"}"#).await;
    // A call sent after the drain has been processed finds no worker. The
    // drain and the reply below travel on one ordered connection, so once
    // the in-flight reply is back, the drain has been seen.
    raw.reply(req.id, 200, &[], b"finished").await;
    assert_eq!(with_timeout(inflight).await.expect("join").body, "finished");
    let r = get(&client, &bridge.at("/new")).await;
    assert_eq!(r.error_code(), "no_worker");
    bridge.stop().await;
}

#[tokio::test]
async fn a_worker_close_is_answered_with_a_close() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    with_timeout(raw.ws.close(None)).await.expect("close");
    // RFC 6455 5.5.1: the bridge echoes the close before dropping the TCP connection.
    let echoed = loop {
        match with_timeout(raw.ws.next()).await {
            Some(Ok(Message::Close(_))) => break true,
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => break false,
        }
    };
    assert!(
        echoed,
        "the bridge dropped the connection without a close frame"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_healthy_worker_survives_many_ping_intervals() {
    // Pings every 50 ms, dropped after one miss: a worker that answers pongs
    // must stay connected through a call lasting many intervals.
    let bridge = TestBridge::start(|c| {
        c.workers.ping_interval = Duration::from_millis(50);
        c.workers.ping_misses = 1;
    })
    .await;
    let w = bridge
        .worker(&["default"], 4, |req: http::Request<Body>| async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            http::Response::new(req.into_body())
        })
        .await;
    let session_before = w.status.borrow().clone();
    let r = post(&http_client(), &bridge.at("/long"), "patience").await;
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"patience"[..])
    );
    assert_eq!(
        *w.status.borrow(),
        session_before,
        "the worker reconnected in between"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_cancel_aborts_the_handler_in_the_worker_library() {
    let bridge = TestBridge::start(|c| c.http.request_timeout = Duration::from_millis(200)).await;
    let (dropped_tx, dropped_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let dropped_rx = std::sync::Arc::new(tokio::sync::Mutex::new(dropped_rx));
    let _w = bridge
        .worker(&["default"], 4, move |_req: http::Request<Body>| {
            let guard = OnDrop(dropped_tx.clone());
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                http::Response::new(Body::empty())
            }
        })
        .await;
    let r = get(&http_client(), &bridge.at("/forever")).await;
    assert_eq!(r.error_code(), "timeout");
    // The handler's future is dropped because of the cancel frame: the
    // connection itself stays up (nothing else would drop it).
    with_timeout(dropped_rx.lock().await.recv())
        .await
        .expect("handler dropped");
    bridge.stop().await;
}

#[tokio::test]
async fn a_reply_over_max_response_body_gives_502() {
    let bridge =
        TestBridge::start(|c| c.http.max_response_body = wsbridge::config::ByteSize(1000)).await;
    let _w = bridge.worker(&["default"], 4, worker::echo).await;
    let client = http_client();
    let r = post(&client, &bridge.at("/ok"), vec![b'x'; 1000]).await;
    assert_eq!(r.head.status, StatusCode::OK);
    let r = post(&client, &bridge.at("/too-big"), vec![b'x'; 1001]).await;
    assert_eq!(
        (r.head.status, r.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, "bad_response")
    );
    // A streamed reply from a flow-controlled worker (the echo streams
    // bodies over one chunk) never holds more than a window in the bridge,
    // so it passes however large it is.
    let r = post(&client, &bridge.at("/streamed"), vec![b'x'; 600_000]).await;
    assert_eq!((r.head.status, r.body.len()), (StatusCode::OK, 600_000));
    bridge.stop().await;
}

#[tokio::test]
async fn a_message_over_max_frame_drops_the_worker() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let call = spawn_get(&bridge, "/huge");
    let (req, _) = raw.next_request().await;
    let head = response_head(req.id, 200, true);
    let too_big = vec![0u8; raw.welcome.max_frame as usize + 1];
    let _ = raw
        .ws
        .send(Message::Binary(protocol::encode_data(&head, &too_big)))
        .await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, r.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, "worker_lost")
    );
    // The worker is told why: 1009, with the sizes.
    let (code, reason) = close_frame(&mut raw).await;
    assert_eq!(code, CloseCode::Size, "{reason}");
    let max = raw.welcome.max_frame;
    assert!(
        reason.contains(&format!("over max_frame ({max})")),
        "{reason}"
    );
    bridge.stop().await;
}

/// The close frame the bridge sends next, skipping anything before it.
async fn close_frame(raw: &mut RawWorker) -> (CloseCode, String) {
    with_timeout(async {
        loop {
            match raw.ws.next().await {
                Some(Ok(Message::Close(Some(close)))) => {
                    return (close.code, close.reason.to_string())
                }
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_frame_that_breaks_rfc_6455_drops_the_worker_with_a_1002_close() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let call = spawn_get(&bridge, "/broken");
    let _ = raw.next_request().await;
    // A reserved bit, with no extension negotiated.
    let mut frame = WsFrame::message(b"x".to_vec(), OpCode::Data(Data::Binary), true);
    frame.header_mut().rsv1 = true;
    let _ = raw.ws.send(Message::Frame(frame)).await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, r.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, "worker_lost")
    );
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("protocol error: reserved bits set")),
        "{}",
        r.json()
    );
    let (code, reason) = close_frame(&mut raw).await;
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::Protocol, "reserved bits set, with no extension")
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_call_queued_behind_a_dying_worker_goes_to_the_next_worker() {
    let bridge = TestBridge::start(|c| {
        c.workers.ping_interval = Duration::from_millis(100);
        c.workers.ping_misses = 1;
        c.http.queue_timeout = Duration::from_secs(20);
        c.http.request_timeout = Duration::from_secs(20);
    })
    .await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 1).await;
    let client = http_client();
    let (c1, u1) = (client.clone(), bridge.at("/first"));
    let first = tokio::spawn(async move { post(&c1, &u1, "1").await });
    let _ = raw.next_request().await;
    let (c2, u2) = (client.clone(), bridge.at("/second"));
    let second = tokio::spawn(async move { post(&c2, &u2, "2").await });
    bridge.until_queued("default", 1).await;
    // The worker freezes (reads nothing, answers no pings): the call on it
    // fails, but the queued call was never sent and must not fail with it.
    let r = with_timeout(first).await.expect("join");
    assert_eq!(r.error_code(), "worker_lost");
    assert_eq!(
        bridge.handle.queued("default"),
        1,
        "the queued call is still waiting"
    );
    let _w = bridge.worker(&["default"], 1, worker::echo).await;
    let r = with_timeout(second).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"2"[..])
    );
    drop(raw);
    bridge.stop().await;
}

#[tokio::test]
async fn a_caller_that_hangs_up_while_queued_leaves_the_queue() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    let mut tcp = with_timeout(tokio::net::TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET /waiting HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    bridge.until_queued("default", 1).await;
    drop(tcp);
    with_timeout(async {
        while bridge.handle.queued("default") > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    // A worker that connects now finds nothing stale to serve.
    let mut raw = RawWorker::connect(&bridge, &["default"], 1).await;
    let url = bridge.at("/fresh");
    let call = tokio::spawn(async move { get(&http_client(), &url).await });
    let (req, _) = raw.next_request().await;
    assert_eq!(req.path, "/fresh");
    raw.reply(req.id, 200, &[], b"").await;
    assert_eq!(
        with_timeout(call).await.expect("join").head.status,
        StatusCode::OK
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_worker_that_stops_reading_is_dropped_after_the_write_stall_bound() {
    let interval = Duration::from_millis(200);
    let misses = 2;
    let bridge = TestBridge::start(|c| {
        c.workers.ping_interval = interval;
        c.workers.ping_misses = misses;
        c.http.max_body = wsbridge::config::ByteSize(64 << 20);
        c.http.request_timeout = Duration::from_secs(10);
    })
    .await;
    let stall = interval * (misses + 1);
    // A worker without flow control that never reads again after its
    // welcome: it answers no pings, and an upload to it fills every buffer
    // on the way until the bridge's writes stop making progress.
    let stuck = RawWorker::connect(&bridge, &["default"], 4).await;
    const UPLOAD: usize = 32 << 20;
    let tcp = with_timeout(TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    let (rd, mut wr) = tcp.into_split();
    let started = Instant::now();
    let _writer = AbortOnDropHandle::new(tokio::spawn(async move {
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nX-Request-Id: stuck-1\r\nContent-Length: {UPLOAD}\r\n\r\n"
        );
        if wr.write_all(head.as_bytes()).await.is_err() {
            return wr;
        }
        let chunk = vec![b'u'; 64 * 1024];
        for _ in 0..UPLOAD / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        wr
    }));
    let upload = tokio::spawn(async move {
        let reply = read_reply(rd).await;
        (reply, started.elapsed())
    });
    within(
        Duration::from_secs(5),
        "the upload reaches the worker",
        async {
            while bridge.handle.in_flight() < 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        },
    )
    .await;
    // Everyone else is served while the stuck worker holds its call.
    let _echo = bridge.worker(&["default"], 8, worker::echo).await;
    let r = post(&http_client(), &bridge.at("/meanwhile"), "served").await;
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"served"[..])
    );
    assert!(
        !upload.is_finished(),
        "the upload ended before the other call was served"
    );

    let (reply, took) = within(
        stall + Duration::from_secs(2),
        "the stuck upload ends",
        upload,
    )
    .await
    .expect("join");
    assert_eq!(
        reply.status,
        502,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["error"]["code"], "worker_lost");
    assert_eq!(reply.json()["error"]["request_id"], "stuck-1");
    assert_eq!(reply.header("x-request-id"), "stuck-1");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        message.contains("stopped reading"),
        "not the write stall: {message}"
    );
    assert!(
        took >= stall && took <= stall + Duration::from_millis(1500),
        "dropped {took:?} after the upload began; the stall bound is {stall:?}"
    );
    eprintln!("a worker that stopped reading was dropped {took:?} after the upload began (bound {stall:?})");
    within(
        Duration::from_secs(5),
        "the stuck worker is unregistered",
        async {
            while bridge.handle.workers("default") > 1 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        },
    )
    .await;
    let r = post(&http_client(), &bridge.at("/after"), "still served").await;
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"still served"[..])
    );
    drop(stuck);
    bridge.stop().await;
}

/// After the welcome the bridge writes its frames itself: a worker's ping
/// still gets its pong, with the ping's payload, and calls before and after
/// it go through on the same connection.
#[tokio::test]
async fn a_workers_ping_is_answered_with_its_payload_between_calls() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    served_by_raw(&bridge, &mut raw, "/before").await;
    let payload = Bytes::from_static(b"are you there? 0123456789");
    raw.ws
        .send(Message::Ping(payload.clone()))
        .await
        .expect("ping");
    let pong = within(Duration::from_secs(10), "the pong", async {
        loop {
            match raw.ws.next().await {
                Some(Ok(Message::Pong(p))) => break p,
                // The bridge's own heartbeat may come first.
                Some(Ok(Message::Ping(_))) => continue,
                other => panic!("expected a pong, got {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(pong, payload);
    served_by_raw(&bridge, &mut raw, "/after").await;
    bridge.stop().await;
}
