//! The connection loop: one live connection to the bridge, from the welcome
//! to its end. It reads frames and dispatches them (requests start calls,
//! body chunks feed them, `cancel`, `credit` and `start` reach them), runs
//! the writer task fed by the outbox, and drains on shutdown.
//!
//! A bridge that goes silent (no frame or ping within
//! `ping_interval * (ping_misses + 1)` from the welcome) is treated as gone,
//! so a connection cut without a FIN never leaves the worker waiting.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{stream::SplitSink, SinkExt, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tokio_tungstenite::{tungstenite::Message, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    body::Body,
    protocol::{self, Compression, Control, DataHead, Welcome, CHUNK_SIZE},
    transport::{self, Inbox, OutFrame, Outbox},
};

use super::{
    call::{abandon, lock, CallCtx, Calls, Handler},
    resume::Carry,
};

/// What a worker connection can fail with.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The URL is not a `ws://` or `wss://` URL with a host.
    #[error("invalid bridge URL {0:?}: {1}")]
    Url(String, String),
    /// Connecting, TLS or the upgrade failed.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The bridge refused the upgrade or the hello.
    #[error("bridge refused the worker: {0}")]
    Rejected(String),
    /// The connection broke.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The bridge closed this connection because a newer one claimed the
    /// same worker id (`workers.duplicate_ids = "replace"`). The worker
    /// stops: reconnecting would replace the newer one in turn.
    #[error("replaced: another worker connected with the same worker_id ({0})")]
    Replaced(String),
}

/// What this side settled in the handshake, beyond the welcome's figures.
#[derive(Debug, Clone, Copy)]
pub(super) struct Terms {
    /// Body compression both sides may use.
    pub(super) codec: Compression,
    /// Largest message from the bridge; also the most a compressed body may
    /// inflate to.
    pub(super) max_frame: usize,
    /// Longest wait, after shutdown was asked for, for the calls in flight.
    pub(super) drain_timeout: Duration,
    /// Calls wait for `start` (the hello said `"accepted": true`).
    pub(super) start_gate: bool,
}

/// Serves calls on an established connection until it ends.
pub(super) async fn serve<S>(
    ws: WebSocketStream<S>,
    welcome: &Welcome,
    terms: Terms,
    handler: Arc<dyn Handler>,
    shutdown: &CancellationToken,
    carry: &mut Carry,
) -> Result<(), WorkerError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The welcome comes from the network: clamp it rather than trust it
    // with arithmetic (a zero or absurd interval must not spin or overflow).
    let interval = Duration::from_millis(welcome.ping_interval_ms.clamp(10, 86_400_000));
    let silence = transport::dead_after(interval, welcome.ping_misses.clamp(1, 1000));
    // A window below one chunk could never let a chunk through.
    let window = (welcome.window > 0).then(|| {
        usize::try_from(welcome.window)
            .unwrap_or(usize::MAX)
            .clamp(CHUNK_SIZE, 64 << 20)
    });
    let (sink, mut stream) = ws.split();
    // The queue outlives the connection: what is still in it when the
    // connection drops goes out on the resumed one.
    let outbox = carry.outbox.clone();
    let inbox = carry.inbox.clone();
    let conn = CancellationToken::new();
    let _stop_writer = conn.clone().drop_guard();
    let writer_conn = conn.clone();
    // Set when the silence limit fires: the link is presumed dead and the
    // connection is dropped without a close frame, because a close frame
    // that did get through would end the session instead of keeping it for
    // a resume (PROTOCOL.md 8.3, 8.5).
    let silent = Arc::new(AtomicBool::new(false));
    let dropped = silent.clone();
    let calls = carry.calls.clone();
    spawn_writer(sink, inbox, calls.clone(), writer_conn, silence, dropped);

    let ctx = CallCtx {
        handler,
        outbox: outbox.clone(),
        calls: calls.clone(),
        partial: carry.partial.clone(),
        starts: carry.starts.clone(),
        replied: carry.replied.clone(),
        window,
        codec: terms.codec,
        gate: terms.start_gate,
    };
    let inflate_limit = match terms.codec {
        Compression::None => 0,
        Compression::Lz4 => terms.max_frame,
    };
    // Set once shutdown was asked for: the bridge has been told to drain
    // this worker and will close the connection after its last reply.
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled(), if drain_deadline.is_none() => {
                info!(in_flight = lock(&calls).len(), "draining: no new calls; finishing the ones in flight");
                outbox.control(OutFrame::text(protocol::encode_control(&Control::Drain)));
                drain_deadline = Some(Instant::now() + terms.drain_timeout);
                continue;
            }
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if drain_deadline.is_some() => {
                warn!(in_flight = lock(&calls).len(), timeout = ?terms.drain_timeout, "drain timed out; abandoning the calls in flight");
                return Ok(());
            }
            _ = conn.cancelled() => return Err(WorkerError::Lost("write to bridge failed".into())),
            m = tokio::time::timeout(silence, stream.next()) => m,
        };
        let msg = match msg {
            Err(_) => {
                silent.store(true, Ordering::Release);
                return Err(WorkerError::Lost(format!("bridge silent for {silence:?}")));
            }
            // After a drain the bridge closes once the last reply is in.
            Ok(None) if drain_deadline.is_some() => return Ok(()),
            Ok(None) => return Err(WorkerError::Lost("connection closed".into())),
            Ok(Some(Err(e))) => return Err(WorkerError::Lost(e.to_string())),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Binary(frame) => on_data(&ctx, &frame, inflate_limit),
            Message::Text(text) => on_control(&ctx, &text),
            Message::Close(_) if drain_deadline.is_some() => {
                info!("drained: the bridge closed the connection after the last reply");
                return Ok(());
            }
            Message::Close(Some(frame)) if frame.reason.starts_with("replaced") => {
                carry.closed_by_bridge = true;
                return Err(WorkerError::Replaced(frame.reason.to_string()));
            }
            Message::Close(frame) => {
                carry.closed_by_bridge = true;
                let why = frame
                    .map(|f| format!(" ({} {})", f.code, f.reason))
                    .unwrap_or_default();
                return Err(WorkerError::Lost(format!(
                    "bridge closed the connection{why}"
                )));
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

/// Spawns the connection's writer: the outbox's queues to the socket, in
/// batches, until the connection ends (`writer_conn` is cancelled either way).
/// The inbox is locked for as long as the writer runs. A batch waits for
/// more frames only while other calls than its own are in progress.
fn spawn_writer<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    inbox: Arc<tokio::sync::Mutex<Inbox>>,
    calls: Calls,
    writer_conn: CancellationToken,
    silence: Duration,
    dropped: Arc<AtomicBool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut inbox = inbox.lock_owned().await;
        loop {
            let msg = tokio::select! {
                _ = writer_conn.cancelled() => break,
                m = inbox.recv() => match m { Some(m) => m, None => break },
            };
            let busy = lock(&calls).len() > 1;
            // A bridge that stops reading must not keep this task (and the
            // socket) alive after the connection is given up.
            let written = tokio::select! {
                _ = writer_conn.cancelled() => break,
                r = transport::write_batch(&mut sink, msg, &mut inbox, busy, silence) => r,
            };
            if let Err(e) = written {
                debug!(error = %e, "write to bridge failed");
                break;
            }
        }
        writer_conn.cancel();
        drop(inbox); // free for the next connection's writer at once
        if !dropped.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        }
    });
}

