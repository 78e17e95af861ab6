//! Asynchronous calls (`Prefer: respond-async`) on one bridge: 202 with a
//! `Location` at once, the result byte for byte later; `wait=N` answered
//! as usual when ready in time; a job for a worker that connects later;
//! `DELETE` reaching the worker; retention; idempotency keys; a full store;
//! callbacks signed and retried.

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
use tokio::sync::mpsc;
use wsbridge::{
    body::Body,
    config::{ByteSize, Secret},
    worker::{echo_as, Handler},
};

/// A job store in a fresh directory (kept while the guard lives).
fn with_jobs(dir: &TempDir) -> impl FnOnce(&mut wsbridge::Config) + '_ {
    move |c| c.jobs.dir = Some(dir.0.join("jobs"))
}

fn submit(bridge: &TestBridge, prefer: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::post(bridge.at("/orders/report"))
        .header("prefer", prefer)
        .body(Full::new(body))
        .expect("request")
}

/// An echo that first sleeps `delay`, counting its calls.
fn slow_echo(delay: Duration, calls: Arc<AtomicUsize>) -> impl Handler {
    let echo = echo_as("slow");
    move |req: Request<Body>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let reply = echo.call(req);
        async move {
            tokio::time::sleep(delay).await;
            reply.await
        }
    }
}

