//! `wsbridge worker`, the real binary: forwarding to an upstream HTTP server,
//! echo mode, and reconnecting after the bridge restarts.

mod common;

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, process::Child};

/// A plain HTTP upstream that reports what it received.
async fn upstream() -> SocketAddr {
    serve_http(|req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let h = |n: &str| {
            parts
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        Response::builder()
            .status(if parts.uri.path() == "/missing" {
                404
            } else {
                200
            })
            .header("x-up-method", parts.method.as_str())
            .header("x-up-uri", parts.uri.to_string())
            .header("x-up-host", h("host"))
            .header("x-up-forwarded-host", h("x-forwarded-host"))
            .header("x-up-request-id", h("x-request-id"))
            .body(Full::new(body))
            .expect("response")
    })
    .await
}

/// Starts the agent against an in-process bridge.
fn agent(bridge: &TestBridge, cert: &std::path::Path, mode: &[&str]) -> Child {
    spawn_agent(&bridge.url(), cert, mode)
}

fn write_cert(bridge: &TestBridge, dir: &TempDir) -> std::path::PathBuf {
    let path = dir.0.join("bridge.crt");
    std::fs::write(&path, &bridge.cert.cert_pem).expect("write cert");
    path
}

#[tokio::test]
async fn the_agent_forwards_calls_to_its_upstream() {
    // A generous queue_timeout: the first call waits for the agent to connect.
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    let dir = TempDir::new("agent");
    let up = upstream().await;
    let _agent = agent(
        &bridge,
        &write_cert(&bridge, &dir),
        &["--upstream", &format!("http://{up}")],
    );
    let client = http_client();
    let req = Request::patch(bridge.at("/orders/7?full=1"))
        .header("host", "app.internal")
        .header("x-request-id", "agent-1")
        .body(Full::new(Bytes::from_static(b"{\"qty\":2}")))
        .expect("request");
    let r = send(&client, req).await;
    assert_eq!(r.head.status, StatusCode::OK);
    assert_eq!(r.body, "{\"qty\":2}");
    assert_eq!(r.header("x-up-method"), "PATCH");
    assert_eq!(r.header("x-up-uri"), "/orders/7?full=1");
    assert_eq!(r.header("x-up-host"), up.to_string());
    assert_eq!(r.header("x-up-forwarded-host"), "app.internal");
    assert_eq!(r.header("x-up-request-id"), "agent-1");
    // Upstream statuses pass through unchanged.
    let r = get(&client, &bridge.at("/missing")).await;
    assert_eq!(r.head.status, StatusCode::NOT_FOUND);
    bridge.stop().await;
}

#[tokio::test]
async fn an_unreachable_upstream_gives_a_json_502() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    let dir = TempDir::new("agent-down");
    // A port that was just free: nothing listens there.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let _agent = agent(
        &bridge,
        &write_cert(&bridge, &dir),
        &["--upstream", &format!("http://{dead}")],
    );
    let r = get(&http_client(), &bridge.at("/x")).await;
    assert_eq!(r.head.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.error_code(), "upstream_error");
    bridge.stop().await;
}

#[tokio::test]
async fn the_agent_reconnects_after_the_bridge_restarts() {
    let tweak = |c: &mut wsbridge::Config| c.http.queue_timeout = Duration::from_secs(20);
    let bridge = TestBridge::start(tweak).await;
    let (cert, workers_addr) = (bridge.cert.clone(), bridge.workers);
    let dir = TempDir::new("agent-restart");
    let _agent = agent(&bridge, &write_cert(&bridge, &dir), &["--echo"]);
    let client = http_client();
    let r = post(&client, &bridge.at("/before"), "one").await;
    assert_eq!(
        (r.head.status, r.header("x-echo-path")),
        (StatusCode::OK, "/before")
    );
    bridge.stop().await;

    // The same worker address and certificate, as after a redeploy.
    let bridge = TestBridge::start_with(
        |c| {
            tweak(c);
            c.workers.listen = workers_addr;
        },
        cert,
    )
    .await;
    // The call waits in the queue until the agent is back.
    let r = post(&client, &bridge.at("/after"), "two").await;
    assert_eq!(
        (r.head.status, r.body.as_ref()),
        (StatusCode::OK, &b"two"[..])
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_caller_hanging_up_aborts_the_agents_upstream_request() {
    let bridge = TestBridge::start(|c| c.http.queue_timeout = Duration::from_secs(20)).await;
    let dir = TempDir::new("agent-abort");
    // An upstream whose reply never ends; it reports when hyper drops it,
    // which happens when the agent closes the upstream connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = listener.local_addr().expect("addr");
    let (dropped_tx, mut dropped_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let dropped_tx = dropped_tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let guard = OnDrop(dropped_tx.clone());
                    async move {
                        let stream = futures_util::stream::unfold(guard, |g| async move {
                            tokio::task::yield_now().await;
                            let chunk = hyper::body::Frame::data(Bytes::from(vec![b'e'; 16384]));
                            Some((Ok::<_, Infallible>(chunk), g))
                        });
                        Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(stream)))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let _agent = agent(
        &bridge,
        &write_cert(&bridge, &dir),
        &["--upstream", &format!("http://{up}")],
    );
    let body = bridge.read_frames("/endless", 4).await;
    drop(body);
    with_timeout(dropped_rx.recv())
        .await
        .expect("the upstream request was aborted");
    bridge.stop().await;
}
