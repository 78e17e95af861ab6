//! The pending-call table of one worker session: the calls sent to the
//! worker and not yet answered, and the rules by which each one leaves.
//! Synchronous: no `await`, no I/O. The session holds it under a lock,
//! sends the worker what a rule calls for (a `start`, a `cancel`), and
//! fails the calls a rule takes out once that lock is released.
//!
//! Every pending entry has a guaranteed exit: the reply, the caller's
//! `CallGuard` being dropped (timeout or hang-up, which also sends a
//! `cancel`), or the connection ending (every entry fails with the cause).

use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::Response;
use tokio::sync::oneshot;

use crate::{
    body::{Body, BodyError, BodySender},
    flow::Window,
    protocol::{self, Control},
};

/// What a pending call resolves to.
pub(crate) type Reply = Result<Response<Body>, Failure>;

/// Why a call ended without a usable reply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Failure {
    /// The connection ended; the text says how.
    Lost(String),
    /// The connection ended before the worker accepted the call: it never
    /// started, so sending it to another worker is safe.
    Unsent(String),
    /// The worker's reply was invalid, or the worker reported an error.
    Bad(String),
}

/// Calls sent and not yet answered, by id.
#[derive(Default)]
pub(super) struct Calls {
    /// Set once the connection is gone; no new calls may start.
    closed: Option<String>,
    /// By call id; foldhash, not SipHash: the ids are the bridge's own.
    map: HashMap<u64, Pending, foldhash::fast::RandomState>,
}

/// One call in the table.
pub(super) struct Pending {
    /// Completed by the response head (or a failure before it).
    head: Option<oneshot::Sender<Reply>>,
    /// After a head with `end: false`: where the body chunks go.
    stream: Option<Stream>,
    /// With flow control: request body bytes the bridge may still send.
    window: Option<Arc<Window>>,
    /// The worker may have started the call (it said `accepted`, it does
    /// not send `accepted` frames at all, or the call went without the gate).
    accepted: bool,
    /// The call waits for `start` (the worker sends `accepted` and the call
    /// was sent without `"gate": false`).
    gated: bool,
    /// The caller would send the call to another worker if this one were
    /// lost, even after it started (an idempotent or keyed call with its
    /// body whole in memory and retries left): when the connection drops,
    /// it moves at once rather than wait for a resume.
    replayable: bool,
    /// A `start` went out for this call: only the first `accepted` is
    /// answered, so repeating it cannot make the bridge write anything.
    answered: bool,
}

/// A response body being relayed to the caller as it arrives.
struct Stream {
    tx: BodySender,
    /// Bytes received from the worker and not yet taken by the caller.
    buffered: Arc<AtomicUsize>,
}

impl Pending {
    /// Ends the call with a failure, whichever stage it is in.
    pub(super) fn fail(self, failure: Failure) {
        if let Some(head) = self.head {
            let _ = head.send(Err(failure));
        } else if let Some(stream) = self.stream {
            let text = match failure {
                Failure::Lost(c) | Failure::Unsent(c) => format!("worker lost mid-body: {c}"),
                Failure::Bad(r) => format!("invalid reply mid-body: {r}"),
            };
            stream.tx.abort(BodyError::new(text));
        }
    }
}

/// Calls a rule took out of the table, each with the failure its caller
/// gets; [`fail_all`] delivers them once the table's lock is released.
pub(super) type Exits = Vec<(Pending, Failure)>;

/// Fails every call of `exits`.
pub(super) fn fail_all(exits: Exits) {
    for (pending, failure) in exits {
        pending.fail(failure);
    }
}

/// A reply frame that breaks the rules: its call, taken out of the table,
/// and why. The caller gets `Failure::Bad`, the worker an `error`.
pub(super) struct Broken {
    call: Option<Pending>,
    reason: String,
}

impl Broken {
    /// Fails the call (with the table's lock released); returns the reason.
    pub(super) fn fail(self) -> String {
        if let Some(p) = self.call {
            p.fail(Failure::Bad(self.reason.clone()));
        }
        self.reason
    }
}

/// What a response head finds in the table ([`Calls::head`]).
pub(super) enum Head {
    /// The call is no longer pending: a late reply to a call that timed out
    /// or was cancelled, which is normal; the caller has been answered.
    Late,
    /// The call already had its head: it is taken out and fails.
    Second(Broken),
    /// The call's first head: whoever answers the caller.
    First(oneshot::Sender<Reply>),
}

