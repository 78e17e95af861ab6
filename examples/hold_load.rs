//! Load generator for `scripts/bench-scale.sh`: opens `--n` plain HTTP/1.1
//! connections to the bridge, sends one small request on each at the same
//! moment, and records each call's latency. With `--h2-streams K` the calls
//! are HTTP/2 streams instead (prior knowledge), K per connection, so `--n`
//! is not bounded by the open-files limit. Meant for a worker that holds
//! every call for a fixed delay (`examples/delay_worker.rs`), so that all
//! `--n` calls are in flight at once.
//!
//! With `--bridge-pid` it also samples the bridge's `VmRSS` three times, each
//! on an event rather than after a guessed sleep:
//!
//! 1. before connecting;
//! 2. once the bridge holds every caller socket (its fd count in
//!    `/proc/<pid>/fd` has grown by their number), before any request is sent;
//! 3. once the worker reports, on its control connection (`wait N`), that it
//!    holds all `--n` calls.
//!
//! Connections are bound to source addresses 127.0.0.2, 127.0.0.3, ... with
//! `--per-source` connections each, so that more than one address's
//! ephemeral ports (about 28,000 by default) can be used.
//!
//! The last line of output is `RESULT key=value ...` (latencies in
//! milliseconds, memory in KiB).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[path = "support/mod.rs"]
mod support;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpSocket, TcpStream},
    sync::{watch, Semaphore},
    task::JoinSet,
    time::Instant,
};

use support::{rss_kib, Error};

type H2Sender = http2::SendRequest<Full<Bytes>>;

