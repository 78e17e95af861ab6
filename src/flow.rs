//! Per-call flow control: the credit window a sender spends before each body
//! chunk and the peer's `credit` frames refill (PROTOCOL.md 7.3).
//! The bridge uses it for request bodies it uploads, the worker for the
//! reply bodies it streams.

use tokio::sync::Semaphore;

/// Body bytes one call may still send before the peer credits more. It
/// never holds more than its size, whatever the peer credits.
#[derive(Debug)]
pub(crate) struct Window {
    /// One permit per byte.
    bytes: Semaphore,
    /// The most the window holds (the size the hello and welcome agreed).
    size: usize,
}

/// The window was closed (the connection is gone): no more bytes may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

impl Window {
    /// A full window of `size` bytes.
    pub(crate) fn new(size: usize) -> Window {
        Window {
            bytes: Semaphore::new(size),
            size,
        }
    }

    /// The peer consumed `bytes` more: they may be sent again, up to the
    /// window's size.
    pub(crate) fn credit(&self, bytes: u64) {
        // Never more than a window at once: a confused or hostile peer
        // cannot make this side send (or queue) unbounded amounts.
        let room = self.size.saturating_sub(self.bytes.available_permits());
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        self.bytes.add_permits(bytes.min(room));
    }

    /// Takes `n` bytes of window, waiting for the peer's credit. `Err` once
    /// the window is closed, even for `n == 0`. `n` is at most the window's
    /// size (a chunk; the config keeps windows at least a chunk): more
    /// could never be granted.
    pub(crate) async fn take(&self, n: usize) -> Result<(), Closed> {
        debug_assert!(
            n <= self.size,
            "a take of {n} bytes from a window of {}",
            self.size
        );
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let permits = self.bytes.acquire_many(n).await.map_err(|_| Closed)?;
        permits.forget();
        Ok(())
    }

    /// Closes the window: every `take`, waiting or to come, fails.
    pub(crate) fn close(&self) {
        self.bytes.close();
    }

    /// Whether [`Window::close`] was called.
    #[cfg(test)]
    pub(crate) fn is_closed(&self) -> bool {
        self.bytes.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn credit_refills_the_window_but_never_past_its_size() {
        let window = Window::new(100);
        assert_eq!(window.take(60).await, Ok(()));
        assert_eq!(window.bytes.available_permits(), 40);
        // More than the window: blocked until credited.
        assert!(window.take(50).now_or_never().is_none());
        window.credit(10);
        assert_eq!(window.take(50).await, Ok(()));
        assert_eq!(window.bytes.available_permits(), 0);
        // A peer crediting far more than it was sent gets one window.
        window.credit(1_000);
        assert_eq!(window.bytes.available_permits(), 100);
        window.credit(u64::MAX);
        assert_eq!(window.bytes.available_permits(), 100);
        assert_eq!(window.take(100).await, Ok(()));
        assert!(
            window.take(1).now_or_never().is_none(),
            "the window is spent"
        );
    }

    #[tokio::test]
    async fn closing_fails_waiting_and_later_takes() {
        let window = Window::new(10);
        assert_eq!(window.take(10).await, Ok(()));
        // A take that is already waiting when the window closes.
        let mut waiting = std::pin::pin!(window.take(5));
        assert!((&mut waiting).now_or_never().is_none(), "no credit yet");
        window.close();
        assert_eq!(waiting.await, Err(Closed));
        assert_eq!(window.take(0).await, Err(Closed));
        // Credit after closing changes nothing.
        window.credit(10);
        assert_eq!(window.take(1).await, Err(Closed));
    }
}
