//! Replies survive a reconnect: a resumable worker whose connection drops
//! comes back with its session id, the bridge keeps its calls pending for
//! `resume_window`, and callers never notice.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use http::{Request, Response, StatusCode};
use tokio::sync::{mpsc, Mutex};
use wsbridge::{
    body::Body,
    protocol::{self, Control, Hello, Resume},
    worker::Status,
};

/// A resumable raw worker takes a POST to `path` and accepts it; then its
/// link dies without a close frame. Returns the caller's task, the call,
/// and the session id to resume.
async fn accepted_then_dropped(
    bridge: &TestBridge,
    path: &str,
) -> (
    tokio::task::JoinHandle<Reply>,
    protocol::RequestHead,
    String,
) {
    let mut raw = RawWorker::connect_hello(bridge, resumable_hello(None)).await;
    let session_id = raw.welcome.session_id.clone();
    let call = spawn_post(bridge, path, "x");
    let (req, _) = raw.next_request().await;
    raw.send_text(&protocol::encode_control(&Control::Accepted { id: req.id }))
        .await;
    drop(raw);
    (call, req, session_id)
}

/// The worker of `session_id` comes back holding `running`; the session
/// must resume.
async fn come_back(bridge: &TestBridge, session_id: String, running: Vec<u64>) -> RawWorker {
    let resume = Resume {
        session_id,
        running,
        replied: vec![],
    };
    let back = RawWorker::connect_hello(bridge, resumable_hello(Some(resume))).await;
    assert!(back.welcome.resumed);
    back
}

#[tokio::test]
async fn a_call_survives_its_workers_connection_dropping() {
    let bridge = TestBridge::start(|_| {}).await;
    let proxy = CutProxy::start(bridge.workers).await;
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let (release_tx, release) = mpsc::unbounded_channel::<()>();
    let release = Arc::new(Mutex::new(release));
    let mut cfg = bridge.worker_config(&["default"], 8);
    cfg.url = format!("wss://localhost:{}", proxy.addr.port());
    let mut worker = TestWorker::start(cfg, move |req: Request<Body>| {
        let (started_tx, release) = (started_tx.clone(), release.clone());
        async move {
            let _ = started_tx.send(());
            release.lock().await.recv().await;
            Response::new(Body::from(format!("finished {}", req.uri().path())))
        }
    })
    .await;
    let Status::Connected { session_id: first } = worker.status.borrow().clone() else {
        panic!("connected");
    };

    // A POST: it may not be retried, so only the resume can save it.
    let call = spawn_post(&bridge, "/order", "x");
    with_timeout(started.recv()).await.expect("handler started");
    proxy.cut();
    // The handler finishes while the worker is cut off (or reconnecting);
    // its reply waits in the worker's queue.
    release_tx.send(()).expect("release");
    with_timeout(
        worker
            .status
            .wait_for(|s| matches!(s, Status::Disconnected { .. })),
    )
    .await
    .expect("status");
    worker.connected().await;
    let Status::Connected { session_id: again } = worker.status.borrow().clone() else {
        panic!("connected");
    };
    assert_eq!(again, first, "the same session continues");
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"finished /order"[..])
    );
    assert_eq!(r.header("x-bridge-attempts"), "1");
    // And the resumed connection serves new calls.
    release_tx.send(()).expect("release");
    let r = with_timeout(spawn_get(&bridge, "/next"))
        .await
        .expect("join");
    assert_eq!(r.body, "finished /next");
    assert_eq!(bridge.handle.protocol_violations(), 0);
    bridge.stop().await;
}

#[tokio::test]
async fn on_resume_calls_the_worker_never_saw_are_sent_again_and_running_ones_stand() {
    let bridge = TestBridge::start(|c| c.http.start_gate = true).await;
    let mut raw = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let session_id = raw.welcome.session_id.clone();
    assert!(raw.welcome.resume_window_ms > 0);
    // Two POSTs reach the worker; it accepts the first and "never saw" the
    // second (as if it was still in a socket buffer when the link died).
    let running = spawn_post(&bridge, "/running", "a");
    let (a, _) = raw.next_request().await;
    let unseen = spawn_post(&bridge, "/unseen", "b");
    let (b, _) = raw.next_request().await;
    raw.send_text(&protocol::encode_control(&Control::Accepted { id: a.id }))
        .await;
    // The link dies without a close frame.
    drop(raw);

    let resume = Resume {
        session_id: session_id.clone(),
        running: vec![a.id],
        replied: vec![],
    };
    let mut back = RawWorker::connect_hello(&bridge, resumable_hello(Some(resume))).await;
    assert!(back.welcome.resumed);
    assert_eq!(back.welcome.session_id, session_id);
    // The unseen call is sent again (a new id on this connection)...
    let (again, body) = back.next_request().await;
    assert_eq!((again.path.as_str(), &body[..]), ("/unseen", &b"b"[..]));
    assert_ne!(again.id, b.id);
    back.reply(again.id, 200, &[], b"second try").await;
    // ...and the running one's reply, sent on the new connection, arrives.
    back.reply(a.id, 201, &[], b"done while away").await;
    let r = with_timeout(running).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::CREATED, &b"done while away"[..])
    );
    assert_eq!(r.header("x-bridge-attempts"), "1");
    let r = with_timeout(unseen).await.expect("join");
    assert_eq!(r.body, "second try");
    assert_eq!(r.header("x-bridge-attempts"), "2");
    bridge.stop().await;
}

