//! Interleaving benchmark: do small calls stay fast while large transfers
//! share their worker connection?
//!
//! Runs the real `wsbridge serve` binary (release) with one in-process
//! library worker over wss. The worker, the transfer clients and the small
//! calls each run on their own runtime (their own threads), as separate
//! processes would: on one shared scheduler a small call's client task would
//! queue behind transfer tasks and the figure would measure the load
//! generator rather than the bridge. Phase A: small calls alone. Phase B: the same
//! small calls while 5 uploads and 5 downloads of 100 MiB stream through the
//! same worker connection. Phases alternate A/B three times so drift on a
//! noisy machine cancels; the table shows medians of the per-round figures.
//!
//! Two controls run in the same process and the same rounds:
//! * **direct**: the same small calls to a plain hyper server that does not
//!   go through the bridge at all, while the same transfers run through it.
//!   Its ratio is what the busy machine alone does to a small call's p99.
//! * **paced**: the transfers limited to `PACED_MIB_S` each (all ten
//!   together about 2 Gbit/s, a fast NIC's worth), so the two cores are not
//!   saturated by the load generator and the bridge's own interleaving shows.
//!
//! `cargo bench --bench interleave` prints the table; with `-- --check` it
//! also exits non-zero when the paced ratio exceeds 3x (the issue's target).
//! `-- --separate` puts the small calls on a second worker connection, to
//! compare with sharing the transfers' connection.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    convert::Infallible,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{runtime, BridgeProcess, TestWorker};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use wsbridge::body::Body;

const SMALL_CALLS: usize = 1000;
const SMALL_CONCURRENCY: usize = 8;
const TRANSFERS: usize = 10;
const TRANSFER_BYTES: usize = 100 << 20;
const ROUNDS: usize = 3;
/// Per-transfer rate of the paced scenario.
const PACED_MIB_S: f64 = 25.0;

/// A body of `TRANSFER_BYTES` bytes of `byte`, produced as it is read;
/// with a `pace` in bytes per second, no faster than that.
fn generated(byte: u8, pace: Option<f64>) -> Body {
    let chunk = Bytes::from(vec![byte; 256 * 1024]);
    let stream = futures_util::stream::unfold((0usize, Instant::now()), move |(sent, started)| {
        let chunk = chunk.clone();
        async move {
            if sent >= TRANSFER_BYTES {
                return None;
            }
            pace_to(pace, sent, started).await;
            let n = (TRANSFER_BYTES - sent).min(chunk.len());
            let frame = Ok::<_, Infallible>(hyper::body::Frame::data(chunk.slice(..n)));
            Some((frame, (sent + n, started)))
        }
    });
    Body::wrap(StreamBody::new(stream))
}

/// Sleeps until `done` bytes are due at `pace` bytes per second.
async fn pace_to(pace: Option<f64>, done: usize, started: Instant) {
    if let Some(rate) = pace {
        tokio::time::sleep_until((started + Duration::from_secs_f64(done as f64 / rate)).into())
            .await;
    }
}

