//! Where a cluster keeps its jobs: JetStream, so that any bridge answers
//! for any job and a job outlives the bridge that accepted it.
//!
//! * `<name>_jobs` (a key-value bucket): every job's record, by id; a
//!   watch on a key is how a long poll anywhere learns of a change.
//! * `<name>_job_keys` (key-value): idempotency keys -> job ids, taken
//!   with an atomic create; and cancel marks (`cancel.<id>`).
//! * `<name>_JOBS` (a work-queue stream on `<name>.jobs.run`): one message
//!   per job to run, holding its id and its request body (or naming the
//!   object that holds it). The bridges pull it from one shared consumer:
//!   the one that pulls a job runs it, telling JetStream it is still at
//!   work, and acknowledges it once the job has ended and its callback
//!   was delivered. A bridge that dies stops telling: the message goes to
//!   another bridge, which takes the job up by the restart rules.
//! * `<name>_job_data` (an object store): request bodies too large for a
//!   message, and results.
//!
//! None of this is on the path of a synchronous call.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy},
    kv,
    object_store::{self, ObjectStore},
    stream::{DiscardPolicy, RetentionPolicy, StorageType},
};
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::{now_ms, Record, StoreError};

/// How long a pulled job may go without word from its bridge before
/// JetStream gives it to another: what a dead bridge costs its jobs.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(10);

/// How long a bridge's hold on a job lasts unless renewed (every
/// `ACK_WAIT / 3`, with the progress it tells JetStream). A bridge that
/// pulls a job another holds waits for the hold to lapse.
pub(crate) const LEASE: Duration = Duration::from_secs(20);

/// Bodies up to this size travel in the work message itself.
const INLINE_BODY: usize = 512 * 1024;

/// The header of a work message naming its job.
pub(crate) const JOB_ID: &str = "Wsbridge-Job-Id";
/// Set when the request body is in the object store, not the message.
const BODY_OBJECT: &str = "Wsbridge-Body-Object";

fn nats_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("JetStream: {e}"))
}

/// The cluster's job store.
#[derive(Clone)]
pub(crate) struct Stream {
    js: jetstream::Context,
    jobs: kv::Store,
    keys: kv::Store,
    data: ObjectStore,
    stream: jetstream::stream::Stream,
    subject: String,
    cancel_subject: String,
    max_bytes: u64,
}

/// What `[jobs]` sizes in JetStream.
pub(crate) struct Sizing {
    pub(crate) max_bytes: u64,
    /// The longest a record must live: queue, run and retention.
    pub(crate) max_age: Duration,
    pub(crate) replicas: usize,
}

