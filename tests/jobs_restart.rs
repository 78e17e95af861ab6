//! A bridge killed with SIGKILL after it answered 202, before the worker
//! answered: restarted on the same store, every job ends in a definite
//! state. An idempotent job that was running runs again and succeeds; a
//! POST that was running fails with `worker_lost` (it may have run, and
//! is never run twice); a job still queued for a worker runs when that
//! worker connects.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use tokio::sync::mpsc;
use wsbridge::{body::Body, worker::echo};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Answers each path's first call never (it hangs, telling `started`),
/// and echoes the later ones.
fn first_call_hangs(started: mpsc::UnboundedSender<String>) -> impl wsbridge::worker::Handler {
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    move |req: Request<Body>| {
        let path = req.uri().path().to_owned();
        let n = {
            let mut seen = seen.lock().expect("lock");
            let n = seen.entry(path.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let _ = started.send(path);
        async move {
            if n == 1 {
                std::future::pending::<()>().await;
            }
            echo(req).await
        }
    }
}

fn job(client_url: String, method: &str, path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("{client_url}{path}"))
        .header("prefer", "respond-async")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

#[tokio::test]
async fn a_bridge_killed_after_202_ends_every_job_in_a_definite_state() {
    let dir = TempDir::new("jobs-restart");
    let cert = dir.0.join("server.crt");
    let (http, workers, admin) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"
        default_service = "default"
        [http]
        listen = "127.0.0.1:{http}"
        [admin]
        listen = "127.0.0.1:{admin}"
        [workers]
        listen = "127.0.0.1:{workers}"
        tls_cert = "{}"
        tls_key = "{}"
        auto_self_signed = true
        tokens = ["{TOKEN}"]
        [[routes]]
        prefix = "/orders"
        service = "orders"
        [jobs]
        dir = "{}"
        "#,
        cert.display(),
        dir.0.join("server.key").display(),
        dir.0.join("jobs").display(),
    );
    let config_path = dir.0.join("wsbridge.toml");
    std::fs::write(&config_path, config).expect("config");
    let mut bridge = BridgeProcess::with_config(&config_path, &cert).await;
    let base = format!("http://127.0.0.1:{http}");
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let _worker = TestWorker::start(
        bridge.worker_config(&["orders"], 8),
        first_call_hangs(started_tx),
    )
    .await;
    let client = http_client();
    let put = send(&client, job(base.clone(), "PUT", "/orders/put", "put body")).await;
    let post = send(
        &client,
        job(base.clone(), "POST", "/orders/post", "post body"),
    )
    .await;
    let for_late = {
        let mut req = job(base.clone(), "POST", "/orders/late", "late body");
        req.headers_mut()
            .insert("wsbridge-worker", http::HeaderValue::from_static("late-1"));
        send(&client, req).await
    };
    for r in [&put, &post, &for_late] {
        assert_eq!(r.head.status, 202, "{:?}", r.body);
    }
    let mut running = vec![
        with_timeout(started.recv()).await.expect("started"),
        with_timeout(started.recv()).await.expect("started"),
    ];
    running.sort();
    assert_eq!(running, ["/orders/post", "/orders/put"]);
    // Both are stored as running once a worker has them.
    let location = |r: &Reply| format!("{base}{}", r.header("location"));
    for r in [&put, &post] {
        let doc = get(&client, &location(r)).await.json();
        assert_eq!(doc["state"], "running", "{doc}");
    }

    bridge.kill().await;
    let _ = bridge.wait().await;
    let bridge = BridgeProcess::with_config(&config_path, &cert).await;

    // The PUT runs again (idempotent) and succeeds.
    let client = http_client();
    let done = get(&client, &format!("{}/result?wait=20", location(&put))).await;
    assert_eq!(done.head.status, 200, "{:?}", done.body);
    assert_eq!(done.body, "put body");
    let doc = get(&client, &location(&put)).await.json();
    assert_eq!(doc["state"], "succeeded");
    assert_eq!(doc["attempts"], 2, "{doc}");
    // The POST had started: it is not run again.
    let lost = get(&client, &format!("{}/result", location(&post))).await;
    assert_eq!(lost.head.status, 502, "{:?}", lost.body);
    assert_eq!(lost.error_code(), "worker_lost");
    assert_eq!(lost.header("wsbridge-job-state"), "failed");
    // The queued one waits for its worker, then runs.
    let queued = get(&client, &location(&for_late)).await.json();
    assert_eq!(queued["state"], "queued", "{queued}");
    let mut late_config = bridge.worker_config(&["orders"], 1);
    late_config.worker_id = "late-1".into();
    let _late = TestWorker::start(late_config, |req: Request<Body>| async move {
        let resp: Response<Body> = echo(req).await;
        resp
    })
    .await;
    let done = get(&client, &format!("{}/result?wait=20", location(&for_late))).await;
    assert_eq!(done.head.status, 200, "{:?}", done.body);
    assert_eq!(done.body, "late body");
    // Only the hung first calls and these ran: the POST ran once.
    assert_eq!(started.try_recv().ok().as_deref(), Some("/orders/put"));
    assert!(started.try_recv().is_err(), "the POST was not sent again");
}
