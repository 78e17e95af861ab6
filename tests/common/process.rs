//! The real `wsbridge` binary as a child process: `wsbridge serve`
//! ([`BridgeProcess`]) and `wsbridge worker`, the agent ([`spawn_agent`]).

use std::{net::SocketAddr, path::PathBuf, process::Stdio};

use tokio::io::{AsyncBufReadExt, BufReader};
use wsbridge::{bridge, worker::WorkerConfig};

use super::{admin_status, with_timeout, TempDir, TOKEN};

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
