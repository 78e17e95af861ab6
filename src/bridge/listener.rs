//! The caller listener: accepts connections (within `max_connections` and
//! `allow_from`), tells HTTP/2 from HTTP/1 by a connection's first bytes,
//! serves each with hyper until it ends, and shuts them down gracefully.
//! Each request on a connection is answered by [`super::http::handle`].

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use http::Request;
use hyper::{
    body::Incoming,
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::GracefulConnection,
};
use tokio::{
    net::TcpListener,
    sync::{watch, OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::{
    caller::Caller,
    http::handle,
    send_timeout::SendTimeout,
    sniff::{sniff, Replay},
    Shared,
};
use crate::{config::Config, protocol};

/// Accepts caller connections until `shutdown`, then drains them for up to
/// `shutdown_timeout`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let connections_open = TaskTracker::new();
    // Rebuilt when a reload changes the settings.
    let mut current = shared.settings.load_full();
    let mut builders = Arc::new(Builders::new(&current.config));
    let connections = Arc::new(Semaphore::new(current.config.http.max_connections));
    loop {
        // At the connection limit, stop accepting: callers wait in the
        // kernel's backlog rather than being refused.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let Some((tcp, peer)) = super::accept(&listener, &shutdown, "caller").await else {
            break;
        };
        let _ = tcp.set_nodelay(true);
        let settings = shared.settings.load();
        if !Arc::ptr_eq(&settings, &current) {
            current = Arc::clone(&settings);
            builders = Arc::new(Builders::new(&current.config));
        }
        // Spawned as it is: wrapped in an async block, its future would be
        // kept twice in the task (captured, then awaited).
        connections_open.spawn(connection(
            tcp,
            peer,
            builders.clone(),
            shared.clone(),
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    connections_open.close();
    let deadline = shared.settings.load().config.shutdown_timeout;
    info!(
        open = connections_open.len(),
        ?deadline,
        "stopped accepting calls; draining"
    );
    if tokio::time::timeout(deadline, connections_open.wait())
        .await
        .is_err()
    {
        warn!(
            ?deadline,
            "shutdown deadline reached: calls still in flight fail with 502 worker_lost as their workers are disconnected"
        );
    }
}

/// Serves one caller connection to its end: HTTP/1 or, if its first bytes
/// say so, HTTP/2. At `shutdown` the connection is asked to finish
/// gracefully (calls in flight complete; HTTP/1 stops keep-alive, HTTP/2
/// sends GOAWAY); so is an HTTP/2 connection with no call open for
/// `header_read_timeout`, as HTTP/1 closes an idle keep-alive connection.
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    builders: Arc<Builders>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    // Held until the connection ends: `max_connections`.
    _permit: OwnedSemaphorePermit,
) {
    let (h2, tcp) = match &builders.h2 {
        None => (None, Replay::plain(tcp)),
        Some(h2) => {
            let sniffed = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(builders.idle, sniff(tcp)) => r,
            };
            match sniffed {
                Ok(Ok((yes, tcp))) => (yes.then_some(h2), tcp),
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "caller connection failed before its first bytes");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "caller connection sent nothing; closed");
                    return;
                }
            }
        }
    };
    let io = TokioIo::new(SendTimeout::new(tcp, builders.send_timeout));
    // HTTP/2: the calls open on the connection, for its idle timeout.
    let (calls, idle) = match h2 {
        Some(_) => {
            let (tx, rx) = watch::channel(0);
            (Some(tx), Some((rx, builders.idle)))
        }
        None => (None, None),
    };
    // Formatted once per connection, not per request.
    let caller = Arc::new(Caller {
        addr: peer,
        ip: peer.ip().to_string().into(),
        calls,
    });
    let service = service_fn(move |req: Request<Incoming>| {
        // The head is boxed: the request and call futures would otherwise
        // each keep two copies of its 224 bytes (an async fn's argument and
        // the local it is moved to), for as long as the call is in flight.
        let (head, body) = req.into_parts();
        handle(shared.clone(), caller.clone(), Box::new(head), body)
    });
    let ended = match h2 {
        Some(h2) => {
            // Boxed: an HTTP/2 connection's state is about twice an
            // HTTP/1 one's, and every connection's task would make room
            // for it.
            let mut conn = Box::pin(h2.serve_connection(io, service));
            drive(conn.as_mut(), &shutdown, idle).await
        }
        None => {
            let conn = std::pin::pin!(builders.h1.serve_connection(io, service));
            drive(conn, &shutdown, None).await
        }
    };
    if let Err(e) = ended {
        debug!(%peer, error = %e, "caller connection ended with an error");
    }
}

/// Drives `conn` to its end, asking it to finish gracefully at `shutdown`
/// or once `idle` says no call has been open for its duration.
/// (`conn` is pinned by the caller: an async fn keeps a by-value argument
/// twice, and a connection is a few hundred bytes to a few kilobytes.)
async fn drive<C: GracefulConnection>(
    mut conn: Pin<&mut C>,
    shutdown: &CancellationToken,
    idle: Option<(watch::Receiver<usize>, Duration)>,
) -> Result<(), C::Error> {
    let quiet = || async {
        match &idle {
            Some((calls, limit)) => until_idle(calls.clone(), *limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        ended = conn.as_mut() => return ended,
        _ = shutdown.cancelled() => {}
        _ = quiet() => {}
    }
    conn.as_mut().graceful_shutdown();
    // An HTTP/2 peer may never complete the graceful close (GOAWAY waits
    // for its answer to a PING; a peer that stopped mid-preface never gets
    // that far). Once no call has been open for the idle limit again, the
    // connection is dropped: no call can be lost by that.
    tokio::select! {
        ended = conn.as_mut() => ended,
        _ = quiet() => Ok(()),
    }
}

/// Returns once `calls` (the calls open on a connection) has stayed at zero
/// for `limit`.
async fn until_idle(mut calls: watch::Receiver<usize>, limit: Duration) {
    loop {
        if calls.wait_for(|open| *open == 0).await.is_err() {
            return std::future::pending().await;
        }
        match tokio::time::timeout(limit, calls.changed()).await {
            Err(_) => return,
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return std::future::pending().await,
        }
    }
}

/// How caller connections are served, made from the config (and remade
/// when a reload changes it).
struct Builders {
    h1: http1::Builder,
    /// `None` when `http.http2` is off: every connection is HTTP/1.
    h2: Option<http2::Builder<TokioExecutor>>,
    /// `header_read_timeout`: how long a new connection may take to send
    /// its first bytes (which tell HTTP/2 from HTTP/1), and how long an
    /// HTTP/2 connection may stay open with no call.
    idle: Duration,
    send_timeout: Duration,
}

impl Builders {
    fn new(config: &Config) -> Builders {
        let http = &config.http;
        let mut h1 = http1::Builder::new();
        // Without a timer hyper silently ignores header_read_timeout.
        h1.timer(TokioTimer::new())
            .header_read_timeout(http.header_read_timeout)
            // hyper's default max_headers (100): see conformance::MAX_HEADERS.
            .keep_alive(true);
        let h2 = http.http2.then(|| {
            let mut h2 = http2::Builder::new(TokioExecutor::new());
            h2.timer(TokioTimer::new())
                .max_concurrent_streams(http.http2_max_streams)
                // The frame protocol's own bound on a request head.
                .max_header_list_size(protocol::MAX_HEADER_LEN as u32);
            h2
        });
        Builders {
            h1,
            h2,
            idle: http.header_read_timeout,
            send_timeout: http.send_timeout,
        }
    }
}
