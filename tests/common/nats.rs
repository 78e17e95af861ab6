//! Real `nats-server` processes on loopback: [`NatsCluster`], one server or
//! several clustered with each other, each with its own client port and
//! monitoring port, that a test can kill (SIGKILL), freeze (SIGSTOP), thaw
//! and restart. Every process is killed when the cluster is dropped, a
//! panicking test included, and then the tail of each server's log is
//! printed if the test failed.
//!
//! The binary is the one `scripts/nats-server` prints (run once per test
//! process; it installs nats-server if needed, so plain `cargo test` works
//! on a fresh machine). `NATS_SERVER=/path/to/nats-server` overrides it.

use std::{
    collections::{HashMap, HashSet},
    fs::{File, OpenOptions},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use super::{TempDir, LIMIT};

/// The nats-server binary that `scripts/nats-server` prints: installed on
/// first use, then found once per test process.
pub fn nats_server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nats-server");
        let out = Command::new(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}): no nats-server for the tests",
            script.display(),
            out.status
        );
        let path = String::from_utf8(out.stdout).expect("the path is UTF-8");
        let path = PathBuf::from(path.trim());
        assert!(
            path.is_absolute() && path.is_file(),
            "scripts/nats-server printed {path:?}, not the path of a binary"
        );
        path
    })
}

/// The version of [`nats_server_bin`], e.g. `2.15.1`.
pub fn nats_server_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        let out = Command::new(nats_server_bin())
            .arg("--version")
            .output()
            .expect("run nats-server --version");
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .trim_start_matches('v')
            .to_owned()
    })
}

/// One server of a [`NatsCluster`].
struct Server {
    name: String,
    client: u16,
    http: u16,
    config: PathBuf,
    log: PathBuf,
    /// `None` once killed.
    child: Option<Child>,
    frozen: bool,
}

/// `n` real nats-server processes on loopback, clustered with each other
/// (each one lists the others' cluster ports as routes) when `n > 1`.
pub struct NatsCluster {
    servers: Vec<Server>,
    /// The cluster's name (`cluster { name }`), unique per cluster.
    pub name: String,
    bin: PathBuf,
    /// Configs and logs.
    dir: TempDir,
}

impl NatsCluster {
    /// Starts `n` servers and waits until each one has its routes to all
    /// the others and accepts clients.
    pub async fn start(n: usize) -> NatsCluster {
        Self::start_with(n, "").await
    }

    /// Like [`NatsCluster::start`], with `extra` appended to every server's
    /// config file (e.g. `max_payload: 65536`, `ping_interval: "1s"`, or an
    /// `authorization { token: "..." }` block).
    pub async fn start_with(n: usize, extra: &str) -> NatsCluster {
        assert!(n >= 1, "a cluster of {n} servers");
        let bin = tokio::task::spawn_blocking(|| nats_server_bin().to_owned())
            .await
            .expect("find nats-server");
        // A port chosen below can still be taken by another process before
        // the server binds it: then start again on other ports.
        for attempt in 1.. {
            let mut cluster = Self::spawn(n, extra, &bin);
            match cluster.try_formed().await {
                Ok(()) => return cluster,
                Err(e) if attempt < 3 && cluster.port_clash() => {
                    eprintln!("nats cluster {}: {e}; starting again", cluster.name);
                }
                Err(e) => panic!("nats cluster {} did not start: {e}", cluster.name),
            }
        }
        unreachable!()
    }

