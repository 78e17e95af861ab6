//! A real `redis-server` on a free loopback port ([`RedisServer`]), for the
//! tests of `[[ingress.redis]]`. The binary is the one `scripts/redis-server`
//! prints (it installs Debian's package if needed); `REDIS_SERVER=/path`
//! overrides it. The server keeps nothing on disk and is killed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use super::{nats::free_port, within};

/// The redis-server binary for the tests.
pub fn redis_server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/redis-server");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/redis-server");
        assert!(
            out.status.success(),
            "scripts/redis-server failed: no redis-server for the tests"
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// One redis-server process.
pub struct RedisServer {
    pub port: u16,
    child: Option<tokio::process::Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub async fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
        };
        server.restart().await;
        server
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port (after [`RedisServer::kill`]).
    pub async fn restart(&mut self) {
        let bin = tokio::task::spawn_blocking(|| redis_server_bin().to_owned())
            .await
            .expect("find redis-server");
        let child = tokio::process::Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let url = self.url();
        within(Duration::from_secs(10), "redis-server answers", async {
            loop {
                if let Ok(client) = redis::Client::open(url.as_str()) {
                    if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                        let pong: redis::RedisResult<String> =
                            redis::cmd("PING").query_async(&mut c).await;
                        if pong.is_ok() {
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// A connection for commands (`PUBLISH`, `PUBSUB NUMSUB`).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url().as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }

    /// Subscribers of `channel` now.
    pub async fn subscribers(&self, channel: &str) -> u64 {
        let mut c = self.connection().await;
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut c)
            .await
            .expect("PUBSUB NUMSUB");
        counts.first().map_or(0, |(_, n)| *n)
    }

    /// Waits until `channel` has `n` subscribers.
    pub async fn until_subscribers(&self, channel: &str, n: u64) {
        within(Duration::from_secs(15), "the ingress subscribes", async {
            while self.subscribers(channel).await != n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// `PUBLISH channel message`; how many subscribers got it.
    pub async fn publish(&self, channel: &str, message: &[u8]) -> u64 {
        let mut c = self.connection().await;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(message)
            .query_async(&mut c)
            .await
            .expect("PUBLISH")
    }
}
