//! `wsbridge worker`, the real binary: forwarding to an upstream HTTP server,
//! echo mode, and reconnecting after the bridge restarts.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
    process::Child,
    sync::Semaphore,
};
use wsbridge::{
    protocol::DataHead,
    worker::{Upstream, WorkerConfig},
};

/// A plain HTTP upstream that reports what it received.
async fn upstream() -> SocketAddr {
    serve_http(|req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let h = |n: &str| {
            parts
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        Response::builder()
            .status(if parts.uri.path() == "/missing" {
                404
            } else {
                200
            })
            .header("x-up-method", parts.method.as_str())
            .header("x-up-uri", parts.uri.to_string())
            .header("x-up-host", h("host"))
            .header("x-up-forwarded-host", h("x-forwarded-host"))
            .header("x-up-request-id", h("x-request-id"))
            .body(Full::new(body))
            .expect("response")
    })
    .await
}

/// Starts the agent against an in-process bridge.
fn agent(bridge: &TestBridge, cert: &std::path::Path, mode: &[&str]) -> Child {
    spawn_agent(&bridge.url(), cert, mode)
}

fn write_cert(bridge: &TestBridge, dir: &TempDir) -> std::path::PathBuf {
    let path = dir.0.join("bridge.crt");
    std::fs::write(&path, &bridge.cert.cert_pem).expect("write cert");
    path
}

#[tokio::test]
async fn the_agent_forwards_calls_to_its_upstream() {
    // A generous queue_timeout: the first call waits for the agent to connect.
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    let dir = TempDir::new("agent");
    let up = upstream().await;
    let _agent = agent(
        &bridge,
        &write_cert(&bridge, &dir),
        &["--upstream", &format!("http://{up}")],
    );
    let client = http_client();
    let req = Request::patch(bridge.at("/orders/7?full=1"))
        .header("host", "app.internal")
        .header("x-request-id", "agent-1")
        .body(Full::new(Bytes::from_static(b"{\"qty\":2}")))
        .expect("request");
    let r = send(&client, req).await;
    assert_eq!(r.head.status, StatusCode::OK);
    assert_eq!(r.body, "{\"qty\":2}");
    assert_eq!(r.header("x-up-method"), "PATCH");
    assert_eq!(r.header("x-up-uri"), "/orders/7?full=1");
    assert_eq!(r.header("x-up-host"), up.to_string());
    assert_eq!(r.header("x-up-forwarded-host"), "app.internal");
    assert_eq!(r.header("x-up-request-id"), "agent-1");
    // Upstream statuses pass through unchanged.
    let r = get(&client, &bridge.at("/missing")).await;
    assert_eq!(r.head.status, StatusCode::NOT_FOUND);
    bridge.stop().await;
}

#[tokio::test]
async fn an_unreachable_upstream_gives_a_json_502() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    let dir = TempDir::new("agent-down");
    // A port that was just free: nothing listens there.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let _agent = agent(
        &bridge,
        &write_cert(&bridge, &dir),
        &["--upstream", &format!("http://{dead}")],
    );
    let r = get(&http_client(), &bridge.at("/x")).await;
    assert_eq!(r.head.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "upstream_error");
    bridge.stop().await;
}