/// What a resuming worker says it knows (PROTOCOL.md 8.5).
pub(super) struct Known {
    /// Calls it still runs or whose reply it still holds.
    running: HashSet<u64>,
    /// Calls whose whole reply it wrote to the dropped connection.
    replied: HashSet<u64>,
}

impl From<&protocol::Resume> for Known {
    fn from(known: &protocol::Resume) -> Self {
        Known {
            running: known.running.iter().copied().collect(),
            replied: known.replied.iter().copied().collect(),
        }
    }
}

/// The table's side of a resume ([`Calls::resume`]).
pub(super) struct Resumed {
    /// For the new connection, in order: `start` again for the gated calls
    /// the worker holds, `cancel` (`gone`) for those it holds that ended
    /// here while it was away.
    pub(super) frames: Vec<Control>,
    /// Calls of `replied` still waiting: the worker sends their replies
    /// again.
    pub(super) resend: Vec<u64>,
    /// Calls that leave the table.
    pub(super) gone: Exits,
}

impl Calls {
    /// Calls in the table (streams included).
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Why the table closed, once it has.
    pub(super) fn end_cause(&self) -> Option<&String> {
        self.closed.as_ref()
    }

    /// Enters call `id`, whose reply goes to `head`. `window`: with flow
    /// control, what its request body may still send. `gated`: the call
    /// waits for `accepted`/`start`; otherwise the worker may start it on
    /// arrival. `replayable`: see [`Calls::hold_for_resume`]. A closed
    /// table takes no call: the call never started.
    pub(super) fn start(
        &mut self,
        id: u64,
        head: oneshot::Sender<Reply>,
        window: Option<Arc<Window>>,
        gated: bool,
        replayable: bool,
    ) -> Result<(), Failure> {
        if let Some(cause) = &self.closed {
            return Err(Failure::Unsent(cause.clone()));
        }
        self.map.insert(
            id,
            Pending {
                head: Some(head),
                stream: None,
                window,
                // Without an `accepted` frame to come, a call sent may
                // have started.
                accepted: !gated,
                gated,
                replayable,
                answered: false,
            },
        );
        Ok(())
    }

    /// Takes call `id` out, if it is still pending: its whole reply came,
    /// its reply was refused, the worker reported an error for it, or it
    /// ended on the bridge's side (its caller gone, aborted). Whoever takes
    /// it answers it, fails it or drops it; `None`: it had already left.
    pub(super) fn remove(&mut self, id: u64) -> Option<Pending> {
        self.map.remove(&id)
    }

    /// With flow control: the window of call `id`'s request body, while it
    /// is pending (a `credit` for any other call is ignored).
    pub(super) fn window(&self, id: u64) -> Option<&Arc<Window>> {
        self.map.get(&id).and_then(|p| p.window.as_ref())
    }

    /// The worker sent `accepted` for call `id`: recorded, and true if the
    /// worker is now to be told `start`. For a call that already ended this
    /// is late news: ignored; so is a repeat, which a worker that stopped
    /// reading could otherwise send by the million to make the bridge queue
    /// a `start` for each.
    pub(super) fn accept(&mut self, id: u64) -> bool {
        match self.map.get_mut(&id) {
            Some(p) if !p.answered => {
                p.accepted = true;
                p.answered = true;
                true
            }
            _ => false,
        }
    }

    /// A `response` head for call `id` arrived: see [`Head`]. With the
    /// first head, the call stays until its caller is answered: a whole or
    /// refused reply takes it out ([`Calls::remove`]), a streamed one
    /// leaves it waiting for its body ([`Calls::stream`]).
    pub(super) fn head(&mut self, id: u64) -> Head {
        let Some(pending) = self.map.get_mut(&id) else {
            return Head::Late;
        };
        match pending.head.take() {
            Some(tx) => Head::First(tx),
            None => Head::Second(Broken {
                call: self.map.remove(&id),
                reason: "second response head for one call".to_owned(),
            }),
        }
    }

    /// Call `id`'s reply streams: its chunks go to `tx`; `buffered` counts
    /// the bytes its caller has not taken yet.
    pub(super) fn stream(&mut self, id: u64, tx: BodySender, buffered: Arc<AtomicUsize>) {
        if let Some(pending) = self.map.get_mut(&id) {
            pending.stream = Some(Stream { tx, buffered });
        }
    }

