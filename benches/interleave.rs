//! Interleaving benchmark: do small calls stay fast while large transfers
//! share their worker connection?
//!
//! Runs the real `wsbridge serve` binary (release) with one in-process
//! library worker over wss. Phase A: small calls alone. Phase B: the same
//! small calls while 5 uploads and 5 downloads of 100 MiB stream through the
//! same worker connection. Phases alternate A/B three times so drift on a
//! noisy machine cancels; the table shows medians of the per-round figures.
//!
//! `cargo bench --bench interleave` prints the table; with `-- --check` it
//! also exits non-zero when B's p99 exceeds 3x A's (the issue's target).

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    convert::Infallible,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{BridgeProcess, TestWorker};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use wsbridge::body::Body;

const SMALL_CALLS: usize = 1000;
const SMALL_CONCURRENCY: usize = 8;
const TRANSFERS: usize = 10;
const TRANSFER_BYTES: usize = 100 << 20;
const ROUNDS: usize = 3;

async fn handler(req: Request<Body>) -> Response<Body> {
    match req.uri().path() {
        "/source" => Response::new(generated(b's')),
        "/sink" => {
            let mut body = req.into_body();
            let mut n = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                n += frame.into_data().map_or(0, |d| d.len());
            }
            Response::new(Body::from(n.to_string()))
        }
        _ => Response::new(Body::from("ok")),
    }
}

/// A body of `TRANSFER_BYTES` bytes of `byte`, produced as it is read.
fn generated(byte: u8) -> Body {
    let chunk = Bytes::from(vec![byte; 256 * 1024]);
    let mut left = TRANSFER_BYTES;
    let stream = futures_util::stream::poll_fn(move |_| {
        if left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = left.min(chunk.len());
        left -= n;
        std::task::Poll::Ready(Some(Ok::<_, Infallible>(hyper::body::Frame::data(
            chunk.slice(..n),
        ))))
    });
    Body::wrap(StreamBody::new(stream))
}

/// Runs the small calls; returns their latencies, sorted.
async fn small_calls(base: &str) -> Vec<Duration> {
    let client = common::http_client();
    let mut tasks = Vec::new();
    for w in 0..SMALL_CONCURRENCY {
        let (client, url) = (client.clone(), format!("{base}/small"));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for _ in (w..SMALL_CALLS).step_by(SMALL_CONCURRENCY) {
                let started = Instant::now();
                let req = Request::get(&url)
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let resp = client.request(req).await.expect("small call");
                let body = resp.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(body, "ok");
                lat.push(started.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("join"));
    }
    all.sort();
    all
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let check = std::env::args().any(|a| a == "--check");
    let bridge = BridgeProcess::start_with(
        r#"request_timeout = "600s"
        max_body = "1GiB""#,
        "[[routes]]\nprefix = \"/small-svc\"\nservice = \"small\"",
    )
    .await;
    // With `--separate`, small calls go to a second worker connection: the
    // difference to the shared case shows what head-of-line blocking on the
    // shared connection costs, as opposed to the two cores being busy.
    let separate = std::env::args().any(|a| a == "--separate");
    let _worker = TestWorker::start(bridge.worker_config(&["default"], 4096), handler).await;
    let _small_worker = if separate {
        Some(TestWorker::start(bridge.worker_config(&["small"], 4096), handler).await)
    } else {
        None
    };
    let small_base = if separate {
        format!("http://{}/small-svc", bridge.http)
    } else {
        format!("http://{}", bridge.http)
    };
    let base = format!("http://{}", bridge.http);
    let (mut a50, mut a99, mut b50, mut b99, mut moved) = (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let alone = small_calls(&small_base).await;
        a50.push(pct(&alone, 0.50));
        a99.push(pct(&alone, 0.99));

        // Start the transfers, wait until bytes flow, then measure.
        let started = Instant::now();
        let mut transfers = Vec::new();
        for i in 0..TRANSFERS {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build(hyper_util::client::legacy::connect::HttpConnector::new());
            let base = base.clone();
            transfers.push(tokio::spawn(async move {
                let req = if i % 2 == 0 {
                    Request::get(format!("{base}/source")).body(Body::empty())
                } else {
                    Request::post(format!("{base}/sink")).body(generated(b'u'))
                }
                .expect("request");
                let resp = client.request(req).await.expect("transfer");
                let mut body = resp.into_body();
                let mut n = 0usize;
                while let Some(frame) = body.frame().await {
                    n += frame
                        .expect("transfer body")
                        .into_data()
                        .map_or(0, |d| d.len());
                }
                n
            }));
        }
        let busy = small_calls(&small_base).await;
        let mut total = 0;
        for t in transfers {
            total += t.await.expect("join");
        }
        let secs = started.elapsed().as_secs_f64();
        b50.push(pct(&busy, 0.50));
        b99.push(pct(&busy, 0.99));
        moved.push(Duration::from_secs_f64(secs));
        eprintln!(
            "round {}: alone p99 {:?}, with transfers p99 {:?}; transfers took {secs:.1}s ({} bytes returned)",
            round + 1,
            pct(&alone, 0.99),
            pct(&busy, 0.99),
            total
        );
    }
    let (a50, a99, b50, b99) = (median(a50), median(a99), median(b50), median(b99));
    let ratio = b99.as_secs_f64() / a99.as_secs_f64();
    let transfer_time = median(moved).as_secs_f64();
    let mib = (TRANSFERS * TRANSFER_BYTES) as f64 / 1048576.0;
    println!("\nsmall calls ({SMALL_CALLS} per phase, concurrency {SMALL_CONCURRENCY}), medians of {ROUNDS} alternating rounds");
    println!("| phase | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| A: alone | {:.2} ms | {:.2} ms |",
        a50.as_secs_f64() * 1e3,
        a99.as_secs_f64() * 1e3
    );
    println!(
        "| B: with {TRANSFERS} x 100 MiB transfers | {:.2} ms | {:.2} ms |",
        b50.as_secs_f64() * 1e3,
        b99.as_secs_f64() * 1e3
    );
    println!("p99 ratio B/A: {ratio:.2}x (target <= 3x)");
    println!(
        "transfers: {mib:.0} MiB in {transfer_time:.1} s ({:.0} MiB/s)",
        mib / transfer_time
    );
    println!(
        "bridge peak RSS: {:.1} MiB",
        bridge.peak_rss() as f64 / 1048576.0
    );
    if check && ratio > 3.0 {
        eprintln!("FAILED: small-call p99 with transfers is {ratio:.2}x the p99 without");
        std::process::exit(1);
    }
}
