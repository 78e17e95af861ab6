//! Fan-out and calls for one worker across bridges: a fan-out made at one
//! bridge reaches the matching workers of every bridge, each once, with
//! the node each ran at; a slow one is a `timeout` at the deadline. Real
//! `nats-server`, real bridges, real workers over TLS.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use wsbridge::{body::Body, worker::echo_as};

#[tokio::test]
async fn a_fanout_at_one_bridge_reaches_the_workers_of_every_bridge() {
    let nats = NatsCluster::start(1).await;
    let url = nats.url(0);
    let beat = Duration::from_millis(500);
    let a = TestBridge::start(|c| {
        c.cluster = Some(cluster_config(&url, "node-a", beat));
        c.routes[0].request_timeout = Some(Duration::from_secs(2));
    })
    .await;
    let b = TestBridge::start(|c| c.cluster = Some(cluster_config(&url, "node-b", beat))).await;
    let _a1 = orders_worker(&a, "a-1", "eu", echo_as("a-1")).await;
    let _b1 = orders_worker(&b, "b-1", "eu", echo_as("b-1")).await;
    let _b2 = orders_worker(&b, "b-2", "us", echo_as("b-2")).await;
    let _b3 = orders_worker(&b, "b-slow", "eu", |_req: Request<Body>| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(Body::full("late"))
    })
    .await;
    let client = http_client();
    // Once B's announcement of its three workers reached A (a fan-out goes
    // to the workers the peers last announced).
    let admin_a = a.admin.expect("admin");
    until_status(admin_a, "B's workers announced at A", |s| {
        s.cluster.as_ref().is_some_and(|c| {
            c.peers
                .iter()
                .flat_map(|p| &p.services)
                .map(|svc| svc.workers.len())
                .sum::<usize>()
                == 3
        })
    })
    .await;
    let asked = Instant::now();
    let req = Request::post(a.at("/orders/notify"))
        .header("wsbridge-fanout", "region=eu")
        .body(Full::new(Bytes::from_static(b"to all in eu")))
        .expect("request");
    let doc = send(&client, req).await.json();
    let took = asked.elapsed();
    println!("cross-node fan-out answered in {took:?}: {doc}");
    assert_eq!(
        (doc["expected"].as_u64(), doc["responded"].as_u64()),
        (Some(3), Some(2))
    );
    let mut rows: Vec<(String, String, String, String)> = doc["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
            (s("worker_id"), s("node"), s("outcome"), s("body"))
        })
        .collect();
    rows.sort();
    let row = |id: &str, node: &str, outcome: &str, body: &str| {
        (
            id.to_owned(),
            node.to_owned(),
            outcome.to_owned(),
            body.to_owned(),
        )
    };
    assert_eq!(
        rows,
        [
            row("a-1", "node-a", "ok", "to all in eu"),
            row("b-1", "node-b", "ok", "to all in eu"),
            row("b-slow", "node-b", "timeout", ""),
        ]
    );
    assert!(took < Duration::from_secs(4), "{took:?}");

    // A call for one of B's workers, made at A, reaches it every time.
    for _ in 0..5 {
        let req = Request::post(a.at("/orders/x"))
            .header("wsbridge-worker", "b-2")
            .body(Full::new(Bytes::from_static(b"just you")))
            .expect("request");
        let reply = send(&client, req).await;
        assert_eq!(reply.head.status, 200);
        assert_eq!(reply.header("x-echo-worker"), "b-2");
    }
    // A push from A: 202 once the four calls are sent.
    let req = Request::post(a.at("/orders/notify"))
        .header("wsbridge-fanout", "all")
        .header("wsbridge-fanout-reply", "none")
        .body(Full::new(Bytes::from_static(b"news")))
        .expect("request");
    let reply = send(&client, req).await;
    assert_eq!(reply.head.status, 202);
    assert_eq!(reply.json(), serde_json::json!({"expected": 4, "sent": 4}));
}
