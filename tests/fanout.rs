//! Fan-out (`Wsbridge-Fanout`): one call to every matching worker of a
//! service, gathered into one document (or streamed as ndjson, or pushed
//! with a 202), each worker once, with the outcome of each: a slow one is
//! `timeout` at the deadline, a dead one `error`, a too large reply
//! `too_large`, a binary one base64.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, Notify};
use wsbridge::{
    body::Body,
    worker::{echo_as, Handler},
};

fn fanout(bridge: &TestBridge, selector: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(bridge.at("/orders/notify"))
        .header("wsbridge-fanout", selector)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request")
}

/// The results by worker id: `(outcome, status, body)`.
fn outcomes(doc: &serde_json::Value) -> Vec<(String, String, Option<u64>, String)> {
    let mut list: Vec<_> = doc["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
            (
                s("worker_id"),
                s("outcome"),
                r["status"].as_u64(),
                s("body"),
            )
        })
        .collect();
    list.sort();
    list
}

#[tokio::test]
async fn a_fanout_reaches_every_matching_worker_once_and_gathers_the_replies() {
    let bridge = TestBridge::start(|_| {}).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for (id, region) in [("w-1", "eu"), ("w-2", "eu"), ("w-3", "us")] {
        let (calls, echo) = (calls.clone(), echo_as(id));
        let counted = move |req: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            echo.call(req)
        };
        workers.push(orders_worker(&bridge, id, region, counted).await);
    }
    let client = http_client();
    let reply = send(&client, fanout(&bridge, "all", "ping")).await;
    assert_eq!(reply.head.status, 200, "{:?}", reply.body);
    assert_eq!(reply.header("content-type"), "application/json");
    let doc = reply.json();
    assert_eq!(
        (doc["expected"].as_u64(), doc["responded"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(doc["complete"], true);
    let ok = |id: &str| (id.to_owned(), "ok".to_owned(), Some(200), "ping".to_owned());
    assert_eq!(outcomes(&doc), [ok("w-1"), ok("w-2"), ok("w-3")]);
    for r in doc["results"].as_array().expect("results") {
        assert_eq!(r["headers"]["x-echo-worker"], r["worker_id"], "{r}");
        assert_eq!(r["node"], "local");
        assert!(r["ms"].as_u64().is_some());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3, "each worker once");

    // A metadata selector picks the matching ones.
    let doc = send(&client, fanout(&bridge, "region=eu", "x"))
        .await
        .json();
    assert_eq!(doc["expected"], 2);
    let ids: Vec<_> = outcomes(&doc).into_iter().map(|o| o.0).collect();
    assert_eq!(ids, ["w-1", "w-2"]);
    // None matching: an empty, complete answer.
    let doc = send(&client, fanout(&bridge, "region=mars", "x"))
        .await
        .json();
    assert_eq!(
        (doc["expected"].as_u64(), doc["complete"].as_bool()),
        (Some(0), Some(true))
    );
    // A selector that is not one is a 400 naming the header.
    let reply = send(&client, fanout(&bridge, "region", "x")).await;
    assert_eq!(reply.head.status, 400);
    assert!(
        reply.body.windows(15).any(|w| w == b"Wsbridge-Fanout"),
        "{:?}",
        reply.body
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_slow_and_a_dead_worker_give_partial_results_within_the_deadline() {
    let bridge = TestBridge::start(|c| {
        c.routes[0].request_timeout = Some(Duration::from_secs(1));
        c.fanout.max_reply = wsbridge::config::ByteSize(1024);
    })
    .await;
    let _ok = orders_worker(&bridge, "fine", "eu", echo_as("fine")).await;
    let _slow = orders_worker(&bridge, "slow", "eu", |_req: Request<Body>| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(Body::full("late"))
    })
    .await;
    let _big = orders_worker(&bridge, "big", "eu", |_req: Request<Body>| async {
        Response::new(Body::full(vec![b'x'; 4096]))
    })
    .await;
    let _binary = orders_worker(&bridge, "binary", "eu", |_req: Request<Body>| async {
        Response::new(Body::full(vec![0u8, 1, 2, 255]))
    })
    .await;
    // The dead one takes the call and then its connection drops.
    let mut dead = RawWorker::connect(&bridge, &["orders"], 1).await;
    let dead_id = dead.welcome.session_id.clone();
    let killer = tokio::spawn(async move {
        let _ = dead.next_request().await;
        drop(dead);
    });
    let client = http_client();
    let asked = Instant::now();
    let reply = send(&client, fanout(&bridge, "all", "hello")).await;
    let took = asked.elapsed();
    println!("fan-out with a slow and a dead worker answered in {took:?}");
    killer.await.expect("dead worker");
    assert_eq!(reply.head.status, 200);
    let doc = reply.json();
    assert_eq!(
        (doc["expected"].as_u64(), doc["responded"].as_u64()),
        (Some(5), Some(2))
    );
    assert_eq!(doc["complete"], false);
    let by_outcome = |outcome: &str| -> Vec<String> {
        let mut ids: Vec<_> = doc["results"]
            .as_array()
            .expect("results")
            .iter()
            .filter(|r| r["outcome"] == outcome)
            .map(|r| r["worker_id"].as_str().unwrap_or("").to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(by_outcome("ok"), ["binary", "fine"]);
    assert_eq!(by_outcome("timeout"), ["slow"]);
    assert_eq!(by_outcome("too_large"), ["big"]);
    assert_eq!(by_outcome("error").len(), 1, "{doc}");
    let _ = dead_id;
    let error = doc["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|r| r["outcome"] == "error")
        .expect("the dead one");
    assert_eq!(error["status"], 502);
    assert_eq!(error["error"]["code"], "worker_lost");
    let binary = doc["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|r| r["worker_id"] == "binary")
        .expect("binary");
    assert_eq!(
        (binary["body"].as_str(), binary["body_encoding"].as_str()),
        (Some("AAEC/w=="), Some("base64"))
    );
    // At the deadline (1 s), not at the slow worker's 30 s.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn ndjson_streams_each_reply_as_it_arrives_then_a_summary() {
    let bridge = TestBridge::start(|_| {}).await;
    let release = Arc::new(Notify::new());
    let _fast = orders_worker(&bridge, "fast", "eu", echo_as("fast")).await;
    let held = release.clone();
    let _slow = orders_worker(&bridge, "slow", "eu", move |_req: Request<Body>| {
        let held = held.clone();
        async move {
            held.notified().await;
            Response::new(Body::full("at last"))
        }
    })
    .await;
    let client = http_client();
    let mut req = fanout(&bridge, "all", "hi");
    req.headers_mut().insert(
        "accept",
        http::HeaderValue::from_static("application/x-ndjson"),
    );
    let resp = with_timeout(client.request(req)).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.into_body();
    let mut text = String::new();
    // The fast reply arrives while the slow worker still holds its call.
    while !text.contains('\n') {
        let frame = with_timeout(body.frame())
            .await
            .expect("a line")
            .expect("frame");
        text.push_str(&String::from_utf8_lossy(
            &frame.into_data().unwrap_or_default(),
        ));
    }
    let first: serde_json::Value =
        serde_json::from_str(text.lines().next().unwrap_or("")).expect("json line");
    assert_eq!(
        (first["worker_id"].as_str(), first["body"].as_str()),
        (Some("fast"), Some("hi"))
    );
    release.notify_one();
    let rest = with_timeout(body.collect()).await.expect("rest").to_bytes();
    text.push_str(&String::from_utf8_lossy(&rest));
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(
        (lines[1]["worker_id"].as_str(), lines[1]["body"].as_str()),
        (Some("slow"), Some("at last"))
    );
    assert_eq!(
        lines[2],
        serde_json::json!({"expected": 2, "responded": 2, "complete": true})
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_push_answers_202_once_sent_and_each_worker_gets_it_once() {
    let bridge = TestBridge::start(|_| {}).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for id in ["p-1", "p-2", "p-3"] {
        let tx = tx.clone();
        let record = move |req: Request<Body>| {
            let tx = tx.clone();
            async move {
                let body = req.into_body().collect(1 << 20).await.unwrap_or_default();
                let _ = tx.send((id, body));
                Response::new(Body::full("ignored"))
            }
        };
        workers.push(orders_worker(&bridge, id, "eu", record).await);
    }
    let client = http_client();
    let mut req = fanout(&bridge, "all", "news");
    req.headers_mut().insert(
        "wsbridge-fanout-reply",
        http::HeaderValue::from_static("none"),
    );
    let reply = send(&client, req).await;
    assert_eq!(reply.head.status, 202, "{:?}", reply.body);
    assert_eq!(reply.json(), serde_json::json!({"expected": 3, "sent": 3}));
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(with_timeout(rx.recv()).await.expect("a worker got it"));
    }
    got.sort();
    assert_eq!(
        got,
        [
            ("p-1", Bytes::from("news")),
            ("p-2", Bytes::from("news")),
            ("p-3", Bytes::from("news"))
        ]
    );
    // Once each: nothing more comes.
    bridge.until_idle().await;
    assert!(rx.try_recv().is_err());
    bridge.stop().await;
}

#[tokio::test]
async fn a_caller_that_hangs_up_cancels_the_calls_still_running() {
    let bridge = TestBridge::start(|_| {}).await;
    struct Dropped(mpsc::UnboundedSender<()>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let (tx, mut cancelled) = mpsc::unbounded_channel();
    let started = Arc::new(Notify::new());
    let mut workers = Vec::new();
    for id in ["h-1", "h-2"] {
        let (tx, started) = (tx.clone(), started.clone());
        let held = move |_req: Request<Body>| {
            let guard = Dropped(tx.clone());
            let started = started.clone();
            async move {
                let _guard = guard;
                started.notify_one();
                tokio::time::sleep(Duration::from_secs(60)).await;
                Response::new(Body::full("never"))
            }
        };
        workers.push(orders_worker(&bridge, id, "eu", held).await);
    }
    let client = http_client();
    let req = fanout(&bridge, "all", "hold on");
    let call = tokio::spawn(async move { client.request(req).await });
    for _ in 0..2 {
        with_timeout(started.notified()).await;
    }
    // The caller goes away: its connection closes.
    call.abort();
    let gone = Instant::now();
    for _ in 0..2 {
        within(
            Duration::from_secs(5),
            "a worker's call is cancelled",
            cancelled.recv(),
        )
        .await
        .expect("cancelled");
    }
    println!(
        "both calls cancelled {:?} after the caller left",
        gone.elapsed()
    );
    drop(workers);
    bridge.stop().await;
}