#[tokio::test]
async fn the_agent_reconnects_after_the_bridge_restarts() {
    let tweak = |c: &mut wsbridge::Config| c.http.queue_timeout = Duration::from_secs(20);
    let bridge = TestBridge::start(tweak).await;
    let (cert, workers_addr) = (bridge.cert.clone(), bridge.workers);
    let dir = TempDir::new("agent-restart");
    let _agent = agent(&bridge, &write_cert(&bridge, &dir), &["--echo"]);
    let client = http_client();
    let r = post(&client, &bridge.at("/before"), "one").await;
    assert_eq!(
        (r.head.status, r.header("x-echo-path")),
        (StatusCode::OK, "/before")
    );
    bridge.stop().await;

    // The same worker address and certificate, as after a redeploy.
    let bridge = TestBridge::start_with(
        |c| {
            tweak(c);
            c.workers.listen = workers_addr;
        },
        cert,
    )
    .await;
    // The call waits in the queue until the agent is back.
    let r = post(&client, &bridge.at("/after"), "two").await;
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"two"[..])
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_caller_hanging_up_aborts_the_agents_upstream_request() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    let dir = TempDir::new("agent-abort");
    // An upstream whose reply never ends; it reports when hyper drops it,
    // which happens when the agent closes the upstream connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = listener.local_addr().expect("addr");
    let (dropped_tx, mut dropped_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let dropped_tx = dropped_tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let guard = OnDrop(dropped_tx.clone());
                    async move {
                        let stream = futures_util::stream::unfold(guard, |g| async move {
                            tokio::task::yield_now().await;
                            let chunk = hyper::body::Frame::data(Bytes::from(vec![b'e'; 16384]));
                            Some((Ok::<_, Infallible>(chunk), g))
                        });
                        Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(stream)))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let _agent = agent(
        &bridge,
        &write_cert(&bridge, &dir),
        &["--upstream", &format!("http://{up}")],
    );
    let body = bridge.read_frames("/endless", 4).await;
    drop(body);
    with_timeout(dropped_rx.recv())
        .await
        .expect("the upstream request was aborted");
    bridge.stop().await;
}

/// A bridge whose one worker is the agent's handler in front of `up`.
async fn bridge_with_agent(up: &RawUpstream) -> (TestBridge, TestWorker) {
    let bridge = TestBridge::start(|_| {}).await;
    let upstream = Upstream::new(&up.url).expect("upstream");
    let worker = bridge
        .worker(&["default"], 64, move |req| upstream.forward(req))
        .await;
    (bridge, worker)
}

/// An upstream written by hand, to control its connections and the pace of
/// its replies. It reads request heads (GETs: no bodies) and writes
/// `answer(path)`: the first piece at once, each further one only when the
/// test adds a permit to `gate`.
struct RawUpstream {
    url: String,
    /// Connections accepted so far.
    connections: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl RawUpstream {
    /// `close_after_reply`: close each connection after one reply, without
    /// saying so (no `Connection: close`), as an upstream whose idle timeout
    /// fires does.
    async fn start(close_after_reply: bool, answer: fn(&str) -> Vec<Vec<u8>>) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let connections = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let (count, pace) = (connections.clone(), gate.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let pace = pace.clone();
                tokio::spawn(async move {
                    let mut tcp = BufReader::new(tcp);
                    loop {
                        let mut line = String::new();
                        if tcp.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                        while line != "\r\n" {
                            line.clear();
                            if tcp.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                        }
                        for (i, piece) in answer(&path).iter().enumerate() {
                            if i > 0 {
                                pace.acquire().await.expect("gate").forget();
                            }
                            if tcp.get_mut().write_all(piece).await.is_err() {
                                return;
                            }
                        }
                        if close_after_reply {
                            return;
                        }
                    }
                });
            }
        });
        RawUpstream {
            url,
            connections,
            gate,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn ok_reply(body: &str) -> Vec<Vec<u8>> {
    vec![format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()]
}

/// Reads a streamed reply's body frames to the end.
async fn rest_of_body(link: &mut FakeLink, id: u64) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        match link.next_data().await {
            (DataHead::Body(b), chunk) if b.id == id => {
                body.extend_from_slice(&chunk);
                if b.end {
                    return body;
                }
            }
            other => panic!("expected body frames of call {id}, got {other:?}"),
        }
    }
}

