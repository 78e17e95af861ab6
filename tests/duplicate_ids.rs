//! A worker id is an address: when a second connection claims the id of a
//! connected worker of the same service, the newest wins by default (the
//! older drains, closes saying why, and its worker stops rather than
//! reconnect and take the id back), or, with `workers.duplicate_ids =
//! "refuse"`, the newcomer is turned away.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use wsbridge::{
    config::DuplicateIds,
    worker::{echo_as, Status, Worker, WorkerError},
};

/// A worker named `id` whose replies say `label` in `x-echo-worker`.
async fn claim(bridge: &TestBridge, id: &str, label: &str) -> TestWorker {
    let mut config = bridge.worker_config(&["orders"], 8);
    config.worker_id = id.to_owned();
    TestWorker::start(config, echo_as(label)).await
}

async fn answered_by(client: &HttpClient, bridge: &TestBridge, id: &str) -> String {
    let req = Request::post(bridge.at("/orders/x"))
        .header("wsbridge-worker", id)
        .body(Full::new(Bytes::from_static(b"hi")))
        .expect("request");
    let reply = send(client, req).await;
    assert_eq!(reply.head.status, 200, "{:?}", reply.body);
    reply.header("x-echo-worker").to_owned()
}

#[tokio::test]
async fn the_newest_connection_with_an_id_wins_and_the_older_worker_stops() {
    let bridge = TestBridge::start(|_| {}).await;
    let client = http_client();
    let old = claim(&bridge, "dev-1", "old").await;
    assert_eq!(answered_by(&client, &bridge, "dev-1").await, "old");

    let new = claim(&bridge, "dev-1", "new").await;
    // The older connection closed saying why; its worker stopped for good.
    match old.ended().await {
        Err(WorkerError::Replaced(reason)) => {
            assert!(reason.contains("worker_id"), "{reason}")
        }
        other => panic!("the older worker ended with {other:?}"),
    }
    for _ in 0..5 {
        assert_eq!(answered_by(&client, &bridge, "dev-1").await, "new");
    }
    new.stop().await;
    bridge.stop().await;
}

#[tokio::test]
async fn with_refuse_a_second_connection_with_a_taken_id_is_turned_away() {
    let bridge = TestBridge::start(|c| c.workers.duplicate_ids = DuplicateIds::Refuse).await;
    let client = http_client();
    let first = claim(&bridge, "dev-1", "first").await;

    let mut config = bridge.worker_config(&["orders"], 8);
    config.worker_id = "dev-1".into();
    let second = Worker::new(config, echo_as("second"));
    let mut status = second.subscribe();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(second.run(stop.clone()));
    let refused = with_timeout(status.wait_for(
        |s| matches!(s, Status::Disconnected { reason } if reason.contains("already connected")),
    ))
    .await
    .expect("status")
    .clone();
    assert!(
        matches!(&refused, Status::Disconnected { reason } if reason.contains("dev-1")),
        "{refused:?}"
    );
    assert_eq!(answered_by(&client, &bridge, "dev-1").await, "first");
    stop.cancel();
    let _ = with_timeout(task).await;
    first.stop().await;
    bridge.stop().await;
}
