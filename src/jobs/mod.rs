//! Asynchronous calls ("jobs"): a call sent with `Prefer: respond-async` is
//! stored durably before the caller gets `202 Accepted`, run like any call,
//! and its result kept for `jobs.retention`. This module owns what a job is
//! ([`record`]), where it is kept on one bridge ([`store`], an embedded
//! redb database with group commit) and how a callback is signed
//! ([`sign`]). The HTTP side and the runner live in `bridge/jobs.rs` and
//! `bridge/job_run.rs`.

pub(crate) mod record;
pub(crate) mod sign;
pub(crate) mod store;
pub(crate) mod stream;

pub(crate) use record::{JobError, Outcome, Record, State};
pub(crate) use store::{ResultBody, Store, StoreError};
pub(crate) use stream::Stream;

/// Where jobs are kept: this bridge's own store, or the cluster's.
#[derive(Clone)]
pub(crate) enum Backend {
    /// `[jobs] dir`: redb on this bridge.
    Local(Store),
    /// `[jobs] jetstream`: JetStream, shared by the cluster's bridges.
    Stream(Box<Stream>),
}

impl Backend {
    /// A job's record.
    pub(crate) async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        match self {
            Backend::Local(s) => s.get(id).await,
            Backend::Stream(s) => s.get(id).await,
        }
    }

    /// A finished job's result body.
    pub(crate) async fn result(&self, record: &Record) -> Result<ResultBody, StoreError> {
        match self {
            Backend::Local(s) => s.result(record).await,
            Backend::Stream(s) => s
                .result(&record.id)
                .await
                .map(|o| ResultBody::Object(Box::new(o))),
        }
    }

    /// Forgets a job.
    pub(crate) async fn purge(&self, id: &str) -> Result<(), StoreError> {
        match self {
            Backend::Local(s) => s.purge(id).await,
            Backend::Stream(s) => match s.get(id).await? {
                Some(record) => s.purge(&record).await,
                None => Ok(()),
            },
        }
    }

    /// Commits and the changes they held (this bridge's store only).
    pub(crate) fn commits(&self) -> (u64, u64) {
        match self {
            Backend::Local(s) => s.commits(),
            Backend::Stream(_) => (0, 0),
        }
    }

    /// Bytes this bridge's store holds (0 for the cluster's, which
    /// JetStream accounts for).
    pub(crate) fn stored(&self) -> u64 {
        match self {
            Backend::Local(s) => s.stored(),
            Backend::Stream(_) => 0,
        }
    }
}

/// Milliseconds since the Unix epoch, the clock of job records (they
/// outlive the process, so `Instant`s cannot be stored).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A new job id: 128 random bits from the OS's generator, as 32 hex digits.
pub(crate) fn new_id() -> Result<String, StoreError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Io(format!("no randomness: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
