//! `[[ingress.redis]]`: what a PHP app publishes on a Redis channel
//! (`$redis->publish("news", $msg)`) reaches every matching worker once,
//! in order, as a push; a channel with a selector reaches only the
//! matching workers; a Redis restart is survived. A real `redis-server`.

mod common;

use common::*;
use http::{Request, Response};
use tokio::sync::mpsc;
use wsbridge::{body::Body, config::RedisIngress, config::Secret};

/// A worker of `orders` named `id` in `region` that reports each message
/// it gets as `(id, channel header, body)`.
async fn listener(
    bridge: &TestBridge,
    id: &'static str,
    region: &str,
    tx: mpsc::UnboundedSender<(&'static str, String, String)>,
) -> TestWorker {
    let mut config = bridge.worker_config(&["orders"], 4);
    config.worker_id = id.to_owned();
    config.metadata = [("region".to_owned(), region.to_owned())].into();
    let handler = move |req: Request<Body>| {
        let tx = tx.clone();
        async move {
            let channel = req
                .headers()
                .get("x-redis-channel")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = req.into_body().collect(1 << 20).await.unwrap_or_default();
            let _ = tx.send((id, channel, String::from_utf8_lossy(&body).into_owned()));
            Response::new(Body::full("seen"))
        }
    };
    let mut w = TestWorker::start(config, handler).await;
    w.connected().await;
    w
}

fn ingress(url: &str, channel: &str, selector: Option<&str>) -> RedisIngress {
    RedisIngress {
        url: Secret::new(url),
        channel: channel.to_owned(),
        service: "orders".to_owned(),
        selector: selector.map(str::to_owned),
        path: Some("/orders/pushed".to_owned()),
    }
}

#[tokio::test]
async fn each_published_message_reaches_each_matching_worker_once_in_order() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let bridge = TestBridge::start(|c| {
        c.ingress.redis.push(ingress(&url, "news", None));
        c.ingress
            .redis
            .push(ingress(&url, "eu-news", Some("region=eu")));
    })
    .await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _workers = [
        listener(&bridge, "w-eu-1", "eu", tx.clone()).await,
        listener(&bridge, "w-eu-2", "eu", tx.clone()).await,
        listener(&bridge, "w-us", "us", tx.clone()).await,
    ];
    redis.until_subscribers("news", 1).await;
    redis.until_subscribers("eu-news", 1).await;

    const N: usize = 50;
    for i in 0..N {
        assert_eq!(redis.publish("news", format!("m{i}").as_bytes()).await, 1);
    }
    redis.publish("eu-news", b"for eu").await;
    let mut got: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for _ in 0..(3 * N + 2) {
        let (id, channel, body) = with_timeout(rx.recv()).await.expect("a delivery");
        got.entry(id).or_default().push(format!("{channel}:{body}"));
    }
    let news: Vec<String> = (0..N).map(|i| format!("news:m{i}")).collect();
    for id in ["w-eu-1", "w-eu-2"] {
        let mut want = news.clone();
        want.push("eu-news:for eu".into());
        assert_eq!(got[id], want, "{id} gets every message once, in order");
    }
    assert_eq!(got["w-us"], news, "the selector keeps eu-news from w-us");
    // Nothing more arrives.
    bridge.until_idle().await;
    assert!(rx.try_recv().is_err());
    let admin = bridge.admin.expect("admin");
    let metrics = get(&http_client(), &format!("http://{admin}/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(&format!("wsbridge_ingress_messages_total {}", N + 1)),
        "{text}"
    );
    assert!(
        text.contains(&format!("wsbridge_ingress_deliveries_total {}", 3 * N + 2)),
        "{text}"
    );

    // Redis restarts: the ingress subscribes again and delivery goes on.
    redis.kill().await;
    redis.restart().await;
    redis.until_subscribers("news", 1).await;
    redis.publish("news", b"after the restart").await;
    let mut after = Vec::new();
    for _ in 0..3 {
        let (id, _, body) = with_timeout(rx.recv())
            .await
            .expect("a delivery after the restart");
        assert_eq!(body, "after the restart");
        after.push(id);
    }
    after.sort();
    assert_eq!(after, ["w-eu-1", "w-eu-2", "w-us"]);
    bridge.stop().await;
}

#[test]
fn a_bad_ingress_entry_stops_start_up_with_its_key() {
    let mut config = test_config();
    config.ingress.redis.push(ingress("http://x", "news", None));
    let err = config.validate().expect_err("bad url").to_string();
    assert!(err.contains("ingress.redis[0].url"), "{err}");
    let mut config = test_config();
    config
        .ingress
        .redis
        .push(ingress("redis://x", "news", Some("region")));
    let err = config.validate().expect_err("bad selector").to_string();
    assert!(err.contains("ingress.redis[0].selector"), "{err}");
}

#[tokio::test]
async fn a_message_over_max_body_is_dropped_and_counted_and_the_next_goes_through() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let bridge = TestBridge::start(|c| {
        c.http.max_body = wsbridge::config::ByteSize(1024);
        c.ingress.redis.push(ingress(&url, "news", None));
    })
    .await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _worker = listener(&bridge, "w-1", "eu", tx).await;
    redis.until_subscribers("news", 1).await;
    redis.publish("news", &[b'x'; 2048]).await;
    redis.publish("news", b"small").await;
    let (_, _, body) = with_timeout(rx.recv()).await.expect("the small one");
    assert_eq!(body, "small");
    let admin = bridge.admin.expect("admin");
    let metrics = get(&http_client(), &format!("http://{admin}/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("wsbridge_ingress_dropped_total 1"), "{text}");
    assert!(text.contains("wsbridge_ingress_messages_total 1"), "{text}");
    bridge.stop().await;
}
