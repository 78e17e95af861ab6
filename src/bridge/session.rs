//! One worker's connection, bridge side, once its handshake
//! ([`super::handshake`]) is done: the session it starts or resumes, a
//! reader that completes pending calls, and a writer that batches frames
//! and sends pings.
//! The calls in flight are kept in the pending-call table ([`super::pending`]),
//! whose rules say how each one leaves: this file acts them out (the caller's
//! [`CallGuard`] being dropped sends a `cancel`, the connection ending fails
//! them all with the cause).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::oneshot,
};
use tokio_tungstenite::{
    tungstenite::{
        protocol::{frame::coding::CloseCode, CloseFrame},
        Message,
    },
    WebSocketStream,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    credentials::Credentials,
    handshake::{self, Terms},
    pending::{self, Calls, Head, Known},
    Settings, Shared,
};
use crate::{
    body::Body,
    flow::Window,
    headers,
    protocol::{
        self,
        json::{HeadRef, ResponseRef},
        Compression, Control, DataHead,
    },
    transport::{self, Inbox, Outbox},
};

pub(crate) use super::pending::{Failure, Reply};

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

/// The bridge side of one worker connection.
pub(crate) struct Session {
    /// The worker's self-declared id, for logs and error messages.
    pub(crate) worker_id: String,
    /// This connection's id (the welcome's `session_id`); a resumed
    /// connection keeps it. Only its worker is shown it: everyone else
    /// sees `tag`.
    pub(crate) session_id: String,
    /// The session as logs and `/status` show it (see
    /// [`protocol::session_tag`]).
    pub(crate) tag: String,
    /// What the worker authenticated with: a resume must present the same.
    credentials: Credentials,
    /// Frames to the writer task of the current connection (replaced when
    /// the worker resumes).
    outbox: Mutex<Outbox>,
    /// What the handshake settled.
    terms: Terms,
    /// Calls sent and not yet answered.
    calls: Mutex<Calls>,
    /// Set by [`Session::close`], so that the registry can skip a closed
    /// session without taking `calls`' lock.
    closed: AtomicBool,
    /// Next call id on this connection.
    next_id: AtomicU64,
    /// Pings sent since the last pong.
    unanswered: AtomicU32,
    /// Protocol violations on this connection so far.
    violations: AtomicU32,
    /// Cancelled when the worker has asked to drain and its last call has
    /// ended: the bridge then closes the connection.
    pub(crate) drained: CancellationToken,
    /// Cancelled to end the current connection as dropped, because the
    /// worker has come back on a new one (a resume); replaced per connection.
    superseded: Mutex<CancellationToken>,
    /// What `/status` shows about this worker.
    pub(crate) stats: WorkerStats,
}

/// A worker's figures for `/status`.
pub(crate) struct WorkerStats {
    /// Where its current connection comes from.
    peer: Mutex<SocketAddr>,
    /// When the session began (a resume keeps it).
    pub(crate) since: SystemTime,
    /// The clock pings are stamped with.
    born: std::time::Instant,
    /// Calls it answered.
    pub(crate) served: AtomicU64,
    /// Of those, answered with a 5xx (its own or the bridge's).
    pub(crate) errors: AtomicU64,
    /// The last ping's round trip in microseconds; `u64::MAX` before the
    /// first pong.
    rtt_micros: AtomicU64,
}

impl WorkerStats {
    fn new(peer: SocketAddr) -> Self {
        WorkerStats {
            peer: Mutex::new(peer),
            since: SystemTime::now(),
            born: std::time::Instant::now(),
            served: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            rtt_micros: AtomicU64::new(u64::MAX),
        }
    }

