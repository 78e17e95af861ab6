//! The bridge and library workers inside the test's own process: a
//! [`TestBridge`] on loopback port 0 with a generated certificate and the
//! [`test_config`], and [`TestWorker`]s that connect to it over real TLS.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wsbridge::{
    bridge::{self, Listeners},
    config::Config,
    tls::SelfSigned,
    worker::{Handler, Status, Worker, WorkerConfig},
};

use super::{http_client, with_timeout, TOKEN};

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

/// A worker of `orders` named `id`, with `region` in its metadata.
pub async fn orders_worker(
    bridge: &TestBridge,
    id: &str,
    region: &str,
    handler: impl Handler,
) -> TestWorker {
    bridge
        .worker_as("orders", id, &[("region", region)], handler)
        .await
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

    /// Starts a worker of `service` named `id` with `metadata` and waits
    /// until the bridge has welcomed it.
    pub async fn worker_as(
        &self,
        service: &str,
        id: &str,
        metadata: &[(&str, &str)],
        handler: impl Handler,
    ) -> TestWorker {
        let mut config = self.worker_config(&[service], 4);
        config.worker_id = id.to_owned();
        config.metadata = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut w = TestWorker::start(config, handler).await;
        w.connected().await;
        w
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

    /// Waits until the worker stops by itself, and returns why.
    pub async fn ended(mut self) -> Result<(), wsbridge::worker::WorkerError> {
        let task = self.task.take().expect("the worker runs");
        with_timeout(task).await.expect("join")
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