impl Stream {
    /// Opens (creating what is missing) the cluster `name`'s job store.
    pub(crate) async fn open(
        client: async_nats::Client,
        name: &str,
        sizing: &Sizing,
    ) -> Result<Stream, StoreError> {
        let js = jetstream::new(client);
        let max_bytes = i64::try_from(sizing.max_bytes).unwrap_or(i64::MAX);
        let bucket = |bucket: String| kv::Config {
            bucket,
            history: 1,
            max_age: sizing.max_age,
            storage: StorageType::File,
            num_replicas: sizing.replicas,
            ..Default::default()
        };
        let jobs = js
            .create_or_update_key_value(bucket(format!("{name}_jobs")))
            .await
            .map_err(nats_error)?;
        let keys = js
            .create_or_update_key_value(bucket(format!("{name}_job_keys")))
            .await
            .map_err(nats_error)?;
        let data = match js.get_object_store(format!("{name}_job_data")).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: format!("{name}_job_data"),
                    max_age: sizing.max_age,
                    max_bytes,
                    storage: StorageType::File,
                    num_replicas: sizing.replicas,
                    ..Default::default()
                })
                .await
                .map_err(nats_error)?,
        };
        let subject = format!("{name}.jobs.run");
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: format!("{name}_JOBS"),
                subjects: vec![subject.clone()],
                retention: RetentionPolicy::WorkQueue,
                discard: DiscardPolicy::New,
                max_bytes,
                storage: StorageType::File,
                num_replicas: sizing.replicas,
                ..Default::default()
            })
            .await
            .map_err(nats_error)?;
        Ok(Stream {
            js,
            jobs,
            keys,
            data,
            stream,
            subject,
            cancel_subject: format!("{name}.jobs.cancel"),
            max_bytes: sizing.max_bytes,
        })
    }

    /// The consumer every bridge pulls jobs from.
    pub(crate) async fn consumer(
        &self,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, StoreError> {
        self.stream
            .get_or_create_consumer(
                "runners",
                pull::Config {
                    durable_name: Some("runners".into()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_deliver: -1,
                    max_ack_pending: 100_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(nats_error)
    }

    /// Where `DELETE` tells every bridge to cancel a job.
    pub(crate) fn cancel_subject(&self) -> &str {
        &self.cancel_subject
    }

    /// Takes `record`'s idempotency key for it (atomically: the same key
    /// at two bridges makes one job); the job that has it already, if
    /// any. The record is stored first, so a key never names a job that
    /// is not there (unless it was forgotten, and then the key is taken
    /// over).
    async fn take_key(&self, record: &Record) -> Result<Option<Record>, StoreError> {
        let Some(key) = &record.key else {
            return Ok(None);
        };
        let name = key_name(key);
        let id = Bytes::from(record.id.clone());
        match self.keys.create(&name, id.clone()).await {
            Ok(_) => return Ok(None),
            Err(e) if e.kind() != kv::CreateErrorKind::AlreadyExists => return Err(nats_error(e)),
            Err(_) => {}
        }
        let held = self.keys.get(&name).await.map_err(nats_error)?;
        let held = held.map(|v| String::from_utf8_lossy(&v).into_owned());
        if let Some(held) = held.filter(|h| *h != record.id) {
            if let Some(existing) = self.get(&held).await? {
                return Ok(Some(existing));
            }
        }
        self.keys.put(&name, id).await.map_err(nats_error)?;
        Ok(None)
    }

    /// Stores a new job and queues it to run; with an idempotency key that
    /// another job has, stores nothing and returns that job. On a failure
    /// nothing of it is left (its record, key and body are removed again).
    pub(crate) async fn insert(
        &self,
        record: &Record,
        body: Bytes,
    ) -> Result<Option<Record>, StoreError> {
        let outcome = self.try_insert(record, body).await;
        match &outcome {
            Ok(Some(_)) => {
                let _ = self.jobs.purge(&record.id).await;
            }
            Err(_) => {
                let _ = self.purge(record).await;
            }
            Ok(None) => {}
        }
        outcome
    }

    async fn try_insert(&self, record: &Record, body: Bytes) -> Result<Option<Record>, StoreError> {
        let json = serde_json::to_vec(record).map_err(nats_error)?;
        self.jobs
            .put(&record.id, Bytes::from(json))
            .await
            .map_err(nats_error)?;
        if let Some(existing) = self.take_key(record).await? {
            return Ok(Some(existing));
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(JOB_ID, record.id.as_str());
        let payload = if body.len() > INLINE_BODY {
            self.data
                .put(body_name(&record.id).as_str(), &mut body.as_ref())
                .await
                .map_err(|e| self.full_or(e))?;
            headers.insert(BODY_OBJECT, "1");
            Bytes::new()
        } else {
            body
        };
        let ack = self
            .js
            .publish_with_headers(self.subject.clone(), headers, payload)
            .await
            .map_err(|e| self.full_or(e))?;
        ack.await.map_err(|e| self.full_or(e))?;
        Ok(None)
    }

    /// JetStream refuses a write past `max_bytes` with an error that says
    /// so: that is `Full`.
    fn full_or(&self, e: impl std::fmt::Display) -> StoreError {
        let text = e.to_string();
        if text.contains("maximum bytes") || text.contains("insufficient resources") {
            StoreError::Full {
                limit: self.max_bytes,
            }
        } else {
            nats_error(text)
        }
    }

    /// The request body of a work message.
    pub(crate) async fn body(
        &self,
        id: &str,
        message: &jetstream::Message,
    ) -> Result<Bytes, StoreError> {
        let in_object = message
            .headers
            .as_ref()
            .is_some_and(|h| h.get(BODY_OBJECT).is_some());
        if !in_object {
            return Ok(message.payload.clone());
        }
        self.read_object(&body_name(id)).await
    }

    async fn read_object(&self, name: &str) -> Result<Bytes, StoreError> {
        let mut object = self.data.get(name).await.map_err(nats_error)?;
        let mut bytes = Vec::new();
        object.read_to_end(&mut bytes).await.map_err(nats_error)?;
        Ok(Bytes::from(bytes))
    }

    /// A job's record.
    pub(crate) async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let value = self.jobs.get(id).await.map_err(nats_error)?;
        value
            .map(|v| serde_json::from_slice(&v).map_err(nats_error))
            .transpose()
    }

    /// Stores a finished job's result body.
    pub(crate) async fn store_result(&self, id: &str, body: &Bytes) -> Result<(), StoreError> {
        self.data
            .put(result_name(id).as_str(), &mut body.as_ref())
            .await
            .map_err(|e| self.full_or(e))?;
        Ok(())
    }

    /// Drops a job's request body once it is no longer needed.
    pub(crate) async fn drop_body(&self, id: &str) {
        let _ = self.data.delete(body_name(id)).await;
    }

    /// A job's record with its revision, unless it is gone.
    async fn entry(&self, id: &str) -> Result<Option<(Record, u64)>, StoreError> {
        let Some(entry) = self.jobs.entry(id).await.map_err(nats_error)? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record = serde_json::from_slice(&entry.value).map_err(nats_error)?;
        Ok(Some((record, entry.revision)))
    }

    /// Writes `record` if it is still at `revision`; its new revision.
    async fn update(&self, record: &Record, revision: u64) -> Result<u64, StoreError> {
        let json = serde_json::to_vec(record).map_err(nats_error)?;
        match self
            .jobs
            .update(&record.id, Bytes::from(json), revision)
            .await
        {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(StoreError::Conflict)
            }
            Err(e) => Err(nats_error(e)),
        }
    }

    /// Ends a queued job that no bridge holds (a `DELETE`), unless it
    /// changed meanwhile; false if it could not be ended here.
    pub(crate) async fn end_unheld(&self, ended: &Record) -> Result<bool, StoreError> {
        let Some((now, revision)) = self.entry(&ended.id).await? else {
            return Ok(false);
        };
        let held = now.owner.is_some() && now.lease_ms > now_ms();
        if now.state.finished() || held {
            return Ok(false);
        }
        match self.update(ended, revision).await {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Takes hold of job `id` for bridge `node`.
    pub(crate) async fn claim(&self, node: &str, id: &str) -> Result<Claimed, StoreError> {
        let Some((mut record, revision)) = self.entry(id).await? else {
            return Ok(Claimed::Gone);
        };
        let now = now_ms();
        if record.owner.as_deref().is_some_and(|o| o != node) && record.lease_ms > now {
            return Ok(Claimed::Held {
                for_ms: record.lease_ms - now,
            });
        }
        record.owner = Some(node.to_owned());
        record.lease_ms = now + LEASE.as_millis() as u64;
        match self.update(&record, revision).await {
            Ok(revision) => Ok(Claimed::Mine(Arc::new(Claim {
                stream: self.clone(),
                held: tokio::sync::Mutex::new((record, revision)),
                lost: AtomicBool::new(false),
            }))),
            Err(StoreError::Conflict) => Ok(Claimed::Held { for_ms: 1000 }),
            Err(e) => Err(e),
        }
    }

    /// A finished job's result body, to be read as it is sent.
    pub(crate) async fn result(&self, id: &str) -> Result<object_store::Object, StoreError> {
        self.data.get(result_name(id)).await.map_err(nats_error)
    }

    /// Forgets a job: its record, key, cancel mark and objects.
    pub(crate) async fn purge(&self, record: &Record) -> Result<(), StoreError> {
        if let Some(key) = &record.key {
            let _ = self.keys.purge(key_name(key)).await;
        }
        let _ = self.keys.purge(cancel_name(&record.id)).await;
        let _ = self.data.delete(body_name(&record.id)).await;
        let _ = self.data.delete(result_name(&record.id)).await;
        self.jobs.purge(&record.id).await.map_err(nats_error)
    }

    /// Marks a job cancelled (for the bridge that pulls it later) and
    /// tells the bridges (for the one running it now).
    pub(crate) async fn cancel(&self, id: &str) -> Result<(), StoreError> {
        self.keys
            .put(cancel_name(id), Bytes::from_static(b"1"))
            .await
            .map_err(nats_error)?;
        self.js
            .client()
            .publish(self.cancel_subject.clone(), Bytes::from(id.to_owned()))
            .await
            .map_err(nats_error)
    }

    /// Whether a job was marked cancelled.
    pub(crate) async fn cancelled(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .keys
            .get(cancel_name(id))
            .await
            .map_err(nats_error)?
            .is_some())
    }

    /// The record's changes from now on.
    pub(crate) async fn watch(&self, id: &str) -> Result<kv::Watch, StoreError> {
        self.jobs.watch_with_history(id).await.map_err(nats_error)
    }
}

/// What became of a bridge's attempt to take hold of a job.
pub(crate) enum Claimed {
    /// This bridge holds it now.
    Mine(Arc<Claim>),
    /// Another bridge holds it, for this long at most.
    Held { for_ms: u64 },
    /// It was purged.
    Gone,
}

/// A bridge's hold on a job it pulled. Every write it makes is checked
/// against the revision it wrote last: a bridge whose hold lapsed (it was
/// cut off for longer than [`LEASE`]) and that another bridge took over
/// can no longer change the job, and learns that it lost it.
pub(crate) struct Claim {
    stream: Stream,
    held: tokio::sync::Mutex<(Record, u64)>,
    lost: AtomicBool,
}

impl Claim {
    /// The job as this bridge last wrote it.
    pub(crate) async fn record(&self) -> Record {
        self.held.lock().await.0.clone()
    }

    /// The store the job is in.
    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Whether another bridge took the job over.
    pub(crate) fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Changes the job with `change` and writes it, renewing the hold.
    pub(crate) async fn modify(
        &self,
        change: impl FnOnce(&mut Record),
    ) -> Result<Record, StoreError> {
        let mut held = self.held.lock().await;
        let mut record = held.0.clone();
        change(&mut record);
        record.lease_ms = now_ms() + LEASE.as_millis() as u64;
        match self.stream.update(&record, held.1).await {
            Ok(revision) => {
                *held = (record.clone(), revision);
                Ok(record)
            }
            Err(e) => {
                if matches!(e, StoreError::Conflict) {
                    self.lost.store(true, Ordering::Release);
                }
                Err(e)
            }
        }
    }
}

/// KV keys are `[-/_=.a-zA-Z0-9]`: an idempotency key is stored by the
/// hex of its SHA-256.
fn key_name(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("key.{hex}")
}

fn cancel_name(id: &str) -> String {
    format!("cancel.{id}")
}

fn body_name(id: &str) -> String {
    format!("body.{id}")
}

fn result_name(id: &str) -> String {
    format!("result.{id}")
}