    fn spawn(n: usize, extra: &str, bin: &Path) -> NatsCluster {
        static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "wsbridge-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let dir = TempDir::new("nats");
        let ports: Vec<[u16; 3]> = (0..n)
            .map(|_| [free_port(), free_port(), free_port()])
            .collect();
        let mut servers = Vec::with_capacity(n);
        for (i, &[client, http, cluster_port]) in ports.iter().enumerate() {
            let server_name = format!("nats-{i}");
            let mut config = format!(
                "server_name: \"{server_name}\"\n\
                 listen: \"127.0.0.1:{client}\"\n\
                 http: \"127.0.0.1:{http}\"\n"
            );
            if n > 1 {
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, p)| format!("\"nats://127.0.0.1:{}\"", p[2]))
                    .collect();
                config.push_str(&format!(
                    "cluster {{\n  name: \"{name}\"\n  listen: \"127.0.0.1:{cluster_port}\"\n  \
                     routes: [{}]\n}}\n",
                    routes.join(", ")
                ));
            }
            config.push_str(extra);
            config.push('\n');
            let config_path = dir.0.join(format!("{server_name}.conf"));
            std::fs::write(&config_path, config).expect("write nats-server config");
            let mut server = Server {
                log: dir.0.join(format!("{server_name}.log")),
                name: server_name,
                client,
                http,
                config: config_path,
                child: None,
                frozen: false,
            };
            server.child = Some(spawn_server(bin, &server));
            servers.push(server);
        }
        NatsCluster {
            servers,
            name,
            bin: bin.to_owned(),
            dir,
        }
    }

    /// Every server's client URL (`nats://127.0.0.1:PORT`), killed ones
    /// included: what a client is configured with.
    pub fn urls(&self) -> Vec<String> {
        (0..self.servers.len()).map(|i| self.url(i)).collect()
    }

    /// Server `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client)
    }

    /// Server `i`'s client address.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.servers[i].client))
    }

    /// Server `i`'s monitoring address (`/varz`, `/routez`, `/connz`...).
    pub fn monitor_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.servers[i].http))
    }

    /// Server `i`'s process id, while it runs (frozen or not).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers[i].child.as_ref().map(Child::id)
    }

    /// Whether server `i` runs (it may be frozen).
    pub fn is_running(&self, i: usize) -> bool {
        self.servers[i].child.is_some()
    }

    /// Server `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.servers[i].log).unwrap_or_default()
    }

    /// GETs `path` (e.g. `/varz`, `/connz?subs=1`) from server `i`'s
    /// monitoring port and parses the JSON.
    pub async fn monitor(&self, i: usize, path: &str) -> Value {
        assert!(!self.servers[i].frozen, "nats-{i} is frozen");
        get_json(self.monitor_addr(i), path)
            .await
            .unwrap_or_else(|e| panic!("nats-{i} {path}: {e}"))
    }

    /// Kills server `i` with SIGKILL (frozen or not) and reaps it.
    pub fn kill(&mut self, i: usize) {
        let server = &mut self.servers[i];
        let mut child = server
            .child
            .take()
            .unwrap_or_else(|| panic!("nats-{i} is not running"));
        child.kill().expect("SIGKILL nats-server");
        child.wait().expect("reap nats-server");
        server.frozen = false;
    }

    /// Stops server `i` with SIGSTOP and returns once every thread of it
    /// is stopped: its sockets stay open, and nothing answers on them.
    pub fn freeze(&mut self, i: usize) {
        let server = &mut self.servers[i];
        let pid = server.child.as_ref().map(Child::id);
        let pid = pid.unwrap_or_else(|| panic!("nats-{i} is not running"));
        assert!(!server.frozen, "nats-{i} is already frozen");
        signal(pid, "STOP").expect("SIGSTOP nats-server");
        server.frozen = true;
        let deadline = Instant::now() + LIMIT;
        while !all_threads_stopped(pid) {
            assert!(
                Instant::now() < deadline,
                "nats-{i} not stopped after SIGSTOP within {LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Resumes server `i`, frozen by [`NatsCluster::freeze`], with SIGCONT.
    pub fn thaw(&mut self, i: usize) {
        let server = &mut self.servers[i];
        assert!(server.frozen, "nats-{i} is not frozen");
        let pid = server
            .child
            .as_ref()
            .map(Child::id)
            .expect("frozen server runs");
        signal(pid, "CONT").expect("SIGCONT nats-server");
        server.frozen = false;
    }

    /// Starts server `i` again on the same ports (killing it first if it
    /// runs) and waits until it has its routes to every other running
    /// server that is not frozen, and they to it.
    pub async fn restart(&mut self, i: usize) {
        if self.is_running(i) {
            self.kill(i);
        }
        let child = spawn_server(&self.bin, &self.servers[i]);
        self.servers[i].child = Some(child);
        if let Err(e) = self.try_formed().await {
            panic!("nats-{i} of cluster {} did not come back: {e}", self.name);
        }
    }

    /// Waits until every running server that is not frozen routes to
    /// every other such server again (after a thaw, say: the others may
    /// have dropped their routes to it meanwhile) and accepts clients.
    pub async fn wait_formed(&mut self) {
        if let Err(e) = self.try_formed().await {
            panic!("nats cluster {}: {e}", self.name);
        }
    }

    /// Waits until server `i` knows of a subscription to `subject` made on
    /// another server (its routes carry the interest): from then on, a
    /// message published on server `i` reaches that subscriber.
    pub async fn wait_interest(&self, i: usize, subject: &str) {
        let deadline = Instant::now() + LIMIT;
        loop {
            let routez = self.monitor(i, "/routez?subs=1").await;
            let routes = routez["routes"].as_array().cloned().unwrap_or_default();
            let known = routes.iter().any(|route| {
                route["subscriptions_list"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .any(|s| s == subject || s.starts_with(&format!("{subject} ")))
            });
            if known {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats-{i} did not learn of a subscription to {subject:?} within {LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether a server failed to start because a port was taken.
    fn port_clash(&self) -> bool {
        (0..self.servers.len()).any(|i| self.log(i).contains("address already in use"))
    }

    /// Waits until every running server that is not frozen has at least
    /// one full set of routes (its `pool_size`; 1 before 2.10) to each other
    /// such server, and answers a client with INFO. Fails at once if a
    /// server exits.
    async fn try_formed(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + LIMIT;
        loop {
            for (i, server) in self.servers.iter_mut().enumerate() {
                if let Some(child) = server.child.as_mut() {
                    if let Some(status) = child.try_wait().expect("try_wait") {
                        server.child = None;
                        return Err(format!("nats-{i} exited ({status})"));
                    }
                }
            }
            // A server with JetStream answers on its monitoring port before
            // it listens for clients: a refused client connection is "not
            // yet" too.
            let formed = match self.routes_complete().await {
                Ok(()) => self.greets().await,
                Err(e) => Err(e),
            };
            match formed {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("not formed within {LIMIT:?}: {e}"));
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether every live server answers a client with INFO.
    async fn greets(&self) -> Result<(), String> {
        for i in self.live() {
            let addr = self.client_addr(i);
            let info = tokio::time::timeout(LIMIT, async {
                let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let mut line = String::new();
                BufReader::new(stream)
                    .read_line(&mut line)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(line)
            })
            .await
            .map_err(|_| format!("nats-{i} sent no INFO within {LIMIT:?}"))??;
            if !info.starts_with("INFO ") {
                return Err(format!("nats-{i} greeted a client with {info:?}"));
            }
        }
        Ok(())
    }

    /// The servers that run and are not frozen.
    fn live(&self) -> Vec<usize> {
        (0..self.servers.len())
            .filter(|&i| self.servers[i].child.is_some() && !self.servers[i].frozen)
            .collect()
    }

    /// `Ok` if every live server routes to every other live one; else what
    /// is missing.
    async fn routes_complete(&self) -> Result<(), String> {
        let live = self.live();
        let mut ids = HashMap::new();
        let mut pools = HashMap::new();
        for &i in &live {
            let varz = get_json(self.monitor_addr(i), "/varz")
                .await
                .map_err(|e| format!("nats-{i} /varz: {e}"))?;
            let id = varz["server_id"].as_str().unwrap_or_default().to_owned();
            // Route pooling (2.10+): `pool_size` connections per peer, or
            // none (-1, or absent before 2.10) for one.
            let pool = varz["cluster"]["pool_size"].as_i64().unwrap_or(1).max(1);
            ids.insert(i, id);
            pools.insert(i, pool as usize);
        }
        for &i in &live {
            let routez = get_json(self.monitor_addr(i), "/routez")
                .await
                .map_err(|e| format!("nats-{i} /routez: {e}"))?;
            let mut per_peer: HashMap<&str, usize> = HashMap::new();
            for route in routez["routes"].as_array().into_iter().flatten() {
                if let Some(id) = route["remote_id"].as_str() {
                    *per_peer.entry(id).or_default() += 1;
                }
            }
            let missing: Vec<String> = live
                .iter()
                .filter(|&&j| j != i)
                .filter(|j| per_peer.get(ids[j].as_str()).copied().unwrap_or(0) < pools[&i])
                .map(|j| format!("nats-{j}"))
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "nats-{i} has fewer than {} routes to {}",
                    pools[&i],
                    missing.join(", ")
                ));
            }
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(mut child) = server.child.take() {
                if server.frozen {
                    let _ = signal(child.id(), "CONT");
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for (i, server) in self.servers.iter().enumerate() {
                let log = self.log(i);
                let lines: Vec<&str> = log.lines().collect();
                eprintln!(
                    "---- last lines of {} (cluster {}, client port {}, monitoring port {})",
                    server.name, self.name, server.client, server.http
                );
                for line in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// Starts `server`'s process; its stdout and stderr go to its log file.
fn spawn_server(bin: &Path, server: &Server) -> Child {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&server.log)
        .expect("open nats-server log");
    let log2: File = log.try_clone().expect("clone log file");
    Command::new(bin)
        .arg("--config")
        .arg(&server.config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()))
}

/// Sends `signal` (e.g. "STOP") to `pid` with kill(1).
fn signal(pid: u32, signal: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .map_err(|e| format!("run kill: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{signal} {pid}: {status}"))
    }
}

/// Whether every thread of `pid` is in the stopped state (`T`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(") ")?.1.chars().next()?;
                Some(state == 'T')
            })
            .unwrap_or(false)
    })
}

/// A loopback port that is free now, below the kernel's range for
/// outgoing connections' ports (so no connection made meanwhile takes it),
/// and not handed out before by this process.
pub fn free_port() -> u16 {
    static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    let taken = taken.get_or_insert_with(HashSet::new);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 11_000 {
        for _ in 0..1000 {
            let port = fastrand::u16(10_000..low);
            if !taken.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                taken.insert(port);
                return port;
            }
        }
    }
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        if taken.insert(port) {
            return port;
        }
    }
}

/// GETs `path` from the HTTP server at `addr` and parses the body as JSON.
async fn get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let get = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no end of header in {text:?}"))?;
        let status = head.split_whitespace().nth(1).unwrap_or_default();
        if status != "200" {
            return Err(format!("status {status}: {body}"));
        }
        serde_json::from_str(body).map_err(|e| format!("{e} in {body:?}"))
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .map_err(|_| "no answer within 5s".to_owned())?
}

/// A `[cluster]` section for node `node` of cluster `test` on the NATS
/// server at `nats`, without credentials.
pub fn cluster_config(
    nats: &str,
    node: &str,
    heartbeat: Duration,
) -> wsbridge::config::ClusterConfig {
    wsbridge::config::ClusterConfig {
        nats: vec![nats.to_owned()],
        node: node.to_owned(),
        name: "test".to_owned(),
        token: None,
        user: None,
        password: None,
        creds: None,
        tls_ca: None,
        heartbeat,
    }
}

/// The same, as TOML for a bridge process (`heartbeat` `None`: the default).
pub fn cluster_toml(nats: &str, node: &str, heartbeat: Option<&str>) -> String {
    let beat = heartbeat.map_or(String::new(), |h| format!("heartbeat = \"{h}\"\n"));
    format!("[cluster]\nnats = [\"{nats}\"]\nnode = \"{node}\"\nname = \"test\"\n{beat}")
}
