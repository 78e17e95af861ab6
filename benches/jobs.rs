//! Job throughput: how many asynchronous calls one bridge takes and
//! completes per second, every change fsynced (`[jobs] dir`, redb with
//! group commit), against synchronous calls to the same worker in the
//! same round.
//!
//! Runs the real `wsbridge serve` binary (release) and one in-process
//! echo worker (its own runtime) over wss. Each round: `JOBS` jobs of a
//! 64-byte POST submitted by `CONCURRENCY` callers at once (`submitted/s`
//! counts until the last 202, each sent only after its job was on the
//! disk), then the time until the last of them ended (`completed/s`, from
//! the first submission); and as the baseline, the same number of
//! synchronous calls at the same concurrency. Rounds alternate so drift
//! cancels; the table shows medians.
//!
//! `cargo bench --bench jobs` prints the table; `JOBS=5000 ROUNDS=5` change
//! the size.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{http_client, runtime, BridgeProcess, TempDir, TestWorker};
use http::Request;
use http_body_util::{BodyExt, Full};

const CONCURRENCY: usize = 32;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` POSTs to `url` by `CONCURRENCY` callers, `prefer` as `Prefer` (or
/// none); each answer's status must be `want`. Returns the elapsed time.
async fn load(url: &str, n: usize, prefer: Option<&'static str>, want: u16) -> Duration {
    let client = http_client();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, next, url) = (client.clone(), next.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let mut req = Request::post(&url);
                if let Some(p) = prefer {
                    req = req.header("prefer", p);
                }
                let req = req
                    .body(Full::new(Bytes::from_static(&[b'x'; 64])))
                    .expect("request");
                let resp = client.request(req).await.expect("call");
                assert_eq!(resp.status().as_u16(), want);
                let _ = resp.into_body().collect().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("caller");
    }
    started.elapsed()
}

/// A metric's value at the admin listener.
async fn metric(admin: std::net::SocketAddr, name: &str) -> usize {
    let client = http_client();
    let resp = client
        .request(
            Request::get(format!("http://{admin}/metrics"))
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("metrics");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (jobs, rounds) = (env("JOBS", 2000), env("ROUNDS", 3));
    let dir = TempDir::new("bench-jobs");
    let worker_rt = runtime(1);
    let bridge = BridgeProcess::start_with(
        "",
        &format!(
            "[jobs]\ndir = \"{}\"\nconcurrency = 64",
            dir.0.join("jobs").display()
        ),
    )
    .await;
    let cfg = bridge.worker_config(&["default"], 64);
    let _worker = worker_rt
        .spawn(TestWorker::start(cfg, wsbridge::worker::echo))
        .await
        .expect("worker");
    let url = format!("http://{}/bench", bridge.http);
    let (mut submitted, mut completed, mut sync) = (Vec::new(), Vec::new(), Vec::new());
    let mut done = 0;
    let succeeded = "wsbridge_jobs_ended_total{state=\"succeeded\"}";
    for round in 1..=rounds {
        let took = load(&url, jobs, None, 200).await;
        sync.push(jobs as f64 / took.as_secs_f64());
        let started = Instant::now();
        let took = load(&url, jobs, Some("respond-async"), 202).await;
        submitted.push(jobs as f64 / took.as_secs_f64());
        done += jobs;
        while metric(bridge.admin, succeeded).await < done {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        completed.push(jobs as f64 / started.elapsed().as_secs_f64());
        eprintln!(
            "round {round}: sync {:.0}/s, jobs submitted {:.0}/s, completed {:.0}/s",
            sync[round - 1],
            submitted[round - 1],
            completed[round - 1]
        );
    }
    let (s, c, b) = (
        median(&mut submitted),
        median(&mut completed),
        median(&mut sync),
    );
    println!(
        "\n{jobs} jobs per round (64-byte POST, echo worker), {CONCURRENCY} callers at once, medians of {rounds} rounds; every job change fsynced"
    );
    println!("| figure | per second | vs synchronous calls |");
    println!("|---|---|---|");
    println!("| synchronous calls (baseline, same rounds) | {b:.0} | 1.00x |");
    println!(
        "| jobs submitted (202 after the fsync) | {s:.0} | {:.2}x |",
        s / b
    );
    println!(
        "| jobs completed (first submission to last end) | {c:.0} | {:.2}x |",
        c / b
    );
    let commits = metric(bridge.admin, "wsbridge_jobs_commits_total").await;
    let changes = metric(bridge.admin, "wsbridge_jobs_changes_total").await;
    println!(
        "\n{changes} changes in {commits} commits (fsyncs): {:.1} per commit (group commit)",
        changes as f64 / commits.max(1) as f64
    );
    // The worker's runtime is dropped off this one's async context.
    worker_rt.shutdown_background();
}