    /// A call this worker answered has ended.
    pub(crate) fn finished(&self, error: bool) {
        self.served.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The current connection's peer address.
    pub(crate) fn peer(&self) -> SocketAddr {
        *self.peer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last ping round trip, once a pong has come back.
    pub(crate) fn rtt(&self) -> Option<std::time::Duration> {
        match self.rtt_micros.load(Ordering::Relaxed) {
            u64::MAX => None,
            micros => Some(std::time::Duration::from_micros(micros)),
        }
    }

    /// A ping's payload: when it was sent, in microseconds since `born`.
    fn ping_payload(&self) -> Bytes {
        let micros = u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        Bytes::copy_from_slice(&micros.to_be_bytes())
    }

    /// A pong echoes its ping's payload (RFC 6455 5.5.3); one of ours gives
    /// the round trip. Unsolicited pongs carry anything and are ignored.
    fn pong(&self, payload: &[u8]) {
        let Ok(stamp) = <[u8; 8]>::try_from(payload) else {
            return;
        };
        let sent = u64::from_be_bytes(stamp);
        let now = u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        if let Some(rtt) = now.checked_sub(sent).filter(|r| *r < 3_600_000_000) {
            self.rtt_micros.store(rtt, Ordering::Relaxed);
        }
    }
}

/// Removes its call from the pending map when dropped; if the call was still
/// pending, the worker is told to cancel it.
pub(crate) struct CallGuard {
    session: Arc<Session>,
    id: u64,
    /// The reason sent with a cancel, should one be needed.
    pub(crate) reason: &'static str,
}

impl CallGuard {
    /// The call's id on the wire.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let removed = self.session.lock().remove(self.id).is_some();
        if !removed {
            return;
        }
        let cancel = Control::Cancel {
            id: self.id,
            reason: self.reason.to_owned(),
        };
        // Urgent, so it overtakes any chunks of this call still queued
        // (the worker ignores chunks of calls it no longer knows).
        self.session
            .outbox()
            .control(Message::text(protocol::encode_control(&cancel)));
    }
}

/// A call just registered on a session.
pub(crate) struct Started {
    /// Removes (and cancels) the call when dropped.
    pub(crate) guard: CallGuard,
    /// Completed by the reply head or a failure.
    pub(crate) reply: oneshot::Receiver<Reply>,
    /// With flow control: the request body bytes that may be sent.
    pub(crate) window: Option<Arc<Window>>,
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

impl Session {
    fn new(
        worker_id: String,
        credentials: Credentials,
        outbox: Outbox,
        terms: Terms,
        peer: SocketAddr,
    ) -> Self {
        let session_id = uuid::Uuid::now_v7().to_string();
        Session {
            worker_id,
            tag: protocol::session_tag(&session_id),
            session_id,
            credentials,
            outbox: Mutex::new(outbox),
            terms,
            calls: Mutex::default(),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            unanswered: AtomicU32::new(0),
            violations: AtomicU32::new(0),
            drained: CancellationToken::new(),
            superseded: Mutex::default(),
            stats: WorkerStats::new(peer),
        }
    }

    /// Ends the current connection as if it had dropped.
    pub(crate) fn supersede(&self) {
        self.superseded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancel();
    }

    /// A fresh supersede token for a new connection of this session.
    fn new_connection(&self) -> CancellationToken {
        let token = CancellationToken::new();
        *self.superseded.lock().unwrap_or_else(|p| p.into_inner()) = token.clone();
        token
    }

