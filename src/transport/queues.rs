//! The bounded queues in front of one connection's writer: two lanes
//! (urgent, bulk) with one reader, urgent first, that hold no memory while
//! empty.
//!
//! A tokio channel allocates its first block of 32 slots when it is made and
//! keeps it for its life: with two channels per connection that was 4.7 KB
//! of every idle worker connection's footprint (docs/PERFORMANCE.md,
//! "Memory per idle worker"). Here each lane is a `VecDeque` that grows as
//! frames arrive and is given back when the reader finds both lanes empty
//! and waits. Room is a semaphore per lane, so a full lane's senders wait in
//! order and a sender that gives up loses nothing.

use std::{
    collections::VecDeque,
    future::poll_fn,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll},
};

use futures_util::task::AtomicWaker;
use tokio::sync::{Semaphore, TryAcquireError};

/// Which queue a frame goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Control frames and message heads: always taken first.
    Urgent = 0,
    /// Body chunks.
    Bulk = 1,
}

const LANES: [Lane; 2] = [Lane::Urgent, Lane::Bulk];

/// Why a frame was not queued; the frame comes back.
#[derive(Debug)]
pub(crate) enum TrySendError<T> {
    /// The lane holds as many frames as it may.
    Full(T),
    /// The reader is gone.
    Closed(T),
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Free slots per lane; closed when the reader goes.
    room: [Semaphore; 2],
    /// The reader, waiting for a frame or for the last sender to go.
    reader: AtomicWaker,
    /// Live [`Sender`]s; at 0 the reader ends once the lanes are empty.
    senders: AtomicUsize,
}

struct State<T> {
    lanes: [VecDeque<T>; 2],
    /// The reader is gone: nothing more is queued.
    closed: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A sending end; cloned freely.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The reading end: one per pair of lanes.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// New lanes holding at most `urgent` and `bulk` frames.
pub(crate) fn queues<T>(urgent: usize, bulk: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            lanes: [VecDeque::new(), VecDeque::new()],
            closed: false,
        }),
        room: [Semaphore::new(urgent), Semaphore::new(bulk)],
        reader: AtomicWaker::new(),
        senders: AtomicUsize::new(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl<T> Sender<T> {
    /// Queues `item` if its lane has room.
    pub(crate) fn try_send(&self, lane: Lane, item: T) -> Result<(), TrySendError<T>> {
        match self.shared.room[lane as usize].try_acquire() {
            Ok(permit) => permit.forget(),
            Err(TryAcquireError::NoPermits) => return Err(TrySendError::Full(item)),
            Err(TryAcquireError::Closed) => return Err(TrySendError::Closed(item)),
        }
        self.push(lane, item).map_err(TrySendError::Closed)
    }

    /// Queues `item`, waiting (in order with other senders) for room in its
    /// lane; gives it back if the reader is gone.
    pub(crate) async fn send(&self, lane: Lane, item: T) -> Result<(), T> {
        match self.shared.room[lane as usize].acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(item),
        }
        self.push(lane, item)
    }

    /// Queues `item` under a slot already taken.
    fn push(&self, lane: Lane, item: T) -> Result<(), T> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(item);
        }
        state.lanes[lane as usize].push_back(item);
        drop(state);
        self.shared.reader.wake();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.reader.wake();
        }
    }
}

impl<T> Receiver<T> {
    /// The next frame, urgent ones first, if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        let (lane, item) = {
            let mut state = self.shared.lock();
            LANES
                .into_iter()
                .find_map(|lane| Some((lane, state.lanes[lane as usize].pop_front()?)))?
        };
        self.shared.room[lane as usize].add_permits(1);
        Some(item)
    }

    /// The next frame, urgent ones first; `None` once every sender is gone
    /// and the lanes are empty.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(item) = self.try_recv() {
            return Poll::Ready(Some(item));
        }
        self.shared.reader.register(cx.waker());
        // Senders counted before the lanes are looked at: a sender's frame
        // is queued before it goes, so 0 here means the lanes are final.
        let ended = self.shared.senders.load(Ordering::Acquire) == 0;
        if let Some(item) = self.try_recv() {
            return Poll::Ready(Some(item));
        }
        if ended {
            return Poll::Ready(None);
        }
        self.release();
        Poll::Pending
    }

    /// Gives back the lanes' memory while the reader waits.
    fn release(&self) {
        let mut state = self.shared.lock();
        for lane in &mut state.lanes {
            if lane.is_empty() && lane.capacity() > 0 {
                *lane = VecDeque::new();
            }
        }
    }

    /// Slots allocated in both lanes together.
    #[cfg(test)]
    fn allocated(&self) -> usize {
        let state = self.shared.lock();
        state.lanes.iter().map(VecDeque::capacity).sum()
    }
}

