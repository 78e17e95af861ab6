//! The write half of a WebSocket connection, shared by the bridge and the
//! worker: frames from a bounded channel, written in batches with one flush
//! each, and a stall bound that applies to every step rather than to the
//! whole batch (a slow but live reader is fine; a reader that stopped is not).

use std::{fmt, time::Duration};

use futures_util::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message};

/// Most frames written before one flush: a burst becomes a few TLS records
/// and syscalls, while a lone frame still goes out at once.
pub(crate) const BATCH_FRAMES: usize = 64;

/// Most bytes written before one flush, so a batch of large chunks does not
/// sit in a buffer while small calls wait behind it.
pub(crate) const BATCH_BYTES: usize = 512 * 1024;

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

/// Runs one write step under the stall bound.
pub(crate) async fn step<F>(stall: Duration, fut: F) -> Result<(), WriteError>
where
    F: std::future::Future<Output = Result<(), tungstenite::Error>>,
{
    match tokio::time::timeout(stall, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(WriteError::Failed(e)),
        Err(_) => Err(WriteError::Stalled(stall)),
    }
}

fn size(msg: &Message) -> usize {
    match msg {
        Message::Text(t) => t.len(),
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(_) | Message::Frame(_) => 0,
    }
}

/// Writes `first` and whatever else is already queued (up to a batch), then
/// flushes.
pub(crate) async fn write_batch<S>(
    sink: &mut S,
    first: Message,
    rx: &mut mpsc::Receiver<Message>,
    stall: Duration,
) -> Result<(), WriteError>
where
    S: Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let mut bytes = size(&first);
    step(stall, sink.feed(first)).await?;
    let mut frames = 1;
    while frames < BATCH_FRAMES && bytes < BATCH_BYTES {
        let Ok(msg) = rx.try_recv() else { break };
        bytes += size(&msg);
        frames += 1;
        step(stall, sink.feed(msg)).await?;
    }
    step(stall, sink.flush()).await
}

/// `interval * (misses + 1)` without overflow: how long a peer may stay
/// silent (or stop reading) before it is considered gone.
pub(crate) fn dead_after(interval: Duration, misses: u32) -> Duration {
    interval.saturating_mul(misses.saturating_add(1))
}