#[tokio::test]
async fn a_slow_call_gets_202_at_once_and_its_result_byte_for_byte_later() {
    let dir = TempDir::new("jobs");
    let bridge = TestBridge::start(with_jobs(&dir)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let _w = bridge
        .worker(
            &["orders"],
            4,
            slow_echo(Duration::from_secs(3), calls.clone()),
        )
        .await;
    let client = http_client();
    let body = noise(300 * 1024);
    let started = Instant::now();
    let accepted = send(&client, submit(&bridge, "respond-async", body.clone())).await;
    assert_eq!(accepted.head.status, 202, "{:?}", accepted.body);
    assert!(started.elapsed() < Duration::from_secs(1), "202 at once");
    assert_eq!(accepted.header("preference-applied"), "respond-async");
    assert!(!accepted.header("retry-after").is_empty());
    let location = accepted.header("location").to_owned();
    let id = location
        .strip_prefix("/_wsbridge/jobs/")
        .expect("Location under /_wsbridge/jobs/");
    assert_eq!(id.len(), 32, "128 bits as hex: {id}");
    let doc = accepted.json();
    assert_eq!(doc["id"], id);
    assert!(matches!(doc["state"].as_str(), Some("queued" | "running")));
    assert_eq!(doc["service"], "orders");
    assert_eq!(doc["request_id"], accepted.header("x-request-id"));

    // The result is not there yet: 202 with the job.
    let early = get(&client, &bridge.at(&format!("{location}/result"))).await;
    assert_eq!(early.head.status, 202);
    assert!(matches!(
        early.json()["state"].as_str(),
        Some("queued" | "running")
    ));

    // Long-poll the result; it is the worker's reply, byte for byte.
    let done = get(&client, &bridge.at(&format!("{location}/result?wait=10"))).await;
    assert_eq!(done.head.status, 200, "{:?}", done.body);
    assert_eq!(done.body, body, "the result, byte for byte");
    assert_eq!(done.header("x-echo-worker"), "slow");
    assert_eq!(done.header("wsbridge-job-state"), "succeeded");
    assert_eq!(done.header("content-location"), location);
    let doc = get(&client, &bridge.at(&location)).await.json();
    assert_eq!(doc["state"], "succeeded");
    assert_eq!(doc["status"], 200);
    assert!(
        doc["ran_by"].as_str().is_some_and(|w| !w.is_empty()),
        "{doc}"
    );
    assert_eq!(doc["attempts"], 1);
    assert!(doc["finished_at"].is_string() && doc["started_at"].is_string());

    // `wait=5` on the same call: the reply comes back as usual.
    let started = Instant::now();
    let sync = send(
        &client,
        submit(&bridge, "respond-async, wait=5", body.clone()),
    )
    .await;
    assert_eq!(sync.head.status, 200, "{:?}", sync.body);
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(sync.body, body);
    assert!(sync
        .header("content-location")
        .starts_with("/_wsbridge/jobs/"));
    assert_eq!(calls.load(Ordering::SeqCst), 2, "each job ran once");

    // `wait=1` is too short: 202.
    let short = send(&client, submit(&bridge, "respond-async; wait=1", body)).await;
    assert_eq!(short.head.status, 202);
}

#[tokio::test]
async fn the_state_long_polls_until_it_changes_and_delete_cancels_at_the_worker() {
    let dir = TempDir::new("jobs");
    let bridge = TestBridge::start(with_jobs(&dir)).await;
    let (hang, mut started, mut dropped) = hanging();
    let client = http_client();
    let accepted = send(&client, submit(&bridge, "respond-async", Bytes::from("x"))).await;
    let location = accepted.header("location").to_owned();
    assert_eq!(accepted.json()["state"], "queued", "no worker yet");
    let poll = {
        let (client, url) = (client.clone(), bridge.at(&format!("{location}?wait=20")));
        tokio::spawn(async move { get(&client, &url).await })
    };
    let _w = bridge.worker(&["orders"], 1, hang).await;
    with_timeout(started.recv()).await;
    let changed = with_timeout(poll).await.expect("poll");
    assert_eq!(
        changed.json()["state"],
        "running",
        "the long poll saw it start"
    );

    let req = Request::delete(bridge.at(&location))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let cancelled = send(&client, req).await;
    assert_eq!(cancelled.head.status, 200, "{:?}", cancelled.body);
    assert_eq!(cancelled.json()["state"], "cancelled");
    within(
        Duration::from_secs(5),
        "the worker's handler was dropped",
        dropped.recv(),
    )
    .await;
    let result = get(&client, &bridge.at(&format!("{location}/result"))).await;
    assert_eq!(result.head.status, 409);
    assert_eq!(result.error_code(), "job_cancelled");
    assert_eq!(
        result.json()["error"]["job_id"],
        location.rsplit('/').next().unwrap_or("")
    );

    // A finished job is purged by DELETE.
    let req = Request::delete(bridge.at(&location))
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(&client, req).await.head.status, 204);
    let gone = get(&client, &bridge.at(&location)).await;
    assert_eq!(gone.head.status, 404);
    assert_eq!(gone.error_code(), "job_not_found");
    // Ids of another form, and other methods, are refused clearly.
    let bad = get(&client, &bridge.at("/_wsbridge/jobs/not-an-id")).await;
    assert_eq!(bad.error_code(), "job_not_found");
    let req = Request::post(bridge.at(&format!("{location}/result")))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let wrong = send(&client, req).await;
    assert_eq!(wrong.head.status, 405);
    assert_eq!(wrong.header("allow"), "GET, HEAD");
}

#[tokio::test]
async fn a_job_for_a_worker_that_connects_10_s_later_runs_then() {
    let dir = TempDir::new("jobs");
    let bridge = TestBridge::start(with_jobs(&dir)).await;
    let client = http_client();
    let req = Request::post(bridge.at("/orders/to-device"))
        .header("prefer", "respond-async")
        .header("wsbridge-worker", "device-7")
        .body(Full::new(Bytes::from("wake up")))
        .expect("request");
    let accepted = send(&client, req).await;
    assert_eq!(accepted.head.status, 202, "{:?}", accepted.body);
    let location = accepted.header("location").to_owned();
    // Another worker of the service does not take it.
    let _other = orders_worker(&bridge, "device-1", "eu", echo_as("device-1")).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let waiting = get(&client, &bridge.at(&location)).await.json();
    assert_eq!(waiting["state"], "queued", "{waiting}");
    let _late = orders_worker(&bridge, "device-7", "eu", echo_as("device-7")).await;
    let done = get(&client, &bridge.at(&format!("{location}/result?wait=10"))).await;
    assert_eq!(done.head.status, 200, "{:?}", done.body);
    assert_eq!(done.body, "wake up");
    assert_eq!(done.header("x-echo-worker"), "device-7");
}

