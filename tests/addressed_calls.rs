//! A call for one worker (`Wsbridge-Worker: <id>`) goes to that worker and
//! never to another: on one bridge, and at another bridge of a cluster. An
//! id nobody has gets 404 `unknown_worker` at once; a worker at capacity
//! keeps the call waiting for it, up to `queue_timeout`.

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use tokio::sync::Notify;
use wsbridge::{body::Body, bridge::status::Status, worker::echo_as};

/// A worker of `orders` named `id`, answering with `x-echo-worker: id`.
async fn named(bridge: &TestBridge, id: &str, capacity: u32) -> TestWorker {
    let mut config = bridge.worker_config(&["orders"], capacity);
    config.worker_id = id.to_owned();
    TestWorker::start(config, echo_as(id)).await
}

/// A POST to `url` for worker `id`.
async fn call_for(client: &HttpClient, url: &str, id: &str) -> Reply {
    let req = Request::post(url)
        .header("wsbridge-worker", id)
        .body(Full::new(Bytes::from_static(b"hello")))
        .expect("request");
    send(client, req).await
}

#[tokio::test]
async fn a_call_for_one_worker_reaches_that_worker_every_time() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut workers = Vec::new();
    for id in ["w-1", "w-2", "w-3"] {
        workers.push(named(&bridge, id, 8).await);
    }
    let client = http_client();
    for i in 0..30 {
        let id = format!("w-{}", i % 3 + 1);
        let reply = call_for(&client, &bridge.at("/orders/x"), &id).await;
        assert_eq!(reply.head.status, 200, "{:?}", reply.body);
        assert_eq!(reply.header("x-echo-worker"), id);
        assert_eq!(&reply.body[..], b"hello");
    }
    // Without the header, calls spread over the three as before.
    let reply = post(&client, &bridge.at("/orders/x"), "any").await;
    assert_eq!(reply.head.status, 200);

    let asked = Instant::now();
    let reply = call_for(&client, &bridge.at("/orders/x"), "w-9").await;
    assert_eq!(reply.head.status, 404, "{:?}", reply.body);
    assert_eq!(reply.error_code(), "unknown_worker");
    assert_eq!(
        reply.json()["error"]["request_id"],
        reply.header("x-request-id")
    );
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "{:?}",
        asked.elapsed()
    );
    // A worker of another service is not a worker of this one.
    let mut other = bridge.worker_config(&["billing"], 8);
    other.worker_id = "b-1".into();
    let _billing = TestWorker::start(other, echo_as("b-1")).await;
    let reply = call_for(&client, &bridge.at("/orders/x"), "b-1").await;
    assert_eq!(reply.error_code(), "unknown_worker");
    let two = Request::post(bridge.at("/orders/x"))
        .header("wsbridge-worker", "w-1")
        .header("wsbridge-worker", "w-2")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(&client, two).await.head.status, 400);
    for w in workers {
        w.stop().await;
    }
    bridge.stop().await;
}

#[tokio::test]
async fn a_call_for_a_busy_worker_waits_for_it_alone() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_millis(300)).await;
    // w-1 takes one call at a time; its calls to /hold wait for `release`.
    let release = Arc::new(Notify::new());
    let held = Arc::new(Notify::new());
    let (r, h) = (release.clone(), held.clone());
    let handler = move |req: Request<Body>| {
        let (release, held) = (r.clone(), h.clone());
        async move {
            if req.uri().path() == "/orders/hold" {
                held.notify_one();
                release.notified().await;
            }
            let mut resp = Response::new(Body::full("w-1"));
            resp.headers_mut()
                .insert("x-echo-worker", http::HeaderValue::from_static("w-1"));
            resp
        }
    };
    let mut config = bridge.worker_config(&["orders"], 1);
    config.worker_id = "w-1".into();
    let w1 = TestWorker::start(config, handler).await;
    let w2 = named(&bridge, "w-2", 8).await;
    let client = http_client();
    let holding = tokio::spawn({
        let (client, url) = (client.clone(), bridge.at("/orders/hold"));
        async move { call_for(&client, &url, "w-1").await }
    });
    with_timeout(held.notified()).await;

    // w-2 is free, but the call is for w-1: it waits, then 503.
    let asked = Instant::now();
    let reply = call_for(&client, &bridge.at("/orders/x"), "w-1").await;
    assert_eq!(reply.head.status, 503, "{:?}", reply.body);
    assert_eq!(reply.error_code(), "no_worker");
    assert!(
        asked.elapsed() >= Duration::from_millis(250),
        "{:?}",
        asked.elapsed()
    );

    // One that waits gets w-1 as soon as it is free.
    let waiting = tokio::spawn({
        let (client, url) = (client.clone(), bridge.at("/orders/x"));
        async move { call_for(&client, &url, "w-1").await }
    });
    bridge.until_queued("orders", 1).await;
    release.notify_one();
    let reply = with_timeout(waiting).await.expect("call");
    assert_eq!(reply.head.status, 200, "{:?}", reply.body);
    assert_eq!(reply.header("x-echo-worker"), "w-1");
    assert_eq!(with_timeout(holding).await.expect("call").head.status, 200);
    w1.stop().await;
    w2.stop().await;
    bridge.stop().await;
}