#[derive(Parser, Debug)]
#[command(about = "Hold N concurrent calls through the bridge and measure them")]
struct Args {
    /// The bridge's HTTP listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: SocketAddr,
    /// Concurrent calls (one connection each).
    #[arg(long)]
    n: usize,
    /// Request path.
    #[arg(long, default_value = "/hold")]
    path: String,
    /// The worker's fixed delay, subtracted to get the added latency.
    #[arg(long, default_value_t = 2000)]
    delay_ms: u64,
    /// The delay worker's control listener.
    #[arg(long, default_value = "127.0.0.1:9901")]
    control: SocketAddr,
    /// The bridge's pid, to sample its memory.
    #[arg(long)]
    bridge_pid: Option<u32>,
    /// First source address; each next one takes `--per-source` connections.
    #[arg(long, default_value = "127.0.0.2")]
    first_source: Ipv4Addr,
    /// Connections per source address.
    #[arg(long, default_value_t = 20_000)]
    per_source: usize,
    /// Connection attempts at once.
    #[arg(long, default_value_t = 512)]
    connect_concurrency: usize,
    /// Sequential probe calls (to `/probe`, answered at once) made on one
    /// more connection while all `--n` calls are held: the latency of a call
    /// through a bridge that holds `--n` others.
    #[arg(long, default_value_t = 300)]
    probes: usize,
    /// HTTP/2 with prior knowledge, this many calls per connection (the
    /// bridge's `http2_max_streams` must allow them); 0: HTTP/1.1, one
    /// connection per call.
    #[arg(long, default_value_t = 0)]
    h2_streams: usize,
    /// Give up on any phase after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout_s: u64,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    if args.n == 0 || args.per_source == 0 {
        return Err("--n and --per-source must be at least 1".into());
    }
    let limit = Duration::from_secs(args.timeout_s);

    // The worker must be connected before anything is measured.
    let mut control = within(
        limit,
        "the worker's control listener",
        connect_retry(args.control),
    )
    .await??;
    let ready = within(
        limit,
        "the worker to connect",
        command(&mut control, "ready"),
    )
    .await??;
    eprintln!("hold_load: worker {ready}");

    let pid = args.bridge_pid;
    let rss_before = pid.map(rss_kib).transpose()?;
    let fds_before = pid.map(fd_count).transpose()?;

    // Phase 1: all connections, no request yet.
    let connections = match args.h2_streams {
        0 => args.n,
        k => args.n.div_ceil(k),
    };
    let t_connect = Instant::now();
    let streams = within(limit, "connecting", connect_all(&args, connections)).await??;
    let (streams, senders) = match args.h2_streams {
        0 => (streams, Vec::new()),
        _ => {
            let senders = within(limit, "HTTP/2 handshakes", h2_handshakes(streams)).await??;
            (Vec::new(), senders)
        }
    };
    let connect_ms = ms(t_connect.elapsed());
    let rss_connected = match (pid, fds_before) {
        (Some(pid), Some(before)) => {
            let want = before + connections;
            within(limit, "the bridge to accept every connection", async {
                while fd_count(pid)? < want {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok::<_, Error>(())
            })
            .await??;
            Some(rss_kib(pid)?)
        }
        _ => None,
    };
    eprintln!("hold_load: {connections} connections open in {connect_ms:.0} ms");

    // Phase 2: every call at the same moment.
    let (go_tx, go) = watch::channel(false);
    let mut calls = JoinSet::new();
    let url = format!("http://{}{}", args.target, args.path);
    // HTTP/2: the calls spread over the connections, round robin.
    for (sender, _) in senders.iter().cycle().zip(0..args.n) {
        let (mut sender, mut go) = (sender.clone(), go.clone());
        let url = url.clone();
        calls.spawn(async move {
            if go.wait_for(|g| *g).await.is_err() {
                return Err("never started".to_owned());
            }
            let req = http::Request::post(url)
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from_static(b"hi")))
                .map_err(|e| e.to_string())?;
            let t0 = Instant::now();
            sender
                .ready()
                .await
                .map_err(|e| format!("connection: {e}"))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = resp.status().as_u16();
            resp.into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            Ok((t0.elapsed(), status))
        });
    }
    let request = Arc::new(format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi",
        args.path, args.target
    ));
    // HTTP/1.1: one request on every connection (none with HTTP/2).
    for mut stream in streams {
        let (request, mut go) = (request.clone(), go.clone());
        calls.spawn(async move {
            if go.wait_for(|g| *g).await.is_err() {
                return Err("never started".to_owned());
            }
            let t0 = Instant::now();
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            let status = read_response(&mut stream).await?;
            Ok((t0.elapsed(), status))
        });
    }
    let go_at = Instant::now();
    let _ = go_tx.send(true);

    // Phase 3: the worker holds every call.
    let held = within(
        limit,
        "the worker to hold every call",
        command(&mut control, &format!("wait {}", args.n)),
    )
    .await??;
    let rss_held = pid.map(rss_kib).transpose()?;
    let dispatch_ms = ms(go_at.elapsed());
    eprintln!("hold_load: worker {held} after {dispatch_ms:.0} ms");
    let held_n: u64 = held
        .split_whitespace()
        .nth(1)
        .and_then(|h| h.parse().ok())
        .unwrap_or(0);

    // Phase 3b: probes while everything is held. The worker's delay must
    // outlast them; the level's delay is chosen for that.
    let probe = within(limit, "the probes", probes(&args)).await??;
    let probe_pct = |q: f64| {
        let rank = ((q * probe.len() as f64).ceil() as usize).clamp(1, probe.len().max(1));
        probe.get(rank - 1).map_or(f64::NAN, |d| ms(*d))
    };
    eprintln!(
        "hold_load: {} probes while {held_n} held: p50 {:.3} ms, p99 {:.3} ms",
        probe.len(),
        probe_pct(0.5),
        probe_pct(0.99)
    );

    // Phase 4: every reply.
    let mut latencies = Vec::with_capacity(args.n);
    let (mut errors, mut bad_status, mut first_error) = (0usize, 0usize, None);
    let collect = async {
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok(Ok((latency, 200))) => latencies.push(latency),
                Ok(Ok((_, status))) => {
                    bad_status += 1;
                    first_error.get_or_insert(format!("status {status}"));
                }
                Ok(Err(e)) => {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
    };
    within(
        limit + Duration::from_millis(args.delay_ms),
        "the replies",
        collect,
    )
    .await?;
    if let Some(e) = &first_error {
        eprintln!("hold_load: {errors} errors, {bad_status} non-200; first: {e}");
    }

    latencies.sort_unstable();
    let delay = Duration::from_millis(args.delay_ms);
    let pct = |q: f64| {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        ms(latencies[rank - 1])
    };
    let added = |q: f64| pct(q) - ms(delay);
    let opt = |v: Option<usize>| v.map_or_else(|| "na".to_owned(), |v| v.to_string());
    println!(
        "RESULT n={} delay_ms={} ok={} errors={} non200={} held={} connect_ms={:.1} dispatch_ms={:.1} \
         p50_ms={:.3} p99_ms={:.3} max_ms={:.3} added_p50_ms={:.3} added_p99_ms={:.3} \
         rss_before_kib={} rss_connected_kib={} rss_held_kib={} probe_p50_ms={:.3} probe_p99_ms={:.3}",
        args.n,
        args.delay_ms,
        latencies.len(),
        errors,
        bad_status,
        held_n,
        connect_ms,
        dispatch_ms,
        pct(0.50),
        pct(0.99),
        pct(1.0),
        added(0.50),
        added(0.99),
        opt(rss_before),
        opt(rss_connected),
        opt(rss_held),
        probe_pct(0.50),
        probe_pct(0.99),
    );
    Ok(())
}

