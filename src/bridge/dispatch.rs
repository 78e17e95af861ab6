//! The seam between a call and the place that runs it. `call()` asks a
//! [`Dispatch`] for a place to run one attempt before a deadline and gets an
//! [`Attempt`]: the call registered there, with a way to send its frames, a
//! channel that completes with the reply head or a failure, and cancel on
//! drop. Today the places are the workers connected to this bridge (the
//! registry leases a worker, its session runs the call); a place on another
//! node, or one named worker, is another variant here, not a change to
//! `call()`. The contract every kind of place keeps is in docs/INTERNALS.md
//! ("The dispatch seam").

use std::{
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use tokio::{sync::oneshot, time::Instant};

pub(super) use super::registry::AcquireError;
use super::{
    registry::{Lease, Registry},
    remote::RemoteCall,
    session::{CallGuard, Failure, Reply, Session, Started},
    upload::Upload,
};
use crate::{flow::Window, protocol::Compression, transport::OutFrame};

/// Where a call's attempts can run.
pub(super) enum Dispatch<'a> {
    /// The workers of a service connected to this bridge.
    Local(&'a Arc<Registry>),
}

/// How an attempt is to start, decided by the caller's side of the call.
#[derive(Clone, Copy)]
pub(super) struct StartAs {
    /// The request body streams after the head (it did not fit one frame).
    pub(super) upload: bool,
    /// The worker must wait for `start` before running the call (PROTOCOL
    /// 3.7), so that a loss before `accepted` is known to be harmless.
    pub(super) gated: bool,
    /// The call would be retried even after it started: a lost connection
    /// fails it at once instead of holding it for a resume.
    pub(super) movable: bool,
    /// A call for one worker waits for it to connect if it has not
    /// (`Wsbridge-Worker-Wait`), up to the queue deadline.
    pub(super) await_worker: bool,
}

impl Dispatch<'_> {
    /// Finds a place with room for a call to `service` (to its worker
    /// named `worker`, if given: that one or none), waiting from `now`
    /// (the caller's clock reading, so that an attempt reads it once) until
    /// `queue_deadline` in FIFO order behind at most `queue_limit - 1`
    /// other calls, and registers the call there. Nothing has been sent
    /// yet: an error means the call never started anywhere.
    pub(super) async fn start(
        &self,
        service: &str,
        worker: Option<&str>,
        mut now: Instant,
        queue_deadline: Instant,
        queue_limit: usize,
        how: StartAs,
    ) -> Result<Attempt, AcquireError> {
        let Dispatch::Local(registry) = self;
        // Set when a connection closed under a lease: the next lease is
        // asked for only while the queue deadline has not passed, so that
        // no order of events can make this loop spin.
        let mut closed_under_lease = false;
        loop {
            if closed_under_lease && now >= queue_deadline {
                return Err(AcquireError::NoWorker {
                    connected: registry.connected(service),
                });
            }
            let wait = queue_deadline.saturating_duration_since(now);
            let lease = match worker {
                Some(id) => {
                    registry
                        .acquire_worker(service, id, wait, queue_limit, how.await_worker)
                        .await?
                }
                None => registry.acquire(service, wait, queue_limit).await?,
            };
            // A connection that closed after handing out this lease never saw
            // the call, so choosing another worker is safe.
            if let Ok(started) = lease
                .session()
                .start_call(how.upload, how.gated, how.movable)
            {
                let Started {
                    guard,
                    reply,
                    window,
                } = started;
                return Ok(Attempt {
                    guard,
                    lease,
                    reply: Some(reply),
                    window,
                });
            }
            // The clock is read again only when a connection closes under
            // the lease and another must be found.
            now = Instant::now();
            closed_under_lease = true;
        }
    }
}

/// One attempt of a call at one place. Dropping it ends the attempt: a call
/// still pending there is cancelled (with [`Attempt::set_reason`]'s
/// reason), then the place's capacity is freed. (Fields drop in order.)
pub(super) struct Attempt {
    /// Removes (and cancels) the call when dropped.
    guard: CallGuard,
    /// The worker's slot; freed after the call is gone.
    lease: Lease,
    /// Completed by the reply head or a failure; a dropped sender means the
    /// connection closed. Taken by the wait for the reply, so that a
    /// streamed reply's attempt does not keep the spent channel.
    reply: Option<oneshot::Receiver<Reply>>,
    /// With flow control: the request body bytes that may be sent.
    window: Option<Arc<Window>>,
}