    /// A `body` chunk of call `id`'s streamed reply: it goes to the caller,
    /// and with `end` the call leaves, its body finished. A chunk of a call
    /// no longer pending is ignored. A chunk before the head, or one that
    /// leaves more than `limit` bytes waiting for the caller, breaks the
    /// call.
    pub(super) fn body(
        &mut self,
        id: u64,
        end: bool,
        chunk: Bytes,
        limit: usize,
    ) -> Result<(), Broken> {
        let Some(pending) = self.map.get_mut(&id) else {
            return Ok(());
        };
        let Some(stream) = pending.stream.as_ref() else {
            let reason = "body chunk before the response head".to_owned();
            return Err(self.broken(id, reason));
        };
        let held = stream.buffered.fetch_add(chunk.len(), Ordering::Relaxed) + chunk.len();
        // A flow-controlled worker never has more than its window waiting
        // (it gets credit only as the caller reads); one that overruns it
        // is cut off. Others may fill up to max_response_body.
        if held > limit {
            let reason = format!(
                "{held} bytes of the reply are waiting for the caller, more than the {limit} allowed"
            );
            return Err(self.broken(id, reason));
        }
        if !stream.tx.send(chunk) {
            // The caller is gone; its guard sends the cancel.
            return Ok(());
        }
        if end {
            if let Some(Pending {
                stream: Some(stream),
                ..
            }) = self.map.remove(&id)
            {
                stream.tx.finish();
            }
        }
        Ok(())
    }

    /// Takes call `id` out as broken by `reason`.
    fn broken(&mut self, id: u64, reason: String) -> Broken {
        Broken {
            call: self.map.remove(&id),
            reason,
        }
    }

    /// Closes the table: every call leaves, and no new call may start.
    /// Only the first cause is kept; it is the one that explains what
    /// happened (`None` for any later one). A call the worker may have
    /// started is lost; one it cannot have started may go elsewhere.
    pub(super) fn close(&mut self, cause: &str) -> Option<Exits> {
        if self.closed.is_some() {
            return None;
        }
        self.closed = Some(cause.to_owned());
        let drained = self.map.drain().map(|(_, pending)| {
            let failure = if pending.accepted {
                Failure::Lost(cause.to_owned())
            } else {
                Failure::Unsent(cause.to_owned())
            };
            (pending, failure)
        });
        Some(drained.collect())
    }