    /// The current connection's outbox.
    fn outbox(&self) -> Outbox {
        self.outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The worker sends `accepted` and waits for `start` (3.7).
    pub(crate) fn gates(&self) -> bool {
        self.terms.acks
    }

    /// Whether a worker that says `worker_id` and authenticated with
    /// `credentials` may resume this session: only the one that opened it.
    pub(crate) fn belongs_to(&self, worker_id: &str, credentials: &Credentials) -> bool {
        self.worker_id == worker_id && self.credentials == *credentials
    }

    /// The body compression agreed with this worker.
    pub(crate) fn compression(&self) -> Compression {
        self.terms.compression
    }

    /// A session with no connection behind it, for registry tests.
    #[cfg(test)]
    pub(crate) fn detached(worker_id: &str) -> Arc<Self> {
        let (outbox, _inbox) = transport::outbox();
        let terms = Terms {
            max_response: usize::MAX,
            window: None,
            compression: Compression::None,
            acks: false,
            resumable: false,
            max_frame: 0,
        };
        Arc::new(Self::new(
            worker_id.to_owned(),
            Credentials::new("", None),
            outbox,
            terms,
            ([127, 0, 0, 1], 0).into(),
        ))
    }

    /// Calls sent to this worker and not finished (streams included).
    pub(crate) fn pending(&self) -> usize {
        self.lock().len()
    }

    /// True once the session has ended: no call can start on it.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Why the session ended, once it has.
    fn end_cause(&self) -> Option<String> {
        self.lock().end_cause().cloned()
    }

    fn lock(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new call and returns its guard, the reply receiver and,
    /// with flow control, the window its request body must wait on.
    /// `gated`: the call waits for `accepted`/`start`; otherwise the worker
    /// may start it on arrival. `replayable`: the caller retries the call
    /// elsewhere after a loss even if it started (see [`Session::hold_for_resume`]).
    pub(crate) fn start_call(
        self: &Arc<Self>,
        upload: bool,
        gated: bool,
        replayable: bool,
    ) -> Result<Started, Failure> {
        let (tx, rx) = oneshot::channel();
        let gated = gated && self.terms.acks;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Only a body streamed after the head spends window; a whole one
        // travels in the request frame.
        let window = self
            .terms
            .window
            .filter(|_| upload)
            .map(|w| Arc::new(Window::new(w)));
        self.lock()
            .start(id, tx, window.clone(), gated, replayable)?;
        Ok(Started {
            guard: CallGuard {
                session: self.clone(),
                id,
                reason: "client_gone",
            },
            reply: rx,
            window,
        })
    }

    /// Queues a whole message (one frame) for the worker, ahead of queued
    /// chunks of streamed ones.
    pub(crate) async fn send_whole(&self, frame: Bytes) -> Result<(), Failure> {
        self.outbox()
            .urgent(Message::Binary(frame))
            .await
            .map_err(|_| Failure::Unsent("connection closed before sending".into()))
    }

    /// Queues a body chunk for the worker, waiting while the queue is full.
    pub(crate) async fn send_chunk(&self, frame: Bytes) -> Result<(), Failure> {
        self.outbox()
            .bulk(Message::Binary(frame))
            .await
            .map_err(|_| Failure::Lost("connection closed while sending".into()))
    }

    /// A `credit` from the worker: it consumed `bytes` more of call `id`'s
    /// request body.
    fn credit(&self, id: u64, bytes: u64) {
        let calls = self.lock();
        if let Some(window) = calls.window(id) {
            // Never more than a window at once: a confused or hostile
            // worker cannot make the bridge send unbounded amounts.
            window.credit(bytes);
        }
    }

    /// Ends the session: every pending call fails with `cause`. Only the
    /// first cause is kept; it is the one that explains what happened.
    pub(crate) fn close(&self, cause: &str) {
        let drained = {
            let mut calls = self.lock();
            let Some(drained) = calls.close(cause) else {
                return;
            };
            self.closed.store(true, Ordering::Release);
            drained
        };
        if !drained.is_empty() {
            warn!(worker = %self.worker_id, calls = drained.len(), %cause, "failing calls of lost worker");
        }
        pending::fail_all(drained);
    }

    /// The connection dropped and the worker may come back (resume): the
    /// calls nothing else can save wait for it, the others fail at once
    /// ([`Calls::hold_for_resume`]). When the worker is already back (its
    /// resume superseded this connection), every call stays for it.
    pub(crate) fn hold_for_resume(&self, cause: &str) {
        let back = self
            .superseded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_cancelled();
        let gone = self.lock().hold_for_resume(back, cause);
        pending::fail_all(gone);
    }

    /// The worker is back on a new connection: frames go to `outbox` from
    /// now on, and each call still waiting is matched against what the
    /// worker says it knows ([`Calls::resume`]). Returns the calls whose
    /// reply the worker is to send again.
    pub(crate) fn resume(&self, outbox: Outbox, known: &protocol::Resume) -> Vec<u64> {
        *self.outbox.lock().unwrap_or_else(|p| p.into_inner()) = outbox;
        // The pongs the dropped connection missed say nothing about this one.
        self.unanswered.store(0, Ordering::Relaxed);
        let known = Known::from(known);
        let (resend, gone) = {
            let mut calls = self.lock();
            let issued = 1..self.next_id.load(Ordering::Relaxed);
            let resumed = calls.resume(issued, &known);
            for frame in &resumed.frames {
                self.outbox()
                    .control(Message::text(protocol::encode_control(frame)));
            }
            (resumed.resend, resumed.gone)
        };
        pending::fail_all(gone);
        resend
    }

    /// Ends a call from the bridge's side: the caller's reply (or its body,
    /// if streaming) fails, and the worker is told to stop.
    pub(crate) fn abort_call(&self, id: u64, reason: &str) {
        let removed = self.lock().remove(id);
        if let Some(p) = removed {
            p.fail(Failure::Bad(format!("call aborted: {reason}")));
            let cancel = Control::Cancel {
                id,
                reason: reason.to_owned(),
            };
            self.outbox()
                .control(Message::text(protocol::encode_control(&cancel)));
        }
    }

    /// Fails one call, if it is still pending.
    fn fail(&self, id: u64, failure: Failure) {
        let removed = self.lock().remove(id);
        if let Some(p) = removed {
            p.fail(failure);
        }
    }

    /// Handles a `response` head: a complete reply goes to the caller at
    /// once; a head with `end: false` goes to the caller with a body that
    /// the following chunks feed as they arrive.
    /// Header values may be slices of `frame` (see [`headers::from_wire_ref`]).
    fn on_response(
        &self,
        head: ResponseRef<'_>,
        body: Bytes,
        frame: Option<&Bytes>,
    ) -> Result<(), String> {
        let mut calls = self.lock();
        let tx = match calls.head(head.id) {
            Head::First(tx) => tx,
            Head::Late => {
                // Late replies to calls that timed out or were cancelled are
                // normal; the caller has already been answered.
                debug!(worker = %self.worker_id, id = head.id, "reply for a call no longer pending");
                return Ok(());
            }
            Head::Second(broken) => {
                drop(calls);
                return Err(broken.fail());
            }
        };
        // A streamed head's bytes count against the window like any chunk's
        // (section 7.3); a whole reply may be up to max_response_body.
        let limit = match self.terms.window {
            Some(window) if !head.end => window,
            _ => self.terms.max_response,
        };
        let resp = match check_head(&head, body.len(), limit, frame) {
            Ok(resp) => resp,
            Err(reason) => {
                calls.remove(head.id);
                drop(calls);
                let _ = tx.send(Err(Failure::Bad(reason.clone())));
                return Err(reason);
            }
        };
        let (parts, ()) = resp.into_parts();
        if head.end {
            calls.remove(head.id);
            drop(calls);
            let _ = tx.send(Ok(Response::from_parts(parts, Body::full(body))));
            return Ok(());
        }
        let (sender, mut stream_body) = Body::channel();
        // A streamed reply may declare its length (from_wire_ref keeps one
        // valid Content-Length): hold the body to it, so that a worker whose
        // body disagrees cannot hand the caller a cut reply that looks whole.
        if let Some(n) = content_length(&parts.headers) {
            stream_body = stream_body.declared_length(n);
        }
        let buffered = Arc::new(AtomicUsize::new(body.len()));
        let taken = buffered.clone();
        let credit = self.terms.window.map(|_| (self.outbox(), head.id));
        let stream_body = stream_body.on_read(move |n| {
            taken.fetch_sub(n, Ordering::Relaxed);
            // The caller took n bytes: the worker may send n more.
            if let Some((outbox, id)) = &credit {
                let frame = Control::Credit {
                    id: *id,
                    bytes: n as u64,
                };
                outbox.control(Message::text(protocol::encode_control(&frame)));
            }
        });
        sender.send(body);
        calls.stream(head.id, sender, buffered);
        drop(calls);
        let _ = tx.send(Ok(Response::from_parts(parts, stream_body)));
        Ok(())
    }

    /// Handles a `body` chunk of a streamed response.
    fn on_body(&self, id: u64, end: bool, chunk: Bytes) -> Result<(), String> {
        // A flow-controlled worker never has more than its window waiting;
        // others may fill up to max_response_body (see [`Calls::body`]).
        let limit = self.terms.window.unwrap_or(self.terms.max_response);
        let broken = self.lock().body(id, end, chunk, limit);
        broken.map_err(|broken| broken.fail())
    }
}

/// Validates a response head and converts it to an HTTP response.
fn check_head(
    head: &ResponseRef<'_>,
    body_len: usize,
    max: usize,
    frame: Option<&Bytes>,
) -> Result<Response<()>, String> {
    let status = StatusCode::from_u16(head.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| format!("status {} is not a final HTTP status", head.status))?;
    if body_len > max {
        return Err(format!("response body exceeds {max} bytes"));
    }
    let headers = headers::from_wire_ref(&head.headers, &head.latin1, !head.end, frame)?;
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if head.end && body_len == 0 {
        if let Some(n) = headers::declared_length(&head.headers) {
            resp.extensions_mut().insert(EmptyReplyLength(n));
        }
    }
    Ok(resp)
}

/// The `Content-Length` an empty whole reply declared, which its headers
/// no longer carry: the answer to a `HEAD` passes it on (http.rs).
#[derive(Clone, Copy)]
pub(crate) struct EmptyReplyLength(pub(crate) u64);

/// The `Content-Length` of a reply head, if it has a valid one.
fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Serves one worker connection (already TLS-terminated when TLS is on)
/// until it ends or the bridge shuts down. `cert`: the SHA-256 of the
/// client certificate's DER, with mutual TLS.
pub(crate) async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    cert: Option<[u8; 32]>,
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some((mut ws, hello, credentials)) =
        handshake::accept(stream, peer, cert, &settings, &shutdown).await
    else {
        return;
    };

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
        None => shared
            .registry
            .register(session.clone(), &hello.services, hello.max_inflight),
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
    });
    let welcome = handshake::welcome(&settings, &terms, session_id, resumed, resend);
    if let Err(e) = ws
        .send(Message::text(protocol::encode_control(&welcome)))
        .await
    {
        live.end("worker left during the handshake", true);
        info!(%peer, error = %e, "worker left during handshake");
        return;
    }
    info!(
        %peer, worker = %hello.worker_id, session = %tag,
        services = ?hello.services, max_inflight = hello.max_inflight, resumed,
        "worker connected"
    );

