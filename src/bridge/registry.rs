//! Which workers serve which service, how busy each is, and the bounded FIFO
//! of calls waiting for capacity.
//!
//! A call holds a [`Lease`] on one worker while it is in flight; dropping the
//! lease gives the capacity back and hands it straight to the oldest waiting
//! call, so waiting is event-driven and never polls. All state sits behind
//! one `std::sync::Mutex`: critical sections are a few map operations and
//! never await, which is cheaper than an async mutex and cannot deadlock
//! across an `.await`.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{atomic::Ordering, Arc, Mutex, MutexGuard},
    time::Duration,
};

use foldhash::fast::RandomState;
use tokio::sync::{oneshot, Notify};

use super::session::Session;

/// Why no lease could be had.
#[derive(Debug, PartialEq)]
pub(crate) enum AcquireError {
    /// The service's wait queue is at `queue_limit`.
    QueueFull,
    /// Nothing became free within the wait; `connected` workers serve it.
    NoWorker {
        /// Workers of the service connected at the time of giving up.
        connected: usize,
    },
    /// No worker by the id asked for serves the service here.
    UnknownWorker,
}

/// The registry of connected workers.
#[derive(Default)]
pub(crate) struct Registry {
    state: Mutex<State>,
    /// Notified when a worker comes, goes, or stops or resumes taking
    /// calls: the cluster announces the change (`cluster::Announce`).
    pub(crate) changed: Arc<Notify>,
}

#[derive(Default)]
struct State {
    /// Connected workers by registry key.
    workers: HashMap<u64, Slot, RandomState>,
    /// The keys of the workers with each (non-empty) id: a call for one
    /// worker, a fan-out's thousands of them, and a newcomer claiming an
    /// id find it without a scan of the service.
    ids: HashMap<String, Vec<u64>, RandomState>,
    /// Calls for a worker id that is not connected, which asked to wait
    /// for it (`Wsbridge-Worker-Wait`): `(service, waiter)` by id, handed
    /// to the first worker with that id and service that registers.
    absent: HashMap<String, Vec<(String, oneshot::Sender<Lease>)>, RandomState>,
    /// Per service: its workers and the calls waiting for one.
    services: HashMap<String, Service, RandomState>,
    /// Next registry key; keys are never reused, so a stale lease cannot
    /// touch a newer worker's counters.
    next_key: u64,
    /// Rotates which of a worker's services gets freed capacity first, so a
    /// backlog on one service cannot starve another served by the same worker.
    rotor: usize,
}

struct Slot {
    session: Arc<Session>,
    /// Shared, so releasing a slot does not copy the list under the lock.
    services: Arc<[String]>,
    inflight: u32,
    max_inflight: u32,
    /// A draining worker keeps its calls but gets no new ones.
    draining: bool,
    /// Out of dispatch while its connection may resume.
    suspended: bool,
    /// Calls for this worker alone (`Wsbridge-Worker`), oldest first: they
    /// get its freed capacity before the service's queue does.
    waiters: VecDeque<oneshot::Sender<Lease>>,
}

#[derive(Default)]
struct Service {
    workers: Vec<u64>,
    waiters: VecDeque<oneshot::Sender<Lease>>,
    /// Rotates the starting point of the least-loaded scan so that equally
    /// idle workers share the load instead of the first one taking it all.
    cursor: usize,
}

/// The registry at one moment.
pub(crate) struct Snapshot {
    pub(crate) workers: Vec<WorkerView>,
    pub(crate) services: Vec<ServiceView>,
}

/// One worker connection in a [`Snapshot`].
pub(crate) struct WorkerView {
    pub(crate) session: Arc<Session>,
    pub(crate) services: Arc<[String]>,
    pub(crate) inflight: u32,
    pub(crate) max_inflight: u32,
    pub(crate) draining: bool,
    /// Its connection dropped; it may still resume.
    pub(crate) detached: bool,
}

