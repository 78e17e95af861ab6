//! Calls other bridges of the cluster send this one, the serving side:
//! each is answered at once (taken, busy, or no worker here), then runs as
//! a caller's call would, on this bridge's workers, with its retries, flow
//! control and streaming. Its reply goes back head first, the body in
//! chunks within the calling bridge's credit, and a keepalive every
//! [`ALIVE_EVERY`] while the call runs. A cancel from the calling bridge,
//! or that bridge leaving the cluster, ends it here and at the worker. The
//! calling side is `remote.rs`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};
use tracing::debug;

use super::{
    call::{call_target, Ctx, Relayed, WSBRIDGE_WORKER},
    caller::Caller,
    remote::dropped,
    reply::{AccessLog, CallBody},
    request_body::RequestBody,
    routes::Target,
    Shared,
};
use crate::{
    body::{next_batch, Body, BodyError, BodySender},
    cluster::{
        relay::{self, Ack, CallHead, Frame, ResHead, Routed},
        Cluster, Incoming, Serve,
    },
    error::CallError,
    flow::Window,
    headers,
    protocol::json::EncodedHeaders,
};

/// How often a running call tells its calling bridge it is alive.
pub(super) const ALIVE_EVERY: Duration = Duration::from_secs(1);

/// How long a taken call may go without its offer answered: a reply head
/// ready by then is the answer (one message instead of two); otherwise an
/// `accepted` goes first. Well within the calling bridge's 500 ms.
const ANSWER_WITHIN: Duration = Duration::from_millis(20);

/// Keepalives after which a call from a bridge never seen among the peers
/// is given up: its caller cannot be reached.
const UNSEEN_LIMIT: u32 = 10;

/// The longest deadline a calling bridge may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// What the cluster calls with each call another bridge sends this one.
pub(super) fn serve(shared: Weak<Shared>) -> Serve {
    Box::new(move |cluster, incoming| match shared.upgrade() {
        Some(shared) => {
            let tasks = shared.relayed.clone();
            tasks.spawn(run(shared, cluster, incoming));
        }
        None => cluster
            .calls
            .remove_incoming(&incoming.head.from, incoming.head.call),
    })
}

/// Removes a peer's call from the routing table when it ends.
struct Route<'a> {
    cluster: &'a Cluster,
    from: String,
    call: u64,
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        self.cluster.calls.remove_incoming(&self.from, self.call);
    }
}

/// Answers one call from another bridge and, if taken, runs it.
async fn run(shared: Arc<Shared>, cluster: Arc<Cluster>, incoming: Incoming) {
    let Incoming {
        head,
        body,
        reply,
        frames,
        window,
    } = incoming;
    let _route = Route {
        cluster: &cluster,
        from: head.from.clone(),
        call: head.call,
    };
    let ack = admit(&shared, &head);
    if ack != Ack::Accepted {
        cluster
            .answer(reply, Bytes::from_static(ack.as_bytes()))
            .await;
        debug!(peer = %head.from, service = %head.service, ?ack, "a call from another bridge not taken");
        return;
    }
    cluster.counted_in();
    let from = head.from.clone();
    let call = head.call;

    let sender = Sender {
        cluster: cluster.clone(),
        to: from,
        call,
        window,
        off: 0,
        seen: false,
        offer: Some(reply),
        epoch: head.epoch,
        unseen: 0,
        idle: Duration::from_secs(60),
    };
    relay(&shared, sender, head, body, frames).await;
}

/// Whether this bridge takes a call now: for its service, or for the one
/// worker it names (`Wsbridge-Worker`, which then waits for it here).
fn admit(shared: &Shared, head: &CallHead) -> Ack {
    if shared.stopping.load(Ordering::Relaxed) {
        return Ack::Refused;
    }
    let service = head.service.as_str();
    let registry = &shared.registry;
    let worker = head
        .headers
        .iter()
        .find(|(n, _)| n == WSBRIDGE_WORKER.as_str());
    if let Some((_, id)) = worker {
        return match registry.hosts(service, id) {
            true => Ack::Accepted,
            false => Ack::NoWorker,
        };
    }
    if registry.has_room(service) {
        return Ack::Accepted;
    }
    if registry.accepting(service) == 0 {
        return Ack::NoWorker;
    }
    let limit = shared.settings.load().config.http.queue_limit;
    match registry.queued(service) < limit {
        true => Ack::Accepted,
        false => Ack::Busy,
    }
}