    let (sink, stream) = ws.split();
    let conn = shutdown.child_token();
    let writer = tokio::spawn(write_loop(
        sink,
        inbox,
        live.clone(),
        conn.clone(),
        shutdown.clone(),
    ));
    let (cause, may_resume) = read_loop(stream, &session, &shared, key, &conn, &superseded).await;
    live.end(&cause, may_resume);
    conn.cancel();
    let _ = writer.await;
    // The session's cause if it closed, else the connection's own (a session
    // held for a resume has none yet): the first one recorded, not the read
    // loop's view of a connection the write loop ended.
    let cause = session
        .end_cause()
        .or_else(|| live.ended.get().cloned())
        .unwrap_or(cause);
    info!(%peer, worker = %hello.worker_id, session = %tag, %cause, "worker disconnected");
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

/// Why reading from a worker failed, in words fit for a caller's 502 body:
/// the kind of I/O error, not the TLS library's message (which carries a
/// link to its manual for an EOF without `close_notify`, a worker killed).
fn read_failure(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::{error::ProtocolError, Error};
    match e {
        Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the connection was cut (no close frame)".to_owned()
        }
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "the connection was cut (no close frame)".to_owned()
        }
        Error::Io(io) => format!("read failed: {}", io.kind()),
        other => format!("read failed: {other}"),
    }
}

