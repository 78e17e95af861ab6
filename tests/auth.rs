//! The worker handshake: token and subprotocol are checked before any
//! upgrade, and a bad hello is refused with a reason.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::{
    protocol::frame::{
        coding::{CloseCode, Data, OpCode},
        Frame,
    },
    Message,
};
use wsbridge::{
    config::{ScopedToken, Secret, WorkerToken},
    protocol::{self, Control},
};

#[tokio::test]
async fn wrong_or_missing_token_gets_401_before_upgrade() {
    let bridge = TestBridge::start(|_| {}).await;
    let (status, body) =
        refused_status(raw_connect(&bridge, Some("wrong"), Some(protocol::SUBPROTOCOL)).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("unauthorized"), "{body}");
    let (status, _) = refused_status(raw_connect(&bridge, None, Some(protocol::SUBPROTOCOL)).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A prefix of the right token is still wrong.
    let (status, _) =
        refused_status(raw_connect(&bridge, Some(&TOKEN[..4]), Some(protocol::SUBPROTOCOL)).await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    bridge.stop().await;
}

#[tokio::test]
async fn missing_subprotocol_gets_400_with_a_reason() {
    let bridge = TestBridge::start(|_| {}).await;
    let (status, body) = refused_status(raw_connect(&bridge, Some(TOKEN), None).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains(protocol::SUBPROTOCOL), "{body}");
    let (status, _) = refused_status(raw_connect(&bridge, Some(TOKEN), Some("wsbridge.v0")).await);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    bridge.stop().await;
}

#[tokio::test]
async fn any_configured_token_is_accepted() {
    let bridge = TestBridge::start(|c| {
        c.workers
            .tokens
            .insert(0, WorkerToken::Any(Secret::new("other-token")));
    })
    .await;
    let ws = raw_connect(&bridge, Some(TOKEN), Some("chat, wsbridge.v1")).await;
    assert!(
        ws.is_ok(),
        "the second token, offered among other subprotocols, is accepted"
    );
    bridge.stop().await;
}

/// Connects with `token`, says hello for `services`; returns the first
/// frame the bridge answers with.
async fn hello_with(bridge: &TestBridge, token: &str, services: &[&str]) -> Control {
    let mut ws = raw_connect(bridge, Some(token), Some(protocol::SUBPROTOCOL))
        .await
        .expect("upgrade");
    let hello = protocol::Hello {
        worker_id: "scoped".into(),
        metadata: Default::default(),
        services: services.iter().map(|s| s.to_string()).collect(),
        max_inflight: 1,
        flow_control: false,
        accepted: false,
        compression: Vec::new(),
        resumable: false,
        resume: None,
    };
    let hello = protocol::encode_control(&Control::Hello(hello));
    ws.send(Message::text(hello)).await.expect("send");
    match with_timeout(ws.next()).await {
        Some(Ok(Message::Text(t))) => protocol::decode_control(&t).expect("control frame"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

#[tokio::test]
async fn a_scoped_token_registers_only_for_its_services() {
    let bridge = TestBridge::start(|c| {
        c.workers
            .tokens
            .push(ScopedToken::for_services("orders-only", &["orders"]));
    })
    .await;
    assert!(matches!(
        hello_with(&bridge, "orders-only", &["orders"]).await,
        Control::Welcome(_)
    ));
    match hello_with(&bridge, "orders-only", &["orders", "default"]).await {
        Control::Error { code, message, .. } => {
            assert_eq!(code, "forbidden_service");
            assert!(message.contains("default"), "{message}");
        }
        other => panic!("expected forbidden_service, got {other:?}"),
    }
    assert_eq!(bridge.handle.workers("default"), 0);
    // The unscoped token may serve anything.
    assert!(matches!(
        hello_with(&bridge, TOKEN, &["orders", "default"]).await,
        Control::Welcome(_)
    ));
    bridge.stop().await;
}

#[tokio::test]
async fn a_bad_hello_is_refused_with_an_error_frame() {
    let bridge = TestBridge::start(|_| {}).await;
    for hello in [
        r#"{"type":"hello","worker_id":"w","services":[],"max_inflight":1}"#,
        r#"{"type":"hello","worker_id":"w","services":["a"],"max_inflight":0}"#,
        r#"{"type":"drain"}"#,
        "not json",
    ] {
        let mut ws = raw_connect(&bridge, Some(TOKEN), Some(protocol::SUBPROTOCOL))
            .await
            .expect("upgrade");
        ws.send(Message::text(hello)).await.expect("send");
        match with_timeout(ws.next()).await {
            Some(Ok(Message::Text(t))) => match protocol::decode_control(&t) {
                Ok(Control::Error { code, .. }) => assert_eq!(code, "bad_hello", "{hello}"),
                other => panic!("expected error frame for {hello}, got {other:?}"),
            },
            other => panic!("expected error frame for {hello}, got {other:?}"),
        }
        // ...followed by a close.
        loop {
            match with_timeout(ws.next()).await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => continue,
            }
        }
    }
    bridge.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_handshake_timeout() {
    let bridge =
        TestBridge::start(|c| c.workers.handshake_timeout = std::time::Duration::from_millis(200))
            .await;
    let mut ws = raw_connect(&bridge, Some(TOKEN), Some(protocol::SUBPROTOCOL))
        .await
        .expect("upgrade");
    // Upgraded, but never says hello: the bridge must not wait forever.
    let started = std::time::Instant::now();
    let end = with_timeout(ws.next()).await;
    let waited = started.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(5),
        "closed only after {waited:?}"
    );
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    bridge.stop().await;
}

#[tokio::test]
async fn a_ping_before_hello_is_fine() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut ws = raw_connect(&bridge, Some(TOKEN), Some(protocol::SUBPROTOCOL))
        .await
        .expect("upgrade");
    ws.send(Message::Ping("early".into())).await.expect("ping");
    let hello = r#"{"type":"hello","worker_id":"w","services":["default"],"max_inflight":1}"#;
    ws.send(Message::text(hello)).await.expect("hello");
    let mut ponged = false;
    let welcomed = loop {
        match with_timeout(ws.next()).await {
            Some(Ok(Message::Text(t))) => {
                break matches!(protocol::decode_control(&t), Ok(Control::Welcome(_)))
            }
            Some(Ok(Message::Pong(p))) => ponged |= p[..] == b"early"[..],
            other => panic!("expected welcome, got {other:?}"),
        }
    };
    assert!(welcomed);
    assert!(ponged, "the ping before the hello was answered");
    bridge.stop().await;
}

#[tokio::test]
async fn a_hello_that_is_not_utf8_gets_a_1007_close() {
    let bridge = TestBridge::start(|_| {}).await;
    let mut ws = raw_connect(&bridge, Some(TOKEN), Some(protocol::SUBPROTOCOL))
        .await
        .expect("upgrade");
    let text = OpCode::Data(Data::Text);
    let frame = Frame::message(b"{\"type\":\"hello\xff\"}".to_vec(), text, true);
    ws.send(Message::Frame(frame)).await.expect("send");
    let close = loop {
        match with_timeout(ws.next()).await {
            Some(Ok(Message::Close(close))) => break close,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let close = close.expect("a close code");
    assert_eq!(close.code, CloseCode::Invalid, "{}", close.reason);
    bridge.stop().await;
}