/// Runs the call here and sends its reply back, keeping the calling bridge
/// told it is alive; ends on a cancel or when the calling bridge leaves.
async fn relay(
    shared: &Arc<Shared>,
    mut out: Sender,
    head: CallHead,
    start: Bytes,
    frames: mpsc::Receiver<Routed>,
) {
    let started = Instant::now();
    let settings = shared.settings.load_full();
    let mut log = AccessLog::begin(
        shared.clone(),
        head.request_id.clone(),
        http::Method::from_bytes(head.method.as_bytes()).unwrap_or_default(),
        head.path.clone(),
        started,
        None,
    );
    log.trace.from = Some(head.from.as_str().into());
    let cancelled = CancellationToken::new();
    let read = Arc::new(AtomicU64::new(0));
    let (body, tx) = match head.end {
        true => (Body::full(start.clone()), None),
        false => {
            let (tx, body) = Body::channel();
            tx.send(start.clone());
            (body.on_read(out.credit_hook(read.clone())), Some(tx))
        }
    };
    // A body still to come is fed by a task of its own, which also sees
    // a cancel; a whole one needs no task: the waits below watch for it.
    let (mut ends, _feed) = match tx {
        Some(tx) => {
            let feed = Feed {
                frames,
                tx: Some(tx),
                off: start.len() as u64,
                read,
                cancelled: cancelled.clone(),
                drops: out.cluster.drops(),
            };
            let task = AbortOnDropHandle::new(tokio::spawn(feed.run()));
            (Ends::Token(cancelled), Some(task))
        }
        None => {
            let drops = out.cluster.drops();
            (Ends::Frames { frames, drops }, None)
        }
    };
    let caller = Caller {
        addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        ip: "".into(),
        calls: None,
    };
    let ctx = Ctx {
        shared,
        settings: &settings,
        caller: &caller,
        request_id: &head.request_id,
        started,
        relayed: Some(Relayed {
            deadline: started + Duration::from_millis(head.timeout_ms).min(MAX_TIMEOUT),
        }),
        fanout: None,
        job: None,
    };
    // The route's limits at the calling bridge, where the call was routed.
    let idle = match head.idle_ms {
        0 => Duration::from_millis(head.timeout_ms),
        ms => Duration::from_millis(ms),
    };
    let max_body = match head.max_body {
        0 => settings.config.http.max_body.bytes(),
        n => usize::try_from(n).unwrap_or(usize::MAX),
    };
    out.idle = idle.min(MAX_TIMEOUT);
    let target = Target {
        service: head.service.as_str().into(),
        request_timeout: out.idle,
        max_body,
    };
    let mut tick = tokio::time::interval(ALIVE_EVERY);
    tick.reset();
    let answer_by = tokio::time::sleep(ANSWER_WITHIN);
    tokio::pin!(answer_by);
    let outcome = {
        let trace = &mut log.trace;
        let run = async {
            let parts = parts(&head)?;
            call_target(&ctx, target, parts, RequestBody::relayed(body), trace).await
        };
        tokio::pin!(run);
        loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                _ = &mut answer_by, if out.offer.is_some() => out.accept().await,
                _ = tick.tick() => if !out.alive().await { return },
                _ = ends.ended() => return,
            }
        }
    };
    let resp = match outcome {
        Ok(resp) => resp,
        Err(e) => {
            log.error = Some(e.code());
            e.into_response(&head.request_id).map(|full| CallBody {
                body: Body::full(full),
                _call: None,
                log: None,
            })
        }
    };
    log.status = resp.status().as_u16();
    let worker = log.trace.session.as_ref().map(|s| s.worker_id.clone());
    let sent = out
        .reply(resp, log.error, worker, &mut tick, &mut ends)
        .await;
    log.bytes_out = sent.bytes;
    log.complete = sent.complete;
}

/// The request head as a call here reads it.
fn parts(head: &CallHead) -> Result<Box<http::request::Parts>, CallError> {
    let bad = |reason: String| CallError::BadRequest { reason };
    let method = http::Method::from_bytes(head.method.as_bytes())
        .map_err(|e| bad(format!("bad method from the calling bridge: {e}")))?;
    let mut req = Request::builder()
        .method(method)
        .uri(head.path.as_str())
        .body(())
        .map_err(|e| bad(format!("bad path from the calling bridge: {e}")))?;
    *req.headers_mut() = headers::from_wire(&head.headers, &head.latin1, !head.end)
        .map_err(|e| bad(format!("bad headers from the calling bridge: {e}")))?;
    Ok(Box::new(req.into_parts().0))
}