#[tokio::test]
async fn finished_jobs_are_forgotten_after_retention_and_queued_ones_expire() {
    let dir = TempDir::new("jobs");
    let bridge = TestBridge::start(|c| {
        with_jobs(&dir)(c);
        c.jobs.retention = Duration::from_secs(1);
        c.jobs.queue_timeout = Duration::from_secs(1);
    })
    .await;
    let client = http_client();
    // No worker: it expires after the queue timeout.
    let accepted = send(&client, submit(&bridge, "respond-async", Bytes::from("x"))).await;
    let location = accepted.header("location").to_owned();
    let result = get(&client, &bridge.at(&format!("{location}/result?wait=5"))).await;
    assert_eq!(result.head.status, 504, "{:?}", result.body);
    assert_eq!(result.error_code(), "job_expired");
    assert_eq!(result.header("wsbridge-job-state"), "expired");
    // A second later it is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let doc = get(&client, &bridge.at(&location)).await;
        if doc.head.status == 404 {
            assert_eq!(doc.error_code(), "job_not_found");
            break;
        }
        assert!(Instant::now() < deadline, "still there after its retention");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_job_and_binds_its_request() {
    let dir = TempDir::new("jobs");
    let bridge = TestBridge::start(with_jobs(&dir)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let _w = bridge
        .worker(&["orders"], 4, slow_echo(Duration::ZERO, calls.clone()))
        .await;
    let client = http_client();
    let keyed = |body: &'static str| {
        Request::post(bridge.at("/orders/pay"))
            .header("prefer", "respond-async")
            .header("idempotency-key", "order-42")
            .body(Full::new(Bytes::from(body)))
            .expect("request")
    };
    let first = send(&client, keyed("pay 10")).await;
    let again = send(&client, keyed("pay 10")).await;
    assert_eq!(first.head.status, 202);
    assert_eq!(first.header("location"), again.header("location"));
    let location = first.header("location").to_owned();
    let done = get(&client, &bridge.at(&format!("{location}/result?wait=10"))).await;
    assert_eq!(done.body, "pay 10");
    let third = send(&client, keyed("pay 10")).await;
    assert_eq!(third.header("location"), location);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one run for one key");
    let other = send(&client, keyed("pay 99")).await;
    assert_eq!(other.head.status, 422);
    assert_eq!(other.error_code(), "idempotency_key_mismatch");
}

#[tokio::test]
async fn a_full_store_answers_503_and_keeps_nothing() {
    let dir = TempDir::new("jobs");
    let bridge = TestBridge::start(|c| {
        with_jobs(&dir)(c);
        c.jobs.max_bytes = ByteSize(8 * 1024);
        c.jobs.max_result = ByteSize(4 * 1024);
    })
    .await;
    let client = http_client();
    let first = send(&client, submit(&bridge, "respond-async", noise(4000))).await;
    assert_eq!(first.head.status, 202, "{:?}", first.body);
    let full = send(&client, submit(&bridge, "respond-async", noise(4000))).await;
    assert_eq!(full.head.status, 503, "{:?}", full.body);
    assert_eq!(full.error_code(), "jobs_full");
    assert!(!full.json()["error"]["request_id"]
        .as_str()
        .unwrap_or("")
        .is_empty());
    assert_eq!(full.header("location"), "");
    let metrics = get(
        &client,
        &format!("http://{}/metrics", bridge.admin.expect("admin")),
    )
    .await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(text.contains("wsbridge_jobs_submitted_total 1"), "{text}");
    assert!(text.contains("wsbridge_jobs_live 1"), "{text}");
}

#[tokio::test]
async fn without_a_store_the_preference_is_ignored_and_the_call_answered() {
    let bridge = TestBridge::start(|_| {}).await;
    let _w = bridge.worker(&["orders"], 4, echo_as("w")).await;
    let client = http_client();
    let reply = send(&client, submit(&bridge, "respond-async", Bytes::from("hi"))).await;
    assert_eq!(reply.head.status, 200);
    assert_eq!(reply.body, "hi");
    assert_eq!(reply.header("preference-applied"), "");
    let none = get(
        &client,
        &bridge.at("/_wsbridge/jobs/0123456789abcdef0123456789abcdef"),
    )
    .await;
    assert_eq!(none.head.status, 404);
    assert_eq!(none.error_code(), "job_not_found");
}

/// A callback receiver on loopback that fails its first `fail` posts with
/// 500, then takes them; sends each post's head and body on.
async fn receiver(
    fail: usize,
) -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<(http::request::Parts, Bytes)>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (tx, seen) = (tx.clone(), seen.clone());
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (tx, seen) = (tx.clone(), seen.clone());
                async move {
                    let (head, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let _ = tx.send((head, body));
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    let status = if n < fail { 500 } else { 200 };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::new()))
                            .expect("response"),
                    )
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
            );
        }
    });
    (addr, rx)
}