type Sink<S> = futures_util::stream::SplitSink<WebSocketStream<S>, Message>;
type Source<S> = futures_util::stream::SplitStream<WebSocketStream<S>>;

/// Owns the socket's write half: frames from the outbox, batched; pings on
/// schedule; and the decision to drop a worker that stopped answering them.
async fn write_loop<S>(
    mut sink: Sink<S>,
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
                tokio::select! {
                    _ = conn.cancelled() => break None,
                    r = transport::step(stall, sink.send(Message::Ping(live.session.stats.ping_payload()))) => r,
                }
            }
            msg = inbox.recv() => {
                let Some(msg) = msg else { break None };
                tokio::select! {
                    _ = conn.cancelled() => break None,
                    _ = choked.cancelled() => break Some(not_reading.to_owned()),
                    r = transport::write_batch(&mut sink, msg, &mut inbox, stall) => r,
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
    // Orderly end, briefly. If the worker closed first, tungstenite has
    // queued the echo of its close frame and a new close would be refused:
    // `close()` then just flushes that echo.
    let (code, reason) = if live.session.drained.is_cancelled() {
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
            let drain = protocol::encode_control(&Control::Drain);
            let _ = sink.send(Message::text(drain)).await;
        }
        let close = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = sink.send(Message::Close(Some(close))).await;
        let _ = sink.close().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), goodbye).await;
}