/// Whether `node` announces worker `id`.
fn announces(status: &Status, node: &str, id: &str) -> bool {
    status.cluster.as_ref().is_some_and(|c| {
        c.peers.iter().any(|p| {
            p.node == node
                && p.services
                    .iter()
                    .any(|s| s.workers.iter().any(|w| w.id == id))
        })
    })
}

#[tokio::test]
async fn a_call_for_a_worker_at_another_bridge_goes_to_that_worker() {
    let nats = NatsCluster::start(1).await;
    let beat = Duration::from_millis(500);
    let url = nats.url(0);
    let a = TestBridge::start(|c| c.cluster = Some(cluster_config(&url, "node-a", beat))).await;
    let b = TestBridge::start(|c| c.cluster = Some(cluster_config(&url, "node-b", beat))).await;
    let here = named(&a, "here-1", 8).await;
    let there = [named(&b, "there-1", 8).await, named(&b, "there-2", 8).await];
    let admin_a = a.admin.expect("admin");
    until_status(admin_a, "B's workers listed at A", |s| {
        announces(s, "node-b", "there-1") && announces(s, "node-b", "there-2")
    })
    .await;
    let client = http_client();
    for i in 0..20 {
        let id = ["here-1", "there-1", "there-2"][i % 3];
        let reply = call_for(&client, &a.at("/orders/x"), id).await;
        assert_eq!(reply.head.status, 200, "{id}: {:?}", reply.body);
        assert_eq!(reply.header("x-echo-worker"), id);
    }
    let asked = Instant::now();
    let reply = call_for(&client, &a.at("/orders/x"), "nowhere").await;
    assert_eq!(reply.head.status, 404, "{:?}", reply.body);
    assert_eq!(reply.error_code(), "unknown_worker");
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "{:?}",
        asked.elapsed()
    );
    here.stop().await;
    for w in there {
        w.stop().await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_call_that_asks_to_wait_for_a_worker_gets_it_when_it_connects() {
    let bridge = TestBridge::start(|_| {}).await;
    let client = http_client();
    let url = bridge.at("/orders/x");
    let waiting = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let req = Request::post(url)
                .header("wsbridge-worker", "late")
                .header("wsbridge-worker-wait", "true")
                .body(Full::new(Bytes::from_static(b"for late")))
                .expect("request");
            send(&client, req).await
        })
    };
    // The call waits for a worker that is not there yet...
    bridge.until_queued("orders", 1).await;
    let mut other = named(&bridge, "early", 4).await;
    other.connected().await;
    assert_eq!(
        bridge.handle.queued("orders"),
        1,
        "another id does not take it"
    );
    // ...and the worker with that id gets it as soon as it connects.
    let _late = named(&bridge, "late", 4).await;
    let reply = with_timeout(waiting).await.expect("the waiting call");
    assert_eq!(reply.head.status, 200, "{:?}", reply.body);
    assert_eq!(reply.header("x-echo-worker"), "late");
    assert_eq!(&reply.body[..], b"for late");

    // A wait for an id that never comes ends at queue_timeout (2 s here)
    // with 404, and leaves nothing behind.
    let asked = Instant::now();
    let req = Request::post(&url)
        .header("wsbridge-worker", "never")
        .header("wsbridge-worker-wait", "true")
        .body(Full::new(Bytes::from_static(b"x")))
        .expect("request");
    let reply = send(&client, req).await;
    assert_eq!(reply.head.status, 404);
    assert_eq!(reply.error_code(), "unknown_worker");
    assert!(
        asked.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(bridge.handle.queued("orders"), 0);
    // Without a worker to wait for, the header is a 400.
    let req = Request::post(&url)
        .header("wsbridge-worker-wait", "true")
        .body(Full::new(Bytes::from_static(b"x")))
        .expect("request");
    assert_eq!(send(&client, req).await.head.status, 400);
    bridge.stop().await;
}
