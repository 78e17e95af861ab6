//! The call path's NATS messages, handed to the client in batches.
//!
//! `async-nats` writes whatever its connection task finds queued when it
//! runs. On tokio's multi-thread runtime a task woken by another runs right
//! after it (the LIFO slot), so a call task that queues one message gets the
//! connection task to itself: one message, one write, and one read and one
//! write on nats-server per message. Calls hand their messages to the
//! [`Batcher`] instead. Its task lets the other ready tasks queue theirs
//! before it passes everything to the client in one go, and the client then
//! writes them together, as it does by itself on a current-thread runtime
//! (docs/CLUSTER.md, "Benchmark").
//!
//! Order is kept: messages reach the client in the order they were handed
//! here, so the frames of one call stay in order.

use std::{future::Future, pin::Pin, task::Poll};

use async_nats::{Client, Message, Request, RequestError, Subject};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

/// Messages waiting for the batcher's task; past this, senders wait (the
/// client's own queue bounds what is in flight behind it).
const QUEUE: usize = 1024;

/// Most messages passed to the client before the task yields again.
const BATCH: usize = 64;

/// Whether more than one call is in progress through the cluster.
pub(crate) type Busy = Box<dyn Fn() -> bool + Send + Sync>;

/// A request on its way: await it for the answer. Whoever polls it drives
/// it, so it is sent even if the batcher's task could not hand it over yet.
pub(crate) type Answer = Pin<Box<dyn Future<Output = Result<Message, RequestError>> + Send>>;

/// The call path's way to the NATS client (see the module's comment).
#[derive(Debug)]
pub(crate) struct Batcher {
    queue: mpsc::Sender<Out>,
}

enum Out {
    Publish {
        subject: Subject,
        payload: Bytes,
    },
    Request {
        subject: Subject,
        payload: Bytes,
        answer: oneshot::Sender<Answer>,
    },
}

impl Batcher {
    /// Starts the batcher's task, which ends once the batcher is dropped and
    /// what it holds is handed to `client`. `busy` says whether more than
    /// one call is in progress, so that others may have messages to add.
    pub(crate) fn start(client: Client, busy: Busy) -> Batcher {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(client, rx, busy));
        Batcher { queue }
    }

    /// Publishes `payload` on `subject`: `false` if the batcher's task is
    /// gone. The client takes it in order after the messages handed before;
    /// if the client itself is closed (the bridge is stopping), the message
    /// is dropped there and logged at debug level.
    pub(crate) async fn publish(&self, subject: Subject, payload: Bytes) -> bool {
        let out = Out::Publish { subject, payload };
        self.queue.send(out).await.is_ok()
    }

    /// [`Batcher::publish`] for code that cannot wait: the payload back if
    /// the queue is full or the client gone (the caller then waits elsewhere).
    pub(crate) fn try_publish(&self, subject: Subject, payload: Bytes) -> Result<(), Bytes> {
        let out = Out::Publish { subject, payload };
        self.queue.try_send(out).map_err(|e| match e.into_inner() {
            Out::Publish { payload, .. } | Out::Request { payload, .. } => payload,
        })
    }

    /// Sends `payload` as a request on `subject`; `None` if the client is
    /// gone. The client's own timeout is off: the caller bounds the wait.
    pub(crate) async fn request(&self, subject: Subject, payload: Bytes) -> Option<Answer> {
        let (answer, handed) = oneshot::channel();
        let out = Out::Request {
            subject,
            payload,
            answer,
        };
        self.queue.send(out).await.ok()?;
        handed.await.ok()
    }
}

/// The batcher's task: waits for a message, lets the ready tasks queue
/// theirs, then hands the client up to [`BATCH`] at once. It lets them only
/// when other calls are in progress (`busy`): a lone call's message goes at
/// once, without the scheduler pass a yield costs.
async fn run(client: Client, mut rx: mpsc::Receiver<Out>, busy: Busy) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        if busy() {
            tokio::task::yield_now().await;
        }
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(out) => batch.push(out),
                Err(_) => break,
            }
        }
        for out in batch.drain(..) {
            hand(&client, out).await;
        }
    }
}

/// Passes one message to the client. A request is polled once here, which
/// queues it in the client, and then given to whoever awaits its answer.
async fn hand(client: &Client, out: Out) {
    match out {
        Out::Publish { subject, payload } => {
            if let Err(e) = client.publish(subject, payload).await {
                debug!(error = %e, "cluster message not sent");
            }
        }
        Out::Request {
            subject,
            payload,
            answer,
        } => {
            let client = client.clone();
            let request = Request::new().payload(payload).timeout(None);
            let mut sent: Answer =
                Box::pin(async move { client.send_request(subject, request).await });
            let first = std::future::poll_fn(|cx| Poll::Ready(sent.as_mut().poll(cx))).await;
            let sent = match first {
                Poll::Pending => sent,
                Poll::Ready(done) => Box::pin(std::future::ready(done)),
            };
            // A caller that gave up has dropped its end: the request goes
            // with it (the client forgets a request whose answer nobody awaits).
            let _ = answer.send(sent);
        }
    }
}
