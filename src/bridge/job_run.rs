//! Running jobs: each live job has a task that waits for a worker (for a
//! job not addressed to one worker, behind at most `jobs.concurrency`
//! others of its service), sends it as an ordinary call (`call.rs`, with
//! its retry rules), stores the outcome durably, then delivers its
//! callback. A restart picks up where the store says (`recover`), and a
//! sweeper forgets finished jobs `jobs.retention` after they ended.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::{
    sync::{watch, Notify, Semaphore},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use super::{
    call::{call_target, Ctx},
    callback,
    caller::Caller,
    reply::{CallBody, Trace},
    request_body::RequestBody,
    routes::Target,
    Shared,
};
use crate::{
    body::Body,
    error::CallError,
    jobs::{
        now_ms, record::Header, store::SPOOL_OVER, stream::Claim, Backend, JobError, Outcome,
        Record, State, Store, StoreError,
    },
};

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A live job, as its waiters and `DELETE` see it.
struct Live {
    state: watch::Sender<State>,
    cancel: CancellationToken,
}

/// The jobs of one bridge: the store, the live ones, and their tasks.
pub(crate) struct Jobs {
    pub(super) store: Backend,
    live: Mutex<HashMap<String, Live>>,
    /// Per service: the jobs it may have with its workers at once.
    permits: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
    /// `(purge_at_ms, id)` of every finished job.
    expiry: Mutex<BTreeSet<(u64, String)>>,
    expiry_changed: Notify,
    /// Job runs and callback deliveries.
    pub(super) tasks: TaskTracker,
    /// Set when the bridge stops: queued jobs stay in the store.
    pub(super) stop: CancellationToken,
    /// Serialise submissions that carry the same idempotency key (by a
    /// hash of it), so that two at once cannot both make a job.
    keyed: [tokio::sync::Mutex<()>; 64],
}

