//! The `wsbridge` command: argument parsing, logging and signals. The work
//! itself lives in the library.

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;
use tracing_subscriber::EnvFilter;
use wsbridge::{
    bridge,
    config::Config,
    tls::SelfSigned,
    worker::{self, Upstream, Worker, WorkerConfig},
};

/// glibc's allocator cost the bridge about 16k instructions per call
/// (`scripts/profile`); jemalloc's thread caches cost a fraction, and unlike
/// mimalloc (13.7 MB) it keeps an idle bridge at about 8 MB of RSS.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "wsbridge",
    version,
    about = "Synchronous HTTP calls to workers behind a WebSocket"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text, or as one JSON object per line (for log shippers).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Threads that run connections: default one per core; 1 runs everything
    /// on one thread, which costs the least CPU per call and gives the lowest
    /// tail latency (at the price of some peak throughput with a thousand
    /// connections), for a sidecar sharing a small machine.
    #[arg(long, global = true, env = "WSBRIDGE_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

/// The tokio runtime for `--threads`.
fn runtime(threads: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        // Not a multi-thread runtime with one worker: that one still pays for
        // its shared queues and a parked main thread, about 5% more CPU per
        // call at c=64 (docs/PERFORMANCE.md).
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(n))
            .enable_all()
            .build(),
        None => tokio::runtime::Runtime::new(),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge.
    Serve {
        /// The TOML config file.
        #[arg(long, short, default_value = "config/wsbridge.toml")]
        config: PathBuf,
    },
    /// Run a worker agent that serves calls from an upstream HTTP server (or echoes).
    Worker(WorkerArgs),
    /// Write a self-signed certificate and key for the worker listener.
    GenCert {
        /// Directory for server.crt and server.key.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Host names and IP addresses the certificate is valid for.
        #[arg(long = "host", default_values = ["localhost", "127.0.0.1"])]
        hosts: Vec<String>,
    },
    /// Print a running bridge's workers and services (from its admin listener).
    Status {
        /// The bridge's admin listener.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Print the raw JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Make a running bridge re-read its config file (as SIGHUP does), and
    /// print what changed or why the new file was rejected.
    Reload {
        /// The bridge's admin listener.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
    },
    /// Validate a config file and print the effective configuration (secrets masked).
    CheckConfig {
        /// The TOML config file.
        config: PathBuf,
    },
    /// Run the bridge with an echo worker over wss on loopback.
    Demo {
        /// HTTP port for callers (0: any free port).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Port of the worker listener (0: any free port).
        #[arg(long, default_value_t = 8443)]
        workers_port: u16,
        /// Port of the admin listener: dashboard, /status, /metrics (0: any free port).
        #[arg(long, default_value_t = 9090)]
        admin_port: u16,
    },
}

#[derive(Args)]
struct WorkerArgs {
    /// The bridge's worker URL, e.g. wss://bridge.example:8443.
    #[arg(long)]
    connect: String,
    /// Bearer token (or set WSBRIDGE_TOKEN, which keeps it out of `ps`).
    #[arg(long, env = "WSBRIDGE_TOKEN", hide_env_values = true)]
    token: String,
    /// Service to serve; repeat for several.
    #[arg(long = "service", required = true)]
    services: Vec<String>,
    /// Forward calls to this HTTP server, e.g. http://127.0.0.1:9000.
    #[arg(long, conflicts_with = "echo", required_unless_present = "echo")]
    upstream: Option<String>,
    /// Answer every call with its own body (for trying things out).
    #[arg(long)]
    echo: bool,
    /// PEM file of the CA (or self-signed certificate) to trust; default: system roots.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM chain) for a bridge that requires mutual TLS.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Calls this worker accepts at once.
    #[arg(long, default_value_t = 64)]
    max_inflight: u32,
    /// This worker's id: its name in the bridge's logs and status, and its address for calls with `Wsbridge-Worker: <id>` (default: host name and pid).
    #[arg(long)]
    id: Option<String>,
    /// Metadata for presence and fan-out selectors, as KEY=VALUE; repeat for several (e.g. --meta region=eu).
    #[arg(long = "meta", value_parser = parse_meta)]
    meta: Vec<(String, String)>,
    /// Offer LZ4 compression of body frames of 16 KiB and more (for text
    /// and JSON over links slower than the CPU; not worth it on loopback).
    #[arg(long)]
    compress: bool,
    /// Start each call at once instead of waiting for the bridge's `start`
    /// (saves a round trip per call; a POST in flight when this worker
    /// crashes then fails with 502 worker_lost rather than moving to another
    /// worker, see PROTOCOL.md 3.7).
    #[arg(long)]
    no_start_gate: bool,
    /// On SIGTERM/Ctrl-C, the longest wait for the calls in flight (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: std::time::Duration,
}

