//! A call's attempt on another bridge of the cluster, from the calling
//! side: when no worker here has room, the call is offered to the peers
//! that announce workers of its service, the most free capacity first.
//! A peer answers at once whether it took the call; one that did not, or
//! that nobody answers for, never started it, and the next is asked. The
//! reply comes back head first, its body in chunks under this side's
//! credit, with a keepalive every second: silence for [`LOST_AFTER`] fails
//! the call as `worker_lost`. Dropping the [`RemoteCall`] before its reply
//! ended cancels it on the peer. The serving side is `relayed.rs`; the
//! messages are `cluster::relay`'s.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::Response;
use http_body_util::{LengthLimitError, Limited};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, warn};

use super::{
    call::{Ctx, Exchange, Plan, Step},
    dispatch::Placed,
    job_run::JobHook,
    reply::Trace,
    request_body::{read_error, RequestBody},
    session::Failure,
};
use crate::{
    body::{next_batch, Body, BodyError},
    cluster::{
        relay::{self, Ack, CallHead, Frame, Routed},
        Cluster, Offered,
    },
    error::CallError,
    flow::Window,
    headers,
    protocol::json::RequestFields,
};

/// How long a peer has to say whether it took a call. Past it the call may
/// have started there: it is cancelled, and moves on only if it may run
/// twice (PROTOCOL 3.7).
pub(super) const ACK_WITHIN: Duration = Duration::from_millis(500);

/// A call whose serving bridge sends nothing (not even its keepalive, every
/// second) for this long is lost: `worker_lost`.
pub(super) const LOST_AFTER: Duration = Duration::from_secs(4);

/// Offers the call to the peers that can take it, and runs it on the first
/// that does. `None` when none took it (the call then waits here, as
/// before); `queue_there` lets it go to peers whose workers are all busy
/// (to wait in their queue), for a service with no worker here.
pub(super) async fn attempt(
    ctx: &Ctx<'_>,
    plan: &Plan<'_>,
    fields: &RequestFields<'_>,
    body: &mut Option<Limited<RequestBody>>,
    n: u32,
    trace: &mut Trace,
    queue_there: bool,
) -> Option<Step> {
    let cluster = ctx.shared.cluster.get()?;
    let candidates = match plan.worker.as_deref() {
        Some(id) => cluster.hosting(fields.service, id),
        None => cluster.candidates(fields.service),
    };
    for peer in candidates.iter().filter(|c| c.free > 0 || queue_there) {
        if Instant::now() >= plan.deadline {
            return None;
        }
        let mut call = RemoteCall::new(cluster.clone(), peer.node.clone());
        let (message, sent) = call_message(cluster, plan, fields, call.id);
        // The bytes the offer carries are spent from the window (the
        // serving bridge credits them as its worker reads them).
        if sent > 0 && call.window.take(sent.min(relay::WINDOW)).await.is_err() {
            continue;
        }
        // A job is stored as running before the offer (which may start
        // it there): a restart must never run it again if it may not.
        if let Some(job) = ctx.job {
            let worker = plan.worker.as_deref().unwrap_or_default();
            if !job.placed(worker, Some(&peer.node)).await && !plan.replayable {
                return Some(Step::Unplaced(JobHook::unstored()));
            }
        }
        let mut answered = None;
        let by = (Instant::now() + ACK_WITHIN).min(plan.deadline);
        match cluster.offer(&peer.node, message, by).await {
            Offered::Ack(Ack::Accepted) => {}
            Offered::Head(head) => answered = Some(head),
            Offered::TimedOut if Instant::now() >= plan.deadline => {
                trace.attempts = n;
                trace.node = Some(peer.node.as_str().into());
                call.set_reason("timeout");
                return Some(Step::Done(Placed::Remote(call), Ok(Err(plan.timeout()))));
            }
            Offered::TimedOut => {
                warn!(request_id = %ctx.request_id, peer = %peer.node, "a bridge did not say within {ACK_WITHIN:?} whether it took a call; cancelled there");
                trace.attempts = n;
                trace.node = Some(peer.node.as_str().into());
                let cause = format!("bridge {} did not answer within {ACK_WITHIN:?}", peer.node);
                let f = Failure::Lost(cause);
                let worker = call.worker();
                if plan.may_retry(&f, n, ctx.max_retries()) {
                    return Some(Step::Retry(Box::new(plan.failure(&worker, f))));
                }
                return Some(Step::Done(
                    Placed::Remote(call),
                    Ok(Err(plan.failure(&worker, f))),
                ));
            }
            refused => {
                debug!(request_id = %ctx.request_id, peer = %peer.node, outcome = ?refused, "a bridge did not take a call");
                call.done.store(true, Ordering::Relaxed);
                continue;
            }
        }
        cluster.counted_out();
        if let Some(sent) = ctx.fanout {
            sent.mark();
        }

        trace.attempts = n;
        trace.node = Some(peer.node.as_str().into());
        let upload = (sent < plan.start.len() || !plan.single).then(|| Upload {
            cluster: cluster.clone(),
            node: peer.node.clone(),
            id: call.id,
            window: call.window.clone(),
            rest: plan.start.slice(sent..),
            off: sent as u64,
            body: body.take(),
            uploaded: trace.uploaded.clone(),
        });
        let exchange = exchange(plan, &mut call, upload, answered);
        let outcome = tokio::time::timeout_at(plan.deadline, exchange).await;
        if matches!(outcome, Ok(Err(CallError::NoWorker { .. }))) {
            // It never started there after all: the next peer.
            continue;
        }
        return Some(Step::Done(Placed::Remote(call), outcome));
    }
    None
}

