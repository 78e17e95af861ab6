//! A call made at one bridge runs on a worker connected to another: real
//! `nats-server` processes clustered on loopback, real bridges, real
//! workers over TLS. The reply comes back intact, streamed chunk by chunk,
//! within the credit window; a caller that hangs up cancels the worker's
//! call on the other bridge; a bridge cut off from NATS fails fast.

mod common;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify};
use wsbridge::{body::Body, bridge::status::Status};

/// Announcements every 500 ms: peers appear and go quickly.
const BEAT: Duration = Duration::from_millis(500);

/// The response to a GET, its body still to be read.
async fn get_streamed(client: &HttpClient, url: &str) -> Response<hyper::body::Incoming> {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    with_timeout(client.request(req)).await.expect("response")
}

/// A bridge's `/metrics`.
async fn metrics(bridge: &TestBridge) -> String {
    let admin = bridge.admin.expect("admin listener");
    let reply = get(&http_client(), &format!("http://{admin}/metrics")).await;
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// Whether `node`'s workers of `service` are listed at this bridge.
fn lists(status: &Status, node: &str, service: &str) -> bool {
    status.cluster.as_ref().is_some_and(|c| {
        c.peers
            .iter()
            .any(|p| p.node == node && p.services.iter().any(|s| s.name == service))
    })
}

/// Two bridges on a 3-server NATS cluster (A on the first server, B on the
/// last), and a worker of `orders` connected to B only, running `handler`.
async fn pair(
    capacity: u32,
    handler: impl wsbridge::worker::Handler,
) -> (NatsCluster, TestBridge, TestBridge, TestWorker) {
    let nats = NatsCluster::start(3).await;
    let (url_a, url_b) = (nats.url(0), nats.url(2));
    let a = TestBridge::start(|c| c.cluster = Some(cluster_config(&url_a, "node-a", BEAT))).await;
    let b = TestBridge::start(|c| c.cluster = Some(cluster_config(&url_b, "node-b", BEAT))).await;
    let worker = TestWorker::start(b.worker_config(&["orders"], capacity), handler).await;
    let admin_a = a.admin.expect("admin listener");
    until_status(admin_a, "B's worker listed at A", |s| {
        lists(s, "node-b", "orders")
    })
    .await;
    (nats, a, b, worker)
}

/// Echoes the body, with the method, path and a request header in the
/// reply's headers, and status 201.
async fn echo(req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let mut resp = Response::new(body);
    *resp.status_mut() = http::StatusCode::CREATED;
    let h = resp.headers_mut();
    h.insert(
        "x-echo-method",
        parts.method.as_str().parse().expect("value"),
    );
    h.insert(
        "x-echo-path",
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .expect("value"),
    );
    if let Some(v) = parts.headers.get("x-custom") {
        h.insert("x-echo-custom", v.clone());
    }
    if let Some(v) = parts.headers.get("x-forwarded-for") {
        h.insert("x-echo-xff", v.clone());
    }
    resp
}

#[tokio::test]
async fn a_call_at_one_bridge_reaches_a_worker_at_the_other_intact() {
    let (_nats, a, b, worker) = pair(8, echo).await;
    let client = http_client();
    let req = Request::post(a.at("/orders/42?q=1"))
        // Not UTF-8: Latin-1 bytes travel as they are (PROTOCOL 5.1).
        .header(
            "x-custom",
            http::HeaderValue::from_bytes(b"caf\xe9").expect("value"),
        )
        .body(Full::new(Bytes::from_static(b"hello across")))
        .expect("request");
    let reply = send(&client, req).await;
    assert_eq!(reply.head.status, 201, "{:?}", reply.body);
    assert_eq!(&reply.body[..], b"hello across");
    assert_eq!(reply.header("x-echo-method"), "POST");
    assert_eq!(reply.header("x-echo-path"), "/orders/42?q=1");
    assert_eq!(reply.head.headers["x-echo-custom"].as_bytes(), b"caf\xe9");
    // Forwarded once, at the bridge the caller called.
    assert_eq!(reply.header("x-echo-xff"), "127.0.0.1");
    assert_eq!(reply.header("x-bridge-attempts"), "1");
    assert!(!reply.header("x-request-id").is_empty());

    // 3 MiB each way: more than the window, in many chunks; nothing lost.
    let big: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let reply = post(&client, &a.at("/orders/big"), big.clone()).await;
    assert_eq!(reply.head.status, 201);
    assert_eq!(reply.body.len(), big.len());
    assert_eq!(
        Sha256::digest(&reply.body),
        Sha256::digest(&big),
        "the body came back changed"
    );

    let text = metrics(&a).await;
    assert!(
        text.contains("wsbridge_cluster_calls_total{direction=\"out\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("wsbridge_cluster_call_duration_seconds_count 2\n"),
        "{text}"
    );
    let text = metrics(&b).await;
    assert!(
        text.contains("wsbridge_cluster_calls_total{direction=\"in\"} 2\n"),
        "{text}"
    );
    worker.stop().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_thousand_concurrent_cross_node_calls_are_each_answered_once() {
    let ran = Arc::new(AtomicU64::new(0));
    let counter = ran.clone();
    let handler = move |req: Request<Body>| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::Relaxed);
            Response::new(req.into_body())
        }
    };
    let (_nats, a, b, worker) = pair(64, handler).await;
    let client = http_client();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let (client, url) = (client.clone(), a.at("/orders/n"));
        calls.spawn(async move {
            let body = format!("call {i}");
            let reply = post(&client, &url, body.clone()).await;
            (reply.head.status, reply.body == body.as_bytes())
        });
    }
    let mut ok = 0;
    while let Some(done) = calls.join_next().await {
        let (status, same) = done.expect("call task");
        assert_eq!(status, 200);
        assert!(same, "a reply went to the wrong caller");
        ok += 1;
    }
    assert_eq!(ok, 1000);
    assert_eq!(
        ran.load(Ordering::Relaxed),
        1000,
        "a call ran twice or not at all"
    );
    worker.stop().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn server_sent_events_through_another_bridge_arrive_one_by_one() {
    // The worker sends an event, then waits until the caller has it.
    let (events_tx, events_rx) = mpsc::unbounded_channel::<Bytes>();
    let events_rx = Arc::new(tokio::sync::Mutex::new(Some(events_rx)));
    let handler = move |_req: Request<Body>| {
        let events_rx = events_rx.clone();
        async move {
            let Some(mut rx) = events_rx.lock().await.take() else {
                return Response::new(Body::full("only one stream"));
            };
            let (tx, body) = Body::channel();
            tokio::spawn(async move {
                while let Some(event) = rx.recv().await {
                    if !tx.send(event) {
                        return;
                    }
                }
                tx.finish();
            });
            let mut resp = Response::new(body);
            resp.headers_mut()
                .insert("content-type", "text/event-stream".parse().expect("value"));
            resp
        }
    };
    let (_nats, a, b, worker) = pair(4, handler).await;
    let client = http_client();
    let resp = get_streamed(&client, &a.at("/orders/events")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    for i in 0..3 {
        let event = format!("data: {i}\n\n");
        events_tx
            .send(Bytes::from(event.clone()))
            .expect("worker stream");
        // The next event is only sent after this one arrived.
        let mut got = Vec::new();
        while got.len() < event.len() {
            let frame = with_timeout(body.frame())
                .await
                .expect("a frame")
                .expect("no error");
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
            }
        }
        assert_eq!(String::from_utf8_lossy(&got), event);
    }
    drop(events_tx);
    let end = with_timeout(body.frame()).await;
    assert!(end.is_none(), "the stream ends cleanly");
    worker.stop().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_caller_that_hangs_up_cancels_the_call_at_the_other_bridge() {
    struct Dropped(mpsc::UnboundedSender<()>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let (dropped_tx, mut dropped_rx) = mpsc::unbounded_channel();
    let started = Arc::new(Notify::new());
    let started_in = started.clone();
    let handler = move |_req: Request<Body>| {
        let guard = Dropped(dropped_tx.clone());
        let started = started_in.clone();
        async move {
            let _guard = guard;
            started.notify_one();
            std::future::pending::<()>().await;
            Response::new(Body::empty())
        }
    };
    let (_nats, a, b, worker) = pair(4, handler).await;
    let client = http_client();
    let url = a.at("/orders/slow");
    let call = tokio::spawn(async move { post(&client, &url, "x").await });
    with_timeout(started.notified()).await;
    call.abort();
    let hung_up = Instant::now();
    with_timeout(dropped_rx.recv())
        .await
        .expect("the worker's call was cancelled");
    assert!(
        hung_up.elapsed() < Duration::from_secs(2),
        "cancelled after {:?}",
        hung_up.elapsed()
    );
    worker.stop().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_bridge_cut_off_from_nats_fails_calls_for_remote_workers_fast() {
    let (mut nats, a, b, worker) = pair(4, echo).await;
    // The client follows the NATS cluster to its other servers: all go.
    for i in 0..3 {
        nats.kill(i);
    }
    let admin_a = a.admin.expect("admin");
    until_status(admin_a, "A sees the cluster degraded", |s| {
        s.cluster.as_ref().is_some_and(|c| !c.connected)
    })
    .await;
    let asked = Instant::now();
    let reply = post(&http_client(), &a.at("/orders/1"), "x").await;
    assert_eq!(reply.head.status, 503, "{:?}", reply.body);
    assert_eq!(reply.error_code(), "cluster_unavailable");
    assert_eq!(
        reply.json()["error"]["request_id"],
        reply.header("x-request-id")
    );
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "answered after {:?}",
        asked.elapsed()
    );
    let text = metrics(&a).await;
    assert!(text.contains("wsbridge_cluster_connected 0\n"), "{text}");
    worker.stop().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_burst_of_small_events_through_another_bridge_arrives_whole_and_in_order() {
    // 5,000 events of about 20 bytes, all sent at once: far more messages
    // than a call may queue, unless ready chunks travel together.
    let handler = |_req: Request<Body>| async move {
        let (tx, body) = Body::channel();
        for i in 0..5_000 {
            tx.send(Bytes::from(format!("data: {i:05}\n\n")));
        }
        tx.finish();
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert("content-type", "text/event-stream".parse().expect("value"));
        resp
    };
    let (_nats, a, b, worker) = pair(4, handler).await;
    let reply = get(&http_client(), &a.at("/orders/burst")).await;
    assert_eq!(reply.head.status, 200);
    let expected: String = (0..5_000).map(|i| format!("data: {i:05}\n\n")).collect();
    assert_eq!(reply.body.len(), expected.len());
    assert!(
        reply.body == expected.as_bytes(),
        "events lost or reordered"
    );
    worker.stop().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_caller_that_hangs_up_mid_stream_ends_the_workers_stream_at_the_other_bridge() {
    // The worker sends an event each time it is told to, and reports
    // whether its reply is still being read.
    let (go_tx, go_rx) = mpsc::unbounded_channel::<()>();
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<bool>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(Some(go_rx)));
    let handler = move |_req: Request<Body>| {
        let (go_rx, sent_tx) = (go_rx.clone(), sent_tx.clone());
        async move {
            let Some(mut go) = go_rx.lock().await.take() else {
                return Response::new(Body::full("only one stream"));
            };
            let (tx, body) = Body::channel();
            tokio::spawn(async move {
                while go.recv().await.is_some() {
                    let open = tx.send(Bytes::from_static(b"data: tick\n\n"));
                    let _ = sent_tx.send(open);
                    if !open {
                        return;
                    }
                }
            });
            Response::new(body)
        }
    };
    let (_nats, a, b, worker) = pair(4, handler).await;
    let client = http_client();
    let resp = get_streamed(&client, &a.at("/orders/stream")).await;
    let mut body = resp.into_body();
    go_tx.send(()).expect("worker");
    assert_eq!(with_timeout(sent_rx.recv()).await, Some(true));
    let frame = with_timeout(body.frame()).await.expect("an event");
    assert!(frame.is_ok());
    drop(body);
    drop(client);
    // The worker's stream is ended by the cancel that crosses to its bridge.
    let hung_up = Instant::now();
    with_timeout(async {
        loop {
            go_tx.send(()).expect("worker");
            if sent_rx.recv().await == Some(false) {
                return;
            }
        }
    })
    .await;
    assert!(
        hung_up.elapsed() < Duration::from_secs(2),
        "the worker's stream ended {:?} after the hang-up",
        hung_up.elapsed()
    );
    worker.stop().await;
    a.stop().await;
    b.stop().await;
}