#[tokio::test]
async fn a_reply_lost_with_the_connection_is_asked_for_again() {
    let bridge = TestBridge::start(|_| {}).await;
    // The worker wrote its reply, but the link was already dead: it never
    // arrived. The worker says so when it comes back...
    let (call, req, session_id) = accepted_then_dropped(&bridge, "/paid").await;
    let resume = Resume {
        session_id,
        running: vec![],
        replied: vec![req.id, 424_242],
    };
    let mut back = RawWorker::connect_hello(&bridge, resumable_hello(Some(resume))).await;
    // ...and the bridge asks for exactly the replies it is still waiting for.
    assert!(back.welcome.resumed);
    assert_eq!(back.welcome.resend, vec![req.id]);
    back.reply(req.id, 200, &[], b"charged once").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.body, "charged once");
    assert_eq!(r.header("x-bridge-attempts"), "1");
    bridge.stop().await;
}

#[tokio::test]
async fn a_resumed_worker_that_drains_still_finishes_its_resumed_calls() {
    let bridge = TestBridge::start(|_| {}).await;
    let (call, req, session_id) = accepted_then_dropped(&bridge, "/long").await;
    let mut back = come_back(&bridge, session_id, vec![req.id]).await;
    // Shutting down: the call carried over is still in flight, so the
    // bridge must not close the connection yet.
    back.send_text(&protocol::encode_control(&Control::Drain))
        .await;
    with_timeout(async {
        while bridge.handle.accepting("default") > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    back.reply(req.id, 200, &[], b"finished").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"finished"[..])
    );
    // Now it is drained.
    assert!(matches!(back.next().await, Frame::Closed));
    bridge.stop().await;
}

#[tokio::test]
async fn a_worker_that_does_not_come_back_in_time_loses_its_calls() {
    let window = Duration::from_millis(300);
    let bridge = TestBridge::start(|c| c.workers.resume_window = window).await;
    let mut raw = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let call = spawn_post(&bridge, "/lost", "x");
    let (req, _) = raw.next_request().await;
    raw.send_text(&protocol::encode_control(&Control::Accepted { id: req.id }))
        .await;
    let dropped = tokio::time::Instant::now();
    drop(raw);
    let r = with_timeout(call).await.expect("join");
    assert!(
        dropped.elapsed() >= window,
        "failed before the window ended"
    );
    assert_eq!(r.error_code(), "worker_lost");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not resumed")),
        "{}",
        r.json()
    );
    // A late resume is a new session.
    let resume = Resume {
        session_id: "gone".into(),
        running: vec![req.id],
        replied: vec![],
    };
    let back = RawWorker::connect_hello(&bridge, resumable_hello(Some(resume))).await;
    assert!(!back.welcome.resumed);
    bridge.stop().await;
}

#[tokio::test]
async fn a_clean_close_is_not_resumed() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut raw = RawWorker::connect_hello(&bridge, resumable_hello(None)).await;
    let call = spawn_post(&bridge, "/closing", "x");
    let (req, _) = raw.next_request().await;
    raw.send_text(&protocol::encode_control(&Control::Accepted { id: req.id }))
        .await;
    let started = tokio::time::Instant::now();
    with_timeout(raw.ws.close(None)).await.expect("close");
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.error_code(), "worker_lost");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a clean close fails calls at once, not after resume_window"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn on_resume_an_unlisted_call_of_a_worker_without_accepted_is_not_sent_again() {
    // A worker that does not send `accepted` (e.g. `--no-start-gate`) may
    // have run a call it no longer lists (a streamed reply cut with the
    // link, a reply pushed out of its replay ring): "not listed" proves
    // nothing, so a POST fails rather than run a second time.
    let bridge = TestBridge::start(|_| {}).await;
    let hello = Hello {
        accepted: false,
        ..resumable_hello(None)
    };
    let mut raw = RawWorker::connect_hello(&bridge, hello.clone()).await;
    let session_id = raw.welcome.session_id.clone();
    let call = spawn_post(&bridge, "/order", "x");
    let (req, _) = raw.next_request().await;
    drop(raw);
    let resume = Resume {
        session_id,
        running: vec![],
        replied: vec![],
    };
    let mut back = RawWorker::connect_hello(
        &bridge,
        Hello {
            resume: Some(resume),
            ..hello
        },
    )
    .await;
    assert!(back.welcome.resumed);
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, r.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, "worker_lost")
    );
    assert_eq!(r.header("x-bridge-attempts"), "1");
    // The POST never came back to the worker: the next request it sees is
    // a new call.
    let next = spawn_get(&bridge, "/next");
    let (got, _) = back.next_request().await;
    assert_eq!(got.path, "/next");
    assert_ne!(got.request_id, req.request_id);
    back.reply(got.id, 200, &[], b"ok").await;
    with_timeout(next).await.expect("join");
    bridge.stop().await;
}

#[tokio::test]
async fn a_call_that_ended_while_its_worker_was_away_is_cancelled_on_resume() {
    // The caller's timeout passes while the worker is away; the `cancel`
    // went down with the old connection, so the resume brings one.
    let bridge = TestBridge::start(|c| {
        c.http.request_timeout = Duration::from_millis(300);
        c.workers.resume_window = Duration::from_secs(30);
    })
    .await;
    let (call, req, session_id) = accepted_then_dropped(&bridge, "/slow").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(r.error_code(), "timeout");
    let mut back = come_back(&bridge, session_id, vec![req.id]).await;
    match back.next().await {
        Frame::Control(Control::Cancel { id, reason }) => {
            assert_eq!((id, reason.as_str()), (req.id, "gone"));
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    assert!(back.started.is_empty(), "no start for a call that ended");
    bridge.stop().await;
}