/// One service in a [`Snapshot`].
pub(crate) struct ServiceView {
    pub(crate) name: String,
    /// Connected workers, draining ones included.
    pub(crate) workers: usize,
    /// Workers taking new calls.
    pub(crate) accepting: usize,
    /// Calls waiting for a worker.
    pub(crate) queued: usize,
}

/// The right to send one call to one worker. Dropping it frees the slot.
pub(crate) struct Lease {
    registry: Arc<Registry>,
    key: u64,
    session: Arc<Session>,
    /// Cleared when the lease was never handed out, so that its drop does
    /// not release capacity that the registry already took back.
    armed: bool,
}

impl Lease {
    /// The worker connection this lease is for.
    pub(crate) fn session(&self) -> &Arc<Session> {
        &self.session
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed {
            self.registry.release(self.key);
        }
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves counters that are still
        // consistent enough to keep serving; refusing all calls would not be.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a worker and lets it take waiting calls at once.
    pub(crate) fn register(
        self: &Arc<Self>,
        session: Arc<Session>,
        services: &[String],
        max_inflight: u32,
    ) -> u64 {
        let mut state = self.lock();
        let key = state.next_key;
        state.next_key += 1;
        let mut unique = services.to_vec();
        unique.sort();
        unique.dedup();
        let unique: Arc<[String]> = unique.into();
        for name in unique.iter() {
            state
                .services
                .entry(name.clone())
                .or_default()
                .workers
                .push(key);
        }
        state.workers.insert(
            key,
            Slot {
                session,
                services: unique.clone(),
                inflight: 0,
                max_inflight,
                draining: false,
                suspended: false,
                waiters: VecDeque::new(),
            },
        );
        let id = &state.workers[&key].session.worker_id;
        if !id.is_empty() {
            let id = id.clone();
            state.welcome_awaited(&id, key);
            state.ids.entry(id).or_default().push(key);
        }
        // Calls that waited for this worker's id come first.
        state.pump_worker(self, key);
        state.pump_all(self, &unique);
        self.changed.notify_one();
        key
    }

    /// Takes a worker out of dispatch but keeps its slot (and the count of
    /// its calls in flight) while it may resume.
    pub(crate) fn suspend(&self, key: u64) {
        let mut state = self.lock();
        let Some(slot) = state.workers.get_mut(&key) else {
            return;
        };
        slot.suspended = true;
        let services = slot.services.clone();
        for name in services.iter() {
            if let Some(service) = state.services.get_mut(name) {
                service.workers.retain(|k| *k != key);
            }
        }
        self.changed.notify_one();
    }

    /// Puts a suspended worker back into dispatch; false if it is gone.
    pub(crate) fn reinstate(self: &Arc<Self>, key: u64) -> bool {
        let mut state = self.lock();
        let Some(slot) = state.workers.get_mut(&key) else {
            return false;
        };
        slot.suspended = false;
        let services = slot.services.clone();
        for name in services.iter() {
            let workers = &mut state.services.entry(name.clone()).or_default().workers;
            if !workers.contains(&key) {
                workers.push(key);
            }
        }
        state.pump_all(self, &services);
        self.changed.notify_one();
        true
    }

    /// Removes a worker; its outstanding leases become no-ops.
    pub(crate) fn unregister(&self, key: u64) {
        let mut state = self.lock();
        let Some(slot) = state.workers.remove(&key) else {
            return;
        };
        let id = &slot.session.worker_id;
        if let Some(keys) = state.ids.get_mut(id) {
            keys.retain(|k| *k != key);
            if keys.is_empty() {
                state.ids.remove(id);
            }
        }
        for name in slot.services.iter() {
            if let Some(service) = state.services.get_mut(name) {
                service.workers.retain(|k| *k != key);
                if service.workers.is_empty() && service.waiters.is_empty() {
                    state.services.remove(name);
                }
            }
        }
        self.changed.notify_one();
    }

    /// Stops giving a worker new calls; once its last call has ended, its
    /// connection is closed (`Session::drained`).
    pub(crate) fn drain(&self, key: u64) {
        if let Some(slot) = self.lock().workers.get_mut(&key) {
            slot.draining = true;
            slot.close_if_drained();
        }
        self.changed.notify_one();
    }

    /// Connected workers of a service (draining ones included).
    pub(crate) fn connected(&self, service: &str) -> usize {
        self.lock()
            .services
            .get(service)
            .map_or(0, |s| s.workers.len())
    }

    /// Connected workers of a service that take new calls (not draining).
    pub(crate) fn accepting(&self, service: &str) -> usize {
        let state = self.lock();
        state.services.get(service).map_or(0, |s| {
            s.workers
                .iter()
                .filter(|k| state.workers.get(k).is_some_and(|w| !w.draining))
                .count()
        })
    }

    /// Whether a worker of `service` has room for a call now.
    pub(crate) fn has_room(&self, service: &str) -> bool {
        let state = self.lock();
        state.services.get(service).is_some_and(|s| {
            s.workers.iter().any(|k| {
                state.workers.get(k).is_some_and(|w| {
                    !w.draining && w.inflight < w.max_inflight && !w.session.is_closed()
                })
            })
        })
    }

    /// Every connected worker's session.
    pub(crate) fn sessions(&self) -> Vec<Arc<Session>> {
        self.lock()
            .workers
            .values()
            .map(|s| s.session.clone())
            .collect()
    }

    /// The workers taking calls (not draining, not waiting to resume), of
    /// `service` or of every service: what presence lists and a fan-out
    /// reaches. Only the service's own workers are looked at.
    pub(crate) fn open_workers(&self, service: Option<&str>) -> Vec<WorkerView> {
        let state = self.lock();
        let view = |slot: &Slot| WorkerView {
            session: slot.session.clone(),
            services: slot.services.clone(),
            inflight: slot.inflight,
            max_inflight: slot.max_inflight,
            draining: slot.draining,
            detached: slot.suspended,
        };
        let open = |slot: &&Slot| !slot.draining && !slot.suspended;
        match service {
            Some(name) => state
                .services
                .get(name)
                .map(|svc| {
                    svc.workers
                        .iter()
                        .filter_map(|k| state.workers.get(k))
                        .filter(open)
                        .map(view)
                        .collect()
                })
                .unwrap_or_default(),
            None => state.workers.values().filter(open).map(view).collect(),
        }
    }

    /// Every worker and every service as they are now, for `/status`.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        // A suspended slot is in no service's list.
        let dispatched: HashSet<u64> = state
            .services
            .values()
            .flat_map(|s| s.workers.iter().copied())
            .collect();
        let workers: Vec<WorkerView> = state
            .workers
            .iter()
            .map(|(key, slot)| WorkerView {
                session: slot.session.clone(),
                services: slot.services.clone(),
                inflight: slot.inflight,
                max_inflight: slot.max_inflight,
                draining: slot.draining,
                detached: !dispatched.contains(key),
            })
            .collect();
        let services = state
            .services
            .iter()
            .map(|(name, s)| ServiceView {
                name: name.clone(),
                workers: s.workers.len(),
                accepting: s
                    .workers
                    .iter()
                    .filter(|k| state.workers.get(k).is_some_and(|w| !w.draining))
                    .count(),
                queued: s.waiters.iter().filter(|w| !w.is_closed()).count(),
            })
            .collect();
        drop(state);
        let mut workers = workers;
        workers.sort_by_key(|w| w.session.stats.since);
        Snapshot { workers, services }
    }