/// The call as the first message to a peer: its head, and as much of the
/// body as the server's `max_payload` allows (all of it, if it fits).
/// Returns the message and the body bytes it carries.
fn call_message(
    cluster: &Cluster,
    plan: &Plan<'_>,
    fields: &RequestFields<'_>,
    id: u64,
) -> (Bytes, usize) {
    let timeout_ms = plan
        .deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as u64;
    let mut head = CallHead {
        from: cluster.node.clone(),
        epoch: cluster.epoch(),
        call: id,
        request_id: fields.request_id.to_owned(),
        service: fields.service.to_owned(),
        method: fields.method.to_owned(),
        path: fields.path.to_owned(),
        timeout_ms,
        idle_ms: plan.target.request_timeout.as_millis() as u64,
        max_body: plan.target.max_body as u64,
        end: false,
        headers: Vec::new(),
        latin1: Vec::new(),
    };
    let headers = plan.headers.as_bytes();
    let fixed = fields.request_id.len() + fields.path.len() + fields.service.len() + 512;
    let room = chunk_room(cluster, headers.len() + fixed);
    let sent = plan.start.len().min(room);
    head.end = plan.single && sent == plan.start.len();
    let message = relay::encode_with_headers(&Frame::Call(head), headers, &plan.start[..sent]);
    (message, sent)
}

/// Body bytes a message may carry beside a head of `head` bytes: a chunk,
/// or less when the server's `max_payload` is small.
fn chunk_room(cluster: &Cluster, head: usize) -> usize {
    relay::CHUNK
        .min(cluster.max_payload().saturating_sub(head))
        .max(1)
}

/// A call running on another bridge. Dropped before its reply ended, it is
/// cancelled there (with [`RemoteCall::set_reason`]'s reason).
pub(super) struct RemoteCall {
    cluster: Arc<Cluster>,
    /// The bridge running it.
    pub(super) node: String,
    /// Its id, this bridge's.
    pub(super) id: u64,
    /// Its frames, until the reply body's pump takes them.
    frames: Option<mpsc::Receiver<Routed>>,
    /// Spent by the request body; the peer's credit refills it.
    window: Arc<Window>,
    /// The reply ended (or the call never started): nothing to cancel.
    done: Arc<AtomicBool>,
    reason: &'static str,
    /// Moves the reply body along.
    pump: Option<AbortOnDropHandle<()>>,
    /// Changes when this bridge's NATS connection drops.
    drops: watch::Receiver<u64>,
}

impl RemoteCall {
    fn new(cluster: Arc<Cluster>, node: String) -> RemoteCall {
        let id = cluster.call_id();
        let (frames, window) = cluster.calls.add_outgoing(id);
        let drops = cluster.drops();
        RemoteCall {
            drops,
            cluster,
            node,
            id,
            frames: Some(frames),
            window,
            done: Arc::new(AtomicBool::new(false)),
            reason: "client_gone",
            pump: None,
        }
    }

    /// Names the place in errors: the bridge, as no worker id is known.
    pub(super) fn worker(&self) -> String {
        format!("(on bridge {})", self.node)
    }

    pub(super) fn set_reason(&mut self, reason: &'static str) {
        self.reason = reason;
    }
}

