//! A worker that answers every call after a fixed delay, for scale
//! benchmarks (`scripts/bench-scale.sh`): it holds as many calls at once as
//! the bridge sends it, and says how many it holds.
//!
//! One process opens `--connections` worker connections (the protocol caps
//! one connection's `max_inflight` at 65,536), each declaring
//! `--max-inflight`. A small control listener (`--control`, loopback only)
//! answers two line commands, so a load generator can wait for events
//! instead of guessing with sleeps:
//!
//! * `ready`  -> `ready <connections>` once every connection is welcomed;
//! * `wait N` -> `held <H> started <S>` as soon as `N` calls are held at
//!   once, or `N` calls have started (then `H` says how many were still held
//!   when the last one arrived, should the first ones have finished already).
//!
//! Calls to paths under `/probe` are answered at once and not counted.
//!
//! ```text
//! cargo run --release --example delay_worker -- --url wss://127.0.0.1:8443 \
//!     --ca certs/server.crt --delay-ms 2000 --control 127.0.0.1:9901
//! ```

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::Parser;

#[path = "support/mod.rs"]
mod support;
use http::{Request, Response};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use wsbridge::body::Body;
use wsbridge::worker::{Worker, WorkerConfig};

#[derive(Parser, Debug)]
#[command(about = "A worker that answers every call after a fixed delay")]
struct Args {
    /// The bridge's worker listener.
    #[arg(long, default_value = "wss://127.0.0.1:8443")]
    url: String,
    /// Bearer token.
    #[arg(long, env = "WSBRIDGE_TOKEN", default_value = "change-me")]
    token: String,
    /// CA certificate for the bridge (PEM); default: system roots.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// Service to serve.
    #[arg(long, default_value = "default")]
    service: String,
    /// How long each call is held before its reply.
    #[arg(long, default_value_t = 2000)]
    delay_ms: u64,
    /// Worker connections to open.
    #[arg(long, default_value_t = 1)]
    connections: u32,
    /// Calls each connection takes at once (at most 65,536).
    #[arg(long, default_value_t = 65_536)]
    max_inflight: u32,
    /// Control listener (loopback), see the module docs.
    #[arg(long, default_value = "127.0.0.1:9901")]
    control: SocketAddr,
}

/// Calls held right now and calls started since start-up.
#[derive(Clone, Copy, Default)]
struct Counts {
    held: u64,
    started: u64,
}

/// Counts a call as held for as long as it lives, however it ends (a
/// cancelled call's future is dropped mid-sleep).
struct Holding(Arc<watch::Sender<Counts>>);

impl Holding {
    fn new(counts: Arc<watch::Sender<Counts>>) -> Self {
        counts.send_modify(|c| {
            c.held += 1;
            c.started += 1;
        });
        Holding(counts)
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.send_modify(|c| c.held = c.held.saturating_sub(1));
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.control.ip().is_loopback() {
        return Err("--control must be a loopback address".into());
    }
    let tls = match &args.ca {
        Some(ca) => Some(wsbridge::tls::client_config(Some(ca.as_path()))?),
        None => None,
    };
    let delay = Duration::from_millis(args.delay_ms);
    let counts = Arc::new(watch::Sender::new(Counts::default()));
    let (connected_tx, connected) = watch::channel(0u32);
    let connected_tx = Arc::new(connected_tx);
    let listener = TcpListener::bind(args.control).await?;

    let shutdown = CancellationToken::new();
    for i in 0..args.connections {
        let mut config = WorkerConfig::new(&args.url, &args.token, [&args.service]);
        config.worker_id = format!("delay-{i}");
        config.max_inflight = args.max_inflight;
        config.tls = tls.clone();
        let handler_counts = counts.clone();
        let worker = Worker::new(config, move |req: Request<Body>| {
            // Probes (paths under /probe) are answered at once and not
            // counted: they measure the bridge while the others are held.
            let holding = (!req.uri().path().starts_with("/probe"))
                .then(|| Holding::new(handler_counts.clone()));
            async move {
                if holding.is_some() {
                    tokio::time::sleep(delay).await;
                }
                drop(holding);
                Response::new(Body::from("ok"))
            }
        });
        support::spawn_counted(worker, i, connected_tx.clone(), shutdown.clone());
    }

    let expected = args.connections;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    loop {
        let (socket, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted?,
        };
        let (counts, connected) = (counts.subscribe(), connected.clone());
        tokio::spawn(async move {
            if let Err(e) = control(socket, counts, connected, expected).await {
                eprintln!("control connection: {e}");
            }
        });
    }
    // Give the workers a moment to drain politely; the bridge closes them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Serves one control connection: line commands, answered on events.
async fn control(
    socket: TcpStream,
    mut counts: watch::Receiver<Counts>,
    mut connected: watch::Receiver<u32>,
    expected: u32,
) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        let answer = match (words.next(), words.next().map(str::parse::<u64>)) {
            (Some("ready"), None) => {
                let _ = connected.wait_for(|n| *n >= expected).await;
                format!("ready {expected}\n")
            }
            (Some("wait"), Some(Ok(n))) => {
                let c = match counts.wait_for(|c| c.held >= n || c.started >= n).await {
                    Ok(c) => *c,
                    Err(_) => Counts::default(),
                };
                format!("held {} started {}\n", c.held, c.started)
            }
            (Some("counts"), None) => {
                let c = *counts.borrow();
                format!("held {} started {}\n", c.held, c.started)
            }
            _ => "error: commands are `ready`, `wait N`, `counts`\n".to_owned(),
        };
        write.write_all(answer.as_bytes()).await?;
    }
    Ok(())
}
