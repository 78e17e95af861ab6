//! A stall watch for the streamed replies of HTTP/2 callers. hyper polls a
//! reply's body only while the caller's flow-control window has room, so a
//! caller that stops reading one stream, while the rest of its connection
//! flows, never blocks the socket: `send_timeout` (which watches socket
//! writes) never fires and the call, with its worker slot, would be held for
//! as long as the caller keeps the connection. The watch notices a body that
//! hyper stopped polling although it was not waiting for the worker, and
//! after `limit` without progress runs `on_stall` (which ends the call).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio_util::task::AbortOnDropHandle;

/// Owned by the reply body; its task ends with it.
pub(crate) struct StallWatch {
    progress: Arc<Progress>,
    _task: AbortOnDropHandle<()>,
}

#[derive(Default)]
struct Progress {
    /// Polls of the body so far.
    polls: AtomicU64,
    /// The last poll is waiting for the worker (which the body's own idle
    /// timer bounds), not for the caller.
    on_worker: AtomicBool,
}

impl StallWatch {
    /// Starts watching: a body not polled for between `limit` and twice
    /// `limit` while not waiting for the worker runs `on_stall`, once.
    pub(crate) fn spawn(limit: Duration, on_stall: impl FnOnce() + Send + 'static) -> StallWatch {
        let progress = Arc::new(Progress::default());
        let watched = Arc::downgrade(&progress);
        let task = tokio::spawn(async move {
            let mut seen = None;
            loop {
                tokio::time::sleep(limit).await;
                let Some(progress) = watched.upgrade() else {
                    return;
                };
                let polls = progress.polls.load(Ordering::Relaxed);
                if seen == Some(polls) && !progress.on_worker.load(Ordering::Relaxed) {
                    break;
                }
                seen = Some(polls);
            }
            on_stall();
        });
        StallWatch {
            progress,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// Records a poll of the body; `on_worker`: it returned pending, waiting
    /// for the worker's next frame.
    pub(crate) fn polled(&self, on_worker: bool) {
        self.progress.polls.fetch_add(1, Ordering::Relaxed);
        self.progress.on_worker.store(on_worker, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_body_left_unpolled_is_reported_and_one_kept_busy_is_not() {
        let limit = Duration::from_secs(1);
        // Polled often, or waiting for the worker: never reported.
        let (busy_tx, mut busy_rx) = oneshot::channel::<()>();
        let busy = StallWatch::spawn(limit, move || {
            let _ = busy_tx.send(());
        });
        let (waiting_tx, mut waiting_rx) = oneshot::channel::<()>();
        let waiting = StallWatch::spawn(limit, move || {
            let _ = waiting_tx.send(());
        });
        waiting.polled(true);
        // Never polled again after handing data over: reported.
        let (idle_tx, idle_rx) = oneshot::channel::<()>();
        let idle = StallWatch::spawn(limit, move || {
            let _ = idle_tx.send(());
        });
        idle.polled(false);
        for _ in 0..10 {
            busy.polled(false);
            tokio::time::sleep(limit / 2).await;
        }
        assert!(idle_rx.await.is_ok(), "the stalled body is reported");
        assert!(busy_rx.try_recv().is_err(), "a body polled often is not");
        assert!(
            waiting_rx.try_recv().is_err(),
            "nor one waiting for the worker"
        );
        drop((busy, waiting, idle));
    }
}