/// `--probes` sequential keep-alive calls to `/probe`; their latencies, sorted.
async fn probes(args: &Args) -> Result<Vec<Duration>, Error> {
    let mut stream = TcpStream::connect(args.target).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "POST /probe HTTP/1.1\r\nHost: {}\r\nContent-Length: 2\r\n\r\nhi",
        args.target
    );
    let mut latencies = Vec::with_capacity(args.probes);
    for _ in 0..args.probes {
        let t0 = Instant::now();
        stream.write_all(request.as_bytes()).await?;
        let status = read_response(&mut stream).await?;
        if status != 200 {
            return Err(format!("probe answered {status}").into());
        }
        latencies.push(t0.elapsed());
    }
    latencies.sort_unstable();
    Ok(latencies)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `fut` with a deadline whose error names what was awaited.
async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("timed out after {limit:?} waiting for {what}").into())
}

/// Connects to the worker's control listener, which may not be up yet.
async fn connect_retry(addr: SocketAddr) -> Result<BufReader<TcpStream>, Error> {
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(BufReader::new(s)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends one control command and returns the answer line.
async fn command(control: &mut BufReader<TcpStream>, cmd: &str) -> Result<String, Error> {
    control
        .get_mut()
        .write_all(format!("{cmd}\n").as_bytes())
        .await?;
    let mut line = String::new();
    if control.read_line(&mut line).await? == 0 {
        return Err("the worker closed its control connection".into());
    }
    Ok(line.trim().to_owned())
}

/// Opens `count` connections, spread over source addresses.
async fn connect_all(args: &Args, count: usize) -> Result<Vec<TcpStream>, Error> {
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let first = u32::from(args.first_source);
    for i in 0..count {
        let offset = u32::try_from(i / args.per_source)?;
        let source = Ipv4Addr::from(first.checked_add(offset).ok_or("out of source addresses")?);
        if !source.is_loopback() {
            return Err(format!("source address {source} is not loopback: lower --n").into());
        }
        let (gate, target) = (gate.clone(), args.target);
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
            let stream = socket
                .connect(target)
                .await
                .map_err(|e| format!("connect from {source}: {e}"))?;
            stream.set_nodelay(true)?;
            Ok::<_, Error>(stream)
        });
    }
    let mut streams = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        streams.push(joined??);
    }
    Ok(streams)
}

/// An HTTP/2 client connection (prior knowledge) on each stream, driven by
/// its own task.
async fn h2_handshakes(streams: Vec<TcpStream>) -> Result<Vec<H2Sender>, Error> {
    let mut senders = Vec::with_capacity(streams.len());
    for stream in streams {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        senders.push(sender);
    }
    Ok(senders)
}

/// Reads one HTTP/1.1 response (Content-Length or chunked); returns its status.
async fn read_response(stream: &mut TcpStream) -> Result<u16, String> {
    let mut buf = Vec::with_capacity(512);
    let mut tmp = [0u8; 512];
    loop {
        let n = stream
            .read(&mut tmp)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before the response ended".into());
        }
        buf.extend_from_slice(&tmp[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        let body = &buf[end + 4..];
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let complete = match length {
            Some(len) => body.len() >= len,
            None if head.contains("transfer-encoding: chunked") => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            return Ok(status);
        }
    }
}

/// Open file descriptors of a process.
fn fd_count(pid: u32) -> Result<usize, Error> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}
