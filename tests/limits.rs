//! Bounded input: bodies above `max_body` get 413 and heads too large for a
//! frame 431 without reaching a worker, as JSON errors naming the request
//! id; callers that send their head too slowly (slowloris) are cut off after
//! `header_read_timeout` while others are served.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    raw_http::{read_reply, RawReply},
    *,
};
use http::{Request, Response, StatusCode};
use http_body_util::StreamBody;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_util::task::AbortOnDropHandle;
use wsbridge::{
    body::Body,
    protocol::{Control, DataHead},
    worker,
};

#[tokio::test]
async fn bodies_over_max_body_get_413() {
    let bridge = TestBridge::start(|c| {
        c.http.max_body = wsbridge::config::ByteSize(1000);
        c.routes[0].max_body = Some(wsbridge::config::ByteSize(5000));
    })
    .await;
    let calls: Counter = Arc::default();
    let seen = calls.clone();
    let _w = bridge
        .worker(&["default", "orders"], 8, move |req: Request<Body>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move { Response::new(req.into_body()) }
        })
        .await;
    let client = http_client();
    // With Content-Length: refused before the body is read.
    let r = post(&client, &bridge.at("/x"), vec![b'a'; 1001]).await;
    assert_eq!(r.head.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error_code(), "body_too_large");
    assert!(!r.header("x-request-id").is_empty());
    // At the limit: fine.
    let r = post(&client, &bridge.at("/x"), vec![b'a'; 1000]).await;
    assert_eq!(r.head.status, StatusCode::OK);
    // Chunked, no Content-Length: cut while reading.
    let chunks = (0..20).map(|_| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(vec![b'b'; 100])))
    });
    let req = Request::post(bridge.at("/x"))
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .expect("request");
    let chunked_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let resp = with_timeout(chunked_client.request(req))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A route may raise the limit.
    let r = post(&client, &bridge.at("/orders/upload"), vec![b'c'; 4000]).await;
    assert_eq!((r.head.status, r.body.len()), (StatusCode::OK, 4000));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "refused bodies never reached the worker"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn malformed_http_gets_400_and_the_bridge_keeps_serving() {
    let bridge = TestBridge::start(|_| {}).await;
    let _w = bridge.worker(&["default"], 8, wsbridge::worker::echo).await;
    let mut tcp = with_timeout(tokio::net::TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    tcp.write_all(b"GARBAGE\x01 / HTTP/9.9\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    with_timeout(tcp.read_to_end(&mut answer))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    let client = http_client();
    let r = post(&client, &bridge.at("/still-up"), "yes").await;
    assert_eq!(r.body, "yes");
    bridge.stop().await;
}

#[tokio::test]
async fn a_caller_that_hangs_up_cancels_the_call_on_the_worker() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let mut tcp = with_timeout(tokio::net::TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    tcp.write_all(b"POST /gone HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .expect("write");
    let (req, body) = raw.next_request().await;
    assert_eq!(body, "hi");
    drop(tcp);
    match raw.next().await {
        Frame::Control(wsbridge::protocol::Control::Cancel { id, reason }) => {
            assert_eq!((id, reason.as_str()), (req.id, "client_gone"));
        }
        other => panic!("expected cancel, got {other:?}"),
    }
    bridge.stop().await;
}

#[tokio::test]
async fn headers_too_large_for_a_frame_get_431() {
    let bridge = TestBridge::start(|_| {}).await;
    let calls: Counter = Arc::default();
    let seen = calls.clone();
    let _w = bridge
        .worker(&["default"], 8, move |req: Request<Body>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move { Response::new(req.into_body()) }
        })
        .await;
    let client = http_client();
    // 80 headers of 1 KB: fine for HTTP, too much for one frame header.
    let mut req = Request::get(bridge.at("/big-headers"));
    for i in 0..80 {
        req = req.header(format!("x-h{i}"), "v".repeat(1000));
    }
    let r = send(
        &client,
        req.body(http_body_util::Full::new(Bytes::new()))
            .expect("request"),
    )
    .await;
    assert_eq!(r.head.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(r.error_code(), "headers_too_large");
    // Headers with characters JSON must escape are measured exactly too.
    let mut req = Request::get(bridge.at("/escaped"));
    for i in 0..20 {
        req = req.header(format!("x-q{i}"), "\\\"".repeat(200));
    }
    let r = send(
        &client,
        req.body(http_body_util::Full::new(Bytes::new()))
            .expect("request"),
    )
    .await;
    assert_eq!(r.head.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the call that fits reached the worker"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn callers_outside_allow_from_get_403() {
    let bridge = TestBridge::start(|c| {
        c.http.allow_from = vec!["10.0.0.0/8".parse().expect("cidr")];
    })
    .await;
    let r = get(&http_client(), &bridge.at("/x")).await;
    assert_eq!(r.head.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "forbidden");
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("127.0.0.1")));
    assert_eq!(r.json()["error"]["request_id"], r.header("x-request-id"));
    // Also with an Idempotency-Key: stored responses are not a way around it.
    let keyed = Request::post(bridge.at("/x"))
        .header("idempotency-key", "k")
        .body(http_body_util::Full::new(Bytes::from_static(b"x")))
        .expect("request");
    let r = send(&http_client(), keyed).await;
    assert_eq!(r.error_code(), "forbidden");
    bridge.stop().await;
}

#[tokio::test]
async fn beyond_max_connections_callers_wait_for_a_free_slot() {
    let bridge = TestBridge::start(|c| c.http.max_connections = 2).await;
    let _w = bridge
        .worker(&["default"], 8, |_req: Request<Body>| async {
            Response::new(Body::from("ok"))
        })
        .await;
    // Two keep-alive connections hold both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tcp = tokio::net::TcpStream::connect(bridge.http)
            .await
            .expect("connect");
        tcp.write_all(b"GET /hold HTTP/1.1\r\nhost: b\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 512];
        let n = with_timeout(tcp.read(&mut buf)).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(tcp);
    }
    // A third caller is not served while they stay open...
    let third = spawn_get(&bridge, "/third");
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), async {
        while !third.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(early.is_err(), "served beyond max_connections");
    // ...and is as soon as one closes.
    drop(held.pop());
    let r = with_timeout(third).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"ok"[..])
    );
    bridge.stop().await;
}