/// Asks for `path`, whose upstream sends `first` and then waits: the head
/// and `first` must reach the bridge before the test lets the upstream send
/// the rest, which must then follow.
async fn arrives_before_the_rest(
    link: &mut FakeLink,
    up: &RawUpstream,
    id: u64,
    path: &str,
    rest: &[u8],
) {
    link.get(id, path).await;
    match link.next_data().await {
        (DataHead::Response(h), _) => assert_eq!((h.id, h.end), (id, false), "{h:?}"),
        other => panic!("expected a streamed head, got {other:?}"),
    }
    match link.next_data().await {
        (DataHead::Body(b), chunk) => {
            assert_eq!((b.id, b.end), (id, false));
            assert_eq!(chunk, "first");
        }
        other => panic!("expected the bytes sent so far, got {other:?}"),
    }
    up.gate.add_permits(1);
    assert_eq!(rest_of_body(link, id).await, rest);
}

#[tokio::test]
async fn known_small_replies_go_back_in_one_frame_and_others_stream() {
    const BIG: usize = 100 << 10; // over the 64 KiB read whole
    let up = RawUpstream::start(false, |path| match path {
        "/small" => ok_reply("hello"),
        "/big" => {
            let mut whole =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").into_bytes();
            whole.extend_from_slice(&noise(BIG));
            vec![whole]
        }
        // Known length, but the rest waits for the test.
        "/slow" => vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst".to_vec(),
            b"last!".to_vec(),
        ],
        // No length known: the rest waits for the test.
        _ => vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n".to_vec(),
            b"4\r\nlast\r\n0\r\n\r\n".to_vec(),
        ],
    })
    .await;
    let bridge = FakeBridge::bind().await;
    let url = bridge.url.clone();
    let accepted = tokio::spawn(async move { bridge.accept(welcome(15_000, 2)).await });
    let upstream = Upstream::new(&up.url).expect("upstream");
    let worker = TestWorker::start(WorkerConfig::new(url, TOKEN, ["default"]), move |req| {
        upstream.forward(req)
    })
    .await;
    let mut link = with_timeout(accepted).await.expect("fake bridge");

    link.get(1, "/small").await;
    match link.next_data().await {
        (DataHead::Response(h), body) => {
            assert_eq!((h.id, h.status, h.end), (1, 200, true), "{h:?}");
            assert_eq!(body, "hello");
        }
        other => panic!("expected the whole reply, got {other:?}"),
    }

    link.get(2, "/big").await;
    match link.next_data().await {
        (DataHead::Response(h), body) => {
            assert_eq!((h.id, h.end), (2, false), "{h:?}");
            assert!(body.is_empty());
        }
        other => panic!("expected a streamed head, got {other:?}"),
    }
    assert_eq!(rest_of_body(&mut link, 2).await, noise(BIG));

    // No length: the head and the first bytes arrive while the upstream
    // holds the rest.
    arrives_before_the_rest(&mut link, &up, 3, "/stream", b"last").await;
    // A small reply of known length is not held back when its body is slow.
    arrives_before_the_rest(&mut link, &up, 4, "/slow", b"last!").await;
    // All four went over one upstream connection.
    assert_eq!(up.connections(), 1);
    // A worker stopping waits for its bridge to close the connection.
    drop(link);
    worker.stop().await;
}