/// Owns the socket's read half until the connection ends; returns the cause.
async fn read_loop<S>(
    mut stream: Source<S>,
    session: &Arc<Session>,
    shared: &Shared,
    key: u64,
    conn: &CancellationToken,
    superseded: &CancellationToken,
) -> (String, bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let msg = tokio::select! {
            // Cancelled by the write loop (which recorded its own cause
            // first) or by the bridge shutting down.
            _ = conn.cancelled() => return ("the bridge is shutting down".to_owned(), false),
            _ = session.drained.cancelled() => return ("drained".to_owned(), false),
            _ = superseded.cancelled() => return ("the worker resumed on a new connection".to_owned(), true),
            msg = stream.next() => msg,
        };
        let msg = match msg {
            None => return ("connection closed".to_owned(), true),
            Some(Err(e)) => return (read_failure(&e), true),
            Some(Ok(m)) => m,
        };
        let problem = match msg {
            Message::Binary(frame) => on_binary(session, frame),
            Message::Text(text) => on_text(session, shared, key, &text),
            Message::Pong(payload) => {
                session.unanswered.store(0, Ordering::Relaxed);
                session.stats.pong(&payload);
                None
            }
            Message::Close(frame) => {
                let why = frame
                    .map(|f| format!(" ({} {})", f.code, f.reason))
                    .unwrap_or_default();
                return (format!("worker closed the connection{why}"), false);
            }
            Message::Ping(_) | Message::Frame(_) => None,
        };
        if let Some((id, code, message)) = problem {
            shared.violations.fetch_add(1, Ordering::Relaxed);
            let n = session.violations.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(worker = %session.worker_id, ?id, code, %message, violations = n, "protocol violation");
            if n >= MAX_VIOLATIONS {
                // A worker this broken (or hostile) is not worth the log.
                return (format!("closed after {n} protocol violations"), false);
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
                .try_control(Message::text(protocol::encode_control(&frame)));
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
                    .control(Message::text(protocol::encode_control(&start)));
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
