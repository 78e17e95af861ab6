//! Shared helpers for the integration tests: a bridge on loopback port 0 with
//! a generated certificate (in-process or as the real binary), workers that
//! connect to it over real TLS, a raw WebSocket peer for protocol-level
//! tests, and an HTTP client. Every await that could hang has a timeout.
//!
//! One submodule per role, all re-exported here (`use common::*`):
//! * `in_process`: [`TestBridge`] and [`TestWorker`], in the test's process;
//! * `process`: the real binary, [`BridgeProcess`] and [`spawn_agent`];
//! * `raw_worker`: [`RawWorker`], a worker played frame by frame;
//! * `fake_bridge`: [`FakeBridge`], the bridge's end played by the test;
//! * `callers`: HTTP clients and one-call helpers ([`get`], [`post`]...);
//! * `net`: an HTTP server ([`serve_http`]) and a cutting proxy ([`CutProxy`]);
//! * `nats`: real nats-server processes, one or a cluster ([`NatsCluster`]);
//! * `redis`: a real redis-server process ([`RedisServer`]);
//! * `hashed`: large bodies generated and read with their SHA-256 ([`generated`]);
//! * [`raw_http`]: a caller that writes exact bytes (used by path).
//!
//! This file keeps what every role uses: the token, the bound on any await,
//! temporary directories and small utilities.

#![allow(dead_code, unreachable_pub)]

mod callers;
mod fake_bridge;
mod hashed;
mod in_process;
pub mod nats;
mod net;
mod process;
pub mod raw_http;
mod raw_worker;
pub mod redis;

// Each test file uses only some of the roles.
#[allow(unused_imports)]
pub use {
    callers::*, fake_bridge::*, hashed::*, in_process::*, nats::*, net::*, process::*,
    raw_worker::*, redis::RedisServer,
};

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;

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

/// Awaits `fut` for at most `limit`, failing the test with `what`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not within {limit:?}"),
    }
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

/// A handler whose calls never end: each says when it started (first
/// receiver) and when it was dropped, the worker told to cancel it (second).
pub fn hanging() -> (
    impl wsbridge::worker::Handler,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let (dropped_tx, dropped) = tokio::sync::mpsc::unbounded_channel();
    let (started_tx, started) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |_req: http::Request<wsbridge::body::Body>| {
        let guard = OnDrop(dropped_tx.clone());
        let _ = started_tx.send(());
        async move {
            let _guard = guard;
            std::future::pending::<http::Response<wsbridge::body::Body>>().await
        }
    };
    (handler, started, dropped)
}

/// A multi-threaded runtime of `threads` workers, for load generators and
/// workers that must not share the test's scheduler.
pub fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime")
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
