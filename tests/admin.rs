//! The admin listener: `/metrics` parses as Prometheus text and counts what
//! really happened, `/status` and `wsbridge status` show the workers and
//! services, and hot reload (SIGHUP, `wsbridge reload`) changes routes,
//! tokens and certificates without dropping a connection or a call, while
//! an invalid file changes nothing.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use prometheus_parse::{Scrape, Value};
use tokio::sync::Semaphore;
use wsbridge::{body::Body, tls::SelfSigned, worker::Status as WorkerState};

/// The route the process-level tests add: `/orders` -> `orders`.
const ORDERS_ROUTE: &str = "[[routes]]\nprefix = \"/orders\"\nservice = \"orders\"";

/// Scrapes `/metrics` and parses it with a Prometheus text parser.
async fn scrape(bridge: &TestBridge) -> Scrape {
    let admin = bridge.admin.expect("admin listener");
    let reply = get(&http_client(), &format!("http://{admin}/metrics")).await;
    assert_eq!(reply.head.status, 200);
    assert_eq!(
        reply.header("content-type"),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = String::from_utf8(reply.body.to_vec()).expect("utf-8");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            line.starts_with("wsbridge_"),
            "every metric is prefixed: {line}"
        );
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition")
}

/// The value of `metric` with exactly these labels (0 when absent).
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: HashMap<&str, &str> = labels.iter().copied().collect();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .find(|s| wanted.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map_or(0.0, |s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_parse_and_count_calls_codes_bytes_and_workers() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_millis(50)).await;
    let _worker = TestWorker::start(bridge.worker_config(&["orders"], 8), echo).await;
    let client = http_client();
    let mut sent = 0;
    for i in 0..5 {
        let body = "x".repeat(10 * (i + 1));
        sent += body.len();
        assert_eq!(
            post(&client, &bridge.at("/orders/1"), body)
                .await
                .head
                .status,
            200
        );
    }
    // No worker for the default service: 503 no_worker, twice.
    for _ in 0..2 {
        let reply = post(&client, &bridge.at("/elsewhere"), "y").await;
        assert_eq!(reply.error_code(), "no_worker");
    }
    let m = scrape(&bridge).await;
    let orders = [("service", "orders")];
    assert_eq!(
        value(
            &m,
            "wsbridge_requests_total",
            &[("service", "orders"), ("code", "200")]
        ),
        5.0
    );
    assert_eq!(
        value(
            &m,
            "wsbridge_requests_total",
            &[("service", "default"), ("code", "503")]
        ),
        2.0
    );
    assert_eq!(value(&m, "wsbridge_request_duration_seconds", &orders), 5.0);
    assert_eq!(
        value(&m, "wsbridge_request_bytes_total", &orders),
        sent as f64
    );
    assert_eq!(
        value(&m, "wsbridge_response_bytes_total", &orders),
        sent as f64,
        "echoed"
    );
    assert_eq!(value(&m, "wsbridge_workers_connected", &orders), 1.0);
    assert_eq!(value(&m, "wsbridge_worker_connects_total", &[]), 1.0);
    assert_eq!(value(&m, "wsbridge_worker_disconnects_total", &[]), 0.0);
    assert_eq!(value(&m, "wsbridge_requests_in_flight", &orders), 0.0);
    assert_eq!(value(&m, "wsbridge_protocol_violations_total", &[]), 0.0);
    // The histogram's buckets are cumulative and end with +Inf = count.
    let histogram = m
        .samples
        .iter()
        .find(|s| {
            s.metric == "wsbridge_request_duration_seconds"
                && s.labels.get("service") == Some("orders")
        })
        .expect("latency histogram for orders");
    let Value::Histogram(buckets) = &histogram.value else {
        panic!("not a histogram: {histogram:?}");
    };
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
    assert_eq!(buckets.last().map(|b| b.less_than), Some(f64::INFINITY));
}

