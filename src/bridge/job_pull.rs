//! Jobs in a cluster (`[jobs] jetstream`): every bridge pulls jobs from
//! the shared work queue while it has room, takes hold of each (a lease
//! in its record, renewed while it works, so that no two bridges run one
//! job), runs it as `job_run.rs` runs any job, calls back, and only then
//! acknowledges it. A bridge that dies stops renewing: JetStream gives
//! the message to another bridge, which takes the job up by the restart
//! rules once the hold has lapsed.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    consumer::{pull, Consumer},
    AckKind, Message,
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use super::{
    callback,
    job_run::{cancelled, expired, lost_error, Ended, Jobs, Run, Writer},
    Shared,
};
use crate::{
    cluster::Cluster,
    jobs::{
        now_ms,
        stream::{Claim, Claimed, Sizing, ACK_WAIT, JOB_ID},
        Backend, Record, State, Stream,
    },
};

/// Opens the cluster's job store and starts pulling jobs from it.
pub(super) async fn join(
    shared: &Arc<Shared>,
    cluster: Option<&Cluster>,
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
    let pull = Pull {
        shared: shared.clone(),
        jobs: jobs.clone(),
        stream,
        node: cluster.node.clone(),
    };
    jobs.tasks.spawn(pull.consume(consumer, config.concurrency));
    info!("jobs kept in JetStream, pulled by every bridge of the cluster");
    Ok(jobs)
}

/// Cancels the jobs running here that a `DELETE` anywhere named.
async fn listen_cancels(jobs: Arc<Jobs>, mut cancels: async_nats::Subscriber) {
    loop {
        let message = tokio::select! {
            _ = jobs.stop.cancelled() => return,
            m = cancels.next() => m,
        };
        let Some(message) = message else { return };
        jobs.cancel(&String::from_utf8_lossy(&message.payload));
    }
}

/// What pulling needs; cheap to clone into each job's task.
#[derive(Clone)]
struct Pull {
    shared: Arc<Shared>,
    jobs: Arc<Jobs>,
    stream: Stream,
    node: String,
}

