//! Idempotency keys: the response to a call that carried `Idempotency-Key`
//! is remembered per (service, key) for `idempotency_ttl` (the key scoped by
//! the caller's `Authorization`, see `keyed::scoped_key`), in at most
//! `idempotency_capacity` bytes, so that a caller's retry gets the same
//! response without the worker running the call again. A repeat that arrives
//! while the first call is still running waits for it.
//!
//! A key is bound to the request that first used it: its method, its path
//! with query, and the SHA-256 of its body ([`Fingerprint`]). A repeat with
//! another method or path is refused at once; one with another body is
//! refused once its body has been read (and hashed, never kept). Neither
//! reaches a worker.
//!
//! Only whole responses from a worker are stored (any status). A call whose
//! response cannot be stored (streamed, larger than a quarter of the store,
//! or sent before the request body had been read to its end) leaves a
//! tombstone for `idempotency_ttl`: a repeat is refused rather than run a
//! second time. Failures the bridge itself produced (timeout, worker lost, no
//! worker) leave nothing: the caller's retry then runs the call again, which
//! is what the key allows.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// A caller's promise that repeating the request is safe.
pub(super) static IDEMPOTENCY_KEY: http::HeaderName =
    http::HeaderName::from_static("idempotency-key");

/// The SHA-256 of a request body.
///
/// A cryptographic hash rather than a fast 64-bit one: a key may be known to
/// more than one client (an order number, say), and with a short or
/// non-cryptographic hash one of them could craft a body that collides with
/// another's and be handed that other request's stored response. SHA-256
/// costs a few milliseconds per MiB at most, and only calls that carry a key
/// pay it.
pub(crate) type BodyDigest = [u8; 32];

/// What an idempotency key is bound to: the first request that used it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fingerprint {
    pub(crate) method: Method,
    /// The path with its query, as the caller sent it.
    pub(crate) target: Box<str>,
    /// The body's hash; `None` when the call's body had not been read to its
    /// end when its response came (a tombstone's only).
    pub(crate) body: Option<BodyDigest>,
}

impl Fingerprint {
    /// Bytes this fingerprint is charged against the capacity.
    fn cost(&self) -> usize {
        self.target.len() + self.method.as_str().len() + 48
    }

    /// True when a request with this method and target may be a repeat.
    fn same_head(&self, method: &Method, target: &str) -> bool {
        self.method == *method && *self.target == *target
    }
}

/// Hashes a request body as it is read; [`BodyHasher::finish`] publishes
/// the digest to the [`BodySeal`] it was made with.
pub(crate) struct BodyHasher {
    sha: Sha256,
    out: Arc<OnceLock<BodyDigest>>,
}

/// Where a [`BodyHasher`] leaves its digest; empty until the body has been
/// read to its end.
#[derive(Default, Clone)]
pub(crate) struct BodySeal(Arc<OnceLock<BodyDigest>>);

impl BodySeal {
    /// A hasher that reports here.
    pub(crate) fn hasher(&self) -> BodyHasher {
        BodyHasher {
            sha: Sha256::new(),
            out: self.0.clone(),
        }
    }

    /// The body's digest, once it has been read whole.
    pub(crate) fn digest(&self) -> Option<BodyDigest> {
        self.0.get().copied()
    }
}

impl BodyHasher {
    pub(crate) fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
    }

    /// The body ended: its digest is final.
    pub(crate) fn finish(self) {
        let _ = self.out.set(self.sha.finalize().into());
    }
}

/// A stored response.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Stored {
    /// Bytes this response is charged against the capacity.
    fn cost(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + headers
    }
}

/// What is kept under a key once its first call has ended.
#[derive(Debug)]
pub(crate) struct Kept {
    /// The request the key is bound to.
    pub(crate) fingerprint: Fingerprint,
    /// The response to replay; `None` for a tombstone (a call that ran but
    /// whose response could not be stored).
    pub(crate) response: Option<Stored>,
}

