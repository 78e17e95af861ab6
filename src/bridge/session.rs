//! One worker's session, bridge side: who it is, the terms its handshake
//! settled, its statistics, and the calls it runs. A session outlives a
//! dropped connection when the worker can resume; the connection that
//! serves it (reader, writer, registration) is `connection.rs`.
//! The calls in flight are kept in the pending-call table ([`super::pending`]),
//! whose rules say how each one leaves: this file acts them out (the caller's
//! [`CallGuard`] being dropped sends a `cancel`, the connection ending fails
//! them all with the cause).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::SystemTime,
};

use bytes::Bytes;
use http::{header, Response, StatusCode};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    credentials::Credentials,
    handshake::Terms,
    pending::{self, Calls, Head, Known},
};
use crate::{
    body::Body,
    flow::Window,
    headers,
    protocol::{self, json::ResponseRef, Compression, Control},
    transport::{OutFrame, Outbox},
};

pub(crate) use super::pending::{Failure, Reply};

/// The bridge side of one worker connection.
pub(crate) struct Session {
    /// The worker's self-declared id, for logs and error messages.
    pub(crate) worker_id: String,
    /// What its hello said about who or where it is (presence, fan-out).
    pub(crate) metadata: protocol::Metadata,
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
    pub(super) terms: Terms,
    /// Calls sent and not yet answered.
    calls: Mutex<Calls>,
    /// Set by [`Session::close`], so that the registry can skip a closed
    /// session without taking `calls`' lock.
    closed: AtomicBool,
    /// Next call id on this connection.
    pub(super) next_id: AtomicU64,
    /// Pings sent since the last pong.
    pub(super) unanswered: AtomicU32,
    /// Protocol violations on this connection so far.
    pub(super) violations: AtomicU32,
    /// Cancelled when the worker has asked to drain and its last call has
    /// ended: the bridge then closes the connection.
    pub(crate) drained: CancellationToken,
    /// A newer connection claimed this worker's id (`workers.duplicate_ids
    /// = "replace"`): this one is draining, and closes saying why.
    pub(crate) replaced: AtomicBool,
    /// Cancelled to end the current connection as dropped, because the
    /// worker has come back on a new one (a resume); replaced per connection.
    superseded: Mutex<CancellationToken>,
    /// What `/status` shows about this worker.
    pub(crate) stats: WorkerStats,
}

/// A worker's figures for `/status`.
pub(crate) struct WorkerStats {
    /// Where its current connection comes from.
    pub(super) peer: Mutex<SocketAddr>,
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
    pub(super) fn new(peer: SocketAddr) -> Self {
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
    pub(super) fn ping_payload(&self) -> Bytes {
        let micros = u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        Bytes::copy_from_slice(&micros.to_be_bytes())
    }

    /// A pong echoes its ping's payload (RFC 6455 5.5.3); one of ours gives
    /// the round trip. Unsolicited pongs carry anything and are ignored.
    pub(super) fn pong(&self, payload: &[u8]) {
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
            .control(OutFrame::text(protocol::encode_control(&cancel)));
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

impl Session {
    pub(super) fn new(
        worker_id: String,
        metadata: protocol::Metadata,
        credentials: Credentials,
        outbox: Outbox,
        terms: Terms,
        peer: SocketAddr,
    ) -> Self {
        let session_id = uuid::Uuid::now_v7().to_string();
        Session {
            worker_id,
            metadata,
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
            replaced: AtomicBool::new(false),
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
    pub(super) fn new_connection(&self) -> CancellationToken {
        let token = CancellationToken::new();
        *self.superseded.lock().unwrap_or_else(|p| p.into_inner()) = token.clone();
        token
    }

    /// The current connection's outbox.
    pub(super) fn outbox(&self) -> Outbox {
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
        let (outbox, _inbox) = crate::transport::outbox();
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
            Default::default(),
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
    pub(super) fn end_cause(&self) -> Option<String> {
        self.lock().end_cause().cloned()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Calls> {
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
    pub(crate) async fn send_whole(&self, frame: OutFrame) -> Result<(), Failure> {
        self.outbox()
            .urgent(frame)
            .await
            .map_err(|_| Failure::Unsent("connection closed before sending".into()))
    }

    /// Queues a body chunk for the worker, waiting while the queue is full.
    pub(crate) async fn send_chunk(&self, frame: OutFrame) -> Result<(), Failure> {
        self.outbox()
            .bulk(frame)
            .await
            .map_err(|_| Failure::Lost("connection closed while sending".into()))
    }

    /// A `credit` from the worker: it consumed `bytes` more of call `id`'s
    /// request body.
    pub(super) fn credit(&self, id: u64, bytes: u64) {
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
                    .control(OutFrame::text(protocol::encode_control(frame)));
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
                .control(OutFrame::text(protocol::encode_control(&cancel)));
        }
    }

    /// Fails one call, if it is still pending.
    pub(super) fn fail(&self, id: u64, failure: Failure) {
        let removed = self.lock().remove(id);
        if let Some(p) = removed {
            p.fail(failure);
        }
    }

    /// Handles a `response` head: a complete reply goes to the caller at
    /// once; a head with `end: false` goes to the caller with a body that
    /// the following chunks feed as they arrive.
    /// Header values may be slices of `frame` (see [`headers::from_wire_ref`]).
    pub(super) fn on_response(
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
                outbox.control(OutFrame::text(protocol::encode_control(&frame)));
            }
        });
        sender.send(body);
        calls.stream(head.id, sender, buffered);
        drop(calls);
        let _ = tx.send(Ok(Response::from_parts(parts, stream_body)));
        Ok(())
    }

    /// Handles a `body` chunk of a streamed response.
    pub(super) fn on_body(&self, id: u64, end: bool, chunk: Bytes) -> Result<(), String> {
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