impl Pull {
    /// Pulls jobs while this bridge has room for them (`concurrency` at
    /// once), each into a task of its own.
    async fn consume(self, consumer: Consumer<pull::Config>, concurrency: usize) {
        let room = Arc::new(Semaphore::new(concurrency));
        loop {
            let first = tokio::select! {
                _ = self.jobs.stop.cancelled() => return,
                p = room.clone().acquire_owned() => p,
            };
            let Ok(first) = first else { return };
            let mut permits = vec![first];
            while let Ok(p) = room.clone().try_acquire_owned() {
                permits.push(p);
            }
            // Only as many as can start now: a message pulled and left
            // waiting would go to another bridge after ACK_WAIT.
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
                        _ = self.jobs.stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let message = tokio::select! {
                    _ = self.jobs.stop.cancelled() => return,
                    m = batch.next() => m,
                };
                let Some(Ok(message)) = message else { break };
                let Some(permit) = permits.pop() else { break };
                let pull = self.clone();
                self.jobs
                    .tasks
                    .spawn(async move { pull.pulled(message, permit).await });
            }
        }
    }

    /// One job pulled from the stream: held, taken up by the restart
    /// rules (the bridge that pulled it before may have died), run, called
    /// back, then acknowledged. Its room here is given back as soon as it
    /// has run: a callback that keeps failing holds no room.
    async fn pulled(self, message: Message, room: tokio::sync::OwnedSemaphorePermit) {
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(JOB_ID))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let claim = match self.stream.claim(&self.node, &id).await {
            Ok(Claimed::Mine(claim)) => claim,
            // Purged, or not a job's message: nothing to run.
            Ok(Claimed::Gone) => return ack(&message, AckKind::Ack).await,
            // Another bridge holds it: come back when its hold lapses.
            Ok(Claimed::Held { for_ms }) => {
                let pause = Duration::from_millis(for_ms.clamp(250, 20_000));
                return ack(&message, AckKind::Nak(Some(pause))).await;
            }
            Err(e) => {
                warn!(job = id, error = %e, "cannot take hold of a pulled job; it goes back");
                return ack(&message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
        };
        let _alive = keep_alive(&message, claim.clone());
        let writer = Writer::Claim(claim.clone());
        let record = claim.record().await;
        // Live from here: a cancel from now on reaches this run.
        let run = Run::new(&self.shared, &self.jobs, &record, writer.clone());
        let ended = match self.take_up(record, &run, &message).await {
            Next::Later(pause) => {
                drop(run);
                self.jobs.forget(&id);
                return ack(&message, AckKind::Nak(Some(pause))).await;
            }
            Next::Ended(record) => record,
            Next::Run(record) => match self.stream.body(&id, &message).await {
                Ok(body) => run.run(record, Some(body)).await,
                Err(e) => {
                    warn!(job = id, error = %e, "cannot read a job's body; it goes back");
                    self.jobs.forget(&id);
                    return ack(&message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            },
        };
        drop(room);
        let Some(record) = ended else {
            // Stopping, or not stored (or no longer this bridge's): another
            // bridge takes it up.
            return ack(&message, AckKind::Nak(None)).await;
        };
        let delivered = match record.callback.is_some() && !record.callback_delivered {
            true => callback::deliver(self.shared, self.jobs, record, writer).await,
            false => true,
        };
        let kind = match delivered && !claim.lost() {
            true => AckKind::Ack,
            false => AckKind::Nak(None),
        };
        ack(&message, kind).await;
    }

    /// What a pulled job needs: to run, to wait, or nothing (it ended, now
    /// or before; only its callback may be due).
    async fn take_up(&self, mut record: Record, run: &Run, message: &Message) -> Next {
        if record.state.finished() {
            self.jobs.forget(&record.id);
            return Next::Ended(Some(record));
        }
        let config = self.shared.settings.load().config.jobs.clone();
        // Asked after this run became live: a DELETE either marked the job
        // before (seen here) or reaches the run.
        if run.is_cancelled() || self.stream.cancelled(&record.id).await.unwrap_or(false) {
            let Ended::Error(state, error) = cancelled() else {
                return Next::Ended(None);
            };
            return Next::Ended(run.end_now(record, state, error).await);
        }
        if record.state == State::Running {
            if !record.replayable {
                return Next::Ended(run.end_now(record, State::Failed, lost_error()).await);
            }
            record.state = State::Queued;
        }
        if now_ms() >= record.queue_deadline_ms {
            if let Ended::Error(state, error) = expired(&record, config.queue_timeout) {
                return Next::Ended(run.end_now(record, state, error).await);
            }
        }
        if !placeable(&self.shared, &record) {
            let delivered = message.info().map_or(1, |i| i.delivered.max(1));
            let pause = Duration::from_millis(250)
                .saturating_mul(1 << delivered.min(5) as u32)
                .min(Duration::from_secs(5));
            return Next::Later(pause);
        }
        Next::Run(record)
    }
}

/// What a pulled job needs.
enum Next {
    Run(Record),
    /// Back to the stream for this long: no worker can take it yet.
    Later(Duration),
    /// It has ended; `None` if that could not be stored.
    Ended(Option<Record>),
}

async fn ack(message: &Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        warn!(error = %e, "could not answer JetStream for a job");
    }
}

/// Until dropped: tells JetStream that a pulled job is still at work, and
/// renews this bridge's hold on it.
fn keep_alive(message: &Message, claim: Arc<Claim>) -> AbortOnDropHandle<()> {
    let (context, reply) = (message.context.clone(), message.reply.clone());
    AbortOnDropHandle::new(tokio::spawn(async move {
        let Some(reply) = reply else { return };
        loop {
            tokio::time::sleep(ACK_WAIT / 3).await;
            if claim.lost() {
                return;
            }
            let progress: Bytes = AckKind::Progress.into();
            let _ = context.client().publish(reply.clone(), progress).await;
            let _ = claim.modify(|_| {}).await;
        }
    }))
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