/// Feeds the request body's chunks, in order, to the call (when it has a
/// body to come); a cancel from the calling bridge ends the call.
struct Feed {
    frames: mpsc::Receiver<Routed>,
    tx: Option<BodySender>,
    /// Request bytes received so far (the next one's offset).
    off: u64,
    /// Request bytes the call has read (and so credited).
    read: Arc<AtomicU64>,
    cancelled: CancellationToken,
    /// Changes when the NATS connection drops: the calling bridge may have
    /// missed frames of the reply, and this one of the request.
    drops: watch::Receiver<u64>,
}

impl Feed {
    async fn run(mut self) {
        loop {
            let next = tokio::select! {
                next = self.frames.recv() => next,
                _ = dropped(&mut self.drops) => break,
            };
            let Some((frame, data)) = next else { break };
            match frame {
                Frame::ReqData { off, end, .. } if off == self.off => {
                    self.off += data.len() as u64;
                    let unread = self.off.saturating_sub(self.read.load(Ordering::Relaxed));
                    if unread > (relay::WINDOW + relay::CHUNK) as u64 {
                        // The calling bridge sent past its window.
                        if let Some(tx) = self.tx.take() {
                            tx.abort(BodyError::new("the calling bridge sent past its window"));
                        }
                        break;
                    }
                    if let Some(tx) = &self.tx {
                        tx.send(data);
                    }
                    if end {
                        if let Some(tx) = self.tx.take() {
                            tx.finish();
                        }
                    }
                }
                Frame::ReqData { off, .. } => {
                    if let Some(tx) = self.tx.take() {
                        let error = format!(
                            "request bytes at {off}, expected {}: a message was lost",
                            self.off
                        );
                        tx.abort(BodyError::new(error));
                    }
                }
                Frame::Cancel { .. } => break,
                _ => {}
            }
        }
        // Cancelled, or the call's route is gone (flow control broken).
        self.cancelled.cancel();
    }
}

/// What ends a call early: a cancel from the calling bridge, or this
/// bridge's NATS connection dropping (frames may have been lost).
enum Ends {
    /// Set by the task that feeds a request body (and sees those).
    Token(CancellationToken),
    /// Watched here, for a call whose body came whole.
    Frames {
        frames: mpsc::Receiver<Routed>,
        drops: watch::Receiver<u64>,
    },
}

impl Ends {
    /// Returns when the call must end.
    async fn ended(&mut self) {
        match self {
            Ends::Token(token) => token.cancelled().await,
            Ends::Frames { frames, drops } => loop {
                tokio::select! {
                    frame = frames.recv() => match frame {
                        None | Some((Frame::Cancel { .. }, _)) => return,
                        Some(_) => {}
                    },
                    _ = dropped(drops) => return,
                }
            },
        }
    }
}

/// What of a reply reached the calling bridge.
struct Sent {
    bytes: u64,
    complete: bool,
}

/// Sends one call's frames back to its calling bridge.
struct Sender {
    cluster: Arc<Cluster>,
    to: String,
    call: u64,
    /// Refilled by the calling bridge's credit as its caller reads.
    window: Arc<Window>,
    /// Reply body bytes sent.
    off: u64,
    /// The calling bridge was seen among the peers.
    seen: bool,
    /// Where the answer to the offer goes, until it is sent.
    offer: Option<async_nats::Subject>,
    /// The calling bridge's boot: the call is for it alone.
    epoch: u64,
    /// Keepalives sent while the calling bridge was not (yet) among the peers.
    unseen: u32,
    /// The longest wait for the calling bridge's credit (the route's
    /// `request_timeout`, as for a silent worker).
    idle: Duration,
}

impl Sender {
    async fn send(&self, frame: &Frame, body: &[u8]) -> bool {
        self.cluster
            .send(&self.to, relay::encode(frame, body))
            .await
    }

    /// Answers the offer with `accepted`: the reply is not ready yet.
    async fn accept(&mut self) {
        if let Some(offer) = self.offer.take() {
            let accepted = Bytes::from_static(Ack::Accepted.as_bytes());
            self.cluster.answer(offer, accepted).await;
        }
    }

    /// Sends a keepalive. False once nobody waits for the call: the
    /// calling bridge left the cluster (dropped from presence), restarted
    /// (a new boot), or was never heard of for [`UNSEEN_LIMIT`] keepalives.
    async fn alive(&mut self) -> bool {
        self.send(&Frame::Alive { call: self.call }, &[]).await;
        match self.cluster.peer_epoch(&self.to) {
            Some(epoch) if epoch == self.epoch || self.epoch == 0 => {
                self.seen = true;
                true
            }
            Some(_) => false,
            None if self.seen => false,
            None => {
                self.unseen += 1;
                self.unseen < UNSEEN_LIMIT
            }
        }
    }