/// A binary frame from the bridge: a request starts a call (its body whole,
/// or streamed with the chunks that follow), a body chunk feeds its call.
fn on_data(ctx: &CallCtx, frame: &Bytes, inflate_limit: usize) {
    let (partial, outbox) = (&ctx.partial, &ctx.outbox);
    match protocol::decode_data(frame, inflate_limit) {
        Ok((DataHead::Request(head), body)) if head.end => ctx.start(head, Body::full(body)),
        Ok((DataHead::Request(head), body)) => {
            // The handler starts now and reads the body as it comes;
            // with flow control, what it reads is credited back.
            let (tx, stream) = Body::channel();
            tx.send(body);
            let stream = match ctx.window {
                None => stream,
                Some(_) => {
                    let (outbox, id) = (outbox.clone(), head.id);
                    stream.on_read(move |n| {
                        let frame = Control::Credit {
                            id,
                            bytes: n as u64,
                        };
                        outbox.control(OutFrame::text(protocol::encode_control(&frame)));
                    })
                }
            };
            lock(partial).insert(head.id, tx);
            ctx.start(head, stream);
        }
        Ok((DataHead::Body(b), chunk)) => {
            let mut bodies = lock(partial);
            if let Some(tx) = bodies.get(&b.id) {
                tx.send(chunk);
            }
            if b.end {
                if let Some(tx) = bodies.remove(&b.id) {
                    tx.finish();
                }
            }
        }
        Ok((DataHead::Unknown, _)) => {
            send_error(outbox, None, "unknown_frame", "unknown binary frame type");
        }
        Ok((DataHead::Response(_), _)) => {
            let reason = "a bridge may not send response frames";
            send_error(outbox, None, "unexpected_frame", reason);
        }
        Err(e) => send_error(outbox, None, "malformed_frame", &e.to_string()),
    }
}

/// A control frame from the bridge, for the calls on this connection.
fn on_control(ctx: &CallCtx, text: &str) {
    let (calls, partial, starts, outbox) = (&ctx.calls, &ctx.partial, &ctx.starts, &ctx.outbox);
    match protocol::decode_control(text) {
        Ok(Control::Cancel { id, reason }) => {
            debug!(id, %reason, "call cancelled by the bridge");
            lock(starts).remove(&id);
            abandon(calls, partial, id, &reason);
        }
        Ok(Control::Credit { id, bytes }) => {
            let calls = lock(calls);
            if let Some(w) = calls.get(&id).and_then(|c| c.window.as_ref()) {
                // At most a window: a confused bridge cannot make
                // this worker queue unbounded amounts.
                w.credit(bytes);
            }
        }
        Ok(Control::Error { id, code, message }) => {
            warn!(?id, %code, %message, "bridge reported an error");
            // An error about one call ends that call on the bridge.
            if let Some(id) = id {
                lock(starts).remove(&id);
                abandon(calls, partial, id, &code);
            }
        }
        Ok(Control::Start { id }) => {
            if let Some(go) = lock(starts).remove(&id) {
                let _ = go.send(());
            }
        }
        Ok(Control::Drain) => {
            info!("the bridge is shutting down; it closes this connection when its calls are done");
        }
        Ok(Control::Unknown) => {
            send_error(outbox, None, "unknown_frame", "unknown control frame type")
        }
        Ok(_) => {}
        Err(e) => send_error(outbox, None, "malformed_frame", &e.to_string()),
    }
}

fn send_error(outbox: &Outbox, id: Option<u64>, code: &str, message: &str) {
    let frame = Control::Error {
        id,
        code: code.to_owned(),
        message: message.to_owned(),
    };
    outbox.try_control(OutFrame::text(protocol::encode_control(&frame)));
}