    /// The connection dropped and the worker may come back (resume). Only
    /// the calls nothing else can save wait for it: a call that never
    /// started (gated, no `accepted` recorded) or that may safely run twice
    /// (`replayable`) fails at once, so that its caller sends it to another
    /// worker now rather than after `resume_window`. It leaves the map: if
    /// the worker resumes still holding it, it gets a `cancel` and its reply
    /// is ignored, so a moved call is never answered twice. When the worker
    /// is already `back` (its resume superseded this connection), every call
    /// stays for it. Bodies in flight cannot be resumed, so streamed replies
    /// are cut off and uploads stop (their windows close, which fails them).
    pub(super) fn hold_for_resume(&mut self, back: bool, cause: &str) -> Exits {
        let movable = |p: &Pending| !back && (p.replayable || !p.accepted);
        for pending in self.map.values() {
            if let Some(window) = &pending.window {
                window.close();
            }
        }
        let ids: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, p)| p.stream.is_some() || movable(p))
            .map(|(id, _)| *id)
            .collect();
        ids.iter()
            .filter_map(|id| self.map.remove(id))
            .map(|pending| {
                let failure = if pending.stream.is_some() {
                    Failure::Lost("connection lost mid-body".into())
                } else if pending.accepted {
                    Failure::Lost(cause.to_owned())
                } else {
                    Failure::Unsent(cause.to_owned())
                };
                (pending, failure)
            })
            .collect()
    }

    /// The worker is back on a new connection: each call still waiting is
    /// matched against what it says it holds, `known` (the table of
    /// PROTOCOL.md 8.5). A call it is still running stands; one whose
    /// reply it wrote to the dropped connection stands too, and is returned
    /// in `resend` so the worker is asked to send the reply again; one it
    /// never heard of never started, so it may go to any worker. `issued`:
    /// the ids this session has given out.
    pub(super) fn resume(&mut self, issued: Range<u64>, known: &Known) -> Resumed {
        let (running, replied) = (&known.running, &known.replied);
        let mut frames = Vec::new();
        // The gated calls the worker holds may start now (a `start` may
        // have been lost with the old connection; a repeat is ignored).
        // A call it holds that is no longer pending here ended while it
        // was away (timeout, caller gone): the `cancel` went down with
        // the old connection, so it is sent again.
        // Ids this session never issued are ignored: answering them
        // would let a `resume` of 131072 made-up ids queue as many
        // cancels.
        for id in running.iter().filter(|id| issued.contains(id)) {
            match self.map.get_mut(id) {
                Some(p) if p.gated => {
                    p.accepted = true;
                    p.answered = true;
                    frames.push(Control::Start { id: *id });
                }
                Some(_) => {}
                None => frames.push(Control::Cancel {
                    id: *id,
                    reason: "gone".into(),
                }),
            }
        }
        let ids: Vec<u64> = self
            .map
            .keys()
            .copied()
            .filter(|id| !running.contains(id))
            .collect();
        let resend = ids
            .iter()
            .copied()
            .filter(|id| replied.contains(id))
            .collect();
        let gone = ids
            .into_iter()
            .filter(|id| !replied.contains(id))
            .filter_map(|id| {
                let pending = self.map.remove(&id)?;
                // Only a call that cannot have started may go elsewhere:
                // the worker's lists miss calls it ran and forgot (a
                // streamed reply cut with the link, a reply pushed out of
                // its replay ring), so "not listed" alone proves nothing.
                let failure = if pending.accepted {
                    Failure::Lost("the worker no longer knows this call".into())
                } else {
                    Failure::Unsent("the worker never received it".into())
                };
                Some((pending, failure))
            })
            .collect();
        Resumed {
            frames,
            resend,
            gone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot::error::TryRecvError;

    /// Enters call `id` (no window) and returns its caller's receiver.
    fn call(t: &mut Calls, id: u64, gated: bool, replayable: bool) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        t.start(id, tx, None, gated, replayable)
            .expect("the table is open");
        rx
    }

    /// Makes call `id`'s reply stream, as the session does for a head with
    /// `end: false`; returns the body its caller reads.
    fn streamed(t: &mut Calls, id: u64) -> Body {
        let Head::First(tx) = t.head(id) else {
            panic!("call {id} has its first head");
        };
        let (sender, body) = Body::channel();
        t.stream(id, sender, Arc::new(AtomicUsize::new(0)));
        assert!(tx.send(Ok(Response::new(Body::empty()))).is_ok());
        body
    }

    /// The failure a caller got; `None` if it got nothing (yet).
    fn failure(rx: &mut oneshot::Receiver<Reply>) -> Option<Failure> {
        match rx.try_recv() {
            Ok(Err(failure)) => Some(failure),
            Ok(Ok(_)) => panic!("a reply, not a failure"),
            Err(_) => None,
        }
    }

    fn waiting(rx: &mut oneshot::Receiver<Reply>) -> bool {
        matches!(rx.try_recv(), Err(TryRecvError::Empty))
    }

    /// What a resuming worker says: `running`, `replied`.
    fn known(running: &[u64], replied: &[u64]) -> Known {
        Known::from(&protocol::Resume {
            session_id: "s".into(),
            running: running.to_vec(),
            replied: replied.to_vec(),
        })
    }

    /// A call no longer in the table: every later frame for it is ignored.
    fn gone(t: &mut Calls, id: u64) {
        assert!(matches!(t.head(id), Head::Late), "late head");
        assert!(t.body(id, true, Bytes::new(), 0).is_ok(), "late chunk");
        assert!(!t.accept(id), "late accepted gets no start");
        assert!(t.window(id).is_none(), "late credit");
        assert!(t.remove(id).is_none(), "removed once");
    }

    // --- exits ---

    #[test]
    fn a_whole_reply_takes_its_call_out() {
        let mut t = Calls::default();
        let mut rx = call(&mut t, 1, false, false);
        let Head::First(tx) = t.head(1) else {
            panic!("first head");
        };
        assert!(t.remove(1).is_some());
        assert!(tx.send(Ok(Response::new(Body::full("hi")))).is_ok());
        assert!(matches!(rx.try_recv(), Ok(Ok(_))));
        assert_eq!(t.len(), 0);
        gone(&mut t, 1);
    }

    #[tokio::test]
    async fn a_streamed_reply_leaves_with_its_last_chunk() {
        let mut t = Calls::default();
        let _rx = call(&mut t, 1, false, false);
        let body = streamed(&mut t, 1);
        assert!(t.body(1, false, Bytes::from_static(b"ab"), 4).is_ok());
        assert_eq!(t.len(), 1, "the stream keeps its call");
        assert!(t.body(1, true, Bytes::from_static(b"cd"), 4).is_ok());
        assert_eq!(t.len(), 0);
        assert_eq!(body.collect(10).await, Ok(Bytes::from_static(b"abcd")));
        gone(&mut t, 1);
    }

    #[tokio::test]
    async fn a_second_head_breaks_the_call() {
        let mut t = Calls::default();
        let _rx = call(&mut t, 1, false, false);
        let body = streamed(&mut t, 1);
        let Head::Second(broken) = t.head(1) else {
            panic!("a second head");
        };
        assert_eq!(t.len(), 0);
        assert_eq!(broken.fail(), "second response head for one call");
        assert_eq!(
            body.collect(10).await,
            Err(BodyError::new(
                "invalid reply mid-body: second response head for one call"
            ))
        );
        gone(&mut t, 1);
    }

    #[test]
    fn a_chunk_before_the_head_breaks_the_call() {
        let mut t = Calls::default();
        let mut rx = call(&mut t, 1, false, false);
        let broken = t.body(1, false, Bytes::from_static(b"x"), 10);
        let reason = broken.expect_err("broken").fail();
        assert_eq!(reason, "body chunk before the response head");
        assert_eq!(failure(&mut rx), Some(Failure::Bad(reason)));
        gone(&mut t, 1);
    }

    #[tokio::test]
    async fn a_chunk_past_the_limit_breaks_the_call() {
        let mut t = Calls::default();
        let _rx = call(&mut t, 1, false, false);
        let body = streamed(&mut t, 1);
        assert!(t.body(1, false, Bytes::from_static(b"abc"), 4).is_ok());
        let broken = t.body(1, false, Bytes::from_static(b"de"), 4);
        let reason = broken.expect_err("over the limit").fail();
        assert_eq!(
            reason,
            "5 bytes of the reply are waiting for the caller, more than the 4 allowed"
        );
        assert!(body.collect(10).await.is_err(), "cut off, not short");
        gone(&mut t, 1);
    }

    #[test]
    fn a_chunk_for_a_caller_gone_leaves_the_call_to_its_guard() {
        let mut t = Calls::default();
        let _rx = call(&mut t, 1, false, false);
        drop(streamed(&mut t, 1));
        assert!(t.body(1, true, Bytes::from_static(b"x"), 10).is_ok());
        assert_eq!(t.len(), 1, "the guard's drop takes it out and cancels");
        assert!(t.remove(1).is_some());
    }

    #[tokio::test]
    async fn a_failure_reaches_the_caller_in_either_stage() {
        let mut t = Calls::default();
        // Before the head: the reply is the failure.
        let mut rx = call(&mut t, 1, false, false);
        let pending = t.remove(1).expect("pending");
        pending.fail(Failure::Bad("worker reported x: y".into()));
        assert_eq!(
            failure(&mut rx),
            Some(Failure::Bad("worker reported x: y".into()))
        );
        gone(&mut t, 1);
        // After a streamed head: the body is cut off with it.
        let _rx = call(&mut t, 2, false, false);
        let body = streamed(&mut t, 2);
        let pending = t.remove(2).expect("pending");
        pending.fail(Failure::Lost("reset".into()));
        assert_eq!(
            body.collect(10).await,
            Err(BodyError::new("worker lost mid-body: reset"))
        );
        gone(&mut t, 2);
    }

    #[test]
    fn a_caller_dropped_or_aborted_takes_its_call_out_once() {
        let mut t = Calls::default();
        let mut rx = call(&mut t, 1, true, false);
        // The guard's drop (or `abort_call`) cancels only if this is Some.
        let pending = t.remove(1).expect("still pending: cancel");
        pending.fail(Failure::Bad("call aborted: body_too_large".into()));
        assert_eq!(
            failure(&mut rx),
            Some(Failure::Bad("call aborted: body_too_large".into()))
        );
        gone(&mut t, 1);
    }

    #[tokio::test]
    async fn closing_fails_every_call_and_refuses_new_ones() {
        let mut t = Calls::default();
        let mut unsent = call(&mut t, 1, true, false);
        let mut accepted = call(&mut t, 2, true, false);
        assert!(t.accept(2));
        let mut ungated = call(&mut t, 3, false, false);
        let _rx = call(&mut t, 4, false, false);
        let body = streamed(&mut t, 4);
        let exits = t.close("cut").expect("first close");
        assert_eq!(exits.len(), 4);
        assert_eq!(t.len(), 0);
        fail_all(exits);
        assert_eq!(failure(&mut unsent), Some(Failure::Unsent("cut".into())));
        assert_eq!(failure(&mut accepted), Some(Failure::Lost("cut".into())));
        assert_eq!(failure(&mut ungated), Some(Failure::Lost("cut".into())));
        assert_eq!(
            body.collect(10).await,
            Err(BodyError::new("worker lost mid-body: cut"))
        );
        // The first cause stays; no call gets in any more.
        assert!(t.close("later").is_none());
        assert_eq!(t.end_cause().map(String::as_str), Some("cut"));
        let (tx, _rx) = oneshot::channel();
        assert_eq!(
            t.start(5, tx, None, false, false),
            Err(Failure::Unsent("cut".into()))
        );
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_dropped_table_ends_every_call() {
        let mut t = Calls::default();
        let mut rx = call(&mut t, 1, false, false);
        drop(t);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Closed)));
    }

    #[test]
    fn only_the_first_accepted_is_answered() {
        let mut t = Calls::default();
        let mut rx = call(&mut t, 1, true, false);
        assert!(t.accept(1), "start");
        assert!(!t.accept(1), "a repeat gets nothing");
        // Accepted: lost with the connection, not sent elsewhere.
        fail_all(t.close("cut").expect("open"));
        assert_eq!(failure(&mut rx), Some(Failure::Lost("cut".into())));
    }

    #[test]
    fn credit_finds_the_window_of_a_pending_upload_only() {
        let mut t = Calls::default();
        let (tx, _rx) = oneshot::channel();
        let window = Arc::new(Window::new(8));
        t.start(1, tx, Some(window.clone()), false, false)
            .expect("open");
        let _whole = call(&mut t, 2, false, false);
        assert!(t.window(1).is_some_and(|w| Arc::ptr_eq(w, &window)));
        assert!(t.window(2).is_none(), "a whole body has no window");
        assert!(t.window(3).is_none(), "no such call");
        t.remove(1);
        assert!(t.window(1).is_none());
    }

    // --- a dropped connection (PROTOCOL.md 8.5, step 2) ---

    #[tokio::test]
    async fn a_drop_moves_the_calls_another_worker_can_take() {
        let mut t = Calls::default();
        let mut never_accepted = call(&mut t, 1, true, false);
        let mut replayable = call(&mut t, 2, true, true);
        assert!(t.accept(2));
        let mut accepted = call(&mut t, 3, true, false);
        assert!(t.accept(3));
        let mut ungated = call(&mut t, 4, false, false);
        let _rx = call(&mut t, 5, false, false);
        let body = streamed(&mut t, 5);
        let (tx, mut upload) = oneshot::channel();
        let window = Arc::new(Window::new(8));
        t.start(6, tx, Some(window.clone()), false, false)
            .expect("open");
        fail_all(t.hold_for_resume(false, "reset"));
        assert_eq!(
            failure(&mut never_accepted),
            Some(Failure::Unsent("reset".into()))
        );
        assert_eq!(
            failure(&mut replayable),
            Some(Failure::Lost("reset".into()))
        );
        assert_eq!(
            body.collect(10).await,
            Err(BodyError::new(
                "worker lost mid-body: connection lost mid-body"
            ))
        );
        // These wait for the worker; an upload's window closes.
        assert!(waiting(&mut accepted));
        assert!(waiting(&mut ungated));
        assert!(waiting(&mut upload));
        assert!(window.is_closed());
        assert_eq!(t.len(), 3);
        assert!(t.end_cause().is_none(), "not closed: new calls may wait");
    }

    #[tokio::test]
    async fn a_drop_after_the_worker_is_back_keeps_all_but_streams() {
        let mut t = Calls::default();
        let mut never_accepted = call(&mut t, 1, true, false);
        let mut replayable = call(&mut t, 2, false, true);
        let _rx = call(&mut t, 3, false, false);
        let body = streamed(&mut t, 3);
        fail_all(t.hold_for_resume(true, "superseded"));
        assert!(waiting(&mut never_accepted));
        assert!(waiting(&mut replayable));
        assert!(body.collect(10).await.is_err());
        assert_eq!(t.len(), 2);
    }

    // --- the resume matching table (PROTOCOL.md 8.5, step 4), row by row ---

    #[test]
    fn resume_row_in_running_stands_and_a_gated_call_gets_start() {
        let mut t = Calls::default();
        let mut gated = call(&mut t, 1, true, false);
        let mut ungated = call(&mut t, 2, false, false);
        let r = t.resume(1..3, &known(&[1, 2], &[]));
        assert_eq!(r.frames, vec![Control::Start { id: 1 }]);
        assert!(r.resend.is_empty());
        assert!(r.gone.is_empty());
        assert_eq!(t.len(), 2);
        assert!(waiting(&mut gated));
        assert!(waiting(&mut ungated));
        // The `start` counts as the answer to `accepted`: the call may have
        // started, so it is lost with a connection, never moved.
        assert!(!t.accept(1), "its start went out");
        fail_all(t.close("cut").expect("open"));
        assert_eq!(failure(&mut gated), Some(Failure::Lost("cut".into())));
    }

    #[test]
    fn resume_row_in_replied_stands_and_is_resent() {
        let mut t = Calls::default();
        let mut accepted = call(&mut t, 1, true, false);
        assert!(t.accept(1));
        let mut ungated = call(&mut t, 2, false, false);
        let r = t.resume(1..3, &known(&[], &[1, 2]));
        assert!(r.frames.is_empty());
        let mut resend = r.resend;
        resend.sort_unstable();
        assert_eq!(resend, vec![1, 2]);
        assert!(r.gone.is_empty());
        assert!(waiting(&mut accepted));
        assert!(waiting(&mut ungated));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn resume_row_in_both_lists_counts_as_running() {
        let mut t = Calls::default();
        let mut rx = call(&mut t, 1, false, false);
        let r = t.resume(1..2, &known(&[1], &[1]));
        assert!(r.resend.is_empty(), "its reply comes anyway");
        assert!(r.gone.is_empty());
        assert!(waiting(&mut rx));
    }

    #[test]
    fn resume_row_in_neither_gated_never_accepted_is_sent_again() {
        let mut t = Calls::default();
        let mut rx = call(&mut t, 1, true, false);
        let r = t.resume(1..2, &known(&[], &[]));
        assert!(r.frames.is_empty());
        assert!(r.resend.is_empty());
        fail_all(r.gone);
        assert_eq!(
            failure(&mut rx),
            Some(Failure::Unsent("the worker never received it".into()))
        );
        gone(&mut t, 1);
    }

    #[test]
    fn resume_row_in_neither_anything_else_is_lost() {
        let mut t = Calls::default();
        // Accepted; sent with `"gate": false` (or on a connection without
        // `accepted` frames: the session enters both as not gated).
        let mut accepted = call(&mut t, 1, true, false);
        assert!(t.accept(1));
        let mut ungated = call(&mut t, 2, false, false);
        let r = t.resume(1..3, &known(&[], &[]));
        assert!(r.frames.is_empty());
        assert!(r.resend.is_empty());
        fail_all(r.gone);
        let lost = Some(Failure::Lost("the worker no longer knows this call".into()));
        assert_eq!(failure(&mut accepted), lost);
        assert_eq!(failure(&mut ungated), lost);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn resume_cancels_a_running_call_that_ended_here() {
        let mut t = Calls::default();
        let _rx = call(&mut t, 1, true, false);
        t.remove(1); // timed out while the worker was away
        let r = t.resume(1..2, &known(&[1], &[]));
        assert_eq!(
            r.frames,
            vec![Control::Cancel {
                id: 1,
                reason: "gone".into()
            }]
        );
        assert!(r.resend.is_empty() && r.gone.is_empty());
    }

    #[test]
    fn resume_ignores_ids_never_issued() {
        let mut t = Calls::default();
        let mut rx = call(&mut t, 1, false, false);
        let r = t.resume(1..2, &known(&[1, 2, 7, 0], &[9]));
        assert!(r.frames.is_empty(), "no cancel for made-up ids");
        assert!(r.resend.is_empty(), "nothing to resend but pending calls");
        assert!(r.gone.is_empty());
        assert!(waiting(&mut rx));
    }
}