impl Jobs {
    pub(crate) fn new(store: Backend) -> Jobs {
        Jobs {
            store,
            live: Mutex::default(),
            permits: Mutex::default(),
            expiry: Mutex::default(),
            expiry_changed: Notify::new(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            keyed: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
        }
    }

    /// The lock of submissions with idempotency key `key`.
    pub(super) fn keyed(&self, key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{BuildHasher, Hasher};
        let mut h = foldhash::fast::FixedState::with_seed(0).build_hasher();
        h.write(key.as_bytes());
        &self.keyed[(h.finish() % 64) as usize]
    }

    /// Jobs queued or running here.
    pub(crate) fn live(&self) -> usize {
        lock(&self.live).len()
    }

    /// A live job's state changes, or `None` once it has ended.
    pub(super) fn watch(&self, id: &str) -> Option<watch::Receiver<State>> {
        lock(&self.live).get(id).map(|l| l.state.subscribe())
    }

    /// Forgets a live job that goes back to the stream without running.
    pub(super) fn forget(&self, id: &str) {
        lock(&self.live).remove(id);
    }

    /// Cancels a live job; false if it is not live here.
    pub(super) fn cancel(&self, id: &str) -> bool {
        match lock(&self.live).get(id) {
            Some(live) => {
                live.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// The permits of `key` (a service, or a service's one worker).
    /// Keys no job uses any more are dropped once there are many: one per
    /// worker id a job was ever addressed to would otherwise pile up.
    fn permits(&self, key: &str, n: usize) -> Arc<Semaphore> {
        let mut permits = lock(&self.permits);
        // At each power of two past 1024: the sweeps cost O(1) per job.
        if permits.len() >= 1024 && permits.len().is_power_of_two() {
            permits.retain(|_, s| Arc::strong_count(s) > 1);
        }
        permits
            .entry(Arc::from(key))
            .or_insert_with(|| Arc::new(Semaphore::new(n)))
            .clone()
    }

    fn expires(&self, record: &Record, retention: Duration) {
        let retention = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        if let Some(at) = record.purge_at(retention) {
            lock(&self.expiry).insert((at, record.id.clone()));
            self.expiry_changed.notify_one();
        }
    }
}

/// Where a run writes its job: this bridge's store, or the cluster's
/// through this bridge's hold on the job.
#[derive(Clone)]
pub(super) enum Writer {
    Local(Store),
    Claim(Arc<Claim>),
}

impl Writer {
    /// Stores a changed record.
    pub(super) async fn put(&self, record: &Record) -> Result<(), StoreError> {
        match self {
            Writer::Local(store) => store.put(record).await,
            Writer::Claim(claim) => claim.modify(|r| replace(r, record)).await.map(drop),
        }
    }

    /// Stores how the job ended, with its result body.
    async fn finish(&self, record: &Record, body: Option<Bytes>) -> Result<(), StoreError> {
        match self {
            Writer::Local(store) => store.finish(record, body).await,
            Writer::Claim(claim) => {
                let stream = claim.stream();
                if let Some(body) = &body {
                    stream.store_result(&record.id, body).await?;
                }
                claim.modify(|r| replace(r, record)).await?;
                stream.drop_body(&record.id).await;
                Ok(())
            }
        }
    }

    /// Changes the stored job with `change`; false if it is gone.
    pub(super) async fn modify(
        &self,
        id: &str,
        change: impl FnOnce(&mut Record),
    ) -> Result<bool, StoreError> {
        match self {
            Writer::Local(store) => {
                let Some(mut record) = store.get(id).await? else {
                    return Ok(false);
                };
                change(&mut record);
                store.put(&record).await.map(|()| true)
            }
            Writer::Claim(claim) => claim.modify(change).await.map(|_| true),
        }
    }

    /// Whether the job is still stored (not purged).
    pub(super) async fn exists(&self, id: &str) -> bool {
        let found = match self {
            Writer::Local(store) => store.get(id).await,
            Writer::Claim(claim) => claim.stream().get(id).await,
        };
        // A store that cannot be read is not taken for an answer.
        found.map_or(true, |r| r.is_some())
    }

    /// The job as stored now (`fallback` if it cannot be read).
    async fn current(&self, fallback: Record) -> Record {
        match self {
            Writer::Local(store) => match store.get(&fallback.id).await {
                Ok(Some(record)) => record,
                _ => fallback,
            },
            Writer::Claim(claim) => claim.record().await,
        }
    }
}

/// `record` in place of `held`, keeping who holds it.
fn replace(held: &mut Record, record: &Record) {
    let (owner, lease) = (held.owner.take(), held.lease_ms);
    *held = record.clone();
    held.owner = owner;
    held.lease_ms = lease;
}

/// Starts the task of a job that was just stored (or recovered) in this
/// bridge's own store.
pub(super) fn start(shared: &Arc<Shared>, jobs: &Arc<Jobs>, store: &Store, record: Record) {
    let writer = Writer::Local(store.clone());
    let run = Run::new(shared, jobs, &record, writer.clone());
    jobs.tasks.spawn(async move {
        // The body is read once the job may go (see `Run::call`).
        let record = run.run(record, None).await;
        if let Some(record) = record.filter(|r| r.callback.is_some()) {
            callback::deliver(run.shared.clone(), run.jobs.clone(), record, writer).await;
        }
    });
}

/// What a job's call tells its runner: its queue deadline, and that a
/// worker has it (stored as `running` before the worker is sent anything,
/// so that a restart never runs twice what may have started).
pub(crate) struct JobHook {
    pub(super) queue_deadline: Instant,
    record: tokio::sync::Mutex<Record>,
    writer: Writer,
    state: watch::Sender<State>,
    placed: AtomicBool,
    placed_now: Notify,
    /// This bridge's node name, in a cluster.
    here: Option<String>,
}

impl JobHook {
    /// The failure of a job that could not be stored as running.
    pub(super) fn unstored() -> CallError {
        CallError::JobsUnavailable {
            reason: "the job could not be stored as running, so it was not sent".into(),
        }
    }

    /// A worker (`worker`, at bridge `node` if not this one) has the job;
    /// false if that could not be stored.
    pub(super) async fn placed(&self, worker: &str, node: Option<&str>) -> bool {
        let mut record = self.record.lock().await;
        record.state = State::Running;
        record.started_ms = Some(now_ms());
        record.attempts += 1;
        record.ran_by = Some(worker.to_owned());
        record.node = node.map(str::to_owned).or_else(|| self.here.clone());
        let stored = match self.writer.put(&record).await {
            Ok(()) => true,
            Err(e) => {
                warn!(job = record.id, error = %e, "could not store that a job is running");
                false
            }
        };
        self.placed.store(true, Ordering::Release);
        self.placed_now.notify_one();
        self.state.send_replace(State::Running);
        stored
    }
}

/// One job's task.
pub(super) struct Run {
    shared: Arc<Shared>,
    jobs: Arc<Jobs>,
    writer: Writer,
    state: watch::Sender<State>,
    cancel: CancellationToken,
}

/// How a job's call ended.
pub(super) enum Ended {
    Reply(Outcome, Bytes),
    Error(State, JobError),
    /// The bridge is stopping before a worker had it: it stays queued.
    Stopped,
}

impl Run {
    /// The run of `record`, live from now on (its waiters and `DELETE`
    /// find it).
    pub(super) fn new(
        shared: &Arc<Shared>,
        jobs: &Arc<Jobs>,
        record: &Record,
        writer: Writer,
    ) -> Run {
        let (state, _) = watch::channel(record.state);
        let cancel = CancellationToken::new();
        lock(&jobs.live).insert(
            record.id.clone(),
            Live {
                state: state.clone(),
                cancel: cancel.clone(),
            },
        );
        Run {
            shared: shared.clone(),
            jobs: jobs.clone(),
            writer,
            state,
            cancel,
        }
    }

    /// Whether the job was cancelled (`DELETE` here or, in a cluster,
    /// anywhere) since its run began.
    pub(super) fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Runs the job to its end (with its request body, or reading it from
    /// this bridge's store once the job may go); the record as stored
    /// then, or `None` if the bridge stopped first or the record could
    /// not be stored (the job is left as it was, for a restart's rules).
    pub(super) async fn run(&self, record: Record, body: Option<Bytes>) -> Option<Record> {
        let ended = self.call(record.clone(), body).await;
        self.end(record, ended).await
    }

    /// Ends a job that did not run (cancelled before it went, say).
    pub(super) async fn end_now(
        &self,
        record: Record,
        state: State,
        error: JobError,
    ) -> Option<Record> {
        self.end(record, Ended::Error(state, error)).await
    }

    /// Stores how the job ended (read again first: the run changed it).
    async fn end(&self, record: Record, ended: Ended) -> Option<Record> {
        let id = record.id.clone();
        let mut record = self.writer.current(record).await;
        match ended {
            Ended::Stopped => {
                lock(&self.jobs.live).remove(&id);
                None
            }
            Ended::Reply(outcome, body) => {
                record.state = State::Succeeded;
                record.outcome = Some(outcome);
                self.finish(record, Some(body)).await
            }
            Ended::Error(state, error) => {
                record.state = state;
                record.error = Some(error);
                self.finish(record, None).await
            }
        }
    }

    /// Stores how the job ended (trying a few times) and tells its
    /// waiters; `None` if it could not be stored.
    async fn finish(&self, mut record: Record, body: Option<Bytes>) -> Option<Record> {
        record.finished_ms = Some(now_ms());
        let mut pause = Duration::from_millis(100);
        let mut tries = 0;
        let stored = loop {
            tries += 1;
            let body = body.clone().filter(|_| record.outcome.is_some());
            match self.writer.finish(&record, body).await {
                Ok(()) => break Ok(()),
                Err(StoreError::Full { limit }) if record.outcome.is_some() => {
                    record.state = State::Failed;
                    record.outcome = None;
                    record.error = Some(job_error(&CallError::JobsFull { limit }));
                }
                // Another bridge holds it now: it is that bridge's to end.
                Err(StoreError::Conflict) => break Err(StoreError::Conflict),
                Err(e) if tries >= 3 => break Err(e),
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
            }
        };
        lock(&self.jobs.live).remove(&record.id);
        if let Err(e) = stored {
            warn!(job = record.id, error = %e, "could not store how a job ended; it will be taken up again");
            return None;
        }
        if let Backend::Local(_) = self.jobs.store {
            // JetStream forgets by itself (the buckets' max_age).
            let settings = self.shared.settings.load();
            self.jobs.expires(&record, settings.config.jobs.retention);
        }
        info!(
            job = record.id,
            request_id = record.request_id,
            state = record.state.as_str(),
            "job ended"
        );
        self.shared.metrics.job_ended(record.state.as_str());
        self.state.send_replace(record.state);
        Some(record)
    }

    /// Waits for room, sends the call, and reads its reply.
    async fn call(&self, record: Record, body: Option<Bytes>) -> Ended {
        let config = self.shared.settings.load_full();
        let jobs_config = &config.config.jobs;
        let now = now_ms();
        // Bounded: a record is data (in a cluster, any NATS client with
        // access could write one).
        let left = Duration::from_millis(record.queue_deadline_ms.saturating_sub(now))
            .min(jobs_config.queue_timeout);
        let queue_deadline = Instant::now() + left;
        // A job queues behind its service's permits (or those of the one
        // worker it is for). In a cluster each bridge bounds the jobs it
        // pulls instead.
        let permit = match &self.writer {
            Writer::Claim(..) => None,
            Writer::Local(_) => {
                let key = match &record.worker {
                    Some(worker) => format!("{}\0{worker}", record.service),
                    None => record.service.clone(),
                };
                let permits = self.jobs.permits(&key, jobs_config.concurrency);
                tokio::select! {
                    p = permits.acquire_owned() => p.ok(),
                    _ = self.cancel.cancelled() => return cancelled(),
                    _ = self.jobs.stop.cancelled() => return Ended::Stopped,
                    _ = tokio::time::sleep_until(queue_deadline) => return expired(&record, jobs_config.queue_timeout),
                }
            }
        };
        let body = match (body, &self.writer) {
            (Some(body), _) => body,
            (None, Writer::Local(store)) => match store.body(&record).await {
                Ok(body) => body,
                Err(e) => {
                    return Ended::Error(
                        State::Failed,
                        job_error(&CallError::JobsUnavailable {
                            reason: e.to_string(),
                        }),
                    )
                }
            },
            (None, Writer::Claim(..)) => Bytes::new(),
        };
        let hook = JobHook {
            queue_deadline,
            record: tokio::sync::Mutex::new(record.clone()),
            writer: self.writer.clone(),
            state: self.state.clone(),
            placed: AtomicBool::new(false),
            placed_now: Notify::new(),
            here: self.shared.cluster.get().map(|c| c.node.clone()),
        };
        let caller = Caller::for_job(&record.caller);
        let ctx = Ctx {
            shared: &self.shared,
            settings: &config,
            caller: &caller,
            request_id: &record.request_id,
            started: Instant::now(),
            relayed: None,
            fanout: None,
            job: Some(&hook),
        };
        let target = Target {
            service: Arc::from(record.service.as_str()),
            // A backstop: the runner's own clock (below) ends a job that
            // runs past `jobs.timeout` once a worker has it.
            request_timeout: left + jobs_config.timeout,
            max_body: usize::MAX,
        };
        let limit = jobs_config.max_result.bytes();
        let ran_too_long = async {
            hook.placed_now.notified().await;
            tokio::time::sleep(jobs_config.timeout).await;
        };
        let stopped_unplaced = async {
            self.jobs.stop.cancelled().await;
            if hook.placed.load(Ordering::Acquire) {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(ran_too_long, stopped_unplaced);
        let ended = loop {
            let exchange = exchange(&ctx, &record, target.clone(), body.clone(), limit);
            let ended = tokio::select! {
                ended = exchange => ended,
                _ = self.cancel.cancelled() => cancelled(),
                _ = &mut ran_too_long => Ended::Error(State::Failed, job_error(&CallError::Timeout {
                    service: record.service.clone(),
                    after: jobs_config.timeout,
                })),
                _ = &mut stopped_unplaced => Ended::Stopped,
            };
            // The cluster is unreachable and no worker here can take it:
            // the job waits for either, as it waits for a worker.
            let unreachable =
                matches!(&ended, Ended::Error(_, e) if e.code == "cluster_unavailable");
            if !unreachable || Instant::now() >= queue_deadline {
                break ended;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => break cancelled(),
                _ = &mut stopped_unplaced => break Ended::Stopped,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        drop(permit);
        match ended {
            // A worker was never found: the job expired.
            Ended::Error(_, e)
                if ["no_worker", "unknown_worker", "cluster_unavailable"]
                    .contains(&e.code.as_str()) =>
            {
                expired(&record, jobs_config.queue_timeout)
            }
            other => other,
        }
    }
}

/// The job's call and its whole reply.
async fn exchange(
    ctx: &Ctx<'_>,
    record: &Record,
    target: Target,
    body: Bytes,
    limit: usize,
) -> Ended {
    let parts = match request_parts(record) {
        Ok(parts) => parts,
        Err(e) => return Ended::Error(State::Failed, job_error(&e)),
    };
    let mut trace = Trace::default();
    let body = RequestBody::relayed(Body::full(body));
    let resp: Response<CallBody> = match call_target(ctx, target, parts, body, &mut trace).await {
        Ok(resp) => resp,
        Err(e) => return Ended::Error(State::Failed, job_error(&e)),
    };
    let (head, body) = resp.into_parts();
    match Limited::new(body, limit).collect().await {
        Ok(collected) => {
            let bytes = collected.to_bytes();
            let outcome = Outcome {
                status: head.status.as_u16(),
                headers: Header::lines(&head.headers),
                len: bytes.len() as u64,
                spooled: bytes.len() > SPOOL_OVER,
            };
            Ended::Reply(outcome, bytes)
        }
        Err(e) if e.is::<LengthLimitError>() => Ended::Error(
            State::Failed,
            JobError {
                status: 502,
                code: "result_too_large".into(),
                message: format!("the reply is larger than jobs.max_result ({limit} bytes)"),
            },
        ),
        Err(e) => Ended::Error(
            State::Failed,
            JobError {
                status: 502,
                code: "worker_lost".into(),
                message: format!("the reply's body ended early: {e}"),
            },
        ),
    }
}

/// The stored request as a request head.
fn request_parts(record: &Record) -> Result<Box<http::request::Parts>, CallError> {
    let bad = |e: http::Error| CallError::BadRequest {
        reason: format!("the stored job is not a valid request: {e}"),
    };
    let mut req = http::Request::builder()
        .method(record.method.as_str())
        .uri(record.path.as_str())
        .body(())
        .map_err(bad)?;
    *req.headers_mut() = Header::map(&record.headers);
    Ok(Box::new(req.into_parts().0))
}

pub(super) fn cancelled() -> Ended {
    Ended::Error(
        State::Cancelled,
        JobError {
            status: 409,
            code: "job_cancelled".into(),
            message: "the job was cancelled (DELETE)".into(),
        },
    )
}

pub(super) fn expired(record: &Record, queue_timeout: Duration) -> Ended {
    let whom = match &record.worker {
        Some(id) => format!("worker {id:?} of service {:?}", record.service),
        None => format!("a worker of service {:?}", record.service),
    };
    Ended::Error(
        State::Expired,
        JobError {
            status: 504,
            code: "job_expired".into(),
            message: format!(
                "no {whom} took the job within jobs.queue_timeout ({queue_timeout:?})"
            ),
        },
    )
}

/// A bridge error as a job keeps it.
pub(super) fn job_error(e: &CallError) -> JobError {
    JobError {
        status: e.status().as_u16(),
        code: e.code().to_owned(),
        message: e.to_string(),
    }
}

/// Takes up the store's jobs after a start: queued ones run; a running
/// one runs again if that is safe (an idempotent method or a key), else it
/// fails with `worker_lost`; finished ones wait for their purge, and an
/// undelivered callback is sent again.
pub(super) async fn recover(
    shared: &Arc<Shared>,
    jobs: &Arc<Jobs>,
    store: &Store,
    records: Vec<Record>,
) {
    let retention = shared.settings.load().config.jobs.retention;
    let (mut queued, mut rerun, mut lost) = (0, 0, 0);
    // A finished job's callback, if it is still due.
    let call_back = |record: Record| {
        if record.callback.is_some() && !record.callback_delivered {
            let writer = Writer::Local(store.clone());
            let deliver = callback::deliver(shared.clone(), jobs.clone(), record, writer);
            jobs.tasks.spawn(deliver);
        }
    };
    for mut record in records {
        match record.state {
            State::Queued => {
                queued += 1;
                start(shared, jobs, store, record);
            }
            State::Running if record.replayable => {
                rerun += 1;
                record.state = State::Queued;
                if let Err(e) = store.put(&record).await {
                    warn!(job = record.id, error = %e, "could not requeue a job");
                }
                start(shared, jobs, store, record);
            }
            State::Running => {
                lost += 1;
                record.state = State::Failed;
                record.finished_ms = Some(now_ms());
                record.error = Some(lost_error());
                if let Err(e) = store.finish(&record, None).await {
                    warn!(job = record.id, error = %e, "could not fail a lost job");
                }
                jobs.expires(&record, retention);
                call_back(record);
            }
            _ => {
                jobs.expires(&record, retention);
                call_back(record);
            }
        }
    }
    if queued + rerun + lost > 0 {
        info!(
            queued,
            run_again = rerun,
            failed = lost,
            "jobs taken up from the store"
        );
    }
}

/// Forgets finished jobs once their retention has passed; sleeps until
/// the next one is due.
pub(super) async fn sweep(jobs: Arc<Jobs>) {
    loop {
        let next = lock(&jobs.expiry).first().cloned();
        let wait = match &next {
            Some((at, _)) => Duration::from_millis(at.saturating_sub(now_ms())),
            None => Duration::from_secs(3600),
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = jobs.stop.cancelled() => return,
                _ = jobs.expiry_changed.notified() => continue,
                _ = tokio::time::sleep(wait) => continue,
            }
        }
        let Some(due) = next else { continue };
        lock(&jobs.expiry).remove(&due);
        if let Err(e) = jobs.store.purge(&due.1).await {
            warn!(job = due.1, error = %e, "could not purge an expired job");
        }
    }
}

/// Why a job that was running when its bridge went away is not run again.
pub(super) fn lost_error() -> JobError {
    JobError {
        status: 502,
        code: "worker_lost".into(),
        message: "the bridge stopped while a worker ran the job; it is not run again (its method is not idempotent and it has no Idempotency-Key)".into(),
    }
}