impl Drop for RemoteCall {
    fn drop(&mut self) {
        self.pump.take();
        self.cluster.calls.remove_outgoing(self.id);
        if !self.done.load(Ordering::Relaxed) {
            let cancel = Frame::Cancel {
                from: self.cluster.node.clone(),
                call: self.id,
                reason: self.reason.to_owned(),
            };
            self.cluster
                .send_soon(&self.node, relay::encode(&cancel, &[]));
        }
    }
}

/// Sends the rest of the request body to the serving bridge, a chunk at a
/// time within the window its credit keeps open.
struct Upload {
    cluster: Arc<Cluster>,
    node: String,
    id: u64,
    window: Arc<Window>,
    /// What the first message did not carry of the body read so far.
    rest: Bytes,
    off: u64,
    body: Option<Limited<RequestBody>>,
    uploaded: Arc<AtomicU64>,
}

/// Why an upload to another bridge stopped.
enum UploadError {
    /// The caller's body could not be read.
    Caller(Box<dyn std::error::Error + Send + Sync>),
    /// The call ended at the other bridge.
    Gone,
}

impl Upload {
    async fn run(mut self) -> Result<(), UploadError> {
        let rest = std::mem::take(&mut self.rest);
        self.send(rest).await?;
        if let Some(mut body) = self.body.take() {
            let room = chunk_room(&self.cluster, 256);
            loop {
                // A burst of small frames (chunked HTTP/1, HTTP/2 DATA)
                // goes on as one message.
                let batch = next_batch(&mut body, room).await;
                self.send(batch.data).await?;
                match batch.end {
                    None => {}
                    Some(Ok(())) => break,
                    Some(Err(e)) => return Err(UploadError::Caller(e)),
                }
            }
        }
        let end = Frame::ReqData {
            from: self.cluster.node.clone(),
            call: self.id,
            off: self.off,
            end: true,
        };
        publish(&self.cluster, &self.node, relay::encode(&end, &[])).await
    }

