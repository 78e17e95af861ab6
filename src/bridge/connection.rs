//! One worker's connection, bridge side, once its handshake
//! ([`super::handshake`]) is done: its registration ([`Live`]), a reader
//! that turns frames into the session's pending calls, and a writer that
//! batches frames and sends pings. The session it serves (which outlives
//! a dropped connection when the worker can resume) is `session.rs`.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    credentials::Credentials,
    handshake::{self, Terms},
    session::{Failure, Session},
    wire::{self, FrameReader, FrameWriter, Incoming, ReadError},
    Settings, Shared,
};
use crate::{
    config::DuplicateIds,
    protocol::{self, json::HeadRef, Compression, Control, DataHead},
    transport::{self, Inbox, OutFrame},
};

/// The close reason of a connection whose worker id a newer connection
/// took (PROTOCOL 3.1): the worker library stops instead of reconnecting.
pub(crate) const REPLACED: &str = "replaced: a newer connection claimed this worker_id";

/// Protocol violations after which a worker's connection is closed (1008).
const MAX_VIOLATIONS: u32 = 32;

/// Control frames that may wait behind a full urgent queue before the
/// worker counts as not reading and its connection is dropped
/// (`transport::bounded_outbox`). A live worker's backlog is bounded by its
/// calls: a `start` and a `cancel` each, a `start` again after a resume,
/// `credit`s as its callers read. Four per call it may hold, and never
/// fewer than 16384, leaves room for bursts (every caller of a busy worker
/// timing out at once) and cuts a hostile worker off at about 100 bytes a
/// frame: under 2 MB up to 4096 calls, 26 MB at the 65536 maximum.
fn overflow_limit(max_inflight: u32) -> usize {
    (4 * max_inflight as usize).max(16 * 1024)
}

/// A registered worker connection. Ending it removes the worker from the
/// registry *before* failing its pending calls, so that the capacity those
/// failures free is never handed to a call bound for the dead connection.
struct Live {
    shared: Arc<Shared>,
    /// The settings the connection started with.
    settings: Arc<Settings>,
    key: u64,
    session: Arc<Session>,
    /// The first `end`'s cause: what happened to the connection, whatever
    /// the other half of it reports afterwards.
    ended: OnceLock<String>,
    /// The close frame the worker earned by breaking the WebSocket
    /// protocol, if it did (set before the write loop is told to stop).
    earned: OnceLock<(CloseCode, String)>,
}

