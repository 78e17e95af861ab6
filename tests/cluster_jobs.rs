//! Jobs in a cluster, kept in JetStream: a job submitted at bridge A runs
//! on a worker at bridge B and is fetched at bridge C, with A killed
//! (SIGKILL) right after its 202; an idempotency key taken at one bridge
//! is the same job at another; a job cancelled at one bridge is cancelled
//! where it runs. Real bridge processes on a real nats-server with
//! JetStream.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use wsbridge::{body::Body, worker::echo};

/// A single NATS server with JetStream, its store in a temporary directory.
async fn nats_with_jetstream(dir: &TempDir) -> NatsCluster {
    let store = dir.0.join("js");
    NatsCluster::start_with(
        1,
        &format!("jetstream {{ store_dir: \"{}\" }}", store.display()),
    )
    .await
}

async fn bridge(nats: &NatsCluster, node: &str) -> BridgeProcess {
    let tail = format!(
        "{}\n[jobs]\njetstream = true\n",
        cluster_toml(&nats.url(0), node, Some("1s"))
    );
    BridgeProcess::start_with("request_timeout = \"30s\"", &tail).await
}

fn workers_at(status: &wsbridge::bridge::status::Status, node: &str) -> usize {
    status
        .cluster
        .as_ref()
        .and_then(|c| c.peers.iter().find(|p| p.node == node))
        .map_or(0, |p| p.services.iter().map(|s| s.workers.len()).sum())
}

#[tokio::test]
async fn a_job_submitted_at_a_runs_at_b_and_is_fetched_at_c_with_a_killed() {
    let dir = TempDir::new("cluster-jobs");
    let nats = nats_with_jetstream(&dir).await;
    let mut a = bridge(&nats, "node-a").await;
    let b = bridge(&nats, "node-b").await;
    let c = bridge(&nats, "node-c").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |req: Request<Body>| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                echo(req).await
            }
        }
    };
    let _at_b = TestWorker::start(b.worker_config(&["default"], 8), handler).await;
    for admin in [a.admin, c.admin] {
        until_status(admin, "B's worker listed", |s| workers_at(s, "node-b") == 1).await;
    }

    let client = http_client();
    let req = Request::post(format!("http://{}/report", a.http))
        .header("prefer", "respond-async")
        .header("idempotency-key", "report-7")
        .body(Full::new(Bytes::from("the report")))
        .expect("request");
    let accepted = send(&client, req).await;
    assert_eq!(accepted.head.status, 202, "{:?}", accepted.body);
    let location = accepted.header("location").to_owned();
    a.kill().await;
    let _ = a.wait().await;

    // C answers for it, and has the result once B's worker replied.
    let done = within(
        Duration::from_secs(40),
        "the result at C",
        get(
            &client,
            &format!("http://{}{location}/result?wait=40", c.http),
        ),
    )
    .await;
    assert_eq!(done.head.status, 200, "{:?}", done.body);
    assert_eq!(done.body, "the report");
    assert_eq!(done.header("wsbridge-job-state"), "succeeded");
    let doc = get(&client, &format!("http://{}{location}", c.http))
        .await
        .json();
    assert_eq!(doc["state"], "succeeded", "{doc}");
    assert_eq!(doc["node"], "node-b", "run by B's worker: {doc}");
    // B answers the same.
    let at_b = get(&client, &format!("http://{}{location}/result", b.http)).await;
    assert_eq!(at_b.body, "the report");

    // A result larger than a message comes through the object store.
    let big = noise(1536 * 1024);
    let req = Request::put(format!("http://{}/big", b.http))
        .header("prefer", "respond-async")
        .body(Full::new(big.clone()))
        .expect("request");
    let accepted = send(&client, req).await;
    assert_eq!(accepted.head.status, 202, "{:?}", accepted.body);
    let big_result = get(
        &client,
        &format!(
            "http://{}{}/result?wait=40",
            c.http,
            accepted.header("location")
        ),
    )
    .await;
    assert_eq!(big_result.head.status, 200);
    assert!(big_result.body == big, "1.5 MiB back byte for byte");

    // The same key at C is the same job, not run again.
    let runs_before = runs.load(Ordering::SeqCst);
    let req = Request::post(format!("http://{}/report", c.http))
        .header("prefer", "respond-async")
        .header("idempotency-key", "report-7")
        .body(Full::new(Bytes::from("the report")))
        .expect("request");
    let again = send(&client, req).await;
    assert_eq!(again.header("location"), location);
    assert_eq!(runs.load(Ordering::SeqCst), runs_before);
}

#[tokio::test]
async fn jobs_cancelled_at_one_bridge_are_cancelled_where_they_run() {
    let dir = TempDir::new("cluster-jobs");
    let nats = nats_with_jetstream(&dir).await;
    let a = bridge(&nats, "node-a").await;
    let b = bridge(&nats, "node-b").await;
    let c = bridge(&nats, "node-c").await;
    let (hang, mut started, mut dropped) = hanging();
    let _at_b = TestWorker::start(b.worker_config(&["default"], 8), hang).await;
    for admin in [a.admin, c.admin] {
        until_status(admin, "B's worker listed", |s| workers_at(s, "node-b") == 1).await;
    }
    let client = http_client();
    // Several jobs: whichever bridges pull them (A, B or C), most are not
    // run by C, where they are cancelled.
    const JOBS: usize = 6;
    let mut locations = Vec::new();
    for _ in 0..JOBS {
        let req = Request::post(format!("http://{}/long", a.http))
            .header("prefer", "respond-async")
            .body(Full::new(Bytes::from("x")))
            .expect("request");
        let accepted = send(&client, req).await;
        assert_eq!(accepted.head.status, 202, "{:?}", accepted.body);
        locations.push(accepted.header("location").to_owned());
    }
    for _ in 0..JOBS {
        with_timeout(started.recv()).await;
    }
    for location in &locations {
        let doc = get(&client, &format!("http://{}{location}?wait=5", c.http))
            .await
            .json();
        assert_eq!(doc["state"], "running", "{doc}");
        let req = Request::delete(format!("http://{}{location}", c.http))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let cancelled = send(&client, req).await;
        assert_eq!(cancelled.head.status, 200, "{:?}", cancelled.body);
        assert_eq!(cancelled.json()["state"], "cancelled");
    }
    for _ in 0..JOBS {
        within(
            Duration::from_secs(5),
            "a worker's handler dropped",
            dropped.recv(),
        )
        .await;
    }
    for location in &locations {
        let result = get(&client, &format!("http://{}{location}/result", b.http)).await;
        assert_eq!(result.error_code(), "job_cancelled");
    }
}