/// Writes a chunked `POST /x` whose body is `total` bytes (in 16 KiB
/// chunks) on a new connection, and returns the whole response as it came
/// until the bridge closed the connection.
async fn chunked_post(bridge: &TestBridge, total: usize) -> Vec<u8> {
    let mut tcp = with_timeout(tokio::net::TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    let mut req =
        b"POST /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    let chunk = vec![b'u'; 16 << 10];
    for _ in 0..total / chunk.len() {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (mut rd, mut wr) = tcp.split();
    // The bridge may answer (and stop reading) before the body is all in.
    let write = async {
        let _ = wr.write_all(&req).await;
    };
    let read = async {
        let mut resp = Vec::new();
        // A reset after the response is the bridge refusing the rest.
        let _ = rd.read_to_end(&mut resp).await;
        resp
    };
    let ((), resp) = with_timeout(async { tokio::join!(write, read) }).await;
    resp
}

/// Runs a worker that answers every call with a streamed 200 head as soon
/// as it sees the request head, and reports each `cancel` it gets as
/// (call id, reason).
fn answer_at_the_head(
    mut worker: RawWorker,
) -> tokio::sync::mpsc::UnboundedReceiver<(u64, String)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match worker.next().await {
                Frame::Data(wsbridge::protocol::DataHead::Request(h), _) => {
                    worker
                        .send_binary(wsbridge::protocol::encode_data(
                            &response_head(h.id, 200, false),
                            b"early",
                        ))
                        .await
                }
                Frame::Control(wsbridge::protocol::Control::Cancel { id, reason }) => {
                    let _ = tx.send((id, reason));
                }
                Frame::Data(..) | Frame::Control(_) => {}
                Frame::Closed => return,
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_max_body_is_never_lost_to_a_racing_reply() {
    // Over one chunk, so that the body streams after the request head.
    const LIMIT: usize = 320 << 10;
    let bridge = TestBridge::start(|c| {
        c.http.max_body = wsbridge::config::ByteSize(LIMIT as u64);
        c.http.request_timeout = std::time::Duration::from_secs(3);
    })
    .await;
    let worker = RawWorker::connect(&bridge, &["default"], 1).await;
    let mut cancels = answer_at_the_head(worker);
    // The whole body is written at once: the upload fails within the
    // bridge about when the worker's reply comes back, and which the bridge
    // sees first varies, so try many times. Calls are numbered from 1 on the
    // worker's connection, one at a time.
    let mut outcomes = std::collections::BTreeMap::<&str, usize>::new();
    for id in 1..=200u64 {
        let resp = chunked_post(&bridge, 2 * LIMIT).await;
        let outcome = if resp.starts_with(b"HTTP/1.1 413 ") {
            "413"
        } else if resp.starts_with(b"HTTP/1.1 200 ") && !resp.ends_with(b"0\r\n\r\n") {
            // The reply head had gone out before the upload failed.
            "200 cut off"
        } else if resp.is_empty() {
            // The bridge closed with the caller's bytes unread; the reset
            // can overtake the response (no 200 either way).
            "reset"
        } else {
            "other"
        };
        *outcomes.entry(outcome).or_default() += 1;
        // Whichever came first, the worker is told why (a failure lost to
        // the reply would leave the call to its timeout).
        let (cancelled, reason) = with_timeout(cancels.recv()).await.expect("a cancel");
        assert_eq!(
            (cancelled, reason.as_str()),
            (id, "body_too_large"),
            "{outcomes:?}"
        );
    }
    assert_eq!(outcomes.get("other"), None, "{outcomes:?}");
    assert!(outcomes.contains_key("413"), "{outcomes:?}");
    bridge.stop().await;
}

#[tokio::test]
async fn slowloris_callers_are_cut_off_after_header_read_timeout_while_others_are_served() {
    let header_timeout = Duration::from_millis(800);
    let bridge = TestBridge::start(|c| c.http.header_read_timeout = header_timeout).await;
    let _w = bridge.worker(&["default"], 8, worker::echo).await;
    const LORISES: usize = 20;
    const DRIBBLE: usize = 100; // bytes, one every 50 ms: 5 s if never cut
    let lorises: Vec<JoinHandle<(Duration, usize, Vec<u8>)>> = (0..LORISES)
        .map(|_| {
            let addr = bridge.http;
            tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let _ = tcp.set_nodelay(true);
                let started = Instant::now();
                let (mut rd, mut wr) = tcp.into_split();
                let sent = Arc::new(AtomicUsize::new(0));
                let counter = sent.clone();
                let _dribbler = AbortOnDropHandle::new(tokio::spawn(async move {
                    let head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: ";
                    if wr.write_all(head).await.is_err() {
                        return;
                    }
                    for _ in 0..DRIBBLE {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if wr.write_all(b"a").await.is_err() {
                            return;
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                }));
                let mut got = Vec::new();
                // EOF or a reset: either way the bridge let go.
                let _ = rd.read_to_end(&mut got).await;
                (started.elapsed(), sent.load(Ordering::SeqCst), got)
            })
        })
        .collect();
    // Other callers, each on its own connection (header_read_timeout also
    // closes idle keep-alive connections), are served while they dribble.
    for i in 0..10 {
        let r = post(&http_client(), &bridge.at("/busy"), format!("call {i}")).await;
        assert_eq!(r.body, format!("call {i}"));
    }
    assert!(
        lorises.iter().all(|l| !l.is_finished()),
        "the calls were served while every slowloris was still connected"
    );
    for loris in lorises {
        let (open, sent, got) = within(Duration::from_secs(3), "a slowloris is cut off", loris)
            .await
            .expect("join");
        assert!(
            open >= header_timeout - Duration::from_millis(50)
                && open <= header_timeout + Duration::from_secs(1),
            "a slowloris connection stayed open {open:?} (header_read_timeout {header_timeout:?})"
        );
        assert!(sent < DRIBBLE, "it was still sending when cut off");
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    let r = post(&http_client(), &bridge.at("/after"), "after").await;
    assert_eq!(r.body, "after");
    bridge.stop().await;
}

/// Sends raw request bytes on a new connection and reads the response.
async fn raw_request(bridge: &TestBridge, bytes: Vec<u8>) -> RawReply {
    let tcp = with_timeout(TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    let (rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        wr
    });
    let reply = with_timeout(read_reply(rd)).await;
    drop(writer);
    reply
}

fn assert_json_error(r: &RawReply, status: u16, code: &str, request_id: &str) {
    assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("x-request-id"), request_id);
    let json = r.json();
    assert_eq!(json["error"]["code"], code);
    assert_eq!(json["error"]["request_id"], request_id);
}

#[tokio::test]
async fn oversized_headers_and_bodies_get_json_errors_naming_the_request_id() {
    let bridge = TestBridge::start(|c| {
        c.http.max_body = wsbridge::config::ByteSize(1000);
        // A route with room for a body that streams (over one chunk).
        c.routes[0].max_body = Some(wsbridge::config::ByteSize(300 * 1024));
    })
    .await;
    let mut raw = RawWorker::connect(&bridge, &["default", "orders"], 4).await;

    // Headers that do not fit a frame header.
    let mut req = b"GET /big-headers HTTP/1.1\r\nHost: x\r\nX-Request-Id: hdr-1\r\n".to_vec();
    for i in 0..80 {
        req.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(1000)).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    assert_json_error(
        &raw_request(&bridge, req).await,
        431,
        "headers_too_large",
        "hdr-1",
    );
    // A long path counts too.
    let req = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\nX-Request-Id: path-1\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(60_000),
        "q".repeat(10_000)
    );
    assert_json_error(
        &raw_request(&bridge, req.into_bytes()).await,
        431,
        "headers_too_large",
        "path-1",
    );
    // A body over max_body by its Content-Length.
    let mut req =
        b"POST /x HTTP/1.1\r\nHost: x\r\nX-Request-Id: cl-1\r\nContent-Length: 1001\r\n\r\n"
            .to_vec();
    req.extend_from_slice(&[b'a'; 1001]);
    assert_json_error(
        &raw_request(&bridge, req).await,
        413,
        "body_too_large",
        "cl-1",
    );
    // ...and by what arrives, chunked.
    let mut req =
        b"POST /x HTTP/1.1\r\nHost: x\r\nX-Request-Id: chunked-1\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..20 {
        req.extend_from_slice(format!("64\r\n{}\r\n", "b".repeat(100)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    assert_json_error(
        &raw_request(&bridge, req).await,
        413,
        "body_too_large",
        "chunked-1",
    );
    // None of these reached the worker: the next call it sees is this one.
    served_by_raw(&bridge, &mut raw, "/fine").await;

    // A body that crosses max_body while it streams to the worker, before
    // any reply: 413 for the caller, `cancel` body_too_large for the worker.
    let tcp = with_timeout(TcpStream::connect(bridge.http))
        .await
        .expect("connect");
    let (rd, mut wr) = tcp.into_split();
    let piece = |n: usize| {
        let mut p = format!("{n:x}\r\n").into_bytes();
        p.extend(std::iter::repeat_n(b'c', n));
        p.extend_from_slice(b"\r\n");
        p
    };
    wr.write_all(
        b"POST /orders/upload HTTP/1.1\r\nHost: x\r\nX-Request-Id: streamed-1\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .expect("write head");
    for _ in 0..4 {
        wr.write_all(&piece(70 * 1024)).await.expect("write body");
    }
    let reply = tokio::spawn(read_reply(rd));
    let req = match raw.next().await {
        Frame::Data(DataHead::Request(h), _) => h,
        other => panic!("expected a streamed request, got {other:?}"),
    };
    assert!(!req.end, "280 KiB streams");
    assert_eq!(req.request_id, "streamed-1");
    wr.write_all(&piece(30 * 1024)).await.expect("write body");
    assert_json_error(
        &with_timeout(reply).await.expect("join"),
        413,
        "body_too_large",
        "streamed-1",
    );
    let reason = loop {
        match raw.next().await {
            Frame::Data(DataHead::Body(b), _) => assert_eq!(b.id, req.id),
            Frame::Control(Control::Cancel { id, reason }) => {
                assert_eq!(id, req.id);
                break reason;
            }
            other => panic!("expected the upload, then a cancel, got {other:?}"),
        }
    };
    assert_eq!(reason, "body_too_large");
    drop(wr);
    served_by_raw(&bridge, &mut raw, "/still-fine").await;
    bridge.stop().await;
}

#[tokio::test]
#[ignore = "known limitation: requests over hyper's own parser limits (more than 100 header lines over HTTP/1, a head over ~400 KB, a URI over 64 KiB) get hyper's bare 431/414 without JSON or X-Request-Id; hyper writes those responses itself (proto/h1/conn.rs on_parse_error, no hook), and raising its header bound costs every call (src/bridge/conformance.rs). Over HTTP/2 more than 100 headers get the JSON 431: tests/conformance.rs"]
async fn requests_over_hypers_limits_still_get_json_errors_naming_the_request_id() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let mut many = b"GET /many HTTP/1.1\r\nHost: x\r\nX-Request-Id: many-1\r\n".to_vec();
    for i in 0..1100 {
        many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let huge = format!(
        "GET /huge HTTP/1.1\r\nHost: x\r\nX-Request-Id: huge-1\r\nX-Big: {}\r\n\r\n",
        "h".repeat(500_000)
    )
    .into_bytes();
    for (req, id) in [(many, "many-1"), (huge, "huge-1")] {
        assert_json_error(
            &raw_request(&bridge, req).await,
            431,
            "headers_too_large",
            id,
        );
    }
    served_by_raw(&bridge, &mut raw, "/fine").await;
    bridge.stop().await;
}
