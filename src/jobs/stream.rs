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
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::{Record, StoreError};

/// How long a pulled job may go without word from its bridge before
/// JetStream gives it to another: what a dead bridge costs its jobs.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(10);

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

    /// Takes `key` for job `id`; if it is taken, the job that has it.
    pub(crate) async fn take_key(&self, key: &str, id: &str) -> Result<Option<String>, StoreError> {
        let name = key_name(key);
        match self.keys.create(&name, Bytes::from(id.to_owned())).await {
            Ok(_) => Ok(None),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let held = self.keys.get(&name).await.map_err(nats_error)?;
                Ok(held.map(|v| String::from_utf8_lossy(&v).into_owned()))
            }
            Err(e) => Err(nats_error(e)),
        }
    }

    /// Stores a new job and queues it to run; on a failure nothing of it
    /// is left (its record, key and body are removed again).
    pub(crate) async fn insert(&self, record: &Record, body: Bytes) -> Result<(), StoreError> {
        let outcome = self.try_insert(record, body).await;
        if outcome.is_err() {
            let _ = self.purge(record).await;
        }
        outcome
    }

    async fn try_insert(&self, record: &Record, body: Bytes) -> Result<(), StoreError> {
        let json = serde_json::to_vec(record).map_err(nats_error)?;
        self.jobs
            .put(&record.id, Bytes::from(json))
            .await
            .map_err(nats_error)?;
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
        Ok(())
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

    /// Stores a changed record.
    pub(crate) async fn put(&self, record: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_vec(record).map_err(nats_error)?;
        self.jobs
            .put(&record.id, Bytes::from(json))
            .await
            .map_err(nats_error)?;
        Ok(())
    }

    /// Stores a finished job: its result first, then its record.
    pub(crate) async fn finish(
        &self,
        record: &Record,
        result: Option<Bytes>,
    ) -> Result<(), StoreError> {
        if let Some(body) = result {
            self.data
                .put(result_name(&record.id).as_str(), &mut body.as_ref())
                .await
                .map_err(|e| self.full_or(e))?;
        }
        let _ = self.data.delete(body_name(&record.id)).await;
        self.put(record).await
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
