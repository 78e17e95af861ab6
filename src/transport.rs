//! The write half of a WebSocket connection, shared by the bridge and the
//! worker: frames from a bounded channel, written in batches with one flush
//! each, and a stall bound that applies to every step rather than to the
//! whole batch (a slow but live reader is fine; a reader that stopped is not).

use std::{
    collections::VecDeque,
    fmt,
    future::{poll_fn, Future},
    pin::pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::Poll,
    time::Duration,
};

use bytes::Bytes;
use futures_util::{Sink, SinkExt};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

mod queues;

use queues::{Lane, TrySendError};

/// Most bytes tungstenite reads per call, both sides; also the read buffer it
/// allocates when a connection opens. It zero-fills this much before *every*
/// read, including reads that find nothing, and keeps the buffer for the
/// connection's life. A frame larger than this still arrives whole: the
/// buffer grows to the frame's length once its head is read, and the frame is
/// read in steps of this size. 1 KiB holds a small call's frame, and against
/// 16 KiB it costs less per call (64 B calls 51.3k -> 48.4k instructions,
/// 16 KiB calls 277k -> 243k, `scripts/profile`) and 19 KiB less RSS per idle
/// worker connection (`scripts/bench-scale.sh`), with bulk transfers as fast
/// (`cargo bench --bench interleave`). See docs/PERFORMANCE.md.
pub(crate) const READ_BUFFER: usize = 1024;

/// Most frames written before one flush: a burst becomes a few TLS records
/// and syscalls, while a lone frame still goes out at once.
pub(crate) const BATCH_FRAMES: usize = 64;

/// Most bytes written before one flush, so a batch of large chunks does not
/// sit in a buffer while small calls wait behind it.
pub(crate) const BATCH_BYTES: usize = 512 * 1024;

/// A batch smaller than this waits one scheduler pass for more frames
/// before it is flushed (see `write_batch`).
const COALESCE_BELOW: usize = 8 * 1024;

/// Why a write did not complete.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// The socket or the WebSocket layer failed.
    Failed(tungstenite::Error),
    /// One step made no progress for this long: the peer stopped reading.
    Stalled(Duration),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Failed(e) => write!(f, "write failed: {e}"),
            WriteError::Stalled(d) => write!(f, "peer stopped reading for {d:?}"),
        }
    }
}

/// Runs one write step under the stall bound. The bound's timer is made only
/// once the step has to wait: most steps complete on their first poll (the
/// buffer has room), and arming a timeout reads the clock, once per frame.
pub(crate) async fn step<F, T>(stall: Duration, fut: F) -> Result<T, WriteError>
where
    F: Future<Output = Result<T, tungstenite::Error>>,
{
    let mut fut = pin!(fut);
    let mut timer = pin!(None::<tokio::time::Sleep>);
    let done = poll_fn(|cx| {
        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if timer.is_none() {
            timer.set(Some(tokio::time::sleep(stall)));
        }
        match timer.as_mut().as_pin_mut().map(|t| t.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(None),
            _ => Poll::Pending,
        }
    })
    .await;
    match done {
        Some(Ok(t)) => Ok(t),
        Some(Err(e)) => Err(WriteError::Failed(e)),
        None => Err(WriteError::Stalled(stall)),
    }
}

/// A frame as the outbox queues it: a text (control) or binary (data)
/// frame, 40 bytes where a tungstenite `Message` takes 64.
#[derive(Debug, Clone)]
pub(crate) enum OutFrame {
    Text(Utf8Bytes),
    Binary(Bytes),
    /// A binary frame whose payload is the first part followed by the
    /// second (a request head and the body it carries, not copied
    /// together); boxed to keep the slot small.
    Split(Box<[Bytes; 2]>),
    Ping(Bytes),
    Pong(Bytes),
}

impl OutFrame {
    /// A text frame.
    pub(crate) fn text(text: impl Into<Utf8Bytes>) -> OutFrame {
        OutFrame::Text(text.into())
    }

    /// A binary frame of `head` followed by `body`.
    pub(crate) fn binary_parts(head: Bytes, body: Bytes) -> OutFrame {
        if body.is_empty() {
            OutFrame::Binary(head)
        } else {
            OutFrame::Split(Box::new([head, body]))
        }
    }

