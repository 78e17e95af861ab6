//! The real `wsbridge` binary as a child process: `wsbridge serve`
//! ([`BridgeProcess`]) and `wsbridge worker`, the agent ([`spawn_agent`]).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};
use wsbridge::{bridge, worker::WorkerConfig};

use super::{admin_status, with_timeout, TempDir, TOKEN};

/// The real `wsbridge serve` binary: on loopback port 0 with the test
/// config ([`BridgeProcess::start`]), or with a config file the test wrote
/// ([`BridgeProcess::with_config`]).
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
    /// When it logged that its worker listener was ready: the log line's
    /// time stamp (see [`log_time`]).
    pub ready_at: Option<Duration>,
    child: tokio::process::Child,
    /// The log lines read while starting, not yet handed out.
    replay: VecDeque<String>,
    /// The rest of its log (stderr), line by line, as it comes.
    log: mpsc::UnboundedReceiver<String>,
    /// The directory of a config written by [`BridgeProcess::start_with`].
    _dir: Option<TempDir>,
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
        Self::start_logging(http_extra, tail, "warn,wsbridge::bridge=info").await
    }

    /// Like [`BridgeProcess::start_with`], logging at `rust_log` (e.g.
    /// "trace", for a test that no log line shows a secret).
    pub async fn start_logging(http_extra: &str, tail: &str, rust_log: &str) -> BridgeProcess {
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
        Self::spawn(config_path, cert_path, Some(dir), rust_log).await
    }

    /// Starts `wsbridge serve` with the config file at `config_path`, whose
    /// worker certificate is (or will be generated) at `cert_path`, and
    /// waits for its listeners to be ready. The config must enable the
    /// admin listener (it is on by default). For fixed ports, or to start
    /// the same bridge again after it stopped.
    pub async fn with_config(config_path: &Path, cert_path: &Path) -> BridgeProcess {
        Self::spawn(
            config_path.to_owned(),
            cert_path.to_owned(),
            None,
            "warn,wsbridge::bridge=info",
        )
        .await
    }

    async fn spawn(
        config_path: PathBuf,
        cert_path: PathBuf,
        dir: Option<TempDir>,
        rust_log: &str,
    ) -> BridgeProcess {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbridge"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn wsbridge serve");
        let stderr = child.stderr.take().expect("stderr");
        // Keep draining the log so the child never blocks on a full pipe.
        let (tx, mut log) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        let mut replay = VecDeque::new();
        let (mut http, mut workers, mut admin, mut ready_at) = (None, None, None, None);
        while http.is_none() || workers.is_none() || admin.is_none() {
            let line = with_timeout(log.recv())
                .await
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
                ready_at = log_time(&line);
            } else if line.contains("admin listener ready") {
                admin = addr;
            }
            replay.push_back(line);
        }
        BridgeProcess {
            http: http.expect("http addr"),
            workers: workers.expect("workers addr"),
            admin: admin.expect("admin addr"),
            config_path,
            cert_path,
            ready_at,
            child,
            replay,
            log,
            _dir: dir,
        }
    }

    /// The next line of its log, from the first one (those read while it
    /// started included); `None` once it has exited and every line is read.
    pub async fn next_log_line(&mut self) -> Option<String> {
        match self.replay.pop_front() {
            Some(line) => Some(line),
            None => self.log.recv().await,
        }
    }

    /// Waits for it to exit.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
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

/// The time stamp at the start of a log line (`2026-01-02T03:04:05.123456Z`),
/// as time since the Unix epoch.
pub fn log_time(line: &str) -> Option<Duration> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.split(':');
    let h = hms.next()?.parse::<u64>().ok()?;
    let min = hms.next()?.parse::<u64>().ok()?;
    let secs = hms.next()?.parse::<f64>().ok()?;
    // Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let whole = u64::try_from(days).ok()? * 86_400 + h * 3600 + min * 60;
    Some(Duration::from_secs(whole) + Duration::from_secs_f64(secs))
}