#[tokio::test]
async fn in_flight_and_queue_depth_follow_a_held_call() {
    let bridge = TestBridge::start(|_| {}).await;
    // Connected for a service no route leads to: counted all the same.
    let _idle = RawWorker::connect(&bridge, &["held"], 1).await;
    let mut dflt = RawWorker::connect(&bridge, &["default"], 1).await;
    let first = spawn_get(&bridge, "/a");
    let (req, _) = dflt.next_request().await;
    // A second call waits: the only default worker is full.
    let second = spawn_get(&bridge, "/b");
    bridge.until_queued("default", 1).await;
    let m = scrape(&bridge).await;
    let dflt_label = [("service", "default")];
    assert_eq!(value(&m, "wsbridge_requests_in_flight", &dflt_label), 2.0);
    assert_eq!(value(&m, "wsbridge_queue_depth", &dflt_label), 1.0);
    assert_eq!(value(&m, "wsbridge_worker_calls_pending", &[]), 1.0);
    assert_eq!(
        value(&m, "wsbridge_workers_connected", &[("service", "held")]),
        1.0
    );
    let status = admin_status(bridge.admin.expect("admin")).await;
    let worker = status
        .workers
        .iter()
        .find(|w| w.services == ["default"])
        .expect("the default worker in /status");
    assert_eq!((worker.in_flight, worker.max_inflight), (1, 1));
    assert_eq!(status.in_flight, 2);

    dflt.reply(req.id, 200, &[], b"one").await;
    assert_eq!(with_timeout(first).await.expect("join").head.status, 200);
    let (req, _) = dflt.next_request().await;
    dflt.reply(req.id, 201, &[], b"two").await;
    assert_eq!(with_timeout(second).await.expect("join").head.status, 201);
    bridge.until_idle().await;
    let m = scrape(&bridge).await;
    assert_eq!(value(&m, "wsbridge_requests_in_flight", &dflt_label), 0.0);
    assert_eq!(value(&m, "wsbridge_queue_depth", &dflt_label), 0.0);
    assert_eq!(
        value(
            &m,
            "wsbridge_requests_total",
            &[("service", "default"), ("code", "201")]
        ),
        1.0
    );
}

/// Echoes the request body.
async fn echo(req: Request<Body>) -> Response<Body> {
    Response::new(req.into_body())
}