    /// The frame's payload, in two parts (the second often empty).
    pub(crate) fn payload(&self) -> [&[u8]; 2] {
        match self {
            OutFrame::Text(t) => [t.as_bytes(), &[]],
            OutFrame::Binary(b) | OutFrame::Ping(b) | OutFrame::Pong(b) => [b, &[]],
            OutFrame::Split(parts) => [&parts[0], &parts[1]],
        }
    }

    /// The payload's length.
    pub(crate) fn len(&self) -> usize {
        let [a, b] = self.payload();
        a.len() + b.len()
    }
}

impl From<OutFrame> for Message {
    fn from(frame: OutFrame) -> Message {
        match frame {
            OutFrame::Text(t) => Message::Text(t),
            OutFrame::Binary(b) => Message::Binary(b),
            OutFrame::Split(parts) => {
                Message::Binary(Bytes::from([&parts[0][..], &parts[1][..]].concat()))
            }
            OutFrame::Ping(b) => Message::Ping(b),
            OutFrame::Pong(b) => Message::Pong(b),
        }
    }
}

/// Control frames and message heads queued before senders wait.
const URGENT: usize = 1024;

/// Body chunks queued before senders wait: a few chunks keep the socket
/// busy, and a short queue keeps memory and head-of-line delay small.
const BULK: usize = 8;

/// A queued frame, optionally with someone waiting for it to be written.
#[derive(Debug)]
pub(crate) struct Outgoing {
    msg: OutFrame,
    /// Told once the frame has been handed to the socket.
    written: Option<oneshot::Sender<()>>,
}

impl From<OutFrame> for Outgoing {
    fn from(msg: OutFrame) -> Self {
        Outgoing { msg, written: None }
    }
}

/// The two queues in front of a connection's writer: `urgent` for control
/// frames and message heads (small; always written first, so a short call
/// never waits behind someone's upload) and `bulk` for body chunks.
/// Both hold no memory while empty (see [`queues`]).
#[derive(Clone)]
pub(crate) struct Outbox {
    queues: queues::Sender<Outgoing>,
    /// Control frames from code that cannot wait, while `urgent` is full.
    overflow: Arc<Overflow>,
}

/// The writer's end of an [`Outbox`].
pub(crate) struct Inbox {
    queues: queues::Receiver<Outgoing>,
    /// Cancelled once the overflow has passed its bound.
    choked: CancellationToken,
}

/// The queues are gone: the connection has ended.
#[derive(Debug)]
pub(crate) struct Closed;

/// A new pair of queues whose overflow never gives up (the worker's side:
/// its peer is the bridge it chose to trust).
pub(crate) fn outbox() -> (Outbox, Inbox) {
    bounded_outbox(usize::MAX)
}

/// A new pair of queues for a peer that may be hostile: once more than
/// `overflow` control frames wait behind a full urgent queue, the peer has
/// stopped reading and the connection is choked (see [`Overflow`]).
pub(crate) fn bounded_outbox(overflow: usize) -> (Outbox, Inbox) {
    let (queues, queues_rx) = queues::queues(URGENT, BULK);
    let overflow = Arc::new(Overflow {
        limit: overflow,
        queued: AtomicBool::new(false),
        frames: Mutex::default(),
        choked: CancellationToken::new(),
    });
    let choked = overflow.choked.clone();
    (
        Outbox { queues, overflow },
        Inbox {
            queues: queues_rx,
            choked,
        },
    )
}

/// Control frames queued by code that cannot wait (a `Drop`, the reader)
/// while the urgent queue is full, in order, and one task at most that
/// moves them into it as room appears.
///
/// It replaces a task per frame: a worker that stopped reading while it
/// kept the bridge answering (a flood of `credit`-earning chunks, say)
/// made the bridge spawn without bound until the write-stall bound fired,
/// hundreds of MB later. Past `limit` frames the connection is *choked*:
/// the queue is dropped and the writer ends the connection as a stalled
/// one. Dropping the frames instead would be wrong: a lost `cancel`,
/// `start` or `credit` leaves a call hanging on a connection that stays up.
#[derive(Debug)]
struct Overflow {
    /// Most frames queued here before the connection is choked.
    limit: usize,
    /// Frames are queued here (or being moved): new control frames go
    /// behind them, so that the frames of one call keep their order. Read
    /// without the lock on the hot path, where it is nearly always false.
    queued: AtomicBool,
    frames: Mutex<OverflowFrames>,
    /// Cancelled once `limit` is passed.
    choked: CancellationToken,
}

