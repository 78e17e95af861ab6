//! Bridges in a cluster know each other's workers: real `nats-server`
//! processes clustered on loopback, bridges announcing over them, and the
//! other bridges' `/status` and `/metrics` showing what each announced.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{Request, Response};
use wsbridge::{body::Body, bridge::status::Status};

/// Echoes the request body.
async fn echo(req: Request<Body>) -> Response<Body> {
    Response::new(req.into_body())
}

/// Workers that `node` announced for `service`, as `status` shows them.
fn remote_workers(status: &Status, node: &str, service: &str) -> Vec<String> {
    let Some(cluster) = &status.cluster else {
        return Vec::new();
    };
    cluster
        .peers
        .iter()
        .filter(|p| p.node == node)
        .flat_map(|p| &p.services)
        .filter(|s| s.name == service)
        .flat_map(|s| s.workers.iter().map(|w| w.id.clone()))
        .collect()
}

fn peers(status: &Status) -> Vec<String> {
    status
        .cluster
        .as_ref()
        .map(|c| c.peers.iter().map(|p| p.node.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_worker_at_one_bridge_is_listed_at_the_other_within_three_seconds() {
    let nats = NatsCluster::start(3).await;
    let heartbeat = Duration::from_secs(2);
    let (url_a, url_b) = (nats.url(0), nats.url(2));
    let a =
        TestBridge::start(|c| c.cluster = Some(cluster_config(&url_a, "node-a", heartbeat))).await;
    let b =
        TestBridge::start(|c| c.cluster = Some(cluster_config(&url_b, "node-b", heartbeat))).await;
    let admin_a = a.admin.expect("admin listener");
    // Each sees the other (the starting bridge asks for everyone's presence).
    until_status(admin_a, "node-b listed at node-a", |s| {
        peers(s) == ["node-b"]
    })
    .await;

    let mut config = b.worker_config(&["orders"], 7);
    config.worker_id = "w-at-b".to_owned();
    let mut worker = TestWorker::start(config, echo).await;
    worker.connected().await;
    let connected = Instant::now();
    let status = until_status(admin_a, "B's worker listed at A", |s| {
        remote_workers(s, "node-b", "orders") == ["w-at-b"]
    })
    .await;
    let took = connected.elapsed();
    assert!(took < Duration::from_secs(3), "listed after {took:?}");
    let table = status.table(0);
    let cluster = status.cluster.expect("cluster status");
    assert!(cluster.connected);
    assert_eq!(cluster.node, "node-a");
    let worker_at_b = &cluster.peers[0].services[0].workers[0];
    assert_eq!((worker_at_b.capacity, worker_at_b.closed), (7, false));
    // A's own worker table is A's alone.
    assert!(status.workers.is_empty());
    // `wsbridge status` prints the cluster and B's worker.
    assert!(
        table.contains("cluster test as node node-a: connected, 1 other bridge(s)"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("node-b"))
        .unwrap_or_else(|| panic!("no row for node-b in\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..4], ["node-b", "orders", "1/1", "0/7"], "{row}");

    // The worker leaves: gone from A's view too, without waiting for a beat.
    worker.stop().await;
    let left = Instant::now();
    until_status(admin_a, "B's worker gone at A", |s| {
        remote_workers(s, "node-b", "orders").is_empty()
    })
    .await;
    assert!(
        left.elapsed() < Duration::from_secs(1),
        "{:?}",
        left.elapsed()
    );

    let metrics = get(&http_client(), &format!("http://{admin_a}/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("wsbridge_cluster_connected 1\n"), "{text}");
    assert!(text.contains("wsbridge_cluster_peers 1\n"), "{text}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_bridge_that_stops_leaves_at_once_and_one_killed_is_dropped_after_three_beats() {
    let nats = NatsCluster::start(1).await;
    let url = nats.url(0);
    let heartbeat = Duration::from_millis(500);
    let a =
        TestBridge::start(|c| c.cluster = Some(cluster_config(&url, "node-a", heartbeat))).await;
    let admin_a = a.admin.expect("admin listener");

    // A graceful stop says it is leaving.
    let b =
        TestBridge::start(|c| c.cluster = Some(cluster_config(&url, "node-b", heartbeat))).await;
    until_status(admin_a, "node-b joined", |s| peers(s) == ["node-b"]).await;
    let stopping = Instant::now();
    b.stop().await;
    until_status(admin_a, "node-b left", |s| peers(s).is_empty()).await;
    let took = stopping.elapsed();
    assert!(took < heartbeat * 2, "left after {took:?}");

    // SIGKILL says nothing: three missed beats (1.5 s) drop it.
    let mut c = BridgeProcess::start_with("", &cluster_toml(&url, "node-c", Some("500ms"))).await;
    until_status(admin_a, "node-c joined", |s| peers(s) == ["node-c"]).await;
    c.kill().await;
    let killed = Instant::now();
    until_status(admin_a, "node-c dropped", |s| peers(s).is_empty()).await;
    let took = killed.elapsed();
    assert!(
        took >= heartbeat * 2 && took < heartbeat * 5,
        "dropped after {took:?}, expected 3 missed beats of {heartbeat:?}"
    );
    a.stop().await;
}

#[tokio::test]
async fn losing_nats_degrades_the_bridge_and_it_recovers_when_nats_is_back() {
    let mut nats = NatsCluster::start(1).await;
    let url = nats.url(0);
    let heartbeat = Duration::from_millis(500);
    let a =
        TestBridge::start(|c| c.cluster = Some(cluster_config(&url, "node-a", heartbeat))).await;
    let b =
        TestBridge::start(|c| c.cluster = Some(cluster_config(&url, "node-b", heartbeat))).await;
    let admin_a = a.admin.expect("admin listener");
    until_status(admin_a, "connected with a peer", |s| {
        s.cluster.as_ref().is_some_and(|c| c.connected) && peers(s) == ["node-b"]
    })
    .await;

    nats.kill(0);
    let status = until_status(admin_a, "degraded", |s| {
        s.cluster.as_ref().is_some_and(|c| !c.connected)
    })
    .await;
    // Peers cannot be reached without NATS: none is listed.
    until_status(admin_a, "no peers while degraded", |s| peers(s).is_empty()).await;
    assert!(status.cluster.is_some());
    let metrics = get(&http_client(), &format!("http://{admin_a}/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("wsbridge_cluster_connected 0\n"), "{text}");
    // Local calls go on meanwhile.
    let _worker = TestWorker::start(a.worker_config(&["orders"], 4), echo).await;
    let reply = post(&http_client(), &a.at("/orders/1"), "still here").await;
    assert_eq!(&reply.body[..], b"still here");

    nats.restart(0).await;
    until_status(admin_a, "reconnected, peer back", |s| {
        s.cluster.as_ref().is_some_and(|c| c.connected) && peers(s) == ["node-b"]
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[test]
fn cluster_config_is_checked() {
    let base = "[http]\nlisten = \"127.0.0.1:0\"\n[workers]\nlisten = \"127.0.0.1:0\"\ntls = false\ntokens = [\"t\"]\n";
    let parse =
        |cluster: &str| wsbridge::config::Config::parse(&format!("{base}[cluster]\n{cluster}"));
    let ok = parse("nats = [\"nats://127.0.0.1:4222\"]").expect("minimal cluster");
    let c = ok.cluster.expect("cluster");
    assert_eq!(c.name, "wsbridge");
    assert_eq!(c.heartbeat, Duration::from_secs(2));
    assert!(c.node.len() > 5 && !c.node.contains('.'), "{}", c.node);
    for (bad, key) in [
        ("nats = []", "cluster.nats"),
        ("nats = [\"http://[::1\"]", "cluster.nats"),
        ("nats = [\"nats://h:4222\"]\nnode = \"a.b\"", "cluster.node"),
        ("nats = [\"nats://h:4222\"]\nname = \"*\"", "cluster.name"),
        (
            "nats = [\"nats://h:4222\"]\ntoken = \"x\"\nuser = \"u\"\npassword = \"p\"",
            "cluster",
        ),
        ("nats = [\"nats://h:4222\"]\nuser = \"u\"", "cluster.user"),
        (
            "nats = [\"nats://h:4222\"]\nheartbeat = \"10ms\"",
            "cluster.heartbeat",
        ),
        ("nats = [\"nats://h:4222\"]\nsubjects = 1", "subjects"),
    ] {
        let err = parse(bad).expect_err(bad).to_string();
        assert!(err.contains(key), "{bad:?} gave {err}");
    }
    // Secrets never show in the config's Debug output.
    let secret = parse("nats = [\"nats://h:4222\"]\ntoken = \"hunter2\"").expect("token");
    assert!(!format!("{secret:?}").contains("hunter2"));
}

#[tokio::test]
async fn a_bridge_starts_while_nats_is_down_and_joins_when_it_comes_up() {
    let mut nats = NatsCluster::start(1).await;
    let url = nats.url(0);
    nats.kill(0);
    let heartbeat = Duration::from_millis(500);
    // Starting does not wait for NATS: the bridge serves its own workers.
    let a = within(
        Duration::from_secs(10),
        "a bridge starting without NATS",
        TestBridge::start(|c| c.cluster = Some(cluster_config(&url, "node-a", heartbeat))),
    )
    .await;
    let admin_a = a.admin.expect("admin listener");
    let status = admin_status(admin_a).await;
    assert!(!status.cluster.expect("cluster status").connected);
    let _worker = TestWorker::start(a.worker_config(&["orders"], 4), echo).await;
    let reply = post(&http_client(), &a.at("/orders/1"), "no nats").await;
    assert_eq!(&reply.body[..], b"no nats");

    nats.restart(0).await;
    let b =
        TestBridge::start(|c| c.cluster = Some(cluster_config(&url, "node-b", heartbeat))).await;
    until_status(admin_a, "joined once NATS is up", |s| {
        s.cluster.as_ref().is_some_and(|c| c.connected) && peers(s) == ["node-b"]
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn two_bridges_with_one_node_name_are_told_apart_in_the_log() {
    let nats = NatsCluster::start(1).await;
    let url = nats.url(0);
    let heartbeat = Duration::from_millis(200);
    let a = TestBridge::start(|c| c.cluster = Some(cluster_config(&url, "twin", heartbeat))).await;
    // The second twin is a bridge process, so its log can be read.
    let mut b = BridgeProcess::start_with("", &cluster_toml(&url, "twin", Some("200ms"))).await;
    within(LIMIT, "the duplicate node name warning", async {
        while let Some(line) = b.next_log_line().await {
            if line.contains("under this bridge's node name") {
                return;
            }
        }
        panic!("the bridge process ended without warning");
    })
    .await;
    // Neither counts the other as a peer.
    assert!(peers(&admin_status(a.admin.expect("admin")).await).is_empty());
    b.kill().await;
    a.stop().await;
}

/// `(worker_id, node)` of a presence answer.
fn listed(doc: &serde_json::Value) -> Vec<(String, String)> {
    doc["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| {
            let s = |k: &str| w[k].as_str().unwrap_or("").to_owned();
            (s("worker_id"), s("node"))
        })
        .collect()
}

#[tokio::test]
async fn presence_lists_every_bridges_workers_and_a_silent_bridge_makes_it_partial_not_slow() {
    let nats = NatsCluster::start(1).await;
    let url = nats.url(0);
    let a = TestBridge::start(|c| {
        c.cluster = Some(cluster_config(&url, "node-a", Duration::from_secs(1)))
    })
    .await;
    let b = BridgeProcess::start_with("", &cluster_toml(&url, "node-b", Some("1s"))).await;
    let named = |mut config: wsbridge::worker::WorkerConfig, id: &str, region: &str| {
        config.worker_id = id.to_owned();
        config.metadata = [("region".to_owned(), region.to_owned())].into();
        config
    };
    let mut workers = Vec::new();
    for config in [
        named(a.worker_config(&["orders"], 2), "a-1", "eu"),
        named(b.worker_config(&["orders"], 2), "b-1", "us"),
        named(b.worker_config(&["orders"], 2), "b-2", "eu"),
    ] {
        let mut w = TestWorker::start(config, echo).await;
        w.connected().await;
        workers.push(w);
    }
    let client = http_client();
    let at_a = a.at("/_wsbridge/workers?service=orders");
    let pair = |id: &str, node: &str| (id.to_owned(), node.to_owned());
    let want = [
        pair("a-1", "node-a"),
        pair("b-1", "node-b"),
        pair("b-2", "node-b"),
    ];
    // It converges: B's workers appear at A once A knows B.
    let doc = within(Duration::from_secs(5), "A lists all three", async {
        loop {
            let doc = get(&client, &at_a).await.json();
            if listed(&doc) == want {
                return doc;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(doc["complete"], true);
    assert_eq!(doc["workers"][2]["metadata"]["region"], "eu");
    // Filters apply at every bridge.
    let eu = get(&client, &a.at("/_wsbridge/workers?meta.region=eu"))
        .await
        .json();
    assert_eq!(listed(&eu), [pair("a-1", "node-a"), pair("b-2", "node-b")]);
    // The same answer at B, about A.
    let at_b = format!("http://{}/_wsbridge/workers?meta.region=us", b.http);
    assert_eq!(
        listed(&get(&client, &at_b).await.json()),
        [pair("b-1", "node-b")]
    );

    // B stops answering (frozen, still announced): A's answer is partial,
    // within the peers' bound, not slow.
    b.signal("STOP");
    let asked = Instant::now();
    let doc = get(&client, &at_a).await.json();
    let took = asked.elapsed();
    b.signal("CONT");
    println!("presence with a frozen peer answered in {took:?}");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(doc["complete"], false);
    assert_eq!(doc["nodes_missing"], serde_json::json!(["node-b"]));
    assert_eq!(listed(&doc), [pair("a-1", "node-a")]);
    drop(workers);
}
