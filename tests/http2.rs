//! Callers speaking HTTP/2 with prior knowledge (h2c) on the same listener
//! as HTTP/1.1: many calls multiplexed on one connection, each answered with
//! its own reply; a reset stream cancels only its own call; errors are the
//! same JSON; the stream limit, the idle timeout and `http.http2 = false`;
//! peers that stall (mid-preface, mute, or not reading one stream) are cut
//! off; shutdown drains open calls.

mod common;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Barrier,
};
use wsbridge::{body::Body, protocol::Control, worker};

/// Sends `req` on an HTTP/2 connection and reads the whole response.
async fn h2_send(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Reply {
    with_timeout(sender.ready())
        .await
        .expect("connection ready");
    let resp = with_timeout(sender.send_request(req))
        .await
        .expect("h2 request");
    let (head, body) = resp.into_parts();
    let body = with_timeout(body.collect()).await.expect("body").to_bytes();
    Reply { head, body }
}

#[tokio::test]
async fn many_calls_share_one_connection_and_each_gets_its_own_reply() {
    const CALLS: usize = 64;
    let bridge = TestBridge::start(|_| {}).await;
    // Every call waits until all of them have reached the worker: they can
    // only complete if the one connection carries them all at once.
    let all_in = Arc::new(Barrier::new(CALLS));
    let _w = bridge
        .worker(&["default"], CALLS as u32, move |req: Request<Body>| {
            let all_in = all_in.clone();
            async move {
                all_in.wait().await;
                let seen = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                };
                let (host, xff) = (seen("host"), seen("x-forwarded-for"));
                Response::builder()
                    .header("x-seen-host", host)
                    .header("x-seen-x-forwarded-for", xff)
                    .body(req.into_body())
                    .expect("response")
            }
        })
        .await;
    let (sender, conn) = h2_connection(bridge.http).await;
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let mut sender = sender.clone();
            let url = bridge.at(&format!("/calls/{i}"));
            tokio::spawn(async move {
                let req = Request::post(url)
                    .body(Full::new(Bytes::from(format!("call {i}"))))
                    .expect("request");
                h2_send(&mut sender, req).await
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for (i, call) in calls.into_iter().enumerate() {
        let r = with_timeout(call).await.expect("join");
        assert_eq!(r.head.status, StatusCode::OK, "call {i}: {:?}", r.body);
        assert_eq!(r.head.version, http::Version::HTTP_2);
        assert_eq!(r.body, format!("call {i}"), "call {i} got another's reply");
        assert_eq!(
            r.header("x-seen-host"),
            bridge.http.to_string(),
            "the :authority reaches the worker as host"
        );
        assert_eq!(r.header("x-seen-x-forwarded-for"), "127.0.0.1");
        assert!(
            ids.insert(r.header("x-request-id").to_owned()),
            "ids are unique"
        );
    }
    assert!(!conn.is_finished(), "the connection is still open");
    bridge.stop().await;
}

#[tokio::test]
async fn a_reset_stream_cancels_only_its_own_call() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let (sender, _conn) = h2_connection(bridge.http).await;
    let call = |path: &str| {
        let mut sender = sender.clone();
        let req = Request::get(bridge.at(path))
            .body(Full::new(Bytes::new()))
            .expect("request");
        tokio::spawn(async move { h2_send(&mut sender, req).await })
    };
    let kept = call("/kept");
    let (first, _) = raw.next_request().await;
    let abandoned = call("/abandoned");
    let (second, _) = raw.next_request().await;
    assert_eq!(
        (first.path.as_str(), second.path.as_str()),
        ("/kept", "/abandoned")
    );
    // Dropping the response future resets the stream (RST_STREAM CANCEL).
    abandoned.abort();
    match raw.next().await {
        Frame::Control(Control::Cancel { id, reason }) => {
            assert_eq!((id, reason.as_str()), (second.id, "client_gone"));
        }
        other => panic!("expected the abandoned call's cancel, got {other:?}"),
    }
    raw.reply(first.id, 200, &[], b"still here").await;
    let r = with_timeout(kept).await.expect("join");
    assert_eq!(
        (r.head.status, &r.body[..]),
        (StatusCode::OK, &b"still here"[..])
    );
    // The connection carries new calls after the reset.
    let again = call("/again");
    let (third, _) = raw.next_request().await;
    raw.reply(third.id, 201, &[], b"new").await;
    let r = with_timeout(again).await.expect("join");
    assert_eq!(r.head.status, StatusCode::CREATED);
    bridge.stop().await;
}

#[tokio::test]
async fn errors_over_http2_are_the_same_json_with_the_request_id() {
    let bridge = TestBridge::start(|c| {
        c.http.queue_timeout = Duration::from_millis(100);
        c.http.max_body = wsbridge::config::ByteSize(1000);
    })
    .await;
    let client = h2_client();
    // No worker for the service.
    let r = post(&client, &bridge.at("/orders/1"), "x").await;
    assert_eq!(r.head.version, http::Version::HTTP_2);
    assert_eq!(r.head.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "no_worker");
    assert_eq!(r.json()["error"]["request_id"], r.header("x-request-id"));
    // A body over the limit, declared or not.
    let _w = bridge.worker(&["default"], 4, worker::echo).await;
    let r = post(&client, &bridge.at("/big"), vec![7u8; 5000]).await;
    assert_eq!(r.head.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error_code(), "body_too_large");
    assert!(!r.header("x-request-id").is_empty());
    // The same connection still serves calls.
    let r = post(&client, &bridge.at("/small"), "fits").await;
    assert_eq!((r.head.status, &r.body[..]), (StatusCode::OK, &b"fits"[..]));
    bridge.stop().await;
}

#[tokio::test]
async fn a_connection_is_offered_http2_max_streams() {
    let bridge = TestBridge::start(|c| c.http.http2_max_streams = 3).await;
    let _w = bridge.worker(&["default"], 4, worker::echo).await;
    let (mut sender, _conn) = raw_h2(&bridge, h2::client::Builder::new()).await;
    let resp = with_timeout(raw_h2_get(&mut sender, &bridge, "/x"))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    // The server's SETTINGS have arrived by the time its response has.
    assert_eq!(sender.current_max_send_streams(), 3);
    bridge.stop().await;
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_but_a_long_call_is_not() {
    let idle = Duration::from_millis(300);
    let bridge = TestBridge::start(|c| c.http.header_read_timeout = idle).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let (sender, conn) = h2_connection(bridge.http).await;
    let req = Request::get(bridge.at("/slow"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    // The client closes a connection it has no handle to; this one stays.
    let mut call_sender = sender.clone();
    let call = tokio::spawn(async move { h2_send(&mut call_sender, req).await });
    let (head, _) = raw.next_request().await;
    // The call stays open for three idle timeouts: an open call keeps its
    // connection busy however long it takes.
    tokio::time::sleep(idle * 3).await;
    assert!(!conn.is_finished(), "closed while a call was open");
    raw.reply(head.id, 200, &[], b"late but whole").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(&r.body[..], b"late but whole");
    // Then, with no call open, the bridge ends the connection (GOAWAY).
    let started = tokio::time::Instant::now();
    with_timeout(conn)
        .await
        .expect("join")
        .expect("a graceful end, not an error");
    assert!(started.elapsed() >= idle - Duration::from_millis(50));
    drop(sender);
    bridge.stop().await;
}

#[tokio::test]
async fn http2_off_leaves_the_listener_http1_only() {
    let bridge = TestBridge::start(|c| c.http.http2 = false).await;
    let _w = bridge.worker(&["default"], 4, worker::echo).await;
    let h2 = with_timeout(
        h2_client().request(
            Request::post(bridge.at("/x"))
                .body(Full::new(Bytes::from("h2")))
                .expect("request"),
        ),
    )
    .await;
    assert!(h2.is_err(), "HTTP/2 is refused: {h2:?}");
    let r = post(&http_client(), &bridge.at("/x"), "h1").await;
    assert_eq!(&r.body[..], b"h1");
    bridge.stop().await;
}

#[tokio::test]
async fn callers_that_split_their_first_bytes_are_served() {
    let bridge = TestBridge::start(|_| {}).await;
    let _w = bridge.worker(&["default"], 4, worker::echo).await;
    // HTTP/1: "P" could still become the HTTP/2 preface.
    let mut tcp = connect(&bridge).await;
    tcp.write_all(b"P").await.expect("write");
    tcp.write_all(
        b"OST /split HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nsplit",
    )
    .await
    .expect("write");
    let mut got = Vec::new();
    with_timeout(tcp.read_to_end(&mut got)).await.expect("read");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("split"), "{text}");
    // HTTP/2: the preface split after "PR"; the bridge answers with its own
    // SETTINGS frame (type 4), which only an HTTP/2 server sends.
    let mut tcp = connect(&bridge).await;
    tcp.write_all(b"PR").await.expect("write");
    tcp.write_all(b"I * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .expect("empty SETTINGS");
    let mut frame_header = [0u8; 9];
    with_timeout(tcp.read_exact(&mut frame_header))
        .await
        .expect("read");
    assert_eq!(
        frame_header[3], 4,
        "the first frame is SETTINGS: {frame_header:?}"
    );
    // A peer that answers nothing would hold a shutdown for the idle limit.
    drop(tcp);
    bridge.stop().await;
}

/// An HTTP/2 connection through the h2 crate (which, unlike hyper, exposes
/// the peer's settings and every client setting), driven by the returned task.
async fn raw_h2(
    bridge: &TestBridge,
    builder: h2::client::Builder,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = connect(bridge).await;
    let (sender, conn) = with_timeout(builder.handshake::<_, Bytes>(tcp))
        .await
        .expect("h2 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let sender = with_timeout(sender.ready()).await.expect("ready");
    (sender, conn)
}

/// `GET path` on a raw HTTP/2 connection: the response head.
fn raw_h2_get(
    sender: &mut h2::client::SendRequest<Bytes>,
    bridge: &TestBridge,
    path: &str,
) -> h2::client::ResponseFuture {
    let req = Request::get(bridge.at(path)).body(()).expect("request");
    sender.send_request(req, true).expect("send").0
}

async fn connect(bridge: &TestBridge) -> TcpStream {
    let tcp = with_timeout(TcpStream::connect(bridge.http))
        .await
        .expect("tcp");
    tcp.set_nodelay(true).expect("nodelay");
    tcp
}

/// Reads until the bridge closes `tcp` (EOF or reset); how long that took.
async fn until_closed(tcp: &mut TcpStream) -> Duration {
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 4096];
    with_timeout(async {
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    started.elapsed()
}

#[tokio::test]
async fn http2_peers_that_stall_before_or_after_the_preface_are_closed() {
    let idle = Duration::from_millis(300);
    let bridge = TestBridge::start(|c| c.http.header_read_timeout = idle).await;
    // "PRI", then nothing: hyper waits for the rest of the preface forever.
    let mut stalled_preface = connect(&bridge).await;
    stalled_preface.write_all(b"PRI").await.expect("write");
    // The preface and SETTINGS, then no answer to anything (the graceful
    // close's PING included).
    let mut mute = connect(&bridge).await;
    mute.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    mute.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .expect("write");
    for (what, tcp) in [("mid-preface", &mut stalled_preface), ("mute", &mut mute)] {
        let open = until_closed(tcp).await;
        // GOAWAY after one idle period, dropped after the next.
        assert!(
            open < idle * 2 + Duration::from_secs(2),
            "{what}: open {open:?}"
        );
    }
    bridge.stop().await;
}

#[tokio::test]
async fn a_stream_the_caller_stops_reading_is_ended_after_send_timeout() {
    let send_timeout = Duration::from_millis(300);
    let idle = Duration::from_millis(300);
    let bridge = TestBridge::start(|c| {
        c.http.send_timeout = send_timeout;
        c.http.header_read_timeout = idle;
    })
    .await;
    // One slot: the second call below can only start once it is freed.
    let mut raw = RawWorker::connect(&bridge, &["default"], 1).await;
    // A window of 0: the caller reads nothing of any reply, while its
    // connection stays perfectly alive (it answers pings).
    let mut window_shut = h2::client::Builder::new();
    window_shut.initial_window_size(0);
    let (mut sender, conn) = raw_h2(&bridge, window_shut).await;
    let resp = raw_h2_get(&mut sender, &bridge, "/stall");
    let (req, _) = raw.next_request().await;
    raw.send_binary(wsbridge::protocol::encode_data(
        &response_head(req.id, 200, false),
        b"first part",
    ))
    .await;
    let resp = with_timeout(resp).await.expect("response head");
    assert_eq!(resp.status(), StatusCode::OK);
    let started = tokio::time::Instant::now();
    match raw.next().await {
        Frame::Control(Control::Cancel { id, reason }) => {
            assert_eq!((id, reason.as_str()), (req.id, "timeout"));
        }
        other => panic!("expected the stalled call's cancel, got {other:?}"),
    }
    assert!(started.elapsed() >= send_timeout, "{:?}", started.elapsed());
    // Its worker slot is free again: another call reaches the worker.
    let next = spawn_get(&bridge, "/next");
    let (second, _) = raw.next_request().await;
    assert_eq!(second.path, "/next");
    raw.reply(second.id, 200, &[], b"ok").await;
    assert_eq!(with_timeout(next).await.expect("join").head.status, 200);
    // The ended call no longer counts as open: the connection, with nothing
    // else on it, goes idle and is closed (GOAWAY, then dropped, since this
    // caller will never read the stalled stream).
    let closing = tokio::time::Instant::now();
    with_timeout(conn).await.expect("join");
    assert!(closing.elapsed() < idle * 2 + Duration::from_secs(2));
    drop(resp);
    bridge.stop().await;
}

#[tokio::test]
async fn shutdown_lets_an_open_http2_call_finish() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 4).await;
    let (mut sender, _conn) = h2_connection(bridge.http).await;
    let req = Request::get(bridge.at("/drain"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let call = tokio::spawn(async move { h2_send(&mut sender, req).await });
    let (head, _) = raw.next_request().await;
    bridge.begin_stop();
    // The listener closes first; the open call is drained, not cut.
    with_timeout(async {
        while TcpStream::connect(bridge.http).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    raw.reply(head.id, 200, &[], b"drained").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, &r.body[..]),
        (StatusCode::OK, &b"drained"[..])
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_header_read_timeout() {
    let limit = Duration::from_millis(300);
    let bridge = TestBridge::start(|c| c.http.header_read_timeout = limit).await;
    let mut tcp = with_timeout(TcpStream::connect(bridge.http))
        .await
        .expect("tcp");
    let started = tokio::time::Instant::now();
    let mut got = Vec::new();
    // EOF or a reset: either way the bridge let go.
    let _ = with_timeout(tcp.read_to_end(&mut got)).await;
    assert!(got.is_empty());
    let open = started.elapsed();
    assert!(
        open >= limit - Duration::from_millis(50) && open < limit + Duration::from_secs(2),
        "open {open:?}"
    );
    bridge.stop().await;
}
