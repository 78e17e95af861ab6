//! NATS servers failing under cross-node calls: `kill -9` of the server
//! bridge A is connected to, then `SIGSTOP` of bridge B's (its sockets stay
//! open and silent). Calls run all along from A to a worker at B. The
//! bridges move to the remaining server; no call outlives its deadline;
//! none runs twice; the gap until calls succeed again is printed.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use http::{Request, Response};
use tokio::sync::Notify;
use wsbridge::body::Body;

/// Pings every second: a silent server is noticed in about 2 s.
const BEAT: Duration = Duration::from_secs(1);

/// One finished call.
struct Done {
    started: Instant,
    took: Duration,
    status: u16,
    error: String,
}

/// What the callers saw, and a signal on each success.
#[derive(Default)]
struct Log {
    done: Mutex<Vec<Done>>,
    ok: Notify,
}

impl Log {
    fn first_success_after(&self, t: Instant) -> Option<Instant> {
        let done = self.done.lock().expect("lock");
        done.iter()
            .filter(|d| d.status == 200 && d.started >= t)
            .map(|d| d.started + d.took)
            .min()
    }

    async fn until_success_after(&self, t: Instant) -> Duration {
        with_timeout(async {
            loop {
                let ok = self.ok.notified();
                if let Some(at) = self.first_success_after(t) {
                    return at - t;
                }
                ok.await;
            }
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_a_nats_server_killed_and_another_frozen_without_hanging_or_running_twice() {
    let mut nats = NatsCluster::start(3).await;
    let timeout = Duration::from_secs(5);
    let (url_a, url_b) = (nats.url(0), nats.url(2));
    let a = TestBridge::start(|c| {
        c.cluster = Some(cluster_config(&url_a, "node-a", BEAT));
        c.http.request_timeout = timeout;
        c.http.queue_timeout = Duration::from_millis(500);
    })
    .await;
    let b = TestBridge::start(|c| c.cluster = Some(cluster_config(&url_b, "node-b", BEAT))).await;
    // The worker counts how often it ran each call.
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let counted = runs.clone();
    let handler = move |req: Request<Body>| {
        let counted = counted.clone();
        async move {
            let id = req.uri().path().to_owned();
            *counted.lock().expect("lock").entry(id.clone()).or_default() += 1;
            Response::new(Body::full(id))
        }
    };
    let worker = TestWorker::start(b.worker_config(&["orders"], 16), handler).await;
    let admin_a = a.admin.expect("admin");
    until_status(admin_a, "B's worker listed at A", |s| {
        s.cluster
            .as_ref()
            .is_some_and(|c| c.peers.iter().any(|p| !p.services.is_empty()))
    })
    .await;

    // Four callers, one call after another, until told to stop.
    let log = Arc::new(Log::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let mut callers = tokio::task::JoinSet::new();
    for c in 0..4 {
        let (log, stop, url) = (log.clone(), stop.clone(), format!("http://{}", a.http));
        callers.spawn(async move {
            let client = http_client();
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                let path = format!("/orders/c{c}-{n}");
                let started = Instant::now();
                let reply = post(&client, &format!("{url}{path}"), "x").await;
                let status = reply.head.status.as_u16();
                if status == 200 {
                    assert_eq!(reply.body, path.as_bytes(), "a reply for another call");
                } else {
                    assert!((502..=504).contains(&status), "{status}: {:?}", reply.body);
                }
                let error = if status == 200 {
                    String::new()
                } else {
                    reply.error_code()
                };
                log.done.lock().expect("lock").push(Done {
                    started,
                    took: started.elapsed(),
                    status,
                    error,
                });
                if status == 200 {
                    log.ok.notify_waiters();
                } else {
                    // A failed call is not retried at once in a tight loop.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
    }
    log.until_success_after(Instant::now()).await;

    nats.kill(0);
    let killed = Instant::now();
    let gap_kill = log.until_success_after(killed).await;

    // Timed from when every thread of the server is stopped.
    nats.freeze(2);
    let frozen = Instant::now();
    let gap_freeze = log.until_success_after(frozen).await;
    stop.cancel();
    while let Some(done) = callers.join_next().await {
        done.expect("a caller failed");
    }
    nats.thaw(2);

    let done = std::mem::take(&mut *log.done.lock().expect("lock"));
    for d in done.iter().filter(|d| d.status != 200) {
        let at = |t: Instant| {
            t.checked_duration_since(killed)
                .map_or(-(killed - t).as_secs_f64(), |d| d.as_secs_f64())
        };
        eprintln!(
            "failed call: started {:+.3} s from the kill ({:+.3} s from the freeze), took {:?}: {} {}",
            at(d.started),
            at(d.started) - (frozen - killed).as_secs_f64(),
            d.took,
            d.status,
            d.error
        );
    }
    let failed: Vec<u16> = done
        .iter()
        .filter(|d| d.status != 200)
        .map(|d| d.status)
        .collect();
    let longest = done.iter().map(|d| d.took).max().unwrap_or_default();
    eprintln!(
        "{} calls, {} failed ({failed:?}); calls succeed again {gap_kill:?} after kill -9 of A's server, {gap_freeze:?} after SIGSTOP of B's; longest call {longest:?}",
        done.len(),
        failed.len()
    );
    assert!(
        longest < timeout + Duration::from_secs(1),
        "a call took {longest:?}, past its {timeout:?} deadline"
    );
    let twice: Vec<_> = runs
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| format!("{id} x{n}"))
        .collect();
    assert!(twice.is_empty(), "calls ran twice: {twice:?}");
    worker.stop().await;
    a.stop().await;
    b.stop().await;
}