impl Live {
    /// Ends the connection's registration; idempotent, first cause wins.
    /// When the connection merely dropped (`may_resume`) and the worker can
    /// resume, its calls are kept for `resume_window` instead of failed.
    fn end(&self, cause: &str, may_resume: bool) {
        if self.ended.set(cause.to_owned()).is_err() {
            return;
        }
        let metrics = &self.shared.metrics;
        metrics.worker_disconnects.fetch_add(1, Ordering::Relaxed);
        let (shared, session) = (&self.shared, &self.session);
        let resumable = may_resume
            && session.terms.resumable
            && !session.drained.is_cancelled()
            && session.violations.load(Ordering::Relaxed) < MAX_VIOLATIONS;
        if resumable {
            // Out of dispatch, but the slot keeps counting the calls that
            // wait for the worker to come back.
            shared.registry.suspend(self.key);
            let window = self.settings.config.workers.resume_window;
            let registry = shared.registry.clone();
            shared
                .detached
                .hold(session.clone(), self.key, registry, window, cause);
        } else {
            shared.registry.unregister(self.key);
            session.close(cause);
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.end("connection ended", false);
    }
}

/// Serves one worker connection until it ends or the bridge shuts down.
/// `handshake` yields the stream (TLS-terminated when TLS is on) and, with
/// mutual TLS, the SHA-256 of the client certificate's DER; `None` if it
/// failed (it logs why).
///
/// Two phases, so that an idle connection keeps little: the TLS handshake,
/// the upgrade, the hello and the welcome run in a box of their own that is
/// freed once the connection is registered, and the long-lived phase holds
/// only the split socket's halves and handles. As one `async fn` the task
/// kept the largest of all its states, and every by-value argument, for the
/// connection's whole life (docs/PERFORMANCE.md "Where an idle worker
/// connection's memory goes").
pub(crate) fn serve<S, H>(
    handshake: H,
    peer: SocketAddr,
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: std::future::Future<Output = Option<(S, Option<[u8; 32]>)>> + Send + 'static,
{
    let opening = Box::pin(async move {
        let (stream, cert) = handshake.await?;
        open(stream, peer, cert, shared, settings, shutdown).await
    });
    async move {
        if let Some(opened) = opening.await {
            run(opened).await;
        }
    }
}

/// A worker connection past its handshake, registered and welcomed.
struct Opened<S> {
    writer: FrameWriter<S>,
    reader: FrameReader<ReadHalf<S>>,
    inbox: Inbox,
    live: Arc<Live>,
    session: Arc<Session>,
    key: u64,
    superseded: CancellationToken,
    peer: SocketAddr,
    worker_id: String,
    shutdown: CancellationToken,
}

/// Takes a new connection through the upgrade, the hello, a resume and
/// the welcome: `None` if it was refused or left meanwhile (logged).
async fn open<S>(
    stream: S,
    peer: SocketAddr,
    cert: Option<[u8; 32]>,
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) -> Option<Opened<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake::Accepted {
        reader,
        mut writer,
        hello,
        credentials,
    } = handshake::accept(stream, peer, cert, &settings, &shutdown).await?;
    let stall = settings.config.workers.handshake_timeout;

    let policy = settings.config.workers.duplicate_ids;
    if hello.resume.is_none()
        && policy == DuplicateIds::Refuse
        && !hello.worker_id.is_empty()
        && shared.registry.claimed(&hello.worker_id, &hello.services)
    {
        let reason = format!(
            "worker_id {:?} is already connected (workers.duplicate_ids = \"refuse\")",
            hello.worker_id
        );
        handshake::reject(&mut writer, "duplicate_worker_id", &reason, stall).await;
        info!(%peer, worker = %hello.worker_id, "worker refused: its id is taken");
        return None;
    }
    let (outbox, inbox) = transport::bounded_outbox(overflow_limit(hello.max_inflight));
    // A worker coming back after a dropped connection continues its session:
    // same id, same terms, and the calls it still runs stand.
    // Only the worker that opened it may: see `resume_lookup`.
    let resumed = match &hello.resume {
        Some(r) => resume_lookup(&shared, &hello, &credentials, r, peer)
            .await
            .map(|session| (session, r)),
        None => None,
    };
    let mut resend = Vec::new();
    let mut resumed_key = None;
    let session = match resumed {
        Some(((session, key), known)) => {
            resend = session.resume(outbox, known);
            *session.stats.peer.lock().unwrap_or_else(|p| p.into_inner()) = peer;
            resumed_key = Some(key);
            session
        }
        None => {
            let terms = Terms::negotiate(&hello, &settings);
            Arc::new(Session::new(
                hello.worker_id.clone(),
                hello.metadata.clone(),
                credentials,
                outbox,
                terms,
                peer,
            ))
        }
    };
    let (terms, session_id, tag) = (
        session.terms,
        session.session_id.clone(),
        session.tag.clone(),
    );
    let superseded = session.new_connection();
    let resumed = hello
        .resume
        .as_ref()
        .is_some_and(|r| r.session_id == session_id);
    // Registered before the welcome goes out: a worker that has read its
    // welcome can count on being eligible for calls.
    // A resumed session gets its old slot back (its calls' leases count
    // there); anything else a new one.
    let key = match resumed_key.filter(|key| shared.registry.reinstate(*key)) {
        Some(key) => key,
        None => {
            let registry = &shared.registry;
            let key = registry.register(session.clone(), &hello.services, hello.max_inflight);
            // The newest connection with an id is the one calls for it reach.
            if policy == DuplicateIds::Replace && !hello.worker_id.is_empty() {
                let replaced = registry.displace(key, &hello.worker_id, &hello.services);
                if replaced > 0 {
                    info!(%peer, worker = %hello.worker_id, replaced, "a newer connection took this worker id; the older drains and closes");
                }
            }
            key
        }
    };
    // From here on, every way out (including a panic) unregisters the worker
    // and fails its pending calls, in that order.
    shared
        .metrics
        .worker_connects
        .fetch_add(1, Ordering::Relaxed);
    let live = Arc::new(Live {
        shared: shared.clone(),
        settings: settings.clone(),
        key,
        session: session.clone(),
        ended: OnceLock::new(),
        earned: OnceLock::new(),
    });
    let welcome = handshake::welcome(&settings, &terms, session_id, resumed, resend);
    let welcome = OutFrame::text(protocol::encode_control(&welcome));
    if let Err(e) = writer.write(&[welcome], stall).await {
        live.end("worker left during the handshake", true);
        info!(%peer, error = %e, "worker left during handshake");
        return None;
    }
    info!(
        %peer, worker = %hello.worker_id, session = %tag,
        services = ?hello.services, max_inflight = hello.max_inflight, resumed,
        "worker connected"
    );
    Some(Opened {
        writer,
        reader,
        inbox,
        live,
        session,
        key,
        superseded,
        peer,
        worker_id: hello.worker_id,
        shutdown,
    })
}

/// The connection's life: the write loop in a task of its own, the read
/// loop here, until either ends it or the bridge shuts down.
async fn run<S>(c: Opened<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = c.shutdown.child_token();
    let writer = tokio::spawn(write_loop(
        c.writer,
        c.inbox,
        c.live.clone(),
        conn.clone(),
        c.shutdown.clone(),
    ));
    let shared = c.live.shared.clone();
    let mut reader = c.reader;
    let read = read_loop(
        &mut reader,
        &c.session,
        &shared,
        c.key,
        &conn,
        &c.superseded,
    )
    .await;
    let (cause, may_resume) = read.unwrap_or_else(|e| {
        if let Some(close) = e.close() {
            let _ = c.live.earned.set(close);
        }
        (e.to_string(), true)
    });
    c.live.end(&cause, may_resume);
    conn.cancel();
    let _ = writer.await;
    if c.live.earned.get().is_some() {
        // The worker broke the protocol, and the close frame that says how
        // is on its way: what it still sends is read and dropped for a
        // moment, so that the socket is not reset ahead of that frame.
        tokio::select! {
            _ = c.shutdown.cancelled() => {}
            _ = reader.linger() => {}
        }
    }
    // The session's cause if it closed, else the connection's own (a session
    // held for a resume has none yet): the first one recorded, not the read
    // loop's view of a connection the write loop ended.
    let cause = c
        .session
        .end_cause()
        .or_else(|| c.live.ended.get().cloned())
        .unwrap_or(cause);
    let (peer, tag) = (c.peer, &c.session.tag);
    info!(%peer, worker = %c.worker_id, session = %tag, %cause, "worker disconnected");
}

/// The session `resume` names, taken for this connection if the worker
/// that opened it is the one asking: same `worker_id`, same token, same
/// client certificate. Anyone else gets a new session, exactly as for an
/// id that does not exist (no error frame: telling the two apart would
/// confirm to a stranger that the id is live); the bridge logs a warning.
async fn resume_lookup(
    shared: &Shared,
    hello: &protocol::Hello,
    credentials: &Credentials,
    resume: &protocol::Resume,
    peer: SocketAddr,
) -> Option<(Arc<Session>, u64)> {
    let owned = |s: &Session| s.belongs_to(&hello.worker_id, credentials);
    let taken = shared
        .detached
        .take_for_resume(&resume.session_id, &shared.registry, owned)
        .await;
    if let Err(Some(tag)) = &taken {
        warn!(
            %peer, worker = %hello.worker_id, session = %tag,
            "a resume presented other credentials or another worker_id than the session's: treated as a new session"
        );
    }
    taken.ok()
}

/// Owns the socket's write half: frames from the outbox, batched; pings on
/// schedule; and the decision to drop a worker that stopped answering them.
async fn write_loop<S>(
    mut writer: FrameWriter<S>,
    mut inbox: Inbox,
    live: Arc<Live>,
    conn: CancellationToken,
    bridge_stopping: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = &live.settings.config.workers;
    // A write step that cannot complete for as long as a heartbeat would
    // take to fail means the worker stopped reading: treat it as gone.
    let stall = transport::dead_after(cfg.ping_interval, cfg.ping_misses);
    let mut ping = tokio::time::interval(cfg.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let choked = inbox.choked();
    let not_reading = "the worker stopped reading: too many control frames waiting for it";
    let cause = loop {
        // Pings come before data: a busy outbox must not starve the
        // heartbeat, or a dead peer would go unnoticed while calls pile up.
        let written = tokio::select! {
            biased;
            _ = conn.cancelled() => break None,
            _ = choked.cancelled() => break Some(not_reading.to_owned()),
            _ = ping.tick() => {
                let missed = live.session.unanswered.fetch_add(1, Ordering::Relaxed);
                if missed >= cfg.ping_misses {
                    break Some(format!("missed {missed} pongs in a row"));
                }
                let ping = [OutFrame::Ping(live.session.stats.ping_payload())];
                tokio::select! {
                    _ = conn.cancelled() => break None,
                    r = writer.write(&ping, stall) => r,
                }
            }
            msg = inbox.recv() => {
                let Some(msg) = msg else { break None };
                let busy = live.session.pending() > 1;
                tokio::select! {
                    _ = conn.cancelled() => break None,
                    _ = choked.cancelled() => break Some(not_reading.to_owned()),
                    r = wire::write_batch(&mut writer, msg, &mut inbox, busy, stall) => r,
                }
            }
        };
        if let Err(e) = written {
            break Some(e.to_string());
        }
    };
    if let Some(cause) = cause {
        live.end(&cause, true);
        conn.cancel();
        return;
    }
    // Orderly end, briefly: a close frame (the answer to the worker's, if
    // it closed first), then the end of the stream's write side.
    let (code, reason) = if let Some((code, reason)) = live.earned.get() {
        (*code, reason.as_str())
    } else if live.session.replaced.load(Ordering::Relaxed) {
        (CloseCode::Normal, REPLACED)
    } else if live.session.drained.is_cancelled() {
        (CloseCode::Normal, "drained")
    } else if live.session.violations.load(Ordering::Relaxed) >= MAX_VIOLATIONS {
        (CloseCode::Policy, "too many protocol violations")
    } else if bridge_stopping.is_cancelled() {
        (CloseCode::Away, "bridge shutting down")
    } else {
        (CloseCode::Away, "bridge closing")
    };
    let goodbye = async {
        if bridge_stopping.is_cancelled() {
            // `drain` tells the worker why it is being closed, and that it
            // gets no new calls here any more.
            let drain = OutFrame::text(protocol::encode_control(&Control::Drain));
            let _ = writer.write(&[drain], stall).await;
        }
        writer.close(code, reason, stall).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), goodbye).await;
}

/// Owns the socket's read half until the connection ends; returns the
/// cause and whether the worker may resume, or the read error that ended
/// it.
async fn read_loop<S>(
    reader: &mut FrameReader<ReadHalf<S>>,
    session: &Arc<Session>,
    shared: &Shared,
    key: u64,
    conn: &CancellationToken,
    superseded: &CancellationToken,
) -> Result<(String, bool), ReadError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let msg = tokio::select! {
            // Cancelled by the write loop (which recorded its own cause
            // first) or by the bridge shutting down.
            _ = conn.cancelled() => return Ok(("the bridge is shutting down".to_owned(), false)),
            _ = session.drained.cancelled() => return Ok(("drained".to_owned(), false)),
            _ = superseded.cancelled() => return Ok(("the worker resumed on a new connection".to_owned(), true)),
            msg = reader.next() => msg?,
        };
        let problem = match msg {
            Incoming::Binary(frame) => on_binary(session, frame),
            Incoming::Text(text) => on_text(session, shared, key, &text),
            Incoming::Pong(payload) => {
                session.unanswered.store(0, Ordering::Relaxed);
                session.stats.pong(&payload);
                None
            }
            Incoming::Close(frame) => {
                let why = frame
                    .map(|(code, reason)| format!(" ({code} {reason})"))
                    .unwrap_or_default();
                return Ok((format!("worker closed the connection{why}"), false));
            }
            Incoming::Ping(payload) => {
                // Best effort, like error reports: a worker that pings
                // without reading must not make the bridge queue more.
                session.outbox().try_control(OutFrame::Pong(payload));
                None
            }
        };
        if let Some((id, code, message)) = problem {
            shared.violations.fetch_add(1, Ordering::Relaxed);
            let n = session.violations.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(worker = %session.worker_id, ?id, code, %message, violations = n, "protocol violation");
            if n >= MAX_VIOLATIONS {
                // A worker this broken (or hostile) is not worth the log.
                return Ok((format!("closed after {n} protocol violations"), false));
            }
            let frame = Control::Error {
                id,
                code: code.to_owned(),
                message,
            };
            // Best effort: a worker flooding the bridge with junk while not
            // reading must not make it queue (or spawn) anything for that.
            session
                .outbox()
                .try_control(OutFrame::text(protocol::encode_control(&frame)));
        }
    }
}