#[derive(Debug, Default)]
struct OverflowFrames {
    queue: VecDeque<Outgoing>,
    /// A task is moving the queue into the urgent channel.
    draining: bool,
}

impl Overflow {
    fn lock(&self) -> MutexGuard<'_, OverflowFrames> {
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `msg` behind the frames already waiting; starts the task that
    /// moves them if none runs.
    fn push(self: &Arc<Self>, msg: Outgoing, outbox: &Outbox) {
        let mut frames = self.lock();
        if self.choked.is_cancelled() {
            return; // the connection is ending; the frame goes with it
        }
        if frames.queue.len() >= self.limit {
            frames.queue = VecDeque::new();
            drop(frames);
            self.choked.cancel();
            return;
        }
        frames.queue.push_back(msg);
        self.queued.store(true, Ordering::Release);
        if frames.draining {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            frames.queue.clear();
            return;
        };
        frames.draining = true;
        let (overflow, queues) = (self.clone(), outbox.queues.clone());
        rt.spawn(async move { overflow.drain(queues).await });
    }

    /// Moves the queued frames into the urgent channel, in order, as room
    /// appears; ends when the queue is empty, the connection is choked or
    /// the channel is closed.
    async fn drain(&self, queues: queues::Sender<Outgoing>) {
        loop {
            let next = {
                let mut frames = self.lock();
                match frames.queue.pop_front() {
                    Some(next) => next,
                    None => {
                        frames.draining = false;
                        self.queued.store(false, Ordering::Release);
                        return;
                    }
                }
            };
            let sent = tokio::select! {
                _ = self.choked.cancelled() => false,
                sent = queues.send(Lane::Urgent, next) => sent.is_ok(),
            };
            if !sent {
                let mut frames = self.lock();
                frames.queue = VecDeque::new();
                frames.draining = false;
                return;
            }
        }
    }
}

impl Outbox {
    /// Queues a control frame or a head, waiting if the queue is full.
    pub(crate) async fn urgent(&self, msg: OutFrame) -> Result<(), Closed> {
        // Queued at once when there is room, as nearly always; the wait for
        // room is boxed, so that the futures of the bridge's calls, which
        // await this, keep no room for it while they wait for their replies.
        match self.queues.try_send(Lane::Urgent, msg.into()) {
            Ok(()) => Ok(()),
            Err(TrySendError::Closed(_)) => Err(Closed),
            Err(TrySendError::Full(msg)) => Box::pin(self.queues.send(Lane::Urgent, msg))
                .await
                .map_err(|_| Closed),
        }
    }

    /// Like [`Outbox::urgent`]; the receiver completes once the frame has
    /// been written to the socket, and fails if it was taken by a writer
    /// whose connection broke (the frame may not have arrived).
    pub(crate) async fn urgent_written(
        &self,
        msg: OutFrame,
    ) -> Result<oneshot::Receiver<()>, Closed> {
        let (tx, rx) = oneshot::channel();
        let msg = Outgoing {
            msg,
            written: Some(tx),
        };
        self.queues
            .send(Lane::Urgent, msg)
            .await
            .map_err(|_| Closed)?;
        Ok(rx)
    }

    /// Queues a body chunk, waiting if the queue is full.
    pub(crate) async fn bulk(&self, msg: OutFrame) -> Result<(), Closed> {
        self.queues
            .send(Lane::Bulk, msg.into())
            .await
            .map_err(|_| Closed)
    }

    /// Queues a control frame if there is room, else drops it: for error
    /// reports, which are advice, never for credits or cancels.
    pub(crate) fn try_control(&self, msg: OutFrame) {
        let _ = self.queues.try_send(Lane::Urgent, msg.into());
    }

    /// Queues a control frame from code that cannot wait (a `Drop`, the
    /// reader). If the queue is full, the frame waits in the bounded
    /// overflow (see [`Overflow`]).
    pub(crate) fn control(&self, msg: OutFrame) {
        let mut msg = Outgoing::from(msg);
        if !self.overflow.queued.load(Ordering::Acquire) {
            match self.queues.try_send(Lane::Urgent, msg) {
                Ok(()) | Err(TrySendError::Closed(_)) => return,
                Err(TrySendError::Full(m)) => msg = m,
            }
        }
        self.overflow.push(msg, self);
    }
}