fn hmac_hex(secret: &[u8], message: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("key");
    mac.update(message);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn a_callback_is_signed_and_sent_again_until_taken() {
    let dir = TempDir::new("jobs");
    let (addr, mut posts) = receiver(2).await;
    let secret = "a-callback-secret-of-some-length";
    let bridge = TestBridge::start(|c| {
        with_jobs(&dir)(c);
        c.jobs.callback_secret = Some(Secret::new(secret));
        c.jobs.callback_allow = vec![format!("http://{addr}/hooks/")];
    })
    .await;
    let _w = bridge.worker(&["orders"], 4, echo_as("w")).await;
    let client = http_client();
    // A URL outside the allowed prefixes is refused before anything is
    // stored, including ones that only look like they are inside.
    for url in [
        "http://169.254.169.254/latest".to_owned(),
        format!("http://{addr}@10.0.0.5/hooks/"),
        format!("https://{addr}/hooks/"),
        format!("http://{addr}/hooksx"),
    ] {
        let req = Request::post(bridge.at("/orders/x"))
            .header("prefer", "respond-async")
            .header("wsbridge-callback", url.as_str())
            .body(Full::new(Bytes::from("x")))
            .expect("request");
        let refused = send(&client, req).await;
        assert_eq!(refused.head.status, 400, "{url}");
        assert_eq!(refused.error_code(), "callback_not_allowed", "{url}");
    }

    let req = Request::post(bridge.at("/orders/x"))
        .header("prefer", "respond-async")
        .header(
            "wsbridge-callback",
            format!("http://{addr}/hooks/job?tag=1"),
        )
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from("the result")))
        .expect("request");
    let accepted = send(&client, req).await;
    assert_eq!(accepted.head.status, 202, "{:?}", accepted.body);
    let id = accepted.json()["id"].as_str().unwrap_or("").to_owned();
    let started = Instant::now();
    let mut last = None;
    for attempt in 1..=3 {
        let (head, body) = within(Duration::from_secs(10), "a callback", posts.recv())
            .await
            .expect("post");
        assert_eq!(
            head.uri.path_and_query().map(|p| p.as_str()),
            Some("/hooks/job?tag=1")
        );
        assert_eq!(body, "the result", "attempt {attempt}");
        let h = |n: &str| {
            head.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        assert_eq!(h("wsbridge-job-id"), id);
        assert_eq!(h("wsbridge-job-state"), "succeeded");
        assert_eq!(h("wsbridge-job-status"), "200");
        assert_eq!(h("content-type"), "text/plain");
        let sig = h("wsbridge-signature");
        let (t, v1) = sig
            .strip_prefix("t=")
            .and_then(|s| s.split_once(",v1="))
            .expect("t=..,v1=..");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let t: u64 = t.parse().expect("t");
        assert!(now.abs_diff(t) < 30, "a current timestamp");
        let message = [format!("{t}.{id}.succeeded.200.").as_bytes(), &body[..]].concat();
        assert_eq!(
            v1,
            hmac_hex(secret.as_bytes(), &message),
            "a valid signature"
        );
        assert_ne!(v1, hmac_hex(b"another secret of some length", &message));
        last = Some(sig);
    }
    assert!(last.is_some());
    // Two failures cost two pauses (0.5 s, 1 s).
    assert!(started.elapsed() >= Duration::from_millis(1400));
    // Taken on the third: not sent again, and the job says so.
    let doc = loop {
        let doc = get(&client, &bridge.at(&format!("/_wsbridge/jobs/{id}")))
            .await
            .json();
        if doc["callback"]["delivered"] == true {
            break doc;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(doc["callback"]["attempts"], 3);
    assert!(
        doc.to_string().find("hooks").is_none(),
        "the URL is not shown"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(2), posts.recv())
            .await
            .is_err(),
        "delivered once it was taken"
    );
}

#[tokio::test]
async fn past_max_live_jobs_a_submission_is_refused_and_nothing_stored() {
    let dir = TempDir::new("jobs");
    let bridge = TestBridge::start(|c| {
        with_jobs(&dir)(c);
        c.jobs.max_live = 2;
    })
    .await;
    let client = http_client();
    for _ in 0..2 {
        let queued = send(&client, submit(&bridge, "respond-async", Bytes::from("x"))).await;
        assert_eq!(queued.head.status, 202, "{:?}", queued.body);
    }
    let refused = send(&client, submit(&bridge, "respond-async", Bytes::from("x"))).await;
    assert_eq!(refused.head.status, 503);
    assert_eq!(refused.error_code(), "jobs_full");
    assert_eq!(refused.header("retry-after"), "1");
    assert!(refused.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("jobs.max_live")));
}