    /// Credits the calling bridge as the call reads the request body
    /// (counted in `read`).
    fn credit_hook(&self, read: Arc<AtomicU64>) -> impl FnMut(usize) + Send + 'static {
        let (cluster, to, call) = (self.cluster.clone(), self.to.clone(), self.call);
        let mut owed = 0usize;
        move |n| {
            read.fetch_add(n as u64, Ordering::Relaxed);
            owed += n;
            if owed >= relay::WINDOW / 4 {
                let frame = Frame::ReqCredit {
                    call,
                    bytes: owed as u64,
                };
                owed = 0;
                cluster.send_soon(&to, relay::encode(&frame, &[]));
            }
        }
    }

    /// Sends the reply: its head (with the whole body, if it is complete
    /// and fits), then its body within the window, keepalives meanwhile.
    async fn reply(
        &mut self,
        resp: Response<CallBody>,
        error: Option<&'static str>,
        worker: Option<String>,
        tick: &mut tokio::time::Interval,
        ends: &mut Ends,
    ) -> Sent {
        let (parts, mut body) = resp.into_parts();
        let wire = headers::to_wire_ref(&parts.headers);
        let encoded = EncodedHeaders::new(&wire);
        let room = relay::CHUNK
            .min(
                self.cluster
                    .max_payload()
                    .saturating_sub(encoded.as_bytes().len() + 512),
            )
            .max(1);
        let full = body.body.as_full();
        let end = full.as_ref().is_some_and(|b| b.len() <= room);
        let head = Frame::ResHead(ResHead {
            call: self.call,
            status: parts.status.as_u16(),
            end,
            error: error.map(str::to_owned),
            worker,
            headers: Vec::new(),
            latin1: Vec::new(),
        });
        let first = match (&full, end) {
            (Some(full), true) => full.clone(),
            _ => Bytes::new(),
        };
        let message = relay::encode_with_headers(&head, encoded.as_bytes(), &first);
        // A head ready before the offer was answered is the answer.
        let sent = match self.offer.take() {
            Some(offer) => self.cluster.answer(offer, message).await,
            None => self.cluster.send(&self.to, message).await,
        };
        if !sent {
            return Sent {
                bytes: 0,
                complete: false,
            };
        }
        if end {
            return Sent {
                bytes: first.len() as u64,
                complete: true,
            };
        }
        loop {
            let batch = tokio::select! {
                batch = next_batch(&mut body, room) => batch,
                _ = tick.tick() => match self.alive().await {
                    true => continue,
                    false => return self.sent(false),
                },
                _ = ends.ended() => return self.sent(false),
            };
            let mut data = batch.data;
            while !data.is_empty() {
                let piece = data.split_to(data.len().min(room));
                if !self.room_for(piece.len(), tick, ends).await {
                    return self.sent(false);
                }
                let chunk = Frame::ResData {
                    call: self.call,
                    off: self.off,
                    end: false,
                };
                if !self.send(&chunk, &piece).await {
                    return self.sent(false);
                }
                self.off += piece.len() as u64;
            }
            match batch.end {
                None => {}
                Some(Ok(())) => {
                    let end = Frame::ResData {
                        call: self.call,
                        off: self.off,
                        end: true,
                    };
                    let ok = self.send(&end, &[]).await;
                    return self.sent(ok);
                }
                Some(Err(e)) => {
                    let fail = Frame::Fail {
                        call: self.call,
                        reason: format!("the reply body failed: {e}"),
                    };
                    self.send(&fail, &[]).await;
                    return self.sent(false);
                }
            }
        }
    }

    /// Waits for the window to hold `n` bytes, keeping the calling bridge
    /// told the call is alive meanwhile (its caller may read slowly).
    /// Gives up after `idle` without credit.
    async fn room_for(
        &mut self,
        n: usize,
        tick: &mut tokio::time::Interval,
        ends: &mut Ends,
    ) -> bool {
        let window = self.window.clone();
        let take = window.take(n);
        tokio::pin!(take);
        let give_up = tokio::time::sleep(self.idle);
        tokio::pin!(give_up);
        loop {
            tokio::select! {
                took = &mut take => return took.is_ok(),
                _ = &mut give_up => {
                    debug!(call = self.call, "no credit from the calling bridge for {:?}; call ended", self.idle);
                    return false;
                }
                _ = tick.tick() => if !self.alive().await { return false },
                _ = ends.ended() => return false,
            }
        }
    }

    fn sent(&self, complete: bool) -> Sent {
        Sent {
            bytes: self.off,
            complete,
        }
    }
}