    /// Calls of a service waiting for a worker.
    pub(crate) fn queued(&self, service: &str) -> usize {
        let state = self.lock();
        // Calls for a worker that has not connected yet.
        let absent = state
            .absent
            .values()
            .flatten()
            .filter(|(s, w)| s == service && !w.is_closed())
            .count();
        let Some(svc) = state.services.get(service) else {
            return absent;
        };
        let live = |w: &&oneshot::Sender<Lease>| !w.is_closed();
        // Calls for one worker of the service wait at that worker.
        let for_one: usize = svc
            .workers
            .iter()
            .filter_map(|k| state.workers.get(k))
            .map(|slot| slot.waiters.iter().filter(live).count())
            .sum();
        svc.waiters.iter().filter(live).count() + for_one + absent
    }

    /// Takes capacity on the least-busy worker of `service`, waiting up to
    /// `wait` in FIFO order behind at most `queue_limit - 1` other calls.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        service: &str,
        wait: Duration,
        queue_limit: usize,
    ) -> Result<Lease, AcquireError> {
        let rx = {
            let mut state = self.lock();
            if let Some(lease) = state.try_lease(self, service) {
                return Ok(lease);
            }
            let queue = &mut state
                .services
                .entry(service.to_owned())
                .or_default()
                .waiters;
            if queue.len() >= queue_limit {
                // Waiters that gave up are only pruned lazily; do it before
                // refusing a call for lack of room.
                queue.retain(|w| !w.is_closed());
                if queue.len() >= queue_limit {
                    return Err(AcquireError::QueueFull);
                }
            }
            let (tx, rx) = oneshot::channel();
            queue.push_back(tx);
            rx
        };
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(lease)) => Ok(lease),
            _ => Err(AcquireError::NoWorker {
                connected: self.connected(service),
            }),
        }
    }

    /// Takes capacity on the worker of `service` whose hello named it
    /// `id`, waiting up to `wait` behind at most `queue_limit - 1` other
    /// calls for it. Several connections claiming one id: the least busy.
    pub(crate) async fn acquire_worker(
        self: &Arc<Self>,
        service: &str,
        id: &str,
        wait: Duration,
        queue_limit: usize,
        await_absent: bool,
    ) -> Result<Lease, AcquireError> {
        let (rx, absent) = 'waiting: {
            let mut state = self.lock();
            let key = match state.find(service, id) {
                Found::Worker(key) => key,
                Found::Draining => return Err(AcquireError::NoWorker { connected: 1 }),
                Found::None if await_absent => {
                    break 'waiting (state.await_absent(service, id, queue_limit)?, true);
                }
                Found::None => return Err(AcquireError::UnknownWorker),
            };
            if let Some(lease) = state.lease_key(self, key) {
                return Ok(lease);
            }
            let Some(slot) = state.workers.get_mut(&key) else {
                return Err(AcquireError::UnknownWorker);
            };
            if slot.waiters.len() >= queue_limit {
                slot.waiters.retain(|w| !w.is_closed());
                if slot.waiters.len() >= queue_limit {
                    return Err(AcquireError::QueueFull);
                }
            }
            let (tx, rx) = oneshot::channel();
            slot.waiters.push_back(tx);
            (rx, false)
        };
        if absent {
            return self.absent_wait(service, id, wait, rx).await;
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(lease)) => Ok(lease),
            // Timed out, or the worker went away (its waiters with it).
            _ => Err(AcquireError::NoWorker {
                connected: usize::from(self.lock().find(service, id) != Found::None),
            }),
        }
    }

    /// Waits up to `wait` for a worker `id` of `service` to connect and
    /// hand this call a lease; else the call is for nobody.
    async fn absent_wait(
        self: &Arc<Self>,
        service: &str,
        id: &str,
        wait: Duration,
        rx: oneshot::Receiver<Lease>,
    ) -> Result<Lease, AcquireError> {
        if let Ok(Ok(lease)) = tokio::time::timeout(wait, rx).await {
            return Ok(lease);
        }
        let mut state = self.lock();
        if let Some(waiting) = state.absent.get_mut(id) {
            waiting.retain(|(_, w)| !w.is_closed());
            if waiting.is_empty() {
                state.absent.remove(id);
            }
        }
        Err(match state.find(service, id) {
            Found::None => AcquireError::UnknownWorker,
            _ => AcquireError::NoWorker { connected: 1 },
        })
    }

    /// A newer connection (`key`) claims worker id `id` for `services`: the
    /// older connections with that id that share one of them are drained
    /// (marked [`Session::replaced`]), and the calls waiting for that id
    /// move to the newcomer. Returns how many were replaced.
    pub(crate) fn displace(self: &Arc<Self>, key: u64, id: &str, services: &[String]) -> usize {
        let mut state = self.lock();
        let olds: Vec<u64> = state
            .with_id(id)
            .filter(|(k, slot)| *k != key && slot.serves_any(services))
            .map(|(k, _)| k)
            .collect();
        let mut moved = VecDeque::new();
        for old in &olds {
            if let Some(slot) = state.workers.get_mut(old) {
                slot.session.replaced.store(true, Ordering::Relaxed);
                slot.draining = true;
                moved.append(&mut slot.waiters);
                slot.close_if_drained();
            }
        }
        if let Some(slot) = state.workers.get_mut(&key) {
            slot.waiters.append(&mut moved);
        }
        state.pump_worker(self, key);
        drop(state);
        if !olds.is_empty() {
            self.changed.notify_one();
        }
        olds.len()
    }

    /// Whether a connection of a worker with this id serves one of
    /// `services` here (for `workers.duplicate_ids = "refuse"`).
    pub(crate) fn claimed(&self, id: &str, services: &[String]) -> bool {
        let state = self.lock();
        let mut same = state.with_id(id);
        same.any(|(_, s)| s.serves_any(services) && !s.draining && !s.session.is_closed())
    }

    /// Whether a worker of `service` answers to `id` here (draining or not).
    pub(crate) fn hosts(&self, service: &str, id: &str) -> bool {
        self.lock().find(service, id) != Found::None
    }

    fn release(self: &Arc<Self>, key: u64) {
        let mut state = self.lock();
        let services = match state.workers.get_mut(&key) {
            Some(slot) => {
                slot.inflight = slot.inflight.saturating_sub(1);
                slot.close_if_drained();
                slot.services.clone()
            }
            None => return,
        };
        // Calls for this worker alone come first: no other can take them.
        state.pump_worker(self, key);
        state.pump_all(self, &services);
    }

    /// Calls in flight on a worker; for tests and status.
    #[cfg(test)]
    fn inflight(&self, key: u64) -> Option<u32> {
        self.lock().workers.get(&key).map(|s| s.inflight)
    }
}

