//! A session belongs to the credentials that opened it (PROTOCOL.md 8.5):
//! a `resume` naming someone else's session, dropped or live, with another
//! token or another `worker_id`, is a new session. It inherits no call, and
//! the session's own worker can still come back to it.

mod common;

use common::*;
use http::StatusCode;
use wsbridge::{
    config::ScopedToken,
    protocol::{self, Control, Hello, Resume},
};

/// Service `orders`' own token, and a token for another service.
const TOKEN_A: &str = "token-of-orders";
const TOKEN_B: &str = "token-of-default";

async fn bridge() -> TestBridge {
    TestBridge::start(|c| {
        c.workers
            .tokens
            .push(ScopedToken::for_services(TOKEN_A, &["orders"]));
        c.workers
            .tokens
            .push(ScopedToken::for_services(TOKEN_B, &["default"]));
    })
    .await
}

/// A resumable hello for `services` as `worker_id`, resuming `resume`.
fn hello(worker_id: &str, services: &[&str], resume: Option<Resume>) -> Hello {
    Hello {
        worker_id: worker_id.into(),
        metadata: Default::default(),
        services: services.iter().map(|s| s.to_string()).collect(),
        ..resumable_hello(resume)
    }
}

fn resume(session_id: &str, running: Vec<u64>) -> Option<Resume> {
    Some(Resume {
        session_id: session_id.to_owned(),
        running,
        replied: vec![],
    })
}

/// Worker `a` of `orders` (token A) takes a POST and accepts it.
async fn a_with_a_call(
    bridge: &TestBridge,
) -> (
    RawWorker,
    tokio::task::JoinHandle<Reply>,
    protocol::RequestHead,
) {
    let mut a = RawWorker::connect_as(bridge, TOKEN_A, hello("a", &["orders"], None)).await;
    let call = spawn_post(bridge, "/orders/pay", "x");
    let (req, _) = a.next_request().await;
    a.send_text(&protocol::encode_control(&Control::Accepted { id: req.id }))
        .await;
    (a, call, req)
}

/// A reply from `from` for call `id`, which must not belong to it.
async fn reply_is_refused(from: &mut RawWorker, id: u64) {
    from.reply(id, 200, &[], b"stolen").await;
    match from.next().await {
        Frame::Control(Control::Error { id: got, code, .. }) => {
            assert_eq!((got, code.as_str()), (Some(id), "unknown_call"));
        }
        other => panic!("expected unknown_call, got {other:?}"),
    }
}

#[tokio::test]
async fn a_resume_of_a_dropped_session_with_another_services_token_inherits_nothing() {
    let bridge = bridge().await;
    let (a, call, req) = a_with_a_call(&bridge).await;
    let session_id = a.welcome.session_id.clone();
    drop(a); // the link dies without a close frame: the session waits

    // Same worker_id, same session id, same calls: only the token differs.
    let mut thief = RawWorker::connect_as(
        &bridge,
        TOKEN_B,
        hello("a", &["default"], resume(&session_id, vec![req.id])),
    )
    .await;
    assert!(!thief.welcome.resumed, "another token resumed the session");
    assert_ne!(thief.welcome.session_id, session_id);
    assert!(thief.welcome.resend.is_empty());
    reply_is_refused(&mut thief, req.id).await;
    assert!(
        thief.started.is_empty(),
        "the thief was told to start a call"
    );

    // The session is intact: its own worker comes back and answers.
    let mut back = RawWorker::connect_as(
        &bridge,
        TOKEN_A,
        hello("a", &["orders"], resume(&session_id, vec![req.id])),
    )
    .await;
    assert!(back.welcome.resumed);
    back.reply(req.id, 200, &[], b"paid by a").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"paid by a"[..])
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_resume_with_another_token_does_not_take_over_a_live_session() {
    let bridge = bridge().await;
    let (mut a, call, req) = a_with_a_call(&bridge).await;
    let session_id = a.welcome.session_id.clone();

    let mut thief = RawWorker::connect_as(
        &bridge,
        TOKEN_B,
        hello("a", &["default"], resume(&session_id, vec![req.id])),
    )
    .await;
    assert!(
        !thief.welcome.resumed,
        "another token took the session over"
    );
    reply_is_refused(&mut thief, req.id).await;

    // The live worker was never disconnected: it answers its call...
    a.reply(req.id, 200, &[], b"paid by a").await;
    let r = with_timeout(call).await.expect("join");
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"paid by a"[..])
    );
    // ...and keeps serving.
    let next = spawn_get(&bridge, "/orders/next");
    let (got, _) = a.next_request().await;
    a.reply(got.id, 200, &[], b"still a").await;
    assert_eq!(with_timeout(next).await.expect("join").body, "still a");
    bridge.stop().await;
}

#[tokio::test]
async fn a_resume_with_the_same_token_but_another_worker_id_is_a_new_session() {
    let bridge = bridge().await;
    let (a, call, req) = a_with_a_call(&bridge).await;
    let session_id = a.welcome.session_id.clone();
    drop(a);

    let mut other = RawWorker::connect_as(
        &bridge,
        TOKEN_A,
        hello("b", &["orders"], resume(&session_id, vec![req.id])),
    )
    .await;
    assert!(
        !other.welcome.resumed,
        "another worker_id resumed the session"
    );
    reply_is_refused(&mut other, req.id).await;

    let mut back = RawWorker::connect_as(
        &bridge,
        TOKEN_A,
        hello("a", &["orders"], resume(&session_id, vec![req.id])),
    )
    .await;
    assert!(back.welcome.resumed);
    back.reply(req.id, 200, &[], b"paid by a").await;
    assert_eq!(with_timeout(call).await.expect("join").body, "paid by a");
    bridge.stop().await;
}
