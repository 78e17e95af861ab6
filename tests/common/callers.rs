//! HTTP callers: pooled HTTP/1.1 and HTTP/2 clients, one-call helpers
//! that read the whole reply, and the admin `/status` read back as a
//! typed status.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tokio::{net::TcpStream, task::JoinHandle};
use wsbridge::bridge;

use super::{with_timeout, TestBridge, LIMIT};

/// `GET /status` from an admin listener, parsed.
pub async fn admin_status(admin: SocketAddr) -> bridge::status::Status {
    let reply = get(&http_client(), &format!("http://{admin}/status")).await;
    assert_eq!(reply.head.status, 200, "GET /status: {:?}", reply.body);
    serde_json::from_slice(&reply.body).expect("/status is a wsbridge status")
}

/// Polls `/status` (every 20 ms, up to [`LIMIT`]) until `ready` holds;
/// returns that status. For states the bridge only shows through it.
pub async fn until_status(
    admin: SocketAddr,
    what: &str,
    ready: impl Fn(&bridge::status::Status) -> bool,
) -> bridge::status::Status {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let status = admin_status(admin).await;
        if ready(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {LIMIT:?} for {what}; last status: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pooled keep-alive HTTP client.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A new HTTP client.
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An HTTP/2 client: prior knowledge (no upgrade), as an app talks to an
/// h2c server; requests to one address share one connection.
pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// Exactly one HTTP/2 connection to `addr` (prior knowledge), driven by the
/// returned task, which ends when the connection does.
pub async fn h2_connection(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    JoinHandle<hyper::Result<()>>,
) {
    let tcp = with_timeout(TcpStream::connect(addr)).await.expect("tcp");
    let (sender, conn) = with_timeout(hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    ))
    .await
    .expect("h2 handshake");
    (sender, tokio::spawn(conn))
}

/// A response with its body read.
pub struct Reply {
    /// Status, headers.
    pub head: http::response::Parts,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// A header as a string ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.head
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error.code` of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

/// Sends a request and reads the whole response.
pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Reply {
    let resp: Response<_> = with_timeout(client.request(req))
        .await
        .expect("http request");
    let (head, body) = resp.into_parts();
    let body = with_timeout(body.collect()).await.expect("body").to_bytes();
    Reply { head, body }
}

/// `POST url` with `body`.
pub async fn post(client: &HttpClient, url: &str, body: impl Into<Bytes>) -> Reply {
    let req = Request::post(url)
        .body(Full::new(body.into()))
        .expect("request");
    send(client, req).await
}

/// `GET url`.
pub async fn get(client: &HttpClient, url: &str) -> Reply {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(client, req).await
}

/// Starts `GET path` on its own connection in a task, for calls that the
/// test answers by hand.
pub fn spawn_get(bridge: &TestBridge, path: &str) -> JoinHandle<Reply> {
    let url = bridge.at(path);
    tokio::spawn(async move { get(&http_client(), &url).await })
}

/// Starts `POST path` with `body` in a task.
pub fn spawn_post(bridge: &TestBridge, path: &str, body: &'static str) -> JoinHandle<Reply> {
    let url = bridge.at(path);
    tokio::spawn(async move { post(&http_client(), &url, body).await })
}
