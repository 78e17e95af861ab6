//! How long a worker waits before it dials the bridge again (PROTOCOL.md
//! 8.4): at once after a working connection dropped, so that a blip costs
//! one round of dialling; with capped, jittered exponential backoff while
//! the bridge cannot be reached or after it closed the connection (a
//! restarting bridge must not get all its workers back in the same
//! instant); and never longer than a fraction of
//! the resume window while the bridge keeps this worker's calls, so that a
//! flapping link does not outwait the window and lose them.

use std::time::Duration;

/// A connection that lasted this long resets the backoff to its start.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// A connection that ended sooner than this after its welcome is not
/// redialled at once: a bridge that accepts and drops at once (a refusal
/// in disguise, a flapping proxy) would otherwise be dialled in a loop.
const UP_FOR_IMMEDIATE: Duration = Duration::from_secs(1);

/// While a session is held, at least this many attempts fit in its window.
const TRIES_PER_WINDOW: u32 = 4;

/// The reconnect schedule of one worker.
#[derive(Debug)]
pub(super) struct Backoff {
    initial: Duration,
    max: Duration,
    /// The delay the next backed-off wait is drawn from.
    delay: Duration,
}

impl Backoff {
    pub(super) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            delay: initial,
        }
    }

    /// The wait before the next attempt. `up`: how long the connection that
    /// just ended was established (from its welcome), `None` if the attempt
    /// failed before one. `dropped`: it ended without a close frame from the
    /// bridge. `resume_window`: the bridge holds this worker's session (and
    /// its calls) for that long after the drop.
    pub(super) fn next(
        &mut self,
        up: Option<Duration>,
        dropped: bool,
        resume_window: Option<Duration>,
    ) -> Duration {
        if up.is_some_and(|u| u >= STABLE_AFTER) {
            self.delay = self.initial;
        }
        let wait = if dropped && up.is_some_and(|u| u >= UP_FOR_IMMEDIATE) {
            // The first attempt after losing a working connection goes at
            // once: most drops are blips, and the session may be waiting.
            Duration::ZERO
        } else {
            // Full jitter: spread reconnects of many workers over the
            // window so a restarted bridge is not hit by all of them at once.
            let wait = self.delay.mul_f64(0.5 + fastrand::f64() * 0.5);
            self.delay = self.delay.saturating_mul(2).min(self.max);
            wait
        };
        match resume_window {
            // Jittered within the cap too: workers that lost the same link
            // must not all come back in the same instant.
            Some(window) if wait > window / TRIES_PER_WINDOW => {
                (window / TRIES_PER_WINDOW).mul_f64(0.5 + fastrand::f64() * 0.5)
            }
            _ => wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_working_connection_lost_is_redialled_at_once_then_backed_off() {
        let mut b = Backoff::new(S, 30 * S);
        assert_eq!(b.next(Some(5 * S), true, None), Duration::ZERO);
        let first = b.next(None, true, None);
        assert!((S / 2..=S).contains(&first), "{first:?}");
        let second = b.next(None, true, None);
        assert!((S..=2 * S).contains(&second), "{second:?}");
        // A connection that ends as soon as it is up earns no shortcut.
        let third = b.next(Some(Duration::from_millis(10)), true, None);
        assert!((2 * S..=4 * S).contains(&third), "{third:?}");
        // Nor does one the bridge closed (it may be restarting).
        let fourth = b.next(Some(5 * S), false, None);
        assert!((4 * S..=8 * S).contains(&fourth), "{fourth:?}");
    }

    #[test]
    fn backoff_grows_to_its_cap_and_a_stable_connection_resets_it() {
        let mut b = Backoff::new(S, 8 * S);
        for _ in 0..10 {
            b.next(None, true, None);
        }
        assert!(b.next(None, true, None) <= 8 * S);
        assert_eq!(b.next(Some(STABLE_AFTER), true, None), Duration::ZERO);
        assert!(b.next(None, true, None) <= S);
    }

    #[test]
    fn while_calls_are_held_no_wait_outlasts_a_quarter_of_the_window() {
        let mut b = Backoff::new(10 * S, 60 * S);
        let window = Some(2 * S);
        let mut waits = Vec::new();
        for _ in 0..10 {
            let wait = b.next(None, true, window);
            assert!((S / 4..=S / 2).contains(&wait), "{wait:?}");
            waits.push(wait);
        }
        // Still jittered under the cap, so that workers do not redial in step.
        waits.dedup();
        assert!(waits.len() > 1, "{waits:?}");
        // Once the session is gone, the backoff it had reached applies.
        assert!(b.next(None, true, None) >= 30 * S);
    }
}