#[tokio::test]
async fn a_large_result_is_spooled_and_replayed_byte_for_byte() {
    let dir = TempDir::new("jobs");
    let bridge = TestBridge::start(with_jobs(&dir)).await;
    let _w = bridge.worker(&["orders"], 4, echo_as("w")).await;
    let client = http_client();
    let body = noise(3 << 20);
    let accepted = send(&client, submit(&bridge, "respond-async", body.clone())).await;
    assert_eq!(accepted.head.status, 202, "{:?}", accepted.body);
    let location = accepted.header("location").to_owned();
    let done = get(&client, &bridge.at(&format!("{location}/result?wait=20"))).await;
    assert_eq!(done.head.status, 200);
    assert_eq!(done.header("content-length"), (3 << 20).to_string());
    assert!(done.body == body, "3 MiB back byte for byte");
    let id = location.rsplit('/').next().unwrap_or_default();
    let spooled = dir.0.join("jobs").join("results").join(id);
    assert!(spooled.is_file(), "a result over 1 MiB is in its own file");
    // DELETE forgets it, file included.
    let req = Request::delete(bridge.at(&location))
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(&client, req).await.head.status, 204);
    assert!(!spooled.exists(), "its file went with it");
}

#[tokio::test]
async fn a_job_deleted_while_its_callback_is_retried_stays_gone() {
    let dir = TempDir::new("jobs");
    let (addr, mut posts) = receiver(usize::MAX).await;
    let bridge = TestBridge::start(|c| {
        with_jobs(&dir)(c);
        c.jobs.callback_secret = Some(Secret::new("a-callback-secret-of-some-length"));
        c.jobs.callback_allow = vec![format!("http://{addr}/")];
    })
    .await;
    let _w = bridge.worker(&["orders"], 4, echo_as("w")).await;
    let client = http_client();
    let req = Request::post(bridge.at("/orders/x"))
        .header("prefer", "respond-async")
        .header("wsbridge-callback", format!("http://{addr}/hook"))
        .body(Full::new(Bytes::from("x")))
        .expect("request");
    let location = send(&client, req).await.header("location").to_owned();
    within(Duration::from_secs(5), "the first callback", posts.recv()).await;
    let req = Request::delete(bridge.at(&location))
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(&client, req).await.head.status, 204);
    // The delivery that was under way records nothing, and stops.
    let next = tokio::time::timeout(Duration::from_secs(3), posts.recv()).await;
    let gone = get(&client, &bridge.at(&location)).await;
    assert_eq!(gone.head.status, 404, "the job came back: {:?}", gone.body);
    assert!(next.is_err(), "no callback for a job that is gone");
}
