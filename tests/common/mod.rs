//! Shared helpers for the integration tests: a bridge on loopback port 0 with
//! a generated certificate (in-process or as the real binary), workers that
//! connect to it over real TLS, a raw WebSocket peer for protocol-level
//! tests, and an HTTP client. Every await that could hang has a timeout.

#![allow(dead_code, unreachable_pub)]

pub mod raw_http;

use std::{
    future::Future, net::SocketAddr, path::PathBuf, process::Stdio, sync::Arc, time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tokio_tungstenite::{
    tungstenite::{self, client::IntoClientRequest, Message},
    WebSocketStream,
};
use tokio_util::sync::CancellationToken;
use wsbridge::{
    bridge::{self, Listeners},
    config::Config,
    protocol::{self, Control, DataHead, Hello, ResponseHead, Welcome},
    tls::SelfSigned,
    worker::{Handler, Status, Worker, WorkerConfig},
};

/// The token every test bridge accepts.
pub const TOKEN: &str = "test-token";

/// The default bound on any single await in a test.
pub const LIMIT: Duration = Duration::from_secs(30);

/// Awaits `fut`, failing the test if it takes longer than `LIMIT`.
pub async fn with_timeout<T>(fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("test step did not finish within {LIMIT:?}"),
    }
}

/// A config for tests: both listeners on loopback port 0, TLS on (the
/// config is handed over in memory), one route `/orders` -> `orders`.
pub fn test_config() -> Config {
    Config::parse(&format!(
        r#"
        default_service = "default"
        [http]
        listen = "127.0.0.1:0"
        request_timeout = "10s"
        queue_timeout = "2s"
        [admin]
        listen = "127.0.0.1:0"
        [workers]
        listen = "127.0.0.1:0"
        tls_cert = "unused.crt"
        tls_key = "unused.key"
        tokens = ["{TOKEN}"]
        ping_interval = "5s"
        [[routes]]
        prefix = "/orders"
        service = "orders"
        "#
    ))
    .expect("test config is valid")
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "wsbridge=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// An in-process bridge.
pub struct TestBridge {
    /// Where callers connect.
    pub http: SocketAddr,
    /// Where workers connect.
    pub workers: SocketAddr,
    /// The admin listener, unless the tweak disabled it.
    pub admin: Option<SocketAddr>,
    /// The bridge's certificate (workers trust it).
    pub cert: SelfSigned,
    /// The config it runs with.
    pub config: Config,
    /// A view of its state.
    pub handle: bridge::Handle,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestBridge {
    /// Starts a bridge with `test_config()` changed by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestBridge {
        let cert = SelfSigned::generate(&["localhost".into(), "127.0.0.1".into()]).expect("cert");
        Self::start_with(tweak, cert).await
    }

    /// Starts a bridge with a given certificate (to restart "the same" bridge).
    pub async fn start_with(tweak: impl FnOnce(&mut Config), cert: SelfSigned) -> TestBridge {
        init_logs();
        let mut config = test_config();
        tweak(&mut config);
        config.validate().expect("tweaked config is valid");
        let listeners = Listeners::bind(&config).expect("bind");
        let http = listeners.http.local_addr().expect("addr");
        let workers = listeners.workers.local_addr().expect("addr");
        let admin = listeners
            .admin
            .as_ref()
            .map(|l| l.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        let tls = Some(cert.server_config().expect("server tls"));
        let bridge = bridge::Bridge::new(config.clone(), tls).expect("bridge");
        let handle = bridge.handle();
        let task = tokio::spawn(bridge.serve(listeners, shutdown.clone()));
        TestBridge {
            http,
            workers,
            admin,
            cert,
            config,
            handle,
            shutdown,
            task: Some(task),
        }
    }

    /// The worker URL of this bridge.
    pub fn url(&self) -> String {
        format!("wss://localhost:{}", self.workers.port())
    }

    /// A caller URL for `path`.
    pub fn at(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// A worker config for this bridge.
    pub fn worker_config(&self, services: &[&str], max_inflight: u32) -> WorkerConfig {
        let mut cfg = WorkerConfig::new(self.url(), TOKEN, services.iter().copied());
        cfg.max_inflight = max_inflight;
        cfg.tls = Some(self.cert.client_config().expect("client tls"));
        cfg.backoff_initial = Duration::from_millis(20);
        cfg.backoff_max = Duration::from_millis(200);
        cfg
    }

    /// Starts a library worker and waits until the bridge has welcomed it.
    pub async fn worker(
        &self,
        services: &[&str],
        max_inflight: u32,
        handler: impl Handler,
    ) -> TestWorker {
        TestWorker::start(self.worker_config(services, max_inflight), handler).await
    }

    /// Waits until `n` calls of `service` are queued. The queue is only
    /// observable by looking, so this looks every millisecond.
    pub async fn until_queued(&self, service: &str, n: usize) {
        with_timeout(async {
            while self.handle.queued(service) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
    }

    /// Waits until no call is in flight on any worker (pending maps idle).
    pub async fn until_idle(&self) {
        with_timeout(async {
            while self.handle.in_flight() > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
    }

    /// `GET path`, then reads `n` data frames of the reply; returns the
    /// reply's body, still open.
    pub async fn read_frames(&self, path: &str, n: usize) -> hyper::body::Incoming {
        let req = Request::get(self.at(path))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = with_timeout(http_client().request(req))
            .await
            .expect("head");
        let mut body = resp.into_body();
        for _ in 0..n {
            with_timeout(body.frame())
                .await
                .expect("frame")
                .expect("data");
        }
        body
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// Stops the bridge and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            with_timeout(task).await.expect("join").expect("bridge run");
        }
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A library worker running in a task.
pub struct TestWorker {
    /// Its connection state.
    pub status: tokio::sync::watch::Receiver<Status>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), wsbridge::worker::WorkerError>>>,
}

impl TestWorker {
    /// Starts a worker and waits for its first welcome.
    pub async fn start(config: WorkerConfig, handler: impl Handler) -> TestWorker {
        let worker = Worker::new(config, handler);
        let mut status = worker.subscribe();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker.run(shutdown.clone()));
        with_timeout(status.wait_for(|s| matches!(s, Status::Connected { .. })))
            .await
            .expect("worker status");
        TestWorker {
            status,
            shutdown,
            task: Some(task),
        }
    }

    /// Waits until the worker is connected (again).
    pub async fn connected(&mut self) {
        with_timeout(
            self.status
                .wait_for(|s| matches!(s, Status::Connected { .. })),
        )
        .await
        .expect("worker status");
    }

    /// Stops the worker.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            with_timeout(task).await.expect("join").expect("worker run");
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

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

/// A `response` head.
pub fn response_head(id: u64, status: u16, end: bool) -> DataHead {
    DataHead::Response(ResponseHead {
        id,
        status,
        headers: vec![],
        latin1: vec![],
        end,
    })
}

/// A hand-driven worker connection for protocol-level tests.
pub struct RawWorker {
    /// The WebSocket.
    pub ws: WebSocketStream<TlsStream<TcpStream>>,
    /// The bridge's welcome.
    pub welcome: Welcome,
    /// Bytes of binary frames received, as they travelled (compressed).
    pub wire_bytes: usize,
    /// The ids of the `start` frames received (answers to `accepted`).
    pub started: Vec<u64>,
}

/// Opens a TLS WebSocket to the bridge with the given headers; returns the
/// socket or the handshake error (e.g. the HTTP 401 response).
pub async fn raw_connect(
    bridge: &TestBridge,
    token: Option<&str>,
    subprotocol: Option<&str>,
) -> Result<WebSocketStream<TlsStream<TcpStream>>, tungstenite::Error> {
    let tcp = with_timeout(TcpStream::connect(bridge.workers))
        .await
        .expect("tcp");
    let connector = TlsConnector::from(bridge.cert.client_config().expect("tls"));
    let name = ServerName::try_from("localhost").expect("name");
    let tls = with_timeout(connector.connect(name, tcp))
        .await
        .expect("tls handshake");
    let mut req = bridge.url().into_client_request().expect("request");
    if let Some(t) = token {
        req.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).expect("header"),
        );
    }
    if let Some(p) = subprotocol {
        req.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(p).expect("header"),
        );
    }
    with_timeout(tokio_tungstenite::client_async(req, tls))
        .await
        .map(|(ws, _)| ws)
}

/// What a raw worker read.
#[derive(Debug)]
pub enum Frame {
    /// A text frame.
    Control(Control),
    /// A binary frame.
    Data(DataHead, Bytes),
    /// A close frame or the end of the stream.
    Closed,
}

impl RawWorker {
    /// Connects, says hello and reads the welcome.
    pub async fn connect(bridge: &TestBridge, services: &[&str], max_inflight: u32) -> RawWorker {
        Self::connect_with(bridge, services, max_inflight, false).await
    }

    /// Like [`RawWorker::connect`], optionally asking for flow control.
    pub async fn connect_with(
        bridge: &TestBridge,
        services: &[&str],
        max_inflight: u32,
        flow_control: bool,
    ) -> RawWorker {
        let hello = Hello {
            worker_id: "raw".into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            max_inflight,
            flow_control,
            accepted: false,
            compression: Vec::new(),
            resumable: false,
            resume: None,
        };
        Self::connect_hello(bridge, hello).await
    }

    /// Connects with the given hello and reads the welcome.
    pub async fn connect_hello(bridge: &TestBridge, hello: Hello) -> RawWorker {
        Self::connect_as(bridge, TOKEN, hello).await
    }

    /// Like [`RawWorker::connect_hello`], presenting `token`.
    pub async fn connect_as(bridge: &TestBridge, token: &str, hello: Hello) -> RawWorker {
        let ws = raw_connect(bridge, Some(token), Some(protocol::SUBPROTOCOL))
            .await
            .expect("upgrade");
        Self::hello_over(ws, hello).await
    }

    /// Says hello on an upgraded connection and reads the welcome.
    pub async fn hello_over(
        mut ws: WebSocketStream<TlsStream<TcpStream>>,
        hello: Hello,
    ) -> RawWorker {
        let hello = Control::Hello(hello);
        with_timeout(ws.send(Message::text(protocol::encode_control(&hello))))
            .await
            .expect("send hello");
        let mut raw = RawWorker {
            ws,
            welcome: Welcome {
                version: 0,
                session_id: String::new(),
                ping_interval_ms: 0,
                ping_misses: 0,
                max_frame: 0,
                max_response_body: 0,
                window: 0,
                compression: None,
                resume_window_ms: 0,
                resumed: false,
                resend: Vec::new(),
            },
            wire_bytes: 0,
            started: Vec::new(),
        };
        match raw.next().await {
            Frame::Control(Control::Welcome(w)) => raw.welcome = w,
            other => panic!("expected welcome, got {other:?}"),
        }
        raw
    }

    /// The next text or binary frame (pings are answered by tungstenite).
    pub async fn next(&mut self) -> Frame {
        // One bound for the whole wait: pings alone must not keep it going.
        with_timeout(self.next_unbounded()).await
    }

    async fn next_unbounded(&mut self) -> Frame {
        loop {
            match self.ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Frame::Closed,
                Some(Ok(Message::Text(t))) => {
                    match protocol::decode_control(&t).expect("valid control frame") {
                        // The answers to `accepted` are recorded, not returned.
                        Control::Start { id } => self.started.push(id),
                        other => return Frame::Control(other),
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    self.wire_bytes += b.len();
                    let inflate = if self.welcome.compression.is_some() {
                        64 << 20
                    } else {
                        0
                    };
                    let (head, body) =
                        protocol::decode_data(&b, inflate).expect("valid data frame");
                    return Frame::Data(head, body);
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads frames until a complete request arrives; returns its head and body.
    pub async fn next_request(&mut self) -> (protocol::RequestHead, Bytes) {
        let mut pending: Option<(protocol::RequestHead, Vec<u8>)> = None;
        loop {
            match self.next().await {
                Frame::Data(DataHead::Request(h), body) if h.end => return (h, body),
                Frame::Data(DataHead::Request(h), body) => pending = Some((h, body.to_vec())),
                Frame::Data(DataHead::Body(b), chunk) => {
                    let (_, buf) = pending.as_mut().expect("body after head");
                    buf.extend_from_slice(&chunk);
                    if b.end {
                        let (h, buf) = pending.take().expect("pending");
                        return (h, Bytes::from(buf));
                    }
                }
                other => panic!("expected a request, got {other:?}"),
            }
        }
    }

    /// Has the bridge call `path`, answers with a streamed reply head
    /// carrying `first`, and returns the call's head and the caller's
    /// response (its body still open).
    pub async fn streamed_reply(
        &mut self,
        bridge: &TestBridge,
        path: &str,
        first: &[u8],
    ) -> (protocol::RequestHead, Response<hyper::body::Incoming>) {
        let req = Request::get(bridge.at(path))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let client = http_client();
        let call = tokio::spawn(async move { client.request(req).await });
        let (req, _) = self.next_request().await;
        self.send_binary(protocol::encode_data(
            &response_head(req.id, 200, false),
            first,
        ))
        .await;
        let resp = with_timeout(call).await.expect("join").expect("head");
        (req, resp)
    }

    /// Sends a raw binary frame.
    pub async fn send_binary(&mut self, frame: Bytes) {
        with_timeout(self.ws.send(Message::Binary(frame)))
            .await
            .expect("send");
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, text: &str) {
        with_timeout(self.ws.send(Message::text(text)))
            .await
            .expect("send");
    }

    /// Replies to call `id` in one frame.
    pub async fn reply(&mut self, id: u64, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let head = DataHead::Response(ResponseHead {
            id,
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            latin1: vec![],
            end: true,
        });
        self.send_binary(protocol::encode_data(&head, body)).await;
    }
}

/// The real `wsbridge serve` binary on loopback port 0.
pub struct BridgeProcess {
    /// Where callers connect.
    pub http: SocketAddr,
    /// Where workers connect.
    pub workers: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// Its config file (rewrite it, then reload).
    pub config_path: PathBuf,
    /// The self-signed certificate it generated.
    pub cert_path: PathBuf,
    child: tokio::process::Child,
    _dir: TempDir,
}

impl BridgeProcess {
    /// Starts `wsbridge serve` with the test config plus `extra` TOML lines
    /// appended to `[http]`, and waits for both listeners to be ready.
    pub async fn start(http_extra: &str) -> BridgeProcess {
        Self::start_with(http_extra, "").await
    }

    /// Like [`BridgeProcess::start`], with `tail` (e.g. `[[routes]]`)
    /// appended to the config.
    pub async fn start_with(http_extra: &str, tail: &str) -> BridgeProcess {
        let dir = TempDir::new("bridge");
        let cert_path = dir.0.join("server.crt");
        let config = format!(
            r#"
            default_service = "default"
            [http]
            listen = "127.0.0.1:0"
            {http_extra}
            [admin]
            listen = "127.0.0.1:0"
            [workers]
            listen = "127.0.0.1:0"
            tls_cert = "{}"
            tls_key = "{}"
            auto_self_signed = true
            tokens = ["{TOKEN}"]
            {tail}
            "#,
            cert_path.display(),
            dir.0.join("server.key").display()
        );
        let config_path = dir.0.join("wsbridge.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbridge"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn,wsbridge::bridge=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn wsbridge serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let (mut http, mut workers, mut admin) = (None, None, None);
        while http.is_none() || workers.is_none() || admin.is_none() {
            let line = with_timeout(lines.next_line())
                .await
                .expect("read stderr")
                .expect("wsbridge serve exited before its listeners were ready");
            let addr = line
                .split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse::<SocketAddr>().ok());
            if line.contains("http listener ready") {
                http = addr;
            } else if line.contains("worker listener ready") {
                workers = addr;
            } else if line.contains("admin listener ready") {
                admin = addr;
            }
        }
        // Keep draining the log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        BridgeProcess {
            http: http.expect("http addr"),
            workers: workers.expect("workers addr"),
            admin: admin.expect("admin addr"),
            config_path,
            cert_path,
            child,
            _dir: dir,
        }
    }

    /// A worker config for this bridge.
    pub fn worker_config(&self, services: &[&str], max_inflight: u32) -> WorkerConfig {
        let mut cfg = WorkerConfig::new(
            format!("wss://localhost:{}", self.workers.port()),
            TOKEN,
            services.iter().copied(),
        );
        cfg.max_inflight = max_inflight;
        cfg.tls = Some(wsbridge::tls::client_config(Some(&self.cert_path)).expect("trust"));
        cfg
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("bridge process is running")
    }

    /// Sends `signal` (e.g. "HUP") with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// The bridge's `/status`, parsed.
    pub async fn status(&self) -> bridge::status::Status {
        admin_status(self.admin).await
    }

    /// The peak resident memory of the process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let pid = self.child.id().expect("bridge process is running");
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .expect("VmHWM in /proc status")
    }

    /// Sends SIGKILL.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// Starts `wsbridge worker` (the agent) against `url`, trusting `ca`,
/// serving `default` and `orders`, with `mode` arguments (`--echo` or
/// `--upstream URL`). It is killed when the handle is dropped.
pub fn spawn_agent(url: &str, ca: &std::path::Path, mode: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbridge"))
        .arg("worker")
        .args([
            "--connect",
            url,
            "--service",
            "default",
            "--service",
            "orders",
        ])
        .arg("--ca")
        .arg(ca)
        .args(mode)
        .env("WSBRIDGE_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn wsbridge worker")
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "wsbridge-test-{tag}-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7()
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `n` futures produced by `make` concurrently and collects results in order.
pub async fn join_all<T, F, Fut>(n: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(make(i))).collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(with_timeout(h).await.expect("task"));
    }
    out
}

/// Signals through its channel when it is dropped: put one inside a
/// handler's future or a body stream to observe that it was abandoned.
pub struct OnDrop(pub tokio::sync::mpsc::UnboundedSender<()>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// Shared counter type for worker handlers.
pub type Counter = Arc<std::sync::atomic::AtomicUsize>;

/// `len` bytes of xorshift noise: incompressible, reproducible.
pub fn noise(len: usize) -> Bytes {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<_>>()
        .into()
}

/// The bridge's end of worker connections, played by the test over plain
/// `ws://`: for tests of what a worker puts on the wire.
pub struct FakeBridge {
    listener: tokio::net::TcpListener,
    /// Where workers dial.
    pub url: String,
}

/// A welcome with the given heartbeat and defaults for the rest.
pub fn welcome(ping_interval_ms: u64, ping_misses: u32) -> Welcome {
    Welcome {
        version: 1,
        session_id: "fake".into(),
        ping_interval_ms,
        ping_misses,
        max_frame: 1 << 20,
        max_response_body: 1 << 20,
        window: 0,
        compression: None,
        resume_window_ms: 0,
        resumed: false,
        resend: Vec::new(),
    }
}

impl FakeBridge {
    pub async fn bind() -> FakeBridge {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("ws://{}", listener.local_addr().expect("addr"));
        FakeBridge { listener, url }
    }

    /// Accepts the next connection and drops it at once (a dial that fails
    /// before the welcome).
    pub async fn refuse_next(&self) {
        let (tcp, _) = with_timeout(self.listener.accept()).await.expect("accept");
        drop(tcp);
    }

    /// Accepts the next worker, reads its hello and sends `welcome`.
    pub async fn accept(&self, welcome: Welcome) -> FakeLink {
        let (tcp, _) = with_timeout(self.listener.accept()).await.expect("accept");
        #[allow(clippy::result_large_err)]
        let cb = |_: &tungstenite::handshake::server::Request,
                  mut resp: tungstenite::handshake::server::Response| {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(protocol::SUBPROTOCOL),
            );
            Ok(resp)
        };
        let mut ws = with_timeout(tokio_tungstenite::accept_hdr_async(tcp, cb))
            .await
            .expect("upgrade");
        match with_timeout(ws.next()).await {
            Some(Ok(Message::Text(_))) => {}
            other => panic!("expected a hello, got {other:?}"),
        }
        let welcome = Control::Welcome(welcome);
        ws.send(Message::text(protocol::encode_control(&welcome)))
            .await
            .expect("welcome");
        FakeLink { ws }
    }
}

/// One worker connection to a [`FakeBridge`].
pub struct FakeLink {
    pub ws: WebSocketStream<TcpStream>,
}

impl FakeLink {
    /// Sends call `id`: a `GET` of `path` with no body.
    pub async fn get(&mut self, id: u64, path: &str) {
        let head = DataHead::Request(protocol::RequestHead {
            id,
            request_id: format!("fake-{id}"),
            service: "default".into(),
            method: "GET".into(),
            path: path.into(),
            headers: vec![],
            latin1: vec![],
            end: true,
            gate: false,
        });
        let frame = protocol::encode_data(&head, b"");
        self.ws
            .send(Message::Binary(frame))
            .await
            .expect("send request");
    }

    /// The next binary frame from the worker, decoded (control frames are
    /// skipped).
    pub async fn next_data(&mut self) -> (DataHead, Bytes) {
        loop {
            match with_timeout(self.ws.next()).await {
                Some(Ok(Message::Binary(b))) => {
                    return protocol::decode_data(&b, 0).expect("valid data frame")
                }
                Some(Ok(_)) => continue,
                other => panic!("worker connection ended: {other:?}"),
            }
        }
    }
}

/// A plain HTTP/1.1 server on a loopback port answering every request with
/// `answer` (an upstream for the agent, a direct baseline...).
pub async fn serve_http<F, Fut>(answer: F) -> std::net::SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let reply = answer(req);
                    async move { Ok::<_, std::convert::Infallible>(reply.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TCP proxy in front of the bridge's worker port whose open connections
/// can be cut at once (both sockets closed, as when a NAT or a proxy drops
/// them), while new connections still go through.
pub struct CutProxy {
    /// Where workers connect instead of the bridge.
    pub addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
}

impl CutProxy {
    /// Starts a proxy to `target`.
    pub async fn start(target: std::net::SocketAddr) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let cuts = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        CutProxy { addr, cut }
    }

    /// Drops every connection open now.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// A hello for a raw worker of `default` that sends `accepted` and may
/// resume (with `resume`, it comes back to a session).
pub fn resumable_hello(resume: Option<protocol::Resume>) -> Hello {
    Hello {
        worker_id: "resumer".into(),
        services: vec!["default".into()],
        max_inflight: 8,
        flow_control: false,
        accepted: true,
        compression: Vec::new(),
        resumable: true,
        resume,
    }
}