impl Slot {
    /// Whether it serves one of `services`.
    fn serves_any(&self, services: &[String]) -> bool {
        self.services.iter().any(|s| services.contains(s))
    }

    fn close_if_drained(&self) {
        if self.draining && self.inflight == 0 {
            self.session.drained.cancel();
        }
    }
}

/// What [`State::find`] found for a worker id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// A connection that takes calls (the least busy of several).
    Worker(u64),
    /// Only connections that are draining.
    Draining,
    None,
}

impl State {
    /// The connection of `service` whose worker is named `id`.
    /// Queues a call for worker `id` of `service`, not connected yet;
    /// refused past `queue_limit` calls waiting for that id.
    fn await_absent(
        &mut self,
        service: &str,
        id: &str,
        queue_limit: usize,
    ) -> Result<oneshot::Receiver<Lease>, AcquireError> {
        if id.is_empty() {
            return Err(AcquireError::UnknownWorker);
        }
        let waiting = self.absent.entry(id.to_owned()).or_default();
        waiting.retain(|(_, w)| !w.is_closed());
        if waiting.len() >= queue_limit {
            return Err(AcquireError::QueueFull);
        }
        let (tx, rx) = oneshot::channel();
        waiting.push((service.to_owned(), tx));
        Ok(rx)
    }

