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
        now_ms,
        record::Header,
        store::SPOOL_OVER,
        stream::{Sizing, ACK_WAIT, JOB_ID},
        Backend, JobError, Outcome, Record, State, StoreError, Stream,
    },
};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
    /// Serialises submissions that carry an idempotency key, so that two
    /// at once cannot both make a job.
    pub(super) keyed: tokio::sync::Mutex<()>,
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
            keyed: tokio::sync::Mutex::new(()),
        }
    }

    /// Jobs queued or running here.
    pub(crate) fn live(&self) -> usize {
        lock(&self.live).len()
    }

    /// A live job's state changes, or `None` once it has ended.
    pub(super) fn watch(&self, id: &str) -> Option<watch::Receiver<State>> {
        lock(&self.live).get(id).map(|l| l.state.subscribe())
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

    fn permits(&self, service: &str, n: usize) -> Arc<Semaphore> {
        lock(&self.permits)
            .entry(Arc::from(service))
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

/// Starts the task of a job that was just stored (or recovered) in this
/// bridge's own store.
pub(super) fn start(shared: &Arc<Shared>, jobs: &Arc<Jobs>, record: Record) {
    let run = Run::new(shared, jobs, &record);
    jobs.tasks.spawn(async move {
        let body = match &run.jobs.store {
            Backend::Local(store) => store.body(&record).await,
            Backend::Stream(_) => Ok(Bytes::new()),
        };
        let record = match body {
            Ok(body) => run.run(record, body).await,
            Err(e) => {
                let error = job_error(&CallError::JobsUnavailable {
                    reason: e.to_string(),
                });
                run.end(record, Ended::Error(State::Failed, error)).await
            }
        };
        if let Some(record) = record.filter(|r| r.callback.is_some()) {
            callback::deliver(run.shared.clone(), run.jobs.clone(), record).await;
        }
    });
}

/// What a job's call tells its runner: its queue deadline, and that a
/// worker has it (stored as `running` before the worker is sent anything,
/// so that a restart never runs twice what may have started).
pub(crate) struct JobHook {
    pub(super) queue_deadline: Instant,
    record: tokio::sync::Mutex<Record>,
    store: Backend,
    state: watch::Sender<State>,
    placed: AtomicBool,
    placed_now: Notify,
    /// This bridge's node name, in a cluster.
    here: Option<String>,
}

impl JobHook {
    /// A worker (`worker`, at bridge `node` if not this one) has the job.
    pub(super) async fn placed(&self, worker: &str, node: Option<&str>) {
        let mut record = self.record.lock().await;
        record.state = State::Running;
        record.started_ms = Some(now_ms());
        record.attempts += 1;
        record.ran_by = Some(worker.to_owned());
        record.node = node.map(str::to_owned).or_else(|| self.here.clone());
        if let Err(e) = self.store.put(&record).await {
            // The job goes on; a restart would then see it queued.
            warn!(job = record.id, error = %e, "could not store that a job is running");
        }
        self.placed.store(true, Ordering::Release);
        self.placed_now.notify_one();
        self.state.send_replace(State::Running);
    }
}

/// One job's task.
struct Run {
    shared: Arc<Shared>,
    jobs: Arc<Jobs>,
    state: watch::Sender<State>,
    cancel: CancellationToken,
}

/// How a job's call ended.
enum Ended {
    Reply(Outcome, Bytes),
    Error(State, JobError),
    /// The bridge is stopping before a worker had it: it stays queued.
    Stopped,
}

impl Run {
    /// The run of `record`, live from now on (its waiters and `DELETE`
    /// find it).
    fn new(shared: &Arc<Shared>, jobs: &Arc<Jobs>, record: &Record) -> Run {
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
            state,
            cancel,
        }
    }

    /// Runs the job to its end; the record as stored then, or `None` if
    /// the bridge stopped first (the job is left as it was).
    async fn run(&self, record: Record, body: Bytes) -> Option<Record> {
        let ended = self.call(record.clone(), body).await;
        self.end(record, ended).await
    }

    /// Stores how the job ended (read again first: the run changed it).
    async fn end(&self, record: Record, ended: Ended) -> Option<Record> {
        let id = record.id.clone();
        let mut record = match self.jobs.store.get(&id).await {
            Ok(Some(stored)) => stored,
            _ => record,
        };
        match ended {
            Ended::Stopped => {
                lock(&self.jobs.live).remove(&id);
                None
            }
            Ended::Reply(outcome, body) => {
                record.state = State::Succeeded;
                record.outcome = Some(outcome);
                Some(self.finish(record, Some(body)).await)
            }
            Ended::Error(state, error) => {
                record.state = state;
                record.error = Some(error);
                Some(self.finish(record, None).await)
            }
        }
    }

    /// Stores how the job ended and tells its waiters.
    async fn finish(&self, mut record: Record, body: Option<Bytes>) -> Record {
        record.finished_ms = Some(now_ms());
        let stored = match self.jobs.store.finish(&record, body.clone()).await {
            Ok(()) => Ok(()),
            Err(StoreError::Full { limit }) if body.is_some() => {
                record.state = State::Failed;
                record.outcome = None;
                record.error = Some(job_error(&CallError::JobsFull { limit }));
                self.jobs.store.finish(&record, None).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            warn!(job = record.id, error = %e, "could not store how a job ended; a restart will take it up again");
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
        lock(&self.jobs.live).remove(&record.id);
        self.state.send_replace(record.state);
        record
    }

    /// Waits for room, sends the call, and reads its reply.
    async fn call(&self, record: Record, body: Bytes) -> Ended {
        let config = self.shared.settings.load_full();
        let jobs_config = &config.config.jobs;
        let now = now_ms();
        let left = Duration::from_millis(record.queue_deadline_ms.saturating_sub(now));
        let queue_deadline = Instant::now() + left;
        // A job for one worker waits for that worker; the others queue
        // behind their service's permits.
        let permit = match (&record.worker, &self.jobs.store) {
            // In a cluster each bridge bounds the jobs it pulls.
            (Some(_), _) | (_, Backend::Stream(_)) => None,
            (None, Backend::Local(_)) => {
                let permits = self.jobs.permits(&record.service, jobs_config.concurrency);
                tokio::select! {
                    p = permits.acquire_owned() => p.ok(),
                    _ = self.cancel.cancelled() => return cancelled(),
                    _ = self.jobs.stop.cancelled() => return Ended::Stopped,
                    _ = tokio::time::sleep_until(queue_deadline) => return expired(&record, jobs_config.queue_timeout),
                }
            }
        };
        let hook = JobHook {
            queue_deadline,
            record: tokio::sync::Mutex::new(record.clone()),
            store: self.jobs.store.clone(),
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
        let exchange = exchange(&ctx, &record, target, body, limit);
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
        let ended = tokio::select! {
            ended = exchange => ended,
            _ = self.cancel.cancelled() => cancelled(),
            _ = ran_too_long => Ended::Error(State::Failed, job_error(&CallError::Timeout {
                service: record.service.clone(),
                after: jobs_config.timeout,
            })),
            _ = stopped_unplaced => Ended::Stopped,
        };
        drop(permit);
        match ended {
            // A worker was never found: the job expired.
            Ended::Error(_, e) if e.code == "no_worker" || e.code == "unknown_worker" => {
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

fn cancelled() -> Ended {
    Ended::Error(
        State::Cancelled,
        JobError {
            status: 409,
            code: "job_cancelled".into(),
            message: "the job was cancelled (DELETE)".into(),
        },
    )
}

fn expired(record: &Record, queue_timeout: Duration) -> Ended {
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
pub(super) async fn recover(shared: &Arc<Shared>, jobs: &Arc<Jobs>, records: Vec<Record>) {
    let retention = shared.settings.load().config.jobs.retention;
    let (mut queued, mut rerun, mut lost) = (0, 0, 0);
    for mut record in records {
        match record.state {
            State::Queued => {
                queued += 1;
                start(shared, jobs, record);
            }
            State::Running if record.replayable => {
                rerun += 1;
                record.state = State::Queued;
                if let Err(e) = jobs.store.put(&record).await {
                    warn!(job = record.id, error = %e, "could not requeue a job");
                }
                start(shared, jobs, record);
            }
            State::Running => {
                lost += 1;
                record.state = State::Failed;
                record.finished_ms = Some(now_ms());
                record.error = Some(lost_error());
                if let Err(e) = jobs.store.finish(&record, None).await {
                    warn!(job = record.id, error = %e, "could not fail a lost job");
                }
                jobs.expires(&record, retention);
                if record.callback.is_some() {
                    jobs.tasks
                        .spawn(callback::deliver(shared.clone(), jobs.clone(), record));
                }
            }
            _ => {
                jobs.expires(&record, retention);
                if record.callback.is_some() && !record.callback_delivered {
                    jobs.tasks
                        .spawn(callback::deliver(shared.clone(), jobs.clone(), record));
                }
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

/// Opens the cluster's job store and starts pulling jobs from it.
pub(super) async fn join_stream(
    shared: &Arc<Shared>,
    cluster: Option<&crate::cluster::Cluster>,
) -> std::io::Result<Arc<Jobs>> {
    let no = |e: String| std::io::Error::other(format!("jobs in JetStream: {e}"));
    let cluster = cluster.ok_or_else(|| no("no cluster".into()))?;
    let config = shared.settings.load().config.jobs.clone();
    let sizing = Sizing {
        max_bytes: config.max_bytes.bytes() as u64,
        max_age: config.queue_timeout + config.timeout + config.retention,
        replicas: config.replicas,
    };
    let stream = Stream::open(cluster.client().clone(), &cluster.name, &sizing)
        .await
        .map_err(|e| no(e.to_string()))?;
    let cancels = cluster
        .client()
        .subscribe(stream.cancel_subject().to_owned())
        .await
        .map_err(|e| no(e.to_string()))?;
    let consumer = stream.consumer().await.map_err(|e| no(e.to_string()))?;
    let jobs = Arc::new(Jobs::new(Backend::Stream(Box::new(stream.clone()))));
    jobs.tasks.spawn(listen_cancels(jobs.clone(), cancels));
    jobs.tasks
        .spawn(consume(shared.clone(), jobs.clone(), stream, consumer));
    info!("jobs kept in JetStream, pulled by every bridge of the cluster");
    Ok(jobs)
}

/// Cancels the jobs running here that a `DELETE` anywhere named.
async fn listen_cancels(jobs: Arc<Jobs>, mut cancels: async_nats::Subscriber) {
    use futures_util::StreamExt;
    loop {
        let message = tokio::select! {
            _ = jobs.stop.cancelled() => return,
            m = cancels.next() => m,
        };
        let Some(message) = message else { return };
        jobs.cancel(&String::from_utf8_lossy(&message.payload));
    }
}

/// Pulls jobs while this bridge has room for them (`jobs.concurrency` at
/// once), each into a task of its own.
async fn consume(
    shared: Arc<Shared>,
    jobs: Arc<Jobs>,
    stream: Stream,
    consumer: async_nats::jetstream::consumer::Consumer<
        async_nats::jetstream::consumer::pull::Config,
    >,
) {
    use futures_util::StreamExt;
    let n = shared.settings.load().config.jobs.concurrency;
    let room = Arc::new(Semaphore::new(n));
    loop {
        let first = tokio::select! {
            _ = jobs.stop.cancelled() => return,
            p = room.clone().acquire_owned() => p,
        };
        let Ok(first) = first else { return };
        let mut permits = vec![first];
        while let Ok(p) = room.clone().try_acquire_owned() {
            permits.push(p);
        }
        // Only as many as can start now: a message pulled and left
        // waiting would be given to another bridge after ACK_WAIT.
        let batch = consumer
            .fetch()
            .max_messages(permits.len())
            .expires(Duration::from_secs(5))
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                warn!(error = %e, "cannot pull jobs from JetStream; trying again");
                tokio::select! {
                    _ = jobs.stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let message = tokio::select! {
                _ = jobs.stop.cancelled() => return,
                m = batch.next() => m,
            };
            let Some(Ok(message)) = message else { break };
            let Some(permit) = permits.pop() else { break };
            let (shared, jobs2, stream) = (shared.clone(), jobs.clone(), stream.clone());
            jobs.tasks.spawn(async move {
                pulled(&shared, &jobs2, &stream, message).await;
                drop(permit);
            });
        }
    }
}

/// Tells JetStream, until dropped, that a pulled job is still at work.
fn keep_alive(message: &async_nats::jetstream::Message) -> tokio_util::task::AbortOnDropHandle<()> {
    let (context, reply) = (message.context.clone(), message.reply.clone());
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let Some(reply) = reply else { return };
        loop {
            tokio::time::sleep(ACK_WAIT / 3).await;
            let progress: Bytes = async_nats::jetstream::AckKind::Progress.into();
            let _ = context.client().publish(reply.clone(), progress).await;
        }
    }))
}

/// One job pulled from the stream: taken up by the restart rules (the
/// bridge that pulled it before may have died), run, called back, then
/// acknowledged. A job no worker anywhere can take yet goes back to the
/// stream for a while, so that it holds no room here.
async fn pulled(
    shared: &Arc<Shared>,
    jobs: &Arc<Jobs>,
    stream: &Stream,
    message: async_nats::jetstream::Message,
) {
    use async_nats::jetstream::AckKind;
    let id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(JOB_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    let record = match stream.get(&id).await {
        Ok(Some(record)) => record,
        // Purged, or not a job's message: nothing to run.
        Ok(None) => {
            let _ = message.ack().await;
            return;
        }
        Err(e) => {
            warn!(job = id, error = %e, "cannot read a pulled job; it goes back");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
    };
    let _alive = keep_alive(&message);
    let record = match take_up(shared, jobs, stream, record, &message).await {
        TakenUp::Run(record) => record,
        TakenUp::Later(delay) => {
            let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            return;
        }
        TakenUp::Ended(record) => {
            if record.callback.is_some() && !record.callback_delivered {
                callback::deliver(shared.clone(), jobs.clone(), record).await;
            }
            let _ = message.ack().await;
            return;
        }
    };
    let body = match stream.body(&id, &message).await {
        Ok(body) => body,
        Err(e) => {
            warn!(job = id, error = %e, "cannot read a job's body; it goes back");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
    };
    let run = Run::new(shared, jobs, &record);
    match run.run(record, body).await {
        // The bridge is stopping: another takes the job at once.
        None => {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
        Some(record) => {
            if record.callback.is_some() {
                callback::deliver(shared.clone(), jobs.clone(), record).await;
            }
            let _ = message.ack().await;
        }
    }
}

/// What a pulled job needs.
enum TakenUp {
    Run(Record),
    /// Back to the stream for this long: no worker can take it yet.
    Later(Duration),
    /// It has ended (now or before): only its callback may be due.
    Ended(Record),
}

async fn take_up(
    shared: &Arc<Shared>,
    jobs: &Arc<Jobs>,
    stream: &Stream,
    mut record: Record,
    message: &async_nats::jetstream::Message,
) -> TakenUp {
    if record.state.finished() {
        return TakenUp::Ended(record);
    }
    let config = shared.settings.load().config.jobs.clone();
    let end = |mut record: Record, state: State, error: JobError| async move {
        record.state = state;
        record.error = Some(error);
        record.finished_ms = Some(now_ms());
        if let Err(e) = stream.finish(&record, None).await {
            warn!(job = record.id, error = %e, "could not store how a job ended");
        }
        shared.metrics.job_ended(state.as_str());
        TakenUp::Ended(record)
    };
    if stream.cancelled(&record.id).await.unwrap_or(false) {
        let Ended::Error(state, error) = cancelled() else {
            unreachable!()
        };
        return end(record, state, error).await;
    }
    if record.state == State::Running {
        if !record.replayable {
            return end(record, State::Failed, lost_error()).await;
        }
        record.state = State::Queued;
    }
    if now_ms() >= record.queue_deadline_ms {
        if let Ended::Error(state, error) = expired(&record, config.queue_timeout) {
            return end(record, state, error).await;
        }
    }
    if !placeable(shared, &record) {
        let delivered = message.info().map_or(1, |i| i.delivered.max(1));
        let pause = Duration::from_millis(250)
            .saturating_mul(1 << delivered.min(5) as u32)
            .min(Duration::from_secs(5));
        let _ = jobs;
        return TakenUp::Later(pause);
    }
    TakenUp::Run(record)
}

/// Whether a worker here or at a peer could take the job now.
fn placeable(shared: &Shared, record: &Record) -> bool {
    let cluster = shared.cluster.get();
    match &record.worker {
        Some(id) => {
            shared.registry.hosts(&record.service, id)
                || cluster.is_some_and(|c| !c.hosting(&record.service, id).is_empty())
        }
        None => {
            shared.registry.connected(&record.service) > 0
                || cluster.is_some_and(|c| !c.candidates(&record.service).is_empty())
        }
    }
}

fn lost_error() -> JobError {
    JobError {
        status: 502,
        code: "worker_lost".into(),
        message: "the bridge stopped while a worker ran the job; it is not run again (its method is not idempotent and it has no Idempotency-Key)".into(),
    }
}