impl Inbox {
    /// Cancelled once the peer has let more control frames pile up than
    /// the overflow allows ([`bounded_outbox`]): it stopped reading. The
    /// writer ends the connection then.
    pub(crate) fn choked(&self) -> CancellationToken {
        self.choked.clone()
    }

    /// The next frame, urgent ones first; `None` once both queues are closed.
    pub(crate) async fn recv(&mut self) -> Option<Outgoing> {
        self.queues.recv().await
    }

    /// Drops every queued frame (their writers' receivers fail).
    pub(crate) fn clear(&mut self) {
        while self.try_recv().is_some() {}
    }

    fn try_recv(&mut self) -> Option<Outgoing> {
        self.queues.try_recv()
    }
}

/// Frames taken from an [`Inbox`] for one flush.
pub(crate) struct Batch {
    pub(crate) frames: Vec<OutFrame>,
    /// Told once the batch has been written.
    waiting: Vec<oneshot::Sender<()>>,
}

impl Batch {
    /// Tells those waiting for the batch's frames that they were written.
    /// A batch dropped instead (its write failed) fails their receivers.
    pub(crate) fn written(self) {
        for tx in self.waiting {
            let _ = tx.send(());
        }
    }
}

/// `first` and whatever else is already queued (up to a batch, urgent
/// frames first). `busy`: other calls are in progress on the connection, so
/// other tasks may be about to queue frames (see below).
pub(crate) async fn take_batch(first: Outgoing, inbox: &mut Inbox, busy: bool) -> Batch {
    let mut batch = Batch {
        frames: Vec::new(),
        waiting: Vec::new(),
    };
    let mut next = Some(first);
    let mut bytes = 0;
    let mut yielded = false;
    loop {
        while let Some(Outgoing { msg, written }) = next {
            bytes += msg.len();
            batch.waiting.extend(written);
            batch.frames.push(msg);
            next = if batch.frames.len() < BATCH_FRAMES && bytes < BATCH_BYTES {
                inbox.try_recv()
            } else {
                None
            };
        }
        // Before flushing small frames, let the tasks that are ready right
        // now run once: tokio wakes this writer straight after the first
        // task that queued a frame (its LIFO slot), so without this every
        // small call under load went out in its own write and TLS record.
        // When nothing else is ready, the yield costs one scheduler pass, so
        // a lone call (`!busy`) goes at once. Large frames are not held
        // back: their cost is per byte, and a bigger batch only delays the
        // peer's start on them.
        if yielded || !busy || batch.frames.len() >= BATCH_FRAMES || bytes >= COALESCE_BELOW {
            return batch;
        }
        yielded = true;
        tokio::task::yield_now().await;
        next = inbox.try_recv();
        if next.is_none() {
            return batch;
        }
    }
}

/// Writes `first` and whatever else is already queued (up to a batch, urgent
/// frames first) into a tungstenite sink (the worker's side), then flushes.
pub(crate) async fn write_batch<S>(
    sink: &mut S,
    first: Outgoing,
    inbox: &mut Inbox,
    busy: bool,
    stall: Duration,
) -> Result<(), WriteError>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let mut batch = take_batch(first, inbox, busy).await;
    for msg in std::mem::take(&mut batch.frames) {
        step(stall, sink.feed(msg.into())).await?;
    }
    step(stall, sink.flush()).await?;
    batch.written();
    Ok(())
}

/// Default socket send buffer for worker connections. Bytes in the
/// kernel's buffer are bytes an urgent frame (a small call's head) must wait
/// behind; on loopback or a LAN a small buffer costs no throughput and
/// bounds that wait. A fixed size turns off the kernel's autotuning, which
/// long, fast links need: there, 0 (keep the OS default) is the better choice.
pub(crate) const SEND_BUFFER: usize = 256 * 1024;

/// Applies the worker-connection socket options; `send_buffer` 0 leaves the
/// send buffer to the OS.
pub(crate) fn tune(tcp: &tokio::net::TcpStream, send_buffer: usize) {
    let _ = tcp.set_nodelay(true);
    if send_buffer > 0 {
        let _ = socket2::SockRef::from(tcp).set_send_buffer_size(send_buffer);
    }
}

/// `interval * (misses + 1)` without overflow: how long a peer may stay
/// silent (or stop reading) before it is considered gone.
pub(crate) fn dead_after(interval: Duration, misses: u32) -> Duration {
    interval.saturating_mul(misses.saturating_add(1))
}