fn parse_meta(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if wsbridge::protocol::metadata_key(k) => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!(
            "{text:?} must be KEY=VALUE with a key of 1 to 64 bytes of A-Z a-z 0-9 _ - ."
        )),
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime_serde::re::humantime::parse_duration(text).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = match runtime(cli.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Spawned rather than run by block_on: a future polled by block_on runs
    // on the main thread, outside the scheduler, so every frame the worker
    // loop reads would wake another thread to handle it.
    let outcome = runtime.block_on(async { tokio::spawn(run(cli.command)).await });
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config: path } => {
            let config = Config::from_file(&path)?;
            let tls = bridge::server_tls(&config.workers)?;
            let listeners = bridge::Listeners::bind(&config)?;
            let bridge = bridge::Bridge::new(config, tls)?.with_config_file(path);
            reload_on_sighup(bridge.handle());
            bridge.serve(listeners, shutdown_on_signal()).await?;
        }
        Command::Status { admin, json } => {
            let (code, body) = admin_call(&admin, http::Method::GET, "/status").await?;
            if !code.is_success() {
                anyhow::bail!(
                    "{admin}/status answered {code}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            if json {
                println!("{}", String::from_utf8_lossy(&body));
            } else {
                let status: bridge::status::Status = serde_json::from_slice(&body)
                    .with_context(|| format!("{admin}/status did not return a wsbridge status"))?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                print!("{}", status.table(now));
            }
        }
        Command::Reload { admin } => {
            let (code, body) = admin_call(&admin, http::Method::POST, "/reload").await?;
            let text = String::from_utf8_lossy(&body);
            if !code.is_success() {
                anyhow::bail!("reload rejected ({code}): {text}");
            }
            println!("{text}");
        }
        Command::Worker(args) => {
            let mut cfg = WorkerConfig::new(args.connect, args.token, args.services);
            cfg.max_inflight = args.max_inflight;
            cfg.compression = args.compress;
            cfg.start_gate = !args.no_start_gate;
            cfg.drain_timeout = args.drain_timeout;
            if let Some(id) = args.id {
                cfg.worker_id = id;
            }
            cfg.metadata = args.meta.into_iter().collect();
            cfg.tls = match (&args.cert, &args.key) {
                (Some(cert), Some(key)) => Some(wsbridge::tls::client_config_with_identity(
                    args.ca.as_deref(),
                    cert,
                    key,
                )?),
                _ => match &args.ca {
                    Some(ca) => Some(wsbridge::tls::client_config(Some(ca))?),
                    None => None,
                },
            };
            let shutdown = shutdown_on_signal();
            match args.upstream {
                Some(url) => {
                    let upstream = Upstream::new(&url).map_err(anyhow::Error::msg)?;
                    Worker::new(cfg, move |req| upstream.forward(req))
                        .run(shutdown)
                        .await?
                }
                None => {
                    let echo = worker::echo_as(&cfg.worker_id);
                    Worker::new(cfg, echo).run(shutdown).await?
                }
            }
        }
        Command::GenCert { out, hosts } => {
            let (cert, key) = (out.join("server.crt"), out.join("server.key"));
            SelfSigned::generate(&hosts)?.write(&cert, &key)?;
            println!(
                "wrote {} and {} for {}",
                cert.display(),
                key.display(),
                hosts.join(", ")
            );
        }
        Command::CheckConfig { config } => {
            let parsed = Config::from_file(&config)?;
            println!("{} is valid:\n{parsed:#?}", config.display());
        }
        Command::Demo {
            port,
            workers_port,
            admin_port,
        } => {
            let ports = wsbridge::demo::Ports {
                http: Some(port),
                workers: Some(workers_port),
                admin: Some(admin_port),
            };
            wsbridge::demo::run(ports, shutdown_on_signal())
                .await
                .context("demo")?
        }
    }
    Ok(())
}

/// One request to a bridge's admin listener: its status and body.
async fn admin_call(
    admin: &str,
    method: http::Method,
    path: &str,
) -> anyhow::Result<(http::StatusCode, bytes::Bytes)> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let url = format!("{}{path}", admin.trim_end_matches('/'));
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("bad --admin URL {admin:?}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header(bridge::admin::ADMIN_HEADER, "1")
        .body(Empty::new())
        .context("building the request")?;
    let call = async {
        let resp = client.request(req).await?;
        let code = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((code, body))
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), call)
        .await
        .with_context(|| format!("{url} did not answer within 30s"))?
        .with_context(|| format!("cannot reach the admin listener at {url} (is the bridge running, with [admin] enabled?)"))
}

/// Reloads the config on every SIGHUP; a rejected file is logged and the
/// running config stays.
fn reload_on_sighup(handle: bridge::Handle) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; use `wsbridge reload` instead");
            return;
        };
        while hup.recv().await.is_some() {
            info!("SIGHUP: reloading the config");
            let handle = handle.clone();
            // The outcome is logged by the reload itself.
            let _ = tokio::task::spawn_blocking(move || handle.reload()).await;
        }
    });
    #[cfg(not(unix))]
    let _ = handle;
}

/// A token cancelled on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutting down");
        trigger.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
