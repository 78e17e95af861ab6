//! Idempotency keys: the response to a call that carried `Idempotency-Key`
//! is remembered per (service, key) for `idempotency_ttl`, in at most
//! `idempotency_capacity` bytes, so that a caller's retry gets the same
//! response without the worker running the call again. A repeat that arrives
//! while the first call is still running waits for it.
//!
//! Only whole responses from a worker are stored (any status). Failures the
//! bridge itself produced (timeout, worker lost, no worker) are not: the
//! caller's retry then runs the call again, which is what the key allows.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::sync::watch;

/// A stored response.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Stored {
    /// Bytes this entry is charged against the capacity.
    fn cost(&self, key: &(String, String)) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + headers + key.0.len() + key.1.len() + 128
    }
}

enum Entry {
    /// The first call with this key is running; completion is signalled by
    /// the sender being dropped.
    Running(watch::Receiver<()>),
    Done {
        response: Arc<Stored>,
        expires: Instant,
        cost: usize,
    },
}

#[derive(Default)]
struct State {
    entries: HashMap<(String, String), Entry>,
    /// Completed entries in the order they were stored, for expiry and
    /// eviction (the oldest goes first).
    order: VecDeque<((String, String), Instant)>,
    bytes: usize,
}

/// The per-bridge store of responses by idempotency key.
pub(crate) struct IdempotencyCache {
    state: Mutex<State>,
    ttl: Duration,
    capacity: usize,
}

/// What a call with a key should do.
pub(crate) enum Begin {
    /// A stored response: send it.
    Replay(Arc<Stored>),
    /// The first call with this key is running: wait, then ask again.
    Wait(watch::Receiver<()>),
    /// Run the call; report through the ticket.
    Lead(Ticket),
}

/// The right (and duty) to run the call for a key. Dropped without
/// [`Ticket::complete`], it frees the key and wakes the waiters, who then
/// run the call themselves.
pub(crate) struct Ticket {
    cache: Arc<IdempotencyCache>,
    key: Option<(String, String)>,
    _done: watch::Sender<()>,
}

impl IdempotencyCache {
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        IdempotencyCache {
            state: Mutex::default(),
            ttl,
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks the key up, claiming it if it is free.
    pub(crate) fn begin(self: &Arc<Self>, service: &str, key: &str) -> Begin {
        let now = Instant::now();
        let mut state = self.lock();
        state.expire(now);
        let key = (service.to_owned(), key.to_owned());
        match state.entries.get(&key) {
            Some(Entry::Done { response, .. }) => return Begin::Replay(response.clone()),
            Some(Entry::Running(rx)) => return Begin::Wait(rx.clone()),
            None => {}
        }
        let (tx, rx) = watch::channel(());
        state.entries.insert(key.clone(), Entry::Running(rx));
        Begin::Lead(Ticket {
            cache: self.clone(),
            key: Some(key),
            _done: tx,
        })
    }

    /// Entries and bytes held, for tests and status.
    #[cfg(test)]
    fn usage(&self) -> (usize, usize) {
        let state = self.lock();
        (state.entries.len(), state.bytes)
    }
}

impl State {
    /// Drops completed entries whose time is up.
    fn expire(&mut self, now: Instant) {
        while let Some((_, expires)) = self.order.front() {
            if *expires > now {
                break;
            }
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        let Some((key, expires)) = self.order.pop_front() else {
            return;
        };
        // The entry may have been replaced since (stored again after
        // expiring); only remove the one this record is about.
        if let Some(Entry::Done {
            expires: e, cost, ..
        }) = self.entries.get(&key)
        {
            if *e == expires {
                self.bytes -= cost;
                self.entries.remove(&key);
            }
        }
    }
}

impl Ticket {
    /// Stores the response for the key and wakes the waiters. A response
    /// larger than a quarter of the capacity is not stored (the key is
    /// freed instead), so that one reply cannot flush everyone else's.
    pub(crate) fn complete(mut self, response: Stored) {
        let Some(key) = self.key.take() else { return };
        let cache = self.cache.clone();
        let mut state = cache.lock();
        let cost = response.cost(&key);
        if cost > cache.capacity / 4 {
            state.entries.remove(&key);
            return;
        }
        while state.bytes + cost > cache.capacity && !state.order.is_empty() {
            state.evict_oldest();
        }
        let expires = Instant::now() + cache.ttl;
        state.bytes += cost;
        state.order.push_back((key.clone(), expires));
        state.entries.insert(
            key,
            Entry::Done {
                response: Arc::new(response),
                expires,
                cost,
            },
        );
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut state = self.cache.lock();
            if matches!(state.entries.get(&key), Some(Entry::Running(_))) {
                state.entries.remove(&key);
            }
        }
        // `_done` drops after this: the waiters wake and find the outcome.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(body: &'static [u8]) -> Stored {
        Stored {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body),
        }
    }

    fn lead(cache: &Arc<IdempotencyCache>, key: &str) -> Ticket {
        match cache.begin("svc", key) {
            Begin::Lead(t) => t,
            _ => panic!("expected to lead for {key}"),
        }
    }

    #[tokio::test]
    async fn the_first_call_leads_repeats_wait_then_replay() {
        let cache = Arc::new(IdempotencyCache::new(Duration::from_secs(60), 1 << 20));
        let ticket = lead(&cache, "k");
        let Begin::Wait(mut rx) = cache.begin("svc", "k") else {
            panic!("a repeat while running waits");
        };
        ticket.complete(stored(b"done"));
        // The sender is gone: the waiter wakes.
        assert!(rx.changed().await.is_err());
        match cache.begin("svc", "k") {
            Begin::Replay(r) => {
                assert_eq!((r.status, &r.body[..]), (StatusCode::CREATED, &b"done"[..]))
            }
            _ => panic!("expected a replay"),
        }
        // Keys are per service.
        assert!(matches!(cache.begin("other", "k"), Begin::Lead(_)));
    }

    #[tokio::test]
    async fn an_abandoned_call_frees_the_key() {
        let cache = Arc::new(IdempotencyCache::new(Duration::from_secs(60), 1 << 20));
        let ticket = lead(&cache, "k");
        let Begin::Wait(mut rx) = cache.begin("svc", "k") else {
            panic!("waits");
        };
        drop(ticket);
        assert!(rx.changed().await.is_err());
        assert!(matches!(cache.begin("svc", "k"), Begin::Lead(_)));
    }

    #[test]
    fn entries_expire_and_memory_stays_bounded() {
        let cache = Arc::new(IdempotencyCache::new(Duration::ZERO, 1 << 20));
        lead(&cache, "old").complete(stored(b"x"));
        // Expired at once: the key is free again.
        assert!(matches!(cache.begin("svc", "old"), Begin::Lead(_)));

        let cache = Arc::new(IdempotencyCache::new(Duration::from_secs(60), 4096));
        for i in 0..100 {
            lead(&cache, &format!("k{i}")).complete(stored(&[b'a'; 500]));
        }
        let (entries, bytes) = cache.usage();
        assert!(bytes <= 4096, "{bytes} bytes held");
        assert!(entries >= 4, "the newest are kept: {entries}");
        assert!(matches!(cache.begin("svc", "k99"), Begin::Replay(_)));
        assert!(matches!(cache.begin("svc", "k0"), Begin::Lead(_)));
        // Too large to store: not kept.
        lead(&cache, "big").complete(stored(&[b'b'; 2000]));
        assert!(matches!(cache.begin("svc", "big"), Begin::Lead(_)));
    }
}
