//! Resilience: hostile callers. In every case the calls caught
//! in it end in bounded time with the answer the docs promise, and everyone
//! else keeps being served.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{
    raw_http::{read_reply, RawReply},
    *,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_util::task::AbortOnDropHandle;
use wsbridge::{
    protocol::{Control, DataHead},
    worker,
};

// ---------------------------------------------------------------------------
// 3. Hostile workers and callers
// ---------------------------------------------------------------------------

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