impl Attempt {
    /// The call's id at its place (on the wire to its worker).
    pub(super) fn id(&self) -> u64 {
        self.guard.id()
    }

    /// The worker connection running the attempt, for its accounting.
    pub(super) fn session(&self) -> &Arc<Session> {
        self.lease.session()
    }

    /// The id of the worker running the attempt, for errors.
    pub(super) fn worker(&self) -> &str {
        &self.lease.session().worker_id
    }

    /// Whether the worker gates calls (PROTOCOL 3.7): only then is
    /// `"gate": false` worth writing.
    pub(super) fn gates(&self) -> bool {
        self.lease.session().gates()
    }

    /// How frames to this worker are compressed.
    pub(super) fn compression(&self) -> Compression {
        self.lease.session().compression()
    }

    /// Sends a whole request (one frame), ahead of queued body chunks.
    pub(super) async fn send_whole(&self, frame: OutFrame) -> Result<(), Failure> {
        self.lease.session().send_whole(frame).await
    }

    /// The upload of a request body that streams after its head (`head`,
    /// sent by [`Upload::run`] too), spending the attempt's flow-control
    /// window. Made once per attempt.
    pub(super) fn upload(
        &mut self,
        codec: Compression,
        idle_limit: Duration,
        sent: Arc<AtomicU64>,
    ) -> Upload {
        Upload {
            session: self.lease.session().clone(),
            id: self.guard.id(),
            window: self.window.take(),
            codec,
            idle_limit,
            sent,
        }
    }

    /// A handle that ends the call both ways from elsewhere (the watcher of
    /// an upload that fails after the reply head went to the caller).
    pub(super) fn aborter(&self) -> Aborter {
        Aborter {
            session: self.lease.session().clone(),
            id: self.guard.id(),
        }
    }

    /// The reason the worker is told if the attempt ends while its call is
    /// still pending (`client_gone` unless set).
    pub(super) fn set_reason(&mut self, reason: &'static str) {
        self.guard.reason = reason;
    }

    /// The channel the reply head (or a failure) comes on, taken: a wait
    /// for it that is given up (the deadline) leaves nothing behind. A
    /// second take gets a channel that is already closed.
    pub(super) fn take_reply(&mut self) -> oneshot::Receiver<Reply> {
        self.reply.take().unwrap_or_else(|| oneshot::channel().1)
    }

    /// Waits for the reply head, or a failure.
    pub(super) async fn reply(&mut self) -> Reply {
        self.take_reply()
            .await
            .unwrap_or_else(|_| Err(Failure::Lost("connection closed".into())))
    }
}

/// Ends one call both ways (`abort`, PROTOCOL 4.3) from outside its attempt.
pub(super) struct Aborter {
    session: Arc<Session>,
    id: u64,
}

impl Aborter {
    /// Fails the call for its caller and tells the worker why.
    pub(super) fn abort(&self, reason: &str) {
        self.session.abort_call(self.id, reason);
    }
}

/// The attempt that ended a call, wherever it ran: held while a streamed
/// reply is read, and ended (cancelled if unfinished) when dropped.
pub(super) enum Placed {
    /// On a worker of this bridge.
    Local(Attempt),
    /// On another bridge of the cluster.
    Remote(RemoteCall),
}

impl Placed {
    /// The call's id at its place.
    pub(super) fn id(&self) -> u64 {
        match self {
            Placed::Local(at) => at.id(),
            Placed::Remote(call) => call.id,
        }
    }

    /// Who ran it, for errors.
    pub(super) fn worker(&self) -> String {
        match self {
            Placed::Local(at) => at.worker().to_owned(),
            Placed::Remote(call) => call.worker(),
        }
    }

    /// See [`Attempt::set_reason`].
    pub(super) fn set_reason(&mut self, reason: &'static str) {
        match self {
            Placed::Local(at) => at.set_reason(reason),
            Placed::Remote(call) => call.set_reason(reason),
        }
    }
}