    async fn send(&mut self, mut data: Bytes) -> Result<(), UploadError> {
        let room = chunk_room(&self.cluster, 256);
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(room));
            self.window
                .take(piece.len())
                .await
                .map_err(|_| UploadError::Gone)?;
            let frame = Frame::ReqData {
                from: self.cluster.node.clone(),
                call: self.id,
                off: self.off,
                end: false,
            };
            self.off += piece.len() as u64;
            publish(&self.cluster, &self.node, relay::encode(&frame, &piece)).await?;
            self.uploaded
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Sends one message of an upload.
async fn publish(cluster: &Cluster, node: &str, message: Bytes) -> Result<(), UploadError> {
    match cluster.send(node, message).await {
        true => Ok(()),
        false => Err(UploadError::Gone),
    }
}

/// Awaits the reply head from the serving bridge (beside the upload of the
/// rest of the body, which goes on after it), and makes the response.
async fn exchange(
    plan: &Plan<'_>,
    call: &mut RemoteCall,
    upload: Option<Upload>,
    answered: Option<Bytes>,
) -> Result<Exchange, CallError> {
    let worker = call.worker();
    let lost = |cause: String| plan.failure(&worker, Failure::Lost(cause));
    let Some(mut frames) = call.frames.take() else {
        return Err(lost("the call's frames were already taken".into()));
    };
    let mut pump = upload.map(|u| AbortOnDropHandle::new(tokio::spawn(u.run())));
    let node = call.node.clone();
    let mut drops = call.drops.clone();
    // A quick reply's head came as the answer to the offer.
    let mut answered = answered.map(|payload| relay::decode(&payload));
    let (head, body) = loop {
        if let Some(decoded) = answered.take() {
            match decoded {
                Ok((Frame::ResHead(head), body)) => break (head, body),
                Ok((other, _)) => {
                    let reason = format!("bridge {node} answered the offer with {other:?}");
                    return Err(plan.failure(&worker, Failure::Bad(reason)));
                }
                Err(e) => {
                    let reason =
                        format!("bridge {node} answered the offer with an unreadable head: {e}");
                    return Err(plan.failure(&worker, Failure::Bad(reason)));
                }
            }
        }
        let next = tokio::select! {
            next = tokio::time::timeout(LOST_AFTER, frames.recv()) => next,
            _ = dropped(&mut drops) => return Err(lost(DROPPED.into())),
            done = upload_done(&mut pump) => {
                pump = None;
                match done {
                    Ok(Err(UploadError::Caller(e))) => {
                        call.set_reason("client_gone");
                        return Err(read_error(e, plan.target.max_body));
                    }
                    Ok(Err(UploadError::Gone)) | Err(_) => {
                        return Err(lost(format!("bridge {node} stopped taking the request body")))
                    }
                    Ok(Ok(())) => continue,
                }
            }
        };
        match next {
            Err(_) => {
                return Err(lost(format!(
                    "bridge {node} sent nothing for {LOST_AFTER:?}"
                )))
            }
            Ok(None) => return Err(lost(format!("bridge {node} broke the call's flow control"))),
            Ok(Some((Frame::Alive { .. }, _))) => continue,
            Ok(Some((Frame::Fail { reason, .. }, _))) => {
                call.done.store(true, Ordering::Relaxed);
                return Err(lost(format!("bridge {node}: {reason}")));
            }
            Ok(Some((Frame::ResHead(head), body))) => break (head, body),
            Ok(Some((other, _))) => {
                let reason = format!("bridge {node} sent {other:?} before the reply head");
                return Err(plan.failure(&worker, Failure::Bad(reason)));
            }
        }
    };
    if matches!(head.error.as_deref(), Some("no_worker" | "queue_full")) {
        // Taken, then not placed there after all (its workers went, or its
        // queue filled, between the answer and the call): never started.
        call.done.store(true, Ordering::Relaxed);
        return Err(CallError::NoWorker {
            service: plan.target.service.to_string(),
            waited: Duration::ZERO,
            connected: 0,
        });
    }
    if !(200..=599).contains(&head.status) {
        let reason = format!("bridge {node} sent status {}", head.status);
        return Err(plan.failure(&worker, Failure::Bad(reason)));
    }
    let map = headers::from_wire(&head.headers, &head.latin1, !head.end)
        .map_err(|e| plan.failure(&worker, Failure::Bad(e)))?;
    let body = if head.end {
        call.done.store(true, Ordering::Relaxed);
        Body::full(body)
    } else {
        let (tx, reply) = Body::channel();
        tx.send(body.clone());
        let read = Arc::new(AtomicU64::new(0));
        let mut credit = Credit::new(call, read.clone());
        let pumped = pump_reply(
            Incoming {
                frames,
                drops: call.drops.clone(),
                read,
            },
            tx,
            body.len() as u64,
            node,
            call.done.clone(),
        );
        call.pump = Some(AbortOnDropHandle::new(tokio::spawn(pumped)));
        reply.on_read(move |n| credit.read(n))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = http::StatusCode::from_u16(head.status)
        .map_err(|e| plan.failure(&worker, Failure::Bad(e.to_string())))?;
    *resp.headers_mut() = map;
    // The upload (if any) goes on beside the reply; it stops with the call.
    // If it fails now, the call is cancelled at the serving bridge, with
    // the reason its worker would get from a local call.
    let watcher = pump.map(|p| {
        let cancel = (call.cluster.clone(), call.node.clone(), call.id);
        AbortOnDropHandle::new(tokio::spawn(async move {
            let reason = match p.await {
                Ok(Err(UploadError::Caller(e))) if e.is::<LengthLimitError>() => "body_too_large",
                Ok(Err(UploadError::Caller(_))) => "client_gone",
                _ => return,
            };
            let (cluster, node, id) = cancel;
            let frame = Frame::Cancel {
                from: cluster.node.clone(),
                call: id,
                reason: reason.to_owned(),
            };
            cluster.send(&node, relay::encode(&frame, &[])).await;
        }))
    });
    Ok((resp, watcher))
}

/// Why a call in flight failed when this bridge's NATS connection dropped.
const DROPPED: &str = "this bridge's NATS connection dropped mid-call (messages may be lost)";

/// What a reply body's pump listens to.
struct Incoming {
    frames: mpsc::Receiver<Routed>,
    drops: watch::Receiver<u64>,
    /// Reply bytes the caller has read (and so credited).
    read: Arc<AtomicU64>,
}

/// Returns when the NATS connection drops (never, once the cluster is gone).
pub(super) async fn dropped(drops: &mut watch::Receiver<u64>) {
    if drops.changed().await.is_err() {
        std::future::pending().await
    }
}

/// The end of an upload still running; never, when there is none.
async fn upload_done(
    pump: &mut Option<AbortOnDropHandle<Result<(), UploadError>>>,
) -> Result<Result<(), UploadError>, tokio::task::JoinError> {
    match pump {
        Some(pump) => pump.await,
        None => std::future::pending().await,
    }
}

/// Grants the serving bridge more window as the caller reads the reply.
struct Credit {
    cluster: Arc<Cluster>,
    node: String,
    id: u64,
    /// Read and not yet credited.
    owed: usize,
    /// Read in all.
    read: Arc<AtomicU64>,
}

impl Credit {
    fn new(call: &RemoteCall, read: Arc<AtomicU64>) -> Credit {
        Credit {
            cluster: call.cluster.clone(),
            node: call.node.clone(),
            id: call.id,
            owed: 0,
            read,
        }
    }

    fn read(&mut self, n: usize) {
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        self.owed += n;
        if self.owed >= relay::WINDOW / 4 {
            let frame = Frame::ResCredit {
                from: self.cluster.node.clone(),
                call: self.id,
                bytes: self.owed as u64,
            };
            self.owed = 0;
            self.cluster
                .send_soon(&self.node, relay::encode(&frame, &[]));
        }
    }
}

/// Moves a streamed reply's chunks into its body as they come, in order;
/// a gap, a failure, or silence for [`LOST_AFTER`] cuts the body off with
/// an error (never passed off as complete).
async fn pump_reply(
    mut from: Incoming,
    tx: crate::body::BodySender,
    mut off: u64,
    node: String,
    done: Arc<AtomicBool>,
) {
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(LOST_AFTER, from.frames.recv()) => next,
            _ = dropped(&mut from.drops) => {
                tx.abort(BodyError::new(DROPPED));
                return;
            }
        };
        let error = match next {
            Err(_) => format!("bridge {node} sent nothing for {LOST_AFTER:?}"),
            Ok(None) => format!("bridge {node} broke the call's flow control"),
            Ok(Some((Frame::Alive { .. }, _))) => continue,
            Ok(Some((Frame::ResData { off: at, end, .. }, data))) if at == off => {
                off += data.len() as u64;
                let unread = off.saturating_sub(from.read.load(Ordering::Relaxed));
                if unread > (relay::WINDOW + relay::CHUNK) as u64 {
                    tx.abort(BodyError::new(format!(
                        "bridge {node} sent past the call's window"
                    )));
                    return;
                }
                if !tx.send(data) {
                    return;
                }
                if end {
                    done.store(true, Ordering::Relaxed);
                    tx.finish();
                    return;
                }
                continue;
            }
            Ok(Some((Frame::ResData { off: at, .. }, _))) => {
                format!(
                    "bridge {node} sent reply bytes at {at}, expected {off}: a message was lost"
                )
            }
            Ok(Some((Frame::Fail { reason, .. }, _))) => {
                done.store(true, Ordering::Relaxed);
                format!("bridge {node}: {reason}")
            }
            Ok(Some((other, _))) => format!("bridge {node} sent {other:?} inside the reply body"),
        };
        tx.abort(BodyError::new(error));
        return;
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn incoming(frames: mpsc::Receiver<Routed>) -> Incoming {
        // A sender dropped at once: no drop is ever signalled.
        let (_, drops) = watch::channel(0);
        Incoming {
            frames,
            drops,
            read: Arc::new(AtomicU64::new(u64::MAX / 2)),
        }
    }

    #[tokio::test]
    async fn reply_chunks_out_of_order_cut_the_body_off() {
        let (tx, frames) = mpsc::channel(8);
        let (sender, mut body) = Body::channel();
        let done = Arc::new(AtomicBool::new(false));
        let data = |off, end| Frame::ResData { call: 1, off, end };
        tx.send((data(0, false), Bytes::from_static(b"abc")))
            .await
            .expect("queued");
        // Bytes 3..6 were lost.
        tx.send((data(6, true), Bytes::from_static(b"ghi")))
            .await
            .expect("queued");
        pump_reply(incoming(frames), sender, 0, "b".into(), done.clone()).await;
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"abc")));
        let cut = body.frame().await.expect("an end");
        assert!(cut.is_err(), "a gap is an error, not the end");
        assert!(!done.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_reply_in_order_ends_complete() {
        let (tx, frames) = mpsc::channel(8);
        let (sender, body) = Body::channel();
        let done = Arc::new(AtomicBool::new(false));
        let data = |off, end| Frame::ResData { call: 1, off, end };
        tx.send((Frame::Alive { call: 1 }, Bytes::new()))
            .await
            .expect("queued");
        tx.send((data(2, false), Bytes::from_static(b"cd")))
            .await
            .expect("queued");
        tx.send((data(4, true), Bytes::from_static(b"e")))
            .await
            .expect("queued");
        pump_reply(incoming(frames), sender, 2, "b".into(), done.clone()).await;
        let all = body.collect(100).await.expect("complete");
        assert_eq!(&all[..], b"cde");
        assert!(done.load(Ordering::Relaxed));
    }
}