#[tokio::test]
async fn upstream_connections_are_kept_and_closed_ones_replaced() {
    let bridge = TestBridge::start(|_| {}).await;
    let client = http_client();
    // Through a base path, so the prefix is checked on the way.
    let kept = RawUpstream::start(false, ok_reply).await;
    let upstream = Upstream::new(&format!("{}/base/", kept.url)).expect("upstream");
    let worker = bridge
        .worker(&["default"], 64, move |req| upstream.forward(req))
        .await;
    for i in 0..20 {
        let r = get(&client, &bridge.at(&format!("/one/{i}?q=1"))).await;
        assert_eq!(r.head.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.body, format!("/base/one/{i}?q=1"));
    }
    assert_eq!(
        kept.connections(),
        1,
        "one call at a time needs one connection"
    );
    for _ in 0..3 {
        let replies = join_all(8, |i| {
            let (client, url) = (client.clone(), bridge.at(&format!("/many/{i}")));
            async move { get(&client, &url).await }
        })
        .await;
        for (i, r) in replies.iter().enumerate() {
            assert_eq!(r.body, format!("/base/many/{i}"));
        }
    }
    assert!(
        kept.connections() <= 8,
        "{} connections",
        kept.connections()
    );
    worker.stop().await;

    // An upstream that drops every connection after its reply: each call
    // finds the connection it left closed, and dials a new one.
    let dropped = RawUpstream::start(true, |_| ok_reply("fresh")).await;
    let upstream = Upstream::new(&dropped.url).expect("upstream");
    let worker = bridge
        .worker(&["default"], 64, move |req| upstream.forward(req))
        .await;
    for _ in 0..20 {
        let r = get(&client, &bridge.at("/")).await;
        assert_eq!(r.head.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.body, "fresh");
    }
    assert_eq!(dropped.connections(), 20);
    worker.stop().await;
    bridge.stop().await;
}

/// RFC 9112 6.3: a reply with both `Transfer-Encoding: chunked` and
/// `Content-Length` is framed by the chunks; the length is a lie to drop.
/// Passing it on told callers a 452-byte body was 5 bytes long: a
/// truncated reply on a kept-alive connection that looked complete.
#[tokio::test]
async fn a_chunked_upstream_reply_with_a_content_length_arrives_whole() {
    let up = RawUpstream::start(false, |_| {
        let mut reply =
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for chunk in noise(452).chunks(100) {
            reply.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            reply.extend_from_slice(chunk);
            reply.extend_from_slice(b"\r\n");
        }
        reply.extend_from_slice(b"0\r\n\r\n");
        vec![reply]
    })
    .await;
    let (bridge, worker) = bridge_with_agent(&up).await;
    let r = raw_http::exchange(
        bridge.http,
        b"GET /both HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.body,
        noise(452),
        "content-length {:?}",
        r.header("content-length")
    );
    let length = r.header("content-length");
    assert!(
        length.is_empty() || length == "452",
        "content-length {length}"
    );
    assert_ne!(r.chunked_complete, Some(false));
    worker.stop().await;
    bridge.stop().await;
}

/// An upstream header value that is not UTF-8 (Latin-1 `caf\xe9`) reaches
/// the caller byte for byte through the agent, as through nginx; it used
/// to arrive with U+FFFD in place of the byte.
#[tokio::test]
async fn an_upstream_header_that_is_not_utf8_reaches_the_caller_unchanged() {
    let up = RawUpstream::start(false, |_| {
        vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-obs: caf\xe9\r\n\r\nok".to_vec()]
    })
    .await;
    let (bridge, worker) = bridge_with_agent(&up).await;
    let r = raw_http::exchange(
        bridge.http,
        b"GET /obs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]), "{r:?}");
    assert_eq!(r.header_bytes("x-obs"), Some(&b"caf\xe9"[..]));
    worker.stop().await;
    bridge.stop().await;
}

/// `HEAD` through the agent: the upstream's `Content-Length` (the size a
/// `GET` would get) reaches the caller, with no body, as through nginx.
#[tokio::test]
async fn a_head_through_the_agent_keeps_the_upstreams_content_length() {
    let up = RawUpstream::start(false, |_| {
        vec![b"HTTP/1.1 200 OK\r\ncontent-length: 452\r\ncontent-type: text/plain\r\n\r\n".to_vec()]
    })
    .await;
    let (bridge, worker) = bridge_with_agent(&up).await;
    let r = raw_http::exchange_head(
        bridge.http,
        b"HEAD /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-length"), "452", "{r:?}");
    assert!(r.body.is_empty(), "{r:?}");
    worker.stop().await;
    bridge.stop().await;
}