#[tokio::test]
async fn status_shows_workers_with_served_errors_and_rtt() {
    // Frequent pings, so the round trip is measured quickly.
    let bridge = TestBridge::start(|c| c.workers.ping_interval = Duration::from_millis(100)).await;
    let mut cfg = bridge.worker_config(&["orders", "default"], 4);
    cfg.worker_id = "status-test".into();
    let _worker = TestWorker::start(cfg, |req: Request<Body>| async move {
        let fail = req.uri().path().ends_with("/fail");
        let mut resp = Response::new(Body::full(Bytes::from_static(b"ok")));
        if fail {
            *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        }
        resp
    })
    .await;
    let client = http_client();
    for path in ["/orders/1", "/orders/2", "/orders/fail", "/x"] {
        send(
            &client,
            Request::get(bridge.at(path))
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await;
    }
    let admin = bridge.admin.expect("admin");
    let status = until_status(admin, "a measured ping round trip", |s| {
        s.workers.iter().any(|w| w.rtt_ms.is_some())
    })
    .await;
    let [w] = status.workers.as_slice() else {
        panic!("one worker expected: {:#?}", status.workers);
    };
    assert_eq!(w.id, "status-test");
    assert_eq!(w.services, ["default", "orders"]);
    assert_eq!(w.state, "ready");
    assert_eq!((w.served, w.errors), (4, 1));
    assert!(w.address.starts_with("127.0.0.1:"), "{}", w.address);
    let rtt = w.rtt_ms.unwrap_or_default();
    assert!(rtt > 0.0 && rtt < 1000.0, "loopback rtt {rtt} ms");
    let orders = status
        .services
        .iter()
        .find(|s| s.name == "orders")
        .expect("orders service");
    assert_eq!((orders.workers, orders.requests, orders.errors), (1, 3, 1));
    assert!(orders.rps > 0.0);
    let (p50, p99) = (orders.p50_ms.unwrap_or(-1.0), orders.p99_ms.unwrap_or(-1.0));
    assert!(p50 > 0.0 && p99 >= p50, "p50 {p50} p99 {p99}");
    assert_eq!(status.requests, 4);
    assert_eq!(status.worker_connects, 1);
}

#[tokio::test]
async fn admin_errors_are_json_and_allow_from_is_enforced() {
    let bridge =
        TestBridge::start(|c| c.admin.allow_from = vec!["10.0.0.0/8".parse().expect("net")]).await;
    let admin = bridge.admin.expect("admin");
    let client = http_client();
    let reply = get(&client, &format!("http://{admin}/status")).await;
    assert_eq!(reply.head.status, 403);
    assert_eq!(reply.json()["error"], "forbidden");

    let bridge = TestBridge::start(|_| {}).await;
    let admin = bridge.admin.expect("admin");
    let reply = get(&client, &format!("http://{admin}/nope")).await;
    assert_eq!(reply.head.status, 404);
    assert_eq!(reply.json()["error"], "not_found");
    let reply = get(&client, &format!("http://{admin}/reload")).await;
    assert_eq!(reply.head.status, 405, "reload needs POST");
    // Without the admin header (what a cross-origin page could send): refused.
    let reply = post(&client, &format!("http://{admin}/reload"), "").await;
    assert_eq!(reply.head.status, 403);
    assert_eq!(reply.json()["error"], "missing_admin_header");
    // An in-process bridge has no file to reload from.
    let req = Request::post(format!("http://{admin}/reload"))
        .header("x-wsbridge-admin", "1")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let reply = send(&client, req).await;
    assert_eq!(reply.head.status, 422);
    assert_eq!(reply.json()["error"], "no_config_file");
    let reply = get(&client, &format!("http://{admin}/")).await;
    assert_eq!(reply.head.status, 200);
    assert!(reply.header("content-type").starts_with("text/html"));
}

#[tokio::test]
async fn disabled_admin_binds_nothing() {
    let bridge = TestBridge::start(|c| c.admin.enabled = false).await;
    assert!(bridge.admin.is_none());
}

/// Runs the `wsbridge` binary with `args`; returns (success, stdout, stderr).
async fn cli(args: &[&str]) -> (bool, String, String) {
    let out = with_timeout(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbridge"))
            .args(args)
            .output(),
    )
    .await
    .expect("run wsbridge");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn wsbridge_status_prints_the_worker_and_service_tables() {
    let bridge = BridgeProcess::start_with("", ORDERS_ROUTE).await;
    let mut cfg = bridge.worker_config(&["orders"], 3);
    cfg.worker_id = "table-worker".into();
    let _worker = TestWorker::start(cfg, echo).await;
    let reply = post(
        &http_client(),
        &format!("http://{}/orders/1", bridge.http),
        "hi",
    )
    .await;
    assert_eq!(reply.body, "hi");
    let url = format!("http://{}", bridge.admin);
    let (ok, out, err) = cli(&["status", "--admin", &url]).await;
    assert!(ok, "wsbridge status failed: {err}");
    println!("{out}");
    let service = out
        .lines()
        .find(|l| l.starts_with("orders "))
        .unwrap_or_else(|| panic!("no orders row in:\n{out}"));
    let cells: Vec<&str> = service.split_whitespace().collect();
    assert_eq!(cells[1], "1/1", "workers column: {service}");
    assert_eq!(cells[7], "1", "calls column: {service}");
    let worker = out
        .lines()
        .find(|l| l.starts_with("table-worker "))
        .unwrap_or_else(|| panic!("no worker row in:\n{out}"));
    assert!(worker.contains(" ready "), "{worker}");
    assert!(worker.contains(" 0/3 "), "{worker}");

    let (ok, json, _) = cli(&["status", "--admin", &url, "--json"]).await;
    assert!(ok);
    let status: wsbridge::bridge::status::Status = serde_json::from_str(&json).expect("json");
    assert_eq!(status.workers.len(), 1);

    let (ok, _, err) = cli(&["status", "--admin", "http://127.0.0.1:1"]).await;
    assert!(!ok);
    assert!(err.contains("cannot reach the admin listener"), "{err}");
}

/// A handler that holds each call until `release` gets a permit for it.
fn held(release: Arc<Semaphore>) -> impl wsbridge::worker::Handler {
    move |req: Request<Body>| {
        let release = release.clone();
        async move {
            if let Ok(permit) = release.acquire().await {
                permit.forget();
            }
            Response::new(req.into_body())
        }
    }
}

#[tokio::test]
async fn reload_swaps_routes_tokens_and_certificates_without_dropping_anything() {
    let bridge = BridgeProcess::start_with("", ORDERS_ROUTE).await;
    let release = Arc::new(Semaphore::new(0));
    let mut worker =
        TestWorker::start(bridge.worker_config(&["orders"], 8), held(release.clone())).await;
    let client = http_client();
    let url = |path: &str| format!("http://{}{path}", bridge.http);

    // A call in flight across the reload.
    let c = client.clone();
    let in_flight = tokio::spawn({
        let u = url("/orders/held");
        async move { post(&c, &u, "kept").await }
    });
    until_status(bridge.admin, "the held call", |s| s.pending == 1).await;

    // New route, new token, a new certificate in the same files.
    let original = std::fs::read_to_string(&bridge.config_path).expect("read config");
    let new_config = original.replace(
        "tokens = [\"test-token\"]",
        "tokens = [\"test-token\", \"second-token\"]",
    ) + "\n[[routes]]\nprefix = \"/billing\"\nservice = \"orders\"\n";
    assert_ne!(new_config, original);
    let cert = SelfSigned::generate(&["localhost".into()]).expect("cert");
    let key_path = bridge.cert_path.with_file_name("server.key");
    cert.write(&bridge.cert_path, &key_path)
        .expect("write cert");
    std::fs::write(&bridge.config_path, &new_config).expect("write config");

    let admin = format!("http://{}", bridge.admin);
    let (ok, out, err) = cli(&["reload", "--admin", &admin]).await;
    assert!(ok, "reload failed: {out} {err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("reload JSON");
    let changed = report["changed"].to_string();
    assert!(
        changed.contains("routes") && changed.contains("workers.tokens"),
        "{report}"
    );

    // The held call still completes, on the same connection.
    release.add_permits(1);
    let reply = with_timeout(in_flight).await.expect("join");
    assert_eq!(
        (reply.head.status.as_u16(), &reply.body[..]),
        (200, &b"kept"[..])
    );
    let status = bridge.status().await;
    assert_eq!(status.reloads, 1);
    assert_eq!(status.worker_connects, 1, "no worker reconnected");
    assert!(matches!(
        *worker.status.borrow(),
        WorkerState::Connected { .. }
    ));

    // The new route works; release its call as soon as the worker has it.
    let c = client.clone();
    let billing = tokio::spawn({
        let u = url("/billing/7");
        async move { post(&c, &u, "new route").await }
    });
    until_status(bridge.admin, "the /billing call at the worker", |s| {
        s.pending == 1
    })
    .await;
    release.add_permits(1);
    let reply = with_timeout(billing).await.expect("join");
    assert_eq!(reply.body, "new route");

    // A new worker with the new token, trusting only the new certificate.
    let mut cfg = bridge.worker_config(&["orders"], 1);
    cfg.token = wsbridge::config::Secret::new("second-token");
    cfg.tls = Some(cert.client_config().expect("trust the new cert"));
    cfg.worker_id = "after-reload".into();
    let _second = TestWorker::start(cfg, echo).await;
    let status = bridge.status().await;
    assert!(status.workers.iter().any(|w| w.id == "after-reload"));
    assert_eq!(status.workers.len(), 2);
    worker.connected().await;
}

#[tokio::test]
async fn an_invalid_config_is_rejected_and_the_old_one_stays() {
    let bridge = BridgeProcess::start_with("", ORDERS_ROUTE).await;
    let _worker = TestWorker::start(bridge.worker_config(&["orders"], 8), echo).await;
    let original = std::fs::read_to_string(&bridge.config_path).expect("read config");
    let admin = format!("http://{}", bridge.admin);
    let client = http_client();

    // Broken TOML via `wsbridge reload`: a clear error naming the problem.
    std::fs::write(
        &bridge.config_path,
        original.replace("[[routes]]", "[[routes"),
    )
    .expect("write");
    let (ok, _, err) = cli(&["reload", "--admin", &admin]).await;
    assert!(!ok, "a broken file must be rejected");
    assert!(err.contains("invalid_config"), "{err}");

    // Valid TOML that fails validation, via SIGHUP.
    std::fs::write(
        &bridge.config_path,
        original.replace("prefix = \"/orders\"", "prefix = \"orders\""),
    )
    .expect("write");
    bridge.signal("HUP");
    until_status(bridge.admin, "the SIGHUP reload to be rejected", |s| {
        s.reload_failures == 2
    })
    .await;
    // A listener change needs a restart: applied as a reload, but kept.
    let moved = original.replace(
        "[admin]\n            listen = \"127.0.0.1:0\"",
        "[admin]\n            listen = \"127.0.0.1:1\"",
    );
    assert_ne!(
        moved, original,
        "the admin section is where the test expects it"
    );
    std::fs::write(&bridge.config_path, &moved).expect("write");
    let (ok, out, err) = cli(&["reload", "--admin", &admin]).await;
    assert!(ok, "{err}");
    assert!(out.contains("\"needs_restart\":[\"admin\"]"), "{out}");

    // Only the last, valid reload counted; the routes still work.
    let status = bridge.status().await;
    assert_eq!(
        (status.reloads, status.reload_failures),
        (1, 2),
        "the two invalid files changed nothing"
    );
    let reply = post(
        &client,
        &format!("http://{}/orders/1", bridge.http),
        "still",
    )
    .await;
    assert_eq!(reply.body, "still");
}

#[tokio::test]
async fn a_reload_cannot_turn_the_worker_listeners_tls_off() {
    let bridge = BridgeProcess::start_with("", ORDERS_ROUTE).await;
    let original = std::fs::read_to_string(&bridge.config_path).expect("read config");
    // TLS off and the certificate lines gone: what a careless edit looks like.
    let plain: String = original
        .lines()
        .filter(|l| !l.trim_start().starts_with("tls_") && !l.contains("auto_self_signed"))
        .map(|l| {
            if l.trim() == "[workers]" {
                format!("{l}\ntls = false")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        plain.contains("tls = false") && !plain.contains("tls_cert"),
        "{plain}"
    );
    std::fs::write(&bridge.config_path, plain).expect("write");
    let (ok, out, err) = cli(&["reload", "--admin", &format!("http://{}", bridge.admin)]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("workers.tls"),
        "reported as needing a restart: {out}"
    );
    // New worker connections still get TLS with the same certificate.
    let worker = TestWorker::start(bridge.worker_config(&["orders"], 1), echo).await;
    let reply = post(
        &http_client(),
        &format!("http://{}/orders/1", bridge.http),
        "tls",
    )
    .await;
    assert_eq!(reply.body, "tls");
    drop(worker);
}

#[tokio::test]
async fn a_caller_that_hangs_up_before_the_reply_is_counted_as_499() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect(&bridge, &["default"], 1).await;
    let call = spawn_get(&bridge, "/slow");
    let (req, _) = raw.next_request().await;
    // The caller gives up while the worker still holds the call.
    call.abort();
    match raw.next().await {
        Frame::Control(wsbridge::protocol::Control::Cancel { id, reason }) => {
            assert_eq!((id, reason.as_str()), (req.id, "client_gone"));
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    // The cancel is sent while the call is dropped, so it is counted by now.
    let m = scrape(&bridge).await;
    let gone = [("service", "default"), ("code", "499")];
    assert_eq!(value(&m, "wsbridge_requests_total", &gone), 1.0);
    assert_eq!(
        value(&m, "wsbridge_requests_in_flight", &[("service", "default")]),
        0.0
    );
}

/// `wsbridge_runtime_tasks` counts the tasks worker connections spawn and
/// falls back once they are gone: the figure `scripts/soak` watches for
/// leaked work under churn.
#[tokio::test]
async fn runtime_tasks_rise_with_worker_connections_and_fall_back() {
    const WORKERS: usize = 16;
    let bridge = TestBridge::start(|_| {}).await;
    let tasks = |m: &Scrape| value(m, "wsbridge_runtime_tasks", &[]);
    let before = tasks(&scrape(&bridge).await);
    assert!(before > 0.0, "the gauge is exposed: {before}");
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        workers.push(RawWorker::connect(&bridge, &["default"], 1).await);
    }
    let during = tasks(&scrape(&bridge).await);
    assert!(
        during >= before + WORKERS as f64,
        "{WORKERS} connections add at least a task each: {before} -> {during}"
    );
    drop(workers);
    // Each scrape has its own connection's tasks, hence the small slack.
    with_timeout(async {
        while tasks(&scrape(&bridge).await) > before + 4.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
