//! Bodies that stream: replies reach the caller chunk by chunk as the worker
//! produces them, and a stream that breaks never looks complete.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, Mutex};
use wsbridge::{
    body::Body,
    protocol::{BodyHead, Control, DataHead},
};

#[tokio::test]
async fn an_event_stream_reaches_the_caller_chunk_by_chunk() {
    let bridge = TestBridge::start(|_| {}).await;
    // The worker sends event N+1 only after the caller has received event N:
    // if the bridge buffered the reply, this would deadlock and time out.
    let (got_tx, got_rx) = mpsc::unbounded_channel::<usize>();
    let got_rx = Arc::new(Mutex::new(got_rx));
    let _w = bridge
        .worker(&["default"], 4, move |_req: Request<Body>| {
            let got_rx = got_rx.clone();
            async move {
                let (tx, body) = Body::channel();
                tokio::spawn(async move {
                    let mut got = got_rx.lock().await;
                    for n in 0..5 {
                        tx.send(Bytes::from(format!("data: event {n}\n\n")));
                        if got.recv().await != Some(n) {
                            return; // dropped without finish: the stream is cut
                        }
                    }
                    tx.finish();
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .expect("response")
            }
        })
        .await;
    let req = Request::get(bridge.at("/events"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = with_timeout(http_client().request(req))
        .await
        .expect("head");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut text = String::new();
    for n in 0..5 {
        let expected = format!("data: event {n}\n\n");
        while !text.ends_with(&expected) {
            let frame = with_timeout(body.frame())
                .await
                .expect("frame")
                .expect("data");
            text.push_str(&String::from_utf8_lossy(&frame.into_data().expect("data")));
        }
        got_tx.send(n).expect("worker listening");
    }
    assert!(
        with_timeout(body.frame()).await.is_none(),
        "the stream ends cleanly"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_worker_lost_mid_reply_cuts_the_body_off() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let (_, resp) = raw
        .streamed_reply(&bridge, "/download", b"first part")
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    drop(raw); // the worker dies mid-body
    let body = with_timeout(resp.into_body().collect()).await;
    assert!(
        body.is_err(),
        "a cut-off reply must not end like a complete one"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_caller_that_hangs_up_mid_reply_cancels_the_worker() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let (req, resp) = raw.streamed_reply(&bridge, "/abandoned", b"part").await;
    drop(resp); // the caller walks away mid-body
    match raw.next().await {
        Frame::Control(Control::Cancel { id, reason }) => {
            assert_eq!((id, reason.as_str()), (req.id, "client_gone"));
        }
        other => panic!("expected cancel, got {other:?}"),
    }
    // Chunks that were already on their way are ignored, and the worker slot
    // is free again: a new call is served.
    let more = DataHead::Body(BodyHead {
        id: req.id,
        end: true,
    });
    raw.send_binary(wsbridge::protocol::encode_data(&more, b"late"))
        .await;
    let call = spawn_get(&bridge, "/next");
    let (next, _) = raw.next_request().await;
    raw.reply(next.id, 200, &[], b"ok").await;
    assert_eq!(with_timeout(call).await.expect("join").body, "ok");
    bridge.stop().await;
}

#[tokio::test]
async fn a_caller_that_stops_reading_is_cut_off_after_send_timeout() {
    use tokio::io::AsyncWriteExt;
    let limit = std::time::Duration::from_millis(500);
    let bridge = TestBridge::start(|c| c.http.send_timeout = limit).await;
    let mut raw = RawWorker::connect_with(&bridge, &["default"], 4, true).await;
    // The caller asks for a download and then reads nothing at all.
    let mut caller = tokio::net::TcpStream::connect(bridge.http)
        .await
        .expect("connect");
    caller
        .write_all(b"GET /download HTTP/1.1\r\nhost: bridge\r\n\r\n")
        .await
        .expect("request");
    let (req, _) = raw.next_request().await;
    let window = usize::try_from(raw.welcome.window).expect("window");
    let chunk = vec![b'd'; window];
    raw.send_binary(wsbridge::protocol::encode_data(
        &response_head(req.id, 200, false),
        &chunk,
    ))
    .await;
    // The worker streams as fast as the bridge credits it, until the socket
    // buffers fill up, the bridge's writes stall and it gives up the call.
    let started = tokio::time::Instant::now();
    let mut stalled_since = started;
    let reason = loop {
        match raw.next().await {
            Frame::Control(Control::Credit { id, bytes }) => {
                assert_eq!(id, req.id);
                stalled_since = tokio::time::Instant::now();
                let more = DataHead::Body(BodyHead {
                    id: req.id,
                    end: false,
                });
                let n = usize::try_from(bytes).expect("credit");
                raw.send_binary(wsbridge::protocol::encode_data(&more, &chunk[..n]))
                    .await;
            }
            Frame::Control(Control::Cancel { id, reason }) => {
                assert_eq!(id, req.id);
                break reason;
            }
            other => panic!("expected credit or cancel, got {other:?}"),
        }
    };
    assert_eq!(reason, "client_gone");
    // Cut off after the writes stopped making progress for send_timeout,
    // not earlier.
    assert!(stalled_since.elapsed() >= limit - limit / 5);
    bridge.until_idle().await;
    drop(caller);
    bridge.stop().await;
}

#[tokio::test]
async fn request_bodies_reach_the_handler_while_still_arriving() {
    let bridge = TestBridge::start(|_| {}).await;
    // The handler answers with the size of the first chunk it could read,
    // then the total: the first read happens before the upload is complete.
    let (first_tx, first_rx) = mpsc::unbounded_channel::<usize>();
    let _w = bridge
        .worker(&["default"], 4, move |req: Request<Body>| {
            let first_tx = first_tx.clone();
            async move {
                let mut body = req.into_body();
                let mut total = 0;
                let mut first = true;
                while let Some(frame) = body.frame().await {
                    let n = frame.expect("chunk").into_data().map_or(0, |d| d.len());
                    if first {
                        let _ = first_tx.send(n);
                        first = false;
                    }
                    total += n;
                }
                Response::new(Body::from(total.to_string()))
            }
        })
        .await;
    // Upload in two halves; the second is sent only after the worker has
    // seen the first.
    let (part_tx, part_rx) =
        mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>(1);
    let upload = http_body_util::StreamBody::new(tokio_stream_from(part_rx));
    let req = Request::post(bridge.at("/upload"))
        .body(upload)
        .expect("request");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let call = tokio::spawn(async move { client.request(req).await });
    let half = Bytes::from(vec![7u8; 400_000]);
    part_tx
        .send(Ok(hyper::body::Frame::data(half.clone())))
        .await
        .expect("send");
    let mut first_rx = first_rx;
    let first = with_timeout(first_rx.recv())
        .await
        .expect("first chunk seen");
    assert!(first > 0 && first <= 400_000, "{first}");
    part_tx
        .send(Ok(hyper::body::Frame::data(half)))
        .await
        .expect("send");
    drop(part_tx);
    let resp = with_timeout(call).await.expect("join").expect("response");
    let total = with_timeout(resp.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(total, "800000");
    bridge.stop().await;
}

/// A stream over an mpsc receiver (tokio-stream's wrapper, without the crate).
fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn a_caller_that_hangs_up_mid_upload_cancels_the_worker_and_leaves_nothing_behind() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    // Declare a 2 MB body, send 600 KB of it, then vanish.
    let mut tcp = with_timeout(tokio::net::TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    let head = "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes())
        .await
        .expect("write");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &vec![b'u'; 600_000])
        .await
        .expect("write");
    let req = match raw.next().await {
        Frame::Data(DataHead::Request(h), _) => h,
        other => panic!("expected the request head, got {other:?}"),
    };
    assert!(!req.end, "a 2 MB body streams");
    assert_eq!(bridge.handle.in_flight(), 1);
    drop(tcp);
    // Chunks may still be on their way; the cancel must follow.
    loop {
        match raw.next().await {
            Frame::Data(DataHead::Body(b), _) => assert_eq!(b.id, req.id),
            Frame::Control(Control::Cancel { id, reason }) => {
                assert_eq!((id, reason.as_str()), (req.id, "client_gone"));
                break;
            }
            other => panic!("expected chunks then cancel, got {other:?}"),
        }
    }
    assert_eq!(
        bridge.handle.in_flight(),
        0,
        "the pending map is back to idle"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_caller_that_hangs_up_mid_download_leaves_nothing_behind() {
    let bridge = TestBridge::start(|_| {}).await;
    let (dropped_tx, mut dropped_rx) = mpsc::unbounded_channel::<()>();
    let _w = bridge
        .worker(&["default"], 4, move |_req: Request<Body>| {
            let dropped_tx = dropped_tx.clone();
            async move {
                // An endless stream, as far as the caller is concerned.
                let guard = OnDrop(dropped_tx);
                let stream = futures_util::stream::unfold(guard, |g| async move {
                    let chunk = Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                        Bytes::from(vec![b'd'; 65536]),
                    ));
                    Some((chunk, g))
                });
                Response::new(Body::wrap(http_body_util::StreamBody::new(stream)))
            }
        })
        .await;
    let body = bridge.read_frames("/endless", 10).await;
    assert_eq!(bridge.handle.in_flight(), 1);
    drop(body);
    // The bridge cancels, the library drops the handler's stream...
    with_timeout(dropped_rx.recv())
        .await
        .expect("worker stream dropped");
    // ...and the bridge holds nothing for the call any more.
    bridge.until_idle().await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_stream_that_goes_quiet_is_cut_off_after_request_timeout() {
    let bridge =
        TestBridge::start(|c| c.http.request_timeout = std::time::Duration::from_millis(300)).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let (req, resp) = raw.streamed_reply(&bridge, "/stalls", b"some").await;
    // Then nothing: the caller's body is cut off and the worker told why.
    let body = with_timeout(resp.into_body().collect()).await;
    assert!(body.is_err(), "a stalled stream must not end cleanly");
    match raw.next().await {
        Frame::Control(Control::Cancel { id, reason }) => {
            assert_eq!((id, reason.as_str()), (req.id, "timeout"));
        }
        other => panic!("expected cancel, got {other:?}"),
    }
    bridge.stop().await;
}

#[tokio::test]
async fn an_upload_that_breaks_after_the_reply_started_aborts_the_call() {
    let bridge =
        TestBridge::start(|c| c.http.request_timeout = std::time::Duration::from_secs(20)).await;
    // The echo streams its reply while still reading the request.
    let _w = bridge.worker(&["default"], 4, wsbridge::worker::echo).await;
    let mut tcp = with_timeout(tokio::net::TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    let head = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes())
        .await
        .expect("write");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &vec![b'e'; 600_000])
        .await
        .expect("write");
    // Wait for the reply's status line: the reply is under way.
    let mut seen = Vec::new();
    while !seen.windows(12).any(|w| w == b"HTTP/1.1 200") {
        let mut buf = [0u8; 4096];
        let n = with_timeout(tokio::io::AsyncReadExt::read(&mut tcp, &mut buf))
            .await
            .expect("read");
        assert!(n > 0, "connection closed before the reply started");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(bridge.handle.in_flight(), 1);
    // The caller vanishes mid-upload: the call must end now, not when some
    // timeout notices the silence.
    drop(tcp);
    let started = std::time::Instant::now();
    bridge.until_idle().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    bridge.stop().await;
}

#[tokio::test]
async fn an_upload_that_crosses_max_body_after_the_reply_started_aborts_the_call() {
    let bridge = TestBridge::start(|c| {
        c.http.request_timeout = std::time::Duration::from_secs(20);
        c.http.max_body = wsbridge::config::ByteSize(1_000_000);
    })
    .await;
    let _w = bridge.worker(&["default"], 4, wsbridge::worker::echo).await;
    let mut tcp = with_timeout(tokio::net::TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    let head = "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes())
        .await
        .expect("write");
    let chunk = |n: usize| {
        let mut c = format!("{n:x}\r\n").into_bytes();
        c.extend(std::iter::repeat_n(b'c', n));
        c.extend_from_slice(b"\r\n");
        c
    };
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &chunk(600_000))
        .await
        .expect("write");
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !seen.windows(12).any(|w| w == b"HTTP/1.1 200") {
        let n = with_timeout(tokio::io::AsyncReadExt::read(&mut tcp, &mut buf))
            .await
            .expect("read");
        assert!(n > 0, "connection closed before the reply started");
        seen.extend_from_slice(&buf[..n]);
    }
    // Now past max_body, while the caller is still reading the reply.
    let crossed = std::time::Instant::now();
    let _ = tokio::io::AsyncWriteExt::write_all(&mut tcp, &chunk(600_000)).await;
    // The reply is cut off: the connection closes without the final chunk.
    loop {
        match with_timeout(tokio::io::AsyncReadExt::read(&mut tcp, &mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    assert!(
        !seen.ends_with(b"0\r\n\r\n"),
        "a cut-off reply must not end like a complete one"
    );
    bridge.until_idle().await;
    // Ended by the size check itself, not by the 20 s silence limit.
    assert!(
        crossed.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        crossed.elapsed()
    );
    bridge.stop().await;
}

#[tokio::test]
async fn an_http10_caller_gets_a_502_not_a_silently_short_body() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let mut tcp = with_timeout(tokio::net::TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (req, _) = raw.next_request().await;
    raw.send_binary(wsbridge::protocol::encode_data(
        &response_head(req.id, 200, false),
        b"partial",
    ))
    .await;
    drop(raw); // the worker dies mid-body
    let mut answer = Vec::new();
    with_timeout(tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut answer))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.0 502"), "{text}");
    bridge.stop().await;
}
