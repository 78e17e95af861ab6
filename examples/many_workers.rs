//! Opens `--m` worker connections from one process with the
//! `wsbridge::worker` library (echo handlers), for `scripts/bench-scale.sh`.
//!
//! It waits for every connection to be welcomed (the library's status
//! channel turns `Connected` only after the bridge has registered the worker
//! and sent its welcome), and with `--bridge-pid` samples the bridge's
//! `VmRSS` before connecting and once all are connected. It then prints
//! `RESULT key=value ...` (memory in KiB) and keeps the connections open
//! until stdin closes or Ctrl-C, unless `--exit` is given.

use std::{sync::Arc, time::Duration};

use clap::Parser;

#[path = "support/mod.rs"]
mod support;
use http::{Request, Response};
use tokio::{io::AsyncReadExt, sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use wsbridge::body::Body;
use wsbridge::worker::{Worker, WorkerConfig};

use support::{rss_kib, Error};

#[derive(Parser, Debug)]
#[command(about = "Open many worker connections and measure the bridge")]
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
    /// Service each worker serves.
    #[arg(long, default_value = "default")]
    service: String,
    /// Worker connections to open.
    #[arg(long, default_value_t = 1000)]
    m: u32,
    /// The bridge's pid, to sample its memory.
    #[arg(long)]
    bridge_pid: Option<u32>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout_s: u64,
    /// Exit after printing the result instead of holding the connections.
    #[arg(long)]
    exit: bool,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let tls = match &args.ca {
        Some(ca) => Some(wsbridge::tls::client_config(Some(ca.as_path()))?),
        None => None,
    };
    let pid = args.bridge_pid;
    let rss_before = pid.map(rss_kib).transpose()?;
    let own_before = rss_kib(std::process::id())?;

    let started = Instant::now();
    let (up_tx, mut up) = watch::channel(0u32);
    let up_tx = Arc::new(up_tx);
    let shutdown = CancellationToken::new();
    for i in 0..args.m {
        let mut config = WorkerConfig::new(&args.url, &args.token, [&args.service]);
        config.worker_id = format!("many-{i}");
        config.tls = tls.clone();
        let worker = Worker::new(config, |req: Request<Body>| async move {
            Response::new(req.into_body())
        });
        support::spawn_counted(worker, i, up_tx.clone(), shutdown.clone());
    }
    let m = args.m;
    let waited = tokio::time::timeout(
        Duration::from_secs(args.timeout_s),
        up.wait_for(|n| *n >= m),
    )
    .await
    .map(|r| r.map(|_| ()));
    match waited {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {
            let n = *up.borrow();
            return Err(format!("only {n} of {m} workers connected in time").into());
        }
    }
    let connect_ms = started.elapsed().as_secs_f64() * 1000.0;
    let rss_after = pid.map(rss_kib).transpose()?;
    let own_after = rss_kib(std::process::id())?;
    let per = match (rss_before, rss_after) {
        (Some(b), Some(a)) => format!("{:.2}", a.saturating_sub(b) as f64 / f64::from(m)),
        _ => "na".to_owned(),
    };
    let opt = |v: Option<usize>| v.map_or_else(|| "na".to_owned(), |v| v.to_string());
    println!(
        "RESULT m={m} connect_ms={connect_ms:.1} rss_before_kib={} rss_after_kib={} \
         per_worker_kib={per} own_before_kib={own_before} own_after_kib={own_after} \
         own_per_worker_kib={:.2}",
        opt(rss_before),
        opt(rss_after),
        own_after.saturating_sub(own_before) as f64 / f64::from(m),
    );
    if args.exit {
        return Ok(());
    }
    // Hold until stdin closes (or Ctrl-C).
    let (mut stdin, mut sink) = (tokio::io::stdin(), Vec::new());
    tokio::select! {
        _ = stdin.read_to_end(&mut sink) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shutdown.cancel();
    Ok(())
}