impl<T> Drop for Receiver<T> {
    /// Closes the lanes: waiting senders fail, and queued frames are
    /// dropped (outside the lock, since dropping one may queue another).
    fn drop(&mut self) {
        let lanes = {
            let mut state = self.shared.lock();
            state.closed = true;
            std::mem::take(&mut state.lanes)
        };
        for room in &self.shared.room {
            room.close();
        }
        drop(lanes);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn urgent_frames_come_first_and_each_lane_keeps_its_order() {
        let (tx, mut rx) = queues(8, 8);
        for (lane, n) in [
            (Lane::Bulk, 1),
            (Lane::Urgent, 2),
            (Lane::Bulk, 3),
            (Lane::Urgent, 4),
        ] {
            tx.try_send(lane, n).expect("room");
        }
        let mut got = Vec::new();
        while let Some(n) = rx.try_recv() {
            got.push(n);
        }
        assert_eq!(got, [2, 4, 1, 3]);
    }

    #[tokio::test]
    async fn a_full_lane_refuses_then_takes_a_waiting_sender_once_read() {
        let (tx, mut rx) = queues(1, 1);
        tx.try_send(Lane::Bulk, 1).expect("room");
        assert!(matches!(
            tx.try_send(Lane::Bulk, 2),
            Err(TrySendError::Full(2))
        ));
        // The other lane has room of its own.
        tx.try_send(Lane::Urgent, 9).expect("room");
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(Lane::Bulk, 3).await }
        });
        assert_eq!(rx.recv().await, Some(9));
        assert_eq!(rx.recv().await, Some(1));
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(sent, Ok(Ok(Ok(())))), "{sent:?}");
        assert_eq!(rx.recv().await, Some(3));
    }

    #[tokio::test]
    async fn the_reader_going_fails_senders_and_drops_what_was_queued() {
        let (tx, rx) = queues(1, 1);
        let (written, told) = tokio::sync::oneshot::channel::<()>();
        tx.try_send(Lane::Urgent, Some(written)).expect("room");
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(Lane::Urgent, None).await.is_err() }
        });
        tokio::task::yield_now().await;
        drop(rx);
        assert!(told.await.is_err(), "the queued frame was dropped");
        let failed = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(failed, Ok(Ok(true))), "{failed:?}");
        assert!(matches!(
            tx.try_send(Lane::Bulk, None),
            Err(TrySendError::Closed(None))
        ));
    }

    #[tokio::test]
    async fn the_reader_takes_what_is_left_after_the_last_sender_goes() {
        let (tx, mut rx) = queues(4, 4);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(n) = rx.recv().await {
                got.push(n);
            }
            got
        });
        let other = tx.clone();
        tx.try_send(Lane::Bulk, 1).expect("room");
        drop(tx);
        other.send(Lane::Urgent, 2).await.expect("room");
        drop(other);
        let got = tokio::time::timeout(Duration::from_secs(5), reader).await;
        let got = got.map(|r| r.ok());
        assert!(
            matches!(got.as_ref(), Ok(Some(v)) if v.len() == 2),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn an_empty_pair_of_lanes_holds_no_memory_while_the_reader_waits() {
        let (tx, mut rx) = queues(64, 8);
        for n in 0..40 {
            tx.try_send(Lane::Urgent, n).expect("room");
        }
        tx.try_send(Lane::Bulk, 40).expect("room");
        assert!(rx.allocated() >= 41);
        for _ in 0..41 {
            assert!(rx.recv().await.is_some());
        }
        // The reader now finds nothing and waits: that is when it lets go.
        let waits = poll_fn(|cx| Poll::Ready(rx.poll_recv(cx).is_pending())).await;
        assert!(waits, "nothing was queued");
        assert_eq!(rx.allocated(), 0);
        // And the lanes grow again on demand.
        tx.try_send(Lane::Urgent, 41).expect("room");
        assert_eq!(rx.recv().await, Some(41));
    }
}
