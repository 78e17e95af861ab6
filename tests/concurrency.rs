//! Many calls at once: every reply matches its own request, none is lost or
//! duplicated, and no worker ever gets more calls than it declared.

mod common;

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use wsbridge::body::Body;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};

/// A handler that sleeps a random few milliseconds, tracks how many calls it
/// holds at once, and answers with the request body tagged by worker name.
fn tracking_worker(
    name: &'static str,
    current: Counter,
    peak: Counter,
    served: Arc<Mutex<Vec<Bytes>>>,
    max_delay_ms: u64,
) -> impl Fn(
    Request<Body>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>
       + Send
       + Sync
       + 'static {
    move |req: Request<Body>| {
        let (current, peak, served) = (current.clone(), peak.clone(), served.clone());
        Box::pin(async move {
            let now = current.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let delay = fastrand::u64(0..=max_delay_ms);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let body = req.into_body().collect(1 << 20).await.expect("body");
            served.lock().expect("lock").push(body.clone());
            current.fetch_sub(1, Ordering::SeqCst);
            Response::builder()
                .header("x-worker", name)
                .body(Body::from(body))
                .expect("response")
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_max_inflight_is_never_exceeded() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    let served = Arc::new(Mutex::new(Vec::new()));
    let names = ["a", "b", "c"];
    let limits = [1u32, 3, 5];
    let mut peaks = Vec::new();
    let mut workers = Vec::new();
    for (name, max) in names.into_iter().zip(limits) {
        let (current, peak) = (Counter::default(), Counter::default());
        peaks.push(peak.clone());
        let handler = tracking_worker(name, current, peak, served.clone(), 5);
        workers.push(bridge.worker(&["default"], max, handler).await);
    }
    let client = http_client();
    let url = bridge.at("/load");
    let replies = join_all(400, |i| {
        let (client, url) = (client.clone(), url.clone());
        async move { post(&client, &url, format!("call-{i}")).await }
    })
    .await;
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.head.status, StatusCode::OK, "call {i}: {:?}", r.body);
        assert_eq!(r.body, format!("call-{i}"));
    }
    for ((peak, max), name) in peaks.iter().zip(limits).zip(names) {
        let peak = peak.load(Ordering::SeqCst);
        assert!(
            peak <= max as usize,
            "worker {name} held {peak} calls, declared {max}"
        );
        assert!(peak >= 1, "worker {name} served nothing");
    }
    // With 400 calls queued, the biggest worker was kept full.
    assert_eq!(peaks[2].load(Ordering::SeqCst), 5);
    bridge.stop().await;
}

/// The bridge runs as its own process here: 10,000 concurrent HTTP
/// connections need 20,000 descriptors when both ends live in one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_calls_each_get_their_own_reply() {
    const CALLS: usize = 10_000;
    let bridge = BridgeProcess::start(
        // header_read_timeout also bounds how long a connection may sit
        // before its request is read; on a loaded 2-core machine 10,000
        // connects can take longer than the default 10 s to be served.
        r#"request_timeout = "60s"
        queue_timeout = "60s"
        queue_limit = 20000
        header_read_timeout = "120s""#,
    )
    .await;
    let served = Arc::new(Mutex::new(Vec::new()));
    let handled = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for name in ["w1", "w2", "w3", "w4"] {
        let (current, peak) = (Counter::default(), Counter::default());
        let inner = tracking_worker(name, current, peak, served.clone(), 50);
        let count = handled.clone();
        let handler = move |req| {
            count.fetch_add(1, Ordering::SeqCst);
            inner(req)
        };
        // 4 x 1024 slots for 10,000 calls: the queue is exercised at scale too.
        workers.push(TestWorker::start(bridge.worker_config(&["default"], 1024), handler).await);
    }
    let client = http_client();
    let url = format!("http://{}/many", bridge.http);
    let replies = join_all(CALLS, |i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let req = Request::post(&url)
                .header("x-request-id", format!("req-{i}"))
                .body(http_body_util::Full::new(Bytes::from(format!(
                    "payload-{i}"
                ))))
                .expect("request");
            send(&client, req).await
        }
    })
    .await;
    let mut per_worker = std::collections::HashMap::<String, usize>::new();
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.head.status, StatusCode::OK, "call {i}: {:?}", r.body);
        assert_eq!(
            r.body,
            format!("payload-{i}"),
            "call {i} got someone else's reply"
        );
        assert_eq!(r.header("x-request-id"), format!("req-{i}"));
        *per_worker
            .entry(r.header("x-worker").to_owned())
            .or_default() += 1;
    }
    let served = served.lock().expect("lock");
    let distinct: HashSet<&Bytes> = served.iter().collect();
    assert_eq!(
        handled.load(Ordering::SeqCst),
        CALLS,
        "each call reached a worker exactly once"
    );
    assert_eq!(distinct.len(), CALLS, "no call was served twice");
    assert_eq!(per_worker.len(), 4, "all workers took part: {per_worker:?}");
}