enum Entry {
    /// The first call with this key is running; completion is signalled by
    /// the sender being dropped. Holds the method and target it was made
    /// with, so that a repeat with others is refused without waiting.
    Running {
        done: watch::Receiver<()>,
        method: Method,
        target: Box<str>,
    },
    Done {
        kept: Arc<Kept>,
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
    /// The key's first call has ended: check the body against the
    /// fingerprint, then replay the response or refuse a tombstone.
    Kept(Arc<Kept>),
    /// The key is bound to another method or path.
    Mismatch,
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
    method: Method,
    target: Box<str>,
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

    /// Looks the key up, claiming it if it is free, for a request with this
    /// method and target (path with query).
    pub(crate) fn begin(
        self: &Arc<Self>,
        service: &str,
        key: &str,
        method: &Method,
        target: &str,
    ) -> Begin {
        let now = Instant::now();
        let mut state = self.lock();
        state.expire(now);
        let key = (service.to_owned(), key.to_owned());
        match state.entries.get(&key) {
            Some(Entry::Done { kept, .. }) if kept.fingerprint.same_head(method, target) => {
                return Begin::Kept(kept.clone())
            }
            Some(Entry::Running {
                done,
                method: m,
                target: t,
            }) if m == method && **t == *target => return Begin::Wait(done.clone()),
            Some(_) => return Begin::Mismatch,
            None => {}
        }
        let (tx, rx) = watch::channel(());
        state.entries.insert(
            key.clone(),
            Entry::Running {
                done: rx,
                method: method.clone(),
                target: target.into(),
            },
        );
        Begin::Lead(Ticket {
            cache: self.clone(),
            key: Some(key),
            method: method.clone(),
            target: target.into(),
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
    /// The call ended with `response` (if it could be kept whole) for a
    /// body whose digest is `body` (if it was read to its end): stores it
    /// under the key and wakes the waiters. A response larger than a
    /// quarter of the capacity, or one that came before the body had been
    /// read whole (so the key's fingerprint is not known), is not stored:
    /// the key keeps a tombstone instead, so that one reply cannot flush
    /// everyone else's and no repeat runs the call again.
    pub(crate) fn complete(mut self, response: Option<Stored>, body: Option<BodyDigest>) {
        let Some(key) = self.key.take() else { return };
        let cache = self.cache.clone();
        let fingerprint = Fingerprint {
            method: self.method.clone(),
            target: std::mem::take(&mut self.target),
            body,
        };
        let overhead = fingerprint.cost() + key.0.len() + key.1.len() + 128;
        let response = response
            .filter(|_| body.is_some())
            .filter(|r| r.cost() + overhead <= cache.capacity / 4);
        let cost = overhead + response.as_ref().map_or(0, Stored::cost);
        let mut state = cache.lock();
        while state.bytes + cost > cache.capacity && !state.order.is_empty() {
            state.evict_oldest();
        }
        let expires = Instant::now() + cache.ttl;
        state.bytes += cost;
        state.order.push_back((key.clone(), expires));
        let kept = Arc::new(Kept {
            fingerprint,
            response,
        });
        state.entries.insert(
            key,
            Entry::Done {
                kept,
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
            if matches!(state.entries.get(&key), Some(Entry::Running { .. })) {
                state.entries.remove(&key);
            }
        }
        // `_done` drops after this: the waiters wake and find the outcome.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(body: &'static [u8]) -> Option<Stored> {
        Some(Stored {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body),
        })
    }

    fn digest(body: &[u8]) -> Option<BodyDigest> {
        let seal = BodySeal::default();
        let mut hasher = seal.hasher();
        hasher.update(body);
        hasher.finish();
        seal.digest()
    }

    fn begin(cache: &Arc<IdempotencyCache>, service: &str, key: &str) -> Begin {
        cache.begin(service, key, &Method::POST, "/pay?x=1")
    }

    fn lead(cache: &Arc<IdempotencyCache>, key: &str) -> Ticket {
        match begin(cache, "svc", key) {
            Begin::Lead(t) => t,
            _ => panic!("expected to lead for {key}"),
        }
    }

    fn kept(cache: &Arc<IdempotencyCache>, key: &str) -> Arc<Kept> {
        match begin(cache, "svc", key) {
            Begin::Kept(k) => k,
            _ => panic!("expected a kept entry for {key}"),
        }
    }

    #[tokio::test]
    async fn the_first_call_leads_repeats_wait_then_replay() {
        let cache = Arc::new(IdempotencyCache::new(Duration::from_secs(60), 1 << 20));
        let ticket = lead(&cache, "k");
        let Begin::Wait(mut rx) = begin(&cache, "svc", "k") else {
            panic!("a repeat while running waits");
        };
        ticket.complete(stored(b"done"), digest(b"order"));
        // The sender is gone: the waiter wakes.
        assert!(rx.changed().await.is_err());
        let k = kept(&cache, "k");
        let r = k.response.as_ref().expect("stored");
        assert_eq!((r.status, &r.body[..]), (StatusCode::CREATED, &b"done"[..]));
        assert_eq!(k.fingerprint.body, digest(b"order"));
        assert_ne!(k.fingerprint.body, digest(b"other"));
        // Keys are per service.
        assert!(matches!(begin(&cache, "other", "k"), Begin::Lead(_)));
    }

    #[tokio::test]
    async fn a_key_is_bound_to_its_method_and_target() {
        let cache = Arc::new(IdempotencyCache::new(Duration::from_secs(60), 1 << 20));
        let ticket = lead(&cache, "k");
        // Refused at once while the first call runs, and after it ended.
        assert!(matches!(
            cache.begin("svc", "k", &Method::PUT, "/pay?x=1"),
            Begin::Mismatch
        ));
        assert!(matches!(
            cache.begin("svc", "k", &Method::POST, "/pay?x=2"),
            Begin::Mismatch
        ));
        assert!(matches!(begin(&cache, "svc", "k"), Begin::Wait(_)));
        ticket.complete(stored(b"done"), digest(b""));
        assert!(matches!(
            cache.begin("svc", "k", &Method::PUT, "/pay?x=1"),
            Begin::Mismatch
        ));
        assert!(matches!(begin(&cache, "svc", "k"), Begin::Kept(_)));
    }

    #[tokio::test]
    async fn an_unstorable_response_leaves_a_tombstone() {
        let cache = Arc::new(IdempotencyCache::new(Duration::from_secs(60), 4096));
        // Streamed: no response to keep.
        lead(&cache, "streamed").complete(None, digest(b"x"));
        // Too large for the store.
        lead(&cache, "big").complete(stored(&[b'b'; 2000]), digest(b"x"));
        // Answered before the body was read to its end.
        lead(&cache, "early").complete(stored(b"ok"), None);
        for key in ["streamed", "big", "early"] {
            assert!(kept(&cache, key).response.is_none(), "{key}");
        }
    }

    #[tokio::test]
    async fn an_abandoned_call_frees_the_key() {
        let cache = Arc::new(IdempotencyCache::new(Duration::from_secs(60), 1 << 20));
        let ticket = lead(&cache, "k");
        let Begin::Wait(mut rx) = begin(&cache, "svc", "k") else {
            panic!("waits");
        };
        drop(ticket);
        assert!(rx.changed().await.is_err());
        assert!(matches!(begin(&cache, "svc", "k"), Begin::Lead(_)));
    }

    #[test]
    fn entries_expire_and_memory_stays_bounded() {
        let cache = Arc::new(IdempotencyCache::new(Duration::ZERO, 1 << 20));
        lead(&cache, "old").complete(stored(b"x"), digest(b""));
        // Expired at once: the key is free again.
        assert!(matches!(begin(&cache, "svc", "old"), Begin::Lead(_)));

        let cache = Arc::new(IdempotencyCache::new(Duration::from_secs(60), 4096));
        for i in 0..100 {
            lead(&cache, &format!("k{i}")).complete(stored(&[b'a'; 500]), digest(b""));
        }
        let (entries, bytes) = cache.usage();
        assert!(bytes <= 4096, "{bytes} bytes held");
        assert!(entries >= 4, "the newest are kept: {entries}");
        assert!(kept(&cache, "k99").response.is_some());
        assert!(matches!(begin(&cache, "svc", "k0"), Begin::Lead(_)));
    }
}