async fn handler(req: Request<Body>) -> Response<Body> {
    let pace = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("pace="))
        .and_then(|r| r.parse::<f64>().ok());
    match req.uri().path() {
        "/source" => Response::new(generated(b's', pace)),
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

/// Starts the transfers (half downloads, half uploads) on `rt`; each task
/// returns the bytes it moved.
fn start_transfers(
    rt: &tokio::runtime::Runtime,
    base: &str,
    pace: Option<f64>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..TRANSFERS)
        .map(|i| {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build(hyper_util::client::legacy::connect::HttpConnector::new());
            let query = pace.map_or(String::new(), |p| format!("?pace={p}"));
            let base = base.to_owned();
            rt.spawn(async move {
                let req = if i % 2 == 0 {
                    Request::get(format!("{base}/source{query}")).body(Body::empty())
                } else {
                    Request::post(format!("{base}/sink")).body(generated(b'u', pace))
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
            })
        })
        .collect()
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

/// Per-round figures of one scenario.
#[derive(Default)]
struct Figures {
    a50: Vec<Duration>,
    a99: Vec<Duration>,
    b50: Vec<Duration>,
    b99: Vec<Duration>,
    secs: Vec<f64>,
}

impl Figures {
    fn row(&self, name: &str) -> f64 {
        let ms = |v: &[Duration]| median(v.to_vec()).as_secs_f64() * 1e3;
        let ratio = ms(&self.b99) / ms(&self.a99);
        let p50_ratio = ms(&self.b50) / ms(&self.a50);
        let mut secs = self.secs.clone();
        secs.sort_by(f64::total_cmp);
        let rate = (TRANSFERS * TRANSFER_BYTES) as f64 / 1048576.0 / secs[secs.len() / 2];
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | **{p50_ratio:.2}x** | **{ratio:.2}x** | {rate:.0} MiB/s |",
            ms(&self.a50),
            ms(&self.a99),
            ms(&self.b50),
            ms(&self.b99)
        );
        ratio
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (worker_rt, bulk_rt) = (runtime(2), runtime(2));
    let check = std::env::args().any(|a| a == "--check");
    let bridge = BridgeProcess::start_with(
        r#"request_timeout = "600s"
        max_body = "1GiB""#,
        "[[routes]]\nprefix = \"/small-svc\"\nservice = \"small\"",
    )
    .await;
    let separate = std::env::args().any(|a| a == "--separate");
    let start_worker = |service: &'static str| {
        let cfg = bridge.worker_config(&[service], 4096);
        worker_rt.spawn(TestWorker::start(cfg, handler))
    };
    let _worker = start_worker("default").await.expect("worker");
    let _small_worker = if separate {
        Some(start_worker("small").await.expect("worker"))
    } else {
        None
    };
    // The control: a plain hyper server answering "ok", on the worker's runtime.
    let direct = worker_rt
        .spawn(common::serve_http(|_req| async {
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }))
        .await
        .expect("direct server");
    let base = format!("http://{}", bridge.http);
    let via_bridge = if separate {
        format!("{base}/small-svc")
    } else {
        base.clone()
    };
    let paced = PACED_MIB_S * 1048576.0;
    let scenarios = [
        ("bridge, transfers flat out", via_bridge.clone(), None),
        (
            "direct (control), transfers flat out",
            format!("http://{direct}"),
            None,
        ),
        ("bridge, transfers paced", via_bridge, Some(paced)),
        (
            "direct (control), transfers paced",
            format!("http://{direct}"),
            Some(paced),
        ),
    ];
    let mut figures: Vec<Figures> = scenarios.iter().map(|_| Figures::default()).collect();
    for round in 0..ROUNDS {
        for ((name, small_base, pace), fig) in scenarios.iter().zip(&mut figures) {
            let alone = small_calls(small_base).await;
            let started = Instant::now();
            let transfers = start_transfers(&bulk_rt, &base, *pace);
            let busy = small_calls(small_base).await;
            let mut total = 0;
            for t in transfers {
                total += t.await.expect("join");
            }
            assert_eq!(total, TRANSFERS * TRANSFER_BYTES / 2 + TRANSFERS / 2 * 9);
            fig.secs.push(started.elapsed().as_secs_f64());
            fig.a50.push(pct(&alone, 0.50));
            fig.a99.push(pct(&alone, 0.99));
            fig.b50.push(pct(&busy, 0.50));
            fig.b99.push(pct(&busy, 0.99));
            eprintln!(
                "round {}, {name}: p99 alone {:?}, with transfers {:?}",
                round + 1,
                pct(&alone, 0.99),
                pct(&busy, 0.99)
            );
        }
    }
    println!(
        "\nsmall calls: {SMALL_CALLS} per phase at concurrency {SMALL_CONCURRENCY}; transfers: {TRANSFERS} x 100 MiB (half up, half down) through the bridge; paced = {PACED_MIB_S} MiB/s each; medians of {ROUNDS} rounds{}",
        if separate { "; small calls on their own worker connection" } else { "; small calls share the transfers' worker connection" }
    );
    println!("| small calls to | p50 alone | p99 alone | p50 with transfers | p99 with transfers | p50 ratio | p99 ratio | transfer rate |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for ((name, _, _), fig) in scenarios.iter().zip(&figures) {
        ratios.push(fig.row(name));
    }
    println!(
        "bridge peak RSS: {:.1} MiB",
        bridge.peak_rss() as f64 / 1048576.0
    );
    drop((_worker, _small_worker));
    worker_rt.shutdown_background();
    bulk_rt.shutdown_background();
    if check && ratios[2] > 3.0 {
        eprintln!(
            "FAILED: with paced transfers the small-call p99 is {:.2}x the p99 without",
            ratios[2]
        );
        std::process::exit(1);
    }
}
