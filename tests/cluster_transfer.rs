//! 100 MiB up and 100 MiB down through another bridge: a caller at bridge
//! A, a worker at bridge B, NATS between them. The bytes arrive intact
//! (SHA-256 at both ends) and both bridges' memory stays bounded: the body
//! moves in chunks under a per-call credit window, never whole.
//! `WSBRIDGE_TRANSFER_MIB` changes the size (the 1 GiB figures in
//! docs/CLUSTER.md come from `WSBRIDGE_TRANSFER_MIB=1024`).

mod common;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use wsbridge::body::Body;

const MIB: usize = 1 << 20;

fn total() -> usize {
    std::env::var("WSBRIDGE_TRANSFER_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(100)
        * MIB
}

/// `POST /upload` answers the SHA-256 and length of what it read; `GET
/// /download` streams a generated body, its hash kept in `sent`; `GET
/// /endless` streams 1 GiB, counting in `produced` what the worker library
/// took from it (it takes only as fast as its bridge credits it).
fn worker(
    sent: Arc<Mutex<Option<String>>>,
    produced: Arc<AtomicU64>,
) -> impl wsbridge::worker::Handler {
    move |req: Request<Body>| {
        let (sent, produced) = (sent.clone(), produced.clone());
        async move {
            if req.uri().path() == "/download" {
                return Response::new(generated(total(), sent));
            }
            if req.uri().path() == "/endless" {
                let block = noise(BLOCK);
                let stream = futures_util::stream::poll_fn(move |_| {
                    produced.fetch_add(BLOCK as u64, Ordering::Relaxed);
                    std::task::Poll::Ready(Some(Ok::<_, Infallible>(Frame::data(block.clone()))))
                });
                return Response::new(Body::wrap(StreamBody::new(stream)));
            }
            let mut body = req.into_body();
            let mut sha = Sha256::new();
            let mut len = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Ok(data) = frame.into_data() {
                            len += data.len();
                            sha.update(&data);
                        }
                    }
                    Err(e) => {
                        let mut resp = Response::new(Body::full(e.to_string()));
                        *resp.status_mut() = StatusCode::BAD_REQUEST;
                        return resp;
                    }
                }
            }
            Response::new(Body::full(format!("{} {len}", hex(&sha.finalize()))))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_mib_each_way_through_another_bridge_arrives_intact_in_bounded_memory() {
    let nats = NatsCluster::start(3).await;
    let http = "request_timeout = \"600s\"\nmax_body = \"2GiB\"";
    let a = BridgeProcess::start_with(http, &cluster_toml(&nats.url(0), "node-a", None)).await;
    let b = BridgeProcess::start_with(http, &cluster_toml(&nats.url(2), "node-b", None)).await;
    let sent = Arc::new(Mutex::new(None));
    let produced = Arc::new(AtomicU64::new(0));
    let _worker = TestWorker::start(
        b.worker_config(&["default"], 8),
        worker(sent.clone(), produced.clone()),
    )
    .await;
    until_status(a.admin, "B's worker listed at A", |s| {
        s.cluster.as_ref().is_some_and(|c| {
            c.peers
                .iter()
                .any(|p| p.node == "node-b" && !p.services.is_empty())
        })
    })
    .await;
    let (rss_a, rss_b) = (a.peak_rss(), b.peak_rss());
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let total = total();

    let uploaded = Arc::new(Mutex::new(None));
    let req = Request::post(format!("http://{}/upload", a.http))
        .body(generated(total, uploaded.clone()))
        .expect("request");
    let resp = with_timeout(client.request(req))
        .await
        .expect("upload response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-bridge-attempts"], "1");
    let answer = with_timeout(resp.into_body().collect())
        .await
        .expect("answer")
        .to_bytes();
    let expected = uploaded.lock().expect("lock").clone().expect("hashed");
    assert_eq!(
        String::from_utf8_lossy(&answer),
        format!("{expected} {total}")
    );
    let after_upload = (a.peak_rss(), b.peak_rss());

    let req = Request::get(format!("http://{}/download", a.http))
        .body(Body::empty())
        .expect("request");
    let resp = with_timeout(client.request(req))
        .await
        .expect("download response");
    assert_eq!(resp.status(), StatusCode::OK);
    let (len, hash) = read_hashed(resp.into_body()).await;
    assert_eq!(len, total);
    let expected = sent.lock().expect("lock").clone().expect("hashed");
    assert_eq!(hash, expected);

    let peak = (a.peak_rss(), b.peak_rss());
    let mib = |n: u64| n as f64 / MIB as f64;
    eprintln!(
        "{} MiB each way through another bridge; peak RSS of A / B: idle {:.1} / {:.1} MiB, after the upload {:.1} / {:.1} MiB, after both {:.1} / {:.1} MiB",
        total / MIB,
        mib(rss_a),
        mib(rss_b),
        mib(after_upload.0),
        mib(after_upload.1),
        mib(peak.0),
        mib(peak.1)
    );
    assert!(peak.0 < 64 << 20, "bridge A's peak RSS {} bytes", peak.0);
    assert!(peak.1 < 64 << 20, "bridge B's peak RSS {} bytes", peak.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_reading_stops_the_worker_at_the_other_bridge() {
    let nats = NatsCluster::start(1).await;
    let http = "request_timeout = \"600s\"";
    let a = BridgeProcess::start_with(http, &cluster_toml(&nats.url(0), "node-a", None)).await;
    let b = BridgeProcess::start_with(http, &cluster_toml(&nats.url(0), "node-b", None)).await;
    let produced = Arc::new(AtomicU64::new(0));
    let _worker = TestWorker::start(
        b.worker_config(&["default"], 8),
        worker(Arc::default(), produced.clone()),
    )
    .await;
    until_status(a.admin, "B's worker listed at A", |s| {
        s.cluster
            .as_ref()
            .is_some_and(|c| c.peers.iter().any(|p| !p.services.is_empty()))
    })
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let req = Request::get(format!("http://{}/endless", a.http))
        .body(Body::empty())
        .expect("request");
    let resp = with_timeout(client.request(req)).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut read = 0u64;
    while read < MIB as u64 {
        let frame = with_timeout(body.frame()).await.expect("a chunk");
        read += frame
            .expect("data")
            .into_data()
            .map_or(0, |d| d.len() as u64);
    }
    // The caller stops reading. The worker goes on only as far as the
    // windows and socket buffers on the way let it, then waits: it has
    // stopped once `produced` holds still for 300 ms.
    let mut last = produced.load(Ordering::Relaxed);
    let mut still = 0;
    with_timeout(async {
        while still < 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = produced.load(Ordering::Relaxed);
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
    })
    .await;
    let ahead = last.saturating_sub(read);
    let (rss_a, rss_b) = (a.peak_rss(), b.peak_rss());
    eprintln!(
        "caller read {} MiB and stopped; the worker produced {:.1} MiB in all; peak RSS A / B {:.1} / {:.1} MiB",
        read / MIB as u64,
        last as f64 / MIB as f64,
        rss_a as f64 / MIB as f64,
        rss_b as f64 / MIB as f64
    );
    // Without flow control the worker would run on to its whole gibibyte.
    assert!(
        ahead < 48 * MIB as u64,
        "the worker ran {ahead} bytes ahead of the caller"
    );
    assert!(rss_a < 64 << 20 && rss_b < 64 << 20);
    drop(body);
}