    /// Worker `key`, just registered with id `id`, takes the calls that
    /// waited for that id and one of its services.
    fn welcome_awaited(&mut self, id: &str, key: u64) {
        let Some(waiting) = self.absent.remove(id) else {
            return;
        };
        let Some(slot) = self.workers.get_mut(&key) else {
            return;
        };
        let mut rest = Vec::new();
        for (service, tx) in waiting {
            if tx.is_closed() {
                continue;
            }
            match slot.services.contains(&service) {
                true => slot.waiters.push_back(tx),
                false => rest.push((service, tx)),
            }
        }
        if !rest.is_empty() {
            self.absent.insert(id.to_owned(), rest);
        }
    }

    /// The dispatched (not suspended) workers with id `id`.
    fn with_id<'a>(&'a self, id: &str) -> impl Iterator<Item = (u64, &'a Slot)> + 'a {
        self.ids
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|k| Some((*k, self.workers.get(k)?)))
            .filter(|(_, slot)| !slot.suspended)
    }

    fn find(&self, service: &str, id: &str) -> Found {
        let mut found = Found::None;
        let mut load = u32::MAX;
        for (key, slot) in self.with_id(id) {
            if !slot.services.iter().any(|s| s == service) || slot.session.is_closed() {
                continue;
            }
            if slot.draining {
                if found == Found::None {
                    found = Found::Draining;
                }
                continue;
            }
            if slot.inflight < load {
                load = slot.inflight;
                found = Found::Worker(key);
            }
        }
        found
    }

    /// A lease on worker `key`, if it has room.
    fn lease_key(&mut self, registry: &Arc<Registry>, key: u64) -> Option<Lease> {
        let slot = self.workers.get_mut(&key)?;
        if slot.draining || slot.inflight >= slot.max_inflight || slot.session.is_closed() {
            return None;
        }
        slot.inflight += 1;
        Some(Lease {
            registry: registry.clone(),
            key,
            session: slot.session.clone(),
            armed: true,
        })
    }

    /// Hands worker `key`'s free capacity to the calls waiting for it alone.
    fn pump_worker(&mut self, registry: &Arc<Registry>, key: u64) {
        loop {
            let Some(slot) = self.workers.get_mut(&key) else {
                return;
            };
            while slot.waiters.front().is_some_and(|w| w.is_closed()) {
                slot.waiters.pop_front();
            }
            if slot.waiters.is_empty() {
                return;
            }
            let Some(lease) = self.lease_key(registry, key) else {
                return;
            };
            let Some(waiter) = self
                .workers
                .get_mut(&key)
                .and_then(|s| s.waiters.pop_front())
            else {
                return;
            };
            self.hand(waiter, lease);
        }
    }

    /// Gives `lease` to `waiter`. One that gave up between the check and
    /// the send gets nothing: the capacity is taken back here, under the
    /// lock already held.
    fn hand(&mut self, waiter: oneshot::Sender<Lease>, lease: Lease) {
        if let Err(mut lease) = waiter.send(lease) {
            lease.armed = false;
            if let Some(slot) = self.workers.get_mut(&lease.key) {
                slot.inflight -= 1;
            }
        }
    }

    /// The least-busy worker of `service` with free capacity.
    fn pick(&mut self, service: &str) -> Option<u64> {
        let svc = self.services.get_mut(service)?;
        let n = svc.workers.len();
        if n == 0 {
            return None;
        }
        svc.cursor = (svc.cursor + 1) % n;
        let mut best: Option<(u64, u32)> = None;
        for i in 0..n {
            let key = svc.workers[(svc.cursor + i) % n];
            let Some(slot) = self.workers.get(&key) else {
                continue;
            };
            // A closed session is normally unregistered first, but a lease
            // on one would only fail `start_call` and be asked for again:
            // it is never handed out, whatever the order of events.
            if slot.draining || slot.inflight >= slot.max_inflight || slot.session.is_closed() {
                continue;
            }
            if best.is_none_or(|(_, load)| slot.inflight < load) {
                best = Some((key, slot.inflight));
            }
        }
        best.map(|(key, _)| key)
    }

    fn try_lease(&mut self, registry: &Arc<Registry>, service: &str) -> Option<Lease> {
        let key = self.pick(service)?;
        self.lease_key(registry, key)
    }

    /// Pumps each of a worker's services, starting at a rotating one.
    fn pump_all(&mut self, registry: &Arc<Registry>, services: &[String]) {
        let n = services.len();
        self.rotor = self.rotor.wrapping_add(1);
        for i in 0..n {
            self.pump(registry, &services[(self.rotor + i) % n]);
        }
    }

    /// Hands free capacity to the service's waiters, oldest first.
    fn pump(&mut self, registry: &Arc<Registry>, service: &str) {
        loop {
            let Some(svc) = self.services.get_mut(service) else {
                return;
            };
            match svc.waiters.front() {
                None => return,
                Some(w) if w.is_closed() => {
                    svc.waiters.pop_front();
                    continue;
                }
                Some(_) => {}
            }
            let Some(lease) = self.try_lease(registry, service) else {
                return;
            };
            let Some(waiter) = self
                .services
                .get_mut(service)
                .and_then(|s| s.waiters.pop_front())
            else {
                return;
            };
            self.hand(waiter, lease);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry_with(max: &[u32]) -> (Arc<Registry>, Vec<u64>) {
        let reg = Arc::new(Registry::default());
        let keys = max
            .iter()
            .map(|m| reg.register(Session::detached("w"), &["svc".to_owned()], *m))
            .collect();
        (reg, keys)
    }

    #[tokio::test]
    async fn least_loaded_worker_is_chosen_and_max_is_respected() {
        let (reg, keys) = registry_with(&[2, 2]);
        let short = Duration::from_millis(10);
        let a = reg.acquire("svc", short, 8).await.expect("lease");
        let b = reg.acquire("svc", short, 8).await.expect("lease");
        assert_eq!(reg.inflight(keys[0]), Some(1));
        assert_eq!(reg.inflight(keys[1]), Some(1));
        let c = reg.acquire("svc", short, 8).await.expect("lease");
        let d = reg.acquire("svc", short, 8).await.expect("lease");
        assert_eq!(
            reg.acquire("svc", short, 8).await.err(),
            Some(AcquireError::NoWorker { connected: 2 })
        );
        drop((a, b, c, d));
        assert_eq!(reg.inflight(keys[0]), Some(0));
        assert_eq!(reg.inflight(keys[1]), Some(0));
    }

    #[tokio::test]
    async fn a_closed_session_is_never_handed_out() {
        let reg = Arc::new(Registry::default());
        let session = Session::detached("closing");
        reg.register(session.clone(), &["svc".to_owned()], 1);
        let held = reg.acquire("svc", Duration::ZERO, 8).await.expect("lease");
        // A call waits for the worker's one slot; the session closes while
        // still registered (close before unregister), then the slot frees.
        let r = reg.clone();
        let waiting = tokio::spawn(async move {
            r.acquire("svc", Duration::from_millis(200), 8)
                .await
                .map(|l| l.session().is_closed())
        });
        while reg.queued("svc") == 0 {
            tokio::task::yield_now().await;
        }
        session.close("gone");
        drop(held);
        assert_eq!(
            waiting.await.expect("join").err(),
            Some(AcquireError::NoWorker { connected: 1 })
        );
        // Nor to a call arriving afterwards.
        assert_eq!(
            reg.acquire("svc", Duration::ZERO, 8).await.err(),
            Some(AcquireError::NoWorker { connected: 1 })
        );
        // A live worker of the service still gets calls.
        reg.register(Session::detached("live"), &["svc".to_owned()], 1);
        let lease = reg.acquire("svc", Duration::ZERO, 8).await.expect("lease");
        assert!(!lease.session().is_closed());
    }

    #[tokio::test]
    async fn released_capacity_goes_to_the_oldest_waiter() {
        let (reg, _) = registry_with(&[1]);
        let held = reg.acquire("svc", Duration::ZERO, 8).await.expect("lease");
        let r1 = reg.clone();
        let first = tokio::spawn(async move { r1.acquire("svc", Duration::from_secs(5), 8).await });
        tokio::task::yield_now().await;
        // Wait until the first waiter is queued before adding the second.
        while reg.lock().services["svc"].waiters.is_empty() {
            tokio::task::yield_now().await;
        }
        let r2 = reg.clone();
        let second =
            tokio::spawn(async move { r2.acquire("svc", Duration::from_millis(50), 8).await });
        while reg.queued("svc") < 2 {
            tokio::task::yield_now().await;
        }
        drop(held);
        let got = first.await.expect("join");
        assert!(got.is_ok());
        assert!(
            second.await.expect("join").is_err(),
            "capacity is still held by the first waiter"
        );
    }

    /// Yields until a call waits in `service`'s queue.
    async fn until_waiting(reg: &Registry, service: &str) {
        while reg
            .lock()
            .services
            .get(service)
            .is_none_or(|s| s.waiters.is_empty())
        {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn queue_limit_refuses_excess_waiters() {
        let (reg, _) = registry_with(&[]);
        let r = reg.clone();
        let waiting =
            tokio::spawn(async move { r.acquire("svc", Duration::from_secs(5), 1).await });
        until_waiting(&reg, "svc").await;
        assert_eq!(
            reg.acquire("svc", Duration::from_secs(5), 1).await.err(),
            Some(AcquireError::QueueFull)
        );
        waiting.abort();
    }

    #[tokio::test]
    async fn a_worker_that_registers_serves_a_waiting_call() {
        let reg = Arc::new(Registry::default());
        let r = reg.clone();
        let waiting =
            tokio::spawn(async move { r.acquire("svc", Duration::from_secs(5), 8).await });
        until_waiting(&reg, "svc").await;
        let key = reg.register(Session::detached("late"), &["svc".to_owned()], 1);
        assert!(waiting.await.expect("join").is_ok());
        assert_eq!(reg.inflight(key), Some(0));
    }

    #[tokio::test]
    async fn a_backlog_on_one_service_does_not_starve_another() {
        let reg = Arc::new(Registry::default());
        reg.register(Session::detached("w"), &["a".to_owned(), "b".to_owned()], 1);
        let mut held = reg.acquire("a", Duration::ZERO, 64).await.expect("lease");
        let mut waiting = Vec::new();
        for service in ["a", "a", "a", "b", "a", "a"] {
            let r = reg.clone();
            let queued_before = reg.queued(service);
            waiting.push((
                service,
                tokio::spawn(async move { r.acquire(service, Duration::from_secs(5), 64).await }),
            ));
            while reg.queued(service) == queued_before {
                tokio::task::yield_now().await;
            }
        }
        // Hand the single slot around; "b" must get it within two releases
        // although "a" has the longer queue.
        let mut served = Vec::new();
        for _ in 0..2 {
            drop(held);
            let (svc, lease) = loop {
                if let Some(i) = waiting.iter().position(|(_, h)| h.is_finished()) {
                    let (svc, h) = waiting.remove(i);
                    break (svc, h.await.expect("join").expect("lease"));
                }
                tokio::task::yield_now().await;
            };
            served.push(svc);
            held = lease;
        }
        assert!(served.contains(&"b"), "served {served:?}");
        for (_, h) in waiting {
            h.abort();
        }
    }
}
