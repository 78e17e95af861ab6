//! Who a worker is: the metadata its hello carries (listed by presence at
//! `GET /_wsbridge/workers`, filtered by `meta.*`), the ids a token may
//! claim, and the bridge's own `/_wsbridge/` paths, which never reach a
//! worker.

mod common;

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use wsbridge::{
    body::Body,
    config::{Config, ScopedToken, Secret, WorkerToken},
    protocol::{self, Control, Hello},
    worker::echo_as,
};

/// A worker of `orders` named `id` with `metadata`.
async fn with_meta(bridge: &TestBridge, id: &str, metadata: &[(&str, &str)]) -> TestWorker {
    let mut config = bridge.worker_config(&["orders"], 4);
    config.worker_id = id.to_owned();
    config.metadata = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut worker = TestWorker::start(config, echo_as(id)).await;
    worker.connected().await;
    worker
}

/// The ids in a presence answer, in order.
fn ids(doc: &serde_json::Value) -> Vec<String> {
    doc["workers"]
        .as_array()
        .expect("workers array")
        .iter()
        .map(|w| w["worker_id"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn presence_lists_workers_with_their_metadata_and_filters_by_it() {
    let bridge = TestBridge::start(|_| {}).await;
    let _eu = with_meta(&bridge, "w-eu", &[("region", "eu"), ("user", "42")]).await;
    let _us = with_meta(&bridge, "w-us", &[("region", "us")]).await;
    let _other = bridge.worker(&["billing"], 1, echo_as("w-billing")).await;
    let client = http_client();

    let reply = get(&client, &bridge.at("/_wsbridge/workers?service=orders")).await;
    assert_eq!(reply.head.status, 200, "{:?}", reply.body);
    assert_eq!(reply.header("content-type"), "application/json");
    let doc = reply.json();
    assert_eq!(doc["complete"], true);
    assert_eq!(doc["nodes_missing"], serde_json::json!([]));
    assert_eq!(ids(&doc), ["w-eu", "w-us"]);
    let eu = &doc["workers"][0];
    assert_eq!(eu["service"], "orders");
    assert_eq!(eu["node"], "local");
    assert_eq!(
        eu["metadata"],
        serde_json::json!({"region": "eu", "user": "42"})
    );
    assert_eq!(
        (eu["capacity"].as_u64(), eu["in_flight"].as_u64()),
        (Some(4), Some(0))
    );
    let at = eu["connected_at"].as_str().expect("connected_at");
    assert!(at.ends_with('Z') && at.len() >= 20, "{at}");

    let reply = get(
        &client,
        &bridge.at("/_wsbridge/workers?service=orders&meta.region=eu"),
    )
    .await;
    assert_eq!(ids(&reply.json()), ["w-eu"]);
    let reply = get(
        &client,
        &bridge.at("/_wsbridge/workers?meta.region=eu&meta.user=7"),
    )
    .await;
    assert!(ids(&reply.json()).is_empty());
    // Without a service: every service's workers.
    let reply = get(&client, &bridge.at("/_wsbridge/workers")).await;
    assert_eq!(ids(&reply.json()).len(), 3);

    // The admin listener answers the same.
    let admin = bridge.admin.expect("admin listener");
    let reply = get(
        &client,
        &format!("http://{admin}/_wsbridge/workers?service=orders&meta.region=us"),
    )
    .await;
    assert_eq!(reply.head.status, 200);
    assert_eq!(ids(&reply.json()), ["w-us"]);

    // A parameter it does not know is a clear 400, with the request id.
    let reply = get(&client, &bridge.at("/_wsbridge/workers?servce=orders")).await;
    assert_eq!(reply.head.status, 400);
    assert_eq!(reply.error_code(), "bad_request");
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("servce"));
    assert_eq!(
        reply.json()["error"]["request_id"],
        reply.header("x-request-id")
    );
    bridge.stop().await;
}

#[tokio::test]
async fn paths_under_wsbridge_never_reach_a_worker() {
    // Every path goes to `default` here, yet none of the bridge's own does.
    let bridge = TestBridge::start(|_| {}).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let mut worker = TestWorker::start(
        bridge.worker_config(&["default"], 4),
        move |req: Request<Body>| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                Response::new(req.into_body())
            }
        },
    )
    .await;
    worker.connected().await;
    let client = http_client();
    let reply = post(&client, &bridge.at("/_wsbridge/anything"), "x").await;
    assert_eq!(reply.head.status, 404, "{:?}", reply.body);
    assert_eq!(reply.error_code(), "not_found");
    assert!(reply.json()["error"]["request_id"].is_string());
    let reply = post(&client, &bridge.at("/_wsbridge/workers"), "x").await;
    assert_eq!(reply.head.status, 405);
    assert_eq!(reply.header("allow"), "GET, HEAD");
    // An ordinary path still reaches the worker.
    let reply = post(&client, &bridge.at("/_wsbridgex"), "x").await;
    assert_eq!(reply.head.status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    bridge.stop().await;
}

/// Says `hello` on a fresh connection with `token`; the first frame back.
async fn hello_as(bridge: &TestBridge, token: &str, hello: Hello) -> Control {
    let mut ws = raw_connect(bridge, Some(token), Some(protocol::SUBPROTOCOL))
        .await
        .expect("upgrade");
    let text = protocol::encode_control(&Control::Hello(hello));
    ws.send(Message::text(text)).await.expect("send");
    match with_timeout(ws.next()).await {
        Some(Ok(Message::Text(t))) => protocol::decode_control(&t).expect("control frame"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

fn hello(id: &str, metadata: &[(String, String)]) -> Hello {
    Hello {
        worker_id: id.to_owned(),
        metadata: metadata.iter().cloned().collect(),
        services: vec!["orders".into()],
        max_inflight: 1,
        ..Hello::default()
    }
}

fn refused_code(frame: Control) -> (String, String) {
    match frame {
        Control::Error { code, message, .. } => (code, message),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn metadata_beyond_its_bounds_is_refused_in_the_hello() {
    let bridge = TestBridge::start(|_| {}).await;
    let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let many: Vec<_> = (0..17).map(|i| pair(&format!("k{i}"), "v")).collect();
    let (code, message) = refused_code(hello_as(&bridge, TOKEN, hello("m", &many)).await);
    assert_eq!(code, "bad_hello");
    assert!(message.contains("16"), "{message}");
    let (code, message) =
        refused_code(hello_as(&bridge, TOKEN, hello("m", &[pair("a b", "v")])).await);
    assert_eq!(code, "bad_hello");
    assert!(message.contains("\"a b\""), "{message}");
    let long = "v".repeat(257);
    let (code, _) = refused_code(hello_as(&bridge, TOKEN, hello("m", &[pair("k", &long)])).await);
    assert_eq!(code, "bad_hello");
    // 1 KiB in all, keys and values together.
    let heavy: Vec<_> = (0..5)
        .map(|i| pair(&format!("k{i}"), &"v".repeat(250)))
        .collect();
    let (code, message) = refused_code(hello_as(&bridge, TOKEN, hello("m", &heavy)).await);
    assert_eq!(code, "bad_hello");
    assert!(message.contains("1024"), "{message}");
    // At the bounds it is fine: 16 keys, one value of 256 bytes, 1 KiB.
    let mut full: Vec<_> = (10..25)
        .map(|i| pair(&format!("k{i}"), &"v".repeat(45)))
        .collect();
    full.push(pair("kk", &"v".repeat(256)));
    let total: usize = full.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(total <= 1024 && full.len() == 16, "{total}");
    assert!(matches!(
        hello_as(&bridge, TOKEN, hello("m", &full)).await,
        Control::Welcome(_)
    ));
    bridge.stop().await;
}

#[tokio::test]
async fn a_token_with_an_id_prefix_claims_only_ids_that_start_with_it() {
    let bridge = TestBridge::start(|c| {
        c.workers.tokens.push(WorkerToken::Scoped(ScopedToken {
            token: Secret::new("user-42-token"),
            services: Some(vec!["orders".into()]),
            worker_id_prefix: Some("user-42/".into()),
            metadata: [("user".to_owned(), "42".to_owned())].into(),
        }));
    })
    .await;
    assert!(matches!(
        hello_as(&bridge, "user-42-token", hello("user-42/tab-1", &[])).await,
        Control::Welcome(_)
    ));
    for id in ["user-43/tab-1", "user-42", "user-42/", ""] {
        let (code, message) =
            refused_code(hello_as(&bridge, "user-42-token", hello(id, &[])).await);
        assert_eq!(code, "forbidden_worker_id", "{id:?}");
        assert!(message.contains("user-42/"), "{message}");
    }
    // The token's metadata wins over the hello's: a selector on `user`
    // reaches only this token's workers.
    let _tab = RawWorker::connect_as(
        &bridge,
        "user-42-token",
        hello(
            "user-42/tab-2",
            &[("user".into(), "43".into()), ("tab".into(), "2".into())],
        ),
    )
    .await;
    let doc = get(&http_client(), &bridge.at("/_wsbridge/workers?meta.tab=2"))
        .await
        .json();
    assert_eq!(
        doc["workers"][0]["metadata"],
        serde_json::json!({"tab": "2", "user": "42"})
    );
    // Nor may it serve another service.
    let mut other = hello("user-42/tab-3", &[]);
    other.services = vec!["default".into()];
    let (code, _) = refused_code(hello_as(&bridge, "user-42-token", other).await);
    assert_eq!(code, "forbidden_service");
    // The unrestricted token may claim any id.
    assert!(matches!(
        hello_as(&bridge, TOKEN, hello("user-43/tab-1", &[])).await,
        Control::Welcome(_)
    ));
    bridge.stop().await;
}

#[test]
fn a_scoped_token_with_a_typo_or_a_prefix_without_services_is_refused() {
    let base = |token: &str| {
        format!(
            "[http]\nlisten = \"127.0.0.1:1\"\n[workers]\nlisten = \"127.0.0.1:2\"\ntls = false\ntokens = [{token}]\n"
        )
    };
    // A misspelt key must not leave a token that grants everything.
    let typo = Config::parse(&base(
        r#"{ token = "t", worker_id_prefx = "u/", services = ["a"] }"#,
    ));
    assert!(typo.is_err(), "a typo was accepted");
    let err = Config::parse(&base(r#"{ token = "t", worker_id_prefix = "u/" }"#))
        .expect_err("a prefix without services")
        .to_string();
    assert!(err.contains("services"), "{err}");
    let ok = Config::parse(&base(
        r#"{ token = "t", worker_id_prefix = "u/", services = ["a"], metadata = { user = "1" } }"#,
    ));
    assert!(ok.is_ok(), "{ok:?}");
}