type Problem = Option<(Option<u64>, &'static str, String)>;

fn on_binary(session: &Session, frame: Bytes) -> Problem {
    let inflate_limit = match session.terms.compression {
        Compression::None => 0,
        Compression::Lz4 => session.terms.max_frame,
    };
    let (head, body) = match protocol::decode_data_ref(&frame, inflate_limit) {
        Ok(decoded) => decoded,
        Err(e) => {
            // If the header names a call, fail that call now rather than
            // leave its caller waiting for the deadline.
            let id = protocol::peek_id(&frame);
            if let Some(id) = id {
                session.fail(id, Failure::Bad(e.to_string()));
            }
            return Some((id, "malformed_frame", e.to_string()));
        }
    };
    let head = match head {
        // decode_data_ref returns every response as HeadRef::Response.
        HeadRef::Other(DataHead::Response(r)) => HeadRef::Response(r.into()),
        head => head,
    };
    let id = match &head {
        HeadRef::Response(r) => Some(r.id),
        HeadRef::Other(DataHead::Body(b)) => Some(b.id),
        HeadRef::Other(DataHead::Request(_) | DataHead::Response(_)) => {
            let reason = "workers may not send request frames".into();
            return Some((None, "unexpected_frame", reason));
        }
        HeadRef::Other(DataHead::Unknown) => {
            return Some((None, "unknown_frame", "unknown binary frame type".into()))
        }
    };
    if let Some(id) = id.filter(|id| *id >= session.next_id.load(Ordering::Relaxed)) {
        let reason = format!("call {id} was never sent on this connection");
        return Some((Some(id), "unknown_call", reason));
    }
    // A chunk is a slice of its frame: held for a slow caller, it would keep
    // the whole frame alive. A frame padded with large unknown fields must
    // not make the bridge hold more than the bytes it counts, so its body
    // and header values are copied out.
    let padded = frame.len().saturating_sub(body.len()) > 4096;
    let body = if padded {
        Bytes::copy_from_slice(&body)
    } else {
        body
    };
    // A compressed body is already a copy: header values that were slices
    // would be all that keeps the frame alive, so they are copied too.
    let shared = (!padded && !protocol::is_compressed(&frame)).then_some(&frame);
    let result = match head {
        HeadRef::Response(head) => session.on_response(head, body, shared),
        HeadRef::Other(DataHead::Body(b)) => session.on_body(b.id, b.end, body),
        HeadRef::Other(_) => return None, // answered above
    };
    result.err().map(|reason| (id, "bad_response", reason))
}

fn on_text(session: &Session, shared: &Shared, key: u64, text: &str) -> Problem {
    match protocol::decode_control(text) {
        Ok(Control::Error {
            id: Some(id),
            code,
            message,
        }) => {
            session.fail(
                id,
                Failure::Bad(format!("worker reported {code}: {message}")),
            );
            None
        }
        Ok(Control::Error {
            id: None,
            code,
            message,
        }) => {
            warn!(worker = %session.worker_id, %code, %message, "worker reported an error");
            None
        }
        Ok(Control::Credit { id, bytes }) => {
            session.credit(id, bytes);
            None
        }
        Ok(Control::Accepted { id }) => {
            // Recorded first, then the worker is told it may start: from
            // here on the call is never sent elsewhere. Only the first
            // `accepted` of a call still pending gets one (`Calls::accept`).
            let first = session.lock().accept(id);
            if first {
                let start = Control::Start { id };
                session
                    .outbox()
                    .control(OutFrame::text(protocol::encode_control(&start)));
            }
            None
        }
        Ok(Control::Drain) => {
            info!(worker = %session.worker_id, "worker is draining");
            shared.registry.drain(key);
            None
        }
        Ok(Control::Unknown) => Some((None, "unknown_frame", "unknown control frame type".into())),
        Ok(Control::Hello(_)) => Some((
            None,
            "unexpected_frame",
            "hello may only be the first frame of a connection".into(),
        )),
        Ok(other) => Some((
            None,
            "unexpected_frame",
            format!(
                "{} frames go from the bridge to workers, never back",
                other.kind()
            ),
        )),
        Err(e) => Some((None, "malformed_frame", e.to_string())),
    }
}
